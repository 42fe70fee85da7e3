//! Loom model of suspend/resume: the owner reactor runs the real
//! `Coordinator` and its own `Gate`, a second reactor runs a `Gate`; they
//! talk over message rings (the reactor crate's loom twin). The second
//! reactor has a write in flight when the suspend starts and submits another
//! at an arbitrary moment. In every interleaving: the change runs only when
//! no array IO is in flight anywhere, held IO reaches no member while
//! suspended, held IO is resubmitted after resume, everything completes,
//! and nobody waits forever (loom reports deadlocks).
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p bdev-raid --release --test loom_quiesce`
#![cfg(loom)]

use bdev_raid::quiesce::{Coordinator, Drained, Gate, SuspendStep};
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use reactor::Ring;

#[derive(Clone, Copy, Debug)]
enum Msg {
    Suspend(u64),
    Resume(u64),
    Drained(u64),
}

struct World {
    /// Array IOs dispatched to members and not completed, all reactors.
    in_members: AtomicUsize,
    /// True from "suspended" until the owner sends resume.
    fenced: AtomicBool,
    completed: AtomicUsize,
}

fn send(ring: &Ring<Msg>, m: Msg) {
    ring.push(m).expect("rings are sized for the model");
}

impl World {
    fn dispatch(&self) {
        assert!(!self.fenced.load(Ordering::SeqCst), "IO reached a member while suspended");
        self.in_members.fetch_add(1, Ordering::SeqCst);
    }
    fn complete(&self) {
        self.in_members.fetch_sub(1, Ordering::SeqCst);
        self.completed.fetch_add(1, Ordering::SeqCst);
    }
}

/// `suspenders`: how many times the owner suspends (nested) before resuming.
/// `ack_early`: a deliberately broken reactor that answers `Drained` without
/// waiting for its IO, to show the model catches it.
fn model(suspenders: u32, ack_early: bool) {
    loom::model(move || {
        let world = Arc::new(World {
            in_members: AtomicUsize::new(0),
            fenced: AtomicBool::new(false),
            completed: AtomicUsize::new(0),
        });
        let to_owner = Arc::new(Ring::<Msg>::new(4));
        let to_r1 = Arc::new(Ring::<Msg>::new(4));

        // Reactor 1: one write in flight, another submitted at some point.
        let r1 = {
            let (world, to_owner, to_r1) = (world.clone(), to_owner.clone(), to_r1.clone());
            let mut gate: Gate<u32> = Gate::new(4);
            assert!(gate.try_enter());
            world.dispatch();
            thread::spawn(move || {
                let (mut first_done, mut second_submitted, mut second_done, mut resumed) = (false, false, false, false);
                let mut second_in_flight = false;
                while !(first_done && second_done && resumed) {
                    if let Some(m) = to_r1.pop() {
                        match m {
                            Msg::Suspend(e) => {
                                if let Some(e) = gate.on_suspend(e) {
                                    send(&to_owner, Msg::Drained(e));
                                } else if ack_early {
                                    send(&to_owner, Msg::Drained(e));
                                }
                            }
                            Msg::Resume(e) => {
                                gate.on_resume(e);
                                resumed = true;
                                while let Some(_io) = gate.pop_held() {
                                    assert!(gate.try_enter());
                                    world.dispatch();
                                    second_in_flight = true;
                                }
                            }
                            Msg::Drained(_) => unreachable!(),
                        }
                    } else if !first_done {
                        world.complete();
                        first_done = true;
                        if let Some(e) = gate.exit() {
                            if !ack_early {
                                send(&to_owner, Msg::Drained(e));
                            }
                        }
                    } else if !second_submitted {
                        second_submitted = true;
                        if gate.try_enter() {
                            world.dispatch();
                            second_in_flight = true;
                        } else {
                            gate.hold(2).unwrap();
                        }
                    } else if second_in_flight {
                        world.complete();
                        second_in_flight = false;
                        second_done = true;
                        if let Some(e) = gate.exit() {
                            send(&to_owner, Msg::Drained(e));
                        }
                    } else {
                        thread::yield_now();
                    }
                }
            })
        };

        // The owner: coordinator plus its own (idle) gate.
        let mut coord = Coordinator::new(2);
        let mut own_gate: Gate<u32> = Gate::new(4);
        let mut epoch = 0;
        for i in 0..suspenders {
            match coord.suspend() {
                SuspendStep::Broadcast(e) => {
                    assert_eq!(i, 0);
                    epoch = e;
                    send(&to_r1, Msg::Suspend(e));
                    if let Some(e) = own_gate.on_suspend(e) {
                        send(&to_owner, Msg::Drained(e));
                    }
                }
                SuspendStep::Wait | SuspendStep::Ready => assert!(i > 0),
            }
        }
        loop {
            match to_owner.pop() {
                Some(Msg::Drained(e)) => match coord.on_drained(e) {
                    Drained::Suspended => break,
                    Drained::Pending => {}
                    Drained::Resume(_) => unreachable!("the suspenders still hold it"),
                },
                Some(_) => unreachable!(),
                None => thread::yield_now(),
            }
        }
        // The fenced change: nothing may be in flight at a member, and
        // nothing may reach one until resume is sent.
        world.fenced.store(true, Ordering::SeqCst);
        assert_eq!(world.in_members.load(Ordering::SeqCst), 0, "suspended with IO in flight");
        let mut resume = None;
        for _ in 0..suspenders {
            if let Some(e) = coord.resume() {
                resume = Some(e);
            }
        }
        assert_eq!(resume, Some(epoch), "the last resume reopens");
        own_gate.on_resume(epoch);
        world.fenced.store(false, Ordering::SeqCst);
        send(&to_r1, Msg::Resume(epoch));
        r1.join().unwrap();
        assert_eq!(world.completed.load(Ordering::SeqCst), 2);
        assert_eq!(world.in_members.load(Ordering::SeqCst), 0);
        assert!(coord.is_active());
    });
}

#[test]
fn suspend_drains_every_reactor_and_resumes_held_io() {
    model(1, false);
}

#[test]
fn nested_suspenders_resume_once() {
    model(2, false);
}

#[test]
#[should_panic(expected = "suspended with IO in flight")]
fn acking_before_drain_is_caught() {
    model(1, true);
}
