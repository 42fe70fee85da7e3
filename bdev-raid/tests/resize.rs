//! Member resize: a raid1 of two null members grows only once both grew
//! (the smallest member governs, as in SPDK's raid1 resize), its bdev's
//! holders hear of it, and IO past the old end then succeeds; a concat
//! (a level that does not grow with its members) keeps its size; a member
//! that shrinks below what the array uses of it fails (the array runs
//! degraded), and the array never shrinks with it.

mod common;

use bdev::malloc::NullBdev;
use bdev::{BdevEvent, BdevProps, IoStatus, IoType, Registry};
use bdev_raid::{RaidArray, RaidState};
use common::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MEMBER_BLOCKS: u64 = 2048;

fn null(name: &str, blocks: u64) {
    let b = NullBdev::new(BdevProps::new(name, "Null disk", BLOCK as u32, blocks, None)).unwrap();
    Registry::get().register(Arc::new(b)).unwrap();
}

fn blocks_of(set: &Set, name: &'static str) -> u64 {
    set.call(0, move || Registry::get().lookup(name).unwrap().num_blocks())
}

/// Resizes a member as its module would (growth never refused).
fn grow(set: &Set, name: &'static str, blocks: u64) {
    set.call(0, move || Registry::get().lookup(name).unwrap().notify_blockcnt_change(blocks)).unwrap();
}

/// One IO on the array from reactor 1; its status.
fn io_at(set: &Set, t: IoType, lba: u64) -> IoStatus {
    set.call_async(1, 10, move |done| {
        let ch = Registry::get().lookup("R").unwrap().channel().unwrap();
        let buf = bdev::DmaBuf::alloc(BLOCK as usize).unwrap();
        let mut io = bdev::IoBox::data(t, lba, 1, Some(buf)).unwrap();
        let done = std::cell::RefCell::new(Some(done));
        io.set_done(std::rc::Rc::new(move |io: bdev::IoBox| {
            if let Some(d) = done.borrow_mut().take() {
                d(io.status);
            }
        }));
        ch.submit(io);
    })
}

/// Gives the owner reactor time to act on an event that should change nothing.
fn settle() {
    std::thread::sleep(Duration::from_millis(100));
}

#[test]
fn raid1_grows_when_every_member_grew_and_fails_a_member_that_shrank() {
    let set = start(2);
    set.call(0, || {
        null("N0", MEMBER_BLOCKS);
        null("N1", MEMBER_BLOCKS);
        create_raid("R", "raid1", None, &["N0", "N1"]).unwrap();
    });
    assert_eq!(blocks_of(&set, "R"), MEMBER_BLOCKS);
    let heard = Arc::new(Mutex::new(Vec::new()));
    let h2 = heard.clone();
    set.call(0, move || {
        Registry::get().lookup("R").unwrap().on_event(move |ev| h2.lock().unwrap().push(ev));
    });
    assert_eq!(io_at(&set, IoType::Write, MEMBER_BLOCKS + 10), IoStatus::Failed(bdev::IoError::OutOfRange));

    grow(&set, "N0", 2 * MEMBER_BLOCKS);
    settle();
    assert_eq!(blocks_of(&set, "R"), MEMBER_BLOCKS, "one member grew: the other still governs");
    assert!(heard.lock().unwrap().is_empty());

    grow(&set, "N1", 3 * MEMBER_BLOCKS);
    set.wait_for(10, "the array to grow", || Registry::get().lookup("R").unwrap().num_blocks() == 2 * MEMBER_BLOCKS);
    assert_eq!(
        heard.lock().unwrap().as_slice(),
        [BdevEvent::Resize { old_blocks: MEMBER_BLOCKS, new_blocks: 2 * MEMBER_BLOCKS }],
        "the array's holders heard of the grow (to the smaller member's size)"
    );
    let info = set.call(0, || RaidArray::find("R").unwrap().info_json());
    set.wait_for(10, "the resync of the new blocks", || !RaidArray::find("R").unwrap().process_running());
    let copied = set.call(0, || RaidArray::find("R").unwrap().copied_blocks());
    assert!(copied >= MEMBER_BLOCKS, "the new blocks were resynced ({copied} copied)");
    assert_eq!(io_at(&set, IoType::Write, MEMBER_BLOCKS + 10), IoStatus::Success, "{info}");
    assert_eq!(io_at(&set, IoType::Read, 2 * MEMBER_BLOCKS - 1), IoStatus::Success);
    assert_eq!(set.call(0, || RaidArray::find("R").unwrap().state()), RaidState::Online);
    assert!(!set.call(0, || RaidArray::find("R").unwrap().is_degraded()));

    // N1 shrinks below the array's use (its namespace shrank, say): the
    // bdev layer lets a device's real shrink through; the array fails N1.
    set.call(0, || Registry::get().lookup("N1").unwrap().media_resized(MEMBER_BLOCKS)).unwrap();
    set.wait_for(10, "the shrunk member to fail", || RaidArray::find("R").unwrap().is_degraded());
    assert_eq!(set.call(0, || RaidArray::find("R").unwrap().state()), RaidState::Online);
    assert_eq!(blocks_of(&set, "R"), 2 * MEMBER_BLOCKS, "the array never shrinks with a member");
    assert_eq!(io_at(&set, IoType::Write, 2 * MEMBER_BLOCKS - 1), IoStatus::Success, "served by N0");
    let members = set.call(0, || RaidArray::find("R").unwrap().members());
    assert_eq!(members[0], (Some("N0".to_string()), true));
    assert!(!members[1].1, "N1 is no longer an active member: {members:?}");
}

#[test]
fn a_level_that_does_not_grow_keeps_its_size_and_shrink_is_refused_to_modules() {
    let set = start(2);
    set.call(0, || {
        null("C0", MEMBER_BLOCKS);
        null("C1", MEMBER_BLOCKS);
        create_raid("R", "concat", Some(64), &["C0", "C1"]).unwrap();
    });
    let size = blocks_of(&set, "R");
    grow(&set, "C0", 2 * MEMBER_BLOCKS);
    grow(&set, "C1", 2 * MEMBER_BLOCKS);
    settle();
    assert_eq!(blocks_of(&set, "R"), size, "concat keeps its size (its layout would move data)");
    // A module may not shrink a claimed bdev (SPDK: EBUSY while open).
    let r = set.call(0, || Registry::get().lookup("C0").unwrap().notify_blockcnt_change(MEMBER_BLOCKS / 2));
    const EBUSY: i32 = 16;
    assert_eq!(r.map_err(|e| e.errno()), Err(EBUSY));
    assert_eq!(blocks_of(&set, "C0"), 2 * MEMBER_BLOCKS);
    assert!(!set.call(0, || RaidArray::find("R").unwrap().is_degraded()));
}

#[test]
fn raid0_grows_by_whole_strips_of_the_smallest_member() {
    let set = start(2);
    set.call(0, || {
        null("S0", MEMBER_BLOCKS);
        null("S1", MEMBER_BLOCKS);
        create_raid("R", "raid0", Some(64), &["S0", "S1"]).unwrap();
    });
    assert_eq!(blocks_of(&set, "R"), 2 * MEMBER_BLOCKS);
    // 64 KiB strips are 128 blocks: S0's 3000 blocks hold 23 whole strips.
    grow(&set, "S0", 3000);
    grow(&set, "S1", 5000);
    set.wait_for(10, "the array to grow", || Registry::get().lookup("R").unwrap().num_blocks() == 2 * 23 * 128);
    assert_eq!(io_at(&set, IoType::Write, 2 * 23 * 128 - 1), IoStatus::Success);
    assert_eq!(set.call(0, || RaidArray::find("R").unwrap().copied_blocks()), 0, "raid0 has nothing to resync");
}

/// Grows member file `i` (F<i>) to `mib` MiB and rescans it as
/// `bdev_uring_rescan` does.
fn grow_file(set: &Set, files: &[std::path::PathBuf], i: usize, mib: u64) {
    std::fs::OpenOptions::new().write(true).open(&files[i]).unwrap().set_len(mib << 20).unwrap();
    let name = format!("F{i}");
    set.call(0, move || {
        let h = Registry::get().lookup(&name).unwrap();
        let blocks = h.bdev().rescan_blocks().expect("a file bdev measures its file").unwrap();
        h.notify_blockcnt_change(blocks)
    })
    .unwrap();
}

fn create_sb_raid1(set: &Set, bitmap: bool) {
    set.call_async(0, 20, move |done| {
        let p = bdev_raid::rpc::RaidCreateParams {
            name: "R".into(),
            raid_level: "raid1".into(),
            base_bdevs: vec!["F0".into(), "F1".into()],
            strip_size_kb: None,
            uuid: None,
            superblock: Some(true),
            bitmap: Some(bitmap),
            bitmap_chunk_size_kb: None,
        };
        bdev_raid::rpc::bdev_raid_create_async(p, done)
    })
    .expect("create R");
}

/// With a superblock, the grown sizes are recorded on every member (array
/// size and each slot's data size) before the array's bdev takes them; an
/// array with a write-intent bitmap, which covers only the size it was made
/// for, keeps its size.
#[test]
fn a_grown_raid1_records_its_size_in_the_superblock_and_a_bitmap_refuses_growth() {
    let dir = files::temp_dir("resize");
    let f = files::make_files(&dir, 2, 8);
    let set = start(2);
    files::open_members(&set, &f);
    create_sb_raid1(&set, false);
    let old = blocks_of(&set, "R");
    let offset = files::data_offset(&set);
    assert_eq!(old, (8 << 20) / files::BS - offset);
    grow_file(&set, &f, 0, 16);
    grow_file(&set, &f, 1, 16);
    let new = (16 << 20) / files::BS - offset;
    set.wait_for(10, "the array to grow", move || Registry::get().lookup("R").unwrap().num_blocks() == new);
    for file in &f {
        let sb = files::file_sb(file).unwrap();
        assert_eq!(sb.array_blocks, new, "the superblock records the new size");
        assert!(sb.slots.iter().all(|s| s.data_size_blocks == new), "{:?}", sb.slots);
    }
    set.wait_for(10, "the resync of the new blocks", || !RaidArray::find("R").unwrap().process_running());
    files::raid_io(&set, IoType::Write, new - 1, 1, Some(vec![7u8; files::BS as usize]));
    drop(set);
    // A restart assembles the array at its grown size from the superblocks.
    let set = start(2);
    files::open_members(&set, &f);
    set.wait_for(10, "the array to assemble", move || {
        Registry::get().lookup("R").is_some_and(|h| h.num_blocks() == new)
    });
    let back = files::raid_io(&set, IoType::Read, new - 1, 1, None);
    assert!(back.iter().all(|&b| b == 7), "the block written past the old end survived the restart");
    files::delete_raid(&set, true);
    drop(set);

    let f2 = files::make_files(&dir, 2, 8);
    let set = start(2);
    files::open_members(&set, &f2);
    create_sb_raid1(&set, true);
    let old = blocks_of(&set, "R");
    grow_file(&set, &f2, 0, 16);
    grow_file(&set, &f2, 1, 16);
    settle();
    assert_eq!(blocks_of(&set, "R"), old, "the bitmap covers only the old size");
    assert_eq!(files::file_sb(&f2[0]).unwrap().array_blocks, old);
    files::delete_raid(&set, true);
    drop(set);
    let _ = std::fs::remove_dir_all(&dir);
}
