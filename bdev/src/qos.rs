//! Per-bdev rate limits (`bdev_set_qos_limit`): IOs per second over reads
//! and writes, and bytes per second over reads and writes, reads only, or
//! writes only; 0 is unlimited. Plus the per-bdev settings table the IO path
//! reads (rate limits, histogram), and each reactor's index of its channels.
//!
//! Design: one budget per limit and timeslice (1 ms, as SPDK's), held in
//! atomics that every reactor's channel of the bdev shares. A channel takes
//! an IO's cost from each budget with one `fetch_sub` on its own reactor: no
//! lock, no clock read, and no IO moves to another reactor. An IO that finds
//! a budget spent waits in its channel's queue (it never fails), and its
//! reactor's QoS poller releases it once a later timeslice has refilled the
//! budget. Whichever reactor's poller first sees a timeslice over refills
//! the budgets (a compare-and-swap on the slice's end decides). SPDK keeps
//! its budgets in atomics too, but one QoS thread refills them and then
//! messages every channel's thread to release its IO, each timeslice; here
//! no reactor owns a bdev's QoS and a timeslice costs no messages.
//!
//! Accounting as SPDK's: reads and writes count, other IO passes; an IO
//! is admitted while its budget is positive, so one large IO may overrun a
//! byte budget, and the overrun is taken from the next timeslice; unused
//! budget does not carry over.

use crate::channel::{BdevChannel, ChannelStats};
use crate::histogram::HistogramConfig;
use crate::io::{BdevIo, IoBox, IoError, IoType};
use crate::registry::BdevHandle;
use crate::BdevError;
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One timeslice, the period budgets refill at (SPDK's 1 ms).
pub const TIMESLICE_NS: u64 = 1_000_000;
const SLICES_PER_SEC: u64 = 1_000_000_000 / TIMESLICE_NS;
/// IOPS limits are multiples of this (smaller ones round up to it).
pub const MIN_IOS_PER_SEC: u64 = 1000;
/// Byte limits are multiples of 1 MiB per second.
pub const MIN_BYTES_PER_SEC: u64 = 1 << 20;
/// The smallest budget of one timeslice, so a low limit still moves IO.
const MIN_IOS_PER_SLICE: u64 = 1;
const MIN_BYTES_PER_SLICE: u64 = 512;
/// MiB/s beyond this would overflow bytes/s; larger requests are clamped.
const MAX_MBYTES_PER_SEC: u64 = u64::MAX / MIN_BYTES_PER_SEC;
/// Timeslices a late refill may credit at once. The pollers refill every
/// timeslice while a bdev is limited, so more than one passes only when
/// the reactors ran late (a loaded machine): the IO they held back catches
/// up, as SPDK credits every missed timeslice, but a stall of more than
/// 100 ms does not turn into a burst.
const MAX_CATCHUP_SLICES: u64 = 100;

/// The four limits, in SPDK's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimit {
    RwIos,
    RwBytes,
    ReadBytes,
    WriteBytes,
}

impl RateLimit {
    pub const ALL: [RateLimit; 4] = [RateLimit::RwIos, RateLimit::RwBytes, RateLimit::ReadBytes, RateLimit::WriteBytes];

    /// The parameter of `bdev_set_qos_limit` and key of `assigned_rate_limits`.
    pub fn rpc_name(self) -> &'static str {
        match self {
            RateLimit::RwIos => "rw_ios_per_sec",
            RateLimit::RwBytes => "rw_mbytes_per_sec",
            RateLimit::ReadBytes => "r_mbytes_per_sec",
            RateLimit::WriteBytes => "w_mbytes_per_sec",
        }
    }

    fn is_iops(self) -> bool {
        self == RateLimit::RwIos
    }

    /// What an IO costs against this limit (0: not counted).
    #[inline]
    fn cost(self, io_type: IoType, bytes: u64) -> u64 {
        match (self, io_type) {
            (RateLimit::RwIos, IoType::Read | IoType::Write) => 1,
            (RateLimit::RwBytes, IoType::Read | IoType::Write)
            | (RateLimit::ReadBytes, IoType::Read)
            | (RateLimit::WriteBytes, IoType::Write) => bytes,
            _ => 0,
        }
    }
}

/// The limits of one `bdev_set_qos_limit` call in its units (IOs/s, MiB/s),
/// indexed like [`RateLimit::ALL`]: None leaves a limit as it is, 0 removes it.
pub type QosRequest = [Option<u64>; 4];

/// The limits in force in the units users see (IOs/s, MiB/s), indexed like
/// [`RateLimit::ALL`]; 0 is unlimited.
pub type RateLimits = [u64; 4];

/// A bdev's shared budgets. Written by the control plane (one change at a
/// time, under `change`), read and spent by every reactor's channel.
pub struct BdevQos {
    /// Limit per second in IOs or bytes; 0 is unlimited.
    per_sec: [AtomicU64; 4],
    /// Budget of one timeslice; 0 is unlimited.
    per_slice: [AtomicU64; 4],
    /// What is left of this timeslice's budget (negative after an overrun).
    remaining: [AtomicI64; 4],
    /// End of the current timeslice on the reactors' clock.
    slice_end_ns: AtomicU64,
    /// Any limit set.
    active: AtomicBool,
    /// Channels with IO waiting: while any has, new IO waits behind it.
    waiting_channels: AtomicU64,
    change: Mutex<()>,
}

impl Default for BdevQos {
    fn default() -> Self {
        BdevQos {
            per_sec: Default::default(),
            per_slice: Default::default(),
            remaining: Default::default(),
            slice_end_ns: AtomicU64::new(0),
            active: AtomicBool::new(false),
            waiting_channels: AtomicU64::new(0),
            change: Mutex::new(()),
        }
    }
}

impl BdevQos {
    #[inline]
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// The limits in force, in IOs/s and MiB/s.
    pub fn limits(&self) -> RateLimits {
        let mut out = [0; 4];
        for (i, l) in RateLimit::ALL.into_iter().enumerate() {
            let v = self.per_sec[i].load(Ordering::Acquire);
            out[i] = if l.is_iops() { v } else { v / MIN_BYTES_PER_SEC };
        }
        out
    }

    /// Applies a request: rounds each given limit up to its multiple (as
    /// SPDK does, with a warning), keeps those not given, and starts a fresh
    /// timeslice at `now_ns`. Returns the limits now in force.
    pub fn apply(&self, name: &str, req: &QosRequest, now_ns: u64) -> Result<RateLimits, BdevError> {
        if req.iter().all(Option::is_none) {
            return Err(BdevError::Invalid("No rate limits specified".into()));
        }
        let _one_change = self.change.lock().unwrap_or_else(|e| e.into_inner());
        for (i, l) in RateLimit::ALL.into_iter().enumerate() {
            let Some(given) = req[i] else { continue };
            let (per_sec, min_per_sec, min_per_slice) = if l.is_iops() {
                (given, MIN_IOS_PER_SEC, MIN_IOS_PER_SLICE)
            } else {
                if given > MAX_MBYTES_PER_SEC {
                    tracing::warn!(
                        bdev = name,
                        limit = l.rpc_name(),
                        given,
                        "rate limit clamped to {MAX_MBYTES_PER_SEC}"
                    );
                }
                (given.min(MAX_MBYTES_PER_SEC) * MIN_BYTES_PER_SEC, MIN_BYTES_PER_SEC, MIN_BYTES_PER_SLICE)
            };
            let per_sec = match per_sec % min_per_sec {
                0 => per_sec,
                r => {
                    let up = per_sec.saturating_add(min_per_sec - r);
                    tracing::warn!(
                        bdev = name,
                        limit = l.rpc_name(),
                        given,
                        "not a multiple of {min_per_sec}: rounded up to {up}"
                    );
                    up
                }
            };
            let per_slice = if per_sec == 0 { 0 } else { (per_sec / SLICES_PER_SEC).max(min_per_slice) };
            self.per_sec[i].store(per_sec, Ordering::Release);
            self.per_slice[i].store(per_slice, Ordering::Release);
        }
        for i in 0..4 {
            let budget = self.per_slice[i].load(Ordering::Acquire);
            self.remaining[i].store(i64::try_from(budget).unwrap_or(i64::MAX), Ordering::Release);
        }
        self.slice_end_ns.store(now_ns + TIMESLICE_NS, Ordering::Release);
        let active = self.per_slice.iter().any(|s| s.load(Ordering::Acquire) > 0);
        self.active.store(active, Ordering::Release);
        Ok(self.limits())
    }

    /// Starts the next timeslice if the current one is over: the first
    /// caller to see it wins the compare-and-swap and credits the budgets.
    #[inline]
    pub fn refill(&self, now_ns: u64) {
        let end = self.slice_end_ns.load(Ordering::Acquire);
        if now_ns < end {
            return;
        }
        let passed = (now_ns - end) / TIMESLICE_NS + 1;
        let next_end = end + passed * TIMESLICE_NS;
        if self.slice_end_ns.compare_exchange(end, next_end, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return;
        }
        let slices = passed.min(MAX_CATCHUP_SLICES);
        for i in 0..4 {
            let budget = self.per_slice[i].load(Ordering::Acquire);
            if budget == 0 {
                continue;
            }
            let credit = i64::try_from(budget.saturating_mul(slices)).unwrap_or(i64::MAX);
            // Unused budget lapses; an overrun is paid from the new one.
            let _ = self.remaining[i]
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| Some(r.min(0).saturating_add(credit)));
        }
    }

    /// Whether a limit in force counts this IO.
    #[inline]
    fn counts(&self, io_type: IoType, bytes: u64) -> bool {
        self.is_active()
            && RateLimit::ALL
                .into_iter()
                .enumerate()
                .any(|(i, l)| l.cost(io_type, bytes) > 0 && self.per_slice[i].load(Ordering::Relaxed) > 0)
    }

    /// Takes an IO's cost from every budget it counts against, or nothing
    /// when any of them is spent (then the IO waits).
    #[inline]
    pub fn try_take(&self, io_type: IoType, bytes: u64) -> bool {
        let mut taken = [0u64; 4];
        for (i, l) in RateLimit::ALL.into_iter().enumerate() {
            let cost = l.cost(io_type, bytes);
            if cost == 0 || self.per_slice[i].load(Ordering::Relaxed) == 0 {
                continue;
            }
            let cost_i = i64::try_from(cost).unwrap_or(i64::MAX);
            let before = self.remaining[i].fetch_sub(cost_i, Ordering::AcqRel);
            if before <= 0 {
                self.remaining[i].fetch_add(cost_i, Ordering::AcqRel);
                for (j, &t) in taken.iter().enumerate().take(i) {
                    if t > 0 {
                        self.remaining[j].fetch_add(i64::try_from(t).unwrap_or(i64::MAX), Ordering::AcqRel);
                    }
                }
                return false;
            }
            taken[i] = cost;
        }
        true
    }
}

/// A channel's QoS gate: in front of the module's channel, holds the IOs
/// over budget in arrival order.
pub(crate) struct QosGate {
    bdev: Arc<BdevQos>,
    inner: Rc<dyn BdevChannel>,
    block_size: u64,
    /// The queue has room for every descriptor this reactor owns, so queueing
    /// never allocates; set on this reactor before the gate holds any IO.
    armed: Cell<bool>,
    waiting: RefCell<VecDeque<IoBox>>,
    /// The timeslice (its end) this gate last released IO in, and what it
    /// took from each budget then: its fair share caps the first release.
    slice_seen: Cell<u64>,
    taken: [Cell<u64>; 4],
}

impl QosGate {
    pub(crate) fn new(bdev: Arc<BdevQos>, inner: Rc<dyn BdevChannel>, block_size: u64) -> Rc<QosGate> {
        Rc::new(QosGate {
            bdev,
            inner,
            block_size,
            armed: Cell::new(false),
            waiting: RefCell::default(),
            slice_seen: Cell::new(0),
            taken: Default::default(),
        })
    }

    #[inline]
    pub(crate) fn armed(&self) -> bool {
        self.armed.get()
    }

    fn cost_bytes(&self, io: &BdevIo) -> u64 {
        io.num_blocks.saturating_mul(self.block_size)
    }

    /// Passes `io` on if no limit counts it, or if its budgets allow and no
    /// channel of the bdev has IO waiting (those go first, from the
    /// pollers); queues it otherwise. So reads pass freely under a write
    /// limit, and a busy reactor cannot take a budget others wait for.
    #[inline]
    pub(crate) fn submit(&self, io: IoBox) {
        let bytes = self.cost_bytes(&io);
        let pass = !self.bdev.counts(io.io_type, bytes)
            || (self.bdev.waiting_channels.load(Ordering::Acquire) == 0 && self.bdev.try_take(io.io_type, bytes));
        if pass {
            self.inner.submit(io);
        } else {
            let mut w = self.waiting.borrow_mut();
            if w.is_empty() {
                self.bdev.waiting_channels.fetch_add(1, Ordering::AcqRel);
            }
            // Room was reserved when armed: only descriptors from another
            // reactor's pool could make this grow.
            w.push_back(io);
        }
    }

    /// Submits the waiting IOs the budgets now allow (all of them once the
    /// limits are gone), oldest first; the others keep their order. The
    /// first release in a timeslice takes at most this channel's share of
    /// each budget (an equal part among the channels with IO waiting); a
    /// later one in the same timeslice takes what the others left.
    /// Returns how many IOs went.
    fn release(&self) -> usize {
        let queued = self.waiting.borrow().len();
        if queued == 0 {
            return 0;
        }
        let slice = self.bdev.slice_end_ns.load(Ordering::Acquire);
        let first = self.slice_seen.replace(slice) != slice;
        let sharers = self.bdev.waiting_channels.load(Ordering::Acquire).max(1);
        let mut cap = [u64::MAX; 4];
        for (i, c) in cap.iter_mut().enumerate() {
            let budget = self.bdev.per_slice[i].load(Ordering::Acquire);
            if first {
                self.taken[i].set(0);
                if budget > 0 {
                    *c = budget.div_ceil(sharers);
                }
            }
        }
        let mut n = 0;
        for _ in 0..queued {
            let Some(io) = self.waiting.borrow_mut().pop_front() else { break };
            let bytes = self.cost_bytes(&io);
            let within_share = RateLimit::ALL
                .into_iter()
                .enumerate()
                .all(|(i, l)| l.cost(io.io_type, bytes) == 0 || self.taken[i].get() < cap[i]);
            let go = !self.bdev.counts(io.io_type, bytes) || (within_share && self.bdev.try_take(io.io_type, bytes));
            if go {
                for (i, l) in RateLimit::ALL.into_iter().enumerate() {
                    self.taken[i].set(self.taken[i].get().saturating_add(l.cost(io.io_type, bytes)));
                }
                self.inner.submit(io);
                n += 1;
            } else {
                self.waiting.borrow_mut().push_back(io);
            }
        }
        if self.waiting.borrow().is_empty() {
            self.bdev.waiting_channels.fetch_sub(1, Ordering::AcqRel);
        }
        n
    }

    /// Aborts the first waiting IO that `matches`.
    pub(crate) fn abort(&self, matches: &dyn Fn(&BdevIo) -> bool) -> bool {
        let io = {
            let mut w = self.waiting.borrow_mut();
            let Some(pos) = w.iter().position(|io| matches(io)) else { return false };
            let io = w.remove(pos);
            if w.is_empty() {
                self.bdev.waiting_channels.fetch_sub(1, Ordering::AcqRel);
            }
            io
        };
        match io {
            Some(io) => {
                io.fail(IoError::Aborted);
                true
            }
            None => false,
        }
    }

    pub(crate) fn waiting(&self) -> usize {
        self.waiting.borrow().len()
    }
}

impl Drop for QosGate {
    fn drop(&mut self) {
        // A reactor that stops with IO waiting: the others stop deferring to it.
        if !self.waiting.get_mut().is_empty() {
            self.bdev.waiting_channels.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Per-bdev settings the IO path reads, one entry per bdev that has a
/// channel or settings; dropped when the bdev goes away.
#[derive(Default)]
pub(crate) struct BdevControls {
    pub(crate) qos: Arc<BdevQos>,
    pub(crate) histogram: Mutex<Option<HistogramConfig>>,
}

#[derive(Default)]
struct ControlsTable(Mutex<HashMap<u64, Arc<BdevControls>>>);

/// The settings of `h`, created on first use (control path).
pub(crate) fn controls(h: &BdevHandle) -> Arc<BdevControls> {
    let table = reactor::global::<ControlsTable>();
    let mut t = table.0.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = t.get(&h.id()) {
        return c.clone();
    }
    let c = Arc::new(BdevControls::default());
    t.insert(h.id(), c.clone());
    drop(t);
    let (table, id) = (table.clone(), h.id());
    h.on_remove(move || {
        table.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    });
    c
}

/// The settings of `h` if it has any (never creates them).
pub(crate) fn existing_controls(h: &BdevHandle) -> Option<Arc<BdevControls>> {
    reactor::current()?;
    reactor::global::<ControlsTable>().0.lock().unwrap_or_else(|e| e.into_inner()).get(&h.id()).cloned()
}

/// The parts of a channel that control-plane broadcasts reach.
type ChannelParts = (Weak<ChannelStats>, Weak<QosGate>);

/// This reactor's channels by bdev id (for control-plane broadcasts), its
/// armed QoS gates, and its QoS poller.
#[derive(Default)]
struct LocalChannels {
    by_bdev: RefCell<HashMap<u64, ChannelParts>>,
    armed: RefCell<Vec<Weak<QosGate>>>,
    poller: Cell<bool>,
}

/// Records a new channel of bdev `id` on this reactor, armed at once if the
/// bdev is limited (control path: the channel is being created).
pub(crate) fn register_channel(id: u64, stats: &Rc<ChannelStats>, gate: &Rc<QosGate>) {
    let local = reactor::local::<LocalChannels>();
    let mut map = local.by_bdev.borrow_mut();
    map.retain(|_, (s, _)| s.strong_count() > 0);
    map.insert(id, (Rc::downgrade(stats), Rc::downgrade(gate)));
    drop(map);
    if gate.bdev.is_active() {
        arm(&local, gate);
    }
}

/// This reactor's channel parts of bdev `id`, if it has a channel.
pub(crate) fn local_channel(id: u64) -> Option<(Rc<ChannelStats>, Rc<QosGate>)> {
    let local = reactor::local::<LocalChannels>();
    let map = local.by_bdev.borrow();
    let (s, g) = map.get(&id)?;
    Some((s.upgrade()?, g.upgrade()?))
}

fn arm(local: &Rc<LocalChannels>, gate: &Rc<QosGate>) {
    if !gate.armed.get() {
        let room = crate::io::pool_size().saturating_sub(gate.waiting());
        gate.waiting.borrow_mut().reserve(room);
        gate.armed.set(true);
        local.armed.borrow_mut().push(Rc::downgrade(gate));
    }
    if !local.poller.replace(true) {
        let weak = Rc::downgrade(local);
        // Twice a timeslice: once for the channel's share, once more for
        // what the other channels left.
        reactor::register_timed_poller("bdev_qos", Duration::from_nanos(TIMESLICE_NS / 2), move || {
            weak.upgrade().map_or(reactor::PollStatus::Done, |l| poll_gates(&l))
        });
    }
}

/// The QoS poller: each timeslice, releases what the refilled budgets
/// allow; disarms gates of bdevs no longer limited once they are empty,
/// and stops when no gate is armed.
fn poll_gates(local: &LocalChannels) -> reactor::PollStatus {
    let now = reactor::now_ns();
    let mut released = 0;
    let mut i = 0;
    loop {
        let gate = match local.armed.borrow().get(i) {
            Some(g) => g.upgrade(),
            None => break,
        };
        let keep = match gate {
            Some(g) => {
                g.bdev.refill(now);
                released += g.release();
                let keep = g.bdev.is_active() || g.waiting() > 0;
                if !keep {
                    g.armed.set(false);
                }
                keep
            }
            None => false,
        };
        if keep {
            i += 1;
        } else {
            local.armed.borrow_mut().swap_remove(i);
        }
    }
    if local.armed.borrow().is_empty() {
        local.poller.set(false);
        return reactor::PollStatus::Done;
    }
    if released > 0 {
        reactor::PollStatus::Busy
    } else {
        reactor::PollStatus::Idle
    }
}

/// Sets `h`'s rate limits and arms its channels on every reactor before
/// `done` runs (SPDK answers once every channel knows). Must run on a reactor.
pub fn set_rate_limits(
    h: &BdevHandle,
    req: QosRequest,
    done: impl FnOnce(Result<RateLimits, BdevError>) + Send + 'static,
) {
    let c = controls(h);
    let limits = match c.qos.apply(h.name(), &req, reactor::now_ns()) {
        Ok(l) => l,
        Err(e) => return done(Err(e)),
    };
    tracing::info!(bdev = h.name(), ?limits, "QoS rate limits set");
    let id = h.id();
    reactor::for_each_reactor(
        Arc::new(move || {
            let Some((_, gate)) = local_channel(id) else { return };
            let local = reactor::local::<LocalChannels>();
            if gate.bdev.is_active() {
                arm(&local, &gate);
            } else {
                // Limits removed: what waits goes now, not a timeslice later.
                gate.release();
            }
        }),
        move || done(Ok(limits)),
    );
}

/// The limits in force on `h` (all 0 when none was set).
pub fn rate_limits(h: &BdevHandle) -> RateLimits {
    existing_controls(h).map_or([0; 4], |c| c.qos.limits())
}

/// `assigned_rate_limits` of `bdev_get_bdevs`.
pub fn assigned_rate_limits_json(h: &BdevHandle) -> Value {
    let l = rate_limits(h);
    let mut m = serde_json::Map::new();
    for (i, r) in RateLimit::ALL.into_iter().enumerate() {
        m.insert(r.rpc_name().into(), Value::from(l[i]));
    }
    Value::Object(m)
}

/// The `bdev_set_qos_limit` call that restores `h`'s limits, for
/// `save_config`; None when none is set. Lists the limits in force, as SPDK.
pub fn config_json(h: &BdevHandle) -> Option<Value> {
    let l = rate_limits(h);
    if l.iter().all(|&v| v == 0) {
        return None;
    }
    let mut params = serde_json::Map::new();
    params.insert("name".into(), Value::from(h.name()));
    for (i, r) in RateLimit::ALL.into_iter().enumerate() {
        if l[i] > 0 {
            params.insert(r.rpc_name().into(), Value::from(l[i]));
        }
    }
    Some(json!({"method": "bdev_set_qos_limit", "params": params}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_round_up_to_their_multiples_and_zero_removes() {
        let q = BdevQos::default();
        assert_eq!(q.apply("b", &[None; 4], 0), Err(BdevError::Invalid("No rate limits specified".into())));
        assert_eq!(q.apply("b", &[Some(1500), None, None, None], 0).unwrap(), [2000, 0, 0, 0]);
        assert_eq!(q.apply("b", &[Some(500), None, Some(5), None], 0).unwrap(), [1000, 0, 5, 0]);
        assert!(q.is_active());
        // Not given: kept. Given 0: removed.
        assert_eq!(q.apply("b", &[Some(0), None, None, Some(3)], 0).unwrap(), [0, 0, 5, 3]);
        assert_eq!(q.apply("b", &[None, None, Some(0), Some(0)], 0).unwrap(), [0; 4]);
        assert!(!q.is_active());
        assert_eq!(q.apply("b", &[None, Some(u64::MAX), None, None], 0).unwrap()[1], MAX_MBYTES_PER_SEC);
    }

    #[test]
    fn a_budget_admits_its_share_per_timeslice_and_no_more() {
        let q = BdevQos::default();
        q.apply("b", &[Some(10_000), None, None, None], 0).unwrap();
        let take_all = |q: &BdevQos| (0..1000).take_while(|_| q.try_take(IoType::Read, 4096)).count();
        assert_eq!(take_all(&q), 10);
        // Unmaps and flushes are not counted.
        assert!(q.try_take(IoType::Unmap, 1 << 20) && q.try_take(IoType::Flush, 0));
        q.refill(TIMESLICE_NS - 1);
        assert_eq!(take_all(&q), 0);
        q.refill(TIMESLICE_NS);
        assert_eq!(take_all(&q), 10);
        // Three slices late: three slices' budget; a thousand: capped.
        q.refill(4 * TIMESLICE_NS);
        assert_eq!(take_all(&q), 30);
        q.refill(1004 * TIMESLICE_NS);
        assert_eq!(take_all(&q), 10 * MAX_CATCHUP_SLICES as usize);
    }

    #[test]
    fn a_large_io_overruns_once_and_the_next_slice_pays() {
        let q = BdevQos::default();
        // 1 MiB/s of writes: 1048 bytes a slice.
        q.apply("b", &[None, None, None, Some(1)], 0).unwrap();
        assert!(q.try_take(IoType::Write, 4096));
        assert!(!q.try_take(IoType::Write, 512));
        assert!(q.try_take(IoType::Read, 1 << 20), "reads are not limited");
        // 4096 - 1048 = 3048 owed: two more slices pass before a write fits.
        q.refill(TIMESLICE_NS);
        assert!(!q.try_take(IoType::Write, 512));
        q.refill(2 * TIMESLICE_NS);
        assert!(!q.try_take(IoType::Write, 512));
        q.refill(3 * TIMESLICE_NS);
        assert!(q.try_take(IoType::Write, 512));
    }

    #[test]
    fn a_refused_io_takes_nothing_from_the_other_budgets() {
        let q = BdevQos::default();
        // 1000 IOPS (1 a slice) and 1 MiB/s of reads.
        q.apply("b", &[Some(1000), None, Some(1), None], 0).unwrap();
        assert!(q.try_take(IoType::Read, 512));
        // The IOPS budget is spent: the read budget must be untouched.
        assert!(!q.try_take(IoType::Read, 512));
        let read_left = q.remaining[2].load(Ordering::Relaxed);
        assert_eq!(read_left, 1048 - 512);
    }
}
