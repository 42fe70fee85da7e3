//! One reactor: a loop that drains its message ring, runs its pollers and then
//! applies the idle policy. All state it owns lives on its thread; other
//! threads reach it only through the ring.

use crate::clock::Clock;
use crate::ring::Ring;
use crate::wake::WakeFlag;
use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

/// Index of a reactor within its set (0-based; not the CPU core number).
pub type ReactorId = usize;

/// Messages handled per loop before pollers run: bounded work keeps pollers
/// (and so IO completions) from starving behind a message storm.
pub const MSG_BATCH: usize = 8;

/// A unit of work sent to a reactor.
pub enum Message {
    /// A boxed closure: for the control plane.
    Call(Box<dyn FnOnce() + Send>),
    /// A function and two words: allocation-free, for hot paths that pass
    /// indices rather than pointers.
    Raw(fn(u64, u64), u64, u64),
}

impl Message {
    fn run(self) {
        match self {
            Message::Call(f) => f(),
            Message::Raw(f, a, b) => f(a, b),
        }
    }
}

/// What a reactor does when a loop found no work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdlePolicy {
    /// Never sleep: lowest latency, one core fully used (production default).
    BusyPoll,
    /// Spin for `spin_ns` of idleness, then park for at most `max_sleep_ns`
    /// (less when a timed poller is due). For tests and small machines.
    SleepWhenIdle { spin_ns: u64, max_sleep_ns: u64 },
}

impl IdlePolicy {
    /// The sleep policy with the defaults used by tests and `--idle sleep`.
    pub const fn sleep() -> Self {
        IdlePolicy::SleepWhenIdle { spin_ns: 20_000, max_sleep_ns: 1_000_000 }
    }
}

/// What a poller reports after a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollStatus {
    /// It did work.
    Busy,
    /// Nothing to do.
    Idle,
    /// Unregister this poller.
    Done,
}

/// Per-reactor state that other threads may touch: the ring, the wake flag,
/// and statistics with the reactor as their single writer.
pub(crate) struct Shared {
    pub(crate) core: Option<usize>,
    pub(crate) ring: Ring<Message>,
    pub(crate) wake: WakeFlag,
    pub(crate) thread: OnceLock<Thread>,
    pub(crate) busy_loops: AtomicU64,
    pub(crate) idle_loops: AtomicU64,
    pub(crate) sleeping_ns: AtomicU64,
    /// Ticks (`tsc`) spent in loops that did work, and in loops that did
    /// not (sleeping included), as SPDK's `busy_tsc` and `idle_tsc`.
    pub(crate) busy_ticks: AtomicU64,
    pub(crate) idle_ticks: AtomicU64,
    /// Tick count when the reactor's loop started (0 before).
    pub(crate) started_ticks: AtomicU64,
    /// The reactor thread's Linux thread id, once it runs.
    pub(crate) tid: OnceLock<u64>,
}

impl Shared {
    pub(crate) fn new(core: Option<usize>, ring_capacity: usize) -> Self {
        Shared {
            core,
            ring: Ring::new(ring_capacity),
            wake: WakeFlag::default(),
            thread: OnceLock::new(),
            busy_loops: AtomicU64::new(0),
            idle_loops: AtomicU64::new(0),
            sleeping_ns: AtomicU64::new(0),
            busy_ticks: AtomicU64::new(0),
            idle_ticks: AtomicU64::new(0),
            started_ticks: AtomicU64::new(0),
            tid: OnceLock::new(),
        }
    }

    /// Adds the ticks since `since` to the busy or idle total and returns
    /// the current tick count: the one TSC read of a loop. Only the
    /// reactor's own thread calls this (single writer, so load + store).
    pub(crate) fn account_ticks(&self, busy: bool, since: u64) -> u64 {
        let now = crate::tsc::ticks();
        let total = if busy { &self.busy_ticks } else { &self.idle_ticks };
        total.store(total.load(Ordering::Relaxed) + now.saturating_sub(since), Ordering::Relaxed);
        now
    }

    /// Records, on the reactor's thread, when its loop starts and which
    /// thread runs it. Returns the start tick count.
    pub(crate) fn start_loop(&self) -> u64 {
        if let Some(tid) = current_tid() {
            let _ = self.tid.set(tid);
        }
        let now = crate::tsc::ticks();
        self.started_ticks.store(now, Ordering::Relaxed);
        now
    }
}

/// The calling thread's Linux thread id, read without libc from the
/// `/proc/thread-self` link (`PID/task/TID`); None off Linux.
fn current_tid() -> Option<u64> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// What all reactors of a set share.
pub(crate) struct SetInner {
    pub(crate) reactors: Vec<Shared>,
    pub(crate) clock: Clock,
    pub(crate) idle: IdlePolicy,
    pub(crate) stop: AtomicBool,
    /// Distinguishes reactors of different sets in one process (tests run many).
    pub(crate) uid_base: u64,
    /// Application-wide state shared by the set's reactors (a bdev registry,
    /// the list of arrays): one instance per type, created on first use.
    pub(crate) globals: std::sync::Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

static NEXT_UID_BASE: AtomicU64 = AtomicU64::new(1 << 16);

impl SetInner {
    pub(crate) fn new(reactors: Vec<Shared>, clock: Clock, idle: IdlePolicy) -> Arc<Self> {
        let uid_base = NEXT_UID_BASE.fetch_add(1 << 16, Ordering::Relaxed);
        Arc::new(SetInner {
            reactors,
            clock,
            idle,
            stop: AtomicBool::new(false),
            uid_base,
            globals: std::sync::Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn global<T: Default + Send + Sync + 'static>(&self) -> Arc<T> {
        let mut g = self.globals.lock().unwrap_or_else(|e| e.into_inner());
        let entry = g.entry(TypeId::of::<T>()).or_insert_with(|| Arc::new(T::default()) as Arc<dyn Any + Send + Sync>);
        entry.clone().downcast::<T>().unwrap_or_else(|_| unreachable!("keyed by TypeId"))
    }

    /// Pushes a message, waking the target if it sleeps. A full ring is
    /// backpressure: the sender yields until there is room (rings are sized so
    /// this is rare; a reactor sender parks the message in its overflow list
    /// instead, see `send`).
    pub(crate) fn push(&self, to: ReactorId, mut msg: Message) -> Result<(), Message> {
        let Some(r) = self.reactors.get(to) else { return Err(msg) };
        loop {
            match r.ring.push(msg) {
                Ok(()) => break,
                Err(m) => {
                    if on_reactor_of(self) {
                        return Err(m);
                    }
                    msg = m;
                    std::thread::yield_now();
                }
            }
        }
        if r.wake.take_sleeper() {
            if let Some(t) = r.thread.get() {
                t.unpark();
            }
        }
        Ok(())
    }
}

struct Poller {
    name: &'static str,
    f: Option<Box<dyn FnMut() -> PollStatus>>,
    period_ns: u64,
    next_due_ns: u64,
    alive: Rc<Cell<bool>>,
}

/// The thread-owned part of a reactor.
pub(crate) struct Local {
    pub(crate) id: ReactorId,
    pub(crate) set: Arc<SetInner>,
    pollers: RefCell<Vec<Poller>>,
    new_pollers: RefCell<Vec<Poller>>,
    dead_pollers: Cell<usize>,
    /// Messages that found the target's ring full; retried every loop.
    overflow: RefCell<VecDeque<(ReactorId, Message)>>,
    state: RefCell<HashMap<TypeId, Rc<dyn Any>>>,
    idle_since_ns: Cell<Option<u64>>,
}

impl Local {
    pub(crate) fn new(id: ReactorId, set: Arc<SetInner>) -> Rc<Self> {
        Rc::new(Local {
            id,
            set,
            pollers: RefCell::new(Vec::new()),
            new_pollers: RefCell::new(Vec::new()),
            dead_pollers: Cell::new(0),
            overflow: RefCell::new(VecDeque::new()),
            state: RefCell::new(HashMap::new()),
            idle_since_ns: Cell::new(None),
        })
    }

    fn uid(&self) -> u64 {
        self.set.uid_base + self.id as u64 + 1
    }

    fn shared(&self) -> &Shared {
        &self.set.reactors[self.id]
    }

    /// One loop: messages, pollers. Returns true when anything did work.
    pub(crate) fn run_once(&self) -> bool {
        let mut busy = false;
        for _ in 0..MSG_BATCH {
            match self.shared().ring.pop() {
                Some(m) => {
                    busy = true;
                    m.run();
                }
                None => break,
            }
        }
        busy |= self.retry_overflow();
        {
            let mut fresh = self.new_pollers.borrow_mut();
            if !fresh.is_empty() {
                self.pollers.borrow_mut().append(&mut fresh);
            }
        }
        let n = self.pollers.borrow().len();
        let mut now_ns = None;
        for i in 0..n {
            let f = {
                let mut pollers = self.pollers.borrow_mut();
                let p = &mut pollers[i];
                if !p.alive.get() {
                    continue;
                }
                if p.period_ns > 0 {
                    let now = *now_ns.get_or_insert_with(|| self.set.clock.now_ns());
                    if now < p.next_due_ns {
                        continue;
                    }
                    p.next_due_ns = now + p.period_ns;
                }
                p.f.take()
            };
            let Some(mut f) = f else { continue };
            let status = f();
            let mut pollers = self.pollers.borrow_mut();
            let p = &mut pollers[i];
            p.f = Some(f);
            match status {
                PollStatus::Busy => busy = true,
                PollStatus::Idle => {}
                PollStatus::Done => {
                    busy = true;
                    if p.alive.replace(false) {
                        self.dead_pollers.set(self.dead_pollers.get() + 1);
                    }
                }
            }
        }
        if self.dead_pollers.get() > 0 {
            self.pollers.borrow_mut().retain(|p| p.alive.get());
            self.dead_pollers.set(0);
        }
        let counter = if busy { &self.shared().busy_loops } else { &self.shared().idle_loops };
        // Single writer (this reactor): a plain load+store is enough.
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        busy
    }

    fn retry_overflow(&self) -> bool {
        let mut q = self.overflow.borrow_mut();
        let mut moved = false;
        while let Some((to, msg)) = q.pop_front() {
            match self.set.push(to, msg) {
                Ok(()) => moved = true,
                Err(msg) => {
                    q.push_front((to, msg));
                    break;
                }
            }
        }
        moved
    }

    /// Time until the next timed poller is due, if any.
    fn next_timer_in_ns(&self, now_ns: u64) -> Option<u64> {
        self.pollers
            .borrow()
            .iter()
            .filter(|p| p.alive.get() && p.period_ns > 0)
            .map(|p| p.next_due_ns.saturating_sub(now_ns))
            .min()
    }

    /// Applies the idle policy after a loop that found no work.
    pub(crate) fn idle(&self, busy: bool) {
        let IdlePolicy::SleepWhenIdle { spin_ns, max_sleep_ns } = self.set.idle else { return };
        if busy {
            self.idle_since_ns.set(None);
            return;
        }
        let now = self.set.clock.now_ns();
        let since = match self.idle_since_ns.get() {
            Some(since) => since,
            None => {
                self.idle_since_ns.set(Some(now));
                now
            }
        };
        if now.saturating_sub(since) < spin_ns {
            return;
        }
        let mut sleep_ns = max_sleep_ns;
        if let Some(t) = self.next_timer_in_ns(now) {
            sleep_ns = sleep_ns.min(t);
        }
        if sleep_ns == 0 || !self.overflow.borrow().is_empty() {
            return;
        }
        let shared = self.shared();
        shared.wake.announce_sleep();
        if shared.ring.is_empty() && !self.set.stop.load(Ordering::Acquire) {
            std::thread::park_timeout(Duration::from_nanos(sleep_ns));
            let slept = self.set.clock.now_ns().saturating_sub(now);
            shared.sleeping_ns.store(shared.sleeping_ns.load(Ordering::Relaxed) + slept, Ordering::Relaxed);
        }
        shared.wake.clear();
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Local>>> = const { RefCell::new(None) };
    static CURRENT_UID: Cell<u64> = const { Cell::new(0) };
}

fn on_reactor_of(set: &SetInner) -> bool {
    CURRENT.with(|c| c.borrow().as_ref().is_some_and(|l| std::ptr::eq(Arc::as_ptr(&l.set), set)))
}

/// Makes `local` the current reactor of this thread while `f` runs.
pub(crate) fn enter<R>(local: &Rc<Local>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Rc<Local>>, u64);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            CURRENT_UID.with(|u| u.set(self.1));
            CURRENT.with(|c| *c.borrow_mut() = prev);
        }
    }
    let prev = CURRENT.with(|c| c.borrow_mut().replace(local.clone()));
    let prev_uid = CURRENT_UID.with(|u| u.replace(local.uid()));
    let _restore = Restore(prev, prev_uid);
    f()
}

fn with_current<R>(f: impl FnOnce(&Rc<Local>) -> R) -> Option<R> {
    let local = CURRENT.with(|c| c.borrow().clone())?;
    Some(f(&local))
}

/// The id of the reactor running on this thread, if any.
pub fn current() -> Option<ReactorId> {
    with_current(|l| l.id)
}

/// A process-unique id of the current reactor (0 on a thread with none).
/// Cheap: layers above key their per-reactor caches on it.
pub fn current_uid() -> u64 {
    CURRENT_UID.with(|u| u.get())
}

/// Number of reactors in the current set (0 on a thread with none).
pub fn count() -> usize {
    with_current(|l| l.set.reactors.len()).unwrap_or(0)
}

/// Nanoseconds on the current set's clock (the process monotonic clock when
/// called off-reactor).
pub fn now_ns() -> u64 {
    with_current(|l| l.set.clock.now_ns()).unwrap_or_else(|| {
        static T0: OnceLock<std::time::Instant> = OnceLock::new();
        T0.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
    })
}

fn send_message(to: ReactorId, msg: Message) {
    let Some(local) = CURRENT.with(|c| c.borrow().clone()) else {
        panic!("reactor::send called off a reactor thread; use ReactorSet::send");
    };
    if !local.overflow.borrow().is_empty() {
        // Keep per-sender FIFO order behind messages already waiting.
        local.overflow.borrow_mut().push_back((to, msg));
        return;
    }
    if let Err(msg) = local.set.push(to, msg) {
        local.overflow.borrow_mut().push_back((to, msg));
    }
}

/// Runs `f` on reactor `to` (of the current set). Messages from one reactor to
/// another arrive in the order they were sent.
///
/// # Panics
/// When called from a thread that is not running a reactor: use
/// [`crate::ReactorSet::send`] there.
pub fn send(to: ReactorId, f: impl FnOnce() + Send + 'static) {
    send_message(to, Message::Call(Box::new(f)));
}

/// Allocation-free variant of [`send`]: `f(a, b)` runs on reactor `to`.
pub fn send_raw(to: ReactorId, f: fn(u64, u64), a: u64, b: u64) {
    send_message(to, Message::Raw(f, a, b));
}

/// Handle to a registered poller.
#[derive(Clone)]
pub struct PollerHandle {
    alive: Rc<Cell<bool>>,
}

impl PollerHandle {
    /// Stops the poller; it will not run again (takes effect before its next run).
    pub fn unregister(&self) {
        self.alive.set(false);
        with_current(|l| l.dead_pollers.set(l.dead_pollers.get() + 1));
    }
    pub fn is_registered(&self) -> bool {
        self.alive.get()
    }
}

fn add_poller(name: &'static str, period_ns: u64, f: Box<dyn FnMut() -> PollStatus>) -> PollerHandle {
    let alive = Rc::new(Cell::new(true));
    let handle = PollerHandle { alive: alive.clone() };
    with_current(|l| {
        let next_due_ns = if period_ns > 0 { l.set.clock.now_ns() + period_ns } else { 0 };
        l.new_pollers.borrow_mut().push(Poller { name, f: Some(f), period_ns, next_due_ns, alive });
    })
    .expect("register_poller called off a reactor thread");
    handle
}

/// Registers a poller that runs on every loop of the current reactor.
pub fn register_poller(name: &'static str, f: impl FnMut() -> PollStatus + 'static) -> PollerHandle {
    add_poller(name, 0, Box::new(f))
}

/// Registers a poller that runs at most once per `period`.
pub fn register_timed_poller(
    name: &'static str,
    period: Duration,
    f: impl FnMut() -> PollStatus + 'static,
) -> PollerHandle {
    add_poller(name, period.as_nanos().max(1) as u64, Box::new(f))
}

/// Names of the pollers on the current reactor (for diagnostics).
pub fn poller_names() -> Vec<&'static str> {
    with_current(|l| l.pollers.borrow().iter().filter(|p| p.alive.get()).map(|p| p.name).collect()).unwrap_or_default()
}

/// Per-reactor state of type `T`, created on first use and dropped when the
/// reactor stops. Layers keep their per-reactor pools and caches here.
///
/// # Panics
/// Off a reactor thread.
pub fn local<T: Default + 'static>() -> Rc<T> {
    with_current(|l| {
        let mut map = l.state.borrow_mut();
        let entry = map.entry(TypeId::of::<T>()).or_insert_with(|| Rc::new(T::default()) as Rc<dyn Any>);
        entry.clone().downcast::<T>().unwrap_or_else(|_| unreachable!("keyed by TypeId"))
    })
    .expect("reactor::local called off a reactor thread")
}

/// Set-wide state of type `T` (one per reactor set, created on first use):
/// for control-plane tables such as the bdev registry. Not for hot paths.
///
/// # Panics
/// Off a reactor thread; use [`crate::ReactorSet::global`] there.
pub fn global<T: Default + Send + Sync + 'static>() -> Arc<T> {
    with_current(|l| l.set.global::<T>()).expect("reactor::global called off a reactor thread")
}

/// Runs `f` once on every reactor of the current set, one after another in
/// id order, then runs `done` back on the calling reactor (SPDK's
/// `spdk_for_each_channel` shape). Useful to drain or collect per-reactor state.
pub fn for_each_reactor(f: Arc<dyn Fn() + Send + Sync>, done: impl FnOnce() + Send + 'static) {
    let origin = current().expect("for_each_reactor called off a reactor thread");
    fn step(i: usize, n: usize, origin: ReactorId, f: Arc<dyn Fn() + Send + Sync>, done: Box<dyn FnOnce() + Send>) {
        if i == n {
            send(origin, done);
            return;
        }
        send(i, move || {
            f();
            step(i + 1, n, origin, f, done);
        });
    }
    step(0, count(), origin, f, Box::new(done));
}

/// True once the set this reactor belongs to has been asked to stop.
pub fn stopping() -> bool {
    with_current(|l| l.set.stop.load(Ordering::Acquire)).unwrap_or(false)
}
