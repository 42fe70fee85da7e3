//! Reservations (NVMe base 2.0, 8.19; NVM command set 1.0, Reservation
//! Register 0Dh, Report 0Eh, Acquire 11h, Release 15h): the command
//! fields, their data, the Reservation Status data structure, the
//! Reservation Notification log page (80h) and Identify Namespace RESCAP.

use core::mem::size_of;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::cmd::Sqe;

/// Reservation types (RTYPE).
pub mod rtype {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 2;
    pub const WRITE_EXCLUSIVE_REG_ONLY: u8 = 3;
    pub const EXCLUSIVE_ACCESS_REG_ONLY: u8 = 4;
    pub const WRITE_EXCLUSIVE_ALL_REGS: u8 = 5;
    pub const EXCLUSIVE_ACCESS_ALL_REGS: u8 = 6;
}

/// Reservation Register action (RREGA, CDW10 bits 2:0).
pub mod rrega {
    pub const REGISTER: u8 = 0;
    pub const UNREGISTER: u8 = 1;
    pub const REPLACE: u8 = 2;
}

/// Reservation Acquire action (RACQA, CDW10 bits 2:0).
pub mod racqa {
    pub const ACQUIRE: u8 = 0;
    pub const PREEMPT: u8 = 1;
    pub const PREEMPT_AND_ABORT: u8 = 2;
}

/// Reservation Release action (RRELA, CDW10 bits 2:0).
pub mod rrela {
    pub const RELEASE: u8 = 0;
    pub const CLEAR: u8 = 1;
}

/// Change Persist Through Power Loss State (Register CDW10 bits 31:30).
pub mod cptpl {
    pub const NO_CHANGE: u8 = 0b00;
    pub const RESERVED: u8 = 0b01;
    pub const CLEAR: u8 = 0b10;
    pub const SET: u8 = 0b11;
}

/// Identify Namespace RESCAP bits.
pub mod rescap {
    pub const PERSIST_THROUGH_POWER_LOSS: u8 = 1 << 0;
    pub const WRITE_EXCLUSIVE: u8 = 1 << 1;
    pub const EXCLUSIVE_ACCESS: u8 = 1 << 2;
    pub const WRITE_EXCLUSIVE_REG_ONLY: u8 = 1 << 3;
    pub const EXCLUSIVE_ACCESS_REG_ONLY: u8 = 1 << 4;
    pub const WRITE_EXCLUSIVE_ALL_REGS: u8 = 1 << 5;
    pub const EXCLUSIVE_ACCESS_ALL_REGS: u8 = 1 << 6;
    pub const IGNORE_EXISTING_KEY: u8 = 1 << 7;
}

/// Reservation Notification log page types.
pub mod notification {
    pub const EMPTY: u8 = 0;
    pub const REGISTRATION_PREEMPTED: u8 = 1;
    pub const RESERVATION_RELEASED: u8 = 2;
    pub const RESERVATION_PREEMPTED: u8 = 3;
}

/// Reservation Notification Mask feature (82h) bits of CDW11.
pub mod notification_mask {
    pub const REGISTRATION_PREEMPTED: u32 = 1 << 1;
    pub const RESERVATION_RELEASED: u32 = 1 << 2;
    pub const RESERVATION_PREEMPTED: u32 = 1 << 3;
    pub const ALL: u32 = REGISTRATION_PREEMPTED | RESERVATION_RELEASED | RESERVATION_PREEMPTED;
}

/// Asynchronous event information for the I/O command specific type:
/// a Reservation Notification log page is available.
pub const ASYNC_EVENT_RESERVATION_LOG_AVAILABLE: u8 = 0x00;

/// CDW10 of Register, Acquire and Release: the action (bits 2:0), IEKEY
/// (bit 3), RTYPE (bits 15:8, Acquire and Release) and CPTPL (bits 31:30,
/// Register).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservationCdw10 {
    pub action: u8,
    pub iekey: bool,
    pub rtype: u8,
    pub cptpl: u8,
}

impl ReservationCdw10 {
    pub fn from_sqe(sqe: &Sqe) -> Self {
        let v = sqe.cdw10.get();
        Self { action: (v & 0x7) as u8, iekey: v & (1 << 3) != 0, rtype: (v >> 8) as u8, cptpl: (v >> 30) as u8 }
    }

    pub fn to_dword(self) -> u32 {
        u32::from(self.action & 0x7)
            | (u32::from(self.iekey) << 3)
            | (u32::from(self.rtype) << 8)
            | (u32::from(self.cptpl & 0x3) << 30)
    }
}

/// Data of Reservation Register (16 bytes): current and new key.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct RegisterData {
    pub crkey: U64,
    pub nrkey: U64,
}

/// Data of Reservation Acquire (16 bytes): current key, preempt key.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct AcquireData {
    pub crkey: U64,
    pub prkey: U64,
}

/// Data of Reservation Release (8 bytes): current key.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct ReleaseData {
    pub crkey: U64,
}

const _: () = assert!(size_of::<RegisterData>() == 16);
const _: () = assert!(size_of::<AcquireData>() == 16);
const _: () = assert!(size_of::<ReleaseData>() == 8);

/// Reservation Report CDW11 bit 0: extended data structure (128-bit host
/// identifiers).
pub const REPORT_EDS: u32 = 1 << 0;

/// Reservation Status data structure header (24 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct ReservationStatusHeader {
    /// Generation: moves on Register, Preempt and Clear.
    pub gen: U32,
    pub rtype: u8,
    /// Number of registered controllers.
    pub regctl: U16,
    pub rsvd7: [u8; 2],
    /// Persist through power loss state.
    pub ptpls: u8,
    pub rsvd10: [u8; 14],
}

/// The extended structure's header: the header, then 40 reserved bytes.
pub const RESERVATION_STATUS_EXT_HEADER_LEN: usize = 64;

/// Registered Controller data structure (24 bytes; 64-bit host ID).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct RegisteredController {
    pub cntlid: U16,
    /// Reservation status: bit 0, this registrant holds the reservation.
    pub rcsts: u8,
    pub rsvd3: [u8; 5],
    pub hostid: [u8; 8],
    pub rkey: U64,
}

/// Registered Controller Extended data structure (64 bytes; 128-bit host ID).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct RegisteredControllerExt {
    pub cntlid: U16,
    pub rcsts: u8,
    pub rsvd3: [u8; 5],
    pub rkey: U64,
    pub hostid: [u8; 16],
    pub rsvd32: [u8; 32],
}

/// RCSTS bit 0.
pub const RCSTS_HOLDS_RESERVATION: u8 = 1 << 0;

const _: () = assert!(size_of::<ReservationStatusHeader>() == 24);
const _: () = assert!(size_of::<RegisteredController>() == 24);
const _: () = assert!(size_of::<RegisteredControllerExt>() == 64);

impl ReservationStatusHeader {
    pub fn new(gen: u32, rtype: u8, regctl: u16, ptpls: bool) -> Self {
        let mut h = Self::new_zeroed();
        h.gen = U32::new(gen);
        h.rtype = rtype;
        h.regctl = U16::new(regctl);
        h.ptpls = u8::from(ptpls);
        h
    }
}

impl RegisteredControllerExt {
    pub fn new(cntlid: u16, holds: bool, rkey: u64, hostid: [u8; 16]) -> Self {
        let mut r = Self::new_zeroed();
        r.cntlid = U16::new(cntlid);
        r.rcsts = if holds { RCSTS_HOLDS_RESERVATION } else { 0 };
        r.rkey = U64::new(rkey);
        r.hostid = hostid;
        r
    }
}

/// Reservation Notification log page (80h, 64 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct ReservationNotificationLog {
    /// Log page count: moves by one for each page the controller creates
    /// (0 only in an empty page; wraps from u64::MAX to 1).
    pub log_page_count: U64,
    /// See [`notification`].
    pub rnlpt: u8,
    /// Number of available log pages after this one (saturates at 255).
    pub nalp: u8,
    pub rsvd10: [u8; 2],
    pub nsid: U32,
    pub rsvd16: [u8; 48],
}

const _: () = assert!(size_of::<ReservationNotificationLog>() == 64);

impl ReservationNotificationLog {
    pub fn new(log_page_count: u64, rnlpt: u8, nalp: u8, nsid: u32) -> Self {
        let mut l = Self::new_zeroed();
        l.log_page_count = U64::new(log_page_count);
        l.rnlpt = rnlpt;
        l.nalp = nalp;
        l.nsid = U32::new(nsid);
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdw10_round_trips() {
        let c = ReservationCdw10 { action: 2, iekey: true, rtype: rtype::EXCLUSIVE_ACCESS_ALL_REGS, cptpl: cptpl::SET };
        assert_eq!(c.to_dword(), 0xC000_060A);
        let sqe = Sqe { cdw10: U32::new(c.to_dword()), ..Sqe::default() };
        assert_eq!(ReservationCdw10::from_sqe(&sqe), c);
    }

    #[test]
    fn layouts_place_fields_where_the_spec_does() {
        let h = ReservationStatusHeader::new(0x0102_0304, 5, 2, true);
        let b = h.as_bytes();
        assert_eq!(&b[..4], &[4, 3, 2, 1]);
        assert_eq!((b[4], b[5], b[6], b[9]), (5, 2, 0, 1));
        let r = RegisteredControllerExt::new(0xFFFF, true, 0xAA, [7; 16]);
        let b = r.as_bytes();
        assert_eq!((b[0], b[1], b[2]), (0xFF, 0xFF, 1));
        assert_eq!(b[8], 0xAA);
        assert_eq!(&b[16..32], &[7; 16]);
        let l = ReservationNotificationLog::new(9, notification::RESERVATION_RELEASED, 3, 1);
        let b = l.as_bytes();
        assert_eq!((b[0], b[8], b[9], b[12]), (9, 2, 3, 1));
    }
}
