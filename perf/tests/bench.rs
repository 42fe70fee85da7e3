//! The bench suite's pieces that need no machine time: reading SPDK's tools'
//! output (recorded from SPDK v25.09's bdevperf and spdk_nvme_perf, kept as
//! fixtures), medians over rounds, finding (or not finding) SPDK's binaries,
//! and that the suite holds no SPDK figure of its own.

use perf::bench::{find_spdk, median, parse_bdevperf, parse_nvme_perf, parse_report, Figures, SPDK_TOOLS};
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
