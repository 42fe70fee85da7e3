//! The IO and process engine of levels that keep whole copies of the data
//! (raid0 and concat: one copy; raid1: one per member; raid10: two). The
//! level says where an extent's copies are (`RaidLevel::map`); here a write
//! goes to every copy that takes writes, a read to one active copy (the
//! fewest in flight, or the lowest-numbered while a resync is owed) and
//! retries another on error, and a process window copies each extent from
//! its first active copy onto the copies being repaired.
//!
//! Runs on the reactor that owns the `ArrayChannel`; allocation-free on the IO path
//! (children from the reactor's pool, buffers sliced from the parent's,
//! the scratch vector reused).

use crate::array::Role;
use crate::channel::{ArrayChannel, MemberChannel, ParentArgs};
use crate::map::{Loc, Placement};
use crate::rebuild::{WindowCopy, WindowJob};
use bdev::{IoBox, IoError, IoStatus, IoType};
use std::ops::Range;
use std::sync::atomic::Ordering;

/// `RaidLevel::submit_rw` of a copy level.
pub(super) fn submit_rw(channel: &ArrayChannel, slot: u32) {
    match channel.parent_args(slot) {
        Some(args) if args.0 .0 == IoType::Read => read(channel, slot, args),
        Some(args) => write(channel, slot, args),
        None => channel.impossible("an IO to map onto members is not parked"),
    }
}

/// A write to every copy that takes writes (active or being rebuilt, not
/// failed). It fails if some extent has no active copy left.
fn write(channel: &ArrayChannel, slot: u32, (op, off, n, buf): ParentArgs) {
    let geo_ref = channel.geo.borrow();
    let Some(geo) = geo_ref.as_deref() else {
        drop(geo_ref);
        return channel.finish(slot, IoStatus::Failed(IoError::NoDevice));
    };
    let members = channel.members.borrow();
    // One snapshot of the failure latches for the whole fan-out, so the
    // count and the children agree even if a member fails meanwhile.
    let failed = channel.shared.failed_mask.load(Ordering::Acquire);
    let nm = members.len();
    // Build every child before submitting any, in one pass over the
    // extents (their count is the children built): a member may take
    // descriptors from this reactor's pool while it submits (a delay,
    // error or raid bdev below us), and a write that reached one mirror
    // but not the other would leave them different.
    let bs = channel.block_size.get();
    let mut children = channel.take_scratch();
    let mut short = false;
    let mut lost = false;
    for e in geo.extents(off, n) {
        let mut survivors = false;
        for l in e.placement.copies(nm) {
            let m = l.member as usize;
            survivors |= ArrayChannel::active(&members, failed, m);
            if short || !ArrayChannel::writable(&members, failed, m) {
                continue;
            }
            let b = buf.as_ref().map(|b| b.slice((e.buf_offset_blocks * bs) as usize, (e.num_blocks * bs) as usize));
            match ArrayChannel::make_child(&members, slot, op, (l, b), e.num_blocks, 0) {
                Some(c) => children.push(c),
                None => short = true,
            }
        }
        if !survivors {
            lost = true;
            break;
        }
    }
    if lost || short {
        children.clear();
        channel.put_scratch(children);
        drop((members, geo_ref));
        let e = if lost { IoError::NoDevice } else { IoError::NoMemory };
        return channel.finish(slot, IoStatus::Failed(e));
    }
    // A member latched failed but not yet recorded in the superblock gets
    // no copy of this write: like a write whose copy failed, it is
    // acknowledged only once the failure is on disk, or a restart could
    // take the stale copy for a good one.
    let unrecorded = failed & !channel.shared.recorded_mask.load(Ordering::Acquire);
    channel.expect_children(slot, children.len() as u32, unrecorded != 0 && geo.level().is_redundant());
    for child in children.drain(..) {
        channel.send_child(&members, child);
    }
    channel.put_scratch(children);
}

/// The active copy with the fewest children in flight on this reactor
/// (`first`: the lowest-numbered active copy), skipping members in `tried`.
fn pick_copy(members: &[MemberChannel], failed: u32, p: Placement, tried: u32, first: bool) -> Option<Loc> {
    // A plain loop (the iterator chain cost about 200 instructions a read):
    // the first of the copies with the least key wins, as `min_by_key`.
    let mut best: Option<(u32, Loc)> = None;
    for l in p.copies(members.len()) {
        let m = l.member as usize;
        if tried & (1 << l.member) != 0 || !ArrayChannel::active(members, failed, m) {
            continue;
        }
        let key = if first { l.member as u32 } else { members[m].outstanding.get() };
        if best.is_none_or(|(k, _)| key < k) {
            best = Some((key, l));
        }
    }
    best.map(|(_, l)| l)
}

/// A read: each extent from one active copy. Every child is built before
/// any is sent (one pass over the extents), so a read short of
/// descriptors fails whole without reaching a member.
fn read(channel: &ArrayChannel, slot: u32, (op, off, n, buf): ParentArgs) {
    let geo_ref = channel.geo.borrow();
    let Some(geo) = geo_ref.as_deref() else {
        drop(geo_ref);
        return channel.finish(slot, IoStatus::Failed(IoError::NoDevice));
    };
    let members = channel.members.borrow();
    let failed = channel.shared.failed_mask.load(Ordering::Acquire);
    let first = channel.reads_prefer_first();
    let bs = channel.block_size.get();
    let mut children = channel.take_scratch();
    let mut error = None;
    for e in geo.extents(off, n) {
        let Some(l) = pick_copy(&members, failed, e.placement, 0, first) else {
            error = Some(IoError::NoDevice);
            break;
        };
        if error.is_some() {
            continue;
        }
        let b = buf.as_ref().map(|b| b.slice((e.buf_offset_blocks * bs) as usize, (e.num_blocks * bs) as usize));
        match ArrayChannel::make_child(&members, slot, op, (l, b), e.num_blocks, 0) {
            Some(c) => children.push(c),
            None => error = Some(IoError::NoMemory),
        }
    }
    if let Some(e) = error {
        children.clear();
        channel.put_scratch(children);
        drop((members, geo_ref));
        return channel.finish(slot, IoStatus::Failed(e));
    }
    channel.expect_children(slot, children.len() as u32, false);
    for child in children.drain(..) {
        channel.send_child(&members, child);
    }
    channel.put_scratch(children);
}

/// `RaidLevel::retry_read` of a copy level: the next untried active copy.
pub(super) fn retry_read(channel: &ArrayChannel, child: IoBox) -> Result<(), IoBox> {
    let (m, tried) = ArrayChannel::child_member(&child);
    let tried = tried | 1 << m;
    let geo_ref = channel.geo.borrow();
    let Some(geo) = geo_ref.as_deref() else {
        return Err(child);
    };
    let members = channel.members.borrow();
    let failed = channel.shared.failed_mask.load(Ordering::Acquire);
    let Some(mc) = members.get(m) else {
        return Err(child);
    };
    let here = Loc { member: m as u16, offset_blocks: child.offset_blocks.saturating_sub(mc.data_offset_blocks) };
    let Some(copies) = geo.copies_at(here) else {
        return Err(child);
    };
    let Some(l) = pick_copy(&members, failed, copies, tried, channel.reads_prefer_first()) else {
        return Err(child);
    };
    channel.redirect_child(&members, child, l, tried)
}

/// `RaidLevel::plan_window` of a copy level: each extent of the window
/// from its first active copy to its copies that `job` repairs (members
/// being rebuilt or resynced that take writes) or compares (every other
/// active copy). Extents with nothing to do are left out.
pub(super) fn plan_window(channel: &ArrayChannel, window: Range<u64>, job: WindowJob) -> Option<Vec<WindowCopy>> {
    let geo_ref = channel.geo.borrow();
    let geo = geo_ref.as_deref()?;
    let members = channel.members.borrow();
    let failed = channel.shared.failed_mask.load(Ordering::Acquire);
    let ok = |m: usize| members.get(m).is_some_and(|mc| mc.ch.is_some()) && failed & (1 << m) == 0;
    let active = |m: usize| ok(m) && members[m].role == Role::Active;
    let writable = |m: usize| ok(m) && matches!(members[m].role, Role::Active | Role::Rebuilding);
    let target = |m: usize| match job {
        WindowJob::Repair { dests } => dests & (1 << m) != 0 && writable(m),
        WindowJob::Check => active(m),
    };
    let mut out = Vec::new();
    for e in geo.extents(window.start, window.end - window.start) {
        let copies = e.placement.copies(members.len());
        let from = copies.clone().find(|l| active(l.member as usize));
        let to: Vec<Loc> =
            copies.filter(|l| target(l.member as usize) && from.is_none_or(|f| f.member != l.member)).collect();
        if to.is_empty() {
            continue;
        }
        let from = from?;
        out.push(WindowCopy {
            from,
            xor: Vec::new(),
            to,
            num_blocks: e.num_blocks,
            buf_offset_blocks: e.array_offset_blocks - window.start,
        });
    }
    Some(out)
}
