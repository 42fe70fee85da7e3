//! A set of reactors: started one pinned thread per core of a core mask, or
//! created "manual" for deterministic tests that run one loop at a time.

use crate::clock::Clock;
use crate::reactor::{enter, IdlePolicy, Local, Message, ReactorId, SetInner, Shared};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Ring capacity per reactor unless configured otherwise.
pub const DEFAULT_RING_CAPACITY: usize = 65_536;

#[derive(Clone, Debug)]
pub struct ReactorConfig {
    /// CPU cores, one reactor each, in reactor-id order.
    pub cores: Vec<usize>,
    pub idle: IdlePolicy,
    pub ring_capacity: usize,
    /// Pin each reactor thread to its core (off in tests that oversubscribe).
    pub pin: bool,
}

impl ReactorConfig {
    pub fn new(cores: Vec<usize>, idle: IdlePolicy) -> Self {
        ReactorConfig { cores, idle, ring_capacity: DEFAULT_RING_CAPACITY, pin: true }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct CoreMaskError(pub String);

impl std::fmt::Display for CoreMaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid core mask: {}", self.0)
    }
}
impl std::error::Error for CoreMaskError {}

/// Parses an SPDK core mask: hex (`0x3`, `3`) or a list (`[0,2-3]`).
pub fn parse_core_mask(s: &str) -> Result<Vec<usize>, CoreMaskError> {
    let s = s.trim();
    let err = |why: &str| CoreMaskError(format!("'{s}': {why}"));
    let mut cores = Vec::new();
    if let Some(list) = s.strip_prefix('[') {
        let list = list.strip_suffix(']').ok_or_else(|| err("missing ']'"))?;
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a, b),
                None => (part, part),
            };
            let a: usize = a.trim().parse().map_err(|_| err("not a core number"))?;
            let b: usize = b.trim().parse().map_err(|_| err("not a core number"))?;
            if a > b || b >= 1024 {
                return Err(err("bad core range"));
            }
            cores.extend(a..=b);
        }
    } else {
        let hex = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or(s);
        if hex.is_empty() || hex.len() > 32 {
            return Err(err("expected a hex mask such as 0x3"));
        }
        let mask = u128::from_str_radix(hex, 16).map_err(|_| err("not hexadecimal"))?;
        cores.extend((0..128).filter(|i| mask & (1u128 << i) != 0));
    }
    cores.sort_unstable();
    cores.dedup();
    if cores.is_empty() {
        return Err(err("selects no core"));
    }
    Ok(cores)
}

/// A reactor's measurements of its own loop. Ticks are [`crate::tsc`] ticks
/// (rate: [`crate::tsc::tick_rate`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReactorStats {
    /// Loops that did work, and loops that did not.
    pub busy_loops: u64,
    pub idle_loops: u64,
    /// Time parked by the sleep-when-idle policy.
    pub slept_ns: u64,
    /// Sleeps that ended (by a message, a timer, an interrupt or a stop),
    /// and those an interrupt poller's eventfd ended (interrupt mode).
    pub wakeups: u64,
    pub interrupt_wakeups: u64,
    /// Ticks spent in loops that did work, and in loops that did not
    /// (sleeping included): SPDK's `busy` and `idle`.
    pub busy_ticks: u64,
    pub idle_ticks: u64,
    /// Tick count when the loop started (0 until it has).
    pub started_ticks: u64,
    /// The reactor thread's Linux thread id (None in a manual set, or off Linux).
    pub tid: Option<u64>,
    /// Pollers registered now: those run every loop (interrupt pollers
    /// included) and timed ones.
    pub every_loop_pollers: u32,
    pub timed_pollers: u32,
}

/// Handle to a running (or manual) set of reactors. Cloneable and `Send`.
#[derive(Clone)]
pub struct ReactorSet {
    inner: Arc<SetInner>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// A manual set keeps its reactors' thread-owned state here, on the test thread.
pub struct ManualSet {
    set: ReactorSet,
    locals: Vec<Rc<Local>>,
}

impl ReactorSet {
    /// Starts one thread per configured core. `init` runs first on reactor 0
    /// (the application reactor), before any other message.
    pub fn start(cfg: ReactorConfig, init: impl FnOnce() + Send + 'static) -> std::io::Result<Self> {
        if cfg.cores.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no cores"));
        }
        crate::tsc::calibrate_in_background();
        let mut shared = Vec::with_capacity(cfg.cores.len());
        for &c in &cfg.cores {
            // Interrupt mode needs an eventfd per reactor; without one it
            // cannot sleep on interrupts, so the set does not start.
            let wake_fd = if cfg.idle.uses_interrupts() {
                Some(crate::EventFd::new().map_err(|e| {
                    std::io::Error::new(e.kind(), format!("interrupt mode: cannot create an eventfd: {e}"))
                })?)
            } else {
                None
            };
            shared.push(Shared::new(Some(c), cfg.ring_capacity, wake_fd));
        }
        let inner = SetInner::new(shared, Clock::real(), cfg.idle);
        let set = ReactorSet { inner: inner.clone(), threads: Arc::new(Mutex::new(Vec::new())) };
        // The init message is queued before reactor 0 starts, so it runs first.
        if inner.push(0, Message::Call(Box::new(init))).is_err() {
            unreachable!("a fresh ring has room");
        }
        let available: Vec<usize> =
            core_affinity::get_core_ids().unwrap_or_default().into_iter().map(|c| c.id).collect();
        for (id, &core) in cfg.cores.iter().enumerate() {
            let inner = inner.clone();
            let pin = cfg.pin && available.contains(&core);
            let handle = std::thread::Builder::new().name(format!("reactor_{core}")).spawn(move || {
                if pin {
                    core_affinity::set_for_current(core_affinity::CoreId { id: core });
                }
                let _ = inner.reactors[id].thread.set(std::thread::current());
                let local = Local::new(id, inner.clone());
                let shared = &inner.reactors[id];
                enter(&local, || {
                    let mut loop_start = shared.start_loop();
                    while !inner.stop.load(Ordering::Acquire) {
                        let busy = local.run_once();
                        local.idle(busy);
                        // A sleep inside `idle` counts as idle time, as in SPDK.
                        loop_start = shared.account_ticks(busy, loop_start);
                    }
                });
                // Per-reactor state (channels, pools) is dropped here, on its own thread.
                drop(local);
            })?;
            set.threads.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
        }
        Ok(set)
    }

    /// A set of `n` reactors with no threads and a manual clock: the caller
    /// runs loops with [`ManualSet::run_once`].
    pub fn manual(n: usize) -> ManualSet {
        let shared = (0..n.max(1)).map(|_| Shared::new(None, DEFAULT_RING_CAPACITY, None)).collect();
        let inner = SetInner::new(shared, Clock::manual(), IdlePolicy::BusyPoll);
        let locals = (0..n.max(1)).map(|id| Local::new(id, inner.clone())).collect();
        ManualSet { set: ReactorSet { inner, threads: Arc::new(Mutex::new(Vec::new())) }, locals }
    }

    pub fn count(&self) -> usize {
        self.inner.reactors.len()
    }

    /// The CPU core of a reactor (None in a manual set).
    pub fn core(&self, id: ReactorId) -> Option<usize> {
        self.inner.reactors.get(id).and_then(|r| r.core)
    }

    /// Runs `f` on reactor `to`; callable from any thread.
    pub fn send(&self, to: ReactorId, f: impl FnOnce() + Send + 'static) {
        let _ = self.inner.push(to, Message::Call(Box::new(f)));
    }

    /// Runs `f` on reactor `to` and waits for its result (not for use on a
    /// reactor thread of this set: it would wait for itself).
    pub fn call<R: Send + 'static>(&self, to: ReactorId, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.send(to, move || {
            let _ = tx.send(f());
        });
        rx.recv().expect("reactor stopped before answering")
    }

    /// Asks every reactor to leave its loop after the current iteration.
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::Release);
        for r in &self.inner.reactors {
            r.wake_up();
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.inner.stop.load(Ordering::Acquire)
    }

    /// Waits for all reactor threads to end.
    pub fn join(&self) {
        let handles: Vec<_> = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }

    /// What a reactor has measured of its own loop.
    pub fn stats(&self, id: ReactorId) -> Option<ReactorStats> {
        self.inner.reactors.get(id).map(|r| ReactorStats {
            busy_loops: r.busy_loops.load(Ordering::Relaxed),
            idle_loops: r.idle_loops.load(Ordering::Relaxed),
            slept_ns: r.sleeping_ns.load(Ordering::Relaxed),
            wakeups: r.wakeups.load(Ordering::Relaxed),
            interrupt_wakeups: r.interrupt_wakeups.load(Ordering::Relaxed),
            busy_ticks: r.busy_ticks.load(Ordering::Relaxed),
            idle_ticks: r.idle_ticks.load(Ordering::Relaxed),
            started_ticks: r.started_ticks.load(Ordering::Relaxed),
            tid: r.tid.get().copied(),
            every_loop_pollers: r.every_loop_pollers.load(Ordering::Relaxed),
            timed_pollers: r.timed_pollers.load(Ordering::Relaxed),
        })
    }

    /// Set-wide state of type `T` (see [`crate::global`]).
    pub fn global<T: Default + Send + Sync + 'static>(&self) -> Arc<T> {
        self.inner.global::<T>()
    }

    pub fn idle_policy(&self) -> IdlePolicy {
        self.inner.idle
    }

    pub fn now_ns(&self) -> u64 {
        self.inner.clock.now_ns()
    }
}

impl ManualSet {
    pub fn handle(&self) -> &ReactorSet {
        &self.set
    }

    pub fn count(&self) -> usize {
        self.locals.len()
    }

    /// Runs one loop of reactor `id` on this thread. Returns true if it did work.
    pub fn run_once(&self, id: ReactorId) -> bool {
        let local = &self.locals[id];
        let shared = &self.set.inner.reactors[id];
        let loop_start = crate::tsc::ticks();
        let busy = enter(local, || local.run_once());
        shared.account_ticks(busy, loop_start);
        busy
    }

    /// Runs `f` as if on reactor `id` (to register pollers, submit IO, …).
    pub fn on<R>(&self, id: ReactorId, f: impl FnOnce() -> R) -> R {
        enter(&self.locals[id], f)
    }

    /// Loops every reactor round-robin until a full round does no work, or
    /// `max_rounds` rounds ran. Returns the number of rounds.
    pub fn run_until_idle(&self, max_rounds: usize) -> usize {
        for round in 0..max_rounds {
            let mut busy = false;
            for id in 0..self.locals.len() {
                busy |= self.run_once(id);
            }
            if !busy {
                return round;
            }
        }
        max_rounds
    }

    /// Advances the manual clock shared by the set's reactors.
    pub fn advance_ns(&self, delta_ns: u64) {
        self.set.inner.clock.advance_ns(delta_ns);
    }

    pub fn now_ns(&self) -> u64 {
        self.set.inner.clock.now_ns()
    }
}

impl Drop for ManualSet {
    fn drop(&mut self) {
        // Drop each reactor's state as that reactor, so Drop impls that look
        // at the current reactor see the right one.
        for local in self.locals.drain(..) {
            let l2 = local.clone();
            enter(&l2, move || drop(local));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_masks() {
        assert_eq!(parse_core_mask("0x3").unwrap(), vec![0, 1]);
        assert_eq!(parse_core_mask("5").unwrap(), vec![0, 2]);
        assert_eq!(parse_core_mask("[0,2-3]").unwrap(), vec![0, 2, 3]);
        assert!(parse_core_mask("0x0").is_err());
        assert!(parse_core_mask("zz").is_err());
        assert!(parse_core_mask("[3-1]").is_err());
        assert!(parse_core_mask("[1").is_err());
        assert!(parse_core_mask("").is_err());
    }
}
