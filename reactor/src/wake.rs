//! The sleep/wake handshake between a reactor that goes idle and the threads
//! that send it messages.
//!
//! A sleeping reactor must never miss a message: the reactor announces that it
//! is about to sleep, re-checks its ring, and only then parks; a sender pushes
//! first and then, if it sees the announcement, withdraws it and unparks. Both
//! sides use read-modify-writes on the flag (a plain store for the
//! announcement was not enough: the loom model in `tests/loom_ring.rs` found a
//! lost wake-up with it), so either the reactor sees the message on its
//! re-check or the sender sees the flag. Parking also has a timeout, so even a bug
//! here would cost latency, not a hang.

use crate::sync::{fence, AtomicBool, Ordering};

pub struct WakeFlag {
    sleeping: AtomicBool,
}

impl Default for WakeFlag {
    fn default() -> Self {
        WakeFlag { sleeping: AtomicBool::new(false) }
    }
}

impl WakeFlag {
    /// Reactor side, before its final emptiness check.
    pub fn announce_sleep(&self) {
        // An RMW, not a store: RMWs on one location are totally ordered, so
        // the sender's swap is guaranteed to observe it or precede it.
        self.sleeping.swap(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }
    /// Reactor side, after waking (or deciding not to sleep).
    pub fn clear(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }
    /// Sender side, after pushing: true when the sender must unpark the reactor.
    pub fn take_sleeper(&self) -> bool {
        fence(Ordering::SeqCst);
        self.sleeping.swap(false, Ordering::SeqCst)
    }
}
