//! Fuzz target for the bitmap page decoder: any bytes must decode to an
//! error or to a page that re-encodes to the same bytes; never a panic.
//!
//! Byte 0 picks the mode. Raw mode decodes the rest as is. Structured mode
//! builds a valid page from the input (geometry, page index, events, bits),
//! checks it round-trips, then applies the remaining bytes as (offset, xor)
//! corruptions, re-sealing the CRC on odd modes so the checks behind the
//! checksum are reached.
#![no_main]

use bitmap::page::{decode_page, encode_page, encode_page_as};
use bitmap::{Geometry, CHUNKS_PER_PAGE, PAGE_SIZE_BYTES};
use libfuzzer_sys::fuzz_target;

fn word(d: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in b.iter_mut().enumerate() {
        *x = d.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

/// A decoded page must be exactly what the encoder makes of its contents.
fn check_canonical(bytes: &[u8]) {
    let Ok(p) = decode_page(bytes) else { return };
    let g = Geometry {
        array_uuid: p.array_uuid,
        block_size: p.block_size,
        data_blocks: p.num_chunks * p.chunk_size_blocks,
        chunk_size_blocks: p.chunk_size_blocks,
    };
    if g.validate().is_err() {
        return;
    }
    let words: Vec<u64> = p.words().collect();
    let mut out = vec![0u8; g.page_buf_bytes()];
    encode_page_as(&g, p.kind, p.page_index as usize, p.events, &words, &mut out);
    assert_eq!(&out[..PAGE_SIZE_BYTES], &bytes[..PAGE_SIZE_BYTES], "decoded page does not re-encode to itself");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 0x80 != 0 {
        check_canonical(rest);
        return;
    }
    let chunks = 1 + word(rest, 0) % (3 * CHUNKS_PER_PAGE);
    let chunk_shift = (word(rest, 8) % 20) as u32;
    let block_size = 512u32 << (word(rest, 16) % 8);
    let Ok(g) = Geometry::new(
        [rest.first().copied().unwrap_or(0); 16],
        block_size,
        chunks << chunk_shift,
        Some(1 << chunk_shift),
    ) else {
        return;
    };
    let page = (word(rest, 24) % g.num_pages() as u64) as usize;
    let events = word(rest, 32);
    let in_page = (chunks - page as u64 * CHUNKS_PER_PAGE).min(CHUNKS_PER_PAGE);
    let mut words: Vec<u64> = (0..in_page.div_ceil(64) as usize).map(|i| word(rest, 40 + 8 * (i % 4))).collect();
    if in_page % 64 != 0 {
        if let Some(last) = words.last_mut() {
            *last &= (1u64 << (in_page % 64)) - 1;
        }
    }
    let mut buf = vec![0u8; g.page_buf_bytes()];
    encode_page(&g, page, events, &words, &mut buf);
    let d = decode_page(&buf).expect("a fresh page decodes");
    d.check(&g, page).expect("and belongs where it was written");
    let edits = rest.get(72..).unwrap_or(&[]);
    for e in edits.chunks_exact(3) {
        let off = (usize::from(e[0]) | usize::from(e[1]) << 8) % buf.len();
        buf[off] ^= e[2];
    }
    if mode & 1 == 1 {
        let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[..60]), &buf[64..PAGE_SIZE_BYTES]);
        buf[60..64].copy_from_slice(&crc.to_le_bytes());
    }
    if let Ok(p) = decode_page(&buf) {
        let _ = p.check(&g, page);
    }
    check_canonical(&buf);
});
