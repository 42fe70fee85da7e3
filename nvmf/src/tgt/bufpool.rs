//! The target's data buffer budget (`num_shared_buffers` units of
//! `io_unit_size` bytes, with a per-reactor cache of `buf_cache_size`
//! units), as SPDK's transport data buffer pool.
//!
//! A command that moves data through R2T or C2HData takes
//! ceil(length / io_unit_size) units before its buffer is allocated, and
//! gives them back once nothing holds the buffer any more. When the budget
//! is spent the command waits in its queue pair (FIFO) instead of
//! allocating: the pool bounds the target's data buffer memory, whatever the
//! hosts send. In-capsule data (at most `in_capsule_data_size` per command,
//! bounded by the queue depth) does not draw on it, as in SPDK.
//!
//! Lock-free: the shared units are one atomic; each reactor's cache is an
//! atomic that only that reactor writes.

use super::{NvmfError, TransportOpts, ADMIN_IN_CAPSULE_LEN};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// SPDK's default per-poll-group cache when `buf_cache_size` is "auto" (u32::MAX).
const AUTO_CACHE_UNITS: u32 = 32;

pub(crate) struct BufPool {
    io_unit_size: u32,
    total_units: u32,
    shared: AtomicU32,
    /// Units cached per reactor (index = reactor id); single writer each.
    caches: Box<[AtomicU32]>,
    cache_units: u32,
    /// Requests that had to wait for units (for `nvmf_get_stats`).
    pub(crate) waits: AtomicU64,
}

impl BufPool {
    /// Checks the options against `reactors` reactors and builds the pool.
    pub(crate) fn new(o: &TransportOpts, reactors: usize) -> Result<BufPool, NvmfError> {
        let reactors = reactors.max(1) as u32;
        let io_unit = o.io_unit_size;
        if io_unit < 512 {
            return Err(NvmfError::Invalid(format!("io_unit_size {io_unit} must be at least 512 bytes")));
        }
        let largest = o.max_io_size.max(ADMIN_IN_CAPSULE_LEN);
        let units_per_io = largest.div_ceil(io_unit);
        let total = o.num_shared_buffers;
        if total < units_per_io {
            return Err(NvmfError::Invalid(format!(
                "num_shared_buffers {total} holds less than one {largest}-byte command \
                 ({units_per_io} buffers of io_unit_size {io_unit})"
            )));
        }
        let cache_units = if o.buf_cache_size == u32::MAX {
            AUTO_CACHE_UNITS.min((total - units_per_io) / reactors)
        } else {
            // Every reactor's cache full must still leave one largest command's
            // worth in the shared pool, or a reactor could wait forever.
            let need = u64::from(o.buf_cache_size) * u64::from(reactors) + u64::from(units_per_io);
            if need > u64::from(total) {
                return Err(NvmfError::Invalid(format!(
                    "num_shared_buffers {total} is too small for buf_cache_size {} on {reactors} reactors: \
                     at least {need} are needed (the caches plus one {largest}-byte command)",
                    o.buf_cache_size
                )));
            }
            o.buf_cache_size
        };
        Ok(BufPool {
            io_unit_size: io_unit,
            total_units: total,
            shared: AtomicU32::new(total),
            caches: (0..reactors).map(|_| AtomicU32::new(0)).collect(),
            cache_units,
            waits: AtomicU64::new(0),
        })
    }

    /// Units a transfer of `len` bytes needs.
    pub(crate) fn units_for(&self, len: u32) -> u32 {
        len.div_ceil(self.io_unit_size).max(1)
    }

    fn cache(&self) -> Option<&AtomicU32> {
        reactor::current().and_then(|r| self.caches.get(r))
    }

    /// Takes `n` units (this reactor's cache first), or none at all.
    pub(crate) fn take(&self, n: u32) -> bool {
        let cache = self.cache();
        let cached = cache.map_or(0, |c| c.load(Ordering::Relaxed));
        if cached >= n {
            if let Some(c) = cache {
                c.store(cached - n, Ordering::Relaxed);
            }
            return true;
        }
        let need = n - cached;
        let got = self.shared.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| s.checked_sub(need)).is_ok();
        if got {
            if let Some(c) = cache {
                c.store(0, Ordering::Relaxed);
            }
        }
        got
    }

    /// Gives `n` units back: into this reactor's cache up to its size, the
    /// rest to the shared pool.
    pub(crate) fn give(&self, n: u32) {
        if n == 0 {
            return;
        }
        let mut to_shared = n;
        if let Some(c) = self.cache() {
            let cached = c.load(Ordering::Relaxed);
            let keep = n.min(self.cache_units.saturating_sub(cached));
            c.store(cached + keep, Ordering::Relaxed);
            to_shared -= keep;
        }
        if to_shared > 0 {
            let before = self.shared.fetch_add(to_shared, Ordering::AcqRel);
            debug_assert!(before + to_shared <= self.total_units, "more buffer units given back than taken");
        }
    }

    /// Units not held by any command (shared plus every cache).
    pub(crate) fn free_units(&self) -> u32 {
        self.shared.load(Ordering::Acquire) + self.caches.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u32>()
    }

    pub(crate) fn total_units(&self) -> u32 {
        self.total_units
    }

    pub(crate) fn cache_units(&self) -> u32 {
        self.cache_units
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(shared: u32, cache: u32, unit: u32) -> TransportOpts {
        TransportOpts { num_shared_buffers: shared, buf_cache_size: cache, io_unit_size: unit, ..Default::default() }
    }

    #[test]
    fn sizes_are_checked_and_units_round_up() {
        assert!(BufPool::new(&opts(0, 0, 131_072), 1).is_err());
        assert!(BufPool::new(&opts(511, 32, 256), 1).is_err());
        // 16 units of 8 KiB per 128 KiB command: 15 buffers are too few.
        let e = BufPool::new(&opts(15, 0, 8192), 1).err().unwrap();
        assert!(e.to_string().contains("num_shared_buffers 15"), "{e}");
        // Caches on 4 reactors must leave one command's worth.
        assert_eq!(BufPool::new(&opts(9, 2, 131_072), 4).unwrap().cache_units(), 2);
        assert!(BufPool::new(&opts(8, 2, 131_072), 4).is_err());
        let auto = BufPool::new(&opts(511, u32::MAX, 131_072), 2).unwrap();
        assert_eq!(auto.cache_units(), 32);
        let p = BufPool::new(&opts(16, 0, 8192), 1).unwrap();
        assert_eq!((p.units_for(1), p.units_for(8192), p.units_for(8193), p.units_for(131_072)), (1, 1, 2, 16));
    }

    #[test]
    fn take_is_all_or_nothing_and_give_returns() {
        let p = BufPool::new(&opts(4, 0, 131_072), 1).unwrap();
        assert!(p.take(3));
        assert!(!p.take(2), "only one unit is left");
        assert_eq!(p.free_units(), 1);
        p.give(3);
        assert_eq!(p.free_units(), 4);
        assert!(p.take(4));
        assert!(!p.take(1));
    }
}
