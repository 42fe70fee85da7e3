//! ANA and namespace masking driven through SPDK's client against the real
//! daemon, as a multipath control plane (the Ceph NVMe-oF gateway) drives
//! them: `ana_reporting`, ANA groups, per-listener states, per-host
//! namespaces, `nvmf_subsystem_get_listeners`; what a host then sees on
//! each path; and `save_config` with a restart from it giving the same.

mod common;
use common::*;
use mgmt::bdev::DmaBuf;
use mgmt::nvmf::host::{self, ConnectParams, HostQpair};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
const OTHER: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-bbbb-cccc-dddd-ffffffffffff";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Read statuses as (status code type, status code).
const OK: (u8, u8) = (0, 0);
const ANA_INACCESSIBLE: (u8, u8) = (3, 0x02);
const INVALID_NAMESPACE: (u8, u8) = (0, 0x0B);

/// NSIDs a host sees through `port`, and the status of a read of each NSID 1..=2.
fn host_view(port: &str, hostnqn: &str) -> (Vec<u32>, Vec<(u8, u8)>) {
    let mut p = ConnectParams::new("127.0.0.1", port, NQN);
    p.hostnqn = hostnqn.into();
    p.kato_ms = 0;
    let s = host::connect(&p, 1).unwrap_or_else(|e| panic!("connect: {e}"));
    let nsids = s.info.namespaces.iter().map(|n| n.nsid).collect();
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    let mut statuses = Vec::new();
    for nsid in 1..=2 {
        qp.read(nsid, 0, 8, DmaBuf::alloc(4096).unwrap(), u64::from(nsid)).unwrap();
        let mut got = None;
        let t0 = Instant::now();
        while got.is_none() {
            qp.poll(|c| got = Some((c.status.sct, c.status.sc))).unwrap();
            assert!(t0.elapsed() < Duration::from_secs(10));
        }
        statuses.push(got.unwrap());
    }
    (nsids, statuses)
}

fn listener_args(port: &str) -> [&str; 6] {
    ["-t", "tcp", "-a", "127.0.0.1", "-s", port]
}

fn states(listeners: &Value, port: &str) -> Vec<String> {
    let l = listeners.as_array().unwrap().iter().find(|l| l["address"]["trsvcid"] == json!(port)).unwrap();
    l["ana_states"].as_array().unwrap().iter().map(|s| s["ana_state"].as_str().unwrap().to_string()).collect()
}

#[test]
fn spdk_client_sets_ana_states_and_namespace_visibility_and_config_restores_them() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("nvmf-ana");
    let mut d = Daemon::start(&dir, &["-m", "0x3"]);
    let s = d.sock.clone();
    let (a, b) = (free_port().to_string(), free_port().to_string());
    let sp = |args: &[&str]| spdk_ok(&rpc, &s, args);

    sp(&["bdev_malloc_create", "-b", "Malloc0", "8", "512"]);
    sp(&["bdev_malloc_create", "-b", "Malloc1", "8", "512"]);
    sp(&["nvmf_create_transport", "-t", "TCP"]);
    sp(&["nvmf_create_subsystem", NQN, "-a", "-r", "-m", "4"]);
    sp(&["nvmf_subsystem_add_ns", NQN, "Malloc0", "-a", "2"]);
    sp(&["nvmf_subsystem_add_ns", NQN, "Malloc1", "-i"]);
    sp(&["nvmf_ns_add_host", NQN, "2", HOST]);
    sp(&[&["nvmf_subsystem_add_listener", NQN][..], &listener_args(&a)].concat());
    sp(&[&["nvmf_subsystem_add_listener", NQN, "-n", "non_optimized"][..], &listener_args(&b)].concat());
    sp(&[&["nvmf_subsystem_listener_set_ana_state", NQN, "-n", "inaccessible", "-g", "2"][..], &listener_args(&a)]
        .concat());

    let l = sp(&["nvmf_subsystem_get_listeners", NQN]);
    assert_eq!(l.as_array().unwrap().len(), 2);
    let la = l.as_array().unwrap().iter().find(|x| x["address"]["trsvcid"] == json!(a)).unwrap();
    assert_eq!(la["address"], json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": a}));
    assert_eq!(la["ana_states"][1], json!({"ana_group": 2, "ana_state": "inaccessible"}));
    assert_eq!(states(&l, &a), ["optimized", "inaccessible", "optimized", "optimized"]);
    assert_eq!(states(&l, &b), ["non_optimized"; 4]);
    let sub = &sp(&["nvmf_get_subsystems", NQN])[0];
    assert_eq!(sub["namespaces"][0]["anagrpid"], json!(2));
    assert_eq!(sub["namespaces"][1]["anagrpid"], json!(2), "its own NSID by default");

    // What hosts see: through A, NSID 1's group is inaccessible; NSID 2 is
    // HOST's only; through B, everything runs (non-optimized).
    assert_eq!(host_view(&a, HOST), (vec![1, 2], vec![ANA_INACCESSIBLE, ANA_INACCESSIBLE]));
    assert_eq!(host_view(&b, HOST), (vec![1, 2], vec![OK, OK]));
    assert_eq!(host_view(&b, OTHER), (vec![1], vec![OK, INVALID_NAMESPACE]));

    // Moving NSID 2 to group 3 makes it reachable through A again.
    sp(&["nvmf_subsystem_set_ns_ana_group", NQN, "2", "3"]);
    assert_eq!(host_view(&a, HOST).1, vec![ANA_INACCESSIBLE, OK]);

    // A connected controller and its queues, as orchestrators list them.
    let mut p = ConnectParams::new("127.0.0.1", &a, NQN);
    p.hostnqn = HOST.into();
    p.kato_ms = 0;
    let hostid = [0x42u8; 16];
    p.hostid = Some(hostid);
    let session = host::connect(&p, 2).unwrap();
    let ctrls = sp(&["nvmf_subsystem_get_controllers", NQN]);
    assert_eq!(
        ctrls,
        json!([{"cntlid": session.info.cntlid, "cntrltype": "io", "hostnqn": HOST,
                "hostid": "42424242-4242-4242-4242-424242424242", "num_io_qpairs": 2}])
    );
    let qpairs = sp(&["nvmf_subsystem_get_qpairs", NQN]);
    let qpairs = qpairs.as_array().unwrap();
    assert_eq!(qpairs.iter().map(|q| q["qid"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);
    for q in qpairs {
        assert_eq!(q["cntlid"], json!(session.info.cntlid));
        assert_eq!(q["state"], json!("enabled"));
        assert_eq!(q["hostnqn"], json!(HOST));
        assert_eq!(q["listen_address"]["trsvcid"], json!(a));
        assert_eq!(q["peer_address"]["traddr"], json!("127.0.0.1"));
        assert!(q["thread"].as_str().is_some_and(|t| !t.is_empty()));
    }
    drop(session);
    let t0 = Instant::now();
    while sp(&["nvmf_subsystem_get_controllers", NQN]) != json!([]) {
        assert!(t0.elapsed() < Duration::from_secs(10), "the controller outlived its connections");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Readable refusals.
    let bad = [
        (
            "nvmf_subsystem_listener_set_ana_state",
            json!({"nqn": NQN, "ana_state": "persistent_loss",
                "listen_address": {"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": a}}),
        ),
        (
            "nvmf_subsystem_listener_set_ana_state",
            json!({"nqn": NQN, "ana_state": "optimized", "anagrpid": 5,
                "listen_address": {"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": a}}),
        ),
        ("nvmf_subsystem_set_ns_ana_group", json!({"nqn": NQN, "nsid": 2, "anagrpid": 0})),
        ("nvmf_ns_add_host", json!({"nqn": NQN, "nsid": 1, "host": OTHER})),
        ("nvmf_subsystem_get_listeners", json!({"nqn": "nqn.2016-06.io.spdk:none"})),
    ];
    for (m, p) in bad {
        let e = d.rpc(m, p.clone()).expect_err(m);
        assert_eq!(e.0, -32602, "{m} {p}: {e:?}");
    }

    let saved = spdk_rpc(&rpc, &s, &["save_config"]);
    assert!(saved.status.success(), "{}", String::from_utf8_lossy(&saved.stderr));
    let cfg_path = dir.join("saved.json");
    std::fs::write(&cfg_path, &saved.stdout).unwrap();
    let subs_before = sp(&["nvmf_get_subsystems"]);
    let listeners_before = sp(&["nvmf_subsystem_get_listeners", NQN]);
    d.stop();

    let d2 = Daemon::start(&dir, &["-m", "0x3", "-c", cfg_path.to_str().unwrap()]);
    let sp2 = |args: &[&str]| spdk_ok(&rpc, &d2.sock, args);
    assert_eq!(subs_before, sp2(&["nvmf_get_subsystems"]));
    assert_eq!(listeners_before, sp2(&["nvmf_subsystem_get_listeners", NQN]));
    assert_eq!(host_view(&a, HOST), (vec![1, 2], vec![ANA_INACCESSIBLE, OK]));
    assert_eq!(host_view(&b, OTHER), (vec![1], vec![OK, INVALID_NAMESPACE]));
    sp2(&["nvmf_ns_remove_host", NQN, "2", HOST]);
    assert_eq!(host_view(&b, HOST).0, vec![1]);
}
