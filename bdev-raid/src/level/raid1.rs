//! raid1: an N-way mirror. Every member holds every block at the same
//! offset; the array is as large as the smallest member. It lives while any
//! member does. No strips (SPDK refuses a strip size for raid1).
//!
//! With a bitmap that knows which chunks were written (md's llbitmap
//! "unwritten" state), a chunk never written since the array was created
//! reads as zeros without member IO, as at the parity levels: a rebuild
//! or resync copies only written chunks (`rebuild`), so the copies of a
//! never-written chunk need not agree, and a read must not depend on the
//! copy it picks. (raid10 shares these hooks.)

use super::{copies, stripe, RaidLevel};
use crate::channel::ArrayChannel;
use crate::map::{DataLayout, Geometry, GeometryError, Loc, Placement};
use bdev::{IoStatus, IoType};

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

    fn submit_rw(&self, channel: &ArrayChannel, slot: u32) {
        submit_rw_unwritten_as_zeros(channel, slot);
    }

    fn children_done(&self, channel: &ArrayChannel, slot: u32) -> bool {
        read_done_unwritten_as_zeros(channel, slot)
    }
}

/// `RaidLevel::submit_rw` of a mirror level: a read of never-written
/// chunks only is zeros at once; everything else goes to the copies.
pub(super) fn submit_rw_unwritten_as_zeros(channel: &ArrayChannel, slot: u32) {
    // The range first: no reference on the buffer unless it is filled here.
    if let Some(((IoType::Read, _), off, n)) = channel.parent_range(slot) {
        if channel.bitmap_ref().as_deref().is_some_and(|bm| bm.range_unwritten(off, n)) {
            if let Some((.., Some(data))) = channel.parent_args(slot) {
                data.fill(0);
            }
            return channel.finish(slot, IoStatus::Success);
        }
    }
    copies::submit_rw(channel, slot);
}

/// `RaidLevel::children_done` of a mirror level: a read's blocks in
/// never-written chunks become zeros (the read also covered written ones).
/// The parent then completes (false).
pub(super) fn read_done_unwritten_as_zeros(channel: &ArrayChannel, slot: u32) -> bool {
    // Only a bitmap that tracks written chunks can have any to zero.
    let tracks = channel.bitmap_ref().as_deref().is_some_and(|bm| bm.tracks_written());
    if tracks && matches!(channel.parent_range(slot), Some(((IoType::Read, _), ..))) {
        stripe::zero_unwritten(channel, slot);
    }
    false
}
