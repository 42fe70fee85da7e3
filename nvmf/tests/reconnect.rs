//! The NVMe/TCP initiator rides out a lost connection with SPDK's
//! `ctrlr_loss_timeout_sec`, `reconnect_delay_sec` and
//! `fast_io_fail_timeout_sec`, against nvraid's own target stopped and
//! started again on the same port (each start is a new reactor set over the
//! same RAM store, so what was written survives the outage):
//!
//! - IO submitted during the outage waits, and completes once the target is
//!   back; the bdev stays registered meanwhile and the controller shows
//!   `resetting` / `reconnect_is_delayed`, then `enabled` with a new cntlid;
//! - IO whose command was on the wire when the connection died is sent
//!   again on the new connection;
//! - past `fast_io_fail_timeout_sec` waiting IO fails (in time, not
//!   before), and IO works again after the reconnect;
//! - past `ctrlr_loss_timeout_sec` the controller and its bdev are deleted
//!   and IO that waited fails;
//! - the combinations SPDK refuses are refused (EINVAL).

mod common;
use bdev::{Bdev, BdevChannel, BdevError, BdevProps, DmaBuf, IoBox, IoError, IoFlags, IoStatus, IoType, Registry};
use common::*;
use nvmf::host::{
    add_failover_path, attach_controller_with, controllers_json, detach_controller, failover_paths_config,
    reset_controller, AttachParams, ReconnectOpts,
};
use nvmf::{ListenAddr, NvmfState, SubsystemParams, TransportOpts};
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use serde_json::{json, Value};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

const BS: u32 = 512;
const BLOCKS: u64 = 2048;
const T: Duration = Duration::from_secs(30);

/// A RAM disk whose bytes outlive the target that exports it; IOs can be
/// held for a while before they are served (to have commands on the wire
/// when the target goes).
struct Store {
    data: Mutex<Vec<u8>>,
    writes: AtomicU64,
    hold_ms: AtomicU64,
}

struct RamBdev {
    props: BdevProps,
    store: Arc<Store>,
}

struct RamChannel {
    store: Arc<Store>,
}

impl Bdev for RamBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn module(&self) -> &'static str {
        "ram"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(t, IoType::Read | IoType::Write | IoType::Flush)
    }
    fn create_channel(&self) -> Result<Rc<dyn BdevChannel>, BdevError> {
        Ok(Rc::new(RamChannel { store: self.store.clone() }))
    }
}

fn serve(store: &Store, io: IoBox) {
    let off = io.offset_blocks as usize * BS as usize;
    let len = io.num_blocks as usize * BS as usize;
    let mut d = store.data.lock().unwrap();
    match io.io_type {
        IoType::Read => io.buf.as_ref().unwrap().copy_from(0, &d[off..off + len]),
        IoType::Write => {
            io.buf.as_ref().unwrap().copy_to(0, &mut d[off..off + len]);
            store.writes.fetch_add(1, Ordering::AcqRel);
        }
        _ => {}
    }
    drop(d);
    io.complete(IoStatus::Success);
}

impl BdevChannel for RamChannel {
    fn submit(&self, io: IoBox) {
        let hold = self.store.hold_ms.load(Ordering::Acquire);
        if hold == 0 {
            return serve(&self.store, io);
        }
        let store = self.store.clone();
        let mut io = Some(io);
        reactor::register_timed_poller("ram_hold", Duration::from_millis(hold), move || {
            if let Some(io) = io.take() {
                serve(&store, io);
            }
            reactor::PollStatus::Done
        });
    }
}

struct Remote {
    store: Arc<Store>,
    uuid: Uuid,
    port: u16,
}

impl Remote {
    fn new() -> Self {
        let store = Arc::new(Store {
            data: Mutex::new(vec![0; (BLOCKS * u64::from(BS)) as usize]),
            writes: AtomicU64::new(0),
            hold_ms: AtomicU64::new(0),
        });
        Remote { store, uuid: Uuid::new_v4(), port: free_port() }
    }

    /// Starts a target on the remote's port exporting its store.
    fn start(&self) -> Target {
        self.start_on(self.port)
    }

    /// Starts a target on `port` exporting the store: another path to the
    /// same namespace.
    fn start_on(&self, port: u16) -> Target {
        let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0], IdlePolicy::sleep()) };
        let set = ReactorSet::start(cfg, || {}).unwrap();
        let (store, uuid) = (self.store.clone(), self.uuid);
        let listening = set.call(0, move || {
            let b = RamBdev { props: BdevProps::new("Ram0", "RAM disk", BS, BLOCKS, Some(uuid)), store };
            Registry::get().register(Arc::new(b)).unwrap();
            let st = NvmfState::get();
            st.create_transport(TransportOpts::default()).unwrap();
            let mut p = SubsystemParams::new(NQN);
            p.allow_any_host = true;
            p.serial_number = "NVRAID0001".into();
            st.create_subsystem(p).unwrap();
            st.add_ns(NQN, "Ram0", 0, None, None).unwrap();
            st.add_listener(NQN, ListenAddr::new("127.0.0.1", &port.to_string())).map_err(|e| e.to_string())
        });
        // The previous target's listening socket may take a moment to go.
        let t0 = Instant::now();
        let mut r = listening;
        while let Err(e) = r {
            assert!(t0.elapsed() < Duration::from_secs(5), "listen again on {port}: {e}");
            std::thread::sleep(Duration::from_millis(20));
            r = set.call(0, move || {
                NvmfState::get()
                    .add_listener(NQN, ListenAddr::new("127.0.0.1", &port.to_string()))
                    .map_err(|e| e.to_string())
            });
        }
        Target { set, port }
    }

    fn bytes(&self, off: u64, n: u64) -> Vec<u8> {
        let d = self.store.data.lock().unwrap();
        d[(off * u64::from(BS)) as usize..((off + n) * u64::from(BS)) as usize].to_vec()
    }
}

fn initiator(reactors: usize) -> ReactorSet {
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new((0..reactors).collect(), IdlePolicy::sleep()) };
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

fn opts(loss: i32, delay: u32, fast: u32) -> ReconnectOpts {
    ReconnectOpts {
        ctrlr_loss_timeout_sec: loss,
        reconnect_delay_sec: delay,
        fast_io_fail_timeout_sec: fast,
        ..Default::default()
    }
}

fn attach(set: &ReactorSet, p: AttachParams, o: ReconnectOpts) -> Result<Vec<String>, BdevError> {
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        attach_controller_with(p, o, move |r| {
            let _ = tx.send(r);
        })
    });
    rx.recv_timeout(T).expect("attach answered")
}

type Done = mpsc::Receiver<(IoStatus, Instant)>;

/// Submits a write of `data` (or a read of `n` blocks when None) on reactor `r`.
fn submit(set: &ReactorSet, r: usize, off: u64, n: u64, data: Option<Vec<u8>>) -> Done {
    set.call(r, move || {
        let (tx, rx) = mpsc::channel();
        let ch = Registry::get().lookup("Remoten1").unwrap().channel().unwrap();
        let b = DmaBuf::alloc(n as usize * BS as usize).unwrap();
        let t = match &data {
            Some(d) => {
                b.copy_from(0, d);
                IoType::Write
            }
            None => IoType::Read,
        };
        let mut io = IoBox::data(t, off, n, Some(b)).unwrap();
        io.flags = IoFlags::NONE;
        io.set_done(Rc::new(move |io: IoBox| {
            let _ = tx.send((io.status, Instant::now()));
        }));
        ch.submit(io);
        rx
    })
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

fn state(set: &ReactorSet) -> Value {
    let c = set.call(0, || controllers_json(Some("Remote")));
    c.first().map_or(Value::Null, |c| c["ctrlrs"][0].clone())
}

fn wait_state(set: &ReactorSet, want: &[&str], within: Duration) -> Value {
    let t0 = Instant::now();
    loop {
        let s = state(set);
        if want.iter().any(|w| s["state"] == json!(w)) {
            return s;
        }
        assert!(t0.elapsed() < within, "state {} is not one of {want:?}", s["state"]);
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn registered(set: &ReactorSet) -> bool {
    set.call(0, || Registry::get().lookup("Remoten1").is_some())
}

/// The target goes away with a write held at its bdev (its command on the
/// wire) and IO keeps arriving on two reactors: nothing fails, the bdev
/// stays registered, the controller says it is reconnecting; when the
/// target is back on the same port every IO completes successfully after
/// the return, the held write was sent again, and the data is on the
/// remote disk. Without the resend the in-flight write fails (transient
/// transport error); without the waiting the new IOs fail (no device).
#[test]
fn io_during_an_outage_waits_and_completes_after_the_target_returns() {
    let seed = seed();
    println!("NVMF_TEST_SEED={seed}");
    let remote = Remote::new();
    let t = remote.start();
    let ini = initiator(2);
    assert_eq!(attach(&ini, params(remote.port), opts(-1, 1, 0)).unwrap(), vec!["Remoten1".to_string()]);
    let before = state(&ini);
    assert_eq!(before["state"], json!("enabled"));
    assert_eq!(before["reconnects"], json!(0));

    // A write that the target holds for long: it is on the wire when the
    // target goes.
    remote.store.hold_ms.store(1000, Ordering::Release);
    let held = pattern(seed, 8 * BS as usize);
    let held_done = submit(&ini, 0, 1000, 8, Some(held.clone()));
    std::thread::sleep(Duration::from_millis(100));
    let lost_at = Instant::now();
    drop(t);
    remote.store.hold_ms.store(0, Ordering::Release);
    let s = wait_state(&ini, &["resetting", "reconnect_is_delayed"], Duration::from_secs(5));
    println!("path lost: state {} after {:?}", s["state"], lost_at.elapsed());

    let mut waiting = Vec::new();
    for i in 0..16u64 {
        let data = pattern(seed.wrapping_add(i + 1), 4 * BS as usize);
        waiting.push((i * 8, data.clone(), submit(&ini, (i % 2) as usize, i * 8, 4, Some(data))));
    }
    let read_done = submit(&ini, 1, 1000, 8, None);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(registered(&ini), "the bdev stays registered while the controller reconnects");
    for (off, _, rx) in &waiting {
        assert!(rx.try_recv().is_err(), "IO at {off} completed during the outage");
    }
    assert!(held_done.try_recv().is_err(), "the in-flight write completed during the outage");

    let returned_at = Instant::now();
    let t = remote.start();
    for (off, data, rx) in waiting {
        let (st, at) = rx.recv_timeout(T).unwrap();
        assert_eq!(st, IoStatus::Success, "write at {off} after the return");
        assert!(at >= returned_at, "write at {off} completed before the target was back");
        assert!(remote.bytes(off, 4) == data, "write at {off} is not on the remote disk");
    }
    let (st, _) = held_done.recv_timeout(T).unwrap();
    assert_eq!(st, IoStatus::Success, "the write in flight at the loss, sent again");
    assert!(remote.bytes(1000, 8) == held, "the in-flight write is on the remote disk");
    // The read was queued behind nothing that overlaps it except the held
    // write, which the initiator sent again first.
    assert_eq!(read_done.recv_timeout(T).unwrap().0, IoStatus::Success);
    let after = wait_state(&ini, &["enabled"], Duration::from_secs(5));
    println!(
        "path back: in sync after {:?} (returned {:?} after the loss)",
        returned_at.elapsed(),
        returned_at - lost_at
    );
    assert_eq!(after["reconnects"], json!(1), "{after}");
    assert!(after["cntlid"].as_u64().is_some());

    // And the path keeps working, on both reactors.
    for r in 0..2 {
        let (st, _) = submit(&ini, r, 500, 4, None).recv_timeout(T).unwrap();
        assert_eq!(st, IoStatus::Success);
    }
    let (tx, rx) = mpsc::channel();
    ini.send(0, move || detach_controller("Remote", move |r| drop(tx.send(r))));
    rx.recv_timeout(T).unwrap().unwrap();
    drop(t);
    ini.stop();
    ini.join();
}

/// With `fast_io_fail_timeout_sec` 1, IO waiting for the lost path fails
/// with "no device" about one second after the loss (not before), new IO
/// fails at once, the bdev stays; once the target is back IO succeeds
/// again. Without the timeout the IO would wait for the return.
#[test]
fn past_fast_io_fail_timeout_waiting_io_fails_and_works_again_after_the_return() {
    let remote = Remote::new();
    let t = remote.start();
    let ini = initiator(1);
    attach(&ini, params(remote.port), opts(10, 1, 1)).unwrap();
    let lost_at = Instant::now();
    drop(t);
    wait_state(&ini, &["resetting", "reconnect_is_delayed"], Duration::from_secs(5));
    let rx = submit(&ini, 0, 0, 8, None);
    let (st, at) = rx.recv_timeout(Duration::from_secs(5)).expect("IO fails within fast_io_fail_timeout_sec");
    let after = at - lost_at;
    println!("waiting IO failed {after:?} after the loss");
    assert_eq!(st, IoStatus::Failed(IoError::NoDevice));
    assert!(after >= Duration::from_millis(950), "failed before fast_io_fail_timeout_sec: {after:?}");
    assert!(after < Duration::from_millis(2500), "failed late: {after:?}");
    let (st, at) = submit(&ini, 0, 0, 8, None).recv_timeout(T).unwrap();
    assert_eq!(st, IoStatus::Failed(IoError::NoDevice));
    assert!(at.elapsed() < Duration::from_millis(500));
    assert!(registered(&ini), "the bdev stays until ctrlr_loss_timeout_sec");

    let t = remote.start();
    wait_state(&ini, &["enabled"], Duration::from_secs(5));
    let (st, _) = submit(&ini, 0, 0, 8, None).recv_timeout(T).unwrap();
    assert_eq!(st, IoStatus::Success, "IO after the reconnect");
    let (tx, rx) = mpsc::channel();
    ini.send(0, move || detach_controller("Remote", move |r| drop(tx.send(r))));
    rx.recv_timeout(T).unwrap().unwrap();
    drop(t);
    ini.stop();
    ini.join();
}

/// With `ctrlr_loss_timeout_sec` 2 and the target gone for good: IO waits
/// (no fast_io_fail), then after about two seconds the controller is
/// deleted, its bdev unregistered, and the waiting IO fails.
#[test]
fn past_ctrlr_loss_timeout_the_controller_and_its_bdev_are_deleted() {
    let remote = Remote::new();
    let t = remote.start();
    let ini = initiator(1);
    attach(&ini, params(remote.port), opts(2, 1, 0)).unwrap();
    let lost_at = Instant::now();
    drop(t);
    wait_state(&ini, &["resetting", "reconnect_is_delayed"], Duration::from_secs(5));
    let rx = submit(&ini, 0, 0, 8, None);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(rx.try_recv().is_err(), "IO waits before ctrlr_loss_timeout_sec");
    let (st, at) = rx.recv_timeout(Duration::from_secs(6)).expect("IO fails when the controller is deleted");
    assert!(matches!(st, IoStatus::Failed(_)), "{st:?}");
    let after = at - lost_at;
    println!("controller deleted, waiting IO failed {after:?} after the loss");
    assert!(after >= Duration::from_millis(1950) && after < Duration::from_millis(4500), "{after:?}");
    let t0 = Instant::now();
    while registered(&ini) || !ini.call(0, || controllers_json(None)).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5), "controller and bdev still there");
        std::thread::sleep(Duration::from_millis(10));
    }
    ini.stop();
    ini.join();
}

/// SPDK's rules for the three parameters, refused with EINVAL before any
/// connection is made.
#[test]
fn combinations_spdk_refuses_are_refused() {
    let ini = initiator(1);
    let bad: [(ReconnectOpts, &str); 7] = [
        (opts(-2, 1, 0), "below -1"),
        (opts(0, 1, 0), "must both be 0"),
        (opts(0, 0, 1), "must both be 0"),
        (opts(-1, 0, 0), "reconnect_delay_sec must not be 0"),
        (opts(5, 6, 0), "more than ctrlr_loss_timeout_sec"),
        (opts(10, 5, 2), "more than fast_io_fail_timeout_sec"),
        (opts(10, 2, 11), "fast_io_fail_timeout_sec 11 is more than ctrlr_loss_timeout_sec"),
    ];
    for (o, want) in bad {
        let e = attach(&ini, params(1), o).expect_err("refused");
        assert_eq!(e.errno(), libc::EINVAL, "{o:?}: {e}");
        assert!(e.to_string().contains(want), "{o:?}: {e}");
    }
    for o in [opts(0, 0, 0), opts(-1, 1, 0), opts(-1, 2, 5), opts(10, 2, 10), opts(3, 3, 0)] {
        assert!(o.validate().is_ok(), "{o:?}");
    }
    ini.stop();
    ini.join();
}

/// A TCP relay in front of a target that can go silent: while frozen,
/// bytes on the connections it carries are swallowed (no FIN, no RST: a
/// path that stopped answering) and new connections are closed at once;
/// connections from before a freeze stay silent for good.
struct Relay {
    port: u16,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    epoch: Arc<AtomicU64>,
}

impl Relay {
    fn start(to: u16) -> Relay {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let epoch = Arc::new(AtomicU64::new(0));
        let (f, e) = (frozen.clone(), epoch.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                if f.load(Ordering::Acquire) {
                    continue;
                }
                let Ok(up) = std::net::TcpStream::connect(("127.0.0.1", to)) else { continue };
                let mine = e.load(Ordering::Acquire);
                for (mut from, mut into) in [(c.try_clone().unwrap(), up.try_clone().unwrap()), (up, c)] {
                    let (f, e) = (f.clone(), e.clone());
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = vec![0u8; 65536];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if f.load(Ordering::Acquire) || e.load(Ordering::Acquire) != mine {
                                continue;
                            }
                            if into.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Relay { port, frozen, epoch }
    }

    fn freeze(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.frozen.store(true, Ordering::Release);
    }

    fn thaw(&self) {
        self.frozen.store(false, Ordering::Release);
    }
}

/// A path that goes silent without closing (the relay swallows every
/// byte): the Keep Alive that goes unanswered for KATO (1 s here) counts
/// as the loss, the controller reconnects once the path answers again, and
/// the IO sent into the silence completes after that. Without the Keep
/// Alive timeout the controller stays `enabled` and the IO hangs.
#[test]
fn a_silent_path_is_lost_after_kato_and_its_io_completes_after_the_reconnect() {
    let remote = Remote::new();
    let t = remote.start();
    let relay = Relay::start(remote.port);
    let ini = initiator(1);
    let o = ReconnectOpts { keep_alive_timeout_ms: 1000, ..opts(-1, 1, 0) };
    attach(&ini, params(relay.port), o).unwrap();
    let (st, _) = submit(&ini, 0, 0, 8, None).recv_timeout(T).unwrap();
    assert_eq!(st, IoStatus::Success);

    let silent_at = Instant::now();
    relay.freeze();
    let data = pattern(7, 8 * BS as usize);
    let rx = submit(&ini, 0, 64, 8, Some(data.clone()));
    wait_state(&ini, &["resetting", "reconnect_is_delayed"], Duration::from_secs(5));
    let seen = silent_at.elapsed();
    println!("silent path counted lost after {seen:?} (KATO 1 s)");
    assert!(seen >= Duration::from_millis(900), "lost before KATO passed: {seen:?}");
    assert!(rx.try_recv().is_err(), "the IO sent into the silence waits");
    relay.thaw();
    let (st, _) = rx.recv_timeout(T).unwrap();
    assert_eq!(st, IoStatus::Success);
    assert!(remote.bytes(64, 8) == data);
    wait_state(&ini, &["enabled"], Duration::from_secs(5));
    let (tx, done) = mpsc::channel();
    ini.send(0, move || detach_controller("Remote", move |r| drop(tx.send(r))));
    done.recv_timeout(T).unwrap().unwrap();
    drop(t);
    ini.stop();
    ini.join();
}

fn add_path(set: &ReactorSet, p: AttachParams) -> Result<Vec<String>, BdevError> {
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        add_failover_path(p, move |r| {
            let _ = tx.send(r);
        })
    });
    rx.recv_timeout(T).expect("add path answered")
}

/// `multipath: "failover"` with SPDK's defaults otherwise (no reconnect):
/// a second path to the same subsystem is checked (same namespaces) and
/// listed as an alternate; SPDK's refusals (the same path again, another
/// subsystem NQN) hold. When the target of the path in use goes, IO sent
/// then waits and completes on the other path within the failover, with no
/// reconnect delay; the paths swap in `bdev_nvme_get_controllers`. When the
/// second target goes too, IO fails (no path answers). Without failover
/// (a single path) the same loss fails the IO at once.
#[test]
fn failover_moves_io_to_the_alternate_path_when_the_active_one_is_lost() {
    let remote = Remote::new();
    let t1 = remote.start();
    let port2 = free_port();
    let t2 = remote.start_on(port2);
    let ini = initiator(2);
    attach(&ini, params(remote.port), opts(0, 0, 0)).unwrap();
    assert_eq!(add_path(&ini, params(port2)).unwrap(), Vec::<String>::new(), "no new bdevs: a path");
    let e = add_path(&ini, params(port2)).expect_err("the same path twice");
    assert_eq!(e.errno(), libc::EALREADY, "{e}");
    assert!(e.to_string().contains("already exists with the specified network path"), "{e}");
    let mut other = params(port2 + 1);
    other.subnqn = "nqn.2016-06.io.nvraid:other".into();
    let e = add_path(&ini, other).expect_err("another subsystem");
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    let s = state(&ini);
    assert_eq!(s["trid"]["trsvcid"], json!(remote.port.to_string()), "{s}");
    assert_eq!(s["alternate_trids"][0]["trsvcid"], json!(port2.to_string()), "{s}");
    // save_config: the controller's own attach recreates the first path;
    // the alternate one follows as a failover attach of the same name.
    let saved = ini.call(0, failover_paths_config);
    assert_eq!(saved.len(), 1, "{saved:?}");
    let p = &saved[0]["params"];
    assert_eq!(saved[0]["method"], json!("bdev_nvme_attach_controller"));
    assert_eq!((&p["name"], &p["multipath"]), (&json!("Remote"), &json!("failover")), "{p}");
    assert_eq!(p["trsvcid"], json!(port2.to_string()), "{p}");

    let data = pattern(11, 8 * BS as usize);
    let lost_at = Instant::now();
    drop(t1);
    let rx = submit(&ini, 1, 200, 8, Some(data.clone()));
    let (st, at) = rx.recv_timeout(T).unwrap();
    assert_eq!(st, IoStatus::Success, "IO after the loss goes over the other path");
    assert!(remote.bytes(200, 8) == data);
    let s = wait_state(&ini, &["enabled"], Duration::from_secs(5));
    println!("failover: IO sent at the loss completed {:?} after it", at - lost_at);
    assert!(at - lost_at < Duration::from_secs(2), "no reconnect delay on failover: {:?}", at - lost_at);
    assert_eq!(s["trid"]["trsvcid"], json!(port2.to_string()), "{s}");
    assert_eq!(s["alternate_trids"][0]["trsvcid"], json!(remote.port.to_string()), "{s}");
    for r in 0..2 {
        assert_eq!(submit(&ini, r, 0, 8, None).recv_timeout(T).unwrap().0, IoStatus::Success);
    }

    // The second path goes too, and the first is still gone: no path.
    drop(t2);
    let (st, _) = submit(&ini, 0, 0, 8, None).recv_timeout(T).unwrap();
    assert!(matches!(st, IoStatus::Failed(_)), "{st:?}");
    wait_state(&ini, &["failed"], Duration::from_secs(5));
    let (tx, rx) = mpsc::channel();
    ini.send(0, move || detach_controller("Remote", move |r| drop(tx.send(r))));
    rx.recv_timeout(T).unwrap().unwrap();
    ini.stop();
    ini.join();
}

fn reset(set: &ReactorSet) -> Result<(), BdevError> {
    let (tx, rx) = mpsc::channel();
    set.send(0, move || reset_controller("Remote", move |r| drop(tx.send(r))));
    rx.recv_timeout(T).expect("reset answered")
}

/// `bdev_nvme_reset_controller` on a TCP controller with SPDK's defaults
/// (no reconnect): the connections are dropped and made again (a new
/// controller ID on the target), IO submitted around the reset completes,
/// and the reset answers Ok; with the target gone the reset answers an
/// error and the controller is failed; a reset with the target back brings
/// it back.
#[test]
fn reset_controller_reconnects_and_io_around_it_completes() {
    let remote = Remote::new();
    let t = remote.start();
    let ini = initiator(2);
    attach(&ini, params(remote.port), opts(0, 0, 0)).unwrap();
    let before = state(&ini)["cntlid"].clone();
    let rxs: Vec<Done> = (0..8u64).map(|i| submit(&ini, (i % 2) as usize, i * 8, 8, None)).collect();
    reset(&ini).unwrap();
    for rx in rxs {
        assert_eq!(rx.recv_timeout(T).unwrap().0, IoStatus::Success, "IO around the reset");
    }
    let after = wait_state(&ini, &["enabled"], Duration::from_secs(5));
    assert_ne!(after["cntlid"], before, "a new controller on the target");
    assert_eq!(after["reconnects"], json!(1));
    assert_eq!(submit(&ini, 1, 0, 8, None).recv_timeout(T).unwrap().0, IoStatus::Success);

    drop(t);
    wait_state(&ini, &["failed"], Duration::from_secs(5));
    let e = reset(&ini).expect_err("no target");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    let t = remote.start();
    reset(&ini).unwrap();
    wait_state(&ini, &["enabled"], Duration::from_secs(5));
    assert_eq!(submit(&ini, 0, 0, 8, None).recv_timeout(T).unwrap().0, IoStatus::Success);
    let (tx, rx) = mpsc::channel();
    ini.send(0, move || detach_controller("Remote", move |r| drop(tx.send(r))));
    rx.recv_timeout(T).unwrap().unwrap();
    drop(t);
    ini.stop();
    ini.join();
}
