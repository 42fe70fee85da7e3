//! The on-disk bitmap page: a 64-byte little-endian header (magic, version,
//! page index, plane, array UUID, events, geometry, CRC32C) and 4032 bytes
//! of chunk bits. The encoder asserts its own output decodes; the decoder
//! returns an error for any input and never panics (it is fuzzed:
//! `fuzz/bitmap_page`).
//!
//! Version 2 pages come in two planes (`Plane`): the dirty bits, and the
//! written bits (a chunk written since the array was created). Version 1
//! pages have the dirty plane only; they still load (every chunk counts as
//! written) and an array whose bitmap was made of them keeps writing them
//! (its reserved region holds one plane). The plane byte and the byte
//! after it were the high half of a 32-bit page index in version 1, always
//! zero there (at most `MAX_CHUNKS / CHUNKS_PER_PAGE` pages).

use crate::geometry::{
    Geometry, Plane, CHUNKS_PER_PAGE, MAX_CHUNKS, PAGE_BITS_BYTES, PAGE_HEADER_BYTES, PAGE_SIZE_BYTES, WORDS_PER_PAGE,
};
use crate::BitmapError;
use zerocopy::little_endian::U16;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// "NVRBITMP": identifies an nvraid bitmap page.
pub const PAGE_MAGIC: [u8; 8] = *b"NVRBITMP";
/// The version the encoder writes by default: two planes.
pub const PAGE_VERSION: u32 = 2;
/// Pages of arrays made before the written plane: the dirty plane only.
pub const LEGACY_PAGE_VERSION: u32 = 1;

/// Which format and plane a page is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageKind {
    pub version: u32,
    pub plane: Plane,
}

impl PageKind {
    pub const DIRTY: PageKind = PageKind { version: PAGE_VERSION, plane: Plane::Dirty };
    pub const WRITTEN: PageKind = PageKind { version: PAGE_VERSION, plane: Plane::Written };
    pub const LEGACY: PageKind = PageKind { version: LEGACY_PAGE_VERSION, plane: Plane::Dirty };
}

/// Offset of the CRC field: the checksum covers every other byte of the page.
const CRC_OFFSET: usize = 60;

/// The page header as it lies on disk.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PageHeader {
    pub magic: [u8; 8],
    pub version: U32,
    pub page_index: U16,
    /// `Plane::index` (version 2); 0 in version 1.
    pub plane: u8,
    /// Zero.
    pub reserved: u8,
    pub array_uuid: [u8; 16],
    /// Batch sequence (plus the array's base) of the write that produced it.
    pub events: U64,
    pub chunk_size_blocks: U64,
    pub num_chunks: U64,
    pub block_size: U32,
    pub crc32c: U32,
}

/// A whole page as it lies on disk.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PageLayout {
    pub header: PageHeader,
    pub bits: [u8; PAGE_BITS_BYTES],
}

const _: () = assert!(std::mem::size_of::<PageHeader>() == PAGE_HEADER_BYTES);
const _: () = assert!(std::mem::size_of::<PageLayout>() == PAGE_SIZE_BYTES);
const _: () = assert!(std::mem::offset_of!(PageHeader, crc32c) == CRC_OFFSET);

fn page_crc(page: &[u8]) -> u32 {
    let head = crc32c::crc32c(&page[..CRC_OFFSET]);
    crc32c::crc32c_append(head, &page[PAGE_HEADER_BYTES..PAGE_SIZE_BYTES])
}

/// A page that passed every self-contained check (magic, version, CRC,
/// possible geometry, no bits past the last chunk).
#[derive(Debug)]
pub struct DecodedPage<'a> {
    pub kind: PageKind,
    pub page_index: u32,
    pub array_uuid: [u8; 16],
    pub events: u64,
    pub chunk_size_blocks: u64,
    pub num_chunks: u64,
    pub block_size: u32,
    pub bits: &'a [u8],
}

impl DecodedPage<'_> {
    /// The page's bits as in-memory words (`WORDS_PER_PAGE` of them).
    pub fn words(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
    }

    /// Checks the page belongs to this array, this slot, and this geometry.
    pub fn check(&self, g: &Geometry, page_index: usize) -> Result<(), BitmapError> {
        if self.page_index as usize != page_index {
            return Err(BitmapError::WrongPage { expected: page_index as u64, found: u64::from(self.page_index) });
        }
        if self.array_uuid != g.array_uuid {
            return Err(BitmapError::WrongArray);
        }
        if self.chunk_size_blocks != g.chunk_size_blocks
            || self.num_chunks != g.num_chunks()
            || self.block_size != g.block_size
        {
            return Err(BitmapError::GeometryMismatch(format!(
                "page has chunk_size_blocks={} num_chunks={} block_size={}, array has {} {} {}",
                self.chunk_size_blocks,
                self.num_chunks,
                self.block_size,
                g.chunk_size_blocks,
                g.num_chunks(),
                g.block_size
            )));
        }
        Ok(())
    }
}

/// Number of chunks page `page_index` covers in a bitmap of `num_chunks`.
fn chunks_in_page(num_chunks: u64, page_index: u64) -> u64 {
    num_chunks.saturating_sub(page_index.saturating_mul(CHUNKS_PER_PAGE)).min(CHUNKS_PER_PAGE)
}

/// Decodes and validates a page (extra bytes past 4096, block padding, are ignored).
pub fn decode_page(bytes: &[u8]) -> Result<DecodedPage<'_>, BitmapError> {
    let page = bytes.get(..PAGE_SIZE_BYTES).ok_or(BitmapError::ShortPage(bytes.len()))?;
    let layout = PageLayout::ref_from_bytes(page).map_err(|_| BitmapError::ShortPage(bytes.len()))?;
    let h = &layout.header;
    if h.magic != PAGE_MAGIC {
        return Err(BitmapError::BadMagic);
    }
    let version = h.version.get();
    if version != PAGE_VERSION && version != LEGACY_PAGE_VERSION {
        return Err(BitmapError::UnsupportedVersion(version));
    }
    let computed = page_crc(page);
    if computed != h.crc32c.get() {
        return Err(BitmapError::BadChecksum { stored: h.crc32c.get(), computed });
    }
    let (chunk_size_blocks, num_chunks, block_size) =
        (h.chunk_size_blocks.get(), h.num_chunks.get(), h.block_size.get());
    if chunk_size_blocks == 0 || !chunk_size_blocks.is_power_of_two() {
        return Err(BitmapError::ImpossibleGeometry(format!("chunk size {chunk_size_blocks} blocks")));
    }
    if num_chunks == 0 || num_chunks > MAX_CHUNKS {
        return Err(BitmapError::ImpossibleGeometry(format!("{num_chunks} chunks")));
    }
    if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(BitmapError::ImpossibleGeometry(format!("block size {block_size}")));
    }
    if num_chunks.checked_mul(chunk_size_blocks).is_none() {
        return Err(BitmapError::ImpossibleGeometry(format!("{num_chunks} chunks of {chunk_size_blocks} blocks")));
    }
    let plane = match Plane::from_index(h.plane) {
        Some(p) if h.reserved == 0 && (version == PAGE_VERSION || p == Plane::Dirty) => p,
        _ => return Err(BitmapError::ImpossibleGeometry(format!("plane {} (byte after it {})", h.plane, h.reserved))),
    };
    let page_index = u32::from(h.page_index.get());
    let in_page = chunks_in_page(num_chunks, u64::from(page_index));
    if in_page == 0 {
        return Err(BitmapError::ImpossibleGeometry(format!("page {page_index} lies past {num_chunks} chunks")));
    }
    // Bits past the last chunk are never set by the encoder.
    let bits = &layout.bits[..];
    let full_bytes = (in_page / 8) as usize;
    let tail_bits = (in_page % 8) as u32;
    let mut rest = &bits[full_bytes..];
    if tail_bits != 0 {
        if let Some((&partial, after)) = rest.split_first() {
            if partial >> tail_bits != 0 {
                return Err(BitmapError::BitsPastEnd);
            }
            rest = after;
        }
    }
    if rest.iter().any(|&b| b != 0) {
        return Err(BitmapError::BitsPastEnd);
    }
    Ok(DecodedPage {
        kind: PageKind { version, plane },
        page_index,
        array_uuid: h.array_uuid,
        events: h.events.get(),
        chunk_size_blocks,
        num_chunks,
        block_size,
        bits,
    })
}

/// Encodes page `page_index` of `g`'s dirty plane (version 2): see
/// [`encode_page_as`].
pub fn encode_page(g: &Geometry, page_index: usize, events: u64, words: &[u64], out: &mut [u8]) {
    encode_page_as(g, PageKind::DIRTY, page_index, events, words, out);
}

/// Encodes page `page_index` of `g` of format and plane `kind` holding
/// `words` (the page's slice of the in-memory bit words, at most
/// `WORDS_PER_PAGE`) into `out` (at least one page; bytes past the page are
/// zeroed). Asserts the result decodes to the same content before anyone
/// may write it (kept in release builds: a bad page on every member would
/// lose the bitmap).
pub fn encode_page_as(g: &Geometry, kind: PageKind, page_index: usize, events: u64, words: &[u64], out: &mut [u8]) {
    assert!(out.len() >= PAGE_SIZE_BYTES, "bitmap page buffer of {} bytes", out.len());
    assert!(words.len() <= WORDS_PER_PAGE && page_index < g.num_pages());
    assert!(
        kind == PageKind::DIRTY || kind == PageKind::WRITTEN || kind == PageKind::LEGACY,
        "no bitmap page format {kind:?}"
    );
    out.fill(0);
    let header = PageHeader {
        magic: PAGE_MAGIC,
        version: U32::new(kind.version),
        page_index: U16::new(page_index as u16),
        plane: kind.plane.index() as u8,
        reserved: 0,
        array_uuid: g.array_uuid,
        events: U64::new(events),
        chunk_size_blocks: U64::new(g.chunk_size_blocks),
        num_chunks: U64::new(g.num_chunks()),
        block_size: U32::new(g.block_size),
        crc32c: U32::new(0),
    };
    out[..PAGE_HEADER_BYTES].copy_from_slice(header.as_bytes());
    for (i, w) in words.iter().enumerate() {
        let at = PAGE_HEADER_BYTES + i * 8;
        out[at..at + 8].copy_from_slice(&w.to_le_bytes());
    }
    let crc = page_crc(out);
    out[CRC_OFFSET..PAGE_HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    match decode_page(out) {
        Ok(d) => {
            assert!(
                d.check(g, page_index).is_ok() && d.events == events && d.kind == kind,
                "encoded bitmap page fails its checks"
            );
            assert!(d.words().zip(words).all(|(a, b)| a == *b), "encoded bitmap page lost bits");
        }
        Err(e) => panic!("encoded bitmap page {page_index} does not decode: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geometry(chunks: u64) -> Geometry {
        Geometry::new([7; 16], 512, chunks * 128, Some(128)).unwrap()
    }

    /// The words of page `page` of a geometry, masked to real chunks.
    fn page_words(g: &Geometry, page: usize, seed: &[u64]) -> Vec<u64> {
        let in_page = chunks_in_page(g.num_chunks(), page as u64);
        let n = in_page.div_ceil(64) as usize;
        (0..n)
            .map(|i| {
                let w = seed.get(i % seed.len().max(1)).copied().unwrap_or(0);
                let left = in_page - i as u64 * 64;
                if left >= 64 {
                    w
                } else {
                    w & ((1u64 << left) - 1)
                }
            })
            .collect()
    }

    fn encoded(g: &Geometry, page: usize, words: &[u64]) -> Vec<u8> {
        let mut out = vec![0u8; g.page_buf_bytes()];
        encode_page(g, page, 42, words, &mut out);
        out
    }

    proptest! {
        #[test]
        fn round_trip(chunks in 1u64..100_000, page_pick in 0usize..4, events: u64, seed in prop::collection::vec(any::<u64>(), 1..16)) {
            let g = geometry(chunks);
            let page = page_pick % g.num_pages();
            let words = page_words(&g, page, &seed);
            let mut out = vec![0u8; g.page_buf_bytes()];
            encode_page(&g, page, events, &words, &mut out);
            let d = decode_page(&out).unwrap();
            d.check(&g, page).unwrap();
            prop_assert_eq!(d.events, events);
            let got: Vec<u64> = d.words().take(words.len()).collect();
            prop_assert_eq!(got, words.clone());
            prop_assert!(d.words().skip(words.len()).all(|w| w == 0));
        }

        #[test]
        fn any_single_bit_flip_is_rejected(bit in 0usize..PAGE_SIZE_BYTES * 8, seed in prop::collection::vec(any::<u64>(), 1..8)) {
            let g = geometry(50_000);
            let words = page_words(&g, 1, &seed);
            let mut out = encoded(&g, 1, &words);
            out[bit / 8] ^= 1 << (bit % 8);
            // CRC32C detects every single-bit error.
            prop_assert!(decode_page(&out).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..5000)) {
            let _ = decode_page(&bytes);
        }
    }

    /// Re-seals a tampered page with a valid CRC, so the later checks are reached.
    fn reseal(out: &mut [u8]) {
        let crc = page_crc(out);
        out[CRC_OFFSET..PAGE_HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn every_corruption_class_is_rejected() {
        let g = geometry(40_000); // two pages, the second one partial
        let words = page_words(&g, 1, &[u64::MAX]);
        let good = encoded(&g, 1, &words);
        decode_page(&good).unwrap().check(&g, 1).unwrap();

        assert!(matches!(decode_page(&good[..4095]), Err(BitmapError::ShortPage(4095))));
        let mut p = good.clone();
        p[0] = b'X';
        assert!(matches!(decode_page(&p), Err(BitmapError::BadMagic)));
        let mut p = good.clone();
        p[8] = 9;
        reseal(&mut p);
        assert!(matches!(decode_page(&p), Err(BitmapError::UnsupportedVersion(9))));
        let mut p = good.clone();
        p[PAGE_HEADER_BYTES + 3] ^= 0x10;
        assert!(matches!(decode_page(&p), Err(BitmapError::BadChecksum { .. })));
        // Impossible geometry: chunk size 0 or not a power of two, no
        // chunks, absurd chunk count, bad block size, page past the end.
        for (off, val) in [(40usize, 0u64), (40, 3), (48, 0), (48, MAX_CHUNKS + 1)] {
            let mut p = good.clone();
            p[off..off + 8].copy_from_slice(&val.to_le_bytes());
            reseal(&mut p);
            assert!(matches!(decode_page(&p), Err(BitmapError::ImpossibleGeometry(_))), "field {off} = {val}");
        }
        let mut p = good.clone();
        p[56..60].copy_from_slice(&100u32.to_le_bytes());
        reseal(&mut p);
        assert!(matches!(decode_page(&p), Err(BitmapError::ImpossibleGeometry(_))));
        let mut p = good.clone();
        p[12..16].copy_from_slice(&2u32.to_le_bytes());
        reseal(&mut p);
        assert!(matches!(decode_page(&p), Err(BitmapError::ImpossibleGeometry(_))));
        // A bit past the last chunk (40_000 - 32_256 = 7_744 chunks in page 1).
        let mut p = good.clone();
        p[PAGE_HEADER_BYTES + 7744 / 8] |= 1;
        reseal(&mut p);
        assert!(matches!(decode_page(&p), Err(BitmapError::BitsPastEnd)));
        let mut p = good.clone();
        p[PAGE_SIZE_BYTES - 1] = 1;
        reseal(&mut p);
        assert!(matches!(decode_page(&p), Err(BitmapError::BitsPastEnd)));
        // Valid pages that belong elsewhere.
        let d = decode_page(&good).unwrap();
        assert!(matches!(d.check(&g, 0), Err(BitmapError::WrongPage { expected: 0, found: 1 })));
        let other = Geometry { array_uuid: [8; 16], ..g };
        assert!(matches!(d.check(&other, 1), Err(BitmapError::WrongArray)));
        let other = Geometry { chunk_size_blocks: 256, ..g };
        assert!(matches!(d.check(&other, 1), Err(BitmapError::GeometryMismatch(_))));
        let other = Geometry { data_blocks: g.data_blocks + 128, ..g };
        assert!(matches!(d.check(&other, 1), Err(BitmapError::GeometryMismatch(_))));
        // A zeroed (never written) region.
        assert!(matches!(decode_page(&[0u8; 4096]), Err(BitmapError::BadMagic)));
    }

    /// Every format and plane round-trips; a version 1 page (as arrays made
    /// before the written plane wrote it) still decodes as the dirty plane;
    /// a plane that does not exist, or a written plane in version 1, is
    /// refused.
    #[test]
    fn planes_round_trip_and_version_1_pages_decode() {
        let g = geometry(40_000);
        let words = page_words(&g, 1, &[0x1234_5678_9abc_def0]);
        for kind in [PageKind::DIRTY, PageKind::WRITTEN, PageKind::LEGACY] {
            let mut out = vec![0u8; g.page_buf_bytes()];
            encode_page_as(&g, kind, 1, 9, &words, &mut out);
            let d = decode_page(&out).unwrap();
            d.check(&g, 1).unwrap();
            assert_eq!(d.kind, kind);
            assert!(d.words().zip(&words).all(|(a, b)| a == *b));
        }
        // A version 1 page laid out as the old encoder did: page index a
        // 32-bit field, no plane.
        let mut v1 = vec![0u8; PAGE_SIZE_BYTES];
        v1[..8].copy_from_slice(&PAGE_MAGIC);
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        v1[12..16].copy_from_slice(&1u32.to_le_bytes());
        v1[16..32].copy_from_slice(&g.array_uuid);
        v1[32..40].copy_from_slice(&5u64.to_le_bytes());
        v1[40..48].copy_from_slice(&g.chunk_size_blocks.to_le_bytes());
        v1[48..56].copy_from_slice(&g.num_chunks().to_le_bytes());
        v1[56..60].copy_from_slice(&g.block_size.to_le_bytes());
        v1[PAGE_HEADER_BYTES..PAGE_HEADER_BYTES + 8].copy_from_slice(&words[0].to_le_bytes());
        reseal(&mut v1);
        let d = decode_page(&v1).unwrap();
        d.check(&g, 1).unwrap();
        assert_eq!((d.kind, d.events, d.words().next()), (PageKind::LEGACY, 5, Some(words[0])));
        for (version, plane, reserved) in [(1u32, 1u8, 0u8), (2, 2, 0), (2, 0, 1), (1, 0, 1)] {
            let mut p = v1.clone();
            p[8..12].copy_from_slice(&version.to_le_bytes());
            p[14] = plane;
            p[15] = reserved;
            reseal(&mut p);
            assert!(
                matches!(decode_page(&p), Err(BitmapError::ImpossibleGeometry(_))),
                "version {version} plane {plane} byte {reserved}"
            );
        }
    }

    #[test]
    fn large_blocks_pad_the_page() {
        let g = Geometry::new([1; 16], 8192, 1 << 20, Some(1024)).unwrap();
        assert_eq!(g.page_blocks(), 1);
        assert_eq!(g.page_buf_bytes(), 8192);
        let out = encoded(&g, 0, &[5]);
        assert!(out[PAGE_SIZE_BYTES..].iter().all(|&b| b == 0));
        decode_page(&out).unwrap().check(&g, 0).unwrap();
    }
}
