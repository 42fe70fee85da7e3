//! File bdev over io_uring (`bdev_uring_create`, `bdev_aio_create`): a
//! regular file or block device, opened O_DIRECT where the file system allows
//! it; each reactor's channel owns its own ring and reaps it from a poller.
//!
//! Durability: a FUA write carries RWF_DSYNC (the kernel completes it only
//! once the data and the metadata needed to read it are stable: FUA or a
//! device flush below); a FUA write-zeroes is followed by fdatasync, since
//! fallocate takes no such flag; flush is fdatasync. fdatasync and not fsync:
//! nothing here changes the file size (writes stay inside it, fallocate
//! keeps it), and fdatasync still writes the block-allocation metadata a
//! later read needs, so what fsync adds (timestamps) guards no data.
//!
//! Buffers handed to the kernel stay pinned (invariant 5, docs/architecture.md): the IO that owns
//! the `DmaBuf` sits in the channel's in-flight table from the SQE push until
//! its CQE is reaped, and dropping a channel waits for every outstanding CQE
//! before anything in the table is released.

use crate::channel::{Bdev, BdevChannel, BdevProps};
use crate::io::{IoBox, IoError, IoStatus, IoType};
use crate::malloc::validate_geometry;
use crate::registry::{BdevHandle, Registry};
use crate::BdevError;
use io_uring::{opcode, squeue, types, IoUring};
use reactor::{PollStatus, PollerHandle};
use serde::Deserialize;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use uuid::Uuid;

/// Submission queue entries per channel; also the most IOs a channel keeps
/// in the kernel at once (so a re-pushed remainder always finds an SQE and
/// the completion queue, twice this size, never overflows).
pub const RING_ENTRIES: u32 = 256;
/// IOs a channel queues while its ring is full; beyond this, `NoMemory`.
pub const MAX_WAITING_IOS: usize = 4096;
/// Block size of a regular file when none is given.
pub const DEFAULT_FILE_BLOCK_SIZE: u32 = 4096;
/// CQEs reaped per batch (kept on the stack, so the hot path allocates nothing).
const REAP_BATCH: usize = 32;

/// `bdev_uring_create` parameters (SPDK names; unknown keys are ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct UringCreateParams {
    pub filename: String,
    pub name: String,
    #[serde(default)]
    pub block_size: Option<u32>,
    #[serde(default)]
    pub uuid: Option<Uuid>,
}

/// `bdev_aio_create` parameters (SPDK names; unknown keys are ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct AioCreateParams {
    pub name: String,
    pub filename: String,
    #[serde(default)]
    pub block_size: Option<u32>,
    #[serde(default)]
    pub readonly: bool,
    /// Serve unmap and write-zeroes with fallocate (SPDK's aio option).
    #[serde(default)]
    pub fallocate: bool,
    #[serde(default)]
    pub uuid: Option<Uuid>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    Uring,
    Aio { readonly: bool, fallocate: bool },
}

/// Creates a file bdev the way `bdev_uring_create` does and registers it.
pub fn create_uring(p: UringCreateParams) -> Result<BdevHandle, BdevError> {
    let bdev = FileBdev::open(&p.name, &p.filename, p.block_size, p.uuid, Flavor::Uring)?;
    Registry::get().register(Arc::new(bdev))
}

/// Creates a file bdev the way `bdev_aio_create` does and registers it.
pub fn create_aio(p: AioCreateParams) -> Result<BdevHandle, BdevError> {
    let flavor = Flavor::Aio { readonly: p.readonly, fallocate: p.fallocate };
    let bdev = FileBdev::open(&p.name, &p.filename, p.block_size, p.uuid, flavor)?;
    Registry::get().register(Arc::new(bdev))
}

/// A file or block device served through io_uring.
pub struct FileBdev {
    props: BdevProps,
    file: Arc<File>,
    filename: String,
    flavor: Flavor,
    block_size_override: bool,
    direct_io: bool,
    /// Set once the file system refused FALLOC_FL_ZERO_RANGE: write-zeroes
    /// then punches holes (which read back as zeroes) directly.
    zero_range_unsupported: Arc<AtomicBool>,
    sync_counters: Arc<SyncCounters>,
}

/// What the channels asked the kernel to make durable, counted when the SQE
/// is pushed (shown in `driver_specific`, so a test or a user can see FUA
/// and flush reach the kernel).
#[derive(Default, Debug)]
pub struct SyncCounters {
    /// Write SQEs pushed with RWF_DSYNC (FUA writes; a short write's
    /// remainder counts again).
    pub dsync_writes: AtomicU64,
    /// fdatasync SQEs pushed (flushes, and FUA write-zeroes).
    pub fdatasyncs: AtomicU64,
}

/// Whether a block device's queue reports a volatile write cache
/// (`/sys/dev/block/MAJ:MIN/queue/write_cache`: "write back" or "write
/// through"; a partition's queue is its disk's). None when it cannot say.
fn block_device_write_cache(rdev: u64) -> Option<bool> {
    let dev = format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev));
    let queue = if std::path::Path::new(&dev).join("partition").exists() { "../queue" } else { "queue" };
    let text = std::fs::read_to_string(format!("{dev}/{queue}/write_cache")).ok()?;
    match text.trim() {
        "write back" => Some(true),
        "write through" => Some(false),
        _ => None,
    }
}

fn os_error(what: &str, e: std::io::Error) -> BdevError {
    BdevError::Os(format!("{what}: {e}"), e.raw_os_error().unwrap_or(libc::EIO))
}

fn open_file(filename: &str, readonly: bool, direct: bool) -> std::io::Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(!readonly);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(filename)
}

/// The logical block size of a block device (BLKSSZGET).
fn logical_block_size(file: &File) -> Result<u32, BdevError> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a
    // live local; the fd is open for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size as *mut libc::c_int) };
    if rc != 0 {
        return Err(os_error("BLKSSZGET", std::io::Error::last_os_error()));
    }
    u32::try_from(size).map_err(|_| BdevError::Invalid(format!("device reports logical block size {size}")))
}

/// Offset alignment O_DIRECT needs on this file (statx DIOALIGN): None when
/// the kernel does not say, Some(0) when direct IO is not supported.
fn dio_offset_align(file: &File) -> Option<u32> {
    // SAFETY: `statx` is a C struct of integers; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let (fd, empty_path) = (file.as_raw_fd(), c"".as_ptr());
    // SAFETY: the path is a valid NUL-terminated empty string (AT_EMPTY_PATH
    // makes statx look at the fd itself) and `stx` is a live, writable struct.
    let rc = unsafe { libc::statx(fd, empty_path, libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some(stx.stx_dio_offset_align)
}

impl FileBdev {
    fn open(
        name: &str,
        filename: &str,
        block_size: Option<u32>,
        uuid: Option<Uuid>,
        flavor: Flavor,
    ) -> Result<FileBdev, BdevError> {
        if name.is_empty() {
            return Err(BdevError::Invalid("bdev name must not be empty".into()));
        }
        let readonly = matches!(flavor, Flavor::Aio { readonly: true, .. });
        let block_size = block_size.filter(|&b| b != 0);
        let what = format!("cannot open {filename}");
        // O_DIRECT first; a file system without it answers EINVAL.
        let (mut file, mut direct_io) = match open_file(filename, readonly, true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                (open_file(filename, readonly, false).map_err(|e| os_error(&what, e))?, false)
            }
            Err(e) => return Err(os_error(&what, e)),
        };
        let meta = file.metadata().map_err(|e| os_error(&what, e))?;
        let ft = meta.file_type();
        let (size_bytes, min_block_size) = if ft.is_block_device() {
            let lbs = logical_block_size(&file)?;
            let size = (&file).seek(SeekFrom::End(0)).map_err(|e| os_error(&what, e))?;
            (size, lbs)
        } else if ft.is_file() {
            (meta.len(), 0)
        } else {
            return Err(BdevError::Invalid(format!("{filename} is neither a regular file nor a block device")));
        };
        let bs = match block_size {
            Some(bs) => {
                if bs < min_block_size {
                    return Err(BdevError::Invalid(format!(
                        "block_size {bs} is smaller than {filename}'s logical block size {min_block_size}"
                    )));
                }
                bs
            }
            None if min_block_size > 0 => min_block_size,
            None => DEFAULT_FILE_BLOCK_SIZE,
        };
        let num_blocks = size_bytes / bs as u64;
        if num_blocks == 0 {
            return Err(BdevError::Invalid(format!(
                "{filename} is smaller than one block ({size_bytes} bytes < block_size {bs})"
            )));
        }
        let product_name = match flavor {
            Flavor::Uring => "URING bdev",
            Flavor::Aio { .. } => "AIO disk",
        };
        let mut props = BdevProps::new(name, product_name, bs, num_blocks, uuid);
        validate_geometry(&props)?;
        if direct_io {
            // Direct IO this block size cannot satisfy is no direct IO at all.
            let usable = match dio_offset_align(&file) {
                Some(0) => false,
                Some(align) => align <= bs,
                None => true,
            };
            if !usable {
                file = open_file(filename, readonly, false).map_err(|e| os_error(&what, e))?;
                direct_io = false;
            }
        }
        if !direct_io {
            tracing::warn!(name, filename, "file system does not support O_DIRECT here: using buffered IO");
        }
        // Buffered: the page cache is a volatile cache. O_DIRECT on a block
        // device: whatever its queue reports (a device that cannot say is
        // taken to cache). O_DIRECT on a regular file: the file system's
        // device may cache, and blocks allocated by a write are only
        // recorded durably by a sync, so there is a cache to flush.
        props.write_cache = match (direct_io, ft.is_block_device()) {
            (false, _) => true,
            (true, true) => block_device_write_cache(meta.rdev()).unwrap_or(true),
            (true, false) => true,
        };
        // Unmap is fallocate(PUNCH_HOLE | KEEP_SIZE): a regular file gets a
        // hole, which reads as zeroes; a block device gets a zero-out that
        // must not fall back (the kernel's blkdev_fallocate issues
        // blkdev_issue_zeroout(.., BLKDEV_ZERO_NOFALLBACK)), so the blocks
        // read as zeroes or the unmap fails. Without unmap, no promise.
        props.deallocated_reads_zeroes = match flavor {
            Flavor::Uring => true,
            Flavor::Aio { readonly, fallocate } => fallocate && !readonly,
        };
        // Fail here, with a clear message, rather than at first channel.
        new_ring(8)?;
        Ok(FileBdev {
            props,
            file: Arc::new(file),
            filename: filename.to_string(),
            flavor,
            block_size_override: block_size.is_some(),
            direct_io,
            zero_range_unsupported: Arc::new(AtomicBool::new(false)),
            sync_counters: Arc::default(),
        })
    }

    /// FUA writes and flushes handed to the kernel so far.
    pub fn sync_counters(&self) -> &SyncCounters {
        &self.sync_counters
    }

    /// True when the file is read and written with O_DIRECT.
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    fn readonly(&self) -> bool {
        matches!(self.flavor, Flavor::Aio { readonly: true, .. })
    }
}

fn new_ring(entries: u32) -> Result<IoUring, BdevError> {
    // SUBMIT_ALL: one bad SQE must not hold back the ones behind it.
    IoUring::builder()
        .setup_submit_all()
        .build(entries)
        .or_else(|_| IoUring::new(entries))
        .map_err(|e| os_error("io_uring_setup failed", e))
}

impl Bdev for FileBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }

    /// The open file's size now (`bdev_aio_rescan`, `bdev_uring_rescan`):
    /// the descriptor is measured, not the path, which may name another
    /// file by now.
    fn rescan_blocks(&self) -> Option<Result<u64, BdevError>> {
        let what = format!("cannot measure {}", self.filename);
        let size = match self.file.metadata() {
            Ok(m) if m.file_type().is_block_device() => (&*self.file).seek(SeekFrom::End(0)),
            Ok(m) => Ok(m.len()),
            Err(e) => Err(e),
        };
        Some(size.map(|b| b / u64::from(self.props.block_size)).map_err(|e| os_error(&what, e)))
    }

    fn module(&self) -> &'static str {
        match self.flavor {
            Flavor::Uring => "uring",
            Flavor::Aio { .. } => "aio",
        }
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        match t {
            IoType::Read | IoType::Flush => true,
            IoType::Write => !self.readonly(),
            IoType::Unmap | IoType::WriteZeroes => match self.flavor {
                Flavor::Uring => true,
                Flavor::Aio { readonly, fallocate } => !readonly && fallocate,
            },
            IoType::Reset => false,
        }
    }

    fn create_channel(&self) -> Result<Rc<dyn BdevChannel>, BdevError> {
        let ring = new_ring(RING_ENTRIES)?;
        let ch = Rc::new(UringChannel {
            state: RefCell::new(ChannelState {
                ring,
                slots: (0..RING_ENTRIES).map(|_| None).collect(),
                free: (0..RING_ENTRIES).rev().collect(),
                waiting: VecDeque::with_capacity(MAX_WAITING_IOS),
            }),
            fd: self.file.as_raw_fd(),
            _file: self.file.clone(),
            block_size: self.props.block_size as u64,
            zero_range_unsupported: self.zero_range_unsupported.clone(),
            sync_counters: self.sync_counters.clone(),
            poller: RefCell::new(None),
        });
        let weak = Rc::downgrade(&ch);
        let poller = reactor::register_poller("bdev_uring", move || match weak.upgrade() {
            Some(ch) => ch.poll(),
            None => PollStatus::Done,
        });
        *ch.poller.borrow_mut() = Some(poller);
        Ok(ch)
    }

    fn driver_specific(&self) -> Option<(&'static str, Value)> {
        let mut v = json!({
            "filename": self.filename,
            "block_size_override": self.block_size_override,
            "direct_io": self.direct_io,
            "dsync_writes": self.sync_counters.dsync_writes.load(Ordering::Relaxed),
            "fdatasyncs": self.sync_counters.fdatasyncs.load(Ordering::Relaxed),
        });
        if let Flavor::Aio { readonly, fallocate } = self.flavor {
            v["readonly"] = json!(readonly);
            v["fallocate"] = json!(fallocate);
        }
        Some((self.module(), v))
    }

    fn config(&self) -> Option<Value> {
        let p = &self.props;
        let mut v = match self.flavor {
            Flavor::Uring => json!({"method": "bdev_uring_create", "params": {
                "name": p.name, "filename": self.filename, "uuid": p.uuid.to_string()}}),
            Flavor::Aio { readonly, fallocate } => json!({"method": "bdev_aio_create", "params": {
                "name": p.name, "filename": self.filename,
                "readonly": readonly, "fallocate": fallocate, "uuid": p.uuid.to_string()}}),
        };
        // Only a block size the user chose: a detected one is detected again.
        if self.block_size_override {
            v["params"]["block_size"] = json!(p.block_size);
        }
        Some(v)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    /// fdatasync: a flush, or the second step of a FUA write-zeroes.
    Datasync,
    /// fallocate(PUNCH_HOLE | KEEP_SIZE): unmap, and write-zeroes' fallback.
    Punch,
    /// fallocate(ZERO_RANGE | KEEP_SIZE): write-zeroes.
    ZeroRange,
}

/// One IO in the kernel. Owning the `IoBox` owns its `DmaBuf`: the buffer
/// cannot return to its pool while the slot holds it.
struct Slot {
    io: IoBox,
    op: Op,
    /// Bytes already transferred (short reads/writes resume from here).
    done_bytes: u32,
    total_bytes: u32,
}

struct ChannelState {
    ring: IoUring,
    /// In-flight table, indexed by the SQE's user_data.
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// IOs that found every slot taken, in arrival order.
    waiting: VecDeque<IoBox>,
}

struct UringChannel {
    state: RefCell<ChannelState>,
    fd: RawFd,
    /// Keeps `fd` open for as long as this channel may have IO in the kernel.
    _file: Arc<File>,
    block_size: u64,
    zero_range_unsupported: Arc<AtomicBool>,
    sync_counters: Arc<SyncCounters>,
    poller: RefCell<Option<PollerHandle>>,
}

/// One step of an IO, as `sqe_for` turns it into an SQE.
#[derive(Clone, Copy, Debug)]
struct Step {
    op: Op,
    /// The IO carries FUA.
    fua: bool,
    /// Data address of what is left to transfer (read/write).
    addr: u64,
    remaining: u32,
    /// File offset of what is left to transfer (read/write).
    pos: u64,
    /// The IO's whole range (fallocate).
    offset_bytes: u64,
    len_bytes: u64,
}

/// The SQE of one step (its user_data is set by the caller).
fn sqe_for(fd: types::Fd, s: &Step) -> squeue::Entry {
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    match s.op {
        Op::Read => opcode::Read::new(fd, s.addr as *mut u8, s.remaining).offset(s.pos).build(),
        Op::Write => {
            // RWF_DSYNC per IO: only this write waits for stable storage.
            let rw_flags = if s.fua { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(fd, s.addr as *const u8, s.remaining).offset(s.pos).rw_flags(rw_flags).build()
        }
        Op::Datasync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
        Op::Punch => opcode::Fallocate::new(fd, s.len_bytes)
            .offset(s.offset_bytes)
            .mode(libc::FALLOC_FL_PUNCH_HOLE | keep)
            .build(),
        Op::ZeroRange => opcode::Fallocate::new(fd, s.len_bytes)
            .offset(s.offset_bytes)
            .mode(libc::FALLOC_FL_ZERO_RANGE | keep)
            .build(),
    }
}

fn errno_status(res: i32) -> IoStatus {
    if -res == libc::EOPNOTSUPP {
        IoStatus::Failed(IoError::NotSupported)
    } else {
        IoStatus::Failed(IoError::Media)
    }
}

impl UringChannel {
    /// Gives `io` a slot and pushes its SQE, or queues it when all slots are taken.
    fn start(&self, st: &mut ChannelState, io: IoBox) {
        let Some(idx) = st.free.pop() else {
            if st.waiting.len() >= MAX_WAITING_IOS {
                io.fail(IoError::NoMemory);
            } else {
                st.waiting.push_back(io);
            }
            return;
        };
        let op = match io.io_type {
            IoType::Read => Op::Read,
            IoType::Write => Op::Write,
            IoType::Flush => Op::Datasync,
            IoType::Unmap => Op::Punch,
            IoType::WriteZeroes if self.zero_range_unsupported.load(Ordering::Relaxed) => Op::Punch,
            IoType::WriteZeroes => Op::ZeroRange,
            IoType::Reset => {
                st.free.push(idx);
                io.fail(IoError::NotSupported);
                return;
            }
        };
        let total_bytes = match op {
            Op::Read | Op::Write => match u32::try_from(io.num_blocks * self.block_size) {
                Ok(n) => n,
                Err(_) => {
                    st.free.push(idx);
                    io.fail(IoError::OutOfRange);
                    return;
                }
            },
            _ => 0,
        };
        st.slots[idx as usize] = Some(Slot { io, op, done_bytes: 0, total_bytes });
        self.push_sqe(st, idx);
    }

    /// Pushes the SQE for slot `idx` (its remainder, after a short transfer).
    fn push_sqe(&self, st: &mut ChannelState, idx: u32) {
        let Some(slot) = st.slots[idx as usize].as_ref() else { return };
        let offset_bytes = slot.io.offset_blocks * self.block_size;
        let step = Step {
            op: slot.op,
            fua: slot.io.flags.fua(),
            addr: slot.io.buf.as_ref().map_or(0, |b| b.iova()) + slot.done_bytes as u64,
            remaining: slot.total_bytes - slot.done_bytes,
            pos: offset_bytes + slot.done_bytes as u64,
            offset_bytes,
            len_bytes: slot.io.num_blocks * self.block_size,
        };
        match step.op {
            Op::Write if step.fua => self.sync_counters.dsync_writes.fetch_add(1, Ordering::Relaxed),
            Op::Datasync => self.sync_counters.fdatasyncs.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        let entry = sqe_for(types::Fd(self.fd), &step).user_data(idx as u64);
        // SAFETY: the SQE names memory the kernel may use until the CQE:
        // (1) the data buffer `addr..addr+remaining` lies inside the DmaBuf of
        // `slot.io` (the Channel checked buf.len() >= num_blocks*block_size),
        // and that IoBox stays in `slots[idx]` until this entry's CQE is
        // reaped — in `poll`, or in `Drop`, which waits for every outstanding
        // CQE before releasing the table — so the buffer is neither freed nor
        // reused meanwhile; (2) `fd` stays open through `_file`, which this
        // channel owns and drops only after that wait.
        let pushed = unsafe { st.ring.submission().push(&entry) }.is_ok();
        if !pushed {
            // Cannot happen (in-flight slots <= SQ entries), but never leave an
            // IO in a slot the kernel does not know about.
            if let Some(slot) = st.slots[idx as usize].take() {
                st.free.push(idx);
                slot.io.fail(IoError::NoMemory);
            }
        }
    }

    /// Handles one CQE: resubmits a short transfer's remainder, falls back
    /// from ZERO_RANGE, or completes the IO.
    fn finish(&self, st: &mut ChannelState, idx: u32, res: i32) {
        let Some(slot) = st.slots.get_mut(idx as usize).and_then(|s| s.as_mut()) else {
            tracing::error!(idx, "io_uring completion for an empty slot");
            return;
        };
        let status = match slot.op {
            Op::Read | Op::Write => {
                if res < 0 {
                    errno_status(res)
                } else if res == 0 {
                    // End of file, or no progress: the file shrank under us.
                    IoStatus::Failed(IoError::Media)
                } else {
                    slot.done_bytes = slot.done_bytes.saturating_add(res as u32).min(slot.total_bytes);
                    if slot.done_bytes < slot.total_bytes {
                        self.push_sqe(st, idx);
                        return;
                    }
                    IoStatus::Success
                }
            }
            Op::ZeroRange if res == -libc::EOPNOTSUPP => {
                self.zero_range_unsupported.store(true, Ordering::Relaxed);
                slot.op = Op::Punch;
                self.push_sqe(st, idx);
                return;
            }
            Op::Punch | Op::ZeroRange if res >= 0 && slot.io.io_type == IoType::WriteZeroes && slot.io.flags.fua() => {
                // fallocate takes no DSYNC flag: sync before completing.
                slot.op = Op::Datasync;
                self.push_sqe(st, idx);
                return;
            }
            Op::Datasync | Op::Punch | Op::ZeroRange => {
                if res < 0 {
                    errno_status(res)
                } else {
                    IoStatus::Success
                }
            }
        };
        if let Some(slot) = st.slots[idx as usize].take() {
            st.free.push(idx);
            slot.io.complete(status);
        }
    }

    fn poll(&self) -> PollStatus {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        let mut busy = false;
        if !st.ring.submission().is_empty() {
            busy = true;
            if let Err(e) = st.ring.submit() {
                // EAGAIN/EBUSY: the kernel is short of resources; retry next loop.
                if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::EINTR)) {
                    tracing::warn!("io_uring submit failed: {e}");
                }
            }
        }
        loop {
            let mut batch = [(0u64, 0i32); REAP_BATCH];
            let mut n = 0;
            for cqe in st.ring.completion() {
                batch[n] = (cqe.user_data(), cqe.result());
                n += 1;
                if n == REAP_BATCH {
                    break;
                }
            }
            for &(user_data, res) in &batch[..n] {
                self.finish(st, user_data as u32, res);
            }
            busy |= n > 0;
            if n < REAP_BATCH {
                break;
            }
        }
        while !st.free.is_empty() {
            let Some(io) = st.waiting.pop_front() else { break };
            self.start(st, io);
            busy = true;
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }
}

impl BdevChannel for UringChannel {
    fn submit(&self, io: IoBox) {
        let mut st = self.state.borrow_mut();
        if !st.waiting.is_empty() {
            // Keep arrival order behind IOs already waiting for a slot.
            if st.waiting.len() >= MAX_WAITING_IOS {
                io.fail(IoError::NoMemory);
            } else {
                st.waiting.push_back(io);
            }
            return;
        }
        self.start(&mut st, io);
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        if let Some(p) = self.poller.borrow_mut().take() {
            p.unregister();
        }
        let st = self.state.get_mut();
        // Never submitted: nothing of theirs is in the kernel. Dropped, not
        // completed: whoever submitted them is being torn down too.
        st.waiting.clear();
        let mut outstanding = st.slots.iter().filter(|s| s.is_some()).count();
        while outstanding > 0 {
            // The kernel may still DMA into these buffers: wait for every CQE.
            match st.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    tracing::error!(
                        "io_uring wait failed during teardown ({e}); leaking {outstanding} in-flight buffers"
                    );
                    for slot in st.slots.iter_mut() {
                        if let Some(slot) = slot.take() {
                            // Leak rather than hand memory back that the
                            // kernel may still write.
                            std::mem::forget(slot);
                        }
                    }
                    return;
                }
            }
            let done: Vec<u64> = st.ring.completion().map(|c| c.user_data()).collect();
            for user_data in done {
                if let Some(slot) = st.slots.get_mut(user_data as usize).and_then(Option::take) {
                    outstanding -= 1;
                    drop(slot);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SQE as the kernel reads it (`struct io_uring_sqe`).
    fn sqe_bytes(e: &squeue::Entry) -> [u8; 64] {
        const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);
        // SAFETY: `squeue::Entry` is a `#[repr(C)]` wrapper of the kernel's
        // 64-byte `io_uring_sqe` (asserted above), which io-uring builds from
        // a zeroed value, so all 64 bytes are initialized; this copies them.
        unsafe { std::mem::transmute_copy::<squeue::Entry, [u8; 64]>(e) }
    }

    /// `rw_flags` / `fsync_flags`: the union at byte 28.
    fn op_flags(b: &[u8; 64]) -> u32 {
        u32::from_le_bytes([b[28], b[29], b[30], b[31]])
    }

    fn step(op: Op, fua: bool) -> Step {
        Step { op, fua, addr: 0x1000, remaining: 4096, pos: 8192, offset_bytes: 8192, len_bytes: 4096 }
    }

    #[test]
    fn fua_write_sqe_carries_rwf_dsync_and_a_plain_one_does_not() {
        let fd = types::Fd(7);
        let fua = sqe_bytes(&sqe_for(fd, &step(Op::Write, true)));
        assert_eq!(fua[0], opcode::Write::CODE);
        assert_eq!(op_flags(&fua), libc::RWF_DSYNC as u32);
        let plain = sqe_bytes(&sqe_for(fd, &step(Op::Write, false)));
        assert_eq!(plain[0], opcode::Write::CODE);
        assert_eq!(op_flags(&plain), 0);
        // Reads ignore FUA: nothing of theirs needs to become durable.
        assert_eq!(op_flags(&sqe_bytes(&sqe_for(fd, &step(Op::Read, true)))), 0);
    }

    #[test]
    fn flush_sqe_is_fdatasync() {
        let b = sqe_bytes(&sqe_for(types::Fd(7), &step(Op::Datasync, false)));
        assert_eq!(b[0], opcode::Fsync::CODE);
        assert_eq!(op_flags(&b), io_uring::types::FsyncFlags::DATASYNC.bits());
    }
}
