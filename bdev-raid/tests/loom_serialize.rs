//! Loom model of array-level write serialization: requester reactors send
//! acquire words to the owner over message rings (the reactor crate's loom
//! twin of its ring), the owner runs the real `RangeTable` and answers with
//! grant words, requesters "fan out" to two mirrors in opposite orders and
//! send release words. In every interleaving, overlapping writes never hold
//! their range together and both mirrors end with the same last writer;
//! without the table (the test-only switch) loom finds the divergence.
//! Non-overlapping writes are granted without waiting for each other.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p bdev-raid --release --test loom_serialize`
#![cfg(loom)]

use bdev_raid::range_table::{words, Acquired, RangeTable};
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::sync::Notify;
use loom::thread;
use reactor::Ring;

const KEY: u32 = 7;
const ACQUIRE: u8 = 0;
const GRANT: u8 = 1;
const RELEASE: u8 = 2;
const DONE: u8 = 3;

type Msg = (u8, u64, u64);

/// Explores interleavings with at most two preemptions (a bound, as loom
/// recommends, to keep the three-thread model to seconds on a small
/// machine; the divergence below needs only one). `LOOM_MAX_PREEMPTIONS`
/// raises it.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(b.preemption_bound.unwrap_or(2));
    b.check(f);
}

/// A reactor's message ring plus a wake-up: a receiver with nothing to do
/// waits instead of spinning. (loom's `Notify` keeps a permit, as a parked
/// reactor's wake-up must; loom's `unpark` would drop it when the receiver
/// happens to be blocked on the ring twin's mutex.)
struct Mailbox {
    ring: Ring<Msg>,
    notify: Notify,
}

impl Mailbox {
    fn new() -> Arc<Mailbox> {
        Arc::new(Mailbox { ring: Ring::new(4), notify: Notify::new() })
    }
}

fn send(to: &Mailbox, m: Msg) {
    to.ring.push(m).expect("rings are sized for the model");
    to.notify.notify();
}

fn recv(mb: &Mailbox) -> Msg {
    loop {
        if let Some(m) = mb.ring.pop() {
            return m;
        }
        mb.notify.wait();
    }
}

/// The owner reactor: serves acquire/release words until `releases` arrived.
fn owner(mb: &Mailbox, requesters: &[Arc<Mailbox>], releases: usize) {
    let mut table = RangeTable::new(4, 8, 2);
    let mut seen = 0;
    let grant = |reactor: usize, slot: u32, entry: u32| {
        let (a, b) = words::encode_grant(KEY, slot, entry);
        send(&requesters[reactor], (GRANT, a, b));
    };
    while seen < releases {
        let (kind, a, b) = recv(mb);
        match kind {
            ACQUIRE => {
                let (key, reactor, slot, start, end) = words::decode_acquire(a, b, 1 << 20);
                assert_eq!(key, KEY);
                if let Acquired::Granted(e) = table.acquire(start, end, words::waiter(reactor, slot)) {
                    grant(reactor, slot, e);
                }
            }
            RELEASE => {
                assert_eq!(a as u32, KEY);
                assert!(table.release(b as u32));
                while let Some((e, w)) = table.pop_ready() {
                    let (reactor, slot) = words::decode_waiter(w);
                    grant(reactor, slot, e);
                }
                seen += 1;
            }
            _ => unreachable!(),
        }
    }
    assert!(table.is_empty());
}

/// Asks the owner for `[start, start + len)` and waits for the grant.
fn acquire(owner_mb: &Mailbox, mine: &Mailbox, r: usize, start: u64, len: u64) -> u32 {
    let (wa, wb) = words::encode_acquire(KEY, r, r as u32, start, len).unwrap();
    send(owner_mb, (ACQUIRE, wa, wb));
    let (kind, ga, gb) = recv(mine);
    assert_eq!(kind, GRANT);
    let (key, slot, e) = words::decode_grant(ga, gb);
    assert_eq!((key, slot), (KEY, r as u32));
    e
}

/// Two overlapping writes from two reactors, each fanned out to mirrors A
/// and B in a different order.
fn mirrors(serialize: bool) {
    model(move || {
        let owner_mb = Mailbox::new();
        let (mirror_a, mirror_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let holders = Arc::new(AtomicUsize::new(0));
        let mut requesters = Vec::new();
        let mut handles = Vec::new();
        for r in 0..2usize {
            let mine = Mailbox::new();
            let (owner_mb, mine2) = (owner_mb.clone(), mine.clone());
            let (a, b, holders) = (mirror_a.clone(), mirror_b.clone(), holders.clone());
            let h = thread::spawn(move || {
                let start = if r == 0 { 0 } else { 4 };
                let mut entry = None;
                if serialize {
                    entry = Some(acquire(&owner_mb, &mine2, r, start, 8));
                    assert_eq!(holders.fetch_add(1, Ordering::SeqCst), 0, "overlapping writes granted together");
                }
                // Member IOs complete in any order: writer 1 reaches A
                // first, writer 2 reaches B first.
                let (first, second) = if r == 0 { (&a, &b) } else { (&b, &a) };
                first.store(r + 1, Ordering::SeqCst);
                second.store(r + 1, Ordering::SeqCst);
                if let Some(e) = entry {
                    holders.fetch_sub(1, Ordering::SeqCst);
                    send(&owner_mb, (RELEASE, KEY as u64, e as u64));
                }
            });
            requesters.push(mine);
            handles.push(h);
        }
        if serialize {
            owner(&owner_mb, &requesters, 2);
        }
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(mirror_a.load(Ordering::SeqCst), mirror_b.load(Ordering::SeqCst), "mirrors diverged");
    });
}

#[test]
fn overlapping_writes_reach_mirrors_in_one_order() {
    mirrors(true);
}

#[test]
#[should_panic(expected = "mirrors diverged")]
fn without_serialization_mirrors_diverge() {
    mirrors(false);
}

/// A write holding its range does not delay a disjoint one: writer 0 keeps
/// its range until writer 1 (disjoint) has been granted and tells it so.
#[test]
fn disjoint_writes_do_not_wait() {
    model(|| {
        let owner_mb = Mailbox::new();
        let (mb0, mb1) = (Mailbox::new(), Mailbox::new());
        let (o, m0) = (owner_mb.clone(), mb0.clone());
        let h0 = thread::spawn(move || {
            // Keep the range until writer 1 says it got its own grant.
            let (wa, wb) = words::encode_acquire(KEY, 0, 0, 0, 8).unwrap();
            send(&o, (ACQUIRE, wa, wb));
            let (mut entry, mut other_done) = (None, false);
            while entry.is_none() || !other_done {
                match recv(&m0) {
                    (GRANT, a, b) => entry = Some(words::decode_grant(a, b).2),
                    (DONE, ..) => other_done = true,
                    m => unreachable!("{m:?}"),
                }
            }
            send(&o, (RELEASE, KEY as u64, entry.unwrap() as u64));
        });
        let (o, m1, m0) = (owner_mb.clone(), mb1.clone(), mb0.clone());
        let h1 = thread::spawn(move || {
            let e = acquire(&o, &m1, 1, 64, 8);
            send(&m0, (DONE, 0, 0));
            send(&o, (RELEASE, KEY as u64, e as u64));
        });
        owner(&owner_mb, &[mb0, mb1], 2);
        h0.join().unwrap();
        h1.join().unwrap();
    });
}
