//! The x86_64 SIMD kernels. Each kernel is written once, generic over a [`Vector`]
//! (one SSSE3 or AVX2 register), and instantiated per instruction set by
//! [`isa_kernels!`] inside functions compiled with that instruction set enabled;
//! the instantiations are reachable only through a kernel table handed out after
//! `is_x86_feature_detected!` said yes.
//!
//! GF(2^8) products use two 16-entry pshufb tables per constant (one per nibble);
//! multiplication by g, the step of the Q syndrome, needs no table: double each byte
//! and XOR 0x1d into the bytes whose top bit fell off (md's `gen_syndrome` trick).
//!
//! The kernels cover the whole vectors of a buffer and return how many bytes that
//! was; the scalar kernels finish the tail.

use crate::Holes;

mod avx2;
mod ssse3;

pub(crate) use avx2::kernels as avx2_kernels;
pub(crate) use ssse3::kernels as ssse3_kernels;

/// One SIMD register of bytes and the operations the kernels need.
///
/// # Safety
///
/// Every method may only run on a CPU that has the implementing type's instruction
/// set; `load` and `store` also need `BYTES` readable (writable) bytes at the pointer.
pub(crate) trait Vector: Copy {
    const BYTES: usize;
    /// A constant's pshufb tables, loaded into registers once per kernel call.
    type Table: Copy;
    // SAFETY (every method): see the trait's `# Safety` above.
    unsafe fn zero() -> Self;
    unsafe fn load(src: *const u8) -> Self;
    unsafe fn store(self, dst: *mut u8);
    unsafe fn xor(self, other: Self) -> Self;
    /// g · self, bytewise.
    unsafe fn mul2(self) -> Self;
    unsafe fn table(c: u8) -> Self::Table;
    /// c · self, bytewise, where `table` is `Self::table(c)`.
    unsafe fn mul(self, table: Self::Table) -> Self;
}

/// Vectors per loop step: enough independent dependency chains to keep the vector
/// units busy (the Q chain is five dependent operations per data block).
const UNROLL: usize = 4;

pub(crate) const INIT_ZERO: u8 = 0;
pub(crate) const INIT_DST: u8 = 1;
pub(crate) const INIT_BUF: u8 = 2;

/// One step of [`xor_body`]: `U` vectors at `offset`.
///
/// # Safety
///
/// The CPU has `V`'s instruction set; `dst`, `init` (unless `MODE` is `INIT_ZERO`)
/// and every source that is not a hole are valid for `offset + U * V::BYTES` bytes.
#[inline(always)]
unsafe fn xor_step<V: Vector, const U: usize, const MODE: u8, const HOLES: bool>(
    dst: *mut u8,
    init: *const u8,
    srcs: &[&[u8]],
    holes: Holes,
    offset: usize,
) {
    // SAFETY: the caller's contract: every pointer below stays within the first
    // `offset + U * V::BYTES` bytes of a buffer at least that long, and the CPU has V.
    unsafe {
        let mut acc = [V::zero(); U];
        if MODE != INIT_ZERO {
            let base = if MODE == INIT_DST { dst.cast_const() } else { init }.add(offset);
            for (k, a) in acc.iter_mut().enumerate() {
                *a = V::load(base.add(k * V::BYTES));
            }
        }
        for (i, src) in srcs.iter().enumerate() {
            if HOLES && holes.contains(i) {
                continue;
            }
            let base = src.as_ptr().add(offset);
            for (k, a) in acc.iter_mut().enumerate() {
                *a = a.xor(V::load(base.add(k * V::BYTES)));
            }
        }
        for (k, a) in acc.iter().enumerate() {
            a.store(dst.add(offset + k * V::BYTES));
        }
    }
}

/// dst = init ^ (XOR of the sources that are not holes) over the whole vectors of
/// `len`; returns the bytes done.
///
/// # Safety
///
/// The CPU has `V`'s instruction set; `dst`, `init` (unless `MODE` is `INIT_ZERO`)
/// and every source that is not a hole are valid for `len` bytes.
#[inline(always)]
pub(crate) unsafe fn xor_body<V: Vector, const MODE: u8, const HOLES: bool>(
    dst: *mut u8,
    init: *const u8,
    srcs: &[&[u8]],
    holes: Holes,
    len: usize,
) -> usize {
    let mut offset = 0;
    // SAFETY: each step stays below `len` (the loop conditions), as its contract asks.
    unsafe {
        while offset + UNROLL * V::BYTES <= len {
            xor_step::<V, UNROLL, MODE, HOLES>(dst, init, srcs, holes, offset);
            offset += UNROLL * V::BYTES;
        }
        while offset + V::BYTES <= len {
            xor_step::<V, 1, MODE, HOLES>(dst, init, srcs, holes, offset);
            offset += V::BYTES;
        }
    }
    offset
}

/// One step of [`syndrome_body`]: `U` vectors at `offset`.
///
/// # Safety
///
/// The CPU has `V`'s instruction set; `data` is not empty; `q`, `p` (when `WANT_P`)
/// and every data block that is not a hole are valid for `offset + U * V::BYTES` bytes.
#[inline(always)]
unsafe fn syndrome_step<V: Vector, const U: usize, const HOLES: bool, const WANT_P: bool>(
    data: &[&[u8]],
    holes: Holes,
    p: *mut u8,
    q: *mut u8,
    offset: usize,
) {
    let top = data.len() - 1;
    // SAFETY: the caller's contract: every pointer below stays within the first
    // `offset + U * V::BYTES` bytes of a buffer at least that long, and the CPU has V.
    unsafe {
        let mut pv = [V::zero(); U];
        let mut qv = [V::zero(); U];
        if !(HOLES && holes.contains(top)) {
            let base = data[top].as_ptr().add(offset);
            for k in 0..U {
                pv[k] = V::load(base.add(k * V::BYTES));
                qv[k] = pv[k];
            }
        }
        for z in (0..top).rev() {
            for qk in qv.iter_mut() {
                *qk = qk.mul2();
            }
            if HOLES && holes.contains(z) {
                continue;
            }
            let base = data[z].as_ptr().add(offset);
            for k in 0..U {
                let d = V::load(base.add(k * V::BYTES));
                qv[k] = qv[k].xor(d);
                if WANT_P {
                    pv[k] = pv[k].xor(d);
                }
            }
        }
        for k in 0..U {
            if WANT_P {
                pv[k].store(p.add(offset + k * V::BYTES));
            }
            qv[k].store(q.add(offset + k * V::BYTES));
        }
    }
}

/// p = XOR and q = Σ g^i · data[i] of the data blocks that are not holes, over the
/// whole vectors of `len`; returns the bytes done.
///
/// # Safety
///
/// The CPU has `V`'s instruction set; `data` is not empty; `q`, `p` (when `WANT_P`)
/// and every data block that is not a hole are valid for `len` bytes.
#[inline(always)]
pub(crate) unsafe fn syndrome_body<V: Vector, const HOLES: bool, const WANT_P: bool>(
    data: &[&[u8]],
    holes: Holes,
    p: *mut u8,
    q: *mut u8,
    len: usize,
) -> usize {
    let mut offset = 0;
    // SAFETY: each step stays below `len` (the loop conditions), as its contract asks.
    unsafe {
        while offset + UNROLL * V::BYTES <= len {
            syndrome_step::<V, UNROLL, HOLES, WANT_P>(data, holes, p, q, offset);
            offset += UNROLL * V::BYTES;
        }
        while offset + V::BYTES <= len {
            syndrome_step::<V, 1, HOLES, WANT_P>(data, holes, p, q, offset);
            offset += V::BYTES;
        }
    }
    offset
}

/// The two-input, two-output kernels below share this shape: per vector, read `a`
/// and `b` (and the outputs), write `x` and `y`. `step` gets (a, b, x, y) and
/// returns the new (x, y).
///
/// # Safety
///
/// The CPU has `V`'s instruction set; all four pointers are valid for `len` bytes.
#[inline(always)]
unsafe fn pairwise_body<V: Vector>(
    a: *const u8,
    b: *const u8,
    x: *mut u8,
    y: *mut u8,
    len: usize,
    step: impl Fn(V, V, V, V) -> (V, V),
) -> usize {
    let mut offset = 0;
    // SAFETY: every access is at `offset < len - V::BYTES + 1` (loop condition), inside
    // the four buffers, which the caller guarantees are `len` bytes long.
    unsafe {
        while offset + V::BYTES <= len {
            let (nx, ny) =
                step(V::load(a.add(offset)), V::load(b.add(offset)), V::load(x.add(offset)), V::load(y.add(offset)));
            nx.store(x.add(offset));
            ny.store(y.add(offset));
            offset += V::BYTES;
        }
    }
    offset
}

/// delta = old ^ new; p ^= delta; q ^= c · delta. Returns the bytes done.
///
/// # Safety
///
/// The CPU has `V`'s instruction set; all four buffers are valid for `len` bytes.
#[inline(always)]
pub(crate) unsafe fn update_pq_body<V: Vector>(
    old: *const u8,
    new: *const u8,
    c: u8,
    p: *mut u8,
    q: *mut u8,
    len: usize,
) -> usize {
    // SAFETY: forwarded contract; `table` only needs the CPU feature.
    unsafe {
        let table = V::table(c);
        pairwise_body::<V>(old, new, p, q, len, |o, n, p, q| {
            let delta = o.xor(n);
            (p.xor(delta), q.xor(delta.mul(table)))
        })
    }
}

/// Data block and P lost: dx = c · (q ^ dx); p ^= dx. Returns the bytes done.
///
/// # Safety
///
/// The CPU has `V`'s instruction set; all three buffers are valid for `len` bytes.
#[inline(always)]
pub(crate) unsafe fn finish_data_p_body<V: Vector>(q: *const u8, c: u8, dx: *mut u8, p: *mut u8, len: usize) -> usize {
    // SAFETY: forwarded contract (`q` is read twice through the pairwise shape's two
    // inputs, which is fine for a shared buffer).
    unsafe {
        let table = V::table(c);
        pairwise_body::<V>(q, q, dx, p, len, |q, _, dx, p| {
            let d = q.xor(dx).mul(table);
            (d, p.xor(d))
        })
    }
}

/// Data block and Q lost: dx ^= p; q ^= c · dx. Returns the bytes done.
///
/// # Safety
///
/// The CPU has `V`'s instruction set; all three buffers are valid for `len` bytes.
#[inline(always)]
pub(crate) unsafe fn finish_data_q_body<V: Vector>(p: *const u8, c: u8, dx: *mut u8, q: *mut u8, len: usize) -> usize {
    // SAFETY: forwarded contract, as in `finish_data_p_body`.
    unsafe {
        let table = V::table(c);
        pairwise_body::<V>(p, p, dx, q, len, |p, _, dx, q| {
            let d = dx.xor(p);
            (d, q.xor(d.mul(table)))
        })
    }
}

/// Two data blocks lost: px = p ^ dx; qx = q ^ dy; dx = cq·qx ^ cp·px; dy = px ^ dx.
/// Returns the bytes done.
///
/// # Safety
///
/// The CPU has `V`'s instruction set; all four buffers are valid for `len` bytes.
#[inline(always)]
pub(crate) unsafe fn finish_two_data_body<V: Vector>(
    p: *const u8,
    q: *const u8,
    cp: u8,
    cq: u8,
    dx: *mut u8,
    dy: *mut u8,
    len: usize,
) -> usize {
    // SAFETY: forwarded contract; `table` only needs the CPU feature.
    unsafe {
        let (by_p, by_q) = (V::table(cp), V::table(cq));
        pairwise_body::<V>(p, q, dx, dy, len, |p, q, dx, dy| {
            let px = p.xor(dx);
            let qx = q.xor(dy);
            let x = qx.mul(by_q).xor(px.mul(by_p));
            (x, px.xor(x))
        })
    }
}

/// Panics unless every source that is not a hole is `len` bytes long: the SIMD
/// kernels read that far through raw pointers. The public API has already returned an
/// error for such input, so this never fires; it keeps each entry sound on its own.
#[inline]
fn assert_sources(len: usize, srcs: &[&[u8]], holes: Holes) {
    for (i, src) in srcs.iter().enumerate() {
        assert!(holes.contains(i) || src.len() == len, "parity kernel: source {i} is not {len} bytes");
    }
}

/// The entry points of one instruction set's kernel table: each checks the lengths
/// its raw-pointer loop relies on, runs the SIMD body under the instruction set, and
/// lets the scalar kernel finish the tail.
macro_rules! isa_kernels {
    ($vector:ty, $feature:tt, $implementation:expr) => {
        use crate::x86::{self as generic, INIT_BUF, INIT_DST, INIT_ZERO};
        use crate::{scalar, Holes, Init, Kernels};

        /// This instruction set's table, once the CPU has been seen to have it.
        pub(crate) fn kernels() -> Option<&'static Kernels> {
            if std::arch::is_x86_feature_detected!($feature) {
                Some(&KERNELS)
            } else {
                None
            }
        }

        // Reachable only through `kernels()`, i.e. after the CPU check: that is what
        // makes the `unsafe` calls of the entries below sound.
        static KERNELS: Kernels = Kernels {
            implementation: $implementation,
            xor: xor_entry,
            syndrome: syndrome_entry,
            update_pq: update_pq_entry,
            finish_data_p: finish_data_p_entry,
            finish_data_q: finish_data_q_entry,
            finish_two_data: finish_two_data_entry,
        };

        /// # Safety
        ///
        /// As `generic::xor_body`, less the CPU feature, which this function enables.
        #[target_feature(enable = $feature)]
        unsafe fn xor_simd<const MODE: u8, const HOLES: bool>(
            dst: *mut u8,
            init: *const u8,
            srcs: &[&[u8]],
            holes: Holes,
            len: usize,
        ) -> usize {
            // SAFETY: forwarded contract; the feature is enabled on this function.
            unsafe { generic::xor_body::<$vector, MODE, HOLES>(dst, init, srcs, holes, len) }
        }

        /// # Safety
        ///
        /// As `generic::syndrome_body`, less the CPU feature, which this function enables.
        #[target_feature(enable = $feature)]
        unsafe fn syndrome_simd<const HOLES: bool, const WANT_P: bool>(
            data: &[&[u8]],
            holes: Holes,
            p: *mut u8,
            q: *mut u8,
            len: usize,
        ) -> usize {
            // SAFETY: forwarded contract; the feature is enabled on this function.
            unsafe { generic::syndrome_body::<$vector, HOLES, WANT_P>(data, holes, p, q, len) }
        }

        /// # Safety
        ///
        /// As `generic::update_pq_body`, less the CPU feature, which this function enables.
        #[target_feature(enable = $feature)]
        unsafe fn update_pq_simd(old: *const u8, new: *const u8, c: u8, p: *mut u8, q: *mut u8, len: usize) -> usize {
            // SAFETY: forwarded contract; the feature is enabled on this function.
            unsafe { generic::update_pq_body::<$vector>(old, new, c, p, q, len) }
        }

        /// # Safety
        ///
        /// As `generic::finish_data_p_body`, less the CPU feature, which this function enables.
        #[target_feature(enable = $feature)]
        unsafe fn finish_data_p_simd(q: *const u8, c: u8, dx: *mut u8, p: *mut u8, len: usize) -> usize {
            // SAFETY: forwarded contract; the feature is enabled on this function.
            unsafe { generic::finish_data_p_body::<$vector>(q, c, dx, p, len) }
        }

        /// # Safety
        ///
        /// As `generic::finish_data_q_body`, less the CPU feature, which this function enables.
        #[target_feature(enable = $feature)]
        unsafe fn finish_data_q_simd(p: *const u8, c: u8, dx: *mut u8, q: *mut u8, len: usize) -> usize {
            // SAFETY: forwarded contract; the feature is enabled on this function.
            unsafe { generic::finish_data_q_body::<$vector>(p, c, dx, q, len) }
        }

        /// # Safety
        ///
        /// As `generic::finish_two_data_body`, less the CPU feature, which this function enables.
        #[target_feature(enable = $feature)]
        unsafe fn finish_two_data_simd(
            p: *const u8,
            q: *const u8,
            cp: u8,
            cq: u8,
            dx: *mut u8,
            dy: *mut u8,
            len: usize,
        ) -> usize {
            // SAFETY: forwarded contract; the feature is enabled on this function.
            unsafe { generic::finish_two_data_body::<$vector>(p, q, cp, cq, dx, dy, len) }
        }

        fn xor_entry(dst: &mut [u8], init: Init<'_>, srcs: &[&[u8]], holes: Holes) {
            let len = dst.len();
            generic::assert_sources(len, srcs, holes);
            let init_ptr = match init {
                Init::Buf(buf) => {
                    assert_eq!(buf.len(), len, "parity kernel: init buffer length");
                    buf.as_ptr()
                }
                Init::Zero | Init::Dst => std::ptr::null(),
            };
            let dst_ptr = dst.as_mut_ptr();
            let has_holes = !holes.is_empty();
            // SAFETY: the CPU has the feature (see KERNELS); `dst`, the init buffer and
            // every non-hole source are `len` bytes long (checked just above); the null
            // init pointer is never read in the modes that get it.
            let done = unsafe {
                match (&init, has_holes) {
                    (Init::Zero, false) => xor_simd::<INIT_ZERO, false>(dst_ptr, init_ptr, srcs, holes, len),
                    (Init::Zero, true) => xor_simd::<INIT_ZERO, true>(dst_ptr, init_ptr, srcs, holes, len),
                    (Init::Dst, false) => xor_simd::<INIT_DST, false>(dst_ptr, init_ptr, srcs, holes, len),
                    (Init::Dst, true) => xor_simd::<INIT_DST, true>(dst_ptr, init_ptr, srcs, holes, len),
                    (Init::Buf(_), false) => xor_simd::<INIT_BUF, false>(dst_ptr, init_ptr, srcs, holes, len),
                    (Init::Buf(_), true) => xor_simd::<INIT_BUF, true>(dst_ptr, init_ptr, srcs, holes, len),
                }
            };
            scalar::xor(dst, init, srcs, holes, done);
        }

        fn syndrome_entry(data: &[&[u8]], holes: Holes, mut p: Option<&mut [u8]>, q: &mut [u8]) {
            let len = q.len();
            assert!(!data.is_empty(), "parity kernel: no data blocks");
            generic::assert_sources(len, data, holes);
            if let Some(p) = p.as_deref() {
                assert_eq!(p.len(), len, "parity kernel: P length");
            }
            let q_ptr = q.as_mut_ptr();
            let has_holes = !holes.is_empty();
            let done = match p.as_deref_mut() {
                // SAFETY: the CPU has the feature (see KERNELS); `data` is not empty and
                // `q`, `p` and every non-hole block are `len` bytes long (checked above).
                Some(p) => unsafe {
                    let p_ptr = p.as_mut_ptr();
                    if has_holes {
                        syndrome_simd::<true, true>(data, holes, p_ptr, q_ptr, len)
                    } else {
                        syndrome_simd::<false, true>(data, holes, p_ptr, q_ptr, len)
                    }
                },
                // SAFETY: as above; P is not written, so its null pointer is never used.
                None => unsafe {
                    if has_holes {
                        syndrome_simd::<true, false>(data, holes, std::ptr::null_mut(), q_ptr, len)
                    } else {
                        syndrome_simd::<false, false>(data, holes, std::ptr::null_mut(), q_ptr, len)
                    }
                },
            };
            scalar::syndrome(data, holes, p, q, done);
        }

        fn update_pq_entry(old: &[u8], new: &[u8], c: u8, p: &mut [u8], q: &mut [u8]) {
            let len = p.len();
            assert!(old.len() == len && new.len() == len && q.len() == len, "parity kernel: lengths");
            // SAFETY: the CPU has the feature (see KERNELS); the four buffers are `len`
            // bytes long (checked just above).
            let done = unsafe { update_pq_simd(old.as_ptr(), new.as_ptr(), c, p.as_mut_ptr(), q.as_mut_ptr(), len) };
            scalar::update_pq(old, new, c, p, q, done);
        }

        fn finish_data_p_entry(q: &[u8], c: u8, dx: &mut [u8], p: &mut [u8]) {
            let len = dx.len();
            assert!(q.len() == len && p.len() == len, "parity kernel: lengths");
            // SAFETY: the CPU has the feature (see KERNELS); the three buffers are `len`
            // bytes long (checked just above).
            let done = unsafe { finish_data_p_simd(q.as_ptr(), c, dx.as_mut_ptr(), p.as_mut_ptr(), len) };
            scalar::finish_data_p(q, c, dx, p, done);
        }

        fn finish_data_q_entry(p: &[u8], c: u8, dx: &mut [u8], q: &mut [u8]) {
            let len = dx.len();
            assert!(p.len() == len && q.len() == len, "parity kernel: lengths");
            // SAFETY: the CPU has the feature (see KERNELS); the three buffers are `len`
            // bytes long (checked just above).
            let done = unsafe { finish_data_q_simd(p.as_ptr(), c, dx.as_mut_ptr(), q.as_mut_ptr(), len) };
            scalar::finish_data_q(p, c, dx, q, done);
        }

        fn finish_two_data_entry(p: &[u8], q: &[u8], cp: u8, cq: u8, dx: &mut [u8], dy: &mut [u8]) {
            let len = dx.len();
            assert!(p.len() == len && q.len() == len && dy.len() == len, "parity kernel: lengths");
            let (p_ptr, q_ptr, dx_ptr, dy_ptr) = (p.as_ptr(), q.as_ptr(), dx.as_mut_ptr(), dy.as_mut_ptr());
            // SAFETY: the CPU has the feature (see KERNELS); the four buffers are `len`
            // bytes long (checked just above).
            let done = unsafe { finish_two_data_simd(p_ptr, q_ptr, cp, cq, dx_ptr, dy_ptr, len) };
            scalar::finish_two_data(p, q, cp, cq, dx, dy, done);
        }
    };
}
pub(crate) use isa_kernels;
