//! Reactor behaviour: messages, pollers, timers, idle policy, manual stepping.
#![cfg(not(loom))]

use reactor::{IdlePolicy, PollStatus, ReactorConfig, ReactorSet};
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

fn start(n: usize) -> ReactorSet {
    let mut cfg = ReactorConfig::new((0..n).collect(), IdlePolicy::sleep());
    cfg.pin = false;
    ReactorSet::start(cfg, || {}).unwrap()
}

#[test]
fn messages_run_on_their_reactor_in_order() {
    let set = start(2);
    let (tx, rx) = mpsc::channel();
    for i in 0..100 {
        let tx = tx.clone();
        set.send(1, move || tx.send((reactor::current(), i)).unwrap());
    }
    for i in 0..100 {
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), (Some(1), i));
    }
    set.stop();
    set.join();
}

#[test]
fn reactor_to_reactor_and_raw_messages() {
    static HITS: AtomicU64 = AtomicU64::new(0);
    fn raw(a: u64, b: u64) {
        assert_eq!(reactor::current(), Some(1));
        HITS.fetch_add(a + b, Ordering::SeqCst);
    }
    let set = start(2);
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        reactor::send_raw(1, raw, 40, 2);
        reactor::send(1, move || {
            // Sent after the raw message from the same reactor: it ran first.
            tx.send(HITS.load(Ordering::SeqCst)).unwrap();
        });
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 42);
    set.stop();
    set.join();
}

#[test]
fn pollers_and_timed_pollers() {
    let set = start(1);
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        let runs = Rc::new(Cell::new(0u32));
        let r = runs.clone();
        let tx2 = tx.clone();
        reactor::register_poller("count", move || {
            r.set(r.get() + 1);
            if r.get() == 1000 {
                tx2.send("every-loop").unwrap();
                return PollStatus::Done;
            }
            PollStatus::Busy
        });
        let ticks = Rc::new(Cell::new(0u32));
        let t0 = reactor::now_ns();
        reactor::register_timed_poller("tick", Duration::from_millis(5), move || {
            ticks.set(ticks.get() + 1);
            if ticks.get() == 3 {
                assert!(reactor::now_ns() - t0 >= 15_000_000, "timed poller ran early");
                tx.send("timed").unwrap();
                return PollStatus::Done;
            }
            PollStatus::Idle
        });
    });
    let mut got =
        vec![rx.recv_timeout(Duration::from_secs(10)).unwrap(), rx.recv_timeout(Duration::from_secs(10)).unwrap()];
    got.sort();
    assert_eq!(got, vec!["every-loop", "timed"]);
    set.stop();
    set.join();
}

/// The poller counts a reactor publishes (thread_get_stats) follow
/// registration and removal.
#[test]
fn poller_counts_follow_registration_and_removal() {
    static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let set = start(1);
    let counts = |set: &ReactorSet| {
        let s = set.stats(0).unwrap();
        (s.every_loop_pollers, s.timed_pollers)
    };
    let wait_for = |want: (u32, u32)| {
        let t0 = std::time::Instant::now();
        while counts(&set) != want {
            assert!(t0.elapsed() < Duration::from_secs(10), "counts {:?}, want {want:?}", counts(&set));
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    // Whatever the set registers itself is published once its loop runs.
    set.call(0, || {});
    set.call(0, || {});
    let (every, timed) = counts(&set);
    set.send(0, || {
        let until_stopped = || if STOP.load(Ordering::Relaxed) { PollStatus::Done } else { PollStatus::Idle };
        reactor::register_poller("a", until_stopped);
        reactor::register_poller("b", until_stopped);
        let handle = reactor::register_timed_poller("t", Duration::from_millis(1), || PollStatus::Idle);
        reactor::register_poller("unregisters t", move || {
            if STOP.load(Ordering::Relaxed) {
                handle.unregister();
                return PollStatus::Done;
            }
            PollStatus::Idle
        });
    });
    wait_for((every + 3, timed + 1));
    STOP.store(true, Ordering::Relaxed);
    wait_for((every, timed));
    set.stop();
    set.join();
}

#[test]
fn for_each_reactor_visits_all_then_returns() {
    let set = start(2);
    let visited = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let v = visited.clone();
    set.send(1, move || {
        let v2 = v.clone();
        reactor::for_each_reactor(
            Arc::new(move || {
                v2.fetch_add(1 << (reactor::current().unwrap() * 8), Ordering::SeqCst);
            }),
            move || tx.send((reactor::current(), v.load(Ordering::SeqCst))).unwrap(),
        );
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), (Some(1), 0x101));
    set.stop();
    set.join();
}

#[test]
fn sleep_policy_sleeps_when_idle_and_wakes_on_message() {
    let set = start(1);
    std::thread::sleep(Duration::from_millis(50));
    let slept_ns = set.stats(0).unwrap().slept_ns;
    assert!(slept_ns > 10_000_000, "an idle reactor in sleep mode should sleep (slept {slept_ns} ns)");
    // A message to a sleeping reactor is served well before the sleep bound
    // would have let it notice on its own many times over.
    let t = std::time::Instant::now();
    assert_eq!(set.call(0, || 7), 7);
    assert!(t.elapsed() < Duration::from_secs(5));
    set.stop();
    set.join();
}

/// Busy and idle time are measured in ticks per loop: work done in a
/// message lands in `busy_ticks`, a quiet reactor's sleep in `idle_ticks`,
/// and together they cover the reactor's life since its loop started.
#[test]
fn busy_and_idle_ticks_measure_the_loop() {
    let set = start(1);
    let rate = reactor::tsc::tick_rate();
    std::thread::sleep(Duration::from_millis(50));
    let before = set.stats(0).unwrap();
    assert!(before.tid.is_some_and(|t| t > 0), "{before:?}");
    assert!(before.started_ticks > 0);
    // 60 ms of work in one message: one busy loop of at least that long.
    set.call(0, || {
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(60) {
            std::hint::spin_loop();
        }
    });
    std::thread::sleep(Duration::from_millis(50));
    let after = set.stats(0).unwrap();
    let now = reactor::tsc::ticks();
    let busy_ms = (after.busy_ticks - before.busy_ticks) * 1000 / rate;
    assert!(busy_ms >= 55, "60 ms of work showed as {busy_ms} ms busy ({after:?})");
    let idle_ms = after.idle_ticks * 1000 / rate;
    assert!(idle_ms >= 50, "an idle reactor showed {idle_ms} ms idle ({after:?})");
    // Busy + idle is the time since the loop started, up to the loop in progress.
    let accounted = after.busy_ticks + after.idle_ticks;
    let lived = now - after.started_ticks;
    assert!(accounted <= lived, "{accounted} ticks accounted of {lived} lived");
    assert!(lived - accounted < rate / 10, "more than 100 ms unaccounted: {} ticks", lived - accounted);
    set.stop();
    set.join();
}

#[test]
fn manual_set_steps_deterministically() {
    let m = ReactorSet::manual(2);
    let log = Rc::new(std::cell::RefCell::new(Vec::new()));
    let l = log.clone();
    m.on(0, move || {
        reactor::register_timed_poller("t", Duration::from_micros(10), move || {
            l.borrow_mut().push(reactor::now_ns());
            PollStatus::Busy
        });
    });
    m.on(0, || reactor::send(1, || assert_eq!(reactor::current(), Some(1))));
    assert!(m.run_once(1)); // the message
    assert!(!m.run_once(1));
    m.run_once(0); // registers; not yet due on the manual clock
    m.run_once(0);
    assert!(log.borrow().is_empty());
    m.advance_ns(10_000);
    m.run_once(0);
    m.run_once(0);
    assert_eq!(*log.borrow(), vec![10_000]);
    m.advance_ns(25_000);
    m.run_once(0);
    assert_eq!(*log.borrow(), vec![10_000, 35_000]);
}

#[test]
fn local_state_is_per_reactor() {
    #[derive(Default)]
    struct Counter(Cell<u32>);
    let m = ReactorSet::manual(2);
    m.on(0, || reactor::local::<Counter>().0.set(5));
    m.on(1, || reactor::local::<Counter>().0.set(9));
    assert_eq!(m.on(0, || reactor::local::<Counter>().0.get()), 5);
    assert_eq!(m.on(1, || reactor::local::<Counter>().0.get()), 9);
    assert_ne!(m.on(0, reactor::current_uid), m.on(1, reactor::current_uid));
}

/// Interrupt mode: a reactor whose only poller is interrupt-driven sleeps
/// through an idle stretch without waking (the same reactor on the timer
/// policy wakes about once per millisecond), wakes when the poller's
/// eventfd is signalled and runs it, and wakes on time for a deadline the
/// poller sets (commands that may time out).
#[test]
fn interrupt_mode_sleeps_on_eventfds_instead_of_a_timer() {
    thread_local!(static DEVICE_POLLER: std::cell::RefCell<Option<reactor::PollerHandle>> = const { std::cell::RefCell::new(None) });
    fn run(idle: IdlePolicy) -> (u64, Option<(u64, u64)>) {
        let mut cfg = ReactorConfig::new(vec![0], idle);
        cfg.pin = false;
        let set = ReactorSet::start(cfg, || {}).unwrap();
        let irq = Arc::new(reactor::EventFd::new().unwrap());
        let work = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let (irq2, work2, tx2) = (irq.clone(), work.clone(), tx.clone());
        set.send(0, move || {
            let h = reactor::register_interrupt_poller("device", irq2, move || {
                if work2.swap(0, Ordering::AcqRel) > 0 {
                    tx2.send("done").unwrap();
                    return PollStatus::Busy;
                }
                PollStatus::Idle
            });
            DEVICE_POLLER.with(|c| *c.borrow_mut() = Some(h));
            tx.send("registered").unwrap();
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "registered");
        std::thread::sleep(Duration::from_millis(20)); // let it settle into its sleep
        let before = set.stats(0).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let idle_wakeups = set.stats(0).unwrap().wakeups - before.wakeups;
        if !idle.uses_interrupts() {
            set.stop();
            set.join();
            return (idle_wakeups, None);
        }
        // A device posts work and signals: the reactor wakes and runs the poller.
        work.store(1, Ordering::Release);
        irq.signal();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "done", "the interrupt did not wake it");
        let irq_wakeups = set.stats(0).unwrap().interrupt_wakeups;
        // With deadlines of its own the poller has the reactor wake for them.
        set.send(0, || {
            DEVICE_POLLER.with(|c| c.borrow().as_ref().unwrap().set_wake_within(Some(Duration::from_millis(1))))
        });
        std::thread::sleep(Duration::from_millis(20));
        let t0 = set.stats(0).unwrap().wakeups;
        std::thread::sleep(Duration::from_millis(200));
        let ticking = set.stats(0).unwrap().wakeups - t0;
        set.stop();
        set.join();
        (idle_wakeups, Some((irq_wakeups, ticking)))
    }
    let (timer_wakeups, _) = run(IdlePolicy::sleep());
    let (idle_wakeups, irq) = run(IdlePolicy::interrupt());
    let (irq_wakeups, ticking) = irq.unwrap();
    eprintln!(
        "200 ms idle: {timer_wakeups} wakeups on the timer, {idle_wakeups} in interrupt mode; ticking: {ticking}"
    );
    assert!(timer_wakeups >= 20, "the timer policy should wake about every ms, woke {timer_wakeups} times");
    assert_eq!(idle_wakeups, 0, "an idle reactor in interrupt mode woke {idle_wakeups} times");
    assert!(irq_wakeups >= 1, "the interrupt was not counted as the wake-up");
    assert!(ticking >= 20, "a poller with a 1 ms deadline woke the reactor {ticking} times in 200 ms");
}
