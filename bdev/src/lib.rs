//! Block devices.
