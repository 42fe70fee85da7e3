//! Member resize: what an array does when a member bdev grew or shrank
//! while in it (the bdev layer's `BdevEvent::Resize`).
//!
//! - A member that shrank below what the array uses of it (data offset +
//!   data size) fails, as an IO error would fail it: the array runs degraded
//!   (or goes offline if it cannot), and nothing is silently cut off.
//! - A member that grew changes nothing by itself (md needs `--grow
//!   --size`). A level that grows with its members (SPDK's `resize` hook:
//!   raid0, raid1) takes the larger layout once every member is larger:
//!   the smallest member still governs. The grow runs in a fence; with a
//!   superblock the new sizes are on every member before the array's bdev
//!   announces its new size; a redundant level resyncs the new blocks (their
//!   copies hold whatever the members held there). A write-intent bitmap
//!   covers the array size it was made for, so an array with one does not
//!   grow (logged). Other levels log and keep their size.

use crate::array::{self, ArrayShared, Role};
use crate::channel::ArrayChannel;
use crate::map::Geometry;
use crate::owner;
use bdev::{BdevEvent, BdevHandle};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

/// Listens for events of member `h` (with the hot-remove watch): resizes,
/// and a failed member's device coming back (`array::member_restored`).
pub(crate) fn watch(shared: &Arc<ArrayShared>, h: &BdevHandle) {
    let weak: Weak<ArrayShared> = Arc::downgrade(shared);
    let bdev_id = h.id();
    let id = h.on_event(move |ev| {
        let Some(shared) = weak.upgrade() else { return };
        if shared.torn_down.load(Ordering::Acquire) {
            return;
        }
        if reactor::current().is_none() {
            // Events come from reactors (RPCs, NVMe events); a thread
            // outside the set cannot reach the owner.
            return tracing::error!(raid = %shared.name, ?ev, "member event off a reactor: not handled");
        }
        let new_blocks = match ev {
            BdevEvent::Resize { old_blocks, new_blocks } => {
                tracing::info!(raid = %shared.name, old_blocks, new_blocks, "member resized");
                new_blocks
            }
            BdevEvent::Restored => return array::member_restored(&shared, bdev_id),
        };
        owner::on_owner(&shared, move |channel| {
            if let Some(channel) = channel {
                member_resized(&channel, bdev_id, new_blocks);
            }
        });
    });
    shared.member_events.lock().unwrap_or_else(|e| e.into_inner()).push((h.clone(), id));
}

/// Stops listening to `h` (it left the array).
pub(crate) fn forget(shared: &ArrayShared, h: &BdevHandle) {
    shared.member_events.lock().unwrap_or_else(|e| e.into_inner()).retain(|(x, id)| {
        if x.same(h) {
            x.drop_listener(*id);
        }
        !x.same(h)
    });
}

/// Owner reactor: member bdev `bdev_id` now has `new_blocks` blocks.
fn member_resized(channel: &Rc<ArrayChannel>, bdev_id: u64, new_blocks: u64) {
    let shared = &channel.shared;
    let found = {
        let control = shared.control();
        control.slots.iter().position(|s| s.handle.as_ref().is_some_and(|h| h.id() == bdev_id)).map(|i| {
            (i, control.slots[i].role, control.slots[i].data_offset_blocks + control.slots[i].data_size_blocks)
        })
    };
    let Some((slot, role, used_blocks)) = found else { return };
    if shared.geometry.get().is_none() {
        // Configuring: the sizes are read when the array goes online.
        return;
    }
    if new_blocks < used_blocks {
        if matches!(role, Role::Active | Role::Rebuilding) {
            tracing::error!(
                raid = %shared.name,
                slot,
                new_blocks,
                used_blocks,
                "member shrank below what the array uses of it: failing it"
            );
            if shared.failed_mask.fetch_or(1 << slot, Ordering::AcqRel) & (1 << slot) == 0 {
                owner::member_failed(shared, slot);
            }
        }
        return;
    }
    if !shared.level.grows_with_members() {
        return tracing::info!(
            raid = %shared.name,
            level = shared.level.name(),
            slot,
            "member grew; the level does not grow with its members: the array keeps its size"
        );
    }
    let shared2 = shared.clone();
    owner::on_owner_fenced(shared, move |fenced| {
        let Ok((channel, fence)) = fenced else {
            return tracing::warn!(raid = %shared2.name, "member grew; no fence for a grow");
        };
        match grow_in_fence(channel) {
            Some(array_blocks) => {
                let channel2 = channel.clone();
                array::commit(channel, fence, move |r| match r {
                    Ok(()) => announce(&channel2, array_blocks),
                    Err(e) => tracing::error!(raid = %channel2.shared.name, "grown layout not recorded: {e}"),
                });
            }
            None => fence.done(),
        }
    });
}

/// Inside a fence: the larger layout, if every member allows one; its array
/// size. The slots, the current geometry and the superblock template take
/// it (the superblock is written by the commit that ends the fence).
fn grow_in_fence(channel: &Rc<ArrayChannel>) -> Option<u64> {
    let shared = &channel.shared;
    let old = shared.geometry.get()?.clone();
    let mut control = shared.control();
    if control.deleting {
        return None;
    }
    let sizes: Option<Vec<u64>> = control
        .slots
        .iter()
        .map(|s| match (&s.handle, s.role) {
            (Some(h), Role::Active | Role::Rebuilding) => Some(h.num_blocks().saturating_sub(s.data_offset_blocks)),
            _ => None,
        })
        .collect();
    let Some(sizes) = sizes else {
        tracing::info!(raid = %shared.name, "member grew; a slot has no working member: the array keeps its size");
        return None;
    };
    let grown = match Geometry::new(shared.level, old.strip_size_blocks(), &sizes) {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(raid = %shared.name, "member grew; no layout over the new sizes: {e}");
            return None;
        }
    };
    let (old_blocks, new_blocks) = (old.array_blocks(), grown.array_blocks());
    if new_blocks <= old_blocks {
        // Not every member is larger yet (the smallest governs).
        tracing::info!(raid = %shared.name, array_blocks = old_blocks, "member grew; the array keeps its size until every member has");
        return None;
    }
    if let Some(bm) = &control.bitmap {
        let covered = bm.geometry().data_blocks;
        if covered < new_blocks {
            tracing::error!(
                raid = %shared.name,
                covered_blocks = covered,
                new_blocks,
                "members grew, but the write-intent bitmap covers only the current size: the array keeps its size"
            );
            return None;
        }
    }
    if control.process_target.is_some() || owner_busy(channel) {
        tracing::warn!(raid = %shared.name, "members grew during a rebuild or resync: the array keeps its size");
        return None;
    }
    let grown = Arc::new(grown);
    if !shared.geometry.replace(grown.clone()) {
        tracing::error!(
            raid = %shared.name,
            grows = array::MAX_LAYOUTS - 1,
            "members grew, but the array has grown as often as it can in one run: restart to grow it further"
        );
        return None;
    }
    for (i, s) in control.slots.iter_mut().enumerate() {
        s.data_size_blocks = grown.member_data_blocks(i);
    }
    if let Some(meta) = channel.owner.as_ref().and_then(|o| o.meta.borrow().clone()) {
        let mut sb = meta.sb.borrow_mut();
        sb.array_blocks = new_blocks;
        for (i, e) in sb.slots.iter_mut().enumerate() {
            e.data_size_blocks = grown.member_data_blocks(i);
        }
    }
    // The new blocks' copies hold whatever each member held there: resync
    // them before they count as redundant (md resyncs a grown area too).
    if shared.level.is_redundant() {
        let mut ranges = control.dirty.as_deref().cloned().unwrap_or_default();
        ranges.push(old_blocks..new_blocks);
        control.dirty = Some(Arc::new(ranges));
    }
    tracing::info!(raid = %shared.name, old_blocks, new_blocks, "array grows with its members");
    Some(new_blocks)
}

fn owner_busy(channel: &ArrayChannel) -> bool {
    channel.owner.as_ref().is_some_and(|o| o.rebuild.borrow().is_some())
}

/// After the fence: the array's bdev takes its new size (its holders hear
/// of it: an NVMe-oF namespace tells its hosts), and the resync of the new
/// blocks starts.
fn announce(channel: &Rc<ArrayChannel>, array_blocks: u64) {
    let handle = channel.shared.control().handle.clone();
    if let Some(h) = handle {
        if let Err(e) = h.notify_blockcnt_change(array_blocks) {
            tracing::error!(raid = %channel.shared.name, "array grew, its bdev did not: {e}");
        }
    }
    crate::rebuild::start_next(channel);
}
