//! The owner reactor's side of an array's bitmap: the tick that closes
//! batches and writes the changed pages to every active member, the page
//! buffers (two per page, pinned while a write of them is in flight:
//! invariant 5 in docs/architecture.md), member changes, and teardown that waits for every write
//! and batch before it reports done (invariant 4).
//!
//! Everything here lives on one reactor (`Rc`, `RefCell`): other reactors
//! only see the `Arc<Bitmap>`. Completion callbacks hold an `Rc` of the
//! owner's state, so dropping the `BitmapOwner` while a batch is in flight
//! frees nothing a device or a callback may still touch.
//!
//! Durability on members with a volatile write cache: every page write is
//! FUA, so a batch completes (and releases its writes, invariant 2) only
//! once its bits are on the media. A batch that clears bits first flushes
//! every member with a cache and waits for all of them before any page goes
//! out (md writes bitmap pages with REQ_PREFLUSH | REQ_FUA): a chunk is
//! never clean on any member's media while data written to it may still sit
//! in some member's cache.

use crate::geometry::Geometry;
use crate::geometry::Plane;
use crate::load::LoadedBitmap;
use crate::page::{encode_page_as, PageKind};
use crate::planner::{Plan, Planner, TickOptions, WrittenInit};
use crate::shared::{Bitmap, COUNT_MASK};
use crate::sync::Ordering;
use crate::BitmapError;
use bdev::{BdevHandle, DmaBuf, IoBox, IoDone, IoFlags, IoType};
use reactor::{PollStatus, PollerHandle};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// Tick period for `start_poller`: bounds the extra latency of a write to a
/// chunk whose bit is not yet on disk (one tick plus one page write), and
/// an idle tick costs a scan of the bit words.
pub const DEFAULT_TICK_PERIOD: Duration = Duration::from_millis(1);

/// Tunables of one bitmap.
#[derive(Clone, Copy, Debug)]
pub struct OwnerOptions {
    /// Ticks a chunk must stay idle (no write started or in flight) before
    /// its bit is cleared, when the array is in sync.
    pub clear_after_ticks: u8,
    /// A chunk's first write leaves it needing sync (a parity level, whose
    /// first partial write into a chunk computes parity for the rows it
    /// writes only): see the `shared` module's docs.
    pub first_write_needs_sync: bool,
}

impl Default for OwnerOptions {
    fn default() -> Self {
        OwnerOptions { clear_after_ticks: 3, first_write_needs_sync: false }
    }
}

type Callback = Box<dyn FnOnce()>;
type MemberFailed = Rc<dyn Fn(&BdevHandle)>;
type FirstWrites = Rc<dyn Fn()>;

/// One page's two buffers; a batch writes `bufs[seq & 1]`.
struct PageBufs {
    bufs: [DmaBuf; 2],
    /// Member writes in flight per buffer: a pinned buffer is never rebuilt.
    pins: [u32; 2],
}

struct Batch {
    plan: Plan,
    sel: usize,
    members: Vec<BdevHandle>,
    failed: Vec<bool>,
    outstanding: u32,
    /// (page, member index) not submitted yet: waiting for the pre-flush,
    /// or found no IO descriptor (resubmitted by the tick).
    retry: Vec<(usize, usize)>,
    /// Members still to flush before any page write of this batch (a
    /// clearing batch; members with a volatile write cache).
    flush_queue: Vec<usize>,
    /// Pre-flushes submitted and not completed (also in `outstanding`).
    flushes_in_flight: u32,
    waiters: Vec<Callback>,
    stop_done: Vec<Callback>,
}

enum Stop {
    Running,
    Requested(Vec<Callback>),
    Closed,
}

struct State {
    planner: Planner,
    members: Vec<BdevHandle>,
    pages: Vec<PageBufs>,
    batch: Option<Batch>,
    stop: Stop,
    force_all: bool,
    /// Called when the next forced full write completes (flush, new members).
    flush_waiters: Vec<Callback>,
    events_base: u64,
    on_member_failed: Option<MemberFailed>,
    /// Called after a batch that left chunks needing sync completed.
    on_needs_sync: Option<FirstWrites>,
    /// Completions that found no batch or a closed bitmap (must stay 0).
    late_completions: u64,
    /// Member flushes issued ahead of clearing batches.
    preflushes: u64,
    ticks: u64,
}

struct Owner {
    bitmap: Arc<Bitmap>,
    geometry: Geometry,
    offset_blocks: u64,
    st: RefCell<State>,
}

/// The owner reactor's handle of one array's bitmap (see the crate docs).
#[derive(Clone)]
pub struct BitmapOwner(Rc<Owner>);

fn check_member(g: &Geometry, legacy: bool, offset_blocks: u64, m: &BdevHandle) -> Result<(), BitmapError> {
    let region = if legacy { g.legacy_region_blocks() } else { g.region_blocks() };
    let p = m.props();
    if p.block_size != g.block_size {
        return Err(BitmapError::Member(
            m.name().into(),
            format!("block size {} differs from the array's {}", p.block_size, g.block_size),
        ));
    }
    match offset_blocks.checked_add(region) {
        Some(end) if end <= p.num_blocks => Ok(()),
        _ => Err(BitmapError::Member(
            m.name().into(),
            format!("{} blocks cannot hold the bitmap at block {offset_blocks}", p.num_blocks),
        )),
    }
}

impl BitmapOwner {
    /// Creates the bitmap of an array on the current (owner) reactor. Its
    /// pages live at `offset_blocks` on every member. `initial`: the bitmap
    /// loaded at assembly (its set bits stay set until resynced and
    /// cleared); `None` for a new array. Every page is written to every
    /// member by the first batch; `flush(done)` reports when that happened.
    pub fn new(
        geometry: Geometry,
        members: Vec<BdevHandle>,
        offset_blocks: u64,
        initial: Option<&LoadedBitmap>,
        options: OwnerOptions,
    ) -> Result<BitmapOwner, BitmapError> {
        geometry.validate()?;
        // A bitmap loaded from version 1 pages stays version 1: its array
        // reserved room for the dirty plane only.
        let legacy = initial.is_some_and(|lb| lb.written.is_none());
        for m in &members {
            check_member(&geometry, legacy, offset_blocks, m)?;
        }
        if let Some(lb) = initial {
            let written_ok = lb.written.as_ref().is_none_or(|w| w.len() == geometry.num_words());
            if lb.geometry != geometry || lb.words.len() != geometry.num_words() || !written_ok {
                return Err(BitmapError::GeometryMismatch("the loaded bitmap has another geometry".into()));
            }
        }
        let bitmap = Arc::new(Bitmap::new(geometry)?);
        bitmap.first_write_needs_sync.store(options.first_write_needs_sync, Ordering::Release);
        let written = match initial {
            None => WrittenInit::Nothing,
            Some(LoadedBitmap { written: Some(w), .. }) => WrittenInit::Loaded(w),
            Some(_) => WrittenInit::Legacy,
        };
        let planner =
            Planner::with_written(&bitmap, initial.map(|lb| &lb.words[..]), written, options.clear_after_ticks);
        let slots = planner.page_slots();
        let mut pages = Vec::with_capacity(slots);
        for _ in 0..slots {
            let a = DmaBuf::zeroed(geometry.page_buf_bytes()).ok_or(BitmapError::NoMemory("bitmap page buffers"))?;
            let b = DmaBuf::zeroed(geometry.page_buf_bytes()).ok_or(BitmapError::NoMemory("bitmap page buffers"))?;
            pages.push(PageBufs { bufs: [a, b], pins: [0, 0] });
        }
        let st = State {
            planner,
            members,
            pages,
            batch: None,
            stop: Stop::Running,
            force_all: true,
            flush_waiters: Vec::new(),
            events_base: initial.map_or(0, |lb| lb.events_max),
            on_member_failed: None,
            on_needs_sync: None,
            late_completions: 0,
            preflushes: 0,
            ticks: 0,
        };
        Ok(BitmapOwner(Rc::new(Owner { bitmap, geometry, offset_blocks, st: RefCell::new(st) })))
    }

    /// The shared half, for the array's channels on every reactor.
    pub fn bitmap(&self) -> Arc<Bitmap> {
        self.0.bitmap.clone()
    }

    pub fn geometry(&self) -> &Geometry {
        &self.0.geometry
    }

    /// Registers the tick as a timed poller of the current reactor; it
    /// unregisters itself once the bitmap is stopped.
    pub fn start_poller(&self, period: Duration) -> PollerHandle {
        let me = self.clone();
        reactor::register_timed_poller("bitmap_tick", period, move || {
            if me.is_stopped() {
                return PollStatus::Done;
            }
            if me.tick() {
                PollStatus::Busy
            } else {
                PollStatus::Idle
            }
        })
    }

    /// Runs the protocol one step: when no batch is in flight, clears idle
    /// chunks and closes the next batch if anything needs persisting (or
    /// the final batch of a stop); while one is in flight, retries page
    /// writes that found no IO descriptor. Returns whether it started IO.
    pub fn tick(&self) -> bool {
        let owner = &self.0;
        let mut st = owner.st.borrow_mut();
        if matches!(st.stop, Stop::Closed) {
            return false;
        }
        st.ticks += 1;
        if st.batch.is_some() {
            let started = self.submit_retries(&mut st);
            let finished = st.batch.as_ref().is_some_and(Batch::done);
            drop(st);
            if finished {
                self.finish_batch();
            }
            return started;
        }
        let final_batch = matches!(st.stop, Stop::Requested(_)) && self.quiescent(&st);
        let opts = TickOptions { force_all_pages: st.force_all || final_batch, clear_idle_now: final_batch };
        let Some(plan) = st.planner.tick(&owner.bitmap, opts) else {
            return false;
        };
        let waiters = if opts.force_all_pages {
            st.force_all = false;
            std::mem::take(&mut st.flush_waiters)
        } else {
            Vec::new()
        };
        let stop_done = match (final_batch, &mut st.stop) {
            (true, Stop::Requested(done)) => std::mem::take(done),
            _ => Vec::new(),
        };
        let sel = (plan.seq & 1) as usize;
        let events = st.events_base + plan.seq;
        let g = owner.geometry;
        let state = &mut *st;
        for &slot in &plan.pages {
            let page_buffers = &state.pages[slot];
            // Invariant 5 (docs/architecture.md): a buffer a member may still be reading is never rebuilt.
            assert_eq!(page_buffers.pins[sel], 0, "bitmap page slot {slot} buffer {sel} rebuilt while in flight");
            let words = state.planner.page_words(slot);
            let (plane, page) = state.planner.slot_page(slot);
            let kind = match (state.planner.legacy(), plane) {
                (true, _) => PageKind::LEGACY,
                (false, Plane::Dirty) => PageKind::DIRTY,
                (false, Plane::Written) => PageKind::WRITTEN,
            };
            page_buffers.bufs[sel].with_mut(|b| encode_page_as(&g, kind, page, events, words, b));
        }
        let members = state.members.clone();
        let n = members.len();
        // Clearing a bit vouches that the chunk's data is on every member's
        // media: make it so first.
        let flush_queue = if plan.cleared_chunks > 0 && !plan.pages.is_empty() {
            (0..n).filter(|&m| needs_flush(&members[m])).collect()
        } else {
            Vec::new()
        };
        let mut batch = Batch {
            plan,
            sel,
            members,
            failed: vec![false; n],
            outstanding: 0,
            retry: Vec::new(),
            flush_queue,
            flushes_in_flight: 0,
            waiters,
            stop_done,
        };
        for &page in &batch.plan.pages {
            for m in 0..n {
                batch.retry.push((page, m));
            }
        }
        st.batch = Some(batch);
        let started = self.submit_retries(&mut st);
        let finished = st.batch.as_ref().is_some_and(Batch::done);
        drop(st);
        if finished {
            // Nothing to write (no changed page, no member, or every
            // member refused): the batch is complete now.
            self.finish_batch();
        }
        started
    }

    /// No write in flight or waiting, nothing pending: time for the final batch.
    fn quiescent(&self, st: &State) -> bool {
        let bm = &self.0.bitmap;
        st.batch.is_none()
            && bm.counters.iter().all(|c| c.load(Ordering::Acquire) & COUNT_MASK == 0)
            && bm.pending.iter().all(|w| w.load(Ordering::Acquire) == 0)
            && bm.wanted.load(Ordering::Acquire) <= bm.seq_write.load(Ordering::Acquire)
    }

    /// Submits the batch's pre-flushes, then (once every one completed) its
    /// queued page writes; those that find no IO descriptor stay queued.
    /// Returns whether any IO was submitted.
    fn submit_retries(&self, st: &mut State) -> bool {
        let owner = &self.0;
        let g = owner.geometry;
        let State { batch, pages, preflushes, .. } = st;
        let Some(batch) = batch.as_mut() else { return false };
        let mut started = false;
        if !batch.flush_queue.is_empty() {
            let done: Rc<dyn IoDone> = Rc::new(PreflushDone(self.0.clone()));
            for m in std::mem::take(&mut batch.flush_queue) {
                if batch.failed[m] {
                    continue;
                }
                let ch = match batch.members[m].channel() {
                    Ok(ch) => ch,
                    Err(e) => {
                        tracing::error!(member = batch.members[m].name(), "bitmap pre-flush impossible: {e}");
                        batch.failed[m] = true;
                        continue;
                    }
                };
                let Some(mut io) = IoBox::data(IoType::Flush, 0, 0, None) else {
                    batch.flush_queue.push(m);
                    continue;
                };
                io.tag2 = m as u64;
                io.set_done(done.clone());
                batch.outstanding += 1;
                batch.flushes_in_flight += 1;
                *preflushes += 1;
                started = true;
                ch.submit(io);
            }
        }
        if !batch.flush_queue.is_empty() || batch.flushes_in_flight > 0 {
            // No page goes out before every member's earlier writes are durable.
            return started;
        }
        let queued = std::mem::take(&mut batch.retry);
        if queued.is_empty() {
            return false;
        }
        let done: Rc<dyn IoDone> = Rc::new(PageWriteDone(self.0.clone()));
        for (page, m) in queued {
            if batch.failed[m] {
                continue;
            }
            let ch = match batch.members[m].channel() {
                Ok(ch) => ch,
                Err(e) => {
                    tracing::error!(member = batch.members[m].name(), "bitmap page write impossible: {e}");
                    batch.failed[m] = true;
                    continue;
                }
            };
            // Slot `s` is page `s % num_pages` of plane `s / num_pages`,
            // the planes one after the other (`Geometry::page_offset_blocks`).
            let lba = owner.offset_blocks + page as u64 * g.page_blocks();
            let buf = pages[page].bufs[batch.sel].clone();
            let Some(mut io) = IoBox::data(IoType::Write, lba, g.page_blocks(), Some(buf)) else {
                batch.retry.push((page, m));
                continue;
            };
            // Durable when it completes: the batch releases writes only then.
            io.flags = IoFlags::FUA;
            io.tag = page as u64;
            io.tag2 = m as u64;
            io.set_done(done.clone());
            pages[page].pins[batch.sel] += 1;
            batch.outstanding += 1;
            owner.bitmap.member_writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            started = true;
            ch.submit(io);
        }
        started
    }

    fn page_write_done(&self, io: IoBox) {
        if self.record_page_write(io) {
            self.finish_batch();
        }
    }

    /// Accounts one member's page write; true when it was the batch's last.
    fn record_page_write(&self, io: IoBox) -> bool {
        let mut st = self.0.st.borrow_mut();
        let st = &mut *st;
        let Some(batch) = st.batch.as_mut() else {
            st.late_completions += 1;
            tracing::error!("bitmap page write completed with no batch in flight");
            return false;
        };
        let (page, m) = (io.tag as usize, io.tag2 as usize);
        let pins = &mut st.pages[page].pins[batch.sel];
        assert!(*pins > 0 && batch.outstanding > 0, "bitmap page write completion without a write");
        *pins -= 1;
        batch.outstanding -= 1;
        if !io.status.is_ok() {
            tracing::error!(member = batch.members[m].name(), page, status = ?io.status, "bitmap page write failed");
            batch.failed[m] = true;
        }
        drop(io);
        batch.done()
    }

    /// One member's pre-flush completed: once all have, the page writes go
    /// out. A member whose flush failed gets none (it is reported failed).
    fn preflush_done(&self, io: IoBox) {
        let finished = {
            let mut st = self.0.st.borrow_mut();
            let st = &mut *st;
            let Some(batch) = st.batch.as_mut() else {
                st.late_completions += 1;
                tracing::error!("bitmap pre-flush completed with no batch in flight");
                return;
            };
            let m = io.tag2 as usize;
            assert!(
                batch.flushes_in_flight > 0 && batch.outstanding > 0 && m < batch.members.len(),
                "bitmap pre-flush completion without a flush"
            );
            batch.flushes_in_flight -= 1;
            batch.outstanding -= 1;
            if !io.status.is_ok() {
                tracing::error!(member = batch.members[m].name(), status = ?io.status, "bitmap pre-flush failed");
                batch.failed[m] = true;
            }
            drop(io);
            self.submit_retries(st);
            st.batch.as_ref().is_some_and(Batch::done)
        };
        if finished {
            self.finish_batch();
        }
    }

    /// The batch's page writes all completed: failed members are reported
    /// (and dropped) first, then the batch is published, its writes
    /// released, and waiters called.
    fn finish_batch(&self) {
        let owner = &self.0;
        let (failed, hook) = {
            let mut st = owner.st.borrow_mut();
            let Some(batch) = st.batch.as_ref() else { return };
            let failed: Vec<BdevHandle> =
                batch.members.iter().zip(&batch.failed).filter(|(_, f)| **f).map(|(m, _)| m.clone()).collect();
            st.members.retain(|m| !failed.iter().any(|f| f.same(m)));
            (failed, st.on_member_failed.clone())
        };
        for m in &failed {
            tracing::error!(member = m.name(), "member dropped from the bitmap after a failed page write");
            if let Some(hook) = &hook {
                hook(m);
            }
        }
        let callbacks = {
            let mut st = owner.st.borrow_mut();
            let Some(batch) = st.batch.take() else { return };
            debug_assert!(batch.outstanding == 0);
            if batch.members.len() == failed.len() && !batch.plan.pages.is_empty() {
                tracing::error!(seq = batch.plan.seq, "bitmap batch persisted on no member: no active member left");
            }
            st.planner.complete(&owner.bitmap, &batch.plan);
            let mut callbacks = batch.waiters;
            if batch.plan.has_first_writes() && owner.bitmap.first_write_needs_sync() {
                if let Some(hook) = st.on_needs_sync.clone() {
                    callbacks.push(Box::new(move || hook()));
                }
            }
            if !batch.stop_done.is_empty() {
                st.stop = Stop::Closed;
                owner.bitmap.closed.store(true, Ordering::Release);
                tracing::info!(seq = batch.plan.seq, "bitmap stopped after its final batch");
                callbacks.extend(batch.stop_done);
            }
            callbacks
        };
        for cb in callbacks {
            cb();
        }
    }

    /// Forces every page to be written to every member in the next batch
    /// and calls `done` once that batch completed.
    pub fn flush(&self, done: impl FnOnce() + 'static) {
        let mut st = self.0.st.borrow_mut();
        if matches!(st.stop, Stop::Closed) {
            drop(st);
            return done();
        }
        st.force_all = true;
        st.flush_waiters.push(Box::new(done));
    }

    /// Replaces the active members (under the RAID's suspend). A member
    /// that was not active before gets every page in the next batch, and
    /// `done` runs after that batch; with no new member it runs at once.
    /// The batch in flight, if any, finishes on the members it started on.
    pub fn set_members(&self, members: Vec<BdevHandle>, done: impl FnOnce() + 'static) -> Result<(), BitmapError> {
        for m in &members {
            let legacy = self.0.st.borrow().planner.legacy();
            check_member(&self.0.geometry, legacy, self.0.offset_blocks, m)?;
        }
        let mut st = self.0.st.borrow_mut();
        if matches!(st.stop, Stop::Closed) {
            return Err(BitmapError::Closed);
        }
        let added = members.iter().any(|m| !st.members.iter().any(|o| o.same(m)));
        st.members = members;
        if added {
            st.force_all = true;
            st.flush_waiters.push(Box::new(done));
        } else {
            drop(st);
            done();
        }
        Ok(())
    }

    pub fn members(&self) -> Vec<BdevHandle> {
        self.0.st.borrow().members.clone()
    }

    /// See [`Bitmap::set_in_sync`].
    pub fn set_in_sync(&self, in_sync: bool) {
        self.0.bitmap.set_in_sync(in_sync);
    }

    /// Chunks `chunks` were resynced: clear them (lazily, as idle chunks)
    /// even while the array as a whole is not in sync.
    /// Their redundancy was computed from their data: they no longer need
    /// sync either.
    pub fn mark_resynced(&self, chunks: std::ops::Range<u64>) {
        self.0.bitmap.mark_synced(chunks.clone());
        self.0.st.borrow_mut().planner.mark_resynced(chunks);
    }

    /// Called with a member whose page write failed, before the batch
    /// releases any write: the RAID must fail the member there.
    pub fn on_member_failed(&self, hook: impl Fn(&BdevHandle) + 'static) {
        self.0.st.borrow_mut().on_member_failed = Some(Rc::new(hook));
    }

    /// Called (on the owner reactor, after the batch's waiters) when a
    /// completed batch left chunks needing sync: the RAID schedules the
    /// pass that computes their redundancy.
    pub fn on_needs_sync(&self, hook: impl Fn() + 'static) {
        self.0.st.borrow_mut().on_needs_sync = Some(Rc::new(hook));
    }

    /// Whether the bitmap writes version 1 pages (the dirty plane only).
    pub fn legacy_format(&self) -> bool {
        self.0.st.borrow().planner.legacy()
    }

    /// Stops the bitmap: waits for the batch in flight and for every write
    /// in flight or waiting (ticks keep running batches meanwhile), writes a
    /// final batch with every page (clearing all chunks if in sync), then
    /// calls `done`. After `done` no completion touches the bitmap and
    /// `start_write` returns `Closed`. The RAID holds new IO (suspend) first.
    pub fn flush_and_stop(&self, done: impl FnOnce() + 'static) {
        {
            let mut st = self.0.st.borrow_mut();
            match &mut st.stop {
                Stop::Closed => {
                    drop(st);
                    return done();
                }
                Stop::Requested(list) => list.push(Box::new(done)),
                Stop::Running => st.stop = Stop::Requested(vec![Box::new(done)]),
            }
        }
        self.tick();
    }

    /// Stopped: the final batch completed.
    pub fn is_stopped(&self) -> bool {
        matches!(self.0.st.borrow().stop, Stop::Closed)
    }

    /// A batch is in flight.
    pub fn batch_in_flight(&self) -> bool {
        self.0.st.borrow().batch.is_some()
    }

    /// Completions that arrived with no batch in flight (a bug if not 0).
    pub fn late_completions(&self) -> u64 {
        self.0.st.borrow().late_completions
    }

    /// Member flushes issued ahead of batches that clear bits.
    pub fn preflushes(&self) -> u64 {
        self.0.st.borrow().preflushes
    }

    /// Ticks run so far.
    pub fn ticks(&self) -> u64 {
        self.0.st.borrow().ticks
    }

    /// A copy of page `page`'s buffer `sel` (tests of invariant 5, docs/architecture.md).
    pub fn page_buffer(&self, page: usize, sel: usize) -> Option<(Vec<u8>, u32)> {
        let st = self.0.st.borrow();
        let page_buffers = st.pages.get(page)?;
        Some((page_buffers.bufs.get(sel)?.to_vec(), page_buffers.pins[sel & 1]))
    }

    #[cfg(test)]
    pub(crate) fn set_release_early(&self, on: bool) {
        self.0.st.borrow_mut().planner.release_early = on;
    }
}

/// Completion of one member's page write: holds the owner's state alive.
struct PageWriteDone(Rc<Owner>);

impl IoDone for PageWriteDone {
    fn io_done(&self, io: IoBox) {
        BitmapOwner(self.0.clone()).page_write_done(io);
    }
}

/// Completion of one member's pre-flush.
struct PreflushDone(Rc<Owner>);

impl IoDone for PreflushDone {
    fn io_done(&self, io: IoBox) {
        BitmapOwner(self.0.clone()).preflush_done(io);
    }
}

impl Batch {
    /// Nothing in flight and nothing left to submit.
    fn done(&self) -> bool {
        self.outstanding == 0 && self.retry.is_empty() && self.flush_queue.is_empty()
    }
}

/// Whether `m` needs a flush before a clearing batch: it has a volatile
/// write cache (and, as every such bdev must, takes flushes).
fn needs_flush(m: &BdevHandle) -> bool {
    m.bdev().has_write_cache() && m.bdev().io_type_supported(IoType::Flush)
}
