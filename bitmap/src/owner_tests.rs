//! Protocol tests of the owner on a manual reactor set with malloc members
//! (one behind a gate that holds its writes until the test opens it):
//! invariant 2 of docs/architecture.md (release only after every member persisted the page),
//! the fast path, lazy clearing, teardown (invariant 4) and pinned page
//! buffers (invariant 5).

use crate::{load, BitmapOwner, Geometry, LoadedBitmap, OwnerOptions, WriteTicket};
use bdev::malloc::MallocBdev;
use bdev::{Bdev, BdevChannel, BdevError, BdevHandle, BdevProps, Channel, IoBox, IoType, Registry};
use reactor::{ManualSet, PollStatus, ReactorSet};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const CHUNK_BLOCKS: u64 = 128;
const CHUNKS: u64 = 200;
const MEMBER_BLOCKS: u64 = 64;

/// Holds every IO until `open` is set, then passes it to the base bdev.
struct GateBdev {
    props: BdevProps,
    base: BdevHandle,
    open: Arc<AtomicBool>,
}

struct GateChannel {
    held: Rc<RefCell<VecDeque<IoBox>>>,
}

impl Bdev for GateBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn module(&self) -> &'static str {
        "gate"
    }
    fn io_type_supported(&self, _t: IoType) -> bool {
        true
    }
    fn create_channel(&self) -> Result<Rc<dyn BdevChannel>, BdevError> {
        let base: Rc<Channel> = self.base.channel()?;
        let held: Rc<RefCell<VecDeque<IoBox>>> = Rc::default();
        let (h, open) = (held.clone(), self.open.clone());
        reactor::register_poller("gate", move || {
            if !open.load(Ordering::Acquire) || h.borrow().is_empty() {
                return PollStatus::Idle;
            }
            let ios: Vec<IoBox> = h.borrow_mut().drain(..).collect();
            for parent in ios {
                let mut child =
                    IoBox::data(parent.io_type, parent.offset_blocks, parent.num_blocks, parent.buf.clone()).unwrap();
                let parent = RefCell::new(Some(parent));
                child.set_done(Rc::new(move |c: IoBox| {
                    if let Some(p) = parent.borrow_mut().take() {
                        p.complete(c.status);
                    }
                }));
                base.submit(child);
            }
            PollStatus::Busy
        });
        Ok(Rc::new(GateChannel { held }))
    }
}

impl BdevChannel for GateChannel {
    fn submit(&self, io: IoBox) {
        self.held.borrow_mut().push_back(io);
    }
}

struct Rig {
    m: ManualSet,
    owner: BitmapOwner,
    /// The members' stores, for reading what is on disk.
    stores: Vec<Arc<MallocBdev>>,
    members: Vec<BdevHandle>,
    gate: Arc<AtomicBool>,
    g: Geometry,
}

fn geometry() -> Geometry {
    Geometry::new([9; 16], 512, CHUNKS * CHUNK_BLOCKS, Some(CHUNK_BLOCKS)).unwrap()
}

/// Owner on reactor 0, writers on reactors 1 and 2; member 1 is gated.
/// The creation batch (every page to every member) has completed.
fn rig(options: OwnerOptions) -> Rig {
    let m = ReactorSet::manual(3);
    let gate = Arc::new(AtomicBool::new(true));
    let g = geometry();
    let (owner, stores, members) = m.on(0, || {
        let r = Registry::get();
        let mk = |name: &str| {
            Arc::new(MallocBdev::new(BdevProps::new(name, "Malloc disk", 512, MEMBER_BLOCKS, None)).unwrap())
        };
        let (s0, s1) = (mk("m0"), mk("m1base"));
        let h0 = r.register(s0.clone()).unwrap();
        let base = r.register(s1.clone()).unwrap();
        let gated =
            GateBdev { props: BdevProps::new("m1", "gate", 512, MEMBER_BLOCKS, None), base, open: gate.clone() };
        let h1 = r.register(Arc::new(gated)).unwrap();
        let members = vec![h0, h1];
        let owner = BitmapOwner::new(g, members.clone(), 0, None, options).unwrap();
        (owner, vec![s0, s1], members)
    });
    let rig = Rig { m, owner, stores, members, gate, g };
    let flushed = Rc::new(Cell::new(false));
    let f = flushed.clone();
    rig.m.on(0, || rig.owner.flush(move || f.set(true)));
    for _ in 0..20 {
        rig.m.on(0, || rig.owner.tick());
        rig.pump(3);
    }
    assert!(flushed.get(), "the creation batch completes");
    assert_eq!(rig.disk(0), LoadedBitmap { words: vec![0; g.num_words()], ..rig.disk(0) });
    rig
}

impl Rig {
    fn pump(&self, rounds: usize) {
        for _ in 0..rounds {
            for id in 0..3 {
                self.m.run_once(id);
            }
        }
    }

    fn tick(&self) -> bool {
        self.m.on(0, || self.owner.tick())
    }

    /// Ticks and pumps until `cond` holds (bounded).
    fn until(&self, what: &str, cond: impl Fn() -> bool) {
        for _ in 0..100 {
            if cond() {
                return;
            }
            self.tick();
            self.pump(3);
        }
        panic!("never happened: {what}");
    }

    /// The bitmap as stored on member `i` right now.
    fn disk(&self, i: usize) -> LoadedBitmap {
        let mut page = vec![0u8; self.g.page_buf_bytes()];
        assert!(self.stores[i].read_raw(0, &mut page));
        LoadedBitmap::from_pages(self.g, &[&page]).unwrap()
    }

    fn start(&self, reactor: usize, chunk: u64) -> WriteTicket {
        let bm = self.owner.bitmap();
        self.m.on(reactor, || bm.start_write(chunk * CHUNK_BLOCKS + 3, 10).unwrap())
    }

    fn end(&self, reactor: usize, chunk: u64) {
        let bm = self.owner.bitmap();
        self.m.on(reactor, || bm.end_write(chunk * CHUNK_BLOCKS + 3, 10).unwrap());
    }
}

/// A write to a clean chunk waits; whenever it is seen released, the page
/// with its bit must be on every member. Returns the first violation.
fn release_after_every_member(release_early: bool) -> Result<(), String> {
    let rig = rig(OwnerOptions::default());
    let result = check_release(&rig, release_early);
    // Leave no IO in flight behind, whatever the outcome.
    rig.gate.store(true, Ordering::Release);
    rig.until("drained", || !rig.owner.batch_in_flight());
    result
}

fn check_release(rig: &Rig, release_early: bool) -> Result<(), String> {
    rig.m.on(0, || rig.owner.set_release_early(release_early));
    let bm = rig.owner.bitmap();
    rig.gate.store(false, Ordering::Release);
    let WriteTicket::Wait(batch) = rig.start(1, 5) else { return Err("a clean chunk must wait".into()) };
    let check = |when: &str| -> Result<bool, String> {
        if !bm.is_released(batch) {
            return Ok(false);
        }
        for i in 0..2 {
            if !rig.disk(i).is_dirty(5) {
                return Err(format!("{when}: released while member {i} lacks the bit"));
            }
        }
        Ok(true)
    };
    check("before the tick")?;
    assert!(rig.tick(), "the tick writes the page");
    for _ in 0..30 {
        check("gate closed")?;
        rig.pump(1);
        rig.tick();
    }
    if bm.is_released(batch) {
        return Err("released while the gated member has not persisted".into());
    }
    assert!(rig.disk(0).is_dirty(5), "the open member has it");
    rig.gate.store(true, Ordering::Release);
    for _ in 0..30 {
        if check("gate open")? {
            rig.end(1, 5);
            return Ok(());
        }
        rig.pump(1);
    }
    Err("never released".into())
}

#[test]
fn write_to_clean_chunk_waits_for_every_member() {
    release_after_every_member(false).unwrap();
}

#[test]
fn releasing_before_persistence_is_caught() {
    let e = release_after_every_member(true).unwrap_err();
    assert!(e.contains("lacks the bit"), "{e}");
}

#[test]
fn persisted_chunk_does_not_wait() {
    let rig = rig(OwnerOptions::default());
    let bm = rig.owner.bitmap();
    let WriteTicket::Wait(b) = rig.start(1, 7) else { panic!("clean chunk waits") };
    rig.until("released", || bm.is_released(b));
    let (batches, waited) = (bm.batches_written(), bm.writes_waited());
    // Same chunk, another reactor, while the first write is still in flight.
    assert_eq!(rig.start(2, 7), WriteTicket::Ready);
    rig.end(1, 7);
    assert_eq!(rig.start(1, 7), WriteTicket::Ready);
    assert!(!rig.tick(), "nothing to persist");
    assert_eq!((bm.batches_written(), bm.writes_waited()), (batches, waited));
    rig.end(1, 7);
    rig.end(2, 7);
    // A range over two chunks waits only if one of them is not on disk.
    let bm2 = bm.clone();
    let t = rig.m.on(1, || bm2.start_write(7 * CHUNK_BLOCKS + 100, 100).unwrap());
    assert!(matches!(t, WriteTicket::Wait(_)));
    rig.m.on(1, || bm2.end_write(7 * CHUNK_BLOCKS + 100, 100).unwrap());
    assert!(rig.m.on(1, || bm2.end_write(7 * CHUNK_BLOCKS, 1)).is_err(), "unbalanced end_write is refused");
}

#[test]
fn lazy_clearing_spares_busy_and_out_of_sync_chunks() {
    let rig = rig(OwnerOptions { clear_after_ticks: 3, ..OwnerOptions::default() });
    let bm = rig.owner.bitmap();
    for c in [1, 2, 3] {
        if let WriteTicket::Wait(b) = rig.start(1, c) {
            rig.until("released", || bm.is_released(b));
        }
    }
    assert_eq!(rig.disk(0).dirty_chunks().collect::<Vec<_>>(), vec![1, 2, 3]);
    rig.end(1, 2); // chunk 1 stays in flight
    rig.m.on(0, || rig.owner.set_in_sync(false));
    rig.end(1, 3); // chunk 3 idle, but the array is not in sync
    for _ in 0..20 {
        rig.tick();
        rig.pump(2);
    }
    assert!(bm.is_on_disk(2) && bm.is_on_disk(3), "no clearing while out of sync");
    rig.m.on(0, || rig.owner.set_in_sync(true));
    rig.until("chunks 2 and 3 cleared on every member", || {
        (0..2).all(|i| rig.disk(i).dirty_chunks().collect::<Vec<_>>() == vec![1])
    });
    assert!(bm.is_on_disk(1) && !bm.is_on_disk(2));
    for _ in 0..20 {
        rig.tick();
        rig.pump(2);
    }
    assert!(rig.disk(0).is_dirty(1) && rig.disk(1).is_dirty(1), "a chunk with a write in flight is never cleared");
    // The resync path: out of sync, but chunk 1 was resynced.
    rig.end(1, 1);
    rig.m.on(0, || {
        rig.owner.set_in_sync(false);
        rig.owner.mark_resynced(1..2);
    });
    rig.until("resynced chunk cleared", || !rig.disk(1).is_dirty(1));
}

#[test]
fn write_after_a_clear_was_scheduled_waits_for_the_bit_again() {
    let rig = rig(OwnerOptions { clear_after_ticks: 1, ..OwnerOptions::default() });
    let bm = rig.owner.bitmap();
    let WriteTicket::Wait(b) = rig.start(1, 4) else { panic!() };
    rig.until("released", || bm.is_released(b));
    rig.end(1, 4);
    // Let the clear batch be closed but not yet persisted on member 1.
    rig.gate.store(false, Ordering::Release);
    rig.until("clear batch closed", || !bm.is_on_disk(4) && rig.owner.batch_in_flight());
    let WriteTicket::Wait(again) = rig.start(2, 4) else { panic!("a cleared chunk must wait") };
    assert!(again > bm.seq_flush(), "it joins a batch after the clear");
    for _ in 0..10 {
        rig.tick();
        rig.pump(2);
    }
    assert!(!bm.is_released(again));
    rig.gate.store(true, Ordering::Release);
    rig.until("released again", || bm.is_released(again));
    assert!(rig.disk(0).is_dirty(4) && rig.disk(1).is_dirty(4), "the bit was re-persisted first");
    rig.end(2, 4);
}

#[test]
fn page_buffer_in_flight_is_not_modified() {
    let rig = rig(OwnerOptions::default());
    let bm = rig.owner.bitmap();
    rig.gate.store(false, Ordering::Release);
    let WriteTicket::Wait(b1) = rig.start(1, 10) else { panic!() };
    assert!(rig.tick());
    rig.pump(3);
    let sel = (b1 & 1) as usize;
    let (in_flight, pins) = rig.m.on(0, || rig.owner.page_buffer(0, sel)).unwrap();
    assert_eq!(pins, 1, "member 0 done, member 1 still holds it");
    let WriteTicket::Wait(b2) = rig.start(2, 11) else { panic!() };
    assert_eq!(b2, b1 + 1);
    for _ in 0..10 {
        assert!(!rig.tick(), "one batch at a time");
        rig.pump(2);
    }
    assert_eq!(rig.m.on(0, || rig.owner.page_buffer(0, sel)).unwrap().0, in_flight);
    rig.gate.store(true, Ordering::Release);
    rig.until("first batch done", || bm.is_released(b1));
    rig.gate.store(false, Ordering::Release);
    rig.until("second batch in flight", || rig.owner.batch_in_flight());
    let (next, next_pins) = rig.m.on(0, || rig.owner.page_buffer(0, sel ^ 1)).unwrap();
    assert!(next_pins > 0);
    assert_eq!(rig.m.on(0, || rig.owner.page_buffer(0, sel)).unwrap().0, in_flight, "built into the other buffer");
    assert_ne!(next, in_flight);
    rig.gate.store(true, Ordering::Release);
    rig.until("second batch done", || bm.is_released(b2));
    assert_eq!(rig.m.on(0, || rig.owner.page_buffer(0, sel ^ 1)).unwrap().1, 0, "unpinned on completion");
    rig.end(1, 10);
    rig.end(2, 11);
}

#[test]
fn flush_and_stop_with_writes_and_a_batch_in_flight() {
    let rig = rig(OwnerOptions::default());
    let bm = rig.owner.bitmap();
    let WriteTicket::Wait(b) = rig.start(1, 20) else { panic!() };
    rig.until("released", || bm.is_released(b));
    // A write in flight on chunk 20, one waiting on chunk 21 with its batch in flight.
    rig.gate.store(false, Ordering::Release);
    let WriteTicket::Wait(w) = rig.start(2, 21) else { panic!() };
    assert!(rig.tick());
    rig.pump(2);
    assert!(rig.owner.batch_in_flight());
    let stopped = Rc::new(Cell::new(None::<Vec<u64>>));
    let (s, members) = (stopped.clone(), rig.members.clone());
    rig.m.on(0, || {
        rig.owner.flush_and_stop(move || {
            // No member write of the bitmap may still be in flight here.
            s.set(Some(members.iter().map(|m| m.channel().unwrap().stats().in_flight.get()).collect()));
        })
    });
    rig.gate.store(true, Ordering::Release);
    let mut ticks = 0;
    let (mut ended_20, mut ended_21) = (false, false);
    let poll = rig.m.on(0, || rig.owner.start_poller(std::time::Duration::from_micros(100)));
    while stopped.take().map(|v| assert!(v.iter().all(|&n| n == 0), "{v:?}")).is_none() {
        ticks += 1;
        assert!(ticks < 50, "flush_and_stop must finish in bounded ticks");
        rig.m.advance_ns(200_000);
        rig.pump(2);
        if !ended_20 && ticks == 3 {
            rig.end(1, 20);
            ended_20 = true;
        }
        if !ended_21 && bm.is_released(w) {
            rig.end(2, 21);
            ended_21 = true;
        }
    }
    assert!(ended_20 && ended_21, "stop waited for both writes");
    assert!(bm.is_closed() && rig.owner.is_stopped());
    assert_eq!(rig.start(1, 30), WriteTicket::Closed);
    for _ in 0..10 {
        rig.m.advance_ns(200_000);
        rig.pump(2);
        assert!(!rig.tick());
    }
    assert_eq!(rig.owner.late_completions(), 0);
    assert!(!rig.m.on(0, || poll.is_registered()), "the poller unregistered itself");
    // The final batch wrote every page with everything idle and in sync: clean.
    for i in 0..2 {
        let d = rig.disk(i);
        assert_eq!(d.dirty_count(), 0);
        assert_eq!(d.events_max, bm.seq_write());
    }
}

#[test]
fn load_and_reassemble_keeps_dirty_chunks_until_resynced() {
    let rig = rig(OwnerOptions { clear_after_ticks: 1, ..OwnerOptions::default() });
    let bm = rig.owner.bitmap();
    for c in [3, 150] {
        let WriteTicket::Wait(b) = rig.start(1, c) else { panic!() };
        rig.until("released", || bm.is_released(b));
    }
    // "Crash": the writes never end. Load member 1's bitmap.
    let got = Rc::new(RefCell::new(None));
    let (g2, h) = (got.clone(), rig.members[1].clone());
    rig.m.on(0, || load(&h, rig.g, 0, move |r| *g2.borrow_mut() = Some(r)));
    rig.until("loaded", || got.borrow().is_some());
    let loaded = got.borrow_mut().take().unwrap().unwrap();
    assert_eq!(loaded.dirty_chunks().collect::<Vec<_>>(), vec![3, 150]);
    assert_eq!(loaded.dirty_count(), 2);
    // Reassemble from it on a fresh owner: dirty chunks are on disk at once.
    let owner2 = rig
        .m
        .on(0, || BitmapOwner::new(rig.g, rig.members.clone(), 0, Some(&loaded), OwnerOptions::default()).unwrap());
    let bm2 = owner2.bitmap();
    assert!(bm2.is_on_disk(3) && bm2.is_on_disk(150) && !bm2.is_on_disk(4));
    assert_eq!(bm2.dirty_chunks(), vec![3, 150]);
    // A member too small for the region, a loaded bitmap of another array.
    let other = LoadedBitmap { geometry: Geometry { array_uuid: [1; 16], ..rig.g }, ..loaded.clone() };
    assert!(rig.m.on(0, || BitmapOwner::new(rig.g, vec![], 0, Some(&other), OwnerOptions::default())).is_err());
    assert!(rig
        .m
        .on(0, || BitmapOwner::new(rig.g, rig.members.clone(), MEMBER_BLOCKS, None, OwnerOptions::default()))
        .is_err());
    // Pages of another geometry, and a region never written, are refused.
    let try_load = |g: Geometry, offset: u64| {
        let res = Rc::new(RefCell::new(None));
        let (r2, h) = (res.clone(), h.clone());
        rig.m.on(0, || load(&h, g, offset, move |r| *r2.borrow_mut() = Some(r)));
        rig.until("load finished", || res.borrow().is_some());
        let taken = res.borrow_mut().take();
        taken.unwrap()
    };
    let fewer_chunks = Geometry { data_blocks: rig.g.data_blocks - CHUNK_BLOCKS, ..rig.g };
    assert!(matches!(try_load(fewer_chunks, 0), Err(crate::BitmapError::GeometryMismatch(_))));
    assert!(matches!(try_load(rig.g, 16), Err(crate::BitmapError::BadMagic)));
    assert!(matches!(try_load(rig.g, MEMBER_BLOCKS - 1), Err(crate::BitmapError::Member(..))));
    rig.m.on(0, || drop(owner2));
}

#[test]
fn failed_member_is_reported_before_release_and_dropped() {
    let rig = rig(OwnerOptions::default());
    let bm = rig.owner.bitmap();
    let reported = Rc::new(RefCell::new(Vec::new()));
    let (r2, bm2) = (reported.clone(), bm.clone());
    rig.m.on(0, || {
        rig.owner.on_member_failed(move |m| r2.borrow_mut().push((m.name().to_string(), bm2.seq_write())));
    });
    let WriteTicket::Wait(b) = rig.start(1, 40) else { panic!() };
    // Member 0 goes away before the tick.
    let h0 = rig.members[0].clone();
    rig.m.on(0, || Registry::get().force_unregister(h0, |_| ()));
    rig.until("released", || bm.is_released(b));
    assert_eq!(reported.borrow().as_slice(), &[("m0".to_string(), b - 1)], "reported before the release");
    assert_eq!(rig.m.on(0, || rig.owner.members().len()), 1);
    assert!(rig.disk(1).is_dirty(40));
    rig.end(1, 40);
}

/// Members with a volatile write cache: every page write is FUA (the bits
/// are on the media when a batch releases its writes), and a batch that
/// clears a bit first flushes every member, then writes pages: data written
/// to a chunk is on every member's media before the chunk is clean there.
#[test]
fn page_writes_are_fua_and_a_clearing_batch_flushes_every_member_before_its_pages() {
    use bdev::volatile_cache::VolatileCacheBdev;
    let m = ReactorSet::manual(1);
    let g = geometry();
    let (owner, caches, handles) = m.on(0, || {
        let r = Registry::get();
        let caches: Vec<Arc<VolatileCacheBdev>> = (0..2)
            .map(|i| {
                let p = BdevProps::new(&format!("v{i}"), "Volatile cache", 512, MEMBER_BLOCKS, None);
                Arc::new(VolatileCacheBdev::new(p, i, 0).unwrap())
            })
            .collect();
        let handles: Vec<BdevHandle> = caches.iter().map(|c| r.register(c.clone()).unwrap()).collect();
        let owner = BitmapOwner::new(
            g,
            handles.clone(),
            0,
            None,
            OwnerOptions { clear_after_ticks: 1, ..OwnerOptions::default() },
        )
        .unwrap();
        (owner, caches, handles)
    });
    let pump = || {
        for _ in 0..5 {
            m.run_once(0);
        }
    };
    let until = |what: &str, cond: &dyn Fn() -> bool| {
        for _ in 0..100 {
            if cond() {
                return;
            }
            m.on(0, || owner.tick());
            pump();
        }
        panic!("never happened: {what}");
    };
    let flushed = Rc::new(Cell::new(false));
    let f = flushed.clone();
    m.on(0, || owner.flush(move || f.set(true)));
    until("the creation batch", &|| flushed.get());
    // Every write but the test's own plain data write (`plain` on member 1) is FUA.
    let plain = Cell::new(0u64);
    let all_fua = || {
        caches.iter().enumerate().all(|(i, c)| {
            let n = c.counters();
            n.writes == n.fua_writes + if i == 1 { plain.get() } else { 0 }
        })
    };
    assert!(all_fua(), "creation pages are FUA: {:?}", caches.iter().map(|c| c.counters()).collect::<Vec<_>>());
    assert!(caches.iter().all(|c| c.cached_blocks() == 0));
    assert_eq!(m.on(0, || owner.preflushes()), 0, "nothing cleared, nothing to flush first");

    // Set chunk 5's bit: a FUA batch.
    let bm = owner.bitmap();
    let WriteTicket::Wait(batch) = m.on(0, || bm.start_write(5 * CHUNK_BLOCKS, 1).unwrap()) else {
        panic!("a clean chunk waits")
    };
    until("the batch setting chunk 5", &|| bm.is_released(batch));
    assert!(all_fua());
    // The write's data goes to member 1 without FUA: it sits in the cache.
    let data_block = MEMBER_BLOCKS - 1;
    m.on(0, || {
        let io = IoBox::data(IoType::Write, data_block, 1, bdev::DmaBuf::alloc(512)).unwrap();
        io.buf.as_ref().unwrap().fill(0xD7);
        handles[1].channel().unwrap().submit(io);
    });
    plain.set(1);
    pump();
    assert_eq!(caches[1].cached_blocks(), 1);
    m.on(0, || bm.end_write(5 * CHUNK_BLOCKS, 1).unwrap());

    // Idle: the tick that clears chunk 5 flushes both members and writes
    // no page until both flushes completed.
    let before: Vec<_> = caches.iter().map(|c| c.counters()).collect();
    let mut closed = false;
    for _ in 0..10 {
        m.on(0, || owner.tick());
        if m.on(0, || owner.preflushes()) > 0 {
            closed = true;
            break;
        }
        pump();
    }
    assert!(closed, "an idle chunk is cleared");
    let now: Vec<_> = caches.iter().map(|c| c.counters()).collect();
    for (b, n) in before.iter().zip(&now) {
        assert_eq!((n.flushes, n.writes), (b.flushes + 1, b.writes), "flushed, no page written yet: {n:?}");
    }
    assert_eq!(caches[1].cached_blocks(), 0, "the flush made the data durable");
    until("the clearing batch", &|| !owner.batch_in_flight() && !bm.is_on_disk(5));
    assert!(all_fua());
    let mut page = vec![0u8; g.page_buf_bytes()];
    for c in &caches {
        assert!(c.read_media(0, &mut page));
        assert!(!LoadedBitmap::from_pages(g, &[&page]).unwrap().is_dirty(5), "chunk 5 clean on the media");
    }
    let mut block = [0u8; 512];
    assert!(caches[1].read_media((data_block * 512) as usize, &mut block));
    assert!(block.iter().all(|&x| x == 0xD7));
    assert_eq!(m.on(0, || owner.late_completions()), 0);
}

/// Both planes of the bitmap as stored on member `i` (version 2), or the
/// dirty plane alone when it holds version 1 pages.
fn disk_planes(rig: &Rig, i: usize) -> LoadedBitmap {
    let mut dirty = vec![0u8; rig.g.page_buf_bytes()];
    let mut written = vec![0u8; rig.g.page_buf_bytes()];
    assert!(rig.stores[i].read_raw(0, &mut dirty));
    let at = (rig.g.page_offset_blocks(crate::Plane::Written, 0) * 512) as usize;
    assert!(rig.stores[i].read_raw(at, &mut written));
    LoadedBitmap::from_planes(rig.g, &[&dirty], Some(&[&written]))
        .or_else(|_| LoadedBitmap::from_planes(rig.g, &[&dirty], None))
        .unwrap()
}

/// A new bitmap has every chunk unwritten. A chunk's first write is held
/// until its written bit is on every member, in the same batch as its
/// dirty bit; with first writes needing sync, the chunk keeps its dirty
/// bit (clean, idle, in sync) until it is marked synced.
#[test]
fn first_write_persists_written_with_the_dirty_bit_and_needs_sync_until_synced() {
    let rig = rig(OwnerOptions { clear_after_ticks: 1, first_write_needs_sync: true });
    let bm = rig.owner.bitmap();
    assert!(bm.tracks_written() && bm.written_count() == 0 && !bm.is_written(5));
    let on_disk = disk_planes(&rig, 0);
    assert_eq!((on_disk.written_count(), on_disk.written.is_some()), (0, true), "a new array: nothing written");
    let hook_calls = Rc::new(Cell::new(0));
    let h2 = hook_calls.clone();
    rig.m.on(0, || rig.owner.on_needs_sync(move || h2.set(h2.get() + 1)));
    rig.gate.store(false, Ordering::Release);
    let WriteTicket::Wait(b) = rig.start(1, 5) else { panic!("an unwritten chunk waits") };
    assert!(rig.tick());
    for _ in 0..20 {
        rig.pump(1);
        rig.tick();
    }
    assert!(!bm.is_released(b) && !bm.is_written(5), "the gated member has not persisted");
    let open = disk_planes(&rig, 0);
    assert!(open.is_dirty(5) && open.is_written(5), "one batch: dirty and written bits");
    rig.gate.store(true, Ordering::Release);
    rig.until("released", || bm.is_released(b));
    for i in 0..2 {
        let d = disk_planes(&rig, i);
        assert!(d.is_dirty(5) && d.is_written(5) && d.written_count() == 1, "member {i}");
    }
    assert!(bm.is_written(5) && bm.needs_sync(5));
    assert!(!bm.range_trusted(5 * CHUNK_BLOCKS, 1), "parity of a chunk that needs sync is not trusted");
    assert_eq!(hook_calls.get(), 1, "the RAID hears of the chunk that needs sync");
    rig.end(1, 5);
    for _ in 0..10 {
        rig.tick();
        rig.pump(3);
    }
    assert!(bm.is_on_disk(5) && disk_planes(&rig, 1).is_dirty(5), "a chunk that needs sync keeps its dirty bit");
    rig.m.on(0, || rig.owner.mark_resynced(5..6));
    assert!(bm.range_trusted(5 * CHUNK_BLOCKS, CHUNK_BLOCKS));
    rig.until("cleared", || !disk_planes(&rig, 0).is_dirty(5) && !disk_planes(&rig, 1).is_dirty(5));
    assert!(disk_planes(&rig, 1).is_written(5), "written stays written");
    // A second write into the written chunk: written already, no needs-sync.
    let WriteTicket::Wait(b) = rig.start(2, 5) else { panic!("a clean chunk waits") };
    rig.until("released", || bm.is_released(b));
    assert!(!bm.needs_sync(5) && hook_calls.get() == 1);
    rig.end(2, 5);
}

/// Load gives back both planes; a dirty written chunk needs sync again.
/// A bitmap of version 1 pages loads with every chunk written, and keeps
/// writing version 1 pages (its region holds one plane).
#[test]
fn written_plane_reloads_and_version_1_pages_count_every_chunk_written() {
    let rig = rig(OwnerOptions { clear_after_ticks: 1, first_write_needs_sync: true });
    let bm = rig.owner.bitmap();
    for c in [3, 150] {
        let WriteTicket::Wait(b) = rig.start(1, c) else { panic!() };
        rig.until("released", || bm.is_released(b));
        rig.end(1, c);
    }
    rig.m.on(0, || rig.owner.mark_resynced(150..151));
    rig.until("150 cleared", || !disk_planes(&rig, 1).is_dirty(150));
    let load_from = |i: usize| {
        let got = Rc::new(RefCell::new(None));
        let (g2, h) = (got.clone(), rig.members[i].clone());
        rig.m.on(0, || load(&h, rig.g, 0, move |r| *g2.borrow_mut() = Some(r)));
        rig.until("loaded", || got.borrow().is_some());
        let r = got.borrow_mut().take().unwrap();
        r.unwrap()
    };
    let loaded = load_from(1);
    assert_eq!(loaded.dirty_chunks().collect::<Vec<_>>(), vec![3]);
    assert_eq!((loaded.written_count(), loaded.is_written(3), loaded.is_written(150)), (2, true, true));
    let opts = OwnerOptions { clear_after_ticks: 1, first_write_needs_sync: true };
    let owner2 = rig.m.on(0, || BitmapOwner::new(rig.g, rig.members.clone(), 0, Some(&loaded), opts).unwrap());
    let bm2 = owner2.bitmap();
    assert!(bm2.is_written(150) && !bm2.needs_sync(150) && bm2.range_trusted(150 * CHUNK_BLOCKS, 1));
    assert!(bm2.is_written(3) && bm2.needs_sync(3), "dirty at load: it may be half-written");
    assert!(!bm2.is_written(4) && bm2.tracks_written());
    rig.m.on(0, || drop(owner2));

    // Version 1: rewrite member 0's dirty page as version 1 with chunk 3 dirty.
    let mut page = vec![0u8; rig.g.page_buf_bytes()];
    crate::page::encode_page_as(&rig.g, crate::page::PageKind::LEGACY, 0, 7, &[1 << 3], &mut page);
    let done = Rc::new(Cell::new(false));
    let (d2, h) = (done.clone(), rig.members[0].clone());
    rig.m.on(0, move || {
        let buf = bdev::DmaBuf::alloc(page.len()).unwrap();
        buf.copy_from(0, &page);
        let mut io = IoBox::data(IoType::Write, 0, rig.g.page_blocks(), Some(buf)).unwrap();
        io.set_done(Rc::new(move |io: IoBox| d2.set(io.status.is_ok())));
        h.channel().unwrap().submit(io);
    });
    rig.until("version 1 page written", || done.get());
    let legacy = load_from(0);
    assert!(legacy.written.is_none() && legacy.is_dirty(3));
    assert_eq!(legacy.written_count(), rig.g.num_chunks());
    let owner3 = rig.m.on(0, || BitmapOwner::new(rig.g, rig.members.clone(), 0, Some(&legacy), opts).unwrap());
    let bm3 = owner3.bitmap();
    assert!(owner3.legacy_format() && !bm3.tracks_written());
    assert!((0..rig.g.num_chunks()).all(|c| bm3.is_written(c) && !bm3.needs_sync(c)));
    // (Not in sync: chunk 3 stays dirty, so the page shows what it wrote.)
    owner3.set_in_sync(false);
    let flushed = Rc::new(Cell::new(false));
    let f = flushed.clone();
    rig.m.on(0, || owner3.flush(move || f.set(true)));
    for _ in 0..50 {
        rig.m.on(0, || owner3.tick());
        rig.pump(3);
    }
    assert!(flushed.get(), "the second owner's pages are written");
    let again = load_from(0);
    assert!(again.written.is_none() && again.is_dirty(3), "version 1 pages stay version 1");
    rig.m.on(0, || drop(owner3));
}
