//! A remote controller's connection over time, on its attaching reactor:
//! keep alive, noticing a lost path, reconnecting (`ReconnectOpts`),
//! failover between paths (`multipath: "failover"`), the two timeouts that
//! end waiting IO and the controller, and `bdev_nvme_reset_controller`.

use super::{
    adrfam_name, connect_in_background, connect_params, ctrls, lose_path, AttachParams, Connecting, CtrlState, PathId,
    RemoteCtrl, NS_PER_SEC,
};
use crate::host::qpair::{AdminQpair, HostError, QpairParts};
use crate::host::{ConnectParams, NsInfo, Session, DEFAULT_HOSTNQN};
use bdev::{BdevError, Registry};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Weak};
use std::time::Duration;

/// Where the keeper stands with the controller's connection.
enum Link {
    /// Connected: the admin queue, kept alive (boxed: it is large, and a
    /// link changes only on loss and reconnect).
    Up(Box<AdminQpair>),
    /// A connect attempt runs on a helper thread.
    Connecting(Connecting),
    /// The next attempt starts at this reactor time (ns).
    Delayed(u64),
    /// Given up: no reconnect, or deleted.
    Down,
}

/// The controller's life on its attaching reactor (a timed poller): keep
/// alive, noticing a lost connection, reconnecting, and the two timeouts
/// that end waiting IO and the controller itself.
pub(super) struct Keeper {
    ctrl: Weak<RemoteCtrl>,
    cp: ConnectParams,
    link: Link,
    /// When the connection was lost (reactor ns).
    lost_at_ns: u64,
    /// Failed attempts since the loss.
    tries: usize,
}

impl Keeper {
    pub(super) fn new(ctrl: &Arc<RemoteCtrl>, cp: ConnectParams, mut admin: AdminQpair) -> Self {
        if ctrl.info.ana_reporting {
            admin.watch_ana();
        }
        Keeper { ctrl: Arc::downgrade(ctrl), cp, link: Link::Up(Box::new(admin)), lost_at_ns: 0, tries: 0 }
    }

    pub(super) fn poll(&mut self) -> reactor::PollStatus {
        let Some(ctrl) = self.ctrl.upgrade() else {
            return reactor::PollStatus::Done;
        };
        if ctrl.detached.load(Ordering::Acquire) || ctrl.state() == CtrlState::Deleting {
            // Dropping the link closes the admin queue; a connect still
            // running finds nobody listening and closes its connections.
            self.link = Link::Down;
            return reactor::PollStatus::Done;
        }
        let now = reactor::now_ns();
        match &mut self.link {
            Link::Up(admin) => {
                let lost_by_io = ctrl.lost.load(Ordering::Acquire) > ctrl.epoch.load(Ordering::Acquire);
                let reset = ctrl.reset_wanted.swap(false, Ordering::AcqRel);
                if reset {
                    ctrl.resetting.store(true, Ordering::Release);
                }
                if ctrl.ana_stale.load(Ordering::Acquire) {
                    admin.read_ana_log();
                }
                let polled = admin.poll();
                if let Some(page) = admin.take_ana_log() {
                    take_ana_log(&ctrl, &page);
                }
                match polled {
                    Err(e) => self.on_loss(&ctrl, now, &format!("admin queue: {e}")),
                    Ok(()) if lost_by_io => self.on_loss(&ctrl, now, "an IO queue lost its connection"),
                    Ok(()) if reset => self.on_loss(&ctrl, now, "reset requested"),
                    Ok(()) => {}
                }
            }
            Link::Connecting(rx) => match rx.try_recv() {
                Err(mpsc::TryRecvError::Empty) => {}
                Ok(Ok(session)) => self.adopt(&ctrl, session, now),
                Ok(Err(e)) => self.attempt_failed(&ctrl, now, &e.to_string()),
                Err(mpsc::TryRecvError::Disconnected) => self.attempt_failed(&ctrl, now, "connect thread ended"),
            },
            Link::Delayed(at) => {
                // A reset asked for now does not wait for the delay.
                if now >= *at || ctrl.reset_wanted.swap(false, Ordering::AcqRel) {
                    self.start_attempt(&ctrl, now);
                }
            }
            Link::Down => {
                // Failed for good, unless a reset asks for one more try.
                if ctrl.reset_wanted.swap(false, Ordering::AcqRel) {
                    ctrl.resetting.store(true, Ordering::Release);
                    ctrl.failing.store(false, Ordering::Release);
                    self.lost_at_ns = now;
                    self.tries = 0;
                    self.start_attempt(&ctrl, now);
                }
                return reactor::PollStatus::Idle;
            }
        }
        if !matches!(self.link, Link::Up(_) | Link::Down) {
            self.check_timeouts(&ctrl, now);
        }
        reactor::PollStatus::Idle
    }

    /// The connection is gone: every queue gives its connection up (their
    /// IO waits), and the first reconnect attempt starts at once.
    fn on_loss(&mut self, ctrl: &Arc<RemoteCtrl>, now: u64, why: &str) {
        self.link = Link::Down;
        if !ctrl.retries_io() {
            tracing::warn!(
                name = ctrl.params.name,
                "NVMe/TCP path failed ({why}); ctrlr_loss_timeout_sec is 0: no reconnect"
            );
            ctrl.failing.store(true, Ordering::Release);
            ctrl.set_state(CtrlState::Failed);
            // No request may wait for an answer that will not come.
            ctrl.answer_resets(Err(BdevError::Os(format!("{}: path failed ({why})", ctrl.params.name), libc::EIO)));
            return;
        }
        tracing::warn!(name = ctrl.params.name, "NVMe/TCP path lost ({why}); reconnecting");
        self.lost_at_ns = now;
        self.tries = 0;
        self.publish(ctrl, Vec::new());
        // Failover: the next path at once.
        advance_path(ctrl);
        self.start_attempt(ctrl, now);
    }

    /// Makes `parts` the IO queues of a new epoch (empty: no connection).
    fn publish(&self, ctrl: &RemoteCtrl, parts: Vec<QpairParts>) {
        let mut io = ctrl.io_parts.lock().unwrap_or_else(|e| e.into_inner());
        io.epoch += 1;
        io.parts = parts.into_iter().map(Some).collect();
        io.parts.resize_with(ctrl.num_io_queues, || None);
        ctrl.epoch.store(io.epoch, Ordering::Release);
    }

    fn start_attempt(&mut self, ctrl: &Arc<RemoteCtrl>, now: u64) {
        ctrl.set_state(CtrlState::Resetting);
        let mut cp = self.cp.clone();
        {
            let paths = ctrl.paths();
            let p = &paths.list[paths.active];
            cp.traddr.clone_from(&p.traddr);
            cp.trsvcid.clone_from(&p.trsvcid);
        }
        match connect_in_background(cp, ctrl.num_io_queues as u16) {
            Ok(rx) => self.link = Link::Connecting(rx),
            Err(e) => self.attempt_failed(ctrl, now, &e.to_string()),
        }
    }

    fn attempt_failed(&mut self, ctrl: &Arc<RemoteCtrl>, now: u64, why: &str) {
        tracing::info!(name = ctrl.params.name, "NVMe/TCP reconnect attempt failed: {why}");
        self.tries += 1;
        let paths = ctrl.path_count.load(Ordering::Acquire);
        advance_path(ctrl);
        if !ctrl.reconnect.reconnects() {
            // Failover without reconnect: each path once, then failed.
            if self.tries < paths {
                return self.start_attempt(ctrl, now);
            }
            tracing::warn!(name = ctrl.params.name, "NVMe/TCP: no path answers; ctrlr_loss_timeout_sec is 0");
            self.link = Link::Down;
            ctrl.failing.store(true, Ordering::Release);
            ctrl.set_state(CtrlState::Failed);
            ctrl.answer_resets(Err(BdevError::Os(
                format!("reset of {}: no path answers", ctrl.params.name),
                libc::EIO,
            )));
            return;
        }
        if !self.tries.is_multiple_of(paths.max(1)) {
            // Paths not tried since the last delay go at once.
            self.start_attempt(ctrl, now);
            return self.check_timeouts(ctrl, now);
        }
        // Every path failed once more: a reset asked for is answered (the
        // controller goes on reconnecting).
        ctrl.answer_resets(Err(BdevError::Os(
            format!("reset of {}: reconnect failed: {why}", ctrl.params.name),
            libc::EIO,
        )));
        let delay = u64::from(ctrl.reconnect.reconnect_delay_sec) * NS_PER_SEC;
        self.link = Link::Delayed(now + delay);
        ctrl.set_state(CtrlState::ReconnectDelayed);
        self.check_timeouts(ctrl, now);
    }

    /// A new connection: it is the same controller's if it shows the same
    /// namespaces; then its queues replace the lost ones and waiting IO
    /// goes out on them.
    fn adopt(&mut self, ctrl: &Arc<RemoteCtrl>, s: Session, now: u64) {
        if !same_namespaces(&ctrl.info.namespaces, &s.info.namespaces) {
            return self.attempt_failed(ctrl, now, "the controller's namespaces differ from those attached");
        }
        if s.io.len() != ctrl.num_io_queues {
            return self.attempt_failed(ctrl, now, "the controller granted fewer IO queues");
        }
        ctrl.cntlid.store(s.info.cntlid, Ordering::Relaxed);
        // The states through the new connection, before IO can use it.
        ctrl.apply_ana(&s.info.ana);
        ctrl.ana_stale.store(false, Ordering::Release);
        // Before the queues see the new connection, so none fails an IO
        // it could send.
        ctrl.failing.store(false, Ordering::Release);
        self.publish(ctrl, s.io);
        ctrl.reconnects.fetch_add(1, Ordering::Relaxed);
        ctrl.set_state(CtrlState::Enabled);
        ctrl.answer_resets(Ok(()));
        let away_ms = now.saturating_sub(self.lost_at_ns) / 1_000_000;
        tracing::info!(name = ctrl.params.name, cntlid = s.info.cntlid, away_ms, "NVMe/TCP path reconnected");
        let mut admin = AdminQpair::new(s.admin, ctrl.info.kato_ms);
        if ctrl.info.ana_reporting {
            admin.watch_ana();
        }
        self.link = Link::Up(Box::new(admin));
        // Holders that gave up on a namespace while IO to it failed (a
        // RAID failed the member) may take it back now.
        let names = ctrl.group.bdev_names();
        for h in names.iter().filter_map(|n| Registry::get().lookup(n)) {
            h.notify_restored();
        }
    }

    /// Past `fast_io_fail_timeout_sec` IO fails; past
    /// `ctrlr_loss_timeout_sec` the controller is deleted.
    fn check_timeouts(&mut self, ctrl: &Arc<RemoteCtrl>, now: u64) {
        let away = now.saturating_sub(self.lost_at_ns);
        let o = ctrl.reconnect;
        let fast = u64::from(o.fast_io_fail_timeout_sec) * NS_PER_SEC;
        if fast > 0 && away >= fast && !ctrl.failing.swap(true, Ordering::AcqRel) {
            tracing::warn!(name = ctrl.params.name, "NVMe/TCP path away past fast_io_fail_timeout_sec: IO fails");
        }
        let loss = u64::try_from(o.ctrlr_loss_timeout_sec).unwrap_or(0) * NS_PER_SEC;
        if loss > 0 && away >= loss {
            tracing::warn!(name = ctrl.params.name, "NVMe/TCP path away past ctrlr_loss_timeout_sec: deleted");
            self.link = Link::Down;
            lose_path(ctrl.clone());
        }
    }
}

/// The ANA log `page` read through `ctrl`: its states replace those known.
fn take_ana_log(ctrl: &RemoteCtrl, page: &[u8]) {
    match crate::host::parse_ana_log(page) {
        Ok(list) => {
            if ctrl.apply_ana(&list) {
                tracing::info!(
                    name = ctrl.params.name,
                    trsvcid = ctrl.params.trsvcid,
                    "ANA states {}",
                    ctrl.ana_json()
                );
            }
            ctrl.ana_stale.store(false, Ordering::Release);
        }
        Err(e) => tracing::warn!(name = ctrl.params.name, "ANA log: {e}"),
    }
}

/// The next path becomes the active one (a no-op with one path).
fn advance_path(ctrl: &RemoteCtrl) {
    let mut paths = ctrl.paths();
    paths.active = (paths.active + 1) % paths.list.len().max(1);
}

/// Whether two controllers show the same namespaces (NSID, size, UUID):
/// the test that a new connection or path reaches the same storage.
pub(super) fn same_namespaces(old: &[NsInfo], new: &[NsInfo]) -> bool {
    let same = |a: &NsInfo, b: &NsInfo| {
        a.nsid == b.nsid && a.block_size == b.block_size && a.num_blocks == b.num_blocks && a.uuid == b.uuid
    };
    old.len() == new.len() && old.iter().zip(new).all(|(a, b)| same(a, b))
}

/// `multipath: "failover"`: adds `params`' address as an alternate path of
/// the controller of that name, after checking (with one connection made
/// and closed again, off the reactor) that it reaches the same namespaces.
/// The path is used when the one in use is lost. Errors as SPDK's: the same
/// path twice is EALREADY, another subsystem or host NQN is EINVAL.
pub fn add_failover_path(params: AttachParams, done: impl FnOnce(Result<Vec<String>, BdevError>) + Send + 'static) {
    let name = params.name.clone();
    let Some(ctrl) =
        ctrls().list.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|c| c.params.name == name).cloned()
    else {
        return done(Err(BdevError::NotFound(format!("controller {name}"))));
    };
    let adrfam = match adrfam_name(params.adrfam.as_deref()) {
        Ok(a) => a,
        Err(e) => return done(Err(e)),
    };
    let path = PathId { traddr: params.traddr.clone(), trsvcid: params.trsvcid.clone(), adrfam };
    if let Err(e) = check_path(&ctrl, &params, &path) {
        return done(Err(e));
    }
    let mut cp = connect_params(&params);
    cp.kato_ms = 0;
    let rx = match connect_in_background(cp, 1) {
        Ok(rx) => rx,
        Err(e) => return done(Err(e)),
    };
    let mut state = Some((ctrl, path, done));
    reactor::register_timed_poller("nvme_tcp_add_path", Duration::from_millis(1), move || {
        let r = match rx.try_recv() {
            Ok(r) => r,
            Err(mpsc::TryRecvError::Empty) => return reactor::PollStatus::Idle,
            Err(mpsc::TryRecvError::Disconnected) => Err(HostError::Io("connect thread ended".into())),
        };
        let Some((ctrl, path, done)) = state.take() else { return reactor::PollStatus::Done };
        let r = match r {
            Err(e) => Err(BdevError::Os(format!("adding path {}:{}: {e}", path.traddr, path.trsvcid), libc::EIO)),
            Ok(s) if !same_namespaces(&ctrl.info.namespaces, &s.info.namespaces) => Err(BdevError::Invalid(format!(
                "path {}:{} shows other namespaces than controller {}",
                path.traddr, path.trsvcid, ctrl.params.name
            ))),
            // The check's connection closes here; the path is used on failover.
            Ok(_) => {
                let mut paths = ctrl.paths();
                paths.list.push(path);
                ctrl.path_count.store(paths.list.len(), Ordering::Release);
                Ok(Vec::new())
            }
        };
        done(r);
        reactor::PollStatus::Done
    });
}

/// A new path of controller `name` (failover or multipath) must reach the
/// same subsystem as the same host as the controller's first path (SPDK's
/// checks and messages).
pub(super) fn same_subsystem_and_host(name: &str, params: &AttachParams, c: &AttachParams) -> Result<(), BdevError> {
    let refuse = |m: String| Err(BdevError::Os(m, libc::EINVAL));
    if params.subnqn != c.subnqn {
        return refuse(format!("A controller named {name} already exists, but uses a different subnqn ({})", c.subnqn));
    }
    let hostnqn = |h: &Option<String>| h.clone().unwrap_or_else(|| DEFAULT_HOSTNQN.into());
    if hostnqn(&params.hostnqn) != hostnqn(&c.hostnqn) {
        return refuse(format!(
            "A controller named {name} already exists, but uses a different hostnqn ({})",
            hostnqn(&c.hostnqn)
        ));
    }
    Ok(())
}

/// Why `path` cannot be added to `ctrl`, if it cannot (SPDK's checks).
fn check_path(ctrl: &RemoteCtrl, params: &AttachParams, path: &PathId) -> Result<(), BdevError> {
    let name = &ctrl.params.name;
    let refuse = |m: String, errno: i32| Err(BdevError::Os(m, errno));
    if ctrl.state() == CtrlState::Deleting {
        return refuse(format!("controller {name} is being detached"), libc::EALREADY);
    }
    if ctrl.group.count.load(Ordering::Acquire) > 1 {
        return refuse(
            format!("controller {name} has multipath paths: a controller is either failover or multipath"),
            libc::EINVAL,
        );
    }
    if ctrl.paths().list.iter().any(|p| p.traddr == path.traddr && p.trsvcid == path.trsvcid) {
        return refuse(
            format!("A controller named {name} already exists with the specified network path"),
            libc::EALREADY,
        );
    }
    let c = &ctrl.params;
    same_subsystem_and_host(name, params, c)?;
    if (params.hdgst, params.ddgst) != (c.hdgst, c.ddgst) {
        // Every path is reached with the controller's digests.
        return refuse(
            format!("a path of controller {name} must ask for the same digests as the controller"),
            libc::EINVAL,
        );
    }
    Ok(())
}

/// `bdev_nvme_reset_controller`: drops every connection of the controller
/// and connects again (to the next path, with failover); IO waits meanwhile
/// and goes out on the new connection. `done` runs once it is back, or
/// with an error when no path answers and the controller does not
/// reconnect (it is then failed, as after a lost path).
pub fn reset_controller(name: &str, done: impl FnOnce(Result<(), BdevError>) + Send + 'static) {
    let ctrl = ctrls().list.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|c| c.params.name == name).cloned();
    let Some(ctrl) = ctrl else {
        return done(Err(BdevError::NotFound(format!("controller {name}"))));
    };
    if ctrl.state() == CtrlState::Deleting {
        return done(Err(BdevError::Os(format!("controller {name} is being detached"), libc::EBUSY)));
    }
    if ctrl.state() == CtrlState::Resetting {
        // As SPDK: one reset (or reconnect attempt) at a time.
        return done(Err(BdevError::Os(format!("reset of {name}: already in progress"), libc::EBUSY)));
    }
    ctrl.reset_waiters.lock().unwrap_or_else(|e| e.into_inner()).push(Box::new(done));
    // Picked up by the keeper: connected or failed, it reconnects; waiting
    // for reconnect_delay_sec, it tries at once.
    ctrl.reset_wanted.store(true, Ordering::Release);
}
