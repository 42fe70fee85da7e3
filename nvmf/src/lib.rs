//! NVMe over Fabrics TCP transport: target and initiator.
//!
//! - [`pdu`]: the PDU codec (layouts, validation, streaming reader, digests).
//! - [`tgt`]: the target: subsystems, namespaces, listeners, controllers and
//!   the per-reactor queue pairs that serve them ([`NvmfState`] is the
//!   control-plane entry point, [`shutdown`] stops it).
//! - [`host`]: the initiator, as a polled queue pair API and as bdevs.
//! - [`keyring`]: named secrets in files (DH-HMAC-CHAP keys, TLS PSKs).
//! - [`tls`]: the secure channel's PSKs (interchange format, identity,
//!   derivations).
#![forbid(unsafe_code)]

pub mod host;
pub mod keyring;
pub mod pdu;
pub mod tgt;
pub mod tls;

pub use tgt::{
    shutdown, AnaState, ListenAddr, Namespace, NsOptions, NvmfError, NvmfState, Subsystem, SubsystemKind,
    SubsystemParams, TransportOpts,
};
