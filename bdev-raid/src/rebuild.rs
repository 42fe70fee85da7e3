//! Rebuild of a raid1/raid10 member, run by the owner reactor while user IO
//! continues: window by window (`process_window_size_kb`) in array order,
//! each window holds its range in the serialization table, reads every
//! extent that has a copy on the target from a healthy copy and writes it to
//! the target. User writes overlapping the window wait for it (they are
//! ordered in the same table); user writes elsewhere go to the target too,
//! so the finished copy is exact. A window counts as in-flight IO at the
//! owner's gate, so a suspend waits for it and no window starts while the
//! array is suspended. `process_max_bandwidth_mb_sec` spaces windows out.

use crate::array::{self, RaidModule};
use crate::channel::Ras;
use crate::map::{Loc, Placement};
use crate::owner::{fenced, OwnerPart};
use crate::range_table::{words, Acquired};
use bdev::{DmaBuf, IoBox, IoDone, IoType};
use reactor::{PollStatus, PollerHandle};
use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Between windows.
    Idle,
    /// Waiting for the window's range.
    Locking,
    Reading,
    Writing,
    Stopped,
}

/// One copy operation: one extent of the current window.
#[derive(Clone, Copy)]
struct Copy {
    from: Loc,
    to: Loc,
    num_blocks: u64,
    buf_offset_blocks: u64,
}

pub(crate) struct Rebuild {
    ras: Weak<Ras>,
    weak: Weak<Rebuild>,
    pub(crate) target: usize,
    phase: Cell<Phase>,
    /// Set by `cancel` while a window runs: stop after it.
    cancelled: Cell<bool>,
    /// Next window start, in array blocks.
    offset: Cell<u64>,
    window: Cell<(u64, u64)>,
    entry: Cell<u32>,
    remaining: Cell<u32>,
    failed: Cell<bool>,
    buf: RefCell<Option<DmaBuf>>,
    window_started_ns: Cell<u64>,
    next_start_ns: Cell<u64>,
    poller: RefCell<Option<PollerHandle>>,
}

fn owner_of(ras: &Ras) -> &OwnerPart {
    ras.owner.as_ref().unwrap_or_else(|| unreachable!("rebuilds run on the owner"))
}

/// Starts a rebuild onto the first `Rebuilding` slot, if none runs (owner,
/// fenced: the first window starts after the resume).
pub(crate) fn start_next(ras: &Rc<Ras>) {
    let owner = owner_of(ras);
    if owner.rebuild.borrow().is_some() {
        return;
    }
    let target = {
        let mut ctl = ras.shared.ctl();
        let Some(t) = ctl.slots.iter().position(|s| s.role == array::Role::Rebuilding) else {
            return;
        };
        ctl.process_target = Some(t);
        t
    };
    ras.shared.rebuild_blocks.store(0, Ordering::Relaxed);
    let rb = Rc::new_cyclic(|weak| Rebuild {
        ras: Rc::downgrade(ras),
        weak: weak.clone(),
        target,
        phase: Cell::new(Phase::Idle),
        cancelled: Cell::new(false),
        offset: Cell::new(0),
        window: Cell::new((0, 0)),
        entry: Cell::new(u32::MAX),
        remaining: Cell::new(0),
        failed: Cell::new(false),
        buf: RefCell::new(None),
        window_started_ns: Cell::new(0),
        next_start_ns: Cell::new(0),
        poller: RefCell::new(None),
    });
    let r2 = rb.clone();
    *rb.poller.borrow_mut() = Some(reactor::register_poller("raid_rebuild", move || r2.poll()));
    *owner.rebuild.borrow_mut() = Some(rb);
    tracing::info!(raid = %ras.shared.name, slot = target, "rebuild started");
}

/// Stops the running rebuild (owner). Between windows it stops at once;
/// inside one (only outside fences) it stops when the window ends.
pub(crate) fn cancel(ras: &Rc<Ras>) {
    let Some(owner) = &ras.owner else { return };
    let rb = owner.rebuild.borrow().clone();
    {
        let mut ctl = ras.shared.ctl();
        ctl.process_target = None;
    }
    ras.shared.rebuild_blocks.store(0, Ordering::Relaxed);
    let Some(rb) = rb else { return };
    rb.cancelled.set(true);
    if rb.phase.get() == Phase::Idle {
        rb.stop(ras);
    }
}

impl Rebuild {
    fn rc(&self) -> Rc<Rebuild> {
        self.weak.upgrade().unwrap_or_else(|| unreachable!("used through its Rc"))
    }

    fn stop(&self, ras: &Ras) {
        self.phase.set(Phase::Stopped);
        if let Some(p) = self.poller.borrow_mut().take() {
            p.unregister();
        }
        let owner = owner_of(ras);
        let mine = owner.rebuild.borrow().as_ref().is_some_and(|r| std::ptr::eq(Rc::as_ptr(r), self));
        if mine {
            *owner.rebuild.borrow_mut() = None;
        }
    }

    fn poll(&self) -> PollStatus {
        if self.phase.get() != Phase::Idle {
            return if self.phase.get() == Phase::Stopped { PollStatus::Done } else { PollStatus::Idle };
        }
        let Some(ras) = self.ras.upgrade() else {
            return PollStatus::Done;
        };
        if self.cancelled.get() {
            self.stop(&ras);
            return PollStatus::Done;
        }
        let now = reactor::now_ns();
        if now < self.next_start_ns.get() {
            return PollStatus::Idle;
        }
        let Some(geo) = ras.geo.borrow().clone() else {
            return PollStatus::Idle;
        };
        if self.offset.get() >= geo.array_blocks() {
            self.finish(&ras);
            return PollStatus::Busy;
        }
        if !ras.gate.borrow_mut().try_enter() {
            return PollStatus::Idle;
        }
        let bs = ras.block_size.get();
        let opts = RaidModule::get().options();
        let max_blocks = (DmaBuf::MAX_LEN as u64 / bs).max(1);
        let window_blocks = (opts.process_window_size_kb as u64 * 1024 / bs).clamp(1, max_blocks);
        let start = self.offset.get();
        let end = (start + window_blocks).min(geo.array_blocks());
        self.window.set((start, end));
        self.window_started_ns.set(now);
        self.phase.set(Phase::Locking);
        let r = owner_of(&ras).table.borrow_mut().acquire(start, end, words::REBUILD_WAITER);
        match r {
            Acquired::Granted(e) => self.on_granted(e),
            Acquired::Waiting(e) => self.entry.set(e),
        }
        PollStatus::Busy
    }

    /// The window's range is ours: no user write overlaps it now.
    pub(crate) fn on_granted(&self, entry: u32) {
        self.entry.set(entry);
        self.start_reads();
    }

    /// The copies of the current window, from a healthy copy to the target.
    fn plan(&self, ras: &Ras, mut f: impl FnMut(Copy)) -> bool {
        let geo_ref = ras.geo.borrow();
        let Some(geo) = geo_ref.as_deref() else {
            return false;
        };
        let members = ras.members.borrow();
        let failed = ras.shared.failed_mask.load(Ordering::Acquire);
        let active = |m: usize| {
            members.get(m).is_some_and(|mc| mc.role == array::Role::Active && mc.ch.is_some()) && failed & (1 << m) == 0
        };
        let (start, end) = self.window.get();
        for e in geo.extents(start, end - start) {
            let Some(to) = e.placement.on_member(self.target) else {
                continue;
            };
            let from = match e.placement {
                Placement::Mirror(o) => (0..members.len())
                    .filter(|&m| m != self.target && active(m))
                    .min_by_key(|&m| members[m].outstanding.get())
                    .map(|m| Loc { member: m as u16, offset_blocks: o }),
                Placement::Pair(p) => {
                    p.into_iter().find(|l| l.member as usize != self.target && active(l.member as usize))
                }
                Placement::Single(_) => None,
            };
            let Some(from) = from else { return false };
            f(Copy { from, to, num_blocks: e.num_blocks, buf_offset_blocks: e.array_offset_blocks - start });
        }
        true
    }

    fn start_reads(&self) {
        let Some(ras) = self.ras.upgrade() else {
            return;
        };
        if self.cancelled.get() {
            return self.end_window(&ras, false);
        }
        let mut count = 0u32;
        if !self.plan(&ras, |_| count += 1) {
            tracing::error!(raid = %ras.shared.name, "rebuild has no healthy source copy: stopping");
            return self.end_window(&ras, false);
        }
        if count == 0 {
            return self.end_window(&ras, true);
        }
        if (IoBox::available() as u64) < count as u64 {
            // Out of descriptors: give the window back and retry shortly.
            self.next_start_ns.set(reactor::now_ns() + 1_000_000);
            return self.release_window(&ras);
        }
        let bs = ras.block_size.get();
        let (start, end) = self.window.get();
        let len = ((end - start) * bs) as usize;
        if self.buf.borrow().as_ref().is_none_or(|b| b.len() < len) {
            // Once per rebuild (or when the window grows): not per IO.
            *self.buf.borrow_mut() = DmaBuf::alloc(len);
        }
        let Some(buf) = self.buf.borrow().clone() else {
            self.next_start_ns.set(reactor::now_ns() + 1_000_000);
            return self.release_window(&ras);
        };
        self.phase.set(Phase::Reading);
        self.failed.set(false);
        self.remaining.set(count);
        let members = ras.members.borrow();
        self.plan(&ras, |c| {
            let b = buf.slice((c.buf_offset_blocks * bs) as usize, (c.num_blocks * bs) as usize);
            self.submit(&members, IoType::Read, c.from, c.num_blocks, b);
        });
    }

    fn start_writes(&self, ras: &Ras) {
        let Some(buf) = self.buf.borrow().clone() else {
            return self.end_window(ras, false);
        };
        let mut copies = 0u32;
        if !self.plan(ras, |_| copies += 1) || (IoBox::available() as u64) < copies as u64 {
            return self.end_window(ras, false);
        }
        let bs = ras.block_size.get();
        self.phase.set(Phase::Writing);
        self.failed.set(false);
        self.remaining.set(copies);
        let members = ras.members.borrow();
        self.plan(ras, |c| {
            let b = buf.slice((c.buf_offset_blocks * bs) as usize, (c.num_blocks * bs) as usize);
            self.submit(&members, IoType::Write, c.to, c.num_blocks, b);
        });
    }

    fn submit(&self, members: &[crate::channel::MemberCh], t: IoType, l: Loc, num_blocks: u64, buf: DmaBuf) {
        let mc = &members[l.member as usize];
        let io = mc.ch.as_ref().and_then(|ch| {
            IoBox::data(t, l.offset_blocks + mc.data_offset_blocks, num_blocks, Some(buf)).map(|io| (ch, io))
        });
        match io {
            Some((ch, mut io)) => {
                io.tag2 = l.member as u64;
                io.set_done(self.rc());
                ch.submit(io);
            }
            None => {
                // Counted as available a moment ago; account it as failed.
                self.failed.set(true);
                self.remaining.set(self.remaining.get().saturating_sub(1));
            }
        }
    }

    /// Gives the window's range and gate slot back without progress.
    fn release_window(&self, ras: &Ras) {
        let entry = self.entry.replace(u32::MAX);
        if entry != u32::MAX {
            owner_of(ras).release(ras, entry);
        }
        self.phase.set(Phase::Idle);
        ras.exit_gate();
    }

    /// Ends the current window: `ok` advances past it, otherwise the rebuild stops.
    fn end_window(&self, ras: &Ras, ok: bool) {
        let (start, end) = self.window.get();
        self.release_window(ras);
        if !ok {
            tracing::warn!(raid = %ras.shared.name, offset = start, "rebuild stopped");
            ras.shared.ctl().process_target = None;
            return self.stop(ras);
        }
        self.offset.set(end);
        ras.shared.rebuild_blocks.store(end, Ordering::Relaxed);
        let bw_mib = RaidModule::get().options().process_max_bandwidth_mb_sec as u64;
        if bw_mib > 0 {
            let bytes = (end - start) * ras.block_size.get();
            let ns = bytes as u128 * 1_000_000_000 / (bw_mib as u128 * 1024 * 1024);
            self.next_start_ns.set(self.window_started_ns.get() + ns as u64);
        }
        if self.cancelled.get() {
            self.stop(ras);
        }
    }

    /// Every window copied: make the target active under a fence.
    fn finish(&self, ras: &Rc<Ras>) {
        self.stop(ras);
        let target = self.target;
        fenced(
            ras,
            Box::new(move |ras, fence| {
                let Ok(fence) = fence else { return };
                array::rebuild_finished(ras, target);
                ras.shared.rebuild_blocks.store(0, Ordering::Relaxed);
                start_next(ras);
                fence.done();
            }),
        );
    }
}

impl IoDone for Rebuild {
    fn io_done(&self, io: IoBox) {
        let Some(ras) = self.ras.upgrade() else {
            return;
        };
        if !io.status.is_ok() {
            // A failed source or target is latched failed like any member;
            // the owner then updates the membership.
            ras.latch_failed((io.tag2 & 0xff) as usize);
            self.failed.set(true);
        }
        drop(io);
        let left = self.remaining.get().saturating_sub(1);
        self.remaining.set(left);
        if left > 0 {
            return;
        }
        match (self.phase.get(), self.failed.get()) {
            // A source failed: read again from the copies still healthy.
            (Phase::Reading, true) => self.start_reads_again(&ras),
            (Phase::Reading, false) => self.start_writes(&ras),
            (Phase::Writing, failed) => self.end_window(&ras, !failed),
            _ => {}
        }
    }
}

impl Rebuild {
    fn start_reads_again(&self, ras: &Ras) {
        if self.cancelled.get() || ras.shared.failed_mask.load(Ordering::Acquire) & (1 << self.target) != 0 {
            return self.end_window(ras, false);
        }
        self.phase.set(Phase::Locking);
        self.start_reads();
    }
}
