//! Persistent reservations through the real daemon: a namespace added
//! with SPDK's client and `--ptpl-file`, two hosts registering and one
//! holding Write Exclusive, `save_config` carrying the file, and a restart
//! from that config where the reservation is back before any host speaks.

mod common;
use common::*;
use mgmt::bdev::DmaBuf;
use mgmt::nvmf::host::{self, ConnectParams, Data, HostQpair};
use nvme_spec::reservation::{cptpl, racqa, rrega, rtype, ReservationCdw10, REPORT_EDS};
use nvme_spec::{IoOpcode, Sqe, Status, U32};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";
const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-00000000000a";
const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-0000-0000-00000000000b";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A host's controller: its admin queue (kept, or the controller ends)
/// and one IO queue.
struct Ctrl {
    _admin: HostQpair,
    io: HostQpair,
}

fn io_queue(port: &str, hostnqn: &str, hostid: [u8; 16]) -> Ctrl {
    let mut p = ConnectParams::new("127.0.0.1", port, NQN);
    p.hostnqn = hostnqn.into();
    p.hostid = Some(hostid);
    p.kato_ms = 0;
    let s = host::connect(&p, 1).unwrap_or_else(|e| panic!("connect: {e}"));
    Ctrl { _admin: HostQpair::from_parts(s.admin), io: HostQpair::from_parts(s.io.into_iter().next().unwrap()) }
}

fn run(qp: &mut HostQpair, sqe: Sqe, data: Data) -> (Status, Option<DmaBuf>) {
    qp.submit(sqe, data, 1).unwrap();
    let mut got = None;
    let t0 = Instant::now();
    while got.is_none() {
        qp.poll(|c| got = Some((c.status, c.buf))).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(10), "no completion");
    }
    got.unwrap()
}

fn resv(qp: &mut HostQpair, op: IoOpcode, c: ReservationCdw10, k1: u64, k2: u64) -> Status {
    let d = DmaBuf::zeroed(16).unwrap();
    d.copy_from(0, &k1.to_le_bytes());
    d.copy_from(8, &k2.to_le_bytes());
    let mut sqe = Sqe::new(op.0, 0);
    sqe.nsid = U32::new(1);
    sqe.cdw10 = U32::new(c.to_dword());
    run(qp, sqe, Data::Out(d)).0
}

fn write(qp: &mut HostQpair) -> Status {
    qp.write(1, 0, 8, DmaBuf::zeroed(4096).unwrap(), 1).unwrap();
    let mut got = None;
    let t0 = Instant::now();
    while got.is_none() {
        qp.poll(|c| got = Some(c.status)).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(10), "no completion");
    }
    got.unwrap()
}

/// Reservation Report (extended): (rtype, PTPLS, registrant count).
fn report(qp: &mut HostQpair) -> (u8, u8, u16) {
    let mut sqe = Sqe::new(IoOpcode::RESERVATION_REPORT.0, 0);
    sqe.nsid = U32::new(1);
    sqe.cdw10 = U32::new(4096 / 4 - 1);
    sqe.cdw11 = U32::new(REPORT_EDS);
    let (st, buf) = run(qp, sqe, Data::In(DmaBuf::zeroed(4096).unwrap()));
    assert!(st.is_success(), "{st:?}");
    let b = buf.unwrap().to_vec();
    (b[4], b[9], u16::from_le_bytes([b[5], b[6]]))
}

#[test]
fn ptpl_file_from_spdk_client_survives_save_config_and_restart() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("nvmf-resv");
    let ptpl = dir.join("cnode1-ns1.json");
    let mut d = Daemon::start(&dir, &[]);
    let s = d.sock.clone();
    let port = free_port().to_string();
    let sp = |args: &[&str]| spdk_ok(&rpc, &s, args);
    sp(&["bdev_malloc_create", "-b", "Malloc0", "8", "512"]);
    sp(&["nvmf_create_transport", "-t", "TCP"]);
    sp(&["nvmf_create_subsystem", NQN, "-a"]);
    sp(&["nvmf_subsystem_add_ns", NQN, "Malloc0", "-p", ptpl.to_str().unwrap()]);
    sp(&["nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", &port]);
    let ns = &sp(&["nvmf_get_subsystems", NQN])[0]["namespaces"][0];
    assert_eq!(ns["ptpl_file"], json!(ptpl.to_str().unwrap()));

    let (id_a, id_b) = ([0xA1; 16], [0xB2; 16]);
    let mut a = io_queue(&port, HOST_A, id_a);
    let mut b = io_queue(&port, HOST_B, id_b);
    let reg = |cp| ReservationCdw10 { action: rrega::REGISTER, iekey: false, rtype: 0, cptpl: cp };
    assert_eq!(resv(&mut a.io, IoOpcode::RESERVATION_REGISTER, reg(cptpl::SET), 0, 0x1111), Status::SUCCESS);
    assert_eq!(resv(&mut b.io, IoOpcode::RESERVATION_REGISTER, reg(cptpl::NO_CHANGE), 0, 0x2222), Status::SUCCESS);
    let acq = ReservationCdw10 { action: racqa::ACQUIRE, iekey: false, rtype: rtype::WRITE_EXCLUSIVE, cptpl: 0 };
    assert_eq!(resv(&mut a.io, IoOpcode::RESERVATION_ACQUIRE, acq, 0x1111, 0), Status::SUCCESS);
    assert_eq!(write(&mut b.io), Status::RESERVATION_CONFLICT);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&ptpl).unwrap()).unwrap();
    assert_eq!((doc["ptpl"].clone(), doc["rtype"].clone()), (json!(true), json!(1)));
    drop((a, b));

    let saved = spdk_rpc(&rpc, &s, &["save_config"]);
    assert!(saved.status.success(), "{}", String::from_utf8_lossy(&saved.stderr));
    let cfg_path = dir.join("saved.json");
    std::fs::write(&cfg_path, &saved.stdout).unwrap();
    d.stop();

    // A restart from the saved config: the reservation is back at once.
    let d2 = Daemon::start(&dir, &["-c", cfg_path.to_str().unwrap()]);
    let mut b = io_queue(&port, HOST_B, id_b);
    assert_eq!(write(&mut b.io), Status::RESERVATION_CONFLICT, "A's write exclusive came back from the file");
    assert_eq!(report(&mut b.io), (rtype::WRITE_EXCLUSIVE, 1, 2));
    let mut a = io_queue(&port, HOST_A, id_a);
    assert_eq!(write(&mut a.io), Status::SUCCESS);
    drop(d2);
}
