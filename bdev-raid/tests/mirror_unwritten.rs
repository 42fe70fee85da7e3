//! raid1 and raid10 use the bitmap's never-written state (md's llbitmap
//! "unwritten"): a chunk never written since the array was created reads
//! as zeros whatever its members hold, and the rebuild of a new member
//! copies only written chunks (a check compares only those).
//!
//! Every member file starts full of its own garbage byte, as reused disks
//! would: the copies of a never-written chunk differ. (Blocks of a written
//! chunk that no write covered hold what the members held, as before.) The arrays are
//! written in a few chunks, a member is replaced by a new one (more
//! garbage), and after the rebuild the other copy of what it holds is
//! removed, so every read comes from the new member.

mod common;
use bdev::IoType;
use common::files::*;
use common::load::*;
use common::*;
use std::path::PathBuf;

/// Member files of 16 MiB, file `i` full of byte `0xA0 + i`.
fn garbage_files(tag: &str, n: usize) -> (TempDir, Vec<PathBuf>) {
    let dir = temp_dir(tag);
    let files = make_files(&dir, n, 16);
    for (i, f) in files.iter().enumerate() {
        std::fs::write(f, vec![0xA0 + i as u8; 16 << 20]).unwrap();
    }
    (dir, files)
}

/// Blocks `[lba, lba + n)` of `data` (the whole array as read).
fn blocks(data: &[u8], lba: u64, n: u64) -> &[u8] {
    &data[(lba * BS) as usize..((lba + n) * BS) as usize]
}

/// The array as read holds `writes` (lba, stamp, blocks) and zeros in
/// every bitmap chunk (of `chunk` blocks) none of them touched. (The rest
/// of a written chunk holds what the members held: not checked.)
fn check_contents(data: &[u8], writes: &[(u64, u64, u64)], chunk: u64, what: &str) {
    let touched =
        |b: u64| writes.iter().any(|&(lba, _, n)| (lba / chunk..=(lba + n - 1) / chunk).contains(&(b / chunk)));
    let zero = vec![0u8; BS as usize];
    let bad_zero: Vec<u64> =
        (0..data.len() as u64 / BS).filter(|&b| !touched(b) && blocks(data, b, 1) != &zero[..]).take(8).collect();
    assert!(bad_zero.is_empty(), "{what}: never-written blocks {bad_zero:?}... do not read as zeros");
    for &(lba, stamp, n) in writes {
        assert!(blocks(data, lba, n) == &blocks_of(stamp, lba, n)[..], "{what}: the write at {lba} reads back wrong");
    }
}

/// A check of "R": (blocks checked, blocks whose copies differ).
fn check_counts(set: &Set) -> (u64, u64) {
    let c = check_r(set, false);
    (c["blocks_checked"].as_u64().unwrap_or_else(|| panic!("{c}")), c["mismatched_blocks"].as_u64().unwrap())
}

#[test]
fn raid1_reads_never_written_chunks_as_zeros_and_rebuilds_only_written_chunks() {
    let (dir, files) = garbage_files("r1-unwritten", 3);
    let set = start(2);
    open_members(&set, &files[..2]);
    // Bitmap chunks of 64 KiB: 16 blocks.
    create_sb_level(&set, "raid1", None, 2, 64).expect("create raid1 R");
    wait_settled(&set, 20);
    let (_, array_blocks) = layout(&set);
    let fresh = read_array(&set, array_blocks);
    check_contents(&fresh, &[], 16, "a new array over garbage");
    // Chunks 0, 62 and 128 written (1 + 8 + 16 blocks).
    let writes = [(0u64, 1u64, 1u64), (1000, 2, 8), (2048, 3, 16)];
    for &(lba, stamp, n) in &writes {
        raid_io(&set, IoType::Write, lba, n, Some(blocks_of(stamp, lba, n)));
    }
    let written_blocks = 3 * 16;
    check_contents(&read_array(&set, array_blocks), &writes, 16, "written in three chunks");
    // F1 replaced by F2: the rebuild copies the three written chunks.
    let before = copied(&set);
    remove_member(&set, "F1");
    open_member(&set, &files[2], "F2");
    add_member(&set, "F2");
    wait_settled(&set, 30);
    let copied_blocks = copied(&set) - before;
    eprintln!("raid1 rebuild: {copied_blocks} blocks copied, {written_blocks} in written chunks, array {array_blocks}");
    assert_eq!(copied_blocks, written_blocks, "the rebuild copies the written chunks only");
    assert_eq!(check_counts(&set), (written_blocks, 0), "a check compares written chunks only");
    // Every read from F2 now.
    remove_member(&set, "F0");
    check_contents(&read_array(&set, array_blocks), &writes, 16, "read from the new member");
    drop(set);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn raid10_reads_never_written_chunks_as_zeros_and_rebuilds_only_written_chunks() {
    let (dir, files) = garbage_files("r10-unwritten", 5);
    let set = start(2);
    open_members(&set, &files[..4]);
    // Strips of 64 KiB (16 blocks), bitmap chunks of 256 KiB (64 blocks):
    // each bitmap chunk is two strips on each mirror pair.
    create_sb_level(&set, "raid10", Some(64), 4, 256).expect("create raid10 R");
    wait_settled(&set, 20);
    let (_, array_blocks) = layout(&set);
    check_contents(&read_array(&set, array_blocks), &[], 64, "a new array over garbage");
    // Bitmap chunks 0 and 100 written.
    let writes = [(0u64, 1u64, 1u64), (6400, 2, 40)];
    for &(lba, stamp, n) in &writes {
        raid_io(&set, IoType::Write, lba, n, Some(blocks_of(stamp, lba, n)));
    }
    check_contents(&read_array(&set, array_blocks), &writes, 64, "written in two chunks");
    // F1 (pair 0+1) replaced by F4: the two written chunks are rebuilt
    // (`copied_blocks` counts array blocks; F4 holds two strips of each).
    let before = copied(&set);
    remove_member(&set, "F1");
    open_member(&set, &files[4], "F4");
    add_member(&set, "F4");
    wait_settled(&set, 30);
    let copied_blocks = copied(&set) - before;
    let written_blocks = 2 * 64;
    eprintln!(
        "raid10 rebuild: {copied_blocks} blocks copied, {written_blocks} in written chunks, array {array_blocks}"
    );
    assert_eq!(copied_blocks, written_blocks, "the rebuild copies the written chunks only");
    // (Pair 2+3's copies differ in the blocks of the written chunks that no
    // write covered: what F2 and F3 held.)
    assert_eq!(check_counts(&set).0, written_blocks, "a check compares written chunks only");
    remove_member(&set, "F0");
    check_contents(&read_array(&set, array_blocks), &writes, 64, "pair 0+1 read from the new member");
    drop(set);
    let _ = std::fs::remove_dir_all(&dir);
}
