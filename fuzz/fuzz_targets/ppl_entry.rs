//! Fuzz target for raid5's partial parity log entry decoder (what assembly
//! reads back from the log slots of a dirty array): any bytes must decode
//! to nothing or to an entry the geometry allows, whose pieces lie within
//! the chunk and whose stripe's span is computed without overflow; never
//! a panic. A decoded entry re-sealed decodes to the same entry.
//!
//! Byte 0 picks the mode, bytes 1..4 the geometry (block size 512 or
//! 4096, data chunks, chunk rows, array stripes). Raw mode decodes the
//! rest as a slot. Structured mode seals a valid entry built from the
//! input, checks it decodes to itself, then applies the remaining bytes
//! as (offset, xor) corruptions, recomputing the CRC on odd modes so the
//! checks behind it are reached.
#![no_main]

use bdev_raid::map::MAX_MEMBERS;
use bdev_raid::ppl::{decode_entry, header_blocks, seal_entry, stripe_span, PplPiece, PPL_MAX_PIECES};
use libfuzzer_sys::fuzz_target;

const UUID: [u8; 16] = *b"ppl-fuzz-array-1";
/// Offset of the CRC field in the header.
const CRC_OFFSET: usize = 12;
const HEADER_BYTES: usize = 4096;

fn at(d: &[u8], i: usize) -> u64 {
    u64::from(d.get(i).copied().unwrap_or(0))
}

/// The checks every decoded entry must pass.
fn check(slot: &[u8], bs: u64, data: usize, chunk: u64, array_blocks: u64) {
    let Some(e) = decode_entry(slot, bs, &UUID, data, chunk) else { return };
    assert!((1..=PPL_MAX_PIECES).contains(&e.pieces.len()));
    for p in &e.pieces {
        assert!(p.lo < p.hi && p.hi <= chunk, "piece rows outside the chunk: {p:?}");
        for (k, &(a, b)) in p.modified.iter().enumerate() {
            assert!(a <= b, "{p:?}");
            assert!(a == b || (k < data && p.lo <= a && b <= p.hi), "{p:?}");
        }
    }
    if let Some(span) = stripe_span(e.stripe, data, chunk, array_blocks) {
        assert!(span.start < span.end && span.end <= array_blocks);
    }
    // Sealed again over the same partial parity: the same entry.
    let rows: u64 = e.pieces.iter().map(|p| p.hi - p.lo).sum();
    let hb = header_blocks(bs as u32) * bs;
    let mut again = slot[..(hb + rows * bs) as usize].to_vec();
    seal_entry(&mut again, bs, &UUID, e.seq, e.stripe, &e.pieces);
    assert_eq!(decode_entry(&again, bs, &UUID, data, chunk).as_ref(), Some(&e), "a re-sealed entry decodes to itself");
}

/// The CRC over the header (field zero) and `rows` of partial parity, as
/// the header's pieces now say (capped by the slot).
fn reseal(slot: &mut [u8], bs: u64) {
    let hb = (header_blocks(bs as u32) * bs) as usize;
    let n = usize::from(slot[48]).min(PPL_MAX_PIECES);
    let piece_bytes = 8 + 8 * MAX_MEMBERS;
    let mut rows = 0u64;
    for i in 0..n {
        let o = 56 + i * piece_bytes;
        let lo = u32::from_le_bytes(slot[o..o + 4].try_into().unwrap());
        let hi = u32::from_le_bytes(slot[o + 4..o + 8].try_into().unwrap());
        rows += u64::from(hi.saturating_sub(lo));
    }
    let end = (hb as u64 + rows * bs).min(slot.len() as u64) as usize;
    slot[CRC_OFFSET..CRC_OFFSET + 4].fill(0);
    let head = crc32c::crc32c(&slot[..HEADER_BYTES]);
    let crc = crc32c::crc32c_append(head, &slot[hb..end]);
    slot[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
}

fuzz_target!(|d: &[u8]| {
    let Some((&mode, rest)) = d.split_first() else { return };
    let bs = if at(rest, 0) & 1 == 0 { 512 } else { 4096 };
    let data = 1 + (at(rest, 1) as usize % (MAX_MEMBERS - 1));
    let chunk = 1 + at(rest, 2) % 64;
    let array_blocks = (data as u64 * chunk) * (at(rest, 3) % 8);
    let body = rest.get(4..).unwrap_or(&[]);
    if mode & 0x80 != 0 {
        check(body, bs, data, chunk, array_blocks);
        return;
    }
    // A valid entry: one or two pieces, rows modified per data chunk.
    let hb = header_blocks(bs as u32) * bs;
    let mut slot = vec![0u8; (hb + chunk * bs) as usize];
    for (i, b) in slot[hb as usize..].iter_mut().enumerate() {
        *b = body.get(i % body.len().max(1)).copied().unwrap_or(0) ^ i as u8;
    }
    let n = 1 + (at(body, 0) % PPL_MAX_PIECES as u64) as usize;
    let mut pieces = Vec::new();
    let mut used = 0u64;
    for i in 0..n {
        let lo = at(body, 1 + 3 * i) % chunk;
        let hi = (lo + 1 + at(body, 2 + 3 * i) % (chunk - lo)).min(chunk);
        if used + hi - lo > chunk {
            break;
        }
        used += hi - lo;
        let mut modified = [(0u64, 0u64); MAX_MEMBERS];
        for (k, m) in modified.iter_mut().enumerate().take(data) {
            let pick = at(body, 8 + k);
            let a = lo + pick % (hi - lo);
            *m = if pick & 0x80 != 0 { (a, a) } else { (a, hi) };
        }
        pieces.push(PplPiece { lo, hi, modified });
    }
    let stripe = at(body, 7) << 56 | at(body, 6);
    seal_entry(&mut slot, bs, &UUID, 7, stripe, &pieces);
    let e = decode_entry(&slot, bs, &UUID, data, chunk).expect("a sealed entry decodes");
    assert_eq!((e.seq, e.stripe, &e.pieces), (7, stripe, &pieces));
    check(&slot, bs, data, chunk, array_blocks);
    for edit in body.get(48..).unwrap_or(&[]).chunks_exact(3) {
        let off = (usize::from(edit[0]) | usize::from(edit[1]) << 8) % slot.len();
        slot[off] ^= edit[2];
    }
    if mode & 1 == 1 {
        reseal(&mut slot, bs);
    }
    check(&slot, bs, data, chunk, array_blocks);
});
