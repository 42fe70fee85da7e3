//! The owner reactor's half of the batch protocol, without IO: deciding
//! which idle chunks to clear, closing a batch (`seq_flush += 1`), building
//! the new on-disk image and the list of pages to write, and publishing a
//! completed batch (`on_disk` bits, then `seq_write`). `BitmapOwner` wraps
//! it with page buffers and member writes; the loom model drives it with a
//! simulated "persisted" image.

use crate::geometry::{Plane, WORDS_PER_PAGE};
use crate::shared::{word_bit, Bitmap, COUNT_MASK};
use crate::sync::{fence, Ordering};

/// What one tick may do beyond the normal protocol.
#[derive(Clone, Copy, Debug, Default)]
pub struct TickOptions {
    /// Write every page, changed or not (new member, creation, final flush).
    pub force_all_pages: bool,
    /// Clear every chunk with no write in flight now, ignoring the idle
    /// countdown (the final batch of a clean stop). Still needs in-sync.
    pub clear_idle_now: bool,
}

/// Where a planner's written bits come from.
#[derive(Clone, Copy, Debug)]
pub enum WrittenInit<'a> {
    /// A new array: no chunk written yet.
    Nothing,
    /// Loaded from version 2 pages.
    Loaded(&'a [u64]),
    /// Loaded from version 1 pages, which do not record it: every chunk
    /// counts as written, and the pages stay version 1 (one plane).
    Legacy,
}

/// A closed batch: its sequence number and what to write.
#[derive(Debug)]
pub struct Plan {
    pub seq: u64,
    /// Page slots whose image changed (or were forced), ascending: slot
    /// `plane.index() * num_pages + page` (see [`Planner::slot_page`]).
    pub pages: Vec<usize>,
    /// Pending bits this batch took, published to `on_disk` on completion.
    set_words: Vec<(usize, u64)>,
    /// Chunks this batch writes as written for the first time (published
    /// to `written`, and `needsync` first where first writes need sync).
    written_words: Vec<(usize, u64)>,
    /// Chunks this batch clears on disk.
    pub cleared_chunks: u64,
}

impl Plan {
    /// Whether the batch writes chunks as written for the first time.
    pub fn has_first_writes(&self) -> bool {
        !self.written_words.is_empty()
    }
}

/// Owner-only bookkeeping (single writer: the owner reactor).
pub struct Planner {
    /// What the members' pages hold once the batch in flight (if any) lands.
    image: Vec<u64>,
    /// The written plane's image, likewise (all set for a legacy bitmap).
    written: Vec<u64>,
    /// Version 1 pages: the dirty plane only.
    legacy: bool,
    num_pages: usize,
    seq_flush: u64,
    idle_ticks: Vec<u8>,
    last_starts: Vec<u32>,
    clear_after_ticks: u8,
    /// Chunks the resync finished: clearable even while not in sync.
    resynced: Vec<u64>,
    in_flight: bool,
    /// The chunks a tick clears, per word: reused so an idle tick allocates nothing.
    clear_scratch: Vec<u64>,
    #[cfg(test)]
    pub(crate) release_early: bool,
}

impl Planner {
    /// A planner for `bitmap`; `initial` is the on-disk image loaded at
    /// assembly (its bits count as persisted), `clear_after_ticks` the idle
    /// ticks before a chunk is cleared.
    /// The loaded chunks count as written.
    pub fn new(bitmap: &Bitmap, initial: Option<&[u64]>, clear_after_ticks: u8) -> Planner {
        let written = match initial {
            Some(words) => WrittenInit::Loaded(words),
            None => WrittenInit::Nothing,
        };
        Planner::with_written(bitmap, initial, written, clear_after_ticks)
    }

    /// A planner whose written bits come from `written`. A loaded dirty
    /// chunk that is written needs sync where first writes do (it may have
    /// been half-written when the array stopped).
    pub fn with_written(
        bitmap: &Bitmap,
        initial: Option<&[u64]>,
        written: WrittenInit<'_>,
        clear_after_ticks: u8,
    ) -> Planner {
        let g = *bitmap.geometry();
        let words = g.num_words();
        let mut image = vec![0u64; words];
        if let Some(init) = initial {
            for (w, v) in image.iter_mut().zip(init) {
                *w = *v;
            }
            mask_tail(&mut image, g.num_chunks());
            for (a, v) in bitmap.on_disk.iter().zip(&image) {
                a.store(*v, Ordering::Release);
            }
        }
        let legacy = matches!(written, WrittenInit::Legacy);
        let mut written = match written {
            WrittenInit::Nothing => vec![0u64; words],
            WrittenInit::Loaded(w) => (0..words).map(|i| w.get(i).copied().unwrap_or(0)).collect(),
            WrittenInit::Legacy => vec![u64::MAX; words],
        };
        mask_tail(&mut written, g.num_chunks());
        let needs_sync = bitmap.first_write_needs_sync() && !legacy;
        for (w, v) in written.iter().enumerate() {
            if needs_sync {
                bitmap.needsync[w].store(image[w] & *v, Ordering::Release);
            }
            bitmap.written[w].store(*v, Ordering::Release);
        }
        bitmap.tracks_written.store(!legacy, Ordering::Release);
        let chunks = g.num_chunks() as usize;
        Planner {
            image,
            written,
            legacy,
            num_pages: g.num_pages(),
            seq_flush: bitmap.seq_flush.load(Ordering::Acquire),
            idle_ticks: vec![0; chunks],
            last_starts: vec![0; chunks],
            clear_after_ticks,
            resynced: vec![0; words],
            in_flight: false,
            clear_scratch: vec![0; words],
            #[cfg(test)]
            release_early: false,
        }
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Whether the pages are version 1 (the dirty plane only).
    pub fn legacy(&self) -> bool {
        self.legacy
    }

    /// Page slots the bitmap writes: one plane of pages, or two.
    pub fn page_slots(&self) -> usize {
        if self.legacy {
            self.num_pages
        } else {
            2 * self.num_pages
        }
    }

    /// The plane and page of slot `slot`.
    pub fn slot_page(&self, slot: usize) -> (Plane, usize) {
        if slot < self.num_pages {
            (Plane::Dirty, slot)
        } else {
            (Plane::Written, slot - self.num_pages)
        }
    }

    /// The words of page slot `slot` of the image to write.
    pub fn page_words(&self, slot: usize) -> &[u64] {
        let (plane, page) = self.slot_page(slot);
        let image = if plane == Plane::Dirty { &self.image } else { &self.written };
        let start = (page * WORDS_PER_PAGE).min(image.len());
        let end = (start + WORDS_PER_PAGE).min(image.len());
        &image[start..end]
    }

    /// Lets the resynced chunks `chunks` be cleared even while the array is
    /// not in sync (the caller vouches every member now agrees on them).
    pub fn mark_resynced(&mut self, chunks: std::ops::Range<u64>) {
        for c in chunks.filter(|&c| c < self.idle_ticks.len() as u64) {
            let (w, bit) = word_bit(c);
            self.resynced[w] |= bit;
        }
    }

    /// One tick: when no batch is in flight, picks idle chunks to clear and,
    /// if anything needs persisting, closes the next batch. `None`: nothing
    /// to do (or a batch is still in flight).
    pub fn tick(&mut self, bm: &Bitmap, opts: TickOptions) -> Option<Plan> {
        if self.in_flight {
            return None;
        }
        let clear_mask = self.pick_clears(bm, opts.clear_idle_now);
        let wanted = bm.wanted.load(Ordering::Acquire);
        let any_pending = bm.pending.iter().any(|w| w.load(Ordering::Acquire) != 0);
        let clearing = clear_mask.iter().any(|&m| m != 0);
        if !(any_pending || clearing || opts.force_all_pages || wanted > self.seq_flush) {
            self.clear_scratch = clear_mask;
            return None;
        }
        self.seq_flush += 1;
        let seq = self.seq_flush;
        bm.seq_flush.store(seq, Ordering::Release);
        // Handshake 2 (see `shared`): publish seq_flush before taking bits.
        fence(Ordering::SeqCst);
        let mut pages = Vec::new();
        let mut set_words = Vec::new();
        let mut written_words = Vec::new();
        let mut written_pages = Vec::new();
        let mut cleared_chunks = 0;
        for (w, pending) in bm.pending.iter().enumerate() {
            let taken = pending.swap(0, Ordering::AcqRel);
            let clear = clear_mask.get(w).copied().unwrap_or(0);
            let new = (self.image[w] & !clear) | taken;
            cleared_chunks += u64::from((self.image[w] & !new).count_ones());
            let page = w / WORDS_PER_PAGE;
            if (new != self.image[w] || opts.force_all_pages) && pages.last() != Some(&page) {
                pages.push(page);
            }
            self.image[w] = new;
            if taken != 0 {
                set_words.push((w, taken));
            }
            // A chunk's first write: its written bit goes out with its
            // dirty bit (a legacy image has every bit set already).
            let first = taken & !self.written[w];
            if first != 0 {
                self.written[w] |= first;
                written_words.push((w, first));
                let slot = self.num_pages + page;
                if written_pages.last() != Some(&slot) {
                    written_pages.push(slot);
                }
            }
        }
        pages.extend(written_pages);
        if opts.force_all_pages {
            pages = (0..self.page_slots()).collect();
        }
        self.in_flight = true;
        self.clear_scratch = clear_mask;
        let plan = Plan { seq, pages, set_words, written_words, cleared_chunks };
        #[cfg(test)]
        if self.release_early {
            // Test-only mutation: publish before the pages are persisted, so
            // the protocol tests can show they would catch it.
            self.publish(bm, &plan);
        }
        Some(plan)
    }

    /// Publishes a batch whose pages are persisted on every active member:
    /// its bits become visible to the fast path, then its writers are released.
    pub fn complete(&mut self, bm: &Bitmap, plan: &Plan) {
        assert!(self.in_flight && plan.seq == self.seq_flush, "bitmap batch {} completed out of order", plan.seq);
        self.publish(bm, plan);
        self.in_flight = false;
        bm.batches_written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bm.pages_written.fetch_add(plan.pages.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn publish(&self, bm: &Bitmap, plan: &Plan) {
        // Needs-sync before written (see `shared`): whoever sees a chunk
        // written sees whether it needs sync.
        let needs_sync = bm.first_write_needs_sync();
        for &(w, bits) in &plan.written_words {
            if needs_sync {
                bm.needsync[w].fetch_or(bits, Ordering::AcqRel);
            }
            bm.written[w].fetch_or(bits, Ordering::AcqRel);
        }
        for &(w, bits) in &plan.set_words {
            bm.on_disk[w].fetch_or(bits, Ordering::AcqRel);
        }
        bm.seq_write.store(plan.seq, Ordering::Release);
    }

    /// Advances the idle countdown of every chunk set on disk and takes the
    /// bits of those due for clearing out of `on_disk` (handshake 1: a chunk
    /// whose count is not zero after the fence gets its bit back).
    fn pick_clears(&mut self, bm: &Bitmap, now: bool) -> Vec<u64> {
        let in_sync = bm.in_sync();
        let mut masks = std::mem::take(&mut self.clear_scratch);
        masks.clear();
        masks.resize(self.image.len(), 0);
        for (w, mask) in masks.iter_mut().enumerate() {
            let set = bm.on_disk[w].load(Ordering::Acquire);
            // A chunk that needs sync keeps its dirty bit: after a restart
            // the loaded bit says it still needs sync.
            let needs_sync = bm.needsync[w].load(Ordering::Acquire);
            let mut bits = set;
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let c = w * 64 + b as usize;
                let v = bm.counters[c].load(Ordering::Acquire);
                let (count, starts) = (v & COUNT_MASK, (v >> 32) as u32);
                if count == 0 && starts == self.last_starts[c] {
                    self.idle_ticks[c] = self.idle_ticks[c].saturating_add(1);
                } else {
                    self.idle_ticks[c] = 0;
                    self.last_starts[c] = starts;
                }
                let allowed = (in_sync || self.resynced[w] & (1 << b) != 0) && needs_sync & (1 << b) == 0;
                let due = self.idle_ticks[c] >= self.clear_after_ticks || (now && count == 0);
                if allowed && due {
                    *mask |= 1 << b;
                }
            }
            if *mask == 0 {
                continue;
            }
            bm.on_disk[w].fetch_and(!*mask, Ordering::AcqRel);
            fence(Ordering::SeqCst);
            let mut bits = *mask;
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let c = w * 64 + b as usize;
                if bm.counters[c].load(Ordering::Acquire) & COUNT_MASK != 0 {
                    // A write marked it before the fence and may already be
                    // on its way to the members: the bit stays.
                    bm.on_disk[w].fetch_or(1 << b, Ordering::AcqRel);
                    *mask &= !(1 << b);
                }
                self.idle_ticks[c] = 0;
            }
            self.resynced[w] &= !*mask;
        }
        masks
    }
}

/// Clears bits past the last chunk (a loaded image never has them, but the
/// page words of a corrupted source must not create chunks).
fn mask_tail(words: &mut [u64], num_chunks: u64) {
    let full = (num_chunks / 64) as usize;
    let tail = num_chunks % 64;
    for (i, w) in words.iter_mut().enumerate() {
        if i > full || (i == full && tail == 0) {
            *w = 0;
        } else if i == full {
            *w &= (1u64 << tail) - 1;
        }
    }
}
