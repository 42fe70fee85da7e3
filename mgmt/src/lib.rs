//! JSON-RPC management with SPDK's method names, parameters and errors, so
//! SPDK's own Python client drives nvraid unchanged; config load and save.
#![forbid(unsafe_code)]

pub mod config;
pub mod jsonrpc;
pub mod methods;
pub mod server;

pub use methods::{Ctx, MethodTable};

// The layers below, for the daemon and tools that sit on top of mgmt only.
pub use bdev;
pub use nvmf;
pub use reactor;
