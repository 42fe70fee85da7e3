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

/// Waits up to 30 s for the daemon to exit and returns how.
fn wait_exit(d: &mut Daemon) -> std::process::ExitStatus {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
            d.child = None;
            return st;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "daemon still running: {}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// spdk_kill_instance does what SPDK's does, sending the signal to the
/// daemon itself: SIGTERM is the orderly shutdown, SIGKILL immediate death
/// (no reply, no cleanup: the socket file stays), SIGHUP its default
/// action; a name SPDK does not know is refused and changes nothing.
#[test]
fn spdk_kill_instance_sends_the_signal() {
    use std::os::unix::process::ExitStatusExt;
    let dir = temp_dir("kill");
    let mut d = Daemon::start(&dir, &[]);
    let (code, msg) = d.rpc("spdk_kill_instance", json!({"sig_name": "SIGFOO"})).unwrap_err();
    assert_eq!(code, -32602);
    assert!(msg.contains("SIGFOO") && msg.contains("SIGKILL"), "{msg}");
    still_serving(&d);
    let reply = d.raw(
        br#"{"jsonrpc":"2.0","method":"spdk_kill_instance","params":{"sig_name":"SIGKILL"},"id":1}"#,
        false,
        Duration::from_secs(10),
    );
    assert_eq!(reply, "", "a killed process answers nothing");
    let st = wait_exit(&mut d);
    assert_eq!(st.signal(), Some(9), "{st}: {}", d.log_text());
    assert!(d.sock.exists(), "SIGKILL leaves no time to remove the socket");

    let dir = temp_dir("kill-hup");
    let mut d = Daemon::start(&dir, &[]);
    let _ = d.raw(
        br#"{"jsonrpc":"2.0","method":"spdk_kill_instance","params":{"sig_name":"SIGHUP"},"id":1}"#,
        false,
        Duration::from_secs(10),
    );
    assert_eq!(wait_exit(&mut d).signal(), Some(1), "{}", d.log_text());

    let dir = temp_dir("kill-term");
    let mut d = Daemon::start(&dir, &[]);
    assert_eq!(d.ok("spdk_kill_instance", json!({"sig_name": "SIGTERM"})), json!(true));
    let st = wait_exit(&mut d);
    assert!(st.success(), "{st}: {}", d.log_text());
    assert!(!d.sock.exists(), "an orderly shutdown removes its socket");
}

/// Logs written to a pipe (or a file) are plain text: no ANSI colour codes.
#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let dir = temp_dir("ansi");
    let sock = dir.join("rpc.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nvraid-tgt"))
        .args(["-r", sock.to_str().unwrap(), "--idle", "sleep", "--no-pin", "--no-huge"])
        .env("NVRAID_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no RPC socket");
        assert!(child.try_wait().unwrap().is_none(), "daemon exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("INFO") && log.contains("shutting down"), "expected log lines: {log}");
    assert!(!out.stderr.contains(&0x1b), "ESC (ANSI colour) in piped logs: {log:?}");
}

/// Each SPDK option method nvraid skips, fed in a start-up config with the
/// values SPDK writes: the daemon starts and names every one in a warning.
/// The option methods for parts nvraid has are applied instead, so a value
/// nvraid cannot honour stops the start with a readable error.
#[test]
fn config_option_methods_are_skipped_by_name_or_applied() {
    let dir = temp_dir("options");
    let cfg = dir.join("options.json");
    let skipped = json!([
        {"method": "framework_set_scheduler", "params": {"name": "static"}},
        {"method": "sock_set_default_impl", "params": {"impl_name": "posix"}},
        {"method": "sock_impl_set_options", "params": {"impl_name": "posix", "recv_buf_size": 2097152}},
        {"method": "iobuf_set_options", "params": {"small_pool_count": 8192, "large_pool_count": 1024}},
        {"method": "accel_set_options", "params": {"small_cache_size": 128, "large_cache_size": 16}},
        {"method": "vmd_enable"},
        {"method": "nvmf_set_max_subsystems", "params": {"max_subsystems": 1024}},
        {"method": "nvmf_set_crdt", "params": {"crdt1": 0, "crdt2": 0, "crdt3": 0}},
    ]);
    let applied = json!([
        {"method": "bdev_set_options", "params": {"bdev_io_pool_size": 65535, "bdev_io_cache_size": 256,
            "bdev_auto_examine": true, "iobuf_small_cache_size": 128, "iobuf_large_cache_size": 16}},
        {"method": "bdev_nvme_set_options", "params": {"action_on_timeout": "abort", "timeout_us": 5000000,
            "transport_retry_count": 3, "bdev_retry_count": 3, "keep_alive_timeout_ms": 10000}},
        {"method": "bdev_nvme_set_hotplug", "params": {"enable": true, "period_us": 200000}},
        {"method": "nvmf_set_config", "params": {"discovery_filter": "match_any"}},
    ]);
    let mut calls = skipped.as_array().unwrap().clone();
    calls.extend(applied.as_array().unwrap().iter().cloned());
    std::fs::write(&cfg, json!({"subsystems": [{"subsystem": "bdev", "config": calls}]}).to_string()).unwrap();
    let d = Daemon::start(&dir, &["-c", cfg.to_str().unwrap()]);
    still_serving(&d);
    let log = d.log_text();
    let warning = log.lines().find(|l| l.contains("skipping SPDK option methods")).unwrap_or_else(|| panic!("{log}"));
    for call in skipped.as_array().unwrap() {
        let m = call["method"].as_str().unwrap();
        assert!(warning.contains(m), "{m} not named in: {warning}");
    }
    for call in applied.as_array().unwrap() {
        let m = call["method"].as_str().unwrap();
        assert!(!warning.contains(m), "{m} was skipped: {warning}");
    }
    // The hotplug monitor runs, and save_config writes it so.
    let bdev = d.ok("framework_get_config", json!({"name": "bdev"}));
    let hotplug = json!({"method": "bdev_nvme_set_hotplug", "params": {"enable": true, "period_us": 200000}});
    assert!(bdev.as_array().unwrap().contains(&hotplug), "{bdev}");
    drop(d);

    // Applied, so refused when nvraid cannot do what it asks.
    // A config that wrongly loads would leave the daemon serving: it gets
    // 30 s to stop on its own, then it is killed and the check fails.
    let run = |calls: serde_json::Value| {
        std::fs::write(&cfg, json!({"subsystems": [{"subsystem": "bdev", "config": calls}]}).to_string()).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nvraid-tgt"))
            .args(["-r", dir.join("s.sock").to_str().unwrap(), "--idle", "sleep", "--no-pin", "-c"])
            .arg(&cfg)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    };
    for (call, named) in [
        (json!({"method": "bdev_set_options", "params": {"bdev_io_pool_size": 100}}), "bdev_io_pool_size 100"),
        (json!({"method": "bdev_set_options", "params": {"bdev_auto_examine": false}}), "bdev_auto_examine=false"),
        (
            json!({"method": "bdev_nvme_set_options", "params": {"ctrlr_loss_timeout_sec": 5}}),
            "ctrlr_loss_timeout_sec=5",
        ),
        (
            json!({"method": "bdev_nvme_set_options", "params": {"action_on_timeout": "none", "timeout_us": 10}}),
            "action_on_timeout",
        ),
        (json!({"method": "bdev_nvme_set_hotplug", "params": {"enable": true, "period_us": 20000000}}), "period_us"),
        (json!({"method": "nvmf_set_config", "params": {"discovery_filter": "transport"}}), "discovery_filter"),
        (json!({"method": "nvmf_set_config", "params": {"dhchap_digests": ["md5"]}}), "unknown digest md5"),
    ] {
        let o = run(json!([call]));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{call} must stop the start: {err}");
        let method = call["method"].as_str().unwrap();
        assert!(err.contains(&format!("{method} failed")) && err.contains(named), "{call}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
