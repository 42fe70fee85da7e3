//! Rebuild on a manual reactor set (manual clock): progress is reported in
//! `process`, `process_max_bandwidth_mb_sec` spaces windows out, the copy is
//! exact and the member turns active; a member bdev that disappears
//! (hot-remove) empties its slot and leaves the mirror degraded.

use bdev::malloc::MallocBdev;
use bdev::{BdevError, BdevProps, DmaBuf, IoBox, IoStatus, IoType, Registry};
use bdev_raid::rpc::*;
use bdev_raid::{RaidArray, RaidState};
use reactor::{ManualSet, ReactorSet};
use serde_json::Value;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{mpsc, Arc};

const BLOCKS: u64 = 2048; // 1 MiB of 512-byte blocks

fn malloc(name: &str) -> Arc<MallocBdev> {
    let m = Arc::new(MallocBdev::new(BdevProps::new(name, "Malloc disk", 512, BLOCKS, None)).unwrap());
    Registry::get().register(m.clone()).unwrap();
    m
}

fn run_async(
    m: &ManualSet,
    f: impl FnOnce(Box<dyn FnOnce(Result<Value, BdevError>) + Send>),
) -> Result<Value, BdevError> {
    let (tx, rx) = mpsc::channel();
    m.on(0, || {
        f(Box::new(move |r| {
            let _ = tx.send(r);
        }))
    });
    for _ in 0..100 {
        m.run_until_idle(100);
        if let Ok(r) = rx.try_recv() {
            return r;
        }
    }
    panic!("no answer");
}

fn progress(m: &ManualSet) -> Option<(u64, u64)> {
    m.on(0, || {
        let info = RaidArray::find("R").unwrap().info_json();
        info.get("process").map(|p| {
            assert_eq!(p["type"], "rebuild");
            assert_eq!(p["target"], "B");
            (p["progress"]["blocks"].as_u64().unwrap(), p["progress"]["percent"].as_u64().unwrap())
        })
    })
}

#[test]
fn rebuild_is_rate_limited_reports_progress_and_copies_exactly() {
    let m = ReactorSet::manual(2);
    let (a, b) = m.on(0, || {
        let (a, b) = (malloc("A"), malloc("B"));
        bdev_raid_create(RaidCreateParams {
            name: "R".into(),
            raid_level: "raid1".into(),
            base_bdevs: vec!["A".into(), "B".into()],
            strip_size_kb: None,
            uuid: None,
            superblock: None,
            bitmap: None,
            bitmap_chunk_size_kb: None,
        })
        .unwrap();
        // 64 KiB windows at 1 MiB/s: one window per 62.5 ms, 16 in all.
        bdev_raid_set_options(RaidSetOptionsParams {
            process_window_size_kb: Some(64),
            process_max_bandwidth_mb_sec: Some(1),
            ..Default::default()
        })
        .unwrap();
        (a, b)
    });
    run_async(&m, |d| bdev_raid_remove_base_bdev(RaidRemoveBaseBdevParams { name: "B".into() }, d)).unwrap();
    // Data written while degraded must end up on B by the rebuild.
    let log: Rc<RefCell<Vec<IoStatus>>> = Rc::default();
    m.on(1, || {
        let ch = Registry::get().lookup("R").unwrap().channel().unwrap();
        let buf = DmaBuf::alloc((BLOCKS * 512) as usize).unwrap();
        buf.with_mut(|x| x.iter_mut().enumerate().for_each(|(i, v)| *v = (i % 253) as u8 + 1));
        let mut io = IoBox::data(IoType::Write, 0, BLOCKS, Some(buf)).unwrap();
        let l = log.clone();
        io.set_done(Rc::new(move |io: IoBox| l.borrow_mut().push(io.status)));
        ch.submit(io);
    });
    m.run_until_idle(100);
    assert_eq!(log.borrow().as_slice(), &[IoStatus::Success]);
    let mut raw_b = vec![0u8; 512];
    b.read_raw(0, &mut raw_b);
    assert!(raw_b.iter().all(|&x| x == 0), "B was out of the array during the write");

    run_async(&m, |d| {
        bdev_raid_add_base_bdev(RaidAddBaseBdevParams { raid_bdev: "R".into(), base_bdev: "B".into() }, d)
    })
    .unwrap();
    // 100 ms of manual time: two windows at most.
    for _ in 0..10 {
        m.advance_ns(10_000_000);
        m.run_until_idle(100);
    }
    let (blocks, percent) = progress(&m).expect("rebuild running");
    assert!((128..=3 * 128).contains(&blocks), "rate limit: {blocks} blocks after 100 ms");
    assert_eq!(percent, blocks * 100 / BLOCKS);
    assert!(m.on(0, || RaidArray::find("R").unwrap().is_degraded()));
    // Unlimited from the next window on.
    m.on(0, || {
        bdev_raid_set_options(RaidSetOptionsParams {
            process_window_size_kb: None,
            process_max_bandwidth_mb_sec: Some(0),
            ..Default::default()
        })
        .unwrap()
    });
    for _ in 0..50 {
        m.advance_ns(70_000_000);
        m.run_until_idle(100);
    }
    assert_eq!(progress(&m), None, "rebuild finished");
    m.on(0, || {
        let r = RaidArray::find("R").unwrap();
        assert!(!r.is_degraded());
        assert_eq!(r.state(), RaidState::Online);
    });
    let (mut x, mut y) = (vec![0u8; (BLOCKS * 512) as usize], vec![0u8; (BLOCKS * 512) as usize]);
    a.read_raw(0, &mut x);
    b.read_raw(0, &mut y);
    assert!(x == y && x[0] == 1, "the rebuilt copy is exact");
}

#[test]
fn hot_removed_member_leaves_the_mirror_degraded() {
    let m = ReactorSet::manual(2);
    m.on(0, || {
        malloc("A");
        malloc("B");
        bdev_raid_create(RaidCreateParams {
            name: "R".into(),
            raid_level: "1".into(),
            base_bdevs: vec!["A".into(), "B".into()],
            strip_size_kb: None,
            uuid: None,
            superblock: None,
            bitmap: None,
            bitmap_chunk_size_kb: None,
        })
        .unwrap();
        // The device vanishes (a controller gone): forced, claims ignored.
        let h = Registry::get().lookup("B").unwrap();
        Registry::get().force_unregister(h, |_| {});
    });
    for _ in 0..20 {
        m.run_until_idle(100);
        m.advance_ns(2_000_000);
    }
    m.on(0, || {
        let r = RaidArray::find("R").unwrap();
        assert_eq!(r.state(), RaidState::Online);
        assert!(r.is_degraded());
        let info = r.info_json();
        assert_eq!(info["base_bdevs_list"][1]["name"], Value::Null, "{info}");
        assert!(Registry::get().lookup("B").is_none());
    });
    // IO still works on the surviving copy.
    let log: Rc<RefCell<Vec<IoStatus>>> = Rc::default();
    m.on(1, || {
        let ch = Registry::get().lookup("R").unwrap().channel().unwrap();
        for t in [IoType::Write, IoType::Read] {
            let mut io = IoBox::data(t, 8, 8, DmaBuf::alloc(4096)).unwrap();
            let l = log.clone();
            io.set_done(Rc::new(move |io: IoBox| l.borrow_mut().push(io.status)));
            ch.submit(io);
        }
    });
    m.run_until_idle(100);
    assert_eq!(log.borrow().as_slice(), &[IoStatus::Success, IoStatus::Success]);
}
