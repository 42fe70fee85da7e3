//! Reservations: RESERVE(6)/RELEASE(6) and persistent reservations
//! (PERSISTENT RESERVE IN/OUT, SPC-5 5.14), and which commands conflict.
//! Registrations live as long as the LUN (not across a restart: APTPL is
//! refused and PTPL_C reported clear).

use super::cdb::{be16, be32, be64, op};
use super::lun::{Lun, LunState};
use super::sense::Check;
use super::Nexus;
use std::sync::atomic::Ordering;

const WRITE_EXCLUSIVE: u8 = 1;
const EXCLUSIVE_ACCESS: u8 = 3;
const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;
const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 8;

/// Registrants one LUN keeps; more get INSUFFICIENT REGISTRATION RESOURCES.
const MAX_REGISTRANTS: usize = 64;

/// Reservation state of a LUN.
#[derive(Default)]
pub(crate) struct Reservations {
    /// The nexus holding a RESERVE(6) reservation.
    pub(crate) legacy: Option<Nexus>,
    /// Persistent reservation registrations: (nexus, key).
    pub(crate) registrants: Vec<(Nexus, u64)>,
    pub(crate) generation: u32,
    /// The persistent reservation: its holder (any registrant for the
    /// all-registrants types) and type.
    pub(crate) holder: Option<(Nexus, u8)>,
}

/// Why a command is refused.
pub(crate) enum Refusal {
    Conflict,
    Check(Check),
}

impl From<Check> for Refusal {
    fn from(c: Check) -> Self {
        Refusal::Check(c)
    }
}

fn all_registrants(t: u8) -> bool {
    matches!(t, WRITE_EXCLUSIVE_ALL_REGISTRANTS | EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
}

fn registrants_only_or_all(t: u8) -> bool {
    matches!(
        t,
        WRITE_EXCLUSIVE_REGISTRANTS_ONLY
            | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
            | WRITE_EXCLUSIVE_ALL_REGISTRANTS
            | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    )
}

impl Reservations {
    pub(crate) fn any_held(&self) -> bool {
        self.legacy.is_some() || self.holder.is_some()
    }

    fn key_of(&self, n: &Nexus) -> Option<u64> {
        self.registrants.iter().find(|(r, _)| r == n).map(|&(_, k)| k)
    }

    /// Whether `n` holds the persistent reservation.
    fn is_holder(&self, n: &Nexus) -> bool {
        match &self.holder {
            Some((_, t)) if all_registrants(*t) => self.key_of(n).is_some(),
            Some((h, _)) => h == n,
            None => false,
        }
    }

    /// Whether `opcode` from `n` meets a RESERVATION CONFLICT (SPC-5 5.14.1
    /// table 63, and SPC-2 for RESERVE(6)).
    pub(crate) fn conflicts(&self, n: &Nexus, cdb: &[u8; 16]) -> bool {
        let opcode = cdb[0];
        if let Some(l) = &self.legacy {
            if l != n {
                return !matches!(
                    opcode,
                    op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE | op::RELEASE_6 | op::MAINTENANCE_IN
                );
            }
            return false;
        }
        let Some((_, rtype)) = &self.holder else { return false };
        if matches!(opcode, op::RESERVE_6 | op::RELEASE_6) {
            return true;
        }
        if self.is_holder(n) || (registrants_only_or_all(*rtype) && self.key_of(n).is_some()) {
            return false;
        }
        let write = matches!(
            opcode,
            op::WRITE_6
                | op::WRITE_10
                | op::WRITE_12
                | op::WRITE_16
                | op::WRITE_AND_VERIFY_10
                | op::WRITE_AND_VERIFY_12
                | op::WRITE_AND_VERIFY_16
                | op::WRITE_SAME_10
                | op::WRITE_SAME_16
                | op::UNMAP
                | op::COMPARE_AND_WRITE
                | op::ORWRITE_16
                | op::WRITE_ATOMIC_16
                | op::SYNCHRONIZE_CACHE_10
                | op::SYNCHRONIZE_CACHE_16
                | op::MODE_SELECT_6
                | op::MODE_SELECT_10
                | op::START_STOP_UNIT
        );
        let read = matches!(
            opcode,
            op::READ_6
                | op::READ_10
                | op::READ_12
                | op::READ_16
                | op::VERIFY_10
                | op::VERIFY_12
                | op::VERIFY_16
                | op::READ_DEFECT_DATA_10
                | op::READ_DEFECT_DATA_12
        );
        let exclusive_access =
            matches!(*rtype, EXCLUSIVE_ACCESS | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY | EXCLUSIVE_ACCESS_ALL_REGISTRANTS);
        write || (read && exclusive_access)
    }
}

fn sync_flag(lun: &Lun, st: &LunState) {
    lun.reserved.store(st.res.any_held(), Ordering::Release);
}

/// RESERVE(6): an exclusive reservation for `n`.
pub(crate) fn reserve6(lun: &Lun, n: &Nexus) -> Result<(), Refusal> {
    let mut st = lun.state();
    if st.res.holder.is_some() || st.res.legacy.as_ref().is_some_and(|l| l != n) {
        return Err(Refusal::Conflict);
    }
    st.res.legacy = Some(n.clone());
    sync_flag(lun, &st);
    Ok(())
}

/// RELEASE(6): releases `n`'s reservation; GOOD whatever it held.
pub(crate) fn release6(lun: &Lun, n: &Nexus) -> Result<(), Refusal> {
    let mut st = lun.state();
    if st.res.holder.is_some() {
        return Err(Refusal::Conflict);
    }
    if st.res.legacy.as_ref() == Some(n) {
        st.res.legacy = None;
    }
    sync_flag(lun, &st);
    Ok(())
}

fn put(out: &mut [u8], at: usize, bytes: &[u8]) {
    if at < out.len() {
        let n = bytes.len().min(out.len() - at);
        out[at..at + n].copy_from_slice(&bytes[..n]);
    }
}

pub(crate) fn persistent_reserve_in(lun: &Lun, cdb: &[u8; 16], out: &mut [u8]) -> Result<usize, Check> {
    let st = lun.state();
    let r = &st.res;
    put(out, 0, &r.generation.to_be_bytes());
    match cdb[1] & 0x1F {
        0x00 => {
            let mut at = 8;
            for (_, k) in &r.registrants {
                put(out, at, &k.to_be_bytes());
                at += 8;
            }
            put(out, 4, &((at - 8) as u32).to_be_bytes());
            Ok(at)
        }
        0x01 => match &r.holder {
            None => {
                put(out, 4, &0u32.to_be_bytes());
                Ok(8)
            }
            Some((h, t)) => {
                let key = if all_registrants(*t) { 0 } else { r.key_of(h).unwrap_or(0) };
                let mut d = [0u8; 16];
                d[0..8].copy_from_slice(&key.to_be_bytes());
                d[13] = *t;
                put(out, 4, &16u32.to_be_bytes());
                put(out, 8, &d);
                Ok(24)
            }
        },
        0x02 => {
            let mut d = [0u8; 8];
            d[1] = 8;
            d[2] = 0x10; // CRH: RESERVE(6) meets persistent reservations as SPC-5 5.14.3 says
            d[3] = 0x80; // TMV: the type mask is valid
            d[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02;
            d[5] = 0x01;
            put(out, 0, &d);
            Ok(8)
        }
        0x03 => {
            let mut at = 8;
            for (n, k) in &r.registrants {
                let port = n.initiator_port.as_bytes();
                let id_len = (port.len() + 1).div_ceil(4) * 4;
                let mut d = [0u8; 24];
                d[0..8].copy_from_slice(&k.to_be_bytes());
                if r.is_holder(n) {
                    d[12] = 0x01;
                    d[13] = r.holder.as_ref().map_or(0, |h| h.1);
                }
                d[18..20].copy_from_slice(&n.relative_target_port.to_be_bytes());
                d[20..24].copy_from_slice(&((4 + id_len) as u32).to_be_bytes());
                put(out, at, &d);
                // iSCSI TransportID, format 01b (name with ISID).
                put(out, at + 24, &[0x45, 0]);
                put(out, at + 26, &(id_len as u16).to_be_bytes());
                put(out, at + 28, port);
                let pad_from = at + 28 + port.len();
                for i in pad_from..at + 28 + id_len {
                    put(out, i, &[0]);
                }
                at += 28 + id_len;
            }
            put(out, 4, &((at - 8) as u32).to_be_bytes());
            Ok(at)
        }
        _ => Err(Check::invalid_cdb(1, Some(4))),
    }
}

/// `Ok(Some(gen))`: a PREEMPT AND ABORT announced the abort of the
/// preempted nexuses' tasks as generation `gen`; the command completes only
/// once [`Lun::aborts_settled`] says they have all ended (SPC-4 5.13.11.2).
pub(crate) fn persistent_reserve_out(
    lun: &Lun,
    n: &Nexus,
    cdb: &[u8; 16],
    params: &[u8],
) -> Result<Option<u64>, Refusal> {
    let sa = cdb[1] & 0x1F;
    if sa > 6 {
        return Err(Check::invalid_cdb(1, Some(4)).into());
    }
    let list_len = be32(&cdb[5..9]) as usize;
    if list_len != 24 || params.len() < 24 {
        return Err(Check::PARAM_LIST_LENGTH_ERROR.into());
    }
    let key = be64(&params[0..8]);
    let sa_key = be64(&params[8..16]);
    let flags = params[20];
    if flags & 0x08 != 0 {
        return Err(Check::invalid_param(20, Some(3)).into());
    }
    if flags & 0x04 != 0 {
        return Err(Check::invalid_param(20, Some(2)).into());
    }
    if flags & 0x01 != 0 {
        return Err(Check::invalid_param(20, Some(0)).into());
    }
    let scope = cdb[2] >> 4;
    let rtype = cdb[2] & 0x0F;
    let _ = be16(&cdb[7..9]);
    let mut guard = lun.state();
    let st = &mut *guard;
    if st.res.legacy.as_ref().is_some_and(|l| l != n) {
        return Err(Refusal::Conflict);
    }
    // Announcements happen under the LUN's lock, held here: a change is ours.
    let abort_gen_before = lun.abort_generation();
    let mine = st.res.key_of(n);
    let result = match sa {
        // REGISTER / REGISTER AND IGNORE EXISTING KEY
        0x00 | 0x06 => {
            if sa == 0x00 && key != mine.unwrap_or(0) {
                return Err(Refusal::Conflict);
            }
            match (mine, sa_key) {
                (None, 0) => {}
                (None, k) => {
                    if st.res.registrants.len() >= MAX_REGISTRANTS {
                        return Err(Check::INSUFFICIENT_REGISTRATION_RESOURCES.into());
                    }
                    st.res.registrants.push((n.clone(), k));
                }
                (Some(_), 0) => unregister(lun, st, n),
                (Some(_), k) => {
                    if let Some(e) = st.res.registrants.iter_mut().find(|(r, _)| r == n) {
                        e.1 = k;
                    }
                }
            }
            st.res.generation = st.res.generation.wrapping_add(1);
            Ok(())
        }
        // RESERVE
        0x01 => {
            check_type(scope, rtype)?;
            if mine != Some(key) {
                return Err(Refusal::Conflict);
            }
            match &st.res.holder {
                None => {
                    st.res.holder = Some((n.clone(), rtype));
                    Ok(())
                }
                Some((_, t)) if st.res.is_holder(n) && *t == rtype => Ok(()),
                Some(_) => Err(Refusal::Conflict),
            }
        }
        // RELEASE
        0x02 => {
            if mine != Some(key) {
                return Err(Refusal::Conflict);
            }
            match st.res.holder.clone() {
                Some((_, t)) if st.res.is_holder(n) => {
                    if scope != 0 || t != rtype {
                        return Err(Check::INVALID_RELEASE_OF_PR.into());
                    }
                    st.res.holder = None;
                    if registrants_only_or_all(t) {
                        notify_registrants(lun, st, n, Check::RESERVATIONS_RELEASED);
                    }
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        // CLEAR
        0x03 => {
            if mine != Some(key) {
                return Err(Refusal::Conflict);
            }
            notify_registrants(lun, st, n, Check::RESERVATIONS_PREEMPTED);
            st.res.registrants.clear();
            st.res.holder = None;
            st.res.generation = st.res.generation.wrapping_add(1);
            Ok(())
        }
        // PREEMPT / PREEMPT AND ABORT
        _ => {
            if mine != Some(key) {
                return Err(Refusal::Conflict);
            }
            check_type(scope, rtype).or_else(|e| if st.res.holder.is_none() { Ok(()) } else { Err(e) })?;
            preempt(lun, st, n, sa_key, rtype, sa == 0x05)
        }
    };
    sync_flag(lun, st);
    let abort_gen = lun.abort_generation();
    result.map(|()| (abort_gen != abort_gen_before).then_some(abort_gen))
}

fn check_type(scope: u8, rtype: u8) -> Result<(), Refusal> {
    if scope != 0 {
        return Err(Check::invalid_cdb(2, Some(7)).into());
    }
    if !matches!(
        rtype,
        WRITE_EXCLUSIVE
            | EXCLUSIVE_ACCESS
            | WRITE_EXCLUSIVE_REGISTRANTS_ONLY
            | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
            | WRITE_EXCLUSIVE_ALL_REGISTRANTS
            | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    ) {
        return Err(Check::invalid_cdb(2, Some(3)).into());
    }
    Ok(())
}

/// Removes `n`'s registration; a reservation it held goes with it (for the
/// all-registrants types only with the last registrant).
fn unregister(lun: &Lun, st: &mut LunState, n: &Nexus) {
    let held = st.res.holder.clone();
    st.res.registrants.retain(|(r, _)| r != n);
    if let Some((h, t)) = held {
        let release = if all_registrants(t) { st.res.registrants.is_empty() } else { &h == n };
        if release {
            st.res.holder = None;
            if matches!(t, WRITE_EXCLUSIVE_REGISTRANTS_ONLY | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY) {
                notify_registrants(lun, st, n, Check::RESERVATIONS_RELEASED);
            }
        }
    }
}

fn notify_registrants(lun: &Lun, st: &mut LunState, except: &Nexus, ua: Check) {
    let others: Vec<Nexus> = st.res.registrants.iter().map(|(r, _)| r.clone()).filter(|r| r != except).collect();
    for o in &others {
        lun.ua_for(st, o, ua);
    }
}

fn preempt(lun: &Lun, st: &mut LunState, n: &Nexus, sa_key: u64, rtype: u8, abort: bool) -> Result<(), Refusal> {
    let holder = st.res.holder.clone();
    let holder_key = holder.as_ref().and_then(|(h, t)| if all_registrants(*t) { None } else { st.res.key_of(h) });
    let takes_reservation = match &holder {
        None => false,
        Some((_, t)) if all_registrants(*t) => sa_key == 0,
        Some(_) => holder_key == Some(sa_key),
    };
    if sa_key == 0 && !takes_reservation {
        return Err(Check::invalid_param(8, None).into());
    }
    let victims: Vec<Nexus> = st
        .res
        .registrants
        .iter()
        .filter(|(r, k)| r != n && (*k == sa_key || (sa_key == 0 && takes_reservation)))
        .map(|(r, _)| r.clone())
        .collect();
    if victims.is_empty() && !takes_reservation && !st.res.registrants.iter().any(|(_, k)| *k == sa_key) {
        return Err(Refusal::Conflict);
    }
    st.res.registrants.retain(|(r, _)| !victims.contains(r));
    for v in &victims {
        lun.ua_for(st, v, Check::REGISTRATIONS_PREEMPTED);
    }
    if abort {
        lun.abort_tasks_of(st, &victims);
    }
    if takes_reservation {
        let changed = holder.as_ref().is_some_and(|(_, t)| *t != rtype);
        st.res.holder = Some((n.clone(), rtype));
        if changed {
            notify_registrants(lun, st, n, Check::RESERVATIONS_RELEASED);
        }
    }
    st.res.generation = st.res.generation.wrapping_add(1);
    Ok(())
}
