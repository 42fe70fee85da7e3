//! `--interrupt-mode` (SPDK's flag): the daemon's reactors sleep on
//! interrupts; a simulated controller attached in that mode runs its IO
//! queues on MSI-X vectors (`interrupts: true` in bdev_nvme_get_controllers)
//! and its namespace serves IO; the flag together with `--idle busy` is
//! refused with a reason.

mod common;

use common::{temp_dir, Daemon};
use serde_json::json;

#[test]
fn interrupt_mode_runs_nvme_queues_on_interrupts_or_refuses() {
    let dir = temp_dir("interrupt-mode");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nvraid-tgt"))
        .args(["--interrupt-mode", "--idle", "busy", "--no-huge", "-r"])
        .arg(dir.join("refused.sock"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--interrupt-mode") && e.contains("--idle busy"), "{e}");

    let mut d = Daemon::start(&dir, &["--interrupt-mode", "-m", "0x3"]);
    let r = d.ok("framework_get_reactors", json!({}));
    assert!(r["reactors"].as_array().unwrap().iter().all(|x| x["in_interrupt"] == true), "{r}");
    for (i, name) in ["Sim0", "Sim1"].into_iter().enumerate() {
        let names = d.ok(
            "bdev_nvme_attach_controller",
            json!({"name": name, "trtype": "SIM", "traddr": "sim", "sim_seed": i + 1, "sim_num_blocks": 4096}),
        );
        assert_eq!(names, json!([format!("{name}n1")]));
    }
    let c = d.ok("bdev_nvme_get_controllers", json!({"name": "Sim0"}));
    assert_eq!(c[0]["ctrlrs"][0]["interrupts"], true, "{c}");
    // IO through the namespace's queue pairs: a RAID1 with a superblock
    // writes and reads it there when it is created.
    d.ok(
        "bdev_raid_create",
        json!({"name": "R", "raid_level": "raid1", "base_bdevs": ["Sim0n1", "Sim1n1"], "strip_size_kb": 0, "superblock": true}),
    );
    let b = d.ok("bdev_get_bdevs", json!({"name": "R"}));
    assert!(b[0]["num_blocks"].as_u64().unwrap() > 0, "{b}");
    d.ok("bdev_raid_delete", json!({"name": "R"}));
    d.ok("bdev_nvme_detach_controller", json!({"name": "Sim0"}));
    d.ok("bdev_nvme_detach_controller", json!({"name": "Sim1"}));
    d.stop();
}
