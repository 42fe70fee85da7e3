//! A seeded, in-process model of an NVMe PCIe controller behind the same
//! `RegisterSpace` and queue memory the driver uses with real hardware: it
//! fetches SQEs from host memory, walks PRPs and PRP lists (and SGL data
//! blocks), reads and writes RAM-backed namespaces, and posts CQEs with
//! phase tags. It reaches host memory only through its IOMMU model
//! (`DmaWindow`, fed by `bdev::dma` like a VFIO container), so a bad address
//! from the driver is a counted DMA fault, never a wild access.
//!
//! It does nothing by itself: `step()` (from a test, a reactor poller, or
//! the driver's busy-wait `relax`) advances it by one tick, so a seed plus
//! a step sequence replays exactly. Faults on demand: completion delays and
//! reordering, injected media errors, swallowed commands (a controller that
//! stops answering), refused aborts, and a controller that never becomes
//! ready.
//!
//! Namespaces change at run time (`resize_namespace`, `add_namespace`,
//! `remove_namespace`) and a SMART critical warning can be raised
//! (`set_critical_warning`); the model tells the host with Asynchronous
//! Event Requests it holds (up to AERL + 1) and the Changed Namespace List
//! (04h) and SMART / Health (02h) log pages, as the Asynchronous Event
//! Configuration feature (0Bh) enables them. An event of a kind already
//! reported is not sent again until the host reads its log page.
//!
//! Surprise removal (`surprise_remove`): the device vanishes mid-IO — BAR0
//! reads return all ones, writes go nowhere, nothing more is fetched,
//! completed or written to host memory — and every register access after
//! it is counted (`accesses_after_removal`). Removal on request
//! (`request_removal`), as a hot-unplug under VFIO does it: the platform
//! asks for the device back and waits; the device keeps working until the
//! driver releases it (`is_released`), and only then is it gone.
//!
//! Its volatile write cache is modelled: with the cache present and enabled,
//! a write without FUA is visible to reads at once but reaches the medium
//! (`read_media`, what a power cut would leave) only with a Flush of its
//! namespace, a later FUA write of the same blocks, or a normal shutdown.

use crate::mmio::{DmaWindow, RegisterSpace};
use crate::prp::PAGE_SIZE;
use bdev::dma::DmaMapper;
use bdev::rng::SimRng;
use nvme_spec::cmd::{sgl_subtype, sgl_type};
use nvme_spec::features::{async_event_config as aec, async_event_notice, async_event_type, AsyncEvent, FeatureId};
use nvme_spec::identify::{Cns, IdentifyController, IdentifyNamespace, LbaFormat, NamespaceList, IDENTIFY_DATA_LEN};
use nvme_spec::log::{GetLogPageParams, LogPageId, SmartLog, CHANGED_NS_LIST_OVERFLOW};
use nvme_spec::regs::{offset, shutdown, Aqa, Cap, Cc, Csts, Vs};
use nvme_spec::status::sct;
use nvme_spec::{AdminOpcode, Cqe, IoOpcode, SglDescriptor, Sqe, Status, U16, U32, U64};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use zerocopy::{FromBytes, IntoBytes};

/// Simulated time per `relax()` call of a busy-wait loop.
pub const RELAX_NS: u64 = 10_000;
/// Identify AERL: Asynchronous Event Requests held at once, 0's based.
const AERL: u8 = 3;

/// One namespace of the model.
#[derive(Clone, Debug)]
pub struct SimNamespace {
    pub num_blocks: u64,
    pub block_size: u32,
}

/// What the model looks like and how it misbehaves.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub namespaces: Vec<SimNamespace>,
    /// Identify MDTS (power of two in 4 KiB pages; 0 = no limit).
    pub mdts: u8,
    /// CAP.MQES: largest queue, 0's based.
    pub mqes: u16,
    /// IO queue pairs the controller grants.
    pub max_io_queues: u16,
    /// CAP.DSTRD.
    pub dstrd: u8,
    /// CAP.TO, 500 ms units.
    pub timeout_500ms: u8,
    /// Steps between CC.EN=1 and CSTS.RDY=1.
    pub ready_delay_steps: u32,
    /// Never becomes ready.
    pub fail_ready: bool,
    /// IO completions are delayed 0..=this many steps (seeded).
    pub max_delay_steps: u32,
    /// Due completions are posted in a seeded random order.
    pub reorder: bool,
    /// One IO in this many fails with a media error (0: never).
    pub error_one_in: u32,
    /// Report SGL support: data block descriptors, in the command or in
    /// segment lists (Segment and Last Segment descriptors), checked to the
    /// spec's rules.
    pub sgl: bool,
    /// SGLs with dword granularity (SGLS 10b): every data block's address
    /// and length a multiple of 4.
    pub sgl_dword_granular: bool,
    /// Loopback: every IO command completes at once with success and moves
    /// no data (media of infinite speed), so what a benchmark measures is
    /// the driver's own cost per IO.
    pub loopback: bool,
    /// MSI-X vectors (interrupt mode): a completion queue created with
    /// interrupts enabled signals its vector's eventfd once per posted entry.
    pub msix_vectors: u16,
    /// A volatile write cache is present (Identify VWC bit 0).
    pub vwc: bool,
    /// The cache starts enabled (Get Features Volatile Write Cache answers
    /// this until a Set Features changes it).
    pub write_cache_enabled: bool,
    /// Identify Namespace DLFEAT (bits 2:0 = 001b: deallocated blocks read
    /// as zeroes; the model always zeroes them).
    pub dlfeat: u8,
    pub serial: String,
    pub model: String,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            namespaces: vec![SimNamespace { num_blocks: 8192, block_size: 512 }],
            mdts: 5,
            mqes: 1023,
            max_io_queues: 8,
            dstrd: 0,
            timeout_500ms: 2,
            ready_delay_steps: 3,
            fail_ready: false,
            max_delay_steps: 0,
            reorder: false,
            error_one_in: 0,
            sgl: false,
            sgl_dword_granular: false,
            loopback: false,
            msix_vectors: 9,
            vwc: true,
            write_cache_enabled: true,
            dlfeat: 1,
            serial: "SIM0001".into(),
            model: "nvraid simulated controller".into(),
        }
    }
}

/// Counters a test checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    pub admin_commands: u64,
    pub io_commands: u64,
    pub completions: u64,
    /// DMA to an address outside every mapped arena (an IOMMU fault).
    pub dma_faults: u64,
    /// Controller resets (CC.EN 1 → 0).
    pub resets: u64,
    pub aborts_performed: u64,
    pub aborts_refused: u64,
    pub shutdowns: u64,
    pub injected_errors: u64,
    /// Doorbell writes to queues that do not exist, or beyond the ring.
    pub bad_doorbells: u64,
    /// Largest transfer seen in one command, bytes.
    pub max_transfer_bytes: u64,
    /// Commands whose PRP2 pointed at a list that chained to a second page.
    pub chained_prp_lists: u64,
    pub sgl_commands: u64,
    /// SGL commands whose data was described by segment lists.
    pub sgl_segment_lists: u64,
    pub io_queues_created: u64,
    pub io_queues_deleted: u64,
    /// Write commands fetched with FUA (CDW12 bit 30) set.
    pub fua_writes: u64,
    /// Write Zeroes commands fetched with FUA set.
    pub fua_write_zeroes: u64,
    /// Flush commands executed (each names one valid namespace).
    pub flushes: u64,
    /// Read/write/write-zeroes commands with PRINFO (CDW12 bits 29:26) set:
    /// protection information actions on namespaces that have none.
    pub prinfo_commands: u64,
    /// Asynchronous events reported (AER completions).
    pub async_events: u64,
    /// Get Log Page commands served.
    pub log_pages_read: u64,
    /// MSI-X messages sent (an eventfd signalled for a posted completion).
    pub interrupts: u64,
}

struct SimSq {
    base: u64,
    size: u32,
    head: u32,
    cqid: u16,
}

struct SimCq {
    base: u64,
    size: u32,
    tail: u32,
    phase: bool,
    /// Interrupts enabled (IEN) on this vector (IV).
    vector: Option<u16>,
}

/// An IO command fetched and not yet completed.
struct InFlight {
    sqid: u16,
    sqe: Sqe,
    due_step: u64,
    /// Held forever (until a reset): the "stops answering" fault.
    swallowed: bool,
    /// Host memory the command transfers to or from.
    segments: Vec<(u64, usize)>,
}

struct State {
    cc: Cc,
    csts: Csts,
    aqa: Aqa,
    asq: u64,
    acq: u64,
    ready_in_steps: Option<u32>,
    sqs: Vec<Option<SimSq>>,
    cqs: Vec<Option<SimCq>>,
    inflight: Vec<InFlight>,
    /// Completions waiting for CQ room: (cqid, sqid, cqe).
    backlog: Vec<(u16, Cqe)>,
    ns: Vec<Vec<u8>>,
    rng: SimRng,
    step: u64,
    swallow_io: u32,
    abort_works: bool,
    unresponsive: bool,
    ignore_disable: bool,
    stats: SimStats,
    last_asq_acq: (u64, u64),
    /// Volatile write cache enabled (feature 06h).
    write_cache_enabled: bool,
    /// Blocks written but not yet on the medium: (namespace index, LBA) →
    /// what the medium still holds there.
    unsynced: BTreeMap<(usize, u64), Vec<u8>>,
    /// From now on, an enable never becomes ready (`SimConfig::fail_ready`
    /// at run time).
    fail_ready: bool,
    /// Namespace `i + 1`, None once removed.
    namespaces: Vec<Option<SimNamespace>>,
    /// Asynchronous Event Requests held (their commands).
    aers: Vec<Sqe>,
    /// Events waiting for an AER (completion DW0).
    events: std::collections::VecDeque<u32>,
    /// Asynchronous Event Configuration (feature 0Bh).
    aec: u32,
    /// Namespaces changed since the host last read log page 04h.
    changed_ns: Vec<u32>,
    /// A SMART event was reported and its log page not read since.
    smart_masked: bool,
    critical_warning: u8,
    /// MSI-X enabled by the host, and where each vector is routed (the
    /// PCI function's state: a controller reset leaves it as it is).
    msix_enabled: bool,
    msix_routes: Vec<Option<Arc<reactor::EventFd>>>,
}

/// The simulated controller. Share it as `Arc<SimController>`; hand it to
/// the driver as its `RegisterSpace`.
pub struct SimController {
    cfg: SimConfig,
    doorbells: Vec<AtomicU32>,
    state: Mutex<State>,
    window: Arc<DmaWindow>,
    mapper: Arc<dyn DmaMapper>,
    clock_ns: AtomicU64,
    /// Surprise-removed: registers read all ones, the model does nothing.
    gone: AtomicBool,
    accesses_after_removal: AtomicU64,
    /// The platform asked for the device back (`request_removal`).
    removal_request: AtomicBool,
    /// The driver let go of it after such a request.
    released: AtomicBool,
    /// Stepped by `step_on_thread`, not by its reactor poller.
    own_thread: AtomicBool,
}

/// The model's own stepping thread; stops when dropped.
pub struct SimThread {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SimThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl SimController {
    /// A powered-on, disabled controller. Registers its IOMMU model with
    /// `bdev::dma` (every existing and future DMA arena is mapped into it).
    pub fn new(mut cfg: SimConfig) -> Result<Arc<Self>, String> {
        cfg.max_io_queues = cfg.max_io_queues.clamp(1, 1024);
        cfg.mqes = cfg.mqes.max(1);
        let mut ns = Vec::new();
        for n in &cfg.namespaces {
            if !n.block_size.is_power_of_two() || n.block_size < 512 {
                return Err(format!("simulated block size {} is not a power of two >= 512", n.block_size));
            }
            let bytes = n
                .num_blocks
                .checked_mul(n.block_size as u64)
                .and_then(|b| usize::try_from(b).ok())
                .filter(|&b| b > 0 && b <= 1 << 32)
                .ok_or_else(|| {
                    format!("simulated namespace of {} blocks must hold between 1 block and 4 GiB", n.num_blocks)
                })?;
            ns.push(vec![0u8; bytes]);
        }
        let window = Arc::new(DmaWindow::default());
        let mapper: Arc<dyn DmaMapper> = window.clone();
        bdev::dma::register_mapper(mapper.clone())?;
        let queues = cfg.max_io_queues as usize + 1;
        let rng = SimRng::new(cfg.seed);
        Ok(Arc::new(SimController {
            doorbells: (0..2 * queues).map(|_| AtomicU32::new(0)).collect(),
            state: Mutex::new(State {
                cc: Cc(0),
                csts: Csts(0),
                aqa: Aqa(0),
                asq: 0,
                acq: 0,
                ready_in_steps: None,
                sqs: (0..queues).map(|_| None).collect(),
                cqs: (0..queues).map(|_| None).collect(),
                inflight: Vec::new(),
                backlog: Vec::new(),
                ns,
                rng,
                step: 0,
                swallow_io: 0,
                abort_works: true,
                unresponsive: false,
                ignore_disable: false,
                stats: SimStats::default(),
                last_asq_acq: (0, 0),
                write_cache_enabled: cfg.vwc && cfg.write_cache_enabled,
                unsynced: BTreeMap::new(),
                fail_ready: false,
                namespaces: cfg.namespaces.iter().cloned().map(Some).collect(),
                aers: Vec::new(),
                events: std::collections::VecDeque::new(),
                aec: 0,
                changed_ns: Vec::new(),
                smart_masked: false,
                critical_warning: 0,
                msix_enabled: false,
                msix_routes: Vec::new(),
            }),
            window,
            mapper,
            clock_ns: AtomicU64::new(0),
            gone: AtomicBool::new(false),
            accesses_after_removal: AtomicU64::new(0),
            removal_request: AtomicBool::new(false),
            released: AtomicBool::new(false),
            own_thread: AtomicBool::new(false),
            cfg,
        }))
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    pub fn stats(&self) -> SimStats {
        self.st().stats.clone()
    }

    /// The next `n` IO commands are fetched and never completed (until a
    /// controller reset drops them).
    pub fn swallow_next_io(&self, n: u32) {
        self.st().swallow_io = n;
    }

    /// Whether Abort finds and aborts a command (else it reports "not aborted").
    pub fn set_abort_works(&self, on: bool) {
        self.st().abort_works = on;
    }

    /// Stops processing every queue (admin included) while set.
    pub fn set_unresponsive(&self, on: bool) {
        self.st().unresponsive = on;
    }

    /// Later enables never become ready (a controller that does not come
    /// back from a reset).
    pub fn set_fail_ready(&self, on: bool) {
        self.st().fail_ready = on;
    }

    /// Ignores CC.EN = 0 (a controller that cannot be disabled).
    pub fn set_ignore_disable(&self, on: bool) {
        self.st().ignore_disable = on;
    }

    /// Commands fetched and not yet completed.
    pub fn inflight_count(&self) -> usize {
        self.st().inflight.len()
    }

    /// True if a fetched, uncompleted command transfers to or from any byte
    /// of `addr..addr+len`: memory the controller may still write.
    pub fn inflight_overlaps(&self, addr: u64, len: usize) -> bool {
        let end = addr + len as u64;
        self.st().inflight.iter().flat_map(|c| c.segments.iter()).any(|&(a, l)| a < end && addr < a + l as u64)
    }

    /// IO queues that exist right now.
    pub fn io_queue_count(&self) -> usize {
        self.st().sqs.iter().skip(1).filter(|q| q.is_some()).count()
    }

    /// ASQ and ACQ of the last enable (to check the driver freed them).
    pub fn last_admin_queues(&self) -> (u64, u64) {
        self.st().last_asq_acq
    }

    pub fn is_enabled(&self) -> bool {
        self.st().cc.en()
    }

    pub fn shutdown_complete(&self) -> bool {
        self.st().csts.shst() == shutdown::SHST_COMPLETE
    }

    /// Raw bytes of namespace `nsid` (1-based), for verification.
    pub fn read_namespace(&self, nsid: u32, offset_bytes: usize, dst: &mut [u8]) -> bool {
        let st = self.st();
        let Some(ns) = st.ns.get(nsid.wrapping_sub(1) as usize) else {
            return false;
        };
        match ns.get(offset_bytes..offset_bytes + dst.len()) {
            Some(src) => {
                dst.copy_from_slice(src);
                true
            }
            None => false,
        }
    }

    /// What namespace `nsid` (1-based) would hold after a power cut now: the
    /// visible data with every block still only in the write cache replaced
    /// by what the medium holds.
    pub fn read_media(&self, nsid: u32, offset_bytes: usize, dst: &mut [u8]) -> bool {
        let st = self.st();
        let index = nsid.wrapping_sub(1) as usize;
        let (Some(ns), Some(Some(cfg))) = (st.ns.get(index), st.namespaces.get(index)) else {
            return false;
        };
        let Some(src) = offset_bytes.checked_add(dst.len()).and_then(|end| ns.get(offset_bytes..end)) else {
            return false;
        };
        dst.copy_from_slice(src);
        let bs = cfg.block_size as usize;
        let (first, end) = ((offset_bytes / bs) as u64, (offset_bytes + dst.len()).div_ceil(bs) as u64);
        for (&(_, lba), old) in st.unsynced.range((index, first)..(index, end)) {
            let block_start = lba as usize * bs;
            // The overlap of this block and the requested range.
            let lo = block_start.max(offset_bytes);
            let hi = (block_start + bs).min(offset_bytes + dst.len());
            let out = &mut dst[lo - offset_bytes..hi - offset_bytes];
            if old.is_empty() {
                out.fill(0);
            } else {
                out.copy_from_slice(&old[lo - block_start..hi - block_start]);
            }
        }
        true
    }

    /// Blocks held only in the volatile write cache.
    pub fn unsynced_blocks(&self) -> usize {
        self.st().unsynced.len()
    }

    /// Changes namespace `nsid`'s size (its data is kept up to the smaller
    /// size; growth reads as zeroes) and reports the change.
    pub fn resize_namespace(&self, nsid: u32, num_blocks: u64) -> Result<(), String> {
        let mut st = self.st();
        let index = nsid.wrapping_sub(1) as usize;
        let Some(Some(ns)) = st.namespaces.get_mut(index) else {
            return Err(format!("no namespace {nsid}"));
        };
        let bytes = ns_bytes(num_blocks, ns.block_size)?;
        ns.num_blocks = num_blocks;
        st.ns[index].resize(bytes, 0);
        namespace_changed(&mut st, nsid);
        Ok(())
    }

    /// Adds a namespace (the next id) and reports it.
    pub fn add_namespace(&self, ns: SimNamespace) -> Result<u32, String> {
        let bytes = ns_bytes(ns.num_blocks, ns.block_size)?;
        let mut st = self.st();
        st.namespaces.push(Some(ns));
        st.ns.push(vec![0u8; bytes]);
        let nsid = st.namespaces.len() as u32;
        namespace_changed(&mut st, nsid);
        Ok(nsid)
    }

    /// Detaches namespace `nsid` (its commands fail from now on) and
    /// reports it.
    pub fn remove_namespace(&self, nsid: u32) -> Result<(), String> {
        let mut st = self.st();
        let index = nsid.wrapping_sub(1) as usize;
        match st.namespaces.get_mut(index) {
            Some(slot @ Some(_)) => *slot = None,
            _ => return Err(format!("no namespace {nsid}")),
        }
        st.ns[index] = Vec::new();
        namespace_changed(&mut st, nsid);
        Ok(())
    }

    /// Sets the SMART critical warning bits (0 clears them); new bits the
    /// host enabled are reported with a SMART / Health event.
    pub fn set_critical_warning(&self, bits: u8) {
        let mut st = self.st();
        let new = bits & !st.critical_warning;
        st.critical_warning = bits;
        if new as u32 & st.aec & aec::SMART_MASK != 0 && !st.smart_masked {
            st.smart_masked = true;
            let info = if new & nvme_spec::log::critical_warning::TEMPERATURE != 0 { 1 } else { 0 };
            let ev =
                AsyncEvent { event_type: async_event_type::SMART_HEALTH, info, log_page: LogPageId::SMART_HEALTH.0 };
            st.events.push_back(ev.to_dword());
        }
    }

    /// The device leaves the bus now, mid-IO: every command it holds is
    /// dropped unposted and nothing of it reaches host memory again.
    pub fn surprise_remove(&self) {
        let mut st = self.st();
        self.gone.store(true, Ordering::Release);
        st.inflight.clear();
        st.backlog.clear();
        st.aers.clear();
    }

    /// The platform asks for the device back (a hot-unplug of a device
    /// under VFIO): the driver is told (`removal_requested`), the device
    /// keeps working until the driver releases it, then it is gone.
    pub fn request_removal(&self) {
        self.removal_request.store(true, Ordering::Release);
    }

    /// Whether the driver released the device after `request_removal`.
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Steps the model on a thread of its own, as a device runs beside its
    /// host, until the returned guard is dropped; its reactor poller idles
    /// meanwhile. (A test that counts the driver's allocations on the
    /// reactor thread keeps the model's own out of the count this way.)
    pub fn step_on_thread(self: &Arc<Self>) -> SimThread {
        self.own_thread.store(true, Ordering::Release);
        let stop = Arc::new(AtomicBool::new(false));
        let (me, stop2) = (self.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            while !stop2.load(Ordering::Acquire) {
                if !me.step() {
                    std::thread::yield_now();
                }
            }
            me.own_thread.store(false, Ordering::Release);
        });
        SimThread { stop, handle: Some(handle) }
    }

    /// While `on`, its reactor poller idles and the caller steps the model
    /// (a benchmark that times the driver's work apart from the model's).
    pub fn step_by_hand(&self, on: bool) {
        self.own_thread.store(on, Ordering::Release);
    }

    /// Register reads and writes (doorbells included) since the removal.
    pub fn accesses_after_removal(&self) -> u64 {
        self.accesses_after_removal.load(Ordering::Relaxed)
    }

    fn removed_access(&self) -> bool {
        if self.gone.load(Ordering::Acquire) {
            self.accesses_after_removal.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Asynchronous Event Requests the model holds now.
    pub fn outstanding_aers(&self) -> usize {
        self.st().aers.len()
    }

    /// Registers a reactor poller that steps the model on every loop (for a
    /// daemon that attaches a simulated controller).
    pub fn start_poller(self: &Arc<Self>) -> reactor::PollerHandle {
        let me = Arc::downgrade(self);
        reactor::register_poller("nvme_sim", move || match me.upgrade() {
            Some(s) if s.own_thread.load(Ordering::Acquire) => reactor::PollStatus::Idle,
            Some(s) => {
                if s.step() {
                    reactor::PollStatus::Busy
                } else {
                    reactor::PollStatus::Idle
                }
            }
            None => reactor::PollStatus::Done,
        })
    }

    fn doorbell_index(&self, off: u32) -> Option<usize> {
        let rel = off.checked_sub(offset::DOORBELLS)? as usize;
        let stride = 4usize << self.cfg.dstrd;
        rel.is_multiple_of(stride).then_some(rel / stride).filter(|&i| i < self.doorbells.len())
    }

    fn cap(&self) -> Cap {
        Cap::default()
            .with_mqes(self.cfg.mqes)
            .with_cqr(true)
            .with_timeout_500ms(self.cfg.timeout_500ms)
            .with_dstrd(self.cfg.dstrd)
            .with_css(nvme_spec::regs::cap_css::NVM)
            .with_mpsmin(0)
            .with_mpsmax(4)
    }

    fn write_cc(&self, st: &mut State, new: Cc) {
        let old = st.cc;
        st.cc = new;
        if old.en() && !new.en() {
            if st.ignore_disable {
                st.cc = new.with_en(true);
                return;
            }
            // Controller reset: every queue and every in-flight command is
            // gone; nothing is written to host memory after this.
            st.stats.resets += 1;
            st.sqs.iter_mut().for_each(|q| *q = None);
            st.cqs.iter_mut().for_each(|q| *q = None);
            st.inflight.clear();
            st.backlog.clear();
            st.aers.clear();
            st.csts = Csts(0);
            st.ready_in_steps = None;
            for d in &self.doorbells {
                d.store(0, Ordering::Relaxed);
            }
            return;
        }
        if !old.en() && new.en() {
            let ok = st.asq != 0
                && st.acq != 0
                && st.asq.is_multiple_of(PAGE_SIZE)
                && st.acq.is_multiple_of(PAGE_SIZE)
                && new.iosqes() == 6
                && new.iocqes() == 4
                && new.mps() == 0;
            if !ok {
                st.csts = st.csts.with_cfs(true);
                return;
            }
            st.last_asq_acq = (st.asq, st.acq);
            st.sqs[0] = Some(SimSq { base: st.asq, size: st.aqa.asqs() as u32 + 1, head: 0, cqid: 0 });
            // The admin queue always interrupts on vector 0.
            st.cqs[0] =
                Some(SimCq { base: st.acq, size: st.aqa.acqs() as u32 + 1, tail: 0, phase: true, vector: Some(0) });
            let fail_ready = self.cfg.fail_ready || st.fail_ready;
            st.ready_in_steps = (!fail_ready).then_some(self.cfg.ready_delay_steps);
            if st.ready_in_steps == Some(0) {
                st.csts = st.csts.with_rdy(true);
                st.ready_in_steps = None;
            }
        }
        if new.en() && new.shn() != shutdown::SHN_NONE && old.shn() == shutdown::SHN_NONE {
            st.stats.shutdowns += 1;
            // A controller writes its cache back before reporting shutdown.
            st.unsynced.clear();
            st.csts = st.csts.with_shst(shutdown::SHST_OCCURRING);
        }
    }

    /// Advances the model by one tick. Returns true if it did anything.
    pub fn step(&self) -> bool {
        if self.gone.load(Ordering::Acquire) {
            return false;
        }
        let mut st = self.st();
        st.step += 1;
        if let Some(n) = st.ready_in_steps {
            if n <= 1 {
                st.ready_in_steps = None;
                st.csts = st.csts.with_rdy(true);
            } else {
                st.ready_in_steps = Some(n - 1);
            }
            return true;
        }
        if st.csts.shst() == shutdown::SHST_OCCURRING {
            st.csts = st.csts.with_shst(shutdown::SHST_COMPLETE);
            return true;
        }
        if !st.cc.en() || !st.csts.rdy() || st.unresponsive || st.csts.shst() != shutdown::SHST_NORMAL {
            return false;
        }
        let mut busy = self.flush_backlog(&mut st);
        busy |= self.process_admin(&mut st);
        busy |= self.report_events(&mut st);
        busy |= self.fetch_io(&mut st);
        busy |= self.complete_io(&mut st);
        busy
    }

    fn flush_backlog(&self, st: &mut State) -> bool {
        if st.backlog.is_empty() {
            return false;
        }
        let pending = std::mem::take(&mut st.backlog);
        for (cqid, cqe) in pending {
            self.post(st, cqid, cqe);
        }
        true
    }

    /// Posts a CQE (or parks it while the CQ is full).
    fn post(&self, st: &mut State, cqid: u16, mut cqe: Cqe) {
        let head = self.doorbells[2 * cqid as usize + 1].load(Ordering::Acquire);
        let Some(cq) = st.cqs.get_mut(cqid as usize).and_then(|q| q.as_mut()) else {
            return;
        };
        if (cq.tail + 1) % cq.size == head % cq.size.max(1) {
            st.backlog.push((cqid, cqe));
            return;
        }
        cqe.set_phase(cq.phase);
        let addr = cq.base + cq.tail as u64 * 16;
        cq.tail += 1;
        if cq.tail == cq.size {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
        let vector = cq.vector;
        if self.window.post_cqe(addr, &cqe).is_err() {
            st.stats.dma_faults += 1;
        }
        st.stats.completions += 1;
        // The MSI-X message after the entry is in memory, as a device's
        // interrupt write follows its completion write.
        if let Some(irq) = vector.filter(|_| st.msix_enabled).and_then(|v| st.msix_routes.get(v as usize)?.as_ref()) {
            irq.signal();
            st.stats.interrupts += 1;
        }
    }

    /// Next SQE of `sqid`, if the host rang past the head.
    fn fetch(&self, st: &mut State, sqid: u16) -> Option<Sqe> {
        let tail = self.doorbells[2 * sqid as usize].load(Ordering::Acquire);
        let sq = st.sqs.get_mut(sqid as usize)?.as_mut()?;
        if tail >= sq.size {
            st.stats.bad_doorbells += 1;
            return None;
        }
        if sq.head == tail {
            return None;
        }
        let addr = sq.base + sq.head as u64 * 64;
        sq.head = (sq.head + 1) % sq.size;
        let mut bytes = [0u8; 64];
        if self.window.read(addr, &mut bytes).is_err() {
            st.stats.dma_faults += 1;
            return None;
        }
        Sqe::read_from_bytes(&bytes).ok()
    }

    fn completion(&self, st: &State, sqid: u16, sqe: &Sqe, status: Status, dw0: u32) -> (u16, Cqe) {
        let sq = st.sqs.get(sqid as usize).and_then(|q| q.as_ref());
        let mut cqe = Cqe::new(sqe.cid.get(), status);
        cqe.dw0 = U32::new(dw0);
        cqe.sqid = U16::new(sqid);
        cqe.sqhd = U16::new(sq.map_or(0, |q| q.head as u16));
        (sq.map_or(0, |q| q.cqid), cqe)
    }

    /// Completes held AERs with waiting events.
    fn report_events(&self, st: &mut State) -> bool {
        let mut busy = false;
        while !st.events.is_empty() && !st.aers.is_empty() {
            let (Some(dw0), sqe) = (st.events.pop_front(), st.aers.remove(0)) else { break };
            let (cqid, cqe) = self.completion(st, 0, &sqe, Status::SUCCESS, dw0);
            self.post(st, cqid, cqe);
            st.stats.async_events += 1;
            busy = true;
        }
        busy
    }

    fn process_admin(&self, st: &mut State) -> bool {
        let mut busy = false;
        while let Some(sqe) = self.fetch(st, 0) {
            busy = true;
            st.stats.admin_commands += 1;
            if AdminOpcode(sqe.opcode) == AdminOpcode::ASYNC_EVENT_REQUEST {
                if st.aers.len() > AERL as usize {
                    let (cqid, cqe) =
                        self.completion(st, 0, &sqe, Status::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED.with_dnr(), 0);
                    self.post(st, cqid, cqe);
                } else {
                    st.aers.push(sqe);
                }
                continue;
            }
            let (status, dw0) = self.admin(st, &sqe);
            let (cqid, cqe) = self.completion(st, 0, &sqe, status, dw0);
            self.post(st, cqid, cqe);
        }
        busy
    }

    fn admin(&self, st: &mut State, sqe: &Sqe) -> (Status, u32) {
        let cdw10 = sqe.cdw10.get();
        let cdw11 = sqe.cdw11.get();
        match AdminOpcode(sqe.opcode) {
            AdminOpcode::IDENTIFY => {
                let data = match self.identify(st, sqe) {
                    Ok(d) => d,
                    Err(s) => return (s, 0),
                };
                match self.transfer_out(st, sqe, &data) {
                    Ok(()) => (Status::SUCCESS, 0),
                    Err(s) => (s, 0),
                }
            }
            AdminOpcode::SET_FEATURES if cdw10 & 0xFF == nvme_spec::features::FeatureId::NUMBER_OF_QUEUES.0 as u32 => {
                let n = self.cfg.max_io_queues as u32 - 1;
                (Status::SUCCESS, n | (n << 16))
            }
            AdminOpcode::SET_FEATURES | AdminOpcode::GET_FEATURES
                if cdw10 & 0xFF == nvme_spec::features::FeatureId::VOLATILE_WRITE_CACHE.0 as u32 =>
            {
                if !self.cfg.vwc {
                    return (Status::INVALID_FIELD.with_dnr(), 0);
                }
                if AdminOpcode(sqe.opcode) == AdminOpcode::SET_FEATURES {
                    let enable = cdw11 & nvme_spec::features::VWC_ENABLE != 0;
                    if !enable {
                        // Disabling the cache writes it back first.
                        st.unsynced.clear();
                    }
                    st.write_cache_enabled = enable;
                }
                (Status::SUCCESS, u32::from(st.write_cache_enabled))
            }
            AdminOpcode::SET_FEATURES | AdminOpcode::GET_FEATURES
                if cdw10 & 0xFF == FeatureId::ASYNC_EVENT_CONFIG.0 as u32 =>
            {
                if AdminOpcode(sqe.opcode) == AdminOpcode::SET_FEATURES {
                    st.aec = cdw11 & (aec::SMART_MASK | aec::NAMESPACE_ATTRIBUTE_NOTICES);
                }
                (Status::SUCCESS, st.aec)
            }
            AdminOpcode::SET_FEATURES | AdminOpcode::GET_FEATURES => (Status::SUCCESS, 0),
            AdminOpcode::GET_LOG_PAGE => {
                let p = GetLogPageParams::from_sqe(sqe);
                st.stats.log_pages_read += 1;
                let page = match p.lid {
                    LogPageId::CHANGED_NAMESPACE_LIST => {
                        let list = if st.changed_ns.len() > NamespaceList::CAPACITY {
                            NamespaceList::from_ids([CHANGED_NS_LIST_OVERFLOW])
                        } else {
                            NamespaceList::from_ids(st.changed_ns.iter().copied())
                        };
                        if !p.rae {
                            st.changed_ns.clear();
                        }
                        list.as_bytes().to_vec()
                    }
                    LogPageId::SMART_HEALTH => {
                        let mut log = SmartLog::zeroed();
                        log.critical_warning = st.critical_warning;
                        log.temperature = U16::new(300);
                        log.available_spare = 100;
                        log.available_spare_threshold = 10;
                        if !p.rae {
                            st.smart_masked = false;
                        }
                        log.as_bytes().to_vec()
                    }
                    _ => return (Status::INVALID_LOG_PAGE.with_dnr(), 0),
                };
                let off = p.offset_bytes.min(page.len() as u64) as usize;
                let len = (p.len_bytes as usize).min(page.len() - off);
                if len == 0 || len > PAGE_SIZE as usize {
                    return (Status::INVALID_FIELD.with_dnr(), 0);
                }
                match self.transfer_out(st, sqe, &page[off..off + len]) {
                    Ok(()) => (Status::SUCCESS, 0),
                    Err(s) => (s, 0),
                }
            }
            AdminOpcode::CREATE_IO_CQ => {
                let (qid, size) = ((cdw10 & 0xFFFF) as usize, (cdw10 >> 16) + 1);
                if qid == 0 || qid >= st.cqs.len() || st.cqs[qid].is_some() {
                    return (Status::INVALID_QUEUE_IDENTIFIER.with_dnr(), 0);
                }
                if size < 2 || size > self.cfg.mqes as u32 + 1 {
                    return (Status::INVALID_QUEUE_SIZE.with_dnr(), 0);
                }
                let base = sqe.dptr.prp1.get();
                if cdw11 & 1 == 0 || !base.is_multiple_of(PAGE_SIZE) || self.window.read(base, &mut [0u8; 16]).is_err()
                {
                    return (Status::INVALID_FIELD.with_dnr(), 0);
                }
                // IEN (bit 1) with IV (bits 31:16): the vector must exist.
                let vector = (cdw11 & 2 != 0).then_some((cdw11 >> 16) as u16);
                if vector.is_some_and(|v| v >= self.cfg.msix_vectors) {
                    return (Status::INVALID_INTERRUPT_VECTOR.with_dnr(), 0);
                }
                self.doorbells[2 * qid + 1].store(0, Ordering::Relaxed);
                st.cqs[qid] = Some(SimCq { base, size, tail: 0, phase: true, vector });
                (Status::SUCCESS, 0)
            }
            AdminOpcode::CREATE_IO_SQ => {
                let (qid, size, cqid) = ((cdw10 & 0xFFFF) as usize, (cdw10 >> 16) + 1, (cdw11 >> 16) as u16);
                if qid == 0 || qid >= st.sqs.len() || st.sqs[qid].is_some() {
                    return (Status::INVALID_QUEUE_IDENTIFIER.with_dnr(), 0);
                }
                if cqid == 0 || st.cqs.get(cqid as usize).is_none_or(|q| q.is_none()) {
                    return (Status::COMPLETION_QUEUE_INVALID.with_dnr(), 0);
                }
                if size < 2 || size > self.cfg.mqes as u32 + 1 {
                    return (Status::INVALID_QUEUE_SIZE.with_dnr(), 0);
                }
                let base = sqe.dptr.prp1.get();
                if cdw11 & 1 == 0 || !base.is_multiple_of(PAGE_SIZE) {
                    return (Status::INVALID_FIELD.with_dnr(), 0);
                }
                self.doorbells[2 * qid].store(0, Ordering::Relaxed);
                st.sqs[qid] = Some(SimSq { base, size, head: 0, cqid });
                st.stats.io_queues_created += 1;
                (Status::SUCCESS, 0)
            }
            AdminOpcode::DELETE_IO_SQ => {
                let qid = (cdw10 & 0xFFFF) as u16;
                if qid == 0 || st.sqs.get(qid as usize).is_none_or(|q| q.is_none()) {
                    return (Status::INVALID_QUEUE_IDENTIFIER.with_dnr(), 0);
                }
                // Commands of the SQ complete as aborted before it goes.
                let (gone, kept): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut st.inflight).into_iter().partition(|c| c.sqid == qid);
                st.inflight = kept;
                for c in gone {
                    let (cqid, cqe) = self.completion(st, qid, &c.sqe, Status::ABORTED_SQ_DELETION, 0);
                    self.post(st, cqid, cqe);
                }
                st.sqs[qid as usize] = None;
                st.stats.io_queues_deleted += 1;
                (Status::SUCCESS, 0)
            }
            AdminOpcode::DELETE_IO_CQ => {
                let qid = (cdw10 & 0xFFFF) as u16;
                if qid == 0 || st.cqs.get(qid as usize).is_none_or(|q| q.is_none()) {
                    return (Status::INVALID_QUEUE_IDENTIFIER.with_dnr(), 0);
                }
                if st.sqs.iter().flatten().any(|s| s.cqid == qid) {
                    return (Status::INVALID_QUEUE_DELETION.with_dnr(), 0);
                }
                st.cqs[qid as usize] = None;
                (Status::SUCCESS, 0)
            }
            AdminOpcode::ABORT => {
                let (sqid, cid) = ((cdw10 & 0xFFFF) as u16, (cdw10 >> 16) as u16);
                let found = st.inflight.iter().position(|c| c.sqid == sqid && c.sqe.cid.get() == cid);
                match found {
                    Some(i) if st.abort_works => {
                        let c = st.inflight.remove(i);
                        let (cqid, cqe) = self.completion(st, sqid, &c.sqe, Status::ABORT_REQUESTED, 0);
                        self.post(st, cqid, cqe);
                        st.stats.aborts_performed += 1;
                        (Status::SUCCESS, 0)
                    }
                    _ => {
                        st.stats.aborts_refused += 1;
                        (Status::SUCCESS, 1)
                    }
                }
            }
            _ => (Status::INVALID_OPCODE.with_dnr(), 0),
        }
    }

    fn identify(&self, st: &State, sqe: &Sqe) -> Result<Vec<u8>, Status> {
        let cns = Cns((sqe.cdw10.get() & 0xFF) as u8);
        let nsid = sqe.nsid.get();
        let n = st.namespaces.len() as u32;
        match cns {
            Cns::CONTROLLER => {
                let mut id = IdentifyController::zeroed();
                id.vid = U16::new(0x1b36);
                id.ssvid = U16::new(0x1af4);
                pad(&mut id.sn, &self.cfg.serial);
                pad(&mut id.mn, &self.cfg.model);
                pad(&mut id.fr, "1.0");
                id.mdts = self.cfg.mdts;
                id.cntlid = U16::new(1);
                id.ver = U32::new(Vs::V1_4.0);
                id.acl = 3;
                id.aerl = AERL;
                id.oaes = U32::new(nvme_spec::identify::oaes::NAMESPACE_ATTRIBUTE);
                id.sqes = 0x66;
                id.cqes = 0x44;
                id.nn = U32::new(n);
                id.oncs =
                    U16::new(nvme_spec::identify::oncs::DATASET_MANAGEMENT | nvme_spec::identify::oncs::WRITE_ZEROES);
                id.vwc = u8::from(self.cfg.vwc);
                id.sgls = U32::new(match (self.cfg.sgl, self.cfg.sgl_dword_granular) {
                    (false, _) => 0,
                    (true, false) => nvme_spec::identify::sgls::SUPPORTED,
                    (true, true) => nvme_spec::identify::sgls::SUPPORTED_DWORD_ALIGNED,
                });
                let nqn = format!("nqn.2019-08.org.qemu:{}", self.cfg.serial);
                id.subnqn[..nqn.len().min(255)].copy_from_slice(&nqn.as_bytes()[..nqn.len().min(255)]);
                Ok(id.as_bytes().to_vec())
            }
            Cns::NAMESPACE => {
                let Some(slot) = st.namespaces.get(nsid.wrapping_sub(1) as usize) else {
                    return Err(Status::INVALID_NAMESPACE_OR_FORMAT.with_dnr());
                };
                // An inactive (removed) namespace identifies as zeroes.
                let Some(ns) = slot else {
                    return Ok(IdentifyNamespace::zeroed().as_bytes().to_vec());
                };
                let mut id = IdentifyNamespace::zeroed();
                id.nsze = U64::new(ns.num_blocks);
                id.ncap = U64::new(ns.num_blocks);
                id.nuse = U64::new(ns.num_blocks);
                id.nlbaf = 0;
                id.lbaf[0] = LbaFormat::new(ns.block_size.trailing_zeros() as u8, 0);
                id.dlfeat = self.cfg.dlfeat;
                id.nguid[..8].copy_from_slice(&self.cfg.seed.to_le_bytes());
                id.nguid[8..12].copy_from_slice(&nsid.to_le_bytes());
                Ok(id.as_bytes().to_vec())
            }
            Cns::ACTIVE_NAMESPACE_LIST => {
                let active = |i: &u32| st.namespaces.get(*i as usize - 1).is_some_and(|s| s.is_some());
                let list = NamespaceList::from_ids((1..=n).filter(|&i| i > nsid).filter(active));
                Ok(list.as_bytes().to_vec())
            }
            _ => Err(Status::INVALID_FIELD.with_dnr()),
        }
    }

    /// The host memory segments of a command's data pointer (PRP or SGL).
    fn segments(&self, st: &mut State, sqe: &Sqe, len: usize) -> Result<Vec<(u64, usize)>, Status> {
        if sqe.psdt() != nvme_spec::cmd::Psdt::Prp {
            if !self.cfg.sgl || sqe.psdt() == nvme_spec::cmd::Psdt::Reserved {
                return Err(Status::INVALID_FIELD.with_dnr());
            }
            st.stats.sgl_commands += 1;
            return self.sgl_segments(st, sqe.sgl1(), len);
        }
        let prp1 = sqe.dptr.prp1.get();
        let prp2 = sqe.dptr.prp2.get();
        if !prp1.is_multiple_of(4) {
            return Err(Status::PRP_OFFSET_INVALID.with_dnr());
        }
        let first = (PAGE_SIZE - prp1 % PAGE_SIZE).min(len as u64) as usize;
        let mut segs = vec![(prp1, first)];
        let mut left = len - first;
        if left == 0 {
            return Ok(segs);
        }
        if left <= PAGE_SIZE as usize {
            if !prp2.is_multiple_of(PAGE_SIZE) {
                return Err(Status::PRP_OFFSET_INVALID.with_dnr());
            }
            segs.push((prp2, left));
            return Ok(segs);
        }
        // PRP2 is a list; its last entry in each page chains when more remain.
        if !prp2.is_multiple_of(8) {
            return Err(Status::PRP_OFFSET_INVALID.with_dnr());
        }
        let mut entry_addr = prp2;
        let mut chained = false;
        while left > 0 {
            let mut raw = [0u8; 8];
            self.window.read(entry_addr, &mut raw).map_err(|_| {
                st.stats.dma_faults += 1;
                Status::DATA_TRANSFER_ERROR
            })?;
            let v = u64::from_le_bytes(raw);
            let last_in_page = entry_addr % PAGE_SIZE == PAGE_SIZE - 8;
            if last_in_page && left > PAGE_SIZE as usize {
                if v % PAGE_SIZE != 0 {
                    return Err(Status::PRP_OFFSET_INVALID.with_dnr());
                }
                entry_addr = v;
                chained = true;
                continue;
            }
            if v % PAGE_SIZE != 0 {
                return Err(Status::PRP_OFFSET_INVALID.with_dnr());
            }
            let n = left.min(PAGE_SIZE as usize);
            segs.push((v, n));
            left -= n;
            entry_addr += 8;
        }
        if chained {
            st.stats.chained_prp_lists += 1;
        }
        Ok(segs)
    }

    /// Walks an SGL from descriptor 1 (NVMe base 2.0 §4.1.2) as a PCIe
    /// controller without bit buckets or keyed descriptors does: SGL1 is a
    /// data block, or a Segment / Last Segment descriptor pointing at a list
    /// of 16-byte descriptors; a Segment's list ends in the descriptor of the
    /// next segment (and only there), a Last Segment's holds data blocks
    /// only. The data blocks must add up to exactly `len` bytes (no SGL
    /// "longer than data" support is reported), and with dword granularity
    /// every address and length is a multiple of 4.
    fn sgl_segments(&self, st: &mut State, sgl1: SglDescriptor, len: usize) -> Result<Vec<(u64, usize)>, Status> {
        /// Segments followed before the list is called malformed (a loop).
        const MAX_SEGMENTS: usize = 64;
        let mut out: Vec<(u64, usize)> = Vec::new();
        let mut total = 0usize;
        let mut data_block = |d: SglDescriptor| -> Result<(), Status> {
            if d.subtype() != sgl_subtype::ADDRESS {
                return Err(Status::SGL_DESCRIPTOR_TYPE_INVALID.with_dnr());
            }
            let (addr, n) = (d.address.get(), d.length.get() as usize);
            if self.cfg.sgl_dword_granular && (addr % 4 != 0 || n % 4 != 0) {
                return Err(Status::SGL_DATA_BLOCK_GRANULARITY_INVALID.with_dnr());
            }
            total = total.saturating_add(n);
            if total > len {
                return Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr());
            }
            if n > 0 {
                out.push((addr, n));
            }
            Ok(())
        };
        let mut next = match sgl1.sgl_type() {
            sgl_type::DATA_BLOCK => {
                data_block(sgl1)?;
                None
            }
            sgl_type::SEGMENT | sgl_type::LAST_SEGMENT => Some(sgl1),
            _ => return Err(Status::SGL_DESCRIPTOR_TYPE_INVALID.with_dnr()),
        };
        let mut segments = 0;
        while let Some(seg) = next.take() {
            segments += 1;
            let seg_len = seg.length.get() as usize;
            if seg.subtype() != sgl_subtype::ADDRESS || seg_len == 0 || !seg_len.is_multiple_of(16) {
                return Err(Status::INVALID_SGL_SEGMENT_DESCRIPTOR.with_dnr());
            }
            if segments > MAX_SEGMENTS || seg_len > PAGE_SIZE as usize * 16 {
                return Err(Status::INVALID_NUMBER_OF_SGL_DESCRIPTORS.with_dnr());
            }
            let mut raw = vec![0u8; seg_len];
            if self.window.read(seg.address.get(), &mut raw).is_err() {
                st.stats.dma_faults += 1;
                return Err(Status::DATA_TRANSFER_ERROR);
            }
            let last_segment = seg.sgl_type() == sgl_type::LAST_SEGMENT;
            let count = seg_len / 16;
            for (i, chunk) in raw.chunks_exact(16).enumerate() {
                let d = SglDescriptor::read_from_bytes(chunk).map_err(|_| Status::INVALID_FIELD.with_dnr())?;
                match d.sgl_type() {
                    sgl_type::DATA_BLOCK => data_block(d)?,
                    // Only the last descriptor of a (non-last) segment may
                    // point at the next one.
                    sgl_type::SEGMENT | sgl_type::LAST_SEGMENT if !last_segment && i + 1 == count => next = Some(d),
                    sgl_type::SEGMENT | sgl_type::LAST_SEGMENT => {
                        return Err(Status::INVALID_SGL_SEGMENT_DESCRIPTOR.with_dnr())
                    }
                    _ => return Err(Status::SGL_DESCRIPTOR_TYPE_INVALID.with_dnr()),
                }
            }
            if !last_segment && next.is_none() {
                // A Segment must lead on to another segment.
                return Err(Status::INVALID_SGL_SEGMENT_DESCRIPTOR.with_dnr());
            }
        }
        if total != len {
            return Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr());
        }
        if segments > 0 {
            st.stats.sgl_segment_lists += 1;
        }
        Ok(out)
    }

    fn transfer_out(&self, st: &mut State, sqe: &Sqe, data: &[u8]) -> Result<(), Status> {
        let segs = self.segments(st, sqe, data.len())?;
        self.scatter(st, &segs, data)
    }

    fn scatter(&self, st: &mut State, segs: &[(u64, usize)], data: &[u8]) -> Result<(), Status> {
        let mut off = 0;
        for &(addr, n) in segs {
            if self.window.write(addr, &data[off..off + n]).is_err() {
                st.stats.dma_faults += 1;
                return Err(Status::DATA_TRANSFER_ERROR);
            }
            off += n;
        }
        Ok(())
    }

    fn gather(&self, st: &mut State, segs: &[(u64, usize)], data: &mut [u8]) -> Result<(), Status> {
        let mut off = 0;
        for &(addr, n) in segs {
            if self.window.read(addr, &mut data[off..off + n]).is_err() {
                st.stats.dma_faults += 1;
                return Err(Status::DATA_TRANSFER_ERROR);
            }
            off += n;
        }
        Ok(())
    }

    fn fetch_io(&self, st: &mut State) -> bool {
        let mut busy = false;
        for qid in 1..st.sqs.len() as u16 {
            if st.sqs[qid as usize].is_none() {
                continue;
            }
            while let Some(sqe) = self.fetch(st, qid) {
                busy = true;
                st.stats.io_commands += 1;
                if self.cfg.loopback {
                    let (cqid, cqe) = self.completion(st, qid, &sqe, Status::SUCCESS, 0);
                    self.post(st, cqid, cqe);
                    continue;
                }
                let op = IoOpcode(sqe.opcode);
                match op {
                    IoOpcode::WRITE if sqe.fua() => st.stats.fua_writes += 1,
                    IoOpcode::WRITE_ZEROES if sqe.fua() => st.stats.fua_write_zeroes += 1,
                    _ => {}
                }
                let rw = op == IoOpcode::READ || op == IoOpcode::WRITE || op == IoOpcode::WRITE_ZEROES;
                if rw && sqe.cdw12.get() & (0xF << 26) != 0 {
                    st.stats.prinfo_commands += 1;
                }
                let delay = st.rng.below(self.cfg.max_delay_steps as u64 + 1);
                let swallowed = st.swallow_io > 0;
                if swallowed {
                    st.swallow_io -= 1;
                }
                let segments = self.data_len(st, &sqe).and_then(|len| match len {
                    0 => Ok(Vec::new()),
                    len => self.segments(st, &sqe, len),
                });
                let segments = match segments {
                    Ok(s) => s,
                    Err(status) => {
                        let (cqid, cqe) = self.completion(st, qid, &sqe, status, 0);
                        self.post(st, cqid, cqe);
                        continue;
                    }
                };
                let due_step = st.step + delay;
                st.inflight.push(InFlight { sqid: qid, sqe, due_step, swallowed, segments });
            }
        }
        busy
    }

    /// Bytes a read/write moves (0 for commands without data, or DSM's
    /// range list, which is read at execution).
    fn data_len(&self, st: &mut State, sqe: &Sqe) -> Result<usize, Status> {
        let op = IoOpcode(sqe.opcode);
        if op != IoOpcode::READ && op != IoOpcode::WRITE {
            return Ok(0);
        }
        let ns = st
            .namespaces
            .get(sqe.nsid.get().wrapping_sub(1) as usize)
            .and_then(|n| n.as_ref())
            .ok_or(Status::INVALID_NAMESPACE_OR_FORMAT.with_dnr())?;
        let len = sqe.nlb() as usize * ns.block_size as usize;
        st.stats.max_transfer_bytes = st.stats.max_transfer_bytes.max(len as u64);
        if self.cfg.mdts > 0 && len as u64 > (PAGE_SIZE << self.cfg.mdts) {
            return Err(Status::INVALID_FIELD.with_dnr());
        }
        Ok(len)
    }

    fn complete_io(&self, st: &mut State) -> bool {
        let now = st.step;
        let (mut due, rest): (Vec<InFlight>, Vec<InFlight>) =
            std::mem::take(&mut st.inflight).into_iter().partition(|c| !c.swallowed && c.due_step <= now);
        st.inflight = rest;
        if due.is_empty() {
            return false;
        }
        if self.cfg.reorder {
            for i in (1..due.len()).rev() {
                let j = st.rng.below(i as u64 + 1) as usize;
                due.swap(i, j);
            }
        }
        for c in due {
            let status = self.execute_io(st, &c);
            let (cqid, cqe) = self.completion(st, c.sqid, &c.sqe, status, 0);
            self.post(st, cqid, cqe);
        }
        true
    }

    fn execute_io(&self, st: &mut State, c: &InFlight) -> Status {
        let sqe = &c.sqe;
        let nsid = sqe.nsid.get();
        let Some(ns_cfg) = st.namespaces.get(nsid.wrapping_sub(1) as usize).cloned().flatten() else {
            return Status::INVALID_NAMESPACE_OR_FORMAT.with_dnr();
        };
        let bs = ns_cfg.block_size as usize;
        let op = IoOpcode(sqe.opcode);
        let range = |slba: u64, nlb: u64| -> Result<std::ops::Range<usize>, Status> {
            let end =
                slba.checked_add(nlb).filter(|&e| e <= ns_cfg.num_blocks).ok_or(Status::LBA_OUT_OF_RANGE.with_dnr())?;
            Ok(slba as usize * bs..end as usize * bs)
        };
        if self.cfg.error_one_in > 0
            && (op == IoOpcode::READ || op == IoOpcode::WRITE)
            && st.rng.below(self.cfg.error_one_in as u64) == 0
        {
            st.stats.injected_errors += 1;
            return if op == IoOpcode::READ { Status::UNRECOVERED_READ_ERROR } else { Status::WRITE_FAULT };
        }
        let ns_index = nsid as usize - 1;
        match op {
            IoOpcode::READ | IoOpcode::WRITE => {
                let r = match range(sqe.slba(), sqe.nlb() as u64) {
                    Ok(r) => r,
                    Err(s) => return s,
                };
                let mut data = vec![0u8; r.len()];
                let res = if op == IoOpcode::READ {
                    data.copy_from_slice(&st.ns[ns_index][r]);
                    self.scatter(st, &c.segments, &data)
                } else {
                    self.gather(st, &c.segments, &mut data).map(|()| {
                        cache_write(st, ns_index, bs, sqe.slba(), sqe.nlb() as u64, sqe.fua());
                        st.ns[ns_index][r].copy_from_slice(&data)
                    })
                };
                res.err().unwrap_or(Status::SUCCESS)
            }
            IoOpcode::FLUSH => {
                st.stats.flushes += 1;
                let keys: Vec<(usize, u64)> =
                    st.unsynced.range((ns_index, 0)..=(ns_index, u64::MAX)).map(|(k, _)| *k).collect();
                for k in keys {
                    st.unsynced.remove(&k);
                }
                Status::SUCCESS
            }
            IoOpcode::WRITE_ZEROES => match range(sqe.slba(), sqe.nlb() as u64) {
                Ok(r) => {
                    cache_write(st, ns_index, bs, sqe.slba(), sqe.nlb() as u64, sqe.fua());
                    st.ns[ns_index][r].fill(0);
                    Status::SUCCESS
                }
                Err(s) => s,
            },
            IoOpcode::DATASET_MANAGEMENT => {
                let nr = (sqe.cdw10.get() & 0xFF) as usize + 1;
                let mut raw = vec![0u8; nr * 16];
                let segs = match self.segments(st, sqe, nr * 16) {
                    Ok(s) => s,
                    Err(s) => return s,
                };
                if let Err(s) = self.gather(st, &segs, &mut raw) {
                    return s;
                }
                let deallocate = sqe.cdw11.get() & (1 << 2) != 0;
                for r in raw.chunks_exact(16) {
                    let nlb = u32::from_le_bytes([r[4], r[5], r[6], r[7]]) as u64;
                    let slba = u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
                    match range(slba, nlb) {
                        Ok(rg) if deallocate => {
                            cache_write(st, ns_index, bs, slba, nlb, false);
                            st.ns[ns_index][rg].fill(0)
                        }
                        Ok(_) => {}
                        Err(s) => return s,
                    }
                }
                Status::SUCCESS
            }
            _ => Status::new(sct::GENERIC, Status::INVALID_OPCODE.sc).with_dnr(),
        }
    }
}

/// Blocks `lba..lba + nlb` of namespace `index` are about to be
/// overwritten. Through the volatile cache (enabled, no FUA) the medium
/// keeps what it holds now until a flush; otherwise the new data is on the
/// medium when the command completes.
fn cache_write(st: &mut State, index: usize, bs: usize, lba: u64, nlb: u64, fua: bool) {
    let State { ns, unsynced, write_cache_enabled, .. } = st;
    if fua || !*write_cache_enabled {
        let keys: Vec<(usize, u64)> = unsynced.range((index, lba)..(index, lba + nlb)).map(|(k, _)| *k).collect();
        for k in keys {
            unsynced.remove(&k);
        }
        return;
    }
    for b in lba..lba + nlb {
        unsynced.entry((index, b)).or_insert_with(|| {
            let old = &ns[index][b as usize * bs..(b as usize + 1) * bs];
            // An empty copy stands for zeroes: large zero writes over
            // blank media stay cheap.
            if old.iter().all(|&x| x == 0) {
                Vec::new()
            } else {
                old.to_vec()
            }
        });
    }
}

/// Bytes of a namespace of `num_blocks` blocks of `block_size`.
fn ns_bytes(num_blocks: u64, block_size: u32) -> Result<usize, String> {
    if !block_size.is_power_of_two() || block_size < 512 {
        return Err(format!("simulated block size {block_size} is not a power of two >= 512"));
    }
    num_blocks
        .checked_mul(block_size as u64)
        .and_then(|b| usize::try_from(b).ok())
        .filter(|&b| b > 0 && b <= 1 << 32)
        .ok_or_else(|| format!("simulated namespace of {num_blocks} blocks must hold between 1 block and 4 GiB"))
}

/// Records a namespace change and, when the host enabled namespace
/// notices and none is pending, queues the event.
fn namespace_changed(st: &mut State, nsid: u32) {
    let first = st.changed_ns.is_empty();
    if !st.changed_ns.contains(&nsid) {
        st.changed_ns.push(nsid);
    }
    if first && st.aec & aec::NAMESPACE_ATTRIBUTE_NOTICES != 0 {
        let ev = AsyncEvent {
            event_type: async_event_type::NOTICE,
            info: async_event_notice::NAMESPACE_ATTRIBUTE_CHANGED,
            log_page: LogPageId::CHANGED_NAMESPACE_LIST.0,
        };
        st.events.push_back(ev.to_dword());
    }
}

fn pad(field: &mut [u8], s: &str) {
    field.fill(b' ');
    let n = s.len().min(field.len());
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

impl RegisterSpace for SimController {
    fn read32(&self, off: u32) -> u32 {
        if self.removed_access() {
            return u32::MAX;
        }
        let st = self.st();
        match off {
            offset::CAP => self.cap().0 as u32,
            o if o == offset::CAP + 4 => (self.cap().0 >> 32) as u32,
            offset::VS => Vs::V1_4.0,
            offset::CC => st.cc.0,
            offset::CSTS => st.csts.0,
            offset::AQA => st.aqa.0,
            offset::ASQ => st.asq as u32,
            o if o == offset::ASQ + 4 => (st.asq >> 32) as u32,
            offset::ACQ => st.acq as u32,
            o if o == offset::ACQ + 4 => (st.acq >> 32) as u32,
            _ => 0,
        }
    }

    fn write32(&self, off: u32, value: u32) {
        if self.removed_access() {
            return;
        }
        if off >= offset::DOORBELLS {
            match self.doorbell_index(off) {
                Some(i) => self.doorbells[i].store(value, Ordering::Release),
                None => self.st().stats.bad_doorbells += 1,
            }
            return;
        }
        let mut st = self.st();
        match off {
            offset::CC => self.write_cc(&mut st, Cc(value)),
            offset::AQA => st.aqa = Aqa(value),
            offset::ASQ => st.asq = (st.asq & !0xFFFF_FFFF) | value as u64,
            o if o == offset::ASQ + 4 => st.asq = (st.asq & 0xFFFF_FFFF) | ((value as u64) << 32),
            offset::ACQ => st.acq = (st.acq & !0xFFFF_FFFF) | value as u64,
            o if o == offset::ACQ + 4 => st.acq = (st.acq & 0xFFFF_FFFF) | ((value as u64) << 32),
            _ => {}
        }
    }

    fn relax(&self) {
        crate::mmio::note_blocking_wait();
        self.clock_ns.fetch_add(RELAX_NS, Ordering::Relaxed);
        self.step();
    }

    fn wait_clock_ns(&self) -> u64 {
        self.clock_ns.load(Ordering::Relaxed)
    }

    fn stop_dma(&self) -> bool {
        // Bus master off: the model drops every in-flight command unposted.
        let mut st = self.st();
        st.inflight.clear();
        st.backlog.clear();
        st.unresponsive = true;
        true
    }

    fn describe(&self) -> String {
        format!("SIM seed {}", self.cfg.seed)
    }

    fn removal_requested(&self) -> bool {
        self.removal_request.load(Ordering::Acquire)
    }

    fn interrupt_vectors(&self) -> u16 {
        self.cfg.msix_vectors
    }

    fn enable_interrupts(&self, count: u16) -> Result<(), String> {
        if count > self.cfg.msix_vectors {
            return Err(format!("{}: {count} MSI-X vectors asked, {} offered", self.describe(), self.cfg.msix_vectors));
        }
        let mut st = self.st();
        st.msix_enabled = true;
        st.msix_routes = vec![None; count as usize];
        Ok(())
    }

    fn set_interrupt(&self, vector: u16, irq: Option<&Arc<reactor::EventFd>>) -> Result<(), String> {
        let mut st = self.st();
        let Some(route) = st.msix_routes.get_mut(vector as usize) else {
            return Err(format!("{}: MSI-X vector {vector} is not enabled", self.describe()));
        };
        *route = irq.cloned();
        Ok(())
    }

    fn disable_interrupts(&self) {
        let mut st = self.st();
        st.msix_enabled = false;
        st.msix_routes.clear();
    }

    fn release(&self) {
        if self.removal_request.load(Ordering::Acquire) && !self.released.swap(true, Ordering::AcqRel) {
            // Let go of: the platform finishes the unplug; from here on an
            // access is one to a device that is gone (counted).
            self.surprise_remove();
        }
    }
}

impl Drop for SimController {
    fn drop(&mut self) {
        bdev::dma::unregister_mapper(&self.mapper);
    }
}

const _: () = assert!(IDENTIFY_DATA_LEN == 4096);

#[cfg(test)]
mod sgl_tests {
    use super::*;
    use nvme_spec::cmd::Psdt;

    fn seg(kind: u8, addr: u64, len: u32) -> SglDescriptor {
        SglDescriptor { address: U64::new(addr), length: U32::new(len), reserved: [0; 3], id: kind << 4 }
    }

    fn write_list(buf: &bdev::DmaBuf, off: usize, descs: &[SglDescriptor]) -> u64 {
        for (i, d) in descs.iter().enumerate() {
            buf.copy_from(off + i * 16, d.as_bytes());
        }
        buf.iova() + off as u64
    }

    /// The model's SGL walk against the spec's rules: data blocks in the
    /// command or in segment lists (a Segment chaining to a Last Segment),
    /// lengths adding up exactly, segment descriptors only where allowed,
    /// dword granularity when reported, SGLs refused when not supported.
    #[test]
    fn sgl_descriptors_are_checked_to_spec() {
        let sim =
            SimController::new(SimConfig { sgl: true, sgl_dword_granular: true, ..SimConfig::default() }).unwrap();
        let buf = bdev::DmaBuf::zeroed(8192).unwrap();
        let data = buf.iova() + 4096;
        let walk = |sgl1: SglDescriptor, len: usize| {
            let mut sqe = Sqe::new(IoOpcode::READ.0, 1);
            sqe.set_psdt(Psdt::SglMetadataBuffer);
            sqe.set_sgl1(sgl1);
            sim.segments(&mut sim.st(), &sqe, len)
        };
        let block = |addr: u64, len: u32| SglDescriptor::data_block(addr, len);
        assert_eq!(walk(block(data, 512), 512), Ok(vec![(data, 512)]));
        assert_eq!(walk(block(data, 512), 1024), Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr()));
        assert_eq!(walk(block(data + 2, 512), 512), Err(Status::SGL_DATA_BLOCK_GRANULARITY_INVALID.with_dnr()));

        // Segment (two blocks, then the pointer on) -> Last Segment (one block).
        let last = write_list(&buf, 256, &[block(data + 1024, 1024)]);
        let first =
            write_list(&buf, 0, &[block(data, 512), block(data + 512, 512), seg(sgl_type::LAST_SEGMENT, last, 16)]);
        let chained = seg(sgl_type::SEGMENT, first, 48);
        assert_eq!(walk(chained, 2048), Ok(vec![(data, 512), (data + 512, 512), (data + 1024, 1024)]));
        assert_eq!(walk(chained, 4096), Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr()), "the SGL is shorter");
        // A Last Segment holding a segment descriptor; a Segment that does
        // not lead on; a segment descriptor that is not the list's last.
        assert_eq!(
            walk(seg(sgl_type::LAST_SEGMENT, first, 48), 2048),
            Err(Status::INVALID_SGL_SEGMENT_DESCRIPTOR.with_dnr())
        );
        assert_eq!(
            walk(seg(sgl_type::SEGMENT, first, 32), 1024),
            Err(Status::INVALID_SGL_SEGMENT_DESCRIPTOR.with_dnr())
        );
        let bad = write_list(&buf, 512, &[seg(sgl_type::LAST_SEGMENT, last, 16), block(data, 512)]);
        assert_eq!(walk(seg(sgl_type::SEGMENT, bad, 32), 1536), Err(Status::INVALID_SGL_SEGMENT_DESCRIPTOR.with_dnr()));
        assert_eq!(
            walk(seg(sgl_type::LAST_SEGMENT, first, 20), 1024),
            Err(Status::INVALID_SGL_SEGMENT_DESCRIPTOR.with_dnr())
        );
        // A segment that points at itself.
        let looped = write_list(&buf, 1024, &[block(data, 4), seg(sgl_type::SEGMENT, buf.iova() + 1024, 32)]);
        assert_eq!(walk(seg(sgl_type::SEGMENT, looped, 32), 16), Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr()));
        assert_eq!(
            walk(seg(sgl_type::SEGMENT, looped, 32), 4096),
            Err(Status::INVALID_NUMBER_OF_SGL_DESCRIPTORS.with_dnr())
        );
        let zero_loop = write_list(&buf, 1536, &[block(data, 0), seg(sgl_type::SEGMENT, buf.iova() + 1536, 32)]);
        assert_eq!(
            walk(seg(sgl_type::SEGMENT, zero_loop, 32), 4),
            Err(Status::INVALID_NUMBER_OF_SGL_DESCRIPTORS.with_dnr())
        );
        // Types a PCIe controller without them refuses; a list outside host memory.
        assert_eq!(
            walk(SglDescriptor::keyed_data_block(data, 512, 7, 0), 512),
            Err(Status::SGL_DESCRIPTOR_TYPE_INVALID.with_dnr())
        );
        assert_eq!(walk(seg(sgl_type::BIT_BUCKET, 0, 512), 512), Err(Status::SGL_DESCRIPTOR_TYPE_INVALID.with_dnr()));
        assert_eq!(walk(seg(sgl_type::LAST_SEGMENT, 0x10, 16), 512), Err(Status::DATA_TRANSFER_ERROR));
        assert_eq!(sim.stats().sgl_segment_lists, 1);

        let plain = SimController::new(SimConfig::default()).unwrap();
        let mut sqe = Sqe::new(IoOpcode::READ.0, 1);
        sqe.set_psdt(Psdt::SglMetadataBuffer);
        sqe.set_sgl1(block(data, 512));
        assert_eq!(plain.segments(&mut plain.st(), &sqe, 512), Err(Status::INVALID_FIELD.with_dnr()), "no SGL support");
    }
}
