//! One NVMe/TCP connection on the target: a queue pair owned by one
//! reactor, polled by that reactor (non-blocking socket, no thread). It
//! runs the PDU state machine (ICReq, capsules, R2T/H2CData, C2HData,
//! termination), owns its request slots (pre-allocated, one per queue
//! entry), and maps IO commands onto the namespace's bdev.
//!
//! A request's data buffer moves into the bdev IO and comes back with its
//! completion, so nothing reuses or frees a buffer a bdev may still write
//! (invariant 5, docs/architecture.md); a closing connection keeps itself alive until every
//! submitted IO has completed.
//!
//! Data buffers for R2T and C2HData transfers draw on the transport's
//! buffer budget ([`BufPool`]); a command that finds it spent waits here
//! (`AwaitBuf`, FIFO) until units come back. IO command handling lives in
//! [`io`], Abort in [`abort`].

mod abort;
mod io;

use super::admin::{self, AdminOutcome};
use super::auth::{self, QueueAuth, RecvOutcome, SendOutcome};
use super::bufpool::BufPool;
use super::reservation::{Access, PersistJob, Reservations};
use super::{
    Ctrl, CtrlAdmin, ListenAddr, NvmfState, PollGroupStats, QpairStats, QueueRef, Subsystem, SubsystemKind,
    TransportOpts, ADMIN_IN_CAPSULE_LEN,
};
use crate::pdu::{
    self, encode_header, encode_term_req, C2HData, CapsuleResp, Direction, Event, Fes, IcResp, PduError, PduHeader,
    PduReader, PduType, RxConfig, TxConfig, R2T,
};
use abort::AbortWait;
use bdev::{Channel, DmaBuf, IoBox, IoDone, IoType};
use nvme_spec::fabrics::{
    cattr, connect_command_offset, connect_data_offset, connect_invalid_parameter_dw0, connect_success_dw0,
    ConnectCommand, ConnectData, FabricsCommand, InvalidParameterIn, PropertyGetCommand, PropertySetCommand,
};
use nvme_spec::log::CNTLID_DYNAMIC;
use nvme_spec::opcode::DataDirection;
use nvme_spec::text::read_nqn;
use nvme_spec::{AdminOpcode, Cqe, FabricsCommandType, IoOpcode, SglKind, Sqe, Status, U16, U32};
use sock::{read_into, RxBuf, RxFill};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zerocopy::FromBytes;

/// The transmit queue: headers (or a digest, or a termination request)
/// kept inline up to the largest encoded header.
type TxQueue = sock::TxQueue<{ pdu::MAX_ENCODED_HEADER_LEN }>;
/// Receive staging buffer per connection.
const RX_BUF_LEN: usize = 64 * 1024;
/// Data PDUs at least this long are received straight into the request's
/// buffer when the staging buffer is empty.
const DIRECT_RX_MIN: u32 = 8192;
/// Stop reading while this much output waits (backpressure).
const TX_HIGH_WATER: usize = 4 << 20;
/// Most AERs held per controller (AERL + 1).
pub(crate) const MAX_AERS: usize = 4;
/// Most Abort commands outstanding per controller (ACL + 1).
pub(crate) const MAX_ABORTS: usize = 4;
/// How long a closing connection tries to flush its last words.
const CLOSE_FLUSH_NS: u64 = 100_000_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ReqState {
    Free,
    /// In-capsule data arriving.
    RecvCapsule,
    /// R2T sent; H2CData arriving.
    AwaitH2C,
    /// Waiting for data buffer units (the pool is spent).
    AwaitBuf,
    /// At the bdev, or being answered.
    Exec,
    /// Waiting for an event: an AER, or an Abort for its answer.
    Parked,
    /// The command already failed; its data is being skipped.
    Failed,
}

struct Req {
    state: ReqState,
    sqe: Sqe,
    buf: Option<DmaBuf>,
    /// Bytes of command data (SGL length).
    data_len: u32,
    recvd: u32,
    /// Bytes of response data to send back (C2HData).
    xfer_len: u32,
    pending: u32,
    status: Status,
    digest_err: bool,
    /// Bumped each time the slot is taken: IOs carry it (`tag2`) so that a
    /// completion meant for an earlier use of the slot is recognised.
    gen: u32,
    /// Buffer units of the pool this request holds.
    units: u32,
    /// An Abort asked for this command: it completes with Command Abort
    /// Requested instead of running (or its IO came back Aborted).
    abort_requested: bool,
    /// Bytes a Read or Write moves (for the SMART log).
    io_bytes: u32,
}

impl Req {
    fn blank() -> Self {
        Req {
            state: ReqState::Free,
            sqe: Sqe::default(),
            buf: None,
            data_len: 0,
            recvd: 0,
            xfer_len: 0,
            pending: 0,
            status: Status::SUCCESS,
            digest_err: false,
            gen: 0,
            units: 0,
            abort_requested: false,
            io_bytes: 0,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RxTarget {
    None,
    Capsule(usize),
    H2C { slot: usize, datao: u32, datal: u32 },
    Discard,
}

struct NsIo {
    nsid: u32,
    block_shift: u32,
    num_blocks: u64,
    ch: Rc<Channel>,
    /// The path status IO to this namespace ends with while its ANA group
    /// is not accessible through this queue's listener.
    ana_blocked: Option<Status>,
    resv: Arc<Reservations>,
    /// The reservation generation `access` was computed at.
    resv_gen: u64,
    /// What this queue's host may do while a reservation is held.
    access: Access,
}

enum Owned {
    Header(PduHeader, u32),
    End { digest_ok: bool },
}

pub(crate) struct Conn {
    stream: sock::Stream,
    listen: ListenAddr,
    portid: u16,
    opts: Arc<TransportOpts>,
    state: Arc<NvmfState>,
    /// The reactor this connection runs on (its poll group).
    reactor: usize,
    reader: PduReader,
    rx: RxBuf,
    tx: TxQueue,
    txcfg: TxConfig,
    ic_done: bool,
    qid: Option<u16>,
    sq_entries: u32,
    sqhd: u16,
    /// The host disabled SQ flow control: the Connect response says so
    /// with SQHD FFFFh (TP 8005).
    sqhd_ffff_once: bool,
    ctrl: Option<Arc<Ctrl>>,
    /// DH-HMAC-CHAP state once the host has (or had to) authenticate;
    /// until it is admitted only Authentication Send/Receive are served.
    auth: Option<Box<QueueAuth>>,
    c2h_success: bool,
    reqs: Vec<Req>,
    free: Vec<u16>,
    rx_target: RxTarget,
    ns: Vec<NsIo>,
    ns_gen: u64,
    aers: Vec<usize>,
    done: Option<Rc<dyn IoDone>>,
    pool: Arc<BufPool>,
    /// Slots in `AwaitBuf`, oldest first.
    waiting_buf: VecDeque<u16>,
    /// This connection's key in its reactor's [`ConnTable`].
    key: u64,
    /// SMART counters (IO queues).
    stats: Arc<QpairStats>,
    /// Aborts waiting for a command of this queue to finish receiving data.
    abort_waits: Vec<AbortWait>,
    /// Abort commands of this (admin) queue waiting for their answer.
    aborts_parked: usize,
    /// An Authentication Receive waiting for DH work off the reactor
    /// (the protocol has one authentication command at a time).
    auth_parked: Option<usize>,
    closing: bool,
    close_after_flush: bool,
    close_deadline_ns: u64,
    socket_shut: bool,
    scratch: Vec<u8>,
}

/// Completions of this connection's bdev IOs come back here.
struct ConnIoDone(Weak<RefCell<Conn>>);

impl IoDone for ConnIoDone {
    fn io_done(&self, io: IoBox) {
        match self.0.upgrade() {
            Some(c) => c.borrow_mut().io_done(io),
            // A closing connection lives until its last IO is back.
            None => NvmfState::get().impossible("IO completion for a connection that is gone"),
        }
    }
}

/// The connections of one reactor, by key, so that messages from other
/// reactors (an Abort from the admin queue) can reach them.
#[derive(Default)]
struct ConnTable(RefCell<HashMap<u64, Weak<RefCell<Conn>>>>);

fn lookup(key: u64) -> Option<Rc<RefCell<Conn>>> {
    reactor::local::<ConnTable>().0.borrow().get(&key).and_then(Weak::upgrade)
}

/// Takes over an accepted connection on the current reactor.
pub(crate) fn start(stream: sock::Stream, listen: ListenAddr, portid: u16, opts: Arc<TransportOpts>) {
    if let Err(e) = stream.tcp().set_nonblocking(true).and_then(|()| stream.tcp().set_nodelay(true)) {
        tracing::warn!("NVMe/TCP connection setup: {e}");
        return;
    }
    let state = NvmfState::get();
    if state.shutting_down.load(Ordering::Acquire) {
        return;
    }
    let Some(pool) = state.pool() else {
        tracing::warn!("NVMe/TCP connection without a transport");
        return;
    };
    state.connections.fetch_add(1, Ordering::AcqRel);
    let key = state.next_conn_key.fetch_add(1, Ordering::Relaxed) + 1;
    let slots = opts.max_queue_depth.max(opts.max_aq_depth) as usize;
    let conn = Rc::new(RefCell::new(Conn {
        stream,
        listen,
        portid,
        opts,
        state,
        reactor: reactor::current().unwrap_or(0),
        reader: PduReader::new(RxConfig::before_ic(Direction::HostToController)),
        rx: RxBuf::new(RX_BUF_LEN),
        tx: TxQueue::with_capacity(slots * 4 + 16),
        txcfg: TxConfig::default(),
        ic_done: false,
        qid: None,
        sq_entries: 0,
        sqhd: 0,
        sqhd_ffff_once: false,
        ctrl: None,
        auth: None,
        c2h_success: false,
        reqs: (0..slots).map(|_| Req::blank()).collect(),
        free: (0..slots as u16).rev().collect(),
        rx_target: RxTarget::None,
        ns: Vec::new(),
        ns_gen: 0,
        aers: Vec::with_capacity(MAX_AERS),
        done: None,
        pool,
        waiting_buf: VecDeque::with_capacity(slots),
        key,
        stats: Arc::new(QpairStats::default()),
        abort_waits: Vec::with_capacity(MAX_ABORTS),
        aborts_parked: 0,
        auth_parked: None,
        closing: false,
        close_after_flush: false,
        close_deadline_ns: 0,
        socket_shut: false,
        scratch: Vec::new(),
    }));
    {
        let c = conn.borrow();
        if let Some(g) = c.state.poll_group(c.reactor) {
            PollGroupStats::add(&g.current_unassociated_qpairs);
        }
    }
    let done: Rc<dyn IoDone> = Rc::new(ConnIoDone(Rc::downgrade(&conn)));
    conn.borrow_mut().done = Some(done);
    reactor::local::<ConnTable>().0.borrow_mut().insert(key, Rc::downgrade(&conn));
    reactor::register_poller("nvmf_tcp_qpair", move || conn.borrow_mut().poll());
}

impl Conn {
    fn poll(&mut self) -> reactor::PollStatus {
        if self.closing {
            return self.poll_closing();
        }
        if self.state.shutting_down.load(Ordering::Relaxed) {
            self.begin_close("target shutting down");
            return reactor::PollStatus::Busy;
        }
        if let Some(c) = self.ctrl.clone() {
            if c.is_dead() {
                self.begin_close("controller ended");
                return reactor::PollStatus::Busy;
            }
            if c.subsys.generation.load(Ordering::Acquire) != self.ns_gen {
                self.refresh_ns();
            }
            if self.qid == Some(0) && c.aen_flag.load(Ordering::Acquire) {
                self.deliver_aen();
            }
        }
        let mut busy = false;
        if !self.waiting_buf.is_empty() {
            busy |= self.serve_buffer_waiters();
        }
        if !self.abort_waits.is_empty() {
            self.expire_abort_waits();
        }
        if let Some(slot) = self.auth_parked.take() {
            // Busy while parked too: a sleeping reactor would not ask again.
            self.auth_receive(slot);
            busy = true;
        }
        if self.tx.queued_bytes() < TX_HIGH_WATER && !self.close_after_flush {
            busy |= self.poll_rx();
        }
        // Not closing, so the socket is open: a failed send ends the connection.
        busy |= self.tx.send(&mut self.stream).unwrap_or_else(|e| {
            self.begin_close(&format!("send failed: {e}"));
            true
        });
        self.return_tx_units();
        if self.close_after_flush && self.tx.is_empty() && !self.closing {
            self.begin_close("host disconnected");
        }
        if busy {
            reactor::PollStatus::Busy
        } else {
            reactor::PollStatus::Idle
        }
    }

    fn begin_close(&mut self, why: &str) {
        if self.closing {
            return;
        }
        tracing::debug!(qid = ?self.qid, why, "NVMe/TCP connection closing");
        self.closing = true;
        self.close_deadline_ns = reactor::now_ns() + CLOSE_FLUSH_NS;
        if let Some(c) = &self.ctrl {
            if self.qid == Some(0) {
                c.kill(why);
            } else if let Some(q) = self.qid {
                c.retire_queue(q, self.key);
            }
        }
        // Aborts waiting on this queue's commands: those never run now.
        for w in std::mem::take(&mut self.abort_waits) {
            abort::send_answer(w.reply, false);
        }
        // Requests not at the bdev are done with; their buffers go now.
        for (i, r) in self.reqs.iter_mut().enumerate() {
            if r.state != ReqState::Exec {
                r.buf = None;
                self.pool.give(std::mem::take(&mut r.units));
                if r.state != ReqState::Free {
                    r.state = ReqState::Free;
                    self.free.push(i as u16);
                }
            }
        }
        self.waiting_buf.clear();
        self.aers.clear();
        self.aborts_parked = 0;
        self.ns.clear();
    }

    /// Gives back the buffer units of data the socket has finished sending.
    fn return_tx_units(&mut self) {
        let n = self.tx.take_released_units();
        if n > 0 {
            self.pool.give(n);
        }
    }

    fn poll_closing(&mut self) -> reactor::PollStatus {
        if !self.socket_shut {
            self.socket_shut = self.tx.flush_then_shutdown(&mut self.stream, self.close_deadline_ns);
        }
        self.return_tx_units();
        let in_flight = self.reqs.iter().any(|r| r.state == ReqState::Exec);
        if self.socket_shut && !in_flight {
            self.done = None;
            self.ctrl = None;
            reactor::local::<ConnTable>().0.borrow_mut().remove(&self.key);
            if let Some(g) = self.state.poll_group(self.reactor) {
                PollGroupStats::sub(match self.qid {
                    None => &g.current_unassociated_qpairs,
                    Some(0) => &g.current_admin_qpairs,
                    Some(_) => &g.current_io_qpairs,
                });
            }
            self.state.connections.fetch_sub(1, Ordering::AcqRel);
            return reactor::PollStatus::Done;
        }
        reactor::PollStatus::Idle
    }

    /// Ends the connection for a protocol error, with a termination request
    /// unless the bad PDU was the host's own termination request.
    fn fatal(&mut self, err: PduError) {
        let quoted = self.reader.received_header();
        let was_term = quoted.first() == Some(&(PduType::H2CTermReq as u8));
        if let (Some(term), false) = (err.term_req(), was_term) {
            let mut out = [0u8; pdu::TERM_REQ_MAX_PLEN as usize];
            if let Ok(n) = encode_term_req(Direction::ControllerToHost, term, quoted, &mut out) {
                self.tx.push_bytes(&out[..n]);
            }
        }
        tracing::info!(qid = ?self.qid, "NVMe/TCP protocol error: {err}");
        self.begin_close("protocol error");
    }

    fn fatal_here(&mut self, fes: Fes, fei: u32, reason: &'static str) {
        self.fatal(PduError::Fatal { fes, fei, reason });
    }

    fn poll_rx(&mut self) -> bool {
        let mut busy = false;
        for _ in 0..8 {
            if self.closing || self.close_after_flush {
                break;
            }
            if self.rx.is_empty() {
                match self.try_direct_rx() {
                    Ok(true) => {
                        busy = true;
                        self.process();
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        self.begin_close(&format!("receive failed: {e}"));
                        return true;
                    }
                }
                match self.rx.fill(&mut self.stream) {
                    Ok(RxFill::Bytes) => busy = true,
                    Ok(RxFill::WouldBlock) => {
                        // An End may still be due (a PDU whose last bytes came
                        // straight into a buffer).
                        self.process();
                        break;
                    }
                    Ok(RxFill::Closed) => {
                        self.begin_close("host closed the connection");
                        return true;
                    }
                    Err(e) => {
                        self.begin_close(&format!("receive failed: {e}"));
                        return true;
                    }
                }
            }
            self.process();
        }
        busy
    }

    /// Receives the rest of a long data PDU straight into its buffer.
    fn try_direct_rx(&mut self) -> std::io::Result<bool> {
        let rem = self.reader.data_remaining();
        if rem < DIRECT_RX_MIN {
            return Ok(false);
        }
        let Some(layout) = self.reader.layout().copied() else {
            return Ok(false);
        };
        let (slot, base) = match self.rx_target {
            RxTarget::Capsule(slot) => (slot, 0),
            RxTarget::H2C { slot, datao, .. } => (slot, datao),
            _ => return Ok(false),
        };
        let off = (base + layout.data_len - rem) as usize;
        let Some(buf) = self.reqs[slot].buf.as_ref() else {
            return Ok(false);
        };
        if off + rem as usize > buf.len() {
            return Ok(false);
        }
        let (stream, reader) = (&mut self.stream, &mut self.reader);
        let r = buf.with_mut(|b| -> std::io::Result<Option<Result<(), PduError>>> {
            let dest = &mut b[off..off + rem as usize];
            match read_into(stream, dest)? {
                None => Ok(None),
                Some(n) => Ok(Some(reader.feed(&dest[..n]).map(|_| ()))),
            }
        })?;
        match r {
            None => Ok(false),
            Some(Ok(())) => Ok(true),
            Some(Err(e)) => {
                self.fatal(e);
                Ok(true)
            }
        }
    }

    /// Feeds buffered bytes to the reader and acts on its events.
    fn process(&mut self) {
        loop {
            if self.closing || self.close_after_flush {
                return;
            }
            let (used, owned) = {
                let input = self.rx.pending();
                match self.reader.feed(input) {
                    Err(e) => {
                        self.fatal(e);
                        return;
                    }
                    Ok((used, None)) => (used, None),
                    Ok((used, Some(Event::Data(chunk)))) => {
                        let (slot, base) = match self.rx_target {
                            RxTarget::Capsule(slot) => (Some(slot), 0),
                            RxTarget::H2C { slot, datao, .. } => (Some(slot), datao),
                            _ => (None, 0),
                        };
                        if let Some(buf) = slot.and_then(|s| self.reqs[s].buf.as_ref()) {
                            buf.copy_from((base + chunk.offset) as usize, chunk.bytes);
                        }
                        (used, None)
                    }
                    Ok((used, Some(Event::Header { header, data_len }))) => {
                        (used, Some(Owned::Header(header, data_len)))
                    }
                    Ok((used, Some(Event::End))) => (used, Some(Owned::End { digest_ok: true })),
                    Ok((used, Some(Event::DataDigestMismatch { .. }))) => (used, Some(Owned::End { digest_ok: false })),
                }
            };
            self.rx.consume(used);
            match owned {
                None if used == 0 => return,
                None => {}
                Some(Owned::Header(h, data_len)) => self.on_header(h, data_len),
                Some(Owned::End { digest_ok }) => self.on_end(digest_ok),
            }
        }
    }

    fn on_header(&mut self, h: PduHeader, data_len: u32) {
        match h {
            PduHeader::IcReq(ic) => {
                if self.ic_done {
                    return self.fatal_here(Fes::PduSequenceError, 0, "second ICReq");
                }
                let maxh2cdata = self.opts.max_io_size.max(pdu::MIN_MAXH2CDATA);
                let resp = PduHeader::IcResp(IcResp { pfv: 0, cpda: 0, hdgst: ic.hdgst, ddgst: ic.ddgst, maxh2cdata });
                if self
                    .tx
                    .push_inline(|out| encode_header(&resp, 0, &TxConfig::default(), out).map(|e| e.header_len))
                    .is_err()
                {
                    return self.begin_close("encoding ICResp");
                }
                self.ic_done = true;
                self.txcfg = TxConfig { header_digest: ic.hdgst, data_digest: ic.ddgst, pda: ic.hpda };
                self.reader.set_config(RxConfig {
                    direction: Direction::HostToController,
                    ic_done: true,
                    header_digest: ic.hdgst,
                    data_digest: ic.ddgst,
                    pda: 0,
                    max_data_pdu_len: maxh2cdata,
                    max_in_capsule_data_len: self.opts.in_capsule_data_size.max(ADMIN_IN_CAPSULE_LEN),
                });
            }
            PduHeader::H2CTermReq(t) => {
                tracing::info!(fes = t.fes, fei = t.fei, "host terminated the connection");
                self.begin_close("host sent a termination request");
            }
            PduHeader::CapsuleCmd(c) => self.on_capsule(c.sqe, data_len),
            PduHeader::H2CData(d) => {
                let slot = d.ttag as usize;
                let ok_slot = self.reqs.get(slot).is_some_and(|r| r.state == ReqState::AwaitH2C);
                if !ok_slot {
                    return self.fatal_here(Fes::InvalidHeaderField, 10, "H2CData transfer tag names no R2T");
                }
                let r = &self.reqs[slot];
                if r.sqe.cid.get() != d.cccid {
                    return self.fatal_here(Fes::InvalidHeaderField, 8, "H2CData CCCID does not match the R2T");
                }
                if d.datao != r.recvd {
                    return self.fatal_here(
                        Fes::DataTransferOutOfRange,
                        pdu::fei::DATAO,
                        "H2CData offset out of order",
                    );
                }
                if d.datao.checked_add(d.datal).is_none_or(|end| end > r.data_len) {
                    return self.fatal_here(Fes::DataTransferOutOfRange, pdu::fei::DATAL, "H2CData beyond the R2T");
                }
                self.rx_target = RxTarget::H2C { slot, datao: d.datao, datal: d.datal };
            }
            _ => self.fatal_here(Fes::InvalidHeaderField, 0, "PDU type not valid from a host"),
        }
    }

    fn on_end(&mut self, digest_ok: bool) {
        let target = std::mem::replace(&mut self.rx_target, RxTarget::None);
        match target {
            RxTarget::Capsule(slot) => {
                let r = &mut self.reqs[slot];
                r.digest_err |= !digest_ok;
                r.recvd = r.data_len;
                self.dispatch(slot);
            }
            RxTarget::H2C { slot, datal, .. } => {
                let r = &mut self.reqs[slot];
                r.digest_err |= !digest_ok;
                r.recvd += datal;
                if r.recvd == r.data_len {
                    self.dispatch(slot);
                }
            }
            RxTarget::Discard => {
                // A command that failed before its data: answer it now.
                match self.reqs.iter().position(|r| r.state == ReqState::Failed) {
                    Some(slot) => {
                        let st = self.reqs[slot].status;
                        self.complete(slot, st, 0);
                    }
                    // Discard is only ever set with a Failed slot; no
                    // command waits, so there is nothing to answer.
                    None => self.state.impossible("discarded data without its failed command"),
                }
            }
            RxTarget::None => {}
        }
    }

    fn alloc_slot(&mut self) -> Option<usize> {
        self.free.pop().map(usize::from)
    }

    fn on_capsule(&mut self, sqe: Sqe, data_len: u32) {
        let is_connect =
            sqe.opcode == AdminOpcode::FABRICS.0 && FabricsCommand::view(&sqe).fctype() == FabricsCommandType::CONNECT;
        let Some(slot) = self.alloc_slot() else {
            return self.fatal_here(Fes::PduSequenceError, 0, "more commands outstanding than the queue holds");
        };
        let r = &mut self.reqs[slot];
        *r = Req { sqe, gen: r.gen.wrapping_add(1), ..Req::blank() };
        r.state = ReqState::Exec;
        if self.qid.is_none() && !is_connect {
            // A command before Connect: answered, then the connection ends.
            self.close_after_flush = true;
            return self.fail_early(slot, data_len, Status::COMMAND_SEQUENCE_ERROR.with_dnr());
        }
        let dir = if sqe.opcode == AdminOpcode::FABRICS.0 {
            DataDirection::from_opcode(FabricsCommand::view(&sqe).fctype)
        } else {
            DataDirection::from_opcode(sqe.opcode)
        };
        let max_len = if self.qid == Some(0) || self.qid.is_none() {
            self.opts.max_io_size.max(ADMIN_IN_CAPSULE_LEN)
        } else {
            self.opts.max_io_size
        };
        let sgl = sqe.sgl1();
        if data_len > 0 {
            let ok = match sgl.kind() {
                SglKind::InCapsule { offset, length } => {
                    if offset != 0 {
                        return self.fail_early(slot, data_len, Status::SGL_OFFSET_INVALID.with_dnr());
                    }
                    if length > data_len || length == 0 {
                        return self.fail_early(slot, data_len, Status::DATA_SGL_LENGTH_INVALID.with_dnr());
                    }
                    matches!(dir, DataDirection::HostToController | DataDirection::Bidirectional)
                }
                _ => false,
            };
            if !ok {
                return self.fail_early(slot, data_len, Status::SGL_DESCRIPTOR_TYPE_INVALID.with_dnr());
            }
            let Some(buf) = DmaBuf::alloc(data_len as usize) else {
                return self.fail_early(slot, data_len, Status::NAMESPACE_NOT_READY);
            };
            let r = &mut self.reqs[slot];
            r.buf = Some(buf.slice(0, data_len as usize));
            r.data_len = data_len;
            r.state = ReqState::RecvCapsule;
            self.rx_target = RxTarget::Capsule(slot);
            return;
        }
        let length = sgl.length.get();
        if length == 0 {
            return self.dispatch(slot);
        }
        match sgl.kind() {
            SglKind::TransportDataBlock { length } => {
                if length > max_len {
                    return self.complete(slot, Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0);
                }
                if !matches!(dir, DataDirection::HostToController | DataDirection::ControllerToHost) {
                    return self.complete(slot, Status::INVALID_FIELD.with_dnr(), 0);
                }
                self.reqs[slot].data_len = length;
                // Behind earlier waiters: the pool serves commands in order.
                if !self.waiting_buf.is_empty() || !self.start_transfer(slot) {
                    self.reqs[slot].state = ReqState::AwaitBuf;
                    self.waiting_buf.push_back(slot as u16);
                    self.pool.waits.fetch_add(1, Ordering::Relaxed);
                }
            }
            SglKind::InCapsule { .. } => self.complete(slot, Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0),
            _ => self.complete(slot, Status::SGL_DESCRIPTOR_TYPE_INVALID.with_dnr(), 0),
        }
    }

    /// Takes the buffer units and the buffer for a command's R2T or C2H
    /// transfer and starts it (R2T, or dispatch of a read). False when the
    /// pool is spent: nothing was taken, the command must wait.
    fn start_transfer(&mut self, slot: usize) -> bool {
        let length = self.reqs[slot].data_len;
        let units = self.pool.units_for(length);
        if !self.pool.take(units) {
            return false;
        }
        let Some(buf) = DmaBuf::alloc(length as usize) else {
            self.pool.give(units);
            self.complete(slot, Status::NAMESPACE_NOT_READY, 0);
            return true;
        };
        let sqe = self.reqs[slot].sqe;
        let dir = if sqe.opcode == AdminOpcode::FABRICS.0 {
            DataDirection::from_opcode(FabricsCommand::view(&sqe).fctype)
        } else {
            DataDirection::from_opcode(sqe.opcode)
        };
        let r = &mut self.reqs[slot];
        r.units = units;
        r.buf = Some(buf.slice(0, length as usize));
        if dir == DataDirection::HostToController {
            r.state = ReqState::AwaitH2C;
            let r2t = PduHeader::R2T(R2T { cccid: sqe.cid.get(), ttag: slot as u16, r2to: 0, r2tl: length });
            let cfg = self.txcfg;
            if self.tx.push_inline(|out| encode_header(&r2t, 0, &cfg, out).map(|e| e.header_len)).is_err() {
                self.begin_close("encoding R2T");
            }
        } else {
            self.dispatch(slot);
        }
        true
    }

    /// Starts waiting commands, oldest first, while the pool has units.
    fn serve_buffer_waiters(&mut self) -> bool {
        let mut served = false;
        while let Some(&slot) = self.waiting_buf.front() {
            if self.closing {
                break;
            }
            let slot = usize::from(slot);
            if self.reqs[slot].state != ReqState::AwaitBuf {
                self.waiting_buf.pop_front();
                self.state.impossible("a buffer waiter that is not waiting");
                continue;
            }
            self.waiting_buf.pop_front();
            self.reqs[slot].state = ReqState::Exec;
            if !self.start_transfer(slot) {
                self.reqs[slot].state = ReqState::AwaitBuf;
                self.waiting_buf.push_front(slot as u16);
                break;
            }
            served = true;
        }
        served
    }

    /// Fails a command at once, skipping any in-capsule data it carries.
    fn fail_early(&mut self, slot: usize, data_len: u32, status: Status) {
        if data_len == 0 {
            return self.complete(slot, status, 0);
        }
        let r = &mut self.reqs[slot];
        r.state = ReqState::Failed;
        r.status = status;
        self.rx_target = RxTarget::Discard;
    }

    fn dispatch(&mut self, slot: usize) {
        self.reqs[slot].state = ReqState::Exec;
        if self.reqs[slot].digest_err {
            return self.complete(slot, Status::TRANSIENT_TRANSPORT_ERROR, 0);
        }
        if self.reqs[slot].abort_requested {
            // An Abort waited for this command's data: it never runs.
            return self.complete(slot, Status::ABORT_REQUESTED, 0);
        }
        let sqe = self.reqs[slot].sqe;
        if self.auth.as_ref().is_some_and(|a| !a.admitted()) && !is_auth_command(&sqe) {
            return self.complete(slot, Status::AUTHENTICATION_REQUIRED.with_dnr(), 0);
        }
        if sqe.opcode == AdminOpcode::FABRICS.0 {
            return self.fabrics(slot, &sqe);
        }
        match self.qid {
            Some(0) => self.admin(slot, &sqe),
            Some(_) => self.io(slot, &sqe),
            None => self.complete(slot, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0),
        }
    }

    /// Sends the completion (with C2H data on success) and frees the slot.
    fn complete(&mut self, slot: usize, status: Status, dw0: u32) {
        let r = &mut self.reqs[slot];
        if r.state == ReqState::Free {
            // Answering a command twice would hand the host another
            // command's completion; the second answer is dropped.
            return self.state.impossible("completion of a command slot that is free");
        }
        let buf = r.buf.take();
        let cid = r.sqe.cid.get();
        let xfer = r.xfer_len;
        let units = std::mem::take(&mut r.units);
        let (opcode, io_bytes, abort_requested, gen) = (r.sqe.opcode, r.io_bytes, r.abort_requested, r.gen);
        r.state = ReqState::Free;
        r.abort_requested = false;
        self.free.push(slot as u16);
        if abort_requested {
            self.settle_abort_wait(slot, gen, status == Status::ABORT_REQUESTED);
        }
        if self.qid.is_some_and(|q| q > 0) && opcode != IoOpcode::FABRICS.0 {
            self.count_for_smart(opcode, status, io_bytes);
            if let Some(g) = self.state.poll_group(self.reactor) {
                PollGroupStats::add(&g.completed_nvme_io);
            }
        }
        if self.closing {
            self.pool.give(units);
            return;
        }
        let mut send_resp = true;
        let mut units = Some(units);
        if let (Some(buf), true) = (buf, status.is_success() && xfer > 0) {
            let data = buf.slice(0, xfer as usize);
            let success = self.c2h_success && self.qid.is_some_and(|q| q > 0);
            let hdr =
                PduHeader::C2HData(C2HData { cccid: cid, datao: 0, datal: data.len() as u32, last: true, success });
            let cfg = self.txcfg;
            let mut ddgst = false;
            let r = self.tx.push_inline(|out| {
                encode_header(&hdr, data.len() as u32, &cfg, out).map(|e| {
                    ddgst = e.data_digest;
                    e.header_len
                })
            });
            if r.is_err() {
                return self.begin_close("encoding C2HData");
            }
            let digest = if ddgst { Some(data.with(pdu::data_digest)) } else { None };
            // The units come back when the socket has sent the data.
            self.tx.push_data_holding(data, units.take().unwrap_or(0));
            if let Some(d) = digest {
                self.tx.push_bytes(&d.to_le_bytes());
            }
            send_resp = !success;
        }
        if let Some(u) = units {
            self.pool.give(u);
        }
        self.sqhd = if self.sq_entries > 0 { ((u32::from(self.sqhd) + 1) % self.sq_entries) as u16 } else { 0 };
        if send_resp {
            let sqhd = if std::mem::take(&mut self.sqhd_ffff_once) { 0xFFFF } else { self.sqhd };
            let cqe = Cqe {
                dw0: U32::new(dw0),
                sqhd: U16::new(sqhd),
                sqid: U16::new(self.qid.unwrap_or(0)),
                cid: U16::new(cid),
                status: U16::new(status.to_cqe_status(false)),
                ..Cqe::default()
            };
            let hdr = PduHeader::CapsuleResp(CapsuleResp { cqe });
            let cfg = self.txcfg;
            if self.tx.push_inline(|out| encode_header(&hdr, 0, &cfg, out).map(|e| e.header_len)).is_err() {
                self.begin_close("encoding CapsuleResp");
            }
        }
    }

    fn fabrics(&mut self, slot: usize, sqe: &Sqe) {
        let fctype = FabricsCommand::view(sqe).fctype();
        match fctype {
            FabricsCommandType::CONNECT => self.connect(slot, sqe),
            FabricsCommandType::PROPERTY_GET | FabricsCommandType::PROPERTY_SET if self.qid == Some(0) => {
                let Some(ctrl) = self.ctrl.clone() else {
                    return self.complete(slot, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0);
                };
                if fctype == FabricsCommandType::PROPERTY_GET {
                    let cmd = PropertyGetCommand::view(sqe);
                    match admin::property_get(&ctrl, cmd.offset.get(), cmd.size()) {
                        Ok(v) => {
                            // An 8-byte property fills DW0 and DW1 of the completion.
                            self.complete_with_dw1(slot, v);
                        }
                        Err(st) => self.complete(slot, st, 0),
                    }
                } else {
                    let cmd = PropertySetCommand::view(sqe);
                    let st = admin::property_set(&ctrl, cmd.offset.get(), cmd.size(), cmd.value.get());
                    self.complete(slot, st, 0);
                }
            }
            FabricsCommandType::DISCONNECT => {
                self.complete(slot, Status::SUCCESS, 0);
                self.close_after_flush = true;
            }
            FabricsCommandType::AUTHENTICATION_SEND | FabricsCommandType::AUTHENTICATION_RECEIVE => {
                self.authenticate(slot, sqe, fctype == FabricsCommandType::AUTHENTICATION_SEND)
            }
            FabricsCommandType::PROPERTY_GET | FabricsCommandType::PROPERTY_SET => {
                self.complete(slot, Status::INVALID_FIELD.with_dnr(), 0)
            }
            _ => self.complete(slot, Status::INVALID_OPCODE.with_dnr(), 0),
        }
    }

    fn complete_with_dw1(&mut self, slot: usize, v: u64) {
        // The CQE's DW1 is only reachable here: build the response by hand.
        let cid = self.reqs[slot].sqe.cid.get();
        self.reqs[slot].buf = None;
        let units = std::mem::take(&mut self.reqs[slot].units);
        self.pool.give(units);
        self.reqs[slot].state = ReqState::Free;
        self.free.push(slot as u16);
        self.sqhd = if self.sq_entries > 0 { ((u32::from(self.sqhd) + 1) % self.sq_entries) as u16 } else { 0 };
        let cqe = Cqe {
            dw0: U32::new(v as u32),
            dw1: U32::new((v >> 32) as u32),
            sqhd: U16::new(self.sqhd),
            sqid: U16::new(0),
            cid: U16::new(cid),
            status: U16::new(Status::SUCCESS.to_cqe_status(false)),
        };
        let hdr = PduHeader::CapsuleResp(CapsuleResp { cqe });
        let cfg = self.txcfg;
        if self.tx.push_inline(|out| encode_header(&hdr, 0, &cfg, out).map(|e| e.header_len)).is_err() {
            self.begin_close("encoding CapsuleResp");
        }
    }

    fn connect_fail(&mut self, slot: usize, status: Status, dw0: u32) {
        self.complete(slot, status.with_dnr(), dw0);
    }

    fn connect(&mut self, slot: usize, sqe: &Sqe) {
        if self.qid.is_some() {
            return self.complete(slot, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0);
        }
        let cmd = *ConnectCommand::view(sqe);
        let data = self.reqs[slot].buf.as_ref().filter(|b| b.len() >= 1024).map(|b| {
            let mut d = [0u8; 1024];
            b.copy_to(0, &mut d);
            d
        });
        let Some(data) = data.and_then(|d| ConnectData::read_from_bytes(&d).ok()) else {
            return self.connect_fail(slot, Status::CONNECT_INVALID_PARAMETERS, 0);
        };
        let inv = |off: u16, w: InvalidParameterIn| connect_invalid_parameter_dw0(off, w);
        if cmd.recfmt.get() != 0 {
            return self.connect_fail(slot, Status::CONNECT_INCOMPATIBLE_FORMAT, 0);
        }
        let (Ok(subnqn), Ok(hostnqn)) = (read_nqn(&data.subnqn), read_nqn(&data.hostnqn)) else {
            return self.connect_fail(
                slot,
                Status::CONNECT_INVALID_PARAMETERS,
                inv(connect_data_offset::SUBNQN, InvalidParameterIn::Data),
            );
        };
        let (subnqn, hostnqn) = (subnqn.to_string(), hostnqn.to_string());
        let Some(sub) = self.state.subsystem(&subnqn) else {
            return self.connect_fail(
                slot,
                Status::CONNECT_INVALID_PARAMETERS,
                inv(connect_data_offset::SUBNQN, InvalidParameterIn::Data),
            );
        };
        if sub.kind == SubsystemKind::Nvme && !sub.listeners().contains(&self.listen) {
            return self.connect_fail(
                slot,
                Status::CONNECT_INVALID_PARAMETERS,
                inv(connect_data_offset::SUBNQN, InvalidParameterIn::Data),
            );
        }
        if !sub.host_allowed(&hostnqn) {
            tracing::info!(subnqn, hostnqn, "Connect refused: host not allowed");
            return self.connect_fail(slot, Status::CONNECT_INVALID_HOST, 0);
        }
        if let Err(why) = crate::tls::channel_allows(&sub, &hostnqn, &self.stream) {
            tracing::warn!(subnqn, hostnqn, "Connect refused: {why}");
            return self.connect_fail(slot, Status::CONNECT_INVALID_HOST, 0);
        }
        let qid = cmd.qid.get();
        let entries = cmd.sq_entries();
        let kato_ms = cmd.kato.get();
        if qid == 0 {
            if entries < 2 || entries > self.opts.max_aq_depth {
                return self.connect_fail(
                    slot,
                    Status::CONNECT_INVALID_PARAMETERS,
                    inv(connect_command_offset::SQSIZE, InvalidParameterIn::Command),
                );
            }
            if data.cntlid.get() != CNTLID_DYNAMIC {
                return self.connect_fail(
                    slot,
                    Status::CONNECT_INVALID_PARAMETERS,
                    inv(connect_data_offset::CNTLID, InvalidParameterIn::Data),
                );
            }
            let Some(cntlid) = sub.alloc_cntlid() else {
                return self.connect_fail(slot, Status::CONNECT_CONTROLLER_BUSY, 0);
            };
            let ctrl = Arc::new(Ctrl {
                cntlid,
                subsys: sub.clone(),
                hostnqn,
                hostid: data.hostid,
                listen: self.listen.clone(),
                admin_reactor: reactor::current().unwrap_or(0),
                admin_peer: self.stream.tcp().peer_addr().ok(),
                opts: self.opts.clone(),
                kato_ms: kato_ms.into(),
                last_keep_alive_ns: reactor::now_ns().into(),
                dead: false.into(),
                ready: false.into(),
                queues: Mutex::new(Vec::new()),
                retired: QpairStats::default(),
                write_cache_enabled: true.into(),
                admin: Mutex::new(CtrlAdmin {
                    cc: 0,
                    csts: 0,
                    async_event_config: 0,
                    num_io_queues: self.opts.max_io_qpairs_per_ctrlr,
                    arbitration: 0,
                    over_temp_threshold: admin::DEFAULT_OVER_TEMP_THRESHOLD,
                    under_temp_threshold: 0,
                    changed_ns: Vec::new(),
                    admin_auth: None,
                    ns_notice_pending: false,
                    ns_notice_masked: false,
                    ana_notice_pending: false,
                    ana_notice_masked: false,
                    resv: Default::default(),
                }),
                aen_flag: false.into(),
            });
            sub.lock().ctrls.push(Arc::downgrade(&ctrl));
            start_keep_alive_timer(&ctrl);
            tracing::info!(cntlid, subnqn, host = ctrl.hostnqn, kato_ms, "controller created");
            self.ctrl = Some(ctrl);
        } else {
            let Some(ctrl) = sub.find_ctrl(data.cntlid.get()) else {
                return self.connect_fail(
                    slot,
                    Status::CONNECT_INVALID_PARAMETERS,
                    inv(connect_data_offset::CNTLID, InvalidParameterIn::Data),
                );
            };
            if ctrl.hostnqn != hostnqn {
                return self.connect_fail(
                    slot,
                    Status::CONNECT_INVALID_PARAMETERS,
                    inv(connect_data_offset::HOSTNQN, InvalidParameterIn::Data),
                );
            }
            if sub.kind == SubsystemKind::Discovery || !ctrl.ready.load(Ordering::Acquire) {
                return self.connect_fail(slot, Status::COMMAND_SEQUENCE_ERROR, 0);
            }
            // A controller's queues share one path: its ANA states are the
            // admin queue's listener's.
            if sub.ana_reporting && ctrl.listen != self.listen {
                return self.connect_fail(
                    slot,
                    Status::CONNECT_INVALID_PARAMETERS,
                    inv(connect_data_offset::CNTLID, InvalidParameterIn::Data),
                );
            }
            let max_q = ctrl.admin().num_io_queues.min(self.opts.max_io_qpairs_per_ctrlr);
            if u32::from(qid) > max_q {
                return self.connect_fail(
                    slot,
                    Status::CONNECT_INVALID_PARAMETERS,
                    inv(connect_command_offset::QID, InvalidParameterIn::Command),
                );
            }
            if entries < 2 || entries > self.opts.max_queue_depth {
                return self.connect_fail(
                    slot,
                    Status::CONNECT_INVALID_PARAMETERS,
                    inv(connect_command_offset::SQSIZE, InvalidParameterIn::Command),
                );
            }
            {
                let mut q = ctrl.queues();
                if q.iter().any(|r| r.qid == qid) {
                    drop(q);
                    return self.connect_fail(
                        slot,
                        Status::CONNECT_INVALID_PARAMETERS,
                        inv(connect_command_offset::QID, InvalidParameterIn::Command),
                    );
                }
                q.push(QueueRef {
                    qid,
                    reactor: reactor::current().unwrap_or(0),
                    conn_key: self.key,
                    stats: self.stats.clone(),
                    peer: self.stream.tcp().peer_addr().ok(),
                    auth: None,
                });
            }
            let cfg = *self.reader.config();
            self.reader.set_config(RxConfig { max_in_capsule_data_len: self.opts.in_capsule_data_size, ..cfg });
            self.ctrl = Some(ctrl);
        }
        self.qid = Some(qid);
        self.sq_entries = entries;
        let sqfc_disabled = cmd.cattr & cattr::DISABLE_SQ_FLOW_CONTROL != 0;
        // C2HData may replace the response only when no SQHD needs carrying.
        self.c2h_success = self.opts.c2h_success && sqfc_disabled;
        self.sqhd_ffff_once = sqfc_disabled;
        let cntlid = self.ctrl.as_ref().map_or(0, |c| c.cntlid);
        if let Some(g) = self.state.poll_group(self.reactor) {
            PollGroupStats::sub(&g.current_unassociated_qpairs);
            let (total, current) = if qid == 0 {
                (&g.admin_qpairs, &g.current_admin_qpairs)
            } else {
                (&g.io_qpairs, &g.current_io_qpairs)
            };
            PollGroupStats::add(total);
            PollGroupStats::add(current);
        }
        self.refresh_ns();
        // A host with a DH-HMAC-CHAP key authenticates every queue.
        let mut authreq = 0;
        if let Some(c) = self.ctrl.clone().filter(|c| c.subsys.dhchap_keys(&c.hostnqn).is_some()) {
            self.auth = Some(Box::new(QueueAuth::new(c.subsys.clone(), &c.hostnqn, qid)));
            authreq = auth::AUTHREQ_ATR;
        }
        self.complete(slot, Status::SUCCESS, connect_success_dw0(cntlid, authreq));
    }

    /// Authentication Send / Receive: one DH-HMAC-CHAP step ([`auth`]).
    fn authenticate(&mut self, slot: usize, sqe: &Sqe, send: bool) {
        let (secp, spsp0, spsp1, len) = auth::command_fields(sqe);
        let data_len = self.reqs[slot].data_len;
        if secp != auth::SECP_NVME || spsp0 != auth::SPSP || spsp1 != auth::SPSP || len == 0 || len != data_len {
            return self.complete(slot, Status::INVALID_FIELD.with_dnr(), 0);
        }
        let (Some(ctrl), Some(qid)) = (self.ctrl.clone(), self.qid) else {
            return self.complete(slot, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0);
        };
        // Keep-alive traffic: until its admin queue is admitted a host may
        // send nothing else (Keep Alive gets Authentication Required), and a
        // slow host's DH step (seconds for ffdhe8192 on an emulated CPU) can
        // outlast KATO.
        ctrl.last_keep_alive_ns.store(reactor::now_ns(), Ordering::Relaxed);
        // A queue that was not asked to authenticate may still start (the
        // host re-authenticates); without a key it ends in AUTH_Failure1.
        let a = self.auth.get_or_insert_with(|| Box::new(QueueAuth::new(ctrl.subsys.clone(), &ctrl.hostnqn, qid)));
        let Some(buf) = self.reqs[slot].buf.as_ref() else {
            return self.complete(slot, Status::INVALID_FIELD.with_dnr(), 0);
        };
        if send {
            let outcome = buf.with(|m| a.send(m));
            self.publish_auth();
            self.complete(slot, Status::SUCCESS, 0);
            if outcome == SendOutcome::Close {
                self.close_after_flush = true;
            }
            return;
        }
        self.auth_receive(slot);
    }

    /// Answers an Authentication Receive, or parks it while the step's DH
    /// work runs off the reactor (the poll asks again).
    fn auth_receive(&mut self, slot: usize) {
        let (Some(a), Some(buf)) = (self.auth.as_mut(), self.reqs[slot].buf.as_ref()) else {
            return self.complete(slot, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0);
        };
        let outcome = buf.with_mut(|out| a.receive(out));
        self.publish_auth();
        match outcome {
            RecvOutcome::Pending => self.auth_parked = Some(slot),
            RecvOutcome::Message(n) => {
                self.reqs[slot].xfer_len = n as u32;
                self.complete(slot, Status::SUCCESS, 0);
            }
            RecvOutcome::Failure(n) => {
                self.reqs[slot].xfer_len = n as u32;
                self.complete(slot, Status::SUCCESS, 0);
                self.close_after_flush = true;
            }
            RecvOutcome::TooSmall => {
                self.complete(slot, Status::INVALID_FIELD.with_dnr(), 0);
                self.close_after_flush = true;
            }
        }
    }

    /// Shows the queue's authentication state in `nvmf_subsystem_get_qpairs`
    /// (a control-path step, once per authentication message).
    fn publish_auth(&self) {
        let (Some(ctrl), Some(qid), Some(a)) = (self.ctrl.as_ref(), self.qid, self.auth.as_ref()) else {
            return;
        };
        let view = Some(a.view());
        if qid == 0 {
            ctrl.admin.lock().unwrap_or_else(|e| e.into_inner()).admin_auth = view;
        } else if let Some(q) = ctrl.queues().iter_mut().find(|q| q.qid == qid) {
            q.auth = view;
        }
    }

    fn refresh_ns(&mut self) {
        let Some(ctrl) = self.ctrl.clone() else {
            return;
        };
        let sub: &Arc<Subsystem> = &ctrl.subsys;
        let gen = sub.generation.load(Ordering::Acquire);
        if sub.kind == SubsystemKind::Nvme && !sub.listeners().contains(&self.listen) {
            self.ns_gen = gen;
            return self.begin_close("listener removed");
        }
        self.ns.clear();
        if self.qid.is_some_and(|q| q > 0) {
            for n in sub.namespaces_of(&ctrl.hostnqn) {
                if let Ok(ch) = n.bdev.channel() {
                    let p = n.bdev.props();
                    self.ns.push(NsIo {
                        nsid: n.nsid,
                        block_shift: p.block_size.trailing_zeros(),
                        // Refreshed with the generation a resize bumps.
                        num_blocks: n.bdev.num_blocks(),
                        ch,
                        ana_blocked: sub.ana_state(&self.listen, n.anagrpid()).io_status(),
                        resv: n.resv.clone(),
                        // Computed at the first IO while a reservation is held.
                        resv_gen: 0,
                        access: Access::ALL,
                    });
                }
            }
        }
        self.ns_gen = gen;
    }

    fn admin(&mut self, slot: usize, sqe: &Sqe) {
        let Some(ctrl) = self.ctrl.clone() else {
            return self.complete(slot, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0);
        };
        if sqe.opcode == AdminOpcode::ABORT.0 && ctrl.subsys.kind == SubsystemKind::Nvme {
            return self.abort_cmd(slot, sqe);
        }
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        let outcome = admin::admin_cmd(&ctrl, sqe, self.reqs[slot].buf.as_ref(), &mut out, self.portid);
        match outcome {
            AdminOutcome::Done { status, dw0 } => {
                let r = &mut self.reqs[slot];
                if let Some(buf) = r.buf.as_ref() {
                    let n = out.len().min(buf.len());
                    buf.copy_from(0, &out[..n]);
                    r.xfer_len = if DataDirection::from_opcode(sqe.opcode) == DataDirection::ControllerToHost {
                        buf.len() as u32
                    } else {
                        0
                    };
                    if n < buf.len() && r.xfer_len > 0 {
                        buf.with_mut(|b| b[n..].fill(0));
                    }
                }
                self.scratch = out;
                self.complete(slot, status, dw0);
            }
            AdminOutcome::AsyncEventRequest => {
                self.scratch = out;
                if self.aers.len() >= MAX_AERS {
                    return self.complete(slot, Status::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED.with_dnr(), 0);
                }
                self.reqs[slot].state = ReqState::Parked;
                self.aers.push(slot);
                self.deliver_aen();
            }
            AdminOutcome::FlushNamespaces => {
                self.scratch = out;
                self.flush_namespaces(slot, &ctrl);
            }
            AdminOutcome::Persist { status, job } => {
                self.scratch = out;
                self.persist_then_complete(slot, status, job);
            }
        }
    }

    /// Writes back every namespace's volatile cache (the host turned the
    /// write cache off); the command completes when every flush is done.
    fn flush_namespaces(&mut self, slot: usize, ctrl: &Arc<Ctrl>) {
        let mut chans = Vec::new();
        for n in ctrl.subsys.namespaces() {
            if n.bdev.bdev().io_type_supported(IoType::Flush) && n.bdev.bdev().has_write_cache() {
                match n.bdev.channel() {
                    Ok(ch) => chans.push(ch),
                    Err(_) => return self.complete(slot, Status::INTERNAL_ERROR, 0),
                }
            }
        }
        if chans.is_empty() {
            return self.complete(slot, Status::SUCCESS, 0);
        }
        self.reqs[slot].pending = chans.len() as u32;
        for ch in chans {
            let Some(mut io) = IoBox::data(IoType::Flush, 0, 0, None) else {
                let r = &mut self.reqs[slot];
                r.status = Status::INTERNAL_ERROR;
                r.pending -= 1;
                if r.pending == 0 {
                    self.complete(slot, Status::INTERNAL_ERROR, 0);
                }
                continue;
            };
            io.tag = slot as u64;
            io.tag2 = u64::from(self.reqs[slot].gen);
            if let Some(d) = &self.done {
                io.set_done(d.clone());
            }
            if let Some(g) = self.state.poll_group(self.reactor) {
                PollGroupStats::add(&g.pending_bdev_io);
            }
            ch.submit(io);
        }
    }

    /// Writes a reservation state to its `ptpl_file` on a helper thread
    /// (a reactor never waits on a disk), then answers the command on this
    /// queue's reactor: with `status` once the state is durable, with
    /// Internal Error when it could not be written.
    fn persist_then_complete(&mut self, slot: usize, status: Status, job: PersistJob) {
        let (key, gen) = (self.key, self.reqs[slot].gen);
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new().name("nvmf_ptpl".into()).spawn(move || {
            let _ = tx.send(job.write());
        });
        if spawned.is_err() {
            return self.complete(slot, Status::INTERNAL_ERROR, 0);
        }
        reactor::register_timed_poller("nvmf_ptpl_write", Duration::from_micros(200), move || {
            let st = match rx.try_recv() {
                Err(std::sync::mpsc::TryRecvError::Empty) => return reactor::PollStatus::Idle,
                Ok(Ok(())) => status,
                Ok(Err(e)) => {
                    tracing::error!(error = e, "reservation state not persisted");
                    Status::INTERNAL_ERROR
                }
                Err(std::sync::mpsc::TryRecvError::Disconnected) => Status::INTERNAL_ERROR,
            };
            // Gone when the queue closed meanwhile: nobody waits then.
            if let Some(c) = lookup(key) {
                let mut c = c.borrow_mut();
                if c.reqs.get(slot).is_some_and(|r| r.gen == gen && r.state == ReqState::Exec) {
                    c.complete(slot, st, 0);
                }
            }
            reactor::PollStatus::Done
        });
    }

    fn deliver_aen(&mut self) {
        let Some(ctrl) = self.ctrl.clone() else {
            return;
        };
        ctrl.aen_flag.store(false, Ordering::Release);
        loop {
            let mut a = ctrl.admin();
            let dw0 = if a.ns_notice_pending && !a.ns_notice_masked {
                Ctrl::ns_notice_dword()
            } else if a.ana_notice_pending && !a.ana_notice_masked {
                Ctrl::ana_notice_dword()
            } else if a.resv.notice_pending && !a.resv.notice_masked {
                Ctrl::reservation_notice_dword()
            } else {
                return;
            };
            let Some(slot) = self.aers.pop() else { return };
            // Each notice stays masked until the host reads its log page.
            if dw0 == Ctrl::ns_notice_dword() {
                a.ns_notice_pending = false;
                a.ns_notice_masked = true;
            } else if dw0 == Ctrl::reservation_notice_dword() {
                a.resv.notice_pending = false;
                a.resv.notice_masked = true;
            } else {
                a.ana_notice_pending = false;
                a.ana_notice_masked = true;
            }
            drop(a);
            self.reqs[slot].state = ReqState::Exec;
            self.complete(slot, Status::SUCCESS, dw0);
        }
    }
}

/// Tears the controller down when its host goes silent for longer than
/// KATO: a timed poller on the reactor of the admin queue.
/// Authentication Send or Receive: what a queue still authenticating serves.
fn is_auth_command(sqe: &Sqe) -> bool {
    sqe.opcode == AdminOpcode::FABRICS.0
        && matches!(
            FabricsCommand::view(sqe).fctype(),
            FabricsCommandType::AUTHENTICATION_SEND | FabricsCommandType::AUTHENTICATION_RECEIVE
        )
}

fn start_keep_alive_timer(ctrl: &Arc<Ctrl>) {
    let weak = Arc::downgrade(ctrl);
    reactor::register_timed_poller("nvmf_keep_alive", Duration::from_millis(50), move || {
        let Some(c) = weak.upgrade() else {
            return reactor::PollStatus::Done;
        };
        if c.is_dead() {
            return reactor::PollStatus::Done;
        }
        let kato_ms = u64::from(c.kato_ms.load(Ordering::Relaxed));
        if kato_ms == 0 {
            return reactor::PollStatus::Idle;
        }
        let idle_ns = reactor::now_ns().saturating_sub(c.last_keep_alive_ns.load(Ordering::Relaxed));
        if idle_ns > kato_ms * 1_000_000 {
            c.kill("keep alive timeout expired");
            return reactor::PollStatus::Done;
        }
        reactor::PollStatus::Idle
    });
}
