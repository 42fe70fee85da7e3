//! NVMe/TCP TLS with a PSK through the daemon's RPCs: a secure listener
//! (`secure_channel`), a host with a `psk` key, nvraid's initiator
//! attaching with `psk` from a second daemon, and `save_config` / `-c`
//! restoring all three (the protocol itself is tested in
//! nvmf/tests/tls.rs). SPDK's `spdk_nvme_perf` as the TLS host runs in
//! scripts/peers.sh.

mod common;
use common::*;
use mgmt::nvmf::host::{self, ConnectParams, HostError};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-bbbb-cccc-dddd-000000000001";
const OTHER_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-bbbb-cccc-dddd-000000000002";
/// A 32-byte configured PSK in the interchange format, retained PSK by
/// SHA-256 (`01`).
const PSK: &str = "NVMeTLSkey-1:01:MDAxMTIyMzM0NDU1NjY3Nzg4OTlhYWJiY2NkZGVlZmZwJEiQ:";
/// The same key with the configured PSK used as the retained one (`00`):
/// a different TLS PSK, so a wrong key.
const WRONG_PSK: &str = "NVMeTLSkey-1:00:MDAxMTIyMzM0NDU1NjY3Nzg4OTlhYWJiY2NkZGVlZmZwJEiQ:";
/// A 48-byte key: TLS_AES_256_GCM_SHA384, which nvraid refuses.
const PSK_48: &str = "NVMeTLSkey-1:02:MDAxMTIyMzM0NDU1NjY3Nzg4OTlhYWJiY2NkZGVlZmYwMDExMjIzMzQ0NTU2Njc3wWXNJw==:";

fn key_file(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.to_str().unwrap().to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn addr(port: u16) -> Value {
    json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()})
}

/// What SPDK's client's `save_config` gathers: every subsystem's
/// `framework_get_config`, in `framework_get_subsystems` order.
fn save_config(d: &Daemon) -> Value {
    let subs = d.ok("framework_get_subsystems", Value::Null);
    let subsystems: Vec<Value> = subs
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let name = s["subsystem"].as_str().unwrap();
            json!({"subsystem": name, "config": d.ok("framework_get_config", json!({"name": name}))})
        })
        .collect();
    json!({"subsystems": subsystems})
}

fn section<'a>(config: &'a Value, name: &str) -> &'a Vec<Value> {
    config["subsystems"].as_array().unwrap().iter().find(|s| s["subsystem"] == json!(name)).unwrap()["config"]
        .as_array()
        .unwrap()
}

/// A target daemon: malloc namespace, HOST with `psk` key0, a secure
/// listener on `secure` and a plain one on `plain`.
fn target(dir: &Path, secure: u16, plain: u16) -> Daemon {
    let key0 = key_file(dir, "key0", PSK);
    let d = Daemon::start(dir, &[]);
    d.ok("keyring_file_add_key", json!({"name": "key0", "path": key0}));
    d.ok("bdev_malloc_create", json!({"name": "M0", "num_blocks": 8192, "block_size": 512}));
    d.ok("nvmf_create_transport", json!({"trtype": "TCP"}));
    d.ok("nvmf_create_subsystem", json!({"nqn": NQN}));
    d.ok("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "M0"}}));
    d.ok("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": HOST, "psk": "key0"}));
    d.ok("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": OTHER_HOST}));
    d.ok("nvmf_subsystem_add_listener", json!({"nqn": NQN, "listen_address": addr(secure), "secure_channel": true}));
    d.ok("nvmf_subsystem_add_listener", json!({"nqn": NQN, "listen_address": addr(plain)}));
    d
}

#[test]
fn secure_listener_psk_host_and_initiator_round_trip_through_config() {
    let dir = temp_dir("nvmf-tls");
    let (secure, plain) = (free_port(), free_port());
    let mut t = target(&dir, secure, plain);

    // What is refused, and why.
    let e = t.rpc("nvmf_subsystem_add_listener", json!({"nqn": NQN, "listen_address": addr(secure)})).unwrap_err();
    assert!(e.1.contains("exists"), "{e:?}");
    let e = t
        .rpc(
            "nvmf_subsystem_add_listener",
            json!({"nqn": NQN, "listen_address": addr(free_port()),
              "secure_channel": true, "sock_impl": "posix"}),
        )
        .unwrap_err();
    assert!(e.1.contains("sock_impl"), "{e:?}");
    t.ok("nvmf_create_subsystem", json!({"nqn": "nqn.2016-06.io.spdk:any", "allow_any_host": true}));
    let e = t
        .rpc(
            "nvmf_subsystem_add_listener",
            json!({"nqn": "nqn.2016-06.io.spdk:any",
              "listen_address": addr(free_port()), "secure_channel": true}),
        )
        .unwrap_err();
    assert!(e.1.contains("allow_any_host"), "{e:?}");
    t.ok("nvmf_delete_subsystem", json!({"nqn": "nqn.2016-06.io.spdk:any"}));
    let big = key_file(&dir, "big", PSK_48);
    t.ok("keyring_file_add_key", json!({"name": "big", "path": big}));
    let e = t.rpc("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": "nqn.x:y", "psk": "big"})).unwrap_err();
    assert!(e.1.contains("TLS_AES_256_GCM_SHA384"), "{e:?}");
    t.ok("keyring_file_remove_key", json!({"name": "big"}));
    let e = t.rpc("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": "nqn.x:y", "psk": "nokey"})).unwrap_err();
    assert!(e.1.contains("nokey"), "{e:?}");
    let e = t.rpc("nvmf_subsystem_set_keys", json!({"nqn": NQN, "host": HOST, "psk": "key0"})).unwrap_err();
    assert!(e.1.contains("psk"), "{e:?}");

    // The PSK host in plain is refused; the other host in plain is served.
    let mut p = ConnectParams::new("127.0.0.1", &plain.to_string(), NQN);
    p.hostnqn = HOST.into();
    assert!(matches!(host::connect(&p, 1), Err(HostError::Status(..))), "a PSK host connected in plain");
    p.hostnqn = OTHER_HOST.into();
    host::connect(&p, 1).unwrap_or_else(|e| panic!("plain host: {e}"));

    // nvraid's initiator, in a second daemon, attaches over TLS with a PSK.
    let idir = temp_dir("nvmf-tls-ini");
    let ikey = key_file(&idir, "hostkey", PSK);
    let wrong = key_file(&idir, "wrong", WRONG_PSK);
    let mut i = Daemon::start(&idir, &[]);
    i.ok("keyring_file_add_key", json!({"name": "hostkey", "path": ikey}));
    i.ok("keyring_file_add_key", json!({"name": "wrong", "path": wrong}));
    let attach = |name: &str, key: &str| {
        json!({"name": name, "trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1",
               "trsvcid": secure.to_string(), "subnqn": NQN, "hostnqn": HOST, "psk": key})
    };
    let e = i.rpc("bdev_nvme_attach_controller", attach("Bad", "wrong")).unwrap_err();
    assert!(e.1.contains("TLS handshake"), "{e:?}");
    assert!(t.log_text().contains("TLS handshake"), "the target logs the failed handshake");
    assert_eq!(i.ok("bdev_nvme_attach_controller", attach("Tls", "hostkey")), json!(["Tlsn1"]));
    let bdevs = i.ok("bdev_get_bdevs", json!({"name": "Tlsn1"}));
    assert_eq!(bdevs[0]["num_blocks"], json!(8192));

    // save_config keeps secure_channel, psk (target) and psk (initiator).
    let tcfg = save_config(&t);
    let nvmf = section(&tcfg, "nvmf");
    let host_call = nvmf
        .iter()
        .find(|c| c["method"] == json!("nvmf_subsystem_add_host") && c["params"]["host"] == json!(HOST))
        .unwrap();
    assert_eq!(host_call["params"]["psk"], json!("key0"));
    let listeners: Vec<(&Value, &Value)> = nvmf
        .iter()
        .filter(|c| c["method"] == json!("nvmf_subsystem_add_listener") && c["params"]["nqn"] == json!(NQN))
        .map(|c| (&c["params"]["listen_address"]["trsvcid"], &c["params"]["secure_channel"]))
        .collect();
    let (s, pl) = (json!(secure.to_string()), json!(plain.to_string()));
    assert_eq!(listeners, vec![(&s, &json!(true)), (&pl, &json!(false))]);
    let icfg = save_config(&i);
    let att = section(&icfg, "bdev").iter().find(|c| c["method"] == json!("bdev_nvme_attach_controller")).unwrap();
    assert_eq!(att["params"]["psk"], json!("hostkey"));

    // Both restart from their configs: the same configuration, and the
    // initiator attaches again over TLS.
    let (tpath, ipath) = (dir.join("t.json"), idir.join("i.json"));
    std::fs::write(&tpath, serde_json::to_vec(&tcfg).unwrap()).unwrap();
    std::fs::write(&ipath, serde_json::to_vec(&icfg).unwrap()).unwrap();
    i.stop();
    t.stop();
    let t2 = Daemon::start(&dir, &["-c", tpath.to_str().unwrap()]);
    assert_eq!(&t2.ok("framework_get_config", json!({"name": "nvmf"})), &Value::Array(nvmf.clone()));
    let i2 = Daemon::start(&idir, &["-c", ipath.to_str().unwrap()]);
    assert_eq!(i2.ok("bdev_get_bdevs", json!({"name": "Tlsn1"}))[0]["num_blocks"], json!(8192));
    assert!(t2.log_text().contains("NVMe/TCP TLS session"), "{}", t2.log_text());
}

/// SPDK's `spdk_nvme_perf` (v25.09, `$NVRAID_SPDK_BIN`, else
/// `../shared/anchors/spdk-v25.09/bin` beside the repository).
fn spdk_nvme_perf_path() -> std::path::PathBuf {
    let dir = std::env::var_os("NVRAID_SPDK_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/anchors/spdk-v25.09/bin"));
    let p = dir.join("spdk_nvme_perf");
    assert!(p.exists(), "SPDK's spdk_nvme_perf is not at {} (set NVRAID_SPDK_BIN)", p.display());
    p
}

/// One second of 4 KiB IO through SPDK's host as `host`, over TLS (`-S
/// ssl`, `--psk-path`) when a key is given; its "Total" line when it
/// attached and ran, else everything it said.
fn spdk_host_io(perf: &Path, port: u16, host: &str, psk_path: Option<&str>, workload: &str) -> Result<String, String> {
    let r = format!("trtype:tcp adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{NQN} hostnqn:{host}");
    let mut cmd = std::process::Command::new(perf);
    cmd.args(["--no-huge", "-s", "512", "-c", "0x1", "-q", "8", "-o", "4096", "-w", workload, "-M", "50"]);
    cmd.args(["-t", "1", "-r", &r]);
    if let Some(k) = psk_path {
        cmd.args(["-S", "ssl", "--psk-path", k]);
    }
    let o = cmd.stdin(std::process::Stdio::null()).output().unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    match out.lines().find(|l| l.starts_with("Total")) {
        Some(total) if o.status.success() => Ok(total.to_string()),
        _ => Err(out),
    }
}

/// SPDK's host connects to nvraid-tgt over TLS 1.3 with the PSK and runs
/// mixed reads and writes (and, for comparison, in plain as the host
/// without a PSK); with a wrong key it does not get in.
#[test]
#[ignore = "needs SPDK's spdk_nvme_perf: scripts/peers.sh runs it"]
fn spdk_host_does_io_over_tls() {
    let perf = spdk_nvme_perf_path();
    let dir = temp_dir("nvmf-tls-spdk");
    let (secure, plain) = (free_port(), free_port());
    let t = target(&dir, secure, plain);
    let good = key_file(&dir, "perf-key", PSK);
    let wrong = key_file(&dir, "perf-wrong", WRONG_PSK);
    let tls =
        spdk_host_io(&perf, secure, HOST, Some(&good), "randrw").unwrap_or_else(|o| panic!("{o}\n{}", t.log_text()));
    assert!(t.log_text().contains("NVMe/TCP TLS session"));
    let clear = spdk_host_io(&perf, plain, OTHER_HOST, None, "randrw").unwrap_or_else(|o| panic!("{o}"));
    eprintln!("spdk_nvme_perf randrw 4 KiB QD 8 against nvraid-tgt:\n  TLS:   {tls}\n  plain: {clear}");
    assert!(spdk_host_io(&perf, secure, HOST, Some(&wrong), "randread").is_err(), "a wrong key was accepted");
    assert!(spdk_host_io(&perf, plain, HOST, None, "randread").is_err(), "the PSK host got in in plain");
    assert!(t.log_text().contains("TLS handshake"), "the refusal is logged");
}

/// nvraid's initiator connects over TLS with the PSK to SPDK's `nvmf_tgt`
/// (v25.09, a secure listener and a host with a `psk` key) and verifies
/// IO at in-capsule, R2T and multi-PDU read sizes; a wrong key fails.
#[test]
#[ignore = "needs SPDK's nvmf_tgt: scripts/peers.sh runs it"]
fn nvraid_host_does_io_against_spdk_tgt_over_tls() {
    let tgt = spdk_nvme_perf_path().with_file_name("nvmf_tgt");
    let dir = temp_dir("nvmf-tls-spdk-tgt");
    let key = key_file(&dir, "key0", PSK);
    let port = free_port();
    let config = json!({"subsystems": [
        {"subsystem": "keyring", "config": [
            {"method": "keyring_file_add_key", "params": {"name": "key0", "path": key}}]},
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 8192, "block_size": 512}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": false}},
            {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN, "namespace": {"bdev_name": "Malloc0"}}},
            {"method": "nvmf_subsystem_add_listener", "params": {"nqn": NQN, "listen_address": addr(port),
                                                                 "secure_channel": true}},
            {"method": "nvmf_subsystem_add_host", "params": {"nqn": NQN, "host": HOST, "psk": "key0"}}]}]});
    let cfg = dir.join("spdk_tgt.json");
    std::fs::write(&cfg, serde_json::to_vec(&config).unwrap()).unwrap();
    let log = std::fs::File::create(dir.join("spdk_tgt.log")).unwrap();
    let sock = dir.join("spdk.sock");
    let mut child = std::process::Command::new(&tgt)
        .args(["--no-huge", "-s", "512", "-m", "0x1", "-r", sock.to_str().unwrap(), "--json", cfg.to_str().unwrap()])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed().as_secs() < 20, "nvmf_tgt did not listen");
        assert!(child.try_wait().unwrap().is_none(), "nvmf_tgt exited");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let child = Kill(child);
    let ring = mgmt::nvmf::keyring::Keyring::default();
    ring.add_file_key("key0", &key).unwrap();
    let wrong_path = key_file(&dir, "wrong", WRONG_PSK);
    ring.add_file_key("wrong", &wrong_path).unwrap();
    let mut p = ConnectParams::new("127.0.0.1", &port.to_string(), NQN);
    p.hostnqn = HOST.into();
    p.psk = ring.find("wrong");
    assert!(host::connect(&p, 1).is_err(), "a wrong key connected to SPDK's target");
    p.psk = ring.find("key0");
    let s = host::connect(&p, 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(dir.join("spdk_tgt.log")).unwrap_or_default()));
    let mut qp = mgmt::nvmf::host::HostQpair::from_parts(s.io.into_iter().next().unwrap());
    for (i, nlb) in [1u32, 8, 64, 256].into_iter().enumerate() {
        let (lba, len) = (i as u64 * 512, (nlb * 512) as usize);
        let data: Vec<u8> = (0..len).map(|x| (x as u8).wrapping_mul(13) ^ (i as u8 + 3)).collect();
        let buf = mgmt::nvmf::host::DmaBuf::alloc(len).unwrap();
        buf.copy_from(0, &data);
        qp.write(1, lba, nlb, buf.slice(0, len), 1).unwrap();
        assert!(wait_one(&mut qp).status.is_success(), "write of {nlb} blocks");
        qp.read(1, lba, nlb, mgmt::nvmf::host::DmaBuf::alloc(len).unwrap().slice(0, len), 2).unwrap();
        let c = wait_one(&mut qp);
        assert!(c.status.is_success(), "read of {nlb} blocks");
        assert!(c.buf.unwrap().to_vec() == data, "read back {nlb} blocks from SPDK over TLS");
    }
    drop(child);
}

fn wait_one(qp: &mut mgmt::nvmf::host::HostQpair) -> mgmt::nvmf::host::Completion {
    let t0 = std::time::Instant::now();
    loop {
        let mut got = None;
        qp.poll(|c| got = Some(c)).unwrap_or_else(|e| panic!("queue failed: {e}"));
        if let Some(c) = got {
            return c;
        }
        assert!(t0.elapsed().as_secs() < 20, "no completion");
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}
