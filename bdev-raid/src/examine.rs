//! Arrays with superblocks: metadata of a new array (`init_new`), assembly
//! from the superblocks found on bdevs as they appear (`examine_superblock`:
//! configuring until every member the superblock counts on is there, then
//! online, resyncing what an unclean shutdown or a member's absence left
//! different), members coming back (`returning_member`), and the metadata
//! side of teardown (`close_metadata`).
//!
//! Assembly decisions are `assemble`'s; this module does the IO around them
//! and acts on the plan. Everything that changes an array runs on its owner.

use crate::array::{self, ArrayShared, CreateSpec, RaidModule, Returning, Role, Slot};
use crate::assemble::{assemble, AssemblyPlan, FoundSuperblock, MemberRole};
use crate::channel::{ras_for, Ras};
use crate::map::Geometry;
use crate::meta::{self, Found, Meta, SbWrite};
use crate::owner;
use crate::rebuild;
use crate::superblock::{self, MetadataLayout, SlotState, SuperblockInfo};
use bdev::{BdevError, BdevHandle, ExamineHold, Registry};
use bitmap::{BitmapOwner, LoadedBitmap, OwnerOptions};
use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use uuid::Uuid;

type Then = Box<dyn FnOnce(Result<(), BdevError>)>;

fn invalid(e: impl std::fmt::Display) -> BdevError {
    BdevError::Invalid(e.to_string())
}

// ---- a new array ------------------------------------------------------------

/// The superblock and bitmap geometry of a new array over its members.
fn plan_new(shared: &ArrayShared) -> Result<(SuperblockInfo, Option<bitmap::Geometry>), BdevError> {
    let ctl = shared.ctl();
    let bs = ctl.block_size;
    let members: Vec<(Uuid, u64)> = ctl
        .slots
        .iter()
        .map(|s| (s.uuid.unwrap_or_else(Uuid::new_v4), s.handle.as_ref().map_or(0, |h| h.props().num_blocks)))
        .collect();
    drop(ctl);
    let strip_blocks =
        if shared.level.uses_strips() { shared.strip_size_kb as u64 * 1024 / bs.max(1) as u64 } else { 0 };
    if shared.level.uses_strips() && strip_blocks == 0 {
        return Err(invalid(format!("strip size {} KiB is smaller than the block size {bs}", shared.strip_size_kb)));
    }
    let uuid = shared.uuid;
    let (length, chunk) = if shared.bitmap_chunk_kb > 0 {
        let chunk = shared.bitmap_chunk_kb as u64 * 1024 / bs.max(1) as u64;
        if chunk == 0 {
            return Err(invalid(format!("bitmap chunk {} KiB is smaller than a block", shared.bitmap_chunk_kb)));
        }
        // The bitmap covers the array, whose size depends on where data
        // starts, which depends on the bitmap's length: size the bitmap for
        // the largest array the members could hold (data right after the
        // superblock); the real one is no larger.
        let sbb = superblock::superblock_blocks(bs);
        let caps: Vec<u64> = members.iter().map(|m| m.1.saturating_sub(sbb)).collect();
        let most = Geometry::new(shared.level, strip_blocks, &caps).map_err(invalid)?.array_blocks();
        let g = bitmap::Geometry::new(uuid.into_bytes(), bs, most.max(1), Some(chunk)).map_err(invalid)?;
        (g.region_blocks(), chunk)
    } else {
        (0, 0)
    };
    let layout = MetadataLayout::new(bs, length, chunk).map_err(invalid)?;
    let info = SuperblockInfo::new_array(&shared.name, uuid, shared.level, strip_blocks, bs, &layout, &members)
        .map_err(invalid)?;
    let bm = match info.bitmap {
        Some(b) => Some(
            bitmap::Geometry::new(uuid.into_bytes(), bs, info.array_blocks, Some(b.chunk_size_blocks))
                .map_err(invalid)?,
        ),
        None => None,
    };
    Ok((info, bm))
}

/// Writes the metadata of a new array with a superblock (every member's
/// superblock, every bitmap page) and brings it online; `done` runs after.
pub(crate) fn init_new(shared: &Arc<ArrayShared>, done: Box<dyn FnOnce(Result<(), BdevError>) + Send>) {
    let Some(ras) = ras_for(shared) else {
        return done(Err(BdevError::NotFound(shared.name.clone())));
    };
    let (info, bm_geo) = match plan_new(shared) {
        Ok(p) => p,
        Err(e) => {
            array::abandon(shared);
            return done(Err(e));
        }
    };
    {
        let mut ctl = shared.ctl();
        for (s, i) in ctl.slots.iter_mut().zip(&info.slots) {
            s.data_offset_blocks = i.data_offset_blocks;
            s.sb_uuid = i.member_uuid;
        }
    }
    let r2 = ras.clone();
    start_metadata(
        &ras,
        info,
        bm_geo,
        None,
        Box::new(move |r| {
            let r = r.and_then(|()| array::go_online_with(&r2.shared, None));
            match r {
                Ok(()) => {
                    r2.refresh();
                    tracing::info!(raid = %r2.shared.name, "superblocks written");
                    done(Ok(()))
                }
                Err(e) => fail_start(&r2, move || done(Err(e))),
            }
        }),
    );
}

/// Creates the bitmap owner (if any) and the metadata state, persists every
/// bitmap page and then the superblock (dirty: the array is about to run).
fn start_metadata(
    ras: &Rc<Ras>,
    info: SuperblockInfo,
    bm_geo: Option<bitmap::Geometry>,
    initial: Option<LoadedBitmap>,
    then: Then,
) {
    let shared = &ras.shared;
    let Some(owner) = &ras.owner else {
        return then(Err(invalid("metadata must start on the owner reactor")));
    };
    let bm = match (bm_geo, info.bitmap) {
        (Some(g), Some(loc)) => {
            match BitmapOwner::new(
                g,
                meta::writable_handles(ras),
                loc.offset_blocks,
                initial.as_ref(),
                OwnerOptions::default(),
            ) {
                Ok(b) => Some(b),
                Err(e) => return then(Err(invalid(format!("bitmap: {e}")))),
            }
        }
        _ => None,
    };
    let meta = Meta::new(info, bm.clone());
    *owner.meta.borrow_mut() = Some(meta.clone());
    let r2 = ras.clone();
    let write_sb = move || meta::update(&r2, &meta, SbWrite::Dirty, then);
    match bm {
        Some(bm) => {
            {
                let mut ctl = shared.ctl();
                ctl.bitmap = Some(bm.bitmap());
                bm.set_in_sync(array::in_sync(shared, &ctl));
            }
            meta::watch_bitmap_failures(ras, &bm);
            bm.start_poller(bitmap::DEFAULT_TICK_PERIOD);
            bm.flush(write_sb);
        }
        None => write_sb(),
    }
}

/// An array whose start failed: stop its bitmap, then forget it.
fn fail_start(ras: &Rc<Ras>, then: impl FnOnce() + 'static) {
    let meta = ras.owner.as_ref().and_then(|o| o.meta.borrow_mut().take());
    let shared = ras.shared.clone();
    let finish = move || {
        array::abandon(&shared);
        then();
    };
    match meta.and_then(|m| m.bitmap.clone()) {
        Some(bm) => bm.flush_and_stop(finish),
        None => finish(),
    }
}

// ---- teardown ---------------------------------------------------------------

/// Teardown with no array IO left: the bitmap's final batch, then the
/// superblock — clean unless a resync is still owed, wiped for `clear_sb` —
/// and only then `then` (which releases the members).
pub(crate) fn close_metadata(ras: &Rc<Ras>, meta: Rc<Meta>, then: impl FnOnce() + 'static) {
    rebuild::cancel(ras);
    let kind = if ras.shared.clear_sb.load(Ordering::Acquire) {
        SbWrite::Wipe
    } else if ras.shared.ctl().dirty.is_some() {
        SbWrite::Dirty
    } else {
        SbWrite::Clean
    };
    let (r2, m2) = (ras.clone(), meta.clone());
    let write_sb = move || {
        meta::update(
            &r2,
            &m2,
            kind,
            Box::new(move |r| {
                if let Err(e) = r {
                    tracing::error!("final superblock write failed: {e}");
                }
                then();
            }),
        )
    };
    match &meta.bitmap {
        Some(bm) => bm.flush_and_stop(write_sb),
        None => write_sb(),
    }
}

// ---- examination and assembly -----------------------------------------------

/// Reads block 0 of a new, unclaimed bdev; a superblock of ours assembles
/// (or joins) its array. `bdev_wait_for_examine` waits for all of it.
pub(crate) fn examine_superblock(h: &BdevHandle) {
    let hold = Registry::get().examine_hold();
    let name = h.name().to_string();
    // Decisions run on reactor 0 only: two members of a new array found on
    // different reactors must not each start an array of their own.
    meta::read_superblock(h, move |found| reactor::send(0, move || on_found(name, found, hold)));
}

fn on_found(name: String, found: Found, hold: ExamineHold) {
    let module = RaidModule::get();
    let info = match found {
        Found::None | Found::Unreadable => return,
        Found::Bad(e) => {
            return module.problem(format!("bdev {name}: superblock not usable, nothing assembled from it: {e}"));
        }
        Found::Superblock(info) => info,
    };
    let Some(h) = Registry::get().lookup(&name) else { return };
    if let Some(by) = h.claimed_by() {
        return tracing::info!(bdev = %name, %by, "bdev with a raid superblock is claimed already: not assembled");
    }
    match module.find_uuid(info.array_uuid) {
        Some(shared) if shared.geometry.get().is_some() => rejoin(&shared, name, info),
        Some(shared) if shared.from_superblocks => {
            let f = FoundSuperblock { bdev_name: name, member_uuid: info.member_uuid, info };
            shared.found.lock().unwrap_or_else(|e| e.into_inner()).push(f);
            owner::on_owner(&shared, move |ras| {
                if let Some(ras) = ras {
                    try_start(&ras, hold);
                }
            });
        }
        Some(_) => module.problem(format!(
            "bdev {name}: superblock of array {} ({}), which is running without it: not added",
            info.name, info.array_uuid
        )),
        None => {
            if module.find(&info.name).is_some() || Registry::get().lookup(&info.name).is_some() {
                return module.problem(format!(
                    "bdev {name}: its superblock names array {} ({}), but that name is taken: not assembled",
                    info.name, info.array_uuid
                ));
            }
            let Some(shared) = new_assembling(&info) else { return };
            let f = FoundSuperblock { bdev_name: name, member_uuid: info.member_uuid, info };
            shared.found.lock().unwrap_or_else(|e| e.into_inner()).push(f);
            if let Some(ras) = ras_for(&shared) {
                try_start(&ras, hold);
            }
        }
    }
}

/// A configuring array described by a superblock (its members come later).
fn new_assembling(info: &SuperblockInfo) -> Option<Arc<ArrayShared>> {
    let bs = u64::from(info.block_size);
    let spec = CreateSpec {
        name: info.name.clone(),
        level: info.level,
        base_bdevs: Vec::new(),
        strip_size_kb: (info.strip_size_blocks * bs / 1024) as u32,
        uuid: Some(info.array_uuid),
        superblock: true,
        bitmap_chunk_kb: info.bitmap.map_or(0, |b| (b.chunk_size_blocks * bs / 1024) as u32),
    };
    let slots = info
        .slots
        .iter()
        .map(|s| Slot {
            role: Role::Missing,
            sb_uuid: s.member_uuid,
            data_offset_blocks: s.data_offset_blocks,
            data_size_blocks: s.data_size_blocks,
            ..Slot::empty()
        })
        .collect();
    let shared = match array::new_shared(&spec, slots, info.block_size, true) {
        Ok(s) => s,
        Err(e) => {
            RaidModule::get().problem(format!("array {}: {e}", info.name));
            return None;
        }
    };
    array::publish(&shared);
    tracing::info!(raid = %info.name, uuid = %info.array_uuid, "assembling from superblocks");
    Some(shared)
}

/// Re-plans an assembling array with every superblock found so far; starts
/// it once every member the superblock counts on is present — or, when it
/// can run without the missing ones, degraded after `assemble_timeout_sec`.
fn try_start(ras: &Rc<Ras>, hold: ExamineHold) {
    try_start_as(ras, hold, false);
}

fn try_start_as(ras: &Rc<Ras>, hold: ExamineHold, degraded_ok: bool) {
    let shared = ras.shared.clone();
    if shared.starting.load(Ordering::Acquire) || shared.deleted.load(Ordering::Acquire) {
        return;
    }
    let module = RaidModule::get();
    let found = shared.found.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let plan = match assemble(shared.uuid, &found, &[]) {
        Ok(p) => p,
        Err(e) => return module.problem(format!("array {}: not assembled: {e}", shared.name)),
    };
    for r in &plan.refused {
        module.problem(format!("array {}: {r}", shared.name));
    }
    {
        // Show what has been found so far.
        let mut ctl = shared.ctl();
        for (s, m) in ctl.slots.iter_mut().zip(&plan.members) {
            if s.role == Role::Missing {
                s.name = m.as_ref().map(|m| m.bdev_name.clone());
            }
        }
    }
    let waiting = plan
        .members
        .iter()
        .zip(&plan.superblock.slots)
        .filter(|(m, s)| m.is_none() && s.state != SlotState::Failed)
        .count();
    if waiting > 0 && !degraded_ok {
        if plan.startable {
            arm_degraded_start(ras);
        }
        return tracing::info!(raid = %shared.name, waiting, "assembling: waiting for members");
    }
    if waiting > 0 {
        tracing::warn!(raid = %shared.name, waiting, "members still missing: starting degraded");
    }
    if !plan.startable {
        return module.problem(format!("array {}: cannot start: {}", shared.name, plan.problems.join("; ")));
    }
    if shared.starting.swap(true, Ordering::AcqRel) {
        return;
    }
    for p in &plan.problems {
        tracing::warn!(raid = %shared.name, "{p}");
    }
    start_assembled(ras, plan, hold);
}

/// Starts the array degraded if its members are still missing when the
/// assembly timeout expires (once per array).
fn arm_degraded_start(ras: &Rc<Ras>) {
    let shared = &ras.shared;
    let secs = RaidModule::get().options().assemble_timeout_sec;
    if secs == 0 || shared.timer_armed.swap(true, Ordering::AcqRel) {
        return;
    }
    let weak = Rc::downgrade(ras);
    let deadline = reactor::now_ns() + u64::from(secs) * 1_000_000_000;
    reactor::register_timed_poller("raid_assemble_timeout", std::time::Duration::from_millis(100), move || {
        if reactor::now_ns() < deadline {
            return reactor::PollStatus::Idle;
        }
        if let Some(ras) = weak.upgrade() {
            ras.shared.timer_armed.store(false, Ordering::Release);
            try_start_as(&ras, Registry::get().examine_hold(), true);
        }
        reactor::PollStatus::Done
    });
}

/// The union of the bitmaps of `members` (all of them in sync, so each
/// holds every persisted bit; a member that cannot be read is skipped).
/// None when no member could be read.
fn load_union(
    members: Vec<BdevHandle>,
    g: bitmap::Geometry,
    offset: u64,
    done: impl FnOnce(Option<LoadedBitmap>) + 'static,
) {
    let state = Rc::new(RefCell::new((members.len(), None::<LoadedBitmap>, Some(done))));
    if members.is_empty() {
        let d = state.borrow_mut().2.take();
        if let Some(d) = d {
            d(None);
        }
        return;
    }
    for m in members {
        let st = state.clone();
        let name = m.name().to_string();
        bitmap::load(&m, g, offset, move |r| {
            let mut s = st.borrow_mut();
            s.0 -= 1;
            match r {
                Ok(lb) => match &mut s.1 {
                    Some(u) => {
                        for (a, b) in u.words.iter_mut().zip(&lb.words) {
                            *a |= b;
                        }
                        u.events_max = u.events_max.max(lb.events_max);
                        u.events_min = u.events_min.min(lb.events_min);
                    }
                    None => s.1 = Some(lb),
                },
                Err(e) => RaidModule::get().problem(format!("bdev {name}: bitmap not readable: {e}")),
            }
            if s.0 == 0 {
                let (u, d) = (s.1.take(), s.2.take());
                drop(s);
                if let Some(d) = d {
                    d(u);
                }
            }
        });
    }
}

/// A bitmap with every chunk dirty: what is known when none could be read.
fn all_dirty(g: bitmap::Geometry, events: u64) -> LoadedBitmap {
    let n = g.num_chunks();
    let mut words = vec![u64::MAX; g.num_words()];
    if !n.is_multiple_of(64) {
        if let Some(last) = words.last_mut() {
            *last = (1u64 << (n % 64)) - 1;
        }
    }
    LoadedBitmap { geometry: g, words, events_min: events, events_max: events }
}

/// Array ranges of a bitmap's set bits, coalesced.
pub(crate) fn chunk_ranges(g: &bitmap::Geometry, chunks: impl Iterator<Item = u64>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for c in chunks {
        let r = g.chunk_blocks(c);
        match out.last_mut() {
            Some(l) if l.end == r.start => l.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

/// Claims the planned members and starts the array: the bitmap is read from
/// the in-sync members, then persisted again with the superblock (dirty),
/// then the array goes online and resyncs what it owes.
fn start_assembled(ras: &Rc<Ras>, plan: AssemblyPlan, hold: ExamineHold) {
    let shared = ras.shared.clone();
    let module = RaidModule::get();
    let sb = plan.superblock.clone();
    // Keep a verification recorded before the shutdown. After a crash a
    // dirty stripe's parity may be wrong: a read-modify-write there keeps
    // it wrong by the same amount, and the resync (which holds each stripe
    // as a write does) recomputes it from the data.
    let verified = sb.redundancy_verified && shared.level.trusts_checked_redundancy();
    shared.redundancy_verified.store(verified, Ordering::Release);
    let give_up = |msg: String| {
        module.problem(format!("array {}: not started: {msg}", shared.name));
        shared.starting.store(false, Ordering::Release);
    };
    let bm_geo = match sb.bitmap {
        None => None,
        Some(loc) => match bitmap::Geometry::new(
            sb.array_uuid.into_bytes(),
            sb.block_size,
            sb.array_blocks,
            Some(loc.chunk_size_blocks),
        ) {
            Ok(g) if g.region_blocks() <= loc.length_blocks => Some(g),
            Ok(g) => {
                return give_up(format!(
                    "its bitmap needs {} blocks, the superblock reserves {}",
                    g.region_blocks(),
                    loc.length_blocks
                ))
            }
            Err(e) => return give_up(format!("bitmap geometry: {e}")),
        },
    };
    let reg = Registry::get();
    let tag = format!("raid {}", shared.name);
    let mut claimed: Vec<BdevHandle> = Vec::new();
    for m in plan.members.iter().flatten() {
        match reg.claim(&m.bdev_name, &tag) {
            Ok(h) => claimed.push(h),
            Err(e) => {
                for h in &claimed {
                    reg.release(h, &tag);
                }
                return give_up(format!("member {}: {e}", m.bdev_name));
            }
        }
    }
    let mut in_sync_members = Vec::new();
    {
        let mut ctl = shared.ctl();
        ctl.block_size = sb.block_size;
        for (i, (slot, planned)) in ctl.slots.iter_mut().zip(&plan.members).enumerate() {
            let s = &sb.slots[i];
            let base = Slot {
                sb_uuid: s.member_uuid,
                data_offset_blocks: s.data_offset_blocks,
                data_size_blocks: s.data_size_blocks,
                ..Slot::empty()
            };
            *slot = match planned {
                None => base,
                Some(pm) => {
                    let h = claimed.iter().find(|h| h.name() == pm.bdev_name).cloned();
                    let role = if pm.role == MemberRole::InSync { Role::Active } else { Role::Rebuilding };
                    if role == Role::Active {
                        if let Some(h) = &h {
                            in_sync_members.push(h.clone());
                        }
                    }
                    let recovered_blocks = match pm.role {
                        MemberRole::Recovering { recovery_offset_blocks } => recovery_offset_blocks,
                        _ => 0,
                    };
                    Slot {
                        name: Some(pm.bdev_name.clone()),
                        uuid: h.as_ref().map(|h| h.props().uuid),
                        handle: h,
                        role,
                        recovered_blocks,
                        ..base
                    }
                }
            };
        }
    }
    for h in &claimed {
        array::watch_removal(&shared, h);
    }
    let stale: Vec<usize> = plan
        .members
        .iter()
        .enumerate()
        .filter(|(_, m)| matches!(m, Some(pm) if matches!(pm.role, MemberRole::Stale { .. })))
        .map(|(i, _)| i)
        .collect();
    let r2 = ras.clone();
    let bitmap_loc = sb.bitmap;
    let dirty_start = plan.dirty && shared.level.is_redundant();
    let after_load = move |loaded: Option<LoadedBitmap>| {
        let ras = &r2;
        let shared = &ras.shared;
        let array_blocks = plan.geometry.array_blocks();
        let loaded = match (bm_geo, loaded) {
            (Some(g), None) => Some(all_dirty(g, sb.events)),
            (_, l) => l,
        };
        let dirty_ranges: Option<Vec<Range<u64>>> = match (&loaded, bm_geo) {
            (Some(lb), Some(g)) => Some(chunk_ranges(&g, lb.dirty_chunks())),
            _ => None,
        };
        {
            let mut ctl = shared.ctl();
            for &i in &stale {
                ctl.slots[i].partial = dirty_ranges.clone().map(Arc::new);
            }
            if dirty_start {
                let ranges = dirty_ranges.clone().unwrap_or_else(|| std::iter::once(0..array_blocks).collect());
                tracing::warn!(raid = %shared.name, ranges = ranges.len(), "unclean shutdown: resyncing");
                ctl.dirty = Some(Arc::new(ranges));
            }
        }
        let r3 = ras.clone();
        let geometry = plan.geometry.clone();
        start_metadata(
            ras,
            sb,
            bm_geo,
            loaded,
            Box::new(move |r| {
                let r = r.and_then(|()| array::go_online_with(&r3.shared, Some(geometry)));
                match r {
                    Ok(()) => {
                        r3.refresh();
                        tracing::info!(raid = %r3.shared.name, "assembled from superblocks");
                        rebuild::start_next(&r3);
                        rejoin_latecomers(&r3.shared);
                        drop(hold);
                    }
                    Err(e) => {
                        RaidModule::get().problem(format!("array {}: not started: {e}", r3.shared.name));
                        let r4 = r3.clone();
                        fail_start(&r3, move || {
                            drop(r4);
                            drop(hold);
                        });
                    }
                }
            }),
        );
    };
    match (bm_geo, bitmap_loc) {
        (Some(g), Some(loc)) => load_union(in_sync_members, g, loc.offset_blocks, after_load),
        _ => after_load(None),
    }
}

/// Bdevs whose superblocks were found while the array was starting (after
/// its plan was made): each joins the running array if it is a member
/// coming back.
fn rejoin_latecomers(shared: &Arc<ArrayShared>) {
    let found = std::mem::take(&mut *shared.found.lock().unwrap_or_else(|e| e.into_inner()));
    for f in found {
        let unclaimed = Registry::get().lookup(&f.bdev_name).is_some_and(|h| h.claimed_by().is_none());
        if unclaimed {
            rejoin(shared, f.bdev_name, f.info);
        }
    }
}

// ---- members coming back ------------------------------------------------------

/// If `found` is this array's superblock from a member that left (its slot
/// is empty or failed and still records it, its events are older): the slot
/// and the ranges written since, from the bitmap.
pub(crate) fn returning_member(ras: &Ras, found: &Found) -> Option<Returning> {
    let Found::Superblock(info) = found else { return None };
    let meta = ras.owner.as_ref().and_then(|o| o.meta.borrow().clone())?;
    if info.array_uuid != ras.shared.uuid || info.events >= meta.events() {
        return None;
    }
    let ctl = ras.shared.ctl();
    let slot =
        ctl.slots.iter().position(|s| s.sb_uuid == info.member_uuid && matches!(s.role, Role::Empty | Role::Failed))?;
    let ranges = ctl.bitmap.as_ref().map(|bm| Arc::new(chunk_ranges(bm.geometry(), bm.dirty_chunks().into_iter())));
    Some(Returning { slot, member_uuid: info.member_uuid, ranges })
}

/// A bdev carrying the superblock of a running array appeared: if it is a
/// member that left, it is added back and resynced where it missed writes.
fn rejoin(shared: &Arc<ArrayShared>, name: String, info: SuperblockInfo) {
    owner::on_owner_fenced(shared, move |fenced| {
        let Ok((ras, fence)) = fenced else { return };
        let found = Found::Superblock(info);
        let Some(returning) = returning_member(ras, &found) else {
            fence.done();
            return RaidModule::get().problem(format!(
                "bdev {name} carries a superblock of array {} but is not one of its missing members: not added",
                ras.shared.name
            ));
        };
        match array::add_member(ras, &name, Some(returning)) {
            Ok(_) => {
                let r2 = ras.clone();
                array::commit(ras, fence, move |_| rebuild::start_next(&r2));
            }
            Err(e) => {
                fence.done();
                RaidModule::get().problem(format!("bdev {name}: not added back to {}: {e}", ras.shared.name));
            }
        }
    });
}
