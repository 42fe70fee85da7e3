//! Suspend/resume of an array (invariant 3, docs/architecture.md), as two small state
//! machines with no threads in them: the owner reactor's [`Coordinator`] and
//! one [`Gate`] per reactor. The array wires them to reactor messages; the
//! loom model (`tests/loom_quiesce.rs`) wires the very same code to rings
//! between loom threads.
//!
//! Protocol:
//! 1. `Coordinator::suspend` starts epoch `e`; the owner sends `Suspend(e)` to
//!    every reactor.
//! 2. A reactor's gate closes: new IO is held (in order, bounded). When the
//!    IO it had admitted has all completed it answers `Drained(e)` (at once
//!    if none was in flight).
//! 3. When every reactor drained, the array is suspended: the change runs,
//!    with no array IO in flight anywhere.
//! 4. `Coordinator::resume` (once every suspender resumed) sends `Resume(e)`;
//!    each gate opens and resubmits its held IO in arrival order, before any
//!    IO that arrives later.
//!
//! Suspends nest (a counter), so a delete can suspend while someone else
//! holds the array suspended, and nobody waits on anybody but in-flight IO,
//! which completes in bounded time: no deadlock.

use std::collections::VecDeque;

/// The owner's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Active,
    /// Waiting for this many reactors to drain.
    Suspending {
        acks_left: usize,
    },
    Suspended,
}

/// What the owner must do after [`Coordinator::suspend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SuspendStep {
    /// Send `Suspend(epoch)` to every reactor; the caller's waiter runs when
    /// [`Coordinator::on_drained`] says so.
    Broadcast(u64),
    /// A suspend is already under way: queue the waiter.
    Wait,
    /// Already suspended: the waiter may run now.
    Ready,
}

/// What the owner must do after [`Coordinator::on_drained`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Other reactors still have IO in flight.
    Pending,
    /// The array is suspended: run every queued waiter.
    Suspended,
    /// Nobody holds the suspension any more: send `Resume(epoch)` at once.
    Resume(u64),
}

/// The owner reactor's side: one per array.
#[derive(Debug)]
pub struct Coordinator {
    phase: Phase,
    epoch: u64,
    /// Suspenders that have not resumed yet.
    holders: u32,
    num_reactors: usize,
}

impl Coordinator {
    pub fn new(num_reactors: usize) -> Self {
        Coordinator { phase: Phase::Active, epoch: 0, holders: 0, num_reactors: num_reactors.max(1) }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn is_suspended(&self) -> bool {
        self.phase == Phase::Suspended
    }

    pub fn is_active(&self) -> bool {
        self.phase == Phase::Active
    }

    /// A new suspender. It must call [`Coordinator::resume`] once, after its
    /// waiter ran.
    pub fn suspend(&mut self) -> SuspendStep {
        self.holders += 1;
        match self.phase {
            Phase::Active => {
                self.epoch += 1;
                self.phase = Phase::Suspending { acks_left: self.num_reactors };
                SuspendStep::Broadcast(self.epoch)
            }
            Phase::Suspending { .. } => SuspendStep::Wait,
            Phase::Suspended => SuspendStep::Ready,
        }
    }

    /// A reactor drained for `epoch`.
    pub fn on_drained(&mut self, epoch: u64) -> Drained {
        match self.phase {
            Phase::Suspending { acks_left } if epoch == self.epoch => {
                if acks_left > 1 {
                    self.phase = Phase::Suspending { acks_left: acks_left - 1 };
                    return Drained::Pending;
                }
                if self.holders == 0 {
                    // Every suspender resumed before the drain finished.
                    self.phase = Phase::Active;
                    return Drained::Resume(self.epoch);
                }
                self.phase = Phase::Suspended;
                Drained::Suspended
            }
            // A stale or duplicate ack cannot happen with per-pair FIFO
            // messages; ignoring it keeps a bug from unfencing the array.
            _ => Drained::Pending,
        }
    }

    /// A suspender is done. `Some(epoch)`: send `Resume(epoch)` to every reactor.
    pub fn resume(&mut self) -> Option<u64> {
        if self.holders == 0 {
            return None;
        }
        self.holders -= 1;
        if self.holders == 0 && self.phase == Phase::Suspended {
            self.phase = Phase::Active;
            return Some(self.epoch);
        }
        None
    }
}

/// One reactor's side: admits, counts and holds that reactor's IO to one array.
#[derive(Debug)]
pub struct Gate<T> {
    closed: bool,
    epoch: u64,
    in_flight: u64,
    ack_pending: bool,
    held: VecDeque<T>,
    held_limit: usize,
}

impl<T> Gate<T> {
    /// `held_limit`: most IOs held while suspended (beyond it they fail with
    /// a retryable status; the reactor's IO pool bounds it anyway).
    pub fn new(held_limit: usize) -> Self {
        Gate { closed: false, epoch: 0, in_flight: 0, ack_pending: false, held: VecDeque::new(), held_limit }
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Admits one IO (counted until [`Gate::exit`]) unless the gate is closed.
    pub fn try_enter(&mut self) -> bool {
        if self.closed {
            return false;
        }
        self.in_flight += 1;
        true
    }

    /// Keeps an IO that `try_enter` refused, to resubmit at resume.
    pub fn hold(&mut self, io: T) -> Result<(), T> {
        if self.held.len() >= self.held_limit {
            return Err(io);
        }
        self.held.push_back(io);
        Ok(())
    }

    /// An admitted IO finished. `Some(epoch)`: send `Drained(epoch)` to the owner.
    pub fn exit(&mut self) -> Option<u64> {
        debug_assert!(self.in_flight > 0, "gate exit without enter");
        self.in_flight = self.in_flight.saturating_sub(1);
        self.maybe_ack()
    }

    /// `Suspend(epoch)` arrived. `Some(epoch)`: drained already, answer now.
    pub fn on_suspend(&mut self, epoch: u64) -> Option<u64> {
        self.closed = true;
        self.epoch = epoch;
        self.ack_pending = true;
        if self.held.capacity() < self.held_limit.min(4096) {
            // Control path: reserve now so holding does not allocate per IO.
            self.held.reserve(self.held_limit.min(4096));
        }
        self.maybe_ack()
    }

    fn maybe_ack(&mut self) -> Option<u64> {
        if self.closed && self.ack_pending && self.in_flight == 0 {
            self.ack_pending = false;
            return Some(self.epoch);
        }
        None
    }

    /// `Resume(epoch)` arrived: the gate opens. Take the held IO with
    /// [`Gate::pop_held`] and resubmit it before anything else.
    pub fn on_resume(&mut self, epoch: u64) {
        if epoch == self.epoch {
            self.closed = false;
            self.ack_pending = false;
        }
    }

    /// The next held IO, oldest first (also used at teardown to fail them).
    pub fn pop_held(&mut self) -> Option<T> {
        self.held.pop_front()
    }

    /// Takes the first held IO that `pick` chooses (an abort); the others
    /// keep their order. Held IO was never admitted: the drain count is
    /// unaffected.
    pub fn take_held(&mut self, pick: impl FnMut(&T) -> bool) -> Option<T> {
        let at = self.held.iter().position(pick)?;
        self.held.remove(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspend_waits_for_in_flight_and_resumes_in_order() {
        let mut c = Coordinator::new(2);
        let mut g0: Gate<u32> = Gate::new(8);
        let mut g1: Gate<u32> = Gate::new(8);
        assert!(g0.try_enter());
        let SuspendStep::Broadcast(e) = c.suspend() else { panic!() };
        assert_eq!(g0.on_suspend(e), None, "one IO still in flight");
        assert_eq!(g1.on_suspend(e), Some(e));
        assert_eq!(c.on_drained(e), Drained::Pending);
        assert!(!g0.try_enter());
        g0.hold(1).unwrap();
        g0.hold(2).unwrap();
        assert_eq!(g0.exit(), Some(e));
        assert_eq!(c.on_drained(e), Drained::Suspended);
        assert!(c.is_suspended());
        // Nested suspend while suspended is immediate.
        assert_eq!(c.suspend(), SuspendStep::Ready);
        assert_eq!(c.resume(), None);
        assert_eq!(c.resume(), Some(e));
        g0.on_resume(e);
        assert_eq!((g0.pop_held(), g0.pop_held(), g0.pop_held()), (Some(1), Some(2), None));
        assert!(g0.try_enter());
    }

    #[test]
    fn an_aborted_held_io_leaves_the_others_in_order_and_the_drain_count_alone() {
        let mut g: Gate<u32> = Gate::new(8);
        assert!(g.try_enter());
        assert_eq!(g.on_suspend(1), None);
        for io in [1, 2, 3] {
            g.hold(io).unwrap();
        }
        assert_eq!(g.take_held(|&io| io == 2), Some(2));
        assert_eq!(g.take_held(|&io| io == 9), None);
        assert_eq!((g.held(), g.in_flight()), (2, 1));
        assert_eq!(g.exit(), Some(1), "the admitted IO alone is drained");
        g.on_resume(1);
        assert_eq!((g.pop_held(), g.pop_held(), g.pop_held()), (Some(1), Some(3), None));
    }

    #[test]
    fn second_suspender_during_suspending_waits_and_bounds_hold() {
        let mut c = Coordinator::new(1);
        let SuspendStep::Broadcast(e) = c.suspend() else { panic!() };
        assert_eq!(c.suspend(), SuspendStep::Wait);
        let mut g: Gate<u8> = Gate::new(1);
        assert_eq!(g.on_suspend(e), Some(e));
        assert_eq!(c.on_drained(e), Drained::Suspended);
        assert_eq!(c.on_drained(e), Drained::Pending, "duplicate acks are ignored");
        g.hold(1).unwrap();
        assert_eq!(g.hold(2), Err(2));
        assert_eq!(c.resume(), None);
        assert_eq!(c.resume(), Some(e));
        assert_eq!(c.resume(), None, "unbalanced resume is ignored");
        assert!(c.is_active());
        // A suspender that gives up before the drain ends: resume at once.
        let SuspendStep::Broadcast(e) = c.suspend() else { panic!() };
        assert_eq!(c.resume(), None);
        assert_eq!(c.on_drained(e), Drained::Resume(e));
        assert!(c.is_active());
    }
}
