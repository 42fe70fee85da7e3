//! The tick counter for per-IO latency accounting: the reactors' own
//! (`reactor::tsc`), so IO latencies and reactor busy/idle times are in the
//! same ticks at the same measured rate.

pub use reactor::tsc::{tick_rate, ticks};
