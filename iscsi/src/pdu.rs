//! iSCSI PDU layout (RFC 7143 section 11): the 48-byte Basic Header
//! Segment with named field offsets, framing of a received PDU (AHS, header
//! digest, padded data segment, data digest), and the headers a target
//! sends. iSCSI is big-endian; digests are CRC32C sent least significant
//! byte first.
//!
//! Framing never panics: every length comes from the wire and is checked
//! against what the connection negotiated before it is used.

/// Basic Header Segment length.
pub const BHS_LEN: usize = 48;
/// A header or data digest.
pub const DIGEST_LEN: usize = 4;
/// Largest AHS the one-byte TotalAHSLength field can name (255 words).
pub const MAX_AHS_LEN: usize = 255 * 4;
/// Reserved tag value ("no tag").
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Opcodes (byte 0, low six bits).
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_CMD: u8 = 0x01;
    pub const TMF_REQ: u8 = 0x02;
    pub const LOGIN_REQ: u8 = 0x03;
    pub const TEXT_REQ: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQ: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESP: u8 = 0x21;
    pub const TMF_RESP: u8 = 0x22;
    pub const LOGIN_RESP: u8 = 0x23;
    pub const TEXT_RESP: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESP: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 11.17.1).
pub mod reject {
    pub const DATA_DIGEST: u8 = 0x02;
    pub const SNACK: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_FIELD: u8 = 0x09;
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// Byte offsets of BHS fields shared by several opcodes.
pub mod off {
    pub const FLAGS: usize = 1;
    pub const LUN: usize = 8;
    pub const ITT: usize = 16;
    /// TTT (Data-Out, NOP, R2T, Text), EDTL (SCSI Command), RTT (TMF), CID (Login, Logout).
    pub const W20: usize = 20;
    /// CmdSN (requests) or StatSN (responses).
    pub const W24: usize = 24;
    /// ExpStatSN (requests) or ExpCmdSN (responses).
    pub const W28: usize = 28;
    /// MaxCmdSN (responses), RefCmdSN (TMF).
    pub const W32: usize = 32;
    /// DataSN / R2TSN / ExpDataSN.
    pub const W36: usize = 36;
    /// Buffer offset.
    pub const W40: usize = 40;
    /// Residual count / desired data transfer length.
    pub const W44: usize = 44;
    pub const CDB: usize = 32;
}

/// A Basic Header Segment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bhs(op {:#04x} flags {:#04x} itt {:#x})", self.opcode(), self.flags(), self.itt())
    }
}

impl Bhs {
    /// A header of `opcode` with every other field zero.
    pub fn new(opcode: u8) -> Self {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode;
        Bhs(b)
    }

    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }

    /// The I bit: an immediate command (does not advance CmdSN).
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }

    pub fn flags(&self) -> u8 {
        self.0[1]
    }

    /// The F bit.
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }

    pub fn set_flags(&mut self, f: u8) {
        self.0[1] = f;
    }

    pub fn byte(&self, i: usize) -> u8 {
        self.0[i]
    }

    pub fn set_byte(&mut self, i: usize, v: u8) {
        self.0[i] = v;
    }

    pub fn ahs_len(&self) -> usize {
        self.0[4] as usize * 4
    }

    pub fn data_len(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }

    /// Sets DataSegmentLength (24 bits; callers keep it below 2^24).
    pub fn set_data_len(&mut self, n: u32) {
        debug_assert!(n < 1 << 24);
        let b = n.to_be_bytes();
        self.0[5..8].copy_from_slice(&b[1..4]);
    }

    pub fn lun(&self) -> u64 {
        self.u64_at(off::LUN)
    }

    pub fn set_lun(&mut self, lun: u64) {
        self.0[8..16].copy_from_slice(&lun.to_be_bytes());
    }

    pub fn itt(&self) -> u32 {
        self.u32_at(off::ITT)
    }

    pub fn u16_at(&self, o: usize) -> u16 {
        u16::from_be_bytes([self.0[o], self.0[o + 1]])
    }

    pub fn u32_at(&self, o: usize) -> u32 {
        u32::from_be_bytes([self.0[o], self.0[o + 1], self.0[o + 2], self.0[o + 3]])
    }

    pub fn u64_at(&self, o: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[o..o + 8]);
        u64::from_be_bytes(b)
    }

    pub fn set_u16(&mut self, o: usize, v: u16) {
        self.0[o..o + 2].copy_from_slice(&v.to_be_bytes());
    }

    pub fn set_u32(&mut self, o: usize, v: u32) {
        self.0[o..o + 4].copy_from_slice(&v.to_be_bytes());
    }
}

/// What the connection has negotiated for receiving.
#[derive(Clone, Copy, Debug)]
pub struct RxLimits {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The largest data segment the target accepts (its declared
    /// MaxRecvDataSegmentLength, or 8192 during login).
    pub max_data_len: u32,
}

/// A complete PDU found at the start of a receive buffer.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    pub bhs: Bhs,
    /// Offset and length of the data segment (unpadded) in the buffer.
    pub data_off: usize,
    pub data_len: usize,
    /// Bytes the whole PDU occupies (header, AHS, digests, padding).
    pub total_len: usize,
    /// The data digest did not match (only when data digests are on).
    pub data_digest_bad: bool,
}

/// Why a received PDU cannot be framed. Each ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("header digest mismatch")]
    HeaderDigest,
    #[error("data segment of {0} bytes exceeds MaxRecvDataSegmentLength {1}")]
    Oversized(u32, u32),
}

/// Bytes of zero padding after a data segment of `len` bytes.
pub fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// The digest of `parts` concatenated.
pub fn digest(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0u32, |crc, p| crc32c::crc32c_append(crc, p))
}

/// Frames the PDU at the start of `buf`: Ok(None) until all of it is there.
pub fn frame(buf: &[u8], lim: &RxLimits) -> Result<Option<Frame>, FrameError> {
    if buf.len() < BHS_LEN {
        return Ok(None);
    }
    let mut h = [0u8; BHS_LEN];
    h.copy_from_slice(&buf[..BHS_LEN]);
    let bhs = Bhs(h);
    let hdr_end = BHS_LEN + bhs.ahs_len();
    let hd = if lim.header_digest { DIGEST_LEN } else { 0 };
    let data_off = hdr_end + hd;
    // The header digest is checked as soon as the header is here, before
    // any length in it is believed: a bad one means the fields cannot be
    // trusted (a corrupted DataSegmentLength is a digest error, not an
    // oversized segment to answer with a Reject quoting a corrupted header).
    if buf.len() < data_off {
        return Ok(None);
    }
    if lim.header_digest {
        let got = u32::from_le_bytes([buf[hdr_end], buf[hdr_end + 1], buf[hdr_end + 2], buf[hdr_end + 3]]);
        if digest(&[&buf[..hdr_end]]) != got {
            return Err(FrameError::HeaderDigest);
        }
    }
    let data_len = bhs.data_len();
    if data_len > lim.max_data_len {
        return Err(FrameError::Oversized(data_len, lim.max_data_len));
    }
    let data_len = data_len as usize;
    let padded = data_len + pad_len(data_len);
    let dd = if lim.data_digest && data_len > 0 { DIGEST_LEN } else { 0 };
    let total_len = data_off + padded + dd;
    if buf.len() < total_len {
        return Ok(None);
    }
    let mut data_digest_bad = false;
    if dd > 0 {
        let at = data_off + padded;
        let got = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        data_digest_bad = digest(&[&buf[data_off..at]]) != got;
    }
    Ok(Some(Frame { bhs, data_off, data_len, total_len, data_digest_bad }))
}

/// Largest header a target sends: BHS plus header digest.
pub const MAX_TX_HEADER: usize = BHS_LEN + DIGEST_LEN;

/// Writes `bhs` (with DataSegmentLength already set) and its digest into
/// `out`; returns the bytes written.
pub fn encode_header(bhs: &Bhs, header_digest: bool, out: &mut [u8]) -> usize {
    out[..BHS_LEN].copy_from_slice(&bhs.0);
    if header_digest {
        out[BHS_LEN..BHS_LEN + DIGEST_LEN].copy_from_slice(&digest(&[&bhs.0]).to_le_bytes());
        BHS_LEN + DIGEST_LEN
    } else {
        BHS_LEN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(hd: bool, dd: bool) -> RxLimits {
        RxLimits { header_digest: hd, data_digest: dd, max_data_len: 8192 }
    }

    fn pdu(data: &[u8], hd: bool, dd: bool) -> Vec<u8> {
        let mut b = Bhs::new(op::NOP_OUT);
        b.set_data_len(data.len() as u32);
        let mut out = vec![0u8; MAX_TX_HEADER];
        let n = encode_header(&b, hd, &mut out);
        out.truncate(n);
        out.extend_from_slice(data);
        out.resize(out.len() + pad_len(data.len()), 0);
        if dd && !data.is_empty() {
            let padded = &out[n..];
            let d = digest(&[padded]);
            out.extend_from_slice(&d.to_le_bytes());
        }
        out
    }

    #[test]
    fn crc32c_matches_rfc_3720_test_vector() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(digest(&[&[0u8; 32]]), 0x8a91_36aa);
        // 32 bytes of 0xff.
        assert_eq!(digest(&[&[0xffu8; 32]]), 0x62a8_ab43);
    }

    #[test]
    fn frames_with_and_without_digests_and_waits_for_all_bytes() {
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            let p = pdu(b"hello", hd, dd);
            for cut in 0..p.len() {
                assert!(frame(&p[..cut], &lim(hd, dd)).unwrap().is_none(), "cut {cut}");
            }
            let f = frame(&p, &lim(hd, dd)).unwrap().unwrap();
            assert_eq!(f.total_len, p.len());
            assert_eq!(&p[f.data_off..f.data_off + f.data_len], b"hello");
            assert!(!f.data_digest_bad);
        }
    }

    #[test]
    fn bad_digests_and_oversized_segments_are_caught() {
        let mut p = pdu(b"abcd", true, true);
        p[3] ^= 1;
        assert_eq!(frame(&p, &lim(true, true)).unwrap_err(), FrameError::HeaderDigest);
        let mut p = pdu(b"abcd", true, true);
        let n = p.len();
        p[n - 6] ^= 1;
        assert!(frame(&p, &lim(true, true)).unwrap().unwrap().data_digest_bad);
        let p = pdu(&[0u8; 9000], false, false);
        assert_eq!(frame(&p, &lim(false, false)).unwrap_err(), FrameError::Oversized(9000, 8192));
    }

    #[test]
    fn a_corrupted_length_under_a_header_digest_is_a_digest_error() {
        // Found by fuzz/iscsi_pdu: one flipped bit in DataSegmentLength
        // (byte 5) of a digested header made the segment look oversized.
        let mut p = pdu(b"abcd", true, false);
        p[5] ^= 0x02;
        assert_eq!(frame(&p, &lim(true, false)).unwrap_err(), FrameError::HeaderDigest);
        // Without a header digest the same header is an oversized segment.
        assert_eq!(frame(&p[..BHS_LEN], &lim(false, false)).unwrap_err(), FrameError::Oversized(0x20004, 8192));
    }

    proptest::proptest! {
        #[test]
        fn framing_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
                                hd in proptest::bool::ANY, dd in proptest::bool::ANY) {
            let _ = frame(&bytes, &lim(hd, dd));
        }
    }
}
