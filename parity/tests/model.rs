//! The parity kernels against a scalar model written here, independently of the
//! crate: its own GF(2^8) log/exp tables, Q as the plain sum Σ g^i · D_i (not
//! Horner's rule), recovery checked by comparing with the data that was erased.
//! Every implementation this CPU has is run explicitly, every member count from 3
//! (raid5) / 4 (raid6) to 16, every one- and two-failure case. Randomized cases are
//! generated from a seed that the failure message prints.

use parity::{gf, Buffer, Implementation, Parity, ParityError};
use proptest::prelude::*;

/// GF(2^8) with polynomial 0x11d, built by repeated doubling.
struct Model {
    exp: [u8; 255],
    log: [u8; 256],
}

impl Model {
    fn new() -> Model {
        let mut model = Model { exp: [0; 255], log: [0; 256] };
        let mut x: u8 = 1;
        for i in 0..255 {
            model.exp[i] = x;
            model.log[x as usize] = i as u8;
            let carry = x & 0x80 != 0;
            x <<= 1;
            if carry {
                x ^= 0x1d; // x^8 = x^4 + x^3 + x^2 + 1
            }
        }
        assert_eq!(x, 1, "g = 2 must have order 255");
        model
    }

    fn mul(&self, a: u8, b: u8) -> u8 {
        if a == 0 || b == 0 {
            return 0;
        }
        self.exp[(self.log[a as usize] as usize + self.log[b as usize] as usize) % 255]
    }

    fn p(&self, data: &[Vec<u8>], len: usize) -> Vec<u8> {
        (0..len).map(|o| data.iter().fold(0, |acc, d| acc ^ d[o])).collect()
    }

    fn q(&self, data: &[Vec<u8>], len: usize) -> Vec<u8> {
        (0..len)
            .map(|o| data.iter().enumerate().fold(0, |acc, (i, d)| acc ^ self.mul(self.exp[i % 255], d[o])))
            .collect()
    }
}

/// splitmix64: the data of a case comes from its seed alone.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Every implementation this CPU runs, each pinned explicitly. Scalar always runs; a
/// SIMD set the CPU lacks is named on stderr on a developer's machine and fails the
/// tests under CI (`CI` set), where every kernel must be checked.
fn implementations() -> Vec<Parity> {
    let under_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"));
    let mut out = Vec::new();
    for implementation in Implementation::ALL {
        match Parity::new(implementation) {
            Ok(parity) => out.push(parity),
            Err(e) => {
                assert!(!under_ci, "{implementation} cannot be tested on this CPU under CI: {e}");
                eprintln!("NOT TESTED on this CPU: {implementation}: {e}");
            }
        }
    }
    assert!(out.iter().any(|p| p.implementation() == Implementation::Scalar));
    out
}

fn refs(blocks: &[Vec<u8>]) -> Vec<&[u8]> {
    blocks.iter().map(|b| b.as_slice()).collect()
}

/// The data array with the lost entries replaced by empty slices (they must be ignored).
fn survivors<'a>(data: &'a [Vec<u8>], lost: &[usize]) -> Vec<&'a [u8]> {
    data.iter().enumerate().map(|(i, d)| if lost.contains(&i) { &[][..] } else { d.as_slice() }).collect()
}

/// One raid5 case: P, accumulate, read-modify-write, every one-failure repair.
fn check_raid5(model: &Model, parity: Parity, data_blocks: usize, len: usize, seed: u64) {
    let ctx = format!("raid5 {} data blocks, {len} bytes, {}, seed {seed:#x}", data_blocks, parity.implementation());
    let mut rng = Rng(seed);
    let data: Vec<Vec<u8>> = (0..data_blocks).map(|_| rng.bytes(len)).collect();
    let expected_p = model.p(&data, len);

    let mut p = rng.bytes(len); // garbage: gen_p must overwrite, not accumulate
    parity.gen_p(&refs(&data), &mut p).unwrap();
    assert_eq!(p, expected_p, "gen_p: {ctx}");

    // xor_into accumulates onto what dst holds.
    let start = rng.bytes(len);
    let mut acc = start.clone();
    parity.xor_into(&mut acc, &refs(&data)).unwrap();
    let expected: Vec<u8> = start.iter().zip(&expected_p).map(|(a, b)| a ^ b).collect();
    assert_eq!(acc, expected, "xor_into: {ctx}");

    // Read-modify-write of one block.
    let index = rng.below(data_blocks);
    let new = rng.bytes(len);
    let mut updated = data.clone();
    updated[index] = new.clone();
    let mut p_rmw = p.clone();
    parity.update_p(&mut p_rmw, &data[index], &new).unwrap();
    assert_eq!(p_rmw, model.p(&updated, len), "update_p of block {index}: {ctx}");

    // Every single failure: each data block, then P.
    for lost in 0..data_blocks {
        let mut out = rng.bytes(len);
        parity.recover_data_from_p(&survivors(&data, &[lost]), lost, &p, &mut out).unwrap();
        assert_eq!(out, data[lost], "recover data {lost} from P: {ctx}");
    }
    let mut p_again = rng.bytes(len);
    parity.gen_p(&refs(&data), &mut p_again).unwrap();
    assert_eq!(p_again, expected_p, "regenerate P: {ctx}");
}

/// One raid6 case: P+Q, Q alone, read-modify-write, and every one- and two-failure
/// repair among the data blocks, P (member `n`) and Q (member `n + 1`).
fn check_raid6(model: &Model, parity: Parity, n: usize, len: usize, seed: u64) {
    let ctx = format!("raid6 {n} data blocks, {len} bytes, {}, seed {seed:#x}", parity.implementation());
    let mut rng = Rng(seed);
    let data: Vec<Vec<u8>> = (0..n).map(|_| rng.bytes(len)).collect();
    let (expected_p, expected_q) = (model.p(&data, len), model.q(&data, len));

    let (mut p, mut q) = (rng.bytes(len), rng.bytes(len));
    parity.gen_pq(&refs(&data), &mut p, &mut q).unwrap();
    assert_eq!(p, expected_p, "gen_pq P: {ctx}");
    assert_eq!(q, expected_q, "gen_pq Q: {ctx}");

    let index = rng.below(n);
    let new = rng.bytes(len);
    let mut updated = data.clone();
    updated[index] = new.clone();
    let (mut p_rmw, mut q_rmw) = (p.clone(), q.clone());
    parity.update_pq(index, &data[index], &new, &mut p_rmw, &mut q_rmw).unwrap();
    assert_eq!(p_rmw, model.p(&updated, len), "update_pq P, block {index}: {ctx}");
    assert_eq!(q_rmw, model.q(&updated, len), "update_pq Q, block {index}: {ctx}");

    for a in 0..n + 2 {
        repair(&mut rng, parity, &data, &p, &q, &[a], &ctx);
        for b in a + 1..n + 2 {
            // Both orders of the pair: the lost pair need not be sorted.
            let lost = if rng.next() & 1 == 0 { [a, b] } else { [b, a] };
            repair(&mut rng, parity, &data, &p, &q, &lost, &ctx);
        }
    }
}

/// Erases the `lost` members (data indices, `n` = P, `n + 1` = Q), repairs them with
/// the call the crate documents for that case, and compares with the originals.
fn repair(rng: &mut Rng, parity: Parity, data: &[Vec<u8>], p: &[u8], q: &[u8], lost: &[usize], ctx: &str) {
    let (n, len) = (data.len(), p.len());
    let (pm, qm) = (n, n + 1);
    let lost_data: Vec<usize> = lost.iter().copied().filter(|&m| m < n).collect();
    let (lost_p, lost_q) = (lost.contains(&pm), lost.contains(&qm));
    let live = survivors(data, &lost_data);
    let ctx = format!("{ctx}, lost members {lost:?} (P = {pm}, Q = {qm})");
    // Outputs start as garbage, so a kernel that accumulates instead of writing fails.
    let mut outs: Vec<Vec<u8>> = lost_data.iter().map(|_| rng.bytes(len)).collect();
    let (mut p_out, mut q_out) = (rng.bytes(len), rng.bytes(len));
    match (lost_data.as_slice(), lost_p, lost_q) {
        ([], true, false) => parity.gen_p(&live, &mut p_out).unwrap(),
        ([], false, true) => parity.gen_q(&live, &mut q_out).unwrap(),
        ([], true, true) => parity.gen_pq(&live, &mut p_out, &mut q_out).unwrap(),
        (&[x], false, false) => parity.recover_data_from_p(&live, x, p, &mut outs[0]).unwrap(),
        (&[x], true, false) => parity.recover_data_and_p(&live, x, q, &mut outs[0], &mut p_out).unwrap(),
        (&[x], false, true) => parity.recover_data_and_q(&live, x, p, &mut outs[0], &mut q_out).unwrap(),
        (&[x, y], false, false) => {
            let (first, second) = outs.split_at_mut(1);
            parity.recover_two_data(&live, [x, y], p, q, [&mut first[0], &mut second[0]]).unwrap()
        }
        other => panic!("not a one- or two-failure case: {other:?}"),
    }
    for (k, &x) in lost_data.iter().enumerate() {
        assert_eq!(outs[k], data[x], "data block {x}: {ctx}");
    }
    if lost_p {
        assert_eq!(p_out, p, "P: {ctx}");
    }
    if lost_q {
        assert_eq!(q_out, q, "Q: {ctx}");
    }
}

/// Lengths that reach every path: empty, scalar-only, one SSSE3/AVX2 vector, the
/// unrolled loop, the single-vector loop after it, odd tails, a 4 KiB block.
const EDGE_LENGTHS: &[usize] =
    &[0, 1, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 160, 191, 4096, 4096 + 13];

#[test]
fn gf_known_answers() {
    // g^8 = x^4 + x^3 + x^2 + 1 = 0x1d: the reduction itself.
    assert_eq!(gf::mul(2, 0x80), 0x1d);
    assert_eq!(gf::exp2(8), 0x1d);
    // The start of the 0x11d power table (the same field as QR codes' Reed-Solomon).
    let powers: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 29, 58, 116, 232, 205, 135, 19, 38];
    for (i, &v) in powers.iter().enumerate() {
        assert_eq!(gf::exp2(i), v, "g^{i}");
    }
    assert_eq!(gf::exp2(25), 3);
    assert_eq!(gf::exp2(255), 1, "g has order 255");
    assert_eq!(gf::exp2(254), 0x8e);
    assert_eq!(gf::inv(2), Some(0x8e), "2 · 0x8e = 0x11c ^ 0x11d = 1");
    assert_eq!(gf::inv(1), Some(1));
    assert_eq!(gf::inv(0), None);
    assert_eq!(gf::mul(3, 7), 9, "carry-less 3 · 7 needs no reduction");
    assert_eq!(gf::mul(0xff, 4), 0xdb);
    assert_eq!(gf::mul(0x53, 8), 0xa2);
    assert_eq!(gf::mul(0, 0x53), 0);
    // The whole multiplication table against the model.
    let model = Model::new();
    for a in 0..=255u8 {
        for b in 0..=255u8 {
            assert_eq!(gf::mul(a, b), model.mul(a, b), "{a:#x} · {b:#x}");
        }
        if a != 0 {
            assert_eq!(gf::mul(a, gf::inv(a).unwrap()), 1, "{a:#x} · inverse");
        }
    }
}

/// Stripes worked out by hand (every byte of a block holds the same value):
/// - D = (0x01, 0x80, 0xff, 0x53): P = 0x2d, Q = 0x01 ^ 2·0x80 ^ 4·0xff ^ 8·0x53
///   = 0x01 ^ 0x1d ^ 0xdb ^ 0xa2 = 0x65;
/// - D = (0x53, 0xff, 0x80, 0x01): P = 0x2d, Q = 0x53 ^ 2·0xff ^ 4·0x80 ^ 8·0x01
///   = 0x53 ^ 0xe3 ^ 0x3a ^ 0x08 = 0x82 (Horner's rule reduces twice on the way).
#[test]
fn known_answer_stripes() {
    let cases: [([u8; 4], u8, u8); 2] =
        [([0x01, 0x80, 0xff, 0x53], 0x2d, 0x65), ([0x53, 0xff, 0x80, 0x01], 0x2d, 0x82)];
    for parity in implementations() {
        for (values, expected_p, expected_q) in cases {
            for &len in EDGE_LENGTHS {
                let ctx = format!("{values:x?}, {len} bytes, {}", parity.implementation());
                let data: Vec<Vec<u8>> = values.iter().map(|&b| vec![b; len]).collect();
                let (mut p, mut q) = (vec![0xaa; len], vec![0x55; len]);
                parity.gen_pq(&refs(&data), &mut p, &mut q).unwrap();
                assert!(p.iter().all(|&b| b == expected_p), "P: {ctx}");
                assert!(q.iter().all(|&b| b == expected_q), "Q: {ctx}");
                let mut p5 = vec![0; len];
                parity.gen_p(&refs(&data), &mut p5).unwrap();
                assert!(p5.iter().all(|&b| b == expected_p), "raid5 P: {ctx}");
            }
        }
    }
}

/// Every member count and every one- and two-failure case, at the lengths that reach
/// each code path, for every implementation: coverage that does not depend on what
/// the random cases below happen to draw.
#[test]
fn every_member_count_and_failure_at_edge_lengths() {
    let model = Model::new();
    for parity in implementations() {
        for (k, &len) in EDGE_LENGTHS.iter().enumerate() {
            // Full failure sweeps over 4 KiB blocks cost most; run them for a few counts.
            let counts: Vec<usize> = if len >= 4096 { vec![2, 5, 14] } else { (2..=15).collect() };
            for &data_blocks in &counts {
                let seed = 0x5eed_0000 + (k as u64) * 64 + data_blocks as u64;
                check_raid5(&model, parity, data_blocks, len, seed);
                if data_blocks <= 14 {
                    check_raid6(&model, parity, data_blocks, len, seed);
                }
            }
        }
    }
}

/// The implementations agree with each other byte for byte on large random buffers
/// (so a SIMD kernel cannot match the model only on short inputs).
#[test]
fn implementations_agree_on_large_buffers() {
    let impls = implementations();
    let mut rng = Rng(0xa11_a9ee);
    for len in [65536 + 31, 200_003] {
        let data: Vec<Vec<u8>> = (0..6).map(|_| rng.bytes(len)).collect();
        let mut results = Vec::new();
        for parity in &impls {
            let (mut p, mut q) = (vec![0; len], vec![0; len]);
            parity.gen_pq(&refs(&data), &mut p, &mut q).unwrap();
            let mut d = [vec![0; len], vec![0; len]];
            let [d0, d1] = &mut d;
            parity.recover_two_data(&survivors(&data, &[1, 4]), [1, 4], &p, &q, [d0, d1]).unwrap();
            assert_eq!(d[0], data[1], "{}", parity.implementation());
            assert_eq!(d[1], data[4], "{}", parity.implementation());
            results.push((parity.implementation(), p, q));
        }
        for r in &results[1..] {
            assert!(r.1 == results[0].1 && r.2 == results[0].2, "{} differs from {}", r.0, results[0].0);
        }
    }
}

/// Length and index errors come back as errors, before any kernel touches memory.
#[test]
fn bad_input_is_refused() {
    let a = vec![1u8; 64];
    let short = vec![2u8; 63];
    for parity in implementations() {
        let mut p = vec![0u8; 64];
        let mut q = vec![0u8; 64];
        assert_eq!(
            parity.gen_p(&[&a, &short], &mut p),
            Err(ParityError::LengthMismatch { buffer: Buffer::Data(1), expected: 64, found: 63 })
        );
        assert_eq!(parity.gen_p(&[], &mut p), Err(ParityError::NoData));
        assert_eq!(parity.gen_pq(&[], &mut p, &mut q), Err(ParityError::NoData));
        let mut q_short = vec![0u8; 63];
        assert!(matches!(
            parity.gen_pq(&[&a, &a], &mut p, &mut q_short),
            Err(ParityError::LengthMismatch { buffer: Buffer::Q, .. })
        ));
        assert!(matches!(
            parity.xor_into(&mut p, &[&a, &short]),
            Err(ParityError::LengthMismatch { buffer: Buffer::Source(1), .. })
        ));
        assert!(matches!(
            parity.update_pq(0, &a, &short, &mut p, &mut q),
            Err(ParityError::LengthMismatch { buffer: Buffer::New, .. })
        ));
        assert_eq!(
            parity.update_pq(255, &a, &a, &mut p, &mut q),
            Err(ParityError::IndexOutOfRange { index: 255, count: 255 })
        );
        let mut out = vec![0u8; 64];
        assert_eq!(
            parity.recover_data_from_p(&[&a, &a], 2, &a, &mut out),
            Err(ParityError::IndexOutOfRange { index: 2, count: 2 })
        );
        let (mut x, mut y) = (vec![0u8; 64], vec![0u8; 64]);
        assert_eq!(
            parity.recover_two_data(&[&a, &a, &a], [1, 1], &a, &a, [&mut x, &mut y]),
            Err(ParityError::SameBlockTwice { index: 1 })
        );
        let mut y_short = vec![0u8; 63];
        assert!(matches!(
            parity.recover_two_data(&[&a, &a, &a], [0, 2], &a, &a, [&mut x, &mut y_short]),
            Err(ParityError::LengthMismatch { buffer: Buffer::Recovered(2), .. })
        ));
        // A surviving block of the wrong length is refused; a lost one is ignored.
        assert!(matches!(
            parity.recover_data_and_q(&[&a, &short, &a], 0, &a, &mut x, &mut y),
            Err(ParityError::LengthMismatch { buffer: Buffer::Data(1), .. })
        ));
        parity.recover_data_and_q(&[&short, &a, &a], 0, &a, &mut x, &mut y).unwrap();
        let empty: &[u8] = &[];
        let too_many = vec![empty; 256];
        let (mut p0, mut q0) = (Vec::new(), Vec::new());
        assert_eq!(parity.gen_pq(&too_many, &mut p0, &mut q0), Err(ParityError::TooManyDataBlocks { count: 256 }));
        assert!(parity.gen_pq(&too_many[..255], &mut p0, &mut q0).is_ok());
    }
}

/// Start-up picks the fastest set the CPU has, and says which.
#[test]
fn the_best_available_implementation_is_chosen() {
    let first_available = Implementation::ALL.into_iter().find(|i| i.is_available()).unwrap();
    assert_eq!(parity::implementation(), first_available);
    assert_eq!(parity::implementation_name(), first_available.name());
    assert_eq!(Parity::best().implementation(), first_available);
    assert!(Implementation::Scalar.is_available());
    #[cfg(target_arch = "x86_64")]
    {
        assert_eq!(Implementation::Avx2.is_available(), std::arch::is_x86_feature_detected!("avx2"));
        assert_eq!(Implementation::Ssse3.is_available(), std::arch::is_x86_feature_detected!("ssse3"));
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        assert!(Parity::new(Implementation::Avx2).is_err());
    }
    eprintln!("parity implementation chosen: {}", parity::implementation_name());
}

/// Lengths drawn so that odd tails and several unrolled steps both occur often.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..300, 300usize..2100]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn raid5_matches_the_model(members in 3usize..=16, len in length(), seed in any::<u64>()) {
        let model = Model::new();
        for parity in implementations() {
            check_raid5(&model, parity, members - 1, len, seed);
        }
    }

    #[test]
    fn raid6_matches_the_model_and_recovers_every_double_failure(
        members in 4usize..=16,
        len in length(),
        seed in any::<u64>(),
    ) {
        let model = Model::new();
        for parity in implementations() {
            check_raid6(&model, parity, members - 2, len, seed);
        }
    }

    /// xor_into with any number of sources, including none.
    #[test]
    fn xor_into_matches_the_model(sources in 0usize..=16, len in length(), seed in any::<u64>()) {
        let model = Model::new();
        let mut rng = Rng(seed);
        let srcs: Vec<Vec<u8>> = (0..sources).map(|_| rng.bytes(len)).collect();
        let start = rng.bytes(len);
        let expected: Vec<u8> = start.iter().zip(model.p(&srcs, len)).map(|(a, b)| a ^ b).collect();
        for parity in implementations() {
            let mut dst = start.clone();
            parity.xor_into(&mut dst, &refs(&srcs)).unwrap();
            prop_assert_eq!(&dst, &expected, "{} sources, {} bytes, {}, seed {:#x}", sources, len, parity.implementation(), seed);
        }
    }
}
