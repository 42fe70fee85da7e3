//! Block IO commands on the bdev: the plan of each command (stages of
//! pieces no larger than the bdev's `max_io_blocks`, at most `WINDOW` in
//! flight), the COMPARE AND WRITE exclusion, compares, and the mapping of
//! bdev errors to sense data.

use super::cdb::{self, op};
use super::channel::{Inner, IoKind, Outcome};
use super::inquiry;
use super::sense::Check;
use super::status;
use bdev::{DmaBuf, IoBox, IoError, IoFlags, IoStatus, IoType};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Bdev IOs one command keeps in flight.
const WINDOW: u32 = 32;
/// UNMAP block descriptors accepted in one command (block limits VPD).
pub(crate) const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// Blocks of the repeated pattern WRITE SAME writes from (at most).
const WRITE_SAME_PATTERN_BYTES: u64 = 256 * 1024;

/// WRITE SAME's stages: which bdev IO type fills the range.
const SAME_WRITE: u8 = 0;
const SAME_ZEROES: u8 = 1;
const SAME_UNMAP: u8 = 2;

/// Commands that take the LUN range exclusively (no other write to it
/// runs meanwhile): COMPARE AND WRITE, ORWRITE and WRITE ATOMIC.
fn exclusive(kind: IoKind) -> bool {
    matches!(kind, IoKind::CompareAndWrite | IoKind::OrWrite | IoKind::WriteAtomic)
}

fn overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

impl Inner {
    /// Starts a block command whose plan is set in the slot; `Some` when it
    /// ended at once (refused, parked commands return `None`).
    pub(crate) fn start_io(&self, slot: u32) -> Option<Outcome> {
        let kind = self.tasks.borrow()[slot as usize].kind;
        let writes = matches!(kind, IoKind::Write | IoKind::WriteVerify | IoKind::WriteSame | IoKind::Unmap);
        if exclusive(kind) {
            if !self.caw_acquire(slot) || !self.caw_drained(slot) {
                self.park(slot);
                return None;
            }
            self.tasks.borrow_mut()[slot as usize].stage = 1;
        } else if writes && !self.write_gate(slot) {
            return None;
        }
        self.advance(slot)
    }

    /// Counts a write and lets it pass unless a COMPARE AND WRITE holds an
    /// overlapping range (then it is parked). Lock-free without CAW.
    fn write_gate(&self, slot: u32) -> bool {
        let range = {
            let mut tasks = self.tasks.borrow_mut();
            let t = &mut tasks[slot as usize];
            t.write_counted = true;
            if t.kind == IoKind::Unmap {
                (0, self.lun.num_blocks())
            } else {
                (t.lba, t.blocks)
            }
        };
        self.writes.started.fetch_add(1, Ordering::SeqCst);
        if self.lun.caw_active.load(Ordering::SeqCst) == 0 {
            return true;
        }
        let blocked = self.lun.state().caw_ranges.iter().any(|&r| overlap(r, range));
        if blocked {
            self.tasks.borrow_mut()[slot as usize].write_counted = false;
            self.writes.finished.fetch_add(1, Ordering::Release);
            self.park(slot);
        }
        !blocked
    }

    /// Takes the COMPARE AND WRITE range and notes the writes it must wait for.
    fn caw_acquire(&self, slot: u32) -> bool {
        let range = {
            let tasks = self.tasks.borrow();
            let t = &tasks[slot as usize];
            if t.holds_caw_range {
                return true;
            }
            (t.lba, t.blocks)
        };
        let mut st = self.lun.state();
        if st.caw_ranges.iter().any(|&r| overlap(r, range)) {
            return false;
        }
        st.caw_ranges.push(range);
        self.lun.caw_active.fetch_add(1, Ordering::SeqCst);
        let mut tasks = self.tasks.borrow_mut();
        let t = &mut tasks[slot as usize];
        t.holds_caw_range = true;
        t.caw_wait.clear();
        for w in &st.channels {
            if let Some(c) = w.upgrade() {
                t.caw_wait.push((Arc::downgrade(&c), c.started.load(Ordering::SeqCst)));
            }
        }
        true
    }

    /// Whether every write that began before the CAW took its range is done.
    fn caw_drained(&self, slot: u32) -> bool {
        let tasks = self.tasks.borrow();
        tasks[slot as usize]
            .caw_wait
            .iter()
            .all(|(w, started)| w.upgrade().is_none_or(|c| c.finished.load(Ordering::Acquire) >= *started))
    }

    /// Parks a task until a COMPARE AND WRITE lets it go; a poller retries.
    fn park(&self, slot: u32) {
        self.parked.borrow_mut().push(slot);
        let mut poller = self.retry_poller.borrow_mut();
        if poller.as_ref().is_some_and(|p| p.is_registered()) {
            return;
        }
        let me = self.me.clone();
        *poller = Some(reactor::register_poller("scsi_caw_retry", move || {
            let Some(me) = me.upgrade() else { return reactor::PollStatus::Done };
            me.retry_parked()
        }));
    }

    fn retry_parked(&self) -> reactor::PollStatus {
        let parked: Vec<u32> = std::mem::take(&mut *self.parked.borrow_mut());
        let mut progressed = false;
        for slot in parked {
            let (busy, kind) = {
                let t = &self.tasks.borrow()[slot as usize];
                (t.busy, t.kind)
            };
            if !busy {
                continue;
            }
            if exclusive(kind) {
                if !self.caw_acquire(slot) || !self.caw_drained(slot) {
                    self.parked.borrow_mut().push(slot);
                    continue;
                }
                self.tasks.borrow_mut()[slot as usize].stage = 1;
            } else if !self.write_gate(slot) {
                continue;
            }
            progressed = true;
            if let Some(o) = self.advance(slot) {
                self.finish(slot, o, false);
            }
        }
        if self.parked.borrow().is_empty() {
            reactor::PollStatus::Done
        } else if progressed {
            reactor::PollStatus::Busy
        } else {
            reactor::PollStatus::Idle
        }
    }

    /// A bdev IO of `slot` completed.
    pub(crate) fn block_io_done(&self, io: IoBox) {
        let (slot, gen, st) = (io.tag as u32, io.tag2 as u32, io.status);
        drop(io);
        self.apply_announced_aborts();
        {
            let mut tasks = self.tasks.borrow_mut();
            let Some(t) = tasks.get_mut(slot as usize) else { return };
            if !t.busy || t.gen != gen || t.outstanding == 0 {
                debug_assert!(false, "completion for a task that is not waiting for one");
                return;
            }
            t.outstanding -= 1;
            if let IoStatus::Failed(e) = st {
                t.failure.get_or_insert(e);
            }
        }
        if let Some(o) = self.advance(slot) {
            self.finish(slot, o, false);
        }
    }

    /// Issues what the task's stage still needs; moves to the next stage
    /// when one is done. `Some` when the command is over.
    fn advance(&self, slot: u32) -> Option<Outcome> {
        loop {
            let (failed, outstanding) = {
                let t = &self.tasks.borrow()[slot as usize];
                (t.failure.is_some() || t.aborted || t.check.is_some(), t.outstanding)
            };
            if failed {
                if outstanding > 0 {
                    return None;
                }
                self.release_caw(slot);
                return Some(self.failure_outcome(slot));
            }
            self.pump(slot);
            let (outstanding, more) = {
                let t = &self.tasks.borrow()[slot as usize];
                (t.outstanding, self.has_piece(t))
            };
            if outstanding > 0 {
                return None;
            }
            if more {
                // Nothing issued, nothing in flight: out of descriptors.
                self.release_caw(slot);
                return Some(Outcome::Status(status::TASK_SET_FULL));
            }
            if let Some(done) = self.next_stage(slot) {
                self.release_caw(slot);
                return Some(done);
            }
        }
    }

    fn has_piece(&self, t: &super::channel::Task) -> bool {
        match t.kind {
            IoKind::Unmap => t.param_pos < t.param_end,
            IoKind::Flush => t.next == 0,
            _ => t.next < t.blocks,
        }
    }

    /// Issues pieces until the window is full or none remain.
    fn pump(&self, slot: u32) {
        let bs = u64::from(self.lun.block_size);
        let max = if self.lun.max_io_blocks > 0 { u64::from(self.lun.max_io_blocks) } else { u64::MAX };
        loop {
            let piece = {
                let mut tasks = self.tasks.borrow_mut();
                let t = &mut tasks[slot as usize];
                if t.outstanding >= WINDOW || !self.has_piece(t) {
                    return;
                }
                let Some(mut io) = IoBox::alloc() else { return };
                io.tag = u64::from(slot);
                io.tag2 = u64::from(t.gen);
                io.flags = t.flags;
                match (t.kind, t.stage) {
                    (IoKind::Flush, _) => {
                        io.io_type = IoType::Flush;
                        io.offset_blocks = 0;
                        io.num_blocks = 0;
                        io.flags = IoFlags::NONE;
                        t.next = 1;
                    }
                    (IoKind::Unmap, _) => {
                        // `next` walks inside the current descriptor; empty ones are skipped.
                        let mut piece = None;
                        while piece.is_none() && t.param_pos < t.param_end {
                            let mut d = [0u8; 16];
                            if let Some(b) = &t.data_out {
                                b.copy_to(t.param_pos as usize, &mut d);
                            }
                            let lba = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
                            let count = u64::from(u32::from_be_bytes([d[8], d[9], d[10], d[11]]));
                            if t.next < count {
                                let n = (count - t.next).min(max);
                                piece = Some((lba + t.next, n));
                                t.next += n;
                            }
                            if t.next >= count {
                                t.next = 0;
                                t.param_pos += 16;
                            }
                        }
                        let Some((at, n)) = piece else { return };
                        io.io_type = IoType::Unmap;
                        io.offset_blocks = at;
                        io.num_blocks = n;
                        io.flags = IoFlags::NONE;
                    }
                    (kind, stage) => {
                        let n = (t.blocks - t.next).min(max);
                        let (io_type, src, off) = match (kind, stage) {
                            (IoKind::Read | IoKind::Verify, _)
                            | (IoKind::WriteVerify, 1)
                            | (IoKind::CompareAndWrite, 1)
                            | (IoKind::OrWrite, 1) => (IoType::Read, t.buf.as_ref(), t.next * bs),
                            (IoKind::OrWrite, _) => (IoType::Write, t.buf.as_ref(), t.next * bs),
                            (IoKind::CompareAndWrite, _) => {
                                (IoType::Write, t.data_out.as_ref(), (t.blocks + t.next) * bs)
                            }
                            (IoKind::WriteSame, SAME_WRITE) => (IoType::Write, t.buf.as_ref(), 0),
                            (IoKind::WriteSame, SAME_ZEROES) => (IoType::WriteZeroes, None, 0),
                            (IoKind::WriteSame, _) => (IoType::Unmap, None, 0),
                            _ => (IoType::Write, t.data_out.as_ref(), t.next * bs),
                        };
                        let n = match (kind, stage) {
                            (IoKind::WriteSame, SAME_WRITE) => n.min(t.buf.as_ref().map_or(1, |b| b.len() as u64 / bs)),
                            _ => n,
                        };
                        io.io_type = io_type;
                        io.offset_blocks = t.lba + t.next;
                        io.num_blocks = n;
                        io.buf = src.map(|b| b.slice(off as usize, (n * bs) as usize));
                        t.next += n;
                    }
                }
                t.outstanding += 1;
                io
            };
            let mut io = piece;
            io.set_done(self.rc() as Rc<dyn bdev::IoDone>);
            self.bdev.submit(io);
        }
    }

    /// The stage's IO is done: compare, or set up the next stage. `Some`
    /// when the command is over.
    fn next_stage(&self, slot: u32) -> Option<Outcome> {
        let bs = u64::from(self.lun.block_size) as usize;
        let mut tasks = self.tasks.borrow_mut();
        let t = &mut tasks[slot as usize];
        match (t.kind, t.stage) {
            (IoKind::Read, _) => {
                t.data_in_len = (t.blocks * bs as u64) as u32;
                Some(Outcome::Good)
            }
            (IoKind::Verify, _) => {
                let n = t.blocks as usize * bs;
                let miscompare = match (t.bytchk, &t.buf, &t.data_out) {
                    (1, Some(read), Some(given)) => first_difference(read, 0, given, 0, n),
                    (3, Some(read), Some(given)) => (0..t.blocks as usize)
                        .find_map(|i| first_difference(read, i * bs, given, 0, bs).map(|o| i * bs + o)),
                    _ => None,
                };
                t.buf = None;
                Some(match miscompare {
                    Some(off) => Check::MISCOMPARE_DURING_VERIFY.with_info(off as u64).into(),
                    None => Outcome::Good,
                })
            }
            (IoKind::WriteVerify, 0) => {
                let n = t.blocks as usize * bs;
                t.buf = DmaBuf::alloc(n);
                if t.buf.is_none() {
                    return Some(Outcome::Status(status::TASK_SET_FULL));
                }
                t.stage = 1;
                t.next = 0;
                None
            }
            (IoKind::WriteVerify, _) => {
                let n = t.blocks as usize * bs;
                let miscompare = match (&t.buf, &t.data_out) {
                    (Some(read), Some(given)) => first_difference(read, 0, given, 0, n),
                    _ => None,
                };
                t.buf = None;
                Some(match miscompare {
                    Some(off) => Check::MISCOMPARE_DURING_VERIFY.with_info(off as u64).into(),
                    None => Outcome::Good,
                })
            }
            (IoKind::CompareAndWrite, 1) => {
                let n = t.blocks as usize * bs;
                let miscompare = match (&t.buf, &t.data_out) {
                    (Some(read), Some(given)) => first_difference(read, 0, given, 0, n),
                    _ => None,
                };
                t.buf = None;
                if let Some(off) = miscompare {
                    return Some(Check::MISCOMPARE_DURING_VERIFY.with_info(off as u64).into());
                }
                t.stage = 2;
                t.next = 0;
                None
            }
            (IoKind::OrWrite, 1) => {
                let n = t.blocks as usize * bs;
                if let (Some(medium), Some(given)) = (&t.buf, &t.data_out) {
                    medium.with_mut(|m| given.with(|g| m[..n].iter_mut().zip(&g[..n]).for_each(|(m, g)| *m |= g)));
                }
                t.stage = 2;
                t.next = 0;
                None
            }
            _ => Some(Outcome::Good),
        }
    }

    /// The outcome of a command that stopped: aborted, a miscompare, or a
    /// bdev error mapped to sense data.
    fn failure_outcome(&self, slot: u32) -> Outcome {
        let t = &self.tasks.borrow()[slot as usize];
        if t.aborted {
            return Outcome::Status(status::TASK_ABORTED);
        }
        if let Some(c) = t.check {
            return c.into();
        }
        let reading = matches!(t.kind, IoKind::Read | IoKind::Verify)
            || (matches!(t.kind, IoKind::CompareAndWrite | IoKind::OrWrite) && t.stage == 1)
            || (t.kind == IoKind::WriteVerify && t.stage == 1);
        match t.failure {
            Some(IoError::Media) if reading => Check::UNRECOVERED_READ_ERROR.into(),
            Some(IoError::Media) => Check::WRITE_ERROR.into(),
            Some(IoError::NoMemory) => Outcome::Status(status::TASK_SET_FULL),
            Some(IoError::NoDevice) => Check::NOT_READY.into(),
            Some(IoError::Aborted) => Check::COMMAND_ABORTED.into(),
            Some(IoError::OutOfRange) => Check::LBA_OUT_OF_RANGE.into(),
            Some(IoError::Nvme { sct: 2, .. }) if reading => Check::UNRECOVERED_READ_ERROR.into(),
            Some(IoError::Nvme { sct: 2, .. }) => Check::WRITE_ERROR.into(),
            Some(IoError::NotSupported | IoError::Nvme { .. }) | None => Check::INTERNAL_TARGET_FAILURE.into(),
        }
    }
}

/// Decoding of the block commands' CDBs into a plan.
impl Inner {
    /// READ/WRITE/VERIFY/... : decodes and checks the CDB, sets the plan in
    /// the slot, and starts it.
    pub(crate) fn block_command(&self, slot: u32, cdb: &[u8; 16]) -> Option<Outcome> {
        let lun = &*self.lun;
        let bs = u64::from(lun.block_size);
        let opcode = cdb[0];
        let (kind, lba, mut blocks, byte1) = match opcode {
            op::SYNCHRONIZE_CACHE_10 => {
                (IoKind::Flush, u64::from(cdb::be32(&cdb[2..6])), u64::from(cdb::be16(&cdb[7..9])), cdb[1])
            }
            op::SYNCHRONIZE_CACHE_16 => {
                (IoKind::Flush, cdb::be64(&cdb[2..10]), u64::from(cdb::be32(&cdb[10..14])), cdb[1])
            }
            op::UNMAP => (IoKind::Unmap, 0, 0, cdb[1]),
            _ => {
                let kind = match opcode {
                    op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => IoKind::Read,
                    op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => IoKind::Write,
                    op::WRITE_AND_VERIFY_10 | op::WRITE_AND_VERIFY_12 | op::WRITE_AND_VERIFY_16 => IoKind::WriteVerify,
                    op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => IoKind::Verify,
                    op::COMPARE_AND_WRITE => IoKind::CompareAndWrite,
                    op::ORWRITE_16 => IoKind::OrWrite,
                    op::WRITE_ATOMIC_16 => IoKind::WriteAtomic,
                    op::WRITE_SAME_10 | op::WRITE_SAME_16 => IoKind::WriteSame,
                    _ => return Some(Check::INVALID_OPCODE.into()),
                };
                let Some((lba, blocks, b1)) = cdb::block_range(cdb) else { return Some(Check::INVALID_OPCODE.into()) };
                (kind, lba, blocks, b1)
            }
        };
        // No protection information: RDPROTECT/WRPROTECT/VRPROTECT must be 0.
        if !matches!(opcode, op::READ_6 | op::WRITE_6 | op::UNMAP) && byte1 & 0xE0 != 0 && kind != IoKind::Flush {
            return Some(Check::invalid_cdb(1, Some(7)).into());
        }
        if kind == IoKind::WriteSame {
            if byte1 & 0x10 != 0 {
                // ANCHOR: anchored blocks are not supported.
                return Some(Check::invalid_cdb(1, Some(4)).into());
            }
            if byte1 & 0x06 != 0 {
                // PBDATA / LBDATA: obsolete or unsupported.
                return Some(Check::invalid_cdb(1, Some(2)).into());
            }
            if blocks == 0 && lba < lun.num_blocks() {
                blocks = lun.num_blocks() - lba;
            }
            if blocks > inquiry::max_write_same_blocks(lun) {
                // Beyond the block limits' MAXIMUM WRITE SAME LENGTH (SBC-4
                // 5.50), a count of zero (the rest of the medium) included.
                return Some(Check::invalid_cdb(if opcode == op::WRITE_SAME_10 { 7 } else { 10 }, None).into());
            }
        }
        let end = lba.checked_add(blocks);
        if kind != IoKind::Unmap && end.is_none_or(|e| e > lun.num_blocks()) {
            return Some(Check::LBA_OUT_OF_RANGE.into());
        }
        if kind == IoKind::WriteAtomic && cdb::be16(&cdb[10..12]) != 0 {
            // ATOMIC BOUNDARY: no boundaries are offered (block limits VPD).
            return Some(Check::invalid_cdb(10, None).into());
        }
        let limit = match kind {
            IoKind::CompareAndWrite => inquiry::max_caw_blocks(lun),
            IoKind::WriteAtomic => inquiry::max_atomic_blocks(lun),
            IoKind::Read | IoKind::Write | IoKind::WriteVerify | IoKind::Verify | IoKind::OrWrite => {
                inquiry::max_transfer_blocks(lun)
            }
            _ => u64::MAX,
        };
        if blocks > limit {
            let at = match cdb[0] >> 5 {
                0 => 4,
                1 | 2 => 7,
                5 => 6,
                _ => 10,
            };
            let at = match kind {
                IoKind::CompareAndWrite => 13,
                IoKind::WriteAtomic => 12,
                _ => at,
            };
            return Some(Check::invalid_cdb(at, None).into());
        }
        let mut flags = IoFlags::NONE;
        if !matches!(opcode, op::READ_6 | op::WRITE_6) {
            if byte1 & 0x08 != 0
                && matches!(
                    kind,
                    IoKind::Read
                        | IoKind::Write
                        | IoKind::WriteVerify
                        | IoKind::CompareAndWrite
                        | IoKind::OrWrite
                        | IoKind::WriteAtomic
                )
            {
                flags.insert(IoFlags::FUA);
            }
            if byte1 & 0x10 != 0 && kind != IoKind::WriteSame {
                flags.insert(IoFlags::DPO);
            }
        }
        let writes = matches!(
            kind,
            IoKind::Write
                | IoKind::WriteVerify
                | IoKind::CompareAndWrite
                | IoKind::WriteSame
                | IoKind::OrWrite
                | IoKind::WriteAtomic
        );
        if writes && lun.force_fua() {
            flags.insert(IoFlags::FUA);
        }
        if kind == IoKind::WriteVerify {
            // The verify reads the medium, not the cache.
            flags.insert(IoFlags::FUA);
        }
        let bytchk = if kind == IoKind::Verify { (byte1 >> 1) & 3 } else { 0 };
        if bytchk == 2 {
            return Some(Check::invalid_cdb(1, Some(2)).into());
        }
        // The Data-Out the command needs must all have arrived.
        let need = u64::from(cdb::data_out_len(cdb, lun.block_size));
        let (have, expected) = {
            let t = &self.tasks.borrow()[slot as usize];
            (t.data_out.as_ref().map_or(0, |b| b.len() as u64), u64::from(t.expected_len))
        };
        // COMPARE AND WRITE and WRITE SAME take exactly their Data-Out: any
        // other length says the CDB is not what the initiator meant.
        if kind == IoKind::CompareAndWrite && (have < need || expected != need) {
            return Some(Check::invalid_cdb(13, None).into());
        }
        if kind == IoKind::WriteSame && (have < need || expected != need) {
            return Some(Check::INVALID_FIELD_IN_IU.into());
        }
        if have < need {
            // Less Data-Out than the CDB says (the initiator expected less):
            // whole blocks are written and the rest is an overflow residual
            // (RFC 7143 11.4.5.2); a partial block is refused unwritten.
            // Only when the initiator meant to send less: Data-Out missing
            // from a longer transfer (a transport that dropped PDUs) is refused.
            let whole = matches!(kind, IoKind::Write | IoKind::WriteVerify) && have == expected && have % bs == 0;
            if !whole {
                return Some(Check::INVALID_FIELD_IN_IU.into());
            }
            blocks = have / bs;
        }
        {
            let mut tasks = self.tasks.borrow_mut();
            let t = &mut tasks[slot as usize];
            t.kind = kind;
            t.lba = lba;
            t.blocks = blocks;
            t.flags = flags;
            t.bytchk = bytchk;
            t.stage = 0;
            t.next = 0;
        }
        match kind {
            IoKind::Flush => {}
            IoKind::Unmap => {
                if let Err(o) = self.plan_unmap(slot, cdb) {
                    return Some(o);
                }
            }
            IoKind::WriteSame => {
                if blocks == 0 {
                    return Some(Outcome::Good);
                }
                let unmap = byte1 & 0x08 != 0;
                let ndob = opcode == op::WRITE_SAME_16 && byte1 & 0x01 != 0;
                if unmap && !inquiry::supports(lun, bdev::IoType::Unmap) {
                    return Some(Check::invalid_cdb(1, Some(3)).into());
                }
                if let Err(o) = plan_write_same(self, slot, unmap, ndob) {
                    return Some(o);
                }
            }
            _ => {
                if blocks == 0 {
                    return Some(Outcome::Good);
                }
                if matches!(kind, IoKind::Read | IoKind::Verify | IoKind::CompareAndWrite | IoKind::OrWrite) {
                    let Some(buf) = DmaBuf::alloc((blocks * bs) as usize) else {
                        return Some(Outcome::Status(status::TASK_SET_FULL));
                    };
                    self.tasks.borrow_mut()[slot as usize].buf = Some(buf);
                }
            }
        }
        self.start_io(slot)
    }

    /// UNMAP: checks the parameter list; its block descriptors are issued
    /// from `data_out` as the command runs.
    fn plan_unmap(&self, slot: u32, cdb: &[u8; 16]) -> Result<(), Outcome> {
        if !inquiry::supports(&self.lun, bdev::IoType::Unmap) {
            return Err(Check::INVALID_OPCODE.into());
        }
        if cdb[1] & 0x01 != 0 {
            // ANCHOR
            return Err(Check::invalid_cdb(1, Some(0)).into());
        }
        let list_len = u32::from(cdb::be16(&cdb[7..9]));
        if list_len == 0 {
            return Ok(());
        }
        let mut tasks = self.tasks.borrow_mut();
        let t = &mut tasks[slot as usize];
        let Some(p) = t.data_out.clone() else { return Err(Check::PARAM_LIST_LENGTH_ERROR.into()) };
        if list_len < 8 || (p.len() as u32) < list_len {
            return Err(Check::PARAM_LIST_LENGTH_ERROR.into());
        }
        let mut head = [0u8; 8];
        p.copy_to(0, &mut head);
        let data_len = u32::from(cdb::be16(&head[0..2]));
        let desc_len = u32::from(cdb::be16(&head[2..4]));
        if data_len + 2 > list_len || desc_len + 8 > list_len {
            return Err(Check::PARAM_LIST_LENGTH_ERROR.into());
        }
        let count = desc_len / 16;
        if count > MAX_UNMAP_DESCRIPTORS {
            return Err(Check::invalid_param(2, None).into());
        }
        for i in 0..count {
            let mut d = [0u8; 16];
            p.copy_to(8 + 16 * i as usize, &mut d);
            let lba = cdb::be64(&d[0..8]);
            let n = u64::from(cdb::be32(&d[8..12]));
            if lba.checked_add(n).is_none_or(|e| e > self.lun.num_blocks()) {
                return Err(Check::LBA_OUT_OF_RANGE.into());
            }
        }
        t.param_pos = 8;
        t.param_end = 8 + 16 * count;
        // Skip empty descriptors up front is not needed: a zero count issues nothing.
        Ok(())
    }
}

/// First byte offset where `a[ao..ao+n]` and `b[bo..bo+n]` differ.
fn first_difference(a: &DmaBuf, ao: usize, b: &DmaBuf, bo: usize, n: usize) -> Option<usize> {
    a.with(|x| {
        b.with(|y| {
            let x = x.get(ao..ao + n)?;
            let y = y.get(bo..bo + n)?;
            x.iter().zip(y).position(|(p, q)| p != q)
        })
    })
}

/// Prepares WRITE SAME: the stage (write, write zeroes or unmap) and, for
/// writes, a buffer holding the block repeated.
pub(crate) fn plan_write_same(inner: &Inner, slot: u32, unmap: bool, ndob: bool) -> Result<(), Outcome> {
    let bs = inner.lun.block_size as usize;
    let mut tasks = inner.tasks.borrow_mut();
    let t = &mut tasks[slot as usize];
    let zero = ndob || t.data_out.as_ref().is_some_and(|b| b.with(|x| x[..bs.min(x.len())].iter().all(|&v| v == 0)));
    let bdev = inner.lun.bdev().bdev();
    // UNMAP set: the blocks are deallocated whatever the data block holds
    // (SBC-4 5.49: reads then return what deallocated blocks return, LBPRZ).
    if unmap && bdev.io_type_supported(IoType::Unmap) {
        t.stage = SAME_UNMAP;
        return Ok(());
    }
    if zero && bdev.io_type_supported(IoType::WriteZeroes) {
        t.stage = SAME_ZEROES;
        return Ok(());
    }
    t.stage = SAME_WRITE;
    let blocks = (t.blocks * bs as u64).min(WRITE_SAME_PATTERN_BYTES.max(bs as u64)) as usize / bs;
    let Some(buf) = DmaBuf::alloc(blocks * bs) else { return Err(Outcome::Status(status::TASK_SET_FULL)) };
    let mut block = [0u8; 65536];
    if let Some(src) = &t.data_out {
        src.copy_to(0, &mut block[..bs]);
    }
    buf.with_mut(|b| {
        for chunk in b.chunks_mut(bs) {
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    });
    t.buf = Some(buf);
    Ok(())
}
