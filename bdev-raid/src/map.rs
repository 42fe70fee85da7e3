//! The level-neutral shape of an online array: its [`Geometry`] (member
//! count, strip size, per-member data sizes, array size, and the level that
//! maps blocks), where an extent's data lives ([`Placement`]: its copies on
//! members), and the split of one array IO into per-member extents at the
//! level's mapping boundaries, without allocating.
//!
//! Pure arithmetic: no reactor, no bdev. Member offsets here are relative to
//! the member's data area; the IO path adds each member's `data_offset_blocks`.
//! How each level lays blocks out is in its own file under `level/`.

use crate::level::Level;

/// Most members an array may have (the IO path keeps per-member bit masks
/// in a 32-bit field of the child IO's tag).
pub const MAX_MEMBERS: usize = 32;

/// One place on one member (offset relative to the member's data area).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub member: u16,
    pub offset_blocks: u64,
}

/// Where an extent's blocks live: every copy of them, in the order reads
/// prefer them when their loads tie. Levels build it; the IO path only
/// iterates it ([`Placement::copies`]), so it works for any level that keeps
/// whole copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement(Copies);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Copies {
    /// One or two copies, each at its own place (`len` of `locs` used).
    At { locs: [Loc; 2], len: u8 },
    /// The same offset on every member.
    EveryMember(u64),
}

impl Placement {
    /// A single copy.
    pub fn one(at: Loc) -> Placement {
        Placement(Copies::At { locs: [at, at], len: 1 })
    }

    /// Two copies, on different members, in this order.
    pub fn two(first: Loc, second: Loc) -> Placement {
        Placement(Copies::At { locs: [first, second], len: 2 })
    }

    /// A copy at `offset_blocks` on every member.
    pub fn every_member(offset_blocks: u64) -> Placement {
        Placement(Copies::EveryMember(offset_blocks))
    }

    /// The copy on `member`, if this placement has one.
    pub fn on_member(&self, member: usize) -> Option<Loc> {
        match self.0 {
            Copies::At { locs, len } => locs[..len as usize].iter().copied().find(|l| l.member as usize == member),
            Copies::EveryMember(off) => Some(Loc { member: member as u16, offset_blocks: off }),
        }
    }

    /// Every copy, in preference order, of an array of `num_members`.
    pub fn copies(&self, num_members: usize) -> CopyIter {
        let end = match self.0 {
            Copies::At { len, .. } => len as usize,
            Copies::EveryMember(_) => num_members,
        };
        CopyIter { placement: *self, next: 0, end }
    }
}

/// Iterator over the copies of a [`Placement`] (no allocation).
#[derive(Clone, Debug)]
pub struct CopyIter {
    placement: Placement,
    next: usize,
    end: usize,
}

impl Iterator for CopyIter {
    type Item = Loc;

    fn next(&mut self) -> Option<Loc> {
        if self.next >= self.end {
            return None;
        }
        let i = self.next;
        self.next += 1;
        Some(match self.placement.0 {
            Copies::At { locs, .. } => locs[i],
            Copies::EveryMember(off) => Loc { member: i as u16, offset_blocks: off },
        })
    }
}

/// A piece of an array IO that maps contiguously onto its member(s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub array_offset_blocks: u64,
    /// Offset of this piece within the IO's buffer, in blocks.
    pub buf_offset_blocks: u64,
    pub num_blocks: u64,
    pub placement: Placement,
}

/// Why a geometry cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("{level} needs at least {min} members, got {got}")]
    TooFewMembers { level: &'static str, min: usize, got: usize },
    #[error("at most {MAX_MEMBERS} members are supported, got {0}")]
    TooManyMembers(usize),
    #[error("strip size must be a power of two number of blocks (got {0})")]
    BadStrip(u64),
    #[error("members are too small for one strip per member: usable size would be 0")]
    Empty,
    #[error("array size overflows 64 bits of blocks")]
    TooLarge,
}

/// What a level computes when an array starts (SPDK's module `start` sets
/// the bdev's size): how much of each member it uses, the array size, and
/// any lookup table its mapping needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataLayout {
    /// Data blocks used on each member (SPDK's `data_size`), in slot order.
    pub member_data_blocks: Vec<u64>,
    pub array_blocks: u64,
    /// Level-private table for [`RaidLevel::map`](crate::RaidLevel::map)
    /// (concat: where each member's data ends in the array); empty if none.
    pub table: Vec<u64>,
}

/// The fixed shape of an online array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    level: Level,
    num_members: usize,
    /// 0 for levels without strips.
    strip_size_blocks: u64,
    strip_shift: u32,
    /// Data blocks used on each member (SPDK's `data_size`).
    member_data_blocks: Vec<u64>,
    /// See [`DataLayout::table`].
    table: Vec<u64>,
    array_blocks: u64,
}

impl Geometry {
    /// Builds the layout over members of the given data sizes (in blocks):
    /// the member count and strip size are checked here for every level,
    /// the sizes are the level's ([`RaidLevel::layout`](crate::RaidLevel::layout)).
    pub fn new(level: Level, strip_size_blocks: u64, member_blocks: &[u64]) -> Result<Geometry, GeometryError> {
        let n = member_blocks.len();
        if n < level.min_members() {
            return Err(GeometryError::TooFewMembers { level: level.name(), min: level.min_members(), got: n });
        }
        if n > MAX_MEMBERS {
            return Err(GeometryError::TooManyMembers(n));
        }
        let strip = if level.uses_strips() { strip_size_blocks } else { 0 };
        if level.uses_strips() && !strip.is_power_of_two() {
            return Err(GeometryError::BadStrip(strip));
        }
        let DataLayout { member_data_blocks, array_blocks, table } = level.layout(strip, member_blocks)?;
        assert_eq!(member_data_blocks.len(), n, "{}: a data size per member", level.name());
        if array_blocks == 0 {
            return Err(GeometryError::Empty);
        }
        Ok(Geometry {
            level,
            num_members: n,
            strip_size_blocks: strip,
            strip_shift: if strip == 0 { 0 } else { strip.trailing_zeros() },
            member_data_blocks,
            table,
            array_blocks,
        })
    }

    pub fn level(&self) -> Level {
        self.level
    }
    pub fn num_members(&self) -> usize {
        self.num_members
    }
    pub fn strip_size_blocks(&self) -> u64 {
        self.strip_size_blocks
    }
    /// log2 of the strip size (0 without strips).
    pub fn strip_shift(&self) -> u32 {
        self.strip_shift
    }
    pub fn array_blocks(&self) -> u64 {
        self.array_blocks
    }
    /// Data blocks used on `member` (what it must hold at least).
    pub fn member_data_blocks(&self, member: usize) -> u64 {
        self.member_data_blocks.get(member).copied().unwrap_or(0)
    }
    /// The level's lookup table ([`DataLayout::table`]).
    pub fn table(&self) -> &[u64] {
        &self.table
    }

    /// Splits `[offset, offset + num_blocks)` (which must lie inside the
    /// array) into extents, lazily and without allocating.
    pub fn extents(&self, offset_blocks: u64, num_blocks: u64) -> Extents<'_> {
        let end = offset_blocks.saturating_add(num_blocks).min(self.array_blocks);
        Extents { geo: self, start: offset_blocks, cur: offset_blocks.min(end), end }
    }

    /// Placement of one array block.
    pub fn locate(&self, lba: u64) -> Option<Placement> {
        (lba < self.array_blocks).then(|| self.level.map(self, lba).0)
    }

    /// Every copy of the data at member location `at`, itself included (None
    /// when that member block holds no array data).
    pub fn copies_at(&self, at: Loc) -> Option<Placement> {
        if at.member as usize >= self.num_members || at.offset_blocks >= self.member_data_blocks(at.member as usize) {
            return None;
        }
        self.level.copies_at(self, at)
    }

    /// Whether the array still has every block when the members for which
    /// `lost` is true are gone.
    pub fn survives(&self, lost: impl Fn(usize) -> bool) -> bool {
        self.level.survives(self, &lost)
    }
}

/// Iterator over the extents of one IO (see [`Geometry::extents`]).
pub struct Extents<'a> {
    geo: &'a Geometry,
    start: u64,
    cur: u64,
    end: u64,
}

impl Iterator for Extents<'_> {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        if self.cur >= self.end {
            return None;
        }
        let (placement, run) = self.geo.level.map(self.geo, self.cur);
        let num_blocks = run.min(self.end - self.cur);
        let e =
            Extent { array_offset_blocks: self.cur, buf_offset_blocks: self.cur - self.start, num_blocks, placement };
        self.cur += num_blocks;
        Some(e)
    }
}

#[cfg(test)]
mod overflow_tests {
    use super::*;
    use crate::level::named;

    #[test]
    fn huge_members_are_refused_not_overflowed() {
        let huge = [u64::MAX / 2, u64::MAX / 2, u64::MAX / 2];
        assert_eq!(Geometry::new(named("raid0"), 8, &huge), Err(GeometryError::TooLarge));
        assert_eq!(Geometry::new(named("concat"), 8, &huge), Err(GeometryError::TooLarge));
        assert_eq!(Geometry::new(named("raid10"), 8, &[u64::MAX; 4]), Err(GeometryError::TooLarge));
        assert!(Geometry::new(named("raid1"), 0, &huge).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::level::{named, parse, LEVELS};
    use proptest::prelude::*;

    /// A flat reference: the member locations of every array block, built by
    /// enumerating each layout as its definition reads (no division tricks),
    /// independently of the level implementations.
    fn flat_model(level: Level, strip: u64, sizes: &[u64]) -> Vec<Vec<(u16, u64)>> {
        let n = sizes.len();
        let min = *sizes.iter().min().unwrap();
        let mut map = Vec::new();
        match level.name() {
            // Every member holds every block at the same offset.
            "raid1" => {
                for lba in 0..min {
                    map.push((0..n as u16).map(|m| (m, lba)).collect());
                }
            }
            // Strip `s` on member `s % n` at member strip `s / n`.
            "raid0" => {
                let rows = min / strip;
                for row in 0..rows {
                    for m in 0..n as u16 {
                        for b in 0..strip {
                            map.push(vec![(m, row * strip + b)]);
                        }
                    }
                }
            }
            // md's near-2: strips numbered row-major, chunk c in slots 2c, 2c+1.
            "raid10" => {
                let rows = min / strip;
                let mut slots = Vec::new();
                for row in 0..rows {
                    for m in 0..n as u16 {
                        slots.push((m, row));
                    }
                }
                for pair in slots.chunks_exact(2) {
                    for b in 0..strip {
                        map.push(pair.iter().map(|&(m, row)| (m, row * strip + b)).collect());
                    }
                }
            }
            // Members back to back, each rounded down to whole strips.
            "concat" => {
                for (m, &size) in sizes.iter().enumerate() {
                    for b in 0..size / strip * strip {
                        map.push(vec![(m as u16, b)]);
                    }
                }
            }
            // md left-symmetric: stripe `row` has P on member n-1-row%n, data
            // chunks on the members after it, wrapping; chunks in array order.
            "raid5" => {
                let rows = min / strip;
                for row in 0..rows {
                    let p = n as u64 - 1 - row % n as u64;
                    for k in 0..n as u64 - 1 {
                        let m = ((p + 1 + k) % n as u64) as u16;
                        for b in 0..strip {
                            map.push(vec![(m, row * strip + b)]);
                        }
                    }
                }
            }
            // md left-symmetric, level 6: P on member n-1-row%n, Q on the
            // member after P, data chunks after Q, wrapping.
            "raid6" => {
                let rows = min / strip;
                for row in 0..rows {
                    let q = (2 * n as u64 - 1 - row % n as u64 + 1) % n as u64;
                    for k in 0..n as u64 - 2 {
                        let m = ((q + 1 + k) % n as u64) as u16;
                        for b in 0..strip {
                            map.push(vec![(m, row * strip + b)]);
                        }
                    }
                }
            }
            other => panic!("no reference model for {other}"),
        }
        map
    }

    fn locs(p: Placement, n: usize) -> Vec<(u16, u64)> {
        p.copies(n).map(|l| (l.member, l.offset_blocks)).collect()
    }

    fn level_strategy() -> impl Strategy<Value = Level> {
        proptest::sample::select(LEVELS.to_vec())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Every IO splits into contiguous extents that cover it exactly, never
        /// cross a strip (or a concat member), and map each block where the
        /// flat model puts it.
        #[test]
        fn extents_match_flat_model(
            level in level_strategy(),
            n in 1usize..7,
            strip_shift in 0u32..4,
            sizes in proptest::collection::vec(1u64..90, 7),
            io in (any::<u64>(), 1u64..200),
        ) {
            let n = n.max(level.min_members());
            let sizes = &sizes[..n];
            let strip = 1u64 << strip_shift;
            let Ok(geo) = Geometry::new(level, strip, sizes) else {
                // Only too-small members may fail; the model agrees.
                prop_assert!(flat_model(level, strip, sizes).is_empty());
                return Ok(());
            };
            let model = flat_model(level, strip, sizes);
            prop_assert_eq!(geo.array_blocks(), model.len() as u64);
            let off = io.0 % geo.array_blocks();
            let len = io.1.min(geo.array_blocks() - off);
            let mut next = off;
            for e in geo.extents(off, len) {
                prop_assert_eq!(e.array_offset_blocks, next);
                prop_assert_eq!(e.buf_offset_blocks, next - off);
                prop_assert!(e.num_blocks > 0);
                if ["raid0", "raid10", "raid5", "raid6"].contains(&level.name()) {
                    prop_assert_eq!(e.array_offset_blocks / strip, (e.array_offset_blocks + e.num_blocks - 1) / strip);
                }
                for b in 0..e.num_blocks {
                    let want = &model[(e.array_offset_blocks + b) as usize];
                    let got: Vec<_> = locs(e.placement, n).into_iter().map(|(m, o)| (m, o + b)).collect();
                    prop_assert_eq!(&got, want);
                    prop_assert!(got.iter().all(|&(m, o)| o < geo.member_data_blocks(m as usize)));
                    // Each copy knows all the others (read retry, rebuild).
                    for &(m, o) in &got {
                        let copies = geo.copies_at(Loc { member: m, offset_blocks: o });
                        let mut all = copies.map(|p| locs(p, n)).unwrap_or_default();
                        all.sort();
                        let mut want = want.clone();
                        want.sort();
                        prop_assert_eq!(all, want);
                    }
                }
                next += e.num_blocks;
            }
            prop_assert_eq!(next, off + len);
        }

        /// Survival agrees with the model: every block keeps a copy on a member
        /// not lost; and any `max_failed_members` losses are survived.
        #[test]
        fn survival_matches_model(level in level_strategy(), n in 1usize..7, lost_mask in any::<u32>(), size in 8u64..40) {
            let n = n.max(level.min_members());
            let strip = 2;
            let sizes = vec![size; n];
            let geo = Geometry::new(level, strip, &sizes).unwrap();
            let lost = |m: usize| lost_mask & (1 << m) != 0;
            let model = flat_model(level, strip, &sizes);
            let lost_count = (0..n).filter(|&m| lost(m)).count();
            // Parity: any one member (raid6: two) may go, the data is
            // computed from the rest.
            let every_block_kept = if level.name() == "raid5" {
                lost_count <= 1
            } else if level.name() == "raid6" {
                lost_count <= 2
            } else {
                model.iter().all(|copies| copies.iter().any(|&(m, _)| !lost(m as usize)))
            };
            prop_assert_eq!(geo.survives(lost), every_block_kept);
            if lost_count <= level.max_failed_members(n) {
                prop_assert!(every_block_kept, "{} of {n} tolerates {} losses", level.name(), level.max_failed_members(n));
            }
            prop_assert_eq!(level.is_redundant(), level.max_failed_members(n) > 0);
        }
    }

    #[test]
    fn sizes_and_errors() {
        let g = Geometry::new(named("raid0"), 16, &[100, 90]).unwrap();
        assert_eq!((g.array_blocks(), g.member_data_blocks(0)), (160, 80));
        let g = Geometry::new(named("raid1"), 0, &[100, 90, 95]).unwrap();
        assert_eq!(g.array_blocks(), 90);
        let g = Geometry::new(named("raid10"), 8, &[64, 64, 64, 64]).unwrap();
        assert_eq!(g.array_blocks(), 128);
        let g = Geometry::new(named("concat"), 8, &[20, 17]).unwrap();
        assert_eq!((g.array_blocks(), g.member_data_blocks(1)), (32, 16));
        assert_eq!(Geometry::new(named("raid0"), 16, &[8, 8]), Err(GeometryError::Empty));
        assert!(matches!(Geometry::new(named("raid1"), 0, &[8]), Err(GeometryError::TooFewMembers { .. })));
        assert_eq!(Geometry::new(named("raid0"), 3, &[8]), Err(GeometryError::BadStrip(3)));
        assert!(Geometry::new(named("raid0"), 1, &[8; MAX_MEMBERS + 1]).is_err());
        for (s, l) in [("raid0", "raid0"), ("0", "raid0"), ("1", "raid1"), ("10", "raid10"), (" RAID10 ", "raid10")] {
            assert_eq!(parse(s), Some(named(l)));
        }
        assert_eq!(parse("raid5f"), Some(named("raid5")));
        assert_eq!(parse("raid6"), Some(named("raid6")));
        assert_eq!(parse("6"), Some(named("raid6")));
        assert_eq!(parse("raid4"), None);
    }

    #[test]
    fn raid10_even_members_are_mirror_pairs() {
        let g = Geometry::new(named("raid10"), 4, &[16; 4]).unwrap();
        let pairs: Vec<_> = g
            .extents(0, g.array_blocks())
            .map(|e| locs(e.placement, 4).iter().map(|l| l.0).collect::<Vec<_>>())
            .collect();
        assert!(pairs.iter().all(|p| p[..] == [0, 1] || p[..] == [2, 3]), "{pairs:?}");
        assert!(g.survives(|m| m == 0 || m == 2));
        assert!(!g.survives(|m| m == 2 || m == 3));
    }

    #[test]
    fn raid10_odd_members_last_slot_has_no_copy() {
        // 3 members of 3 strips: 9 slots, 4 chunks; slot 8 (member 2, row 2) holds nothing.
        let g = Geometry::new(named("raid10"), 1, &[3, 3, 3]).unwrap();
        assert_eq!(g.array_blocks(), 4);
        assert_eq!(g.copies_at(Loc { member: 2, offset_blocks: 2 }), None);
        let p = g.copies_at(Loc { member: 1, offset_blocks: 2 }).unwrap();
        assert_eq!(locs(p, 3), vec![(0, 2), (1, 2)]);
    }
}
