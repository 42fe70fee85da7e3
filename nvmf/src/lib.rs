//! NVMe over Fabrics TCP transport: target and initiator.
#![forbid(unsafe_code)]

pub mod pdu;
