//! AVX2: 32-byte registers. pshufb works within each 128-bit lane, so a constant's
//! two nibble tables are broadcast to both lanes.
// The intrinsics that only compute on registers are safe to call inside an
// AVX2-enabled function since Rust 1.87; the workspace's minimum Rust (1.85) still
// needs them in `unsafe` blocks, which newer compilers then call unused.
#![allow(unused_unsafe)]

use std::arch::x86_64::*;

use crate::gf::NIBBLE_TABLES;
use crate::x86::Vector;
use crate::Implementation;

#[derive(Clone, Copy)]
pub(crate) struct Avx2(__m256i);

impl Vector for Avx2 {
    const BYTES: usize = 32;
    type Table = (__m256i, __m256i);

    // SAFETY: callers keep `Vector`'s contract: the CPU has AVX2, and a pointer
    // names 32 bytes to read (load) or write (store).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn zero() -> Self {
        // SAFETY: AVX is enabled on this function (the trait's contract: the CPU has it).
        Avx2(unsafe { _mm256_setzero_si256() })
    }

    // SAFETY: callers keep `Vector`'s contract: the CPU has AVX2, and a pointer
    // names 32 bytes to read (load) or write (store).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load(src: *const u8) -> Self {
        // SAFETY: the caller guarantees 32 readable bytes at `src`; loadu has no
        // alignment requirement.
        Avx2(unsafe { _mm256_loadu_si256(src.cast()) })
    }

    // SAFETY: callers keep `Vector`'s contract: the CPU has AVX2, and a pointer
    // names 32 bytes to read (load) or write (store).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store(self, dst: *mut u8) {
        // SAFETY: the caller guarantees 32 writable bytes at `dst`; storeu has no
        // alignment requirement.
        unsafe { _mm256_storeu_si256(dst.cast(), self.0) }
    }

    // SAFETY: callers keep `Vector`'s contract: the CPU has AVX2, and a pointer
    // names 32 bytes to read (load) or write (store).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn xor(self, other: Self) -> Self {
        // SAFETY: register-only intrinsic; AVX2 is enabled on this function.
        Avx2(unsafe { _mm256_xor_si256(self.0, other.0) })
    }

    // SAFETY: callers keep `Vector`'s contract: the CPU has AVX2, and a pointer
    // names 32 bytes to read (load) or write (store).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn mul2(self) -> Self {
        // SAFETY: register-only intrinsics; AVX2 is enabled on this function.
        unsafe {
            // 0xff in each byte whose top bit is set (a signed byte below zero).
            let overflow = _mm256_cmpgt_epi8(_mm256_setzero_si256(), self.0);
            let doubled = _mm256_add_epi8(self.0, self.0);
            Avx2(_mm256_xor_si256(doubled, _mm256_and_si256(overflow, _mm256_set1_epi8(0x1d))))
        }
    }

    // SAFETY: callers keep `Vector`'s contract: the CPU has AVX2, and a pointer
    // names 32 bytes to read (load) or write (store).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn table(c: u8) -> Self::Table {
        let tables = &NIBBLE_TABLES[c as usize];
        // SAFETY: `tables` is 32 bytes, so both 16-byte unaligned loads are in bounds;
        // AVX2 is enabled on this function.
        unsafe {
            let low = _mm_loadu_si128(tables.as_ptr().cast());
            let high = _mm_loadu_si128(tables.as_ptr().add(16).cast());
            (_mm256_broadcastsi128_si256(low), _mm256_broadcastsi128_si256(high))
        }
    }

    // SAFETY: callers keep `Vector`'s contract: the CPU has AVX2, and a pointer
    // names 32 bytes to read (load) or write (store).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn mul(self, table: Self::Table) -> Self {
        // SAFETY: register-only intrinsics; AVX2 is enabled on this function.
        unsafe {
            let nibble = _mm256_set1_epi8(0x0f);
            let low = _mm256_and_si256(self.0, nibble);
            let high = _mm256_and_si256(_mm256_srli_epi16::<4>(self.0), nibble);
            Avx2(_mm256_xor_si256(_mm256_shuffle_epi8(table.0, low), _mm256_shuffle_epi8(table.1, high)))
        }
    }
}

crate::x86::isa_kernels!(Avx2, "avx2", Implementation::Avx2);
