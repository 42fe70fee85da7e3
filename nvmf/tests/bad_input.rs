//! Hostile and broken hosts, driven with raw sockets and the PDU encoders:
//! each class of bad input ends only that connection (with a C2HTermReq
//! where the transport spec calls for one, or a command status), and the
//! target keeps serving a well-behaved host.

mod common;
use bdev::DmaBuf;
use common::*;
use nvme_spec::fabrics::{ConnectCommand, ConnectData};
use nvme_spec::text::write_nqn;
use nvme_spec::{IoOpcode, SglDescriptor, Sqe, Status, U16, U32};
use nvmf::host::HostQpair;
use nvmf::pdu::{
    encode_header, fei, parse_common_header, parse_header, CapsuleCmd, Direction, Fes, H2CData, IcReq, PduHeader,
    RxConfig, TxConfig,
};
use nvmf::TransportOpts;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use zerocopy::IntoBytes;

struct Raw {
    s: TcpStream,
    tx: TxConfig,
    rx: RxConfig,
}

impl Raw {
    fn open(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw { s, tx: TxConfig::default(), rx: RxConfig::before_ic(Direction::ControllerToHost) }
    }

    /// ICReq/ICResp.
    fn ic(port: u16, digests: bool) -> Raw {
        let mut r = Raw::open(port);
        r.send(&PduHeader::IcReq(IcReq { pfv: 0, hpda: 0, hdgst: digests, ddgst: digests, maxr2t: 0 }), &[]);
        let (h, _) = r.recv().expect("ICResp");
        assert!(matches!(h, PduHeader::IcResp(_)), "{h:?}");
        r.tx = TxConfig { header_digest: digests, data_digest: digests, pda: 0 };
        r.rx = RxConfig {
            direction: Direction::ControllerToHost,
            ic_done: true,
            header_digest: digests,
            data_digest: digests,
            pda: 0,
            max_data_pdu_len: u32::MAX,
            max_in_capsule_data_len: 0,
        };
        r
    }

    fn encode(&self, h: &PduHeader, data: &[u8]) -> Vec<u8> {
        let mut out = [0u8; 256];
        let e = encode_header(h, data.len() as u32, &self.tx, &mut out).unwrap();
        let mut v = out[..e.header_len].to_vec();
        v.extend_from_slice(data);
        if e.data_digest {
            v.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
        }
        v
    }

    fn send(&mut self, h: &PduHeader, data: &[u8]) {
        let v = self.encode(h, data);
        self.s.write_all(&v).unwrap();
    }

    /// One PDU from the target, or None when it closed the connection.
    fn recv(&mut self) -> Option<(PduHeader, Vec<u8>)> {
        let mut ch = [0u8; 8];
        if self.s.read_exact(&mut ch).is_err() {
            return None;
        }
        let plen = parse_common_header(&ch).unwrap().plen as usize;
        let mut all = ch.to_vec();
        all.resize(plen, 0);
        self.s.read_exact(&mut all[8..]).ok()?;
        let (h, layout) = parse_header(&all, &self.rx).unwrap();
        let d = all[layout.data_offset as usize..(layout.data_offset + layout.data_len) as usize].to_vec();
        Some((h, d))
    }

    /// The target's termination request, then the end of the connection.
    fn expect_term(&mut self, fes: Fes, fei_: Option<u32>) {
        match self.recv() {
            Some((PduHeader::C2HTermReq(t), _)) => {
                assert_eq!(t.fes_kind(), Some(fes), "FES");
                if let Some(f) = fei_ {
                    assert_eq!(t.fei, f, "FEI");
                }
            }
            other => panic!("expected C2HTermReq {fes:?}, got {other:?}"),
        }
        self.expect_closed();
    }

    fn expect_closed(&mut self) {
        let mut b = [0u8; 256];
        loop {
            match self.s.read(&mut b) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn resp(&mut self) -> nvme_spec::Cqe {
        loop {
            match self.recv() {
                Some((PduHeader::CapsuleResp(r), _)) => return r.cqe,
                Some((PduHeader::C2HData(_), _)) => continue,
                other => panic!("expected CapsuleResp, got {other:?}"),
            }
        }
    }

    fn connect(&mut self, qid: u16, cntlid: u16, hostnqn: &str, kato_ms: u32) -> nvme_spec::Cqe {
        let cmd = ConnectCommand::new(1, qid, 32, kato_ms);
        let mut d = ConnectData::zeroed();
        d.cntlid = U16::new(cntlid);
        write_nqn(&mut d.subnqn, NQN).unwrap();
        write_nqn(&mut d.hostnqn, hostnqn).unwrap();
        self.send(&PduHeader::CapsuleCmd(CapsuleCmd { sqe: cmd.to_sqe() }), d.as_bytes());
        self.resp()
    }
}

/// A well-behaved host still gets its data through.
fn good_host_works(port: u16) {
    let s = session(port, 1, false);
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    let b = DmaBuf::alloc(4096).unwrap();
    b.fill(0x5A);
    qp.write(1, 8, 8, b, 1).unwrap();
    assert!(wait(&mut qp, 1)[0].status.is_success());
    qp.read(1, 8, 8, DmaBuf::alloc(4096).unwrap(), 2).unwrap();
    let c = wait(&mut qp, 1).pop().unwrap();
    assert!(c.status.is_success());
    assert!(c.buf.unwrap().to_vec().iter().all(|&x| x == 0x5A));
}

fn target() -> Target {
    start_target(2, 512, 4096, TransportOpts::default(), &[HOSTNQN])
}

fn read_sqe(nlb: u32) -> Sqe {
    let mut sqe = Sqe::new(IoOpcode::READ.0, 3);
    sqe.nsid = U32::new(1);
    sqe.set_nlb(nlb);
    sqe.set_sgl1(SglDescriptor::transport_data_block(nlb * 512));
    sqe
}

/// An admin + IO queue pair set up by hand; returns the IO queue.
fn io_queue(port: u16, digests: bool) -> (Raw, Raw) {
    let mut a = Raw::ic(port, false);
    let c = a.connect(0, 0xFFFF, HOSTNQN, 0);
    assert!(c.status().is_success(), "{:?}", c.status());
    let cntlid = c.dw0.get() as u16;
    let set = nvme_spec::fabrics::PropertySetCommand::new(
        2,
        nvme_spec::regs::offset::CC,
        nvme_spec::fabrics::PropertySize::FourBytes,
        u64::from(nvme_spec::regs::Cc(0).with_en(true).with_iosqes(6).with_iocqes(4).0),
    );
    a.send(&PduHeader::CapsuleCmd(CapsuleCmd { sqe: set.to_sqe() }), &[]);
    assert!(a.resp().status().is_success());
    let mut q = Raw::ic(port, digests);
    let c = q.connect(1, cntlid, HOSTNQN, 0);
    assert!(c.status().is_success(), "{:?}", c.status());
    (a, q)
}

#[test]
fn truncated_pdus() {
    let t = target();
    // PLEN shorter than the header it announces.
    let mut r = Raw::ic(t.port, false);
    let mut v = r.encode(&PduHeader::CapsuleCmd(CapsuleCmd { sqe: read_sqe(1) }), &[]);
    v[4..8].copy_from_slice(&40u32.to_le_bytes());
    r.s.write_all(&v).unwrap();
    r.expect_term(Fes::InvalidHeaderField, Some(fei::PLEN));
    // A PDU cut off by the host closing: the target just lets go.
    let mut r = Raw::ic(t.port, false);
    let v = r.encode(&PduHeader::CapsuleCmd(CapsuleCmd { sqe: read_sqe(1) }), &[]);
    r.s.write_all(&v[..30]).unwrap();
    r.s.shutdown(std::net::Shutdown::Write).unwrap();
    r.expect_closed();
    good_host_works(t.port);
}

#[test]
fn wrong_pdu_type_for_the_state() {
    let t = target();
    // A capsule before ICReq.
    let mut r = Raw::open(t.port);
    r.tx = TxConfig::default();
    r.send(&PduHeader::CapsuleCmd(CapsuleCmd { sqe: read_sqe(1) }), &[]);
    r.expect_term(Fes::PduSequenceError, None);
    // A second ICReq.
    let mut r = Raw::ic(t.port, false);
    r.send(&PduHeader::IcReq(IcReq { pfv: 0, hpda: 0, hdgst: false, ddgst: false, maxr2t: 0 }), &[]);
    r.expect_term(Fes::PduSequenceError, None);
    // A controller-to-host PDU type from the host.
    let mut r = Raw::ic(t.port, false);
    let mut v = r.encode(&PduHeader::CapsuleCmd(CapsuleCmd { sqe: read_sqe(1) }), &[]);
    v[0] = 0x05; // CapsuleResp
    r.s.write_all(&v).unwrap();
    r.expect_term(Fes::InvalidHeaderField, Some(fei::PDU_TYPE));
    // H2CData that answers no R2T.
    let (_a, mut q) = io_queue(t.port, false);
    q.send(&PduHeader::H2CData(H2CData { cccid: 3, ttag: 5, datao: 0, datal: 512, last: true }), &[0u8; 512]);
    q.expect_term(Fes::InvalidHeaderField, None);
    good_host_works(t.port);
}

fn write_r2t(q: &mut Raw, len: u32) -> (u16, u16) {
    let mut sqe = Sqe::new(IoOpcode::WRITE.0, 9);
    sqe.nsid = U32::new(1);
    sqe.set_nlb(len / 512);
    sqe.set_sgl1(SglDescriptor::transport_data_block(len));
    q.send(&PduHeader::CapsuleCmd(CapsuleCmd { sqe }), &[]);
    match q.recv() {
        Some((PduHeader::R2T(r), _)) => {
            assert_eq!((r.r2to, r.r2tl), (0, len));
            (r.cccid, r.ttag)
        }
        other => panic!("expected R2T, got {other:?}"),
    }
}

#[test]
fn bad_lengths_and_offsets() {
    let t = target();
    // H2CData beyond what the R2T asked for.
    let (_a, mut q) = io_queue(t.port, false);
    let (cccid, ttag) = write_r2t(&mut q, 8192);
    q.send(&PduHeader::H2CData(H2CData { cccid, ttag, datao: 4096, datal: 8192, last: true }), &[7u8; 8192]);
    q.expect_term(Fes::DataTransferOutOfRange, None);
    // H2CData out of order.
    let (_a, mut q) = io_queue(t.port, false);
    let (cccid, ttag) = write_r2t(&mut q, 8192);
    q.send(&PduHeader::H2CData(H2CData { cccid, ttag, datao: 4096, datal: 4096, last: true }), &[7u8; 4096]);
    q.expect_term(Fes::DataTransferOutOfRange, Some(fei::DATAO));
    // A data offset that breaks the alignment (PDO inside the header).
    let (_a, mut q) = io_queue(t.port, false);
    let mut sqe = Sqe::new(IoOpcode::WRITE.0, 4);
    sqe.nsid = U32::new(1);
    sqe.set_sgl1(SglDescriptor::in_capsule(0, 512));
    let mut v = q.encode(&PduHeader::CapsuleCmd(CapsuleCmd { sqe }), &[1u8; 512]);
    v[3] = 8; // PDO
    q.s.write_all(&v).unwrap();
    q.expect_term(Fes::InvalidHeaderField, Some(fei::PDO));
    good_host_works(t.port);
}

#[test]
fn bad_digests() {
    let t = target();
    // Header digest: fatal.
    let (_a, mut q) = io_queue(t.port, true);
    let mut v = q.encode(&PduHeader::CapsuleCmd(CapsuleCmd { sqe: read_sqe(1) }), &[]);
    v[72] ^= 0xFF;
    q.s.write_all(&v).unwrap();
    q.expect_term(Fes::HeaderDigestError, None);
    // Data digest: the command fails (retryably), the connection goes on.
    let (_a, mut q) = io_queue(t.port, true);
    let mut sqe = Sqe::new(IoOpcode::WRITE.0, 4);
    sqe.nsid = U32::new(1);
    sqe.set_sgl1(SglDescriptor::in_capsule(0, 512));
    let mut v = q.encode(&PduHeader::CapsuleCmd(CapsuleCmd { sqe }), &[1u8; 512]);
    let n = v.len();
    v[n - 1] ^= 0xFF;
    q.s.write_all(&v).unwrap();
    assert_eq!(q.resp().status(), Status::TRANSIENT_TRANSPORT_ERROR);
    q.send(&PduHeader::CapsuleCmd(CapsuleCmd { sqe: read_sqe(1) }), &[]);
    assert!(q.resp().status().is_success());
    good_host_works(t.port);
}

#[test]
fn data_beyond_limits() {
    let t = target();
    // In-capsule data beyond in_capsule_data_size (4 KiB) on an IO queue.
    let (_a, mut q) = io_queue(t.port, false);
    let mut sqe = Sqe::new(IoOpcode::WRITE.0, 4);
    sqe.nsid = U32::new(1);
    sqe.set_nlb(16);
    sqe.set_sgl1(SglDescriptor::in_capsule(0, 8192));
    q.send(&PduHeader::CapsuleCmd(CapsuleCmd { sqe }), &[1u8; 8192]);
    q.expect_term(Fes::DataTransferLimitExceeded, None);
    // A transfer beyond MDTS is refused as a command, the queue goes on.
    let (_a, mut q) = io_queue(t.port, false);
    let mut sqe = Sqe::new(IoOpcode::WRITE.0, 4);
    sqe.nsid = U32::new(1);
    sqe.set_nlb(512);
    sqe.set_sgl1(SglDescriptor::transport_data_block(262_144));
    q.send(&PduHeader::CapsuleCmd(CapsuleCmd { sqe }), &[]);
    assert_eq!(q.resp().status(), Status::DATA_SGL_LENGTH_INVALID.with_dnr());
    q.send(&PduHeader::CapsuleCmd(CapsuleCmd { sqe: read_sqe(1) }), &[]);
    assert!(q.resp().status().is_success());
    good_host_works(t.port);
}

#[test]
fn command_on_a_queue_that_is_not_connected() {
    let t = target();
    let mut r = Raw::ic(t.port, false);
    r.send(&PduHeader::CapsuleCmd(CapsuleCmd { sqe: read_sqe(1) }), &[]);
    assert_eq!(r.resp().status(), Status::COMMAND_SEQUENCE_ERROR.with_dnr());
    r.expect_closed();
    // An IO queue naming a controller that does not exist.
    let mut r = Raw::ic(t.port, false);
    let c = r.connect(1, 77, HOSTNQN, 0);
    assert_eq!(c.status(), Status::CONNECT_INVALID_PARAMETERS.with_dnr());
    good_host_works(t.port);
}

#[test]
fn connect_with_an_unknown_host_is_refused() {
    let t = target();
    let mut r = Raw::ic(t.port, false);
    let c = r.connect(0, 0xFFFF, "nqn.2014-08.org.nvmexpress:uuid:99999999-0000-0000-0000-000000000000", 0);
    assert_eq!(c.status(), Status::CONNECT_INVALID_HOST.with_dnr());
    // Through the initiator too.
    let mut p = params(t.port);
    p.hostnqn = "nqn.2014-08.org.example:intruder".into();
    match nvmf::host::connect(&p, 1) {
        Err(nvmf::host::HostError::Status(_, s)) => {
            assert_eq!(s, Status::CONNECT_INVALID_HOST.with_dnr())
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("an unknown host connected"),
    }
    good_host_works(t.port);
}

#[test]
fn keep_alive_expiry_tears_the_controller_down() {
    let t = target();
    let mut a = Raw::ic(t.port, false);
    let c = a.connect(0, 0xFFFF, HOSTNQN, 300);
    assert!(c.status().is_success());
    let t0 = std::time::Instant::now();
    a.expect_closed();
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(3), "closed after {waited:?}");
    // A host that keeps its controller alive is not touched.
    let mut b = Raw::ic(t.port, false);
    assert!(b.connect(0, 0xFFFF, HOSTNQN, 300).status().is_success());
    for i in 0..8 {
        std::thread::sleep(Duration::from_millis(100));
        b.send(&PduHeader::CapsuleCmd(CapsuleCmd { sqe: Sqe::new(0x18, 10 + i) }), &[]);
        assert!(b.resp().status().is_success());
    }
    good_host_works(t.port);
}

/// An Abort of a write whose data is still arriving (after its R2T): once
/// the data is in, the write is answered Command Abort Requested without
/// reaching the bdev, and the Abort says it aborted (DW0 bit 0 clear).
#[test]
fn abort_of_a_write_waiting_for_its_data() {
    let t = target();
    let (mut a, mut q) = io_queue(t.port, false);
    let (cccid, ttag) = write_r2t(&mut q, 8192);
    let mut abort = Sqe::new(nvme_spec::AdminOpcode::ABORT.0, 7);
    abort.cdw10 = U32::new(1 | (u32::from(cccid) << 16)); // SQID 1, the write's CID
    a.send(&PduHeader::CapsuleCmd(CapsuleCmd { sqe: abort }), &[]);
    // The Abort reaches the IO queue's reactor by message; give it time
    // before the data arrives (a late Abort would find the write finished
    // and say so, which the assertions below would show).
    std::thread::sleep(Duration::from_millis(500));
    q.send(&PduHeader::H2CData(H2CData { cccid, ttag, datao: 0, datal: 8192, last: true }), &[0xEE; 8192]);
    assert_eq!(q.resp().status(), Status::ABORT_REQUESTED);
    let answer = a.resp();
    assert!(answer.status().is_success(), "{:?}", answer.status());
    assert_eq!(answer.dw0.get() & 1, 0, "the Abort must say the write was aborted");
    // The aborted data never reached the namespace.
    let s = session(t.port, 1, false);
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    qp.read(1, 0, 16, DmaBuf::alloc(8192).unwrap(), 1).unwrap();
    let c = wait(&mut qp, 1).pop().unwrap();
    assert!(c.status.is_success());
    assert!(c.buf.unwrap().to_vec().iter().all(|&x| x != 0xEE), "an aborted write reached the bdev");
}
