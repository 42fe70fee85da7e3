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
use crate::channel::{channel_for, ArrayChannel};
use crate::map::Geometry;
use crate::meta::{self, Found, Meta, SbWrite};
use crate::owner;
use crate::ppl::{self, PplLog, ReplayMember};
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
    let control = shared.control();
    let bs = control.block_size;
    let members: Vec<(Uuid, u64)> = control
        .slots
        .iter()
        .map(|s| (s.uuid.unwrap_or_else(Uuid::new_v4), s.handle.as_ref().map_or(0, |h| h.num_blocks())))
        .collect();
    drop(control);
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
    let mut layout = MetadataLayout::new(bs, length, chunk).map_err(invalid)?;
    if shared.level.keeps_partial_parity_log() {
        // raid5's write-hole log: a slot per partial write in flight on a
        // member, each a header and a chunk of partial parity (`ppl`).
        layout = layout.with_ppl(bs, ppl::area_blocks(bs, strip_blocks)).map_err(invalid)?;
    }
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
    let Some(channel) = channel_for(shared) else {
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
        let mut control = shared.control();
        for (s, i) in control.slots.iter_mut().zip(&info.slots) {
            s.data_offset_blocks = i.data_offset_blocks;
            s.sb_uuid = i.member_uuid;
        }
    }
    let r2 = channel.clone();
    let then: Then = Box::new(move |r| {
        let r = r.and_then(|()| array::go_online_with(&r2.shared, None));
        match r {
            Ok(()) => {
                r2.refresh();
                tracing::info!(raid = %r2.shared.name, "superblocks written");
                done(Ok(()))
            }
            Err(e) => fail_start(&r2, move || done(Err(e))),
        }
    });
    // A new array's log holds nothing: old headers on the members are wiped.
    let (channel2, sb) = (channel.clone(), info.clone());
    with_log_recovered(&channel, &sb, None, false, move |r| match r {
        Ok(_) => start_metadata(&channel2, info, bm_geo, None, then),
        Err(e) => then(Err(e)),
    });
}

/// For an array whose superblock records a partial parity log (`ppl`):
/// replays the valid entries of its in-sync members' logs (`replay`: an
/// unclean shutdown; `dirty`: the bitmap's dirty ranges) and wipes every
/// slot header of every member it has, then `then` with what the replay
/// did. Without a log, `then` at once. Runs before the array takes IO.
fn with_log_recovered(
    channel: &Rc<ArrayChannel>,
    info: &SuperblockInfo,
    dirty: Option<Vec<Range<u64>>>,
    replay: bool,
    then: impl FnOnce(Result<ppl::ReplayStats, BdevError>) + 'static,
) {
    let shared = &channel.shared;
    let Some(loc) = info.ppl.filter(|_| shared.level.keeps_partial_parity_log()) else {
        return then(Ok(ppl::ReplayStats::default()));
    };
    let geo = match info.geometry() {
        Ok(g) => g,
        Err(e) => return then(Err(invalid(e))),
    };
    let members: Vec<Option<ReplayMember>> = shared
        .control()
        .slots
        .iter()
        .map(|s| match (&s.handle, s.role) {
            (Some(h), Role::Active | Role::Rebuilding) => Some(ReplayMember {
                handle: h.clone(),
                data_offset_blocks: s.data_offset_blocks,
                in_sync: s.role == Role::Active,
            }),
            _ => None,
        })
        .collect();
    let name = shared.name.clone();
    ppl::recover(
        loc,
        geo,
        info.block_size,
        info.array_uuid.into_bytes(),
        members,
        dirty,
        replay,
        Box::new(move |r| match r {
            Ok(stats) => {
                if replay {
                    tracing::warn!(raid = %name, ?stats, "partial parity log replayed");
                }
                then(Ok(stats))
            }
            Err(e) => then(Err(invalid(format!("partial parity log: {e}")))),
        }),
    );
}

/// Creates the bitmap owner (if any) and the metadata state, persists every
/// bitmap page and then the superblock (dirty: the array is about to run).
fn start_metadata(
    channel: &Rc<ArrayChannel>,
    info: SuperblockInfo,
    bm_geo: Option<bitmap::Geometry>,
    initial: Option<LoadedBitmap>,
    then: Then,
) {
    let shared = &channel.shared;
    let Some(owner) = &channel.owner else {
        return then(Err(invalid("metadata must start on the owner reactor")));
    };
    let bm = match (bm_geo, info.bitmap) {
        (Some(g), Some(loc)) => {
            match BitmapOwner::new(
                g,
                meta::writable_handles(channel),
                loc.offset_blocks,
                initial.as_ref(),
                // A parity level's first partial write into a chunk leaves
                // parity right only in the rows it wrote (`rebuild`'s sync pass).
                OwnerOptions {
                    first_write_needs_sync: shared.level.trusts_checked_redundancy(),
                    ..OwnerOptions::default()
                },
            ) {
                Ok(b) => Some(b),
                Err(e) => return then(Err(invalid(format!("bitmap: {e}")))),
            }
        }
        _ => None,
    };
    if let (Some(loc), true) = (info.ppl, shared.level.keeps_partial_parity_log()) {
        let members = info.num_members();
        match PplLog::new(loc, info.block_size, info.strip_size_blocks, members, info.array_uuid.into_bytes()) {
            Some(log) => {
                let _ = shared.ppl.set(Arc::new(log));
            }
            None => return then(Err(invalid("the partial parity log area holds no entry slot"))),
        }
    }
    let meta = Meta::new(info, bm.clone());
    *owner.meta.borrow_mut() = Some(meta.clone());
    let r2 = channel.clone();
    let write_sb = move || meta::update(&r2, &meta, SbWrite::Dirty, then);
    match bm {
        Some(bm) => {
            {
                let mut control = shared.control();
                control.bitmap = Some(bm.bitmap());
                bm.set_in_sync(array::in_sync(shared, &control));
            }
            meta::watch_bitmap_failures(channel, &bm);
            rebuild::watch_needs_sync(channel, &bm);
            bm.start_poller(bitmap::DEFAULT_TICK_PERIOD);
            bm.flush(write_sb);
        }
        None => write_sb(),
    }
}

/// An array whose start failed: stop its bitmap, then forget it.
fn fail_start(channel: &Rc<ArrayChannel>, then: impl FnOnce() + 'static) {
    let meta = channel.owner.as_ref().and_then(|o| o.meta.borrow_mut().take());
    let shared = channel.shared.clone();
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
pub(crate) fn close_metadata(channel: &Rc<ArrayChannel>, meta: Rc<Meta>, then: impl FnOnce() + 'static) {
    rebuild::cancel(channel);
    let kind = if channel.shared.clear_sb.load(Ordering::Acquire) {
        SbWrite::Wipe
    } else if channel.shared.control().dirty.is_some() {
        SbWrite::Dirty
    } else {
        SbWrite::Clean
    };
    let (r2, m2) = (channel.clone(), meta.clone());
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
            owner::on_owner(&shared, move |channel| {
                if let Some(channel) = channel {
                    try_start(&channel, hold);
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
            if let Some(channel) = channel_for(&shared) {
                try_start(&channel, hold);
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
fn try_start(channel: &Rc<ArrayChannel>, hold: ExamineHold) {
    try_start_as(channel, hold, false);
}

fn try_start_as(channel: &Rc<ArrayChannel>, hold: ExamineHold, degraded_ok: bool) {
    let shared = channel.shared.clone();
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
        let mut control = shared.control();
        for (s, m) in control.slots.iter_mut().zip(&plan.members) {
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
            arm_degraded_start(channel);
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
    start_assembled(channel, plan, hold);
}

/// Starts the array degraded if its members are still missing when the
/// assembly timeout expires (once per array).
fn arm_degraded_start(channel: &Rc<ArrayChannel>) {
    let shared = &channel.shared;
    let secs = RaidModule::get().options().assemble_timeout_sec;
    if secs == 0 || shared.timer_armed.swap(true, Ordering::AcqRel) {
        return;
    }
    let weak = Rc::downgrade(channel);
    let deadline = reactor::now_ns() + u64::from(secs) * 1_000_000_000;
    reactor::register_timed_poller("raid_assemble_timeout", std::time::Duration::from_millis(100), move || {
        if reactor::now_ns() < deadline {
            return reactor::PollStatus::Idle;
        }
        if let Some(channel) = weak.upgrade() {
            channel.shared.timer_armed.store(false, Ordering::Release);
            try_start_as(&channel, Registry::get().examine_hold(), true);
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
    // Which chunks were written is not known either: all of them.
    LoadedBitmap { geometry: g, words, written: None, events_min: events, events_max: events }
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
fn start_assembled(channel: &Rc<ArrayChannel>, plan: AssemblyPlan, hold: ExamineHold) {
    let shared = channel.shared.clone();
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
            // (An array made before the written plane reserved one plane.)
            Ok(g) if g.legacy_region_blocks() <= loc.length_blocks => Some(g),
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
        let mut control = shared.control();
        control.block_size = sb.block_size;
        for (i, (slot, planned)) in control.slots.iter_mut().zip(&plan.members).enumerate() {
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
    let r2 = channel.clone();
    let bitmap_loc = sb.bitmap;
    let dirty_start = plan.dirty && shared.level.is_redundant();
    let after_load = move |loaded: Option<LoadedBitmap>| {
        let channel = &r2;
        let shared = &channel.shared;
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
            let mut control = shared.control();
            for &i in &stale {
                control.slots[i].partial = dirty_ranges.clone().map(Arc::new);
            }
            if dirty_start {
                let ranges = dirty_ranges.clone().unwrap_or_else(|| std::iter::once(0..array_blocks).collect());
                tracing::warn!(raid = %shared.name, ranges = ranges.len(), "unclean shutdown: resyncing");
                control.dirty = Some(Arc::new(ranges));
            }
        }
        let r3 = channel.clone();
        let geometry = plan.geometry.clone();
        let start_rest = move |channel: &Rc<ArrayChannel>, sb: SuperblockInfo| {
            start_metadata(
                channel,
                sb,
                bm_geo,
                loaded,
                Box::new(move |r| {
                    let r = r.and_then(|()| array::go_online_with(&r3.shared, Some(geometry)));
                    match r {
                        Ok(()) => {
                            r3.refresh();
                            tracing::info!(raid = %r3.shared.name, "assembled from superblocks");
                            *r3.shared.start_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
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
        // An unclean shutdown: the partial parity log puts each stripe a
        // write was changing in part back in agreement with its parity
        // before anything else reads or writes it. Then a degraded array
        // has nothing left to resync (a missing member's chunks reconstruct
        // right); a whole one still resyncs its dirty stripes (also those
        // of torn whole-stripe writes, which log nothing).
        let (r4, sb2) = (channel.clone(), sb.clone());
        let replay = dirty_start && sb.ppl.is_some();
        with_log_recovered(channel, &sb2, dirty_ranges.clone(), replay, move |r| match r {
            Ok(_) => {
                if replay {
                    let mut control = r4.shared.control();
                    if control.slots.iter().any(|s| s.role != Role::Active) {
                        control.dirty = None;
                    }
                }
                start_rest(&r4, sb)
            }
            Err(e) => release_members(&r4.shared, format!("array {}: not started: {e}", r4.shared.name)),
        });
    };
    match (bm_geo, bitmap_loc) {
        (Some(g), Some(loc)) => load_union(in_sync_members, g, loc.offset_blocks, after_load),
        _ => after_load(None),
    }
}

/// A start from superblocks failed before the array went online (its log
/// replay could not read or write a member): every member it claimed is
/// released and its slot shows it missing again, so the bdevs are usable
/// (and a later examination may try again); `msg` goes to the log, the
/// module's problems and the array's listing (`start_error`).
fn release_members(shared: &Arc<ArrayShared>, msg: String) {
    RaidModule::get().problem(msg.clone());
    let tag = format!("raid {}", shared.name);
    let handles: Vec<BdevHandle> = {
        let mut control = shared.control();
        control.dirty = None;
        control
            .slots
            .iter_mut()
            .filter_map(|s| {
                let h = s.handle.take();
                *s = Slot {
                    name: s.name.take(),
                    sb_uuid: s.sb_uuid,
                    data_offset_blocks: s.data_offset_blocks,
                    data_size_blocks: s.data_size_blocks,
                    role: Role::Missing,
                    ..Slot::empty()
                };
                h
            })
            .collect()
    };
    let reg = Registry::get();
    for h in &handles {
        reg.release(h, &tag);
    }
    *shared.start_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
    shared.starting.store(false, Ordering::Release);
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
pub(crate) fn returning_member(channel: &ArrayChannel, found: &Found) -> Option<Returning> {
    let Found::Superblock(info) = found else { return None };
    let meta = channel.owner.as_ref().and_then(|o| o.meta.borrow().clone())?;
    if info.array_uuid != channel.shared.uuid || info.events >= meta.events() {
        return None;
    }
    let control = channel.shared.control();
    let slot = control
        .slots
        .iter()
        .position(|s| s.sb_uuid == info.member_uuid && matches!(s.role, Role::Empty | Role::Failed))?;
    let ranges = control.bitmap.as_ref().map(|bm| Arc::new(chunk_ranges(bm.geometry(), bm.dirty_chunks().into_iter())));
    Some(Returning { slot, member_uuid: info.member_uuid, ranges })
}

/// A bdev carrying the superblock of a running array appeared: if it is a
/// member that left, it is added back and resynced where it missed writes.
/// With a partial parity log, its log is wiped first: entries it holds
/// from before it left may be for stripes written since (without it), and
/// the slot table knows nothing of them (`ppl`).
fn rejoin(shared: &Arc<ArrayShared>, name: String, info: SuperblockInfo) {
    let log = shared.ppl.get().is_some();
    let (geo, h) = (shared.geometry.get(), Registry::get().lookup(&name));
    let slot = info.this_slot;
    match (log, info.ppl, geo, h) {
        (true, Some(loc), Some(geo), Some(h)) if slot < geo.num_members() => {
            let mut members: Vec<Option<ReplayMember>> = (0..geo.num_members()).map(|_| None).collect();
            members[slot] = Some(ReplayMember { handle: h, data_offset_blocks: 0, in_sync: false });
            let (shared2, uuid) = (shared.clone(), info.array_uuid.into_bytes());
            let bs = info.block_size;
            ppl::recover(
                loc,
                crate::map::Geometry::clone(geo),
                bs,
                uuid,
                members,
                None,
                false,
                Box::new(move |r| match r {
                    Ok(_) => rejoin_fenced(&shared2, name, info),
                    Err(e) => RaidModule::get().problem(format!("bdev {name}: not added back: {e}")),
                }),
            );
        }
        _ => rejoin_fenced(shared, name, info),
    }
}

/// Wipes the partial parity log area of `h`, about to join the running
/// array in `slot` by `bdev_raid_add_base_bdev` or by coming back after a
/// failure (`array::member_restored`), for the reason `rejoin` gives: old
/// entries of this array there would be replayed against newer data. Then
/// `then`; at once when the array keeps no log.
pub(crate) fn wipe_joining_log(
    shared: &ArrayShared,
    h: BdevHandle,
    slot: usize,
    then: Box<dyn FnOnce(Result<(), String>)>,
) {
    let (Some(log), Some(geo)) = (shared.ppl.get(), shared.geometry.get()) else { return then(Ok(())) };
    if slot >= geo.num_members() {
        return then(Ok(()));
    }
    let loc =
        crate::superblock::PplLocation { offset_blocks: log.offset_blocks, length_blocks: log.slots * log.slot_blocks };
    let bs = h.props().block_size;
    let mut members: Vec<Option<ReplayMember>> = (0..geo.num_members()).map(|_| None).collect();
    members[slot] = Some(ReplayMember { handle: h, data_offset_blocks: 0, in_sync: false });
    let geo = crate::map::Geometry::clone(geo);
    ppl::recover(loc, geo, bs, log.array_uuid, members, None, false, Box::new(move |r| then(r.map(|_| ()))));
}

fn rejoin_fenced(shared: &Arc<ArrayShared>, name: String, info: SuperblockInfo) {
    owner::on_owner_fenced(shared, move |fenced| {
        let Ok((channel, fence)) = fenced else { return };
        let found = Found::Superblock(info);
        let Some(returning) = returning_member(channel, &found) else {
            fence.done();
            return RaidModule::get().problem(format!(
                "bdev {name} carries a superblock of array {} but is not one of its missing members: not added",
                channel.shared.name
            ));
        };
        match array::add_member(channel, &name, Some(returning)) {
            Ok(_) => {
                let r2 = channel.clone();
                array::commit(channel, fence, move |_| rebuild::start_next(&r2));
            }
            Err(e) => {
                fence.done();
                RaidModule::get().problem(format!("bdev {name}: not added back to {}: {e}", channel.shared.name));
            }
        }
    });
}
