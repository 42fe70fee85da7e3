//! Test support: a threaded reactor set with the sleep idle policy, blocking
//! wrappers (with timeouts) around reactor calls and RPCs, and two IO jobs
//! that run as pollers on a reactor: a storm of overlapping writes with
//! distinct patterns, and a lane-based verify workload that checks every
//! read against what was last written successfully.
#![allow(dead_code)]

pub mod files;
pub mod load;
pub mod stripe_storm;

use bdev::malloc::MallocBdev;
use bdev::rng::SimRng;
use bdev::{BdevProps, Channel, DmaBuf, IoBox, IoStatus, IoType, Registry};
use reactor::{IdlePolicy, PollStatus, ReactorConfig, ReactorSet};
use serde_json::Value;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

pub const BLOCK: u64 = 512;

/// The seed for a randomized test: `NVRAID_SEED` replays one; printed by
/// the caller on failure.
pub fn seed() -> u64 {
    match std::env::var("NVRAID_SEED") {
        Ok(s) => s.parse().expect("NVRAID_SEED must be a number"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
    }
}

pub struct Set(pub ReactorSet);

impl Drop for Set {
    fn drop(&mut self) {
        self.0.stop();
        self.0.join();
    }
}

pub fn start(n: usize) -> Set {
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new((0..n).collect(), IdlePolicy::sleep()) };
    Set(ReactorSet::start(cfg, || {}).expect("reactors start"))
}

impl Set {
    /// Runs `f` on reactor `r` and waits (at most 20 s) for its result.
    pub fn call<R: Send + 'static>(&self, r: usize, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = mpsc::sync_channel(1);
        self.0.send(r, move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(20)).expect("reactor call timed out")
    }

    /// Runs `f(done)` on reactor `r`; waits (at most `secs`) for `done`.
    pub fn call_async<R: Send + 'static>(
        &self,
        r: usize,
        secs: u64,
        f: impl FnOnce(Box<dyn FnOnce(R) + Send>) + Send + 'static,
    ) -> R {
        let (tx, rx) = mpsc::sync_channel(1);
        self.0.send(r, move || {
            f(Box::new(move |v| {
                let _ = tx.send(v);
            }))
        });
        rx.recv_timeout(Duration::from_secs(secs)).expect("asynchronous call timed out")
    }

    /// Polls `cond` on reactor 0 every 5 ms until true or `secs` pass.
    pub fn wait_for(&self, secs: u64, what: &str, cond: impl Fn() -> bool + Send + Sync + Clone + 'static) {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let c = cond.clone();
            if self.call(0, c) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Registers a malloc bdev (512-byte blocks) and returns it for raw reads.
pub fn malloc(name: &str, blocks: u64) -> Arc<MallocBdev> {
    let m = Arc::new(MallocBdev::new(BdevProps::new(name, "Malloc disk", BLOCK as u32, blocks, None)).unwrap());
    Registry::get().register(m.clone()).unwrap();
    m
}

pub fn raw(m: &MallocBdev, off_blocks: u64, blocks: u64) -> Vec<u8> {
    let mut v = vec![0u8; (blocks * BLOCK) as usize];
    assert!(m.read_raw((off_blocks * BLOCK) as usize, &mut v));
    v
}

/// First differing block of two members' first `blocks` blocks.
pub fn first_difference(a: &MallocBdev, b: &MallocBdev, blocks: u64) -> Option<u64> {
    let (x, y) = (raw(a, 0, blocks), raw(b, 0, blocks));
    (0..blocks).find(|&i| {
        let r = (i * BLOCK) as usize..((i + 1) * BLOCK) as usize;
        x[r.clone()] != y[r]
    })
}

pub fn create_raid(name: &str, level: &str, strip_kb: Option<u32>, members: &[&str]) -> Result<Value, bdev::BdevError> {
    bdev_raid::rpc::bdev_raid_create(bdev_raid::rpc::RaidCreateParams {
        name: name.into(),
        raid_level: level.into(),
        base_bdevs: members.iter().map(|s| s.to_string()).collect(),
        strip_size_kb: strip_kb,
        uuid: None,
        superblock: Some(false),
        bitmap: None,
        bitmap_chunk_size_kb: None,
    })
}

/// Fills a block with a pattern that names its writer, sequence and LBA:
/// the stamp and the LBA, then a byte derived from both (memset/memcmp
/// only, so unoptimized test builds stay fast).
pub fn stamp_block(b: &mut [u8], stamp: u64, lba: u64) {
    b[..8].copy_from_slice(&stamp.to_le_bytes());
    b[8..16].copy_from_slice(&lba.to_le_bytes());
    b[16..].fill(fill_byte(stamp, lba));
}

fn fill_byte(stamp: u64, lba: u64) -> u8 {
    let x = stamp.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lba.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x >> 56) as u8 | 1
}

pub fn block_stamp(b: &[u8]) -> (u64, u64) {
    let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
    (word(0), word(1))
}

/// Whether a block carries exactly the pattern of `stamp` at `lba`.
pub fn block_ok(b: &[u8], stamp: u64, lba: u64) -> bool {
    let mut want = [0u8; BLOCK as usize];
    stamp_block(&mut want, stamp, lba);
    b == &want[..]
}

// ---- storm: overlapping writes ---------------------------------------------

pub struct StormCfg {
    pub writer: u64,
    pub seed: u64,
    pub writes: u64,
    pub queue_depth: u64,
    pub region_blocks: u64,
    pub max_blocks: u64,
}

/// Called with the number of failed writes when a storm ends.
pub type StormDone = Box<dyn FnOnce(u64) + Send>;

/// Starts a storm of overlapping writes on this reactor; `done(errors)`.
pub fn start_storm(ch: Rc<Channel>, cfg: StormCfg, done: StormDone) {
    struct Storm {
        ch: Rc<Channel>,
        cfg: StormCfg,
        rng: RefCell<SimRng>,
        submitted: Cell<u64>,
        in_flight: Cell<u64>,
        errors: Cell<u64>,
        done: RefCell<Option<StormDone>>,
    }
    let storm = Rc::new(Storm {
        ch,
        rng: RefCell::new(SimRng::new(cfg.seed)),
        cfg,
        submitted: Cell::new(0),
        in_flight: Cell::new(0),
        errors: Cell::new(0),
        done: RefCell::new(Some(done)),
    });
    let s2 = storm.clone();
    let on_done: Rc<dyn bdev::IoDone> = Rc::new(move |io: IoBox| {
        s2.in_flight.set(s2.in_flight.get() - 1);
        if io.status != IoStatus::Success {
            s2.errors.set(s2.errors.get() + 1);
        }
    });
    reactor::register_poller("test_storm", move || {
        let s = &storm;
        let mut busy = false;
        while s.in_flight.get() < s.cfg.queue_depth && s.submitted.get() < s.cfg.writes {
            let (off, n) = {
                let mut rng = s.rng.borrow_mut();
                let n = 1 + rng.below(s.cfg.max_blocks);
                (rng.below(s.cfg.region_blocks - n + 1), n)
            };
            let seq = s.submitted.get();
            let stamp = s.cfg.writer << 32 | seq;
            let buf = DmaBuf::alloc((n * BLOCK) as usize).unwrap();
            buf.with_mut(|b| {
                for (i, blk) in b.chunks_exact_mut(BLOCK as usize).enumerate() {
                    stamp_block(blk, stamp, off + i as u64);
                }
            });
            let mut io = IoBox::data(IoType::Write, off, n, Some(buf)).unwrap();
            io.set_done(on_done.clone());
            s.submitted.set(seq + 1);
            s.in_flight.set(s.in_flight.get() + 1);
            s.ch.submit(io);
            busy = true;
        }
        if s.submitted.get() == s.cfg.writes && s.in_flight.get() == 0 {
            if let Some(d) = s.done.borrow_mut().take() {
                d(s.errors.get());
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

// ---- verify workload --------------------------------------------------------

/// Counters a verify job reports (shared with the test thread).
#[derive(Default)]
pub struct VerifyStats {
    pub ios: AtomicU64,
    pub write_errors: AtomicU64,
    pub read_errors: AtomicU64,
    /// Reads that returned data other than the last successful write.
    pub mismatches: AtomicU64,
    pub stop: AtomicBool,
    pub finished: AtomicBool,
}

pub struct VerifyCfg {
    pub writer: u64,
    pub seed: u64,
    /// Blocks `[first_block, first_block + lanes * lane_blocks)` are this job's.
    pub first_block: u64,
    pub lanes: u64,
    pub lane_blocks: u64,
    pub max_blocks: u64,
    /// Stop after this many IOs (0: until `stats.stop`).
    pub max_ios: u64,
}

/// Each lane owns its blocks and alternates a write of a random sub-range
/// with a read of a random sub-range, verified against the last successful
/// write of each block (blocks whose last write failed are unknown until
/// written again; never-written blocks are not checked).
pub fn start_verify(ch: Rc<Channel>, cfg: VerifyCfg, stats: Arc<VerifyStats>) {
    struct Lane {
        base: u64,
        writing: Cell<bool>,
        busy: Cell<bool>,
        pending: Cell<(u64, u64, u64)>, // (offset, blocks, stamp)
    }
    struct Job {
        ch: Rc<Channel>,
        cfg: VerifyCfg,
        rng: RefCell<SimRng>,
        /// Expected stamp per block (0: not checked).
        model: RefCell<Vec<u64>>,
        lanes: Vec<Lane>,
        seq: Cell<u64>,
        in_flight: Cell<u64>,
        stats: Arc<VerifyStats>,
    }
    let total = cfg.lanes * cfg.lane_blocks;
    let job = Rc::new(Job {
        ch,
        rng: RefCell::new(SimRng::new(cfg.seed)),
        model: RefCell::new(vec![0; total as usize]),
        lanes: (0..cfg.lanes)
            .map(|l| Lane {
                base: l * cfg.lane_blocks,
                writing: Cell::new(false),
                busy: Cell::new(false),
                pending: Cell::new((0, 0, 0)),
            })
            .collect(),
        cfg,
        seq: Cell::new(1),
        in_flight: Cell::new(0),
        stats,
    });
    let j2 = job.clone();
    let on_done: Rc<dyn bdev::IoDone> = Rc::new(move |io: IoBox| {
        let j = &j2;
        j.in_flight.set(j.in_flight.get() - 1);
        j.stats.ios.fetch_add(1, Ordering::Relaxed);
        let lane = &j.lanes[io.tag as usize];
        lane.busy.set(false);
        let (off, n, stamp) = lane.pending.get();
        let mut model = j.model.borrow_mut();
        let local = (off - j.cfg.first_block) as usize;
        match (io.io_type, io.status) {
            (IoType::Write, IoStatus::Success) => model[local..local + n as usize].fill(stamp),
            (IoType::Write, _) => {
                j.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                // Unknown now: the write may or may not have landed.
                model[local..local + n as usize].fill(0);
            }
            (IoType::Read, IoStatus::Success) => {
                let buf = io.buf.as_ref().unwrap();
                buf.with(|b| {
                    for i in 0..n as usize {
                        let want = model[local + i];
                        let blk = &b[i * BLOCK as usize..(i + 1) * BLOCK as usize];
                        if want != 0
                            && !block_ok(blk, want, off + i as u64)
                            && j.stats.mismatches.fetch_add(1, Ordering::Relaxed) < 3
                        {
                            eprintln!(
                                "MISMATCH writer {} lba {}: want stamp {want:#x}, got (stamp, lba) {:x?}",
                                j.cfg.writer,
                                off + i as u64,
                                block_stamp(blk)
                            );
                        }
                    }
                });
            }
            (IoType::Read, _) => {
                j.stats.read_errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    });
    reactor::register_poller("test_verify", move || {
        let j = &job;
        let stopping = j.stats.stop.load(Ordering::Relaxed)
            || (j.cfg.max_ios > 0 && j.stats.ios.load(Ordering::Relaxed) >= j.cfg.max_ios);
        if stopping {
            if j.in_flight.get() == 0 {
                j.stats.finished.store(true, Ordering::Release);
                return PollStatus::Done;
            }
            return PollStatus::Idle;
        }
        let mut busy = false;
        for (li, lane) in j.lanes.iter().enumerate() {
            if lane.busy.get() {
                continue;
            }
            let (off, n) = {
                let mut rng = j.rng.borrow_mut();
                let n = 1 + rng.below(j.cfg.max_blocks.min(j.cfg.lane_blocks));
                (j.cfg.first_block + lane.base + rng.below(j.cfg.lane_blocks - n + 1), n)
            };
            let write = !lane.writing.get();
            lane.writing.set(write);
            let Some(buf) = DmaBuf::alloc((n * BLOCK) as usize) else {
                break;
            };
            let seq = j.seq.get();
            j.seq.set(seq + 1);
            let stamp = j.cfg.writer << 40 | seq;
            let t = if write {
                buf.with_mut(|b| {
                    for (i, blk) in b.chunks_exact_mut(BLOCK as usize).enumerate() {
                        stamp_block(blk, stamp, off + i as u64);
                    }
                });
                IoType::Write
            } else {
                IoType::Read
            };
            let Some(mut io) = IoBox::data(t, off, n, Some(buf)) else {
                break;
            };
            io.tag = li as u64;
            io.set_done(on_done.clone());
            lane.busy.set(true);
            lane.pending.set((off, n, stamp));
            j.in_flight.set(j.in_flight.get() + 1);
            j.ch.submit(io);
            busy = true;
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    });
}

/// Blocks until `f(done)` on reactor `r` calls `done` with an RPC result.
pub fn rpc_async(
    set: &Set,
    secs: u64,
    f: impl FnOnce(Box<dyn FnOnce(Result<Value, bdev::BdevError>) + Send>) + Send + 'static,
) -> Result<Value, bdev::BdevError> {
    set.call_async(0, secs, f)
}

/// Runs an asynchronous call (an RPC) on reactor 0 of a manual set and
/// steps the set, advancing its clock 1 ms a round, until it answers.
pub fn run_async(
    m: &reactor::ManualSet,
    f: impl FnOnce(Box<dyn FnOnce(Result<Value, bdev::BdevError>) + Send>),
) -> Result<Value, bdev::BdevError> {
    let (tx, rx) = mpsc::channel();
    m.on(0, || {
        f(Box::new(move |r| {
            let _ = tx.send(r);
        }))
    });
    for _ in 0..2_000 {
        m.run_until_idle(50);
        if let Ok(r) = rx.try_recv() {
            return r;
        }
        m.advance_ns(1_000_000);
    }
    panic!("asynchronous call did not answer");
}
