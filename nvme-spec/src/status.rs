//! Completion status: status code type and code, the More and Do Not Retry
//! bits, and their packing into the CQE status field.
//!
//! CQE status field (bits of the 16-bit word at CQE byte 14):
//! P bit 0, SC bits 8:1, SCT bits 11:9, CRD bits 13:12, M bit 14, DNR bit 15.

/// Status code types (SCT).
pub mod sct {
    pub const GENERIC: u8 = 0x0;
    pub const COMMAND_SPECIFIC: u8 = 0x1;
    pub const MEDIA_AND_DATA_INTEGRITY: u8 = 0x2;
    pub const PATH_RELATED: u8 = 0x3;
    pub const VENDOR_SPECIFIC: u8 = 0x7;
}

const P_BIT: u16 = 1 << 0;
const SC_SHIFT: u32 = 1;
const SCT_SHIFT: u32 = 9;
const SCT_MASK: u16 = 0x7;
const CRD_SHIFT: u32 = 12;
const CRD_MASK: u16 = 0x3;
const M_BIT: u16 = 1 << 14;
const DNR_BIT: u16 = 1 << 15;

/// A completion status without the phase tag and command retry delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status {
    /// Status code type, 3 bits (see [`sct`]).
    pub sct: u8,
    /// Status code within the type.
    pub sc: u8,
    /// Do Not Retry: the same command would fail again.
    pub dnr: bool,
    /// More: the Error Information log page has more about this failure.
    pub more: bool,
}

const fn generic(sc: u8) -> Status {
    Status::new(sct::GENERIC, sc)
}

const fn specific(sc: u8) -> Status {
    Status::new(sct::COMMAND_SPECIFIC, sc)
}

const fn media(sc: u8) -> Status {
    Status::new(sct::MEDIA_AND_DATA_INTEGRITY, sc)
}

impl Status {
    pub const fn new(sct: u8, sc: u8) -> Self {
        Self { sct, sc, dnr: false, more: false }
    }

    /// The same status with Do Not Retry set.
    pub const fn with_dnr(self) -> Self {
        Self { dnr: true, ..self }
    }

    pub const fn is_success(self) -> bool {
        self.sct == sct::GENERIC && self.sc == 0
    }

    /// The CQE status field for this status, with phase tag `phase` and a
    /// command retry delay of 0.
    pub const fn to_cqe_status(self, phase: bool) -> u16 {
        self.to_cqe_status_with_crd(phase, 0)
    }

    /// The CQE status field with a command retry delay selector (CRD, 0..=3;
    /// higher bits are dropped).
    pub const fn to_cqe_status_with_crd(self, phase: bool, crd: u8) -> u16 {
        let mut raw = (self.sc as u16) << SC_SHIFT;
        raw |= ((self.sct as u16) & SCT_MASK) << SCT_SHIFT;
        raw |= ((crd as u16) & CRD_MASK) << CRD_SHIFT;
        if phase {
            raw |= P_BIT;
        }
        if self.more {
            raw |= M_BIT;
        }
        if self.dnr {
            raw |= DNR_BIT;
        }
        raw
    }

    /// Decodes a CQE status field; the phase tag and CRD are not part of
    /// the result (see [`phase_of`] and [`crd_of`]).
    pub const fn from_cqe_status(raw: u16) -> Self {
        Self {
            sct: ((raw >> SCT_SHIFT) & SCT_MASK) as u8,
            sc: (raw >> SC_SHIFT) as u8,
            dnr: raw & DNR_BIT != 0,
            more: raw & M_BIT != 0,
        }
    }

    // Generic command status (SCT 0).
    pub const SUCCESS: Self = generic(0x00);
    pub const INVALID_OPCODE: Self = generic(0x01);
    pub const INVALID_FIELD: Self = generic(0x02);
    pub const COMMAND_ID_CONFLICT: Self = generic(0x03);
    pub const DATA_TRANSFER_ERROR: Self = generic(0x04);
    pub const ABORTED_POWER_LOSS: Self = generic(0x05);
    pub const INTERNAL_ERROR: Self = generic(0x06);
    pub const ABORT_REQUESTED: Self = generic(0x07);
    pub const ABORTED_SQ_DELETION: Self = generic(0x08);
    pub const ABORTED_FAILED_FUSED: Self = generic(0x09);
    pub const ABORTED_MISSING_FUSED: Self = generic(0x0A);
    pub const INVALID_NAMESPACE_OR_FORMAT: Self = generic(0x0B);
    pub const COMMAND_SEQUENCE_ERROR: Self = generic(0x0C);
    pub const INVALID_SGL_SEGMENT_DESCRIPTOR: Self = generic(0x0D);
    pub const INVALID_NUMBER_OF_SGL_DESCRIPTORS: Self = generic(0x0E);
    pub const DATA_SGL_LENGTH_INVALID: Self = generic(0x0F);
    pub const METADATA_SGL_LENGTH_INVALID: Self = generic(0x10);
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Self = generic(0x11);
    pub const INVALID_USE_OF_CMB: Self = generic(0x12);
    pub const PRP_OFFSET_INVALID: Self = generic(0x13);
    pub const ATOMIC_WRITE_UNIT_EXCEEDED: Self = generic(0x14);
    pub const OPERATION_DENIED: Self = generic(0x15);
    pub const SGL_OFFSET_INVALID: Self = generic(0x16);
    pub const HOST_ID_INCONSISTENT_FORMAT: Self = generic(0x18);
    pub const KEEP_ALIVE_EXPIRED: Self = generic(0x19);
    pub const KEEP_ALIVE_INVALID: Self = generic(0x1A);
    pub const ABORTED_PREEMPT: Self = generic(0x1B);
    pub const SANITIZE_FAILED: Self = generic(0x1C);
    pub const SANITIZE_IN_PROGRESS: Self = generic(0x1D);
    pub const SGL_DATA_BLOCK_GRANULARITY_INVALID: Self = generic(0x1E);
    pub const NAMESPACE_WRITE_PROTECTED: Self = generic(0x20);
    pub const COMMAND_INTERRUPTED: Self = generic(0x21);
    /// What a transport reports for a recoverable transport failure, such
    /// as an NVMe/TCP data digest mismatch; the host may retry.
    pub const TRANSIENT_TRANSPORT_ERROR: Self = generic(0x22);
    // NVM command set generic status (SCT 0, 0x80..).
    pub const LBA_OUT_OF_RANGE: Self = generic(0x80);
    pub const CAPACITY_EXCEEDED: Self = generic(0x81);
    pub const NAMESPACE_NOT_READY: Self = generic(0x82);
    pub const RESERVATION_CONFLICT: Self = generic(0x83);
    pub const FORMAT_IN_PROGRESS: Self = generic(0x84);

    // Command specific status (SCT 1).
    pub const COMPLETION_QUEUE_INVALID: Self = specific(0x00);
    pub const INVALID_QUEUE_IDENTIFIER: Self = specific(0x01);
    pub const INVALID_QUEUE_SIZE: Self = specific(0x02);
    pub const ABORT_COMMAND_LIMIT_EXCEEDED: Self = specific(0x03);
    pub const ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED: Self = specific(0x05);
    pub const INVALID_FIRMWARE_SLOT: Self = specific(0x06);
    pub const INVALID_FIRMWARE_IMAGE: Self = specific(0x07);
    pub const INVALID_INTERRUPT_VECTOR: Self = specific(0x08);
    pub const INVALID_LOG_PAGE: Self = specific(0x09);
    pub const INVALID_FORMAT: Self = specific(0x0A);
    pub const INVALID_QUEUE_DELETION: Self = specific(0x0C);
    pub const FEATURE_NOT_SAVEABLE: Self = specific(0x0D);
    pub const FEATURE_NOT_CHANGEABLE: Self = specific(0x0E);
    pub const FEATURE_NOT_NAMESPACE_SPECIFIC: Self = specific(0x0F);
    // Fabrics Connect command specific status. These share code points with
    // NVM command set specific codes (0x80.. of read/write); they mean these
    // things only in a Connect completion.
    pub const CONNECT_INCOMPATIBLE_FORMAT: Self = specific(0x80);
    pub const CONNECT_CONTROLLER_BUSY: Self = specific(0x81);
    pub const CONNECT_INVALID_PARAMETERS: Self = specific(0x82);
    pub const CONNECT_RESTART_DISCOVERY: Self = specific(0x83);
    pub const CONNECT_INVALID_HOST: Self = specific(0x84);
    pub const CONNECT_INVALID_QUEUE_TYPE: Self = specific(0x85);
    /// Get Log Page of the discovery log: the log changed, read it again.
    pub const DISCOVER_RESTART: Self = specific(0x90);
    pub const AUTHENTICATION_REQUIRED: Self = specific(0x91);
    // NVM command set command specific status of IO commands.
    pub const CONFLICTING_ATTRIBUTES: Self = specific(0x80);
    pub const INVALID_PROTECTION_INFORMATION: Self = specific(0x81);
    pub const WRITE_TO_READ_ONLY_RANGE: Self = specific(0x82);

    // Media and data integrity errors (SCT 2).
    pub const WRITE_FAULT: Self = media(0x80);
    pub const UNRECOVERED_READ_ERROR: Self = media(0x81);
    pub const GUARD_CHECK_ERROR: Self = media(0x82);
    pub const APPLICATION_TAG_CHECK_ERROR: Self = media(0x83);
    pub const REFERENCE_TAG_CHECK_ERROR: Self = media(0x84);
    pub const COMPARE_FAILURE: Self = media(0x85);
    pub const ACCESS_DENIED: Self = media(0x86);
    pub const DEALLOCATED_OR_UNWRITTEN_BLOCK: Self = media(0x87);

    // Path related status (SCT 3).
    pub const INTERNAL_PATH_ERROR: Self = Self::new(sct::PATH_RELATED, 0x00);
    pub const ANA_PERSISTENT_LOSS: Self = Self::new(sct::PATH_RELATED, 0x01);
    pub const ANA_INACCESSIBLE: Self = Self::new(sct::PATH_RELATED, 0x02);
    pub const ANA_TRANSITION: Self = Self::new(sct::PATH_RELATED, 0x03);
    pub const CONTROLLER_PATHING_ERROR: Self = Self::new(sct::PATH_RELATED, 0x60);
    pub const HOST_PATHING_ERROR: Self = Self::new(sct::PATH_RELATED, 0x70);
    pub const ABORTED_BY_HOST: Self = Self::new(sct::PATH_RELATED, 0x71);
}

/// The phase tag of a CQE status field.
pub const fn phase_of(raw: u16) -> bool {
    raw & P_BIT != 0
}

/// The command retry delay selector (CRD) of a CQE status field.
pub const fn crd_of(raw: u16) -> u8 {
    ((raw >> CRD_SHIFT) & CRD_MASK) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_fields_land_in_the_documented_bits() {
        // LBA out of range, DNR: SC 0x80 -> bits 8:1, DNR bit 15.
        assert_eq!(Status::LBA_OUT_OF_RANGE.with_dnr().to_cqe_status(false), 0x8100);
        // Connect invalid parameters: SCT 1 (bit 9), SC 0x82.
        assert_eq!(Status::CONNECT_INVALID_PARAMETERS.to_cqe_status(true), 0x0305);
        // Unrecovered read error: SCT 2 (bit 10), SC 0x81.
        assert_eq!(Status::UNRECOVERED_READ_ERROR.to_cqe_status(false), 0x0502);
        assert_eq!(Status::SUCCESS.to_cqe_status(true), 1);
        let raw = Status::INTERNAL_ERROR.to_cqe_status_with_crd(false, 2);
        assert_eq!(crd_of(raw), 2);
        assert_eq!(Status::from_cqe_status(raw), Status::INTERNAL_ERROR);
    }

    proptest! {
        #[test]
        fn pack_unpack_round_trips(sct in 0u8..8, sc: u8, dnr: bool, more: bool, phase: bool, crd in 0u8..4) {
            let status = Status { sct, sc, dnr, more };
            let raw = status.to_cqe_status_with_crd(phase, crd);
            prop_assert_eq!(Status::from_cqe_status(raw), status);
            prop_assert_eq!(phase_of(raw), phase);
            prop_assert_eq!(crd_of(raw), crd);
        }

        #[test]
        fn unpack_pack_round_trips(raw: u16) {
            let status = Status::from_cqe_status(raw);
            prop_assert_eq!(status.to_cqe_status_with_crd(phase_of(raw), crd_of(raw)), raw);
        }
    }
}
