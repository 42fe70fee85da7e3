//! Results: per-job and total IOPS, throughput and latency percentiles from
//! the merged HDR histograms; the table, the JSON report and the SVG plot.

use crate::cli::RunSpec;
use crate::job::{new_histogram, JobResult, Mismatch};
use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;

/// The percentiles every report carries.
pub const PERCENTILES: [(f64, &str); 5] =
    [(50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p99_9"), (99.99, "p99_99")];

/// Latency figures in microseconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub avg_us: f64,
    pub min_us: f64,
    pub max_us: f64,
    /// In the order of [`PERCENTILES`].
    pub percentiles_us: [f64; 5],
}

impl LatencySummary {
    /// Summarizes a histogram of values in ticks at `ticks_per_s`.
    pub fn from_histogram(h: &Histogram<u64>, ticks_per_s: u64) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let us = |ticks: f64| ticks * 1e6 / ticks_per_s.max(1) as f64;
        let mut percentiles_us = [0.0; 5];
        for (out, (p, _)) in percentiles_us.iter_mut().zip(PERCENTILES) {
            *out = us(h.value_at_percentile(p) as f64);
        }
        LatencySummary {
            count: h.len(),
            avg_us: us(h.mean()),
            min_us: us(h.min() as f64),
            max_us: us(h.max() as f64),
            percentiles_us,
        }
    }

    fn to_json(&self, obj: &mut serde_json::Map<String, Value>) {
        obj.insert("avg_us".into(), json!(round3(self.avg_us)));
        obj.insert("min_us".into(), json!(round3(self.min_us)));
        obj.insert("max_us".into(), json!(round3(self.max_us)));
        for (v, (_, name)) in self.percentiles_us.iter().zip(PERCENTILES) {
            obj.insert(format!("{name}_us"), json!(round3(*v)));
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct RowReport {
    /// `bdev@core` for a job, `Total` for the sum.
    pub name: String,
    pub ios: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    pub iops: f64,
    pub mib_per_sec: f64,
    pub latency: LatencySummary,
    pub mismatch_count: u64,
    /// CPU seconds the job's reactor thread got (shared by the jobs on it).
    pub cpu_s: Option<f64>,
    /// IOPS the job would reach with its reactor on a core of its own (IOs
    /// per CPU second of the reactor thread; for the total, summed over the
    /// reactors). On a shared machine this is the figure to compare.
    pub iops_per_cpu_s: Option<f64>,
}

impl RowReport {
    fn to_json(&self) -> Value {
        let mut o = serde_json::Map::new();
        o.insert("name".into(), json!(self.name));
        o.insert("ios".into(), json!(self.ios));
        o.insert("errors".into(), json!(self.errors));
        o.insert("elapsed_s".into(), json!(round3(self.elapsed_s)));
        o.insert("iops".into(), json!(self.iops.round()));
        o.insert("mib_per_sec".into(), json!(round3(self.mib_per_sec)));
        self.latency.to_json(&mut o);
        o.insert("mismatches".into(), json!(self.mismatch_count));
        o.insert("cpu_s".into(), json!(self.cpu_s.map(round3)));
        o.insert("iops_per_cpu_s".into(), json!(self.iops_per_cpu_s.map(f64::round)));
        Value::Object(o)
    }
}

/// Everything a run produced.
#[derive(Clone, Debug)]
pub struct Report {
    pub jobs: Vec<RowReport>,
    pub total: RowReport,
    /// Merged latencies of all jobs, in ticks.
    pub latency_ticks: Histogram<u64>,
    pub ticks_per_s: u64,
    /// Every verify mismatch, with its job's name.
    pub mismatches: Vec<(String, Mismatch)>,
    /// First IO error per job that had any.
    pub io_errors: Vec<(String, String)>,
    pub seed: u64,
}

impl Report {
    pub fn from_results(mut results: Vec<JobResult>, ticks_per_s: u64, seed: u64) -> Report {
        results.sort_by_key(|r| r.config.job_index);
        let mut merged = new_histogram();
        let (mut jobs, mut mismatches, mut io_errors) = (Vec::new(), Vec::new(), Vec::new());
        let (mut ios, mut errors, mut iops, mut mibs, mut elapsed_max, mut mm) = (0, 0, 0.0, 0.0, 0.0f64, 0);
        for r in &results {
            let name = format!("{}@core{}", r.config.bdev, r.config.core);
            let elapsed_s = r.elapsed_ticks as f64 / ticks_per_s.max(1) as f64;
            let per_s = |x: f64| if elapsed_s > 0.0 { x / elapsed_s } else { 0.0 };
            let row = RowReport {
                name: name.clone(),
                ios: r.ios,
                errors: r.errors,
                elapsed_s,
                iops: per_s(r.ios as f64),
                mib_per_sec: per_s(r.bytes as f64 / (1u64 << 20) as f64),
                latency: LatencySummary::from_histogram(&r.latency_ticks, ticks_per_s),
                mismatch_count: r.mismatch_count,
                cpu_s: r.cpu_s,
                iops_per_cpu_s: r.cpu_s.filter(|c| *c > 0.0).map(|c| r.ios as f64 / c),
            };
            // Same bounds on both sides: adding cannot fail.
            let _ = merged.add(&r.latency_ticks);
            ios += row.ios;
            errors += row.errors;
            iops += row.iops;
            mibs += row.mib_per_sec;
            mm += row.mismatch_count;
            elapsed_max = elapsed_max.max(elapsed_s);
            mismatches.extend(r.mismatches.iter().map(|m| (name.clone(), m.clone())));
            if let Some(e) = r.first_error {
                io_errors.push((name.clone(), format!("{e:?}")));
            }
            jobs.push(row);
        }
        // Jobs on one reactor share its thread's CPU time: count it once.
        let mut cpu_by_reactor: Vec<(usize, f64)> = Vec::new();
        for r in &results {
            if let Some(c) = r.cpu_s {
                match cpu_by_reactor.iter_mut().find(|(id, _)| *id == r.config.reactor) {
                    Some((_, v)) => *v = v.max(c),
                    None => cpu_by_reactor.push((r.config.reactor, c)),
                }
            }
        }
        let cpu_s = (results.iter().all(|r| r.cpu_s.is_some()) && !results.is_empty())
            .then(|| cpu_by_reactor.iter().map(|(_, c)| c).sum::<f64>());
        let total = RowReport {
            name: "Total".into(),
            ios,
            errors,
            elapsed_s: elapsed_max,
            iops,
            mib_per_sec: mibs,
            latency: LatencySummary::from_histogram(&merged, ticks_per_s),
            mismatch_count: mm,
            cpu_s,
            // Summed per-reactor rates, taking each reactor's share of the IOs
            // as equal to its share of CPU (the jobs of a run are alike).
            iops_per_cpu_s: cpu_s.filter(|c| *c > 0.0).map(|c| ios as f64 / c * cpu_by_reactor.len() as f64),
        };
        Report { jobs, total, latency_ticks: merged, ticks_per_s, mismatches, io_errors, seed }
    }

    /// The final table (bdevperf's columns plus the percentiles).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<24} {:>12} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "Job", "IOPS", "MiB/s", "avg(us)", "min(us)", "max(us)", "p50", "p90", "p99", "p99.9", "p99.99", "errors"
        );
        for r in self.jobs.iter().chain(std::iter::once(&self.total)) {
            let l = &r.latency;
            let p = &l.percentiles_us;
            let _ = writeln!(
                s,
                "{:<24} {:>12.0} {:>10.2} {:>9.2} {:>9.2} {:>10.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8}",
                r.name, r.iops, r.mib_per_sec, l.avg_us, l.min_us, l.max_us, p[0], p[1], p[2], p[3], p[4], r.errors
            );
        }
        s
    }

    pub fn to_json(&self, spec: &RunSpec) -> Value {
        let bdevs = match &spec.target {
            crate::cli::Target::Local { bdevs, .. } => json!(bdevs),
            crate::cli::Target::Tcp(t) => json!([format!("{} {}:{} {}", t.trtype, t.traddr, t.trsvcid, t.subnqn)]),
        };
        json!({
            "config": {
                "workload": spec.workload.name(),
                "queue_depth": spec.queue_depth,
                "io_size_bytes": spec.io_size_bytes,
                "read_pct": spec.read_pct,
                "time_s": spec.duration.as_secs_f64(),
                "cores": spec.cores,
                "bdevs": bdevs,
                "seed": self.seed,
                "stamp": spec.stamp,
            },
            "jobs": self.jobs.iter().map(RowReport::to_json).collect::<Vec<_>>(),
            "total": self.total.to_json(),
            "mismatches": self.mismatches.iter().map(|(job, m)| json!({
                "job": job, "lba": m.lba, "first_bad_byte": m.first_bad_byte,
                "expected_seq": m.expected.seq, "detail": m.to_string(),
            })).collect::<Vec<_>>(),
            "io_errors": self.io_errors.iter().map(|(job, e)| json!({"job": job, "first_error": e})).collect::<Vec<_>>(),
        })
    }

    pub fn write_json(&self, spec: &RunSpec, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.to_json(spec)).context("encoding the report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// Draws latency against percentile (HdrHistogram's classic plot: the
    /// x axis stretches the tail, 90% / 99% / 99.9% equally spaced).
    pub fn write_svg(&self, title: &str, path: &Path) -> Result<()> {
        crate::svg::latency_plot(&self.latency_ticks, self.ticks_per_s, title, path)
    }
}
