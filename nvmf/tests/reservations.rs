//! NVMe reservations on the target, driven by two (and three) hosts with
//! their own host NQNs and Host Identifiers over raw fabrics commands:
//! Register, Acquire, Preempt, Release, Clear, Report (extended data
//! structure, exact bytes), reservation conflicts on IO per the type's
//! access rules, a host's second controller sharing its registration,
//! Reservation Notification log pages with their AEN, the notification
//! mask, and the state kept through a restart in the `ptpl_file`.

mod common;
use bdev::malloc::MallocBdev;
use bdev::{BdevProps, DmaBuf, Registry};
use common::*;
use nvme_spec::features::{AsyncEvent, FeatureId, FeatureParams};
use nvme_spec::identify::{oncs, Cns, IdentifyController, IdentifyNamespace, IdentifyParams};
use nvme_spec::log::{GetLogPageParams, LogPageId};
use nvme_spec::reservation::{
    cptpl, notification, notification_mask, racqa, rescap, rrega, rrela, rtype, ReservationCdw10,
    ReservationNotificationLog, REPORT_EDS,
};
use nvme_spec::{AdminOpcode, IoOpcode, Sqe, Status, U32};
use nvmf::host::{self, Data, HostQpair};
use nvmf::{ListenAddr, NsOptions, NvmfState, SubsystemParams, TransportOpts};
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;
use zerocopy::FromBytes;

const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-000000000001";
const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-0000-0000-000000000002";
const HOST_C: &str = "nqn.2014-08.org.nvmexpress:uuid:cccccccc-0000-0000-0000-000000000003";
const ID_A: [u8; 16] = [0xA; 16];
const ID_B: [u8; 16] = [0xB; 16];
const ID_C: [u8; 16] = [0xC; 16];
const BDEV_UUID: Uuid = Uuid::from_bytes([0x5A; 16]);

/// A target on two reactors with one malloc namespace (NSID 1), added
/// with `ptpl_file` when given.
fn start(ptpl_file: Option<PathBuf>) -> Target {
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0, 1], IdlePolicy::sleep()) };
    let set = ReactorSet::start(cfg, || {}).unwrap();
    let port = free_port();
    set.call(0, move || {
        let m = MallocBdev::new(BdevProps::new("Malloc0", "Malloc disk", 512, 2048, Some(BDEV_UUID))).unwrap();
        Registry::get().register(Arc::new(m)).unwrap();
        let st = NvmfState::get();
        st.create_transport(TransportOpts::default()).unwrap();
        let mut p = SubsystemParams::new(NQN);
        p.allow_any_host = true;
        st.create_subsystem(p).unwrap();
        assert_eq!(st.add_ns_with(NQN, "Malloc0", NsOptions { ptpl_file, ..NsOptions::default() }).unwrap(), 1);
        st.add_listener(NQN, ListenAddr::new("127.0.0.1", &port.to_string())).unwrap();
    });
    Target { set, port }
}

struct Host {
    admin: HostQpair,
    io: HostQpair,
}

fn connect(port: u16, hostnqn: &str, hostid: [u8; 16]) -> Host {
    let mut p = params(port);
    p.kato_ms = 0;
    p.hostnqn = hostnqn.into();
    p.hostid = Some(hostid);
    let s = host::connect(&p, 1).unwrap_or_else(|e| panic!("connect: {e}"));
    Host { admin: HostQpair::from_parts(s.admin), io: HostQpair::from_parts(s.io.into_iter().next().unwrap()) }
}

fn keys(a: u64, b: u64) -> DmaBuf {
    let d = DmaBuf::zeroed(16).unwrap();
    d.copy_from(0, &a.to_le_bytes());
    d.copy_from(8, &b.to_le_bytes());
    d
}

fn resv_cmd(io: &mut HostQpair, op: IoOpcode, c: ReservationCdw10, data: DmaBuf) -> Status {
    let mut sqe = Sqe::new(op.0, 0);
    sqe.nsid = U32::new(1);
    sqe.cdw10 = U32::new(c.to_dword());
    command(io, sqe, Data::Out(data)).status
}

fn register(io: &mut HostQpair, action: u8, iekey: bool, cp: u8, crkey: u64, nrkey: u64) -> Status {
    let c = ReservationCdw10 { action, iekey, rtype: 0, cptpl: cp };
    resv_cmd(io, IoOpcode::RESERVATION_REGISTER, c, keys(crkey, nrkey))
}

fn acquire(io: &mut HostQpair, action: u8, t: u8, crkey: u64, prkey: u64) -> Status {
    let c = ReservationCdw10 { action, iekey: false, rtype: t, cptpl: 0 };
    resv_cmd(io, IoOpcode::RESERVATION_ACQUIRE, c, keys(crkey, prkey))
}

fn release(io: &mut HostQpair, action: u8, t: u8, crkey: u64) -> Status {
    let c = ReservationCdw10 { action, iekey: false, rtype: t, cptpl: 0 };
    let d = DmaBuf::zeroed(8).unwrap();
    d.copy_from(0, &crkey.to_le_bytes());
    resv_cmd(io, IoOpcode::RESERVATION_RELEASE, c, d)
}

/// Reservation Report: (generation, rtype, ptpls, [(cntlid, holds, rkey, hostid)]).
type Report = (u32, u8, u8, Vec<(u16, bool, u64, [u8; 16])>);

fn report_raw(io: &mut HostQpair, eds: bool) -> Result<Vec<u8>, Status> {
    let mut sqe = Sqe::new(IoOpcode::RESERVATION_REPORT.0, 0);
    sqe.nsid = U32::new(1);
    sqe.cdw10 = U32::new(4096 / 4 - 1);
    sqe.cdw11 = U32::new(if eds { REPORT_EDS } else { 0 });
    let c = command(io, sqe, Data::In(DmaBuf::zeroed(4096).unwrap()));
    if c.status.is_success() {
        Ok(c.buf.unwrap().to_vec())
    } else {
        Err(c.status)
    }
}

fn report(io: &mut HostQpair) -> Report {
    let b = report_raw(io, true).unwrap();
    let gen = u32::from_le_bytes(b[0..4].try_into().unwrap());
    let regctl = u16::from_le_bytes([b[5], b[6]]) as usize;
    assert!(b[10..64].iter().all(|&x| x == 0), "reserved bytes of the header are zero");
    let regs = (0..regctl)
        .map(|i| {
            let e = &b[64 + i * 64..128 + i * 64];
            assert!(e[3..8].iter().chain(&e[32..64]).all(|&x| x == 0), "reserved bytes of an entry are zero");
            let cntlid = u16::from_le_bytes([e[0], e[1]]);
            let rkey = u64::from_le_bytes(e[8..16].try_into().unwrap());
            (cntlid, e[2] & 1 != 0, rkey, e[16..32].try_into().unwrap())
        })
        .collect();
    (gen, b[4], b[9], regs)
}

fn io_status(io: &mut HostQpair, op: IoOpcode) -> Status {
    match op {
        IoOpcode::READ => io.read(1, 0, 8, DmaBuf::alloc(4096).unwrap(), 7).unwrap(),
        IoOpcode::WRITE => io.write(1, 0, 8, DmaBuf::zeroed(4096).unwrap(), 7).unwrap(),
        _ => {
            // Write Zeroes of 8 blocks (NLB 0's based) or Flush.
            let mut sqe = Sqe::new(op.0, 0);
            sqe.nsid = U32::new(1);
            sqe.cdw12 = U32::new(7);
            io.submit(sqe, Data::None, 7).unwrap();
        }
    }
    wait(io, 1).pop().unwrap().status
}

fn post_aer(admin: &mut HostQpair) {
    admin.submit(Sqe::new(AdminOpcode::ASYNC_EVENT_REQUEST.0, 0), Data::None, 0xAE).unwrap();
}

fn aer_event(admin: &mut HostQpair, limit: Duration) -> Option<AsyncEvent> {
    let t0 = Instant::now();
    let mut got = None;
    while got.is_none() && t0.elapsed() < limit {
        admin.poll(|c| got = Some(c)).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    got.map(|c| {
        assert_eq!(c.tag, 0xAE);
        AsyncEvent::from_dword(c.dw0)
    })
}

/// Reads one Reservation Notification log page: (count, type, available, nsid).
fn notice_log(admin: &mut HostQpair) -> (u64, u8, u8, u32) {
    let mut sqe = Sqe::new(AdminOpcode::GET_LOG_PAGE.0, 0);
    let lid = LogPageId::RESERVATION_NOTIFICATION;
    GetLogPageParams { lid, lsp: 0, rae: false, len_bytes: 64, offset_bytes: 0, lsi: 0, nsid: 0xFFFF_FFFF }
        .write_to(&mut sqe);
    let c = command(admin, sqe, Data::In(DmaBuf::zeroed(64).unwrap()));
    assert!(c.status.is_success(), "{:?}", c.status);
    let l = ReservationNotificationLog::read_from_bytes(&c.buf.unwrap().to_vec()).unwrap();
    (l.log_page_count.get(), l.rnlpt, l.nalp, l.nsid.get())
}

fn identify(admin: &mut HostQpair, cns: Cns, nsid: u32) -> Vec<u8> {
    let mut sqe = Sqe::new(AdminOpcode::IDENTIFY.0, 0);
    IdentifyParams { cns, cntid: 0, csi: 0, nsid }.write_to(&mut sqe);
    let c = command(admin, sqe, Data::In(DmaBuf::zeroed(4096).unwrap()));
    assert!(c.status.is_success());
    c.buf.unwrap().to_vec()
}

fn set_feature(admin: &mut HostQpair, fid: FeatureId, nsid: u32, value: u32) -> Status {
    let mut sqe = Sqe::new(AdminOpcode::SET_FEATURES.0, 0);
    sqe.nsid = U32::new(nsid);
    FeatureParams { fid, save: false, select: 0, value }.write_to(&mut sqe);
    command(admin, sqe, Data::None).status
}

fn get_feature(admin: &mut HostQpair, fid: FeatureId, nsid: u32) -> (Status, u32) {
    let mut sqe = Sqe::new(AdminOpcode::GET_FEATURES.0, 0);
    sqe.nsid = U32::new(nsid);
    FeatureParams { fid, save: false, select: 0, value: 0 }.write_to(&mut sqe);
    let c = command(admin, sqe, Data::None);
    (c.status, c.dw0)
}

const CONFLICT: Status = Status::RESERVATION_CONFLICT;

#[test]
fn write_exclusive_preempt_release_and_notifications_between_two_hosts() {
    let t = start(None);
    let mut a = connect(t.port, HOST_A, ID_A);
    let mut b = connect(t.port, HOST_B, ID_B);

    let idc = IdentifyController::read_from_bytes(&identify(&mut a.admin, Cns::CONTROLLER, 0)).unwrap();
    assert_ne!(idc.oncs.get() & oncs::RESERVATIONS, 0);
    let idn = IdentifyNamespace::read_from_bytes(&identify(&mut a.admin, Cns::NAMESPACE, 1)).unwrap();
    assert_eq!(idn.rescap, 0xFE, "types 1-6 and IEKEY; no PTPL without a ptpl_file");

    // Register: A 0xA, B 0xB. Registering again with another key conflicts;
    // with the same key it is no change; key 0 is invalid.
    assert_eq!(register(&mut a.io, rrega::REGISTER, false, cptpl::NO_CHANGE, 0, 0xA), Status::SUCCESS);
    assert_eq!(register(&mut a.io, rrega::REGISTER, false, cptpl::NO_CHANGE, 0, 0xA1), CONFLICT);
    assert_eq!(register(&mut a.io, rrega::REGISTER, false, cptpl::NO_CHANGE, 0, 0xA), Status::SUCCESS);
    assert_eq!(register(&mut b.io, rrega::REGISTER, false, cptpl::NO_CHANGE, 0, 0), Status::INVALID_FIELD.with_dnr());
    assert_eq!(register(&mut b.io, rrega::REGISTER, false, cptpl::NO_CHANGE, 0, 0xB), Status::SUCCESS);
    // PTPL cannot be set without a ptpl_file.
    assert_eq!(register(&mut b.io, rrega::REPLACE, false, cptpl::SET, 0xB, 0xB), Status::INVALID_FIELD.with_dnr());

    // A acquires Write Exclusive; B cannot, nor can A with a wrong key.
    assert_eq!(acquire(&mut a.io, racqa::ACQUIRE, rtype::WRITE_EXCLUSIVE, 0xA, 0), Status::SUCCESS);
    assert_eq!(acquire(&mut b.io, racqa::ACQUIRE, rtype::WRITE_EXCLUSIVE, 0xB, 0), CONFLICT);
    assert_eq!(acquire(&mut a.io, racqa::ACQUIRE, rtype::WRITE_EXCLUSIVE, 0xAA, 0), CONFLICT);
    assert_eq!(acquire(&mut a.io, racqa::ACQUIRE, 7, 0xA, 0), Status::INVALID_FIELD.with_dnr());

    // B reads, but its writes (and write zeroes, flush) conflict; A writes.
    assert_eq!(io_status(&mut b.io, IoOpcode::READ), Status::SUCCESS);
    for op in [IoOpcode::WRITE, IoOpcode::WRITE_ZEROES, IoOpcode::FLUSH] {
        assert_eq!(io_status(&mut b.io, op), CONFLICT, "B {op:?} under A's write exclusive");
    }
    assert_eq!(io_status(&mut a.io, IoOpcode::WRITE), Status::SUCCESS);
    // A second controller of host A shares its registration and reservation.
    let mut a2 = connect(t.port, HOST_A, ID_A);
    assert_eq!(io_status(&mut a2.io, IoOpcode::WRITE), Status::SUCCESS);
    assert_eq!(release(&mut a2.io, rrela::RELEASE, rtype::EXCLUSIVE_ACCESS, 0xA), Status::INVALID_FIELD.with_dnr());

    // Report: the regular structure cannot carry 128-bit host IDs.
    assert_eq!(report_raw(&mut b.io, false), Err(Status::HOST_ID_INCONSISTENT_FORMAT.with_dnr()));
    let (gen, t1, ptpls, regs) = report(&mut b.io);
    assert_eq!((gen, t1, ptpls), (2, rtype::WRITE_EXCLUSIVE, 0), "two registrations so far");
    assert_eq!(regs.len(), 2);
    assert_eq!((regs[0].1, regs[0].2, regs[0].3), (true, 0xA, ID_A));
    assert_eq!((regs[1].1, regs[1].2, regs[1].3), (false, 0xB, ID_B));
    assert_ne!(regs[0].0, 0xFFFF, "a connected host's entry names one of its controllers");

    // B preempts A into Exclusive Access: A's registration goes, A hears
    // of it (AEN, then the log page), and can neither read nor write.
    post_aer(&mut a.admin);
    assert_eq!(acquire(&mut b.io, racqa::PREEMPT, rtype::EXCLUSIVE_ACCESS, 0xB, 0xA), Status::SUCCESS);
    let ev = aer_event(&mut a.admin, Duration::from_secs(5)).expect("reservation notice");
    assert_eq!((ev.event_type, ev.info, ev.log_page), (6, 0, 0x80));
    assert_eq!(notice_log(&mut a.admin), (1, notification::REGISTRATION_PREEMPTED, 0, 1));
    assert_eq!(notice_log(&mut a.admin), (0, notification::EMPTY, 0, 0), "the page was taken");
    assert_eq!(notice_log(&mut a2.admin).1, notification::REGISTRATION_PREEMPTED, "every controller of A");
    assert_eq!(io_status(&mut a.io, IoOpcode::WRITE), CONFLICT);
    assert_eq!(io_status(&mut a.io, IoOpcode::READ), CONFLICT);
    assert_eq!(io_status(&mut b.io, IoOpcode::WRITE), Status::SUCCESS);
    assert_eq!(release(&mut a.io, rrela::RELEASE, rtype::EXCLUSIVE_ACCESS, 0xA), CONFLICT, "A is no registrant");
    let (gen, t2, _, regs) = report(&mut a.io);
    assert_eq!((gen, t2, regs.len()), (3, rtype::EXCLUSIVE_ACCESS, 1));
    assert_eq!((regs[0].1, regs[0].3), (true, ID_B));

    // B releases Exclusive Access: no notice for that type.
    assert_eq!(register(&mut a.io, rrega::REGISTER, false, cptpl::NO_CHANGE, 0, 0xA), Status::SUCCESS);
    assert_eq!(release(&mut b.io, rrela::RELEASE, rtype::WRITE_EXCLUSIVE, 0xB), Status::INVALID_FIELD.with_dnr());
    assert_eq!(release(&mut b.io, rrela::RELEASE, rtype::EXCLUSIVE_ACCESS, 0xB), Status::SUCCESS);
    assert_eq!(notice_log(&mut a.admin).1, notification::EMPTY);
    assert_eq!(io_status(&mut a.io, IoOpcode::WRITE), Status::SUCCESS, "no reservation: everyone writes");

    // Registrants only: B (registrant, not holder) writes, C (stranger)
    // only reads; A's release notifies B.
    let mut c = connect(t.port, HOST_C, ID_C);
    assert_eq!(acquire(&mut a.io, racqa::ACQUIRE, rtype::WRITE_EXCLUSIVE_REG_ONLY, 0xA, 0), Status::SUCCESS);
    assert_eq!(io_status(&mut b.io, IoOpcode::WRITE), Status::SUCCESS);
    assert_eq!(io_status(&mut c.io, IoOpcode::WRITE), CONFLICT);
    assert_eq!(io_status(&mut c.io, IoOpcode::READ), Status::SUCCESS);
    assert_eq!(release(&mut b.io, rrela::RELEASE, rtype::WRITE_EXCLUSIVE_REG_ONLY, 0xB), Status::SUCCESS, "no effect");
    assert_eq!(release(&mut b.io, rrela::RELEASE, rtype::WRITE_EXCLUSIVE, 0xB), Status::INVALID_FIELD.with_dnr());
    let iekey = ReservationCdw10 { action: rrela::RELEASE, iekey: true, rtype: 3, cptpl: 0 };
    let crkey = DmaBuf::zeroed(8).unwrap();
    crkey.copy_from(0, &0xBu64.to_le_bytes());
    assert_eq!(resv_cmd(&mut b.io, IoOpcode::RESERVATION_RELEASE, iekey, crkey), Status::INVALID_FIELD.with_dnr());
    assert_eq!(io_status(&mut c.io, IoOpcode::WRITE), CONFLICT, "B's release did nothing");
    assert_eq!(release(&mut a.io, rrela::RELEASE, rtype::WRITE_EXCLUSIVE_REG_ONLY, 0xA), Status::SUCCESS);
    assert_eq!(notice_log(&mut b.admin), (1, notification::RESERVATION_RELEASED, 0, 1));
    assert_eq!(io_status(&mut c.io, IoOpcode::WRITE), Status::SUCCESS);

    // Masked notifications are not logged; Get Features shows the mask.
    let mask = notification_mask::RESERVATION_PREEMPTED;
    assert_eq!(set_feature(&mut b.admin, FeatureId::RESERVATION_NOTIFICATION_MASK, 1, mask), Status::SUCCESS);
    assert_eq!(get_feature(&mut b.admin, FeatureId::RESERVATION_NOTIFICATION_MASK, 1), (Status::SUCCESS, mask));
    // Exclusive Access All Registrants by A; C is locked out entirely.
    assert_eq!(acquire(&mut a.io, racqa::ACQUIRE, rtype::EXCLUSIVE_ACCESS_ALL_REGS, 0xA, 0), Status::SUCCESS);
    assert_eq!(io_status(&mut c.io, IoOpcode::READ), CONFLICT);
    assert_eq!(io_status(&mut b.io, IoOpcode::READ), Status::SUCCESS);
    let (_, _, _, regs) = report(&mut c.io);
    assert!(regs.iter().all(|r| r.1), "every registrant holds an all-registrants reservation");
    // Clear by A: B's "reservation preempted" is masked; C was never registered.
    assert_eq!(release(&mut a.io, rrela::CLEAR, 0, 0xA), Status::SUCCESS);
    assert_eq!(notice_log(&mut b.admin).1, notification::EMPTY);
    assert_eq!(report(&mut c.io).3.len(), 0, "clear drops every registration");
    assert_eq!(io_status(&mut c.io, IoOpcode::READ), Status::SUCCESS);
    // Reservation Persistence without a ptpl_file: off, cannot be set.
    assert_eq!(get_feature(&mut a.admin, FeatureId::RESERVATION_PERSISTENCE, 1), (Status::SUCCESS, 0));
    assert_eq!(set_feature(&mut a.admin, FeatureId::RESERVATION_PERSISTENCE, 1, 1), Status::INVALID_FIELD.with_dnr());
}

#[test]
fn unregister_and_replace_keys() {
    let t = start(None);
    let mut a = connect(t.port, HOST_A, ID_A);
    let mut b = connect(t.port, HOST_B, ID_B);
    assert_eq!(register(&mut a.io, rrega::UNREGISTER, false, 0, 0xA, 0), CONFLICT, "not registered");
    assert_eq!(register(&mut a.io, rrega::REPLACE, false, 0, 0, 0xA), CONFLICT, "not registered");
    assert_eq!(register(&mut a.io, rrega::REPLACE, true, 0, 0, 0xA), Status::SUCCESS, "IEKEY registers");
    assert_eq!(register(&mut a.io, rrega::REPLACE, false, 0, 0x1, 0xA2), CONFLICT, "wrong current key");
    assert_eq!(register(&mut a.io, rrega::REPLACE, false, 0, 0xA, 0xA2), Status::SUCCESS);
    assert_eq!(register(&mut b.io, rrega::REGISTER, false, 0, 0, 0xB), Status::SUCCESS);
    assert_eq!(acquire(&mut a.io, racqa::ACQUIRE, rtype::WRITE_EXCLUSIVE_REG_ONLY, 0xA2, 0), Status::SUCCESS);
    // The holder unregistering ends a registrants-only reservation; B hears of it.
    assert_eq!(register(&mut a.io, rrega::UNREGISTER, false, 0, 0xA, 0), CONFLICT, "old key");
    assert_eq!(register(&mut a.io, rrega::UNREGISTER, false, 0, 0xA2, 0), Status::SUCCESS);
    assert_eq!(notice_log(&mut b.admin).1, notification::RESERVATION_RELEASED);
    let (gen, t0, _, regs) = report(&mut b.io);
    assert_eq!((gen, t0, regs.len()), (4, 0, 1), "register, replace, register, unregister");
    // Preempting without a reservation removes the registrants with PRKEY.
    assert_eq!(register(&mut a.io, rrega::REGISTER, false, 0, 0, 0xA), Status::SUCCESS);
    assert_eq!(acquire(&mut b.io, racqa::PREEMPT_AND_ABORT, rtype::WRITE_EXCLUSIVE, 0xB, 0x77), CONFLICT);
    assert_eq!(acquire(&mut b.io, racqa::PREEMPT, rtype::WRITE_EXCLUSIVE, 0xB, 0xA), Status::SUCCESS);
    assert_eq!(report(&mut b.io).3.len(), 1);
    assert_eq!(notice_log(&mut a.admin).1, notification::REGISTRATION_PREEMPTED);
    assert_eq!(register(&mut a.io, rrega::REGISTER, false, 0, 0, 0xA), Status::SUCCESS);
    // The holder preempting itself changes the type; A stays registered
    // and hears that the old reservation was released.
    assert_eq!(acquire(&mut b.io, racqa::ACQUIRE, rtype::WRITE_EXCLUSIVE, 0xB, 0), Status::SUCCESS);
    assert_eq!(acquire(&mut b.io, racqa::PREEMPT, rtype::EXCLUSIVE_ACCESS, 0xB, 0xB), Status::SUCCESS);
    assert_eq!(notice_log(&mut a.admin).1, notification::RESERVATION_RELEASED);
    let (_, t2, _, regs) = report(&mut a.io);
    assert_eq!((t2, regs.len()), (rtype::EXCLUSIVE_ACCESS, 2));
    // PRKEY 0 against a single holder is an invalid field; IEKEY on Acquire too.
    assert_eq!(acquire(&mut a.io, racqa::PREEMPT, rtype::WRITE_EXCLUSIVE, 0xA, 0), Status::INVALID_FIELD.with_dnr());
    let c = ReservationCdw10 { action: racqa::ACQUIRE, iekey: true, rtype: 1, cptpl: 0 };
    assert_eq!(resv_cmd(&mut a.io, IoOpcode::RESERVATION_ACQUIRE, c, keys(0xA, 0)), Status::INVALID_FIELD.with_dnr());
}

/// A fresh scratch directory for one test.
fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nvraid-resv-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn reservations_persist_through_a_restart_in_the_ptpl_file() {
    let dir = scratch_dir("ptpl");
    let file = dir.join("ns1.json");
    {
        let t = start(Some(file.clone()));
        let mut a = connect(t.port, HOST_A, ID_A);
        let mut b = connect(t.port, HOST_B, ID_B);
        let idn = IdentifyNamespace::read_from_bytes(&identify(&mut a.admin, Cns::NAMESPACE, 1)).unwrap();
        assert_ne!(idn.rescap & rescap::PERSIST_THROUGH_POWER_LOSS, 0);
        assert_eq!(register(&mut a.io, rrega::REGISTER, false, cptpl::SET, 0, 0xA), Status::SUCCESS);
        // The file holds the registration when the command has completed.
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(doc["ptpl"], true);
        assert_eq!(doc["registrants"][0]["rkey"], 0xA);
        assert_eq!(doc["registrants"][0]["host_uuid"], Uuid::from_bytes(ID_A).to_string());
        assert_eq!(register(&mut b.io, rrega::REGISTER, false, cptpl::NO_CHANGE, 0, 0xB), Status::SUCCESS);
        assert_eq!(acquire(&mut a.io, racqa::ACQUIRE, rtype::WRITE_EXCLUSIVE, 0xA, 0), Status::SUCCESS);
        assert_eq!(get_feature(&mut a.admin, FeatureId::RESERVATION_PERSISTENCE, 1), (Status::SUCCESS, 1));
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!((doc["rtype"].as_u64(), doc["crkey"].as_u64()), (Some(1), Some(0xA)));
        assert_eq!(doc["holder_uuid"], Uuid::from_bytes(ID_A).to_string());
        assert_eq!(doc["bdev_uuid"], BDEV_UUID.to_string());
    }
    // A new target (a "power cycle") loads the file: B's writes still
    // conflict before any reservation command, the report shows PTPLS.
    let t = start(Some(file.clone()));
    let mut b = connect(t.port, HOST_B, ID_B);
    assert_eq!(io_status(&mut b.io, IoOpcode::WRITE), CONFLICT);
    let (_, t1, ptpls, regs) = report(&mut b.io);
    assert_eq!((t1, ptpls, regs.len()), (rtype::WRITE_EXCLUSIVE, 1, 2));
    assert_eq!((regs[0].1, regs[0].2, regs[0].3), (true, 0xA, ID_A));
    assert_eq!(regs[0].0, 0xFFFF, "host A has no controller connected");
    // Turning persistence off (Set Features) writes the empty state.
    assert_eq!(set_feature(&mut b.admin, FeatureId::RESERVATION_PERSISTENCE, 1, 0), Status::SUCCESS);
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(doc["ptpl"], false);
    drop(b);
    drop(t);
    let t = start(Some(file));
    let mut b = connect(t.port, HOST_B, ID_B);
    assert_eq!(io_status(&mut b.io, IoOpcode::WRITE), Status::SUCCESS, "nothing persisted");
    assert_eq!(report(&mut b.io).3.len(), 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_ptpl_file_of_another_bdev_is_refused() {
    let dir = scratch_dir("other");
    let file = dir.join("ns.json");
    std::fs::write(&file, r#"{"ptpl": true, "bdev_uuid": "00000000-0000-0000-0000-000000000001"}"#).unwrap();
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0], IdlePolicy::sleep()) };
    let set = ReactorSet::start(cfg, || {}).unwrap();
    let f = file.clone();
    let err = set.call(0, move || {
        let m = MallocBdev::new(BdevProps::new("Malloc0", "Malloc disk", 512, 2048, Some(BDEV_UUID))).unwrap();
        Registry::get().register(Arc::new(m)).unwrap();
        let st = NvmfState::get();
        st.create_transport(TransportOpts::default()).unwrap();
        st.create_subsystem(SubsystemParams::new(NQN)).unwrap();
        st.add_ns_with(NQN, "Malloc0", NsOptions { ptpl_file: Some(f), ..NsOptions::default() }).unwrap_err()
    });
    assert!(err.to_string().contains("belongs to bdev"), "{err}");
    set.stop();
    set.join();
    let _ = std::fs::remove_dir_all(dir);
}
