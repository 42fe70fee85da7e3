//! raid5: block-interleaved distributed parity in md's default
//! left-symmetric layout (`ALGORITHM_LEFT_SYMMETRIC`, drivers/md/raid5.c).
//! Stripe `s` has one chunk (`strip_size_kb`) on each of the `n` members at
//! member offset `s * chunk`: parity P on member `n - 1 - s % n`, then data
//! chunks 0, 1, … on the members after it, wrapping around. Array chunk
//! `c` is data chunk `c % (n - 1)` of stripe `c / (n - 1)`, so a stripe's
//! data is contiguous in the array. SPDK's `raid5f` is accepted as a name
//! for it (any write size here; raid5f refuses partial stripes).
//!
//! Writes hold whole stripes in the array's range table (`lock_range`),
//! so no two writes into one stripe compute parity from each other's
//! half-written data. A write covering whole stripes computes P from the
//! new data alone; any other write reconstructs: it reads the rows of the
//! stripe's other data chunks it does not write, then computes P from the
//! whole row range. That is correct whatever the old parity was, so a new
//! array needs no initial sync. Once a `bdev_raid_check` of the whole
//! array has left every parity right (`ArrayShared::redundancy_verified`),
//! a partial write that way would read more members than the rows it
//! replaces plus the parity does read-modify-write instead (P ^= old ^ new).
//! With a superblock that knowledge survives a restart (the superblock's
//! redundancy-verified flag, `RaidLevel::trusts_checked_redundancy`); a
//! check that finds wrong parity and leaves it drops it. Without one, a
//! new instance starts untrusted.
//!
//! Degraded (one member failed or missing): a read of the lost member's
//! chunk reads the same rows of every other member and XORs them (under
//! the stripe's lock, so it never sees a half-written stripe); a write
//! whose stripe lost a data member first reconstructs that member's old
//! rows from the others and the old parity, so the new parity also
//! carries the lost member's new data; a stripe that lost its parity
//! member gets its data only. A second failure fails IO: nothing wrong is
//! acknowledged.
//!
//! Each IO runs in rounds (`children_done`): reads, then writes. The
//! stripe rows it computes on live in one DMA buffer per IO from the
//! reactor's pool (`Ras::set_level_buf`), returned when it finishes; the
//! parity math is `parity::Parity` (SIMD). Nothing else is allocated per IO.
//!
//! A member added to a degraded array (`bdev_raid_add_base_bdev`) takes
//! every write at once (data and parity, never read) and is rebuilt window
//! by window, each window whole stripes held in the range table: its
//! chunk, data or parity, is the XOR of the same rows of the others.
//!
//! `bdev_raid_check` compares each stripe's parity with the XOR of its
//! data (md's `check`; `mismatched_blocks` counts parity blocks that
//! differ) and with `repair` rewrites the parity.
//!
//! With a superblock (`bdev_raid_create -s`; level code 95, SPDK's
//! RAID5F) the array core writes superblocks and a write-intent bitmap
//! and assembles the array at start-up, as for raid1. The bitmap marks
//! array blocks, so a bitmap chunk names data rows; every process range
//! widens to the whole stripes it touches (`lock_range`). A write marks its
//! array range and reaches no member, in any round, before its batch is on
//! disk (the core parks it in `mark` before `submit_rw`; the bits are
//! released in `finish`, after the last round). After an unclean shutdown
//! the resync (`plan_window`, every member a destination, none rebuilding)
//! rewrites P of each stripe of a dirty chunk from its data, and only
//! those; a returning member is rebuilt in the stripes of the chunks it
//! missed.
//!
//! Write hole (not closed yet): a crash in the middle of a partial-stripe
//! write can leave a stripe whose data and parity disagree. On a whole
//! array the resync makes P right again from the data; but if the array
//! is (or then becomes) degraded, the lost member's blocks of that stripe
//! are reconstructed from the inconsistent parity, so a crash during a
//! degraded partial-stripe write can corrupt *other* data in the stripe,
//! data that write never touched. md without a PPL or journal has the
//! same hole (it refuses to start a dirty degraded array unless told to);
//! here a dirty degraded array starts, its resync stops without writing
//! (`plan_window` returns None: nothing right to write) and its dirty bits
//! stay until the missing member is rebuilt. Closing it needs a partial
//! parity log in the member metadata area (md's PPL) or a journal.
//!
//! Removing a member leaves the array degraded.
//! Unmap and write zeroes are not advertised (`maps_unmap_to_members`).

use super::{LevelOp, RaidLevel};
use crate::channel::{MemberCh, Ras};
use crate::map::{DataLayout, Geometry, GeometryError, Loc, Placement};
use crate::rebuild::{WindowCopy, WindowJob};
use bdev::{DmaBuf, IoBox, IoError, IoFlags, IoStatus, IoType};
use parity::Parity;
use std::ops::Range;
use std::sync::atomic::Ordering;

pub(super) struct Raid5;

// Rounds of one array IO (`Ras::level_phase`).
/// Not started (or restarted after a member failed mid-way).
const START: u8 = 0;
/// A write reads the stripe rows it does not write.
const WRITE_READING: u8 = 1;
/// A write's data and parity are on their way to the members.
const WRITE_WRITING: u8 = 2;
/// A degraded read holds its stripes' range: map it now.
const READ_LOCKED: u8 = 3;
/// A read straight from the data members.
const READ_DIRECT: u8 = 4;
/// A read that also reconstructs extents of a lost member.
const READ_RECONSTRUCT: u8 = 5;

/// The shape numbers of an array's geometry.
#[derive(Clone, Copy)]
struct Shape {
    members: u64,
    /// Data chunks per stripe (`members - 1`).
    data: u64,
    chunk: u64,
    shift: u32,
}

impl Shape {
    fn of(geo: &Geometry) -> Shape {
        let members = geo.num_members() as u64;
        Shape { members, data: members - 1, chunk: geo.strip_size_blocks(), shift: geo.strip_shift() }
    }

    fn stripe_blocks(self) -> u64 {
        self.data * self.chunk
    }

    /// md left-symmetric: parity walks backwards from the last member.
    fn parity_member(self, stripe: u64) -> usize {
        (self.members - 1 - stripe % self.members) as usize
    }

    /// Data chunk `k` follows the parity member, wrapping around.
    fn data_member(self, stripe: u64, k: u64) -> usize {
        ((self.parity_member(stripe) as u64 + 1 + k) % self.members) as usize
    }

    /// Array block of row 0 of data chunk `k` of `stripe`.
    fn chunk_lba(self, stripe: u64, k: u64) -> u64 {
        stripe * self.stripe_blocks() + k * self.chunk
    }
}

/// The rows `[lo, hi)` of one stripe that a write touches (a write touches
/// one or two row ranges per stripe; parity over disjoint rows is
/// independent).
#[derive(Clone, Copy)]
struct Piece {
    stripe: u64,
    lo: u64,
    hi: u64,
}

impl Piece {
    fn rows(self) -> u64 {
        self.hi - self.lo
    }

    /// The rows of data chunk `k` that `[off, end)` writes (empty: lo == hi).
    fn covered(self, sh: Shape, off: u64, end: u64, k: u64) -> (u64, u64) {
        let base = sh.chunk_lba(self.stripe, k);
        let a = off.max(base + self.lo);
        let b = end.min(base + self.hi);
        if a >= b {
            (self.lo, self.lo)
        } else {
            (a - base, b - base)
        }
    }
}

/// Calls `f` with each piece of `[off, end)` in array order (no allocation).
fn for_each_piece(sh: Shape, off: u64, end: u64, mut f: impl FnMut(Piece)) {
    let sb = sh.stripe_blocks();
    let last = (end - 1) / sb;
    for stripe in off / sb..=last {
        let start = stripe * sb;
        let (a, b) = (off.max(start) - start, end.min(start + sb) - start);
        let (ka, la) = (a >> sh.shift, a & (sh.chunk - 1));
        let (kb, hb) = ((b - 1) >> sh.shift, ((b - 1) & (sh.chunk - 1)) + 1);
        if ka == kb {
            f(Piece { stripe, lo: la, hi: hb });
        } else if kb == ka + 1 && la > hb {
            // The end of one chunk and the start of the next: two row ranges.
            f(Piece { stripe, lo: 0, hi: hb });
            f(Piece { stripe, lo: la, hi: sh.chunk });
        } else {
            f(Piece { stripe, lo: 0, hi: sh.chunk });
        }
    }
}

/// How a piece of a write gets its parity.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Every data chunk's rows are written: P from the new data, no reads.
    Full,
    /// Read the rows not written, P from the whole rows.
    Reconstruct,
    /// Data member `k` is lost: read every other member's rows and the old
    /// parity, rebuild chunk `k`'s old rows, overlay the new data, P.
    LostData(u64),
    /// The parity member is lost: data only.
    LostParity,
    /// The old parity is trusted: read the written rows' old data and the
    /// parity rows, P ^= old ^ new (fewer reads on wide arrays).
    ReadModify,
}

/// A piece's kind and its blocks in the IO's stripe buffer: data rows
/// (`data * rows`), old parity (`rows`) and new parity (`rows`), or the
/// new parity alone (Full), or nothing (LostParity).
/// `down`: members not to read; a parity member that is down but takes
/// writes (being rebuilt) gets the parity computed without reading it.
fn kind_of(
    sh: Shape,
    p: Piece,
    off: u64,
    end: u64,
    down: &dyn Fn(usize) -> bool,
    no_write: &dyn Fn(usize) -> bool,
    trusted: bool,
) -> (Kind, u64) {
    let rows = p.rows();
    if no_write(sh.parity_member(p.stripe)) {
        return (Kind::LostParity, 0);
    }
    if let Some(k) = (0..sh.data).find(|&k| down(sh.data_member(p.stripe, k))) {
        return (Kind::LostData(k), (sh.data + 2) * rows);
    }
    let full = (0..sh.data).all(|k| p.covered(sh, off, end, k) == (p.lo, p.hi));
    if full {
        return (Kind::Full, rows);
    }
    // Read-modify-write when the old parity is known right and it reads
    // fewer member IOs: the written rows' old data and the parity, against
    // the rows not written of every data chunk.
    if trusted && !down(sh.parity_member(p.stripe)) {
        let (mut rcw, mut rmw) = (0u64, 1u64);
        for k in 0..sh.data {
            let (clo, chi) = p.covered(sh, off, end, k);
            if clo == chi {
                rcw += 1;
            } else {
                rmw += 1;
                rcw += u64::from(clo > p.lo) + u64::from(chi < p.hi);
            }
        }
        if rmw < rcw {
            return (Kind::ReadModify, (sh.data + 2) * rows);
        }
    }
    (Kind::Reconstruct, (sh.data + 2) * rows)
}

/// Member reads a piece needs before its parity can be computed:
/// `(member, member offset, blocks, block offset in the stripe buffer)`.
fn piece_reads(sh: Shape, p: Piece, kind: Kind, off: u64, end: u64, at: u64, mut f: impl FnMut(usize, u64, u64, u64)) {
    let rows = p.rows();
    let row0 = p.stripe * sh.chunk;
    match kind {
        Kind::Full | Kind::LostParity => {}
        Kind::Reconstruct => {
            for k in 0..sh.data {
                let m = sh.data_member(p.stripe, k);
                let (clo, chi) = p.covered(sh, off, end, k);
                let slot = at + k * rows;
                if clo == chi {
                    f(m, row0 + p.lo, rows, slot);
                    continue;
                }
                if clo > p.lo {
                    f(m, row0 + p.lo, clo - p.lo, slot);
                }
                if chi < p.hi {
                    f(m, row0 + chi, p.hi - chi, slot + (chi - p.lo));
                }
            }
        }
        Kind::ReadModify => {
            for k in 0..sh.data {
                let (clo, chi) = p.covered(sh, off, end, k);
                if clo < chi {
                    f(sh.data_member(p.stripe, k), row0 + clo, chi - clo, at + k * rows + (clo - p.lo));
                }
            }
            f(sh.parity_member(p.stripe), row0 + p.lo, rows, at + sh.data * rows);
        }
        Kind::LostData(lost) => {
            for k in (0..sh.data).filter(|&k| k != lost) {
                f(sh.data_member(p.stripe, k), row0 + p.lo, rows, at + k * rows);
            }
            f(sh.parity_member(p.stripe), row0 + p.lo, rows, at + sh.data * rows);
        }
    }
}

/// Slices of `buf` in blocks of `bs` bytes.
fn blocks(buf: &[u8], bs: u64, at: u64, n: u64) -> &[u8] {
    &buf[(at * bs) as usize..((at + n) * bs) as usize]
}

/// Everything an IO round needs, borrowed once.
struct Ctx<'a> {
    sh: Shape,
    members: std::cell::Ref<'a, Vec<MemberCh>>,
    failed: u32,
    /// The members the IO's plan reads nothing from (bit per slot): failed,
    /// missing, or being rebuilt (their old contents are not there yet).
    /// Fixed when the IO is planned: its stripe buffer is laid out for
    /// them, so a later round follows the same plan even if another member
    /// failed meanwhile (a write to that member then fails, and the
    /// parent's survival check decides; a read from it fails and the read
    /// is planned again).
    down_mask: u32,
    /// The members the IO's plan writes nothing to (failed or missing; a
    /// member being rebuilt takes every write, so it is exact behind the
    /// rebuild's window).
    no_write_mask: u32,
    /// Plan with read-modify-write where cheaper (the old parity is
    /// trusted: `ArrayShared::redundancy_verified`), fixed at plan time.
    trusted: bool,
    bs: u64,
}

impl<'a> Ctx<'a> {
    /// A context whose plan leaves out the members down now.
    fn planned(geo: &Geometry, ras: &'a Ras) -> Ctx<'a> {
        let members = ras.members.borrow();
        let failed = ras.shared.failed_mask.load(Ordering::Acquire);
        let mask = |f: &dyn Fn(usize) -> bool| (0..geo.num_members()).filter(|&m| f(m)).fold(0u32, |a, m| a | 1 << m);
        let down_mask = mask(&|m| !Ras::active(&members, failed, m));
        let no_write_mask = mask(&|m| !Ras::writable(&members, failed, m));
        let trusted = ras.shared.redundancy_verified.load(Ordering::Acquire);
        Ctx { sh: Shape::of(geo), members, failed, down_mask, no_write_mask, trusted, bs: ras.block_size.get() }
    }

    fn masks(&self) -> (u32, u32) {
        (self.down_mask, self.no_write_mask)
    }

    /// A context that follows the plan made for `slot`.
    fn following(geo: &Geometry, ras: &'a Ras, slot: u32) -> Ctx<'a> {
        let mut c = Ctx::planned(geo, ras);
        (c.down_mask, c.no_write_mask) = ras.level_plan_masks(slot);
        c.trusted = ras.level_plan_trusted(slot);
        c
    }

    fn down(&self, m: usize) -> bool {
        self.down_mask & (1 << m) != 0
    }

    fn can_write(&self, m: usize) -> bool {
        self.no_write_mask & (1 << m) == 0
    }

    fn down_count(&self) -> usize {
        self.down_mask.count_ones() as usize
    }
}

impl Raid5 {
    /// Starts (or restarts) a write: plan the reads, or go straight to the
    /// writes when every piece is full or lost its parity.
    fn start_write(&self, ras: &Ras, slot: u32) {
        let Some(((op, _), off, n, _)) = ras.parent_args(slot) else {
            return ras.impossible("a raid5 write to map is not parked");
        };
        if op != IoType::Write {
            // Not advertised (`maps_unmap_to_members`); the bdev layer checks.
            return ras.finish(slot, IoStatus::Failed(IoError::NotSupported));
        }
        let geo_ref = ras.geo.borrow();
        let Some(geo) = geo_ref.as_deref() else {
            drop(geo_ref);
            return ras.finish(slot, IoStatus::Failed(IoError::NoDevice));
        };
        let c = Ctx::planned(geo, ras);
        ras.set_level_plan_masks(slot, c.masks());
        ras.set_level_plan_trusted(slot, c.trusted);
        let end = off + n;
        let r = (|| {
            if c.down_count() > 1 {
                return Err(IoError::NoDevice);
            }
            let (mut scratch, mut reads) = (0u64, 0u32);
            for_each_piece(c.sh, off, end, |p| {
                let (kind, size) = kind_of(c.sh, p, off, end, &|m| c.down(m), &|m| !c.can_write(m), c.trusted);
                piece_reads(c.sh, p, kind, off, end, scratch, |_, _, _, _| reads += 1);
                scratch += size;
            });
            let buf = if scratch > 0 {
                let len = scratch * c.bs;
                if len > DmaBuf::MAX_LEN as u64 {
                    return Err(IoError::NoMemory);
                }
                Some(DmaBuf::alloc(len as usize).ok_or(IoError::NoMemory)?)
            } else {
                None
            };
            if reads > 0 && (IoBox::available() as u64) < reads as u64 {
                return Err(IoError::NoMemory);
            }
            Ok((buf, reads))
        })();
        let (buf, reads) = match r {
            Ok(x) => x,
            Err(e) => {
                drop((c, geo_ref));
                return ras.finish(slot, IoStatus::Failed(e));
            }
        };
        ras.set_level_buf(slot, buf.clone());
        if reads == 0 {
            drop((c, geo_ref));
            return self.write_data_and_parity(ras, slot);
        }
        ras.set_level_phase(slot, WRITE_READING);
        let Some(buf) = buf else {
            drop((c, geo_ref));
            return ras.finish(slot, IoStatus::Failed(IoError::NoMemory));
        };
        ras.expect_children(slot, reads, false);
        // Build every read before submitting any (a member may take
        // descriptors from this pool while it submits).
        let mut children = ras.take_scratch();
        let mut short = 0u32;
        let mut at = 0u64;
        for_each_piece(c.sh, off, end, |p| {
            let (kind, size) = kind_of(c.sh, p, off, end, &|m| c.down(m), &|m| !c.can_write(m), c.trusted);
            piece_reads(c.sh, p, kind, off, end, at, |m, moff, nb, bo| {
                let b = buf.slice((bo * c.bs) as usize, (nb * c.bs) as usize);
                let l = Loc { member: m as u16, offset_blocks: moff };
                match Ras::make_child(&c.members, slot, (IoType::Read, IoFlags::NONE), (l, Some(b)), nb, 0) {
                    Some(ch) => children.push(ch),
                    None => short += 1,
                }
            });
            at += size;
        });
        for child in children.drain(..) {
            ras.send_child(&c.members, child);
        }
        ras.put_scratch(children);
        drop((c, geo_ref));
        for _ in 0..short {
            // Counted out like a child that failed to start: the parent
            // fails once the others are back.
            ras.child_not_started(slot);
        }
    }

    /// Computes each piece's parity in the stripe buffer, then writes the
    /// new data and the parity (every member write carries the parent's
    /// flags: FUA reaches data and parity alike).
    fn write_data_and_parity(&self, ras: &Ras, slot: u32) {
        let Some(((op, flags), off, n, Some(data))) = ras.parent_args(slot) else {
            return ras.finish(slot, IoStatus::Failed(IoError::OutOfRange));
        };
        let geo_ref = ras.geo.borrow();
        let Some(geo) = geo_ref.as_deref() else {
            drop(geo_ref);
            return ras.finish(slot, IoStatus::Failed(IoError::NoDevice));
        };
        let c = Ctx::following(geo, ras, slot);
        let end = off + n;
        let scratch = ras.level_buf(slot);
        let parity = Parity::best();
        let bs = c.bs;
        let mut ok = true;
        let mut writes = 0u32;
        let mut at = 0u64;
        for_each_piece(c.sh, off, end, |p| {
            let (kind, size) = kind_of(c.sh, p, off, end, &|m| c.down(m), &|m| !c.can_write(m), c.trusted);
            let rows = p.rows();
            let rb = (rows * bs) as usize;
            let dd = c.sh.data;
            for k in 0..dd {
                let (clo, chi) = p.covered(c.sh, off, end, k);
                if clo < chi && c.can_write(c.sh.data_member(p.stripe, k)) {
                    writes += 1;
                }
            }
            if kind == Kind::LostParity {
                return;
            }
            writes += 1;
            let Some(sc) = scratch.as_ref() else {
                ok = false;
                return;
            };
            match kind {
                Kind::Full => {
                    let pout = sc.slice((at * bs) as usize, rb);
                    let r = data.with(|d| {
                        pout.with_mut(|po| {
                            let mut srcs: [&[u8]; crate::map::MAX_MEMBERS] = [&[]; crate::map::MAX_MEMBERS];
                            for k in 0..dd {
                                let first = c.sh.chunk_lba(p.stripe, k) + p.lo - off;
                                srcs[k as usize] = blocks(d, bs, first, rows);
                            }
                            parity.gen_p(&srcs[..dd as usize], po)
                        })
                    });
                    ok &= r.is_ok();
                }
                Kind::Reconstruct | Kind::LostData(_) => {
                    if let Kind::LostData(lost) = kind {
                        // The lost chunk's old rows: old P ^ the other old data.
                        let r = sc.with_mut(|s| {
                            let area = &mut s[(at * bs) as usize..((at + (dd + 2) * rows) * bs) as usize];
                            let (rows_in, pout) = area.split_at_mut(((dd + 1) * rows * bs) as usize);
                            let mut srcs: [&[u8]; crate::map::MAX_MEMBERS + 1] = [&[]; crate::map::MAX_MEMBERS + 1];
                            let mut count = 0;
                            for (i, src) in rows_in.chunks(rb).enumerate() {
                                if i as u64 != lost {
                                    srcs[count] = src;
                                    count += 1;
                                }
                            }
                            let r = parity.gen_p(&srcs[..count], pout);
                            rows_in[(lost * rows * bs) as usize..((lost + 1) * rows * bs) as usize]
                                .copy_from_slice(pout);
                            r
                        });
                        ok &= r.is_ok();
                    }
                    // The new data over the rows it writes.
                    for k in 0..dd {
                        let (clo, chi) = p.covered(c.sh, off, end, k);
                        if clo < chi {
                            let from = c.sh.chunk_lba(p.stripe, k) + clo - off;
                            let dst =
                                sc.slice(((at + k * rows + clo - p.lo) * bs) as usize, ((chi - clo) * bs) as usize);
                            let src = data.slice((from * bs) as usize, ((chi - clo) * bs) as usize);
                            DmaBuf::copy_between(&dst, &src, ((chi - clo) * bs) as usize);
                        }
                    }
                    let r = sc.with_mut(|s| {
                        let area = &mut s[(at * bs) as usize..((at + (dd + 2) * rows) * bs) as usize];
                        let (rows_in, rest) = area.split_at_mut((dd * rows * bs) as usize);
                        let pout = &mut rest[rb..2 * rb];
                        let mut srcs: [&[u8]; crate::map::MAX_MEMBERS] = [&[]; crate::map::MAX_MEMBERS];
                        for (i, src) in rows_in.chunks(rb).enumerate() {
                            srcs[i] = src;
                        }
                        parity.gen_p(&srcs[..dd as usize], pout)
                    });
                    ok &= r.is_ok();
                }
                Kind::ReadModify => {
                    let r = data.with(|d| {
                        sc.with_mut(|s| {
                            let area = &mut s[(at * bs) as usize..((at + (dd + 2) * rows) * bs) as usize];
                            let (rows_in, rest) = area.split_at_mut((dd * rows * bs) as usize);
                            let (old_p, pout) = rest.split_at_mut(rb);
                            pout.copy_from_slice(old_p);
                            for k in 0..dd {
                                let (clo, chi) = p.covered(c.sh, off, end, k);
                                if clo >= chi {
                                    continue;
                                }
                                let old = blocks(rows_in, bs, k * rows + clo - p.lo, chi - clo);
                                let new = blocks(d, bs, c.sh.chunk_lba(p.stripe, k) + clo - off, chi - clo);
                                let dst = &mut pout[((clo - p.lo) * bs) as usize..((chi - p.lo) * bs) as usize];
                                parity.update_p(dst, old, new)?;
                            }
                            Ok::<(), parity::ParityError>(())
                        })
                    });
                    ok &= r.is_ok();
                }
                Kind::LostParity => {}
            }
            at += size;
        });
        if !ok || writes == 0 {
            drop((c, geo_ref));
            let e = if ok { IoError::NoDevice } else { IoError::NoMemory };
            return ras.finish(slot, IoStatus::Failed(e));
        }
        if (IoBox::available() as u64) < writes as u64 {
            drop((c, geo_ref));
            return ras.finish(slot, IoStatus::Failed(IoError::NoMemory));
        }
        ras.set_level_phase(slot, WRITE_WRITING);
        // A member latched failed but not yet recorded gets no write: the
        // IO is acknowledged once the failure is on disk (as copy levels do).
        let unrecorded = c.failed & !ras.shared.recorded_mask.load(Ordering::Acquire);
        ras.expect_children(slot, writes, unrecorded != 0);
        let mut children = ras.take_scratch();
        let mut short = 0u32;
        let mut at = 0u64;
        for_each_piece(c.sh, off, end, |p| {
            let (kind, size) = kind_of(c.sh, p, off, end, &|m| c.down(m), &|m| !c.can_write(m), c.trusted);
            let rows = p.rows();
            let row0 = p.stripe * c.sh.chunk;
            let mut push = |l: Loc, b: DmaBuf, nb: u64| match Ras::make_child(
                &c.members,
                slot,
                (op, flags),
                (l, Some(b)),
                nb,
                0,
            ) {
                Some(ch) => children.push(ch),
                None => short += 1,
            };
            for k in 0..c.sh.data {
                let (clo, chi) = p.covered(c.sh, off, end, k);
                let m = c.sh.data_member(p.stripe, k);
                if clo < chi && c.can_write(m) {
                    let from = c.sh.chunk_lba(p.stripe, k) + clo - off;
                    let b = data.slice((from * bs) as usize, ((chi - clo) * bs) as usize);
                    push(Loc { member: m as u16, offset_blocks: row0 + clo }, b, chi - clo);
                }
            }
            if kind != Kind::LostParity {
                let pat = if kind == Kind::Full { at } else { at + (c.sh.data + 1) * rows };
                if let Some(sc) = scratch.as_ref() {
                    let b = sc.slice((pat * bs) as usize, (rows * bs) as usize);
                    push(Loc { member: c.sh.parity_member(p.stripe) as u16, offset_blocks: row0 + p.lo }, b, rows);
                }
            }
            at += size;
        });
        for child in children.drain(..) {
            ras.send_child(&c.members, child);
        }
        ras.put_scratch(children);
        drop((c, geo_ref));
        for _ in 0..short {
            // Counted out like a child that failed to start.
            ras.child_not_started(slot);
        }
    }

    /// A read: each extent from its data member, or, when that member is
    /// down, reconstructed from the same rows of every other member.
    fn start_read(&self, ras: &Ras, slot: u32) {
        let Some((_, off, n, Some(data))) = ras.parent_args(slot) else {
            return ras.finish(slot, IoStatus::Failed(IoError::OutOfRange));
        };
        let locked = ras.holds_lock(slot);
        let geo_ref = ras.geo.borrow();
        let Some(geo) = geo_ref.as_deref() else {
            drop(geo_ref);
            return ras.finish(slot, IoStatus::Failed(IoError::NoDevice));
        };
        let c = Ctx::planned(geo, ras);
        ras.set_level_plan_masks(slot, c.masks());
        let others = c.sh.members - 1;
        let (mut count, mut scratch) = (0u32, 0u64);
        for e in geo.extents(off, n) {
            let m = member_of(&e.placement);
            if c.down(m) {
                count += others as u32;
                scratch += others * e.num_blocks;
            } else {
                count += 1;
            }
        }
        let err = if c.down_count() > 1 {
            Some(IoError::NoDevice)
        } else if (IoBox::available() as u64) < count as u64 {
            Some(IoError::NoMemory)
        } else {
            None
        };
        if let Some(e) = err {
            drop((c, geo_ref));
            return ras.finish(slot, IoStatus::Failed(e));
        }
        if scratch > 0 && !locked && ras.shared.serialize.load(Ordering::Relaxed) {
            // Reconstruction reads a whole stripe row: hold the stripes, so no
            // write is half-way through them (then map again, `submit_rw`).
            drop((c, geo_ref));
            ras.set_level_phase(slot, READ_LOCKED);
            return ras.serialize(slot);
        }
        let buf = if scratch > 0 {
            match DmaBuf::alloc((scratch * c.bs) as usize).filter(|_| scratch * c.bs <= DmaBuf::MAX_LEN as u64) {
                Some(b) => Some(b),
                None => {
                    drop((c, geo_ref));
                    return ras.finish(slot, IoStatus::Failed(IoError::NoMemory));
                }
            }
        } else {
            None
        };
        ras.set_level_buf(slot, buf.clone());
        ras.set_level_phase(slot, if scratch > 0 { READ_RECONSTRUCT } else { READ_DIRECT });
        ras.expect_children(slot, count, false);
        let bs = c.bs;
        let mut children = ras.take_scratch();
        let mut short = 0u32;
        let mut at = 0u64;
        for e in geo.extents(off, n) {
            let m = member_of(&e.placement);
            let Some(l) = e.placement.on_member(m) else { continue };
            let mut push = |l: Loc, b: DmaBuf| match Ras::make_child(
                &c.members,
                slot,
                (IoType::Read, IoFlags::NONE),
                (l, Some(b)),
                e.num_blocks,
                0,
            ) {
                Some(ch) => children.push(ch),
                None => short += 1,
            };
            if !c.down(m) {
                push(l, data.slice((e.buf_offset_blocks * bs) as usize, (e.num_blocks * bs) as usize));
                continue;
            }
            let Some(sc) = buf.as_ref() else { continue };
            for other in (0..c.sh.members as usize).filter(|&o| o != m) {
                let b = sc.slice((at * bs) as usize, (e.num_blocks * bs) as usize);
                push(Loc { member: other as u16, offset_blocks: l.offset_blocks }, b);
                at += e.num_blocks;
            }
        }
        for child in children.drain(..) {
            ras.send_child(&c.members, child);
        }
        ras.put_scratch(children);
        drop((c, geo_ref));
        for _ in 0..short {
            // Counted out like a child that failed to start.
            ras.child_not_started(slot);
        }
    }

    /// XORs the other members' rows into each extent of the lost member.
    fn reconstruct_reads(&self, ras: &Ras, slot: u32) -> Result<(), IoError> {
        let (_, off, n, data) = ras.parent_args(slot).ok_or(IoError::NoDevice)?;
        let data = data.ok_or(IoError::OutOfRange)?;
        let sc = ras.level_buf(slot).ok_or(IoError::NoMemory)?;
        let geo_ref = ras.geo.borrow();
        let geo = geo_ref.as_deref().ok_or(IoError::NoDevice)?;
        let (down_mask, _) = ras.level_plan_masks(slot);
        let bs = ras.block_size.get();
        let others = geo.num_members() - 1;
        let parity = Parity::best();
        let mut at = 0u64;
        for e in geo.extents(off, n) {
            let m = member_of(&e.placement);
            if down_mask & (1 << m) == 0 {
                continue;
            }
            let nb = e.num_blocks;
            let dst = data.slice((e.buf_offset_blocks * bs) as usize, (nb * bs) as usize);
            sc.with(|s| {
                dst.with_mut(|d| {
                    let mut srcs: [&[u8]; crate::map::MAX_MEMBERS] = [&[]; crate::map::MAX_MEMBERS];
                    for (i, src) in srcs.iter_mut().enumerate().take(others) {
                        *src = blocks(s, bs, at + i as u64 * nb, nb);
                    }
                    // The lost chunk is the XOR of every other member's rows.
                    parity.gen_p(&srcs[..others], d)
                })
            })
            .map_err(|_| IoError::NoMemory)?;
            at += others as u64 * nb;
        }
        Ok(())
    }
}

/// The member of a raid5 placement (always one copy).
fn member_of(p: &Placement) -> usize {
    p.copies(1).next().map_or(usize::MAX, |l| l.member as usize)
}

impl RaidLevel for Raid5 {
    fn name(&self) -> &'static str {
        "raid5"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["5", "raid5f"]
    }
    fn superblock_code(&self) -> u8 {
        // SPDK's RAID5F (enum raid_level); on disk since superblocks came
        // to raid5: never change it.
        95
    }
    fn min_members(&self) -> usize {
        3
    }
    fn max_failed_members(&self, _num_members: usize) -> usize {
        1
    }
    fn uses_strips(&self) -> bool {
        true
    }

    fn layout(&self, strip_size_blocks: u64, member_blocks: &[u64]) -> Result<DataLayout, GeometryError> {
        let min = member_blocks.iter().copied().min().unwrap_or(0);
        let per = min / strip_size_blocks * strip_size_blocks;
        let data = member_blocks.len().saturating_sub(1) as u64;
        let array_blocks = per.checked_mul(data).ok_or(GeometryError::TooLarge)?;
        Ok(DataLayout { member_data_blocks: vec![per; member_blocks.len()], array_blocks, table: Vec::new() })
    }

    fn map(&self, geo: &Geometry, lba: u64) -> (Placement, u64) {
        let sh = Shape::of(geo);
        let c = lba >> sh.shift;
        let within = lba & (sh.chunk - 1);
        let (stripe, k) = (c / sh.data, c % sh.data);
        let at = Loc { member: sh.data_member(stripe, k) as u16, offset_blocks: stripe * sh.chunk + within };
        (Placement::one(at), sh.chunk - within)
    }

    fn copies_at(&self, geo: &Geometry, at: Loc) -> Option<Placement> {
        let sh = Shape::of(geo);
        let stripe = at.offset_blocks >> sh.shift;
        // A parity chunk holds no array data of its own.
        (sh.parity_member(stripe) != at.member as usize).then(|| Placement::one(at))
    }

    fn survives(&self, geo: &Geometry, lost: &dyn Fn(usize) -> bool) -> bool {
        (0..geo.num_members()).filter(|&m| lost(m)).count() <= 1
    }

    fn array_offset_is_member_offset(&self) -> bool {
        false
    }

    fn submit_rw(&self, ras: &Ras, slot: u32) {
        match ras.parent_args(slot) {
            Some(((IoType::Read, _), ..)) => self.start_read(ras, slot),
            Some(_) => self.start_write(ras, slot),
            None => ras.impossible("a raid5 IO to map is not parked"),
        }
    }

    /// A failed read child fails its round; `children_done` then maps the
    /// read again with the member down (reconstructing its extents).
    fn retry_read(&self, _ras: &Ras, child: IoBox) -> Result<(), IoBox> {
        Err(child)
    }

    /// Rebuild: each stripe of the window (whole stripes: the engine widens
    /// it with `lock_range`) rebuilds the target's chunk, data or parity
    /// alike, as the XOR of the same rows of every other member. None when
    /// one of those is not active (nothing to rebuild from).
    /// Check (md's `check`/`repair`): each stripe's parity is read and
    /// compared with the XOR of its data; `repair` rewrites the parity. A
    /// degraded array has nothing to compare: None.
    fn plan_window(&self, ras: &Ras, window: Range<u64>, job: WindowJob) -> Option<Vec<WindowCopy>> {
        let geo_ref = ras.geo.borrow();
        let geo = geo_ref.as_deref()?;
        let sh = Shape::of(geo);
        let members = ras.members.borrow();
        let failed = ras.shared.failed_mask.load(Ordering::Acquire);
        let sb = sh.stripe_blocks();
        let first = window.start / sb;
        let WindowJob::Repair { dests } = job else {
            if (0..members.len()).any(|m| !Ras::active(&members, failed, m)) {
                return None;
            }
            let mut out = Vec::new();
            for stripe in first..window.end.div_ceil(sb) {
                let at = |m: usize| Loc { member: m as u16, offset_blocks: stripe * sh.chunk };
                out.push(WindowCopy {
                    from: at(sh.parity_member(stripe)),
                    xor: (0..sh.data).map(|k| at(sh.data_member(stripe, k))).collect(),
                    to: Vec::new(),
                    num_blocks: sh.chunk,
                    buf_offset_blocks: (stripe - first) * sh.chunk,
                });
            }
            return Some(out);
        };
        // A member being rebuilt (new, or returning: its missed stripes)
        // gets its chunk from the others.
        let target = (0..members.len()).find(|&m| {
            dests & (1 << m) != 0 && Ras::writable(&members, failed, m) && !Ras::active(&members, failed, m)
        });
        let all = ((1u64 << members.len()) - 1) as u32;
        let Some(target) = target else {
            if dests & all != all {
                // A rebuild whose target is gone: nothing to write.
                return Some(Vec::new());
            }
            // The resync after an unclean shutdown (every member a
            // destination): the window's stripes may have data written
            // without its parity (or the reverse), so P is recomputed from
            // the data. Degraded, the lost member's data exists only
            // through that parity: there is nothing right to write (md
            // refuses to start a dirty degraded array); the resync stops
            // and the bits stay dirty until the member is rebuilt.
            if (0..members.len()).any(|m| !Ras::active(&members, failed, m)) {
                return None;
            }
            let mut out = Vec::new();
            for stripe in first..window.end.div_ceil(sb) {
                let at = |m: usize| Loc { member: m as u16, offset_blocks: stripe * sh.chunk };
                out.push(WindowCopy {
                    from: at(sh.data_member(stripe, 0)),
                    xor: (1..sh.data).map(|k| at(sh.data_member(stripe, k))).collect(),
                    to: vec![at(sh.parity_member(stripe))],
                    num_blocks: sh.chunk,
                    buf_offset_blocks: (stripe - first) * sh.chunk,
                });
            }
            return Some(out);
        };
        let sources: Vec<usize> = (0..members.len()).filter(|&m| m != target).collect();
        if sources.iter().any(|&m| !Ras::active(&members, failed, m)) {
            return None;
        }
        let mut out = Vec::new();
        for stripe in first..window.end.div_ceil(sb) {
            let at = |m: usize| Loc { member: m as u16, offset_blocks: stripe * sh.chunk };
            out.push(WindowCopy {
                from: at(sources[0]),
                xor: sources[1..].iter().map(|&m| at(m)).collect(),
                to: vec![at(target)],
                num_blocks: sh.chunk,
                buf_offset_blocks: (stripe - first) * sh.chunk,
            });
        }
        Some(out)
    }

    fn lock_range(&self, geo: &Geometry, offset_blocks: u64, num_blocks: u64) -> Range<u64> {
        let sb = Shape::of(geo).stripe_blocks();
        let start = offset_blocks / sb * sb;
        let end = (offset_blocks + num_blocks).div_ceil(sb) * sb;
        // (A zero-length IO, which the bdev layer does not pass, would still lock a block.)
        start..end.min(geo.array_blocks()).max(start + 1)
    }

    fn children_done(&self, ras: &Ras, slot: u32) -> bool {
        let (error, copy_failed) = ras.child_outcome(slot);
        match ras.level_phase(slot) {
            WRITE_READING => {
                if copy_failed {
                    // A member failed under the reads (now latched): plan the
                    // write again around it, or fail if that leaves too few.
                    ras.clear_child_error(slot);
                    ras.set_level_phase(slot, START);
                    ras.set_level_buf(slot, None);
                    self.start_write(ras, slot);
                    return true;
                }
                if error.is_some() {
                    return false;
                }
                self.write_data_and_parity(ras, slot);
                true
            }
            READ_DIRECT if error.is_some() => {
                // A member failed (the core latched it): read again around
                // it. Out of descriptors, or a second failure: the read fails.
                let failed = ras.shared.failed_mask.load(Ordering::Acquire);
                if matches!(error, Some(IoError::NoMemory | IoError::Aborted)) || failed.count_ones() > 1 {
                    return false;
                }
                ras.clear_child_error(slot);
                ras.set_level_phase(slot, START);
                ras.set_level_buf(slot, None);
                self.start_read(ras, slot);
                true
            }
            // A read that reconstructs lost one more member: fails.
            READ_RECONSTRUCT if error.is_some() => false,
            READ_RECONSTRUCT => {
                if let Err(e) = self.reconstruct_reads(ras, slot) {
                    ras.set_child_error(slot, e);
                }
                false
            }
            _ => false,
        }
    }

    fn maps_unmap_to_members(&self) -> bool {
        false
    }

    fn trusts_checked_redundancy(&self) -> bool {
        true
    }

    fn refuses(&self, op: LevelOp) -> Option<&'static str> {
        match op {
            // Superblock, bitmap and assembly are the array core's; the
            // level resyncs dirty stripes' parity (`plan_window`).
            LevelOp::Superblock => None,
            // A new member is rebuilt from the others (`plan_window`).
            LevelOp::AddMember => None,
            // The array runs degraded without it (reads reconstruct).
            LevelOp::RemoveMember => None,
            // Parity scrub and repair (`plan_window`).
            LevelOp::Check => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::level::named;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// A write's pieces cover each of its blocks exactly once, lie inside
        /// one stripe's rows, and a piece is `Full` exactly when it is a
        /// whole stripe; the reads a partial piece plans are exactly the rows
        /// of its data chunks the write leaves out.
        #[test]
        fn pieces_partition_a_write(n in 3usize..8, shift in 0u32..4, io in (any::<u64>(), 1u64..200)) {
            let chunk = 1u64 << shift;
            let geo = Geometry::new(named("raid5"), chunk, &vec![64 * chunk; n]).unwrap();
            let sh = Shape::of(&geo);
            let off = io.0 % geo.array_blocks();
            let end = off + io.1.min(geo.array_blocks() - off);
            let mut seen = vec![0u32; (end - off) as usize];
            for_each_piece(sh, off, end, |p| {
                assert!(p.lo < p.hi && p.hi <= chunk);
                let mut read = vec![false; (sh.data * p.rows()) as usize];
                let (kind, size) = kind_of(sh, p, off, end, &|_| false, &|_| false, false);
                piece_reads(sh, p, kind, off, end, 0, |m, moff, nb, at| {
                    let k = (0..sh.data).find(|&k| sh.data_member(p.stripe, k) == m).unwrap();
                    assert_eq!(at, k * p.rows() + (moff - p.stripe * chunk - p.lo));
                    for i in 0..nb {
                        assert!(!std::mem::replace(&mut read[(at + i) as usize], true), "a row read twice");
                    }
                });
                for k in 0..sh.data {
                    let (clo, chi) = p.covered(sh, off, end, k);
                    for r in p.lo..p.hi {
                        let written = r >= clo && r < chi;
                        if written {
                            seen[(sh.chunk_lba(p.stripe, k) + r - off) as usize] += 1;
                        }
                        if kind == Kind::Reconstruct {
                            assert_eq!(read[(k * p.rows() + r - p.lo) as usize], !written);
                        }
                    }
                }
                let whole = p.lo == 0 && p.hi == chunk && off <= p.stripe * sh.stripe_blocks()
                    && end >= (p.stripe + 1) * sh.stripe_blocks();
                assert_eq!(kind == Kind::Full, whole);
                assert_eq!(size, if whole { p.rows() } else { (sh.data + 2) * p.rows() });
            });
            prop_assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
        }
    }

    #[test]
    fn left_symmetric_parity_rotates_backwards() {
        // md, 4 members: P on 3, 2, 1, 0, 3, …; data starts after P.
        let geo = Geometry::new(named("raid5"), 8, &[64; 4]).unwrap();
        let sh = Shape::of(&geo);
        assert_eq!((0..5).map(|s| sh.parity_member(s)).collect::<Vec<_>>(), [3, 2, 1, 0, 3]);
        assert_eq!((0..3).map(|k| sh.data_member(1, k)).collect::<Vec<_>>(), [3, 0, 1]);
        assert_eq!(geo.array_blocks(), 3 * 64);
        assert_eq!(Raid5.lock_range(&geo, 25, 2), 24..48);
        assert_eq!(Raid5.lock_range(&geo, 0, 24), 0..24);
    }
}
