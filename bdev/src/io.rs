//! IO descriptors: pooled per reactor, moved down the stack on submit and
//! back up on completion. Completions are always delivered from the reactor's
//! completion poller, never inside `submit`, so no layer is re-entered while
//! it is still submitting.

use crate::channel::ChannelStats;
use crate::dma::DmaBuf;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoType {
    Read,
    Write,
    Flush,
    Unmap,
    WriteZeroes,
    Reset,
}

impl IoType {
    pub const ALL: [IoType; 6] =
        [IoType::Read, IoType::Write, IoType::Flush, IoType::Unmap, IoType::WriteZeroes, IoType::Reset];

    /// SPDK's name in `supported_io_types` and RPC parameters.
    pub fn name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Flush => "flush",
            IoType::Unmap => "unmap",
            IoType::WriteZeroes => "write_zeroes",
            IoType::Reset => "reset",
        }
    }

    pub fn from_name(s: &str) -> Option<IoType> {
        Self::ALL.into_iter().find(|t| t.name() == s)
    }

    /// Changes media contents (the RAID layer serializes these).
    pub fn is_write_like(self) -> bool {
        matches!(self, IoType::Write | IoType::WriteZeroes | IoType::Unmap)
    }

    /// Carries a data buffer.
    pub fn has_data(self) -> bool {
        matches!(self, IoType::Read | IoType::Write)
    }
}

/// Per-IO modifiers that travel with the IO through every layer (SPDK keeps
/// the same bits in its bdev_io; NVMe carries them in CDW12, SCSI in the CDB).
/// A layer that splits or forwards an IO copies them onto every child.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IoFlags(u8);

impl IoFlags {
    pub const NONE: IoFlags = IoFlags(0);
    /// Force Unit Access: the write is durable (on non-volatile media) when it
    /// completes, whatever the write cache holds.
    pub const FUA: IoFlags = IoFlags(1 << 0);
    /// Disable Page Out: a hint that the data will not be read again soon.
    pub const DPO: IoFlags = IoFlags(1 << 1);

    pub const fn contains(self, other: IoFlags) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn insert(&mut self, other: IoFlags) {
        self.0 |= other.0;
    }

    pub fn remove(&mut self, other: IoFlags) {
        self.0 &= !other.0;
    }

    pub const fn union(self, other: IoFlags) -> IoFlags {
        IoFlags(self.0 | other.0)
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn fua(self) -> bool {
        self.contains(IoFlags::FUA)
    }
}

impl std::ops::BitOr for IoFlags {
    type Output = IoFlags;
    fn bitor(self, rhs: IoFlags) -> IoFlags {
        self.union(rhs)
    }
}

/// Why an IO failed. Small and matchable; transports map it to their codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoError {
    /// The medium failed (unrecovered read, write fault).
    Media,
    /// Out of descriptors or buffers: retry later.
    NoMemory,
    /// The bdev does not do this IO type.
    NotSupported,
    /// Beyond the end of the bdev, or the buffer is too small.
    OutOfRange,
    Aborted,
    /// The bdev is gone or going.
    NoDevice,
    /// Status passed through from an NVMe device.
    Nvme {
        sct: u8,
        sc: u8,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoStatus {
    Pending,
    Success,
    Failed(IoError),
}

impl IoStatus {
    pub fn is_ok(self) -> bool {
        self == IoStatus::Success
    }
}

/// Receives completed IOs. Implemented by whoever submits: a RAID channel, a
/// transport queue pair, a benchmark job.
pub trait IoDone {
    fn io_done(&self, io: IoBox);
}

impl<F: Fn(IoBox)> IoDone for F {
    fn io_done(&self, io: IoBox) {
        self(io)
    }
}

/// One IO. Fields are public for the layers that build and serve IOs.
pub struct BdevIo {
    pub io_type: IoType,
    pub offset_blocks: u64,
    pub num_blocks: u64,
    /// FUA, DPO: honoured by every layer (see [`IoFlags`]).
    pub flags: IoFlags,
    /// Data for reads (filled by the bdev) and writes (read by it).
    pub buf: Option<DmaBuf>,
    pub status: IoStatus,
    /// Two words for the submitter's bookkeeping (a slot index, a sequence).
    pub tag: u64,
    pub tag2: u64,
    done: Option<Rc<dyn IoDone>>,
    pub(crate) stats: Option<Rc<ChannelStats>>,
    pub(crate) submit_ticks: u64,
    pub(crate) latency_ticks: u64,
}

impl BdevIo {
    /// Ticks from `Channel::submit` to the completion poller picking the IO
    /// up (0 for an IO not submitted through a `Channel`, or not done yet).
    pub fn latency_ticks(&self) -> u64 {
        self.latency_ticks
    }

    fn blank() -> Self {
        BdevIo {
            io_type: IoType::Read,
            offset_blocks: 0,
            num_blocks: 0,
            flags: IoFlags::NONE,
            buf: None,
            status: IoStatus::Pending,
            tag: 0,
            tag2: 0,
            done: None,
            stats: None,
            submit_ticks: 0,
            latency_ticks: 0,
        }
    }
}

/// Descriptors per reactor, created when the reactor first does IO, unless
/// `set_pool_size` chose another number before.
pub const DEFAULT_IO_POOL_SIZE: usize = 16_384;

static POOL_SIZE: AtomicUsize = AtomicUsize::new(DEFAULT_IO_POOL_SIZE);
/// Set once the first reactor built its pool: the size is fixed from then on.
static POOL_BUILT: AtomicBool = AtomicBool::new(false);

/// Descriptors each reactor's pool holds (`bdev_set_options`'s
/// `bdev_io_pool_size`, divided among the reactors).
pub fn pool_size() -> usize {
    POOL_SIZE.load(Ordering::Acquire)
}

/// Sets the descriptors per reactor pool. Only before any reactor did IO,
/// as SPDK allows `bdev_set_options` only before its subsystems start: a
/// pool is built once and never grows or shrinks under IO.
pub fn set_pool_size(per_reactor: usize) -> Result<(), &'static str> {
    if per_reactor == 0 {
        return Err("the IO descriptor pool cannot be empty");
    }
    if POOL_BUILT.load(Ordering::Acquire) {
        return Err("IO descriptor pools already exist; set options before any IO");
    }
    POOL_SIZE.store(per_reactor, Ordering::Release);
    Ok(())
}

/// The reactor's IO pool and completion queue.
pub(crate) struct IoLocal {
    // Boxed: an `IoBox` owns its descriptor by pointer, so moving one down
    // the stack and back never copies the descriptor itself.
    #[allow(clippy::vec_box)]
    pool: RefCell<Vec<Box<BdevIo>>>,
    completions: RefCell<VecDeque<IoBox>>,
    created: std::cell::Cell<usize>,
}

impl Default for IoLocal {
    fn default() -> Self {
        POOL_BUILT.store(true, Ordering::Release);
        let size = pool_size();
        let pool: Vec<Box<BdevIo>> = (0..size).map(|_| Box::new(BdevIo::blank())).collect();
        let local = IoLocal {
            pool: RefCell::new(pool),
            completions: RefCell::new(VecDeque::with_capacity(size)),
            created: std::cell::Cell::new(size),
        };
        if reactor::current().is_some() {
            // Only this reactor queues completions: in interrupt mode they
            // need no wake-up of their own.
            reactor::register_local_work_poller("bdev_completions", || {
                if drain_completions() > 0 {
                    reactor::PollStatus::Busy
                } else {
                    reactor::PollStatus::Idle
                }
            });
        }
        local
    }
}

thread_local! {
    static LOCAL: RefCell<(u64, Option<Rc<IoLocal>>)> = const { RefCell::new((u64::MAX, None)) };
}

/// The current reactor's IO state (a thread-local fast path keyed by reactor).
pub(crate) fn io_local() -> Rc<IoLocal> {
    let uid = reactor::current_uid();
    LOCAL.with(|l| {
        if let (u, Some(local)) = &*l.borrow() {
            if *u == uid {
                return local.clone();
            }
        }
        let local = if uid == 0 { Rc::new(IoLocal::default()) } else { reactor::local::<IoLocal>() };
        // The previous reactor's state may be the last reference to a pool
        // whose queued IoBoxes return to... this thread-local: drop it only
        // after the borrow ends.
        let stale = std::mem::replace(&mut *l.borrow_mut(), (uid, Some(local.clone())));
        drop(stale);
        local
    })
}

/// Runs `f` on the current reactor's IO state without taking a reference
/// on it: the per-IO calls (a descriptor taken, completed, returned) pay a
/// borrow flag, not a reference count. None once the thread-local is gone
/// (a thread exiting). The cached state stays borrowed while `f` runs: `f`
/// must not switch the thread to another reactor's state.
#[inline]
fn try_with_io_local<R>(f: impl FnOnce(&IoLocal) -> R) -> Option<R> {
    let uid = reactor::current_uid();
    LOCAL
        .try_with(|l| {
            if let Ok(cached) = l.try_borrow() {
                if let (u, Some(local)) = &*cached {
                    if *u == uid {
                        return f(local);
                    }
                }
            }
            f(&io_local())
        })
        .ok()
}

/// Runs the callbacks of the IOs completed so far on this reactor (those
/// completed by the callbacks themselves wait for the next call). Returns how
/// many ran. The reactor's poller calls this; tests without reactors may too.
pub fn drain_completions() -> usize {
    let local = io_local();
    let n = local.completions.borrow().len();
    // One timestamp per batch: every IO in it completed before this point.
    let now = if n > 0 { crate::tsc::ticks() } else { 0 };
    for _ in 0..n {
        let Some(mut io) = local.completions.borrow_mut().pop_front() else { break };
        if let Some(stats) = io.stats.take() {
            stats.account(&mut io, now);
        }
        match io.done.take() {
            Some(done) => done.io_done(io),
            None => drop(io),
        }
    }
    n
}

/// An owned, pooled IO descriptor. Dropping it returns it to the pool.
pub struct IoBox(Option<Box<BdevIo>>);

impl IoBox {
    /// A descriptor from the current reactor's pool, or `None` when the pool
    /// is empty (the caller reports `NoMemory` or retries; never allocates).
    pub fn alloc() -> Option<IoBox> {
        let io = try_with_io_local(|l| l.pool.borrow_mut().pop())??;
        Some(IoBox(Some(io)))
    }

    /// Builds a data IO.
    pub fn data(io_type: IoType, offset_blocks: u64, num_blocks: u64, buf: Option<DmaBuf>) -> Option<IoBox> {
        let mut io = Self::alloc()?;
        io.io_type = io_type;
        io.offset_blocks = offset_blocks;
        io.num_blocks = num_blocks;
        io.flags = IoFlags::NONE;
        io.buf = buf;
        Some(io)
    }

    /// Who hears of the completion. Without one the IO is simply released.
    pub fn set_done(&mut self, done: Rc<dyn IoDone>) {
        self.inner_mut().done = Some(done);
    }

    fn inner_mut(&mut self) -> &mut BdevIo {
        self.0.as_mut().unwrap_or_else(|| unreachable!("present until drop"))
    }

    /// Finishes the IO: its completer runs from the completion poller.
    pub fn complete(mut self, status: IoStatus) {
        self.inner_mut().status = status;
        // (On a thread exiting, whose queue is gone, the IO is dropped.)
        try_with_io_local(move |l| l.completions.borrow_mut().push_back(self));
    }

    pub fn fail(self, e: IoError) {
        self.complete(IoStatus::Failed(e));
    }

    /// Descriptors available on this reactor right now.
    pub fn available() -> usize {
        try_with_io_local(|l| l.pool.borrow().len()).unwrap_or(0)
    }

    /// Descriptors this reactor owns in all (free or in use).
    pub fn capacity() -> usize {
        io_local().created.get()
    }
}

impl std::ops::Deref for IoBox {
    type Target = BdevIo;
    fn deref(&self) -> &BdevIo {
        self.0.as_ref().unwrap_or_else(|| unreachable!("present until drop"))
    }
}

impl std::ops::DerefMut for IoBox {
    fn deref_mut(&mut self) -> &mut BdevIo {
        self.inner_mut()
    }
}

impl Drop for IoBox {
    fn drop(&mut self) {
        let Some(mut io) = self.0.take() else { return };
        // Release what the descriptor holds so buffers return to their pool
        // and completers are not kept alive by idle descriptors.
        io.buf = None;
        io.done = None;
        io.stats = None;
        io.status = IoStatus::Pending;
        io.flags = IoFlags::NONE;
        io.tag = 0;
        io.tag2 = 0;
        io.latency_ticks = 0;
        // A reactor thread exiting with IOs still queued drops them from its
        // thread-local's destructor: the pool is gone then, so is the memory.
        try_with_io_local(|l| l.pool.borrow_mut().push(io));
    }
}

/// A fixed-capacity table of IOs parked while their children run: a layer
/// that splits or forwards an IO keeps the parent here and puts the slot index
/// in each child's tag. Grows only past its high-water mark.
pub struct IoSlab {
    slots: Vec<Option<IoBox>>,
    free: Vec<u32>,
}

impl IoSlab {
    pub fn with_capacity(n: usize) -> Self {
        IoSlab { slots: (0..n).map(|_| None).collect(), free: (0..n as u32).rev().collect() }
    }

    pub fn insert(&mut self, io: IoBox) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(io);
                i
            }
            None => {
                self.slots.push(Some(io));
                (self.slots.len() - 1) as u32
            }
        }
    }

    pub fn get_mut(&mut self, i: u32) -> Option<&mut IoBox> {
        self.slots.get_mut(i as usize)?.as_mut()
    }

    pub fn get(&self, i: u32) -> Option<&IoBox> {
        self.slots.get(i as usize)?.as_ref()
    }

    pub fn take(&mut self, i: u32) -> Option<IoBox> {
        let io = self.slots.get_mut(i as usize)?.take()?;
        self.free.push(i);
        Some(io)
    }

    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes every parked IO (teardown).
    pub fn drain(&mut self) -> Vec<IoBox> {
        let mut out = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Some(io) = s.take() {
                self.free.push(i as u32);
                out.push(io);
            }
        }
        out
    }
}
