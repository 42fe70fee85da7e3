//! A lane-based write/verify load of 4 KiB stamped blocks on two reactors,
//! and the model checks the crash and recovery tests run after it
//! (`sb_recovery.rs` for mirrors, `raid5_superblock.rs` for raid5).
#![allow(dead_code)] // each test binary uses part of it

use super::files::BS;
use super::*;
use bdev::rng::SimRng;
use bdev::{Channel, DmaBuf, IoBox, IoStatus, IoType};
use bdev_raid::{RaidArray, RaidState};
use reactor::PollStatus;
use serde_json::Value;
use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The 4 KiB block written with `stamp` at array block `lba`.
pub fn block_of(stamp: u64, lba: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    stamp_block(&mut b, stamp, lba);
    b
}

pub fn blocks_of(stamp: u64, lba: u64, n: u64) -> Vec<u8> {
    (lba..lba + n).flat_map(|l| block_of(stamp, l)).collect()
}

pub fn block_matches(blk: &[u8], lba: u64, allowed: &[u64]) -> bool {
    allowed.iter().any(|&s| if s == 0 { blk.iter().all(|&b| b == 0) } else { blk == &block_of(s, lba)[..] })
}

/// Checks `data` (array blocks from 0) against `model` (the stamps each
/// block may hold); returns the first few blocks that differ.
pub fn model_mismatches(data: &[u8], model: &[Vec<u64>]) -> Vec<(u64, Vec<u64>, (u64, u64))> {
    let mut bad = Vec::new();
    for (lba, allowed) in model.iter().enumerate() {
        let lba = lba as u64;
        let blk = &data[(lba * BS) as usize..((lba + 1) * BS) as usize];
        if !block_matches(blk, lba, allowed) {
            bad.push((lba, allowed.clone(), block_stamp(blk)));
            if bad.len() == 5 {
                break;
            }
        }
    }
    bad
}

/// Blocks with an acknowledged write (the first stamp allowed is the last one acknowledged).
pub fn acknowledged_blocks(model: &[Vec<u64>]) -> usize {
    model.iter().filter(|a| a[0] != 0).count()
}

// ---- a lane-based write/verify load of 4 KiB blocks ---------------------------

/// Shared by the load's jobs (one per reactor) and the test thread.
#[derive(Default)]
pub struct Load {
    pub ios: AtomicU64,
    pub writes_ok: AtomicU64,
    pub write_errors: AtomicU64,
    pub read_errors: AtomicU64,
    /// Reads that returned other than the last acknowledged write.
    pub mismatches: AtomicU64,
    pub in_flight: AtomicU64,
    pub stop: AtomicBool,
    /// Jobs that stopped with nothing in flight.
    pub finished: AtomicU64,
    /// Per array block, the stamps it may hold (0: zeros, as created): the
    /// last acknowledged write's, plus those of every write submitted after
    /// it that failed or has not completed (it may or may not have landed).
    pub model: Mutex<Vec<Vec<u64>>>,
}

impl Load {
    pub fn new(array_blocks: u64) -> Arc<Load> {
        Arc::new(Load { model: Mutex::new(vec![vec![0]; array_blocks as usize]), ..Load::default() })
    }
}

/// Starts a job on reactor `r`: each lane (a range of array blocks no other
/// lane touches) has one IO at a time, alternating a write of 1..=16 blocks
/// and a verified read, until `load.stop` or the first failed IO.
pub fn start_job(set: &Set, r: usize, writer: u64, seed: u64, lanes: Vec<Range<u64>>, load: Arc<Load>) {
    set.call(r, move || {
        struct Lane {
            range: Range<u64>,
            busy: Cell<bool>,
            write_next: Cell<bool>,
            pending: Cell<(u64, u64, u64)>,
        }
        struct Job {
            ch: Rc<Channel>,
            lanes: Vec<Lane>,
            rng: RefCell<SimRng>,
            seq: Cell<u64>,
            in_flight: Cell<u64>,
            /// An IO failed (the array is going away): submit nothing more.
            halted: Cell<bool>,
            load: Arc<Load>,
        }
        let h = Registry::get().lookup("R").expect("raid bdev");
        let job = Rc::new(Job {
            ch: h.channel().unwrap(),
            lanes: lanes
                .into_iter()
                .map(|range| Lane {
                    range,
                    busy: Cell::new(false),
                    write_next: Cell::new(true),
                    pending: Cell::new((0, 0, 0)),
                })
                .collect(),
            rng: RefCell::new(SimRng::new(seed)),
            seq: Cell::new(1),
            in_flight: Cell::new(0),
            halted: Cell::new(false),
            load,
        });
        let j2 = job.clone();
        let on_done: Rc<dyn bdev::IoDone> = Rc::new(move |io: IoBox| {
            let j = &j2;
            let lane = &j.lanes[io.tag as usize];
            let (off, n, stamp) = lane.pending.get();
            if !io.status.is_ok() {
                j.halted.set(true);
            }
            {
                let mut model = j.load.model.lock().unwrap();
                let blocks = &mut model[off as usize..(off + n) as usize];
                match (io.io_type, io.status) {
                    (IoType::Write, IoStatus::Success) => {
                        blocks.fill(vec![stamp]);
                        j.load.writes_ok.fetch_add(1, Ordering::Relaxed);
                    }
                    (IoType::Write, _) => {
                        j.load.write_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    (IoType::Read, IoStatus::Success) => io.buf.as_ref().unwrap().with(|b| {
                        for (i, want) in blocks.iter().enumerate() {
                            let lba = off + i as u64;
                            let got = &b[i * BS as usize..(i + 1) * BS as usize];
                            if !block_matches(got, lba, want) && j.load.mismatches.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!(
                                    "MISMATCH lba {lba}: want {want:x?}, got (stamp, lba) {:x?}",
                                    block_stamp(got)
                                );
                            }
                        }
                    }),
                    (IoType::Read, _) => {
                        j.load.read_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            lane.busy.set(false);
            j.in_flight.set(j.in_flight.get() - 1);
            j.load.in_flight.fetch_sub(1, Ordering::AcqRel);
            j.load.ios.fetch_add(1, Ordering::Relaxed);
        });
        reactor::register_poller("sb_recovery_load", move || {
            let j = &job;
            if j.load.stop.load(Ordering::Acquire) {
                if j.in_flight.get() > 0 {
                    return PollStatus::Idle;
                }
                j.load.finished.fetch_add(1, Ordering::AcqRel);
                return PollStatus::Done;
            }
            if j.halted.get() {
                return PollStatus::Idle;
            }
            let mut busy = false;
            for (li, lane) in j.lanes.iter().enumerate() {
                if lane.busy.get() {
                    continue;
                }
                let len = lane.range.end - lane.range.start;
                let (off, n) = {
                    let mut rng = j.rng.borrow_mut();
                    let n = 1 + rng.below(16.min(len));
                    (lane.range.start + rng.below(len - n + 1), n)
                };
                let Some(buf) = DmaBuf::alloc((n * BS) as usize) else { break };
                let write = lane.write_next.get();
                let seq = j.seq.get();
                let stamp = writer << 40 | seq;
                if write {
                    buf.with_mut(|b| {
                        for (i, blk) in b.chunks_exact_mut(BS as usize).enumerate() {
                            stamp_block(blk, stamp, off + i as u64);
                        }
                    });
                }
                let t = if write { IoType::Write } else { IoType::Read };
                let Some(mut io) = IoBox::data(t, off, n, Some(buf)) else { break };
                j.seq.set(seq + 1);
                lane.write_next.set(!write);
                if write {
                    // Old or new data until acknowledged (a crash or failure may leave either).
                    for a in &mut j.load.model.lock().unwrap()[off as usize..(off + n) as usize] {
                        a.push(stamp);
                    }
                }
                io.tag = li as u64;
                io.set_done(on_done.clone());
                lane.busy.set(true);
                lane.pending.set((off, n, stamp));
                j.in_flight.set(j.in_flight.get() + 1);
                j.load.in_flight.fetch_add(1, Ordering::AcqRel);
                j.ch.submit(io);
                busy = true;
            }
            if busy {
                PollStatus::Busy
            } else {
                PollStatus::Idle
            }
        });
    });
}

/// Runs `load` on reactors 0 and 1, lanes split between them alternately.
pub fn start_load(set: &Set, seed: u64, lanes: Vec<Range<u64>>, load: &Arc<Load>) {
    for r in 0..2usize {
        let mine: Vec<Range<u64>> = lanes.iter().skip(r).step_by(2).cloned().collect();
        start_job(set, r, r as u64 + 1, seed.wrapping_add(r as u64), mine, load.clone());
    }
}

pub fn wait_until(secs: u64, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---- the array "R" of these tests ----------------------------------------------

pub fn info(set: &Set) -> Value {
    set.call(0, || RaidArray::find("R").expect("array R").info_json())
}

pub fn copied(set: &Set) -> u64 {
    set.call(0, || RaidArray::find("R").expect("array R").copied_blocks())
}

/// (data offset on every member, array blocks), both in blocks.
pub fn layout(set: &Set) -> (u64, u64) {
    let i = info(set);
    let off = i["base_bdevs_list"][0]["data_offset"].as_u64().unwrap();
    let blocks = set.call(0, || RaidArray::find("R").unwrap().geometry().unwrap().array_blocks());
    (off, blocks)
}

/// Online, every slot active, no resync or rebuild pending or running, and
/// every examination decided: registering "R" runs the examiners on it, and
/// the raid examiner's superblock read of R is a member read that may still
/// be in flight when R is already online (a test counting member IO would
/// count it as its own).
pub fn wait_settled(set: &Set, secs: u64) {
    set.wait_for(secs, "array online, in sync, no process, examinations done", || {
        RaidArray::find("R")
            .is_some_and(|r| r.state() == RaidState::Online && !r.process_running() && r.members().iter().all(|m| m.1))
            && Registry::get().examines_pending() == 0
    });
}
