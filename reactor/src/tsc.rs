//! The reactors' tick counter: the CPU's time-stamp counter on x86_64 (one
//! instruction, so a reactor can read it once per loop to split its time
//! into busy and idle, as SPDK's reactors do), the monotonic clock in
//! nanoseconds elsewhere; and the counter's rate, measured.
//!
//! The only unsafe code of this crate is the RDTSC intrinsic below.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Current tick count. Invariant TSCs (every x86_64 CPU of the last decade)
/// tick at a constant rate on every core; a reader that moved to another
/// core may still see a smaller value, so callers subtract saturating.
#[inline]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC is part of the x86_64 baseline, has no preconditions
        // and reads no memory.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        epoch().elapsed().as_nanos() as u64
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// How long the rate is measured for.
const CALIBRATION: Duration = Duration::from_millis(20);

/// Ticks per second. On x86_64 it is measured once per process, against the
/// monotonic clock over 20 ms: the first caller waits for that, so
/// [`calibrate_in_background`] starts it early, off any reactor.
pub fn tick_rate() -> u64 {
    static RATE: OnceLock<u64> = OnceLock::new();
    *RATE.get_or_init(|| {
        if cfg!(not(target_arch = "x86_64")) {
            return 1_000_000_000;
        }
        let (t0, c0) = (Instant::now(), ticks());
        std::thread::sleep(CALIBRATION);
        let (c1, t1) = (ticks(), Instant::now());
        let elapsed_ns = t1.duration_since(t0).as_nanos().max(1);
        (u128::from(c1.saturating_sub(c0)) * 1_000_000_000 / elapsed_ns) as u64
    })
}

/// Measures the tick rate on a short-lived thread, so that a reactor that
/// asks later (to answer `framework_get_reactors`) does not wait 20 ms.
pub fn calibrate_in_background() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let _ = std::thread::Builder::new().name("tsc-calibrate".into()).spawn(|| {
            tick_rate();
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_advance_at_the_measured_rate() {
        let rate = tick_rate();
        assert!(rate > 1_000_000, "a tick rate of {rate}/s is implausible");
        let (t0, c0) = (Instant::now(), ticks());
        std::thread::sleep(Duration::from_millis(50));
        let (c1, elapsed) = (ticks(), t0.elapsed());
        let expected = rate as f64 * elapsed.as_secs_f64();
        let seen = c1.saturating_sub(c0) as f64;
        // Loose bounds: a loaded 2-core box may deschedule between reads.
        assert!(seen > expected * 0.5 && seen < expected * 1.5, "saw {seen} ticks, expected about {expected}");
    }
}
