//! Loom model of cross-reactor message delivery: the ring wrapper plus the
//! sleep/wake handshake. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p reactor --release --test loom_ring`.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;
use reactor::{Ring, WakeFlag};

/// Two producers, one consumer that sleeps when its ring is empty: every
/// message arrives exactly once, per-producer order holds, and the consumer
/// never sleeps forever on a non-empty ring (loom reports that as a deadlock).
#[test]
fn delivery_and_wakeup() {
    loom::model(|| {
        let ring = Arc::new(Ring::<(u8, u8)>::new(4));
        let wake = Arc::new(WakeFlag::default());
        let consumer = thread::current();
        let handles: Vec<_> = (0..2u8)
            .map(|p| {
                let (ring, wake, consumer) = (ring.clone(), wake.clone(), consumer.clone());
                thread::spawn(move || {
                    ring.push((p, 0)).expect("capacity is enough for the model");
                    if wake.take_sleeper() {
                        consumer.unpark();
                    }
                })
            })
            .collect();
        let mut got = Vec::new();
        while got.len() < 2 {
            if let Some(m) = ring.pop() {
                got.push(m);
                continue;
            }
            wake.announce_sleep();
            if ring.is_empty() {
                thread::park();
            }
            wake.clear();
        }
        for h in handles {
            h.join().unwrap();
        }
        got.sort();
        assert_eq!(got, vec![(0, 0), (1, 0)]);
    });
}

/// Per-producer FIFO and the capacity bound: a full ring rejects, never drops.
#[test]
fn bounded_and_ordered() {
    loom::model(|| {
        let ring = Arc::new(Ring::<u8>::new(2));
        let done = Arc::new(AtomicBool::new(false));
        let r2 = ring.clone();
        let d2 = done.clone();
        let producer = thread::spawn(move || {
            let mut rejected = 0;
            for v in 0..3u8 {
                let mut v = v;
                loop {
                    match r2.push(v) {
                        Ok(()) => break,
                        Err(back) => {
                            rejected += 1;
                            v = back;
                            thread::yield_now();
                        }
                    }
                }
            }
            d2.store(true, Ordering::SeqCst);
            rejected
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            match ring.pop() {
                Some(v) => got.push(v),
                None => thread::yield_now(),
            }
            assert!(ring.len() <= 2);
        }
        producer.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        assert_eq!(got, vec![0, 1, 2]);
    });
}
