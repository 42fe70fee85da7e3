//! Per-core polling reactors: one thread per core of a core mask, each looping
//! over its message ring and its pollers, with an explicit idle policy.
//!
//! State is owned by one reactor and reached by others only through messages
//! (see `ring`), which keeps every data path free of locks.
// Unsafe code is denied everywhere but the TSC reader (one intrinsic) and
// interrupt mode's eventfd and ppoll calls.
#![deny(unsafe_code)]

mod clock;
#[allow(unsafe_code)]
mod interrupt;
mod reactor;
mod ring;
mod set;
mod sync;
#[allow(unsafe_code)]
pub mod tsc;
mod wake;

pub use clock::Clock;
pub use interrupt::EventFd;
pub use reactor::{
    count, current, current_uid, for_each_reactor, global, interrupts_enabled, local, now_ns, poller_names,
    register_interrupt_poller, register_local_work_poller, register_poller, register_timed_poller, send, send_raw,
    stopping, IdlePolicy, Message, PollStatus, PollerHandle, ReactorId, MSG_BATCH,
};
pub use ring::Ring;
pub use set::{
    parse_core_mask, CoreMaskError, ManualSet, ReactorConfig, ReactorSet, ReactorStats, DEFAULT_RING_CAPACITY,
};
pub use wake::WakeFlag;
