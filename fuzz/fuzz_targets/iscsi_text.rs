//! Fuzz target for iSCSI text (`iscsi::text`) and the negotiation of one
//! login request's keys against the target's default offer: parsed text
//! re-encodes to text that parses to the same pairs; the answer the target
//! builds always parses, answers only keys it was sent, once each, with a
//! value the key allows; the negotiated parameters stay within RFC 7143's
//! ranges; CHAP binary values decode to bytes that survive the hex round
//! trip.
//!
//! Byte 0 picks the mode (bit 0 discovery session, bit 1 and 2 header and
//! data digests required, bit 7 structured). Raw mode parses the rest as a
//! data segment. Structured mode builds the request from (key, value) items
//! over the keys a login knows, so the negotiation is reached: each item is
//! a key index byte, a length byte and that many value bytes (a value byte
//! below 8 picks a well-formed value, so numbers and Yes/No are common).
#![no_main]

use iscsi::chap::{decode_binary, encode_hex};
use iscsi::fuzzing::target_offer;
use iscsi::text::{negotiate, parse, push, KeyOutcome, SessionParams, TargetOffer};
use iscsi::IscsiOpts;
use libfuzzer_sys::fuzz_target;

const KEYS: &[&str] = &[
    "HeaderDigest",
    "DataDigest",
    "MaxRecvDataSegmentLength",
    "MaxBurstLength",
    "FirstBurstLength",
    "MaxOutstandingR2T",
    "MaxConnections",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "InitialR2T",
    "ImmediateData",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "ErrorRecoveryLevel",
    "IFMarker",
    "OFMarker",
    "OFMarkInt",
    "IFMarkInt",
    "InitiatorName",
    "InitiatorAlias",
    "TargetName",
    "SessionType",
    "TargetAlias",
    "TargetAddress",
    "TargetPortalGroupTag",
    "RDMAExtensions",
    "TaskReporting",
    "iSCSIProtocolLevel",
    "AuthMethod",
    "CHAP_A",
    "CHAP_N",
    "CHAP_R",
    "CHAP_I",
    "CHAP_C",
    "X-com.example.vendor",
    "X#private",
];

const VALUES: &[&str] = &["Yes", "No", "CRC32C,None", "None", "512", "16777215", "0x1000", "0bAQID"];

const MAX24: u32 = (1 << 24) - 1;

/// The range a numeric key's value must lie in (RFC 7143 13).
fn numeric_range(key: &str) -> Option<(u32, u32)> {
    Some(match key {
        "MaxRecvDataSegmentLength" | "MaxBurstLength" | "FirstBurstLength" => (512, MAX24),
        "MaxOutstandingR2T" | "MaxConnections" => (1, 65535),
        "DefaultTime2Wait" | "DefaultTime2Retain" => (0, 3600),
        "ErrorRecoveryLevel" => (0, 2),
        _ => return None,
    })
}

fn build_request(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    while let [key, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (value, next) = tail.split_at(n);
        rest = next;
        let key = KEYS[usize::from(*key) % KEYS.len()];
        let value = match value {
            [v] if *v < 8 => VALUES[usize::from(*v)].as_bytes().to_vec(),
            _ => value.to_vec(),
        };
        out.extend_from_slice(key.as_bytes());
        out.push(b'=');
        out.extend_from_slice(&value);
        out.push(0);
    }
    out
}

/// What a target may answer to `key=value`.
fn check_answer(key: &str, value: &str, answer: &str, offer: &TargetOffer, p: &SessionParams) {
    let n: Option<u32> = answer.parse().ok();
    match key {
        "HeaderDigest" | "DataDigest" => {
            assert!(matches!(answer, "CRC32C" | "None"), "{key}={answer}");
            assert!(value.split(',').any(|c| c == answer), "{key}: answered {answer} to {value}");
            let required = if key == "HeaderDigest" { offer.require_header_digest } else { offer.require_data_digest };
            assert!(!required || answer == "CRC32C", "{key}: a required digest answered None");
        }
        "MaxBurstLength" | "FirstBurstLength" | "MaxOutstandingR2T" | "MaxConnections" | "DefaultTime2Retain" => {
            let (lo, hi) = numeric_range(key).unwrap();
            let n = n.unwrap_or_else(|| panic!("{key}={answer} is not a number"));
            assert!(n >= lo && n <= hi, "{key}={n} outside {lo}..={hi}");
            // Min-functions: never more than the initiator asked.
            let asked = parse_number(value).unwrap();
            assert!(u64::from(n) <= asked, "{key}: answered {n} to {asked}");
        }
        "DefaultTime2Wait" => {
            let n = n.unwrap_or_else(|| panic!("{key}={answer} is not a number"));
            assert!(n <= 3600 && u64::from(n) >= parse_number(value).unwrap(), "{key}: answered {n} to {value}");
        }
        "ErrorRecoveryLevel" => assert_eq!(answer, "0"),
        "InitialR2T" | "ImmediateData" | "DataPDUInOrder" | "DataSequenceInOrder" | "IFMarker" | "OFMarker" => {
            assert!(matches!(answer, "Yes" | "No"), "{key}={answer}");
            // OR-functions answer Yes to Yes, AND-functions No to No.
            if matches!(key, "InitialR2T" | "DataPDUInOrder" | "DataSequenceInOrder") && value == "Yes" {
                assert_eq!(answer, "Yes", "{key}");
            }
            if matches!(key, "ImmediateData" | "IFMarker" | "OFMarker") && value == "No" {
                assert_eq!(answer, "No", "{key}");
            }
        }
        "RDMAExtensions" => assert_eq!(answer, "No"),
        "TaskReporting" => assert_eq!(answer, "RFC3720"),
        "iSCSIProtocolLevel" => assert_eq!(answer, "0"),
        _ => panic!("{key} answered {answer}"),
    }
    let _ = p;
}

fn parse_number(v: &str) -> Option<u64> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// One login request's keys negotiated as the login does; returns the answer text.
fn negotiate_request(pairs: &[(String, String)], offer: &TargetOffer, discovery: bool) -> (Vec<u8>, SessionParams) {
    let mut p = SessionParams::rfc_defaults();
    let mut out = Vec::new();
    for (k, v) in pairs {
        if matches!(k.as_str(), "InitiatorName" | "SessionType" | "TargetName" | "InitiatorAlias") {
            continue;
        }
        if k == "AuthMethod" || k.starts_with("CHAP_") {
            if let Some(bytes) = decode_binary(v) {
                assert!(!bytes.is_empty(), "{k}: a binary value decoded to nothing");
                assert_eq!(decode_binary(&encode_hex(&bytes)).as_deref(), Some(&bytes[..]), "hex round trip");
            }
            continue;
        }
        let before = p.clone();
        match negotiate(k, v, offer, discovery, &mut p) {
            KeyOutcome::Answer(a) => {
                check_answer(k, v, &a, offer, &p);
                push(&mut out, k, &a);
            }
            KeyOutcome::Silent => {}
            KeyOutcome::Irrelevant => push(&mut out, k, "Irrelevant"),
            KeyOutcome::NotUnderstood => push(&mut out, k, "NotUnderstood"),
            KeyOutcome::Reject => {
                assert_eq!(p, before, "{k}={v}: a rejected value changed the parameters");
                push(&mut out, k, "Reject");
            }
            KeyOutcome::Violation(why) => {
                assert!(!why.is_empty());
                // The login fails here: nothing more is answered.
                return (out, p);
            }
        }
    }
    (out, p)
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, body)) = input.split_first() else {
        return;
    };
    let discovery = mode & 0x01 != 0;
    let offer = target_offer(&IscsiOpts::default(), mode & 0x02 != 0, mode & 0x04 != 0);
    let text = if mode & 0x80 != 0 { build_request(body) } else { body.to_vec() };
    let Ok(pairs) = parse(&text) else {
        return;
    };
    // What parsed re-encodes to text that parses to the same pairs.
    let mut again = Vec::new();
    for (k, v) in &pairs {
        assert!(!k.is_empty() && k.len() <= 63 && !k.contains('='), "key {k:?}");
        assert!(!v.contains('\0'), "value of {k} holds a NUL");
        push(&mut again, k, v);
    }
    assert_eq!(parse(&again).as_ref(), Ok(&pairs), "parsed text does not re-encode to itself");

    let (answer, p) = negotiate_request(&pairs, &offer, discovery);
    let answered = parse(&answer).unwrap_or_else(|e| panic!("the target's answer is not valid text: {e}"));
    for (k, v) in &answered {
        assert!(pairs.iter().any(|(q, _)| q == k), "answered {k}, which was not asked");
        assert!(!v.is_empty(), "empty answer to {k}");
    }
    for (key, got) in [
        ("MaxRecvDataSegmentLength", p.initiator_max_recv),
        ("MaxBurstLength", p.max_burst_length),
        ("FirstBurstLength", p.first_burst_length),
        ("MaxOutstandingR2T", p.max_outstanding_r2t),
        ("MaxConnections", p.max_connections),
        ("DefaultTime2Wait", p.default_time2wait),
        ("DefaultTime2Retain", p.default_time2retain),
    ] {
        let (lo, hi) = numeric_range(key).unwrap();
        assert!(got >= lo && got <= hi, "negotiated {key}={got} outside {lo}..={hi}");
    }
    if !discovery {
        assert!(p.max_burst_length <= offer.max_burst_length && p.max_outstanding_r2t <= offer.max_outstanding_r2t);
        assert!(p.max_connections <= offer.max_connections.max(1));
    }
});
