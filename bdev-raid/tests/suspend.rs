//! Suspend/resume and delete, step by step on a manual reactor set:
//! suspend waits for IO in flight on another reactor, holds new IO without
//! letting it reach a member, resumes it in arrival order; a delete goes
//! through while someone else holds the array suspended, fails the held IO,
//! and waits for in-flight IO; suspend after delete answers with an error.

use bdev::delay::{self, DelayCreateParams};
use bdev::malloc::MallocBdev;
use bdev::{BdevError, BdevProps, DmaBuf, IoBox, IoError, IoStatus, IoType, Registry};
use bdev_raid::rpc::{bdev_raid_create, bdev_raid_delete, RaidCreateParams, RaidDeleteParams};
use bdev_raid::RaidArray;
use reactor::{ManualSet, ReactorSet};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{mpsc, Arc};

type Log = Rc<RefCell<Vec<(u64, IoStatus)>>>;

fn setup(m: &ManualSet, with_delay: bool) -> Vec<Arc<MallocBdev>> {
    m.on(0, || {
        let mut ms = Vec::new();
        let mut names = Vec::new();
        for i in 0..2 {
            let mb =
                Arc::new(MallocBdev::new(BdevProps::new(&format!("M{i}"), "Malloc disk", 512, 256, None)).unwrap());
            Registry::get().register(mb.clone()).unwrap();
            ms.push(mb);
            if with_delay {
                delay::create(DelayCreateParams {
                    base_bdev_name: format!("M{i}"),
                    name: format!("D{i}"),
                    avg_read_latency: 1000,
                    p99_read_latency: 1000,
                    avg_write_latency: 1000,
                    p99_write_latency: 1000,
                    uuid: None,
                    random_seed: None,
                    max_random_latency_us: None,
                })
                .unwrap();
                names.push(format!("D{i}"));
            } else {
                names.push(format!("M{i}"));
            }
        }
        bdev_raid_create(RaidCreateParams {
            name: "R".into(),
            raid_level: "raid1".into(),
            base_bdevs: names,
            strip_size_kb: None,
            uuid: None,
            superblock: None,
            bitmap: None,
            bitmap_chunk_size_kb: None,
        })
        .unwrap();
        ms
    })
}

fn write(m: &ManualSet, r: usize, tag: u64, fill: u8, log: &Log) {
    let l = log.clone();
    m.on(r, || {
        let ch = Registry::get().lookup("R").unwrap().channel().unwrap();
        let b = DmaBuf::alloc(4096).unwrap();
        b.fill(fill);
        let mut io = IoBox::data(IoType::Write, 0, 8, Some(b)).unwrap();
        io.tag = tag;
        io.set_done(Rc::new(move |io: IoBox| l.borrow_mut().push((io.tag, io.status))));
        ch.submit(io);
    });
}

fn first_byte(mb: &MallocBdev) -> u8 {
    let mut b = [0u8; 1];
    mb.read_raw(0, &mut b);
    b[0]
}

fn suspend(m: &ManualSet, from: usize) -> mpsc::Receiver<Result<(), BdevError>> {
    let (tx, rx) = mpsc::channel();
    m.on(from, || {
        RaidArray::find("R").unwrap().suspend(move |r| {
            let _ = tx.send(r);
        })
    });
    rx
}

#[test]
fn suspend_drains_holds_and_resumes_in_order() {
    let m = ReactorSet::manual(2);
    let ms = setup(&m, false);
    let log: Log = Rc::default();
    write(&m, 1, 1, 0xA1, &log);
    let rx = suspend(&m, 0);
    // Only the owner runs: reactor 1 has not drained its write.
    for _ in 0..5 {
        m.run_once(0);
    }
    assert!(rx.try_recv().is_err(), "suspended with IO in flight on reactor 1");
    m.run_until_idle(50);
    assert_eq!(rx.try_recv().unwrap(), Ok(()));
    assert_eq!(log.borrow().as_slice(), &[(1, IoStatus::Success)]);
    // New IO is held: it reaches no member while suspended.
    write(&m, 1, 2, 0xB2, &log);
    write(&m, 0, 3, 0xC3, &log);
    write(&m, 1, 4, 0xD4, &log);
    m.run_until_idle(50);
    assert_eq!(log.borrow().len(), 1);
    assert!(ms.iter().all(|mb| first_byte(mb) == 0xA1));
    // A second suspender nests; the array resumes when both resumed.
    let rx2 = suspend(&m, 1);
    m.run_until_idle(50);
    assert_eq!(rx2.try_recv().unwrap(), Ok(()));
    m.on(1, || RaidArray::find("R").unwrap().resume());
    m.run_until_idle(50);
    assert_eq!(log.borrow().len(), 1, "still held by the first suspender");
    m.on(0, || RaidArray::find("R").unwrap().resume());
    m.run_until_idle(100);
    let tags: Vec<u64> = log.borrow().iter().map(|e| e.0).collect();
    assert_eq!(tags.len(), 4);
    assert!(log.borrow().iter().all(|e| e.1 == IoStatus::Success));
    // Per reactor, held IO resumed in arrival order; both members agree.
    let pos = |t| tags.iter().position(|&x| x == t).unwrap();
    assert!(pos(2) < pos(4));
    assert_eq!(first_byte(&ms[0]), first_byte(&ms[1]));
}

#[test]
fn delete_while_someone_holds_a_suspension() {
    let m = ReactorSet::manual(2);
    let ms = setup(&m, false);
    let log: Log = Rc::default();
    let array = m.on(0, || RaidArray::find("R").unwrap());
    let rx = suspend(&m, 1);
    m.run_until_idle(50);
    assert_eq!(rx.try_recv().unwrap(), Ok(()));
    write(&m, 1, 7, 0xEE, &log);
    m.run_until_idle(50);
    assert!(log.borrow().is_empty(), "held");
    let (tx, del) = mpsc::channel();
    m.on(0, || {
        bdev_raid_delete(RaidDeleteParams { name: "R".into(), clear_sb: None }, move |r| {
            let _ = tx.send(r.is_ok());
        })
    });
    for _ in 0..20 {
        m.run_until_idle(50);
        m.advance_ns(2_000_000);
    }
    assert_eq!(del.try_recv(), Ok(true), "delete finished although a suspension is held");
    assert_eq!(log.borrow().as_slice(), &[(7, IoStatus::Failed(IoError::NoDevice))]);
    assert_eq!(first_byte(&ms[0]), 0, "the held write never reached a member");
    // The late resume and a new suspend on the dead array neither hang nor panic.
    let (tx, late) = mpsc::channel();
    m.on(1, || {
        array.resume();
        array.suspend(move |r| {
            let _ = tx.send(r);
        })
    });
    m.run_until_idle(50);
    assert!(matches!(late.try_recv(), Ok(Err(BdevError::NotFound(_)))));
    m.run_until_idle(50);
    m.on(0, || {
        assert!(Registry::get().lookup("M0").unwrap().claimed_by().is_none());
        assert!(RaidArray::find("R").is_none());
    });
}

#[test]
fn delete_waits_for_in_flight_io() {
    let m = ReactorSet::manual(2);
    let ms = setup(&m, true);
    let log: Log = Rc::default();
    write(&m, 1, 9, 0x99, &log);
    m.run_until_idle(50);
    assert!(log.borrow().is_empty(), "delayed by 1 ms of manual time");
    let (tx, del) = mpsc::channel();
    m.on(0, || {
        bdev_raid_delete(RaidDeleteParams { name: "R".into(), clear_sb: None }, move |r| {
            let _ = tx.send(r.is_ok());
        })
    });
    m.run_until_idle(50);
    assert!(del.try_recv().is_err(), "delete must wait for the write in flight");
    write(&m, 1, 10, 0x10, &log);
    for _ in 0..20 {
        m.advance_ns(500_000);
        m.run_until_idle(50);
    }
    assert_eq!(del.try_recv(), Ok(true));
    let l = log.borrow();
    assert!(l.contains(&(9, IoStatus::Success)), "{l:?}");
    assert!(l.contains(&(10, IoStatus::Failed(IoError::NoDevice))), "{l:?}");
    assert!(ms.iter().all(|mb| first_byte(mb) == 0x99));
}
