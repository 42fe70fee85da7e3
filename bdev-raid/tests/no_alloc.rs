//! Proof that the RAID IO path allocates nothing in steady state: a counting
//! global allocator (in this test binary only; the library forbids unsafe
//! code) watches raid1 and raid10 arrays serve overlapping writes and reads
//! from the owner reactor and from another reactor — fan-out, the
//! serialization table with its acquire/grant/release messages and waiting
//! writes, read balancing, completion — on a manual reactor set; and a
//! raid1 with a superblock and write-intent bitmap, whose writes mark and
//! end their chunks (bits on disk: the common case, no batch to wait for);
//! and a raid5, whose writes lock whole stripes, read the rest of partial
//! stripes and compute parity in a stripe buffer from the DMA pool; and a
//! raid6 (P and Q) the same way; and a raid5 with a superblock, whose
//! partial writes first put an entry in the partial parity log (built in
//! the same stripe buffer).

use bdev::malloc::MallocBdev;
use bdev::{BdevProps, Channel, DmaBuf, IoBox, IoDone, IoStatus, IoType, Registry};
use bdev_raid::rpc::{bdev_raid_create, bdev_raid_create_async, RaidCreateParams};
use reactor::{ManualSet, ReactorSet};
use std::cell::Cell;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[path = "../../bdev/tests/support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::allocations;

const QUEUE_DEPTH: u64 = 16;
/// A small hot region: writes from both reactors overlap, so some wait.
const REGION_BLOCKS: u64 = 64;

/// Keeps `QUEUE_DEPTH` IOs in flight, each descriptor resubmitted from its
/// own completion with the same buffer, alternating write and read.
struct Job {
    me: Weak<Job>,
    ch: Rc<Channel>,
    rng: Cell<u64>,
    completed: Cell<u64>,
    failed: Cell<u64>,
    limit: Cell<u64>,
}

impl Job {
    fn offset(&self) -> u64 {
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        x % (REGION_BLOCKS - 8)
    }

    fn submit(&self, mut io: IoBox) {
        io.offset_blocks = self.offset();
        io.io_type = if io.io_type == IoType::Write { IoType::Read } else { IoType::Write };
        io.status = IoStatus::Pending;
        if let Some(me) = self.me.upgrade() {
            io.set_done(me);
        }
        self.ch.submit(io);
    }
}

impl IoDone for Job {
    fn io_done(&self, io: IoBox) {
        self.completed.set(self.completed.get() + 1);
        if !io.status.is_ok() {
            self.failed.set(self.failed.get() + 1);
        }
        if self.completed.get() < self.limit.get() {
            self.submit(io);
        }
    }
}

fn start_job(m: &ManualSet, r: usize, name: &str, seed: u64) -> Rc<Job> {
    m.on(r, || {
        let ch = Registry::get().lookup(name).unwrap().channel().unwrap();
        let job = Rc::new_cyclic(|me| Job {
            me: me.clone(),
            ch,
            rng: Cell::new(seed),
            completed: Cell::new(0),
            failed: Cell::new(0),
            limit: Cell::new(u64::MAX),
        });
        for _ in 0..QUEUE_DEPTH {
            let io = IoBox::data(IoType::Read, 0, 8, DmaBuf::alloc(8 * 512)).unwrap();
            job.submit(io);
        }
        job
    })
}

fn run_until(m: &ManualSet, jobs: &[Rc<Job>], each: u64) {
    for _ in 0..1_000_000 {
        if jobs.iter().all(|j| j.completed.get() >= each) {
            return;
        }
        m.run_once(0);
        m.run_once(1);
        // The bitmap's tick is a timed poller: let the manual clock move.
        m.advance_ns(20_000);
    }
    panic!("jobs stalled");
}

#[test]
fn raid_io_path_allocates_nothing() {
    let m = ReactorSet::manual(2);
    m.on(0, || {
        for i in 0..6 {
            let b = MallocBdev::new(BdevProps::new(&format!("M{i}"), "Malloc disk", 512, 512, None)).unwrap();
            Registry::get().register(Arc::new(b)).unwrap();
        }
        let mk = |name: &str, level: &str, strip: Option<u32>, members: &[&str]| {
            bdev_raid_create(RaidCreateParams {
                name: name.into(),
                raid_level: level.into(),
                base_bdevs: members.iter().map(|s| s.to_string()).collect(),
                strip_size_kb: strip,
                uuid: None,
                superblock: None,
                bitmap: None,
                bitmap_chunk_size_kb: None,
            })
            .unwrap();
        };
        mk("R1", "raid1", None, &["M0", "M1"]);
        mk("R10", "raid10", Some(2), &["M2", "M3", "M4", "M5"]);
        for i in 8..11 {
            let b = MallocBdev::new(BdevProps::new(&format!("M{i}"), "Malloc disk", 512, 512, None)).unwrap();
            Registry::get().register(Arc::new(b)).unwrap();
        }
        // 2 KiB chunks: an 8-block IO is a full stripe, or parts of two.
        mk("R5", "raid5", Some(2), &["M8", "M9", "M10"]);
        for i in 11..15 {
            let b = MallocBdev::new(BdevProps::new(&format!("M{i}"), "Malloc disk", 512, 512, None)).unwrap();
            Registry::get().register(Arc::new(b)).unwrap();
        }
        // raid6: P and Q (two data chunks a stripe, as R5).
        mk("R6", "raid6", Some(2), &["M11", "M12", "M13", "M14"]);
        // 4 MiB members: room for the superblock, the bitmap and 1 MiB alignment.
        for i in (6..8).chain(15..18) {
            let b = MallocBdev::new(BdevProps::new(&format!("M{i}"), "Malloc disk", 512, 8192, None)).unwrap();
            Registry::get().register(Arc::new(b)).unwrap();
        }
    });
    let online = m.on(0, || {
        let p = RaidCreateParams {
            name: "RB".into(),
            raid_level: "raid1".into(),
            base_bdevs: vec!["M6".into(), "M7".into()],
            strip_size_kb: None,
            uuid: None,
            superblock: Some(true),
            bitmap: None,
            bitmap_chunk_size_kb: Some(64),
        };
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        // raid5 with a superblock: bitmap and partial parity log.
        let p5 = RaidCreateParams {
            name: "R5B".into(),
            raid_level: "raid5".into(),
            base_bdevs: vec!["M15".into(), "M16".into(), "M17".into()],
            strip_size_kb: Some(2),
            ..p.clone()
        };
        bdev_raid_create_async(p, move |r| {
            r.expect("create RB");
            bdev_raid_create_async(p5, move |r| {
                r.expect("create R5B");
                f2.store(true, Ordering::Release);
            });
        });
        flag
    });
    for _ in 0..100_000 {
        if online.load(Ordering::Acquire) {
            break;
        }
        m.run_once(0);
        m.run_once(1);
        m.advance_ns(100_000);
    }
    assert!(online.load(Ordering::Acquire), "RB and R5B never came online");
    // Owner (0) and another reactor (1) on both arrays.
    let jobs = vec![
        start_job(&m, 0, "R1", 1),
        start_job(&m, 1, "R1", 2),
        start_job(&m, 0, "R10", 3),
        start_job(&m, 1, "R10", 4),
        start_job(&m, 0, "RB", 5),
        start_job(&m, 1, "RB", 6),
        start_job(&m, 0, "R5", 7),
        start_job(&m, 1, "R5", 8),
        start_job(&m, 0, "R6", 9),
        start_job(&m, 1, "R6", 10),
        start_job(&m, 0, "R5B", 11),
        start_job(&m, 1, "R5B", 12),
    ];
    // Warm-up: pools, slabs and queues reach their high-water marks (the
    // log's larger stripe buffers and extra member writes take longer to
    // reach theirs: 2 000 left a few late pool growths, never per IO).
    run_until(&m, &jobs, 6_000);
    let before = allocations();
    let done_before: u64 = jobs.iter().map(|j| j.completed.get()).sum();
    run_until(&m, &jobs, 10_000);
    let allocated = allocations() - before;
    let ios: u64 = jobs.iter().map(|j| j.completed.get()).sum::<u64>() - done_before;
    for j in &jobs {
        j.limit.set(0);
    }
    m.run_until_idle(10_000);
    assert!(jobs.iter().all(|j| j.failed.get() == 0), "IO failed");
    assert!(ios >= 40_000);
    let waits = m.on(0, || bdev_raid::RaidArray::find("R5B").unwrap().partial_parity_log_waits());
    assert_eq!(allocated, 0, "{allocated} allocations during {ios} steady-state RAID IOs (log waits {waits})");
}
