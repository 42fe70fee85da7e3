//! raid10: Linux md's "near 2" layout. The members' strips are numbered
//! row-major (`slot = row * n + member`); array chunk `c` (one strip of
//! data) is stored in slots `2c` and `2c + 1`. With an even member count
//! this is a stripe over mirror pairs (0,1), (2,3), ...; with an odd count
//! the copies wrap to the next row, exactly as md does. Any `n >= 2` works,
//! and any one member may fail. Never-written chunks read as zeros, as
//! at raid1 (`raid1`'s hooks).

use super::{raid1, RaidLevel};
use crate::channel::ArrayChannel;
use crate::map::{DataLayout, Geometry, GeometryError, Loc, Placement};

pub(super) struct Raid10;

/// Where strip slot `slot` (row-major) is, `within` blocks into it.
fn slot_loc(geo: &Geometry, slot: u64, within: u64) -> Loc {
    let n = geo.num_members() as u64;
    Loc { member: (slot % n) as u16, offset_blocks: (slot / n) * geo.strip_size_blocks() + within }
}

impl RaidLevel for Raid10 {
    fn name(&self) -> &'static str {
        "raid10"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["10"]
    }
    fn superblock_code(&self) -> u8 {
        10
    }
    fn min_members(&self) -> usize {
        2
    }
    fn max_failed_members(&self, _num_members: usize) -> usize {
        1
    }
    fn uses_strips(&self) -> bool {
        true
    }

    /// Every member uses the smallest one's whole strips; half the strips hold data.
    fn layout(&self, strip_size_blocks: u64, member_blocks: &[u64]) -> Result<DataLayout, GeometryError> {
        let n = member_blocks.len();
        let min = member_blocks.iter().copied().min().unwrap_or(0);
        let per = min / strip_size_blocks * strip_size_blocks;
        let chunks = (per / strip_size_blocks).checked_mul(n as u64).ok_or(GeometryError::TooLarge)? / 2;
        let array_blocks = chunks.checked_mul(strip_size_blocks).ok_or(GeometryError::TooLarge)?;
        Ok(DataLayout { member_data_blocks: vec![per; n], array_blocks, table: Vec::new() })
    }

    /// Both copies, in md's slot order.
    fn map(&self, geo: &Geometry, lba: u64) -> (Placement, u64) {
        let strip = geo.strip_size_blocks();
        let c = lba >> geo.strip_shift();
        let within = lba & (strip - 1);
        (Placement::two(slot_loc(geo, 2 * c, within), slot_loc(geo, 2 * c + 1, within)), strip - within)
    }

    fn copies_at(&self, geo: &Geometry, at: Loc) -> Option<Placement> {
        let strip = geo.strip_size_blocks();
        let row = at.offset_blocks >> geo.strip_shift();
        let within = at.offset_blocks & (strip - 1);
        let slot = row * geo.num_members() as u64 + at.member as u64;
        // With an odd member count the last slot may hold no chunk.
        if (slot / 2) * strip >= geo.array_blocks() {
            return None;
        }
        Some(Placement::two(slot_loc(geo, slot & !1, within), slot_loc(geo, slot | 1, within)))
    }

    fn survives(&self, geo: &Geometry, lost: &dyn Fn(usize) -> bool) -> bool {
        // The pair pattern of chunk c repeats with period n.
        let n = geo.num_members();
        let chunks = geo.array_blocks() / geo.strip_size_blocks();
        (0..chunks.min(n as u64)).all(|c| {
            let (a, b) = ((2 * c) as usize % n, (2 * c + 1) as usize % n);
            !(lost(a) && lost(b))
        })
    }

    fn array_offset_is_member_offset(&self) -> bool {
        false
    }

    fn submit_rw(&self, channel: &ArrayChannel, slot: u32) {
        raid1::submit_rw_unwritten_as_zeros(channel, slot);
    }

    fn children_done(&self, channel: &ArrayChannel, slot: u32) -> bool {
        raid1::read_done_unwritten_as_zeros(channel, slot)
    }
}
