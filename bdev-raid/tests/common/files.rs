//! Arrays with superblocks over uring file members, for the tests that need
//! members to outlive a reactor set (restarts, crashes): member files,
//! opening them as bdevs, create/delete with a superblock, one raid IO, and
//! the superblock as it lies in a file.

use super::Set;
use bdev::uring::{create_uring, UringCreateParams};
use bdev::{BdevHandle, Channel, DmaBuf, IoBox, IoType, Registry};
use bdev_raid::rpc::{bdev_raid_create_async, bdev_raid_delete, RaidCreateParams, RaidDeleteParams};
use bdev_raid::superblock::{decode, SuperblockError, SuperblockInfo, SB_SIZE_BYTES};
use serde_json::Value;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Block size of the file members.
pub const BS: u64 = 4096;

/// A test's private directory of member files, removed with everything in
/// it when the test lets go of it (the files are tens of MB); kept when the
/// test fails, to look at.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn temp_dir(tag: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("nvraid-sb-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

/// `n` sparse member files of `mib` MiB.
pub fn make_files(dir: &Path, n: usize, mib: u64) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("m{i}.img"));
            std::fs::File::create(&p).unwrap().set_len(mib << 20).unwrap();
            p
        })
        .collect()
}

/// Registers `file` as uring bdev `name` (the RAID examiner looks at it).
pub fn open_member(set: &Set, file: &Path, name: &str) {
    let (file, name) = (file.to_string_lossy().to_string(), name.to_string());
    set.call(0, move || {
        bdev_raid::init();
        create_uring(UringCreateParams { filename: file, name, block_size: Some(BS as u32), uuid: None }).unwrap();
    });
}

/// Files as bdevs F0, F1, ... in order.
pub fn open_members(set: &Set, files: &[PathBuf]) {
    for (i, f) in files.iter().enumerate() {
        open_member(set, f, &format!("F{i}"));
    }
}

/// raid1 "R" over F0.. with a superblock and bitmap chunks of `chunk_kb`.
pub fn create_sb_raid(set: &Set, members: usize, chunk_kb: u32) -> Result<Value, bdev::BdevError> {
    create_sb_level(set, "raid1", None, members, chunk_kb)
}

/// "R" of `level` (strips of `strip_kb`) over F0.. with a superblock and
/// bitmap chunks of `chunk_kb`.
pub fn create_sb_level(
    set: &Set,
    level: &'static str,
    strip_kb: Option<u32>,
    members: usize,
    chunk_kb: u32,
) -> Result<Value, bdev::BdevError> {
    set.call_async(0, 20, move |done| {
        bdev_raid_create_async(
            RaidCreateParams {
                name: "R".into(),
                raid_level: level.into(),
                base_bdevs: (0..members).map(|i| format!("F{i}")).collect(),
                strip_size_kb: strip_kb,
                uuid: None,
                superblock: Some(true),
                bitmap: None,
                bitmap_chunk_size_kb: Some(chunk_kb),
            },
            done,
        )
    })
}

/// Where array data starts on every member of "R", in blocks.
pub fn data_offset(set: &Set) -> u64 {
    let info = set.call(0, || bdev_raid::RaidArray::find("R").expect("array R").info_json());
    info["base_bdevs_list"][0]["data_offset"].as_u64().expect("data_offset")
}

/// A new two-reactor set with `files` open as F0.. and raid1 "R" created
/// over them (superblock, bitmap chunks of `chunk_kb`); and R's data offset.
pub fn start_with_sb_raid(files: &[PathBuf], chunk_kb: u32) -> (Set, u64) {
    let set = super::start(2);
    open_members(&set, files);
    create_sb_raid(&set, files.len(), chunk_kb).expect("create R");
    let offset = data_offset(&set);
    (set, offset)
}

/// `bdev_raid_remove_base_bdev` of member `name`.
pub fn remove_member(set: &Set, name: &str) {
    let name = name.to_string();
    set.call_async(0, 20, move |done| {
        bdev_raid::rpc::bdev_raid_remove_base_bdev(bdev_raid::rpc::RaidRemoveBaseBdevParams { name }, done)
    })
    .expect("remove member");
}

/// `bdev_raid_add_base_bdev` of `name` to "R".
pub fn add_member(set: &Set, name: &str) {
    let name = name.to_string();
    set.call_async(0, 20, move |done| {
        let p = bdev_raid::rpc::RaidAddBaseBdevParams { raid_bdev: "R".into(), base_bdev: name };
        bdev_raid::rpc::bdev_raid_add_base_bdev(p, done)
    })
    .expect("add member");
}

/// Rebuild windows of `window_kb` at most `mb_sec` MiB/s (0: unlimited).
pub fn set_process_rate(set: &Set, window_kb: u32, mb_sec: u32) {
    set.call(0, move || {
        let o = bdev_raid::rpc::RaidSetOptionsParams {
            process_window_size_kb: Some(window_kb),
            process_max_bandwidth_mb_sec: Some(mb_sec),
            ..Default::default()
        };
        bdev_raid::rpc::bdev_raid_set_options(o).expect("set options");
    });
}

pub fn delete_raid(set: &Set, clear_sb: bool) {
    set.call_async(0, 20, move |done| {
        bdev_raid_delete(RaidDeleteParams { name: "R".into(), clear_sb: Some(clear_sb) }, done)
    })
    .expect("delete R");
}

/// The superblock at the start of a member file.
pub fn file_sb(f: &Path) -> Result<SuperblockInfo, SuperblockError> {
    let mut bytes = vec![0u8; SB_SIZE_BYTES];
    std::io::Read::read_exact(&mut std::fs::File::open(f).unwrap(), &mut bytes).unwrap();
    decode(&bytes)
}

/// One IO of `n` blocks through "R" on reactor 0; must succeed. Returns the
/// buffer after the IO (the data, for a read).
pub fn raid_io(set: &Set, t: IoType, lba: u64, n: u64, data: Option<Vec<u8>>) -> Vec<u8> {
    set.call_async(0, 20, move |done| {
        let h: BdevHandle = Registry::get().lookup("R").expect("raid bdev");
        let ch: Rc<Channel> = h.channel().unwrap();
        let buf = DmaBuf::alloc((n * BS) as usize).unwrap();
        if let Some(d) = &data {
            buf.copy_from(0, d);
        }
        let mut io = IoBox::data(t, lba, n, Some(buf)).unwrap();
        let done = RefCell::new(Some(done));
        io.set_done(Rc::new(move |io: IoBox| {
            assert!(io.status.is_ok(), "raid {:?} at {} failed: {:?}", io.io_type, io.offset_blocks, io.status);
            let out = io.buf.as_ref().map(|b| b.to_vec()).unwrap_or_default();
            if let Some(d) = done.borrow_mut().take() {
                d(out);
            }
        }));
        ch.submit(io);
    })
}

/// `bdev_raid_check` of "R" (md's check, or repair with `repair`).
pub fn check_r(set: &Set, repair: bool) -> Value {
    set.call_async(0, 60, move |done| {
        bdev_raid::rpc::bdev_raid_check(bdev_raid::rpc::RaidCheckParams { name: "R".into(), repair }, done)
    })
    .expect("check")
}

/// The whole array read through "R", 256 blocks an IO.
pub fn read_array(set: &Set, blocks: u64) -> Vec<u8> {
    (0..blocks).step_by(256).flat_map(|lba| raid_io(set, IoType::Read, lba, 256.min(blocks - lba), None)).collect()
}

/// A new two-reactor set whose arrays start degraded one second after
/// their first member appears (`assemble_timeout_sec`).
pub fn start_assembling_degraded() -> Set {
    let set = super::start(2);
    set.call(0, || {
        bdev_raid::init();
        let o = bdev_raid::rpc::RaidSetOptionsParams { assemble_timeout_sec: Some(1), ..Default::default() };
        bdev_raid::rpc::bdev_raid_set_options(o).unwrap();
    });
    set
}

/// A restart over `files` after a clean delete: "R" assembles from its
/// superblocks, resyncs nothing, reads back as `expect` (the stamps each
/// block may hold), and its check finds nothing; then it is deleted.
pub fn restarts_clean(files: &[PathBuf], expect: &[Vec<u64>]) {
    use super::load::{copied, model_mismatches, wait_settled};
    let set = super::start(2);
    open_members(&set, files);
    wait_settled(&set, 20);
    assert_eq!(copied(&set), 0, "a clean array resyncs nothing");
    let bad = model_mismatches(&read_array(&set, expect.len() as u64), expect);
    assert!(bad.is_empty(), "data after reassembly (lba, want, got): {bad:?}");
    assert_eq!(check_r(&set, false)["mismatched_blocks"], 0);
    delete_raid(&set, false);
}
