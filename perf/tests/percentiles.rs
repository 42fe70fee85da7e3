//! Latency figures against known distributions: single histograms and
//! per-core histograms merged into the total.

use perf::job::{new_histogram, JobConfig, JobResult};
use perf::report::{LatencySummary, Report};
use perf::Workload;

fn close(got: f64, want: f64) {
    // HDR with 3 significant digits: within 0.1 % (plus one unit of rounding).
    assert!((got - want).abs() <= want * 0.001 + 1.0, "got {got}, want {want}");
}

#[test]
fn uniform_distribution() {
    let mut h = new_histogram();
    for v in 1..=100_000u64 {
        h.record(v).unwrap();
    }
    // One tick per microsecond: values read back as microseconds.
    let s = LatencySummary::from_histogram(&h, 1_000_000);
    assert_eq!(s.count, 100_000);
    close(s.min_us, 1.0);
    close(s.max_us, 100_000.0);
    close(s.avg_us, 50_000.5);
    for (got, want) in s.percentiles_us.iter().zip([50_000.0, 90_000.0, 99_000.0, 99_900.0, 99_990.0]) {
        close(*got, want);
    }
}

#[test]
fn skewed_distribution_and_tick_conversion() {
    // 9,980 IOs at 10 us, 15 at 1 ms, 5 at 50 ms, at 3 GHz: the ranks of
    // p99.9 (9,990) and p99.99 (9,999) fall well inside the slow groups.
    let ghz3 = 3_000_000_000u64;
    let mut h = new_histogram();
    h.record_n(10 * 3000, 9_980).unwrap();
    h.record_n(1000 * 3000, 15).unwrap();
    h.record_n(50_000 * 3000, 5).unwrap();
    let s = LatencySummary::from_histogram(&h, ghz3);
    close(s.percentiles_us[0], 10.0);
    close(s.percentiles_us[1], 10.0);
    close(s.percentiles_us[2], 10.0);
    close(s.percentiles_us[3], 1000.0);
    close(s.percentiles_us[4], 50_000.0);
    close(s.max_us, 50_000.0);
    close(s.avg_us, (9_980.0 * 10.0 + 15.0 * 1000.0 + 5.0 * 50_000.0) / 10_000.0);
    assert_eq!(LatencySummary::from_histogram(&new_histogram(), ghz3), LatencySummary::default());
}

fn job(index: u32, values: impl Iterator<Item = u64>, ticks_per_s: u64) -> JobResult {
    let mut h = new_histogram();
    let mut n = 0;
    for v in values {
        h.record(v).unwrap();
        n += 1;
    }
    JobResult {
        config: JobConfig {
            job_index: index,
            bdev: format!("B{index}"),
            reactor: index as usize,
            core: index as usize,
            workload: Workload::RandRead,
            read_pct: 100,
            queue_depth: 1,
            io_blocks: 8,
            block_size: 512,
            range_start_blocks: 0,
            range_blocks: 1 << 20,
            seed: 0,
            stamp: true,
        },
        ios: n,
        bytes: n * 4096,
        errors: 0,
        first_error: None,
        elapsed_ticks: ticks_per_s, // one second
        cpu_s: Some(0.5),
        latency_ticks: h,
        mismatch_count: 0,
        mismatches: Vec::new(),
    }
}

#[test]
fn per_core_histograms_merge_into_the_total() {
    let tps = 1_000_000;
    // Core 0 saw the fast half, core 1 the slow half: only the merge gets
    // the percentiles of the whole right.
    let r = Report::from_results(vec![job(1, 50_001..=100_000, tps), job(0, 1..=50_000, tps)], tps, 9);
    assert_eq!(r.jobs[0].name, "B0@core0");
    close(r.jobs[0].latency.percentiles_us[0], 25_000.0);
    close(r.jobs[1].latency.percentiles_us[0], 75_000.0);
    close(r.total.latency.percentiles_us[0], 50_000.0);
    close(r.total.latency.percentiles_us[2], 99_000.0);
    close(r.total.latency.min_us, 1.0);
    close(r.total.latency.max_us, 100_000.0);
    assert_eq!(r.total.ios, 100_000);
    close(r.total.iops, 100_000.0);
    close(r.total.mib_per_sec, 100_000.0 * 4096.0 / 1048576.0);
    // Each reactor did 50,000 IOs in half a CPU second: with a core of its
    // own each would do 100,000 IOPS, the two together 200,000.
    close(r.total.iops_per_cpu_s.unwrap(), 200_000.0);
    close(r.jobs[0].iops_per_cpu_s.unwrap(), 100_000.0);
}
