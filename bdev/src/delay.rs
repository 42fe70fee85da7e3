//! Delay bdev (`bdev_delay_create`, `bdev_delay_update_latency`): holds each
//! IO for a latency BEFORE submitting it to the base, so overlapping IOs can
//! reach the base in another order than they were submitted — the RAID tests
//! rely on that. nvraid's random mode draws every IO's delay uniformly from
//! [0, max] with a per-channel seeded generator, reproducibly on a manual set.
//!
//! Time is `reactor::now_ns()` (the manual clock in manual sets). Each
//! channel keeps a pre-sized timer heap that a poller drains; under the
//! sleep idle policy a due IO may wait up to one reactor sleep (1 ms).

use crate::channel::{Bdev, BdevChannel, BdevProps, Channel};
use crate::io::{BdevIo, IoBox, IoDone, IoError, IoSlab, IoStatus, IoType};
use crate::registry::{BdevHandle, Registry};
use crate::rng::SimRng;
use crate::BdevError;
use reactor::{PollStatus, PollerHandle};
use serde::Deserialize;
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// IOs one channel may hold (delayed or at the base); beyond it, `NoMemory`.
/// The timer heap and the parking table are allocated to this size up front.
pub const MAX_DELAYED_IOS: usize = 4096;
/// Due IOs released per poller run (bounded work per reactor loop).
const RELEASE_BATCH: usize = 256;

/// `bdev_delay_create` parameters; latencies in microseconds. The last two
/// are nvraid's: with `max_random_latency_us`, every IO's delay is uniform
/// in [0, max] from a generator seeded by (`random_seed`, reactor id).
#[derive(Clone, Debug, Deserialize)]
pub struct DelayCreateParams {
    pub base_bdev_name: String,
    pub name: String,
    pub avg_read_latency: u64,
    pub p99_read_latency: u64,
    pub avg_write_latency: u64,
    pub p99_write_latency: u64,
    #[serde(default)]
    pub uuid: Option<Uuid>,
    #[serde(default)]
    pub random_seed: Option<u64>,
    #[serde(default)]
    pub max_random_latency_us: Option<u64>,
}

/// `bdev_delay_update_latency` parameters (`delay_type` accepted for `latency_type`).
#[derive(Clone, Debug, Deserialize)]
pub struct DelayUpdateLatencyParams {
    pub delay_bdev_name: String,
    /// avg_read, p99_read, avg_write, p99_write.
    #[serde(alias = "delay_type")]
    pub latency_type: String,
    pub latency_us: u64,
}

fn us_to_ns(us: u64) -> u64 {
    us.saturating_mul(1000)
}

/// Latencies shared by every channel (updatable at run time), in ns.
struct Shared {
    avg_read_ns: AtomicU64,
    p99_read_ns: AtomicU64,
    avg_write_ns: AtomicU64,
    p99_write_ns: AtomicU64,
    /// Random mode when present.
    max_random_ns: Option<u64>,
    seed: u64,
    /// Set on removal: release every delayed IO at once so teardown does
    /// not wait out the latencies.
    releasing: AtomicBool,
    /// Bumped by a reset: every channel aborts what it is still delaying.
    abort_gen: AtomicU64,
}

/// The delay bdev.
pub struct DelayBdev {
    props: BdevProps,
    base: BdevHandle,
    owner: String,
    shared: Arc<Shared>,
}

/// Delay bdevs of one reactor set, by UUID (for `update_latency`).
#[derive(Default)]
struct DelayBdevs(Mutex<HashMap<Uuid, Arc<Shared>>>);

impl DelayBdevs {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Shared>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Creates the delay bdev over `base_bdev_name` (claiming it) and registers it.
pub fn create(p: DelayCreateParams) -> Result<BdevHandle, BdevError> {
    if p.name.is_empty() {
        return Err(BdevError::Invalid("bdev name must not be empty".into()));
    }
    let registry = Registry::get();
    if registry.lookup(&p.name).is_some() {
        return Err(BdevError::Exists(p.name.clone()));
    }
    let owner = format!("bdev_delay {}", p.name);
    let base = registry.claim(&p.base_bdev_name, &owner)?;
    let bp = base.props();
    let mut props = BdevProps::new(&p.name, "delay", bp.block_size, bp.num_blocks, p.uuid);
    props.optimal_io_boundary = bp.optimal_io_boundary;
    props.max_io_blocks = bp.max_io_blocks;
    props.write_cache = bp.write_cache;
    props.deallocated_reads_zeroes = bp.deallocated_reads_zeroes;
    props.atomic_write_blocks = bp.atomic_write_blocks;
    // Without a seed, one derived from the UUID: reported in driver_specific
    // so a run can be replayed.
    let seed = p.random_seed.unwrap_or_else(|| {
        let b = props.uuid.as_u64_pair();
        b.0 ^ b.1
    });
    let shared = Arc::new(Shared {
        avg_read_ns: AtomicU64::new(us_to_ns(p.avg_read_latency)),
        p99_read_ns: AtomicU64::new(us_to_ns(p.p99_read_latency)),
        avg_write_ns: AtomicU64::new(us_to_ns(p.avg_write_latency)),
        p99_write_ns: AtomicU64::new(us_to_ns(p.p99_write_latency)),
        max_random_ns: p.max_random_latency_us.map(us_to_ns),
        seed,
        releasing: AtomicBool::new(false),
        abort_gen: AtomicU64::new(0),
    });
    let bdev = Arc::new(DelayBdev { props, base: base.clone(), owner: owner.clone(), shared: shared.clone() });
    let h = match registry.register(bdev) {
        Ok(h) => h,
        Err(e) => {
            registry.release(&base, &owner);
            return Err(e);
        }
    };
    reactor::global::<DelayBdevs>().table().insert(h.props().uuid, shared.clone());
    h.on_remove(move || shared.releasing.store(true, Ordering::Release));
    let uuid = h.props().uuid.to_string();
    base.on_remove(move || {
        let registry = Registry::get();
        if let Some(me) = registry.lookup(&uuid) {
            registry.force_unregister(me, |_| {});
        }
    });
    Ok(h)
}

/// Changes one latency of a delay bdev; IOs already delayed keep theirs.
pub fn update_latency(p: DelayUpdateLatencyParams) -> Result<(), BdevError> {
    let name = &p.delay_bdev_name;
    let h = Registry::get().lookup(name).ok_or_else(|| BdevError::NotFound(name.clone()))?;
    let shared = reactor::global::<DelayBdevs>().table().get(&h.props().uuid).cloned();
    let shared = shared.ok_or_else(|| BdevError::Invalid(format!("{name} is not a delay bdev")))?;
    let target = match p.latency_type.as_str() {
        "avg_read" => &shared.avg_read_ns,
        "p99_read" => &shared.p99_read_ns,
        "avg_write" => &shared.avg_write_ns,
        "p99_write" => &shared.p99_write_ns,
        other => {
            return Err(BdevError::Invalid(format!(
                "latency_type '{other}' is not one of avg_read, p99_read, avg_write, p99_write"
            )))
        }
    };
    target.store(us_to_ns(p.latency_us), Ordering::Relaxed);
    Ok(())
}

impl Bdev for DelayBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }

    fn module(&self) -> &'static str {
        "delay"
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        t == IoType::Reset || self.base.bdev().io_type_supported(t)
    }

    fn create_channel(&self) -> Result<Rc<dyn BdevChannel>, BdevError> {
        let base = self.base.channel()?;
        let shared = self.shared.clone();
        let reactor_id = reactor::current().unwrap_or(0) as u64;
        // Distinct, reproducible streams per reactor.
        let rng = SimRng::new(shared.seed ^ (reactor_id + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let ch = Rc::new_cyclic(|me: &Weak<DelayChannel>| DelayChannel {
            me: me.clone(),
            seen_abort_gen: Cell::new(shared.abort_gen.load(Ordering::Acquire)),
            shared,
            base,
            parked: RefCell::new(IoSlab::with_capacity(MAX_DELAYED_IOS)),
            timers: RefCell::new(BinaryHeap::with_capacity(MAX_DELAYED_IOS)),
            next_seq: Cell::new(0),
            rng: RefCell::new(rng),
            poller: RefCell::new(None),
        });
        let weak = Rc::downgrade(&ch);
        let poller = reactor::register_poller("bdev_delay", move || match weak.upgrade() {
            Some(ch) => ch.poll(),
            None => PollStatus::Done,
        });
        *ch.poller.borrow_mut() = Some(poller);
        Ok(ch)
    }

    fn driver_specific(&self) -> Option<(&'static str, Value)> {
        let s = &self.shared;
        let us = |a: &AtomicU64| a.load(Ordering::Relaxed) / 1000;
        let mut v = json!({
            "base_bdev_name": self.base.name(),
            "avg_read_latency": us(&s.avg_read_ns),
            "p99_read_latency": us(&s.p99_read_ns),
            "avg_write_latency": us(&s.avg_write_ns),
            "p99_write_latency": us(&s.p99_write_ns),
        });
        if let Some(max_ns) = s.max_random_ns {
            v["max_random_latency_us"] = json!(max_ns / 1000);
            v["random_seed"] = json!(s.seed);
        }
        Some(("delay", v))
    }

    fn config(&self) -> Option<Value> {
        let s = &self.shared;
        let us = |a: &AtomicU64| a.load(Ordering::Relaxed) / 1000;
        let mut params = json!({
            "base_bdev_name": self.base.name(),
            "name": self.props.name,
            "uuid": self.props.uuid.to_string(),
            "avg_read_latency": us(&s.avg_read_ns),
            "p99_read_latency": us(&s.p99_read_ns),
            "avg_write_latency": us(&s.avg_write_ns),
            "p99_write_latency": us(&s.p99_write_ns),
        });
        if let Some(max_ns) = s.max_random_ns {
            params["max_random_latency_us"] = json!(max_ns / 1000);
            params["random_seed"] = json!(s.seed);
        }
        Some(json!({"method": "bdev_delay_create", "params": params}))
    }

    fn destruct(&self, done: Box<dyn FnOnce() + Send>) {
        reactor::global::<DelayBdevs>().table().remove(&self.props.uuid);
        Registry::get().release(&self.base, &self.owner);
        done();
    }
}

struct DelayChannel {
    me: Weak<DelayChannel>,
    shared: Arc<Shared>,
    base: Rc<Channel>,
    /// Parents, from submission until their child completes at the base.
    parked: RefCell<IoSlab>,
    /// (due ns, arrival sequence, parked slot): earliest first, FIFO on ties.
    timers: RefCell<BinaryHeap<Reverse<(u64, u64, u32)>>>,
    next_seq: Cell<u64>,
    rng: RefCell<SimRng>,
    seen_abort_gen: Cell<u64>,
    poller: RefCell<Option<PollerHandle>>,
}

impl DelayChannel {
    /// This IO's delay: random mode draws uniform in [0, max]; SPDK mode uses
    /// the p99 latency for about 1 IO in 100 and the average otherwise, for
    /// reads and writes only (as SPDK, other types pass straight through).
    fn delay_ns(&self, t: IoType) -> u64 {
        let s = &self.shared;
        let mut rng = self.rng.borrow_mut();
        if let Some(max_ns) = s.max_random_ns {
            return rng.below(max_ns.saturating_add(1));
        }
        let p99 = rng.below(100) == 0;
        let pick = |avg: &AtomicU64, tail: &AtomicU64| if p99 { tail } else { avg }.load(Ordering::Relaxed);
        match t {
            IoType::Read => pick(&s.avg_read_ns, &s.p99_read_ns),
            IoType::Write => pick(&s.avg_write_ns, &s.p99_write_ns),
            _ => 0,
        }
    }

    fn poll(&self) -> PollStatus {
        let mut busy = false;
        let gen = self.shared.abort_gen.load(Ordering::Acquire);
        if gen != self.seen_abort_gen.get() {
            self.seen_abort_gen.set(gen);
            busy |= self.abort_delayed();
        }
        let now_ns = reactor::now_ns();
        let all = self.shared.releasing.load(Ordering::Acquire);
        for _ in 0..RELEASE_BATCH {
            let slot = {
                let mut timers = self.timers.borrow_mut();
                match timers.peek() {
                    Some(Reverse((due_ns, _, slot))) if all || *due_ns <= now_ns => {
                        let slot = *slot;
                        timers.pop();
                        slot
                    }
                    _ => break,
                }
            };
            self.forward(slot);
            busy = true;
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    /// Completes every IO still waiting for its time as Aborted.
    fn abort_delayed(&self) -> bool {
        let mut any = false;
        loop {
            let Some(Reverse((_, _, slot))) = self.timers.borrow_mut().pop() else { break };
            if let Some(io) = self.parked.borrow_mut().take(slot) {
                io.fail(IoError::Aborted);
            }
            any = true;
        }
        any
    }

    /// Submits the parked IO in `slot` to the base through a child IO.
    fn forward(&self, slot: u32) {
        let child = {
            let parked = self.parked.borrow();
            let Some(p) = parked.get(slot) else { return };
            IoBox::data(p.io_type, p.offset_blocks, p.num_blocks, p.buf.clone()).map(|mut child| {
                child.flags = p.flags;
                child
            })
        };
        let (Some(mut child), Some(me)) = (child, self.me.upgrade()) else {
            if let Some(io) = self.parked.borrow_mut().take(slot) {
                io.fail(IoError::NoMemory);
            }
            return;
        };
        child.tag = slot as u64;
        child.set_done(me);
        self.base.submit(child);
    }
}

impl BdevChannel for DelayChannel {
    fn submit(&self, io: IoBox) {
        if io.io_type == IoType::Reset {
            // As SPDK: a reset aborts every delayed IO, on every reactor (the
            // others at their next poll), then resets the base.
            self.shared.abort_gen.fetch_add(1, Ordering::AcqRel);
            self.seen_abort_gen.set(self.shared.abort_gen.load(Ordering::Acquire));
            self.abort_delayed();
            if !self.base.handle().bdev().io_type_supported(IoType::Reset) {
                return io.complete(IoStatus::Success);
            }
        }
        if self.parked.borrow().len() >= MAX_DELAYED_IOS {
            return io.fail(IoError::NoMemory);
        }
        let delay_ns = if io.io_type == IoType::Reset || self.shared.releasing.load(Ordering::Acquire) {
            0
        } else {
            self.delay_ns(io.io_type)
        };
        let slot = self.parked.borrow_mut().insert(io);
        if delay_ns == 0 {
            return self.forward(slot);
        }
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        let due_ns = reactor::now_ns().saturating_add(delay_ns);
        self.timers.borrow_mut().push(Reverse((due_ns, seq, slot)));
    }

    /// An IO still in the delay queue never reaches the base: it completes
    /// Aborted now. One already forwarded is the base's.
    fn abort(&self, matches: &dyn Fn(&BdevIo) -> bool) -> bool {
        let Some(slot) = self.find_delayed(matches) else {
            return false;
        };
        self.timers.borrow_mut().retain(|Reverse((_, _, s))| *s != slot);
        match self.parked.borrow_mut().take(slot) {
            Some(io) => io.fail(IoError::Aborted),
            None => return false,
        }
        true
    }
}

impl DelayChannel {
    /// The parked slot of the first IO still waiting for its time that
    /// `matches` (IOs already forwarded to the base are not this layer's).
    fn find_delayed(&self, matches: &dyn Fn(&BdevIo) -> bool) -> Option<u32> {
        let parked = self.parked.borrow();
        let timers = self.timers.borrow();
        timers.iter().map(|Reverse((_, _, slot))| *slot).find(|&slot| parked.get(slot).is_some_and(|io| matches(io)))
    }
}

impl IoDone for DelayChannel {
    fn io_done(&self, child: IoBox) {
        let (slot, status) = (child.tag as u32, child.status);
        drop(child);
        match self.parked.borrow_mut().take(slot) {
            Some(parent) => parent.complete(status),
            None => tracing::error!(slot, "delay bdev: completion for an empty slot"),
        }
    }
}

impl Drop for DelayChannel {
    fn drop(&mut self) {
        if let Some(p) = self.poller.get_mut().take() {
            p.unregister();
        }
    }
}
