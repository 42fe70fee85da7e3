//! The partial parity log replay uses only a stripe's newest entry.
//!
//! Two entries of one stripe can both be on disk: a write over two stripes
//! may take a slot still holding a completed write's entry for its first
//! stripe and then find no slot for its second, so it gives the first one
//! back under its own stripe's name while the old entry stays on disk;
//! that old entry's stripe then logs its next write in another slot. Here
//! the stripe is written whole (stamp 1), then rows of its chunk 0 (stamp
//! 2, entry A), then the same rows of chunk 1 (stamp 3, entry B over A in
//! the stripe's slot); A's bytes are then put in the last slot, as such an
//! older duplicate would lie. After a crash with every write landed and
//! the loss of chunk 2's member, chunk 2 must read back exactly: replaying
//! A after B would compute the parity from chunk 1's old rows.

mod common;
use bdev::IoType;
use bdev_raid::rpc::{bdev_raid_create_async, RaidCreateParams};
use bdev_raid::{RaidArray, RaidState};
use common::files::*;
use common::load::*;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

const N: usize = 4;
/// Chunk rows: 16 blocks of 4 KiB.
const STRIP: u64 = 64 * 1024 / BS;
const SB: u64 = (N as u64 - 1) * STRIP;
const STRIPE: u64 = 2;

fn parity_member(s: u64) -> usize {
    (N as u64 - 1 - s % N as u64) as usize
}

fn data_member(s: u64, k: u64) -> usize {
    ((parity_member(s) as u64 + 1 + k) % N as u64) as usize
}

/// File offsets of the log slots of a member (slot = header + chunk).
fn slot_offsets(ppl_offset_blocks: u64, ppl_blocks: u64) -> Vec<u64> {
    let slot = (1 + STRIP) * BS;
    (0..ppl_blocks * BS / slot).map(|i| ppl_offset_blocks * BS + i * slot).collect()
}

fn entry_slot(file: &PathBuf, slots: &[u64]) -> Option<(u64, Vec<u8>)> {
    let bytes = std::fs::read(file).unwrap();
    slots.iter().find(|&&at| &bytes[at as usize..at as usize + 8] == b"NVRAIDPL").map(|&at| {
        let slot = (1 + STRIP) * BS;
        (at, bytes[at as usize..(at + slot) as usize].to_vec())
    })
}

#[test]
fn replay_uses_only_the_newest_entry_of_a_stripe() {
    let dir = temp_dir("ppl-newest");
    let files = make_files(&dir, N, 16);
    let pm = parity_member(STRIPE);
    let base = STRIPE * SB;
    let (slots, old_entry) = {
        let set = start(1);
        open_members(&set, &files);
        // No bitmap: a dirty start replays every stripe's entry (with one,
        // only those of chunks still dirty at the crash).
        set.call_async(0, 20, move |done| {
            bdev_raid_create_async(
                RaidCreateParams {
                    name: "R".into(),
                    raid_level: "raid5".into(),
                    base_bdevs: (0..N).map(|i| format!("F{i}")).collect(),
                    strip_size_kb: Some(64),
                    uuid: None,
                    superblock: Some(true),
                    bitmap: Some(false),
                    bitmap_chunk_size_kb: None,
                },
                done,
            )
        })
        .expect("create raid5 R");
        let ppl = file_sb(&files[0]).unwrap().ppl.expect("a partial parity log");
        let slots = slot_offsets(ppl.offset_blocks, ppl.length_blocks);
        raid_io(&set, IoType::Write, base, SB, Some(blocks_of(1, base, SB)));
        raid_io(&set, IoType::Write, base + 3, 4, Some(blocks_of(2, base + 3, 4)));
        raid_io(&set, IoType::Flush, 0, 0, None);
        let (at_a, a) = entry_slot(&files[pm], &slots).expect("entry A");
        raid_io(&set, IoType::Write, base + STRIP + 3, 4, Some(blocks_of(3, base + STRIP + 3, 4)));
        raid_io(&set, IoType::Flush, 0, 0, None);
        let (at_b, _) = entry_slot(&files[pm], &slots).expect("entry B");
        assert_eq!(at_a, at_b, "B took the stripe's slot");
        (slots, a)
        // The set stops with the array running: a crash.
    };
    let last = *slots.last().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&files[pm]).unwrap();
    f.write_all_at(&old_entry, last).unwrap();
    drop(f);
    let lost = data_member(STRIPE, 2);
    let set = start_assembling_degraded();
    for (i, f) in files.iter().enumerate().filter(|&(i, _)| i != lost) {
        open_member(&set, f, &format!("F{i}"));
    }
    set.wait_for(10, "degraded start", || {
        RaidArray::find("R").is_some_and(|r| r.state() == RaidState::Online && r.is_degraded())
    });
    let got = raid_io(&set, IoType::Read, base + 2 * STRIP, STRIP, None);
    drop(set);
    let want = blocks_of(1, base + 2 * STRIP, STRIP);
    let bad: Vec<u64> = (0..STRIP)
        .filter(|&b| {
            got[(b * BS) as usize..((b + 1) * BS) as usize] != want[(b * BS) as usize..((b + 1) * BS) as usize]
        })
        .collect();
    assert!(bad.is_empty(), "chunk 2 (member {lost} lost) wrong in rows {bad:?}: an older entry was replayed");
    let _ = std::fs::remove_dir_all(&dir);
}
