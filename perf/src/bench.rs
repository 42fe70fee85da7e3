//! The benchmark suite (`nvraid-perf bench`, driven by `scripts/bench.sh`):
//! the standard matrix on one core, each row a fresh `nvraid-perf` process,
//! one table at the end with SPDK's bdevperf figures beside ours, and the
//! machine's single-thread memcpy bandwidth as the ceiling for 128 KiB writes.

use crate::cli::BenchArgs;
use anyhow::{bail, Context, Result};
use mgmt::reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use mgmt::{Ctx, MethodTable};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// SPDK v25 bdevperf on a machine of the same kind, one core, 4 KiB, qd128
/// (issue 4): (bdev, workload, IOPS).
pub const SPDK_IOPS: &[(&str, &str, f64)] = &[
    ("null", "randread", 13.1e6),
    ("null", "randwrite", 12.8e6),
    ("malloc", "randread", 1.84e6),
    ("malloc", "randwrite", 1.74e6),
    ("raid0", "randread", 1.43e6),
    ("raid0", "randwrite", 1.44e6),
    ("raid1", "randread", 1.54e6),
    ("raid1", "randwrite", 0.79e6),
];

/// The matrix's workloads: (workload, queue depth, IO size).
pub const WORKLOADS: &[(&str, u32, u64)] =
    &[("randread", 128, 4096), ("randwrite", 128, 4096), ("write", 16, 128 << 10)];

/// The matrix's bdevs.
pub const BDEVS: &[&str] = &["null", "malloc", "raid0", "raid1"];

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Row {
    pub bdev: String,
    pub workload: String,
    pub queue_depth: u32,
    pub io_size: u64,
    pub outcome: Result<Value, String>,
}

/// True when this build's method table can create RAID bdevs.
pub fn raid_available() -> bool {
    let m = ReactorSet::manual(1);
    let table = MethodTable::new(Ctx { reactors: m.handle().clone(), shutdown: Box::new(|_| {}) });
    table.has("bdev_raid_create")
}

/// The config that creates `kind` (named `Bench0`), or None if it cannot exist here.
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
        _ => return None,
    };
    Some(json!({"subsystems": [{"subsystem": "bdev", "config": calls}]}))
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

fn spdk_iops(bdev: &str, workload: &str, io_size: u64) -> Option<f64> {
    (io_size == 4096).then(|| SPDK_IOPS.iter().find(|(b, w, _)| *b == bdev && *w == workload).map(|r| r.2))?
}

/// Runs one `nvraid-perf` process and reads its JSON report back.
fn run_perf(
    bin: &Path,
    out_path: &Path,
    target_args: &[String],
    core: usize,
    verbose: bool,
    row: &RowSpec,
) -> Result<Value, String> {
    let out = Command::new(bin)
        .args(target_args)
        .args(["-q", &row.qd.to_string(), "-o", &row.io.to_string(), "-w", row.workload, "-t", &row.time_s.to_string()])
        .args(["-m", &format!("[{core}]"), "--seed", "1", "--report-json"])
        .arg(out_path)
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    if verbose {
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        return Err(format!("failed ({}): {last}", out.status));
    }
    let text = std::fs::read_to_string(out_path).map_err(|e| format!("reading {}: {e}", out_path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("report: {e}"))
}

/// One row's workload.
struct RowSpec {
    workload: &'static str,
    qd: u32,
    io: u64,
    time_s: f64,
}

fn run_row(
    bin: &Path,
    dir: &Path,
    args: &BenchArgs,
    bdev: &str,
    w: &'static str,
    qd: u32,
    io: u64,
) -> Result<Value, String> {
    let cfg = config_for(bdev, args.block_size, args.malloc_mib).ok_or_else(|| format!("unknown bdev kind {bdev}"))?;
    let cfg_path = dir.join(format!("{bdev}.json"));
    std::fs::write(&cfg_path, cfg.to_string()).map_err(|e| format!("writing {}: {e}", cfg_path.display()))?;
    let target_args = vec!["--json".to_string(), cfg_path.display().to_string(), "-b".into(), "Bench0".into()];
    let out_path = dir.join(format!("{bdev}-{w}-{qd}-{io}.report.json"));
    let row = RowSpec { workload: w, qd, io, time_s: args.time_s };
    run_perf(bin, &out_path, &target_args, args.core, args.verbose, &row)
}

/// NQN of the subsystem exporting `kind` in the NVMe/TCP rows.
fn tcp_nqn(kind: &str) -> String {
    format!("nqn.2016-06.io.nvraid:bench-{kind}")
}

/// The target's config: malloc (and raid1 when available) exported on
/// 127.0.0.1:`port`, one subsystem each.
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

/// A running nvraid-tgt, killed when dropped.
struct Tgt(std::process::Child);

impl Drop for Tgt {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_tgt(bin: &Path, dir: &Path, cfg: &Value, core: usize, port: u16) -> Result<Tgt, String> {
    let cfg_path = dir.join("tgt.json");
    std::fs::write(&cfg_path, cfg.to_string()).map_err(|e| format!("writing {}: {e}", cfg_path.display()))?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&cfg_path)
        .args(["-m", &format!("[{core}]"), "-r"])
        .arg(dir.join("tgt.sock"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let mut tgt = Tgt(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = tgt.0.try_wait() {
            return Err(format!("nvraid-tgt exited at start ({status})"));
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(tgt);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("nvraid-tgt did not listen within 30 s".into())
}

/// Runs one NVMe/TCP row: (exported bdev kind, workload, queue depth, IO size).
type RowFn<'a> = dyn Fn(&str, &'static str, u32, u64) -> Result<Value, String> + 'a;

/// The NVMe/TCP rows: nvraid-tgt on `tgt_core`, nvraid-perf on `perf_core`.
fn tcp_rows(bin: &Path, dir: &Path, args: &BenchArgs, raid: bool) -> Vec<Row> {
    let specs: [(&'static str, u32, u64); 4] =
        [("randread", 32, 4096), ("randread", 128, 4096), ("randwrite", 32, 4096), ("read", 16, 128 << 10)];
    let kinds = ["malloc", "raid1"];
    let rows_with = |f: &RowFn| -> Vec<Row> {
        let mut rows = Vec::new();
        for kind in kinds {
            for &(w, qd, io) in &specs {
                let outcome = f(kind, w, qd, io);
                rows.push(Row {
                    bdev: format!("tcp:{kind}"),
                    workload: w.into(),
                    queue_depth: qd,
                    io_size: io,
                    outcome,
                });
            }
        }
        rows
    };
    let tgt_bin = match &args.tgt_bin {
        Some(p) => p.clone(),
        None => bin.with_file_name("nvraid-tgt"),
    };
    if !tgt_bin.exists() {
        let why = format!("n/a (nvraid-tgt not found at {})", tgt_bin.display());
        return rows_with(&|_, _, _, _| Err(why.clone()));
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (tgt_core, perf_core) = (0, 1.min(cpus - 1));
    let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => return rows_with(&|_, _, _, _| Err(format!("no free port: {e}"))),
    };
    let tgt = match start_tgt(&tgt_bin, dir, &tgt_config(args, port, raid), tgt_core, port) {
        Ok(t) => t,
        Err(e) => return rows_with(&|_, _, _, _| Err(e.clone())),
    };
    let rows = rows_with(&|kind, w, qd, io| {
        if kind == "raid1" && !raid {
            return Err("n/a (raid not available)".into());
        }
        let trid = format!("trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{}", tcp_nqn(kind));
        let out_path = dir.join(format!("tcp-{kind}-{w}-{qd}-{io}.report.json"));
        let row = RowSpec { workload: w, qd, io, time_s: args.time_s };
        run_perf(bin, &out_path, &["-r".to_string(), trid], perf_core, args.verbose, &row)
    });
    drop(tgt);
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
    let bin = match &args.perf_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("finding the nvraid-perf binary")?,
    };
    let dir = std::env::temp_dir().join(format!("nvraid-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _cleanup = RemoveDir(dir.clone());
    let raid = raid_available();
    println!(
        "nvraid-perf bench: core {}, {} s per row, block size {}, malloc {} MiB{}",
        args.core,
        args.time_s,
        args.block_size,
        args.malloc_mib,
        if raid { "" } else { "; raid not available in this build" }
    );
    let memcpy = memcpy_mib_per_sec(args.core, Duration::from_secs(1))?;
    let mut rows = Vec::new();
    for &bdev in BDEVS {
        for &(w, qd, io) in WORKLOADS {
            let outcome = if bdev.starts_with("raid") && !raid {
                Err("n/a (raid not available)".to_string())
            } else {
                run_row(&bin, &dir, args, bdev, w, qd, io)
            };
            let row = Row { bdev: bdev.into(), workload: w.into(), queue_depth: qd, io_size: io, outcome };
            if args.verbose {
                println!("{}", row_line(&row));
            }
            rows.push(row);
        }
    }
    if args.no_tcp {
        println!("NVMe/TCP rows skipped (--no-tcp)");
    } else {
        println!("NVMe/TCP rows: nvraid-tgt on core 0, nvraid-perf on core 1");
        rows.extend(tcp_rows(&bin, &dir, args, raid));
    }
    println!();
    println!("{}", header());
    for r in &rows {
        println!("{}", row_line(r));
    }
    let malloc_write = rows
        .iter()
        .find(|r| r.bdev == "malloc" && r.workload == "write")
        .and_then(|r| r.outcome.as_ref().ok())
        .map(|v| v["total"].clone());
    println!();
    let (memcpy, memcpy_cpu) = memcpy;
    let per_cpu = |x: Option<f64>| x.map_or("n/a".to_string(), |m| format!("{m:.0}"));
    println!(
        "single-thread memcpy (128 KiB chunks into 256 MiB): {memcpy:.0} MiB/s wall, {} MiB/s per CPU-second",
        per_cpu(memcpy_cpu)
    );
    match malloc_write {
        Some(t) => {
            let wall = t["mib_per_sec"].as_f64().unwrap_or(f64::NAN);
            let cpu = t["iops_per_cpu_s"].as_f64().map(|iops| iops * (128u64 << 10) as f64 / (1u64 << 20) as f64);
            let frac = cpu.zip(memcpy_cpu).map_or("n/a".into(), |(a, b)| format!("{:.2}", a / b));
            println!(
                "malloc 128 KiB write qd16: {wall:.0} MiB/s = {:.2} of memcpy (wall); {} MiB/s per CPU-second = {frac} of memcpy (per CPU-second)",
                wall / memcpy,
                per_cpu(cpu)
            );
        }
        None => println!("malloc 128 KiB write qd16: n/a"),
    }
    if let Some(p) = &args.report_json {
        let v = json!({
            "memcpy_mib_per_sec": memcpy,
            "memcpy_mib_per_cpu_s": memcpy_cpu,
            "rows": rows.iter().map(|r| json!({
                "bdev": r.bdev, "workload": r.workload, "queue_depth": r.queue_depth, "io_size": r.io_size,
                "spdk_iops": spdk_iops(&r.bdev, &r.workload, r.io_size),
                "result": match &r.outcome { Ok(v) => v["total"].clone(), Err(e) => json!({"error": e}) },
            })).collect::<Vec<_>>(),
        });
        std::fs::write(p, serde_json::to_string_pretty(&v)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let failed = rows.iter().filter(|r| r.outcome.as_ref().is_err_and(|e| !e.starts_with("n/a"))).count();
    if failed > 0 {
        bail!("{failed} rows failed");
    }
    Ok(0)
}

fn size_label(io: u64) -> String {
    if io.is_multiple_of(1024) {
        format!("{}KiB", io / 1024)
    } else {
        format!("{io}B")
    }
}

fn header() -> String {
    format!(
        "{:<11} {:<10} {:>4} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7} {:>11} {:>9}",
        "bdev",
        "workload",
        "qd",
        "io",
        "IOPS",
        "MiB/s",
        "avg(us)",
        "p99(us)",
        "p99.9",
        "SPDK",
        "ratio",
        "IOPS/CPU-s",
        "cpu ratio"
    )
}

fn row_line(r: &Row) -> String {
    let head = format!("{:<11} {:<10} {:>4} {:>7}", r.bdev, r.workload, r.queue_depth, size_label(r.io_size));
    match &r.outcome {
        Err(e) => format!("{head}   {e}"),
        Ok(v) => {
            let t = &v["total"];
            let f = |k: &str| t[k].as_f64().unwrap_or(f64::NAN);
            let iops = f("iops");
            let per_cpu = t["iops_per_cpu_s"].as_f64();
            let (spdk, ratio, cpu_ratio) = match spdk_iops(&r.bdev, &r.workload, r.io_size) {
                Some(s) => {
                    (fmt_iops(s), format!("{:.2}x", iops / s), per_cpu.map_or("-".into(), |c| format!("{:.2}x", c / s)))
                }
                None => ("-".into(), "-".into(), "-".into()),
            };
            format!(
                "{head} {:>10} {:>9.0} {:>9.2} {:>9.2} {:>9.2} {:>10} {:>7} {:>11} {:>9}",
                fmt_iops(iops),
                f("mib_per_sec"),
                f("avg_us"),
                f("p99_us"),
                f("p99_9_us"),
                spdk,
                ratio,
                per_cpu.map_or("-".into(), fmt_iops),
                cpu_ratio
            )
        }
    }
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
