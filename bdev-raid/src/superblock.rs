//! The on-disk RAID superblock: 4096 little-endian bytes at block 0 of every
//! member (magic, version, array identity and geometry, this member's slot,
//! the per-slot table, events counter, clean flag, bitmap location, partial
//! parity log location, CRC32C), its typed in-memory form
//! [`SuperblockInfo`], and the member's metadata layout (superblock, then
//! bitmap, then the partial parity log, then data at an aligned offset).
//!
//! Pure: no IO. The encoder asserts its own output decodes to the same info;
//! the decoder returns an error for any input and never panics (it is fuzzed:
//! `fuzz/superblock`). Every valid superblock has exactly one encoding
//! (reserved bytes, name padding and unused slots must be zero), so a decoded
//! superblock re-encodes to the bytes it came from.

use crate::level::Level;
use crate::map::{Geometry, MAX_MEMBERS};
use uuid::Uuid;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// "NVRAIDSB": identifies an nvraid superblock.
pub const SB_MAGIC: [u8; 8] = *b"NVRAIDSB";
pub const SB_VERSION: u32 = 1;
/// Bytes of the superblock (padded with zeros to whole blocks on the member).
pub const SB_SIZE_BYTES: usize = 4096;
/// Entries in the slot table: one per possible member.
pub const SB_MAX_SLOTS: usize = 32;
/// Bytes of the array name field; names are NUL-padded and at most one byte
/// shorter, so the field always holds a terminator (as SPDK's does).
pub const SB_NAME_BYTES: usize = 64;
/// Member data starts on this boundary (md and SPDK both use 1 MiB).
pub const DATA_ALIGN_BYTES: u64 = 1 << 20;
/// `flags` bit: the array was shut down cleanly (no write may be half done).
const FLAG_CLEAN: u32 = 1;
/// `flags` bit: a whole-array check left every stripe's redundancy right
/// (and writes keep it so), so partial writes may update it in place
/// (raid5's read-modify-write). Written only by levels that use it
/// (`RaidLevel::trusts_checked_redundancy`); superblocks without it read as
/// before.
const FLAG_REDUNDANCY_VERIFIED: u32 = 2;
/// `flags` bit: every member keeps a partial parity log (raid5's write-hole
/// log, `crate::ppl`) at `ppl_offset_blocks`, `ppl_length_blocks` blocks
/// long. Without it those two fields (once reserved bytes) must be zero, so
/// superblocks written before the log existed read as arrays without one.
const FLAG_PPL: u32 = 4;
const KNOWN_FLAGS: u32 = FLAG_CLEAN | FLAG_REDUNDANCY_VERIFIED | FLAG_PPL;

/// Offset of the CRC field; the checksum covers all 4096 bytes with it zeroed.
const CRC_OFFSET: usize = 12;
/// Offset of the slot table.
const SLOTS_OFFSET: usize = 512;

const _: () = assert!(SB_MAX_SLOTS == MAX_MEMBERS);
const _: () = assert!(SB_MAX_SLOTS <= u8::MAX as usize);

/// One slot table entry as it lies on disk.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SlotEntry {
    /// Nil for an unused entry or for a failed slot whose member is gone.
    pub member_uuid: [u8; 16],
    pub data_offset_blocks: U64,
    pub data_size_blocks: U64,
    /// Rebuilding only: blocks below this offset of the member's data are valid.
    pub recovery_offset_blocks: U64,
    /// [`SlotState`] code; 0 marks an entry past the member count.
    pub state: u8,
    pub reserved: [u8; 23],
}

/// The whole superblock as it lies on disk.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Superblock {
    pub magic: [u8; 8],
    pub version: U32,
    pub crc32c: U32,
    pub array_uuid: [u8; 16],
    pub name: [u8; SB_NAME_BYTES],
    /// Incremented on every metadata change: the freshest copy has the most.
    pub events: U64,
    pub array_blocks: U64,
    /// 0 for raid1.
    pub strip_size_blocks: U64,
    pub block_size: U32,
    pub flags: U32,
    pub level: u8,
    pub num_members: u8,
    pub this_slot: u8,
    pub reserved0: [u8; 13],
    pub member_uuid: [u8; 16],
    /// All three zero when the array has no write-intent bitmap.
    pub bitmap_offset_blocks: U64,
    pub bitmap_length_blocks: U64,
    pub bitmap_chunk_size_blocks: U64,
    /// Both zero unless `flags` has `FLAG_PPL`.
    pub ppl_offset_blocks: U64,
    pub ppl_length_blocks: U64,
    pub reserved1: [u8; 312],
    pub slots: [SlotEntry; SB_MAX_SLOTS],
    pub reserved2: [u8; 1536],
}

const _: () = assert!(std::mem::size_of::<SlotEntry>() == 64);
const _: () = assert!(std::mem::size_of::<Superblock>() == SB_SIZE_BYTES);
const _: () = assert!(std::mem::offset_of!(Superblock, crc32c) == CRC_OFFSET);
const _: () = assert!(std::mem::offset_of!(Superblock, slots) == SLOTS_OFFSET);

/// Why bytes are not a usable superblock. Every class has its own variant so
/// callers can tell "no superblock here" (`BadMagic`) from corruption.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    #[error("superblock buffer is {0} bytes, need {SB_SIZE_BYTES}")]
    Short(usize),
    #[error("no nvraid superblock (bad magic)")]
    BadMagic,
    #[error("superblock version {0} is not supported (this build reads version {SB_VERSION})")]
    UnsupportedVersion(u32),
    #[error("superblock checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum { stored: u32, computed: u32 },
    #[error("unknown RAID level code {0} in superblock")]
    UnknownLevel(u8),
    #[error("bad array name in superblock: {0}")]
    BadName(String),
    #[error("impossible superblock geometry: {0}")]
    ImpossibleGeometry(String),
    #[error("superblock slot table inconsistent: {0}")]
    BadSlotTable(String),
    #[error("superblock field at byte {0} holds bits this version does not define")]
    UnknownBits(usize),
}

/// State of one slot, as the array last recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SlotState {
    /// Holds a full, in-sync copy of its data.
    Active,
    /// Failed or removed: its data is not trusted until resynced.
    Failed,
    /// Assigned to the slot but holding no valid data yet.
    Spare,
    /// Being rebuilt: data below the offset (member data blocks) is valid.
    Rebuilding { recovery_offset_blocks: u64 },
}

impl SlotState {
    fn code(self) -> u8 {
        match self {
            SlotState::Active => 1,
            SlotState::Failed => 2,
            SlotState::Spare => 3,
            SlotState::Rebuilding { .. } => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SlotState::Active => "active",
            SlotState::Failed => "failed",
            SlotState::Spare => "spare",
            SlotState::Rebuilding { .. } => "rebuilding",
        }
    }
}

/// One slot of the array, typed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SlotInfo {
    /// Nil only for a failed slot whose member is gone.
    pub member_uuid: Uuid,
    pub state: SlotState,
    /// Where the member's data area begins and how long it is (blocks).
    pub data_offset_blocks: u64,
    pub data_size_blocks: u64,
}

/// Where the write-intent bitmap lies on every member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BitmapLocation {
    pub offset_blocks: u64,
    pub length_blocks: u64,
    /// A power of two.
    pub chunk_size_blocks: u64,
}

/// Where the partial parity log lies on every member (`crate::ppl` says
/// how it is divided into entry slots).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PplLocation {
    pub offset_blocks: u64,
    pub length_blocks: u64,
}

/// A superblock's content, typed. Built by the RAID code to write, returned by
/// [`decode`]. Everything but `this_slot` and `member_uuid` is the same on
/// every member written with the same `events`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SuperblockInfo {
    pub array_uuid: Uuid,
    /// At most `SB_NAME_BYTES - 1` bytes of UTF-8, no NUL, not empty.
    pub name: String,
    pub level: Level,
    /// 0 for a level without strips, a power of two otherwise.
    pub strip_size_blocks: u64,
    /// Block size of the array and of every member, in bytes.
    pub block_size: u32,
    pub array_blocks: u64,
    pub events: u64,
    /// False after an unclean shutdown: the bitmap's dirty chunks need resync.
    pub clean: bool,
    /// A whole-array check verified the redundancy (`FLAG_REDUNDANCY_VERIFIED`).
    pub redundancy_verified: bool,
    pub bitmap: Option<BitmapLocation>,
    /// The partial parity log (`FLAG_PPL`), None without one.
    pub ppl: Option<PplLocation>,
    /// Which slot the member carrying this copy fills.
    pub this_slot: usize,
    /// Equal to `slots[this_slot].member_uuid`.
    pub member_uuid: Uuid,
    /// One entry per member: `slots.len()` is the member count.
    pub slots: Vec<SlotInfo>,
}

/// Where the metadata ends and data begins on a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataLayout {
    pub superblock_blocks: u64,
    /// None when the array has no bitmap.
    pub bitmap: Option<BitmapLocation>,
    /// None when the array keeps no partial parity log.
    pub ppl: Option<PplLocation>,
    /// First data block, aligned to `DATA_ALIGN_BYTES` (or to a block when
    /// blocks are larger).
    pub data_offset_blocks: u64,
}

/// Blocks the superblock occupies at the start of a member.
pub fn superblock_blocks(block_size: u32) -> u64 {
    (SB_SIZE_BYTES as u64).div_ceil(u64::from(block_size.max(1)))
}

fn check_block_size(block_size: u32) -> Result<(), SuperblockError> {
    if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(SuperblockError::ImpossibleGeometry(format!(
            "block size {block_size} is not a power of two in 512..=65536"
        )));
    }
    Ok(())
}

impl MetadataLayout {
    /// Superblock at block 0, the bitmap (if `bitmap_length_blocks > 0`, with
    /// chunks of `bitmap_chunk_size_blocks`) right after it, data at the next
    /// `DATA_ALIGN_BYTES` boundary.
    pub fn new(
        block_size: u32,
        bitmap_length_blocks: u64,
        bitmap_chunk_size_blocks: u64,
    ) -> Result<MetadataLayout, SuperblockError> {
        check_block_size(block_size)?;
        let superblock_blocks = superblock_blocks(block_size);
        let bitmap = if bitmap_length_blocks == 0 {
            None
        } else {
            if !bitmap_chunk_size_blocks.is_power_of_two() {
                return Err(SuperblockError::ImpossibleGeometry(format!(
                    "bitmap chunk size {bitmap_chunk_size_blocks} blocks is not a power of two"
                )));
            }
            Some(BitmapLocation {
                offset_blocks: superblock_blocks,
                length_blocks: bitmap_length_blocks,
                chunk_size_blocks: bitmap_chunk_size_blocks,
            })
        };
        let meta_end = bitmap.map_or(Some(superblock_blocks), |b| b.offset_blocks.checked_add(b.length_blocks));
        let data_offset_blocks = meta_end
            .and_then(|e| data_start(block_size, e))
            .ok_or_else(|| SuperblockError::ImpossibleGeometry("bitmap area overflows".into()))?;
        Ok(MetadataLayout { superblock_blocks, bitmap, ppl: None, data_offset_blocks })
    }

    /// The same layout with a partial parity log of `length_blocks` right
    /// after the bitmap (or the superblock); data moves to the next aligned
    /// boundary past it.
    pub fn with_ppl(self, block_size: u32, length_blocks: u64) -> Result<MetadataLayout, SuperblockError> {
        check_block_size(block_size)?;
        let offset_blocks = self.bitmap.map_or(self.superblock_blocks, |b| b.offset_blocks + b.length_blocks);
        if length_blocks == 0 {
            return Err(SuperblockError::ImpossibleGeometry("partial parity log of 0 blocks".into()));
        }
        let data_offset_blocks = offset_blocks
            .checked_add(length_blocks)
            .and_then(|e| data_start(block_size, e))
            .ok_or_else(|| SuperblockError::ImpossibleGeometry("partial parity log area overflows".into()))?;
        Ok(MetadataLayout { ppl: Some(PplLocation { offset_blocks, length_blocks }), data_offset_blocks, ..self })
    }
}

/// The first data block at or after `meta_end`: the next `DATA_ALIGN_BYTES`
/// boundary (a block when blocks are larger).
fn data_start(block_size: u32, meta_end: u64) -> Option<u64> {
    let align_blocks = (DATA_ALIGN_BYTES / u64::from(block_size)).max(1);
    meta_end.checked_next_multiple_of(align_blocks)
}

/// `map::Geometry::new` over sizes read from disk. Its size arithmetic
/// (`n * min`, the concat sum) is unchecked, so sizes whose sum overflows are
/// refused first: every array size it computes is at most that sum.
fn checked_geometry(level: Level, strip_size_blocks: u64, sizes: &[u64]) -> Result<Geometry, SuperblockError> {
    if sizes.iter().try_fold(0u64, |sum, &s| sum.checked_add(s)).is_none() {
        return Err(SuperblockError::ImpossibleGeometry(format!(
            "member data sizes {sizes:?} add up past 2^64 blocks"
        )));
    }
    Geometry::new(level, strip_size_blocks, sizes).map_err(|e| SuperblockError::ImpossibleGeometry(e.to_string()))
}

impl SuperblockInfo {
    /// The superblock of a new array over members of `member_blocks` total
    /// blocks each (in slot order, every slot active), laid out per `layout`.
    /// Data sizes and the array size follow `map::Geometry`. The result is
    /// slot 0's copy with `events` 1 and `clean` true; see [`Self::for_slot`].
    pub fn new_array(
        name: &str,
        array_uuid: Uuid,
        level: Level,
        strip_size_blocks: u64,
        block_size: u32,
        layout: &MetadataLayout,
        members: &[(Uuid, u64)],
    ) -> Result<SuperblockInfo, SuperblockError> {
        let capacities: Vec<u64> = members
            .iter()
            .map(|&(uuid, total)| {
                total.checked_sub(layout.data_offset_blocks).filter(|&c| c > 0).ok_or_else(|| {
                    SuperblockError::ImpossibleGeometry(format!(
                        "member {uuid} has {total} blocks, metadata needs {}",
                        layout.data_offset_blocks
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        let strip_size_blocks = if level.uses_strips() { strip_size_blocks } else { 0 };
        let geometry = checked_geometry(level, strip_size_blocks, &capacities)?;
        let slots = members
            .iter()
            .enumerate()
            .map(|(i, &(member_uuid, _))| SlotInfo {
                member_uuid,
                state: SlotState::Active,
                data_offset_blocks: layout.data_offset_blocks,
                data_size_blocks: geometry.member_data_blocks(i),
            })
            .collect();
        let info = SuperblockInfo {
            array_uuid,
            name: name.to_owned(),
            level,
            strip_size_blocks,
            block_size,
            array_blocks: geometry.array_blocks(),
            events: 1,
            clean: true,
            // Members are not zeroed at create: nothing is verified yet.
            redundancy_verified: false,
            bitmap: layout.bitmap,
            ppl: layout.ppl,
            this_slot: 0,
            member_uuid: members.first().map_or(Uuid::nil(), |m| m.0),
            slots,
        };
        info.validate()?;
        Ok(info)
    }

    pub fn num_members(&self) -> usize {
        self.slots.len()
    }

    /// This member's entry (None only for an info that fails `validate`).
    pub fn this_member(&self) -> Option<&SlotInfo> {
        self.slots.get(self.this_slot)
    }

    /// The copy to write on the member in `slot` (None if the slot is out of
    /// range or has no member).
    pub fn for_slot(&self, slot: usize) -> Option<SuperblockInfo> {
        let s = self.slots.get(slot).filter(|s| !s.member_uuid.is_nil())?;
        Some(SuperblockInfo { this_slot: slot, member_uuid: s.member_uuid, ..self.clone() })
    }

    /// The slot `member_uuid` fills in this copy's table.
    pub fn slot_of(&self, member_uuid: Uuid) -> Option<usize> {
        if member_uuid.is_nil() {
            return None;
        }
        self.slots.iter().position(|s| s.member_uuid == member_uuid)
    }

    /// The address layout the table describes.
    pub fn geometry(&self) -> Result<Geometry, SuperblockError> {
        let sizes: Vec<u64> = self.slots.iter().map(|s| s.data_size_blocks).collect();
        checked_geometry(self.level, self.strip_size_blocks, &sizes)
    }

    /// Whether `self` and `other` describe the same array state, ignoring
    /// which member each copy was written for.
    pub fn same_array_state(&self, other: &SuperblockInfo) -> bool {
        let a = SuperblockInfo { this_slot: 0, member_uuid: Uuid::nil(), ..self.clone() };
        let b = SuperblockInfo { this_slot: 0, member_uuid: Uuid::nil(), ..other.clone() };
        a == b
    }

    /// Every rule [`decode`] applies after the checksum, on the typed form.
    pub fn validate(&self) -> Result<(), SuperblockError> {
        let geo = |m: String| Err(SuperblockError::ImpossibleGeometry(m));
        let table = |m: String| Err(SuperblockError::BadSlotTable(m));
        if self.name.is_empty() || self.name.len() >= SB_NAME_BYTES || self.name.contains('\0') {
            return Err(SuperblockError::BadName(format!(
                "{:?} must be 1..{SB_NAME_BYTES} bytes without NUL",
                self.name
            )));
        }
        if self.array_uuid.is_nil() {
            return geo("nil array UUID".into());
        }
        check_block_size(self.block_size)?;
        let n = self.slots.len();
        if n == 0 || n > SB_MAX_SLOTS {
            return geo(format!("{n} members (1..={SB_MAX_SLOTS} supported)"));
        }
        if n < self.level.min_members() {
            return geo(format!("{} needs at least {} members, has {n}", self.level.name(), self.level.min_members()));
        }
        if self.this_slot >= n {
            return geo(format!("this member's slot {} is not below the member count {n}", self.this_slot));
        }
        if self.level.uses_strips() {
            if !self.strip_size_blocks.is_power_of_two() {
                return geo(format!("strip size {} blocks is not a power of two", self.strip_size_blocks));
            }
        } else if self.strip_size_blocks != 0 {
            return geo(format!("{} has no strips but strip size is {}", self.level.name(), self.strip_size_blocks));
        }
        let sb_blocks = superblock_blocks(self.block_size);
        let meta_end = match self.bitmap {
            None => sb_blocks,
            Some(b) => {
                if b.length_blocks == 0 || !b.chunk_size_blocks.is_power_of_two() {
                    return geo(format!(
                        "bitmap of {} blocks with chunks of {} blocks",
                        b.length_blocks, b.chunk_size_blocks
                    ));
                }
                if b.offset_blocks < sb_blocks {
                    return geo(format!(
                        "bitmap at block {} overlaps the superblock ({sb_blocks} blocks)",
                        b.offset_blocks
                    ));
                }
                match b.offset_blocks.checked_add(b.length_blocks) {
                    Some(end) => end,
                    None => return geo("bitmap area overflows".into()),
                }
            }
        };
        let meta_end = match self.ppl {
            None => meta_end,
            Some(l) => {
                if l.length_blocks == 0 || l.offset_blocks < meta_end {
                    return geo(format!(
                        "partial parity log of {} blocks at block {} (metadata before it ends at {meta_end})",
                        l.length_blocks, l.offset_blocks
                    ));
                }
                match l.offset_blocks.checked_add(l.length_blocks) {
                    Some(end) => end,
                    None => return geo("partial parity log area overflows".into()),
                }
            }
        };
        for (i, s) in self.slots.iter().enumerate() {
            if s.data_offset_blocks < meta_end {
                return geo(format!(
                    "slot {i} data offset {} lies before the end of the metadata area ({meta_end})",
                    s.data_offset_blocks
                ));
            }
            if s.data_size_blocks == 0 || s.data_offset_blocks.checked_add(s.data_size_blocks).is_none() {
                return geo(format!("slot {i} data area of {} blocks at {}", s.data_size_blocks, s.data_offset_blocks));
            }
            match s.state {
                SlotState::Failed => {}
                _ if s.member_uuid.is_nil() => return table(format!("slot {i} is {} with no member", s.state.name())),
                SlotState::Rebuilding { recovery_offset_blocks } if recovery_offset_blocks > s.data_size_blocks => {
                    return table(format!(
                        "slot {i} recovery offset {recovery_offset_blocks} past its {} data blocks",
                        s.data_size_blocks
                    ))
                }
                _ => {}
            }
            if !s.member_uuid.is_nil() && self.slots[..i].iter().any(|p| p.member_uuid == s.member_uuid) {
                return table(format!("member {} fills more than one slot", s.member_uuid));
            }
        }
        let this = &self.slots[self.this_slot];
        if this.member_uuid != self.member_uuid || self.member_uuid.is_nil() {
            return table(format!(
                "this member {} is not the one in its slot {} ({})",
                self.member_uuid, self.this_slot, this.member_uuid
            ));
        }
        let g = self.geometry()?;
        if g.array_blocks() != self.array_blocks {
            return geo(format!("array size {} blocks, the slot table gives {}", self.array_blocks, g.array_blocks()));
        }
        if let Some(i) = (0..n).find(|&i| g.member_data_blocks(i) != self.slots[i].data_size_blocks) {
            return geo(format!(
                "slot {i} data size {} blocks, the layout uses {}",
                self.slots[i].data_size_blocks,
                g.member_data_blocks(i)
            ));
        }
        Ok(())
    }
}

fn sb_crc(sb: &[u8]) -> u32 {
    let head = crc32c::crc32c(&sb[..CRC_OFFSET]);
    let with_zero = crc32c::crc32c_append(head, &[0u8; 4]);
    crc32c::crc32c_append(with_zero, &sb[CRC_OFFSET + 4..SB_SIZE_BYTES])
}

/// Offset of the first non-zero byte of `bytes`, reported relative to `base`.
fn nonzero_at(bytes: &[u8], base: usize) -> Result<(), SuperblockError> {
    match bytes.iter().position(|&b| b != 0) {
        Some(i) => Err(SuperblockError::UnknownBits(base + i)),
        None => Ok(()),
    }
}

fn decode_slot(i: usize, e: &SlotEntry) -> Result<SlotInfo, SuperblockError> {
    let base = SLOTS_OFFSET + i * std::mem::size_of::<SlotEntry>();
    nonzero_at(&e.reserved, base + std::mem::offset_of!(SlotEntry, reserved))?;
    let recovery_offset_blocks = e.recovery_offset_blocks.get();
    let state = match e.state {
        1 => SlotState::Active,
        2 => SlotState::Failed,
        3 => SlotState::Spare,
        4 => SlotState::Rebuilding { recovery_offset_blocks },
        0 => return Err(SuperblockError::BadSlotTable(format!("slot {i} is below the member count but unused"))),
        c => return Err(SuperblockError::BadSlotTable(format!("slot {i} has unknown state {c}"))),
    };
    if !matches!(state, SlotState::Rebuilding { .. }) && recovery_offset_blocks != 0 {
        return Err(SuperblockError::BadSlotTable(format!(
            "slot {i} is {} but has recovery offset {recovery_offset_blocks}",
            state.name()
        )));
    }
    Ok(SlotInfo {
        member_uuid: Uuid::from_bytes(e.member_uuid),
        state,
        data_offset_blocks: e.data_offset_blocks.get(),
        data_size_blocks: e.data_size_blocks.get(),
    })
}

/// Decodes and validates a superblock (bytes past 4096, block padding, are
/// ignored). Checks run in order: length, magic, version, checksum, then
/// every field; the first failure is returned.
pub fn decode(bytes: &[u8]) -> Result<SuperblockInfo, SuperblockError> {
    let raw = bytes.get(..SB_SIZE_BYTES).ok_or(SuperblockError::Short(bytes.len()))?;
    let sb = Superblock::ref_from_bytes(raw).map_err(|_| SuperblockError::Short(bytes.len()))?;
    if sb.magic != SB_MAGIC {
        return Err(SuperblockError::BadMagic);
    }
    if sb.version.get() != SB_VERSION {
        return Err(SuperblockError::UnsupportedVersion(sb.version.get()));
    }
    let computed = sb_crc(raw);
    if computed != sb.crc32c.get() {
        return Err(SuperblockError::BadChecksum { stored: sb.crc32c.get(), computed });
    }
    nonzero_at(&sb.reserved0, std::mem::offset_of!(Superblock, reserved0))?;
    nonzero_at(&sb.reserved1, std::mem::offset_of!(Superblock, reserved1))?;
    nonzero_at(&sb.reserved2, std::mem::offset_of!(Superblock, reserved2))?;
    let flags = sb.flags.get();
    if flags & !KNOWN_FLAGS != 0 {
        return Err(SuperblockError::UnknownBits(std::mem::offset_of!(Superblock, flags)));
    }
    let ppl = if flags & FLAG_PPL != 0 {
        Some(PplLocation { offset_blocks: sb.ppl_offset_blocks.get(), length_blocks: sb.ppl_length_blocks.get() })
    } else {
        // Reserved bytes before the log existed: zero, as every reserved byte.
        nonzero_at(sb.ppl_offset_blocks.as_bytes(), std::mem::offset_of!(Superblock, ppl_offset_blocks))?;
        nonzero_at(sb.ppl_length_blocks.as_bytes(), std::mem::offset_of!(Superblock, ppl_length_blocks))?;
        None
    };
    let level = crate::level::from_superblock_code(sb.level).ok_or(SuperblockError::UnknownLevel(sb.level))?;
    let name_len = sb
        .name
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| SuperblockError::BadName(format!("no NUL terminator in {SB_NAME_BYTES} bytes")))?;
    if sb.name[name_len..].iter().any(|&b| b != 0) {
        return Err(SuperblockError::BadName("bytes after the terminator are not zero".into()));
    }
    let name = std::str::from_utf8(&sb.name[..name_len])
        .map_err(|e| SuperblockError::BadName(format!("not UTF-8: {e}")))?
        .to_owned();
    let n = usize::from(sb.num_members);
    if n == 0 || n > SB_MAX_SLOTS {
        return Err(SuperblockError::ImpossibleGeometry(format!("{n} members (1..={SB_MAX_SLOTS} supported)")));
    }
    let (used, unused) = sb.slots.split_at(n);
    if let Some(i) = unused.iter().position(|e| e.as_bytes().iter().any(|&b| b != 0)) {
        return Err(SuperblockError::BadSlotTable(format!(
            "slot {} lies past the member count {n} but is not empty",
            n + i
        )));
    }
    let slots = used.iter().enumerate().map(|(i, e)| decode_slot(i, e)).collect::<Result<Vec<_>, _>>()?;
    let (bm_offset, bm_length, bm_chunk) =
        (sb.bitmap_offset_blocks.get(), sb.bitmap_length_blocks.get(), sb.bitmap_chunk_size_blocks.get());
    let bitmap = if (bm_offset, bm_length, bm_chunk) == (0, 0, 0) {
        None
    } else {
        Some(BitmapLocation { offset_blocks: bm_offset, length_blocks: bm_length, chunk_size_blocks: bm_chunk })
    };
    let info = SuperblockInfo {
        array_uuid: Uuid::from_bytes(sb.array_uuid),
        name,
        level,
        strip_size_blocks: sb.strip_size_blocks.get(),
        block_size: sb.block_size.get(),
        array_blocks: sb.array_blocks.get(),
        events: sb.events.get(),
        clean: flags & FLAG_CLEAN != 0,
        redundancy_verified: flags & FLAG_REDUNDANCY_VERIFIED != 0,
        bitmap,
        ppl,
        this_slot: usize::from(sb.this_slot),
        member_uuid: Uuid::from_bytes(sb.member_uuid),
        slots,
    };
    info.validate()?;
    Ok(info)
}

/// Encodes `info`, or says why it cannot be a superblock.
pub fn try_encode(info: &SuperblockInfo) -> Result<[u8; SB_SIZE_BYTES], SuperblockError> {
    info.validate()?;
    let mut sb = Superblock::new_zeroed();
    sb.magic = SB_MAGIC;
    sb.version = U32::new(SB_VERSION);
    sb.array_uuid = info.array_uuid.into_bytes();
    sb.name[..info.name.len()].copy_from_slice(info.name.as_bytes());
    sb.events = U64::new(info.events);
    sb.array_blocks = U64::new(info.array_blocks);
    sb.strip_size_blocks = U64::new(info.strip_size_blocks);
    sb.block_size = U32::new(info.block_size);
    let verified = if info.redundancy_verified { FLAG_REDUNDANCY_VERIFIED } else { 0 };
    let ppl = if info.ppl.is_some() { FLAG_PPL } else { 0 };
    sb.flags = U32::new(if info.clean { FLAG_CLEAN } else { 0 } | verified | ppl);
    sb.level = info.level.superblock_code();
    // validate() bounds both by SB_MAX_SLOTS, which fits a u8.
    sb.num_members = info.slots.len() as u8;
    sb.this_slot = info.this_slot as u8;
    sb.member_uuid = info.member_uuid.into_bytes();
    if let Some(b) = info.bitmap {
        sb.bitmap_offset_blocks = U64::new(b.offset_blocks);
        sb.bitmap_length_blocks = U64::new(b.length_blocks);
        sb.bitmap_chunk_size_blocks = U64::new(b.chunk_size_blocks);
    }
    if let Some(l) = info.ppl {
        sb.ppl_offset_blocks = U64::new(l.offset_blocks);
        sb.ppl_length_blocks = U64::new(l.length_blocks);
    }
    for (e, s) in sb.slots.iter_mut().zip(&info.slots) {
        e.member_uuid = s.member_uuid.into_bytes();
        e.data_offset_blocks = U64::new(s.data_offset_blocks);
        e.data_size_blocks = U64::new(s.data_size_blocks);
        e.state = s.state.code();
        if let SlotState::Rebuilding { recovery_offset_blocks } = s.state {
            e.recovery_offset_blocks = U64::new(recovery_offset_blocks);
        }
    }
    let mut out = [0u8; SB_SIZE_BYTES];
    out.copy_from_slice(sb.as_bytes());
    let crc = sb_crc(&out);
    out[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Encodes `info` for writing to block 0 of its member. Panics if `info`
/// fails [`SuperblockInfo::validate`] (a RAID-code bug; use [`try_encode`]
/// where the info comes from outside) or if the result does not decode to
/// `info`: these assertions stay on in release builds, because a bad
/// superblock written to every member would lose the array.
pub fn encode(info: &SuperblockInfo) -> [u8; SB_SIZE_BYTES] {
    let out = match try_encode(info) {
        Ok(out) => out,
        Err(e) => panic!("refusing to encode an invalid superblock: {e}"),
    };
    match decode(&out) {
        Ok(back) => assert!(back == *info, "encoded superblock decodes to different content"),
        Err(e) => panic!("encoded superblock does not decode: {e}"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::level::named;
    use proptest::prelude::*;

    fn uuid(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    /// A valid two-way raid1 with a bitmap, 512-byte blocks.
    fn sample() -> SuperblockInfo {
        let layout = MetadataLayout::new(512, 16, 1 << 17).unwrap();
        let mut info = SuperblockInfo::new_array(
            "mirror0",
            uuid(0xa0),
            named("raid1"),
            0,
            512,
            &layout,
            &[(uuid(1), 1 << 22), (uuid(2), 1 << 22)],
        )
        .unwrap();
        info.events = 77;
        info.clean = false;
        info
    }

    /// A named edit of a valid superblock's fields.
    type Tamper = (&'static str, fn(&mut Superblock));

    /// Re-seals tampered bytes with a valid CRC, so the later checks are reached.
    fn reseal(b: &mut [u8]) {
        let crc = sb_crc(b);
        b[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    }

    fn tampered(edit: impl FnOnce(&mut Superblock)) -> Result<SuperblockInfo, SuperblockError> {
        let mut b = encode(&sample());
        let sb = Superblock::mut_from_bytes(&mut b[..]).unwrap();
        edit(sb);
        reseal(&mut b);
        decode(&b)
    }

    fn level_strategy() -> impl Strategy<Value = Level> {
        proptest::sample::select(crate::level::LEVELS.to_vec())
    }

    fn state_strategy() -> impl Strategy<Value = u8> {
        0u8..4
    }

    prop_compose! {
        fn valid_info()(
            level in level_strategy(),
            n_pick in 1usize..=SB_MAX_SLOTS,
            block_shift in 0u32..4,
            strip_shift in 0u32..10,
            bitmap_blocks in 0u64..64,
            chunk_shift in 0u32..20,
            ppl_blocks in 0u64..3000,
            sizes in prop::collection::vec(1u64 << 12..1u64 << 40, SB_MAX_SLOTS),
            states in prop::collection::vec((state_strategy(), any::<u64>()), SB_MAX_SLOTS),
            name in "[a-zA-Z0-9_\\-é☃]{1,20}",
            events: u64,
            clean: bool,
            verified: bool,
            array: u128,
            this_pick: usize,
        ) -> SuperblockInfo {
            let n = n_pick.max(level.min_members());
            let block_size = 512u32 << block_shift;
            let mut layout = MetadataLayout::new(block_size, bitmap_blocks, 1 << chunk_shift).unwrap();
            if ppl_blocks > 0 {
                layout = layout.with_ppl(block_size, ppl_blocks).unwrap();
            }
            let members: Vec<(Uuid, u64)> = (0..n)
                .map(|i| (Uuid::from_u128((i as u128 + 1) << 64 | (array & u128::from(u64::MAX))), layout.data_offset_blocks + sizes[i]))
                .collect();
            let mut info = SuperblockInfo::new_array(
                &name, Uuid::from_u128(array | 1 << 127), level, 1 << strip_shift, block_size, &layout, &members,
            ).unwrap();
            for (s, &(code, r)) in info.slots.iter_mut().zip(&states) {
                s.state = match code {
                    0 => SlotState::Active,
                    1 => SlotState::Failed,
                    2 => SlotState::Spare,
                    _ => SlotState::Rebuilding { recovery_offset_blocks: r % (s.data_size_blocks + 1) },
                };
            }
            let this = this_pick % n;
            info.events = events;
            info.clean = clean;
            info.redundancy_verified = verified;
            info = info.for_slot(this).unwrap();
            // A failed slot may have lost its member, but not this copy's own.
            if this != 0 && info.slots[0].state == SlotState::Failed {
                info.slots[0].member_uuid = Uuid::nil();
            }
            info
        }
    }

    proptest! {
        #[test]
        fn round_trip(info in valid_info()) {
            let bytes = encode(&info);
            prop_assert_eq!(decode(&bytes), Ok(info.clone()));
            // Block padding past the superblock is ignored.
            let mut padded = bytes.to_vec();
            padded.resize(8192, 0xee);
            prop_assert_eq!(decode(&padded), Ok(info));
        }

        #[test]
        fn any_single_bit_flip_is_rejected(bit in 0usize..SB_SIZE_BYTES * 8) {
            let mut b = encode(&sample());
            b[bit / 8] ^= 1 << (bit % 8);
            // CRC32C detects every single-bit error; flips in the magic or
            // version are caught before the checksum is even computed.
            prop_assert!(decode(&b).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..5000)) {
            let _ = decode(&bytes);
        }

        /// Corruptions behind a valid CRC, at any byte, either fail or give a
        /// superblock that re-encodes to exactly those bytes.
        #[test]
        fn resealed_corruption_is_rejected_or_canonical(at in 16usize..SB_SIZE_BYTES, xor in 1u8..=255) {
            let mut b = encode(&sample());
            b[at] ^= xor;
            reseal(&mut b);
            if let Ok(info) = decode(&b) {
                prop_assert_eq!(&encode(&info)[..], &b[..]);
            }
        }
    }

    #[test]
    fn every_corruption_class_is_rejected() {
        let good = encode(&sample());
        assert_eq!(decode(&good), Ok(sample()));

        assert_eq!(decode(&good[..4095]), Err(SuperblockError::Short(4095)));
        assert_eq!(decode(&[]), Err(SuperblockError::Short(0)));
        assert_eq!(decode(&[0u8; 4096]), Err(SuperblockError::BadMagic));
        let mut b = good;
        b[3] ^= 0x20;
        assert_eq!(decode(&b), Err(SuperblockError::BadMagic));
        assert_eq!(tampered(|s| s.version = U32::new(2)), Err(SuperblockError::UnsupportedVersion(2)));
        let mut b = good;
        b[3000] ^= 1;
        assert!(matches!(decode(&b), Err(SuperblockError::BadChecksum { .. })));
        let mut b = good;
        b[CRC_OFFSET] ^= 1;
        assert!(matches!(decode(&b), Err(SuperblockError::BadChecksum { .. })));

        assert_eq!(tampered(|s| s.level = 5), Err(SuperblockError::UnknownLevel(5)));
        assert!(matches!(tampered(|s| s.name = [b'a'; 64]), Err(SuperblockError::BadName(_))));
        assert!(matches!(tampered(|s| s.name[0] = 0xff), Err(SuperblockError::BadName(_))));
        assert!(matches!(tampered(|s| s.name = [0; 64]), Err(SuperblockError::BadName(_))));
        assert!(matches!(tampered(|s| s.name[40] = b'x'), Err(SuperblockError::BadName(_))));
        assert!(matches!(tampered(|s| s.reserved1[7] = 1), Err(SuperblockError::UnknownBits(_))));
        assert!(matches!(tampered(|s| s.reserved2[0] = 1), Err(SuperblockError::UnknownBits(_))));
        assert!(matches!(tampered(|s| s.slots[1].reserved[3] = 1), Err(SuperblockError::UnknownBits(_))));
        assert!(matches!(tampered(|s| s.flags = U32::new(10)), Err(SuperblockError::UnknownBits(124))));

        let impossible: [Tamper; 13] = [
            ("no members", |s| s.num_members = 0),
            ("too many members", |s| s.num_members = 33),
            ("raid1 of one", |s| {
                s.num_members = 1;
                s.slots[1] = SlotEntry::new_zeroed();
            }),
            ("slot >= member count", |s| s.this_slot = 2),
            ("raid1 with a strip", |s| s.strip_size_blocks = U64::new(8)),
            ("raid0 strip not a power of two", |s| {
                s.level = 0;
                s.strip_size_blocks = U64::new(24);
            }),
            ("raid10 strip zero", |s| s.level = 10),
            ("block size", |s| s.block_size = U32::new(1000)),
            ("data before bitmap end", |s| s.slots[0].data_offset_blocks = U64::new(20)),
            ("bitmap over the superblock", |s| s.bitmap_offset_blocks = U64::new(4)),
            ("bitmap chunk", |s| s.bitmap_chunk_size_blocks = U64::new(3)),
            ("array size", |s| s.array_blocks = U64::new(s.array_blocks.get() + 1)),
            ("uneven mirror", |s| s.slots[1].data_size_blocks = U64::new(s.slots[1].data_size_blocks.get() - 1)),
        ];
        for (what, edit) in impossible {
            let r = tampered(edit);
            assert!(matches!(r, Err(SuperblockError::ImpossibleGeometry(_))), "{what}: {r:?}");
        }

        let bad_tables: [Tamper; 7] = [
            ("entry past the count in use", |s| s.slots[2].state = 1),
            ("unused entry below the count", |s| s.slots[1] = SlotEntry::new_zeroed()),
            ("unknown state", |s| s.slots[1].state = 9),
            ("recovery offset on an active slot", |s| s.slots[1].recovery_offset_blocks = U64::new(1)),
            ("active slot without a member", |s| s.slots[1].member_uuid = [0; 16]),
            ("one member in two slots", |s| s.slots[1].member_uuid = s.slots[0].member_uuid),
            ("this member not in its slot", |s| s.member_uuid = [9; 16]),
        ];
        for (what, edit) in bad_tables {
            let r = tampered(edit);
            assert!(matches!(r, Err(SuperblockError::BadSlotTable(_))), "{what}: {r:?}");
        }
        let r = tampered(|s| {
            s.slots[1].state = 4;
            s.slots[1].recovery_offset_blocks = U64::new(s.slots[1].data_size_blocks.get() + 1);
        });
        assert!(matches!(r, Err(SuperblockError::BadSlotTable(_))), "{r:?}");
        // A failed slot may have lost its member; rebuilding may sit anywhere in range.
        tampered(|s| {
            s.slots[1].state = 2;
            s.slots[1].member_uuid = [0; 16];
        })
        .unwrap();
        let ok = tampered(|s| {
            s.slots[1].state = 4;
            s.slots[1].recovery_offset_blocks = U64::new(100);
        })
        .unwrap();
        assert_eq!(ok.slots[1].state, SlotState::Rebuilding { recovery_offset_blocks: 100 });
    }

    /// Sizes whose array size would overflow are refused, not wrapped or panicked on.
    #[test]
    fn huge_member_sizes_are_refused() {
        for level in [0u8, 10, 99] {
            let r = tampered(|s| {
                s.level = level;
                s.strip_size_blocks = U64::new(8);
                for e in &mut s.slots[..2] {
                    e.data_offset_blocks = U64::new(2048);
                    e.data_size_blocks = U64::new(u64::MAX - 4096);
                }
            });
            assert!(matches!(r, Err(SuperblockError::ImpossibleGeometry(_))), "level {level}: {r:?}");
        }
        let layout = MetadataLayout::new(512, 0, 0).unwrap();
        let members = [(uuid(1), u64::MAX), (uuid(2), u64::MAX)];
        let r = SuperblockInfo::new_array("big", uuid(9), named("raid0"), 8, 512, &layout, &members);
        assert!(matches!(r, Err(SuperblockError::ImpossibleGeometry(_))), "{r:?}");
    }

    #[test]
    fn errors_read_well() {
        let e = decode(&[0u8; 100]).unwrap_err();
        assert_eq!(e.to_string(), "superblock buffer is 100 bytes, need 4096");
        let e = tampered(|s| s.num_members = 0).unwrap_err();
        assert_eq!(e.to_string(), "impossible superblock geometry: 0 members (1..=32 supported)");
    }

    #[test]
    fn layout_aligns_data() {
        let l = MetadataLayout::new(512, 0, 0).unwrap();
        assert_eq!((l.superblock_blocks, l.bitmap, l.data_offset_blocks), (8, None, 2048));
        let l = MetadataLayout::new(4096, 300, 1 << 14).unwrap();
        assert_eq!(l.superblock_blocks, 1);
        assert_eq!(l.bitmap, Some(BitmapLocation { offset_blocks: 1, length_blocks: 300, chunk_size_blocks: 1 << 14 }));
        assert_eq!(l.data_offset_blocks, 512);
        assert!(MetadataLayout::new(4096, 300, 3).is_err());
        assert!(MetadataLayout::new(4096, u64::MAX, 1).is_err());
        assert!(MetadataLayout::new(1000, 0, 0).is_err());
    }

    /// The partial parity log's location round-trips behind its flag; a
    /// superblock without the flag (every one written before the log
    /// existed) reads as an array without a log, and log fields set without
    /// the flag, or a flag this build does not know, are refused.
    #[test]
    fn ppl_location_round_trips_and_old_superblocks_read_without_one() {
        let layout = MetadataLayout::new(4096, 16, 64).unwrap();
        assert_eq!(layout.ppl, None);
        let with = layout.with_ppl(4096, 544).unwrap();
        assert_eq!(with.ppl, Some(PplLocation { offset_blocks: 17, length_blocks: 544 }));
        assert_eq!(with.data_offset_blocks, 768, "data past the log, on the next 1 MiB boundary");
        assert!(layout.with_ppl(4096, 0).is_err());
        assert!(layout.with_ppl(4096, u64::MAX).is_err());
        let members = [(uuid(1), 1 << 16), (uuid(2), 1 << 16), (uuid(3), 1 << 16)];
        let info = SuperblockInfo::new_array("r5", uuid(9), named("raid5"), 16, 4096, &with, &members).unwrap();
        assert_eq!(info.ppl, with.ppl);
        let bytes = encode(&info);
        let sb = Superblock::ref_from_bytes(&bytes[..]).unwrap();
        assert_eq!(sb.flags.get() & FLAG_PPL, FLAG_PPL);
        assert_eq!((sb.ppl_offset_blocks.get(), sb.ppl_length_blocks.get()), (17, 544));
        assert_eq!(decode(&bytes), Ok(info.clone()));
        // An old superblock: no flag, zero fields (then reserved bytes).
        let old = sample();
        let b = encode(&old);
        assert_eq!(Superblock::ref_from_bytes(&b[..]).unwrap().flags.get() & FLAG_PPL, 0);
        assert_eq!(decode(&b).unwrap().ppl, None);
        assert!(matches!(
            tampered(|s| s.ppl_length_blocks = U64::new(8)),
            Err(SuperblockError::UnknownBits(o)) if o == std::mem::offset_of!(Superblock, ppl_length_blocks)
        ));
        assert!(matches!(tampered(|s| s.flags = U32::new(8)), Err(SuperblockError::UnknownBits(124))));
        // The flag with a log over the bitmap, or of no length, is impossible.
        let mut b = bytes;
        let sb = Superblock::mut_from_bytes(&mut b[..]).unwrap();
        sb.ppl_offset_blocks = U64::new(3);
        reseal(&mut b);
        assert!(matches!(decode(&b), Err(SuperblockError::ImpossibleGeometry(_))));
        let sb = Superblock::mut_from_bytes(&mut b[..]).unwrap();
        sb.ppl_offset_blocks = U64::new(17);
        sb.ppl_length_blocks = U64::new(0);
        reseal(&mut b);
        assert!(matches!(decode(&b), Err(SuperblockError::ImpossibleGeometry(_))));
    }

    #[test]
    fn new_array_follows_the_layout() {
        let layout = MetadataLayout::new(4096, 0, 0).unwrap();
        let members = [(uuid(1), 256 + 1000), (uuid(2), 256 + 2000), (uuid(3), 256 + 515)];
        let c = SuperblockInfo::new_array("cat", uuid(9), named("concat"), 8, 4096, &layout, &members).unwrap();
        let sizes: Vec<u64> = c.slots.iter().map(|s| s.data_size_blocks).collect();
        assert_eq!(sizes, vec![1000, 2000, 512]);
        assert_eq!(c.array_blocks, 3512);
        assert_eq!(c.for_slot(2).unwrap().member_uuid, uuid(3));
        assert_eq!(c.slot_of(uuid(2)), Some(1));
        assert!(c.for_slot(3).is_none());
        let small = [(uuid(1), 256), (uuid(2), 4096)];
        assert!(SuperblockInfo::new_array("x", uuid(9), named("raid1"), 0, 4096, &layout, &small).is_err());
        let dup = [(uuid(1), 4096), (uuid(1), 4096)];
        assert!(matches!(
            SuperblockInfo::new_array("x", uuid(9), named("raid1"), 0, 4096, &layout, &dup),
            Err(SuperblockError::BadSlotTable(_))
        ));
        assert!(try_encode(&SuperblockInfo { name: String::new(), ..c.clone() }).is_err());
    }

    #[test]
    #[should_panic(expected = "refusing to encode")]
    fn encode_refuses_invalid_info() {
        let _ = encode(&SuperblockInfo { this_slot: 5, ..sample() });
    }
}
