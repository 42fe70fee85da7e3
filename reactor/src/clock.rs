//! The reactors' time source: the real monotonic clock, or a manual clock that
//! a deterministic test advances by hand.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub enum Clock {
    Real(Instant),
    Manual(AtomicU64),
}

impl Clock {
    pub fn real() -> Self {
        Clock::Real(Instant::now())
    }
    pub fn manual() -> Self {
        Clock::Manual(AtomicU64::new(0))
    }
    /// Nanoseconds since the clock started.
    pub fn now_ns(&self) -> u64 {
        match self {
            Clock::Real(t0) => t0.elapsed().as_nanos() as u64,
            Clock::Manual(ns) => ns.load(Ordering::Acquire),
        }
    }
    /// Advances a manual clock; a real clock ignores this.
    pub fn advance_ns(&self, delta_ns: u64) {
        if let Clock::Manual(ns) = self {
            ns.fetch_add(delta_ns, Ordering::AcqRel);
        }
    }
    pub fn is_manual(&self) -> bool {
        matches!(self, Clock::Manual(_))
    }
}
