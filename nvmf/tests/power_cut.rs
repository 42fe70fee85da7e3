//! A seeded power-cut storm through the NVMe/TCP target: nvraid's initiator
//! writes stamped blocks (`bdev::stamp`) from several queues, some writes
//! with FUA, with flushes in between, to a namespace over a
//! `VolatileCacheBdev` whose destager writes random cached blocks back on
//! its own. Mid-storm the power goes. Every write acknowledged with FUA, and
//! every write acknowledged before a flush that was submitted after it and
//! completed, must be on the media then (or a later write to its blocks).
//!
//! The seed is printed; `NVMF_TEST_SEED` replays its choices (thread timing
//! still varies). Without the target's FUA mapping, or without its flush
//! forwarding, this test fails.

mod common;
use bdev::stamp::{read_stamp, stamp_buffer};
use bdev::volatile_cache::VolatileCacheBdev;
use bdev::{BdevProps, DmaBuf, IoFlags, Registry};
use common::*;
use nvmf::host::HostQpair;
use nvmf::TransportOpts;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const BS: usize = 512;
const QUEUES: usize = 3;
/// Blocks each queue owns (queues write disjoint regions, so every block's
/// writes are ordered by the one queue that issues them).
const REGION: u64 = 1024;
const OPS_PER_QUEUE: u64 = 1500;
const DEPTH: usize = 16;

/// One acknowledged write of a block.
#[derive(Clone, Copy)]
struct Acked {
    seq: u64,
    fua: bool,
    /// Order of the acknowledgement among all events.
    acked_at: u64,
}

#[derive(Default)]
struct Log {
    /// Block -> its acknowledged writes.
    writes: HashMap<u64, Vec<Acked>>,
    /// Latest `submitted_at` of a flush that completed successfully.
    flushed_before: u64,
}

struct Shared {
    log: Mutex<Log>,
    /// Orders acknowledgements and flush submissions across queues.
    clock: AtomicU64,
    seq: AtomicU64,
    completed: AtomicU64,
    power_off: AtomicBool,
}

enum Inflight {
    Write { lba: u64, nlb: u32, seq: u64, fua: bool },
    Flush { submitted_at: u64 },
}

fn run_queue(mut qp: HostQpair, q: usize, seed: u64, sh: Arc<Shared>) {
    let mut rng = Rng(seed ^ (q as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let base = q as u64 * REGION;
    let mut inflight: HashMap<u64, Inflight> = HashMap::new();
    let mut next_tag = 0u64;
    let mut issued = 0u64;
    let mut failed = false;
    let t0 = Instant::now();
    while (issued < OPS_PER_QUEUE && !failed) || !inflight.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(60), "queue {q} stuck (seed {seed})");
        while issued < OPS_PER_QUEUE && !failed && inflight.len() < DEPTH {
            let tag = next_tag;
            next_tag += 1;
            if rng.below(150) == 0 {
                let submitted_at = sh.clock.fetch_add(1, Ordering::SeqCst);
                qp.flush(1, tag).unwrap();
                inflight.insert(tag, Inflight::Flush { submitted_at });
                issued += 1;
                continue;
            }
            let span = if rng.below(4) == 0 { 32 } else { 8 };
            let nlb = 1 + rng.below(span) as u32;
            let lba = base + rng.below(REGION - u64::from(nlb) + 1);
            // One write at a time per block: its order is then known.
            let busy = inflight.values().any(|f| match f {
                Inflight::Write { lba: l, nlb: n, .. } => lba < l + u64::from(*n) && *l < lba + u64::from(nlb),
                Inflight::Flush { .. } => false,
            });
            if busy {
                break;
            }
            let seq = sh.seq.fetch_add(1, Ordering::SeqCst) + 1;
            let fua = rng.below(4) == 0;
            let len = nlb as usize * BS;
            let buf = DmaBuf::alloc(len).unwrap().slice(0, len);
            buf.with_mut(|b| stamp_buffer(b, BS, lba, seq, seed));
            let flags = if fua { IoFlags::FUA } else { IoFlags::NONE };
            qp.write_with(1, lba, nlb, buf, tag, flags).unwrap();
            inflight.insert(tag, Inflight::Write { lba, nlb, seq, fua });
            issued += 1;
        }
        let mut done = Vec::new();
        qp.poll(|c| done.push(c)).unwrap_or_else(|e| panic!("queue {q}: {e} (seed {seed})"));
        for c in done {
            let Some(f) = inflight.remove(&c.tag) else { panic!("unknown tag {} (seed {seed})", c.tag) };
            sh.completed.fetch_add(1, Ordering::Relaxed);
            if !c.status.is_success() {
                assert!(
                    sh.power_off.load(Ordering::SeqCst),
                    "IO failed before the power cut: {:?} (seed {seed})",
                    c.status
                );
                failed = true;
                continue;
            }
            let mut log = sh.log.lock().unwrap();
            match f {
                Inflight::Write { lba, nlb, seq, fua } => {
                    let acked_at = sh.clock.fetch_add(1, Ordering::SeqCst);
                    for b in lba..lba + u64::from(nlb) {
                        log.writes.entry(b).or_default().push(Acked { seq, fua, acked_at });
                    }
                }
                Inflight::Flush { submitted_at } => log.flushed_before = log.flushed_before.max(submitted_at),
            }
        }
        std::thread::sleep(Duration::from_micros(20));
    }
}

#[test]
fn acknowledged_durable_writes_survive_a_power_cut() {
    let seed = seed();
    eprintln!("seed {seed} (replay with NVMF_TEST_SEED={seed})");
    let blocks = QUEUES as u64 * REGION;
    let (tx, rx) = mpsc::channel();
    let t = start_target_with(2, TransportOpts::default(), move || {
        let props = BdevProps::new("Cache0", "volatile cache", BS as u32, blocks, None);
        // The destager writes one random cached block back every 8 writes.
        let b = Arc::new(VolatileCacheBdev::new(props, seed, 8).unwrap());
        Registry::get().register(b.clone()).unwrap();
        tx.send(b).unwrap();
        vec!["Cache0".into()]
    });
    let cache = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let s = session_no_kato(t.port, QUEUES as u16);
    assert!(s.info.volatile_write_cache, "the target must report the cache");
    let sh = Arc::new(Shared {
        log: Mutex::new(Log::default()),
        clock: AtomicU64::new(1),
        seq: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        power_off: AtomicBool::new(false),
    });
    let mut rng = Rng(seed | 1);
    let total = QUEUES as u64 * OPS_PER_QUEUE;
    let cut_after = total * (40 + rng.below(50)) / 100;
    let threads: Vec<_> =
        s.io.into_iter()
            .enumerate()
            .map(|(q, parts)| {
                let sh = sh.clone();
                std::thread::spawn(move || run_queue(HostQpair::from_parts(parts), q, seed, sh))
            })
            .collect();
    let t0 = Instant::now();
    while sh.completed.load(Ordering::Relaxed) < cut_after {
        assert!(t0.elapsed() < Duration::from_secs(60), "storm too slow (seed {seed})");
        std::thread::sleep(Duration::from_micros(200));
    }
    sh.power_off.store(true, Ordering::SeqCst);
    let lost = cache.power_cut();
    for th in threads {
        th.join().unwrap_or_else(|_| panic!("a queue thread failed (seed {seed})"));
    }
    let c = cache.counters();
    eprintln!(
        "power cut after {} completions: {} writes ({} FUA), {} flushes, {} cached blocks lost",
        cut_after, c.writes, c.fua_writes, c.flushes, lost
    );

    let log = sh.log.lock().unwrap();
    let mut checked = 0;
    let mut block = vec![0u8; BS];
    for (&lba, writes) in &log.writes {
        let durable = writes.iter().filter(|w| w.fua || w.acked_at < log.flushed_before).map(|w| w.seq).max();
        let Some(need) = durable else { continue };
        checked += 1;
        assert!(cache.read_media(lba as usize * BS, &mut block));
        let found = read_stamp(&block);
        let ok = matches!(found, Ok(st) if st.lba == lba && st.seed == seed && st.seq >= need);
        assert!(
            ok,
            "block {lba}: write seq {need} was acknowledged durable but the media holds {found:?} (seed {seed})"
        );
    }
    eprintln!("{checked} blocks had a durable write; all survived");
    assert!(checked > 0, "nothing was durable: the test checked nothing (seed {seed})");
    // The bdev saw FUA writes and flushes: the storm exercised both paths.
    assert!(c.fua_writes > 0 && c.flushes > 0, "the storm must exercise FUA and flush (seed {seed})");
}
