//! raid6 under the parity storm (`common/stripe_storm.rs`): two threaded
//! reactors write and read a raid6 of 4–6 malloc members behind seeded
//! random-latency delay bdevs; every read is checked against the model of
//! the last acknowledged writes. Afterwards every stripe's P is the XOR of
//! its data and Q the GF(2^8) syndrome of it (both computed here from the
//! members' raw memory with this file's own GF arithmetic, not the parity
//! crate), and every block sits where md's left-symmetric raid6 layout puts
//! it.
//!
//! The same storm breaks P/Q when the lock is not widened to whole stripes
//! (the check is not blind); `bdev_raid_check` then counts exactly the P and
//! Q blocks that are wrong, and repair puts them right.
//!
//! Loss: two members fail mid-storm one after the other; no IO fails and
//! every read stays right; a third failure fails IO, nothing wrong is
//! acknowledged. Rebuild: two members removed, writes while both are
//! missing, two new members added and rebuilt under a storm.
//!
//! Replay a failure with `NVRAID_SEED=<seed>` (printed on failure).

mod common;

use bdev::rng::SimRng;
use bdev_raid::RaidArray;
use common::stripe_storm::*;
use common::*;
use std::sync::atomic::Ordering;

fn assert_clean(c: &Counters, ctx: &str) {
    assert_eq!(c.write_errors.load(Ordering::Relaxed), 0, "writes failed ({ctx})");
    assert_eq!(c.read_errors.load(Ordering::Relaxed), 0, "reads failed ({ctx})");
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "reads returned data other than the last write ({ctx})");
}

fn run(members: usize) {
    let seed = seed();
    eprintln!("raid6 storm, {members} members: seed {seed} (replay with NVRAID_SEED={seed})");
    let ctx = format!("seed {seed}, replay with NVRAID_SEED={seed}");
    let a = build(seed, members, "raid6");
    assert_eq!(a.parities, 2);
    let region = 16 * a.stripe_blocks();
    let (c, last) = storm(&a, seed, region, 1500, None, None);
    assert_clean(&c, &ctx);
    assert!(c.reads.load(Ordering::Relaxed) > 200 && c.writes.load(Ordering::Relaxed) > 400, "storm ran");
    assert!(last.iter().filter(|&&s| s != 0).count() as u64 > region / 2, "storm wrote most of the region");
    let (bad, _) = pq_mismatches(&a);
    assert!(bad.is_empty(), "stripes with wrong P or Q: {bad:?} ({ctx})");
    let misplaced = layout_errors(&a, &last);
    assert!(misplaced.is_empty(), "blocks not where md's raid6 layout puts them: {misplaced:?} ({ctx})");
    assert_eq!(a.array_blocks, a.stripes * a.stripe_blocks());

    // Without the stripe lock (the IO's blocks only), two writes into one
    // stripe compute P and Q from each other's half-written data.
    a.set.call(0, || RaidArray::find("R").unwrap().set_lock_widening(false));
    let mut caught = None;
    for attempt in 0..5u64 {
        let (c, _) = storm(&a, seed.wrapping_add(attempt + 1), region, 1500, None, None);
        assert_eq!(c.write_errors.load(Ordering::Relaxed), 0, "writes failed ({ctx})");
        if !pq_mismatches(&a).0.is_empty() {
            caught = Some(attempt + 1);
            break;
        }
    }
    let storms = caught.unwrap_or_else(|| panic!("P and Q stayed right without the stripe lock: blind ({ctx})"));
    eprintln!("lock not widened: wrong P/Q after {storms} storm(s), as expected");
    a.set.call(0, || RaidArray::find("R").unwrap().set_lock_widening(true));
    let (_, want) = pq_mismatches(&a);
    let r = check(&a, false);
    assert_eq!(r["mismatched_blocks"], want, "check counts the wrong P and Q blocks: {r} ({ctx})");
    let r = check(&a, true);
    assert_eq!((r["mismatched_blocks"].as_u64(), r["repaired_blocks"].as_u64()), (Some(want), Some(want)), "{r}");
    assert!(pq_mismatches(&a).0.is_empty(), "repair left wrong P or Q ({ctx})");
    assert_eq!(check(&a, false)["mismatched_blocks"], 0, "{ctx}");

    // Checked: partial writes may now read-modify-write P and Q.
    let (c, last) = storm(&a, seed ^ 0x4D57, region, 1500, None, None);
    assert_clean(&c, &ctx);
    assert!(pq_mismatches(&a).0.is_empty(), "wrong P or Q after read-modify-writes ({ctx})");
    assert!(layout_errors(&a, &last).is_empty(), "{ctx}");
}

#[test]
fn raid6_four_members_storm() {
    run(4);
}

#[test]
fn raid6_six_members_storm() {
    run(6);
}

/// Two members fail mid-storm, one after the other (error bdevs); then a
/// third.
fn run_two_failures(members: usize) {
    let seed = seed();
    eprintln!("raid6 failure storm, {members} members: seed {seed} (replay with NVRAID_SEED={seed})");
    let ctx = format!("seed {seed}, replay with NVRAID_SEED={seed}");
    let mut rng = SimRng::new(seed);
    let a = build(seed, members, "raid6");
    let region = 16 * a.stripe_blocks();
    let first = rng.below(members as u64) as usize;
    let second = (first + 1 + rng.below(members as u64 - 1) as usize) % members;
    let (c, last) = storm(&a, seed, region, 1500, Some((Fault::Fail(first), 100 + rng.below(1000))), None);
    assert_clean(&c, &ctx);
    let (c, last) =
        storm(&a, seed ^ 0xD5, region, 1500, Some((Fault::Fail(second), 50 + rng.below(1000))), Some(&last));
    eprintln!("members {first} and {second} failed");
    assert_clean(&c, &ctx);
    let r = a.set.call(0, || RaidArray::find("R").unwrap());
    assert_eq!(r.state(), bdev_raid::RaidState::Online, "{ctx}");
    assert!(r.is_degraded(), "{ctx}");
    let wrong = read_back(&a, &last);
    assert!(wrong.is_empty(), "reads with two members lost differ at {wrong:?} ({ctx})");

    // A third failure: IO fails, nothing wrong is acknowledged.
    let third = (0..members).find(|&m| m != first && m != second).unwrap();
    let (c, _) = storm(&a, seed ^ 0x2F, region, 1000, Some((Fault::Fail(third), 50)), Some(&last));
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "a read returned wrong data after a third failure ({ctx})");
    assert!(c.write_errors.load(Ordering::Relaxed) + c.read_errors.load(Ordering::Relaxed) > 0, "{ctx}");
    assert_eq!(r.state(), bdev_raid::RaidState::Offline, "three members lost ({ctx})");
}

#[test]
fn raid6_five_members_two_failures_storm() {
    run_two_failures(5);
}

/// Two members removed; a storm writes while both are missing; two new
/// members are added and rebuilt (small windows, rate-limited) under a
/// storm; afterwards P, Q and the data are right on every member.
#[test]
fn raid6_two_missing_members_written_then_rebuilt() {
    let seed = seed();
    eprintln!("raid6 two-member rebuild storm: seed {seed} (replay with NVRAID_SEED={seed})");
    let ctx = format!("seed {seed}, replay with NVRAID_SEED={seed}");
    let mut rng = SimRng::new(seed);
    let members = 5;
    let mut a = build(seed, members, "raid6");
    let stripe_blocks = a.stripe_blocks();
    let region = 16 * stripe_blocks;
    let news = a.set.call(0, || {
        bdev_raid::rpc::bdev_raid_set_options(bdev_raid::rpc::RaidSetOptionsParams {
            process_window_size_kb: Some(4),
            process_max_bandwidth_mb_sec: Some(4),
            assemble_timeout_sec: None,
        })
        .unwrap();
        [malloc("N0", 2048), malloc("N1", 2048)]
    });
    rewrite(&a, a.array_blocks);
    let mut whole: Vec<u64> = (0..a.array_blocks).map(|lba| (7 << 40) | (lba / stripe_blocks)).collect();
    let first = rng.below(members as u64) as usize;
    let second = (first + 1 + rng.below(members as u64 - 1) as usize) % members;
    let (c, last) = storm(&a, seed, region, 600, Some((Fault::Remove(first), 100)), Some(&whole[..region as usize]));
    assert_clean(&c, &ctx);
    let (c, last) = storm(&a, seed ^ 0x77, region, 800, Some((Fault::Remove(second), 100)), Some(&last));
    assert_clean(&c, &ctx);
    eprintln!("members {first} and {second} removed");
    let wrong = read_back(&a, &last);
    assert!(wrong.is_empty(), "reads with two members missing differ at {wrong:?} ({ctx})");
    // Both added mid-storm; the rebuilds run under its writes.
    let (c, last) = storm(&a, seed ^ 0xADD, region, 800, Some((Fault::Add("N0"), 200)), Some(&last));
    assert_clean(&c, &ctx);
    let (c, last) = storm(&a, seed ^ 0xADE, region, 800, Some((Fault::Add("N1"), 200)), Some(&last));
    assert_clean(&c, &ctx);
    let r = a.set.call(0, || RaidArray::find("R").unwrap());
    let r2 = r.clone();
    a.set.wait_for(60, "the rebuilds to finish", move || !r2.rebuild_running() && !r2.is_degraded());
    for (name, m) in ["N0", "N1"].iter().zip(news) {
        let slot = r.members().iter().position(|(n, _)| n.as_deref() == Some(*name)).expect("a member");
        assert!(slot == first || slot == second, "{name} took a removed member's slot ({ctx})");
        a.mallocs[slot] = m;
    }
    whole[..region as usize].copy_from_slice(&last);
    let (bad, _) = pq_mismatches(&a);
    assert!(bad.is_empty(), "stripes with wrong P or Q after the rebuild: {bad:?} ({ctx})");
    let misplaced = layout_errors(&a, &whole);
    assert!(misplaced.is_empty(), "blocks wrong after the rebuild: {misplaced:?} ({ctx})");
    assert!(read_back(&a, &whole).is_empty(), "{ctx}");
}
