//! Proof that the NVMe queue pair's steady state allocates nothing: a
//! counting global allocator (this test binary only) watches IO from two
//! reactors — submission, PRP lists, MDTS splits into child commands, the
//! wait FIFO when the queue is full, completion reaping, doorbells, the
//! timeout scan and the admin poller's health check — against the simulated
//! controller, which steps on a thread of its own so its allocations stay
//! out of the count (it counts the reactor thread's only).

use bdev::{Channel, DmaBuf, IoBox, IoDone, IoStatus, IoType, Registry};
use nvme::{CtrlrOpts, SimConfig, SimController, Transport};
use reactor::{ManualSet, ReactorSet};
use std::cell::Cell;
use std::rc::{Rc, Weak};
use std::sync::Arc;

#[path = "../../bdev/tests/support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::allocations;

/// More than the queue holds: some IO waits in the FIFO.
const QUEUE_DEPTH: u64 = 24;
const BLOCKS: u64 = 8192;

/// Keeps `QUEUE_DEPTH` IOs in flight, each resubmitted from its own
/// completion with the same buffer, alternating write and read, of 4 KiB or
/// (every fourth) 64 KiB, which MDTS splits.
struct Job {
    me: Weak<Job>,
    ch: Rc<Channel>,
    rng: Cell<u64>,
    completed: Cell<u64>,
    failed: Cell<u64>,
}

impl Job {
    fn submit(&self, mut io: IoBox) {
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        io.num_blocks = if x.is_multiple_of(4) { 128 } else { 8 };
        io.offset_blocks = x % (BLOCKS - 128);
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
        self.submit(io);
    }
}

fn run_until(m: &ManualSet, jobs: &[Rc<Job>], each: u64) {
    let t0 = std::time::Instant::now();
    while jobs.iter().any(|j| j.completed.get() < each) {
        m.run_once(0);
        m.run_once(1);
        m.advance_ns(1_000);
        assert!(t0.elapsed().as_secs() < 60, "jobs stalled");
    }
}

#[test]
fn queue_pair_steady_state_allocates_nothing() {
    let m = ReactorSet::manual(2);
    let cfg = SimConfig {
        mdts: 3, // 32 KiB: a 64 KiB IO is two commands
        namespaces: vec![nvme::SimNamespace { num_blocks: BLOCKS, block_size: 512 }],
        ..SimConfig::default()
    };
    let sim = SimController::new(cfg).unwrap();
    let _stepper = sim.step_on_thread();
    let (tx, rx) = std::sync::mpsc::channel();
    let opts = CtrlrOpts { io_queue_depth: 16, ..CtrlrOpts::default() };
    m.on(0, || nvme::attach_controller("Nvme0", Transport::Sim(sim.clone()), opts, None, move |r| tx.send(r).unwrap()));
    let names = loop {
        if let Ok(r) = rx.try_recv() {
            break r.unwrap();
        }
        m.run_once(0);
        m.run_once(1);
        m.advance_ns(1_000);
    };
    assert_eq!(names, vec!["Nvme0n1".to_string()]);
    let jobs: Vec<Rc<Job>> = (0..2)
        .map(|r| {
            m.on(r, || {
                let ch = Registry::get().lookup("Nvme0n1").unwrap().channel().unwrap();
                let job = Rc::new_cyclic(|me| Job {
                    me: me.clone(),
                    ch,
                    rng: Cell::new(0x9E37_79B9 + r as u64),
                    completed: Cell::new(0),
                    failed: Cell::new(0),
                });
                for _ in 0..QUEUE_DEPTH {
                    let io = IoBox::data(IoType::Read, 0, 8, DmaBuf::alloc(128 * 512)).unwrap();
                    job.submit(io);
                }
                job
            })
        })
        .collect();
    // Warm-up: queue pairs made, the channels' and pools' first use done.
    run_until(&m, &jobs, 500);
    let before = allocations();
    run_until(&m, &jobs, 3_000);
    let during = allocations() - before;
    for j in &jobs {
        assert_eq!(j.failed.get(), 0);
    }
    let c = m.on(0, || nvme::Controllers::get().lookup("Nvme0").unwrap());
    assert_eq!(c.stats.resets.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(sim.stats().io_commands > 6_000, "{:?}", sim.stats());
    assert_eq!(during, 0, "{during} allocations on the reactor thread in steady state");
    drop(jobs);
    let _ = Arc::strong_count(&sim);
}
