//! Synchronisation primitives that switch to loom's under `--cfg loom`, so the
//! cross-thread protocols of this crate (message delivery, wake-up) are checked.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, Ordering};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, Ordering};
