//! Write-intent bitmap (md's, made polled and lock-free): one bit per chunk
//! of an array, persisted on every active member before any write to that
//! chunk reaches a member (invariant 2, docs/architecture.md), so that after a crash or
//! a member's short absence only the chunks whose bits are set need resync.
//!
//! # Pieces
//!
//! * [`Bitmap`] (`Arc`, every reactor): per-chunk in-flight counters, the
//!   chunk bit words, `seq_flush`/`seq_write`. `start_write`, `is_released`,
//!   `end_write` are lock- and allocation-free. The ordering argument is in
//!   the `shared` module's docs.
//! * [`BitmapOwner`] (the array's owner reactor, `!Send`): the tick that
//!   closes batches, page buffers (double-buffered and pinned while in
//!   flight, invariant 5), the page writes to every member, lazy clearing,
//!   member changes, and `flush_and_stop` (invariant 4).
//! * [`Planner`]: the owner's decisions without IO (used by `BitmapOwner`
//!   and by the loom model, `tests/loom_batch.rs`).
//! * [`page`]: the on-disk page format (4096 bytes, CRC32C), [`load`] to
//!   read it back from a member for assembly and resync.
//!
//! # How a RAID write uses this
//!
//! ```text
//! array write (first_block, num_blocks) on any reactor
//!   -> bitmap.start_write(first_block, num_blocks)?
//!        Ready       -> fan out to the members now (the common case)
//!        Wait(batch) -> park the write; a per-reactor poller (or the retry
//!                       loop the RAID already has) checks
//!                       bitmap.is_released(batch) — one atomic load — and
//!                       fans the write out once it is true
//!        Closed      -> fail the write (the array is being torn down)
//!   -> every member write completed (success or not)
//!   -> bitmap.end_write(first_block, num_blocks)   // exactly once per start
//!   -> complete the array write
//! ```
//!
//! The owner reactor runs `owner.start_poller(DEFAULT_TICK_PERIOD)` (or calls `tick()`
//! from its own timed poller). Reconfiguration goes through the RAID's
//! suspend: `set_members(new, done)` and resume after `done` (a new member
//! gets every page before it sees a write); at assembly, create the owner
//! with the bitmap `load`ed from the freshest member, `flush(done)` before
//! resuming IO, resync `loaded.dirty_chunks()`, `mark_resynced` them, and
//! `set_in_sync(true)`. Teardown: suspend, `flush_and_stop(done)`, release
//! the members only in `done`. A member whose page write fails is reported
//! through `on_member_failed` before the batch releases any write: the RAID
//! must stop writing to it there (the batch counts as persisted on the
//! members that remain active).
#![forbid(unsafe_code)]

mod geometry;
mod load;
mod owner;
pub mod page;
mod planner;
mod shared;
mod sync;

#[cfg(test)]
mod owner_tests;

pub use geometry::{
    Geometry, Plane, CHUNKS_PER_PAGE, DEFAULT_CHUNK_SIZE_BYTES, MAX_CHUNKS, PAGE_HEADER_BYTES, PAGE_SIZE_BYTES, PLANES,
    WORDS_PER_PAGE,
};
pub use load::{load, LoadedBitmap};
pub use owner::{BitmapOwner, OwnerOptions, DEFAULT_TICK_PERIOD};
pub use planner::{Plan, Planner, TickOptions, WrittenInit};
pub use shared::{Bitmap, WriteTicket};

/// Errors of the bitmap: bad geometry or ranges, undecodable pages, IO.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    #[error("invalid bitmap geometry: {0}")]
    Geometry(String),
    #[error("write of {num_blocks} blocks at {first_block} is outside the {data_blocks} blocks the bitmap covers")]
    OutOfRange { first_block: u64, num_blocks: u64, data_blocks: u64 },
    #[error("end_write on chunk {0} without a matching start_write")]
    Unbalanced(u64),
    #[error("bitmap page is {0} bytes, shorter than a page")]
    ShortPage(usize),
    #[error("not a bitmap page (bad magic)")]
    BadMagic,
    #[error("unsupported bitmap page version {0}")]
    UnsupportedVersion(u32),
    #[error("bitmap page checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum { stored: u32, computed: u32 },
    #[error("bitmap page holds page index {found}, expected {expected}")]
    WrongPage { expected: u64, found: u64 },
    #[error("bitmap page belongs to another array")]
    WrongArray,
    #[error("bitmap page geometry differs from the array's: {0}")]
    GeometryMismatch(String),
    #[error("bitmap page has an impossible geometry: {0}")]
    ImpossibleGeometry(String),
    #[error("bitmap page has bits set past its last chunk")]
    BitsPastEnd,
    #[error("member {0}: {1}")]
    Member(String, String),
    #[error("out of memory: {0}")]
    NoMemory(&'static str),
    #[error("the bitmap is stopped")]
    Closed,
}

/// The indices of the set bits of `words`, ascending.
pub(crate) fn set_bits(words: &[u64]) -> impl Iterator<Item = u64> + '_ {
    words.iter().enumerate().flat_map(|(i, &w)| {
        let mut bits = w;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let b = bits.trailing_zeros();
            bits &= bits - 1;
            Some(i as u64 * 64 + u64::from(b))
        })
    })
}
