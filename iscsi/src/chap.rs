//! CHAP for iSCSI login (RFC 7143 12.1.3 over RFC 1994): MD5 responses
//! (from the `md-5` crate), challenges from the kernel's random source,
//! and the binary value encodings (`0x` hex, `0b` base64) of CHAP keys.

use md5::{Digest, Md5};
use std::io::Read;

/// CHAP_A value of MD5, the one algorithm offered.
pub const ALGORITHM_MD5: &str = "5";
/// Challenge length in bytes (RFC 7143 12.1.3 asks for at least 16 bytes of
/// randomness in the challenge).
pub const CHALLENGE_LEN: usize = 32;

/// RFC 1994: MD5(identifier || secret || challenge).
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// A fresh identifier and challenge.
pub fn new_challenge() -> std::io::Result<(u8, [u8; CHALLENGE_LEN])> {
    let mut b = [0u8; CHALLENGE_LEN + 1];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    let mut c = [0u8; CHALLENGE_LEN];
    c.copy_from_slice(&b[1..]);
    Ok((b[0], c))
}

/// `0x` followed by lower-case hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Decodes a binary value: `0x`/`0X` hex (an odd digit count has an
/// implied leading zero) or `0b`/`0B` base64. None for anything else.
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let padded = if h.len() % 2 == 1 { format!("0{h}") } else { h.to_string() };
        return (0..padded.len()).step_by(2).map(|i| u8::from_str_radix(&padded[i..i + 2], 16).ok()).collect();
    }
    if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        return decode_base64(b);
    }
    None
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_response_matches_rfc_1321_vectors() {
        // MD5("abc") with id 'a' and challenge "c": the input is "abc".
        assert_eq!(encode_hex(&response(b'a', b"b", b"c")), "0x900150983cd24fb0d6963f7d28e17f72");
    }

    #[test]
    fn binary_encodings_round_trip() {
        assert_eq!(decode_binary("0x0a0B"), Some(vec![0x0a, 0x0b]));
        assert_eq!(decode_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(decode_binary("1234"), None);
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("0x"), None);
        let b = [1u8, 2, 255];
        assert_eq!(decode_binary(&encode_hex(&b)), Some(b.to_vec()));
    }

    #[test]
    fn challenges_differ() {
        let (_, a) = new_challenge().unwrap();
        let (_, b) = new_challenge().unwrap();
        assert_ne!(a, b);
    }
}
