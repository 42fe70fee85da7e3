//! Features (Set/Get Features) and asynchronous events: feature ids, the
//! command fields, and the value formats of the features a target serves.

use zerocopy::little_endian::U32;

use crate::cmd::Sqe;

/// Feature identifier (FID, CDW10 bits 7:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FeatureId(pub u8);

impl FeatureId {
    pub const ARBITRATION: Self = Self(0x01);
    pub const POWER_MANAGEMENT: Self = Self(0x02);
    pub const LBA_RANGE_TYPE: Self = Self(0x03);
    pub const TEMPERATURE_THRESHOLD: Self = Self(0x04);
    pub const ERROR_RECOVERY: Self = Self(0x05);
    pub const VOLATILE_WRITE_CACHE: Self = Self(0x06);
    pub const NUMBER_OF_QUEUES: Self = Self(0x07);
    pub const INTERRUPT_COALESCING: Self = Self(0x08);
    pub const INTERRUPT_VECTOR_CONFIG: Self = Self(0x09);
    pub const WRITE_ATOMICITY_NORMAL: Self = Self(0x0A);
    pub const ASYNC_EVENT_CONFIG: Self = Self(0x0B);
    pub const AUTONOMOUS_POWER_STATE_TRANSITION: Self = Self(0x0C);
    pub const HOST_MEMORY_BUFFER: Self = Self(0x0D);
    pub const TIMESTAMP: Self = Self(0x0E);
    pub const KEEP_ALIVE_TIMER: Self = Self(0x0F);
    pub const HOST_CONTROLLED_THERMAL_MGMT: Self = Self(0x10);
    pub const NON_OPERATIONAL_POWER_STATE: Self = Self(0x11);
    pub const HOST_BEHAVIOR_SUPPORT: Self = Self(0x16);
    pub const SOFTWARE_PROGRESS_MARKER: Self = Self(0x80);
    pub const HOST_IDENTIFIER: Self = Self(0x81);
    pub const RESERVATION_NOTIFICATION_MASK: Self = Self(0x82);
    pub const RESERVATION_PERSISTENCE: Self = Self(0x83);
}

/// Get Features select field (SEL, CDW10 bits 10:8).
pub mod select {
    pub const CURRENT: u8 = 0b000;
    pub const DEFAULT: u8 = 0b001;
    pub const SAVED: u8 = 0b010;
    pub const SUPPORTED_CAPABILITIES: u8 = 0b011;
}

/// The common fields of Set Features and Get Features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureParams {
    pub fid: FeatureId,
    /// Save (Set Features, CDW10 bit 31).
    pub save: bool,
    /// Select (Get Features, CDW10 bits 10:8); see [`select`].
    pub select: u8,
    /// Feature specific value (CDW11).
    pub value: u32,
}

impl FeatureParams {
    pub fn from_sqe(sqe: &Sqe) -> Self {
        let cdw10 = sqe.cdw10.get();
        Self {
            fid: FeatureId(cdw10 as u8),
            save: cdw10 & (1 << 31) != 0,
            select: ((cdw10 >> 8) & 0x7) as u8,
            value: sqe.cdw11.get(),
        }
    }

    pub fn write_to(&self, sqe: &mut Sqe) {
        sqe.cdw10 =
            U32::new(u32::from(self.fid.0) | (u32::from(self.select & 0x7) << 8) | (u32::from(self.save) << 31));
        sqe.cdw11 = U32::new(self.value);
    }
}

/// Number of Queues (FID 07h): the same dword format in CDW11 of Set
/// Features and in DW0 of its completion. Counts are real (1-based) here;
/// the wire carries them 0's based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NumberOfQueues {
    pub io_sqs: u32,
    pub io_cqs: u32,
}

impl NumberOfQueues {
    pub fn from_dword(dw: u32) -> Self {
        Self { io_sqs: (dw & 0xFFFF) + 1, io_cqs: (dw >> 16) + 1 }
    }

    /// Counts are clamped to 1..=65535 (FFFFh 0's based is reserved).
    pub fn to_dword(self) -> u32 {
        let nsqr = self.io_sqs.clamp(1, 0xFFFF) - 1;
        let ncqr = self.io_cqs.clamp(1, 0xFFFF) - 1;
        nsqr | (ncqr << 16)
    }
}

/// Asynchronous Event Configuration (FID 0Bh) bits of CDW11.
pub mod async_event_config {
    /// SMART / health critical warnings to report: bits 7:0.
    pub const SMART_MASK: u32 = 0xFF;
    pub const NAMESPACE_ATTRIBUTE_NOTICES: u32 = 1 << 8;
    pub const FIRMWARE_ACTIVATION_NOTICES: u32 = 1 << 9;
    pub const TELEMETRY_LOG_NOTICES: u32 = 1 << 10;
    pub const ANA_CHANGE_NOTICES: u32 = 1 << 11;
    pub const DISCOVERY_LOG_CHANGE_NOTICES: u32 = 1 << 31;
}

/// Volatile Write Cache (FID 06h): CDW11 bit 0 enables the cache.
pub const VWC_ENABLE: u32 = 1 << 0;

/// Asynchronous event types (completion DW0 bits 2:0).
pub mod async_event_type {
    pub const ERROR: u8 = 0;
    pub const SMART_HEALTH: u8 = 1;
    pub const NOTICE: u8 = 2;
    pub const IMMEDIATE: u8 = 3;
    pub const IO_COMMAND_SET: u8 = 6;
    pub const VENDOR: u8 = 7;
}

/// Asynchronous event information for the notice type (DW0 bits 15:8).
pub mod async_event_notice {
    pub const NAMESPACE_ATTRIBUTE_CHANGED: u8 = 0x00;
    pub const FIRMWARE_ACTIVATION_STARTING: u8 = 0x01;
    pub const TELEMETRY_LOG_CHANGED: u8 = 0x02;
    pub const ANA_CHANGE: u8 = 0x03;
    pub const DISCOVERY_LOG_CHANGED: u8 = 0xF0;
}

/// Completion DW0 of an Asynchronous Event Request: what happened and which
/// log page the host must read to learn more (and to re-arm the event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncEvent {
    pub event_type: u8,
    pub info: u8,
    pub log_page: u8,
}

impl AsyncEvent {
    pub fn to_dword(self) -> u32 {
        u32::from(self.event_type & 0x7) | (u32::from(self.info) << 8) | (u32::from(self.log_page) << 16)
    }

    pub fn from_dword(dw: u32) -> Self {
        Self { event_type: (dw & 0x7) as u8, info: (dw >> 8) as u8, log_page: (dw >> 16) as u8 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::LogPageId;

    #[test]
    fn number_of_queues_is_zero_based_on_the_wire() {
        let n = NumberOfQueues { io_sqs: 4, io_cqs: 2 };
        assert_eq!(n.to_dword(), 0x0001_0003);
        assert_eq!(NumberOfQueues::from_dword(0x0001_0003), n);
        assert_eq!(NumberOfQueues::from_dword(0xFFFF_FFFF).io_sqs, 0x1_0000);
    }

    #[test]
    fn feature_params_round_trip() {
        let p = FeatureParams { fid: FeatureId::KEEP_ALIVE_TIMER, save: true, select: select::DEFAULT, value: 120_000 };
        let mut sqe = Sqe::default();
        p.write_to(&mut sqe);
        assert_eq!(sqe.cdw10.get(), 0x8000_010F);
        assert_eq!(FeatureParams::from_sqe(&sqe), p);
    }

    #[test]
    fn namespace_change_event() {
        let e = AsyncEvent {
            event_type: async_event_type::NOTICE,
            info: async_event_notice::NAMESPACE_ATTRIBUTE_CHANGED,
            log_page: LogPageId::CHANGED_NAMESPACE_LIST.0,
        };
        assert_eq!(e.to_dword(), 0x0004_0002);
        assert_eq!(AsyncEvent::from_dword(e.to_dword()), e);
    }
}
