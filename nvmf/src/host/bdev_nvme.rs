//! Remote namespaces as bdevs (`bdev_nvme_attach_controller` with trtype
//! TCP): one bdev per namespace (`NAMEn<nsid>`), one IO queue per reactor
//! shared by the controller's namespaces, keep alive on the attaching
//! reactor.

use super::qpair::{AdminQpair, HostQpair, QpairParts, SubmitError};
use super::{connect, status_io_error, ConnectParams, CtrlInfo, Session, DEFAULT_HOSTNQN};
use bdev::{Bdev, BdevChannel, BdevError, BdevProps, IoBox, IoError, IoSlab, IoStatus, IoType, Registry};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

struct RemoteCtrl {
    id: u64,
    params: AttachParams,
    info: CtrlInfo,
    /// IO queues not yet taken, one per reactor.
    io_parts: Mutex<Vec<Option<QpairParts>>>,
    bdevs: Mutex<Vec<String>>,
    detached: AtomicBool,
    /// Completions the IO queues reported for IOs they did not hold: each
    /// is asserted in debug builds and counted here
    /// (`bdev_nvme_get_controllers`, `impossible_completions`).
    impossible_completions: AtomicU64,
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
/// (`name` filters).
pub fn controllers_json(name: Option<&str>) -> Vec<Value> {
    ctrls()
        .list
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|c| name.is_none_or(|n| n == c.params.name))
        .map(|c| {
            json!({"name": c.params.name, "ctrlrs": [{"state": "enabled", "cntlid": c.info.cntlid,
                "impossible_completions": c.impossible_completions.load(Ordering::Relaxed), "trid": {
                "trtype": "TCP", "adrfam": c.params.adrfam.clone().unwrap_or_else(|| "IPv4".into()),
                "traddr": c.params.traddr, "trsvcid": c.params.trsvcid, "subnqn": c.params.subnqn},
                "host": {"nqn": c.params.hostnqn.clone().unwrap_or_else(|| DEFAULT_HOSTNQN.into())}}]})
        })
        .collect()
}

/// Connects (off the reactor: a helper thread does the blocking connect)
/// and registers one bdev per namespace; `done` runs on the calling
/// reactor with the bdev names. Must be called on a reactor.
pub fn attach_controller(params: AttachParams, done: impl FnOnce(Result<Vec<String>, BdevError>) + Send + 'static) {
    if !params.trtype.eq_ignore_ascii_case("tcp") {
        return done(Err(BdevError::Invalid(format!("trtype {} is not TCP", params.trtype))));
    }
    if ctrls().list.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|c| c.params.name == params.name) {
        return done(Err(BdevError::Exists(format!("controller {}", params.name))));
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
                Ok(session) => done(register(params, session)),
                Err(e) => done(Err(BdevError::Os(format!("attaching {}: {e}", params.traddr), libc::EIO))),
            }
        }
        reactor::PollStatus::Done
    });
}

fn register(params: AttachParams, s: Session) -> Result<Vec<String>, BdevError> {
    let c = ctrls();
    let ctrl = Arc::new(RemoteCtrl {
        id: c.next_id.fetch_add(1, Ordering::Relaxed) + 1,
        params,
        info: s.info,
        io_parts: Mutex::new(s.io.into_iter().map(Some).collect()),
        bdevs: Mutex::new(Vec::new()),
        detached: AtomicBool::new(false),
        impossible_completions: AtomicU64::new(0),
    });
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
            return reactor::PollStatus::Done;
        }
        reactor::PollStatus::Idle
    });
    let mut names = Vec::new();
    let mut first_err = None;
    for ns in &ctrl.info.namespaces {
        let name = format!("{}n{}", ctrl.params.name, ns.nsid);
        let mut props = BdevProps::new(&name, "NVMe disk", ns.block_size, ns.num_blocks, ns.uuid);
        // As the remote controller reports them (Identify VWC and DLFEAT).
        props.write_cache = ctrl.info.volatile_write_cache;
        props.deallocated_reads_zeroes = ns.deallocated_reads_zeroes;
        if ctrl.info.max_transfer_bytes > 0 {
            props.max_io_blocks = ctrl.info.max_transfer_bytes / ns.block_size;
        }
        let b = Arc::new(TcpNsBdev { props, ctrl: ctrl.clone(), nsid: ns.nsid });
        match Registry::get().register(b) {
            Ok(_) => names.push(name),
            Err(e) => {
                tracing::warn!("NVMe/TCP namespace {}: {e}", ns.nsid);
                first_err.get_or_insert(e);
            }
        }
    }
    // A controller none of whose namespaces could become a bdev (a name or
    // UUID already in use) is an error, not a silent empty attach.
    if names.is_empty() {
        if let Some(e) = first_err {
            ctrl.detached.store(true, Ordering::Release); // ends the admin poller; queues close on drop
            return Err(e);
        }
    }
    *ctrl.bdevs.lock().unwrap_or_else(|e| e.into_inner()) = names.clone();
    c.list.lock().unwrap_or_else(|e| e.into_inner()).push(ctrl);
    Ok(names)
}

/// Removes the controller's bdevs (each after its in-flight IO), then
/// closes its queues. Must be called on a reactor.
pub fn detach_controller(name: &str, done: impl FnOnce(Result<(), BdevError>) + Send + 'static) {
    let c = ctrls();
    let ctrl = {
        let mut l = c.list.lock().unwrap_or_else(|e| e.into_inner());
        match l.iter().position(|x| x.params.name == name) {
            Some(i) => l.remove(i),
            None => return done(Err(BdevError::NotFound(format!("controller {name}")))),
        }
    };
    let names = ctrl.bdevs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    remove_next(ctrl, names, Box::new(done));
}

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

/// A reactor's IO queue to one controller, shared by its namespaces.
struct Queue {
    qp: HostQpair,
    ios: IoSlab,
    waiting: VecDeque<(u32, usize, IoBox)>,
    dead: bool,
}

#[derive(Default)]
struct LocalQueues(RefCell<HashMap<u64, Rc<RefCell<Queue>>>>);

impl Queue {
    /// Starts `io` on the queue. Err((io, retry)): `retry` when the queue
    /// is only full. The IO keeps its buffer; the queue gets a second
    /// handle to the same memory.
    fn start(&mut self, nsid: u32, block_size: usize, io: IoBox) -> Result<(), (IoBox, bool)> {
        if self.qp.outstanding() >= self.qp.queue_depth() {
            return Err((io, true));
        }
        let (t, off, n) = (io.io_type, io.offset_blocks, io.num_blocks);
        let Ok(nlb) = u32::try_from(n) else {
            return Err((io, false));
        };
        let len = n as usize * block_size;
        let data = match t {
            IoType::Read | IoType::Write => match io.buf.as_ref() {
                Some(b) if b.len() >= len => Some(b.slice(0, len)),
                _ => return Err((io, false)),
            },
            _ => None,
        };
        let slot = self.ios.insert(io);
        let tag = u64::from(slot);
        // FUA travels to the remote controller in CDW12 (DPO has no NVMe form).
        let flags = self.ios.get(slot).map_or(bdev::IoFlags::NONE, |io| io.flags);
        let r = match (t, data) {
            (IoType::Read, Some(b)) => self.qp.read_with(nsid, off, nlb, b, tag, flags),
            (IoType::Write, Some(b)) => self.qp.write_with(nsid, off, nlb, b, tag, flags),
            (IoType::Flush, _) => self.qp.flush(nsid, tag),
            (IoType::WriteZeroes, _) => self.qp.write_zeroes_with(nsid, off, nlb, tag, flags),
            (IoType::Unmap, _) => match bdev::DmaBuf::alloc(16) {
                Some(b) => self.qp.deallocate(nsid, &[(off, nlb)], b, tag),
                None => Err(SubmitError::Full),
            },
            _ => Err(SubmitError::BadBuffer),
        };
        r.map_err(|e| {
            let io = self.ios.take(slot).unwrap_or_else(|| unreachable!("just inserted"));
            (io, e == SubmitError::Full)
        })
    }
}

struct TcpNsChannel {
    q: Rc<RefCell<Queue>>,
    nsid: u32,
    block_size: usize,
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
                let qp = HostQpair::from_parts(parts);
                let depth = qp.queue_depth();
                let q = Rc::new(RefCell::new(Queue {
                    qp,
                    ios: IoSlab::with_capacity(depth),
                    waiting: VecDeque::with_capacity(depth),
                    dead: false,
                }));
                local.0.borrow_mut().insert(self.ctrl.id, q.clone());
                let (q2, ctrl) = (q.clone(), self.ctrl.clone());
                reactor::register_poller("nvme_tcp_io", move || poll_queue(&q2, &ctrl));
                q
            }
        };
        Ok(Rc::new(TcpNsChannel { q, nsid: self.nsid, block_size: self.props.block_size as usize }))
    }
    fn config(&self) -> Option<Value> {
        // One attach call recreates every namespace: the first one says it.
        if self.ctrl.info.namespaces.first().map(|n| n.nsid) != Some(self.nsid) {
            return None;
        }
        let p = &self.ctrl.params;
        let mut params = json!({"name": p.name, "trtype": "TCP", "traddr": p.traddr,
            "adrfam": p.adrfam.clone().unwrap_or_else(|| "IPv4".into()), "trsvcid": p.trsvcid,
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
            json!([{"trid": {"trtype": "TCP", "traddr": p.traddr, "trsvcid": p.trsvcid, "subnqn": p.subnqn},
            "ctrlr_data": {"cntlid": self.ctrl.info.cntlid, "serial_number": self.ctrl.info.serial_number,
            "model_number": self.ctrl.info.model_number, "firmware_revision": self.ctrl.info.firmware_revision},
            "ns_data": {"id": self.nsid}}]),
        ))
    }
}

fn poll_queue(q: &Rc<RefCell<Queue>>, ctrl: &Arc<RemoteCtrl>) -> reactor::PollStatus {
    let mut q = q.borrow_mut();
    let q = &mut *q;
    if ctrl.detached.load(Ordering::Acquire) && q.ios.is_empty() && q.waiting.is_empty() {
        // Dropping the queue closes its socket.
        let local = reactor::local::<LocalQueues>();
        local.0.borrow_mut().remove(&ctrl.id);
        return reactor::PollStatus::Done;
    }
    let ios = &mut q.ios;
    let r = q.qp.poll(|c| match ios.take(c.tag as u32) {
        Some(io) => {
            let st =
                if c.status.is_success() { IoStatus::Success } else { IoStatus::Failed(status_io_error(c.status)) };
            io.complete(st);
        }
        None => {
            // The queue pair answers only commands it was given, once each;
            // there is no IO to answer here.
            ctrl.impossible_completions.fetch_add(1, Ordering::Relaxed);
            tracing::error!(name = ctrl.params.name, tag = c.tag, "NVMe/TCP completion for no IO");
            debug_assert!(false, "NVMe/TCP completion for no IO (tag {})", c.tag);
        }
    });
    let mut busy = matches!(r, Ok(n) if n > 0);
    if r.is_err() && !q.dead {
        q.dead = true;
        tracing::warn!(name = ctrl.params.name, "NVMe/TCP IO queue failed");
    }
    if q.dead {
        while let Some((_, _, io)) = q.waiting.pop_front() {
            io.fail(IoError::NoDevice);
            busy = true;
        }
    }
    while let Some((nsid, bs, io)) = q.waiting.pop_front() {
        busy = true;
        match q.start(nsid, bs, io) {
            Ok(()) => {}
            Err((io, true)) => {
                q.waiting.push_front((nsid, bs, io));
                break;
            }
            Err((io, false)) => io.fail(IoError::OutOfRange),
        }
    }
    if busy {
        reactor::PollStatus::Busy
    } else {
        reactor::PollStatus::Idle
    }
}

impl BdevChannel for TcpNsChannel {
    fn submit(&self, io: IoBox) {
        let mut q = self.q.borrow_mut();
        if q.dead {
            return io.fail(IoError::NoDevice);
        }
        if !q.waiting.is_empty() {
            q.waiting.push_back((self.nsid, self.block_size, io));
            return;
        }
        match q.start(self.nsid, self.block_size, io) {
            Ok(()) => {}
            Err((io, true)) => q.waiting.push_back((self.nsid, self.block_size, io)),
            Err((io, false)) => io.fail(IoError::OutOfRange),
        }
    }
}
