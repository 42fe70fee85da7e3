//! The NVMe/TCP initiator's namespace bdev allocates nothing per IO, also
//! when it splits IOs at the remote MDTS and when IOs wait for a command
//! slot: a counting global allocator (this test binary only, every thread
//! counted, the in-process target's too) watches steady-state IO from a
//! reactor with four times as many IOs in flight as the remote queue holds.

mod common;
use bdev::{Channel, DmaBuf, IoBox, IoDone, IoFlags, IoStatus, IoType, Registry};
use common::*;
use nvmf::host::{attach_controller, detach_controller, AttachParams};
use nvmf::TransportOpts;
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

#[path = "../../bdev/tests/support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::allocations_all_threads;

/// IOs in flight: four times the remote queue's 8 entries.
const LANES: u64 = 32;
const LANE_BLOCKS: u64 = 128;
/// Allocations allowed in the measured window, whatever the IO count
/// (runtime noise: a reactor's sleep, a lazily grown table).
const SLACK: u64 = 16;

/// Keeps `LANES` IOs in flight on one bdev channel until `stop_at` IOs were
/// issued; each completion issues the lane's next IO.
struct Driver {
    me: Weak<Driver>,
    ch: Rc<Channel>,
    bufs: Vec<DmaBuf>,
    issued: std::cell::Cell<u64>,
    stop_at: u64,
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl Driver {
    /// IO number `n` of the mix, on lane `n % LANES`.
    fn issue(&self, n: u64) {
        let lane = n % LANES;
        let off = lane * LANE_BLOCKS;
        let buf = &self.bufs[lane as usize];
        let (t, blocks, flags, data) = match (n / LANES) % 7 {
            // 64 KiB: eight pieces at an 8 KiB MDTS.
            0 => (IoType::Write, LANE_BLOCKS, IoFlags::NONE, true),
            1 => (IoType::Read, LANE_BLOCKS, IoFlags::NONE, true),
            2 => (IoType::Write, 8, IoFlags::FUA, true),
            3 => (IoType::Read, 8, IoFlags::NONE, true),
            4 => (IoType::Flush, 0, IoFlags::NONE, false),
            5 => (IoType::WriteZeroes, 8, IoFlags::NONE, false),
            _ => (IoType::Unmap, 8, IoFlags::NONE, false),
        };
        let Some(mut io) = IoBox::data(t, off, blocks, data.then(|| buf.clone())) else {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        io.flags = flags;
        io.tag = n;
        if let Some(me) = self.me.upgrade() {
            io.set_done(me);
        }
        self.issued.set(self.issued.get() + 1);
        self.ch.submit(io);
    }
}

impl IoDone for Driver {
    fn io_done(&self, io: IoBox) {
        if io.status != IoStatus::Success {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        let next = io.tag + LANES;
        drop(io);
        self.done.fetch_add(1, Ordering::Relaxed);
        if self.issued.get() < self.stop_at {
            self.issue(next);
        }
    }
}

#[test]
fn split_and_queued_remote_bdev_io_does_not_allocate() {
    let opts = TransportOpts { max_queue_depth: 8, max_io_size: 8192, ..Default::default() };
    let t = start_target(1, 512, LANES * LANE_BLOCKS, opts, &[]);
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0], IdlePolicy::sleep()) };
    let ini = ReactorSet::start(cfg, || {}).unwrap();
    let port = t.port;
    let (tx, rx) = mpsc::channel();
    ini.send(0, move || {
        let p = AttachParams {
            name: "Remote".into(),
            trtype: "TCP".into(),
            traddr: "127.0.0.1".into(),
            adrfam: None,
            trsvcid: port.to_string(),
            subnqn: NQN.into(),
            hostnqn: Some(HOSTNQN.into()),
            hdgst: false,
            ddgst: false,
            psk: None,
        };
        attach_controller(p, move |r| {
            let _ = tx.send(r);
        })
    });
    rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();

    let warmup = 1_000u64;
    let total = 8_000u64;
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (d2, f2) = (done.clone(), failed.clone());
    ini.call(0, move || {
        let ch = Registry::get().lookup("Remoten1").unwrap().channel().unwrap();
        assert_eq!(ch.handle().props().max_io_blocks, 16, "8 KiB MDTS");
        let bufs = (0..LANES).map(|_| DmaBuf::alloc((LANE_BLOCKS * 512) as usize).unwrap()).collect();
        let driver = Rc::new_cyclic(|me| Driver {
            me: me.clone(),
            ch,
            bufs,
            issued: std::cell::Cell::new(0),
            stop_at: total,
            done: d2,
            failed: f2,
        });
        for n in 0..LANES {
            driver.issue(n);
        }
        // The driver lives on in its IOs' completers.
    });
    let t0 = Instant::now();
    let wait_for = |n: u64| {
        while done.load(Ordering::Relaxed) < n {
            assert!(t0.elapsed() < Duration::from_secs(120), "too slow: {} IOs done", done.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    wait_for(warmup);
    let start = allocations_all_threads();
    let start_done = done.load(Ordering::Relaxed);
    wait_for(total - LANES);
    let allocs = allocations_all_threads() - start;
    let measured = done.load(Ordering::Relaxed) - start_done;
    wait_for(total);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "every IO succeeds");
    println!("{measured} bdev IOs (64 KiB ones in 8 commands, 32 in flight on 7 slots), {allocs} allocations");
    assert!(allocs <= SLACK, "{allocs} allocations during {measured} IOs: the initiator's IO path allocates");

    let (tx, rx) = mpsc::channel();
    ini.send(0, move || {
        detach_controller("Remote", move |r| {
            let _ = tx.send(r);
        })
    });
    rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
    ini.stop();
    ini.join();
}
