//! Command opcodes: admin, NVM IO and fabrics command types.
//!
//! Opcodes are newtypes over the raw byte rather than closed enums: a command
//! arrives from an untrusted host with any byte in it, and an unknown opcode
//! must flow through to an "invalid opcode" completion, not fail a conversion.
//! The associated constants are usable as `match` patterns.

/// Admin command set opcode (NVMe base 2.0, figure "Opcodes for Admin Commands").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdminOpcode(pub u8);

impl AdminOpcode {
    pub const DELETE_IO_SQ: Self = Self(0x00);
    pub const CREATE_IO_SQ: Self = Self(0x01);
    pub const GET_LOG_PAGE: Self = Self(0x02);
    pub const DELETE_IO_CQ: Self = Self(0x04);
    pub const CREATE_IO_CQ: Self = Self(0x05);
    pub const IDENTIFY: Self = Self(0x06);
    pub const ABORT: Self = Self(0x08);
    pub const SET_FEATURES: Self = Self(0x09);
    pub const GET_FEATURES: Self = Self(0x0A);
    pub const ASYNC_EVENT_REQUEST: Self = Self(0x0C);
    pub const NAMESPACE_MANAGEMENT: Self = Self(0x0D);
    pub const FIRMWARE_COMMIT: Self = Self(0x10);
    pub const FIRMWARE_IMAGE_DOWNLOAD: Self = Self(0x11);
    pub const DEVICE_SELF_TEST: Self = Self(0x14);
    pub const NAMESPACE_ATTACHMENT: Self = Self(0x15);
    pub const KEEP_ALIVE: Self = Self(0x18);
    pub const DIRECTIVE_SEND: Self = Self(0x19);
    pub const DIRECTIVE_RECEIVE: Self = Self(0x1A);
    pub const VIRTUALIZATION_MANAGEMENT: Self = Self(0x1C);
    pub const DOORBELL_BUFFER_CONFIG: Self = Self(0x7C);
    /// All fabrics commands share this opcode; the command type is in byte 4
    /// (see [`FabricsCommandType`]).
    pub const FABRICS: Self = Self(0x7F);
    pub const FORMAT_NVM: Self = Self(0x80);
    pub const SECURITY_SEND: Self = Self(0x81);
    pub const SECURITY_RECEIVE: Self = Self(0x82);
    pub const SANITIZE: Self = Self(0x84);
    pub const GET_LBA_STATUS: Self = Self(0x86);
}

/// NVM command set IO opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IoOpcode(pub u8);

impl IoOpcode {
    pub const FLUSH: Self = Self(0x00);
    pub const WRITE: Self = Self(0x01);
    pub const READ: Self = Self(0x02);
    pub const WRITE_UNCORRECTABLE: Self = Self(0x04);
    pub const COMPARE: Self = Self(0x05);
    pub const WRITE_ZEROES: Self = Self(0x08);
    pub const DATASET_MANAGEMENT: Self = Self(0x09);
    pub const VERIFY: Self = Self(0x0C);
    pub const RESERVATION_REGISTER: Self = Self(0x0D);
    pub const RESERVATION_REPORT: Self = Self(0x0E);
    pub const RESERVATION_ACQUIRE: Self = Self(0x11);
    pub const RESERVATION_RELEASE: Self = Self(0x15);
    pub const COPY: Self = Self(0x19);
    /// Fabrics commands may also arrive on IO queues (Disconnect, and
    /// Connect on a new IO queue's first capsule).
    pub const FABRICS: Self = Self(0x7F);

    /// Bits 1:0 of every opcode give its data transfer direction
    /// (00 none, 01 host to controller, 10 controller to host, 11 both).
    pub const fn data_direction(self) -> DataDirection {
        DataDirection::from_opcode(self.0)
    }
}

/// Data transfer direction encoded in bits 1:0 of an opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDirection {
    None,
    HostToController,
    ControllerToHost,
    Bidirectional,
}

impl DataDirection {
    /// Direction of any opcode (admin, IO or fabrics command type).
    pub const fn from_opcode(opcode: u8) -> Self {
        match opcode & 0b11 {
            0b00 => Self::None,
            0b01 => Self::HostToController,
            0b10 => Self::ControllerToHost,
            _ => Self::Bidirectional,
        }
    }
}

/// Fabrics command type (FCTYPE, byte 4 of a fabrics command).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FabricsCommandType(pub u8);

impl FabricsCommandType {
    pub const PROPERTY_SET: Self = Self(0x00);
    pub const CONNECT: Self = Self(0x01);
    pub const PROPERTY_GET: Self = Self(0x04);
    pub const AUTHENTICATION_SEND: Self = Self(0x05);
    pub const AUTHENTICATION_RECEIVE: Self = Self(0x06);
    pub const DISCONNECT: Self = Self(0x08);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_bits_follow_the_opcode() {
        assert_eq!(IoOpcode::WRITE.data_direction(), DataDirection::HostToController);
        assert_eq!(IoOpcode::READ.data_direction(), DataDirection::ControllerToHost);
        assert_eq!(IoOpcode::FLUSH.data_direction(), DataDirection::None);
        assert_eq!(DataDirection::from_opcode(AdminOpcode::IDENTIFY.0), DataDirection::ControllerToHost);
        assert_eq!(DataDirection::from_opcode(FabricsCommandType::CONNECT.0), DataDirection::HostToController);
    }
}
