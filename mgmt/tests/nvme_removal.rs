//! A RAID1 over two simulated NVMe controllers survives the surprise
//! removal of one of them mid-IO, and the removal on request (a hot-unplug
//! under VFIO: the device is asked for back and released by the driver):
//! every write completes, and the data read back through the array — and
//! on the survivor's medium — is what was written. Lives here because the layering (tidy) lets neither nvme nor
//! bdev-raid depend on the other, not even for tests.
//!
//! Seeds: `NVME_SIM_SEED=<n>` replays a run.

use bdev::{DmaBuf, IoBox, IoStatus, IoType, Registry};
use nvme::{CtrlrOpts, SimConfig, SimController, SimNamespace, Transport};
use reactor::{ManualSet, ReactorSet};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

const STEP_NS: u64 = 100_000;
const BLOCKS: u64 = 4096;

fn seed() -> u64 {
    let s = std::env::var("NVME_SIM_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5EED);
    eprintln!("simulator seed = {s} (replay with NVME_SIM_SEED={s})");
    s
}

fn round(m: &ManualSet) {
    for id in 0..m.count() {
        m.run_once(id);
    }
    m.advance_ns(STEP_NS);
}

fn run_until(m: &ManualSet, rounds: usize, cond: impl Fn() -> bool) -> bool {
    for _ in 0..rounds {
        if cond() {
            return true;
        }
        round(m);
    }
    cond()
}

fn attach(m: &ManualSet, name: &str, sim: &Arc<SimController>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = Transport::Sim(sim.clone());
    m.on(0, || nvme::attach_controller(name, t, CtrlrOpts::default(), None, move |r| tx.send(r).unwrap()));
    let got = RefCell::new(None);
    assert!(run_until(m, 100_000, || {
        if let Ok(r) = rx.try_recv() {
            *got.borrow_mut() = Some(r);
        }
        got.borrow().is_some()
    }));
    assert_eq!(got.into_inner().unwrap().unwrap(), vec![format!("{name}n1")]);
}

type Done = Rc<RefCell<Option<IoStatus>>>;

fn submit(m: &ManualSet, on: usize, t: IoType, off: u64, n: u64, buf: DmaBuf) -> Done {
    let done: Done = Rc::default();
    let d2 = done.clone();
    m.on(on, || {
        let ch = Registry::get().lookup("Raid1").unwrap().channel().unwrap();
        let mut io = IoBox::data(t, off, n, Some(buf)).unwrap();
        io.set_done(Rc::new(move |io: IoBox| *d2.borrow_mut() = Some(io.status)));
        ch.submit(io);
    });
    done
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

#[test]
fn raid1_over_two_nvme_controllers_survives_surprise_removal_of_one() {
    raid1_survives_removal_of_one(|sim| sim.surprise_remove());
}

#[test]
fn raid1_over_two_nvme_controllers_survives_removal_on_request_of_one() {
    let released = raid1_survives_removal_of_one(|sim| sim.request_removal());
    assert!(released.is_released(), "the driver let go of the device it was asked for");
    assert_eq!(released.accesses_after_removal(), 0, "nothing touched it after its release");
}

/// Runs 48 writes through the mirror, removing the first member's
/// controller with `remove` half-way; returns that controller.
fn raid1_survives_removal_of_one(remove: impl Fn(&SimController)) -> Arc<SimController> {
    let s = seed();
    let m = ReactorSet::manual(2);
    let ns = vec![SimNamespace { num_blocks: BLOCKS, block_size: 512 }];
    let sims: Vec<Arc<SimController>> = (0..2)
        .map(|i| {
            let cfg = SimConfig { seed: s + i, namespaces: ns.clone(), max_delay_steps: 10, ..SimConfig::default() };
            SimController::new(cfg).unwrap()
        })
        .collect();
    attach(&m, "NvmeA", &sims[0]);
    attach(&m, "NvmeB", &sims[1]);
    m.on(0, || {
        bdev_raid::init();
        bdev_raid::rpc::bdev_raid_create(bdev_raid::rpc::RaidCreateParams {
            name: "Raid1".into(),
            raid_level: "raid1".into(),
            base_bdevs: vec!["NvmeAn1".into(), "NvmeBn1".into()],
            strip_size_kb: None,
            uuid: None,
            superblock: Some(false),
            bitmap: None,
            bitmap_chunk_size_kb: None,
        })
        .unwrap()
    });
    let raid_blocks = m.on(0, || Registry::get().lookup("Raid1").unwrap().props().num_blocks);
    let mut model = vec![0u8; (raid_blocks * 512) as usize];
    // Writes of 4 KiB from both reactors; the removal lands mid-way.
    let mut ios = Vec::new();
    for i in 0..48u64 {
        let on = (i % 2) as usize;
        let at = (i * 8) % (raid_blocks - 8);
        let data = pattern(4096, s + i);
        model[(at * 512) as usize..(at * 512) as usize + 4096].copy_from_slice(&data);
        let buf = m.on(on, || DmaBuf::alloc(4096).unwrap());
        buf.copy_from(0, &data);
        ios.push(submit(&m, on, IoType::Write, at, 8, buf));
        if i == 24 {
            assert!(run_until(&m, 1000, || sims[0].inflight_count() > 0));
            remove(&sims[0]);
        }
        round(&m);
    }
    assert!(run_until(&m, 100_000, || ios.iter().all(|d| d.borrow().is_some())), "every write completed");
    for (i, d) in ios.iter().enumerate() {
        assert_eq!(d.borrow().unwrap(), IoStatus::Success, "seed {s}: write {i} through the degraded mirror");
    }
    assert!(run_until(&m, 100_000, || m.on(0, || Registry::get().lookup("NvmeAn1").is_none())), "member gone");
    let buf = m.on(1, || DmaBuf::zeroed(model.len()).unwrap());
    let d = submit(&m, 1, IoType::Read, 0, raid_blocks, buf.clone());
    assert!(run_until(&m, 100_000, || d.borrow().is_some()));
    assert_eq!(d.borrow().unwrap(), IoStatus::Success);
    assert!(buf.to_vec() == model, "seed {s}: the array's data survived");
    // The survivor's medium holds it too (raid1 without a superblock
    // starts at block 0 of its members).
    let mut raw = vec![0u8; model.len()];
    assert!(sims[1].read_namespace(1, 0, &mut raw));
    assert!(raw == model, "seed {s}: the surviving member's medium");
    assert_eq!(sims[0].stats().dma_faults + sims[1].stats().dma_faults, 0);
    sims[0].clone()
}
