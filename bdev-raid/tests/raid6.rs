//! raid6's contract, case by case (arrays of malloc members behind delay
//! and error bdevs, two threaded reactors): md's left-symmetric raid6 layout
//! and P/Q after writes of every size, checked on the members' raw memory
//! against rules written out in the test; every one- and two-member loss
//! read back right and still written; a third loss fails IO; a check counts
//! an injected P and an injected Q corruption and repair rights them; the
//! RPC creates and lists it as SPDK's client expects.

mod common;

use bdev::{IoStatus, IoType, Registry};
use bdev_raid::rpc::{bdev_raid_get_bdevs, RaidCreateParams, RaidGetBdevsParams};
use bdev_raid::{RaidArray, RaidState};
use common::stripe_storm::*;
use common::*;
use serde_json::json;

/// Writes of every size, from one block to several stripes, at offsets
/// that start and end inside chunks and stripes.
fn sizes(stripe: u64) -> Vec<u64> {
    vec![1, 2, 7, CHUNK, CHUNK + 1, 2 * CHUNK - 3, stripe - 1, stripe, stripe + 1, 2 * stripe + 5, 3 * stripe]
}

/// The blocks of `[lba, lba + want.len())` read through R that differ from
/// their last acknowledged writes, reading `step` blocks an IO.
fn wrong_reads(a: &Array, last: &[u64], step: u64) -> Vec<u64> {
    let mut wrong = Vec::new();
    let mut lba = 0;
    while lba < last.len() as u64 {
        let n = step.min(last.len() as u64 - lba);
        let data = io_at(a, IoType::Read, lba, n, 0).unwrap_or_else(|s| panic!("read at {lba} failed: {s:?}"));
        for i in 0..n {
            let b = &data[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize];
            if b != &expected(lba + i, last[(lba + i) as usize])[..] {
                wrong.push(lba + i);
            }
        }
        lba += n;
    }
    wrong
}

/// Writes each size once at a moving, misaligned offset; returns the model.
fn write_every_size(a: &Array, seq0: u64, last: &mut [u64]) {
    let mut lba = 3;
    for (i, n) in sizes(a.stripe_blocks()).into_iter().enumerate() {
        let seq = seq0 + i as u64;
        io_at(a, IoType::Write, lba, n, seq).unwrap_or_else(|s| panic!("write of {n} at {lba}: {s:?}"));
        last[lba as usize..(lba + n) as usize].fill(seq);
        // Reads back through the array at once, the same size.
        let data = io_at(a, IoType::Read, lba, n, 0).unwrap();
        for b in 0..n {
            assert_eq!(&data[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize], &expected(lba + b, seq)[..]);
        }
        lba += n + 5 + (i as u64 * 3) % CHUNK;
    }
    assert!(lba < a.array_blocks);
}

#[test]
fn raid6_layout_and_parity_after_writes_of_every_size() {
    for members in [4, 5, 7] {
        let a = build(1, members, "raid6");
        assert_eq!(a.array_blocks, a.stripes * (members as u64 - 2) * CHUNK);
        let mut last = vec![0u64; a.array_blocks as usize];
        write_every_size(&a, 1 << 40 | 1, &mut last);
        let (bad, _) = pq_mismatches(&a);
        assert!(bad.is_empty(), "{members} members: stripes with wrong P or Q: {bad:?}");
        let misplaced = layout_errors(&a, &last);
        assert!(misplaced.is_empty(), "{members} members: blocks not where md puts them: {misplaced:?}");
        // Overwrite the same places (reconstruct-writes over old data).
        write_every_size(&a, 2 << 40 | 1, &mut last);
        assert!(pq_mismatches(&a).0.is_empty(), "{members} members: overwrites");
        assert!(layout_errors(&a, &last).is_empty());
        assert!(wrong_reads(&a, &last, 97).is_empty());
    }
}

/// Every one- and two-member loss of a 4- and a 5-member array: reads
/// give back every block; writes (every size) still land, read back right
/// and leave the surviving members' data where md puts it; a third loss
/// fails IO.
#[test]
fn raid6_every_one_and_two_member_loss_reads_and_writes() {
    for members in [4usize, 5] {
        let mut cases: Vec<Vec<usize>> = (0..members).map(|m| vec![m]).collect();
        for x in 0..members {
            for y in x + 1..members {
                cases.push(vec![x, y]);
            }
        }
        for lost in cases {
            let what = format!("{members} members, lost {lost:?}");
            let a = build(2, members, "raid6");
            rewrite(&a, a.array_blocks);
            let mut last: Vec<u64> = (0..a.array_blocks).map(|lba| (7 << 40) | (lba / a.stripe_blocks())).collect();
            for &m in &lost {
                fail_member(&a, m);
            }
            // The reads find the failures (retry, then reconstruct).
            let region = 12 * a.stripe_blocks();
            let wrong = wrong_reads(&a, &last[..region as usize], 61);
            assert!(wrong.is_empty(), "{what}: reads differ at {wrong:?}");
            let r = a.set.call(0, || RaidArray::find("R").unwrap());
            assert_eq!(r.state(), RaidState::Online, "{what}");
            assert!(r.is_degraded(), "{what}");
            write_every_size(&a, 3 << 40 | 1, &mut last);
            let wrong = wrong_reads(&a, &last[..region as usize], 61);
            assert!(wrong.is_empty(), "{what}: reads after degraded writes differ at {wrong:?}");
            // The data on the members still up is where md puts it.
            let on_survivors: Vec<u64> = layout_errors(&a, &last[..region as usize])
                .into_iter()
                .filter(|&lba| !lost.contains(&md_location(&a, lba).0))
                .collect();
            assert!(on_survivors.is_empty(), "{what}: surviving members' blocks wrong at {on_survivors:?}");
            if lost.len() == 2 {
                let third = (0..members).find(|m| !lost.contains(m)).unwrap();
                fail_member(&a, third);
                // Whichever IO meets the third failure fails; none answers wrong data.
                let mut failed = false;
                for lba in (0..region).step_by(CHUNK as usize) {
                    match io_at(&a, IoType::Read, lba, CHUNK, 0) {
                        Ok(d) => assert_eq!(&d[..BLOCK as usize], &expected(lba, last[lba as usize])[..], "{what}"),
                        Err(_) => failed = true,
                    }
                }
                assert!(failed, "{what}: a third loss went unnoticed");
                assert_eq!(r.state(), RaidState::Offline, "{what}");
                assert!(io_at(&a, IoType::Write, 0, 1, 9).is_err(), "{what}: a write with three members lost");
            }
        }
    }
}

/// Writes `bytes` straight to malloc member `m` at block `off` (under the
/// array: a corruption the array did not make).
fn corrupt(a: &Array, m: usize, off: u64) {
    a.set.call_async(0, 10, move |done: Box<dyn FnOnce(IoStatus) + Send>| {
        let ch = Registry::get().lookup(&format!("M{m}")).unwrap().channel().unwrap();
        let buf = bdev::DmaBuf::alloc(BLOCK as usize).unwrap();
        buf.fill(0x5a);
        let mut io = bdev::IoBox::data(IoType::Write, off, 1, Some(buf)).unwrap();
        let done = std::cell::RefCell::new(Some(done));
        io.set_done(std::rc::Rc::new(move |io: bdev::IoBox| {
            if let Some(d) = done.borrow_mut().take() {
                d(io.status);
            }
        }));
        ch.submit(io);
    });
}

#[test]
fn raid6_check_counts_injected_p_and_q_corruption_and_repair_fixes_it() {
    let a = build(3, 5, "raid6");
    rewrite(&a, a.array_blocks);
    assert_eq!(check(&a, false)["mismatched_blocks"], 0);
    // Stripe 3's P (member 5 - 1 - 3 = 1), row 2; stripe 7's Q (P on 2, Q
    // on 3), row 5.
    corrupt(&a, 1, 3 * CHUNK + 2);
    corrupt(&a, 3, 7 * CHUNK + 5);
    assert_eq!(pq_mismatches(&a), (vec![3, 7], 2));
    let r = check(&a, false);
    assert_eq!(r["mismatched_blocks"], 2, "{r}");
    assert_eq!(r["blocks_checked"], a.array_blocks, "{r}");
    assert_eq!(pq_mismatches(&a).1, 2, "a check without repair writes nothing");
    let r = check(&a, true);
    assert_eq!((r["mismatched_blocks"].as_u64(), r["repaired_blocks"].as_u64()), (Some(2), Some(2)), "{r}");
    assert_eq!(pq_mismatches(&a), (vec![], 0), "repair rewrote P and Q");
    assert_eq!(check(&a, false)["mismatched_blocks"], 0);
    let last: Vec<u64> = (0..a.array_blocks).map(|lba| (7 << 40) | (lba / a.stripe_blocks())).collect();
    assert!(layout_errors(&a, &last).is_empty(), "the data is untouched");
}

/// `bdev_raid_create -r raid6 -z 64 -b "A B C D"` as spdk-rpc sends it;
/// listed with SPDK's field names; too few members and no strip refused.
#[test]
fn raid6_rpc_create_and_list() {
    let set = start(2);
    set.call(0, || {
        for n in ["A", "B", "C", "D"] {
            malloc(n, 4096);
        }
        let p: RaidCreateParams = serde_json::from_value(json!({
            "name": "R6", "raid_level": "raid6", "strip_size_kb": 64, "base_bdevs": "A B C D"
        }))
        .unwrap();
        assert_eq!(bdev_raid::rpc::bdev_raid_create(p).unwrap(), json!(true));
        let list = bdev_raid_get_bdevs(RaidGetBdevsParams { category: Some("all".into()) }).unwrap();
        let r = &list[0];
        assert_eq!(
            (&r["name"], &r["raid_level"], &r["strip_size_kb"], &r["state"], &r["num_base_bdevs"]),
            (&json!("R6"), &json!("raid6"), &json!(64), &json!("online"), &json!(4))
        );
        assert_eq!(r["num_base_bdevs_operational"], 4);
        let names: Vec<&str> =
            r["base_bdevs_list"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["A", "B", "C", "D"]);
        // Two data strips of 64 KiB a stripe; 4096 blocks of 512 bytes each member.
        let h = Registry::get().lookup("R6").unwrap();
        assert_eq!(h.props().num_blocks, 2 * 4096);
        assert!(!h.bdev().io_type_supported(IoType::Unmap));
        for (bad, why) in [
            (json!({"name": "X", "raid_level": "raid6", "strip_size_kb": 64, "base_bdevs": "A B C"}), "three members"),
            (json!({"name": "X", "raid_level": "raid6", "base_bdevs": "A B C D"}), "no strip"),
        ] {
            let p: RaidCreateParams = serde_json::from_value(bad).unwrap();
            let e = bdev_raid::rpc::bdev_raid_create(p).expect_err(why);
            assert_eq!(e.errno(), 22, "{why}: {e}");
        }
    });
}
