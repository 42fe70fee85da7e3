//! The control planes that drive SPDK drive nvraid unchanged: the RPC calls
//! the Ceph NVMe-oF gateway and spdk-csi send (recorded verbatim, with their
//! source lines, in tests/fixtures/*-calls.json) are replayed against
//! nvraid-tgt through SPDK's Python client library, and every answer must
//! carry the fields, types and values those programs parse (or the error
//! text they recognise). Calls of features outside nvraid (Ceph RBD bdevs,
//! lvol stores) must be refused with a JSON-RPC error, never ignored.
//! A host is connected while the gateway lists controllers and queue pairs,
//! so those answers are checked with entries in them.

mod common;
use common::*;
use mgmt::bdev::DmaBuf;
use mgmt::nvmf::host::{self, ConnectParams, HostQpair};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const CEPH_NQN: &str = "nqn.2016-06.io.spdk:cnode1.group1";
/// The host the gateway's fixture allows (nvmf_subsystem_add_host) and
/// makes namespace 2 visible to (nvmf_ns_add_host).
const CEPH_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn load(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

/// Replaces the fixture's placeholders in expected values too.
fn substitute(s: &str, subs: &[(&str, String)]) -> String {
    subs.iter().fold(s.to_string(), |acc, (k, v)| acc.replace(k, v))
}

/// The answers to one phase, through SPDK's Python client as a library.
fn replay(python: &Path, d: &Daemon, file: &str, phase: &str, subs: &[(&str, String)]) -> Vec<Value> {
    let subs_json: serde_json::Map<String, Value> = subs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    let out = Command::new(python)
        .arg(fixture("orchestrator_replay.py"))
        .arg(&d.sock)
        .arg(fixture(file))
        .arg(phase)
        .arg(Value::Object(subs_json).to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay of {file} {phase} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every value `path` reaches in `v`: `$` is `v`, `a.b` walks keys, and a
/// segment ending in `[]` walks every element of a list that must not be
/// empty (the program iterates it, so an empty list would leave the
/// fields unchecked).
fn walk<'a>(v: &'a Value, path: &str) -> Result<Vec<&'a Value>, String> {
    if path == "$" {
        return Ok(vec![v]);
    }
    let mut at = vec![v];
    for seg in path.split('.') {
        let (key, each) = match seg.strip_suffix("[]") {
            Some(k) => (k, true),
            None => (seg, false),
        };
        let mut next = Vec::new();
        for x in at {
            let y = if key.is_empty() { x } else { x.get(key).ok_or_else(|| format!("no '{key}' in {x}"))? };
            if each {
                let list = y.as_array().ok_or_else(|| format!("'{key}' is not a list: {y}"))?;
                if list.is_empty() {
                    return Err(format!("'{seg}' is an empty list, nothing to check"));
                }
                next.extend(list.iter());
            } else {
                next.push(y);
            }
        }
        at = next;
    }
    Ok(at)
}

/// Whether `v` is what the program's parsing needs: a type name, or `=x`
/// for an exact value.
fn fits(v: &Value, want: &str) -> bool {
    match want {
        "string" => v.is_string(),
        "number" => v.is_u64() || v.is_i64(),
        "bool" => v.is_boolean(),
        "object" => v.is_object(),
        "integer-string" => v.as_str().is_some_and(|s| s.parse::<i64>().is_ok()),
        _ => {
            let exact = want.strip_prefix('=').expect("a type or =value");
            match v {
                Value::String(s) => s == exact,
                other => serde_json::from_str::<Value>(exact).is_ok_and(|x| x == *other),
            }
        }
    }
}

/// Checks one answer against the fixture's expectation; problems go to `bad`.
fn check(call: &Value, answer: &Value, subs: &[(&str, String)], bad: &mut Vec<String>) {
    let method = call["method"].as_str().unwrap();
    let at = format!("{method} ({})", call["source"].as_str().unwrap_or(""));
    let error = answer.get("error");
    let message = error.and_then(|e| e["message"].as_str()).unwrap_or("").to_lowercase();
    let code = error.and_then(|e| e["code"].as_i64());
    let check_parses = |bad: &mut Vec<String>| {
        let Some(result) = answer.get("result") else {
            return bad.push(format!("{at}: refused: {}", error.unwrap()));
        };
        // The entries the program picks out of a list (by NQN, ...).
        let selected;
        let result = match call.get("select").and_then(Value::as_object) {
            None => result,
            Some(sel) => {
                let list = result.as_array().map(Vec::as_slice).unwrap_or_default();
                let picked = list.iter().filter(|e| sel.iter().all(|(k, v)| e.get(k) == Some(v))).cloned();
                selected = Value::Array(picked.collect());
                &selected
            }
        };
        for (path, want) in call["parses"].as_object().into_iter().flatten() {
            let want = substitute(want.as_str().unwrap(), subs);
            match walk(result, path) {
                Err(e) => bad.push(format!("{at}: {path}: {e}")),
                Ok(vals) => {
                    for v in vals.into_iter().filter(|v| !fits(v, &want)) {
                        bad.push(format!("{at}: {path} is {v}, the program needs {want}"));
                    }
                }
            }
        }
    };
    match &call["expect"] {
        Value::String(e) if e == "ok" => check_parses(bad),
        Value::String(e) if e == "refused" => {
            // Method not found, or invalid params naming what is missing.
            if !matches!(code, Some(-32601) | Some(-32602)) || message.is_empty() {
                bad.push(format!("{at}: outside nvraid, must be refused with a JSON-RPC error; got {answer}"));
            }
        }
        // The program ignores the outcome; an answer (not a hang) is all.
        Value::String(e) if e == "answered" => {}
        Value::Object(o) => {
            let want = o["error_contains"].as_str().unwrap().to_lowercase();
            if error.is_none() || !message.contains(&want) {
                bad.push(format!("{at}: the program needs an error containing '{want}'; got {answer}"));
            }
        }
        e => panic!("{at}: unknown expectation {e}"),
    }
}

fn check_phase(python: &Path, d: &Daemon, file: &str, phase: &str, subs: &[(&str, String)]) -> Vec<Value> {
    let doc = load(file);
    let calls = doc["phases"][phase].as_array().unwrap();
    let answers = replay(python, d, file, phase, subs);
    assert_eq!(answers.len(), calls.len());
    let mut bad = Vec::new();
    for (call, answer) in calls.iter().zip(&answers) {
        check(call, answer, subs, &mut bad);
    }
    assert!(bad.is_empty(), "{file} {phase}: {} answer(s) the program cannot use:\n{}", bad.len(), bad.join("\n"));
    answers
}

/// Writes the key files the program writes before its calls, as it does
/// (owner-only, as `tempfile.mkstemp` creates them).
fn write_files(files: &Value, subs: &[(&str, String)]) {
    use std::os::unix::fs::PermissionsExt;
    for (path, text) in files.as_object().into_iter().flatten() {
        let path = PathBuf::from(substitute(path, subs));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text.as_str().unwrap()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// The Python of the venv SPDK's client is installed in.
fn spdk_python() -> Option<PathBuf> {
    let rpc = spdk_rpc_path()?;
    let python = rpc.parent().unwrap().join("python3");
    if python.exists() {
        return Some(python);
    }
    cannot_run(&format!("no python3 beside {}", rpc.display()));
    None
}

#[test]
fn ceph_nvmeof_gateway_sequence() {
    let Some(python) = spdk_python() else { return };
    let dir = temp_dir("replay-ceph");
    let d = Daemon::start(&dir, &["-m", "0x1"]);
    let file = "ceph-nvmeof-calls.json";
    let keys = dir.join("keys");
    let subs = [("${PORT}", free_port().to_string()), ("${KEYS_DIR}", keys.display().to_string())];
    write_files(&load(file)["files"], &subs);
    check_phase(&python, &d, file, "setup", &subs);

    // A host on the listener (ANA group 1 is optimized there) while the
    // gateway lists connections: it sees both namespaces (the second was
    // made visible to it alone).
    let mut p = ConnectParams::new("127.0.0.1", &subs[0].1, CEPH_NQN);
    p.hostnqn = CEPH_HOST.into();
    p.kato_ms = 0;
    let mut session = host::connect(&p, 1).unwrap_or_else(|e| panic!("connect: {e}"));
    let nsids: Vec<u32> = session.info.namespaces.iter().map(|n| n.nsid).collect();
    assert_eq!(nsids, [1, 2]);
    // A write and a deallocate on namespace 1 (512-byte blocks), so the
    // gateway's stats calls have IO of each kind to report.
    let mut qp = HostQpair::from_parts(session.io.remove(0));
    let complete = |qp: &mut HostQpair| {
        let mut status = None;
        let t0 = Instant::now();
        while status.is_none() {
            qp.poll(|c| status = Some((c.status.sct, c.status.sc))).unwrap();
            assert!(t0.elapsed() < Duration::from_secs(10), "no completion");
        }
        assert_eq!(status, Some((0, 0)));
    };
    qp.write(1, 0, 8, DmaBuf::alloc(4096).unwrap(), 1).unwrap();
    complete(&mut qp);
    qp.deallocate(1, &[(8, 8)], DmaBuf::alloc(4096).unwrap(), 2).unwrap();
    complete(&mut qp);

    let a = check_phase(&python, &d, file, "observe", &subs);
    let stats = &a[7]["result"]["bdevs"][0];
    assert_eq!((stats["num_write_ops"].clone(), stats["num_unmap_ops"].clone()), (json!(1), json!(1)), "{stats}");
    assert_eq!(stats["bytes_unmapped"], json!(8 * 512), "8 blocks deallocated: {stats}");
    let (max, min) = (stats["max_unmap_latency_ticks"].as_u64().unwrap(), stats["min_unmap_latency_ticks"].as_u64());
    assert!(max > 0 && min == Some(max), "one unmap measured: {stats}");
    let (qpairs, ctrls) = (&a[0]["result"], &a[1]["result"]);
    assert_eq!(ctrls[0]["hostnqn"], json!(CEPH_HOST));
    assert_eq!(ctrls[0]["num_io_qpairs"], json!(1));
    assert_eq!(qpairs.as_array().unwrap().len(), 2, "admin and one IO queue: {qpairs}");
    assert_eq!(qpairs[0]["listen_address"]["trsvcid"], json!(subs[0].1));
    let sub = &a[2]["result"][0];
    assert_eq!((sub["nqn"].clone(), sub["allow_any_host"].clone()), (json!(CEPH_NQN), json!(false)));
    assert_eq!(sub["namespaces"][1]["anagrpid"], json!(2), "moved by nvmf_subsystem_set_ns_ana_group");
    drop(qp);
    drop(session);

    check_phase(&python, &d, file, "teardown", &subs);
    assert_eq!(d.ok("nvmf_get_subsystems", Value::Null), json!([]), "the gateway's deletes left nothing behind");
    assert_eq!(d.ok("keyring_get_keys", Value::Null), json!([]), "and its key cleanup found its key");
}

#[test]
fn spdk_csi_nvmf_sequence() {
    let Some(python) = spdk_python() else { return };
    let dir = temp_dir("replay-csi");
    let d = Daemon::start(&dir, &["-m", "0x1"]);
    let file = "spdk-csi-calls.json";
    let subs = [("${PORT}", free_port().to_string())];
    check_phase(&python, &d, file, "setup", &subs);
    check_phase(&python, &d, file, "observe", &subs);
    check_phase(&python, &d, file, "teardown", &subs);
}

#[test]
fn the_checker_rejects_what_a_program_cannot_parse() {
    // The checks themselves: a missing field, a wrong type, an empty list
    // and a wrong exact value are each reported.
    let call = json!({"method": "m", "expect": "ok",
        "parses": {"[].a": "number", "[].b[].c": "string", "[].d": "=IPv4"}});
    let mut bad = Vec::new();
    check(&call, &json!({"result": [{"a": 1, "b": [{"c": "x"}], "d": "IPv4"}]}), &[], &mut bad);
    assert!(bad.is_empty(), "{bad:?}");
    for wrong in [
        json!({"result": [{"b": [{"c": "x"}], "d": "IPv4"}]}),
        json!({"result": [{"a": "1", "b": [{"c": "x"}], "d": "IPv4"}]}),
        json!({"result": [{"a": 1, "b": [], "d": "IPv4"}]}),
        json!({"result": [{"a": 1, "b": [{"c": "x"}], "d": "ipv4"}]}),
        json!({"result": []}),
        json!({"error": {"code": -32601, "message": "Method not found: m"}}),
    ] {
        let mut bad = Vec::new();
        check(&call, &wrong, &[], &mut bad);
        assert!(!bad.is_empty(), "{wrong} passed");
    }
    let refused = json!({"method": "bdev_rbd_create", "expect": "refused"});
    let mut bad = Vec::new();
    check(&refused, &json!({"result": "bdev0"}), &[], &mut bad);
    assert_eq!(bad.len(), 1, "a served call of a missing feature is reported");
}

#[test]
fn a_deleted_discovery_subsystem_stays_deleted_through_save_config() {
    // The Ceph gateway deletes SPDK's discovery subsystem at start and
    // serves discovery itself (control/server.py:344).
    const DISCOVERY: &str = "nqn.2014-08.org.nvmexpress.discovery";
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("replay-discovery");
    let mut d = Daemon::start(&dir, &["-m", "0x1"]);
    let port = free_port().to_string();
    spdk_ok(&rpc, &d.sock, &["nvmf_create_transport", "-t", "TCP"]);
    spdk_ok(&rpc, &d.sock, &["nvmf_subsystem_add_listener", "discovery", "-t", "tcp", "-a", "127.0.0.1", "-s", &port]);
    let mut p = ConnectParams::new("127.0.0.1", &port, DISCOVERY);
    p.kato_ms = 0;
    drop(host::discover(&p).unwrap_or_else(|e| panic!("discovery before the delete: {e}")));

    d.ok("nvmf_delete_subsystem", json!({"nqn": DISCOVERY}));
    let subs = d.ok("nvmf_get_subsystems", Value::Null);
    assert_eq!(subs, json!([]), "no discovery subsystem listed");
    assert!(host::discover(&p).is_err(), "its listener closed with it");
    let e = d.rpc("nvmf_delete_subsystem", json!({"nqn": DISCOVERY})).unwrap_err();
    assert_eq!(e.0, -32602, "a second delete finds nothing: {e:?}");
    let e = d.rpc("nvmf_create_subsystem", json!({"nqn": DISCOVERY})).unwrap_err();
    assert!(e.1.contains("deleted"), "{e:?}");

    let saved = spdk_rpc(&rpc, &d.sock, &["save_config"]);
    assert!(saved.status.success(), "{}", String::from_utf8_lossy(&saved.stderr));
    let cfg = dir.join("saved.json");
    std::fs::write(&cfg, &saved.stdout).unwrap();
    d.stop();
    let d2 = Daemon::start(&dir, &["-m", "0x1", "-c", cfg.to_str().unwrap()]);
    assert_eq!(d2.ok("nvmf_get_subsystems", Value::Null), json!([]), "restarted from save_config: still deleted");
}
