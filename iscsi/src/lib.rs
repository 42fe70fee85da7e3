//! The iSCSI target: RFC 7143 sessions and connections on the reactors,
//! serving SCSI block commands over bdevs.
//!
//! - [`scsi`]: the SCSI device server (SBC-4 / SPC-5) over a bdev: CDB
//!   decoding, block IO, sense data, reservations. It knows nothing of iSCSI.
#![forbid(unsafe_code)]

pub mod scsi;
