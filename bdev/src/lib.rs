//! Block devices: the `Bdev` trait and its per-reactor channels, pooled IO
//! descriptors with deferred completion, DMA-able buffers, the registry, IO
//! statistics, and the simple backends (malloc, null, io_uring file, error
//! injection, delay), and a volatile-cache model with a power switch for
//! durability tests.
//!
//! `unsafe` lives only in `dma` (raw buffer memory) and
//! `uring` (buffers handed to the kernel, ioctl/statx on the file), each
//! block with its SAFETY note.

pub mod channel;
pub mod delay;
pub mod dma;
pub mod error;
pub mod histogram;
pub mod io;
pub mod malloc;
pub mod qos;
pub mod registry;
pub mod rng;
pub mod stamp;
pub mod tsc;
pub mod uring;
pub mod volatile_cache;

pub use channel::{Bdev, BdevChannel, BdevProps, Channel, ChannelStats, IoErrorCounts, IoStatTotals};
pub use dma::DmaBuf;
pub use io::{drain_completions, BdevIo, IoBox, IoDone, IoError, IoFlags, IoSlab, IoStatus, IoType};
pub use registry::{BdevEvent, BdevHandle, ExamineHold, ListenerId, Registry};

/// Errors of bdev management (creation, lookup, claims); IO errors travel
/// in `IoStatus` instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BdevError {
    #[error("bdev {0} already exists")]
    Exists(String),
    #[error("bdev {0} not found")]
    NotFound(String),
    #[error("bdev {0} is claimed by {1}")]
    Claimed(String, String),
    #[error("{0}")]
    Invalid(String),
    #[error("out of memory: {0}")]
    NoMemory(String),
    #[error("{0}")]
    Os(String, i32),
}

impl BdevError {
    /// The positive errno SPDK reports for this error (RPC codes are its negation).
    pub fn errno(&self) -> i32 {
        match self {
            BdevError::Exists(_) => libc::EEXIST,
            BdevError::NotFound(_) => libc::ENODEV,
            BdevError::Claimed(..) => libc::EBUSY,
            BdevError::Invalid(_) => libc::EINVAL,
            BdevError::NoMemory(_) => libc::ENOMEM,
            BdevError::Os(_, e) => *e,
        }
    }
}
