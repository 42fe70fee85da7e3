//! Address mapping of every RAID level: array blocks to member locations,
//! usable sizes, which member losses an array survives, and the split of one
//! array IO into per-member extents at strip boundaries without allocating.
//!
//! Pure arithmetic: no reactor, no bdev. Member offsets here are relative to
//! the member's data area; the IO path adds each member's `data_offset_blocks`.
//!
//! Layouts:
//! - raid0: strip `s` lives on member `s % n` at member strip `s / n`.
//! - raid1: every member holds every block at the same offset.
//! - raid10: Linux md's "near 2" layout. The members' strips are numbered
//!   row-major (`slot = row * n + member`); array chunk `c` (one strip of
//!   data) is stored in slots `2c` and `2c + 1`. With an even member count
//!   this is a stripe over mirror pairs (0,1), (2,3), ...; with an odd count
//!   the copies wrap to the next row, exactly as md does. Any `n >= 2` works.
//! - concat: members back to back, each rounded down to whole strips.

/// Most members an array may have (the IO path keeps per-member bit masks
/// in a 32-bit field of the child IO's tag).
pub const MAX_MEMBERS: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RaidLevel {
    Raid0,
    Raid1,
    Raid10,
    Concat,
}

impl RaidLevel {
    /// Accepts SPDK's spellings: `raid0`/`0`, `raid1`/`1`, `raid10`/`10`, `concat`.
    pub fn parse(s: &str) -> Option<RaidLevel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "raid0" | "0" => Some(RaidLevel::Raid0),
            "raid1" | "1" => Some(RaidLevel::Raid1),
            "raid10" | "10" => Some(RaidLevel::Raid10),
            "concat" => Some(RaidLevel::Concat),
            _ => None,
        }
    }

    /// SPDK's name in `raid_level`.
    pub fn name(self) -> &'static str {
        match self {
            RaidLevel::Raid0 => "raid0",
            RaidLevel::Raid1 => "raid1",
            RaidLevel::Raid10 => "raid10",
            RaidLevel::Concat => "concat",
        }
    }

    pub fn min_members(self) -> usize {
        match self {
            RaidLevel::Raid0 | RaidLevel::Concat => 1,
            RaidLevel::Raid1 | RaidLevel::Raid10 => 2,
        }
    }

    /// Whether the level has a strip size (raid1 has none; SPDK rejects one).
    pub fn uses_strips(self) -> bool {
        !matches!(self, RaidLevel::Raid1)
    }

    /// Keeps data when a member is lost.
    pub fn is_redundant(self) -> bool {
        matches!(self, RaidLevel::Raid1 | RaidLevel::Raid10)
    }
}

/// One place on one member (offset relative to the member's data area).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub member: u16,
    pub offset_blocks: u64,
}

/// Where an extent's blocks live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// raid0, concat: one copy.
    Single(Loc),
    /// raid10: two copies, in md's slot order.
    Pair([Loc; 2]),
    /// raid1: the same offset on every member.
    Mirror(u64),
}

impl Placement {
    /// The copy on `member`, if this placement has one.
    pub fn on_member(&self, member: usize) -> Option<Loc> {
        match *self {
            Placement::Single(l) => (l.member as usize == member).then_some(l),
            Placement::Pair(p) => p.into_iter().find(|l| l.member as usize == member),
            Placement::Mirror(off) => Some(Loc { member: member as u16, offset_blocks: off }),
        }
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

#[cfg(test)]
mod overflow_tests {
    use super::*;

    #[test]
    fn huge_members_are_refused_not_overflowed() {
        let huge = [u64::MAX / 2, u64::MAX / 2, u64::MAX / 2];
        assert_eq!(Geometry::new(RaidLevel::Raid0, 8, &huge), Err(GeometryError::TooLarge));
        assert_eq!(Geometry::new(RaidLevel::Concat, 8, &huge), Err(GeometryError::TooLarge));
        assert_eq!(Geometry::new(RaidLevel::Raid10, 8, &[u64::MAX; 4]), Err(GeometryError::TooLarge));
        assert!(Geometry::new(RaidLevel::Raid1, 0, &huge).is_ok());
    }
}

/// The fixed shape of an online array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    level: RaidLevel,
    num_members: usize,
    /// 0 for raid1.
    strip_size_blocks: u64,
    strip_shift: u32,
    /// Data blocks used on each member (SPDK's `data_size`).
    member_data_blocks: Vec<u64>,
    /// concat: array offset where each member's data ends (prefix sums).
    concat_ends: Vec<u64>,
    array_blocks: u64,
}

impl Geometry {
    /// Builds the layout over members of the given data sizes (in blocks).
    /// Usable size: raid0 `n * min` and raid10 `n * min / 2` (both rounded
    /// down to whole strips), raid1 `min`, concat the sum of strip-rounded
    /// member sizes.
    pub fn new(level: RaidLevel, strip_size_blocks: u64, member_blocks: &[u64]) -> Result<Geometry, GeometryError> {
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
        let min = member_blocks.iter().copied().min().unwrap_or(0);
        let round = |b: u64| b.checked_div(strip).map_or(b, |q| q * strip);
        // Sizes may come from disk (superblocks): checked arithmetic throughout.
        let too_large = GeometryError::TooLarge;
        let (member_data_blocks, array_blocks) = match level {
            RaidLevel::Raid0 => {
                let per = round(min);
                (vec![per; n], per.checked_mul(n as u64).ok_or(too_large)?)
            }
            RaidLevel::Raid1 => (vec![min; n], min),
            RaidLevel::Raid10 => {
                let per = round(min);
                let chunks = (per / strip).checked_mul(n as u64).ok_or(too_large.clone())? / 2;
                (vec![per; n], chunks.checked_mul(strip).ok_or(too_large)?)
            }
            RaidLevel::Concat => {
                let sizes: Vec<u64> = member_blocks.iter().map(|&b| round(b)).collect();
                let total = sizes.iter().try_fold(0u64, |acc, &s| acc.checked_add(s)).ok_or(too_large)?;
                (sizes, total)
            }
        };
        if array_blocks == 0 {
            return Err(GeometryError::Empty);
        }
        let mut concat_ends = Vec::new();
        if level == RaidLevel::Concat {
            let mut end = 0;
            for &s in &member_data_blocks {
                end += s;
                concat_ends.push(end);
            }
        }
        Ok(Geometry {
            level,
            num_members: n,
            strip_size_blocks: strip,
            strip_shift: if strip == 0 { 0 } else { strip.trailing_zeros() },
            member_data_blocks,
            concat_ends,
            array_blocks,
        })
    }

    pub fn level(&self) -> RaidLevel {
        self.level
    }
    pub fn num_members(&self) -> usize {
        self.num_members
    }
    pub fn strip_size_blocks(&self) -> u64 {
        self.strip_size_blocks
    }
    pub fn array_blocks(&self) -> u64 {
        self.array_blocks
    }
    /// Data blocks used on `member` (what it must hold at least).
    pub fn member_data_blocks(&self, member: usize) -> u64 {
        self.member_data_blocks.get(member).copied().unwrap_or(0)
    }

    /// Splits `[offset, offset + num_blocks)` (which must lie inside the
    /// array) into extents, lazily and without allocating.
    pub fn extents(&self, offset_blocks: u64, num_blocks: u64) -> Extents<'_> {
        let end = offset_blocks.saturating_add(num_blocks).min(self.array_blocks);
        Extents { geo: self, start: offset_blocks, cur: offset_blocks.min(end), end }
    }

    /// The placement of the one block at `lba` (and how many blocks after it,
    /// itself included, share the same contiguous mapping).
    fn place(&self, lba: u64) -> (Placement, u64) {
        let strip = self.strip_size_blocks;
        match self.level {
            RaidLevel::Raid1 => (Placement::Mirror(lba), self.array_blocks - lba),
            RaidLevel::Raid0 => {
                let s = lba >> self.strip_shift;
                let within = lba & (strip - 1);
                let n = self.num_members as u64;
                let loc = Loc { member: (s % n) as u16, offset_blocks: (s / n) * strip + within };
                (Placement::Single(loc), strip - within)
            }
            RaidLevel::Raid10 => {
                let c = lba >> self.strip_shift;
                let within = lba & (strip - 1);
                let pair = [self.slot_loc(2 * c, within), self.slot_loc(2 * c + 1, within)];
                (Placement::Pair(pair), strip - within)
            }
            RaidLevel::Concat => {
                let i = self.concat_ends.partition_point(|&e| e <= lba);
                let start = self.concat_ends[i] - self.member_data_blocks[i];
                let loc = Loc { member: i as u16, offset_blocks: lba - start };
                (Placement::Single(loc), self.concat_ends[i] - lba)
            }
        }
    }

    fn slot_loc(&self, slot: u64, within: u64) -> Loc {
        let n = self.num_members as u64;
        Loc { member: (slot % n) as u16, offset_blocks: (slot / n) * self.strip_size_blocks + within }
    }

    /// Placement of one array block.
    pub fn locate(&self, lba: u64) -> Option<Placement> {
        (lba < self.array_blocks).then(|| self.place(lba).0)
    }

    /// raid10: the other copy of the data at `loc` (None for other levels,
    /// or for a member slot that holds no array data).
    pub fn partner(&self, loc: Loc) -> Option<Loc> {
        if self.level != RaidLevel::Raid10 || loc.member as usize >= self.num_members {
            return None;
        }
        let strip = self.strip_size_blocks;
        let row = loc.offset_blocks >> self.strip_shift;
        let within = loc.offset_blocks & (strip - 1);
        let slot = row * self.num_members as u64 + loc.member as u64;
        if (slot / 2) * strip >= self.array_blocks {
            return None;
        }
        Some(self.slot_loc(slot ^ 1, within))
    }

    /// Whether the array still has every block when the members for which
    /// `lost` is true are gone.
    pub fn survives(&self, lost: impl Fn(usize) -> bool) -> bool {
        let n = self.num_members;
        match self.level {
            RaidLevel::Raid0 | RaidLevel::Concat => (0..n).all(|m| !lost(m) || self.member_data_blocks[m] == 0),
            RaidLevel::Raid1 => (0..n).any(|m| !lost(m)),
            RaidLevel::Raid10 => {
                // The pair pattern of chunk c repeats with period n.
                let chunks = self.array_blocks / self.strip_size_blocks;
                (0..chunks.min(n as u64)).all(|c| {
                    let (a, b) = ((2 * c) as usize % n, (2 * c + 1) as usize % n);
                    !(lost(a) && lost(b))
                })
            }
        }
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
        let (placement, run) = self.geo.place(self.cur);
        let num_blocks = run.min(self.end - self.cur);
        let e =
            Extent { array_offset_blocks: self.cur, buf_offset_blocks: self.cur - self.start, num_blocks, placement };
        self.cur += num_blocks;
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A flat reference: the member locations of every array block, built by
    /// enumerating the layout as its definition reads (no division tricks).
    fn flat_model(level: RaidLevel, strip: u64, sizes: &[u64]) -> Vec<Vec<(u16, u64)>> {
        let n = sizes.len();
        let min = *sizes.iter().min().unwrap();
        let mut map = Vec::new();
        match level {
            RaidLevel::Raid1 => {
                for lba in 0..min {
                    map.push((0..n as u16).map(|m| (m, lba)).collect());
                }
            }
            RaidLevel::Raid0 => {
                let rows = min / strip;
                for row in 0..rows {
                    for m in 0..n as u16 {
                        for b in 0..strip {
                            map.push(vec![(m, row * strip + b)]);
                        }
                    }
                }
            }
            RaidLevel::Raid10 => {
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
            RaidLevel::Concat => {
                for (m, &size) in sizes.iter().enumerate() {
                    for b in 0..size / strip * strip {
                        map.push(vec![(m as u16, b)]);
                    }
                }
            }
        }
        map
    }

    fn locs(p: Placement, n: usize) -> Vec<(u16, u64)> {
        match p {
            Placement::Single(l) => vec![(l.member, l.offset_blocks)],
            Placement::Pair(ls) => ls.iter().map(|l| (l.member, l.offset_blocks)).collect(),
            Placement::Mirror(off) => (0..n as u16).map(|m| (m, off)).collect(),
        }
    }

    fn level_strategy() -> impl Strategy<Value = RaidLevel> {
        prop_oneof![Just(RaidLevel::Raid0), Just(RaidLevel::Raid1), Just(RaidLevel::Raid10), Just(RaidLevel::Concat)]
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
                if level == RaidLevel::Raid0 || level == RaidLevel::Raid10 {
                    prop_assert_eq!(e.array_offset_blocks / strip, (e.array_offset_blocks + e.num_blocks - 1) / strip);
                }
                for b in 0..e.num_blocks {
                    let want = &model[(e.array_offset_blocks + b) as usize];
                    let got: Vec<_> = locs(e.placement, n).into_iter().map(|(m, o)| (m, o + b)).collect();
                    prop_assert_eq!(&got, want);
                    prop_assert!(got.iter().all(|&(m, o)| o < geo.member_data_blocks(m as usize)));
                }
                next += e.num_blocks;
            }
            prop_assert_eq!(next, off + len);
        }

        /// raid10: the partner of each copy is the other copy.
        #[test]
        fn raid10_partner_is_the_other_copy(n in 2usize..7, strip_shift in 0u32..3, size in 4u64..60, lba in any::<u64>()) {
            let geo = Geometry::new(RaidLevel::Raid10, 1 << strip_shift, &vec![size; n]);
            let Ok(geo) = geo else { return Ok(()) };
            let lba = lba % geo.array_blocks();
            let Some(Placement::Pair([a, b])) = geo.locate(lba) else { panic!("raid10 places pairs") };
            prop_assert_ne!(a.member, b.member);
            prop_assert_eq!(geo.partner(a), Some(b));
            prop_assert_eq!(geo.partner(b), Some(a));
        }

        /// Survival agrees with the model: every block keeps a copy on a member not lost.
        #[test]
        fn survival_matches_model(level in level_strategy(), n in 1usize..7, lost_mask in any::<u32>(), size in 8u64..40) {
            let n = n.max(level.min_members());
            let strip = 2;
            let sizes = vec![size; n];
            let geo = Geometry::new(level, strip, &sizes).unwrap();
            let lost = |m: usize| lost_mask & (1 << m) != 0;
            let model = flat_model(level, strip, &sizes);
            let every_block_kept = model.iter().all(|copies| copies.iter().any(|&(m, _)| !lost(m as usize)));
            prop_assert_eq!(geo.survives(lost), every_block_kept);
        }
    }

    #[test]
    fn sizes_and_errors() {
        let g = Geometry::new(RaidLevel::Raid0, 16, &[100, 90]).unwrap();
        assert_eq!((g.array_blocks(), g.member_data_blocks(0)), (160, 80));
        let g = Geometry::new(RaidLevel::Raid1, 0, &[100, 90, 95]).unwrap();
        assert_eq!(g.array_blocks(), 90);
        let g = Geometry::new(RaidLevel::Raid10, 8, &[64, 64, 64, 64]).unwrap();
        assert_eq!(g.array_blocks(), 128);
        let g = Geometry::new(RaidLevel::Concat, 8, &[20, 17]).unwrap();
        assert_eq!((g.array_blocks(), g.member_data_blocks(1)), (32, 16));
        assert_eq!(Geometry::new(RaidLevel::Raid0, 16, &[8, 8]), Err(GeometryError::Empty));
        assert!(matches!(Geometry::new(RaidLevel::Raid1, 0, &[8]), Err(GeometryError::TooFewMembers { .. })));
        assert_eq!(Geometry::new(RaidLevel::Raid0, 3, &[8]), Err(GeometryError::BadStrip(3)));
        assert!(Geometry::new(RaidLevel::Raid0, 1, &[8; MAX_MEMBERS + 1]).is_err());
        for (s, l) in
            [("raid0", RaidLevel::Raid0), ("0", RaidLevel::Raid0), ("1", RaidLevel::Raid1), ("10", RaidLevel::Raid10)]
        {
            assert_eq!(RaidLevel::parse(s), Some(l));
        }
        assert_eq!(RaidLevel::parse("raid5f"), None);
    }

    #[test]
    fn raid10_even_members_are_mirror_pairs() {
        let g = Geometry::new(RaidLevel::Raid10, 4, &[16; 4]).unwrap();
        let pairs: Vec<_> = g
            .extents(0, g.array_blocks())
            .map(|e| match e.placement {
                Placement::Pair([a, b]) => (a.member, b.member),
                p => panic!("{p:?}"),
            })
            .collect();
        assert!(pairs.iter().all(|&(a, b)| (a, b) == (0, 1) || (a, b) == (2, 3)));
        assert!(g.survives(|m| m == 0 || m == 2));
        assert!(!g.survives(|m| m == 2 || m == 3));
    }
}
