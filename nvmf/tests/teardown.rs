//! Teardown while IO is in flight (invariant 5, docs/architecture.md): removing a namespace,
//! deleting the subsystem, hot-removing the bdev, and a host vanishing.
//! Outstanding IO completes or fails cleanly, hosts hear of namespace
//! changes through an AEN, and every buffer stays with its IO until the
//! bdev has finished with it (the bdev can be deleted only after that).

mod common;
use bdev::malloc::MallocBdev;
use bdev::{BdevProps, DmaBuf, Registry};
use common::*;
use nvme_spec::log::{GetLogPageParams, LogPageId};
use nvme_spec::{Sqe, Status, U32};
use nvmf::host::{Completion, Data, HostQpair};
use nvmf::{ListenAddr, NvmfState, SubsystemParams, TransportOpts};
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DELAY_US: u64 = 150_000;

/// A target exporting a delay bdev (150 ms per IO) over a malloc bdev.
fn delayed_target() -> Target {
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0, 1], IdlePolicy::sleep()) };
    let set = ReactorSet::start(cfg, || {}).unwrap();
    let port = free_port();
    set.call(0, move || {
        let m = MallocBdev::new(BdevProps::new("Base0", "Malloc disk", 512, 4096, None)).unwrap();
        Registry::get().register(Arc::new(m)).unwrap();
        bdev::delay::create(bdev::delay::DelayCreateParams {
            base_bdev_name: "Base0".into(),
            name: "Delay0".into(),
            avg_read_latency: DELAY_US,
            p99_read_latency: DELAY_US,
            avg_write_latency: DELAY_US,
            p99_write_latency: DELAY_US,
            uuid: None,
            random_seed: None,
            max_random_latency_us: None,
        })
        .unwrap();
        let st = NvmfState::get();
        st.create_transport(TransportOpts::default()).unwrap();
        let mut p = SubsystemParams::new(NQN);
        p.allow_any_host = true;
        st.create_subsystem(p).unwrap();
        st.add_ns(NQN, "Delay0", 1, None, None).unwrap();
        st.add_listener(NQN, ListenAddr::new("127.0.0.1", &port.to_string())).unwrap();
    });
    Target { set, port }
}

fn in_flight(t: &Target) -> u64 {
    let (tx, rx) = std::sync::mpsc::channel();
    t.set.send(0, move || {
        let h = Registry::get().lookup("Delay0").or_else(|| Registry::get().lookup("Base0")).unwrap();
        Registry::iostat(&h, move |s| {
            let _ = tx.send(s.in_flight);
        });
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap()
}

fn submit_mixed(qp: &mut HostQpair, n: u64) {
    for i in 0..n {
        if i % 2 == 0 {
            let b = DmaBuf::alloc(4096).unwrap();
            b.fill(i as u8);
            qp.write(1, i * 8, 8, b, i).unwrap();
        } else {
            qp.read(1, i * 8, 8, DmaBuf::alloc(4096).unwrap(), i).unwrap();
        }
    }
    // Put them on the wire (nothing completes for the next 150 ms).
    assert_eq!(qp.poll(|_| {}).unwrap(), 0);
}

fn admin_cmd(qp: &mut HostQpair, sqe: Sqe, data: Option<DmaBuf>) -> Completion {
    let d = match data {
        Some(b) => Data::In(b),
        None => Data::None,
    };
    qp.submit(sqe, d, 500).unwrap();
    wait(qp, 1).pop().unwrap()
}

#[test]
fn removing_a_namespace_with_io_in_flight_completes_the_io_and_raises_an_aen() {
    let t = delayed_target();
    let s = session(t.port, 1, false);
    let mut admin = HostQpair::from_parts(s.admin);
    // Namespace attribute notices on, one AER outstanding.
    let mut sqe = Sqe::new(0x09, 0);
    sqe.cdw10 = U32::new(0x0B);
    sqe.cdw11 = U32::new(1 << 8);
    assert!(admin_cmd(&mut admin, sqe, None).status.is_success());
    admin.submit(Sqe::new(0x0C, 0), Data::None, 77).unwrap();

    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    submit_mixed(&mut qp, 16);
    std::thread::sleep(Duration::from_millis(20));
    assert!(in_flight(&t) > 0, "IO should be at the delay bdev");
    t.set.call(0, || NvmfState::get().remove_ns(NQN, 1)).unwrap();
    // Every outstanding command comes back (the bdev finishes them).
    let done = wait(&mut qp, 16);
    assert_eq!(done.len(), 16);
    // The AEN: a namespace attribute notice pointing at the changed list.
    let aen = wait(&mut admin, 1).pop().unwrap();
    assert_eq!(aen.tag, 77);
    assert_eq!(aen.dw0 & 0x7, 2, "notice");
    assert_eq!((aen.dw0 >> 16) & 0xFF, 4, "changed namespace list log page");
    let mut sqe = Sqe::new(0x02, 0);
    GetLogPageParams {
        lid: LogPageId::CHANGED_NAMESPACE_LIST,
        lsp: 0,
        rae: false,
        len_bytes: 4096,
        offset_bytes: 0,
        lsi: 0,
        nsid: 0xFFFF_FFFF,
    }
    .write_to(&mut sqe);
    let c = admin_cmd(&mut admin, sqe, Some(DmaBuf::zeroed(4096).unwrap()));
    assert!(c.status.is_success());
    let log = c.buf.unwrap().to_vec();
    assert_eq!(&log[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    // New IO to the removed namespace fails cleanly.
    qp.read(1, 0, 1, DmaBuf::alloc(512).unwrap().slice(0, 512), 99).unwrap();
    assert_eq!(wait(&mut qp, 1)[0].status, Status::INVALID_NAMESPACE_OR_FORMAT.with_dnr());
    assert_eq!(in_flight(&t), 0);
}

#[test]
fn a_host_vanishing_with_io_in_flight_is_torn_down_after_the_io() {
    let t = delayed_target();
    let s = session(t.port, 2, false);
    let mut qps: Vec<HostQpair> = s.io.into_iter().map(HostQpair::from_parts).collect();
    for qp in &mut qps {
        submit_mixed(qp, 32);
    }
    std::thread::sleep(Duration::from_millis(30));
    assert!(in_flight(&t) > 0);
    drop(qps);
    drop(s.admin);
    // The connections stay until the bdev has finished every IO (their
    // buffers are the IOs'), then go.
    let t0 = Instant::now();
    while t.set.call(0, || NvmfState::get().connection_count()) > 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "connections not torn down");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(in_flight(&t), 0);
    // The bdev can now go away cleanly; a new host is served by what is left.
    let (tx, rx) = std::sync::mpsc::channel();
    t.set.send(0, move || {
        Registry::get().force_unregister(Registry::get().lookup("Delay0").unwrap(), move |r| {
            let _ = tx.send(r.is_ok());
        })
    });
    assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
}

#[test]
fn deleting_the_subsystem_or_hot_removing_the_bdev_under_io() {
    let t = delayed_target();
    // Hot remove: the namespace goes with its bdev, IO completes or fails.
    let s = session(t.port, 1, false);
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    submit_mixed(&mut qp, 16);
    std::thread::sleep(Duration::from_millis(20));
    let (tx, rx) = std::sync::mpsc::channel();
    t.set.send(0, move || {
        Registry::get().force_unregister(Registry::get().lookup("Delay0").unwrap(), move |r| {
            let _ = tx.send(r.is_ok());
        })
    });
    assert_eq!(wait(&mut qp, 16).len(), 16);
    assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
    let nss = t.set.call(0, || NvmfState::get().subsystem(NQN).unwrap().namespaces().len());
    assert_eq!(nss, 0, "hot-removed bdev's namespace detached");

    // Subsystem deletion with IO in flight on a fresh namespace.
    t.set.call(0, || NvmfState::get().add_ns(NQN, "Base0", 1, None, None)).unwrap();
    let s = session(t.port, 1, false);
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    for i in 0..8u64 {
        qp.read(1, i, 1, DmaBuf::alloc(512).unwrap().slice(0, 512), i).unwrap();
    }
    t.set.call(0, || NvmfState::get().delete_subsystem(NQN)).unwrap();
    // The host sees its queue end: completions or a transport error.
    let t0 = Instant::now();
    let mut got = 0;
    while got < 8 {
        match qp.poll(|_| got += 1) {
            Ok(_) => {}
            Err(_) => break,
        }
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    let t0 = Instant::now();
    while t.set.call(0, || NvmfState::get().connection_count()) > 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "connections not torn down");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn removing_the_listener_ends_its_connections_after_their_io() {
    let t = delayed_target();
    let s = session(t.port, 1, false);
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    submit_mixed(&mut qp, 8);
    let port = t.port;
    t.set
        .call(0, move || NvmfState::get().remove_listener(NQN, &ListenAddr::new("127.0.0.1", &port.to_string())))
        .unwrap();
    // The queue ends; whatever the bdev finished was answered before.
    let t0 = Instant::now();
    loop {
        match qp.poll(|_| {}) {
            Err(_) => break,
            Ok(_) if qp.outstanding() == 0 && qp.is_failed() => break,
            Ok(_) => {}
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "queue not ended");
        std::thread::sleep(Duration::from_millis(1));
    }
    let t0 = Instant::now();
    while t.set.call(0, || NvmfState::get().connection_count()) > 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "connections not torn down");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(in_flight(&t), 0);
    // Nobody listens there any more.
    assert!(nvmf::host::connect(&params(port), 1).is_err());
}
