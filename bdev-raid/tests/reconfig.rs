//! Invariants 3 and 4 (docs/architecture.md) under load: while a verify workload runs on two
//! reactors, members are removed and re-added again and again (also in the
//! middle of the rebuild that each re-add starts), the array is suspended
//! and resumed by hand, and finally deleted with IO in flight — with a
//! suspend racing the delete. Nothing hangs (every wait has a timeout),
//! nothing panics, no acknowledged data is lost, the rebuilt copies are
//! identical, and the delete releases every member.
//!
//! Replay with `NVRAID_SEED=<seed>` (printed on failure).

mod common;

use bdev::Registry;
use bdev_raid::rpc::{self, RaidAddBaseBdevParams, RaidRemoveBaseBdevParams, RaidSetOptionsParams};
use bdev_raid::{RaidArray, RaidState};
use common::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const MEMBER_BLOCKS: u64 = 8192;

fn start_jobs(set: &Set, seed: u64, array_blocks: u64) -> Vec<Arc<VerifyStats>> {
    let half = array_blocks / 2;
    (0..2usize)
        .map(|r| {
            let stats = Arc::new(VerifyStats::default());
            let s2 = stats.clone();
            set.0.send(r, move || {
                let ch = Registry::get().lookup("R").unwrap().channel().unwrap();
                let lanes = 16;
                let cfg = VerifyCfg {
                    writer: r as u64 + 1,
                    seed: seed ^ (r as u64 + 3),
                    first_block: r as u64 * half,
                    lanes,
                    lane_blocks: half / lanes,
                    max_blocks: 32,
                    max_ios: 0,
                };
                start_verify(ch, cfg, s2);
            });
            stats
        })
        .collect()
}

fn stop_jobs(stats: &[Arc<VerifyStats>]) {
    for s in stats {
        s.stop.store(true, Ordering::Relaxed);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !stats.iter().all(|s| s.finished.load(Ordering::Acquire)) {
        assert!(std::time::Instant::now() < deadline, "workload did not drain");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn total_ios(stats: &[Arc<VerifyStats>]) -> u64 {
    stats.iter().map(|s| s.ios.load(Ordering::Relaxed)).sum()
}

fn wait_more_ios(stats: &[Arc<VerifyStats>], more: u64) {
    let target = total_ios(stats) + more;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while total_ios(stats) < target {
        assert!(std::time::Instant::now() < deadline, "workload stalled");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn remove(set: &Set, member: &'static str) {
    rpc_async(set, 20, move |done| {
        rpc::bdev_raid_remove_base_bdev(RaidRemoveBaseBdevParams { name: member.into() }, done)
    })
    .unwrap_or_else(|e| panic!("remove {member}: {e}"));
}

fn add(set: &Set, member: &'static str) {
    rpc_async(set, 20, move |done| {
        rpc::bdev_raid_add_base_bdev(RaidAddBaseBdevParams { raid_bdev: "R".into(), base_bdev: member.into() }, done)
    })
    .unwrap_or_else(|e| panic!("add {member}: {e}"));
}

fn assert_clean(stats: &[Arc<VerifyStats>], seed: u64) {
    for (r, s) in stats.iter().enumerate() {
        let v = (
            s.write_errors.load(Ordering::Relaxed),
            s.read_errors.load(Ordering::Relaxed),
            s.mismatches.load(Ordering::Relaxed),
        );
        assert_eq!(v, (0, 0, 0), "reactor {r}: (write errors, read errors, mismatches), seed {seed}");
    }
}

/// Removes and re-adds `cycle` members of the array named R under load,
/// then checks the mirror pairs are identical, then deletes R mid-IO.
fn run(level: &'static str, members: usize, cycle: &[&'static str], pairs: &[(usize, usize)]) {
    let seed = seed();
    eprintln!("{level} reconfiguration under load: seed {seed} (replay with NVRAID_SEED={seed})");
    let set = start(2);
    let mallocs = set.call(0, move || {
        rpc::bdev_raid_set_options(RaidSetOptionsParams {
            process_window_size_kb: Some(64),
            process_max_bandwidth_mb_sec: Some(0),
            ..Default::default()
        })
        .unwrap();
        let ms: Vec<_> = (0..members).map(|i| malloc(&format!("M{i}"), MEMBER_BLOCKS)).collect();
        let names: Vec<String> = (0..members).map(|i| format!("M{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        create_raid("R", level, (level != "raid1").then_some(8), &refs).unwrap();
        ms
    });
    let (array_blocks, data_blocks) = set.call(0, || {
        let g = RaidArray::find("R").unwrap().geometry().unwrap();
        (g.array_blocks(), g.member_data_blocks(0))
    });
    let stats = start_jobs(&set, seed, array_blocks);
    wait_more_ios(&stats, 1000);

    let mut saw_process = false;
    let t0 = std::time::Instant::now();
    for i in 0..6usize {
        eprintln!("[{:?}] round {i} ios {}", t0.elapsed(), total_ios(&stats));
        let member = cycle[i % cycle.len()];
        remove(&set, member);
        let (state, degraded) = set.call(0, || {
            let a = RaidArray::find("R").unwrap();
            (a.state(), a.is_degraded())
        });
        assert_eq!((state, degraded), (RaidState::Online, true), "after removing {member}");
        wait_more_ios(&stats, 300);
        add(&set, member);
        let info = set.call(0, || RaidArray::find("R").unwrap().info_json());
        saw_process |= info.get("process").is_some_and(|p| p["type"] == "rebuild" && p["target"] == member);
        if i % 3 == 1 {
            // Take the member out again in the middle of its rebuild, then
            // put it back: the rebuild restarts from scratch.
            wait_more_ios(&stats, 100);
            remove(&set, member);
            wait_more_ios(&stats, 100);
            add(&set, member);
        }
        if i % 3 == 2 {
            // A suspend/resume by hand in the middle of the rebuild.
            let r: Result<(), bdev::BdevError> =
                set.call_async(1, 10, |done| RaidArray::find("R").unwrap().suspend(done));
            r.unwrap();
            set.call(1, || RaidArray::find("R").unwrap().resume());
        }
        set.wait_for(30, "rebuild to finish", || {
            let a = RaidArray::find("R").unwrap();
            !a.rebuild_running() && !a.is_degraded()
        });
        wait_more_ios(&stats, 300);
    }
    set.wait_for(30, "last rebuild to finish", || {
        let a = RaidArray::find("R").unwrap();
        !a.rebuild_running() && !a.is_degraded()
    });
    assert!(saw_process, "bdev_raid_get_bdevs showed no rebuild process");
    stop_jobs(&stats);
    assert_clean(&stats, seed);
    for &(a, b) in pairs {
        assert_eq!(
            first_difference(&mallocs[a], &mallocs[b], data_blocks),
            None,
            "members {a} and {b} differ after rebuilds (seed {seed})"
        );
    }

    // Delete in the middle of IO, with a suspend racing it.
    let stats = start_jobs(&set, seed.wrapping_add(1), array_blocks);
    wait_more_ios(&stats, 500);
    let (tx, rx) = std::sync::mpsc::channel();
    let tx2 = tx.clone();
    set.0.send(0, move || {
        rpc::bdev_raid_delete(rpc::RaidDeleteParams { name: "R".into(), clear_sb: None }, move |r| {
            let _ = tx.send(("delete", r.is_ok()));
        })
    });
    set.0.send(1, move || {
        let a = RaidArray::find("R");
        match a {
            Some(a) => {
                let a2 = a.clone();
                a.suspend(move |r| {
                    if r.is_ok() {
                        a2.resume();
                    }
                    let _ = tx2.send(("suspend", true));
                })
            }
            None => {
                let _ = tx2.send(("suspend", true));
            }
        }
    });
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(rx.recv_timeout(Duration::from_secs(20)).expect("delete and the racing suspend finish"));
    }
    assert!(got.contains(&("delete", true)), "{got:?}");
    stop_jobs(&stats);
    // Reads that completed before the delete returned the right data.
    assert!(stats.iter().all(|s| s.mismatches.load(Ordering::Relaxed) == 0), "mismatch during delete (seed {seed})");
    let leftovers = set.call(0, move || {
        let reg = Registry::get();
        let claimed: Vec<String> =
            (0..members).filter_map(|i| reg.lookup(&format!("M{i}")).and_then(|h| h.claimed_by())).collect();
        (RaidArray::find("R").is_none(), reg.lookup("R").is_none(), claimed)
    });
    assert_eq!(leftovers, (true, true, vec![]), "array gone, bdev gone, members released");
    // A suspend after the delete answers (with an error) instead of hanging.
    let late = set.call(0, || RaidArray::list().len());
    assert_eq!(late, 0);
}

#[test]
fn raid1_remove_readd_rebuild_delete_under_load() {
    run("raid1", 2, &["M1", "M0"], &[(0, 1)]);
}

#[test]
fn raid10_remove_readd_rebuild_delete_under_load() {
    run("raid10", 4, &["M1", "M2"], &[(0, 1), (2, 3)]);
}
