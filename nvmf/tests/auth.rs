//! DH-HMAC-CHAP in-band authentication (NVMe Base 2.0 §8.13) against the
//! target, with a host side written here from the spec: its own message
//! layouts, key transform, challenge augmentation and response hashes
//! (only the PDU transport and the hash/HMAC/bignum crates are shared with
//! the target). Covers every hash, the null group and ffdhe2048,
//! bidirectional authentication, IO queues, a wrong key, a host that does
//! not authenticate, and key rotation with `set_host_keys`.

mod common;
use common::*;
use hmac::{Hmac, KeyInit, Mac};
use num_bigint::BigUint;
use nvme_spec::fabrics::{ConnectCommand, ConnectData, PropertyGetCommand, PropertySetCommand, PropertySize};
use nvme_spec::regs::{offset, Cc};
use nvme_spec::text::write_nqn;
use nvme_spec::{Cqe, IoOpcode, SglDescriptor, Sqe, Status, U16, U32};
use nvmf::keyring::Keyring;
use nvmf::pdu::{
    encode_header, parse_common_header, parse_header, CapsuleCmd, Direction, IcReq, PduHeader, RxConfig, TxConfig,
};
use nvmf::{NvmfState, TransportOpts};
use sha2::{Digest as _, Sha256, Sha384, Sha512};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use zerocopy::IntoBytes;

// ---- the host side, from the spec -------------------------------------

const FABRICS: u8 = 0x7F;
const FCTYPE_AUTH_SEND: u32 = 0x05;
const FCTYPE_AUTH_RECV: u32 = 0x06;
const SHA256: u8 = 1;
const SHA384: u8 = 2;
const SHA512: u8 = 3;
const NULL_DH: u8 = 0;
const FFDHE2048: u8 = 1;
/// Connect response DW0 bit 17: AUTHREQ.ATR.
const ATR: u32 = 1 << 17;

/// RFC 7919 ffdhe2048 prime.
const FFDHE2048_P: &str =
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695A9E13641146433FBCC939DCE249B3EF9\
7D2FE363630C75D8F681B202AEC4617AD3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935\
984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797ABC0AB182B324FB61D108A94BB2C8E3FB\
B96ADAB760D7F4681D4F42A3DE394DF4AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61\
9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005C58EF1837D1683B2C6F34A26C1B2EFFA\
886B423861285C97FFFFFFFFFFFFFFFF";

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    getrandom::fill(&mut v).unwrap();
    v
}

fn hash_len(h: u8) -> usize {
    [0, 32, 48, 64][usize::from(h)]
}

fn hash(h: u8, data: &[u8]) -> Vec<u8> {
    match h {
        SHA256 => Sha256::digest(data).to_vec(),
        SHA384 => Sha384::digest(data).to_vec(),
        _ => Sha512::digest(data).to_vec(),
    }
}

fn hmac(h: u8, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    fn go<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        let mut m = <M as KeyInit>::new_from_slice(key).unwrap();
        parts.iter().for_each(|p| m.update(p));
        m.finalize().into_bytes().to_vec()
    }
    match h {
        SHA256 => go::<Hmac<Sha256>>(key, parts),
        SHA384 => go::<Hmac<Sha384>>(key, parts),
        _ => go::<Hmac<Sha512>>(key, parts),
    }
}

/// A DH-HMAC-CHAP secret: raw key and the hash it is transformed with.
#[derive(Clone)]
struct Secret {
    transform: u8,
    key: Vec<u8>,
}

impl Secret {
    fn random(transform: u8, len: usize) -> Secret {
        Secret { transform, key: random(len) }
    }

    /// `DHHC-1:hh:base64(key || crc32 LE):`
    fn interchange(&self) -> String {
        use base64::Engine as _;
        let mut raw = self.key.clone();
        raw.extend_from_slice(&crc32fast::hash(&self.key).to_le_bytes());
        format!("DHHC-1:{:02x}:{}:", self.transform, base64::engine::general_purpose::STANDARD.encode(raw))
    }

    fn transformed(&self, nqn: &str) -> Vec<u8> {
        if self.transform == 0 {
            return self.key.clone();
        }
        hmac(self.transform, &self.key, &[nqn.as_bytes(), b"NVMe-over-Fabrics"])
    }
}

/// Response of §8.13.5.4 over challenge `c`, augmented with the DH
/// secret when there is one.
#[allow(clippy::too_many_arguments)]
fn chap_response(
    h: u8,
    key: &[u8],
    c: &[u8],
    dh: Option<&[u8]>,
    seq: u32,
    tid: u16,
    label: &str,
    nqn1: &str,
    nqn2: &str,
) -> Vec<u8> {
    let ca = match dh {
        Some(s) => hmac(h, &hash(h, s), &[c]),
        None => c.to_vec(),
    };
    hmac(
        h,
        key,
        &[
            &ca,
            &seq.to_le_bytes(),
            &tid.to_le_bytes(),
            &[0u8],
            label.as_bytes(),
            nqn1.as_bytes(),
            &[0u8],
            nqn2.as_bytes(),
        ],
    )
}

// ---- a raw NVMe/TCP queue ----------------------------------------------

struct Raw {
    s: TcpStream,
    tx: TxConfig,
    rx: RxConfig,
    cid: u16,
}

impl Raw {
    fn open(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = Raw { s, tx: TxConfig::default(), rx: RxConfig::before_ic(Direction::ControllerToHost), cid: 0 };
        r.send(&PduHeader::IcReq(IcReq { pfv: 0, hpda: 0, hdgst: false, ddgst: false, maxr2t: 0 }), &[]);
        let (h, _) = r.recv().expect("ICResp");
        assert!(matches!(h, PduHeader::IcResp(_)), "{h:?}");
        r.rx = RxConfig {
            direction: Direction::ControllerToHost,
            ic_done: true,
            header_digest: false,
            data_digest: false,
            pda: 0,
            max_data_pdu_len: u32::MAX,
            max_in_capsule_data_len: 0,
        };
        r
    }

    fn send(&mut self, h: &PduHeader, data: &[u8]) {
        let mut out = [0u8; 256];
        let e = encode_header(h, data.len() as u32, &self.tx, &mut out).unwrap();
        let mut v = out[..e.header_len].to_vec();
        v.extend_from_slice(data);
        self.s.write_all(&v).unwrap();
    }

    fn recv(&mut self) -> Option<(PduHeader, Vec<u8>)> {
        let mut ch = [0u8; 8];
        self.s.read_exact(&mut ch).ok()?;
        let plen = parse_common_header(&ch).unwrap().plen as usize;
        let mut all = ch.to_vec();
        all.resize(plen, 0);
        self.s.read_exact(&mut all[8..]).ok()?;
        let (h, layout) = parse_header(&all, &self.rx).unwrap();
        let d = all[layout.data_offset as usize..(layout.data_offset + layout.data_len) as usize].to_vec();
        Some((h, d))
    }

    /// Sends a command (with in-capsule data) and returns its completion
    /// and any C2H data; None when the target closed the connection.
    fn command(&mut self, mut sqe: Sqe, data: &[u8]) -> Option<(Cqe, Vec<u8>)> {
        self.cid = self.cid.wrapping_add(1);
        sqe.cid = U16::new(self.cid);
        if !data.is_empty() {
            sqe.set_sgl1(SglDescriptor::in_capsule(0, data.len() as u32));
        }
        self.send(&PduHeader::CapsuleCmd(CapsuleCmd { sqe }), data);
        let mut got = Vec::new();
        loop {
            match self.recv()? {
                (PduHeader::CapsuleResp(r), _) => return Some((r.cqe, got)),
                (PduHeader::C2HData(d), bytes) => {
                    got.extend_from_slice(&bytes);
                    if d.success {
                        return Some((Cqe::default(), got));
                    }
                }
                other => panic!("unexpected PDU {other:?}"),
            }
        }
    }

    fn connect(&mut self, qid: u16, cntlid: u16) -> Cqe {
        self.connect_kato(qid, cntlid, 0)
    }

    fn connect_kato(&mut self, qid: u16, cntlid: u16, kato_ms: u32) -> Cqe {
        let cmd = ConnectCommand::new(0, qid, 32, kato_ms);
        let mut d = ConnectData::zeroed();
        d.cntlid = U16::new(cntlid);
        write_nqn(&mut d.subnqn, NQN).unwrap();
        write_nqn(&mut d.hostnqn, HOSTNQN).unwrap();
        self.command(cmd.to_sqe(), d.as_bytes()).expect("Connect answered").0
    }

    fn property_get_cap(&mut self) -> Option<Status> {
        let sqe = PropertyGetCommand::new(0, offset::CAP, PropertySize::EightBytes).to_sqe();
        self.command(sqe, &[]).map(|(c, _)| c.status())
    }

    fn enable(&mut self) {
        let cc = Cc(0).with_en(true).with_iosqes(6).with_iocqes(4);
        let sqe = PropertySetCommand::new(0, offset::CC, PropertySize::FourBytes, u64::from(cc.0)).to_sqe();
        assert!(self.command(sqe, &[]).unwrap().0.status().is_success());
    }

    fn read_block(&mut self) -> Option<Status> {
        let mut sqe = Sqe::new(IoOpcode::READ.0, 0);
        sqe.nsid = U32::new(1);
        sqe.set_nlb(1);
        sqe.set_sgl1(SglDescriptor::transport_data_block(512));
        self.command(sqe, &[]).map(|(c, _)| c.status())
    }

    fn auth_sqe(fctype: u32, len: u32) -> Sqe {
        let mut sqe = Sqe::new(FABRICS, 0);
        // FCTYPE is byte 4 of a fabrics command.
        sqe.nsid = U32::new(fctype);
        // CDW10: reserved, SPSP0 = 1, SPSP1 = 1, SECP = E9h; CDW11: TL/AL.
        sqe.cdw10 = U32::new(u32::from_le_bytes([0, 1, 1, 0xE9]));
        sqe.cdw11 = U32::new(len);
        sqe
    }

    fn auth_send(&mut self, msg: &[u8]) -> Option<Status> {
        self.command(Self::auth_sqe(FCTYPE_AUTH_SEND, msg.len() as u32), msg).map(|(c, _)| c.status())
    }

    fn auth_receive(&mut self) -> Option<Vec<u8>> {
        let mut sqe = Self::auth_sqe(FCTYPE_AUTH_RECV, 4096);
        sqe.set_sgl1(SglDescriptor::transport_data_block(4096));
        let (c, data) = self.command(sqe, &[])?;
        assert!(c.status().is_success(), "Authentication Receive: {:?}", c.status());
        Some(data)
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }
}

/// What the host offers and holds.
struct Host<'a> {
    hashes: &'a [u8],
    groups: &'a [u8],
    key: &'a Secret,
    /// The controller's key, to authenticate the controller too.
    ctrl_key: Option<&'a Secret>,
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Authenticated with this hash and group.
    Done { hash: u8, group: u8, bidirectional: bool },
    /// The target answered AUTH_Failure1 with this reason explanation.
    Failure1 { rce: u8 },
    /// The controller's response did not match (the host sent Failure2).
    ControllerMismatch,
}

/// One DH-HMAC-CHAP transaction, host side.
fn authenticate(q: &mut Raw, tid: u16, h: &Host) -> Outcome {
    // AUTH_Negotiate: one DH-HMAC-CHAP protocol descriptor.
    let mut m = vec![0u8, 0x00, 0, 0];
    m.extend_from_slice(&tid.to_le_bytes());
    m.extend_from_slice(&[0, 1]); // SC_C none, NAPD 1
    let mut d = [0u8; 64];
    d[0] = 1;
    d[2] = h.hashes.len() as u8;
    d[3] = h.groups.len() as u8;
    d[4..4 + h.hashes.len()].copy_from_slice(h.hashes);
    d[34..34 + h.groups.len()].copy_from_slice(h.groups);
    m.extend_from_slice(&d);
    assert_eq!(q.auth_send(&m), Some(Status::SUCCESS));

    let c = q.auth_receive().expect("challenge");
    if c[1] == 0xF1 {
        return Outcome::Failure1 { rce: c[7] };
    }
    assert_eq!((c[0], c[1]), (1, 1), "DH-HMAC-CHAP_Challenge");
    assert_eq!(u16::from_le_bytes([c[4], c[5]]), tid);
    let (hl, hash_id, group) = (usize::from(c[6]), c[8], c[9]);
    assert_eq!(hl, hash_len(hash_id));
    let dhvlen = usize::from(u16::from_le_bytes([c[10], c[11]]));
    let seq = u32::from_le_bytes([c[12], c[13], c[14], c[15]]);
    assert_ne!(seq, 0);
    assert_eq!(c.len(), 16 + hl + dhvlen, "challenge length");
    let c1 = &c[16..16 + hl];
    let (host_public, dh_secret) = if group == NULL_DH {
        assert_eq!(dhvlen, 0);
        (Vec::new(), None)
    } else {
        assert_eq!(group, FFDHE2048, "only ffdhe2048 is offered with DH here");
        assert_eq!(dhvlen, 256);
        let p = BigUint::parse_bytes(FFDHE2048_P.as_bytes(), 16).unwrap();
        let x = BigUint::from_bytes_be(&random(32));
        let pad = |v: BigUint| {
            let b = v.to_bytes_be();
            let mut out = vec![0u8; 256 - b.len()];
            out.extend_from_slice(&b);
            out
        };
        let ctrl_public = BigUint::from_bytes_be(&c[16 + hl..]);
        (pad(BigUint::from(2u8).modpow(&x, &p)), Some(pad(ctrl_public.modpow(&x, &p))))
    };
    let resp = chap_response(
        hash_id,
        &h.key.transformed(HOSTNQN),
        c1,
        dh_secret.as_deref(),
        seq,
        tid,
        "HostHost",
        HOSTNQN,
        NQN,
    );
    let c2 = random(hl);
    let s2 = u32::from_le_bytes(random(4).try_into().unwrap()) | 1;
    let mut r = vec![1u8, 0x02, 0, 0];
    r.extend_from_slice(&tid.to_le_bytes());
    r.extend_from_slice(&[hl as u8, 0, u8::from(h.ctrl_key.is_some()), 0]);
    r.extend_from_slice(&(host_public.len() as u16).to_le_bytes());
    r.extend_from_slice(&(if h.ctrl_key.is_some() { s2 } else { 0 }).to_le_bytes());
    r.extend_from_slice(&resp);
    r.extend_from_slice(if h.ctrl_key.is_some() { &c2 } else { &[0u8; 64][..hl] });
    r.extend_from_slice(&host_public);
    assert_eq!(q.auth_send(&r), Some(Status::SUCCESS));

    let s = q.auth_receive().expect("success1");
    if s[1] == 0xF1 {
        return Outcome::Failure1 { rce: s[7] };
    }
    assert_eq!((s[0], s[1]), (1, 3), "DH-HMAC-CHAP_Success1");
    assert_eq!(usize::from(s[6]), hl);
    let Some(ck) = h.ctrl_key else {
        assert_eq!(s[8], 0, "RVALID without a controller challenge");
        assert_eq!(s.len(), 16);
        return Outcome::Done { hash: hash_id, group, bidirectional: false };
    };
    assert_eq!(s[8], 1, "RVALID");
    assert_eq!(s.len(), 16 + hl);
    let expected =
        chap_response(hash_id, &ck.transformed(NQN), &c2, dh_secret.as_deref(), s2, tid, "Controller", NQN, HOSTNQN);
    if s[16..] != expected[..] {
        let mut f = vec![0u8, 0xF0, 0, 0];
        f.extend_from_slice(&tid.to_le_bytes());
        f.extend_from_slice(&[1, 1]);
        assert_eq!(q.auth_send(&f), Some(Status::SUCCESS));
        return Outcome::ControllerMismatch;
    }
    let mut s2msg = vec![1u8, 0x04, 0, 0];
    s2msg.extend_from_slice(&tid.to_le_bytes());
    s2msg.resize(16, 0);
    assert_eq!(q.auth_send(&s2msg), Some(Status::SUCCESS));
    Outcome::Done { hash: hash_id, group, bidirectional: true }
}

// ---- target setup --------------------------------------------------------

/// Key files (mode 0600) removed with the value.
struct KeyFiles(Vec<PathBuf>);

impl KeyFiles {
    fn write(&mut self, name: &str, text: &str) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("nvraid-auth-{}-{n}-{name}", std::process::id()));
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&p).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        self.0.push(p.clone());
        p.to_string_lossy().into_owned()
    }
}

impl Drop for KeyFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A target where HOSTNQN must authenticate with `key` (and, when given,
/// the controller with `ctrl_key`).
fn target_with_keys(files: &mut KeyFiles, key: &Secret, ctrl_key: Option<&Secret>) -> Target {
    let t = start_target(1, 512, 64, TransportOpts::default(), &[HOSTNQN]);
    set_keys(&t, files, key, ctrl_key);
    t
}

fn set_keys(t: &Target, files: &mut KeyFiles, key: &Secret, ctrl_key: Option<&Secret>) {
    let n = files.0.len();
    let (kname, cname) = (format!("key{n}"), format!("ckey{n}"));
    let kpath = files.write(&kname, &key.interchange());
    let cpath = ctrl_key.map(|c| files.write(&cname, &c.interchange()));
    t.set.call(0, move || {
        let ring = Keyring::get();
        ring.add_file_key(&kname, &kpath).unwrap();
        if let Some(p) = &cpath {
            ring.add_file_key(&cname, p).unwrap();
        }
        let ck = cpath.as_ref().map(|_| ring.find(&cname).unwrap());
        NvmfState::get().set_host_keys(NQN, HOSTNQN, ring.find(&kname), ck).unwrap();
    });
}

/// Admin queue connected: checks ATR and that nothing but authentication
/// is served yet.
fn admin_needing_auth(port: u16) -> (Raw, u16) {
    let mut a = Raw::open(port);
    let c = a.connect(0, 0xFFFF);
    assert!(c.status().is_success(), "{:?}", c.status());
    assert_ne!(c.dw0.get() & ATR, 0, "Connect response without AUTHREQ.ATR");
    assert_eq!(a.property_get_cap(), Some(Status::AUTHENTICATION_REQUIRED.with_dnr()));
    (a, c.dw0.get() as u16)
}

// ---- tests ---------------------------------------------------------------

#[test]
fn every_hash_with_the_null_group() {
    let mut files = KeyFiles(Vec::new());
    for hash_id in [SHA256, SHA384, SHA512] {
        let key = Secret::random(hash_id, hash_len(hash_id));
        let t = target_with_keys(&mut files, &key, None);
        let (mut a, _) = admin_needing_auth(t.port);
        let h = Host { hashes: &[hash_id], groups: &[NULL_DH], key: &key, ctrl_key: None };
        assert_eq!(authenticate(&mut a, 7, &h), Outcome::Done { hash: hash_id, group: NULL_DH, bidirectional: false });
        assert_eq!(a.property_get_cap(), Some(Status::SUCCESS), "admitted after authentication");
    }
}

#[test]
fn strongest_offered_hash_and_an_untransformed_key() {
    let mut files = KeyFiles(Vec::new());
    let key = Secret::random(0, 48);
    let t = target_with_keys(&mut files, &key, None);
    let (mut a, _) = admin_needing_auth(t.port);
    let h = Host { hashes: &[SHA256, SHA384], groups: &[NULL_DH], key: &key, ctrl_key: None };
    assert_eq!(authenticate(&mut a, 1, &h), Outcome::Done { hash: SHA384, group: NULL_DH, bidirectional: false });
    assert_eq!(a.property_get_cap(), Some(Status::SUCCESS));
}

#[test]
fn ffdhe2048_bidirectional_on_admin_and_io_queues() {
    let mut files = KeyFiles(Vec::new());
    let key = Secret::random(SHA256, 32);
    let ckey = Secret::random(SHA512, 64);
    let t = target_with_keys(&mut files, &key, Some(&ckey));
    let (mut a, cntlid) = admin_needing_auth(t.port);
    let h = Host { hashes: &[SHA256, SHA512], groups: &[NULL_DH, FFDHE2048], key: &key, ctrl_key: Some(&ckey) };
    assert_eq!(authenticate(&mut a, 3, &h), Outcome::Done { hash: SHA512, group: FFDHE2048, bidirectional: true });
    a.enable();

    let mut io = Raw::open(t.port);
    let c = io.connect(1, cntlid);
    assert!(c.status().is_success(), "{:?}", c.status());
    assert_ne!(c.dw0.get() & ATR, 0, "IO queue Connect without AUTHREQ.ATR");
    assert_eq!(io.read_block(), Some(Status::AUTHENTICATION_REQUIRED.with_dnr()));
    assert_eq!(authenticate(&mut io, 4, &h), Outcome::Done { hash: SHA512, group: FFDHE2048, bidirectional: true });
    assert_eq!(io.read_block(), Some(Status::SUCCESS));
    // nvmf_subsystem_get_qpairs shows each queue's authentication (SPDK's `auth` object).
    let qpairs: Vec<serde_json::Value> = t.set.call(0, || {
        NvmfState::get().subsystem(NQN).unwrap().controllers().iter().flat_map(|c| c.qpairs_json()).collect()
    });
    assert_eq!(qpairs.len(), 2, "{qpairs:?}");
    for q in &qpairs {
        assert_eq!(
            q["auth"],
            serde_json::json!({"state": "completed", "digest": "sha512", "dhgroup": "ffdhe2048"}),
            "{q}"
        );
    }
}

#[test]
fn a_wrong_key_is_refused_and_the_queue_closed() {
    let mut files = KeyFiles(Vec::new());
    let key = Secret::random(SHA256, 32);
    let t = target_with_keys(&mut files, &key, None);
    let (mut a, _) = admin_needing_auth(t.port);
    let wrong = Secret::random(SHA256, 32);
    let h = Host { hashes: &[SHA256], groups: &[NULL_DH, FFDHE2048], key: &wrong, ctrl_key: None };
    assert_eq!(authenticate(&mut a, 9, &h), Outcome::Failure1 { rce: 1 });
    assert!(a.closed(), "the target ends the connection after AUTH_Failure1");

    // The right key still works on a new connection.
    let (mut a, _) = admin_needing_auth(t.port);
    let h = Host { key: &key, ..h };
    assert!(matches!(authenticate(&mut a, 10, &h), Outcome::Done { .. }));
}

#[test]
fn a_wrong_controller_key_is_caught_by_the_host() {
    let mut files = KeyFiles(Vec::new());
    let key = Secret::random(SHA256, 32);
    let ckey = Secret::random(SHA256, 32);
    let t = target_with_keys(&mut files, &key, Some(&ckey));
    let (mut a, _) = admin_needing_auth(t.port);
    let other = Secret::random(SHA256, 32);
    let h = Host { hashes: &[SHA256], groups: &[NULL_DH], key: &key, ctrl_key: Some(&other) };
    assert_eq!(authenticate(&mut a, 2, &h), Outcome::ControllerMismatch);
    assert!(a.closed(), "the target ends the connection after AUTH_Failure2");
}

#[test]
fn a_host_that_does_not_authenticate_gets_nothing() {
    let mut files = KeyFiles(Vec::new());
    let key = Secret::random(SHA256, 32);
    let t = target_with_keys(&mut files, &key, None);
    let (mut a, _) = admin_needing_auth(t.port);
    // Enabling the controller (the first thing a host without DH-HMAC-CHAP
    // does) is refused too, and so is an IO queue for it.
    let cc = Cc(0).with_en(true).with_iosqes(6).with_iocqes(4);
    let sqe = PropertySetCommand::new(0, offset::CC, PropertySize::FourBytes, u64::from(cc.0)).to_sqe();
    assert_eq!(a.command(sqe, &[]).unwrap().0.status(), Status::AUTHENTICATION_REQUIRED.with_dnr());
    // A Success2 before any negotiation is a protocol error: Failure1.
    let mut m = vec![1u8, 0x04, 0, 0, 0, 0];
    m.resize(16, 0);
    assert_eq!(a.auth_send(&m), Some(Status::SUCCESS));
    let f = a.auth_receive().unwrap();
    assert_eq!((f[0], f[1], f[6], f[7]), (0, 0xF1, 1, 7), "AUTH_Failure1, incorrect protocol message");
    assert!(a.closed());
}

#[test]
fn auth_commands_with_bad_fields_are_refused() {
    let mut files = KeyFiles(Vec::new());
    let key = Secret::random(SHA256, 32);
    let t = target_with_keys(&mut files, &key, None);
    let (mut a, _) = admin_needing_auth(t.port);
    let msg = [0u8; 8];
    let mut sqe = Raw::auth_sqe(FCTYPE_AUTH_SEND, 8);
    sqe.cdw10 = U32::new(u32::from_le_bytes([0, 1, 1, 0xEA]));
    assert_eq!(a.command(sqe, &msg).unwrap().0.status(), Status::INVALID_FIELD.with_dnr(), "SECP");
    let sqe = Raw::auth_sqe(FCTYPE_AUTH_SEND, 9);
    assert_eq!(a.command(sqe, &msg).unwrap().0.status(), Status::INVALID_FIELD.with_dnr(), "TL");
}

#[test]
fn rotated_keys_take_effect_at_the_next_authentication() {
    let mut files = KeyFiles(Vec::new());
    let old = Secret::random(SHA256, 32);
    let t = target_with_keys(&mut files, &old, None);
    let (mut a, _) = admin_needing_auth(t.port);
    let h = Host { hashes: &[SHA256], groups: &[NULL_DH], key: &old, ctrl_key: None };
    assert!(matches!(authenticate(&mut a, 1, &h), Outcome::Done { .. }));

    let new = Secret::random(SHA384, 48);
    set_keys(&t, &mut files, &new, None);
    // The admitted queue re-authenticates with the new key; the old one
    // no longer opens a queue.
    let hn = Host { key: &new, ..h };
    assert!(matches!(authenticate(&mut a, 2, &hn), Outcome::Done { .. }));
    assert_eq!(a.property_get_cap(), Some(Status::SUCCESS));
    let (mut b, _) = admin_needing_auth(t.port);
    assert_eq!(authenticate(&mut b, 3, &h), Outcome::Failure1 { rce: 1 });
}

/// A host slower than its Keep Alive Timeout at authenticating keeps its
/// controller: until the admin queue is admitted it can send nothing but
/// Authentication Send/Receive (Keep Alive is refused), so those count as
/// keep-alive traffic. (Linux under QEMU lost its controller to KATO while
/// computing an ffdhe8192 step.) Once admitted, silence still ends it.
#[test]
fn authentication_traffic_keeps_a_slow_host_alive() {
    const KATO_MS: u32 = 1000;
    let pause = Duration::from_millis(450);
    let mut files = KeyFiles(Vec::new());
    let key = Secret::random(SHA256, 32);
    let t = target_with_keys(&mut files, &key, None);
    let mut a = Raw::open(t.port);
    let c = a.connect_kato(0, 0xFFFF, KATO_MS);
    assert!(c.status().is_success(), "{:?}", c.status());
    assert_ne!(c.dw0.get() & ATR, 0);
    let started = std::time::Instant::now();

    // A null-group transaction with a pause before every message after
    // the first: longer than KATO in all, each gap shorter.
    let tid = 5u16;
    let mut m = vec![0u8, 0x00, 0, 0];
    m.extend_from_slice(&tid.to_le_bytes());
    m.extend_from_slice(&[0, 1]);
    let mut d = [0u8; 64];
    (d[0], d[2], d[3], d[4], d[34]) = (1, 1, 1, SHA256, NULL_DH);
    m.extend_from_slice(&d);
    assert_eq!(a.auth_send(&m), Some(Status::SUCCESS));
    std::thread::sleep(pause);
    let ch = a.auth_receive().expect("challenge (the controller was torn down)");
    assert_eq!((ch[0], ch[1], ch[8], ch[9]), (1, 1, SHA256, NULL_DH), "DH-HMAC-CHAP_Challenge");
    let seq = u32::from_le_bytes([ch[12], ch[13], ch[14], ch[15]]);
    let resp = chap_response(SHA256, &key.transformed(HOSTNQN), &ch[16..48], None, seq, tid, "HostHost", HOSTNQN, NQN);
    let mut r = vec![1u8, 0x02, 0, 0];
    r.extend_from_slice(&tid.to_le_bytes());
    r.extend_from_slice(&[32, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    r.extend_from_slice(&resp);
    r.extend_from_slice(&[0u8; 32]);
    std::thread::sleep(pause);
    assert_eq!(a.auth_send(&r), Some(Status::SUCCESS), "reply (the controller was torn down)");
    std::thread::sleep(pause);
    let s1 = a.auth_receive().expect("success1 (the controller was torn down)");
    assert_eq!((s1[0], s1[1]), (1, 3), "DH-HMAC-CHAP_Success1");
    assert!(started.elapsed() > Duration::from_millis(KATO_MS.into()), "the transaction outlasted KATO");
    assert_eq!(a.property_get_cap(), Some(Status::SUCCESS), "admitted after a slow authentication");

    // Admitted and silent for longer than KATO: the controller ends.
    std::thread::sleep(Duration::from_millis(u64::from(KATO_MS) * 2));
    assert!(a.closed(), "KATO no longer enforced after authentication");
}
