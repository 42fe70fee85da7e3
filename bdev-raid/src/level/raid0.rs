//! raid0: striping without redundancy. Strip `s` lives on member `s % n` at
//! member strip `s / n`; every member uses the same number of whole strips
//! (the smallest member's), so the array is `n` times that. Losing any
//! member that holds data loses the array.

use super::RaidLevel;
use crate::map::{DataLayout, Geometry, GeometryError, Loc, Placement};

pub(super) struct Raid0;

impl RaidLevel for Raid0 {
    fn name(&self) -> &'static str {
        "raid0"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["0"]
    }
    fn superblock_code(&self) -> u8 {
        0
    }
    fn min_members(&self) -> usize {
        1
    }
    fn max_failed_members(&self, _num_members: usize) -> usize {
        0
    }
    fn grows_with_members(&self) -> bool {
        true
    }
    fn uses_strips(&self) -> bool {
        true
    }

    fn layout(&self, strip_size_blocks: u64, member_blocks: &[u64]) -> Result<DataLayout, GeometryError> {
        let min = member_blocks.iter().copied().min().unwrap_or(0);
        let per = min / strip_size_blocks * strip_size_blocks;
        let array_blocks = per.checked_mul(member_blocks.len() as u64).ok_or(GeometryError::TooLarge)?;
        Ok(DataLayout { member_data_blocks: vec![per; member_blocks.len()], array_blocks, table: Vec::new() })
    }

    fn map(&self, geo: &Geometry, lba: u64) -> (Placement, u64) {
        let strip = geo.strip_size_blocks();
        let s = lba >> geo.strip_shift();
        let within = lba & (strip - 1);
        let n = geo.num_members() as u64;
        let at = Loc { member: (s % n) as u16, offset_blocks: (s / n) * strip + within };
        (Placement::one(at), strip - within)
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
