//! Parameters SPDK defines for features nvraid does not have (DIF,
//! named targets, other socket layers, ...).
//!
//! Each is accepted only at SPDK's default value, because SPDK's client and
//! its `save_config` send many of them unasked (`secure_channel: false`,
//! `md_interleave: false`), and refused with a readable -32602 otherwise:
//! a setting accepted and ignored is how a user ends up without TLS while
//! believing it is on. The method table strips these keys before the
//! handler decodes its parameters strictly; when nvraid gains a feature, its
//! entries move into the method's parameter struct and the refusal becomes
//! the feature.

use crate::jsonrpc::{RpcError, INVALID_PARAMS};
use serde_json::{Map, Value};

/// The one value (besides absent or null) a parameter is accepted at.
#[derive(Debug, Clone, Copy)]
pub enum Accepted {
    /// Only absent or null.
    Absent,
    Bool(bool),
    Int(i64),
    /// Compared ignoring ASCII case, as SPDK compares names like "posix".
    Str(&'static str),
    /// A list with exactly these strings, in any order.
    Strs(&'static [&'static str]),
}

impl Accepted {
    fn matches(self, v: &Value) -> bool {
        match (self, v) {
            (_, Value::Null) => true,
            (Accepted::Absent, _) => false,
            (Accepted::Bool(b), Value::Bool(x)) => *x == b,
            (Accepted::Int(n), Value::Number(x)) => x.as_i64() == Some(n),
            (Accepted::Str(s), Value::String(x)) => x.eq_ignore_ascii_case(s),
            (Accepted::Strs(want), Value::Array(xs)) => {
                xs.len() == want.len()
                    && want.iter().all(|w| xs.iter().any(|x| x.as_str().is_some_and(|x| x.eq_ignore_ascii_case(w))))
            }
            _ => false,
        }
    }

    fn describe(self) -> String {
        match self {
            Accepted::Absent => "leave it out".into(),
            Accepted::Bool(b) => format!("only {b} is accepted"),
            Accepted::Int(n) => format!("only {n} is accepted"),
            Accepted::Str(s) => format!("only \"{s}\" is accepted"),
            Accepted::Strs(list) => format!("only the default list {list:?} is accepted"),
        }
    }
}

/// A parameter of one method whose feature nvraid lacks.
#[derive(Debug, Clone, Copy)]
pub struct Unsupported {
    /// The key, or a dotted path into a nested object (`namespace.eui64`).
    pub key: &'static str,
    pub accepted: Accepted,
    /// What nvraid lacks, completing "nvraid has no ...".
    pub feature: &'static str,
}

/// Shorthand for the tables.
pub const fn at(key: &'static str, accepted: Accepted, feature: &'static str) -> Unsupported {
    Unsupported { key, accepted, feature }
}

/// Removes every listed key that holds its accepted value from `params`
/// (an object, possibly with nested objects); the first that holds another
/// value is the error. Positional (array) params are left to the decoder.
pub fn strip(method: &str, params: &mut Option<Value>, list: &[Unsupported]) -> Result<(), RpcError> {
    let Some(Value::Object(top)) = params.as_mut() else { return Ok(()) };
    for u in list {
        let (parent, leaf) = match u.key.rsplit_once('.') {
            Some((path, leaf)) => (walk(top, path), leaf),
            None => (Some(&mut *top), u.key),
        };
        let Some(parent) = parent else { continue };
        let Some(value) = parent.get(leaf) else { continue };
        if !u.accepted.matches(value) {
            let shown = match u.accepted {
                // A key name or file path may be sensitive; the key alone says enough.
                Accepted::Absent | Accepted::Str(_) | Accepted::Strs(_) => u.key.to_string(),
                Accepted::Bool(_) | Accepted::Int(_) => format!("{}={value}", u.key),
            };
            return Err(RpcError::new(
                INVALID_PARAMS,
                format!("{method}: {shown} is not supported (nvraid has no {}); {}", u.feature, u.accepted.describe()),
            ));
        }
        parent.remove(leaf);
        // An options object left empty (`multipath_opts` with only its
        // default policy) goes too, so the decoder does not see it.
        if let Some((path, _)) = u.key.split_once('.') {
            if top.get(path).and_then(Value::as_object).is_some_and(Map::is_empty) {
                top.remove(path);
            }
        }
    }
    Ok(())
}

fn walk<'a>(mut at: &'a mut Map<String, Value>, path: &str) -> Option<&'a mut Map<String, Value>> {
    for part in path.split('.') {
        at = at.get_mut(part)?.as_object_mut()?;
    }
    Some(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIST: &[Unsupported] = &[
        at("psk", Accepted::Absent, "TLS"),
        at("secure_channel", Accepted::Bool(false), "TLS"),
        at("numa_id", Accepted::Int(-1), "NUMA placement"),
        at("sock_impl", Accepted::Str("posix"), "other socket layers"),
        at("digests", Accepted::Strs(&["sha256", "sha512"]), "DH-HMAC-CHAP"),
        at("namespace.eui64", Accepted::Absent, "EUI-64 identifiers"),
        at("multipath_opts.policy", Accepted::Str("active_passive"), "multipath"),
    ];

    fn run(params: Value) -> Result<Value, RpcError> {
        let mut p = Some(params);
        strip("m", &mut p, LIST).map(|()| p.unwrap())
    }

    #[test]
    fn defaults_are_removed_and_others_are_refused_by_name() {
        let kept = run(json!({"nqn": "n", "secure_channel": false, "numa_id": -1, "sock_impl": "POSIX",
                               "psk": null, "digests": ["sha512", "sha256"], "namespace": {"nsid": 1}}))
        .unwrap();
        assert_eq!(kept, json!({"nqn": "n", "namespace": {"nsid": 1}}));

        let e = run(json!({"psk": "key0"})).unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        assert_eq!(e.message, "m: psk is not supported (nvraid has no TLS); leave it out");
        assert!(!e.message.contains("key0"), "values of key names are not echoed");
        let e = run(json!({"secure_channel": true})).unwrap_err();
        assert!(e.message.contains("secure_channel=true is not supported") && e.message.contains("only false"));
        let e = run(json!({"numa_id": 0})).unwrap_err();
        assert!(e.message.contains("numa_id=0"), "{}", e.message);
        assert!(run(json!({"sock_impl": "uring"})).is_err());
        assert!(run(json!({"digests": ["sha256"]})).is_err());
        assert!(run(json!({"secure_channel": "yes"})).is_err(), "a wrong type is not the default");
        let e = run(json!({"namespace": {"bdev_name": "b", "eui64": "0011223344556677"}})).unwrap_err();
        assert!(e.message.contains("namespace.eui64"), "{}", e.message);
        assert_eq!(run(json!({"multipath_opts": {"policy": "active_passive"}})).unwrap(), json!({}));
        let left = run(json!({"multipath_opts": {"policy": "active_passive", "x": 1}})).unwrap();
        assert_eq!(left, json!({"multipath_opts": {"x": 1}}), "what is left goes to the strict decoder");
        // Positional params and a nested key under a non-object are left alone.
        assert_eq!(run(json!(["a"])).unwrap(), json!(["a"]));
        assert_eq!(run(json!({"namespace": 3})).unwrap(), json!({"namespace": 3}));
    }
}
