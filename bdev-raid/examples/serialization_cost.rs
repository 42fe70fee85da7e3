//! Benchmark (not a test): what array-level write serialization costs, and
//! raid0/raid1 IOPS against a single member. One reactor (busy poll), 4 KiB
//! random IO at queue depth 128, resubmitted from the completion callback
//! like bdevperf. Members are null bdevs (pure stack overhead, no data
//! copies: the worst case for a relative cost) and, for the serialization
//! figure, also malloc bdevs (a memory copy per member write).
//!
//! `cargo run --release -p bdev-raid --example serialization_cost [seconds_per_run] [rounds] [on|off]`
//! (`on`/`off`: only raid1 writes with serialization on or off, to profile one).
//!
//! Serialization on and off alternate for `rounds` rounds; the median of
//! each is reported. Besides wall-clock IOPS it reports IOPS per CPU-second
//! of the reactor thread (`/proc/thread-self/schedstat`), which discounts
//! the time other processes took the core: on a shared machine that is the
//! figure to compare. Rerun to see the spread.

use bdev::malloc::{MallocBdev, NullBdev};
use bdev::{BdevProps, IoType, Registry};
use bdev_raid::rpc::{bdev_raid_create, RaidCreateParams};
use bdev_raid::RaidArray;
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use std::sync::{mpsc, Arc};

const BLOCK_SIZE: u32 = 4096;
const NULL_BLOCKS: u64 = 1 << 24; // 64 GiB each
const QUEUE_DEPTH: usize = 128;
const MALLOC_BLOCKS: u64 = 16384; // 64 MiB each

#[path = "support/job.rs"]
mod job;
use job::{median, run, Spec};

fn main() {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let only: Option<bool> = args.next().map(|m| m == "on");
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0], IdlePolicy::BusyPoll) };
    let set = ReactorSet::start(cfg, || {}).expect("reactor");
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        for n in ["N0", "N1", "N2", "N3", "Single"] {
            let b = NullBdev::new(BdevProps::new(n, "Null disk", BLOCK_SIZE, NULL_BLOCKS, None)).unwrap();
            Registry::get().register(Arc::new(b)).unwrap();
        }
        let mk = |name: &str, level: &str, strip: Option<u32>, members: [&str; 2]| {
            bdev_raid_create(RaidCreateParams {
                name: name.into(),
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
        for n in ["M0", "M1"] {
            let b = MallocBdev::new(BdevProps::new(n, "Malloc disk", BLOCK_SIZE, MALLOC_BLOCKS, None)).unwrap();
            Registry::get().register(Arc::new(b)).unwrap();
        }
        mk("Raid1", "raid1", None, ["N0", "N1"]);
        mk("MRaid1", "raid1", None, ["M0", "M1"]);
        mk("Raid0", "raid0", Some(64), ["N2", "N3"]);
        let _ = tx.send(());
    });
    rx.recv().unwrap();

    println!("4 KiB random IO, queue depth {QUEUE_DEPTH}, one reactor (busy poll), null members, {secs} s per run");
    println!();
    if let Some(on) = only {
        set.send(0, move || RaidArray::find("Raid1").unwrap().set_serialization(on));
        let (iops, per_cpu) = run(&set, "Raid1", Spec::random(IoType::Write, QUEUE_DEPTH), secs);
        println!("raid1 write, serialization {on}: {iops:.0} IOPS ({per_cpu:.0} per CPU-second)");
        set.stop();
        set.join();
        return;
    }
    for (raid, what) in [("Raid1", "null"), ("MRaid1", "malloc")] {
        println!("raid1 over two {what} bdevs, random write, serialization on vs off ({rounds} rounds, alternating):");
        let set_ser = |on: bool| {
            set.send(0, move || RaidArray::find(raid).unwrap().set_serialization(on));
        };
        let (mut on, mut off, mut on_cpu, mut off_cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            set_ser(true);
            let (a, a_cpu) = run(&set, raid, Spec::random(IoType::Write, QUEUE_DEPTH), secs);
            set_ser(false);
            let (b, b_cpu) = run(&set, raid, Spec::random(IoType::Write, QUEUE_DEPTH), secs);
            println!("  round {round}: on {a:>9.0} IOPS ({a_cpu:>9.0}/cpu-s)   off {b:>9.0} IOPS ({b_cpu:>9.0}/cpu-s)");
            on.push(a);
            off.push(b);
            on_cpu.push(a_cpu);
            off_cpu.push(b_cpu);
        }
        set_ser(true);
        let (m_on, m_off) = (median(on), median(off));
        let (c_on, c_off) = (median(on_cpu), median(off_cpu));
        println!("  median wall: on {m_on:.0} IOPS, off {m_off:.0} IOPS, cost {:.2} %", (m_off - m_on) / m_off * 100.0);
        println!(
            "  median per CPU-second: on {c_on:.0}, off {c_off:.0}, serialization cost {:.2} %",
            (c_off - c_on) / c_off * 100.0
        );
        println!();
    }
    println!("against a single member:");
    for (bdev, t) in [
        ("Single", IoType::Read),
        ("Single", IoType::Write),
        ("Raid0", IoType::Read),
        ("Raid0", IoType::Write),
        ("Raid1", IoType::Read),
        ("Raid1", IoType::Write),
    ] {
        let (iops, per_cpu) = run(&set, bdev, Spec::random(t, QUEUE_DEPTH), secs);
        println!("  {bdev:<7} {:<6} {iops:>10.0} IOPS  ({per_cpu:>10.0} per CPU-second)", t.name());
    }
    set.stop();
    set.join();
}
