//! Remote namespaces as bdevs (`bdev_nvme_attach_controller` with trtype
//! TCP): one bdev per namespace (`NAMEn<nsid>`), one IO queue per reactor
//! shared by the controller's namespaces (the engine is in `ns_queue`:
//! splitting at MDTS, the queue-size bound, FIFO waiting), keep alive on the
//! attaching reactor.
//!
//! A lost connection (a queue's socket fails, or a Keep Alive goes
//! unanswered for KATO) is ridden out as SPDK's `bdev_nvme` does, by
//! [`ReconnectOpts`]: with `ctrlr_loss_timeout_sec` 0 the path stays failed
//! and IO fails; otherwise the attaching reactor drops every connection,
//! reconnects (the blocking connect runs on a helper thread whose result
//! the reactor picks up from a timed poller) and retries every
//! `reconnect_delay_sec`, while the bdevs stay registered and their IO waits
//! (IOs whose commands the lost connection never answered are sent again)
//! until the controller is back, until `fast_io_fail_timeout_sec` (then IO
//! fails until it is back), or until `ctrlr_loss_timeout_sec` (then the
//! controller and its bdevs are deleted).

use super::ns_queue::{OnLoss, Queue};
use super::qpair::{AdminQpair, HostError, HostQpair, QpairParts};
use super::{connect, ConnectParams, CtrlInfo, Session, DEFAULT_HOSTNQN};
use bdev::{Bdev, BdevChannel, BdevError, BdevIo, BdevProps, IoBox, IoType, Registry};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

mod keeper;
mod multipath;
use keeper::Keeper;
pub use keeper::{add_failover_path, reset_controller};
pub use multipath::{
    add_multipath_path, multipath_policies_config, multipath_policy, set_multipath_policy, set_preferred_path, Policy,
    Selector,
};
use multipath::{ChanPath, Cursor, MpPolicy, PathGroup};

/// How a controller notices a lost connection and what it does then
/// (SPDK's `bdev_nvme_attach_controller` / `bdev_nvme_set_options`
/// parameters, with SPDK's defaults: keep alive 10 s, no reconnect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectOpts {
    /// KATO asked for in Connect; a Keep Alive unanswered this long counts
    /// as a lost connection (0: no keep alive, a silent path goes unseen).
    pub keep_alive_timeout_ms: u32,
    /// How long to try before the controller and its bdevs are deleted:
    /// -1 forever, 0 no reconnect at all (the path stays failed).
    pub ctrlr_loss_timeout_sec: i32,
    /// Seconds between reconnect attempts.
    pub reconnect_delay_sec: u32,
    /// After this long without a connection, IO fails instead of waiting
    /// (0: IO waits as long as the controller exists).
    pub fast_io_fail_timeout_sec: u32,
}

impl Default for ReconnectOpts {
    fn default() -> Self {
        ReconnectOpts {
            keep_alive_timeout_ms: 10_000,
            ctrlr_loss_timeout_sec: 0,
            reconnect_delay_sec: 0,
            fast_io_fail_timeout_sec: 0,
        }
    }
}

impl ReconnectOpts {
    /// SPDK's rules for the combination (its `bdev_nvme` refuses the same
    /// ones with EINVAL).
    pub fn validate(&self) -> Result<(), String> {
        self.check().map_err(|e| {
            format!(
                "{e} (ctrlr_loss_timeout_sec={}, reconnect_delay_sec={}, fast_io_fail_timeout_sec={})",
                self.ctrlr_loss_timeout_sec, self.reconnect_delay_sec, self.fast_io_fail_timeout_sec
            )
        })
    }

    fn check(&self) -> Result<(), String> {
        let (loss, delay, fast) =
            (self.ctrlr_loss_timeout_sec, self.reconnect_delay_sec, self.fast_io_fail_timeout_sec);
        if loss < -1 {
            return Err(format!("ctrlr_loss_timeout_sec {loss} is below -1 (-1 retries forever)"));
        }
        if loss == 0 {
            if delay != 0 || fast != 0 {
                return Err("reconnect_delay_sec and fast_io_fail_timeout_sec must both be 0 when \
                            ctrlr_loss_timeout_sec is 0 (no reconnect)"
                    .into());
            }
            return Ok(());
        }
        if delay == 0 {
            return Err("reconnect_delay_sec must not be 0 when ctrlr_loss_timeout_sec is not 0".into());
        }
        if loss > 0 && delay > loss as u32 {
            return Err(format!("reconnect_delay_sec {delay} is more than ctrlr_loss_timeout_sec {loss}"));
        }
        if fast != 0 && fast < delay {
            return Err(format!("reconnect_delay_sec {delay} is more than fast_io_fail_timeout_sec {fast}"));
        }
        if fast != 0 && loss > 0 && fast > loss as u32 {
            return Err(format!("fast_io_fail_timeout_sec {fast} is more than ctrlr_loss_timeout_sec {loss}"));
        }
        Ok(())
    }

    /// A lost connection is reconnected.
    pub fn reconnects(&self) -> bool {
        self.ctrlr_loss_timeout_sec != 0
    }
}

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
    /// `psk`: connect over TLS with this keyring key.
    pub psk: Option<Arc<crate::keyring::Key>>,
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
    /// The admin queue or an IO queue lost its connection and the
    /// controller does not reconnect: the path stays failed until detached.
    Failed = 1,
    /// Being detached (or deleted after `ctrlr_loss_timeout_sec`).
    Deleting = 2,
    /// Connection lost; a reconnect attempt is under way.
    Resetting = 3,
    /// Connection lost; the next attempt waits for `reconnect_delay_sec`.
    ReconnectDelayed = 4,
}

impl CtrlState {
    fn name(self) -> &'static str {
        match self {
            CtrlState::Enabled => "enabled",
            CtrlState::Failed => "failed",
            CtrlState::Deleting => "deleting",
            CtrlState::Resetting => "resetting",
            CtrlState::ReconnectDelayed => "reconnect_is_delayed",
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
    /// IO queues not yet taken, one per reactor, of the connection `epoch`.
    io_parts: Mutex<IoParts>,
    detached: AtomicBool,
    /// A [`CtrlState`]: written by the keeper (the attaching reactor's
    /// poller) and by detach (→ Deleting, final).
    state: AtomicU8,
    reconnect: ReconnectOpts,
    /// The connection's number, bumped by the keeper when it gives the
    /// connection up and when it publishes a new one (`io_parts`); each IO
    /// queue follows it.
    epoch: AtomicU64,
    /// An IO queue lost its connection: the epoch of that connection plus
    /// one (0: none). The keeper reacts when it names the current one.
    lost: AtomicU64,
    /// IOs fail instead of waiting for a connection: no reconnect, or
    /// `fast_io_fail_timeout_sec` passed, or being deleted (keeper-written).
    failing: AtomicBool,
    /// The current connection's controller ID (it changes on reconnect).
    cntlid: AtomicU16,
    /// Successful reconnects so far.
    reconnects: AtomicU64,
    /// The network paths to the subsystem (`multipath: "failover"`): the
    /// active one and the alternates, tried in turn when it is lost.
    paths: Mutex<Paths>,
    /// `paths.list.len()`, for the IO pollers.
    path_count: AtomicUsize,
    /// `bdev_nvme_reset_controller` asked for a reset the keeper has not
    /// started; their answers wait in `reset_waiters`.
    reset_wanted: AtomicBool,
    /// A requested reset runs: IO waits for it even without reconnect.
    resetting: AtomicBool,
    reset_waiters: Mutex<Vec<ResetDone>>,
    /// Completions the IO queues reported for IOs they did not hold: each
    /// is asserted in debug builds and counted here
    /// (`bdev_nvme_get_controllers`, `impossible_completions`).
    impossible_completions: AtomicU64,
    /// The ANA state of each namespace (index as in `info.namespaces`)
    /// through this controller (`nvme_spec::log::ana_state`; optimized
    /// when the controller reports no ANA): from the ANA log, read at
    /// connect and on each ANA change notice, and from the ANA status an
    /// IO ends with until the log is read again.
    ana: Vec<AtomicU8>,
    /// An IO ended with an ANA status: the keeper reads the ANA log again.
    ana_stale: AtomicBool,
    /// The paths behind this controller's namespace bdevs (this one alone
    /// unless `multipath: "multipath"` added others).
    group: Arc<PathGroup>,
    /// IOs sent on this path (nvraid's `io_submitted`), counted per reactor
    /// in cache lines of their own: one shared counter would move between
    /// the reactors' caches on every IO.
    ios: Box<[ReactorIoCount]>,
}

/// Slots of a path's per-reactor IO count (reactor id modulo this).
const IO_COUNT_SLOTS: usize = 64;

#[derive(Default)]
#[repr(align(64))]
struct ReactorIoCount(AtomicU64);

/// The current reactor's slot in the paths' IO counts.
pub(super) fn io_count_slot() -> usize {
    reactor::current().unwrap_or(0) % IO_COUNT_SLOTS
}

/// One network path to the controller's subsystem.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PathId {
    traddr: String,
    trsvcid: String,
    adrfam: &'static str,
}

impl PathId {
    fn json(&self, subnqn: &str) -> Value {
        json!({"trtype": "TCP", "adrfam": self.adrfam, "traddr": self.traddr, "trsvcid": self.trsvcid,
               "subnqn": subnqn})
    }
}

struct Paths {
    list: Vec<PathId>,
    /// Index of the path in use (or being tried).
    active: usize,
}

/// The IO queues of one connection, until each reactor takes its own.
struct IoParts {
    epoch: u64,
    parts: Vec<Option<QpairParts>>,
}

impl RemoteCtrl {
    /// IO that a lost connection leaves waits for the next one (instead of
    /// failing at once): the controller reconnects, or has another path.
    fn retries_io(&self) -> bool {
        self.reconnect.reconnects()
            || self.path_count.load(Ordering::Acquire) > 1
            || self.group.count.load(Ordering::Acquire) > 1
            || self.resetting.load(Ordering::Acquire)
    }

    fn ns_index(&self, nsid: u32) -> Option<usize> {
        self.info.namespaces.iter().position(|n| n.nsid == nsid)
    }

    fn ana_state(&self, ns: usize) -> u8 {
        self.ana.get(ns).map_or(nvme_spec::log::ana_state::INACCESSIBLE, |a| a.load(Ordering::Acquire))
    }

    fn set_ana_state(&self, ns: usize, state: u8) {
        if let Some(a) = self.ana.get(ns) {
            a.store(state, Ordering::Release);
        }
    }

    /// Takes the states of an ANA log (NSID, state); a namespace the log
    /// does not list is inaccessible through this controller. Returns
    /// whether a state changed.
    fn apply_ana(&self, list: &[(u32, u8)]) -> bool {
        let mut changed = false;
        for (i, ns) in self.info.namespaces.iter().enumerate() {
            let state = if self.info.ana_reporting {
                list.iter().find(|(n, _)| *n == ns.nsid).map_or(nvme_spec::log::ana_state::INACCESSIBLE, |x| x.1)
            } else {
                nvme_spec::log::ana_state::OPTIMIZED
            };
            changed |= self.ana[i].swap(state, Ordering::AcqRel) != state;
        }
        changed
    }

    /// Answers every reset request waiting.
    fn answer_resets(&self, r: Result<(), BdevError>) {
        // Whatever asked is answered by this outcome.
        self.reset_wanted.store(false, Ordering::Release);
        self.resetting.store(false, Ordering::Release);
        let waiting = std::mem::take(&mut *self.reset_waiters.lock().unwrap_or_else(|e| e.into_inner()));
        for done in waiting {
            done(r.clone());
        }
    }

    fn paths(&self) -> std::sync::MutexGuard<'_, Paths> {
        self.paths.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state(&self) -> CtrlState {
        match self.state.load(Ordering::Acquire) {
            0 => CtrlState::Enabled,
            1 => CtrlState::Failed,
            3 => CtrlState::Resetting,
            4 => CtrlState::ReconnectDelayed,
            _ => CtrlState::Deleting,
        }
    }

    /// Sets `to` unless the controller is being deleted (that stays).
    fn set_state(&self, to: CtrlState) {
        let _ = self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
            (s != CtrlState::Deleting as u8).then_some(to as u8)
        });
    }

    fn set_deleting(&self) {
        self.state.store(CtrlState::Deleting as u8, Ordering::Release);
    }

    /// The controller's `bdev_nvme_get_controllers` entry: one `ctrlrs`
    /// entry per path of its group.
    fn info_json(&self) -> Value {
        let ctrlrs: Vec<Value> = self.group.paths().iter().map(|c| c.ctrlr_json()).collect();
        json!({"name": self.params.name, "ctrlrs": ctrlrs})
    }

    /// The state of each namespace through this path, SPDK's words.
    fn ana_json(&self) -> Value {
        let states: Vec<Value> = self
            .info
            .namespaces
            .iter()
            .enumerate()
            .map(|(i, n)| json!({"nsid": n.nsid, "ana_state": ana_state_name(self.ana_state(i))}))
            .collect();
        Value::Array(states)
    }

    fn ctrlr_json(&self) -> Value {
        let p = &self.params;
        let (trid, alternates) = {
            let paths = self.paths();
            let n = paths.list.len();
            let at = |i: usize| paths.list[(paths.active + i) % n].json(&p.subnqn);
            (at(0), (1..n).map(at).collect::<Vec<_>>())
        };
        let mut v = json!({
            "state": self.state().name(),
            "trid": trid,
            "cntlid": self.cntlid.load(Ordering::Relaxed),
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
            "reconnects": self.reconnects.load(Ordering::Relaxed),
            "io_submitted": self.ios.iter().map(|c| c.0.load(Ordering::Relaxed)).sum::<u64>(),
        });
        if let (true, Some(c)) = (self.info.ana_reporting, v.as_object_mut()) {
            // nvraid's own (SPDK shows ANA states per path in the bdev's
            // driver_specific ns_data only).
            c.insert("ana_states".into(), self.ana_json());
        }
        // SPDK lists the paths not in use only when there are any.
        if let (false, Some(c)) = (alternates.is_empty(), v.as_object_mut()) {
            c.insert("alternate_trids".into(), Value::Array(alternates));
        }
        v
    }
}

/// SPDK's name of an ANA state (`_nvme_ana_state_str`).
fn ana_state_name(state: u8) -> &'static str {
    use nvme_spec::log::ana_state as s;
    match state {
        s::OPTIMIZED => "optimized",
        s::NON_OPTIMIZED => "non_optimized",
        s::INACCESSIBLE => "inaccessible",
        s::PERSISTENT_LOSS => "persistent_loss",
        _ => "change",
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

/// The calls that add back every controller's alternate paths
/// (`multipath: "failover"`), for `save_config`: a controller's own
/// attach call (its bdev's `config`) recreates its first path only, and
/// these follow it, in the order the paths were added.
pub fn failover_paths_config() -> Vec<Value> {
    let list = ctrls().list.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut out = Vec::new();
    for c in list {
        let p = &c.params;
        let paths: Vec<PathId> = c.paths().list.iter().skip(1).cloned().collect();
        for path in paths {
            let mut params = json!({"name": p.name, "trtype": "TCP", "traddr": path.traddr,
                "adrfam": path.adrfam, "trsvcid": path.trsvcid, "subnqn": p.subnqn,
                "hdgst": p.hdgst, "ddgst": p.ddgst, "multipath": "failover"});
            if let (Some(h), Some(o)) = (&p.hostnqn, params.as_object_mut()) {
                o.insert("hostnqn".into(), json!(h));
            }
            if let (Some(k), Some(o)) = (&p.psk, params.as_object_mut()) {
                o.insert("psk".into(), json!(k.name));
            }
            out.push(json!({"method": "bdev_nvme_attach_controller", "params": params}));
        }
        for path in c.group.paths().iter().filter(|x| x.id != c.id) {
            let mut params = path.attach_params_json();
            params["multipath"] = json!("multipath");
            out.push(json!({"method": "bdev_nvme_attach_controller", "params": params}));
        }
    }
    out
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
    attach_controller_with(params, ReconnectOpts::default(), done)
}

/// [`attach_controller`] with what to do when the connection is lost
/// (refused with EINVAL where SPDK refuses the combination).
pub fn attach_controller_with(
    params: AttachParams,
    reconnect: ReconnectOpts,
    done: impl FnOnce(Result<Vec<String>, BdevError>) + Send + 'static,
) {
    if let Err(e) = reconnect.validate() {
        return done(Err(BdevError::Invalid(e)));
    }
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
    let mut cp = connect_params(&params);
    cp.kato_ms = reconnect.keep_alive_timeout_ms;
    let rx = match connect_in_background(cp.clone(), reactors as u16) {
        Ok(rx) => rx,
        Err(e) => return done(Err(e)),
    };
    let mut state = Some((params, done, cp));
    reactor::register_timed_poller("nvme_tcp_attach", Duration::from_millis(1), move || {
        let r = match rx.try_recv() {
            Ok(r) => r,
            Err(std::sync::mpsc::TryRecvError::Empty) => return reactor::PollStatus::Idle,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                Err(super::HostError::Io("connect thread ended".into()))
            }
        };
        if let Some((params, done, cp)) = state.take() {
            match r {
                Ok(session) => register(params, adrfam, reconnect, cp, session, Box::new(done)),
                Err(e) => done(Err(BdevError::Os(format!("attaching {}: {e}", params.traddr), libc::EIO))),
            }
        }
        reactor::PollStatus::Done
    });
}

const NS_PER_SEC: u64 = 1_000_000_000;

type AttachDone = Box<dyn FnOnce(Result<Vec<String>, BdevError>) + Send>;

type ResetDone = Box<dyn FnOnce(Result<(), BdevError>) + Send>;

type Connecting = mpsc::Receiver<Result<Session, HostError>>;

/// How to reach the controller; one host identifier for every connection
/// of this controller, reconnects included.
fn connect_params(params: &AttachParams) -> ConnectParams {
    let mut cp = ConnectParams::new(&params.traddr, &params.trsvcid, &params.subnqn);
    if let Some(h) = &params.hostnqn {
        cp.hostnqn = h.clone();
    }
    cp.hdgst = params.hdgst;
    cp.ddgst = params.ddgst;
    cp.psk = params.psk.clone();
    cp.hostid = Some(*uuid::Uuid::new_v4().as_bytes());
    cp
}

/// Connects on a helper thread (connecting blocks); the result arrives on
/// the returned channel.
fn connect_in_background(cp: ConnectParams, io_queues: u16) -> Result<Connecting, BdevError> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("nvme_tcp_connect".into())
        .spawn(move || {
            let _ = tx.send(connect(&cp, io_queues));
        })
        .map_err(|e| BdevError::Os(format!("spawning the connect thread: {e}"), libc::EAGAIN))?;
    Ok(rx)
}

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

fn register(
    params: AttachParams,
    adrfam: &'static str,
    reconnect: ReconnectOpts,
    cp: ConnectParams,
    s: Session,
    done: AttachDone,
) {
    let c = ctrls();
    let group = PathGroup::new(s.info.namespaces.len());
    let ctrl = new_ctrl(&c, params, adrfam, reconnect, s.info, &s.io, group);
    let s_io = s.io;
    let s_admin = s.admin;
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
    ctrl.group.push(ctrl.clone());
    *ctrl.io_parts.lock().unwrap_or_else(|e| e.into_inner()) =
        IoParts { epoch: 0, parts: s_io.into_iter().map(Some).collect() };
    let admin = AdminQpair::new(s_admin, ctrl.info.kato_ms);
    let mut keeper = Keeper::new(&ctrl, cp, admin);
    reactor::register_timed_poller("nvme_tcp_admin", Duration::from_millis(5), move || keeper.poll());
    let mut names = Vec::new();
    for (ns_index, ns) in ctrl.info.namespaces.iter().enumerate() {
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
        let policy = ctrl.group.policies[ns_index].clone();
        let b = Arc::new(TcpNsBdev { props, ctrl: ctrl.clone(), nsid: ns.nsid, ns_index, policy });
        if let Err(e) = Registry::get().register(b) {
            // Taken between the check and now: undo what was registered.
            tracing::warn!(name = ctrl.params.name, "NVMe/TCP namespace {}: {e}; attach undone", ns.nsid);
            ctrl.set_deleting();
            return remove_next(ctrl, names, Box::new(move |_| done(Err(e))));
        }
        names.push(name);
    }
    *ctrl.group.bdevs.lock().unwrap_or_else(|e| e.into_inner()) = names.clone();
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

/// A controller over a new connection (`io`: its IO queues, published by
/// the caller), a path of `group`.
fn new_ctrl(
    c: &Ctrls,
    params: AttachParams,
    adrfam: &'static str,
    reconnect: ReconnectOpts,
    info: CtrlInfo,
    io: &[QpairParts],
    group: Arc<PathGroup>,
) -> Arc<RemoteCtrl> {
    let first_path = PathId { traddr: params.traddr.clone(), trsvcid: params.trsvcid.clone(), adrfam };
    let ana = (0..info.namespaces.len()).map(|_| AtomicU8::new(nvme_spec::log::ana_state::OPTIMIZED)).collect();
    let initial_ana = info.ana.clone();
    let ctrl = Arc::new(RemoteCtrl {
        id: c.next_id.fetch_add(1, Ordering::Relaxed) + 1,
        params,
        adrfam,
        io_queue_entries: io.first().map_or(0, |q| q.entries),
        num_io_queues: io.len(),
        cntlid: AtomicU16::new(info.cntlid),
        info,
        io_parts: Mutex::new(IoParts { epoch: 0, parts: Vec::new() }),
        detached: AtomicBool::new(false),
        state: AtomicU8::new(CtrlState::Enabled as u8),
        reconnect,
        epoch: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        failing: AtomicBool::new(false),
        reconnects: AtomicU64::new(0),
        paths: Mutex::new(Paths { list: vec![first_path], active: 0 }),
        path_count: AtomicUsize::new(1),
        reset_wanted: AtomicBool::new(false),
        resetting: AtomicBool::new(false),
        reset_waiters: Mutex::new(Vec::new()),
        impossible_completions: AtomicU64::new(0),
        ana,
        ana_stale: AtomicBool::new(false),
        group,
        ios: (0..IO_COUNT_SLOTS).map(|_| ReactorIoCount::default()).collect(),
    });
    ctrl.apply_ana(&initial_ana);
    ctrl
}

/// One more path (`multipath: "multipath"`) to `head`'s namespaces over
/// the connection `s`: a controller of its own, in `head`'s group.
fn join_group(
    head: &Arc<RemoteCtrl>,
    params: AttachParams,
    adrfam: &'static str,
    reconnect: ReconnectOpts,
    cp: ConnectParams,
    s: Session,
) {
    let ctrl = new_ctrl(&ctrls(), params, adrfam, reconnect, s.info, &s.io, head.group.clone());
    *ctrl.io_parts.lock().unwrap_or_else(|e| e.into_inner()) =
        IoParts { epoch: 0, parts: s.io.into_iter().map(Some).collect() };
    let admin = AdminQpair::new(s.admin, ctrl.info.kato_ms);
    let mut keeper = Keeper::new(&ctrl, cp, admin);
    reactor::register_timed_poller("nvme_tcp_admin", Duration::from_millis(5), move || keeper.poll());
    tracing::info!(
        name = ctrl.params.name,
        traddr = ctrl.params.traddr,
        trsvcid = ctrl.params.trsvcid,
        "NVMe/TCP path added"
    );
    head.group.push(ctrl);
}

/// Deletes the controller with every path of its group: IO that waits
/// fails, its bdevs go (each after its in-flight IO), then it leaves the
/// list. Must run on a reactor.
fn delete(ctrl: Arc<RemoteCtrl>, done: Box<dyn FnOnce(Result<(), BdevError>) + Send>) {
    let mut paths = ctrl.group.paths();
    if !paths.iter().any(|p| p.id == ctrl.id) {
        paths.push(ctrl.clone());
    }
    for p in &paths {
        if p.state() != CtrlState::Enabled {
            // No connection to finish waiting IO on.
            p.failing.store(true, Ordering::Release);
        }
        p.set_deleting();
        p.answer_resets(Err(BdevError::Os(format!("controller {} is being deleted", p.params.name), libc::ENODEV)));
    }
    let names = ctrl.group.bdev_names();
    let group = ctrl.group.clone();
    remove_next(
        ctrl,
        names,
        Box::new(move |r| {
            ctrls().list.lock().unwrap_or_else(|e| e.into_inner()).retain(|x| !Arc::ptr_eq(&x.group, &group));
            done(r)
        }),
    );
}

/// A path that stayed away past `ctrlr_loss_timeout_sec`: removed alone
/// while its group has other paths (the bdevs stay, IO that waited on it
/// goes to them), else deleted with the bdevs.
fn lose_path(ctrl: Arc<RemoteCtrl>) {
    if ctrl.group.count.load(Ordering::Acquire) <= 1 {
        return delete(ctrl, Box::new(|_| {}));
    }
    ctrl.failing.store(true, Ordering::Release);
    ctrl.set_deleting();
    ctrl.answer_resets(Err(BdevError::Os(format!("path of {} is deleted", ctrl.params.name), libc::ENODEV)));
    ctrl.group.remove(ctrl.id);
    ctrl.detached.store(true, Ordering::Release);
    let c = ctrls();
    let mut list = c.list.lock().unwrap_or_else(|e| e.into_inner());
    if let (Some(i), Some(next)) = (list.iter().position(|x| x.id == ctrl.id), ctrl.group.paths().first().cloned()) {
        // The controller goes on by its next path.
        list[i] = next;
    }
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
    delete(ctrl, Box::new(done));
}

/// Unregisters `names` one after the other, then ends the controller's
/// pollers (which closes its connections).
fn remove_next(ctrl: Arc<RemoteCtrl>, mut names: Vec<String>, done: Box<dyn FnOnce(Result<(), BdevError>) + Send>) {
    let Some(n) = names.pop() else {
        ctrl.detached.store(true, Ordering::Release);
        // The bdevs are gone: every path goes, and the group lets go of
        // them (they refer to it too).
        let paths = std::mem::take(&mut *ctrl.group.paths.lock().unwrap_or_else(|e| e.into_inner()));
        ctrl.group.count.store(0, Ordering::Release);
        ctrl.group.gen.fetch_add(1, Ordering::AcqRel);
        for p in paths {
            p.set_deleting();
            p.detached.store(true, Ordering::Release);
        }
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
    /// The controller attached first (the group's paths serve the IO).
    ctrl: Arc<RemoteCtrl>,
    nsid: u32,
    /// The namespace's index in `info.namespaces` (the same on every path).
    ns_index: usize,
    policy: Arc<MpPolicy>,
}

#[derive(Default)]
struct LocalQueues(RefCell<HashMap<u64, Rc<RefCell<Queue>>>>);

/// This reactor's IO queue of `ctrl` (made, with its poller, on first use).
fn local_queue(ctrl: &Arc<RemoteCtrl>) -> Result<Rc<RefCell<Queue>>, BdevError> {
    let local = reactor::local::<LocalQueues>();
    if let Some(q) = local.0.borrow().get(&ctrl.id) {
        return Ok(q.clone());
    }
    let me = reactor::current().unwrap_or(0);
    let (epoch, parts) = {
        let mut io = ctrl.io_parts.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = io.epoch;
        let Some(slot) = io.parts.get_mut(me) else {
            return Err(BdevError::NoMemory(format!("{}: no IO queue for reactor {me}", ctrl.params.name)));
        };
        (epoch, slot.take())
    };
    // Without parts the controller is reconnecting: the queue starts
    // without a connection and takes the next one.
    let q = Rc::new(RefCell::new(Queue::new(parts.map(HostQpair::from_parts), epoch)));
    local.0.borrow_mut().insert(ctrl.id, q.clone());
    let (q2, ctrl) = (q.clone(), ctrl.clone());
    reactor::register_poller("nvme_tcp_io", move || poll_queue(&q2, &ctrl));
    Ok(q)
}

/// This reactor's namespace bdev channels, for `bdev_nvme_get_io_paths`.
#[derive(Default)]
struct LiveChannels(RefCell<Vec<std::rc::Weak<TcpNsChannel>>>);

/// `bdev_nvme_get_io_paths` on this reactor: the paths of each namespace
/// bdev channel here (of bdev `name` only, if given), as this reactor's
/// channels see them now. None when the reactor has no NVMe/TCP IO queue
/// (SPDK lists only the threads with an NVMe poll group).
pub fn local_io_paths(name: Option<&str>) -> Option<Vec<Value>> {
    if reactor::local::<LocalQueues>().0.borrow().is_empty() {
        return None;
    }
    let live = reactor::local::<LiveChannels>();
    let channels: Vec<Rc<TcpNsChannel>> = live.0.borrow().iter().filter_map(std::rc::Weak::upgrade).collect();
    let mut out = Vec::new();
    for ch in channels.iter().filter(|ch| name.is_none_or(|n| n == ch.bdev_name)) {
        // As the channel's next IO would see them.
        let gen = ch.group.gen.load(Ordering::Acquire);
        if gen != ch.gen.get() {
            ch.refresh(gen);
        }
        let Ok(paths) = ch.paths.try_borrow() else { continue };
        out.extend(multipath::io_paths_json(&ch.bdev_name, &paths, ch.ns_index, ch.policy.get()));
    }
    Some(out)
}

struct TcpNsChannel {
    bdev_name: String,
    group: Arc<PathGroup>,
    /// This reactor's queues of the group's paths, as of `gen`.
    paths: RefCell<Vec<ChanPath>>,
    gen: std::cell::Cell<u64>,
    cursor: Cursor,
    policy: Arc<MpPolicy>,
    nsid: u32,
    ns_index: usize,
    block_size: u32,
    max_io_blocks: u32,
    /// This channel's slot in each path's IO count.
    io_count_slot: usize,
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
        let group = self.ctrl.group.clone();
        let gen = group.gen.load(Ordering::Acquire);
        let paths = multipath::chan_paths(&group, self.ns_index);
        if paths.is_empty() {
            // The first path's error (no queue for this reactor).
            local_queue(&self.ctrl)?;
        }
        let ch = Rc::new(TcpNsChannel {
            bdev_name: self.props.name.clone(),
            group,
            paths: RefCell::new(paths),
            gen: std::cell::Cell::new(gen),
            cursor: Cursor::default(),
            policy: self.policy.clone(),
            nsid: self.nsid,
            ns_index: self.ns_index,
            block_size: self.props.block_size,
            max_io_blocks: self.props.max_io_blocks,
            io_count_slot: io_count_slot(),
        });
        let live = reactor::local::<LiveChannels>();
        let mut live = live.0.borrow_mut();
        live.retain(|w| w.strong_count() > 0);
        live.push(Rc::downgrade(&ch));
        Ok(ch)
    }
    fn config(&self) -> Option<Value> {
        // One attach call recreates every namespace: the first one says it.
        if self.ctrl.info.namespaces.first().map(|n| n.nsid) != Some(self.nsid) {
            return None;
        }
        // The first path left (the one attached first may be gone).
        let head = self.ctrl.group.paths().first().cloned().unwrap_or_else(|| self.ctrl.clone());
        Some(json!({"method": "bdev_nvme_attach_controller", "params": head.attach_params_json()}))
    }
    fn driver_specific(&self) -> Option<(&'static str, Value)> {
        // One entry per path, as SPDK lists a namespace's paths.
        let entries: Vec<Value> = self.ctrl.group.paths().iter().map(|c| c.ns_json(self.nsid, self.ns_index)).collect();
        Some(("nvme", Value::Array(entries)))
    }
}

impl RemoteCtrl {
    /// One more IO sent on this path, in the count slot of the sending
    /// reactor (`io_count_slot`).
    pub(super) fn count_io(&self, slot: usize) {
        self.ios[slot % IO_COUNT_SLOTS].0.fetch_add(1, Ordering::Relaxed);
    }

    /// The attach call that recreates this path.
    fn attach_params_json(&self) -> Value {
        let p = &self.params;
        let mut params = json!({"name": p.name, "trtype": "TCP", "traddr": p.traddr,
            "adrfam": self.adrfam, "trsvcid": p.trsvcid,
            "subnqn": p.subnqn, "hdgst": p.hdgst, "ddgst": p.ddgst});
        if let (Some(h), Some(o)) = (&p.hostnqn, params.as_object_mut()) {
            o.insert("hostnqn".into(), json!(h));
        }
        if let (Some(k), Some(o)) = (&p.psk, params.as_object_mut()) {
            o.insert("psk".into(), json!(k.name));
        }
        let r = self.reconnect;
        if let (true, Some(o)) = (r.reconnects(), params.as_object_mut()) {
            o.insert("ctrlr_loss_timeout_sec".into(), json!(r.ctrlr_loss_timeout_sec));
            o.insert("reconnect_delay_sec".into(), json!(r.reconnect_delay_sec));
            o.insert("fast_io_fail_timeout_sec".into(), json!(r.fast_io_fail_timeout_sec));
        }
        params
    }

    /// A namespace bdev's `driver_specific.nvme` entry for this path, in
    /// SPDK's shape (`ns_data.ana_state` when the controller reports ANA).
    fn ns_json(&self, nsid: u32, ns_index: usize) -> Value {
        let p = &self.params;
        let mut ns_data = json!({"id": nsid});
        if self.info.ana_reporting {
            ns_data["ana_state"] = json!(ana_state_name(self.ana_state(ns_index)));
        }
        json!({"trid": {"trtype": "TCP", "adrfam": self.adrfam, "traddr": p.traddr, "trsvcid": p.trsvcid,
                "subnqn": p.subnqn},
            "ctrlr_data": {"cntlid": self.cntlid.load(Ordering::Relaxed), "serial_number": self.info.serial_number,
                "model_number": self.info.model_number, "firmware_revision": self.info.firmware_revision,
                "cmic": {"ana_reporting": self.info.ana_reporting}},
            "ns_data": ns_data})
    }
}

/// Follows the controller's connection epoch: gives the old connection
/// up, takes this reactor's queue of the new one if there is one yet.
fn follow_epoch(q: &mut Queue, ctrl: &RemoteCtrl) {
    let me = reactor::current().unwrap_or(0);
    let (epoch, parts) = {
        let mut io = ctrl.io_parts.lock().unwrap_or_else(|e| e.into_inner());
        (io.epoch, io.parts.get_mut(me).and_then(Option::take))
    };
    match parts {
        Some(p) => q.set_connection(HostQpair::from_parts(p), epoch),
        None => {
            q.drop_connection();
            q.epoch = epoch;
        }
    }
}

fn poll_queue(q_rc: &Rc<RefCell<Queue>>, ctrl: &Arc<RemoteCtrl>) -> reactor::PollStatus {
    let Some((progressed, rerouting)) = poll_one(&mut q_rc.borrow_mut(), ctrl) else {
        return reactor::PollStatus::Done;
    };
    if rerouting {
        multipath::reroute(ctrl, q_rc);
    }
    if progressed {
        reactor::PollStatus::Busy
    } else {
        reactor::PollStatus::Idle
    }
}

/// One poll of this reactor's queue of `ctrl`: whether it progressed, and
/// whether it holds IOs for another path. None: the queue is done.
fn poll_one(q: &mut Queue, ctrl: &Arc<RemoteCtrl>) -> Option<(bool, bool)> {
    if ctrl.detached.load(Ordering::Acquire) && q.held() == 0 {
        // Dropping the queue closes its socket.
        let local = reactor::local::<LocalQueues>();
        local.0.borrow_mut().remove(&ctrl.id);
        return None;
    }
    // One atomic load per loop; the lock only when the epoch moved.
    if ctrl.epoch.load(Ordering::Acquire) != q.epoch {
        follow_epoch(q, ctrl);
    }
    let deleting = ctrl.state() == CtrlState::Deleting;
    let failing = ctrl.failing.load(Ordering::Acquire) || (deleting && !q.has_connection());
    // Multipath: IO waiting for this path's connection goes to a path
    // that has one (an error path: it looks at the group under its lock).
    if (failing || !q.has_connection())
        && q.waiting() > 0
        && ctrl.group.count.load(Ordering::Acquire) > 1
        && multipath::another_path_up(ctrl)
    {
        q.reroute_unsent();
    }
    if failing != q.failing_seen {
        q.failing_seen = failing;
        q.set_failing(failing);
    }
    let on_loss = if ctrl.retries_io() && !failing && !deleting { OnLoss::Resend } else { OnLoss::Fail };
    let polled = q.poll(on_loss);
    if polled.failed_now {
        tracing::warn!(name = ctrl.params.name, "NVMe/TCP IO queue lost its connection");
        ctrl.lost.fetch_max(q.epoch + 1, Ordering::AcqRel);
    }
    let impossible = polled.impossible;
    if impossible > 0 {
        // The queue pair answers only commands it was given, once each;
        // there is no IO to answer here.
        ctrl.impossible_completions.fetch_add(impossible, Ordering::Relaxed);
        tracing::error!(name = ctrl.params.name, impossible, "NVMe/TCP completion for no IO");
        debug_assert!(false, "NVMe/TCP completion for no IO");
    }
    Some((polled.progressed, q.held() > q.in_flight()))
}

impl TcpNsChannel {
    /// Takes the group's paths anew (they changed: a path was added or
    /// removed). Skipped while the list is in use (a later IO does it).
    fn refresh(&self, gen: u64) {
        let paths = multipath::chan_paths(&self.group, self.ns_index);
        if let Ok(mut p) = self.paths.try_borrow_mut() {
            if !paths.is_empty() {
                *p = paths;
            }
            self.gen.set(gen);
        }
    }
}

impl BdevChannel for TcpNsChannel {
    fn submit(&self, io: IoBox) {
        // One atomic load per IO; the lock only when the paths changed.
        let gen = self.group.gen.load(Ordering::Acquire);
        if gen != self.gen.get() {
            self.refresh(gen);
        }
        let paths = self.paths.borrow();
        let Some(p) = paths.get(multipath::pick(&paths, self.ns_index, self.policy.get(), &self.cursor)) else {
            return io.fail(bdev::IoError::NoDevice);
        };
        p.ctrl.count_io(self.io_count_slot);
        p.q.borrow_mut().submit(io, self.nsid, self.block_size, self.max_io_blocks);
    }

    /// IOs still waiting for a command slot can be aborted; sent ones not.
    fn abort(&self, matches: &dyn Fn(&BdevIo) -> bool) -> bool {
        self.paths.borrow().iter().any(|p| p.q.borrow_mut().abort(self.nsid, matches))
    }
}
