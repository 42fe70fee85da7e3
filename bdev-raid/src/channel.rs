//! One reactor's state for one array (`ArrayChannel`) and the IO path through it:
//! admission through the quiesce gate, the bitmap mark and serialization of
//! write-like IO with the owner's range table, then the level's mapping
//! onto member IO (`RaidLevel::submit_rw`, which builds children with the
//! primitives here), member failures, and completion.
//!
//! Everything here runs on the reactor that owns the `ArrayChannel`; the only state
//! other reactors touch is in `ArrayShared` (atomics and the control mutex).
//! Parent IOs are parked in an `IoSlab`; each child carries the slot in `tag`
//! and its member index (plus, for reads, the set of members tried) in
//! `tag2`. The hot path allocates nothing: children come from the reactor's
//! IO pool, buffers are slices of the parent's, messages are `send_raw`.

use crate::array::{ArrayShared, Role};
use crate::level::Level;
use crate::map::{Geometry, Loc};
use crate::owner::OwnerPart;
use crate::quiesce::Gate;
use crate::range_table::{words, Acquired};
use bdev::{
    BdevChannel, BdevError, BdevIo, Channel, DmaBuf, IoBox, IoDone, IoError, IoFlags, IoSlab, IoStatus, IoType,
};
use bitmap::{Bitmap, WriteTicket};
use reactor::{PollStatus, PollerHandle, ReactorId};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;

const NO_LOCK: u32 = u32::MAX;
const MEMBER_MASK: u64 = 0xff;
const TRIED_SHIFT: u32 = 8;

/// A member as this reactor sees it (refreshed only while the array is
/// suspended, so never while a child IO is in flight).
pub(crate) struct MemberChannel {
    pub ch: Option<Rc<Channel>>,
    pub role: Role,
    pub data_offset_blocks: u64,
    /// The member has a volatile write cache but the array told its users
    /// it has none (the member joined later): every write to it carries FUA,
    /// so a completed array write is durable as promised.
    pub force_fua: bool,
    /// Children in flight on this reactor: read balancing picks the fewest.
    pub outstanding: Cell<u32>,
}

/// What a parked parent is waiting for before it reaches any member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// Nothing (children in flight, or about to be built).
    None,
    /// Its bitmap batch (it is in `bm_wait`).
    Bitmap,
    /// Its range in the owner's serialization table.
    Lock,
    /// Aborted while waiting for its range: the user's IO has completed and
    /// a placeholder holds the slot until the grant arrives, which is then
    /// released at once (the table stays consistent without a cancel).
    AbortedLock,
}

#[derive(Clone, Copy)]
struct ParentCtx {
    remaining: u32,
    /// First error that fails the IO.
    error: Option<IoError>,
    /// A copy of a redundant write failed (its member is now failed): the
    /// IO succeeds only if every extent kept a surviving copy.
    copy_failed: bool,
    /// Range-table entry held by this write (granted), or `NO_LOCK`.
    lock: u32,
    /// The write marked its chunks in the bitmap: `end_write` at finish.
    marked: bool,
    wait: Wait,
}

/// What a level needs of a parked parent to map it: (type, flags), offset
/// and length in blocks, buffer.
pub(crate) type ParentArgs = ((IoType, IoFlags), u64, u64, Option<DmaBuf>);

/// Per-parent scratch of a level whose IO runs in rounds (raid5: read the
/// rest of a stripe, then write data and parity): which round it is in
/// and the stripe buffer it computes in. Dropped (the buffer back to the
/// reactor's DMA pool) when the parent finishes.
#[derive(Default)]
pub(crate) struct LevelSlot {
    pub phase: u8,
    /// The member sets the level planned the IO with (raid5: the members
    /// it may not read, and those it may not write; bit per slot): later
    /// rounds follow the plan even if another member fails meanwhile.
    pub plan_masks: (u32, u32),
    /// The level planned the IO trusting the old redundancy (see
    /// `ArrayShared::redundancy_verified`).
    pub plan_trusted: bool,
    pub buf: Option<DmaBuf>,
}

impl ParentCtx {
    const NEW: ParentCtx =
        ParentCtx { remaining: 0, error: None, copy_failed: false, lock: NO_LOCK, marked: false, wait: Wait::None };
}

/// Per-reactor, per-array state. (`pub` only so that the level trait may
/// name it; its module is private, so nothing outside the crate can.)
pub struct ArrayChannel {
    pub(crate) shared: Arc<ArrayShared>,
    pub(crate) me: ReactorId,
    weak: Weak<ArrayChannel>,
    pub(crate) gate: RefCell<Gate<IoBox>>,
    pub(crate) members: RefCell<Vec<MemberChannel>>,
    pub(crate) geo: RefCell<Option<Arc<Geometry>>>,
    pub(crate) block_size: Cell<u64>,
    parents: RefCell<IoSlab>,
    ctx: RefCell<Vec<ParentCtx>>,
    /// The level's per-parent scratch, indexed like `ctx`.
    level_slots: RefCell<Vec<LevelSlot>>,
    /// Children of one write, built before any is submitted (reused: its
    /// capacity grows to the largest fan-out, then no more allocation).
    scratch: RefCell<Vec<IoBox>>,
    /// The write-intent bitmap's shared half (arrays with one).
    bitmap: RefCell<Option<Arc<Bitmap>>>,
    /// Writes waiting for their bitmap batch: (parent slot, batch), in order.
    bm_wait: RefCell<VecDeque<(u32, u64)>>,
    /// Releases `bm_wait` and `meta_wait`; registered while either holds a write.
    wait_poller: RefCell<Option<PollerHandle>>,
    /// Writes that succeeded only on surviving copies, waiting until the
    /// failure is recorded in the superblock (parent slots).
    meta_wait: RefCell<VecDeque<u32>>,
    /// Reads go to the lowest-numbered active copy (a resync is owed).
    prefer_first: Cell<bool>,
    /// Present on the owner reactor only.
    pub(crate) owner: Option<OwnerPart>,
}

/// The `BdevChannel` the registry hands out: a thin handle on the `ArrayChannel`.
pub(crate) struct RaidChannel(pub Rc<ArrayChannel>);

impl BdevChannel for RaidChannel {
    fn submit(&self, io: IoBox) {
        self.0.submit(io);
    }

    fn abort(&self, matches: &dyn Fn(&BdevIo) -> bool) -> bool {
        self.0.abort(matches)
    }
}

/// The arrays this reactor has state for (few: a linear scan).
#[derive(Default)]
pub(crate) struct RaidLocal {
    arrays: RefCell<Vec<Rc<ArrayChannel>>>,
}

/// This reactor's state for the array with `key`, if any.
pub(crate) fn find_channel(key: u32) -> Option<Rc<ArrayChannel>> {
    let local = reactor::local::<RaidLocal>();
    let arrays = local.arrays.borrow();
    arrays.iter().find(|r| r.shared.key == key).cloned()
}

/// This reactor's state for `shared`, created (and loaded from the current
/// membership) on first use; None once the array is torn down.
pub(crate) fn channel_for(shared: &Arc<ArrayShared>) -> Option<Rc<ArrayChannel>> {
    if let Some(r) = find_channel(shared.key) {
        return Some(r);
    }
    if shared.torn_down.load(Ordering::Acquire) {
        return None;
    }
    let me = reactor::current()?;
    let owner = (me == shared.owner).then(|| OwnerPart::new(shared));
    let channel = Rc::new_cyclic(|weak| ArrayChannel {
        shared: shared.clone(),
        me,
        weak: weak.clone(),
        gate: RefCell::new(Gate::new(bdev::io::pool_size())),
        members: RefCell::new(Vec::new()),
        geo: RefCell::new(None),
        block_size: Cell::new(512),
        parents: RefCell::new(IoSlab::with_capacity(1024)),
        ctx: RefCell::new(vec![ParentCtx::NEW; 1024]),
        level_slots: RefCell::new((0..1024).map(|_| LevelSlot::default()).collect()),
        scratch: RefCell::new(Vec::with_capacity(64)),
        bitmap: RefCell::new(None),
        bm_wait: RefCell::new(VecDeque::with_capacity(1024)),
        wait_poller: RefCell::new(None),
        meta_wait: RefCell::new(VecDeque::new()),
        prefer_first: Cell::new(false),
        owner,
    });
    channel.refresh();
    reactor::local::<RaidLocal>().arrays.borrow_mut().push(channel.clone());
    Some(channel)
}

/// Forgets this reactor's state for the array (teardown).
pub(crate) fn drop_channel(key: u32) -> Option<Rc<ArrayChannel>> {
    let local = reactor::local::<RaidLocal>();
    let mut arrays = local.arrays.borrow_mut();
    let i = arrays.iter().position(|r| r.shared.key == key)?;
    Some(arrays.swap_remove(i))
}

impl ArrayChannel {
    pub(crate) fn rc(&self) -> Rc<ArrayChannel> {
        self.weak.upgrade().unwrap_or_else(|| unreachable!("a ArrayChannel is used only through its Rc"))
    }

    fn level(&self) -> Level {
        self.shared.level
    }

    /// Reloads members and geometry from the control state. Called when the
    /// `ArrayChannel` is created and at every resume: both times no child IO of this
    /// reactor is in flight.
    pub(crate) fn refresh(&self) {
        let (slots, geo, block_size, array_write_cache) = {
            let control = self.shared.control();
            *self.bitmap.borrow_mut() = control.bitmap.clone();
            self.prefer_first.set(control.dirty.is_some());
            (control.slots.clone(), self.shared.geometry.get().cloned(), control.block_size, control.write_cache)
        };
        let members = slots
            .iter()
            .map(|s| MemberChannel {
                ch: match s.role {
                    Role::Active | Role::Rebuilding => s.handle.as_ref().and_then(|h| h.channel().ok()),
                    _ => None,
                },
                role: s.role,
                data_offset_blocks: s.data_offset_blocks,
                force_fua: !array_write_cache && s.handle.as_ref().is_some_and(|h| h.bdev().has_write_cache()),
                outstanding: Cell::new(0),
            })
            .collect();
        *self.members.borrow_mut() = members;
        *self.geo.borrow_mut() = geo;
        if block_size > 0 {
            self.block_size.set(block_size as u64);
        }
    }

    /// Entry from the bdev layer.
    pub(crate) fn submit(&self, io: IoBox) {
        if self.shared.deleted.load(Ordering::Acquire) {
            return io.fail(IoError::NoDevice);
        }
        let admitted = self.gate.borrow_mut().try_enter();
        if !admitted {
            let refused = self.gate.borrow_mut().hold(io);
            if let Err(io) = refused {
                io.fail(IoError::NoMemory);
            }
            return;
        }
        let t = io.io_type;
        let slot = self.park(io);
        match t {
            IoType::Read => self.level().submit_rw(self, slot),
            IoType::Write | IoType::Unmap | IoType::WriteZeroes => self.mark(slot),
            IoType::Flush | IoType::Reset => self.level().submit_null_payload(self, slot),
        }
    }

    /// Marks a write's chunks in the bitmap (invariant 2, docs/architecture.md): it goes on at
    /// once when their bits are on disk already, else after the batch that
    /// persists them.
    fn mark(&self, slot: u32) {
        let ticket = {
            let bm = self.bitmap.borrow();
            let Some(bm) = bm.as_ref() else {
                drop(bm);
                return self.write_marked(slot);
            };
            let parents = self.parents.borrow();
            let Some(io) = parents.get(slot) else {
                drop((parents, bm));
                // Nothing parked: there is no IO to answer.
                return self.impossible("a write to mark in the bitmap is not parked");
            };
            bm.start_write(io.offset_blocks, io.num_blocks)
        };
        match ticket {
            Ok(WriteTicket::Ready) => {
                self.ctx.borrow_mut()[slot as usize].marked = true;
                self.write_marked(slot);
            }
            Ok(WriteTicket::Wait(batch)) => {
                {
                    let mut ctx = self.ctx.borrow_mut();
                    ctx[slot as usize].marked = true;
                    ctx[slot as usize].wait = Wait::Bitmap;
                }
                self.bm_wait.borrow_mut().push_back((slot, batch));
                self.ensure_wait_poller();
            }
            Ok(WriteTicket::Closed) | Err(_) => self.finish(slot, IoStatus::Failed(IoError::NoDevice)),
        }
    }

    /// Registers the poller that releases waiting writes (`release_waiting`).
    fn ensure_wait_poller(&self) {
        if self.wait_poller.borrow().is_some() {
            return;
        }
        let weak = self.weak.clone();
        let p = reactor::register_poller("raid_bitmap_wait", move || {
            let Some(channel) = weak.upgrade() else { return PollStatus::Done };
            channel.release_waiting()
        });
        *self.wait_poller.borrow_mut() = Some(p);
    }

    /// Writes whose bitmap batch is on disk go on, oldest first; writes
    /// waiting for a failure to be recorded complete once it is.
    fn release_waiting(&self) -> PollStatus {
        loop {
            let next = {
                let bm = self.bitmap.borrow();
                let mut q = self.bm_wait.borrow_mut();
                match (q.front(), bm.as_ref()) {
                    (Some(&(slot, batch)), Some(bm)) if bm.is_released(batch) => {
                        q.pop_front();
                        Some(slot)
                    }
                    // No bitmap to wait for (cannot happen: an array never
                    // loses its bitmap): never let such a write through.
                    (Some(&(slot, _)), None) => {
                        q.pop_front();
                        drop((q, bm));
                        self.finish(slot, IoStatus::Failed(IoError::NoDevice));
                        self.impossible("a write waits for a batch of a bitmap the array does not have");
                        continue;
                    }
                    _ => None,
                }
            };
            let Some(slot) = next else { break };
            self.ctx.borrow_mut()[slot as usize].wait = Wait::None;
            self.write_marked(slot);
        }
        let failed = self.shared.failed_mask.load(Ordering::Acquire);
        let recorded = failed & !self.shared.recorded_mask.load(Ordering::Acquire) == 0;
        // (No escape for a deleted array: teardown waits for these writes,
        // and the owner's superblock write sets the bits whatever happens.)
        if recorded {
            loop {
                let next = self.meta_wait.borrow_mut().pop_front();
                let Some(slot) = next else { break };
                self.finish(slot, IoStatus::Success);
            }
        }
        if self.bm_wait.borrow().is_empty() && self.meta_wait.borrow().is_empty() {
            self.wait_poller.borrow_mut().take();
            return PollStatus::Done;
        }
        // The reactor stays awake while writes wait: their batch completes
        // within a tick or two.
        PollStatus::Busy
    }

    /// A write whose bits are on disk: serialize, then fan out.
    fn write_marked(&self, slot: u32) {
        // Test-only switch (see `RaidArray::set_serialization`).
        if self.shared.serialize.load(Ordering::Relaxed) {
            self.acquire(slot);
        } else {
            self.level().submit_rw(self, slot);
        }
    }

    fn park(&self, io: IoBox) -> u32 {
        let slot = self.parents.borrow_mut().insert(io);
        let mut ctx = self.ctx.borrow_mut();
        if slot as usize >= ctx.len() {
            ctx.resize(slot as usize + 1, ParentCtx::NEW);
        }
        ctx[slot as usize] = ParentCtx::NEW;
        let mut ls = self.level_slots.borrow_mut();
        if slot as usize >= ls.len() {
            ls.resize_with(slot as usize + 1, LevelSlot::default);
        }
        ls[slot as usize] = LevelSlot::default();
        slot
    }

    /// Completes a parked parent and lets the gate count it out.
    pub(crate) fn finish(&self, slot: u32, status: IoStatus) {
        let ctx = std::mem::replace(&mut self.ctx.borrow_mut()[slot as usize], ParentCtx::NEW);
        let io = self.parents.borrow_mut().take(slot);
        // The level's stripe buffer goes back to the pool (no child holds it now).
        let level_buf = self.level_slots.borrow_mut().get_mut(slot as usize).and_then(|l| l.buf.take());
        drop(level_buf);
        if ctx.lock != NO_LOCK {
            self.release_lock(ctx.lock);
        }
        if ctx.marked {
            // Every member write of it has completed: the chunk may go idle.
            if let (Some(bm), Some(io)) = (self.bitmap.borrow().as_ref(), io.as_ref()) {
                let _ = bm.end_write(io.offset_blocks, io.num_blocks);
            }
        }
        match io {
            // Aborted while it waited for its range: the user's IO completed
            // then; the placeholder that kept the slot goes back to the pool.
            Some(placeholder) if ctx.wait == Wait::AbortedLock => drop(placeholder),
            Some(io) => io.complete(status),
            // Finished twice, or never parked: the gate has no entry of it
            // to count out, and there is no IO left to answer.
            None => return self.impossible("finish of a slot with no parked IO"),
        }
        self.exit_gate();
    }

    /// A state the IO path believes cannot happen (STYLE: an impossible
    /// state is loud): counted (`impossible_events` in
    /// `bdev_raid_get_bdevs`), logged, and fatal in debug builds. Callers
    /// first answer whatever IO is left, so no host waits for it forever.
    pub(crate) fn impossible(&self, what: &'static str) {
        self.shared.impossible_events.fetch_add(1, Ordering::Relaxed);
        tracing::error!(raid = %self.shared.name, "impossible IO state: {what}");
        debug_assert!(false, "raid {}: impossible IO state: {what}", self.shared.name);
    }

    // ---- abort ---------------------------------------------------------

    /// Aborts the first IO that `matches` among those this reactor holds
    /// before they reach a member: held by a suspend, waiting for a bitmap
    /// batch, or waiting for its range. It completes with `Aborted`; its
    /// bitmap mark ends and its range entry is given back (at once, or when
    /// granted), so nothing leaks and nothing is released twice. An IO with
    /// children at the members, or one that reached them and now waits for a
    /// failure to be recorded, cannot be called back: false.
    pub(crate) fn abort(&self, matches: &dyn Fn(&BdevIo) -> bool) -> bool {
        // Held by a suspend: never admitted, nothing to undo.
        let held = self.gate.borrow_mut().take_held(|io| matches(io));
        if let Some(io) = held {
            io.fail(IoError::Aborted);
            return true;
        }
        // Waiting for its bitmap batch: marked, not serialized yet.
        let waiting = {
            let parents = self.parents.borrow();
            let mut q = self.bm_wait.borrow_mut();
            let at = q.iter().position(|&(slot, _)| parents.get(slot).is_some_and(|io| matches(io)));
            at.and_then(|i| q.remove(i))
        };
        if let Some((slot, _)) = waiting {
            self.finish(slot, IoStatus::Failed(IoError::Aborted));
            return true;
        }
        // Waiting for its range at the owner: the table entry cannot be
        // pulled out from here (it may be granted already, the grant on its
        // way), so a placeholder keeps the slot until the grant comes and
        // `granted` releases the range at once. The gate keeps counting it,
        // so a suspend still waits for that release.
        let slot = {
            let parents = self.parents.borrow();
            let ctx = self.ctx.borrow();
            (0..ctx.len() as u32)
                .find(|&i| ctx[i as usize].wait == Wait::Lock && parents.get(i).is_some_and(|io| matches(io)))
        };
        let Some(slot) = slot else { return false };
        // No descriptor for the placeholder: the IO goes on unaborted.
        let Some(placeholder) = IoBox::alloc() else { return false };
        let io = match self.parents.borrow_mut().get_mut(slot) {
            Some(parked) => std::mem::replace(parked, placeholder),
            None => return false,
        };
        let marked = {
            let mut ctx = self.ctx.borrow_mut();
            let c = &mut ctx[slot as usize];
            c.wait = Wait::AbortedLock;
            std::mem::take(&mut c.marked)
        };
        if marked {
            if let Some(bm) = self.bitmap.borrow().as_ref() {
                let _ = bm.end_write(io.offset_blocks, io.num_blocks);
            }
        }
        io.fail(IoError::Aborted);
        true
    }

    /// An admitted piece of work (user IO or a rebuild window) ended.
    pub(crate) fn exit_gate(&self) {
        let ack = self.gate.borrow_mut().exit();
        if let Some(epoch) = ack {
            crate::owner::send_drained(&self.shared, epoch);
        }
    }

    // ---- serialization -------------------------------------------------

    fn acquire(&self, slot: u32) {
        let (start, num_blocks) = {
            let parents = self.parents.borrow();
            let Some(io) = parents.get(slot) else {
                drop(parents);
                return self.impossible("a write to serialize is not parked");
            };
            (io.offset_blocks, io.num_blocks)
        };
        // The level may lock more than the IO touches (raid5: whole stripes,
        // so two writes never compute parity from each other's half-written data).
        let (start, num_blocks) = match self.geo.borrow().as_deref() {
            Some(g) if self.shared.widen_lock.load(Ordering::Relaxed) => {
                let r = self.level().lock_range(g, start, num_blocks);
                (r.start, r.end - r.start)
            }
            _ => (start, num_blocks),
        };
        if let Some(owner) = &self.owner {
            // On the owner: a direct call, no message; a range granted at
            // once goes on without the checks a grant from the queue needs.
            let r = owner.table.borrow_mut().acquire(start, start + num_blocks, words::waiter(self.me, slot));
            match r {
                Acquired::Granted(entry) => {
                    self.ctx.borrow_mut()[slot as usize].lock = entry;
                    self.level().submit_rw(self, slot);
                }
                Acquired::Waiting(_) => self.ctx.borrow_mut()[slot as usize].wait = Wait::Lock,
            }
            return;
        }
        self.ctx.borrow_mut()[slot as usize].wait = Wait::Lock;
        match words::encode_acquire(self.shared.key, self.me, slot, start, num_blocks) {
            Some((a, b)) => reactor::send_raw(self.shared.owner, on_acquire_msg, a, b),
            None => self.finish(slot, IoStatus::Failed(IoError::NoMemory)),
        }
    }

    /// The write in `slot` holds table entry `entry`: fan it out (or, for
    /// an aborted one, give the range straight back). `NO_LOCK`: the owner
    /// refused the request (see `on_acquire_msg`).
    pub(crate) fn granted(&self, slot: u32, entry: u32) {
        if entry == NO_LOCK {
            return self.finish(slot, IoStatus::Failed(IoError::NoDevice));
        }
        let wait = {
            let parked = self.parents.borrow().get(slot).is_some();
            let mut ctx = self.ctx.borrow_mut();
            match ctx.get_mut(slot as usize) {
                Some(c) if parked && c.lock == NO_LOCK && matches!(c.wait, Wait::Lock | Wait::AbortedLock) => {
                    c.lock = entry;
                    if c.wait == Wait::Lock {
                        c.wait = Wait::None;
                    }
                    Some(c.wait)
                }
                _ => None,
            }
        };
        match wait {
            Some(Wait::AbortedLock) => self.finish(slot, IoStatus::Failed(IoError::Aborted)),
            Some(_) => self.level().submit_rw(self, slot),
            None => {
                // Give the range back, or every write overlapping it would
                // wait for it forever.
                self.release_lock(entry);
                self.impossible("a range grant for a write that is not waiting for one");
            }
        }
    }

    fn release_lock(&self, entry: u32) {
        if let Some(owner) = &self.owner {
            owner.release(self, entry);
        } else {
            reactor::send_raw(self.shared.owner, on_release_msg, self.shared.key as u64, entry as u64);
        }
    }

    // ---- what levels build member IO with ------------------------------

    /// Usable for reading and as a surviving copy: active, not failed.
    #[inline]
    pub(crate) fn active(members: &[MemberChannel], failed_mask: u32, m: usize) -> bool {
        members.get(m).is_some_and(|mc| mc.role == Role::Active && mc.ch.is_some()) && failed_mask & (1 << m) == 0
    }

    /// Receives writes: active, or being rebuilt.
    #[inline]
    pub(crate) fn writable(members: &[MemberChannel], failed_mask: u32, m: usize) -> bool {
        members.get(m).is_some_and(|mc| matches!(mc.role, Role::Active | Role::Rebuilding) && mc.ch.is_some())
            && failed_mask & (1 << m) == 0
    }

    /// The parked parent's type and flags, and range: `parent_args` without
    /// the buffer (no reference taken on it).
    pub(crate) fn parent_range(&self, slot: u32) -> Option<((IoType, IoFlags), u64, u64)> {
        let parents = self.parents.borrow();
        let io = parents.get(slot)?;
        Some(((io.io_type, io.flags), io.offset_blocks, io.num_blocks))
    }

    /// The parked parent's type and flags, range and buffer.
    pub(crate) fn parent_args(&self, slot: u32) -> Option<ParentArgs> {
        let parents = self.parents.borrow();
        let io = parents.get(slot)?;
        Some(((io.io_type, io.flags), io.offset_blocks, io.num_blocks, io.buf.clone()))
    }

    /// The parent in `slot` waits for `count` children, which the caller
    /// submits next (each one counts out, also one that fails to start).
    /// `copy_failed`: it succeeds only if every extent keeps a surviving
    /// copy, once the failures are recorded (see `complete_parent`).
    pub(crate) fn expect_children(&self, slot: u32, count: u32, copy_failed: bool) {
        let mut ctx = self.ctx.borrow_mut();
        ctx[slot as usize].remaining = count;
        if copy_failed {
            ctx[slot as usize].copy_failed = true;
        }
    }

    /// The reusable vector for building a fan-out before submitting any of
    /// it; give it back with `put_scratch` (its capacity grows to the largest
    /// fan-out, then nothing is allocated).
    pub(crate) fn take_scratch(&self) -> Vec<IoBox> {
        std::mem::take(&mut *self.scratch.borrow_mut())
    }

    pub(crate) fn put_scratch(&self, children: Vec<IoBox>) {
        let empty = std::mem::replace(&mut *self.scratch.borrow_mut(), children);
        if empty.capacity() == 0 {
            // What `take_scratch` left: nothing to free (skips the call that
            // drops a vector of IOs).
            std::mem::forget(empty);
        }
    }

    /// The write-intent bitmap's shared half (arrays with one): a parity
    /// level asks it which chunks were written and which it may trust.
    pub(crate) fn bitmap_ref(&self) -> std::cell::Ref<'_, Option<Arc<Bitmap>>> {
        self.bitmap.borrow()
    }

    /// A resync is owed: reads go to the lowest-numbered active copy, so
    /// they do not flip between copies that may differ.
    pub(crate) fn reads_prefer_first(&self) -> bool {
        self.prefer_first.get()
    }

    /// The member a child was sent to, and the members its read tried before.
    pub(crate) fn child_member(child: &BdevIo) -> (usize, u32) {
        ((child.tag2 & MEMBER_MASK) as usize, (child.tag2 >> TRIED_SHIFT) as u32)
    }

    /// Flush and reset: every member that receives writes (active or being
    /// rebuilt, not failed); the parent completes after the last of them.
    /// A flush reaches every such member whether or not it reports a write
    /// cache: the cost is nothing where there is none, and a member's cache
    /// may be below a layer that does not report it.
    pub(crate) fn dispatch_all(&self, slot: u32) {
        let Some((op, ..)) = self.parent_args(slot) else {
            return self.impossible("a flush or reset to dispatch is not parked");
        };
        let members = self.members.borrow();
        let failed = self.shared.failed_mask.load(Ordering::Acquire);
        let targets = (0..members.len()).filter(|&m| Self::writable(&members, failed, m));
        let count = targets.clone().count() as u32;
        if count == 0 || (IoBox::available() as u64) < count as u64 {
            drop(members);
            let e = if count == 0 { IoError::NoDevice } else { IoError::NoMemory };
            return self.finish(slot, IoStatus::Failed(e));
        }
        self.ctx.borrow_mut()[slot as usize].remaining = count;
        for m in targets {
            // Offsets are member-relative; flush and reset ignore them.
            let l = Loc { member: m as u16, offset_blocks: 0 };
            self.submit_child(&members, slot, op, (l, None), 0, 0);
        }
    }

    /// Builds a child for `target` and sends it (see `make_child`).
    pub(crate) fn submit_child(
        &self,
        members: &[MemberChannel],
        slot: u32,
        op: (IoType, IoFlags),
        target: (Loc, Option<DmaBuf>),
        num_blocks: u64,
        tried: u32,
    ) {
        match Self::make_child(members, slot, op, target, num_blocks, tried) {
            Some(child) => self.send_child(members, child),
            None => self.child_failed_to_start(slot, IoError::NoMemory),
        }
    }

    /// A child IO for `l` (None: out of descriptors, or no channel). It
    /// carries the parent's flags: a FUA write is FUA on every member write
    /// it produces.
    pub(crate) fn make_child(
        members: &[MemberChannel],
        slot: u32,
        (t, flags): (IoType, IoFlags),
        (l, buf): (Loc, Option<DmaBuf>),
        num_blocks: u64,
        tried: u32,
    ) -> Option<IoBox> {
        let mc = members.get(l.member as usize)?;
        mc.ch.as_ref()?;
        let mut child = IoBox::data(t, l.offset_blocks + mc.data_offset_blocks, num_blocks, buf)?;
        child.flags = flags;
        if mc.force_fua && matches!(t, IoType::Write | IoType::WriteZeroes) {
            child.flags.insert(IoFlags::FUA);
        }
        child.tag = slot as u64;
        child.tag2 = l.member as u64 | (tried as u64) << TRIED_SHIFT;
        Some(child)
    }

    /// Sends a child built by `make_child` to its member.
    pub(crate) fn send_child(&self, members: &[MemberChannel], mut child: IoBox) {
        let mc = &members[(child.tag2 & MEMBER_MASK) as usize];
        let Some(ch) = mc.ch.as_ref() else {
            return self.child_failed_to_start(child.tag as u32, IoError::NoDevice);
        };
        child.set_done(self.rc());
        mc.outstanding.set(mc.outstanding.get() + 1);
        ch.submit(child);
    }

    /// Sends a failed read child, unchanged but for where it goes, to `l`
    /// (another copy): it keeps its flags (the parent's) and records the
    /// members tried. Gives it back when `l` has no channel.
    pub(crate) fn redirect_child(
        &self,
        members: &[MemberChannel],
        mut child: IoBox,
        l: Loc,
        tried: u32,
    ) -> Result<(), IoBox> {
        let Some(target) = members.get(l.member as usize) else {
            return Err(child);
        };
        let Some(ch) = target.ch.as_ref() else {
            return Err(child);
        };
        child.offset_blocks = l.offset_blocks + target.data_offset_blocks;
        child.status = IoStatus::Pending;
        child.tag2 = l.member as u64 | (tried as u64) << TRIED_SHIFT;
        child.set_done(self.rc());
        target.outstanding.set(target.outstanding.get() + 1);
        ch.submit(child);
        Ok(())
    }

    fn child_failed_to_start(&self, slot: u32, e: IoError) {
        let done = {
            let mut ctx = self.ctx.borrow_mut();
            match ctx.get_mut(slot as usize) {
                Some(c) if c.remaining > 0 => {
                    c.error.get_or_insert(e);
                    c.remaining -= 1;
                    Some(c.remaining == 0)
                }
                _ => None,
            }
        };
        let Some(done) = done else {
            return self.impossible("a child failed to start for a parent with no child pending");
        };
        if done {
            // Deferred like every completion: no parent completes inside submit.
            self.children_done(slot);
        }
    }

    // ---- completion ----------------------------------------------------

    /// Marks member `m` failed (a latch: it only ever goes from clear to set
    /// outside a fence) and tells the owner, who makes it official.
    pub(crate) fn latch_failed(&self, m: usize) {
        if !self.level().is_redundant() || m >= crate::map::MAX_MEMBERS {
            return;
        }
        let prev = self.shared.failed_mask.fetch_or(1 << m, Ordering::AcqRel);
        if prev & (1 << m) == 0 {
            tracing::warn!(raid = %self.shared.name, member = m, "member IO failed: marking it failed");
            crate::owner::member_failed(&self.shared, m);
        }
    }

    /// Every child of the parent in `slot` has completed: the level may go
    /// on with another round (raid5: the writes after the reads), else the
    /// parent completes.
    fn children_done(&self, slot: u32) {
        if self.level().children_done(self, slot) {
            return;
        }
        self.complete_parent(slot);
    }

    // ---- what levels with IO in rounds use ------------------------------

    /// How the children of the parent in `slot` came back so far: the
    /// first error, and whether a copy of a redundant write failed.
    pub(crate) fn child_outcome(&self, slot: u32) -> (Option<IoError>, bool) {
        self.ctx.borrow().get(slot as usize).map_or((Some(IoError::NoDevice), false), |c| (c.error, c.copy_failed))
    }

    /// Forgets how a round the level redoes another way came back (raid5:
    /// reads that failed are planned again around their member): its error
    /// and its failed copies. The new round's writes set them afresh.
    pub(crate) fn clear_child_error(&self, slot: u32) {
        if let Some(c) = self.ctx.borrow_mut().get_mut(slot as usize) {
            c.error = None;
            c.copy_failed = false;
        }
    }

    /// Fails the parent in `slot` once its children are done (sets its error).
    pub(crate) fn set_child_error(&self, slot: u32, e: IoError) {
        if let Some(c) = self.ctx.borrow_mut().get_mut(slot as usize) {
            c.error.get_or_insert(e);
        }
    }

    /// Whether the parent in `slot` holds its range in the table.
    pub(crate) fn holds_lock(&self, slot: u32) -> bool {
        self.ctx.borrow().get(slot as usize).is_some_and(|c| c.lock != NO_LOCK)
    }

    /// Asks the owner's table for the parent's range (as a write does);
    /// once granted, the level's `submit_rw` maps it again (raid5: a read
    /// that reconstructs holds its stripes).
    pub(crate) fn serialize(&self, slot: u32) {
        self.acquire(slot);
    }

    /// A child the level counted but could not build (out of descriptors):
    /// counted out with `NoMemory`.
    pub(crate) fn child_not_started(&self, slot: u32) {
        self.child_failed_to_start(slot, IoError::NoMemory);
    }

    /// The level's round for the parent in `slot` (0 when it starts).
    pub(crate) fn level_phase(&self, slot: u32) -> u8 {
        self.level_slots.borrow().get(slot as usize).map_or(0, |l| l.phase)
    }

    pub(crate) fn set_level_phase(&self, slot: u32, phase: u8) {
        if let Some(l) = self.level_slots.borrow_mut().get_mut(slot as usize) {
            l.phase = phase;
        }
    }

    /// The member sets the level's plan for `slot` used (see `LevelSlot`).
    pub(crate) fn level_plan_masks(&self, slot: u32) -> (u32, u32) {
        self.level_slots.borrow().get(slot as usize).map_or((u32::MAX, u32::MAX), |l| l.plan_masks)
    }

    pub(crate) fn set_level_plan_masks(&self, slot: u32, masks: (u32, u32)) {
        if let Some(l) = self.level_slots.borrow_mut().get_mut(slot as usize) {
            l.plan_masks = masks;
        }
    }

    pub(crate) fn level_plan_trusted(&self, slot: u32) -> bool {
        self.level_slots.borrow().get(slot as usize).is_some_and(|l| l.plan_trusted)
    }

    pub(crate) fn set_level_plan_trusted(&self, slot: u32, trusted: bool) {
        if let Some(l) = self.level_slots.borrow_mut().get_mut(slot as usize) {
            l.plan_trusted = trusted;
        }
    }

    /// The level's stripe buffer of the parent in `slot`.
    pub(crate) fn level_buf(&self, slot: u32) -> Option<DmaBuf> {
        self.level_slots.borrow().get(slot as usize).and_then(|l| l.buf.clone())
    }

    pub(crate) fn set_level_buf(&self, slot: u32, buf: Option<DmaBuf>) {
        if let Some(l) = self.level_slots.borrow_mut().get_mut(slot as usize) {
            l.buf = buf;
        }
    }

    fn complete_parent(&self, slot: u32) {
        let c = self.ctx.borrow()[slot as usize];
        let mut status = match c.error {
            Some(e) => IoStatus::Failed(e),
            None => IoStatus::Success,
        };
        if status.is_ok() && c.copy_failed {
            // Every extent must have kept a copy on a member that is still
            // active: the level says whether the array survives the loss.
            let failed = self.shared.failed_mask.load(Ordering::Acquire);
            let members = self.members.borrow();
            let ok = self.geo.borrow().as_deref().is_some_and(|g| g.survives(|m| !Self::active(&members, failed, m)));
            if !ok {
                status = IoStatus::Failed(IoError::Media);
            } else if failed & !self.shared.recorded_mask.load(Ordering::Acquire) != 0 {
                // Acknowledge only once the superblock says which copy failed.
                self.meta_wait.borrow_mut().push_back(slot);
                return self.ensure_wait_poller();
            }
        }
        self.finish(slot, status);
    }
}

impl IoDone for ArrayChannel {
    fn io_done(&self, child: IoBox) {
        let m = (child.tag2 & MEMBER_MASK) as usize;
        let slot = child.tag as u32;
        let known_member = match self.members.borrow().get(m) {
            Some(mc) => {
                mc.outstanding.set(mc.outstanding.get().saturating_sub(1));
                true
            }
            None => false,
        };
        if !known_member {
            // The parent still completes below: only the balancing count is off.
            self.impossible("a member completion from a member slot the array does not have");
        }
        if let IoStatus::Failed(err) = child.status {
            return self.child_failed(child, m, slot, err);
        }
        drop(child);
        self.count_out_child(slot);
    }
}

impl ArrayChannel {
    /// A child came back: one fewer in flight for the parent in `slot`,
    /// which goes on once the last is back. A parent with children in
    /// flight is parked (`finish` clears the count with the slot), so the
    /// count alone says whether the completion was expected.
    fn count_out_child(&self, slot: u32) {
        let done = {
            let mut ctx = self.ctx.borrow_mut();
            match ctx.get_mut(slot as usize) {
                Some(c) if c.remaining > 0 => {
                    c.remaining -= 1;
                    c.remaining == 0
                }
                _ => {
                    drop(ctx);
                    // No parent, or one with no child in flight (it completes,
                    // or already did, on its own path): nothing here to answer.
                    return self.impossible("a member completion for a parent with no child in flight");
                }
            }
        };
        if done {
            self.children_done(slot);
        }
    }

    /// A child that failed on member `m`: a read tries another copy; a
    /// redundant write or flush fails the member and keeps the IO if a copy
    /// survives; anything else fails the parent. Then it counts out.
    fn child_failed(&self, child: IoBox, m: usize, slot: u32, err: IoError) {
        let expected = self.ctx.borrow().get(slot as usize).is_some_and(|c| c.remaining > 0);
        let parent_type = if expected { self.parents.borrow().get(slot).map(|p| p.io_type) } else { None };
        let Some(parent_type) = parent_type else {
            drop(child);
            return self.impossible("a member completion for a parent with no child in flight");
        };
        let redundant = self.level().is_redundant();
        match parent_type {
            IoType::Read => {
                self.latch_failed(m);
                match self.level().retry_read(self, child) {
                    Ok(()) => return,
                    Err(_) => {
                        self.ctx.borrow_mut()[slot as usize].error.get_or_insert(err);
                    }
                }
            }
            // A member that lost a write, or its cache at a flush, no
            // longer holds a current copy: it fails, and the IO succeeds
            // if every extent kept a copy (see `complete_parent`).
            t if (t.is_write_like() || t == IoType::Flush) && redundant => {
                drop(child);
                self.latch_failed(m);
                self.ctx.borrow_mut()[slot as usize].copy_failed = true;
            }
            _ => {
                drop(child);
                self.ctx.borrow_mut()[slot as usize].error.get_or_insert(err);
            }
        }
        self.count_out_child(slot);
    }
}

// ---- raw messages (allocation-free, indices only) -----------------------

/// Owner: a write from another reactor asks for its range.
fn on_acquire_msg(a: u64, b: u64) {
    let key = (a >> 32) as u32;
    // Gone: the requester's state went with the array's teardown.
    let Some(channel) = find_channel(key) else { return };
    let Some(owner) = &channel.owner else {
        // Refuse, so the write fails rather than waits forever.
        let (key, reactor, slot, ..) = words::decode_acquire(a, b, u64::MAX);
        let (a, b) = words::encode_grant(key, slot, NO_LOCK);
        reactor::send_raw(reactor, on_grant_msg, a, b);
        return channel.impossible("a range request reached a reactor that does not own the array");
    };
    let array_blocks = channel.geo.borrow().as_deref().map_or(u64::MAX, Geometry::array_blocks);
    let (key, reactor, slot, start, end) = words::decode_acquire(a, b, array_blocks);
    let r = owner.table.borrow_mut().acquire(start, end, words::waiter(reactor, slot));
    if let Acquired::Granted(entry) = r {
        let (a, b) = words::encode_grant(key, slot, entry);
        reactor::send_raw(reactor, on_grant_msg, a, b);
    }
}

/// Requester: the owner granted the range of the write in `slot`.
pub(crate) fn on_grant_msg(a: u64, b: u64) {
    let (key, slot, entry) = words::decode_grant(a, b);
    if let Some(channel) = find_channel(key) {
        channel.granted(slot, entry);
    }
}

/// Owner: a write on another reactor finished with its range.
fn on_release_msg(a: u64, b: u64) {
    let Some(channel) = find_channel(a as u32) else {
        return;
    };
    match &channel.owner {
        Some(owner) => owner.release(&channel, b as u32),
        None => channel.impossible("a range release reached a reactor that does not own the array"),
    }
}

/// The channel a reactor's registry cache holds for the raid bdev.
pub(crate) fn create_channel(shared: &Arc<ArrayShared>) -> Result<Rc<dyn BdevChannel>, BdevError> {
    let channel = channel_for(shared).ok_or_else(|| BdevError::NotFound(shared.name.clone()))?;
    Ok(Rc::new(RaidChannel(channel)))
}
