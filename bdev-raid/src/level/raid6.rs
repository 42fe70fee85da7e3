//! raid6: block-interleaved distributed P and Q in md's default
//! left-symmetric layout (`ALGORITHM_LEFT_SYMMETRIC`, level 6 in
//! drivers/md/raid5.c). Stripe `s` has one chunk (`strip_size_kb`) on each
//! of the `n` members (at least 4) at member offset `s * chunk`: P on
//! member `n - 1 - s % n`, Q on the member after it (wrapping), then data
//! chunks 0, 1, … on the members after Q, wrapping around. Array chunk `c`
//! is data chunk `c % (n - 2)` of stripe `c / (n - 2)`. P is the XOR of the
//! data; Q = Σ g^k · D_k over GF(2^8) (polynomial 0x11d, g = 2), `k` the
//! data chunk's index: md's syndrome order for this layout, so the members
//! hold what md's raid6 would.
//!
//! It runs in the parity levels' engine (`stripe`), as raid5 does (read
//! raid5.rs for the rounds, the stripe lock, the bitmap and resync, and the
//! write hole), with two parities:
//!
//! - Writes: a write covering whole stripes computes P and Q from the new
//!   data alone; any other write reconstructs (reads the rows of the
//!   stripe's data chunks it does not write, then P and Q from the whole
//!   rows), or, once a whole-array check verified the parities,
//!   read-modify-writes where that reads less (P ^= old ^ new,
//!   Q ^= g^k · (old ^ new)).
//! - Degraded: any two members may be lost. A read of a lost data chunk
//!   reads the same rows of every member still up and gives it back from
//!   P (one data chunk, or data and Q lost), from Q (data and P lost) or
//!   from both (two data chunks): the `parity` crate's recovery functions.
//!   A write whose stripe lost data chunks first gives back their old rows
//!   the same way, so the new P and Q carry their new data; lost parities
//!   are not written. A third failure fails IO: nothing wrong is
//!   acknowledged.
//! - Rebuild: up to two members being rebuilt at once (new members added
//!   to a degraded array, or returning ones), window by window, each
//!   stripe's chunk of each, data, P or Q, computed from the others.
//! - `bdev_raid_check` compares each stripe's P and Q with what its data
//!   gives (`mismatched_blocks` counts the P and Q blocks that differ);
//!   `repair` rewrites them. The resync after an unclean shutdown rewrites
//!   P and Q of each stripe of a dirty bitmap chunk.
//! - Superblock level code 6 (md's level number: SPDK has no raid6).
//! - Write hole: raid6 keeps no partial parity log (md has none for raid6
//!   either; `keeps_partial_parity_log` is raid5's only). A crash during a
//!   partial-stripe write of a degraded raid6 can still corrupt other data
//!   of the stripe: after an unclean shutdown a degraded raid6 starts, its
//!   resync stops without writing (`plan_window` returns None: nothing
//!   right to write) and its dirty bits stay until the missing members are
//!   rebuilt. A whole raid6 resyncs P and Q of its dirty stripes.
//!
//! Unmap and write zeroes are not advertised (`maps_unmap_to_members`).

use super::stripe::ParityLevel;

/// raid6: two parity chunks a stripe, P and Q.
pub(super) const RAID6: ParityLevel = ParityLevel { name: "raid6", aliases: &["6"], superblock_code: 6, parities: 2 };

#[cfg(test)]
mod tests {
    use super::*;
    use crate::level::stripe::{solve, Shape};
    use crate::level::{named, RaidLevel};
    use crate::map::{Geometry, Loc};
    use parity::Parity;

    #[test]
    fn left_symmetric_p_then_q() {
        // md, 5 members: P on 4, 3, 2, …; Q after P; data after Q.
        let geo = Geometry::new(named("raid6"), 8, &[64; 5]).unwrap();
        let sh = Shape::of(&geo, 2);
        let pq = |s| (sh.parity_j_member(s, 0), sh.parity_j_member(s, 1));
        assert_eq!((0..6).map(pq).collect::<Vec<_>>(), [(4, 0), (3, 4), (2, 3), (1, 2), (0, 1), (4, 0)]);
        assert_eq!((0..3).map(|k| sh.data_member(0, k)).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!((0..3).map(|k| sh.data_member(1, k)).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(geo.array_blocks(), 3 * 64);
        assert_eq!(RAID6.lock_range(&geo, 25, 2), 24..48);
        // P and Q hold no array data.
        assert!(geo.copies_at(Loc { member: 4, offset_blocks: 3 }).is_none());
        assert!(geo.copies_at(Loc { member: 0, offset_blocks: 3 }).is_none());
        assert!(geo.copies_at(Loc { member: 1, offset_blocks: 3 }).is_some());
        assert!(geo.survives(|m| m == 1 || m == 3));
        assert!(!geo.survives(|m| m < 3));
        assert!(Geometry::new(named("raid6"), 8, &[64; 3]).is_err());
    }

    /// Every one- and two-slot loss of a stripe's role slots comes back.
    #[test]
    fn solve_gives_back_any_two_lost_slots() {
        let parity = Parity::best();
        let (data, len) = (4usize, 64usize);
        let mut rows = vec![0u8; (data + 2) * len];
        for (i, b) in rows[..data * len].iter_mut().enumerate() {
            *b = (i * 7 + i / 13) as u8;
        }
        assert!(solve(&parity, data, 2, &mut rows, len, 0b1111));
        let good = rows.clone();
        for x in 0..data + 2 {
            for y in x..data + 2 {
                let mut r = good.clone();
                for z in [x, y] {
                    r[z * len..(z + 1) * len].fill(0xa5);
                }
                let known = 0b11_1111 & !(1 << x) & !(1 << y);
                assert!(solve(&parity, data, 2, &mut r, len, known), "lost {x} {y}");
                assert_eq!(r, good, "lost {x} {y}");
            }
        }
        assert!(!solve(&parity, data, 2, &mut rows, len, 0b1111 & !1));
    }
}
