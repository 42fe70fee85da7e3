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

/// Module set-up that must run on a reactor before any bdev is created
/// (the RAID examiner, so arrays with superblocks assemble from the config's
/// bdevs).
pub fn init_modules() {
    bdev_raid::init();
}
