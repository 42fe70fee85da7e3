//! SCSI commands over iSCSI: task slots (preallocated per connection),
//! immediate and unsolicited data, R2T within MaxOutstandingR2T and
//! MaxBurstLength, Data-Out gathered into one `DmaBuf` before the command
//! goes to the SCSI layer, Data-In with phase-collapsed status and
//! residuals, SCSI Response with sense, and task management.

use super::conn::{sn_lt, Conn};
use crate::pdu::{self, encode_header, off, op, reject, Bhs, RESERVED_TAG};
use crate::scsi::{self, status, LunChannel, Residual, ScsiCommand, ScsiCompletion, TaskAttr};
use bdev::DmaBuf;
use std::sync::Arc;

/// Task management functions (RFC 7143 11.5.1).
mod tmf_fn {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LUN_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
}

/// Task management responses.
mod tmf_resp {
    pub const COMPLETE: u8 = 0;
    pub const NO_TASK: u8 = 1;
    pub const NO_LUN: u8 = 2;
    pub const NOT_SUPPORTED: u8 = 5;
    pub const REJECTED: u8 = 255;
}

/// A connection's channel to one LUN of its target node.
pub(crate) struct LunSlot {
    pub(crate) id: u64,
    pub(crate) lun: Arc<scsi::Lun>,
    pub(crate) ch: LunChannel,
    /// The LUN left the node (its bdev went away): new commands find no
    /// LUN; the slot stays so task indexes stay valid.
    pub(crate) gone: bool,
    /// The LUN's abort announcement up to which this connection has had the
    /// responses to its aborted tasks acknowledged (published to the LUN).
    pub(crate) responses_acked: u64,
    /// An announcement that aborted tasks here, and the last StatSN sent
    /// once their responses were out: acknowledged when ExpStatSN passes it.
    pub(crate) ack_wait: Option<(u64, u32)>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum TaskState {
    #[default]
    Free,
    /// Gathering Data-Out.
    DataOut,
    /// At the SCSI layer.
    Exec,
}

/// One command slot.
#[derive(Default)]
pub(crate) struct Task {
    pub(crate) state: TaskState,
    /// Bumped at each use: the SCSI tag and TTT carry it, so a late
    /// completion or Data-Out for an earlier occupant is recognised.
    gen: u16,
    itt: u32,
    lun: u64,
    /// Index in the connection's `luns`, if the LUN exists.
    lun_idx: Option<usize>,
    cdb: [u8; 16],
    cdb_len: u8,
    attr: Option<TaskAttr>,
    read: bool,
    write: bool,
    cmd_sn: u32,
    edtl: u32,
    buf: Option<DmaBuf>,
    /// Bytes of Data-Out the command uses (the rest is received and dropped).
    want: u32,
    /// Bytes of Data-Out received so far (in order: DataPDUInOrder=Yes).
    recvd: u32,
    /// End of the unsolicited burst (immediate + unsolicited Data-Out).
    unsolicited_end: u32,
    /// Next offset to solicit, R2Ts outstanding, next R2TSN.
    r2t_next: u32,
    r2t_outstanding: u32,
    r2t_sn: u32,
    /// Expected DataSN within the current Data-Out sequence.
    data_sn: u32,
    /// Aborted by task management: no response is sent.
    aborted: bool,
    /// The LUN's abort generation when the command arrived.
    received_at: Option<u64>,
    /// A pending TMF response waits for this task.
    tmf_wait: bool,
}

/// A task management request waiting for its aborted tasks to finish:
/// this connection's own, and, for a reset, every other nexus's on each
/// reset LUN (SAM-5 6.3.3: the reset completes once they have ended).
pub(crate) struct PendingTmf {
    itt: u32,
    response: u8,
    waiting: u32,
    settle: Vec<(Arc<scsi::Lun>, u64)>,
    /// TARGET COLD RESET: once answered, every connection to the target
    /// node ends (RFC 7143 11.5.1).
    cold: bool,
    /// A multi-task abort (ABORT TASK SET, CLEAR TASK SET, LUN RESET,
    /// TARGET WARM/COLD RESET): its response waits until the initiator has
    /// acknowledged every StatSN sent before it (RFC 7143 4.2.3.3 d).
    multi_task: bool,
    /// The last StatSN sent when the aborted tasks had ended, once noted.
    ack_for: Option<u32>,
}

fn tag_of(slot: usize, gen: u16) -> u32 {
    (u32::from(gen) << 16) | slot as u32
}

fn slot_of(tag: u32) -> (usize, u16) {
    ((tag & 0xffff) as usize, (tag >> 16) as u16)
}

/// The slots in use, found by ITT in O(1): an open-addressing table of slot
/// numbers (linear probing, twice as many entries as slots, sized once), so
/// that a command's duplicate-ITT check and an unsolicited Data-Out's
/// lookup cost the same at any queue depth instead of a scan of every slot.
pub(crate) struct IttIndex {
    entries: Box<[u16]>,
}

impl IttIndex {
    const EMPTY: u16 = u16::MAX;

    pub(crate) fn new(slots: usize) -> Self {
        assert!(slots < usize::from(Self::EMPTY));
        IttIndex { entries: vec![Self::EMPTY; (2 * slots).next_power_of_two().max(2)].into_boxed_slice() }
    }

    fn home(&self, itt: u32) -> usize {
        // Fibonacci hashing: initiators number ITTs sequentially.
        (itt.wrapping_mul(0x9E37_79B9) as usize >> 8) & (self.entries.len() - 1)
    }

    /// The slot in use whose ITT is `itt`.
    pub(crate) fn find(&self, tasks: &[Task], itt: u32) -> Option<usize> {
        let mask = self.entries.len() - 1;
        let mut i = self.home(itt);
        loop {
            let s = self.entries[i];
            if s == Self::EMPTY {
                return None;
            }
            if tasks[usize::from(s)].itt == itt {
                return Some(usize::from(s));
            }
            i = (i + 1) & mask;
        }
    }

    /// Adds `slot`, whose `itt` is set and not in the table.
    pub(crate) fn insert(&mut self, tasks: &[Task], slot: usize) {
        let mask = self.entries.len() - 1;
        let mut i = self.home(tasks[slot].itt);
        while self.entries[i] != Self::EMPTY {
            i = (i + 1) & mask;
        }
        self.entries[i] = slot as u16;
    }

    /// Removes `slot` (its `itt` unchanged since it was inserted), moving
    /// later entries of the probe run back so lookups stay correct.
    pub(crate) fn remove(&mut self, tasks: &[Task], slot: usize) {
        let mask = self.entries.len() - 1;
        let mut hole = self.home(tasks[slot].itt);
        loop {
            match self.entries[hole] {
                s if usize::from(s) == slot => break,
                Self::EMPTY => return,
                _ => hole = (hole + 1) & mask,
            }
        }
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let s = self.entries[j];
            if s == Self::EMPTY {
                break;
            }
            let home = self.home(tasks[usize::from(s)].itt);
            // The entry may fill the hole unless its home lies cyclically
            // after the hole and at or before its own position.
            let stays = if hole <= j { hole < home && home <= j } else { hole < home || home <= j };
            if !stays {
                self.entries[hole] = s;
                hole = j;
            }
        }
        self.entries[hole] = Self::EMPTY;
    }
}

impl Conn {
    fn lun_index(&self, lun_field: u64) -> Option<usize> {
        let id = decode_lun(lun_field)?;
        self.luns.iter().position(|l| l.id == id && !l.gone)
    }

    pub(super) fn scsi_command(&mut self, bhs: &Bhs, data: &[u8]) {
        let flags = bhs.flags();
        let (read, write) = (flags & 0x40 != 0, flags & 0x20 != 0);
        let edtl = bhs.u32_at(off::W20);
        let itt = bhs.itt();
        if !write && !data.is_empty() {
            // Immediate data without the W bit.
            self.send_reject(reject::PROTOCOL_ERROR, bhs);
            self.close_after_flush = true;
            return;
        }
        if data.len() as u32 > edtl || (!data.is_empty() && !self.params.immediate_data) {
            self.send_reject(reject::PROTOCOL_ERROR, bhs);
            self.close_after_flush = true;
            return;
        }
        if bhs.ahs_len() > 0 {
            // Extended CDBs and bidirectional read lengths are not served.
            self.send_reject(reject::NOT_SUPPORTED, bhs);
            return;
        }
        if self.itt_index.find(&self.tasks, itt).is_some() {
            self.send_reject(reject::TASK_IN_PROGRESS, bhs);
            return;
        }
        let Some(slot) = self.free.pop().map(usize::from) else {
            // The initiator ignored MaxCmdSN.
            self.respond_status_only(itt, status::TASK_SET_FULL);
            return;
        };
        let lun_idx = self.lun_index(bhs.lun());
        let attr = match flags & 7 {
            0 | 1 => TaskAttr::Simple,
            2 => TaskAttr::Ordered,
            3 => TaskAttr::HeadOfQueue,
            _ => TaskAttr::Aca,
        };
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&bhs.0[off::CDB..off::CDB + 16]);
        let t = &mut self.tasks[slot];
        t.gen = t.gen.wrapping_add(1);
        t.state = TaskState::DataOut;
        t.itt = itt;
        t.lun = bhs.lun();
        t.lun_idx = lun_idx;
        t.cdb = cdb;
        t.cdb_len = 16;
        t.attr = Some(attr);
        t.read = read;
        t.write = write;
        t.cmd_sn = bhs.u32_at(off::W24);
        t.edtl = edtl;
        t.recvd = 0;
        t.r2t_outstanding = 0;
        t.r2t_sn = 0;
        t.data_sn = 0;
        t.aborted = false;
        t.tmf_wait = false;
        t.received_at = lun_idx.map(|i| self.luns[i].lun.abort_generation());
        t.buf = None;
        self.itt_index.insert(&self.tasks, slot);
        if !write || edtl == 0 {
            self.tasks[slot].want = 0;
            self.execute(slot);
            return;
        }
        let cdb_len = match lun_idx {
            Some(i) => self.luns[i].lun.data_out_len(&cdb),
            None => 0,
        };
        // Unsolicited Data-Out follows only with InitialR2T=No and the F
        // bit clear, and then makes the first burst whole.
        let unsolicited = if self.params.initial_r2t || bhs.final_bit() {
            data.len() as u32
        } else {
            self.params.first_burst_length.min(edtl).max(data.len() as u32)
        };
        let t = &mut self.tasks[slot];
        t.want = cdb_len.min(edtl);
        t.unsolicited_end = unsolicited;
        // R2Ts solicit from the end of the first burst up to what the
        // command uses; more would be dropped.
        t.r2t_next = unsolicited;
        let buf_len = t.want.max(unsolicited.min(edtl)) as usize;
        if buf_len > 0 {
            match DmaBuf::alloc(buf_len.min(DmaBuf::MAX_LEN)) {
                Some(b) if buf_len <= DmaBuf::MAX_LEN => t.buf = Some(b),
                _ => {
                    // Too large or no memory: the data is received and dropped.
                    t.want = 0;
                    t.r2t_next = unsolicited;
                }
            }
        }
        if !data.is_empty() {
            self.store_data(slot, 0, data);
        }
        self.advance_data_out(slot);
    }

    /// Copies Data-Out at `offset` into the task's buffer (bytes beyond it
    /// are dropped) and counts them.
    fn store_data(&mut self, slot: usize, offset: u32, data: &[u8]) {
        let t = &mut self.tasks[slot];
        if let Some(b) = &t.buf {
            let end = (offset as usize + data.len()).min(b.len());
            if (offset as usize) < end {
                b.copy_from(offset as usize, &data[..end - offset as usize]);
            }
        }
        t.recvd += data.len() as u32;
    }

    /// Sends R2Ts while allowed, or executes once every byte is in.
    fn advance_data_out(&mut self, slot: usize) {
        let t = &self.tasks[slot];
        let need = t.want.max(t.unsolicited_end.min(t.edtl));
        if t.recvd >= need && t.r2t_outstanding == 0 {
            self.execute(slot);
            return;
        }
        // Unsolicited data still to come: R2Ts follow it.
        if t.recvd < t.unsolicited_end {
            return;
        }
        let max_r2t = self.params.max_outstanding_r2t.max(1);
        let burst = self.params.max_burst_length.max(512);
        while self.tasks[slot].r2t_outstanding < max_r2t && self.tasks[slot].r2t_next < self.tasks[slot].want {
            let t = &mut self.tasks[slot];
            let len = (t.want - t.r2t_next).min(burst);
            let offset = t.r2t_next;
            t.r2t_next += len;
            t.r2t_outstanding += 1;
            let sn = t.r2t_sn;
            t.r2t_sn += 1;
            let mut r = Bhs::new(op::R2T);
            r.set_flags(0x80);
            r.set_lun(t.lun);
            r.set_u32(off::ITT, t.itt);
            r.set_u32(off::W20, tag_of(slot, t.gen));
            r.set_u32(off::W36, sn);
            r.set_u32(off::W40, offset);
            r.set_u32(off::W44, len);
            self.stamp(&mut r, false);
            self.send_pdu(r, &[]);
        }
    }

    pub(super) fn data_out(&mut self, bhs: &Bhs, data: &[u8]) {
        let ttt = bhs.u32_at(off::W20);
        let itt = bhs.itt();
        let slot = if ttt == RESERVED_TAG {
            self.itt_index.find(&self.tasks, itt).filter(|&s| self.tasks[s].state == TaskState::DataOut)
        } else {
            let (s, g) = slot_of(ttt);
            self.tasks.get(s).filter(|t| t.state == TaskState::DataOut && t.gen == g && t.itt == itt).map(|_| s)
        };
        let Some(slot) = slot else {
            // Data for no receiving task (one already failed, or a bad
            // tag): rejected and dropped; the PDU stream itself is intact.
            tracing::info!(peer = %self.peer, itt, ttt, "iSCSI Data-Out for no receiving task");
            self.send_reject(reject::INVALID_FIELD, bhs);
            return;
        };
        let offset = bhs.u32_at(off::W40);
        let t = &self.tasks[slot];
        let end = offset as u64 + data.len() as u64;
        let bad = offset != t.recvd
            || end > u64::from(t.edtl)
            || bhs.u32_at(off::W36) != t.data_sn
            || (ttt == RESERVED_TAG && (self.params.initial_r2t || end > u64::from(t.unsolicited_end)))
            || (ttt != RESERVED_TAG && t.r2t_outstanding == 0);
        if bad {
            // The initiator fails the command on the Reject (ERL 0 has no
            // recovery of a sequence); the task ends here without a response.
            tracing::info!(peer = %self.peer, itt, offset, "iSCSI Data-Out out of order or out of bounds");
            self.send_reject(reject::PROTOCOL_ERROR, bhs);
            self.release_task(slot);
            return;
        }
        self.store_data(slot, offset, data);
        let t = &mut self.tasks[slot];
        t.data_sn += 1;
        if bhs.final_bit() {
            t.data_sn = 0;
            if ttt != RESERVED_TAG {
                t.r2t_outstanding -= 1;
            } else if t.recvd < t.unsolicited_end {
                // The unsolicited burst ended early: solicit from here.
                t.unsolicited_end = t.recvd;
                t.r2t_next = t.r2t_next.min(t.recvd).max(t.recvd);
            }
            self.advance_data_out(slot);
        }
    }

    /// Hands the gathered command to the SCSI layer (or answers it here
    /// when its LUN does not exist).
    fn execute(&mut self, slot: usize) {
        let Some(sess) = &self.sess else {
            return;
        };
        let t = &mut self.tasks[slot];
        t.state = TaskState::Exec;
        let data_out = t.buf.take().map(|b| b.slice(0, t.recvd.min(t.want) as usize));
        let cmd = ScsiCommand {
            tag: tag_of(slot, t.gen),
            cdb: t.cdb,
            cdb_len: t.cdb_len,
            nexus: sess.nexus.clone(),
            attr: t.attr.unwrap_or(TaskAttr::Simple),
            expected_len: t.edtl,
            read: t.read,
            write: t.write,
            data_out: if t.write { data_out } else { None },
            received_at: t.received_at,
        };
        match t.lun_idx {
            Some(i) => self.luns[i].ch.execute(cmd),
            None => {
                let mut ids = [0u64; 64];
                let mut n = 0;
                for l in self.luns.iter().filter(|l| !l.gone).take(ids.len()) {
                    ids[n] = l.id;
                    n += 1;
                }
                let c = scsi::execute_without_lun(&cmd, &ids[..n]);
                self.scsi_done(c);
            }
        }
    }

    /// A command came back from the SCSI layer.
    pub(super) fn scsi_done(&mut self, c: ScsiCompletion) {
        let (slot, gen) = slot_of(c.tag);
        let ok = self.tasks.get(slot).is_some_and(|t| t.state == TaskState::Exec && t.gen == gen);
        if !ok {
            self.state.impossible("SCSI completion for a task slot not in flight");
            return;
        }
        let (aborted, tmf_wait) = (self.tasks[slot].aborted, self.tasks[slot].tmf_wait);
        if !aborted && !self.closing {
            self.respond(slot, &c);
        }
        self.release_task(slot);
        if tmf_wait {
            self.tmf_task_done();
        }
    }

    pub(super) fn release_task(&mut self, slot: usize) {
        let t = &mut self.tasks[slot];
        if t.state == TaskState::Free {
            return;
        }
        t.state = TaskState::Free;
        t.buf = None;
        self.itt_index.remove(&self.tasks, slot);
        self.free.push(slot as u16);
    }

    /// Data-In (phase-collapsed status where allowed) and/or SCSI Response.
    fn respond(&mut self, slot: usize, c: &ScsiCompletion) {
        let (itt, lun) = (self.tasks[slot].itt, self.tasks[slot].lun);
        let len = c.data_in_len as usize;
        let mut data_sn = 0u32;
        let collapse = c.status != status::CHECK_CONDITION || c.sense.len == 0;
        if let (Some(buf), true) = (&c.data_in, len > 0) {
            let max = self.params.initiator_max_recv.max(512) as usize;
            let burst = self.params.max_burst_length.max(512) as usize;
            let mut offset = 0usize;
            while offset < len {
                let n = (len - offset).min(max).min(burst - offset % burst);
                let last = offset + n == len;
                let mut flags = 0u8;
                if last || (offset + n).is_multiple_of(burst) {
                    flags |= 0x80;
                }
                let mut h = Bhs::new(op::DATA_IN);
                h.set_lun(lun);
                h.set_u32(off::ITT, itt);
                h.set_u32(off::W20, RESERVED_TAG);
                if last && collapse {
                    flags |= 0x01 | residual_flags(c.residual);
                    h.set_byte(3, c.status);
                    self.stamp(&mut h, true);
                    h.set_u32(off::W44, residual_count(c.residual));
                } else {
                    self.stamp(&mut h, false);
                    h.set_u32(off::W24, 0);
                }
                h.set_flags(flags);
                h.set_u32(off::W36, data_sn);
                h.set_u32(off::W40, offset as u32);
                self.send_data_in(h, buf.slice(offset, n));
                data_sn += 1;
                offset += n;
            }
            if collapse {
                return;
            }
        }
        let mut r = Bhs::new(op::SCSI_RESP);
        r.set_flags(0x80 | residual_flags(c.residual));
        r.set_byte(2, 0);
        r.set_byte(3, c.status);
        r.set_u32(off::ITT, itt);
        self.stamp(&mut r, true);
        r.set_u32(off::W36, if len > 0 { data_sn } else { self.tasks[slot].r2t_sn });
        r.set_u32(off::W44, residual_count(c.residual));
        let sense = c.sense.as_slice();
        if sense.is_empty() {
            self.send_pdu(r, &[]);
        } else {
            let mut seg = [0u8; 2 + 96];
            seg[..2].copy_from_slice(&(sense.len() as u16).to_be_bytes());
            seg[2..2 + sense.len()].copy_from_slice(sense);
            self.send_pdu(r, &seg[..2 + sense.len()]);
        }
    }

    /// Queues a Data-In PDU; the data goes out of its buffer uncopied.
    fn send_data_in(&mut self, mut h: Bhs, data: DmaBuf) {
        h.set_data_len(data.len() as u32);
        let mut hdr = [0u8; pdu::MAX_TX_HEADER];
        let n = encode_header(&h, self.tx_header_digest, &mut hdr);
        self.tx.push_bytes(&hdr[..n]);
        let p = pdu::pad_len(data.len());
        let pad = [0u8; 4];
        let crc = if self.tx_data_digest { Some(data.with(|d| pdu::digest(&[d, &pad[..p]]))) } else { None };
        self.tx.push_data(data);
        let mut tail = [0u8; 8];
        let mut k = p;
        if let Some(d) = crc {
            tail[p..p + 4].copy_from_slice(&d.to_le_bytes());
            k += 4;
        }
        if k > 0 {
            self.tx.push_bytes(&tail[..k]);
        }
    }

    /// A SCSI Response with only a status, for a command that got no slot.
    fn respond_status_only(&mut self, itt: u32, st: u8) {
        let mut r = Bhs::new(op::SCSI_RESP);
        r.set_flags(0x80);
        r.set_byte(3, st);
        r.set_u32(off::ITT, itt);
        self.stamp(&mut r, true);
        self.send_pdu(r, &[]);
    }

    pub(super) fn tmf_request(&mut self, bhs: &Bhs) {
        let function = bhs.flags() & 0x7f;
        let itt = bhs.itt();
        if self.tmf.is_some() {
            self.send_tmf_response(itt, tmf_resp::REJECTED);
            return;
        }
        let lun_idx = self.lun_index(bhs.lun());
        let mut pending = PendingTmf {
            itt,
            response: tmf_resp::COMPLETE,
            waiting: 0,
            settle: Vec::new(),
            cold: false,
            multi_task: false,
            ack_for: None,
        };
        match function {
            tmf_fn::ABORT_TASK => {
                let rtt = bhs.u32_at(off::W20);
                let ref_sn = bhs.u32_at(off::W32);
                match self.itt_index.find(&self.tasks, rtt) {
                    Some(slot) => pending.waiting += self.abort_slot(slot),
                    None => {
                        // Not found: done already if it was ever received.
                        if !sn_lt(ref_sn, self.exp_cmd_sn) {
                            pending.response = tmf_resp::NO_TASK;
                        }
                    }
                }
            }
            tmf_fn::ABORT_TASK_SET | tmf_fn::CLEAR_TASK_SET | tmf_fn::LUN_RESET => {
                pending.multi_task = true;
                if lun_idx.is_none() {
                    pending.response = tmf_resp::NO_LUN;
                } else {
                    let lun = bhs.lun();
                    for slot in 0..self.tasks.len() {
                        if self.tasks[slot].state != TaskState::Free && self.tasks[slot].lun == lun {
                            pending.waiting += self.abort_slot(slot);
                        }
                    }
                    // ABORT TASK SET ends this session's tasks only; the
                    // others reach every nexus's (one shared task set).
                    if let (Some(i), Some(s), true) = (lun_idx, &self.sess, function != tmf_fn::ABORT_TASK_SET) {
                        let lun = self.luns[i].lun.clone();
                        let gen = if function == tmf_fn::LUN_RESET {
                            lun.reset(&s.nexus)
                        } else {
                            lun.clear_task_set(&s.nexus)
                        };
                        pending.settle.push((lun, gen));
                    }
                }
            }
            tmf_fn::TARGET_WARM_RESET | tmf_fn::TARGET_COLD_RESET => {
                pending.cold = function == tmf_fn::TARGET_COLD_RESET;
                pending.multi_task = true;
                for slot in 0..self.tasks.len() {
                    if self.tasks[slot].state != TaskState::Free {
                        pending.waiting += self.abort_slot(slot);
                    }
                }
                if let Some(s) = &self.sess {
                    for l in self.luns.iter().filter(|l| !l.gone) {
                        let gen = l.lun.reset(&s.nexus);
                        pending.settle.push((l.lun.clone(), gen));
                    }
                }
            }
            _ => pending.response = tmf_resp::NOT_SUPPORTED,
        }
        self.tmf = Some(pending);
        self.finish_tmf();
    }

    /// Sends the pending TMF response once every task it aborted has ended
    /// (here and, for a reset, on every other channel of the LUN); the
    /// connection's poll calls it again until then.
    pub(super) fn finish_tmf(&mut self) {
        let Some(p) = &mut self.tmf else {
            return;
        };
        if p.waiting > 0 {
            return;
        }
        // Every channel's aborted tasks have ended and, on every connection
        // that had some, the responses sent are acknowledged (RFC 7143
        // 4.2.3.3: the last-sent StatSN of each connection sharing the
        // affected tasks; see `acknowledge_aborted_responses`).
        p.settle.retain(|(lun, gen)| !lun.aborts_acknowledged(*gen));
        if !p.settle.is_empty() {
            return;
        }
        if p.multi_task && p.response == tmf_resp::COMPLETE {
            // Note the last StatSN sent, then wait for its acknowledgement,
            // asking for it with a NOP-In when it is not in yet.
            let last_sent = self.stat_sn.wrapping_sub(1);
            let noted = *p.ack_for.get_or_insert(last_sent);
            if !sn_lt(noted, self.exp_stat_sn) {
                self.send_ping(reactor::now_ns());
                return;
            }
        }
        let (itt, response, cold) = (p.itt, p.response, p.cold);
        self.tmf = None;
        self.send_tmf_response(itt, response);
        if let (true, Some(node)) = (cold, self.sess.as_ref().and_then(|s| s.node.clone())) {
            self.state.end_connections_to(&node);
        }
    }

    /// For a reset or CLEAR TASK SET of another nexus that aborted tasks of
    /// this connection: once their responses are out, notes the last StatSN
    /// sent, asks for its acknowledgement with a NOP-In, and publishes to
    /// the LUN when ExpStatSN passes it, so that the reset's response may go
    /// (RFC 7143 4.2.3.3). A channel without such tasks publishes at once.
    /// A RefCell and an atomic read per LUN when there is nothing new.
    pub(super) fn acknowledge_aborted_responses(&mut self, now: u64) {
        let mut ping = false;
        for slot in self.luns.iter_mut() {
            if let Some((gen, sn)) = slot.ack_wait {
                if sn_lt(sn, self.exp_stat_sn) {
                    slot.ack_wait = None;
                    slot.responses_acked = gen;
                    slot.ch.responses_acknowledged(gen);
                } else {
                    ping = true;
                    continue;
                }
            }
            let Some(answered) = slot.ch.aborts_answered() else {
                continue;
            };
            if answered <= slot.responses_acked {
                continue;
            }
            let last_sent = self.stat_sn.wrapping_sub(1);
            if slot.ch.aborted_tasks_after(slot.responses_acked) && !sn_lt(last_sent, self.exp_stat_sn) {
                slot.ack_wait = Some((answered, last_sent));
                ping = true;
            } else {
                slot.responses_acked = answered;
                slot.ch.responses_acknowledged(answered);
            }
        }
        if ping {
            self.send_ping(now);
        }
    }

    /// Aborts one task: one still receiving data ends now; one at the
    /// SCSI layer ends when it comes back (returns 1: wait for it).
    fn abort_slot(&mut self, slot: usize) -> u32 {
        match self.tasks[slot].state {
            TaskState::DataOut => {
                self.release_task(slot);
                0
            }
            TaskState::Exec if !self.tasks[slot].aborted => {
                let t = &mut self.tasks[slot];
                t.aborted = true;
                t.tmf_wait = true;
                let tag = tag_of(slot, t.gen);
                if let Some(i) = t.lun_idx {
                    self.luns[i].ch.abort(tag);
                }
                1
            }
            _ => 0,
        }
    }

    fn tmf_task_done(&mut self) {
        let Some(p) = &mut self.tmf else {
            return;
        };
        p.waiting -= 1;
        self.finish_tmf();
    }

    fn send_tmf_response(&mut self, itt: u32, response: u8) {
        let mut r = Bhs::new(op::TMF_RESP);
        r.set_flags(0x80);
        r.set_byte(2, response);
        r.set_u32(off::ITT, itt);
        self.stamp(&mut r, true);
        self.send_pdu(r, &[]);
    }
}

fn residual_flags(r: Residual) -> u8 {
    match r {
        Residual::None => 0,
        Residual::Over(_) => 0x04,
        Residual::Under(_) => 0x02,
    }
}

fn residual_count(r: Residual) -> u32 {
    match r {
        Residual::None => 0,
        Residual::Over(n) | Residual::Under(n) => n,
    }
}

/// The LUN number of an 8-byte SAM LUN field: peripheral (00b) and flat
/// (01b) addressing of the first level; None for other forms.
pub(crate) fn decode_lun(field: u64) -> Option<u64> {
    let b = field.to_be_bytes();
    if b[2..].iter().any(|&x| x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0 if b[0] == 0 => Some(u64::from(b[1])),
        1 => Some((u64::from(b[0] & 0x3f) << 8) | u64::from(b[1])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luns_decode_from_sam_fields() {
        assert_eq!(decode_lun(0), Some(0));
        assert_eq!(decode_lun(0x0005_0000_0000_0000), Some(5));
        assert_eq!(decode_lun(0x4105_0000_0000_0000), Some(0x105));
        assert_eq!(decode_lun(0x0001_0000_0000_0001), None);
        assert_eq!(decode_lun(0x8000_0000_0000_0000), None);
    }

    /// Against a scan of the slots: inserts and removes in a mixed order,
    /// with ITTs that collide in the table, keep every lookup right.
    #[test]
    fn itt_index_agrees_with_a_scan() {
        let n = 128;
        let mut tasks: Vec<Task> = (0..n).map(|_| Task::default()).collect();
        let mut used = vec![false; n];
        let mut idx = IttIndex::new(n);
        let mut x = 0x2545_f491_u32;
        let mut next_itt = 0u32;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let slot = x as usize % n;
            if used[slot] {
                idx.remove(&tasks, slot);
                used[slot] = false;
            } else {
                // Mostly sequential ITTs, with jumps.
                next_itt = next_itt.wrapping_add(if x.is_multiple_of(8) { 256 << 8 } else { 1 });
                tasks[slot].itt = next_itt;
                idx.insert(&tasks, slot);
                used[slot] = true;
            }
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let probe = tasks[x as usize % n].itt;
                let want = (0..n).find(|&s| used[s] && tasks[s].itt == probe);
                assert_eq!(idx.find(&tasks, probe), want);
            }
        }
    }

    #[test]
    fn tags_carry_slot_and_generation() {
        assert_eq!(slot_of(tag_of(77, 3)), (77, 3));
    }
}
