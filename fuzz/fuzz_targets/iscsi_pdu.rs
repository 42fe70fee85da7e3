//! Fuzz target for the iSCSI receive framing (`iscsi::pdu::frame`), with
//! and without header and data digests: any byte stream must frame to the
//! same PDUs (or the same error) however it arrives in pieces, every frame
//! must lie inside the bytes it was given and agree with its BHS, and a
//! valid stream must frame to exactly the PDUs that were encoded.
//!
//! Input layout: byte 0 picks the limits and the mode (bit 0 header
//! digest, bit 1 data digest, bit 2 the login-phase 8 KiB segment limit
//! instead of 64 KiB, bit 7 structured), byte 1 seeds the piece sizes (and
//! the flipped bit in structured mode), the rest is the stream (raw mode) or
//! PDU recipes (structured mode). Structured mode exists because random
//! bytes almost never carry a valid digest; recipes keep the stream valid
//! so the data and digest paths are reached, then one flipped bit checks
//! that a digest catches what it covers.
#![no_main]

use iscsi::pdu::{
    digest, encode_header, frame, pad_len, Bhs, Frame, FrameError, RxLimits, BHS_LEN, DIGEST_LEN, MAX_TX_HEADER,
};
use libfuzzer_sys::fuzz_target;

/// What framing reported, with the data reduced to its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Pdu { bhs: [u8; BHS_LEN], data: Vec<u8>, total_len: usize, data_digest_bad: bool },
    Error(FrameError),
}

/// Small deterministic generator for piece sizes.
struct XorShift(u32);

impl XorShift {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }
}

/// The invariants of one frame found at the start of `buf`.
fn check_frame(f: &Frame, buf: &[u8], lim: &RxLimits) {
    assert_eq!(f.bhs.0[..], buf[..BHS_LEN], "frame's BHS is not the buffer's");
    assert_eq!(f.data_len, f.bhs.data_len() as usize, "data length differs from the BHS's");
    assert!(f.data_len as u64 <= u64::from(lim.max_data_len), "oversized segment accepted");
    let hd = if lim.header_digest { DIGEST_LEN } else { 0 };
    assert_eq!(f.data_off, BHS_LEN + f.bhs.ahs_len() + hd, "data offset");
    let dd = if lim.data_digest && f.data_len > 0 { DIGEST_LEN } else { 0 };
    assert_eq!(f.total_len, f.data_off + f.data_len + pad_len(f.data_len) + dd, "total length");
    assert!(f.total_len <= buf.len(), "frame runs past the buffer");
    assert!(!f.data_digest_bad || dd > 0, "data digest bad without a data digest");
}

/// Frames `stream` as a connection does: bytes arrive in pieces of
/// `piece_len`, and every complete PDU at the front is taken off.
fn decode(stream: &[u8], lim: &RxLimits, mut piece_len: impl FnMut() -> usize) -> Vec<Seen> {
    let mut seen = Vec::new();
    let mut start = 0usize;
    let mut end = 0usize;
    loop {
        end = end.saturating_add(piece_len().max(1)).min(stream.len());
        loop {
            let pending = &stream[start..end];
            match frame(pending, lim) {
                Err(e) => {
                    assert_eq!(frame(pending, lim).err(), Some(e), "framing is not a function of its input");
                    seen.push(Seen::Error(e));
                    return seen;
                }
                Ok(None) => break,
                Ok(Some(f)) => {
                    check_frame(&f, pending, lim);
                    // Framing must not have needed bytes past the PDU.
                    let exact = frame(&pending[..f.total_len], lim);
                    assert!(
                        matches!(exact, Ok(Some(g)) if g.total_len == f.total_len && g.data_digest_bad == f.data_digest_bad),
                        "a PDU frames differently without the bytes after it"
                    );
                    assert!(
                        matches!(frame(&pending[..f.total_len - 1], lim), Ok(None)),
                        "a PDU one byte short is not waited for"
                    );
                    seen.push(Seen::Pdu {
                        bhs: f.bhs.0,
                        data: pending[f.data_off..f.data_off + f.data_len].to_vec(),
                        total_len: f.total_len,
                        data_digest_bad: f.data_digest_bad,
                    });
                    start += f.total_len;
                }
            }
        }
        if end >= stream.len() {
            return seen;
        }
    }
}

/// Turns recipes into a valid stream and the frames it must give; also
/// returns where each PDU's header (with its digest) ends and the PDU ends.
fn build_stream(lim: &RxLimits, recipes: &[u8]) -> (Vec<u8>, Vec<Seen>, Vec<(usize, usize)>) {
    let mut stream = Vec::new();
    let mut want = Vec::new();
    let mut bounds = Vec::new();
    let mut rest = recipes;
    while let [op, flags, ahs_words, len_lo, len_hi, tail @ ..] = rest {
        let ahs_len = usize::from(*ahs_words % 4) * 4;
        let len = (usize::from(*len_lo) | usize::from(*len_hi) << 8).min(lim.max_data_len as usize);
        let data_len = len.min(tail.len().saturating_sub(ahs_len));
        let (fill, next) = tail.split_at((ahs_len + data_len).min(tail.len()));
        rest = next;
        let mut bhs = Bhs::new(*op & 0x7f);
        bhs.set_flags(*flags);
        bhs.set_byte(4, (ahs_len / 4) as u8);
        bhs.set_data_len(data_len as u32);
        for (i, b) in fill.iter().take(BHS_LEN - 8).enumerate() {
            bhs.set_byte(8 + i, *b);
        }
        let ahs = &fill[..ahs_len.min(fill.len())];
        let ahs: Vec<u8> = ahs.iter().copied().chain(std::iter::repeat(0)).take(ahs_len).collect();
        let data = &fill[ahs.len().min(fill.len())..];
        let data = &data[..data_len.min(data.len())];
        let pdu_start = stream.len();
        if ahs.is_empty() {
            // The crate's encoder writes what a PDU without AHS starts with.
            let mut h = [0u8; MAX_TX_HEADER];
            let n = encode_header(&bhs, lim.header_digest, &mut h);
            stream.extend_from_slice(&h[..n]);
        } else {
            stream.extend_from_slice(&bhs.0);
            stream.extend_from_slice(&ahs);
            if lim.header_digest {
                let d = digest(&[&bhs.0, &ahs]);
                stream.extend_from_slice(&d.to_le_bytes());
            }
        }
        let header_end = stream.len();
        stream.extend_from_slice(data);
        stream.resize(stream.len() + pad_len(data.len()), 0);
        if lim.data_digest && !data.is_empty() {
            let d = digest(&[&stream[header_end..]]);
            stream.extend_from_slice(&d.to_le_bytes());
        }
        want.push(Seen::Pdu {
            bhs: bhs.0,
            data: data.to_vec(),
            total_len: stream.len() - pdu_start,
            data_digest_bad: false,
        });
        bounds.push((header_end, stream.len()));
    }
    (stream, want, bounds)
}

fuzz_target!(|input: &[u8]| {
    let [mode, seed, body @ ..] = input else {
        return;
    };
    let lim = RxLimits {
        header_digest: mode & 0x01 != 0,
        data_digest: mode & 0x02 != 0,
        max_data_len: if mode & 0x04 != 0 { 8192 } else { 65_536 },
    };
    let one_shot;
    if mode & 0x80 == 0 {
        one_shot = decode(body, &lim, || usize::MAX);
    } else {
        let (mut stream, want, bounds) = build_stream(&lim, body);
        one_shot = decode(&stream, &lim, || usize::MAX);
        assert_eq!(one_shot, want, "a valid stream framed to something else");
        if seed & 0x01 != 0 && !stream.is_empty() {
            let at = usize::from(*seed) * 7919 % stream.len();
            stream[at] ^= 1 << (seed >> 5);
            let got = decode(&stream, &lim, || usize::MAX);
            // The PDUs before the flipped one are untouched.
            let hit = bounds.iter().position(|&(_, end)| at < end).unwrap_or(bounds.len());
            assert_eq!(got[..hit.min(got.len())], want[..hit.min(got.len())], "a flip changed earlier PDUs");
            let pdu_start = if hit == 0 { 0 } else { bounds[hit - 1].1 };
            let (header_end, _) = bounds[hit];
            if lim.header_digest && at < header_end {
                assert_eq!(
                    got.get(hit),
                    Some(&Seen::Error(FrameError::HeaderDigest)),
                    "header flip at {}",
                    at - pdu_start
                );
            } else if lim.data_digest && at >= header_end {
                // Everything after the header is data, padding or the data
                // digest, all covered: the same PDU, reported bad.
                match got.get(hit) {
                    Some(Seen::Pdu { data_digest_bad, total_len, .. }) => {
                        assert!(*data_digest_bad, "data flip not caught");
                        assert_eq!(
                            Some(total_len),
                            want.get(hit).map(|w| match w {
                                Seen::Pdu { total_len, .. } => total_len,
                                Seen::Error(_) => unreachable!(),
                            })
                        );
                    }
                    other => panic!("data flip framed as {other:?}"),
                }
            }
            let mut rng = XorShift(u32::from(*seed) | 0x100);
            assert_eq!(got, decode(&stream, &lim, || (rng.next() % 97) as usize + 1), "pieces changed the framing");
        }
    }
    let mut rng = XorShift(u32::from(*seed) | 0x100);
    let stream_for_pieces: Vec<u8> = if mode & 0x80 == 0 { body.to_vec() } else { build_stream(&lim, body).0 };
    let pieces = decode(&stream_for_pieces, &lim, || (rng.next() % 97) as usize + 1);
    assert_eq!(one_shot, pieces, "pieces changed the framing");
});
