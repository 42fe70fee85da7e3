//! SPDK's multipath host RPCs and per-bdev error counters, driven through
//! SPDK's own client against the real daemon: `bdev_nvme_get_io_paths`
//! and `bdev_nvme_set_preferred_path` on a namespace bdev with two paths
//! (the daemon attaches to its own subsystem through two listeners and
//! exports the namespace bdev again, so the test's IO goes through it),
//! and `bdev_get_iostat`'s `io_error` for a bdev that fails IOs.

mod common;
use common::*;
use mgmt::bdev::DmaBuf;
use mgmt::nvmf::host::{self, ConnectParams, HostQpair};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2016-06.io.spdk:paths";
const EXPORT_NQN: &str = "nqn.2016-06.io.spdk:export";
const T: Duration = Duration::from_secs(20);

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string()
}

/// `n` one-block reads (or writes) of NSID 1 through `port`, one at a
/// time; their statuses as (status code type, status code).
fn io(port: &str, nqn: &str, n: u64, write: bool) -> Vec<(u8, u8)> {
    let mut p = ConnectParams::new("127.0.0.1", port, nqn);
    p.kato_ms = 0;
    let s = host::connect(&p, 1).unwrap_or_else(|e| panic!("connect {port}: {e}"));
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    let mut out = Vec::new();
    for i in 0..n {
        let buf = DmaBuf::alloc(512).unwrap();
        if write {
            qp.write(1, i, 1, buf, i).unwrap();
        } else {
            qp.read(1, i, 1, buf, i).unwrap();
        }
        let mut got = None;
        let t0 = Instant::now();
        while got.is_none() {
            qp.poll(|c| got = Some((c.status.sct, c.status.sc))).unwrap();
            assert!(t0.elapsed() < T, "IO {i} through {port} unanswered");
        }
        out.push(got.unwrap());
    }
    drop(s.admin);
    out
}

/// Each path's `io_submitted` (nvraid's per-path count) by trsvcid.
fn submitted(rpc: &Path, sock: &Path, port: &str) -> u64 {
    let c = spdk_ok(rpc, sock, &["bdev_nvme_get_controllers", "-n", "Nvme0"]);
    let ctrlrs = c[0]["ctrlrs"].as_array().unwrap();
    let path = ctrlrs.iter().find(|x| x["trid"]["trsvcid"] == json!(port)).unwrap();
    path["io_submitted"].as_u64().unwrap()
}

fn cntlid(rpc: &Path, sock: &Path, port: &str) -> u64 {
    let c = spdk_ok(rpc, sock, &["bdev_nvme_get_controllers", "-n", "Nvme0"]);
    let ctrlrs = c[0]["ctrlrs"].as_array().unwrap();
    ctrlrs.iter().find(|x| x["trid"]["trsvcid"] == json!(port)).unwrap()["cntlid"].as_u64().unwrap()
}

/// The `io_paths` entries of bdev Nvme0n1 in each poll group that has
/// any, checked for SPDK's shape; the cntlid of the one entry `current`
/// in each group.
fn current_paths(io_paths: &Value, ports: &[&str]) -> Vec<u64> {
    let groups = io_paths["poll_groups"].as_array().expect("poll_groups");
    let mut current = Vec::new();
    for g in groups {
        let thread = g["thread"].as_str().expect("thread");
        assert!(thread == "app_thread" || thread.starts_with("reactor_"), "{thread}");
        let entries = g["io_paths"].as_array().expect("io_paths");
        if entries.is_empty() {
            continue;
        }
        assert_eq!(entries.len(), 2, "one entry per path: {g}");
        for e in entries {
            let keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
            let mut keys = keys.clone();
            keys.sort();
            assert_eq!(keys, ["accessible", "bdev_name", "cntlid", "connected", "current", "transport"], "{e}");
            assert_eq!(e["bdev_name"], json!("Nvme0n1"));
            assert_eq!((e["connected"].clone(), e["accessible"].clone()), (json!(true), json!(true)), "{e}");
            let t = &e["transport"];
            assert!(ports.iter().any(|p| t["trsvcid"] == json!(p)), "{t}");
            assert_eq!(*t, json!({"trtype": "TCP", "traddr": "127.0.0.1", "trsvcid": t["trsvcid"], "adrfam": "IPv4"}));
        }
        let cur: Vec<u64> =
            entries.iter().filter(|e| e["current"] == json!(true)).map(|e| e["cntlid"].as_u64().unwrap()).collect();
        assert_eq!(cur.len(), 1, "active/passive: one current path per channel: {g}");
        current.push(cur[0]);
    }
    current
}

#[test]
fn preferred_path_takes_the_io_and_io_paths_show_it_current() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("nvme-io-paths");
    let d = Daemon::start(&dir, &["-m", "0x3"]);
    let s = d.sock.clone();
    let sp = |args: &[&str]| spdk_ok(&rpc, &s, args);
    let (a, b, export) = (free_port(), free_port(), free_port());

    sp(&["bdev_malloc_create", "-b", "Malloc0", "4", "512"]);
    sp(&["nvmf_create_transport", "-t", "TCP"]);
    sp(&["nvmf_create_subsystem", NQN, "-a", "-r"]);
    // Another UUID than Malloc0's: the namespace bdev lives beside it.
    sp(&["nvmf_subsystem_add_ns", NQN, "Malloc0", "-u", "6d1e2c4a-0b7f-4c55-9a0e-5f1d2e3c4b5a"]);
    for port in [&a, &b] {
        sp(&["nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", port]);
    }
    let attach = |port: &str, extra: &[&str]| {
        let base = ["bdev_nvme_attach_controller", "-b", "Nvme0", "-t", "tcp", "-a", "127.0.0.1", "-f", "ipv4"];
        sp(&[&base[..], &["-s", port, "-n", NQN], extra].concat())
    };
    assert_eq!(attach(&a, &[]), json!("Nvme0n1"));
    assert_eq!(attach(&b, &["-x", "multipath"]), json!("Nvme0n1"));
    sp(&["nvmf_create_subsystem", EXPORT_NQN, "-a"]);
    sp(&["nvmf_subsystem_add_ns", EXPORT_NQN, "Nvme0n1"]);
    sp(&["nvmf_subsystem_add_listener", EXPORT_NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", &export]);
    let (ca, cb) = (cntlid(&rpc, &s, &a), cntlid(&rpc, &s, &b));
    assert_ne!(ca, cb);

    // Active/passive, both paths optimized: the first attached takes it all.
    let ios = 16;
    let before = (submitted(&rpc, &s, &a), submitted(&rpc, &s, &b));
    assert!(io(&export, EXPORT_NQN, ios, true).iter().all(|&st| st == (0, 0)));
    let after = (submitted(&rpc, &s, &a), submitted(&rpc, &s, &b));
    assert_eq!((after.0 - before.0, after.1 - before.1), (ios, 0), "IO before a preference");
    let paths = sp(&["bdev_nvme_get_io_paths"]);
    let current = current_paths(&paths, &[&a, &b]);
    assert!(!current.is_empty(), "the exported bdev's channel has its paths listed: {paths}");
    assert!(current.iter().all(|&c| c == ca), "{paths}");
    // The name filters; another bdev's name leaves the groups empty.
    assert_eq!(sp(&["bdev_nvme_get_io_paths", "-n", "Nvme0n1"]), paths);
    let none = sp(&["bdev_nvme_get_io_paths", "-n", "Malloc0"]);
    assert!(none["poll_groups"].as_array().unwrap().iter().all(|g| g["io_paths"] == json!([])), "{none}");

    // The second path preferred: it is current and takes the IO.
    // (SPDK's client prints nothing for it; the call succeeded.)
    sp(&["bdev_nvme_set_preferred_path", "-b", "Nvme0n1", "-c", &cb.to_string()]);
    let paths = sp(&["bdev_nvme_get_io_paths", "-n", "Nvme0n1"]);
    let current = current_paths(&paths, &[&a, &b]);
    assert!(!current.is_empty() && current.iter().all(|&c| c == cb), "{paths}");
    let before = after;
    assert!(io(&export, EXPORT_NQN, ios, false).iter().all(|&st| st == (0, 0)));
    let after = (submitted(&rpc, &s, &a), submitted(&rpc, &s, &b));
    assert_eq!((after.0 - before.0, after.1 - before.1), (0, ios), "IO after preferring path {b}");

    // It holds across a reconnect of the controller's connections.
    let reconnects = || {
        let c = sp(&["bdev_nvme_get_controllers", "-n", "Nvme0"]);
        c[0]["ctrlrs"].as_array().unwrap().iter().map(|x| x["reconnects"].as_u64().unwrap()).sum::<u64>()
    };
    let reconnected = reconnects();
    sp(&["bdev_nvme_reset_controller", "Nvme0"]);
    let t0 = Instant::now();
    loop {
        let c = sp(&["bdev_nvme_get_controllers", "-n", "Nvme0"]);
        if c[0]["ctrlrs"].as_array().unwrap().iter().all(|x| x["state"] == json!("enabled"))
            && reconnects() > reconnected
        {
            break;
        }
        assert!(t0.elapsed() < T, "not reconnected: {c}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = (submitted(&rpc, &s, &a), submitted(&rpc, &s, &b));
    assert!(io(&export, EXPORT_NQN, ios, false).iter().all(|&st| st == (0, 0)));
    let after = (submitted(&rpc, &s, &a), submitted(&rpc, &s, &b));
    assert_eq!((after.0 - before.0, after.1 - before.1), (0, ios), "IO after the reset");

    // Refusals as SPDK's: ENODEV for an unknown bdev, a bdev of another
    // module, or a controller ID none of the bdev's paths has.
    for (name, c) in [("Nope", cb), ("Malloc0", cb), ("Nvme0n1", 0xfff0)] {
        let e = d.rpc("bdev_nvme_set_preferred_path", json!({"name": name, "cntlid": c})).unwrap_err();
        assert_eq!(e.0, -libc::ENODEV as i64, "{name} {c}: {e:?}");
        assert!(e.1.starts_with("No such device"), "{e:?}");
    }
    let o = spdk_rpc(&rpc, &s, &["bdev_nvme_set_preferred_path", "-b", "Nope", "-c", "1"]);
    assert!(!o.status.success());
    // SPDK's save_config does not write the preference; nor does nvraid's.
    let saved = sp(&["save_config"]).to_string();
    assert!(saved.contains("bdev_nvme_attach_controller") && !saved.contains("set_preferred_path"));
}

#[test]
fn iostat_io_error_counts_failed_ios_by_spdk_status() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("iostat-io-error");
    let d = Daemon::start(&dir, &["-m", "0x3"]);
    let s = d.sock.clone();
    let sp = |args: &[&str]| spdk_ok(&rpc, &s, args);
    let port = free_port();
    sp(&["bdev_malloc_create", "-b", "Malloc0", "4", "512"]);
    sp(&["bdev_error_create", "Malloc0"]);
    sp(&["nvmf_create_transport", "-t", "TCP"]);
    sp(&["nvmf_create_subsystem", NQN, "-a"]);
    sp(&["nvmf_subsystem_add_ns", NQN, "EE_Malloc0"]);
    sp(&["nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", &port]);
    let io_error = |name: &str| {
        let v = sp(&["bdev_get_iostat", "--names", name]);
        v["bdevs"][0]["io_error"].clone()
    };
    let reads_done = |name: &str| sp(&["bdev_get_iostat", "--names", name])["bdevs"][0]["num_read_ops"].as_u64();
    let reads_before = reads_done("EE_Malloc0").unwrap();
    // No IO failed yet: the object is there, empty, as in SPDK.
    assert!(io(&port, NQN, 4, false).iter().all(|&st| st == (0, 0)));
    assert_eq!(io_error("EE_Malloc0"), json!({}));

    // 3 reads fail (SPDK's "failed"), then 2 writes with an NVMe status
    // (SPDK's "nvme_error"); the base bdev saw none fail.
    sp(&["bdev_error_inject_error", "EE_Malloc0", "read", "failure", "-n", "3"]);
    let reads = io(&port, NQN, 5, false);
    assert_eq!(reads.iter().filter(|&&st| st != (0, 0)).count(), 3, "{reads:?}");
    sp(&[
        "bdev_error_inject_error",
        "EE_Malloc0",
        "write",
        "nvme_failure",
        "-n",
        "2",
        "--nvme-sct",
        "0",
        "--nvme-sc",
        "6",
    ]);
    let writes = io(&port, NQN, 4, true);
    assert_eq!(writes.iter().filter(|&&st| st == (0, 6)).count(), 2, "{writes:?}");
    assert_eq!(io_error("EE_Malloc0"), json!({"failed": 3, "nvme_error": 2}));
    assert_eq!(io_error("Malloc0"), json!({}));
    assert_eq!(reads_done("EE_Malloc0").unwrap() - reads_before, 4 + 2, "failed IOs are not counted as done");
    // Every bdev's entry has it (the listing without names too).
    let all = sp(&["bdev_get_iostat"]);
    assert!(all["bdevs"].as_array().unwrap().iter().all(|b| b["io_error"].is_object()), "{all}");
}
