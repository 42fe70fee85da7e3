//! The driver's cost per IO, measured against the simulated controller in
//! loopback mode (every command completes at once, no data moves): 4 KiB
//! reads through the NVMe bdev channel at a fixed queue depth on one manual
//! reactor, the model stepped by hand between reactor loops. Only the
//! reactor loops are timed — submit, SQE build and doorbell, completion
//! reaping and CQ doorbell, the bdev completion and the resubmission in its
//! callback — not the model's step, so the figure is what one core spends
//! in nvraid per IO (beside SPDK's published 10-14 M IOPS per core, i.e.
//! 70-100 ns per IO, which also counts no device time).
//!
//! `cargo run --release -p nvme --example loopback_cost [IOS] [QUEUE_DEPTH]`
//!
//! Under callgrind, count instructions of the timed part only:
//! `valgrind --tool=callgrind --toggle-collect='*ManualSet*run_once*' target/release/examples/loopback_cost 200000`
//! and divide the reported Ir by the IO count (a run with fewer IOs,
//! subtracted, removes the set-up).

use bdev::{Channel, DmaBuf, IoBox, IoDone, IoStatus, IoType, Registry};
use nvme::{CtrlrOpts, SimConfig, SimController, SimNamespace, Transport};
use reactor::ReactorSet;
use std::cell::Cell;
use std::rc::Rc;

/// Resubmits each completed read to the next block, until the target count.
struct Loop {
    ch: Rc<Channel>,
    me: Cell<Option<Rc<Loop>>>,
    completed: Cell<u64>,
    failed: Cell<u64>,
    issued: Cell<u64>,
    target: u64,
    blocks: u64,
}

impl Loop {
    fn submit(self: &Rc<Self>, buf: DmaBuf) {
        let n = self.issued.get();
        self.issued.set(n + 1);
        let Some(mut io) = IoBox::data(IoType::Read, (n * 8) % self.blocks, 8, Some(buf)) else {
            self.failed.set(self.failed.get() + 1);
            return;
        };
        io.set_done(self.clone());
        self.ch.submit(io);
    }
}

impl IoDone for Loop {
    fn io_done(&self, mut io: IoBox) {
        if io.status != IoStatus::Success {
            self.failed.set(self.failed.get() + 1);
        }
        self.completed.set(self.completed.get() + 1);
        let buf = io.buf.take();
        drop(io);
        if self.issued.get() < self.target {
            if let (Some(buf), Some(me)) = (buf, self.me.take()) {
                me.submit(buf);
                self.me.set(Some(me));
            }
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let ios: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2_000_000);
    let depth: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);
    let m = ReactorSet::manual(1);
    let cfg = SimConfig {
        loopback: true,
        namespaces: vec![SimNamespace { num_blocks: 1 << 16, block_size: 512 }],
        ..SimConfig::default()
    };
    let sim = SimController::new(cfg).expect("simulated controller");
    let (tx, rx) = std::sync::mpsc::channel();
    let opts = CtrlrOpts { io_queue_depth: 256, ..CtrlrOpts::default() };
    m.on(0, || nvme::attach_controller("Nvme0", Transport::Sim(sim.clone()), opts, None, move |r| tx.send(r).unwrap()));
    let names = loop {
        if let Ok(r) = rx.try_recv() {
            break r.expect("attach");
        }
        m.run_once(0);
        m.advance_ns(10_000);
    };
    sim.step_by_hand(true);
    let blocks = sim.config().namespaces[0].num_blocks;
    let lp = m.on(0, || {
        let ch = Registry::get().lookup(&names[0]).unwrap().channel().unwrap();
        let lp = Rc::new(Loop {
            ch,
            me: Cell::new(None),
            completed: Cell::new(0),
            failed: Cell::new(0),
            issued: Cell::new(0),
            target: ios,
            blocks,
        });
        lp.me.set(Some(lp.clone()));
        for _ in 0..depth {
            lp.submit(DmaBuf::alloc(4096).unwrap());
        }
        lp
    });
    // Warm up (the queue pair is created by message; pools fill), then time.
    while lp.completed.get() < depth.min(ios) {
        m.run_once(0);
        sim.step();
    }
    let start_completed = lp.completed.get();
    let (mut driver_ticks, mut model_ticks, mut loops) = (0u64, 0u64, 0u64);
    let wall = std::time::Instant::now();
    while lp.completed.get() < ios {
        let t0 = reactor::tsc::ticks();
        m.run_once(0);
        let t1 = reactor::tsc::ticks();
        sim.step();
        let t2 = reactor::tsc::ticks();
        driver_ticks += t1 - t0;
        model_ticks += t2 - t1;
        loops += 1;
    }
    let wall = wall.elapsed();
    let measured = lp.completed.get() - start_completed;
    let rate = reactor::tsc::tick_rate() as f64;
    let ns = |ticks: u64| ticks as f64 * 1e9 / rate / measured.max(1) as f64;
    let driver_ns = ns(driver_ticks);
    println!(
        "4 KiB reads, queue depth {depth}, {measured} IOs in {loops} reactor loops ({:.1} IOs per loop), {} failed",
        measured as f64 / loops.max(1) as f64,
        lp.failed.get()
    );
    println!(
        "driver (submit + complete, bdev channel and reactor loop included): {driver_ns:.1} ns/IO = {:.2} M IOPS per core",
        1e3 / driver_ns
    );
    println!(
        "simulated controller (not the driver): {:.1} ns/IO; wall {:.1} ns/IO",
        ns(model_ticks),
        wall.as_nanos() as f64 / measured.max(1) as f64
    );
    lp.me.take();
    m.on(0, || nvme::detach_controller("Nvme0", |_| ()));
    for _ in 0..100_000 {
        m.run_once(0);
        sim.step();
        m.advance_ns(10_000);
    }
}
