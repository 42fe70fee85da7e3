//! What the target's admin commands say is derived from the exported bdevs
//! and measured, never claimed: Identify VWC and DLFEAT, the Volatile Write
//! Cache feature (and that turning it off makes every write FUA), the SMART
//! / health log counters, and the transport options it refuses.

mod common;
use bdev::malloc::{MallocBdev, NullBdev};
use bdev::volatile_cache::VolatileCacheBdev;
use bdev::{BdevProps, DmaBuf, Registry};
use common::*;
use nvme_spec::features::{FeatureId, FeatureParams};
use nvme_spec::identify::{vwc, Cns, IdentifyController, IdentifyNamespace, IdentifyParams};
use nvme_spec::log::{GetLogPageParams, LogPageId, SmartLog};
use nvme_spec::{AdminOpcode, Sqe, Status};
use nvmf::host::{Data, HostQpair};
use nvmf::{NvmfState, TransportOpts};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use zerocopy::FromBytes;

fn identify(admin: &mut HostQpair, cns: Cns, nsid: u32) -> Vec<u8> {
    let mut sqe = Sqe::new(AdminOpcode::IDENTIFY.0, 0);
    IdentifyParams { cns, cntid: 0, csi: 0, nsid }.write_to(&mut sqe);
    let c = command(admin, sqe, Data::In(DmaBuf::zeroed(4096).unwrap()));
    assert!(c.status.is_success(), "Identify {cns:?}: {:?}", c.status);
    c.buf.unwrap().to_vec()
}

fn vwc_byte(admin: &mut HostQpair) -> u8 {
    IdentifyController::read_from_bytes(&identify(admin, Cns::CONTROLLER, 0)).unwrap().vwc
}

fn dlfeat(admin: &mut HostQpair, nsid: u32) -> u8 {
    IdentifyNamespace::read_from_bytes(&identify(admin, Cns::NAMESPACE, nsid)).unwrap().dlfeat
}

fn feature(admin: &mut HostQpair, set: bool, value: u32) -> nvmf::host::Completion {
    let op = if set { AdminOpcode::SET_FEATURES } else { AdminOpcode::GET_FEATURES };
    let mut sqe = Sqe::new(op.0, 0);
    FeatureParams { fid: FeatureId::VOLATILE_WRITE_CACHE, save: false, select: 0, value }.write_to(&mut sqe);
    command(admin, sqe, Data::None)
}

fn smart(admin: &mut HostQpair) -> SmartLog {
    let mut sqe = Sqe::new(AdminOpcode::GET_LOG_PAGE.0, 0);
    GetLogPageParams {
        lid: LogPageId::SMART_HEALTH,
        lsp: 0,
        rae: false,
        len_bytes: 512,
        offset_bytes: 0,
        lsi: 0,
        nsid: 0xFFFF_FFFF,
    }
    .write_to(&mut sqe);
    let c = command(admin, sqe, Data::In(DmaBuf::zeroed(512).unwrap()));
    assert!(c.status.is_success(), "SMART log: {:?}", c.status);
    SmartLog::read_from_bytes(&c.buf.unwrap().to_vec()).unwrap()
}

fn write(qp: &mut HostQpair, lba: u64, nlb: u32) {
    let b = DmaBuf::alloc(nlb as usize * 512).unwrap().slice(0, nlb as usize * 512);
    b.fill(0x5a);
    qp.write(1, lba, nlb, b, 1).unwrap();
    let c = wait(qp, 1).pop().unwrap();
    assert!(c.status.is_success(), "write: {:?}", c.status);
}

#[test]
fn malloc_namespace_reports_no_volatile_cache_and_zeroes_after_deallocate() {
    let t = start_target(1, 512, 1024, TransportOpts::default(), &[]);
    let s = session_no_kato(t.port, 1);
    assert!(!s.info.volatile_write_cache);
    assert!(s.info.namespaces[0].deallocated_reads_zeroes);
    let mut admin = HostQpair::from_parts(s.admin);
    assert_eq!(vwc_byte(&mut admin) & vwc::PRESENT, 0, "malloc has no volatile write cache");
    assert_eq!(dlfeat(&mut admin, 1) & 0b111, 0b001);
    // The feature does not exist without a cache: Invalid Field, both ways.
    assert_eq!(feature(&mut admin, false, 0).status, Status::INVALID_FIELD.with_dnr());
    assert_eq!(feature(&mut admin, true, 0).status, Status::INVALID_FIELD.with_dnr());
    // Flush still succeeds.
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    qp.flush(1, 7).unwrap();
    assert!(wait(&mut qp, 1).pop().unwrap().status.is_success());
}

#[test]
fn dlfeat_is_not_claimed_for_a_bdev_that_cannot_say() {
    let t = start_target_with(1, TransportOpts::default(), || {
        let n = NullBdev::new(BdevProps::new("Null0", "Null disk", 512, 1024, None)).unwrap();
        Registry::get().register(Arc::new(n)).unwrap();
        vec!["Null0".into()]
    });
    let s = session_no_kato(t.port, 1);
    assert!(!s.info.namespaces[0].deallocated_reads_zeroes);
    let mut admin = HostQpair::from_parts(s.admin);
    assert_eq!(dlfeat(&mut admin, 1), 0b000);
}

/// A target over a VolatileCacheBdev; the bdev comes back for inspection.
fn cache_target() -> (Target, Arc<VolatileCacheBdev>) {
    let (tx, rx) = mpsc::channel();
    let t = start_target_with(2, TransportOpts::default(), move || {
        let b = Arc::new(VolatileCacheBdev::new(BdevProps::new("Cache0", "cache", 512, 4096, None), 1, 0).unwrap());
        Registry::get().register(b.clone()).unwrap();
        tx.send(b).unwrap();
        vec!["Cache0".into()]
    });
    let b = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    (t, b)
}

#[test]
fn volatile_cache_is_reported_and_turning_it_off_makes_writes_fua() {
    let (t, cache) = cache_target();
    let s = session_no_kato(t.port, 1);
    assert!(s.info.volatile_write_cache);
    let mut admin = HostQpair::from_parts(s.admin);
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    assert_eq!(vwc_byte(&mut admin) & vwc::PRESENT, vwc::PRESENT);
    assert_eq!(dlfeat(&mut admin, 1) & 0b111, 0b001);
    // Enabled by default; a plain write stays in the cache.
    let c = feature(&mut admin, false, 0);
    assert!(c.status.is_success());
    assert_eq!(c.dw0, 1);
    write(&mut qp, 0, 8);
    assert_eq!(cache.counters().fua_writes, 0);
    assert_eq!(cache.cached_blocks(), 8);
    // Off: the cache is written back, and every write is FUA from now on.
    assert!(feature(&mut admin, true, 0).status.is_success());
    assert_eq!(feature(&mut admin, false, 0).dw0, 0);
    assert_eq!(cache.cached_blocks(), 0, "turning the cache off wrote back what it held");
    assert!(cache.counters().flushes >= 1);
    write(&mut qp, 8, 8);
    write(&mut qp, 16, 64); // through R2T
    assert_eq!(cache.counters().fua_writes, 2);
    assert_eq!(cache.cached_blocks(), 0);
    // A reserved bit set: refused.
    assert_eq!(feature(&mut admin, true, 0b11).status, Status::INVALID_FIELD.with_dnr());
    // On again: plain writes are cached again.
    assert!(feature(&mut admin, true, 1).status.is_success());
    assert_eq!(feature(&mut admin, false, 0).dw0, 1);
    write(&mut qp, 100, 4);
    assert_eq!(cache.counters().fua_writes, 2);
    assert_eq!(cache.cached_blocks(), 4);
}

#[test]
fn fua_reaches_the_bdev_and_dpo_stays_off_the_wire() {
    let (t, cache) = cache_target();
    let s = session_no_kato(t.port, 1);
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    let b = DmaBuf::alloc(4096).unwrap();
    b.fill(1);
    qp.write_with(1, 0, 8, b, 1, bdev::IoFlags::FUA).unwrap();
    assert!(wait(&mut qp, 1).pop().unwrap().status.is_success());
    qp.write_zeroes_with(1, 8, 8, 2, bdev::IoFlags::FUA | bdev::IoFlags::DPO).unwrap();
    assert!(wait(&mut qp, 1).pop().unwrap().status.is_success());
    let b = DmaBuf::alloc(4096).unwrap();
    qp.write_with(1, 16, 8, b, 3, bdev::IoFlags::DPO).unwrap();
    assert!(wait(&mut qp, 1).pop().unwrap().status.is_success());
    let c = cache.counters();
    assert_eq!((c.writes, c.fua_writes), (3, 2));
    assert_eq!(cache.cached_blocks(), 8, "only the write without FUA is cached");
    // The bdev layer's own count says the same (bdev_get_iostat).
    let (tx, rx) = mpsc::channel();
    t.set.send(0, move || {
        let h = Registry::get().lookup("Cache0").unwrap();
        Registry::iostat(&h, move |s| tx.send(s.num_fua_write_ops).unwrap());
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 2);
}

#[test]
fn smart_log_counts_what_happened() {
    let t = start_target_with(1, TransportOpts::default(), || {
        let m = MallocBdev::new(BdevProps::new("Base0", "Malloc disk", 512, 8192, None)).unwrap();
        Registry::get().register(Arc::new(m)).unwrap();
        bdev::error::create(bdev::error::ErrorCreateParams { base_name: "Base0".into(), uuid: None }).unwrap();
        vec!["EE_Base0".into()]
    });
    let s = session_no_kato(t.port, 2);
    let mut admin = HostQpair::from_parts(s.admin);
    let mut qps: Vec<HostQpair> = s.io.into_iter().map(HostQpair::from_parts).collect();
    let before = smart(&mut admin);
    assert_eq!(before.host_write_commands.get(), 0);
    assert_eq!(before.data_units_written.get(), 0);
    // Nothing made up: no temperature, spare or wear figures.
    assert_eq!(before.temperature.get(), 0);
    assert_eq!((before.available_spare, before.available_spare_threshold, before.percentage_used), (0, 0, 0));
    assert_eq!(before.critical_warning, 0);
    // 3 writes of 8 blocks (24 units of 512 bytes: 1 data unit, rounded up).
    for i in 0..3 {
        write(&mut qps[0], i * 8, 8);
    }
    let s1 = smart(&mut admin);
    assert_eq!(s1.host_write_commands.get(), 3);
    assert_eq!(s1.data_units_written.get(), 1);
    // 9 more of 128 blocks on the other queue: 24 + 1152 = 1176 units -> 2.
    for i in 0..9 {
        write(&mut qps[1], 1024 + i * 128, 128);
    }
    // Reads: 2 of 16 blocks.
    for _ in 0..2 {
        qps[0].read(1, 0, 16, DmaBuf::alloc(8192).unwrap(), 5).unwrap();
        assert!(wait(&mut qps[0], 1).pop().unwrap().status.is_success());
    }
    let s2 = smart(&mut admin);
    assert_eq!(s2.host_write_commands.get(), 12);
    assert_eq!(s2.data_units_written.get(), 2);
    assert_eq!(s2.host_read_commands.get(), 2);
    assert_eq!(s2.data_units_read.get(), 1);
    assert_eq!(s2.media_errors.get(), 0);
    // A media error on a read is counted.
    t.set.call(0, || {
        bdev::error::inject(bdev::error::ErrorInjectParams {
            name: "EE_Base0".into(),
            io_type: "read".into(),
            error_type: "failure".into(),
            num: Some(1),
            queue_depth: None,
            corrupt_offset: None,
            corrupt_value: None,
            nvme_sct: None,
            nvme_sc: None,
        })
        .unwrap()
    });
    qps[0].read(1, 0, 1, DmaBuf::alloc(512).unwrap().slice(0, 512), 6).unwrap();
    let c = wait(&mut qps[0], 1).pop().unwrap();
    assert_eq!(c.status, Status::UNRECOVERED_READ_ERROR);
    // Counters of a closed queue stay with the controller.
    drop(qps.pop());
    std::thread::sleep(Duration::from_millis(200));
    let s3 = smart(&mut admin);
    assert_eq!(s3.media_errors.get(), 1);
    assert_eq!(s3.host_read_commands.get(), 2, "a failed read is not a completed host read");
    assert_eq!(s3.host_write_commands.get(), 12);
    // A specific namespace: the log is controller-wide only (LPA bit 0 clear).
    let mut sqe = Sqe::new(AdminOpcode::GET_LOG_PAGE.0, 1);
    GetLogPageParams {
        lid: LogPageId::SMART_HEALTH,
        lsp: 0,
        rae: false,
        len_bytes: 512,
        offset_bytes: 0,
        lsi: 0,
        nsid: 1,
    }
    .write_to(&mut sqe);
    let c = command(&mut admin, sqe, Data::In(DmaBuf::zeroed(512).unwrap()));
    assert_eq!(c.status, Status::INVALID_FIELD.with_dnr());
}

#[test]
fn transport_options_nvraid_lacks_are_refused_by_name() {
    let cfg =
        reactor::ReactorConfig { pin: false, ..reactor::ReactorConfig::new(vec![0, 1], reactor::IdlePolicy::sleep()) };
    let set = reactor::ReactorSet::start(cfg, || {}).unwrap();
    let tries: Vec<(TransportOpts, &str)> = vec![
        (TransportOpts { zcopy: true, ..Default::default() }, "zcopy"),
        (TransportOpts { dif_insert_or_strip: true, ..Default::default() }, "dif_insert_or_strip"),
        (TransportOpts { sock_priority: 3, ..Default::default() }, "sock_priority"),
        (TransportOpts { ack_timeout: 10, ..Default::default() }, "ack_timeout"),
        (TransportOpts { data_wr_pool_size: 64, ..Default::default() }, "data_wr_pool_size"),
        (TransportOpts { num_shared_buffers: 0, ..Default::default() }, "num_shared_buffers"),
        (TransportOpts { io_unit_size: 8192, num_shared_buffers: 8, ..Default::default() }, "num_shared_buffers"),
        (TransportOpts { io_unit_size: 100, ..Default::default() }, "io_unit_size"),
        (TransportOpts { num_shared_buffers: 63, buf_cache_size: 32, ..Default::default() }, "buf_cache_size"),
    ];
    for (o, name) in tries {
        let e = set.call(0, move || NvmfState::get().create_transport(o)).expect_err(name);
        assert!(e.to_string().contains(name), "{name}: {e}");
        assert_eq!(e.errno(), libc::EINVAL);
    }
    // SPDK's documented small-unit setup is accepted: 16 KiB units.
    let o = TransportOpts { io_unit_size: 16384, ..Default::default() };
    set.call(0, move || NvmfState::get().create_transport(o)).unwrap();
    set.stop();
    set.join();
}

/// A namespace attached as a bdev (`bdev_nvme_attach_controller -t TCP`)
/// says what the remote controller said about its cache, and its FUA
/// writes stay FUA on the wire: FUA survives a remote member.
#[test]
fn remote_namespace_bdev_carries_the_cache_flag_and_fua() {
    use bdev::{IoBox, IoFlags, IoStatus, IoType};
    use nvmf::host::{attach_controller, detach_controller, AttachParams};
    let (t, cache) = cache_target();
    let cfg =
        reactor::ReactorConfig { pin: false, ..reactor::ReactorConfig::new(vec![0], reactor::IdlePolicy::sleep()) };
    let ini = reactor::ReactorSet::start(cfg, || {}).unwrap();
    let port = t.port;
    let (tx, rx) = mpsc::channel();
    ini.send(0, move || {
        let p = AttachParams {
            name: "Remote".into(),
            trtype: "TCP".into(),
            traddr: "127.0.0.1".into(),
            adrfam: None,
            trsvcid: port.to_string(),
            subnqn: NQN.into(),
            hostnqn: Some(HOSTNQN.into()),
            hdgst: false,
            ddgst: false,
            psk: None,
        };
        attach_controller(p, move |r| tx.send(r).unwrap());
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    let (has_cache, zeroes) = ini.call(0, || {
        let h = Registry::get().lookup("Remoten1").unwrap();
        (h.bdev().has_write_cache(), h.props().deallocated_reads_zeroes)
    });
    assert!(has_cache && zeroes);
    for (lba, flags) in [(0u64, IoFlags::FUA), (8, IoFlags::NONE), (16, IoFlags::FUA)] {
        let (tx, rx) = mpsc::channel();
        ini.send(0, move || {
            let ch = Registry::get().lookup("Remoten1").unwrap().channel().unwrap();
            let b = DmaBuf::alloc(4096).unwrap();
            b.fill(3);
            let mut io = IoBox::data(IoType::Write, lba, 8, Some(b)).unwrap();
            io.flags = flags;
            io.set_done(std::rc::Rc::new(move |io: IoBox| tx.send(io.status).unwrap()));
            ch.submit(io);
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), IoStatus::Success);
    }
    let c = cache.counters();
    assert_eq!((c.writes, c.fua_writes), (3, 2));
    assert_eq!(cache.cached_blocks(), 8);
    let (tx, rx) = mpsc::channel();
    ini.send(0, move || detach_controller("Remote", move |r| tx.send(r).unwrap()));
    rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    ini.stop();
    ini.join();
}

/// Set Features values are kept and read back by Get Features, or refused:
/// the temperature thresholds (over, under; no other sensor), arbitration,
/// and power management (one power state).
#[test]
fn features_the_host_sets_are_kept_or_refused() {
    let (t, _cache) = cache_target();
    let s = session_no_kato(t.port, 1);
    let mut admin = HostQpair::from_parts(s.admin);
    let mut call = |set: bool, fid: FeatureId, value: u32| {
        let op = if set { AdminOpcode::SET_FEATURES } else { AdminOpcode::GET_FEATURES };
        let mut sqe = Sqe::new(op.0, 0);
        FeatureParams { fid, save: false, select: 0, value }.write_to(&mut sqe);
        command(&mut admin, sqe, Data::None)
    };
    const UNDER: u32 = 1 << 20;
    assert_eq!(call(false, FeatureId::TEMPERATURE_THRESHOLD, 0).dw0, 350);
    assert!(call(true, FeatureId::TEMPERATURE_THRESHOLD, 320).status.is_success());
    assert!(call(true, FeatureId::TEMPERATURE_THRESHOLD, UNDER | 260).status.is_success());
    assert_eq!(call(false, FeatureId::TEMPERATURE_THRESHOLD, 0).dw0, 320);
    assert_eq!(call(false, FeatureId::TEMPERATURE_THRESHOLD, UNDER).dw0, 260);
    // Sensor 1 does not exist.
    assert!(!call(true, FeatureId::TEMPERATURE_THRESHOLD, (1 << 16) | 300).status.is_success());
    assert!(call(true, FeatureId::ARBITRATION, 0x0302_0103).status.is_success());
    assert_eq!(call(false, FeatureId::ARBITRATION, 0).dw0, 0x0302_0103);
    assert!(call(true, FeatureId::POWER_MANAGEMENT, 0).status.is_success());
    assert!(!call(true, FeatureId::POWER_MANAGEMENT, 1).status.is_success(), "only power state 0 exists");
}
