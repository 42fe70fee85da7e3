//! Exercises the VFIO driver on real (or QEMU-emulated) controllers: attach,
//! write a pattern, read it back, a large IO (MDTS split, PRP lists), polled
//! 4 KiB random-read IOPS at QD1 and QD32, then detach (CC.SHN). Used by
//! the QEMU rig's `nvme-vfio` scenario; prints `PROBE-OK`/`PROBE-FAIL` and
//! `PROBE-FIGURE` lines.
//!
//! Usage: nvme_probe [--seconds S] [--pattern TEXT] [--pattern-offset BYTES] BDF...

use bdev::{DmaBuf, IoBox, IoStatus, IoType, Registry};
use nvme::{CtrlrOpts, Transport};
use reactor::{ManualSet, ReactorSet};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

struct Probe {
    m: ManualSet,
    last: Cell<Instant>,
}

impl Probe {
    /// One reactor loop, with the manual clock following real time so IO
    /// timeouts mean what they say.
    fn tick(&self) {
        self.m.run_once(0);
        let now = Instant::now();
        let dt = now.duration_since(self.last.get());
        self.last.set(now);
        self.m.advance_ns(dt.as_nanos() as u64);
    }

    fn io(&self, bdev: &str, t: IoType, off: u64, n: u64, buf: Option<DmaBuf>) -> IoStatus {
        let done: Rc<Cell<Option<IoStatus>>> = Rc::default();
        let d2 = done.clone();
        self.m.on(0, || {
            let ch = Registry::get().lookup(bdev).expect("bdev").channel().expect("channel");
            let mut io = IoBox::data(t, off, n, buf).expect("descriptor");
            io.set_done(Rc::new(move |io: IoBox| d2.set(Some(io.status))));
            ch.submit(io);
        });
        let t0 = Instant::now();
        while done.get().is_none() {
            self.tick();
            if t0.elapsed() > Duration::from_secs(60) {
                return IoStatus::Failed(bdev::IoError::Aborted);
            }
        }
        done.get().unwrap_or(IoStatus::Pending)
    }

    /// Random 4 KiB reads at queue depth `qd` for `secs`: IOs per second.
    fn iops(&self, bdev: &str, qd: usize, secs: f64) -> (f64, u64) {
        let (blocks, bs) = self.m.on(0, || {
            let h = Registry::get().lookup(bdev).expect("bdev");
            (h.props().num_blocks, h.props().block_size as u64)
        });
        let per_io = 4096 / bs;
        let span = blocks / per_io;
        let completed = Rc::new(Cell::new(0u64));
        let errors = Rc::new(Cell::new(0u64));
        let free: Rc<RefCell<Vec<DmaBuf>>> = Rc::new(RefCell::new(Vec::new()));
        self.m.on(0, || {
            for _ in 0..qd {
                free.borrow_mut().push(DmaBuf::alloc(4096).expect("buffer"));
            }
        });
        let ch = self.m.on(0, || Registry::get().lookup(bdev).expect("bdev").channel().expect("channel"));
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs_f64(secs);
        let inflight = Rc::new(Cell::new(0usize));
        loop {
            let now = Instant::now();
            if now >= deadline && inflight.get() == 0 {
                break;
            }
            while now < deadline && inflight.get() < qd {
                let Some(buf) = free.borrow_mut().pop() else {
                    break;
                };
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % span) * per_io;
                let (c, e, f, inf) = (completed.clone(), errors.clone(), free.clone(), inflight.clone());
                self.m.on(0, || {
                    let mut io = IoBox::data(IoType::Read, off, per_io, Some(buf)).expect("descriptor");
                    io.set_done(Rc::new(move |mut io: IoBox| {
                        if io.status == IoStatus::Success {
                            c.set(c.get() + 1);
                        } else {
                            e.set(e.get() + 1);
                        }
                        if let Some(b) = io.buf.take() {
                            f.borrow_mut().push(b);
                        }
                        inf.set(inf.get() - 1);
                    }));
                    ch.submit(io);
                });
                inflight.set(inflight.get() + 1);
            }
            self.tick();
        }
        (completed.get() as f64 / t0.elapsed().as_secs_f64(), errors.get())
    }
}

fn pattern_bytes(text: &str, len: usize) -> Vec<u8> {
    let unit = if text.is_empty() { b"nvraid".to_vec() } else { format!("{text}\n").into_bytes() };
    unit.iter().copied().cycle().take(len).collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut secs = 3.0f64;
    let mut pattern = String::from("nvraid-vfio");
    let mut pattern_off = 1u64 << 20;
    let mut bdfs = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => secs = args.next().and_then(|v| v.parse().ok()).unwrap_or(secs),
            "--pattern" => pattern = args.next().unwrap_or_default(),
            "--pattern-offset" => pattern_off = args.next().and_then(|v| v.parse().ok()).unwrap_or(pattern_off),
            _ => bdfs.push(a),
        }
    }
    if bdfs.is_empty() {
        eprintln!("usage: nvme_probe [--seconds S] [--pattern TEXT] [--pattern-offset BYTES] BDF...");
        std::process::exit(2);
    }
    let probe = Probe { m: ReactorSet::manual(1), last: Cell::new(Instant::now()) };
    let mut failed = false;
    let mut check = |what: &str, ok: bool, detail: String| {
        println!("{} {what} {detail}", if ok { "PROBE-OK" } else { "PROBE-FAIL" });
        failed |= !ok;
    };
    for (i, bdf) in bdfs.iter().enumerate() {
        let name = format!("Nvme{i}");
        let t0 = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        probe.m.on(0, || {
            nvme::attach_controller(
                &name,
                Transport::Pcie { traddr: bdf.clone() },
                // Every second controller describes data with SGLs when it can.
                CtrlrOpts { prefer_sgl: i % 2 == 1, ..CtrlrOpts::default() },
                None,
                move |r| tx.send(r).unwrap_or(()),
            )
        });
        // The bring-up is polled: the reactor loop runs until it ends.
        let r = loop {
            if let Ok(r) = rx.try_recv() {
                break r;
            }
            probe.tick();
        };
        let names = match r {
            Ok(n) => n,
            Err(e) => {
                check("attach", false, format!("{bdf}: {e}"));
                continue;
            }
        };
        let c = probe.m.on(0, || nvme::Controllers::get().lookup(&name)).expect("controller");
        check(
            "attach",
            !names.is_empty(),
            format!(
                "{bdf} in {} ms: {} '{}' sn {} mdts {} io_queues {} depth {} sgl {} ns {:?}",
                t0.elapsed().as_millis(),
                name,
                c.data().model,
                c.data().serial,
                c.data().mdts,
                c.io_queue_count(),
                c.io_queue_depth(),
                c.uses_sgl(),
                names
            ),
        );
        let bdev = names[0].clone();
        let bs = c.namespaces()[0].block_size as u64;
        // The pattern, where the kernel driver will look for it after rebind.
        let data = pattern_bytes(&pattern, 1 << 20);
        let buf = probe.m.on(0, || DmaBuf::alloc(data.len()).expect("buffer"));
        buf.copy_from(0, &data);
        let s = probe.io(&bdev, IoType::Write, pattern_off / bs, data.len() as u64 / bs, Some(buf));
        check("write-pattern", s == IoStatus::Success, format!("{bdev} 1 MiB at {pattern_off}: {s:?}"));
        let back = probe.m.on(0, || DmaBuf::zeroed(data.len()).expect("buffer"));
        let s = probe.io(&bdev, IoType::Read, pattern_off / bs, data.len() as u64 / bs, Some(back.clone()));
        check("read-pattern", s == IoStatus::Success && back.to_vec() == data, format!("{bdev}: {s:?}"));
        // 3 MiB at an odd page offset: split by MDTS, PRP lists per piece.
        let big = probe.m.on(0, || DmaBuf::alloc(4 << 20).expect("buffer"));
        let slice = big.slice(512, 3 << 20);
        let big_data: Vec<u8> =
            (0..slice.len()).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1]).collect();
        slice.copy_from(0, &big_data);
        let at = (8u64 << 20) / bs;
        let s = probe.io(&bdev, IoType::Write, at, slice.len() as u64 / bs, Some(slice.clone()));
        let back = probe.m.on(0, || DmaBuf::zeroed(3 << 20).expect("buffer"));
        let s2 = probe.io(&bdev, IoType::Read, at, slice.len() as u64 / bs, Some(back.clone()));
        check(
            "large-io",
            s == IoStatus::Success && s2 == IoStatus::Success && back.to_vec() == big_data,
            format!("3 MiB at +512 B: write {s:?} read {s2:?}"),
        );
        let s = probe.io(&bdev, IoType::Flush, 0, 0, None);
        check("flush", s == IoStatus::Success, format!("{s:?}"));
        // A controller reset (disable, enable, queues recreated), then the
        // pattern must still read back.
        probe.m.on(0, || c.request_reset("nvme_probe"));
        let t0 = Instant::now();
        while c.stats.resets.load(std::sync::atomic::Ordering::Relaxed) == 0 && t0.elapsed() < Duration::from_secs(30) {
            probe.tick();
        }
        let back = probe.m.on(0, || DmaBuf::zeroed(data.len()).expect("buffer"));
        let s = probe.io(&bdev, IoType::Read, pattern_off / bs, data.len() as u64 / bs, Some(back.clone()));
        check(
            "reset",
            c.state() == nvme::CtrlrState::Enabled && s == IoStatus::Success && back.to_vec() == data,
            format!(
                "state {:?} in {} ms, read after reset {s:?}, sgl {}",
                c.state(),
                t0.elapsed().as_millis(),
                i % 2 == 1
            ),
        );
        for qd in [1usize, 32] {
            let (iops, errors) = probe.iops(&bdev, qd, secs);
            println!("PROBE-FIGURE {bdev} polled 4KiB random read QD{qd}: {iops:.0} IOPS ({errors} errors, {secs} s)");
            check(&format!("iops-qd{qd}"), errors == 0 && iops > 0.0, format!("{iops:.0} IOPS"));
        }
    }
    for i in 0..bdfs.len() {
        let name = format!("Nvme{i}");
        if probe.m.on(0, || nvme::Controllers::get().lookup(&name)).is_none() {
            continue;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        probe.m.on(0, || nvme::detach_controller(&name, move |r| tx.send(r).unwrap_or(())));
        let t0 = Instant::now();
        let r = loop {
            if let Ok(r) = rx.try_recv() {
                break r;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                break Err(nvme::NvmeError::Invalid("detach did not finish in 30 s".into()));
            }
            probe.tick();
        };
        check("detach", r.is_ok(), format!("{name}: {r:?}"));
    }
    let (huge_bytes, plain_bytes) = bdev::dma::memory_stats();
    println!(
        "PROBE-NOTE DMA arenas: {} MiB hugepage-backed, {} MiB ordinary pages",
        huge_bytes >> 20,
        plain_bytes >> 20
    );
    std::process::exit(i32::from(failed));
}
