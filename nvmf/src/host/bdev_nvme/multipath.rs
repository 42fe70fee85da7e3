//! Several controllers behind one namespace bdev (`multipath: "multipath"`,
//! SPDK's multipath mode): each path is a controller of its own (its own
//! keeper, reconnects and IO queues); a namespace bdev's channel sends each
//! IO on a path chosen by the paths' ANA states and the bdev's policy
//! (`bdev_nvme_set_multipath_policy`). An IO that ends with an ANA status,
//! or that waits on a path without a connection, goes to another path; it
//! fails only when no path can take it and none is about to.

use super::keeper::{same_namespaces, same_subsystem_and_host};
use super::{
    adrfam_name, connect_in_background, connect_params, ctrls, local_queue, AttachParams, CtrlState, RemoteCtrl,
};
use crate::host::ns_queue::{Queue, Rerouted};
use crate::host::qpair::HostError;
use crate::host::{status_io_error, Session};
use bdev::{BdevError, IoError};
use nvme_spec::log::ana_state;
use nvme_spec::Status;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// How a namespace bdev spreads IO over its paths (SPDK's policies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// One path at a time: the first optimized one, else the first
    /// non-optimized one.
    ActivePassive,
    /// Every optimized path (the non-optimized ones when none is), as the
    /// selector says.
    ActiveActive(Selector),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selector {
    /// In turn, `rr_min_io` IOs on a path before the next.
    RoundRobin { rr_min_io: u32 },
    /// The path with the fewest IOs held on this reactor.
    QueueDepth,
}

impl Policy {
    /// SPDK's names: `active_passive` / `active_active`, with the selector
    /// `round_robin` (default) or `queue_depth`.
    pub fn parse(policy: &str, selector: Option<&str>, rr_min_io: Option<u32>) -> Result<Policy, String> {
        match (policy, selector, rr_min_io) {
            ("active_passive", None, None) => Ok(Policy::ActivePassive),
            ("active_passive", _, _) => Err("selector and rr_min_io apply to policy active_active only".into()),
            ("active_active", None | Some("round_robin"), Some(0)) => Err("rr_min_io must be at least 1".into()),
            ("active_active", None | Some("round_robin"), n) => {
                Ok(Policy::ActiveActive(Selector::RoundRobin { rr_min_io: n.unwrap_or(1) }))
            }
            ("active_active", Some("queue_depth"), None) => Ok(Policy::ActiveActive(Selector::QueueDepth)),
            ("active_active", Some("queue_depth"), Some(_)) => {
                Err("rr_min_io applies to selector round_robin only".into())
            }
            ("active_active", Some(s), _) => Err(format!("selector {s} is not round_robin or queue_depth")),
            (p, _, _) => Err(format!("policy {p} is not active_passive or active_active")),
        }
    }

    /// `bdev_nvme_set_multipath_policy`'s parameters for bdev `name`.
    pub fn to_params(self, name: &str) -> serde_json::Value {
        match self {
            Policy::ActivePassive => serde_json::json!({"name": name, "policy": "active_passive"}),
            Policy::ActiveActive(Selector::RoundRobin { rr_min_io }) => serde_json::json!({"name": name,
                "policy": "active_active", "selector": "round_robin", "rr_min_io": rr_min_io}),
            Policy::ActiveActive(Selector::QueueDepth) => {
                serde_json::json!({"name": name, "policy": "active_active", "selector": "queue_depth"})
            }
        }
    }

    fn encode(self) -> (u8, u32) {
        match self {
            Policy::ActivePassive => (0, 0),
            Policy::ActiveActive(Selector::RoundRobin { rr_min_io }) => (1, rr_min_io),
            Policy::ActiveActive(Selector::QueueDepth) => (2, 0),
        }
    }

    fn decode(kind: u8, rr_min_io: u32) -> Policy {
        match kind {
            1 => Policy::ActiveActive(Selector::RoundRobin { rr_min_io }),
            2 => Policy::ActiveActive(Selector::QueueDepth),
            _ => Policy::ActivePassive,
        }
    }
}

/// A namespace bdev's policy, read by its channels on every IO.
#[derive(Default)]
pub(super) struct MpPolicy {
    kind: AtomicU8,
    rr_min_io: AtomicU32,
}

impl MpPolicy {
    pub(super) fn get(&self) -> Policy {
        Policy::decode(self.kind.load(Ordering::Relaxed), self.rr_min_io.load(Ordering::Relaxed))
    }

    fn set(&self, p: Policy) {
        let (kind, rr) = p.encode();
        self.rr_min_io.store(rr, Ordering::Relaxed);
        self.kind.store(kind, Ordering::Relaxed);
    }
}

/// The controllers (paths) behind one set of namespace bdevs.
pub(super) struct PathGroup {
    /// The paths, in the order they were attached. Emptied when the
    /// bdevs are gone (the paths refer to the group too).
    pub(super) paths: Mutex<Vec<Arc<RemoteCtrl>>>,
    /// Moves whenever `paths` changes: channels then take the new list.
    pub(super) gen: AtomicU64,
    /// `paths.len()`.
    pub(super) count: AtomicUsize,
    /// The namespace bdevs' names.
    pub(super) bdevs: Mutex<Vec<String>>,
    /// Each namespace bdev's policy (index as in `info.namespaces`).
    pub(super) policies: Vec<Arc<MpPolicy>>,
    /// Each namespace bdev's preferred paths (`bdev_nvme_set_preferred_path`),
    /// the one preferred last first: a channel orders its paths so, the
    /// others after them in attach order. Path ids, so a preference holds
    /// across reconnects (the controller ID may change then).
    pub(super) preferred: Vec<Mutex<Vec<u64>>>,
}

impl PathGroup {
    pub(super) fn new(namespaces: usize) -> Arc<PathGroup> {
        Arc::new(PathGroup {
            paths: Mutex::new(Vec::new()),
            gen: AtomicU64::new(0),
            count: AtomicUsize::new(0),
            bdevs: Mutex::new(Vec::new()),
            policies: (0..namespaces).map(|_| Arc::new(MpPolicy::default())).collect(),
            preferred: (0..namespaces).map(|_| Mutex::new(Vec::new())).collect(),
        })
    }

    pub(super) fn paths(&self) -> Vec<Arc<RemoteCtrl>> {
        self.paths.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn push(&self, c: Arc<RemoteCtrl>) {
        let mut p = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        p.push(c);
        self.count.store(p.len(), Ordering::Release);
        self.gen.fetch_add(1, Ordering::AcqRel);
    }

    /// Removes path `id`; returns the paths left.
    pub(super) fn remove(&self, id: u64) -> usize {
        let mut p = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|c| c.id != id);
        self.count.store(p.len(), Ordering::Release);
        self.gen.fetch_add(1, Ordering::AcqRel);
        p.len()
    }

    pub(super) fn bdev_names(&self) -> Vec<String> {
        self.bdevs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One path as a channel on this reactor sees it.
pub(super) struct ChanPath {
    pub(super) ctrl: Arc<RemoteCtrl>,
    pub(super) q: Rc<RefCell<Queue>>,
}

/// This reactor's queues of the group's paths in namespace `ns`'s order
/// (the preferred ones first; a path whose queue cannot be made here is
/// left out).
pub(super) fn chan_paths(group: &PathGroup, ns: usize) -> Vec<ChanPath> {
    let mut paths: Vec<ChanPath> =
        group.paths().into_iter().filter_map(|ctrl| local_queue(&ctrl).ok().map(|q| ChanPath { ctrl, q })).collect();
    if let Some(preferred) = group.preferred.get(ns) {
        let preferred = preferred.lock().unwrap_or_else(|e| e.into_inner());
        // Stable: the paths not preferred keep their attach order.
        paths.sort_by_key(|p| preferred.iter().position(|&id| id == p.ctrl.id).unwrap_or(usize::MAX));
    }
    paths
}

const OPTIMIZED: u8 = 0;
const NON_OPTIMIZED: u8 = 1;
const UNUSABLE: u8 = 2;

/// How good `c` is for namespace `ns` now: connected and optimized,
/// connected and non-optimized, or unusable (no connection, failing, or
/// the namespace inaccessible, lost or in transition through it).
fn rank(c: &RemoteCtrl, ns: usize) -> u8 {
    if c.state() != CtrlState::Enabled || c.failing.load(Ordering::Acquire) {
        return UNUSABLE;
    }
    match c.ana_state(ns) {
        ana_state::OPTIMIZED => OPTIMIZED,
        ana_state::NON_OPTIMIZED => NON_OPTIMIZED,
        _ => UNUSABLE,
    }
}

/// A channel's round-robin position.
#[derive(Default)]
pub(super) struct Cursor {
    next: Cell<usize>,
    burst: Cell<u32>,
}

/// The path an IO for namespace `ns` goes on. With no usable path: one
/// that is reconnecting (the IO waits for it there), else the first (whose
/// queue waits or fails the IO as its controller says).
pub(super) fn pick(paths: &[ChanPath], ns: usize, policy: Policy, cur: &Cursor) -> usize {
    let best = paths.iter().map(|p| rank(&p.ctrl, ns)).min().unwrap_or(UNUSABLE);
    if best == UNUSABLE {
        return paths
            .iter()
            .position(|p| {
                matches!(p.ctrl.state(), CtrlState::Resetting | CtrlState::ReconnectDelayed)
                    && !p.ctrl.failing.load(Ordering::Acquire)
            })
            .unwrap_or(0);
    }
    let is_best = |i: usize| rank(&paths[i].ctrl, ns) == best;
    match policy {
        Policy::ActivePassive => (0..paths.len()).find(|&i| is_best(i)).unwrap_or(0),
        Policy::ActiveActive(Selector::RoundRobin { rr_min_io }) => {
            let n = paths.len();
            let at = cur.next.get();
            if at < n && cur.burst.get() < rr_min_io && is_best(at) {
                cur.burst.set(cur.burst.get() + 1);
                return at;
            }
            let i = (1..=n).map(|k| (at + k) % n).find(|&i| is_best(i)).unwrap_or(0);
            cur.next.set(i);
            cur.burst.set(1);
            i
        }
        Policy::ActiveActive(Selector::QueueDepth) => (0..paths.len())
            .filter(|&i| is_best(i))
            .min_by_key(|&i| paths[i].q.try_borrow().map_or(usize::MAX, |q| q.in_flight()))
            .unwrap_or(0),
    }
}

/// Whether the IO `pick` sends for namespace `ns` now goes on `paths[i]`,
/// as `bdev_nvme_get_io_paths` says `current`: a usable path, and with
/// active/passive the one chosen, with active/active one of those taking
/// turns (optimized ones, or the non-optimized ones when none is).
pub(super) fn is_current(paths: &[ChanPath], ns: usize, policy: Policy, i: usize) -> bool {
    let connected = |p: &ChanPath| p.q.try_borrow().is_ok_and(|q| q.has_connection());
    let ranks: Vec<u8> = paths.iter().map(|p| if connected(p) { rank(&p.ctrl, ns) } else { UNUSABLE }).collect();
    let best = ranks.iter().copied().min().unwrap_or(UNUSABLE);
    if ranks.get(i) != Some(&best) || best == UNUSABLE {
        return false;
    }
    match policy {
        Policy::ActivePassive => ranks.iter().position(|&r| r == best) == Some(i),
        Policy::ActiveActive(_) => true,
    }
}

/// The ANA state an ANA status says the namespace is in.
fn state_of(s: Status) -> u8 {
    if s == Status::ANA_PERSISTENT_LOSS {
        ana_state::PERSISTENT_LOSS
    } else if s == Status::ANA_INACCESSIBLE {
        ana_state::INACCESSIBLE
    } else {
        ana_state::CHANGE
    }
}

/// Whether an IO no path can take now should wait, as SPDK's multipath
/// does: a path reconnects, or the namespace is inaccessible or in
/// transition through a connected path and the IO has waited less than
/// that controller's ANATT (persistent loss does not pass).
fn worth_waiting(paths: &[ChanPath], ns: usize, waited_ns: u64) -> bool {
    paths.iter().any(|p| {
        let c = &p.ctrl;
        if c.failing.load(Ordering::Acquire) {
            return false;
        }
        match c.state() {
            CtrlState::Enabled => {
                matches!(c.ana_state(ns), ana_state::INACCESSIBLE | ana_state::CHANGE)
                    && waited_ns < u64::from(c.info.anatt_sec) * super::NS_PER_SEC
            }
            CtrlState::Resetting | CtrlState::ReconnectDelayed => true,
            _ => false,
        }
    })
}

/// Sends the IOs `from` gave up (ANA status, or waiting without a
/// connection) on the best path there is, keeps them while one may become
/// usable, fails them otherwise. An error path: it reads the group's list
/// under its lock, at most once a millisecond while IOs wait.
pub(super) fn reroute(ctrl: &Arc<RemoteCtrl>, from: &Rc<RefCell<Queue>>) {
    let now = reactor::now_ns();
    if now < from.borrow().reroute_at_ns {
        return;
    }
    // In the order of the namespace of the IO at hand (taken anew when
    // the next IO is of another namespace).
    let mut paths_ns = None;
    let mut paths = Vec::new();
    let cur = Cursor::default();
    loop {
        let Some(mut r) = from.borrow_mut().take_rerouted() else { break };
        let ns = ctrl.ns_index(r.nsid).unwrap_or(0);
        if paths_ns != Some(ns) {
            paths = chan_paths(&ctrl.group, ns);
            paths_ns = Some(ns);
        }
        if let (Some(s), false) = (r.status, r.marked) {
            // What the status says holds until the ANA log is read again.
            r.marked = true;
            ctrl.set_ana_state(ns, state_of(s));
            ctrl.ana_stale.store(true, Ordering::Release);
        }
        let policy = ctrl.group.policies.get(ns).map_or(Policy::ActivePassive, |p| p.get());
        if paths.iter().any(|p| rank(&p.ctrl, ns) != UNUSABLE) {
            let p = &paths[pick(&paths, ns, policy, &cur)];
            p.ctrl.count_io(super::io_count_slot());
            let Rerouted { io, nsid, block_size, max_io_blocks, .. } = r;
            p.q.borrow_mut().submit(io, nsid, block_size, max_io_blocks);
            continue;
        }
        let since = *r.waiting_since.get_or_insert(now);
        if worth_waiting(&paths, ns, now - since) {
            // A state change the host has not read yet (its notice may be
            // on the way, or a log read crossed it) can make a path usable:
            // the logs are read again while the IO waits.
            for p in paths.iter().filter(|p| p.ctrl.state() == CtrlState::Enabled) {
                p.ctrl.ana_stale.store(true, Ordering::Release);
            }
            let mut q = from.borrow_mut();
            q.keep_rerouted(r);
            q.reroute_at_ns = now + 1_000_000;
            break;
        }
        r.io.fail(r.status.map_or(IoError::NoDevice, status_io_error));
    }
}

/// Whether a path of `ctrl`'s group other than `ctrl` is connected.
pub(super) fn another_path_up(ctrl: &RemoteCtrl) -> bool {
    ctrl.group
        .paths
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|c| c.id != ctrl.id && c.state() == CtrlState::Enabled && !c.failing.load(Ordering::Acquire))
}

/// `multipath: "multipath"`: connects `params`' address as one more path
/// (a controller of its own) to the namespaces of the controller of that
/// name, which must show the same namespaces. Its IO queues take part in
/// the bdevs' IO at once. Errors as SPDK's: the same path twice is
/// EALREADY, another subsystem or host NQN is EINVAL.
pub fn add_multipath_path(
    params: AttachParams,
    reconnect: super::ReconnectOpts,
    done: impl FnOnce(Result<Vec<String>, BdevError>) + Send + 'static,
) {
    if let Err(e) = reconnect.validate() {
        return done(Err(BdevError::Invalid(e)));
    }
    let name = params.name.clone();
    let Some(head) =
        ctrls().list.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|c| c.params.name == name).cloned()
    else {
        return done(Err(BdevError::NotFound(format!("controller {name}"))));
    };
    let adrfam = match adrfam_name(params.adrfam.as_deref()) {
        Ok(a) => a,
        Err(e) => return done(Err(e)),
    };
    if let Err(e) = check_new_path(&head, &params) {
        return done(Err(e));
    }
    let mut cp = connect_params(&params);
    cp.kato_ms = reconnect.keep_alive_timeout_ms;
    let rx = match connect_in_background(cp.clone(), reactor::count().max(1) as u16) {
        Ok(rx) => rx,
        Err(e) => return done(Err(e)),
    };
    let mut state = Some((head, params, cp, done));
    reactor::register_timed_poller("nvme_tcp_add_path", Duration::from_millis(1), move || {
        let r: Result<Session, HostError> = match rx.try_recv() {
            Ok(r) => r,
            Err(mpsc::TryRecvError::Empty) => return reactor::PollStatus::Idle,
            Err(mpsc::TryRecvError::Disconnected) => Err(HostError::Io("connect thread ended".into())),
        };
        let Some((head, params, cp, done)) = state.take() else { return reactor::PollStatus::Done };
        let where_ = format!("{}:{}", params.traddr, params.trsvcid);
        match r {
            Err(e) => done(Err(BdevError::Os(format!("adding path {where_}: {e}"), libc::EIO))),
            Ok(s) if !same_namespaces(&head.info.namespaces, &s.info.namespaces) => done(Err(BdevError::Invalid(
                format!("path {where_} shows other namespaces than controller {}", head.params.name),
            ))),
            Ok(s) => {
                // Checked again: a detach or another add may have run meanwhile.
                if let Err(e) = check_new_path(&head, &params) {
                    return {
                        done(Err(e));
                        reactor::PollStatus::Done
                    };
                }
                super::join_group(&head, params, adrfam, reconnect, cp, s);
                done(Ok(head.group.bdev_names()))
            }
        }
        reactor::PollStatus::Done
    });
}

/// Why `params` cannot be a new path of `head`'s group, if it cannot.
fn check_new_path(head: &RemoteCtrl, params: &AttachParams) -> Result<(), BdevError> {
    let name = &head.params.name;
    let refuse = |m: String, errno: i32| Err(BdevError::Os(m, errno));
    if head.state() == CtrlState::Deleting || head.group.count.load(Ordering::Acquire) == 0 {
        return refuse(format!("controller {name} is being detached"), libc::EALREADY);
    }
    if head.path_count.load(Ordering::Acquire) > 1 {
        return refuse(
            format!("controller {name} has failover paths: a controller is either failover or multipath"),
            libc::EINVAL,
        );
    }
    if head.group.paths().iter().any(|c| c.params.traddr == params.traddr && c.params.trsvcid == params.trsvcid) {
        return refuse(
            format!("A controller named {name} already exists with the specified network path"),
            libc::EALREADY,
        );
    }
    same_subsystem_and_host(name, params, &head.params)?;
    Ok(())
}

/// `bdev_nvme_set_multipath_policy`: the policy of the NVMe/TCP namespace
/// bdev `bdev`; its channels use it from their next IO.
pub fn set_multipath_policy(bdev: &str, policy: Policy) -> Result<(), BdevError> {
    let list = ctrls().list.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for c in list {
        let names = c.group.bdev_names();
        if let Some(ns) = c.info.namespaces.iter().position(|n| super::bdev_name(&c.params.name, n.nsid) == bdev) {
            if !names.iter().any(|n| n == bdev) {
                break;
            }
            if let Some(p) = c.group.policies.get(ns) {
                p.set(policy);
                return Ok(());
            }
        }
    }
    Err(BdevError::Os(format!("bdev {bdev} is not a namespace bdev of an NVMe/TCP controller"), libc::ENODEV))
}

/// The `bdev_nvme_set_multipath_policy` calls that restore every namespace
/// bdev's policy other than the default, for `save_config` (after the
/// attach calls of its paths).
pub fn multipath_policies_config() -> Vec<serde_json::Value> {
    let list = ctrls().list.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut out = Vec::new();
    for c in list {
        for (n, p) in c.info.namespaces.iter().zip(&c.group.policies) {
            let policy = p.get();
            if policy != Policy::ActivePassive {
                let name = super::bdev_name(&c.params.name, n.nsid);
                out.push(
                    serde_json::json!({"method": "bdev_nvme_set_multipath_policy", "params": policy.to_params(&name)}),
                );
            }
        }
    }
    out
}

/// The policy of bdev `bdev`, if it is an NVMe/TCP namespace bdev.
pub fn multipath_policy(bdev: &str) -> Option<Policy> {
    let list = ctrls().list.lock().unwrap_or_else(|e| e.into_inner()).clone();
    list.iter().find_map(|c| {
        let ns = c.info.namespaces.iter().position(|n| super::bdev_name(&c.params.name, n.nsid) == bdev)?;
        c.group.policies.get(ns).map(|p| p.get())
    })
}

/// `bdev_nvme_set_preferred_path`: the path of controller ID `cntlid` goes
/// first in namespace bdev `bdev`'s order of paths: active/passive sends
/// the IO there whenever it is as good as the best (optimized, or
/// non-optimized with no optimized path). Its channels take the new order
/// before their next IO. The preference stays with the path (across its
/// reconnects) until another path is preferred or it is removed. Errors as
/// SPDK's (ENODEV): no such NVMe/TCP namespace bdev, or no path of it with
/// that controller ID.
pub fn set_preferred_path(bdev: &str, cntlid: u16) -> Result<(), BdevError> {
    let no_such = |what: String| Err(BdevError::Os(format!("No such device: {what}"), libc::ENODEV));
    let list = ctrls().list.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let found = list.iter().find_map(|c| {
        let ns = c.info.namespaces.iter().position(|n| super::bdev_name(&c.params.name, n.nsid) == bdev)?;
        c.group.bdev_names().iter().any(|n| n == bdev).then_some((c.clone(), ns))
    });
    let Some((c, ns)) = found else {
        return no_such(format!("bdev {bdev} is not a namespace bdev of an NVMe/TCP controller"));
    };
    let paths = c.group.paths();
    let Some(path) = paths.iter().find(|p| p.cntlid.load(Ordering::Relaxed) == cntlid) else {
        return no_such(format!("bdev {bdev} has no path to a controller with cntlid {cntlid}"));
    };
    let Some(order) = c.group.preferred.get(ns) else {
        return no_such(format!("bdev {bdev} has no namespace {ns}"));
    };
    {
        let mut order = order.lock().unwrap_or_else(|e| e.into_inner());
        // Paths removed since leave the order (it holds the group's paths at most).
        order.retain(|&id| id != path.id && paths.iter().any(|p| p.id == id));
        order.insert(0, path.id);
    }
    // The channels take their paths anew, in the new order.
    c.group.gen.fetch_add(1, Ordering::AcqRel);
    Ok(())
}

/// One `bdev_nvme_get_io_paths` entry per path of a namespace bdev's
/// channel on this reactor (`paths`, in the channel's order), SPDK's fields.
pub(super) fn io_paths_json(bdev: &str, paths: &[ChanPath], ns: usize, policy: Policy) -> Vec<serde_json::Value> {
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let c = &p.ctrl;
            let connected = c.state() == CtrlState::Enabled && p.q.try_borrow().is_ok_and(|q| q.has_connection());
            let accessible = matches!(c.ana_state(ns), ana_state::OPTIMIZED | ana_state::NON_OPTIMIZED);
            serde_json::json!({
                "bdev_name": bdev,
                "cntlid": c.cntlid.load(Ordering::Relaxed),
                "current": is_current(paths, ns, policy, i),
                "connected": connected,
                "accessible": accessible,
                "transport": {"trtype": "TCP", "traddr": c.params.traddr, "trsvcid": c.params.trsvcid,
                              "adrfam": c.adrfam},
            })
        })
        .collect()
}
