//! Remote namespaces as bdevs (`bdev_nvme_attach_controller` with trtype
//! TCP): one bdev per namespace (`NAMEn<nsid>`), one IO queue per reactor
//! shared by the controller's namespaces (the engine is in `ns_queue`:
//! splitting at MDTS, the queue-size bound, FIFO waiting), keep alive on the
//! attaching reactor.

use super::ns_queue::Queue;
use super::qpair::{AdminQpair, HostQpair, QpairParts};
use super::{connect, ConnectParams, CtrlInfo, Session, DEFAULT_HOSTNQN};
use bdev::{Bdev, BdevChannel, BdevError, BdevIo, BdevProps, IoBox, IoType, Registry};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `bdev_nvme_attach_controller` parameters (SPDK's names).
#[derive(Debug, Clone)]
pub struct AttachParams {
    pub name: String,
    pub trtype: String,
    pub traddr: String,
    pub adrfam: Option<String>,
    pub trsvcid: String,
    pub subnqn: String,
    pub hostnqn: Option<String>,
    pub hdgst: bool,
    pub ddgst: bool,
}

/// SPDK's spelling of an address family (`spdk_nvme_transport_id_adrfam_str`),
/// for the ones a TCP address can have.
fn adrfam_name(adrfam: Option<&str>) -> Result<&'static str, BdevError> {
    match adrfam {
        None => Ok("IPv4"),
        Some(a) if a.eq_ignore_ascii_case("ipv4") => Ok("IPv4"),
        Some(a) if a.eq_ignore_ascii_case("ipv6") => Ok("IPv6"),
        Some(a) => Err(BdevError::Invalid(format!("adrfam {a} is not an address family of TCP (IPv4 or IPv6)"))),
    }
}

/// The controller's state as SPDK names it in `bdev_nvme_get_controllers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum CtrlState {
    /// Admin and IO queues connected.
    Enabled = 0,
    /// The admin queue or an IO queue lost its connection (nvraid does not
    /// reconnect yet: the path stays failed until detached).
    Failed = 1,
    /// Being detached.
    Deleting = 2,
}

impl CtrlState {
    fn name(self) -> &'static str {
        match self {
            CtrlState::Enabled => "enabled",
            CtrlState::Failed => "failed",
            CtrlState::Deleting => "deleting",
        }
    }
}

struct RemoteCtrl {
    id: u64,
    params: AttachParams,
    /// `adrfam` as SPDK spells it.
    adrfam: &'static str,
    info: CtrlInfo,
    /// The IO queues' negotiated size (entries; each carries one less).
    io_queue_entries: u16,
    num_io_queues: usize,
    /// IO queues not yet taken, one per reactor.
    io_parts: Mutex<Vec<Option<QpairParts>>>,
    bdevs: Mutex<Vec<String>>,
    detached: AtomicBool,
    /// A [`CtrlState`]: written by the admin poller and the IO pollers
    /// (Enabled → Failed) and by detach (→ Deleting, final).
    state: AtomicU8,
    /// Completions the IO queues reported for IOs they did not hold: each
    /// is asserted in debug builds and counted here
    /// (`bdev_nvme_get_controllers`, `impossible_completions`).
    impossible_completions: AtomicU64,
}

impl RemoteCtrl {
    fn state(&self) -> CtrlState {
        match self.state.load(Ordering::Acquire) {
            0 => CtrlState::Enabled,
            1 => CtrlState::Failed,
            _ => CtrlState::Deleting,
        }
    }

    /// A queue lost its connection; a controller being deleted stays so.
    fn set_failed(&self) {
        let _ = self.state.compare_exchange(
            CtrlState::Enabled as u8,
            CtrlState::Failed as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    fn set_deleting(&self) {
        self.state.store(CtrlState::Deleting as u8, Ordering::Release);
    }

    fn info_json(&self) -> Value {
        let p = &self.params;
        json!({"name": p.name, "ctrlrs": [{
            "state": self.state().name(),
            "trid": {"trtype": "TCP", "adrfam": self.adrfam, "traddr": p.traddr, "trsvcid": p.trsvcid,
                     "subnqn": p.subnqn},
            "cntlid": self.info.cntlid,
            // addr and svcid: the local address the connection is bound to,
            // empty as in SPDK when none was asked for (hostaddr is refused).
            // nvraid closes the connections at detach without a shutdown
            // notification (CC.SHN), so it says so.
            "host": {"nqn": p.hostnqn.clone().unwrap_or_else(|| DEFAULT_HOSTNQN.into()), "addr": "", "svcid": "",
                     "no_shn_notification": true},
            // nvraid's own: what was negotiated, and the impossible-event count.
            "num_io_queues": self.num_io_queues,
            "io_queue_size": self.io_queue_entries,
            "max_transfer_bytes": self.info.max_transfer_bytes,
            "impossible_completions": self.impossible_completions.load(Ordering::Relaxed),
        }]})
    }
}

#[derive(Default)]
struct Ctrls {
    list: Mutex<Vec<Arc<RemoteCtrl>>>,
    next_id: AtomicU64,
}

fn ctrls() -> Arc<Ctrls> {
    reactor::global::<Ctrls>()
}

/// The entries of `bdev_nvme_get_controllers` for TCP controllers
/// (`name` filters), in SPDK's shape: `name`, and `ctrlrs` with one entry
/// per path (`state`, `trid`, `cntlid`, `host`).
pub fn controllers_json(name: Option<&str>) -> Vec<Value> {
    ctrls()
        .list
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|c| name.is_none_or(|n| n == c.params.name))
        .map(|c| c.info_json())
        .collect()
}

fn name_taken(name: &str) -> bool {
    ctrls().list.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|c| c.params.name == name)
}

fn controller_exists(name: &str) -> BdevError {
    BdevError::Os(format!("a controller named {name} already exists"), libc::EEXIST)
}

/// Connects (off the reactor: a helper thread does the blocking connect)
/// and registers one bdev per namespace; `done` runs on the calling
/// reactor with the bdev names. Must be called on a reactor. A namespace
/// whose bdev name or UUID is taken fails the whole attach with EEXIST, and
/// then nothing stays behind: no bdev, no connection.
pub fn attach_controller(params: AttachParams, done: impl FnOnce(Result<Vec<String>, BdevError>) + Send + 'static) {
    if !params.trtype.eq_ignore_ascii_case("tcp") {
        return done(Err(BdevError::Invalid(format!("trtype {} is not TCP", params.trtype))));
    }
    let adrfam = match adrfam_name(params.adrfam.as_deref()) {
        Ok(a) => a,
        Err(e) => return done(Err(e)),
    };
    if name_taken(&params.name) {
        return done(Err(controller_exists(&params.name)));
    }
    let reactors = reactor::count().max(1);
    let mut cp = ConnectParams::new(&params.traddr, &params.trsvcid, &params.subnqn);
    if let Some(h) = &params.hostnqn {
        cp.hostnqn = h.clone();
    }
    cp.hdgst = params.hdgst;
    cp.ddgst = params.ddgst;
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("nvme_tcp_connect".into()).spawn(move || {
        let _ = tx.send(connect(&cp, reactors as u16));
    });
    if let Err(e) = spawned {
        return done(Err(BdevError::Os(format!("spawning the connect thread: {e}"), libc::EAGAIN)));
    }
    let mut state = Some((params, done));
    reactor::register_timed_poller("nvme_tcp_attach", Duration::from_millis(1), move || {
        let r = match rx.try_recv() {
            Ok(r) => r,
            Err(std::sync::mpsc::TryRecvError::Empty) => return reactor::PollStatus::Idle,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                Err(super::HostError::Io("connect thread ended".into()))
            }
        };
        if let Some((params, done)) = state.take() {
            match r {
                Ok(session) => register(params, adrfam, session, Box::new(done)),
                Err(e) => done(Err(BdevError::Os(format!("attaching {}: {e}", params.traddr), libc::EIO))),
            }
        }
        reactor::PollStatus::Done
    });
}

type AttachDone = Box<dyn FnOnce(Result<Vec<String>, BdevError>) + Send>;

fn bdev_name(ctrl: &str, nsid: u32) -> String {
    format!("{ctrl}n{nsid}")
}

/// Why the controller's namespaces cannot all become bdevs, if they cannot:
/// a bdev name or UUID in use, or one UUID reported twice.
fn clash(ctrl: &RemoteCtrl) -> Option<BdevError> {
    let reg = Registry::get();
    let exists = |m: String| Some(BdevError::Os(format!("attaching {}: {m}", ctrl.params.name), libc::EEXIST));
    for (i, ns) in ctrl.info.namespaces.iter().enumerate() {
        let name = bdev_name(&ctrl.params.name, ns.nsid);
        if reg.lookup(&name).is_some() {
            return exists(format!("namespace {} would be bdev {name}, and a bdev of that name exists", ns.nsid));
        }
        let Some(uuid) = ns.uuid else { continue };
        if let Some(h) = reg.lookup(&uuid.to_string()) {
            return exists(format!("namespace {} has UUID {uuid}, which bdev {} already has", ns.nsid, h.name()));
        }
        if let Some(o) = ctrl.info.namespaces[..i].iter().find(|o| o.uuid == Some(uuid)) {
            return exists(format!("namespaces {} and {} report the same UUID {uuid}", o.nsid, ns.nsid));
        }
    }
    None
}

fn register(params: AttachParams, adrfam: &'static str, s: Session, done: AttachDone) {
    let c = ctrls();
    let ctrl = Arc::new(RemoteCtrl {
        id: c.next_id.fetch_add(1, Ordering::Relaxed) + 1,
        params,
        adrfam,
        io_queue_entries: s.io.first().map_or(0, |q| q.entries),
        num_io_queues: s.io.len(),
        info: s.info,
        io_parts: Mutex::new(s.io.into_iter().map(Some).collect()),
        bdevs: Mutex::new(Vec::new()),
        detached: AtomicBool::new(false),
        state: AtomicU8::new(CtrlState::Enabled as u8),
        impossible_completions: AtomicU64::new(0),
    });
    // Refused before anything is registered: an attach either makes every
    // namespace a bdev or leaves nothing behind. Dropping `ctrl` and the
    // admin queue closes every connection.
    if name_taken(&ctrl.params.name) {
        return done(Err(controller_exists(&ctrl.params.name)));
    }
    if let Some(e) = clash(&ctrl) {
        tracing::warn!(name = ctrl.params.name, "NVMe/TCP attach refused: {e}");
        return done(Err(e));
    }
    let mut admin = AdminQpair::new(s.admin, ctrl.info.kato_ms);
    let weak = Arc::downgrade(&ctrl);
    reactor::register_timed_poller("nvme_tcp_admin", Duration::from_millis(5), move || {
        let Some(ctrl) = weak.upgrade() else {
            return reactor::PollStatus::Done;
        };
        if ctrl.detached.load(Ordering::Acquire) {
            return reactor::PollStatus::Done;
        }
        if let Err(e) = admin.poll() {
            tracing::warn!(name = ctrl.params.name, "NVMe/TCP admin queue failed: {e}");
            ctrl.set_failed();
            return reactor::PollStatus::Done;
        }
        reactor::PollStatus::Idle
    });
    let mut names = Vec::new();
    for ns in &ctrl.info.namespaces {
        let name = bdev_name(&ctrl.params.name, ns.nsid);
        let mut props = BdevProps::new(&name, "NVMe disk", ns.block_size, ns.num_blocks, ns.uuid);
        // As the remote controller reports them (Identify VWC and DLFEAT).
        props.write_cache = ctrl.info.volatile_write_cache;
        props.deallocated_reads_zeroes = ns.deallocated_reads_zeroes;
        // MDTS in blocks: the IO queue splits larger IOs (nothing above
        // does); at least one block, at most what NLB can say.
        if ctrl.info.max_transfer_bytes > 0 {
            props.max_io_blocks = (ctrl.info.max_transfer_bytes / ns.block_size).clamp(1, 65_536);
        }
        let b = Arc::new(TcpNsBdev { props, ctrl: ctrl.clone(), nsid: ns.nsid });
        if let Err(e) = Registry::get().register(b) {
            // Taken between the check and now: undo what was registered.
            tracing::warn!(name = ctrl.params.name, "NVMe/TCP namespace {}: {e}; attach undone", ns.nsid);
            ctrl.set_deleting();
            return remove_next(ctrl, names, Box::new(move |_| done(Err(e))));
        }
        names.push(name);
    }
    *ctrl.bdevs.lock().unwrap_or_else(|e| e.into_inner()) = names.clone();
    let mut list = c.list.lock().unwrap_or_else(|e| e.into_inner());
    if list.iter().any(|x| x.params.name == ctrl.params.name) {
        // An attach of this name on another reactor got here first (with
        // namespaces, their bdev names would have clashed already).
        drop(list);
        ctrl.set_deleting();
        let e = controller_exists(&ctrl.params.name);
        return remove_next(ctrl, names, Box::new(move |_| done(Err(e))));
    }
    list.push(ctrl);
    drop(list);
    done(Ok(names))
}

/// Removes the controller's bdevs (each after its in-flight IO), then
/// closes its queues. Must be called on a reactor. The controller is listed
/// as `deleting` until its last bdev is gone.
pub fn detach_controller(name: &str, done: impl FnOnce(Result<(), BdevError>) + Send + 'static) {
    let c = ctrls();
    let ctrl = {
        let l = c.list.lock().unwrap_or_else(|e| e.into_inner());
        match l.iter().find(|x| x.params.name == name) {
            Some(x) => x.clone(),
            None => return done(Err(BdevError::NotFound(format!("controller {name}")))),
        }
    };
    if ctrl.state() == CtrlState::Deleting {
        return done(Err(BdevError::Os(format!("controller {name} is being detached"), libc::EALREADY)));
    }
    ctrl.set_deleting();
    let names = ctrl.bdevs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let id = ctrl.id;
    remove_next(
        ctrl,
        names,
        Box::new(move |r| {
            ctrls().list.lock().unwrap_or_else(|e| e.into_inner()).retain(|x| x.id != id);
            done(r)
        }),
    );
}

/// Unregisters `names` one after the other, then ends the controller's
/// pollers (which closes its connections).
fn remove_next(ctrl: Arc<RemoteCtrl>, mut names: Vec<String>, done: Box<dyn FnOnce(Result<(), BdevError>) + Send>) {
    let Some(n) = names.pop() else {
        ctrl.detached.store(true, Ordering::Release);
        return done(Ok(()));
    };
    let Some(h) = Registry::get().lookup(&n) else {
        return remove_next(ctrl, names, done);
    };
    let origin = reactor::current().unwrap_or(0);
    Registry::get().force_unregister(h, move |_| {
        reactor::send(origin, move || remove_next(ctrl, names, done));
    });
}

struct TcpNsBdev {
    props: BdevProps,
    ctrl: Arc<RemoteCtrl>,
    nsid: u32,
}

#[derive(Default)]
struct LocalQueues(RefCell<HashMap<u64, Rc<RefCell<Queue>>>>);

struct TcpNsChannel {
    q: Rc<RefCell<Queue>>,
    nsid: u32,
    block_size: u32,
    max_io_blocks: u32,
}

impl Bdev for TcpNsBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn module(&self) -> &'static str {
        "nvme"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        !matches!(t, IoType::Reset)
    }
    fn create_channel(&self) -> Result<Rc<dyn BdevChannel>, BdevError> {
        let local = reactor::local::<LocalQueues>();
        let existing = local.0.borrow().get(&self.ctrl.id).cloned();
        let q = match existing {
            Some(q) => q,
            None => {
                let me = reactor::current().unwrap_or(0);
                let parts =
                    self.ctrl.io_parts.lock().unwrap_or_else(|e| e.into_inner()).get_mut(me).and_then(Option::take);
                let Some(parts) = parts else {
                    return Err(BdevError::NoMemory(format!("{}: no IO queue for reactor {me}", self.props.name)));
                };
                let q = Rc::new(RefCell::new(Queue::new(HostQpair::from_parts(parts))));
                local.0.borrow_mut().insert(self.ctrl.id, q.clone());
                let (q2, ctrl) = (q.clone(), self.ctrl.clone());
                reactor::register_poller("nvme_tcp_io", move || poll_queue(&q2, &ctrl));
                q
            }
        };
        Ok(Rc::new(TcpNsChannel {
            q,
            nsid: self.nsid,
            block_size: self.props.block_size,
            max_io_blocks: self.props.max_io_blocks,
        }))
    }
    fn config(&self) -> Option<Value> {
        // One attach call recreates every namespace: the first one says it.
        if self.ctrl.info.namespaces.first().map(|n| n.nsid) != Some(self.nsid) {
            return None;
        }
        let p = &self.ctrl.params;
        let mut params = json!({"name": p.name, "trtype": "TCP", "traddr": p.traddr,
            "adrfam": self.ctrl.adrfam, "trsvcid": p.trsvcid,
            "subnqn": p.subnqn, "hdgst": p.hdgst, "ddgst": p.ddgst});
        if let (Some(h), Some(o)) = (&p.hostnqn, params.as_object_mut()) {
            o.insert("hostnqn".into(), json!(h));
        }
        Some(json!({"method": "bdev_nvme_attach_controller", "params": params}))
    }
    fn driver_specific(&self) -> Option<(&'static str, Value)> {
        let p = &self.ctrl.params;
        Some((
            "nvme",
            json!([{"trid": {"trtype": "TCP", "adrfam": self.ctrl.adrfam, "traddr": p.traddr, "trsvcid": p.trsvcid,
                "subnqn": p.subnqn},
            "ctrlr_data": {"cntlid": self.ctrl.info.cntlid, "serial_number": self.ctrl.info.serial_number,
            "model_number": self.ctrl.info.model_number, "firmware_revision": self.ctrl.info.firmware_revision},
            "ns_data": {"id": self.nsid}}]),
        ))
    }
}

fn poll_queue(q: &Rc<RefCell<Queue>>, ctrl: &Arc<RemoteCtrl>) -> reactor::PollStatus {
    let mut q = q.borrow_mut();
    let q = &mut *q;
    if ctrl.detached.load(Ordering::Acquire) && q.held() == 0 {
        // Dropping the queue closes its socket.
        let local = reactor::local::<LocalQueues>();
        local.0.borrow_mut().remove(&ctrl.id);
        return reactor::PollStatus::Done;
    }
    let polled = q.poll();
    if polled.failed_now {
        tracing::warn!(name = ctrl.params.name, "NVMe/TCP IO queue failed");
        ctrl.set_failed();
    }
    let impossible = polled.impossible;
    if impossible > 0 {
        // The queue pair answers only commands it was given, once each;
        // there is no IO to answer here.
        ctrl.impossible_completions.fetch_add(impossible, Ordering::Relaxed);
        tracing::error!(name = ctrl.params.name, impossible, "NVMe/TCP completion for no IO");
        debug_assert!(false, "NVMe/TCP completion for no IO");
    }
    if polled.progressed {
        reactor::PollStatus::Busy
    } else {
        reactor::PollStatus::Idle
    }
}

impl BdevChannel for TcpNsChannel {
    fn submit(&self, io: IoBox) {
        self.q.borrow_mut().submit(io, self.nsid, self.block_size, self.max_io_blocks);
    }

    /// IOs still waiting for a command slot can be aborted; sent ones not.
    fn abort(&self, matches: &dyn Fn(&BdevIo) -> bool) -> bool {
        self.q.borrow_mut().abort(self.nsid, matches)
    }
}
