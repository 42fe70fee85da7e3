//! raid5: block-interleaved distributed parity in md's default
//! left-symmetric layout (`ALGORITHM_LEFT_SYMMETRIC`, drivers/md/raid5.c).
//! Stripe `s` has one chunk (`strip_size_kb`) on each of the `n` members at
//! member offset `s * chunk`: parity P on member `n - 1 - s % n`, then data
//! chunks 0, 1, … on the members after it, wrapping around. Array chunk
//! `c` is data chunk `c % (n - 1)` of stripe `c / (n - 1)`, so a stripe's
//! data is contiguous in the array. SPDK's `raid5f` is accepted as a name
//! for it (any write size here; raid5f refuses partial stripes).
//!
//! Writes hold whole stripes in the array's range table (`lock_range`),
//! so no two writes into one stripe compute parity from each other's
//! half-written data. A write covering whole stripes computes P from the
//! new data alone; any other write reconstructs: it reads the rows of the
//! stripe's other data chunks it does not write, then computes P from the
//! whole row range. That is correct whatever the old parity was, so a new
//! array needs no initial sync. Once a `bdev_raid_check` of the whole
//! array has left every parity right (`ArrayShared::redundancy_verified`),
//! a partial write that way would read more members than the rows it
//! replaces plus the parity does read-modify-write instead (P ^= old ^ new).
//! With a superblock that knowledge survives a restart (the superblock's
//! redundancy-verified flag, `RaidLevel::trusts_checked_redundancy`); a
//! check that finds wrong parity and leaves it drops it. Without one, a
//! new instance starts untrusted.
//!
//! Degraded (one member failed or missing): a read of the lost member's
//! chunk reads the same rows of every other member and XORs them (under
//! the stripe's lock, so it never sees a half-written stripe); a write
//! whose stripe lost a data member first reconstructs that member's old
//! rows from the others and the old parity, so the new parity also
//! carries the lost member's new data; a stripe that lost its parity
//! member gets its data only. A second failure fails IO: nothing wrong is
//! acknowledged.
//!
//! Each IO runs in rounds (`children_done`): reads, then writes. The
//! stripe rows it computes on live in one DMA buffer per IO from the
//! reactor's pool (`ArrayChannel::set_level_buf`), returned when it finishes; the
//! parity math is `parity::Parity` (SIMD). Nothing else is allocated per IO.
//!
//! A member added to a degraded array (`bdev_raid_add_base_bdev`) takes
//! every write at once (data and parity, never read) and is rebuilt window
//! by window, each window whole stripes held in the range table: its
//! chunk, data or parity, is the XOR of the same rows of the others.
//!
//! `bdev_raid_check` compares each stripe's parity with the XOR of its
//! data (md's `check`; `mismatched_blocks` counts parity blocks that
//! differ) and with `repair` rewrites the parity.
//!
//! With a superblock (`bdev_raid_create -s`; level code 95, SPDK's
//! RAID5F) the array core writes superblocks and a write-intent bitmap
//! and assembles the array at start-up, as for raid1. The bitmap marks
//! array blocks, so a bitmap chunk names data rows; every process range
//! widens to the whole stripes it touches (`lock_range`). A write marks its
//! array range and reaches no member, in any round, before its batch is on
//! disk (the core parks it in `mark` before `submit_rw`; the bits are
//! released in `finish`, after the last round). After an unclean shutdown
//! the resync (`plan_window`, every member a destination, none rebuilding)
//! rewrites P of each stripe of a dirty chunk from its data, and only
//! those; a returning member is rebuilt in the stripes of the chunks it
//! missed.
//!
//! Write hole, closed with a superblock by a partial parity log (md's
//! PPL; the code is `crate::ppl`, the write round `stripe.rs`'s
//! `WRITE_LOGGING`): a crash in the middle of a partial-stripe write can
//! leave a stripe whose data and parity disagree; if the array is (or then
//! becomes) degraded, the lost member's blocks of that stripe would be
//! reconstructed from that parity, corrupting data the write never touched.
//! So before a partial-stripe write's data and parity go out, an entry goes
//! to the log area (metadata area, `MetadataLayout::with_ppl`, recorded in
//! the superblock behind `FLAG_PPL`) of the stripe's parity member, FUA:
//! the rows of each data chunk the write modifies and the partial parity,
//! the XOR of everything else in those rows (new parity ^ new data: no
//! extra read). Only then do data and parity go out. A full-stripe write
//! logs nothing: it owns every data row of the stripe, so tearing it can
//! only garble its own unacknowledged data (it wipes an older entry of its
//! stripe first, if the slot table says one is on disk). Assembly of an
//! unclean array, before resync, rebuild or any IO, replays each valid
//! entry of a dirty stripe found on the in-sync members: parity = partial
//! parity ^ the modified rows as they are now, whatever subset of the write
//! landed; then wipes the logs. A degraded array then has nothing left to
//! resync (the dirty-degraded start that once stopped its resync without
//! writing now recovers and runs; the dirty bits stay for the missing
//! member's return); a whole array still resyncs its dirty stripes (torn
//! full-stripe writes log nothing). What the log cannot save: rows of a
//! chunk the write *modified* on the lost member (that write was not
//! acknowledged; those rows read back as neither old nor new data); when
//! the lost member is the stripe's parity member, its log is gone with it,
//! but then every data chunk is present and there is no parity to be
//! wrong. Cost: one more member write per partial-stripe write (a header
//! block and the partial parity rows), and its latency before the data and
//! parity writes; on malloc members about a third of partial-write
//! throughput (`examples/raid5_speed`), nothing on full-stripe writes. A
//! member's log area is `ppl::PPL_SLOTS` slots of a header and a chunk; a
//! write finding every slot of its parity member busy waits for one.
//! Without a superblock there is no metadata area and no log: the hole
//! stays open as in md without PPL (a dirty degraded start is impossible:
//! such an array does not assemble).
//!
//! Never-written chunks (with a bitmap of version 2 pages, md's llbitmap
//! states): a new array's chunks start unwritten. The first write into one
//! reconstructs, whatever the trust, and leaves the chunk "needing sync":
//! its parity is right in the rows written since, not in the others, until
//! the sync pass (`rebuild`, after `SYNC_PASS_DELAY`, every member active)
//! computed its stripes' parity from the data; only then, and in stripes
//! whose chunks are all written and synced, does a partial write
//! read-modify-write (`stripe::write_trusted`; a check's verification no
//! longer counts there, as the check skips unwritten chunks). A read of a
//! chunk never written returns zeros without member IO, healthy or
//! degraded, before and after a rebuild (which, like a check, covers only
//! the written chunks' stripes); a never-written block inside a written
//! chunk reads what the members hold (after the sync pass, the same
//! healthy or degraded).
//!
//! Removing a member leaves the array degraded.
//! Unmap and write zeroes are not advertised (`maps_unmap_to_members`).
//!
//! The code is the parity levels' engine (`stripe.rs`), shared with raid6:
//! raid5 is its one-parity case.

use super::stripe::ParityLevel;

/// raid5: one parity chunk a stripe, in the parity levels' engine
/// (`stripe`).
pub(super) const RAID5: ParityLevel = ParityLevel {
    name: "raid5",
    aliases: &["5", "raid5f"],
    // SPDK's RAID5F (enum raid_level); on disk since superblocks came to
    // raid5: never change it.
    superblock_code: 95,
    parities: 1,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::level::stripe::Shape;
    use crate::level::{named, RaidLevel};
    use crate::map::Geometry;

    #[test]
    fn left_symmetric_parity_rotates_backwards() {
        // md, 4 members: P on 3, 2, 1, 0, 3, …; data starts after P.
        let geo = Geometry::new(named("raid5"), 8, &[64; 4]).unwrap();
        let sh = Shape::of(&geo, 1);
        assert_eq!((0..5).map(|s| sh.parity_member(s)).collect::<Vec<_>>(), [3, 2, 1, 0, 3]);
        assert_eq!((0..3).map(|k| sh.data_member(1, k)).collect::<Vec<_>>(), [3, 0, 1]);
        assert_eq!(geo.array_blocks(), 3 * 64);
        assert_eq!(RAID5.lock_range(&geo, 25, 2), 24..48);
        assert_eq!(RAID5.lock_range(&geo, 0, 24), 0..24);
    }
}
