//! Assembly decisions: given the superblocks found on a set of bdevs, which
//! copy is authoritative, which bdev fills which slot in which role (in
//! sync, stale, recovering), which bdevs are refused and why, and whether the
//! array may start (and degraded, and after an unclean shutdown).
//!
//! Pure: no IO, no reactor. The caller reads block 0 of each bdev, decodes it
//! with `superblock::decode`, groups the results with [`group_by_array`] and
//! calls [`assemble`] once per array; it acts on the returned plan.
//!
//! Rules (md's, for superblocks with an events counter):
//! - the freshest copy (most events) describes the array; copies that tie
//!   must agree, otherwise the array has split and nothing is assembled;
//! - a bdev counts only if the freshest slot table lists its member UUID at
//!   the slot it claims, with the same geometry;
//! - a listed member with fewer events missed metadata (so possibly data)
//!   updates: it is stale, never read, and resynced;
//! - two bdevs claiming one slot are both refused: there is no telling which
//!   is the real member (a block-level copy of a disk looks exactly alike).

use crate::map::Geometry;
use crate::superblock::{SlotState, SuperblockError, SuperblockInfo};
use std::collections::BTreeMap;
use std::fmt;
use uuid::Uuid;

/// A superblock that decoded, and where it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundSuperblock {
    pub bdev_name: String,
    /// The UUID the caller knows the bdev's member by; must equal the
    /// superblock's own `member_uuid` (a mismatch means a copied or
    /// re-labelled disk). Callers whose bdev UUIDs are not persistent pass
    /// `info.member_uuid`.
    pub member_uuid: Uuid,
    pub info: SuperblockInfo,
}

impl From<(String, Uuid, SuperblockInfo)> for FoundSuperblock {
    fn from((bdev_name, member_uuid, info): (String, Uuid, SuperblockInfo)) -> Self {
        FoundSuperblock { bdev_name, member_uuid, info }
    }
}

/// Sorts found superblocks by the array they claim, in UUID order.
pub fn group_by_array(found: impl IntoIterator<Item = FoundSuperblock>) -> BTreeMap<Uuid, Vec<FoundSuperblock>> {
    let mut groups: BTreeMap<Uuid, Vec<FoundSuperblock>> = BTreeMap::new();
    for f in found {
        groups.entry(f.info.array_uuid).or_default().push(f);
    }
    groups
}

/// What a present member may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberRole {
    /// Up to date: read from it and write to it.
    InSync,
    /// Missed updates (its superblock has `events` < the array's): write to
    /// it, never read from it, resync it (the chunks the bitmap marks, or all
    /// of it without a bitmap).
    Stale { events: u64 },
    /// Being rebuilt (or a spare about to be): blocks below the offset
    /// (member data blocks) are valid, the rebuild continues from there.
    Recovering { recovery_offset_blocks: u64 },
}

/// The bdev chosen for a slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedMember {
    pub bdev_name: String,
    pub member_uuid: Uuid,
    pub role: MemberRole,
}

/// Why a bdev takes no part in the array.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RefusalReason {
    #[error("its superblock belongs to array {found}, not {expected}")]
    OtherArray { expected: Uuid, found: Uuid },
    #[error("the bdev is member {bdev_member} but its superblock describes member {superblock_member}")]
    UuidMismatch { bdev_member: Uuid, superblock_member: Uuid },
    #[error("it claims to be a member of array {array_uuid} (slot {slot}) but the array does not list it")]
    NotListed { array_uuid: Uuid, slot: usize },
    #[error("it claims slot {claimed} but the array lists it in slot {listed}")]
    WrongSlot { claimed: usize, listed: usize },
    #[error("its geometry disagrees with the array's: {0}")]
    GeometryMismatch(String),
    #[error("slot {slot} is also claimed by {other}")]
    DuplicateSlot { slot: usize, other: String },
    #[error("the bdev was offered twice")]
    DuplicateBdev,
    #[error("its superblock is unreadable: {0}")]
    Undecodable(SuperblockError),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub bdev_name: String,
    pub reason: RefusalReason,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bdev {} refused: {}", self.bdev_name, self.reason)
    }
}

/// Why no plan can be made at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AssemblyError {
    #[error("no usable superblock of array {0} was found")]
    NoMembers(Uuid),
    #[error(
        "array {array_uuid} has split: the superblocks on {first} and {second} both have events {events} but differ ({difference})"
    )]
    Conflict { array_uuid: Uuid, events: u64, first: String, second: String, difference: String },
    #[error("the freshest superblock of array {array_uuid} describes no usable layout: {error}")]
    Geometry { array_uuid: Uuid, error: SuperblockError },
}

/// What to do with one array.
#[derive(Clone, Debug)]
pub struct AssemblyPlan {
    /// The freshest superblock: the array's state, and the template for the
    /// next superblock write (bump `events` first).
    pub superblock: SuperblockInfo,
    pub geometry: Geometry,
    /// Indexed by slot; None where no usable bdev was found.
    pub members: Vec<Option<PlannedMember>>,
    pub refused: Vec<Refused>,
    /// Some slot has no in-sync member.
    pub degraded: bool,
    /// Every block of the array is on some in-sync member.
    pub startable: bool,
    /// The array was not shut down cleanly: the bitmap's chunks need resync.
    pub dirty: bool,
    /// Everything an operator should hear about, one line each.
    pub problems: Vec<String>,
}

impl AssemblyPlan {
    pub fn array_uuid(&self) -> Uuid {
        self.superblock.array_uuid
    }

    pub fn events(&self) -> u64 {
        self.superblock.events
    }

    /// Slots with no bdev at all.
    pub fn missing_slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.members.iter().enumerate().filter(|(_, m)| m.is_none()).map(|(i, _)| i)
    }

    /// Every slot has an in-sync member.
    pub fn complete(&self) -> bool {
        self.members.iter().all(|m| matches!(m, Some(PlannedMember { role: MemberRole::InSync, .. })))
    }
}

/// The fields in which two copies of an array's state differ, for messages.
fn state_difference(a: &SuperblockInfo, b: &SuperblockInfo) -> String {
    let mut d = Vec::new();
    let mut field = |name: &str, x: String, y: String| {
        if x != y {
            d.push(format!("{name} {x} vs {y}"));
        }
    };
    field("name", format!("{:?}", a.name), format!("{:?}", b.name));
    field("clean", a.clean.to_string(), b.clean.to_string());
    field("redundancy_verified", a.redundancy_verified.to_string(), b.redundancy_verified.to_string());
    field("slots", a.slots.len().to_string(), b.slots.len().to_string());
    for (i, (x, y)) in a.slots.iter().zip(&b.slots).enumerate() {
        field(&format!("slot {i}"), format!("{x:?}"), format!("{y:?}"));
    }
    if let Some(g) = geometry_difference(a, b) {
        d.push(g);
    }
    if d.is_empty() {
        d.push("identical".into());
    }
    d.join(", ")
}

/// Differences in the array's fixed shape (not in slot states or the clean flag).
fn geometry_difference(a: &SuperblockInfo, b: &SuperblockInfo) -> Option<String> {
    let mut d = Vec::new();
    if a.level != b.level {
        d.push(format!("level {} vs {}", a.level.name(), b.level.name()));
    }
    let mut num = |name: &str, x: u64, y: u64| {
        if x != y {
            d.push(format!("{name} {x} vs {y}"));
        }
    };
    num("strip_size_blocks", a.strip_size_blocks, b.strip_size_blocks);
    num("block_size", u64::from(a.block_size), u64::from(b.block_size));
    num("members", a.slots.len() as u64, b.slots.len() as u64);
    num("array_blocks", a.array_blocks, b.array_blocks);
    if a.bitmap != b.bitmap {
        d.push(format!("bitmap {:?} vs {:?}", a.bitmap, b.bitmap));
    }
    (!d.is_empty()).then(|| d.join(", "))
}

/// Decides how array `array_uuid` assembles from `found` (superblocks that
/// decoded; any that claim another array are refused) and `undecodable`
/// (bdevs expected to carry one whose superblock failed to decode: reported,
/// never used). Leave out bdevs with no superblock at all (`BadMagic` on a
/// blank device) unless they were expected to be members.
pub fn assemble(
    array_uuid: Uuid,
    found: &[FoundSuperblock],
    undecodable: &[(String, SuperblockError)],
) -> Result<AssemblyPlan, AssemblyError> {
    let mut refused: Vec<Refused> = undecodable
        .iter()
        .map(|(bdev, e)| Refused { bdev_name: bdev.clone(), reason: RefusalReason::Undecodable(e.clone()) })
        .collect();
    fn refuse(refused: &mut Vec<Refused>, f: &FoundSuperblock, reason: RefusalReason) {
        refused.push(Refused { bdev_name: f.bdev_name.clone(), reason });
    }

    // Copies that may take part in choosing the freshest.
    let mut candidates: Vec<&FoundSuperblock> = Vec::with_capacity(found.len());
    for f in found {
        if f.info.array_uuid != array_uuid {
            refuse(&mut refused, f, RefusalReason::OtherArray { expected: array_uuid, found: f.info.array_uuid });
        } else if f.member_uuid != f.info.member_uuid {
            let reason =
                RefusalReason::UuidMismatch { bdev_member: f.member_uuid, superblock_member: f.info.member_uuid };
            refuse(&mut refused, f, reason);
        } else if candidates.iter().any(|c| c.bdev_name == f.bdev_name) {
            refuse(&mut refused, f, RefusalReason::DuplicateBdev);
        } else {
            candidates.push(f);
        }
    }

    let freshest = *candidates.iter().max_by_key(|c| c.info.events).ok_or(AssemblyError::NoMembers(array_uuid))?;
    let events = freshest.info.events;
    if let Some(other) = candidates.iter().find(|c| c.info.events == events && !c.info.same_array_state(&freshest.info))
    {
        return Err(AssemblyError::Conflict {
            array_uuid,
            events,
            first: freshest.bdev_name.clone(),
            second: other.bdev_name.clone(),
            difference: state_difference(&freshest.info, &other.info),
        });
    }
    let sb = &freshest.info;
    let geometry = sb.geometry().map_err(|error| AssemblyError::Geometry { array_uuid, error })?;

    // Which slot each remaining candidate fills.
    let mut claims: Vec<(usize, &FoundSuperblock)> = Vec::with_capacity(candidates.len());
    for &c in &candidates {
        let claimed = c.info.this_slot;
        let Some(listed) = sb.slot_of(c.member_uuid) else {
            refuse(&mut refused, c, RefusalReason::NotListed { array_uuid, slot: claimed });
            continue;
        };
        if listed != claimed {
            refuse(&mut refused, c, RefusalReason::WrongSlot { claimed, listed });
            continue;
        }
        let ours = &c.info.slots[claimed];
        let theirs = &sb.slots[listed];
        let mut diff = geometry_difference(sb, &c.info);
        if (ours.data_offset_blocks, ours.data_size_blocks) != (theirs.data_offset_blocks, theirs.data_size_blocks) {
            let data = format!(
                "data area {}+{} vs {}+{} blocks",
                theirs.data_offset_blocks, theirs.data_size_blocks, ours.data_offset_blocks, ours.data_size_blocks
            );
            diff = Some(diff.map_or(data.clone(), |d| format!("{d}, {data}")));
        }
        if let Some(d) = diff {
            refuse(&mut refused, c, RefusalReason::GeometryMismatch(d));
            continue;
        }
        claims.push((listed, c));
    }

    let mut members: Vec<Option<PlannedMember>> = vec![None; sb.slots.len()];
    for &(slot, c) in &claims {
        let rivals: Vec<&str> = claims
            .iter()
            .filter(|(s, o)| *s == slot && o.bdev_name != c.bdev_name)
            .map(|(_, o)| o.bdev_name.as_str())
            .collect();
        if !rivals.is_empty() {
            refuse(&mut refused, c, RefusalReason::DuplicateSlot { slot, other: rivals.join(", ") });
            continue;
        }
        let up_to_date = c.info.events == events;
        let role = match sb.slots[slot].state {
            SlotState::Active if up_to_date => MemberRole::InSync,
            SlotState::Active | SlotState::Failed => MemberRole::Stale { events: c.info.events },
            // Progress recorded while this member was away may not cover writes
            // it missed since: start over.
            SlotState::Rebuilding { recovery_offset_blocks } if up_to_date => {
                MemberRole::Recovering { recovery_offset_blocks }
            }
            SlotState::Rebuilding { .. } | SlotState::Spare => MemberRole::Recovering { recovery_offset_blocks: 0 },
        };
        members[slot] = Some(PlannedMember { bdev_name: c.bdev_name.clone(), member_uuid: c.member_uuid, role });
    }

    let in_sync = |m: usize| matches!(members[m], Some(PlannedMember { role: MemberRole::InSync, .. }));
    let startable = geometry.survives(|m| !in_sync(m));
    let degraded = (0..members.len()).any(|m| !in_sync(m));
    let dirty = !sb.clean;

    let mut problems: Vec<String> = refused.iter().map(ToString::to_string).collect();
    for (slot, m) in members.iter().enumerate() {
        let s = &sb.slots[slot];
        match m {
            None => problems.push(format!("slot {slot} ({}, member {}) has no bdev", s.state.name(), s.member_uuid)),
            Some(PlannedMember { bdev_name, role: MemberRole::Stale { events: e }, .. }) => problems.push(format!(
                "bdev {bdev_name} (slot {slot}) is stale: events {e} < {events}; it will be resynced, not read"
            )),
            Some(PlannedMember { bdev_name, role: MemberRole::Recovering { recovery_offset_blocks }, .. }) => problems
                .push(format!(
                    "bdev {bdev_name} (slot {slot}) is {}: rebuild resumes at block {recovery_offset_blocks}",
                    s.state.name()
                )),
            Some(_) => {}
        }
    }
    if !startable {
        problems.push(format!(
            "array {} ({}) cannot start: in-sync members hold only part of its data",
            sb.name,
            sb.level.name()
        ));
    }
    if dirty {
        problems.push(format!("array {} was not shut down cleanly: dirty regions need resync", sb.name));
    }

    Ok(AssemblyPlan { superblock: sb.clone(), geometry, members, refused, degraded, startable, dirty, problems })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::level::{named, Level, LEVELS};
    use crate::superblock::{decode, encode, MetadataLayout, SlotState};
    use proptest::prelude::*;

    const ARRAY: Uuid = Uuid::from_u128(0xa11a);

    fn member(i: usize) -> Uuid {
        Uuid::from_u128(0x1000 + i as u128)
    }

    /// Slot 0's copy of a fresh array of `n` members of 1 GiB-ish, events 10.
    fn array(level: Level, n: usize) -> SuperblockInfo {
        let layout = MetadataLayout::new(512, 16, 1 << 14).unwrap();
        let members: Vec<(Uuid, u64)> = (0..n).map(|i| (member(i), 1 << 21)).collect();
        let mut info = SuperblockInfo::new_array("md0", ARRAY, level, 128, 512, &layout, &members).unwrap();
        info.events = 10;
        info
    }

    /// The copy on slot `slot`'s bdev, round-tripped through the disk format.
    fn found(info: &SuperblockInfo, slot: usize) -> FoundSuperblock {
        let info = decode(&encode(&info.for_slot(slot).unwrap())).unwrap();
        FoundSuperblock { bdev_name: format!("bdev{slot}"), member_uuid: member(slot), info }
    }

    fn all(info: &SuperblockInfo) -> Vec<FoundSuperblock> {
        (0..info.slots.len()).map(|s| found(info, s)).collect()
    }

    fn roles(plan: &AssemblyPlan) -> Vec<Option<MemberRole>> {
        plan.members.iter().map(|m| m.as_ref().map(|m| m.role)).collect()
    }

    #[test]
    fn complete_clean_array() {
        for level in LEVELS {
            let info = array(level, 4);
            let plan = assemble(ARRAY, &all(&info), &[]).unwrap();
            assert!(plan.startable && !plan.degraded && !plan.dirty && plan.complete(), "{level:?}");
            assert!(plan.problems.is_empty() && plan.refused.is_empty(), "{:?}", plan.problems);
            assert_eq!(plan.superblock.events, 10);
            assert_eq!(plan.geometry, info.geometry().unwrap());
            assert_eq!(plan.members[3].as_ref().unwrap().bdev_name, "bdev3");
        }
    }

    #[test]
    fn freshest_wins_and_the_stale_member_is_resynced() {
        // bdev0 was removed at events 10; the others carried on to 14 and
        // marked slot 0 failed. bdev0 comes back.
        let old = array(named("raid1"), 3);
        let mut new = old.clone();
        new.events = 14;
        new.slots[0].state = SlotState::Failed;
        let set = vec![found(&old, 0), found(&new, 1), found(&new, 2)];
        for order in [set.clone(), set.iter().rev().cloned().collect()] {
            let plan = assemble(ARRAY, &order, &[]).unwrap();
            assert_eq!(plan.events(), 14);
            assert_eq!(plan.superblock.slots[0].state, SlotState::Failed);
            assert_eq!(
                roles(&plan),
                vec![Some(MemberRole::Stale { events: 10 }), Some(MemberRole::InSync), Some(MemberRole::InSync)]
            );
            assert!(plan.startable && plan.degraded && !plan.complete());
            assert!(plan.problems.iter().any(|p| p.contains("bdev0") && p.contains("stale")), "{:?}", plan.problems);
        }
        // Stale although the array still lists it active (it missed the last update).
        let mut newer = old.clone();
        newer.events = 11;
        let plan = assemble(ARRAY, &[found(&old, 0), found(&newer, 1)], &[]).unwrap();
        assert_eq!(roles(&plan), vec![Some(MemberRole::Stale { events: 10 }), Some(MemberRole::InSync), None]);
        // Alone, an old copy cannot know it is old (md has the same limit):
        // it is the freshest there is.
        let plan = assemble(ARRAY, &[found(&old, 0)], &[]).unwrap();
        assert_eq!(roles(&plan), vec![Some(MemberRole::InSync), None, None]);
        assert!(plan.startable && plan.degraded);
    }

    #[test]
    fn rebuilding_and_spare_slots_recover() {
        let mut info = array(named("raid1"), 3);
        info.slots[1].state = SlotState::Rebuilding { recovery_offset_blocks: 4096 };
        info.slots[2].state = SlotState::Spare;
        let plan = assemble(ARRAY, &all(&info), &[]).unwrap();
        assert_eq!(
            roles(&plan),
            vec![
                Some(MemberRole::InSync),
                Some(MemberRole::Recovering { recovery_offset_blocks: 4096 }),
                Some(MemberRole::Recovering { recovery_offset_blocks: 0 }),
            ]
        );
        assert!(plan.startable && plan.degraded);
        // A rebuilding member that also missed updates starts over.
        let mut newer = info.clone();
        newer.events += 1;
        let plan = assemble(ARRAY, &[found(&newer, 0), found(&info, 1)], &[]).unwrap();
        assert_eq!(plan.members[1].as_ref().unwrap().role, MemberRole::Recovering { recovery_offset_blocks: 0 });
    }

    #[test]
    fn tie_with_different_content_is_a_conflict() {
        let a = array(named("raid1"), 2);
        let mut b = a.clone();
        b.slots[0].state = SlotState::Failed; // same events, different history: split brain
        let err = assemble(ARRAY, &[found(&a, 0), found(&b, 1)], &[]).unwrap_err();
        match &err {
            AssemblyError::Conflict { events: 10, difference, .. } => {
                assert!(difference.contains("slot 0"), "{difference}")
            }
            e => panic!("{e:?}"),
        }
        assert!(err.to_string().contains("has split"));
        let mut c = a.clone();
        c.clean = false;
        assert!(matches!(assemble(ARRAY, &[found(&a, 0), found(&c, 1)], &[]), Err(AssemblyError::Conflict { .. })));
    }

    #[test]
    fn foreign_and_unlisted_members_are_refused() {
        let info = array(named("raid1"), 2);
        // A member of another array offered for this one.
        let mut other = info.clone();
        other.array_uuid = Uuid::from_u128(0xbeef);
        let mut set = all(&info);
        set.push(FoundSuperblock { bdev_name: "stray".into(), ..found(&other, 1) });
        let plan = assemble(ARRAY, &set, &[]).unwrap();
        assert!(plan.startable && !plan.degraded);
        assert!(
            matches!(&plan.refused[..], [Refused { bdev_name, reason: RefusalReason::OtherArray { .. } }] if bdev_name == "stray")
        );

        // Slot 1 was replaced by a new member (uuid 99) at events 12; the old
        // one comes back claiming slot 1.
        let mut replaced = info.clone();
        replaced.events = 12;
        replaced.slots[1].member_uuid = Uuid::from_u128(99);
        let new1 = FoundSuperblock {
            bdev_name: "new1".into(),
            member_uuid: Uuid::from_u128(99),
            info: replaced.for_slot(1).unwrap(),
        };
        let plan = assemble(ARRAY, &[found(&replaced, 0), new1, found(&info, 1)], &[]).unwrap();
        assert!(plan.complete());
        assert_eq!(plan.refused.len(), 1);
        let msg = plan.refused[0].to_string();
        assert!(msg.contains("bdev1") && msg.contains(&format!("claims to be a member of array {ARRAY}")), "{msg}");
        assert!(msg.contains("does not list it"), "{msg}");

        // The bdev's own UUID disagrees with its superblock's.
        let mut liar = found(&info, 1);
        liar.member_uuid = Uuid::from_u128(5);
        let plan = assemble(ARRAY, &[found(&info, 0), liar], &[]).unwrap();
        assert!(matches!(plan.refused[0].reason, RefusalReason::UuidMismatch { .. }));
        assert!(plan.members[1].is_none() && plan.degraded);

        // Nothing of this array at all.
        assert_eq!(assemble(ARRAY, &[found(&other, 0)], &[]).unwrap_err(), AssemblyError::NoMembers(ARRAY));
    }

    #[test]
    fn geometry_disagreement_is_refused() {
        let fresh = {
            let mut i = array(named("raid10"), 4);
            i.events = 20;
            i
        };
        let layout = MetadataLayout::new(512, 16, 1 << 14).unwrap();
        let members: Vec<(Uuid, u64)> = (0..4).map(|i| (member(i), 1 << 21)).collect();
        let other_strip = SuperblockInfo::new_array("md0", ARRAY, named("raid10"), 64, 512, &layout, &members).unwrap();
        let no_bitmap = MetadataLayout::new(512, 0, 0).unwrap();
        let other_bitmap =
            SuperblockInfo::new_array("md0", ARRAY, named("raid10"), 128, 512, &no_bitmap, &members).unwrap();
        for odd in [other_strip, other_bitmap] {
            let set = vec![found(&fresh, 0), found(&fresh, 1), found(&fresh, 2), found(&odd, 3)];
            let plan = assemble(ARRAY, &set, &[]).unwrap();
            assert!(
                matches!(&plan.refused[..], [Refused { reason: RefusalReason::GeometryMismatch(_), .. }]),
                "{:?}",
                plan.refused
            );
            assert!(plan.members[3].is_none() && plan.startable && plan.degraded);
        }
        // A stale copy that lists itself in another slot.
        let mut moved = fresh.clone();
        moved.events = 5;
        moved.slots.swap(2, 3);
        let stale =
            FoundSuperblock { bdev_name: "bdev3".into(), member_uuid: member(3), info: moved.for_slot(2).unwrap() };
        let plan = assemble(ARRAY, &[found(&fresh, 0), found(&fresh, 1), found(&fresh, 2), stale], &[]).unwrap();
        assert_eq!(plan.refused[0].reason, RefusalReason::WrongSlot { claimed: 2, listed: 3 });
    }

    #[test]
    fn duplicate_slots_are_refused() {
        let info = array(named("raid1"), 2);
        let clone = FoundSuperblock { bdev_name: "copy_of_1".into(), ..found(&info, 1) };
        let plan = assemble(ARRAY, &[found(&info, 0), found(&info, 1), clone.clone()], &[]).unwrap();
        assert_eq!(plan.refused.len(), 2);
        assert!(plan.refused.iter().all(|r| matches!(r.reason, RefusalReason::DuplicateSlot { slot: 1, .. })));
        assert!(plan.members[1].is_none() && plan.startable && plan.degraded);
        // The same bdev twice is a caller bug, reported once.
        let plan = assemble(ARRAY, &[found(&info, 0), found(&info, 1), found(&info, 1)], &[]).unwrap();
        assert_eq!(plan.refused, vec![Refused { bdev_name: "bdev1".into(), reason: RefusalReason::DuplicateBdev }]);
        assert!(plan.complete());
    }

    #[test]
    fn too_few_members_and_degraded_per_level() {
        let present = |info: &SuperblockInfo, slots: &[usize]| {
            let set: Vec<FoundSuperblock> = slots.iter().map(|&s| found(info, s)).collect();
            let plan = assemble(ARRAY, &set, &[]).unwrap();
            assert_eq!(plan.missing_slots().count(), info.slots.len() - slots.len());
            (plan.startable, plan.degraded)
        };
        for level in [named("raid0"), named("concat")] {
            let info = array(level, 3);
            assert_eq!(present(&info, &[0, 1, 2]), (true, false));
            assert_eq!(present(&info, &[0, 2]), (false, true), "{level:?}");
        }
        let r1 = array(named("raid1"), 3);
        assert_eq!(present(&r1, &[1]), (true, true));
        assert_eq!(present(&r1, &[0, 2]), (true, true));
        let r10 = array(named("raid10"), 4); // mirror pairs (0,1), (2,3)
        assert_eq!(present(&r10, &[0, 3]), (true, true));
        assert_eq!(present(&r10, &[1, 2, 3]), (true, true));
        assert_eq!(present(&r10, &[2, 3]), (false, true));
        let r10_odd = array(named("raid10"), 3); // md near-2 over 3: copies wrap
        assert_eq!(present(&r10_odd, &[0, 1]), (true, true));
        assert_eq!(present(&r10_odd, &[0]), (false, true));
        // Stale members do not count toward starting.
        let mut newer = r10.clone();
        newer.events = 11;
        let set = vec![found(&r10, 0), found(&r10, 1), found(&newer, 2), found(&newer, 3)];
        let plan = assemble(ARRAY, &set, &[]).unwrap();
        assert!(!plan.startable && plan.degraded);
        assert!(plan.problems.iter().any(|p| p.contains("cannot start")), "{:?}", plan.problems);
    }

    #[test]
    fn dirty_flag_comes_from_the_freshest_copy() {
        let mut crashed = array(named("raid1"), 2);
        crashed.clean = false;
        let plan = assemble(ARRAY, &all(&crashed), &[]).unwrap();
        assert!(plan.dirty && plan.problems.iter().any(|p| p.contains("not shut down cleanly")));
        let mut closed = crashed.clone();
        closed.clean = true;
        closed.events += 1;
        let plan = assemble(ARRAY, &[found(&crashed, 0), found(&closed, 1)], &[]).unwrap();
        assert!(!plan.dirty);
    }

    #[test]
    fn undecodable_superblocks_are_reported() {
        let info = array(named("raid1"), 2);
        let mut bytes = encode(&info.for_slot(1).unwrap());
        bytes[200] ^= 4;
        let err = decode(&bytes).unwrap_err();
        let plan = assemble(ARRAY, &[found(&info, 0)], &[("bdev1".into(), err)]).unwrap();
        assert!(matches!(plan.refused[0].reason, RefusalReason::Undecodable(SuperblockError::BadChecksum { .. })));
        assert!(plan.problems[0]
            .starts_with("bdev bdev1 refused: its superblock is unreadable: superblock checksum mismatch"));
        assert!(plan.members[1].is_none() && plan.degraded);
    }

    #[test]
    fn grouping_by_array() {
        let a = array(named("raid1"), 2);
        let mut b = array(named("raid0"), 2);
        b.array_uuid = Uuid::from_u128(1);
        let groups = group_by_array(vec![found(&a, 0), found(&b, 0), found(&a, 1), found(&b, 1)]);
        assert_eq!(groups.keys().copied().collect::<Vec<_>>(), vec![Uuid::from_u128(1), ARRAY]);
        for (uuid, set) in &groups {
            let plan = assemble(*uuid, set, &[]).unwrap();
            assert!(plan.complete() && plan.refused.is_empty());
        }
        let t: FoundSuperblock = ("x".to_string(), member(0), a.clone()).into();
        assert_eq!(t.info, a);
    }

    proptest! {
        /// raid10 with an even member count starts exactly when every mirror
        /// pair has an in-sync member; a present stale member never counts.
        #[test]
        fn raid10_startable_iff_each_pair_has_a_fresh_copy(pairs in 1usize..=16, presence in prop::collection::vec(0u8..3, 32)) {
            let n = pairs * 2;
            let old = array(named("raid10"), n);
            let mut new = old.clone();
            new.events = 11;
            // 0: missing, 1: present and fresh, 2: present but stale.
            let mut set = Vec::new();
            for (slot, &p) in presence.iter().take(n).enumerate() {
                match p {
                    1 => set.push(found(&new, slot)),
                    2 => set.push(found(&old, slot)),
                    _ => {}
                }
            }
            // With no fresh copy present, the stale ones are the freshest known.
            let any_fresh = presence.iter().take(n).any(|&p| p == 1);
            let fresh = |s: usize| if any_fresh { presence[s] == 1 } else { presence[s] != 0 };
            match assemble(ARRAY, &set, &[]) {
                Ok(plan) => {
                    let expect = (0..pairs).all(|p| fresh(2 * p) || fresh(2 * p + 1));
                    prop_assert_eq!(plan.startable, expect);
                    prop_assert_eq!(plan.degraded, !(0..n).all(fresh));
                }
                Err(e) => {
                    prop_assert!(set.is_empty(), "{e}");
                }
            }
        }
    }
}
