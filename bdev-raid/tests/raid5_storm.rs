//! raid5 under a storm: two threaded reactors (sleep-when-idle) write and
//! read a raid5 of 3–5 malloc members, each behind a seeded random-latency
//! delay bdev, so member IOs complete in every order. Writes of every size,
//! from one block to several stripes, land anywhere in a small region, so
//! many writes share stripes at once (the test only keeps two IOs off the
//! same *block* at once, so that the last acknowledged write of every block
//! is what it must hold). Every read is checked against that model while
//! the storm runs; afterwards every stripe's parity is the XOR of its data
//! (read from the members' raw memory) and every block sits where md's
//! left-symmetric layout puts it.
//!
//! The same storm is caught breaking parity when array serialization is
//! off, and when the lock is not widened to whole stripes: two writes into
//! one stripe then compute parity from each other's half-written data.
//!
//! The failure storm fails one member (error bdev) at a random point: no
//! write fails, every read stays right while degraded (reconstructed from
//! the others), a second failure fails IO rather than answer wrong data.
//!
//! Replay a failure with `NVRAID_SEED=<seed>` (printed on failure).

mod common;

use bdev::delay::{self, DelayCreateParams};
use bdev::malloc::MallocBdev;
use bdev::rng::SimRng;
use bdev::stamp::{stamp_block, Stamp};
use bdev::{Channel, DmaBuf, IoBox, IoStatus, IoType, Registry};
use bdev_raid::RaidArray;
use common::*;
use reactor::PollStatus;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MEMBER_BLOCKS: u64 = 2048;
/// 4 KiB chunks: eight 512-byte blocks.
const STRIP_KB: u32 = 4;
const CHUNK: u64 = 8;
/// The stamp's seed field (one run of this test binary's writers).
const RUN: u64 = 0x5EED_0005;

/// Block `lba` as write `seq` fills it: the stamp, then a byte of both.
fn fill(b: &mut [u8], lba: u64, seq: u64) {
    stamp_block(b, Stamp { lba, seq, seed: RUN });
    let x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lba.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    b[32..].fill((x >> 56) as u8 | 1);
}

fn expected(lba: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    if seq != 0 {
        fill(&mut b, lba, seq);
    }
    b
}

/// What the storm knows: per block, the last acknowledged write (0: never
/// written, reads zeroes) and who is using it now.
struct Model {
    last: Vec<u64>,
    writing: Vec<bool>,
    readers: Vec<u32>,
}

#[derive(Default)]
struct Counters {
    writes: AtomicU64,
    reads: AtomicU64,
    write_errors: AtomicU64,
    read_errors: AtomicU64,
    mismatches: AtomicU64,
    in_flight: AtomicU64,
}

struct StormCfg {
    writer: u64,
    seed: u64,
    ios: u64,
    queue_depth: u64,
    region_blocks: u64,
    stripe_blocks: u64,
}

/// One reactor's half of the storm; `done` when its IOs are all back.
fn start_storm(
    ch: Rc<Channel>,
    cfg: StormCfg,
    model: Arc<Mutex<Model>>,
    counters: Arc<Counters>,
    done: Box<dyn FnOnce() + Send>,
) {
    struct Job {
        ch: Rc<Channel>,
        cfg: StormCfg,
        rng: RefCell<SimRng>,
        model: Arc<Mutex<Model>>,
        counters: Arc<Counters>,
        submitted: Cell<u64>,
        in_flight: Cell<u64>,
        seq: Cell<u64>,
        done: RefCell<Option<Box<dyn FnOnce() + Send>>>,
    }
    let job = Rc::new(Job {
        ch,
        rng: RefCell::new(SimRng::new(cfg.seed)),
        cfg,
        model,
        counters,
        submitted: Cell::new(0),
        in_flight: Cell::new(0),
        seq: Cell::new(1),
        done: RefCell::new(Some(done)),
    });
    let j2 = job.clone();
    let on_done: Rc<dyn bdev::IoDone> = Rc::new(move |io: IoBox| {
        let j = &j2;
        j.in_flight.set(j.in_flight.get() - 1);
        j.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        let (off, n) = (io.offset_blocks, io.num_blocks);
        let mut m = j.model.lock().unwrap();
        match io.io_type {
            IoType::Write => {
                j.counters.writes.fetch_add(1, Ordering::Relaxed);
                let ok = io.status == IoStatus::Success;
                if !ok {
                    j.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                }
                for b in off..off + n {
                    // A failed write leaves the block unknown (u64::MAX: not checked).
                    m.last[b as usize] = if ok { io.tag } else { u64::MAX };
                    m.writing[b as usize] = false;
                }
            }
            _ => {
                j.counters.reads.fetch_add(1, Ordering::Relaxed);
                if io.status != IoStatus::Success {
                    j.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                } else {
                    let buf = io.buf.as_ref().unwrap();
                    buf.with(|data| {
                        for (i, blk) in data.chunks_exact(BLOCK as usize).enumerate() {
                            let lba = off + i as u64;
                            let seq = m.last[lba as usize];
                            if seq != u64::MAX
                                && blk != &expected(lba, seq)[..]
                                && j.counters.mismatches.fetch_add(1, Ordering::Relaxed) < 3
                            {
                                eprintln!(
                                    "MISMATCH lba {lba}: want seq {seq:#x}, got {:?}",
                                    bdev::stamp::read_stamp(blk)
                                );
                            }
                        }
                    });
                }
                for b in off..off + n {
                    m.readers[b as usize] -= 1;
                }
            }
        }
    });
    reactor::register_poller("raid5_storm", move || {
        let j = &job;
        let mut busy = false;
        'submit: while j.in_flight.get() < j.cfg.queue_depth && j.submitted.get() < j.cfg.ios {
            let mut m = j.model.lock().unwrap();
            // A few tries to find blocks no other IO is writing (or, for a
            // write, reading); otherwise wait for completions.
            for _ in 0..4 {
                let (write, off, n) = {
                    let mut rng = j.rng.borrow_mut();
                    let write = rng.below(10) < 6;
                    let max = match rng.below(10) {
                        0..=3 => CHUNK,
                        4..=6 => j.cfg.stripe_blocks,
                        _ => 3 * j.cfg.stripe_blocks,
                    };
                    let n = 1 + rng.below(max.min(j.cfg.region_blocks));
                    (write, rng.below(j.cfg.region_blocks - n + 1), n)
                };
                let r = off as usize..(off + n) as usize;
                let free = if write {
                    m.writing[r.clone()].iter().all(|w| !w) && m.readers[r.clone()].iter().all(|&c| c == 0)
                } else {
                    m.writing[r.clone()].iter().all(|w| !w)
                };
                if !free {
                    continue;
                }
                let buf = DmaBuf::alloc((n * BLOCK) as usize).unwrap();
                let seq = j.cfg.writer << 40 | j.seq.get();
                j.seq.set(j.seq.get() + 1);
                let t = if write {
                    m.writing[r].fill(true);
                    buf.with_mut(|b| {
                        for (i, blk) in b.chunks_exact_mut(BLOCK as usize).enumerate() {
                            fill(blk, off + i as u64, seq);
                        }
                    });
                    IoType::Write
                } else {
                    for c in &mut m.readers[r] {
                        *c += 1;
                    }
                    IoType::Read
                };
                drop(m);
                let mut io = IoBox::data(t, off, n, Some(buf)).unwrap();
                io.tag = seq;
                io.set_done(on_done.clone());
                j.submitted.set(j.submitted.get() + 1);
                j.in_flight.set(j.in_flight.get() + 1);
                j.counters.in_flight.fetch_add(1, Ordering::Relaxed);
                j.ch.submit(io);
                busy = true;
                continue 'submit;
            }
            break;
        }
        if j.submitted.get() == j.cfg.ios && j.in_flight.get() == 0 {
            if let Some(d) = j.done.borrow_mut().take() {
                d();
            }
            return PollStatus::Done;
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    });
}

struct Array {
    set: Set,
    mallocs: Vec<Arc<MallocBdev>>,
    members: usize,
    stripes: u64,
    array_blocks: u64,
}

/// malloc → delay (random latency, seeded) → error → raid5.
fn build(seed: u64, members: usize) -> Array {
    let set = start(2);
    let (mallocs, stripes, array_blocks) = set.call(0, move || {
        let mut mallocs = Vec::new();
        let mut names = Vec::new();
        for i in 0..members {
            mallocs.push(malloc(&format!("M{i}"), MEMBER_BLOCKS));
            delay::create(DelayCreateParams {
                base_bdev_name: format!("M{i}"),
                name: format!("D{i}"),
                avg_read_latency: 0,
                p99_read_latency: 0,
                avg_write_latency: 0,
                p99_write_latency: 0,
                uuid: None,
                random_seed: Some(seed.wrapping_add(i as u64 * 0x9E37_79B9)),
                max_random_latency_us: Some(300),
            })
            .unwrap();
            bdev::error::create(bdev::error::ErrorCreateParams { base_name: format!("D{i}"), uuid: None }).unwrap();
            names.push(format!("EE_D{i}"));
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        create_raid("R", "raid5f", Some(STRIP_KB), &refs).unwrap();
        let geo = RaidArray::find("R").unwrap().geometry().unwrap();
        assert_eq!(geo.level().name(), "raid5");
        assert_eq!(geo.strip_size_blocks(), CHUNK);
        let bdev = Registry::get().lookup("R").unwrap();
        assert!(!bdev.bdev().io_type_supported(IoType::Unmap), "raid5 must not advertise unmap");
        assert!(!bdev.bdev().io_type_supported(IoType::WriteZeroes), "raid5 must not advertise write zeroes");
        (mallocs, geo.member_data_blocks(0) / CHUNK, geo.array_blocks())
    });
    Array { set, mallocs, members, stripes, array_blocks }
}

/// Runs both reactors' storms over the first `region_blocks` of the array.
/// `fail_member`: fail that member's IO (error bdev) after `fail_after`
/// completed IOs of reactor 0.
/// What happens to the array mid-storm.
#[derive(Clone, Copy)]
enum Fault {
    /// The member's IO fails from then on (error bdev).
    Fail(usize),
    /// The member is removed (`bdev_raid_remove_base_bdev`, fenced).
    Remove(usize),
    /// A new bdev is added (`bdev_raid_add_base_bdev`): a rebuild onto it starts.
    Add(&'static str),
}

/// `init`: what the region holds (None: read it from the members, which
/// only a healthy array's members tell right).
fn storm(
    a: &Array,
    seed: u64,
    region_blocks: u64,
    ios: u64,
    fault: Option<(Fault, u64)>,
    init: Option<&[u64]>,
) -> (Arc<Counters>, Vec<u64>) {
    let model = Arc::new(Mutex::new(Model {
        last: vec![0; region_blocks as usize],
        writing: vec![false; region_blocks as usize],
        readers: vec![0; region_blocks as usize],
    }));
    // Start from what the region holds now (a previous storm's data).
    {
        let mut m = model.lock().unwrap();
        for lba in 0..region_blocks {
            m.last[lba as usize] = init.map_or_else(|| stamp_at(a, lba), |i| i[lba as usize]);
        }
    }
    let counters = Arc::new(Counters::default());
    let stripe_blocks = (a.members as u64 - 1) * CHUNK;
    let (tx, rx) = std::sync::mpsc::channel();
    for r in 0..2usize {
        let tx = tx.clone();
        let (model, counters) = (model.clone(), counters.clone());
        a.set.0.send(r, move || {
            let ch = Registry::get().lookup("R").unwrap().channel().unwrap();
            let cfg = StormCfg {
                writer: r as u64 + 1,
                seed: seed ^ ((r as u64 + 1) * 0x5851_F42D),
                ios,
                queue_depth: 16,
                region_blocks,
                stripe_blocks,
            };
            start_storm(ch, cfg, model, counters, Box::new(move || tx.send(()).unwrap()));
        });
    }
    if let Some((fault, after)) = fault {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while counters.writes.load(Ordering::Relaxed) + counters.reads.load(Ordering::Relaxed) < after {
            assert!(std::time::Instant::now() < deadline, "storm stalled before the failure point");
            std::thread::sleep(Duration::from_millis(1));
        }
        match fault {
            Fault::Remove(member) => {
                rpc_async(&a.set, 20, move |done| {
                    bdev_raid::rpc::bdev_raid_remove_base_bdev(
                        bdev_raid::rpc::RaidRemoveBaseBdevParams { name: format!("EE_D{member}") },
                        done,
                    )
                })
                .expect("member removed");
            }
            Fault::Add(name) => {
                rpc_async(&a.set, 20, move |done| {
                    bdev_raid::rpc::bdev_raid_add_base_bdev(
                        bdev_raid::rpc::RaidAddBaseBdevParams { raid_bdev: "R".into(), base_bdev: name.into() },
                        done,
                    )
                })
                .expect("member added");
            }
            Fault::Fail(member) => a.set.call(0, move || {
                bdev::error::inject(bdev::error::ErrorInjectParams {
                    name: format!("EE_D{member}"),
                    io_type: "all".into(),
                    error_type: "failure".into(),
                    num: Some(u64::MAX / 2),
                    queue_depth: None,
                    corrupt_offset: None,
                    corrupt_value: None,
                    nvme_sct: None,
                    nvme_sc: None,
                })
                .unwrap()
            }),
        }
    }
    for _ in 0..2 {
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let done = counters.writes.load(Ordering::Relaxed) + counters.reads.load(Ordering::Relaxed);
            let in_flight = counters.in_flight.load(Ordering::Relaxed);
            panic!("storm stalled: {done} of {} IOs completed, {in_flight} in flight (seed {seed})", 2 * ios);
        }
    }
    let last = model.lock().unwrap().last.clone();
    (counters, last)
}

/// md left-symmetric, written out independently of the level's code:
/// (member, member block) of array block `lba`.
fn md_location(members: u64, lba: u64) -> (usize, u64) {
    let chunk = lba / CHUNK;
    let stripe = chunk / (members - 1);
    let dd = chunk % (members - 1);
    let pd = members - 1 - stripe % members;
    (((pd + 1 + dd) % members) as usize, stripe * CHUNK + lba % CHUNK)
}

/// The seq of the stamp array block `lba` holds on its member (0: zeroes).
fn stamp_at(a: &Array, lba: u64) -> u64 {
    let (m, off) = md_location(a.members as u64, lba);
    let b = raw(&a.mallocs[m], off, 1);
    bdev::stamp::read_stamp(&b).map_or(0, |s| s.seq)
}

/// Stripes whose members do not XOR to zero (parity ≠ XOR of the data).
fn parity_mismatches(a: &Array, stripes: u64) -> Vec<u64> {
    let rows: Vec<Vec<u8>> = a.mallocs.iter().map(|m| raw(m, 0, stripes * CHUNK)).collect();
    let chunk_bytes = (CHUNK * BLOCK) as usize;
    (0..stripes)
        .filter(|&s| {
            let r = s as usize * chunk_bytes..(s as usize + 1) * chunk_bytes;
            let mut x = vec![0u8; chunk_bytes];
            for m in &rows {
                for (d, s) in x.iter_mut().zip(&m[r.clone()]) {
                    *d ^= s;
                }
            }
            x.iter().any(|&b| b != 0)
        })
        .collect()
}

/// Parity blocks (stripe rows) whose members do not XOR to zero.
fn mismatched_parity_blocks(a: &Array) -> u64 {
    let rows: Vec<Vec<u8>> = a.mallocs.iter().map(|m| raw(m, 0, a.stripes * CHUNK)).collect();
    (0..(a.stripes * CHUNK) as usize)
        .filter(|&b| {
            let r = b * BLOCK as usize..(b + 1) * BLOCK as usize;
            (0..BLOCK as usize).any(|i| rows.iter().fold(0u8, |x, m| x ^ m[r.start + i]) != 0)
        })
        .count() as u64
}

/// `bdev_raid_check` of R (md's check, or repair).
fn check(a: &Array, repair: bool) -> serde_json::Value {
    rpc_async(&a.set, 60, move |done| {
        bdev_raid::rpc::bdev_raid_check(bdev_raid::rpc::RaidCheckParams { name: "R".into(), repair }, done)
    })
    .expect("check ran")
}

/// Every block of the region where md's layout puts it, holding its last
/// acknowledged write (raw member memory, no raid code involved).
fn layout_errors(a: &Array, last: &[u64]) -> Vec<u64> {
    (0..last.len() as u64)
        .filter(|&lba| {
            let (m, off) = md_location(a.members as u64, lba);
            raw(&a.mallocs[m], off, 1) != expected(lba, last[lba as usize])
        })
        .collect()
}

fn run(members: usize) {
    let seed = seed();
    eprintln!("raid5 storm, {members} members: seed {seed} (replay with NVRAID_SEED={seed})");
    let a = build(seed, members);
    let stripe_blocks = (members as u64 - 1) * CHUNK;
    let region = 16 * stripe_blocks;
    let region_stripes = region / stripe_blocks;
    let (c, last) = storm(&a, seed, region, 1500, None, None);
    let ctx = format!("seed {seed}, replay with NVRAID_SEED={seed}");
    assert_eq!(c.write_errors.load(Ordering::Relaxed), 0, "writes failed ({ctx})");
    assert_eq!(c.read_errors.load(Ordering::Relaxed), 0, "reads failed ({ctx})");
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "reads returned data other than the last write ({ctx})");
    assert!(c.reads.load(Ordering::Relaxed) > 200 && c.writes.load(Ordering::Relaxed) > 400, "storm ran");
    assert!(last.iter().filter(|&&s| s != 0).count() as u64 > region / 2, "storm wrote most of the region");
    let bad = parity_mismatches(&a, a.stripes);
    assert!(bad.is_empty(), "stripes with wrong parity: {bad:?} ({ctx})");
    let misplaced = layout_errors(&a, &last);
    assert!(misplaced.is_empty(), "blocks not where md left-symmetric puts them: {misplaced:?} ({ctx})");
    assert!(a.array_blocks == a.stripes * stripe_blocks);

    // The same storm without stripe serialization must break parity: first
    // with the lock on the IO's blocks only, then with no lock at all.
    for (what, widen, serialize) in [("lock not widened to stripes", false, true), ("no serialization", true, false)] {
        a.set.call(0, move || {
            let r = RaidArray::find("R").unwrap();
            r.set_lock_widening(widen);
            r.set_serialization(serialize);
        });
        let mut caught = None;
        for attempt in 0..5u64 {
            let (c, _) = storm(&a, seed.wrapping_add(attempt + 1), region, 1500, None, None);
            assert_eq!(c.write_errors.load(Ordering::Relaxed), 0, "writes failed ({ctx})");
            let bad = parity_mismatches(&a, region_stripes);
            if !bad.is_empty() {
                caught = Some((attempt + 1, bad.len()));
                break;
            }
        }
        let (storms, stripes) =
            caught.unwrap_or_else(|| panic!("{what}: parity stayed right in 5 storms: the check is blind ({ctx})"));
        eprintln!("{what}: {stripes} stripes with wrong parity after {storms} storm(s), as expected");
        a.set.call(0, || {
            let r = RaidArray::find("R").unwrap();
            r.set_lock_widening(true);
            r.set_serialization(true);
        });
        // bdev_raid_check finds exactly the parity blocks that are wrong,
        // and repair puts them right (for the next variant too).
        let want = mismatched_parity_blocks(&a);
        let r = check(&a, false);
        assert_eq!(r["mismatched_blocks"], want, "check counts the wrong parity blocks: {r} ({ctx})");
        assert_eq!(r["blocks_checked"], a.array_blocks, "{r}");
        let r = check(&a, true);
        assert_eq!((r["mismatched_blocks"].as_u64(), r["repaired_blocks"].as_u64()), (Some(want), Some(want)), "{r}");
        assert!(parity_mismatches(&a, a.stripes).is_empty(), "repair left wrong parity ({ctx})");
        assert_eq!(check(&a, false)["mismatched_blocks"], 0, "{ctx}");
    }

    // The check left every stripe's parity right: small writes may now
    // update parity from its old value (read-modify-write, where it reads
    // fewer members: five members and one chunk written). The same storm
    // keeps parity and data right.
    let (c, last) = storm(&a, seed ^ 0x4D57, region, 1500, None, None);
    assert_eq!(c.write_errors.load(Ordering::Relaxed) + c.read_errors.load(Ordering::Relaxed), 0, "{ctx}");
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "reads wrong with parity trusted ({ctx})");
    let bad = parity_mismatches(&a, a.stripes);
    assert!(bad.is_empty(), "stripes with wrong parity after read-modify-writes: {bad:?} ({ctx})");
    assert!(layout_errors(&a, &last).is_empty(), "{ctx}");
}

/// Writes the region once, in whole stripes (P from the new data only).
fn rewrite(a: &Array, region: u64) {
    let stripe_blocks = (a.members as u64 - 1) * CHUNK;
    a.set.call_async(0, 30, move |done: Box<dyn FnOnce(()) + Send>| {
        let ch = Registry::get().lookup("R").unwrap().channel().unwrap();
        let left = Rc::new(Cell::new(region / stripe_blocks));
        let done = Rc::new(RefCell::new(Some(done)));
        for s in 0..region / stripe_blocks {
            // (One IO per stripe: the pool has descriptors for every stripe of these arrays.)
            let buf = DmaBuf::alloc((stripe_blocks * BLOCK) as usize).unwrap();
            buf.with_mut(|b| {
                for (i, blk) in b.chunks_exact_mut(BLOCK as usize).enumerate() {
                    fill(blk, s * stripe_blocks + i as u64, 7 << 40 | s);
                }
            });
            let mut io = IoBox::data(IoType::Write, s * stripe_blocks, stripe_blocks, Some(buf)).unwrap();
            let (left, done) = (left.clone(), done.clone());
            io.set_done(Rc::new(move |io: IoBox| {
                assert_eq!(io.status, IoStatus::Success);
                left.set(left.get() - 1);
                if left.get() == 0 {
                    if let Some(d) = done.borrow_mut().take() {
                        d(());
                    }
                }
            }));
            ch.submit(io);
        }
    });
}

#[test]
fn raid5_three_members_storm() {
    run(3);
}

#[test]
fn raid5_four_members_storm() {
    run(4);
}

#[test]
fn raid5_five_members_storm() {
    run(5);
}

/// Reads the region back through the array (degraded reads reconstruct)
/// and returns the blocks that differ from their last acknowledged write.
fn read_back(a: &Array, last: &[u64]) -> Vec<u64> {
    let n = last.len() as u64;
    let data = a.set.call_async(0, 30, move |done: Box<dyn FnOnce(Result<Vec<u8>, IoStatus>) + Send>| {
        let ch = Registry::get().lookup("R").unwrap().channel().unwrap();
        let mut io = IoBox::data(IoType::Read, 0, n, DmaBuf::alloc((n * BLOCK) as usize)).unwrap();
        let done = RefCell::new(Some(done));
        io.set_done(Rc::new(move |io: IoBox| {
            let r = if io.status == IoStatus::Success { Ok(io.buf.as_ref().unwrap().to_vec()) } else { Err(io.status) };
            if let Some(d) = done.borrow_mut().take() {
                d(r);
            }
        }));
        ch.submit(io);
    });
    let data = data.expect("read back the region");
    (0..n)
        .filter(|&lba| {
            data[(lba * BLOCK) as usize..((lba + 1) * BLOCK) as usize] != expected(lba, last[lba as usize])[..]
        })
        .collect()
}

/// With `lost` gone, each of its data chunks in the region must be the XOR
/// of the surviving members' rows (computed here from raw member memory,
/// not by the array): returns the blocks where it is not.
fn survivors_reconstruct(a: &Array, lost: usize, last: &[u64]) -> Vec<u64> {
    let members = a.members as u64;
    (0..last.len() as u64)
        .filter(|&lba| {
            let (m, off) = md_location(members, lba);
            if m != lost {
                return false;
            }
            let mut x = vec![0u8; BLOCK as usize];
            for (i, mb) in a.mallocs.iter().enumerate() {
                if i != lost {
                    for (d, s) in x.iter_mut().zip(raw(mb, off, 1)) {
                        *d ^= s;
                    }
                }
            }
            x != expected(lba, last[lba as usize])
        })
        .collect()
}

fn run_failure(members: usize) {
    run_loss(members, false);
}

/// One member lost mid-storm: failed (error bdev) or removed (RPC, fenced).
fn run_loss(members: usize, remove: bool) {
    let seed = seed();
    eprintln!("raid5 failure storm, {members} members: seed {seed} (replay with NVRAID_SEED={seed})");
    let ctx = format!("seed {seed}, replay with NVRAID_SEED={seed}");
    let mut rng = SimRng::new(seed);
    let a = build(seed, members);
    let stripe_blocks = (members as u64 - 1) * CHUNK;
    let region = 16 * stripe_blocks;
    let lost = rng.below(members as u64) as usize;
    let after = 100 + rng.below(1500);
    let fault = if remove { Fault::Remove(lost) } else { Fault::Fail(lost) };
    let (c, last) = storm(&a, seed, region, 2000, Some((fault, after)), None);
    eprintln!("member {lost} failed after {after} IOs");
    assert_eq!(c.write_errors.load(Ordering::Relaxed), 0, "a write failed with one member lost ({ctx})");
    assert_eq!(c.read_errors.load(Ordering::Relaxed), 0, "a read failed with one member lost ({ctx})");
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "a read returned wrong data ({ctx})");
    let r = a.set.call(0, || RaidArray::find("R").unwrap());
    assert_eq!(r.state(), bdev_raid::RaidState::Online, "{ctx}");
    assert!(r.is_degraded(), "the member's failure was noticed ({ctx})");
    let wrong = read_back(&a, &last);
    assert!(wrong.is_empty(), "degraded reads differ from the last writes at {wrong:?} ({ctx})");
    let wrong = survivors_reconstruct(&a, lost, &last);
    assert!(wrong.is_empty(), "survivors do not reconstruct the lost member at {wrong:?} ({ctx})");

    // Still degraded: a storm of its own, every read and write right.
    let (c, last) = storm(&a, seed ^ 0xD5, region, 1000, None, Some(&last));
    assert_eq!(c.write_errors.load(Ordering::Relaxed) + c.read_errors.load(Ordering::Relaxed), 0, "{ctx}");
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "a degraded read returned wrong data ({ctx})");
    assert!(survivors_reconstruct(&a, lost, &last).is_empty(), "{ctx}");

    // A second failure: IO fails, nothing wrong is acknowledged.
    let second = (lost + 1 + rng.below(members as u64 - 1) as usize) % members;
    let fault = if remove { Fault::Remove(second) } else { Fault::Fail(second) };
    let (c, _) = storm(&a, seed ^ 0x2F, region, 1000, Some((fault, 50)), Some(&last));
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "a read returned wrong data after a second failure ({ctx})");
    assert!(c.write_errors.load(Ordering::Relaxed) + c.read_errors.load(Ordering::Relaxed) > 0, "{ctx}");
    assert_eq!(r.state(), bdev_raid::RaidState::Offline, "two members lost ({ctx})");
}

#[test]
fn raid5_three_members_failure_storm() {
    run_failure(3);
}

#[test]
fn raid5_five_members_failure_storm() {
    run_failure(5);
}

#[test]
fn raid5_four_members_removal_storm() {
    run_loss(4, true);
}

/// A member fails mid-storm, a new one is added mid-storm and rebuilt
/// (small windows, rate-limited, so the rebuild runs under the storm's
/// writes); afterwards every stripe's parity matches, every block is where
/// md's layout puts it, and reads return the last writes.
fn run_rebuild(members: usize) {
    let seed = seed();
    eprintln!("raid5 rebuild storm, {members} members: seed {seed} (replay with NVRAID_SEED={seed})");
    let ctx = format!("seed {seed}, replay with NVRAID_SEED={seed}");
    let mut rng = SimRng::new(seed);
    let mut a = build(seed, members);
    let new = a.set.call(0, || {
        bdev_raid::rpc::bdev_raid_set_options(bdev_raid::rpc::RaidSetOptionsParams {
            process_window_size_kb: Some(4),
            process_max_bandwidth_mb_sec: Some(2),
            assemble_timeout_sec: None,
        })
        .unwrap();
        malloc("N", MEMBER_BLOCKS)
    });
    let stripe_blocks = (members as u64 - 1) * CHUNK;
    let region = 16 * stripe_blocks;
    // Every block of the array holds data, so a rebuild that computes a
    // chunk wrong shows outside the storm's region too.
    rewrite(&a, a.array_blocks);
    let mut whole: Vec<u64> = (0..a.array_blocks).map(|lba| (7 << 40) | (lba / stripe_blocks)).collect();
    let lost = rng.below(members as u64) as usize;
    let (c, last) = storm(&a, seed, region, 1000, Some((Fault::Fail(lost), 100 + rng.below(800))), None);
    assert_eq!(c.write_errors.load(Ordering::Relaxed) + c.read_errors.load(Ordering::Relaxed), 0, "{ctx}");
    let r = a.set.call(0, || RaidArray::find("R").unwrap());
    assert!(r.is_degraded(), "{ctx}");
    // Added late in the storm: the rebuild's first windows (the region's
    // stripes come first) run under its writes, and few writes come after.
    let (c, last) = storm(&a, seed ^ 0xADD, region, 800, Some((Fault::Add("N"), 1000 + rng.below(400))), Some(&last));
    assert_eq!(c.write_errors.load(Ordering::Relaxed), 0, "a write failed during the rebuild ({ctx})");
    assert_eq!(c.read_errors.load(Ordering::Relaxed), 0, "a read failed during the rebuild ({ctx})");
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "a read returned wrong data during the rebuild ({ctx})");
    let r2 = r.clone();
    a.set.wait_for(60, "the rebuild to finish", move || !r2.rebuild_running() && !r2.is_degraded());
    let slot = r.members().iter().position(|(n, _)| n.as_deref() == Some("N")).expect("N is a member");
    assert_eq!(slot, lost, "the new member took the failed one's slot ({ctx})");
    a.mallocs[slot] = new;
    whole[..region as usize].copy_from_slice(&last);
    let bad = parity_mismatches(&a, a.stripes);
    assert!(bad.is_empty(), "stripes with wrong parity after the rebuild: {bad:?} ({ctx})");
    let misplaced = layout_errors(&a, &whole);
    assert!(misplaced.is_empty(), "blocks wrong after the rebuild: {misplaced:?} ({ctx})");
    let wrong = read_back(&a, &whole);
    assert!(wrong.is_empty(), "reads after the rebuild differ at {wrong:?} ({ctx})");
}

#[test]
fn raid5_four_members_rebuild_storm() {
    run_rebuild(4);
}

#[test]
fn raid5_three_members_rebuild_storm() {
    run_rebuild(3);
}
