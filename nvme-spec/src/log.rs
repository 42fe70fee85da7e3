//! Log pages: identifiers, the Get Log Page command fields, error
//! information, SMART / health, changed namespace list, asymmetric
//! namespace access (ANA) and the fabrics discovery log page.

use core::mem::size_of;

use zerocopy::little_endian::{U128, U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::cmd::Sqe;

/// Log page identifier (LID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LogPageId(pub u8);

impl LogPageId {
    pub const SUPPORTED_LOG_PAGES: Self = Self(0x00);
    pub const ERROR_INFORMATION: Self = Self(0x01);
    pub const SMART_HEALTH: Self = Self(0x02);
    pub const FIRMWARE_SLOT: Self = Self(0x03);
    pub const CHANGED_NAMESPACE_LIST: Self = Self(0x04);
    pub const COMMANDS_SUPPORTED_AND_EFFECTS: Self = Self(0x05);
    pub const DEVICE_SELF_TEST: Self = Self(0x06);
    pub const TELEMETRY_HOST: Self = Self(0x07);
    pub const TELEMETRY_CONTROLLER: Self = Self(0x08);
    pub const ASYMMETRIC_NAMESPACE_ACCESS: Self = Self(0x0C);
    pub const PERSISTENT_EVENT: Self = Self(0x0D);
    pub const DISCOVERY: Self = Self(0x70);
    pub const RESERVATION_NOTIFICATION: Self = Self(0x80);
    pub const SANITIZE_STATUS: Self = Self(0x81);
}

/// The fields of a Get Log Page command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetLogPageParams {
    pub lid: LogPageId,
    /// Log specific field (CDW10 bits 14:8).
    pub lsp: u8,
    /// Retain asynchronous event (CDW10 bit 15).
    pub rae: bool,
    /// Bytes requested: NUMD (0's based dwords, NUMDU:NUMDL) + 1, times 4.
    pub len_bytes: u64,
    /// Byte offset into the log page (CDW13:CDW12).
    pub offset_bytes: u64,
    /// Log specific identifier (CDW11 bits 31:16).
    pub lsi: u16,
    pub nsid: u32,
}

impl GetLogPageParams {
    pub fn from_sqe(sqe: &Sqe) -> Self {
        let cdw10 = sqe.cdw10.get();
        let cdw11 = sqe.cdw11.get();
        let numd = (u64::from(cdw11 & 0xFFFF) << 16) | u64::from(cdw10 >> 16);
        Self {
            lid: LogPageId(cdw10 as u8),
            lsp: ((cdw10 >> 8) & 0x7F) as u8,
            rae: cdw10 & (1 << 15) != 0,
            len_bytes: (numd + 1) * 4,
            offset_bytes: (u64::from(sqe.cdw13.get()) << 32) | u64::from(sqe.cdw12.get()),
            lsi: (cdw11 >> 16) as u16,
            nsid: sqe.nsid.get(),
        }
    }

    /// Writes these fields into a command. `len_bytes` must be a non-zero
    /// multiple of 4 (a log page is read in dwords); it is rounded down.
    pub fn write_to(&self, sqe: &mut Sqe) {
        let numd = (self.len_bytes / 4).saturating_sub(1);
        sqe.nsid = U32::new(self.nsid);
        sqe.cdw10 = U32::new(
            u32::from(self.lid.0)
                | (u32::from(self.lsp & 0x7F) << 8)
                | (u32::from(self.rae) << 15)
                | (((numd & 0xFFFF) as u32) << 16),
        );
        sqe.cdw11 = U32::new((((numd >> 16) & 0xFFFF) as u32) | (u32::from(self.lsi) << 16));
        sqe.cdw12 = U32::new(self.offset_bytes as u32);
        sqe.cdw13 = U32::new((self.offset_bytes >> 32) as u32);
    }
}

/// Error information log entry (64 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct ErrorInfoEntry {
    /// Unique, incrementing identifier of this error; 0 marks an empty entry.
    pub error_count: U64,
    pub sqid: U16,
    pub cid: U16,
    /// The completion status field, phase tag in bit 0.
    pub status: U16,
    /// Byte (bits 7:0) and bit (bits 10:8) of the command field in error.
    pub parameter_error_location: U16,
    pub lba: U64,
    pub nsid: U32,
    pub vendor_log_page: u8,
    /// Transport type, as in the discovery log, for transport errors.
    pub trtype: u8,
    pub rsvd30: [u8; 2],
    pub command_specific: U64,
    pub transport_specific: U16,
    pub rsvd42: [u8; 22],
}

const _: () = assert!(size_of::<ErrorInfoEntry>() == 64);

/// SMART / Health Information log (512 bytes). 128-bit counters are in
/// units the spec gives per field (data units are 1000 x 512 bytes).
#[repr(C)]
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct SmartLog {
    pub critical_warning: u8,
    /// Composite temperature, kelvin (unaligned on purpose: byte 1).
    pub temperature: U16,
    pub available_spare: u8,
    pub available_spare_threshold: u8,
    pub percentage_used: u8,
    pub endurance_group_critical_warning: u8,
    pub rsvd7: [u8; 25],
    pub data_units_read: U128,
    pub data_units_written: U128,
    pub host_read_commands: U128,
    pub host_write_commands: U128,
    pub controller_busy_time: U128,
    pub power_cycles: U128,
    pub power_on_hours: U128,
    pub unsafe_shutdowns: U128,
    pub media_errors: U128,
    pub error_log_entries: U128,
    pub warning_temp_time: U32,
    pub critical_temp_time: U32,
    pub temp_sensor: [U16; 8],
    pub thermal_mgmt_temp1_transitions: U32,
    pub thermal_mgmt_temp2_transitions: U32,
    pub thermal_mgmt_temp1_time: U32,
    pub thermal_mgmt_temp2_time: U32,
    pub rsvd232: [u8; 280],
}

const _: () = assert!(size_of::<SmartLog>() == 512);

impl SmartLog {
    pub fn zeroed() -> Self {
        Self::new_zeroed()
    }
}

/// Critical warning bits of the SMART log.
pub mod critical_warning {
    pub const SPARE_BELOW_THRESHOLD: u8 = 1 << 0;
    pub const TEMPERATURE: u8 = 1 << 1;
    pub const RELIABILITY_DEGRADED: u8 = 1 << 2;
    pub const READ_ONLY: u8 = 1 << 3;
    pub const VOLATILE_BACKUP_FAILED: u8 = 1 << 4;
}

/// The changed namespace list log page (LID 04h): up to 1024 NSIDs; a first
/// entry of FFFFFFFFh means more than 1024 changed.
pub type ChangedNamespaceList = crate::identify::NamespaceList;

/// First entry of a changed namespace list that overflowed.
pub const CHANGED_NS_LIST_OVERFLOW: u32 = 0xFFFF_FFFF;

/// Discovery log page header (1024 bytes); entries follow at byte 1024.
#[repr(C)]
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct DiscoveryLogHeader {
    /// Generation counter: changes whenever the entries change, so a host
    /// that read the log in pieces can tell it read a consistent copy.
    pub genctr: U64,
    /// Number of records (entries) in the log.
    pub numrec: U64,
    /// Record format, 0.
    pub recfmt: U16,
    pub rsvd18: [u8; 1006],
}

const _: () = assert!(size_of::<DiscoveryLogHeader>() == 1024);

impl DiscoveryLogHeader {
    pub fn new(genctr: u64, numrec: u64) -> Self {
        let mut h = Self::new_zeroed();
        h.genctr = U64::new(genctr);
        h.numrec = U64::new(numrec);
        h
    }
}

/// Asymmetric namespace access states (ANA group descriptor byte 16, bits 3:0).
pub mod ana_state {
    pub const OPTIMIZED: u8 = 0x01;
    pub const NON_OPTIMIZED: u8 = 0x02;
    pub const INACCESSIBLE: u8 = 0x03;
    pub const PERSISTENT_LOSS: u8 = 0x04;
    pub const CHANGE: u8 = 0x0F;
}

/// Get Log Page LSP bit 0 of the ANA log: return groups only (RGO), with
/// no namespace lists.
pub const ANA_LSP_RETURN_GROUPS_ONLY: u8 = 1 << 0;

/// ANA log page (0Ch) header (16 bytes); group descriptors follow.
#[repr(C)]
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct AnaLogHeader {
    /// Change count: moves whenever the log's contents change.
    pub chgcnt: U64,
    /// Number of ANA group descriptors that follow.
    pub ngrps: U16,
    pub rsvd10: [u8; 6],
}

const _: () = assert!(size_of::<AnaLogHeader>() == 16);

impl AnaLogHeader {
    pub fn new(chgcnt: u64, ngrps: u16) -> Self {
        let mut h = Self::new_zeroed();
        h.chgcnt = U64::new(chgcnt);
        h.ngrps = U16::new(ngrps);
        h
    }
}

/// One ANA group descriptor (32 bytes), followed by `nnsids` NSIDs (4 bytes
/// each; none when the host asked for groups only).
#[repr(C)]
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct AnaGroupDescriptor {
    pub anagrpid: U32,
    /// Number of NSIDs listed after the descriptor.
    pub nnsids: U32,
    /// Change count of this group's descriptor.
    pub chgcnt: U64,
    /// ANA state (`ana_state`) in bits 3:0.
    pub state: u8,
    pub rsvd17: [u8; 15],
}

const _: () = assert!(size_of::<AnaGroupDescriptor>() == 32);

impl AnaGroupDescriptor {
    pub fn new(anagrpid: u32, nnsids: u32, chgcnt: u64, state: u8) -> Self {
        let mut d = Self::new_zeroed();
        d.anagrpid = U32::new(anagrpid);
        d.nnsids = U32::new(nnsids);
        d.chgcnt = U64::new(chgcnt);
        d.state = state & 0x0F;
        d
    }
}

/// Transport types (TRTYPE).
pub mod trtype {
    pub const RDMA: u8 = 1;
    pub const FIBRE_CHANNEL: u8 = 2;
    pub const TCP: u8 = 3;
    pub const INTRA_HOST: u8 = 254;
}

/// Address families (ADRFAM).
pub mod adrfam {
    pub const IPV4: u8 = 1;
    pub const IPV6: u8 = 2;
    pub const INFINIBAND: u8 = 3;
    pub const FIBRE_CHANNEL: u8 = 4;
    pub const INTRA_HOST: u8 = 254;
}

/// Subsystem types (SUBTYPE) of a discovery log entry.
pub mod subtype {
    /// A referral to another discovery service.
    pub const DISCOVERY_REFERRAL: u8 = 1;
    /// An NVM subsystem with IO controllers.
    pub const NVME: u8 = 2;
    /// The discovery subsystem being queried itself.
    pub const CURRENT_DISCOVERY: u8 = 3;
}

/// Transport requirements (TREQ).
pub mod treq {
    pub const SECURE_CHANNEL_NOT_SPECIFIED: u8 = 0b00;
    pub const SECURE_CHANNEL_REQUIRED: u8 = 0b01;
    pub const SECURE_CHANNEL_NOT_REQUIRED: u8 = 0b10;
    /// SQ flow control may be disabled (bit 2).
    pub const DISABLE_SQ_FLOW_CONTROL: u8 = 1 << 2;
}

/// TCP security types (TSAS byte 0 for TRTYPE TCP).
pub mod tcp_sectype {
    pub const NONE: u8 = 0;
    pub const TLS_1_2: u8 = 1;
    pub const TLS_1_3: u8 = 2;
}

/// CNTLID of a discovery entry for a subsystem with the dynamic controller
/// model: the host must connect with CNTLID FFFFh.
pub const CNTLID_DYNAMIC: u16 = 0xFFFF;

/// Discovery log page entry (1024 bytes).
#[repr(C)]
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct DiscoveryLogEntry {
    pub trtype: u8,
    pub adrfam: u8,
    pub subtype: u8,
    pub treq: u8,
    pub portid: U16,
    pub cntlid: U16,
    /// Admin max SQ size: entries the admin queue accepts.
    pub asqsz: U16,
    pub eflags: U16,
    pub rsvd12: [u8; 20],
    /// Transport service id (TCP port) as ASCII, space padded.
    pub trsvcid: [u8; 32],
    pub rsvd64: [u8; 192],
    /// Subsystem NQN, NUL padded.
    pub subnqn: [u8; 256],
    /// Transport address (IP address) as ASCII, space padded.
    pub traddr: [u8; 256],
    /// Transport specific address subtype.
    pub tsas: [u8; 256],
}

const _: () = assert!(size_of::<DiscoveryLogEntry>() == 1024);

impl DiscoveryLogEntry {
    pub fn zeroed() -> Self {
        Self::new_zeroed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;
    use proptest::prelude::*;

    #[test]
    fn error_info_offsets() {
        assert_eq!(offset_of!(ErrorInfoEntry, sqid), 8);
        assert_eq!(offset_of!(ErrorInfoEntry, cid), 10);
        assert_eq!(offset_of!(ErrorInfoEntry, status), 12);
        assert_eq!(offset_of!(ErrorInfoEntry, parameter_error_location), 14);
        assert_eq!(offset_of!(ErrorInfoEntry, lba), 16);
        assert_eq!(offset_of!(ErrorInfoEntry, nsid), 24);
        assert_eq!(offset_of!(ErrorInfoEntry, trtype), 29);
        assert_eq!(offset_of!(ErrorInfoEntry, command_specific), 32);
        assert_eq!(offset_of!(ErrorInfoEntry, transport_specific), 40);
    }

    #[test]
    fn smart_offsets() {
        assert_eq!(offset_of!(SmartLog, temperature), 1);
        assert_eq!(offset_of!(SmartLog, available_spare), 3);
        assert_eq!(offset_of!(SmartLog, percentage_used), 5);
        assert_eq!(offset_of!(SmartLog, data_units_read), 32);
        assert_eq!(offset_of!(SmartLog, power_on_hours), 128);
        assert_eq!(offset_of!(SmartLog, media_errors), 160);
        assert_eq!(offset_of!(SmartLog, error_log_entries), 176);
        assert_eq!(offset_of!(SmartLog, warning_temp_time), 192);
        assert_eq!(offset_of!(SmartLog, temp_sensor), 200);
        assert_eq!(offset_of!(SmartLog, thermal_mgmt_temp1_transitions), 216);
        assert_eq!(offset_of!(SmartLog, rsvd232), 232);
    }

    #[test]
    fn discovery_offsets() {
        assert_eq!(offset_of!(DiscoveryLogHeader, numrec), 8);
        assert_eq!(offset_of!(DiscoveryLogHeader, recfmt), 16);
        assert_eq!(offset_of!(DiscoveryLogEntry, portid), 4);
        assert_eq!(offset_of!(DiscoveryLogEntry, cntlid), 6);
        assert_eq!(offset_of!(DiscoveryLogEntry, asqsz), 8);
        assert_eq!(offset_of!(DiscoveryLogEntry, trsvcid), 32);
        assert_eq!(offset_of!(DiscoveryLogEntry, subnqn), 256);
        assert_eq!(offset_of!(DiscoveryLogEntry, traddr), 512);
        assert_eq!(offset_of!(DiscoveryLogEntry, tsas), 768);
    }

    #[test]
    fn ana_offsets() {
        assert_eq!(offset_of!(AnaLogHeader, ngrps), 8);
        assert_eq!(offset_of!(AnaGroupDescriptor, nnsids), 4);
        assert_eq!(offset_of!(AnaGroupDescriptor, chgcnt), 8);
        assert_eq!(offset_of!(AnaGroupDescriptor, state), 16);
        let d = AnaGroupDescriptor::new(7, 2, 3, ana_state::CHANGE | 0xF0);
        assert_eq!(d.as_bytes()[..17], [7, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0x0F]);
    }

    #[test]
    fn get_log_page_fields() {
        // LID 70h, RAE, NUMD 1FFFFh (0's based): NUMDU 1, NUMDL FFFFh; LSI 3.
        let sqe = Sqe {
            cdw10: U32::new(0xFFFF_8070),
            cdw11: U32::new(0x0003_0001),
            cdw12: U32::new(0x200),
            ..Sqe::default()
        };
        let p = GetLogPageParams::from_sqe(&sqe);
        assert_eq!(p.lid, LogPageId::DISCOVERY);
        assert!(p.rae);
        assert_eq!(p.len_bytes, (0x1_FFFF + 1) * 4);
        assert_eq!(p.offset_bytes, 0x200);
        assert_eq!(p.lsi, 3);
    }

    proptest! {
        #[test]
        fn get_log_page_round_trips(lid: u8, lsp in 0u8..0x80, rae: bool, numd in 0u64..(1 << 32),
                                    offset_dw in 0u64..(1 << 40), lsi: u16, nsid: u32) {
            let p = GetLogPageParams {
                lid: LogPageId(lid), lsp, rae, len_bytes: (numd + 1) * 4,
                offset_bytes: offset_dw * 4, lsi, nsid,
            };
            let mut sqe = Sqe::default();
            p.write_to(&mut sqe);
            prop_assert_eq!(GetLogPageParams::from_sqe(&sqe), p);
        }
    }
}
