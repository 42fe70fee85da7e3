//! Text keys (RFC 7143 6 and 13): parsing `key=value\0` data segments and
//! the operational parameter negotiation of a login.
//!
//! Login and Text exchanges are control path: these allocate freely.

/// A parsed text data segment, in order.
pub type Pairs = Vec<(String, String)>;

/// Longest key (RFC 7143 6.1: 63 bytes).
const MAX_KEY_LEN: usize = 63;
/// Longest value accepted (CHAP challenges in hex run longest).
const MAX_VALUE_LEN: usize = 8192;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("text item without '=': {0:?}")]
    NoEquals(String),
    #[error("key '{0}' is empty, too long or not ASCII")]
    BadKey(String),
    #[error("value of '{0}' is too long")]
    LongValue(String),
    #[error("key '{0}' sent twice")]
    Duplicate(String),
    #[error("text is not UTF-8")]
    NotUtf8,
}

/// Parses `key=value` items separated by NULs (a trailing NUL is optional;
/// empty items from padding are skipped).
pub fn parse(data: &[u8]) -> Result<Pairs, TextError> {
    let mut out: Pairs = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(item).map_err(|_| TextError::NotUtf8)?;
        let (k, v) = s.split_once('=').ok_or_else(|| TextError::NoEquals(s.to_string()))?;
        if k.is_empty() || k.len() > MAX_KEY_LEN || !k.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TextError::BadKey(k.to_string()));
        }
        if v.len() > MAX_VALUE_LEN {
            return Err(TextError::LongValue(k.to_string()));
        }
        if out.iter().any(|(o, _)| o == k) {
            return Err(TextError::Duplicate(k.to_string()));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Appends `key=value\0`.
pub fn push(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// The session's operational parameters, as negotiated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionParams {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The initiator's MaxRecvDataSegmentLength: the most data the target
    /// puts in one PDU it sends.
    pub initiator_max_recv: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub max_connections: u32,
}

impl SessionParams {
    /// RFC 7143 defaults (what holds for a key nobody negotiated).
    pub fn rfc_defaults() -> Self {
        SessionParams {
            header_digest: false,
            data_digest: false,
            initiator_max_recv: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            default_time2wait: 2,
            default_time2retain: 20,
            max_connections: 1,
        }
    }
}

/// What the target offers (from the target options and the target node).
#[derive(Clone, Debug)]
pub struct TargetOffer {
    /// The target's MaxRecvDataSegmentLength (declared to the initiator).
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    /// false: the target accepts unsolicited Data-Out (the initiator decides).
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub max_connections: u32,
    /// Digests this target node requires (otherwise offered, not required).
    pub require_header_digest: bool,
    pub require_data_digest: bool,
}

/// Keys of the login's operational stage and how each is negotiated.
pub enum KeyOutcome {
    /// Answer `key=value`.
    Answer(String),
    /// A declarative key: nothing to answer.
    Silent,
    /// The key is not allowed now (answered `Irrelevant`).
    Irrelevant,
    /// Unknown key (answered `NotUnderstood`).
    NotUnderstood,
    /// A value outside the key's range (answered `Reject`).
    Reject,
    /// The initiator broke the protocol (login fails, initiator error).
    Violation(String),
}

fn num(v: &str, lo: u32, hi: u32) -> Option<u32> {
    let n: u64 = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else {
        v.parse().ok()?
    };
    (n >= u64::from(lo) && n <= u64::from(hi)).then_some(n as u32)
}

fn boolean(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yn(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// The first of the initiator's digest choices this target accepts.
fn pick_digest(v: &str, required: bool) -> Option<bool> {
    for c in v.split(',') {
        match c {
            "CRC32C" => return Some(true),
            "None" if !required => return Some(false),
            _ => {}
        }
    }
    None
}

/// Negotiates one operational key into `p`. `discovery`: a discovery
/// session, where session-wide data keys are irrelevant.
pub fn negotiate(key: &str, value: &str, offer: &TargetOffer, discovery: bool, p: &mut SessionParams) -> KeyOutcome {
    const MAX24: u32 = (1 << 24) - 1;
    if value == "NotUnderstood" || value == "Irrelevant" || value == "Reject" {
        return KeyOutcome::Silent;
    }
    let data_key = matches!(
        key,
        "MaxConnections"
            | "InitialR2T"
            | "ImmediateData"
            | "MaxBurstLength"
            | "FirstBurstLength"
            | "MaxOutstandingR2T"
            | "DataPDUInOrder"
            | "DataSequenceInOrder"
    );
    if discovery && data_key {
        return KeyOutcome::Irrelevant;
    }
    match key {
        "HeaderDigest" => match pick_digest(value, offer.require_header_digest) {
            Some(on) => {
                p.header_digest = on;
                KeyOutcome::Answer(if on { "CRC32C" } else { "None" }.into())
            }
            None => KeyOutcome::Reject,
        },
        "DataDigest" => match pick_digest(value, offer.require_data_digest) {
            Some(on) => {
                p.data_digest = on;
                KeyOutcome::Answer(if on { "CRC32C" } else { "None" }.into())
            }
            None => KeyOutcome::Reject,
        },
        "MaxRecvDataSegmentLength" => match num(value, 512, MAX24) {
            Some(n) => {
                p.initiator_max_recv = n;
                KeyOutcome::Silent
            }
            None => KeyOutcome::Reject,
        },
        "MaxBurstLength" => match num(value, 512, MAX24) {
            Some(n) => {
                p.max_burst_length = n.min(offer.max_burst_length);
                // RFC 7143 13.14: FirstBurstLength never exceeds it (the
                // default 65536 would, under a small MaxBurstLength).
                p.first_burst_length = p.first_burst_length.min(p.max_burst_length);
                KeyOutcome::Answer(p.max_burst_length.to_string())
            }
            None => KeyOutcome::Reject,
        },
        "FirstBurstLength" => match num(value, 512, MAX24) {
            Some(n) => {
                p.first_burst_length = n.min(offer.first_burst_length).min(p.max_burst_length);
                KeyOutcome::Answer(p.first_burst_length.to_string())
            }
            None => KeyOutcome::Reject,
        },
        "MaxOutstandingR2T" => match num(value, 1, 65535) {
            Some(n) => {
                p.max_outstanding_r2t = n.min(offer.max_outstanding_r2t);
                KeyOutcome::Answer(p.max_outstanding_r2t.to_string())
            }
            None => KeyOutcome::Reject,
        },
        "MaxConnections" => match num(value, 1, 65535) {
            Some(n) => {
                p.max_connections = n.min(offer.max_connections);
                KeyOutcome::Answer(p.max_connections.to_string())
            }
            None => KeyOutcome::Reject,
        },
        "DefaultTime2Wait" => match num(value, 0, 3600) {
            Some(n) => {
                p.default_time2wait = n.max(offer.default_time2wait);
                KeyOutcome::Answer(p.default_time2wait.to_string())
            }
            None => KeyOutcome::Reject,
        },
        "DefaultTime2Retain" => match num(value, 0, 3600) {
            Some(n) => {
                p.default_time2retain = n.min(offer.default_time2retain);
                KeyOutcome::Answer(p.default_time2retain.to_string())
            }
            None => KeyOutcome::Reject,
        },
        // OR: the result is Yes if either side says Yes.
        "InitialR2T" => match boolean(value) {
            Some(b) => {
                p.initial_r2t = b || offer.initial_r2t;
                KeyOutcome::Answer(yn(p.initial_r2t))
            }
            None => KeyOutcome::Reject,
        },
        // AND.
        "ImmediateData" => match boolean(value) {
            Some(b) => {
                p.immediate_data = b && offer.immediate_data;
                KeyOutcome::Answer(yn(p.immediate_data))
            }
            None => KeyOutcome::Reject,
        },
        // OR with the target's Yes: data arrives in order, always.
        "DataPDUInOrder" | "DataSequenceInOrder" => match boolean(value) {
            Some(_) => KeyOutcome::Answer(yn(true)),
            None => KeyOutcome::Reject,
        },
        // Only level 0 is implemented; min(initiator, 0) = 0.
        "ErrorRecoveryLevel" => match num(value, 0, 2) {
            Some(_) => KeyOutcome::Answer("0".into()),
            None => KeyOutcome::Reject,
        },
        // Markers (RFC 7143 dropped them; AND with No).
        "IFMarker" | "OFMarker" => match boolean(value) {
            Some(_) => KeyOutcome::Answer(yn(false)),
            None => KeyOutcome::Reject,
        },
        "OFMarkInt" | "IFMarkInt" => KeyOutcome::Irrelevant,
        // Declarative keys of the security stage may repeat in operational.
        "InitiatorName" | "InitiatorAlias" | "TargetName" | "SessionType" => KeyOutcome::Silent,
        "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => {
            KeyOutcome::Violation(format!("{key} is sent only by targets"))
        }
        // iSER and RFC 7143 extensions nvraid does not implement.
        "RDMAExtensions" => KeyOutcome::Answer("No".into()),
        "TaskReporting" => KeyOutcome::Answer("RFC3720".into()),
        "iSCSIProtocolLevel" => KeyOutcome::Answer("0".into()),
        // Unknown keys, vendor (X-) and private (X#) ones included.
        _ => KeyOutcome::NotUnderstood,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> TargetOffer {
        TargetOffer {
            max_recv_data_segment_length: 65536,
            max_burst_length: 262_144,
            first_burst_length: 8192,
            initial_r2t: false,
            immediate_data: true,
            max_outstanding_r2t: 4,
            default_time2wait: 2,
            default_time2retain: 20,
            max_connections: 1,
            require_header_digest: false,
            require_data_digest: false,
        }
    }

    fn answer(k: &str, v: &str, p: &mut SessionParams) -> String {
        match negotiate(k, v, &offer(), false, p) {
            KeyOutcome::Answer(a) => a,
            _ => panic!("{k} not answered"),
        }
    }

    #[test]
    fn parses_items_and_refuses_malformed_ones() {
        let p = parse(b"InitiatorName=iqn.x\0SessionType=Normal\0\0\0").unwrap();
        assert_eq!(p, vec![("InitiatorName".into(), "iqn.x".into()), ("SessionType".into(), "Normal".into())]);
        assert!(matches!(parse(b"novalue\0"), Err(TextError::NoEquals(_))));
        assert!(matches!(parse(b"A=1\0A=2\0"), Err(TextError::Duplicate(_))));
        assert!(matches!(parse(b"=x\0"), Err(TextError::BadKey(_))));
        assert!(matches!(parse(&[b'A', b'=', 0xff, 0]), Err(TextError::NotUtf8)));
    }

    #[test]
    fn numeric_keys_take_min_or_max_and_booleans_and_or() {
        let mut p = SessionParams::rfc_defaults();
        assert_eq!(answer("MaxBurstLength", "16776192", &mut p), "262144");
        assert_eq!(answer("FirstBurstLength", "4096", &mut p), "4096");
        // FirstBurstLength never exceeds MaxBurstLength (found by the
        // iscsi_text fuzz target): answered below it, default clipped.
        let mut q = SessionParams::rfc_defaults();
        assert_eq!(answer("MaxBurstLength", "512", &mut q), "512");
        assert_eq!(q.first_burst_length, 512, "the default first burst is clipped");
        assert_eq!(answer("FirstBurstLength", "65536", &mut q), "512");
        assert_eq!(answer("MaxOutstandingR2T", "16", &mut p), "4");
        assert_eq!(answer("DefaultTime2Wait", "0", &mut p), "2");
        assert_eq!(answer("DefaultTime2Retain", "0", &mut p), "0");
        assert_eq!(answer("InitialR2T", "No", &mut p), "No");
        assert!(!p.initial_r2t);
        assert_eq!(answer("ImmediateData", "No", &mut p), "No");
        assert_eq!(answer("ErrorRecoveryLevel", "2", &mut p), "0");
        assert_eq!(answer("HeaderDigest", "CRC32C,None", &mut p), "CRC32C");
        assert!(p.header_digest);
        assert_eq!(answer("DataDigest", "None", &mut p), "None");
        assert!(matches!(negotiate("MaxRecvDataSegmentLength", "100", &offer(), false, &mut p), KeyOutcome::Reject));
        assert!(matches!(negotiate("MaxBurstLength", "abc", &offer(), false, &mut p), KeyOutcome::Reject));
        assert!(matches!(negotiate("HeaderDigest", "MD5", &offer(), false, &mut p), KeyOutcome::Reject));
        assert!(matches!(negotiate("Foo", "1", &offer(), false, &mut p), KeyOutcome::NotUnderstood));
        assert!(matches!(negotiate("MaxBurstLength", "512", &offer(), true, &mut p), KeyOutcome::Irrelevant));
        assert!(matches!(negotiate("TargetAlias", "x", &offer(), false, &mut p), KeyOutcome::Violation(_)));
    }

    proptest::proptest! {
        #[test]
        fn parsing_and_negotiating_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            text in "((HeaderDigest|DataDigest|MaxBurstLength|FirstBurstLength|MaxRecvDataSegmentLength|InitialR2T|ImmediateData|MaxOutstandingR2T|ErrorRecoveryLevel|DefaultTime2Wait|X-[a-z]{1,4})=(Yes|No|None|CRC32C|0x[0-9a-f]{0,9}|[0-9]{0,10}|[ -~]{0,12})\u{0}){0,8}",
        ) {
            let _ = parse(&bytes);
            if let Ok(pairs) = parse(text.as_bytes()) {
                let mut p = SessionParams::rfc_defaults();
                for (k, v) in &pairs {
                    let _ = negotiate(k, v, &offer(), false, &mut p);
                    let _ = crate::chap::decode_binary(v);
                }
            }
        }
    }

    #[test]
    fn a_required_digest_refuses_none() {
        let mut o = offer();
        o.require_data_digest = true;
        let mut p = SessionParams::rfc_defaults();
        assert!(matches!(negotiate("DataDigest", "None", &o, false, &mut p), KeyOutcome::Reject));
        assert!(
            matches!(negotiate("DataDigest", "None,CRC32C", &o, false, &mut p), KeyOutcome::Answer(ref a) if a == "CRC32C")
        );
    }
}
