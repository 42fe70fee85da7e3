//! raid5 with a bitmap that knows which chunks were never written since
//! the array was created (md's llbitmap states): a first partial write
//! into such a chunk reconstructs its parity from whole rows and leaves
//! the chunk "needing sync" until a sync pass computed the parity of its
//! stripes; then partial writes there update parity in place. Checks and
//! rebuilds skip unwritten chunks, which read as zeros healthy or degraded.
//!
//! Member files are filled with garbage before the array is created, as a
//! used disk would be, so parity that was never computed is wrong; parity
//! is checked in the files (a row is right when the XOR of every member's
//! block at that offset is zero), and member IO is counted with iostat.

mod common;
use bdev::{IoType, Registry};
use bdev_raid::rpc::{bdev_raid_create_async, RaidCreateParams};
use bdev_raid::RaidArray;
use common::files::*;
use common::load::*;
use common::*;
use std::path::{Path, PathBuf};

/// Strips of 64 KiB (16 blocks of 4 KiB).
const STRIP_KB: u32 = 64;
const STRIP: u64 = STRIP_KB as u64 * 1024 / BS;
/// Bitmap chunks of 256 KiB (64 blocks).
const BM_KB: u32 = 256;
const BM_CHUNK: u64 = BM_KB as u64 * 1024 / BS;
/// Member files of 16 MiB.
const FILE_MIB: u64 = 16;

fn create_r5(set: &Set, n: usize) {
    set.call_async(0, 20, move |done| {
        bdev_raid_create_async(
            RaidCreateParams {
                name: "R".into(),
                raid_level: "raid5".into(),
                base_bdevs: (0..n).map(|i| format!("F{i}")).collect(),
                strip_size_kb: Some(STRIP_KB),
                uuid: None,
                superblock: Some(true),
                bitmap: None,
                bitmap_chunk_size_kb: Some(BM_KB),
            },
            done,
        )
    })
    .expect("create raid5 R with a superblock and bitmap");
}

/// Member files full of garbage past the first MiB (the metadata area the
/// array writes itself), different in every file.
fn garbage_files(dir: &Path, n: usize) -> Vec<PathBuf> {
    let files = make_files(dir, n, FILE_MIB);
    for (i, f) in files.iter().enumerate() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
        let bytes: Vec<u8> = (0..(FILE_MIB - 1) << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new().write(true).open(f).unwrap().write_all_at(&bytes, 1 << 20).unwrap();
    }
    files
}

fn stripe_blocks(n: usize) -> u64 {
    (n as u64 - 1) * STRIP
}

fn parity_member(s: u64, n: usize) -> usize {
    (n as u64 - 1 - s % n as u64) as usize
}

/// Rows (member block offsets from `off`) of stripe `s` whose blocks do not
/// XOR to zero across the member files.
fn bad_rows(files: &[PathBuf], off: u64, s: u64) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let bytes = (STRIP * BS) as usize;
    let datas: Vec<Vec<u8>> = files
        .iter()
        .map(|f| {
            let mut b = vec![0u8; bytes];
            std::fs::File::open(f).unwrap().read_exact_at(&mut b, (off + s * STRIP) * BS).unwrap();
            b
        })
        .collect();
    (0..STRIP)
        .filter(|r| {
            let blk = (*r * BS) as usize..((*r + 1) * BS) as usize;
            blk.clone().any(|i| datas.iter().fold(0u8, |x, d| x ^ d[i]) != 0)
        })
        .collect()
}

/// Reads each member has served so far.
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

/// Member reads of a write of one block at row 3 of data chunk 0 of stripe `s`.
fn reads_of_one_block_write(set: &Set, n: usize, s: u64, stamp: u64) -> Vec<u64> {
    let before = member_reads(set, n);
    let lba = s * stripe_blocks(n) + 3;
    raid_io(set, IoType::Write, lba, 1, Some(blocks_of(stamp, lba, 1)));
    member_reads(set, n).iter().zip(&before).map(|(a, b)| a - b).collect()
}

/// Read-modify-write of that write: the old data (chunk 0, the member after P) and P.
fn rmw_reads(s: u64, n: usize) -> Vec<u64> {
    let p = parity_member(s, n);
    (0..n).map(|m| u64::from(m == p || m == (p + 1) % n)).collect()
}

/// Reconstruct of that write: the stripe's other data chunks.
fn reconstruct_reads(s: u64, n: usize) -> Vec<u64> {
    rmw_reads(s, n).iter().map(|r| 1 - r).collect()
}

fn bitmap_of(set: &Set) -> std::sync::Arc<bitmap::Bitmap> {
    set.call(0, || RaidArray::find("R").unwrap().bitmap().expect("a bitmap"))
}

/// Array ranges of chunks, widened to whole stripes, in blocks: what a
/// process over them covers.
fn stripe_blocks_of(chunks: &[u64], n: usize, array_blocks: u64) -> u64 {
    let sb = stripe_blocks(n);
    let mut stripes: Vec<u64> =
        chunks.iter().flat_map(|&c| (c * BM_CHUNK / sb)..((c + 1) * BM_CHUNK).div_ceil(sb)).collect();
    stripes.sort();
    stripes.dedup();
    stripes.iter().map(|s| ((s + 1) * sb).min(array_blocks) - s * sb).sum()
}

/// No chunk needs sync any more and no process runs.
fn wait_synced(set: &Set) {
    let bm = bitmap_of(set);
    wait_until(20, "no chunk needs sync", move || bm.needsync_chunks().is_empty());
    wait_settled(set, 20);
}

fn write_chunk_parts(set: &Set, chunks: &[u64], stamp: u64) {
    for &c in chunks {
        // A partial write: 5 blocks inside the chunk.
        let lba = c * BM_CHUNK + 7;
        raid_io(set, IoType::Write, lba, 5, Some(blocks_of(stamp, lba, 5)));
    }
}

// ---- 1. first write, sync pass, read-modify-write ------------------------------

/// 5 members: a stripe is 64 blocks, one bitmap chunk. The first partial
/// write into a never-written chunk reconstructs (reads the other data
/// chunks' rows, not the parity), so the row it writes has right parity
/// while the rows it did not touch keep the garbage; the chunk needs sync,
/// and the sync pass makes every row of its stripe right, touching no
/// other stripe. Then a partial write there reads the old data and parity.
#[test]
fn a_first_partial_write_reconstructs_and_after_the_sync_pass_the_chunk_updates_parity_in_place() {
    let n = 5;
    let dir = temp_dir("r5-unwritten-rmw");
    let files = garbage_files(&dir, n);
    let set = start(2);
    open_members(&set, &files);
    create_r5(&set, n);
    wait_settled(&set, 20);
    let (off, _) = layout(&set);
    let bm = bitmap_of(&set);
    assert!(bm.tracks_written() && bm.written_count() == 0, "a new array: nothing written");
    assert_eq!(bad_rows(&files, off, 0).len() as u64, STRIP, "garbage parity to start from");
    let s = 0;
    // (The sync pass starts 100 ms after the batch: the counts and rows
    // below are the write's own.)
    assert_eq!(reads_of_one_block_write(&set, n, s, 1), reconstruct_reads(s, n), "a first write reconstructs");
    assert!(bm.is_written(0) && bm.needs_sync(0), "written, needs sync");
    let bad = bad_rows(&files, off, s);
    assert!(!bad.contains(&3) && bad.len() as u64 == STRIP - 1, "only the row written has right parity: {bad:?}");
    wait_synced(&set);
    assert!(bm.is_written(0) && !bm.needs_sync(0), "the sync pass ran");
    assert_eq!(bad_rows(&files, off, s), Vec::<u64>::new(), "the sync pass computed every row's parity");
    assert_eq!(bad_rows(&files, off, 1).len() as u64, STRIP, "a stripe of no written chunk is left alone");
    assert_eq!(reads_of_one_block_write(&set, n, s, 2), rmw_reads(s, n), "a synced chunk: read-modify-write");
    assert_eq!(bad_rows(&files, off, s), Vec::<u64>::new());
    // Another never-written chunk reconstructs again.
    assert_eq!(reads_of_one_block_write(&set, n, 2, 3), reconstruct_reads(2, n));
    wait_synced(&set);
    let got = raid_io(&set, IoType::Read, 3, 1, None);
    assert!(got == blocks_of(2, 3, 1), "the data reads back");
    delete_raid(&set, false);
    drop(set);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- 2. check, reads of unwritten chunks, rebuild ------------------------------

/// 4 members (a stripe is 48 blocks: bitmap chunks and stripes do not line
/// up). Three chunks are written. A check compares only their stripes
/// (member reads counted), and finds nothing wrong although every other
/// stripe's parity is garbage. A never-written chunk reads as zeros,
/// healthy, degraded, and after a replacement member was rebuilt, which
/// copies only the written chunks' stripes; written data reads back the
/// same in all three.
#[test]
fn check_and_rebuild_skip_unwritten_chunks_which_read_as_zeros_healthy_or_degraded() {
    let n = 4;
    let dir = temp_dir("r5-unwritten-check");
    let mut files = garbage_files(&dir, n + 1);
    let spare = files.pop().unwrap();
    let set = start(2);
    open_members(&set, &files);
    create_r5(&set, n);
    wait_settled(&set, 20);
    let (_, blocks) = layout(&set);
    let written = [1u64, 6, 20];
    write_chunk_parts(&set, &written, 1);
    wait_synced(&set);
    let bm = bitmap_of(&set);
    assert_eq!(bm.written_chunks(), written.to_vec());
    let covered = stripe_blocks_of(&written, n, blocks);

    let before: u64 = member_reads(&set, n).iter().sum();
    let r = check_r(&set, false);
    let check_reads: u64 = member_reads(&set, n).iter().sum::<u64>() - before;
    assert_eq!(r["mismatched_blocks"], 0, "{r}");
    assert_eq!(r["blocks_checked"].as_u64(), Some(covered), "only the written chunks' stripes: {r}");
    let window_blocks = 1024 * 1024 / BS;
    assert!(
        check_reads <= n as u64 * covered.div_ceil(STRIP).max(covered.div_ceil(window_blocks)) * 2,
        "the check read {check_reads} times for {covered} blocks of {blocks}"
    );
    eprintln!("check: {covered} of {blocks} array blocks compared, {check_reads} member reads");

    let unwritten_lba = 3 * BM_CHUNK + 5;
    let zeros = vec![0u8; (4 * BS) as usize];
    let data_lba = 6 * BM_CHUNK + 7;
    let data = blocks_of(1, data_lba, 5);
    assert!(raid_io(&set, IoType::Read, unwritten_lba, 4, None) == zeros, "healthy: zeros");
    assert!(raid_io(&set, IoType::Read, data_lba, 5, None) == data);
    // A read across a written and an unwritten chunk: zeros past the written one.
    // A read across a written and an unwritten chunk: zeros in the
    // unwritten one (the written chunk's blocks never written read what
    // its members hold).
    let across = raid_io(&set, IoType::Read, 2 * BM_CHUNK - 2, 4, None);
    assert!(across[(2 * BS) as usize..].iter().all(|&b| b == 0), "chunk 2 was never written");

    remove_member(&set, "F1");
    assert!(raid_io(&set, IoType::Read, unwritten_lba, 4, None) == zeros, "degraded: zeros");
    for lba in (0..blocks).step_by(BM_CHUNK as usize).take(24) {
        let got = raid_io(&set, IoType::Read, lba, 16, None);
        let want_zero = !written.contains(&(lba / BM_CHUNK));
        assert!(!want_zero || got.iter().all(|&b| b == 0), "degraded read of unwritten chunk at {lba}");
    }
    assert!(raid_io(&set, IoType::Read, data_lba, 5, None) == data, "degraded: the data");

    open_member(&set, &spare, "F4");
    let copied_before = copied(&set);
    add_member(&set, "F4");
    wait_settled(&set, 30);
    let rebuilt = copied(&set) - copied_before;
    eprintln!("rebuild: {rebuilt} of {blocks} array blocks copied onto the replacement");
    assert_eq!(rebuilt, covered, "the rebuild copies only the written chunks' stripes");
    assert!(raid_io(&set, IoType::Read, unwritten_lba, 4, None) == zeros, "after the rebuild: zeros");
    assert!(raid_io(&set, IoType::Read, data_lba, 5, None) == data, "after the rebuild: the data");
    let r = check_r(&set, false);
    assert_eq!((r["mismatched_blocks"].as_u64(), r["blocks_checked"].as_u64()), (Some(0), Some(covered)), "{r}");
    delete_raid(&set, false);
    drop(set);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- 3. crash: resync of written, dirty chunks only; written state reloads ----

/// Three chunks written, clearing frozen, then a crash. The next assembly
/// reloads which chunks were written, resyncs the stripes of the dirty
/// (so written) chunks only, and marks them synced; unwritten chunks still
/// read as zeros.
#[test]
fn after_a_crash_the_resync_covers_only_written_dirty_chunks_and_written_state_reloads() {
    let n = 4;
    let dir = temp_dir("r5-unwritten-crash");
    let files = garbage_files(&dir, n);
    let written = [2u64, 9, 30];
    let blocks;
    {
        let set = start(2);
        open_members(&set, &files);
        create_r5(&set, n);
        wait_settled(&set, 20);
        blocks = layout(&set).1;
        // Clearing frozen: every written chunk is dirty at the crash.
        bitmap_of(&set).set_in_sync(false);
        write_chunk_parts(&set, &written[..1], 1);
        wait_synced(&set);
        write_chunk_parts(&set, &written[1..], 2);
        let bm = bitmap_of(&set);
        assert!(written.iter().all(|&c| bm.is_on_disk(c)), "dirty at the crash");
        drop(set);
    }
    let set = start(2);
    open_members(&set, &files);
    wait_settled(&set, 30);
    wait_synced(&set);
    let bm = bitmap_of(&set);
    assert_eq!(bm.written_chunks(), written.to_vec(), "the written plane reloads");
    let resynced = copied(&set);
    let covered = stripe_blocks_of(&written, n, blocks);
    eprintln!("resync after a crash: {resynced} of {blocks} array blocks");
    assert_eq!(resynced, covered, "the resync covers the written dirty chunks' stripes only");
    assert!(raid_io(&set, IoType::Read, 5 * BM_CHUNK, 8, None).iter().all(|&b| b == 0), "unwritten: zeros");
    let lba = written[2] * BM_CHUNK + 7;
    assert!(raid_io(&set, IoType::Read, lba, 5, None) == blocks_of(2, lba, 5), "acknowledged data");
    delete_raid(&set, false);
    drop(set);
    let _ = std::fs::remove_dir_all(&dir);
}
