//! Checks of the tree itself (see `tests/`): the crate layering and the
//! unsafe discipline that docs/architecture.md describes.
#![forbid(unsafe_code)]

/// Which workspace crates each crate may depend on (docs/architecture.md, "Layers and
/// crates"; `nvme-spec` is a leaf shared by the two NVMe transports so that
/// neither depends on the other).
pub const ALLOWED: &[(&str, &[&str])] = &[
    ("reactor", &[]),
    ("bdev", &["reactor"]),
    ("nvme-spec", &[]),
    ("parity", &[]),
    ("nvme", &["reactor", "bdev", "nvme-spec"]),
    ("bitmap", &["reactor", "bdev"]),
    ("bdev-raid", &["reactor", "bdev", "bitmap", "parity"]),
    ("sock", &["reactor", "bdev"]),
    ("nvmf", &["reactor", "bdev", "nvme-spec", "sock"]),
    ("iscsi", &["reactor", "bdev", "sock"]),
    ("mgmt", &["reactor", "bdev", "nvme-spec", "nvme", "bitmap", "bdev-raid", "nvmf", "iscsi"]),
    // The daemon's tests speak NVMe commands to it (reservations), so they
    // use the wire layouts of the leaf `nvme-spec`.
    ("daemon", &["mgmt", "nvme-spec"]),
    ("perf", &["mgmt"]),
    ("tidy", &[]),
];

/// Crates allowed to contain `unsafe` (docs/architecture.md, "Unsafe code"); all others must say
/// `#![forbid(unsafe_code)]`.
pub const UNSAFE_ALLOWED: &[&str] = &["reactor", "bdev", "nvme", "parity"];
