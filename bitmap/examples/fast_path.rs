//! Prints the cost of the write path's bitmap calls (not a test): a
//! `start_write` + `end_write` pair on chunks whose bits are on disk, on one
//! thread and on two threads hammering the same chunk (the contended case).
//! Run: `cargo run -p bitmap --release --example fast_path`.

use bitmap::{Bitmap, Geometry, Planner, TickOptions, WriteTicket};
use std::sync::Arc;
use std::time::Instant;

const PAIRS: u64 = 5_000_000;
const CHUNK_BLOCKS: u64 = 1 << 17; // 64 MiB of 512-byte blocks

fn hammer(bm: &Bitmap, chunk_stride: u64) -> f64 {
    let t = Instant::now();
    for i in 0..PAIRS {
        let lba = (i * chunk_stride % 64) * CHUNK_BLOCKS + 8;
        let ticket = bm.start_write(lba, 8).unwrap();
        assert_eq!(ticket, WriteTicket::Ready);
        bm.end_write(lba, 8).unwrap();
    }
    t.elapsed().as_nanos() as f64 / PAIRS as f64
}

fn main() {
    let g = Geometry::new([0; 16], 512, 64 * CHUNK_BLOCKS, Some(CHUNK_BLOCKS)).unwrap();
    let bm = Arc::new(Bitmap::new(g).unwrap());
    // Persist every chunk once so the fast path is taken.
    let mut planner = Planner::new(&bm, Some(&[u64::MAX]), u8::MAX);
    assert!(planner.tick(&bm, TickOptions::default()).is_none());
    println!("one thread, spread over chunks: {:.1} ns per start+end", hammer(&bm, 7));
    println!("one thread, one chunk:          {:.1} ns per start+end", hammer(&bm, 0));
    let b2 = bm.clone();
    let other = std::thread::spawn(move || hammer(&b2, 0));
    let here = hammer(&bm, 0);
    let there = other.join().unwrap();
    println!("two threads, same chunk:        {here:.1} / {there:.1} ns per start+end");
}
