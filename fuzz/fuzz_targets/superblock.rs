//! Fuzz target for the RAID superblock decoder (and the assembly planner fed
//! with what it accepts): any bytes must decode to an error or to a
//! superblock that re-encodes to the same bytes; never a panic.
//!
//! Byte 0 picks the mode. Raw mode decodes the rest as is. Structured mode
//! builds a valid superblock from the input (level, members, sizes, slot
//! states, bitmap, name, events), checks it round-trips, then applies the
//! remaining bytes as (offset, xor) corruptions, re-sealing the CRC on odd
//! modes so the checks behind the checksum are reached, and assembles the
//! array from the untouched copies plus the corrupted one if it decoded.
#![no_main]

use bdev_raid::assemble::{assemble, FoundSuperblock};
use bdev_raid::superblock::{
    decode, encode, MetadataLayout, SlotState, SuperblockInfo, SB_MAX_SLOTS, SB_SIZE_BYTES,
};
use bdev_raid::level::LEVELS;
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

fn word(d: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in b.iter_mut().enumerate() {
        *x = d.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

/// A decoded superblock must be exactly what the encoder makes of it.
fn check_canonical(bytes: &[u8]) -> Option<SuperblockInfo> {
    let info = decode(bytes).ok()?;
    assert_eq!(
        &encode(&info)[..],
        &bytes[..SB_SIZE_BYTES],
        "decoded superblock does not re-encode to itself"
    );
    Some(info)
}

fn reseal(buf: &mut [u8]) {
    buf[12..16].fill(0);
    let crc = crc32c::crc32c(&buf[..SB_SIZE_BYTES]);
    buf[12..16].copy_from_slice(&crc.to_le_bytes());
}

fn build(d: &[u8]) -> Option<SuperblockInfo> {
    let level = LEVELS[(word(d, 0) % LEVELS.len() as u64) as usize];
    let n = (1 + word(d, 1) % SB_MAX_SLOTS as u64) as usize;
    let block_size = 512u32 << (word(d, 2) % 8);
    let strip = 1u64 << (word(d, 3) % 12);
    let bitmap_blocks = word(d, 4) % 64;
    let layout = MetadataLayout::new(block_size, bitmap_blocks, 1 << (word(d, 5) % 24)).ok()?;
    let members: Vec<(Uuid, u64)> = (0..n)
        .map(|i| {
            let size = word(d, 8 + 4 * i) % (1 << 40);
            (
                Uuid::from_u128(0x100 + i as u128),
                layout.data_offset_blocks.saturating_add(size),
            )
        })
        .collect();
    let name_len = 1 + (word(d, 6) % 63) as usize;
    let name: String = d
        .iter()
        .skip(140)
        .take(name_len)
        .map(|&b| char::from(b'a' + b % 26))
        .collect();
    let name = if name.is_empty() {
        "x".to_string()
    } else {
        name
    };
    let mut info = SuperblockInfo::new_array(
        &name,
        Uuid::from_u128(0xa77a),
        level,
        strip,
        block_size,
        &layout,
        &members,
    )
    .ok()?;
    for (i, s) in info.slots.iter_mut().enumerate() {
        let pick = d.get(200 + i).copied().unwrap_or(0);
        s.state = match pick % 4 {
            0 => SlotState::Active,
            1 => SlotState::Failed,
            2 => SlotState::Spare,
            _ => SlotState::Rebuilding {
                recovery_offset_blocks: word(d, 240) % (s.data_size_blocks + 1),
            },
        };
    }
    info.events = word(d, 7);
    info.clean = word(d, 7) & 1 == 0;
    info.for_slot((word(d, 9) % n as u64) as usize)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 0x80 != 0 {
        check_canonical(rest);
        return;
    }
    let Some(info) = build(rest) else { return };
    let mut buf = encode(&info).to_vec();
    assert_eq!(
        decode(&buf).as_ref(),
        Ok(&info),
        "a fresh superblock decodes to itself"
    );
    let edits = rest.get(280..).unwrap_or(&[]);
    for e in edits.chunks_exact(3) {
        let off = (usize::from(e[0]) | usize::from(e[1]) << 8) % SB_SIZE_BYTES;
        buf[off] ^= e[2];
    }
    if mode & 1 == 1 {
        reseal(&mut buf);
    }
    let corrupted = check_canonical(&buf);
    let mut found: Vec<FoundSuperblock> = (0..info.slots.len())
        .filter_map(|s| info.for_slot(s))
        .filter(|i| i.this_slot != info.this_slot)
        .map(|i| FoundSuperblock {
            bdev_name: format!("b{}", i.this_slot),
            member_uuid: i.member_uuid,
            info: i,
        })
        .collect();
    if let Some(c) = corrupted {
        found.push(FoundSuperblock {
            bdev_name: "corrupted".into(),
            member_uuid: c.member_uuid,
            info: c,
        });
    }
    if let Ok(plan) = assemble(info.array_uuid, &found, &[]) {
        assert_eq!(plan.members.len(), plan.superblock.slots.len());
        assert!(!plan.startable || plan.members.iter().any(Option::is_some));
    }
});
