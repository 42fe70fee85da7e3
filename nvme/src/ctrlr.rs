//! One NVMe controller: bring-up per the base spec (disable, admin queue
//! registers, enable, ready within CAP.TO), the admin queue, identify data
//! and namespaces, controller reset with IO retried, and orderly shutdown
//! (CC.SHN).
//!
//! Nothing here blocks a reactor. The controller's home reactor owns the
//! admin queue: every admin command is submitted there with a completion
//! callback and reaped by the home's admin poller; register transitions
//! (ready, disabled, shutdown complete) are awaited by one-shot pollers with
//! a deadline on the reactor clock; attach, reset and detach are chains of
//! such steps. The admin queue lives in the home reactor's own state
//! (`HomeState`); other reactors reach it only by message (their IO queue
//! pair's creation, aborts). The few control-plane mutexes here (queue ids,
//! namespaces) are taken on the home reactor; a contended one is counted as
//! a blocking wait.
//!
//! The home's admin poller also keeps Asynchronous Event Requests
//! outstanding (namespace changes, SMART critical warnings) and reads CSTS
//! every `HEALTH_CHECK_NS`: all ones is a surprise removal, after which no
//! access reaches the device (`mmio::Gated`).
//!
//! Memory the controller DMAs into is never released while it may still
//! write it (invariant 5, docs/architecture.md): the admin queue memory is freed only after the
//! controller is disabled or shut down, a data buffer of an admin command
//! that timed out is leaked on purpose, and a reset disables the controller
//! before any in-flight IO is retried or completed.

use crate::mmio::{note_blocking_wait, DeviceMem, Gated, RegisterSpace};
use crate::prp;
use crate::qpair;
use crate::NvmeError;
use bdev::DmaBuf;
use nvme_spec::features::{
    async_event_config, async_event_notice, async_event_type, select, AsyncEvent, FeatureId, FeatureParams,
    NumberOfQueues, VWC_ENABLE,
};
use nvme_spec::identify::{
    Cns, IdentifyController, IdentifyNamespace, IdentifyParams, NamespaceList, IDENTIFY_DATA_LEN,
};
use nvme_spec::log::{GetLogPageParams, LogPageId, SmartLog, CHANGED_NS_LIST_OVERFLOW};
use nvme_spec::regs::{cap_css, doorbell_offset, offset, shutdown, Aqa, Cap, Cc, Csts, Vs};
use nvme_spec::{AdminOpcode, Cqe, Sqe, Status, U16, U32, U64};
use reactor::{PollStatus, PollerHandle, ReactorId};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock};
use zerocopy::FromBytes;

/// Admin queue entries (SQ and CQ).
pub const ADMIN_QUEUE_DEPTH: u16 = 32;
/// PRP list pages per IO command slot: two chained pages, so one command
/// moves up to 4 MiB with 4 KiB pages at any buffer alignment.
pub const PRP_LIST_PAGES: usize = 2;
/// Aborts outstanding at once (ACL is at least 1; we use at most this).
const MAX_ASYNC_ABORTS: usize = 4;
/// How often the admin poller reads CSTS to notice a removed device (all
/// ones) or a fatal controller status.
const HEALTH_CHECK_NS: u64 = 10_000_000;
/// Asynchronous Event Requests kept outstanding (at most AERL + 1).
const MAX_AERS: usize = 4;
/// Admin commands outstanding at once: one SQ slot stays empty.
const ADMIN_SLOTS: usize = ADMIN_QUEUE_DEPTH as usize - 1;

/// Tunables of one controller (SPDK's `bdev_nvme_set_options` subset).
#[derive(Clone, Debug)]
pub struct CtrlrOpts {
    /// Entries per IO queue (clamped to CAP.MQES + 1 and 2..=1024).
    pub io_queue_depth: u16,
    /// An IO older than this is aborted; after twice this, the controller is
    /// reset. 0 disables IO timeouts.
    pub io_timeout_us: u64,
    /// Deadline of each admin command (past it the command's buffer is
    /// leaked and the controller reset); Asynchronous Event Requests have none.
    pub admin_timeout_ms: u64,
    /// Describe data with SGLs whenever the controller supports them
    /// (Identify Controller SGLS bits 1:0 = 01b or 10b); PRPs otherwise, or
    /// always when false.
    pub prefer_sgl: bool,
    /// IO queues to ask for (0: one per reactor).
    pub io_queues: u16,
    /// How often one IO is retried after aborts or resets before it fails.
    pub retry_count: u8,
}

impl Default for CtrlrOpts {
    fn default() -> Self {
        CtrlrOpts {
            io_queue_depth: 256,
            io_timeout_us: 10_000_000,
            admin_timeout_ms: 5_000,
            prefer_sgl: true,
            io_queues: 0,
            retry_count: 4,
        }
    }
}

/// How the controller is reached (SPDK's transport ID).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportId {
    pub trtype: String,
    pub traddr: String,
}

/// What Identify Controller told us, decoded.
#[derive(Clone, Debug, Default)]
pub struct ControllerData {
    pub vid: u16,
    pub ssvid: u16,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub cntlid: u16,
    pub mdts: u8,
    pub oncs: u16,
    /// A volatile write cache is present (Identify VWC bit 0).
    pub vwc: bool,
    /// The cache is enabled right now (Get Features, Volatile Write Cache,
    /// current value); false when none is present.
    pub write_cache_enabled: bool,
    pub sgls: u32,
    pub nn: u32,
    pub acl: u8,
    /// Asynchronous Event Requests the controller holds at once, 0's based.
    pub aerl: u8,
    /// Optional asynchronous events supported (OAES).
    pub oaes: u32,
    /// Atomic Write Unit Power Fail, in blocks, 0's based.
    pub awupf: u16,
    pub subnqn: String,
}

/// One active namespace.
#[derive(Clone, Debug)]
pub struct Namespace {
    pub nsid: u32,
    pub block_size: u32,
    pub num_blocks: u64,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    /// Largest read/write in one command, in blocks (MDTS, PRP list room, NLB).
    pub max_io_blocks: u32,
    /// A read of a deallocated block returns zeroes (DLFEAT bits 2:0 = 001b).
    pub deallocated_reads_zeroes: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CtrlrState {
    Enabled = 0,
    Resetting = 1,
    /// Could not be brought back; IO fails.
    Failed = 2,
    /// Shut down and released.
    Detached = 3,
}

impl CtrlrState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => CtrlrState::Enabled,
            1 => CtrlrState::Resetting,
            2 => CtrlrState::Failed,
            _ => CtrlrState::Detached,
        }
    }
    /// SPDK's `state` string in `bdev_nvme_get_controllers`.
    pub fn name(self) -> &'static str {
        match self {
            CtrlrState::Enabled => "enabled",
            CtrlrState::Resetting => "resetting",
            CtrlrState::Failed => "failed",
            CtrlrState::Detached => "deleting",
        }
    }
}

/// Counters for `bdev_nvme_get_controllers` and tests.
#[derive(Default, Debug)]
pub struct CtrlrStats {
    pub resets: AtomicU64,
    pub io_timeouts: AtomicU64,
    pub aborts_sent: AtomicU64,
    pub retries: AtomicU64,
    /// Bytes deliberately leaked because a device might still write them.
    pub leaked_bytes: AtomicU64,
    /// Completions for commands not outstanding (a device bug).
    pub spurious_completions: AtomicU64,
    /// Asynchronous events the controller reported.
    pub async_events: AtomicU64,
}

/// What the controller is known to be once identified.
struct Identity {
    data: ControllerData,
    io_queues: u16,
    use_sgl: bool,
    /// Interrupt mode: MSI-X on, vector `qid` for IO queue `qid`.
    interrupts: bool,
}

/// The completion callback of an admin command. Runs on the home reactor,
/// exactly once: with the completion, or with the error that ended the
/// command (timeout, reset, controller not enabled).
pub(crate) type AdminDone = Box<dyn FnOnce(Result<Cqe, NvmeError>)>;

/// A command on the controller.
struct Outstanding {
    cid: u16,
    what: &'static str,
    deadline_ns: u64,
    /// The command's data buffer, kept until the controller is done with it.
    buf: Option<DmaBuf>,
    /// None once the command timed out (its cid stays reserved until the
    /// reset that follows, so a late completion is recognised).
    done: Option<AdminDone>,
}

/// A command waiting for a free admin slot.
struct Waiting {
    sqe: Sqe,
    buf: Option<DmaBuf>,
    what: &'static str,
    timeout_ns: u64,
    done: AdminDone,
}

/// The admin queue: host-side ring state and the commands in flight. Its
/// memory is owned by the home reactor (`HomeState`); the views here stay
/// valid until detach. Touched on the home reactor only.
struct AdminQueue {
    sq: DeviceMem,
    cq: DeviceMem,
    sq_tail: u16,
    cq_head: u16,
    phase: bool,
    next_cid: u16,
    outstanding: Vec<Outstanding>,
    waiting: VecDeque<Waiting>,
    live: bool,
}

type Ended = Vec<(AdminDone, Result<Cqe, NvmeError>)>;

impl AdminQueue {
    fn new(sq: DeviceMem, cq: DeviceMem) -> Self {
        AdminQueue {
            sq,
            cq,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
            next_cid: 0,
            outstanding: Vec::with_capacity(ADMIN_SLOTS),
            waiting: VecDeque::new(),
            live: false,
        }
    }

    /// The controller is disabled: the rings restart and every command
    /// ends (its buffer can go: nothing writes it any more). Returns the
    /// callbacks to run once the lock is released.
    fn reset(&mut self, why: &NvmeError) -> Ended {
        self.cq.zero();
        self.sq_tail = 0;
        self.cq_head = 0;
        self.phase = true;
        self.live = false;
        let mut ended = Vec::new();
        for o in self.outstanding.drain(..) {
            if let Some(d) = o.done {
                ended.push((d, Err(why.clone())));
            }
        }
        for w in self.waiting.drain(..) {
            ended.push((w.done, Err(why.clone())));
        }
        ended
    }

    fn alloc_cid(&mut self) -> u16 {
        loop {
            self.next_cid = self.next_cid.wrapping_add(1);
            let c = self.next_cid;
            if c != 0xFFFF && !self.outstanding.iter().any(|o| o.cid == c) {
                return c;
            }
        }
    }

    fn push(&mut self, regs: &dyn RegisterSpace, dstrd: u8, sqe: &Sqe) {
        self.sq.write_sqe(self.sq_tail as usize, sqe);
        self.sq_tail = (self.sq_tail + 1) % ADMIN_QUEUE_DEPTH;
        std::sync::atomic::fence(Ordering::Release);
        regs.write32(doorbell_offset(0, false, dstrd) as u32, self.sq_tail as u32);
    }

    fn pop(&mut self) -> Option<Cqe> {
        let cqe = self.cq.read_cqe_if_phase(self.cq_head as usize, self.phase)?;
        self.cq_head += 1;
        if self.cq_head == ADMIN_QUEUE_DEPTH {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        Some(cqe)
    }
}

/// An IO queue id of the controller, as the home reactor tracks it.
#[derive(Clone, Copy)]
enum QueueSlot {
    Free,
    /// Given to the queue pair of `reactor`; `live` once it exists on the
    /// controller.
    Used {
        reactor: ReactorId,
        sq_iova: u64,
        cq_iova: u64,
        live: bool,
        /// Its completion queue interrupts on vector `qid` (interrupt mode).
        irq: bool,
    },
}

/// How a device left (`Controller::device_removed`).
#[derive(Clone, Copy)]
enum Removal {
    /// Registers read all ones: it is already gone.
    Gone,
    /// The platform asked for it back (VFIO device request); it still
    /// answers until released.
    Requested,
}

/// A queue pair creation that arrived during a reset.
struct QueueRequest {
    reactor: ReactorId,
    sq_iova: u64,
    cq_iova: u64,
    /// The queue pair's interrupt eventfd (interrupt mode).
    irq: Option<Arc<reactor::EventFd>>,
}

/// A controller. Shared by every reactor (`Arc`); IO goes through the
/// per-reactor queue pairs of `qpair`.
pub struct Controller {
    pub(crate) id: u64,
    name: String,
    trid: TransportId,
    pub(crate) regs: Arc<dyn RegisterSpace>,
    /// `regs`, switched off once the device is found gone.
    gate: Arc<Gated>,
    /// The device is gone (surprise removal).
    removed: AtomicBool,
    /// When the admin poller next reads CSTS (reactor clock).
    next_health_check_ns: AtomicU64,
    cap: Cap,
    vs: Vs,
    pub(crate) opts: CtrlrOpts,
    ident: OnceLock<Identity>,
    namespaces: Mutex<Vec<Namespace>>,
    pub(crate) io_depth: u16,
    /// IO queue ids (index 0 unused). Home reactor only.
    queues: Mutex<Vec<QueueSlot>>,
    /// Queue pair creations waiting for a reset to end. Home reactor only.
    deferred: Mutex<Vec<QueueRequest>>,
    aborts_in_flight: AtomicUsize,
    /// The bring-up finished: from now on a failure resets the controller
    /// (during the bring-up it fails the attach instead).
    attached: AtomicBool,
    /// Asynchronous events are armed (after attach registered the bdevs,
    /// and again after each reset).
    events_on: AtomicBool,
    /// The SMART critical warning bits last read (0: none).
    critical_warning: AtomicU8,
    state: AtomicU8,
    detaching: AtomicBool,
    /// The controller is disabled or shut down (or bus mastering is off):
    /// it cannot write host memory, so queue memory may be released.
    dma_stopped: AtomicBool,
    pub(crate) home: ReactorId,
    pub stats: CtrlrStats,
    /// What must live as long as the controller (the VFIO device).
    _keep: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static NO_DATA: LazyLock<ControllerData> = LazyLock::new(ControllerData::default);

/// Memory and pollers of each controller, on its home reactor.
#[derive(Default)]
struct HomeState(RefCell<HashMap<u64, HomeEntry>>);

struct HomeEntry {
    _admin_sq: DmaBuf,
    _admin_cq: DmaBuf,
    admin: AdminQueue,
    pollers: Vec<PollerHandle>,
}

/// Removes the controller's home entry: its pollers stop and its admin
/// memory is released — or, when `leak`, kept pinned forever.
fn drop_home_entry(id: u64, leak: bool, stats: &CtrlrStats) {
    let Some(e) = reactor::local::<HomeState>().0.borrow_mut().remove(&id) else {
        return;
    };
    e.pollers.iter().for_each(PollerHandle::unregister);
    if leak {
        stats.leaked_bytes.fetch_add(ADMIN_QUEUE_DEPTH as u64 * 80, Ordering::Relaxed);
        std::mem::forget(e);
    }
}

fn timeout_ms(cap: Cap) -> u64 {
    (cap.timeout_500ms().max(1) as u64) * 500
}

/// Locks a mutex that only one reactor takes; a contended lock would be a
/// blocking wait on a reactor, so it is counted (`note_blocking_wait`).
fn lock_home<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            note_blocking_wait();
            m.lock().unwrap_or_else(|e| e.into_inner())
        }
    }
}

/// Waits, without blocking, for CSTS to satisfy `cond`: a one-shot poller
/// on the current reactor reads CSTS once per loop and calls `done` with
/// Ok, or with the last value and the time waited once CFS is set or
/// `bound_ms` (reactor clock) has passed.
fn wait_csts_then(
    regs: Arc<dyn RegisterSpace>,
    bound_ms: u64,
    cond: fn(Csts) -> bool,
    done: impl FnOnce(Result<Csts, (Csts, u64)>) + 'static,
) {
    let start = reactor::now_ns();
    let mut done = Some(done);
    reactor::register_poller("nvme_csts_wait", move || {
        let csts = Csts(regs.read32(offset::CSTS));
        let waited_ms = reactor::now_ns().saturating_sub(start) / 1_000_000;
        let gone = csts.0 == u32::MAX;
        let r = if !gone && cond(csts) {
            Ok(csts)
        } else if waited_ms >= bound_ms || (!gone && csts.cfs()) {
            Err((csts, waited_ms))
        } else {
            return PollStatus::Idle;
        };
        if let Some(d) = done.take() {
            d(r);
        }
        PollStatus::Done
    });
}

/// CC.EN = 0 and wait for CSTS.RDY = 0 (after letting an enable in
/// progress finish, as the spec asks).
fn disable_then(regs: Arc<dyn RegisterSpace>, cap: Cap, done: impl FnOnce(Result<(), NvmeError>) + 'static) {
    let dev = regs.describe();
    let bound = timeout_ms(cap);
    let cc = Cc(regs.read32(offset::CC));
    let csts = Csts(regs.read32(offset::CSTS));
    if csts.0 == u32::MAX {
        return done(Err(NvmeError::Gone(dev)));
    }
    let clear = move |regs: Arc<dyn RegisterSpace>| {
        if cc.en() {
            regs.write32(offset::CC, cc.with_en(false).with_shn(shutdown::SHN_NONE).0);
        }
        wait_csts_then(
            regs,
            bound,
            |s| !s.rdy(),
            move |r| done(r.map(|_| ()).map_err(|(_, waited_ms)| NvmeError::DisableTimeout { dev, waited_ms })),
        );
    };
    if cc.en() && !csts.rdy() && !csts.cfs() {
        let r2 = regs.clone();
        wait_csts_then(regs, bound, |s| s.rdy(), move |_| clear(r2));
    } else {
        clear(regs);
    }
}

/// Programs the admin queue and enables the controller.
fn enable_then(
    regs: Arc<dyn RegisterSpace>,
    cap: Cap,
    asq: u64,
    acq: u64,
    done: impl FnOnce(Result<(), NvmeError>) + 'static,
) {
    let dev = regs.describe();
    regs.write32(offset::AQA, Aqa::new(ADMIN_QUEUE_DEPTH, ADMIN_QUEUE_DEPTH).0);
    regs.write64(offset::ASQ, asq);
    regs.write64(offset::ACQ, acq);
    let cc = Cc::default()
        .with_css(nvme_spec::regs::cc_css::NVM)
        .with_mps(0)
        .with_ams(0)
        .with_iosqes(6)
        .with_iocqes(4)
        .with_en(true);
    regs.write32(offset::CC, cc.0);
    let bound = timeout_ms(cap);
    let r2 = regs.clone();
    wait_csts_then(
        regs,
        bound,
        |s| s.rdy(),
        move |r| match r {
            Ok(_) => done(Ok(())),
            Err((csts, waited_ms)) => {
                // Leave it disabled: a controller that is not ready processes no
                // command, and after EN = 0 it will not start.
                r2.write32(offset::CC, cc.with_en(false).0);
                if csts.0 != u32::MAX && csts.cfs() {
                    done(Err(NvmeError::Fatal(dev)))
                } else {
                    done(Err(NvmeError::NotReady { dev, waited_ms, cap_to_ms: bound }))
                }
            }
        },
    );
}

/// The transport-specific part of an attach.
pub struct AttachTarget {
    pub regs: Arc<dyn RegisterSpace>,
    pub trid: TransportId,
    /// Kept alive with the controller (the VFIO device and its mapper).
    pub keep: Option<Box<dyn std::any::Any + Send>>,
}

/// The end of an attach: the controller, or why there is none.
pub type AttachDone = Box<dyn FnOnce(Result<Arc<Controller>, NvmeError>) + Send>;

/// What the identify steps of an attach have learnt so far.
struct Probe {
    ctrlr: Arc<Controller>,
    buf: DmaBuf,
    data: ControllerData,
    io_queues: u16,
    namespaces: Vec<Namespace>,
    done: AttachDone,
}

fn read_identify(buf: &DmaBuf) -> Vec<u8> {
    let mut out = vec![0u8; IDENTIFY_DATA_LEN];
    DeviceMem::of(buf).read_bytes(0, &mut out);
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end_matches([' ', '\0']).to_string()
}

fn identify_sqe(cns: Cns, nsid: u32) -> Sqe {
    let mut sqe = Sqe::new(AdminOpcode::IDENTIFY.0, 0);
    IdentifyParams { cns, cntid: 0, csi: 0, nsid }.write_to(&mut sqe);
    sqe
}

fn number_of_queues_sqe(n: u16) -> Sqe {
    let mut sqe = Sqe::new(AdminOpcode::SET_FEATURES.0, 0);
    FeatureParams {
        fid: FeatureId::NUMBER_OF_QUEUES,
        save: false,
        select: 0,
        value: NumberOfQueues { io_sqs: n as u32, io_cqs: n as u32 }.to_dword(),
    }
    .write_to(&mut sqe);
    sqe
}

impl Probe {
    fn fail(self: Box<Self>, e: NvmeError) {
        let Probe { ctrlr, done, .. } = *self;
        ctrlr.abandon(e, done);
    }

    /// Identify Controller.
    fn identify_controller(self: Box<Self>) {
        let (c, buf) = (self.ctrlr.clone(), self.buf.clone());
        c.admin(identify_sqe(Cns::CONTROLLER, 0), Some(buf), "identify", Box::new(move |r| self.got_controller(r)));
    }

    fn got_controller(mut self: Box<Self>, r: Result<Cqe, NvmeError>) {
        if let Err(e) = r {
            return self.fail(e);
        }
        let raw = read_identify(&self.buf);
        let Ok(id) = IdentifyController::read_from_bytes(&raw[..]) else {
            return self.fail(NvmeError::Invalid("identify data".into()));
        };
        if id.sqes & 0xF > 6 || id.cqes & 0xF > 4 {
            let msg = format!(
                "{}: required queue entry sizes SQES {:#x} CQES {:#x} are not 64/16 bytes",
                self.ctrlr.regs.describe(),
                id.sqes,
                id.cqes
            );
            return self.fail(NvmeError::Unsupported(msg));
        }
        self.data = ControllerData {
            vid: id.vid.get(),
            ssvid: id.ssvid.get(),
            serial: text(&id.sn),
            model: text(&id.mn),
            firmware: text(&id.fr),
            cntlid: id.cntlid.get(),
            mdts: id.mdts,
            oncs: id.oncs.get(),
            vwc: id.vwc & nvme_spec::identify::vwc::PRESENT != 0,
            write_cache_enabled: false,
            sgls: id.sgls.get(),
            nn: id.nn.get(),
            acl: id.acl,
            aerl: id.aerl,
            oaes: id.oaes.get(),
            awupf: id.awupf.get(),
            subnqn: text(&id.subnqn),
        };
        let c = self.ctrlr.clone();
        let wanted = if c.opts.io_queues > 0 { c.opts.io_queues } else { reactor::count().max(1) as u16 };
        c.admin(
            number_of_queues_sqe(wanted),
            None,
            "set features (number of queues)",
            Box::new(move |r| match r {
                Ok(cqe) => {
                    let granted = NumberOfQueues::from_dword(cqe.dw0.get());
                    self.io_queues = granted.io_sqs.min(granted.io_cqs).min(wanted as u32).clamp(1, 1024) as u16;
                    self.write_cache()
                }
                Err(e) => self.fail(e),
            }),
        );
    }

    /// Whether the present volatile write cache is enabled (Get Features,
    /// current value, DW0 bit 0). A controller that does not answer is taken
    /// to cache: claiming a cache costs a flush, denying one loses data.
    fn write_cache(self: Box<Self>) {
        if !self.data.vwc {
            return self.namespaces();
        }
        let mut sqe = Sqe::new(AdminOpcode::GET_FEATURES.0, 0);
        FeatureParams { fid: FeatureId::VOLATILE_WRITE_CACHE, save: false, select: select::CURRENT, value: 0 }
            .write_to(&mut sqe);
        let c = self.ctrlr.clone();
        c.admin(
            sqe,
            None,
            "get features (volatile write cache)",
            Box::new(move |r| {
                let mut p = self;
                p.data.write_cache_enabled = match r {
                    Ok(cqe) => cqe.dw0.get() & VWC_ENABLE != 0,
                    Err(NvmeError::AdminFailed { .. }) => {
                        tracing::warn!(ctrlr = %p.ctrlr.name, "get features failed; assuming the write cache is enabled");
                        true
                    }
                    Err(e) => return p.fail(e),
                };
                p.namespaces()
            }),
        );
    }

    fn namespaces(self: Box<Self>) {
        let (c, buf, nn) = (self.ctrlr.clone(), self.buf.clone(), self.data.nn);
        scan_namespaces(
            &c,
            buf,
            nn,
            Box::new(move |r| {
                let mut p = self;
                match r {
                    Ok(found) => {
                        p.namespaces = found;
                        p.finish()
                    }
                    Err(e) => p.fail(e),
                }
            }),
        );
    }

    fn finish(self: Box<Self>) {
        let Probe { ctrlr, data, mut io_queues, namespaces, done, .. } = *self;
        let interrupts = reactor::interrupts_enabled();
        if interrupts {
            match enable_interrupts(&ctrlr, io_queues) {
                Ok(n) => io_queues = n,
                Err(e) => return ctrlr.abandon(e, done),
            }
        }
        // SGLS bits 1:0: 01b any alignment, 10b dword granularity, 11b reserved.
        let sgl_support = data.sgls & 0b11;
        let use_sgl = ctrlr.opts.prefer_sgl
            && (sgl_support == nvme_spec::identify::sgls::SUPPORTED
                || sgl_support == nvme_spec::identify::sgls::SUPPORTED_DWORD_ALIGNED);
        let namespaces: Vec<Namespace> = namespaces
            .into_iter()
            .map(|mut ns| {
                ns.max_io_blocks = max_io_blocks(&data, use_sgl, ns.block_size);
                ns
            })
            .collect();
        *lock_home(&ctrlr.queues) = vec![QueueSlot::Free; io_queues as usize + 1];
        *lock_home(&ctrlr.namespaces) = namespaces;
        let _ = ctrlr.ident.set(Identity { data, io_queues, use_sgl, interrupts });
        ctrlr.attached.store(true, Ordering::Release);
        tracing::info!(
            name = ctrlr.name,
            dev = %ctrlr.regs.describe(),
            model = %ctrlr.data().model,
            namespaces = ctrlr.namespaces().len(),
            io_queues,
            depth = ctrlr.io_depth,
            "NVMe controller attached"
        );
        done(Ok(ctrlr))
    }
}

/// Interrupt mode: MSI-X with vector 0 for the admin queue and one vector
/// per IO queue (vector = queue id), so each reactor's queue pair wakes its
/// own reactor. A device with fewer vectors gets fewer IO queues; one with
/// none for IO queues cannot run in interrupt mode and is refused. Returns
/// the IO queue count.
fn enable_interrupts(ctrlr: &Controller, io_queues: u16) -> Result<u16, NvmeError> {
    let dev = ctrlr.regs.describe();
    let vectors = ctrlr.regs.interrupt_vectors();
    if vectors < 2 {
        return Err(NvmeError::Unsupported(format!(
            "{dev}: interrupt mode needs MSI-X vectors for the admin queue and each IO queue; the device offers              {vectors} (run without --interrupt-mode to poll it)"
        )));
    }
    let io_queues = io_queues.min(vectors - 1);
    ctrlr.regs.enable_interrupts(io_queues + 1).map_err(NvmeError::Unsupported)?;
    tracing::info!(ctrlr = %ctrlr.name, vectors = io_queues + 1, "interrupt mode: MSI-X enabled");
    Ok(io_queues)
}

/// Largest read/write in one command, in blocks (MDTS, PRP list room, NLB).
fn max_io_blocks(data: &ControllerData, use_sgl: bool, block_size: u32) -> u32 {
    let mdts_bytes = if data.mdts == 0 { u64::MAX } else { prp::PAGE_SIZE << data.mdts.min(20) };
    let room_bytes = if use_sgl { 32 << 20 } else { prp::max_transfer_bytes(PRP_LIST_PAGES) };
    (mdts_bytes.min(room_bytes) / block_size as u64).clamp(1, 65_536) as u32
}

type ScanDone = Box<dyn FnOnce(Result<Vec<Namespace>, NvmeError>)>;

/// A walk over the active namespaces: the list (NVMe 1.1+; before that,
/// every id up to NN), then Identify Namespace for each, one after another.
struct Scan {
    ctrlr: Arc<Controller>,
    buf: DmaBuf,
    nn: u32,
    nsids: Vec<u32>,
    found: Vec<Namespace>,
    done: ScanDone,
}

fn scan_namespaces(ctrlr: &Arc<Controller>, buf: DmaBuf, nn: u32, done: ScanDone) {
    let scan = Box::new(Scan { ctrlr: ctrlr.clone(), buf, nn, nsids: Vec::new(), found: Vec::new(), done });
    if ctrlr.vs < Vs::new(1, 1, 0) {
        let mut scan = scan;
        scan.nsids.extend((1..=nn.min(1024)).rev());
        return scan.identify_next();
    }
    scan.list(0)
}

impl Scan {
    fn fail(self, e: NvmeError) {
        (self.done)(Err(e))
    }

    /// The active namespace list from `last` on.
    fn list(self: Box<Self>, last: u32) {
        let (c, buf) = (self.ctrlr.clone(), self.buf.clone());
        c.admin(
            identify_sqe(Cns::ACTIVE_NAMESPACE_LIST, last),
            Some(buf),
            "identify",
            Box::new(move |r| {
                let mut s = self;
                if let Err(e) = r {
                    return (*s).fail(e);
                }
                let raw = read_identify(&s.buf);
                let Ok(list) = NamespaceList::read_from_bytes(&raw[..]) else {
                    return (*s).fail(NvmeError::Invalid("ns list".into()));
                };
                let before = s.nsids.len();
                let nn = s.nn;
                s.nsids.extend(list.iter().filter(|&id| id > last && id <= nn.max(id)));
                if s.nsids.len() - before < NamespaceList::CAPACITY {
                    s.nsids.reverse();
                    return s.identify_next();
                }
                let next = *s.nsids.last().unwrap_or(&u32::MAX);
                s.list(next)
            }),
        );
    }

    fn identify_next(mut self: Box<Self>) {
        let Some(nsid) = self.nsids.pop() else {
            let Scan { found, done, .. } = *self;
            return done(Ok(found));
        };
        let (c, buf) = (self.ctrlr.clone(), self.buf.clone());
        c.admin(
            identify_sqe(Cns::NAMESPACE, nsid),
            Some(buf),
            "identify",
            Box::new(move |r| {
                let mut s = self;
                if let Err(e) = r {
                    return (*s).fail(e);
                }
                match parse_namespace(nsid, &read_identify(&s.buf)) {
                    Ok(Some(ns)) => s.found.push(ns),
                    Ok(None) => {}
                    Err(e) => return (*s).fail(e),
                }
                s.identify_next()
            }),
        );
    }
}

/// What changed in a controller's namespaces (an asynchronous event).
#[derive(Clone, Debug)]
pub enum NamespaceChange {
    Added(Namespace),
    Removed(u32),
    Resized { nsid: u32, old_blocks: u64, new_blocks: u64 },
}

/// One Identify Namespace page: the namespace, or None when it is not one
/// the driver serves (unformatted, empty, or formatted with metadata).
fn parse_namespace(nsid: u32, raw: &[u8]) -> Result<Option<Namespace>, NvmeError> {
    let ns = IdentifyNamespace::read_from_bytes(raw).map_err(|_| NvmeError::Invalid("identify ns".into()))?;
    let Some(fmt) = ns.formatted_lba_format() else {
        return Ok(None);
    };
    let (Some(bs), nsze) = (fmt.block_size(), ns.nsze.get()) else {
        return Ok(None);
    };
    if nsze == 0 {
        return Ok(None);
    }
    if fmt.ms.get() != 0 {
        tracing::warn!(nsid, "namespace formatted with metadata is not supported; skipped");
        return Ok(None);
    }
    Ok(Some(Namespace {
        nsid,
        block_size: bs,
        num_blocks: nsze,
        nguid: ns.nguid,
        eui64: ns.eui64,
        max_io_blocks: 0,
        deallocated_reads_zeroes: ns.dlfeat & 0b111 == 0b001,
    }))
}

impl Controller {
    /// Brings a controller up and identifies it, without blocking: the
    /// calling reactor becomes the controller's home (admin poller, admin
    /// memory, reset orchestration) and `done` runs there when the bring-up
    /// ends (within CAP.TO plus the admin timeouts). `pollers` (a
    /// simulator's, say) live until detach. On error nothing is left behind:
    /// admin memory is freed only once the controller is disabled, and no
    /// poller stays registered.
    pub fn attach(name: &str, target: AttachTarget, opts: CtrlrOpts, pollers: Vec<PollerHandle>, done: AttachDone) {
        let Some(home) = reactor::current() else {
            pollers.iter().for_each(PollerHandle::unregister);
            return done(Err(NvmeError::Invalid("attach must run on a reactor".into())));
        };
        let fail = |e: NvmeError, done: AttachDone| {
            pollers.iter().for_each(PollerHandle::unregister);
            done(Err(e))
        };
        let gate = Gated::new(target.regs);
        let regs: Arc<dyn RegisterSpace> = gate.clone();
        let dev = regs.describe();
        let cap = Cap(regs.read64(offset::CAP));
        if cap.0 == u64::MAX {
            return fail(NvmeError::Gone(dev), done);
        }
        if cap.css() & cap_css::NVM == 0 {
            let e = NvmeError::Unsupported(format!("{dev}: controller does not support the NVM command set"));
            return fail(e, done);
        }
        if cap.mpsmin() != 0 {
            let e = NvmeError::Unsupported(format!(
                "{dev}: minimum memory page size {} KiB is not supported (4 KiB only)",
                4u32 << cap.mpsmin()
            ));
            return fail(e, done);
        }
        let sq_bytes = ADMIN_QUEUE_DEPTH as usize * 64;
        let cq_bytes = ADMIN_QUEUE_DEPTH as usize * 16;
        let (Some(asq), Some(acq)) = (DmaBuf::zeroed(sq_bytes), DmaBuf::zeroed(cq_bytes)) else {
            return fail(NvmeError::NoMemory("admin queue".into()), done);
        };
        let Some(buf) = DmaBuf::zeroed(IDENTIFY_DATA_LEN) else {
            return fail(NvmeError::NoMemory("identify buffer".into()), done);
        };
        let vs = Vs(regs.read32(offset::VS));
        let depth = opts.io_queue_depth.clamp(2, 1024).min(cap.mqes().saturating_add(1).max(2));
        let ctrlr = Arc::new(Controller {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            trid: target.trid,
            regs,
            gate,
            removed: AtomicBool::new(false),
            next_health_check_ns: AtomicU64::new(0),
            cap,
            vs,
            opts,
            ident: OnceLock::new(),
            namespaces: Mutex::new(Vec::new()),
            io_depth: depth,
            queues: Mutex::new(Vec::new()),
            deferred: Mutex::new(Vec::new()),
            aborts_in_flight: AtomicUsize::new(0),
            attached: AtomicBool::new(false),
            events_on: AtomicBool::new(false),
            critical_warning: AtomicU8::new(0),
            state: AtomicU8::new(CtrlrState::Enabled as u8),
            detaching: AtomicBool::new(false),
            dma_stopped: AtomicBool::new(true),
            home,
            stats: CtrlrStats::default(),
            _keep: Mutex::new(target.keep),
        });
        let weak = Arc::downgrade(&ctrlr);
        let mut pollers = pollers;
        pollers.push(reactor::register_poller("nvme_admin", move || match weak.upgrade() {
            Some(c) => c.poll_admin(),
            None => PollStatus::Done,
        }));
        let (asq_iova, acq_iova) = (asq.iova(), acq.iova());
        let admin = AdminQueue::new(DeviceMem::of(&asq), DeviceMem::of(&acq));
        reactor::local::<HomeState>()
            .0
            .borrow_mut()
            .insert(ctrlr.id, HomeEntry { _admin_sq: asq, _admin_cq: acq, admin, pollers });
        let c = ctrlr.clone();
        disable_then(ctrlr.regs.clone(), cap, move |r| {
            if let Err(e) = r {
                return c.abandon(e, done);
            }
            let c2 = c.clone();
            c2.dma_stopped.store(false, Ordering::Release);
            enable_then(c.regs.clone(), cap, asq_iova, acq_iova, move |r| {
                if let Err(e) = r {
                    return c.abandon(e, done);
                }
                c.with_admin(|aq| aq.live = true);
                let probe = Box::new(Probe {
                    ctrlr: c,
                    buf,
                    data: ControllerData::default(),
                    io_queues: 1,
                    namespaces: Vec::new(),
                    done,
                });
                probe.identify_controller();
            });
        });
    }

    /// A failed bring-up: disable before the admin memory goes; if even
    /// that fails, cut bus mastering, and if that fails too, leak the memory.
    fn abandon(self: Arc<Self>, e: NvmeError, done: AttachDone) {
        let c = self.clone();
        disable_then(self.regs.clone(), self.cap, move |r| {
            let stopped = r.is_ok() || c.regs.stop_dma();
            c.end_admin("not attached");
            c.dma_stopped.store(stopped, Ordering::Release);
            c.set_state(if stopped { CtrlrState::Detached } else { CtrlrState::Failed });
            drop_home_entry(c.id, !stopped, &c.stats);
            done(Err(e))
        });
    }

    /// `f` on the admin queue, which the home reactor holds (None elsewhere,
    /// or once detached). `f` must not call back into the controller.
    fn with_admin<R>(&self, f: impl FnOnce(&mut AdminQueue) -> R) -> Option<R> {
        if reactor::current() != Some(self.home) {
            return None;
        }
        let home = reactor::local::<HomeState>();
        let mut map = home.0.borrow_mut();
        map.get_mut(&self.id).map(|e| f(&mut e.admin))
    }

    /// Ends every admin command (the controller is disabled or gone).
    fn end_admin(&self, why: &'static str) {
        let ended = self.with_admin(|aq| aq.reset(&NvmeError::State(self.name.clone(), why))).unwrap_or_default();
        for (d, r) in ended {
            d(r);
        }
    }

    pub(crate) fn dstrd(&self) -> u8 {
        self.cap.dstrd()
    }

    /// Runs `f` on the home reactor: now when already there, else by message.
    fn on_home(self: &Arc<Self>, f: impl FnOnce(Arc<Self>) + Send + 'static) {
        let me = self.clone();
        if reactor::current() == Some(self.home) {
            f(me)
        } else {
            reactor::send(self.home, move || f(me));
        }
    }

    /// Submits an admin command (home reactor); `done` runs when it ends.
    /// `buf` is the command's data buffer (one page at most); if the command
    /// times out the buffer is leaked, since the controller may still write
    /// it, and a reset is requested.
    pub(crate) fn admin(self: &Arc<Self>, sqe: Sqe, buf: Option<DmaBuf>, what: &'static str, done: AdminDone) {
        let timeout_ns = self.opts.admin_timeout_ms.max(1).saturating_mul(1_000_000);
        self.admin_with_timeout(sqe, buf, what, timeout_ns, done)
    }

    fn admin_with_timeout(
        self: &Arc<Self>,
        mut sqe: Sqe,
        buf: Option<DmaBuf>,
        what: &'static str,
        timeout_ns: u64,
        done: AdminDone,
    ) {
        debug_assert_eq!(reactor::current(), Some(self.home), "admin commands are submitted on the home reactor");
        if let Some(b) = &buf {
            match prp::build(b.iova(), b.len() as u64, 0, 0, |_, _| ()) {
                Ok((p1, p2)) => {
                    sqe.dptr.prp1 = U64::new(p1);
                    sqe.dptr.prp2 = U64::new(p2);
                }
                Err(e) => return done(Err(NvmeError::Invalid(format!("admin buffer: {e:?}")))),
            }
        }
        let mut cmd = Some(Waiting { sqe, buf, what, timeout_ns, done });
        self.with_admin(|aq| {
            if !aq.live {
                return;
            }
            let Some(w) = cmd.take() else { return };
            if aq.outstanding.len() >= ADMIN_SLOTS || !aq.waiting.is_empty() {
                aq.waiting.push_back(w);
            } else {
                self.issue_admin(aq, w);
            }
        });
        if let Some(w) = cmd {
            (w.done)(Err(NvmeError::State(self.name.clone(), "not enabled")));
        }
    }

    fn issue_admin(&self, aq: &mut AdminQueue, w: Waiting) {
        let Waiting { mut sqe, buf, what, timeout_ns, done } = w;
        let cid = aq.alloc_cid();
        sqe.cid = U16::new(cid);
        aq.push(self.regs.as_ref(), self.dstrd(), &sqe);
        let deadline_ns = reactor::now_ns().saturating_add(timeout_ns);
        aq.outstanding.push(Outstanding { cid, what, deadline_ns, buf, done: Some(done) });
    }

    /// The home reactor's admin poller: completions, deadlines, and the
    /// commands waiting for a slot. Callbacks run after the queue is
    /// unlocked, so they may submit more.
    fn poll_admin(self: &Arc<Self>) -> PollStatus {
        if self.removed.load(Ordering::Acquire) {
            return PollStatus::Idle;
        }
        let now = reactor::now_ns();
        if now >= self.next_health_check_ns.load(Ordering::Relaxed) {
            self.next_health_check_ns.store(now.saturating_add(HEALTH_CHECK_NS), Ordering::Relaxed);
            let csts = Csts(self.regs.read32(offset::CSTS));
            if csts.0 == u32::MAX {
                self.device_removed(Removal::Gone);
                return PollStatus::Busy;
            }
            if self.gate.removal_requested() {
                self.device_removed(Removal::Requested);
                return PollStatus::Busy;
            }
            if csts.cfs() && self.state() == CtrlrState::Enabled {
                self.request_reset("controller fatal status (CSTS.CFS)");
            }
        }
        let polled = self.with_admin(|aq| {
            let mut ended: Ended = Vec::new();
            let mut timed_out = false;
            let mut consumed = false;
            if !aq.live {
                return (ended, timed_out, consumed);
            }
            while let Some(cqe) = aq.pop() {
                consumed = true;
                let cid = cqe.cid.get();
                match aq.outstanding.iter().position(|o| o.cid == cid) {
                    Some(i) => {
                        let o = aq.outstanding.swap_remove(i);
                        if let Some(d) = o.done {
                            let status = cqe.status();
                            let r = if status.is_success() {
                                Ok(cqe)
                            } else {
                                Err(NvmeError::AdminFailed { dev: self.regs.describe(), what: o.what, status })
                            };
                            ended.push((d, r));
                        }
                    }
                    None => {
                        self.stats.spurious_completions.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(ctrlr = %self.name, cid, "admin completion for no outstanding command");
                    }
                }
            }
            if consumed {
                self.regs.write32(doorbell_offset(0, true, self.dstrd()) as u32, aq.cq_head as u32);
            }
            if !aq.outstanding.is_empty() {
                let now = reactor::now_ns();
                for o in aq.outstanding.iter_mut().filter(|o| o.done.is_some() && now > o.deadline_ns) {
                    if let Some(b) = o.buf.take() {
                        self.stats.leaked_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                        std::mem::forget(b);
                    }
                    let waited_ms = self.opts.admin_timeout_ms;
                    let e = NvmeError::AdminTimeout { dev: self.regs.describe(), what: o.what, waited_ms };
                    if let Some(d) = o.done.take() {
                        ended.push((d, Err(e)));
                    }
                    timed_out = true;
                }
            }
            while aq.outstanding.len() < ADMIN_SLOTS {
                let Some(w) = aq.waiting.pop_front() else { break };
                self.issue_admin(aq, w);
            }
            (ended, timed_out, consumed)
        });
        let Some((ended, timed_out, consumed)) = polled else {
            return PollStatus::Idle;
        };
        let busy = !ended.is_empty() || consumed;
        for (d, r) in ended {
            d(r);
        }
        if timed_out {
            self.request_reset("admin command timeout");
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    /// Sends Abort for IO command `cid` of `sqid` without waiting (any
    /// reactor; the home reactor submits it). False when the abort limit is
    /// reached or the controller is not enabled (the caller tries again on
    /// its next scan).
    pub(crate) fn try_abort(self: &Arc<Self>, sqid: u16, io_cid: u16) -> bool {
        if self.state() != CtrlrState::Enabled {
            return false;
        }
        let limit = MAX_ASYNC_ABORTS.min(self.data().acl as usize + 1);
        let took =
            self.aborts_in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1));
        if took.is_err() {
            return false;
        }
        self.stats.aborts_sent.fetch_add(1, Ordering::Relaxed);
        self.on_home(move |c| {
            let mut sqe = Sqe::new(AdminOpcode::ABORT.0, 0);
            sqe.cdw10 = U32::new(sqid as u32 | ((io_cid as u32) << 16));
            let timeout_ns = c.opts.io_timeout_us.max(1000).saturating_mul(1000);
            let c2 = c.clone();
            c.admin_with_timeout(
                sqe,
                None,
                "abort",
                timeout_ns,
                Box::new(move |r| {
                    c2.aborts_in_flight.fetch_sub(1, Ordering::AcqRel);
                    match r {
                        Ok(cqe) => {
                            let aborted = cqe.dw0.get() & 1 == 0;
                            tracing::warn!(ctrlr = %c2.name, sqid, cid = io_cid, aborted, "abort completed");
                        }
                        Err(e) => tracing::warn!(ctrlr = %c2.name, sqid, cid = io_cid, "abort: {e}"),
                    }
                }),
            );
        });
        true
    }

    /// Creates IO CQ and SQ `qid` on the controller (home reactor); with
    /// `irq`, the CQ interrupts on vector `qid`.
    fn create_io_queue(
        self: &Arc<Self>,
        qid: u16,
        sq_iova: u64,
        cq_iova: u64,
        irq: bool,
        done: Box<dyn FnOnce(Result<(), NvmeError>) + Send>,
    ) {
        let depth = self.io_depth;
        let mut sqe = Sqe::new(AdminOpcode::CREATE_IO_CQ.0, 0);
        sqe.dptr.prp1 = U64::new(cq_iova);
        sqe.cdw10 = U32::new(qid as u32 | ((depth as u32 - 1) << 16));
        // Physically contiguous (bit 0); interrupts enabled (bit 1) on
        // vector IV (bits 31:16) in interrupt mode, else off: polled.
        sqe.cdw11 = U32::new(if irq { 1 | 2 | ((qid as u32) << 16) } else { 1 });
        let c = self.clone();
        self.admin(
            sqe,
            None,
            "create IO completion queue",
            Box::new(move |r| {
                if let Err(e) = r {
                    return done(Err(e));
                }
                let mut sqe = Sqe::new(AdminOpcode::CREATE_IO_SQ.0, 0);
                sqe.dptr.prp1 = U64::new(sq_iova);
                sqe.cdw10 = U32::new(qid as u32 | ((depth as u32 - 1) << 16));
                sqe.cdw11 = U32::new(1 | ((qid as u32) << 16));
                let c2 = c.clone();
                c.admin(
                    sqe,
                    None,
                    "create IO submission queue",
                    Box::new(move |r| match r {
                        Ok(_) => done(Ok(())),
                        Err(e) => {
                            if matches!(e, NvmeError::AdminFailed { .. }) {
                                c2.delete_queue(AdminOpcode::DELETE_IO_CQ, qid, Box::new(|_| ()));
                            }
                            done(Err(e))
                        }
                    }),
                );
            }),
        );
    }

    fn delete_queue(self: &Arc<Self>, op: AdminOpcode, qid: u16, done: Box<dyn FnOnce(Result<(), NvmeError>) + Send>) {
        let mut sqe = Sqe::new(op.0, 0);
        sqe.cdw10 = U32::new(qid as u32);
        self.admin(sqe, None, "delete IO queue", Box::new(move |r| done(r.map(|_| ()))));
    }

    /// A reactor's queue pair asks for its controller queues (any reactor;
    /// the answer comes back by message: `qpair::queue_created`).
    pub(crate) fn request_io_queue(self: &Arc<Self>, sq_iova: u64, cq_iova: u64, irq: Option<Arc<reactor::EventFd>>) {
        let Some(reactor) = reactor::current() else {
            return;
        };
        self.on_home(move |c| c.create_queue_for(QueueRequest { reactor, sq_iova, cq_iova, irq }));
    }

    fn create_queue_for(self: &Arc<Self>, req: QueueRequest) {
        let QueueRequest { reactor, sq_iova, cq_iova, irq } = req;
        if self.is_detaching() {
            return self.answer_queue(reactor, None);
        }
        match self.state() {
            CtrlrState::Enabled => {}
            CtrlrState::Resetting => {
                return lock_home(&self.deferred).push(QueueRequest { reactor, sq_iova, cq_iova, irq })
            }
            CtrlrState::Failed | CtrlrState::Detached => return self.answer_queue(reactor, None),
        }
        let qid = {
            let mut q = lock_home(&self.queues);
            match q.iter().skip(1).position(|s| matches!(s, QueueSlot::Free)) {
                Some(i) => {
                    let irq = irq.is_some() && self.uses_interrupts();
                    q[i + 1] = QueueSlot::Used { reactor, sq_iova, cq_iova, live: false, irq };
                    (i + 1) as u16
                }
                None => {
                    drop(q);
                    tracing::error!(ctrlr = %self.name, io_queues = self.io_queue_count(), "all IO queues are in use");
                    return self.answer_queue(reactor, None);
                }
            }
        };
        // The vector is routed before the queue exists, so no completion
        // interrupt is lost; it stays routed across resets (MSI-X is PCI
        // state, which a controller reset leaves alone).
        let with_irq = match irq.as_ref().filter(|_| self.uses_interrupts()) {
            Some(fd) => match self.regs.set_interrupt(qid, Some(fd)) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(ctrlr = %self.name, qid, "IO queue interrupt: {e}");
                    if let Some(s) = lock_home(&self.queues).get_mut(qid as usize) {
                        *s = QueueSlot::Free;
                    }
                    return self.answer_queue(reactor, None);
                }
            },
            None => false,
        };
        let c = self.clone();
        self.create_io_queue(
            qid,
            sq_iova,
            cq_iova,
            with_irq,
            Box::new(move |r| match r {
                Ok(()) => {
                    if let Some(QueueSlot::Used { live, .. }) = lock_home(&c.queues).get_mut(qid as usize) {
                        *live = true;
                    }
                    c.answer_queue(reactor, Some(qid));
                }
                Err(NvmeError::AdminFailed { .. }) if c.state() == CtrlrState::Enabled => {
                    tracing::error!(ctrlr = %c.name, qid, "IO queue creation failed");
                    if let Some(s) = lock_home(&c.queues).get_mut(qid as usize) {
                        *s = QueueSlot::Free;
                    }
                    c.answer_queue(reactor, None);
                }
                // A timeout or a reset ended it: the reset recreates every
                // used queue id and tells the queue pair the outcome.
                Err(e) => tracing::warn!(ctrlr = %c.name, qid, "IO queue creation: {e}"),
            }),
        );
    }

    fn answer_queue(self: &Arc<Self>, reactor: ReactorId, qid: Option<u16>) {
        let c = self.clone();
        reactor::send(reactor, move || qpair::queue_created(&c, qid));
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn trid(&self) -> &TransportId {
        &self.trid
    }

    pub fn data(&self) -> &ControllerData {
        self.ident.get().map_or(&NO_DATA, |i| &i.data)
    }

    /// The namespaces the controller serves now.
    pub fn namespaces(&self) -> Vec<Namespace> {
        self.namespaces.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn cap(&self) -> Cap {
        self.cap
    }

    pub fn version(&self) -> Vs {
        self.vs
    }

    /// Entries per IO queue.
    pub fn io_queue_depth(&self) -> u16 {
        self.io_depth
    }

    /// Whether IO data is described by SGLs (else PRPs).
    pub fn uses_sgl(&self) -> bool {
        self.ident.get().is_some_and(|i| i.use_sgl)
    }

    /// Whether IO completions interrupt (interrupt mode, MSI-X), so a
    /// queue pair's reactor may sleep until they do.
    pub fn uses_interrupts(&self) -> bool {
        self.ident.get().is_some_and(|i| i.interrupts)
    }

    pub fn io_queue_count(&self) -> u16 {
        self.ident.get().map_or(0, |i| i.io_queues)
    }

    pub fn state(&self) -> CtrlrState {
        CtrlrState::from_u8(self.state.load(Ordering::Acquire))
    }

    fn set_state(&self, s: CtrlrState) {
        self.state.store(s as u8, Ordering::Release);
    }

    pub fn is_detaching(&self) -> bool {
        self.detaching.load(Ordering::Acquire)
    }

    /// True once the controller cannot write host memory any more.
    pub fn dma_stopped(&self) -> bool {
        self.dma_stopped.load(Ordering::Acquire)
    }

    /// Asks for a controller reset (from any reactor). The first caller
    /// wins; the home reactor runs it.
    pub fn request_reset(self: &Arc<Self>, why: &str) {
        if !self.attached.load(Ordering::Acquire) {
            return;
        }
        if self
            .state
            .compare_exchange(
                CtrlrState::Enabled as u8,
                CtrlrState::Resetting as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return;
        }
        if reactor::current().is_none() {
            tracing::error!(ctrlr = %self.name, why, "reset requested off a reactor thread; ignored");
            self.set_state(CtrlrState::Enabled);
            return;
        }
        tracing::warn!(ctrlr = %self.name, why, "resetting NVMe controller");
        self.on_home(reset_quiesce);
    }

    /// Detach, after the caller (lib.rs) has unregistered the bdevs: the IO
    /// queues are deleted, the controller is shut down (CC.SHN, then wait
    /// for SHST), every reactor drops its queue pair, and the admin memory
    /// is freed once it cannot be written. Home reactor; `done` runs there.
    pub(crate) fn retire(self: &Arc<Self>, done: Box<dyn FnOnce(Result<(), NvmeError>) + Send>) {
        if self.state() == CtrlrState::Resetting {
            // Let the reset end first (it does not re-enable a controller
            // being detached, and each of its steps has a deadline).
            let (c, mut done) = (self.clone(), Some(done));
            reactor::register_poller("nvme_detach_wait", move || {
                if c.state() == CtrlrState::Resetting {
                    return PollStatus::Idle;
                }
                if let Some(d) = done.take() {
                    c.retire(d);
                }
                PollStatus::Done
            });
            return;
        }
        let live: Vec<u16> = lock_home(&self.queues)
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, QueueSlot::Used { live: true, .. }))
            .map(|(i, _)| i as u16)
            .collect();
        self.delete_queues(live, done);
    }

    fn delete_queues(self: &Arc<Self>, mut qids: Vec<u16>, done: Box<dyn FnOnce(Result<(), NvmeError>) + Send>) {
        let Some(qid) = qids.pop() else {
            return self.clone().shutdown(done);
        };
        if self.dma_stopped() || !self.with_admin(|aq| aq.live).unwrap_or(false) {
            return self.clone().shutdown(done);
        }
        let c = self.clone();
        self.delete_queue(
            AdminOpcode::DELETE_IO_SQ,
            qid,
            Box::new(move |r| {
                let c2 = c.clone();
                let next = move |r: Result<(), NvmeError>| {
                    match r {
                        Ok(()) => {
                            if let Some(s) = lock_home(&c2.queues).get_mut(qid as usize) {
                                *s = QueueSlot::Free;
                            }
                        }
                        Err(e) => tracing::warn!(ctrlr = %c2.name, qid, "detach: {e}"),
                    }
                    c2.clone().delete_queues(qids, done)
                };
                match r {
                    Ok(()) => c.delete_queue(AdminOpcode::DELETE_IO_CQ, qid, Box::new(next)),
                    Err(e) => next(Err(e)),
                }
            }),
        );
    }

    /// CC.SHN and wait for SHST; a controller that does not finish is
    /// disabled, and one that cannot be disabled is cut off the bus.
    fn shutdown(self: Arc<Self>, done: Box<dyn FnOnce(Result<(), NvmeError>) + Send>) {
        if self.dma_stopped() {
            return self.shut(Ok(()), true, done);
        }
        let cc = Cc(self.regs.read32(offset::CC));
        if !cc.en() || cc.0 == u32::MAX {
            let stopped = cc.0 != u32::MAX || self.regs.stop_dma();
            return self.shut(Ok(()), stopped, done);
        }
        self.regs.write32(offset::CC, cc.with_shn(shutdown::SHN_NORMAL).0);
        let bound = timeout_ms(self.cap).max(1000);
        let dev = self.regs.describe();
        wait_csts_then(
            self.regs.clone(),
            bound,
            |s| s.shst() == shutdown::SHST_COMPLETE,
            move |r| {
                let Err((_, waited_ms)) = r else {
                    return self.shut(Ok(()), true, done);
                };
                tracing::warn!(dev, waited_ms, "shutdown did not complete; disabling");
                let result = Err(NvmeError::ShutdownTimeout { dev, waited_ms });
                let c = self.clone();
                disable_then(self.regs.clone(), self.cap, move |r| {
                    let stopped = r.is_ok() || c.regs.stop_dma();
                    c.shut(result, stopped, done)
                });
            },
        );
    }

    /// The end of detach: with DMA `stopped`, every reactor drops its queue
    /// pair (its memory goes) and the admin memory is freed; without, all of
    /// it stays pinned forever.
    fn shut(
        self: Arc<Self>,
        result: Result<(), NvmeError>,
        stopped: bool,
        done: Box<dyn FnOnce(Result<(), NvmeError>) + Send>,
    ) {
        self.end_admin("detached");
        self.dma_stopped.store(stopped, Ordering::Release);
        self.set_state(if stopped { CtrlrState::Detached } else { CtrlrState::Failed });
        if stopped && self.uses_interrupts() && !self.is_removed() {
            // Before the queue pairs (and their eventfds) go.
            self.regs.disable_interrupts();
        }
        let c = self.clone();
        reactor::for_each_reactor(Arc::new(move || qpair::drop_local(&c)), move || {
            drop_home_entry(self.id, !stopped, &self.stats);
            if stopped {
                tracing::info!(ctrlr = %self.name, "NVMe controller shut down");
            } else {
                tracing::error!(ctrlr = %self.name, "cannot stop DMA; controller memory stays pinned");
            }
            done(result)
        });
    }

    /// The SMART / health critical warning bits (log page 02h byte 0) the
    /// controller last reported; 0 when none.
    pub fn critical_warning(&self) -> u8 {
        self.critical_warning.load(Ordering::Relaxed)
    }

    /// Arms asynchronous events once the bdevs exist (home reactor).
    pub(crate) fn start_events(self: &Arc<Self>) {
        self.events_on.store(true, Ordering::Release);
        self.arm_events();
    }

    /// Asynchronous Event Configuration (SMART critical warnings, and
    /// namespace attribute notices when the controller has them), then the
    /// Asynchronous Event Requests kept outstanding.
    fn arm_events(self: &Arc<Self>) {
        let d = self.data();
        let mut value = async_event_config::SMART_MASK;
        if d.oaes & nvme_spec::identify::oaes::NAMESPACE_ATTRIBUTE != 0 {
            value |= async_event_config::NAMESPACE_ATTRIBUTE_NOTICES;
        }
        let mut sqe = Sqe::new(AdminOpcode::SET_FEATURES.0, 0);
        FeatureParams { fid: FeatureId::ASYNC_EVENT_CONFIG, save: false, select: 0, value }.write_to(&mut sqe);
        let n = MAX_AERS.min(d.aerl as usize + 1);
        let c = self.clone();
        self.admin(
            sqe,
            None,
            "set features (asynchronous event configuration)",
            Box::new(move |r| match r {
                Ok(_) | Err(NvmeError::AdminFailed { .. }) => {
                    if let Err(e) = r {
                        tracing::warn!(ctrlr = %c.name, "{e}; asynchronous events as the controller defaults them");
                    }
                    (0..n).for_each(|_| c.submit_aer());
                }
                Err(e) => tracing::warn!(ctrlr = %c.name, "asynchronous events not armed: {e}"),
            }),
        );
    }

    /// One Asynchronous Event Request: no deadline (it completes when
    /// something happens); re-armed as it completes.
    fn submit_aer(self: &Arc<Self>) {
        let c = self.clone();
        self.admin_with_timeout(
            Sqe::new(AdminOpcode::ASYNC_EVENT_REQUEST.0, 0),
            None,
            "asynchronous event request",
            u64::MAX,
            Box::new(move |r| match r {
                Ok(cqe) => {
                    c.stats.async_events.fetch_add(1, Ordering::Relaxed);
                    c.submit_aer();
                    c.async_event(AsyncEvent::from_dword(cqe.dw0.get()));
                }
                Err(NvmeError::AdminFailed { status, .. }) => {
                    tracing::warn!(ctrlr = %c.name, ?status, "asynchronous event request refused")
                }
                // A reset or detach ended it; a reset arms events anew.
                Err(_) => {}
            }),
        );
    }

    fn async_event(self: &Arc<Self>, ev: AsyncEvent) {
        tracing::info!(ctrlr = %self.name, ?ev, "asynchronous event");
        match ev.event_type {
            async_event_type::NOTICE if ev.info == async_event_notice::NAMESPACE_ATTRIBUTE_CHANGED => {
                self.namespaces_changed()
            }
            async_event_type::SMART_HEALTH => self.read_health(),
            _ => tracing::warn!(ctrlr = %self.name, ?ev, "asynchronous event not handled"),
        }
    }

    /// Get Log Page `lid` into `buf` (its log page event is re-armed by the
    /// read: RAE 0).
    fn get_log_page(self: &Arc<Self>, lid: LogPageId, len: usize, buf: DmaBuf, done: AdminDone) {
        let mut sqe = Sqe::new(AdminOpcode::GET_LOG_PAGE.0, 0);
        GetLogPageParams { lid, lsp: 0, rae: false, len_bytes: len as u64, offset_bytes: 0, lsi: 0, nsid: u32::MAX }
            .write_to(&mut sqe);
        self.admin(sqe, Some(buf), "get log page", done);
    }

    /// Namespace attribute changed: the Changed Namespace List (which the
    /// controller wants read), then the active namespaces anew, compared
    /// with what the driver serves.
    fn namespaces_changed(self: &Arc<Self>) {
        let Some(buf) = DmaBuf::zeroed(IDENTIFY_DATA_LEN) else {
            return tracing::error!(ctrlr = %self.name, "namespace change: no memory for the log page");
        };
        let c = self.clone();
        self.get_log_page(
            LogPageId::CHANGED_NAMESPACE_LIST,
            IDENTIFY_DATA_LEN,
            buf.clone(),
            Box::new(move |r| {
                if let Err(e) = r {
                    return tracing::error!(ctrlr = %c.name, "namespace change: {e}");
                }
                let raw = read_identify(&buf);
                if let Ok(list) = NamespaceList::read_from_bytes(&raw[..]) {
                    let ids: Vec<u32> = list.iter().collect();
                    let overflow = ids.first() == Some(&CHANGED_NS_LIST_OVERFLOW);
                    tracing::info!(ctrlr = %c.name, changed = ?ids, overflow, "namespaces changed");
                }
                let c2 = c.clone();
                scan_namespaces(
                    &c,
                    buf,
                    c.data().nn.max(1024),
                    Box::new(move |r| match r {
                        Ok(found) => c2.apply_namespaces(found),
                        Err(e) => tracing::error!(ctrlr = %c2.name, "namespace rescan: {e}"),
                    }),
                );
            }),
        );
    }

    fn apply_namespaces(self: &Arc<Self>, mut found: Vec<Namespace>) {
        let use_sgl = self.uses_sgl();
        for ns in &mut found {
            ns.max_io_blocks = max_io_blocks(self.data(), use_sgl, ns.block_size);
        }
        found.sort_by_key(|n| n.nsid);
        let old = std::mem::replace(&mut *lock_home(&self.namespaces), found.clone());
        let mut changes = Vec::new();
        for ns in &found {
            match old.iter().find(|o| o.nsid == ns.nsid) {
                None => changes.push(NamespaceChange::Added(ns.clone())),
                // A new LBA format is a different device to every holder
                // (offsets and buffer sizes change meaning): not a resize.
                Some(o) if o.block_size != ns.block_size => tracing::error!(
                    ctrlr = %self.name,
                    nsid = ns.nsid,
                    old_block_size = o.block_size,
                    new_block_size = ns.block_size,
                    "namespace reformatted with another block size; its bdev keeps the old geometry \
                     (detach and attach the controller to use the new one)"
                ),
                Some(o) if o.num_blocks != ns.num_blocks => changes.push(NamespaceChange::Resized {
                    nsid: ns.nsid,
                    old_blocks: o.num_blocks,
                    new_blocks: ns.num_blocks,
                }),
                Some(_) => {}
            }
        }
        for o in old.iter().filter(|o| !found.iter().any(|n| n.nsid == o.nsid)) {
            changes.push(NamespaceChange::Removed(o.nsid));
        }
        for ch in changes {
            crate::namespace_changed(self, ch);
        }
    }

    /// A SMART / health event: the log page tells the critical warnings.
    fn read_health(self: &Arc<Self>) {
        let Some(buf) = DmaBuf::zeroed(prp::PAGE_SIZE as usize) else {
            return tracing::error!(ctrlr = %self.name, "health event: no memory for the log page");
        };
        let c = self.clone();
        self.get_log_page(
            LogPageId::SMART_HEALTH,
            512,
            buf.clone(),
            Box::new(move |r| {
                if let Err(e) = r {
                    return tracing::error!(ctrlr = %c.name, "health event: {e}");
                }
                let mut raw = [0u8; 512];
                DeviceMem::of(&buf).read_bytes(0, &mut raw);
                let Ok(log) = SmartLog::read_from_bytes(&raw[..]) else { return };
                c.critical_warning.store(log.critical_warning, Ordering::Relaxed);
                if log.critical_warning != 0 {
                    tracing::error!(
                        ctrlr = %c.name,
                        critical_warning = format_args!("{:#04x}", log.critical_warning),
                        temperature_k = log.temperature.get(),
                        available_spare = log.available_spare,
                        "NVMe controller reports a critical warning"
                    );
                }
            }),
        );
    }

    /// Whether the device was found gone (surprise removal).
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// The device is gone (its registers read all ones) or is being taken
    /// away (the platform asked for it back: a hot-unplug waiting for us):
    /// nothing touches it any more, every admin command and every in-flight
    /// or queued IO ends (IO with `NoDevice`), the device is released once
    /// every reactor has stopped using it, and the controller is detached,
    /// which hot-removes its bdevs. Home reactor.
    fn device_removed(self: &Arc<Self>, how: Removal) {
        if self.removed.swap(true, Ordering::AcqRel) {
            return;
        }
        match how {
            Removal::Gone => {
                tracing::error!(ctrlr = %self.name, dev = %self.regs.describe(), "NVMe device removed (registers read all ones)")
            }
            Removal::Requested => {
                tracing::error!(ctrlr = %self.name, dev = %self.regs.describe(), "NVMe device being removed (the platform asked for it back)");
                // It still answers: no DMA from here on, before IO buffers
                // are released below.
                if !self.gate.stop_dma() {
                    tracing::error!(ctrlr = %self.name, "cannot clear bus mastering of a device being removed");
                }
            }
        }
        self.gate.cut_off();
        self.dma_stopped.store(true, Ordering::Release);
        self.set_state(CtrlrState::Failed);
        self.end_admin("removed");
        let c = self.clone();
        reactor::for_each_reactor(Arc::new(move || qpair::for_each_local(&c, |q| q.device_gone())), {
            let c = self.clone();
            move || {
                // Every reactor has seen the cut-off: no register access is
                // under way or to come.
                c.gate.release();
                crate::controller_removed(&c)
            }
        });
    }

    pub(crate) fn mark_detaching(&self) {
        self.detaching.store(true, Ordering::Release);
    }

    /// Keeps `p` until detach (a simulator's poller, say). Home reactor only.
    pub fn add_home_poller(&self, p: PollerHandle) {
        if let Some(e) = reactor::local::<HomeState>().0.borrow_mut().get_mut(&self.id) {
            e.pollers.push(p);
        }
    }

    /// `bdev_nvme_get_controllers` entry in SPDK's shape.
    pub fn info_json(&self) -> serde_json::Value {
        let d = self.data();
        serde_json::json!({
            "name": self.name,
            "ctrlrs": [{
                "state": self.state().name(),
                "trid": {"trtype": self.trid.trtype, "traddr": self.trid.traddr},
                "cntlid": d.cntlid,
                "host": {"nqn": "", "addr": "", "svcid": ""},
                "serial_number": d.serial,
                "model_number": d.model,
                "firmware_revision": d.firmware,
                "num_io_queues": self.io_queue_count(),
                "io_queue_depth": self.io_depth,
                "sgl": self.uses_sgl(),
                "interrupts": self.uses_interrupts(),
                "resets": self.stats.resets.load(Ordering::Relaxed),
                "io_timeouts": self.stats.io_timeouts.load(Ordering::Relaxed),
                "aborts": self.stats.aborts_sent.load(Ordering::Relaxed),
                "async_events": self.stats.async_events.load(Ordering::Relaxed),
                "critical_warning": self.critical_warning(),
                "removed": self.is_removed(),
            }],
        })
    }
}

/// Reset, step 1 (home): every reactor stops touching its queue pair.
fn reset_quiesce(ctrlr: Arc<Controller>) {
    let c = ctrlr.clone();
    reactor::for_each_reactor(Arc::new(move || qpair::for_each_local(&c, |q| q.quiesce())), move || {
        reset_disable(ctrlr)
    });
}

/// Reset, step 2 (home): disable, which stops all DMA; every admin command
/// ends. A controller that will not disable is cut off the bus.
fn reset_disable(ctrlr: Arc<Controller>) {
    let c = ctrlr.clone();
    disable_then(ctrlr.regs.clone(), ctrlr.cap, move |r| {
        let disabled = r.is_ok();
        if matches!(r, Err(NvmeError::Gone(_))) {
            // Found gone by the reset: removal takes over.
            return c.device_removed(Removal::Gone);
        }
        if let Err(e) = &r {
            tracing::error!(ctrlr = %c.name, "reset: {e}");
            if !c.regs.stop_dma() {
                // Nothing in flight may be released: leave it all pinned.
                tracing::error!(ctrlr = %c.name, "cannot stop DMA; in-flight IO stays pinned forever");
                c.set_state(CtrlrState::Failed);
                c.end_admin("failed");
                return;
            }
        }
        c.dma_stopped.store(true, Ordering::Release);
        c.end_admin("resetting");
        if disabled && !c.is_detaching() {
            reset_enable(c)
        } else {
            reset_finish(c, false, Vec::new())
        }
    });
}

/// Reset, step 3 (home): enable, the number of queues again, then every
/// used IO queue id is created anew over its queue pair's memory.
fn reset_enable(ctrlr: Arc<Controller>) {
    let Some((asq, acq)) = ctrlr.with_admin(|aq| (aq.sq.iova(), aq.cq.iova())) else {
        return reset_finish(ctrlr, false, Vec::new());
    };
    let c = ctrlr.clone();
    enable_then(ctrlr.regs.clone(), ctrlr.cap, asq, acq, move |r| {
        if let Err(e) = r {
            tracing::error!(ctrlr = %c.name, "reset: {e}");
            return reset_give_up(c);
        }
        c.with_admin(|aq| aq.live = true);
        c.dma_stopped.store(false, Ordering::Release);
        let c2 = c.clone();
        c.admin(
            number_of_queues_sqe(c.io_queue_count()),
            None,
            "set features (number of queues)",
            Box::new(move |r| match r {
                Ok(_) => {
                    let used: Vec<(u16, QueueSlot)> = lock_home(&c2.queues)
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| matches!(s, QueueSlot::Used { .. }))
                        .map(|(i, s)| (i as u16, *s))
                        .collect();
                    reset_recreate(c2, used, Vec::new())
                }
                Err(e) => {
                    tracing::error!(ctrlr = %c2.name, "reset: {e}");
                    reset_give_up(c2)
                }
            }),
        );
    });
}

fn reset_recreate(ctrlr: Arc<Controller>, mut left: Vec<(u16, QueueSlot)>, mut made: Vec<(ReactorId, u16, bool)>) {
    let Some((qid, slot)) = left.pop() else {
        return reset_finish(ctrlr, true, made);
    };
    let QueueSlot::Used { reactor, sq_iova, cq_iova, irq, .. } = slot else {
        return reset_recreate(ctrlr, left, made);
    };
    let c = ctrlr.clone();
    ctrlr.create_io_queue(
        qid,
        sq_iova,
        cq_iova,
        irq,
        Box::new(move |r| {
            let ok = r.is_ok();
            if let Err(e) = r {
                tracing::error!(ctrlr = %c.name, qid, "reset: {e}");
            }
            if let Some(QueueSlot::Used { live, .. }) = lock_home(&c.queues).get_mut(qid as usize) {
                *live = ok;
            }
            made.push((reactor, qid, ok));
            reset_recreate(c, left, made)
        }),
    );
}

/// The controller did not come back: disable it (or cut it off) before
/// any IO is released.
fn reset_give_up(ctrlr: Arc<Controller>) {
    let c = ctrlr.clone();
    disable_then(ctrlr.regs.clone(), ctrlr.cap, move |r| {
        if r.is_err() && !c.regs.stop_dma() {
            tracing::error!(ctrlr = %c.name, "cannot stop DMA; in-flight IO stays pinned forever");
            c.set_state(CtrlrState::Failed);
            return;
        }
        c.dma_stopped.store(true, Ordering::Release);
        c.end_admin("failed");
        reset_finish(c, false, Vec::new())
    });
}

/// Reset, last step: every queue pair requeues or fails its in-flight IO
/// and learns whether its queue is back; creations that arrived meanwhile
/// go ahead (or fail with the controller).
fn reset_finish(ctrlr: Arc<Controller>, ok: bool, made: Vec<(ReactorId, u16, bool)>) {
    if !ok {
        for s in lock_home(&ctrlr.queues).iter_mut() {
            if let QueueSlot::Used { live, .. } = s {
                *live = false;
            }
        }
    }
    let made = Arc::new(made);
    let c = ctrlr.clone();
    reactor::for_each_reactor(
        Arc::new(move || {
            let here = reactor::current();
            let mine = made.iter().find(|m| Some(m.0) == here).map(|m| (m.1, m.2));
            qpair::for_each_local(&c, |q| q.after_reset(ok, mine))
        }),
        move || {
            ctrlr.stats.resets.fetch_add(1, Ordering::Relaxed);
            if ctrlr.is_removed() || ctrlr.state() == CtrlrState::Detached {
                return;
            }
            ctrlr.set_state(if ok { CtrlrState::Enabled } else { CtrlrState::Failed });
            tracing::warn!(ctrlr = %ctrlr.name, ok, "NVMe controller reset finished");
            if ok && ctrlr.events_on.load(Ordering::Acquire) {
                ctrlr.arm_events();
            }
            let deferred = std::mem::take(&mut *lock_home(&ctrlr.deferred));
            for req in deferred {
                ctrlr.create_queue_for(req);
            }
        },
    );
}

/// Maps an NVMe completion status to the bdev layer's error.
pub(crate) fn io_error(status: Status) -> bdev::IoError {
    use nvme_spec::status::sct;
    match status.sct {
        sct::MEDIA_AND_DATA_INTEGRITY => bdev::IoError::Media,
        _ if status == Status::LBA_OUT_OF_RANGE || status == Status::CAPACITY_EXCEEDED => bdev::IoError::OutOfRange,
        _ if status.sct == sct::GENERIC
            && (status.sc == Status::ABORT_REQUESTED.sc || status.sc == Status::ABORTED_SQ_DELETION.sc) =>
        {
            bdev::IoError::Aborted
        }
        _ => bdev::IoError::Nvme { sct: status.sct, sc: status.sc },
    }
}
