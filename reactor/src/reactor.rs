//! One reactor: a loop that drains its message ring, runs its pollers and then
//! applies the idle policy. All state it owns lives on its thread; other
//! threads reach it only through the ring.

use crate::clock::Clock;
use crate::interrupt::{poll_fds, EventFd};
use crate::ring::Ring;
use crate::wake::WakeFlag;
use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
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
    ///
    /// With `interrupts` (SPDK's interrupt mode), the reactor sleeps on
    /// eventfds instead: its own (messages) and those of its interrupt
    /// pollers (`register_interrupt_poller`: an NVMe queue pair's MSI-X
    /// vector). `max_sleep_ns` then bounds the sleep only while the reactor
    /// also has ordinary every-loop pollers; timed pollers and interrupt
    /// pollers with deadlines (`PollerHandle::set_wake_within`) still set
    /// theirs. A reactor whose pollers are all interrupt-driven
    /// sleeps until a device, a message or a deadline wakes it.
    SleepWhenIdle { spin_ns: u64, max_sleep_ns: u64, interrupts: bool },
}

impl IdlePolicy {
    /// The sleep policy with the defaults used by tests and `--idle sleep`.
    pub const fn sleep() -> Self {
        IdlePolicy::SleepWhenIdle { spin_ns: 20_000, max_sleep_ns: 1_000_000, interrupts: false }
    }

    /// The sleep policy in interrupt mode (`--interrupt-mode`).
    pub const fn interrupt() -> Self {
        IdlePolicy::SleepWhenIdle { spin_ns: 20_000, max_sleep_ns: 1_000_000, interrupts: true }
    }

    /// True in interrupt mode.
    pub const fn uses_interrupts(self) -> bool {
        matches!(self, IdlePolicy::SleepWhenIdle { interrupts: true, .. })
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
    /// Interrupt mode: what a sender signals to wake the sleeping reactor
    /// (instead of unparking its thread).
    pub(crate) wake_fd: Option<EventFd>,
    pub(crate) thread: OnceLock<Thread>,
    pub(crate) busy_loops: AtomicU64,
    pub(crate) idle_loops: AtomicU64,
    pub(crate) sleeping_ns: AtomicU64,
    /// Returns from a sleep (any cause), and those an interrupt poller's
    /// eventfd caused.
    pub(crate) wakeups: AtomicU64,
    pub(crate) interrupt_wakeups: AtomicU64,
    /// Ticks (`tsc`) spent in loops that did work, and in loops that did
    /// not (sleeping included), as SPDK's `busy_tsc` and `idle_tsc`.
    pub(crate) busy_ticks: AtomicU64,
    pub(crate) idle_ticks: AtomicU64,
    /// Tick count when the reactor's loop started (0 before).
    pub(crate) started_ticks: AtomicU64,
    /// Registered pollers that run every loop (interrupt pollers included)
    /// and timed ones, published when the set changes (SPDK's
    /// `active_pollers_count` and `timed_pollers_count`).
    pub(crate) every_loop_pollers: AtomicU32,
    pub(crate) timed_pollers: AtomicU32,
    /// The reactor thread's Linux thread id, once it runs.
    pub(crate) tid: OnceLock<u64>,
}

impl Shared {
    pub(crate) fn new(core: Option<usize>, ring_capacity: usize, wake_fd: Option<EventFd>) -> Self {
        Shared {
            core,
            ring: Ring::new(ring_capacity),
            wake: WakeFlag::default(),
            wake_fd,
            thread: OnceLock::new(),
            busy_loops: AtomicU64::new(0),
            idle_loops: AtomicU64::new(0),
            sleeping_ns: AtomicU64::new(0),
            wakeups: AtomicU64::new(0),
            interrupt_wakeups: AtomicU64::new(0),
            busy_ticks: AtomicU64::new(0),
            idle_ticks: AtomicU64::new(0),
            started_ticks: AtomicU64::new(0),
            every_loop_pollers: AtomicU32::new(0),
            timed_pollers: AtomicU32::new(0),
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
            r.wake_up();
        }
        Ok(())
    }
}

impl Shared {
    /// Ends the reactor's sleep: its eventfd in interrupt mode, else an unpark.
    pub(crate) fn wake_up(&self) {
        match &self.wake_fd {
            Some(fd) => fd.signal(),
            None => {
                if let Some(t) = self.thread.get() {
                    t.unpark();
                }
            }
        }
    }
}

/// Adds one to a counter this reactor alone writes.
fn bump(counter: &AtomicU64, by: u64) {
    counter.store(counter.load(Ordering::Relaxed) + by, Ordering::Relaxed);
}

/// Where an every-loop poller's work comes from, which decides how a
/// reactor in interrupt mode may sleep.
enum WorkSource {
    /// Anywhere (a socket, shared memory): the reactor keeps its tick.
    Anywhere,
    /// A device that signals this eventfd.
    Interrupt(Arc<EventFd>),
    /// Only this reactor's own code, while it runs: no wake-up needed.
    ThisReactor,
}

struct Poller {
    name: &'static str,
    f: Option<Box<dyn FnMut() -> PollStatus>>,
    period_ns: u64,
    next_due_ns: u64,
    alive: Rc<Cell<bool>>,
    /// What brings an every-loop poller work while the reactor sleeps.
    source: WorkSource,
    /// An interrupt poller with deadlines of its own right now (IO in
    /// flight that may time out): the longest it may sleep, in ns.
    wake_within_ns: Rc<Cell<Option<u64>>>,
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
    /// What an interrupt-mode sleep polls (reused: sleeping allocates
    /// nothing once it has seen the reactor's largest set of sources).
    wait_fds: RefCell<Vec<libc::pollfd>>,
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
            wait_fds: RefCell::new(Vec::new()),
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
                self.publish_poller_counts();
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
            self.publish_poller_counts();
        }
        let counter = if busy { &self.shared().busy_loops } else { &self.shared().idle_loops };
        // Single writer (this reactor): a plain load+store is enough.
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        busy
    }

    /// Only when the poller set changes, never per loop.
    fn publish_poller_counts(&self) {
        let pollers = self.pollers.borrow();
        let timed = pollers.iter().filter(|p| p.period_ns > 0).count();
        let shared = self.shared();
        shared.timed_pollers.store(timed as u32, Ordering::Relaxed);
        shared.every_loop_pollers.store((pollers.len() - timed) as u32, Ordering::Relaxed);
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
        let IdlePolicy::SleepWhenIdle { spin_ns, max_sleep_ns, interrupts } = self.set.idle else { return };
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
        if interrupts && self.shared().wake_fd.is_some() {
            return self.sleep_on_interrupts(now, max_sleep_ns);
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
            bump(&shared.sleeping_ns, slept);
            bump(&shared.wakeups, 1);
        }
        shared.wake.clear();
    }

    /// Interrupt mode's sleep: one `ppoll` on the reactor's eventfd and its
    /// interrupt pollers' eventfds, bounded only by timed pollers' deadlines
    /// and, while some poller has no interrupt (or asks for the tick), by
    /// `max_sleep_ns`. Ready eventfds are drained before the pollers run.
    fn sleep_on_interrupts(&self, now: u64, max_sleep_ns: u64) {
        if !self.overflow.borrow().is_empty() || !self.new_pollers.borrow().is_empty() {
            return;
        }
        let shared = self.shared();
        let Some(wake_fd) = shared.wake_fd.as_ref() else { return };
        let pollers = self.pollers.borrow();
        let mut fds = self.wait_fds.borrow_mut();
        fds.clear();
        fds.push(libc::pollfd { fd: wake_fd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        let mut bound: Option<u64> = None;
        let mut tighten = |ns: u64| bound = Some(bound.map_or(ns, |b| b.min(ns)));
        for p in pollers.iter().filter(|p| p.alive.get()) {
            if p.period_ns > 0 {
                tighten(p.next_due_ns.saturating_sub(now));
                continue;
            }
            match &p.source {
                WorkSource::Interrupt(irq) => {
                    fds.push(libc::pollfd { fd: irq.as_raw_fd(), events: libc::POLLIN, revents: 0 });
                    if let Some(ns) = p.wake_within_ns.get() {
                        tighten(ns);
                    }
                }
                WorkSource::Anywhere => tighten(max_sleep_ns),
                WorkSource::ThisReactor => {}
            }
        }
        if bound == Some(0) {
            return;
        }
        shared.wake.announce_sleep();
        if shared.ring.is_empty() && !self.set.stop.load(Ordering::Acquire) {
            match poll_fds(&mut fds, bound) {
                Ok(_) => {
                    let mut irqs = 0;
                    for (i, f) in fds.iter().enumerate() {
                        if f.revents == 0 {
                            continue;
                        }
                        if i > 0 {
                            irqs += 1;
                        }
                        crate::interrupt::drain_fd(f.fd);
                    }
                    bump(&shared.interrupt_wakeups, irqs);
                }
                // Not expected of ppoll on eventfds; sleeping is only an
                // optimisation, so the loop goes on polling.
                Err(e) => report_wait_failure(&e),
            }
            let slept = self.set.clock.now_ns().saturating_sub(now);
            bump(&shared.sleeping_ns, slept);
            bump(&shared.wakeups, 1);
        }
        shared.wake.clear();
    }
}

/// The reactor crate has no logger: a failed wait is reported once on stderr.
fn report_wait_failure(e: &std::io::Error) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("reactor: interrupt-mode wait failed ({e}); polling instead of sleeping"));
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
    wake_within_ns: Rc<Cell<Option<u64>>>,
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
    /// An interrupt poller with deadlines of its own (commands in flight
    /// that may time out) has the reactor wake within `within` while it is
    /// Some, so it can check them; with None it sleeps until its interrupt.
    /// No effect on other pollers.
    pub fn set_wake_within(&self, within: Option<Duration>) {
        self.wake_within_ns.set(within.map(|d| d.as_nanos().min(u64::MAX as u128) as u64));
    }
}

fn add_poller(
    name: &'static str,
    period_ns: u64,
    source: WorkSource,
    f: Box<dyn FnMut() -> PollStatus>,
) -> PollerHandle {
    let alive = Rc::new(Cell::new(true));
    let wake_within_ns = Rc::new(Cell::new(None));
    let handle = PollerHandle { alive: alive.clone(), wake_within_ns: wake_within_ns.clone() };
    with_current(|l| {
        let next_due_ns = if period_ns > 0 { l.set.clock.now_ns() + period_ns } else { 0 };
        let p = Poller { name, f: Some(f), period_ns, next_due_ns, alive, source, wake_within_ns };
        l.new_pollers.borrow_mut().push(p);
    })
    .expect("register_poller called off a reactor thread");
    handle
}

/// Registers a poller that runs on every loop of the current reactor.
pub fn register_poller(name: &'static str, f: impl FnMut() -> PollStatus + 'static) -> PollerHandle {
    add_poller(name, 0, WorkSource::Anywhere, Box::new(f))
}

/// Registers a poller that runs on every loop and drains only work that
/// this reactor's own code queued for it while running (completions
/// deferred to the end of the loop): it never needs a wake-up, so in
/// interrupt mode it does not keep the reactor's tick. Such work must be
/// queued by code that reports itself busy (a message, or a poller that
/// returns `Busy`), which keeps the reactor from sleeping before the
/// drain.
pub fn register_local_work_poller(name: &'static str, f: impl FnMut() -> PollStatus + 'static) -> PollerHandle {
    add_poller(name, 0, WorkSource::ThisReactor, Box::new(f))
}

/// Registers a poller that runs on every loop and whose work arrives with a
/// signal on `irq` (a device interrupt): in interrupt mode the reactor
/// sleeps on `irq` rather than waking for it on a timer. Outside interrupt
/// mode it is an ordinary poller. The reactor keeps `irq` open while the
/// poller is registered.
pub fn register_interrupt_poller(
    name: &'static str,
    irq: Arc<EventFd>,
    f: impl FnMut() -> PollStatus + 'static,
) -> PollerHandle {
    add_poller(name, 0, WorkSource::Interrupt(irq), Box::new(f))
}

/// True when the current reactor's set runs in interrupt mode (off a
/// reactor: false). Drivers ask before they set up device interrupts.
pub fn interrupts_enabled() -> bool {
    with_current(|l| l.set.idle.uses_interrupts() && l.shared().wake_fd.is_some()).unwrap_or(false)
}

/// Registers a poller that runs at most once per `period`.
pub fn register_timed_poller(
    name: &'static str,
    period: Duration,
    f: impl FnMut() -> PollStatus + 'static,
) -> PollerHandle {
    add_poller(name, period.as_nanos().max(1) as u64, WorkSource::Anywhere, Box::new(f))
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
