//! Per-core polling reactors.
