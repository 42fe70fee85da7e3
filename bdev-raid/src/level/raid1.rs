//! raid1: an N-way mirror. Every member holds every block at the same
//! offset; the array is as large as the smallest member. It lives while any
//! member does. No strips (SPDK refuses a strip size for raid1).

use super::RaidLevel;
use crate::map::{DataLayout, Geometry, GeometryError, Loc, Placement};

pub(super) struct Raid1;

impl RaidLevel for Raid1 {
    fn name(&self) -> &'static str {
        "raid1"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["1"]
    }
    fn superblock_code(&self) -> u8 {
        1
    }
    fn min_members(&self) -> usize {
        2
    }
    fn max_failed_members(&self, num_members: usize) -> usize {
        num_members.saturating_sub(1)
    }
    fn grows_with_members(&self) -> bool {
        true
    }
    fn uses_strips(&self) -> bool {
        false
    }

    fn layout(&self, _strip_size_blocks: u64, member_blocks: &[u64]) -> Result<DataLayout, GeometryError> {
        let min = member_blocks.iter().copied().min().unwrap_or(0);
        Ok(DataLayout { member_data_blocks: vec![min; member_blocks.len()], array_blocks: min, table: Vec::new() })
    }

    fn map(&self, geo: &Geometry, lba: u64) -> (Placement, u64) {
        (Placement::every_member(lba), geo.array_blocks() - lba)
    }

    fn copies_at(&self, _geo: &Geometry, at: Loc) -> Option<Placement> {
        Some(Placement::every_member(at.offset_blocks))
    }

    fn survives(&self, geo: &Geometry, lost: &dyn Fn(usize) -> bool) -> bool {
        (0..geo.num_members()).any(|m| !lost(m))
    }

    fn array_offset_is_member_offset(&self) -> bool {
        true
    }
}
