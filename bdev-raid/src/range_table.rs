//! The array-level write serialization table (invariant 1, docs/architecture.md): the
//! owner reactor's record of every write-like request in flight or waiting,
//! which orders overlapping requests by arrival and lets the rest run in
//! parallel. Also the two-word encodings of the acquire, grant and release
//! messages that other reactors exchange with the owner.
//!
//! Rule: a request is granted once every earlier request that overlaps it
//! has been released. Arrival order at the owner is the array's write order,
//! so every member sees overlapping writes in that order; a later request
//! overlapping an earlier *waiting* one waits too (no overtaking).
//!
//! Lookups are hashed by region (`region_blocks`, a power of two) into a fixed
//! set of buckets, so a 4 KiB write compares against the few requests in its
//! own region instead of the whole queue. A request spanning more than
//! [`MAX_SPAN`] regions is "wide" and kept on one list that every lookup scans
//! (large IOs and rebuild windows: rare). Entries live in a slab that is
//! preallocated and grows only past its high-water mark, like `IoSlab`.
//!
//! Single-threaded: the owner reactor is its only user.

/// Regions a non-wide request may span (3 keeps an entry in one cache line).
pub const MAX_SPAN: usize = 3;
const NIL: u32 = u32::MAX;
/// A bucket-list node is `entry << NODE_SHIFT | k` (k < MAX_SPAN): shifts,
/// not divisions, on the lookup path.
const NODE_SHIFT: u32 = 2;
const _: () = assert!(MAX_SPAN <= 1 << NODE_SHIFT);

fn node_parts(node: u32) -> (u32, usize) {
    (node >> NODE_SHIFT, (node & ((1 << NODE_SHIFT) - 1)) as usize)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    Waiting,
    Granted,
}

#[derive(Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
}

const UNLINKED: Link = Link { prev: NIL, next: NIL };

/// One request: everything a lookup, a grant or a release touches, in one
/// cache line (a release comes long after the acquire, when the line has
/// usually left the L1: one miss, not three).
#[derive(Clone, Copy)]
#[repr(align(64))]
struct Entry {
    start: u64,
    end: u64,
    waiter: u64,
    blockers: u32,
    /// Later entries waiting on this one (a release with none skips the scan).
    waited_by: u32,
    /// Next entry on the ready list (granted, not yet handed out).
    ready_next: u32,
    state: State,
    /// Buckets this entry is linked into (0: it is wide).
    span: u8,
    /// One link per bucket (`links[k]` belongs to the bucket of region
    /// `first_region + k`); a wide entry uses `links[0]` for the wide list.
    links: [Link; MAX_SPAN],
}

const _: () = assert!(std::mem::size_of::<Entry>() == 64);

impl Entry {
    const BLANK: Entry = Entry {
        start: 0,
        end: 0,
        waiter: 0,
        blockers: 0,
        waited_by: 0,
        ready_next: NIL,
        state: State::Free,
        span: 0,
        links: [UNLINKED; MAX_SPAN],
    };
}

/// Outcome of [`RangeTable::acquire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// The caller may write now; release the entry when done.
    Granted(u32),
    /// Queued; the entry comes out of [`RangeTable::pop_ready`] when granted.
    Waiting(u32),
}

/// See the module documentation.
pub struct RangeTable {
    entries: Vec<Entry>,
    free: Vec<u32>,
    /// Head node per bucket (see `NODE_SHIFT`).
    buckets: Box<[u32]>,
    bucket_mask: u64,
    region_shift: u32,
    wide_head: u32,
    ready_head: u32,
    ready_tail: u32,
    present: usize,
}

impl RangeTable {
    /// `region_blocks` and `buckets` are rounded up to powers of two;
    /// `capacity` entries are preallocated.
    pub fn new(region_blocks: u64, buckets: usize, capacity: usize) -> Self {
        let buckets = buckets.max(MAX_SPAN).next_power_of_two();
        let capacity = capacity.max(1);
        RangeTable {
            entries: vec![Entry::BLANK; capacity],
            free: (0..capacity as u32).rev().collect(),
            buckets: vec![NIL; buckets].into_boxed_slice(),
            bucket_mask: buckets as u64 - 1,
            region_shift: region_blocks.max(1).next_power_of_two().trailing_zeros(),
            wide_head: NIL,
            ready_head: NIL,
            ready_tail: NIL,
            present: 0,
        }
    }

    /// Requests in the table (granted or waiting).
    pub fn len(&self) -> usize {
        self.present
    }

    pub fn is_empty(&self) -> bool {
        self.present == 0
    }

    fn bucket_of(&self, block: u64) -> u32 {
        ((block >> self.region_shift) & self.bucket_mask) as u32
    }

    /// Registers a request for blocks `[start, end)` on behalf of `waiter`
    /// (an opaque word handed back by `pop_ready`).
    pub fn acquire(&mut self, start: u64, end: u64, waiter: u64) -> Acquired {
        let end = end.max(start + 1);
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.entries.push(Entry::BLANK);
                (self.entries.len() - 1) as u32
            }
        };
        let first_region = start >> self.region_shift;
        let regions = ((end - 1) >> self.region_shift) - first_region + 1;
        let span = if regions as usize <= MAX_SPAN { regions as u8 } else { 0 };
        self.entries[idx as usize] = Entry {
            start,
            end,
            waiter,
            blockers: 0,
            waited_by: 0,
            ready_next: NIL,
            state: State::Waiting,
            span,
            links: [UNLINKED; MAX_SPAN],
        };
        // Every present entry is earlier than this one.
        let mut blockers = 0u32;
        if span == 1 && self.wide_head == NIL {
            // The common case (a small IO, no wide request present), straight
            // line: one bucket to scan, every overlap is counted there.
            let b = self.bucket_of(start) as usize;
            let head = self.buckets[b];
            let mut node = head;
            while node != NIL {
                let (x, xk) = node_parts(node);
                let xe = &mut self.entries[x as usize];
                if xe.start < end && start < xe.end {
                    blockers += 1;
                    xe.waited_by += 1;
                }
                node = xe.links[xk].next;
            }
            let me = idx << NODE_SHIFT;
            self.entries[idx as usize].links[0] = Link { prev: NIL, next: head };
            if head != NIL {
                let (h, hk) = node_parts(head);
                self.entries[h as usize].links[hk].prev = me;
            }
            self.buckets[b] = me;
        } else {
            self.for_each_overlapping(idx, |table, x| {
                blockers += 1;
                table.entries[x as usize].waited_by += 1;
            });
            self.link(idx);
        }
        self.present += 1;
        let e = &mut self.entries[idx as usize];
        e.blockers = blockers;
        if blockers == 0 {
            e.state = State::Granted;
            Acquired::Granted(idx)
        } else {
            Acquired::Waiting(idx)
        }
    }

    /// Ends a granted request; requests it was the last blocker of become
    /// ready (take them with `pop_ready`). Returns false (and changes nothing)
    /// for an index that is not a granted request.
    pub fn release(&mut self, idx: u32) -> bool {
        match self.entries.get(idx as usize) {
            Some(e) if e.state == State::Granted => {}
            _ => return false,
        }
        self.unlink(idx);
        if self.entries[idx as usize].waited_by == 0 {
            self.entries[idx as usize].state = State::Free;
            self.free.push(idx);
            self.present -= 1;
            return true;
        }
        // All present overlapping entries are later ones (a granted entry had
        // no earlier overlapping entry left), each waiting on this one. Those
        // that become ready together are pairwise disjoint (of two
        // overlapping ones the later still waits on the earlier), so their
        // hand-out order does not matter.
        self.for_each_overlapping(idx, |table, x| {
            let xe = &mut table.entries[x as usize];
            debug_assert!(xe.state == State::Waiting && xe.blockers > 0);
            xe.blockers -= 1;
            if xe.blockers == 0 {
                xe.state = State::Granted;
                table.push_ready(x);
            }
        });
        self.entries[idx as usize].state = State::Free;
        self.free.push(idx);
        self.present -= 1;
        true
    }

    /// The next request granted by a release: `(entry, waiter)`.
    pub fn pop_ready(&mut self) -> Option<(u32, u64)> {
        let idx = self.ready_head;
        if idx == NIL {
            return None;
        }
        let e = &mut self.entries[idx as usize];
        self.ready_head = e.ready_next;
        e.ready_next = NIL;
        if self.ready_head == NIL {
            self.ready_tail = NIL;
        }
        Some((idx, e.waiter))
    }

    /// Whether `idx` is a granted request (for assertions and tests).
    pub fn is_granted(&self, idx: u32) -> bool {
        self.entries.get(idx as usize).is_some_and(|e| e.state == State::Granted)
    }

    fn push_ready(&mut self, x: u32) {
        self.entries[x as usize].ready_next = NIL;
        if self.ready_tail == NIL {
            self.ready_head = x;
        } else {
            self.entries[self.ready_tail as usize].ready_next = x;
        }
        self.ready_tail = x;
    }

    /// Calls `f(table, x)` once for every present entry `x` (other than
    /// `idx`) that overlaps entry `idx`. `f` may change entries' counters
    /// and states, never the links.
    fn for_each_overlapping(&mut self, idx: u32, mut f: impl FnMut(&mut RangeTable, u32)) {
        let (start, end, span) = {
            let e = &self.entries[idx as usize];
            (e.start, e.end, e.span)
        };
        let first_bucket = self.bucket_of(start);
        if span == 0 {
            // Wide: compare against everything present.
            for x in 0..self.entries.len() as u32 {
                let xe = &self.entries[x as usize];
                if x != idx && xe.state != State::Free && xe.start < end && start < xe.end {
                    f(self, x);
                }
            }
            return;
        }
        for k in 0..span as u32 {
            let b = (first_bucket + k) & self.bucket_mask as u32;
            let mut node = self.buckets[b as usize];
            while node != NIL {
                let (x, xk) = node_parts(node);
                let (xs, xend) = {
                    let xe = &self.entries[x as usize];
                    (xe.start, xe.end)
                };
                node = self.entries[x as usize].links[xk].next;
                // Count a pair once: in the bucket of the first block they share.
                if x != idx && xs < end && start < xend && self.bucket_of(xs.max(start)) == b {
                    f(self, x);
                }
            }
        }
        let mut x = self.wide_head;
        while x != NIL {
            let (xs, xend) = {
                let xe = &self.entries[x as usize];
                (xe.start, xe.end)
            };
            let next = self.entries[x as usize].links[0].next;
            if x != idx && xs < end && start < xend {
                f(self, x);
            }
            x = next;
        }
    }

    fn link(&mut self, idx: u32) {
        let (span, first_bucket) = {
            let e = &self.entries[idx as usize];
            (e.span, self.bucket_of(e.start))
        };
        if span == 0 {
            let old = self.wide_head;
            self.entries[idx as usize].links[0] = Link { prev: NIL, next: old };
            if old != NIL {
                self.entries[old as usize].links[0].prev = idx;
            }
            self.wide_head = idx;
            return;
        }
        for k in 0..span as u32 {
            let b = ((first_bucket + k) & self.bucket_mask as u32) as usize;
            let node = idx << NODE_SHIFT | k;
            let old = self.buckets[b];
            self.entries[idx as usize].links[k as usize] = Link { prev: NIL, next: old };
            if old != NIL {
                let (o, ok) = node_parts(old);
                self.entries[o as usize].links[ok].prev = node;
            }
            self.buckets[b] = node;
        }
    }

    fn unlink(&mut self, idx: u32) {
        let (span, first_bucket) = {
            let e = &self.entries[idx as usize];
            (e.span, self.bucket_of(e.start))
        };
        if span == 0 {
            let Link { prev, next } = self.entries[idx as usize].links[0];
            if prev == NIL {
                self.wide_head = next;
            } else {
                self.entries[prev as usize].links[0].next = next;
            }
            if next != NIL {
                self.entries[next as usize].links[0].prev = prev;
            }
            return;
        }
        for k in 0..span as u32 {
            let b = ((first_bucket + k) & self.bucket_mask as u32) as usize;
            let Link { prev, next } = self.entries[idx as usize].links[k as usize];
            if prev == NIL {
                self.buckets[b] = next;
            } else {
                let (p, pk) = node_parts(prev);
                self.entries[p as usize].links[pk].next = next;
            }
            if next != NIL {
                let (nx, nk) = node_parts(next);
                self.entries[nx as usize].links[nk].prev = prev;
            }
        }
    }
}

/// Two-word encodings of the serialization messages (`reactor::send_raw`
/// carries a function and two `u64`s, so the hot path allocates nothing).
/// Indices travel, never pointers: the receiver looks the array up by `key`.
pub mod words {
    /// Reactors and parked-IO slots that fit in an acquire message.
    pub const MAX_REACTORS: usize = 1 << 12;
    pub const MAX_SLOTS: u32 = 1 << 20;
    const LEN_BITS: u32 = 20;
    const START_LIMIT: u64 = 1 << (64 - LEN_BITS);
    const LEN_LIMIT: u64 = 1 << LEN_BITS;

    /// Acquire, requester → owner: `(key, reactor, slot)` and the range.
    /// A range whose start or length does not fit (beyond 2^44 blocks, or
    /// longer than 2^20 blocks) is sent as "from `min(start, 2^44-1)` to the
    /// end of the array": a superset, so ordering stays correct and only
    /// parallelism is lost for such huge requests.
    pub fn encode_acquire(key: u32, reactor: usize, slot: u32, start: u64, num_blocks: u64) -> Option<(u64, u64)> {
        if reactor >= MAX_REACTORS || slot >= MAX_SLOTS {
            return None;
        }
        let a = (key as u64) << 32 | (reactor as u64) << 20 | slot as u64;
        let b = if start < START_LIMIT && num_blocks > 0 && num_blocks < LEN_LIMIT {
            start << LEN_BITS | num_blocks
        } else {
            start.min(START_LIMIT - 1) << LEN_BITS
        };
        Some((a, b))
    }

    /// `(key, reactor, slot, start, end)`; `end` is clamped to the array.
    pub fn decode_acquire(a: u64, b: u64, array_blocks: u64) -> (u32, usize, u32, u64, u64) {
        let key = (a >> 32) as u32;
        let reactor = ((a >> 20) & (MAX_REACTORS as u64 - 1)) as usize;
        let slot = (a & (MAX_SLOTS as u64 - 1)) as u32;
        let start = b >> LEN_BITS;
        let len = b & (LEN_LIMIT - 1);
        let end = if len == 0 { array_blocks } else { start + len };
        (key, reactor, slot, start, end.max(start + 1))
    }

    /// Grant, owner → requester: `(key, slot)` and the table entry.
    pub fn encode_grant(key: u32, slot: u32, entry: u32) -> (u64, u64) {
        ((key as u64) << 32 | slot as u64, entry as u64)
    }

    pub fn decode_grant(a: u64, b: u64) -> (u32, u32, u32) {
        ((a >> 32) as u32, a as u32, b as u32)
    }

    /// The table's waiter word for a parked IO.
    pub fn waiter(reactor: usize, slot: u32) -> u64 {
        (reactor as u64) << 32 | slot as u64
    }

    pub fn decode_waiter(w: u64) -> (usize, u32) {
        ((w >> 32) as usize, w as u32)
    }

    /// The waiter word of the owner's rebuild window.
    pub const REBUILD_WAITER: u64 = u64::MAX;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The naive rule: an entry is granted iff no earlier present entry overlaps it.
    #[derive(Default)]
    struct Model {
        present: Vec<(u64, u64, u64, u32)>, // (seq, start, end, idx)
        seq: u64,
    }

    impl Model {
        fn granted(&self) -> Vec<u32> {
            let mut out: Vec<u32> = self
                .present
                .iter()
                .filter(|&&(s, a, b, _)| !self.present.iter().any(|&(s2, a2, b2, _)| s2 < s && a2 < b && a < b2))
                .map(|e| e.3)
                .collect();
            out.sort_unstable();
            out
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Acquire(u64, u64),
        Release(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u64..600, prop_oneof![1u64..4, 1u64..40, 1u64..300]).prop_map(|(s, l)| Op::Acquire(s, l)),
            2 => any::<usize>().prop_map(Op::Release),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// After every operation the table's granted set equals the model's,
        /// grants come out exactly once, and non-overlapping requests never wait.
        #[test]
        fn matches_naive_model(ops in proptest::collection::vec(op(), 1..120), region_shift in 0u32..5, buckets in 4usize..16) {
            let mut t = RangeTable::new(1 << region_shift, buckets, 2);
            let mut m = Model::default();
            let mut handed: Vec<u32> = Vec::new();
            for op in ops {
                match op {
                    Op::Acquire(s, l) => {
                        let r = t.acquire(s, s + l, m.seq);
                        let idx = match r { Acquired::Granted(i) | Acquired::Waiting(i) => i };
                        m.present.push((m.seq, s, s + l, idx));
                        m.seq += 1;
                        let should = !m.present.iter().any(|&(s2, a, b, i)| i != idx && a < s + l && s < b && s2 < m.seq - 1);
                        prop_assert_eq!(matches!(r, Acquired::Granted(_)), should);
                        if should { handed.push(idx); }
                    }
                    Op::Release(k) => {
                        if handed.is_empty() { continue; }
                        let idx = handed.swap_remove(k % handed.len());
                        prop_assert!(t.release(idx));
                        m.present.retain(|e| e.3 != idx);
                        while let Some((i, w)) = t.pop_ready() {
                            prop_assert!(m.present.iter().any(|e| e.3 == i && e.0 == w));
                            prop_assert!(!handed.contains(&i));
                            handed.push(i);
                        }
                    }
                }
                let mut h = handed.clone();
                h.sort_unstable();
                prop_assert_eq!(h, m.granted());
                prop_assert_eq!(t.len(), m.present.len());
            }
        }
    }

    #[test]
    fn fifo_no_overtaking_and_bad_release() {
        let mut t = RangeTable::new(8, 16, 4);
        let Acquired::Granted(a) = t.acquire(0, 10, 1) else { panic!() };
        let Acquired::Waiting(b) = t.acquire(5, 20, 2) else { panic!() };
        // Overlaps only b (waiting): must not overtake it.
        let Acquired::Waiting(c) = t.acquire(15, 16, 3) else { panic!() };
        assert!(matches!(t.acquire(100, 101, 4), Acquired::Granted(_)));
        assert!(!t.release(b), "a waiting entry cannot be released");
        assert!(t.release(a));
        assert_eq!(t.pop_ready(), Some((b, 2)));
        assert_eq!(t.pop_ready(), None);
        assert!(t.release(b));
        assert_eq!(t.pop_ready(), Some((c, 3)));
        assert!(!t.release(9999));
    }

    #[test]
    fn wide_requests() {
        let mut t = RangeTable::new(1, 4, 4);
        let Acquired::Granted(w) = t.acquire(0, 1000, 7) else { panic!() };
        let Acquired::Waiting(x) = t.acquire(999, 1000, 8) else { panic!() };
        let Acquired::Granted(_) = t.acquire(1000, 1001, 9) else { panic!() };
        assert!(t.release(w));
        assert_eq!(t.pop_ready(), Some((x, 8)));
    }

    #[test]
    fn word_encodings_round_trip() {
        use words::*;
        let (a, b) = encode_acquire(7, 3, 12345, 1 << 40, 256).unwrap();
        assert_eq!(decode_acquire(a, b, u64::MAX), (7, 3, 12345, 1 << 40, (1 << 40) + 256));
        // Too long: becomes "to the end of the array".
        let (a, b) = encode_acquire(1, 0, 0, 10, 1 << 21).unwrap();
        assert_eq!(decode_acquire(a, b, 5_000_000), (1, 0, 0, 10, 5_000_000));
        // Too far: a superset starting earlier.
        let (a, b) = encode_acquire(1, 0, 0, 1 << 50, 8).unwrap();
        let (_, _, _, s, e) = decode_acquire(a, b, (1 << 50) + 100);
        assert!(s <= 1 << 50 && e == (1 << 50) + 100);
        assert!(encode_acquire(1, MAX_REACTORS, 0, 0, 1).is_none());
        assert_eq!(decode_grant(encode_grant(9, 77, 5).0, encode_grant(9, 77, 5).1), (9, 77, 5));
        assert_eq!(decode_waiter(waiter(5, 6)), (5, 6));
    }
}
