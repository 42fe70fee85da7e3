//! One connection's path to one LUN, on the connection's reactor: a fixed
//! table of task slots, command dispatch with the unit-attention and
//! reservation gates, and completion delivery (always after `execute`
//! returned: immediate answers wait in `ready` for the next poll).

use super::cdb::{self, op};
use super::lun::{AbortOf, Lun, WriteCounters};
use super::reservations::Refusal;
use super::sense::Check;
use super::{inquiry, mode, reservations};
use super::{status, Nexus, Residual, ScsiCommand, ScsiCompletion, ScsiDone, Sense, TaskAttr};
use bdev::{DmaBuf, IoBox, IoDone, IoError, IoFlags, IoStatus};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Commands one channel holds at once; more are answered TASK SET FULL.
/// The transport sizes its command window to this.
pub const QUEUE_DEPTH: usize = 128;

/// `tag2` of the descriptor that wakes the channel to deliver `ready`.
pub(crate) const WAKE_TAG: u64 = u64::MAX;

/// How a finished command ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Good,
    Check(Check),
    /// A status without sense (BUSY, RESERVATION CONFLICT, TASK SET FULL,
    /// TASK ABORTED, CONDITION MET).
    Status(u8),
}

impl From<Check> for Outcome {
    fn from(c: Check) -> Self {
        Outcome::Check(c)
    }
}

/// What an IO command does, stage by stage (see `block`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum IoKind {
    #[default]
    None,
    Read,
    Write,
    /// WRITE AND VERIFY: write with FUA, then read back and compare.
    WriteVerify,
    /// VERIFY: read; compare with Data-Out when BYTCHK asks.
    Verify,
    CompareAndWrite,
    /// ORWRITE (16): read, OR the Data-Out in, write back, holding the
    /// range like COMPARE AND WRITE.
    OrWrite,
    /// WRITE ATOMIC (16): one bdev write, never split, holding the range.
    WriteAtomic,
    Flush,
    Unmap,
    WriteSame,
}

/// One command in flight.
#[derive(Default)]
pub(crate) struct Task {
    pub(crate) busy: bool,
    /// Bumped at every reuse: a late bdev completion for an earlier
    /// occupant is recognised and dropped.
    pub(crate) gen: u32,
    pub(crate) tag: u32,
    pub(crate) cdb: [u8; 16],
    /// Sent with the ACA task attribute.
    pub(crate) aca: bool,
    /// Sent with the ORDERED task attribute.
    pub(crate) ordered: bool,
    pub(crate) nexus: Option<Nexus>,
    pub(crate) expected_len: u32,
    pub(crate) data_out: Option<DmaBuf>,
    /// Data-In (or the read-back buffer of a compare).
    pub(crate) buf: Option<DmaBuf>,
    /// Valid bytes of Data-In in `buf`.
    pub(crate) data_in_len: u32,
    pub(crate) aborted: bool,
    /// Aborted on a LUN-wide announcement (another nexus's reset or
    /// preemption): counted in `aborts_unsettled` until it ends.
    pub(crate) abort_announced: bool,
    // The IO plan (block commands).
    pub(crate) kind: IoKind,
    pub(crate) stage: u8,
    pub(crate) lba: u64,
    pub(crate) blocks: u64,
    /// Next block (relative to `lba`) to issue, and bdev IOs outstanding.
    pub(crate) next: u64,
    pub(crate) outstanding: u32,
    pub(crate) flags: IoFlags,
    pub(crate) failure: Option<IoError>,
    /// An error found by the command itself (a miscompare).
    pub(crate) check: Option<Check>,
    /// VERIFY's BYTCHK field.
    pub(crate) bytchk: u8,
    /// Counted in this channel's `WriteCounters::started`.
    pub(crate) write_counted: bool,
    /// Holds a COMPARE AND WRITE range in the LUN.
    pub(crate) holds_caw_range: bool,
    /// Unmap descriptors: offset of the next one in `data_out`, and the end.
    pub(crate) param_pos: u32,
    pub(crate) param_end: u32,
    /// Snapshot of every channel's started writes (COMPARE AND WRITE waits
    /// until each has finished that many).
    pub(crate) caw_wait: Vec<(std::sync::Weak<WriteCounters>, u64)>,
}

pub(crate) struct Inner {
    pub(crate) me: Weak<Inner>,
    pub(crate) lun: Arc<Lun>,
    pub(crate) bdev: Rc<bdev::Channel>,
    done: Rc<dyn ScsiDone>,
    pub(crate) tasks: RefCell<Vec<Task>>,
    free: RefCell<Vec<u32>>,
    /// Answers waiting for delivery, and whether a wake-up is on its way.
    ready: RefCell<VecDeque<ScsiCompletion>>,
    wake_armed: Cell<bool>,
    /// Commands held back by task attributes (SAM-5 8.6): behind an
    /// ORDERED task, or an ORDERED task behind older ones. FIFO.
    held: RefCell<VecDeque<ScsiCommand>>,
    /// ORDERED tasks in the slots, and whether `release_held` is running.
    ordered_in_flight: Cell<u32>,
    releasing: Cell<bool>,
    /// The nexus (its initiator port, held so the comparison by address
    /// stays sound) and the UA generation at which it had none pending.
    ua_clear: RefCell<Option<(Arc<str>, u64)>>,
    pub(crate) writes: Arc<WriteCounters>,
    /// The LUN's `abort_generation` this channel has acted on, and the
    /// tasks it aborted on announcements that have not ended yet.
    aborts_seen: Cell<u64>,
    aborts_unsettled: Cell<u32>,
    /// The newest announcement that aborted a task of this channel (its
    /// transport then waits for the responses' acknowledgement).
    aborts_affected: Cell<u64>,
    /// Looks for abort announcements while no command comes or completes.
    abort_poller: RefCell<Option<reactor::PollerHandle>>,
    /// Tasks waiting for a COMPARE AND WRITE range (or CAW waiting for
    /// writes to drain), retried by `retry_poller`.
    pub(crate) parked: RefCell<Vec<u32>>,
    pub(crate) retry_poller: RefCell<Option<reactor::PollerHandle>>,
}

/// One connection's channel to a LUN. `!Send`: lives on the connection's reactor.
pub struct LunChannel {
    inner: Rc<Inner>,
}

impl LunChannel {
    pub fn open(lun: &Arc<Lun>, done: Rc<dyn ScsiDone>) -> Result<LunChannel, bdev::BdevError> {
        let bdev = lun.bdev().channel()?;
        let writes = Arc::new(WriteCounters::default());
        // Announcements before the channel existed cover none of its tasks.
        let seen = lun.abort_generation.load(Ordering::Acquire);
        writes.aborts_settled.store(seen, Ordering::Release);
        writes.responses_acked.store(seen, Ordering::Release);
        lun.add_channel(&writes);
        let inner = Rc::new_cyclic(|me| Inner {
            me: me.clone(),
            lun: lun.clone(),
            bdev,
            done,
            tasks: RefCell::new((0..QUEUE_DEPTH).map(|_| Task::default()).collect()),
            free: RefCell::new((0..QUEUE_DEPTH as u32).rev().collect()),
            ready: RefCell::new(VecDeque::with_capacity(QUEUE_DEPTH * 2)),
            wake_armed: Cell::new(false),
            held: RefCell::new(VecDeque::with_capacity(QUEUE_DEPTH)),
            ordered_in_flight: Cell::new(0),
            releasing: Cell::new(false),
            ua_clear: RefCell::new(None),
            writes,
            aborts_seen: Cell::new(seen),
            aborts_unsettled: Cell::new(0),
            aborts_affected: Cell::new(0),
            abort_poller: RefCell::new(None),
            parked: RefCell::new(Vec::with_capacity(QUEUE_DEPTH)),
            retry_poller: RefCell::new(None),
        });
        // Data-In buffers for the common sizes, so the first commands map nothing.
        DmaBuf::reserve(4096, 16);
        // A task held at the bdev is aborted by another nexus's reset
        // within a poll, not only when this channel next sees traffic.
        let me = Rc::downgrade(&inner);
        *inner.abort_poller.borrow_mut() = Some(reactor::register_poller("scsi_lun_aborts", move || {
            let Some(me) = me.upgrade() else { return reactor::PollStatus::Done };
            if me.apply_announced_aborts() {
                reactor::PollStatus::Busy
            } else {
                reactor::PollStatus::Idle
            }
        }));
        Ok(LunChannel { inner })
    }

    /// Result later through done.scsi_done (never re-entrantly inside execute).
    pub fn execute(&self, cmd: ScsiCommand) {
        self.inner.execute(cmd);
    }

    /// Aborts the command with this tag if in flight; its completion still
    /// arrives later (status TASK ABORTED or its real status); returns whether found.
    pub fn abort(&self, tag: u32) -> bool {
        if self.inner.abort_held(Some(tag)) > 0 {
            return true;
        }
        let slot = {
            let tasks = self.inner.tasks.borrow();
            tasks.iter().position(|t| t.busy && t.tag == tag && !t.aborted)
        };
        match slot {
            Some(s) => {
                self.inner.abort_slot(s as u32);
                true
            }
            None => false,
        }
    }

    pub fn abort_all(&self) -> usize {
        let held = self.inner.abort_held(None);
        let slots: Vec<u32> = {
            let tasks = self.inner.tasks.borrow();
            (0..tasks.len() as u32).filter(|&i| tasks[i as usize].busy && !tasks[i as usize].aborted).collect()
        };
        for &s in &slots {
            self.inner.abort_slot(s);
        }
        held + slots.len()
    }

    pub fn in_flight(&self) -> usize {
        self.inner.busy() + self.inner.held.borrow().len()
    }

    /// The abort announcement up to which this channel's aborted tasks have
    /// ended and their answers have reached the transport (none waits for
    /// delivery), or None while some answer is still queued here.
    pub fn aborts_answered(&self) -> Option<u64> {
        if !self.inner.ready.borrow().is_empty() {
            return None;
        }
        Some(self.inner.writes.aborts_settled.load(Ordering::Acquire))
    }

    /// Whether an announcement newer than `gen` aborted a task of this channel.
    pub fn aborted_tasks_after(&self, gen: u64) -> bool {
        self.inner.aborts_affected.get() > gen
    }

    /// The transport has had every response to the tasks aborted up to
    /// announcement `gen` acknowledged (`u64::MAX`: it has closed and never
    /// will be): a reset waiting in [`Lun::aborts_acknowledged`] may answer.
    pub fn responses_acknowledged(&self, gen: u64) {
        self.inner.writes.responses_acked.fetch_max(gen, Ordering::AcqRel);
    }
}

impl Drop for LunChannel {
    /// The connection is gone: its commands are aborted, so that none
    /// keeps a COMPARE AND WRITE range or a parked write forever. Those
    /// still at the bdev answer (to `done`) when the bdev returns them.
    fn drop(&mut self) {
        self.abort_all();
        if let Some(p) = self.inner.retry_poller.borrow_mut().take() {
            p.unregister();
        }
        if let Some(p) = self.inner.abort_poller.borrow_mut().take() {
            p.unregister();
        }
    }
}

impl Inner {
    pub(crate) fn rc(&self) -> Rc<Inner> {
        self.me.upgrade().unwrap_or_else(|| unreachable!("a channel method runs while the channel lives"))
    }

    fn busy(&self) -> usize {
        QUEUE_DEPTH - self.free.borrow().len()
    }

    /// Whether task attributes make `cmd` wait: anything (but HEAD OF
    /// QUEUE) behind a held command or an ORDERED task in flight; an
    /// ORDERED task behind any task in flight.
    fn must_wait(&self, attr: TaskAttr) -> bool {
        match attr {
            TaskAttr::HeadOfQueue => false,
            TaskAttr::Ordered => !self.held.borrow().is_empty() || self.busy() > 0,
            TaskAttr::Simple | TaskAttr::Aca => !self.held.borrow().is_empty() || self.ordered_in_flight.get() > 0,
        }
    }

    fn execute(&self, cmd: ScsiCommand) {
        self.apply_announced_aborts();
        if cmd.received_at.is_some_and(|g| self.lun.aborted_since(g, &cmd.nexus)) {
            self.answer_without_slot(cmd, status::TASK_ABORTED);
            return;
        }
        if self.must_wait(cmd.attr) {
            if self.held.borrow().len() < QUEUE_DEPTH {
                self.held.borrow_mut().push_back(cmd);
            } else {
                self.answer_without_slot(cmd, status::TASK_SET_FULL);
            }
            return;
        }
        self.start(cmd);
    }

    /// Starts the held commands the task attributes now allow, in order.
    fn release_held(&self) {
        if self.releasing.replace(true) {
            return;
        }
        loop {
            let Some(attr) = self.held.borrow().front().map(|c| c.attr) else { break };
            let blocked = match attr {
                TaskAttr::Ordered => self.busy() > 0,
                _ => self.ordered_in_flight.get() > 0,
            };
            if blocked {
                break;
            }
            let Some(cmd) = self.held.borrow_mut().pop_front() else { break };
            self.start(cmd);
        }
        self.releasing.set(false);
    }

    /// Aborts held commands (the one with `tag`, or all): they are answered
    /// TASK ABORTED without running. Returns how many.
    fn abort_held(&self, tag: Option<u32>) -> usize {
        self.abort_held_where(&|c| tag.is_none_or(|t| c.tag == t))
    }

    fn abort_held_where(&self, which: &dyn Fn(&ScsiCommand) -> bool) -> usize {
        let mut n = 0;
        loop {
            let i = self.held.borrow().iter().position(which);
            let Some(cmd) = i.and_then(|i| self.held.borrow_mut().remove(i)) else { break };
            self.answer_without_slot(cmd, status::TASK_ABORTED);
            n += 1;
        }
        if n > 0 {
            self.release_held();
        }
        n
    }

    /// Answers a command that never got a slot (deferred).
    fn answer_without_slot(&self, cmd: ScsiCommand, st: u8) {
        let c = ScsiCompletion {
            tag: cmd.tag,
            status: st,
            sense: Sense::EMPTY,
            data_in: None,
            data_in_len: 0,
            residual: if cmd.expected_len > 0 { Residual::Under(cmd.expected_len) } else { Residual::None },
            data_out: cmd.data_out,
        };
        self.defer(c);
    }

    fn start(&self, cmd: ScsiCommand) {
        let Some(slot) = self.free.borrow_mut().pop() else {
            self.answer_without_slot(cmd, status::TASK_SET_FULL);
            return;
        };
        if cmd.attr == TaskAttr::Ordered {
            self.ordered_in_flight.set(self.ordered_in_flight.get() + 1);
        }
        {
            let mut tasks = self.tasks.borrow_mut();
            let t = &mut tasks[slot as usize];
            let gen = t.gen.wrapping_add(1);
            let caw_wait = std::mem::take(&mut t.caw_wait);
            *t = Task {
                busy: true,
                gen,
                tag: cmd.tag,
                cdb: cmd.cdb,
                aca: cmd.attr == TaskAttr::Aca,
                ordered: cmd.attr == TaskAttr::Ordered,
                nexus: Some(cmd.nexus),
                expected_len: cmd.expected_len,
                data_out: cmd.data_out,
                caw_wait,
                ..Task::default()
            };
            t.caw_wait.clear();
        }
        // `None`: issued (or parked); it completes through `io_done`.
        if let Some(outcome) = self.dispatch(slot) {
            self.finish(slot, outcome, true);
        }
    }

    /// Runs the gates and the command; `Some` when it finished at once.
    fn dispatch(&self, slot: u32) -> Option<Outcome> {
        let (cdb, nexus, aca) = {
            let tasks = self.tasks.borrow();
            let t = &tasks[slot as usize];
            (t.cdb, t.nexus.clone(), t.aca)
        };
        let Some(nexus) = nexus else {
            debug_assert!(false, "a started task without its nexus");
            return Some(Check::INTERNAL_TARGET_FAILURE.into());
        };
        let opcode = cdb[0];
        // NACA (ACA) is not supported: a control byte asking for it, or an
        // ACA task, is refused.
        if let Some(len) = cdb::cdb_len_of(opcode) {
            if cdb[len - 1] & 0x04 != 0 {
                return Some(Check::invalid_cdb((len - 1) as u16, Some(2)).into());
            }
        }
        if aca {
            return Some(Check::INVALID_MESSAGE.into());
        }
        if opcode == op::REQUEST_SENSE {
            return Some(self.request_sense(slot, &nexus, &cdb));
        }
        if let Some(c) = self.unit_attention(opcode, &nexus) {
            return Some(Outcome::Check(c));
        }
        if self.lun.reserved.load(Ordering::Acquire) && self.lun.state().res.conflicts(&nexus, &cdb) {
            return Some(Outcome::Status(status::RESERVATION_CONFLICT));
        }
        let lun = &*self.lun;
        Some(match opcode {
            op::INQUIRY => self.data_in(slot, 4096, |out| inquiry::inquiry(lun, &nexus, &cdb, out)),
            // The transport answers REPORT LUNS with every LUN of the target
            // (`execute_without_lun`); here the channel knows only its own.
            op::REPORT_LUNS => self.data_in(slot, 4096, |out| super::nolun::report_luns(&cdb, &[lun.id()], out)),
            op::READ_CAPACITY_10 => self.data_in(slot, 4096, |out| inquiry::read_capacity_10(lun, &cdb, out)),
            op::SERVICE_ACTION_IN_16 => match cdb[1] & 0x1F {
                op::SA_READ_CAPACITY_16 => self.data_in(slot, 4096, |out| inquiry::read_capacity_16(lun, &cdb, out)),
                op::SA_GET_LBA_STATUS => self.data_in(slot, 4096, |out| inquiry::get_lba_status(lun, &cdb, out)),
                _ => Check::invalid_cdb(1, Some(4)).into(),
            },
            op::MAINTENANCE_IN => match cdb[1] & 0x1F {
                op::SA_REPORT_SUPPORTED_OPCODES => {
                    self.data_in(slot, 4096, |out| inquiry::report_supported_opcodes(lun, &cdb, out))
                }
                op::SA_REPORT_SUPPORTED_TMFS => {
                    self.data_in(slot, 4096, |out| inquiry::report_supported_tmfs(&cdb, out))
                }
                _ => Check::invalid_cdb(1, Some(4)).into(),
            },
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => self.data_in(slot, 4096, |out| mode::mode_sense(lun, &cdb, out)),
            op::MODE_SELECT_6 | op::MODE_SELECT_10 => {
                let params = self.tasks.borrow()[slot as usize].data_out.clone();
                let r = match &params {
                    Some(p) => p.with(|b| mode::mode_select(lun, &nexus, &cdb, b)),
                    None => mode::mode_select(lun, &nexus, &cdb, &[]),
                };
                r.map_or_else(Outcome::Check, |()| Outcome::Good)
            }
            op::START_STOP_UNIT => {
                // No medium to load or eject (LOEJ is a no-op on a fixed
                // medium), no power conditions to enter.
                if cdb[4] >> 4 != 0 {
                    Check::invalid_cdb(4, Some(7)).into()
                } else {
                    lun.stopped.store(cdb[4] & 0x01 == 0, Ordering::Release);
                    Outcome::Good
                }
            }
            _ if lun.stopped.load(Ordering::Acquire) && media_access(opcode) => Check::NOT_READY_STOPPED.into(),
            op::TEST_UNIT_READY => Outcome::Good,
            op::PRE_FETCH_10 | op::PRE_FETCH_16 => {
                // Nothing to prefetch into: GOOD says the blocks were not
                // all brought into a cache (SBC-4 5.10), after the range check.
                let (lba, blocks) = if opcode == op::PRE_FETCH_10 {
                    (u64::from(cdb::be32(&cdb[2..6])), u64::from(cdb::be16(&cdb[7..9])))
                } else {
                    (cdb::be64(&cdb[2..10]), u64::from(cdb::be32(&cdb[10..14])))
                };
                if lba.checked_add(blocks).is_none_or(|e| e > lun.num_blocks()) {
                    Check::LBA_OUT_OF_RANGE.into()
                } else {
                    Outcome::Good
                }
            }
            op::READ_DEFECT_DATA_10 | op::READ_DEFECT_DATA_12 => {
                self.data_in(slot, 4096, |out| inquiry::read_defect_data(&cdb, out))
            }
            op::PREVENT_ALLOW_MEDIUM_REMOVAL => {
                if cdb[4] & 0x03 > 1 {
                    Check::invalid_cdb(4, Some(1)).into()
                } else {
                    Outcome::Good
                }
            }
            op::RESERVE_6 => refusal(reservations::reserve6(lun, &nexus)),
            op::RELEASE_6 => refusal(reservations::release6(lun, &nexus)),
            op::PERSISTENT_RESERVE_IN => {
                self.data_in(slot, 65536, |out| reservations::persistent_reserve_in(lun, &cdb, out))
            }
            op::PERSISTENT_RESERVE_OUT => {
                let params = self.tasks.borrow()[slot as usize].data_out.clone();
                let r = match &params {
                    Some(p) => p.with(|b| reservations::persistent_reserve_out(lun, &nexus, &cdb, b)),
                    None => reservations::persistent_reserve_out(lun, &nexus, &cdb, &[]),
                };
                match r {
                    Ok(Some(abort_gen)) => {
                        self.complete_when_aborts_settle(slot, abort_gen);
                        return None;
                    }
                    r => refusal(r.map(|_| ())),
                }
            }
            _ => return self.block_command(slot, &cdb),
        })
    }

    /// PREEMPT AND ABORT: the command ends GOOD only once every channel of
    /// the LUN has ended the preempted nexuses' tasks (SPC-4 5.13.11.2),
    /// checked each poll; it stays in its slot meanwhile (a reset that
    /// aborts it answers it as any other task). A rare command: the
    /// poller's allocation is off the IO path.
    fn complete_when_aborts_settle(&self, slot: u32, abort_gen: u64) {
        let task_gen = self.tasks.borrow()[slot as usize].gen;
        let me = self.me.clone();
        reactor::register_poller("scsi_preempt_abort", move || {
            let Some(me) = me.upgrade() else { return reactor::PollStatus::Done };
            let waiting = {
                let tasks = me.tasks.borrow();
                let t = &tasks[slot as usize];
                t.busy && t.gen == task_gen
            };
            if !waiting {
                return reactor::PollStatus::Done;
            }
            me.apply_announced_aborts();
            if !me.lun.aborts_settled(abort_gen) {
                return reactor::PollStatus::Idle;
            }
            me.finish(slot, Outcome::Good, false);
            reactor::PollStatus::Done
        });
    }

    /// Runs `f` on a Data-In buffer of `cap` bytes; it returns the full
    /// length of its parameter data (clipped later to what was asked for).
    fn data_in(&self, slot: u32, cap: usize, f: impl FnOnce(&mut [u8]) -> Result<usize, Check>) -> Outcome {
        let Some(buf) = DmaBuf::alloc(cap) else { return Outcome::Status(status::TASK_SET_FULL) };
        match buf.with_mut(|b| {
            b.fill(0);
            f(b)
        }) {
            Ok(n) => {
                let mut tasks = self.tasks.borrow_mut();
                let t = &mut tasks[slot as usize];
                t.data_in_len = n.min(cap) as u32;
                t.buf = Some(buf);
                Outcome::Good
            }
            Err(c) => c.into(),
        }
    }

    /// REQUEST SENSE: the oldest pending unit attention (which it clears),
    /// else NO SENSE.
    fn request_sense(&self, slot: u32, nexus: &Nexus, cdb: &[u8; 16]) -> Outcome {
        if cdb[1] & 0xFE != 0 {
            return Check::invalid_cdb(1, None).into();
        }
        let descriptor = cdb[1] & 1 != 0;
        let (ua, _) = self.lun.take_ua(nexus, true);
        let sense = ua.unwrap_or(Check::NO_ADDITIONAL_SENSE).encode(descriptor);
        self.data_in(slot, 4096, |out| {
            let n = sense.len as usize;
            out[..n].copy_from_slice(sense.as_slice());
            Ok(n)
        })
    }

    /// The unit attention to report instead of running the command, if
    /// any. INQUIRY, REPORT LUNS and REQUEST SENSE run regardless (SPC-5
    /// 5.14 / SAM-5 5.14). Lock-free while this nexus has none pending.
    fn unit_attention(&self, opcode: u8, nexus: &Nexus) -> Option<Check> {
        let gen = self.lun.ua_generation.load(Ordering::Acquire);
        if let Some((port, clear_gen)) = &*self.ua_clear.borrow() {
            if *clear_gen == gen && Arc::ptr_eq(port, &nexus.initiator_port) {
                return None;
            }
        }
        let exempt = matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE);
        let (ua, _) = self.lun.take_ua(nexus, !exempt);
        match ua {
            None => {
                *self.ua_clear.borrow_mut() = Some((nexus.initiator_port.clone(), gen));
                None
            }
            Some(_) if exempt => None,
            Some(c) => Some(c),
        }
    }

    /// Completes the command in `slot`; `deferred` when called inside
    /// `execute` (the answer then waits for the next poll).
    pub(crate) fn finish(&self, slot: u32, outcome: Outcome, deferred: bool) {
        let ordered;
        let c = {
            let mut tasks = self.tasks.borrow_mut();
            let t = &mut tasks[slot as usize];
            if !t.busy {
                debug_assert!(false, "finishing a free slot");
                return;
            }
            let outcome = if t.aborted { Outcome::Status(status::TASK_ABORTED) } else { outcome };
            if t.write_counted {
                self.writes.finished.fetch_add(1, Ordering::Release);
                t.write_counted = false;
            }
            if std::mem::take(&mut t.abort_announced) {
                self.aborts_unsettled.set(self.aborts_unsettled.get() - 1);
                if self.aborts_unsettled.get() == 0 {
                    self.writes.aborts_settled.store(self.aborts_seen.get(), Ordering::Release);
                }
            }
            let (st, sense) = match outcome {
                Outcome::Good => (status::GOOD, Sense::EMPTY),
                Outcome::Check(c) => (status::CHECK_CONDITION, c.encode(self.lun.descriptor_sense())),
                Outcome::Status(s) => (s, Sense::EMPTY),
            };
            let good = st == status::GOOD || st == status::CONDITION_MET;
            let (data_in, data_in_len, residual) = residual_of(t, good, self.lun.block_size);
            t.busy = false;
            ordered = std::mem::replace(&mut t.ordered, false);
            t.nexus = None;
            t.kind = IoKind::None;
            ScsiCompletion {
                tag: t.tag,
                status: st,
                sense,
                data_in,
                data_in_len,
                residual,
                data_out: t.data_out.take(),
            }
        };
        self.free.borrow_mut().push(slot);
        if ordered {
            self.ordered_in_flight.set(self.ordered_in_flight.get() - 1);
        }
        if deferred {
            self.defer(c);
        } else {
            self.done.scsi_done(c);
        }
        if !self.held.borrow().is_empty() {
            self.release_held();
        }
    }

    /// Queues an answer for delivery after `execute` returns.
    fn defer(&self, c: ScsiCompletion) {
        self.ready.borrow_mut().push_back(c);
        if self.wake_armed.replace(true) {
            return;
        }
        // The bdev completion queue delivers the wake-up on the next poll,
        // from a pooled descriptor: no allocation.
        match IoBox::alloc() {
            Some(mut io) => {
                io.tag2 = WAKE_TAG;
                io.set_done(self.rc());
                io.complete(IoStatus::Success);
            }
            None => {
                // Descriptor pool empty: a one-shot poller delivers instead.
                let me = self.me.clone();
                reactor::register_poller("scsi_ready", move || {
                    if let Some(me) = me.upgrade() {
                        me.deliver_ready();
                    }
                    reactor::PollStatus::Done
                });
            }
        }
    }

    fn deliver_ready(&self) {
        self.wake_armed.set(false);
        // One at a time: `scsi_done` may execute more commands.
        let n = self.ready.borrow().len();
        for _ in 0..n {
            let Some(c) = self.ready.borrow_mut().pop_front() else { break };
            self.done.scsi_done(c);
        }
    }

    /// Aborts the tasks that abort announcements (PREEMPT AND ABORT, a
    /// reset, from any channel) made since this channel last looked cover:
    /// held commands are answered TASK ABORTED at once, tasks in the slots
    /// end with TASK ABORTED once their bdev IOs are back. One atomic load
    /// when there is none; returns whether there was.
    pub(crate) fn apply_announced_aborts(&self) -> bool {
        let gen = self.lun.abort_generation.load(Ordering::Acquire);
        let seen = self.aborts_seen.replace(gen);
        if gen == seen {
            return false;
        }
        let covered: Vec<AbortOf> =
            self.lun.state().aborts.iter().filter(|(g, _)| *g > seen).map(|(_, a)| a.clone()).collect();
        let covers = |n: &Nexus| covered.iter().any(|a| a.covers(n));
        let mut affected = self.abort_held_where(&|c| covers(&c.nexus)) > 0;
        let mut slots = Vec::new();
        {
            let mut tasks = self.tasks.borrow_mut();
            for (i, t) in tasks.iter_mut().enumerate() {
                if t.busy && !t.abort_announced && t.nexus.as_ref().is_some_and(covers) {
                    affected = true;
                    t.abort_announced = true;
                    self.aborts_unsettled.set(self.aborts_unsettled.get() + 1);
                    if !t.aborted {
                        slots.push(i as u32);
                    }
                }
            }
        }
        if affected {
            self.aborts_affected.set(gen);
        }
        if self.aborts_unsettled.get() == 0 {
            self.writes.aborts_settled.store(gen, Ordering::Release);
        }
        for s in slots {
            self.abort_slot(s);
        }
        true
    }

    pub(crate) fn abort_slot(&self, slot: u32) {
        let immediate = {
            let mut tasks = self.tasks.borrow_mut();
            let t = &mut tasks[slot as usize];
            t.aborted = true;
            t.outstanding == 0
        };
        if immediate {
            self.parked.borrow_mut().retain(|&s| s != slot);
            self.release_caw(slot);
            self.finish(slot, Outcome::Status(status::TASK_ABORTED), true);
        } else {
            let gen = self.tasks.borrow()[slot as usize].gen;
            self.bdev.abort(&|io| io.tag == u64::from(slot) && io.tag2 == u64::from(gen));
        }
    }

    /// Gives back a COMPARE AND WRITE range held by `slot`, if any.
    pub(crate) fn release_caw(&self, slot: u32) {
        let (held, lba, blocks) = {
            let mut tasks = self.tasks.borrow_mut();
            let t = &mut tasks[slot as usize];
            let held = std::mem::replace(&mut t.holds_caw_range, false);
            (held, t.lba, t.blocks)
        };
        if held {
            let mut st = self.lun.state();
            if let Some(i) = st.caw_ranges.iter().position(|&r| r == (lba, blocks)) {
                st.caw_ranges.swap_remove(i);
            }
            self.lun.caw_active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl IoDone for Inner {
    fn io_done(&self, io: IoBox) {
        if io.tag2 == WAKE_TAG {
            drop(io);
            self.deliver_ready();
            return;
        }
        self.block_io_done(io);
    }
}

/// Commands a stopped unit answers NOT READY.
fn media_access(opcode: u8) -> bool {
    !matches!(
        opcode,
        op::INQUIRY
            | op::REPORT_LUNS
            | op::REQUEST_SENSE
            | op::MODE_SENSE_6
            | op::MODE_SENSE_10
            | op::MODE_SELECT_6
            | op::MODE_SELECT_10
            | op::RESERVE_6
            | op::RELEASE_6
            | op::PERSISTENT_RESERVE_IN
            | op::PERSISTENT_RESERVE_OUT
            | op::MAINTENANCE_IN
            | op::PREVENT_ALLOW_MEDIUM_REMOVAL
            | op::READ_CAPACITY_10
            | op::SERVICE_ACTION_IN_16
    )
}

fn refusal(r: Result<(), Refusal>) -> Outcome {
    match r {
        Ok(()) => Outcome::Good,
        Err(Refusal::Conflict) => Outcome::Status(status::RESERVATION_CONFLICT),
        Err(Refusal::Check(c)) => c.into(),
    }
}

/// Data-In to hand back, its length, and the residual (RFC 7143 11.4.5.1):
/// Over when the CDB asked for more than the initiator expected, Under
/// when less was transferred than expected.
pub(crate) fn residual_of(t: &mut Task, good: bool, block_size: u32) -> (Option<DmaBuf>, u32, Residual) {
    let expected = u64::from(t.expected_len);
    let data_in = if good { t.buf.take() } else { None };
    t.buf = None;
    if let Some(want) = cdb::data_in_len(&t.cdb, block_size) {
        let n = u64::from(t.data_in_len).min(want).min(expected);
        let n = if data_in.is_some() { n } else { 0 };
        let residual = if want > expected {
            Residual::Over(clamp32(want - expected))
        } else if n < expected {
            Residual::Under(clamp32(expected - n))
        } else {
            Residual::None
        };
        return (data_in.filter(|_| n > 0), n as u32, residual);
    }
    let want = u64::from(cdb::data_out_len(&t.cdb, block_size));
    let residual = if want > expected {
        Residual::Over(clamp32(want - expected))
    } else if want < expected {
        Residual::Under(clamp32(expected - want))
    } else {
        Residual::None
    };
    (None, 0, residual)
}

fn clamp32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}
