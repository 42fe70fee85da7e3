//! The closed-loop IO job the RAID benchmarks share: like bdevperf, every
//! completion resubmits at once, so the queue depth stays constant; offsets
//! are random (seeded) or sequential. Runs on reactor 0 of a set; reports
//! wall-clock IOPS and IOPS per CPU-second of the reactor thread
//! (`/proc/thread-self/schedstat`), which discounts the time other
//! processes took the core: on a shared machine that is the figure to compare.

use bdev::rng::SimRng;
use bdev::{DmaBuf, IoBox, IoDone, IoType, Registry};
use reactor::{PollStatus, ReactorSet};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::Duration;

/// What one run does.
#[derive(Clone, Copy)]
pub struct Spec {
    pub io_type: IoType,
    pub blocks_per_io: u64,
    pub depth: usize,
    /// Write the bdev once front to back (ends early), instead of random offsets.
    pub sequential: bool,
    /// Sequential, and back to the start at the end until the time is up.
    pub wrap: bool,
}

impl Spec {
    pub fn random(io_type: IoType, depth: usize) -> Spec {
        Spec { io_type, blocks_per_io: 1, depth, sequential: false, wrap: false }
    }
}

struct Job {
    ch: Rc<bdev::Channel>,
    spec: Spec,
    rng: RefCell<SimRng>,
    span_blocks: u64,
    next: Cell<u64>,
    end_ns: u64,
    done_ios: Cell<u64>,
    in_flight: Cell<usize>,
    failed: Cell<u64>,
    me: RefCell<Option<Rc<dyn IoDone>>>,
}

impl Job {
    /// Submits one IO with `buf`, unless the job is over.
    fn submit_one(&self, buf: DmaBuf) {
        let per_io = self.spec.blocks_per_io;
        let off = if self.spec.sequential {
            let mut off = self.next.get();
            if off + per_io > self.span_blocks && self.spec.wrap {
                off = 0;
            }
            if off >= self.span_blocks {
                return;
            }
            self.next.set(off + per_io);
            off
        } else {
            self.rng.borrow_mut().below(self.span_blocks - per_io + 1)
        };
        let n = per_io.min(self.span_blocks - off);
        let Some(mut io) = IoBox::data(self.spec.io_type, off, n, Some(buf)) else {
            return;
        };
        if let Some(me) = self.me.borrow().as_ref() {
            io.set_done(me.clone());
        }
        self.in_flight.set(self.in_flight.get() + 1);
        self.ch.submit(io);
    }
}

impl IoDone for Job {
    fn io_done(&self, mut io: IoBox) {
        self.in_flight.set(self.in_flight.get() - 1);
        if io.status.is_ok() {
            self.done_ios.set(self.done_ios.get() + 1);
        } else {
            self.failed.set(self.failed.get() + 1);
        }
        let buf = io.buf.take();
        drop(io);
        if let Some(buf) = buf {
            if reactor::now_ns() < self.end_ns {
                self.submit_one(buf);
            }
        }
    }
}

/// Nanoseconds this thread has run on a CPU (Linux schedstat; 0 elsewhere).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Runs `spec` against `bdev` on reactor 0 of `set` for `secs` (a
/// sequential job may end sooner); returns (IOPS, IOPS per CPU-second).
/// Panics on any IO error.
pub fn run(set: &ReactorSet, bdev: &'static str, spec: Spec, secs: f64) -> (f64, f64) {
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        let h = Registry::get().lookup(bdev).expect("bdev exists");
        let block_size = u64::from(h.props().block_size);
        let start_ns = reactor::now_ns();
        let start_cpu_ns = thread_cpu_ns();
        let job = Rc::new(Job {
            ch: h.channel().expect("channel"),
            spec,
            rng: RefCell::new(SimRng::new(0x5EED)),
            span_blocks: h.props().num_blocks,
            next: Cell::new(0),
            end_ns: start_ns + (secs * 1e9) as u64,
            done_ios: Cell::new(0),
            in_flight: Cell::new(0),
            failed: Cell::new(0),
            me: RefCell::new(None),
        });
        *job.me.borrow_mut() = Some(job.clone());
        for _ in 0..spec.depth {
            job.submit_one(DmaBuf::zeroed((spec.blocks_per_io * block_size) as usize).expect("DMA buffer"));
        }
        let mut tx = Some(tx);
        reactor::register_poller("bench_wait", move || {
            if job.in_flight.get() > 0 {
                return PollStatus::Idle;
            }
            let elapsed_s = (reactor::now_ns() - start_ns) as f64 / 1e9;
            let cpu_s = thread_cpu_ns().saturating_sub(start_cpu_ns) as f64 / 1e9;
            if let Some(tx) = tx.take() {
                let _ = tx.send((job.done_ios.get(), job.failed.get(), elapsed_s, cpu_s));
            }
            *job.me.borrow_mut() = None;
            PollStatus::Done
        });
    });
    let (ios, failed, elapsed_s, cpu_s) = rx.recv_timeout(Duration::from_secs_f64(secs + 60.0)).expect("job finished");
    assert_eq!(failed, 0, "{bdev}: IO errors during the benchmark");
    let per_cpu = if cpu_s > 0.0 { ios as f64 / cpu_s } else { f64::NAN };
    (ios as f64 / elapsed_s, per_cpu)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
