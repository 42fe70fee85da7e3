//! The NVMe-oF target driven through SPDK's client against the real
//! daemon: transport, subsystem, namespace, listener and hosts set up with
//! `spdk-rpc`, data through nvraid's initiator, `save_config` and a restart
//! with `-c` that restores the same target; and the default config that
//! the README's run command uses.

mod common;
use common::*;
use mgmt::bdev::DmaBuf;
use mgmt::nvmf::host::{self, ConnectParams, HostQpair};
use serde_json::json;
use std::time::Duration;

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Writes a pattern and reads it back through the daemon's target.
fn data_round_trip(port: u16, fill: u8) {
    let mut p = ConnectParams::new("127.0.0.1", &port.to_string(), NQN);
    p.hostnqn = HOST.into();
    let s = host::connect(&p, 1).unwrap_or_else(|e| panic!("connect: {e}"));
    assert_eq!(s.info.namespaces.len(), 1);
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    let b = DmaBuf::alloc(65536).unwrap();
    b.fill(fill);
    qp.write(1, 16, 128, b, 1).unwrap();
    let mut done = Vec::new();
    let t0 = std::time::Instant::now();
    while done.is_empty() {
        qp.poll(|c| done.push(c)).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
    assert!(done[0].status.is_success());
    qp.read(1, 16, 128, DmaBuf::alloc(65536).unwrap(), 2).unwrap();
    done.clear();
    while done.is_empty() {
        qp.poll(|c| done.push(c)).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
    assert!(done[0].status.is_success());
    assert!(done[0].buf.as_ref().unwrap().to_vec().iter().all(|&x| x == fill));
}

#[test]
fn spdk_client_sets_up_the_target_and_save_config_restores_it() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("nvmf-rpc");
    let mut d = Daemon::start(&dir, &["-m", "0x3"]);
    let s = d.sock.clone();
    let port = free_port().to_string();

    spdk_ok(&rpc, &s, &["bdev_malloc_create", "-b", "Malloc0", "16", "512"]);
    spdk_ok(&rpc, &s, &["nvmf_create_transport", "-t", "TCP", "-q", "64", "-c", "8192", "-i", "131072"]);
    let tr = spdk_ok(&rpc, &s, &["nvmf_get_transports"]);
    assert_eq!(tr[0]["trtype"], json!("TCP"));
    assert_eq!(tr[0]["max_queue_depth"], json!(64));
    assert_eq!(tr[0]["in_capsule_data_size"], json!(8192));
    spdk_ok(&rpc, &s, &["nvmf_create_subsystem", NQN, "-s", "SPDK00000000000001", "-d", "nvraid test"]);
    spdk_ok(&rpc, &s, &["nvmf_subsystem_add_ns", NQN, "Malloc0"]);
    spdk_ok(&rpc, &s, &["nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", &port]);
    spdk_ok(&rpc, &s, &["nvmf_subsystem_add_listener", "discovery", "-t", "tcp", "-a", "127.0.0.1", "-s", &port]);
    spdk_ok(&rpc, &s, &["nvmf_subsystem_add_host", NQN, HOST]);
    // Readable errors for bad requests.
    let o = spdk_rpc(&rpc, &s, &["nvmf_subsystem_add_ns", "nqn.2016-06.io.spdk:nope", "Malloc0"]);
    assert!(!o.status.success());
    let o = spdk_rpc(&rpc, &s, &["nvmf_create_subsystem", NQN]);
    assert!(!o.status.success());

    let subs = spdk_ok(&rpc, &s, &["nvmf_get_subsystems"]);
    let sub = subs.as_array().unwrap().iter().find(|x| x["nqn"] == json!(NQN)).unwrap().clone();
    assert_eq!(sub["namespaces"][0]["bdev_name"], json!("Malloc0"));
    assert_eq!(sub["hosts"][0]["nqn"], json!(HOST));
    assert_eq!(sub["allow_any_host"], json!(false));
    assert_eq!(sub["listen_addresses"][0]["trsvcid"], json!(port));

    data_round_trip(port.parse().unwrap(), 0xA5);

    // An unlisted host is refused; allow_any_host lets it in.
    let mut p = ConnectParams::new("127.0.0.1", &port, NQN);
    p.hostnqn = "nqn.2014-08.org.example:other".into();
    assert!(host::connect(&p, 1).is_err());
    spdk_ok(&rpc, &s, &["nvmf_subsystem_allow_any_host", NQN, "--allow-any-host"]);
    host::connect(&p, 1).unwrap_or_else(|e| panic!("allow_any_host: {e}"));
    spdk_ok(&rpc, &s, &["nvmf_subsystem_allow_any_host", NQN, "--no-allow-any-host"]);

    let saved = spdk_rpc(&rpc, &s, &["save_config"]);
    assert!(saved.status.success(), "{}", String::from_utf8_lossy(&saved.stderr));
    let cfg_path = dir.join("saved.json");
    std::fs::write(&cfg_path, &saved.stdout).unwrap();
    let before = spdk_ok(&rpc, &s, &["nvmf_get_subsystems"]);
    let tr_before = spdk_ok(&rpc, &s, &["nvmf_get_transports"]);
    d.stop();

    let d2 = Daemon::start(&dir, &["-m", "0x3", "-c", cfg_path.to_str().unwrap()]);
    let after = spdk_ok(&rpc, &d2.sock, &["nvmf_get_subsystems"]);
    assert_eq!(before, after, "restart from save_config must give the same subsystems");
    assert_eq!(tr_before, spdk_ok(&rpc, &d2.sock, &["nvmf_get_transports"]));
    // The malloc data did not survive (RAM), but the export did.
    data_round_trip(port.parse().unwrap(), 0x3C);

    // Teardown through RPCs.
    spdk_ok(&rpc, &d2.sock, &["nvmf_subsystem_remove_listener", NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", &port]);
    spdk_ok(&rpc, &d2.sock, &["nvmf_subsystem_remove_ns", NQN, "1"]);
    spdk_ok(&rpc, &d2.sock, &["nvmf_subsystem_remove_host", NQN, HOST]);
    spdk_ok(&rpc, &d2.sock, &["nvmf_delete_subsystem", NQN]);
    let subs = spdk_ok(&rpc, &d2.sock, &["nvmf_get_subsystems"]);
    assert_eq!(subs.as_array().unwrap().len(), 1, "only the discovery subsystem is left: {subs}");
}

#[test]
fn attach_controller_makes_remote_namespaces_bdevs() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("nvmf-attach");
    // One daemon exports, the other attaches.
    let tgt = Daemon::start(&dir, &["-m", "0x1"]);
    let port = free_port().to_string();
    spdk_ok(&rpc, &tgt.sock, &["bdev_malloc_create", "-b", "Malloc0", "8", "512"]);
    spdk_ok(&rpc, &tgt.sock, &["nvmf_create_transport", "-t", "TCP"]);
    spdk_ok(&rpc, &tgt.sock, &["nvmf_create_subsystem", NQN, "-a"]);
    spdk_ok(&rpc, &tgt.sock, &["nvmf_subsystem_add_ns", NQN, "Malloc0"]);
    spdk_ok(&rpc, &tgt.sock, &["nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", &port]);

    let dir2 = temp_dir("nvmf-attach-host");
    let ini = Daemon::start(&dir2, &["-m", "0x3"]);
    let names = spdk_ok(
        &rpc,
        &ini.sock,
        &[
            "bdev_nvme_attach_controller",
            "-b",
            "Remote",
            "-t",
            "tcp",
            "-a",
            "127.0.0.1",
            "-s",
            &port,
            "-f",
            "ipv4",
            "-n",
            NQN,
        ],
    );
    // The client prints the new bdevs' names, one per line.
    assert_eq!(names, json!("Remoten1"));
    let b = spdk_ok(&rpc, &ini.sock, &["bdev_get_bdevs", "-b", "Remoten1"]);
    assert_eq!(b[0]["num_blocks"], json!(8 * 2048));
    assert_eq!(b[0]["block_size"], json!(512));
    let c = spdk_ok(&rpc, &ini.sock, &["bdev_nvme_get_controllers"]);
    assert_eq!(c[0]["name"], json!("Remote"));
    spdk_ok(&rpc, &ini.sock, &["bdev_nvme_detach_controller", "Remote"]);
    assert!(ini.rpc("bdev_get_bdevs", json!({"name": "Remoten1"})).is_err());
}

#[test]
fn default_config_exports_an_array_and_prints_the_connect_line() {
    // The README's run command: --default-config listens on 4420, which
    // something else (a running daemon) may hold on a developer's machine.
    if std::net::TcpListener::bind("127.0.0.1:4420").is_err() {
        return common::cannot_run("127.0.0.1:4420 is in use");
    }
    if std::net::TcpListener::bind("127.0.0.1:3260").is_err() {
        return common::cannot_run("127.0.0.1:3260 is in use");
    }
    let dir = temp_dir("nvmf-default");
    let mut d = Daemon::start(&dir, &["--default-config"]);
    let t0 = std::time::Instant::now();
    while !d.log_text().contains("nvme connect -t tcp -a 127.0.0.1 -s 4420 -n nqn.2016-06.io.nvraid:array0") {
        assert!(t0.elapsed() < Duration::from_secs(10), "no connect line: {}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let p = ConnectParams::new("127.0.0.1", "4420", "nqn.2016-06.io.nvraid:array0");
    let s = host::connect(&p, 1).unwrap_or_else(|e| panic!("connect: {e}"));
    assert_eq!(s.info.namespaces.len(), 1);
    drop(s);
    // The exported namespace is the RAID1 of the two malloc bdevs.
    let raid = d.ok("bdev_raid_get_bdevs", serde_json::json!({"category": "online"}));
    assert_eq!(raid[0]["name"], serde_json::json!("Raid1"));
    assert_eq!(raid[0]["raid_level"], serde_json::json!("raid1"));
    let subs = d.ok("nvmf_get_subsystems", serde_json::Value::Null);
    assert!(subs.to_string().contains(r#""bdev_name":"Raid1""#), "{subs}");
    // The same array over iSCSI, with the line an open-iscsi host types.
    while !d.log_text().contains("iscsiadm -m discovery -t sendtargets -p 127.0.0.1:3260") {
        assert!(t0.elapsed() < Duration::from_secs(10), "no iscsiadm line: {}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let nodes = d.ok("iscsi_get_target_nodes", serde_json::Value::Null);
    assert_eq!(nodes[0]["luns"][0]["bdev_name"], serde_json::json!("Raid1"), "{nodes}");
    assert!(nodes[0]["name"].as_str().unwrap().ends_with(":array0"), "{nodes}");
    d.stop();
}
