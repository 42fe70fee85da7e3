//! DH-HMAC-CHAP's control plane through SPDK's client against the real
//! daemon: `keyring_file_add_key` (SPDK's checks: absolute path, mode 0600),
//! `nvmf_subsystem_add_host` with keys, `nvmf_subsystem_set_keys`,
//! `nvmf_set_config`'s lists, `keyring_file_remove_key`, `keyring_get_keys`,
//! and `save_config` with a restart from it giving the same; a host that
//! does not authenticate is refused before and after the restart. (The
//! protocol itself is tested in nvmf/tests/auth.rs.)

mod common;
use common::*;
use mgmt::nvmf::host::{self, ConnectParams, HostError};
use nvme_spec::Status;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const NQN: &str = "nqn.2016-06.io.spdk:auth";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-bbbb-cccc-dddd-000000000001";
const KEY0: &str = "DHHC-1:01:BAsSGSAnLjU8Q0pRWF9mbXR7gomQl56lrLO6wcjP1t39By5T:";
const CKEY0: &str = "DHHC-1:02:BQwTGiEoLzY9REtSWWBnbnV8g4qRmJ+mrbS7wsnQ197l7PP6AQgPFh0kKzI5QEdO0rntOQ==:";
const KEY1: &str = "DHHC-1:00:BAsSGSAnLjU8Q0pRWF9mbXR7gomQl56lrLO6wcjP1t39By5T:";

fn key_file(dir: &Path, name: &str, mode: u32, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p.to_str().unwrap().to_string()
}

/// A host without DH-HMAC-CHAP: its Connect succeeds (with ATR set) but
/// the first Property Get is refused with Authentication Required.
fn unauthenticated_host_is_refused(port: &str) {
    let mut p = ConnectParams::new("127.0.0.1", port, NQN);
    p.hostnqn = HOST.into();
    p.kato_ms = 0;
    match host::connect(&p, 1) {
        Err(HostError::Status(_, st)) => assert_eq!(st, Status::AUTHENTICATION_REQUIRED.with_dnr()),
        Err(e) => panic!("expected Authentication Required, got {e}"),
        Ok(_) => panic!("a host without DH-HMAC-CHAP was admitted"),
    }
}

fn section<'a>(config: &'a Value, name: &str) -> &'a Vec<Value> {
    config["subsystems"].as_array().unwrap().iter().find(|s| s["subsystem"] == json!(name)).unwrap()["config"]
        .as_array()
        .unwrap()
}

#[test]
fn spdk_client_manages_dhchap_keys_and_config_restores_them() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("nvmf-auth");
    let key0 = key_file(&dir, "key0", 0o600, KEY0);
    let ckey0 = key_file(&dir, "ckey0", 0o400, CKEY0);
    let key1 = key_file(&dir, "key1", 0o600, KEY1);
    let loose = key_file(&dir, "loose", 0o640, KEY1);
    let mut d = Daemon::start(&dir, &[]);
    let s = d.sock.clone();
    // SPDK's client for the calls whose arguments it maps; the daemon's
    // socket directly for the rest (each client start costs ~1 s here).
    let sp = |args: &[&str]| spdk_ok(&rpc, &s, args);
    let fails = |method: &str, params: Value| d.rpc(method, params).expect_err(method).1;

    sp(&["keyring_file_add_key", "key0", &key0]);
    d.ok("keyring_file_add_key", json!({"name": "ckey0", "path": ckey0}));
    d.ok("keyring_file_add_key", json!({"name": "key1", "path": key1}));
    let t = fails("keyring_file_add_key", json!({"name": "loose", "path": loose}));
    assert!(t.contains("permissions"), "group-readable key file: {t}");
    let t = fails("keyring_file_add_key", json!({"name": "rel", "path": "key0"}));
    assert!(t.contains("non-absolute"), "relative path: {t}");
    let t = fails("keyring_file_add_key", json!({"name": "key0", "path": key1}));
    assert!(t.contains("exists"), "duplicate name: {t}");
    let keys = d.ok("keyring_get_keys", Value::Null);
    let names: Vec<&str> = keys.as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["key0", "ckey0", "key1"]);
    assert_eq!(keys[0]["module"], json!("keyring_file"));
    assert_eq!(keys[0]["path"], json!(key0));
    assert_eq!(keys[0]["removed"], json!(false));

    let port = free_port().to_string();
    d.ok("nvmf_create_transport", json!({"trtype": "TCP"}));
    d.ok("nvmf_create_subsystem", json!({"nqn": NQN}));
    let addr = json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port});
    d.ok("nvmf_subsystem_add_listener", json!({"nqn": NQN, "listen_address": addr}));
    let t = fails("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": HOST, "dhchap_key": "nokey"}));
    assert!(t.contains("nokey"), "{t}");
    let t = fails("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": HOST, "dhchap_ctrlr_key": "ckey0"}));
    assert!(t.contains("needs a dhchap_key"), "{t}");
    sp(&["nvmf_subsystem_add_host", NQN, HOST, "--dhchap-key", "key0", "--dhchap-ctrlr-key", "ckey0"]);
    let subs = d.ok("nvmf_get_subsystems", json!({"nqn": NQN}));
    assert_eq!(subs[0]["hosts"], json!([{"nqn": HOST, "dhchap_key": "key0", "dhchap_ctrlr_key": "ckey0"}]));
    unauthenticated_host_is_refused(&port);

    // Rotation: a new host key, no controller key.
    sp(&["nvmf_subsystem_set_keys", NQN, HOST, "--dhchap-key", "key1"]);
    let subs = d.ok("nvmf_get_subsystems", json!({"nqn": NQN}));
    assert_eq!(subs[0]["hosts"], json!([{"nqn": HOST, "dhchap_key": "key1"}]));
    let t = fails("nvmf_subsystem_set_keys", json!({"nqn": NQN, "host": "nqn.2014-08.org.example:nobody"}));
    assert!(t.contains("nobody"), "{t}");
    sp(&["keyring_file_remove_key", "key0"]);
    let t = fails("keyring_file_remove_key", json!({"name": "key0"}));
    assert!(t.contains("not found"), "{t}");

    sp(&["nvmf_set_config", "--dhchap-digests", "sha384,sha512", "--dhchap-dhgroups", "null,ffdhe4096"]);
    let t = fails("nvmf_set_config", json!({"dhchap_dhgroups": ["ffdhe1024"]}));
    assert!(t.contains("ffdhe1024"), "{t}");
    let t = fails("nvmf_set_config", json!({"discovery_filter": "transport"}));
    assert!(t.contains("not supported"), "{t}");

    let saved = spdk_rpc(&rpc, &s, &["save_config"]);
    assert!(saved.status.success(), "{}", String::from_utf8_lossy(&saved.stderr));
    let config: Value = serde_json::from_slice(&saved.stdout).unwrap();
    let order: Vec<&str> =
        config["subsystems"].as_array().unwrap().iter().map(|s| s["subsystem"].as_str().unwrap()).collect();
    let (k, n) = (order.iter().position(|&x| x == "keyring"), order.iter().position(|&x| x == "nvmf"));
    assert!(k.unwrap() < n.unwrap(), "keyring before nvmf: {order:?}");
    assert_eq!(
        section(&config, "keyring"),
        &vec![
            json!({"method": "keyring_file_add_key", "params": {"name": "ckey0", "path": ckey0}}),
            json!({"method": "keyring_file_add_key", "params": {"name": "key1", "path": key1}}),
        ]
    );
    let nvmf = section(&config, "nvmf");
    assert_eq!(
        nvmf[0],
        json!({"method": "nvmf_set_config", "params": {"dhchap_digests": ["sha384", "sha512"],
                                                        "dhchap_dhgroups": ["null", "ffdhe4096"]}})
    );
    let add_host = nvmf.iter().find(|c| c["method"] == json!("nvmf_subsystem_add_host")).unwrap();
    assert_eq!(add_host["params"], json!({"nqn": NQN, "host": HOST, "dhchap_key": "key1"}));
    let cfg_path = dir.join("saved.json");
    std::fs::write(&cfg_path, &saved.stdout).unwrap();
    let subs_before = d.ok("nvmf_get_subsystems", Value::Null);
    let keys_before = d.ok("keyring_get_keys", Value::Null);
    d.stop();

    let d2 = Daemon::start(&dir, &["-c", cfg_path.to_str().unwrap()]);
    assert_eq!(subs_before, d2.ok("nvmf_get_subsystems", Value::Null));
    assert_eq!(keys_before, d2.ok("keyring_get_keys", Value::Null));
    for name in ["keyring", "nvmf"] {
        assert_eq!(
            &d2.ok("framework_get_config", json!({"name": name})),
            &Value::Array(section(&config, name).clone())
        );
    }
    unauthenticated_host_is_refused(&port);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// SPDK's `spdk_nvme_perf` (v25.09, `$NVRAID_SPDK_BIN`, else
/// `../shared/anchors/spdk-v25.09/bin` beside the repository, as
/// scripts/bench.sh finds it), an independent DH-HMAC-CHAP host.
fn spdk_nvme_perf_path() -> std::path::PathBuf {
    let dir = std::env::var_os("NVRAID_SPDK_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/anchors/spdk-v25.09/bin"));
    let p = dir.join("spdk_nvme_perf");
    if p.exists() {
        return p;
    }
    panic!("SPDK's spdk_nvme_perf is not at {} (set NVRAID_SPDK_BIN)", p.display());
}

/// One second of 4 KiB reads through SPDK's host with these key files;
/// whether it attached and ran.
fn spdk_host_reads(perf: &Path, port: &str, keys: &[&str]) -> bool {
    let r = format!("trtype:tcp adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{NQN} hostnqn:{HOST}");
    let mut cmd = std::process::Command::new(perf);
    cmd.args(["--no-huge", "-s", "512", "-c", "0x1", "-q", "4", "-o", "4096", "-w", "randread", "-t", "1", "-r", &r]);
    for (flag, k) in ["--dhchap-key", "--dhchap-ctrlr-key"].iter().zip(keys) {
        cmd.args([flag, k]);
    }
    let o = cmd.stdin(std::process::Stdio::null()).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    o.status.success() && out.lines().any(|l| l.starts_with("Total"))
}

/// SPDK's host authenticates to nvraid-tgt: bidirectionally with the
/// strongest pair (sha512, ffdhe8192) on its admin and IO queues, with
/// sha256 and the null group once the target allows only those, and not
/// with a wrong key.
///
/// A fresh CI machine has no SPDK binaries (they are built from SPDK's
/// tree, not installed), so the suite runs the independent host of
/// nvmf/tests/auth.rs instead and this one runs in scripts/peers.sh,
/// where the reference binaries are.
#[test]
#[ignore = "needs SPDK's spdk_nvme_perf: scripts/peers.sh runs it"]
fn spdk_host_authenticates_with_dhchap() {
    let perf = spdk_nvme_perf_path();
    let dir = temp_dir("nvmf-auth-spdk");
    let key0 = key_file(&dir, "key0", 0o600, KEY0);
    let ckey0 = key_file(&dir, "ckey0", 0o600, CKEY0);
    let wrong = key_file(&dir, "wrong", 0o600, KEY1);
    let d = Daemon::start(&dir, &[]);
    d.ok("keyring_file_add_key", json!({"name": "key0", "path": key0}));
    d.ok("keyring_file_add_key", json!({"name": "ckey0", "path": ckey0}));
    d.ok("bdev_malloc_create", json!({"name": "M0", "num_blocks": 8192, "block_size": 512}));
    d.ok("nvmf_create_transport", json!({"trtype": "TCP"}));
    d.ok("nvmf_create_subsystem", json!({"nqn": NQN}));
    d.ok("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "M0"}}));
    let port = free_port().to_string();
    let addr = json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port});
    d.ok("nvmf_subsystem_add_listener", json!({"nqn": NQN, "listen_address": addr}));
    d.ok(
        "nvmf_subsystem_add_host",
        json!({"nqn": NQN, "host": HOST, "dhchap_key": "key0", "dhchap_ctrlr_key": "ckey0"}),
    );

    assert!(spdk_host_reads(&perf, &port, &[&key0, &ckey0]), "bidirectional: {}", d.log_text());
    d.ok("nvmf_set_config", json!({"dhchap_digests": ["sha256"], "dhchap_dhgroups": ["null"]}));
    assert!(spdk_host_reads(&perf, &port, &[&key0]), "unidirectional: {}", d.log_text());
    assert!(!spdk_host_reads(&perf, &port, &[&wrong]), "a wrong key was accepted");
    let log = d.log_text();
    let ok: Vec<&str> = log.lines().filter(|l| l.contains("DH-HMAC-CHAP authentication succeeded")).collect();
    assert!(ok.iter().any(|l| l.contains("qid=1") && l.contains("\"ffdhe8192\"") && l.contains("bidirectional=true")));
    assert!(ok.iter().any(|l| l.contains("\"sha256\"") && l.contains("\"null\"") && l.contains("bidirectional=false")));
    assert!(log.contains("the host's response does not match its key"), "the refusal is logged");
}
