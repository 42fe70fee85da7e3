//! One NVMe controller: bring-up per the base spec (disable, admin queue
//! registers, enable, ready within CAP.TO), the admin queue (a mutex-guarded
//! control plane shared by all reactors), identify data and namespaces,
//! controller reset with IO retried, and orderly shutdown (CC.SHN).
//!
//! Memory the controller DMAs into is never released while it may still
//! write it (invariant 5, docs/architecture.md): the admin queue memory is freed only after the
//! controller is disabled or shut down, a data buffer of an admin command
//! that timed out is leaked on purpose, and a reset disables the controller
//! before any in-flight IO is retried or completed.

use crate::mmio::{DeviceMem, RegisterSpace};
use crate::prp;
use crate::qpair;
use crate::NvmeError;
use bdev::DmaBuf;
use nvme_spec::features::{select, FeatureId, FeatureParams, NumberOfQueues, VWC_ENABLE};
use nvme_spec::identify::{
    Cns, IdentifyController, IdentifyNamespace, IdentifyParams, NamespaceList, IDENTIFY_DATA_LEN,
};
use nvme_spec::regs::{cap_css, doorbell_offset, offset, shutdown, Aqa, Cap, Cc, Csts, Vs};
use nvme_spec::{AdminOpcode, Cqe, Sqe, Status, U16, U32, U64};
use reactor::{PollStatus, PollerHandle, ReactorId};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use zerocopy::FromBytes;

/// Admin queue entries (SQ and CQ).
pub const ADMIN_QUEUE_DEPTH: u16 = 32;
/// PRP list pages per IO command slot: two chained pages, so one command
/// moves up to 4 MiB with 4 KiB pages at any buffer alignment.
pub const PRP_LIST_PAGES: usize = 2;
/// Aborts outstanding at once (ACL is at least 1; we use at most this).
const MAX_ASYNC_ABORTS: usize = 4;

/// Tunables of one controller (SPDK's `bdev_nvme_set_options` subset).
#[derive(Clone, Debug)]
pub struct CtrlrOpts {
    /// Entries per IO queue (clamped to CAP.MQES + 1 and 2..=1024).
    pub io_queue_depth: u16,
    /// An IO older than this is aborted; after twice this, the controller is
    /// reset. 0 disables IO timeouts.
    pub io_timeout_us: u64,
    /// Bound on each synchronous admin command.
    pub admin_timeout_ms: u64,
    /// Describe data with one SGL data block when the controller has SGLs.
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
            prefer_sgl: false,
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
}

/// The admin queue: host-side ring state. Its memory is owned by the home
/// reactor (`HomeState`); the views here stay valid until detach.
struct AdminQueue {
    sq: DeviceMem,
    cq: DeviceMem,
    sq_tail: u16,
    cq_head: u16,
    phase: bool,
    next_cid: u16,
    /// Outstanding Abort commands: (cid, sqid, io cid, deadline on the
    /// reactor clock).
    aborts: Vec<(u16, u16, u16, u64)>,
    live: bool,
}

impl AdminQueue {
    fn new(sq: DeviceMem, cq: DeviceMem) -> Self {
        AdminQueue {
            sq,
            cq,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
            next_cid: 0,
            aborts: Vec::with_capacity(MAX_ASYNC_ABORTS),
            live: false,
        }
    }

    fn reset(&mut self) {
        self.cq.zero();
        self.sq_tail = 0;
        self.cq_head = 0;
        self.phase = true;
        self.aborts.clear();
    }

    fn alloc_cid(&mut self) -> u16 {
        loop {
            self.next_cid = self.next_cid.wrapping_add(1);
            let c = self.next_cid;
            if c != 0xFFFF && !self.aborts.iter().any(|a| a.0 == c) {
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

/// A controller. Shared by every reactor (`Arc`); IO goes through the
/// per-reactor queue pairs of `qpair`.
pub struct Controller {
    pub(crate) id: u64,
    name: String,
    trid: TransportId,
    pub(crate) regs: Arc<dyn RegisterSpace>,
    cap: Cap,
    vs: Vs,
    pub(crate) opts: CtrlrOpts,
    data: ControllerData,
    namespaces: Vec<Namespace>,
    pub(crate) io_depth: u16,
    pub(crate) use_sgl: bool,
    io_queues: u16,
    qids: Mutex<Vec<bool>>,
    admin: Mutex<AdminQueue>,
    state: AtomicU8,
    detaching: AtomicBool,
    /// An admin command timed out; the admin poller starts a reset.
    reset_wanted: AtomicBool,
    /// The controller is disabled or shut down (or bus mastering is off):
    /// it cannot write host memory, so queue memory may be released.
    dma_stopped: AtomicBool,
    pub(crate) home: ReactorId,
    pub stats: CtrlrStats,
    /// What must live as long as the controller (the VFIO device).
    _keep: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Memory and pollers of each controller, on its home reactor.
#[derive(Default)]
struct HomeState(RefCell<HashMap<u64, HomeEntry>>);

struct HomeEntry {
    _admin_sq: DmaBuf,
    _admin_cq: DmaBuf,
    pollers: Vec<PollerHandle>,
}

fn timeout_ms(cap: Cap) -> u64 {
    (cap.timeout_500ms().max(1) as u64) * 500
}

/// Polls CSTS until `done`, or CFS, or the CAP.TO-derived bound.
fn wait_csts(regs: &dyn RegisterSpace, bound_ms: u64, done: impl Fn(Csts) -> bool) -> Result<Csts, (Csts, u64)> {
    let start = regs.wait_clock_ns();
    loop {
        let csts = Csts(regs.read32(offset::CSTS));
        if csts.0 != u32::MAX && done(csts) {
            return Ok(csts);
        }
        let waited_ms = regs.wait_clock_ns().saturating_sub(start) / 1_000_000;
        if waited_ms >= bound_ms || (csts.0 != u32::MAX && csts.cfs()) {
            return Err((csts, waited_ms));
        }
        regs.relax();
    }
}

/// CC.EN = 0 and wait for CSTS.RDY = 0 (after letting an enable in
/// progress finish, as the spec asks).
fn disable(regs: &dyn RegisterSpace, cap: Cap) -> Result<(), NvmeError> {
    let dev = regs.describe();
    let bound = timeout_ms(cap);
    let cc = Cc(regs.read32(offset::CC));
    let csts = Csts(regs.read32(offset::CSTS));
    if csts.0 == u32::MAX {
        return Err(NvmeError::Gone(dev));
    }
    if cc.en() && !csts.rdy() && !csts.cfs() {
        let _ = wait_csts(regs, bound, |s| s.rdy());
    }
    if cc.en() {
        regs.write32(offset::CC, cc.with_en(false).with_shn(shutdown::SHN_NONE).0);
    }
    wait_csts(regs, bound, |s| !s.rdy())
        .map(|_| ())
        .map_err(|(_, waited_ms)| NvmeError::DisableTimeout { dev, waited_ms })
}

/// Programs the admin queue and enables the controller.
fn enable(regs: &dyn RegisterSpace, cap: Cap, asq: u64, acq: u64) -> Result<(), NvmeError> {
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
    match wait_csts(regs, bound, |s| s.rdy()) {
        Ok(_) => Ok(()),
        Err((csts, waited_ms)) => {
            // Leave it disabled: a controller that is not ready processes no
            // command, and after EN = 0 it will not start.
            regs.write32(offset::CC, cc.with_en(false).0);
            if csts.cfs() {
                Err(NvmeError::Fatal(dev))
            } else {
                Err(NvmeError::NotReady { dev, waited_ms, cap_to_ms: bound })
            }
        }
    }
}

/// The transport-specific part of an attach.
pub struct AttachTarget {
    pub regs: Arc<dyn RegisterSpace>,
    pub trid: TransportId,
    /// Kept alive with the controller (the VFIO device and its mapper).
    pub keep: Option<Box<dyn std::any::Any + Send>>,
}

impl Controller {
    /// Brings a controller up and identifies it. Runs on the calling reactor,
    /// which becomes the controller's home (admin poller, admin memory,
    /// reset orchestration). Blocks for at most CAP.TO plus the admin
    /// timeouts. On error nothing is left behind: admin memory is freed
    /// only once the controller is disabled, and no poller is registered.
    pub fn attach(name: &str, target: AttachTarget, opts: CtrlrOpts) -> Result<Arc<Controller>, NvmeError> {
        let home = reactor::current().ok_or_else(|| NvmeError::Invalid("attach must run on a reactor".into()))?;
        let regs = target.regs;
        let dev = regs.describe();
        let cap = Cap(regs.read64(offset::CAP));
        if cap.0 == u64::MAX {
            return Err(NvmeError::Gone(dev));
        }
        if cap.css() & cap_css::NVM == 0 {
            return Err(NvmeError::Unsupported(format!("{dev}: controller does not support the NVM command set")));
        }
        if cap.mpsmin() != 0 {
            return Err(NvmeError::Unsupported(format!(
                "{dev}: minimum memory page size {} KiB is not supported (4 KiB only)",
                4u32 << cap.mpsmin()
            )));
        }
        let vs = Vs(regs.read32(offset::VS));
        disable(regs.as_ref(), cap)?;

        let sq_bytes = ADMIN_QUEUE_DEPTH as usize * 64;
        let cq_bytes = ADMIN_QUEUE_DEPTH as usize * 16;
        let (Some(asq), Some(acq)) = (DmaBuf::zeroed(sq_bytes), DmaBuf::zeroed(cq_bytes)) else {
            return Err(NvmeError::NoMemory("admin queue".into()));
        };
        enable(regs.as_ref(), cap, asq.iova(), acq.iova())?;

        let mut aq = AdminQueue::new(DeviceMem::of(&asq), DeviceMem::of(&acq));
        aq.live = true;
        let depth = opts.io_queue_depth.clamp(2, 1024).min(cap.mqes().saturating_add(1).max(2));
        let ctrlr = Arc::new(Controller {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            trid: target.trid,
            regs,
            cap,
            vs,
            opts,
            data: ControllerData::default(),
            namespaces: Vec::new(),
            io_depth: depth,
            use_sgl: false,
            io_queues: 0,
            qids: Mutex::new(Vec::new()),
            admin: Mutex::new(aq),
            state: AtomicU8::new(CtrlrState::Enabled as u8),
            detaching: AtomicBool::new(false),
            reset_wanted: AtomicBool::new(false),
            dma_stopped: AtomicBool::new(false),
            home,
            stats: CtrlrStats::default(),
            _keep: Mutex::new(target.keep),
        });
        let identified = ctrlr.identify_all();
        let (data, namespaces, io_queues) = match identified {
            Ok(v) => v,
            Err(e) => {
                // Disable before the admin memory goes; if even that fails,
                // cut bus mastering, and if that fails too, leak the memory.
                let stopped = disable(ctrlr.regs.as_ref(), cap).is_ok() || ctrlr.regs.stop_dma();
                if stopped {
                    drop((asq, acq));
                } else {
                    ctrlr.stats.leaked_bytes.fetch_add((sq_bytes + cq_bytes) as u64, Ordering::Relaxed);
                    std::mem::forget((asq, acq));
                }
                return Err(e);
            }
        };
        // Only this function holds the Arc so far: fill in what identify found.
        let mut ctrlr =
            Arc::try_unwrap(ctrlr).map_err(|_| NvmeError::Invalid("controller shared during attach".into()))?;
        ctrlr.use_sgl = ctrlr.opts.prefer_sgl && data.sgls & 0b11 != 0;
        let mdts_bytes = if data.mdts == 0 { u64::MAX } else { prp::PAGE_SIZE << data.mdts.min(20) };
        let room_bytes = if ctrlr.use_sgl { 32 << 20 } else { prp::max_transfer_bytes(PRP_LIST_PAGES) };
        let max_xfer_bytes = mdts_bytes.min(room_bytes);
        ctrlr.namespaces = namespaces
            .into_iter()
            .map(|mut ns| {
                ns.max_io_blocks = (max_xfer_bytes / ns.block_size as u64).clamp(1, 65_536) as u32;
                ns
            })
            .collect();
        ctrlr.data = data;
        ctrlr.io_queues = io_queues;
        *ctrlr.qids.get_mut().unwrap_or_else(|e| e.into_inner()) = vec![false; io_queues as usize + 1];
        let ctrlr = Arc::new(ctrlr);

        let weak = Arc::downgrade(&ctrlr);
        let poller = reactor::register_poller("nvme_admin", move || match weak.upgrade() {
            Some(c) => c.poll_admin(),
            None => PollStatus::Done,
        });
        reactor::local::<HomeState>()
            .0
            .borrow_mut()
            .insert(ctrlr.id, HomeEntry { _admin_sq: asq, _admin_cq: acq, pollers: vec![poller] });
        tracing::info!(
            name,
            dev = %ctrlr.regs.describe(),
            model = %ctrlr.data.model,
            namespaces = ctrlr.namespaces.len(),
            io_queues,
            depth,
            "NVMe controller attached"
        );
        Ok(ctrlr)
    }

    /// Identify Controller, Set Features (number of queues), active
    /// namespace list, Identify Namespace for each.
    fn identify_all(&self) -> Result<(ControllerData, Vec<Namespace>, u16), NvmeError> {
        let buf = DmaBuf::zeroed(IDENTIFY_DATA_LEN).ok_or_else(|| NvmeError::NoMemory("identify buffer".into()))?;
        let raw = self.identify(&buf, Cns::CONTROLLER, 0)?;
        let id =
            IdentifyController::read_from_bytes(&raw[..]).map_err(|_| NvmeError::Invalid("identify data".into()))?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim_end_matches([' ', '\0']).to_string();
        let mut data = ControllerData {
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
            subnqn: text(&id.subnqn),
        };
        if id.sqes & 0xF > 6 || id.cqes & 0xF > 4 {
            return Err(NvmeError::Unsupported(format!(
                "{}: required queue entry sizes SQES {:#x} CQES {:#x} are not 64/16 bytes",
                self.regs.describe(),
                id.sqes,
                id.cqes
            )));
        }

        let wanted = if self.opts.io_queues > 0 { self.opts.io_queues } else { reactor::count().max(1) as u16 };
        let mut sqe = Sqe::new(AdminOpcode::SET_FEATURES.0, 0);
        FeatureParams {
            fid: FeatureId::NUMBER_OF_QUEUES,
            save: false,
            select: 0,
            value: NumberOfQueues { io_sqs: wanted as u32, io_cqs: wanted as u32 }.to_dword(),
        }
        .write_to(&mut sqe);
        let cqe = self.admin_sync(sqe, None, "set features (number of queues)")?;
        let granted = NumberOfQueues::from_dword(cqe.dw0.get());
        let io_queues = granted.io_sqs.min(granted.io_cqs).min(wanted as u32).min(1024) as u16;
        data.write_cache_enabled = data.vwc && self.write_cache_enabled();

        let mut nsids = Vec::new();
        if self.vs >= Vs::new(1, 1, 0) {
            let mut last = 0u32;
            loop {
                let raw = self.identify(&buf, Cns::ACTIVE_NAMESPACE_LIST, last)?;
                let list =
                    NamespaceList::read_from_bytes(&raw[..]).map_err(|_| NvmeError::Invalid("ns list".into()))?;
                let before = nsids.len();
                nsids.extend(list.iter().filter(|&id| id > last && id <= data.nn.max(id)));
                if nsids.len() - before < NamespaceList::CAPACITY {
                    break;
                }
                last = *nsids.last().unwrap_or(&u32::MAX);
            }
        } else {
            nsids.extend(1..=data.nn.min(1024));
        }
        let mut namespaces = Vec::new();
        for nsid in nsids {
            let raw = self.identify(&buf, Cns::NAMESPACE, nsid)?;
            let ns =
                IdentifyNamespace::read_from_bytes(&raw[..]).map_err(|_| NvmeError::Invalid("identify ns".into()))?;
            let Some(fmt) = ns.formatted_lba_format() else {
                continue;
            };
            let (Some(bs), nsze) = (fmt.block_size(), ns.nsze.get()) else {
                continue;
            };
            if nsze == 0 {
                continue;
            }
            if fmt.ms.get() != 0 {
                tracing::warn!(nsid, "namespace formatted with metadata is not supported; skipped");
                continue;
            }
            namespaces.push(Namespace {
                nsid,
                block_size: bs,
                num_blocks: nsze,
                nguid: ns.nguid,
                eui64: ns.eui64,
                max_io_blocks: 0,
                deallocated_reads_zeroes: ns.dlfeat & 0b111 == 0b001,
            });
        }
        Ok((data, namespaces, io_queues.max(1)))
    }

    /// Whether the present volatile write cache is enabled (Get Features,
    /// current value, DW0 bit 0). A controller that does not answer is taken
    /// to cache: claiming a cache costs a flush, denying one loses data.
    fn write_cache_enabled(&self) -> bool {
        let mut sqe = Sqe::new(AdminOpcode::GET_FEATURES.0, 0);
        FeatureParams { fid: FeatureId::VOLATILE_WRITE_CACHE, save: false, select: select::CURRENT, value: 0 }
            .write_to(&mut sqe);
        match self.admin_sync(sqe, None, "get features (volatile write cache)") {
            Ok(cqe) => cqe.dw0.get() & VWC_ENABLE != 0,
            Err(e) => {
                tracing::warn!(ctrlr = %self.name, "{e}; assuming the write cache is enabled");
                true
            }
        }
    }

    fn identify(&self, buf: &DmaBuf, cns: Cns, nsid: u32) -> Result<Vec<u8>, NvmeError> {
        let mut sqe = Sqe::new(AdminOpcode::IDENTIFY.0, 0);
        IdentifyParams { cns, cntid: 0, csi: 0, nsid }.write_to(&mut sqe);
        self.admin_sync(sqe, Some(buf), "identify")?;
        let mut out = vec![0u8; IDENTIFY_DATA_LEN];
        DeviceMem::of(buf).read_bytes(0, &mut out);
        Ok(out)
    }

    fn admin_lock(&self) -> MutexGuard<'_, AdminQueue> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn dstrd(&self) -> u8 {
        self.cap.dstrd()
    }

    /// Runs one admin command to completion (the calling reactor waits;
    /// control plane only). `data` is the command's buffer (one page at
    /// most); if the command times out the buffer is leaked, since the
    /// controller may still write it, and a reset is requested.
    pub(crate) fn admin_sync(&self, mut sqe: Sqe, data: Option<&DmaBuf>, what: &'static str) -> Result<Cqe, NvmeError> {
        let dev = self.regs.describe();
        if let Some(buf) = data {
            let (p1, p2) = prp::build(buf.iova(), buf.len() as u64, 0, 0, |_, _| ())
                .map_err(|e| NvmeError::Invalid(format!("admin buffer: {e:?}")))?;
            sqe.dptr.prp1 = U64::new(p1);
            sqe.dptr.prp2 = U64::new(p2);
        }
        let mut aq = self.admin_lock();
        if !aq.live {
            return Err(NvmeError::State(self.name.clone(), "not enabled"));
        }
        let cid = aq.alloc_cid();
        sqe.cid = U16::new(cid);
        aq.push(self.regs.as_ref(), self.dstrd(), &sqe);
        let start = self.regs.wait_clock_ns();
        loop {
            let mut found = None;
            let mut consumed = false;
            while let Some(cqe) = aq.pop() {
                consumed = true;
                if cqe.cid.get() == cid {
                    found = Some(cqe);
                    break;
                }
                self.async_completion(&mut aq, &cqe);
            }
            if consumed {
                self.regs.write32(doorbell_offset(0, true, self.dstrd()) as u32, aq.cq_head as u32);
            }
            if let Some(cqe) = found {
                let status = cqe.status();
                if !status.is_success() {
                    return Err(NvmeError::AdminFailed { dev, what, status });
                }
                return Ok(cqe);
            }
            let waited_ms = self.regs.wait_clock_ns().saturating_sub(start) / 1_000_000;
            if waited_ms >= self.opts.admin_timeout_ms {
                if let Some(buf) = data {
                    self.stats.leaked_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    std::mem::forget(buf.clone());
                }
                drop(aq);
                // The admin poller (which holds the Arc) starts the reset.
                self.reset_wanted.store(true, Ordering::Release);
                return Err(NvmeError::AdminTimeout { dev, what, waited_ms });
            }
            self.regs.relax();
        }
    }

    fn async_completion(&self, aq: &mut AdminQueue, cqe: &Cqe) {
        let cid = cqe.cid.get();
        match aq.aborts.iter().position(|a| a.0 == cid) {
            Some(i) => {
                let (_, sqid, io_cid, _) = aq.aborts.swap_remove(i);
                let aborted = cqe.status().is_success() && cqe.dw0.get() & 1 == 0;
                tracing::warn!(ctrlr = %self.name, sqid, cid = io_cid, aborted, "abort completed");
            }
            None => {
                self.stats.spurious_completions.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(ctrlr = %self.name, cid, "admin completion for no outstanding command");
            }
        }
    }

    /// Sends Abort for IO command `cid` of `sqid` without waiting. False
    /// when the admin queue is busy or the abort limit is reached (the
    /// caller tries again on its next scan).
    pub(crate) fn try_abort(&self, sqid: u16, io_cid: u16) -> bool {
        let Ok(mut aq) = self.admin.try_lock() else {
            return false;
        };
        let limit = MAX_ASYNC_ABORTS.min(self.data.acl as usize + 1);
        if !aq.live || aq.aborts.len() >= limit || self.state() != CtrlrState::Enabled {
            return false;
        }
        let cid = aq.alloc_cid();
        let mut sqe = Sqe::new(AdminOpcode::ABORT.0, cid);
        sqe.cdw10 = U32::new(sqid as u32 | ((io_cid as u32) << 16));
        let deadline = reactor::now_ns() + self.opts.io_timeout_us.max(1000) * 1000;
        aq.aborts.push((cid, sqid, io_cid, deadline));
        aq.push(self.regs.as_ref(), self.dstrd(), &sqe);
        self.stats.aborts_sent.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The home reactor's admin poller: async (abort) completions and their
    /// deadlines. Never blocks: a busy admin queue is tried next loop.
    fn poll_admin(self: &Arc<Self>) -> PollStatus {
        if self.reset_wanted.swap(false, Ordering::AcqRel) {
            self.request_reset("admin command timeout");
        }
        let Ok(mut aq) = self.admin.try_lock() else {
            return PollStatus::Idle;
        };
        if !aq.live || aq.aborts.is_empty() {
            return PollStatus::Idle;
        }
        let mut consumed = false;
        while let Some(cqe) = aq.pop() {
            consumed = true;
            self.async_completion(&mut aq, &cqe);
        }
        if consumed {
            self.regs.write32(doorbell_offset(0, true, self.dstrd()) as u32, aq.cq_head as u32);
        }
        let now = reactor::now_ns();
        let expired = aq.aborts.iter().any(|a| now > a.3);
        drop(aq);
        if expired {
            self.request_reset("abort command timeout");
        }
        if consumed {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    pub(crate) fn alloc_qid(&self) -> Option<u16> {
        let mut q = self.qids.lock().unwrap_or_else(|e| e.into_inner());
        let i = q.iter().skip(1).position(|used| !used)? + 1;
        q[i] = true;
        Some(i as u16)
    }

    pub(crate) fn free_qid(&self, qid: u16) {
        let mut q = self.qids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = q.get_mut(qid as usize) {
            *slot = false;
        }
    }

    /// Creates IO CQ and SQ `qid` on the controller.
    pub(crate) fn create_io_queue(&self, qid: u16, depth: u16, sq_iova: u64, cq_iova: u64) -> Result<(), NvmeError> {
        let mut sqe = Sqe::new(AdminOpcode::CREATE_IO_CQ.0, 0);
        sqe.dptr.prp1 = U64::new(cq_iova);
        sqe.cdw10 = U32::new(qid as u32 | ((depth as u32 - 1) << 16));
        sqe.cdw11 = U32::new(1); // physically contiguous, interrupts off
        self.admin_sync(sqe, None, "create IO completion queue")?;
        let mut sqe = Sqe::new(AdminOpcode::CREATE_IO_SQ.0, 0);
        sqe.dptr.prp1 = U64::new(sq_iova);
        sqe.cdw10 = U32::new(qid as u32 | ((depth as u32 - 1) << 16));
        sqe.cdw11 = U32::new(1 | ((qid as u32) << 16));
        if let Err(e) = self.admin_sync(sqe, None, "create IO submission queue") {
            let _ = self.delete_queue(AdminOpcode::DELETE_IO_CQ, qid);
            return Err(e);
        }
        Ok(())
    }

    pub(crate) fn delete_queue(&self, op: AdminOpcode, qid: u16) -> Result<(), NvmeError> {
        let mut sqe = Sqe::new(op.0, 0);
        sqe.cdw10 = U32::new(qid as u32);
        self.admin_sync(sqe, None, "delete IO queue").map(|_| ())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn trid(&self) -> &TransportId {
        &self.trid
    }

    pub fn data(&self) -> &ControllerData {
        &self.data
    }

    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
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
        self.use_sgl
    }

    pub fn io_queue_count(&self) -> u16 {
        self.io_queues
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
        let Some(here) = reactor::current() else {
            tracing::error!(ctrlr = %self.name, why, "reset requested off a reactor thread; ignored");
            self.set_state(CtrlrState::Enabled);
            return;
        };
        tracing::warn!(ctrlr = %self.name, why, "resetting NVMe controller");
        let me = self.clone();
        if here == self.home {
            reset_quiesce(me);
        } else {
            reactor::send(self.home, move || reset_quiesce(me));
        }
    }

    /// Detach: the caller (lib.rs) has unregistered the bdevs, so no
    /// channel and no IO remains unless someone still holds a channel.
    /// Shuts the controller down (CC.SHN, then wait for SHST), and frees the
    /// admin memory only once it cannot be written. Runs on the home reactor.
    pub(crate) fn shutdown(self: &Arc<Self>) -> Result<(), NvmeError> {
        let dev = self.regs.describe();
        let mut result = Ok(());
        if !self.dma_stopped() {
            let cc = Cc(self.regs.read32(offset::CC));
            if cc.en() {
                self.regs.write32(offset::CC, cc.with_shn(shutdown::SHN_NORMAL).0);
                let bound = timeout_ms(self.cap).max(1000);
                if let Err((_, waited_ms)) =
                    wait_csts(self.regs.as_ref(), bound, |s| s.shst() == shutdown::SHST_COMPLETE)
                {
                    tracing::warn!(dev, waited_ms, "shutdown did not complete; disabling");
                    result = Err(NvmeError::ShutdownTimeout { dev: dev.clone(), waited_ms });
                    if disable(self.regs.as_ref(), self.cap).is_err() && !self.regs.stop_dma() {
                        self.admin_lock().live = false;
                        self.set_state(CtrlrState::Failed);
                        // Cannot prove DMA stopped: keep the admin memory pinned.
                        if let Some(e) = reactor::local::<HomeState>().0.borrow_mut().remove(&self.id) {
                            e.pollers.iter().for_each(PollerHandle::unregister);
                            self.stats.leaked_bytes.fetch_add(ADMIN_QUEUE_DEPTH as u64 * 80, Ordering::Relaxed);
                            std::mem::forget(e);
                        }
                        return result;
                    }
                }
            }
        }
        self.dma_stopped.store(true, Ordering::Release);
        self.admin_lock().live = false;
        self.set_state(CtrlrState::Detached);
        if let Some(e) = reactor::local::<HomeState>().0.borrow_mut().remove(&self.id) {
            e.pollers.iter().for_each(PollerHandle::unregister);
        }
        tracing::info!(ctrlr = %self.name, "NVMe controller shut down");
        result
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
        serde_json::json!({
            "name": self.name,
            "ctrlrs": [{
                "state": self.state().name(),
                "trid": {"trtype": self.trid.trtype, "traddr": self.trid.traddr},
                "cntlid": self.data.cntlid,
                "host": {"nqn": "", "addr": "", "svcid": ""},
                "serial_number": self.data.serial,
                "model_number": self.data.model,
                "firmware_revision": self.data.firmware,
                "num_io_queues": self.io_queues,
                "io_queue_depth": self.io_depth,
                "sgl": self.use_sgl,
                "resets": self.stats.resets.load(Ordering::Relaxed),
                "io_timeouts": self.stats.io_timeouts.load(Ordering::Relaxed),
                "aborts": self.stats.aborts_sent.load(Ordering::Relaxed),
            }],
        })
    }
}

/// Reset, step 1 (home): every reactor stops touching its queue pair.
fn reset_quiesce(ctrlr: Arc<Controller>) {
    let c = ctrlr.clone();
    reactor::for_each_reactor(Arc::new(move || qpair::for_each_local(&c, |q| q.quiesce())), move || {
        reset_restart(ctrlr)
    });
}

/// Reset, step 2 (home): disable — which stops all DMA — then re-enable and
/// let every queue pair requeue its in-flight IO and recreate its queue.
fn reset_restart(ctrlr: Arc<Controller>) {
    let regs = ctrlr.regs.as_ref();
    let disabled = disable(regs, ctrlr.cap);
    if let Err(e) = &disabled {
        tracing::error!(ctrlr = %ctrlr.name, "reset: {e}");
        if !regs.stop_dma() {
            // Nothing in flight may be released: leave it all pinned.
            tracing::error!(ctrlr = %ctrlr.name, "cannot stop DMA; in-flight IO stays pinned forever");
            ctrlr.admin_lock().live = false;
            ctrlr.set_state(CtrlrState::Failed);
            return;
        }
    }
    ctrlr.dma_stopped.store(true, Ordering::Release);
    let ok = disabled.is_ok() && !ctrlr.is_detaching() && {
        let asq_acq = {
            let mut aq = ctrlr.admin_lock();
            aq.reset();
            aq.live = false;
            (aq.sq.iova(), aq.cq.iova())
        };
        match enable(regs, ctrlr.cap, asq_acq.0, asq_acq.1) {
            Ok(()) => {
                ctrlr.admin_lock().live = true;
                ctrlr.dma_stopped.store(false, Ordering::Release);
                let mut sqe = Sqe::new(AdminOpcode::SET_FEATURES.0, 0);
                FeatureParams {
                    fid: FeatureId::NUMBER_OF_QUEUES,
                    save: false,
                    select: 0,
                    value: NumberOfQueues { io_sqs: ctrlr.io_queues as u32, io_cqs: ctrlr.io_queues as u32 }.to_dword(),
                }
                .write_to(&mut sqe);
                match ctrlr.admin_sync(sqe, None, "set features (number of queues)") {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::error!(ctrlr = %ctrlr.name, "reset: {e}");
                        false
                    }
                }
            }
            Err(e) => {
                tracing::error!(ctrlr = %ctrlr.name, "reset: {e}");
                false
            }
        }
    };
    if !ok && !ctrlr.dma_stopped() {
        let _ = disable(regs, ctrlr.cap).is_ok() || regs.stop_dma();
        ctrlr.dma_stopped.store(true, Ordering::Release);
        ctrlr.admin_lock().live = false;
    }
    let c = ctrlr.clone();
    reactor::for_each_reactor(Arc::new(move || qpair::for_each_local(&c, |q| q.after_reset(ok))), move || {
        ctrlr.stats.resets.fetch_add(1, Ordering::Relaxed);
        ctrlr.set_state(if ok { CtrlrState::Enabled } else { CtrlrState::Failed });
        tracing::warn!(ctrlr = %ctrlr.name, ok, "NVMe controller reset finished");
    });
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
