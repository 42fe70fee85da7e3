//! The block stamp: what `nvraid-perf` (and any test) writes into the first
//! bytes of every block it writes, so that data read back, or two copies of
//! an array, can be checked block by block without keeping a copy.
//!
//! Layout (little-endian, [`STAMP_LEN`] bytes at the start of each block):
//!
//! | bytes  | field                                            |
//! |--------|--------------------------------------------------|
//! | 0..8   | magic [`STAMP_MAGIC`] (`b"nvrSTAMP"`)            |
//! | 8..16  | LBA of the block (in the bdev's own block size)  |
//! | 16..24 | sequence number of the IO that wrote it          |
//! | 24..32 | seed of the run that wrote it                    |
//!
//! The rest of the block is the writer's business. Pure code: no IO here.

/// Bytes a stamp occupies at the start of each block.
pub const STAMP_LEN: usize = 32;
/// First eight bytes of every stamped block.
pub const STAMP_MAGIC: [u8; 8] = *b"nvrSTAMP";

/// What a stamped block says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Stamp {
    pub lba: u64,
    pub seq: u64,
    pub seed: u64,
}

/// Why a block failed its check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StampError {
    /// The block is shorter than a stamp.
    TooShort { len: usize },
    /// No stamp at all (never written by a stamping writer, or overwritten).
    NoStamp,
    /// A stamp for another LBA: a misdirected write or read.
    WrongLba { expected: u64, found: Stamp },
    /// A stamp from another run.
    WrongSeed { expected: u64, found: Stamp },
    /// The right block and run, but not the write that was expected.
    WrongSeq { expected: u64, found: Stamp },
}

impl std::fmt::Display for StampError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StampError::TooShort { len } => write!(f, "block of {len} bytes is shorter than a stamp"),
            StampError::NoStamp => write!(f, "no stamp (magic missing)"),
            StampError::WrongLba { expected, found } => {
                write!(f, "stamp for LBA {} where LBA {expected} was expected (seq {})", found.lba, found.seq)
            }
            StampError::WrongSeed { expected, found } => {
                write!(f, "stamp from seed {:#x}, expected seed {expected:#x}", found.seed)
            }
            StampError::WrongSeq { expected, found } => {
                write!(f, "stamp of write seq {}, expected seq {expected}", found.seq)
            }
        }
    }
}

impl std::error::Error for StampError {}

fn word(block: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&block[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Writes `stamp` at the start of `block` (nothing if the block is too short).
#[inline]
pub fn stamp_block(block: &mut [u8], stamp: Stamp) {
    let Some(head) = block.get_mut(..STAMP_LEN) else { return };
    head[0..8].copy_from_slice(&STAMP_MAGIC);
    head[8..16].copy_from_slice(&stamp.lba.to_le_bytes());
    head[16..24].copy_from_slice(&stamp.seq.to_le_bytes());
    head[24..32].copy_from_slice(&stamp.seed.to_le_bytes());
}

/// Stamps every block of `buf` (blocks of `block_size` bytes, the first at
/// `first_lba`) with the same `seq` and `seed`.
#[inline]
pub fn stamp_buffer(buf: &mut [u8], block_size: usize, first_lba: u64, seq: u64, seed: u64) {
    if block_size < STAMP_LEN {
        return;
    }
    for (i, block) in buf.chunks_exact_mut(block_size).enumerate() {
        stamp_block(block, Stamp { lba: first_lba + i as u64, seq, seed });
    }
}

/// The stamp at the start of `block`, if it has one.
pub fn read_stamp(block: &[u8]) -> Result<Stamp, StampError> {
    if block.len() < STAMP_LEN {
        return Err(StampError::TooShort { len: block.len() });
    }
    if block[0..8] != STAMP_MAGIC {
        return Err(StampError::NoStamp);
    }
    Ok(Stamp { lba: word(block, 8), seq: word(block, 16), seed: word(block, 24) })
}

/// Checks that `block` carries a stamp for `lba` written by the run `seed`;
/// returns the stamp (its `seq` says which write landed).
pub fn check_block(block: &[u8], lba: u64, seed: u64) -> Result<Stamp, StampError> {
    let s = read_stamp(block)?;
    if s.lba != lba {
        return Err(StampError::WrongLba { expected: lba, found: s });
    }
    if s.seed != seed {
        return Err(StampError::WrongSeed { expected: seed, found: s });
    }
    Ok(s)
}

/// Like [`check_block`], and the block must come from write `seq`.
pub fn check_block_seq(block: &[u8], lba: u64, seq: u64, seed: u64) -> Result<Stamp, StampError> {
    let s = check_block(block, lba, seed)?;
    if s.seq != seq {
        return Err(StampError::WrongSeq { expected: seq, found: s });
    }
    Ok(s)
}

/// A block where two copies differ, with each copy's stamp as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyDiff {
    pub lba: u64,
    pub a: Result<Stamp, StampError>,
    pub b: Result<Stamp, StampError>,
}

/// Compares two copies of the same range (mirrors of an array, say), block
/// by block: returns the blocks (LBAs from `first_lba`) whose bytes differ.
pub fn compare_copies(a: &[u8], b: &[u8], block_size: usize, first_lba: u64) -> Vec<CopyDiff> {
    if block_size == 0 {
        return Vec::new();
    }
    a.chunks(block_size)
        .zip(b.chunks(block_size))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, (x, y))| CopyDiff { lba: first_lba + i as u64, a: read_stamp(x), b: read_stamp(y) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_mismatches() {
        let mut buf = vec![0u8; 4 * 512];
        stamp_buffer(&mut buf, 512, 100, 7, 0xfeed);
        for i in 0..4 {
            let block = &buf[i * 512..(i + 1) * 512];
            let s = check_block_seq(block, 100 + i as u64, 7, 0xfeed).unwrap();
            assert_eq!(s, Stamp { lba: 100 + i as u64, seq: 7, seed: 0xfeed });
        }
        let b1 = &buf[512..1024];
        assert!(matches!(check_block(b1, 100, 0xfeed), Err(StampError::WrongLba { expected: 100, .. })));
        assert!(matches!(check_block(b1, 101, 1), Err(StampError::WrongSeed { .. })));
        assert!(matches!(check_block_seq(b1, 101, 8, 0xfeed), Err(StampError::WrongSeq { expected: 8, .. })));
        assert_eq!(check_block(&[0u8; 512], 0, 0), Err(StampError::NoStamp));
        assert_eq!(read_stamp(&[0u8; 8]), Err(StampError::TooShort { len: 8 }));
        let mut other = buf.clone();
        other[2 * 512 + 300] ^= 1;
        let diffs = compare_copies(&buf, &other, 512, 100);
        assert_eq!(diffs.len(), 1);
        assert_eq!(diffs[0].lba, 102);
        assert_eq!(diffs[0].a, diffs[0].b, "the stamps agree; the damage is past them");
    }
}
