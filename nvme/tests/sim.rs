//! The driver against the simulated controller on a manual reactor set:
//! queue wraparound and phase flips, PRP lists (chained), MDTS splits, SGLs,
//! timeouts with abort and reset, a controller that never becomes ready,
//! detach with IO in flight, and durability: FUA and Flush reach the
//! controller and decide what its medium holds after a power cut, and the
//! bdev reports the cache and DLFEAT the controller has; a control path that
//! never blocks a reactor (queue pairs made and controllers reset under IO
//! on several reactors with no busy-wait step or contended lock counted);
//! asynchronous events (namespaces added, resized, removed; SMART critical
//! warnings); surprise removal mid-IO; a reset that cannot recover. Every completion
//! checks that the simulated
//! controller holds no command still pointing at the IO's buffer
//! (invariant 5 in docs/architecture.md: no buffer released while the device may write it).
//!
//! Seeds: `NVME_SIM_SEED=<n>` replays a run; the seed is printed on failure.

use bdev::{DmaBuf, IoBox, IoError, IoFlags, IoStatus, IoType, Registry};
use nvme::{CtrlrOpts, SimConfig, SimController, SimNamespace, Transport};
use reactor::{ManualSet, ReactorSet};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn seed() -> u64 {
    let s = std::env::var("NVME_SIM_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5EED);
    eprintln!("simulator seed = {s} (replay with NVME_SIM_SEED={s})");
    s
}

struct Rig {
    m: ManualSet,
    sim: Arc<SimController>,
    /// IOs whose buffer a fetched, uncompleted command still pointed at
    /// when the IO completed: must stay 0.
    early_releases: Rc<RefCell<u64>>,
}

type Done = Rc<RefCell<Option<IoStatus>>>;

const STEP_NS: u64 = 100_000;

impl Rig {
    fn new(cfg: SimConfig, opts: CtrlrOpts, reactors: usize) -> Rig {
        let m = ReactorSet::manual(reactors);
        let sim = SimController::new(cfg).unwrap();
        let names = attach(&m, "Nvme0", &sim, opts).unwrap();
        assert_eq!(names, vec!["Nvme0n1".to_string()]);
        Rig { m, sim, early_releases: Rc::default() }
    }

    fn round(&self) {
        for id in 0..self.m.count() {
            self.m.run_once(id);
        }
        self.m.advance_ns(STEP_NS);
    }

    fn run_until(&self, max_rounds: usize, cond: impl Fn() -> bool) -> bool {
        for _ in 0..max_rounds {
            if cond() {
                return true;
            }
            self.round();
        }
        cond()
    }

    fn submit(&self, on: usize, t: IoType, off: u64, n: u64, buf: Option<DmaBuf>) -> Done {
        self.submit_flags(on, t, off, n, buf, IoFlags::NONE)
    }

    fn submit_flags(&self, on: usize, t: IoType, off: u64, n: u64, buf: Option<DmaBuf>, flags: IoFlags) -> Done {
        self.submit_to("Nvme0n1", on, t, off, n, buf, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_to(
        &self,
        bdev: &str,
        on: usize,
        t: IoType,
        off: u64,
        n: u64,
        buf: Option<DmaBuf>,
        flags: IoFlags,
    ) -> Done {
        let done: Done = Rc::default();
        let (d2, sim, early) = (done.clone(), self.sim.clone(), self.early_releases.clone());
        self.m.on(on, || {
            let ch = Registry::get().lookup(bdev).unwrap().channel().unwrap();
            let mut io = IoBox::data(t, off, n, buf).unwrap();
            io.flags = flags;
            io.set_done(Rc::new(move |io: IoBox| {
                if let Some(b) = io.buf.as_ref() {
                    if sim.inflight_overlaps(b.iova(), b.len()) {
                        *early.borrow_mut() += 1;
                    }
                }
                *d2.borrow_mut() = Some(io.status);
            }));
            ch.submit(io);
        });
        done
    }

    fn wait(&self, d: &Done) -> IoStatus {
        assert!(self.run_until(200_000, || d.borrow().is_some()), "IO did not complete");
        let s = d.borrow().unwrap();
        s
    }

    fn write(&self, on: usize, off: u64, data: &[u8]) -> IoStatus {
        self.write_flags(on, off, data, IoFlags::NONE)
    }

    fn write_flags(&self, on: usize, off: u64, data: &[u8], flags: IoFlags) -> IoStatus {
        let buf = self.m.on(on, || DmaBuf::alloc(data.len()).unwrap());
        buf.copy_from(0, data);
        let d = self.submit_flags(on, IoType::Write, off, data.len() as u64 / 512, Some(buf), flags);
        self.wait(&d)
    }

    /// What the simulated medium holds (a power cut now would leave this).
    fn media(&self, off_blocks: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        assert!(self.sim.read_media(1, off_blocks as usize * 512, &mut out));
        out
    }

    fn bdev_props(&self) -> bdev::BdevProps {
        self.m.on(0, || Registry::get().lookup("Nvme0n1").unwrap().props().clone())
    }

    fn read(&self, on: usize, off: u64, len: usize) -> (IoStatus, Vec<u8>) {
        let buf = self.m.on(on, || DmaBuf::zeroed(len).unwrap());
        let d = self.submit(on, IoType::Read, off, len as u64 / 512, Some(buf.clone()));
        let s = self.wait(&d);
        (s, buf.to_vec())
    }

    fn ctrlr(&self) -> Arc<nvme::Controller> {
        self.m.on(0, || nvme::Controllers::get().lookup("Nvme0").unwrap())
    }

    fn detach(&self) -> Rc<RefCell<Option<Result<(), nvme::NvmeError>>>> {
        let out: Rc<RefCell<Option<Result<(), nvme::NvmeError>>>> = Rc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        self.m.on(0, || nvme::detach_controller("Nvme0", move |r| tx.send(r).unwrap()));
        let o2 = out.clone();
        assert!(self.run_until(200_000, || {
            if let Ok(r) = rx.try_recv() {
                *o2.borrow_mut() = Some(r);
            }
            o2.borrow().is_some()
        }));
        out
    }

    fn nvme_pollers(&self) -> Vec<&'static str> {
        (0..self.m.count())
            .flat_map(|id| self.m.on(id, reactor::poller_names))
            .filter(|n| n.starts_with("nvme"))
            .collect()
    }
}

/// Attaches `sim` as `name` on reactor 0 and runs the set (the manual
/// clock advancing) until the bring-up ends.
fn attach(
    m: &ManualSet,
    name: &str,
    sim: &Arc<SimController>,
    opts: CtrlrOpts,
) -> Result<Vec<String>, nvme::NvmeError> {
    let (tx, rx) = std::sync::mpsc::channel();
    m.on(0, || nvme::attach_controller(name, Transport::Sim(sim.clone()), opts, None, move |r| tx.send(r).unwrap()));
    for _ in 0..1_000_000 {
        if let Ok(r) = rx.try_recv() {
            return r;
        }
        for id in 0..m.count() {
            m.run_once(id);
        }
        m.advance_ns(STEP_NS);
    }
    panic!("attach did not finish");
}

fn pattern(len: usize, salt: u64) -> Vec<u8> {
    let mut x = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn cfg(seed: u64) -> SimConfig {
    SimConfig { seed, ..SimConfig::default() }
}

#[test]
fn identify_read_write_flush_zeroes_unmap() {
    let r = Rig::new(cfg(seed()), CtrlrOpts::default(), 1);
    let c = r.ctrlr();
    assert_eq!(c.data().serial, "SIM0001");
    assert_eq!(c.namespaces()[0].num_blocks, 8192);
    let data = pattern(4096, 1);
    assert_eq!(r.write(0, 16, &data), IoStatus::Success);
    let (s, back) = r.read(0, 16, 4096);
    assert_eq!(s, IoStatus::Success);
    assert_eq!(back, data);
    let mut raw = vec![0u8; 4096];
    assert!(r.sim.read_namespace(1, 16 * 512, &mut raw));
    assert_eq!(raw, data, "the data reached the simulated medium");

    let d = r.submit(0, IoType::Flush, 0, 0, None);
    assert_eq!(r.wait(&d), IoStatus::Success);
    let d = r.submit(0, IoType::WriteZeroes, 16, 2, None);
    assert_eq!(r.wait(&d), IoStatus::Success);
    let d = r.submit(0, IoType::Unmap, 20, 4, None);
    assert_eq!(r.wait(&d), IoStatus::Success);
    let (_, back) = r.read(0, 16, 4096);
    assert!(back[..1024].iter().all(|&b| b == 0), "write zeroes");
    assert_eq!(&back[1024..2048], &data[1024..2048], "untouched blocks");
    assert!(back[2048..].iter().all(|&b| b == 0), "deallocated blocks read as zeroes");
    // Past the end: refused by the bdev layer, never reaches the device.
    let (s, _) = r.read(0, 8190, 4096);
    assert_eq!(s, IoStatus::Failed(IoError::OutOfRange));

    let info = r.m.on(0, || nvme::controllers_json(Some("Nvme0")).unwrap());
    assert_eq!(info[0]["ctrlrs"][0]["trid"]["trtype"], "SIM");
    assert_eq!(*r.early_releases.borrow(), 0);
    assert_eq!(r.sim.stats().dma_faults, 0);
}

#[test]
fn fua_and_flush_reach_the_controller_and_decide_what_survives_a_power_cut() {
    let s = seed();
    // MDTS 8 KiB: a 32 KiB write is four commands, and each must carry FUA.
    let r = Rig::new(SimConfig { mdts: 1, ..cfg(s) }, CtrlrOpts::default(), 2);
    let props = r.bdev_props();
    assert!(props.write_cache, "VWC present and enabled: the bdev has a volatile cache");
    assert!(props.deallocated_reads_zeroes, "DLFEAT 001b");
    assert!(r.m.on(0, || Registry::get().lookup("Nvme0n1").unwrap().bdev().has_write_cache()));

    let (plain, forced) = (pattern(32 << 10, s), pattern(32 << 10, s + 1));
    assert_eq!(r.write(0, 0, &plain), IoStatus::Success);
    assert_eq!(r.write_flags(1, 64, &forced, IoFlags::FUA), IoStatus::Success);
    let st = r.sim.stats();
    assert_eq!(st.fua_writes, 4, "every command of the split FUA write has CDW12 bit 30: {st:?}");
    assert_eq!(st.flushes, 0);
    assert!(r.media(0, plain.len()).iter().all(|&b| b == 0), "a plain write sits in the volatile cache");
    assert!(r.media(64, forced.len()) == forced, "a FUA write is on the medium when it completes");
    assert!(r.read(0, 0, plain.len()).1 == plain, "reads see the cached data");

    // Flush: the plain write reaches the medium.
    let d = r.submit(1, IoType::Flush, 0, 0, None);
    assert_eq!(r.wait(&d), IoStatus::Success);
    assert_eq!(r.sim.stats().flushes, 1, "the Flush reached the controller with a valid NSID");
    assert!(r.media(0, plain.len()) == plain);
    assert_eq!(r.sim.unsynced_blocks(), 0);

    // Write Zeroes: FUA makes it durable, without FUA it waits for a flush.
    let d = r.submit_flags(0, IoType::WriteZeroes, 0, 8, None, IoFlags::FUA);
    assert_eq!(r.wait(&d), IoStatus::Success);
    let d = r.submit(0, IoType::WriteZeroes, 64, 8, None);
    assert_eq!(r.wait(&d), IoStatus::Success);
    assert_eq!(r.sim.stats().fua_write_zeroes, 1);
    let media = r.media(0, 4096);
    assert!(media.iter().all(|&b| b == 0), "FUA write zeroes is durable");
    assert!(r.media(64, 4096) == forced[..4096], "plain write zeroes is still only cached");
    // DPO is a hint with no NVMe bit: it must not turn into PRACT (bit 29).
    assert_eq!(r.write_flags(0, 200, &pattern(4096, s + 2), IoFlags::DPO), IoStatus::Success);
    assert_eq!(r.sim.stats().fua_writes, 4, "DPO alone is not FUA");
    assert_eq!(r.sim.stats().prinfo_commands, 0, "no protection information bits");
    assert_eq!(*r.early_releases.borrow(), 0);

    // A controller without a cache, with a disabled one, without DLFEAT.
    for (sim_cfg, cache, zeroes) in [
        (SimConfig { vwc: false, ..cfg(s) }, false, true),
        (SimConfig { write_cache_enabled: false, ..cfg(s) }, false, true),
        (SimConfig { dlfeat: 0, ..cfg(s) }, true, false),
        (SimConfig { dlfeat: 2, ..cfg(s) }, true, false),
    ] {
        let what = format!("vwc {} enabled {} dlfeat {}", sim_cfg.vwc, sim_cfg.write_cache_enabled, sim_cfg.dlfeat);
        let r = Rig::new(sim_cfg, CtrlrOpts::default(), 1);
        let props = r.bdev_props();
        assert_eq!(props.write_cache, cache, "{what}");
        assert_eq!(props.deallocated_reads_zeroes, zeroes, "{what}");
        if !cache {
            let data = pattern(4096, s + 3);
            assert_eq!(r.write(0, 8, &data), IoStatus::Success);
            assert!(r.media(8, 4096) == data, "{what}: without a cache a completed write is durable");
        }
    }
}

#[test]
fn queue_wraparound_phase_flips_reordering_and_doorbell_stride() {
    let s = seed();
    let sim_cfg = SimConfig { dstrd: 2, max_delay_steps: 3, reorder: true, ..cfg(s) };
    let opts = CtrlrOpts { io_queue_depth: 8, ..CtrlrOpts::default() };
    let r = Rig::new(sim_cfg, opts, 2);
    // 600 writes of 4 KiB from two reactors, 32 submitted at a time into
    // queues of 8 entries: the rings wrap dozens of times.
    let total = 600u64;
    let mut expect = vec![0u8; 8192 * 512];
    let mut next = 0u64;
    while next < total {
        let mut batch = Vec::new();
        for _ in 0..32.min(total - next) {
            let block = (next * 8) % 8192;
            let data = pattern(4096, next + s);
            expect[block as usize * 512..block as usize * 512 + 4096].copy_from_slice(&data);
            let on = (next % 2) as usize;
            let buf = r.m.on(on, || DmaBuf::alloc(4096).unwrap());
            buf.copy_from(0, &data);
            batch.push(r.submit(on, IoType::Write, block, 8, Some(buf)));
            next += 1;
        }
        for d in &batch {
            assert_eq!(r.wait(d), IoStatus::Success);
        }
    }
    let (st, back) = r.read(1, 0, 8192 * 512 / 2);
    assert_eq!(st, IoStatus::Success);
    assert!(back == expect[..back.len()], "data after wraparound");
    let stats = r.sim.stats();
    assert!(stats.completions > 10 * 8, "{stats:?}");
    assert_eq!(stats.bad_doorbells, 0, "doorbells honour CAP.DSTRD");
    assert_eq!(stats.dma_faults, 0);
    assert_eq!(*r.early_releases.borrow(), 0);
}

#[test]
fn prp_lists_spanning_many_pages_and_chained_lists() {
    let sim_cfg =
        SimConfig { mdts: 0, namespaces: vec![SimNamespace { num_blocks: 32768, block_size: 512 }], ..cfg(seed()) };
    let r = Rig::new(sim_cfg, CtrlrOpts::default(), 1);
    // 3 MiB aligned: PRP1 + 767 list entries, more than one list page.
    let data = pattern(3 << 20, 7);
    assert_eq!(r.write(0, 0, &data), IoStatus::Success);
    assert!(r.sim.stats().chained_prp_lists >= 1);
    assert_eq!(r.sim.stats().io_commands, 1, "one command: no split without MDTS");
    let (s, back) = r.read(0, 0, 3 << 20);
    assert_eq!(s, IoStatus::Success);
    assert!(back == data);
    // A buffer that starts 512 bytes into a page: PRP1 has an offset and the
    // transfer touches one more page; the list crosses its page boundary.
    let big = r.m.on(0, || DmaBuf::zeroed(4 << 20).unwrap());
    let slice = big.slice(512, (2 << 20) + 8192);
    let d = r.submit(0, IoType::Read, 0, slice.len() as u64 / 512, Some(slice.clone()));
    assert_eq!(r.wait(&d), IoStatus::Success);
    assert!(slice.to_vec() == data[..slice.len()]);
    assert!(big.to_vec()[..512].iter().all(|&b| b == 0), "nothing written before the slice");
    assert!(r.sim.stats().chained_prp_lists >= 3);
    assert_eq!(r.sim.stats().dma_faults, 0);
    assert_eq!(*r.early_releases.borrow(), 0);
}

#[test]
fn mdts_splits_large_io() {
    let sim_cfg = SimConfig { mdts: 1, max_delay_steps: 2, reorder: true, ..cfg(seed()) };
    let r = Rig::new(sim_cfg, CtrlrOpts::default(), 1);
    assert_eq!(r.ctrlr().namespaces()[0].max_io_blocks, 16, "8 KiB MDTS at 512 B blocks");
    let data = pattern(64 * 1024 + 1024, 3);
    assert_eq!(r.write(0, 10, &data), IoStatus::Success);
    let st = r.sim.stats();
    assert_eq!(st.io_commands, 9, "66 KiB in 8 KiB pieces");
    assert_eq!(st.max_transfer_bytes, 8192);
    let (s, back) = r.read(0, 10, data.len());
    assert_eq!(s, IoStatus::Success);
    assert!(back == data);
    // Write zeroes of more than 65536 blocks splits on the NLB field.
    let sim2 = SimConfig { namespaces: vec![SimNamespace { num_blocks: 200_000, block_size: 512 }], ..cfg(seed()) };
    let r2 = Rig::new(sim2, CtrlrOpts::default(), 1);
    let d = r2.submit(0, IoType::WriteZeroes, 0, 150_000, None);
    assert_eq!(r2.wait(&d), IoStatus::Success);
    assert_eq!(r2.sim.stats().io_commands, 3);
}

#[test]
fn sgl_data_blocks_when_the_controller_has_them() {
    let sim_cfg = SimConfig { sgl: true, mdts: 0, ..cfg(seed()) };
    let r = Rig::new(sim_cfg, CtrlrOpts { prefer_sgl: true, ..CtrlrOpts::default() }, 1);
    let data = pattern(1 << 20, 9);
    assert_eq!(r.write(0, 0, &data), IoStatus::Success);
    let (s, back) = r.read(0, 0, 1 << 20);
    assert_eq!(s, IoStatus::Success);
    assert!(back == data);
    assert_eq!(r.sim.stats().sgl_commands, 2);
}

#[test]
fn timeout_then_abort_then_reset_with_io_retried() {
    let opts = CtrlrOpts { io_timeout_us: 2_000, ..CtrlrOpts::default() };
    let r = Rig::new(cfg(seed()), opts, 2);
    let before = pattern(8192, 11);
    assert_eq!(r.write(1, 64, &before), IoStatus::Success);
    // The controller swallows the next IO and refuses to abort it.
    r.sim.swallow_next_io(1);
    r.sim.set_abort_works(false);
    let data = pattern(8192, 12);
    assert_eq!(r.write(1, 64, &data), IoStatus::Success, "retried after the reset");
    let c = r.ctrlr();
    assert_eq!(c.stats.resets.load(Ordering::Relaxed), 1);
    assert!(c.stats.aborts_sent.load(Ordering::Relaxed) >= 1);
    assert!(c.stats.retries.load(Ordering::Relaxed) >= 1);
    let st = r.sim.stats();
    assert_eq!(st.resets, 1);
    assert!(st.aborts_refused >= 1);
    let (s, back) = r.read(0, 64, 8192);
    assert_eq!(s, IoStatus::Success);
    assert!(back == data, "data verified after reset");
    assert_eq!(c.state(), nvme::CtrlrState::Enabled);
    assert_eq!(*r.early_releases.borrow(), 0);
    assert_eq!(c.stats.leaked_bytes.load(Ordering::Relaxed), 0);
}

#[test]
fn timeout_then_abort_retries_without_reset() {
    let opts = CtrlrOpts { io_timeout_us: 2_000, ..CtrlrOpts::default() };
    let r = Rig::new(cfg(seed()), opts, 1);
    r.sim.swallow_next_io(1);
    let data = pattern(4096, 13);
    assert_eq!(r.write(0, 0, &data), IoStatus::Success);
    let c = r.ctrlr();
    assert_eq!(c.stats.resets.load(Ordering::Relaxed), 0);
    assert_eq!(r.sim.stats().aborts_performed, 1);
    let (_, back) = r.read(0, 0, 4096);
    assert!(back == data);
}

#[test]
fn controller_that_never_becomes_ready_fails_cleanly() {
    let m = ReactorSet::manual(1);
    let sim = SimController::new(SimConfig { fail_ready: true, timeout_500ms: 1, ..cfg(seed()) }).unwrap();
    let err = attach(&m, "Nvme9", &sim, CtrlrOpts::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("did not become ready within 500 ms"), "{msg}");
    assert_eq!(m.on(0, nvme::reactor_blocking_waits), 0, "the bring-up waited by polling");
    assert_eq!(err.errno(), libc::ETIMEDOUT);
    assert!(!sim.is_enabled(), "left disabled");
    // Nothing leaked: the admin queue memory went back to the pool (the
    // pool hands it out again), no poller is left, no bdev, no controller.
    let (asq, acq) = sim.last_admin_queues();
    assert!(asq != 0 && acq != 0);
    m.on(0, || {
        let a = DmaBuf::alloc(4096).unwrap();
        let b = DmaBuf::alloc(4096).unwrap();
        let mut got = [a.iova(), b.iova()];
        got.sort_unstable();
        let mut want = [asq, acq];
        want.sort_unstable();
        assert_eq!(got, want, "admin queue buffers returned to the DMA pool");
        assert!(reactor::poller_names().iter().all(|n| !n.starts_with("nvme")));
        assert!(Registry::get().list().is_empty());
        assert!(nvme::Controllers::get().list().is_empty());
    });
    m.run_until_idle(10);
}

#[test]
fn detach_with_io_in_flight() {
    let sim_cfg = SimConfig { max_delay_steps: 20, reorder: true, ..cfg(seed()) };
    let r = Rig::new(sim_cfg, CtrlrOpts::default(), 2);
    let mut ios = Vec::new();
    for i in 0..64u64 {
        let on = (i % 2) as usize;
        let buf = r.m.on(on, || DmaBuf::alloc(8192).unwrap());
        buf.copy_from(0, &pattern(8192, i));
        ios.push(r.submit(on, IoType::Write, i * 16, 16, Some(buf)));
    }
    // The queue pairs' queues are made by the home reactor first.
    assert!(r.run_until(1000, || r.sim.inflight_count() > 0), "IO is in flight when detach starts");
    let res = r.detach();
    assert_eq!(*res.borrow(), Some(Ok(())));
    for d in &ios {
        let s = d.borrow().expect("every IO completed");
        assert!(matches!(s, IoStatus::Success | IoStatus::Failed(IoError::Aborted)), "{s:?}");
    }
    assert_eq!(*r.early_releases.borrow(), 0, "no buffer released while the controller held it");
    assert!(r.sim.shutdown_complete(), "CC.SHN shutdown completed");
    assert_eq!(r.sim.io_queue_count(), 0, "IO queues deleted before their memory went");
    assert!(r.nvme_pollers().is_empty(), "{:?}", r.nvme_pollers());
    r.m.on(0, || assert!(Registry::get().lookup("Nvme0n1").is_none()));
}

#[test]
fn detach_while_the_device_hangs_aborts_io_after_disable() {
    let opts = CtrlrOpts { io_timeout_us: 2_000, ..CtrlrOpts::default() };
    let r = Rig::new(cfg(seed()), opts, 2);
    // Make the queue pairs exist, then let the device swallow everything.
    assert_eq!(r.write(1, 0, &pattern(512, 1)), IoStatus::Success);
    r.sim.swallow_next_io(1000);
    r.sim.set_abort_works(false);
    let mut ios = Vec::new();
    for i in 0..16u64 {
        let buf = r.m.on(1, || DmaBuf::alloc(4096).unwrap());
        ios.push(r.submit(1, IoType::Write, i * 8, 8, Some(buf)));
    }
    r.round();
    let res = r.detach();
    assert_eq!(*res.borrow(), Some(Ok(())));
    for d in &ios {
        assert_eq!(d.borrow().unwrap(), IoStatus::Failed(IoError::Aborted));
    }
    assert_eq!(*r.early_releases.borrow(), 0);
    assert_eq!(r.sim.inflight_count(), 0, "the disable dropped the swallowed commands");
    assert!(r.nvme_pollers().is_empty());
    let c_stats_resets = r.sim.stats().resets;
    assert_eq!(c_stats_resets, 1);
}

#[test]
fn injected_media_errors_reach_the_caller() {
    let r = Rig::new(SimConfig { error_one_in: 3, ..cfg(seed()) }, CtrlrOpts::default(), 1);
    let mut failed = 0;
    for i in 0..60u64 {
        let (s, _) = r.read(0, i * 8, 4096);
        match s {
            IoStatus::Success => {}
            IoStatus::Failed(IoError::Media) => failed += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(failed, r.sim.stats().injected_errors);
    assert!(failed > 5 && failed < 40, "{failed}");
}

#[test]
fn controller_that_cannot_be_disabled_is_cut_off_before_io_is_released() {
    let opts = CtrlrOpts { io_timeout_us: 2_000, ..CtrlrOpts::default() };
    let r = Rig::new(SimConfig { timeout_500ms: 1, ..cfg(seed()) }, opts, 2);
    assert_eq!(r.write(1, 0, &pattern(4096, 5)), IoStatus::Success);
    assert_eq!(r.write(0, 8, &pattern(4096, 6)), IoStatus::Success);
    assert_eq!(r.sim.io_queue_count(), 2, "one IO queue pair per reactor");
    r.sim.swallow_next_io(1);
    r.sim.set_abort_works(false);
    r.sim.set_ignore_disable(true);
    let buf = r.m.on(1, || DmaBuf::alloc(4096).unwrap());
    let d = r.submit(1, IoType::Write, 0, 8, Some(buf));
    // Reset: the disable times out, bus mastering goes off, and only then
    // does the IO fail back to its submitter.
    assert_eq!(r.wait(&d), IoStatus::Failed(IoError::Aborted));
    assert_eq!(*r.early_releases.borrow(), 0);
    let c = r.ctrlr();
    assert!(r.run_until(1000, || c.state() == nvme::CtrlrState::Failed));
    assert!(c.dma_stopped());
    // New IO fails at once on a failed controller.
    let (s, _) = r.read(0, 0, 4096);
    assert_eq!(s, IoStatus::Failed(IoError::NoDevice));
    assert_eq!(*r.detach().borrow(), Some(Ok(())));
    assert!(r.nvme_pollers().is_empty());
}

/// Seeded random IO (all types, sizes across MDTS splits, two reactors)
/// with delays, reordering, swallowed commands (so aborts and resets),
/// checked against a plain byte model of the namespace.
#[test]
fn randomized_io_against_a_model() {
    let s = seed();
    let mut rng = bdev::rng::SimRng::new(s);
    let blocks = 4096u64;
    let sim_cfg = SimConfig {
        mdts: 2,
        max_delay_steps: 4,
        reorder: true,
        namespaces: vec![SimNamespace { num_blocks: blocks, block_size: 512 }],
        ..cfg(s)
    };
    let opts = CtrlrOpts { io_queue_depth: 16, io_timeout_us: 3_000, ..CtrlrOpts::default() };
    let r = Rig::new(sim_cfg, opts, 2);
    let mut model = vec![0u8; (blocks * 512) as usize];
    // What the medium must hold: FUA writes at once, the rest after a flush.
    let mut durable = model.clone();
    let mut flushes = 0u64;
    for round in 0..40u64 {
        if rng.below(4) == 0 {
            r.sim.swallow_next_io(1);
            r.sim.set_abort_works(rng.below(2) == 0);
        }
        // Disjoint ranges within a round, so the model is exact whatever
        // order the controller completes them in.
        let mut ios = Vec::new();
        let mut at = rng.below(64);
        for k in 0..8u64 {
            let n = 1 + rng.below(80);
            if at + n > blocks {
                break;
            }
            let on = (k % 2) as usize;
            let range = (at * 512) as usize..((at + n) * 512) as usize;
            let t =
                [IoType::Write, IoType::Write, IoType::Read, IoType::WriteZeroes, IoType::Unmap][rng.below(5) as usize];
            let fua = matches!(t, IoType::Write | IoType::WriteZeroes) && rng.below(3) == 0;
            let buf = match t {
                IoType::Write => {
                    let data = pattern(range.len(), round * 100 + k + s);
                    model[range.clone()].copy_from_slice(&data);
                    let b = r.m.on(on, || DmaBuf::alloc(data.len()).unwrap());
                    b.copy_from(0, &data);
                    Some(b)
                }
                IoType::Read => Some(r.m.on(on, || DmaBuf::zeroed(range.len()).unwrap())),
                _ => {
                    model[range.clone()].fill(0);
                    None
                }
            };
            if fua {
                durable[range.clone()].copy_from_slice(&model[range.clone()]);
            }
            let flags = if fua { IoFlags::FUA } else { IoFlags::NONE };
            ios.push((t, range, buf.clone(), r.submit_flags(on, t, at, n, buf, flags)));
            at += n + rng.below(200);
        }
        for (t, range, buf, d) in &ios {
            assert_eq!(r.wait(d), IoStatus::Success, "seed {s} round {round} {t:?}");
            if *t == IoType::Read {
                assert!(buf.as_ref().unwrap().to_vec() == model[range.clone()], "seed {s} round {round}: read data");
            }
        }
        let mut media = vec![0u8; model.len()];
        assert!(r.sim.read_media(1, 0, &mut media));
        assert!(media == durable, "seed {s} round {round}: the medium holds exactly the FUA and flushed writes");
        if rng.below(4) == 0 {
            let d = r.submit((round % 2) as usize, IoType::Flush, 0, 0, None);
            assert_eq!(r.wait(&d), IoStatus::Success, "seed {s} round {round}: flush");
            durable.copy_from_slice(&model);
            flushes += 1;
        }
    }
    assert_eq!(r.sim.stats().flushes, flushes, "seed {s}");
    let mut medium = vec![0u8; model.len()];
    assert!(r.sim.read_namespace(1, 0, &mut medium));
    assert!(medium == model, "seed {s}: medium differs from the model");
    let c = r.ctrlr();
    eprintln!(
        "aborts {} resets {} retries {} sim {:?}",
        c.stats.aborts_sent.load(Ordering::Relaxed),
        c.stats.resets.load(Ordering::Relaxed),
        c.stats.retries.load(Ordering::Relaxed),
        r.sim.stats()
    );
    assert_eq!(*r.early_releases.borrow(), 0);
    assert_eq!(r.sim.stats().dma_faults, 0);
}

/// Nothing on a reactor waits: queue pairs are made on four reactors (the
/// first ones while a reset is under way), the controller is reset under
/// IO from seeded reactors at seeded moments, and every IO still succeeds
/// with its data intact — while the count of busy-wait steps and contended
/// locks on the reactors (`nvme::reactor_blocking_waits`) stays 0.
#[test]
fn control_path_never_blocks_a_reactor() {
    let s = seed();
    let mut rng = bdev::rng::SimRng::new(s);
    let reactors = 4usize;
    let opts = CtrlrOpts { io_queue_depth: 16, io_timeout_us: 50_000, ..CtrlrOpts::default() };
    let r = Rig::new(SimConfig { max_delay_steps: 6, reorder: true, ..cfg(s) }, opts, reactors);
    let c = r.ctrlr();
    let mut model = vec![0u8; 8192 * 512];
    let resets = 6u64;
    for round in 0..resets {
        let mut ios = Vec::new();
        for k in 0..12u64 {
            let on = rng.below(reactors as u64) as usize;
            let (at, n) = (k * 600 + rng.below(500), 1 + rng.below(64));
            let data = pattern(n as usize * 512, s + round * 100 + k);
            model[at as usize * 512..(at + n) as usize * 512].copy_from_slice(&data);
            let buf = r.m.on(on, || DmaBuf::alloc(data.len()).unwrap());
            buf.copy_from(0, &data);
            ios.push(r.submit(on, IoType::Write, at, n, Some(buf)));
        }
        // The first reset lands before any queue pair has its queues.
        for _ in 0..rng.below(if round == 0 { 1 } else { 6 }) {
            r.round();
        }
        let from = rng.below(reactors as u64) as usize;
        let c2 = c.clone();
        r.m.on(from, move || c2.request_reset("test"));
        for d in &ios {
            assert_eq!(r.wait(d), IoStatus::Success, "seed {s} round {round}: retried across the reset");
        }
        assert!(r.run_until(10_000, || c.state() == nvme::CtrlrState::Enabled), "seed {s}");
        assert_eq!(c.stats.resets.load(Ordering::Relaxed), round + 1, "seed {s}");
    }
    for on in 0..reactors {
        let (st, back) = r.read(on, 0, model.len());
        assert_eq!(st, IoStatus::Success);
        assert!(back == model, "seed {s}: data after {resets} resets (read on reactor {on})");
    }
    assert_eq!(r.sim.io_queue_count(), reactors, "seed {s}: one IO queue pair per reactor, recreated by each reset");
    assert_eq!(r.sim.stats().resets, resets, "seed {s}");
    assert_eq!(r.m.on(0, nvme::reactor_blocking_waits), 0, "seed {s}: a reactor waited");
    assert_eq!(*r.detach().borrow(), Some(Ok(())));
    assert_eq!(r.m.on(0, nvme::reactor_blocking_waits), 0, "seed {s}: detach waited on a reactor");
    assert_eq!(*r.early_releases.borrow(), 0);
    assert_eq!(r.sim.stats().dma_faults, 0);
}

/// Asynchronous events: the driver keeps AERL + 1 requests outstanding at
/// the controller; an added namespace gets a bdev that serves IO, a resized
/// one is seen at its new size, a removed one's bdev is hot-removed, and a
/// SMART critical warning shows in bdev_nvme_get_controllers and the bdev's
/// driver_specific — also after a controller reset, which re-arms events.
#[test]
fn namespace_changes_and_health_warnings_arrive_by_asynchronous_events() {
    let s = seed();
    let r = Rig::new(cfg(s), CtrlrOpts::default(), 2);
    let c = r.ctrlr();
    assert!(r.run_until(1000, || r.sim.outstanding_aers() == 4), "AERL + 1 requests held");
    let has = |name: &str| r.m.on(0, || Registry::get().lookup(name).is_some());

    let nsid = r.sim.add_namespace(SimNamespace { num_blocks: 2048, block_size: 4096 }).unwrap();
    assert_eq!(nsid, 2);
    assert!(r.run_until(10_000, || has("Nvme0n2")), "a bdev for the new namespace");
    let props = r.m.on(0, || Registry::get().lookup("Nvme0n2").unwrap().props().clone());
    assert_eq!((props.block_size, props.num_blocks), (4096, 2048));
    let data = pattern(8192, 21);
    let buf = r.m.on(1, || DmaBuf::alloc(data.len()).unwrap());
    buf.copy_from(0, &data);
    let d = r.submit_to("Nvme0n2", 1, IoType::Write, 7, 2, Some(buf), IoFlags::NONE);
    assert_eq!(r.wait(&d), IoStatus::Success);
    let mut raw = vec![0u8; 8192];
    assert!(r.sim.read_namespace(2, 7 * 4096, &mut raw));
    assert!(raw == data, "IO on the new namespace reached it");

    r.sim.resize_namespace(1, 16_384).unwrap();
    assert!(r.run_until(10_000, || c.namespaces()[0].num_blocks == 16_384), "the resize was seen");
    assert_eq!(r.sim.stats().log_pages_read, 2, "the changed namespace list was read for each notice");

    r.sim.remove_namespace(2).unwrap();
    assert!(r.run_until(10_000, || !has("Nvme0n2")), "the removed namespace's bdev is hot-removed");
    assert!(has("Nvme0n1"));
    assert_eq!(c.namespaces().len(), 1);

    r.sim.set_critical_warning(nvme_spec::log::critical_warning::TEMPERATURE);
    assert!(r.run_until(10_000, || c.critical_warning() == 2), "the SMART log was read");
    let info = r.m.on(0, || nvme::controllers_json(Some("Nvme0")).unwrap());
    assert_eq!(info[0]["ctrlrs"][0]["critical_warning"], 2);
    let ds = r.m.on(0, || Registry::get().lookup("Nvme0n1").unwrap().bdev().driver_specific()).unwrap();
    assert_eq!(ds.1[0]["health"]["critical_warning"], 2);
    assert_eq!(r.sim.outstanding_aers(), 4, "each request is re-armed as it completes");

    // A reset ends the held requests; the driver arms them again.
    let c2 = c.clone();
    r.m.on(1, move || c2.request_reset("test"));
    assert!(r.run_until(10_000, || c.stats.resets.load(Ordering::Relaxed) == 1));
    assert!(r.run_until(1000, || r.sim.outstanding_aers() == 4), "re-armed after the reset");
    r.sim.resize_namespace(1, 12_000).unwrap();
    assert!(r.run_until(10_000, || c.namespaces()[0].num_blocks == 12_000), "events work after the reset");
    assert_eq!(c.stats.async_events.load(Ordering::Relaxed), r.sim.stats().async_events);
    assert_eq!(r.m.on(0, nvme::reactor_blocking_waits), 0);
    assert_eq!(*r.detach().borrow(), Some(Ok(())));
    assert!(r.nvme_pollers().is_empty());
}

/// 32 writes from both reactors, some in flight and some queued (`at`
/// names the event they meet), and a flag the bdev's removal listeners set.
fn writes_in_flight(r: &Rig, at: &str) -> (Vec<Done>, Arc<std::sync::atomic::AtomicBool>) {
    let told = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t2 = told.clone();
    r.m.on(0, || Registry::get().lookup("Nvme0n1").unwrap().on_remove(move || t2.store(true, Ordering::Relaxed)));
    let mut ios = Vec::new();
    for i in 0..32u64 {
        let on = (i % 2) as usize;
        let buf = r.m.on(on, || DmaBuf::alloc(4096).unwrap());
        ios.push(r.submit(on, IoType::Write, i * 8, 8, Some(buf)));
    }
    assert!(r.run_until(1000, || r.sim.inflight_count() > 0));
    assert!(ios.iter().any(|d| d.borrow().is_none()), "IO in flight and queued at the {at}");
    (ios, told)
}

/// Surprise removal mid-IO: the admin poller notices the all-ones CSTS
/// within its 10 ms check period, every IO in flight or queued completes
/// with `NoDevice`, the bdev is hot-removed (its removal listeners told),
/// and from the detecting read on nothing touches the device's registers.
#[test]
fn surprise_removal_fails_io_and_hot_removes_the_bdev() {
    let s = seed();
    let opts = CtrlrOpts { io_queue_depth: 8, ..CtrlrOpts::default() };
    let r = Rig::new(SimConfig { max_delay_steps: 40, ..cfg(s) }, opts, 2);
    let c = r.ctrlr();
    assert_eq!(r.write(0, 0, &pattern(512, 1)), IoStatus::Success);
    assert_eq!(r.write(1, 8, &pattern(512, 2)), IoStatus::Success);
    let (ios, told) = writes_in_flight(&r, "removal");
    r.sim.surprise_remove();
    let t0 = r.m.now_ns();
    assert!(r.run_until(1000, || c.is_removed()), "the removal was noticed");
    let waited = r.m.now_ns() - t0;
    assert!(waited <= 10_000_000 + STEP_NS, "noticed after {waited} ns");
    let touched = r.sim.accesses_after_removal();
    assert_eq!(touched, 1, "only the CSTS read that noticed it");
    assert!(r.run_until(1000, || ios.iter().all(|d| d.borrow().is_some())));
    for d in &ios {
        let st = d.borrow().unwrap();
        assert!(matches!(st, IoStatus::Success | IoStatus::Failed(IoError::NoDevice)), "{st:?}");
    }
    assert!(ios.iter().any(|d| d.borrow().unwrap() == IoStatus::Failed(IoError::NoDevice)));
    assert!(r.run_until(1000, || r.m.on(0, || Registry::get().lookup("Nvme0n1").is_none())), "bdev hot-removed");
    assert!(told.load(Ordering::Relaxed), "the bdev's removal listeners were told");
    assert!(r.run_until(1000, || r.nvme_pollers().is_empty()), "{:?}", r.nvme_pollers());
    assert!(r.m.on(0, || nvme::controllers_json(Some("Nvme0"))).is_err(), "controller detached");
    assert_eq!(c.state(), nvme::CtrlrState::Detached);
    r.m.run_until_idle(1000);
    assert_eq!(r.sim.accesses_after_removal(), touched, "nothing touched the removed device");
    assert_eq!(*r.early_releases.borrow(), 0);
    assert_eq!(r.sim.stats().dma_faults, 0);
    assert_eq!(r.m.on(0, nvme::reactor_blocking_waits), 0);
}

/// A reset that cannot bring the controller back (it never becomes ready
/// again) fails the IO it held instead of leaving it pending, and new IO
/// fails at once; detach still works.
#[test]
fn reset_that_cannot_recover_fails_io() {
    let opts = CtrlrOpts { io_timeout_us: 2_000, ..CtrlrOpts::default() };
    let r = Rig::new(SimConfig { timeout_500ms: 1, ..cfg(seed()) }, opts, 2);
    assert_eq!(r.write(1, 0, &pattern(4096, 7)), IoStatus::Success);
    r.sim.swallow_next_io(1);
    r.sim.set_abort_works(false);
    r.sim.set_fail_ready(true);
    let mut ios = Vec::new();
    for i in 0..8u64 {
        let buf = r.m.on(1, || DmaBuf::alloc(4096).unwrap());
        ios.push(r.submit(1, IoType::Write, i * 8, 8, Some(buf)));
    }
    for d in &ios {
        let s = r.wait(d);
        assert!(matches!(s, IoStatus::Success | IoStatus::Failed(IoError::Aborted)), "{s:?}");
    }
    assert!(ios.iter().any(|d| d.borrow().unwrap() == IoStatus::Failed(IoError::Aborted)));
    let c = r.ctrlr();
    assert!(r.run_until(10_000, || c.state() == nvme::CtrlrState::Failed));
    assert!(!r.sim.is_enabled(), "left disabled");
    assert!(c.dma_stopped());
    let (s, _) = r.read(1, 0, 4096);
    assert_eq!(s, IoStatus::Failed(IoError::NoDevice), "new IO fails at once");
    assert_eq!(*r.early_releases.borrow(), 0);
    assert_eq!(r.m.on(0, nvme::reactor_blocking_waits), 0);
    assert_eq!(*r.detach().borrow(), Some(Ok(())));
    assert!(r.nvme_pollers().is_empty());
}

/// A namespace resized at the controller resizes its bdev: the holder's
/// listener hears of each change, IO past the old end is accepted after a
/// grow, and after a shrink IO past the new end fails out of range in the
/// bdev layer (the bdev follows a shrink even while held: the media is
/// smaller whatever the holder wants).
#[test]
fn a_resized_namespace_resizes_its_bdev_and_tells_its_holders() {
    let s = seed();
    let r = Rig::new(cfg(s), CtrlrOpts::default(), 2);
    let c = r.ctrlr();
    assert!(r.run_until(1000, || r.sim.outstanding_aers() == 4), "AERL + 1 requests held");
    let blocks = || r.m.on(0, || Registry::get().lookup("Nvme0n1").unwrap().num_blocks());
    let start = blocks();
    assert_eq!(start, c.namespaces()[0].num_blocks);
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h2 = heard.clone();
    r.m.on(0, move || {
        Registry::get().lookup("Nvme0n1").unwrap().on_event(move |ev| h2.lock().unwrap().push(ev));
    });
    let past_old_end = || {
        let buf = r.m.on(1, || DmaBuf::alloc(512).unwrap());
        r.wait(&r.submit(1, IoType::Write, start + 10, 1, Some(buf)))
    };
    assert_eq!(past_old_end(), IoStatus::Failed(IoError::OutOfRange), "seed {s}: beyond the end at first");

    r.sim.resize_namespace(1, start * 2).unwrap();
    assert!(r.run_until(10_000, || blocks() == start * 2), "seed {s}: the bdev grew with its namespace");
    assert_eq!(
        heard.lock().unwrap().as_slice(),
        [bdev::BdevEvent::Resize { old_blocks: start, new_blocks: start * 2 }],
        "seed {s}: the holder heard of the grow"
    );
    assert_eq!(past_old_end(), IoStatus::Success, "seed {s}: blocks past the old end serve IO");
    let info = r.m.on(0, || Registry::get().lookup("Nvme0n1").unwrap().info_json());
    assert_eq!(info["num_blocks"], start * 2, "bdev_get_bdevs shows the new size");

    r.sim.resize_namespace(1, start / 2).unwrap();
    assert!(r.run_until(10_000, || blocks() == start / 2), "seed {s}: the bdev shrank with its namespace");
    assert_eq!(heard.lock().unwrap().len(), 2, "seed {s}: the holder heard of the shrink");
    assert_eq!(past_old_end(), IoStatus::Failed(IoError::OutOfRange), "seed {s}: past the new end");
    assert_eq!(r.m.on(0, nvme::reactor_blocking_waits), 0);
    assert_eq!(*r.detach().borrow(), Some(Ok(())));
}

/// Removal on request, as a hot-unplug of a device under VFIO goes: the
/// platform asks for the device back and waits while the device still
/// answers. The admin poller sees the request within its 10 ms check
/// period; every IO in flight or queued completes (success or `NoDevice`),
/// the bdev is hot-removed, and the device is released — after which
/// nothing touches it — so the platform can finish the unplug.
#[test]
fn removal_request_fails_io_releases_the_device_and_hot_removes_the_bdev() {
    let s = seed();
    let opts = CtrlrOpts { io_queue_depth: 8, ..CtrlrOpts::default() };
    let r = Rig::new(SimConfig { max_delay_steps: 40, ..cfg(s) }, opts, 2);
    let c = r.ctrlr();
    assert_eq!(r.write(0, 0, &pattern(512, 1)), IoStatus::Success);
    let (ios, told) = writes_in_flight(&r, "request");
    r.sim.request_removal();
    let t0 = r.m.now_ns();
    assert!(r.run_until(1000, || c.is_removed()), "the request was noticed");
    let waited = r.m.now_ns() - t0;
    assert!(waited <= 10_000_000 + STEP_NS, "noticed after {waited} ns");
    assert!(r.run_until(1000, || ios.iter().all(|d| d.borrow().is_some())));
    for d in &ios {
        let st = d.borrow().unwrap();
        assert!(matches!(st, IoStatus::Success | IoStatus::Failed(IoError::NoDevice)), "{st:?}");
    }
    assert!(r.run_until(1000, || r.sim.is_released()), "the device was released");
    assert!(r.run_until(1000, || r.m.on(0, || Registry::get().lookup("Nvme0n1").is_none())), "bdev hot-removed");
    assert!(told.load(Ordering::Relaxed), "the bdev's removal listeners were told");
    assert!(r.run_until(1000, || r.nvme_pollers().is_empty()), "{:?}", r.nvme_pollers());
    assert_eq!(c.state(), nvme::CtrlrState::Detached);
    r.m.run_until_idle(1000);
    assert_eq!(r.sim.accesses_after_removal(), 0, "nothing touched the device after its release");
    assert_eq!(*r.early_releases.borrow(), 0);
    assert_eq!(r.sim.stats().dma_faults, 0);
    assert_eq!(r.m.on(0, nvme::reactor_blocking_waits), 0);
}

/// SGLs whenever the controller reports them (any alignment, or dword
/// granularity), PRPs when it does not or when `prefer_sgl` is off; the
/// data is right either way (a buffer that does not start on a page too).
#[test]
fn sgl_whenever_supported_prp_otherwise_and_selectable() {
    for (sgl, dword, prefer, want_sgl) in
        [(true, false, true, true), (true, true, true, true), (false, false, true, false), (true, false, false, false)]
    {
        let sim_cfg = SimConfig { sgl, sgl_dword_granular: dword, ..cfg(seed()) };
        // The default prefers SGLs.
        let opts = if prefer { CtrlrOpts::default() } else { CtrlrOpts { prefer_sgl: false, ..CtrlrOpts::default() } };
        let r = Rig::new(sim_cfg, opts, 1);
        assert_eq!(r.ctrlr().uses_sgl(), want_sgl, "sgl {sgl} dword {dword} prefer {prefer}");
        let data = pattern(3 * 4096, 21);
        let buf = r.m.on(0, || DmaBuf::zeroed(4 * 4096).unwrap()).slice(512, data.len());
        buf.copy_from(0, &data);
        let d = r.submit(0, IoType::Write, 40, data.len() as u64 / 512, Some(buf));
        assert_eq!(r.wait(&d), IoStatus::Success);
        let (s, back) = r.read(0, 40, data.len());
        assert_eq!(s, IoStatus::Success);
        assert!(back == data);
        let st = r.sim.stats();
        assert_eq!(st.sgl_commands, if want_sgl { 2 } else { 0 });
        assert_eq!(st.dma_faults, 0);
    }
}
