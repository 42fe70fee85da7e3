//! RAID levels behind one narrow interface, shaped like SPDK's
//! `struct raid_bdev_module` (`module/bdev/raid/bdev_raid.h`): a level says
//! which arrays it can make (minimum members, how many may fail, strips),
//! how big the array is over its members, where each array block lives,
//! and how an array IO and a process window become member IO. The array
//! core (membership, fences, serialization, bitmap, superblock, processes,
//! assembly) calls only this trait and knows no level by name.
//!
//! One file per level; [`LEVELS`] is the one table of them: adding a level
//! is a file and an entry here. raid0, raid1, raid10 and concat keep whole
//! copies of the data (one or more), so their IO and process windows share
//! one engine (`copies`); raid5 and raid6 compute their redundancy and
//! share another (`stripe`, one parity chunk a stripe or two).

mod concat;
mod copies;
mod raid0;
mod raid1;
mod raid10;
mod raid5;
mod raid6;
mod stripe;

use crate::channel::ArrayChannel;
use crate::map::{DataLayout, Geometry, GeometryError, Loc, Placement};
use crate::rebuild::{WindowCopy, WindowJob};
use bdev::{DmaBuf, IoBox};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Range;

/// A level, chosen once when an array is created or assembled; every call
/// through it is a static vtable call (no allocation, no lock).
pub type Level = &'static dyn RaidLevel;

/// Every level, in the order listings and error messages name them.
pub static LEVELS: [Level; 6] =
    [&raid0::Raid0, &raid1::Raid1, &raid10::Raid10, &concat::Concat, &raid5::RAID5, &raid6::RAID6];

/// The level `bdev_raid_create` names: its SPDK name or an alias (SPDK's
/// digits), in any case, surrounding blanks ignored.
pub fn parse(s: &str) -> Option<Level> {
    let s = s.trim().to_ascii_lowercase();
    LEVELS.iter().copied().find(|l| l.name() == s || l.aliases().contains(&s.as_str()))
}

/// The level a superblock's level byte records.
pub fn from_superblock_code(code: u8) -> Option<Level> {
    LEVELS.iter().copied().find(|l| l.superblock_code() == code)
}

/// The names `bdev_raid_create` accepts, for messages ("raid0, raid1, ...").
pub fn names() -> String {
    LEVELS.iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
}

/// The level called `name` (tests).
#[cfg(test)]
pub(crate) fn named(name: &str) -> Level {
    parse(name).unwrap_or_else(|| panic!("no level {name}"))
}

/// An array operation a level may not do yet (see [`RaidLevel::refuses`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LevelOp {
    /// Create with `superblock: true` (and so a bitmap and assembly).
    Superblock,
    /// `bdev_raid_add_base_bdev` (and the rebuild onto the new member).
    AddMember,
    /// `bdev_raid_remove_base_bdev`.
    RemoveMember,
    /// `bdev_raid_check` (scrub and repair).
    Check,
}

/// One RAID level (SPDK: `struct raid_bdev_module`).
///
/// What SPDK's module has and where it is here: `level` is [`name`] and
/// [`superblock_code`]; `base_bdevs_min` is [`min_members`];
/// `base_bdevs_constraint` is [`max_failed_members`] (and the exact rule,
/// [`survives`]); `start`, which sizes the bdev, is [`layout`];
/// `submit_rw_request` and `submit_null_payload_request` are [`submit_rw`]
/// and [`submit_null_payload`]; `submit_process_request` is [`plan_window`].
/// No level keeps per-array state beyond its [`Geometry`], so there is no
/// `stop`. Implemented only inside this crate: the IO hooks take the
/// reactor's array state, which is not public.
///
/// [`name`]: RaidLevel::name
/// [`superblock_code`]: RaidLevel::superblock_code
/// [`min_members`]: RaidLevel::min_members
/// [`max_failed_members`]: RaidLevel::max_failed_members
/// [`survives`]: RaidLevel::survives
/// [`layout`]: RaidLevel::layout
/// [`submit_rw`]: RaidLevel::submit_rw
/// [`submit_null_payload`]: RaidLevel::submit_null_payload
/// [`plan_window`]: RaidLevel::plan_window
pub trait RaidLevel: Send + Sync + 'static {
    // ---- identity ----------------------------------------------------------

    /// SPDK's name in `raid_level` (create, listings, saved config).
    fn name(&self) -> &'static str;

    /// Other spellings `bdev_raid_create` accepts (SPDK's digits: "1").
    fn aliases(&self) -> &'static [&'static str];

    /// The level byte in the superblock; never changes once written.
    fn superblock_code(&self) -> u8;

    // ---- what an array of the level needs ----------------------------------

    /// Fewest members an array may have (SPDK's `base_bdevs_min`).
    fn min_members(&self) -> usize;

    /// How many members of an array of `num_members` may fail, whichever
    /// they are, with every block still readable (SPDK's
    /// `base_bdevs_constraint`). More may fail and the array live on when
    /// the right ones do: [`RaidLevel::survives`] is the exact rule.
    fn max_failed_members(&self, num_members: usize) -> usize;

    /// Whether the level stripes in strips of `strip_size_kb` (a power of
    /// two, required); a level without strips refuses one, as SPDK's raid1 does.
    fn uses_strips(&self) -> bool;

    // ---- layout --------------------------------------------------------------

    /// The data size on each member and the array size, over members with
    /// `member_blocks` usable blocks each (SPDK's `start`, which sets the
    /// bdev's size). `Geometry::new` has checked the member count and the
    /// strip (a power of two, or 0 without strips). Sizes may come from
    /// disk: arithmetic is checked ([`GeometryError::TooLarge`]).
    fn layout(&self, strip_size_blocks: u64, member_blocks: &[u64]) -> Result<DataLayout, GeometryError>;

    /// Where array block `lba` (below `array_blocks`) lives, and how many
    /// blocks from it, itself included, map contiguously the same way.
    fn map(&self, geo: &Geometry, lba: u64) -> (Placement, u64);

    /// Every copy of the data at member location `at`, itself included
    /// (reads retry on the others). `at` lies in the member's data area;
    /// None when that block holds no array data.
    fn copies_at(&self, geo: &Geometry, at: Loc) -> Option<Placement>;

    /// Whether every block is still readable when the members for which
    /// `lost` is true are gone: decides online/offline, whether assembly may
    /// start, and whether a write that lost a copy succeeded.
    fn survives(&self, geo: &Geometry, lost: &dyn Fn(usize) -> bool) -> bool;

    /// Whether array block `b` is block `b` of every member (a plain
    /// mirror): a rebuild's progress in array blocks is then the member's
    /// recovery offset, which the superblock records so a restart resumes.
    fn array_offset_is_member_offset(&self) -> bool;

    // ---- IO ------------------------------------------------------------------
    // The defaults of the IO and process hooks are the engine of the levels
    // that keep whole copies (`copies`); a level that computes its
    // redundancy overrides them.

    /// Maps the array IO parked in `slot` onto member IO (SPDK's
    /// `submit_rw_request`): a read, or a write-like IO (write, unmap, write
    /// zeroes) that is marked in the bitmap and holds its range. Every member
    /// IO carries the parent's flags (`ArrayChannel::make_child`); the parent finishes
    /// through `ArrayChannel::finish` or its children's completions.
    fn submit_rw(&self, channel: &ArrayChannel, slot: u32) {
        copies::submit_rw(channel, slot);
    }

    /// Flush and reset (SPDK's `submit_null_payload_request`).
    fn submit_null_payload(&self, channel: &ArrayChannel, slot: u32) {
        channel.dispatch_all(slot);
    }

    /// A member read failed (its member is latched failed): reissue `child`
    /// where the data also lives, or hand it back to fail the parent.
    fn retry_read(&self, channel: &ArrayChannel, child: IoBox) -> Result<(), IoBox> {
        copies::retry_read(channel, child)
    }

    // ---- processes (rebuild, resync, scrub) -----------------------------------

    /// The member reads and writes of one process window (SPDK's
    /// `submit_process_request`): what to copy onto the members being
    /// repaired, or what to compare for a scrub. The process engine holds
    /// the window's range, runs the plan and advances. None: some extent of
    /// the window has no healthy source.
    fn plan_window(&self, channel: &ArrayChannel, window: Range<u64>, job: WindowJob) -> Option<Vec<WindowCopy>> {
        copies::plan_window(channel, window, job)
    }

    /// A parity window's result for `target` (a member being rebuilt, or a
    /// parity being checked or resynced) from the same rows of other
    /// members of its stripe: `at[i]` was read into `sources[i]`; the result
    /// replaces `sources[0]`. False: the sources do not determine it. The
    /// default XORs them (a parity that is the XOR of the rest, as raid5's).
    fn combine_window(&self, _geo: &Geometry, _target: Loc, _at: &[Loc], sources: &[DmaBuf]) -> bool {
        stripe::xor_sources(sources)
    }

    // ---- hooks with defaults (levels that compute redundancy) ----------------

    /// The array range a write-like IO of `[offset, offset + num_blocks)`
    /// holds in the serialization table. Copy levels lock what they write;
    /// a parity level locks whole stripes, so two writes into one stripe
    /// never compute parity from each other's half-written data.
    fn lock_range(&self, _geo: &Geometry, offset_blocks: u64, num_blocks: u64) -> Range<u64> {
        offset_blocks..offset_blocks + num_blocks
    }

    /// Every child of the parent in `slot` has completed. A level whose IO
    /// runs in rounds (read the rest of a stripe, then write data and
    /// parity) submits the next round here and answers true (it set the
    /// new child count with `ArrayChannel::expect_children`, or finished the parent
    /// itself); false lets the parent complete as its children came back.
    fn children_done(&self, _channel: &ArrayChannel, _slot: u32) -> bool {
        false
    }

    /// Whether an unmap or write of zeroes may go to the members' blocks as
    /// it is (copy levels); a level whose redundancy would go wrong that way
    /// does not advertise them.
    fn maps_unmap_to_members(&self) -> bool {
        true
    }

    /// Whether the array takes the new size [`RaidLevel::layout`] gives
    /// when its members grew (SPDK's `resize` hook, which raid0 and raid1
    /// have). Other levels keep their size: their layout would move data
    /// (parity rotation, concat offsets), which a grow must not do in place.
    fn grows_with_members(&self) -> bool {
        false
    }

    /// Whether partial writes update the redundancy in place (from the old
    /// data and parity, as raid5's read-modify-write) once a whole-array
    /// check has verified it (`ArrayShared::redundancy_verified`): the
    /// superblock then records that verification, so it outlives a restart.
    fn trusts_checked_redundancy(&self) -> bool {
        false
    }

    /// Whether arrays of the level with a superblock keep a partial parity
    /// log (raid5: `crate::ppl`), which closes the write hole of partial
    /// stripe writes.
    fn keeps_partial_parity_log(&self) -> bool {
        false
    }

    /// Why the level refuses `op` (not done yet), or None: the refusal is
    /// the error a user reads, so a level never accepts and ignores.
    fn refuses(&self, _op: LevelOp) -> Option<&'static str> {
        None
    }

    // ---- derived ---------------------------------------------------------------

    /// Keeps data when a member is lost. Such a level latches a member that
    /// fails IO as failed, retries reads elsewhere, lets writes proceed
    /// degraded, keeps a write-intent bitmap and resyncs after an unclean
    /// shutdown, rebuilds a returning member, and can be scrubbed.
    fn is_redundant(&self) -> bool {
        self.max_failed_members(self.min_members()) > 0
    }
}

// A level is identified by its name (unique: `the_table_is_consistent`).
impl PartialEq for dyn RaidLevel {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for dyn RaidLevel {}

impl Hash for dyn RaidLevel {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name().hash(state);
    }
}

impl fmt::Debug for dyn RaidLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_consistent() {
        for (i, a) in LEVELS.iter().enumerate() {
            assert_eq!(parse(a.name()), Some(*a));
            assert_eq!(from_superblock_code(a.superblock_code()), Some(*a));
            assert!(a.min_members() >= 1);
            for b in &LEVELS[..i] {
                assert_ne!(a.name(), b.name());
                assert_ne!(a.superblock_code(), b.superblock_code());
                for alias in a.aliases() {
                    assert!(b.name() != *alias && !b.aliases().contains(alias), "{alias} names two levels");
                }
            }
        }
        assert_eq!(names(), "raid0, raid1, raid10, concat, raid5, raid6");
        // The superblock codes on disk (SPDK's enum values where it has the level).
        let codes: Vec<(&str, u8)> = LEVELS.iter().map(|l| (l.name(), l.superblock_code())).collect();
        assert_eq!(codes, [("raid0", 0), ("raid1", 1), ("raid10", 10), ("concat", 99), ("raid5", 95), ("raid6", 6)]);
    }
}
