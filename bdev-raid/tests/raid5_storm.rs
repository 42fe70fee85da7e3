//! raid5 under a storm: two threaded reactors (sleep-when-idle) write and
//! read a raid5 of 3–5 malloc members, each behind a seeded random-latency
//! delay bdev, so member IOs complete in every order. Writes of every size,
//! from one block to several stripes, land anywhere in a small region, so
//! many writes share stripes at once (the test only keeps two IOs off the
//! same *block* at once, so that the last acknowledged write of every block
//! is what it must hold). Every read is checked against that model while
//! the storm runs; afterwards every stripe's parity is the XOR of its data
//! (read from the members' raw memory) and every block sits where md's
//! left-symmetric layout puts it.
//!
//! The same storm is caught breaking parity when array serialization is
//! off, and when the lock is not widened to whole stripes: two writes into
//! one stripe then compute parity from each other's half-written data.
//!
//! The failure storm fails one member (error bdev) at a random point: no
//! write fails, every read stays right while degraded (reconstructed from
//! the others), a second failure fails IO rather than answer wrong data.
//!
//! Replay a failure with `NVRAID_SEED=<seed>` (printed on failure).

mod common;

use bdev::rng::SimRng;
use bdev_raid::RaidArray;
use common::stripe_storm::*;
use common::*;
use std::sync::atomic::Ordering;

/// Stripes whose members do not XOR to zero (parity ≠ XOR of the data).
fn parity_mismatches(a: &Array, stripes: u64) -> Vec<u64> {
    let rows: Vec<Vec<u8>> = a.mallocs.iter().map(|m| raw(m, 0, stripes * CHUNK)).collect();
    let chunk_bytes = (CHUNK * BLOCK) as usize;
    (0..stripes)
        .filter(|&s| {
            let r = s as usize * chunk_bytes..(s as usize + 1) * chunk_bytes;
            let mut x = vec![0u8; chunk_bytes];
            for m in &rows {
                for (d, s) in x.iter_mut().zip(&m[r.clone()]) {
                    *d ^= s;
                }
            }
            x.iter().any(|&b| b != 0)
        })
        .collect()
}

/// Parity blocks (stripe rows) whose members do not XOR to zero.
fn mismatched_parity_blocks(a: &Array) -> u64 {
    let rows: Vec<Vec<u8>> = a.mallocs.iter().map(|m| raw(m, 0, a.stripes * CHUNK)).collect();
    (0..(a.stripes * CHUNK) as usize)
        .filter(|&b| {
            let r = b * BLOCK as usize..(b + 1) * BLOCK as usize;
            (0..BLOCK as usize).any(|i| rows.iter().fold(0u8, |x, m| x ^ m[r.start + i]) != 0)
        })
        .count() as u64
}

fn run(members: usize) {
    let seed = seed();
    eprintln!("raid5 storm, {members} members: seed {seed} (replay with NVRAID_SEED={seed})");
    let a = build(seed, members, "raid5f");
    let stripe_blocks = (members as u64 - 1) * CHUNK;
    let region = 16 * stripe_blocks;
    let region_stripes = region / stripe_blocks;
    let (c, last) = storm(&a, seed, region, 1500, None, None);
    let ctx = format!("seed {seed}, replay with NVRAID_SEED={seed}");
    assert_eq!(c.write_errors.load(Ordering::Relaxed), 0, "writes failed ({ctx})");
    assert_eq!(c.read_errors.load(Ordering::Relaxed), 0, "reads failed ({ctx})");
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "reads returned data other than the last write ({ctx})");
    assert!(c.reads.load(Ordering::Relaxed) > 200 && c.writes.load(Ordering::Relaxed) > 400, "storm ran");
    assert!(last.iter().filter(|&&s| s != 0).count() as u64 > region / 2, "storm wrote most of the region");
    let bad = parity_mismatches(&a, a.stripes);
    assert!(bad.is_empty(), "stripes with wrong parity: {bad:?} ({ctx})");
    let misplaced = layout_errors(&a, &last);
    assert!(misplaced.is_empty(), "blocks not where md left-symmetric puts them: {misplaced:?} ({ctx})");
    assert!(a.array_blocks == a.stripes * stripe_blocks);

    // The same storm without stripe serialization must break parity: first
    // with the lock on the IO's blocks only, then with no lock at all.
    for (what, widen, serialize) in [("lock not widened to stripes", false, true), ("no serialization", true, false)] {
        a.set.call(0, move || {
            let r = RaidArray::find("R").unwrap();
            r.set_lock_widening(widen);
            r.set_serialization(serialize);
        });
        let mut caught = None;
        for attempt in 0..5u64 {
            let (c, _) = storm(&a, seed.wrapping_add(attempt + 1), region, 1500, None, None);
            assert_eq!(c.write_errors.load(Ordering::Relaxed), 0, "writes failed ({ctx})");
            let bad = parity_mismatches(&a, region_stripes);
            if !bad.is_empty() {
                caught = Some((attempt + 1, bad.len()));
                break;
            }
        }
        let (storms, stripes) =
            caught.unwrap_or_else(|| panic!("{what}: parity stayed right in 5 storms: the check is blind ({ctx})"));
        eprintln!("{what}: {stripes} stripes with wrong parity after {storms} storm(s), as expected");
        a.set.call(0, || {
            let r = RaidArray::find("R").unwrap();
            r.set_lock_widening(true);
            r.set_serialization(true);
        });
        // bdev_raid_check finds exactly the parity blocks that are wrong,
        // and repair puts them right (for the next variant too).
        let want = mismatched_parity_blocks(&a);
        let r = check(&a, false);
        assert_eq!(r["mismatched_blocks"], want, "check counts the wrong parity blocks: {r} ({ctx})");
        assert_eq!(r["blocks_checked"], a.array_blocks, "{r}");
        let r = check(&a, true);
        assert_eq!((r["mismatched_blocks"].as_u64(), r["repaired_blocks"].as_u64()), (Some(want), Some(want)), "{r}");
        assert!(parity_mismatches(&a, a.stripes).is_empty(), "repair left wrong parity ({ctx})");
        assert_eq!(check(&a, false)["mismatched_blocks"], 0, "{ctx}");
    }

    // The check left every stripe's parity right: small writes may now
    // update parity from its old value (read-modify-write, where it reads
    // fewer members: five members and one chunk written). The same storm
    // keeps parity and data right.
    let (c, last) = storm(&a, seed ^ 0x4D57, region, 1500, None, None);
    assert_eq!(c.write_errors.load(Ordering::Relaxed) + c.read_errors.load(Ordering::Relaxed), 0, "{ctx}");
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "reads wrong with parity trusted ({ctx})");
    let bad = parity_mismatches(&a, a.stripes);
    assert!(bad.is_empty(), "stripes with wrong parity after read-modify-writes: {bad:?} ({ctx})");
    assert!(layout_errors(&a, &last).is_empty(), "{ctx}");
}

#[test]
fn raid5_three_members_storm() {
    run(3);
}

#[test]
fn raid5_four_members_storm() {
    run(4);
}

#[test]
fn raid5_five_members_storm() {
    run(5);
}

/// With `lost` gone, each of its data chunks in the region must be the XOR
/// of the surviving members' rows (computed here from raw member memory,
/// not by the array): returns the blocks where it is not.
fn survivors_reconstruct(a: &Array, lost: usize, last: &[u64]) -> Vec<u64> {
    (0..last.len() as u64)
        .filter(|&lba| {
            let (m, off) = md_location(a, lba);
            if m != lost {
                return false;
            }
            let mut x = vec![0u8; BLOCK as usize];
            for (i, mb) in a.mallocs.iter().enumerate() {
                if i != lost {
                    for (d, s) in x.iter_mut().zip(raw(mb, off, 1)) {
                        *d ^= s;
                    }
                }
            }
            x != expected(lba, last[lba as usize])
        })
        .collect()
}

fn run_failure(members: usize) {
    run_loss(members, false);
}

/// One member lost mid-storm: failed (error bdev) or removed (RPC, fenced).
fn run_loss(members: usize, remove: bool) {
    let seed = seed();
    eprintln!("raid5 failure storm, {members} members: seed {seed} (replay with NVRAID_SEED={seed})");
    let ctx = format!("seed {seed}, replay with NVRAID_SEED={seed}");
    let mut rng = SimRng::new(seed);
    let a = build(seed, members, "raid5f");
    let stripe_blocks = (members as u64 - 1) * CHUNK;
    let region = 16 * stripe_blocks;
    let lost = rng.below(members as u64) as usize;
    let after = 100 + rng.below(1500);
    let fault = if remove { Fault::Remove(lost) } else { Fault::Fail(lost) };
    let (c, last) = storm(&a, seed, region, 2000, Some((fault, after)), None);
    eprintln!("member {lost} failed after {after} IOs");
    assert_eq!(c.write_errors.load(Ordering::Relaxed), 0, "a write failed with one member lost ({ctx})");
    assert_eq!(c.read_errors.load(Ordering::Relaxed), 0, "a read failed with one member lost ({ctx})");
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "a read returned wrong data ({ctx})");
    let r = a.set.call(0, || RaidArray::find("R").unwrap());
    assert_eq!(r.state(), bdev_raid::RaidState::Online, "{ctx}");
    assert!(r.is_degraded(), "the member's failure was noticed ({ctx})");
    let wrong = read_back(&a, &last);
    assert!(wrong.is_empty(), "degraded reads differ from the last writes at {wrong:?} ({ctx})");
    let wrong = survivors_reconstruct(&a, lost, &last);
    assert!(wrong.is_empty(), "survivors do not reconstruct the lost member at {wrong:?} ({ctx})");

    // Still degraded: a storm of its own, every read and write right.
    let (c, last) = storm(&a, seed ^ 0xD5, region, 1000, None, Some(&last));
    assert_eq!(c.write_errors.load(Ordering::Relaxed) + c.read_errors.load(Ordering::Relaxed), 0, "{ctx}");
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "a degraded read returned wrong data ({ctx})");
    assert!(survivors_reconstruct(&a, lost, &last).is_empty(), "{ctx}");

    // A second failure: IO fails, nothing wrong is acknowledged.
    let second = (lost + 1 + rng.below(members as u64 - 1) as usize) % members;
    let fault = if remove { Fault::Remove(second) } else { Fault::Fail(second) };
    let (c, _) = storm(&a, seed ^ 0x2F, region, 1000, Some((fault, 50)), Some(&last));
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "a read returned wrong data after a second failure ({ctx})");
    assert!(c.write_errors.load(Ordering::Relaxed) + c.read_errors.load(Ordering::Relaxed) > 0, "{ctx}");
    assert_eq!(r.state(), bdev_raid::RaidState::Offline, "two members lost ({ctx})");
}

#[test]
fn raid5_three_members_failure_storm() {
    run_failure(3);
}

#[test]
fn raid5_five_members_failure_storm() {
    run_failure(5);
}

#[test]
fn raid5_four_members_removal_storm() {
    run_loss(4, true);
}

/// A member fails mid-storm, a new one is added mid-storm and rebuilt
/// (small windows, rate-limited, so the rebuild runs under the storm's
/// writes); afterwards every stripe's parity matches, every block is where
/// md's layout puts it, and reads return the last writes.
fn run_rebuild(members: usize) {
    let seed = seed();
    eprintln!("raid5 rebuild storm, {members} members: seed {seed} (replay with NVRAID_SEED={seed})");
    let ctx = format!("seed {seed}, replay with NVRAID_SEED={seed}");
    let mut rng = SimRng::new(seed);
    let mut a = build(seed, members, "raid5f");
    let new = a.set.call(0, || {
        bdev_raid::rpc::bdev_raid_set_options(bdev_raid::rpc::RaidSetOptionsParams {
            process_window_size_kb: Some(4),
            process_max_bandwidth_mb_sec: Some(2),
            assemble_timeout_sec: None,
        })
        .unwrap();
        malloc("N", MEMBER_BLOCKS)
    });
    let stripe_blocks = (members as u64 - 1) * CHUNK;
    let region = 16 * stripe_blocks;
    // Every block of the array holds data, so a rebuild that computes a
    // chunk wrong shows outside the storm's region too.
    rewrite(&a, a.array_blocks);
    let mut whole: Vec<u64> = (0..a.array_blocks).map(|lba| (7 << 40) | (lba / stripe_blocks)).collect();
    let lost = rng.below(members as u64) as usize;
    let (c, last) = storm(&a, seed, region, 1000, Some((Fault::Fail(lost), 100 + rng.below(800))), None);
    assert_eq!(c.write_errors.load(Ordering::Relaxed) + c.read_errors.load(Ordering::Relaxed), 0, "{ctx}");
    let r = a.set.call(0, || RaidArray::find("R").unwrap());
    assert!(r.is_degraded(), "{ctx}");
    // Added late in the storm: the rebuild's first windows (the region's
    // stripes come first) run under its writes, and few writes come after.
    let (c, last) = storm(&a, seed ^ 0xADD, region, 800, Some((Fault::Add("N"), 1000 + rng.below(400))), Some(&last));
    assert_eq!(c.write_errors.load(Ordering::Relaxed), 0, "a write failed during the rebuild ({ctx})");
    assert_eq!(c.read_errors.load(Ordering::Relaxed), 0, "a read failed during the rebuild ({ctx})");
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "a read returned wrong data during the rebuild ({ctx})");
    let r2 = r.clone();
    a.set.wait_for(60, "the rebuild to finish", move || !r2.rebuild_running() && !r2.is_degraded());
    let slot = r.members().iter().position(|(n, _)| n.as_deref() == Some("N")).expect("N is a member");
    assert_eq!(slot, lost, "the new member took the failed one's slot ({ctx})");
    a.mallocs[slot] = new;
    whole[..region as usize].copy_from_slice(&last);
    let bad = parity_mismatches(&a, a.stripes);
    assert!(bad.is_empty(), "stripes with wrong parity after the rebuild: {bad:?} ({ctx})");
    let misplaced = layout_errors(&a, &whole);
    assert!(misplaced.is_empty(), "blocks wrong after the rebuild: {misplaced:?} ({ctx})");
    let wrong = read_back(&a, &whole);
    assert!(wrong.is_empty(), "reads after the rebuild differ at {wrong:?} ({ctx})");
}

#[test]
fn raid5_four_members_rebuild_storm() {
    run_rebuild(4);
}

#[test]
fn raid5_three_members_rebuild_storm() {
    run_rebuild(3);
}
