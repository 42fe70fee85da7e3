//! Abort (admin opcode 08h) against commands that have not reached a
//! device — in a delay bdev's queue, waiting for a data buffer, a parked
//! AER — and the transport's bounded data buffer pool: a pool far smaller
//! than the load queues commands instead of allocating, and every command
//! still completes with the right data.

mod common;
use bdev::malloc::MallocBdev;
use bdev::{BdevProps, DmaBuf, Registry};
use common::*;
use nvme_spec::{AdminOpcode, Sqe, Status, U32};
use nvmf::host::{Data, HostQpair};
use nvmf::{NvmfState, TransportOpts};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DELAY_US: u64 = 20_000_000; // long enough that only an abort ends it

fn delayed_target(opts: TransportOpts) -> Target {
    start_target_with(2, opts, || {
        let m = MallocBdev::new(BdevProps::new("Base0", "Malloc disk", 512, 8192, None)).unwrap();
        Registry::get().register(Arc::new(m)).unwrap();
        bdev::delay::create(bdev::delay::DelayCreateParams {
            base_bdev_name: "Base0".into(),
            name: "Delay0".into(),
            avg_read_latency: DELAY_US,
            p99_read_latency: DELAY_US,
            avg_write_latency: DELAY_US,
            p99_write_latency: DELAY_US,
            uuid: None,
            random_seed: None,
            max_random_latency_us: None,
        })
        .unwrap();
        vec!["Delay0".into()]
    })
}

fn in_flight(t: &Target) -> u64 {
    let (tx, rx) = std::sync::mpsc::channel();
    t.set.send(0, move || {
        let h = Registry::get().lookup("Delay0").unwrap();
        Registry::iostat(&h, move |s| {
            let _ = tx.send(s.in_flight);
        });
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap()
}

/// Waits until `n` IOs are at the delay bdev, polling `qp` meanwhile (it
/// must answer R2Ts) and checking nothing completes.
fn wait_in_flight(t: &Target, n: u64, qp: &mut HostQpair) {
    let t0 = Instant::now();
    while in_flight(t) < n {
        assert_eq!(qp.poll(|c| panic!("unexpected completion {} {:?}", c.tag, c.status)).unwrap(), 0);
        let st = t.set.call(0, || NvmfState::get().stats_json());
        assert!(t0.elapsed() < Duration::from_secs(10), "IO never reached the delay bdev: {st}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn abort_sqe(sqid: u16, cid: u16) -> Sqe {
    let mut sqe = Sqe::new(AdminOpcode::ABORT.0, 0);
    sqe.cdw10 = U32::new(u32::from(sqid) | (u32::from(cid) << 16));
    sqe
}

fn write_buf(len: usize, fill: u8) -> DmaBuf {
    let b = DmaBuf::alloc(len).unwrap().slice(0, len);
    b.fill(fill);
    b
}

#[test]
fn abort_takes_a_write_out_of_the_delay_queue() {
    let t = delayed_target(TransportOpts::default());
    let s = session_no_kato(t.port, 1);
    let mut admin = HostQpair::from_parts(s.admin);
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    // A fresh queue hands out CID 0 first.
    qp.write(1, 0, 8, write_buf(4096, 0x11), 1).unwrap();
    assert_eq!(qp.poll(|_| {}).unwrap(), 0);
    wait_in_flight(&t, 1, &mut qp);
    let t0 = Instant::now();
    let c = command(&mut admin, abort_sqe(1, 0), Data::None);
    assert!(c.status.is_success(), "{:?}", c.status);
    assert_eq!(c.dw0 & 1, 0, "the Abort says it aborted the write");
    let w = wait(&mut qp, 1).pop().unwrap();
    assert_eq!(w.status, Status::ABORT_REQUESTED);
    assert!(t0.elapsed() < Duration::from_secs(5), "the write was aborted, not waited out");
    // The aborted write never reached the base.
    qp.read(1, 0, 8, DmaBuf::alloc(4096).unwrap(), 2).unwrap();
    assert_eq!(qp.poll(|_| {}).unwrap(), 0);
    wait_in_flight(&t, 1, &mut qp);
    let c = command(&mut admin, abort_sqe(1, 0), Data::None);
    assert_eq!(c.dw0 & 1, 0);
    assert_eq!(wait(&mut qp, 1).pop().unwrap().status, Status::ABORT_REQUESTED);
    // Nothing by that CID: "not aborted".
    let c = command(&mut admin, abort_sqe(1, 77), Data::None);
    assert!(c.status.is_success());
    assert_eq!(c.dw0 & 1, 1);
    // No such queue: "not aborted".
    let c = command(&mut admin, abort_sqe(9, 0), Data::None);
    assert_eq!(c.dw0 & 1, 1);
    assert_eq!(t.set.call(0, || NvmfState::get().impossible_event_count()), 0);
}

#[test]
fn abort_of_a_command_waiting_for_a_buffer_and_of_an_aer() {
    // One data buffer in the whole target: the second R2T write waits.
    let opts = TransportOpts { num_shared_buffers: 1, buf_cache_size: 0, ..Default::default() };
    let t = delayed_target(opts);
    let s = session_no_kato(t.port, 1);
    let mut admin = HostQpair::from_parts(s.admin);
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    qp.write(1, 0, 64, write_buf(32768, 1), 10).unwrap(); // CID 0: takes the buffer, then sits in the delay bdev
    assert_eq!(qp.poll(|_| {}).unwrap(), 0);
    wait_in_flight(&t, 1, &mut qp);
    qp.write(1, 64, 64, write_buf(32768, 2), 11).unwrap(); // CID 1: waits for the buffer
    let t0 = Instant::now();
    let waiting = loop {
        assert_eq!(qp.poll(|_| {}).unwrap(), 0);
        let st = t.set.call(0, || NvmfState::get().stats_json());
        let w = st["poll_groups"][0]["transports"][0]["pending_data_buffer"].as_u64().unwrap();
        if w > 0 {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "the second write never waited for a buffer");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(waiting["poll_groups"][0]["transports"][0]["data_buffers_free"], 0);
    let c = command(&mut admin, abort_sqe(1, 1), Data::None);
    assert_eq!(c.dw0 & 1, 0, "a command waiting for a buffer is aborted");
    let w = wait(&mut qp, 1).pop().unwrap();
    assert_eq!((w.tag, w.status), (11, Status::ABORT_REQUESTED));
    let c = command(&mut admin, abort_sqe(1, 0), Data::None);
    assert_eq!(c.dw0 & 1, 0);
    let w = wait(&mut qp, 1).pop().unwrap();
    assert_eq!((w.tag, w.status), (10, Status::ABORT_REQUESTED));
    // Both buffer units are back.
    let t0 = Instant::now();
    loop {
        let st = t.set.call(0, || NvmfState::get().stats_json());
        if st["poll_groups"][0]["transports"][0]["data_buffers_free"] == 1 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "buffer units leaked: {st}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // An AER parked on the admin queue (CID 0 there: the Aborts so far
    // completed at once) is aborted too.
    admin.submit(Sqe::new(AdminOpcode::ASYNC_EVENT_REQUEST.0, 0), Data::None, 99).unwrap();
    assert_eq!(admin.poll(|_| {}).unwrap(), 0);
    std::thread::sleep(Duration::from_millis(20));
    admin.submit(abort_sqe(0, 0), Data::None, 98).unwrap();
    let mut got = wait(&mut admin, 2);
    got.sort_by_key(|c| c.tag);
    assert_eq!((got[0].tag, got[0].dw0 & 1), (98, 0));
    assert_eq!((got[1].tag, got[1].status), (99, Status::ABORT_REQUESTED));
}

/// Many concurrent 128 KiB writes from several queues through a pool of
/// two buffers: they queue, all complete, the data reads back right, and
/// every buffer unit returns.
#[test]
fn a_tiny_buffer_pool_queues_large_writes() {
    const BS: u32 = 512;
    const NLB: u32 = 256; // 128 KiB
    let opts = TransportOpts { num_shared_buffers: 2, buf_cache_size: 0, ..Default::default() };
    let t = start_target(2, BS, 64 * 1024, opts, &[]);
    let s = session_no_kato(t.port, 3);
    let mut threads = Vec::new();
    for (q, parts) in s.io.into_iter().enumerate() {
        threads.push(std::thread::spawn(move || {
            let mut qp = HostQpair::from_parts(parts);
            let base = q as u64 * 16 * u64::from(NLB);
            for i in 0..16u64 {
                let fill = (q as u8) * 16 + i as u8 + 1;
                qp.write(1, base + i * u64::from(NLB), NLB, write_buf((NLB * BS) as usize, fill), i).unwrap();
            }
            for c in wait(&mut qp, 16) {
                assert!(c.status.is_success(), "write {} failed: {:?}", c.tag, c.status);
            }
            for i in 0..16u64 {
                qp.read(1, base + i * u64::from(NLB), NLB, DmaBuf::alloc((NLB * BS) as usize).unwrap(), i).unwrap();
            }
            for c in wait(&mut qp, 16) {
                assert!(c.status.is_success(), "read {} failed: {:?}", c.tag, c.status);
                let fill = (q as u8) * 16 + c.tag as u8 + 1;
                assert!(c.buf.unwrap().to_vec().iter().all(|&b| b == fill), "queue {q} block run {}", c.tag);
            }
        }));
    }
    for th in threads {
        th.join().unwrap();
    }
    let t0 = Instant::now();
    loop {
        let st = t.set.call(0, || NvmfState::get().stats_json());
        let tr = &st["poll_groups"][0]["transports"][0];
        assert!(tr["pending_data_buffer"].as_u64().unwrap() > 0, "the pool never ran dry: {st}");
        if tr["data_buffers_free"] == 2 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "buffer units leaked: {st}");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(t.set.call(0, || NvmfState::get().impossible_event_count()), 0);
}
