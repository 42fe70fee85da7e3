//! The portable kernels, in safe Rust. Each is written once over a [`Lane`]: u64 words
//! for the body (XOR eight bytes at once; multiply-by-g is a shift and a masked XOR
//! of 0x1d per byte), u8 for the tail. Products by other constants go byte by byte
//! through the log/exp tables (for long runs through the constant's 256-byte product
//! row, itself built from log/exp). They are the fallback where no SIMD unit is found
//! and finish the SIMD kernels' tails (`from` is where the tail starts). Every buffer
//! read or written is as long as the output: the caller checked.

use std::ops::{BitXor, BitXorAssign};

use crate::gf;
use crate::{Holes, Init};

/// A unit of bytes the kernels work on at once.
trait Lane: Copy + BitXor<Output = Self> + BitXorAssign {
    const BYTES: usize;
    const ZERO: Self;
    fn load(buf: &[u8], offset: usize) -> Self;
    fn store(self, buf: &mut [u8], offset: usize);
    /// g · self, bytewise.
    fn mul2(self) -> Self;
    /// c · self, bytewise.
    fn mul(self, by: impl Multiply) -> Self;
}

impl Lane for u8 {
    const BYTES: usize = 1;
    const ZERO: u8 = 0;

    #[inline]
    fn load(buf: &[u8], offset: usize) -> u8 {
        buf[offset]
    }

    #[inline]
    fn store(self, buf: &mut [u8], offset: usize) {
        buf[offset] = self;
    }

    #[inline]
    fn mul2(self) -> u8 {
        (self << 1) ^ if self & 0x80 != 0 { 0x1d } else { 0 }
    }

    #[inline]
    fn mul(self, by: impl Multiply) -> u8 {
        by.mul(self)
    }
}

impl Lane for u64 {
    const BYTES: usize = 8;
    const ZERO: u64 = 0;

    #[inline]
    fn load(buf: &[u8], offset: usize) -> u64 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&buf[offset..offset + 8]);
        u64::from_ne_bytes(word)
    }

    #[inline]
    fn store(self, buf: &mut [u8], offset: usize) {
        buf[offset..offset + 8].copy_from_slice(&self.to_ne_bytes());
    }

    #[inline]
    fn mul2(self) -> u64 {
        const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
        let overflow = (self & HIGH_BITS) >> 7; // 1 in every byte whose top bit falls off
        ((self << 1) & !(HIGH_BITS >> 7)) ^ (overflow * 0x1d)
    }

    #[inline]
    fn mul(self, by: impl Multiply) -> u64 {
        u64::from_ne_bytes(self.to_ne_bytes().map(|b| by.mul(b)))
    }
}

/// Runs `step::<u64>` over the words of `from..len`, then `step::<u8>` over the bytes
/// left. (A generic closure cannot be written, hence the macro.)
macro_rules! for_each_lane {
    ($from:expr, $len:expr, |$offset:ident, $lane:ident| $step:expr) => {{
        let (from, len) = ($from, $len);
        let words_end = from + (len - from) / <u64 as Lane>::BYTES * <u64 as Lane>::BYTES;
        {
            type $lane = u64;
            let mut $offset = from;
            while $offset < words_end {
                $step;
                $offset += <u64 as Lane>::BYTES;
            }
        }
        {
            type $lane = u8;
            for $offset in words_end..len {
                $step;
            }
        }
    }};
}

/// Below this many bytes a product is looked up byte by byte in log/exp; from here on
/// the constant's 256-entry product row (built from log/exp) pays for itself.
const ROW_THRESHOLD: usize = 512;

/// Multiplication by one constant.
trait Multiply: Copy {
    fn mul(self, b: u8) -> u8;
}

/// Through log/exp; `None` is c = 0.
#[derive(Clone, Copy)]
struct ByLog(Option<usize>);

impl ByLog {
    fn new(c: u8) -> Self {
        ByLog((c != 0).then(|| gf::LOG[c as usize] as usize))
    }
}

impl Multiply for ByLog {
    #[inline]
    fn mul(self, b: u8) -> u8 {
        match self.0 {
            Some(log) => gf::mul_by_log(b, log),
            None => 0,
        }
    }
}

/// Through the constant's product row, row[b] = c · b.
#[derive(Clone, Copy)]
struct ByRow<'a>(&'a [u8; 256]);

fn product_row(c: u8) -> [u8; 256] {
    let by_log = ByLog::new(c);
    std::array::from_fn(|b| by_log.mul(b as u8))
}

impl Multiply for ByRow<'_> {
    #[inline]
    fn mul(self, b: u8) -> u8 {
        self.0[b as usize]
    }
}

/// Runs `$kernel(by_c1, by_c2, args…)` with the multipliers suited to `$bytes`
/// products: short tails (the SIMD kernels') pay no set-up.
macro_rules! with_multipliers {
    ($bytes:expr, $c1:expr, $c2:expr, $kernel:ident($($arg:expr),*)) => {
        if $bytes < ROW_THRESHOLD {
            $kernel(ByLog::new($c1), ByLog::new($c2), $($arg),*)
        } else {
            let (row1, row2) = (product_row($c1), product_row($c2));
            $kernel(ByRow(&row1), ByRow(&row2), $($arg),*)
        }
    };
}

/// dst = init ^ (XOR of the sources that are not holes), over dst[from..].
pub(crate) fn xor(dst: &mut [u8], init: Init<'_>, srcs: &[&[u8]], holes: Holes, from: usize) {
    for_each_lane!(from, dst.len(), |offset, L| {
        let mut acc = match init {
            Init::Zero => L::ZERO,
            Init::Dst => L::load(dst, offset),
            Init::Buf(buf) => L::load(buf, offset),
        };
        for (i, src) in srcs.iter().enumerate() {
            if !holes.contains(i) {
                acc ^= L::load(src, offset);
            }
        }
        acc.store(dst, offset)
    });
}

/// p = XOR of the data blocks, q = Σ g^i · data[i], both over the blocks that are not
/// holes, over q[from..]. Horner's rule from the highest index down: q = q·g ^ d.
pub(crate) fn syndrome(data: &[&[u8]], holes: Holes, mut p: Option<&mut [u8]>, q: &mut [u8], from: usize) {
    let top = data.len() - 1;
    for_each_lane!(from, q.len(), |offset, L| {
        let (mut pl, mut ql) = (L::ZERO, L::ZERO);
        if !holes.contains(top) {
            pl = L::load(data[top], offset);
            ql = pl;
        }
        for z in (0..top).rev() {
            ql = ql.mul2();
            if !holes.contains(z) {
                let d = L::load(data[z], offset);
                pl ^= d;
                ql ^= d;
            }
        }
        if let Some(p) = p.as_deref_mut() {
            pl.store(p, offset);
        }
        ql.store(q, offset)
    });
}

/// delta = old ^ new; p ^= delta; q ^= c · delta.
pub(crate) fn update_pq(old: &[u8], new: &[u8], c: u8, p: &mut [u8], q: &mut [u8], from: usize) {
    with_multipliers!(p.len() - from, c, 0, update_pq_with(old, new, p, q, from))
}

fn update_pq_with(
    by_c: impl Multiply,
    _: impl Multiply,
    old: &[u8],
    new: &[u8],
    p: &mut [u8],
    q: &mut [u8],
    from: usize,
) {
    for_each_lane!(from, p.len(), |offset, L| {
        let delta = L::load(old, offset) ^ L::load(new, offset);
        (L::load(p, offset) ^ delta).store(p, offset);
        (L::load(q, offset) ^ delta.mul(by_c)).store(q, offset)
    });
}

/// Data block and P lost; dx holds Q of the other blocks, p their XOR:
/// dx = c · (q ^ dx) (c = g^-x), then p ^= dx.
pub(crate) fn finish_data_p(q: &[u8], c: u8, dx: &mut [u8], p: &mut [u8], from: usize) {
    with_multipliers!(dx.len() - from, c, 0, finish_data_p_with(q, dx, p, from))
}

fn finish_data_p_with(by_c: impl Multiply, _: impl Multiply, q: &[u8], dx: &mut [u8], p: &mut [u8], from: usize) {
    for_each_lane!(from, dx.len(), |offset, L| {
        let d = (L::load(q, offset) ^ L::load(dx, offset)).mul(by_c);
        d.store(dx, offset);
        (L::load(p, offset) ^ d).store(p, offset)
    });
}

/// Data block and Q lost; dx holds the XOR of the other blocks, q their Q:
/// dx ^= p, then q ^= c · dx (c = g^x).
pub(crate) fn finish_data_q(p: &[u8], c: u8, dx: &mut [u8], q: &mut [u8], from: usize) {
    with_multipliers!(dx.len() - from, c, 0, finish_data_q_with(p, dx, q, from))
}

fn finish_data_q_with(by_c: impl Multiply, _: impl Multiply, p: &[u8], dx: &mut [u8], q: &mut [u8], from: usize) {
    for_each_lane!(from, dx.len(), |offset, L| {
        let d = L::load(dx, offset) ^ L::load(p, offset);
        d.store(dx, offset);
        (L::load(q, offset) ^ d.mul(by_c)).store(q, offset)
    });
}

/// Two data blocks lost; dx holds P and dy holds Q of the other blocks:
/// with px = p ^ dx = Dx ^ Dy and qx = q ^ dy = g^x·Dx ^ g^y·Dy,
/// Dx = cq·qx ^ cp·px and Dy = px ^ Dx.
pub(crate) fn finish_two_data(p: &[u8], q: &[u8], cp: u8, cq: u8, dx: &mut [u8], dy: &mut [u8], from: usize) {
    with_multipliers!(dx.len() - from, cp, cq, finish_two_data_with(p, q, dx, dy, from))
}

fn finish_two_data_with(
    by_p: impl Multiply,
    by_q: impl Multiply,
    p: &[u8],
    q: &[u8],
    dx: &mut [u8],
    dy: &mut [u8],
    from: usize,
) {
    for_each_lane!(from, dx.len(), |offset, L| {
        let px = L::load(p, offset) ^ L::load(dx, offset);
        let qx = L::load(q, offset) ^ L::load(dy, offset);
        let x = qx.mul(by_q) ^ px.mul(by_p);
        x.store(dx, offset);
        (px ^ x).store(dy, offset)
    });
}

// Table entries: the whole buffer.

fn xor_entry(dst: &mut [u8], init: Init<'_>, srcs: &[&[u8]], holes: Holes) {
    xor(dst, init, srcs, holes, 0);
}

fn syndrome_entry(data: &[&[u8]], holes: Holes, p: Option<&mut [u8]>, q: &mut [u8]) {
    syndrome(data, holes, p, q, 0);
}

fn update_pq_entry(old: &[u8], new: &[u8], c: u8, p: &mut [u8], q: &mut [u8]) {
    update_pq(old, new, c, p, q, 0);
}

fn finish_data_p_entry(q: &[u8], c: u8, dx: &mut [u8], p: &mut [u8]) {
    finish_data_p(q, c, dx, p, 0);
}

fn finish_data_q_entry(p: &[u8], c: u8, dx: &mut [u8], q: &mut [u8]) {
    finish_data_q(p, c, dx, q, 0);
}

fn finish_two_data_entry(p: &[u8], q: &[u8], cp: u8, cq: u8, dx: &mut [u8], dy: &mut [u8]) {
    finish_two_data(p, q, cp, cq, dx, dy, 0);
}

pub(crate) static KERNELS: crate::Kernels = crate::Kernels {
    implementation: crate::Implementation::Scalar,
    xor: xor_entry,
    syndrome: syndrome_entry,
    update_pq: update_pq_entry,
    finish_data_p: finish_data_p_entry,
    finish_data_q: finish_data_q_entry,
    finish_two_data: finish_two_data_entry,
};
