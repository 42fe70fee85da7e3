//! IO through the target while a reservation is held allocates nothing:
//! the holder's reads and writes, another host's reads, and its writes
//! that end with Reservation Conflict. A counting global allocator (this
//! test binary only, every thread counted) watches the steady state.

mod common;
#[path = "../../bdev/tests/support/counting_alloc.rs"]
mod counting_alloc;
use bdev::malloc::MallocBdev;
use bdev::{BdevProps, DmaBuf, Registry};
use common::*;
use nvme_spec::reservation::{racqa, rrega, rtype, ReservationCdw10};
use nvme_spec::{IoOpcode, Sqe, Status, U32};
use nvmf::host::{self, Data, HostQpair};
use nvmf::{ListenAddr, NvmfState, SubsystemParams, TransportOpts};
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-000000000001";
const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-0000-0000-000000000002";
const CONFLICT: Status = Status::RESERVATION_CONFLICT;

fn start() -> Target {
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0, 1], IdlePolicy::sleep()) };
    let set = ReactorSet::start(cfg, || {}).unwrap();
    let port = free_port();
    set.call(0, move || {
        let m = MallocBdev::new(BdevProps::new("Malloc0", "Malloc disk", 512, 2048, None)).unwrap();
        Registry::get().register(Arc::new(m)).unwrap();
        let st = NvmfState::get();
        st.create_transport(TransportOpts::default()).unwrap();
        let mut p = SubsystemParams::new(NQN);
        p.allow_any_host = true;
        st.create_subsystem(p).unwrap();
        st.add_ns(NQN, "Malloc0", 0, None, None).unwrap();
        st.add_listener(NQN, ListenAddr::new("127.0.0.1", &port.to_string())).unwrap();
    });
    Target { set, port }
}

struct Host {
    _admin: HostQpair,
    io: HostQpair,
}

fn connect(port: u16, hostnqn: &str, hostid: [u8; 16]) -> Host {
    let mut p = params(port);
    p.kato_ms = 0;
    p.hostnqn = hostnqn.into();
    p.hostid = Some(hostid);
    let s = host::connect(&p, 1).unwrap_or_else(|e| panic!("connect: {e}"));
    Host { _admin: HostQpair::from_parts(s.admin), io: HostQpair::from_parts(s.io.into_iter().next().unwrap()) }
}

fn resv(io: &mut HostQpair, op: IoOpcode, c: ReservationCdw10, k1: u64, k2: u64) -> Status {
    let d = DmaBuf::zeroed(16).unwrap();
    d.copy_from(0, &k1.to_le_bytes());
    d.copy_from(8, &k2.to_le_bytes());
    let mut sqe = Sqe::new(op.0, 0);
    sqe.nsid = U32::new(1);
    sqe.cdw10 = U32::new(c.to_dword());
    command(io, sqe, Data::Out(d)).status
}

#[test]
fn io_under_a_held_reservation_allocates_nothing() {
    let t = start();
    let mut a = connect(t.port, HOST_A, [0xA; 16]);
    let mut b = connect(t.port, HOST_B, [0xB; 16]);
    let reg = ReservationCdw10 { action: rrega::REGISTER, iekey: false, rtype: 0, cptpl: 0 };
    assert_eq!(resv(&mut a.io, IoOpcode::RESERVATION_REGISTER, reg, 0, 0xA), Status::SUCCESS);
    let acq = ReservationCdw10 { action: racqa::ACQUIRE, iekey: false, rtype: rtype::WRITE_EXCLUSIVE, cptpl: 0 };
    assert_eq!(resv(&mut a.io, IoOpcode::RESERVATION_ACQUIRE, acq, 0xA, 0), Status::SUCCESS);
    let buf = DmaBuf::zeroed(4096).unwrap();
    // One command at a time, polled without collecting into anything.
    let run = |qp: &mut HostQpair, write: bool| -> Status {
        if write { qp.write(1, 0, 8, buf.clone(), 1) } else { qp.read(1, 0, 8, buf.clone(), 1) }.unwrap();
        let mut st = None;
        let t0 = Instant::now();
        while st.is_none() {
            qp.poll(|c| st = Some(c.status)).unwrap();
            assert!(t0.elapsed() < Duration::from_secs(10), "no completion");
        }
        st.unwrap()
    };
    let mut round = |i: u32| {
        assert_eq!(run(&mut a.io, i.is_multiple_of(2)), Status::SUCCESS);
        assert_eq!(run(&mut b.io, true), CONFLICT);
        assert_eq!(run(&mut b.io, false), Status::SUCCESS);
    };
    for i in 0..300 {
        round(i);
    }
    let before = counting_alloc::allocations_all_threads();
    for i in 0..2000 {
        round(i);
    }
    let n = counting_alloc::allocations_all_threads() - before;
    // Runtime noise only (a reactor's sleep, a lazily grown table).
    assert!(n <= 16, "{n} allocations over 6000 commands under a reservation");
}
