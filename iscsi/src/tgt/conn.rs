//! One iSCSI connection on the target, owned and polled by one reactor
//! (non-blocking socket, no thread): receive framing, dispatch by opcode,
//! the CmdSN window and StatSN, NOP-In pings, Text (SendTargets), Logout,
//! Reject, and the orderly close that waits for every command still at the
//! SCSI layer before anything is freed. The login phase lives in
//! [`super::login`], SCSI commands, data transfer and task management in
//! [`super::task`].
//!
//! nvraid negotiates MaxConnections=1, so a session is its connection: the
//! session state (CmdSN window, LUN channels, nexus) lives here, on one
//! reactor, and the IO path takes no lock.

use super::login::LoginState;
use super::task::{IttIndex, LunSlot, PendingTmf, Task, TaskState};
use super::{ConnInfo, IscsiState, TargetNode, MAX_RECV_DATA_SEGMENT_LENGTH};
use crate::pdu::{self, encode_header, frame, off, op, reject, Bhs, FrameError, RxLimits, BHS_LEN, RESERVED_TAG};
use crate::scsi::{Nexus, ScsiCompletion, ScsiDone};
use crate::text::{self, SessionParams};
use sock::{RxBuf, RxFill};
use std::cell::RefCell;
use std::net::{SocketAddr, TcpStream};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// The transmit queue; 64 bytes inline per segment: a BHS with its digest,
/// or a digest and padding, or a piece of a text response.
pub(super) type TxQueue = sock::TxQueue<64>;
/// Receive staging: one whole PDU of the largest data segment accepted,
/// with a maximal AHS and both digests, and room for the next header.
const RX_BUF_LEN: usize = 2 * (BHS_LEN + pdu::MAX_AHS_LEN + 8 + MAX_RECV_DATA_SEGMENT_LENGTH as usize);
/// Stop reading while this much output waits (backpressure).
const TX_HIGH_WATER: usize = 4 << 20;
/// How long a closing connection tries to flush its last words.
const CLOSE_FLUSH_NS: u64 = 200_000_000;
/// How long a connection may take to log in.
const LOGIN_TIMEOUT_NS: u64 = 30_000_000_000;
/// How long the target waits for a Logout after asking for one at shutdown.
const LOGOUT_WAIT_NS: u64 = 1_000_000_000;

/// What a full-feature session is.
pub(super) struct Session {
    pub(super) tsih: u16,
    pub(super) discovery: bool,
    pub(super) node: Option<Arc<TargetNode>>,
    pub(super) initiator_name: String,
    pub(super) nexus: Nexus,
    pub(super) cid: u16,
}

pub(crate) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) pg_tag: i32,
    pub(super) state: Arc<IscsiState>,
    pub(super) info: Arc<ConnInfo>,
    rx: RxBuf,
    pub(super) tx: TxQueue,
    /// Receive limits and digests in force.
    pub(super) lim: RxLimits,
    /// Digests on what the target sends.
    pub(super) tx_header_digest: bool,
    pub(super) tx_data_digest: bool,
    pub(super) login: Option<Box<LoginState>>,
    pub(super) sess: Option<Session>,
    pub(super) params: SessionParams,
    pub(super) tasks: Vec<Task>,
    pub(super) free: Vec<u16>,
    /// The slots in use by ITT.
    pub(super) itt_index: IttIndex,
    /// Commands the window admits (the target node's queue depth).
    pub(super) window: u32,
    pub(super) luns: Vec<LunSlot>,
    pub(super) luns_gen: u64,
    pub(super) stat_sn: u32,
    /// The newest ExpStatSN the initiator sent: StatSNs below it are
    /// acknowledged.
    pub(super) exp_stat_sn: u32,
    pub(super) exp_cmd_sn: u32,
    pub(super) tmf: Option<PendingTmf>,
    pub(super) done: Option<Rc<dyn ScsiDone>>,
    /// A Logout waits for the connection's commands to finish: its ITT.
    logout_itt: Option<u32>,
    /// A Text response too long for one PDU: the rest, and its TTT.
    text_rest: Vec<u8>,
    text_ttt: u32,
    /// NOP-In ping interval and answer timeout (0: never), from the options.
    nop_in_interval_ns: u64,
    nop_timeout_ns: u64,
    /// Target-initiated ping: its TTT and when it went out.
    ping: Option<(u32, u64)>,
    next_ping_ttt: u32,
    last_rx_ns: u64,
    /// When the connection was accepted (the login deadline counts from it).
    started_ns: u64,
    /// Shutdown asked the initiator to log out, at this time.
    logout_asked_ns: Option<u64>,
    pub(super) closing: bool,
    pub(super) close_after_flush: bool,
    close_deadline_ns: u64,
    socket_shut: bool,
}

/// Completions from the SCSI layer come back here.
struct ConnScsiDone(Weak<RefCell<Conn>>);

impl ScsiDone for ConnScsiDone {
    fn scsi_done(&self, c: ScsiCompletion) {
        match self.0.upgrade() {
            Some(conn) => conn.borrow_mut().scsi_done(c),
            // A closing connection lives until its last command is back.
            None => IscsiState::get().impossible("SCSI completion for a connection that is gone"),
        }
    }
}

/// Takes over an accepted connection on the current reactor.
pub(crate) fn start(stream: TcpStream, peer: SocketAddr, local: SocketAddr, pg_tag: i32) {
    if let Err(e) = stream.set_nonblocking(true).and_then(|()| stream.set_nodelay(true)) {
        tracing::warn!("iSCSI connection setup: {e}");
        return;
    }
    let state = IscsiState::get();
    if state.shutting_down.load(Ordering::Acquire) {
        return;
    }
    state.connections.fetch_add(1, Ordering::AcqRel);
    let info = Arc::new(ConnInfo {
        id: state.new_conn_id(),
        reactor: reactor::current().unwrap_or(0),
        pg_tag,
        initiator_addr: peer.ip().to_string(),
        target_addr: local.ip().to_string(),
        cid: AtomicU16::new(0),
        tsih: AtomicU16::new(0),
        phase: AtomicU32::new(0),
        exiting: AtomicBool::new(false),
        target_node: Mutex::new(None),
        initiator_name: Mutex::new(String::new()),
        kill: AtomicBool::new(false),
    });
    state.register_conn(info.clone());
    let slots = crate::scsi::QUEUE_DEPTH;
    let now = reactor::now_ns();
    let opts = state.options();
    let conn = Rc::new(RefCell::new(Conn {
        stream,
        peer,
        pg_tag,
        state,
        info,
        rx: RxBuf::new(RX_BUF_LEN),
        tx: TxQueue::with_capacity(slots * 8 + 64),
        lim: RxLimits { header_digest: false, data_digest: false, max_data_len: 8192 },
        tx_header_digest: false,
        tx_data_digest: false,
        login: Some(Box::default()),
        sess: None,
        params: SessionParams::rfc_defaults(),
        tasks: (0..slots).map(|_| Task::default()).collect(),
        free: (0..slots as u16).rev().collect(),
        itt_index: IttIndex::new(slots),
        window: 1,
        luns: Vec::new(),
        luns_gen: 0,
        stat_sn: 0,
        exp_stat_sn: 0,
        exp_cmd_sn: 0,
        tmf: None,
        done: None,
        logout_itt: None,
        text_rest: Vec::new(),
        text_ttt: 0,
        nop_in_interval_ns: u64::from(opts.nop_in_interval) * 1_000_000_000,
        nop_timeout_ns: u64::from(opts.nop_timeout) * 1_000_000_000,
        ping: None,
        next_ping_ttt: 1,
        last_rx_ns: now,
        started_ns: now,
        logout_asked_ns: None,
        closing: false,
        close_after_flush: false,
        close_deadline_ns: 0,
        socket_shut: false,
    }));
    let done: Rc<dyn ScsiDone> = Rc::new(ConnScsiDone(Rc::downgrade(&conn)));
    conn.borrow_mut().done = Some(done);
    reactor::register_poller("iscsi_conn", move || conn.borrow_mut().poll());
}

/// Serial number arithmetic (RFC 1982, 32 bits): a < b.
pub(super) fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 1 << 31
}

impl Conn {
    fn poll(&mut self) -> reactor::PollStatus {
        if self.closing {
            return self.poll_closing();
        }
        if self.info.kill.load(Ordering::Acquire) {
            self.begin_close("ended by the target (reinstated, deleted or removed)");
            return reactor::PollStatus::Busy;
        }
        if self.state.shutting_down.load(Ordering::Relaxed) {
            self.ask_logout_for_shutdown();
        }
        if let Some(node) = self.sess.as_ref().and_then(|s| s.node.as_ref()) {
            if node.deleted.load(Ordering::Acquire) {
                self.begin_close("target node deleted");
                return reactor::PollStatus::Busy;
            }
            if node.generation.load(Ordering::Acquire) != self.luns_gen {
                let node = node.clone();
                self.refresh_luns(&node);
            }
        }
        let mut busy = false;
        // One clock read per poll serves the receive stamp and the timers.
        let now = reactor::now_ns();
        if self.tx.queued_bytes() < TX_HIGH_WATER && !self.close_after_flush {
            busy |= self.poll_rx(now);
        }
        self.acknowledge_aborted_responses(now);
        if self.tmf.is_some() {
            self.finish_tmf();
        }
        if self.logout_itt.is_some() && self.in_flight() == 0 {
            self.send_logout_response();
        }
        self.keepalive(now);
        // Not closing, so the socket is open: a failed send ends the connection.
        busy |= self.tx.send(&mut self.stream).unwrap_or_else(|e| {
            self.begin_close(&format!("send failed: {e}"));
            true
        });
        if self.close_after_flush && self.tx.is_empty() && !self.closing {
            self.begin_close("logged out or login ended");
        }
        if busy {
            reactor::PollStatus::Busy
        } else {
            reactor::PollStatus::Idle
        }
    }

    /// Commands handed to the SCSI layer and not yet back.
    pub(super) fn in_flight(&self) -> usize {
        self.tasks.iter().filter(|t| t.state == TaskState::Exec).count()
    }

    /// Starts the close: no more input; commands at the SCSI layer are
    /// waited for (their buffers and slots stay until each has come back);
    /// the socket shuts once output is flushed.
    pub(super) fn begin_close(&mut self, why: &str) {
        if self.closing {
            return;
        }
        tracing::debug!(peer = %self.peer, why, "iSCSI connection closing");
        self.closing = true;
        self.close_deadline_ns = reactor::now_ns() + CLOSE_FLUSH_NS;
        self.info.exiting.store(true, Ordering::Release);
        // No acknowledgement will come: a reset of another session waits
        // for this connection's aborted tasks to end, not for its StatSN.
        for l in &self.luns {
            l.ch.responses_acknowledged(u64::MAX);
        }
        // Tasks still gathering Data-Out never reached the SCSI layer.
        for i in 0..self.tasks.len() {
            if self.tasks[i].state == TaskState::DataOut {
                self.release_task(i);
            }
        }
    }

    fn poll_closing(&mut self) -> reactor::PollStatus {
        if !self.socket_shut {
            self.socket_shut = self.tx.flush_then_shutdown(&mut self.stream, self.close_deadline_ns);
        }
        // Nothing is freed while the SCSI layer may still complete into it.
        if !self.socket_shut || self.in_flight() > 0 {
            return reactor::PollStatus::Idle;
        }
        if let Some(s) = &self.sess {
            for l in &self.luns {
                l.lun.nexus_lost(&s.nexus);
            }
        }
        self.luns.clear();
        self.done = None;
        self.state.unregister_conn(&self.info);
        self.state.connections.fetch_sub(1, Ordering::AcqRel);
        reactor::PollStatus::Done
    }

    fn poll_rx(&mut self, now: u64) -> bool {
        let mut busy = false;
        for _ in 0..8 {
            if self.closing || self.close_after_flush {
                break;
            }
            // A read that leaves room in the buffer emptied the socket: the
            // next read would only say so (a syscall per poll saved).
            let mut drained = true;
            match self.rx.fill(&mut self.stream) {
                Ok(RxFill::Bytes) => {
                    busy = true;
                    drained = self.rx.pending().len() < RX_BUF_LEN;
                }
                Ok(RxFill::WouldBlock) => {}
                Ok(RxFill::Closed) => {
                    self.begin_close("initiator closed the connection");
                    return true;
                }
                Err(e) => {
                    self.begin_close(&format!("receive failed: {e}"));
                    return true;
                }
            }
            let before = self.rx.pending().len();
            self.process();
            if self.rx.pending().len() == before {
                break;
            }
            self.last_rx_ns = now;
            if drained {
                break;
            }
        }
        busy
    }

    /// Handles every complete PDU in the staging buffer.
    fn process(&mut self) {
        while !self.closing && !self.close_after_flush {
            let f = match frame(self.rx.pending(), &self.lim) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(FrameError::HeaderDigest) => {
                    // The lengths cannot be trusted: nothing else to do.
                    self.begin_close("header digest error");
                    return;
                }
                Err(e @ FrameError::Oversized(..)) => {
                    let bhs = self.peek_bhs();
                    tracing::info!(peer = %self.peer, "iSCSI protocol error: {e}");
                    self.send_reject(reject::PROTOCOL_ERROR, &bhs);
                    self.close_after_flush = true;
                    return;
                }
            };
            // The data is handed out from the staging buffer, which is
            // moved aside meanwhile (an empty one allocates nothing).
            let rx = std::mem::take(&mut self.rx);
            let data = &rx.pending()[f.data_off..f.data_off + f.data_len];
            if f.data_digest_bad {
                tracing::info!(peer = %self.peer, "iSCSI data digest error");
                self.send_reject(reject::DATA_DIGEST, &f.bhs);
                self.close_after_flush = true;
            } else if self.login.is_some() {
                self.login_pdu(&f.bhs, data);
            } else {
                self.full_feature_pdu(&f.bhs, data);
            }
            self.rx = rx;
            self.rx.consume(f.total_len);
        }
    }

    fn peek_bhs(&self) -> Bhs {
        let mut h = [0u8; BHS_LEN];
        let p = self.rx.pending();
        let n = p.len().min(BHS_LEN);
        h[..n].copy_from_slice(&p[..n]);
        Bhs(h)
    }

    fn full_feature_pdu(&mut self, bhs: &Bhs, data: &[u8]) {
        // Every initiator PDU carries ExpStatSN; one beyond what was sent
        // acknowledges nothing.
        let ack = bhs.u32_at(off::W28);
        if sn_lt(self.exp_stat_sn, ack) && !sn_lt(self.stat_sn, ack) {
            self.exp_stat_sn = ack;
        }
        match bhs.opcode() {
            op::SCSI_CMD => {
                if self.sess.as_ref().is_some_and(|s| s.discovery) {
                    // A discovery session carries only Text, NOP and Logout.
                    self.send_reject(reject::PROTOCOL_ERROR, bhs);
                    self.close_after_flush = true;
                } else if self.accept_cmd_sn(bhs) {
                    self.scsi_command(bhs, data);
                }
            }
            op::DATA_OUT => self.data_out(bhs, data),
            op::NOP_OUT => self.nop_out(bhs, data),
            op::TMF_REQ => {
                if self.accept_cmd_sn(bhs) {
                    self.tmf_request(bhs);
                }
            }
            op::TEXT_REQ => {
                if self.accept_cmd_sn(bhs) {
                    self.text_request(bhs, data);
                }
            }
            op::LOGOUT_REQ => {
                if self.accept_cmd_sn(bhs) {
                    self.logout_request(bhs);
                }
            }
            op::SNACK => self.send_reject(reject::NOT_SUPPORTED, bhs),
            op::LOGIN_REQ => {
                self.send_reject(reject::PROTOCOL_ERROR, bhs);
                self.close_after_flush = true;
            }
            _ => self.send_reject(reject::NOT_SUPPORTED, bhs),
        }
    }

    /// The CmdSN window (RFC 7143 4.2.2.1): an immediate command is taken
    /// as it comes; a non-immediate one must be the next expected, and one
    /// outside the window is silently ignored.
    pub(super) fn accept_cmd_sn(&mut self, bhs: &Bhs) -> bool {
        let sn = bhs.u32_at(off::W24);
        if bhs.immediate() {
            return true;
        }
        if sn == self.exp_cmd_sn {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            return true;
        }
        tracing::debug!(peer = %self.peer, sn, exp = self.exp_cmd_sn, "iSCSI command outside the CmdSN window ignored");
        false
    }

    /// MaxCmdSN: the window closes as task slots fill.
    pub(super) fn max_cmd_sn(&self) -> u32 {
        let used = self.tasks.len() - self.free.len();
        let open = (self.window as usize).saturating_sub(used) as u32;
        self.exp_cmd_sn.wrapping_add(open).wrapping_sub(1)
    }

    /// Fills StatSN (advancing it if `advance`), ExpCmdSN and MaxCmdSN.
    pub(super) fn stamp(&mut self, bhs: &mut Bhs, advance: bool) {
        bhs.set_u32(off::W24, self.stat_sn);
        if advance {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        bhs.set_u32(off::W28, self.exp_cmd_sn);
        bhs.set_u32(off::W32, self.max_cmd_sn());
    }

    /// Queues a PDU whose data segment is `data` (copied).
    pub(super) fn send_pdu(&mut self, mut bhs: Bhs, data: &[u8]) {
        bhs.set_data_len(data.len() as u32);
        let mut h = [0u8; pdu::MAX_TX_HEADER];
        let n = encode_header(&bhs, self.tx_header_digest, &mut h);
        self.tx.push_bytes(&h[..n]);
        if data.is_empty() {
            return;
        }
        self.tx.push_bytes(data);
        let pad = [0u8; 4];
        let p = pdu::pad_len(data.len());
        self.tx.push_bytes(&pad[..p]);
        if self.tx_data_digest {
            let d = pdu::digest(&[data, &pad[..p]]);
            self.tx.push_bytes(&d.to_le_bytes());
        }
    }

    /// Reject (RFC 7143 11.17): the offending header is the data.
    pub(super) fn send_reject(&mut self, reason: u8, bad: &Bhs) {
        let mut r = Bhs::new(op::REJECT);
        r.set_flags(0x80);
        r.set_byte(2, reason);
        r.set_u32(off::ITT, RESERVED_TAG);
        // A Reject does not advance StatSN.
        self.stamp(&mut r, false);
        let bad = bad.0;
        self.send_pdu(r, &bad);
    }

    fn nop_out(&mut self, bhs: &Bhs, data: &[u8]) {
        let itt = bhs.itt();
        let ttt = bhs.u32_at(off::W20);
        if itt == RESERVED_TAG {
            // The answer to a target ping (or a ping that wants no answer).
            if self.ping.is_some_and(|(t, _)| t == ttt) {
                self.ping = None;
            }
            return;
        }
        if !self.accept_cmd_sn(bhs) {
            return;
        }
        let mut r = Bhs::new(op::NOP_IN);
        r.set_flags(0x80);
        r.set_lun(bhs.lun());
        r.set_u32(off::ITT, itt);
        r.set_u32(off::W20, RESERVED_TAG);
        self.stamp(&mut r, true);
        let n = data.len().min(self.params.initiator_max_recv as usize);
        self.send_pdu(r, &data[..n]);
    }

    /// Pings an idle initiator every nop_in_interval; ends the connection
    /// when a ping goes unanswered for nop_timeout.
    fn keepalive(&mut self, now: u64) {
        if self.closing {
            return;
        }
        if self.login.is_some() {
            if now.saturating_sub(self.started_ns) > LOGIN_TIMEOUT_NS {
                self.begin_close("login not finished in time");
            }
            return;
        }
        if let Some((_, sent)) = self.ping {
            if self.nop_timeout_ns > 0 && now.saturating_sub(sent) > self.nop_timeout_ns {
                self.begin_close("NOP-In ping unanswered");
            }
            return;
        }
        if now.saturating_sub(self.last_rx_ns) < self.nop_in_interval_ns {
            return;
        }
        self.send_ping(now);
        self.last_rx_ns = now;
    }

    /// A NOP-In that asks for an answer (a target transfer tag); the answer
    /// also carries the initiator's ExpStatSN. Unanswered for nop_timeout,
    /// it ends the connection.
    pub(super) fn send_ping(&mut self, now: u64) {
        if self.ping.is_some() {
            return;
        }
        let ttt = self.next_ping_ttt;
        self.next_ping_ttt = self.next_ping_ttt.wrapping_add(1).max(1);
        let mut r = Bhs::new(op::NOP_IN);
        r.set_flags(0x80);
        r.set_u32(off::ITT, RESERVED_TAG);
        r.set_u32(off::W20, ttt);
        self.stamp(&mut r, false);
        self.send_pdu(r, &[]);
        self.ping = Some((ttt, now));
    }

    fn text_request(&mut self, bhs: &Bhs, data: &[u8]) {
        let itt = bhs.itt();
        let ttt = bhs.u32_at(off::W20);
        if ttt != RESERVED_TAG && ttt == self.text_ttt && !self.text_rest.is_empty() {
            // The initiator asks for the rest of a long response.
            let rest = std::mem::take(&mut self.text_rest);
            self.send_text_response(itt, bhs.lun(), &rest);
            return;
        }
        self.text_rest.clear();
        let pairs = match text::parse(data) {
            Ok(p) => p,
            Err(e) => {
                tracing::info!(peer = %self.peer, "iSCSI Text: {e}");
                self.send_reject(reject::PROTOCOL_ERROR, bhs);
                return;
            }
        };
        let Some(sess) = &self.sess else {
            return;
        };
        let mut out = Vec::new();
        for (k, v) in &pairs {
            if k == "SendTargets" {
                let only = match v.as_str() {
                    "All" if sess.discovery => None,
                    "All" | "" => sess.node.as_ref().map(|n| n.name.as_str()),
                    name => Some(name),
                };
                let addr = self.peer.ip();
                self.state.send_targets(&sess.initiator_name, addr, only, &mut out);
            } else {
                text::push(&mut out, k, "NotUnderstood");
            }
        }
        self.send_text_response(itt, bhs.lun(), &out);
    }

    fn send_text_response(&mut self, itt: u32, lun: u64, data: &[u8]) {
        let max = self.params.initiator_max_recv as usize;
        let mut r = Bhs::new(op::TEXT_RESP);
        r.set_lun(lun);
        r.set_u32(off::ITT, itt);
        let (now, rest) = data.split_at(data.len().min(max));
        if rest.is_empty() {
            r.set_flags(0x80);
            r.set_u32(off::W20, RESERVED_TAG);
        } else {
            // C bit: more follows when the initiator asks with this TTT.
            r.set_flags(0x40);
            self.text_ttt = self.text_ttt.wrapping_add(1) & 0x7fff_ffff;
            r.set_u32(off::W20, self.text_ttt);
            self.text_rest = rest.to_vec();
        }
        self.stamp(&mut r, true);
        self.send_pdu(r, now);
    }

    fn logout_request(&mut self, bhs: &Bhs) {
        let reason = bhs.flags() & 0x7f;
        let cid = bhs.u16_at(off::W20);
        let my_cid = self.sess.as_ref().map_or(0, |s| s.cid);
        let response = match reason {
            0 => 0,
            1 if cid == my_cid => 0,
            1 => 1,
            // Connection recovery needs ErrorRecoveryLevel 2.
            2 => 2,
            _ => {
                self.send_reject(reject::PROTOCOL_ERROR, bhs);
                return;
            }
        };
        if response != 0 {
            let mut r = Bhs::new(op::LOGOUT_RESP);
            r.set_flags(0x80);
            r.set_byte(2, response);
            r.set_u32(off::ITT, bhs.itt());
            self.stamp(&mut r, true);
            self.send_pdu(r, &[]);
            return;
        }
        // The connection's commands end before the response (ERL 0: they
        // are aborted), then the connection closes.
        for l in &self.luns {
            l.ch.abort_all();
        }
        for i in 0..self.tasks.len() {
            if self.tasks[i].state == TaskState::DataOut {
                self.release_task(i);
            }
        }
        self.logout_itt = Some(bhs.itt());
        self.info.exiting.store(true, Ordering::Release);
    }

    fn send_logout_response(&mut self) {
        let Some(itt) = self.logout_itt.take() else {
            return;
        };
        let mut r = Bhs::new(op::LOGOUT_RESP);
        r.set_flags(0x80);
        r.set_u32(off::ITT, itt);
        self.stamp(&mut r, true);
        // Time2Wait / Time2Retain: no reconnection state is kept (ERL 0).
        r.set_u16(40, 0);
        r.set_u16(42, 0);
        self.send_pdu(r, &[]);
        self.close_after_flush = true;
    }

    /// At shutdown: an Async Message asks the initiator to log out; the
    /// connection ends when it does, or a second later.
    fn ask_logout_for_shutdown(&mut self) {
        let now = reactor::now_ns();
        match self.logout_asked_ns {
            None if self.login.is_none() && self.sess.is_some() => {
                let mut r = Bhs::new(op::ASYNC);
                r.set_flags(0x80);
                r.set_lun(0);
                r.set_u32(off::ITT, RESERVED_TAG);
                self.stamp(&mut r, true);
                r.set_byte(36, 1); // AsyncEvent 1: the target requests a logout.
                r.set_u16(42, 1); // Parameter3: seconds to log out in.
                self.send_pdu(r, &[]);
                self.logout_asked_ns = Some(now);
            }
            None => {
                self.begin_close("target shutting down");
            }
            Some(t) if now.saturating_sub(t) > LOGOUT_WAIT_NS => self.begin_close("target shutting down"),
            Some(_) => {}
        }
    }

    fn refresh_luns(&mut self, node: &Arc<TargetNode>) {
        self.luns_gen = node.generation.load(Ordering::Acquire);
        let Some(done) = self.done.clone() else {
            return;
        };
        let now = node.luns();
        for slot in self.luns.iter_mut() {
            if !now.iter().any(|l| Arc::ptr_eq(l, &slot.lun)) {
                slot.gone = true;
            }
        }
        for lun in now {
            if self.luns.iter().any(|l| Arc::ptr_eq(&l.lun, &lun)) {
                continue;
            }
            match crate::scsi::LunChannel::open(&lun, done.clone()) {
                Ok(ch) => {
                    let responses_acked = ch.aborts_answered().unwrap_or(0);
                    self.luns.push(LunSlot { id: lun.id(), lun, ch, gone: false, responses_acked, ack_wait: None })
                }
                Err(e) => tracing::warn!(lun = lun.id(), "iSCSI: opening a channel to the LUN's bdev: {e}"),
            }
        }
    }

    /// Enters full feature phase with `sess` (after the final login response).
    pub(super) fn enter_full_feature(&mut self, sess: Session, window: u32) {
        self.window = window.min(self.tasks.len() as u32).max(1);
        self.info.phase.store(2, Ordering::Release);
        self.info.tsih.store(sess.tsih, Ordering::Relaxed);
        self.info.cid.store(sess.cid, Ordering::Relaxed);
        *self.info.target_node.lock().unwrap_or_else(|e| e.into_inner()) = sess.node.clone();
        *self.info.initiator_name.lock().unwrap_or_else(|e| e.into_inner()) = sess.initiator_name.clone();
        if let Some(node) = sess.node.clone() {
            self.sess = Some(sess);
            self.refresh_luns(&node);
        } else {
            self.sess = Some(sess);
        }
        self.lim = RxLimits {
            header_digest: self.params.header_digest,
            data_digest: self.params.data_digest,
            max_data_len: MAX_RECV_DATA_SEGMENT_LENGTH,
        };
        self.tx_header_digest = self.params.header_digest;
        self.tx_data_digest = self.params.data_digest;
        self.last_rx_ns = reactor::now_ns();
    }
}

#[cfg(test)]
mod tests {
    use super::sn_lt;

    #[test]
    fn serial_numbers_wrap() {
        assert!(sn_lt(1, 2));
        assert!(!sn_lt(2, 1));
        assert!(sn_lt(u32::MAX, 0));
        assert!(!sn_lt(5, 5));
    }
}
