//! Bad input over JSON-RPC: each gets the right error code and a readable
//! message, and the daemon keeps serving other clients.

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn still_serving(d: &Daemon) {
    assert_eq!(d.ok("framework_wait_init", Value::Null), json!(true));
}

fn error_of(reply: &str) -> (i64, String) {
    let v: Value =
        serde_json::from_str(reply.lines().next().unwrap_or("")).unwrap_or_else(|e| panic!("{reply:?}: {e}"));
    (v["error"]["code"].as_i64().unwrap(), v["error"]["message"].as_str().unwrap().to_string())
}

#[test]
fn bad_requests_get_json_rpc_errors() {
    let dir = temp_dir("errors");
    let d = Daemon::start(&dir, &[]);

    // Malformed JSON: parse error, that connection ends, others go on.
    let (code, msg) = error_of(&d.raw(b"{\"jsonrpc\": \"2.0\", \"method\": ]", false, Duration::from_secs(10)));
    assert_eq!(code, -32700);
    assert!(msg.to_lowercase().contains("parse error"), "{msg}");
    still_serving(&d);

    // Unknown method.
    let (code, msg) = d.rpc("bdev_frobnicate", Value::Null).unwrap_err();
    assert_eq!(code, -32601);
    assert!(msg.contains("bdev_frobnicate"), "{msg}");

    // Not a valid request object.
    let (code, _) = error_of(&d.raw(br#"{"jsonrpc":"1.0","method":"x","id":3}"#, false, Duration::from_secs(10)));
    assert_eq!(code, -32600);

    // Missing and wrong-typed parameters.
    let (code, msg) = d.rpc("bdev_malloc_create", json!({"block_size": 512})).unwrap_err();
    assert_eq!(code, -32602);
    assert!(msg.contains("num_blocks"), "{msg}");
    let (code, msg) = d.rpc("bdev_malloc_create", json!({"num_blocks": "many", "block_size": 512})).unwrap_err();
    assert_eq!(code, -32602);
    assert!(msg.contains("invalid type"), "{msg}");
    let (code, msg) = d.rpc("bdev_malloc_create", json!({"num_blocks": 8, "block_size": 333})).unwrap_err();
    assert_eq!(code, -22);
    assert!(msg.contains("block_size"), "{msg}");

    // A name that already exists.
    d.ok("bdev_malloc_create", json!({"name": "A", "num_blocks": 8, "block_size": 512}));
    let (code, msg) =
        d.rpc("bdev_malloc_create", json!({"name": "A", "num_blocks": 8, "block_size": 512})).unwrap_err();
    assert_eq!(code, -17);
    assert!(msg.contains("already exists"), "{msg}");

    // Deleting with the wrong module's method.
    d.ok("bdev_null_create", json!({"name": "N", "num_blocks": 8, "block_size": 512}));
    let (code, msg) = d.rpc("bdev_malloc_delete", json!({"name": "N"})).unwrap_err();
    assert_eq!(code, -22);
    assert!(msg.contains("null"), "{msg}");

    // Deleting a bdev claimed by another (an error bdev over it).
    d.ok("bdev_malloc_create", json!({"name": "Base", "num_blocks": 8, "block_size": 512}));
    assert_eq!(d.ok("bdev_error_create", json!({"base_name": "Base"})), json!(true));
    let (code, msg) = d.rpc("bdev_malloc_delete", json!({"name": "Base"})).unwrap_err();
    assert_eq!(code, -16);
    assert!(msg.contains("claimed") && msg.contains("EE_Base"), "{msg}");
    d.ok("bdev_error_delete", json!({"name": "EE_Base"}));
    assert_eq!(d.ok("bdev_malloc_delete", json!({"name": "Base"})), json!(true));

    // Cut off mid-stream: the client stops writing halfway through a request.
    let reply = d.raw(b"{\"jsonrpc\": \"2.0\", \"method\": \"bdev_get_bd", true, Duration::from_secs(10));
    let (code, msg) = error_of(&reply);
    assert_eq!(code, -32700);
    assert!(msg.contains("cut off"), "{msg}");

    // A batch: answered as one array, in order.
    let reply = d.raw(
        br#"[{"jsonrpc":"2.0","method":"framework_wait_init","id":1},{"jsonrpc":"2.0","method":"nope","id":2}]"#,
        false,
        Duration::from_secs(10),
    );
    let v: Value = serde_json::from_str(reply.trim()).unwrap();
    assert_eq!(v[0]["result"], json!(true));
    assert_eq!(v[1]["error"]["code"], json!(-32601));

    still_serving(&d);
}

#[test]
fn bad_command_lines_and_configs_exit_cleanly() {
    let dir = temp_dir("badcfg");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_nvraid-tgt"))
            .args(["-r", dir.join("s.sock").to_str().unwrap(), "--idle", "sleep", "--no-pin"])
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["-m", "0xZZ"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("core mask"), "{}", String::from_utf8_lossy(&o.stderr));

    let o = run(&["--frobnicate"]);
    assert!(!o.status.success());

    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{\"subsystems\": [ {\"subsystem\": \"bdev\", \"config\": [ { \"method\": ").unwrap();
    let o = run(&["-c", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not valid JSON"));

    std::fs::write(&bad, r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_teleport_create"}]}]}"#)
        .unwrap();
    let o = run(&["-c", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown method bdev_teleport_create"));

    std::fs::write(
        &bad,
        r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_malloc_create","params":{"name":"M","num_blocks":0,"block_size":512}}]}]}"#,
    )
    .unwrap();
    let o = run(&["-c", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bdev_malloc_create failed") && err.contains("num_blocks"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let o = run(&["-c", dir.join("missing.json").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("reading config"));
}

#[test]
fn socket_is_owner_only_and_sigterm_is_clean() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("perm");
    let cfg = two_malloc_config(&dir);
    let mut d = Daemon::start(&dir, &["-c", cfg.to_str().unwrap()]);
    let mode = std::fs::metadata(&d.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "RPC socket mode {mode:o}");
    let names: Vec<String> = d
        .ok("bdev_get_bdevs", Value::Null)
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["Malloc0", "Malloc1"]);
    d.stop();
    assert!(!d.sock.exists(), "socket removed at shutdown");
}

#[test]
fn nvraid_rpc_client_reports_results_and_errors() {
    let dir = temp_dir("cli");
    let cfg = two_malloc_config(&dir);
    let d = Daemon::start(&dir, &["-c", cfg.to_str().unwrap()]);
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_nvraid-rpc")).arg("-s").arg(&d.sock).args(args).output().unwrap()
    };
    let o = cli(&["bdev_get_bdevs", r#"{"name": "Malloc1"}"#]);
    assert!(o.status.success());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["name"], json!("Malloc1"));
    let o = cli(&["bdev_malloc_delete", r#"{"name": "Nope"}"#]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("-19"));
    let o = cli(&["bdev_get_bdevs", "{not json"]);
    assert_eq!(o.status.code(), Some(2));
}
