//! IO commands of a target queue pair: Read, Write, Write Zeroes (with
//! their FUA bit), Flush, Dataset Management, mapped onto the
//! namespace's bdev (or refused with a path status where the namespace's
//! ANA group is not accessible through this listener); their completions;
//! and the SMART counters they feed.

use super::{Conn, ReqState};
use crate::tgt::{PollGroupStats, QpairStats};
use bdev::{DmaBuf, IoBox, IoError, IoFlags, IoStatus, IoType};
use nvme_spec::reservation::{ReservationCdw10, REPORT_EDS};
use nvme_spec::status::sct;
use nvme_spec::{IoOpcode, Sqe, Status};
use std::sync::atomic::Ordering;

pub(super) fn io_status(t: IoType, e: IoError) -> Status {
    match e {
        IoError::Nvme { sct, sc } => Status::new(sct, sc),
        IoError::Media if t == IoType::Read => Status::UNRECOVERED_READ_ERROR,
        IoError::Media => Status::WRITE_FAULT,
        IoError::NoMemory => Status::NAMESPACE_NOT_READY,
        IoError::NotSupported => Status::INVALID_OPCODE.with_dnr(),
        IoError::OutOfRange => Status::LBA_OUT_OF_RANGE.with_dnr(),
        IoError::Aborted => Status::ABORTED_SQ_DELETION,
        IoError::NoDevice => Status::NAMESPACE_NOT_READY,
    }
}

/// The IO flags a Read, Write or Write Zeroes carries in CDW12: FUA on
/// writes only (a read's FUA asks for nothing a coherent cache serves
/// differently). PRINFO is ignored: namespaces carry no protection
/// information, for which the spec says the field is ignored.
fn wire_flags(sqe: &Sqe, write: bool) -> IoFlags {
    if write && sqe.fua() {
        IoFlags::FUA
    } else {
        IoFlags::NONE
    }
}

impl Conn {
    pub(super) fn io(&mut self, slot: usize, sqe: &Sqe) {
        let Some(ctrl) = self.ctrl.as_ref().filter(|c| c.ready.load(Ordering::Relaxed)) else {
            return self.complete(slot, Status::COMMAND_SEQUENCE_ERROR, 0);
        };
        // The host turned the volatile write cache off: every write is FUA.
        let cache_off = !ctrl.write_cache_enabled.load(Ordering::Relaxed);
        let nsid = sqe.nsid.get();
        let Some(nsi) = self.ns.iter().position(|n| n.nsid == nsid) else {
            return self.complete(slot, Status::INVALID_NAMESPACE_OR_FORMAT.with_dnr(), 0);
        };
        if let Some(path_status) = self.ns[nsi].ana_blocked {
            return self.complete(slot, path_status, 0);
        }
        let op = IoOpcode(sqe.opcode);
        if self.ns[nsi].resv.held() {
            let hostid = ctrl.hostid;
            let n = &mut self.ns[nsi];
            let gen = n.resv.generation();
            if gen != n.resv_gen {
                // The reservation changed since this queue last looked:
                // the verdict for this host is recomputed once.
                n.access = n.resv.access(&hostid);
                n.resv_gen = gen;
            }
            let allowed = match op {
                IoOpcode::READ => n.access.read,
                IoOpcode::WRITE | IoOpcode::WRITE_ZEROES | IoOpcode::DATASET_MANAGEMENT | IoOpcode::FLUSH => {
                    n.access.write
                }
                _ => true,
            };
            if !allowed {
                return self.complete(slot, Status::RESERVATION_CONFLICT, 0);
            }
        }
        let (shift, num_blocks) = (self.ns[nsi].block_shift, self.ns[nsi].num_blocks);
        let ranged = |slba: u64, nlb: u64| slba.checked_add(nlb).is_some_and(|end| end <= num_blocks);
        match op {
            IoOpcode::READ | IoOpcode::WRITE => {
                let (slba, nlb) = (sqe.slba(), u64::from(sqe.nlb()));
                let bytes = nlb << shift;
                let r = &mut self.reqs[slot];
                if bytes > u64::from(self.opts.max_io_size) || bytes > u64::from(r.data_len) {
                    return self.complete(slot, Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0);
                }
                if !ranged(slba, nlb) {
                    return self.complete(slot, Status::LBA_OUT_OF_RANGE.with_dnr(), 0);
                }
                let write = op == IoOpcode::WRITE;
                let t = if write { IoType::Write } else { IoType::Read };
                if t == IoType::Read {
                    r.xfer_len = bytes as u32;
                }
                r.io_bytes = bytes as u32;
                let mut flags = wire_flags(sqe, write);
                if write && cache_off {
                    flags.insert(IoFlags::FUA);
                }
                let buf = r.buf.take();
                self.submit(slot, nsi, t, slba, nlb, buf, flags);
            }
            IoOpcode::FLUSH => {
                // No cache to write back: the flush succeeds at once.
                if !self.ns[nsi].ch.handle().bdev().io_type_supported(IoType::Flush) {
                    return self.complete(slot, Status::SUCCESS, 0);
                }
                self.submit(slot, nsi, IoType::Flush, 0, 0, None, IoFlags::NONE);
            }
            IoOpcode::WRITE_ZEROES => {
                let (slba, nlb) = (sqe.slba(), u64::from(sqe.nlb()));
                if !ranged(slba, nlb) {
                    return self.complete(slot, Status::LBA_OUT_OF_RANGE.with_dnr(), 0);
                }
                if !self.ns[nsi].ch.handle().bdev().io_type_supported(IoType::WriteZeroes) {
                    return self.complete(slot, Status::INVALID_OPCODE.with_dnr(), 0);
                }
                let mut flags = wire_flags(sqe, true);
                if cache_off {
                    flags.insert(IoFlags::FUA);
                }
                self.submit(slot, nsi, IoType::WriteZeroes, slba, nlb, None, flags);
            }
            IoOpcode::DATASET_MANAGEMENT => self.dsm(slot, nsi, sqe),
            IoOpcode::RESERVATION_REGISTER
            | IoOpcode::RESERVATION_ACQUIRE
            | IoOpcode::RESERVATION_RELEASE
            | IoOpcode::RESERVATION_REPORT => self.reservation(slot, nsi, sqe),
            _ => self.complete(slot, Status::INVALID_OPCODE.with_dnr(), 0),
        }
    }

    /// Reservation Register, Acquire, Release and Report: run against the
    /// namespace's shared state; a change that must persist is written to
    /// the `ptpl_file` before the answer.
    fn reservation(&mut self, slot: usize, nsi: usize, sqe: &Sqe) {
        let Some(ctrl) = self.ctrl.clone() else {
            return self.complete(slot, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0);
        };
        let (resv, nsid, host) = (self.ns[nsi].resv.clone(), self.ns[nsi].nsid, ctrl.hostid);
        let sub = &ctrl.subsys;
        let c = ReservationCdw10::from_sqe(sqe);
        let op = IoOpcode(sqe.opcode);
        if op == IoOpcode::RESERVATION_REPORT {
            // Fabrics hosts have 128-bit host identifiers: only the
            // extended data structure can carry them.
            if sqe.cdw11.get() & REPORT_EDS == 0 {
                return self.complete(slot, Status::HOST_ID_INCONSISTENT_FORMAT.with_dnr(), 0);
            }
            let page = resv.report_ext(sub);
            let r = &mut self.reqs[slot];
            let Some(buf) = r.buf.as_ref() else {
                return self.complete(slot, Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0);
            };
            // NUMD (0's based dwords) bounds what the host takes.
            let want = ((sqe.cdw10.get() as usize) + 1) * 4;
            let n = page.len().min(buf.len()).min(want);
            buf.with_mut(|b| {
                b.fill(0);
                b[..n].copy_from_slice(&page[..n]);
            });
            r.xfer_len = buf.len() as u32;
            return self.complete(slot, Status::SUCCESS, 0);
        }
        // IEKEY means something to Register only: set on Acquire or
        // Release it is a field the controller does not honour.
        if c.iekey && op != IoOpcode::RESERVATION_REGISTER {
            return self.complete(slot, Status::INVALID_FIELD.with_dnr(), 0);
        }
        let need = if op == IoOpcode::RESERVATION_RELEASE { 8 } else { 16 };
        let mut data = [0u8; 16];
        match self.reqs[slot].buf.as_ref() {
            Some(b) if b.len() >= need => b.copy_to(0, &mut data[..need]),
            _ => return self.complete(slot, Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0),
        }
        let k1 = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
        let k2 = u64::from_le_bytes(data[8..].try_into().unwrap_or_default());
        let out = match op {
            IoOpcode::RESERVATION_REGISTER => resv.register(sub, nsid, &host, c.action, c.iekey, c.cptpl, k1, k2),
            IoOpcode::RESERVATION_ACQUIRE => resv.acquire(sub, nsid, &host, c.action, c.rtype, k1, k2),
            _ => resv.release_cmd(sub, nsid, &host, c.action, c.rtype, k1),
        };
        match out.persist {
            Some(job) if out.status.is_success() => self.persist_then_complete(slot, out.status, job),
            _ => self.complete(slot, out.status, 0),
        }
    }

    fn dsm(&mut self, slot: usize, nsi: usize, sqe: &Sqe) {
        let nr = (sqe.cdw10.get() & 0xFF) as usize + 1;
        let deallocate = sqe.cdw11.get() & (1 << 2) != 0;
        let num_blocks = self.ns[nsi].num_blocks;
        let Some(buf) = self.reqs[slot].buf.take() else {
            return self.complete(slot, Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0);
        };
        if buf.len() < nr * 16 {
            return self.complete(slot, Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0);
        }
        if !deallocate || !self.ns[nsi].ch.handle().bdev().io_type_supported(IoType::Unmap) {
            return self.complete(slot, Status::SUCCESS, 0);
        }
        let mut ranges = [(0u64, 0u64); 256];
        let mut count = 0;
        let mut bad = false;
        buf.with(|b| {
            for i in 0..nr {
                let e = &b[i * 16..i * 16 + 16];
                let nlb = u64::from(u32::from_le_bytes([e[4], e[5], e[6], e[7]]));
                let slba = u64::from_le_bytes([e[8], e[9], e[10], e[11], e[12], e[13], e[14], e[15]]);
                if nlb == 0 {
                    continue;
                }
                if slba.checked_add(nlb).is_none_or(|end| end > num_blocks) {
                    bad = true;
                }
                ranges[count] = (slba, nlb);
                count += 1;
            }
        });
        if bad {
            return self.complete(slot, Status::LBA_OUT_OF_RANGE.with_dnr(), 0);
        }
        if count == 0 {
            return self.complete(slot, Status::SUCCESS, 0);
        }
        self.reqs[slot].pending = count as u32;
        for &(slba, nlb) in &ranges[..count] {
            self.submit_one(slot, nsi, IoType::Unmap, slba, nlb, None, IoFlags::NONE);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(&mut self, slot: usize, nsi: usize, t: IoType, slba: u64, nlb: u64, buf: Option<DmaBuf>, flags: IoFlags) {
        self.reqs[slot].pending = 1;
        self.submit_one(slot, nsi, t, slba, nlb, buf, flags);
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_one(
        &mut self,
        slot: usize,
        nsi: usize,
        t: IoType,
        slba: u64,
        nlb: u64,
        buf: Option<DmaBuf>,
        flags: IoFlags,
    ) {
        let Some(mut io) = IoBox::data(t, slba, nlb, buf) else {
            // Out of descriptors: the command fails with a retryable status.
            let r = &mut self.reqs[slot];
            r.status = Status::NAMESPACE_NOT_READY;
            r.pending -= 1;
            if r.pending == 0 {
                let st = r.status;
                self.complete(slot, st, 0);
            }
            return;
        };
        io.flags = flags;
        io.tag = slot as u64;
        io.tag2 = u64::from(self.reqs[slot].gen);
        if let Some(d) = &self.done {
            io.set_done(d.clone());
        }
        if let Some(g) = self.state.poll_group(self.reactor) {
            PollGroupStats::add(&g.pending_bdev_io);
        }
        self.ns[nsi].ch.submit(io);
    }

    /// A bdev IO of this connection came back (an IO command's, or a flush
    /// the admin queue sent when the host turned the write cache off).
    pub(super) fn io_done(&mut self, mut io: IoBox) {
        if let Some(g) = self.state.poll_group(self.reactor) {
            PollGroupStats::sub(&g.pending_bdev_io);
        }
        let slot = io.tag as usize;
        let Some(r) = self.reqs.get_mut(slot) else {
            // No command to answer: the tag names no slot of this queue.
            return self.state.impossible("IO completion for a slot this queue does not have");
        };
        if r.state != ReqState::Exec || r.pending == 0 || u64::from(r.gen) != io.tag2 {
            // The slot's command was already answered (or is a newer one):
            // nothing waits for this IO.
            return self.state.impossible("IO completion for a command that is not in flight");
        }
        if let IoStatus::Failed(e) = io.status {
            if r.status.is_success() {
                r.status = if e == IoError::Aborted && r.abort_requested {
                    Status::ABORT_REQUESTED
                } else {
                    io_status(io.io_type, e)
                };
            }
        }
        if io.io_type == IoType::Read {
            r.buf = io.buf.take();
            if io.status.is_ok() && r.buf.is_none() {
                // A read that "succeeded" without its data: answering success
                // would send the host no data at all.
                r.status = Status::INTERNAL_ERROR;
                self.state.impossible("read completed without its buffer");
            }
        }
        r.pending -= 1;
        if r.pending == 0 {
            let st = r.status;
            self.complete(slot, st, 0);
        }
    }

    /// SMART / health counters of a finished IO command.
    pub(super) fn count_for_smart(&self, opcode: u8, status: Status, io_bytes: u32) {
        let s = &self.stats;
        if status.sct == sct::MEDIA_AND_DATA_INTEGRITY {
            QpairStats::bump(&s.media_errors, 1);
        }
        if !status.is_success() {
            return;
        }
        match IoOpcode(opcode) {
            IoOpcode::READ => {
                QpairStats::bump(&s.read_cmds, 1);
                QpairStats::bump(&s.bytes_read, u64::from(io_bytes));
            }
            IoOpcode::WRITE => {
                QpairStats::bump(&s.write_cmds, 1);
                QpairStats::bump(&s.bytes_written, u64::from(io_bytes));
            }
            _ => {}
        }
    }
}
