//! NVMe reservations of a namespace (NVMe base 2.0, 8.19): registrants
//! (one per host, by Host Identifier: every controller of a host shares
//! its registration), the holder and type, the Register / Acquire /
//! Release / Report commands, the access rules IO commands obey, the
//! Reservation Notification log of each controller, and persistence
//! through power loss in a JSON file (`ptpl_file`).
//!
//! The state sits behind a mutex that only reservation commands, Set/Get
//! Features and the control plane take. The IO path reads two atomics:
//! `held` (no reservation: every command runs) and `generation`; a queue
//! pair keeps the verdict for its host and recomputes it, under the
//! mutex, only after the generation moved.

use super::{Ctrl, Subsystem};
use nvme_spec::features::{async_event_type, AsyncEvent};
use nvme_spec::log::LogPageId;
use nvme_spec::reservation::{
    cptpl, notification, notification_mask, racqa, rrega, rrela, rtype, RegisteredControllerExt,
    ReservationNotificationLog, ReservationStatusHeader, RESERVATION_STATUS_EXT_HEADER_LEN,
};
use nvme_spec::Status;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use uuid::Uuid;
use zerocopy::IntoBytes;

pub(crate) type HostId = [u8; 16];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Registrant {
    hostid: HostId,
    rkey: u64,
}

#[derive(Debug, Clone, Default)]
struct ResvState {
    regs: Vec<Registrant>,
    /// 0: no reservation.
    rtype: u8,
    /// The holder for types 1 to 4; for the all-registrants types every
    /// registrant holds the reservation and this is unused.
    holder: Option<HostId>,
    /// Reservation Report generation.
    gen: u32,
    /// Persist through power loss state.
    ptpl: bool,
}

fn all_registrants(t: u8) -> bool {
    t == rtype::WRITE_EXCLUSIVE_ALL_REGS || t == rtype::EXCLUSIVE_ACCESS_ALL_REGS
}

impl ResvState {
    fn reg(&self, h: &HostId) -> Option<&Registrant> {
        self.regs.iter().find(|r| &r.hostid == h)
    }

    fn holds(&self, h: &HostId) -> bool {
        match self.rtype {
            0 => false,
            t if all_registrants(t) => self.reg(h).is_some(),
            _ => self.holder.as_ref() == Some(h),
        }
    }

    /// Access of host `h` under the current reservation (the access rules
    /// of the spec's table per type).
    fn access(&self, h: &HostId) -> Access {
        let registered = self.reg(h).is_some();
        let holder = self.holds(h);
        match self.rtype {
            0 => Access::ALL,
            rtype::WRITE_EXCLUSIVE => Access { read: true, write: holder },
            rtype::EXCLUSIVE_ACCESS => Access { read: holder, write: holder },
            rtype::WRITE_EXCLUSIVE_REG_ONLY | rtype::WRITE_EXCLUSIVE_ALL_REGS => {
                Access { read: true, write: registered }
            }
            _ => Access { read: registered, write: registered },
        }
    }

    fn release(&mut self) {
        self.rtype = 0;
        self.holder = None;
    }
}

/// What a host may do to a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Access {
    pub(crate) read: bool,
    pub(crate) write: bool,
}

impl Access {
    pub(crate) const ALL: Access = Access { read: true, write: true };
}

/// A state to write to the `ptpl_file` before the command that made it
/// completes: its sequence number orders concurrent writers.
pub(crate) struct PersistJob {
    resv: std::sync::Arc<Reservations>,
    seq: u64,
    doc: Value,
}

impl PersistJob {
    /// Writes the file (temporary file, fsync, rename) unless a later
    /// state is already on disk. Runs off the reactors.
    pub(crate) fn write(self) -> Result<(), String> {
        let Some(path) = self.resv.ptpl_file.as_deref() else {
            return Ok(());
        };
        let mut last = self.resv.written_seq.lock().unwrap_or_else(|e| e.into_inner());
        if *last >= self.seq {
            return Ok(());
        }
        write_durably(path, &self.doc).map_err(|e| format!("{}: {e}", path.display()))?;
        *last = self.seq;
        Ok(())
    }
}

fn write_durably(path: &Path, doc: &Value) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string_pretty(doc).unwrap_or_default().as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The reservation state of one namespace.
pub struct Reservations {
    state: Mutex<ResvState>,
    /// A reservation is held: IO must consult the access rules.
    held: AtomicBool,
    /// Moves on every change of the state; IO queues cache by it.
    generation: AtomicU64,
    ptpl_file: Option<PathBuf>,
    /// The bdev's UUID, recorded in the file to catch a file given to
    /// the wrong namespace.
    bdev_uuid: Uuid,
    next_seq: AtomicU64,
    written_seq: Mutex<u64>,
}

/// A reservation command's answer: its status, and, where the state must
/// reach the `ptpl_file` first, the write to do before answering.
pub(crate) struct ResvOutcome {
    pub(crate) status: Status,
    pub(crate) persist: Option<PersistJob>,
}

fn done(status: Status) -> ResvOutcome {
    ResvOutcome { status, persist: None }
}

impl Reservations {
    /// The state of a namespace added with `ptpl_file` (loaded from it
    /// when it exists) or without.
    pub fn new(ptpl_file: Option<PathBuf>, bdev_uuid: Uuid) -> Result<Self, String> {
        let mut st = ResvState::default();
        if let Some(p) = ptpl_file.as_deref() {
            match std::fs::read_to_string(p) {
                Ok(text) if !text.trim().is_empty() => st = parse_ptpl(&text, &bdev_uuid)?,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("ptpl_file {}: {e}", p.display())),
            }
        }
        let held = st.rtype != 0;
        Ok(Reservations {
            state: Mutex::new(st),
            held: AtomicBool::new(held),
            generation: AtomicU64::new(1),
            ptpl_file,
            bdev_uuid,
            next_seq: AtomicU64::new(1),
            written_seq: Mutex::new(0),
        })
    }

    pub fn ptpl_file(&self) -> Option<&Path> {
        self.ptpl_file.as_deref()
    }

    fn lock(&self) -> MutexGuard<'_, ResvState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a reservation is held (the IO path's fast check).
    pub(crate) fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn access(&self, h: &HostId) -> Access {
        self.lock().access(h)
    }

    /// Publishes a change: the fast-path flag, then the generation.
    fn changed(&self, st: &ResvState) {
        self.held.store(st.rtype != 0, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn persist(self: &std::sync::Arc<Self>, st: &ResvState) -> Option<PersistJob> {
        self.ptpl_file.as_ref()?;
        let seq = self.next_seq.fetch_add(1, Ordering::AcqRel);
        Some(PersistJob { resv: self.clone(), seq, doc: ptpl_doc(st, &self.bdev_uuid) })
    }

    /// Reservation Register.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn register(
        self: &std::sync::Arc<Self>,
        sub: &Subsystem,
        nsid: u32,
        host: &HostId,
        action: u8,
        iekey: bool,
        cptpl_field: u8,
        crkey: u64,
        nrkey: u64,
    ) -> ResvOutcome {
        let mut st = self.lock();
        let ptpl = match cptpl_field {
            cptpl::NO_CHANGE => st.ptpl,
            cptpl::CLEAR => false,
            cptpl::SET if self.ptpl_file.is_some() => true,
            _ => return done(Status::INVALID_FIELD.with_dnr()),
        };
        let current = st.reg(host).copied();
        let key_ok = |r: &Registrant| iekey || r.rkey == crkey;
        match action {
            rrega::REGISTER => {
                if nrkey == 0 {
                    return done(Status::INVALID_FIELD.with_dnr());
                }
                match current {
                    // Registering again with the key it has is no change.
                    Some(r) if r.rkey == nrkey => {}
                    Some(_) => return done(Status::RESERVATION_CONFLICT),
                    None => {
                        st.regs.push(Registrant { hostid: *host, rkey: nrkey });
                        st.gen = st.gen.wrapping_add(1);
                    }
                }
            }
            rrega::UNREGISTER => {
                let Some(r) = current.filter(key_ok) else {
                    return done(Status::RESERVATION_CONFLICT);
                };
                st.regs.retain(|x| x.hostid != r.hostid);
                st.gen = st.gen.wrapping_add(1);
                let t = st.rtype;
                // The holder leaving ends a single-holder reservation; the
                // last registrant leaving ends an all-registrants one.
                let ends = (t != 0 && !all_registrants(t) && st.holder == Some(*host))
                    || (all_registrants(t) && st.regs.is_empty());
                if ends {
                    st.release();
                    // Registrants-only types: the others hear it was released.
                    if t == rtype::WRITE_EXCLUSIVE_REG_ONLY || t == rtype::EXCLUSIVE_ACCESS_REG_ONLY {
                        let others: Vec<HostId> = st.regs.iter().map(|r| r.hostid).collect();
                        notify_hosts(sub, nsid, &others, notification::RESERVATION_RELEASED);
                    }
                }
            }
            rrega::REPLACE => {
                if nrkey == 0 {
                    return done(Status::INVALID_FIELD.with_dnr());
                }
                match current {
                    Some(r) if key_ok(&r) => {
                        if let Some(x) = st.regs.iter_mut().find(|x| x.hostid == *host) {
                            x.rkey = nrkey;
                        }
                        st.gen = st.gen.wrapping_add(1);
                    }
                    // Not registered: IEKEY set registers the host.
                    None if iekey => {
                        st.regs.push(Registrant { hostid: *host, rkey: nrkey });
                        st.gen = st.gen.wrapping_add(1);
                    }
                    _ => return done(Status::RESERVATION_CONFLICT),
                }
            }
            _ => return done(Status::INVALID_FIELD.with_dnr()),
        }
        st.ptpl = ptpl;
        self.changed(&st);
        ResvOutcome { status: Status::SUCCESS, persist: self.persist(&st) }
    }

    /// Reservation Acquire.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn acquire(
        self: &std::sync::Arc<Self>,
        sub: &Subsystem,
        nsid: u32,
        host: &HostId,
        action: u8,
        t: u8,
        crkey: u64,
        prkey: u64,
    ) -> ResvOutcome {
        if !(rtype::WRITE_EXCLUSIVE..=rtype::EXCLUSIVE_ACCESS_ALL_REGS).contains(&t) {
            return done(Status::INVALID_FIELD.with_dnr());
        }
        let mut st = self.lock();
        if st.reg(host).is_none_or(|r| r.rkey != crkey) {
            return done(Status::RESERVATION_CONFLICT);
        }
        match action {
            racqa::ACQUIRE => {
                if st.rtype == 0 {
                    st.rtype = t;
                    st.holder = Some(*host);
                } else if st.holds(host) && st.rtype == t {
                    // Acquiring what it holds: no change.
                    return done(Status::SUCCESS);
                } else {
                    return done(Status::RESERVATION_CONFLICT);
                }
            }
            // Commands of preempted hosts are not aborted: the abort
            // variant is a preempt (the spec allows leaving them to run).
            racqa::PREEMPT | racqa::PREEMPT_AND_ABORT => {
                let before_type = st.rtype;
                let holder_key = st.holder.and_then(|h| st.reg(&h)).map(|r| r.rkey);
                let mut removed: Vec<HostId> = Vec::new();
                let mut released = false;
                let mut remove_key = |st: &mut ResvState, pred: &dyn Fn(&Registrant) -> bool| {
                    st.regs.retain(|r| {
                        let go = r.hostid != *host && pred(r);
                        if go {
                            removed.push(r.hostid);
                        }
                        !go
                    });
                };
                if before_type == 0 {
                    // No reservation: preempting removes the registrants
                    // holding PRKEY.
                    if !st.regs.iter().any(|r| r.rkey == prkey && r.hostid != *host) {
                        return done(Status::RESERVATION_CONFLICT);
                    }
                    remove_key(&mut st, &|r| r.rkey == prkey);
                } else if all_registrants(before_type) {
                    if prkey == 0 {
                        // Every other registrant goes; the preempter holds
                        // the new reservation.
                        remove_key(&mut st, &|_| true);
                        st.rtype = t;
                        st.holder = Some(*host);
                    } else {
                        if !st.regs.iter().any(|r| r.rkey == prkey && r.hostid != *host) {
                            return done(Status::RESERVATION_CONFLICT);
                        }
                        remove_key(&mut st, &|r| r.rkey == prkey);
                    }
                } else if holder_key == Some(prkey) {
                    // The holder's key: the reservation is taken over with
                    // the new type (or, preempting itself, changes type),
                    // the registrants holding PRKEY go, and the registrants
                    // that stay hear the old reservation was released.
                    remove_key(&mut st, &|r| r.rkey == prkey);
                    st.rtype = t;
                    st.holder = Some(*host);
                    released = true;
                } else {
                    if prkey == 0 {
                        return done(Status::INVALID_FIELD.with_dnr());
                    }
                    if !st.regs.iter().any(|r| r.rkey == prkey && r.hostid != *host) {
                        return done(Status::RESERVATION_CONFLICT);
                    }
                    remove_key(&mut st, &|r| r.rkey == prkey);
                }
                st.gen = st.gen.wrapping_add(1);
                notify_hosts(sub, nsid, &removed, notification::REGISTRATION_PREEMPTED);
                if released {
                    let stay: Vec<HostId> = st.regs.iter().map(|r| r.hostid).filter(|h| h != host).collect();
                    notify_hosts(sub, nsid, &stay, notification::RESERVATION_RELEASED);
                }
            }
            _ => return done(Status::INVALID_FIELD.with_dnr()),
        }
        self.changed(&st);
        ResvOutcome { status: Status::SUCCESS, persist: self.persist(&st) }
    }

    /// Reservation Release.
    pub(crate) fn release_cmd(
        self: &std::sync::Arc<Self>,
        sub: &Subsystem,
        nsid: u32,
        host: &HostId,
        action: u8,
        t: u8,
        crkey: u64,
    ) -> ResvOutcome {
        let mut st = self.lock();
        if st.reg(host).is_none_or(|r| r.rkey != crkey) {
            return done(Status::RESERVATION_CONFLICT);
        }
        let others: Vec<HostId> = st.regs.iter().map(|r| r.hostid).filter(|h| h != host).collect();
        match action {
            rrela::RELEASE => {
                if st.rtype == 0 {
                    return done(Status::SUCCESS);
                }
                if st.rtype != t {
                    return done(Status::INVALID_FIELD.with_dnr());
                }
                // Held by another host: success, no effect.
                if !st.holds(host) {
                    return done(Status::SUCCESS);
                }
                let before = st.rtype;
                st.release();
                // Other registrants of a registrants-only or all-registrants
                // reservation had access through it: they hear of its end.
                if before != rtype::WRITE_EXCLUSIVE && before != rtype::EXCLUSIVE_ACCESS {
                    notify_hosts(sub, nsid, &others, notification::RESERVATION_RELEASED);
                }
            }
            rrela::CLEAR => {
                st.release();
                st.regs.clear();
                st.gen = st.gen.wrapping_add(1);
                notify_hosts(sub, nsid, &others, notification::RESERVATION_PREEMPTED);
            }
            _ => return done(Status::INVALID_FIELD.with_dnr()),
        }
        self.changed(&st);
        ResvOutcome { status: Status::SUCCESS, persist: self.persist(&st) }
    }

    /// The Reservation Status extended data structure (EDS set).
    pub(crate) fn report_ext(&self, sub: &Subsystem) -> Vec<u8> {
        let st = self.lock();
        let mut out = ReservationStatusHeader::new(st.gen, st.rtype, st.regs.len() as u16, st.ptpl).as_bytes().to_vec();
        out.resize(RESERVATION_STATUS_EXT_HEADER_LEN, 0);
        for r in &st.regs {
            // A host's controllers share its registration: the entry names
            // one of its live controllers, or FFFFh when none is connected.
            let cntlid = sub
                .live_ctrls()
                .iter()
                .filter(|c| !c.is_dead() && c.hostid == r.hostid)
                .map(|c| c.cntlid)
                .min()
                .unwrap_or(0xFFFF);
            out.extend_from_slice(
                RegisteredControllerExt::new(cntlid, st.holds(&r.hostid), r.rkey, r.hostid).as_bytes(),
            );
        }
        out
    }

    /// Reservation Persistence feature (83h): PTPL state.
    pub(crate) fn ptpl(&self) -> bool {
        self.lock().ptpl
    }

    /// Set Features Reservation Persistence: needs a `ptpl_file`.
    pub(crate) fn set_ptpl(self: &std::sync::Arc<Self>, on: bool) -> Result<Option<PersistJob>, Status> {
        if self.ptpl_file.is_none() {
            return Err(Status::INVALID_FIELD.with_dnr());
        }
        let mut st = self.lock();
        st.ptpl = on;
        self.changed(&st);
        Ok(self.persist(&st))
    }
}

/// The `ptpl_file` document, in SPDK's field names.
fn ptpl_doc(st: &ResvState, bdev_uuid: &Uuid) -> Value {
    let holder = if st.rtype == 0 {
        None
    } else if all_registrants(st.rtype) {
        st.regs.first().map(|r| r.hostid)
    } else {
        st.holder
    };
    let crkey = holder.and_then(|h| st.reg(&h)).map_or(0, |r| r.rkey);
    let mut v = json!({
        "ptpl": st.ptpl,
        "rtype": st.rtype,
        "crkey": crkey,
        "bdev_uuid": bdev_uuid.to_string(),
        "holder_uuid": holder.map_or_else(String::new, |h| Uuid::from_bytes(h).to_string()),
        "registrants": st.regs.iter().map(|r| json!({"rkey": r.rkey, "host_uuid": Uuid::from_bytes(r.hostid).to_string()})).collect::<Vec<_>>(),
    });
    if !st.ptpl {
        // Not persisting: what the file keeps is the empty state, so a
        // restart begins with no registrants.
        v = json!({"ptpl": false, "bdev_uuid": bdev_uuid.to_string()});
    }
    v
}

fn parse_ptpl(text: &str, bdev_uuid: &Uuid) -> Result<ResvState, String> {
    let bad = |m: &str| format!("ptpl_file: {m}");
    let v: Value = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
    let mut st = ResvState { ptpl: v["ptpl"].as_bool().unwrap_or(false), ..ResvState::default() };
    if let Some(u) = v["bdev_uuid"].as_str().filter(|s| !s.is_empty()) {
        if u.parse::<Uuid>().ok().as_ref() != Some(bdev_uuid) {
            return Err(bad(&format!("it belongs to bdev {u}, not {bdev_uuid}")));
        }
    }
    if !st.ptpl {
        return Ok(st);
    }
    let uuid = |s: &Value| -> Result<HostId, String> {
        s.as_str().and_then(|s| s.parse::<Uuid>().ok()).map(|u| *u.as_bytes()).ok_or_else(|| bad("bad host UUID"))
    };
    for r in v["registrants"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let rkey = r["rkey"].as_u64().ok_or_else(|| bad("registrant without rkey"))?;
        st.regs.push(Registrant { hostid: uuid(&r["host_uuid"])?, rkey });
    }
    let t = v["rtype"].as_u64().unwrap_or(0);
    if t > u64::from(rtype::EXCLUSIVE_ACCESS_ALL_REGS) {
        return Err(bad("rtype out of range"));
    }
    st.rtype = t as u8;
    if st.rtype != 0 {
        let h = uuid(&v["holder_uuid"])?;
        if st.reg(&h).is_none() {
            return Err(bad("the holder is not a registrant"));
        }
        st.holder = Some(h);
    }
    Ok(st)
}

/// Adds a notification to the logs of the live controllers of `hosts`.
fn notify_hosts(sub: &Subsystem, nsid: u32, hosts: &[HostId], kind: u8) {
    if hosts.is_empty() {
        return;
    }
    for c in sub.live_ctrls().into_iter().filter(|c| !c.is_dead() && hosts.contains(&c.hostid)) {
        c.notify_reservation(nsid, kind);
    }
}

/// A controller's Reservation Notification log and mask.
#[derive(Default)]
pub(crate) struct CtrlNotices {
    log: VecDeque<(u64, u8, u32)>,
    count: u64,
    /// Per namespace mask (Reservation Notification Mask feature); absent
    /// means nothing masked.
    masks: Vec<(u32, u32)>,
    pub(crate) notice_pending: bool,
    pub(crate) notice_masked: bool,
}

/// Log pages kept per controller; older ones are dropped, and the log
/// page count shows the host the gap.
const MAX_LOG_PAGES: usize = 255;

impl CtrlNotices {
    pub(crate) fn mask(&self, nsid: u32) -> u32 {
        self.masks.iter().find(|(n, _)| *n == nsid).map_or(0, |(_, m)| *m)
    }

    pub(crate) fn set_mask(&mut self, nsid: u32, mask: u32) {
        match self.masks.iter_mut().find(|(n, _)| *n == nsid) {
            Some(e) => e.1 = mask,
            None => self.masks.push((nsid, mask)),
        }
    }

    /// Records a page unless masked; true when one was added.
    fn push(&mut self, nsid: u32, kind: u8) -> bool {
        let bit = match kind {
            notification::REGISTRATION_PREEMPTED => notification_mask::REGISTRATION_PREEMPTED,
            notification::RESERVATION_RELEASED => notification_mask::RESERVATION_RELEASED,
            _ => notification_mask::RESERVATION_PREEMPTED,
        };
        if self.mask(nsid) & bit != 0 {
            return false;
        }
        self.count = if self.count == u64::MAX { 1 } else { self.count + 1 };
        if self.log.len() >= MAX_LOG_PAGES {
            self.log.pop_front();
        }
        self.log.push_back((self.count, kind, nsid));
        true
    }

    /// The oldest page (removed), or the empty page.
    pub(crate) fn take_page(&mut self) -> ReservationNotificationLog {
        match self.log.pop_front() {
            Some((count, kind, nsid)) => {
                ReservationNotificationLog::new(count, kind, self.log.len().min(255) as u8, nsid)
            }
            None => ReservationNotificationLog::new(0, notification::EMPTY, 0, 0),
        }
    }
}

impl Ctrl {
    fn notify_reservation(&self, nsid: u32, kind: u8) {
        let mut a = self.admin();
        if a.resv.push(nsid, kind) && !a.resv.notice_masked {
            a.resv.notice_pending = true;
            self.aen_flag.store(true, Ordering::Release);
        }
    }

    pub(crate) fn reservation_notice_dword() -> u32 {
        AsyncEvent {
            event_type: async_event_type::IO_COMMAND_SET,
            info: nvme_spec::reservation::ASYNC_EVENT_RESERVATION_LOG_AVAILABLE,
            log_page: LogPageId::RESERVATION_NOTIFICATION.0,
        }
        .to_dword()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rules_follow_the_type_table() {
        let (a, b, c) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        let mut st = ResvState {
            regs: vec![Registrant { hostid: a, rkey: 1 }, Registrant { hostid: b, rkey: 2 }],
            holder: Some(a),
            ..ResvState::default()
        };
        let rw = |read, write| Access { read, write };
        // (type, holder a, registrant b, stranger c)
        let table = [
            (1, rw(true, true), rw(true, false), rw(true, false)),
            (2, rw(true, true), rw(false, false), rw(false, false)),
            (3, rw(true, true), rw(true, true), rw(true, false)),
            (4, rw(true, true), rw(true, true), rw(false, false)),
            (5, rw(true, true), rw(true, true), rw(true, false)),
            (6, rw(true, true), rw(true, true), rw(false, false)),
        ];
        for (t, ha, hb, hc) in table {
            st.rtype = t;
            assert_eq!((st.access(&a), st.access(&b), st.access(&c)), (ha, hb, hc), "type {t}");
        }
    }

    #[test]
    fn ptpl_document_round_trips() {
        let u = Uuid::from_bytes([9; 16]);
        let st = ResvState {
            regs: vec![Registrant { hostid: [1; 16], rkey: 0xA }, Registrant { hostid: [2; 16], rkey: 0xB }],
            rtype: rtype::WRITE_EXCLUSIVE,
            holder: Some([2; 16]),
            gen: 3,
            ptpl: true,
        };
        let doc = ptpl_doc(&st, &u);
        assert_eq!(doc["crkey"], 0xB);
        let back = parse_ptpl(&doc.to_string(), &u).unwrap();
        assert_eq!((back.regs, back.rtype, back.holder, back.ptpl), (st.regs, st.rtype, st.holder, true));
        assert!(parse_ptpl(&doc.to_string(), &Uuid::from_bytes([8; 16])).is_err(), "another bdev's file");
        assert!(parse_ptpl("not json", &u).is_err());
    }
}
