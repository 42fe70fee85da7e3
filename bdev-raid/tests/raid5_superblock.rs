//! raid5 with a superblock and write-intent bitmap, in process over uring
//! file members: create writes superblocks; a restart assembles the array
//! from them (also degraded, after `assemble_timeout_sec`, and the missing
//! member returns and gets only the stripes it missed); a crash (the reactor
//! set stops with the array running) leaves dirty bits, and the next
//! assembly recomputes the parity of exactly the stripes of dirty chunks.
//!
//! Parity is checked in the member files themselves: a stripe row is right
//! when the XOR of every member's block at that member offset is zero
//! (whichever member holds P), so no test trusts the array's own mapping.

mod common;
use bdev::{IoType, Registry};
use bdev_raid::rpc::{bdev_raid_create_async, RaidCreateParams};
use bdev_raid::{RaidArray, RaidState};
use common::files::*;
use common::load::*;
use common::*;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Strip (chunk) of 64 KiB: 16 blocks of 4 KiB.
const STRIP_KB: u32 = 64;
const STRIP: u64 = STRIP_KB as u64 * 1024 / BS;
/// Bitmap chunks of 256 KiB (64 blocks): with 4 members a stripe holds 48
/// data blocks, so bitmap chunks and stripes do not line up.
const BM_KB: u32 = 256;
const BM_CHUNK: u64 = BM_KB as u64 * 1024 / BS;

// ---- helpers ------------------------------------------------------------------

/// raid5 "R" over F0..F{n-1} with a superblock and bitmap.
fn create_r5(set: &Set, n: usize) {
    create_r5_with(set, n, None);
}

/// raid5 "R" over F0..F{n-1} with a superblock, and a bitmap unless
/// `bitmap` is `Some(false)`.
fn create_r5_with(set: &Set, n: usize, bitmap: Option<bool>) {
    set.call_async(0, 20, move |done| {
        bdev_raid_create_async(
            RaidCreateParams {
                name: "R".into(),
                raid_level: "raid5".into(),
                base_bdevs: (0..n).map(|i| format!("F{i}")).collect(),
                strip_size_kb: Some(STRIP_KB),
                uuid: None,
                superblock: Some(true),
                bitmap,
                bitmap_chunk_size_kb: bitmap.is_none_or(|b| b).then_some(BM_KB),
            },
            done,
        )
    })
    .expect("create raid5 R with a superblock");
}

/// Stripes (member offset / STRIP) whose rows do not XOR to zero across
/// the member files: parity that does not match the data.
fn bad_stripes(files: &[PathBuf], off: u64, array_blocks: u64) -> Vec<u64> {
    let per = array_blocks / (files.len() as u64 - 1);
    let datas: Vec<Vec<u8>> = files
        .iter()
        .map(|f| {
            let b = std::fs::read(f).unwrap();
            b[(off * BS) as usize..((off + per) * BS) as usize].to_vec()
        })
        .collect();
    let stripe_bytes = (STRIP * BS) as usize;
    (0..per / STRIP)
        .filter(|&s| {
            let r = s as usize * stripe_bytes..(s as usize + 1) * stripe_bytes;
            (r.start..r.end).any(|i| datas.iter().fold(0u8, |x, d| x ^ d[i]) != 0)
        })
        .collect()
}

/// Array blocks of one stripe of `n` members.
fn stripe_blocks(n: usize) -> u64 {
    (n as u64 - 1) * STRIP
}

/// The stripes (sorted, each once) that array ranges touch.
fn stripes_of(ranges: impl IntoIterator<Item = Range<u64>>, n: usize) -> Vec<u64> {
    let sb = stripe_blocks(n);
    let mut v: Vec<u64> = ranges.into_iter().flat_map(|r| r.start / sb..r.end.div_ceil(sb)).collect();
    v.sort();
    v.dedup();
    v
}

fn chunk_range(c: u64) -> Range<u64> {
    c * BM_CHUNK..(c + 1) * BM_CHUNK
}

/// Writes `bytes` into a member file at byte offset `at`.
fn write_at(f: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
    file.write_all_at(bytes, at).unwrap();
    file.sync_all().unwrap();
}

/// Member holding stripe `s`'s parity (md left-symmetric, `n` members).
fn parity_member(s: u64, n: usize) -> usize {
    (n as u64 - 1 - s % n as u64) as usize
}

/// Whether `blk` at array block `lba` holds one of the `allowed` stamps'
/// patterns (stamp 0: zeros, never written).
// ---- 1. superblocks, restart, degraded assembly, returning member, wipe ------

#[test]
fn raid5_superblocks_assemble_after_restart_also_degraded_and_a_returning_member_gets_only_missed_stripes() {
    let n = 4;
    let dir = temp_dir("r5-life");
    let files = make_files(&dir, n, 16);
    let (off, blocks);
    // Full stripes, a partial stripe, a write across a stripe boundary.
    let writes: [(u64, u64, u64); 4] = [(0, 48, 1), (100, 7, 2), (140, 30, 3), (1000, 1, 4)];
    let mut expect: Vec<Vec<u64>>;
    {
        let set = start(2);
        open_members(&set, &files);
        create_r5(&set, n);
        (off, blocks) = layout(&set);
        assert!(off > 0, "data starts after the metadata");
        assert_eq!(info(&set)["superblock"], true, "{}", info(&set));
        for f in &files {
            let sb = file_sb(f).unwrap();
            assert!(!sb.clean, "a running array's superblock is dirty");
            assert!(sb.bitmap.is_some(), "raid5 with a superblock keeps a bitmap");
            assert_eq!(sb.level.name(), "raid5");
            assert_eq!(sb.slots.len(), n);
        }
        expect = vec![vec![0u64]; blocks as usize];
        for &(lba, len, stamp) in &writes {
            raid_io(&set, IoType::Write, lba, len, Some(blocks_of(stamp, lba, len)));
            expect[lba as usize..(lba + len) as usize].fill(vec![stamp]);
        }
        delete_raid(&set, false);
        for f in &files {
            assert!(file_sb(f).unwrap().clean, "clean after delete");
        }
    }
    assert_eq!(bad_stripes(&files, off, blocks), Vec::<u64>::new(), "parity right in the member files");
    // A restart: the members alone bring the array back, clean (no resync).
    restarts_clean(&files, &expect);
    {
        // F3 missing: the array starts degraded after the timeout and serves
        // every block (F3's reconstructed).
        let set = start_assembling_degraded();
        open_members(&set, &files[..3]);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(set.call(0, || RaidArray::find("R").map(|r| r.state())), Some(RaidState::Configuring));
        set.wait_for(10, "degraded start", || {
            RaidArray::find("R").is_some_and(|r| r.state() == RaidState::Online && r.is_degraded())
        });
        let bad = model_mismatches(&read_array(&set, blocks), &expect);
        assert!(bad.is_empty(), "degraded reads (lba, want, got): {bad:?}");
        // Writes while F3 is away: two bitmap chunks, 5 and 40.
        let away = [5u64, 40];
        for &c in &away {
            for (lba, len) in [(c * BM_CHUNK + 3, 1), (c * BM_CHUNK + 20, 9)] {
                raid_io(&set, IoType::Write, lba, len, Some(blocks_of(10 + c, lba, len)));
                expect[lba as usize..(lba + len) as usize].fill(vec![10 + c]);
            }
        }
        let dirty: Vec<u64> = set.call(0, || RaidArray::find("R").unwrap().bitmap().unwrap().dirty_chunks());
        assert_eq!(dirty, away.to_vec(), "the bitmap holds the chunks written while degraded");
        let before = copied(&set);
        open_member(&set, &files[3], "F3");
        wait_settled(&set, 30);
        let stripes = stripes_of(away.iter().map(|&c| chunk_range(c)), n);
        assert_eq!(
            copied(&set) - before,
            stripes.len() as u64 * stripe_blocks(n),
            "the returning member is rebuilt in the stripes of the missed chunks only ({stripes:?}): {}",
            info(&set)
        );
        let bad = model_mismatches(&read_array(&set, blocks), &expect);
        assert!(bad.is_empty(), "data after the partial rebuild (lba, want, got): {bad:?}");
        assert_eq!(check_r(&set, false)["mismatched_blocks"], 0, "parity right after the partial rebuild");
        delete_raid(&set, true);
        for f in &files {
            assert!(file_sb(f).is_err(), "clear_sb wiped the superblock");
        }
    }
    assert_eq!(bad_stripes(&files, off, blocks), Vec::<u64>::new(), "parity right in the member files");
    {
        let set = start(1);
        open_members(&set, &files);
        std::thread::sleep(Duration::from_millis(200));
        assert!(set.call(0, || RaidArray::find("R").is_none()), "a wiped array does not assemble");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- 2. crash and resync of dirty stripes ------------------------------------

/// A load of writes and verified reads into every fourth bitmap chunk, then
/// the reactor set stops with the array running (a crash). With
/// `in_flight`, writes are in flight then; otherwise the load drains first
/// with the bitmap's clearing frozen, and after the crash the parity of one
/// stripe in a dirty chunk is garbled (its data landed, its parity did not)
/// and so is the parity of one stripe no write touched. The next assembly
/// resyncs: the dirty stripe's parity is right again, the untouched stripe
/// is left as it was (the resync read nothing else), and every acknowledged
/// write reads back.
fn crash_case(in_flight: bool) {
    let n = 4;
    let seed = seed();
    eprintln!("NVRAID_SEED={seed}");
    let dir = temp_dir(if in_flight { "r5-crash-inflight" } else { "r5-crash-drained" });
    let files = make_files(&dir, n, 32);
    let load;
    let (off, blocks);
    let written_chunks: Vec<u64>;
    let mut dirty_at_crash: Option<Vec<u64>> = None;
    {
        let set = start(2);
        open_members(&set, &files);
        create_r5(&set, n);
        (off, blocks) = layout(&set);
        written_chunks = (0..blocks / BM_CHUNK).filter(|c| c % 4 == 1).collect();
        load = Load::new(blocks);
        let lanes: Vec<Range<u64>> = written_chunks.iter().map(|&c| chunk_range(c)).collect();
        start_load(&set, seed, lanes, &load);
        wait_until(20, "load running", || load.writes_ok.load(Ordering::Relaxed) >= 300);
        if in_flight {
            assert!(load.in_flight.load(Ordering::Acquire) > 0, "seed {seed}: nothing in flight");
        } else {
            set.call(0, || RaidArray::find("R").unwrap().bitmap().unwrap().set_in_sync(false));
            load.stop.store(true, Ordering::Release);
            wait_until(10, "load drained", || {
                load.finished.load(Ordering::Acquire) == 2 && load.in_flight.load(Ordering::Acquire) == 0
            });
            let dirty = set.call(0, || RaidArray::find("R").unwrap().bitmap().unwrap().dirty_chunks());
            assert!(
                dirty.iter().all(|c| written_chunks.contains(c)) && !dirty.is_empty(),
                "seed {seed}: dirty chunks {dirty:?}, written {written_chunks:?}"
            );
            dirty_at_crash = Some(dirty);
        }
        assert_eq!(load.mismatches.load(Ordering::Relaxed), 0, "seed {seed}: reads returned stale data");
        drop(set);
    }
    for f in &files {
        assert!(!file_sb(f).unwrap().clean, "seed {seed}: a crash left a clean superblock");
    }
    let model = load.model.lock().unwrap().clone();
    let written_stripes = stripes_of(written_chunks.iter().map(|&c| chunk_range(c)), n);
    // A stripe no write touched: its parity is garbled and must stay so.
    let untouched = (0..blocks / stripe_blocks(n)).find(|s| !written_stripes.contains(s)).unwrap();
    let mut garbled_dirty = None;
    if let Some(dirty) = &dirty_at_crash {
        let s = dirty[0] * BM_CHUNK / stripe_blocks(n);
        garbled_dirty = Some(s);
        for s in [s, untouched] {
            let p = parity_member(s, n);
            write_at(&files[p], (off + s * STRIP + 5) * BS, &[0xa5; BS as usize]);
        }
        let mut bad = bad_stripes(&files, off, blocks);
        bad.retain(|&b| b == s || b == untouched);
        assert_eq!(bad.len(), 2, "seed {seed}: the garbling shows in the files");
    }

    let set = start(2);
    open_members(&set, &files);
    wait_settled(&set, 30);
    let resynced = copied(&set);
    let bound = written_stripes.len() as u64 * stripe_blocks(n);
    assert!(resynced > 0, "seed {seed}: an unclean array was not resynced");
    assert!(resynced <= bound, "seed {seed}: resynced {resynced} blocks, writes touched only {bound}");
    if let Some(dirty) = &dirty_at_crash {
        let stripes = stripes_of(dirty.iter().map(|&c| chunk_range(c)), n);
        assert_eq!(
            resynced,
            stripes.len() as u64 * stripe_blocks(n),
            "seed {seed}: the resync covers exactly the stripes of the dirty chunks {dirty:?}"
        );
    }
    let data = read_array(&set, blocks);
    assert!(acknowledged_blocks(&model) > 100, "seed {seed}: too few blocks to check");
    let bad = model_mismatches(&data, &model);
    assert!(bad.is_empty(), "seed {seed}: acknowledged writes lost (lba, allowed, got (stamp, lba)): {bad:?}");
    delete_raid(&set, false);
    drop(set);
    let bad = bad_stripes(&files, off, blocks);
    if dirty_at_crash.is_some() {
        assert!(!bad.contains(&garbled_dirty.unwrap()), "seed {seed}: the dirty stripe's parity was not resynced");
        assert_eq!(bad, vec![untouched], "seed {seed}: the resync touched a stripe of no dirty chunk, or missed one");
    } else {
        assert_eq!(bad, Vec::<u64>::new(), "seed {seed}: stripes with wrong parity after the resync");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn raid5_crash_after_writes_drained_resyncs_exactly_the_stripes_of_dirty_chunks() {
    crash_case(false);
}

#[test]
fn raid5_crash_with_writes_in_flight_resyncs_parity_and_keeps_acknowledged_writes() {
    crash_case(true);
}

// ---- 3. parity trust outlives a restart --------------------------------------

/// Reads each member F0..F{n-1} has served so far, all reactors.
fn member_reads(set: &Set, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            set.call_async(0, 10, move |done| {
                let h = Registry::get().lookup(&format!("F{i}")).expect("member bdev");
                Registry::iostat(&h, move |t| done(t.num_read_ops));
            })
        })
        .collect()
}

/// Reads per member of one single-block write into data chunk 0 of stripe
/// `stripe` (5 members). Only with nothing else reading the members: after
/// `wait_settled`, which also waits for the examiners' read of "R" itself.
fn reads_of_one_block_write(set: &Set, stripe: u64) -> Vec<u64> {
    let n = 5;
    let before = member_reads(set, n);
    let lba = stripe * stripe_blocks(n) + 3;
    raid_io(set, IoType::Write, lba, 1, Some(blocks_of(stripe + 1, lba, 1)));
    member_reads(set, n).iter().zip(&before).map(|(a, b)| a - b).collect()
}

/// The reads of that write when it updates the parity in place
/// (read-modify-write): the old data (chunk 0, the member after P) and P.
fn rmw_reads(stripe: u64, n: usize) -> Vec<u64> {
    let p = parity_member(stripe, n);
    (0..n).map(|m| u64::from(m == p || m == (p + 1) % n)).collect()
}

/// The reads of that write when it reconstructs: the stripe's other data
/// chunks (every member but P and chunk 0's).
fn reconstruct_reads(stripe: u64, n: usize) -> Vec<u64> {
    rmw_reads(stripe, n).iter().map(|r| 1 - r).collect()
}

fn sb_verified(files: &[PathBuf]) -> Vec<bool> {
    files.iter().map(|f| file_sb(f).unwrap().redundancy_verified).collect()
}

/// (Without a bitmap: with one, parity trust is per chunk, from its
/// written and needs-sync states, and a check skips unwritten chunks:
/// `raid5_unwritten.rs`.)
#[test]
fn raid5_parity_verified_by_a_check_is_kept_in_the_superblock_across_a_restart() {
    let n = 5;
    let dir = temp_dir("r5-trust");
    let files = make_files(&dir, n, 16);
    let (off, blocks);
    {
        let set = start(2);
        open_members(&set, &files);
        create_r5_with(&set, n, Some(false));
        wait_settled(&set, 20);
        (off, blocks) = layout(&set);
        assert_eq!(sb_verified(&files), vec![false; n], "a new array's parity is not trusted");
        assert_eq!(reads_of_one_block_write(&set, 0), reconstruct_reads(0, n), "untrusted: the write reconstructs");
        let r = check_r(&set, false);
        assert_eq!(r["mismatched_blocks"], 0, "{r}");
        assert_eq!(reads_of_one_block_write(&set, 1), rmw_reads(1, n), "checked: read-modify-write");
        wait_until(10, "the superblock records the verification", || sb_verified(&files) == vec![true; n]);
        delete_raid(&set, false);
    }
    for f in &files {
        let sb = file_sb(f).unwrap();
        assert!(sb.clean && sb.redundancy_verified, "{sb:?}");
    }
    {
        let set = start(2);
        // Last member first: the trust comes from the superblocks, not from
        // which member's examination creates the assembling array.
        for (i, f) in files.iter().enumerate().rev() {
            open_member(&set, f, &format!("F{i}"));
        }
        wait_settled(&set, 20);
        assert_eq!(reads_of_one_block_write(&set, 2), rmw_reads(2, n), "the restarted array still trusts its parity");
        // Parity damaged behind the array's back, found by a check and left:
        // the array stops trusting parity, and says so in the superblock.
        let s = 7;
        write_at(&files[parity_member(s, n)], (off + s * STRIP + 1) * BS, &[0x5a; BS as usize]);
        let r = check_r(&set, false);
        assert_eq!(r["mismatched_blocks"], 1, "{r}");
        assert_eq!(
            reads_of_one_block_write(&set, 3),
            reconstruct_reads(3, n),
            "wrong parity found: no read-modify-write"
        );
        wait_until(10, "the superblock drops the verification", || sb_verified(&files) == vec![false; n]);
        delete_raid(&set, false);
    }
    assert!(sb_verified(&files).iter().all(|v| !v));
    assert_eq!(bad_stripes(&files, off, blocks), vec![7], "only the damaged stripe is wrong");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- 4. dirty and degraded ---------------------------------------------------

/// A crash with dirty bits, then a start without F3: the partial parity
/// log's replay (`ppl`) put every stripe a write was changing in part back
/// in agreement with its parity, so the array runs degraded with no resync
/// owed and serves every acknowledged write; the bits stay dirty (F3
/// missed those writes); when F3 returns, the stripes of the dirty chunks
/// are rebuilt onto it and every parity is right again.
#[test]
fn raid5_dirty_degraded_start_keeps_its_dirty_bits_until_the_member_returns() {
    let n = 4;
    let seed = seed();
    eprintln!("NVRAID_SEED={seed}");
    let dir = temp_dir("r5-dirty-degraded");
    let files = make_files(&dir, n, 16);
    let load;
    let (off, blocks);
    let dirty;
    {
        let set = start(2);
        open_members(&set, &files);
        create_r5(&set, n);
        (off, blocks) = layout(&set);
        let written: Vec<u64> = (0..blocks / BM_CHUNK).filter(|c| c % 5 == 2).collect();
        load = Load::new(blocks);
        start_load(&set, seed, written.iter().map(|&c| chunk_range(c)).collect(), &load);
        wait_until(20, "load running", || load.writes_ok.load(Ordering::Relaxed) >= 200);
        set.call(0, || RaidArray::find("R").unwrap().bitmap().unwrap().set_in_sync(false));
        load.stop.store(true, Ordering::Release);
        wait_until(10, "load drained", || {
            load.finished.load(Ordering::Acquire) == 2 && load.in_flight.load(Ordering::Acquire) == 0
        });
        dirty = set.call(0, || RaidArray::find("R").unwrap().bitmap().unwrap().dirty_chunks());
        assert!(!dirty.is_empty(), "seed {seed}: no dirty chunks");
        drop(set);
    }
    let model = load.model.lock().unwrap().clone();
    let set = start_assembling_degraded();
    open_members(&set, &files[..3]);
    set.wait_for(10, "dirty degraded start", || {
        RaidArray::find("R").is_some_and(|r| r.state() == RaidState::Online && r.is_degraded())
    });
    // The log was replayed at assembly: nothing is left to resync.
    set.wait_for(10, "no process", || RaidArray::find("R").is_some_and(|r| !r.rebuild_running()));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!set.call(0, || RaidArray::find("R").unwrap().process_running()), "a resync is owed after the replay");
    assert_eq!(copied(&set), 0, "seed {seed}: a degraded resync wrote something: {}", info(&set));
    let still: Vec<u64> = set.call(0, || RaidArray::find("R").unwrap().bitmap().unwrap().dirty_chunks());
    assert!(dirty.iter().all(|c| still.contains(c)), "seed {seed}: dirty bits lost: {dirty:?} -> {still:?}");
    let bad = model_mismatches(&read_array(&set, blocks), &model);
    assert!(bad.is_empty(), "seed {seed}: degraded reads (lba, allowed, got): {bad:?}");
    open_member(&set, &files[3], "F3");
    wait_settled(&set, 30);
    let stripes = stripes_of(dirty.iter().map(|&c| chunk_range(c)), n);
    assert!(copied(&set) >= stripes.len() as u64 * stripe_blocks(n), "seed {seed}: {}", info(&set));
    assert_eq!(check_r(&set, false)["mismatched_blocks"], 0, "seed {seed}: parity after F3 returned");
    let bad = model_mismatches(&read_array(&set, blocks), &model);
    assert!(bad.is_empty(), "seed {seed}: data after F3 returned (lba, allowed, got): {bad:?}");
    delete_raid(&set, false);
    drop(set);
    assert_eq!(bad_stripes(&files, off, blocks), Vec::<u64>::new(), "seed {seed}: parity in the files");
    let _ = std::fs::remove_dir_all(&dir);
}
