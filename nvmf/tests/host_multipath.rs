//! The initiator's multipath (`multipath: "multipath"`) against nvraid's
//! own target with two listeners on one ANA-reporting subsystem: one bdev
//! over two controllers, IO sent by the paths' ANA states (read at connect
//! and on every ANA change notice) and the bdev's policy.
//!
//! - active-passive: IO goes on the first optimized path; when the target
//!   makes it non-optimized or inaccessible, IO moves to the other path
//!   while verified writes and reads run, and none fails (an IO that meets
//!   the inaccessible path before the host read the new log ends with an
//!   ANA status and is sent again on the other path);
//! - active-active, round robin and queue depth: IO is spread over both
//!   optimized paths, and over the optimized one alone when the other is
//!   only non-optimized;
//! - a namespace lost on every path: IO fails with the ANA status;
//! - while a path reconnects, IO goes on the other one;
//! - per-path state in `bdev_nvme_get_controllers` and in the bdev's
//!   `driver_specific` (SPDK's `ns_data.ana_state`).

mod common;
use bdev::malloc::MallocBdev;
use bdev::{BdevProps, DmaBuf, IoBox, IoError, IoFlags, IoStatus, IoType, Registry};
use common::*;
use nvmf::host::{
    add_multipath_path, attach_controller_with, controllers_json, detach_controller, multipath_policies_config,
    reset_controller, set_multipath_policy, AttachParams, Policy, ReconnectOpts, Selector,
};
use nvmf::{AnaState, ListenAddr, NvmfState, SubsystemParams, TransportOpts};
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use serde_json::{json, Value};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const BS: u32 = 512;
const BLOCKS: u64 = 4096;
const T: Duration = Duration::from_secs(20);

/// The target: one malloc namespace (ANA group 1) behind two listeners.
struct Paths {
    t: Target,
    port_b: u16,
}

fn start_target() -> Paths {
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0, 1], IdlePolicy::sleep()) };
    let set = ReactorSet::start(cfg, || {}).unwrap();
    let (port, port_b) = (free_port(), free_port());
    set.call(0, move || {
        let m = MallocBdev::new(BdevProps::new("Malloc0", "Malloc disk", BS, BLOCKS, None)).unwrap();
        Registry::get().register(Arc::new(m)).unwrap();
        let st = NvmfState::get();
        st.create_transport(TransportOpts::default()).unwrap();
        let mut p = SubsystemParams::new(NQN);
        p.allow_any_host = true;
        p.ana_reporting = true;
        st.create_subsystem(p).unwrap();
        assert_eq!(st.add_ns(NQN, "Malloc0", 0, None, None).unwrap(), 1);
        st.add_listener(NQN, ListenAddr::new("127.0.0.1", &port.to_string())).unwrap();
        st.add_listener(NQN, ListenAddr::new("127.0.0.1", &port_b.to_string())).unwrap();
    });
    Paths { t: Target { set, port }, port_b }
}

fn set_state(t: &Target, port: u16, state: AnaState) {
    let a = ListenAddr::new("127.0.0.1", &port.to_string());
    t.set.call(0, move || NvmfState::get().set_ana_state(NQN, &a, state, 1).unwrap());
}

fn initiator() -> ReactorSet {
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0, 1], IdlePolicy::sleep()) };
    ReactorSet::start(cfg, || {}).unwrap()
}

fn params(port: u16) -> AttachParams {
    AttachParams {
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
    }
}

/// Attaches the controller by `port_a`, then `port_b` as a second path.
fn attach_both(set: &ReactorSet, port_a: u16, port_b: u16) {
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    set.send(0, move || attach_controller_with(params(port_a), ReconnectOpts::default(), move |r| tx.send(r).unwrap()));
    assert_eq!(rx.recv_timeout(T).unwrap().unwrap(), vec!["Remoten1".to_string()]);
    set.send(0, move || add_multipath_path(params(port_b), ReconnectOpts::default(), move |r| tx2.send(r).unwrap()));
    assert_eq!(rx.recv_timeout(T).unwrap().unwrap(), vec!["Remoten1".to_string()]);
}

/// Detaches the controller (every path goes with its bdev), then stops
/// the initiator.
fn detach_and_stop(set: &ReactorSet) {
    let (tx, rx) = mpsc::channel();
    set.send(0, move || detach_controller("Remote", move |r| drop(tx.send(r))));
    rx.recv_timeout(T).unwrap().unwrap();
    let t0 = Instant::now();
    while !set.call(0, || controllers_json(None).is_empty() && Registry::get().lookup("Remoten1").is_none()) {
        assert!(t0.elapsed() < T, "detach did not finish");
        std::thread::sleep(Duration::from_millis(5));
    }
    set.stop();
    set.join();
}

fn ctrlrs(set: &ReactorSet) -> Vec<Value> {
    let c = set.call(0, || controllers_json(Some("Remote")));
    c[0]["ctrlrs"].as_array().unwrap().clone()
}

/// IOs sent on each path so far (nvraid's `io_submitted`), by port.
fn per_path(set: &ReactorSet, port_a: u16) -> (u64, u64) {
    let c = ctrlrs(set);
    let of = |port: bool| {
        c.iter()
            .find(|x| (x["trid"]["trsvcid"] == json!(port_a.to_string())) == port)
            .map_or(0, |x| x["io_submitted"].as_u64().unwrap())
    };
    (of(true), of(false))
}

fn ana_of(set: &ReactorSet, port: u16) -> String {
    ctrlrs(set)
        .iter()
        .find(|x| x["trid"]["trsvcid"] == json!(port.to_string()))
        .map_or(String::new(), |x| x["ana_states"][0]["ana_state"].as_str().unwrap_or("").to_string())
}

fn wait_ana(set: &ReactorSet, port: u16, want: &str) {
    let t0 = Instant::now();
    while ana_of(set, port) != want {
        assert!(t0.elapsed() < T, "path {port} is {} in the host's view, not {want}", ana_of(set, port));
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn fill(block: u64, seq: u64) -> Vec<u8> {
    let mut v = vec![0u8; BS as usize];
    for (i, c) in v.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (seq << 20) ^ i as u64).to_le_bytes());
    }
    v
}

/// `n` IOs on reactor `r` at once, each one block: writes of `fill` or
/// reads; returns each IO's status and, for reads, its data.
fn batch(set: &ReactorSet, r: usize, ios: Vec<(u64, Option<Vec<u8>>)>) -> Vec<(IoStatus, Vec<u8>)> {
    let n = ios.len();
    let rx = set.call(r, move || {
        let (tx, rx) = mpsc::channel();
        let ch = Registry::get().lookup("Remoten1").unwrap().channel().unwrap();
        for (i, (block, data)) in ios.into_iter().enumerate() {
            let b = DmaBuf::alloc(BS as usize).unwrap();
            let t = match &data {
                Some(d) => {
                    b.copy_from(0, d);
                    IoType::Write
                }
                None => IoType::Read,
            };
            let mut io = IoBox::data(t, block, 1, Some(b)).unwrap();
            io.flags = IoFlags::NONE;
            let tx = tx.clone();
            io.set_done(Rc::new(move |io: IoBox| {
                let data = io.buf.as_ref().map(|b| b.to_vec()).unwrap_or_default();
                let _ = tx.send((i, io.status, data));
            }));
            ch.submit(io);
        }
        rx
    });
    let mut out: Vec<Option<(IoStatus, Vec<u8>)>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let (i, st, d) = rx.recv_timeout(T).expect("IO completed");
        out[i] = Some((st, d));
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Writes and reads back, in batches of 16 on both reactors, until `stop`;
/// every IO must succeed and every read return what was written. Returns
/// the IOs done.
fn verified_io(set: Arc<ReactorSet>, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut rng = Rng(seed());
        let mut seq = 0u64;
        while !stop.load(Ordering::Acquire) {
            let r = (seq % 2) as usize;
            // Distinct blocks in one batch, so each read has one writer.
            let base = rng.below(BLOCKS / 16) * 16;
            seq += 1;
            let writes: Vec<(u64, Option<Vec<u8>>)> = (0..16).map(|k| (base + k, Some(fill(base + k, seq)))).collect();
            for (k, (st, _)) in batch(&set, r, writes).into_iter().enumerate() {
                assert_eq!(st, IoStatus::Success, "write of block {} failed", base + k as u64);
            }
            let reads: Vec<(u64, Option<Vec<u8>>)> = (0..16).map(|k| (base + k, None)).collect();
            for (k, (st, data)) in batch(&set, 1 - r, reads).into_iter().enumerate() {
                assert_eq!(st, IoStatus::Success, "read of block {} failed", base + k as u64);
                assert!(data == fill(base + k as u64, seq), "block {} reads other data", base + k as u64);
            }
            done.fetch_add(32, Ordering::Relaxed);
        }
    })
}

struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(set: &Arc<ReactorSet>) -> Load {
        let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let thread = Some(verified_io(set.clone(), stop.clone(), done.clone()));
        Load { stop, done, thread }
    }

    /// Lets at least `n` more IOs run.
    fn run(&self, n: u64) {
        let until = self.done.load(Ordering::Relaxed) + n;
        let t0 = Instant::now();
        while self.done.load(Ordering::Relaxed) < until {
            assert!(!self.thread.as_ref().unwrap().is_finished(), "verified IO stopped (a check failed)");
            assert!(t0.elapsed() < T, "IO stalled");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.thread.take().unwrap().join() {
            std::panic::resume_unwind(e);
        }
    }
}

/// The IOs each path took while `f` ran.
fn during(set: &ReactorSet, port_a: u16, f: impl FnOnce()) -> (u64, u64) {
    let (a0, b0) = per_path(set, port_a);
    f();
    let (a1, b1) = per_path(set, port_a);
    println!("IOs on path a / path b: {} / {}", a1 - a0, b1 - b0);
    (a1 - a0, b1 - b0)
}

#[test]
fn active_passive_io_follows_ana_state_changes_without_an_error() {
    let p = start_target();
    let (port_a, port_b) = (p.t.port, p.port_b);
    let set = Arc::new(initiator());
    attach_both(&set, port_a, port_b);
    let c = ctrlrs(&set);
    assert_eq!(c.len(), 2, "one entry per path: {c:?}");
    assert_eq!(ana_of(&set, port_a), "optimized");
    // SPDK's shape: each path of the bdev in driver_specific.nvme.
    let d = set.call(0, || Registry::get().lookup("Remoten1").unwrap().bdev().driver_specific().unwrap().1);
    assert_eq!(d.as_array().unwrap().len(), 2, "{d}");
    assert_eq!(d[0]["ns_data"]["ana_state"], json!("optimized"), "{d}");
    assert_eq!(d[1]["trid"]["trsvcid"], json!(port_b.to_string()), "{d}");

    let load = Load::start(&set);
    // Both optimized: the first path takes every IO.
    let (a, b) = during(&set, port_a, || load.run(200));
    assert!(a > 0 && b == 0, "active-passive on the first optimized path: {a} / {b}");
    // The first path becomes non-optimized: IO moves to the optimized one.
    set_state(&p.t, port_a, AnaState::NonOptimized);
    wait_ana(&set, port_a, "non_optimized");
    let (a, b) = during(&set, port_a, || load.run(200));
    assert!(a == 0 && b > 0, "to the optimized path: {a} / {b}");
    // The second path becomes inaccessible while IO runs on it: IO moves
    // back to the first (non-optimized is better than nothing).
    let (_, b_before) = per_path(&set, port_a);
    set_state(&p.t, port_b, AnaState::Inaccessible);
    wait_ana(&set, port_b, "inaccessible");
    let (a, b) = during(&set, port_a, || load.run(200));
    assert!(a > 0 && b == 0, "to the non-optimized path: {a} / {b} (b had {b_before})");
    // Flips back and forth while IO runs: no IO fails or reads wrong data.
    for round in 0..6 {
        let (good, bad) = if round % 2 == 0 { (port_b, port_a) } else { (port_a, port_b) };
        set_state(&p.t, good, AnaState::Optimized);
        set_state(&p.t, bad, AnaState::Inaccessible);
        load.run(100);
    }
    wait_ana(&set, port_a, "optimized");
    wait_ana(&set, port_b, "inaccessible");
    let (a, b) = during(&set, port_a, || load.run(200));
    assert!(a > 0 && b == 0, "on the optimized path after the flips: {a} / {b}");
    load.finish();
    // Lost for good on every path: IO fails with the path's status (SCT
    // 3h, asymmetric access persistent loss); nothing to wait for.
    set_state(&p.t, port_a, AnaState::PersistentLoss);
    set_state(&p.t, port_b, AnaState::PersistentLoss);
    wait_ana(&set, port_a, "persistent_loss");
    wait_ana(&set, port_b, "persistent_loss");
    let r = batch(&set, 0, vec![(7, None)]);
    assert_eq!(r[0].0, IoStatus::Failed(IoError::Nvme { sct: 3, sc: 1 }));
    detach_and_stop(&set);
}

#[test]
fn active_active_spreads_io_over_the_optimized_paths() {
    let p = start_target();
    let (port_a, port_b) = (p.t.port, p.port_b);
    let set = Arc::new(initiator());
    attach_both(&set, port_a, port_b);
    let rr = Policy::ActiveActive(Selector::RoundRobin { rr_min_io: 1 });
    set.call(0, move || set_multipath_policy("Remoten1", rr)).unwrap();
    let load = Load::start(&set);
    let (a, b) = during(&set, port_a, || load.run(400));
    assert!(a * 3 > a + b && b * 3 > a + b, "round robin over both optimized paths: {a} / {b}");
    // Non-optimized paths serve only when no path is optimized.
    set_state(&p.t, port_b, AnaState::NonOptimized);
    wait_ana(&set, port_b, "non_optimized");
    let (a, b) = during(&set, port_a, || load.run(200));
    assert!(a > 0 && b == 0, "the optimized path alone: {a} / {b}");
    set_state(&p.t, port_b, AnaState::Optimized);
    wait_ana(&set, port_b, "optimized");
    set.call(0, || set_multipath_policy("Remoten1", Policy::ActiveActive(Selector::QueueDepth))).unwrap();
    let (a, b) = during(&set, port_a, || load.run(400));
    assert!(a > 0 && b > 0, "queue depth selector over both paths: {a} / {b}");
    load.finish();
    // save_config restores the policy with SPDK's call and parameters.
    let saved = set.call(0, multipath_policies_config);
    assert_eq!(
        saved,
        vec![serde_json::json!({"method": "bdev_nvme_set_multipath_policy",
            "params": {"name": "Remoten1", "policy": "active_active", "selector": "queue_depth"}})]
    );
    set.call(0, move || set_multipath_policy("Remoten1", rr)).unwrap();
    let saved = set.call(0, multipath_policies_config);
    let params = &saved[0]["params"];
    let parsed = Policy::parse(
        params["policy"].as_str().unwrap(),
        params["selector"].as_str(),
        params["rr_min_io"].as_u64().map(|n| n as u32),
    );
    assert_eq!(parsed, Ok(rr), "{params}");
    set.call(0, || set_multipath_policy("Remoten1", Policy::ActivePassive)).unwrap();
    assert!(set.call(0, multipath_policies_config).is_empty(), "the default is not written");
    assert!(set.call(0, || set_multipath_policy("Nope", Policy::ActivePassive)).is_err());
    detach_and_stop(&set);
}

/// The first path's connections are dropped and made again
/// (`bdev_nvme_reset_controller`) while verified IO runs: meanwhile IO goes
/// on the second path, and none fails.
#[test]
fn while_a_path_reconnects_io_goes_on_the_other_one_and_none_fails() {
    let p = start_target();
    let (port_a, port_b) = (p.t.port, p.port_b);
    let set = Arc::new(initiator());
    attach_both(&set, port_a, port_b);
    let load = Load::start(&set);
    load.run(100);
    let (_, b0) = per_path(&set, port_a);
    for _ in 0..3 {
        let (tx, rx) = mpsc::channel();
        set.send(0, move || reset_controller("Remote", move |r| drop(tx.send(r))));
        rx.recv_timeout(T).unwrap().unwrap();
        load.run(100);
    }
    let (_, b1) = per_path(&set, port_a);
    println!("IOs on path b while path a reconnected: {}", b1 - b0);
    assert!(b1 > b0, "the second path took IO while the first reconnected");
    load.finish();
    assert!(ctrlrs(&set).iter().all(|c| c["state"] == json!("enabled")));
    detach_and_stop(&set);
}

#[test]
fn policy_names_are_spdks_and_what_is_not_implemented_is_refused() {
    assert_eq!(Policy::parse("active_passive", None, None), Ok(Policy::ActivePassive));
    assert_eq!(
        Policy::parse("active_active", None, None),
        Ok(Policy::ActiveActive(Selector::RoundRobin { rr_min_io: 1 }))
    );
    assert_eq!(
        Policy::parse("active_active", Some("round_robin"), Some(8)),
        Ok(Policy::ActiveActive(Selector::RoundRobin { rr_min_io: 8 }))
    );
    assert_eq!(
        Policy::parse("active_active", Some("queue_depth"), None),
        Ok(Policy::ActiveActive(Selector::QueueDepth))
    );
    for (p, s, n) in [
        ("active_passive", Some("round_robin"), None),
        ("active_active", None, Some(0)),
        ("active_active", Some("queue_depth"), Some(4)),
        ("active_active", Some("least_latency"), None),
        ("round_robin", None, None),
    ] {
        assert!(Policy::parse(p, s, n).is_err(), "{p} {s:?} {n:?}");
    }
}
