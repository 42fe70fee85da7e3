//! raid5's partial parity log (PPL, after md's `raid5-ppl`): what closes
//! the write hole of arrays with a superblock. The on-disk entry, the
//! per-member table of entry slots the write path takes and gives back,
//! and the replay at assembly.
//!
//! Before a partial-stripe write's data and parity reach the members, an
//! entry goes to the log area of the stripe's *parity member*, with FUA: a
//! header (array UUID, sequence number, stripe, per row range the rows of
//! each data chunk the write modifies, CRC32C over header and payload) and
//! the *partial parity* of each row range: the XOR of what the write does
//! not modify (computed as the new parity XOR the new data of the modified
//! rows, so it costs no extra read). After a crash, whatever subset of the
//! write's data and parity landed, `parity = partial parity ^ the current
//! contents of the modified rows` is the parity of what the stripe now
//! holds, so a lost member's *unmodified* chunk is reconstructed right.
//!
//! Slots: the log area of each member is `PPL_SLOTS` slots of one header
//! block group plus one chunk of partial parity. A write takes a free slot
//! on its parity member (lock-free: one atomic word per slot, `BUSY` and
//! the stripe the slot's entry on disk is for) and frees it when its member
//! writes are back; the entry stays on disk. The one rule that keeps old
//! entries harmless is: *at most one entry on disk per stripe, and it is the
//! newest partial write's*. A partial write takes the slot whose entry is
//! for its own stripe when there is one (overwriting it), else any free
//! slot (a stale entry of another stripe is never needed again: its write
//! completed). A replayed entry whose write completed and was not followed
//! by another write to its stripe gives the parity the stripe already has.
//! A full-stripe write leaves no entry (every data row of the stripe is its
//! own, so a torn one garbles only its own unacknowledged data), but it
//! would make an older entry of its stripe wrong: when the table says one
//! is on disk, the write first overwrites that slot's header with zeros.
//! The table lives in memory: at assembly, after the replay, every slot's
//! header is wiped, so the table (empty) and the disk agree again; a new
//! array wipes them at create. Writes to the stripe are serialized by the
//! range table (whole stripes), so two writes never race for a stripe's slot.
//!
//! Replay (assembly of an unclean array, before resync, rebuild or any IO):
//! each in-sync member's slots are read; an entry is used when its CRC,
//! magic and array UUID hold, its stripe's parity member is the member it
//! was read from, and its stripe lies in a dirty bitmap chunk (a write
//! dirties its chunk before it reaches a member, and the bit outlives it).
//! Its parity rows are rewritten (FUA) from the partial parity and the
//! modified rows as the members hold them now. What the log cannot save:
//! a row range whose *modified* chunk lives on a missing member (that
//! write was not acknowledged; its rows reconstruct to neither old nor new
//! data, and the entry's other rows still replay); and nothing is needed
//! when the *parity member* is the lost one (it held the log, but the
//! stripe then has every data chunk and no parity to be wrong).
//!
//! Cost: one extra member write (header + partial parity rows, FUA) per
//! partial-stripe write, before its data and parity, so one more write
//! latency; full-stripe writes pay nothing unless they follow a partial
//! write of the same stripe (one header write). A write that finds every
//! slot of its parity member busy waits until one is free (a per-reactor
//! queue, `stripe.rs`'s `LogWait`) and is counted (`PplLog::slots_exhausted`).
//!
//! A member coming back to a running array has its log wiped before it
//! takes writes (`examine::rejoin`); so has every member an assembly
//! claims, in sync or not.
//!
//! Volatile write caches: a write's data and parity writes complete into
//! the members' caches (only the entry is FUA), so once its slot is freed
//! its stripe is safe only while its entry stays on disk, or after the
//! members flushed. A slot freed with an entry left on it therefore needs
//! a flush of the cached members before another entry overwrites it
//! (md's raid5-ppl flushes the members with a write-back cache that a
//! finished log unit's stripes wrote before that log space is reused). A
//! slot records the flush round count when it was freed (`released_at`);
//! it may be overwritten once a round that started after that completed.
//! `acquire` passes over slots that need a flush and, when it finds no
//! other, asks for a round (`flush_before_reuse`): one flush per cached
//! member (`has_write_cache`, as each bdev reports it) that covers every
//! slot freed before it, sent from the reactor of a waiting write, one
//! round at a time; the write waits like one that found every slot busy.
//! Without cached members a round completes at once, with no IO. Cost on
//! cached members: a write into a stripe whose entry is still on disk (a
//! small write next to the last one, say) waits for a flush unless a
//! round ran since; rounds are shared by all writes waiting.
//!
//! Not covered: a member added with `bdev_raid_add_base_bdev` is not
//! wiped (a former member of this array re-added that way keeps its old
//! entries until the next assembly wipes them); raid6 has no log (md has
//! none either).

use crate::channel::{find_channel, ArrayChannel, MemberChannel};
use crate::map::{Geometry, MAX_MEMBERS};
use crate::meta;
use crate::superblock::PplLocation;
use bdev::{BdevHandle, DmaBuf, IoFlags, IoType};
use bdev::{IoBox, IoDone};
use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// "NVRAIDPL": identifies a log entry header.
pub const PPL_MAGIC: [u8; 8] = *b"NVRAIDPL";
pub const PPL_VERSION: u32 = 1;
/// Bytes of an entry header (padded to whole blocks on the member).
pub const PPL_HEADER_BYTES: usize = 4096;
/// Entry slots per member: partial-stripe writes in flight at once whose
/// parity is on one member.
pub const PPL_SLOTS: u64 = 16;
/// Row ranges per entry: a write touches one or two in a stripe.
pub const PPL_MAX_PIECES: usize = 2;
/// Offset of the CRC field.
const CRC_OFFSET: usize = 12;

/// One row range of an entry.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PplPieceHeader {
    /// Rows `[lo, hi)` of the stripe's chunks; partial parity of `hi - lo` rows.
    pub lo: U32,
    pub hi: U32,
    /// Per data chunk: the rows `[start, end)` the write modifies (equal: none).
    pub modified: [[U32; 2]; MAX_MEMBERS],
}

/// An entry header as it lies on disk; the partial parity of each piece
/// follows it, in piece order, from the next block.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PplHeader {
    pub magic: [u8; 8],
    pub version: U32,
    /// CRC32C of the header (this field zero) and the partial parity.
    pub crc32c: U32,
    pub array_uuid: [u8; 16],
    pub seq: U64,
    pub stripe: U64,
    pub pieces: u8,
    pub reserved0: [u8; 7],
    pub piece: [PplPieceHeader; PPL_MAX_PIECES],
    pub reserved1: [u8; 3512],
}

const _: () = assert!(std::mem::size_of::<PplHeader>() == PPL_HEADER_BYTES);
const _: () = assert!(std::mem::offset_of!(PplHeader, crc32c) == CRC_OFFSET);

/// Blocks an entry header takes.
pub fn header_blocks(block_size: u32) -> u64 {
    (PPL_HEADER_BYTES as u64).div_ceil(u64::from(block_size.max(1)))
}

/// Blocks of one slot: a header and a chunk of partial parity.
pub fn slot_blocks(block_size: u32, chunk_blocks: u64) -> u64 {
    header_blocks(block_size) + chunk_blocks
}

/// Blocks of a member's log area for an array with chunks of `chunk_blocks`.
pub fn area_blocks(block_size: u32, chunk_blocks: u64) -> u64 {
    PPL_SLOTS * slot_blocks(block_size, chunk_blocks)
}

/// One row range of an entry, typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PplPiece {
    pub lo: u64,
    pub hi: u64,
    /// Per data chunk (first `data` used): rows modified, `start == end` none.
    pub modified: [(u64, u64); MAX_MEMBERS],
}

/// A decoded entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PplEntry {
    pub seq: u64,
    pub stripe: u64,
    pub pieces: Vec<PplPiece>,
}

fn entry_crc(header: &[u8], payload: &[u8]) -> u32 {
    let head = crc32c::crc32c(&header[..CRC_OFFSET]);
    let with_zero = crc32c::crc32c_append(head, &[0u8; 4]);
    let h = crc32c::crc32c_append(with_zero, &header[CRC_OFFSET + 4..PPL_HEADER_BYTES]);
    crc32c::crc32c_append(h, payload)
}

/// Writes the header of an entry into `slot` (header blocks, then the
/// partial parity already in place after them) and seals it with its CRC.
/// `slot` holds at least the header and the pieces' rows. No allocation.
pub fn seal_entry(slot: &mut [u8], bs: u64, uuid: &[u8; 16], seq: u64, stripe: u64, pieces: &[PplPiece]) {
    let rows: u64 = pieces.iter().map(|p| p.hi - p.lo).sum();
    let hb = (PPL_HEADER_BYTES as u64).div_ceil(bs) * bs;
    let (head, rest) = slot.split_at_mut(hb as usize);
    let h = match PplHeader::mut_from_bytes(&mut head[..PPL_HEADER_BYTES]) {
        Ok(h) => h,
        Err(_) => return,
    };
    h.zero();
    h.magic = PPL_MAGIC;
    h.version = U32::new(PPL_VERSION);
    h.array_uuid = *uuid;
    h.seq = U64::new(seq);
    h.stripe = U64::new(stripe);
    h.pieces = pieces.len().min(PPL_MAX_PIECES) as u8;
    for (ph, p) in h.piece.iter_mut().zip(pieces) {
        ph.lo = U32::new(p.lo as u32);
        ph.hi = U32::new(p.hi as u32);
        for (m, &(a, b)) in ph.modified.iter_mut().zip(&p.modified) {
            *m = [U32::new(a as u32), U32::new(b as u32)];
        }
    }
    let crc = entry_crc(head, &rest[..(rows * bs) as usize]);
    head[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The entry in `slot` (a whole slot as read), or None: no entry, torn,
/// corrupt, another array's, or not possible for this geometry (`data`
/// chunks per stripe of `chunk` rows). Never panics on any input.
pub fn decode_entry(slot: &[u8], bs: u64, uuid: &[u8; 16], data: usize, chunk: u64) -> Option<PplEntry> {
    let hb = (PPL_HEADER_BYTES as u64).div_ceil(bs) * bs;
    let head = slot.get(..hb as usize)?;
    let h = PplHeader::ref_from_bytes(head.get(..PPL_HEADER_BYTES)?).ok()?;
    if h.magic != PPL_MAGIC || h.version.get() != PPL_VERSION || &h.array_uuid != uuid {
        return None;
    }
    let n = usize::from(h.pieces);
    if n == 0 || n > PPL_MAX_PIECES || data > MAX_MEMBERS {
        return None;
    }
    let mut pieces = Vec::with_capacity(n);
    let mut rows = 0u64;
    for ph in &h.piece[..n] {
        let (lo, hi) = (u64::from(ph.lo.get()), u64::from(ph.hi.get()));
        if lo >= hi || hi > chunk {
            return None;
        }
        let mut modified = [(0u64, 0u64); MAX_MEMBERS];
        for (k, m) in ph.modified.iter().enumerate() {
            let (a, b) = (u64::from(m[0].get()), u64::from(m[1].get()));
            if a > b || (a < b && (a < lo || b > hi)) || (k >= data && a != b) {
                return None;
            }
            modified[k] = (a, b);
        }
        rows += hi - lo;
        pieces.push(PplPiece { lo, hi, modified });
    }
    let payload = slot.get(hb as usize..(hb + rows * bs) as usize)?;
    if entry_crc(head, payload) != h.crc32c.get() {
        return None;
    }
    Some(PplEntry { seq: h.seq.get(), stripe: h.stripe.get(), pieces })
}

/// The array blocks of `stripe` (of `data` chunks of `chunk` rows): None
/// when it does not lie whole within `array_blocks` (a decoded entry's
/// stripe is whatever the disk said).
pub fn stripe_span(stripe: u64, data: usize, chunk: u64, array_blocks: u64) -> Option<Range<u64>> {
    let sb = (data as u64).checked_mul(chunk)?;
    let start = stripe.checked_mul(sb)?;
    let end = start.checked_add(sb)?;
    (sb > 0 && end <= array_blocks).then_some(start..end)
}

/// Slot word: the slot's write is in flight.
const BUSY: u64 = 1 << 63;

/// The running array's log: where it lies and which slot holds what.
pub(crate) struct PplLog {
    pub offset_blocks: u64,
    pub header_blocks: u64,
    pub slot_blocks: u64,
    pub slots: u64,
    pub array_uuid: [u8; 16],
    /// Per member, per slot: `BUSY` | the stripe + 1 whose entry is on disk (0: none).
    table: Box<[AtomicU64]>,
    /// Per member, per slot: `flush_rounds_started` when the slot was
    /// freed with an entry left on it; overwriting that entry waits for a
    /// round numbered higher (see the module comment).
    released_at: Box<[AtomicU64]>,
    seq: AtomicU64,
    /// Flush rounds begun; the number of the one running, if any.
    flush_rounds_started: AtomicU64,
    /// The number of the last flush round completed (rounds run one at a time).
    flush_rounds_done: AtomicU64,
    /// A round is running.
    flushing: AtomicBool,
    /// Member flushes of the running round not yet back.
    flush_left: AtomicU32,
    /// A write found only slots needing a flush (`flush_before_reuse` runs a round).
    reuse_blocked: AtomicBool,
    /// A member flush of the running round could not be sent.
    round_short: AtomicBool,
    /// Writes that found every slot of their parity member busy.
    pub slots_exhausted: AtomicU64,
}

impl PplLog {
    /// The log of an array whose superblock records `loc` (None when `loc`
    /// cannot hold a slot).
    pub(crate) fn new(loc: PplLocation, bs: u32, chunk_blocks: u64, members: usize, uuid: [u8; 16]) -> Option<PplLog> {
        let slot_blocks = slot_blocks(bs, chunk_blocks);
        let slots = (loc.length_blocks / slot_blocks).min(64);
        if slots == 0 || members == 0 || members > MAX_MEMBERS {
            return None;
        }
        Some(PplLog {
            offset_blocks: loc.offset_blocks,
            header_blocks: header_blocks(bs),
            slot_blocks,
            slots,
            array_uuid: uuid,
            table: (0..members as u64 * slots).map(|_| AtomicU64::new(0)).collect(),
            released_at: (0..members as u64 * slots).map(|_| AtomicU64::new(0)).collect(),
            seq: AtomicU64::new(1),
            flush_rounds_started: AtomicU64::new(0),
            flush_rounds_done: AtomicU64::new(0),
            flushing: AtomicBool::new(false),
            flush_left: AtomicU32::new(0),
            reuse_blocked: AtomicBool::new(false),
            round_short: AtomicBool::new(false),
            slots_exhausted: AtomicU64::new(0),
        })
    }

    fn words(&self, member: usize) -> &[AtomicU64] {
        let s = self.slots as usize;
        self.table.get(member * s..(member + 1) * s).unwrap_or(&[])
    }

    /// Member block of slot `i`.
    pub(crate) fn slot_offset(&self, i: u64) -> u64 {
        self.offset_blocks + i * self.slot_blocks
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes a slot on `member` for an entry of `stripe` (the one holding
    /// the stripe's entry if any, else any free one), never one whose entry
    /// waits for a flush before it may be overwritten. None: all busy, or
    /// the slot to take needs a flush first (`flush_before_reuse`).
    pub(crate) fn acquire(&self, member: usize, stripe: u64) -> Option<u64> {
        let tag = stripe + 1;
        let words = self.words(member);
        if let Some(i) = words.iter().position(|w| w.load(Ordering::Acquire) == tag) {
            // The stripe's own entry: only it may be overwritten (one entry per stripe).
            if !self.reusable(member, i) {
                self.reuse_blocked.store(true, Ordering::Release);
                return None;
            }
            return words[i]
                .compare_exchange(tag, BUSY | tag, Ordering::AcqRel, Ordering::Acquire)
                .ok()
                .map(|_| i as u64);
        }
        // An empty slot first, then one holding a completed write's entry
        // (never needed again once flushed, but left alone while there is room).
        let mut blocked = false;
        for empty in [true, false] {
            for (i, w) in words.iter().enumerate() {
                let v = w.load(Ordering::Acquire);
                if v & BUSY != 0 || (v == 0) != empty {
                    continue;
                }
                if !empty && !self.reusable(member, i) {
                    blocked = true;
                    continue;
                }
                if w.compare_exchange(v, BUSY | tag, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    return Some(i as u64);
                }
            }
        }
        if blocked {
            self.reuse_blocked.store(true, Ordering::Release);
        } else {
            self.slots_exhausted.fetch_add(1, Ordering::Relaxed);
        }
        None
    }

    /// Whether slot `i` of `member` may be overwritten: a flush round that
    /// began after its entry's write was freed has completed.
    fn reusable(&self, member: usize, i: usize) -> bool {
        let at = self.released_at.get(member * self.slots as usize + i).map_or(0, |a| a.load(Ordering::Acquire));
        self.flush_rounds_done.load(Ordering::Acquire) > at
    }

    /// Takes the slot whose entry on disk is for `stripe`, if any (a full
    /// write then overwrites its header: no flush needed, the write covers
    /// every row of the stripe).
    pub(crate) fn acquire_holding(&self, member: usize, stripe: u64) -> Option<u64> {
        let tag = stripe + 1;
        let words = self.words(member);
        let i = words.iter().position(|w| w.load(Ordering::Acquire) == tag)?;
        words[i].compare_exchange(tag, BUSY | tag, Ordering::AcqRel, Ordering::Acquire).ok().map(|_| i as u64)
    }

    /// The slot `stripe`'s write holds busy on `member`.
    pub(crate) fn busy_slot(&self, member: usize, stripe: u64) -> Option<u64> {
        self.words(member).iter().position(|w| w.load(Ordering::Acquire) == BUSY | (stripe + 1)).map(|i| i as u64)
    }

    /// Whether a slot of `member` holds an entry of `stripe` on disk.
    pub(crate) fn holds(&self, member: usize, stripe: u64) -> bool {
        self.words(member).iter().any(|w| w.load(Ordering::Acquire) == stripe + 1)
    }

    /// Frees the slot `stripe`'s write holds on `member`. `entry_left`: an
    /// entry of the stripe may be on disk there (false only after its header
    /// was overwritten with zeros).
    pub(crate) fn release(&self, member: usize, stripe: u64, entry_left: bool) {
        let tag = stripe + 1;
        let words = self.words(member);
        if let Some(i) = words.iter().position(|w| w.load(Ordering::Acquire) == BUSY | tag) {
            if entry_left {
                // The write's member writes are back (perhaps only in caches):
                // a round begun from now on covers them.
                let round = self.flush_rounds_started.load(Ordering::SeqCst);
                if let Some(a) = self.released_at.get(member * self.slots as usize + i) {
                    a.store(round, Ordering::Release);
                }
            }
            words[i].store(if entry_left { tag } else { 0 }, Ordering::Release);
        }
    }

    /// After `acquire` failed because the slots it could take need a flush:
    /// starts a flush round (none running) of every writable member of
    /// `members` that has a volatile write cache, from this reactor (the
    /// array's `key`). True when the round completed at once (no member
    /// has a cache), so the write may try again now; otherwise the write
    /// waits and tries again later. No allocation; nothing blocks.
    pub(crate) fn flush_before_reuse(&self, key: u32, members: &[MemberChannel], failed: u32) -> bool {
        if !self.reuse_blocked.load(Ordering::Acquire)
            || self.flushing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_err()
        {
            return false;
        }
        self.reuse_blocked.store(false, Ordering::Release);
        let round = self.flush_rounds_started.fetch_add(1, Ordering::SeqCst) + 1;
        let cached = |m: usize| {
            ArrayChannel::writable(members, failed, m)
                && members[m].ch.as_ref().is_some_and(|ch| {
                    let b = ch.handle().bdev();
                    b.has_write_cache() && b.io_type_supported(IoType::Flush)
                })
        };
        let count = (0..members.len()).filter(|&m| cached(m)).count() as u32;
        if count == 0 {
            self.flush_rounds_done.store(round, Ordering::Release);
            self.flushing.store(false, Ordering::Release);
            return true;
        }
        if (IoBox::available() as u64) < u64::from(count) {
            // No descriptors now: the next write that needs a slot retries.
            self.reuse_blocked.store(true, Ordering::Release);
            self.flushing.store(false, Ordering::Release);
            return false;
        }
        self.flush_left.store(count, Ordering::Release);
        let done: Rc<dyn IoDone> = reactor::local::<LogFlushDone>();
        for m in (0..members.len()).filter(|&m| cached(m)) {
            let Some(ch) = members[m].ch.as_ref() else { continue };
            match IoBox::data(IoType::Flush, 0, 0, None) {
                Some(mut io) => {
                    io.tag = u64::from(key);
                    io.tag2 = m as u64;
                    io.set_done(done.clone());
                    ch.submit(io);
                }
                // Counted as failed: the round ends without counting.
                None => self.flush_back(None, m, false),
            }
        }
        false
    }

    /// One member flush of the running round is back (`channel`: the array on
    /// this reactor, None for one that could not be sent).
    fn flush_back(&self, channel: Option<&ArrayChannel>, m: usize, ok: bool) {
        match (channel, ok) {
            (_, true) => {}
            // Its cache may have lost what the slots' writes put there: the
            // member fails, which leaves nothing on it to protect.
            (Some(channel), false) => channel.latch_failed(m),
            (None, false) => self.round_short.store(true, Ordering::Release),
        }
        if self.flush_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            if self.round_short.swap(false, Ordering::AcqRel) {
                // The round does not count: the next write that needs a slot starts another.
                self.reuse_blocked.store(true, Ordering::Release);
            } else {
                let round = self.flush_rounds_started.load(Ordering::SeqCst);
                self.flush_rounds_done.store(round, Ordering::Release);
            }
            self.flushing.store(false, Ordering::Release);
        }
    }

    /// Number of slots held busy.
    #[cfg(test)]
    pub(crate) fn busy_slots(&self) -> usize {
        self.table.iter().filter(|w| w.load(Ordering::Acquire) & BUSY != 0).count()
    }
}

/// Completion of the log's member flushes (one per reactor, shared by
/// every round: no allocation per round). `tag`: the array's key; `tag2`:
/// the member.
#[derive(Default)]
struct LogFlushDone;

impl IoDone for LogFlushDone {
    fn io_done(&self, io: IoBox) {
        let (key, m, ok) = (io.tag as u32, io.tag2 as usize, io.status.is_ok());
        drop(io);
        let Some(channel) = find_channel(key) else { return };
        let Some(log) = channel.shared.ppl.get() else { return };
        log.flush_back(Some(&channel), m, ok);
    }
}

// ---- replay at assembly -----------------------------------------------------

/// A member whose log `recover` wipes; an in-sync one is also read and
/// written by the replay (a member not in sync holds stale data and
/// perhaps stale entries: its log is only wiped).
pub(crate) struct ReplayMember {
    pub handle: BdevHandle,
    pub data_offset_blocks: u64,
    pub in_sync: bool,
}

/// What a replay did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ReplayStats {
    /// Valid entries found (in dirty stripes).
    pub entries: u64,
    /// Row ranges whose parity was rewritten.
    pub replayed: u64,
    /// Row ranges left as they were: a modified chunk's member is missing.
    pub unrecoverable: u64,
}

type ReplayDone = Box<dyn FnOnce(Result<ReplayStats, String>)>;

struct Replay {
    loc: PplLocation,
    geo: Geometry,
    bs: u64,
    uuid: [u8; 16],
    members: Vec<Option<ReplayMember>>,
    dirty: Option<Vec<Range<u64>>>,
    replay: bool,
    /// Entries found: (parity member, entry, its partial parity).
    found: Vec<(usize, PplEntry, Vec<u8>)>,
    stats: ReplayStats,
    done: Option<ReplayDone>,
}

/// Replays the valid entries of every in-sync member's log (`replay`), then
/// wipes every slot header of every member given, so the log holds nothing
/// older than this start (also at create, and for a member coming back:
/// `replay` false). `members` by slot: None for a member missing. `dirty`: the bitmap's
/// dirty array ranges (None: every stripe may be dirty).
#[allow(clippy::too_many_arguments)]
pub(crate) fn recover(
    loc: PplLocation,
    geo: Geometry,
    bs: u32,
    uuid: [u8; 16],
    members: Vec<Option<ReplayMember>>,
    dirty: Option<Vec<Range<u64>>>,
    replay: bool,
    done: ReplayDone,
) {
    let r = Rc::new(RefCell::new(Replay {
        loc,
        geo,
        bs: u64::from(bs),
        uuid,
        members,
        dirty,
        replay,
        found: Vec::new(),
        stats: ReplayStats::default(),
        done: Some(done),
    }));
    scan(r, 0, 0);
}

fn finish(r: &Rc<RefCell<Replay>>, res: Result<(), String>) {
    let (d, stats) = {
        let mut s = r.borrow_mut();
        (s.done.take(), s.stats)
    };
    if let Some(d) = d {
        d(res.map(|()| stats));
    }
}

/// Shape numbers of the replay's raid5 geometry: (members, data chunks, chunk rows).
fn shape(geo: &Geometry) -> (usize, usize, u64) {
    let n = geo.num_members();
    (n, n.saturating_sub(1), geo.strip_size_blocks())
}

/// Member and member offset (data area) of row 0 of data chunk `k` of `stripe`.
fn data_loc(geo: &Geometry, stripe: u64, k: u64) -> Option<(usize, u64)> {
    let (_, d, chunk) = shape(geo);
    let lba = (stripe * d as u64 + k) * chunk;
    if lba >= geo.array_blocks() {
        return None;
    }
    let (p, _) = geo.level().map(geo, lba);
    let l = p.copies(geo.num_members()).next()?;
    Some((l.member as usize, l.offset_blocks))
}

/// The member holding `stripe`'s parity: the one no data chunk is on.
fn parity_member(geo: &Geometry, stripe: u64) -> Option<usize> {
    let (n, d, _) = shape(geo);
    let mut on = 0u64;
    for k in 0..d as u64 {
        on |= 1 << data_loc(geo, stripe, k)?.0;
    }
    (0..n).find(|&m| on & (1 << m) == 0)
}

/// Reads slot `slot` of member `m` (in-sync members only), keeping valid
/// entries that apply; then the next.
fn scan(r: Rc<RefCell<Replay>>, m: usize, slot: u64) {
    let (next, io) = {
        let s = r.borrow();
        let (n, _, chunk) = shape(&s.geo);
        let slots = s.loc.length_blocks / slot_blocks(s.bs as u32, chunk);
        if !s.replay || m >= n {
            drop(s);
            return replay_next(r, 0);
        }
        if slot >= slots.min(64) {
            (Some((m + 1, 0)), None)
        } else {
            match s.members[m].as_ref().filter(|rm| rm.in_sync) {
                None => (Some((m + 1, 0)), None),
                Some(rm) => {
                    let blocks = slot_blocks(s.bs as u32, chunk);
                    (None, Some((rm.handle.clone(), s.loc.offset_blocks + slot * blocks, blocks)))
                }
            }
        }
    };
    if let Some((m2, s2)) = next {
        return scan(r, m2, s2);
    }
    let Some((h, at, blocks)) = io else { return };
    let bs = r.borrow().bs;
    let Some(buf) = DmaBuf::alloc((blocks * bs) as usize) else {
        return finish(&r, Err("no memory for a log slot".into()));
    };
    let r2 = r.clone();
    meta::io_blocks(&h, IoType::Read, at, blocks, buf, move |ok, buf| {
        if !ok {
            return finish(&r2, Err(format!("member {m}: log slot {slot} not readable")));
        }
        if let Some(buf) = buf {
            let mut s = r2.borrow_mut();
            let (_, d, chunk) = shape(&s.geo);
            let entry = buf.with(|b| decode_entry(b, bs, &s.uuid, d, chunk));
            // (The stripe number is the entry's word: checked before any
            // arithmetic on it.)
            let span = entry.as_ref().and_then(|e| stripe_span(e.stripe, d, chunk, s.geo.array_blocks()));
            if let (Some(e), Some(span)) = (entry, span) {
                let dirty = s.dirty.as_ref().is_none_or(|v| v.iter().any(|x| x.start < span.end && span.start < x.end));
                if parity_member(&s.geo, e.stripe) == Some(m) && dirty {
                    let rows: u64 = e.pieces.iter().map(|p| p.hi - p.lo).sum();
                    let hb = header_blocks(bs as u32) * bs;
                    let pp = buf.with(|b| b[hb as usize..(hb + rows * bs) as usize].to_vec());
                    s.stats.entries += 1;
                    // A stripe's newest entry only: an older one of the same
                    // stripe (left in a slot whose table word was given to
                    // another stripe by a write that then found no slot for
                    // its next stripe) describes rows as they were before.
                    match s.found.iter().position(|(_, f, _)| f.stripe == e.stripe) {
                        Some(i) if s.found[i].1.seq >= e.seq => {}
                        Some(i) => s.found[i] = (m, e, pp),
                        None => s.found.push((m, e, pp)),
                    }
                }
            }
        }
        scan(r2, m, slot + 1);
    });
}

/// Replays entry `i` (each of its pieces), then the next; then wipes.
fn replay_next(r: Rc<RefCell<Replay>>, i: usize) {
    let piece_count = {
        let s = r.borrow();
        match s.found.get(i) {
            None => {
                drop(s);
                return wipe(r, 0, 0);
            }
            Some((_, e, _)) => e.pieces.len(),
        }
    };
    replay_piece(r, i, 0, piece_count);
}

fn replay_piece(r: Rc<RefCell<Replay>>, i: usize, p: usize, count: usize) {
    if p >= count {
        return replay_next(r, i + 1);
    }
    // The modified rows of every data chunk, read in turn into the parity.
    let plan = {
        let s = r.borrow();
        let (pm, e, pp) = &s.found[i];
        let piece = e.pieces[p];
        let (_, d, chunk) = shape(&s.geo);
        let offset: u64 = e.pieces[..p].iter().map(|x| x.hi - x.lo).sum();
        let parity = pp[(offset * s.bs) as usize..((offset + piece.hi - piece.lo) * s.bs) as usize].to_vec();
        let mut reads = Vec::new();
        let in_sync = |m: usize| s.members[m].as_ref().is_some_and(|rm| rm.in_sync);
        let mut possible = in_sync(*pm);
        for k in 0..d {
            let (a, b) = piece.modified[k];
            if a == b {
                continue;
            }
            match data_loc(&s.geo, e.stripe, k as u64) {
                Some((m, off)) if in_sync(m) => reads.push((m, off + a, b - a, a - piece.lo)),
                _ => possible = false,
            }
        }
        let _ = chunk;
        possible.then(|| (*pm, e.stripe * chunk + piece.lo, piece.hi - piece.lo, parity, reads))
    };
    let Some((pm, p_off, rows, parity, reads)) = plan else {
        r.borrow_mut().stats.unrecoverable += 1;
        return replay_piece(r, i, p + 1, count);
    };
    let acc = Rc::new(RefCell::new(parity));
    read_into(r, acc, reads, 0, move |r, acc| {
        let (h, doff, bs) = {
            let s = r.borrow();
            let Some(pmem) = s.members[pm].as_ref() else { return };
            (pmem.handle.clone(), pmem.data_offset_blocks, s.bs)
        };
        let Some(buf) = DmaBuf::alloc((rows * bs) as usize) else {
            return finish(&r, Err("no memory for a parity row range".into()));
        };
        buf.copy_from(0, &acc.borrow());
        let r2 = r.clone();
        meta::io_with(&h, IoType::Write, IoFlags::FUA, doff + p_off, rows, Some(buf), move |ok, _| {
            if !ok {
                return finish(&r2, Err(format!("member {pm}: replayed parity not written")));
            }
            r2.borrow_mut().stats.replayed += 1;
            replay_piece(r2, i, p + 1, count);
        });
    });
}

/// Reads `reads[j..]` (member, member data offset, rows, row in the piece)
/// one after another, XORing each into `acc`; then `then`.
#[allow(clippy::type_complexity)]
fn read_into(
    r: Rc<RefCell<Replay>>,
    acc: Rc<RefCell<Vec<u8>>>,
    reads: Vec<(usize, u64, u64, u64)>,
    j: usize,
    then: impl FnOnce(Rc<RefCell<Replay>>, Rc<RefCell<Vec<u8>>>) + 'static,
) {
    let Some(&(m, off, rows, at)) = reads.get(j) else {
        return then(r, acc);
    };
    let (h, doff, bs) = {
        let s = r.borrow();
        let Some(rm) = s.members[m].as_ref() else { return };
        (rm.handle.clone(), rm.data_offset_blocks, s.bs)
    };
    let Some(buf) = DmaBuf::alloc((rows * bs) as usize) else {
        return finish(&r, Err("no memory for a data row range".into()));
    };
    let r2 = r.clone();
    meta::io_blocks(&h, IoType::Read, doff + off, rows, buf, move |ok, buf| {
        let Some(buf) = buf.filter(|_| ok) else {
            return finish(&r2, Err(format!("member {m}: data rows not readable for the replay")));
        };
        {
            let mut a = acc.borrow_mut();
            let start = (at * bs) as usize;
            buf.with(|b| {
                for (x, y) in a[start..start + b.len()].iter_mut().zip(b) {
                    *x ^= y;
                }
            });
        }
        read_into(r2, acc, reads, j + 1, then);
    });
}

/// Zeros slot `slot`'s header on member `m` (FUA), then the next.
fn wipe(r: Rc<RefCell<Replay>>, m: usize, slot: u64) {
    let step = {
        let s = r.borrow();
        let (n, _, chunk) = shape(&s.geo);
        let slots = (s.loc.length_blocks / slot_blocks(s.bs as u32, chunk)).min(64);
        if m >= n {
            None
        } else if slot >= slots || s.members[m].is_none() {
            Some(Err((m + 1, 0)))
        } else {
            let hb = header_blocks(s.bs as u32);
            let at = s.loc.offset_blocks + slot * slot_blocks(s.bs as u32, chunk);
            s.members[m].as_ref().map(|rm| Ok((rm.handle.clone(), at, hb, s.bs)))
        }
    };
    match step {
        None => finish(&r, Ok(())),
        Some(Err((m2, s2))) => wipe(r, m2, s2),
        Some(Ok((h, at, hb, bs))) => {
            let Some(buf) = DmaBuf::zeroed((hb * bs) as usize) else {
                return finish(&r, Err("no memory to wipe the log".into()));
            };
            let r2 = r.clone();
            meta::io_with(&h, IoType::Write, IoFlags::FUA, at, hb, Some(buf), move |ok, _| {
                if !ok {
                    return finish(&r2, Err(format!("member {m}: log slot {slot} not wiped")));
                }
                wipe(r2, m, slot + 1);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(lo: u64, hi: u64, modified: &[(u64, u64)]) -> PplPiece {
        let mut m = [(0, 0); MAX_MEMBERS];
        m[..modified.len()].copy_from_slice(modified);
        PplPiece { lo, hi, modified: m }
    }

    /// A sealed entry decodes to what was sealed; any torn or flipped byte
    /// of header or partial parity, another array's UUID, or a piece
    /// impossible for the geometry is refused (never replayed).
    #[test]
    fn entries_round_trip_and_torn_or_corrupt_ones_are_refused() {
        let bs = 512u64;
        let uuid = [7u8; 16];
        let pieces = [piece(2, 5, &[(2, 5), (3, 4), (4, 4)]), piece(9, 10, &[(9, 10), (10, 10), (10, 10)])];
        let mut slot = vec![0u8; (8 + 16) as usize * bs as usize];
        for (i, b) in slot[8 * bs as usize..].iter_mut().enumerate() {
            *b = (i * 31 + 7) as u8;
        }
        seal_entry(&mut slot, bs, &uuid, 42, 9, &pieces);
        let e = decode_entry(&slot, bs, &uuid, 3, 16).expect("a sealed entry decodes");
        assert_eq!((e.seq, e.stripe), (42, 9));
        assert_eq!(e.pieces, pieces.to_vec());
        assert!(decode_entry(&slot, bs, &[8; 16], 3, 16).is_none(), "another array's entry");
        assert!(decode_entry(&slot, bs, &uuid, 3, 8).is_none(), "rows past the chunk");
        assert!(decode_entry(&slot[..8 * bs as usize + 100], bs, &uuid, 3, 16).is_none(), "short payload");
        // The payload covered is the pieces' rows (4 blocks); every byte of
        // header and payload counts.
        for at in (0..PPL_HEADER_BYTES).chain(8 * 512..12 * 512).step_by(37) {
            let mut b = slot.clone();
            b[at] ^= 0x10;
            assert!(decode_entry(&b, bs, &uuid, 3, 16).is_none(), "flip at {at} accepted");
        }
        // Bytes past the payload are not part of the entry.
        let mut b = slot.clone();
        b[12 * 512 + 3] ^= 1;
        assert!(decode_entry(&b, bs, &uuid, 3, 16).is_some());
        // A torn write: the new header over an old payload.
        let mut torn = slot.clone();
        torn[8 * 512..9 * 512].fill(0);
        assert!(decode_entry(&torn, bs, &uuid, 3, 16).is_none());
        assert!(decode_entry(&vec![0u8; slot.len()], bs, &uuid, 3, 16).is_none(), "a wiped slot");
    }

    #[test]
    fn slots_keep_one_entry_per_stripe() {
        let loc = PplLocation { offset_blocks: 10, length_blocks: area_blocks(4096, 4) };
        let log = PplLog::new(loc, 4096, 4, 3, [1; 16]).unwrap();
        assert_eq!((log.slots, log.slot_blocks, log.slot_offset(2)), (PPL_SLOTS, 5, 20));
        let a = log.acquire(1, 7).unwrap();
        log.release(1, 7, true);
        assert!(log.holds(1, 7) && !log.holds(0, 7));
        // The stripe's next entry goes where its last one is, but only after
        // a flush round began and ended since that entry's write was freed
        // (its data and parity may sit in member caches); no cached member
        // (none here): the round ends at once.
        let b = log.acquire(1, 8).unwrap();
        assert_ne!(a, b);
        assert_eq!(log.acquire(1, 7), None, "the stripe's entry waits for a flush");
        assert_eq!(log.slots_exhausted.load(Ordering::Relaxed), 0, "not for want of slots");
        assert!(log.flush_before_reuse(0, &[], 0), "no cached member: the round ends at once");
        assert!(!log.flush_before_reuse(0, &[], 0), "nothing waits for another round");
        assert_eq!(log.acquire(1, 7), Some(a));
        assert_eq!(log.busy_slots(), 2);
        log.release(1, 7, true);
        log.release(1, 8, true);
        // A full write takes the stripe's slot to wipe it.
        assert_eq!(log.acquire_holding(1, 7), Some(a));
        log.release(1, 7, false);
        assert!(!log.holds(1, 7) && log.acquire_holding(1, 7).is_none());
        // Every slot busy: none to take, counted.
        for s in 100..100 + PPL_SLOTS {
            assert!(log.acquire(2, s).is_some());
        }
        assert!(log.acquire(2, 1).is_none());
        assert_eq!(log.slots_exhausted.load(Ordering::Relaxed), 1);
        // Freed with their entries left: another stripe's write takes one
        // only after a round (slot 8's entry was flushed by the last one).
        for s in 100..100 + PPL_SLOTS {
            log.release(2, s, true);
        }
        assert!(log.acquire(2, 1).is_none());
        assert_eq!(log.slots_exhausted.load(Ordering::Relaxed), 1, "slots were free, waiting for a flush");
        assert!(log.acquire(1, 9).is_some(), "member 1 has empty slots");
        assert!(log.flush_before_reuse(0, &[], 0));
        assert!(log.acquire(2, 1).is_some());
    }
}
