//! The storm of the parity-level tests (`raid5_storm.rs`, `raid6_storm.rs`):
//! two threaded reactors (sleep-when-idle) write and read an array of
//! malloc members, each behind a seeded random-latency delay bdev and an
//! error bdev, so member IOs complete in every order; every read is checked
//! against a model of the last acknowledged write of each block. Also md's
//! layout written out independently of the level's code, and the checks
//! the tests run on the members' raw memory afterwards.
#![allow(dead_code)] // each test binary uses part of it

use super::*;
use bdev::delay::{self, DelayCreateParams};
use bdev::malloc::MallocBdev;
use bdev::rng::SimRng;
use bdev::stamp::{stamp_block, Stamp};
use bdev::{Channel, DmaBuf, IoBox, IoStatus, IoType, Registry};
use bdev_raid::RaidArray;
use reactor::PollStatus;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const MEMBER_BLOCKS: u64 = 2048;
/// 4 KiB chunks: eight 512-byte blocks.
pub const STRIP_KB: u32 = 4;
pub const CHUNK: u64 = 8;
/// The stamp's seed field (one run of this test binary's writers).
pub const RUN: u64 = 0x5EED_0005;

/// Block `lba` as write `seq` fills it: the stamp, then a byte of both.
pub fn fill(b: &mut [u8], lba: u64, seq: u64) {
    stamp_block(b, Stamp { lba, seq, seed: RUN });
    let x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lba.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    b[32..].fill((x >> 56) as u8 | 1);
}

pub fn expected(lba: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    if seq != 0 {
        fill(&mut b, lba, seq);
    }
    b
}

/// What the storm knows: per block, the last acknowledged write (0: never
/// written, reads zeroes) and who is using it now.
pub struct Model {
    pub last: Vec<u64>,
    pub writing: Vec<bool>,
    pub readers: Vec<u32>,
}

#[derive(Default)]
pub struct Counters {
    pub writes: AtomicU64,
    pub reads: AtomicU64,
    pub write_errors: AtomicU64,
    pub read_errors: AtomicU64,
    pub mismatches: AtomicU64,
    pub in_flight: AtomicU64,
}

pub struct StormCfg {
    writer: u64,
    seed: u64,
    ios: u64,
    queue_depth: u64,
    region_blocks: u64,
    stripe_blocks: u64,
}

/// One reactor's half of the storm; `done` when its IOs are all back.
pub fn start_storm(
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
    reactor::register_poller("parity_storm", move || {
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

pub struct Array {
    pub set: Set,
    pub mallocs: Vec<Arc<MallocBdev>>,
    pub members: usize,
    /// Parity chunks a stripe (raid5: 1, raid6: 2).
    pub parities: usize,
    pub stripes: u64,
    pub array_blocks: u64,
}

impl Array {
    /// Data blocks a stripe.
    pub fn stripe_blocks(&self) -> u64 {
        (self.members - self.parities) as u64 * CHUNK
    }
}

/// malloc → delay (random latency, seeded) → error → a parity level
/// (`level` as `bdev_raid_create` names it).
pub fn build(seed: u64, members: usize, level: &'static str) -> Array {
    let set = start(2);
    let (mallocs, stripes, array_blocks, parities) = set.call(0, move || {
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
        create_raid("R", level, Some(STRIP_KB), &refs).unwrap();
        let geo = RaidArray::find("R").unwrap().geometry().unwrap();
        assert_eq!(geo.strip_size_blocks(), CHUNK);
        let bdev = Registry::get().lookup("R").unwrap();
        assert!(!bdev.bdev().io_type_supported(IoType::Unmap), "{level} must not advertise unmap");
        assert!(!bdev.bdev().io_type_supported(IoType::WriteZeroes), "{level} must not advertise write zeroes");
        let parities = geo.level().max_failed_members(members);
        (mallocs, geo.member_data_blocks(0) / CHUNK, geo.array_blocks(), parities)
    });
    Array { set, mallocs, members, parities, stripes, array_blocks }
}

/// Runs both reactors' storms over the first `region_blocks` of the array.
/// `fail_member`: fail that member's IO (error bdev) after `fail_after`
/// completed IOs of reactor 0.
/// What happens to the array mid-storm.
#[derive(Clone, Copy)]
pub enum Fault {
    /// The member's IO fails from then on (error bdev).
    Fail(usize),
    /// The member is removed (`bdev_raid_remove_base_bdev`, fenced).
    Remove(usize),
    /// A new bdev is added (`bdev_raid_add_base_bdev`): a rebuild onto it starts.
    Add(&'static str),
}

/// `init`: what the region holds (None: read it from the members, which
/// only a healthy array's members tell right).
pub fn storm(
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
    let stripe_blocks = a.stripe_blocks();
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
            Fault::Fail(member) => fail_member(a, member),
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
/// (member, member block) of array block `lba`. raid5: P on
/// `members - 1 - stripe % members`, data after it; raid6: Q after P, data
/// after Q.
pub fn md_location(a: &Array, lba: u64) -> (usize, u64) {
    let (members, parities) = (a.members as u64, a.parities as u64);
    let chunk = lba / CHUNK;
    let stripe = chunk / (members - parities);
    let dd = chunk % (members - parities);
    let pd = members - 1 - stripe % members;
    (((pd + parities + dd) % members) as usize, stripe * CHUNK + lba % CHUNK)
}

/// The seq of the stamp array block `lba` holds on its member (0: zeroes).
pub fn stamp_at(a: &Array, lba: u64) -> u64 {
    let (m, off) = md_location(a, lba);
    let b = raw(&a.mallocs[m], off, 1);
    bdev::stamp::read_stamp(&b).map_or(0, |s| s.seq)
}

/// `bdev_raid_check` of R (md's check, or repair).
pub fn check(a: &Array, repair: bool) -> serde_json::Value {
    rpc_async(&a.set, 60, move |done| {
        bdev_raid::rpc::bdev_raid_check(bdev_raid::rpc::RaidCheckParams { name: "R".into(), repair }, done)
    })
    .expect("check ran")
}

/// Every block of the region where md's layout puts it, holding its last
/// acknowledged write (raw member memory, no raid code involved).
pub fn layout_errors(a: &Array, last: &[u64]) -> Vec<u64> {
    (0..last.len() as u64)
        .filter(|&lba| {
            let (m, off) = md_location(a, lba);
            raw(&a.mallocs[m], off, 1) != expected(lba, last[lba as usize])
        })
        .collect()
}

/// Writes the region once, in whole stripes (parity from the new data only).
pub fn rewrite(a: &Array, region: u64) {
    let stripe_blocks = a.stripe_blocks();
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

/// Reads the region back through the array (degraded reads reconstruct)
/// and returns the blocks that differ from their last acknowledged write.
pub fn read_back(a: &Array, last: &[u64]) -> Vec<u64> {
    let n = last.len() as u64;
    let data = io_at(a, IoType::Read, 0, n, 0).expect("read back the region");
    (0..n)
        .filter(|&lba| {
            data[(lba * BLOCK) as usize..((lba + 1) * BLOCK) as usize] != expected(lba, last[lba as usize])[..]
        })
        .collect()
}

/// x · g in GF(2^8) with md's polynomial 0x11d (g = 2).
pub fn mul2(x: u8) -> u8 {
    (x << 1) ^ if x & 0x80 != 0 { 0x1d } else { 0 }
}

/// raid6: stripe rows whose P or Q differ from what the data gives (from
/// the members' raw memory, with this file's own GF arithmetic), counted as md's check does: each wrong P block and
/// each wrong Q block once. Returns (stripes with a wrong row, wrong blocks).
pub fn pq_mismatches(a: &Array) -> (Vec<u64>, u64) {
    let n = a.members as u64;
    let d = n - 2;
    let rows: Vec<Vec<u8>> = a.mallocs.iter().map(|m| raw(m, 0, a.stripes * CHUNK)).collect();
    let mut stripes = Vec::new();
    let mut blocks = 0;
    for s in 0..a.stripes {
        // md left-symmetric raid6, written out here: P, then Q, then data.
        let p = (n - 1 - s % n) as usize;
        let q = (p + 1) % n as usize;
        let data: Vec<usize> = (0..d).map(|k| ((p as u64 + 2 + k) % n) as usize).collect();
        let mut bad = false;
        for row in 0..CHUNK {
            let at = ((s * CHUNK + row) * BLOCK) as usize;
            let (mut wp, mut wq) = (vec![0u8; BLOCK as usize], vec![0u8; BLOCK as usize]);
            // Horner: Q = Σ g^k · D_k.
            for &m in data.iter().rev() {
                for i in 0..BLOCK as usize {
                    wp[i] ^= rows[m][at + i];
                    wq[i] = mul2(wq[i]) ^ rows[m][at + i];
                }
            }
            let p_bad = wp[..] != rows[p][at..at + BLOCK as usize];
            let q_bad = wq[..] != rows[q][at..at + BLOCK as usize];
            blocks += u64::from(p_bad) + u64::from(q_bad);
            bad |= p_bad || q_bad;
        }
        if bad {
            stripes.push(s);
        }
    }
    (stripes, blocks)
}

/// One IO of `n` blocks at `lba` through R on reactor 0 (a write fills
/// each block as write `seq` does); the buffer after it, or its status.
pub fn io_at(a: &Array, t: IoType, lba: u64, n: u64, seq: u64) -> Result<Vec<u8>, IoStatus> {
    a.set.call_async(0, 30, move |done: Box<dyn FnOnce(Result<Vec<u8>, IoStatus>) + Send>| {
        let ch = Registry::get().lookup("R").unwrap().channel().unwrap();
        let buf = DmaBuf::alloc((n * BLOCK) as usize).unwrap();
        if t == IoType::Write {
            buf.with_mut(|b| {
                for (i, blk) in b.chunks_exact_mut(BLOCK as usize).enumerate() {
                    fill(blk, lba + i as u64, seq);
                }
            });
        }
        let mut io = IoBox::data(t, lba, n, Some(buf)).unwrap();
        let done = RefCell::new(Some(done));
        io.set_done(Rc::new(move |io: IoBox| {
            let r = if io.status == IoStatus::Success { Ok(io.buf.as_ref().unwrap().to_vec()) } else { Err(io.status) };
            if let Some(d) = done.borrow_mut().take() {
                d(r);
            }
        }));
        ch.submit(io);
    })
}

/// Every IO to member `m` fails from now on (its error bdev).
pub fn fail_member(a: &Array, m: usize) {
    a.set.call(0, move || {
        bdev::error::inject(bdev::error::ErrorInjectParams {
            name: format!("EE_D{m}"),
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
    });
}
