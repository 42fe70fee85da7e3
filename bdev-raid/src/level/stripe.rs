//! The engine of the parity levels, raid5 (P) and raid6 (P and Q): md's
//! left-symmetric stripe geometry, IO in rounds, degraded reads and
//! writes, and the process windows (rebuild, resync, check). A level is a
//! [`ParityLevel`] with one parity chunk per stripe or two; raid5.rs and
//! raid6.rs say what each is and how it behaves.
//!
//! Stripe `s` has one chunk on each of the `n` members at member offset
//! `s * chunk`: P on member `n - 1 - s % n`, Q (raid6) on the member after
//! P, then data chunks 0, 1, … on the members after the parity, wrapping
//! around. Array chunk `c` is data chunk `c % d` of stripe `c / d` (`d`
//! data chunks per stripe).
//!
//! The parity math works on *role slots*: the same rows of each chunk of
//! one stripe, data chunk `k` in slot `k`, P in slot `d`, Q in slot `d + 1`
//! ([`solve`] fills the slots not read from the others).

use super::{LevelOp, RaidLevel};
use crate::channel::{ArrayChannel, MemberChannel};
use crate::map::{DataLayout, Geometry, GeometryError, Loc, Placement, MAX_MEMBERS};
use crate::ppl::{self, PplLog, PplPiece};
use crate::rebuild::{WindowCopy, WindowJob};
use bdev::{DmaBuf, IoBox, IoError, IoFlags, IoStatus, IoType};
use parity::Parity;
use std::cell::{Cell, Ref, RefCell};
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A level with distributed parity (raid5: one parity chunk per stripe,
/// raid6: two).
pub(super) struct ParityLevel {
    pub(super) name: &'static str,
    pub(super) aliases: &'static [&'static str],
    /// The superblock's level byte; never changes once written.
    pub(super) superblock_code: u8,
    /// Parity chunks per stripe: 1 (P) or 2 (P and Q).
    pub(super) parities: u8,
}

// Rounds of one array IO (`ArrayChannel::level_phase`).
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
/// A write's partial parity log entries (raid5 with a superblock,
/// `crate::ppl`) are on their way to the parity members; its data and
/// parity go out once they are durable.
const WRITE_LOGGING: u8 = 6;
/// A write whose parity member had no free log slot waits for one
/// (`LogWait`); its parities are computed.
const WRITE_LOG_WAIT: u8 = 7;

/// The shape numbers of an array's geometry.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub(super) members: u64,
    /// Data chunks per stripe (`members - parities`).
    pub(super) data: u64,
    pub(super) parities: u64,
    pub(super) chunk: u64,
    pub(super) shift: u32,
}

impl Shape {
    pub(super) fn of(geo: &Geometry, parities: u8) -> Shape {
        let members = geo.num_members() as u64;
        let parities = u64::from(parities);
        Shape { members, data: members - parities, parities, chunk: geo.strip_size_blocks(), shift: geo.strip_shift() }
    }

    fn stripe_blocks(self) -> u64 {
        self.data * self.chunk
    }

    /// Role slots of a stripe: its data chunks and its parities.
    fn roles(self) -> u64 {
        self.members
    }

    /// md left-symmetric: P walks backwards from the last member.
    pub(super) fn parity_member(self, stripe: u64) -> usize {
        (self.members - 1 - stripe % self.members) as usize
    }

    /// Parity `j` (0: P, 1: Q): Q is on the member after P.
    pub(super) fn parity_j_member(self, stripe: u64, j: u64) -> usize {
        ((self.parity_member(stripe) as u64 + j) % self.members) as usize
    }

    /// Data chunk `k` follows the parities, wrapping around.
    pub(super) fn data_member(self, stripe: u64, k: u64) -> usize {
        ((self.parity_member(stripe) as u64 + self.parities + k) % self.members) as usize
    }

    /// The member holding role slot `r` of `stripe`.
    fn member_of_role(self, stripe: u64, r: u64) -> usize {
        if r < self.data {
            self.data_member(stripe, r)
        } else {
            self.parity_j_member(stripe, r - self.data)
        }
    }

    /// The role slot of member `m` in `stripe`.
    fn role_of(self, stripe: u64, m: usize) -> u64 {
        let rel = (m as u64 + self.members - self.parity_member(stripe) as u64) % self.members;
        if rel < self.parities {
            self.data + rel
        } else {
            rel - self.parities
        }
    }

    /// Array block of row 0 of data chunk `k` of `stripe`.
    fn chunk_lba(self, stripe: u64, k: u64) -> u64 {
        stripe * self.stripe_blocks() + k * self.chunk
    }

    /// The role slots (bit per slot) a read that reconstructs reads: those
    /// whose members are not in `down_mask`, but not Q when P and the other
    /// data chunks give the one lost data chunk back.
    fn read_roles(self, stripe: u64, down_mask: u32) -> u32 {
        let up = (0..self.roles())
            .filter(|&r| down_mask & (1 << self.member_of_role(stripe, r)) == 0)
            .fold(0u32, |a, r| a | 1 << r);
        let data_lost = (!up & ((1 << self.data) - 1)).count_ones();
        if self.parities == 2 && up & (1 << self.data) != 0 && data_lost == 1 {
            up & !(1 << (self.data + 1))
        } else {
            up
        }
    }
}

/// Fills every role slot of `rows` (`data + parities` slots of `len`
/// bytes: data chunks, P, Q) whose bit is clear in `known` from the others
/// (md's recovery cases: P, Q, P+Q, one data, data+P, data+Q, two data).
/// False when more slots are unknown than the parities can give back, or
/// the slots are not of one length.
pub(super) fn solve(parity: &Parity, data: usize, parities: usize, rows: &mut [u8], len: usize, known: u32) -> bool {
    let roles = data + parities;
    let unknown = !known & ((1u32 << roles) - 1);
    if unknown == 0 {
        return true;
    }
    if unknown.count_ones() as usize > parities || rows.len() != roles * len || len == 0 {
        return false;
    }
    let mut srcs: [&[u8]; MAX_MEMBERS] = [&[]; MAX_MEMBERS];
    let mut outs: [Option<(usize, &mut [u8])>; 2] = [None, None];
    for (r, slot) in rows.chunks_mut(len).enumerate() {
        if unknown & (1 << r) == 0 {
            srcs[r] = slot;
        } else if outs[0].is_none() {
            outs[0] = Some((r, slot));
        } else {
            outs[1] = Some((r, slot));
        }
    }
    let (p_role, q_role) = (data, data + 1);
    let (p, q) = (srcs[p_role], if parities > 1 { srcs[q_role] } else { &[][..] });
    let d = &srcs[..data];
    let r = match outs {
        // No data lost: the parities from the data.
        [Some((a, pa)), None] if a == p_role => parity.gen_p(d, pa),
        [Some((a, qa)), None] if a == q_role => parity.gen_q(d, qa),
        [Some((a, pa)), Some((_, qa))] if a == p_role => parity.gen_pq(d, pa, qa),
        // One data chunk lost.
        [Some((x, dx)), None] => parity.recover_data_from_p(d, x, p, dx),
        [Some((x, dx)), Some((b, pb))] if b == p_role => parity.recover_data_and_p(d, x, q, dx, pb),
        [Some((x, dx)), Some((b, qb))] if b == q_role => parity.recover_data_and_q(d, x, p, dx, qb),
        // Two data chunks lost.
        [Some((x, dx)), Some((y, dy))] => parity.recover_two_data(d, [x, y], p, q, [dx, dy]),
        _ => return false,
    };
    r.is_ok()
}

/// `sources[0] ^= sources[1] ^ …`: a parity that is the XOR of the others
/// (raid5's P, any raid6 chunk lost with nothing but one data chunk).
pub(crate) fn xor_sources(sources: &[DmaBuf]) -> bool {
    let Some((dst, rest)) = sources.split_first() else { return false };
    let parity = Parity::best();
    rest.iter().all(|src| dst.with_mut(|d| src.with(|s| parity.xor_into(d, &[s]))).is_ok())
}

/// The rows `[lo, hi)` of one stripe that a write touches (a write touches
/// one or two row ranges per stripe; parity over disjoint rows is
/// independent).
#[derive(Clone, Copy)]
pub(super) struct Piece {
    pub(super) stripe: u64,
    pub(super) lo: u64,
    pub(super) hi: u64,
}

impl Piece {
    pub(super) fn rows(self) -> u64 {
        self.hi - self.lo
    }

    /// The rows of data chunk `k` that `[off, end)` writes (empty: lo == hi).
    pub(super) fn covered(self, sh: Shape, off: u64, end: u64, k: u64) -> (u64, u64) {
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
pub(super) fn for_each_piece(sh: Shape, off: u64, end: u64, mut f: impl FnMut(Piece)) {
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
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kind {
    /// Every data chunk's rows are written: the parities from the new data,
    /// no reads.
    Full,
    /// Read the rows not written, the parities from the whole rows.
    Reconstruct,
    /// A data member is lost: read the rows of every role slot in `known`
    /// (bit per slot), give the lost ones back ([`solve`]), overlay the new
    /// data, the parities.
    Degraded { known: u32 },
    /// No parity member takes writes: data only.
    LostParity,
    /// The old parities are trusted: read the written rows' old data and
    /// the parity rows, P ^= old ^ new (and Q ^= g^k · (old ^ new)); fewer
    /// reads on wide arrays.
    ReadModify,
}

/// A piece's kind and its blocks in the IO's stripe buffer: the role slots
/// (`data + parities` slots of `rows`: data, then the old parities) and the
/// new parities (`parities * rows`); or the new parities alone (Full), or
/// nothing (LostParity).
/// `down`: members not to read; a parity member that is down but takes
/// writes (being rebuilt) gets its parity computed without reading it.
pub(super) fn kind_of(
    sh: Shape,
    p: Piece,
    off: u64,
    end: u64,
    down: impl Fn(usize) -> bool,
    no_write: impl Fn(usize) -> bool,
    trusted: bool,
) -> (Kind, u64) {
    let rows = p.rows();
    let slots = (sh.roles() + sh.parities) * rows;
    if (0..sh.parities).all(|j| no_write(sh.parity_j_member(p.stripe, j))) {
        return (Kind::LostParity, 0);
    }
    if (0..sh.data).any(|k| down(sh.data_member(p.stripe, k))) {
        let known = (0..sh.roles()).filter(|&r| !down(sh.member_of_role(p.stripe, r))).fold(0, |a, r| a | 1 << r);
        return (Kind::Degraded { known }, slots);
    }
    let full = (0..sh.data).all(|k| p.covered(sh, off, end, k) == (p.lo, p.hi));
    if full {
        return (Kind::Full, sh.parities * rows);
    }
    // Read-modify-write when the old parities are known right and it
    // reads fewer member IOs: the written rows' old data and the parities,
    // against the rows not written of every data chunk.
    if trusted && (0..sh.parities).all(|j| !down(sh.parity_j_member(p.stripe, j))) {
        let (mut rcw, mut rmw) = (0u64, sh.parities);
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
            return (Kind::ReadModify, slots);
        }
    }
    (Kind::Reconstruct, slots)
}

/// Member reads a piece needs before its parity can be computed:
/// `(member, member offset, blocks, block offset in the stripe buffer)`.
pub(super) fn piece_reads(
    sh: Shape,
    p: Piece,
    kind: Kind,
    off: u64,
    end: u64,
    at: u64,
    mut f: impl FnMut(usize, u64, u64, u64),
) {
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
            for j in 0..sh.parities {
                f(sh.parity_j_member(p.stripe, j), row0 + p.lo, rows, at + (sh.data + j) * rows);
            }
        }
        Kind::Degraded { known } => {
            for r in (0..sh.roles()).filter(|&r| known & (1 << r) != 0) {
                f(sh.member_of_role(p.stripe, r), row0 + p.lo, rows, at + r * rows);
            }
        }
    }
}

/// Slices of `buf` in blocks of `bs` bytes.
fn blocks(buf: &[u8], bs: u64, at: u64, n: u64) -> &[u8] {
    &buf[(at * bs) as usize..((at + n) * bs) as usize]
}

/// The parities of `data` (slices of one length) into `out`, `parities`
/// slots of that length: P, then Q.
fn gen_parities(parity: &Parity, data: &[&[u8]], out: &mut [u8]) -> bool {
    let len = data.first().map_or(0, |d| d.len());
    if out.len() == len {
        return parity.gen_p(data, out).is_ok();
    }
    let (p, q) = out.split_at_mut(len);
    parity.gen_pq(data, p, q).is_ok()
}

/// Whether a write of `[off, off + n)` may update parity in place. With a
/// bitmap that knows which chunks were written (md's llbitmap states),
/// only when every chunk of the stripes it touches was written and had its
/// parity computed from its data since (`bitmap::Bitmap::range_trusted`):
/// a chunk never written has parity of whatever the members held, and a
/// chunk whose first write was partial has right parity only in the rows
/// it wrote until the sync pass (`rebuild`) computed the rest; a
/// whole-array check vouches for neither (it skips unwritten chunks).
/// Without one (a version 1 bitmap, or none): only once a whole-array check
/// verified every parity (`verified`, `ArrayShared::redundancy_verified`).
/// Decided when the write is planned; a stripe never becomes untrusted
/// while a write holds it (only the sync pass, holding the stripe, makes it
/// trusted, and never while the write runs: it waits for the stripe).
fn write_trusted(channel: &ArrayChannel, sh: Shape, geo: &Geometry, off: u64, n: u64, verified: bool) -> bool {
    let bm = channel.bitmap_ref();
    match bm.as_deref() {
        Some(bm) if bm.tracks_written() => {
            let sb = sh.stripe_blocks();
            let start = off / sb * sb;
            let end = (off + n).div_ceil(sb).saturating_mul(sb).min(geo.array_blocks());
            end > start && bm.range_trusted(start, end - start)
        }
        _ => verified,
    }
}

/// The array's geometry, borrowed; or, without one, the IO in `slot`
/// finishes (no device).
fn geometry_or_finish(channel: &ArrayChannel, slot: u32) -> Option<Ref<'_, Geometry>> {
    match Ref::filter_map(channel.geo.borrow(), |g| g.as_deref()) {
        Ok(geo) => Some(geo),
        Err(none) => {
            drop(none);
            channel.finish(slot, IoStatus::Failed(IoError::NoDevice));
            None
        }
    }
}

/// Everything an IO round needs, borrowed once.
struct Ctx<'a> {
    sh: Shape,
    members: Ref<'a, Vec<MemberChannel>>,
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
    /// trusted: see [`write_trusted`]), fixed at plan time.
    trusted: bool,
    bs: u64,
}

impl<'a> Ctx<'a> {
    /// A context whose plan leaves out the members down now.
    fn planned(geo: &Geometry, parities: u8, channel: &'a ArrayChannel) -> Ctx<'a> {
        let members = channel.members.borrow();
        let failed = channel.shared.failed_mask.load(Ordering::Acquire);
        let (mut down_mask, mut no_write_mask) = (0u32, 0u32);
        for m in 0..geo.num_members() {
            down_mask |= u32::from(!ArrayChannel::active(&members, failed, m)) << m;
            no_write_mask |= u32::from(!ArrayChannel::writable(&members, failed, m)) << m;
        }
        let trusted = channel.shared.redundancy_verified.load(Ordering::Acquire);
        let sh = Shape::of(geo, parities);
        Ctx { sh, members, failed, down_mask, no_write_mask, trusted, bs: channel.block_size.get() }
    }

    /// A context planned now, its plan recorded for `slot`'s later rounds.
    fn recorded(geo: &Geometry, parities: u8, channel: &'a ArrayChannel, slot: u32) -> Ctx<'a> {
        let mut c = Ctx::planned(geo, parities, channel);
        if let Some(((IoType::Write, _), off, n)) = channel.parent_range(slot) {
            c.trusted = write_trusted(channel, c.sh, geo, off, n, c.trusted);
        }
        channel.set_level_plan_masks(slot, (c.down_mask, c.no_write_mask));
        channel.set_level_plan_trusted(slot, c.trusted);
        c
    }

    /// A context that follows the plan made for `slot`.
    fn following(geo: &Geometry, parities: u8, channel: &'a ArrayChannel, slot: u32) -> Ctx<'a> {
        let mut c = Ctx::planned(geo, parities, channel);
        (c.down_mask, c.no_write_mask) = channel.level_plan_masks(slot);
        c.trusted = channel.level_plan_trusted(slot);
        c
    }

    fn down(&self, m: usize) -> bool {
        self.down_mask & (1 << m) != 0
    }

    fn can_write(&self, m: usize) -> bool {
        self.no_write_mask & (1 << m) == 0
    }

    /// More members down than the parities give back.
    fn too_many_down(&self) -> bool {
        u64::from(self.down_mask.count_ones()) > self.sh.parities
    }

    fn kind_of(&self, p: Piece, off: u64, end: u64) -> (Kind, u64) {
        if self.down_mask == 0 && self.no_write_mask == 0 {
            // Every member up (the common case): no member to map.
            return kind_of(self.sh, p, off, end, |_| false, |_| false, self.trusted);
        }
        kind_of(self.sh, p, off, end, |m| self.down(m), |m| !self.can_write(m), self.trusted)
    }
}

/// What a stripe of a write puts in the partial parity log.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LogOp {
    /// Nothing (the parity member takes no writes, or a whole stripe whose
    /// slot holds no older entry).
    None,
    /// An entry: the write changes the stripe in part.
    Entry,
    /// A whole-stripe write over a stripe whose slot holds an older entry:
    /// its header is overwritten with zeros first (`crate::ppl`).
    Wipe,
}

/// Calls `f(stripe, pieces)` once per stripe of `[off, end)` with its
/// pieces (one, or two row ranges), each with its kind and the block of
/// the stripe buffer its area starts at. No allocation.
fn for_each_stripe(c: &Ctx<'_>, off: u64, end: u64, mut f: impl FnMut(u64, &[(Piece, Kind, u64)])) {
    let none = (Piece { stripe: 0, lo: 0, hi: 0 }, Kind::Full, 0);
    let (mut cur, mut n, mut at) = ([none; 2], 0usize, 0u64);
    for_each_piece(c.sh, off, end, |p| {
        let (kind, size) = c.kind_of(p, off, end);
        if n > 0 && cur[0].0.stripe != p.stripe {
            f(cur[0].0.stripe, &cur[..n]);
            n = 0;
        }
        if n < cur.len() {
            cur[n] = (p, kind, at);
            n += 1;
        }
        at += size;
    });
    if n > 0 {
        f(cur[0].0.stripe, &cur[..n]);
    }
}

/// What `stripe` (its `pieces`) logs now.
fn log_op(c: &Ctx<'_>, stripe: u64, pieces: &[(Piece, Kind, u64)], log: &PplLog) -> LogOp {
    let pm = c.sh.parity_member(stripe);
    if !c.can_write(pm) || pieces.iter().any(|x| x.1 == Kind::LostParity) {
        return LogOp::None;
    }
    match pieces {
        [(_, Kind::Full, _)] if log.holds(pm, stripe) => LogOp::Wipe,
        [(_, Kind::Full, _)] => LogOp::None,
        _ => LogOp::Entry,
    }
}

/// Blocks of the stripe buffer reserved for `pieces`' log write: a header
/// and the partial parity rows, or a header to wipe with (a whole stripe).
fn log_area_blocks(c: &Ctx<'_>, pieces: &[(Piece, Kind, u64)], log: &PplLog) -> u64 {
    let pm = pieces.first().map(|x| c.sh.parity_member(x.0.stripe));
    if pm.is_none_or(|pm| !c.can_write(pm)) || pieces.iter().any(|x| x.1 == Kind::LostParity) {
        return 0;
    }
    match pieces {
        [(_, Kind::Full, _)] => log.header_blocks,
        _ => log.header_blocks + pieces.iter().map(|x| x.0.rows()).sum::<u64>(),
    }
}

/// `dst ^= src` (slices of one length).
fn xor_rows(dst: &mut [u8], src: &[u8]) {
    let r = Parity::best().xor_into(dst, &[src]);
    debug_assert!(r.is_ok(), "partial parity rows of different lengths");
}

/// How a write's log round started.
enum LogStart {
    /// Nothing to log: the member writes go now.
    Nothing,
    /// The log writes are on their way (`WRITE_LOGGING`).
    Sent,
    /// A parity member had no free slot: the write waits (`LogWait`).
    NoSlot,
    Failed(IoError),
}

/// The data and parity member writes of a write (no allocation).
fn count_writes(c: &Ctx<'_>, off: u64, end: u64) -> u32 {
    let mut writes = 0u32;
    for_each_piece(c.sh, off, end, |p| {
        let (kind, _) = c.kind_of(p, off, end);
        for k in 0..c.sh.data {
            let (clo, chi) = p.covered(c.sh, off, end, k);
            if clo < chi && c.can_write(c.sh.data_member(p.stripe, k)) {
                writes += 1;
            }
        }
        if kind != Kind::LostParity {
            writes += (0..c.sh.parities).filter(|&j| c.can_write(c.sh.parity_j_member(p.stripe, j))).count() as u32;
        }
    });
    writes
}

/// This reactor's writes waiting for a free log slot: (array key, parent
/// slot), oldest first. Slots are freed by writes already sent (on any
/// reactor), so every waiter gets one; a timed poller tries them while any
/// wait (it is registered when the first arrives: the slow path).
#[derive(Default)]
struct LogWait {
    waiting: RefCell<VecDeque<(u32, u32)>>,
    armed: Cell<bool>,
}

/// How often waiting writes look for a free log slot.
const LOG_WAIT_PERIOD: Duration = Duration::from_micros(200);

impl LogWait {
    fn enqueue(channel: &ArrayChannel, slot: u32) {
        let w = reactor::local::<LogWait>();
        w.waiting.borrow_mut().push_back((channel.shared.key, slot));
        if !w.armed.replace(true) {
            reactor::register_timed_poller("raid5_log_slot_wait", LOG_WAIT_PERIOD, LogWait::poll);
        }
    }

    fn poll() -> reactor::PollStatus {
        let w = reactor::local::<LogWait>();
        let n = w.waiting.borrow().len();
        for _ in 0..n {
            let Some((key, slot)) = w.waiting.borrow_mut().pop_front() else { break };
            let Some(channel) = crate::channel::find_channel(key) else { continue };
            // Only raid5 keeps a log (`keeps_partial_parity_log`).
            let level = ParityLevel { name: "", aliases: &[], superblock_code: 0, parities: 1 };
            level.retry_log(&channel, slot);
        }
        if w.waiting.borrow().is_empty() {
            w.armed.set(false);
            return reactor::PollStatus::Done;
        }
        reactor::PollStatus::Idle
    }
}

impl ParityLevel {
    fn shape(&self, geo: &Geometry) -> Shape {
        Shape::of(geo, self.parities)
    }

    /// Starts (or restarts) a write: plan the reads, or go straight to the
    /// writes when every piece is full or lost its parities.
    fn start_write(&self, channel: &ArrayChannel, slot: u32) {
        let Some(((op, _), off, n)) = channel.parent_range(slot) else {
            return channel.impossible("a parity-level write to map is not parked");
        };
        if op != IoType::Write {
            // Not advertised (`maps_unmap_to_members`); the bdev layer checks.
            return channel.finish(slot, IoStatus::Failed(IoError::NotSupported));
        }
        let Some(geo_ref) = geometry_or_finish(channel, slot) else { return };
        let c = Ctx::recorded(&geo_ref, self.parities, channel, slot);
        let end = off + n;
        let r = (|| {
            if c.too_many_down() {
                return Err(IoError::NoDevice);
            }
            let (mut scratch, mut reads) = (0u64, 0u32);
            for_each_piece(c.sh, off, end, |p| {
                let (kind, size) = c.kind_of(p, off, end);
                piece_reads(c.sh, p, kind, off, end, scratch, |_, _, _, _| reads += 1);
                scratch += size;
            });
            if let Some(log) = self.log(channel) {
                for_each_stripe(&c, off, end, |_, pieces| scratch += log_area_blocks(&c, pieces, log));
            }
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
                return channel.finish(slot, IoStatus::Failed(e));
            }
        };
        channel.set_level_buf(slot, buf.clone());
        if reads == 0 {
            drop((c, geo_ref));
            return self.write_data_and_parity(channel, slot);
        }
        channel.set_level_phase(slot, WRITE_READING);
        let Some(buf) = buf else {
            drop((c, geo_ref));
            return channel.finish(slot, IoStatus::Failed(IoError::NoMemory));
        };
        channel.expect_children(slot, reads, false);
        // Build every read before submitting any (a member may take
        // descriptors from this pool while it submits).
        let mut children = channel.take_scratch();
        let mut short = 0u32;
        let mut at = 0u64;
        for_each_piece(c.sh, off, end, |p| {
            let (kind, size) = c.kind_of(p, off, end);
            piece_reads(c.sh, p, kind, off, end, at, |m, moff, nb, bo| {
                let b = buf.slice((bo * c.bs) as usize, (nb * c.bs) as usize);
                let l = Loc { member: m as u16, offset_blocks: moff };
                match ArrayChannel::make_child(&c.members, slot, (IoType::Read, IoFlags::NONE), (l, Some(b)), nb, 0) {
                    Some(ch) => children.push(ch),
                    None => short += 1,
                }
            });
            at += size;
        });
        self.send_children(channel, slot, children, short, (c, geo_ref));
    }

    /// Sends the children built for `slot`, then counts out those that
    /// could not be built (like a child that failed to start: the parent
    /// fails once the others are back). `held`: the borrows to drop first.
    fn send_children<H>(
        &self,
        channel: &ArrayChannel,
        slot: u32,
        mut children: Vec<IoBox>,
        short: u32,
        held: (Ctx<'_>, H),
    ) {
        for child in children.drain(..) {
            channel.send_child(&held.0.members, child);
        }
        channel.put_scratch(children);
        drop(held);
        for _ in 0..short {
            channel.child_not_started(slot);
        }
    }

    /// Computes each piece's parities in the stripe buffer, then writes
    /// the new data and the parities (every member write carries the
    /// parent's flags: FUA reaches data and parity alike).
    fn write_data_and_parity(&self, channel: &ArrayChannel, slot: u32) {
        let Some((_, off, n, Some(data))) = channel.parent_args(slot) else {
            return channel.finish(slot, IoStatus::Failed(IoError::OutOfRange));
        };
        let Some(geo_ref) = geometry_or_finish(channel, slot) else { return };
        let c = Ctx::following(&geo_ref, self.parities, channel, slot);
        let end = off + n;
        let scratch = channel.level_buf(slot);
        let parity = Parity::best();
        let bs = c.bs;
        let (dd, roles) = (c.sh.data, c.sh.roles());
        let mut ok = true;
        let mut writes = 0u32;
        let mut at = 0u64;
        for_each_piece(c.sh, off, end, |p| {
            let (kind, size) = c.kind_of(p, off, end);
            let rows = p.rows();
            let rb = (rows * bs) as usize;
            for k in 0..dd {
                let (clo, chi) = p.covered(c.sh, off, end, k);
                if clo < chi && c.can_write(c.sh.data_member(p.stripe, k)) {
                    writes += 1;
                }
            }
            if kind == Kind::LostParity {
                return;
            }
            writes += (0..c.sh.parities).filter(|&j| c.can_write(c.sh.parity_j_member(p.stripe, j))).count() as u32;
            let Some(sc) = scratch.as_ref() else {
                ok = false;
                return;
            };
            match kind {
                Kind::Full => {
                    let pout = sc.slice((at * bs) as usize, c.sh.parities as usize * rb);
                    ok &= data.with(|d| {
                        pout.with_mut(|po| {
                            let mut srcs: [&[u8]; MAX_MEMBERS] = [&[]; MAX_MEMBERS];
                            for k in 0..dd {
                                let first = c.sh.chunk_lba(p.stripe, k) + p.lo - off;
                                srcs[k as usize] = blocks(d, bs, first, rows);
                            }
                            gen_parities(&parity, &srcs[..dd as usize], po)
                        })
                    });
                }
                Kind::Reconstruct | Kind::Degraded { .. } => {
                    if let Kind::Degraded { known } = kind {
                        // The lost chunks' old rows, from the others and
                        // the old parities.
                        let area = sc.slice((at * bs) as usize, roles as usize * rb);
                        ok &= area.with_mut(|s| solve(&parity, dd as usize, c.sh.parities as usize, s, rb, known));
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
                    ok &= sc.with_mut(|s| {
                        let area = &mut s[(at * bs) as usize..((at + size) * bs) as usize];
                        let (rows_in, rest) = area.split_at_mut(dd as usize * rb);
                        let pout = &mut rest[c.sh.parities as usize * rb..];
                        let mut srcs: [&[u8]; MAX_MEMBERS] = [&[]; MAX_MEMBERS];
                        for (i, src) in rows_in.chunks(rb).enumerate() {
                            srcs[i] = src;
                        }
                        gen_parities(&parity, &srcs[..dd as usize], pout)
                    });
                }
                Kind::ReadModify => {
                    let r = data.with(|d| {
                        sc.with_mut(|s| {
                            let area = &mut s[(at * bs) as usize..((at + size) * bs) as usize];
                            let (rows_in, rest) = area.split_at_mut(dd as usize * rb);
                            let (old, new) = rest.split_at_mut(c.sh.parities as usize * rb);
                            // One data chunk written whole (a small write):
                            // P' = P ^ old ^ new in one pass, P not copied first.
                            if c.sh.parities == 1 {
                                let mut covered = (0..dd).filter(|&k| {
                                    let (clo, chi) = p.covered(c.sh, off, end, k);
                                    clo < chi
                                });
                                if let (Some(k), None) = (covered.next(), covered.next()) {
                                    if p.covered(c.sh, off, end, k) == (p.lo, p.hi) {
                                        let old_d = blocks(rows_in, bs, k * rows, rows);
                                        let new_d = blocks(d, bs, c.sh.chunk_lba(p.stripe, k) + p.lo - off, rows);
                                        return parity.gen_p(&[&*old, old_d, new_d], new);
                                    }
                                }
                            }
                            new.copy_from_slice(old);
                            let (pout, qout) = new.split_at_mut(rb);
                            for k in 0..dd {
                                let (clo, chi) = p.covered(c.sh, off, end, k);
                                if clo >= chi {
                                    continue;
                                }
                                let old = blocks(rows_in, bs, k * rows + clo - p.lo, chi - clo);
                                let new = blocks(d, bs, c.sh.chunk_lba(p.stripe, k) + clo - off, chi - clo);
                                let span = ((clo - p.lo) * bs) as usize..((chi - p.lo) * bs) as usize;
                                if c.sh.parities == 1 {
                                    parity.update_p(&mut pout[span], old, new)?;
                                } else {
                                    parity.update_pq(k as usize, old, new, &mut pout[span.clone()], &mut qout[span])?;
                                }
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
            return channel.finish(slot, IoStatus::Failed(e));
        }
        if (IoBox::available() as u64) < writes as u64 {
            drop((c, geo_ref));
            return channel.finish(slot, IoStatus::Failed(IoError::NoMemory));
        }
        // `at` is now the end of the pieces' blocks: the log entries follow.
        self.log_then_write(channel, slot, (c, geo_ref), at, writes);
    }

    /// Sends `slot`'s log writes, or, with nothing to log, its member
    /// writes; waits for a log slot when its parity member has none free.
    fn log_then_write(
        &self,
        channel: &ArrayChannel,
        slot: u32,
        (c, geo_ref): (Ctx<'_>, Ref<'_, Geometry>),
        log_at: u64,
        writes: u32,
    ) {
        let Some((_, off, n)) = channel.parent_range(slot) else {
            drop((c, geo_ref));
            return channel.impossible("a parity-level write to log is not parked");
        };
        let mut started = self.write_log(channel, slot, &c, (off, off + n), log_at);
        // Slots wait for a flush of the members' caches (`ppl`): none to
        // flush, and they are free now.
        if matches!(started, LogStart::NoSlot)
            && self.log(channel).is_some_and(|l| l.flush_before_reuse(channel.shared.key, &c.members, c.failed))
        {
            started = self.write_log(channel, slot, &c, (off, off + n), log_at);
        }
        match started {
            LogStart::Nothing => self.write_members(channel, slot, (c, geo_ref), writes),
            LogStart::Sent => {}
            LogStart::NoSlot => {
                drop((c, geo_ref));
                channel.set_level_phase(slot, WRITE_LOG_WAIT);
                LogWait::enqueue(channel, slot);
            }
            LogStart::Failed(e) => {
                drop((c, geo_ref));
                channel.finish(slot, IoStatus::Failed(e));
            }
        }
    }

    /// A write that waited for a log slot tries again (`LogWait`).
    fn retry_log(&self, channel: &ArrayChannel, slot: u32) {
        if channel.level_phase(slot) != WRITE_LOG_WAIT {
            return channel.impossible("a write waiting for a log slot is not waiting");
        }
        let Some((_, off, n)) = channel.parent_range(slot) else {
            return channel.impossible("a write waiting for a log slot is not parked");
        };
        let Some(geo_ref) = geometry_or_finish(channel, slot) else { return };
        let c = Ctx::following(&geo_ref, self.parities, channel, slot);
        let end = off + n;
        let mut log_at = 0u64;
        for_each_piece(c.sh, off, end, |p| log_at += c.kind_of(p, off, end).1);
        let writes = count_writes(&c, off, end);
        self.log_then_write(channel, slot, (c, geo_ref), log_at, writes);
    }

    /// The log entries are durable: the data and parity computed for
    /// `slot` go to the members.
    fn resume_after_log(&self, channel: &ArrayChannel, slot: u32) {
        let Some((_, off, n)) = channel.parent_range(slot) else {
            return channel.impossible("a logged parity-level write is not parked");
        };
        let Some(geo_ref) = geometry_or_finish(channel, slot) else { return };
        let c = Ctx::following(&geo_ref, self.parities, channel, slot);
        let writes = count_writes(&c, off, off + n);
        if writes == 0 || (IoBox::available() as u64) < writes as u64 {
            drop((c, geo_ref));
            self.release_log(channel, slot);
            return channel.finish(slot, IoStatus::Failed(IoError::NoMemory));
        }
        self.write_members(channel, slot, (c, geo_ref), writes);
    }

    /// The log of the array (raid5 with a superblock), None without one.
    fn log<'r>(&self, channel: &'r ArrayChannel) -> Option<&'r PplLog> {
        if self.parities != 1 || channel.shared.ppl_off.load(Ordering::Relaxed) {
            return None;
        }
        channel.shared.ppl.get().map(|l| &**l)
    }

    /// Builds and sends the log writes of `slot`'s write (its pieces'
    /// parities are computed; `log_at`: the first block of the log area in
    /// its stripe buffer): an entry per stripe the write changes in part, a
    /// header wipe per whole stripe whose slot still holds an older entry.
    fn write_log(
        &self,
        channel: &ArrayChannel,
        slot: u32,
        c: &Ctx<'_>,
        (off, end): (u64, u64),
        log_at: u64,
    ) -> LogStart {
        let Some(log) = self.log(channel) else { return LogStart::Nothing };
        let Some((_, _, _, Some(data))) = channel.parent_args(slot) else { return LogStart::Nothing };
        let Some(sc) = channel.level_buf(slot) else { return LogStart::Nothing };
        let bs = c.bs;
        let (roles, hb) = (c.sh.roles(), log.header_blocks);
        // Planned while the log was switched off (`RaidArray::set_partial_parity_log`):
        // no room for entries, and none written.
        let mut room = 0u64;
        for_each_stripe(c, off, end, |_, pieces| room += log_area_blocks(c, pieces, log));
        if ((log_at + room) * bs) as usize > sc.len() {
            return LogStart::Nothing;
        }
        // Take every slot first; none free: the write fails (retryable)
        // before anything reached a member.
        let (mut count, mut taken_all) = (0u32, true);
        for_each_stripe(c, off, end, |stripe, pieces| {
            let pm = c.sh.parity_member(stripe);
            match log_op(c, stripe, pieces, log) {
                LogOp::None => {}
                LogOp::Entry => match log.acquire(pm, stripe) {
                    Some(_) => count += 1,
                    None => taken_all = false,
                },
                LogOp::Wipe => count += u32::from(log.acquire_holding(pm, stripe).is_some()),
            }
        });
        if !taken_all {
            self.release_log(channel, slot);
            return LogStart::NoSlot;
        }
        if (IoBox::available() as u64) < u64::from(count) {
            self.release_log(channel, slot);
            return LogStart::Failed(IoError::NoMemory);
        }
        if count == 0 {
            return LogStart::Nothing;
        }
        channel.set_level_phase(slot, WRITE_LOGGING);
        channel.expect_children(slot, count, false);
        let mut children = channel.take_scratch();
        let mut short = 0u32;
        let mut entry_at = log_at;
        for_each_stripe(c, off, end, |stripe, pieces| {
            let reserved = log_area_blocks(c, pieces, log);
            let at = entry_at;
            entry_at += reserved;
            let pm = c.sh.parity_member(stripe);
            // The slots are taken: a whole stripe wipes the one it took.
            let op = match log_op(c, stripe, pieces, log) {
                LogOp::None if log.busy_slot(pm, stripe).is_some() => LogOp::Wipe,
                LogOp::Wipe => LogOp::None,
                op => op,
            };
            let nb = match op {
                LogOp::None => return,
                LogOp::Wipe => {
                    sc.slice((at * bs) as usize, (hb * bs) as usize).fill(0);
                    hb
                }
                LogOp::Entry => {
                    let mut entry = [PplPiece { lo: 0, hi: 0, modified: [(0, 0); MAX_MEMBERS] }; ppl::PPL_MAX_PIECES];
                    let mut pp_rows = 0u64;
                    for (e, &(p, _, piece_at)) in entry.iter_mut().zip(pieces) {
                        let rows = p.rows();
                        // The partial parity: the new parity XOR the new
                        // data of the rows written, which leaves the XOR of
                        // the rows the write does not change.
                        let pdst = sc.slice(((at + hb + pp_rows) * bs) as usize, (rows * bs) as usize);
                        let psrc = sc.slice(((piece_at + roles * rows) * bs) as usize, (rows * bs) as usize);
                        DmaBuf::copy_between(&pdst, &psrc, (rows * bs) as usize);
                        let mut modified = [(p.lo, p.lo); MAX_MEMBERS];
                        for k in 0..c.sh.data {
                            let (clo, chi) = p.covered(c.sh, off, end, k);
                            // A lost member's rows are not written: its new
                            // data stays in the partial parity.
                            if clo >= chi || !c.can_write(c.sh.data_member(stripe, k)) {
                                continue;
                            }
                            modified[k as usize] = (clo, chi);
                            let from = c.sh.chunk_lba(stripe, k) + clo - off;
                            let span = ((clo - p.lo) * bs) as usize..((chi - p.lo) * bs) as usize;
                            pdst.with_mut(|d| data.with(|s| xor_rows(&mut d[span], blocks(s, bs, from, chi - clo))));
                        }
                        *e = PplPiece { lo: p.lo, hi: p.hi, modified };
                        pp_rows += rows;
                    }
                    let region = sc.slice((at * bs) as usize, ((hb + pp_rows) * bs) as usize);
                    let seq = log.next_seq();
                    let n = pieces.len().min(ppl::PPL_MAX_PIECES);
                    region.with_mut(|b| ppl::seal_entry(b, bs, &log.array_uuid, seq, stripe, &entry[..n]));
                    hb + pp_rows
                }
            };
            let Some(i) = log.busy_slot(pm, stripe) else {
                // Counted, but its slot is gone: an impossible state (the
                // stripe is held); the write fails.
                short += 1;
                return;
            };
            let b = sc.slice((at * bs) as usize, (nb * bs) as usize);
            let l = Loc { member: pm as u16, offset_blocks: 0 };
            match ArrayChannel::make_child(&c.members, slot, (IoType::Write, IoFlags::FUA), (l, Some(b)), nb, 0) {
                Some(mut ch) => {
                    // The log lies in the metadata area, before the data.
                    ch.offset_blocks = log.slot_offset(i);
                    children.push(ch);
                }
                None => short += 1,
            }
        });
        for child in children.drain(..) {
            channel.send_child(&c.members, child);
        }
        channel.put_scratch(children);
        for _ in 0..short {
            channel.child_not_started(slot);
        }
        LogStart::Sent
    }

    /// Frees the log slots `slot`'s write holds (an entry stays on disk for
    /// a stripe it changed in part; a wiped slot holds nothing).
    fn release_log(&self, channel: &ArrayChannel, slot: u32) {
        // Whatever the switch says now: slots taken before are given back.
        let Some(log) = channel.shared.ppl.get().filter(|_| self.parities == 1) else { return };
        let Some((_, off, n)) = channel.parent_range(slot) else { return };
        let geo_ref = channel.geo.borrow();
        let Some(geo) = geo_ref.as_deref() else { return };
        let sh = self.shape(geo);
        let sb = sh.stripe_blocks();
        for stripe in off / sb..(off + n).div_ceil(sb) {
            let whole = off <= stripe * sb && off + n >= (stripe + 1) * sb;
            log.release(sh.parity_member(stripe), stripe, !whole);
        }
    }

    /// Sends the data and parity writes of `slot` (their count `writes`).
    fn write_members(
        &self,
        channel: &ArrayChannel,
        slot: u32,
        (c, geo_ref): (Ctx<'_>, Ref<'_, Geometry>),
        writes: u32,
    ) {
        let Some(((op, flags), off, n, Some(data))) = channel.parent_args(slot) else {
            drop((c, geo_ref));
            return channel.finish(slot, IoStatus::Failed(IoError::OutOfRange));
        };
        let end = off + n;
        let scratch = channel.level_buf(slot);
        let bs = c.bs;
        let (dd, roles) = (c.sh.data, c.sh.roles());
        channel.set_level_phase(slot, WRITE_WRITING);
        // A member latched failed but not yet recorded gets no write: the
        // IO is acknowledged once the failure is on disk (as copy levels do).
        let unrecorded = c.failed & !channel.shared.recorded_mask.load(Ordering::Acquire);
        channel.expect_children(slot, writes, unrecorded != 0);
        let mut children = channel.take_scratch();
        let mut short = 0u32;
        let mut at = 0u64;
        for_each_piece(c.sh, off, end, |p| {
            let (kind, size) = c.kind_of(p, off, end);
            let rows = p.rows();
            let row0 = p.stripe * c.sh.chunk;
            let mut push = |l: Loc, b: DmaBuf, nb: u64| match ArrayChannel::make_child(
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
            for k in 0..dd {
                let (clo, chi) = p.covered(c.sh, off, end, k);
                let m = c.sh.data_member(p.stripe, k);
                if clo < chi && c.can_write(m) {
                    let from = c.sh.chunk_lba(p.stripe, k) + clo - off;
                    let b = data.slice((from * bs) as usize, ((chi - clo) * bs) as usize);
                    push(Loc { member: m as u16, offset_blocks: row0 + clo }, b, chi - clo);
                }
            }
            if kind != Kind::LostParity {
                let first = if kind == Kind::Full { at } else { at + roles * rows };
                for j in 0..c.sh.parities {
                    let m = c.sh.parity_j_member(p.stripe, j);
                    if let (true, Some(sc)) = (c.can_write(m), scratch.as_ref()) {
                        let b = sc.slice(((first + j * rows) * bs) as usize, (rows * bs) as usize);
                        push(Loc { member: m as u16, offset_blocks: row0 + p.lo }, b, rows);
                    }
                }
            }
            at += size;
        });
        self.send_children(channel, slot, children, short, (c, geo_ref));
    }

    /// A read: each extent from its data member, or, when that member is
    /// down, reconstructed from the same rows of the members not down.
    fn start_read(&self, channel: &ArrayChannel, slot: u32) {
        let Some((_, off, n, Some(data))) = channel.parent_args(slot) else {
            return channel.finish(slot, IoStatus::Failed(IoError::OutOfRange));
        };
        let locked = channel.holds_lock(slot);
        if channel.bitmap_ref().as_deref().is_some_and(|bm| bm.range_unwritten(off, n)) {
            // Never written: zeros, healthy or degraded, without member IO.
            data.fill(0);
            return channel.finish(slot, IoStatus::Success);
        }
        let Some(geo) = geometry_or_finish(channel, slot) else { return };
        let c = Ctx::recorded(&geo, self.parities, channel, slot);
        let roles = c.sh.roles();
        let (mut count, mut scratch) = (0u32, 0u64);
        for e in geo.extents(off, n) {
            let m = member_of(&e.placement);
            if let (true, Some(l)) = (c.down(m), e.placement.on_member(m)) {
                count += c.sh.read_roles(l.offset_blocks >> c.sh.shift, c.down_mask).count_ones();
                scratch += roles * e.num_blocks;
            } else {
                count += 1;
            }
        }
        let err = if c.too_many_down() {
            Some(IoError::NoDevice)
        } else if (IoBox::available() as u64) < count as u64 {
            Some(IoError::NoMemory)
        } else {
            None
        };
        if let Some(e) = err {
            drop((c, geo));
            return channel.finish(slot, IoStatus::Failed(e));
        }
        if scratch > 0 && !locked && channel.shared.serialize.load(Ordering::Relaxed) {
            // Reconstruction reads a whole stripe row: hold the stripes, so no
            // write is half-way through them (then map again, `submit_rw`).
            drop((c, geo));
            channel.set_level_phase(slot, READ_LOCKED);
            return channel.serialize(slot);
        }
        let buf = if scratch > 0 {
            match DmaBuf::alloc((scratch * c.bs) as usize).filter(|_| scratch * c.bs <= DmaBuf::MAX_LEN as u64) {
                Some(b) => Some(b),
                None => {
                    drop((c, geo));
                    return channel.finish(slot, IoStatus::Failed(IoError::NoMemory));
                }
            }
        } else {
            None
        };
        channel.set_level_buf(slot, buf.clone());
        channel.set_level_phase(slot, if scratch > 0 { READ_RECONSTRUCT } else { READ_DIRECT });
        channel.expect_children(slot, count, false);
        let bs = c.bs;
        let mut children = channel.take_scratch();
        let mut short = 0u32;
        let mut at = 0u64;
        for e in geo.extents(off, n) {
            let m = member_of(&e.placement);
            let Some(l) = e.placement.on_member(m) else { continue };
            let mut push = |l: Loc, b: DmaBuf| match ArrayChannel::make_child(
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
            let stripe = l.offset_blocks >> c.sh.shift;
            let read = c.sh.read_roles(stripe, c.down_mask);
            for r in (0..roles).filter(|&r| read & (1 << r) != 0) {
                let other = c.sh.member_of_role(stripe, r);
                let b = sc.slice(((at + r * e.num_blocks) * bs) as usize, (e.num_blocks * bs) as usize);
                push(Loc { member: other as u16, offset_blocks: l.offset_blocks }, b);
            }
            at += roles * e.num_blocks;
        }
        self.send_children(channel, slot, children, short, (c, geo));
    }

    /// Gives back each extent of a lost member from the rows read of the
    /// others.
    fn reconstruct_reads(&self, channel: &ArrayChannel, slot: u32) -> Result<(), IoError> {
        let (_, off, n, data) = channel.parent_args(slot).ok_or(IoError::NoDevice)?;
        let data = data.ok_or(IoError::OutOfRange)?;
        let sc = channel.level_buf(slot).ok_or(IoError::NoMemory)?;
        let geo_ref = channel.geo.borrow();
        let geo = geo_ref.as_deref().ok_or(IoError::NoDevice)?;
        let sh = self.shape(geo);
        let (down_mask, _) = channel.level_plan_masks(slot);
        let bs = channel.block_size.get();
        let parity = Parity::best();
        let mut at = 0u64;
        for e in geo.extents(off, n) {
            let m = member_of(&e.placement);
            if down_mask & (1 << m) == 0 {
                continue;
            }
            let nb = e.num_blocks;
            let stripe = e.placement.on_member(m).map_or(0, |l| l.offset_blocks >> sh.shift);
            let rows = sc.slice((at * bs) as usize, (sh.roles() * nb * bs) as usize);
            let known = sh.read_roles(stripe, down_mask);
            let len = (nb * bs) as usize;
            // Q not read: the data chunks and P alone, as raid5's.
            let parities = if known & (1 << (sh.data + 1)) == 0 { 1 } else { sh.parities as usize };
            let slots = (sh.data as usize + parities) * len;
            if !rows.with_mut(|s| solve(&parity, sh.data as usize, parities, &mut s[..slots], len, known)) {
                return Err(IoError::NoMemory);
            }
            let lost = sc.slice(((at + sh.role_of(stripe, m) * nb) * bs) as usize, len);
            let dst = data.slice((e.buf_offset_blocks * bs) as usize, len);
            DmaBuf::copy_between(&dst, &lost, len);
            at += sh.roles() * nb;
        }
        Ok(())
    }

    /// The copies of one process window (see `RaidLevel::plan_window`).
    fn window(&self, channel: &ArrayChannel, window: Range<u64>, job: WindowJob) -> Option<Vec<WindowCopy>> {
        let geo_ref = channel.geo.borrow();
        let geo = geo_ref.as_deref()?;
        let sh = self.shape(geo);
        let members = channel.members.borrow();
        let failed = channel.shared.failed_mask.load(Ordering::Acquire);
        let sb = sh.stripe_blocks();
        let first = window.start / sb;
        let stripes = first..window.end.div_ceil(sb);
        let all_active = (0..members.len()).all(|m| ArrayChannel::active(&members, failed, m));
        // Each stripe's copies, `per` chunks of the window buffer a stripe
        // (at most `parities`, and a stripe has at least that many data
        // chunks: they fit the window).
        let plan = |per: u64, f: &dyn Fn(u64, u64) -> WindowCopy| {
            let mut out = Vec::new();
            for stripe in stripes.clone() {
                for i in 0..per {
                    let mut c = f(stripe, i);
                    c.buf_offset_blocks = ((stripe - first) * per + i) * sh.chunk;
                    out.push(c);
                }
            }
            out
        };
        // Member `m`'s chunk of `stripe`.
        let at = |stripe: u64, m: usize| Loc { member: m as u16, offset_blocks: stripe * sh.chunk };
        let copy = |from: Loc, xor: Vec<Loc>, to: Vec<Loc>| WindowCopy {
            from,
            xor,
            to,
            num_blocks: sh.chunk,
            buf_offset_blocks: 0,
        };
        let data_locs = |stripe: u64, from: u64| -> Vec<Loc> {
            (from..sh.data).map(|k| at(stripe, sh.data_member(stripe, k))).collect()
        };
        let WindowJob::Repair { dests } = job else {
            // Check: each parity read and compared with what the data gives.
            if !all_active {
                return None;
            }
            return Some(plan(sh.parities, &|stripe, j| {
                copy(at(stripe, sh.parity_j_member(stripe, j)), data_locs(stripe, 0), Vec::new())
            }));
        };
        // The members being rebuilt (new, or returning: their missed
        // stripes) get their chunks from the others.
        let targets: Vec<usize> = (0..members.len())
            .filter(|&m| {
                dests & (1 << m) != 0
                    && ArrayChannel::writable(&members, failed, m)
                    && !ArrayChannel::active(&members, failed, m)
            })
            .collect();
        let all = ((1u64 << members.len()) - 1) as u32;
        if targets.is_empty() {
            if dests & all != all {
                // A rebuild whose target is gone: nothing to write.
                return Some(Vec::new());
            }
            // The resync after an unclean shutdown (every member a
            // destination): the window's stripes may have data written
            // without its parity (or the reverse), so the parities are
            // recomputed from the data. Degraded, a lost member's data
            // exists only through the parities: there is nothing right to
            // write (md refuses to start a dirty degraded array); the
            // resync stops and the bits stay dirty until the member is
            // rebuilt. (A raid5 with a partial parity log owes no such
            // resync: assembly replayed the log, `crate::ppl`.)
            if !all_active {
                return None;
            }
            return Some(plan(sh.parities, &|stripe, j| {
                let to = vec![at(stripe, sh.parity_j_member(stripe, j))];
                copy(at(stripe, sh.data_member(stripe, 0)), data_locs(stripe, 1), to)
            }));
        }
        // Every member still up is a source; the targets and any member
        // still missing are what the parities give back.
        let sources: Vec<usize> = (0..members.len()).filter(|&m| ArrayChannel::active(&members, failed, m)).collect();
        if (sources.len() as u64) < sh.data || sources.is_empty() {
            return None;
        }
        // One chunk lost of a raid6 stripe, and not its Q: the XOR of the
        // data and P gives it back, Q is not read.
        let one_lost = sources.len() as u64 == sh.members - 1;
        Some(plan(targets.len() as u64, &|stripe, i| {
            let target = targets[i as usize];
            let q = (sh.parities > 1).then(|| sh.parity_j_member(stripe, 1));
            let skip = if one_lost && q != Some(target) { q } else { None };
            let mut from = sources.iter().filter(|&&m| Some(m) != skip).map(|&m| at(stripe, m));
            let first = from.next().unwrap_or(at(stripe, target));
            copy(first, from.collect(), vec![at(stripe, target)])
        }))
    }

    /// The content of `target` from the same rows of other members of its
    /// stripe (`at[i]` read into `sources[i]`), into `sources[0]`.
    fn combine(&self, geo: &Geometry, target: Loc, at: &[Loc], sources: &[DmaBuf]) -> bool {
        let sh = self.shape(geo);
        let stripe = target.offset_blocks >> sh.shift;
        let role = |l: &Loc| sh.role_of(stripe, l.member as usize);
        let target_role = role(&target);
        // A data chunk or P from the other data chunks and P (Q not among
        // them): the XOR of the others.
        let from_xor = target_role <= sh.data && at.len() as u64 == sh.data && at.iter().all(|l| role(l) <= sh.data);
        if sh.parities == 1 || from_xor {
            return xor_sources(sources);
        }
        // The rest (Q, or two chunks lost) through role slots: a copy of
        // the rows (a process window, not user IO).
        let Some(len) = sources.first().map(|s| s.len()) else { return false };
        if at.len() != sources.len() || sources.iter().any(|s| s.len() != len) {
            return false;
        }
        let mut rows = vec![0u8; sh.roles() as usize * len];
        let mut known = 0u32;
        for (l, s) in at.iter().zip(sources) {
            let r = role(l) as usize;
            s.copy_to(0, &mut rows[r * len..(r + 1) * len]);
            known |= 1 << r;
        }
        if !solve(&Parity::best(), sh.data as usize, sh.parities as usize, &mut rows, len, known) {
            return false;
        }
        let r = target_role as usize;
        sources[0].copy_from(0, &rows[r * len..(r + 1) * len]);
        true
    }
}

/// A read's blocks in chunks never written read as zeros (what a read of
/// them gives when none of its chunks was written, `start_read`), whatever
/// the members hold: a healthy read, a degraded one (reconstructed from
/// parity never computed there) and a read after a rebuild (which skips
/// them) all agree. Written bits are only ever set, so a chunk still
/// unwritten now was unwritten when the read was planned; one written
/// since raced the read, which then gets what the members gave.
pub(super) fn zero_unwritten(channel: &ArrayChannel, slot: u32) {
    let Some((_, off, n, Some(data))) = channel.parent_args(slot) else { return };
    let bm = channel.bitmap_ref();
    let Some(bm) = bm.as_deref().filter(|bm| bm.tracks_written()) else { return };
    let g = bm.geometry();
    let Ok(chunks) = g.chunk_range(off, n) else { return };
    let bs = channel.block_size.get();
    for c in chunks.filter(|&c| !bm.is_written(c)) {
        let blocks = g.chunk_blocks(c);
        let (a, b) = (blocks.start.max(off), blocks.end.min(off + n));
        if a < b {
            data.slice(((a - off) * bs) as usize, ((b - a) * bs) as usize).fill(0);
        }
    }
}

/// The member of a parity level's placement (always one copy).
fn member_of(p: &Placement) -> usize {
    p.copies(1).next().map_or(usize::MAX, |l| l.member as usize)
}

impl RaidLevel for ParityLevel {
    fn name(&self) -> &'static str {
        self.name
    }
    fn aliases(&self) -> &'static [&'static str] {
        self.aliases
    }
    fn superblock_code(&self) -> u8 {
        self.superblock_code
    }
    fn min_members(&self) -> usize {
        // At least two data chunks a stripe.
        usize::from(self.parities) + 2
    }
    fn max_failed_members(&self, _num_members: usize) -> usize {
        usize::from(self.parities)
    }
    fn uses_strips(&self) -> bool {
        true
    }

    fn layout(&self, strip_size_blocks: u64, member_blocks: &[u64]) -> Result<DataLayout, GeometryError> {
        let min = member_blocks.iter().copied().min().unwrap_or(0);
        let per = min / strip_size_blocks * strip_size_blocks;
        let data = member_blocks.len().saturating_sub(usize::from(self.parities)) as u64;
        let array_blocks = per.checked_mul(data).ok_or(GeometryError::TooLarge)?;
        Ok(DataLayout { member_data_blocks: vec![per; member_blocks.len()], array_blocks, table: Vec::new() })
    }

    fn map(&self, geo: &Geometry, lba: u64) -> (Placement, u64) {
        let sh = self.shape(geo);
        let c = lba >> sh.shift;
        let within = lba & (sh.chunk - 1);
        let (stripe, k) = (c / sh.data, c % sh.data);
        let at = Loc { member: sh.data_member(stripe, k) as u16, offset_blocks: stripe * sh.chunk + within };
        (Placement::one(at), sh.chunk - within)
    }

    fn copies_at(&self, geo: &Geometry, at: Loc) -> Option<Placement> {
        let sh = self.shape(geo);
        let stripe = at.offset_blocks >> sh.shift;
        // A parity chunk holds no array data of its own.
        (sh.role_of(stripe, at.member as usize) < sh.data).then(|| Placement::one(at))
    }

    fn survives(&self, geo: &Geometry, lost: &dyn Fn(usize) -> bool) -> bool {
        (0..geo.num_members()).filter(|&m| lost(m)).count() <= usize::from(self.parities)
    }

    fn array_offset_is_member_offset(&self) -> bool {
        false
    }

    fn submit_rw(&self, channel: &ArrayChannel, slot: u32) {
        match channel.parent_args(slot) {
            Some(((IoType::Read, _), ..)) => self.start_read(channel, slot),
            Some(_) => self.start_write(channel, slot),
            None => channel.impossible("a parity-level IO to map is not parked"),
        }
    }

    /// A failed read child fails its round; `children_done` then maps the
    /// read again with the member down (reconstructing its extents).
    fn retry_read(&self, _channel: &ArrayChannel, child: IoBox) -> Result<(), IoBox> {
        Err(child)
    }

    /// Rebuild: each stripe of the window (whole stripes: the engine widens
    /// it with `lock_range`) rebuilds each target's chunk, data or parity
    /// alike, from the same rows of every other member (`combine_window`).
    /// None when one of those is not active (nothing to rebuild from).
    /// Check (md's `check`/`repair`): each stripe's parities are read and
    /// compared with what its data gives; `repair` rewrites them. A
    /// degraded array has nothing to compare: None.
    fn plan_window(&self, channel: &ArrayChannel, window: Range<u64>, job: WindowJob) -> Option<Vec<WindowCopy>> {
        self.window(channel, window, job)
    }

    fn combine_window(&self, geo: &Geometry, target: Loc, at: &[Loc], sources: &[DmaBuf]) -> bool {
        self.combine(geo, target, at, sources)
    }

    fn lock_range(&self, geo: &Geometry, offset_blocks: u64, num_blocks: u64) -> Range<u64> {
        let sb = self.shape(geo).stripe_blocks();
        let start = offset_blocks / sb * sb;
        let end = (offset_blocks + num_blocks).div_ceil(sb) * sb;
        // (A zero-length IO, which the bdev layer does not pass, would still lock a block.)
        start..end.min(geo.array_blocks()).max(start + 1)
    }

    fn children_done(&self, channel: &ArrayChannel, slot: u32) -> bool {
        let (error, copy_failed) = channel.child_outcome(slot);
        match channel.level_phase(slot) {
            WRITE_READING => {
                if copy_failed {
                    // A member failed under the reads (now latched): plan the
                    // write again around it, or fail if that leaves too few.
                    channel.clear_child_error(slot);
                    channel.set_level_phase(slot, START);
                    channel.set_level_buf(slot, None);
                    self.start_write(channel, slot);
                    return true;
                }
                if error.is_some() {
                    return false;
                }
                self.write_data_and_parity(channel, slot);
                true
            }
            WRITE_LOGGING => {
                if copy_failed {
                    // The parity member failed under its log write (now
                    // latched): plan again; the stripe then has no parity
                    // to log for.
                    self.release_log(channel, slot);
                    channel.clear_child_error(slot);
                    channel.set_level_phase(slot, START);
                    channel.set_level_buf(slot, None);
                    self.start_write(channel, slot);
                    return true;
                }
                if error.is_some() {
                    self.release_log(channel, slot);
                    return false;
                }
                self.resume_after_log(channel, slot);
                true
            }
            WRITE_WRITING => {
                self.release_log(channel, slot);
                false
            }
            READ_DIRECT | READ_RECONSTRUCT if error.is_some() => {
                // A member failed (the core latched it): read again around
                // it (raid6 still has a parity for it after one loss). Out
                // of descriptors, or too many failures: the read fails.
                let failed = channel.shared.failed_mask.load(Ordering::Acquire);
                if matches!(error, Some(IoError::NoMemory | IoError::Aborted))
                    || failed.count_ones() > u32::from(self.parities)
                {
                    return false;
                }
                channel.clear_child_error(slot);
                channel.set_level_phase(slot, START);
                channel.set_level_buf(slot, None);
                self.start_read(channel, slot);
                true
            }
            READ_RECONSTRUCT => {
                if let Err(e) = self.reconstruct_reads(channel, slot) {
                    channel.set_child_error(slot, e);
                }
                zero_unwritten(channel, slot);
                false
            }
            READ_DIRECT => {
                zero_unwritten(channel, slot);
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

    /// raid5 only: md has no log for raid6 either (raid6.rs).
    fn keeps_partial_parity_log(&self) -> bool {
        self.parities == 1
    }

    fn refuses(&self, op: LevelOp) -> Option<&'static str> {
        match op {
            // Superblock, bitmap and assembly are the array core's; the
            // level resyncs dirty stripes' parities (`plan_window`).
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
        fn pieces_partition_a_write(parities in 1u8..3, n in 3usize..8, shift in 0u32..4, io in (any::<u64>(), 1u64..200)) {
            let chunk = 1u64 << shift;
            let n = n.max(usize::from(parities) + 2);
            let level = named(if parities == 1 { "raid5" } else { "raid6" });
            let geo = Geometry::new(level, chunk, &vec![64 * chunk; n]).unwrap();
            let sh = Shape::of(&geo, parities);
            let off = io.0 % geo.array_blocks();
            let end = off + io.1.min(geo.array_blocks() - off);
            let mut seen = vec![0u32; (end - off) as usize];
            for_each_piece(sh, off, end, |p| {
                assert!(p.lo < p.hi && p.hi <= chunk);
                let mut read = vec![false; (sh.data * p.rows()) as usize];
                let (kind, size) = kind_of(sh, p, off, end, |_| false, |_| false, false);
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
                assert_eq!(size, if whole { sh.parities * p.rows() } else { (sh.data + 2 * sh.parities) * p.rows() });
            });
            prop_assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
        }
    }
}
