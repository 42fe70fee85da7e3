//! Recovery of arrays with superblocks, in process over uring file members
//! (threaded reactor set): a member that comes back is resynced only in the
//! chunks written while it was away (a blank bdev gets everything);
//! corrupted superblocks are reported and never assembled; a delete under IO
//! completes and leaves clean, identical members; a crash (the reactor set
//! stops with the array running, no teardown) leaves dirty superblocks, and
//! the next assembly resyncs the dirty chunks so both copies agree and every
//! acknowledged write reads back — also when the set stops with writes in
//! flight (which used to abort the process in bdev's thread-local IO state:
//! this test is that bug's regression test).

mod common;
use bdev::{IoType, Registry};
use bdev_raid::rpc::{bdev_raid_delete, RaidDeleteParams};
use bdev_raid::superblock::{decode, try_encode, Superblock, SuperblockInfo, SB_SIZE_BYTES};
use bdev_raid::RaidArray;
use common::files::*;
use common::load::*;
use common::*;
use serde_json::Value;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

// ---- helpers (see also common::files) ----------------------------------------

/// All superblock examinations and assemblies decided.
fn wait_examined(set: &Set) {
    set.wait_for(10, "examinations done", || Registry::get().examines_pending() == 0);
}

fn claimed_by(set: &Set, bdev: &str) -> Option<String> {
    let bdev = bdev.to_string();
    set.call(0, move || Registry::get().lookup(&bdev).expect("member bdev").claimed_by())
}

fn problems(set: &Set) -> Vec<String> {
    set.call(0, RaidArray::problems)
}

/// The data area of a member file: array blocks `[0, blocks)`.
fn file_data(f: &Path, data_offset: u64, blocks: u64) -> Vec<u8> {
    let bytes = std::fs::read(f).unwrap();
    let at = (data_offset * BS) as usize;
    bytes[at..at + (blocks * BS) as usize].to_vec()
}

fn first_diff_block(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(BS as usize).zip(b.chunks(BS as usize)).position(|(x, y)| x != y)
}

/// Whether `blk` at array block `lba` holds one of the `allowed` stamps'
/// patterns (stamp 0: zeros, never written).
// ---- 1. re-add ----------------------------------------------------------------

#[test]
fn returning_member_resyncs_only_missed_chunks_and_a_blank_bdev_gets_everything() {
    let dir = temp_dir("readd");
    let files = make_files(&dir, 3, 32);
    let set = start(2);
    open_members(&set, &files[..2]);
    create_sb_raid(&set, 2, 256).expect("create R");
    let (off, blocks) = layout(&set);
    let chunk = 256 * 1024 / BS;
    assert_eq!(info(&set)["bitmap"]["num_chunks"].as_u64(), Some(blocks.div_ceil(chunk)), "{}", info(&set));
    assert!(blocks / chunk >= 100, "many chunks: {blocks} blocks");

    // Every block written once (stamp 1), then the bitmap clears itself.
    let mut expect: Vec<Vec<u64>> = vec![vec![1]; blocks as usize];
    for lba in (0..blocks).step_by(256) {
        let n = 256.min(blocks - lba);
        raid_io(&set, IoType::Write, lba, n, Some(blocks_of(1, lba, n)));
    }
    set.wait_for(10, "bitmap clean", || RaidArray::find("R").unwrap().bitmap().unwrap().dirty_chunks().is_empty());
    let copied0 = copied(&set);
    assert_eq!(copied0, 0, "nothing to copy yet");

    // F1 leaves; a few writes land in chunks 5, 77 and 78 (stamp 2).
    remove_member(&set, "F1");
    let i = info(&set);
    assert_eq!(i["base_bdevs_list"][1]["state"], "empty", "{i}");
    let touched = [5u64, 77, 78];
    for &c in &touched {
        for (lba, n) in [(c * chunk + 3, 1), (c * chunk + chunk - 2, 2)] {
            raid_io(&set, IoType::Write, lba, n, Some(blocks_of(2, lba, n)));
            expect[lba as usize..(lba + n) as usize].fill(vec![2]);
        }
    }
    let dirty: Vec<u64> = set.call(0, || RaidArray::find("R").unwrap().bitmap().unwrap().dirty_chunks());
    assert_eq!(dirty, touched.to_vec(), "the bitmap holds exactly the chunks written while degraded");

    // It comes back: only those chunks are copied.
    add_member(&set, "F1");
    wait_settled(&set, 30);
    assert_eq!(
        copied(&set) - copied0,
        touched.len() as u64 * chunk,
        "a returning member is resynced in the missed chunks only: {}",
        info(&set)
    );
    let a = file_data(&files[0], off, blocks);
    let b = file_data(&files[1], off, blocks);
    assert_eq!(first_diff_block(&a, &b), None, "members differ after the resync (array block shown)");
    let bad = model_mismatches(&a, &expect);
    assert!(bad.is_empty(), "member data (lba, want stamp, got (stamp, lba)): {bad:?}");

    // A different, blank bdev in the same degraded array: a full rebuild.
    remove_member(&set, "F1");
    open_member(&set, &files[2], "F2");
    let before = copied(&set);
    add_member(&set, "F2");
    wait_settled(&set, 30);
    assert_eq!(copied(&set) - before, blocks, "a blank member is rebuilt in full: {}", info(&set));
    let c = file_data(&files[2], off, blocks);
    assert_eq!(first_diff_block(&a, &c), None, "the new member differs from F0 (array block shown)");

    delete_raid(&set, false);
    let sb = file_sb(&files[2]).expect("F2 carries the superblock");
    assert!(sb.clean && sb.this_slot == 1, "{sb:?}");
    drop(set);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- 2. corrupted superblocks -------------------------------------------------

/// Re-seals hand-edited superblock bytes: CRC32C over the 4096 bytes with
/// the CRC field zeroed, as `superblock.rs` computes it.
fn reseal(sb: &mut [u8]) {
    let at = std::mem::offset_of!(Superblock, crc32c);
    sb[at..at + 4].fill(0);
    let crc = crc32c::crc32c(&sb[..SB_SIZE_BYTES]);
    sb[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

fn write_at(f: &Path, at: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(bytes).unwrap();
    file.sync_all().unwrap();
}

fn read_sb_bytes(f: &Path) -> Vec<u8> {
    std::fs::read(f).unwrap()[..SB_SIZE_BYTES].to_vec()
}

/// What a corruption case expects of the new reactor set.
enum Expect {
    /// Array R configuring with F0 found, slot 1 empty; a problem names F1
    /// and contains the keyword (None: F1 looks blank, nothing to report).
    ConfiguringWithoutF1(Option<&'static str>),
    /// No array at all; a problem names each member with the keyword.
    Absent(&'static str),
}

#[test]
fn corrupted_superblocks_are_reported_not_assembled() {
    let dir = temp_dir("corrupt");
    let files = make_files(&dir, 2, 8);
    let meta_bytes;
    let array_uuid;
    {
        let set = start(2);
        open_members(&set, &files);
        create_sb_raid(&set, 2, 256).expect("create R");
        let (off, _) = layout(&set);
        raid_io(&set, IoType::Write, 7, 1, Some(block_of(9, 7)));
        delete_raid(&set, false);
        meta_bytes = (off * BS) as usize;
        array_uuid = file_sb(&files[0]).unwrap().array_uuid;
    }
    // The metadata area (superblock and bitmap) of each member after the clean delete.
    let pristine: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()[..meta_bytes].to_vec()).collect();
    let restore = || {
        for (f, p) in files.iter().zip(&pristine) {
            write_at(f, 0, p);
        }
    };

    // Control: intact superblocks assemble (so the cases below fail for their corruption).
    {
        let set = start(2);
        open_members(&set, &files);
        wait_settled(&set, 10);
        assert_eq!(copied(&set), 0);
        assert!(problems(&set).is_empty(), "{:?}", problems(&set));
        delete_raid(&set, false);
    }

    let good1 = decode(&pristine[1][..SB_SIZE_BYTES]).unwrap();
    let foreign = uuid::Uuid::from_u128(0x5eed_f00d);
    type Corrupt = Box<dyn Fn(&[PathBuf])>;
    let cases: Vec<(&str, Corrupt, Expect)> = vec![
        (
            "(a) a flipped byte in F1's superblock",
            Box::new(|f: &[PathBuf]| {
                let mut sb = read_sb_bytes(&f[1]);
                sb[3000] ^= 0x10;
                write_at(&f[1], 0, &sb);
            }),
            Expect::ConfiguringWithoutF1(Some("checksum")),
        ),
        (
            "(b) F1's magic overwritten",
            Box::new(|f: &[PathBuf]| write_at(&f[1], 0, b"XXXXXXXX")),
            // Without the magic F1 is indistinguishable from a blank bdev:
            // the array waits for its slot 1, and there is nothing to name.
            Expect::ConfiguringWithoutF1(None),
        ),
        (
            "(b') F1's version from the future",
            Box::new(|f: &[PathBuf]| {
                let mut sb = read_sb_bytes(&f[1]);
                let at = std::mem::offset_of!(Superblock, version);
                sb[at..at + 4].copy_from_slice(&7u32.to_le_bytes());
                write_at(&f[1], 0, &sb);
            }),
            Expect::ConfiguringWithoutF1(Some("version 7")),
        ),
        (
            "(c) impossible geometry on both (zero members; a huge array size)",
            Box::new(|f: &[PathBuf]| {
                let info = file_sb(&f[0]).unwrap();
                let none = SuperblockInfo { slots: Vec::new(), ..info.clone() };
                assert!(try_encode(&none).is_err(), "the encoder refuses zero members");
                let huge = SuperblockInfo { array_blocks: u64::MAX / 2, ..info };
                assert!(try_encode(&huge).is_err(), "the encoder refuses a wrong array size");
                let mut sb = read_sb_bytes(&f[0]);
                sb[std::mem::offset_of!(Superblock, num_members)] = 0;
                reseal(&mut sb);
                write_at(&f[0], 0, &sb);
                let mut sb = read_sb_bytes(&f[1]);
                let at = std::mem::offset_of!(Superblock, array_blocks);
                sb[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
                reseal(&mut sb);
                write_at(&f[1], 0, &sb);
            }),
            Expect::Absent("impossible superblock geometry"),
        ),
        (
            "(d) F1 claims another array of the same name",
            Box::new(move |f: &[PathBuf]| {
                let other = SuperblockInfo { array_uuid: foreign, ..good1.clone() };
                write_at(&f[1], 0, &try_encode(&other).unwrap());
            }),
            Expect::ConfiguringWithoutF1(Some("name is taken")),
        ),
    ];

    for (what, corrupt, expect) in cases {
        restore();
        corrupt(&files);
        let set = start(2);
        // F0 first, so that in (d) the array F1 claims is the second one.
        open_member(&set, &files[0], "F0");
        wait_examined(&set);
        open_member(&set, &files[1], "F1");
        wait_examined(&set);
        std::thread::sleep(Duration::from_millis(50));
        wait_examined(&set);
        let probs = problems(&set);
        for m in ["F0", "F1"] {
            assert_eq!(claimed_by(&set, m), None, "{what}: {m} is claimed though the array cannot start");
        }
        assert!(set.call(0, || Registry::get().lookup("R").is_none()), "{what}: a raid bdev R was registered");
        match expect {
            Expect::ConfiguringWithoutF1(keyword) => {
                let i = info(&set);
                assert_eq!(i["state"], "configuring", "{what}: {i}");
                assert_eq!(i["uuid"], array_uuid.to_string(), "{what}: the array is the original one: {i}");
                let list = &i["base_bdevs_list"];
                assert_eq!((&list[0]["name"], &list[1]["name"]), (&Value::from("F0"), &Value::Null), "{what}: {i}");
                match keyword {
                    Some(k) => assert!(
                        probs.iter().any(|p| p.contains("F1") && p.contains(k)),
                        "{what}: no problem names F1 with {k:?}: {probs:?}"
                    ),
                    None => assert!(probs.iter().all(|p| !p.contains("F1")), "{what}: {probs:?}"),
                }
                if what.starts_with("(d)") {
                    assert!(probs.iter().any(|p| p.contains(&foreign.to_string())), "{what}: {probs:?}");
                }
            }
            Expect::Absent(keyword) => {
                assert!(set.call(0, || RaidArray::find("R").is_none()), "{what}: an array R exists");
                for m in ["F0", "F1"] {
                    assert!(
                        probs.iter().any(|p| p.contains(&format!("bdev {m}")) && p.contains(keyword)),
                        "{what}: no problem names {m} with {keyword:?}: {probs:?}"
                    );
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- 3. delete under IO -------------------------------------------------------

#[test]
fn delete_under_io_completes_leaves_clean_superblocks_and_keeps_acknowledged_writes() {
    let seed = seed();
    eprintln!("NVRAID_SEED={seed}");
    let dir = temp_dir("teardown");
    let files = make_files(&dir, 2, 32);
    let load;
    let (off, blocks);
    {
        let set = start(2);
        open_members(&set, &files);
        create_sb_raid(&set, 2, 128).expect("create R");
        (off, blocks) = layout(&set);
        load = Load::new(blocks);
        // 32 lanes over the whole array: writes hit every chunk.
        let lane = blocks / 32;
        let lanes: Vec<Range<u64>> = (0..32).map(|i| i * lane..(i + 1) * lane).collect();
        start_load(&set, seed, lanes, &load);
        wait_until(20, "load running", || load.writes_ok.load(Ordering::Relaxed) >= 300);
        let batches = info(&set)["bitmap"]["batches_written"].as_u64().unwrap();
        assert!(batches > 0, "seed {seed}: no bitmap batch written under load");
        let t0 = Instant::now();
        let in_flight_at_delete = load.in_flight.load(Ordering::Acquire);
        let r = set.call_async(0, 15, |done| {
            bdev_raid_delete(RaidDeleteParams { name: "R".into(), clear_sb: Some(false) }, done)
        });
        let took = t0.elapsed();
        assert!(r.is_ok(), "seed {seed}: delete failed: {r:?}");
        assert!(took < Duration::from_secs(5), "seed {seed}: delete took {took:?}");
        assert!(in_flight_at_delete > 0, "seed {seed}: no IO in flight at the delete");
        load.stop.store(true, Ordering::Release);
        wait_until(5, "every IO of the load completed", || {
            load.finished.load(Ordering::Acquire) == 2 && load.in_flight.load(Ordering::Acquire) == 0
        });
        assert_eq!(load.mismatches.load(Ordering::Relaxed), 0, "seed {seed}: reads returned stale data");
        for f in &files {
            let sb = file_sb(f).unwrap();
            assert!(sb.clean, "seed {seed}: superblock of {} not clean after the delete: {sb:?}", f.display());
        }
        assert!(set.call(0, || RaidArray::find("R").is_none()));
        // Clean promises identical copies: no write half done on one member only.
        let a = file_data(&files[0], off, blocks);
        let b = file_data(&files[1], off, blocks);
        assert_eq!(first_diff_block(&a, &b), None, "seed {seed}: members differ after the delete (array block shown)");
    }
    // A restart: the array assembles clean, and holds every acknowledged write.
    let set = start(2);
    open_members(&set, &files);
    wait_settled(&set, 20);
    assert_eq!(copied(&set), 0, "seed {seed}: a cleanly deleted array resyncs nothing");
    let model = load.model.lock().unwrap().clone();
    let checked = acknowledged_blocks(&model);
    assert!(checked > 100, "seed {seed}: only {checked} blocks to check");
    let mut data = Vec::with_capacity((blocks * BS) as usize);
    for lba in (0..blocks).step_by(256) {
        data.extend(raid_io(&set, IoType::Read, lba, 256.min(blocks - lba), None));
    }
    let bad = model_mismatches(&data, &model);
    assert!(bad.is_empty(), "seed {seed}: acknowledged writes lost (lba, want, got (stamp, lba)): {bad:?}");
    delete_raid(&set, false);
    drop(set);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- 4. crash ------------------------------------------------------------------

/// The crash: the reactor set stops with the array running (no delete, no
/// teardown), after a write load over every fourth chunk. `in_flight`: with
/// writes in flight; otherwise the load is stopped and drained first, with
/// the bitmap's lazy clearing frozen so the written chunks stay dirty, and a
/// block of F1 in two dirty chunks is garbled after the crash (writes that
/// reached F0 only). A new set assembles the array and resyncs the dirty
/// chunks from F0: then the members agree and every acknowledged write reads back.
fn crash_case(in_flight: bool) {
    let seed = seed();
    eprintln!("NVRAID_SEED={seed}");
    let dir = temp_dir(if in_flight { "crash-inflight" } else { "crash-drained" });
    let files = make_files(&dir, 2, 32);
    let chunk = 256 * 1024 / BS;
    let load;
    let (off, blocks);
    // Writes go to every fourth chunk only, so the resync has a bound below the array size.
    let written_chunks: Vec<u64>;
    let mut dirty_at_crash: Option<Vec<u64>> = None;
    {
        let set = start(2);
        open_members(&set, &files);
        create_sb_raid(&set, 2, 256).expect("create R");
        (off, blocks) = layout(&set);
        written_chunks = (0..blocks / chunk).filter(|c| c % 4 == 1).collect();
        load = Load::new(blocks);
        let lanes: Vec<Range<u64>> = written_chunks.iter().map(|c| c * chunk..(c + 1) * chunk).collect();
        start_load(&set, seed, lanes, &load);
        wait_until(20, "load running", || load.writes_ok.load(Ordering::Relaxed) >= 300);
        if in_flight {
            assert!(load.in_flight.load(Ordering::Acquire) > 0, "seed {seed}: nothing in flight");
        } else {
            // Not in sync as far as the bitmap knows: no bit is cleared from now on.
            set.call(0, || RaidArray::find("R").unwrap().bitmap().unwrap().set_in_sync(false));
            load.stop.store(true, Ordering::Release);
            wait_until(10, "load drained", || {
                load.finished.load(Ordering::Acquire) == 2 && load.in_flight.load(Ordering::Acquire) == 0
            });
            let dirty = set.call(0, || RaidArray::find("R").unwrap().bitmap().unwrap().dirty_chunks());
            assert!(
                // Bits of chunks the load left idle for a few ticks may have
                // been cleared before the freeze; those being written may not.
                dirty.iter().all(|c| written_chunks.contains(c)) && !dirty.is_empty(),
                "seed {seed}: dirty chunks {dirty:?}, written {written_chunks:?}"
            );
            dirty_at_crash = Some(dirty);
        }
        assert_eq!(load.mismatches.load(Ordering::Relaxed), 0, "seed {seed}: reads returned stale data");
        // Reactors stop where they are; no teardown runs.
        drop(set);
    }
    for f in &files {
        let sb = file_sb(f).unwrap();
        assert!(!sb.clean, "seed {seed}: stopping the reactor set wrote a clean superblock: {sb:?}");
    }
    let model = load.model.lock().unwrap().clone();
    if let Some(dirty) = &dirty_at_crash {
        // Writes that reached F0 only: the resync must repair them from F0.
        for lba in [dirty[0] * chunk + 5, dirty[dirty.len() - 1] * chunk + 60] {
            write_at(&files[1], (off + lba) * BS, &[0xa5; BS as usize]);
        }
    }

    let set = start(2);
    open_members(&set, &files);
    wait_settled(&set, 30);
    let copied = copied(&set);
    let bound = written_chunks.len() as u64 * chunk;
    assert!(copied > 0, "seed {seed}: an unclean array was not resynced");
    assert!(copied <= bound, "seed {seed}: resynced {copied} blocks, writes touched only {bound}");
    if let Some(dirty) = &dirty_at_crash {
        assert_eq!(copied, dirty.len() as u64 * chunk, "seed {seed}: the resync covers exactly the dirty chunks");
    }
    delete_raid(&set, false);
    drop(set);
    let a = file_data(&files[0], off, blocks);
    let b = file_data(&files[1], off, blocks);
    assert_eq!(first_diff_block(&a, &b), None, "seed {seed}: members differ after the resync (array block shown)");
    let checked = acknowledged_blocks(&model);
    assert!(checked > 100, "seed {seed}: only {checked} blocks to check");
    let bad = model_mismatches(&a, &model);
    assert!(bad.is_empty(), "seed {seed}: acknowledged writes lost (lba, allowed, got (stamp, lba)): {bad:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn crash_after_writes_drained_resyncs_exactly_the_dirty_chunks() {
    crash_case(false);
}

#[test]
fn crash_with_writes_in_flight_resyncs_dirty_chunks_and_keeps_acknowledged_writes() {
    crash_case(true);
}
