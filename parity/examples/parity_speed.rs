//! Parity throughput on one thread with the data in cache, beside memcpy of the same
//! bytes measured in the same run (issue 12, "Performance": XOR ≥ 20 GB/s for a 4+1
//! stripe, raid6 P+Q ≥ 8 GB/s).
//!
//! `cargo run --release -p parity --example parity_speed [-- --block-kib 64 --data-blocks 4]`
//!
//! GB/s is data bytes processed (data blocks × block size) per second, 10^9 bytes.
//! Each figure is the best of several rounds of about 100 ms: on a shared machine the
//! best round is the one least disturbed by other work.

use std::hint::black_box;
use std::time::{Duration, Instant};

use parity::{Implementation, Parity};

const ROUNDS: usize = 7;
const ROUND_TIME: Duration = Duration::from_millis(100);

/// Runs `op` in rounds of ~ROUND_TIME and returns the best rate in GB/s for
/// `bytes_per_op` data bytes per call.
fn measure(bytes_per_op: usize, mut op: impl FnMut()) -> f64 {
    // Warm up (page faults, caches, frequency) and size a round.
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < ROUND_TIME / 2 {
        op();
        calls += 1;
    }
    let per_round = ((calls as f64) * 2.0).max(1.0) as u64;
    let mut best = 0.0f64;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..per_round {
            op();
        }
        let secs = t.elapsed().as_secs_f64();
        best = best.max(per_round as f64 * bytes_per_op as f64 / secs / 1e9);
    }
    best
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
        .unwrap_or(default)
}

fn main() {
    let block = arg("--block-kib", 64) * 1024;
    let n = arg("--data-blocks", 4);
    assert!(n >= 2, "--data-blocks must be at least 2");
    let data_bytes = n * block;

    // Distinct, non-trivial contents (a simple LCG).
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<Vec<u8>> = (0..n)
        .map(|_| {
            (0..block)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (seed >> 56) as u8
                })
                .collect()
        })
        .collect();
    let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
    let mut p = vec![0u8; block];
    let mut q = vec![0u8; block];
    let mut out = [vec![0u8; block], vec![0u8; block]];

    println!(
        "parity_speed: {n} data blocks x {} KiB ({n}+1 XOR, {n}+2 P+Q), one thread, data in cache; \
         GB/s of data processed, best of {ROUNDS} rounds of ~{} ms",
        block / 1024,
        ROUND_TIME.as_millis()
    );
    println!("chosen at start-up: {}", parity::implementation_name());

    // memcpy of the same bytes into one block-sized destination (the same footprint
    // as the XOR: n blocks read, one written).
    let memcpy = measure(data_bytes, || {
        for d in &refs {
            p.copy_from_slice(black_box(d));
        }
        black_box(&mut p);
    });
    println!("{:<8} {:<28} {:>7.1} GB/s", "-", "memcpy (same bytes)", memcpy);

    for implementation in Implementation::ALL {
        let parity = match Parity::new(implementation) {
            Ok(parity) => parity,
            Err(e) => {
                println!("{:<8} not run: {e}", implementation.name());
                continue;
            }
        };
        let name = implementation.name();
        let row = |what: &str, gbps: f64| {
            println!("{name:<8} {what:<28} {gbps:>7.1} GB/s   {:>5.2}x memcpy", gbps / memcpy);
        };

        row(&format!("XOR P ({n}+1)"), measure(data_bytes, || parity.gen_p(black_box(&refs), &mut p).unwrap()));
        row(&format!("P+Q ({n}+2)"), measure(data_bytes, || parity.gen_pq(black_box(&refs), &mut p, &mut q).unwrap()));
        // Read-modify-write of one block: reads old, new, P, Q; counted as one block.
        row(
            "P+Q update (1 block rmw)",
            measure(block, || parity.update_pq(1, black_box(&data[0]), &data[1], &mut p, &mut q).unwrap()),
        );
        // Two lost data blocks rebuilt from the others and P+Q: all n blocks' worth.
        parity.gen_pq(&refs, &mut p, &mut q).unwrap();
        let mut live = refs.clone();
        live[0] = &[];
        live[1] = &[];
        row(
            &format!("recover 2 data ({n}+2)"),
            measure(data_bytes, || {
                let [x, y] = &mut out;
                parity.recover_two_data(black_box(&live), [0, 1], &p, &q, [x, y]).unwrap()
            }),
        );
        assert!(out[0] == data[0] && out[1] == data[1], "{name}: recovery is wrong");
    }
}
