//! Abort of IO the array still holds, on a manual (deterministic) reactor
//! set: a write waiting for its range behind an overlapping one (on the
//! owner reactor and on another), a write waiting for its bitmap batch, and
//! IO held by a suspend each complete with `Aborted`, reach no member, and
//! leave the range table, the bitmap counters and the suspend gate as if
//! they had never come: later overlapping writes run, the array suspends
//! and resumes, deletes cleanly, and counts no impossible state. IO already
//! at a member is not aborted (the answer is false).

mod common;
use bdev::error::{self, ErrorCreateParams, ErrorInjectParams, ErrorResumeParams};
use bdev::malloc::MallocBdev;
use bdev::{BdevIo, BdevProps, DmaBuf, IoBox, IoError, IoStatus, IoType, Registry};
use bdev_raid::rpc::{bdev_raid_create_async, bdev_raid_delete, RaidCreateParams, RaidDeleteParams};
use bdev_raid::RaidArray;
use common::run_async;
use reactor::{ManualSet, ReactorSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const BS: u64 = 512;

/// Statuses of completed test IOs, by the tag the test gave them.
type Done = Arc<Mutex<Vec<(u64, IoStatus)>>>;

/// Malloc members M0, M1 under error bdevs EE_M0, EE_M1.
fn members(m: &ManualSet, blocks: u64) -> Vec<Arc<MallocBdev>> {
    m.on(0, || {
        bdev_raid::init();
        (0..2)
            .map(|i| {
                let b = Arc::new(
                    MallocBdev::new(BdevProps::new(&format!("M{i}"), "Malloc disk", BS as u32, blocks, None)).unwrap(),
                );
                Registry::get().register(b.clone()).unwrap();
                error::create(ErrorCreateParams { base_name: format!("M{i}"), uuid: None }).unwrap();
                b
            })
            .collect()
    })
}

fn create(m: &ManualSet, superblock: bool) {
    run_async(m, |done| {
        bdev_raid_create_async(
            RaidCreateParams {
                name: "R".into(),
                raid_level: "raid1".into(),
                base_bdevs: vec!["EE_M0".into(), "EE_M1".into()],
                strip_size_kb: None,
                uuid: None,
                superblock: Some(superblock),
                bitmap: None,
                bitmap_chunk_size_kb: superblock.then_some(4),
            },
            done,
        )
    })
    .expect("create R");
}

/// Holds the next `num` writes that reach `EE_M{member}`.
fn hold_writes(m: &ManualSet, member: usize, num: u64) {
    m.on(0, move || {
        let p = ErrorInjectParams {
            name: format!("EE_M{member}"),
            io_type: "write".into(),
            error_type: "pending".into(),
            num: Some(num),
            queue_depth: None,
            corrupt_offset: None,
            corrupt_value: None,
            nvme_sct: None,
            nvme_sc: None,
        };
        error::inject(p).unwrap();
    });
}

fn release_writes(m: &ManualSet, member: usize) {
    m.on(0, move || error::resume_pending(ErrorResumeParams { name: format!("EE_M{member}") }).unwrap());
}

/// Submits a write of `n` blocks of `byte` at `lba` to R on reactor `r`.
fn write(m: &ManualSet, r: usize, tag: u64, lba: u64, n: u64, byte: u8, done: &Done) {
    let done = done.clone();
    m.on(r, move || {
        let buf = DmaBuf::alloc((n * BS) as usize).unwrap();
        buf.fill(byte);
        let mut io = IoBox::data(IoType::Write, lba, n, Some(buf)).unwrap();
        io.tag = tag;
        io.set_done(Rc::new(move |io: IoBox| done.lock().unwrap().push((io.tag, io.status))));
        Registry::get().lookup("R").unwrap().channel().unwrap().submit(io);
    });
}

/// `Channel::abort` of the IO tagged `tag` on reactor `r`'s channel of R.
fn abort(m: &ManualSet, r: usize, tag: u64) -> bool {
    m.on(r, move || {
        let ch = Registry::get().lookup("R").unwrap().channel().unwrap();
        ch.abort(&move |io: &BdevIo| io.tag == tag)
    })
}

fn status(done: &Done, tag: u64) -> Option<IoStatus> {
    done.lock().unwrap().iter().find(|(t, _)| *t == tag).map(|&(_, s)| s)
}

fn settle(m: &ManualSet) {
    for _ in 0..20 {
        m.run_until_idle(100);
        m.advance_ns(2_000_000);
    }
}

/// Bytes of blocks `[lba, lba + n)` of member `b` at `offset` blocks.
fn raw(b: &MallocBdev, offset: u64, lba: u64, n: u64) -> Vec<u8> {
    let mut v = vec![0u8; (n * BS) as usize];
    assert!(b.read_raw(((offset + lba) * BS) as usize, &mut v));
    v
}

fn suspend_and_resume(m: &ManualSet) {
    let suspended = Arc::new(AtomicBool::new(false));
    let s2 = suspended.clone();
    m.on(0, move || {
        RaidArray::find("R").unwrap().suspend(move |r| {
            r.expect("suspend");
            s2.store(true, Ordering::Release);
        })
    });
    settle(m);
    assert!(suspended.load(Ordering::Acquire), "the array drains: no aborted IO is still counted in flight");
    m.on(0, || RaidArray::find("R").unwrap().resume());
    settle(m);
}

fn impossible_events(m: &ManualSet) -> u64 {
    m.on(0, || RaidArray::find("R").unwrap().impossible_events())
}

#[test]
fn writes_waiting_for_their_range_abort_on_either_reactor_and_the_range_moves_on() {
    let m = ReactorSet::manual(2);
    let mallocs = members(&m, 512);
    create(&m, false);
    let done: Done = Arc::default();
    // W1 reaches both members; M0 holds it, so it keeps its range.
    hold_writes(&m, 0, 1);
    write(&m, 1, 1, 0, 8, 0xA1, &done);
    settle(&m);
    assert_eq!(status(&done, 1), None);
    assert!(!abort(&m, 1, 1), "a write already at a member cannot be called back");
    // W2 (reactor 1, not the owner) and W4 (reactor 0, the owner) wait for it.
    write(&m, 1, 2, 4, 8, 0xB2, &done);
    write(&m, 0, 4, 6, 1, 0xD4, &done);
    settle(&m);
    assert_eq!((status(&done, 2), status(&done, 4)), (None, None), "both wait for W1's range");
    assert!(abort(&m, 1, 2), "W2 waits for its range on a non-owner reactor");
    assert!(abort(&m, 0, 4), "W4 waits for its range on the owner reactor");
    assert!(!abort(&m, 1, 2), "already aborted");
    settle(&m);
    assert_eq!(status(&done, 2), Some(IoStatus::Failed(IoError::Aborted)));
    assert_eq!(status(&done, 4), Some(IoStatus::Failed(IoError::Aborted)));
    // W3 overlaps W2's old range: it runs once W1 is done.
    write(&m, 0, 3, 10, 2, 0xC3, &done);
    settle(&m);
    assert_eq!(status(&done, 3), None, "W3 is ordered after W1 (and the aborted writes)");
    release_writes(&m, 0);
    settle(&m);
    assert_eq!(status(&done, 1), Some(IoStatus::Success));
    assert_eq!(status(&done, 3), Some(IoStatus::Success));
    for b in &mallocs {
        assert!(raw(b, 0, 0, 8).iter().all(|&x| x == 0xA1), "W1 on every member");
        assert!(raw(b, 0, 8, 2).iter().all(|&x| x == 0), "the aborted W2 reached no member");
        assert!(raw(b, 0, 10, 2).iter().all(|&x| x == 0xC3), "W3 on every member");
    }
    // Nothing leaked: a later overlapping write runs at once, the gate drains.
    write(&m, 1, 5, 0, 12, 0xE5, &done);
    settle(&m);
    assert_eq!(status(&done, 5), Some(IoStatus::Success));
    suspend_and_resume(&m);
    assert_eq!(impossible_events(&m), 0);
}

#[test]
fn a_write_waiting_for_its_bitmap_batch_aborts_and_ends_its_mark() {
    let m = ReactorSet::manual(2);
    // 4 MiB members: superblock, bitmap, 1 MiB alignment, then data.
    let mallocs = members(&m, 8192);
    create(&m, true);
    let offset = m.on(0, || RaidArray::find("R").unwrap().info_json()["base_bdevs_list"][0]["data_offset"].as_u64());
    let offset = offset.unwrap();
    let done: Done = Arc::default();
    // The next write to EE_M0 is the page write of the batch that sets W's
    // chunk: held, so the batch stays in flight and W waits for it.
    hold_writes(&m, 0, 1);
    write(&m, 1, 1, 64, 4, 0xA1, &done);
    settle(&m);
    let bm = m.on(0, || RaidArray::find("R").unwrap().bitmap().unwrap());
    let chunk = 64 / bm.geometry().chunk_size_blocks;
    assert_eq!(status(&done, 1), None, "W waits for its bitmap batch");
    assert_eq!(bm.in_flight(chunk), 1);
    assert!(abort(&m, 1, 1));
    settle(&m);
    assert_eq!(status(&done, 1), Some(IoStatus::Failed(IoError::Aborted)));
    assert_eq!(bm.in_flight(chunk), 0, "the aborted write ended its mark");
    release_writes(&m, 0);
    settle(&m);
    for b in &mallocs {
        assert!(raw(b, offset, 64, 4).iter().all(|&x| x == 0), "the aborted write reached no member");
    }
    write(&m, 0, 2, 64, 4, 0xB2, &done);
    settle(&m);
    assert_eq!(status(&done, 2), Some(IoStatus::Success));
    for b in &mallocs {
        assert!(raw(b, offset, 64, 4).iter().all(|&x| x == 0xB2));
    }
    suspend_and_resume(&m);
    assert_eq!(impossible_events(&m), 0);
    let listed = m.on(0, || RaidArray::find("R").unwrap().info_json());
    assert_eq!(listed["impossible_events"], 0, "an array with a superblock lists the counter: {listed}");
    run_async(&m, |done| bdev_raid_delete(RaidDeleteParams { name: "R".into(), clear_sb: None }, done))
        .expect("delete waits for the bitmap and completes");
}

#[test]
fn io_held_by_a_suspend_aborts_and_is_not_resubmitted() {
    let m = ReactorSet::manual(2);
    let mallocs = members(&m, 512);
    create(&m, false);
    let done: Done = Arc::default();
    let suspended = Arc::new(AtomicBool::new(false));
    let s2 = suspended.clone();
    m.on(0, move || RaidArray::find("R").unwrap().suspend(move |_| s2.store(true, Ordering::Release)));
    settle(&m);
    assert!(suspended.load(Ordering::Acquire));
    write(&m, 1, 1, 0, 4, 0xA1, &done);
    write(&m, 1, 2, 8, 4, 0xB2, &done);
    settle(&m);
    assert!(abort(&m, 1, 1), "held by the suspend");
    assert!(!abort(&m, 0, 2), "held on reactor 1, not on reactor 0");
    settle(&m);
    assert_eq!(status(&done, 1), Some(IoStatus::Failed(IoError::Aborted)));
    m.on(0, || RaidArray::find("R").unwrap().resume());
    settle(&m);
    assert_eq!(status(&done, 2), Some(IoStatus::Success), "the other held write runs at resume");
    for b in &mallocs {
        assert!(raw(b, 0, 0, 4).iter().all(|&x| x == 0), "the aborted write was not resubmitted");
        assert!(raw(b, 0, 8, 4).iter().all(|&x| x == 0xB2));
    }
    suspend_and_resume(&m);
    assert_eq!(impossible_events(&m), 0);
}
