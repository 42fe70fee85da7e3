//! Degraded mode: a verify workload runs on two reactors while one member
//! starts failing every IO (the error-injection bdev). For raid1 and raid10
//! no error reaches the caller, every read returns the data last written,
//! and the array ends degraded with the member marked failed. For raid0 the
//! same injection fails IO (there is no copy to fall back on).
//!
//! Replay with `NVRAID_SEED=<seed>` (printed on failure).

mod common;

use bdev::error::{self, ErrorCreateParams, ErrorInjectParams};
use bdev_raid::{RaidArray, RaidState};
use common::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const MEMBER_BLOCKS: u64 = 4096;

fn inject_all_failures(name: &str) {
    error::inject(ErrorInjectParams {
        name: name.into(),
        io_type: "all".into(),
        error_type: "failure".into(),
        num: Some(1 << 40),
        queue_depth: None,
        corrupt_offset: None,
        corrupt_value: None,
        nvme_sct: None,
        nvme_sc: None,
    })
    .unwrap();
}

/// Members: `EE_M0` (error bdev over M0) then plain M1.., then the raid.
fn build(set: &Set, level: &'static str, members: usize) {
    set.call(0, move || {
        let mut names = Vec::new();
        for i in 0..members {
            malloc(&format!("M{i}"), MEMBER_BLOCKS);
            if i == 0 {
                error::create(ErrorCreateParams { base_name: "M0".into(), uuid: None }).unwrap();
                names.push("EE_M0".to_string());
            } else {
                names.push(format!("M{i}"));
            }
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let strip = (level != "raid1").then_some(4);
        create_raid("R", level, strip, &refs).unwrap();
    });
}

/// Starts a verify job per reactor on its half of the array.
fn start_jobs(set: &Set, seed: u64, array_blocks: u64) -> Vec<Arc<VerifyStats>> {
    let half = array_blocks / 2;
    (0..2usize)
        .map(|r| {
            let stats = Arc::new(VerifyStats::default());
            let s2 = stats.clone();
            set.0.send(r, move || {
                let ch = bdev::Registry::get().lookup("R").unwrap().channel().unwrap();
                let lanes = 16;
                let cfg = VerifyCfg {
                    writer: r as u64 + 1,
                    seed: seed ^ (r as u64 + 7),
                    first_block: r as u64 * half,
                    lanes,
                    lane_blocks: half / lanes,
                    max_blocks: 24,
                    max_ios: 0,
                };
                start_verify(ch, cfg, s2);
            });
            stats
        })
        .collect()
}

fn wait_ios(stats: &[Arc<VerifyStats>], at_least: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stats.iter().map(|s| s.ios.load(Ordering::Relaxed)).min().unwrap_or(0) < at_least {
        assert!(std::time::Instant::now() < deadline, "workload made no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
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

fn redundant(level: &'static str, members: usize) {
    let seed = seed();
    eprintln!("{level} failure storm: seed {seed} (replay with NVRAID_SEED={seed})");
    let set = start(2);
    build(&set, level, members);
    let array_blocks = set.call(0, || RaidArray::find("R").unwrap().geometry().unwrap().array_blocks());
    let stats = start_jobs(&set, seed, array_blocks);
    wait_ios(&stats, 2000);
    set.call(0, || inject_all_failures("EE_M0"));
    let before: u64 = stats.iter().map(|s| s.ios.load(Ordering::Relaxed)).sum();
    wait_ios(&stats, before / 2 + 4000);
    stop_jobs(&stats);
    for (r, s) in stats.iter().enumerate() {
        let (we, re, mm) = (
            s.write_errors.load(Ordering::Relaxed),
            s.read_errors.load(Ordering::Relaxed),
            s.mismatches.load(Ordering::Relaxed),
        );
        assert_eq!((we, re, mm), (0, 0, 0), "reactor {r}: (write errors, read errors, mismatches) (seed {seed})");
    }
    // The failure became official: degraded, the member out, still online.
    set.wait_for(10, "member marked failed", || !RaidArray::find("R").unwrap().members()[0].1);
    let (state, degraded, info) = set.call(0, || {
        let a = RaidArray::find("R").unwrap();
        (a.state(), a.is_degraded(), a.info_json())
    });
    assert_eq!(state, RaidState::Online);
    assert!(degraded);
    assert_eq!(info["num_base_bdevs_operational"], members as u64 - 1, "{info}");
    assert_eq!(info["base_bdevs_list"][0]["is_configured"], false, "{info}");
    assert_eq!(info["base_bdevs_list"][0]["name"], "EE_M0", "{info}");
    // Reads after the storm still verify everything (a fresh pass).
    let stats = start_jobs(&set, seed.wrapping_add(99), array_blocks);
    wait_ios(&stats, 1000);
    stop_jobs(&stats);
    assert!(stats
        .iter()
        .all(|s| s.read_errors.load(Ordering::Relaxed) == 0 && s.mismatches.load(Ordering::Relaxed) == 0));
}

#[test]
fn raid1_survives_a_failing_member() {
    redundant("raid1", 2);
}

#[test]
fn raid10_survives_a_failing_member() {
    redundant("raid10", 4);
}

#[test]
fn raid0_reports_member_errors() {
    let seed = seed();
    let set = start(2);
    build(&set, "raid0", 2);
    let array_blocks = set.call(0, || RaidArray::find("R").unwrap().geometry().unwrap().array_blocks());
    let stats = start_jobs(&set, seed, array_blocks);
    wait_ios(&stats, 500);
    set.call(0, || inject_all_failures("EE_M0"));
    let before: u64 = stats.iter().map(|s| s.ios.load(Ordering::Relaxed)).sum();
    wait_ios(&stats, before / 2 + 1000);
    stop_jobs(&stats);
    let errors: u64 =
        stats.iter().map(|s| s.write_errors.load(Ordering::Relaxed) + s.read_errors.load(Ordering::Relaxed)).sum();
    assert!(errors > 0, "raid0 must report errors of a member it cannot do without (seed {seed})");
    // No copy to lose: data the array acknowledged still reads back right
    // wherever it reads at all.
    assert!(stats.iter().all(|s| s.mismatches.load(Ordering::Relaxed) == 0));
}
