//! Sense data (SPC-5 4.4): the conditions the device server reports, and
//! their encoding in fixed (70h) or descriptor (72h) format.

use super::Sense;

/// Sense keys (SPC-5 table 48).
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const ABORTED_COMMAND: u8 = 0xB;
    pub const MISCOMPARE: u8 = 0xE;
}

/// Where a sense-key-specific field pointer points (SPC-5 4.4.2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldIn {
    Cdb,
    ParameterList,
}

/// One CHECK CONDITION's content, before encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Check {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field (an LBA, a miscompare offset), if valid.
    pub info: Option<u64>,
    /// Field pointer: (where, byte, bit) — bit `None` when the whole byte.
    pub field: Option<(FieldIn, u16, Option<u8>)>,
}

impl Check {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Check {
        Check { key, asc, ascq, info: None, field: None }
    }

    pub const INVALID_OPCODE: Check = Check::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Check = Check::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    pub const LUN_NOT_SUPPORTED: Check = Check::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    pub const PARAM_LIST_LENGTH_ERROR: Check = Check::new(key::ILLEGAL_REQUEST, 0x1A, 0x00);
    pub const SAVING_NOT_SUPPORTED: Check = Check::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    pub const INVALID_RELEASE_OF_PR: Check = Check::new(key::ILLEGAL_REQUEST, 0x26, 0x04);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Check = Check::new(key::ILLEGAL_REQUEST, 0x55, 0x04);
    pub const POWER_ON_RESET: Check = Check::new(key::UNIT_ATTENTION, 0x29, 0x00);
    pub const BUS_DEVICE_RESET: Check = Check::new(key::UNIT_ATTENTION, 0x29, 0x03);
    pub const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: Check = Check::new(key::UNIT_ATTENTION, 0x2F, 0x00);
    pub const MODE_PARAMETERS_CHANGED: Check = Check::new(key::UNIT_ATTENTION, 0x2A, 0x01);
    pub const CAPACITY_DATA_HAS_CHANGED: Check = Check::new(key::UNIT_ATTENTION, 0x2A, 0x09);
    pub const RESERVATIONS_PREEMPTED: Check = Check::new(key::UNIT_ATTENTION, 0x2A, 0x03);
    pub const RESERVATIONS_RELEASED: Check = Check::new(key::UNIT_ATTENTION, 0x2A, 0x04);
    pub const REGISTRATIONS_PREEMPTED: Check = Check::new(key::UNIT_ATTENTION, 0x2A, 0x05);
    pub const UNRECOVERED_READ_ERROR: Check = Check::new(key::MEDIUM_ERROR, 0x11, 0x00);
    pub const WRITE_ERROR: Check = Check::new(key::MEDIUM_ERROR, 0x0C, 0x00);
    /// A NOT READY unit: cause not reportable (the bdev is gone) and
    /// initializing command required (stopped by START STOP UNIT).
    pub const NOT_READY: Check = Check::new(key::NOT_READY, 0x04, 0x00);
    pub const NOT_READY_STOPPED: Check = Check::new(key::NOT_READY, 0x04, 0x02);
    /// INVALID FIELD IN COMMAND INFORMATION UNIT: Data-Out that does not fit the CDB.
    pub const INVALID_FIELD_IN_IU: Check = Check::new(key::ILLEGAL_REQUEST, 0x0E, 0x03);
    pub const INVALID_MESSAGE: Check = Check::new(key::ILLEGAL_REQUEST, 0x49, 0x00);
    pub const INTERNAL_TARGET_FAILURE: Check = Check::new(key::HARDWARE_ERROR, 0x44, 0x00);
    pub const MISCOMPARE_DURING_VERIFY: Check = Check::new(key::MISCOMPARE, 0x1D, 0x00);
    pub const NO_ADDITIONAL_SENSE: Check = Check::new(key::NO_SENSE, 0x00, 0x00);
    pub const COMMAND_ABORTED: Check = Check::new(key::ABORTED_COMMAND, 0x00, 0x00);

    /// INVALID FIELD IN CDB pointing at `byte` (and `bit`, if one).
    pub const fn invalid_cdb(byte: u16, bit: Option<u8>) -> Check {
        Check { field: Some((FieldIn::Cdb, byte, bit)), ..Check::new(key::ILLEGAL_REQUEST, 0x24, 0x00) }
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at `byte` (and `bit`).
    pub const fn invalid_param(byte: u16, bit: Option<u8>) -> Check {
        Check { field: Some((FieldIn::ParameterList, byte, bit)), ..Check::new(key::ILLEGAL_REQUEST, 0x26, 0x00) }
    }

    pub const fn with_info(mut self, info: u64) -> Check {
        self.info = Some(info);
        self
    }

    /// The three sense-key-specific bytes (SKSV set), if there are any.
    fn key_specific(&self) -> Option<[u8; 3]> {
        let (place, byte, bit) = self.field?;
        let mut b0 = 0x80;
        if place == FieldIn::Cdb {
            b0 |= 0x40;
        }
        if let Some(bit) = bit {
            b0 |= 0x08 | (bit & 0x7);
        }
        let [hi, lo] = byte.to_be_bytes();
        Some([b0, hi, lo])
    }

    /// Encodes in fixed format (18 bytes) or descriptor format.
    pub fn encode(&self, descriptor: bool) -> Sense {
        let mut s = Sense::EMPTY;
        let b = &mut s.bytes;
        if descriptor {
            b[0] = 0x72;
            b[1] = self.key & 0xF;
            b[2] = self.asc;
            b[3] = self.ascq;
            let mut len = 8usize;
            if let Some(info) = self.info {
                // Information descriptor (00h): VALID set, 8-byte field.
                b[len] = 0x00;
                b[len + 1] = 0x0A;
                b[len + 2] = 0x80;
                b[len + 4..len + 12].copy_from_slice(&info.to_be_bytes());
                len += 12;
            }
            if let Some(sks) = self.key_specific() {
                // Sense key specific descriptor (02h).
                b[len] = 0x02;
                b[len + 1] = 0x06;
                b[len + 4..len + 7].copy_from_slice(&sks);
                len += 8;
            }
            b[7] = (len - 8) as u8;
            s.len = len as u8;
        } else {
            b[0] = 0x70;
            b[2] = self.key & 0xF;
            if let Some(info) = self.info {
                // The fixed format holds 32 bits; a larger value leaves VALID clear.
                if let Ok(v) = u32::try_from(info) {
                    b[0] |= 0x80;
                    b[3..7].copy_from_slice(&v.to_be_bytes());
                }
            }
            b[7] = 10;
            b[12] = self.asc;
            b[13] = self.ascq;
            if let Some(sks) = self.key_specific() {
                b[15..18].copy_from_slice(&sks);
            }
            s.len = 18;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_invalid_field_points_at_the_byte() {
        let s = Check::invalid_cdb(2, Some(4)).encode(false);
        assert_eq!(s.as_slice().len(), 18);
        assert_eq!(s.bytes[0], 0x70);
        assert_eq!(s.bytes[2], key::ILLEGAL_REQUEST);
        assert_eq!((s.bytes[12], s.bytes[13]), (0x24, 0));
        assert_eq!(&s.bytes[15..18], &[0x80 | 0x40 | 0x08 | 4, 0, 2]);
    }

    #[test]
    fn descriptor_miscompare_carries_the_offset() {
        let s = Check::MISCOMPARE_DURING_VERIFY.with_info(777).encode(true);
        assert_eq!(s.bytes[0], 0x72);
        assert_eq!((s.bytes[1], s.bytes[2], s.bytes[3]), (key::MISCOMPARE, 0x1D, 0));
        assert_eq!(s.bytes[7], 12);
        assert_eq!(&s.bytes[8..12], &[0, 0x0A, 0x80, 0]);
        assert_eq!(u64::from_be_bytes(s.bytes[12..20].try_into().unwrap()), 777);
        assert_eq!(s.len, 20);
    }
}
