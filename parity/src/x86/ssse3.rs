//! SSSE3: 16-byte registers; pshufb is the SSSE3 instruction, the rest is SSE2
//! (part of every x86_64 CPU).
// The intrinsics that only compute on registers are safe to call inside an
// SSSE3-enabled function since Rust 1.87; the workspace's minimum Rust (1.85) still
// needs them in `unsafe` blocks, which newer compilers then call unused.
#![allow(unused_unsafe)]

use std::arch::x86_64::*;

use crate::gf::NIBBLE_TABLES;
use crate::x86::Vector;
use crate::Implementation;

#[derive(Clone, Copy)]
pub(crate) struct Ssse3(__m128i);

impl Vector for Ssse3 {
    const BYTES: usize = 16;
    type Table = (__m128i, __m128i);

    // SAFETY: callers keep `Vector`'s contract: the CPU has SSSE3, and a pointer
    // names 16 bytes to read (load) or write (store).
    #[inline]
    #[target_feature(enable = "ssse3")]
    unsafe fn zero() -> Self {
        // SAFETY: SSE2 is part of x86_64.
        Ssse3(unsafe { _mm_setzero_si128() })
    }

    // SAFETY: callers keep `Vector`'s contract: the CPU has SSSE3, and a pointer
    // names 16 bytes to read (load) or write (store).
    #[inline]
    #[target_feature(enable = "ssse3")]
    unsafe fn load(src: *const u8) -> Self {
        // SAFETY: the caller guarantees 16 readable bytes at `src`; loadu has no
        // alignment requirement.
        Ssse3(unsafe { _mm_loadu_si128(src.cast()) })
    }

    // SAFETY: callers keep `Vector`'s contract: the CPU has SSSE3, and a pointer
    // names 16 bytes to read (load) or write (store).
    #[inline]
    #[target_feature(enable = "ssse3")]
    unsafe fn store(self, dst: *mut u8) {
        // SAFETY: the caller guarantees 16 writable bytes at `dst`; storeu has no
        // alignment requirement.
        unsafe { _mm_storeu_si128(dst.cast(), self.0) }
    }

    // SAFETY: callers keep `Vector`'s contract: the CPU has SSSE3, and a pointer
    // names 16 bytes to read (load) or write (store).
    #[inline]
    #[target_feature(enable = "ssse3")]
    unsafe fn xor(self, other: Self) -> Self {
        // SAFETY: register-only SSE2 intrinsic.
        Ssse3(unsafe { _mm_xor_si128(self.0, other.0) })
    }

    // SAFETY: callers keep `Vector`'s contract: the CPU has SSSE3, and a pointer
    // names 16 bytes to read (load) or write (store).
    #[inline]
    #[target_feature(enable = "ssse3")]
    unsafe fn mul2(self) -> Self {
        // SAFETY: register-only SSE2 intrinsics.
        unsafe {
            // 0xff in each byte whose top bit is set (a signed byte below zero).
            let overflow = _mm_cmpgt_epi8(_mm_setzero_si128(), self.0);
            let doubled = _mm_add_epi8(self.0, self.0);
            Ssse3(_mm_xor_si128(doubled, _mm_and_si128(overflow, _mm_set1_epi8(0x1d))))
        }
    }

    // SAFETY: callers keep `Vector`'s contract: the CPU has SSSE3, and a pointer
    // names 16 bytes to read (load) or write (store).
    #[inline]
    #[target_feature(enable = "ssse3")]
    unsafe fn table(c: u8) -> Self::Table {
        let tables = &NIBBLE_TABLES[c as usize];
        // SAFETY: `tables` is 32 bytes, so both 16-byte unaligned loads are in bounds.
        unsafe { (_mm_loadu_si128(tables.as_ptr().cast()), _mm_loadu_si128(tables.as_ptr().add(16).cast())) }
    }

    // SAFETY: callers keep `Vector`'s contract: the CPU has SSSE3, and a pointer
    // names 16 bytes to read (load) or write (store).
    #[inline]
    #[target_feature(enable = "ssse3")]
    unsafe fn mul(self, table: Self::Table) -> Self {
        // SAFETY: register-only intrinsics; SSSE3 (pshufb) is enabled on this function.
        unsafe {
            let nibble = _mm_set1_epi8(0x0f);
            let low = _mm_and_si128(self.0, nibble);
            let high = _mm_and_si128(_mm_srli_epi16::<4>(self.0), nibble);
            Ssse3(_mm_xor_si128(_mm_shuffle_epi8(table.0, low), _mm_shuffle_epi8(table.1, high)))
        }
    }
}

crate::x86::isa_kernels!(Ssse3, "ssse3", Implementation::Ssse3);
