//! SPDK's own Python client (`spdk-rpc`) against the real daemon: every
//! foundation method, save_config, and a restart from the saved file.

mod common;
use common::*;
use serde_json::json;

#[test]
fn spdk_client_drives_the_daemon_and_config_round_trips() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("compat");
    let mut d = Daemon::start(&dir, &["-m", "0x3"]);
    let s = d.sock.clone();

    // The client prints nothing for a `true` result; success is the exit status.
    spdk_ok(&rpc, &s, &["framework_wait_init"]);
    assert_eq!(d.ok("framework_wait_init", serde_json::Value::Null), json!(true));
    let v = spdk_ok(&rpc, &s, &["spdk_get_version"]);
    assert!(v["version"].as_str().unwrap().starts_with("nvraid"));
    let methods = spdk_ok(&rpc, &s, &["rpc_get_methods"]);
    for m in ["bdev_get_bdevs", "bdev_malloc_create", "framework_get_config", "spdk_kill_instance"] {
        assert!(methods.as_array().unwrap().contains(&json!(m)), "{m} missing from rpc_get_methods");
    }
    let r = spdk_ok(&rpc, &s, &["framework_get_reactors"]);
    assert_eq!(r["reactors"].as_array().unwrap().len(), 2);

    assert_eq!(spdk_ok(&rpc, &s, &["bdev_malloc_create", "-b", "Malloc0", "32", "4096"]), json!("Malloc0"));
    assert_eq!(spdk_ok(&rpc, &s, &["bdev_malloc_create", "-b", "Malloc1", "16", "512"]), json!("Malloc1"));
    assert_eq!(spdk_ok(&rpc, &s, &["bdev_null_create", "Null0", "64", "4096"]), json!("Null0"));
    assert_eq!(spdk_ok(&rpc, &s, &["bdev_malloc_create", "-b", "Gone", "1", "512"]), json!("Gone"));
    spdk_ok(&rpc, &s, &["bdev_malloc_delete", "Gone"]);
    assert!(d.rpc("bdev_get_bdevs", json!({"name": "Gone"})).is_err());
    // File, error and delay bdevs through the client's own argument syntax.
    let file = dir.join("disk.img");
    std::fs::write(&file, vec![0u8; 4 << 20]).unwrap();
    assert_eq!(spdk_ok(&rpc, &s, &["bdev_aio_create", file.to_str().unwrap(), "Aio0", "4096"]), json!("Aio0"));
    let file2 = dir.join("disk2.img");
    std::fs::write(&file2, vec![0u8; 1 << 20]).unwrap();
    assert_eq!(spdk_ok(&rpc, &s, &["bdev_uring_create", file2.to_str().unwrap(), "Uring0"]), json!("Uring0"));
    spdk_ok(&rpc, &s, &["bdev_error_create", "Malloc1"]);
    spdk_ok(&rpc, &s, &["bdev_error_inject_error", "EE_Malloc1", "write", "failure", "-n", "3"]);
    spdk_ok(
        &rpc,
        &s,
        &["bdev_error_inject_error", "EE_Malloc1", "read", "nvme_failure", "--nvme-sct", "2", "--nvme-sc", "129"],
    );
    let o = spdk_rpc(&rpc, &s, &["bdev_malloc_delete", "Malloc1"]);
    assert!(!o.status.success(), "a claimed bdev must not be deleted");
    assert_eq!(
        spdk_ok(
            &rpc,
            &s,
            &["bdev_delay_create", "-b", "Null0", "-d", "Delay0", "-r", "10", "-t", "20", "-w", "30", "-n", "40"]
        ),
        json!("Delay0")
    );
    let ee = &spdk_ok(&rpc, &s, &["bdev_get_bdevs", "-b", "EE_Malloc1"])[0];
    assert_eq!(ee["num_blocks"], json!(16 * 2048)); // 16 MiB of 512-byte blocks
    let m1 = &spdk_ok(&rpc, &s, &["bdev_get_bdevs", "-b", "Malloc1"])[0];
    assert_eq!(m1["claimed"], json!(true));
    spdk_ok(&rpc, &s, &["bdev_wait_for_examine"]);

    let bdevs = spdk_ok(&rpc, &s, &["bdev_get_bdevs"]);
    let names: Vec<&str> = bdevs.as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["Malloc0", "Malloc1", "Null0", "Aio0", "Uring0", "EE_Malloc1", "Delay0"]);
    let m0 = &spdk_ok(&rpc, &s, &["bdev_get_bdevs", "-b", "Malloc0"])[0];
    assert_eq!(m0["block_size"], json!(4096));
    assert_eq!(m0["num_blocks"], json!(32 * 256));
    assert_eq!(m0["supported_io_types"]["write"], json!(true));
    let st = spdk_ok(&rpc, &s, &["bdev_get_iostat", "--names", "Malloc0"]);
    assert_eq!(st["bdevs"][0]["name"], json!("Malloc0"));
    assert!(st["tick_rate"].as_u64().unwrap() > 0);

    let saved = spdk_rpc(&rpc, &s, &["save_config"]);
    assert!(saved.status.success(), "{}", String::from_utf8_lossy(&saved.stderr));
    let cfg_path = dir.join("saved.json");
    std::fs::write(&cfg_path, &saved.stdout).unwrap();
    let before = stable_bdevs(&spdk_ok(&rpc, &s, &["bdev_get_bdevs"]));

    spdk_ok(&rpc, &s, &["spdk_kill_instance", "SIGTERM"]);
    // The daemon exits by itself after the kill request.
    let t0 = std::time::Instant::now();
    while d.child.as_mut().unwrap().try_wait().unwrap().is_none() {
        assert!(t0.elapsed().as_secs() < 30, "daemon ignored spdk_kill_instance");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    d.child = None;

    let d2 = Daemon::start(&dir, &["-c", cfg_path.to_str().unwrap()]);
    let after = stable_bdevs(&spdk_ok(&rpc, &d2.sock, &["bdev_get_bdevs"]));
    assert_eq!(before, after, "restart from save_config must give the same bdevs");
}

#[test]
fn spdk_client_sees_readable_errors() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("compat-err");
    let d = Daemon::start(&dir, &[]);
    spdk_ok(&rpc, &d.sock, &["bdev_malloc_create", "-b", "X", "1", "512"]);
    let o = spdk_rpc(&rpc, &d.sock, &["bdev_malloc_create", "-b", "X", "1", "512"]);
    assert!(!o.status.success());
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("-17") && text.contains("already exists"), "{text}");
    let o = spdk_rpc(&rpc, &d.sock, &["bdev_malloc_delete", "Nope"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("-19") && text.contains("not found"), "{text}");
}

/// What `spdk-rpc` exits with and prints (stdout and stderr together).
fn spdk_fails(rpc: &std::path::Path, sock: &std::path::Path, args: &[&str]) -> String {
    let o = spdk_rpc(rpc, sock, args);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "spdk-rpc {args:?} should fail: {text}");
    text
}

/// Every key the current SPDK client sends for the methods nvraid has is
/// known: each command's request, with the client's own defaults (as
/// `--dry-run` prints it), reaches the daemon without an "unknown
/// parameter" or "not supported" answer (a "not found" is fine).
#[test]
fn every_key_the_spdk_client_sends_is_known() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("compat-keys");
    let d = Daemon::start(&dir, &[]);
    let nqn = "nqn.2016-06.io.spdk:keys";
    let commands: &[&[&str]] = &[
        &["spdk_get_version"],
        &["rpc_get_methods"],
        &["framework_wait_init"],
        &["framework_get_reactors"],
        &["framework_get_subsystems"],
        &["framework_get_config", "bdev"],
        &["bdev_set_options"],
        &["bdev_nvme_set_options"],
        &["bdev_nvme_set_hotplug", "--no-hotplug"],
        &["bdev_raid_set_options", "-w", "1024"],
        &["bdev_malloc_create", "-b", "K0", "1", "512"],
        &["bdev_malloc_create", "-b", "K1", "1", "512"],
        &["bdev_null_create", "KN", "1", "512"],
        &["bdev_aio_create", "/nonexistent/k", "KA"],
        &["bdev_uring_create", "/nonexistent/k", "KU"],
        &["bdev_error_create", "KN"],
        &["bdev_error_inject_error", "EE_KN", "write", "failure"],
        &["bdev_error_resume_pending", "EE_KN"],
        &["bdev_delay_create", "-b", "K1", "-d", "KD", "-r", "1", "-t", "1", "-w", "1", "-n", "1"],
        &["bdev_delay_update_latency", "KD", "avg_read", "5"],
        &["bdev_get_bdevs"],
        &["bdev_get_bdevs", "-b", "K0", "-t", "10"],
        &["bdev_get_iostat"],
        &["bdev_wait_for_examine"],
        &["bdev_raid_create", "-n", "KR", "-r", "raid1", "-b", "K0 KX"],
        &["bdev_raid_get_bdevs", "all"],
        &["bdev_raid_add_base_bdev", "KR", "KY"],
        &["bdev_raid_remove_base_bdev", "KY"],
        &["bdev_raid_delete", "KR"],
        &["bdev_nvme_attach_controller", "-b", "KC", "-t", "tcp", "-a", "127.0.0.1", "-s", "1", "-n", nqn],
        &["bdev_nvme_get_controllers"],
        &["bdev_nvme_detach_controller", "KC"],
        &["nvmf_create_transport", "-t", "tcp"],
        &["nvmf_get_transports"],
        &["nvmf_create_subsystem", nqn],
        &["nvmf_subsystem_add_ns", nqn, "K0"],
        &["nvmf_subsystem_add_listener", nqn, "-t", "tcp", "-a", "127.0.0.1", "-s", "0"],
        &["nvmf_subsystem_remove_listener", nqn, "-t", "tcp", "-a", "127.0.0.1", "-s", "0"],
        &["nvmf_subsystem_add_host", nqn, "nqn.2014-08.org.nvmexpress:uuid:0b6b9d2e-5b1f-4bb5-a3a0-3a9e3c2c7f00"],
        &["nvmf_subsystem_remove_host", nqn, "nqn.2014-08.org.nvmexpress:uuid:0b6b9d2e-5b1f-4bb5-a3a0-3a9e3c2c7f00"],
        &["nvmf_subsystem_allow_any_host", "--allow-any-host", nqn],
        &["nvmf_get_subsystems"],
        &["nvmf_subsystem_remove_ns", nqn, "1"],
        &["nvmf_delete_subsystem", nqn],
        &["bdev_delay_delete", "KD"],
        &["bdev_error_delete", "EE_KN"],
        &["bdev_null_delete", "KN"],
        &["bdev_aio_delete", "KA"],
        &["bdev_uring_delete", "KU"],
        &["bdev_malloc_delete", "K1"],
    ];
    for args in commands {
        let o = std::process::Command::new(&rpc).arg("--dry-run").args(*args).output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "spdk-rpc --dry-run {args:?}: {out} {}", String::from_utf8_lossy(&o.stderr));
        let request: serde_json::Value = serde_json::from_str(out.trim().trim_start_matches("Request:"))
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"));
        let method = request["method"].as_str().unwrap();
        assert_eq!(method, args[0]);
        if let Err((code, message)) = d.rpc(method, request["params"].clone()) {
            assert!(
                !message.contains("unknown parameter") && !message.contains("not supported"),
                "{args:?} sent {request}; the daemon answered {code}: {message}"
            );
        }
    }
}

/// The misspelt key and the features nvraid lacks, each through SPDK's own
/// client where its command line allows it: a readable -32602 that names
/// the method and the key, and nothing half-done.
#[test]
fn spdk_client_gets_readable_errors_for_unknown_and_unsupported_keys() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("compat-strict");
    let d = Daemon::start(&dir, &["-c", two_malloc_config(&dir).to_str().unwrap()]);
    let s = d.sock.clone();

    // The client's options are spelt right; a raw request can misspell.
    let (code, msg) = d
        .rpc(
            "bdev_raid_create",
            json!({"name": "Raid0", "raid_level": "raid1", "base_bdevs": ["Malloc0", "Malloc1"], "superblok": true}),
        )
        .unwrap_err();
    assert_eq!((code, msg.as_str()), (-32602, "bdev_raid_create: unknown parameter 'superblok'"));
    assert!(d.rpc("bdev_get_bdevs", json!({"name": "Raid0"})).is_err(), "no array was built");
    let text = spdk_fails(&rpc, &s, &["bdev_get_bdevs", "-b", "Raid0"]);
    assert!(text.contains("-19"), "{text}");

    // The transport's options are the nvmf layer's to refuse; end to end here.
    let text = spdk_fails(&rpc, &s, &["nvmf_create_transport", "-t", "tcp", "--zcopy"]);
    assert!(text.contains("-32602") && text.contains("zcopy"), "{text}");
    assert_eq!(d.ok("nvmf_get_transports", serde_json::Value::Null), json!([]), "no transport was created");

    let nqn = "nqn.2016-06.io.spdk:strict";
    spdk_ok(&rpc, &s, &["nvmf_create_transport", "-t", "tcp"]);
    spdk_ok(&rpc, &s, &["nvmf_create_subsystem", nqn]);
    let host = "nqn.2014-08.org.nvmexpress:uuid:0b6b9d2e-5b1f-4bb5-a3a0-3a9e3c2c7f00";
    // TLS is implemented (daemon/tests/nvmf_tls.rs): a psk the keyring lacks is refused by name.
    let text = spdk_fails(&rpc, &s, &["nvmf_subsystem_add_host", nqn, host, "--psk", "key0"]);
    assert!(text.contains("-32602") && text.contains("psk: key key0 not in the keyring"), "{text}");
    for (args, named) in [
        (&["bdev_malloc_create", "-b", "Md", "1", "512", "--md-size", "8"][..], "md_size"),
        (&["bdev_aio_create", "/dev/null", "A", "--no-wait"][..], "nowait"),
    ] {
        let text = spdk_fails(&rpc, &s, args);
        assert!(text.contains("-32602") && text.contains(args[0]) && text.contains(named), "{args:?}: {text}");
        assert!(text.contains("not supported"), "{args:?}: {text}");
    }
    let subs = d.ok("nvmf_get_subsystems", json!({"nqn": nqn}));
    assert!(subs[0]["hosts"].as_array().unwrap().is_empty(), "no host was added without its key: {subs}");
    assert!(subs[0]["listen_addresses"].as_array().unwrap().is_empty(), "{subs}");
}

/// A config written by SPDK's own save_config (nvmf_tgt v25.09, in the
/// fixtures) loads: the option methods for parts nvraid has are applied at
/// their defaults, those for parts it lacks are skipped and named in one
/// warning, and the bdevs, arrays and target come up.
#[test]
fn spdk_save_config_loads() {
    let dir = temp_dir("compat-spdk-config");
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../mgmt/tests/fixtures/spdk-rpc-wire/save_config.json");
    // Port 0: a free port, so tests can run side by side.
    let text = std::fs::read_to_string(fixture).unwrap().replace("\"4420\"", "\"0\"");
    let cfg = dir.join("spdk.json");
    std::fs::write(&cfg, text).unwrap();
    let d = Daemon::start(&dir, &["-c", cfg.to_str().unwrap()]);
    let names: Vec<String> = d
        .ok("bdev_get_bdevs", serde_json::Value::Null)
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    for n in ["Malloc0", "Malloc1", "Malloc2", "Malloc3", "Raid1", "Raid0"] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    let sub = d.ok("nvmf_get_subsystems", json!({"nqn": "nqn.2016-06.io.spdk:cnode1"}));
    assert_eq!(sub[0]["namespaces"][0]["bdev_name"], json!("Raid1"));
    let log = d.log_text();
    let warning = log.lines().find(|l| l.contains("skipping SPDK option methods")).unwrap_or_else(|| panic!("{log}"));
    for m in [
        "framework_set_scheduler",
        "sock_set_default_impl",
        "sock_impl_set_options",
        "iobuf_set_options",
        "accel_set_options",
        "nvmf_set_max_subsystems",
        "nvmf_set_crdt",
    ] {
        assert!(warning.contains(m), "{m} not named in: {warning}");
    }
    for m in ["bdev_set_options", "bdev_nvme_set_options", "bdev_nvme_set_hotplug", "bdev_raid_set_options"] {
        assert!(!warning.contains(m), "{m} is nvraid's and must not be skipped: {warning}");
    }
    assert!(!warning.contains("nvmf_set_config"), "nvmf_set_config is applied, not skipped: {warning}");
}

/// framework_get_reactors in SPDK's shape (spdk_top decodes exactly these
/// keys), busy and idle in ticks of tick_rate that add up to the time that
/// passed, and spdk-rpc prints it.
#[test]
fn reactors_report_busy_and_idle_ticks_like_spdk() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("compat-reactors");
    let d = Daemon::start(&dir, &["-m", "0x3"]);
    let first = spdk_ok(&rpc, &d.sock, &["framework_get_reactors"]);
    let t0 = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(400));
    let second = d.ok("framework_get_reactors", serde_json::Value::Null);
    let waited = t0.elapsed().as_secs_f64();
    let rate = second["tick_rate"].as_u64().unwrap();
    assert!(rate > 1_000_000, "{second}");
    assert_eq!(second["pid"], json!(d.child.as_ref().unwrap().id()));
    let reactors = second["reactors"].as_array().unwrap();
    assert_eq!(reactors.len(), 2);
    for (i, r) in reactors.iter().enumerate() {
        let mut keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["busy", "idle", "in_interrupt", "irq", "lcore", "lw_threads", "numa_id", "sys", "tid", "usr"]
        );
        let lw = r["lw_threads"][0].as_object().unwrap();
        let mut lw_keys: Vec<&str> = lw.keys().map(String::as_str).collect();
        lw_keys.sort_unstable();
        assert_eq!(lw_keys, ["cpumask", "elapsed", "id", "name"]);
        assert_eq!(r["lcore"], json!(i));
        assert_eq!(r["lw_threads"][0]["cpumask"], json!(["1", "2"][i]));
        assert!(r["tid"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["in_interrupt"], json!(false), "sleep-when-idle polls on a timer: not interrupt mode");
        let ticks = |v: &serde_json::Value| v["busy"].as_u64().unwrap() + v["idle"].as_u64().unwrap();
        let grown = (ticks(r) - ticks(&first["reactors"][i])) as f64 / rate as f64;
        assert!(grown > waited * 0.5 && grown < waited * 1.5, "reactor {i}: {grown} s of ticks in {waited} s");
        assert!(r["idle"].as_u64().unwrap() > r["busy"].as_u64().unwrap(), "an unused reactor is mostly idle: {r}");
    }
}
