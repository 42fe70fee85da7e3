//! The NVMe-oF/TCP target's control plane: the transport options, the
//! subsystems with their namespaces, hosts and listeners, the discovery
//! subsystem, the listening sockets, and the controllers hosts create.
//!
//! The whole table is per reactor set (`reactor::global::<NvmfState>()`),
//! behind a mutex that only the control plane takes. Queue pairs on the
//! reactors hold `Arc` snapshots (a subsystem, a controller) and notice
//! changes through atomics (a generation counter, a `dead` flag), so the
//! IO path never locks.

pub(crate) mod admin;
pub mod auth;
pub(crate) mod bufpool;
pub(crate) mod conn;
pub(crate) mod reservation;

use bdev::{BdevEvent, BdevHandle, ListenerId, Registry};
use nvme_spec::features::{async_event_notice, async_event_type, AsyncEvent};
use nvme_spec::log::LogPageId;
use nvme_spec::text::DISCOVERY_NQN;
use serde_json::{json, Value};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use uuid::Uuid;

/// Errors of the target's control plane, with the errno SPDK reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NvmfError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Io(String),
}

impl NvmfError {
    pub fn errno(&self) -> i32 {
        match self {
            NvmfError::Invalid(_) => libc::EINVAL,
            NvmfError::NotFound(_) => libc::ENODEV,
            NvmfError::Exists(_) => libc::EEXIST,
            NvmfError::Busy(_) => libc::EBUSY,
            NvmfError::Io(_) => libc::EIO,
        }
    }
}

/// `nvmf_create_transport` options (SPDK's names and defaults for TCP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportOpts {
    pub max_queue_depth: u32,
    pub max_io_qpairs_per_ctrlr: u32,
    pub in_capsule_data_size: u32,
    pub max_io_size: u32,
    pub io_unit_size: u32,
    pub max_aq_depth: u32,
    pub num_shared_buffers: u32,
    pub buf_cache_size: u32,
    pub dif_insert_or_strip: bool,
    pub zcopy: bool,
    pub c2h_success: bool,
    pub sock_priority: u32,
    pub abort_timeout_sec: u32,
    pub ack_timeout: u32,
    pub data_wr_pool_size: u32,
}

impl Default for TransportOpts {
    fn default() -> Self {
        TransportOpts {
            max_queue_depth: 128,
            max_io_qpairs_per_ctrlr: 127,
            in_capsule_data_size: 4096,
            max_io_size: 131_072,
            io_unit_size: 131_072,
            max_aq_depth: 128,
            num_shared_buffers: 511,
            buf_cache_size: u32::MAX,
            dif_insert_or_strip: false,
            zcopy: false,
            c2h_success: true,
            sock_priority: 0,
            abort_timeout_sec: 1,
            ack_timeout: 0,
            data_wr_pool_size: 0,
        }
    }
}

/// In-capsule data the admin queue accepts whatever the transport says:
/// the Linux host sends up to 8 KiB of admin data in capsules.
pub(crate) const ADMIN_IN_CAPSULE_LEN: u32 = 8192;

impl TransportOpts {
    /// Checks the values against what the implementation supports.
    pub fn validate(&self) -> Result<(), NvmfError> {
        let bad = |m: &str| Err(NvmfError::Invalid(m.to_string()));
        if !(2..=4096).contains(&self.max_queue_depth) {
            return bad("max_queue_depth must be 2..=4096");
        }
        if !(2..=4096).contains(&self.max_aq_depth) {
            return bad("max_aq_depth must be 2..=4096");
        }
        if self.max_io_qpairs_per_ctrlr == 0 || self.max_io_qpairs_per_ctrlr > 1024 {
            return bad("max_io_qpairs_per_ctrlr must be 1..=1024");
        }
        if !self.max_io_size.is_power_of_two()
            || self.max_io_size < 4096
            || self.max_io_size as usize > bdev::DmaBuf::MAX_LEN
        {
            return bad("max_io_size must be a power of two between 4096 and 8 MiB");
        }
        if self.in_capsule_data_size > 131_072 || !self.in_capsule_data_size.is_multiple_of(16) {
            return bad("in_capsule_data_size must be a multiple of 16, at most 128 KiB");
        }
        // Options nvraid's TCP transport does not have: refused rather than
        // accepted and ignored.
        if self.zcopy {
            return bad("zcopy (zero-copy receive) is not supported by nvraid's TCP transport");
        }
        if self.dif_insert_or_strip {
            return bad("dif_insert_or_strip is not supported: nvraid's namespaces carry no protection information");
        }
        if self.sock_priority != 0 {
            return bad("sock_priority (SO_PRIORITY on connections) is not supported by nvraid; leave it 0");
        }
        if self.ack_timeout != 0 {
            return bad("ack_timeout is an RDMA transport option; the TCP transport does not have it");
        }
        if self.data_wr_pool_size != 0 {
            return bad("data_wr_pool_size is an RDMA transport option; the TCP transport does not have it");
        }
        if self.abort_timeout_sec > 3600 {
            return bad("abort_timeout_sec must be at most 3600");
        }
        Ok(())
    }

    /// MDTS in units of the minimum page size (4 KiB).
    pub fn mdts(&self) -> u8 {
        (self.max_io_size / 4096).trailing_zeros() as u8
    }

    pub fn to_json(&self) -> Value {
        json!({
            "trtype": "TCP",
            "max_queue_depth": self.max_queue_depth,
            "max_io_qpairs_per_ctrlr": self.max_io_qpairs_per_ctrlr,
            "in_capsule_data_size": self.in_capsule_data_size,
            "max_io_size": self.max_io_size,
            "io_unit_size": self.io_unit_size,
            "max_aq_depth": self.max_aq_depth,
            "num_shared_buffers": self.num_shared_buffers,
            "buf_cache_size": self.buf_cache_size,
            "dif_insert_or_strip": self.dif_insert_or_strip,
            "zcopy": self.zcopy,
            "c2h_success": self.c2h_success,
            "sock_priority": self.sock_priority,
            "abort_timeout_sec": self.abort_timeout_sec,
            "ack_timeout": self.ack_timeout,
            "data_wr_pool_size": self.data_wr_pool_size,
        })
    }
}

/// A TCP listen address as RPCs name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListenAddr {
    pub traddr: String,
    pub trsvcid: String,
}

impl ListenAddr {
    pub fn new(traddr: &str, trsvcid: &str) -> Self {
        ListenAddr { traddr: traddr.to_string(), trsvcid: trsvcid.to_string() }
    }

    pub fn ipv6(&self) -> bool {
        self.traddr.contains(':')
    }

    pub fn adrfam(&self) -> &'static str {
        if self.ipv6() {
            "IPv6"
        } else {
            "IPv4"
        }
    }

    pub fn to_json(&self) -> Value {
        json!({"trtype": "TCP", "adrfam": self.adrfam(), "traddr": self.traddr, "trsvcid": self.trsvcid})
    }

    fn socket_addr(&self) -> Result<SocketAddr, NvmfError> {
        let port: u16 = self
            .trsvcid
            .parse()
            .map_err(|_| NvmfError::Invalid(format!("trsvcid '{}' is not a port number", self.trsvcid)))?;
        (self.traddr.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| NvmfError::Invalid(format!("traddr '{}': {e}", self.traddr)))?
            .next()
            .ok_or_else(|| NvmfError::Invalid(format!("traddr '{}' resolves to nothing", self.traddr)))
    }

    /// The `nvme connect` line a Linux user types for `nqn` on this address.
    pub fn connect_line(&self, nqn: &str) -> String {
        format!("nvme connect -t tcp -a {} -s {} -n {}", self.traddr, self.trsvcid, nqn)
    }
}

/// The asymmetric namespace access state of one ANA group through one
/// listener (NVMe base spec 2.0, 8.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnaState {
    Optimized,
    NonOptimized,
    Inaccessible,
    PersistentLoss,
    Change,
}

impl AnaState {
    /// The states an RPC may set, by SPDK's names. Persistent loss and
    /// change are states a target enters by itself; nvraid never does.
    pub fn settable(name: &str) -> Option<Self> {
        match name {
            "optimized" => Some(AnaState::Optimized),
            "non_optimized" => Some(AnaState::NonOptimized),
            "inaccessible" => Some(AnaState::Inaccessible),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AnaState::Optimized => "optimized",
            AnaState::NonOptimized => "non_optimized",
            AnaState::Inaccessible => "inaccessible",
            AnaState::PersistentLoss => "persistent_loss",
            AnaState::Change => "change",
        }
    }

    /// The state's code in the ANA log page.
    pub fn code(self) -> u8 {
        use nvme_spec::log::ana_state as c;
        match self {
            AnaState::Optimized => c::OPTIMIZED,
            AnaState::NonOptimized => c::NON_OPTIMIZED,
            AnaState::Inaccessible => c::INACCESSIBLE,
            AnaState::PersistentLoss => c::PERSISTENT_LOSS,
            AnaState::Change => c::CHANGE,
        }
    }

    /// The path status an IO command to a namespace in this state ends
    /// with, or None where it runs. Not DNR: the host retries on another path.
    pub fn io_status(self) -> Option<nvme_spec::Status> {
        use nvme_spec::Status;
        match self {
            AnaState::Optimized | AnaState::NonOptimized => None,
            AnaState::Inaccessible => Some(Status::ANA_INACCESSIBLE),
            AnaState::PersistentLoss => Some(Status::ANA_PERSISTENT_LOSS),
            AnaState::Change => Some(Status::ANA_TRANSITION),
        }
    }
}

/// A namespace: an NSID mapped to a bdev.
pub struct Namespace {
    pub nsid: u32,
    pub bdev: BdevHandle,
    pub uuid: Uuid,
    pub nguid: [u8; 16],
    /// ANA group (1..=max_namespaces); changed by `nvmf_subsystem_set_ns_ana_group`
    /// under the subsystem's lock.
    pub(crate) anagrpid: AtomicU32,
    /// Visible to every host (`no_auto_visible` false), or only to `hosts`.
    pub auto_visible: bool,
    /// Hosts a namespace that is not auto visible is shown to
    /// (`nvmf_ns_add_host`); changed under the subsystem's lock.
    pub(crate) hosts: Mutex<Vec<String>>,
    /// Registrants and reservation (shared by every controller).
    pub resv: Arc<reservation::Reservations>,
    /// The bdev event listener that reports resizes to hosts; dropped with
    /// the namespace.
    events: ListenerId,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        self.bdev.drop_listener(self.events);
    }
}

impl Namespace {
    pub fn anagrpid(&self) -> u32 {
        self.anagrpid.load(Ordering::Acquire)
    }

    /// Whether controllers of `hostnqn` see this namespace.
    pub fn visible_to(&self, hostnqn: &str) -> bool {
        self.auto_visible || self.hosts().iter().any(|h| h == hostnqn)
    }

    pub(crate) fn hosts(&self) -> MutexGuard<'_, Vec<String>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn to_json(&self) -> Value {
        let nguid: String = self.nguid.iter().map(|b| format!("{b:02X}")).collect();
        let mut v = json!({"nsid": self.nsid, "bdev_name": self.bdev.name(), "name": self.bdev.name(),
               "nguid": nguid, "uuid": self.uuid.to_string()});
        if let Some(p) = self.resv.ptpl_file() {
            v["ptpl_file"] = json!(p.display().to_string());
        }
        v
    }
}

/// Options of `nvmf_subsystem_add_ns` beyond the bdev.
#[derive(Debug, Clone, Default)]
pub struct NsOptions {
    /// 0 picks the lowest free NSID.
    pub nsid: u32,
    pub uuid: Option<Uuid>,
    pub nguid: Option<[u8; 16]>,
    /// 0 puts the namespace in the group of its own NSID.
    pub anagrpid: u32,
    pub no_auto_visible: bool,
    /// Where reservations persist through power loss (loaded when it exists).
    pub ptpl_file: Option<std::path::PathBuf>,
}

/// The ANA states one listener reports for each group of its subsystem.
pub(crate) struct ListenerAna {
    pub(crate) addr: ListenAddr,
    /// Index: ANA group ID - 1 (one per possible group, max_namespaces).
    pub(crate) states: Vec<AnaState>,
    /// The subsystem's ANA change count when each group's state last changed.
    pub(crate) changed_at: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubsystemKind {
    Discovery,
    Nvme,
}

/// Parameters of `nvmf_create_subsystem`.
#[derive(Debug, Clone)]
pub struct SubsystemParams {
    pub nqn: String,
    pub serial_number: String,
    pub model_number: String,
    pub allow_any_host: bool,
    pub max_namespaces: u32,
    pub min_cntlid: u16,
    pub max_cntlid: u16,
    /// Report asymmetric namespace access: ANA groups, per-listener states.
    pub ana_reporting: bool,
}

impl SubsystemParams {
    pub fn new(nqn: &str) -> Self {
        SubsystemParams {
            nqn: nqn.to_string(),
            serial_number: "00000000000000000000".to_string(),
            model_number: "nvraid Controller".to_string(),
            allow_any_host: false,
            max_namespaces: 32,
            min_cntlid: 1,
            max_cntlid: 0xFFEF,
            ana_reporting: false,
        }
    }
}

pub(crate) struct SubsysInner {
    pub(crate) namespaces: Vec<Arc<Namespace>>,
    pub(crate) hosts: Vec<String>,
    /// DH-HMAC-CHAP keys of the hosts that must authenticate.
    pub(crate) host_keys: Vec<auth::HostKeys>,
    /// TLS PSKs of the hosts that must connect over a secure listener.
    pub(crate) host_psks: Vec<(String, Arc<crate::keyring::Key>)>,
    pub(crate) allow_any_host: bool,
    pub(crate) listeners: Vec<ListenAddr>,
    pub(crate) ctrls: Vec<Weak<Ctrl>>,
    next_cntlid: u16,
    /// Per listener, the ANA state of every group (kept whether or not ANA
    /// is reported; only reported when it is).
    pub(crate) ana: Vec<ListenerAna>,
    /// ANA change count (ANA log header CHGCNT): moves on every change of a
    /// listener's state or of a group's namespaces.
    pub(crate) ana_chgcnt: u64,
}

/// An NVM subsystem (or the discovery subsystem).
pub struct Subsystem {
    pub nqn: String,
    pub kind: SubsystemKind,
    pub serial_number: String,
    pub model_number: String,
    pub max_namespaces: u32,
    pub min_cntlid: u16,
    pub max_cntlid: u16,
    pub ana_reporting: bool,
    pub(crate) inner: Mutex<SubsysInner>,
    /// Bumped on every change a queue pair must notice (namespaces,
    /// listeners); qpairs compare it before using their cached view.
    pub(crate) generation: AtomicU64,
    pub(crate) deleted: AtomicBool,
}

impl Subsystem {
    fn new(p: &SubsystemParams, kind: SubsystemKind) -> Self {
        Subsystem {
            nqn: p.nqn.clone(),
            kind,
            serial_number: p.serial_number.clone(),
            model_number: p.model_number.clone(),
            max_namespaces: p.max_namespaces,
            min_cntlid: p.min_cntlid,
            max_cntlid: p.max_cntlid,
            ana_reporting: p.ana_reporting,
            inner: Mutex::new(SubsysInner {
                namespaces: Vec::new(),
                hosts: Vec::new(),
                host_keys: Vec::new(),
                host_psks: Vec::new(),
                allow_any_host: p.allow_any_host,
                listeners: Vec::new(),
                ctrls: Vec::new(),
                next_cntlid: p.min_cntlid,
                ana: Vec::new(),
                ana_chgcnt: 0,
            }),
            generation: AtomicU64::new(1),
            deleted: AtomicBool::new(false),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SubsysInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        let i = self.lock();
        i.allow_any_host || i.hosts.iter().any(|h| h == hostnqn)
    }

    pub fn namespaces(&self) -> Vec<Arc<Namespace>> {
        self.lock().namespaces.clone()
    }

    /// The namespaces controllers of `hostnqn` see (active NSIDs).
    pub fn namespaces_of(&self, hostnqn: &str) -> Vec<Arc<Namespace>> {
        self.lock().namespaces.iter().filter(|n| n.visible_to(hostnqn)).cloned().collect()
    }

    /// The ANA state group `anagrpid` has through listener `addr`
    /// (optimized where ANA is not reported: every path is).
    pub fn ana_state(&self, addr: &ListenAddr, anagrpid: u32) -> AnaState {
        if !self.ana_reporting {
            return AnaState::Optimized;
        }
        let i = self.lock();
        Self::ana_state_locked(&i, addr, anagrpid)
    }

    pub(crate) fn ana_state_locked(i: &SubsysInner, addr: &ListenAddr, anagrpid: u32) -> AnaState {
        let Some(l) = i.ana.iter().find(|l| &l.addr == addr) else {
            // The listener is gone: nothing is reachable through it.
            return AnaState::Inaccessible;
        };
        anagrpid.checked_sub(1).and_then(|g| l.states.get(g as usize)).copied().unwrap_or(AnaState::Inaccessible)
    }

    /// Live controllers, by controller ID (`nvmf_subsystem_get_controllers`).
    pub fn controllers(&self) -> Vec<Arc<Ctrl>> {
        let mut c: Vec<Arc<Ctrl>> = self.live_ctrls().into_iter().filter(|c| !c.is_dead()).collect();
        c.sort_unstable_by_key(|c| c.cntlid);
        c
    }

    /// `nvmf_subsystem_get_listeners` in SPDK's shape: each listener's
    /// address, and with ANA reporting the state of every group.
    pub fn listeners_json(&self) -> Value {
        let i = self.lock();
        let list: Vec<Value> = i
            .listeners
            .iter()
            .map(|a| {
                let mut v = json!({"address": a.to_json()});
                if self.ana_reporting {
                    let states: Vec<Value> = (1..=self.max_namespaces)
                        .map(|g| json!({"ana_group": g, "ana_state": Self::ana_state_locked(&i, a, g).name()}))
                        .collect();
                    v["ana_states"] = Value::Array(states);
                }
                v
            })
            .collect();
        Value::Array(list)
    }

    pub fn listeners(&self) -> Vec<ListenAddr> {
        self.lock().listeners.clone()
    }

    pub(crate) fn alloc_cntlid(&self) -> Option<u16> {
        let mut i = self.lock();
        i.ctrls.retain(|c| c.strong_count() > 0);
        let span = u32::from(self.max_cntlid - self.min_cntlid) + 1;
        for _ in 0..span {
            let id = i.next_cntlid;
            i.next_cntlid = if id >= self.max_cntlid { self.min_cntlid } else { id + 1 };
            if !i.ctrls.iter().filter_map(Weak::upgrade).any(|c| c.cntlid == id) {
                return Some(id);
            }
        }
        None
    }

    pub(crate) fn find_ctrl(&self, cntlid: u16) -> Option<Arc<Ctrl>> {
        self.lock().ctrls.iter().filter_map(Weak::upgrade).find(|c| c.cntlid == cntlid && !c.is_dead())
    }

    fn live_ctrls(&self) -> Vec<Arc<Ctrl>> {
        self.lock().ctrls.iter().filter_map(Weak::upgrade).collect()
    }

    pub fn to_json(&self) -> Value {
        let i = self.lock();
        let mut v = json!({
            "nqn": self.nqn,
            "subtype": if self.kind == SubsystemKind::Discovery { "Discovery" } else { "NVMe" },
            "listen_addresses": i.listeners.iter().map(ListenAddr::to_json).collect::<Vec<_>>(),
            "allow_any_host": i.allow_any_host,
            "hosts": i.hosts.iter().map(|h| {
                let mut v = auth::host_key_params(i.host_keys.iter().find(|k| &k.host == h));
                v["nqn"] = json!(h);
                v
            }).collect::<Vec<_>>(),
        });
        if self.kind == SubsystemKind::Nvme {
            let o = v.as_object_mut().expect("object");
            o.insert("serial_number".into(), json!(self.serial_number));
            o.insert("model_number".into(), json!(self.model_number));
            o.insert("max_namespaces".into(), json!(self.max_namespaces));
            o.insert("min_cntlid".into(), json!(self.min_cntlid));
            o.insert("max_cntlid".into(), json!(self.max_cntlid));
            let ns: Vec<Value> = i
                .namespaces
                .iter()
                .map(|n| {
                    let mut v = n.to_json();
                    if self.ana_reporting {
                        v["anagrpid"] = json!(n.anagrpid());
                    }
                    v
                })
                .collect();
            o.insert("namespaces".into(), Value::Array(ns));
        }
        v
    }
}

/// Admin-side state of a controller: only its admin queue and the control
/// plane touch it, under the controller's mutex.
pub(crate) struct CtrlAdmin {
    pub(crate) cc: u32,
    pub(crate) csts: u32,
    pub(crate) async_event_config: u32,
    pub(crate) num_io_queues: u32,
    /// Set Features values the host chose (Get returns them): Arbitration's
    /// dword, and the composite temperature's over and under thresholds in
    /// Kelvin. nvraid has no sensor, so no threshold ever fires.
    pub(crate) arbitration: u32,
    pub(crate) over_temp_threshold: u16,
    pub(crate) under_temp_threshold: u16,
    /// Namespaces changed since the host last read the log page.
    pub(crate) changed_ns: Vec<u32>,
    /// DH-HMAC-CHAP on the admin queue, once it started.
    pub(crate) admin_auth: Option<auth::AuthView>,
    /// An AEN for the changed namespace list is waiting for an AER, or has
    /// been sent and the log has not been read (no second one until then).
    pub(crate) ns_notice_pending: bool,
    pub(crate) ns_notice_masked: bool,
    /// The same pair for the ANA change notice (ANA log page).
    pub(crate) ana_notice_pending: bool,
    pub(crate) ana_notice_masked: bool,
    /// Reservation Notification log, mask and notice state.
    pub(crate) resv: reservation::CtrlNotices,
}

/// Counters of one queue pair for the SMART / health log. Only the queue
/// pair's reactor writes them (plain load + store, no read-modify-write);
/// the admin queue reads them from anywhere.
#[derive(Default)]
pub(crate) struct QpairStats {
    pub(crate) read_cmds: AtomicU64,
    pub(crate) write_cmds: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    /// Commands that failed with a media or data integrity error.
    pub(crate) media_errors: AtomicU64,
}

impl QpairStats {
    /// Single-writer increment.
    pub(crate) fn bump(c: &AtomicU64, by: u64) {
        c.store(c.load(Ordering::Relaxed).wrapping_add(by), Ordering::Relaxed);
    }

    /// Adds `other` into `self` (any thread; `self` is the controller's
    /// total of closed queues, written under the controller's queue lock).
    fn absorb(&self, other: &QpairStats) {
        for (to, from) in self.fields().into_iter().zip(other.fields()) {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    fn fields(&self) -> [&AtomicU64; 5] {
        [&self.read_cmds, &self.write_cmds, &self.bytes_read, &self.bytes_written, &self.media_errors]
    }

    pub(crate) fn snapshot(&self) -> [u64; 5] {
        self.fields().map(|f| f.load(Ordering::Relaxed))
    }
}

/// Counters of one reactor's NVMe/TCP connections: a poll group, in
/// `nvmf_get_stats`' words. Only that reactor writes them (plain load and
/// store, no read-modify-write); RPCs read them from anywhere.
#[derive(Default)]
#[repr(align(64))]
pub(crate) struct PollGroupStats {
    /// Admin and IO queues connected here since the transport was created.
    pub(crate) admin_qpairs: AtomicU64,
    pub(crate) io_qpairs: AtomicU64,
    pub(crate) current_admin_qpairs: AtomicU64,
    pub(crate) current_io_qpairs: AtomicU64,
    /// Connections whose fabrics Connect has not (yet) succeeded.
    pub(crate) current_unassociated_qpairs: AtomicU64,
    /// Bdev IOs submitted and not yet completed.
    pub(crate) pending_bdev_io: AtomicU64,
    /// NVM commands of IO queues answered (any status).
    pub(crate) completed_nvme_io: AtomicU64,
}

impl PollGroupStats {
    pub(crate) fn add(c: &AtomicU64) {
        c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }

    pub(crate) fn sub(c: &AtomicU64) {
        let v = c.load(Ordering::Relaxed);
        debug_assert!(v > 0, "poll group counter below zero");
        c.store(v.saturating_sub(1), Ordering::Relaxed);
    }

    fn to_json(&self, reactor: usize, tcp: &Value) -> Value {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "name": reactor_thread_name(reactor),
            "admin_qpairs": v(&self.admin_qpairs),
            "io_qpairs": v(&self.io_qpairs),
            "current_admin_qpairs": v(&self.current_admin_qpairs),
            "current_io_qpairs": v(&self.current_io_qpairs),
            "current_unassociated_qpairs": v(&self.current_unassociated_qpairs),
            "pending_bdev_io": v(&self.pending_bdev_io),
            "completed_nvme_io": v(&self.completed_nvme_io),
            "transports": [tcp],
        })
    }
}

/// An IO queue of a controller: where it runs, for Abort, and its counters.
pub(crate) struct QueueRef {
    pub(crate) qid: u16,
    pub(crate) reactor: usize,
    /// The connection's key in its reactor's table (`conn::lookup`).
    pub(crate) conn_key: u64,
    pub(crate) stats: Arc<QpairStats>,
    /// The host's end of the queue's connection.
    pub(crate) peer: Option<SocketAddr>,
    /// DH-HMAC-CHAP on this queue, once it started.
    pub(crate) auth: Option<auth::AuthView>,
}

/// A controller: created by an admin Connect, shared by its queue pairs on
/// any reactor.
pub struct Ctrl {
    pub cntlid: u16,
    pub subsys: Arc<Subsystem>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    /// The listener the admin queue came in through: the path whose ANA
    /// states this controller reports.
    pub listen: ListenAddr,
    /// Where the admin queue runs, and the host's end of its connection.
    pub(crate) admin_reactor: usize,
    pub(crate) admin_peer: Option<SocketAddr>,
    pub(crate) opts: Arc<TransportOpts>,
    pub(crate) kato_ms: AtomicU32,
    pub(crate) last_keep_alive_ns: AtomicU64,
    dead: AtomicBool,
    /// CSTS.RDY: IO queues may connect and IO commands run.
    pub(crate) ready: AtomicBool,
    /// Connected IO queues.
    pub(crate) queues: Mutex<Vec<QueueRef>>,
    /// Counters of IO queues that have closed.
    pub(crate) retired: QpairStats,
    pub(crate) admin: Mutex<CtrlAdmin>,
    /// Set when an event waits for the admin queue to deliver it.
    pub(crate) aen_flag: AtomicBool,
    /// Volatile Write Cache feature, WCE bit: cleared by the host, every
    /// write of this controller is sent with FUA.
    pub(crate) write_cache_enabled: AtomicBool,
}

impl Ctrl {
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Ends the controller: every queue pair of it disconnects.
    pub(crate) fn kill(&self, why: &str) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            tracing::info!(cntlid = self.cntlid, nqn = self.subsys.nqn, host = self.hostnqn, why, "controller ended");
        }
    }

    pub(crate) fn admin(&self) -> MutexGuard<'_, CtrlAdmin> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn queues(&self) -> MutexGuard<'_, Vec<QueueRef>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An IO queue closed: its counters join the controller's total.
    pub(crate) fn retire_queue(&self, qid: u16, conn_key: u64) {
        let mut q = self.queues();
        if let Some(i) = q.iter().position(|r| r.qid == qid && r.conn_key == conn_key) {
            let r = q.swap_remove(i);
            self.retired.absorb(&r.stats);
        }
    }

    /// SMART counters of the controller: read and write commands, bytes read
    /// and written, media errors, over its live and closed IO queues.
    pub(crate) fn smart_counters(&self) -> [u64; 5] {
        let q = self.queues();
        let mut sum = self.retired.snapshot();
        for r in q.iter() {
            for (s, v) in sum.iter_mut().zip(r.stats.snapshot()) {
                *s = s.wrapping_add(v);
            }
        }
        sum
    }

    /// `nvmf_subsystem_get_controllers` entry, in SPDK's shape.
    pub fn to_json(&self) -> Value {
        let cntrltype = if self.subsys.kind == SubsystemKind::Discovery { "discovery" } else { "io" };
        json!({
            "cntlid": self.cntlid,
            "cntrltype": cntrltype,
            "hostnqn": self.hostnqn,
            "hostid": Uuid::from_bytes(self.hostid).to_string(),
            "num_io_qpairs": self.queues().len(),
        })
    }

    /// `nvmf_subsystem_get_qpairs` entries of this controller: its admin
    /// queue and every connected IO queue.
    pub fn qpairs_json(&self) -> Vec<Value> {
        let entry = |qid: u16, reactor: usize, peer: Option<SocketAddr>, auth: Option<auth::AuthView>| {
            let mut v = json!({
                "cntlid": self.cntlid,
                "qid": qid,
                // Listed queues have completed their Connect.
                "state": "enabled",
                "thread": reactor_thread_name(reactor),
                "hostnqn": self.hostnqn,
                "listen_address": self.listen.to_json(),
            });
            if let Some(p) = peer {
                let adrfam = if p.is_ipv6() { "IPv6" } else { "IPv4" };
                v["peer_address"] = json!({"trtype": "TCP", "adrfam": adrfam,
                    "traddr": p.ip().to_string(), "trsvcid": p.port().to_string()});
            }
            if let Some(a) = auth {
                v["auth"] = a.to_json();
            }
            v
        };
        let admin_auth = self.admin.lock().unwrap_or_else(|e| e.into_inner()).admin_auth;
        let mut out = vec![entry(0, self.admin_reactor, self.admin_peer, admin_auth)];
        let mut q: Vec<(u16, usize, Option<SocketAddr>, Option<auth::AuthView>)> =
            self.queues().iter().map(|r| (r.qid, r.reactor, r.peer, r.auth)).collect();
        q.sort_unstable_by_key(|x| x.0);
        out.extend(q.into_iter().map(|(qid, r, p, a)| entry(qid, r, p, a)));
        out
    }

    /// A volatile write cache sits behind some namespace of the subsystem
    /// (Identify Controller VWC bit 0).
    pub(crate) fn write_cache_present(&self) -> bool {
        self.subsys.namespaces().iter().any(|n| n.bdev.bdev().has_write_cache())
    }

    /// Records namespace changes and raises a notice if the host wants one.
    fn notify_ns_changed(&self, nsid: u32) {
        let mut a = self.admin();
        if !a.changed_ns.contains(&nsid) {
            a.changed_ns.push(nsid);
        }
        if a.async_event_config & nvme_spec::features::async_event_config::NAMESPACE_ATTRIBUTE_NOTICES != 0
            && !a.ns_notice_masked
        {
            a.ns_notice_pending = true;
            self.aen_flag.store(true, Ordering::Release);
        }
    }

    /// The ANA log changed for this controller; raises a notice if the
    /// host enabled ANA change notices.
    fn notify_ana_changed(&self) {
        let mut a = self.admin();
        if a.async_event_config & nvme_spec::features::async_event_config::ANA_CHANGE_NOTICES != 0
            && !a.ana_notice_masked
        {
            a.ana_notice_pending = true;
            self.aen_flag.store(true, Ordering::Release);
        }
    }

    pub(crate) fn ana_notice_dword() -> u32 {
        AsyncEvent {
            event_type: async_event_type::NOTICE,
            info: async_event_notice::ANA_CHANGE,
            log_page: LogPageId::ASYMMETRIC_NAMESPACE_ACCESS.0,
        }
        .to_dword()
    }

    pub(crate) fn ns_notice_dword() -> u32 {
        AsyncEvent {
            event_type: async_event_type::NOTICE,
            info: async_event_notice::NAMESPACE_ATTRIBUTE_CHANGED,
            log_page: LogPageId::CHANGED_NAMESPACE_LIST.0,
        }
        .to_dword()
    }
}

struct ListenerEntry {
    addr: ListenAddr,
    /// TLS only (`secure_channel`): a port is secure or not for every
    /// subsystem on it.
    secure: bool,
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    users: usize,
}

#[derive(Default)]
struct StateInner {
    transport: Option<Arc<TransportOpts>>,
    pool: Option<Arc<bufpool::BufPool>>,
    subsystems: Vec<Arc<Subsystem>>,
    listeners: Vec<ListenerEntry>,
    /// `nvmf_delete_subsystem` removed the discovery subsystem (the Ceph
    /// gateway does at start, serving discovery itself): it stays gone.
    discovery_deleted: bool,
}

/// The target of one reactor set: `reactor::global::<NvmfState>()`.
#[derive(Default)]
pub struct NvmfState {
    inner: Mutex<StateInner>,
    next_reactor: AtomicUsize,
    /// Discovery log generation counter.
    pub(crate) genctr: AtomicU64,
    /// Live connections (for shutdown's drain).
    pub(crate) connections: AtomicUsize,
    pub(crate) shutting_down: AtomicBool,
    next_portid: AtomicU16,
    /// When the transport was created: power-on time of the SMART log.
    started: std::sync::OnceLock<std::time::Instant>,
    /// States the IO path believes impossible (a completion for a slot that
    /// is not in flight, ...): each was asserted in debug builds, logged,
    /// and answered with an error where a command was waiting.
    pub(crate) impossible_events: AtomicU64,
    /// Keys of connections in their reactor's table.
    pub(crate) next_conn_key: AtomicU64,
    /// One per reactor, sized when the transport is created.
    poll_groups: std::sync::OnceLock<Vec<PollGroupStats>>,
}

impl NvmfState {
    /// The target of the current reactor's set.
    pub fn get() -> Arc<NvmfState> {
        reactor::global::<NvmfState>()
    }

    fn lock(&self) -> MutexGuard<'_, StateInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn transport(&self) -> Option<Arc<TransportOpts>> {
        self.lock().transport.clone()
    }

    /// `nvmf_create_transport`: one TCP transport per target. Call it on a
    /// reactor (the buffer caches are sized for the reactor count).
    pub fn create_transport(&self, opts: TransportOpts) -> Result<(), NvmfError> {
        opts.validate()?;
        let pool = bufpool::BufPool::new(&opts, reactor::count())?;
        let mut s = self.lock();
        if s.transport.is_some() {
            return Err(NvmfError::Exists("transport TCP".into()));
        }
        s.transport = Some(Arc::new(opts));
        s.pool = Some(Arc::new(pool));
        let _ = self.poll_groups.set((0..reactor::count().max(1)).map(|_| PollGroupStats::default()).collect());
        let _ = self.started.set(std::time::Instant::now());
        Self::ensure_discovery(&mut s);
        Ok(())
    }

    pub(crate) fn pool(&self) -> Option<Arc<bufpool::BufPool>> {
        self.lock().pool.clone()
    }

    /// Seconds since the transport was created.
    pub(crate) fn uptime_secs(&self) -> u64 {
        self.started.get().map_or(0, |t| t.elapsed().as_secs())
    }

    /// Records a state the IO path believes impossible: asserts in debug
    /// builds, logs, and counts it (`nvmf_get_stats`).
    pub(crate) fn impossible(&self, what: &str) {
        self.impossible_events.fetch_add(1, Ordering::Relaxed);
        tracing::error!("NVMe/TCP target: impossible state: {what}");
        debug_assert!(false, "NVMe/TCP target: impossible state: {what}");
    }

    /// Times the IO path met a state it believes impossible.
    pub fn impossible_event_count(&self) -> u64 {
        self.impossible_events.load(Ordering::Relaxed)
    }

    /// The counters of reactor `reactor`'s connections.
    pub(crate) fn poll_group(&self, reactor: usize) -> Option<&PollGroupStats> {
        self.poll_groups.get().and_then(|g| g.get(reactor))
    }

    /// `nvmf_get_stats` in SPDK's shape (`tick_rate`, `poll_groups` with
    /// their `transports`): one poll group per reactor with the counters
    /// its connections keep. Each group's TCP entry shows the transport's
    /// one data buffer pool (all groups draw from it: the same figures in
    /// every group) and nvraid's target-wide count of impossible IO path
    /// states.
    pub fn stats_json(&self) -> Value {
        let pool = self.pool();
        let mut tcp = json!({
            "trtype": "TCP",
            "impossible_completions": self.impossible_event_count(),
        });
        if let (Some(p), Some(o)) = (pool, tcp.as_object_mut()) {
            o.insert("data_buffers_total".into(), json!(p.total_units()));
            o.insert("data_buffers_free".into(), json!(p.free_units()));
            o.insert("data_buffer_cache_per_reactor".into(), json!(p.cache_units()));
            o.insert("pending_data_buffer".into(), json!(p.waits.load(Ordering::Relaxed)));
        }
        let groups: Vec<Value> = self
            .poll_groups
            .get()
            .map(|g| g.iter().enumerate().map(|(r, s)| s.to_json(r, &tcp)).collect())
            .unwrap_or_default();
        json!({"tick_rate": bdev::tsc::tick_rate(), "poll_groups": groups})
    }

    fn ensure_discovery(s: &mut StateInner) {
        if !s.discovery_deleted && !s.subsystems.iter().any(|x| x.kind == SubsystemKind::Discovery) {
            let mut p = SubsystemParams::new(DISCOVERY_NQN);
            p.allow_any_host = true;
            s.subsystems.insert(0, Arc::new(Subsystem::new(&p, SubsystemKind::Discovery)));
        }
    }

    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        let mut s = self.lock();
        Self::ensure_discovery(&mut s);
        s.subsystems.clone()
    }

    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.lock().subsystems.iter().find(|s| s.nqn == nqn).cloned()
    }

    fn discovery_changed(&self) {
        self.genctr.fetch_add(1, Ordering::AcqRel);
    }

    /// `nvmf_create_subsystem`.
    pub fn create_subsystem(&self, p: SubsystemParams) -> Result<Arc<Subsystem>, NvmfError> {
        validate_nqn(&p.nqn)?;
        if p.nqn == DISCOVERY_NQN {
            if self.lock().discovery_deleted {
                return Err(NvmfError::Invalid(format!("{DISCOVERY_NQN} was deleted; a restart brings it back")));
            }
            return Err(NvmfError::Exists(p.nqn));
        }
        if p.serial_number.len() > 20 || !p.serial_number.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(NvmfError::Invalid(format!(
                "serial number '{}' must be at most 20 ASCII characters",
                p.serial_number
            )));
        }
        if p.model_number.len() > 40 || !p.model_number.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(NvmfError::Invalid(format!(
                "model number '{}' must be at most 40 ASCII characters",
                p.model_number
            )));
        }
        if p.min_cntlid == 0 || p.min_cntlid > p.max_cntlid || p.max_cntlid > 0xFFEF {
            return Err(NvmfError::Invalid("cntlid range must lie within 1..=65519".into()));
        }
        if p.max_namespaces == 0 || p.max_namespaces > 1024 {
            return Err(NvmfError::Invalid("max_namespaces must be 1..=1024".into()));
        }
        let mut s = self.lock();
        Self::ensure_discovery(&mut s);
        if s.subsystems.iter().any(|x| x.nqn == p.nqn) {
            return Err(NvmfError::Exists(format!("subsystem {}", p.nqn)));
        }
        let sub = Arc::new(Subsystem::new(&p, SubsystemKind::Nvme));
        s.subsystems.push(sub.clone());
        drop(s);
        self.discovery_changed();
        Ok(sub)
    }

    fn nvme_subsystem(&self, nqn: &str) -> Result<Arc<Subsystem>, NvmfError> {
        match self.subsystem(nqn) {
            Some(s) if s.kind == SubsystemKind::Nvme => Ok(s),
            Some(_) => Err(NvmfError::Invalid(format!("{nqn} is the discovery subsystem"))),
            None => Err(NvmfError::NotFound(format!("subsystem {nqn}"))),
        }
    }

    /// `nvmf_delete_subsystem`: its controllers end (their in-flight IO
    /// completes first: a queue pair keeps its requests until the bdev is
    /// done), its listeners are released.
    pub fn delete_subsystem(&self, nqn: &str) -> Result<(), NvmfError> {
        if nqn == DISCOVERY_NQN {
            return self.delete_discovery();
        }
        let sub = self.nvme_subsystem(nqn)?;
        sub.deleted.store(true, Ordering::Release);
        sub.bump();
        for c in sub.live_ctrls() {
            c.kill("subsystem deleted");
        }
        let addrs = sub.listeners();
        let mut s = self.lock();
        s.subsystems.retain(|x| !Arc::ptr_eq(x, &sub));
        for a in addrs {
            Self::release_listener(&mut s, &a);
        }
        drop(s);
        sub.lock().namespaces.clear();
        self.discovery_changed();
        Ok(())
    }

    /// `nvmf_delete_subsystem` of the discovery NQN, as SPDK allows: its
    /// controllers end, its listeners close, and hosts can no longer
    /// connect to it until the target restarts.
    fn delete_discovery(&self) -> Result<(), NvmfError> {
        let Some(sub) = self.subsystems().into_iter().find(|x| x.kind == SubsystemKind::Discovery) else {
            return Err(NvmfError::NotFound(format!("subsystem {DISCOVERY_NQN}")));
        };
        // In delete_subsystem's order: no new controllers, the live ones
        // end, then the subsystem and its listeners go.
        sub.deleted.store(true, Ordering::Release);
        sub.bump();
        for c in sub.live_ctrls() {
            c.kill("subsystem deleted");
        }
        let addrs = sub.listeners();
        let mut s = self.lock();
        s.subsystems.retain(|x| !Arc::ptr_eq(x, &sub));
        s.discovery_deleted = true;
        for a in addrs {
            Self::release_listener(&mut s, &a);
        }
        Ok(())
    }

    /// `nvmf_subsystem_add_ns`: returns the NSID. `nsid` 0 picks the lowest free.
    pub fn add_ns(
        &self,
        nqn: &str,
        bdev_name: &str,
        nsid: u32,
        uuid: Option<Uuid>,
        nguid: Option<[u8; 16]>,
    ) -> Result<u32, NvmfError> {
        self.add_ns_with(nqn, bdev_name, NsOptions { nsid, uuid, nguid, ..NsOptions::default() })
    }

    /// `nvmf_subsystem_add_ns` with every option: returns the NSID.
    pub fn add_ns_with(&self, nqn: &str, bdev_name: &str, o: NsOptions) -> Result<u32, NvmfError> {
        let NsOptions { nsid, uuid, nguid, anagrpid, no_auto_visible, ptpl_file } = o;
        let sub = self.nvme_subsystem(nqn)?;
        let bdev = Registry::get().lookup(bdev_name).ok_or_else(|| NvmfError::NotFound(format!("bdev {bdev_name}")))?;
        // The ptpl_file is read before the subsystem's lock is taken.
        let resv = reservation::Reservations::new(ptpl_file, bdev.props().uuid).map_err(NvmfError::Invalid)?;
        let mut i = sub.lock();
        let nsid = if nsid == 0 {
            (1..=sub.max_namespaces)
                .find(|n| !i.namespaces.iter().any(|x| x.nsid == *n))
                .ok_or_else(|| NvmfError::Invalid(format!("subsystem {nqn} has no free namespace ID")))?
        } else {
            nsid
        };
        if nsid > sub.max_namespaces || nsid == 0xFFFF_FFFF {
            return Err(NvmfError::Invalid(format!("nsid {nsid} exceeds max_namespaces {}", sub.max_namespaces)));
        }
        if i.namespaces.iter().any(|x| x.nsid == nsid) {
            return Err(NvmfError::Exists(format!("nsid {nsid} in {nqn}")));
        }
        if i.namespaces.iter().any(|x| x.bdev.same(&bdev)) {
            return Err(NvmfError::Exists(format!("bdev {bdev_name} in {nqn}")));
        }
        // A namespace's own NSID is its default group, as SPDK numbers them.
        let anagrpid = if anagrpid == 0 { nsid } else { anagrpid };
        if anagrpid > sub.max_namespaces {
            return Err(NvmfError::Invalid(format!(
                "anagrpid {anagrpid} exceeds the subsystem's ANA group count (max_namespaces {})",
                sub.max_namespaces
            )));
        }
        let uuid = uuid.unwrap_or(bdev.props().uuid);
        let nguid = nguid.unwrap_or(*uuid.as_bytes());
        // A resized bdev: IO queues pick up the new size (generation bump),
        // and hosts that see the namespace get a Namespace Attribute
        // Changed notice with it in the Changed Namespace List, after which
        // Identify Namespace reports the new NSZE/NCAP.
        let weak = Arc::downgrade(&sub);
        let handle = bdev.clone();
        let events = bdev.on_event(move |ev| {
            let BdevEvent::Resize { old_blocks, new_blocks } = ev else { return };
            let Some(sub) = weak.upgrade() else { return };
            let ns = sub.lock().namespaces.iter().find(|n| n.nsid == nsid && n.bdev.same(&handle)).cloned();
            let Some(ns) = ns else { return };
            tracing::info!(nqn = sub.nqn, nsid, old_blocks, new_blocks, "namespace resized");
            sub.bump();
            for c in sub.live_ctrls().into_iter().filter(|c| ns.visible_to(&c.hostnqn)) {
                c.notify_ns_changed(nsid);
            }
        });
        let ns = Arc::new(Namespace {
            nsid,
            bdev: bdev.clone(),
            uuid,
            nguid,
            anagrpid: AtomicU32::new(anagrpid),
            auto_visible: !no_auto_visible,
            hosts: Mutex::new(Vec::new()),
            resv: Arc::new(resv),
            events,
        });
        let pos = i.namespaces.iter().position(|x| x.nsid > nsid).unwrap_or(i.namespaces.len());
        i.namespaces.insert(pos, ns.clone());
        i.ana_chgcnt += 1;
        drop(i);
        sub.bump();
        // Hot remove: the namespace goes with its bdev (and hosts hear of it).
        let weak = Arc::downgrade(&sub);
        let handle = bdev.clone();
        bdev.on_remove(move || {
            if let Some(sub) = weak.upgrade() {
                let present = sub.lock().namespaces.iter().any(|n| n.nsid == nsid && n.bdev.same(&handle));
                if present {
                    tracing::info!(nqn = sub.nqn, nsid, "namespace's bdev is going away: detaching it");
                    detach_ns(&sub, nsid);
                }
            }
        });
        for c in sub.live_ctrls().into_iter().filter(|c| ns.visible_to(&c.hostnqn)) {
            c.notify_ns_changed(nsid);
        }
        Ok(nsid)
    }

    /// `nvmf_subsystem_set_ns_ana_group`: moves a namespace to another ANA
    /// group; its hosts hear of it as a namespace attribute change.
    pub fn set_ns_ana_group(&self, nqn: &str, nsid: u32, anagrpid: u32) -> Result<(), NvmfError> {
        let sub = self.nvme_subsystem(nqn)?;
        if anagrpid == 0 || anagrpid > sub.max_namespaces {
            return Err(NvmfError::Invalid(format!(
                "anagrpid {anagrpid} must be 1..={} (max_namespaces)",
                sub.max_namespaces
            )));
        }
        let mut i = sub.lock();
        let ns = i
            .namespaces
            .iter()
            .find(|n| n.nsid == nsid)
            .cloned()
            .ok_or_else(|| NvmfError::NotFound(format!("nsid {nsid} in {nqn}")))?;
        if ns.anagrpid.swap(anagrpid, Ordering::AcqRel) == anagrpid {
            return Ok(());
        }
        i.ana_chgcnt += 1;
        drop(i);
        sub.bump();
        for c in sub.live_ctrls().into_iter().filter(|c| ns.visible_to(&c.hostnqn)) {
            c.notify_ns_changed(nsid);
            c.notify_ana_changed();
        }
        Ok(())
    }

    /// `nvmf_subsystem_listener_set_ana_state`: the state of group
    /// `anagrpid` (every group when 0) through listener `addr`; controllers
    /// that came in through it get an ANA change notice.
    pub fn set_ana_state(&self, nqn: &str, addr: &ListenAddr, state: AnaState, anagrpid: u32) -> Result<(), NvmfError> {
        let sub = self.nvme_subsystem(nqn)?;
        if !sub.ana_reporting {
            return Err(NvmfError::Invalid(format!("subsystem {nqn} was created without ana_reporting")));
        }
        if anagrpid > sub.max_namespaces {
            return Err(NvmfError::Invalid(format!(
                "anagrpid {anagrpid} exceeds the subsystem's ANA group count (max_namespaces {})",
                sub.max_namespaces
            )));
        }
        let mut i = sub.lock();
        let next = i.ana_chgcnt + 1;
        let Some(l) = i.ana.iter_mut().find(|l| &l.addr == addr) else {
            return Err(NvmfError::NotFound(format!("listener {}:{} on {nqn}", addr.traddr, addr.trsvcid)));
        };
        let mut changed = false;
        for g in 0..l.states.len() {
            if (anagrpid == 0 || g + 1 == anagrpid as usize) && l.states[g] != state {
                l.states[g] = state;
                l.changed_at[g] = next;
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        i.ana_chgcnt = next;
        drop(i);
        sub.bump();
        for c in sub.live_ctrls().into_iter().filter(|c| &c.listen == addr) {
            c.notify_ana_changed();
        }
        Ok(())
    }

    /// `nvmf_ns_add_host` / `nvmf_ns_remove_host`: shows a namespace that
    /// is not auto visible to a host's controllers, or hides it again.
    /// Controllers whose view changes get a namespace attribute notice.
    pub fn ns_set_host_visible(&self, nqn: &str, nsid: u32, host: &str, visible: bool) -> Result<(), NvmfError> {
        validate_nqn(host)?;
        let sub = self.nvme_subsystem(nqn)?;
        let i = sub.lock();
        let ns = i
            .namespaces
            .iter()
            .find(|n| n.nsid == nsid)
            .cloned()
            .ok_or_else(|| NvmfError::NotFound(format!("nsid {nsid} in {nqn}")))?;
        if ns.auto_visible {
            return Err(NvmfError::Invalid(format!(
                "nsid {nsid} in {nqn} is visible to every host (added without no_auto_visible)"
            )));
        }
        let mut hosts = ns.hosts();
        let was = hosts.iter().any(|h| h == host);
        if was == visible {
            return Ok(());
        }
        if visible {
            hosts.push(host.to_string());
        } else {
            hosts.retain(|h| h != host);
        }
        drop(hosts);
        drop(i);
        sub.bump();
        for c in sub.live_ctrls().into_iter().filter(|c| c.hostnqn == host) {
            c.notify_ns_changed(nsid);
        }
        Ok(())
    }

    /// `nvmf_subsystem_remove_ns`.
    pub fn remove_ns(&self, nqn: &str, nsid: u32) -> Result<(), NvmfError> {
        let sub = self.nvme_subsystem(nqn)?;
        if !sub.lock().namespaces.iter().any(|n| n.nsid == nsid) {
            return Err(NvmfError::NotFound(format!("nsid {nsid} in {nqn}")));
        }
        detach_ns(&sub, nsid);
        Ok(())
    }

    /// `nvmf_subsystem_add_host`.
    pub fn add_host(&self, nqn: &str, host: &str) -> Result<(), NvmfError> {
        validate_nqn(host)?;
        let sub = self.nvme_subsystem(nqn)?;
        let mut i = sub.lock();
        if i.hosts.iter().any(|h| h == host) {
            return Err(NvmfError::Exists(format!("host {host} in {nqn}")));
        }
        i.hosts.push(host.to_string());
        drop(i);
        self.discovery_changed();
        Ok(())
    }

    /// `nvmf_subsystem_remove_host`: that host's controllers end.
    pub fn remove_host(&self, nqn: &str, host: &str) -> Result<(), NvmfError> {
        let sub = self.nvme_subsystem(nqn)?;
        let mut i = sub.lock();
        let before = i.hosts.len();
        i.hosts.retain(|h| h != host);
        i.host_keys.retain(|k| k.host != host);
        i.host_psks.retain(|(h, _)| h != host);
        if i.hosts.len() == before {
            return Err(NvmfError::NotFound(format!("host {host} in {nqn}")));
        }
        let allow_any = i.allow_any_host;
        drop(i);
        if !allow_any {
            for c in sub.live_ctrls().into_iter().filter(|c| c.hostnqn == host) {
                c.kill("host removed from the subsystem");
            }
        }
        self.discovery_changed();
        Ok(())
    }

    /// `nvmf_subsystem_allow_any_host`.
    pub fn allow_any_host(&self, nqn: &str, allow: bool) -> Result<(), NvmfError> {
        let sub = self.nvme_subsystem(nqn)?;
        sub.lock().allow_any_host = allow;
        self.discovery_changed();
        Ok(())
    }

    /// `nvmf_subsystem_add_listener`: binds the address (once per target)
    /// and starts accepting on the calling reactor. Must run on a reactor.
    pub fn add_listener(&self, nqn: &str, addr: ListenAddr) -> Result<(), NvmfError> {
        self.add_listener_ana(nqn, addr, AnaState::Optimized)
    }

    /// `nvmf_subsystem_add_listener` with the ANA state every group starts
    /// with through it.
    pub fn add_listener_ana(&self, nqn: &str, addr: ListenAddr, ana_state: AnaState) -> Result<(), NvmfError> {
        self.add_listener_opts(nqn, addr, ana_state, false)
    }

    /// `nvmf_subsystem_add_listener` with its ANA state and
    /// `secure_channel` (TLS only on that port).
    pub fn add_listener_opts(
        &self,
        nqn: &str,
        addr: ListenAddr,
        ana_state: AnaState,
        secure: bool,
    ) -> Result<(), NvmfError> {
        let sub = self.subsystem(nqn).ok_or_else(|| NvmfError::NotFound(format!("subsystem {nqn}")))?;
        if ana_state != AnaState::Optimized && !sub.ana_reporting {
            return Err(NvmfError::Invalid(format!(
                "ana_state {}: subsystem {nqn} was created without ana_reporting",
                ana_state.name()
            )));
        }
        if secure && sub.lock().allow_any_host {
            return Err(NvmfError::Invalid(format!(
                "secure_channel on {nqn}: not with allow_any_host (hosts need a PSK)"
            )));
        }
        let opts = self.transport().ok_or_else(|| NvmfError::Invalid("create the TCP transport first".into()))?;
        if sub.lock().listeners.contains(&addr) {
            return Err(NvmfError::Exists(format!("listener {}:{} on {nqn}", addr.traddr, addr.trsvcid)));
        }
        let mut s = self.lock();
        if let Some(e) = s.listeners.iter_mut().find(|e| e.addr == addr) {
            if e.secure != secure {
                return Err(NvmfError::Invalid(format!(
                    "listener {}:{} has secure_channel={} for another subsystem",
                    addr.traddr, addr.trsvcid, e.secure
                )));
            }
            e.users += 1;
        } else {
            let tls = if secure { Some(crate::tls::listener_context(&addr)?) } else { None };
            let sa = addr.socket_addr()?;
            let l = TcpListener::bind(sa).map_err(|e| NvmfError::Io(format!("listen on {sa}: {e}")))?;
            l.set_nonblocking(true).map_err(|e| NvmfError::Io(e.to_string()))?;
            let local = l.local_addr().map_err(|e| NvmfError::Io(e.to_string()))?;
            let stop = Arc::new(AtomicBool::new(false));
            let portid = self.next_portid.fetch_add(1, Ordering::Relaxed) + 1;
            start_accepting(l, addr.clone(), portid, opts, stop.clone(), tls);
            tracing::info!(traddr = addr.traddr, trsvcid = addr.trsvcid, "NVMe/TCP target listening");
            s.listeners.push(ListenerEntry { addr: addr.clone(), secure, local, stop, users: 1 });
        }
        drop(s);
        let mut i = sub.lock();
        let groups = if sub.kind == SubsystemKind::Nvme { sub.max_namespaces as usize } else { 0 };
        i.ana.retain(|l| l.addr != addr);
        i.ana.push(ListenerAna { addr: addr.clone(), states: vec![ana_state; groups], changed_at: vec![0; groups] });
        i.listeners.push(addr);
        drop(i);
        sub.bump();
        self.discovery_changed();
        Ok(())
    }

    fn release_listener(s: &mut StateInner, addr: &ListenAddr) {
        if let Some(pos) = s.listeners.iter().position(|e| &e.addr == addr) {
            s.listeners[pos].users -= 1;
            if s.listeners[pos].users == 0 {
                let e = s.listeners.remove(pos);
                e.stop.store(true, Ordering::Release);
            }
        }
    }

    /// `nvmf_subsystem_remove_listener`: the subsystem's connections that
    /// came in through it end.
    pub fn remove_listener(&self, nqn: &str, addr: &ListenAddr) -> Result<(), NvmfError> {
        let sub = self.subsystem(nqn).ok_or_else(|| NvmfError::NotFound(format!("subsystem {nqn}")))?;
        let mut i = sub.lock();
        let before = i.listeners.len();
        i.listeners.retain(|a| a != addr);
        if i.listeners.len() == before {
            return Err(NvmfError::NotFound(format!("listener {}:{} on {nqn}", addr.traddr, addr.trsvcid)));
        }
        i.ana.retain(|l| &l.addr != addr);
        drop(i);
        sub.bump();
        Self::release_listener(&mut self.lock(), addr);
        self.discovery_changed();
        Ok(())
    }

    /// Whether a listener is TLS only (`secure_channel`).
    pub fn listener_secure(&self, addr: &ListenAddr) -> bool {
        self.lock().listeners.iter().any(|e| &e.addr == addr && e.secure)
    }

    /// The bound address of a listener (tests bind port 0 and ask).
    pub fn local_addr(&self, addr: &ListenAddr) -> Option<SocketAddr> {
        self.lock().listeners.iter().find(|e| &e.addr == addr).map(|e| e.local)
    }

    /// `nvme connect` lines for every subsystem's TCP listeners.
    pub fn connect_lines(&self) -> Vec<String> {
        self.subsystems()
            .iter()
            .filter(|s| s.kind == SubsystemKind::Nvme)
            .flat_map(|s| s.listeners().into_iter().map(move |a| a.connect_line(&s.nqn)))
            .collect()
    }

    /// The calls that recreate the target (for `save_config`).
    pub fn config(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let Some(t) = self.transport() else {
            return out;
        };
        out.push(json!({"method": "nvmf_create_transport", "params": t.to_json()}));
        if self.lock().discovery_deleted {
            out.push(json!({"method": "nvmf_delete_subsystem", "params": {"nqn": DISCOVERY_NQN}}));
        }
        for s in self.subsystems() {
            if s.kind == SubsystemKind::Discovery {
                for a in s.listeners() {
                    out.push(json!({"method": "nvmf_subsystem_add_listener", "params": {
                        "nqn": s.nqn, "listen_address": a.to_json(), "secure_channel": self.listener_secure(&a)}}));
                }
                continue;
            }
            let i = s.lock();
            out.push(json!({"method": "nvmf_create_subsystem", "params": {
                "nqn": s.nqn, "allow_any_host": i.allow_any_host, "serial_number": s.serial_number,
                "model_number": s.model_number, "max_namespaces": s.max_namespaces,
                "min_cntlid": s.min_cntlid, "max_cntlid": s.max_cntlid, "ana_reporting": s.ana_reporting}}));
            for h in &i.hosts {
                let mut params = auth::host_key_params(i.host_keys.iter().find(|k| &k.host == h));
                params["nqn"] = json!(s.nqn);
                params["host"] = json!(h);
                if let Some((_, k)) = i.host_psks.iter().find(|(ph, _)| ph == h) {
                    params["psk"] = json!(k.name);
                }
                out.push(json!({"method": "nvmf_subsystem_add_host", "params": params}));
            }
            for n in &i.namespaces {
                let mut ns = n.to_json();
                if let Some(o) = ns.as_object_mut() {
                    o.remove("name");
                    o.insert("no_auto_visible".into(), json!(!n.auto_visible));
                    if s.ana_reporting {
                        o.insert("anagrpid".into(), json!(n.anagrpid()));
                    }
                }
                out.push(json!({"method": "nvmf_subsystem_add_ns", "params": {"nqn": s.nqn, "namespace": ns}}));
            }
            for n in &i.namespaces {
                for h in n.hosts().iter() {
                    out.push(
                        json!({"method": "nvmf_ns_add_host", "params": {"nqn": s.nqn, "nsid": n.nsid, "host": h}}),
                    );
                }
            }
            for a in &i.listeners {
                out.push(json!({"method": "nvmf_subsystem_add_listener", "params": {
                    "nqn": s.nqn, "listen_address": a.to_json(), "secure_channel": self.listener_secure(a)}}));
                if let Some(l) = i.ana.iter().find(|l| &l.addr == a).filter(|_| s.ana_reporting) {
                    out.extend(ana_state_calls(&s.nqn, l));
                }
            }
        }
        out
    }

    /// Live NVMe/TCP connections.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
}

fn detach_ns(sub: &Arc<Subsystem>, nsid: u32) {
    let mut i = sub.lock();
    let gone: Vec<Arc<Namespace>> = i.namespaces.iter().filter(|n| n.nsid == nsid).cloned().collect();
    i.namespaces.retain(|n| n.nsid != nsid);
    i.ana_chgcnt += 1;
    drop(i);
    sub.bump();
    for c in sub.live_ctrls().into_iter().filter(|c| gone.iter().any(|n| n.visible_to(&c.hostnqn))) {
        c.notify_ns_changed(nsid);
    }
}

/// The name of a reactor's thread as `framework_get_reactors` lists it (its
/// `lw_threads`): the application thread on reactor 0.
fn reactor_thread_name(reactor: usize) -> String {
    if reactor == 0 {
        "app_thread".to_string()
    } else {
        format!("reactor_{reactor}")
    }
}

/// The `nvmf_subsystem_listener_set_ana_state` calls that give a listener
/// added in the optimized state the states `l` has: one for all groups
/// where they agree, else one per group not optimized.
fn ana_state_calls(nqn: &str, l: &ListenerAna) -> Vec<Value> {
    let call = |state: AnaState, anagrpid: Option<usize>| {
        let mut p = json!({"nqn": nqn, "listen_address": l.addr.to_json(), "ana_state": state.name()});
        if let Some(g) = anagrpid {
            p["anagrpid"] = json!(g);
        }
        json!({"method": "nvmf_subsystem_listener_set_ana_state", "params": p})
    };
    match l.states.first() {
        Some(&first) if l.states.iter().all(|&x| x == first) => {
            if first == AnaState::Optimized {
                Vec::new()
            } else {
                vec![call(first, None)]
            }
        }
        _ => l
            .states
            .iter()
            .enumerate()
            .filter(|(_, &x)| x != AnaState::Optimized)
            .map(|(g, &x)| call(x, Some(g + 1)))
            .collect(),
    }
}

pub(crate) fn validate_nqn(nqn: &str) -> Result<(), NvmfError> {
    if nqn.is_empty() || nqn.len() > nvme_spec::text::NQN_MAX_LEN || nqn.contains('\0') {
        return Err(NvmfError::Invalid(format!("NQN '{nqn}' must be 1..=223 bytes")));
    }
    if !nqn.starts_with("nqn.") {
        return Err(NvmfError::Invalid(format!("NQN '{nqn}' must start with 'nqn.'")));
    }
    Ok(())
}

/// Accepts on the current reactor (a timed poller: accept latency does not
/// matter, syscalls every loop would) and hands each connection to the
/// next reactor round-robin.
fn start_accepting(
    l: TcpListener,
    addr: ListenAddr,
    portid: u16,
    opts: Arc<TransportOpts>,
    stop: Arc<AtomicBool>,
    tls: Option<sock::TlsServer>,
) {
    let state = NvmfState::get();
    let tickets = state.clone();
    let closed_addr = addr.clone();
    let closed = move || {
        let closed = stop.load(Ordering::Acquire) || state.shutting_down.load(Ordering::Acquire);
        if closed {
            tracing::info!(traddr = closed_addr.traddr, trsvcid = closed_addr.trsvcid, "NVMe/TCP listener closed");
        }
        closed
    };
    sock::accept_round_robin(
        "nvmf_tcp_accept",
        l,
        move || tickets.next_reactor.fetch_add(1, Ordering::Relaxed),
        closed,
        move |stream, peer, to| {
            let (addr, opts, tls) = (addr.clone(), opts.clone(), tls.clone());
            tracing::debug!(%peer, reactor = to, "NVMe/TCP connection accepted");
            move || match tls {
                Some(tls) => crate::tls::accept(&tls, stream, addr, portid, opts),
                None => conn::start(sock::Stream::Plain(stream), addr, portid, opts),
            }
        },
    );
}

/// Stops the target before the bdevs go: listeners close, every controller
/// ends, and `done` runs (on the calling reactor) once every connection
/// has drained its in-flight IO and closed, or after 10 s.
pub fn shutdown(done: impl FnOnce() + Send + 'static) {
    let state = NvmfState::get();
    state.shutting_down.store(true, Ordering::Release);
    for s in state.subsystems() {
        for c in s.live_ctrls() {
            c.kill("target shutting down");
        }
    }
    {
        let mut s = state.lock();
        for e in s.listeners.drain(..) {
            e.stop.store(true, Ordering::Release);
        }
    }
    sock::when_drained("nvmf_shutdown_wait", Duration::from_secs(10), move || state.connection_count(), done);
}
