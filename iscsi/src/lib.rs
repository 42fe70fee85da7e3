//! The iSCSI target: RFC 7143 sessions and connections on the reactors,
//! serving SCSI block commands over bdevs.
//!
//! - [`pdu`]: the Basic Header Segment, framing, digests.
//! - [`text`]: text keys and operational parameter negotiation.
//! - [`chap`]: CHAP (MD5) for login authentication.
//! - [`tgt`]: the target: portal groups, initiator groups, target nodes,
//!   auth groups (the control plane), and connections on the reactors.
//! - [`scsi`]: the SCSI device server (SBC-4 / SPC-5) over a bdev: CDB
//!   decoding, block IO, sense data, reservations. It knows nothing of iSCSI.
#![forbid(unsafe_code)]

pub mod chap;
pub mod pdu;
pub mod scsi;
pub mod text;
pub mod tgt;

/// Entry points for the fuzz targets (fuzz/): what the login path uses
/// that is not otherwise public. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use crate::text::TargetOffer;
    use crate::IscsiOpts;

    /// The offer a login negotiates against under options `opts`, for a
    /// target node that requires the digests named (discovery: neither).
    pub fn target_offer(opts: &IscsiOpts, require_header_digest: bool, require_data_digest: bool) -> TargetOffer {
        crate::tgt::target_offer(opts, require_header_digest, require_data_digest)
    }
}

pub use tgt::{
    shutdown, ChapPolicy, ChapSecret, InitiatorGroup, IscsiError, IscsiOpts, IscsiState, NodeParams, Portal, TargetNode,
};
