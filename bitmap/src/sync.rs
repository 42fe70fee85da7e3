//! The atomics of the batch protocol, switched to loom's under `--cfg loom`
//! so `tests/loom_batch.rs` model-checks the real `Bitmap` and `Planner`.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
