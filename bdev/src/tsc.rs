//! A cheap timestamp for per-IO latency accounting (the CPU's time-stamp
//! counter on x86_64, the monotonic clock elsewhere) and its tick rate.

use std::sync::OnceLock;
use std::time::Instant;

/// Current tick count.
#[inline]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC has no preconditions on x86_64 and reads no memory.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static T0: OnceLock<Instant> = OnceLock::new();
        T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Ticks per second, measured once (about 10 ms at first call).
pub fn tick_rate() -> u64 {
    static RATE: OnceLock<u64> = OnceLock::new();
    *RATE.get_or_init(|| {
        let (t0, c0) = (Instant::now(), ticks());
        std::thread::sleep(std::time::Duration::from_millis(10));
        let (dt, dc) = (t0.elapsed().as_nanos().max(1), ticks().wrapping_sub(c0));
        ((dc as u128 * 1_000_000_000) / dt) as u64
    })
}
