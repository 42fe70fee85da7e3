//! raid6 with a superblock and write-intent bitmap over uring file members
//! (as raid5_superblock.rs for raid5): create writes superblocks with level
//! raid6; a restart assembles the array; with two members missing it starts
//! degraded, serves every block and takes writes, and the two returning
//! members get the stripes they missed; a crash with writes in flight is
//! resynced (P and Q right again, every acknowledged write kept).

mod common;
use bdev::IoType;
use bdev_raid::{RaidArray, RaidState};
use common::files::*;
use common::load::*;
use common::*;
use std::ops::Range;
use std::sync::atomic::Ordering;

const STRIP_KB: u32 = 64;
/// Bitmap chunks of 256 KiB (64 blocks of 4 KiB): with 5 members a stripe
/// holds 48 data blocks, so bitmap chunks and stripes do not line up.
const BM_KB: u32 = 256;
const BM_CHUNK: u64 = BM_KB as u64 * 1024 / BS;
const MEMBERS: usize = 5;

fn create_r6(set: &Set) {
    create_sb_level(set, "raid6", Some(STRIP_KB), MEMBERS, BM_KB).expect("create raid6 R with a superblock");
}

#[test]
fn raid6_superblocks_assemble_after_restart_and_with_two_members_missing() {
    let dir = temp_dir("r6-life");
    let files = make_files(&dir, MEMBERS, 16);
    let writes: [(u64, u64, u64); 4] = [(0, 48, 1), (100, 7, 2), (140, 30, 3), (1000, 1, 4)];
    let mut expect: Vec<Vec<u64>>;
    let blocks;
    {
        let set = start(2);
        open_members(&set, &files);
        create_r6(&set);
        let off;
        (off, blocks) = layout(&set);
        assert!(off > 0, "data starts after the metadata");
        for f in &files {
            let sb = file_sb(f).unwrap();
            assert_eq!(sb.level.name(), "raid6");
            assert!(sb.bitmap.is_some(), "raid6 with a superblock keeps a bitmap");
            assert_eq!(sb.slots.len(), MEMBERS);
        }
        expect = vec![vec![0u64]; blocks as usize];
        for &(lba, len, stamp) in &writes {
            raid_io(&set, IoType::Write, lba, len, Some(blocks_of(stamp, lba, len)));
            expect[lba as usize..(lba + len) as usize].fill(vec![stamp]);
        }
        delete_raid(&set, false);
        assert!(files.iter().all(|f| file_sb(f).unwrap().clean), "clean after delete");
    }
    // A restart: the members alone bring the array back, clean (no resync).
    restarts_clean(&files, &expect);
    {
        // F1 and F3 missing: the array starts degraded after the timeout.
        let set = start_assembling_degraded();
        for i in [0, 2, 4] {
            open_member(&set, &files[i], &format!("F{i}"));
        }
        set.wait_for(10, "degraded start", || {
            RaidArray::find("R").is_some_and(|r| r.state() == RaidState::Online && r.is_degraded())
        });
        let bad = model_mismatches(&read_array(&set, blocks), &expect);
        assert!(bad.is_empty(), "reads with two members missing (lba, want, got): {bad:?}");
        let away = [5u64, 40];
        for &c in &away {
            for (lba, len) in [(c * BM_CHUNK + 3, 1), (c * BM_CHUNK + 20, 60)] {
                raid_io(&set, IoType::Write, lba, len, Some(blocks_of(10 + c, lba, len)));
                expect[lba as usize..(lba + len) as usize].fill(vec![10 + c]);
            }
        }
        let bad = model_mismatches(&read_array(&set, blocks), &expect);
        assert!(bad.is_empty(), "reads after writes with two members missing: {bad:?}");
        let dirty: Vec<u64> = set.call(0, || RaidArray::find("R").unwrap().bitmap().unwrap().dirty_chunks());
        assert_eq!(dirty, vec![5, 6, 40, 41], "the bitmap holds the chunks written while degraded");
        let before = copied(&set);
        open_member(&set, &files[1], "F1");
        open_member(&set, &files[3], "F3");
        wait_settled(&set, 30);
        let sb = (MEMBERS as u64 - 2) * (STRIP_KB as u64 * 1024 / BS);
        let stripes = |r: Range<u64>| r.start / sb..r.end.div_ceil(sb);
        let mut missed: Vec<u64> = dirty.iter().flat_map(|&c| stripes(c * BM_CHUNK..(c + 1) * BM_CHUNK)).collect();
        missed.dedup();
        let moved = copied(&set) - before;
        assert!(moved > 0 && moved <= 2 * missed.len() as u64 * sb, "rebuilt only missed stripes: {moved}");
        let bad = model_mismatches(&read_array(&set, blocks), &expect);
        assert!(bad.is_empty(), "data after the members returned: {bad:?}");
        assert_eq!(check_r(&set, false)["mismatched_blocks"], 0, "P and Q right after the partial rebuild");
        delete_raid(&set, true);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes in flight when the reactor set stops (a crash): the next
/// assembly resyncs P and Q of the dirty chunks' stripes and every
/// acknowledged write reads back.
#[test]
fn raid6_crash_with_writes_in_flight_resyncs_p_and_q() {
    let seed = seed();
    eprintln!("raid6 crash: seed {seed} (replay with NVRAID_SEED={seed})");
    let dir = temp_dir("r6-crash");
    let files = make_files(&dir, MEMBERS, 32);
    let load;
    let blocks;
    {
        let set = start(2);
        open_members(&set, &files);
        create_r6(&set);
        (_, blocks) = layout(&set);
        load = Load::new(blocks);
        let lanes: Vec<Range<u64>> =
            (0..blocks / BM_CHUNK).filter(|c| c % 4 == 1).map(|c| c * BM_CHUNK..(c + 1) * BM_CHUNK).collect();
        start_load(&set, seed, lanes, &load);
        wait_until(20, "load running", || load.writes_ok.load(Ordering::Relaxed) >= 300);
        assert!(load.in_flight.load(Ordering::Acquire) > 0, "seed {seed}: nothing in flight");
        assert_eq!(load.mismatches.load(Ordering::Relaxed), 0, "seed {seed}: reads returned stale data");
        drop(set);
    }
    assert!(files.iter().all(|f| !file_sb(f).unwrap().clean), "seed {seed}: a crash left a clean superblock");
    let model = load.model.lock().unwrap().clone();
    let set = start(2);
    open_members(&set, &files);
    wait_settled(&set, 30);
    assert!(copied(&set) > 0, "seed {seed}: an unclean array was not resynced");
    let bad = model_mismatches(&read_array(&set, blocks), &model);
    assert!(bad.is_empty(), "seed {seed}: acknowledged writes lost (lba, allowed, got): {bad:?}");
    assert_eq!(check_r(&set, false)["mismatched_blocks"], 0, "seed {seed}: P or Q wrong after the resync");
    delete_raid(&set, false);
    drop(set);
    let _ = std::fs::remove_dir_all(&dir);
}
