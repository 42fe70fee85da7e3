//! Benchmark (not a test): what the write-intent bitmap costs a raid1 write
//! path. Goal: at most 3 %. One reactor (busy poll), 4 KiB random writes at
//! queue depth 128, resubmitted from the completion callback like
//! bdevperf, to raid1 arrays over two malloc bdevs each:
//! - `On`:   superblock and bitmap (default 64 MiB chunks);
//! - `Off`:  superblock, `bitmap: false` (the only difference from `On`);
//! - `NoSb`: no superblock at all (reference).
//!
//! `cargo run --release -p bdev-raid --example bitmap_cost [seconds_per_run] [rounds] [member_mib]`
//! (defaults 3 s, 5 rounds, 1024 MiB members: six of them are allocated).
//!
//! Every array is first written end to end (so no run pays the members'
//! first-touch page faults), then the three run in turn for `rounds` rounds;
//! medians are reported, as wall-clock IOPS and as IOPS per CPU-second of
//! the reactor thread (`/proc/thread-self/schedstat`), which discounts the
//! time other processes took the core: on a shared machine that is the
//! figure to compare. The bitmap's tick runs on the same reactor, so its
//! cost is in the figures. Rerun to see the spread.

use bdev::malloc::MallocBdev;
use bdev::{BdevError, BdevProps, IoType, Registry};
use bdev_raid::rpc::{bdev_raid_create, bdev_raid_create_async, RaidCreateParams};
use bdev_raid::RaidArray;
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use serde_json::Value;
use std::sync::{mpsc, Arc};
use std::time::Duration;

const BLOCK_SIZE: u32 = 4096;
const QUEUE_DEPTH: usize = 128;
/// The sequential fill: 128 KiB writes, 32 in flight.
const FILL_BLOCKS: u64 = 32;
const FILL_DEPTH: usize = 32;
const ARRAYS: [&str; 3] = ["On", "Off", "NoSb"];

/// The bitmap counters of array `On`: (batches written, pages written, writes waited, dirty chunks).
fn bitmap_stats(set: &ReactorSet) -> (u64, u64, u64, usize) {
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        let bm = RaidArray::find("On").and_then(|r| r.bitmap()).expect("array On has a bitmap");
        let _ = tx.send((bm.batches_written(), bm.pages_written(), bm.writes_waited(), bm.dirty_chunks().len()));
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("reactor answers")
}

#[path = "support/job.rs"]
mod job;
use job::{median, run, Spec};

fn main() {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5).max(1);
    let member_mib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let member_blocks = (member_mib << 20) / BLOCK_SIZE as u64;
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0], IdlePolicy::BusyPoll) };
    let set = ReactorSet::start(cfg, || {}).expect("reactor");

    let (tx, rx) = mpsc::channel::<Result<Value, BdevError>>();
    set.send(0, move || {
        let params = |name: &str, superblock: Option<bool>, bitmap: Option<bool>| RaidCreateParams {
            name: name.into(),
            raid_level: "raid1".into(),
            base_bdevs: vec![format!("{name}0"), format!("{name}1")],
            strip_size_kb: None,
            uuid: None,
            superblock,
            bitmap,
            bitmap_chunk_size_kb: None,
        };
        for a in ARRAYS {
            for i in 0..2 {
                let props = BdevProps::new(&format!("{a}{i}"), "Malloc disk", BLOCK_SIZE, member_blocks, None);
                Registry::get().register(Arc::new(MallocBdev::new(props).unwrap())).unwrap();
            }
        }
        let t = tx.clone();
        bdev_raid_create_async(params("On", Some(true), None), move |r| {
            let _ = t.send(r);
        });
        let t = tx.clone();
        bdev_raid_create_async(params("Off", Some(true), Some(false)), move |r| {
            let _ = t.send(r);
        });
        let _ = tx.send(bdev_raid_create(params("NoSb", None, None)));
    });
    for _ in ARRAYS {
        rx.recv_timeout(Duration::from_secs(60)).expect("create answered").expect("create succeeded");
    }
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        let bm = RaidArray::find("On").and_then(|r| r.bitmap()).expect("array On has a bitmap");
        let g = *bm.geometry();
        let blocks = |n: &str| Registry::get().lookup(n).unwrap().props().num_blocks;
        let have_bitmap = |n: &str| RaidArray::find(n).unwrap().bitmap().is_some();
        let _ = tx.send((g.num_chunks(), blocks("On"), blocks("NoSb"), have_bitmap("Off")));
    });
    let (chunks, on_blocks, nosb_blocks, off_has_bitmap) = rx.recv().unwrap();
    assert!(!off_has_bitmap, "array Off was created with bitmap: false");

    println!(
        "raid1 over two {member_mib} MiB malloc bdevs, one reactor (busy poll), 4 KiB random write, queue depth \
         {QUEUE_DEPTH}, {secs} s per run"
    );
    println!(
        "array blocks: On/Off {on_blocks} (superblock), NoSb {nosb_blocks}; On's bitmap: {chunks} chunks of 64 MiB"
    );
    for a in ARRAYS {
        let t = std::time::Instant::now();
        run(
            &set,
            a,
            Spec {
                io_type: IoType::Write,
                blocks_per_io: FILL_BLOCKS,
                depth: FILL_DEPTH,
                sequential: true,
                wrap: false,
            },
            600.0,
        );
        println!("  filled {a} in {:.1} s", t.elapsed().as_secs_f64());
    }
    let before = bitmap_stats(&set);
    println!();
    println!("rounds (order On, Off, NoSb):");
    let mut wall: [Vec<f64>; 3] = Default::default();
    let mut cpu: [Vec<f64>; 3] = Default::default();
    let mut on_ios = 0.0;
    for round in 0..rounds {
        let mut line = format!("  round {round}:");
        for (i, a) in ARRAYS.into_iter().enumerate() {
            let (iops, per_cpu) = run(&set, a, Spec::random(IoType::Write, QUEUE_DEPTH), secs);
            if i == 0 {
                on_ios += iops * secs;
            }
            line += &format!("  {a} {iops:>8.0} ({per_cpu:>8.0}/cpu-s)");
            wall[i].push(iops);
            cpu[i].push(per_cpu);
        }
        println!("{line}");
    }
    let after = bitmap_stats(&set);
    let [w_on, w_off, w_nosb] = wall.map(median);
    let [c_on, c_off, c_nosb] = cpu.map(median);
    let cost = |on: f64, off: f64| (off - on) / off * 100.0;
    println!();
    println!("medians          wall IOPS   IOPS per CPU-second");
    println!("  On  (bitmap)  {w_on:>10.0}  {c_on:>10.0}");
    println!("  Off (sb only) {w_off:>10.0}  {c_off:>10.0}");
    println!("  NoSb          {w_nosb:>10.0}  {c_nosb:>10.0}");
    println!(
        "bitmap cost (On vs Off): {:.2} % wall, {:.2} % per CPU-second (goal <= 3 %)",
        cost(w_on, w_off),
        cost(c_on, c_off)
    );
    println!(
        "superblock-only cost (Off vs NoSb): {:.2} % wall, {:.2} % per CPU-second",
        cost(w_off, w_nosb),
        cost(c_off, c_nosb)
    );
    println!();
    println!(
        "On's bitmap during the {rounds} random-write runs (~{on_ios:.0} writes): {} batches written, {} pages \
         written, {} writes waited; {} of {chunks} chunks dirty now",
        after.0 - before.0,
        after.1 - before.1,
        after.2 - before.2,
        after.3
    );
    println!("  totals since create (fill included): {} batches, {} writes waited", after.0, after.2);
    set.stop();
    set.join();
}
