//! Fixed-size text fields: space-padded ASCII (serial number, model,
//! firmware revision, transport service id) and NUL-padded NQNs.

use crate::error::SpecError;

/// Size of every NQN field in commands and log pages.
pub const NQN_FIELD_LEN: usize = 256;
/// Longest NQN the spec allows, in bytes; the field always keeps a NUL.
pub const NQN_MAX_LEN: usize = 223;
/// The well-known NQN of a discovery subsystem.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// Writes `text` left-justified into `field` and pads with spaces, as the
/// identify strings require. Only printable ASCII (0x20..=0x7E) is allowed.
pub fn write_ascii_padded(field: &mut [u8], text: &str) -> Result<(), SpecError> {
    let bytes = text.as_bytes();
    if bytes.len() > field.len() {
        return Err(SpecError::TextTooLong { len: bytes.len(), max: field.len() });
    }
    if let Some((offset, &byte)) = bytes.iter().enumerate().find(|(_, b)| !(0x20..=0x7E).contains(*b)) {
        return Err(SpecError::BadText { offset, byte });
    }
    let (head, tail) = field.split_at_mut(bytes.len());
    head.copy_from_slice(bytes);
    tail.fill(b' ');
    Ok(())
}

/// Reads a space-padded ASCII field, trailing spaces (and NULs, which some
/// devices use instead) removed. Fails on any byte that is not printable ASCII.
pub fn read_ascii_padded(field: &[u8]) -> Result<&str, SpecError> {
    let end = field.iter().rposition(|&b| b != b' ' && b != 0).map_or(0, |i| i + 1);
    let text = &field[..end];
    if let Some((offset, &byte)) = text.iter().enumerate().find(|(_, b)| !(0x20..=0x7E).contains(*b)) {
        return Err(SpecError::BadText { offset, byte });
    }
    // Printable ASCII is always valid UTF-8.
    core::str::from_utf8(text).map_err(|e| SpecError::BadText {
        offset: e.valid_up_to(),
        byte: text.get(e.valid_up_to()).copied().unwrap_or(0),
    })
}

/// Writes an NQN into its field, NUL-padded. The NQN must be 1..=223 bytes
/// of UTF-8 without NUL, so the field is always NUL-terminated.
pub fn write_nqn(field: &mut [u8], nqn: &str) -> Result<(), SpecError> {
    let bytes = nqn.as_bytes();
    let max = NQN_MAX_LEN.min(field.len().saturating_sub(1));
    if bytes.len() > max {
        return Err(SpecError::TextTooLong { len: bytes.len(), max });
    }
    if let Some(offset) = bytes.iter().position(|&b| b == 0) {
        return Err(SpecError::BadText { offset, byte: 0 });
    }
    let (head, tail) = field.split_at_mut(bytes.len());
    head.copy_from_slice(bytes);
    tail.fill(0);
    Ok(())
}

/// Reads a NUL-terminated NQN. A field without a NUL within the first 224
/// bytes, or that is not UTF-8, is rejected: both come from a broken or
/// hostile peer.
pub fn read_nqn(field: &[u8]) -> Result<&str, SpecError> {
    let limit = field.len().min(NQN_MAX_LEN + 1);
    let Some(len) = field[..limit].iter().position(|&b| b == 0) else {
        return Err(SpecError::TextTooLong { len: field.len(), max: NQN_MAX_LEN });
    };
    let text = &field[..len];
    core::str::from_utf8(text).map_err(|e| SpecError::BadText {
        offset: e.valid_up_to(),
        byte: text.get(e.valid_up_to()).copied().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ascii_is_space_padded() {
        let mut sn = [0u8; 20];
        write_ascii_padded(&mut sn, "NVRAID0001").unwrap();
        assert_eq!(&sn, b"NVRAID0001          ");
        assert_eq!(read_ascii_padded(&sn).unwrap(), "NVRAID0001");
        assert!(matches!(
            write_ascii_padded(&mut sn, "x".repeat(21).as_str()),
            Err(SpecError::TextTooLong { len: 21, max: 20 })
        ));
        assert!(matches!(write_ascii_padded(&mut sn, "tab\there"), Err(SpecError::BadText { offset: 3, byte: 9 })));
    }

    #[test]
    fn nqn_is_nul_padded_and_terminated() {
        let mut f = [0xAAu8; NQN_FIELD_LEN];
        write_nqn(&mut f, DISCOVERY_NQN).unwrap();
        assert_eq!(&f[..DISCOVERY_NQN.len()], DISCOVERY_NQN.as_bytes());
        assert!(f[DISCOVERY_NQN.len()..].iter().all(|&b| b == 0));
        assert_eq!(read_nqn(&f).unwrap(), DISCOVERY_NQN);
        assert!(write_nqn(&mut f, &"n".repeat(224)).is_err());
        write_nqn(&mut f, &"n".repeat(223)).unwrap();
        assert_eq!(read_nqn(&f).unwrap().len(), 223);
        // No terminator within 224 bytes.
        assert!(read_nqn(&[b'a'; NQN_FIELD_LEN]).is_err());
    }

    proptest! {
        #[test]
        fn readers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = read_nqn(&bytes);
            let _ = read_ascii_padded(&bytes);
        }
    }
}
