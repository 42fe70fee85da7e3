//! One initiator queue pair: a non-blocking socket, a PDU reader, a
//! transmit queue and pre-allocated command slots (CID = slot index).

use crate::pdu::{
    self, encode_header, parse_header, CapsuleCmd, Direction, Event, H2CData, IcReq, PduError, PduHeader, PduReader,
    RxConfig, TxConfig,
};
use bdev::{DmaBuf, IoFlags};
use nvme_spec::{AdminOpcode, IoOpcode, SglDescriptor, Sqe, Status, U16, U32};
use sock::{read_into, RxBuf, RxFill};
use sock::{Socket, Stream};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("socket: {0}")]
    Io(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("{0} failed with status {1:?}")]
    Status(String, Status),
    #[error("timed out")]
    Timeout,
    #[error("out of buffers")]
    NoMemory,
    #[error("controller terminated the connection (FES {0}, FEI {1})")]
    Terminated(u16, u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// Every slot is in use: poll, then retry.
    Full,
    /// The buffer is shorter than the command's data.
    BadBuffer,
    /// The queue failed; see [`HostQpair::poll`]'s error.
    Failed,
}

/// The transmit queue: headers (or a digest, or a termination request)
/// kept inline up to the largest encoded header.
type TxQueue = sock::TxQueue<{ pdu::MAX_ENCODED_HEADER_LEN }>;

/// Data of a command.
pub enum Data {
    None,
    /// Host to controller (write).
    Out(DmaBuf),
    /// Controller to host (read).
    In(DmaBuf),
}

/// One finished command.
#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    pub status: Status,
    pub dw0: u32,
    pub dw1: u32,
    /// The command's data buffer, handed back (filled, for a read).
    pub buf: Option<DmaBuf>,
    /// The command never got an answer: the connection failed first (the
    /// status is then "transient transport error"). Whether the controller
    /// ran it is unknown; it may be sent again on a new connection.
    pub connection_lost: bool,
}

/// A connected queue, as plain data that may cross threads.
pub struct QpairParts {
    stream: Stream,
    pub qid: u16,
    pub entries: u16,
    rxcfg: RxConfig,
    txcfg: TxConfig,
    maxh2cdata: u32,
    in_capsule_max: u32,
}

impl QpairParts {
    /// The ICReq/ICResp exchange on a fresh (blocking) socket.
    pub(crate) fn handshake(
        mut stream: Stream,
        qid: u16,
        entries: u16,
        hdgst: bool,
        ddgst: bool,
        timeout: Duration,
    ) -> Result<Self, HostError> {
        let io = |e: std::io::Error| HostError::Io(e.to_string());
        stream.tcp().set_nodelay(true).map_err(io)?;
        stream.tcp().set_read_timeout(Some(timeout)).map_err(io)?;
        let ic = PduHeader::IcReq(IcReq { pfv: 0, hpda: 0, hdgst, ddgst, maxr2t: 0 });
        let mut out = [0u8; 128];
        let e =
            encode_header(&ic, 0, &TxConfig::default(), &mut out).map_err(|e| HostError::Protocol(e.to_string()))?;
        stream.write_all(&out[..e.header_len]).map_err(io)?;
        let mut resp = [0u8; 128];
        stream.read_exact(&mut resp[..8]).map_err(io)?;
        if resp[0] == pdu::PduType::C2HTermReq as u8 {
            return Err(HostError::Terminated(0, 0));
        }
        stream.read_exact(&mut resp[8..]).map_err(io)?;
        let cfg = RxConfig::before_ic(Direction::ControllerToHost);
        let (h, _) = parse_header(&resp, &cfg).map_err(|e| HostError::Protocol(e.to_string()))?;
        let PduHeader::IcResp(r) = h else {
            return Err(HostError::Protocol("expected ICResp".into()));
        };
        if r.hdgst != hdgst || r.ddgst != ddgst {
            return Err(HostError::Protocol("controller refused the digests asked for".into()));
        }
        stream.tcp().set_read_timeout(None).map_err(io)?;
        stream.tcp().set_nonblocking(true).map_err(io)?;
        // Enough for Connect's data; IO queues learn their limit from Identify.
        let in_capsule_max = if qid == 0 { 8192 } else { 1024 };
        Ok(QpairParts {
            stream,
            qid,
            entries,
            rxcfg: RxConfig {
                direction: Direction::ControllerToHost,
                ic_done: true,
                header_digest: hdgst,
                data_digest: ddgst,
                pda: 0,
                max_data_pdu_len: u32::MAX,
                max_in_capsule_data_len: 0,
            },
            txcfg: TxConfig { header_digest: hdgst, data_digest: ddgst, pda: r.cpda },
            maxh2cdata: r.maxh2cdata,
            in_capsule_max,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    Busy,
}

struct Slot {
    state: SlotState,
    tag: u64,
    buf: Option<DmaBuf>,
    is_read: bool,
    data_len: u32,
    recvd: u32,
    digest_err: bool,
}

#[derive(Clone, Copy)]
enum RxTarget {
    None,
    C2H { slot: usize, datao: u32, datal: u32, success: bool },
}

/// One queue pair, owned by the thread (reactor) that polls it.
pub struct HostQpair {
    stream: Stream,
    qid: u16,
    reader: PduReader,
    rx: RxBuf,
    tx: TxQueue,
    txcfg: TxConfig,
    maxh2cdata: u32,
    in_capsule_max: u32,
    slots: Vec<Slot>,
    free: Vec<u16>,
    rx_target: RxTarget,
    done: VecDeque<Completion>,
    failed: Option<HostError>,
    outstanding: usize,
    /// The queue size negotiated in Connect (SQSIZE + 1).
    entries: u16,
}

impl HostQpair {
    pub fn from_parts(p: QpairParts) -> Self {
        // One entry of a queue always stays empty (NVMe and NVMe-oF: a full
        // queue is head == tail + 1), so a queue of N entries carries at most
        // N - 1 commands; SPDK's initiator keeps the same bound.
        let entries = p.entries.max(2);
        let n = entries as usize - 1;
        HostQpair {
            stream: p.stream,
            qid: p.qid,
            reader: PduReader::new(p.rxcfg),
            rx: RxBuf::new(64 * 1024),
            tx: TxQueue::with_capacity(n * 4 + 16),
            txcfg: p.txcfg,
            maxh2cdata: p.maxh2cdata,
            in_capsule_max: p.in_capsule_max,
            slots: (0..n)
                .map(|_| Slot {
                    state: SlotState::Free,
                    tag: 0,
                    buf: None,
                    is_read: false,
                    data_len: 0,
                    recvd: 0,
                    digest_err: false,
                })
                .collect(),
            free: (0..n as u16).rev().collect(),
            rx_target: RxTarget::None,
            done: VecDeque::with_capacity(n),
            failed: None,
            outstanding: 0,
            entries,
        }
    }

    /// Back to plain parts (to move the queue to another thread). The queue
    /// must be idle.
    pub fn into_parts(self) -> Result<QpairParts, HostError> {
        if self.outstanding > 0 || !self.tx.is_empty() || !self.rx.is_empty() || !self.reader.is_idle() {
            return Err(HostError::Protocol("queue pair is not idle".into()));
        }
        Ok(QpairParts {
            stream: self.stream,
            qid: self.qid,
            entries: self.entries,
            rxcfg: *self.reader.config(),
            txcfg: self.txcfg,
            maxh2cdata: self.maxh2cdata,
            in_capsule_max: self.in_capsule_max,
        })
    }

    pub(crate) fn set_in_capsule_limit(&mut self, bytes: u32) {
        self.in_capsule_max = bytes;
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Commands that may be outstanding at once: the negotiated queue size
    /// less one.
    pub fn queue_depth(&self) -> usize {
        self.slots.len()
    }

    /// The queue size negotiated in Connect (entries, SQSIZE + 1).
    pub fn queue_entries(&self) -> u16 {
        self.entries
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Submits any command; its CID is assigned here.
    pub fn submit(&mut self, mut sqe: Sqe, data: Data, tag: u64) -> Result<(), SubmitError> {
        if self.failed.is_some() {
            return Err(SubmitError::Failed);
        }
        let Some(slot) = self.free.pop().map(usize::from) else {
            return Err(SubmitError::Full);
        };
        sqe.cid = U16::new(slot as u16);
        let s = &mut self.slots[slot];
        s.state = SlotState::Busy;
        s.tag = tag;
        s.recvd = 0;
        s.digest_err = false;
        self.outstanding += 1;
        let cfg = self.txcfg;
        let r: Result<(), PduError> = match data {
            Data::None => {
                sqe.set_sgl1(SglDescriptor::transport_data_block(0));
                s.buf = None;
                s.is_read = false;
                s.data_len = 0;
                let h = PduHeader::CapsuleCmd(CapsuleCmd { sqe });
                self.tx.push_inline(|out| encode_header(&h, 0, &cfg, out).map(|e| e.header_len))
            }
            Data::In(buf) => {
                let len = buf.len() as u32;
                sqe.set_sgl1(SglDescriptor::transport_data_block(len));
                s.buf = Some(buf);
                s.is_read = true;
                s.data_len = len;
                let h = PduHeader::CapsuleCmd(CapsuleCmd { sqe });
                self.tx.push_inline(|out| encode_header(&h, 0, &cfg, out).map(|e| e.header_len))
            }
            Data::Out(buf) => {
                let len = buf.len() as u32;
                s.is_read = false;
                s.data_len = len;
                if len <= self.in_capsule_max {
                    sqe.set_sgl1(SglDescriptor::in_capsule(0, len));
                    s.buf = None;
                    let h = PduHeader::CapsuleCmd(CapsuleCmd { sqe });
                    let mut ddgst = false;
                    let r = self.tx.push_inline(|out| {
                        encode_header(&h, len, &cfg, out).map(|e| {
                            ddgst = e.data_digest;
                            e.header_len
                        })
                    });
                    if r.is_ok() {
                        let d = ddgst.then(|| buf.with(pdu::data_digest));
                        // The write's buffer is on the wire queue now; the
                        // completion hands back a handle for reuse.
                        self.slots[slot].buf = Some(buf.clone());
                        self.tx.push_data(buf);
                        if let Some(d) = d {
                            self.tx.push_bytes(&d.to_le_bytes());
                        }
                    }
                    r
                } else {
                    sqe.set_sgl1(SglDescriptor::transport_data_block(len));
                    s.buf = Some(buf);
                    let h = PduHeader::CapsuleCmd(CapsuleCmd { sqe });
                    self.tx.push_inline(|out| encode_header(&h, 0, &cfg, out).map(|e| e.header_len))
                }
            }
        };
        if let Err(e) = r {
            self.fail(HostError::Protocol(e.to_string()));
            return Err(SubmitError::Failed);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn rw(
        &mut self,
        op: IoOpcode,
        nsid: u32,
        slba: u64,
        nlb: u32,
        data: Data,
        tag: u64,
        flags: IoFlags,
    ) -> Result<(), SubmitError> {
        if nlb == 0 || nlb > 65536 {
            return Err(SubmitError::BadBuffer);
        }
        let mut sqe = Sqe::new(op.0, 0);
        sqe.nsid = U32::new(nsid);
        sqe.set_slba(slba);
        sqe.set_nlb(nlb);
        // CDW12: FUA on writes (a read's FUA is not asked for). DPO, a SCSI
        // hint, has no NVMe form: bit 29 is PRACT and must stay clear.
        sqe.set_fua(flags.fua() && op != IoOpcode::READ);
        self.submit(sqe, data, tag)
    }

    /// Reads `nlb` blocks into `buf` (exactly the data length).
    pub fn read(&mut self, nsid: u32, slba: u64, nlb: u32, buf: DmaBuf, tag: u64) -> Result<(), SubmitError> {
        self.rw(IoOpcode::READ, nsid, slba, nlb, Data::In(buf), tag, IoFlags::NONE)
    }

    /// A read with flags (none has a wire form on reads today).
    pub fn read_with(
        &mut self,
        nsid: u32,
        slba: u64,
        nlb: u32,
        buf: DmaBuf,
        tag: u64,
        flags: IoFlags,
    ) -> Result<(), SubmitError> {
        self.rw(IoOpcode::READ, nsid, slba, nlb, Data::In(buf), tag, flags)
    }

    /// Writes `buf` (exactly the data length) at `slba`.
    pub fn write(&mut self, nsid: u32, slba: u64, nlb: u32, buf: DmaBuf, tag: u64) -> Result<(), SubmitError> {
        self.rw(IoOpcode::WRITE, nsid, slba, nlb, Data::Out(buf), tag, IoFlags::NONE)
    }

    /// A write with flags: FUA makes it durable when it completes.
    pub fn write_with(
        &mut self,
        nsid: u32,
        slba: u64,
        nlb: u32,
        buf: DmaBuf,
        tag: u64,
        flags: IoFlags,
    ) -> Result<(), SubmitError> {
        self.rw(IoOpcode::WRITE, nsid, slba, nlb, Data::Out(buf), tag, flags)
    }

    pub fn write_zeroes(&mut self, nsid: u32, slba: u64, nlb: u32, tag: u64) -> Result<(), SubmitError> {
        self.rw(IoOpcode::WRITE_ZEROES, nsid, slba, nlb, Data::None, tag, IoFlags::NONE)
    }

    /// Write Zeroes with flags (FUA).
    pub fn write_zeroes_with(
        &mut self,
        nsid: u32,
        slba: u64,
        nlb: u32,
        tag: u64,
        flags: IoFlags,
    ) -> Result<(), SubmitError> {
        self.rw(IoOpcode::WRITE_ZEROES, nsid, slba, nlb, Data::None, tag, flags)
    }

    pub fn flush(&mut self, nsid: u32, tag: u64) -> Result<(), SubmitError> {
        let mut sqe = Sqe::new(IoOpcode::FLUSH.0, 0);
        sqe.nsid = U32::new(nsid);
        self.submit(sqe, Data::None, tag)
    }

    /// Deallocates ranges `(slba, nlb)`; `buf` holds at least 16 bytes per
    /// range and is filled here (up to 256 ranges).
    pub fn deallocate(&mut self, nsid: u32, ranges: &[(u64, u32)], buf: DmaBuf, tag: u64) -> Result<(), SubmitError> {
        if ranges.is_empty() || ranges.len() > 256 || buf.len() < ranges.len() * 16 {
            return Err(SubmitError::BadBuffer);
        }
        buf.with_mut(|b| {
            for (i, (slba, nlb)) in ranges.iter().enumerate() {
                let e = &mut b[i * 16..i * 16 + 16];
                e[..4].fill(0);
                e[4..8].copy_from_slice(&nlb.to_le_bytes());
                e[8..16].copy_from_slice(&slba.to_le_bytes());
            }
        });
        let mut sqe = Sqe::new(IoOpcode::DATASET_MANAGEMENT.0, 0);
        sqe.nsid = U32::new(nsid);
        sqe.cdw10 = U32::new(ranges.len() as u32 - 1);
        sqe.cdw11 = U32::new(1 << 2);
        self.submit(sqe, Data::Out(buf.slice(0, ranges.len() * 16)), tag)
    }

    /// Sends Keep Alive (admin queue).
    pub fn keep_alive(&mut self, tag: u64) -> Result<(), SubmitError> {
        self.submit(Sqe::new(AdminOpcode::KEEP_ALIVE.0, 0), Data::None, tag)
    }

    /// Gives the connection up from this side (the controller is being
    /// reconnected, or a keep alive went unanswered): the next
    /// [`HostQpair::poll`] reports every outstanding command lost.
    pub fn disconnect(&mut self) {
        self.fail(HostError::Io("disconnected by the host".into()));
    }

    fn fail(&mut self, e: HostError) {
        if self.failed.is_none() {
            self.failed = Some(e);
            self.stream.shutdown_both();
            self.tx.clear();
        }
    }

    /// Sends, receives, and reports finished commands. After an error the
    /// queue is dead: outstanding commands are reported failed (status
    /// "transient transport error") and later calls return the error.
    pub fn poll(&mut self, mut f: impl FnMut(Completion)) -> Result<usize, HostError> {
        if self.failed.is_none() {
            if let Err(e) = self.tx.flush(&mut self.stream) {
                self.fail(HostError::Io(e.to_string()));
            }
        }
        if self.failed.is_none() {
            self.receive();
        }
        if self.failed.is_none() && !self.tx.is_empty() {
            if let Err(e) = self.tx.flush(&mut self.stream) {
                self.fail(HostError::Io(e.to_string()));
            }
        }
        let mut n = 0;
        while let Some(c) = self.done.pop_front() {
            n += 1;
            f(c);
        }
        if let Some(e) = self.failed.clone() {
            for i in 0..self.slots.len() {
                if self.slots[i].state == SlotState::Busy {
                    let mut c = self.finish(i, Status::TRANSIENT_TRANSPORT_ERROR, 0, 0);
                    c.connection_lost = true;
                    n += 1;
                    f(c);
                }
            }
            if n == 0 {
                return Err(e);
            }
        }
        Ok(n)
    }

    fn finish(&mut self, slot: usize, status: Status, dw0: u32, dw1: u32) -> Completion {
        let s = &mut self.slots[slot];
        s.state = SlotState::Free;
        self.free.push(slot as u16);
        self.outstanding -= 1;
        Completion { tag: s.tag, status, dw0, dw1, buf: s.buf.take(), connection_lost: false }
    }

    fn receive(&mut self) {
        for _ in 0..8 {
            if self.failed.is_some() {
                return;
            }
            if self.rx.is_empty() && self.try_direct() {
                self.process();
                continue;
            }
            if self.rx.is_empty() {
                match self.rx.fill(&mut self.stream) {
                    Ok(RxFill::Bytes) => {}
                    Ok(RxFill::WouldBlock) => {
                        self.process();
                        return;
                    }
                    Ok(RxFill::Closed) => return self.fail(HostError::Io("controller closed the connection".into())),
                    Err(e) => return self.fail(HostError::Io(e.to_string())),
                }
            }
            self.process();
        }
    }

    fn try_direct(&mut self) -> bool {
        let rem = self.reader.data_remaining();
        if rem < 8192 {
            return false;
        }
        let RxTarget::C2H { slot, datao, .. } = self.rx_target else {
            return false;
        };
        let Some(layout) = self.reader.layout().copied() else {
            return false;
        };
        let off = (datao + layout.data_len - rem) as usize;
        let Some(buf) = self.slots[slot].buf.as_ref() else {
            return false;
        };
        if off + rem as usize > buf.len() {
            return false;
        }
        let (stream, reader) = (&mut self.stream, &mut self.reader);
        let r = buf.with_mut(|b| {
            let dest = &mut b[off..off + rem as usize];
            match read_into(stream, dest) {
                Ok(None) => Ok(false),
                Ok(Some(n)) => reader.feed(&dest[..n]).map(|_| true).map_err(|e| HostError::Protocol(e.to_string())),
                Err(e) => Err(HostError::Io(e.to_string())),
            }
        });
        match r {
            Ok(b) => b,
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    fn process(&mut self) {
        enum Owned {
            Header(PduHeader),
            End(bool),
        }
        loop {
            if self.failed.is_some() {
                return;
            }
            let (used, owned) = match self.reader.feed(self.rx.pending()) {
                Err(e) => return self.fail(HostError::Protocol(e.to_string())),
                Ok((used, None)) => (used, None),
                Ok((used, Some(Event::Data(chunk)))) => {
                    if let RxTarget::C2H { slot, datao, .. } = self.rx_target {
                        if let Some(b) = self.slots[slot].buf.as_ref() {
                            b.copy_from((datao + chunk.offset) as usize, chunk.bytes);
                        }
                    }
                    (used, None)
                }
                Ok((used, Some(Event::Header { header, .. }))) => (used, Some(Owned::Header(header))),
                Ok((used, Some(Event::End))) => (used, Some(Owned::End(true))),
                Ok((used, Some(Event::DataDigestMismatch { .. }))) => (used, Some(Owned::End(false))),
            };
            self.rx.consume(used);
            match owned {
                None if used == 0 => return,
                None => {}
                Some(Owned::Header(h)) => self.on_header(h),
                Some(Owned::End(ok)) => self.on_end(ok),
            }
        }
    }

    fn busy_slot(&self, cid: u16) -> Option<usize> {
        let i = cid as usize;
        (self.slots.get(i)?.state == SlotState::Busy).then_some(i)
    }

    fn on_header(&mut self, h: PduHeader) {
        match h {
            PduHeader::CapsuleResp(r) => {
                let Some(slot) = self.busy_slot(r.cqe.cid.get()) else {
                    return self.fail(HostError::Protocol("response for an unknown command".into()));
                };
                let mut status = r.cqe.status();
                let s = &self.slots[slot];
                if s.digest_err && status.is_success() {
                    status = Status::TRANSIENT_TRANSPORT_ERROR;
                }
                // A read answered with success before all its data arrived
                // would hand back whatever the buffer held before.
                if s.is_read && s.recvd < s.data_len && status.is_success() {
                    status = Status::DATA_TRANSFER_ERROR;
                }
                let c = self.finish(slot, status, r.cqe.dw0.get(), r.cqe.dw1.get());
                self.done.push_back(c);
            }
            PduHeader::C2HData(d) => {
                let Some(slot) = self.busy_slot(d.cccid) else {
                    return self.fail(HostError::Protocol("C2HData for an unknown command".into()));
                };
                let s = &self.slots[slot];
                if !s.is_read || d.datao.checked_add(d.datal).is_none_or(|e| e > s.data_len) {
                    return self.fail(HostError::Protocol("C2HData outside the command's buffer".into()));
                }
                self.rx_target = RxTarget::C2H { slot, datao: d.datao, datal: d.datal, success: d.success && d.last };
            }
            PduHeader::R2T(r) => {
                let Some(slot) = self.busy_slot(r.cccid) else {
                    return self.fail(HostError::Protocol("R2T for an unknown command".into()));
                };
                let s = &self.slots[slot];
                let Some(buf) = s.buf.clone() else {
                    return self.fail(HostError::Protocol("R2T for a command without host data".into()));
                };
                if s.is_read || r.r2to.checked_add(r.r2tl).is_none_or(|e| e > s.data_len) {
                    return self.fail(HostError::Protocol("R2T outside the command's data".into()));
                }
                self.send_h2c(r.cccid, r.ttag, r.r2to, r.r2tl, &buf);
            }
            PduHeader::C2HTermReq(t) => self.fail(HostError::Terminated(t.fes, t.fei)),
            _ => self.fail(HostError::Protocol("unexpected PDU".into())),
        }
    }

    fn send_h2c(&mut self, cccid: u16, ttag: u16, r2to: u32, r2tl: u32, buf: &DmaBuf) {
        let cfg = self.txcfg;
        let mut off = r2to;
        let end = r2to + r2tl;
        while off < end {
            let len = (end - off).min(self.maxh2cdata);
            let h = PduHeader::H2CData(H2CData { cccid, ttag, datao: off, datal: len, last: off + len == end });
            let mut ddgst = false;
            let r = self.tx.push_inline(|out| {
                encode_header(&h, len, &cfg, out).map(|e| {
                    ddgst = e.data_digest;
                    e.header_len
                })
            });
            if let Err(e) = r {
                return self.fail(HostError::Protocol(e.to_string()));
            }
            let piece = buf.slice(off as usize, len as usize);
            let d = ddgst.then(|| piece.with(pdu::data_digest));
            self.tx.push_data(piece);
            if let Some(d) = d {
                self.tx.push_bytes(&d.to_le_bytes());
            }
            off += len;
        }
    }

    fn on_end(&mut self, digest_ok: bool) {
        let t = std::mem::replace(&mut self.rx_target, RxTarget::None);
        if let RxTarget::C2H { slot, datal, success, .. } = t {
            let s = &mut self.slots[slot];
            s.recvd += datal;
            s.digest_err |= !digest_ok;
            if success {
                let st = if s.digest_err { Status::TRANSIENT_TRANSPORT_ERROR } else { Status::SUCCESS };
                let c = self.finish(slot, st, 0, 0);
                self.done.push_back(c);
            }
        }
    }
}

/// The admin queue of a session kept alive on a reactor: Keep Alive every
/// KATO/4, and, when asked, an Asynchronous Event Request kept posted and
/// the ANA log read on an ANA change notice or on request. A Keep Alive
/// unanswered for KATO means the path is gone even when the socket says
/// nothing (a peer that vanished without a FIN or RST): the queue then
/// fails.
pub struct AdminQpair {
    qp: HostQpair,
    period_ns: u64,
    next_ns: u64,
    /// KATO in ns (0: no keep alive timeout).
    kato_ns: u64,
    /// When the Keep Alive now outstanding was sent.
    sent_ns: Option<u64>,
    /// An Asynchronous Event Request is posted.
    aer_posted: bool,
    /// Post a new Asynchronous Event Request when the last one completes.
    aer_wanted: bool,
    /// A read of the ANA log is outstanding.
    log_reading: bool,
    /// The ANA log is to be read (again) once no read is outstanding.
    log_wanted: bool,
    /// The last ANA log read, not yet taken.
    ana_log: Option<Vec<u8>>,
}

/// Tags of the admin commands the keeper sends.
const TAG_KEEP_ALIVE: u64 = 0;
const TAG_ASYNC_EVENT: u64 = 1;
const TAG_ANA_LOG: u64 = 2;

impl AdminQpair {
    pub fn new(parts: QpairParts, kato_ms: u32) -> Self {
        let period_ns = u64::from(kato_ms.max(4)) * 250_000;
        AdminQpair {
            qp: HostQpair::from_parts(parts),
            period_ns,
            next_ns: 0,
            kato_ns: u64::from(kato_ms) * 1_000_000,
            sent_ns: None,
            aer_posted: false,
            aer_wanted: false,
            log_reading: false,
            log_wanted: false,
            ana_log: None,
        }
    }

    /// Keeps an Asynchronous Event Request posted from now on; an ANA
    /// change notice makes the queue read the ANA log (see
    /// [`AdminQpair::take_ana_log`]).
    pub fn watch_ana(&mut self) {
        self.aer_wanted = true;
    }

    /// Reads the ANA log (once more, if a read runs now).
    pub fn read_ana_log(&mut self) {
        self.log_wanted = true;
    }

    /// The ANA log page the last read returned, once.
    pub fn take_ana_log(&mut self) -> Option<Vec<u8>> {
        self.ana_log.take()
    }

    /// Call from a poller (a timed one is enough). Err when the connection
    /// died or a Keep Alive went unanswered for KATO.
    pub fn poll(&mut self) -> Result<(), HostError> {
        let now = reactor::now_ns();
        if self.kato_ns > 0 && now >= self.next_ns && self.sent_ns.is_none() {
            self.next_ns = now + self.period_ns;
            if self.qp.keep_alive(TAG_KEEP_ALIVE).is_ok() {
                self.sent_ns = Some(now);
            }
        }
        if self.aer_wanted && !self.aer_posted {
            let sqe = Sqe::new(AdminOpcode::ASYNC_EVENT_REQUEST.0, 0);
            self.aer_posted = self.qp.submit(sqe, Data::None, TAG_ASYNC_EVENT).is_ok();
        }
        if self.log_wanted && !self.log_reading {
            if let Some(buf) = DmaBuf::zeroed(super::ANA_LOG_BYTES) {
                let data = Data::In(buf.slice(0, super::ANA_LOG_BYTES));
                if self.qp.submit(super::ana_log_sqe(), data, TAG_ANA_LOG).is_ok() {
                    self.log_reading = true;
                    self.log_wanted = false;
                }
            }
        }
        let AdminQpair { qp, sent_ns, aer_posted, aer_wanted, log_reading, log_wanted, ana_log, .. } = self;
        qp.poll(|c| match c.tag {
            TAG_KEEP_ALIVE => *sent_ns = None,
            TAG_ASYNC_EVENT => {
                *aer_posted = false;
                if !c.status.is_success() {
                    // Refused (or the queue went down): not posted again.
                    *aer_wanted = false;
                    return;
                }
                let e = nvme_spec::features::AsyncEvent::from_dword(c.dw0);
                if e.event_type == nvme_spec::features::async_event_type::NOTICE
                    && e.info == nvme_spec::features::async_event_notice::ANA_CHANGE
                {
                    *log_wanted = true;
                }
            }
            TAG_ANA_LOG => {
                *log_reading = false;
                if c.status.is_success() {
                    *ana_log = c.buf.map(|b| b.to_vec());
                }
            }
            _ => {}
        })?;
        if self.sent_ns.is_some_and(|t| self.kato_ns > 0 && now.saturating_sub(t) > self.kato_ns) {
            self.qp.disconnect();
            return Err(HostError::Timeout);
        }
        Ok(())
    }

    pub fn qpair(&mut self) -> &mut HostQpair {
        &mut self.qp
    }
}
