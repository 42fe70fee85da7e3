//! GF(2^8) as md's raid6 uses it: polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d),
//! generator g = {02} (H. Peter Anvin, "The mathematics of RAID-6"). The tables are
//! built at compile time; the scalar kernels use log/exp, the SIMD kernels the
//! per-constant nibble tables.

/// The field's reducing polynomial, with the x^8 bit.
pub const POLYNOMIAL: u16 = 0x11d;

/// The order of the multiplicative group: g^255 = 1, so Q can tell apart at most
/// 255 data blocks.
pub const GROUP_ORDER: usize = 255;

/// exp[i] = g^i for i in 0..510 (doubled so that log a + log b needs no reduction).
pub(crate) static EXP: [u8; 512] = build_exp();
/// log[a] = i with g^i = a, for a != 0 (log[0] is unused and left 0).
pub(crate) static LOG: [u8; 256] = build_log();
/// For every constant c, 16 bytes c·n and 16 bytes c·(n << 4) for n in 0..16: the
/// pshufb tables that multiply a vector by c one nibble at a time.
pub(crate) static NIBBLE_TABLES: [[u8; 32]; 256] = build_nibble_tables();

const fn build_exp() -> [u8; 512] {
    let mut exp = [0u8; 512];
    let mut x: u16 = 1;
    let mut i = 0;
    while i < GROUP_ORDER {
        exp[i] = x as u8;
        exp[i + GROUP_ORDER] = x as u8;
        x <<= 1;
        if x & 0x100 != 0 {
            x ^= POLYNOMIAL;
        }
        i += 1;
    }
    exp
}

const fn build_log() -> [u8; 256] {
    let exp = build_exp();
    let mut log = [0u8; 256];
    let mut i = 0;
    while i < GROUP_ORDER {
        log[exp[i] as usize] = i as u8;
        i += 1;
    }
    log
}

const fn const_mul(a: u8, b: u8) -> u8 {
    // Shift-and-add, usable in const context (the tables above are not yet built).
    let (mut a, mut b, mut product) = (a as u16, b, 0u16);
    while b != 0 {
        if b & 1 != 0 {
            product ^= a;
        }
        a <<= 1;
        if a & 0x100 != 0 {
            a ^= POLYNOMIAL;
        }
        b >>= 1;
    }
    product as u8
}

const fn build_nibble_tables() -> [[u8; 32]; 256] {
    let mut tables = [[0u8; 32]; 256];
    let mut c = 0;
    while c < 256 {
        let mut n = 0;
        while n < 16 {
            tables[c][n] = const_mul(c as u8, n as u8);
            tables[c][16 + n] = const_mul(c as u8, (n << 4) as u8);
            n += 1;
        }
        c += 1;
    }
    tables
}

/// a · b in the field.
#[inline]
pub fn mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        0
    } else {
        EXP[LOG[a as usize] as usize + LOG[b as usize] as usize]
    }
}

/// g^i (i taken modulo 255, since g^255 = 1).
#[inline]
pub fn exp2(i: usize) -> u8 {
    EXP[i % GROUP_ORDER]
}

/// The multiplicative inverse of a non-zero element; `None` for 0.
#[inline]
pub fn inv(a: u8) -> Option<u8> {
    if a == 0 {
        None
    } else {
        Some(EXP[(GROUP_ORDER - LOG[a as usize] as usize) % GROUP_ORDER])
    }
}

/// b · c with c's logarithm already looked up (c != 0): the scalar kernels' inner step.
#[inline]
pub(crate) fn mul_by_log(b: u8, log_c: usize) -> u8 {
    if b == 0 {
        0
    } else {
        EXP[LOG[b as usize] as usize + log_c]
    }
}

/// g^-i, the constant that undoes the Q weight of data index i.
#[inline]
pub(crate) fn exp2_neg(i: usize) -> u8 {
    EXP[(GROUP_ORDER - i % GROUP_ORDER) % GROUP_ORDER]
}
