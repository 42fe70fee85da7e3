//! The part of the bitmap every reactor touches: per-chunk in-flight
//! counters, the chunk bit words, and the batch counters `seq_flush` and
//! `seq_write`. Lock-free; loom checks it (`tests/loom_batch.rs`).
//!
//! # Who writes what, and why the orderings suffice
//!
//! * `counters[c]`: every writer (fetch_add on start, fetch_sub on end).
//!   Low 32 bits: writes in flight on chunk `c`; high 32 bits: a wrapping
//!   count of starts, so the owner's tick sees a chunk that was written
//!   and finished between two ticks as busy, not idle.
//! * `pending` words: writers set bits with `fetch_or` (idempotent, so many
//!   writers are fine); only the owner's tick clears them, with `swap(0)`
//!   when it closes a batch.
//! * `on_disk` words: only the owner sets bits (after a batch persisted on
//!   every active member) and clears them (lazy clearing). Writers read.
//! * `seq_flush`, `seq_write`: written only by the owner's reactor, read by
//!   everyone (Release stores, Acquire loads).
//!
//! Two handshakes carry the protocol, each guaranteeing that at least one
//! side sees the other:
//!
//! 1. *Fast path vs lazy clearing* (Dekker: each side writes, `SeqCst`
//!    fence, reads; the model fails without the writer's fence). A writer
//!    increments the counter, fences, then reads the on-disk bit. The tick
//!    clears the on-disk bit, fences, then reads the counter. If the writer
//!    saw the bit set (and proceeds without waiting), the tick sees its
//!    count and puts the bit back; if the tick saw a zero count, the writer
//!    sees the bit clear and waits for a batch that sets it again. (`SeqCst`
//!    accesses instead of the fence measured no faster here, and loom
//!    models only the fence.)
//! 2. *Joining a batch.* A writer sets its pending bit, then reads
//!    `seq_flush` and joins `seq_flush + 1`. The tick stores the new
//!    `seq_flush`, then swaps the pending words. Both pending updates are
//!    AcqRel read-modify-writes of the same word, so one reads from the
//!    other: if the tick's swap came first, the writer's `fetch_or`
//!    acquires it and so reads the new `seq_flush` (it joins the next
//!    batch); if the writer's came first, the swap takes its bit. So a
//!    writer that read the old value (joined the batch being closed) has
//!    its bit in that batch's snapshot. The RMW pair alone suffices (the
//!    loom model passes without the fences here); the SeqCst fences stay
//!    because they cost only on the slow path and keep the argument valid
//!    should either side ever become a plain store or load. A writer that
//!    read the new value raises `wanted`, so its batch runs even if its bit
//!    was already taken by the batch before (liveness; the model fails
//!    without it).
//!
//! A batch's completion sets the persisted bits in `on_disk` and then
//! stores `seq_write` (Release); a writer that loads `seq_write >= batch`
//! (Acquire) or an on-disk bit is ordered after the page writes completed.
//!
//! # Written and needs-sync chunks (md's llbitmap states)
//!
//! * `written` words: chunks written since the array was created, as
//!   persisted (only the owner sets them, when the batch that first marked
//!   the chunk completes: in the same pages write as its dirty bit, so no
//!   write reaches a member of a chunk that is not written on disk). A
//!   chunk never written (md's `BitUnwritten`) holds nothing a reader may
//!   rely on: resync, scrub and rebuild skip it.
//! * `needsync` words: written chunks whose redundancy is not known right
//!   over the whole chunk (md's `BitNeedSync`). With
//!   `OwnerOptions::first_write_needs_sync` (parity levels: a first partial
//!   write computes parity only for the rows it writes) a chunk's first
//!   write sets it, published before the written bit, so a reader that
//!   sees the written bit sees it too; a loaded dirty bit sets it (a crash
//!   may have left the chunk half-written). The RAID clears it with
//!   `mark_synced` once a pass computed the chunk's redundancy from its
//!   data; until then the chunk's dirty bit is never cleared, so the state
//!   survives a restart (a loaded dirty chunk needs sync again).

use crate::geometry::Geometry;
use crate::sync::{fence, AtomicBool, AtomicU64, Ordering};
use crate::BitmapError;
use std::ops::Range;

/// One start, as added to a chunk counter: count + 1 and starts + 1.
pub(crate) const START: u64 = 1 | 1 << 32;
pub(crate) const COUNT_MASK: u64 = u32::MAX as u64;

/// What a write must do after marking its chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteTicket {
    /// Every chunk's bit is on disk: go ahead.
    Ready,
    /// Wait until `is_released(batch)` before the write reaches any member.
    Wait(u64),
    /// The bitmap has been stopped: fail the write (it was not marked).
    Closed,
}

/// The shared state of one array's bitmap (`Arc<Bitmap>` on every reactor).
pub struct Bitmap {
    geometry: Geometry,
    pub(crate) counters: Box<[AtomicU64]>,
    pub(crate) on_disk: Box<[AtomicU64]>,
    pub(crate) pending: Box<[AtomicU64]>,
    pub(crate) seq_flush: AtomicU64,
    pub(crate) seq_write: AtomicU64,
    /// Highest batch a writer waits for (writers `fetch_max`, the tick reads).
    pub(crate) wanted: AtomicU64,
    pub(crate) closed: AtomicBool,
    pub(crate) in_sync: AtomicBool,
    /// Persisted written bits (see module docs); all set for a bitmap of
    /// version 1 pages.
    pub(crate) written: Box<[AtomicU64]>,
    /// Written chunks whose redundancy is not known right (module docs).
    pub(crate) needsync: Box<[AtomicU64]>,
    /// The pages carry the written plane (version 2).
    pub(crate) tracks_written: AtomicBool,
    /// A chunk's first write leaves it needing sync (parity levels; set by
    /// the owner at creation).
    pub(crate) first_write_needs_sync: AtomicBool,
    // Statistics take no part in the protocol: plain std atomics, so the
    // loom model does not explore their interleavings.
    pub(crate) batches_written: StatCounter,
    pub(crate) pages_written: StatCounter,
    pub(crate) member_writes: StatCounter,
    writes_waited: StatCounter,
}

pub(crate) type StatCounter = std::sync::atomic::AtomicU64;

fn atomics(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

impl Bitmap {
    /// A bitmap with every chunk clean and nothing on disk yet. The owner
    /// (`BitmapOwner`) creates it; models and tests may drive it directly
    /// with a [`crate::Planner`].
    pub fn new(geometry: Geometry) -> Result<Bitmap, BitmapError> {
        geometry.validate()?;
        let words = geometry.num_words();
        Ok(Bitmap {
            geometry,
            counters: atomics(geometry.num_chunks() as usize),
            on_disk: atomics(words),
            pending: atomics(words),
            seq_flush: AtomicU64::new(0),
            seq_write: AtomicU64::new(0),
            wanted: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            in_sync: AtomicBool::new(true),
            written: atomics(words),
            needsync: atomics(words),
            tracks_written: AtomicBool::new(true),
            first_write_needs_sync: AtomicBool::new(false),
            batches_written: StatCounter::new(0),
            pages_written: StatCounter::new(0),
            member_writes: StatCounter::new(0),
            writes_waited: StatCounter::new(0),
        })
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Marks the chunks of a write of `num_blocks` at `first_block` (array
    /// blocks). Every `Ready`/`Wait` must be followed by one `end_write`
    /// with the same range. Allocation- and lock-free.
    pub fn start_write(&self, first_block: u64, num_blocks: u64) -> Result<WriteTicket, BitmapError> {
        let chunks = self.geometry.chunk_range(first_block, num_blocks)?;
        Ok(self.start_chunks(chunks))
    }

    /// `start_write` on a chunk range (checked against the geometry).
    fn start_chunks(&self, chunks: Range<u64>) -> WriteTicket {
        if self.closed.load(Ordering::Acquire) || chunks.end > self.counters.len() as u64 || chunks.is_empty() {
            return WriteTicket::Closed;
        }
        for c in chunks.clone() {
            self.counters[c as usize].fetch_add(START, Ordering::AcqRel);
        }
        // Handshake 1 (see module docs): counter before on-disk bit.
        fence(Ordering::SeqCst);
        let mut all_on_disk = true;
        for c in chunks {
            let (w, bit) = word_bit(c);
            if self.on_disk[w].load(Ordering::Acquire) & bit == 0 {
                all_on_disk = false;
                self.pending[w].fetch_or(bit, Ordering::AcqRel);
            }
        }
        if all_on_disk {
            return WriteTicket::Ready;
        }
        // Handshake 2: pending bit before reading seq_flush.
        fence(Ordering::SeqCst);
        let batch = self.seq_flush.load(Ordering::Acquire) + 1;
        self.wanted.fetch_max(batch, Ordering::AcqRel);
        self.writes_waited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        WriteTicket::Wait(batch)
    }

    /// True once batch `batch` is persisted on every active member.
    pub fn is_released(&self, batch: u64) -> bool {
        self.seq_write.load(Ordering::Acquire) >= batch
    }

    /// Ends a write started with `start_write` (completed, failed or
    /// abandoned while waiting). Unbalanced calls are refused, not counted.
    pub fn end_write(&self, first_block: u64, num_blocks: u64) -> Result<(), BitmapError> {
        let chunks = self.geometry.chunk_range(first_block, num_blocks)?;
        self.end_chunks(chunks)
    }

    /// `end_write` on a chunk range.
    fn end_chunks(&self, chunks: Range<u64>) -> Result<(), BitmapError> {
        if chunks.end > self.counters.len() as u64 {
            return Err(BitmapError::Unbalanced(chunks.start));
        }
        let mut result = Ok(());
        for c in chunks {
            // Release: the write's completion happens-before a tick that
            // sees the count drop and clears the chunk.
            let before = self.counters[c as usize].fetch_sub(1, Ordering::AcqRel);
            if before & COUNT_MASK == 0 {
                self.counters[c as usize].fetch_add(1, Ordering::AcqRel);
                tracing::error!(chunk = c, "bitmap end_write without start_write");
                result = Err(BitmapError::Unbalanced(c));
            }
        }
        result
    }

    /// Writes in flight (or waiting) on `chunk`.
    pub fn in_flight(&self, chunk: u64) -> u32 {
        self.counters.get(chunk as usize).map_or(0, |c| (c.load(Ordering::Acquire) & COUNT_MASK) as u32)
    }

    /// Whether every member holds the same data outside the bitmap's dirty
    /// chunks; only then are idle chunks cleared. The RAID sets it false
    /// while degraded or resyncing.
    pub fn set_in_sync(&self, in_sync: bool) {
        self.in_sync.store(in_sync, Ordering::Release);
    }

    pub fn in_sync(&self) -> bool {
        self.in_sync.load(Ordering::Acquire)
    }

    /// Is chunk `chunk`'s bit persisted (set) on every active member?
    pub fn is_on_disk(&self, chunk: u64) -> bool {
        let (w, bit) = word_bit(chunk);
        self.on_disk.get(w).is_some_and(|x| x.load(Ordering::Acquire) & bit != 0)
    }

    /// The chunks whose bit is on disk right now, in order.
    pub fn dirty_chunks(&self) -> Vec<u64> {
        let words: Vec<u64> = self.on_disk.iter().map(|w| w.load(Ordering::Acquire)).collect();
        crate::set_bits(&words).collect()
    }

    /// Whether the bitmap knows which chunks were written (version 2
    /// pages); when false every chunk counts as written and none as
    /// needing sync.
    pub fn tracks_written(&self) -> bool {
        self.tracks_written.load(Ordering::Acquire)
    }

    /// Was chunk `chunk` written since the array was created (persisted)?
    pub fn is_written(&self, chunk: u64) -> bool {
        let (w, bit) = word_bit(chunk);
        self.written.get(w).is_some_and(|x| x.load(Ordering::Acquire) & bit != 0)
    }

    /// Is chunk `chunk` written and still waiting for its redundancy to be
    /// computed from its data?
    pub fn needs_sync(&self, chunk: u64) -> bool {
        let (w, bit) = word_bit(chunk);
        self.needsync.get(w).is_some_and(|x| x.load(Ordering::Acquire) & bit != 0)
    }

    /// Whether every chunk of `[first_block, first_block + num_blocks)` is
    /// written and its redundancy known right: a parity level may then
    /// update parity in place (read-modify-write). Out of range: false.
    /// Lock- and allocation-free.
    pub fn range_trusted(&self, first_block: u64, num_blocks: u64) -> bool {
        let Ok(chunks) = self.geometry.chunk_range(first_block, num_blocks) else { return false };
        // Written first (Acquire): a set written bit orders the needsync
        // bit published before it.
        chunks.into_iter().all(|c| self.is_written(c) && !self.needs_sync(c))
    }

    /// Whether no chunk of `[first_block, first_block + num_blocks)` was
    /// ever written (false when the bitmap does not track it, or out of range).
    pub fn range_unwritten(&self, first_block: u64, num_blocks: u64) -> bool {
        let Ok(chunks) = self.geometry.chunk_range(first_block, num_blocks) else { return false };
        self.tracks_written() && chunks.into_iter().all(|c| !self.is_written(c))
    }

    /// The written chunks, in order.
    pub fn written_chunks(&self) -> Vec<u64> {
        let words: Vec<u64> = self.written.iter().map(|w| w.load(Ordering::Acquire)).collect();
        crate::set_bits(&words).collect()
    }

    /// The chunks that need sync, in order.
    pub fn needsync_chunks(&self) -> Vec<u64> {
        let words: Vec<u64> = self.needsync.iter().map(|w| w.load(Ordering::Acquire)).collect();
        crate::set_bits(&words).collect()
    }

    /// Chunks written since creation (persisted).
    pub fn written_count(&self) -> u64 {
        self.written.iter().map(|w| u64::from(w.load(Ordering::Acquire).count_ones())).sum()
    }

    /// Whether a chunk's first write leaves it needing sync
    /// (`OwnerOptions::first_write_needs_sync`).
    pub fn first_write_needs_sync(&self) -> bool {
        self.first_write_needs_sync.load(Ordering::Acquire)
    }

    /// The redundancy of chunks `chunks` was computed from their data (a
    /// resync or sync pass that held their stripes): they may be updated in
    /// place, and their dirty bits cleared again.
    pub fn mark_synced(&self, chunks: Range<u64>) {
        for c in chunks.filter(|&c| c < self.geometry.num_chunks()) {
            let (w, bit) = word_bit(c);
            self.needsync[w].fetch_and(!bit, Ordering::AcqRel);
        }
    }

    /// Last batch closed by the tick.
    pub fn seq_flush(&self) -> u64 {
        self.seq_flush.load(Ordering::Acquire)
    }

    /// Last batch persisted on every active member.
    pub fn seq_write(&self) -> u64 {
        self.seq_write.load(Ordering::Acquire)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Batches whose page writes completed on every member.
    pub fn batches_written(&self) -> u64 {
        self.batches_written.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Page images written (once per page per batch, whatever the member count).
    pub fn pages_written(&self) -> u64 {
        self.pages_written.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Page writes submitted to members.
    pub fn member_writes(&self) -> u64 {
        self.member_writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes that had to wait for a batch.
    pub fn writes_waited(&self) -> u64 {
        self.writes_waited.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Word index and bit mask of a chunk.
pub(crate) fn word_bit(chunk: u64) -> (usize, u64) {
    ((chunk / 64) as usize, 1u64 << (chunk % 64))
}
