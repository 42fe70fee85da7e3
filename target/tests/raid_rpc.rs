//! The RAID bdev through SPDK's own Python client against the real daemon:
//! raid0, raid1 and concat created with `spdk-rpc`, listed with
//! `bdev_raid_get_bdevs`, a member removed and added back (rebuild), the
//! arrays shown by `bdev_get_bdevs` and `save_config`, deleted; raid10 (which
//! SPDK's client does not know) through a raw JSON-RPC call; errors with
//! SPDK's codes.

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn names(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap().to_string()).collect()
}

fn raid<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array().unwrap().iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("{name} not listed: {list}"))
}

#[test]
fn spdk_client_drives_raid_bdevs() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("raid");
    let mut d = Daemon::start(&dir, &["-m", "0x3"]);
    let s = d.sock.clone();
    for i in 0..10 {
        let n = format!("Malloc{i}");
        assert_eq!(spdk_ok(&rpc, &s, &["bdev_malloc_create", "-b", &n, "8", "4096"]), json!(n));
    }
    spdk_ok(&rpc, &s, &["bdev_raid_create", "-n", "Raid0", "-z", "64", "-r", "raid0", "-b", "Malloc0 Malloc1"]);
    spdk_ok(&rpc, &s, &["bdev_raid_create", "-n", "Raid1", "-r", "raid1", "-b", "Malloc2 Malloc3"]);
    spdk_ok(&rpc, &s, &["bdev_raid_create", "-n", "Concat", "-z", "64", "-r", "concat", "-b", "Malloc4 Malloc5"]);
    // raid10: SPDK's client has no such level; a raw call, as SPDK names it.
    d.ok(
        "bdev_raid_create",
        json!({"name": "Raid10", "raid_level": "raid10", "strip_size_kb": 64,
               "base_bdevs": ["Malloc6", "Malloc7", "Malloc8", "Malloc9"]}),
    );

    let all = spdk_ok(&rpc, &s, &["bdev_raid_get_bdevs", "all"]);
    assert_eq!(names(&all), vec!["Raid0", "Raid1", "Concat", "Raid10"]);
    let r0 = raid(&all, "Raid0");
    assert_eq!(
        (r0["raid_level"].clone(), r0["strip_size_kb"].clone(), r0["state"].clone()),
        (json!("raid0"), json!(64), json!("online"))
    );
    assert_eq!(r0["base_bdevs_list"][1]["data_size"], json!(2048));
    assert_eq!(raid(&all, "Raid1")["strip_size_kb"], json!(0));
    assert_eq!(raid(&all, "Raid10")["num_base_bdevs"], json!(4));
    let online = spdk_ok(&rpc, &s, &["bdev_raid_get_bdevs", "online"]);
    assert_eq!(online.as_array().unwrap().len(), 4);
    assert_eq!(spdk_ok(&rpc, &s, &["bdev_raid_get_bdevs", "configuring"]), json!([]));

    let b = &spdk_ok(&rpc, &s, &["bdev_get_bdevs", "-b", "Raid0"])[0];
    assert_eq!(b["product_name"], json!("Raid Volume"));
    assert_eq!(b["num_blocks"], json!(4096));
    assert_eq!(b["driver_specific"]["raid"]["raid_level"], json!("raid0"));
    assert_eq!(spdk_ok(&rpc, &s, &["bdev_get_bdevs", "-b", "Concat"])[0]["num_blocks"], json!(4096));
    assert_eq!(spdk_ok(&rpc, &s, &["bdev_get_bdevs", "-b", "Raid10"])[0]["num_blocks"], json!(4096));
    assert_eq!(spdk_ok(&rpc, &s, &["bdev_get_bdevs", "-b", "Malloc2"])[0]["claimed"], json!(true));

    // Errors: a claimed member (-EPERM), raid0 without a strip size (-EINVAL).
    let o = spdk_rpc(&rpc, &s, &["bdev_raid_create", "-n", "Bad", "-r", "raid1", "-b", "Malloc0 Nope"]);
    assert!(!o.status.success());
    assert_eq!(
        d.rpc("bdev_raid_create", json!({"name": "Bad", "raid_level": "raid1", "base_bdevs": ["Malloc0", "Nope"]}))
            .unwrap_err()
            .0,
        -1
    );
    assert_eq!(
        d.rpc("bdev_raid_create", json!({"name": "Bad", "raid_level": "raid0", "base_bdevs": ["Nope1", "Nope2"]}))
            .unwrap_err()
            .0,
        -22
    );
    assert_eq!(d.rpc("bdev_raid_get_bdevs", json!({"category": "sideways"})).unwrap_err().0, -22);

    // Remove a mirror member and add it back: degraded, then rebuilt.
    spdk_ok(&rpc, &s, &["bdev_raid_remove_base_bdev", "Malloc3"]);
    let r1 = raid(&spdk_ok(&rpc, &s, &["bdev_raid_get_bdevs", "all"]), "Raid1").clone();
    assert_eq!(r1["num_base_bdevs_operational"], json!(1), "{r1}");
    assert_eq!(r1["base_bdevs_list"][1]["name"], Value::Null, "{r1}");
    assert_eq!(spdk_ok(&rpc, &s, &["bdev_get_bdevs", "-b", "Malloc3"])[0]["claimed"], json!(false));
    spdk_ok(&rpc, &s, &["bdev_raid_add_base_bdev", "Raid1", "Malloc3"]);
    let t0 = Instant::now();
    loop {
        let r1 = raid(&spdk_ok(&rpc, &s, &["bdev_raid_get_bdevs", "all"]), "Raid1").clone();
        if r1["num_base_bdevs_operational"] == json!(2) && r1.get("process").is_none() {
            assert_eq!(r1["base_bdevs_list"][1]["is_configured"], json!(true));
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "rebuild did not finish: {r1}");
        std::thread::sleep(Duration::from_millis(50));
    }
    spdk_ok(&rpc, &s, &["bdev_raid_set_options", "--process-window-size-kb", "512"]);

    // save_config writes the arrays after their members.
    let cfg = spdk_ok(&rpc, &s, &["save_config"]);
    let bdev_cfg = cfg["subsystems"].as_array().unwrap().iter().find(|x| x["subsystem"] == "bdev").unwrap()["config"]
        .as_array()
        .unwrap()
        .clone();
    let pos = |m: &str, n: &str| bdev_cfg.iter().position(|c| c["method"] == m && c["params"]["name"] == n).unwrap();
    assert!(pos("bdev_malloc_create", "Malloc1") < pos("bdev_raid_create", "Raid0"));
    let r10 = &bdev_cfg[pos("bdev_raid_create", "Raid10")]["params"];
    assert_eq!(r10["raid_level"], json!("raid10"));
    assert_eq!(r10["base_bdevs"], json!(["Malloc6", "Malloc7", "Malloc8", "Malloc9"]));

    for n in ["Raid0", "Raid1", "Concat", "Raid10"] {
        spdk_ok(&rpc, &s, &["bdev_raid_delete", n]);
    }
    assert_eq!(spdk_ok(&rpc, &s, &["bdev_raid_get_bdevs", "all"]), json!([]));
    assert_eq!(spdk_ok(&rpc, &s, &["bdev_get_bdevs", "-b", "Malloc0"])[0]["claimed"], json!(false));
    d.stop();
}
