//! Admin and property commands of a target controller: the controller
//! registers (CAP, VS, CC, CSTS with the enable and shutdown state
//! machine), Identify, Get Log Page (error, SMART, changed namespaces,
//! asymmetric namespace access, discovery), Set/Get Features, Keep Alive,
//! and the answers for commands a fabrics controller does not do.

use super::{Ctrl, NvmfState, Subsystem, SubsystemKind};
use bdev::DmaBuf;
use nvme_spec::fabrics::PropertySize;
use nvme_spec::features::{select, FeatureId, FeatureParams, NumberOfQueues, VWC_ENABLE};
use nvme_spec::identify::{
    anacap, cmic, cntrltype, ctratt, encode_ns_id_descriptors, lpa, oaes, oncs, sgls, vwc, Cns, IdentifyController,
    IdentifyNamespace, IdentifyParams, LbaFormat, NamespaceList, NsIdDescriptor, IDENTIFY_DATA_LEN,
};
use nvme_spec::log::{
    adrfam, subtype, tcp_sectype, treq, trtype, AnaGroupDescriptor, AnaLogHeader, DiscoveryLogEntry,
    DiscoveryLogHeader, GetLogPageParams, LogPageId, SmartLog, ANA_LSP_RETURN_GROUPS_ONLY, CHANGED_NS_LIST_OVERFLOW,
    CNTLID_DYNAMIC,
};
use nvme_spec::regs::{cap_css, offset, shutdown, Cap, Cc, Csts, Vs};
use nvme_spec::reservation::{notification_mask, rescap};
use nvme_spec::text::{write_ascii_padded, write_nqn};
use nvme_spec::{AdminOpcode, Sqe, Status, U128, U16, U32, U64};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use zerocopy::IntoBytes;

pub(crate) enum AdminOutcome {
    Done {
        status: Status,
        dw0: u32,
    },
    /// Parked until an event (Asynchronous Event Request).
    AsyncEventRequest,
    /// The host turned the volatile write cache off: write back what the
    /// namespaces' caches hold, then complete with success.
    FlushNamespaces,
    /// A reservation setting changed: written to the namespace's
    /// `ptpl_file` before the command completes with `status`.
    Persist {
        status: Status,
        job: super::reservation::PersistJob,
    },
}

fn done(status: Status) -> AdminOutcome {
    AdminOutcome::Done { status, dw0: 0 }
}

/// Timeout CAP.TO reports, in 500 ms units (15 s).
const CAP_TIMEOUT_500MS: u8 = 30;
/// Keep alive granularity KAS reports, in 100 ms units.
const KAS_100MS: u16 = 10;

pub(crate) fn cap(ctrl: &Ctrl) -> Cap {
    let depth =
        if ctrl.subsys.kind == SubsystemKind::Discovery { ctrl.opts.max_aq_depth } else { ctrl.opts.max_queue_depth };
    Cap(0)
        .with_mqes((depth - 1).min(0xFFFF) as u16)
        .with_cqr(true)
        .with_timeout_500ms(CAP_TIMEOUT_500MS)
        .with_css(cap_css::NVM)
        .with_mpsmin(0)
        .with_mpsmax(0)
}

pub(crate) fn property_get(ctrl: &Ctrl, off: u32, size: Option<PropertySize>) -> Result<u64, Status> {
    let size = size.ok_or(Status::INVALID_FIELD.with_dnr())?;
    let a = ctrl.admin();
    let (v, width) = match off {
        offset::CAP => (cap(ctrl).0, PropertySize::EightBytes),
        offset::VS => (u64::from(Vs::V1_3.0), PropertySize::FourBytes),
        offset::CC => (u64::from(a.cc), PropertySize::FourBytes),
        offset::CSTS => (u64::from(a.csts), PropertySize::FourBytes),
        _ => return Err(Status::INVALID_FIELD.with_dnr()),
    };
    if size != width {
        return Err(Status::INVALID_FIELD.with_dnr());
    }
    Ok(v)
}

pub(crate) fn property_set(ctrl: &Ctrl, off: u32, size: Option<PropertySize>, value: u64) -> Status {
    if off != offset::CC || size != Some(PropertySize::FourBytes) {
        return Status::INVALID_FIELD.with_dnr();
    }
    let new = Cc(value as u32);
    let mut a = ctrl.admin();
    let old = Cc(a.cc);
    let mut csts = Csts(a.csts);
    if new.en() && !old.en() {
        // Enabling: the host must use 64-byte SQEs, 16-byte CQEs, 4 KiB pages.
        let sizes_ok = new.iosqes() == 6 && new.iocqes() == 4 && new.mps() == 0;
        // A discovery controller has no IO queues: zero sizes are fine there.
        let discovery_ok = ctrl.subsys.kind == SubsystemKind::Discovery && new.iosqes() == 0 && new.mps() == 0;
        if !sizes_ok && !discovery_ok {
            return Status::INVALID_FIELD.with_dnr();
        }
        csts = csts.with_rdy(true).with_shst(shutdown::SHST_NORMAL);
        ctrl.ready.store(true, Ordering::Release);
    } else if !new.en() && old.en() {
        // A controller reset: IO queues go away, the admin queue stays.
        csts = csts.with_rdy(false);
        ctrl.ready.store(false, Ordering::Release);
    }
    if new.shn() != shutdown::SHN_NONE && old.shn() == shutdown::SHN_NONE {
        // Nothing is cached in the target: shutdown completes at once.
        csts = csts.with_shst(shutdown::SHST_COMPLETE);
        ctrl.ready.store(false, Ordering::Release);
    } else if new.shn() == shutdown::SHN_NONE {
        csts = csts.with_shst(shutdown::SHST_NORMAL);
    }
    a.cc = new.0;
    a.csts = csts.0;
    Status::SUCCESS
}

pub(crate) fn admin_cmd(
    ctrl: &Arc<Ctrl>,
    sqe: &Sqe,
    data_in: Option<&DmaBuf>,
    out: &mut Vec<u8>,
    portid: u16,
) -> AdminOutcome {
    match AdminOpcode(sqe.opcode) {
        AdminOpcode::IDENTIFY => identify(ctrl, sqe, out),
        AdminOpcode::GET_LOG_PAGE => get_log_page(ctrl, sqe, out, portid),
        AdminOpcode::KEEP_ALIVE => {
            ctrl.last_keep_alive_ns.store(reactor::now_ns(), Ordering::Relaxed);
            done(Status::SUCCESS)
        }
        AdminOpcode::SET_FEATURES => set_features(ctrl, sqe, data_in),
        AdminOpcode::GET_FEATURES => get_features(ctrl, sqe, out),
        AdminOpcode::ASYNC_EVENT_REQUEST => AdminOutcome::AsyncEventRequest,
        // Abort is the queue pair's (conn/abort.rs): it needs the commands.
        _ => done(Status::INVALID_OPCODE.with_dnr()),
    }
}

fn fill_ascii(field: &mut [u8], s: &str) {
    let s: String = s.chars().filter(|c| c.is_ascii() && !c.is_ascii_control()).take(field.len()).collect();
    let _ = write_ascii_padded(field, &s);
}

fn identify_controller(ctrl: &Ctrl) -> IdentifyController {
    let sub: &Subsystem = &ctrl.subsys;
    let discovery = sub.kind == SubsystemKind::Discovery;
    let o = &ctrl.opts;
    let mut id = IdentifyController::zeroed();
    id.vid = U16::new(0);
    id.ssvid = U16::new(0);
    fill_ascii(&mut id.sn, &sub.serial_number);
    fill_ascii(&mut id.mn, &sub.model_number);
    fill_ascii(&mut id.fr, env!("CARGO_PKG_VERSION"));
    id.rab = 6;
    id.cntlid = U16::new(ctrl.cntlid);
    id.ver = U32::new(Vs::V1_3.0);
    id.ctratt = U32::new(ctratt::HOST_ID_128);
    id.cntrltype = if discovery { cntrltype::DISCOVERY } else { cntrltype::IO };
    id.acl = 3;
    id.aerl = (super::conn::MAX_AERS - 1) as u8;
    id.lpa = lpa::EXTENDED_DATA;
    id.elpe = 0;
    id.kas = U16::new(KAS_100MS);
    id.sqes = 0x66;
    id.cqes = 0x44;
    id.maxcmd = U16::new(o.max_queue_depth.min(0xFFFF) as u16);
    id.sgls = U32::new(sgls::SUPPORTED | sgls::OFFSET | sgls::TRANSPORT_DATA_BLOCK);
    let _ = write_nqn(&mut id.subnqn, &sub.nqn);
    id.ioccsz = U32::new((64 + o.in_capsule_data_size) / 16);
    id.iorcsz = U32::new(1);
    id.icdoff = U16::new(0);
    id.fcatt = 0;
    id.msdbd = 1;
    if discovery {
        id.mdts = o.mdts();
        return id;
    }
    id.ieee = [0x38, 0x74, 0x8d];
    id.cmic = cmic::MULTI_CONTROLLER;
    id.mdts = o.mdts();
    id.oaes = U32::new(oaes::NAMESPACE_ATTRIBUTE);
    id.nn = U32::new(sub.max_namespaces);
    id.mnan = U32::new(sub.max_namespaces);
    id.oncs = U16::new(oncs::DATASET_MANAGEMENT | oncs::WRITE_ZEROES | oncs::RESERVATIONS);
    // Present when some namespace's bdev has a volatile write cache: the
    // host then sends FUA and Flush where it needs durability.
    id.vwc = if ctrl.write_cache_present() { vwc::PRESENT } else { 0 } | vwc::FLUSH_BROADCAST_UNSUPPORTED;
    id.awun = U16::new(0);
    id.awupf = U16::new(0);
    if sub.ana_reporting {
        id.cmic |= cmic::ANA_REPORTING;
        id.oaes = U32::new(id.oaes.get() | oaes::ANA_CHANGE);
        // A state change takes effect at once; the spec's ANATT bounds a
        // transition the target never enters, 10 s as SPDK reports it.
        id.anatt = ANA_TRANSITION_TIME_SECS;
        // The states an RPC can set. Not "ANAGRPID fixed while attached":
        // nvmf_subsystem_set_ns_ana_group moves an attached namespace.
        id.anacap = anacap::OPTIMIZED | anacap::NON_OPTIMIZED | anacap::INACCESSIBLE;
        // One group per possible namespace, numbered 1..=max_namespaces.
        id.anagrpmax = U32::new(sub.max_namespaces);
        id.nanagrpid = U32::new(sub.max_namespaces);
    }
    id
}

/// ANATT of Identify Controller, in seconds.
const ANA_TRANSITION_TIME_SECS: u8 = 10;

fn identify_namespace(sub: &Subsystem, hostnqn: &str, nsid: u32) -> Option<IdentifyNamespace> {
    let ns = sub.namespaces_of(hostnqn).into_iter().find(|n| n.nsid == nsid)?;
    let p = ns.bdev.props();
    // The current size: a resized bdev reports its new one.
    let num_blocks = ns.bdev.num_blocks();
    let mut id = IdentifyNamespace::zeroed();
    id.nsze = U64::new(num_blocks);
    id.ncap = U64::new(num_blocks);
    id.nuse = U64::new(num_blocks);
    id.nlbaf = 0;
    id.flbas = 0;
    // May be shared by several controllers.
    id.nmic = 1;
    // What a deallocated block reads back as: zeroes (001b) only when the
    // bdev says so; otherwise "not reported" (000b).
    id.dlfeat = if p.deallocated_reads_zeroes { 0b001 } else { 0b000 };
    id.nguid = ns.nguid;
    id.lbaf[0] = LbaFormat::new(p.block_size.trailing_zeros() as u8, 0);
    if p.optimal_io_boundary > 0 {
        id.noiob = U16::new(p.optimal_io_boundary.min(0xFFFF) as u16);
    }
    if sub.ana_reporting {
        id.anagrpid = U32::new(ns.anagrpid());
    }
    id.rescap = rescap::WRITE_EXCLUSIVE
        | rescap::EXCLUSIVE_ACCESS
        | rescap::WRITE_EXCLUSIVE_REG_ONLY
        | rescap::EXCLUSIVE_ACCESS_REG_ONLY
        | rescap::WRITE_EXCLUSIVE_ALL_REGS
        | rescap::EXCLUSIVE_ACCESS_ALL_REGS
        | rescap::IGNORE_EXISTING_KEY;
    if ns.resv.ptpl_file().is_some() {
        id.rescap |= rescap::PERSIST_THROUGH_POWER_LOSS;
    }
    Some(id)
}

fn identify(ctrl: &Arc<Ctrl>, sqe: &Sqe, out: &mut Vec<u8>) -> AdminOutcome {
    let p = IdentifyParams::from_sqe(sqe);
    let sub = &ctrl.subsys;
    let discovery = sub.kind == SubsystemKind::Discovery;
    match p.cns {
        Cns::CONTROLLER => out.extend_from_slice(identify_controller(ctrl).as_bytes()),
        Cns::NAMESPACE if !discovery => match identify_namespace(sub, &ctrl.hostnqn, p.nsid) {
            Some(id) => out.extend_from_slice(id.as_bytes()),
            // An inactive NSID within range reads as zeroes.
            None if p.nsid != 0 && p.nsid <= sub.max_namespaces => out.resize(IDENTIFY_DATA_LEN, 0),
            None => return done(Status::INVALID_NAMESPACE_OR_FORMAT.with_dnr()),
        },
        Cns::ACTIVE_NAMESPACE_LIST | Cns::CSI_ACTIVE_NAMESPACE_LIST if !discovery => {
            if p.cns == Cns::CSI_ACTIVE_NAMESPACE_LIST && p.csi != 0 {
                out.resize(IDENTIFY_DATA_LEN, 0);
                return done(Status::SUCCESS);
            }
            if p.nsid >= 0xFFFF_FFFE {
                return done(Status::INVALID_NAMESPACE_OR_FORMAT.with_dnr());
            }
            let ids: Vec<u32> =
                sub.namespaces_of(&ctrl.hostnqn).iter().map(|n| n.nsid).filter(|&n| n > p.nsid).collect();
            out.extend_from_slice(NamespaceList::from_ids(ids).as_bytes());
        }
        Cns::NAMESPACE_ID_DESCRIPTORS if !discovery => {
            let Some(ns) = sub.namespaces_of(&ctrl.hostnqn).into_iter().find(|n| n.nsid == p.nsid) else {
                return done(Status::INVALID_NAMESPACE_OR_FORMAT.with_dnr());
            };
            out.resize(IDENTIFY_DATA_LEN, 0);
            let descs =
                [NsIdDescriptor::Nguid(ns.nguid), NsIdDescriptor::Uuid(*ns.uuid.as_bytes()), NsIdDescriptor::Csi(0)];
            if encode_ns_id_descriptors(&descs, out).is_err() {
                return done(Status::INTERNAL_ERROR);
            }
        }
        // I/O command set specific data for the NVM command set: no
        // limits beyond MDTS, all zeroes.
        Cns::CSI_CONTROLLER | Cns::CSI_NAMESPACE if !discovery && p.csi == 0 => {
            if p.cns == Cns::CSI_NAMESPACE && !sub.namespaces_of(&ctrl.hostnqn).iter().any(|n| n.nsid == p.nsid) {
                return done(Status::INVALID_NAMESPACE_OR_FORMAT.with_dnr());
            }
            out.resize(IDENTIFY_DATA_LEN, 0);
        }
        _ => return done(Status::INVALID_FIELD.with_dnr()),
    }
    done(Status::SUCCESS)
}

fn get_log_page(ctrl: &Arc<Ctrl>, sqe: &Sqe, out: &mut Vec<u8>, _portid: u16) -> AdminOutcome {
    let p = GetLogPageParams::from_sqe(sqe);
    let discovery = ctrl.subsys.kind == SubsystemKind::Discovery;
    if !p.offset_bytes.is_multiple_of(4) {
        return done(Status::INVALID_FIELD.with_dnr());
    }
    let mut page: Vec<u8> = Vec::new();
    match p.lid {
        LogPageId::ERROR_INFORMATION => page.resize(64, 0),
        LogPageId::SMART_HEALTH if !discovery => {
            // Controller-wide only (LPA bit 0 clear): NSID 0 or FFFFFFFFh.
            if p.nsid != 0 && p.nsid != 0xFFFF_FFFF {
                return done(Status::INVALID_FIELD.with_dnr());
            }
            page.extend_from_slice(smart_log(ctrl).as_bytes());
        }
        LogPageId::CHANGED_NAMESPACE_LIST if !discovery => {
            let mut a = ctrl.admin();
            let ids = if a.changed_ns.len() > NamespaceList::CAPACITY {
                vec![CHANGED_NS_LIST_OVERFLOW]
            } else {
                let mut v = a.changed_ns.clone();
                v.sort_unstable();
                v
            };
            page.extend_from_slice(NamespaceList::from_ids(ids).as_bytes());
            if !p.rae {
                a.changed_ns.clear();
                a.ns_notice_masked = false;
            }
        }
        LogPageId::ASYMMETRIC_NAMESPACE_ACCESS if !discovery && ctrl.subsys.ana_reporting => {
            page = ana_log(ctrl, p.lsp & ANA_LSP_RETURN_GROUPS_ONLY != 0);
            if !p.rae {
                ctrl.admin().ana_notice_masked = false;
            }
        }
        LogPageId::FIRMWARE_SLOT if !discovery => {
            // One slot, active, holding the running version.
            page.resize(512, 0);
            page[0] = 1;
            fill_ascii(&mut page[8..16], env!("CARGO_PKG_VERSION"));
        }
        LogPageId::DISCOVERY if discovery => page = discovery_log(&ctrl.hostnqn),
        LogPageId::RESERVATION_NOTIFICATION if !discovery => {
            // Each read takes the oldest page; reading re-arms the notice.
            let mut a = ctrl.admin();
            page.extend_from_slice(a.resv.take_page().as_bytes());
            if !p.rae {
                a.resv.notice_masked = false;
            }
        }
        _ => return done(Status::INVALID_LOG_PAGE.with_dnr()),
    }
    let start = (p.offset_bytes as usize).min(page.len());
    if p.offset_bytes as usize > page.len() {
        return done(Status::INVALID_FIELD.with_dnr());
    }
    let end = (start as u64 + p.len_bytes).min(page.len() as u64) as usize;
    out.extend_from_slice(&page[start..end]);
    done(Status::SUCCESS)
}

/// The ANA log page a controller reports: one descriptor per group that
/// holds a namespace the controller sees, with the state the group has
/// through the controller's listener, and (unless `groups_only`) the
/// group's NSIDs in ascending order.
fn ana_log(ctrl: &Ctrl, groups_only: bool) -> Vec<u8> {
    let sub = &ctrl.subsys;
    let i = sub.lock();
    let mut groups: Vec<(u32, Vec<u32>)> = Vec::new();
    for n in i.namespaces.iter().filter(|n| n.visible_to(&ctrl.hostnqn)) {
        let g = n.anagrpid();
        match groups.iter_mut().find(|(id, _)| *id == g) {
            Some((_, ids)) => ids.push(n.nsid),
            None => groups.push((g, vec![n.nsid])),
        }
    }
    groups.sort_unstable_by_key(|(g, _)| *g);
    let listener = i.ana.iter().find(|l| l.addr == ctrl.listen);
    let mut page = AnaLogHeader::new(i.ana_chgcnt, groups.len() as u16).as_bytes().to_vec();
    for (g, ids) in &groups {
        let state = Subsystem::ana_state_locked(&i, &ctrl.listen, *g);
        let changed_at = listener.and_then(|l| l.changed_at.get(*g as usize - 1)).copied().unwrap_or(0);
        let nnsids = if groups_only { 0 } else { ids.len() as u32 };
        page.extend_from_slice(AnaGroupDescriptor::new(*g, nnsids, changed_at, state.code()).as_bytes());
        if !groups_only {
            for id in ids {
                page.extend_from_slice(&id.to_le_bytes());
            }
        }
    }
    page
}

/// The SMART / health log of a controller, from its queues' counters.
/// What a target in software cannot know (temperature, spare capacity,
/// wear, power cycles, unsafe shutdowns, busy time) is 0, as the Linux
/// target reports it, never an invented figure.
fn smart_log(ctrl: &Ctrl) -> SmartLog {
    let [read_cmds, write_cmds, bytes_read, bytes_written, media_errors] = ctrl.smart_counters();
    // Thousands of 512-byte units, rounded up (1 means 1..=1000 units).
    let data_units = |bytes: u64| bytes.div_ceil(512).div_ceil(1000);
    let mut s = SmartLog::zeroed();
    s.data_units_read = U128::new(u128::from(data_units(bytes_read)));
    s.data_units_written = U128::new(u128::from(data_units(bytes_written)));
    s.host_read_commands = U128::new(u128::from(read_cmds));
    s.host_write_commands = U128::new(u128::from(write_cmds));
    s.power_on_hours = U128::new(u128::from(NvmfState::get().uptime_secs() / 3600));
    s.media_errors = U128::new(u128::from(media_errors));
    s
}

/// The discovery log a host sees: one entry per (subsystem it may
/// connect to, listener of that subsystem).
fn discovery_log(hostnqn: &str) -> Vec<u8> {
    let state = NvmfState::get();
    let asqsz = state.transport().map_or(128, |t| t.max_aq_depth);
    let mut entries = Vec::new();
    for s in state.subsystems() {
        if s.kind != SubsystemKind::Nvme || !s.host_allowed(hostnqn) {
            continue;
        }
        for a in s.listeners() {
            let mut e = DiscoveryLogEntry::zeroed();
            e.trtype = trtype::TCP;
            e.adrfam = if a.ipv6() { adrfam::IPV6 } else { adrfam::IPV4 };
            e.subtype = subtype::NVME;
            let secure = state.listener_secure(&a);
            let channel = if secure { treq::SECURE_CHANNEL_REQUIRED } else { treq::SECURE_CHANNEL_NOT_REQUIRED };
            e.treq = channel | treq::DISABLE_SQ_FLOW_CONTROL;
            e.portid = U16::new(a.trsvcid.parse::<u16>().unwrap_or(0));
            e.cntlid = U16::new(CNTLID_DYNAMIC);
            e.asqsz = U16::new(asqsz.min(0xFFFF) as u16);
            fill_ascii(&mut e.trsvcid, &a.trsvcid);
            let _ = write_nqn(&mut e.subnqn, &s.nqn);
            fill_ascii(&mut e.traddr, &a.traddr);
            e.tsas[0] = if secure { tcp_sectype::TLS_1_3 } else { tcp_sectype::NONE };
            entries.push(e);
        }
    }
    let genctr = state.genctr.load(Ordering::Acquire);
    let mut page = DiscoveryLogHeader::new(genctr, entries.len() as u64).as_bytes().to_vec();
    for e in &entries {
        page.extend_from_slice(e.as_bytes());
    }
    page
}

fn set_features(ctrl: &Arc<Ctrl>, sqe: &Sqe, _data: Option<&DmaBuf>) -> AdminOutcome {
    let f = FeatureParams::from_sqe(sqe);
    if f.save {
        return done(Status::FEATURE_NOT_SAVEABLE.with_dnr());
    }
    let discovery = ctrl.subsys.kind == SubsystemKind::Discovery;
    let mut a = ctrl.admin();
    match f.fid {
        FeatureId::NUMBER_OF_QUEUES if !discovery => {
            let want = NumberOfQueues::from_dword(f.value);
            if want.io_sqs > 0xFFFE || want.io_cqs > 0xFFFE {
                return done(Status::INVALID_FIELD.with_dnr());
            }
            let max = ctrl.opts.max_io_qpairs_per_ctrlr;
            // Allocated counts are what the controller supports, whatever was asked.
            a.num_io_queues = max;
            let dw0 = NumberOfQueues { io_sqs: max, io_cqs: max }.to_dword();
            AdminOutcome::Done { status: Status::SUCCESS, dw0 }
        }
        FeatureId::KEEP_ALIVE_TIMER => {
            ctrl.kato_ms.store(f.value, Ordering::Relaxed);
            ctrl.last_keep_alive_ns.store(reactor::now_ns(), Ordering::Relaxed);
            done(Status::SUCCESS)
        }
        FeatureId::ASYNC_EVENT_CONFIG => {
            a.async_event_config = f.value;
            done(Status::SUCCESS)
        }
        FeatureId::VOLATILE_WRITE_CACHE if !discovery => {
            // Without a volatile write cache the feature is not supported.
            if !ctrl.write_cache_present() || f.value & !VWC_ENABLE != 0 {
                return done(Status::INVALID_FIELD.with_dnr());
            }
            let enable = f.value & VWC_ENABLE != 0;
            let was = ctrl.write_cache_enabled.swap(enable, Ordering::AcqRel);
            if was && !enable {
                // From now on every write is FUA; what the caches already
                // hold is written back before the command completes.
                drop(a);
                return AdminOutcome::FlushNamespaces;
            }
            done(Status::SUCCESS)
        }
        FeatureId::ARBITRATION if !discovery => {
            a.arbitration = f.value;
            done(Status::SUCCESS)
        }
        // One power state (NPSS 0): state 0 is the only one to choose.
        FeatureId::POWER_MANAGEMENT if !discovery && f.value & 0x1F == 0 => done(Status::SUCCESS),
        FeatureId::RESERVATION_NOTIFICATION_MASK if !discovery => {
            let nsid = sqe.nsid.get();
            let masks = f.value & notification_mask::ALL;
            let targets: Vec<u32> = if nsid == 0xFFFF_FFFF {
                ctrl.subsys.namespaces_of(&ctrl.hostnqn).iter().map(|n| n.nsid).collect()
            } else if ctrl.subsys.namespaces_of(&ctrl.hostnqn).iter().any(|n| n.nsid == nsid) {
                vec![nsid]
            } else {
                return done(Status::INVALID_FIELD.with_dnr());
            };
            for n in targets {
                a.resv.set_mask(n, masks);
            }
            done(Status::SUCCESS)
        }
        FeatureId::RESERVATION_PERSISTENCE if !discovery => {
            drop(a);
            let Some(ns) = ctrl.subsys.namespaces_of(&ctrl.hostnqn).into_iter().find(|n| n.nsid == sqe.nsid.get())
            else {
                return done(Status::INVALID_FIELD.with_dnr());
            };
            match ns.resv.set_ptpl(f.value & 1 != 0) {
                Ok(Some(job)) => AdminOutcome::Persist { status: Status::SUCCESS, job },
                Ok(None) => done(Status::SUCCESS),
                Err(st) => done(st),
            }
        }
        FeatureId::TEMPERATURE_THRESHOLD if !discovery => match temp_threshold_of(f.value) {
            Some(Threshold::Over) => {
                a.over_temp_threshold = f.value as u16;
                done(Status::SUCCESS)
            }
            Some(Threshold::Under) => {
                a.under_temp_threshold = f.value as u16;
                done(Status::SUCCESS)
            }
            None => done(Status::INVALID_FIELD.with_dnr()),
        },
        _ => done(Status::INVALID_FIELD.with_dnr()),
    }
}

/// The over-temperature threshold a controller starts with (Kelvin).
pub(crate) const DEFAULT_OVER_TEMP_THRESHOLD: u16 = 350;

enum Threshold {
    Over,
    Under,
}

/// Which threshold a Temperature Threshold dword (CDW11) names: THSEL in
/// bits 21:20; TMPSEL (bits 19:16) must be 0, the composite temperature,
/// as the controller reports no other sensor.
fn temp_threshold_of(cdw11: u32) -> Option<Threshold> {
    if (cdw11 >> 16) & 0xF != 0 {
        return None;
    }
    match (cdw11 >> 20) & 0x3 {
        0 => Some(Threshold::Over),
        1 => Some(Threshold::Under),
        _ => None,
    }
}

fn get_features(ctrl: &Arc<Ctrl>, sqe: &Sqe, out: &mut Vec<u8>) -> AdminOutcome {
    let f = FeatureParams::from_sqe(sqe);
    let discovery = ctrl.subsys.kind == SubsystemKind::Discovery;
    if f.select == select::SUPPORTED_CAPABILITIES {
        // Changeable, not saveable; the reservation features are
        // namespace specific, the others not.
        let ns_specific =
            f.fid == FeatureId::RESERVATION_NOTIFICATION_MASK || f.fid == FeatureId::RESERVATION_PERSISTENCE;
        return AdminOutcome::Done { status: Status::SUCCESS, dw0: 0b100 | (u32::from(ns_specific) << 1) };
    }
    let a = ctrl.admin();
    let dw0 = match f.fid {
        FeatureId::NUMBER_OF_QUEUES if !discovery => {
            NumberOfQueues { io_sqs: a.num_io_queues, io_cqs: a.num_io_queues }.to_dword()
        }
        FeatureId::KEEP_ALIVE_TIMER => ctrl.kato_ms.load(Ordering::Relaxed),
        FeatureId::ASYNC_EVENT_CONFIG => a.async_event_config,
        FeatureId::VOLATILE_WRITE_CACHE if !discovery => {
            if !ctrl.write_cache_present() {
                return done(Status::INVALID_FIELD.with_dnr());
            }
            // Current value; the default (and the "saved" one, this feature
            // not being saveable) is enabled.
            match f.select {
                select::CURRENT => u32::from(ctrl.write_cache_enabled.load(Ordering::Acquire)),
                _ => VWC_ENABLE,
            }
        }
        FeatureId::ARBITRATION if !discovery => a.arbitration,
        FeatureId::POWER_MANAGEMENT if !discovery => 0,
        FeatureId::TEMPERATURE_THRESHOLD if !discovery => match (temp_threshold_of(f.value), f.select) {
            (Some(Threshold::Over), select::CURRENT) => u32::from(a.over_temp_threshold),
            (Some(Threshold::Over), _) => u32::from(DEFAULT_OVER_TEMP_THRESHOLD),
            (Some(Threshold::Under), select::CURRENT) => u32::from(a.under_temp_threshold),
            (Some(Threshold::Under), _) => 0,
            (None, _) => return done(Status::INVALID_FIELD.with_dnr()),
        },
        FeatureId::HOST_IDENTIFIER => {
            out.extend_from_slice(&ctrl.hostid);
            0
        }
        FeatureId::RESERVATION_NOTIFICATION_MASK | FeatureId::RESERVATION_PERSISTENCE if !discovery => {
            drop(a);
            let Some(ns) = ctrl.subsys.namespaces_of(&ctrl.hostnqn).into_iter().find(|n| n.nsid == sqe.nsid.get())
            else {
                return done(Status::INVALID_FIELD.with_dnr());
            };
            if f.fid == FeatureId::RESERVATION_PERSISTENCE {
                u32::from(ns.resv.ptpl())
            } else {
                ctrl.admin().resv.mask(ns.nsid)
            }
        }
        _ => return done(Status::INVALID_FIELD.with_dnr()),
    };
    AdminOutcome::Done { status: Status::SUCCESS, dw0 }
}
