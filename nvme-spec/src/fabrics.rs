//! NVMe over Fabrics commands: the common fabrics command header, Connect
//! (command, 1024-byte data and response), Property Get/Set and Disconnect.
//!
//! Each command is a 64-byte view of an [`Sqe`]; use [`FabricsCommand::view`]
//! style accessors (zero-copy reinterpretation) to read one.

use core::mem::size_of;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::cmd::{Psdt, SglDescriptor, Sqe};
use crate::opcode::{AdminOpcode, FabricsCommandType};

/// Common layout of every fabrics command (opcode 7Fh).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct FabricsCommand {
    pub opcode: u8,
    pub flags: u8,
    pub cid: U16,
    /// Fabrics command type; see [`FabricsCommandType`].
    pub fctype: u8,
    pub rsvd5: [u8; 35],
    /// Fabrics command type specific bytes 40..64.
    pub specific: [u8; 24],
}

/// Connect command (FCTYPE 01h).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct ConnectCommand {
    pub opcode: u8,
    pub flags: u8,
    pub cid: U16,
    pub fctype: u8,
    pub rsvd5: [u8; 19],
    /// Describes the 1024-byte [`ConnectData`].
    pub sgl1: SglDescriptor,
    /// Record format, 0.
    pub recfmt: U16,
    /// Queue to create: 0 for the admin queue.
    pub qid: U16,
    /// SQ size, 0's based.
    pub sqsize: U16,
    /// Connect attributes; see [`cattr`].
    pub cattr: u8,
    pub rsvd47: u8,
    /// Keep alive timeout in ms (admin queue only; 0 disables).
    pub kato: U32,
    pub rsvd52: [u8; 12],
}

/// Connect attributes (CATTR).
pub mod cattr {
    /// Priority class, bits 1:0.
    pub const PRIORITY_MASK: u8 = 0b11;
    /// Disable SQ flow control: the host does not need SQHD updates.
    pub const DISABLE_SQ_FLOW_CONTROL: u8 = 1 << 2;
    /// IO queue deletion request (NVMe 2.0, IO queues only).
    pub const IO_QUEUE_DELETION: u8 = 1 << 3;
}

/// Data of a Connect command (1024 bytes), carried in-capsule over TCP.
#[repr(C)]
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct ConnectData {
    /// 128-bit host identifier, the same on every connection of one host.
    pub hostid: [u8; 16],
    /// Controller to attach to: FFFFh asks for any (dynamic model).
    pub cntlid: U16,
    pub rsvd18: [u8; 238],
    pub subnqn: [u8; 256],
    pub hostnqn: [u8; 256],
    pub rsvd768: [u8; 256],
}

/// Property Set command (FCTYPE 00h).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct PropertySetCommand {
    pub opcode: u8,
    pub flags: u8,
    pub cid: U16,
    pub fctype: u8,
    pub rsvd5: [u8; 35],
    /// Size of the property, bits 2:0; see [`PropertySize`].
    pub attrib: u8,
    pub rsvd41: [u8; 3],
    /// Property offset (register offset, see [`crate::regs::offset`]).
    pub offset: U32,
    pub value: U64,
    pub rsvd56: [u8; 8],
}

/// Property Get command (FCTYPE 04h). The value returns in completion
/// DW0 (4-byte property) or DW1:DW0 (8-byte property).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct PropertyGetCommand {
    pub opcode: u8,
    pub flags: u8,
    pub cid: U16,
    pub fctype: u8,
    pub rsvd5: [u8; 35],
    pub attrib: u8,
    pub rsvd41: [u8; 3],
    pub offset: U32,
    pub rsvd48: [u8; 16],
}

/// Disconnect command (FCTYPE 08h): deletes the IO queue it arrives on.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct DisconnectCommand {
    pub opcode: u8,
    pub flags: u8,
    pub cid: U16,
    pub fctype: u8,
    pub rsvd5: [u8; 35],
    pub recfmt: U16,
    pub rsvd42: [u8; 22],
}

const _: () = assert!(size_of::<FabricsCommand>() == 64);
const _: () = assert!(size_of::<ConnectCommand>() == 64);
const _: () = assert!(size_of::<ConnectData>() == 1024);
const _: () = assert!(size_of::<PropertySetCommand>() == 64);
const _: () = assert!(size_of::<PropertyGetCommand>() == 64);
const _: () = assert!(size_of::<DisconnectCommand>() == 64);

/// Property size (ATTRIB bits 2:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertySize {
    FourBytes,
    EightBytes,
}

impl PropertySize {
    /// `None` for a reserved encoding.
    pub fn from_attrib(attrib: u8) -> Option<Self> {
        match attrib & 0x7 {
            0 => Some(Self::FourBytes),
            1 => Some(Self::EightBytes),
            _ => None,
        }
    }

    pub fn attrib(self) -> u8 {
        match self {
            Self::FourBytes => 0,
            Self::EightBytes => 1,
        }
    }

    pub fn len_bytes(self) -> usize {
        match self {
            Self::FourBytes => 4,
            Self::EightBytes => 8,
        }
    }
}

macro_rules! sqe_views {
    ($($ty:ident),*) => {$(
        impl $ty {
            /// Reinterprets a submission queue entry as this command.
            pub fn view(sqe: &Sqe) -> &Self {
                zerocopy::transmute_ref!(sqe)
            }

            /// This command as a submission queue entry.
            pub fn to_sqe(&self) -> Sqe {
                zerocopy::transmute!(*self)
            }
        }
    )*};
}

sqe_views!(FabricsCommand, ConnectCommand, PropertySetCommand, PropertyGetCommand, DisconnectCommand);

impl FabricsCommand {
    pub fn fctype(&self) -> FabricsCommandType {
        FabricsCommandType(self.fctype)
    }
}

fn fabrics_header(cid: u16, fctype: FabricsCommandType) -> FabricsCommand {
    let mut cmd = FabricsCommand::new_zeroed();
    let mut sqe = Sqe::new(AdminOpcode::FABRICS.0, cid);
    // Fabrics commands always use SGLs.
    sqe.set_psdt(Psdt::SglMetadataBuffer);
    cmd.opcode = sqe.opcode;
    cmd.flags = sqe.flags;
    cmd.cid = sqe.cid;
    cmd.fctype = fctype.0;
    cmd
}

impl ConnectCommand {
    /// A Connect for queue `qid` with `sq_entries` entries (real count),
    /// data described as in-capsule at offset 0 (how NVMe/TCP sends it).
    pub fn new(cid: u16, qid: u16, sq_entries: u16, kato_ms: u32) -> Self {
        let header = fabrics_header(cid, FabricsCommandType::CONNECT);
        let mut cmd: Self = zerocopy::transmute!(header);
        cmd.sgl1 = SglDescriptor::in_capsule(0, size_of::<ConnectData>() as u32);
        cmd.qid = U16::new(qid);
        cmd.sqsize = U16::new(sq_entries.saturating_sub(1));
        cmd.kato = U32::new(kato_ms);
        cmd
    }

    /// SQ entries requested (SQSIZE is 0's based).
    pub fn sq_entries(&self) -> u32 {
        u32::from(self.sqsize.get()) + 1
    }
}

impl ConnectData {
    pub fn zeroed() -> Self {
        Self::new_zeroed()
    }
}

impl PropertySetCommand {
    pub fn new(cid: u16, offset: u32, size: PropertySize, value: u64) -> Self {
        let header = fabrics_header(cid, FabricsCommandType::PROPERTY_SET);
        let mut cmd: Self = zerocopy::transmute!(header);
        cmd.attrib = size.attrib();
        cmd.offset = U32::new(offset);
        cmd.value = U64::new(value);
        cmd
    }

    pub fn size(&self) -> Option<PropertySize> {
        PropertySize::from_attrib(self.attrib)
    }
}

impl PropertyGetCommand {
    pub fn new(cid: u16, offset: u32, size: PropertySize) -> Self {
        let header = fabrics_header(cid, FabricsCommandType::PROPERTY_GET);
        let mut cmd: Self = zerocopy::transmute!(header);
        cmd.attrib = size.attrib();
        cmd.offset = U32::new(offset);
        cmd
    }

    pub fn size(&self) -> Option<PropertySize> {
        PropertySize::from_attrib(self.attrib)
    }
}

impl DisconnectCommand {
    pub fn new(cid: u16) -> Self {
        zerocopy::transmute!(fabrics_header(cid, FabricsCommandType::DISCONNECT))
    }
}

/// Completion DW0 of a successful Connect: controller id (bits 15:0) and
/// authentication requirements (bits 31:16; 0 = none).
pub fn connect_success_dw0(cntlid: u16, authreq: u16) -> u32 {
    u32::from(cntlid) | (u32::from(authreq) << 16)
}

/// The controller id from a successful Connect's DW0.
pub fn connect_cntlid(dw0: u32) -> u16 {
    dw0 as u16
}

/// Where an invalid Connect parameter was found (IATTR bit 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidParameterIn {
    /// In the 64-byte command.
    Command,
    /// In the 1024-byte Connect data.
    Data,
}

/// Completion DW0 for "Connect Invalid Parameters": IPO (byte offset of the
/// bad field, bits 15:0) and IATTR (bits 23:16).
pub fn connect_invalid_parameter_dw0(offset: u16, within: InvalidParameterIn) -> u32 {
    let iattr = match within {
        InvalidParameterIn::Command => 0u32,
        InvalidParameterIn::Data => 1u32,
    };
    u32::from(offset) | (iattr << 16)
}

/// Byte offsets of the Connect data fields, for [`connect_invalid_parameter_dw0`].
pub mod connect_data_offset {
    pub const HOSTID: u16 = 0;
    pub const CNTLID: u16 = 16;
    pub const SUBNQN: u16 = 256;
    pub const HOSTNQN: u16 = 512;
}

/// Byte offsets of the Connect command fields, for [`connect_invalid_parameter_dw0`].
pub mod connect_command_offset {
    pub const RECFMT: u16 = 40;
    pub const QID: u16 = 42;
    pub const SQSIZE: u16 = 44;
    pub const CATTR: u16 = 46;
    pub const KATO: u16 = 48;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regs::offset;
    use crate::text::{read_nqn, write_nqn};
    use core::mem::offset_of;

    #[test]
    fn connect_layout() {
        assert_eq!(offset_of!(ConnectCommand, fctype), 4);
        assert_eq!(offset_of!(ConnectCommand, sgl1), 24);
        assert_eq!(offset_of!(ConnectCommand, recfmt), connect_command_offset::RECFMT.into());
        assert_eq!(offset_of!(ConnectCommand, qid), connect_command_offset::QID.into());
        assert_eq!(offset_of!(ConnectCommand, sqsize), connect_command_offset::SQSIZE.into());
        assert_eq!(offset_of!(ConnectCommand, cattr), connect_command_offset::CATTR.into());
        assert_eq!(offset_of!(ConnectCommand, kato), connect_command_offset::KATO.into());
        assert_eq!(offset_of!(ConnectData, cntlid), connect_data_offset::CNTLID.into());
        assert_eq!(offset_of!(ConnectData, subnqn), connect_data_offset::SUBNQN.into());
        assert_eq!(offset_of!(ConnectData, hostnqn), connect_data_offset::HOSTNQN.into());
    }

    #[test]
    fn property_layout() {
        assert_eq!(offset_of!(PropertySetCommand, attrib), 40);
        assert_eq!(offset_of!(PropertySetCommand, offset), 44);
        assert_eq!(offset_of!(PropertySetCommand, value), 48);
        assert_eq!(offset_of!(PropertyGetCommand, offset), 44);
        assert_eq!(offset_of!(DisconnectCommand, recfmt), 40);
    }

    #[test]
    fn connect_builds_and_views_through_an_sqe() {
        let cmd = ConnectCommand::new(9, 0, 32, 15_000);
        let sqe = cmd.to_sqe();
        assert_eq!(sqe.opcode, 0x7F);
        assert_eq!(sqe.psdt(), Psdt::SglMetadataBuffer);
        assert_eq!(sqe.cid.get(), 9);
        assert_eq!(sqe.as_bytes()[4], FabricsCommandType::CONNECT.0);
        assert_eq!(FabricsCommand::view(&sqe).fctype(), FabricsCommandType::CONNECT);
        let back = ConnectCommand::view(&sqe);
        assert_eq!(back.sq_entries(), 32);
        assert_eq!(back.kato.get(), 15_000);
        assert_eq!(sqe.sgl1().kind(), crate::cmd::SglKind::InCapsule { offset: 0, length: 1024 });

        let mut data = ConnectData::zeroed();
        write_nqn(&mut data.hostnqn, "nqn.2014-08.org.nvmexpress:uuid:1").unwrap();
        data.cntlid = U16::new(0xFFFF);
        let bytes = data.as_bytes();
        assert_eq!(&bytes[16..18], &[0xFF, 0xFF]);
        let parsed = ConnectData::read_from_bytes(bytes).unwrap();
        assert_eq!(read_nqn(&parsed.hostnqn).unwrap(), "nqn.2014-08.org.nvmexpress:uuid:1");
    }

    #[test]
    fn property_commands() {
        let set = PropertySetCommand::new(1, offset::CC, PropertySize::FourBytes, 0x0046_0001);
        let sqe = set.to_sqe();
        assert_eq!(&sqe.as_bytes()[44..48], &0x14u32.to_le_bytes());
        assert_eq!(PropertySetCommand::view(&sqe).size(), Some(PropertySize::FourBytes));
        let get = PropertyGetCommand::new(2, offset::CAP, PropertySize::EightBytes);
        assert_eq!(get.to_sqe().as_bytes()[40], 1);
        assert_eq!(PropertySize::from_attrib(3), None);
    }

    #[test]
    fn connect_response_dwords() {
        assert_eq!(connect_success_dw0(5, 0), 5);
        assert_eq!(connect_cntlid(connect_success_dw0(0x1234, 1)), 0x1234);
        assert_eq!(connect_invalid_parameter_dw0(connect_data_offset::SUBNQN, InvalidParameterIn::Data), 0x0001_0100);
    }
}
