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

/// An array with a superblock through SPDK's client: `-s` at create, the
/// data offset in the listing, no create in `save_config` (the members carry
/// the array), a restart with only the member bdevs in the config assembles
/// it, `bdev_raid_check` (raw: SPDK's client has no such method), and
/// `bdev_raid_delete -c` wipes the superblocks so the next start has none.
#[test]
fn spdk_client_drives_a_superblock_array_across_restarts() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("raid-sb");
    let files: Vec<std::path::PathBuf> = (0..2).map(|i| dir.join(format!("m{i}.img"))).collect();
    for f in &files {
        std::fs::File::create(f).unwrap().set_len(16 << 20).unwrap();
    }
    let bdevs: Vec<Value> = files
        .iter()
        .enumerate()
        .map(|(i, f)| json!({"method": "bdev_uring_create", "params": {"name": format!("F{i}"), "filename": f, "block_size": 4096}}))
        .collect();
    let cfg_path = dir.join("members.json");
    let mut cfg = bdevs.clone();
    cfg.push(json!({"method": "bdev_wait_for_examine"}));
    std::fs::write(&cfg_path, json!({"subsystems": [{"subsystem": "bdev", "config": cfg}]}).to_string()).unwrap();

    let mut d = Daemon::start(&dir, &["-m", "0x3", "-c", cfg_path.to_str().unwrap()]);
    let s = d.sock.clone();
    spdk_ok(&rpc, &s, &["bdev_raid_create", "-n", "RaidSb", "-r", "raid1", "-b", "F0 F1", "-s"]);
    let r = raid(&spdk_ok(&rpc, &s, &["bdev_raid_get_bdevs", "all"]), "RaidSb").clone();
    assert_eq!(r["superblock"], json!(true), "{r}");
    assert_eq!(r["state"], json!("online"), "{r}");
    let offset = r["base_bdevs_list"][0]["data_offset"].as_u64().unwrap();
    assert!(offset > 0 && (offset * 4096).is_multiple_of(1 << 20), "data offset {offset} is 1 MiB aligned: {r}");
    let saved = spdk_ok(&rpc, &s, &["save_config"]).to_string();
    assert!(!saved.contains("RaidSb"), "a superblock array is not in save_config: {saved}");
    let check = d.ok("bdev_raid_check", json!({"name": "RaidSb"}));
    assert_eq!(check["mismatched_blocks"], json!(0), "{check}");
    assert_eq!(check["completed"], json!(true), "{check}");
    d.stop();

    // The member bdevs alone bring the array back.
    let mut d = Daemon::start(&dir, &["-m", "0x3", "-c", cfg_path.to_str().unwrap()]);
    let s = d.sock.clone();
    let r = raid(&spdk_ok(&rpc, &s, &["bdev_raid_get_bdevs", "online"]), "RaidSb").clone();
    assert_eq!(r["base_bdevs_list"][1]["name"], json!("F1"), "{r}");
    assert_eq!(r["copied_blocks"], json!(0), "a clean shutdown needs no resync: {r}");
    spdk_ok(&rpc, &s, &["bdev_raid_delete", "-c", "RaidSb"]);
    d.stop();

    let mut d = Daemon::start(&dir, &["-m", "0x3", "-c", cfg_path.to_str().unwrap()]);
    let s = d.sock.clone();
    assert_eq!(spdk_ok(&rpc, &s, &["bdev_raid_get_bdevs", "all"]), json!([]), "wiped superblocks assemble nothing");
    assert_eq!(spdk_ok(&rpc, &s, &["bdev_get_bdevs", "-b", "F0"])[0]["claimed"], json!(false));
    d.stop();
}
