//! NVMe base 2.0 and NVMe over Fabrics 1.1 data structures, shared by the
//! PCIe driver (`nvme`) and the NVMe/TCP transport (`nvmf`).
//!
//! Every wire or memory layout here is a `#[repr(C)]` struct made of
//! explicitly little-endian fields, with its size asserted at compile time,
//! so a layout mistake fails the build rather than corrupting a command.
//! Nothing in this crate allocates, performs IO or can panic on input bytes:
//! decoders take `&[u8]` and return `Result`.
#![forbid(unsafe_code)]

pub mod cmd;
pub mod error;
pub mod fabrics;
pub mod features;
pub mod identify;
pub mod log;
pub mod opcode;
pub mod regs;
pub mod reservation;
pub mod status;
pub mod text;

pub use cmd::{Cqe, Dptr, SglDescriptor, SglKind, Sqe};
pub use error::SpecError;
pub use opcode::{AdminOpcode, FabricsCommandType, IoOpcode};
pub use status::Status;

/// Little-endian field types used by every layout in this crate.
pub use zerocopy::little_endian::{U128, U16, U32, U64};
