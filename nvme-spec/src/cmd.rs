//! Submission queue entry, completion queue entry and the SGL descriptor:
//! the 64-byte command and 16-byte completion every transport carries.

use core::mem::size_of;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::status::Status;

/// Fused operation bits (CDW0 bits 9:8, byte 1 bits 1:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fuse {
    Normal,
    First,
    Second,
    Reserved,
}

/// PRP or SGL for data transfer (CDW0 bits 15:14, byte 1 bits 7:6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Psdt {
    /// PRPs describe the data (PCIe only).
    Prp,
    /// SGLs describe the data; MPTR is the address of one contiguous
    /// metadata buffer. NVMe over Fabrics requires this value.
    SglMetadataBuffer,
    /// SGLs describe the data; MPTR is the address of an SGL segment.
    SglMetadataSegment,
    Reserved,
}

/// Data pointer (DPTR, bytes 24..40): PRP entry 1 and 2, or one SGL
/// descriptor (see [`Sqe::sgl1`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Dptr {
    pub prp1: U64,
    pub prp2: U64,
}

/// Submission queue entry (64 bytes), the common command format.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Sqe {
    /// Opcode (CDW0 bits 7:0).
    pub opcode: u8,
    /// FUSE (bits 1:0) and PSDT (bits 7:6); see [`Sqe::fuse`], [`Sqe::psdt`].
    pub flags: u8,
    /// Command identifier, unique among outstanding commands of one SQ.
    pub cid: U16,
    pub nsid: U32,
    pub cdw2: U32,
    pub cdw3: U32,
    /// Metadata pointer.
    pub mptr: U64,
    pub dptr: Dptr,
    pub cdw10: U32,
    pub cdw11: U32,
    pub cdw12: U32,
    pub cdw13: U32,
    pub cdw14: U32,
    pub cdw15: U32,
}

const _: () = assert!(size_of::<Dptr>() == 16);
const _: () = assert!(size_of::<Sqe>() == 64);

const FLAGS_FUSE_MASK: u8 = 0b0000_0011;
const FLAGS_PSDT_SHIFT: u32 = 6;

/// CDW12 bit of Read, Write and Write Zeroes: Force Unit Access.
pub const CDW12_FUA: u32 = 1 << 30;
/// CDW12 bits 29:26 of Read, Write and Write Zeroes: protection information
/// (PRINFO; bit 29 is PRACT). NVMe has no DPO bit: SCSI's DPO has no wire
/// form here. Ignored for namespaces without end-to-end protection.
pub const CDW12_PRINFO: u32 = 0b1111 << 26;

impl Sqe {
    /// A zeroed command with the given opcode and command identifier.
    pub fn new(opcode: u8, cid: u16) -> Self {
        Self { opcode, cid: U16::new(cid), ..Self::default() }
    }

    pub fn fuse(&self) -> Fuse {
        match self.flags & FLAGS_FUSE_MASK {
            0 => Fuse::Normal,
            1 => Fuse::First,
            2 => Fuse::Second,
            _ => Fuse::Reserved,
        }
    }

    pub fn set_fuse(&mut self, fuse: Fuse) {
        let bits = match fuse {
            Fuse::Normal => 0,
            Fuse::First => 1,
            Fuse::Second => 2,
            Fuse::Reserved => 3,
        };
        self.flags = (self.flags & !FLAGS_FUSE_MASK) | bits;
    }

    pub fn psdt(&self) -> Psdt {
        match self.flags >> FLAGS_PSDT_SHIFT {
            0 => Psdt::Prp,
            1 => Psdt::SglMetadataBuffer,
            2 => Psdt::SglMetadataSegment,
            _ => Psdt::Reserved,
        }
    }

    pub fn set_psdt(&mut self, psdt: Psdt) {
        let bits: u8 = match psdt {
            Psdt::Prp => 0,
            Psdt::SglMetadataBuffer => 1,
            Psdt::SglMetadataSegment => 2,
            Psdt::Reserved => 3,
        };
        self.flags = (self.flags & FLAGS_FUSE_MASK) | (bits << FLAGS_PSDT_SHIFT);
    }

    /// The data pointer read as SGL descriptor 1 (meaningful when
    /// [`Sqe::psdt`] is not [`Psdt::Prp`], and always over fabrics).
    pub fn sgl1(&self) -> SglDescriptor {
        zerocopy::transmute!(self.dptr)
    }

    pub fn set_sgl1(&mut self, sgl: SglDescriptor) {
        self.dptr = zerocopy::transmute!(sgl);
    }

    /// Command dwords 10..=15 in order, for handlers that index them.
    pub fn cdws(&self) -> [u32; 6] {
        [self.cdw10.get(), self.cdw11.get(), self.cdw12.get(), self.cdw13.get(), self.cdw14.get(), self.cdw15.get()]
    }

    /// The starting LBA of a read/write/write-zeroes/verify command
    /// (CDW11:CDW10).
    pub fn slba(&self) -> u64 {
        (u64::from(self.cdw11.get()) << 32) | u64::from(self.cdw10.get())
    }

    pub fn set_slba(&mut self, slba: u64) {
        self.cdw10 = U32::new(slba as u32);
        self.cdw11 = U32::new((slba >> 32) as u32);
    }

    /// Number of logical blocks of a read/write-style command: CDW12 bits
    /// 15:0 hold a 0's based count, so this is 1..=65536.
    pub fn nlb(&self) -> u32 {
        (self.cdw12.get() & 0xFFFF) + 1
    }

    /// Sets the block count; `nlb` is the real count (1..=65536), stored 0's based.
    pub fn set_nlb(&mut self, nlb: u32) {
        let zero_based = nlb.saturating_sub(1) & 0xFFFF;
        self.cdw12 = U32::new((self.cdw12.get() & !0xFFFF) | zero_based);
    }

    /// Force unit access (CDW12 bit 30) of a read/write command.
    pub fn fua(&self) -> bool {
        self.cdw12.get() & CDW12_FUA != 0
    }

    pub fn set_fua(&mut self, fua: bool) {
        self.set_cdw12_bit(CDW12_FUA, fua);
    }

    /// PRINFO (CDW12 bits 29:26) of a read/write command.
    pub fn prinfo(&self) -> u8 {
        ((self.cdw12.get() & CDW12_PRINFO) >> 26) as u8
    }

    fn set_cdw12_bit(&mut self, bit: u32, on: bool) {
        let v = self.cdw12.get();
        self.cdw12 = U32::new(if on { v | bit } else { v & !bit });
    }
}

/// Completion queue entry (16 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct Cqe {
    /// Command specific result (DW0).
    pub dw0: U32,
    /// Command specific result (DW1).
    pub dw1: U32,
    /// SQ head pointer at the time of completion.
    pub sqhd: U16,
    /// SQ the command was submitted on.
    pub sqid: U16,
    /// Command identifier of the completed command.
    pub cid: U16,
    /// Status field with the phase tag in bit 0; see [`Status`].
    pub status: U16,
}

const _: () = assert!(size_of::<Cqe>() == 16);

impl Cqe {
    /// A completion for `cid` carrying `status`, phase bit clear. Fabrics
    /// transports do not use the phase bit; a PCIe controller model sets it
    /// with [`Cqe::set_phase`].
    pub fn new(cid: u16, status: Status) -> Self {
        Self { cid: U16::new(cid), status: U16::new(status.to_cqe_status(false)), ..Self::default() }
    }

    /// The phase tag (P, bit 0 of the status field).
    pub fn phase(&self) -> bool {
        self.status.get() & 1 != 0
    }

    pub fn set_phase(&mut self, phase: bool) {
        self.status = U16::new((self.status.get() & !1) | u16::from(phase));
    }

    /// The status without the phase tag.
    pub fn status(&self) -> Status {
        Status::from_cqe_status(self.status.get())
    }

    /// Replaces the status, keeping the phase tag as it is.
    pub fn set_status(&mut self, status: Status) {
        self.status = U16::new(status.to_cqe_status(self.phase()));
    }
}

/// SGL descriptor type (byte 15 bits 7:4).
pub mod sgl_type {
    pub const DATA_BLOCK: u8 = 0x0;
    pub const BIT_BUCKET: u8 = 0x1;
    pub const SEGMENT: u8 = 0x2;
    pub const LAST_SEGMENT: u8 = 0x3;
    pub const KEYED_DATA_BLOCK: u8 = 0x4;
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5;
}

/// SGL descriptor subtype (byte 15 bits 3:0).
pub mod sgl_subtype {
    /// The address field is a memory address.
    pub const ADDRESS: u8 = 0x0;
    /// The address field is an offset; over fabrics, into the in-capsule data.
    pub const OFFSET: u8 = 0x1;
    /// Transport specific; NVMe/TCP uses it with the transport data block
    /// type to say "the data moves in H2CData/C2HData PDUs".
    pub const TRANSPORT_SPECIFIC: u8 = 0xA;
    /// RDMA: invalidate the remote key after the transfer.
    pub const INVALIDATE_KEY: u8 = 0xF;
}

/// SGL descriptor (16 bytes). The generic shape is address, length and an
/// identifier byte; the keyed form (RDMA) reuses bytes 8..15 as a 24-bit
/// length and a 32-bit key, read with [`SglDescriptor::kind`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct SglDescriptor {
    pub address: U64,
    pub length: U32,
    pub reserved: [u8; 3],
    /// SGL identifier: type in bits 7:4, subtype in bits 3:0.
    pub id: u8,
}

const _: () = assert!(size_of::<SglDescriptor>() == 16);

/// A decoded SGL descriptor, in the forms this project acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SglKind {
    /// Data block addressed by memory address (PCIe SGLs).
    DataBlockAddress { address: u64, length: u32 },
    /// Data block at `offset` in the capsule's in-capsule data (fabrics).
    InCapsule { offset: u64, length: u32 },
    /// Data moves by the transport's own data PDUs (NVMe/TCP: H2CData
    /// after R2T, or C2HData); the address field is reserved.
    TransportDataBlock { length: u32 },
    /// Keyed data block (RDMA): 24-bit length and a remote key.
    KeyedDataBlock { address: u64, length: u32, key: u32, subtype: u8 },
    /// Segment, last segment, bit bucket or anything reserved: left to the
    /// caller, which usually answers "SGL descriptor type invalid".
    Other { sgl_type: u8, subtype: u8 },
}

impl SglDescriptor {
    pub fn sgl_type(&self) -> u8 {
        self.id >> 4
    }

    pub fn subtype(&self) -> u8 {
        self.id & 0x0F
    }

    const fn make_id(sgl_type: u8, subtype: u8) -> u8 {
        (sgl_type << 4) | (subtype & 0x0F)
    }

    /// Transport SGL data block (type 5, subtype 0xA): how an NVMe/TCP host
    /// describes data not carried in the capsule.
    pub fn transport_data_block(length: u32) -> Self {
        Self {
            address: U64::ZERO,
            length: U32::new(length),
            reserved: [0; 3],
            id: Self::make_id(sgl_type::TRANSPORT_DATA_BLOCK, sgl_subtype::TRANSPORT_SPECIFIC),
        }
    }

    /// Data block with the offset subtype (type 0, subtype 1): data carried
    /// in the capsule, `offset` bytes into the in-capsule data.
    pub fn in_capsule(offset: u64, length: u32) -> Self {
        Self {
            address: U64::new(offset),
            length: U32::new(length),
            reserved: [0; 3],
            id: Self::make_id(sgl_type::DATA_BLOCK, sgl_subtype::OFFSET),
        }
    }

    /// Data block with a memory address (type 0, subtype 0).
    pub fn data_block(address: u64, length: u32) -> Self {
        Self {
            address: U64::new(address),
            length: U32::new(length),
            reserved: [0; 3],
            id: Self::make_id(sgl_type::DATA_BLOCK, sgl_subtype::ADDRESS),
        }
    }

    /// Keyed data block (type 4). Only the low 24 bits of `length` fit.
    pub fn keyed_data_block(address: u64, length: u32, key: u32, subtype: u8) -> Self {
        let mut sgl = Self { address: U64::new(address), ..Self::default() };
        let bytes = sgl.as_mut_bytes();
        bytes[8..11].copy_from_slice(&length.to_le_bytes()[..3]);
        bytes[11..15].copy_from_slice(&key.to_le_bytes());
        bytes[15] = Self::make_id(sgl_type::KEYED_DATA_BLOCK, subtype);
        sgl
    }

    pub fn kind(&self) -> SglKind {
        let (sgl_type, subtype) = (self.sgl_type(), self.subtype());
        match (sgl_type, subtype) {
            (sgl_type::DATA_BLOCK, sgl_subtype::ADDRESS) => {
                SglKind::DataBlockAddress { address: self.address.get(), length: self.length.get() }
            }
            (sgl_type::DATA_BLOCK, sgl_subtype::OFFSET) => {
                SglKind::InCapsule { offset: self.address.get(), length: self.length.get() }
            }
            (sgl_type::TRANSPORT_DATA_BLOCK, sgl_subtype::TRANSPORT_SPECIFIC) => {
                SglKind::TransportDataBlock { length: self.length.get() }
            }
            (sgl_type::KEYED_DATA_BLOCK, _) => {
                let b = self.as_bytes();
                SglKind::KeyedDataBlock {
                    address: self.address.get(),
                    length: u32::from_le_bytes([b[8], b[9], b[10], 0]),
                    key: u32::from_le_bytes([b[11], b[12], b[13], b[14]]),
                    subtype,
                }
            }
            _ => SglKind::Other { sgl_type, subtype },
        }
    }
}

impl From<SglKind> for SglDescriptor {
    fn from(kind: SglKind) -> Self {
        match kind {
            SglKind::DataBlockAddress { address, length } => Self::data_block(address, length),
            SglKind::InCapsule { offset, length } => Self::in_capsule(offset, length),
            SglKind::TransportDataBlock { length } => Self::transport_data_block(length),
            SglKind::KeyedDataBlock { address, length, key, subtype } => {
                Self::keyed_data_block(address, length, key, subtype)
            }
            SglKind::Other { sgl_type, subtype } => Self { id: Self::make_id(sgl_type, subtype), ..Self::default() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;
    use proptest::prelude::*;

    #[test]
    fn sqe_field_offsets_match_the_spec() {
        assert_eq!(offset_of!(Sqe, opcode), 0);
        assert_eq!(offset_of!(Sqe, flags), 1);
        assert_eq!(offset_of!(Sqe, cid), 2);
        assert_eq!(offset_of!(Sqe, nsid), 4);
        assert_eq!(offset_of!(Sqe, cdw2), 8);
        assert_eq!(offset_of!(Sqe, mptr), 16);
        assert_eq!(offset_of!(Sqe, dptr), 24);
        assert_eq!(offset_of!(Sqe, cdw10), 40);
        assert_eq!(offset_of!(Sqe, cdw15), 60);
    }

    #[test]
    fn cqe_field_offsets_match_the_spec() {
        assert_eq!(offset_of!(Cqe, dw0), 0);
        assert_eq!(offset_of!(Cqe, dw1), 4);
        assert_eq!(offset_of!(Cqe, sqhd), 8);
        assert_eq!(offset_of!(Cqe, sqid), 10);
        assert_eq!(offset_of!(Cqe, cid), 12);
        assert_eq!(offset_of!(Cqe, status), 14);
    }

    #[test]
    fn sqe_bytes_are_little_endian() {
        let mut sqe = Sqe::new(0x02, 0x1234);
        sqe.nsid = U32::new(1);
        sqe.set_slba(0x0102_0304_0506_0708);
        sqe.set_nlb(8);
        let b = sqe.as_bytes();
        assert_eq!(&b[0..4], &[0x02, 0x00, 0x34, 0x12]);
        assert_eq!(&b[4..8], &[1, 0, 0, 0]);
        assert_eq!(&b[40..48], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[48..50], &[7, 0]);
        assert_eq!(sqe.nlb(), 8);
        assert_eq!(sqe.slba(), 0x0102_0304_0506_0708);
    }

    #[test]
    fn fuse_and_psdt_share_byte_one() {
        let mut sqe = Sqe::default();
        sqe.set_psdt(Psdt::SglMetadataBuffer);
        sqe.set_fuse(Fuse::Second);
        assert_eq!(sqe.flags, 0x42);
        assert_eq!(sqe.psdt(), Psdt::SglMetadataBuffer);
        assert_eq!(sqe.fuse(), Fuse::Second);
        sqe.set_fuse(Fuse::Normal);
        assert_eq!(sqe.psdt(), Psdt::SglMetadataBuffer);
    }

    #[test]
    fn tcp_sgl_descriptors_encode_as_the_transport_expects() {
        let t = SglDescriptor::transport_data_block(4096);
        assert_eq!(t.as_bytes()[15], 0x5A);
        assert_eq!(&t.as_bytes()[8..12], &4096u32.to_le_bytes());
        assert_eq!(t.kind(), SglKind::TransportDataBlock { length: 4096 });

        let icd = SglDescriptor::in_capsule(0, 1024);
        assert_eq!(icd.as_bytes()[15], 0x01);
        assert_eq!(icd.kind(), SglKind::InCapsule { offset: 0, length: 1024 });

        let mut sqe = Sqe::default();
        sqe.set_sgl1(icd);
        assert_eq!(sqe.sgl1(), icd);
        assert_eq!(sqe.as_bytes()[39], 0x01);
    }

    proptest! {
        #[test]
        fn sgl_kind_round_trips(address: u64, length: u32, key: u32, subtype in 0u8..16) {
            let kinds = [
                SglKind::DataBlockAddress { address, length },
                SglKind::InCapsule { offset: address, length },
                SglKind::TransportDataBlock { length },
                SglKind::KeyedDataBlock { address, length: length & 0xFF_FFFF, key, subtype },
            ];
            for kind in kinds {
                prop_assert_eq!(SglDescriptor::from(kind).kind(), kind);
            }
        }

        #[test]
        fn cqe_status_keeps_phase(sct in 0u8..8, sc: u8, dnr: bool, more: bool, phase: bool) {
            let status = Status { sct, sc, dnr, more };
            let mut cqe = Cqe::new(7, Status::SUCCESS);
            cqe.set_phase(phase);
            cqe.set_status(status);
            prop_assert_eq!(cqe.phase(), phase);
            prop_assert_eq!(cqe.status(), status);
        }
    }
}
