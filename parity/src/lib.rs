//! RAID parity math as Linux md computes it, for raid5 and raid6 on the reactor:
//! no allocation and no lock per call, every buffer length checked before any kernel
//! runs.
//!
//! - raid5: P = D_0 ^ D_1 ^ … ^ D_{n-1}.
//! - raid6: P as above and Q = Σ g^i · D_i over GF(2^8) with polynomial 0x11d and
//!   g = {02} (H. Peter Anvin, "The mathematics of RAID-6"; md's `lib/raid6`).
//!
//! **The data index `i`** is md's syndrome slot (`raid6_idx_to_slot` in
//! `drivers/md/raid5.c`): walk the stripe's members starting at the one after Q,
//! wrapping around, skipping P and Q; the k-th data member met has index k. For md's
//! default left-symmetric layout that is the chunk's logical position in the stripe.
//! A different order gives a different Q: arrays would not be md-compatible.
//!
//! Every one- and two-failure case of raid6, and the function that repairs it:
//!
//! | lost                 | call                                           |
//! |----------------------|------------------------------------------------|
//! | P                    | [`Parity::gen_p`]                              |
//! | Q                    | [`Parity::gen_q`]                              |
//! | P and Q              | [`Parity::gen_pq`]                             |
//! | data x               | [`Parity::recover_data_from_p`]                |
//! | data x and P         | [`Parity::recover_data_and_p`] (from Q)        |
//! | data x and Q         | [`Parity::recover_data_and_q`] (from P)        |
//! | data x and data y    | [`Parity::recover_two_data`] (from P and Q)    |
//!
//! raid5 loses one member: P ([`Parity::gen_p`]) or a data block
//! ([`Parity::recover_data_from_p`]). Writes that change part of a stripe update the
//! parity in place: [`Parity::update_p`], [`Parity::update_pq`].
//!
//! The recovery calls take the whole data array with the lost entries ignored (pass
//! an empty slice there), as md passes its zero page, and use the output buffers as
//! their scratch space.
//!
//! **Kernels.** AVX2, SSSE3 and a portable scalar set; [`Parity::best`] picks the
//! fastest the CPU has, once per process, and [`implementation_name`] says which.
//! [`Parity::new`] pins one (tests and benchmarks run each). Any length works;
//! multiples of 32 (AVX2) or 16 (SSSE3) bytes never touch the scalar tail.
// Unsafe code is denied everywhere but the SIMD kernels (`x86`).
#![deny(unsafe_code)]

use std::fmt;
use std::sync::OnceLock;

pub mod gf;
mod scalar;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86;

/// The most data blocks Q can protect: g has order 255, so beyond that two data
/// indices would share a coefficient and two lost blocks could not be told apart.
pub const MAX_DATA_BLOCKS: usize = gf::GROUP_ORDER;

/// A set of parity kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Implementation {
    /// 32-byte registers.
    Avx2,
    /// 16-byte registers (pshufb).
    Ssse3,
    /// Portable: u64 words, log/exp tables.
    Scalar,
}

impl Implementation {
    /// Every implementation, fastest first: the order [`Parity::best`] tries them in.
    pub const ALL: [Implementation; 3] = [Implementation::Avx2, Implementation::Ssse3, Implementation::Scalar];

    pub fn name(self) -> &'static str {
        match self {
            Implementation::Avx2 => "avx2",
            Implementation::Ssse3 => "ssse3",
            Implementation::Scalar => "scalar",
        }
    }

    /// Whether this CPU can run it (scalar always can).
    pub fn is_available(self) -> bool {
        kernels_for(self).is_some()
    }
}

impl fmt::Display for Implementation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which buffer of a call an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    /// `srcs[i]` of [`Parity::xor_into`].
    Source(usize),
    /// `data[i]`.
    Data(usize),
    /// The output for lost data block i.
    Recovered(usize),
    P,
    Q,
    /// The destination of [`Parity::xor_into`].
    Destination,
    /// The data before a read-modify-write.
    Old,
    /// The data after a read-modify-write.
    New,
}

impl fmt::Display for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Buffer::Source(i) => write!(f, "source {i}"),
            Buffer::Data(i) => write!(f, "data block {i}"),
            Buffer::Recovered(i) => write!(f, "the output for data block {i}"),
            Buffer::P => f.write_str("P"),
            Buffer::Q => f.write_str("Q"),
            Buffer::Destination => f.write_str("the destination"),
            Buffer::Old => f.write_str("the old data"),
            Buffer::New => f.write_str("the new data"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParityError {
    #[error("{buffer} is {found} bytes, but the call's other buffers are {expected}")]
    LengthMismatch { buffer: Buffer, expected: usize, found: usize },
    #[error("no data blocks")]
    NoData,
    #[error("{count} data blocks, but Q protects at most {MAX_DATA_BLOCKS}")]
    TooManyDataBlocks { count: usize },
    #[error("data index {index} is out of range for {count} data blocks")]
    IndexOutOfRange { index: usize, count: usize },
    #[error("data block {index} is named as lost twice")]
    SameBlockTwice { index: usize },
    #[error("the {0} parity kernels need an instruction set this CPU does not have")]
    Unavailable(Implementation),
}

/// Data indices a kernel treats as all-zero blocks (lost blocks being recovered).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Holes([usize; 2]);

impl Holes {
    const NONE: Holes = Holes([usize::MAX; 2]);

    fn one(index: usize) -> Holes {
        Holes([index, usize::MAX])
    }

    fn two(a: usize, b: usize) -> Holes {
        Holes([a, b])
    }

    #[inline(always)]
    pub(crate) fn contains(self, index: usize) -> bool {
        index == self.0[0] || index == self.0[1]
    }

    pub(crate) fn is_empty(self) -> bool {
        self.0 == [usize::MAX; 2]
    }
}

/// What an XOR kernel starts from before it folds in the sources.
pub(crate) enum Init<'a> {
    Zero,
    /// The destination's own contents (accumulate).
    Dst,
    Buf(&'a [u8]),
}

/// dst = init ^ XOR of the non-hole sources.
type XorKernel = fn(dst: &mut [u8], init: Init<'_>, srcs: &[&[u8]], holes: Holes);
/// P (when given) and Q of the non-hole data blocks; `data` is not empty.
type SyndromeKernel = fn(data: &[&[u8]], holes: Holes, p: Option<&mut [u8]>, q: &mut [u8]);
/// p ^= old ^ new; q ^= c · (old ^ new).
type UpdatePqKernel = fn(old: &[u8], new: &[u8], c: u8, p: &mut [u8], q: &mut [u8]);
/// `finish_data_p`: dx = c · (q ^ dx); p ^= dx.
/// `finish_data_q`: dx ^= p; q ^= c · dx.
type FinishOneKernel = fn(parity: &[u8], c: u8, dx: &mut [u8], other_parity: &mut [u8]);
/// px = p ^ dx, qx = q ^ dy; dx = cq·qx ^ cp·px; dy = px ^ dx.
type FinishTwoKernel = fn(p: &[u8], q: &[u8], cp: u8, cq: u8, dx: &mut [u8], dy: &mut [u8]);

/// One implementation's kernels. They may assume the lengths the public API checked
/// (every buffer read or written as long as the output, holes excepted) and panic
/// otherwise; they never read or write out of bounds.
pub(crate) struct Kernels {
    pub(crate) implementation: Implementation,
    pub(crate) xor: XorKernel,
    pub(crate) syndrome: SyndromeKernel,
    pub(crate) update_pq: UpdatePqKernel,
    pub(crate) finish_data_p: FinishOneKernel,
    pub(crate) finish_data_q: FinishOneKernel,
    pub(crate) finish_two_data: FinishTwoKernel,
}

fn kernels_for(implementation: Implementation) -> Option<&'static Kernels> {
    match implementation {
        Implementation::Scalar => Some(&scalar::KERNELS),
        #[cfg(target_arch = "x86_64")]
        Implementation::Avx2 => x86::avx2_kernels(),
        #[cfg(target_arch = "x86_64")]
        Implementation::Ssse3 => x86::ssse3_kernels(),
        #[cfg(not(target_arch = "x86_64"))]
        Implementation::Avx2 | Implementation::Ssse3 => None,
    }
}

fn check_len(buffer: Buffer, found: usize, expected: usize) -> Result<(), ParityError> {
    if found == expected {
        Ok(())
    } else {
        Err(ParityError::LengthMismatch { buffer, expected, found })
    }
}

/// Every data block that is not a hole is `len` bytes.
fn check_data(data: &[&[u8]], holes: Holes, len: usize) -> Result<(), ParityError> {
    for (i, block) in data.iter().enumerate() {
        if !holes.contains(i) {
            check_len(Buffer::Data(i), block.len(), len)?;
        }
    }
    Ok(())
}

/// A data array Q can cover.
fn check_q_count(data: &[&[u8]]) -> Result<(), ParityError> {
    match data.len() {
        0 => Err(ParityError::NoData),
        count if count > MAX_DATA_BLOCKS => Err(ParityError::TooManyDataBlocks { count }),
        _ => Ok(()),
    }
}

fn check_index(index: usize, count: usize) -> Result<(), ParityError> {
    if index < count {
        Ok(())
    } else {
        Err(ParityError::IndexOutOfRange { index, count })
    }
}

/// A handle on one implementation's kernels; `Copy`, so a reactor keeps its own.
#[derive(Clone, Copy)]
pub struct Parity {
    kernels: &'static Kernels,
}

impl fmt::Debug for Parity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parity").field("implementation", &self.implementation()).finish()
    }
}

impl Parity {
    /// The fastest implementation this CPU has, chosen on the first call and kept.
    pub fn best() -> Parity {
        static BEST: OnceLock<&'static Kernels> = OnceLock::new();
        let kernels =
            BEST.get_or_init(|| Implementation::ALL.iter().find_map(|&i| kernels_for(i)).unwrap_or(&scalar::KERNELS));
        Parity { kernels }
    }

    /// A given implementation, or an error when the CPU lacks its instructions.
    pub fn new(implementation: Implementation) -> Result<Parity, ParityError> {
        kernels_for(implementation).map(|kernels| Parity { kernels }).ok_or(ParityError::Unavailable(implementation))
    }

    pub fn implementation(&self) -> Implementation {
        self.kernels.implementation
    }

    /// `dst ^= srcs[0] ^ srcs[1] ^ …` (md's `xor_blocks`; no sources leaves dst as is).
    pub fn xor_into(&self, dst: &mut [u8], srcs: &[&[u8]]) -> Result<(), ParityError> {
        for (i, src) in srcs.iter().enumerate() {
            check_len(Buffer::Source(i), src.len(), dst.len())?;
        }
        (self.kernels.xor)(dst, Init::Dst, srcs, Holes::NONE);
        Ok(())
    }

    /// raid5 parity: `p = data[0] ^ data[1] ^ …`.
    pub fn gen_p(&self, data: &[&[u8]], p: &mut [u8]) -> Result<(), ParityError> {
        if data.is_empty() {
            return Err(ParityError::NoData);
        }
        check_data(data, Holes::NONE, p.len())?;
        (self.kernels.xor)(p, Init::Zero, data, Holes::NONE);
        Ok(())
    }

    /// raid6 parity: p = XOR of the data blocks, `q = Σ g^i · data[i]`.
    pub fn gen_pq(&self, data: &[&[u8]], p: &mut [u8], q: &mut [u8]) -> Result<(), ParityError> {
        check_q_count(data)?;
        check_len(Buffer::Q, q.len(), p.len())?;
        check_data(data, Holes::NONE, p.len())?;
        (self.kernels.syndrome)(data, Holes::NONE, Some(p), q);
        Ok(())
    }

    /// Q alone (a lost Q member being rebuilt): `q = Σ g^i · data[i]`.
    pub fn gen_q(&self, data: &[&[u8]], q: &mut [u8]) -> Result<(), ParityError> {
        check_q_count(data)?;
        check_data(data, Holes::NONE, q.len())?;
        (self.kernels.syndrome)(data, Holes::NONE, None, q);
        Ok(())
    }

    /// raid5 read-modify-write: p ^= old ^ new, where one data block goes from `old`
    /// to `new`.
    pub fn update_p(&self, p: &mut [u8], old: &[u8], new: &[u8]) -> Result<(), ParityError> {
        check_len(Buffer::Old, old.len(), p.len())?;
        check_len(Buffer::New, new.len(), p.len())?;
        (self.kernels.xor)(p, Init::Dst, &[old, new], Holes::NONE);
        Ok(())
    }

    /// raid6 read-modify-write of data block `index`: p ^= old ^ new and
    /// q ^= g^index · (old ^ new).
    pub fn update_pq(
        &self,
        index: usize,
        old: &[u8],
        new: &[u8],
        p: &mut [u8],
        q: &mut [u8],
    ) -> Result<(), ParityError> {
        check_index(index, MAX_DATA_BLOCKS)?;
        check_len(Buffer::Old, old.len(), p.len())?;
        check_len(Buffer::New, new.len(), p.len())?;
        check_len(Buffer::Q, q.len(), p.len())?;
        (self.kernels.update_pq)(old, new, gf::exp2(index), p, q);
        Ok(())
    }

    /// One data block lost (raid5, or raid6 with P intact): out = p ^ XOR of the
    /// other data blocks. `data[lost]` is ignored.
    pub fn recover_data_from_p(
        &self,
        data: &[&[u8]],
        lost: usize,
        p: &[u8],
        out: &mut [u8],
    ) -> Result<(), ParityError> {
        check_index(lost, data.len())?;
        check_len(Buffer::P, p.len(), out.len())?;
        let holes = Holes::one(lost);
        check_data(data, holes, out.len())?;
        (self.kernels.xor)(out, Init::Buf(p), data, holes);
        Ok(())
    }

    /// raid6, data block `lost` and P lost: the block comes back from Q into `out`,
    /// and P is regenerated into `p_out`. `data[lost]` is ignored.
    pub fn recover_data_and_p(
        &self,
        data: &[&[u8]],
        lost: usize,
        q: &[u8],
        out: &mut [u8],
        p_out: &mut [u8],
    ) -> Result<(), ParityError> {
        check_q_count(data)?;
        check_index(lost, data.len())?;
        check_len(Buffer::Q, q.len(), out.len())?;
        check_len(Buffer::P, p_out.len(), out.len())?;
        let holes = Holes::one(lost);
        check_data(data, holes, out.len())?;
        // p_out = XOR and out = Q of the surviving blocks, then
        // D = g^-lost · (Q ^ Q_survivors) and P = P_survivors ^ D.
        (self.kernels.syndrome)(data, holes, Some(&mut *p_out), out);
        (self.kernels.finish_data_p)(q, gf::exp2_neg(lost), out, p_out);
        Ok(())
    }

    /// raid6, data block `lost` and Q lost: the block comes back from P into `out`,
    /// and Q is regenerated into `q_out`. `data[lost]` is ignored.
    pub fn recover_data_and_q(
        &self,
        data: &[&[u8]],
        lost: usize,
        p: &[u8],
        out: &mut [u8],
        q_out: &mut [u8],
    ) -> Result<(), ParityError> {
        check_q_count(data)?;
        check_index(lost, data.len())?;
        check_len(Buffer::P, p.len(), out.len())?;
        check_len(Buffer::Q, q_out.len(), out.len())?;
        let holes = Holes::one(lost);
        check_data(data, holes, out.len())?;
        // out = XOR and q_out = Q of the surviving blocks, then D = P ^ out and
        // Q = Q_survivors ^ g^lost · D.
        (self.kernels.syndrome)(data, holes, Some(&mut *out), q_out);
        (self.kernels.finish_data_q)(p, gf::exp2(lost), out, q_out);
        Ok(())
    }

    /// raid6, two data blocks lost: both come back from P and Q, `data[lost[k]]` into
    /// `out[k]`. The lost entries of `data` are ignored.
    pub fn recover_two_data(
        &self,
        data: &[&[u8]],
        lost: [usize; 2],
        p: &[u8],
        q: &[u8],
        out: [&mut [u8]; 2],
    ) -> Result<(), ParityError> {
        let [x, y] = lost;
        let [dx, dy] = out;
        check_q_count(data)?;
        check_index(x, data.len())?;
        check_index(y, data.len())?;
        if x == y {
            return Err(ParityError::SameBlockTwice { index: x });
        }
        let len = dx.len();
        check_len(Buffer::Recovered(y), dy.len(), len)?;
        check_len(Buffer::P, p.len(), len)?;
        check_len(Buffer::Q, q.len(), len)?;
        let holes = Holes::two(x, y);
        check_data(data, holes, len)?;
        // dx = P and dy = Q of the surviving blocks; then px = Dx ^ Dy and
        // qx = g^x·Dx ^ g^y·Dy, so Dx = (qx ^ g^y·px) / (g^x ^ g^y) and Dy = px ^ Dx.
        (self.kernels.syndrome)(data, holes, Some(&mut *dx), dy);
        let (gx, gy) = (gf::exp2(x), gf::exp2(y));
        // x != y and both below 255, so g^x != g^y and the sum is invertible.
        let cq = gf::inv(gx ^ gy).unwrap_or(0);
        debug_assert_ne!(cq, 0);
        let cp = gf::mul(gy, cq);
        (self.kernels.finish_two_data)(p, q, cp, cq, dx, dy);
        Ok(())
    }
}

/// The implementation [`Parity::best`] chose.
pub fn implementation() -> Implementation {
    Parity::best().implementation()
}

/// Its name ("avx2", "ssse3" or "scalar"), for logs and RPC output.
pub fn implementation_name() -> &'static str {
    implementation().name()
}

/// [`Parity::xor_into`] with the best implementation.
pub fn xor_into(dst: &mut [u8], srcs: &[&[u8]]) -> Result<(), ParityError> {
    Parity::best().xor_into(dst, srcs)
}

/// [`Parity::gen_p`] with the best implementation.
pub fn gen_p(data: &[&[u8]], p: &mut [u8]) -> Result<(), ParityError> {
    Parity::best().gen_p(data, p)
}

/// [`Parity::gen_pq`] with the best implementation.
pub fn gen_pq(data: &[&[u8]], p: &mut [u8], q: &mut [u8]) -> Result<(), ParityError> {
    Parity::best().gen_pq(data, p, q)
}

/// [`Parity::gen_q`] with the best implementation.
pub fn gen_q(data: &[&[u8]], q: &mut [u8]) -> Result<(), ParityError> {
    Parity::best().gen_q(data, q)
}

/// [`Parity::update_p`] with the best implementation.
pub fn update_p(p: &mut [u8], old: &[u8], new: &[u8]) -> Result<(), ParityError> {
    Parity::best().update_p(p, old, new)
}

/// [`Parity::update_pq`] with the best implementation.
pub fn update_pq(index: usize, old: &[u8], new: &[u8], p: &mut [u8], q: &mut [u8]) -> Result<(), ParityError> {
    Parity::best().update_pq(index, old, new, p, q)
}

/// [`Parity::recover_data_from_p`] with the best implementation.
pub fn recover_data_from_p(data: &[&[u8]], lost: usize, p: &[u8], out: &mut [u8]) -> Result<(), ParityError> {
    Parity::best().recover_data_from_p(data, lost, p, out)
}

/// [`Parity::recover_data_and_p`] with the best implementation.
pub fn recover_data_and_p(
    data: &[&[u8]],
    lost: usize,
    q: &[u8],
    out: &mut [u8],
    p_out: &mut [u8],
) -> Result<(), ParityError> {
    Parity::best().recover_data_and_p(data, lost, q, out, p_out)
}

/// [`Parity::recover_data_and_q`] with the best implementation.
pub fn recover_data_and_q(
    data: &[&[u8]],
    lost: usize,
    p: &[u8],
    out: &mut [u8],
    q_out: &mut [u8],
) -> Result<(), ParityError> {
    Parity::best().recover_data_and_q(data, lost, p, out, q_out)
}

/// [`Parity::recover_two_data`] with the best implementation.
pub fn recover_two_data(
    data: &[&[u8]],
    lost: [usize; 2],
    p: &[u8],
    q: &[u8],
    out: [&mut [u8]; 2],
) -> Result<(), ParityError> {
    Parity::best().recover_two_data(data, lost, p, q, out)
}
