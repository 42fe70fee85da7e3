//! Resizing bdevs through SPDK's own Python client against the real daemon:
//! `bdev_null_resize` grows a null bdev (bdev_get_bdevs and save_config show
//! the new size), a smaller size is refused with SPDK's EINVAL, and a raid1
//! over two null bdevs grows once both grew; `bdev_aio_rescan` picks up a
//! file that grew and refuses a shrink while the file bdev is claimed.

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn num_blocks(rpc: &std::path::Path, s: &std::path::Path, name: &str) -> Value {
    spdk_ok(rpc, s, &["bdev_get_bdevs", "-b", name])[0]["num_blocks"].clone()
}

fn wait_blocks(rpc: &std::path::Path, s: &std::path::Path, name: &str, want: u64) {
    let t0 = Instant::now();
    while num_blocks(rpc, s, name) != json!(want) {
        assert!(t0.elapsed() < Duration::from_secs(10), "{name} never reached {want} blocks");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn spdk_client_resizes_null_and_file_bdevs_and_a_raid1_follows() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("resize");
    let mut d = Daemon::start(&dir, &["-m", "0x3"]);
    let s = d.sock.clone();
    for n in ["Null0", "Null1"] {
        assert_eq!(spdk_ok(&rpc, &s, &["bdev_null_create", n, "4", "512"]), json!(n));
    }
    spdk_ok(&rpc, &s, &["bdev_raid_create", "-n", "Raid1", "-r", "raid1", "-b", "Null0 Null1"]);
    assert_eq!(num_blocks(&rpc, &s, "Raid1"), json!(8192));

    spdk_ok(&rpc, &s, &["bdev_null_resize", "Null0", "8"]);
    assert_eq!(num_blocks(&rpc, &s, "Null0"), json!(16384));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(num_blocks(&rpc, &s, "Raid1"), json!(8192), "one member grew: raid1 keeps its size");
    spdk_ok(&rpc, &s, &["bdev_null_resize", "Null1", "16"]);
    wait_blocks(&rpc, &s, "Raid1", 16384);

    // Smaller than now: SPDK's EINVAL; a bdev of another module: EINVAL too.
    let e = d.rpc("bdev_null_resize", json!({"name": "Null1", "new_size": 2}));
    assert!(matches!(&e, Err((-22, m)) if m.contains("smaller")), "{e:?}");
    let e = d.rpc("bdev_null_resize", json!({"name": "Raid1", "new_size": 64}));
    assert!(matches!(&e, Err((-22, _))), "{e:?}");
    let e = d.rpc("bdev_null_resize", json!({"name": "Nope", "new_size": 64}));
    assert!(matches!(&e, Err((-19, _))), "{e:?}");
    let saved = spdk_ok(&rpc, &s, &["save_config"]);
    let null1 = saved["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|sub| sub["config"].as_array().cloned().unwrap_or_default())
        .find(|c| c["method"] == "bdev_null_create" && c["params"]["name"] == "Null1")
        .expect("Null1 in save_config");
    assert_eq!(null1["params"]["num_blocks"], json!(32768), "save_config recreates the resized size");

    // A file bdev: the file grows, bdev_aio_rescan picks it up.
    let file = dir.join("aio.img");
    std::fs::File::create(&file).unwrap().set_len(4 << 20).unwrap();
    spdk_ok(&rpc, &s, &["bdev_aio_create", file.to_str().unwrap(), "Aio0", "4096"]);
    assert_eq!(num_blocks(&rpc, &s, "Aio0"), json!(1024));
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(8 << 20).unwrap();
    spdk_ok(&rpc, &s, &["bdev_aio_rescan", "Aio0"]);
    assert_eq!(num_blocks(&rpc, &s, "Aio0"), json!(2048));
    let e = d.rpc("bdev_uring_rescan", json!({"name": "Aio0"}));
    assert!(matches!(&e, Err((-19, m)) if m.contains("not uring")), "{e:?}");
    // Shrunk under a claim (a raid1 member): refused, the bdev keeps its size.
    std::fs::File::create(dir.join("aio1.img")).unwrap().set_len(8 << 20).unwrap();
    spdk_ok(&rpc, &s, &["bdev_aio_create", dir.join("aio1.img").to_str().unwrap(), "Aio1", "4096"]);
    spdk_ok(&rpc, &s, &["bdev_raid_create", "-n", "RaidF", "-r", "raid1", "-b", "Aio0 Aio1"]);
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(2 << 20).unwrap();
    let e = d.rpc("bdev_aio_rescan", json!({"name": "Aio0"}));
    assert!(matches!(&e, Err((-16, _))), "EBUSY: {e:?}");
    assert_eq!(num_blocks(&rpc, &s, "Aio0"), json!(2048));
    d.stop();
}
