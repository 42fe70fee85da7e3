//! IO latency histograms (`bdev_enable_histogram`, `bdev_get_histogram`) in
//! the layout SPDK's tools decode: log-linear buckets of TSC ticks, each
//! power-of-two range split into `2^granularity` linear buckets, ranges
//! `min_range..=max_range` kept, counts serialised as little-endian `u64`s
//! in base64 next to `granularity`, `min_range`, `max_range` and `tsc_rate`.
//!
//! Each channel owns its histogram (plain cells, its reactor is the only
//! writer: no lock and no allocation when an IO is counted); a read merges
//! the channels' counts on their reactors.

use crate::io::IoType;
use crate::registry::BdevHandle;
use crate::{qos, tsc, BdevError};
use serde_json::{json, Value};
use std::cell::Cell;
use std::sync::{Arc, Mutex};

/// Linear buckets per power of two, as a shift (SPDK's default).
pub const DEFAULT_GRANULARITY: u8 = 7;
/// Latencies below this fold into the first bucket (SPDK's RPC default).
pub const DEFAULT_MIN_NSEC: u64 = 1_000;
/// Latencies at or above this fold into the last bucket (SPDK's RPC default).
pub const DEFAULT_MAX_NSEC: u64 = 120_000_000_000;
/// Largest granularity accepted: 2^12 buckets per range keeps one channel's
/// histogram within a few MiB even over the whole 64-bit range.
pub const MAX_GRANULARITY: u8 = 12;

/// What `bdev_enable_histogram` asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistogramConfig {
    pub granularity: u8,
    pub min_nsec: u64,
    pub max_nsec: u64,
    /// Only IOs of this type are counted; all when None.
    pub io_type: Option<IoType>,
}

impl Default for HistogramConfig {
    fn default() -> Self {
        HistogramConfig {
            granularity: DEFAULT_GRANULARITY,
            min_nsec: DEFAULT_MIN_NSEC,
            max_nsec: DEFAULT_MAX_NSEC,
            io_type: None,
        }
    }
}

impl HistogramConfig {
    /// Refuses what cannot make a histogram.
    pub fn validate(&self) -> Result<(), String> {
        if self.granularity == 0 || self.granularity > MAX_GRANULARITY {
            return Err(format!("granularity {} is not between 1 and {MAX_GRANULARITY}", self.granularity));
        }
        if self.min_nsec >= self.max_nsec {
            return Err(format!("min_nsec {} is not below max_nsec {}", self.min_nsec, self.max_nsec));
        }
        Ok(())
    }

    /// The bucket layout at `tick_rate` ticks per second.
    pub fn shape(&self, tick_rate: u64) -> Shape {
        let to_ticks =
            |ns: u64| (u128::from(ns) * u128::from(tick_rate) / 1_000_000_000).min(u128::from(u64::MAX)) as u64;
        let max_ticks = if self.max_nsec == u64::MAX { u64::MAX } else { to_ticks(self.max_nsec) };
        Shape::new(self.granularity.into(), to_ticks(self.min_nsec), max_ticks)
    }
}

/// Which buckets a histogram keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub granularity: u32,
    pub min_range: u32,
    pub max_range: u32,
}

impl Shape {
    /// Buckets covering `min_ticks..max_ticks` (values outside fold into
    /// the first or last bucket).
    pub fn new(granularity: u32, min_ticks: u64, max_ticks: u64) -> Shape {
        let mut s = Shape { granularity, min_range: 0, max_range: 0 };
        s.min_range = s.range_of(min_ticks);
        s.max_range = s.range_of(max_ticks.saturating_sub(1)).max(s.min_range);
        s
    }

    /// The power-of-two range a value falls in: 0 for values below
    /// `2^granularity`, then one more per bit.
    fn range_of(&self, v: u64) -> u32 {
        let bits = 64 - v.leading_zeros();
        bits.saturating_sub(self.granularity)
    }

    pub fn per_range(&self) -> usize {
        1 << self.granularity
    }

    pub fn buckets(&self) -> usize {
        (self.max_range - self.min_range + 1) as usize * self.per_range()
    }

    /// Index of the bucket counting `v`.
    pub fn bucket_of(&self, v: u64) -> usize {
        let range = self.range_of(v);
        let (range, index) = if range < self.min_range {
            (self.min_range, 0)
        } else if range > self.max_range {
            (self.max_range, self.per_range() - 1)
        } else {
            let shift = range.saturating_sub(1);
            (range, ((v >> shift) as usize) & (self.per_range() - 1))
        };
        ((range - self.min_range) as usize) * self.per_range() + index
    }
}

/// One channel's histogram.
pub struct Histogram {
    shape: Shape,
    io_type: Option<IoType>,
    counts: Box<[Cell<u64>]>,
}

impl Histogram {
    /// Allocates the buckets (control path: when the histogram is enabled
    /// or the channel created).
    pub fn new(shape: Shape, io_type: Option<IoType>) -> Histogram {
        Histogram { shape, io_type, counts: (0..shape.buckets()).map(|_| Cell::new(0)).collect() }
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Counts one completed IO of `io_type` that took `ticks`.
    #[inline]
    pub fn tally(&self, io_type: IoType, ticks: u64) {
        if self.io_type.is_some_and(|t| t != io_type) {
            return;
        }
        let c = &self.counts[self.shape.bucket_of(ticks)];
        c.set(c.get() + 1);
    }

    /// Adds the counts into `acc` (of `shape().buckets()` entries).
    pub fn add_into(&self, acc: &mut [u64]) {
        for (a, c) in acc.iter_mut().zip(self.counts.iter()) {
            *a += c.get();
        }
    }
}

/// The counts as SPDK serialises them: little-endian `u64`s, base64
/// (standard alphabet, padded).
pub fn encode(counts: &[u64]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = counts.iter().flat_map(|c| c.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Turns `h`'s histogram on with `config` (fresh, zeroed counts on every
/// channel) or off (None), on every reactor before `done` runs. Must run on
/// a reactor.
pub fn enable(
    h: &BdevHandle,
    config: Option<HistogramConfig>,
    done: impl FnOnce(Result<(), BdevError>) + Send + 'static,
) {
    if let Some(c) = &config {
        if let Err(e) = c.validate() {
            return done(Err(BdevError::Invalid(e)));
        }
    }
    let controls = qos::controls(h);
    *controls.histogram.lock().unwrap_or_else(|e| e.into_inner()) = config;
    let shape = config.map(|c| c.shape(tsc::tick_rate()));
    let id = h.id();
    reactor::for_each_reactor(
        Arc::new(move || {
            if let Some((stats, _)) = qos::local_channel(id) {
                *stats.histogram.borrow_mut() = shape.map(|s| Histogram::new(s, config.and_then(|c| c.io_type)));
            }
        }),
        move || done(Ok(())),
    );
}

/// The histogram settings of `h`, None while off.
pub fn config(h: &BdevHandle) -> Option<HistogramConfig> {
    *qos::existing_controls(h)?.histogram.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sums `h`'s channels' histograms, then calls `done` with the layout and
/// the counts (an error while the histogram is off). Must run on a reactor.
pub fn collect(h: &BdevHandle, done: impl FnOnce(Result<(Shape, Vec<u64>), BdevError>) + Send + 'static) {
    let Some(cfg) = config(h) else {
        return done(Err(BdevError::Invalid(format!("histogram is not enabled on bdev {}", h.name()))));
    };
    let shape = cfg.shape(tsc::tick_rate());
    let acc = Arc::new(Mutex::new(vec![0u64; shape.buckets()]));
    let (acc2, id) = (acc.clone(), h.id());
    reactor::for_each_reactor(
        Arc::new(move || {
            let Some((stats, _)) = qos::local_channel(id) else { return };
            let hist = stats.histogram.borrow();
            // A channel re-enabled with other settings meanwhile is skipped.
            if let Some(hist) = hist.as_ref().filter(|h| h.shape() == shape) {
                hist.add_into(&mut acc2.lock().unwrap_or_else(|e| e.into_inner()));
            }
        }),
        move || done(Ok((shape, std::mem::take(&mut *acc.lock().unwrap_or_else(|e| e.into_inner()))))),
    );
}

/// The `bdev_enable_histogram` call that restores `h`'s histogram, for
/// `save_config`; None while off. Settings at their defaults are left out.
pub fn config_json(h: &BdevHandle) -> Option<Value> {
    let c = config(h)?;
    let d = HistogramConfig::default();
    let mut params = serde_json::Map::new();
    params.insert("name".into(), Value::from(h.name()));
    params.insert("enable".into(), Value::Bool(true));
    if let Some(t) = c.io_type {
        params.insert("opc".into(), Value::from(t.name()));
    }
    if c.granularity != d.granularity {
        params.insert("granularity".into(), Value::from(c.granularity));
    }
    if c.min_nsec != d.min_nsec {
        params.insert("min_nsec".into(), Value::from(c.min_nsec));
    }
    if c.max_nsec != d.max_nsec {
        params.insert("max_nsec".into(), Value::from(c.max_nsec));
    }
    Some(json!({"method": "bdev_enable_histogram", "params": params}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_the_log_linear_layout() {
        let s = Shape::new(7, 0, u64::MAX);
        assert_eq!((s.min_range, s.max_range), (0, 57));
        // Range 0 is linear up to 2^g.
        assert_eq!(s.bucket_of(0), 0);
        assert_eq!(s.bucket_of(127), 127);
        // 128..256 is range 1, one value per bucket; 256..512 range 2, two.
        assert_eq!(s.bucket_of(128), 128);
        assert_eq!(s.bucket_of(255), 255);
        assert_eq!(s.bucket_of(256), 256);
        assert_eq!(s.bucket_of(257), 256);
        assert_eq!(s.bucket_of(258), 257);
        assert_eq!(s.bucket_of(u64::MAX), s.buckets() - 1);
    }

    #[test]
    fn values_outside_the_kept_ranges_fold_into_the_ends() {
        // 1 us .. 120 s at 2.4454 GHz, as SPDK computes it: ranges 5..=32.
        let c = HistogramConfig::default();
        let s = c.shape(2_445_400_000);
        assert_eq!((s.granularity, s.min_range), (7, 5));
        assert_eq!(s.max_range, 32);
        assert_eq!(s.bucket_of(0), 0);
        assert_eq!(s.bucket_of(u64::MAX), s.buckets() - 1);
    }

    #[test]
    fn base64_matches_the_standard_encoding() {
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0]), "AAAAAAAAAAA=");
        assert_eq!(encode(&[1]), "AQAAAAAAAAA=");
        assert_eq!(encode(&[u64::MAX, 0x0102_0304_0506_0708]), "//////////8IBwYFBAMCAQ==");
    }
}
