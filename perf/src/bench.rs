//! The benchmark suite (`nvraid-perf bench`, driven by `scripts/bench.sh`):
//! the standard matrix on one core, each run a fresh process, one table at
//! the end, and the machine's single-thread memcpy bandwidth as the ceiling
//! for 128 KiB writes.
//!
//! SPDK's figures are measured in the same run, never stored. When SPDK's
//! reference binaries are found (`--spdk-bin DIR`, else `$NVRAID_SPDK_BIN`: a
//! folder with `bdevperf`, `nvmf_tgt` and `spdk_nvme_perf`), every local row
//! also runs SPDK's bdevperf on the same config and core, and the NVMe/TCP
//! rows run nvraid-tgt and SPDK's nvmf_tgt on the same config with SPDK's
//! spdk_nvme_perf as the initiator for both. Rounds alternate which side
//! goes first (local rows: per row; NVMe/TCP: per target start); the table
//! shows each side's median and the ratio nvraid / SPDK. Without the
//! binaries the table holds nvraid's figures alone and says why. No figure
//! is normalised by CPU time: a ratio compares the same measure on both
//! sides.

use crate::cli::BenchArgs;
use anyhow::{bail, Context, Result};
use mgmt::reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use mgmt::{Ctx, MethodTable};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the folder of SPDK's binaries.
pub const SPDK_BIN_ENV: &str = "NVRAID_SPDK_BIN";

/// SPDK's binaries the suite runs.
pub const SPDK_TOOLS: [&str; 3] = ["bdevperf", "nvmf_tgt", "spdk_nvme_perf"];

/// The matrix's workloads: (workload, queue depth, IO size).
pub const WORKLOADS: &[(&str, u32, u64)] =
    &[("randread", 128, 4096), ("randwrite", 128, 4096), ("write", 16, 128 << 10)];

/// The matrix's bdevs.
pub const BDEVS: &[&str] = &["null", "malloc", "raid0", "raid1"];

/// Members of the parity rows' arrays (issue 12: a raid5 of 4 malloc
/// members with 64 KiB strips, and a raid0 of the same 4 for the ratio).
pub const PARITY_MEMBERS: u32 = 4;

/// Strip size of the parity rows' arrays, KiB.
pub const PARITY_STRIP_KB: u64 = 64;

/// The parity rows: (bdev, workload, queue depth, IO size). raid5's full
/// stripe is 3 × 64 KiB of user data, raid0x4's 4 × 64 KiB; the raid5 and
/// raid0x4 `write` rows at the same queue depth give the parity-cost ratio.
/// The 4 KiB random writes are partial-stripe writes, which SPDK's raid5f
/// refuses.
pub const PARITY_ROWS: &[(&str, &str, u32, u64)] = &[
    ("raid5", "write", 8, 192 << 10),
    ("raid5", "write", 16, 192 << 10),
    ("raid5", "randwrite", 128, 4096),
    ("raid5", "randread", 128, 4096),
    ("raid0x4", "write", 8, 256 << 10),
    ("raid0x4", "write", 16, 256 << 10),
];

/// Every row name `--only` takes: the local bdevs, then the NVMe/TCP kinds.
pub fn row_names() -> Vec<String> {
    let mut v: Vec<String> = BDEVS.iter().map(|b| b.to_string()).collect();
    for &(b, ..) in PARITY_ROWS {
        if !v.iter().any(|x| x == b) {
            v.push(b.to_string());
        }
    }
    v.extend(TCP_KINDS.iter().map(|k| format!("tcp:{k}")));
    v
}

/// True when `--only` (empty: everything) selects the rows of `bdev`.
fn selected(only: &[String], bdev: &str) -> bool {
    only.is_empty() || only.iter().any(|o| o == bdev)
}

/// The NVMe/TCP cases: (workload, queue depth, IO size), on each exported kind.
pub const TCP_CASES: &[(&str, u32, u64)] =
    &[("randread", 32, 4096), ("randread", 128, 4096), ("randwrite", 32, 4096), ("read", 16, 128 << 10)];

/// The bdev kinds the NVMe/TCP target exports.
pub const TCP_KINDS: &[&str] = &["malloc", "raid1"];

/// DPDK memory for SPDK beyond its malloc bdevs, MiB.
const SPDK_BASE_MEM_MIB: u64 = 1024;

/// One run's figures, whoever measured them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    pub iops: f64,
    pub mib_per_sec: f64,
    pub avg_us: f64,
    pub p99_us: Option<f64>,
    pub p99_9_us: Option<f64>,
    /// nvraid-perf only: IOs per CPU second of its reactors (the memcpy line).
    pub iops_per_cpu_s: Option<f64>,
}

/// What one run gave: figures, or why there are none.
pub type Outcome = std::result::Result<Figures, String>;

/// One row of the table: every round of each side.
#[derive(Clone, Debug)]
pub struct Row {
    pub bdev: String,
    pub workload: &'static str,
    pub queue_depth: u32,
    pub io_size: u64,
    pub nvraid: Vec<Outcome>,
    /// Empty when SPDK is not measured.
    pub spdk: Vec<Outcome>,
}

impl Row {
    pub fn new(bdev: String, workload: &'static str, queue_depth: u32, io_size: u64) -> Row {
        Row { bdev, workload, queue_depth, io_size, nvraid: Vec::new(), spdk: Vec::new() }
    }

    /// SPDK's raid5f takes only whole-stripe writes: a row of smaller
    /// writes is expected to be refused there (and is run to show it).
    pub fn spdk_refusal_expected(&self) -> bool {
        let full_stripe = u64::from(PARITY_MEMBERS - 1) * (PARITY_STRIP_KB << 10);
        self.bdev == "raid5" && self.workload.contains("write") && !self.io_size.is_multiple_of(full_stripe)
    }

    fn spec(&self) -> RunSpec {
        RunSpec { workload: self.workload, qd: self.queue_depth, io: self.io_size }
    }
}

/// The median of each figure over the rounds; the first error if a round
/// failed (a row is only as good as its worst round).
pub fn median(runs: &[Outcome]) -> Outcome {
    let mut ok = Vec::new();
    for r in runs {
        match r {
            Ok(f) => ok.push(f),
            Err(e) => return Err(e.clone()),
        }
    }
    if ok.is_empty() {
        return Err("not run".into());
    }
    fn med(mut v: Vec<f64>) -> Option<f64> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
    }
    let all = |f: fn(&Figures) -> f64| med(ok.iter().map(|x| f(x)).collect()).unwrap_or(f64::NAN);
    let some = |f: fn(&Figures) -> Option<f64>| med(ok.iter().filter_map(|x| f(x)).collect());
    Ok(Figures {
        iops: all(|f| f.iops),
        mib_per_sec: all(|f| f.mib_per_sec),
        avg_us: all(|f| f.avg_us),
        p99_us: some(|f| f.p99_us),
        p99_9_us: some(|f| f.p99_9_us),
        iops_per_cpu_s: some(|f| f.iops_per_cpu_s),
    })
}

/// True when this build's method table can create RAID bdevs.
pub fn raid_available() -> bool {
    let m = ReactorSet::manual(1);
    let table = MethodTable::new(Ctx { reactors: m.handle().clone(), shutdown: Box::new(|_| {}) });
    table.has("bdev_raid_create")
}

/// The config that creates `kind` (named `Bench0`), or None if it cannot exist here.
/// Both nvraid-perf and SPDK's bdevperf load it.
pub fn config_for(kind: &str, block_size: u32, malloc_mib: u64) -> Option<Value> {
    let blocks = (malloc_mib << 20) / u64::from(block_size);
    let malloc = |name: &str| json!({"method": "bdev_malloc_create", "params": {"name": name, "num_blocks": blocks, "block_size": block_size}});
    let calls = match kind {
        "null" => vec![json!({"method": "bdev_null_create",
            "params": {"name": "Bench0", "num_blocks": blocks, "block_size": block_size}})],
        "malloc" => vec![malloc("Bench0")],
        "raid0" | "raid1" => {
            let mut params = json!({"name": "Bench0", "raid_level": kind, "base_bdevs": ["BenchM0", "BenchM1"]});
            if kind == "raid0" {
                params["strip_size_kb"] = json!(64);
            }
            vec![malloc("BenchM0"), malloc("BenchM1"), json!({"method": "bdev_raid_create", "params": params})]
        }
        // SPDK's level name and parameters, so one file configures both
        // sides (nvraid takes raid5f as its raid5, accepting any write size).
        "raid5" | "raid0x4" => {
            let members: Vec<String> = (0..PARITY_MEMBERS).map(|i| format!("BenchM{i}")).collect();
            let level = if kind == "raid5" { "raid5f" } else { "raid0" };
            let mut calls: Vec<Value> = members.iter().map(|m| malloc(m)).collect();
            calls.push(json!({"method": "bdev_raid_create", "params": {"name": "Bench0", "raid_level": level,
                "strip_size_kb": PARITY_STRIP_KB, "base_bdevs": members}}));
            calls
        }
        _ => return None,
    };
    Some(json!({"subsystems": [{"subsystem": "bdev", "config": calls}]}))
}

/// MiB of malloc bdevs `kind`'s config creates.
fn malloc_mib_of(kind: &str, malloc_mib: u64) -> u64 {
    match kind {
        "malloc" => malloc_mib,
        "raid0" | "raid1" => 2 * malloc_mib,
        "raid5" | "raid0x4" => u64::from(PARITY_MEMBERS) * malloc_mib,
        _ => 0,
    }
}

/// Single-thread memcpy bandwidth, measured the way a malloc 128 KiB write
/// copies: 128 KiB chunks from a small hot set of buffers into a large
/// region, sequentially, on a reactor pinned to `core`. Returns MiB per
/// wall second and MiB per CPU second of the copying thread (the second is
/// what the core does when the machine is shared).
pub fn memcpy_mib_per_sec(core: usize, duration: Duration) -> Result<(f64, Option<f64>)> {
    let mut cfg = ReactorConfig::new(vec![core], IdlePolicy::sleep());
    cfg.pin = true;
    let set = ReactorSet::start(cfg, || {}).context("starting a reactor for the memcpy measurement")?;
    let r = set.call(0, move || {
        const CHUNK: usize = 128 << 10;
        let src: Vec<Vec<u8>> = (0..16).map(|i| vec![i as u8 ^ 0xa5; CHUNK]).collect();
        let mut dst = vec![0u8; 256 << 20];
        dst.fill(1); // fault the pages in before timing
        let cpu0 = crate::job::thread_cpu_s();
        let (t0, mut bytes, mut i) = (Instant::now(), 0u64, 0usize);
        while t0.elapsed() < duration {
            for chunk in dst.chunks_exact_mut(CHUNK) {
                chunk.copy_from_slice(&src[i % src.len()]);
                i += 1;
            }
            bytes += dst.len() as u64;
            std::hint::black_box(&dst);
        }
        let mib = bytes as f64 / (1u64 << 20) as f64;
        let cpu_s = cpu0.zip(crate::job::thread_cpu_s()).map(|(a, b)| b - a).filter(|c| *c > 0.0);
        (mib / t0.elapsed().as_secs_f64(), cpu_s.map(|c| mib / c))
    });
    set.stop();
    set.join();
    Ok(r)
}

// ---------------------------------------------------------------------------
// Output parsers (pure, so tests feed them recorded output).

/// The numbers after the colon of the first line whose text starts with
/// `label` (SPDK's tables print `label   :   n  n  n ...`). Progress lines
/// end in carriage returns, so those split lines too.
fn table_line(out: &str, label: &str) -> Option<Vec<f64>> {
    out.split(['\n', '\r']).find_map(|line| {
        let t = line.trim_start();
        let rest = t.strip_prefix(label)?;
        let (head, nums) = rest.split_once(':')?;
        if !head.trim().is_empty() {
            return None;
        }
        nums.split_whitespace().map(|w| w.parse::<f64>().ok()).collect()
    })
}

/// A latency percentile of spdk_nvme_perf's `-L` summary (` 99.00000% :  251.247us`).
fn percentile_line(out: &str, pct: &str) -> Option<f64> {
    out.lines().find_map(|line| {
        let (p, v) = line.trim().split_once(':')?;
        (p.trim() == pct).then(|| v.trim().trim_end_matches("us").trim().parse().ok())?
    })
}

/// SPDK bdevperf's `Total : IOPS MiB/s Fail/s TO/s Average min max` line.
pub fn parse_bdevperf(out: &str) -> Outcome {
    let f = table_line(out, "Total").ok_or_else(|| format!("bdevperf printed no Total line: {}", last_line(out)))?;
    if f.len() < 5 {
        return Err(format!("bdevperf Total line has {} fields", f.len()));
    }
    if f[2] > 0.0 {
        return Err(format!("bdevperf: {} failed IOs per second", f[2]));
    }
    Ok(Figures { iops: f[0], mib_per_sec: f[1], avg_us: f[4], ..Figures::default() })
}

/// SPDK's bdev layer refusing a write that is not its bdev's write unit
/// (raid5f's is a whole stripe: `IO num_blocks 1 does not match the
/// write_unit_size 48`): the first such error, if bdevperf printed one.
pub fn parse_bdevperf_refusal(out: &str) -> Option<String> {
    const REFUSAL: &str = "does not match the write_unit_size";
    out.split(['\n', '\r']).find_map(|line| {
        let at = line.find(REFUSAL)?;
        let from = line[..at].find("IO num_blocks").unwrap_or(at);
        Some(line[from..].trim().to_string())
    })
}

/// raid5's full-stripe user-data bandwidth over the user-data share of a
/// raid0 of the same `members` ((members - 1) / members of its bandwidth):
/// 1.0 when parity costs nothing beyond the space it takes.
pub fn parity_cost_ratio(raid5_mib_per_sec: f64, raid0_mib_per_sec: f64, members: u32) -> Option<f64> {
    let share = f64::from(members.checked_sub(1)?) / f64::from(members);
    let ok = members >= 3 && raid0_mib_per_sec > 0.0 && raid5_mib_per_sec.is_finite() && raid0_mib_per_sec.is_finite();
    ok.then(|| raid5_mib_per_sec / (share * raid0_mib_per_sec))
}

/// spdk_nvme_perf's `Total : IOPS MiB/s Average min max` line and, with
/// `-L`, its 99th and 99.9th percentiles.
pub fn parse_nvme_perf(out: &str) -> Outcome {
    let f =
        table_line(out, "Total").ok_or_else(|| format!("spdk_nvme_perf printed no Total line: {}", last_line(out)))?;
    if f.len() < 3 {
        return Err(format!("spdk_nvme_perf Total line has {} fields", f.len()));
    }
    Ok(Figures {
        iops: f[0],
        mib_per_sec: f[1],
        avg_us: f[2],
        p99_us: percentile_line(out, "99.00000%"),
        p99_9_us: percentile_line(out, "99.90000%"),
        iops_per_cpu_s: None,
    })
}

/// nvraid-perf's `--report-json` total.
pub fn parse_report(v: &Value) -> Outcome {
    let t = &v["total"];
    let num = |k: &str| t[k].as_f64().ok_or_else(|| format!("report has no total.{k}"));
    Ok(Figures {
        iops: num("iops")?,
        mib_per_sec: num("mib_per_sec")?,
        avg_us: num("avg_us")?,
        p99_us: t["p99_us"].as_f64(),
        p99_9_us: t["p99_9_us"].as_f64(),
        iops_per_cpu_s: t["iops_per_cpu_s"].as_f64(),
    })
}

fn last_line(out: &str) -> &str {
    out.split(['\n', '\r']).rev().find(|l| !l.trim().is_empty()).unwrap_or("no output").trim()
}

// ---------------------------------------------------------------------------
// Processes.

/// Runs `cmd` to completion with its output in files under `dir` (no pipe
/// to fill), killing it after `limit`. Returns stdout and stderr together.
fn run_captured(mut cmd: Command, dir: &Path, tag: &str, limit: Duration) -> std::result::Result<String, String> {
    let out_path = dir.join(format!("{tag}.out"));
    let file = std::fs::File::create(&out_path).map_err(|e| format!("creating {}: {e}", out_path.display()))?;
    let err = file.try_clone().map_err(|e| format!("{e}"))?;
    let name = cmd.get_program().to_string_lossy().into_owned();
    let mut child =
        cmd.stdin(Stdio::null()).stdout(file).stderr(err).spawn().map_err(|e| format!("running {name}: {e}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{name} did not finish within {} s", limit.as_secs()));
            }
            Err(e) => return Err(format!("waiting for {name}: {e}")),
        }
    };
    let text = String::from_utf8_lossy(&std::fs::read(&out_path).unwrap_or_default()).into_owned();
    if !status.success() {
        return Err(format!("{name} failed ({status}): {}", last_line(&text)));
    }
    Ok(text)
}

/// SPDK's reference binaries, found and shown to start.
pub struct Spdk {
    pub dir: PathBuf,
    /// Free hugepages cover its memory: no `--no-huge`.
    hugepages_mib: u64,
}

impl Spdk {
    fn bin(&self, tool: &str) -> PathBuf {
        self.dir.join(tool)
    }

    /// Memory arguments for a tool that holds `malloc_mib` of malloc bdevs:
    /// hugepages when enough are free, else ordinary memory.
    fn mem_args(&self, malloc_mib: u64) -> Vec<String> {
        let need = SPDK_BASE_MEM_MIB + malloc_mib;
        if self.hugepages_mib >= need {
            Vec::new()
        } else {
            vec!["--no-huge".into(), "-s".into(), need.to_string()]
        }
    }

    fn memory_mode(&self) -> &'static str {
        if self.hugepages_mib > 0 {
            "hugepages where enough are free, else --no-huge"
        } else {
            "--no-huge (no hugepages reserved)"
        }
    }

    /// Why memory-bound rows may not compare like with like, if they may not.
    fn memory_note(&self) -> Option<&'static str> {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        // THP "always" backs SPDK's memory too; "never" backs neither.
        (self.hugepages_mib == 0 && thp.contains("[madvise]")).then_some(
            "note: without reserved hugepages SPDK runs on 4 KiB pages (--no-huge) while nvraid's memory \
             falls back to transparent huge pages populated up front, so rows bound by memory (malloc, raid \
             over malloc) are not like for like; reserve hugepages (scripts/setup.sh config) for figures you report",
        )
    }
}

/// Free hugepage memory in MiB (`/proc/meminfo`).
fn free_hugepages_mib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |k: &str| {
        info.lines().find_map(|l| l.strip_prefix(k)?.split_whitespace().next()?.parse::<u64>().ok()).unwrap_or(0)
    };
    field("HugePages_Free:") * field("Hugepagesize:") / 1024
}

/// Finds SPDK's binaries in `dir` (or `$NVRAID_SPDK_BIN`) and checks that
/// they start (their shared libraries are installed). Err says why not.
pub fn find_spdk(dir: Option<&Path>, scratch: &Path) -> std::result::Result<Spdk, String> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => match std::env::var_os(SPDK_BIN_ENV) {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => return Err(format!("no folder given (--spdk-bin DIR or {SPDK_BIN_ENV})")),
        },
    };
    for tool in SPDK_TOOLS {
        let p = dir.join(tool);
        let executable = std::fs::metadata(&p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if !executable {
            return Err(format!("{} is missing or not executable", p.display()));
        }
    }
    for tool in SPDK_TOOLS {
        let mut cmd = Command::new(dir.join(tool));
        cmd.arg("-h");
        if let Err(e) = run_captured(cmd, scratch, &format!("probe-{tool}"), Duration::from_secs(20)) {
            let hint = if e.contains("shared librar") {
                " (apt-get install -y libnuma1 libuuid1 libssl3 libkeyutils1 libaio1)"
            } else {
                ""
            };
            return Err(format!("{tool} does not start: {e}{hint}"));
        }
    }
    Ok(Spdk { dir, hugepages_mib: free_hugepages_mib() })
}

fn core_mask(core: usize) -> String {
    format!("{:#x}", 1u128 << core.min(127))
}

/// Runs one `nvraid-perf` process and reads its JSON report back.
fn run_nvraid_perf(ctx: &Suite, target_args: &[String], core: usize, spec: &RunSpec, tag: &str) -> Outcome {
    let report = ctx.dir.join(format!("{tag}.report.json"));
    let _ = std::fs::remove_file(&report);
    let mut cmd = Command::new(&ctx.perf_bin);
    cmd.args(target_args)
        .args(["-q", &spec.qd.to_string(), "-o", &spec.io.to_string(), "-w", spec.workload])
        .args(["-t", &ctx.time_arg, "-m", &format!("[{core}]"), "--seed", "1", "--report-json"])
        .arg(&report);
    let out = run_captured(cmd, &ctx.dir, tag, ctx.limit())?;
    ctx.show(tag, &out);
    let text = std::fs::read_to_string(&report).map_err(|e| format!("reading {}: {e}", report.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("report: {e}"))?;
    parse_report(&v)
}

/// One run's workload.
struct RunSpec {
    workload: &'static str,
    qd: u32,
    io: u64,
}

/// What every run of one suite shares.
struct Suite {
    perf_bin: PathBuf,
    tgt_bin: PathBuf,
    /// Scratch folder for configs, outputs and reports.
    dir: PathBuf,
    spdk: Option<Spdk>,
    raid: bool,
    /// `-t` as both sides take it (SPDK's tools take whole seconds).
    time_arg: String,
    time_s: f64,
    verbose: bool,
}

impl Suite {
    fn limit(&self) -> Duration {
        Duration::from_secs_f64(self.time_s + 60.0)
    }

    fn show(&self, tag: &str, out: &str) {
        if self.verbose {
            println!("--- {tag}");
            print!("{}", out.replace('\r', "\n"));
        }
    }
}

/// The local rows: each round runs every row on both sides, alternating
/// which goes first.
fn local_rows(ctx: &Suite, args: &BenchArgs) -> Vec<Row> {
    let (spdk, raid) = (ctx.spdk.as_ref(), ctx.raid);
    let mut rows: Vec<Row> = Vec::new();
    for &bdev in BDEVS.iter().filter(|b| selected(&args.only, b)) {
        for &(w, qd, io) in WORKLOADS {
            rows.push(Row::new(bdev.into(), w, qd, io));
        }
    }
    for &(bdev, w, qd, io) in PARITY_ROWS.iter().filter(|r| selected(&args.only, r.0)) {
        rows.push(Row::new(bdev.into(), w, qd, io));
    }
    for round in 0..args.rounds {
        for row in rows.iter_mut() {
            let bdev = row.bdev.clone();
            if bdev.starts_with("raid") && !raid {
                row.nvraid.push(Err("n/a (raid not available in this build)".into()));
                continue;
            }
            let Some(cfg) = config_for(&bdev, args.block_size, args.malloc_mib) else {
                row.nvraid.push(Err(format!("unknown bdev kind {bdev}")));
                continue;
            };
            let cfg_path = ctx.dir.join(format!("{bdev}.json"));
            if let Err(e) = std::fs::write(&cfg_path, cfg.to_string()) {
                row.nvraid.push(Err(format!("writing {}: {e}", cfg_path.display())));
                continue;
            }
            let spec = row.spec();
            let (w, qd, io) = (spec.workload, spec.qd, spec.io);
            let tag = format!("{bdev}-{w}-{qd}-{io}-r{round}");
            let nvraid = || {
                let target = ["--json".to_string(), cfg_path.display().to_string(), "-b".into(), "Bench0".into()];
                run_nvraid_perf(ctx, &target, args.core, &spec, &format!("{tag}-nvraid"))
            };
            let spdk_run = |s: &Spdk| {
                let mut cmd = Command::new(s.bin("bdevperf"));
                cmd.args(s.mem_args(malloc_mib_of(&bdev, args.malloc_mib)))
                    .arg("--json")
                    .arg(&cfg_path)
                    .args(["-q", &qd.to_string(), "-o", &io.to_string(), "-w", w, "-t", &ctx.time_arg])
                    .args(["-m", &core_mask(args.core), "-T", "Bench0"]);
                let spdk_tag = format!("{tag}-spdk");
                let ran = run_captured(cmd, &ctx.dir, &spdk_tag, ctx.limit());
                // A failed run's output is still in its file: it says whether
                // SPDK refused the IOs (raid5f: partial-stripe writes).
                let out = match &ran {
                    Ok(out) => out.clone(),
                    Err(_) => String::from_utf8_lossy(
                        &std::fs::read(ctx.dir.join(format!("{spdk_tag}.out"))).unwrap_or_default(),
                    )
                    .into_owned(),
                };
                ctx.show(&spdk_tag, &out);
                ran.and_then(|out| parse_bdevperf(&out))
                    .map_err(|e| parse_bdevperf_refusal(&out).map_or(e, |why| format!("refused ({why})")))
            };
            match spdk {
                Some(s) if round % 2 == 1 => {
                    row.spdk.push(spdk_run(s));
                    row.nvraid.push(nvraid());
                }
                Some(s) => {
                    row.nvraid.push(nvraid());
                    row.spdk.push(spdk_run(s));
                }
                None => row.nvraid.push(nvraid()),
            }
            if args.verbose {
                println!("{}", row_line(row, spdk.is_some()));
            }
        }
    }
    rows
}

/// NQN of the subsystem exporting `kind` in the NVMe/TCP rows.
fn tcp_nqn(kind: &str) -> String {
    format!("nqn.2016-06.io.nvraid:bench-{kind}")
}

/// The target's config, which nvraid-tgt and SPDK's nvmf_tgt both load:
/// malloc (and raid1 when available) exported on 127.0.0.1:`port`, one
/// subsystem each.
fn tgt_config(args: &BenchArgs, port: u16, raid: bool) -> Value {
    let blocks = (args.malloc_mib << 20) / u64::from(args.block_size);
    let bs = args.block_size;
    let mut bdevs = vec![
        json!({"method": "bdev_malloc_create", "params": {"name": "TcpMalloc", "num_blocks": blocks, "block_size": bs}}),
    ];
    let mut exports = vec![("malloc", "TcpMalloc")];
    if raid {
        for m in ["TcpM0", "TcpM1"] {
            bdevs.push(
                json!({"method": "bdev_malloc_create", "params": {"name": m, "num_blocks": blocks, "block_size": bs}}),
            );
        }
        bdevs.push(json!({"method": "bdev_raid_create",
            "params": {"name": "TcpRaid1", "raid_level": "raid1", "base_bdevs": ["TcpM0", "TcpM1"]}}));
        exports.push(("raid1", "TcpRaid1"));
    }
    let listen = json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()});
    let mut nvmf = vec![json!({"method": "nvmf_create_transport", "params": {"trtype": "TCP"}})];
    for (kind, bdev) in exports {
        let nqn = tcp_nqn(kind);
        nvmf.push(json!({"method": "nvmf_create_subsystem", "params": {"nqn": nqn, "allow_any_host": true}}));
        nvmf.push(json!({"method": "nvmf_subsystem_add_ns", "params": {"nqn": nqn, "namespace": {"bdev_name": bdev}}}));
        nvmf.push(json!({"method": "nvmf_subsystem_add_listener", "params": {"nqn": nqn, "listen_address": listen}}));
    }
    json!({"subsystems": [{"subsystem": "bdev", "config": bdevs}, {"subsystem": "nvmf", "config": nvmf}]})
}

/// A running target, stopped when dropped: SIGTERM (SPDK then releases its
/// memory and hugepage files), SIGKILL if it does not exit in time.
struct Tgt(std::process::Child);

impl Drop for Tgt {
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let asked = Command::new("kill").args(["-TERM", &pid]).status().is_ok_and(|s| s.success());
        let deadline = Instant::now() + Duration::from_secs(if asked { 15 } else { 0 });
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Nvraid,
    Spdk,
}

fn free_port() -> std::result::Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Starts `side`'s target on `core` with `cfg` and waits until it listens.
fn start_tgt(
    ctx: &Suite,
    side: Side,
    cfg: &Value,
    core: usize,
    port: u16,
    mem_mib: u64,
) -> std::result::Result<Tgt, String> {
    let cfg_path = ctx.dir.join("tgt.json");
    std::fs::write(&cfg_path, cfg.to_string()).map_err(|e| format!("writing {}: {e}", cfg_path.display()))?;
    let sock = ctx.dir.join(format!("tgt-{port}.sock"));
    let log = ctx.dir.join(format!("tgt-{port}.log"));
    let log_file = std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let log_err = log_file.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = match (side, &ctx.spdk) {
        (Side::Nvraid, _) => {
            let mut c = Command::new(&ctx.tgt_bin);
            c.arg("-c").arg(&cfg_path).args(["-m", &format!("[{core}]"), "-r"]).arg(&sock);
            c
        }
        (Side::Spdk, Some(s)) => {
            let mut c = Command::new(s.bin("nvmf_tgt"));
            c.args(s.mem_args(mem_mib)).args(["-m", &core_mask(core), "-r"]).arg(&sock).arg("--json").arg(&cfg_path);
            c
        }
        (Side::Spdk, None) => return Err("SPDK not found".into()),
    };
    let name = cmd.get_program().to_string_lossy().into_owned();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("starting {name}: {e}"))?;
    let mut tgt = Tgt(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = tgt.0.try_wait() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("{name} exited at start ({status}): {}", last_line(&text)));
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(tgt);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{name} did not listen within 60 s"))
}

/// One NVMe/TCP case against a running target.
fn tcp_case(ctx: &Suite, port: u16, kind: &str, spec: &RunSpec, core: usize, tag: &str) -> Outcome {
    let trid = format!("trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{}", tcp_nqn(kind));
    match &ctx.spdk {
        Some(s) => {
            let mut cmd = Command::new(s.bin("spdk_nvme_perf"));
            cmd.args(s.mem_args(0))
                .args(["-r", &trid, "-q", &spec.qd.to_string(), "-o", &spec.io.to_string(), "-w", spec.workload])
                .args(["-t", &ctx.time_arg, "-c", &core_mask(core), "-L"]);
            let out = run_captured(cmd, &ctx.dir, tag, ctx.limit())?;
            ctx.show(tag, &out);
            parse_nvme_perf(&out)
        }
        None => run_nvraid_perf(ctx, &["-r".to_string(), trid], core, spec, tag),
    }
}

/// The NVMe/TCP rows. With SPDK: each round starts nvraid-tgt and SPDK's
/// nvmf_tgt in turn (alternating which goes first) on the same core and
/// config, and SPDK's spdk_nvme_perf drives every case against each.
/// Without: nvraid-tgt driven by nvraid-perf.
fn tcp_rows(ctx: &Suite, args: &BenchArgs) -> Vec<Row> {
    let (spdk, raid) = (ctx.spdk.as_ref(), ctx.raid);
    let mut rows: Vec<Row> = Vec::new();
    for kind in TCP_KINDS.iter().filter(|k| selected(&args.only, &format!("tcp:{k}"))) {
        for &(w, qd, io) in TCP_CASES {
            rows.push(Row::new(format!("tcp:{kind}"), w, qd, io));
        }
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (tgt_core, init_core) = (0, 1.min(cpus - 1));
    let mem_mib = args.malloc_mib * if raid { 3 } else { 1 };
    for round in 0..args.rounds {
        let sides: &[Side] = match (spdk.is_some(), round % 2) {
            (false, _) => &[Side::Nvraid],
            (true, 0) => &[Side::Nvraid, Side::Spdk],
            (true, _) => &[Side::Spdk, Side::Nvraid],
        };
        for &side in sides {
            let started = if side == Side::Nvraid && !ctx.tgt_bin.exists() {
                Err(format!("n/a (nvraid-tgt not found at {})", ctx.tgt_bin.display()))
            } else {
                free_port().and_then(|port| {
                    let cfg = tgt_config(args, port, raid);
                    start_tgt(ctx, side, &cfg, tgt_core, port, mem_mib).map(|t| (t, port))
                })
            };
            for row in rows.iter_mut() {
                let kind = row.bdev.trim_start_matches("tcp:").to_string();
                let outcome = match &started {
                    Err(e) => Err(e.clone()),
                    Ok(_) if kind == "raid1" && !raid => Err("n/a (raid not available in this build)".into()),
                    Ok((_, port)) => {
                        let spec = row.spec();
                        let tag = format!("tcp-{kind}-{}-{}-{}-r{round}-{side:?}", spec.workload, spec.qd, spec.io);
                        tcp_case(ctx, *port, &kind, &spec, init_core, &tag)
                    }
                };
                match side {
                    Side::Nvraid => row.nvraid.push(outcome),
                    Side::Spdk => row.spdk.push(outcome),
                }
            }
            drop(started);
        }
    }
    rows
}

fn fmt_iops(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else {
        format!("{:.0} k", x / 1e3)
    }
}

/// Runs the suite; returns the exit status (non-zero when a row failed).
pub fn run(args: &BenchArgs) -> Result<i32> {
    let perf_bin = match &args.perf_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("finding the nvraid-perf binary")?,
    };
    let dir = std::env::temp_dir().join(format!("nvraid-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _cleanup = RemoveDir(dir.clone());
    let raid = raid_available();
    let spdk = find_spdk(args.spdk_bin.as_deref(), &dir);
    // SPDK's tools take whole seconds: both sides run the same duration.
    let time_s = if spdk.is_ok() { args.time_s.ceil().max(1.0) } else { args.time_s };
    println!(
        "nvraid-perf bench: core {}, {time_s} s per run, {} round(s), block size {}, malloc {} MiB{}",
        args.core,
        args.rounds,
        args.block_size,
        args.malloc_mib,
        if raid { "" } else { "; raid not available in this build" }
    );
    let spdk = match spdk {
        Ok(s) => {
            println!(
                "SPDK: {} (bdevperf, nvmf_tgt, spdk_nvme_perf), memory: {}; sides alternate each round, medians shown",
                s.dir.display(),
                s.memory_mode()
            );
            if let Some(note) = s.memory_note() {
                println!("{note}");
            }
            Some(s)
        }
        Err(why) => {
            println!("SPDK not found: {why}. nvraid's figures alone.");
            None
        }
    };
    let tgt_bin = args.tgt_bin.clone().unwrap_or_else(|| perf_bin.with_file_name("nvraid-tgt"));
    let ctx =
        Suite { perf_bin, tgt_bin, dir, spdk, raid, time_arg: format!("{time_s}"), time_s, verbose: args.verbose };
    let spdk = ctx.spdk.as_ref();
    println!("load average at start: {}", load_average());
    let memcpy = memcpy_mib_per_sec(args.core, Duration::from_secs(1))?;
    if PARITY_ROWS.iter().any(|r| selected(&args.only, r.0)) {
        println!(
            "raid5 rows: {PARITY_MEMBERS} malloc members, bdev_raid_create raid_level \"raid5f\" strip_size_kb \
             {PARITY_STRIP_KB}, one config loaded by both sides (nvraid takes raid5f as its raid5); raid0x4: raid0 \
             of the same members and strip"
        );
    }
    let mut rows = local_rows(&ctx, args);
    if args.no_tcp {
        println!("NVMe/TCP rows skipped (--no-tcp)");
    } else if !TCP_KINDS.iter().any(|k| selected(&args.only, &format!("tcp:{k}"))) {
        println!("NVMe/TCP rows skipped (not in --only)");
    } else {
        let init = if spdk.is_some() { "SPDK's spdk_nvme_perf drives both targets" } else { "nvraid-perf drives it" };
        let tgts = if spdk.is_some() { "nvraid-tgt and SPDK's nvmf_tgt (in turn)" } else { "nvraid-tgt" };
        println!("NVMe/TCP rows: {tgts} on core 0; {init} from core 1");
        rows.extend(tcp_rows(&ctx, args));
    }
    let with_spdk = spdk.is_some();
    println!("load average at end: {} (other work on these cores makes every figure noisier)", load_average());
    println!();
    println!("{}", header(with_spdk));
    for r in &rows {
        println!("{}", row_line(r, with_spdk));
    }
    if with_spdk {
        println!("ratio = nvraid IOPS / SPDK IOPS (medians); SPDK's bdevperf reports no percentiles");
    }
    let parity = parity_lines(&rows, with_spdk);
    if !parity.is_empty() {
        println!();
        println!(
            "parity cost = raid5 {}KiB write MiB/s / ({}/{PARITY_MEMBERS} x raid0x4 {}KiB write MiB/s), same queue \
             depth, medians (issue 12 goal: >= 0.90)",
            (u64::from(PARITY_MEMBERS) - 1) * PARITY_STRIP_KB,
            PARITY_MEMBERS - 1,
            u64::from(PARITY_MEMBERS) * PARITY_STRIP_KB
        );
        for (line, _) in &parity {
            println!("  {line}");
        }
    }
    let malloc_write = rows.iter().find(|r| r.bdev == "malloc" && r.workload == "write").map(|r| median(&r.nvraid));
    println!();
    let (memcpy, memcpy_cpu) = memcpy;
    let per_cpu = |x: Option<f64>| x.map_or("n/a".to_string(), |m| format!("{m:.0}"));
    println!(
        "single-thread memcpy (128 KiB chunks into 256 MiB): {memcpy:.0} MiB/s wall, {} MiB/s per CPU-second",
        per_cpu(memcpy_cpu)
    );
    match malloc_write {
        Some(Ok(f)) => {
            let cpu = f.iops_per_cpu_s.map(|iops| iops * (128u64 << 10) as f64 / (1u64 << 20) as f64);
            let frac = cpu.zip(memcpy_cpu).map_or("n/a".into(), |(a, b)| format!("{:.2}", a / b));
            println!(
                "nvraid malloc 128 KiB write qd16: {:.0} MiB/s = {:.2} of memcpy (wall); {} MiB/s per CPU-second = {frac} of memcpy (per CPU-second)",
                f.mib_per_sec,
                f.mib_per_sec / memcpy,
                per_cpu(cpu)
            );
        }
        _ => println!("nvraid malloc 128 KiB write qd16: n/a"),
    }
    if let Some(p) = &args.report_json {
        let fig = |o: &Outcome| match o {
            Ok(f) => json!({"iops": f.iops, "mib_per_sec": f.mib_per_sec, "avg_us": f.avg_us,
                            "p99_us": f.p99_us, "p99_9_us": f.p99_9_us}),
            Err(e) => json!({"error": e}),
        };
        let v = json!({
            "time_s": time_s,
            "rounds": args.rounds,
            "spdk_bin": spdk.as_ref().map(|s| s.dir.display().to_string()),
            "memcpy_mib_per_sec": memcpy,
            "memcpy_mib_per_cpu_s": memcpy_cpu,
            "parity_cost": parity.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
            "rows": rows.iter().map(|r| {
                let (n, s) = (median(&r.nvraid), median(&r.spdk));
                json!({
                    "bdev": r.bdev, "workload": r.workload, "queue_depth": r.queue_depth, "io_size": r.io_size,
                    "nvraid": fig(&n),
                    "spdk": if with_spdk { fig(&s) } else { Value::Null },
                    "ratio": ratio(&n, &s),
                })
            }).collect::<Vec<_>>(),
        });
        std::fs::write(p, serde_json::to_string_pretty(&v)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let failed = |v: &[Outcome], refusal_expected: bool| {
        v.iter()
            .any(|o| o.as_ref().is_err_and(|e| !(e.starts_with("n/a") || refusal_expected && e.starts_with("refused"))))
    };
    let failures =
        rows.iter().filter(|r| failed(&r.nvraid, false) || failed(&r.spdk, r.spdk_refusal_expected())).count();
    if failures > 0 {
        bail!("{failures} rows failed");
    }
    Ok(0)
}

/// The parity-cost lines, one per queue depth that has both a raid5 and a
/// raid0x4 write row: text, and the same as JSON.
fn parity_lines(rows: &[Row], with_spdk: bool) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for r5 in rows.iter().filter(|r| r.bdev == "raid5" && r.workload == "write") {
        let Some(r0) =
            rows.iter().find(|r| r.bdev == "raid0x4" && r.workload == "write" && r.queue_depth == r5.queue_depth)
        else {
            continue;
        };
        let side = |a: &[Outcome], b: &[Outcome]| -> (String, Option<f64>) {
            match (median(a), median(b)) {
                (Ok(x), Ok(y)) => match parity_cost_ratio(x.mib_per_sec, y.mib_per_sec, PARITY_MEMBERS) {
                    Some(q) => (
                        format!(
                            "{:.0} / ({}/{PARITY_MEMBERS} x {:.0}) = {q:.2}",
                            x.mib_per_sec,
                            PARITY_MEMBERS - 1,
                            y.mib_per_sec
                        ),
                        Some(q),
                    ),
                    None => ("n/a".into(), None),
                },
                (Err(e), _) | (_, Err(e)) => (format!("n/a ({e})"), None),
            }
        };
        let (n_text, n) = side(&r5.nvraid, &r0.nvraid);
        let mut text = format!("qd {:>3}: nvraid {n_text}", r5.queue_depth);
        let mut v = json!({"queue_depth": r5.queue_depth, "nvraid": n});
        if with_spdk {
            let (s_text, s) = side(&r5.spdk, &r0.spdk);
            text += &format!("; SPDK raid5f {s_text}");
            v["spdk"] = json!(s);
        }
        out.push((text, v));
    }
    out
}

/// `/proc/loadavg`'s 1, 5 and 15 minute figures.
fn load_average() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let v: Vec<&str> = s.split_whitespace().take(3).collect();
    if v.len() == 3 {
        v.join(" ")
    } else {
        "unknown".into()
    }
}

fn ratio(nvraid: &Outcome, spdk: &Outcome) -> Option<f64> {
    match (nvraid, spdk) {
        (Ok(n), Ok(s)) if s.iops > 0.0 => Some(n.iops / s.iops),
        _ => None,
    }
}

fn size_label(io: u64) -> String {
    if io.is_multiple_of(1024) {
        format!("{}KiB", io / 1024)
    } else {
        format!("{io}B")
    }
}

fn header(with_spdk: bool) -> String {
    let mut h = format!(
        "{:<11} {:<10} {:>4} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "bdev", "workload", "qd", "io", "IOPS", "MiB/s", "avg(us)", "p99(us)", "p99.9"
    );
    if with_spdk {
        h += &format!(" {:>10} {:>9} {:>9} {:>7}", "SPDK IOPS", "SPDK avg", "SPDK p99", "ratio");
    }
    h
}

fn opt(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.2}"))
}

fn row_line(r: &Row, with_spdk: bool) -> String {
    let head = format!("{:<11} {:<10} {:>4} {:>7}", r.bdev, r.workload, r.queue_depth, size_label(r.io_size));
    let n = median(&r.nvraid);
    let mut line = match &n {
        Err(e) => format!("{head} {e:>40}"),
        Ok(f) => format!(
            "{head} {:>10} {:>9.0} {:>9.2} {:>9} {:>9}",
            fmt_iops(f.iops),
            f.mib_per_sec,
            f.avg_us,
            opt(f.p99_us),
            opt(f.p99_9_us)
        ),
    };
    if with_spdk {
        let s = median(&r.spdk);
        match &s {
            Ok(f) => line += &format!(" {:>10} {:>9.2} {:>9}", fmt_iops(f.iops), f.avg_us, opt(f.p99_us)),
            Err(e) => line += &format!("   SPDK: {e}"),
        }
        if let Some(x) = ratio(&n, &s) {
            line += &format!(" {:>6.2}x", x);
        }
    }
    line
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
