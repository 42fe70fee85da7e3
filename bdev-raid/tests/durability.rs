//! The durability contract through the RAID layer, with a power cut: two
//! reactors (sleep-when-idle) storm an array over `VolatileCacheBdev`
//! members (a modelled volatile write cache with a seeded destager) with
//! overlapping stamped writes, some FUA, and interleaved flushes; then every
//! member loses power mid-storm. Each member's media must then hold, for
//! every block, the newest write that was durable by contract — acknowledged
//! with FUA, or acknowledged before a flush that was submitted after the
//! acknowledgement and completed — or a write that may be later than it.
//! With a superblock and write-intent bitmap, every block whose copies
//! differ after the cut must lie in a chunk that the bitmaps on the media
//! mark dirty (what assembly resyncs).
//!
//! Replay a failure with `NVRAID_SEED=<seed>` (printed on failure).

mod common;

use bdev::rng::SimRng;
use bdev::stamp::{check_block, stamp_buffer};
use bdev::volatile_cache::VolatileCacheBdev;
use bdev::{BdevProps, DmaBuf, IoBox, IoFlags, IoStatus, IoType, Registry};
use bdev_raid::rpc::{bdev_raid_create_async, RaidCreateParams};
use bdev_raid::superblock::{self, SB_SIZE_BYTES};
use bdev_raid::{RaidArray, RaidState};
use common::*;
use reactor::PollStatus;
use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

const BS: u64 = 512;
/// One in this many member writes also destages a random cached block.
const DESTAGE_ONE_IN: u64 = 3;

/// One array write as the storm saw it. Clocks come from one counter that
/// both reactors advance, so they order events across reactors.
#[derive(Clone, Copy, Debug)]
struct WriteRec {
    seq: u64,
    offset: u64,
    blocks: u64,
    fua: bool,
    submit: u64,
    /// Clock of the successful acknowledgement (None: failed or never).
    ack: Option<u64>,
}

#[derive(Default)]
struct Log {
    writes: Vec<WriteRec>,
    /// Submit clocks of flushes that completed successfully.
    flushes_ok: Vec<u64>,
    flushes_failed: u64,
}

/// Shared by both reactors' storms and the test thread.
#[derive(Default)]
struct Shared {
    clock: AtomicU64,
    acked_writes: AtomicU64,
    stop: AtomicBool,
    finished: AtomicU64,
    log: Mutex<Log>,
}

impl Shared {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct StormCfg {
    writer: u64,
    seed: u64,
    run_seed: u64,
    data_blocks: u64,
    hot_blocks: u64,
    queue_depth: u64,
    /// One IO in this many is a flush.
    flush_one_in: u64,
}

/// Keeps `queue_depth` IOs in flight on this reactor until `stop`: writes
/// (1 in 4 with FUA), half of them into a small hot region so they overlap,
/// and now and then (1 in `flush_one_in`) a flush.
fn start_storm(ch: Rc<bdev::Channel>, cfg: StormCfg, sh: Arc<Shared>) {
    let rng = Rc::new(std::cell::RefCell::new(SimRng::new(cfg.seed)));
    let in_flight = Rc::new(Cell::new(0u64));
    let next_seq = Rc::new(Cell::new(1u64));
    let (sh2, inf2) = (sh.clone(), in_flight.clone());
    let on_done: Rc<dyn bdev::IoDone> = Rc::new(move |io: IoBox| {
        inf2.set(inf2.get() - 1);
        let ok = io.status == IoStatus::Success;
        let now = sh2.tick();
        let mut log = sh2.log();
        match io.io_type {
            IoType::Write => {
                if ok {
                    log.writes[io.tag as usize].ack = Some(now);
                    drop(log);
                    sh2.acked_writes.fetch_add(1, Ordering::Relaxed);
                }
            }
            IoType::Flush if ok => log.flushes_ok.push(io.tag2),
            _ => log.flushes_failed += 1,
        }
    });
    reactor::register_poller("durability_storm", move || {
        if sh.stop.load(Ordering::Acquire) {
            if in_flight.get() == 0 {
                sh.finished.fetch_add(1, Ordering::AcqRel);
                return PollStatus::Done;
            }
            return PollStatus::Idle;
        }
        let mut busy = false;
        while in_flight.get() < cfg.queue_depth {
            let mut r = rng.borrow_mut();
            let io = if r.below(cfg.flush_one_in) == 0 {
                let mut io = IoBox::data(IoType::Flush, 0, 0, None).expect("descriptor");
                io.tag2 = sh.tick();
                io
            } else {
                let n = 1 + r.below(16);
                let region = if r.below(2) == 0 { cfg.hot_blocks } else { cfg.data_blocks };
                let offset = r.below(region - n + 1);
                let fua = r.below(4) == 0;
                let seq = cfg.writer << 40 | next_seq.get();
                next_seq.set(next_seq.get() + 1);
                let buf = DmaBuf::alloc((n * BS) as usize).expect("buffer");
                buf.with_mut(|b| stamp_buffer(b, BS as usize, offset, seq, cfg.run_seed));
                let mut io = IoBox::data(IoType::Write, offset, n, Some(buf)).expect("descriptor");
                if fua {
                    io.flags = IoFlags::FUA;
                }
                let submit = sh.tick();
                let mut log = sh.log();
                io.tag = log.writes.len() as u64;
                log.writes.push(WriteRec { seq, offset, blocks: n, fua, submit, ack: None });
                io
            };
            drop(r);
            let mut io = io;
            io.set_done(on_done.clone());
            in_flight.set(in_flight.get() + 1);
            ch.submit(io);
            busy = true;
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    });
}

struct Rig {
    set: Set,
    members: Vec<Arc<VolatileCacheBdev>>,
    /// Where array data starts on each member (blocks).
    data_offset: u64,
    geo: Arc<bdev_raid::Geometry>,
}

/// A fresh reactor set with `n` cache members C0.. and array "R" over them.
fn build(seed: u64, level: &'static str, n: usize, member_blocks: u64, sb_chunk_kb: Option<u32>) -> Rig {
    let set = start(2);
    let members = set.call(0, move || {
        bdev_raid::init();
        (0..n)
            .map(|i| {
                let props = BdevProps::new(&format!("C{i}"), "Volatile cache", BS as u32, member_blocks, None);
                let seed = seed.wrapping_add(0x9E37_79B9 * (i as u64 + 1));
                let m = Arc::new(VolatileCacheBdev::new(props, seed, DESTAGE_ONE_IN).unwrap());
                Registry::get().register(m.clone()).unwrap();
                m
            })
            .collect::<Vec<_>>()
    });
    let created = set.call_async(0, 30, move |done| {
        bdev_raid_create_async(
            RaidCreateParams {
                name: "R".into(),
                raid_level: level.into(),
                base_bdevs: (0..n).map(|i| format!("C{i}")).collect(),
                strip_size_kb: (level != "raid1").then_some(4),
                uuid: None,
                superblock: Some(sb_chunk_kb.is_some()),
                bitmap: None,
                bitmap_chunk_size_kb: sb_chunk_kb,
            },
            done,
        )
    });
    created.expect("create R");
    set.wait_for(20, "R online", || RaidArray::find("R").is_some_and(|r| r.state() == RaidState::Online));
    let info = set.call(0, || RaidArray::find("R").unwrap().info_json());
    let data_offset = info["base_bdevs_list"][0]["data_offset"].as_u64().unwrap();
    let geo = set.call(0, || RaidArray::find("R").unwrap().geometry().unwrap());
    let (wc, dz) = set.call(0, || {
        let h = Registry::get().lookup("R").unwrap();
        (h.bdev().has_write_cache(), h.props().deallocated_reads_zeroes)
    });
    assert!(wc, "an array over members with volatile caches reports a write cache");
    assert!(dz, "members whose unmapped blocks read as zeroes make an array whose do");
    Rig { set, members, data_offset, geo }
}

/// Storms from both reactors, cuts every member's power once `cut_after`
/// writes were acknowledged, and lets the storms drain. Returns the log.
fn storm_and_cut(rig: &Rig, seed: u64, case: &Case, cut_after: u64) -> Log {
    let sh = Arc::new(Shared::default());
    let data_blocks = rig.geo.array_blocks();
    for r in 0..2u64 {
        let sh = sh.clone();
        let cfg = StormCfg {
            writer: r + 1,
            seed: seed ^ (r + 1).wrapping_mul(0x5851_F42D_4C95_7F2D),
            run_seed: seed,
            data_blocks,
            hot_blocks: case.hot_blocks.min(data_blocks),
            queue_depth: 16,
            flush_one_in: case.flush_one_in,
        };
        rig.set.0.send(r as usize, move || {
            let ch = Registry::get().lookup("R").unwrap().channel().unwrap();
            start_storm(ch, cfg, sh);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while sh.acked_writes.load(Ordering::Relaxed) < cut_after {
        assert!(
            Instant::now() < deadline,
            "storm too slow: {} writes acknowledged",
            sh.acked_writes.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    cut_power(rig);
    sh.stop.store(true, Ordering::Release);
    while sh.finished.load(Ordering::Acquire) < 2 {
        assert!(Instant::now() < deadline, "storm did not drain after the power cut");
        std::thread::sleep(Duration::from_millis(1));
    }
    let log = std::mem::take(&mut *sh.log());
    log
}

/// Power loss, mid-storm, on every member at the same instant: both
/// reactors are parked inside a message (test equipment may block a
/// reactor) while the caches are dropped, so no member IO completes on one
/// member after another lost power (the array would rightly fail and
/// record the first one, a different scenario).
fn cut_power(rig: &Rig) {
    let parked = Arc::new(Barrier::new(3));
    let resume = Arc::new(Barrier::new(3));
    for r in 0..2 {
        let (p, g) = (parked.clone(), resume.clone());
        rig.set.0.send(r, move || {
            p.wait();
            g.wait();
        });
    }
    parked.wait();
    for m in &rig.members {
        m.power_cut();
    }
    resume.wait();
}

/// The member's data area as the power cut left it.
fn media(m: &VolatileCacheBdev, data_offset: u64, blocks: u64) -> Vec<u8> {
    let mut v = vec![0u8; (blocks * BS) as usize];
    assert!(m.read_media((data_offset * BS) as usize, &mut v));
    v
}

/// Checks each member's media against the durable model; returns failures.
fn check_durable(rig: &Rig, log: &Log, seed: u64) -> Vec<String> {
    let blocks = rig.geo.array_blocks();
    let last_flush = log.flushes_ok.iter().copied().max().unwrap_or(0);
    let durable = |w: &WriteRec| w.ack.is_some_and(|a| w.fua || a < last_flush);
    let by_seq: HashMap<u64, &WriteRec> = log.writes.iter().map(|w| (w.seq, w)).collect();
    // Per block, the writes that are durable by contract.
    let mut durable_on: Vec<Vec<&WriteRec>> = vec![Vec::new(); blocks as usize];
    for w in log.writes.iter().filter(|w| durable(w)) {
        for b in w.offset..w.offset + w.blocks {
            durable_on[b as usize].push(w);
        }
    }
    let images: Vec<Vec<u8>> =
        rig.members.iter().map(|m| media(m, rig.data_offset, rig.geo.member_data_blocks(0))).collect();
    let mut bad = Vec::new();
    for lba in 0..blocks {
        let Some(placement) = rig.geo.locate(lba) else { continue };
        for (mi, image) in images.iter().enumerate() {
            let Some(loc) = placement.on_member(mi) else { continue };
            let at = (loc.offset_blocks * BS) as usize;
            let blk = &image[at..at + BS as usize];
            let need = &durable_on[lba as usize];
            let verdict = match check_block(blk, lba, seed) {
                Err(bdev::stamp::StampError::NoStamp) if need.is_empty() => continue,
                Err(e) => Err(format!("{e}")),
                Ok(s) => match by_seq.get(&s.seq) {
                    None => Err(format!("seq {:#x} was never written", s.seq)),
                    Some(x) => {
                        // `x` must not be known to be older than any durable write.
                        match need.iter().find(|d| d.seq != x.seq && x.ack.is_some_and(|a| a < d.submit)) {
                            Some(d) => Err(format!(
                                "holds write {:#x} (acked at {:?}), older than durable write {:#x} (fua {}, \
                                 submitted {}, acked {:?}, last flush {last_flush})",
                                x.seq, x.ack, d.seq, d.fua, d.submit, d.ack
                            )),
                            None => Ok(()),
                        }
                    }
                },
            };
            if let Err(e) = verdict {
                let newest = need.iter().max_by_key(|d| d.ack).map(|d| (d.seq, d.fua));
                bad.push(format!("member {mi} block {lba}: {e}; durable writes: {}, newest {newest:x?}", need.len()));
            }
        }
    }
    bad
}

/// The union of the bitmaps on the members' media (what assembly resyncs),
/// as chunk size and dirty bits; an unreadable member is skipped, as
/// assembly does; with none readable every chunk counts as dirty.
fn durable_bitmap(rig: &Rig) -> (u64, Vec<bool>) {
    let mut union: Option<(u64, Vec<bool>)> = None;
    let mut clean_at_events = None;
    for m in &rig.members {
        let mut sb = vec![0u8; SB_SIZE_BYTES];
        assert!(m.read_media(0, &mut sb));
        let Ok(info) = superblock::decode(&sb) else { continue };
        if info.clean {
            clean_at_events = Some(info.events);
        }
        let loc = info.bitmap.expect("the array has a bitmap");
        let g = bitmap::Geometry::new(
            info.array_uuid.into_bytes(),
            BS as u32,
            info.array_blocks,
            Some(loc.chunk_size_blocks),
        )
        .unwrap();
        let page_bytes = g.page_buf_bytes();
        let pages: Vec<Vec<u8>> = (0..g.num_pages())
            .map(|p| {
                let mut v = vec![0u8; page_bytes];
                assert!(m.read_media(((loc.offset_blocks + p as u64 * g.page_blocks()) * BS) as usize, &mut v));
                v
            })
            .collect();
        let refs: Vec<&[u8]> = pages.iter().map(|p| &p[..]).collect();
        let Ok(lb) = bitmap::LoadedBitmap::from_pages(g, &refs) else { continue };
        let bits: Vec<bool> = (0..g.num_chunks()).map(|c| lb.is_dirty(c)).collect();
        match &mut union {
            None => union = Some((loc.chunk_size_blocks, bits)),
            Some((_, u)) => u.iter_mut().zip(bits).for_each(|(a, b)| *a |= b),
        }
    }
    assert!(clean_at_events.is_none(), "a superblock says clean after a power cut of a running array");
    union.unwrap_or_else(|| {
        let chunks = rig.geo.array_blocks();
        (1, vec![true; chunks as usize])
    })
}

/// Blocks whose copies differ (raid1: every member at the same offset).
fn differing_blocks(rig: &Rig) -> Vec<u64> {
    let n = rig.geo.member_data_blocks(0);
    let images: Vec<Vec<u8>> = rig.members.iter().map(|m| media(m, rig.data_offset, n)).collect();
    (0..n)
        .filter(|&b| {
            let r = (b * BS) as usize..((b + 1) * BS) as usize;
            images.iter().any(|i| i[r.clone()] != images[0][r.clone()])
        })
        .collect()
}

struct Case {
    level: &'static str,
    members: usize,
    member_blocks: u64,
    hot_blocks: u64,
    /// Superblock with a bitmap of chunks of this size.
    sb_chunk_kb: Option<u32>,
    flush_one_in: u64,
    rounds: u64,
}

fn run(case: Case) {
    let seed = seed();
    eprintln!("{} power-cut storm: seed {seed} (replay with NVRAID_SEED={seed})", case.level);
    let mut rng = SimRng::new(seed);
    let mut total_durable = 0usize;
    let mut total_differing = 0usize;
    let mut total_flushes = 0usize;
    for round in 0..case.rounds {
        let round_seed = seed.wrapping_add(round.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let rig = build(round_seed, case.level, case.members, case.member_blocks, case.sb_chunk_kb);
        let cut_after = 300 + rng.below(900);
        let log = storm_and_cut(&rig, round_seed, &case, cut_after);
        let acked = log.writes.iter().filter(|w| w.ack.is_some()).count();
        let fua = log.writes.iter().filter(|w| w.ack.is_some() && w.fua).count();
        assert!(acked as u64 >= cut_after && fua > 0, "the storm did its work");
        total_flushes += log.flushes_ok.len();
        let bad = check_durable(&rig, &log, round_seed);
        assert!(
            bad.is_empty(),
            "{}: {} blocks lost durable writes in round {round} (seed {seed}, replay with NVRAID_SEED={seed}):\n{}",
            case.level,
            bad.len(),
            bad.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
        );
        total_durable += log.writes.iter().filter(|w| w.ack.is_some()).count();
        if case.sb_chunk_kb.is_some() {
            let (chunk_blocks, dirty) = durable_bitmap(&rig);
            let differing = differing_blocks(&rig);
            total_differing += differing.len();
            let unmarked: Vec<u64> = differing
                .iter()
                .copied()
                .filter(|&b| !dirty.get((b / chunk_blocks) as usize).copied().unwrap_or(false))
                .collect();
            assert!(
                unmarked.is_empty(),
                "{}: copies differ in chunks the bitmap calls clean, blocks {:?} (chunk {chunk_blocks} blocks) in round \
                 {round} (seed {seed}, replay with NVRAID_SEED={seed})",
                case.level,
                &unmarked[..unmarked.len().min(16)]
            );
        }
        let counters: Vec<_> = rig.members.iter().map(|m| m.counters()).collect();
        assert!(
            counters.iter().all(|c| c.fua_writes > 0 && c.flushes > 0),
            "FUA and flush reached every member: {counters:?}"
        );
        let impossible = rig.set.call(0, || RaidArray::find("R").unwrap().impossible_events());
        assert_eq!(impossible, 0, "impossible IO states met");
    }
    assert!(total_flushes > 0, "no flush completed in {} rounds (seed {seed})", case.rounds);
    let differing = match case.sb_chunk_kb {
        Some(_) => format!(", {total_differing} blocks differing after the cuts (all in dirty chunks)"),
        None => String::new(),
    };
    eprintln!(
        "{}: {} rounds, {total_durable} acknowledged writes and {total_flushes} flushes checked{differing}",
        case.level, case.rounds
    );
}

fn plain(level: &'static str, members: usize, rounds: u64) -> Case {
    Case { level, members, member_blocks: 2048, hot_blocks: 96, sb_chunk_kb: None, flush_one_in: 24, rounds }
}

#[test]
fn raid1_power_cut_keeps_fua_and_flushed_writes() {
    run(plain("raid1", 2, 4));
}

#[test]
fn raid10_power_cut_keeps_fua_and_flushed_writes() {
    run(plain("raid10", 4, 3));
}

#[test]
fn raid0_power_cut_keeps_fua_and_flushed_writes() {
    run(plain("raid0", 2, 3));
}

#[test]
fn raid1_with_bitmap_power_cut_keeps_writes_and_marks_every_differing_chunk() {
    // 4 MiB members: superblock, bitmap and 1 MiB alignment, then 3 MiB of
    // data in 4 KiB chunks, so chunks go idle, get cleared and are dirtied
    // again all the time. Fewer flushes than above: more data stays in the
    // caches, so more copies differ after a cut for the bitmap to cover.
    run(Case {
        level: "raid1",
        members: 2,
        member_blocks: 8192,
        hot_blocks: 96,
        sb_chunk_kb: Some(4),
        flush_one_in: 200,
        rounds: 10,
    });
}

// ---- superblock writes are durable ------------------------------------------

/// raid1 "R" with a superblock over `names` (registered already), with or
/// without a bitmap; waits until it is online.
fn create_sb_raid1(set: &Set, names: &[&str], bitmap: bool) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    set.call_async(0, 30, move |done| {
        bdev_raid_create_async(
            RaidCreateParams {
                name: "R".into(),
                raid_level: "raid1".into(),
                base_bdevs: names,
                strip_size_kb: None,
                uuid: None,
                superblock: Some(true),
                bitmap: Some(bitmap),
                bitmap_chunk_size_kb: bitmap.then_some(64),
            },
            done,
        )
    })
    .expect("create R");
    set.wait_for(20, "R online", || RaidArray::find("R").is_some_and(|r| r.state() == RaidState::Online));
}

/// Cache members C0, C1 (no destager: only FUA and flush make data durable).
fn cache_members(set: &Set, blocks: u64) -> Vec<Arc<VolatileCacheBdev>> {
    set.call(0, move || {
        bdev_raid::init();
        (0..2)
            .map(|i| {
                let props = BdevProps::new(&format!("C{i}"), "Volatile cache", BS as u32, blocks, None);
                let m = Arc::new(VolatileCacheBdev::new(props, i, 0).unwrap());
                Registry::get().register(m.clone()).unwrap();
                m
            })
            .collect()
    })
}

fn media_superblock(m: &VolatileCacheBdev) -> Result<superblock::SuperblockInfo, superblock::SuperblockError> {
    let mut sb = vec![0u8; SB_SIZE_BYTES];
    assert!(m.read_media(0, &mut sb));
    superblock::decode(&sb)
}

#[test]
fn a_failed_copy_is_on_the_survivors_media_before_the_write_is_acknowledged() {
    let set = start(2);
    let members = cache_members(&set, 8192);
    set.call(0, || bdev::error::create(bdev::error::ErrorCreateParams { base_name: "C0".into(), uuid: None }).unwrap());
    create_sb_raid1(&set, &["EE_C0", "C1"], true);
    set.call(0, || {
        let p = serde_json::from_value(serde_json::json!({
            "name": "EE_C0", "io_type": "write", "error_type": "failure", "num": 1
        }))
        .unwrap();
        bdev::error::inject(p).unwrap();
    });
    // The write survives on C1 only; when it is acknowledged, C1's media
    // (not its cache) must already record slot 0 as failed.
    let survivor = members[1].clone();
    let (status, on_media) = set.call_async(1, 20, move |done| {
        let buf = DmaBuf::alloc(BS as usize).unwrap();
        buf.fill(0x5A);
        let mut io = IoBox::data(IoType::Write, 3, 1, Some(buf)).unwrap();
        let done = std::cell::RefCell::new(Some(done));
        io.set_done(Rc::new(move |io: IoBox| {
            if let Some(d) = done.borrow_mut().take() {
                d((io.status, media_superblock(&survivor)));
            }
        }));
        Registry::get().lookup("R").unwrap().channel().unwrap().submit(io);
    });
    assert_eq!(status, IoStatus::Success, "the write survives on one copy");
    let sb = on_media.expect("C1's media holds a superblock");
    assert_eq!(sb.slots[0].state, superblock::SlotState::Failed, "{sb:?}");
}

#[test]
fn a_clean_delete_puts_the_data_and_then_the_clean_superblock_on_the_media() {
    let set = start(2);
    let members = cache_members(&set, 8192);
    // No bitmap: the superblock's own pre-flush must carry the data.
    create_sb_raid1(&set, &["C0", "C1"], false);
    let data_offset = set
        .call(0, || RaidArray::find("R").unwrap().info_json()["base_bdevs_list"][0]["data_offset"].as_u64().unwrap());
    set.call_async(1, 20, move |done| {
        let buf = DmaBuf::alloc((8 * BS) as usize).unwrap();
        buf.with_mut(|b| stamp_buffer(b, BS as usize, 40, 7, 0xC1EA));
        let mut io = IoBox::data(IoType::Write, 40, 8, Some(buf)).unwrap();
        let done = std::cell::RefCell::new(Some(done));
        io.set_done(Rc::new(move |io: IoBox| {
            if let Some(d) = done.borrow_mut().take() {
                d(io.status);
            }
        }));
        Registry::get().lookup("R").unwrap().channel().unwrap().submit(io);
    });
    assert!(members.iter().all(|m| m.cached_blocks() >= 8), "the plain write sits in the caches");
    set.call_async(0, 20, |done| {
        bdev_raid::rpc::bdev_raid_delete(bdev_raid::rpc::RaidDeleteParams { name: "R".into(), clear_sb: None }, done)
    })
    .expect("delete R");
    for m in &members {
        m.power_cut();
    }
    for (i, m) in members.iter().enumerate() {
        let sb = media_superblock(m).expect("superblock on the media");
        assert!(sb.clean, "member {i}: the clean superblock is durable once delete answered");
        let data = media(m, data_offset, 48);
        for lba in 40..48 {
            let blk = &data[(lba * BS) as usize..((lba + 1) * BS) as usize];
            assert!(
                bdev::stamp::check_block_seq(blk, lba, 7, 0xC1EA).is_ok(),
                "member {i} block {lba}: a superblock that says clean is on the media, the data it vouches for is not"
            );
        }
    }
}

// ---- what the array says of its cache, and keeping its word ----------------

#[test]
fn an_array_reports_its_members_cache_and_a_cached_member_added_later_gets_every_write_with_fua() {
    let set = start(2);
    let cache = set.call(0, || {
        bdev_raid::init();
        malloc("M0", 1024);
        malloc("M1", 1024);
        let props = BdevProps::new("C1", "Volatile cache", BS as u32, 1024, None);
        let c = Arc::new(VolatileCacheBdev::new(props, 1, 0).unwrap());
        Registry::get().register(c.clone()).unwrap();
        // The error bdev adds reset, which the array of mallocs advertises.
        bdev::error::create(bdev::error::ErrorCreateParams { base_name: "C1".into(), uuid: None }).unwrap();
        create_raid("R", "raid1", None, &["M0", "M1"]).unwrap();
        c
    });
    let props = || {
        set.call(0, || {
            let h = Registry::get().lookup("R").unwrap();
            (h.bdev().has_write_cache(), h.props().deallocated_reads_zeroes)
        })
    };
    assert_eq!(props(), (false, true), "mallocs: no volatile cache, unmapped blocks read as zeroes");
    // A cached member joins the array that told its users it has no cache.
    common::files::remove_member(&set, "M1");
    common::files::add_member(&set, "EE_C1");
    set.wait_for(20, "rebuild onto EE_C1", || RaidArray::find("R").is_some_and(|r| !r.process_running()));
    assert_eq!(props(), (false, true), "what the array said stays true");
    set.call_async(1, 20, move |done| {
        let buf = DmaBuf::alloc((8 * BS) as usize).unwrap();
        buf.fill(0x3C);
        let mut io = IoBox::data(IoType::Write, 100, 8, Some(buf)).unwrap();
        let done = std::cell::RefCell::new(Some(done));
        io.set_done(Rc::new(move |io: IoBox| {
            if let Some(d) = done.borrow_mut().take() {
                d(io.status);
            }
        }));
        Registry::get().lookup("R").unwrap().channel().unwrap().submit(io);
    });
    let c = cache.counters();
    assert!(c.writes > 1, "the rebuild and the write reached C1: {c:?}");
    assert_eq!(c.writes, c.fua_writes, "every write to the cached member is FUA: {c:?}");
    assert_eq!(cache.cached_blocks(), 0, "nothing the array completed waits in C1's cache");
}
