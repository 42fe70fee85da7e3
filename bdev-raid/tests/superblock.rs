//! Arrays with superblocks over file members, in process: create writes a
//! superblock and bitmap to every member; a clean delete marks them clean; a
//! new reactor set (a restart) assembles the array from the files with no
//! create call; `clear_sb` stops that.

mod common;
use bdev::{BdevHandle, DmaBuf, IoBox, IoType, Registry};
use bdev_raid::rpc::{bdev_raid_create_async, RaidCreateParams};
use bdev_raid::RaidArray;
use common::files::*;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::rc::Rc;

fn wait_online(set: &Set) {
    set.wait_for(20, "raid assembled and online", || {
        RaidArray::find("R").is_some_and(|r| r.state() == bdev_raid::RaidState::Online && !r.process_running())
    });
}

#[test]
fn superblocks_are_written_marked_clean_and_assemble_after_restart() {
    let dir = temp_dir("life");
    let files = make_files(&dir, 2, 16);
    let data_offset;
    {
        let (set, offset) = start_with_sb_raid(&files, 1024);
        data_offset = offset;
        assert!(data_offset > 0);
        for f in &files {
            let sb = file_sb(f).unwrap();
            assert!(!sb.clean, "a running array's superblock is dirty");
            assert!(sb.bitmap.is_some());
        }
        let pattern: Vec<u8> = (0..BS).map(|i| (i * 7 % 251) as u8).collect();
        raid_io(&set, IoType::Write, 5, 1, Some(pattern.clone()));
        delete_raid(&set, false);
        for f in &files {
            let sb = file_sb(f).unwrap();
            assert!(sb.clean, "clean after delete");
            let bytes = std::fs::read(f).unwrap();
            let at = ((data_offset + 5) * BS) as usize;
            assert_eq!(&bytes[at..at + BS as usize], &pattern[..], "data at the data offset");
        }
    }
    {
        // A restart: the members alone bring the array back, clean (no resync).
        let set = start(2);
        open_members(&set, &files);
        wait_online(&set);
        let copied = set.call(0, || RaidArray::find("R").unwrap().copied_blocks());
        assert_eq!(copied, 0, "a clean array resyncs nothing");
        let back = raid_io(&set, IoType::Read, 5, 1, None);
        assert_eq!(back[..16], (0..16).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>()[..]);
        delete_raid(&set, true);
        for f in &files {
            assert!(file_sb(f).is_err(), "clear_sb wiped the superblock");
        }
    }
    {
        let set = start(1);
        open_members(&set, &files);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(set.call(0, || RaidArray::find("R").is_none()), "a wiped array does not assemble");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn check(set: &Set, repair: bool) -> Value {
    set.call_async(0, 30, move |done| {
        bdev_raid::rpc::bdev_raid_check(bdev_raid::rpc::RaidCheckParams { name: "R".into(), repair }, done)
    })
    .unwrap()
}

#[test]
fn check_counts_mismatches_and_repair_fixes_them() {
    use std::os::unix::fs::FileExt;
    let dir = temp_dir("check");
    let files = make_files(&dir, 2, 8);
    let (set, data_offset) = start_with_sb_raid(&files, 1024);
    // (Block 300 is in another bitmap chunk: written, so checked.)
    for lba in [0u64, 7, 100, 300] {
        raid_io(&set, IoType::Write, lba, 1, Some(vec![lba as u8 + 1; BS as usize]));
    }
    let clean = check(&set, false);
    assert_eq!(clean["mismatched_blocks"], 0, "{clean}");
    assert_eq!(clean["completed"], true);
    // Damage two blocks of the second copy behind the array's back.
    let f = std::fs::OpenOptions::new().write(true).open(&files[1]).unwrap();
    for lba in [7u64, 300] {
        f.write_all_at(&[0xEE; BS as usize], (data_offset + lba) * BS).unwrap();
    }
    f.sync_all().unwrap();
    let found = check(&set, false);
    assert_eq!(found["mismatched_blocks"], 2, "{found}");
    assert_eq!(found["repaired_blocks"], 0, "{found}");
    let fixed = check(&set, true);
    assert_eq!(fixed["mismatched_blocks"], 2, "{fixed}");
    assert_eq!(fixed["repaired_blocks"], 2, "{fixed}");
    let after = check(&set, false);
    assert_eq!(after["mismatched_blocks"], 0, "{after}");
    // The repair copied from the first copy: the written data is back.
    let bytes = std::fs::read(&files[1]).unwrap();
    let at = ((data_offset + 7) * BS) as usize;
    assert!(bytes[at..at + BS as usize].iter().all(|&b| b == 8));
    let listed = set.call(0, || RaidArray::find("R").unwrap().info_json());
    assert_eq!(listed["last_check"]["mismatched_blocks"], 0, "{listed}");
    delete_raid(&set, true);
    drop(set);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_write_that_lost_a_copy_is_acknowledged_only_after_the_superblock_records_the_failure() {
    let dir = temp_dir("ackorder");
    let files = make_files(&dir, 2, 8);
    let set = start(2);
    open_members(&set, &files);
    set.call(0, || {
        bdev::error::create(bdev::error::ErrorCreateParams { base_name: "F0".into(), uuid: None }).unwrap();
    });
    let created = set.call_async(0, 20, move |done| {
        bdev_raid_create_async(
            RaidCreateParams {
                name: "R".into(),
                raid_level: "raid1".into(),
                base_bdevs: vec!["EE_F0".into(), "F1".into()],
                strip_size_kb: None,
                uuid: None,
                superblock: Some(true),
                bitmap: None,
                bitmap_chunk_size_kb: Some(1024),
            },
            done,
        )
    });
    created.unwrap();
    let before = file_sb(&files[1]).unwrap();
    assert_eq!(before.slots[0].state, bdev_raid::superblock::SlotState::Active);
    set.call(0, || {
        let p = serde_json::from_value(serde_json::json!({
            "name": "EE_F0", "io_type": "write", "error_type": "failure", "num": 1
        }))
        .unwrap();
        bdev::error::inject(p).unwrap();
    });
    // Succeeds on the surviving copy; by the time it is acknowledged the
    // survivor's superblock must already say slot 0 failed, else a crash
    // now would let a resync copy the stale slot 0 over it.
    // The superblock is read inside the completion, at the instant of the ack.
    let f1 = files[1].clone();
    let after = set.call_async(0, 20, move |done| {
        let h: BdevHandle = Registry::get().lookup("R").expect("raid bdev");
        let buf = DmaBuf::alloc(BS as usize).unwrap();
        buf.fill(0x5A);
        let mut io = IoBox::data(IoType::Write, 3, 1, Some(buf)).unwrap();
        let done = std::cell::RefCell::new(Some(done));
        io.set_done(Rc::new(move |io: IoBox| {
            assert!(io.status.is_ok(), "the write survives on one copy: {:?}", io.status);
            if let Some(d) = done.borrow_mut().take() {
                d(file_sb(&f1).unwrap());
            }
        }));
        h.channel().unwrap().submit(io);
    });
    assert_eq!(after.slots[0].state, bdev_raid::superblock::SlotState::Failed, "{after:?}");
    assert!(after.events > before.events);
    delete_raid(&set, false);
    drop(set);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Data areas of two member files, compared.
fn same_data(a: &Path, b: &Path, data_offset: u64) -> bool {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let at = (data_offset * BS) as usize;
    x[at..] == y[at..]
}

#[test]
fn a_missing_member_starts_the_array_degraded_and_coming_back_resyncs_only_what_it_missed() {
    let dir = temp_dir("degraded");
    let files = make_files(&dir, 2, 16);
    let data_offset;
    {
        let (set, offset) = start_with_sb_raid(&files, 1024);
        data_offset = offset;
        for lba in [0u64, 1000, 2000] {
            raid_io(&set, IoType::Write, lba, 1, Some(vec![1; BS as usize]));
        }
        delete_raid(&set, false);
    }
    let set = start(2);
    set.call(0, || {
        bdev_raid::init();
        let o = bdev_raid::rpc::RaidSetOptionsParams { assemble_timeout_sec: Some(1), ..Default::default() };
        bdev_raid::rpc::bdev_raid_set_options(o).unwrap();
    });
    open_member(&set, &files[0], "F0");
    // Configuring first: the superblock counts on F1.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let state = set.call(0, || RaidArray::find("R").map(|r| r.state()));
    assert_eq!(state, Some(bdev_raid::RaidState::Configuring));
    set.wait_for(10, "degraded start", || {
        RaidArray::find("R").is_some_and(|r| r.state() == bdev_raid::RaidState::Online && r.is_degraded())
    });
    // Two chunks (256 blocks of 4 KiB each) written while F1 is away.
    for lba in [1000u64, 1001, 2000] {
        raid_io(&set, IoType::Write, lba, 1, Some(vec![2; BS as usize]));
    }
    open_member(&set, &files[1], "F1");
    set.wait_for(20, "F1 back in sync", || {
        RaidArray::find("R").is_some_and(|r| !r.is_degraded() && !r.process_running())
    });
    let copied = set.call(0, || RaidArray::find("R").unwrap().copied_blocks());
    assert_eq!(copied, 2 * 256, "only the two chunks written while F1 was away are copied");
    delete_raid(&set, false);
    drop(set);
    assert!(same_data(&files[0], &files[1], data_offset), "copies identical after the partial resync");
    let bytes = std::fs::read(&files[1]).unwrap();
    for (lba, want) in [(0u64, 1u8), (1000, 2), (1001, 2), (2000, 2)] {
        let at = ((data_offset + lba) * BS) as usize;
        assert!(bytes[at..at + BS as usize].iter().all(|&b| b == want), "lba {lba}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stale_member_present_at_start_is_never_read_and_resyncs_only_what_it_missed() {
    // Either registration order: the stale member first (the plan holds it
    // stale) or last (it joins the running array).
    stale_member_scenario(&[0, 1]);
    stale_member_scenario(&[1, 0]);
}

fn stale_member_scenario(order: &[usize]) {
    let dir = temp_dir(&format!("stale{}", order[0]));
    let files = make_files(&dir, 2, 16);
    let data_offset;
    {
        let (set, offset) = start_with_sb_raid(&files, 1024);
        data_offset = offset;
        raid_io(&set, IoType::Write, 10, 1, Some(vec![1; BS as usize]));
        // F1 leaves; the array goes on and records it failed.
        remove_member(&set, "F1");
        raid_io(&set, IoType::Write, 10, 1, Some(vec![3; BS as usize]));
        raid_io(&set, IoType::Write, 700, 1, Some(vec![3; BS as usize]));
        delete_raid(&set, false);
    }
    let sb1 = file_sb(&files[1]).unwrap();
    let sb0 = file_sb(&files[0]).unwrap();
    assert!(sb1.events < sb0.events, "F1 missed updates: {} vs {}", sb1.events, sb0.events);
    let set = start(2);
    set.call(0, bdev_raid::init);
    for &i in order {
        open_member(&set, &files[i], &format!("F{i}"));
    }
    // F1 joins stale (whichever of the two registers first): written,
    // never read — reads of lba 10 must give 3.
    set.wait_for(20, "assembled with both", || {
        RaidArray::find("R").is_some_and(|r| r.state() == bdev_raid::RaidState::Online && r.members()[1].0.is_some())
    });
    for _ in 0..8 {
        let b = raid_io(&set, IoType::Read, 10, 1, None);
        assert!(b.iter().all(|&x| x == 3), "a read returned the stale copy");
    }
    set.wait_for(20, "resync done", || RaidArray::find("R").is_some_and(|r| !r.process_running() && !r.is_degraded()));
    let copied = set.call(0, || RaidArray::find("R").unwrap().copied_blocks());
    assert_eq!(copied, 2 * 256, "the two chunks written while F1 was away");
    delete_raid(&set, false);
    drop(set);
    assert!(same_data(&files[0], &files[1], data_offset));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_full_rebuild_interrupted_by_a_crash_resumes_where_the_superblock_says() {
    use bdev_raid::superblock::SlotState;
    let dir = temp_dir("resume");
    let files = make_files(&dir, 3, 16);
    let recorded;
    {
        let set = start(2);
        open_members(&set, &files[..2]);
        create_sb_raid(&set, 2, 1024).unwrap();
        // Data in chunks (of 256 blocks) 1 to 13: the rebuild copies them.
        for lba in (1..14u64).map(|c| c * 256 + 100) {
            raid_io(&set, IoType::Write, lba, 1, Some(vec![7; BS as usize]));
        }
        // Their bits cleared (an idle array), so the crash leaves no dirty
        // chunk: what is copied after it is the rebuild's rest alone.
        set.wait_for(10, "bitmap clean", || {
            RaidArray::find("R").is_some_and(|r| r.info_json()["bitmap"]["dirty_chunks"] == 0)
        });
        // A slow rebuild onto a blank F2: 64 KiB windows at 2 MiB/s.
        set_process_rate(&set, 64, 2);
        remove_member(&set, "F1");
        open_member(&set, &files[2], "F2");
        add_member(&set, "F2");
        // Wait until the superblock records some progress, then crash.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        recorded = loop {
            if let SlotState::Rebuilding { recovery_offset_blocks: r } = file_sb(&files[0]).unwrap().slots[1].state {
                if r > 0 {
                    break r;
                }
            }
            assert!(std::time::Instant::now() < deadline, "rebuild progress never reached the superblock");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
    }
    let set = start(2);
    set.call(0, bdev_raid::init);
    open_member(&set, &files[0], "F0");
    open_member(&set, &files[2], "F2");
    set.wait_for(20, "rebuild finished", || {
        RaidArray::find("R")
            .is_some_and(|r| r.state() == bdev_raid::RaidState::Online && !r.is_degraded() && !r.process_running())
    });
    let (copied, blocks) = set
        .call(0, || RaidArray::find("R").map(|r| (r.copied_blocks(), r.geometry().unwrap().array_blocks())).unwrap());
    let data_offset = common::files::data_offset(&set);
    delete_raid(&set, false);
    drop(set);
    // The crash also left the superblock dirty, with no dirty chunk; the
    // rebuild copies only written chunks (1 to 13), so the copy is exactly
    // their part from the recorded offset on.
    assert!(recorded > 0 && recorded < 14 * 256, "recorded {recorded} of {blocks}");
    let rest: u64 = (1..14u64).map(|c| ((c + 1) * 256).saturating_sub(recorded.max(c * 256))).sum();
    assert_eq!(copied, rest, "the rebuild resumed at {recorded} of {blocks}");
    assert!(same_data(&files[0], &files[2], data_offset), "the resumed rebuild completed the copy");
    let _ = std::fs::remove_dir_all(&dir);
}

fn create_sb_raid10(set: &Set) {
    set.call_async(0, 20, move |done| {
        bdev_raid_create_async(
            RaidCreateParams {
                name: "R".into(),
                raid_level: "raid10".into(),
                base_bdevs: (0..4).map(|i| format!("F{i}")).collect(),
                strip_size_kb: Some(64),
                uuid: None,
                superblock: Some(true),
                bitmap: None,
                bitmap_chunk_size_kb: Some(1024),
            },
            done,
        )
    })
    .unwrap();
}

/// raid10 (near-2 over four members: pairs 0+1 and 2+3) with a superblock:
/// a member that comes back is resynced only in the chunks written while
/// it was away, and after a crash the dirty chunks are resynced so each
/// pair's copies agree.
#[test]
fn raid10_with_a_bitmap_readds_and_recovers_from_a_crash() {
    let dir = temp_dir("raid10");
    let files = make_files(&dir, 4, 16);
    let (data_offset, blocks);
    {
        let set = start(2);
        open_members(&set, &files);
        create_sb_raid10(&set);
        data_offset = common::files::data_offset(&set);
        blocks = set.call(0, || RaidArray::find("R").unwrap().geometry().unwrap().array_blocks());
        for lba in (0..blocks).step_by(97) {
            raid_io(&set, IoType::Write, lba, 1, Some(vec![(lba % 251) as u8 + 1; BS as usize]));
        }
        set.wait_for(10, "bits cleared", || RaidArray::find("R").unwrap().bitmap().unwrap().dirty_chunks().is_empty());
        remove_member(&set, "F1");
        // Two chunks of 256 blocks written while F1 is away.
        for lba in [300u64, 301, 5000] {
            raid_io(&set, IoType::Write, lba, 1, Some(vec![0xC3; BS as usize]));
        }
        add_member(&set, "F1");
        set.wait_for(20, "F1 back", || RaidArray::find("R").is_some_and(|r| !r.is_degraded() && !r.process_running()));
        let copied = set.call(0, || RaidArray::find("R").unwrap().copied_blocks());
        assert_eq!(copied, 2 * 256, "only the two chunks written while F1 was away");
        // Keep bits set, write, and crash with the array running.
        set.call(0, || RaidArray::find("R").unwrap().bitmap().unwrap().set_in_sync(false));
        for lba in [10u64, 7000] {
            raid_io(&set, IoType::Write, lba, 1, Some(vec![0x5E; BS as usize]));
        }
    }
    // One copy of a dirty block differs, as if the crash cut a write short.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&files[1]).unwrap();
        let bytes = std::fs::read(&files[0]).unwrap();
        let probe = (0..(bytes.len() as u64 / BS - data_offset))
            .find(|b| bytes[((data_offset + b) * BS) as usize] == 0x5E)
            .expect("member 0 holds a block of the last writes");
        f.write_all_at(&[0x11; BS as usize], (data_offset + probe) * BS).unwrap();
    }
    let set = start(2);
    open_members(&set, &files);
    wait_online(&set);
    set.wait_for(20, "resynced", || RaidArray::find("R").is_some_and(|r| !r.process_running()));
    let copied = set.call(0, || RaidArray::find("R").unwrap().copied_blocks());
    assert!(copied > 0 && copied <= 4 * 256, "resync of the dirty chunks only: {copied}");
    for lba in [300u64, 5000, 10, 7000] {
        let want = if lba == 10 || lba == 7000 { 0x5E } else { 0xC3 };
        let got = raid_io(&set, IoType::Read, lba, 1, None);
        assert!(got.iter().all(|&b| b == want), "lba {lba}");
    }
    delete_raid(&set, false);
    drop(set);
    assert!(same_data(&files[0], &files[1], data_offset), "pair 0+1 identical");
    assert!(same_data(&files[2], &files[3], data_offset), "pair 2+3 identical");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A daemon shutdown unregisters the array with no fence while a rebuild
/// runs (a window may be copying; teardown stops the rebuild first). The
/// unregister completes, the superblock is clean, and the member being
/// rebuilt stays recorded as rebuilding.
#[test]
fn shutdown_during_a_rebuild_waits_for_the_window_and_leaves_it_recorded() {
    use bdev_raid::superblock::SlotState;
    let dir = temp_dir("shutdown-rebuild");
    let files = make_files(&dir, 3, 16);
    let (set, _) = start_with_sb_raid(&files[..2], 1024);
    // A block in every chunk (of 256 blocks): the rebuild copies them all.
    let blocks = set.call(0, || RaidArray::find("R").unwrap().geometry().unwrap().array_blocks());
    for lba in (0..blocks).step_by(256) {
        raid_io(&set, IoType::Write, lba, 1, Some(vec![1; BS as usize]));
    }
    set_process_rate(&set, 256, 4);
    remove_member(&set, "F1");
    open_member(&set, &files[2], "F2");
    add_member(&set, "F2");
    set.wait_for(10, "rebuild running", || RaidArray::find("R").is_some_and(|r| r.rebuild_running()));
    set.call_async(0, 20, |done| Registry::get().unregister("R", done)).unwrap();
    assert!(set.call(0, || RaidArray::find("R").is_none()), "the array is gone");
    let sb = file_sb(&files[0]).unwrap();
    assert!(sb.clean, "{sb:?}");
    assert!(matches!(sb.slots[1].state, SlotState::Rebuilding { .. }), "{sb:?}");
    drop(set);
    let _ = std::fs::remove_dir_all(&dir);
}
