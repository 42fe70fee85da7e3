//! raid5's write hole, closed by the partial parity log (`ppl`): a crash
//! in the middle of a partial-stripe write, then the loss of a member whose
//! chunk that write never touched, must not change that chunk.
//!
//! The crash is cut at each step of the write, in the member files
//! themselves: the stripe is written whole (old state, S0), then a partial
//! write changes rows of one data chunk (new state, S1: its log entry on
//! the parity member, then its data and parity). The reactor set stops
//! with the array running (superblocks dirty). Each crash state is S1's
//! files with the data rows or the parity rows put back as S0 had them:
//! log only, log and data, log and parity, everything. The member holding
//! the untouched chunk is then left out, the array assembles degraded from
//! the superblocks, and the untouched chunk must read back exactly.
//! Without the log's replay, "log and data" reconstructs the untouched
//! chunk from the old parity and the new data: wrong.

mod common;
use bdev::IoType;
use bdev_raid::rpc::{bdev_raid_create_async, RaidCreateParams};
use bdev_raid::{RaidArray, RaidState};
use common::files::*;
use common::load::*;
use common::*;
use std::path::{Path, PathBuf};

const STRIP_KB: u32 = 64;
/// Chunk rows: 16 blocks of 4 KiB.
const STRIP: u64 = STRIP_KB as u64 * 1024 / BS;
const N: usize = 4;
/// Array blocks of a stripe.
const SB: u64 = (N as u64 - 1) * STRIP;
/// The stripe written (its parity on member 3 - 2 % 4 = 1).
const STRIPE: u64 = 2;

fn create_r5(set: &Set) {
    set.call_async(0, 20, move |done| {
        bdev_raid_create_async(
            RaidCreateParams {
                name: "R".into(),
                raid_level: "raid5".into(),
                base_bdevs: (0..N).map(|i| format!("F{i}")).collect(),
                strip_size_kb: Some(STRIP_KB),
                uuid: None,
                superblock: Some(true),
                bitmap: None,
                bitmap_chunk_size_kb: Some(256),
            },
            done,
        )
    })
    .expect("create raid5 R with a superblock");
}

fn parity_member(s: u64) -> usize {
    (N as u64 - 1 - s % N as u64) as usize
}

fn data_member(s: u64, k: u64) -> usize {
    ((parity_member(s) as u64 + 1 + k) % N as u64) as usize
}

fn snapshot(files: &[PathBuf]) -> Vec<Vec<u8>> {
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

fn restore(files: &[PathBuf], state: &[Vec<u8>]) {
    for (f, b) in files.iter().zip(state) {
        std::fs::write(f, b).unwrap();
    }
}

fn put(f: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
    file.write_all_at(bytes, at).unwrap();
}

/// Byte offset in a member file of the first log slot holding an entry
/// header ("NVRAIDPL"), and the slot's size in bytes.
fn find_entry(bytes: &[u8], ppl_offset_blocks: u64, ppl_blocks: u64) -> Option<usize> {
    let slot_bytes = ((1 + STRIP) * BS) as usize;
    let start = (ppl_offset_blocks * BS) as usize;
    let end = start + (ppl_blocks * BS) as usize;
    (start..end).step_by(slot_bytes).find(|&at| &bytes[at..at + 8] == b"NVRAIDPL")
}

/// What the partial write left and where: the files before and after it,
/// the member data offset and array size.
struct Written {
    files: Vec<PathBuf>,
    dir: TempDir,
    s0: Vec<Vec<u8>>,
    s1: Vec<Vec<u8>>,
    /// File byte range of the rows written, on the data member and on the
    /// parity member (the same member offsets).
    rows: std::ops::Range<usize>,
    /// File byte offset of the log entry on the parity member.
    entry_at: usize,
}

/// Stripe `STRIPE` written whole (stamp 1), then rows 3..7 of its data
/// chunk 0 (stamp 2); the set then stops with the array running.
fn write_and_crash(tag: &str) -> Written {
    let dir = temp_dir(tag);
    let files = make_files(&dir, N, 16);
    let set = start(1);
    open_members(&set, &files);
    create_r5(&set);
    let (off, _) = layout(&set);
    let sb = file_sb(&files[0]).unwrap();
    let ppl = sb.ppl.expect("raid5 with a superblock keeps a partial parity log");
    assert!(off >= ppl.offset_blocks + ppl.length_blocks, "data after the log");
    let base = STRIPE * SB;
    raid_io(&set, IoType::Write, base, SB, Some(blocks_of(1, base, SB)));
    raid_io(&set, IoType::Flush, 0, 0, None);
    let s0 = snapshot(&files);
    let pm = parity_member(STRIPE);
    assert!(find_entry(&s0[pm], ppl.offset_blocks, ppl.length_blocks).is_none(), "a full stripe logs nothing");
    raid_io(&set, IoType::Write, base + 3, 4, Some(blocks_of(2, base + 3, 4)));
    raid_io(&set, IoType::Flush, 0, 0, None);
    let s1 = snapshot(&files);
    drop(set);
    for f in &files {
        assert!(!file_sb(f).unwrap().clean, "the crash left the superblocks dirty");
    }
    let entry_at = find_entry(&s1[pm], ppl.offset_blocks, ppl.length_blocks).expect("the partial write's log entry");
    let row0 = ((off + STRIPE * STRIP + 3) * BS) as usize;
    let rows = row0..row0 + (4 * BS) as usize;
    let dm = data_member(STRIPE, 0);
    assert_ne!(s0[dm][rows.clone()], s1[dm][rows.clone()], "the data rows changed");
    assert_ne!(s0[pm][rows.clone()], s1[pm][rows.clone()], "the parity rows changed");
    Written { files, dir, s0, s1, rows, entry_at }
}

/// The files of one crash state: S1, with the data rows and the parity
/// rows as S0 had them where `data_landed`/`parity_landed` is false.
fn crash_state(w: &Written, data_landed: bool, parity_landed: bool) {
    restore(&w.files, &w.s1);
    let (dm, pm) = (data_member(STRIPE, 0), parity_member(STRIPE));
    for (m, landed) in [(dm, data_landed), (pm, parity_landed)] {
        if !landed {
            put(&w.files[m], w.rows.start as u64, &w.s0[m][w.rows.clone()]);
        }
    }
}

/// Assembles the array from every member but `lost` (degraded, after the
/// assembly timeout) and reads the stripe's data chunks `ks`; then the set
/// stops with the array running (another crash).
fn degraded_read(w: &Written, lost: usize, ks: &[u64]) -> Vec<Vec<u8>> {
    let set = start_assembling_degraded();
    for (i, f) in w.files.iter().enumerate().filter(|&(i, _)| i != lost) {
        open_member(&set, f, &format!("F{i}"));
    }
    set.wait_for(10, "degraded start", || {
        RaidArray::find("R").is_some_and(|r| r.state() == RaidState::Online && r.is_degraded())
    });
    let out = ks.iter().map(|&k| raid_io(&set, IoType::Read, STRIPE * SB + k * STRIP, STRIP, None)).collect();
    drop(set);
    out
}

fn block(b: &[u8], i: u64) -> &[u8] {
    &b[(i * BS) as usize..((i + 1) * BS) as usize]
}

/// A crash at every step of a partial-stripe write, then the loss of a
/// member whose chunk the write did not touch: the untouched chunk reads
/// back exactly, and the written rows read old or new.
#[test]
fn a_crash_at_any_step_of_a_partial_write_leaves_the_untouched_chunks_of_a_degraded_raid5_intact() {
    let w = write_and_crash("r5-hole");
    let base = STRIPE * SB;
    let untouched_k = 1u64;
    let lost = data_member(STRIPE, untouched_k);
    let want = blocks_of(1, base + untouched_k * STRIP, STRIP);
    for (what, data_landed, parity_landed) in [
        ("log only", false, false),
        ("log and data", true, false),
        ("log and parity", false, true),
        ("all", true, true),
    ] {
        crash_state(&w, data_landed, parity_landed);
        let got = degraded_read(&w, lost, &[untouched_k, 0]);
        let bad: Vec<u64> = (0..STRIP).filter(|&b| block(&got[0], b) != block(&want, b)).collect();
        assert!(
            bad.is_empty(),
            "crash after {what}: untouched chunk {untouched_k} (member {lost} lost) wrong in rows {bad:?}"
        );
        // Chunk 0's written rows hold the old or the new data, whole.
        for b in 3..7u64 {
            let ok = block_matches(block(&got[1], b), base + b, &[1, 2]);
            assert!(ok, "crash after {what}: written row {b} is neither old nor new");
        }
        // The parity member now agrees with what the data members hold.
        let now = snapshot(&w.files);
        let xor: Vec<u8> =
            w.rows.clone().map(|i| (0..N).filter(|&m| m != lost).fold(0u8, |x, m| x ^ now[m][i])).collect();
        assert!(
            xor == w.s0[lost][w.rows.clone()],
            "crash after {what}: parity rows do not match the stripe after the replay"
        );
    }
    let _ = std::fs::remove_dir_all(&w.dir);
}

/// A torn or corrupt log entry is not replayed: with every write landed
/// and the entry's partial parity garbled, replaying it would make the
/// parity wrong (and the lost member's chunk with it); the array reads right.
#[test]
fn a_corrupt_log_entry_is_ignored() {
    let w = write_and_crash("r5-hole-torn");
    let pm = parity_member(STRIPE);
    let untouched_k = 1u64;
    let lost = data_member(STRIPE, untouched_k);
    let want = blocks_of(1, STRIPE * SB + untouched_k * STRIP, STRIP);
    for (what, at) in [("partial parity", w.entry_at + BS as usize + 100), ("header", w.entry_at + 40)] {
        crash_state(&w, true, true);
        put(&w.files[pm], at as u64, &[w.s1[pm][at] ^ 0x5a]);
        let got = degraded_read(&w, lost, &[untouched_k]);
        assert!(got[0] == want, "a corrupt entry ({what}) was replayed: the untouched chunk reads wrong");
        let now = std::fs::read(&w.files[pm]).unwrap();
        assert_eq!(now[w.rows.clone()], w.s1[pm][w.rows.clone()], "a corrupt entry ({what}) rewrote the parity");
    }
    let _ = std::fs::remove_dir_all(&w.dir);
}
