//! On-disk metadata of an array with a superblock: reading a member's
//! superblock, writing the array's superblock to every member (one write at
//! a time, later requests folded into the next), wiping it (`clear_sb`), and
//! the write-intent bitmap's owner half.
//!
//! Lives on the owner reactor (`OwnerPart::meta`). The superblock written is
//! always built from the control state at the time of the write, so a write
//! that was folded into a later one records the later state: nothing older
//! than what the caller saw can land after it.
//!
//! Durability (md writes its superblock with REQ_PREFLUSH | REQ_FUA): first
//! every target member with a volatile write cache is flushed, and only when
//! all of them are does any copy go out, with FUA. So a superblock that says
//! "clean", "active" or "failed" is never on any member's media ahead of the
//! data it vouches for on another (assembly trusts the freshest copy), and
//! `done` runs only once the copies are durable.

use crate::array::{Role, Slot};
use crate::channel::ArrayChannel;
use crate::superblock::{self, SlotState, SuperblockError, SuperblockInfo};
use bdev::{BdevError, BdevHandle, DmaBuf, IoBox, IoFlags, IoType};
use bitmap::BitmapOwner;
use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;

type Done = Box<dyn FnOnce(Result<(), BdevError>)>;

const EIO: i32 = 5;

/// What a superblock write records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SbWrite {
    /// The array is running: after a crash, the bitmap's chunks need resync.
    Dirty,
    /// Shut down with no write half done.
    Clean,
    /// `clear_sb`: zeros over every member's superblock.
    Wipe,
}

/// The owner's metadata state of one array.
pub(crate) struct Meta {
    /// The last superblock written (or read at assembly): the template of the next.
    pub sb: RefCell<SuperblockInfo>,
    pub bitmap: Option<BitmapOwner>,
    writing: Cell<bool>,
    queued: RefCell<Vec<(SbWrite, Done)>>,
    /// Set after a wipe: no further superblock write may happen.
    wiped: Cell<bool>,
}

impl Meta {
    pub(crate) fn new(sb: SuperblockInfo, bitmap: Option<BitmapOwner>) -> Rc<Meta> {
        Rc::new(Meta {
            sb: RefCell::new(sb),
            bitmap,
            writing: Cell::new(false),
            queued: RefCell::new(Vec::new()),
            wiped: Cell::new(false),
        })
    }

    pub(crate) fn events(&self) -> u64 {
        self.sb.borrow().events
    }
}

/// The superblock's slot entry for a slot of the control state (`failed`:
/// its IO-error latch is set).
fn slot_state(s: &Slot, failed: bool, prev: SlotState) -> SlotState {
    match s.role {
        _ if failed => SlotState::Failed,
        Role::Active => SlotState::Active,
        // A returning member resynced only where it missed writes stays
        // "failed" on disk until done: after a restart it is again a stale
        // member, resynced from the bitmap (a full rebuild is recorded as
        // rebuilding, and restarts from the beginning).
        Role::Rebuilding if s.partial.is_some() => SlotState::Failed,
        Role::Rebuilding => {
            SlotState::Rebuilding { recovery_offset_blocks: s.recovered_blocks.min(s.data_size_blocks) }
        }
        Role::Failed | Role::Empty => SlotState::Failed,
        Role::Missing => prev,
    }
}

/// The next superblock: the template with `events + 1`, `clean`, and the slot
/// table from the control state.
fn next_info(channel: &ArrayChannel, meta: &Meta, clean: bool) -> SuperblockInfo {
    let mut info = meta.sb.borrow().clone();
    info.events += 1;
    info.clean = clean;
    info.redundancy_verified =
        channel.shared.level.trusts_checked_redundancy() && channel.shared.redundancy_verified.load(Ordering::Acquire);
    let failed = channel.shared.failed_mask.load(Ordering::Acquire);
    let control = channel.shared.control();
    for (i, (e, s)) in info.slots.iter_mut().zip(control.slots.iter()).enumerate() {
        e.state = slot_state(s, failed & (1 << i) != 0, e.state);
        if !s.sb_uuid.is_nil() {
            e.member_uuid = s.sb_uuid;
        }
    }
    info
}

/// Members a superblock write goes to: present, active or rebuilding, not failed.
fn sb_targets(channel: &ArrayChannel) -> Vec<(usize, BdevHandle)> {
    let failed = channel.shared.failed_mask.load(Ordering::Acquire);
    let control = channel.shared.control();
    control
        .slots
        .iter()
        .enumerate()
        .filter(|(i, s)| matches!(s.role, Role::Active | Role::Rebuilding) && failed & (1 << i) == 0)
        .filter_map(|(i, s)| s.handle.clone().map(|h| (i, h)))
        .collect()
}

/// Writes the array's superblock (`kind`) to every member that should carry
/// it; `done` runs once it is on them. Requests made while a write is in
/// flight are folded into one write after it. Owner reactor only.
pub(crate) fn update(channel: &Rc<ArrayChannel>, meta: &Rc<Meta>, kind: SbWrite, done: Done) {
    meta.queued.borrow_mut().push((kind, done));
    if !meta.writing.get() {
        start_next(channel, meta);
    }
}

fn start_next(channel: &Rc<ArrayChannel>, meta: &Rc<Meta>) {
    let batch = std::mem::take(&mut *meta.queued.borrow_mut());
    if batch.is_empty() {
        return;
    }
    if meta.wiped.get() {
        for (_, d) in batch {
            d(Ok(()));
        }
        return;
    }
    // The newest request decides what is written (a wipe wins over all).
    let kind = if batch.iter().any(|(k, _)| *k == SbWrite::Wipe) {
        SbWrite::Wipe
    } else {
        batch.last().map_or(SbWrite::Dirty, |(k, _)| *k)
    };
    meta.writing.set(true);
    let targets = match kind {
        // A wipe clears every member the array holds, failed ones included.
        SbWrite::Wipe => {
            let control = channel.shared.control();
            control.slots.iter().enumerate().filter_map(|(i, s)| s.handle.clone().map(|h| (i, h))).collect()
        }
        _ => sb_targets(channel),
    };
    let info = (kind != SbWrite::Wipe).then(|| next_info(channel, meta, kind == SbWrite::Clean));
    // Each member's image (zeros for a wipe); None where it cannot be built.
    let images: Vec<(usize, BdevHandle, Option<DmaBuf>)> = targets
        .into_iter()
        .map(|(slot, h)| {
            let bytes = superblock::superblock_blocks(h.props().block_size) * u64::from(h.props().block_size);
            let buf = DmaBuf::zeroed(bytes as usize).and_then(|buf| match &info {
                None => Some(buf),
                Some(info) => info.for_slot(slot).map(|mine| {
                    buf.copy_from(0, &superblock::encode(&mine));
                    buf
                }),
            });
            (slot, h, buf)
        })
        .collect();
    let weak_channel = Rc::downgrade(channel);
    let meta2 = meta.clone();
    let total = images.len();
    let round = Rc::new(Round {
        left: Cell::new(total),
        ok: Cell::new(0),
        finish: RefCell::new(Some(Box::new(move |ok: usize| {
            let r = if total > 0 && ok == 0 {
                Err(BdevError::Os("superblock write failed on every member".into(), EIO))
            } else {
                Ok(())
            };
            if r.is_ok() {
                match info {
                    Some(i) => *meta2.sb.borrow_mut() = i,
                    None => meta2.wiped.set(true),
                }
            }
            meta2.writing.set(false);
            for (_, d) in batch {
                d(r.clone());
            }
            if let Some(channel) = weak_channel.upgrade() {
                start_next(&channel, &meta2);
            }
        }))),
    });
    if total == 0 {
        return round.finish_now();
    }
    let weak = Rc::downgrade(channel);
    let fail_member = move |slot: usize, what: &str| {
        if kind != SbWrite::Wipe {
            tracing::error!(slot, "superblock {what} failed: marking the member failed");
            if let Some(channel) = weak.upgrade() {
                channel.latch_failed(slot);
            }
        }
    };
    let flushes: Vec<(usize, BdevHandle)> = images
        .iter()
        .enumerate()
        .filter(|(_, (_, h, buf))| buf.is_some() && needs_flush(h))
        .map(|(i, (_, h, _))| (i, h.clone()))
        .collect();
    // Phase 2, once every flush has completed: the FUA writes.
    let flush_failed = Rc::new(RefCell::new(vec![false; images.len()]));
    let writes = {
        let (round, flush_failed, fail_member) = (round.clone(), flush_failed.clone(), fail_member.clone());
        move || {
            for (i, (slot, h, buf)) in images.into_iter().enumerate() {
                let Some(buf) = buf else {
                    round.one(false);
                    continue;
                };
                if flush_failed.borrow()[i] {
                    fail_member(slot, "flush");
                    round.one(false);
                    continue;
                }
                let (round, fail_member) = (round.clone(), fail_member.clone());
                let blocks = superblock::superblock_blocks(h.props().block_size);
                io_with(&h, IoType::Write, IoFlags::FUA, 0, blocks, Some(buf), move |good, _| {
                    if !good {
                        fail_member(slot, "write");
                    }
                    round.one(good);
                });
            }
        }
    };
    if flushes.is_empty() {
        return writes();
    }
    // Phase 1: flush every target with a volatile cache.
    let flushes_left = Rc::new(Cell::new(flushes.len()));
    let writes = Rc::new(RefCell::new(Some(writes)));
    for (i, h) in flushes {
        let (left, writes, flush_failed) = (flushes_left.clone(), writes.clone(), flush_failed.clone());
        io_with(&h, IoType::Flush, IoFlags::NONE, 0, 0, None, move |good, _| {
            if !good {
                flush_failed.borrow_mut()[i] = true;
            }
            left.set(left.get() - 1);
            if left.get() == 0 {
                let w = writes.borrow_mut().take();
                if let Some(w) = w {
                    w();
                }
            }
        });
    }
}

/// Whether metadata writes to `h` must be preceded by a flush: it has a
/// volatile write cache (and, as every such bdev must, takes flushes).
fn needs_flush(h: &BdevHandle) -> bool {
    h.bdev().has_write_cache() && h.bdev().io_type_supported(IoType::Flush)
}

/// The member writes of one superblock write: `finish` runs with the count
/// that succeeded once every one has completed.
struct Round {
    left: Cell<usize>,
    ok: Cell<usize>,
    finish: RefCell<Option<RoundDone>>,
}

type RoundDone = Box<dyn FnOnce(usize)>;

impl Round {
    fn one(&self, good: bool) {
        self.ok.set(self.ok.get() + usize::from(good));
        self.left.set(self.left.get() - 1);
        if self.left.get() == 0 {
            self.finish_now();
        }
    }

    fn finish_now(&self) {
        let f = self.finish.borrow_mut().take();
        if let Some(f) = f {
            f(self.ok.get());
        }
    }
}

/// One IO to `h` at `offset` of `blocks` blocks with `buf`; `done(success)`
/// runs later on this reactor.
pub(crate) fn io_blocks(
    h: &BdevHandle,
    t: IoType,
    offset: u64,
    blocks: u64,
    buf: DmaBuf,
    done: impl FnOnce(bool, Option<DmaBuf>) + 'static,
) {
    io_with(h, t, IoFlags::NONE, offset, blocks, Some(buf), done)
}

/// `io_blocks` with flags, and without a buffer for a flush.
pub(crate) fn io_with(
    h: &BdevHandle,
    t: IoType,
    flags: IoFlags,
    offset: u64,
    blocks: u64,
    buf: Option<DmaBuf>,
    done: impl FnOnce(bool, Option<DmaBuf>) + 'static,
) {
    let ch = match h.channel() {
        Ok(c) => c,
        Err(_) => return later(move || done(false, None)),
    };
    let Some(mut io) = IoBox::data(t, offset, blocks, buf) else {
        return later(move || done(false, None));
    };
    io.flags = flags;
    let done = RefCell::new(Some(done));
    io.set_done(Rc::new(move |io: IoBox| {
        if let Some(d) = done.borrow_mut().take() {
            d(io.status.is_ok(), io.buf.clone());
        }
    }));
    ch.submit(io);
}

/// Runs `f` from a poller: a completion is never called inside its request.
fn later(f: impl FnOnce() + 'static) {
    let mut f = Some(f);
    reactor::register_poller("raid_meta_later", move || {
        if let Some(f) = f.take() {
            f();
        }
        reactor::PollStatus::Done
    });
}

/// What block 0 of a bdev holds.
#[derive(Debug)]
pub(crate) enum Found {
    Superblock(SuperblockInfo),
    /// No superblock (blank, or another format).
    None,
    /// Our magic, but not usable: reported, never assembled.
    Bad(SuperblockError),
    /// The read itself failed.
    Unreadable,
}

/// Reads and decodes the superblock of `h` (any reactor).
pub(crate) fn read_superblock(h: &BdevHandle, done: impl FnOnce(Found) + 'static) {
    let p = h.props();
    let blocks = superblock::superblock_blocks(p.block_size);
    if p.num_blocks < blocks || !(512..=65536).contains(&p.block_size) {
        return later(move || done(Found::None));
    }
    let Some(buf) = DmaBuf::alloc((blocks * p.block_size as u64) as usize) else {
        return later(move || done(Found::Unreadable));
    };
    io_blocks(h, IoType::Read, 0, blocks, buf, move |ok, buf| {
        let found = match (ok, buf) {
            (true, Some(b)) => b.with(|bytes| match superblock::decode(bytes) {
                Ok(i) => Found::Superblock(i),
                Err(SuperblockError::BadMagic) => Found::None,
                Err(e) => Found::Bad(e),
            }),
            _ => Found::Unreadable,
        };
        done(found);
    });
}

/// The bitmap's page-write failure hook: the member is failed like any
/// member whose IO failed.
pub(crate) fn watch_bitmap_failures(channel: &Rc<ArrayChannel>, bm: &BitmapOwner) {
    let weak: Weak<ArrayChannel> = Rc::downgrade(channel);
    bm.on_member_failed(move |h| {
        let Some(channel) = weak.upgrade() else { return };
        let slot = channel.shared.control().slots.iter().position(|s| s.handle.as_ref().is_some_and(|x| x.same(h)));
        if let Some(slot) = slot {
            tracing::error!(raid = %channel.shared.name, slot, "bitmap page write failed: marking the member failed");
            channel.latch_failed(slot);
        }
    });
}

/// Handles of the members that receive writes (the bitmap's member set).
pub(crate) fn writable_handles(channel: &ArrayChannel) -> Vec<BdevHandle> {
    sb_targets(channel).into_iter().map(|(_, h)| h).collect()
}

/// Writes the superblock with every latched member failure, then marks
/// those failures recorded (`ArrayShared::recorded_mask`), which releases
/// the writes waiting for it. Owner reactor; a no-op without a superblock.
pub(crate) fn record_failures(channel: &Rc<ArrayChannel>) {
    let meta = channel.owner.as_ref().and_then(|o| o.meta.borrow().clone());
    let shared = channel.shared.clone();
    let Some(meta) = meta else {
        // Nothing to record on disk: nobody needs to wait.
        let failed = shared.failed_mask.load(Ordering::Acquire);
        shared.recorded_mask.fetch_or(failed, Ordering::AcqRel);
        return;
    };
    let failed = shared.failed_mask.load(Ordering::Acquire);
    update(
        channel,
        &meta,
        SbWrite::Dirty,
        Box::new(move |r| {
            if let Err(e) = r {
                // No surviving member took the superblock: the array is
                // lost anyway; let the writes complete (they fail there).
                tracing::error!(raid = %shared.name, "recording a member failure: {e}");
            }
            shared.recorded_mask.fetch_or(failed, Ordering::AcqRel);
        }),
    );
}
