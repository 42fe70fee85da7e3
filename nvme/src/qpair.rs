//! One IO queue pair per (controller, reactor): the NVMe bdev channel's
//! engine. Submission writes SQEs and rings the SQ tail doorbell once per
//! batch; a reactor poller reaps completions by phase tag, rings the CQ head
//! doorbell, and refills the queue. Bdev IOs larger than a command allows
//! (MDTS, PRP list room, 16-bit NLB) are split into child commands; IOs that
//! find no free command slot wait in a bounded FIFO. Commands that time out
//! are aborted, then the controller is reset; their IO is retried.
//!
//! A queue pair is made at once on its reactor, and its controller queues
//! are asked of the home reactor by message (`Controller::request_io_queue`);
//! IO submitted meanwhile waits in the FIFO, and goes out when the answer
//! (`queue_created`) arrives. The queue pair lives until its controller is
//! detached, so its ring memory outlasts every queue made over it.
//!
//! Every table here is sized when the queue pair is created: the hot path
//! allocates nothing and takes no lock. A DmaBuf stays inside its IoBox,
//! parked here, until the controller has completed every command that
//! points at it or has been disabled (invariant 5, docs/architecture.md).

use crate::ctrlr::{io_error, Controller, CtrlrState, PRP_LIST_PAGES};
use crate::mmio::DeviceMem;
use crate::prp;
use bdev::{DmaBuf, IoBox, IoError, IoStatus, IoType};
use nvme_spec::cmd::Psdt;
use nvme_spec::regs::doorbell_offset;
use nvme_spec::status::sct;
use nvme_spec::{IoOpcode, Sqe, Status, U32, U64};
use reactor::{PollStatus, PollerHandle};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const LIST_BYTES: usize = PRP_LIST_PAGES * prp::PAGE_SIZE as usize;
/// How often in-flight commands are checked for timeouts.
const TIMEOUT_SCAN_NS: u64 = 1_000_000;
const NO_PARENT: u32 = u32::MAX;
/// Force Unit Access in CDW12 of Read, Write and Write Zeroes: the command
/// completes only once its data is on non-volatile media.
const CDW12_FUA: u32 = 1 << 30;

/// A piece of a bdev IO that one command carries.
#[derive(Clone, Copy, Debug)]
struct Child {
    parent: u32,
    rel_block: u64,
    blocks: u64,
}

#[derive(Clone, Copy)]
struct Tracker {
    child: Child,
    active: bool,
    submit_ns: u64,
    abort_sent: bool,
}

/// A bdev IO parked while its commands run.
struct Parent {
    io: IoBox,
    nsid: u32,
    block_size: u32,
    max_blocks: u64,
    /// Blocks (commands, for flush) issued so far, relative to the IO start.
    next_rel: u64,
    total: u64,
    outstanding: u32,
    error: Option<IoError>,
    retries: u8,
    /// The reset epoch that last counted a retry of this IO.
    epoch: u32,
    in_pending: bool,
}

struct QState {
    sq_tail: u16,
    cq_head: u16,
    phase: bool,
    trackers: Vec<Tracker>,
    free: Vec<u16>,
    parents: Vec<Option<Parent>>,
    free_parents: Vec<u32>,
    pending: VecDeque<u32>,
    retry: VecDeque<Child>,
    quiesced: bool,
    /// The queue exists on the controller.
    created: bool,
    /// The controller queues could not be made: IO fails.
    failed: bool,
    last_scan_ns: u64,
    submitted_since_doorbell: bool,
    /// Resets seen; an IO counts one retry per reset however many of its
    /// pieces were in flight.
    epoch: u32,
}

/// Per-reactor table of this reactor's queue pairs (one per controller),
/// kept until the controller is detached.
#[derive(Default)]
struct LocalQpairs(RefCell<Vec<(u64, Rc<QPair>)>>);

pub(crate) struct QPair {
    ctrlr: Arc<Controller>,
    /// 0 until the home reactor has given one.
    qid: Cell<u16>,
    depth: u16,
    use_sgl: bool,
    /// SGL addresses and lengths must be dword multiples (SGLS 10b).
    sgl_dword_granular: bool,
    sq_buf: DmaBuf,
    cq_buf: DmaBuf,
    lists_buf: DmaBuf,
    sq: DeviceMem,
    cq: DeviceMem,
    lists: DeviceMem,
    sq_doorbell: Cell<u32>,
    cq_doorbell: Cell<u32>,
    st: RefCell<QState>,
    poller: RefCell<Option<PollerHandle>>,
    /// The home reactor was asked for queues over this memory.
    requested: Cell<bool>,
    /// Interrupt mode: the eventfd the controller signals for this queue's
    /// completions (its MSI-X vector); the reactor sleeps on it.
    irq: Option<Arc<reactor::EventFd>>,
    /// The poller asked the reactor to wake for its timeouts (commands in
    /// flight).
    ticking: Cell<bool>,
}

/// Runs `f` on each live queue pair of `ctrlr` on the current reactor.
pub(crate) fn for_each_local(ctrlr: &Arc<Controller>, f: impl Fn(&QPair)) {
    let table = reactor::local::<LocalQpairs>();
    let qps: Vec<Rc<QPair>> =
        table.0.borrow().iter().filter(|(id, _)| *id == ctrlr.id).map(|(_, q)| q.clone()).collect();
    for q in qps {
        f(&q);
    }
}

/// The home reactor's answer to this reactor's request for queues: the
/// queue id, or None when the queues could not be made.
pub(crate) fn queue_created(ctrlr: &Arc<Controller>, qid: Option<u16>) {
    for_each_local(ctrlr, |q| q.created(qid));
}

/// Detach, last step: the controller has stopped DMA (or cannot be made
/// to); this reactor's queue pair goes once no channel holds it.
pub(crate) fn drop_local(ctrlr: &Arc<Controller>) {
    let table = reactor::local::<LocalQpairs>();
    let gone: Vec<(u64, Rc<QPair>)> = {
        let mut t = table.0.borrow_mut();
        let (gone, kept) = std::mem::take(&mut *t).into_iter().partition(|(id, _)| *id == ctrlr.id);
        *t = kept;
        gone
    };
    drop(gone);
}

/// This reactor's queue pair for `ctrlr`, created (with its controller
/// queues) on first use.
pub(crate) fn get_or_create(ctrlr: &Arc<Controller>) -> Result<Rc<QPair>, crate::NvmeError> {
    let table = reactor::local::<LocalQpairs>();
    if let Some(q) = table.0.borrow().iter().find(|(id, _)| *id == ctrlr.id).map(|(_, q)| q.clone()) {
        return Ok(q);
    }
    let q = QPair::create(ctrlr)?;
    table.0.borrow_mut().push((ctrlr.id, q.clone()));
    q.requested.set(true);
    ctrlr.request_io_queue(q.sq.iova(), q.cq.iova(), q.irq.clone());
    Ok(q)
}

impl QPair {
    fn create(ctrlr: &Arc<Controller>) -> Result<Rc<QPair>, crate::NvmeError> {
        let name = ctrlr.name().to_string();
        match ctrlr.state() {
            CtrlrState::Enabled | CtrlrState::Resetting => {}
            CtrlrState::Failed => return Err(crate::NvmeError::State(name, "failed")),
            CtrlrState::Detached => return Err(crate::NvmeError::State(name, "detached")),
        }
        if ctrlr.is_detaching() {
            return Err(crate::NvmeError::State(name, "being detached"));
        }
        let depth = ctrlr.io_depth;
        let bufs = (
            DmaBuf::zeroed(depth as usize * 64),
            DmaBuf::zeroed(depth as usize * 16),
            DmaBuf::zeroed(depth as usize * LIST_BYTES),
        );
        let (Some(sq_buf), Some(cq_buf), Some(lists_buf)) = bufs else {
            return Err(crate::NvmeError::NoMemory(format!("{name}: IO queue memory")));
        };
        let irq = if ctrlr.uses_interrupts() {
            let fd = reactor::EventFd::new()
                .map_err(|e| crate::NvmeError::Unsupported(format!("{name}: interrupt mode: eventfd: {e}")))?;
            Some(Arc::new(fd))
        } else {
            None
        };
        let trackers = depth as usize - 1;
        let max_parents = trackers * 4;
        let q = Rc::new(QPair {
            ctrlr: ctrlr.clone(),
            qid: Cell::new(0),
            depth,
            use_sgl: ctrlr.uses_sgl(),
            sgl_dword_granular: ctrlr.data().sgls & 0b11 == nvme_spec::identify::sgls::SUPPORTED_DWORD_ALIGNED,
            sq: DeviceMem::of(&sq_buf),
            cq: DeviceMem::of(&cq_buf),
            lists: DeviceMem::of(&lists_buf),
            sq_buf,
            cq_buf,
            lists_buf,
            sq_doorbell: Cell::new(0),
            cq_doorbell: Cell::new(0),
            st: RefCell::new(QState {
                sq_tail: 0,
                cq_head: 0,
                phase: true,
                trackers: vec![
                    Tracker {
                        child: Child { parent: NO_PARENT, rel_block: 0, blocks: 0 },
                        active: false,
                        submit_ns: 0,
                        abort_sent: false
                    };
                    trackers
                ],
                free: (0..trackers as u16).rev().collect(),
                parents: (0..max_parents).map(|_| None).collect(),
                free_parents: (0..max_parents as u32).rev().collect(),
                pending: VecDeque::with_capacity(max_parents),
                retry: VecDeque::with_capacity(trackers),
                quiesced: false,
                created: false,
                failed: false,
                last_scan_ns: 0,
                submitted_since_doorbell: false,
                epoch: 0,
            }),
            poller: RefCell::new(None),
            requested: Cell::new(false),
            irq: irq.clone(),
            ticking: Cell::new(false),
        });
        let weak = Rc::downgrade(&q);
        let poll = move || match weak.upgrade() {
            Some(q) => q.poll(),
            None => PollStatus::Done,
        };
        let handle = match irq {
            Some(irq) => reactor::register_interrupt_poller("nvme_qpair", irq, poll),
            None => reactor::register_poller("nvme_qpair", poll),
        };
        *q.poller.borrow_mut() = Some(handle);
        Ok(q)
    }

    /// The home reactor's answer: the queues exist (IO waiting goes out),
    /// or they could not be made (IO fails).
    fn created(&self, qid: Option<u16>) {
        let mut st = self.st.borrow_mut();
        match qid {
            Some(qid) => {
                self.set_qid(qid);
                st.created = true;
                tracing::debug!(ctrlr = %self.ctrlr.name(), qid, depth = self.depth, reactor = ?reactor::current(), "IO queue pair created");
                self.issue(&mut st);
            }
            None => {
                st.failed = true;
                self.fail_all(&mut st, IoError::NoDevice);
            }
        }
    }

    fn set_qid(&self, qid: u16) {
        let dstrd = self.ctrlr.dstrd();
        self.qid.set(qid);
        self.sq_doorbell.set(doorbell_offset(qid, false, dstrd) as u32);
        self.cq_doorbell.set(doorbell_offset(qid, true, dstrd) as u32);
    }

    /// Takes a bdev IO (completes it exactly once, later).
    pub(crate) fn submit(&self, io: IoBox, nsid: u32, block_size: u32, max_io_blocks: u32) {
        match self.ctrlr.state() {
            CtrlrState::Failed | CtrlrState::Detached => return io.fail(IoError::NoDevice),
            CtrlrState::Enabled | CtrlrState::Resetting => {}
        }
        let total = match io.io_type {
            IoType::Flush => 1,
            IoType::Reset => return io.fail(IoError::NotSupported),
            _ => io.num_blocks,
        };
        if total == 0 {
            return io.complete(IoStatus::Success);
        }
        if io.io_type.has_data() {
            let need = io.num_blocks.saturating_mul(block_size as u64);
            if io.buf.as_ref().is_none_or(|b| (b.len() as u64) < need || b.iova() % 4 != 0) {
                return io.fail(IoError::OutOfRange);
            }
        }
        let max_blocks = match io.io_type {
            IoType::Read | IoType::Write => max_io_blocks as u64,
            IoType::WriteZeroes => 65_536,
            IoType::Unmap => u32::MAX as u64,
            _ => 1,
        };
        let mut st = self.st.borrow_mut();
        if st.failed {
            drop(st);
            return io.fail(IoError::NoDevice);
        }
        let Some(slot) = st.free_parents.pop() else {
            drop(st);
            return io.fail(IoError::NoMemory);
        };
        st.parents[slot as usize] = Some(Parent {
            io,
            nsid,
            block_size,
            max_blocks,
            next_rel: 0,
            total,
            outstanding: 0,
            error: None,
            retries: 0,
            epoch: st.epoch,
            in_pending: true,
        });
        st.pending.push_back(slot);
        self.issue(&mut st);
    }

    /// Moves queued work into free command slots, then rings the doorbell.
    fn issue(&self, st: &mut QState) {
        if st.quiesced || !st.created {
            return;
        }
        let now = reactor::now_ns();
        while !st.free.is_empty() {
            let child = if let Some(c) = st.retry.pop_front() {
                c
            } else if let Some(&slot) = st.pending.front() {
                let Some(p) = st.parents[slot as usize].as_mut() else {
                    st.pending.pop_front();
                    continue;
                };
                if p.next_rel >= p.total || p.error.is_some() {
                    p.in_pending = false;
                    st.pending.pop_front();
                    continue;
                }
                let blocks = (p.total - p.next_rel).min(p.max_blocks);
                let c = Child { parent: slot, rel_block: p.next_rel, blocks };
                p.next_rel += blocks;
                p.outstanding += 1;
                if p.next_rel >= p.total {
                    p.in_pending = false;
                    st.pending.pop_front();
                }
                c
            } else {
                break;
            };
            // A retried piece of an IO that already failed elsewhere is done.
            if st.parents[child.parent as usize].as_ref().is_none_or(|p| p.error.is_some()) {
                self.finish_child(st, child, None);
                continue;
            }
            let Some(cid) = st.free.pop() else { break };
            match self.build(st, cid, child) {
                Ok(sqe) => {
                    self.sq.write_sqe(st.sq_tail as usize, &sqe);
                    st.sq_tail = (st.sq_tail + 1) % self.depth;
                    st.submitted_since_doorbell = true;
                    st.trackers[cid as usize] = Tracker { child, active: true, submit_ns: now, abort_sent: false };
                }
                Err(e) => {
                    st.free.push(cid);
                    self.finish_child(st, child, Some(e));
                }
            }
        }
        if st.submitted_since_doorbell {
            st.submitted_since_doorbell = false;
            std::sync::atomic::fence(Ordering::Release);
            self.ctrlr.regs.write32(self.sq_doorbell.get(), st.sq_tail as u32);
        }
    }

    /// The command for `child` in slot `cid` (its PRP list / DSM range goes
    /// to the slot's own list pages).
    fn build(&self, st: &QState, cid: u16, child: Child) -> Result<Sqe, IoError> {
        let p = st.parents[child.parent as usize].as_ref().ok_or(IoError::Aborted)?;
        let slba = p.io.offset_blocks + child.rel_block;
        let list_off = cid as usize * LIST_BYTES;
        let list_iova = self.lists.iova() + list_off as u64;
        let mut sqe;
        match p.io.io_type {
            IoType::Read | IoType::Write => {
                let op = if p.io.io_type == IoType::Read { IoOpcode::READ } else { IoOpcode::WRITE };
                sqe = Sqe::new(op.0, cid);
                sqe.set_slba(slba);
                sqe.set_nlb(child.blocks as u32);
                let bs = p.block_size as u64;
                let buf = p.io.buf.as_ref().ok_or(IoError::OutOfRange)?;
                let addr = buf.iova() + child.rel_block * bs;
                let len = child.blocks * bs;
                if self.use_sgl {
                    // One buffer, so one data block; the list form is there
                    // for data in pieces.
                    let sgl = prp::build_sgl(
                        &[(addr, len as u32)],
                        list_iova,
                        PRP_LIST_PAGES,
                        self.sgl_dword_granular,
                        |off, v| self.lists.write_u64(list_off + off, v),
                    )
                    .map_err(|_| IoError::OutOfRange)?;
                    sqe.set_psdt(Psdt::SglMetadataBuffer);
                    sqe.set_sgl1(sgl);
                } else {
                    let (p1, p2) = prp::build(addr, len, list_iova, PRP_LIST_PAGES, |off, v| {
                        self.lists.write_u64(list_off + off, v)
                    })
                    .map_err(|_| IoError::OutOfRange)?;
                    sqe.dptr.prp1 = U64::new(p1);
                    sqe.dptr.prp2 = U64::new(p2);
                }
            }
            IoType::WriteZeroes => {
                sqe = Sqe::new(IoOpcode::WRITE_ZEROES.0, cid);
                sqe.set_slba(slba);
                sqe.set_nlb(child.blocks as u32);
            }
            IoType::Unmap => {
                sqe = Sqe::new(IoOpcode::DATASET_MANAGEMENT.0, cid);
                // One range: context attributes 0, length, starting LBA.
                self.lists.write_u64(list_off, (child.blocks as u32 as u64) << 32);
                self.lists.write_u64(list_off + 8, slba);
                sqe.dptr.prp1 = U64::new(list_iova);
                sqe.cdw10 = U32::new(0);
                sqe.cdw11 = U32::new(1 << 2);
            }
            // Flush of this namespace: everything completed before it
            // reaches media. (NSID FFFFFFFFh is for all namespaces and not
            // every controller takes it.)
            IoType::Flush => sqe = Sqe::new(IoOpcode::FLUSH.0, cid),
            IoType::Reset => return Err(IoError::NotSupported),
        }
        // Every piece of a split IO carries the flag: each is durable before
        // the IO completes. DPO has no NVMe bit (bit 29 is PRACT, which would
        // change protection information handling): a retention hint, dropped.
        if p.io.flags.fua() && matches!(p.io.io_type, IoType::Read | IoType::Write | IoType::WriteZeroes) {
            sqe.cdw12 = U32::new(sqe.cdw12.get() | CDW12_FUA);
        }
        sqe.nsid = U32::new(p.nsid);
        Ok(sqe)
    }

    /// One piece finished (or was dropped with `err`); completes the bdev
    /// IO when nothing of it is outstanding or left to issue.
    fn finish_child(&self, st: &mut QState, child: Child, err: Option<IoError>) {
        let slot = child.parent as usize;
        let Some(p) = st.parents.get_mut(slot).and_then(|p| p.as_mut()) else {
            return;
        };
        p.outstanding = p.outstanding.saturating_sub(1);
        if let Some(e) = err {
            p.error.get_or_insert(e);
            if p.in_pending {
                p.in_pending = false;
                st.pending.retain(|&s| s as usize != slot);
            }
        }
        // A child waiting in the retry queue still counts as outstanding.
        let done = p.outstanding == 0 && (p.next_rel >= p.total || p.error.is_some()) && !p.in_pending;
        if done {
            if let Some(p) = st.parents[slot].take() {
                st.free_parents.push(slot as u32);
                p.io.complete(match p.error {
                    None => IoStatus::Success,
                    Some(e) => IoStatus::Failed(e),
                });
            }
        }
    }

    /// Puts `child` back for another attempt, or fails it when its IO has
    /// been retried enough.
    fn retry_child(&self, st: &mut QState, child: Child, final_error: IoError) {
        let limit = self.ctrlr.opts.retry_count;
        match st.parents.get_mut(child.parent as usize).and_then(|p| p.as_mut()) {
            Some(p) if p.retries < limit && p.error.is_none() => {
                p.retries += 1;
                self.ctrlr.stats.retries.fetch_add(1, Ordering::Relaxed);
                st.retry.push_back(child);
            }
            _ => self.finish_child(st, child, Some(final_error)),
        }
    }

    fn poll(&self) -> PollStatus {
        let mut st = self.st.borrow_mut();
        if st.quiesced || !st.created {
            return PollStatus::Idle;
        }
        let mut reaped = 0usize;
        while reaped < self.depth as usize {
            let Some(cqe) = self.cq.read_cqe_if_phase(st.cq_head as usize, st.phase) else {
                break;
            };
            st.cq_head += 1;
            if st.cq_head == self.depth {
                st.cq_head = 0;
                st.phase = !st.phase;
            }
            reaped += 1;
            let cid = cqe.cid.get() as usize;
            let Some(t) = st.trackers.get(cid).copied().filter(|t| t.active) else {
                self.ctrlr.stats.spurious_completions.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(ctrlr = %self.ctrlr.name(), qid = self.qid.get(), cid, "completion for no outstanding command");
                continue;
            };
            st.trackers[cid].active = false;
            st.free.push(cid as u16);
            let status = cqe.status();
            if status.is_success() {
                self.finish_child(&mut st, t.child, None);
            } else if retryable(status) {
                self.retry_child(&mut st, t.child, io_error(status));
            } else {
                self.finish_child(&mut st, t.child, Some(io_error(status)));
            }
        }
        if reaped > 0 {
            self.ctrlr.regs.write32(self.cq_doorbell.get(), st.cq_head as u32);
        }
        if !st.retry.is_empty() || !st.pending.is_empty() {
            self.issue(&mut st);
        }
        let timed_out = self.scan_timeouts(&mut st);
        // Interrupt mode: while commands that may time out are in flight the
        // reactor wakes twice per timeout, so the scan above runs (an abort
        // goes out at most half a timeout late); otherwise it sleeps until
        // this queue's interrupt.
        let tick = self.irq.is_some() && self.ctrlr.opts.io_timeout_us > 0 && st.free.len() != st.trackers.len();
        if tick != self.ticking.get() {
            self.ticking.set(tick);
            let half_timeout_ns = (self.ctrlr.opts.io_timeout_us.saturating_mul(1000) / 2).max(TIMEOUT_SCAN_NS);
            if let Some(p) = self.poller.borrow().as_ref() {
                p.set_wake_within(tick.then(|| std::time::Duration::from_nanos(half_timeout_ns)));
            }
        }
        drop(st);
        if timed_out {
            self.ctrlr.request_reset("IO command timeout after abort");
        }
        if reaped > 0 {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    /// Aborts commands older than the IO timeout; true when one is older
    /// than twice the timeout (the abort did not help: reset).
    fn scan_timeouts(&self, st: &mut QState) -> bool {
        let timeout_ns = self.ctrlr.opts.io_timeout_us.saturating_mul(1000);
        if timeout_ns == 0 || st.free.len() == st.trackers.len() {
            return false;
        }
        let now = reactor::now_ns();
        if now.saturating_sub(st.last_scan_ns) < TIMEOUT_SCAN_NS.min(timeout_ns) {
            return false;
        }
        st.last_scan_ns = now;
        let mut reset = false;
        for cid in 0..st.trackers.len() {
            let t = st.trackers[cid];
            if !t.active {
                continue;
            }
            let age = now.saturating_sub(t.submit_ns);
            if age > timeout_ns && !t.abort_sent && self.ctrlr.try_abort(self.qid.get(), cid as u16) {
                st.trackers[cid].abort_sent = true;
                self.ctrlr.stats.io_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(ctrlr = %self.ctrlr.name(), qid = self.qid.get(), cid, age_us = age / 1000, "IO timed out; abort sent");
            }
            if age > 2 * timeout_ns {
                reset = true;
            }
        }
        reset
    }

    /// Reset, step 1: stop touching the rings.
    pub(crate) fn quiesce(&self) {
        self.st.borrow_mut().quiesced = true;
    }

    /// Reset, last step: the controller was disabled (no DMA). In-flight
    /// commands go back to the retry queue (or fail), the rings restart,
    /// and IO goes out again when the home reactor recreated this reactor's
    /// queues (`mine`: its queue id and whether that worked; None when the
    /// request for queues is still on its way, answered later). `ok`: the
    /// controller came back.
    pub(crate) fn after_reset(&self, ok: bool, mine: Option<(u16, bool)>) {
        let mut st = self.st.borrow_mut();
        st.created = false;
        st.epoch = st.epoch.wrapping_add(1);
        let (epoch, limit) = (st.epoch, self.ctrlr.opts.retry_count);
        for cid in 0..st.trackers.len() {
            if !st.trackers[cid].active {
                continue;
            }
            st.trackers[cid].active = false;
            st.free.push(cid as u16);
            let child = st.trackers[cid].child;
            let retry = ok
                && match st.parents.get_mut(child.parent as usize).and_then(|p| p.as_mut()) {
                    Some(p) if p.error.is_none() => {
                        if p.epoch != epoch {
                            p.epoch = epoch;
                            p.retries += 1;
                            self.ctrlr.stats.retries.fetch_add(1, Ordering::Relaxed);
                        }
                        p.retries <= limit
                    }
                    _ => false,
                };
            if retry {
                st.retry.push_back(child);
            } else {
                self.finish_child(&mut st, child, Some(IoError::Aborted));
            }
        }
        st.sq_tail = 0;
        st.cq_head = 0;
        st.phase = true;
        self.cq.zero();
        st.quiesced = false;
        match (ok, mine) {
            (true, Some((qid, true))) => {
                self.set_qid(qid);
                st.created = true;
                self.issue(&mut st);
            }
            (true, None) => {}
            (true, Some((_, false))) => {
                st.failed = true;
                self.fail_all(&mut st, IoError::NoDevice);
            }
            (false, _) => {
                st.failed = true;
                self.fail_all(&mut st, IoError::Aborted);
            }
        }
    }

    /// The device is gone: every IO in flight or queued fails with
    /// `NoDevice` (nothing can write its buffer any more), and so does every
    /// later one. The rings are not touched again.
    pub(crate) fn device_gone(&self) {
        let mut st = self.st.borrow_mut();
        st.failed = true;
        st.created = false;
        self.end_all(&mut st, IoError::NoDevice);
    }

    /// Ends every IO, the commands in flight included (the controller no
    /// longer writes host memory).
    fn end_all(&self, st: &mut QState, err: IoError) {
        for cid in 0..st.trackers.len() {
            if st.trackers[cid].active {
                st.trackers[cid].active = false;
                st.free.push(cid as u16);
                let child = st.trackers[cid].child;
                self.finish_child(st, child, Some(err));
            }
        }
        while let Some(c) = st.retry.pop_front() {
            self.finish_child(st, c, Some(err));
        }
        self.fail_all(st, err);
    }

    fn fail_all(&self, st: &mut QState, err: IoError) {
        while let Some(c) = st.retry.pop_front() {
            self.finish_child(st, c, Some(err));
        }
        for slot in 0..st.parents.len() {
            if let Some(p) = st.parents[slot].as_mut() {
                p.error.get_or_insert(err);
                p.in_pending = false;
                if p.outstanding == 0 {
                    let p = st.parents[slot].take();
                    st.free_parents.push(slot as u32);
                    if let Some(p) = p {
                        p.io.fail(err);
                    }
                }
            }
        }
        st.pending.clear();
    }
}

/// Statuses worth another attempt: our own abort, and transient ones
/// without Do Not Retry.
fn retryable(s: Status) -> bool {
    if s.sct != sct::GENERIC {
        return false;
    }
    s.sc == Status::ABORT_REQUESTED.sc
        || (!s.dnr
            && (s.sc == Status::NAMESPACE_NOT_READY.sc
                || s.sc == Status::COMMAND_INTERRUPTED.sc
                || s.sc == Status::TRANSIENT_TRANSPORT_ERROR.sc))
}

impl Drop for QPair {
    fn drop(&mut self) {
        if let Some(p) = self.poller.borrow_mut().take() {
            p.unregister();
        }
        // Detach deleted the queues and stopped the controller before the
        // last reference went. Anything else (a reactor set torn down with
        // the controller attached) may leave the controller holding these
        // addresses: then nothing is released.
        if !self.requested.get() || self.ctrlr.dma_stopped() {
            let mut st = self.st.borrow_mut();
            self.end_all(&mut st, IoError::Aborted);
            return;
        }
        let bytes = self.sq_buf.len() + self.cq_buf.len() + self.lists_buf.len();
        tracing::error!(ctrlr = %self.ctrlr.name(), qid = self.qid.get(), bytes, "IO queue memory leaked: the controller may still use it");
        self.ctrlr.stats.leaked_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        std::mem::forget(self.sq_buf.clone());
        std::mem::forget(self.cq_buf.clone());
        std::mem::forget(self.lists_buf.clone());
        for p in self.st.get_mut().parents.iter_mut().filter_map(|p| p.take()) {
            if let Some(b) = p.io.buf.as_ref() {
                std::mem::forget(b.clone());
            }
            p.io.fail(IoError::Aborted);
        }
    }
}
