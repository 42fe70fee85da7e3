//! NVMe/TCP PDU codec (NVMe TCP transport spec 1.0, TP 8000): the wire
//! layout of every PDU header, header validation that yields the fatal
//! error status (FES/FEI) a bad header earns, a streaming reader that never
//! allocates, header encoders, and the CRC32C header and data digests.
//!
//! A PDU on the wire is:
//!
//! ```text
//! | CH (8) | PSH (hlen - 8) | HDGST (0/4) | PAD (pdo - hlen - hdgst) | DATA | DDGST (0/4) |
//! ```
//!
//! Everything here treats received bytes as hostile: no input makes this
//! module panic, allocate or buffer more than one header.

use core::mem::size_of;

use nvme_spec::{Cqe, Sqe};
use thiserror::Error;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, IntoBytes};

/// Length of the common header that starts every PDU.
pub const COMMON_HEADER_LEN: usize = 8;
/// Length of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// Longest PDU header (ICReq/ICResp); also the reader's header buffer size,
/// since IC PDUs never carry a digest and the longest digested header
/// (CapsuleCmd, 72 + 4) is shorter.
pub const MAX_HEADER_LEN: usize = 128;
/// Longest PDU a termination request may be (header plus offending header).
pub const TERM_REQ_MAX_PLEN: u32 = 152;
/// Most bytes of the offending PDU a termination request carries.
pub const TERM_REQ_MAX_DATA_LEN: usize = TERM_REQ_MAX_PLEN as usize - TERM_REQ_HLEN;
/// The smallest MAXH2CDATA a controller may announce.
pub const MIN_MAXH2CDATA: u32 = 4096;
/// PDU format version 1.0, the only one defined.
pub const PFV_1_0: u16 = 0;
/// Largest HPDA/CPDA value (alignment of 128 bytes).
pub const MAX_PDA: u8 = 31;
/// Buffer size that holds any header an encoder writes: the largest
/// header, digest and padding up to a PDO of at most 255.
pub const MAX_ENCODED_HEADER_LEN: usize = 256;

const IC_HLEN: usize = 128;
const CAPSULE_CMD_HLEN: usize = 72;
const TERM_REQ_HLEN: usize = 24;
const SHORT_HLEN: usize = 24;

/// Common header flag bits.
pub mod flags {
    /// A header digest follows the header.
    pub const HDGSTF: u8 = 0x01;
    /// A data digest follows the data.
    pub const DDGSTF: u8 = 0x02;
    /// H2CData/C2HData: the last data PDU of the command.
    pub const LAST_PDU: u8 = 0x04;
    /// C2HData: the command succeeded and no CapsuleResp will follow.
    pub const SUCCESS: u8 = 0x08;
}

/// Byte offsets within a PDU header, reported as the FEI of a bad field.
pub mod fei {
    pub const PDU_TYPE: u32 = 0;
    pub const FLAGS: u32 = 1;
    pub const HLEN: u32 = 2;
    pub const PDO: u32 = 3;
    pub const PLEN: u32 = 4;
    /// ICReq/ICResp PFV.
    pub const PFV: u32 = 8;
    /// ICReq HPDA / ICResp CPDA.
    pub const PDA: u32 = 10;
    /// ICResp MAXH2CDATA.
    pub const MAXH2CDATA: u32 = 12;
    /// H2CData/C2HData DATAO.
    pub const DATAO: u32 = 12;
    /// H2CData/C2HData DATAL.
    pub const DATAL: u32 = 16;
}

/// Which way a PDU travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Sent by the host, received by the controller (target).
    HostToController,
    /// Sent by the controller, received by the host.
    ControllerToHost,
}

/// PDU type (common header byte 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PduType {
    IcReq = 0x00,
    IcResp = 0x01,
    H2CTermReq = 0x02,
    C2HTermReq = 0x03,
    CapsuleCmd = 0x04,
    CapsuleResp = 0x05,
    H2CData = 0x06,
    C2HData = 0x07,
    R2T = 0x09,
}

/// How a PDU type frames its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// ICReq/ICResp: fixed 128 bytes, never digested.
    Ic,
    /// Termination requests: header then raw error data, never digested.
    Term,
    /// CapsuleResp and R2T: digestible header, no data.
    HeaderOnly,
    /// CapsuleCmd (optional data), H2CData and C2HData (data required).
    Data,
}

impl PduType {
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x00 => Self::IcReq,
            0x01 => Self::IcResp,
            0x02 => Self::H2CTermReq,
            0x03 => Self::C2HTermReq,
            0x04 => Self::CapsuleCmd,
            0x05 => Self::CapsuleResp,
            0x06 => Self::H2CData,
            0x07 => Self::C2HData,
            0x09 => Self::R2T,
            _ => return None,
        })
    }

    /// The header length (HLEN) every PDU of this type must have.
    pub const fn hlen(self) -> u8 {
        match self {
            Self::IcReq | Self::IcResp => IC_HLEN as u8,
            Self::CapsuleCmd => CAPSULE_CMD_HLEN as u8,
            Self::H2CTermReq | Self::C2HTermReq => TERM_REQ_HLEN as u8,
            Self::CapsuleResp | Self::H2CData | Self::C2HData | Self::R2T => SHORT_HLEN as u8,
        }
    }

    pub const fn direction(self) -> Direction {
        match self {
            Self::IcReq | Self::H2CTermReq | Self::CapsuleCmd | Self::H2CData => Direction::HostToController,
            Self::IcResp | Self::C2HTermReq | Self::CapsuleResp | Self::C2HData | Self::R2T => {
                Direction::ControllerToHost
            }
        }
    }

    const fn class(self) -> Class {
        match self {
            Self::IcReq | Self::IcResp => Class::Ic,
            Self::H2CTermReq | Self::C2HTermReq => Class::Term,
            Self::CapsuleResp | Self::R2T => Class::HeaderOnly,
            Self::CapsuleCmd | Self::H2CData | Self::C2HData => Class::Data,
        }
    }
}

/// Fatal error status (FES) of a termination request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Fes {
    InvalidHeaderField = 0x01,
    PduSequenceError = 0x02,
    HeaderDigestError = 0x03,
    DataTransferOutOfRange = 0x04,
    DataTransferLimitExceeded = 0x05,
    UnsupportedParameter = 0x06,
}

impl Fes {
    pub const fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0x01 => Self::InvalidHeaderField,
            0x02 => Self::PduSequenceError,
            0x03 => Self::HeaderDigestError,
            0x04 => Self::DataTransferOutOfRange,
            0x05 => Self::DataTransferLimitExceeded,
            0x06 => Self::UnsupportedParameter,
            _ => return None,
        })
    }
}

/// Why a PDU could not be decoded or encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PduError {
    /// A slice handed to a one-shot parser is shorter than the header.
    /// Not a protocol error: the caller has not read enough yet.
    #[error("need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    /// The peer broke the protocol: the connection must end with a
    /// termination request carrying `fes` and `fei` (unless the bad PDU
    /// was itself a termination request, which is never answered).
    #[error("fatal transport error {fes:?} at header byte {fei}: {reason}")]
    Fatal { fes: Fes, fei: u32, reason: &'static str },
    /// An encoder's output buffer is too small.
    #[error("output buffer too small: need {needed} bytes, have {available}")]
    BufferTooSmall { needed: usize, available: usize },
    /// An encoder was asked for a PDU the protocol does not allow.
    #[error("cannot encode PDU: {0}")]
    InvalidArgument(&'static str),
}

impl PduError {
    const fn fatal(fes: Fes, fei: u32, reason: &'static str) -> Self {
        Self::Fatal { fes, fei, reason }
    }

    const fn invalid_field(fei: u32, reason: &'static str) -> Self {
        Self::fatal(Fes::InvalidHeaderField, fei, reason)
    }

    /// The fatal error status to send, for protocol errors.
    pub fn fes(&self) -> Option<Fes> {
        match self {
            Self::Fatal { fes, .. } => Some(*fes),
            _ => None,
        }
    }

    /// The field error information to send, for protocol errors.
    pub fn fei(&self) -> Option<u32> {
        match self {
            Self::Fatal { fei, .. } => Some(*fei),
            _ => None,
        }
    }

    /// The termination request header this error calls for.
    pub fn term_req(&self) -> Option<TermReq> {
        match self {
            Self::Fatal { fes, fei, .. } => Some(TermReq { fes: *fes as u16, fei: *fei }),
            _ => None,
        }
    }
}

/// The common header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonHeader {
    /// Raw PDU type; validated by [`validate_header`].
    pub pdu_type: u8,
    pub flags: u8,
    pub hlen: u8,
    pub pdo: u8,
    pub plen: u32,
}

/// Decodes the 8-byte common header at the start of `bytes`. Succeeds on
/// any 8 bytes: judging them is [`validate_header`]'s job.
pub fn parse_common_header(bytes: &[u8]) -> Result<CommonHeader, PduError> {
    let (wire, _) = wire::CommonHeader::read_from_prefix(bytes)
        .map_err(|_| PduError::Truncated { needed: COMMON_HEADER_LEN, available: bytes.len() })?;
    Ok(CommonHeader {
        pdu_type: wire.pdu_type,
        flags: wire.flags,
        hlen: wire.hlen,
        pdo: wire.pdo,
        plen: wire.plen.get(),
    })
}

/// What the receiving side expects, fixed by the connection's state and its
/// initialize-connection exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxConfig {
    /// Direction of the PDUs this side receives.
    pub direction: Direction,
    /// ICReq/ICResp have been exchanged: IC PDUs are now a sequence error,
    /// and every other PDU is allowed.
    pub ic_done: bool,
    /// Header digests negotiated.
    pub header_digest: bool,
    /// Data digests negotiated.
    pub data_digest: bool,
    /// The PDU data alignment this side asked for: CPDA in the ICResp it
    /// sent (controller) or HPDA in the ICReq it sent (host), 0..=31.
    pub pda: u8,
    /// Most data bytes in one H2CData (the controller's MAXH2CDATA) or
    /// C2HData PDU.
    pub max_data_pdu_len: u32,
    /// Most in-capsule data bytes in one CapsuleCmd (IOCCSZ * 16 - 64).
    pub max_in_capsule_data_len: u32,
}

impl RxConfig {
    /// Before the IC exchange: only an IC PDU or a termination request may
    /// arrive, and nothing is digested.
    pub const fn before_ic(direction: Direction) -> Self {
        Self {
            direction,
            ic_done: false,
            header_digest: false,
            data_digest: false,
            pda: 0,
            max_data_pdu_len: 0,
            max_in_capsule_data_len: 0,
        }
    }

    /// Bytes the PDU data offset must be a multiple of: (PDA + 1) dwords.
    pub const fn pda_alignment(&self) -> u32 {
        pda_alignment(self.pda)
    }
}

const fn pda_alignment(pda: u8) -> u32 {
    let pda = if pda > MAX_PDA { MAX_PDA } else { pda };
    (pda as u32 + 1) * 4
}

/// Where each part of a validated PDU lies, as byte offsets and lengths
/// from the start of the PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PduLayout {
    pub pdu_type: PduType,
    pub hlen: u32,
    /// 0, or 4 when a header digest follows the header.
    pub hdgst_len: u32,
    /// Padding between the header digest and the data.
    pub pad_len: u32,
    /// Where the data starts (the PDO when there is data).
    pub data_offset: u32,
    pub data_len: u32,
    /// 0, or 4 when a data digest follows the data.
    pub ddgst_len: u32,
    /// The whole PDU (PLEN).
    pub plen: u32,
}

impl PduLayout {
    /// Header plus header digest: what must be read before the header can
    /// be trusted.
    pub const fn header_len(&self) -> u32 {
        self.hlen + self.hdgst_len
    }

    const fn header_only(pdu_type: PduType, hlen: u32, hdgst_len: u32) -> Self {
        Self {
            pdu_type,
            hlen,
            hdgst_len,
            pad_len: 0,
            data_offset: hlen + hdgst_len,
            data_len: 0,
            ddgst_len: 0,
            plen: hlen + hdgst_len,
        }
    }
}

/// Checks every length and flag relation of a common header against what
/// this side expects, and returns the PDU's layout. An error carries the
/// FES and FEI (byte offset of the offending field) for the termination
/// request the caller must send.
pub fn validate_header(ch: &CommonHeader, cfg: &RxConfig) -> Result<PduLayout, PduError> {
    let Some(pdu_type) = PduType::from_u8(ch.pdu_type) else {
        return Err(PduError::invalid_field(fei::PDU_TYPE, "unknown PDU type"));
    };
    if pdu_type.direction() != cfg.direction {
        return Err(PduError::invalid_field(fei::PDU_TYPE, "PDU type not valid in this direction"));
    }
    let class = pdu_type.class();
    match class {
        Class::Ic if cfg.ic_done => {
            return Err(PduError::fatal(
                Fes::PduSequenceError,
                0,
                "connection initialization PDU after initialization",
            ));
        }
        Class::HeaderOnly | Class::Data if !cfg.ic_done => {
            return Err(PduError::fatal(Fes::PduSequenceError, 0, "PDU before connection initialization"));
        }
        _ => {}
    }
    if ch.hlen != pdu_type.hlen() {
        return Err(PduError::invalid_field(fei::HLEN, "header length does not match the PDU type"));
    }
    let hlen = u32::from(ch.hlen);
    let hdgstf = ch.flags & flags::HDGSTF != 0;
    let ddgstf = ch.flags & flags::DDGSTF != 0;

    match class {
        Class::Ic => {
            if hdgstf || ddgstf {
                return Err(PduError::invalid_field(fei::FLAGS, "digest flag set in a connection initialization PDU"));
            }
            if ch.plen != hlen {
                return Err(PduError::invalid_field(fei::PLEN, "connection initialization PDU length is not 128"));
            }
            Ok(PduLayout::header_only(pdu_type, hlen, 0))
        }
        Class::Term => {
            // A termination request is the peer's last word: its flags and
            // PDO are ignored so that the reason can always be read, but its
            // length is bounded so that it cannot stream unbounded data.
            if ch.plen < hlen || ch.plen > TERM_REQ_MAX_PLEN {
                return Err(PduError::invalid_field(fei::PLEN, "termination request length out of bounds"));
            }
            Ok(PduLayout { data_len: ch.plen - hlen, plen: ch.plen, ..PduLayout::header_only(pdu_type, hlen, 0) })
        }
        Class::HeaderOnly | Class::Data => {
            if hdgstf != cfg.header_digest {
                return Err(PduError::invalid_field(fei::FLAGS, "header digest flag disagrees with negotiation"));
            }
            if ddgstf && !cfg.data_digest {
                return Err(PduError::invalid_field(fei::FLAGS, "data digest flag set but data digests are off"));
            }
            let hdgst_len = if hdgstf { DIGEST_LEN as u32 } else { 0 };
            let header_end = hlen + hdgst_len;
            if class == Class::HeaderOnly || ch.pdo == 0 {
                if class == Class::Data && pdu_type != PduType::CapsuleCmd {
                    return Err(PduError::invalid_field(fei::PDO, "data PDU without data"));
                }
                if ch.plen != header_end {
                    return Err(PduError::invalid_field(fei::PLEN, "PDU length does not match a PDU without data"));
                }
                return Ok(PduLayout::header_only(pdu_type, hlen, hdgst_len));
            }
            let pdo = u32::from(ch.pdo);
            if pdo < header_end {
                return Err(PduError::invalid_field(fei::PDO, "data offset inside the header"));
            }
            if pdo % cfg.pda_alignment() != 0 {
                return Err(PduError::invalid_field(fei::PDO, "data offset breaks the negotiated alignment"));
            }
            if cfg.data_digest && !ddgstf {
                return Err(PduError::invalid_field(fei::FLAGS, "data digest flag missing"));
            }
            let ddgst_len = if ddgstf { DIGEST_LEN as u32 } else { 0 };
            let data_len = match ch.plen.checked_sub(pdo + ddgst_len) {
                Some(n) if n > 0 => n,
                _ => return Err(PduError::invalid_field(fei::PLEN, "PDU length leaves no room for data")),
            };
            let limit =
                if pdu_type == PduType::CapsuleCmd { cfg.max_in_capsule_data_len } else { cfg.max_data_pdu_len };
            if data_len > limit {
                return Err(PduError::fatal(
                    Fes::DataTransferLimitExceeded,
                    fei::PLEN,
                    "PDU data longer than the negotiated limit",
                ));
            }
            Ok(PduLayout {
                pdu_type,
                hlen,
                hdgst_len,
                pad_len: pdo - header_end,
                data_offset: pdo,
                data_len,
                ddgst_len,
                plen: ch.plen,
            })
        }
    }
}

/// Initialize Connection Request (host to controller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcReq {
    pub pfv: u16,
    /// Host PDU data alignment: (HPDA + 1) dwords, for C2H data.
    pub hpda: u8,
    /// The host asks for header digests.
    pub hdgst: bool,
    /// The host asks for data digests.
    pub ddgst: bool,
    /// Maximum outstanding R2Ts per command, 0's based.
    pub maxr2t: u32,
}

/// Initialize Connection Response (controller to host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcResp {
    pub pfv: u16,
    /// Controller PDU data alignment: (CPDA + 1) dwords, for H2C data.
    pub cpda: u8,
    /// Header digests enabled for the connection.
    pub hdgst: bool,
    /// Data digests enabled for the connection.
    pub ddgst: bool,
    /// Most data bytes the host may send in one H2CData PDU.
    pub maxh2cdata: u32,
}

/// Termination request header (either direction); the offending PDU's
/// header bytes follow as its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermReq {
    /// Raw FES: a peer may send values this module does not know.
    pub fes: u16,
    /// Field error information: for an invalid header field, the byte
    /// offset of the field.
    pub fei: u32,
}

impl TermReq {
    pub fn fes_kind(&self) -> Option<Fes> {
        Fes::from_u16(self.fes)
    }
}

/// Command capsule: one submission queue entry; in-capsule data follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapsuleCmd {
    pub sqe: Sqe,
}

/// Response capsule: one completion queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapsuleResp {
    pub cqe: Cqe,
}

/// Host to controller data, answering an R2T.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2CData {
    /// Command capsule CID this data belongs to.
    pub cccid: u16,
    /// Transfer tag from the R2T being answered.
    pub ttag: u16,
    /// Offset of this PDU's data within the command's data.
    pub datao: u32,
    /// Data bytes in this PDU (equal to the layout's data length).
    pub datal: u32,
    /// The last H2CData of the R2T.
    pub last: bool,
}

/// Controller to host data, for a read-type command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct C2HData {
    pub cccid: u16,
    pub datao: u32,
    pub datal: u32,
    /// The last C2HData of the command.
    pub last: bool,
    /// The command completed successfully; no CapsuleResp will follow.
    /// Only valid together with `last`.
    pub success: bool,
}

/// Ready to transfer: the controller asks for a range of a write's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2T {
    pub cccid: u16,
    pub ttag: u16,
    /// Offset of the requested range within the command's data.
    pub r2to: u32,
    /// Length of the requested range.
    pub r2tl: u32,
}

/// A decoded PDU header of any type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PduHeader {
    IcReq(IcReq),
    IcResp(IcResp),
    H2CTermReq(TermReq),
    C2HTermReq(TermReq),
    CapsuleCmd(CapsuleCmd),
    CapsuleResp(CapsuleResp),
    H2CData(H2CData),
    C2HData(C2HData),
    R2T(R2T),
}

impl PduHeader {
    pub const fn pdu_type(&self) -> PduType {
        match self {
            Self::IcReq(_) => PduType::IcReq,
            Self::IcResp(_) => PduType::IcResp,
            Self::H2CTermReq(_) => PduType::H2CTermReq,
            Self::C2HTermReq(_) => PduType::C2HTermReq,
            Self::CapsuleCmd(_) => PduType::CapsuleCmd,
            Self::CapsuleResp(_) => PduType::CapsuleResp,
            Self::H2CData(_) => PduType::H2CData,
            Self::C2HData(_) => PduType::C2HData,
            Self::R2T(_) => PduType::R2T,
        }
    }
}

/// Declared wire layouts of the PDU headers.
pub mod wire {
    use core::mem::size_of;

    use nvme_spec::{Cqe, Sqe};
    use zerocopy::little_endian::{U16, U32};
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct CommonHeader {
        pub pdu_type: u8,
        pub flags: u8,
        pub hlen: u8,
        pub pdo: u8,
        pub plen: U32,
    }

    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct IcReq {
        pub ch: CommonHeader,
        pub pfv: U16,
        pub hpda: u8,
        /// DGST: bit 0 header digest, bit 1 data digest.
        pub dgst: u8,
        pub maxr2t: U32,
        pub rsvd16: [u8; 112],
    }

    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct IcResp {
        pub ch: CommonHeader,
        pub pfv: U16,
        pub cpda: u8,
        pub dgst: u8,
        pub maxh2cdata: U32,
        pub rsvd16: [u8; 112],
    }

    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct TermReq {
        pub ch: CommonHeader,
        pub fes: U16,
        pub fei: U32,
        pub rsvd14: [u8; 10],
    }

    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct CapsuleCmd {
        pub ch: CommonHeader,
        pub sqe: Sqe,
    }

    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct CapsuleResp {
        pub ch: CommonHeader,
        pub cqe: Cqe,
    }

    /// H2CData and C2HData share this layout (TTAG is reserved in C2HData).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct Data {
        pub ch: CommonHeader,
        pub cccid: U16,
        pub ttag: U16,
        pub datao: U32,
        pub datal: U32,
        pub rsvd20: [u8; 4],
    }

    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
    pub struct R2T {
        pub ch: CommonHeader,
        pub cccid: U16,
        pub ttag: U16,
        pub r2to: U32,
        pub r2tl: U32,
        pub rsvd20: [u8; 4],
    }

    const _: () = assert!(size_of::<CommonHeader>() == 8);
    const _: () = assert!(size_of::<IcReq>() == 128);
    const _: () = assert!(size_of::<IcResp>() == 128);
    const _: () = assert!(size_of::<TermReq>() == 24);
    const _: () = assert!(size_of::<CapsuleCmd>() == 72);
    const _: () = assert!(size_of::<CapsuleResp>() == 24);
    const _: () = assert!(size_of::<Data>() == 24);
    const _: () = assert!(size_of::<R2T>() == 24);
}

const _: () = assert!(size_of::<wire::IcReq>() == IC_HLEN && IC_HLEN == MAX_HEADER_LEN);
const _: () = assert!(size_of::<wire::CapsuleCmd>() == CAPSULE_CMD_HLEN);
const _: () = assert!(CAPSULE_CMD_HLEN + DIGEST_LEN <= MAX_HEADER_LEN);

const DGST_HEADER: u8 = 0x01;
const DGST_DATA: u8 = 0x02;

/// Reads a wire struct from the front of a header that validation already
/// sized; the error arm is unreachable in practice but must not panic.
fn read_wire<T: FromBytes>(bytes: &[u8]) -> Result<T, PduError> {
    T::read_from_prefix(bytes)
        .map(|(v, _)| v)
        .map_err(|_| PduError::invalid_field(fei::HLEN, "header shorter than its type"))
}

/// Decodes the type-specific header from its `hlen` bytes and checks the
/// fields whose validity does not depend on command state.
fn decode_typed(bytes: &[u8], layout: &PduLayout) -> Result<PduHeader, PduError> {
    let ch = parse_common_header(bytes)?;
    Ok(match layout.pdu_type {
        PduType::IcReq => {
            let w: wire::IcReq = read_wire(bytes)?;
            if w.pfv.get() != PFV_1_0 {
                return Err(PduError::fatal(Fes::UnsupportedParameter, fei::PFV, "unsupported PDU format version"));
            }
            if w.hpda > MAX_PDA {
                return Err(PduError::invalid_field(fei::PDA, "HPDA above 31"));
            }
            PduHeader::IcReq(IcReq {
                pfv: w.pfv.get(),
                hpda: w.hpda,
                hdgst: w.dgst & DGST_HEADER != 0,
                ddgst: w.dgst & DGST_DATA != 0,
                maxr2t: w.maxr2t.get(),
            })
        }
        PduType::IcResp => {
            let w: wire::IcResp = read_wire(bytes)?;
            if w.pfv.get() != PFV_1_0 {
                return Err(PduError::fatal(Fes::UnsupportedParameter, fei::PFV, "unsupported PDU format version"));
            }
            if w.cpda > MAX_PDA {
                return Err(PduError::invalid_field(fei::PDA, "CPDA above 31"));
            }
            let maxh2cdata = w.maxh2cdata.get();
            if maxh2cdata < MIN_MAXH2CDATA || maxh2cdata & 3 != 0 {
                return Err(PduError::invalid_field(fei::MAXH2CDATA, "MAXH2CDATA below 4096 or not a multiple of 4"));
            }
            PduHeader::IcResp(IcResp {
                pfv: w.pfv.get(),
                cpda: w.cpda,
                hdgst: w.dgst & DGST_HEADER != 0,
                ddgst: w.dgst & DGST_DATA != 0,
                maxh2cdata,
            })
        }
        PduType::H2CTermReq | PduType::C2HTermReq => {
            let w: wire::TermReq = read_wire(bytes)?;
            let term = TermReq { fes: w.fes.get(), fei: w.fei.get() };
            if layout.pdu_type == PduType::H2CTermReq {
                PduHeader::H2CTermReq(term)
            } else {
                PduHeader::C2HTermReq(term)
            }
        }
        PduType::CapsuleCmd => {
            let w: wire::CapsuleCmd = read_wire(bytes)?;
            PduHeader::CapsuleCmd(CapsuleCmd { sqe: w.sqe })
        }
        PduType::CapsuleResp => {
            let w: wire::CapsuleResp = read_wire(bytes)?;
            PduHeader::CapsuleResp(CapsuleResp { cqe: w.cqe })
        }
        PduType::H2CData | PduType::C2HData => {
            let w: wire::Data = read_wire(bytes)?;
            if w.datal.get() != layout.data_len {
                return Err(PduError::invalid_field(fei::DATAL, "DATAL disagrees with the PDU length"));
            }
            let last = ch.flags & flags::LAST_PDU != 0;
            if layout.pdu_type == PduType::H2CData {
                PduHeader::H2CData(H2CData {
                    cccid: w.cccid.get(),
                    ttag: w.ttag.get(),
                    datao: w.datao.get(),
                    datal: w.datal.get(),
                    last,
                })
            } else {
                let success = ch.flags & flags::SUCCESS != 0;
                if success && !last {
                    return Err(PduError::invalid_field(fei::FLAGS, "SUCCESS flag without LAST_PDU"));
                }
                PduHeader::C2HData(C2HData {
                    cccid: w.cccid.get(),
                    datao: w.datao.get(),
                    datal: w.datal.get(),
                    last,
                    success,
                })
            }
        }
        PduType::R2T => {
            let w: wire::R2T = read_wire(bytes)?;
            PduHeader::R2T(R2T { cccid: w.cccid.get(), ttag: w.ttag.get(), r2to: w.r2to.get(), r2tl: w.r2tl.get() })
        }
    })
}

fn check_header_digest(header: &[u8], digest: &[u8]) -> Result<(), PduError> {
    let mut received = [0u8; DIGEST_LEN];
    received.copy_from_slice(digest.get(..DIGEST_LEN).unwrap_or(&[0; DIGEST_LEN]));
    if crc32c::crc32c(header) != u32::from_le_bytes(received) {
        return Err(PduError::fatal(Fes::HeaderDigestError, 0, "header digest mismatch"));
    }
    Ok(())
}

/// One-shot parse of a complete header (and header digest) at the front of
/// `bytes`: for callers that already hold the whole header.
pub fn parse_header(bytes: &[u8], cfg: &RxConfig) -> Result<(PduHeader, PduLayout), PduError> {
    let ch = parse_common_header(bytes)?;
    let layout = validate_header(&ch, cfg)?;
    let header_len = layout.header_len() as usize;
    let Some(header) = bytes.get(..header_len) else {
        return Err(PduError::Truncated { needed: header_len, available: bytes.len() });
    };
    let hlen = layout.hlen as usize;
    if layout.hdgst_len > 0 {
        check_header_digest(&header[..hlen], &header[hlen..])?;
    }
    Ok((decode_typed(&header[..hlen], &layout)?, layout))
}

/// A piece of PDU data, borrowed from the bytes handed to [`PduReader::feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataChunk<'i> {
    /// Offset of `bytes` within this PDU's data (add the H2CData/C2HData
    /// DATAO for the offset within the command's buffer).
    pub offset: u32,
    pub bytes: &'i [u8],
}

impl DataChunk<'_> {
    /// Copies the chunk to `dest[offset..]`, where `dest` is the buffer the
    /// caller chose for this PDU's data.
    pub fn copy_into(&self, dest: &mut [u8]) -> Result<(), PduError> {
        let start = self.offset as usize;
        let end = start + self.bytes.len();
        let available = dest.len();
        let Some(slot) = dest.get_mut(start..end) else {
            return Err(PduError::BufferTooSmall { needed: end, available });
        };
        slot.copy_from_slice(self.bytes);
        Ok(())
    }
}

/// What [`PduReader::feed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'i> {
    /// A header arrived whole, its digest checked and its fields validated.
    /// `data_len` bytes of data follow as [`Event::Data`] chunks.
    Header { header: PduHeader, data_len: u32 },
    /// The next piece of the current PDU's data, in order.
    Data(DataChunk<'i>),
    /// The current PDU is complete (data digest, if any, matched). The
    /// reader now expects the next PDU.
    End,
    /// The current PDU is complete but its data digest did not match. The
    /// stream framing is intact, so the connection may go on: the command
    /// this data belongs to must complete with
    /// `Status::TRANSIENT_TRANSPORT_ERROR` (a host may retry it). There is
    /// no FES for this case in the TCP transport spec.
    DataDigestMismatch { computed: u32, received: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    CommonHeader,
    Header,
    Padding,
    Data,
    DataDigest,
    End,
    Failed(PduError),
}

/// Streaming PDU reader for a non-blocking socket. It holds one header
/// (at most [`MAX_HEADER_LEN`] bytes) and a few counters: feed it whatever
/// the socket returned and it reports headers, data chunks borrowed from
/// that input, and PDU ends. The caller decides where data goes.
///
/// Use: call [`PduReader::feed`] in a loop, advancing the input by the
/// returned count, until it returns `(0, None)`. A caller that receives
/// data straight into its destination (say a DMA buffer) may instead, while
/// [`PduReader::data_remaining`] is non-zero, `recv` at most that many bytes
/// into the destination and pass that slice to `feed`: the returned chunk
/// is the same slice, and the reader only counts and digests it.
///
/// After a fatal error every later `feed` returns the same error; the
/// connection is over ([`PduReader::received_header`] gives the bytes to
/// quote in the termination request).
#[derive(Debug, Clone)]
pub struct PduReader {
    cfg: RxConfig,
    stage: Stage,
    hdr: [u8; MAX_HEADER_LEN],
    hdr_filled: usize,
    layout: Option<PduLayout>,
    header: Option<PduHeader>,
    pad_left: u32,
    data_done: u32,
    crc: u32,
    ddgst: [u8; DIGEST_LEN],
    ddgst_filled: usize,
}

impl PduReader {
    pub fn new(cfg: RxConfig) -> Self {
        Self {
            cfg,
            stage: Stage::CommonHeader,
            hdr: [0; MAX_HEADER_LEN],
            hdr_filled: 0,
            layout: None,
            header: None,
            pad_left: 0,
            data_done: 0,
            crc: 0,
            ddgst: [0; DIGEST_LEN],
            ddgst_filled: 0,
        }
    }

    pub fn config(&self) -> &RxConfig {
        &self.cfg
    }

    /// Replaces the configuration, for instance once the IC exchange has
    /// negotiated digests. It applies from the next common header, so it
    /// is safe to call at any time; normally right after the IC PDU's
    /// [`Event::End`].
    pub fn set_config(&mut self, cfg: RxConfig) {
        self.cfg = cfg;
    }

    /// Forgets any partial PDU and error (for reuse on a new connection).
    pub fn reset(&mut self, cfg: RxConfig) {
        *self = Self::new(cfg);
    }

    /// True between PDUs: no byte of a next PDU has been consumed.
    pub fn is_idle(&self) -> bool {
        self.stage == Stage::CommonHeader && self.hdr_filled == 0
    }

    /// The layout of the PDU being read, once its common header is valid.
    pub fn layout(&self) -> Option<&PduLayout> {
        self.layout.as_ref()
    }

    /// The header of the PDU being read, once it has been reported.
    pub fn header(&self) -> Option<&PduHeader> {
        self.header.as_ref()
    }

    /// Data bytes of the current PDU not yet fed (0 outside the data).
    pub fn data_remaining(&self) -> u32 {
        match (self.stage, self.layout) {
            (Stage::Data, Some(layout)) => layout.data_len - self.data_done,
            _ => 0,
        }
    }

    /// The header bytes received of the current PDU, for quoting in a
    /// termination request after an error.
    pub fn received_header(&self) -> &[u8] {
        &self.hdr[..self.hdr_filled]
    }

    fn fail(&mut self, err: PduError) -> PduError {
        self.stage = Stage::Failed(err);
        err
    }

    fn next_pdu(&mut self) {
        self.stage = Stage::CommonHeader;
        self.hdr_filled = 0;
        self.layout = None;
        self.header = None;
        self.pad_left = 0;
        self.data_done = 0;
        self.crc = 0;
        self.ddgst_filled = 0;
    }

    /// Copies header bytes until `need` are buffered; returns bytes taken.
    fn fill_header(&mut self, input: &[u8], need: usize) -> usize {
        let need = need.min(MAX_HEADER_LEN);
        let take = need.saturating_sub(self.hdr_filled).min(input.len());
        self.hdr[self.hdr_filled..self.hdr_filled + take].copy_from_slice(&input[..take]);
        self.hdr_filled += take;
        take
    }

    /// Consumes bytes from `input` until it produces one event or runs out
    /// of input. Returns how many bytes it consumed and the event, if any.
    /// An [`Event::End`] may come with 0 bytes consumed.
    pub fn feed<'i>(&mut self, input: &'i [u8]) -> Result<(usize, Option<Event<'i>>), PduError> {
        let mut used = 0usize;
        loop {
            let rest = input.get(used..).unwrap_or(&[]);
            match self.stage {
                Stage::Failed(err) => return Err(err),
                Stage::CommonHeader => {
                    used += self.fill_header(rest, COMMON_HEADER_LEN);
                    if self.hdr_filled < COMMON_HEADER_LEN {
                        return Ok((used, None));
                    }
                    let validated = parse_common_header(&self.hdr).and_then(|ch| validate_header(&ch, &self.cfg));
                    match validated {
                        Ok(layout) => {
                            self.layout = Some(layout);
                            self.stage = Stage::Header;
                        }
                        Err(err) => return Err(self.fail(err)),
                    }
                }
                Stage::Header => {
                    let Some(layout) = self.layout else {
                        return Err(self.fail(PduError::fatal(Fes::PduSequenceError, 0, "reader lost its layout")));
                    };
                    let need = layout.header_len() as usize;
                    used += self.fill_header(rest, need);
                    if self.hdr_filled < need {
                        return Ok((used, None));
                    }
                    let hlen = layout.hlen as usize;
                    if layout.hdgst_len > 0 {
                        if let Err(err) = check_header_digest(&self.hdr[..hlen], &self.hdr[hlen..need]) {
                            return Err(self.fail(err));
                        }
                    }
                    let header = match decode_typed(&self.hdr[..hlen], &layout) {
                        Ok(header) => header,
                        Err(err) => return Err(self.fail(err)),
                    };
                    self.header = Some(header);
                    self.pad_left = layout.pad_len;
                    self.stage = if layout.data_len == 0 {
                        Stage::End
                    } else if layout.pad_len > 0 {
                        Stage::Padding
                    } else {
                        Stage::Data
                    };
                    let event = Event::Header { header, data_len: layout.data_len };
                    return Ok((used, Some(event)));
                }
                Stage::Padding => {
                    let take = rest.len().min(self.pad_left as usize);
                    used += take;
                    self.pad_left -= take as u32;
                    if self.pad_left > 0 {
                        return Ok((used, None));
                    }
                    self.stage = Stage::Data;
                }
                Stage::Data => {
                    let Some(layout) = self.layout else {
                        return Err(self.fail(PduError::fatal(Fes::PduSequenceError, 0, "reader lost its layout")));
                    };
                    if rest.is_empty() {
                        return Ok((used, None));
                    }
                    let left = layout.data_len - self.data_done;
                    let take = rest.len().min(left as usize);
                    let bytes = &rest[..take];
                    if layout.ddgst_len > 0 {
                        self.crc = crc32c::crc32c_append(self.crc, bytes);
                    }
                    let offset = self.data_done;
                    self.data_done += take as u32;
                    used += take;
                    if self.data_done == layout.data_len {
                        self.stage = if layout.ddgst_len > 0 { Stage::DataDigest } else { Stage::End };
                    }
                    return Ok((used, Some(Event::Data(DataChunk { offset, bytes }))));
                }
                Stage::DataDigest => {
                    let take = (DIGEST_LEN - self.ddgst_filled).min(rest.len());
                    self.ddgst[self.ddgst_filled..self.ddgst_filled + take].copy_from_slice(&rest[..take]);
                    self.ddgst_filled += take;
                    used += take;
                    if self.ddgst_filled < DIGEST_LEN {
                        return Ok((used, None));
                    }
                    let computed = self.crc;
                    let received = u32::from_le_bytes(self.ddgst);
                    self.next_pdu();
                    let event = if computed == received {
                        Event::End
                    } else {
                        Event::DataDigestMismatch { computed, received }
                    };
                    return Ok((used, Some(event)));
                }
                Stage::End => {
                    self.next_pdu();
                    return Ok((used, Some(Event::End)));
                }
            }
        }
    }
}

/// What the sending side negotiated, for encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxConfig {
    /// Header digests negotiated.
    pub header_digest: bool,
    /// Data digests negotiated.
    pub data_digest: bool,
    /// The receiver's PDU data alignment: HPDA from the ICReq when the
    /// controller sends, CPDA from the ICResp when the host sends.
    pub pda: u8,
}

/// What [`encode_header`] wrote and what the caller must send after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoded {
    /// Bytes of `out` to send first: header, header digest and padding.
    pub header_len: usize,
    /// The whole PDU's length (PLEN).
    pub plen: u32,
    /// Whether a 4-byte data digest (see [`DataDigest`]) must follow the data.
    pub data_digest: bool,
}

/// Writes a PDU's header, header digest and padding into `out` and returns
/// what was written. `data_len` is the number of data bytes the caller
/// sends next (in-capsule data, H2C/C2H data equal to DATAL, or the
/// termination request's quoted header); then the data digest if
/// [`Encoded::data_digest`].
pub fn encode_header(header: &PduHeader, data_len: u32, cfg: &TxConfig, out: &mut [u8]) -> Result<Encoded, PduError> {
    let pdu_type = header.pdu_type();
    let class = pdu_type.class();
    let hlen = usize::from(pdu_type.hlen());
    match (class, header) {
        (Class::Ic | Class::HeaderOnly, _) if data_len != 0 => {
            return Err(PduError::InvalidArgument("this PDU type carries no data"));
        }
        (Class::Term, _) if data_len as usize > TERM_REQ_MAX_DATA_LEN => {
            return Err(PduError::InvalidArgument("termination request data longer than 128 bytes"));
        }
        (_, PduHeader::H2CData(H2CData { datal, .. }) | PduHeader::C2HData(C2HData { datal, .. }))
            if *datal != data_len || data_len == 0 =>
        {
            return Err(PduError::InvalidArgument("DATAL must equal a non-zero data length"));
        }
        (_, PduHeader::C2HData(C2HData { success: true, last: false, .. })) => {
            return Err(PduError::InvalidArgument("SUCCESS requires LAST_PDU"));
        }
        (_, PduHeader::IcReq(IcReq { hpda, .. })) if *hpda > MAX_PDA => {
            return Err(PduError::InvalidArgument("HPDA above 31"));
        }
        (_, PduHeader::IcResp(IcResp { cpda, maxh2cdata, .. }))
            if *cpda > MAX_PDA || *maxh2cdata < MIN_MAXH2CDATA || maxh2cdata & 3 != 0 =>
        {
            return Err(PduError::InvalidArgument("CPDA above 31 or MAXH2CDATA invalid"));
        }
        _ => {}
    }

    let digested = matches!(class, Class::HeaderOnly | Class::Data);
    let hdgst = digested && cfg.header_digest;
    let has_data = class == Class::Data && data_len > 0;
    let ddgst = has_data && cfg.data_digest;
    let header_end = hlen + if hdgst { DIGEST_LEN } else { 0 };
    let (pdo, header_len) = if has_data {
        let align = pda_alignment(cfg.pda) as usize;
        let pdo = header_end.div_ceil(align) * align;
        (pdo, pdo)
    } else {
        (0, header_end)
    };
    let plen = u64::from(data_len) + header_len as u64 + if ddgst { DIGEST_LEN as u64 } else { 0 };
    let Ok(plen) = u32::try_from(plen) else {
        return Err(PduError::InvalidArgument("PDU longer than 4 GiB"));
    };
    let available = out.len();
    let Some(out) = out.get_mut(..header_len) else {
        return Err(PduError::BufferTooSmall { needed: header_len, available });
    };
    out.fill(0);

    let mut pdu_flags = 0u8;
    if hdgst {
        pdu_flags |= flags::HDGSTF;
    }
    if ddgst {
        pdu_flags |= flags::DDGSTF;
    }
    match header {
        PduHeader::H2CData(H2CData { last: true, .. }) | PduHeader::C2HData(C2HData { last: true, .. }) => {
            pdu_flags |= flags::LAST_PDU;
        }
        _ => {}
    }
    if let PduHeader::C2HData(C2HData { success: true, .. }) = header {
        pdu_flags |= flags::SUCCESS;
    }
    let ch = wire::CommonHeader {
        pdu_type: pdu_type as u8,
        flags: pdu_flags,
        hlen: hlen as u8,
        // At most 128 (76 rounded up to a 128-byte alignment): fits a byte.
        pdo: pdo as u8,
        plen: U32::new(plen),
    };
    let dgst = |h: bool, d: bool| (if h { DGST_HEADER } else { 0 }) | (if d { DGST_DATA } else { 0 });
    let written = match header {
        PduHeader::IcReq(h) => wire::IcReq {
            ch,
            pfv: U16::new(h.pfv),
            hpda: h.hpda,
            dgst: dgst(h.hdgst, h.ddgst),
            maxr2t: U32::new(h.maxr2t),
            rsvd16: [0; 112],
        }
        .write_to_prefix(out)
        .is_ok(),
        PduHeader::IcResp(h) => wire::IcResp {
            ch,
            pfv: U16::new(h.pfv),
            cpda: h.cpda,
            dgst: dgst(h.hdgst, h.ddgst),
            maxh2cdata: U32::new(h.maxh2cdata),
            rsvd16: [0; 112],
        }
        .write_to_prefix(out)
        .is_ok(),
        PduHeader::H2CTermReq(t) | PduHeader::C2HTermReq(t) => {
            wire::TermReq { ch, fes: U16::new(t.fes), fei: U32::new(t.fei), rsvd14: [0; 10] }
                .write_to_prefix(out)
                .is_ok()
        }
        PduHeader::CapsuleCmd(c) => wire::CapsuleCmd { ch, sqe: c.sqe }.write_to_prefix(out).is_ok(),
        PduHeader::CapsuleResp(c) => wire::CapsuleResp { ch, cqe: c.cqe }.write_to_prefix(out).is_ok(),
        PduHeader::H2CData(d) => wire::Data {
            ch,
            cccid: U16::new(d.cccid),
            ttag: U16::new(d.ttag),
            datao: U32::new(d.datao),
            datal: U32::new(d.datal),
            rsvd20: [0; 4],
        }
        .write_to_prefix(out)
        .is_ok(),
        PduHeader::C2HData(d) => wire::Data {
            ch,
            cccid: U16::new(d.cccid),
            ttag: U16::ZERO,
            datao: U32::new(d.datao),
            datal: U32::new(d.datal),
            rsvd20: [0; 4],
        }
        .write_to_prefix(out)
        .is_ok(),
        PduHeader::R2T(r) => wire::R2T {
            ch,
            cccid: U16::new(r.cccid),
            ttag: U16::new(r.ttag),
            r2to: U32::new(r.r2to),
            r2tl: U32::new(r.r2tl),
            rsvd20: [0; 4],
        }
        .write_to_prefix(out)
        .is_ok(),
    };
    if !written {
        return Err(PduError::BufferTooSmall { needed: hlen, available });
    }
    if hdgst {
        let digest = crc32c::crc32c(&out[..hlen]);
        out[hlen..hlen + DIGEST_LEN].copy_from_slice(&digest.to_le_bytes());
    }
    Ok(Encoded { header_len, plen, data_digest: ddgst })
}

/// Writes a whole termination request (header, then up to 128 bytes of the
/// offending PDU header) into `out`; returns its length. `direction` is the
/// direction of the request sent: a controller sends C2HTermReq.
pub fn encode_term_req(
    direction: Direction,
    term: TermReq,
    offending_header: &[u8],
    out: &mut [u8],
) -> Result<usize, PduError> {
    let quoted = &offending_header[..offending_header.len().min(TERM_REQ_MAX_DATA_LEN)];
    let header = match direction {
        Direction::HostToController => PduHeader::H2CTermReq(term),
        Direction::ControllerToHost => PduHeader::C2HTermReq(term),
    };
    let encoded = encode_header(&header, quoted.len() as u32, &TxConfig::default(), out)?;
    let total = encoded.plen as usize;
    let available = out.len();
    let Some(data) = out.get_mut(encoded.header_len..total) else {
        return Err(PduError::BufferTooSmall { needed: total, available });
    };
    data.copy_from_slice(quoted);
    Ok(total)
}

/// CRC32C data digest over data handed in pieces, as it is sent or received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataDigest {
    crc: u32,
}

impl DataDigest {
    pub const fn new() -> Self {
        Self { crc: 0 }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.crc = crc32c::crc32c_append(self.crc, data);
    }

    pub const fn value(&self) -> u32 {
        self.crc
    }

    /// The digest as it goes on the wire (little-endian).
    pub const fn to_bytes(&self) -> [u8; DIGEST_LEN] {
        self.crc.to_le_bytes()
    }
}

/// CRC32C data digest of one contiguous buffer.
pub fn data_digest(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;
    use nvme_spec::Status;
    use proptest::prelude::*;

    const H2C: Direction = Direction::HostToController;
    const C2H: Direction = Direction::ControllerToHost;

    fn connected(direction: Direction, header_digest: bool, data_digest: bool, pda: u8) -> RxConfig {
        RxConfig {
            direction,
            ic_done: true,
            header_digest,
            data_digest,
            pda,
            max_data_pdu_len: 1 << 20,
            max_in_capsule_data_len: 8192,
        }
    }

    fn tx(header_digest: bool, data_digest: bool, pda: u8) -> TxConfig {
        TxConfig { header_digest, data_digest, pda }
    }

    /// Encodes a whole PDU: header, data, data digest.
    fn encode_pdu(header: &PduHeader, data: &[u8], cfg: &TxConfig) -> Vec<u8> {
        let mut buf = [0u8; MAX_ENCODED_HEADER_LEN];
        let enc = encode_header(header, data.len() as u32, cfg, &mut buf).unwrap();
        let mut pdu = buf[..enc.header_len].to_vec();
        pdu.extend_from_slice(data);
        if enc.data_digest {
            pdu.extend_from_slice(&data_digest(data).to_le_bytes());
        }
        assert_eq!(pdu.len(), enc.plen as usize);
        pdu
    }

    /// What a reader reported for a byte stream, with data chunks joined.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Seen {
        Header(PduHeader, u32),
        Data(Vec<u8>),
        End,
        DigestMismatch,
        Error(PduError),
    }

    /// Feeds `stream` to a reader in chunks of the sizes `chunks` cycles
    /// through, and records what it reports. Data chunks are checked to be
    /// contiguous and are merged, so that chunking does not show.
    fn run(cfg: RxConfig, stream: &[u8], chunks: &[usize]) -> Vec<Seen> {
        let mut reader = PduReader::new(cfg);
        let mut seen = Vec::new();
        let mut at = 0usize;
        let mut next_data_offset = 0u32;
        let mut chunk_index = 0usize;
        loop {
            let size = chunks[chunk_index % chunks.len()].max(1);
            chunk_index += 1;
            let end = at.saturating_add(size).min(stream.len());
            let mut input = &stream[at..end];
            loop {
                match reader.feed(input) {
                    Err(err) => {
                        seen.push(Seen::Error(err));
                        // A failed reader stays failed.
                        assert_eq!(reader.feed(&[1, 2, 3]), Err(err));
                        return seen;
                    }
                    Ok((used, event)) => {
                        assert!(used <= input.len());
                        input = &input[used..];
                        match event {
                            None => {
                                assert!(input.is_empty(), "no event before input ran out");
                                break;
                            }
                            Some(Event::Header { header, data_len }) => {
                                next_data_offset = 0;
                                seen.push(Seen::Header(header, data_len));
                            }
                            Some(Event::Data(chunk)) => {
                                assert_eq!(chunk.offset, next_data_offset);
                                assert!(!chunk.bytes.is_empty());
                                next_data_offset += chunk.bytes.len() as u32;
                                match seen.last_mut() {
                                    Some(Seen::Data(d)) => d.extend_from_slice(chunk.bytes),
                                    _ => seen.push(Seen::Data(chunk.bytes.to_vec())),
                                }
                            }
                            Some(Event::End) => {
                                assert!(reader.is_idle());
                                seen.push(Seen::End);
                            }
                            Some(Event::DataDigestMismatch { .. }) => seen.push(Seen::DigestMismatch),
                        }
                    }
                }
            }
            at = end;
            if at >= stream.len() {
                // Drain an End that needs no input.
                if let Ok((0, Some(Event::End))) = reader.feed(&[]) {
                    seen.push(Seen::End);
                }
                return seen;
            }
        }
    }

    fn expected(header: PduHeader, data: &[u8]) -> Vec<Seen> {
        let mut v = vec![Seen::Header(header, data.len() as u32)];
        if !data.is_empty() {
            v.push(Seen::Data(data.to_vec()));
        }
        v.push(Seen::End);
        v
    }

    fn first_error(cfg: RxConfig, stream: &[u8]) -> PduError {
        match run(cfg, stream, &[usize::MAX]).pop() {
            Some(Seen::Error(err)) => err,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn fes_fei(err: PduError) -> (Option<Fes>, Option<u32>) {
        (err.fes(), err.fei())
    }

    fn write_cmd(cid: u16) -> PduHeader {
        let mut sqe = Sqe::new(0x01, cid);
        sqe.nsid = U32::new(1);
        sqe.set_sgl1(nvme_spec::SglDescriptor::in_capsule(0, 512));
        PduHeader::CapsuleCmd(CapsuleCmd { sqe })
    }

    #[test]
    fn wire_offsets_match_the_spec() {
        assert_eq!(offset_of!(wire::IcReq, pfv), 8);
        assert_eq!(offset_of!(wire::IcReq, hpda), 10);
        assert_eq!(offset_of!(wire::IcReq, dgst), 11);
        assert_eq!(offset_of!(wire::IcReq, maxr2t), 12);
        assert_eq!(offset_of!(wire::IcResp, cpda), 10);
        assert_eq!(offset_of!(wire::IcResp, maxh2cdata), fei::MAXH2CDATA as usize);
        assert_eq!(offset_of!(wire::TermReq, fes), 8);
        assert_eq!(offset_of!(wire::TermReq, fei), 10);
        assert_eq!(offset_of!(wire::CapsuleCmd, sqe), 8);
        assert_eq!(offset_of!(wire::CapsuleResp, cqe), 8);
        assert_eq!(offset_of!(wire::Data, cccid), 8);
        assert_eq!(offset_of!(wire::Data, ttag), 10);
        assert_eq!(offset_of!(wire::Data, datao), fei::DATAO as usize);
        assert_eq!(offset_of!(wire::Data, datal), fei::DATAL as usize);
        assert_eq!(offset_of!(wire::R2T, r2to), 12);
        assert_eq!(offset_of!(wire::R2T, r2tl), 16);
        assert_eq!(offset_of!(wire::CommonHeader, plen), fei::PLEN as usize);
    }

    #[test]
    fn crc32c_is_the_castagnoli_polynomial() {
        assert_eq!(data_digest(b"123456789"), 0xE306_9283);
        let mut d = DataDigest::new();
        d.update(b"1234");
        d.update(b"");
        d.update(b"56789");
        assert_eq!(d.value(), 0xE306_9283);
        assert_eq!(d.to_bytes(), [0x83, 0x92, 0x06, 0xE3]);
    }

    #[test]
    fn capsule_cmd_layout_on_the_wire() {
        let pdu = encode_pdu(&write_cmd(7), &[0xAB; 512], &tx(true, true, 0));
        // Type, flags (HDGSTF|DDGSTF), hlen 72, pdo 76, plen 72+4+512+4.
        assert_eq!(&pdu[..8], &[0x04, 0x03, 72, 76, 0x50, 0x02, 0, 0]);
        assert_eq!(pdu.len(), 592);
        assert_eq!(&pdu[72..76], &crc32c::crc32c(&pdu[..72]).to_le_bytes());
        // With a 32-byte alignment the data moves to 96.
        let padded = encode_pdu(&write_cmd(7), &[0xAB; 512], &tx(true, true, 7));
        assert_eq!(padded[3], 96);
        assert!(padded[76..96].iter().all(|&b| b == 0));
        let (header, layout) = parse_header(&padded, &connected(H2C, true, true, 7)).unwrap();
        assert_eq!(header, write_cmd(7));
        assert_eq!((layout.pad_len, layout.data_offset, layout.data_len), (20, 96, 512));
    }

    #[test]
    fn ic_exchange_round_trips() {
        let req = PduHeader::IcReq(IcReq { pfv: PFV_1_0, hpda: 0, hdgst: true, ddgst: false, maxr2t: 0 });
        let pdu = encode_pdu(&req, &[], &tx(true, true, 5));
        // IC PDUs are never digested or padded, whatever was negotiated.
        assert_eq!(&pdu[..8], &[0, 0, 128, 0, 128, 0, 0, 0]);
        assert_eq!(pdu[11], 0x01);
        assert_eq!(run(RxConfig::before_ic(H2C), &pdu, &[1]), expected(req, &[]));

        let resp = PduHeader::IcResp(IcResp { pfv: PFV_1_0, cpda: 0, hdgst: true, ddgst: true, maxh2cdata: 131_072 });
        let pdu = encode_pdu(&resp, &[], &TxConfig::default());
        assert_eq!(run(RxConfig::before_ic(C2H), &pdu, &[7, 100]), expected(resp, &[]));
    }

    #[test]
    fn truncated_input() {
        assert_eq!(parse_common_header(&[4, 0, 72]), Err(PduError::Truncated { needed: 8, available: 3 }));
        let pdu = encode_pdu(&write_cmd(1), &[], &tx(true, false, 0));
        assert_eq!(
            parse_header(&pdu[..70], &connected(H2C, true, false, 0)),
            Err(PduError::Truncated { needed: 76, available: 70 })
        );
        // A stream that stops mid-header reports nothing and waits.
        let mut reader = PduReader::new(connected(H2C, true, false, 0));
        assert_eq!(reader.feed(&pdu[..40]), Ok((40, None)));
        assert!(!reader.is_idle());
        assert_eq!(reader.received_header(), &pdu[..40]);
        assert_eq!(reader.feed(&[]), Ok((0, None)));
    }

    #[test]
    fn pdu_type_errors() {
        let cfg = connected(H2C, false, false, 0);
        // Unknown type 0x08.
        let err = first_error(cfg, &[0x08, 0, 24, 0, 24, 0, 0, 0]);
        assert_eq!(fes_fei(err), (Some(Fes::InvalidHeaderField), Some(fei::PDU_TYPE)));
        // A controller-to-host type sent to a controller.
        let r2t =
            encode_pdu(&PduHeader::R2T(R2T { cccid: 1, ttag: 2, r2to: 0, r2tl: 4096 }), &[], &TxConfig::default());
        let err = first_error(cfg, &r2t);
        assert_eq!(fes_fei(err), (Some(Fes::InvalidHeaderField), Some(fei::PDU_TYPE)));
        // And the same PDU is fine for a host.
        assert!(matches!(run(connected(C2H, false, false, 0), &r2t, &[3])[0], Seen::Header(..)));
    }

    #[test]
    fn sequence_errors() {
        let capsule = encode_pdu(&write_cmd(1), &[], &TxConfig::default());
        let err = first_error(RxConfig::before_ic(H2C), &capsule);
        assert_eq!(fes_fei(err), (Some(Fes::PduSequenceError), Some(0)));
        let icreq = encode_pdu(
            &PduHeader::IcReq(IcReq { pfv: 0, hpda: 0, hdgst: false, ddgst: false, maxr2t: 0 }),
            &[],
            &TxConfig::default(),
        );
        let err = first_error(connected(H2C, false, false, 0), &icreq);
        assert_eq!(fes_fei(err), (Some(Fes::PduSequenceError), Some(0)));
        // A termination request is accepted before the IC exchange.
        let mut buf = [0u8; 160];
        let n = encode_term_req(H2C, TermReq { fes: Fes::InvalidHeaderField as u16, fei: 2 }, &icreq[..24], &mut buf)
            .unwrap();
        assert_eq!(n, 48);
        let seen = run(RxConfig::before_ic(H2C), &buf[..n], &[5]);
        assert_eq!(seen, expected(PduHeader::H2CTermReq(TermReq { fes: 1, fei: 2 }), &icreq[..24]));
    }

    #[test]
    fn bad_hlen() {
        let mut pdu = encode_pdu(&write_cmd(1), &[], &TxConfig::default());
        pdu[2] = 24;
        let err = first_error(connected(H2C, false, false, 0), &pdu);
        assert_eq!(fes_fei(err), (Some(Fes::InvalidHeaderField), Some(fei::HLEN)));
    }

    #[test]
    fn bad_plen() {
        let cfg = connected(H2C, false, false, 0);
        // plen < hlen.
        let mut pdu = encode_pdu(&write_cmd(1), &[], &TxConfig::default());
        pdu[4] = 60;
        assert_eq!(fes_fei(first_error(cfg, &pdu)), (Some(Fes::InvalidHeaderField), Some(fei::PLEN)));
        // plen < hlen + header digest.
        let mut pdu = encode_pdu(&write_cmd(1), &[], &tx(true, false, 0));
        pdu[4] = 72;
        assert_eq!(
            fes_fei(first_error(connected(H2C, true, false, 0), &pdu)),
            (Some(Fes::InvalidHeaderField), Some(fei::PLEN))
        );
        // Data PDU whose plen leaves no room for data and digest.
        let mut pdu = encode_pdu(&write_cmd(1), &[1, 2, 3, 4], &tx(false, true, 0));
        pdu[4] = 72 + 3;
        assert_eq!(
            fes_fei(first_error(connected(H2C, false, true, 0), &pdu)),
            (Some(Fes::InvalidHeaderField), Some(fei::PLEN))
        );
        // IC PDU of the wrong length.
        let mut ic = [0u8; 128];
        ic[2] = 128;
        ic[4] = 129;
        assert_eq!(
            fes_fei(first_error(RxConfig::before_ic(H2C), &ic)),
            (Some(Fes::InvalidHeaderField), Some(fei::PLEN))
        );
        // Oversized termination request.
        let term = [0x02u8, 0, 24, 0, 153, 0, 0, 0];
        assert_eq!(fes_fei(first_error(cfg, &term)), (Some(Fes::InvalidHeaderField), Some(fei::PLEN)));
    }

    #[test]
    fn bad_pdo() {
        let cfg = connected(H2C, true, false, 7);
        let good = encode_pdu(&write_cmd(1), &[9; 64], &tx(true, false, 7));
        assert_eq!(good[3], 96);
        // Inside the header digest.
        let mut pdu = good.clone();
        pdu[3] = 72;
        assert_eq!(fes_fei(first_error(cfg, &pdu)), (Some(Fes::InvalidHeaderField), Some(fei::PDO)));
        // Past the header but not on the 32-byte alignment.
        let mut pdu = good.clone();
        pdu[3] = 80;
        assert_eq!(fes_fei(first_error(cfg, &pdu)), (Some(Fes::InvalidHeaderField), Some(fei::PDO)));
        // H2CData without data (PDO 0).
        let h2c = [0x06u8, 0, 24, 0, 24, 0, 0, 0];
        assert_eq!(
            fes_fei(first_error(connected(H2C, false, false, 0), &h2c)),
            (Some(Fes::InvalidHeaderField), Some(fei::PDO))
        );
    }

    #[test]
    fn bad_flags() {
        // Header digest negotiated but HDGSTF missing.
        let pdu = encode_pdu(&write_cmd(1), &[], &TxConfig::default());
        assert_eq!(
            fes_fei(first_error(connected(H2C, true, false, 0), &pdu)),
            (Some(Fes::InvalidHeaderField), Some(fei::FLAGS))
        );
        // Data digest flag although data digests are off.
        let pdu = encode_pdu(&write_cmd(1), &[1; 8], &tx(false, true, 0));
        assert_eq!(
            fes_fei(first_error(connected(H2C, false, false, 0), &pdu)),
            (Some(Fes::InvalidHeaderField), Some(fei::FLAGS))
        );
        // Data digests negotiated but the data comes without one.
        let pdu = encode_pdu(&write_cmd(1), &[1; 8], &TxConfig::default());
        assert_eq!(
            fes_fei(first_error(connected(H2C, false, true, 0), &pdu)),
            (Some(Fes::InvalidHeaderField), Some(fei::FLAGS))
        );
        // C2HData SUCCESS without LAST_PDU.
        let c2h = PduHeader::C2HData(C2HData { cccid: 1, datao: 0, datal: 4, last: true, success: true });
        let mut pdu = encode_pdu(&c2h, &[1; 4], &TxConfig::default());
        pdu[1] &= !flags::LAST_PDU;
        assert_eq!(
            fes_fei(first_error(connected(C2H, false, false, 0), &pdu)),
            (Some(Fes::InvalidHeaderField), Some(fei::FLAGS))
        );
    }

    #[test]
    fn bad_header_digest() {
        let cfg = connected(H2C, true, false, 0);
        let mut pdu = encode_pdu(&write_cmd(3), &[], &tx(true, false, 0));
        pdu[20] ^= 0x40;
        let err = first_error(cfg, &pdu);
        assert_eq!(fes_fei(err), (Some(Fes::HeaderDigestError), Some(0)));
        assert_eq!(err.term_req(), Some(TermReq { fes: 3, fei: 0 }));
        // The same damage byte by byte, and the header is quoted back.
        let mut reader = PduReader::new(cfg);
        let mut result = Ok((0, None));
        for b in &pdu {
            result = reader.feed(core::slice::from_ref(b));
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(err));
        assert_eq!(reader.received_header(), &pdu[..76]);
    }

    #[test]
    fn bad_data_digest_is_reported_and_the_stream_goes_on() {
        let cfg = connected(H2C, false, true, 0);
        let mut first = encode_pdu(&write_cmd(1), &[5; 100], &tx(false, true, 0));
        let last = first.len() - 1;
        first[last] ^= 1;
        let second = encode_pdu(&write_cmd(2), &[6; 10], &tx(false, true, 0));
        let stream = [first, second].concat();
        let seen = run(cfg, &stream, &[13]);
        let mut want = expected(write_cmd(1), &[5; 100]);
        *want.last_mut().unwrap() = Seen::DigestMismatch;
        want.extend(expected(write_cmd(2), &[6; 10]));
        assert_eq!(seen, want);
        // Completing the command is the caller's job, with this status.
        assert_eq!(Status::TRANSIENT_TRANSPORT_ERROR.sc, 0x22);
    }

    #[test]
    fn data_length_limits() {
        let mut cfg = connected(H2C, false, false, 0);
        cfg.max_in_capsule_data_len = 4096;
        cfg.max_data_pdu_len = 8192;
        let pdu = encode_pdu(&write_cmd(1), &[0; 4097], &TxConfig::default());
        assert_eq!(fes_fei(first_error(cfg, &pdu)), (Some(Fes::DataTransferLimitExceeded), Some(fei::PLEN)));
        let h2c = |datal| PduHeader::H2CData(H2CData { cccid: 1, ttag: 1, datao: 0, datal, last: true });
        let ok = encode_pdu(&h2c(8192), &[0; 8192], &TxConfig::default());
        assert_eq!(run(cfg, &ok, &[1000]), expected(h2c(8192), &[0; 8192]));
        let big = encode_pdu(&h2c(8193), &[0; 8193], &TxConfig::default());
        assert_eq!(fes_fei(first_error(cfg, &big)), (Some(Fes::DataTransferLimitExceeded), Some(fei::PLEN)));
        // DATAL that disagrees with PLEN.
        let mut lying = ok.clone();
        lying[16] = 1;
        assert_eq!(fes_fei(first_error(cfg, &lying)), (Some(Fes::InvalidHeaderField), Some(fei::DATAL)));
    }

    #[test]
    fn ic_field_errors() {
        let mut icreq = encode_pdu(
            &PduHeader::IcReq(IcReq { pfv: 0, hpda: 0, hdgst: false, ddgst: false, maxr2t: 0 }),
            &[],
            &TxConfig::default(),
        );
        icreq[8] = 1;
        assert_eq!(
            fes_fei(first_error(RxConfig::before_ic(H2C), &icreq)),
            (Some(Fes::UnsupportedParameter), Some(fei::PFV))
        );
        icreq[8] = 0;
        icreq[10] = 32;
        assert_eq!(
            fes_fei(first_error(RxConfig::before_ic(H2C), &icreq)),
            (Some(Fes::InvalidHeaderField), Some(fei::PDA))
        );
        let mut icresp = [0u8; 128];
        icresp[..8].copy_from_slice(&[1, 0, 128, 0, 128, 0, 0, 0]);
        icresp[12..16].copy_from_slice(&1024u32.to_le_bytes());
        assert_eq!(
            fes_fei(first_error(RxConfig::before_ic(C2H), &icresp)),
            (Some(Fes::InvalidHeaderField), Some(fei::MAXH2CDATA))
        );
        // Digest flags are never allowed on IC PDUs.
        icreq[10] = 0;
        icreq[1] = flags::HDGSTF;
        assert_eq!(
            fes_fei(first_error(RxConfig::before_ic(H2C), &icreq)),
            (Some(Fes::InvalidHeaderField), Some(fei::FLAGS))
        );
    }

    #[test]
    fn encoder_rejects_impossible_pdus() {
        let mut buf = [0u8; MAX_ENCODED_HEADER_LEN];
        let resp = PduHeader::CapsuleResp(CapsuleResp { cqe: Cqe::new(1, Status::SUCCESS) });
        assert!(matches!(encode_header(&resp, 1, &TxConfig::default(), &mut buf), Err(PduError::InvalidArgument(_))));
        assert_eq!(
            encode_header(&resp, 0, &tx(true, false, 0), &mut buf[..27]),
            Err(PduError::BufferTooSmall { needed: 28, available: 27 })
        );
        let c2h = PduHeader::C2HData(C2HData { cccid: 1, datao: 0, datal: 8, last: false, success: true });
        assert!(encode_header(&c2h, 8, &TxConfig::default(), &mut buf).is_err());
        let h2c = PduHeader::H2CData(H2CData { cccid: 1, ttag: 0, datao: 0, datal: 8, last: true });
        assert!(encode_header(&h2c, 9, &TxConfig::default(), &mut buf).is_err());
        let term = PduHeader::C2HTermReq(TermReq { fes: 1, fei: 0 });
        assert!(encode_header(&term, 129, &TxConfig::default(), &mut buf).is_err());
        // A term request quotes at most 128 bytes of the offending header.
        let mut out = [0u8; 200];
        let n = encode_term_req(C2H, TermReq { fes: 2, fei: 0 }, &[7; 300], &mut out).unwrap();
        assert_eq!(n, TERM_REQ_MAX_PLEN as usize);
        assert_eq!(&out[..8], &[0x03, 0, 24, 0, 152, 0, 0, 0]);
        assert_eq!(&out[8..14], &[2, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn chunks_can_land_in_a_caller_buffer() {
        let cfg = connected(H2C, false, true, 0);
        let data: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let pdu = encode_pdu(&write_cmd(1), &data, &tx(false, true, 0));
        let mut reader = PduReader::new(cfg);
        let mut dest = vec![0u8; 3000];
        let mut input = &pdu[..];
        let mut ended = false;
        while !ended {
            let take = input.len().min(333);
            let (used, event) = reader.feed(&input[..take]).unwrap();
            input = &input[used..];
            match event {
                Some(Event::Data(chunk)) => chunk.copy_into(&mut dest).unwrap(),
                Some(Event::End) => ended = true,
                Some(Event::Header { data_len, .. }) => assert_eq!(data_len, 3000),
                Some(Event::DataDigestMismatch { .. }) => panic!("digest mismatch"),
                None => {}
            }
        }
        assert_eq!(dest, data);
        assert!(input.is_empty());
        assert_eq!(
            DataChunk { offset: 10, bytes: &[1, 2] }.copy_into(&mut [0u8; 11]),
            Err(PduError::BufferTooSmall { needed: 12, available: 11 })
        );
    }

    #[test]
    fn zero_copy_receive_into_the_destination() {
        // The caller recv()s data straight into its buffer, sized by
        // data_remaining(), and lets the reader count and digest it there.
        let cfg = connected(H2C, true, true, 0);
        let data = [0x5Au8; 1000];
        let pdu = encode_pdu(&write_cmd(4), &data, &tx(true, true, 0));
        let mut reader = PduReader::new(cfg);
        let (used, event) = reader.feed(&pdu[..76]).unwrap();
        assert_eq!(used, 76);
        assert!(matches!(event, Some(Event::Header { data_len: 1000, .. })));
        assert_eq!(reader.data_remaining(), 1000);
        let mut dma = [0u8; 1000];
        dma[..600].copy_from_slice(&pdu[76..676]);
        let (used, _) = reader.feed(&dma[..600]).unwrap();
        assert_eq!((used, reader.data_remaining()), (600, 400));
        dma[600..].copy_from_slice(&pdu[676..1076]);
        reader.feed(&dma[600..]).unwrap();
        assert_eq!(reader.feed(&pdu[1076..]), Ok((4, Some(Event::End))));
        assert_eq!(dma, data);
    }

    fn arb_sqe() -> impl Strategy<Value = Sqe> {
        proptest::array::uniform32(any::<u8>())
            .prop_flat_map(|a| (Just(a), proptest::array::uniform32(any::<u8>())))
            .prop_map(|(a, b)| {
                let mut bytes = [0u8; 64];
                bytes[..32].copy_from_slice(&a);
                bytes[32..].copy_from_slice(&b);
                Sqe::read_from_bytes(&bytes[..]).unwrap()
            })
    }

    fn arb_cqe() -> impl Strategy<Value = Cqe> {
        proptest::array::uniform16(any::<u8>()).prop_map(|b| Cqe::read_from_bytes(&b[..]).unwrap())
    }

    /// A header of any type plus data consistent with it.
    fn arb_pdu() -> impl Strategy<Value = (PduHeader, Vec<u8>)> {
        let data = || proptest::collection::vec(any::<u8>(), 1..600);
        prop_oneof![
            (0u8..=MAX_PDA, any::<bool>(), any::<bool>(), any::<u32>()).prop_map(|(hpda, h, d, m)| {
                (PduHeader::IcReq(IcReq { pfv: 0, hpda, hdgst: h, ddgst: d, maxr2t: m }), vec![])
            }),
            (0u8..=MAX_PDA, any::<bool>(), any::<bool>(), 1024u32..(1 << 28)).prop_map(|(cpda, h, d, m)| {
                (PduHeader::IcResp(IcResp { pfv: 0, cpda, hdgst: h, ddgst: d, maxh2cdata: m * 4 }), vec![])
            }),
            (any::<bool>(), any::<u16>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..=128)).prop_map(
                |(h2c, fes, fei, quoted)| {
                    let t = TermReq { fes, fei };
                    (if h2c { PduHeader::H2CTermReq(t) } else { PduHeader::C2HTermReq(t) }, quoted)
                }
            ),
            (arb_sqe(), proptest::collection::vec(any::<u8>(), 0..600))
                .prop_map(|(sqe, d)| (PduHeader::CapsuleCmd(CapsuleCmd { sqe }), d)),
            arb_cqe().prop_map(|cqe| (PduHeader::CapsuleResp(CapsuleResp { cqe }), vec![])),
            (any::<u16>(), any::<u16>(), any::<u32>(), any::<bool>(), data()).prop_map(
                |(cccid, ttag, datao, last, d)| {
                    (PduHeader::H2CData(H2CData { cccid, ttag, datao, datal: d.len() as u32, last }), d)
                }
            ),
            (any::<u16>(), any::<u32>(), any::<bool>(), any::<bool>(), data()).prop_map(
                |(cccid, datao, last, success, d)| {
                    (
                        PduHeader::C2HData(C2HData {
                            cccid,
                            datao,
                            datal: d.len() as u32,
                            last: last || success,
                            success,
                        }),
                        d,
                    )
                }
            ),
            (any::<u16>(), any::<u16>(), any::<u32>(), any::<u32>())
                .prop_map(|(cccid, ttag, r2to, r2tl)| (PduHeader::R2T(R2T { cccid, ttag, r2to, r2tl }), vec![])),
        ]
    }

    fn rx_for(header: &PduHeader, cfg: &TxConfig) -> RxConfig {
        let direction = header.pdu_type().direction();
        match header.pdu_type() {
            PduType::IcReq | PduType::IcResp => RxConfig::before_ic(direction),
            _ => connected(direction, cfg.header_digest, cfg.data_digest, cfg.pda),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_pdu_round_trips(
            (header, data) in arb_pdu(),
            hd: bool, dd: bool, pda in 0u8..=MAX_PDA,
            chunks in proptest::collection::vec(1usize..200, 1..8),
        ) {
            let cfg = tx(hd, dd, pda);
            let pdu = encode_pdu(&header, &data, &cfg);
            let rx = rx_for(&header, &cfg);
            let want = expected(header, &data);
            prop_assert_eq!(&run(rx, &pdu, &[usize::MAX]), &want);
            prop_assert_eq!(&run(rx, &pdu, &[1]), &want);
            prop_assert_eq!(&run(rx, &pdu, &chunks), &want);
            let (parsed, layout) = parse_header(&pdu, &rx).unwrap();
            prop_assert_eq!(parsed, header);
            prop_assert_eq!(layout.plen as usize, pdu.len());
            prop_assert_eq!(layout.data_len as usize, data.len());
        }

        #[test]
        fn streams_of_pdus_decode_the_same_in_any_chunking(
            pdus in proptest::collection::vec(arb_pdu(), 1..6),
            hd: bool, dd: bool, pda in 0u8..=MAX_PDA,
            chunks in proptest::collection::vec(1usize..100, 1..8),
        ) {
            let cfg = tx(hd, dd, pda);
            let rx = connected(Direction::HostToController, hd, dd, pda);
            let mut stream = Vec::new();
            let mut want = Vec::new();
            for (header, data) in pdus.iter().filter(|(h, _)| {
                matches!(h.pdu_type(), PduType::CapsuleCmd | PduType::H2CData)
            }) {
                stream.extend(encode_pdu(header, data, &cfg));
                want.extend(expected(*header, data));
            }
            prop_assert_eq!(&run(rx, &stream, &[1]), &want);
            prop_assert_eq!(&run(rx, &stream, &chunks), &want);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_chunking_does_not_matter(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            to_controller: bool, ic_done: bool, hd: bool, dd: bool, pda in 0u8..40,
            chunks in proptest::collection::vec(1usize..50, 1..8),
        ) {
            let direction = if to_controller { H2C } else { C2H };
            let cfg = RxConfig { ic_done, ..connected(direction, hd, dd, pda) };
            let one_shot = run(cfg, &bytes, &[usize::MAX]);
            prop_assert_eq!(&run(cfg, &bytes, &[1]), &one_shot);
            prop_assert_eq!(&run(cfg, &bytes, &chunks), &one_shot);
            let _ = parse_header(&bytes, &cfg);
        }

        #[test]
        fn any_corrupted_header_byte_is_caught_by_the_header_digest(
            (header, data) in arb_pdu().prop_filter("a digested host-to-controller PDU", |(h, _)| {
                matches!(h.pdu_type(), PduType::CapsuleCmd | PduType::H2CData)
            }),
            byte in 0usize..72, bit in 0u8..8,
        ) {
            let cfg = tx(true, false, 0);
            let mut pdu = encode_pdu(&header, &data, &cfg);
            let hlen = usize::from(header.pdu_type().hlen());
            // Leave the common header alone: damage there is caught earlier.
            let at = 8 + byte % (hlen - 8);
            pdu[at] ^= 1 << bit;
            let err = first_error(rx_for(&header, &cfg), &pdu);
            prop_assert_eq!(err.fes(), Some(Fes::HeaderDigestError));
        }
    }
}
