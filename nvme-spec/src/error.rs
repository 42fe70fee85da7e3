//! The one error type of this crate: why bytes could not be decoded or a
//! value could not be encoded into a fixed-size field.

use thiserror::Error;

/// Why an NVMe structure could not be decoded or encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SpecError {
    /// The input or output buffer is shorter than the structure needs.
    #[error("buffer too short: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    /// A text value does not fit its fixed-size field.
    #[error("text of {len} bytes does not fit a field of {max} bytes")]
    TextTooLong { len: usize, max: usize },
    /// A text field holds a byte its encoding does not allow.
    #[error("byte {byte:#04x} at offset {offset} is not allowed in this text field")]
    BadText { offset: usize, byte: u8 },
    /// A descriptor's length does not match what its type requires.
    #[error("descriptor type {kind:#04x} at offset {offset} has length {len}, expected {expected}")]
    BadDescriptorLength { offset: usize, kind: u8, len: usize, expected: usize },
}
