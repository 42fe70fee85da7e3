//! Micro-benchmark (not a test) of the serialization table alone: 128
//! disjoint single-block writes in flight, each released and replaced by a
//! new one at a random offset, as the owner reactor sees a qd128 random
//! 4 KiB write load. Prints nanoseconds per acquire + release.
//!
//! `cargo run --release -p bdev-raid --example range_table_micro`

use bdev::rng::SimRng;
use bdev_raid::range_table::{Acquired, RangeTable};

const IN_FLIGHT: usize = 128;
const OPS: u64 = 20_000_000;

fn main() {
    // The owner's geometry for 4 KiB blocks: 32-block regions, 4096 buckets.
    let mut table = RangeTable::new(32, 4096, 1024);
    let mut rng = SimRng::new(1);
    // Slot s only ever uses offsets ≡ s (mod 256): in-flight writes never
    // overlap, so every acquire is granted (the common, uncontended case).
    let mut offset = |slot: usize| rng.below(1 << 16) * 256 + slot as u64;
    let mut entries = [0u32; IN_FLIGHT];
    for (slot, e) in entries.iter_mut().enumerate() {
        let o = offset(slot);
        let Acquired::Granted(i) = table.acquire(o, o + 1, slot as u64) else { unreachable!("disjoint") };
        *e = i;
    }
    let t0 = std::time::Instant::now();
    for k in 0..OPS {
        let slot = (k % IN_FLIGHT as u64) as usize;
        assert!(table.release(entries[slot]));
        let o = offset(slot);
        let Acquired::Granted(i) = table.acquire(o, o + 1, k) else { unreachable!("disjoint") };
        entries[slot] = i;
    }
    let ns = t0.elapsed().as_nanos() as f64 / OPS as f64;
    println!("{ns:.1} ns per acquire + release ({IN_FLIGHT} in flight, uncontended)");
}
