//! A partial parity log replay that fails at assembly (a member write
//! error while the replay rewrites a stripe's parity) starts nothing and
//! keeps nothing: every member the assembly claimed is released (usable
//! again), the error is in the module's problems and in the array's entry
//! of `bdev_raid_get_bdevs`, and no raid bdev is registered.

mod common;
use bdev::uring::{create_uring, UringCreateParams};
use bdev::{IoType, Registry};
use bdev_raid::rpc::{bdev_raid_get_bdevs, RaidGetBdevsParams};
use bdev_raid::{RaidArray, RaidState};
use common::files::*;
use common::load::*;
use common::*;

const N: usize = 4;
/// Chunk rows: 16 blocks of 4 KiB.
const STRIP: u64 = 64 * 1024 / BS;
const SB: u64 = (N as u64 - 1) * STRIP;
/// Stripe 2: its parity (and so its log entry) on member 3 - 2 % 4 = 1.
const STRIPE: u64 = 2;
const PARITY_MEMBER: usize = 1;

#[test]
fn a_failed_log_replay_releases_every_member_and_reports_why() {
    let dir = temp_dir("ppl-replay-fail");
    let files = make_files(&dir, N, 16);
    {
        // A partial-stripe write, then a crash with the array running: the
        // superblocks say dirty and the entry is on the parity member.
        let set = start(1);
        open_members(&set, &files);
        create_sb_level(&set, "raid5", Some(64), N, 256).expect("create raid5 R");
        let base = STRIPE * SB;
        raid_io(&set, IoType::Write, base, SB, Some(blocks_of(1, base, SB)));
        raid_io(&set, IoType::Write, base + 3, 4, Some(blocks_of(2, base + 3, 4)));
        raid_io(&set, IoType::Flush, 0, 0, None);
    }
    assert!(!file_sb(&files[0]).unwrap().clean, "the crash left the superblocks dirty");
    // Restart: the parity member is behind an error bdev whose next write
    // fails (the replay's parity write is its first).
    let set = start(1);
    for (i, f) in files.iter().enumerate() {
        let file = f.to_string_lossy().to_string();
        set.call(0, move || {
            bdev_raid::init();
            let name = format!("F{i}");
            create_uring(UringCreateParams {
                filename: file,
                name: name.clone(),
                block_size: Some(BS as u32),
                uuid: None,
            })
            .unwrap();
            if i == PARITY_MEMBER {
                // Claimed before its examination reads the superblock: the
                // array finds the member as EE_F1.
                bdev::error::create(bdev::error::ErrorCreateParams { base_name: name, uuid: None }).unwrap();
                let p = serde_json::from_value(serde_json::json!({
                    "name": "EE_F1", "io_type": "write", "error_type": "failure", "num": 1
                }))
                .unwrap();
                bdev::error::inject(p).unwrap();
            }
        });
    }
    set.wait_for(20, "the failed start reported", || {
        RaidArray::problems().iter().any(|p| p.contains("partial parity log"))
    });
    set.wait_for(10, "examination done", || Registry::get().examines_pending() == 0);
    let problem = set.call(0, || RaidArray::problems().into_iter().find(|p| p.contains("partial parity log")).unwrap());
    assert!(problem.contains("not started") && problem.contains("member 1"), "{problem}");
    // The listing says why, and the array is not running.
    let list = set.call(0, || bdev_raid_get_bdevs(RaidGetBdevsParams { category: None }).unwrap());
    let r = list.as_array().unwrap().iter().find(|a| a["name"] == "R").expect("R listed").clone();
    assert_eq!(r["state"], "configuring", "{r}");
    assert_eq!(r["start_error"].as_str(), Some(problem.as_str()), "{r}");
    assert_eq!(r["num_base_bdevs_discovered"], 0, "no member is held: {r}");
    assert!(set.call(0, || RaidArray::find("R").is_some_and(|a| a.state() != RaidState::Online)));
    // Every member is free: nothing holds a claim, and another user may take it.
    let members = ["F0", "EE_F1", "F2", "F3"];
    let claims = set.call(0, move || {
        let reg = Registry::get();
        members
            .iter()
            .map(|&n| {
                let before = reg.lookup(n).unwrap().claimed_by();
                let taken = reg.claim(n, "test").map(|h| reg.release(&h, "test")).is_ok();
                (n, before, taken, reg.lookup("R").is_some())
            })
            .collect::<Vec<_>>()
    });
    for (n, before, taken, raid_registered) in claims {
        assert_eq!(before, None, "{n} still claimed after the failed start");
        assert!(taken, "{n} cannot be claimed after the failed start");
        assert!(!raid_registered, "no raid bdev R is registered");
    }
    drop(set);
    let _ = std::fs::remove_dir_all(&dir);
}
