//! Rebuild, resync and scrub of the members of a redundant array, run by
//! the owner reactor while user IO continues: window by window
//! (`process_window_size_kb`) in array order over the ranges to repair (the
//! whole array, or the bitmap's dirty chunks), each window holds its range
//! in the serialization table and runs the level's plan for it
//! (`RaidLevel::plan_window`): read each extent from a healthy copy, write
//! it to the copies being repaired (a rebuilding member; after an unclean
//! shutdown, every other copy), or compare them (scrub). User writes
//! overlapping the window wait for it (they are
//! ordered in the same table); user writes elsewhere go to the target too,
//! so the finished copy is exact. A window counts as in-flight IO at the
//! owner's gate, so a suspend waits for it and no window starts while the
//! array is suspended. `process_max_bandwidth_mb_sec` spaces windows out.
//!
//! With a bitmap that knows which chunks were written (md's llbitmap
//! states, `bitmap::Bitmap::tracks_written`), chunks never written since
//! the array was created are skipped: a rebuild or resync copies, and a
//! check compares, only written chunks (a parity level: their stripes; a
//! never-written chunk reads as zeros whatever its members hold:
//! `level::stripe`, and for the mirrors `level::raid1`). And a
//! parity level's chunks whose first write was partial, or that were
//! dirty at assembly, "need sync": their parity is right only in the rows
//! written since. When nothing else runs and every member is active, a
//! sync pass computes the parity of their stripes from the data (the
//! resync's plan) and marks them synced (`Bitmap::mark_synced`), after
//! which writes there may update parity in place. It starts when a bitmap
//! batch leaves such chunks (`watch_needs_sync`) and at assembly, gives
//! way to a check, and ends without a fence (it changes no membership).

use crate::array::{self, RaidModule};
use crate::channel::ArrayChannel;
use crate::map::Loc;
use crate::owner::{fenced, OwnerPart};
use crate::range_table::{words, Acquired};
use bdev::{BdevError, DmaBuf, IoBox, IoDone, IoType};
use reactor::{PollStatus, PollerHandle};
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;

type CheckDone = Box<dyn FnOnce(Result<Value, BdevError>)>;

/// A scrub's counts and its caller.
struct CheckState {
    repair: bool,
    mismatched: Cell<u64>,
    repaired: Cell<u64>,
    started_ns: u64,
    done: RefCell<Option<CheckDone>>,
}

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

/// One copy operation of a process window, planned by the level: one
/// extent read once from `from` and written to (or, for a scrub, compared
/// with) every `to`. (`pub` only so that the level trait may name it.)
pub struct WindowCopy {
    pub(crate) from: Loc,
    /// More sources, XORed into what `from` read before it is written (a
    /// parity level rebuilding a member from the others; empty for copies).
    pub(crate) xor: Vec<Loc>,
    pub(crate) to: Vec<Loc>,
    pub(crate) num_blocks: u64,
    /// Where the extent starts in the window's buffer.
    pub(crate) buf_offset_blocks: u64,
}

/// What a process window is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowJob {
    /// Copy onto the members in `dests` (bit per slot) that take writes.
    Repair { dests: u32 },
    /// Compare every active copy with the first.
    Check,
}

pub(crate) struct Rebuild {
    channel: Weak<ArrayChannel>,
    weak: Weak<Rebuild>,
    /// Members written (bit per slot).
    dests: u32,
    /// Array ranges to copy, sorted and disjoint.
    ranges: Vec<Range<u64>>,
    range_idx: Cell<usize>,
    /// Blocks of `ranges` done.
    done_blocks: Cell<u64>,
    /// The unclean-shutdown resync is part of this run.
    resync: bool,
    /// Each range, once done, marks its chunks synced (a resync or sync
    /// pass with every member active: each window computed the parity of
    /// its stripes from the data).
    marks_synced: Cell<bool>,
    /// A sync pass of chunks that need sync (no membership change at the end).
    sync_pass: Cell<bool>,
    /// A scrub (`bdev_raid_check`) rather than a copy.
    check: Option<CheckState>,
    /// The current window's copies (planned when its reads start).
    current: RefCell<Vec<WindowCopy>>,
    /// Scrub: one comparison buffer per other copy.
    cmp: RefCell<Vec<DmaBuf>>,
    /// Run when the process has stopped (`cancel_then`).
    on_stop: RefCell<Vec<Box<dyn FnOnce()>>>,
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
    /// When the rebuild's progress was last written to the superblock.
    progress_saved_ns: Cell<u64>,
    next_start_ns: Cell<u64>,
    poller: RefCell<Option<PollerHandle>>,
}

fn owner_of(channel: &ArrayChannel) -> &OwnerPart {
    channel.owner.as_ref().unwrap_or_else(|| unreachable!("rebuilds run on the owner"))
}

/// Sorted, coalesced ranges.
fn merge(mut v: Vec<Range<u64>>) -> Vec<Range<u64>> {
    v.retain(|r| r.start < r.end);
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Starts copying onto every `Rebuilding` slot (their partial ranges, or
/// everything) and, after an unclean shutdown, the dirty ranges onto every
/// copy — one process at a time (owner, fenced: the first window starts
/// after the resume).
pub(crate) fn start_next(channel: &Rc<ArrayChannel>) {
    let owner = owner_of(channel);
    if owner.rebuild.borrow().is_some() || channel.shared.deleted.load(Ordering::Acquire) {
        return;
    }
    let Some(array_blocks) = channel.shared.geometry.get().map(|g| g.array_blocks()) else {
        return;
    };
    let (dests, ranges, resync, target, sync_pass, marks_synced) = {
        let mut control = channel.shared.control();
        let rebuilding: Vec<usize> =
            (0..control.slots.len()).filter(|&i| control.slots[i].role == array::Role::Rebuilding).collect();
        // A bitmap that knows which chunks were written: never-written
        // chunks read as zeros at every redundant level (`level::stripe`,
        // `level::raid1`), so their members' contents need not agree.
        let tracking = control.bitmap.clone().filter(|bm| bm.tracks_written());
        let mut ranges: Vec<Range<u64>> = Vec::new();
        let mut full = false;
        for &i in &rebuilding {
            match &control.slots[i].partial {
                Some(p) => ranges.extend(p.iter().cloned()),
                None => full = true,
            }
        }
        let resync = control.dirty.is_some();
        if let Some(d) = &control.dirty {
            ranges.extend(d.iter().cloned());
        }
        let mut sync_pass = false;
        if rebuilding.is_empty() && !resync {
            // Nothing to repair: a sync pass over the chunks that need
            // sync, when every member is there to compute parity from.
            let Some(bm) = tracking.as_ref().filter(|bm| bm.first_write_needs_sync()) else { return };
            if !array::in_sync(&channel.shared, &control) {
                return;
            }
            ranges = crate::examine::chunk_ranges(bm.geometry(), bm.needsync_chunks().into_iter());
            if ranges.is_empty() {
                return;
            }
            sync_pass = true;
        }
        // (A sync pass writes parity wherever it lies: every member.)
        let dests: u32 = if resync || sync_pass {
            (0..control.slots.len()).fold(0, |m, i| m | 1 << i)
        } else {
            rebuilding.iter().fold(0, |m, &i| m | 1 << i)
        };
        // A full rebuild of a level whose member blocks are array blocks
        // (raid1) resumes where the superblock says it got to; the resync
        // ranges, if any, are copied too.
        let resume = if full && channel.shared.level.array_offset_is_member_offset() {
            rebuilding.iter().map(|&i| control.slots[i].recovered_blocks).min().unwrap_or(0).min(array_blocks)
        } else {
            0
        };
        if full {
            match &tracking {
                // Only the written chunks: the others read as zeros.
                Some(bm) => ranges.extend(
                    crate::examine::chunk_ranges(bm.geometry(), bm.written_chunks().into_iter())
                        .into_iter()
                        .map(|r| r.start.max(resume)..r.end.min(array_blocks)),
                ),
                None => ranges.push(resume..array_blocks),
            }
        }
        // Nothing of a never-written chunk is copied (a resync's dirty
        // chunks, a returning member's, or a new member's: all written).
        if let Some(bm) = &tracking {
            ranges = only_written(bm, ranges);
        }
        // A parity level repairs whole stripes: each range widens to the
        // stripes it touches (copy levels: unchanged), so a stripe that two
        // dirty chunks share is repaired and counted once.
        if let Some(g) = channel.shared.geometry.get() {
            for r in ranges.iter_mut().filter(|r| r.start < r.end) {
                *r = channel.shared.level.lock_range(g, r.start, r.end - r.start);
            }
        }
        let ranges = merge(ranges);
        let target = rebuilding.first().copied().unwrap_or(0);
        control.process_target = Some(target);
        control.process_kind = if rebuilding.is_empty() { "resync" } else { "rebuild" };
        let marks_synced = rebuilding.is_empty() && tracking.as_ref().is_some_and(|bm| bm.first_write_needs_sync());
        (dests, ranges, resync, target, sync_pass, marks_synced)
    };
    // A resync or sync pass over every member (none rebuilding) computes
    // each window's parity from its data: its chunks are synced after it.
    let rb = spawn(channel, dests, ranges, resync, None);
    rb.marks_synced.set(marks_synced);
    rb.sync_pass.set(sync_pass);
    tracing::info!(raid = %channel.shared.name, slot = target, dests, resync, sync_pass, "rebuild started");
}

/// `bdev_raid_check`: reads every copy of every block, counts the blocks
/// whose copies differ and, with `repair`, rewrites them from the first
/// active copy. One process at a time: refused while a rebuild runs; a
/// sync pass gives way (it starts again after the check). With a bitmap
/// that knows which chunks were written, only their stripes are checked.
pub(crate) fn start_check(channel: &Rc<ArrayChannel>, repair: bool, done: CheckDone) {
    let owner = owner_of(channel);
    let running = owner.rebuild.borrow().clone();
    if let Some(rb) = running {
        if rb.sync_pass.get() && !rb.cancelled.get() {
            let r2 = channel.clone();
            return cancel_then(channel, move || start_check(&r2, repair, done));
        }
        return done(Err(BdevError::Os(format!("{}: a rebuild, resync or check is running", channel.shared.name), 16)));
    }
    if !channel.shared.level.is_redundant() {
        return done(Err(BdevError::Invalid(format!("{} has no redundancy to check", channel.shared.name))));
    }
    let Some(array_blocks) = channel.shared.geometry.get().map(|g| g.array_blocks()) else {
        return done(Err(BdevError::Invalid(format!("{} is not online", channel.shared.name))));
    };
    {
        let mut control = channel.shared.control();
        control.process_target = Some(0);
        control.process_kind = "check";
    }
    let check = CheckState {
        repair,
        mismatched: Cell::new(0),
        repaired: Cell::new(0),
        started_ns: reactor::now_ns(),
        done: RefCell::new(Some(done)),
    };
    let ranges = match channel.shared.control().bitmap.clone().filter(|bm| bm.tracks_written()) {
        Some(bm) => written_ranges(channel, &bm),
        None => std::iter::once(0..array_blocks).collect(),
    };
    spawn(channel, u32::MAX, ranges, false, Some(check));
}

/// The parts of `ranges` (array blocks) in written chunks.
fn only_written(bm: &bitmap::Bitmap, ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let g = bm.geometry();
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges.into_iter().filter(|r| r.start < r.end) {
        let Ok(chunks) = g.chunk_range(r.start, r.end - r.start) else {
            // Not the bitmap's to judge (past its end): kept whole.
            out.push(r);
            continue;
        };
        for c in chunks.into_iter().filter(|&c| bm.is_written(c)) {
            let b = g.chunk_blocks(c);
            let piece = b.start.max(r.start)..b.end.min(r.end);
            match out.last_mut() {
                Some(l) if l.end == piece.start => l.end = piece.end,
                _ => out.push(piece),
            }
        }
    }
    out
}

/// The array ranges of the written chunks, widened to what the level
/// locks (whole stripes for a parity level) and merged.
fn written_ranges(channel: &ArrayChannel, bm: &bitmap::Bitmap) -> Vec<Range<u64>> {
    let mut ranges = crate::examine::chunk_ranges(bm.geometry(), bm.written_chunks().into_iter());
    if let Some(g) = channel.shared.geometry.get() {
        for r in ranges.iter_mut().filter(|r| r.start < r.end) {
            *r = channel.shared.level.lock_range(g, r.start, r.end - r.start);
        }
    }
    merge(ranges)
}

/// How long after a batch left chunks needing sync the sync pass starts:
/// the first writes of a burst gather into one pass, and the pass does not
/// compete with the writes that caused it.
pub(crate) const SYNC_PASS_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// Has the owner's bitmap call `start_next` (`SYNC_PASS_DELAY` later, from
/// a poller) when a batch left chunks needing sync, so the sync pass
/// computes their parity.
pub(crate) fn watch_needs_sync(channel: &Rc<ArrayChannel>, bm: &bitmap::BitmapOwner) {
    let weak = Rc::downgrade(channel);
    let armed = Rc::new(Cell::new(false));
    bm.on_needs_sync(move || {
        if armed.replace(true) {
            return;
        }
        let (weak, armed) = (weak.clone(), armed.clone());
        reactor::register_timed_poller("raid_sync_pass_start", SYNC_PASS_DELAY, move || {
            armed.set(false);
            if let Some(channel) = weak.upgrade() {
                start_next(&channel);
            }
            PollStatus::Done
        });
    });
}

fn spawn(
    channel: &Rc<ArrayChannel>,
    dests: u32,
    ranges: Vec<Range<u64>>,
    resync: bool,
    check: Option<CheckState>,
) -> Rc<Rebuild> {
    let owner = owner_of(channel);
    let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    channel.shared.rebuild_blocks.store(0, Ordering::Relaxed);
    channel.shared.process_total.store(total, Ordering::Relaxed);
    let first = ranges.first().map_or(0, |r| r.start);
    let rb = Rc::new_cyclic(|weak| Rebuild {
        channel: Rc::downgrade(channel),
        weak: weak.clone(),
        dests,
        ranges,
        range_idx: Cell::new(0),
        done_blocks: Cell::new(0),
        resync,
        marks_synced: Cell::new(false),
        sync_pass: Cell::new(false),
        check,
        current: RefCell::new(Vec::new()),
        cmp: RefCell::new(Vec::new()),
        on_stop: RefCell::new(Vec::new()),
        phase: Cell::new(Phase::Idle),
        cancelled: Cell::new(false),
        offset: Cell::new(first),
        window: Cell::new((0, 0)),
        entry: Cell::new(u32::MAX),
        remaining: Cell::new(0),
        failed: Cell::new(false),
        buf: RefCell::new(None),
        window_started_ns: Cell::new(0),
        progress_saved_ns: Cell::new(reactor::now_ns()),
        next_start_ns: Cell::new(0),
        poller: RefCell::new(None),
    });
    let r2 = rb.clone();
    *rb.poller.borrow_mut() = Some(reactor::register_poller("raid_rebuild", move || r2.poll()));
    *owner.rebuild.borrow_mut() = Some(rb.clone());
    rb
}

/// Stops the running rebuild (owner). Between windows it stops at once;
/// inside one (only outside fences) it stops when the window ends.
pub(crate) fn cancel(channel: &Rc<ArrayChannel>) {
    cancel_then(channel, || {});
}

/// `cancel`, and `stopped` runs once no window of it is in flight any
/// more (at once when it was between windows or none ran).
pub(crate) fn cancel_then(channel: &Rc<ArrayChannel>, stopped: impl FnOnce() + 'static) {
    let Some(owner) = &channel.owner else { return stopped() };
    let rb = owner.rebuild.borrow().clone();
    {
        let mut control = channel.shared.control();
        control.process_target = None;
    }
    channel.shared.rebuild_blocks.store(0, Ordering::Relaxed);
    let Some(rb) = rb else { return stopped() };
    rb.cancelled.set(true);
    rb.on_stop.borrow_mut().push(Box::new(stopped));
    if rb.phase.get() == Phase::Idle {
        rb.stop(channel);
    }
}

impl Rebuild {
    fn rc(&self) -> Rc<Rebuild> {
        self.weak.upgrade().unwrap_or_else(|| unreachable!("used through its Rc"))
    }

    fn stop(&self, channel: &ArrayChannel) {
        self.phase.set(Phase::Stopped);
        if let Some(c) = &self.check {
            let done = c.done.borrow_mut().take();
            if let Some(done) = done {
                channel.shared.control().process_target = None;
                let finished = self.range_idx.get() >= self.ranges.len();
                // A whole-array check that left nothing wrong: redundancy
                // is consistent everywhere (user writes keep it so).
                let verified = finished && c.mismatched.get() == c.repaired.get();
                let was = channel.shared.redundancy_verified.load(Ordering::Acquire);
                if verified {
                    channel.shared.redundancy_verified.store(true, Ordering::Release);
                } else if c.mismatched.get() > c.repaired.get() {
                    // Wrong parity found and left: never update it in place.
                    channel.shared.redundancy_verified.store(false, Ordering::Release);
                }
                // A level that trusts a verification keeps it in the
                // superblock (`meta::next_info` writes the flag).
                let now = channel.shared.redundancy_verified.load(Ordering::Acquire);
                // (Not while deleting: the clean superblock written then carries it.)
                let deleting = channel.shared.deleted.load(Ordering::Acquire);
                if now != was && channel.shared.level.trusts_checked_redundancy() && !deleting {
                    let meta = channel.owner.as_ref().and_then(|o| o.meta.borrow().clone());
                    if let Some(meta) = meta {
                        crate::meta::update(&channel.rc(), &meta, crate::meta::SbWrite::Dirty, Box::new(|_| {}));
                    }
                }
                let r = json!({
                    "name": channel.shared.name,
                    "blocks_checked": self.done_blocks.get(),
                    "mismatched_blocks": c.mismatched.get(),
                    "repaired_blocks": c.repaired.get(),
                    "repair": c.repair,
                    "completed": finished,
                    "duration_ms": (reactor::now_ns().saturating_sub(c.started_ns)) / 1_000_000,
                });
                *channel.shared.last_check.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
                tracing::info!(raid = %channel.shared.name, result = %r, "check finished");
                let stopped = || BdevError::Os(format!("{}: check stopped before the end", channel.shared.name), 125);
                done(if finished { Ok(r) } else { Err(stopped()) });
            }
        }
        if let Some(p) = self.poller.borrow_mut().take() {
            p.unregister();
        }
        let owner = owner_of(channel);
        let mine = owner.rebuild.borrow().as_ref().is_some_and(|r| std::ptr::eq(Rc::as_ptr(r), self));
        if mine {
            *owner.rebuild.borrow_mut() = None;
        }
        // Last: a waiter may look at the owner's rebuild slot (now empty).
        let waiters = std::mem::take(&mut *self.on_stop.borrow_mut());
        for w in waiters {
            w();
        }
    }

    fn poll(&self) -> PollStatus {
        if self.phase.get() != Phase::Idle {
            return if self.phase.get() == Phase::Stopped { PollStatus::Done } else { PollStatus::Idle };
        }
        let Some(channel) = self.channel.upgrade() else {
            return PollStatus::Done;
        };
        if self.cancelled.get() {
            self.stop(&channel);
            return PollStatus::Done;
        }
        let now = reactor::now_ns();
        if now < self.next_start_ns.get() {
            return PollStatus::Idle;
        }
        let Some(range) = self.ranges.get(self.range_idx.get()).cloned() else {
            self.finish(&channel);
            return PollStatus::Busy;
        };
        if !channel.gate.borrow_mut().try_enter() {
            return PollStatus::Idle;
        }
        let bs = channel.block_size.get();
        let opts = RaidModule::get().options();
        let max_blocks = (DmaBuf::MAX_LEN as u64 / bs).max(1);
        let window_blocks = (opts.process_window_size_kb as u64 * 1024 / bs).clamp(1, max_blocks);
        let start = self.offset.get().max(range.start);
        let end = (start + window_blocks).min(range.end);
        // A parity level repairs whole stripes: the window widens to the
        // range the level locks (copy levels: the window itself), so each
        // stripe is rebuilt once and its rows fit the window's buffer.
        // (User writes lock whole stripes themselves, so a narrower window
        // would still never overlap one.)
        let end = match channel.shared.geometry.get() {
            Some(g) => channel.shared.level.lock_range(g, start, end - start).end.max(end),
            None => end,
        };
        self.window.set((start, end));
        self.window_started_ns.set(now);
        self.phase.set(Phase::Locking);
        let r = owner_of(&channel).table.borrow_mut().acquire(start, end, words::REBUILD_WAITER);
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

    /// The level's plan for the current window (None: an extent to repair
    /// has no healthy copy).
    fn plan(&self, channel: &ArrayChannel) -> Option<Vec<WindowCopy>> {
        let (start, end) = self.window.get();
        let job = if self.check.is_some() { WindowJob::Check } else { WindowJob::Repair { dests: self.dests } };
        channel.shared.level.plan_window(channel, start..end, job)
    }

    fn start_reads(&self) {
        let Some(channel) = self.channel.upgrade() else {
            return;
        };
        if self.cancelled.get() {
            return self.end_window(&channel, false);
        }
        let Some(copies) = self.plan(&channel) else {
            tracing::error!(raid = %channel.shared.name, "rebuild has no healthy source copy: stopping");
            return self.end_window(&channel, false);
        };
        let count = if self.check.is_some() {
            copies.iter().map(|c| 1 + c.to.len() as u32 + c.xor.len() as u32).sum()
        } else {
            copies.iter().map(|c| 1 + c.xor.len() as u32).sum()
        };
        if count == 0 {
            return self.end_window(&channel, true);
        }
        if (IoBox::available() as u64) < count as u64 {
            // Out of descriptors: give the window back and retry shortly.
            self.next_start_ns.set(reactor::now_ns() + 1_000_000);
            return self.release_window(&channel);
        }
        let bs = channel.block_size.get();
        let (start, end) = self.window.get();
        let len = ((end - start) * bs) as usize;
        if self.buf.borrow().as_ref().is_none_or(|b| b.len() < len) {
            // Once per rebuild (or when the window grows): not per IO.
            *self.buf.borrow_mut() = DmaBuf::alloc(len);
        }
        let Some(buf) = self.buf.borrow().clone() else {
            self.next_start_ns.set(reactor::now_ns() + 1_000_000);
            return self.release_window(&channel);
        };
        // Scrub: a buffer per other copy; parity rebuild: per XOR source.
        // (A parity scrub reads `from`, the parity, and XORs the data.)
        let others = if self.check.is_some() {
            copies.iter().map(|c| c.to.len() + c.xor.len()).max().unwrap_or(0)
        } else {
            copies.iter().map(|c| c.xor.len()).max().unwrap_or(0)
        };
        if others > 0 {
            let mut cmp = self.cmp.borrow_mut();
            if cmp.first().is_some_and(|b| b.len() < len) {
                cmp.clear();
            }
            while cmp.len() < others {
                match DmaBuf::alloc(len) {
                    Some(b) => cmp.push(b),
                    None => {
                        drop(cmp);
                        self.next_start_ns.set(reactor::now_ns() + 1_000_000);
                        return self.release_window(&channel);
                    }
                }
            }
        }
        self.phase.set(Phase::Reading);
        self.failed.set(false);
        self.remaining.set(count);
        let members = channel.members.borrow();
        let cmp = self.cmp.borrow();
        for c in &copies {
            let (off, n) = ((c.buf_offset_blocks * bs) as usize, (c.num_blocks * bs) as usize);
            self.submit(&members, IoType::Read, c.from, c.num_blocks, buf.slice(off, n));
            if self.check.is_some() {
                for (k, &to) in c.to.iter().chain(&c.xor).enumerate() {
                    self.submit(&members, IoType::Read, to, c.num_blocks, cmp[k].slice(off, n));
                }
            } else {
                for (k, &src) in c.xor.iter().enumerate() {
                    self.submit(&members, IoType::Read, src, c.num_blocks, cmp[k].slice(off, n));
                }
            }
        }
        drop((members, cmp));
        *self.current.borrow_mut() = copies;
    }

    /// Scrub: compares every copy with the first; mismatching blocks are
    /// counted and, with `repair`, their extents rewritten from the first.
    fn compare(&self, channel: &ArrayChannel) {
        let Some(check) = &self.check else { return };
        let (Some(buf), bs) = (self.buf.borrow().clone(), channel.block_size.get() as usize) else {
            return self.end_window(channel, false);
        };
        let copies = std::mem::take(&mut *self.current.borrow_mut());
        let cmp = self.cmp.borrow().clone();
        // (member location, blocks, buffer offset, the comparison buffer
        // holding the right data: None for `buf`).
        let mut repairs: Vec<(Loc, u64, u64, Option<usize>)> = Vec::new();
        for c in &copies {
            let (off, n) = ((c.buf_offset_blocks as usize) * bs, c.num_blocks as usize * bs);
            if !c.xor.is_empty() {
                // Parity: `buf` holds it as read; what the data gives
                // (`combine_window`) goes into the first data buffer, and
                // the two must agree.
                let t = c.to.len();
                let sum = cmp[t].slice(off, n);
                let sources: Vec<DmaBuf> = cmp[t..t + c.xor.len()].iter().map(|b| b.slice(off, n)).collect();
                let combined = channel
                    .shared
                    .geometry
                    .get()
                    .is_some_and(|g| channel.shared.level.combine_window(g, c.from, &c.xor, &sources));
                if !combined {
                    channel.impossible("parity check sources that do not give the parity");
                    return self.end_window(channel, false);
                }
                let differ = buf.with(|a| {
                    sum.with(|b| a[off..off + n].chunks(bs).zip(b.chunks(bs)).filter(|(x, y)| x != y).count())
                }) as u64;
                if differ > 0 {
                    check.mismatched.set(check.mismatched.get() + differ);
                    if check.repair {
                        check.repaired.set(check.repaired.get() + differ);
                        repairs.push((c.from, c.num_blocks, c.buf_offset_blocks, Some(t)));
                    }
                }
                continue;
            }
            for (k, &to) in c.to.iter().enumerate() {
                let differ = buf.with(|a| {
                    cmp[k].with(|b| {
                        a[off..off + n].chunks(bs).zip(b[off..off + n].chunks(bs)).filter(|(x, y)| x != y).count()
                    })
                }) as u64;
                if differ > 0 {
                    check.mismatched.set(check.mismatched.get() + differ);
                    if check.repair {
                        check.repaired.set(check.repaired.get() + differ);
                        repairs.push((to, c.num_blocks, c.buf_offset_blocks, None));
                    }
                }
            }
        }
        if repairs.is_empty() {
            return self.end_window(channel, true);
        }
        if (IoBox::available() as u64) < repairs.len() as u64 {
            return self.end_window(channel, false);
        }
        self.phase.set(Phase::Writing);
        self.failed.set(false);
        self.remaining.set(repairs.len() as u32);
        let members = channel.members.borrow();
        for (to, n, off, from_cmp) in repairs {
            let src = from_cmp.map_or(&buf, |k| &cmp[k]);
            let b = src.slice(off as usize * bs, n as usize * bs);
            self.submit(&members, IoType::Write, to, n, b);
        }
    }

    fn start_writes(&self, channel: &ArrayChannel) {
        let Some(buf) = self.buf.borrow().clone() else {
            return self.end_window(channel, false);
        };
        let Some(copies) = self.plan(channel) else {
            return self.end_window(channel, false);
        };
        let writes: u32 = copies.iter().map(|c| c.to.len() as u32).sum();
        if (IoBox::available() as u64) < writes as u64 {
            return self.end_window(channel, false);
        }
        if writes == 0 {
            return self.end_window(channel, true);
        }
        let bs = channel.block_size.get();
        self.phase.set(Phase::Writing);
        self.failed.set(false);
        self.remaining.set(writes);
        let members = channel.members.borrow();
        for c in &copies {
            for &to in &c.to {
                let b = buf.slice((c.buf_offset_blocks * bs) as usize, (c.num_blocks * bs) as usize);
                self.submit(&members, IoType::Write, to, c.num_blocks, b);
            }
        }
    }

    fn submit(&self, members: &[crate::channel::MemberChannel], t: IoType, l: Loc, num_blocks: u64, buf: DmaBuf) {
        let mc = &members[l.member as usize];
        let io = mc.ch.as_ref().and_then(|ch| {
            IoBox::data(t, l.offset_blocks + mc.data_offset_blocks, num_blocks, Some(buf)).map(|io| (ch, io))
        });
        match io {
            Some((ch, mut io)) => {
                // A cached member of an array that told its users it has no
                // cache: the copy must be durable like every other write to it.
                if mc.force_fua && t == IoType::Write {
                    io.flags = bdev::IoFlags::FUA;
                }
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
    fn release_window(&self, channel: &ArrayChannel) {
        let entry = self.entry.replace(u32::MAX);
        if entry != u32::MAX {
            owner_of(channel).release(channel, entry);
        }
        self.phase.set(Phase::Idle);
        channel.exit_gate();
    }

    /// Ends the current window: `ok` advances past it, otherwise the rebuild stops.
    fn end_window(&self, channel: &ArrayChannel, ok: bool) {
        let (start, end) = self.window.get();
        self.release_window(channel);
        if !ok {
            tracing::warn!(raid = %channel.shared.name, offset = start, "rebuild stopped");
            channel.shared.control().process_target = None;
            return self.stop(channel);
        }
        self.offset.set(end);
        self.done_blocks.set(self.done_blocks.get() + (end - start));
        channel.shared.rebuild_blocks.store(self.done_blocks.get(), Ordering::Relaxed);
        if !self.sync_pass.get() {
            // (A sync pass copies nothing onto another member.)
            channel.shared.copied_blocks.fetch_add(end - start, Ordering::Relaxed);
        }
        self.save_progress(channel, end);
        let idx = self.range_idx.get();
        if let Some(r) = self.ranges.get(idx).filter(|r| end >= r.end) {
            if self.marks_synced.get() {
                mark_synced(channel, r);
            }
            self.range_idx.set(idx + 1);
            if let Some(next) = self.ranges.get(idx + 1) {
                self.offset.set(next.start);
            }
        }
        let bw_mib = RaidModule::get().options().process_max_bandwidth_mb_sec as u64;
        if bw_mib > 0 {
            let bytes = (end - start) * channel.block_size.get();
            let ns = bytes as u128 * 1_000_000_000 / (bw_mib as u128 * 1024 * 1024);
            self.next_start_ns.set(self.window_started_ns.get() + ns as u64);
        }
        if self.cancelled.get() {
            self.stop(channel);
        }
    }

    /// A full rebuild of a level whose member blocks are array blocks
    /// (raid1) records how far it got: in the slots at once, in the
    /// superblock at most once a second (any write of it carries it).
    fn save_progress(&self, channel: &ArrayChannel, end: u64) {
        if self.check.is_some() || self.resync || !channel.shared.level.array_offset_is_member_offset() {
            return;
        }
        {
            let mut control = channel.shared.control();
            for (i, s) in control.slots.iter_mut().enumerate() {
                if self.dests & (1 << i) != 0 && s.role == array::Role::Rebuilding && s.partial.is_none() {
                    s.recovered_blocks = s.recovered_blocks.max(end);
                }
            }
        }
        let now = reactor::now_ns();
        if now.saturating_sub(self.progress_saved_ns.get()) < 1_000_000_000 {
            return;
        }
        self.progress_saved_ns.set(now);
        let channel = channel.rc();
        let meta = channel.owner.as_ref().and_then(|o| o.meta.borrow().clone());
        if let Some(meta) = meta {
            crate::meta::update(&channel, &meta, crate::meta::SbWrite::Dirty, Box::new(|_| {}));
        }
    }

    /// Every window copied: the repaired members become active (and the
    /// array in sync) under a fence.
    fn finish(&self, channel: &Rc<ArrayChannel>) {
        self.stop(channel);
        if self.sync_pass.get() {
            // No membership changed: no fence, no superblock. Chunks that
            // came to need sync meanwhile get the next pass.
            channel.shared.control().process_target = None;
            channel.shared.rebuild_blocks.store(0, Ordering::Relaxed);
            channel.shared.process_total.store(0, Ordering::Relaxed);
            return start_next(channel);
        }
        if self.check.is_some() {
            channel.shared.rebuild_blocks.store(0, Ordering::Relaxed);
            channel.shared.process_total.store(0, Ordering::Relaxed);
            // A member added while the scrub ran waited for it.
            return start_next(channel);
        }
        let (dests, resync) = (self.dests, self.resync);
        fenced(
            channel,
            Box::new(move |channel, fence| {
                let Ok(fence) = fence else { return };
                array::rebuild_finished(channel, dests, resync);
                channel.shared.rebuild_blocks.store(0, Ordering::Relaxed);
                channel.shared.process_total.store(0, Ordering::Relaxed);
                let r2 = channel.clone();
                array::commit(channel, fence, move |_| start_next(&r2));
            }),
        );
    }
}

/// The chunks lying wholly inside `range`, whose every stripe a window
/// computed the parity of from its data, are synced.
fn mark_synced(channel: &ArrayChannel, range: &Range<u64>) {
    let Some(bm) = channel.shared.control().bitmap.clone() else { return };
    let g = bm.geometry();
    let first = range.start.div_ceil(g.chunk_size_blocks);
    // The last chunk may be short: it ends with the array.
    let end = if range.end >= g.data_blocks { g.num_chunks() } else { range.end / g.chunk_size_blocks };
    if first < end {
        bm.mark_synced(first..end);
    }
}

impl IoDone for Rebuild {
    fn io_done(&self, io: IoBox) {
        let Some(channel) = self.channel.upgrade() else {
            return;
        };
        if !io.status.is_ok() {
            // A failed source or target is latched failed like any member;
            // the owner then updates the membership.
            channel.latch_failed((io.tag2 & 0xff) as usize);
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
            (Phase::Reading, true) => self.start_reads_again(&channel),
            (Phase::Reading, false) if self.check.is_some() => self.compare(&channel),
            (Phase::Reading, false) => {
                self.fold_xor(&channel);
                if self.failed.get() {
                    return self.end_window(&channel, false);
                }
                self.start_writes(&channel)
            }
            (Phase::Writing, failed) => self.end_window(&channel, !failed),
            _ => {}
        }
    }
}

impl Rebuild {
    /// Parity rebuild: each copy's target from what `from` and its other
    /// sources read (`combine_window`), into what `from` read.
    fn fold_xor(&self, channel: &ArrayChannel) {
        let copies = self.current.borrow();
        if copies.iter().all(|c| c.xor.is_empty()) {
            return;
        }
        let (Some(buf), bs) = (self.buf.borrow().clone(), channel.block_size.get() as usize) else { return };
        let cmp = self.cmp.borrow();
        for c in copies.iter().filter(|c| !c.xor.is_empty()) {
            let (off, n) = (c.buf_offset_blocks as usize * bs, c.num_blocks as usize * bs);
            let sources: Vec<DmaBuf> =
                std::iter::once(buf.slice(off, n)).chain(cmp[..c.xor.len()].iter().map(|b| b.slice(off, n))).collect();
            let at: Vec<Loc> = std::iter::once(c.from).chain(c.xor.iter().copied()).collect();
            let target = c.to.first().copied().unwrap_or(c.from);
            let combined = channel
                .shared
                .geometry
                .get()
                .is_some_and(|g| channel.shared.level.combine_window(g, target, &at, &sources));
            if !combined {
                // Slices of one length, of one stripe, by construction.
                channel.impossible("parity rebuild sources that do not give the target");
                self.failed.set(true);
            }
        }
    }

    fn start_reads_again(&self, channel: &ArrayChannel) {
        // Every member being repaired failed: nothing left to copy onto.
        let failed = channel.shared.failed_mask.load(Ordering::Acquire);
        if self.cancelled.get() || self.dests & !failed == 0 {
            return self.end_window(channel, false);
        }
        self.phase.set(Phase::Locking);
        self.start_reads();
    }
}
