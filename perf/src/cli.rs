//! The command line, spelled as bdevperf and spdk_nvme_perf spell it, and
//! its check into a [`RunSpec`]: every bad option becomes an error that
//! names the option, never a panic.

use crate::workload::{self, Workload};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use mgmt::bdev::DmaBuf;
use mgmt::reactor::{self, IdlePolicy};
use std::path::PathBuf;
use std::time::Duration;

/// Most IO descriptors one reactor has (bdev's per-reactor pool); the
/// queue depths of all jobs on one core must fit in it.
pub const MAX_QUEUE_DEPTH: u32 = mgmt::bdev::io::DEFAULT_IO_POOL_SIZE as u32;
/// Longest run accepted (a guard against typos such as `-t 36000000`).
pub const MAX_TIME_S: f64 = 7.0 * 24.0 * 3600.0;

#[derive(Parser, Debug)]
#[command(
    name = "nvraid-perf",
    version,
    about = "Load generator for nvraid bdevs (like SPDK's bdevperf) and NVMe/TCP targets (like spdk_nvme_perf)",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Runs the standard benchmark matrix on one core and prints one table.
    Bench(BenchArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Idle {
    /// Poll without pause (what a benchmark wants).
    Busy,
    /// Sleep when idle (tests, shared machines).
    Sleep,
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Config to create the bdevs from (the daemon's format, as `save_config` writes).
    #[arg(short = 'c', long = "json", value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// NVMe/TCP target: 'trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:NQN'.
    #[arg(short = 'r', long = "transport-id", value_name = "TRID")]
    pub transport_id: Option<String>,
    /// Queue depth per job.
    #[arg(short = 'q', long = "queue-depth")]
    pub queue_depth: Option<u32>,
    /// IO size in bytes (suffixes k/K/KiB, m/M/MiB allowed).
    #[arg(short = 'o', long = "io-size", value_name = "BYTES")]
    pub io_size: Option<String>,
    /// Workload: read, write, randread, randwrite, rw, randrw, verify, unmap, write_zeroes, flush.
    #[arg(short = 'w', long = "workload")]
    pub workload: Option<String>,
    /// Read percentage for rw and randrw (default 50).
    #[arg(short = 'M', long = "rwmixread", value_name = "PERCENT")]
    pub read_pct: Option<u32>,
    /// Run time in seconds.
    #[arg(short = 't', long = "time", value_name = "SECONDS")]
    pub time_s: Option<f64>,
    /// Core mask: one job per core per bdev.
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    pub cpumask: String,
    /// Bdev(s) to run on (repeat or comma-separate); default: every unclaimed bdev.
    #[arg(short = 'b', long = "bdev", value_delimiter = ',')]
    pub bdevs: Vec<String>,
    /// Seed for offsets, the read/write mix and stamps (decimal or 0x hex); default: from the clock.
    #[arg(long)]
    pub seed: Option<String>,
    /// What a reactor does when it has no work.
    #[arg(long, value_enum, default_value = "busy")]
    pub idle: Option<Idle>,
    /// Do not pin reactor threads to their cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Do not use hugepages for DMA memory.
    #[arg(long)]
    pub no_huge: bool,
    /// Do not stamp written blocks (stamps are on by default; verify always stamps).
    #[arg(long)]
    pub no_stamp: bool,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub report_json: Option<PathBuf>,
    /// Draw the latency distribution as SVG to FILE.
    #[arg(long, value_name = "FILE")]
    pub latency_svg: Option<PathBuf>,
    /// Progress line interval in milliseconds.
    #[arg(long, default_value = "1000", value_name = "MS")]
    pub progress_ms: u64,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Seconds per row.
    #[arg(short = 't', long = "time", default_value = "5")]
    pub time_s: f64,
    /// The core the local rows run on.
    #[arg(long, default_value = "0")]
    pub core: usize,
    /// Size of each malloc bdev in MiB.
    #[arg(long, default_value = "256")]
    pub malloc_mib: u64,
    /// Block size of the bdevs.
    #[arg(long, default_value = "4096")]
    pub block_size: u32,
    /// Write the table as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub report_json: Option<PathBuf>,
    /// The nvraid-perf binary to run rows with (default: this one).
    #[arg(long, value_name = "PATH")]
    pub perf_bin: Option<PathBuf>,
    /// The nvraid-tgt binary for the NVMe/TCP rows (default: beside this one).
    #[arg(long, value_name = "PATH")]
    pub tgt_bin: Option<PathBuf>,
    /// Skip the NVMe/TCP rows.
    #[arg(long)]
    pub no_tcp: bool,
    /// Folder with SPDK's bdevperf, nvmf_tgt and spdk_nvme_perf, measured in
    /// the same run beside nvraid (default: $NVRAID_SPDK_BIN).
    #[arg(long, value_name = "DIR")]
    pub spdk_bin: Option<PathBuf>,
    /// Rounds per row, the two sides interleaved; medians are shown.
    #[arg(long, default_value = "3")]
    pub rounds: u32,
    /// Show each row's own output.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Run only these rows (comma-separated): null, malloc, raid0, raid1,
    /// raid5, raid0x4 (raid0 of raid5's 4 members, for the parity-cost
    /// ratio), tcp:malloc, tcp:raid1. Default: all.
    #[arg(long, value_delimiter = ',', value_name = "ROWS")]
    pub only: Vec<String>,
}

/// Where the bdevs' config comes from.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    File(PathBuf),
    /// Inline JSON (tests, the bench driver).
    Text(String),
}

/// An NVMe-oF transport ID (`-r`), SPDK's `key:value` words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportId {
    pub trtype: String,
    pub adrfam: String,
    pub traddr: String,
    pub trsvcid: String,
    pub subnqn: String,
}

impl TransportId {
    pub fn parse(s: &str) -> Result<TransportId> {
        let mut t = TransportId {
            trtype: String::new(),
            adrfam: "IPv4".into(),
            traddr: String::new(),
            trsvcid: "4420".into(),
            subnqn: String::new(),
        };
        for word in s.split_whitespace() {
            let (k, v) = word
                .split_once(':')
                .or_else(|| word.split_once('='))
                .ok_or_else(|| anyhow!("-r: '{word}' is not key:value"))?;
            if v.is_empty() {
                bail!("-r: {k} has no value");
            }
            match k.to_ascii_lowercase().as_str() {
                "trtype" => t.trtype = v.to_string(),
                "adrfam" => t.adrfam = v.to_string(),
                "traddr" => t.traddr = v.to_string(),
                "trsvcid" => t.trsvcid = v.to_string(),
                "subnqn" => t.subnqn = v.to_string(),
                "ns" | "hostnqn" => {}
                other => bail!("-r: unknown key '{other}' (expected trtype, adrfam, traddr, trsvcid, subnqn)"),
            }
        }
        if !t.trtype.eq_ignore_ascii_case("tcp") {
            bail!("-r: trtype must be TCP (got '{}')", t.trtype);
        }
        if !["ipv4", "ipv6"].contains(&t.adrfam.to_ascii_lowercase().as_str()) {
            bail!("-r: adrfam must be IPv4 or IPv6 (got '{}')", t.adrfam);
        }
        if t.traddr.is_empty() {
            bail!("-r: traddr is missing");
        }
        if t.subnqn.is_empty() {
            bail!("-r: subnqn is missing (the subsystem whose namespaces to drive)");
        }
        t.trsvcid.parse::<u16>().map_err(|_| anyhow!("-r: trsvcid '{}' is not a port number", t.trsvcid))?;
        Ok(t)
    }
}

/// Local bdevs or a remote namespace.
#[derive(Clone, Debug)]
pub enum Target {
    Local { config: ConfigSource, bdevs: Vec<String> },
    Tcp(TransportId),
}

/// A checked run.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub target: Target,
    pub workload: Workload,
    /// Percentage of reads for the mixed workloads (100 for pure reads, 0 for writes).
    pub read_pct: u32,
    pub queue_depth: u32,
    pub io_size_bytes: u64,
    pub duration: Duration,
    pub cores: Vec<usize>,
    pub seed: u64,
    pub idle: IdlePolicy,
    pub pin: bool,
    pub no_huge: bool,
    pub stamp: bool,
    pub report_json: Option<PathBuf>,
    pub latency_svg: Option<PathBuf>,
    pub progress_interval: Duration,
}

impl RunSpec {
    /// A spec for tests and the bench driver: local mode on core 0, sleeping
    /// reactors, unpinned.
    pub fn local(config_json: &str, bdevs: &[&str], workload: Workload, queue_depth: u32, io_size_bytes: u64) -> Self {
        RunSpec {
            target: Target::Local {
                config: ConfigSource::Text(config_json.to_string()),
                bdevs: bdevs.iter().map(|s| s.to_string()).collect(),
            },
            workload,
            read_pct: default_read_pct(workload),
            queue_depth,
            io_size_bytes,
            duration: Duration::from_millis(500),
            cores: vec![0],
            seed: 1,
            idle: IdlePolicy::sleep(),
            pin: false,
            no_huge: true,
            stamp: true,
            report_json: None,
            latency_svg: None,
            progress_interval: Duration::from_millis(100),
        }
    }
}

fn default_read_pct(w: Workload) -> u32 {
    match w {
        Workload::Read | Workload::RandRead => 100,
        Workload::Rw | Workload::RandRw => 50,
        _ => 0,
    }
}

/// Parses a size such as `4096`, `4k`, `128KiB`, `1M`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| anyhow!("'{s}' is not a size (examples: 4096, 4k, 128KiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "b" | "B" => 1,
        "k" | "K" | "KiB" | "kiB" | "KB" | "kB" => 1 << 10,
        "m" | "M" | "MiB" | "MB" => 1 << 20,
        "g" | "G" | "GiB" | "GB" => 1 << 30,
        u => bail!("'{s}': unknown size unit '{u}'"),
    };
    n.checked_mul(mult).ok_or_else(|| anyhow!("'{s}' is too large"))
}

fn parse_seed(s: &str) -> Result<u64> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| anyhow!("--seed '{s}' is not a 64-bit number"))
}

/// A seed from the clock, for runs that give none (printed so it can be replayed).
pub fn clock_seed() -> u64 {
    let ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    mgmt::bdev::rng::SimRng::new(ns ^ u64::from(std::process::id())).next_u64()
}

impl RunArgs {
    /// Checks the options into a run.
    pub fn to_spec(&self) -> Result<RunSpec> {
        let target = match (&self.json, &self.transport_id) {
            (Some(_), Some(_)) => {
                bail!("give either --json (local bdevs) or -r (NVMe/TCP target), not both")
            }
            (None, None) => bail!("nothing to run against: give --json FILE (local bdevs) or -r TRID (NVMe/TCP)"),
            (Some(p), None) => Target::Local { config: ConfigSource::File(p.clone()), bdevs: self.bdevs.clone() },
            (None, Some(r)) => {
                if !self.bdevs.is_empty() {
                    bail!("-b names local bdevs; with -r the target's namespace is used");
                }
                Target::Tcp(TransportId::parse(r)?)
            }
        };
        let queue_depth = self.queue_depth.ok_or_else(|| anyhow!("missing -q (queue depth)"))?;
        if queue_depth == 0 || queue_depth > MAX_QUEUE_DEPTH {
            bail!("-q {queue_depth}: queue depth must be between 1 and {MAX_QUEUE_DEPTH}");
        }
        let io_size = self.io_size.as_deref().ok_or_else(|| anyhow!("missing -o (IO size in bytes)"))?;
        let io_size_bytes = parse_size(io_size).context("-o")?;
        if io_size_bytes == 0 || io_size_bytes > DmaBuf::MAX_LEN as u64 {
            bail!("-o {io_size}: IO size must be between 1 byte and {} MiB", DmaBuf::MAX_LEN >> 20);
        }
        let w = self.workload.as_deref().ok_or_else(|| anyhow!("missing -w (workload: {})", workload::names()))?;
        let workload =
            Workload::from_name(w).ok_or_else(|| anyhow!("-w {w}: unknown workload (one of {})", workload::names()))?;
        let read_pct = match self.read_pct {
            Some(m) if !workload.is_mixed() => {
                bail!("-M {m}: the read percentage applies only to rw and randrw")
            }
            Some(m) if m > 100 => bail!("-M {m}: the read percentage must be between 0 and 100"),
            Some(m) => m,
            None => default_read_pct(workload),
        };
        let time_s = self.time_s.ok_or_else(|| anyhow!("missing -t (run time in seconds)"))?;
        if !(time_s > 0.0 && time_s <= MAX_TIME_S) {
            bail!("-t {time_s}: run time must be more than 0 and at most {MAX_TIME_S} seconds");
        }
        let cores = reactor::parse_core_mask(&self.cpumask).map_err(|e| anyhow!("-m: {e}"))?;
        let seed = match &self.seed {
            Some(s) => parse_seed(s)?,
            None => clock_seed(),
        };
        if self.progress_ms == 0 {
            bail!("--progress-ms must be more than 0");
        }
        if workload == Workload::Verify && self.no_stamp {
            bail!("--no-stamp: the verify workload always stamps its blocks");
        }
        Ok(RunSpec {
            target,
            workload,
            read_pct,
            queue_depth,
            io_size_bytes,
            duration: Duration::from_secs_f64(time_s),
            cores,
            seed,
            idle: match self.idle.unwrap_or(Idle::Busy) {
                Idle::Busy => IdlePolicy::BusyPoll,
                Idle::Sleep => IdlePolicy::sleep(),
            },
            pin: !self.no_pin,
            no_huge: self.no_huge,
            stamp: !self.no_stamp,
            report_json: self.report_json.clone(),
            latency_svg: self.latency_svg.clone(),
            progress_interval: Duration::from_millis(self.progress_ms),
        })
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Parsed {
    Run(Box<RunSpec>),
    Bench(BenchArgs),
}

/// Parses and checks a command line (`args[0]` is the program name). Help
/// and version requests come back as errors carrying clap's text.
pub fn parse_from<I, T>(args: I) -> std::result::Result<Parsed, ParseError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::try_parse_from(args).map_err(ParseError::Clap)?;
    match cli.command {
        Some(Command::Bench(b)) => {
            if !(b.time_s > 0.0 && b.time_s <= MAX_TIME_S) {
                return Err(ParseError::Invalid(anyhow!("bench -t {}: must be more than 0 seconds", b.time_s)));
            }
            if !(1..=100).contains(&b.rounds) {
                return Err(ParseError::Invalid(anyhow!("bench --rounds {}: must be 1 to 100", b.rounds)));
            }
            let names = crate::bench::row_names();
            if let Some(bad) = b.only.iter().find(|o| !names.contains(o)) {
                return Err(ParseError::Invalid(anyhow!(
                    "bench --only {bad}: no such rows (rows: {})",
                    names.join(", ")
                )));
            }
            Ok(Parsed::Bench(b))
        }
        None => cli.run.to_spec().map(|s| Parsed::Run(Box::new(s))).map_err(ParseError::Invalid),
    }
}

/// A command line that cannot run.
#[derive(Debug)]
pub enum ParseError {
    /// Clap's own error (unknown flag, bad number, or a help/version request).
    Clap(clap::Error),
    /// Options that parse but do not make a run.
    Invalid(anyhow::Error),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Clap(e) => write!(f, "{e}"),
            ParseError::Invalid(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for ParseError {}
