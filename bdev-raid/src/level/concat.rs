//! concat: members back to back, each rounded down to whole strips (so
//! members of different sizes are used to the strip). Losing any member
//! that holds data loses the array.

use super::RaidLevel;
use crate::map::{DataLayout, Geometry, GeometryError, Loc, Placement};

pub(super) struct Concat;

impl RaidLevel for Concat {
    fn name(&self) -> &'static str {
        "concat"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }
    fn superblock_code(&self) -> u8 {
        99
    }
    fn min_members(&self) -> usize {
        1
    }
    fn max_failed_members(&self, _num_members: usize) -> usize {
        0
    }
    fn uses_strips(&self) -> bool {
        true
    }

    /// The table holds where each member's data ends in the array.
    fn layout(&self, strip_size_blocks: u64, member_blocks: &[u64]) -> Result<DataLayout, GeometryError> {
        let sizes: Vec<u64> = member_blocks.iter().map(|&b| b / strip_size_blocks * strip_size_blocks).collect();
        let mut ends = Vec::with_capacity(sizes.len());
        let mut end = 0u64;
        for &s in &sizes {
            end = end.checked_add(s).ok_or(GeometryError::TooLarge)?;
            ends.push(end);
        }
        Ok(DataLayout { member_data_blocks: sizes, array_blocks: end, table: ends })
    }

    fn map(&self, geo: &Geometry, lba: u64) -> (Placement, u64) {
        let ends = geo.table();
        let i = ends.partition_point(|&e| e <= lba);
        let start = ends[i] - geo.member_data_blocks(i);
        (Placement::one(Loc { member: i as u16, offset_blocks: lba - start }), ends[i] - lba)
    }

    fn copies_at(&self, _geo: &Geometry, at: Loc) -> Option<Placement> {
        Some(Placement::one(at))
    }

    fn survives(&self, geo: &Geometry, lost: &dyn Fn(usize) -> bool) -> bool {
        (0..geo.num_members()).all(|m| !lost(m) || geo.member_data_blocks(m) == 0)
    }

    fn array_offset_is_member_offset(&self) -> bool {
        false
    }
}
