//! One job: a queue depth of IOs kept in flight on one bdev from one
//! reactor. Everything an IO needs (descriptor, buffers, histogram) is
//! allocated when the job starts; the completion callback records the
//! latency and resubmits the same descriptor, so the steady state allocates
//! nothing and takes no lock.

use crate::workload::Workload;
use hdrhistogram::Histogram;
use mgmt::bdev::rng::SimRng;
use mgmt::bdev::stamp::{self, Stamp, StampError};
use mgmt::bdev::{tsc, Channel, DmaBuf, IoBox, IoDone, IoError, IoStatus, IoType};
use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

/// Highest latency the histograms hold, in seconds (longer ones saturate).
pub const MAX_LATENCY_S: u64 = 600;
/// Significant digits of the latency histograms.
pub const HISTOGRAM_SIGFIG: u8 = 3;
/// Mismatches a verify job keeps in detail (all are counted).
pub const MISMATCHES_KEPT: usize = 100_000;

/// What one job runs.
#[derive(Clone, Debug)]
pub struct JobConfig {
    pub job_index: u32,
    pub bdev: String,
    /// Reactor index and CPU core, for the report.
    pub reactor: usize,
    pub core: usize,
    pub workload: Workload,
    pub read_pct: u32,
    pub queue_depth: u32,
    pub io_blocks: u64,
    pub block_size: u64,
    /// The part of the bdev this job touches.
    pub range_start_blocks: u64,
    pub range_blocks: u64,
    pub seed: u64,
    pub stamp: bool,
}

impl JobConfig {
    pub fn io_bytes(&self) -> u64 {
        self.io_blocks * self.block_size
    }

    /// IO-size units in the job's range.
    pub fn range_ios(&self) -> u64 {
        self.range_blocks / self.io_blocks.max(1)
    }
}

/// Counters a job publishes for the progress line (single writer: the job's
/// reactor; read by the main thread). Padded so that two jobs' counters do
/// not share a cache line.
#[derive(Default, Debug)]
#[repr(align(128))]
pub struct JobProgress {
    pub ios: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
}

/// One verify mismatch: which block, what was written, what came back.
#[derive(Clone, Debug)]
pub struct Mismatch {
    pub lba: u64,
    pub expected: Stamp,
    pub found: Result<Stamp, StampError>,
    /// Offset in the block of the first differing byte.
    pub first_bad_byte: usize,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LBA {}: first bad byte at {}; wrote seq {}", self.lba, self.first_bad_byte, self.expected.seq)?;
        match &self.found {
            Ok(s) => write!(f, ", read back stamp lba {} seq {} seed {:#x}", s.lba, s.seq, s.seed),
            Err(e) => write!(f, ", read back: {e}"),
        }
    }
}

/// What a finished job reports.
#[derive(Clone, Debug)]
pub struct JobResult {
    pub config: JobConfig,
    /// IOs completed (successfully or not) inside the timed window.
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
    pub first_error: Option<IoError>,
    /// The job's timed window.
    pub elapsed_ticks: u64,
    /// CPU time the job's reactor thread got during the job (all its jobs
    /// together), where the OS tells: on a shared machine, IOs per CPU
    /// second says what the stack would do on a core of its own.
    pub cpu_s: Option<f64>,
    /// Latencies in TSC ticks (see `bdev::tsc::tick_rate`).
    pub latency_ticks: Histogram<u64>,
    pub mismatch_count: u64,
    pub mismatches: Vec<Mismatch>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Write,
    ReadBack,
}

/// One queue slot: its buffers and, for verify, where it is in its
/// write-then-read cycle. Verify slots own disjoint sub-ranges so that no
/// two in-flight IOs of a run ever overlap.
struct Slot {
    buf: Option<DmaBuf>,
    read_buf: Option<DmaBuf>,
    phase: Cell<Phase>,
    offset_blocks: Cell<u64>,
    seq: Cell<u64>,
    sub_start_ios: u64,
    sub_len_ios: u64,
    cursor: Cell<u64>,
}

pub struct Job {
    me: Weak<Job>,
    cfg: JobConfig,
    channel: Rc<Channel>,
    slots: Vec<Slot>,
    rng: RefCell<SimRng>,
    range_ios: u64,
    next_io: Cell<u64>,
    next_seq: Cell<u64>,
    hist: RefCell<Histogram<u64>>,
    ios: Cell<u64>,
    bytes: Cell<u64>,
    errors: Cell<u64>,
    first_error: Cell<Option<IoError>>,
    progress: Arc<JobProgress>,
    stop: Arc<AtomicBool>,
    stopped: Cell<bool>,
    outstanding: Cell<u32>,
    start_ticks: Cell<u64>,
    end_ticks: Cell<u64>,
    start_cpu_s: Cell<Option<f64>>,
    mismatch_count: Cell<u64>,
    mismatches: RefCell<Vec<Mismatch>>,
    done: RefCell<Option<Sender<JobResult>>>,
}

/// CPU time of the calling thread in seconds (user + system, from
/// `/proc/thread-self/stat`; 10 ms resolution), None where unavailable.
/// Reads a file: call it at job start and end, never per IO.
pub fn thread_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // USER_HZ is 100 on every Linux ABI this runs on.
    Some((utime + stime) as f64 / 100.0)
}

/// A histogram for latencies in ticks, fixed in size (never resizes while
/// recording).
pub fn new_histogram() -> Histogram<u64> {
    let high = tsc::tick_rate().max(1_000_000).saturating_mul(MAX_LATENCY_S);
    Histogram::new_with_bounds(1, high, HISTOGRAM_SIGFIG).unwrap_or_else(|_| unreachable!("bounds are valid"))
}

impl Job {
    /// Builds the job on the current reactor: its channel, buffers and
    /// descriptors. Fails (allocating nothing that outlives it) when memory
    /// or descriptors are short.
    pub fn new(
        cfg: JobConfig,
        channel: Rc<Channel>,
        progress: Arc<JobProgress>,
        stop: Arc<AtomicBool>,
        done: Sender<JobResult>,
    ) -> Result<Rc<Job>, String> {
        let range_ios = cfg.range_ios();
        if range_ios == 0 {
            return Err(format!(
                "bdev {}: range of {} blocks holds no {}-byte IO",
                cfg.bdev,
                cfg.range_blocks,
                cfg.io_bytes()
            ));
        }
        let qd = cfg.queue_depth as u64;
        if cfg.workload == Workload::Verify && range_ios < qd {
            return Err(format!(
                "bdev {}: verify needs a range of at least queue depth x IO size per job ({} x {} bytes), this job has {} blocks",
                cfg.bdev,
                qd,
                cfg.io_bytes(),
                cfg.range_blocks
            ));
        }
        let io_bytes = usize::try_from(cfg.io_bytes()).map_err(|_| "IO size too large".to_string())?;
        let mut rng = SimRng::new(cfg.seed ^ (u64::from(cfg.job_index) << 32) ^ 0x005e_ed0f_10b5);
        let mut slots = Vec::with_capacity(cfg.queue_depth as usize);
        for i in 0..qd {
            let alloc =
                || DmaBuf::alloc(io_bytes).ok_or_else(|| format!("out of DMA memory for {io_bytes}-byte buffers"));
            let (buf, read_buf) = if !cfg.workload.has_data() {
                (None, None)
            } else if cfg.workload == Workload::Verify {
                let w = alloc()?;
                // Random bytes after each stamp, so a read-back that returns
                // the wrong block or stale data is caught anywhere in it.
                w.with_mut(|b| {
                    for chunk in b.chunks_mut(8) {
                        let x = rng.next_u64().to_le_bytes();
                        chunk.copy_from_slice(&x[..chunk.len()]);
                    }
                });
                (Some(w), Some(alloc()?))
            } else {
                let b = alloc()?;
                b.fill(0);
                (Some(b), None)
            };
            let (sub_start_ios, sub_len_ios) = (range_ios * i / qd, range_ios * (i + 1) / qd - range_ios * i / qd);
            slots.push(Slot {
                buf,
                read_buf,
                phase: Cell::new(Phase::Write),
                offset_blocks: Cell::new(0),
                seq: Cell::new(0),
                sub_start_ios,
                sub_len_ios,
                cursor: Cell::new(0),
            });
        }
        let job = Rc::new_cyclic(|me| Job {
            me: me.clone(),
            rng: RefCell::new(rng),
            range_ios,
            next_io: Cell::new(0),
            next_seq: Cell::new(0),
            hist: RefCell::new(new_histogram()),
            ios: Cell::new(0),
            bytes: Cell::new(0),
            errors: Cell::new(0),
            first_error: Cell::new(None),
            progress,
            stop,
            stopped: Cell::new(false),
            outstanding: Cell::new(0),
            start_ticks: Cell::new(0),
            start_cpu_s: Cell::new(None),
            end_ticks: Cell::new(0),
            mismatch_count: Cell::new(0),
            mismatches: RefCell::new(Vec::new()),
            done: RefCell::new(Some(done)),
            cfg,
            channel,
            slots,
        });
        Ok(job)
    }

    /// Fills the queue. Needs `queue_depth` free descriptors on this reactor.
    pub fn start(self: &Rc<Self>) -> Result<(), String> {
        let qd = self.cfg.queue_depth as usize;
        if IoBox::available() < qd {
            return Err(format!(
                "reactor {}: {} IO descriptors free, job on {} needs {qd} (lower -q or use fewer bdevs per core)",
                self.cfg.reactor,
                IoBox::available(),
                self.cfg.bdev
            ));
        }
        let mut ios = Vec::with_capacity(qd);
        for _ in 0..qd {
            ios.push(IoBox::alloc().ok_or_else(|| "out of IO descriptors".to_string())?);
        }
        self.start_cpu_s.set(thread_cpu_s());
        let now = tsc::ticks();
        self.start_ticks.set(now);
        self.outstanding.set(qd as u32);
        for (i, mut io) in ios.into_iter().enumerate() {
            io.tag = i as u64;
            self.prepare(i, &mut io);
            io.set_done(self.clone());
            self.channel.submit(io);
        }
        Ok(())
    }

    fn next_offset_blocks(&self, random: bool) -> u64 {
        let unit = if random {
            self.rng.borrow_mut().below(self.range_ios)
        } else {
            let n = self.next_io.get();
            self.next_io.set(if n + 1 >= self.range_ios { 0 } else { n + 1 });
            n
        };
        self.cfg.range_start_blocks + unit * self.cfg.io_blocks
    }

    fn take_seq(&self) -> u64 {
        let s = self.next_seq.get();
        self.next_seq.set(s + 1);
        // Unique over the run: job index in the top bits.
        (u64::from(self.cfg.job_index) << 44) | s
    }

    /// Sets up `io` for slot `i`'s next IO.
    #[inline]
    fn prepare(&self, i: usize, io: &mut IoBox) {
        let slot = &self.slots[i];
        let cfg = &self.cfg;
        io.status = IoStatus::Pending;
        io.num_blocks = cfg.io_blocks;
        let (io_type, offset) = match cfg.workload {
            Workload::Read | Workload::RandRead => (IoType::Read, self.next_offset_blocks(cfg.workload.is_random())),
            Workload::Write | Workload::RandWrite => (IoType::Write, self.next_offset_blocks(cfg.workload.is_random())),
            Workload::Rw | Workload::RandRw => {
                let read = self.rng.borrow_mut().below(100) < u64::from(cfg.read_pct);
                let t = if read { IoType::Read } else { IoType::Write };
                (t, self.next_offset_blocks(cfg.workload.is_random()))
            }
            Workload::Verify => match slot.phase.get() {
                Phase::Write => {
                    let c = slot.cursor.get();
                    slot.cursor.set(if c + 1 >= slot.sub_len_ios { 0 } else { c + 1 });
                    let off = cfg.range_start_blocks + (slot.sub_start_ios + c) * cfg.io_blocks;
                    slot.offset_blocks.set(off);
                    (IoType::Write, off)
                }
                Phase::ReadBack => (IoType::Read, slot.offset_blocks.get()),
            },
            Workload::Unmap => (IoType::Unmap, self.next_offset_blocks(false)),
            Workload::WriteZeroes => (IoType::WriteZeroes, self.next_offset_blocks(false)),
            Workload::Flush => (IoType::Flush, self.next_offset_blocks(false)),
        };
        io.io_type = io_type;
        io.offset_blocks = offset;
        let verify = cfg.workload == Workload::Verify;
        match io_type {
            IoType::Read if verify => io.buf = slot.read_buf.clone(),
            // A verify slot alternates buffers; the others keep theirs.
            IoType::Read | IoType::Write if verify || io.buf.is_none() => io.buf = slot.buf.clone(),
            IoType::Read | IoType::Write => {}
            _ => io.buf = None,
        }
        if io_type == IoType::Write && (cfg.stamp || verify) {
            let seq = self.take_seq();
            slot.seq.set(seq);
            if let Some(b) = &slot.buf {
                let bs = cfg.block_size as usize;
                b.with_mut(|bytes| stamp::stamp_buffer(bytes, bs, offset, seq, cfg.seed));
            }
        }
    }

    /// Compares slot `i`'s read-back with what it wrote; records mismatches.
    fn check_read_back(&self, i: usize) {
        let slot = &self.slots[i];
        let (Some(w), Some(r)) = (&slot.buf, &slot.read_buf) else {
            return;
        };
        let same = w.with(|wb| r.with(|rb| wb == rb));
        if same {
            return;
        }
        let bs = self.cfg.block_size as usize;
        let first_lba = slot.offset_blocks.get();
        let seq = slot.seq.get();
        w.with(|wb| {
            r.with(|rb| {
                for (k, (wblk, rblk)) in wb.chunks(bs).zip(rb.chunks(bs)).enumerate() {
                    let Some(first_bad_byte) = wblk.iter().zip(rblk).position(|(a, b)| a != b) else {
                        continue;
                    };
                    self.mismatch_count.set(self.mismatch_count.get() + 1);
                    let mut kept = self.mismatches.borrow_mut();
                    if kept.len() < MISMATCHES_KEPT {
                        let lba = first_lba + k as u64;
                        kept.push(Mismatch {
                            lba,
                            expected: Stamp { lba, seq, seed: self.cfg.seed },
                            found: stamp::check_block_seq(rblk, lba, seq, self.cfg.seed),
                            first_bad_byte,
                        });
                    }
                }
            })
        });
    }

    fn finish(&self) {
        let end = if self.end_ticks.get() == 0 { tsc::ticks() } else { self.end_ticks.get() };
        let hist = std::mem::replace(&mut *self.hist.borrow_mut(), new_histogram());
        let result = JobResult {
            config: self.cfg.clone(),
            ios: self.ios.get(),
            bytes: self.bytes.get(),
            errors: self.errors.get(),
            first_error: self.first_error.get(),
            elapsed_ticks: end.wrapping_sub(self.start_ticks.get()),
            cpu_s: self.start_cpu_s.get().zip(thread_cpu_s()).map(|(a, b)| b - a),
            latency_ticks: hist,
            mismatch_count: self.mismatch_count.get(),
            mismatches: std::mem::take(&mut *self.mismatches.borrow_mut()),
        };
        if let Some(tx) = self.done.borrow_mut().take() {
            let _ = tx.send(result);
        }
    }
}

impl IoDone for Job {
    fn io_done(&self, mut io: IoBox) {
        let i = io.tag as usize;
        if !self.stopped.get() && self.stop.load(Ordering::Relaxed) {
            self.stopped.set(true);
            self.end_ticks.set(tsc::ticks());
        }
        let ok = io.status == IoStatus::Success;
        if !self.stopped.get() {
            self.hist.borrow_mut().saturating_record(io.latency_ticks());
            let ios = self.ios.get() + 1;
            let bytes = self.bytes.get() + self.cfg.io_bytes();
            self.ios.set(ios);
            self.bytes.set(bytes);
            // Single writer: plain stores, read by the progress line.
            self.progress.ios.store(ios, Ordering::Relaxed);
            self.progress.bytes.store(bytes, Ordering::Relaxed);
        }
        if !ok {
            self.errors.set(self.errors.get() + 1);
            self.progress.errors.store(self.errors.get(), Ordering::Relaxed);
            if self.first_error.get().is_none() {
                if let IoStatus::Failed(e) = io.status {
                    self.first_error.set(Some(e));
                }
            }
        }
        if self.cfg.workload == Workload::Verify {
            let slot = &self.slots[i];
            match slot.phase.get() {
                Phase::Write if ok => slot.phase.set(Phase::ReadBack),
                Phase::Write => {}
                Phase::ReadBack => {
                    if ok {
                        self.check_read_back(i);
                    }
                    slot.phase.set(Phase::Write);
                }
            }
        }
        if self.stopped.get() {
            drop(io);
            let left = self.outstanding.get() - 1;
            self.outstanding.set(left);
            if left == 0 {
                self.finish();
            }
            return;
        }
        self.prepare(i, &mut io);
        match self.me.upgrade() {
            Some(me) => io.set_done(me),
            None => unreachable!("a job's completion runs while the job is alive"),
        }
        self.channel.submit(io);
    }
}
