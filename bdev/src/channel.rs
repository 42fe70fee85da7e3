//! The block-device trait (shaped like SPDK's `spdk_bdev_fn_table`), the
//! per-reactor channel a bdev serves IO on, and per-channel IO statistics.

use crate::histogram::Histogram;
use crate::io::{BdevIo, IoBox, IoError, IoStatus, IoType};
use crate::qos::{self, QosGate};
use crate::registry::BdevHandle;
use crate::tsc;
use serde_json::Value;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use uuid::Uuid;

/// Fixed facts about a bdev, set when it is created.
#[derive(Clone, Debug)]
pub struct BdevProps {
    pub name: String,
    pub product_name: &'static str,
    pub block_size: u32,
    pub num_blocks: u64,
    pub uuid: Uuid,
    /// Preferred IO boundary in blocks (a RAID strip), 0 if none.
    pub optimal_io_boundary: u32,
    /// Largest IO in blocks the bdev accepts in one piece (0: no limit).
    pub max_io_blocks: u32,
    /// A volatile write cache sits in front of the media: a completed write
    /// may be lost at power loss unless it carried FUA or a flush completed
    /// after it. Without one, every completed write is durable and FUA and
    /// flush cost nothing. A bdev with a cache honours FUA and flush.
    pub write_cache: bool,
    /// Deallocated (unmapped) blocks read back as zeroes (NVMe DLFEAT 001b).
    /// False when the bdev cannot say, or does not unmap.
    pub deallocated_reads_zeroes: bool,
    /// Largest write, in blocks, that a power loss leaves either wholly
    /// written or not at all (NVMe AWUPF + 1). One block unless the backend
    /// knows better: the least every device promises.
    pub atomic_write_blocks: u32,
}

impl BdevProps {
    pub fn new(name: &str, product_name: &'static str, block_size: u32, num_blocks: u64, uuid: Option<Uuid>) -> Self {
        BdevProps {
            name: name.to_string(),
            product_name,
            block_size,
            num_blocks,
            uuid: uuid.unwrap_or_else(Uuid::new_v4),
            optimal_io_boundary: 0,
            max_io_blocks: 0,
            write_cache: false,
            deallocated_reads_zeroes: false,
            atomic_write_blocks: 1,
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.num_blocks * self.block_size as u64
    }
}

/// A block device. Shared by all reactors (`Send + Sync`); IO goes through a
/// per-reactor [`BdevChannel`] that the bdev creates on the reactor using it.
pub trait Bdev: Send + Sync + 'static {
    fn props(&self) -> &BdevProps;

    /// Module name (`malloc`, `null`, `raid`, ...) for logs and JSON.
    fn module(&self) -> &'static str;

    fn io_type_supported(&self, t: IoType) -> bool;

    /// SPDK's `spdk_bdev_has_write_cache`: whether completed writes can be
    /// lost at power loss without FUA or a later flush.
    fn has_write_cache(&self) -> bool {
        self.props().write_cache
    }

    /// Creates this reactor's channel. Called on the reactor that will use it.
    fn create_channel(&self) -> Result<Rc<dyn BdevChannel>, crate::BdevError>;

    /// `driver_specific` entry for `bdev_get_bdevs`: (key, value).
    fn driver_specific(&self) -> Option<(&'static str, Value)> {
        None
    }

    /// The RPC call that recreates this bdev (`{"method":..,"params":..}`),
    /// for `save_config`; None for bdevs that other modules create.
    fn config(&self) -> Option<Value> {
        None
    }

    /// Releases resources once no channel and no IO remains. `done` may be
    /// called later (after metadata writes, say), from any reactor.
    fn destruct(&self, done: Box<dyn FnOnce() + Send>) {
        done();
    }

    /// Measures the media again (a file or block device that was resized
    /// under the bdev): its size now, in blocks. None for a bdev that
    /// cannot (its size changes by other means, or never).
    fn rescan_blocks(&self) -> Option<Result<u64, crate::BdevError>> {
        None
    }
}

/// A bdev's IO path on one reactor.
pub trait BdevChannel {
    /// Takes ownership of `io` and completes it exactly once, later (through
    /// `IoBox::complete`). The range and buffer were checked by [`Channel`].
    fn submit(&self, io: IoBox);

    /// Aborts the first IO that `matches` among those this channel still
    /// holds before they reached the layer below (waiting for a range lock,
    /// a bitmap batch, a timer, a buffer): it completes with
    /// `IoError::Aborted`. False when no such IO is held here; an IO already
    /// at a device cannot be called back.
    fn abort(&self, matches: &dyn Fn(&BdevIo) -> bool) -> bool {
        let _ = matches;
        false
    }
}

/// IO counters of one channel; summed over reactors by `bdev_get_iostat`.
/// Cells: only the owning reactor writes them.
#[derive(Default)]
pub struct ChannelStats {
    /// The bdev's block size: an unmap carries no buffer, so its bytes are
    /// blocks times this.
    block_size: u64,
    pub bytes_read: Cell<u64>,
    pub num_read_ops: Cell<u64>,
    pub bytes_written: Cell<u64>,
    pub num_write_ops: Cell<u64>,
    /// Writes (and write zeroes) that carried FUA.
    pub num_fua_write_ops: Cell<u64>,
    pub bytes_unmapped: Cell<u64>,
    pub num_unmap_ops: Cell<u64>,
    pub num_write_zeroes_ops: Cell<u64>,
    pub num_flush_ops: Cell<u64>,
    pub read_latency_ticks: Cell<u64>,
    pub write_latency_ticks: Cell<u64>,
    pub unmap_latency_ticks: Cell<u64>,
    pub max_read_latency_ticks: Cell<u64>,
    pub min_read_latency_ticks: Cell<u64>,
    pub max_write_latency_ticks: Cell<u64>,
    pub min_write_latency_ticks: Cell<u64>,
    pub max_unmap_latency_ticks: Cell<u64>,
    pub min_unmap_latency_ticks: Cell<u64>,
    pub num_io_errors: Cell<u64>,
    /// Failed IOs by SPDK's status (index: [`IoErrorCounts::slot`]).
    pub io_errors: [Cell<u64>; IoErrorCounts::SLOTS],
    pub in_flight: Cell<u64>,
    /// Latency histogram while `bdev_enable_histogram` has it on.
    pub(crate) histogram: RefCell<Option<Histogram>>,
}

fn add(c: &Cell<u64>, v: u64) {
    c.set(c.get().wrapping_add(v));
}

impl ChannelStats {
    pub(crate) fn account(&self, io: &mut BdevIo, now: u64) {
        add(&self.in_flight, u64::MAX); // -1
        let ticks = now.wrapping_sub(io.submit_ticks);
        io.latency_ticks = ticks;
        // Every completed IO, failed ones too, as SPDK counts them.
        if let Some(h) = self.histogram.borrow().as_ref() {
            h.tally(io.io_type, ticks);
        }
        if io.status != IoStatus::Success {
            add(&self.num_io_errors, 1);
            if let IoStatus::Failed(e) = io.status {
                add(&self.io_errors[IoErrorCounts::slot(e)], 1);
            }
            return;
        }
        let bytes = io.buf.as_ref().map_or(0, |b| b.len() as u64);
        let minmax = |max: &Cell<u64>, min: &Cell<u64>| {
            max.set(max.get().max(ticks));
            if min.get() == 0 || ticks < min.get() {
                min.set(ticks);
            }
        };
        match io.io_type {
            IoType::Read => {
                add(&self.bytes_read, bytes);
                add(&self.num_read_ops, 1);
                add(&self.read_latency_ticks, ticks);
                minmax(&self.max_read_latency_ticks, &self.min_read_latency_ticks);
            }
            IoType::Write => {
                add(&self.bytes_written, bytes);
                add(&self.num_write_ops, 1);
                add(&self.num_fua_write_ops, u64::from(io.flags.fua()));
                add(&self.write_latency_ticks, ticks);
                minmax(&self.max_write_latency_ticks, &self.min_write_latency_ticks);
            }
            IoType::Unmap => {
                add(&self.bytes_unmapped, io.num_blocks * self.block_size);
                add(&self.num_unmap_ops, 1);
                add(&self.unmap_latency_ticks, ticks);
                minmax(&self.max_unmap_latency_ticks, &self.min_unmap_latency_ticks);
            }
            IoType::WriteZeroes => {
                add(&self.num_write_zeroes_ops, 1);
                add(&self.num_fua_write_ops, u64::from(io.flags.fua()));
            }
            IoType::Flush => add(&self.num_flush_ops, 1),
            IoType::Reset => {}
        }
    }

    /// Adds this channel's counters into a JSON accumulator (SPDK's names).
    pub fn add_to(&self, acc: &mut IoStatTotals) {
        acc.bytes_read += self.bytes_read.get();
        acc.num_read_ops += self.num_read_ops.get();
        acc.bytes_written += self.bytes_written.get();
        acc.num_write_ops += self.num_write_ops.get();
        acc.num_fua_write_ops += self.num_fua_write_ops.get();
        acc.bytes_unmapped += self.bytes_unmapped.get();
        acc.num_unmap_ops += self.num_unmap_ops.get();
        acc.num_write_zeroes_ops += self.num_write_zeroes_ops.get();
        acc.num_flush_ops += self.num_flush_ops.get();
        acc.read_latency_ticks += self.read_latency_ticks.get();
        acc.write_latency_ticks += self.write_latency_ticks.get();
        acc.unmap_latency_ticks += self.unmap_latency_ticks.get();
        acc.max_read_latency_ticks = acc.max_read_latency_ticks.max(self.max_read_latency_ticks.get());
        acc.max_write_latency_ticks = acc.max_write_latency_ticks.max(self.max_write_latency_ticks.get());
        let min = |a: u64, b: u64| {
            if a == 0 {
                b
            } else if b == 0 {
                a
            } else {
                a.min(b)
            }
        };
        acc.min_read_latency_ticks = min(acc.min_read_latency_ticks, self.min_read_latency_ticks.get());
        acc.min_write_latency_ticks = min(acc.min_write_latency_ticks, self.min_write_latency_ticks.get());
        acc.max_unmap_latency_ticks = acc.max_unmap_latency_ticks.max(self.max_unmap_latency_ticks.get());
        acc.min_unmap_latency_ticks = min(acc.min_unmap_latency_ticks, self.min_unmap_latency_ticks.get());
        acc.num_io_errors += self.num_io_errors.get();
        for (a, c) in acc.io_error.0.iter_mut().zip(&self.io_errors) {
            *a += c.get();
        }
        acc.in_flight += self.in_flight.get();
    }
}

/// Sum of channel counters, in SPDK's `bdev_get_iostat` field names.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct IoStatTotals {
    pub bytes_read: u64,
    pub num_read_ops: u64,
    pub bytes_written: u64,
    pub num_write_ops: u64,
    /// nvraid's own: writes that carried FUA (not in SPDK's output).
    pub num_fua_write_ops: u64,
    pub bytes_unmapped: u64,
    pub num_unmap_ops: u64,
    pub num_write_zeroes_ops: u64,
    pub num_flush_ops: u64,
    pub read_latency_ticks: u64,
    pub max_read_latency_ticks: u64,
    pub min_read_latency_ticks: u64,
    pub write_latency_ticks: u64,
    pub max_write_latency_ticks: u64,
    pub min_write_latency_ticks: u64,
    pub unmap_latency_ticks: u64,
    pub max_unmap_latency_ticks: u64,
    pub min_unmap_latency_ticks: u64,
    pub num_io_errors: u64,
    /// SPDK's `io_error`: failed IOs by status, the statuses seen only.
    pub io_error: IoErrorCounts,
    #[serde(skip)]
    pub in_flight: u64,
}

/// Failed IOs counted by the SPDK bdev status each failure is (SPDK's
/// `bdev_get_iostat` `io_error` object: a status appears once an IO ended
/// with it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoErrorCounts(pub [u64; IoErrorCounts::SLOTS]);

impl IoErrorCounts {
    pub const SLOTS: usize = 4;
    /// SPDK's names of the statuses nvraid's IO errors are, by slot.
    pub const NAMES: [&'static str; Self::SLOTS] = ["failed", "nvme_error", "nomem", "aborted"];

    /// The slot of the SPDK status `e` is: an NVMe status passed through is
    /// `nvme_error`, aborted and out-of-descriptors IOs are theirs, every
    /// other failure is SPDK's generic `failed`.
    pub fn slot(e: IoError) -> usize {
        match e {
            IoError::Nvme { .. } => 1,
            IoError::NoMemory => 2,
            IoError::Aborted => 3,
            IoError::Media | IoError::NotSupported | IoError::OutOfRange | IoError::NoDevice => 0,
        }
    }
}

impl serde::Serialize for IoErrorCounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let seen = self.0.iter().filter(|&&n| n > 0).count();
        let mut m = s.serialize_map(Some(seen))?;
        for (name, &n) in Self::NAMES.iter().zip(&self.0) {
            if n > 0 {
                m.serialize_entry(name, &n)?;
            }
        }
        m.end()
    }
}

/// A bdev's channel on this reactor, as users see it: checks each IO,
/// accounts it, and hands it to the module's channel, through the QoS gate
/// while the bdev has rate limits.
pub struct Channel {
    handle: BdevHandle,
    inner: Rc<dyn BdevChannel>,
    stats: Rc<ChannelStats>,
    qos: Rc<QosGate>,
    block_size: u64,
}

impl Channel {
    pub(crate) fn new(handle: BdevHandle, inner: Rc<dyn BdevChannel>) -> Self {
        let p = handle.props();
        let block_size = p.block_size as u64;
        let controls = qos::controls(&handle);
        let stats = Rc::new(ChannelStats { block_size, ..ChannelStats::default() });
        if let Some(cfg) = *controls.histogram.lock().unwrap_or_else(|e| e.into_inner()) {
            *stats.histogram.borrow_mut() = Some(Histogram::new(cfg.shape(tsc::tick_rate()), cfg.io_type));
        }
        let qos = QosGate::new(controls.qos.clone(), inner.clone(), block_size);
        qos::register_channel(handle.id(), &stats, &qos);
        Channel { handle, inner, stats, qos, block_size }
    }

    pub fn handle(&self) -> &BdevHandle {
        &self.handle
    }

    pub fn stats(&self) -> &ChannelStats {
        &self.stats
    }

    /// Submits `io`; it completes through its completer, always later.
    pub fn submit(&self, mut io: IoBox) {
        if let Err(e) = self.check(&io) {
            io.fail(e);
            return;
        }
        add(&self.stats.in_flight, 1);
        io.stats = Some(self.stats.clone());
        io.submit_ticks = tsc::ticks();
        if self.qos.armed() {
            self.qos.submit(io);
        } else {
            self.inner.submit(io);
        }
    }

    /// See [`BdevChannel::abort`]; IOs waiting for their QoS budget too.
    pub fn abort(&self, matches: &dyn Fn(&BdevIo) -> bool) -> bool {
        self.qos.abort(matches) || self.inner.abort(matches)
    }

    /// IOs waiting in this channel for their QoS budget.
    pub fn qos_waiting(&self) -> usize {
        self.qos.waiting()
    }

    fn check(&self, io: &IoBox) -> Result<(), IoError> {
        if self.handle.is_removing() {
            return Err(IoError::NoDevice);
        }
        if !self.handle.bdev().io_type_supported(io.io_type) {
            return Err(IoError::NotSupported);
        }
        match io.io_type {
            IoType::Flush | IoType::Reset => Ok(()),
            t => {
                let end = io.offset_blocks.checked_add(io.num_blocks).ok_or(IoError::OutOfRange)?;
                // The current size (an atomic load): a resize moves the end.
                if end > self.handle.num_blocks() || io.num_blocks == 0 {
                    return Err(IoError::OutOfRange);
                }
                if t.has_data() {
                    let need = io.num_blocks * self.block_size;
                    if io.buf.as_ref().is_none_or(|b| (b.len() as u64) < need) {
                        return Err(IoError::OutOfRange);
                    }
                }
                Ok(())
            }
        }
    }
}
