//! The bench suite's pieces that need no machine time: reading SPDK's tools'
//! output (recorded from SPDK v25.09's bdevperf and spdk_nvme_perf, kept as
//! fixtures), medians over rounds, finding (or not finding) SPDK's binaries,
//! the parity rows' configs (loaded by nvraid here) and SPDK raid5f's
//! refusal of partial-stripe writes, and that the suite holds no SPDK
//! figure of its own.

use perf::bench::{
    config_for, find_spdk, median, parity_cost_ratio, parse_bdevperf, parse_bdevperf_refusal, parse_nvme_perf,
    parse_report, Figures, Row, PARITY_ROWS, SPDK_TOOLS,
};
use std::path::PathBuf;

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn bdevperf_total_line_is_read_through_carriage_returns() {
    let out = fixture("bdevperf-v25.09-malloc-write.txt");
    assert!(out.contains('\r'), "the recording keeps bdevperf's progress carriage returns");
    let f = parse_bdevperf(&out).unwrap();
    assert_eq!(f.iops, 67634.24);
    assert_eq!(f.mib_per_sec, 8454.28);
    assert_eq!(f.avg_us, 236.02);
    assert_eq!(f.p99_us, None, "bdevperf prints no percentiles");
    // "Total cores available" in a log line is not the Total row.
    let e = parse_bdevperf("app.c: 964:spdk_app_start: *NOTICE*: Total cores available: 1\n").unwrap_err();
    assert!(e.contains("no Total line"), "{e}");
    let failing = " Total : 100.00 0.39 3.00 0.00 10.0 1.0 20.0\n";
    assert!(parse_bdevperf(failing).unwrap_err().contains("failed IOs"));
}

#[test]
fn spdk_nvme_perf_total_and_percentiles() {
    let f = parse_nvme_perf(&fixture("spdk_nvme_perf-v25.09-tcp-randread.txt")).unwrap();
    assert_eq!(f.iops, 280710.60);
    assert_eq!(f.mib_per_sec, 1096.53);
    assert_eq!(f.avg_us, 113.97);
    assert_eq!(f.p99_us, Some(251.247));
    assert_eq!(f.p99_9_us, Some(1701.781));
    assert!(parse_nvme_perf("connect() failed, errno = 111\n").unwrap_err().contains("connect() failed"));
}

#[test]
fn nvraid_report_total() {
    let v = serde_json::json!({"total": {"iops": 1000.0, "mib_per_sec": 3.9, "avg_us": 12.5,
        "p99_us": 40.0, "p99_9_us": 90.0, "iops_per_cpu_s": 1100.0}});
    let f = parse_report(&v).unwrap();
    assert_eq!((f.iops, f.p99_us, f.iops_per_cpu_s), (1000.0, Some(40.0), Some(1100.0)));
    assert!(parse_report(&serde_json::json!({"total": {}})).is_err());
}

#[test]
fn medians_per_figure_and_a_failed_round_fails_the_row() {
    let f = |iops: f64, p99: Option<f64>| Ok(Figures { iops, p99_us: p99, ..Figures::default() });
    let m = median(&[f(3.0, Some(30.0)), f(1.0, None), f(2.0, Some(10.0))]).unwrap();
    assert_eq!(m.iops, 2.0);
    assert_eq!(m.p99_us, Some(20.0), "median of the rounds that have it");
    assert_eq!(median(&[f(1.0, None), f(4.0, None)]).unwrap().iops, 2.5);
    assert_eq!(median(&[f(1.0, None), Err("boom".into())]).unwrap_err(), "boom");
    assert!(median(&[]).is_err());
}

#[test]
fn spdk_is_not_found_without_its_binaries_and_says_why() {
    let scratch = std::env::temp_dir().join(format!("nvraid-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let empty = scratch.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = find_spdk(Some(&empty), &scratch).err().expect("no binaries, no SPDK");
    assert!(e.contains("bdevperf") && e.contains("missing"), "{e}");
    // Files that exist but do not start are not SPDK either.
    for tool in SPDK_TOOLS {
        let p = empty.join(tool);
        std::fs::write(&p, "#!/bin/sh\necho 'error while loading shared libraries: libnuma.so.1' >&2\nexit 127\n")
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let e = find_spdk(Some(&empty), &scratch).err().expect("binaries that do not start");
    assert!(e.contains("does not start") && e.contains("apt-get install"), "{e}");
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The suite measures SPDK; it never carries SPDK's figures as numbers.
#[test]
fn the_suite_has_no_spdk_figures_of_its_own() {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/bench.rs")).unwrap();
    for banned in ["SPDK_IOPS", "spdk_iops", "13.1e6", "12.8e6", "1.84e6", "0.79e6"] {
        assert!(!src.contains(banned), "bench.rs contains {banned:?}");
    }
}

/// Recorded from SPDK v25.09's bdevperf: 4 KiB random writes on a raid5f of
/// 4 malloc members with 64 KiB strips fail in SPDK's bdev layer.
#[test]
fn bdevperf_raid5f_partial_stripe_refusal_is_recognised() {
    let out = fixture("bdevperf-v25.09-raid5f-randwrite-refused.txt");
    assert_eq!(
        parse_bdevperf_refusal(&out).as_deref(),
        Some("IO num_blocks 1 does not match the write_unit_size 48"),
        "48 blocks = 3 data strips of 64 KiB in 4 KiB blocks"
    );
    assert!(parse_bdevperf(&out).unwrap_err().contains("failed IOs"), "the refused run has no figures");
    assert_eq!(parse_bdevperf_refusal(&fixture("bdevperf-v25.09-malloc-write.txt")), None);
    assert_eq!(parse_bdevperf_refusal(""), None);
}

#[test]
fn the_parity_rows_configs_name_four_members_and_spdks_raid5f() {
    for (kind, level) in [("raid5", "raid5f"), ("raid0x4", "raid0")] {
        let cfg = config_for(kind, 4096, 256).unwrap();
        let calls = cfg["subsystems"][0]["config"].as_array().unwrap();
        assert_eq!(calls.len(), 5, "{kind}: 4 mallocs and the array");
        let mallocs: Vec<&str> = calls[..4]
            .iter()
            .map(|c| {
                assert_eq!(c["method"], "bdev_malloc_create");
                assert_eq!(c["params"]["num_blocks"], 65536, "256 MiB of 4 KiB blocks");
                c["params"]["name"].as_str().unwrap()
            })
            .collect();
        let raid = &calls[4];
        assert_eq!(raid["method"], "bdev_raid_create");
        assert_eq!(raid["params"]["raid_level"], level);
        assert_eq!(raid["params"]["strip_size_kb"], 64);
        assert_eq!(raid["params"]["name"], "Bench0");
        let members: Vec<&str> =
            raid["params"]["base_bdevs"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
        assert_eq!(members, mallocs, "{kind}: the array is made of the mallocs");
    }
    assert!(config_for("raid6", 4096, 256).is_none());
}

/// The configs the suite writes are ones nvraid loads: both arrays take
/// full-stripe and (raid5) partial-stripe writes with verified reads.
#[test]
fn the_parity_rows_configs_load_and_verify_in_nvraid() {
    for (kind, io) in [("raid5", 192u64 << 10), ("raid5", 4096), ("raid0x4", 256 << 10)] {
        let cfg = config_for(kind, 4096, 8).unwrap().to_string();
        let mut spec = perf::cli::RunSpec::local(&cfg, &["Bench0"], perf::Workload::Verify, 8, io);
        spec.duration = std::time::Duration::from_millis(200);
        spec.seed = 12;
        let hooks = perf::Hooks { setup: None, on_sample: None, quiet: true };
        let r = perf::run(&spec, hooks).unwrap_or_else(|e| panic!("{kind} {io}: {e:#}"));
        assert!(r.total.ios > 0, "{kind} {io}: no IO");
        assert_eq!(r.total.errors, 0, "{kind} {io}: {:?}", r.io_errors);
        assert_eq!(r.total.mismatch_count, 0, "{kind} {io}: {:?}", r.mismatches);
    }
}

#[test]
fn parity_cost_is_raid5_over_the_data_share_of_raid0() {
    assert_eq!(parity_cost_ratio(3000.0, 4000.0, 4), Some(1.0));
    assert_eq!(parity_cost_ratio(2700.0, 4800.0, 4), Some(0.75));
    assert_eq!(parity_cost_ratio(2000.0, 3000.0, 3), Some(1.0));
    assert_eq!(parity_cost_ratio(1.0, 0.0, 4), None);
    assert_eq!(parity_cost_ratio(1.0, 1.0, 2), None, "raid5 needs 3 members");
    assert_eq!(parity_cost_ratio(f64::NAN, 1.0, 4), None);
}

/// Each raid5 full-stripe write row has a raid0x4 row at the same queue
/// depth (the ratio's pair), and only raid5's partial-stripe writes are
/// expected to be refused by SPDK.
#[test]
fn parity_rows_pair_up_and_only_partial_stripe_writes_expect_refusal() {
    let full_stripe = 3 * (64 << 10);
    let r5_writes: Vec<_> = PARITY_ROWS.iter().filter(|r| r.0 == "raid5" && r.1 == "write").collect();
    assert!(!r5_writes.is_empty());
    for r in &r5_writes {
        assert_eq!(r.3, full_stripe);
        assert!(PARITY_ROWS.iter().any(|p| p.0 == "raid0x4" && p.1 == "write" && p.2 == r.2 && p.3 == 4 * (64 << 10)));
    }
    let refused: Vec<_> = PARITY_ROWS
        .iter()
        .filter(|&&(b, w, qd, io)| Row::new(b.into(), w, qd, io).spdk_refusal_expected())
        .map(|&(b, w, ..)| (b, w))
        .collect();
    assert_eq!(refused, [("raid5", "randwrite")]);
    assert!(!Row::new("raid0".into(), "randwrite", 128, 4096).spdk_refusal_expected());
}
