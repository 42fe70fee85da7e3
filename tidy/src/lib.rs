//! Checks of the tree itself (see `tests/`): crate layering as DESIGN.md
//! allows it, and the unsafe discipline of STYLE.md.
#![forbid(unsafe_code)]

/// Which workspace crates each crate may depend on (DESIGN.md "Layers and
/// crates"; `nvme-spec` is a leaf shared by the two NVMe transports so that
/// neither depends on the other).
pub const ALLOWED: &[(&str, &[&str])] = &[
    ("reactor", &[]),
    ("bdev", &["reactor"]),
    ("nvme-spec", &[]),
    ("nvme", &["reactor", "bdev", "nvme-spec"]),
    ("bitmap", &["reactor", "bdev"]),
    ("bdev-raid", &["reactor", "bdev", "bitmap"]),
    ("nvmf", &["reactor", "bdev", "nvme-spec"]),
    ("iscsi", &["reactor", "bdev"]),
    ("mgmt", &["reactor", "bdev", "nvme-spec", "nvme", "bitmap", "bdev-raid", "nvmf", "iscsi"]),
    ("daemon", &["mgmt"]),
    ("perf", &["mgmt"]),
    ("tidy", &[]),
];

/// Crates allowed to contain `unsafe` (STYLE.md §3); all others must say
/// `#![forbid(unsafe_code)]`.
pub const UNSAFE_ALLOWED: &[&str] = &["bdev", "nvme"];
