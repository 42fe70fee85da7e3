//! Identify command data: CNS values, Identify Controller and Identify
//! Namespace (4096 bytes each), the namespace identification descriptor
//! list and the namespace ID list.

use core::mem::size_of;

use zerocopy::little_endian::{U128, U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::cmd::Sqe;
use crate::error::SpecError;

/// Size of every Identify data structure.
pub const IDENTIFY_DATA_LEN: usize = 4096;

/// Controller or Namespace Structure (CNS, CDW10 bits 7:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cns(pub u8);

impl Cns {
    pub const NAMESPACE: Self = Self(0x00);
    pub const CONTROLLER: Self = Self(0x01);
    pub const ACTIVE_NAMESPACE_LIST: Self = Self(0x02);
    pub const NAMESPACE_ID_DESCRIPTORS: Self = Self(0x03);
    pub const NVM_SET_LIST: Self = Self(0x04);
    pub const CSI_NAMESPACE: Self = Self(0x05);
    pub const CSI_CONTROLLER: Self = Self(0x06);
    pub const CSI_ACTIVE_NAMESPACE_LIST: Self = Self(0x07);
    pub const CS_INDEPENDENT_NAMESPACE: Self = Self(0x08);
    pub const ALLOCATED_NAMESPACE_LIST: Self = Self(0x10);
    pub const ALLOCATED_NAMESPACE: Self = Self(0x11);
    pub const NAMESPACE_CONTROLLER_LIST: Self = Self(0x12);
    pub const CONTROLLER_LIST: Self = Self(0x13);
    pub const PRIMARY_CONTROLLER_CAPABILITIES: Self = Self(0x14);
    pub const SECONDARY_CONTROLLER_LIST: Self = Self(0x15);
    pub const NAMESPACE_GRANULARITY_LIST: Self = Self(0x16);
    pub const UUID_LIST: Self = Self(0x17);
    pub const IO_COMMAND_SET: Self = Self(0x1C);
}

/// The fields of an Identify command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentifyParams {
    pub cns: Cns,
    /// Controller identifier (CDW10 bits 31:16), for controller lists.
    pub cntid: u16,
    /// Command set identifier (CDW11 bits 31:24).
    pub csi: u8,
    pub nsid: u32,
}

impl IdentifyParams {
    pub fn from_sqe(sqe: &Sqe) -> Self {
        let cdw10 = sqe.cdw10.get();
        Self {
            cns: Cns(cdw10 as u8),
            cntid: (cdw10 >> 16) as u16,
            csi: (sqe.cdw11.get() >> 24) as u8,
            nsid: sqe.nsid.get(),
        }
    }

    pub fn write_to(&self, sqe: &mut Sqe) {
        sqe.nsid = U32::new(self.nsid);
        sqe.cdw10 = U32::new(u32::from(self.cns.0) | (u32::from(self.cntid) << 16));
        sqe.cdw11 = U32::new(u32::from(self.csi) << 24);
    }
}

/// Controller type (CNTRLTYPE).
pub mod cntrltype {
    pub const IO: u8 = 1;
    pub const DISCOVERY: u8 = 2;
    pub const ADMIN: u8 = 3;
}

/// CMIC bits.
pub mod cmic {
    pub const MULTI_PORT: u8 = 1 << 0;
    pub const MULTI_CONTROLLER: u8 = 1 << 1;
    pub const SRIOV: u8 = 1 << 2;
    pub const ANA_REPORTING: u8 = 1 << 3;
}

/// ANACAP bits: which ANA states the controller reports, and how ANA
/// group IDs behave.
pub mod anacap {
    pub const OPTIMIZED: u8 = 1 << 0;
    pub const NON_OPTIMIZED: u8 = 1 << 1;
    pub const INACCESSIBLE: u8 = 1 << 2;
    pub const PERSISTENT_LOSS: u8 = 1 << 3;
    pub const CHANGE: u8 = 1 << 4;
    /// A namespace's ANAGRPID does not change while it is attached.
    pub const ANAGRPID_FIXED_WHILE_ATTACHED: u8 = 1 << 6;
    /// Namespace Management accepts a non-zero ANAGRPID.
    pub const NONZERO_ANAGRPID_IN_NS_MGMT: u8 = 1 << 7;
}

/// OAES bits: asynchronous events the controller can send.
pub mod oaes {
    pub const NAMESPACE_ATTRIBUTE: u32 = 1 << 8;
    pub const FIRMWARE_ACTIVATION: u32 = 1 << 9;
    pub const ANA_CHANGE: u32 = 1 << 11;
    pub const DISCOVERY_LOG_CHANGE: u32 = 1 << 31;
}

/// CTRATT bits.
pub mod ctratt {
    /// 128-bit host identifier (required over fabrics).
    pub const HOST_ID_128: u32 = 1 << 0;
    pub const NON_OPERATIONAL_POWER_STATE: u32 = 1 << 1;
    pub const TBKAS: u32 = 1 << 6;
}

/// LPA bits: log page attributes.
pub mod lpa {
    pub const SMART_PER_NAMESPACE: u8 = 1 << 0;
    pub const COMMANDS_EFFECTS: u8 = 1 << 1;
    /// Extended data for Get Log Page: NUMDU and the 64-bit offset.
    pub const EXTENDED_DATA: u8 = 1 << 2;
    pub const TELEMETRY: u8 = 1 << 3;
    pub const PERSISTENT_EVENT: u8 = 1 << 4;
}

/// ONCS bits: optional NVM commands supported.
pub mod oncs {
    pub const COMPARE: u16 = 1 << 0;
    pub const WRITE_UNCORRECTABLE: u16 = 1 << 1;
    pub const DATASET_MANAGEMENT: u16 = 1 << 2;
    pub const WRITE_ZEROES: u16 = 1 << 3;
    pub const SAVE_SELECT_FEATURES: u16 = 1 << 4;
    pub const RESERVATIONS: u16 = 1 << 5;
    pub const TIMESTAMP: u16 = 1 << 6;
    pub const VERIFY: u16 = 1 << 7;
    pub const COPY: u16 = 1 << 8;
}

/// VWC bits.
pub mod vwc {
    /// A volatile write cache is present.
    pub const PRESENT: u8 = 1 << 0;
    /// Flush with NSID FFFFFFFFh is supported (bits 2:1 = 11b).
    pub const FLUSH_BROADCAST_SUPPORTED: u8 = 0b11 << 1;
    /// Flush with NSID FFFFFFFFh is not supported (bits 2:1 = 10b).
    pub const FLUSH_BROADCAST_UNSUPPORTED: u8 = 0b10 << 1;
}

/// SGLS bits.
pub mod sgls {
    /// SGLs supported, no alignment requirement (bits 1:0 = 01b).
    pub const SUPPORTED: u32 = 0b01;
    /// SGLs supported, dword alignment required (bits 1:0 = 10b).
    pub const SUPPORTED_DWORD_ALIGNED: u32 = 0b10;
    pub const KEYED: u32 = 1 << 2;
    pub const BIT_BUCKET: u32 = 1 << 16;
    pub const BYTE_ALIGNED_METADATA: u32 = 1 << 17;
    pub const LONGER_THAN_DATA: u32 = 1 << 18;
    pub const MPTR_SGL: u32 = 1 << 19;
    /// The address field may be an offset (needed for in-capsule data).
    pub const OFFSET: u32 = 1 << 20;
    pub const TRANSPORT_DATA_BLOCK: u32 = 1 << 21;
}

/// Power state descriptor (32 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct PowerStateDescriptor {
    /// Maximum power (MP), in 0.01 W or 0.0001 W units (see flags bit 0).
    pub mp: U16,
    pub rsvd2: u8,
    /// MXPS (bit 0), NOPS (bit 1).
    pub flags: u8,
    /// Entry latency, microseconds.
    pub enlat: U32,
    /// Exit latency, microseconds.
    pub exlat: U32,
    pub rrt: u8,
    pub rrl: u8,
    pub rwt: u8,
    pub rwl: u8,
    pub idlp: U16,
    pub ips: u8,
    pub rsvd19: u8,
    pub actp: U16,
    pub apw_aps: u8,
    pub rsvd23: [u8; 9],
}

const _: () = assert!(size_of::<PowerStateDescriptor>() == 32);

/// Identify Controller data structure (CNS 01h, 4096 bytes).
#[repr(C)]
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct IdentifyController {
    pub vid: U16,
    pub ssvid: U16,
    /// Serial number, ASCII, space padded.
    pub sn: [u8; 20],
    /// Model number, ASCII, space padded.
    pub mn: [u8; 40],
    /// Firmware revision, ASCII, space padded.
    pub fr: [u8; 8],
    pub rab: u8,
    pub ieee: [u8; 3],
    pub cmic: u8,
    /// Max data transfer size, a power of two in units of CAP.MPSMIN (0 = no limit).
    pub mdts: u8,
    pub cntlid: U16,
    pub ver: U32,
    pub rtd3r: U32,
    pub rtd3e: U32,
    pub oaes: U32,
    pub ctratt: U32,
    pub rrls: U16,
    pub rsvd102: [u8; 9],
    pub cntrltype: u8,
    pub fguid: [u8; 16],
    pub crdt1: U16,
    pub crdt2: U16,
    pub crdt3: U16,
    pub rsvd134: [u8; 122],
    // Admin command set attributes, byte 256.
    pub oacs: U16,
    /// Abort command limit, 0's based.
    pub acl: u8,
    /// Async event request limit, 0's based.
    pub aerl: u8,
    pub frmw: u8,
    pub lpa: u8,
    /// Error log page entries, 0's based.
    pub elpe: u8,
    /// Number of power states supported, 0's based.
    pub npss: u8,
    pub avscc: u8,
    pub apsta: u8,
    pub wctemp: U16,
    pub cctemp: U16,
    pub mtfa: U16,
    pub hmpre: U32,
    pub hmmin: U32,
    pub tnvmcap: U128,
    pub unvmcap: U128,
    pub rpmbs: U32,
    pub edstt: U16,
    pub dsto: u8,
    pub fwug: u8,
    /// Keep alive granularity, 100 ms units.
    pub kas: U16,
    pub hctma: U16,
    pub mntmt: U16,
    pub mxtmt: U16,
    pub sanicap: U32,
    pub hmminds: U32,
    pub hmmaxd: U16,
    pub nsetidmax: U16,
    pub endgidmax: U16,
    pub anatt: u8,
    pub anacap: u8,
    pub anagrpmax: U32,
    pub nanagrpid: U32,
    pub rsvd352: [u8; 160],
    // NVM command set attributes, byte 512.
    /// SQ entry size: required (bits 3:0) and maximum (7:4), powers of two.
    pub sqes: u8,
    /// CQ entry size: required (bits 3:0) and maximum (7:4), powers of two.
    pub cqes: u8,
    /// Maximum outstanding commands (fabrics).
    pub maxcmd: U16,
    /// Number of namespaces: the highest valid NSID.
    pub nn: U32,
    pub oncs: U16,
    pub fuses: U16,
    pub fna: u8,
    pub vwc: u8,
    pub awun: U16,
    pub awupf: U16,
    pub icsvscc: u8,
    pub nwpc: u8,
    pub acwu: U16,
    pub ocfs: U16,
    pub sgls: U32,
    pub mnan: U32,
    pub rsvd544: [u8; 224],
    /// NVM subsystem NQN, NUL padded.
    pub subnqn: [u8; 256],
    pub rsvd1024: [u8; 768],
    // Fabrics attributes, byte 1792.
    /// IO queue command capsule supported size, 16-byte units (SQE included).
    pub ioccsz: U32,
    /// IO queue response capsule supported size, 16-byte units.
    pub iorcsz: U32,
    /// In-capsule data offset, 16-byte units.
    pub icdoff: U16,
    /// Fabrics controller attributes: bit 0 set for the static controller model.
    pub fcatt: u8,
    /// Maximum SGL data block descriptors per command.
    pub msdbd: u8,
    pub ofcs: U16,
    pub rsvd1806: [u8; 242],
    pub psd: [PowerStateDescriptor; 32],
    pub vs: [u8; 1024],
}

const _: () = assert!(size_of::<IdentifyController>() == IDENTIFY_DATA_LEN);

impl IdentifyController {
    pub fn zeroed() -> Self {
        Self::new_zeroed()
    }
}

/// LBA format (4 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct LbaFormat {
    /// Metadata bytes per LBA.
    pub ms: U16,
    /// LBA data size as a power of two (9 = 512 B, 12 = 4096 B).
    pub lbads: u8,
    /// Relative performance, bits 1:0 (0 best).
    pub rp: u8,
}

const _: () = assert!(size_of::<LbaFormat>() == 4);

impl LbaFormat {
    pub fn new(block_size_log2: u8, metadata_bytes: u16) -> Self {
        Self { ms: U16::new(metadata_bytes), lbads: block_size_log2, rp: 0 }
    }

    /// The data size of one LBA in bytes, or `None` for a value no real
    /// device reports (a data size below 512 B is not allowed; above 2^31
    /// cannot be used).
    pub fn block_size(&self) -> Option<u32> {
        (9..32).contains(&self.lbads).then(|| 1u32 << self.lbads)
    }
}

/// NSFEAT bits.
pub mod nsfeat {
    pub const THIN_PROVISIONING: u8 = 1 << 0;
    pub const ATOMICS: u8 = 1 << 1;
    pub const DEALLOCATED_ERROR: u8 = 1 << 2;
    pub const UID_REUSE: u8 = 1 << 3;
    pub const OPTIMAL_PERFORMANCE: u8 = 1 << 4;
}

/// Identify Namespace data structure for the NVM command set (CNS 00h,
/// 4096 bytes).
#[repr(C)]
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct IdentifyNamespace {
    /// Namespace size, in logical blocks.
    pub nsze: U64,
    /// Namespace capacity, in logical blocks.
    pub ncap: U64,
    /// Namespace utilization, in logical blocks.
    pub nuse: U64,
    pub nsfeat: u8,
    /// Number of LBA formats, 0's based.
    pub nlbaf: u8,
    /// Formatted LBA size: format index bits 3:0 (low) and 6:5 (high).
    pub flbas: u8,
    pub mc: u8,
    pub dpc: u8,
    pub dps: u8,
    pub nmic: u8,
    pub rescap: u8,
    pub fpi: u8,
    /// Deallocate logical block features: bits 2:0 say what a read of a
    /// deallocated block returns (001b zeroes); bit 3 write zeroes deallocates.
    pub dlfeat: u8,
    pub nawun: U16,
    pub nawupf: U16,
    pub nacwu: U16,
    pub nabsn: U16,
    pub nabo: U16,
    pub nabspf: U16,
    pub noiob: U16,
    pub nvmcap: U128,
    pub npwg: U16,
    pub npwa: U16,
    pub npdg: U16,
    pub npda: U16,
    pub nows: U16,
    pub mssrl: U16,
    pub mcl: U32,
    pub msrc: u8,
    pub rsvd81: [u8; 11],
    pub anagrpid: U32,
    pub rsvd96: [u8; 3],
    pub nsattr: u8,
    pub nvmsetid: U16,
    pub endgid: U16,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    pub lbaf: [LbaFormat; 64],
    pub rsvd384: [u8; 2688],
    pub vs: [u8; 1024],
}

const _: () = assert!(size_of::<IdentifyNamespace>() == IDENTIFY_DATA_LEN);

impl IdentifyNamespace {
    pub fn zeroed() -> Self {
        Self::new_zeroed()
    }

    /// Index of the LBA format the namespace is formatted with.
    pub fn formatted_lba_index(&self) -> usize {
        let low = self.flbas & 0x0F;
        let high = (self.flbas >> 5) & 0x03;
        usize::from(low | (high << 4))
    }

    /// The LBA format in use, or `None` if FLBAS points past NLBAF.
    pub fn formatted_lba_format(&self) -> Option<LbaFormat> {
        let index = self.formatted_lba_index();
        if index > usize::from(self.nlbaf) {
            return None;
        }
        self.lbaf.get(index).copied()
    }

    /// Sets FLBAS to `index` (0..64), keeping the metadata-extended bit.
    pub fn set_formatted_lba_index(&mut self, index: u8) {
        let low = index & 0x0F;
        let high = (index >> 4) & 0x03;
        self.flbas = (self.flbas & 0x10) | low | (high << 5);
    }
}

/// Namespace identifier type (NIDT).
pub mod nidt {
    pub const EUI64: u8 = 0x01;
    pub const NGUID: u8 = 0x02;
    pub const UUID: u8 = 0x03;
    pub const CSI: u8 = 0x04;
}

/// One namespace identification descriptor (CNS 03h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NsIdDescriptor {
    Eui64([u8; 8]),
    Nguid([u8; 16]),
    Uuid([u8; 16]),
    /// Command set identifier (0 = NVM).
    Csi(u8),
    /// A type this crate does not know; skipped by length.
    Unknown {
        nidt: u8,
        nidl: u8,
    },
}

const NS_ID_DESC_HEADER_LEN: usize = 4;

impl NsIdDescriptor {
    fn nidt(&self) -> u8 {
        match self {
            Self::Eui64(_) => nidt::EUI64,
            Self::Nguid(_) => nidt::NGUID,
            Self::Uuid(_) => nidt::UUID,
            Self::Csi(_) => nidt::CSI,
            Self::Unknown { nidt, .. } => *nidt,
        }
    }

    fn value(&self) -> &[u8] {
        match self {
            Self::Eui64(v) => v,
            Self::Nguid(v) | Self::Uuid(v) => v,
            Self::Csi(v) => core::slice::from_ref(v),
            Self::Unknown { .. } => &[],
        }
    }

    /// The required NIDL of a known type.
    fn expected_len(nidt: u8) -> Option<usize> {
        match nidt {
            nidt::EUI64 => Some(8),
            nidt::NGUID | nidt::UUID => Some(16),
            nidt::CSI => Some(1),
            _ => None,
        }
    }
}

/// Encodes descriptors into `out` (normally the 4096-byte Identify buffer),
/// zero-filling the rest: a zero NIDT ends the list. Returns bytes used.
/// [`NsIdDescriptor::Unknown`] entries are skipped.
pub fn encode_ns_id_descriptors(descriptors: &[NsIdDescriptor], out: &mut [u8]) -> Result<usize, SpecError> {
    let mut at = 0usize;
    for d in descriptors {
        if matches!(d, NsIdDescriptor::Unknown { .. }) {
            continue;
        }
        let value = d.value();
        let end = at + NS_ID_DESC_HEADER_LEN + value.len();
        let Some(slot) = out.get_mut(at..end) else {
            return Err(SpecError::Truncated { needed: end, available: out.len() });
        };
        slot[0] = d.nidt();
        slot[1] = value.len() as u8;
        slot[2] = 0;
        slot[3] = 0;
        slot[NS_ID_DESC_HEADER_LEN..].copy_from_slice(value);
        at = end;
    }
    out[at..].fill(0);
    Ok(at)
}

/// Iterates over a namespace identification descriptor list; stops at the
/// first zero NIDT or the end of the buffer. Yields an error, then stops,
/// on a descriptor that overruns the buffer or has the wrong length.
pub fn decode_ns_id_descriptors(buf: &[u8]) -> NsIdDescriptorIter<'_> {
    NsIdDescriptorIter { buf, at: 0, done: false }
}

/// Iterator returned by [`decode_ns_id_descriptors`].
#[derive(Debug, Clone)]
pub struct NsIdDescriptorIter<'a> {
    buf: &'a [u8],
    at: usize,
    done: bool,
}

impl Iterator for NsIdDescriptorIter<'_> {
    type Item = Result<NsIdDescriptor, SpecError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let rest = self.buf.get(self.at..).unwrap_or(&[]);
        let (kind, len) = match rest {
            [] | [0, ..] => {
                self.done = true;
                return None;
            }
            [kind, len, _, _, ..] => (*kind, usize::from(*len)),
            _ => {
                self.done = true;
                return Some(Err(SpecError::Truncated {
                    needed: self.at + NS_ID_DESC_HEADER_LEN,
                    available: self.buf.len(),
                }));
            }
        };
        let start = self.at;
        let Some(value) = rest.get(NS_ID_DESC_HEADER_LEN..NS_ID_DESC_HEADER_LEN + len) else {
            self.done = true;
            return Some(Err(SpecError::Truncated {
                needed: start + NS_ID_DESC_HEADER_LEN + len,
                available: self.buf.len(),
            }));
        };
        self.at = start + NS_ID_DESC_HEADER_LEN + len;
        if let Some(expected) = NsIdDescriptor::expected_len(kind) {
            if expected != len {
                self.done = true;
                return Some(Err(SpecError::BadDescriptorLength { offset: start, kind, len, expected }));
            }
        }
        let d = match kind {
            nidt::EUI64 => NsIdDescriptor::Eui64(value.try_into().unwrap_or_default()),
            nidt::NGUID => NsIdDescriptor::Nguid(value.try_into().unwrap_or_default()),
            nidt::UUID => NsIdDescriptor::Uuid(value.try_into().unwrap_or_default()),
            nidt::CSI => NsIdDescriptor::Csi(value.first().copied().unwrap_or(0)),
            _ => NsIdDescriptor::Unknown { nidt: kind, nidl: len as u8 },
        };
        Some(Ok(d))
    }
}

/// A list of up to 1024 namespace IDs (4096 bytes), ascending and ended by
/// the first zero entry: the active namespace list (CNS 02h) and the
/// changed namespace list log page share this shape.
#[repr(C)]
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct NamespaceList {
    pub ids: [U32; 1024],
}

const _: () = assert!(size_of::<NamespaceList>() == IDENTIFY_DATA_LEN);

impl NamespaceList {
    pub const CAPACITY: usize = 1024;

    /// Builds a list from ascending NSIDs; entries past 1024 are dropped
    /// (the caller knows whether that means "overflow").
    pub fn from_ids<I: IntoIterator<Item = u32>>(ids: I) -> Self {
        let mut list = Self::new_zeroed();
        for (slot, id) in list.ids.iter_mut().zip(ids) {
            *slot = U32::new(id);
        }
        list
    }

    /// The IDs up to the first zero.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ids.iter().map(|v| v.get()).take_while(|&id| id != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn identify_controller_offsets() {
        assert_eq!(offset_of!(IdentifyController, sn), 4);
        assert_eq!(offset_of!(IdentifyController, mn), 24);
        assert_eq!(offset_of!(IdentifyController, fr), 64);
        assert_eq!(offset_of!(IdentifyController, rab), 72);
        assert_eq!(offset_of!(IdentifyController, ieee), 73);
        assert_eq!(offset_of!(IdentifyController, cmic), 76);
        assert_eq!(offset_of!(IdentifyController, mdts), 77);
        assert_eq!(offset_of!(IdentifyController, cntlid), 78);
        assert_eq!(offset_of!(IdentifyController, ver), 80);
        assert_eq!(offset_of!(IdentifyController, oaes), 92);
        assert_eq!(offset_of!(IdentifyController, ctratt), 96);
        assert_eq!(offset_of!(IdentifyController, cntrltype), 111);
        assert_eq!(offset_of!(IdentifyController, fguid), 112);
        assert_eq!(offset_of!(IdentifyController, oacs), 256);
        assert_eq!(offset_of!(IdentifyController, acl), 258);
        assert_eq!(offset_of!(IdentifyController, aerl), 259);
        assert_eq!(offset_of!(IdentifyController, frmw), 260);
        assert_eq!(offset_of!(IdentifyController, lpa), 261);
        assert_eq!(offset_of!(IdentifyController, elpe), 262);
        assert_eq!(offset_of!(IdentifyController, npss), 263);
        assert_eq!(offset_of!(IdentifyController, tnvmcap), 280);
        assert_eq!(offset_of!(IdentifyController, kas), 320);
        assert_eq!(offset_of!(IdentifyController, anatt), 342);
        assert_eq!(offset_of!(IdentifyController, nanagrpid), 348);
        assert_eq!(offset_of!(IdentifyController, sqes), 512);
        assert_eq!(offset_of!(IdentifyController, cqes), 513);
        assert_eq!(offset_of!(IdentifyController, maxcmd), 514);
        assert_eq!(offset_of!(IdentifyController, nn), 516);
        assert_eq!(offset_of!(IdentifyController, oncs), 520);
        assert_eq!(offset_of!(IdentifyController, fuses), 522);
        assert_eq!(offset_of!(IdentifyController, fna), 524);
        assert_eq!(offset_of!(IdentifyController, vwc), 525);
        assert_eq!(offset_of!(IdentifyController, awun), 526);
        assert_eq!(offset_of!(IdentifyController, awupf), 528);
        assert_eq!(offset_of!(IdentifyController, sgls), 536);
        assert_eq!(offset_of!(IdentifyController, mnan), 540);
        assert_eq!(offset_of!(IdentifyController, subnqn), 768);
        assert_eq!(offset_of!(IdentifyController, ioccsz), 1792);
        assert_eq!(offset_of!(IdentifyController, iorcsz), 1796);
        assert_eq!(offset_of!(IdentifyController, icdoff), 1800);
        assert_eq!(offset_of!(IdentifyController, fcatt), 1802);
        assert_eq!(offset_of!(IdentifyController, msdbd), 1803);
        assert_eq!(offset_of!(IdentifyController, psd), 2048);
        assert_eq!(offset_of!(IdentifyController, vs), 3072);
    }

    #[test]
    fn identify_namespace_offsets() {
        assert_eq!(offset_of!(IdentifyNamespace, ncap), 8);
        assert_eq!(offset_of!(IdentifyNamespace, nuse), 16);
        assert_eq!(offset_of!(IdentifyNamespace, nsfeat), 24);
        assert_eq!(offset_of!(IdentifyNamespace, nlbaf), 25);
        assert_eq!(offset_of!(IdentifyNamespace, flbas), 26);
        assert_eq!(offset_of!(IdentifyNamespace, dlfeat), 33);
        assert_eq!(offset_of!(IdentifyNamespace, nvmcap), 48);
        assert_eq!(offset_of!(IdentifyNamespace, npwg), 64);
        assert_eq!(offset_of!(IdentifyNamespace, anagrpid), 92);
        assert_eq!(offset_of!(IdentifyNamespace, nsattr), 99);
        assert_eq!(offset_of!(IdentifyNamespace, nguid), 104);
        assert_eq!(offset_of!(IdentifyNamespace, eui64), 120);
        assert_eq!(offset_of!(IdentifyNamespace, lbaf), 128);
        assert_eq!(offset_of!(IdentifyNamespace, vs), 3072);
    }

    #[test]
    fn lba_format_selection() {
        let mut ns = IdentifyNamespace::zeroed();
        ns.nlbaf = 17;
        ns.lbaf[0] = LbaFormat::new(9, 0);
        ns.lbaf[17] = LbaFormat::new(12, 8);
        ns.set_formatted_lba_index(17);
        assert_eq!(ns.flbas, 0x21);
        assert_eq!(ns.formatted_lba_index(), 17);
        assert_eq!(ns.formatted_lba_format().and_then(|f| f.block_size()), Some(4096));
        ns.nlbaf = 0;
        assert_eq!(ns.formatted_lba_format(), None);
        assert_eq!(ns.as_bytes()[128 + 17 * 4 + 2], 12);
    }

    #[test]
    fn ns_id_descriptors_round_trip() {
        let descs = [
            NsIdDescriptor::Eui64([1, 2, 3, 4, 5, 6, 7, 8]),
            NsIdDescriptor::Nguid([0xAB; 16]),
            NsIdDescriptor::Uuid([0xCD; 16]),
            NsIdDescriptor::Csi(0),
        ];
        let mut buf = [0xFFu8; IDENTIFY_DATA_LEN];
        let used = encode_ns_id_descriptors(&descs, &mut buf).unwrap();
        assert_eq!(used, 12 + 20 + 20 + 5);
        assert_eq!(&buf[0..4], &[1, 8, 0, 0]);
        assert_eq!(&buf[12..16], &[2, 16, 0, 0]);
        let back: Vec<_> = decode_ns_id_descriptors(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(back, descs);
    }

    #[test]
    fn ns_id_descriptor_errors() {
        // NGUID with a length of 8.
        let bad = [2u8, 8, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let first = decode_ns_id_descriptors(&bad).next().unwrap();
        assert!(matches!(first, Err(SpecError::BadDescriptorLength { kind: 2, len: 8, .. })));
        // Overruns the buffer.
        let short = [3u8, 16, 0, 0, 1];
        assert!(matches!(decode_ns_id_descriptors(&short).next(), Some(Err(SpecError::Truncated { .. }))));
        // Unknown types are skipped by length.
        let unknown = [9u8, 2, 0, 0, 0xAA, 0xBB, 4, 1, 0, 0, 2];
        let all: Vec<_> = decode_ns_id_descriptors(&unknown).collect();
        assert_eq!(all, vec![Ok(NsIdDescriptor::Unknown { nidt: 9, nidl: 2 }), Ok(NsIdDescriptor::Csi(2))]);
        assert_eq!(
            encode_ns_id_descriptors(&[NsIdDescriptor::Uuid([0; 16])], &mut [0u8; 10]),
            Err(SpecError::Truncated { needed: 20, available: 10 })
        );
    }

    #[test]
    fn namespace_list_stops_at_zero() {
        let list = NamespaceList::from_ids([1, 2, 7]);
        assert_eq!(list.iter().collect::<Vec<_>>(), vec![1, 2, 7]);
        assert_eq!(&list.as_bytes()[8..12], &7u32.to_le_bytes());
        let full = NamespaceList::from_ids(1..=5000);
        assert_eq!(full.iter().count(), NamespaceList::CAPACITY);
    }
}
