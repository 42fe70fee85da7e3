//! Asymmetric namespace access and namespace masking on the target: the
//! ANA log page per listener, Identify's ANA fields, a state change that
//! raises the ANA change notice and shows in the log, path statuses on IO
//! through an inaccessible listener, and namespaces shown to chosen hosts
//! only (Identify, IO, and the namespace attribute notice on a change).

mod common;
use bdev::malloc::MallocBdev;
use bdev::{BdevProps, DmaBuf, Registry};
use common::*;
use nvme_spec::features::{async_event_config, AsyncEvent, FeatureId, FeatureParams};
use nvme_spec::identify::{cmic, oaes, Cns, IdentifyController, IdentifyNamespace, IdentifyParams};
use nvme_spec::log::{ana_state, AnaGroupDescriptor, AnaLogHeader, GetLogPageParams, LogPageId};
use nvme_spec::{AdminOpcode, Sqe, Status};
use nvmf::host::{self, Data, HostQpair};
use nvmf::{AnaState, ListenAddr, NsOptions, NvmfState, SubsystemParams, TransportOpts};
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zerocopy::FromBytes;

const OTHER_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:99999999-2222-3333-4444-555555555555";
const MAX_NS: u32 = 8;

/// A target with two listeners (two ports) on one subsystem with three
/// malloc namespaces: NSID 1 in group 1, NSID 2 in group 2, NSID 3 in
/// group 2 and shown only to hosts added with `nvmf_ns_add_host`.
struct Paths {
    t: Target,
    port_b: u16,
}

fn start(ana_reporting: bool) -> Paths {
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0, 1], IdlePolicy::sleep()) };
    let set = ReactorSet::start(cfg, || {}).unwrap();
    let (port, port_b) = (free_port(), free_port());
    set.call(0, move || {
        for name in ["Malloc0", "Malloc1", "Malloc2"] {
            let m = MallocBdev::new(BdevProps::new(name, "Malloc disk", 512, 2048, None)).unwrap();
            Registry::get().register(Arc::new(m)).unwrap();
        }
        let st = NvmfState::get();
        st.create_transport(TransportOpts::default()).unwrap();
        let mut p = SubsystemParams::new(NQN);
        p.allow_any_host = true;
        p.max_namespaces = MAX_NS;
        p.ana_reporting = ana_reporting;
        st.create_subsystem(p).unwrap();
        assert_eq!(st.add_ns(NQN, "Malloc0", 0, None, None).unwrap(), 1);
        assert_eq!(st.add_ns(NQN, "Malloc1", 0, None, None).unwrap(), 2);
        let hidden = NsOptions { anagrpid: 2, no_auto_visible: true, ..NsOptions::default() };
        assert_eq!(st.add_ns_with(NQN, "Malloc2", hidden).unwrap(), 3);
        st.add_listener(NQN, ListenAddr::new("127.0.0.1", &port.to_string())).unwrap();
        st.add_listener(NQN, ListenAddr::new("127.0.0.1", &port_b.to_string())).unwrap();
    });
    Paths { t: Target { set, port }, port_b }
}

fn addr(port: u16) -> ListenAddr {
    ListenAddr::new("127.0.0.1", &port.to_string())
}

fn set_state(t: &Target, port: u16, state: AnaState, group: u32) {
    t.set.call(0, move || NvmfState::get().set_ana_state(NQN, &addr(port), state, group).unwrap());
}

fn connect(port: u16, hostnqn: &str) -> (HostQpair, HostQpair) {
    let mut p = params(port);
    p.kato_ms = 0;
    p.hostnqn = hostnqn.into();
    let s = host::connect(&p, 1).unwrap_or_else(|e| panic!("connect: {e}"));
    (HostQpair::from_parts(s.admin), HostQpair::from_parts(s.io.into_iter().next().unwrap()))
}

fn identify(admin: &mut HostQpair, cns: Cns, nsid: u32) -> Vec<u8> {
    let mut sqe = Sqe::new(AdminOpcode::IDENTIFY.0, 0);
    IdentifyParams { cns, cntid: 0, csi: 0, nsid }.write_to(&mut sqe);
    let c = command(admin, sqe, Data::In(DmaBuf::zeroed(4096).unwrap()));
    assert!(c.status.is_success(), "Identify {cns:?}: {:?}", c.status);
    c.buf.unwrap().to_vec()
}

fn active_nsids(admin: &mut HostQpair) -> Vec<u32> {
    identify(admin, Cns::ACTIVE_NAMESPACE_LIST, 0)
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take_while(|&n| n != 0)
        .collect()
}

fn get_log(admin: &mut HostQpair, lid: LogPageId, lsp: u8, len: usize) -> Result<Vec<u8>, Status> {
    let mut sqe = Sqe::new(AdminOpcode::GET_LOG_PAGE.0, 0);
    GetLogPageParams { lid, lsp, rae: false, len_bytes: len as u64, offset_bytes: 0, lsi: 0, nsid: 0xFFFF_FFFF }
        .write_to(&mut sqe);
    let c = command(admin, sqe, Data::In(DmaBuf::zeroed(len).unwrap()));
    if c.status.is_success() {
        Ok(c.buf.unwrap().to_vec())
    } else {
        Err(c.status)
    }
}

/// The ANA log as (change count, [(group, state, NSIDs)]).
fn ana_log(admin: &mut HostQpair, groups_only: bool) -> (u64, Vec<(u32, u8, Vec<u32>)>) {
    let page = get_log(admin, LogPageId::ASYMMETRIC_NAMESPACE_ACCESS, u8::from(groups_only), 4096).unwrap();
    let (h, mut rest) = AnaLogHeader::read_from_prefix(&page).unwrap();
    let mut groups = Vec::new();
    for _ in 0..h.ngrps.get() {
        let (d, r) = AnaGroupDescriptor::read_from_prefix(rest).unwrap();
        let n = d.nnsids.get() as usize;
        let ids = r[..n * 4].chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        groups.push((d.anagrpid.get(), d.state, ids));
        rest = &r[n * 4..];
    }
    (h.chgcnt.get(), groups)
}

fn enable_notices(admin: &mut HostQpair, bits: u32) {
    let mut sqe = Sqe::new(AdminOpcode::SET_FEATURES.0, 0);
    FeatureParams { fid: FeatureId::ASYNC_EVENT_CONFIG, save: false, select: 0, value: bits }.write_to(&mut sqe);
    assert!(command(admin, sqe, Data::None).status.is_success());
}

const AER_TAG: u64 = 0xAE;

fn post_aer(admin: &mut HostQpair) {
    admin.submit(Sqe::new(AdminOpcode::ASYNC_EVENT_REQUEST.0, 0), Data::None, AER_TAG).unwrap();
}

/// Waits up to `limit` for the parked AER to complete; its event.
fn aer_event(admin: &mut HostQpair, limit: Duration) -> Option<AsyncEvent> {
    let t0 = Instant::now();
    let mut got = None;
    while got.is_none() && t0.elapsed() < limit {
        admin.poll(|c| got = Some(c)).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    got.map(|c| {
        assert_eq!(c.tag, AER_TAG);
        assert!(c.status.is_success());
        AsyncEvent::from_dword(c.dw0)
    })
}

fn read_status(qp: &mut HostQpair, nsid: u32) -> Status {
    qp.read(nsid, 0, 8, DmaBuf::alloc(4096).unwrap(), 7).unwrap();
    wait(qp, 1).pop().unwrap().status
}

#[test]
fn ana_log_follows_listener_state_and_inaccessible_paths_fail_io() {
    let p = start(true);
    let (mut admin, mut io) = connect(p.t.port, HOSTNQN);

    let id = IdentifyController::read_from_bytes(&identify(&mut admin, Cns::CONTROLLER, 0)).unwrap();
    assert_eq!(id.cmic & cmic::ANA_REPORTING, cmic::ANA_REPORTING);
    assert_eq!(id.oaes.get() & oaes::ANA_CHANGE, oaes::ANA_CHANGE);
    assert_eq!((id.anagrpmax.get(), id.nanagrpid.get()), (MAX_NS, MAX_NS));
    assert_ne!(id.anatt, 0);
    assert_eq!(id.anacap & 0b111, 0b111, "optimized, non-optimized, inaccessible");
    let ns2 = IdentifyNamespace::read_from_bytes(&identify(&mut admin, Cns::NAMESPACE, 2)).unwrap();
    assert_eq!(ns2.anagrpid.get(), 2);

    // Groups 1 and 2 hold the namespaces this host sees (NSID 3 is hidden).
    let (cnt0, groups) = ana_log(&mut admin, false);
    assert_eq!(groups, vec![(1, ana_state::OPTIMIZED, vec![1]), (2, ana_state::OPTIMIZED, vec![2])]);
    let (_, only) = ana_log(&mut admin, true);
    assert_eq!(only, vec![(1, ana_state::OPTIMIZED, vec![]), (2, ana_state::OPTIMIZED, vec![])]);
    assert!(read_status(&mut io, 2).is_success());

    // Group 2 goes inaccessible through this listener: the notice comes,
    // the log shows it, IO to NSID 2 ends with the path status.
    enable_notices(&mut admin, async_event_config::ANA_CHANGE_NOTICES);
    post_aer(&mut admin);
    set_state(&p.t, p.t.port, AnaState::Inaccessible, 2);
    let ev = aer_event(&mut admin, Duration::from_secs(5)).expect("ANA change notice");
    assert_eq!((ev.event_type, ev.info, ev.log_page), (2, 0x03, 0x0C));
    let (cnt1, groups) = ana_log(&mut admin, false);
    assert!(cnt1 > cnt0, "the change count moves: {cnt0} -> {cnt1}");
    assert_eq!(groups, vec![(1, ana_state::OPTIMIZED, vec![1]), (2, ana_state::INACCESSIBLE, vec![2])]);
    // Without DNR (Status equality includes it): the host may retry on another path.
    assert_eq!(read_status(&mut io, 2), Status::ANA_INACCESSIBLE);
    assert!(read_status(&mut io, 1).is_success());

    // The other path is unaffected, and a change there does not notify
    // this controller.
    let (mut admin_b, mut io_b) = connect(p.port_b, HOSTNQN);
    assert_eq!(ana_log(&mut admin_b, false).1[1], (2, ana_state::OPTIMIZED, vec![2]));
    assert!(read_status(&mut io_b, 2).is_success());
    post_aer(&mut admin);
    set_state(&p.t, p.port_b, AnaState::NonOptimized, 0);
    assert_eq!(aer_event(&mut admin, Duration::from_millis(200)), None);
    assert_eq!(ana_log(&mut admin_b, false).1[0], (1, ana_state::NON_OPTIMIZED, vec![1]));
    assert!(read_status(&mut io_b, 1).is_success(), "non-optimized still serves IO");

    // Back to optimized (all groups): the parked AER fires, IO runs again.
    set_state(&p.t, p.t.port, AnaState::Optimized, 0);
    assert!(aer_event(&mut admin, Duration::from_secs(5)).is_some());
    assert!(read_status(&mut io, 2).is_success());

    // Moving NSID 2 to group 5 shows in Identify and the log.
    let t = &p.t;
    t.set.call(0, || NvmfState::get().set_ns_ana_group(NQN, 2, 5).unwrap());
    let ns2 = IdentifyNamespace::read_from_bytes(&identify(&mut admin, Cns::NAMESPACE, 2)).unwrap();
    assert_eq!(ns2.anagrpid.get(), 5);
    let (_, groups) = ana_log(&mut admin, false);
    assert_eq!(groups.iter().map(|g| g.0).collect::<Vec<_>>(), vec![1, 5]);
    t.set.call(0, || {
        let st = NvmfState::get();
        assert!(st.set_ns_ana_group(NQN, 2, 0).is_err());
        assert!(st.set_ns_ana_group(NQN, 2, MAX_NS + 1).is_err());
        assert!(st.set_ana_state(NQN, &addr(1), AnaState::Optimized, 0).is_err(), "no such listener");
    });
}

#[test]
fn io_queue_must_share_the_admin_queue_listener_with_ana() {
    let p = start(true);
    let mut prm = params(p.t.port);
    prm.kato_ms = 0;
    let s = host::connect(&prm, 1).unwrap();
    // Another IO queue through the admin queue's listener is fine...
    assert!(host::connect_queue(&prm, 2, 32, s.info.cntlid, [0; 16]).is_ok());
    // ...through the other listener it is refused: the controller's ANA
    // states are those of one path.
    let mut other = params(p.port_b);
    other.hostnqn = prm.hostnqn.clone();
    assert!(host::connect_queue(&other, 3, 32, s.info.cntlid, [0; 16]).is_err());
}

#[test]
fn without_ana_reporting_there_is_no_ana_log_and_no_state_to_set() {
    let p = start(false);
    let (mut admin, mut io) = connect(p.t.port, HOSTNQN);
    let id = IdentifyController::read_from_bytes(&identify(&mut admin, Cns::CONTROLLER, 0)).unwrap();
    assert_eq!(id.cmic & cmic::ANA_REPORTING, 0);
    assert_eq!(id.anagrpmax.get(), 0);
    assert_eq!(
        get_log(&mut admin, LogPageId::ASYMMETRIC_NAMESPACE_ACCESS, 0, 512),
        Err(Status::INVALID_LOG_PAGE.with_dnr())
    );
    let port = p.t.port;
    p.t.set.call(0, move || {
        let st = NvmfState::get();
        assert!(st.set_ana_state(NQN, &addr(port), AnaState::Inaccessible, 0).is_err());
        let extra = ListenAddr::new("127.0.0.1", &free_port().to_string());
        assert!(st.add_listener_ana(NQN, extra, AnaState::Inaccessible).is_err());
    });
    assert!(read_status(&mut io, 2).is_success());
}

#[test]
fn a_namespace_not_auto_visible_is_shown_only_to_added_hosts() {
    let p = start(true);
    let (mut admin, mut io) = connect(p.t.port, HOSTNQN);
    let (mut other_admin, _) = connect(p.t.port, OTHER_HOST);
    assert_eq!(active_nsids(&mut admin), vec![1, 2]);
    // A hidden NSID reads as an inactive one; IO to it is Invalid Namespace.
    assert!(identify(&mut admin, Cns::NAMESPACE, 3).iter().all(|&b| b == 0));
    assert_eq!(read_status(&mut io, 3), Status::INVALID_NAMESPACE_OR_FORMAT.with_dnr());

    enable_notices(&mut admin, async_event_config::NAMESPACE_ATTRIBUTE_NOTICES);
    enable_notices(&mut other_admin, async_event_config::NAMESPACE_ATTRIBUTE_NOTICES);
    post_aer(&mut admin);
    post_aer(&mut other_admin);
    p.t.set.call(0, || NvmfState::get().ns_set_host_visible(NQN, 3, HOSTNQN, true).unwrap());
    let ev = aer_event(&mut admin, Duration::from_secs(5)).expect("namespace attribute notice");
    assert_eq!((ev.event_type, ev.info, ev.log_page), (2, 0x00, 0x04));
    assert_eq!(aer_event(&mut other_admin, Duration::from_millis(200)), None, "the other host's view did not change");
    let changed = get_log(&mut admin, LogPageId::CHANGED_NAMESPACE_LIST, 0, 4096).unwrap();
    assert_eq!(&changed[..8], &[3, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(active_nsids(&mut admin), vec![1, 2, 3]);
    assert_eq!(active_nsids(&mut other_admin), vec![1, 2]);
    assert!(read_status(&mut io, 3).is_success());
    assert_eq!(ana_log(&mut admin, false).1[1], (2, ana_state::OPTIMIZED, vec![2, 3]));

    // Hidden again.
    post_aer(&mut admin);
    p.t.set.call(0, || NvmfState::get().ns_set_host_visible(NQN, 3, HOSTNQN, false).unwrap());
    assert!(aer_event(&mut admin, Duration::from_secs(5)).is_some());
    assert_eq!(active_nsids(&mut admin), vec![1, 2]);
    assert_eq!(read_status(&mut io, 3), Status::INVALID_NAMESPACE_OR_FORMAT.with_dnr());

    p.t.set.call(0, || {
        let st = NvmfState::get();
        // An auto-visible namespace has no per-host control; bad NSIDs and NQNs are refused.
        assert!(st.ns_set_host_visible(NQN, 1, HOSTNQN, true).is_err());
        assert!(st.ns_set_host_visible(NQN, 9, HOSTNQN, true).is_err());
        assert!(st.ns_set_host_visible(NQN, 3, "not-an-nqn", true).is_err());
    });
}

/// A bdev resized under a namespace: the host that enabled namespace
/// attribute notices gets one with the namespace in the Changed Namespace
/// List, Identify Namespace then reports the new NSZE/NCAP, and IO past
/// the old end succeeds on the queue pair opened before the resize. A
/// shrink of the bdev while the namespace holds it is refused (EBUSY).
#[test]
fn a_resized_bdev_is_reported_to_hosts_of_its_namespace() {
    let p = start(false);
    let nsid = p.t.set.call(0, || {
        let b = bdev::malloc::NullBdev::new(BdevProps::new("Null0", "Null disk", 512, 2048, None)).unwrap();
        Registry::get().register(Arc::new(b)).unwrap();
        NvmfState::get().add_ns(NQN, "Null0", 0, None, None).unwrap()
    });
    let (mut admin, mut io) = connect(p.t.port, HOSTNQN);
    let nsze = |admin: &mut HostQpair| {
        let id = IdentifyNamespace::read_from_bytes(&identify(admin, Cns::NAMESPACE, nsid)).unwrap();
        (id.nsze.get(), id.ncap.get())
    };
    assert_eq!(nsze(&mut admin), (2048, 2048));
    let read_at = |io: &mut HostQpair, lba: u64| {
        io.read(nsid, lba, 8, DmaBuf::alloc(4096).unwrap(), 9).unwrap();
        wait(io, 1).pop().unwrap().status
    };
    assert_eq!(read_at(&mut io, 3000), Status::LBA_OUT_OF_RANGE.with_dnr());
    enable_notices(&mut admin, async_event_config::NAMESPACE_ATTRIBUTE_NOTICES);
    post_aer(&mut admin);

    let r = p.t.set.call(0, || Registry::get().lookup("Null0").unwrap().notify_blockcnt_change(4096));
    assert_eq!(r, Ok(()));
    let ev = aer_event(&mut admin, Duration::from_secs(5)).expect("namespace attribute notice after the resize");
    assert_eq!((ev.event_type, ev.info, ev.log_page), (2, 0x00, 0x04));
    let changed = get_log(&mut admin, LogPageId::CHANGED_NAMESPACE_LIST, 0, 4096).unwrap();
    assert_eq!(&changed[..8], &[nsid as u8, 0, 0, 0, 0, 0, 0, 0], "the resized namespace is listed");
    assert_eq!(nsze(&mut admin), (4096, 4096), "Identify Namespace shows the new size");
    assert!(read_at(&mut io, 3000).is_success(), "IO past the old end on an existing queue pair");
    assert_eq!(read_at(&mut io, 4095), Status::LBA_OUT_OF_RANGE.with_dnr());

    let shrink = p.t.set.call(0, || Registry::get().lookup("Null0").unwrap().notify_blockcnt_change(1024));
    assert_eq!(shrink.map_err(|e| e.errno()), Err(libc::EBUSY), "no shrink under an open namespace");
    assert_eq!(nsze(&mut admin), (4096, 4096));
}
