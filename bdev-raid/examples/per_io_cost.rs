//! Benchmark (not a test): what the RAID layer costs per IO, in CPU
//! instructions, the measure that stays put on a shared machine. Rows, all
//! 4 KiB random IO at queue depth 128 on one reactor, resubmitted from the
//! completion callback like bdevperf: a single null bdev (the job and one
//! member IO, the floor every row stands on), raid0 and raid1 over two null
//! members (`bdev-side-by-side.sh`'s raid0-null and raid1-null: the member
//! IO costs almost nothing, so the rows measure the RAID code), and raid5
//! random writes (read-modify-write: two reads, two writes, parity) over
//! four null members and over four malloc members (issue 12's 4 KiB row).
//!
//! `cargo build --release -p bdev-raid --example per_io_cost`, then
//! `target/release/examples/per_io_cost [instructions|wall] [rows...]`:
//! - `instructions` (default): runs itself under `valgrind --tool=callgrind`
//!   once with `SHORT` and once with `LONG` IOs per row and prints
//!   (instructions(LONG) − instructions(SHORT)) / (LONG − SHORT): set-up
//!   and teardown cancel out, what is left is the steady state per IO.
//!   The callgrind files stay in `$PER_IO_COST_DIR` (default
//!   `target/per_io_cost`) for `callgrind_annotate`.
//! - `wall [seconds] [rounds]`: IOPS and IOPS per CPU-second of the reactor
//!   thread, busy polling, medians of the rounds.
//! - `one ROW COUNT` (what `instructions` runs): COUNT IOs of ROW, no output.

use bdev::malloc::{MallocBdev, NullBdev};
use bdev::rng::SimRng;
use bdev::{BdevProps, DmaBuf, IoBox, IoDone, IoType, Registry};
use bdev_raid::rpc::{bdev_raid_create, RaidCreateParams};
use reactor::{IdlePolicy, PollStatus, ReactorConfig, ReactorSet};
use std::cell::{Cell, RefCell};
use std::process::Command;
use std::rc::Rc;
use std::sync::{mpsc, Arc};

const BLOCK_SIZE: u32 = 4096;
const NULL_BLOCKS: u64 = 262_144; // 1 GiB each, as bdev-side-by-side.sh
const MALLOC_BLOCKS: u64 = 4096; // 16 MiB each: small, valgrind zeroes it
const QUEUE_DEPTH: usize = 128;
const SHORT: u64 = 20_000;
const LONG: u64 = 60_000;

#[path = "support/job.rs"]
mod job;
use job::median;

/// One row: its name, the bdev it drives, the IO type.
struct Row {
    name: &'static str,
    bdev: &'static str,
    io_type: IoType,
}

const ROWS: [Row; 8] = [
    Row { name: "null-randwrite", bdev: "Single", io_type: IoType::Write },
    Row { name: "raid0-null-randread", bdev: "Raid0", io_type: IoType::Read },
    Row { name: "raid0-null-randwrite", bdev: "Raid0", io_type: IoType::Write },
    Row { name: "raid1-null-randread", bdev: "Raid1", io_type: IoType::Read },
    Row { name: "raid1-null-randwrite", bdev: "Raid1", io_type: IoType::Write },
    Row { name: "raid5-null-randwrite", bdev: "Raid5", io_type: IoType::Write },
    Row { name: "raid5-malloc-randwrite", bdev: "MRaid5", io_type: IoType::Write },
    Row { name: "raid5-malloc-randread", bdev: "MRaid5", io_type: IoType::Read },
];

/// Creates the bdev `row` drives, and its members (on reactor 0).
fn create(set: &ReactorSet, bdev: &'static str) {
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        let null = |n: &str| {
            let b = NullBdev::new(BdevProps::new(n, "Null disk", BLOCK_SIZE, NULL_BLOCKS, None)).unwrap();
            Registry::get().register(Arc::new(b)).unwrap();
        };
        let malloc = |n: &str| {
            let b = MallocBdev::new(BdevProps::new(n, "Malloc disk", BLOCK_SIZE, MALLOC_BLOCKS, None)).unwrap();
            Registry::get().register(Arc::new(b)).unwrap();
        };
        let raid = |level: &str, strip: Option<u32>, members: &[&str]| {
            bdev_raid_create(RaidCreateParams {
                name: bdev.into(),
                raid_level: level.into(),
                base_bdevs: members.iter().map(|s| s.to_string()).collect(),
                strip_size_kb: strip,
                uuid: None,
                superblock: None,
                bitmap: None,
                bitmap_chunk_size_kb: None,
            })
            .unwrap();
        };
        let members: Vec<String> = (0..4).map(|i| format!("{bdev}_{i}")).collect();
        let m: Vec<&str> = members.iter().map(String::as_str).collect();
        match bdev {
            "Single" => null(bdev),
            "Raid0" | "Raid1" => {
                m[..2].iter().for_each(|n| null(n));
                let (level, strip) = if bdev == "Raid0" { ("raid0", Some(64)) } else { ("raid1", None) };
                raid(level, strip, &m[..2]);
            }
            "Raid5" => {
                m.iter().for_each(|n| null(n));
                raid("raid5", Some(64), &m);
            }
            "MRaid5" => {
                m.iter().for_each(|n| malloc(n));
                raid("raid5", Some(64), &m);
            }
            _ => unreachable!("a row names a bdev created here"),
        }
        let _ = tx.send(());
    });
    rx.recv().unwrap();
}

/// A closed loop of `depth` IOs that stops after `total` completions.
struct CountJob {
    ch: Rc<bdev::Channel>,
    io_type: IoType,
    rng: RefCell<SimRng>,
    span_blocks: u64,
    submitted: Cell<u64>,
    total: u64,
    in_flight: Cell<usize>,
    failed: Cell<u64>,
    me: RefCell<Option<Rc<dyn IoDone>>>,
}

impl CountJob {
    fn submit_one(&self, buf: DmaBuf) {
        if self.submitted.get() >= self.total {
            return;
        }
        self.submitted.set(self.submitted.get() + 1);
        let off = self.rng.borrow_mut().below(self.span_blocks);
        let Some(mut io) = IoBox::data(self.io_type, off, 1, Some(buf)) else {
            self.failed.set(self.failed.get() + 1);
            return;
        };
        if let Some(me) = self.me.borrow().as_ref() {
            io.set_done(me.clone());
        }
        self.in_flight.set(self.in_flight.get() + 1);
        self.ch.submit(io);
    }
}

impl IoDone for CountJob {
    fn io_done(&self, mut io: IoBox) {
        self.in_flight.set(self.in_flight.get() - 1);
        if !io.status.is_ok() {
            self.failed.set(self.failed.get() + 1);
        }
        let buf = io.buf.take();
        drop(io);
        if let Some(buf) = buf {
            self.submit_one(buf);
        }
    }
}

/// Runs `total` IOs of `io_type` against `bdev` on reactor 0; panics on errors.
fn run_count(set: &ReactorSet, bdev: &'static str, io_type: IoType, total: u64) {
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        let h = Registry::get().lookup(bdev).expect("bdev exists");
        let job = Rc::new(CountJob {
            ch: h.channel().expect("channel"),
            io_type,
            rng: RefCell::new(SimRng::new(0x5EED)),
            span_blocks: h.props().num_blocks,
            submitted: Cell::new(0),
            total,
            in_flight: Cell::new(0),
            failed: Cell::new(0),
            me: RefCell::new(None),
        });
        *job.me.borrow_mut() = Some(job.clone());
        for _ in 0..QUEUE_DEPTH {
            job.submit_one(DmaBuf::zeroed(BLOCK_SIZE as usize).expect("DMA buffer"));
        }
        let mut tx = Some(tx);
        reactor::register_poller("per_io_cost_wait", move || {
            if job.in_flight.get() > 0 {
                return PollStatus::Idle;
            }
            if let Some(tx) = tx.take() {
                let _ = tx.send(job.failed.get());
            }
            *job.me.borrow_mut() = None;
            PollStatus::Done
        });
    });
    let failed = rx.recv().expect("job finished");
    assert_eq!(failed, 0, "{bdev}: IO errors during the benchmark");
}

fn row(name: &str) -> &'static Row {
    ROWS.iter().find(|r| r.name == name).unwrap_or_else(|| {
        let names: Vec<&str> = ROWS.iter().map(|r| r.name).collect();
        panic!("unknown row {name}; rows: {}", names.join(" "))
    })
}

/// The instructions of a callgrind run (its `totals:` or `summary:` line).
fn callgrind_total(file: &str) -> u64 {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{file}: no totals line"))
}

fn instructions(rows: &[&'static Row]) {
    let exe = std::env::current_exe().expect("own path");
    let dir = std::env::var("PER_IO_COST_DIR").unwrap_or_else(|_| "target/per_io_cost".into());
    std::fs::create_dir_all(&dir).expect("output directory");
    println!("4 KiB random IO, queue depth {QUEUE_DEPTH}, one reactor; instructions per IO under callgrind");
    println!("((instructions of {LONG} IOs − of {SHORT} IOs) / {}), callgrind files in {dir}/", LONG - SHORT);
    for r in rows {
        let mut total = [0u64; 2];
        for (i, n) in [SHORT, LONG].into_iter().enumerate() {
            let out = format!("{dir}/{}.{n}.out", r.name);
            let status = Command::new("valgrind")
                .args(["--tool=callgrind", "-q", &format!("--callgrind-out-file={out}")])
                .arg(&exe)
                .args(["one", r.name, &n.to_string()])
                .status()
                .expect("valgrind (install it: apt-get install valgrind)");
            assert!(status.success(), "{}: callgrind run failed", r.name);
            total[i] = callgrind_total(&out);
        }
        let per_io = (total[1] - total[0]) as f64 / (LONG - SHORT) as f64;
        println!("  {:<24} {per_io:>8.0} instructions/IO", r.name);
    }
}

fn wall(rows: &[&'static Row], secs: f64, rounds: usize) {
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0], IdlePolicy::BusyPoll) };
    let set = ReactorSet::start(cfg, || {}).expect("reactor");
    let mut made = Vec::new();
    println!("4 KiB random IO, queue depth {QUEUE_DEPTH}, one reactor (busy poll), {secs} s per run, {rounds} rounds");
    for r in rows {
        if !made.contains(&r.bdev) {
            create(&set, r.bdev);
            made.push(r.bdev);
        }
    }
    let mut iops = vec![Vec::new(); rows.len()];
    let mut per_cpu = vec![Vec::new(); rows.len()];
    for _ in 0..rounds {
        for (i, r) in rows.iter().enumerate() {
            let (a, b) = job::run(&set, r.bdev, job::Spec::random(r.io_type, QUEUE_DEPTH), secs);
            iops[i].push(a);
            per_cpu[i].push(b);
        }
    }
    for (i, r) in rows.iter().enumerate() {
        let (a, b) = (median(iops[i].clone()), median(per_cpu[i].clone()));
        println!("  {:<24} {a:>10.0} IOPS ({b:>10.0} per CPU-second)", r.name);
    }
    set.stop();
    set.join();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map_or("instructions", String::as_str);
    let pick = |names: &[String]| -> Vec<&'static Row> {
        if names.is_empty() {
            ROWS.iter().collect()
        } else {
            names.iter().map(|n| row(n)).collect()
        }
    };
    match mode {
        "one" => {
            let r = row(args.get(1).expect("one ROW COUNT"));
            let count: u64 = args.get(2).and_then(|s| s.parse().ok()).expect("one ROW COUNT");
            // Sleeping when idle: the reactor spins little while the main
            // thread sets up, so those instructions stay nearly the same
            // from run to run and cancel out.
            let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0], IdlePolicy::sleep()) };
            let set = ReactorSet::start(cfg, || {}).expect("reactor");
            create(&set, r.bdev);
            run_count(&set, r.bdev, r.io_type, count);
            set.stop();
            set.join();
        }
        "wall" => {
            let secs: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3.0);
            let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
            wall(&pick(args.get(3..).unwrap_or_default()), secs, rounds);
        }
        "instructions" => instructions(&pick(args.get(1..).unwrap_or_default())),
        _ => instructions(&pick(&args)),
    }
}
