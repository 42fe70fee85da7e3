//! Remote namespaces as bdevs: `attach_controller` against nvraid's own
//! target, IO through the bdev channels of several reactors (each with its
//! own IO queue), then `detach_controller`.

mod common;
use bdev::{DmaBuf, IoBox, IoStatus, IoType, Registry};
use common::*;
use nvmf::host::{attach_controller, detach_controller, AttachParams};
use nvmf::TransportOpts;
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::Duration;

fn io(t: IoType, off: u64, n: u64, buf: Option<DmaBuf>) -> mpsc::Receiver<(IoStatus, Option<Vec<u8>>)> {
    let (tx, rx) = mpsc::channel();
    let h = Registry::get().lookup("Remoten1").unwrap();
    let ch = h.channel().unwrap();
    let mut io = IoBox::data(t, off, n, buf).unwrap();
    io.set_done(Rc::new(move |io: IoBox| {
        let _ = tx.send((io.status, io.buf.as_ref().map(|b| b.to_vec())));
    }));
    ch.submit(io);
    rx
}

#[test]
fn attached_namespace_serves_io_from_every_reactor() {
    let t = start_target(1, 512, 8192, TransportOpts::default(), &[]);
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0, 1], IdlePolicy::sleep()) };
    let ini = ReactorSet::start(cfg, || {}).unwrap();
    let port = t.port;
    let (tx, rx) = mpsc::channel();
    ini.send(0, move || {
        let p = AttachParams {
            name: "Remote".into(),
            trtype: "TCP".into(),
            traddr: "127.0.0.1".into(),
            adrfam: Some("IPv4".into()),
            trsvcid: port.to_string(),
            subnqn: NQN.into(),
            hostnqn: Some(HOSTNQN.into()),
            hdgst: true,
            ddgst: true,
            psk: None,
        };
        attach_controller(p, move |r| {
            let _ = tx.send(r);
        });
    });
    let names = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(names, vec!["Remoten1".to_string()]);
    let props = ini.call(0, || {
        let h = Registry::get().lookup("Remoten1").unwrap();
        (h.props().block_size, h.props().num_blocks)
    });
    assert_eq!(props, (512, 8192));
    for r in 0..2usize {
        let fill = 0x40 + r as u8;
        let off = r as u64 * 256;
        // 64 KiB write (R2T path), read back, write zeroes, unmap, flush.
        let w = ini.call(r, move || {
            let b = DmaBuf::alloc(65536).unwrap();
            b.fill(fill);
            io(IoType::Write, off, 128, Some(b))
        });
        assert_eq!(w.recv_timeout(Duration::from_secs(10)).unwrap().0, IoStatus::Success);
        let rd = ini.call(r, move || io(IoType::Read, off, 128, Some(DmaBuf::alloc(65536).unwrap())));
        let (st, data) = rd.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(st, IoStatus::Success);
        assert!(data.unwrap().iter().all(|&x| x == fill), "reactor {r} read back");
        for t in [IoType::WriteZeroes, IoType::Unmap, IoType::Flush] {
            let c = ini.call(r, move || io(t, off, 8, None));
            assert_eq!(c.recv_timeout(Duration::from_secs(10)).unwrap().0, IoStatus::Success, "{t:?}");
        }
        let rd = ini.call(r, move || io(IoType::Read, off, 8, Some(DmaBuf::alloc(4096).unwrap())));
        let (_, data) = rd.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(data.unwrap().iter().all(|&x| x == 0));
    }
    // Beyond the end: a clean error from the bdev layer.
    let e = ini.call(0, || io(IoType::Read, 8190, 8, Some(DmaBuf::alloc(4096).unwrap())));
    assert!(matches!(e.recv_timeout(Duration::from_secs(10)).unwrap().0, IoStatus::Failed(_)));

    let (tx, rx) = mpsc::channel();
    ini.send(0, move || {
        detach_controller("Remote", move |r| {
            let _ = tx.send(r);
        })
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert!(ini.call(0, || Registry::get().lookup("Remoten1").is_none()));
    // The target sees the queues go.
    let t0 = std::time::Instant::now();
    while t.set.call(0, || nvmf::NvmfState::get().connection_count()) > 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "initiator queues not closed");
        std::thread::sleep(Duration::from_millis(10));
    }
    ini.stop();
    ini.join();
}

/// Attaching, in the target's own process, the namespace that exports a local
/// bdev: its UUID is already taken, so no bdev can be registered and the
/// attach fails with EEXIST instead of succeeding with nothing attached.
#[test]
fn attach_whose_namespaces_cannot_register_fails() {
    let t = start_target(1, 512, 1024, TransportOpts::default(), &[]);
    let port = t.port;
    let (tx, rx) = mpsc::channel();
    t.set.send(0, move || {
        let p = AttachParams {
            name: "Loop".into(),
            trtype: "TCP".into(),
            traddr: "127.0.0.1".into(),
            adrfam: Some("IPv4".into()),
            trsvcid: port.to_string(),
            subnqn: NQN.into(),
            hostnqn: Some(HOSTNQN.into()),
            hdgst: false,
            ddgst: false,
            psk: None,
        };
        attach_controller(p, move |r| {
            let _ = tx.send(r);
        });
    });
    let r = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let e = r.expect_err("a namespace whose UUID is in use must not attach silently");
    assert_eq!(e.errno(), libc::EEXIST, "{e}");
    assert!(t.set.call(0, || Registry::get().lookup("Loopn1").is_none()));
}
