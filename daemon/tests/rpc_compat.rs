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
