//! Loom model of the bitmap batch protocol: the real `Bitmap` (per-chunk
//! counters, pending and on-disk words, `seq_flush`/`seq_write`) and the
//! real `Planner`, with writers on two threads and the tick on a third (the
//! model's main thread). The members' page write is an atomic "persisted"
//! image the tick stores between closing a batch and completing it. Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p bitmap --release --test loom_batch`.
//!
//! Checked in every interleaving (preemption bound 2):
//! * no write is released (`Ready`, or `Wait` and then `is_released`)
//!   before its chunk's bit is persisted, and the bit stays persisted while
//!   the write is in flight (across at least one more tick), although the
//!   tick tries to clear every chunk on every tick (`clear_after_ticks = 0`),
//!   so the clear races the fast path (handshake 1 in `shared`);
//! * no write waits forever: once both writers have marked their chunks,
//!   every write is released within a few ticks (the tick does not spin on
//!   the writers, so a lost wake-up is an assertion failure, not a hang).
#![cfg(loom)]

use bitmap::{Bitmap, Geometry, Planner, TickOptions, WriteTicket};
use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;

const CHUNK_BLOCKS: u64 = 8;
/// Ticks after both writers marked by which every write must be released.
const RELEASE_BOUND_TICKS: u32 = 4;

/// Ticket as published by a writer: 0 not yet marked, 1 ready, b + 2 wait(b).
fn encode(t: WriteTicket) -> u64 {
    match t {
        WriteTicket::Ready => 1,
        WriteTicket::Wait(b) => b + 2,
        WriteTicket::Closed => panic!("never closed in this model"),
    }
}

fn model(on_disk_at_start: u64, chunks: [u64; 2]) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(2);
    }
    b.check(move || {
        let g = Geometry::new([1; 16], 512, 2 * CHUNK_BLOCKS, Some(CHUNK_BLOCKS)).unwrap();
        let bm = Arc::new(Bitmap::new(g).unwrap());
        let mut planner = Planner::new(&bm, Some(&[on_disk_at_start]), 0);
        let persisted = Arc::new(AtomicU64::new(on_disk_at_start));
        let tickets: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let writers: Vec<_> = (0..2)
            .map(|i| {
                let (bm, persisted, tickets) = (bm.clone(), persisted.clone(), tickets.clone());
                let chunk = chunks[i];
                thread::spawn(move || {
                    let t = bm.start_write(chunk * CHUNK_BLOCKS, 1).unwrap();
                    if t == WriteTicket::Ready {
                        assert!(
                            persisted.load(Ordering::Acquire) & 1 << chunk != 0,
                            "fast path on chunk {chunk} before its bit persisted"
                        );
                    }
                    tickets[i].store(encode(t), Ordering::Release);
                })
            })
            .collect();
        // The owner's loop. A released write stays in flight for one more
        // tick, then ends.
        let mut released = [false; 2];
        let mut ended = [false; 2];
        let mut ticks_after_marked = 0;
        while !ended.iter().all(|&e| e) {
            let marked: Vec<u64> = tickets.iter().map(|t| t.load(Ordering::Acquire)).collect();
            for i in 0..2 {
                let bit = 1u64 << chunks[i];
                if released[i] && !ended[i] {
                    assert!(
                        persisted.load(Ordering::Acquire) & bit != 0,
                        "chunk {} cleared with a write in flight",
                        chunks[i]
                    );
                    bm.end_write(chunks[i] * CHUNK_BLOCKS, 1).unwrap();
                    ended[i] = true;
                } else if !released[i] && (marked[i] == 1 || (marked[i] >= 2 && bm.is_released(marked[i] - 2))) {
                    assert!(
                        persisted.load(Ordering::Acquire) & bit != 0,
                        "write to chunk {} released early",
                        chunks[i]
                    );
                    released[i] = true;
                }
            }
            if let Some(plan) = planner.tick(&bm, TickOptions::default()) {
                // Every member persisted the page image of this batch.
                persisted.store(planner.page_words(0)[0], Ordering::Release);
                planner.complete(&bm, &plan);
            }
            if marked.iter().all(|&t| t != 0) {
                ticks_after_marked += 1;
                assert!(
                    ticks_after_marked <= RELEASE_BOUND_TICKS + 2,
                    "a write waits forever: {marked:?} {released:?}"
                );
            } else {
                thread::yield_now();
            }
        }
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(bm.seq_write(), bm.seq_flush(), "no batch left half done");
        assert!((0..2).all(|c| bm.in_flight(c) == 0));
    });
}

/// Both writers on a chunk whose bit is on disk while the tick keeps
/// clearing idle chunks: each write takes the fast path only if the clear
/// sees its count, else waits for a batch that sets the bit again.
#[test]
fn fast_path_races_the_clear() {
    model(0b01, [0, 0]);
}

/// Both writers on a clean chunk: both join batches (maybe different ones).
#[test]
fn two_writers_on_a_clean_chunk() {
    model(0, [1, 1]);
}

/// One writer on a persisted chunk being cleared, one on a clean chunk of
/// the same word: pending bits and clears share a word and a page.
#[test]
fn clear_and_set_in_one_word() {
    model(0b01, [0, 1]);
}
