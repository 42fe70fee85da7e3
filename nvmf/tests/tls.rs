//! NVMe/TCP's secure channel: TLS 1.3 with a PSK between nvraid's
//! initiator and its target. One subsystem on a secure listener and a
//! plain one; host A has a PSK, host B has none. A verifies IO over TLS
//! (in-capsule, R2T/H2CData and C2HData sizes), as a queue and as a bdev;
//! a wrong key fails the handshake; B is refused on the secure listener;
//! A is refused on the plain one while B still works there.

mod common;
use base64::Engine;
use bdev::{DmaBuf, IoBox, IoStatus, IoType, Registry};
use common::*;
use nvmf::host::{self, attach_controller, detach_controller, AttachParams, ConnectParams, HostError, HostQpair};
use nvmf::keyring::{Key, Keyring};
use nvmf::{ListenAddr, NvmfState, SubsystemParams, TransportOpts};
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::Duration;

const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-000000000001";
const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-0000-0000-000000000002";
const BS: u32 = 512;
const BLOCKS: u64 = 16384;

/// A key file (mode 0600) in the interchange format with hash `hh`.
fn key_file(dir: &std::path::Path, name: &str, hh: &str, key: &[u8]) -> String {
    let mut raw = key.to_vec();
    raw.extend_from_slice(&crc32fast::hash(key).to_le_bytes());
    let text = format!("NVMeTLSkey-1:{hh}:{}:\n", base64::engine::general_purpose::STANDARD.encode(raw));
    let p = dir.join(name);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&p).unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    p.to_str().unwrap().to_string()
}

struct Setup {
    target: Target,
    /// The secure listener's port; `plain` is the other one.
    secure: u16,
    plain: u16,
    good: Arc<Key>,
    wrong: Arc<Key>,
    _dir: TempDir,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup() -> Setup {
    let dir = std::env::temp_dir().join(format!("nvraid-tls-{}-{}", std::process::id(), seed()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x5A).collect();
    let mut other = secret.clone();
    other[0] ^= 1;
    let (good, wrong) = (key_file(&dir, "good", "01", &secret), key_file(&dir, "wrong", "01", &other));
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0, 1], IdlePolicy::sleep()) };
    let set = ReactorSet::start(cfg, || {}).unwrap();
    let (secure, plain) = (free_port(), free_port());
    let (good_path, wrong_path) = (good.clone(), wrong.clone());
    let (good, wrong) = set.call(0, move || {
        let m =
            bdev::malloc::MallocBdev::new(bdev::BdevProps::new("Malloc0", "Malloc disk", BS, BLOCKS, None)).unwrap();
        Registry::get().register(Arc::new(m)).unwrap();
        let ring = Keyring::get();
        ring.add_file_key("good", &good_path).unwrap();
        ring.add_file_key("wrong", &wrong_path).unwrap();
        let st = NvmfState::get();
        st.create_transport(TransportOpts::default()).unwrap();
        let mut p = SubsystemParams::new(NQN);
        p.allow_any_host = false;
        st.create_subsystem(p).unwrap();
        let good = ring.find("good").unwrap();
        st.add_host_with_psk(NQN, HOST_A, good.clone(), || st.add_host(NQN, HOST_A)).unwrap();
        st.add_host(NQN, HOST_B).unwrap();
        st.add_ns(NQN, "Malloc0", 0, None, None).unwrap();
        let (s, pl) =
            (ListenAddr::new("127.0.0.1", &secure.to_string()), ListenAddr::new("127.0.0.1", &plain.to_string()));
        st.add_listener_opts(NQN, s, nvmf::AnaState::Optimized, true).unwrap();
        st.add_listener(NQN, pl).unwrap();
        (good, ring.find("wrong").unwrap())
    });
    let target = Target { set, port: secure };
    Setup { target, secure, plain, good, wrong, _dir: TempDir(dir) }
}

fn params(port: u16, hostnqn: &str, psk: Option<&Arc<Key>>) -> ConnectParams {
    let mut p = ConnectParams::new("127.0.0.1", &port.to_string(), NQN);
    p.hostnqn = hostnqn.into();
    p.psk = psk.cloned();
    p.timeout = Duration::from_secs(3);
    p
}

/// Writes then reads back a pattern at several sizes (in-capsule, R2T
/// with H2CData, C2HData of several PDUs) on one IO queue.
fn verified_io(qp: &mut HostQpair) {
    for (i, nlb) in [1u32, 8, 64, 256].into_iter().enumerate() {
        let lba = i as u64 * 512;
        let len = (nlb * BS) as usize;
        let data: Vec<u8> = (0..len).map(|x| (x as u8).wrapping_mul(31) ^ (i as u8 + 1)).collect();
        let buf = DmaBuf::alloc(len).unwrap();
        buf.copy_from(0, &data);
        qp.write(1, lba, nlb, buf.slice(0, len), 1).unwrap();
        assert!(wait(qp, 1)[0].status.is_success(), "write of {nlb} blocks");
        qp.read(1, lba, nlb, DmaBuf::alloc(len).unwrap().slice(0, len), 2).unwrap();
        let c = wait(qp, 1).pop().unwrap();
        assert!(c.status.is_success(), "read of {nlb} blocks");
        assert!(c.buf.unwrap().to_vec() == data, "read back {nlb} blocks over TLS");
    }
}

fn connections(t: &Target) -> usize {
    t.set.call(0, || NvmfState::get().connection_count())
}

#[test]
fn psk_host_does_verified_io_over_tls() {
    let s = setup();
    let session = host::connect(&params(s.secure, HOST_A, Some(&s.good)), 2).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(session.info.namespaces.len(), 1);
    assert_eq!(connections(&s.target), 3, "admin and two IO queues, all over TLS");
    let mut threads = Vec::new();
    for parts in session.io {
        threads.push(std::thread::spawn(move || verified_io(&mut HostQpair::from_parts(parts))));
    }
    threads.into_iter().for_each(|t| t.join().unwrap());
}

#[test]
fn wrong_key_fails_the_handshake() {
    let s = setup();
    let e = host::connect(&params(s.secure, HOST_A, Some(&s.wrong)), 1).err().expect("a wrong PSK connects");
    assert!(matches!(&e, HostError::Io(m) if m.contains("TLS handshake")), "{e}");
    assert_eq!(connections(&s.target), 0);
}

#[test]
fn host_without_psk_is_refused_on_the_secure_listener() {
    let s = setup();
    // In plain: the target wants a ClientHello, not an ICReq.
    assert!(host::connect(&params(s.secure, HOST_B, None), 1).is_err());
    // With a key the target does not have for B: no PSK for its identity.
    let e = host::connect(&params(s.secure, HOST_B, Some(&s.good)), 1).err().expect("B connects over TLS");
    assert!(matches!(&e, HostError::Io(m) if m.contains("TLS handshake")), "{e}");
    assert_eq!(connections(&s.target), 0);
}

#[test]
fn psk_host_is_refused_on_a_plain_listener() {
    let s = setup();
    let e = host::connect(&params(s.plain, HOST_A, None), 1).err().expect("A connects in plain");
    assert!(
        matches!(&e, HostError::Status(what, st) if what == "Connect" && *st == nvme_spec::Status::CONNECT_INVALID_HOST.with_dnr()),
        "{e}"
    );
    // B has no PSK: the plain listener serves it as before.
    let b = host::connect(&params(s.plain, HOST_B, None), 1).unwrap_or_else(|e| panic!("{e}"));
    verified_io(&mut HostQpair::from_parts(b.io.into_iter().next().unwrap()));
}

/// `attach_controller` with a PSK: the bdev path (one IO queue per
/// reactor, each its own TLS session) with verified IO, then detach.
#[test]
fn attached_controller_over_tls_serves_verified_io() {
    let s = setup();
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0, 1], IdlePolicy::sleep()) };
    let ini = ReactorSet::start(cfg, || {}).unwrap();
    let (port, key) = (s.secure, s.good.clone());
    let (tx, rx) = mpsc::channel();
    ini.send(0, move || {
        let p = AttachParams {
            name: "Sec".into(),
            trtype: "TCP".into(),
            traddr: "127.0.0.1".into(),
            adrfam: None,
            trsvcid: port.to_string(),
            subnqn: NQN.into(),
            hostnqn: Some(HOST_A.into()),
            hdgst: true,
            ddgst: true,
            psk: Some(key),
        };
        attach_controller(p, move |r| {
            let _ = tx.send(r);
        });
    });
    let names = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(names, vec!["Secn1".to_string()]);
    for r in 0..2usize {
        let off = r as u64 * 1024;
        let data: Vec<u8> = (0..131072).map(|x: usize| (x / 7) as u8 ^ r as u8).collect();
        let d = data.clone();
        let w = ini.call(r, move || {
            let b = DmaBuf::alloc(d.len()).unwrap();
            b.copy_from(0, &d);
            bdev_io(IoType::Write, off, 256, Some(b))
        });
        assert_eq!(w.recv_timeout(Duration::from_secs(10)).unwrap().0, IoStatus::Success);
        let rd = ini.call(r, move || bdev_io(IoType::Read, off, 256, Some(DmaBuf::alloc(131072).unwrap())));
        let (st, got) = rd.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(st, IoStatus::Success);
        assert!(got.unwrap() == data, "reactor {r}: read back over TLS");
    }
    let (tx, rx) = mpsc::channel();
    ini.send(0, move || {
        detach_controller("Sec", move |r| {
            let _ = tx.send(r);
        })
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    ini.stop();
    ini.join();
}

fn bdev_io(t: IoType, off: u64, n: u64, buf: Option<DmaBuf>) -> mpsc::Receiver<(IoStatus, Option<Vec<u8>>)> {
    let (tx, rx) = mpsc::channel();
    let h = Registry::get().lookup("Secn1").unwrap();
    let ch = h.channel().unwrap();
    let mut io = IoBox::data(t, off, n, buf).unwrap();
    io.set_done(Rc::new(move |io: IoBox| {
        let _ = tx.send((io.status, io.buf.as_ref().map(|b| b.to_vec())));
    }));
    ch.submit(io);
    rx
}

/// A client that opens a TLS connection and then says nothing (or half a
/// ClientHello) holds no reactor: the handshake waits in its poller while
/// a PSK host connects queues on every reactor and does IO.
#[test]
fn a_stalled_handshake_does_not_block_the_reactor() {
    let s = setup();
    let silent: Vec<std::net::TcpStream> =
        (0..2).map(|_| std::net::TcpStream::connect(("127.0.0.1", s.secure)).unwrap()).collect();
    let mut half = std::net::TcpStream::connect(("127.0.0.1", s.secure)).unwrap();
    // A TLS record header announcing a 512-byte handshake message, then 5 bytes of it.
    std::io::Write::write_all(&mut half, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let session = host::connect(&params(s.secure, HOST_A, Some(&s.good)), 2).unwrap_or_else(|e| panic!("{e}"));
    for parts in session.io {
        verified_io(&mut HostQpair::from_parts(parts));
    }
    drop((silent, half));
}
