//! Bitmap geometry: how an array's block range is cut into chunks, how the
//! chunk bits are laid out in words and pages, and where the pages live on
//! a member. All arithmetic here is checked: a bad range is an error.

use crate::BitmapError;
use std::ops::Range;

/// Bytes of one on-disk bitmap page (header plus bit array).
pub const PAGE_SIZE_BYTES: usize = 4096;
/// Bytes of the page header.
pub const PAGE_HEADER_BYTES: usize = 64;
/// Bytes of the bit array in one page.
pub const PAGE_BITS_BYTES: usize = PAGE_SIZE_BYTES - PAGE_HEADER_BYTES;
/// In-memory 64-bit words covered by one page.
pub const WORDS_PER_PAGE: usize = PAGE_BITS_BYTES / 8;
/// Chunks (bits) covered by one page.
pub const CHUNKS_PER_PAGE: u64 = (PAGE_BITS_BYTES * 8) as u64;
/// Default chunk size (md's default for large arrays).
pub const DEFAULT_CHUNK_SIZE_BYTES: u64 = 64 << 20;
/// Planes of pages a version-2 bitmap keeps on each member.
pub const PLANES: usize = 2;

/// One bit plane of the on-disk bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plane {
    /// Write intent: the chunk may differ between members (resync it).
    Dirty,
    /// The chunk was written since the array was created (version 2 only);
    /// a chunk never written holds nothing a reader may rely on.
    Written,
}

impl Plane {
    pub fn index(self) -> usize {
        match self {
            Plane::Dirty => 0,
            Plane::Written => 1,
        }
    }

    pub fn from_index(i: u8) -> Option<Plane> {
        match i {
            0 => Some(Plane::Dirty),
            1 => Some(Plane::Written),
            _ => None,
        }
    }
}

/// Upper bound on chunks, so counters of a corrupted or absurd geometry
/// cannot exhaust memory (2^26 chunks: 4 PiB at 64 MiB chunks).
pub const MAX_CHUNKS: u64 = 1 << 26;

const _: () = assert!(PAGE_BITS_BYTES / 8 * 8 == PAGE_BITS_BYTES);
const _: () = assert!(CHUNKS_PER_PAGE == WORDS_PER_PAGE as u64 * 64);
// A page index fits the header's 16 bits.
const _: () = assert!(MAX_CHUNKS.div_ceil(CHUNKS_PER_PAGE) <= u16::MAX as u64);

/// The shape of one array's bitmap. `data_blocks` is the array's address
/// space the bitmap covers (the RAID decides which: array LBAs for raid1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub array_uuid: [u8; 16],
    /// Block size of the array and of every member, in bytes.
    pub block_size: u32,
    pub data_blocks: u64,
    /// A power of two.
    pub chunk_size_blocks: u64,
}

impl Geometry {
    /// A checked geometry; `chunk_size_blocks: None` picks 64 MiB worth of blocks.
    pub fn new(
        array_uuid: [u8; 16],
        block_size: u32,
        data_blocks: u64,
        chunk_size_blocks: Option<u64>,
    ) -> Result<Geometry, BitmapError> {
        let chunk_size_blocks = match chunk_size_blocks {
            Some(c) => c,
            None => (DEFAULT_CHUNK_SIZE_BYTES / u64::from(block_size.max(1))).max(1),
        };
        let g = Geometry { array_uuid, block_size, data_blocks, chunk_size_blocks };
        g.validate()?;
        Ok(g)
    }

    /// Checks every field; decoders use it on geometry read from disk.
    pub fn validate(&self) -> Result<(), BitmapError> {
        if !(512..=65536).contains(&self.block_size) || !self.block_size.is_power_of_two() {
            return Err(BitmapError::Geometry(format!(
                "block size {} is not a power of two in 512..=65536",
                self.block_size
            )));
        }
        if self.data_blocks == 0 {
            return Err(BitmapError::Geometry("the bitmap covers no blocks".into()));
        }
        if self.chunk_size_blocks == 0 || !self.chunk_size_blocks.is_power_of_two() {
            return Err(BitmapError::Geometry(format!(
                "chunk size {} blocks is not a power of two",
                self.chunk_size_blocks
            )));
        }
        if self.num_chunks() > MAX_CHUNKS {
            return Err(BitmapError::Geometry(format!(
                "{} chunks exceed the limit of {MAX_CHUNKS}; use a larger chunk size",
                self.num_chunks()
            )));
        }
        Ok(())
    }

    pub fn chunk_shift(&self) -> u32 {
        self.chunk_size_blocks.trailing_zeros()
    }

    pub fn num_chunks(&self) -> u64 {
        self.data_blocks.div_ceil(self.chunk_size_blocks.max(1))
    }

    pub fn num_words(&self) -> usize {
        self.num_chunks().div_ceil(64) as usize
    }

    pub fn num_pages(&self) -> usize {
        self.num_chunks().div_ceil(CHUNKS_PER_PAGE) as usize
    }

    /// Blocks one page occupies on a member (a page is padded to a block).
    pub fn page_blocks(&self) -> u64 {
        (PAGE_SIZE_BYTES as u64).div_ceil(u64::from(self.block_size)).max(1)
    }

    /// Bytes of one page as written (the page, zero padded to whole blocks).
    pub fn page_buf_bytes(&self) -> usize {
        (self.page_blocks() * u64::from(self.block_size)) as usize
    }

    /// Blocks one plane of pages occupies on a member.
    pub fn plane_blocks(&self) -> u64 {
        self.num_pages() as u64 * self.page_blocks()
    }

    /// Blocks the whole bitmap occupies on each member: the RAID reserves
    /// them. Two planes of pages: the dirty bits, then the written bits
    /// (page version 2).
    pub fn region_blocks(&self) -> u64 {
        PLANES as u64 * self.plane_blocks()
    }

    /// Blocks a version-1 bitmap occupies (the dirty plane only): an array
    /// created before the written plane existed reserved just these, and
    /// its bitmap keeps that format.
    pub fn legacy_region_blocks(&self) -> u64 {
        self.plane_blocks()
    }

    /// Member block (from the region's start) of page `page` of `plane`.
    pub fn page_offset_blocks(&self, plane: Plane, page: usize) -> u64 {
        (plane.index() * self.num_pages() + page) as u64 * self.page_blocks()
    }

    /// The chunks `[first, end)` touched by a write of `num_blocks` at
    /// `first_block`; an empty or out-of-range write is an error.
    pub fn chunk_range(&self, first_block: u64, num_blocks: u64) -> Result<Range<u64>, BitmapError> {
        let end_block = first_block.checked_add(num_blocks);
        match end_block {
            Some(end) if num_blocks > 0 && end <= self.data_blocks => {
                let shift = self.chunk_shift();
                Ok(first_block >> shift..((end - 1) >> shift) + 1)
            }
            _ => Err(BitmapError::OutOfRange { first_block, num_blocks, data_blocks: self.data_blocks }),
        }
    }

    /// The blocks of chunk `chunk` (the last chunk may be short).
    pub fn chunk_blocks(&self, chunk: u64) -> Range<u64> {
        let start = chunk.saturating_mul(self.chunk_size_blocks).min(self.data_blocks);
        start..start.saturating_add(self.chunk_size_blocks).min(self.data_blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn g(data_blocks: u64, chunk: u64) -> Geometry {
        Geometry::new([0; 16], 512, data_blocks, Some(chunk)).unwrap()
    }

    #[test]
    fn ranges_crossing_chunk_boundaries() {
        let g = g(1000, 128); // 8 chunks, the last one 104 blocks
        assert_eq!(g.num_chunks(), 8);
        assert_eq!(g.chunk_range(0, 1).unwrap(), 0..1);
        assert_eq!(g.chunk_range(127, 1).unwrap(), 0..1);
        assert_eq!(g.chunk_range(127, 2).unwrap(), 0..2);
        assert_eq!(g.chunk_range(128, 128).unwrap(), 1..2);
        assert_eq!(g.chunk_range(100, 300).unwrap(), 0..4);
        assert_eq!(g.chunk_range(999, 1).unwrap(), 7..8);
        assert_eq!(g.chunk_range(0, 1000).unwrap(), 0..8);
        assert_eq!(g.chunk_blocks(7), 896..1000);
        assert!(g.chunk_range(999, 2).is_err());
        assert!(g.chunk_range(5, 0).is_err());
        assert!(g.chunk_range(u64::MAX, 2).is_err());
    }

    #[test]
    fn geometry_limits() {
        assert!(Geometry::new([0; 16], 512, 0, None).is_err());
        assert!(Geometry::new([0; 16], 500, 10, None).is_err());
        assert!(Geometry::new([0; 16], 512, 10, Some(3)).is_err());
        assert!(Geometry::new([0; 16], 512, u64::MAX, Some(1)).is_err());
        let d = Geometry::new([0; 16], 4096, 1 << 30, None).unwrap();
        assert_eq!(d.chunk_size_blocks * 4096, DEFAULT_CHUNK_SIZE_BYTES);
        assert_eq!(d.page_blocks(), 1);
        assert_eq!(Geometry::new([0; 16], 512, 1 << 30, None).unwrap().page_blocks(), 8);
        let big = g(CHUNKS_PER_PAGE * 128 + 1, 128);
        assert_eq!(big.num_pages(), 2);
        assert_eq!(big.region_blocks(), 32);
        assert_eq!(big.legacy_region_blocks(), 16);
        assert_eq!(big.page_offset_blocks(Plane::Written, 1), 24);
    }

    proptest! {
        #[test]
        fn chunk_range_is_exactly_the_overlapping_chunks(shift in 0u32..12, data in 1u64..1_000_000, a in any::<u64>(), b in any::<u64>()) {
            let g = g(data, 1 << shift);
            let first = a % data;
            let n = 1 + b % (data - first);
            let r = g.chunk_range(first, n).unwrap();
            for c in r.start.saturating_sub(1)..(r.end + 1).min(g.num_chunks()) {
                let cb = g.chunk_blocks(c);
                let overlaps = cb.start < first + n && first < cb.end;
                prop_assert_eq!(overlaps, r.contains(&c), "chunk {} blocks {:?}", c, cb);
            }
        }
    }
}
