//! The RAID bdev: raid0, raid1 (N-way), raid10 (md's near-2 layout),
//! concat, raid5 (md's left-symmetric layout; SPDK's `raid5f` name
//! accepted, any write size) and raid6 (md's level 6 layout, P and Q, any
//! two members lost) over any bdevs, itself a bdev (product "Raid Volume") that can be
//! exported, benchmarked or used as a member of another array.
//!
//! Data-safety machinery from Linux md, on a polled, lock-free data path:
//! - array-level write serialization (invariant 1, docs/architecture.md): overlapping
//!   write-like IO from any reactor is ordered once, at the array's owner
//!   reactor, before fan-out (`range_table`, `owner`, `channel`);
//! - degraded mode: a member IO error latches the member failed, reads retry
//!   on another copy, writes succeed when every surviving copy wrote them;
//! - fenced reconfiguration and teardown (invariants 3 and 4): suspend holds
//!   new IO, drains in-flight IO on every reactor, runs the change, resumes
//!   the held IO in order (`quiesce`, `owner`);
//! - rebuild of a re-added raid1/raid10 member while IO continues (`rebuild`);
//! - durability on members with volatile write caches: every member write
//!   of a FUA write is FUA, a flush reaches every member that takes writes
//!   and completes after all, and superblock and bitmap writes are flushed
//!   ahead and FUA themselves (`channel`, `meta`, the `bitmap` crate);
//! - abort of IO the array still holds (suspend, bitmap batch, range lock),
//!   and states believed impossible counted (`impossible_events`) and
//!   answered with an error, never left hanging (`channel`).
//!
//! Each level is a module behind one trait (`level`: `RaidLevel`, shaped
//! like SPDK's `raid_bdev_module`; one file per level); the array core
//! above knows no level by name. `map` holds the level-neutral geometry;
//! `rpc` the SPDK methods.
#![forbid(unsafe_code)]

mod array;
pub mod assemble;
mod channel;
mod examine;
pub mod level;
pub mod map;
mod meta;
mod owner;
pub mod ppl;
pub mod quiesce;
pub mod range_table;
mod rebuild;
mod resize;
pub mod rpc;
pub mod superblock;

pub use array::{init, RaidArray, RaidOptions, RaidState};
pub use level::{Level, RaidLevel};
pub use map::Geometry;
