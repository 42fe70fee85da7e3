//! Benchmark (not a test): what raid5 parity costs on full-stripe writes.
//! Four malloc members (64 KiB strips), one reactor (busy poll): raid5
//! writing whole stripes (3 × 64 KiB = 192 KiB of user data, P computed
//! with no reads) against raid0 of the same four members writing 256 KiB
//! stripes, sequential with wrap-around, in alternating rounds of the same
//! run. With RAM members everything is memcpy-bound, so the ratio isolates
//! the parity cost; issue 12 asks for raid5 user-data bandwidth at least
//! 0.9 × 3/4 × raid0's. Also prints partial-stripe rows that SPDK's raid5f
//! refuses (reconstruct-write) and 4 KiB random reads, and the same partial
//! writes on raid5 with a superblock (bitmap and partial parity log) with
//! the log on and switched off: what closing the write hole costs. A raid6 row runs in
//! the same rounds: raid6 of the same four members writing whole stripes
//! (2 × 64 KiB of user data, P and Q computed with no reads).
//!
//! `cargo run --release -p bdev-raid --example raid5_speed [seconds_per_run] [rounds] [queue_depth]`
//!
//! Reports wall-clock bandwidth and bandwidth per CPU-second of the reactor
//! thread (`/proc/thread-self/schedstat`), which discounts time other
//! processes took the core: on a shared machine that is the one to compare.

use bdev::malloc::MallocBdev;
use bdev::{BdevProps, IoType, Registry};
use bdev_raid::rpc::{bdev_raid_create, bdev_raid_create_async, bdev_raid_delete, RaidCreateParams, RaidDeleteParams};
use bdev_raid::RaidArray;
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use std::sync::{mpsc, Arc};

const BLOCK_SIZE: u32 = 4096;
const MEMBER_BLOCKS: u64 = 65536; // 256 MiB each
const STRIP_KB: u32 = 64;
const MEMBERS: [&str; 4] = ["M0", "M1", "M2", "M3"];

#[path = "support/job.rs"]
mod job;
use job::{median, run, Spec};

/// Creates `R` at `level` over the four members (on reactor 0).
fn create(set: &ReactorSet, level: &'static str) {
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        bdev_raid_create(RaidCreateParams {
            name: "R".into(),
            raid_level: level.into(),
            base_bdevs: MEMBERS.iter().map(|s| s.to_string()).collect(),
            strip_size_kb: Some(STRIP_KB),
            uuid: None,
            superblock: None,
            bitmap: None,
            bitmap_chunk_size_kb: None,
        })
        .expect("create R");
        let _ = tx.send(());
    });
    rx.recv().unwrap();
}

/// Creates raid5 `R` with a superblock (bitmap and partial parity log)
/// over the four members, the log on or switched off (on reactor 0).
fn create_sb(set: &ReactorSet, log: bool) {
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        let params = RaidCreateParams {
            name: "R".into(),
            raid_level: "raid5".into(),
            base_bdevs: MEMBERS.iter().map(|s| s.to_string()).collect(),
            strip_size_kb: Some(STRIP_KB),
            uuid: None,
            superblock: Some(true),
            bitmap: None,
            bitmap_chunk_size_kb: None,
        };
        bdev_raid_create_async(params, move |r| {
            r.expect("create R with a superblock");
            let r = RaidArray::find("R").expect("R");
            assert!(r.has_partial_parity_log());
            r.set_partial_parity_log(log);
            let _ = tx.send(());
        });
    });
    rx.recv().unwrap();
}

/// (MiB/s, MiB/s per CPU-second) of `spec` on a fresh raid5 with a
/// superblock, its partial parity log on or off.
fn measure_sb(set: &ReactorSet, log: bool, spec: Spec, secs: f64) -> (f64, f64) {
    create_sb(set, log);
    let (iops, per_cpu) = run(set, "R", spec, secs);
    delete_clearing(set, true);
    let mib = (spec.blocks_per_io * u64::from(BLOCK_SIZE)) as f64 / (1024.0 * 1024.0);
    (iops * mib, per_cpu * mib)
}

fn delete(set: &ReactorSet) {
    delete_clearing(set, false);
}

fn delete_clearing(set: &ReactorSet, clear_sb: bool) {
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        bdev_raid_delete(RaidDeleteParams { name: "R".into(), clear_sb: Some(clear_sb) }, move |r| {
            r.expect("delete R");
            let _ = tx.send(());
        });
    });
    rx.recv().unwrap();
}

/// Queue depth of every run (third argument, default 32).
static QUEUE_DEPTH: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

fn queue_depth() -> usize {
    *QUEUE_DEPTH.get().unwrap_or(&32)
}

/// (MiB/s of user data, MiB/s per CPU-second) of `spec` on a fresh `level` array.
fn measure(set: &ReactorSet, level: &'static str, spec: Spec, secs: f64) -> (f64, f64) {
    create(set, level);
    let (iops, per_cpu) = run(set, "R", spec, secs);
    delete(set);
    let mib = (spec.blocks_per_io * u64::from(BLOCK_SIZE)) as f64 / (1024.0 * 1024.0);
    (iops * mib, per_cpu * mib)
}

fn seq_write(kib: u64) -> Spec {
    Spec {
        io_type: IoType::Write,
        blocks_per_io: kib * 1024 / u64::from(BLOCK_SIZE),
        depth: queue_depth(),
        sequential: true,
        wrap: true,
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let _ = QUEUE_DEPTH.set(args.next().and_then(|s| s.parse().ok()).unwrap_or(32));
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0], IdlePolicy::BusyPoll) };
    let set = ReactorSet::start(cfg, || {}).expect("reactor");
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        for n in MEMBERS {
            let b = MallocBdev::new(BdevProps::new(n, "Malloc disk", BLOCK_SIZE, MEMBER_BLOCKS, None)).unwrap();
            Registry::get().register(Arc::new(b)).unwrap();
        }
        let _ = tx.send(());
    });
    rx.recv().unwrap();
    println!(
        "4 malloc members, {STRIP_KB} KiB strips, queue depth {}, one reactor (busy poll), \
         parity kernels: {}, {secs} s per run",
        queue_depth(),
        parity::implementation_name()
    );
    println!("full stripes, sequential: raid5 192 KiB writes vs raid0 256 KiB writes, alternating ({rounds} rounds):");
    let (mut r5, mut r0, mut r5c, mut r0c) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut r6, mut r6c) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (a, ac) = measure(&set, "raid5", seq_write(192), secs);
        let (b, bc) = measure(&set, "raid0", seq_write(256), secs);
        let (c, cc) = measure(&set, "raid6", seq_write(128), secs);
        println!(
            "  round {round}: raid5 {a:>7.0} MiB/s ({ac:>7.0}/cpu-s)   raid0 {b:>7.0} MiB/s ({bc:>7.0}/cpu-s)   \
             ratio {:.3} ({:.3}/cpu-s)   raid6 128 KiB {c:>7.0} MiB/s ({cc:>7.0}/cpu-s)",
            a / b,
            ac / bc
        );
        r5.push(a);
        r0.push(b);
        r5c.push(ac);
        r0c.push(bc);
        r6.push(c);
        r6c.push(cc);
    }
    let (c, cc) = (median(r6), median(r6c));
    let (a, b, ac, bc) = (median(r5), median(r0), median(r5c), median(r0c));
    println!(
        "  median: raid5 {a:.0} MiB/s, raid0 {b:.0} MiB/s: raid5 / raid0 = {:.3} wall, {:.3} per CPU-second \
         (goal ≥ 0.9 × 3/4 = 0.675)",
        a / b,
        ac / bc
    );
    println!(
        "  median: raid6 {c:.0} MiB/s: raid6 / raid0 = {:.3} wall, {:.3} per CPU-second (user-data share 2/4 = 0.5)",
        c / b,
        cc / bc
    );
    println!();
    println!("raid5 rows that raid5f refuses (partial stripes: reconstruct-write), and reads:");
    for (what, spec) in [
        ("64 KiB sequential writes (one chunk of three)", seq_write(64)),
        ("128 KiB sequential writes (two chunks of three)", seq_write(128)),
        ("4 KiB random writes", Spec::random(IoType::Write, queue_depth())),
        ("4 KiB random reads", Spec::random(IoType::Read, queue_depth())),
    ] {
        let (mib, per_cpu) = measure(&set, "raid5", spec, secs);
        let iops = mib * 1024.0 * 1024.0 / (spec.blocks_per_io * u64::from(BLOCK_SIZE)) as f64;
        println!("  {what:<48} {mib:>7.0} MiB/s {iops:>9.0} IOPS ({per_cpu:>7.0} MiB/cpu-s)");
    }
    println!();
    println!("raid5 with a superblock (bitmap), partial writes: partial parity log on vs off (alternating, {rounds} rounds):");
    for (what, spec) in [
        ("64 KiB sequential writes (one chunk of three)", seq_write(64)),
        ("4 KiB random writes", Spec::random(IoType::Write, queue_depth())),
    ] {
        let (mut on, mut off, mut onc, mut offc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (a, ac) = measure_sb(&set, true, spec, secs);
            let (b, bc) = measure_sb(&set, false, spec, secs);
            on.push(a);
            onc.push(ac);
            off.push(b);
            offc.push(bc);
        }
        let iops = |mib: f64| mib * 1024.0 * 1024.0 / (spec.blocks_per_io * u64::from(BLOCK_SIZE)) as f64;
        let (a, ac, b, bc) = (median(on), median(onc), median(off), median(offc));
        println!(
            "  {what:<48} log on {a:>7.0} MiB/s {:>9.0} IOPS ({ac:>7.0}/cpu-s)   log off {b:>7.0} MiB/s {:>9.0} IOPS \
             ({bc:>7.0}/cpu-s)   on/off {:.3} ({:.3}/cpu-s)",
            iops(a),
            iops(b),
            a / b,
            ac / bc
        );
    }
    set.stop();
    set.join();
}
