//! The simple backends on reactor sets: the io_uring file bdev (data that
//! outlives the reactor set, flush/unmap/write-zeroes, bad files, short
//! files, teardown with IO in the kernel), the error-injection bdev (exact
//! counts across threaded reactors, corruption, held IOs) and the delay bdev
//! (latency on the manual clock, seeded reordering before the base, deletion
//! with IO in flight).

use bdev::malloc::MallocBdev;
use bdev::{delay, error, uring};
use bdev::{BdevError, BdevHandle, BdevProps, Channel, DmaBuf, IoBox, IoError, IoFlags, IoStatus, IoType, Registry};
use reactor::{IdlePolicy, ManualSet, ReactorConfig, ReactorSet};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Log = Rc<RefCell<Vec<(u64, IoStatus)>>>;

/// Submits one IO whose completion is logged as (tag, status).
fn submit(ch: &Channel, t: IoType, off: u64, n: u64, buf: Option<DmaBuf>, tag: u64, log: &Log) {
    let mut io = IoBox::data(t, off, n, buf).expect("IO descriptor");
    io.tag = tag;
    let l = log.clone();
    io.set_done(Rc::new(move |io: IoBox| l.borrow_mut().push((io.tag, io.status))));
    ch.submit(io);
}

/// Runs the set's reactors until `done` holds; sleeps a little when idle
/// (the kernel completes file IO on its own time). Never spins forever.
fn drive(m: &ManualSet, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        if m.run_until_idle(64) == 0 {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

fn buf_with(data: &[u8]) -> DmaBuf {
    let b = DmaBuf::alloc(data.len()).expect("DMA buffer");
    b.copy_from(0, data);
    b
}

fn malloc(name: &str, block_size: u32, blocks: u64) -> Arc<MallocBdev> {
    Arc::new(MallocBdev::new(BdevProps::new(name, "Malloc disk", block_size, blocks, None)).unwrap())
}

/// A scratch file removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(dir: &Path, tag: &str, len: u64) -> TempFile {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = dir.join(format!("nvraid-bdev-{tag}-{}-{n}", std::process::id()));
        let f = std::fs::File::create(&p).expect("create scratch file");
        f.set_len(len).unwrap();
        TempFile(p)
    }
    fn path(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// /tmp, /var/tmp (a disk file system: O_DIRECT), /dev/shm (tmpfs) and the
/// target directory, where present.
fn scratch_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![std::env::temp_dir(), PathBuf::from("/var/tmp"), PathBuf::from("/dev/shm")];
    dirs.push(PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    dirs.retain(|d| d.is_dir());
    dirs
}

fn is_tmpfs(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let canon = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    // The longest mount point that contains `dir` decides.
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, mnt, fs) = (f.next()?, f.next()?, f.next()?);
            canon.starts_with(mnt).then(|| (mnt.len(), fs == "tmpfs"))
        })
        .max()
        .is_some_and(|(_, tmpfs)| tmpfs)
}

fn uring_params(name: &str, file: &TempFile, block_size: Option<u32>) -> uring::UringCreateParams {
    serde_json::from_value(serde_json::json!({
        "name": name, "filename": file.path(), "block_size": block_size, "some_future_key": 1
    }))
    .expect("params parse, unknown keys ignored")
}

#[test]
fn file_bdev_data_outlives_the_reactor_set() {
    for dir in scratch_dirs() {
        let file = TempFile::new(&dir, "persist", 1 << 20);
        let a = pattern(7, 32 << 10);
        let b = pattern(99, 4096);
        {
            let m = ReactorSet::manual(1);
            let log: Log = Rc::default();
            let (h, ch) = m.on(0, || {
                let h = uring::create_uring(uring_params("U0", &file, None)).unwrap();
                let ch = h.channel().unwrap();
                submit(&ch, IoType::Write, 0, 8, Some(buf_with(&a)), 1, &log);
                submit(&ch, IoType::Write, 100, 1, Some(buf_with(&b)), 2, &log);
                (h, ch)
            });
            assert_eq!(h.props().block_size, 4096, "regular files default to 4 KiB blocks");
            assert_eq!(h.props().num_blocks, 256);
            let info = h.info_json();
            let ds = &info["driver_specific"]["uring"];
            assert_eq!(ds["filename"], file.path());
            assert_eq!(ds["block_size_override"], false);
            let direct = ds["direct_io"].as_bool().expect("direct_io reported");
            if dir == Path::new("/var/tmp") && !is_tmpfs(&dir) {
                assert!(direct, "a disk file system takes O_DIRECT with 4 KiB blocks");
            }
            assert_eq!(h.bdev().config().unwrap()["method"], "bdev_uring_create");
            drive(&m, "writes", || log.borrow().len() == 2);
            m.on(0, || submit(&ch, IoType::Flush, 0, 0, None, 3, &log));
            drive(&m, "flush", || log.borrow().len() == 3);
            assert!(log.borrow().iter().all(|(_, s)| *s == IoStatus::Success), "{dir:?}: {:?}", log.borrow());
        }
        // The file itself holds the data (not just some cache of ours).
        let on_disk = std::fs::read(&file.0).unwrap();
        assert_eq!(&on_disk[..a.len()], &a[..], "{dir:?}");
        assert_eq!(&on_disk[100 * 4096..101 * 4096], &b[..], "{dir:?}");
        // A new reactor set, created the aio way, with 512-byte blocks.
        let m = ReactorSet::manual(1);
        let log: Log = Rc::default();
        let (ra, rb) = (DmaBuf::zeroed(a.len()).unwrap(), DmaBuf::zeroed(4096).unwrap());
        let (ra2, rb2) = (ra.clone(), rb.clone());
        m.on(0, || {
            let p: uring::AioCreateParams = serde_json::from_value(serde_json::json!({
                "name": "A0", "filename": file.path(), "block_size": 512
            }))
            .unwrap();
            let h = uring::create_aio(p).unwrap();
            assert_eq!(h.props().num_blocks, 2048);
            assert_eq!(h.bdev().config().unwrap()["method"], "bdev_aio_create");
            assert_eq!(h.info_json()["driver_specific"]["aio"]["block_size_override"], true);
            assert!(!h.bdev().io_type_supported(IoType::Unmap), "aio unmaps only with fallocate");
            let ch = h.channel().unwrap();
            submit(&ch, IoType::Read, 0, 64, Some(ra2), 1, &log);
            submit(&ch, IoType::Read, 800, 8, Some(rb2), 2, &log);
        });
        drive(&m, "reads", || log.borrow().len() == 2);
        assert!(log.borrow().iter().all(|(_, s)| *s == IoStatus::Success));
        assert_eq!(ra.to_vec(), a, "{dir:?}");
        assert_eq!(rb.to_vec(), b, "{dir:?}");
    }
}

#[test]
fn file_bdev_flush_unmap_and_write_zeroes() {
    for dir in scratch_dirs() {
        let file = TempFile::new(&dir, "zero", 1 << 20);
        let m = ReactorSet::manual(1);
        let log: Log = Rc::default();
        let data = pattern(3, 64 * 4096);
        let ch = m.on(0, || {
            let h = uring::create_uring(uring_params("Z0", &file, Some(4096))).unwrap();
            assert!(h.bdev().io_type_supported(IoType::Unmap) && h.bdev().io_type_supported(IoType::WriteZeroes));
            let ch = h.channel().unwrap();
            submit(&ch, IoType::Write, 0, 64, Some(buf_with(&data)), 1, &log);
            ch
        });
        drive(&m, "write", || log.borrow().len() == 1);
        m.on(0, || {
            submit(&ch, IoType::Unmap, 4, 4, None, 2, &log);
            submit(&ch, IoType::WriteZeroes, 16, 4, None, 3, &log);
            submit(&ch, IoType::Flush, 0, 0, None, 4, &log);
        });
        drive(&m, "unmap, write_zeroes, flush", || log.borrow().len() == 4);
        assert!(log.borrow().iter().all(|(_, s)| *s == IoStatus::Success), "{dir:?}: {:?}", log.borrow());
        let out = DmaBuf::zeroed(data.len()).unwrap();
        m.on(0, || submit(&ch, IoType::Read, 0, 64, Some(out.clone()), 5, &log));
        drive(&m, "read back", || log.borrow().len() == 5);
        assert_eq!(log.borrow()[4].1, IoStatus::Success);
        let mut expect = data.clone();
        expect[4 * 4096..8 * 4096].fill(0);
        expect[16 * 4096..20 * 4096].fill(0);
        assert!(out.to_vec() == expect, "{dir:?}: unmapped and zeroed ranges read back as zeroes, the rest intact");
        let meta = std::fs::metadata(&file.0).unwrap();
        assert_eq!(meta.len(), 1 << 20, "fallocate keeps the file size");
        assert!(std::fs::read(&file.0).unwrap()[..expect.len()] == expect[..]);
    }
}

#[test]
fn file_bdev_refuses_bad_files_and_honours_readonly() {
    let dir = std::env::temp_dir();
    let m = ReactorSet::manual(1);
    let small = TempFile::new(&dir, "small", 100);
    let ok = TempFile::new(&dir, "ro", 64 << 10);
    let log: Log = Rc::default();
    m.on(0, || {
        let missing = uring::UringCreateParams {
            filename: "/nonexistent/nvraid/file".into(),
            name: "X".into(),
            block_size: None,
            uuid: None,
        };
        let e = uring::create_uring(missing).err().expect("missing file refused");
        assert_eq!(e.errno(), libc::ENOENT, "{e}");
        let e = uring::create_uring(uring_params("S", &small, None)).err().expect("short file refused");
        assert!(matches!(&e, BdevError::Invalid(msg) if msg.contains("smaller than one block")), "{e}");
        let e = uring::create_uring(uring_params("B", &ok, Some(1000))).err().expect("bad block size refused");
        assert!(matches!(e, BdevError::Invalid(_)), "{e}");
        let dir_params = uring::AioCreateParams {
            name: "D".into(),
            filename: dir.to_string_lossy().into_owned(),
            block_size: None,
            readonly: true,
            fallocate: false,
            uuid: None,
        };
        assert!(uring::create_aio(dir_params).is_err(), "a directory is no block device");
        let ro = uring::AioCreateParams {
            name: "RO".into(),
            filename: ok.path(),
            block_size: None,
            readonly: true,
            fallocate: true,
            uuid: None,
        };
        let h = uring::create_aio(ro).unwrap();
        let e = uring::create_uring(uring_params("RO", &ok, None)).err().expect("duplicate name refused");
        assert!(matches!(e, BdevError::Exists(_)), "{e}");
        let ch = h.channel().unwrap();
        submit(&ch, IoType::Write, 0, 1, DmaBuf::alloc(4096), 1, &log);
        submit(&ch, IoType::Unmap, 0, 1, None, 2, &log);
        submit(&ch, IoType::Read, 0, 16, DmaBuf::alloc(64 << 10), 3, &log);
    });
    drive(&m, "read-only IO", || log.borrow().len() == 3);
    let l = log.borrow();
    assert!(l.contains(&(1, IoStatus::Failed(IoError::NotSupported))));
    assert!(l.contains(&(2, IoStatus::Failed(IoError::NotSupported))));
    assert!(l.contains(&(3, IoStatus::Success)));
}

#[test]
fn file_bdev_never_reports_a_partial_read_as_success() {
    let file = TempFile::new(Path::new("/var/tmp"), "shrink", 1 << 20);
    let m = ReactorSet::manual(1);
    let log: Log = Rc::default();
    let ch = m.on(0, || uring::create_uring(uring_params("T", &file, None)).unwrap().channel().unwrap());
    // The file shrinks under the bdev: reads past the new end find nothing.
    std::fs::OpenOptions::new().write(true).open(&file.0).unwrap().set_len((512 << 10) + 1024).unwrap();
    m.on(0, || {
        submit(&ch, IoType::Read, 200, 1, DmaBuf::alloc(4096), 1, &log);
        // Straddles the new end: the kernel returns 1 KiB, then nothing.
        submit(&ch, IoType::Read, 128, 1, DmaBuf::alloc(4096), 2, &log);
        submit(&ch, IoType::Read, 0, 1, DmaBuf::alloc(4096), 3, &log);
    });
    drive(&m, "reads", || log.borrow().len() == 3);
    let l = log.borrow();
    assert!(l.contains(&(1, IoStatus::Failed(IoError::Media))), "{l:?}");
    assert!(l.contains(&(2, IoStatus::Failed(IoError::Media))), "{l:?}");
    assert!(l.contains(&(3, IoStatus::Success)), "{l:?}");
}

#[test]
fn file_bdev_teardown_waits_for_io_in_the_kernel() {
    const WRITES: usize = 128;
    const WRITE_BYTES: usize = 32 << 10;
    let file = TempFile::new(Path::new("/var/tmp"), "teardown", (WRITES * WRITE_BYTES) as u64);
    let data = pattern(42, WRITE_BYTES);
    {
        let m = ReactorSet::manual(1);
        let ch = m.on(0, || uring::create_uring(uring_params("W", &file, None)).unwrap().channel().unwrap());
        let write = |range: std::ops::Range<usize>| {
            for i in range {
                // No completer: nobody is left to hear of these.
                let io = IoBox::data(IoType::Write, (i * 8) as u64, 8, Some(buf_with(&data))).unwrap();
                ch.submit(io);
            }
        };
        // Half go to the kernel (one loop submits them), half only reach
        // the submission queue; then the set goes away at once.
        m.on(0, || write(0..WRITES / 2));
        m.run_once(0);
        m.on(0, || write(WRITES / 2..WRITES));
    }
    // The channel's drop submitted what was queued and waited for every
    // CQE: all writes are in the file.
    let on_disk = std::fs::read(&file.0).unwrap();
    for i in 0..WRITES {
        assert!(on_disk[i * WRITE_BYTES..(i + 1) * WRITE_BYTES] == data[..], "write {i} missing after teardown");
    }
}

#[test]
fn file_bdev_queues_ios_beyond_its_ring() {
    let file = TempFile::new(Path::new("/var/tmp"), "deep", 4 << 20);
    let m = ReactorSet::manual(1);
    let log: Log = Rc::default();
    let n = 3 * uring::RING_ENTRIES as u64;
    m.on(0, || {
        let ch = uring::create_uring(uring_params("Q", &file, None)).unwrap().channel().unwrap();
        for i in 0..n {
            let b = DmaBuf::alloc(4096).unwrap();
            b.fill(i as u8);
            submit(&ch, IoType::Write, i, 1, Some(b), i, &log);
        }
    });
    drive(&m, "writes beyond the ring", || log.borrow().len() == n as usize);
    assert!(log.borrow().iter().all(|(_, s)| *s == IoStatus::Success));
    let on_disk = std::fs::read(&file.0).unwrap();
    for i in 0..n as usize {
        assert!(on_disk[i * 4096..(i + 1) * 4096].iter().all(|&x| x == i as u8), "block {i}");
    }
}

/// FUA and flush reach the kernel: a FUA write is pushed with RWF_DSYNC
/// (the SQE itself is checked by the unit tests in `uring.rs`), a FUA
/// write-zeroes and a flush each become an fdatasync; plain IO syncs nothing.
/// A regular file reports a volatile cache and zero-reading holes.
#[test]
fn file_bdev_fua_is_dsync_and_flush_is_fdatasync() {
    for dir in scratch_dirs() {
        let file = TempFile::new(&dir, "fua", 1 << 20);
        let m = ReactorSet::manual(1);
        let log: Log = Rc::default();
        let (h, ch) = m.on(0, || {
            let h = uring::create_uring(uring_params("F0", &file, None)).unwrap();
            let ch = h.channel().unwrap();
            (h, ch)
        });
        assert!(h.bdev().has_write_cache(), "{dir:?}: page cache or the file system's device may cache");
        assert!(h.props().deallocated_reads_zeroes, "{dir:?}: punched holes read as zeroes");
        let counters = || {
            let ds = h.info_json()["driver_specific"]["uring"].clone();
            (ds["dsync_writes"].as_u64().expect("dsync_writes"), ds["fdatasyncs"].as_u64().expect("fdatasyncs"))
        };
        let (plain, forced) = (pattern(5, 4096), pattern(6, 8192));
        m.on(0, || {
            submit(&ch, IoType::Write, 0, 1, Some(buf_with(&plain)), 1, &log);
            submit(&ch, IoType::WriteZeroes, 8, 2, None, 2, &log);
        });
        drive(&m, "plain IO", || log.borrow().len() == 2);
        assert_eq!(counters(), (0, 0), "{dir:?}: plain IO syncs nothing");
        m.on(0, || {
            submit_flags(&ch, IoType::Write, 2, 2, Some(buf_with(&forced)), IoFlags::FUA, 3, &log);
            submit_flags(&ch, IoType::WriteZeroes, 16, 2, None, IoFlags::FUA, 4, &log);
        });
        drive(&m, "FUA IO", || log.borrow().len() == 4);
        assert_eq!(counters(), (1, 1), "{dir:?}: FUA write has RWF_DSYNC; FUA write-zeroes is followed by fdatasync");
        m.on(0, || submit(&ch, IoType::Flush, 0, 0, None, 5, &log));
        drive(&m, "flush", || log.borrow().len() == 5);
        assert_eq!(counters(), (1, 2), "{dir:?}: flush is one fdatasync");
        assert!(log.borrow().iter().all(|(_, s)| *s == IoStatus::Success), "{dir:?}: {:?}", log.borrow());
        let on_disk = std::fs::read(&file.0).unwrap();
        assert_eq!(&on_disk[..4096], &plain[..]);
        assert_eq!(&on_disk[2 * 4096..4 * 4096], &forced[..]);
    }
    // aio without fallocate does not unmap: it promises nothing about
    // deallocated blocks.
    let file = TempFile::new(&std::env::temp_dir(), "fua-aio", 1 << 20);
    let m = ReactorSet::manual(1);
    m.on(0, || {
        let p: uring::AioCreateParams =
            serde_json::from_value(serde_json::json!({"name": "FA", "filename": file.path()})).unwrap();
        let h = uring::create_aio(p).unwrap();
        assert!(!h.props().deallocated_reads_zeroes);
        assert!(h.bdev().has_write_cache());
    });
}

/// The null bdev stores nothing: no cache, whatever the props it was given say.
#[test]
fn null_bdev_has_no_write_cache() {
    let mut props = BdevProps::new("N", "Null disk", 4096, 256, None);
    props.write_cache = true;
    let n = bdev::malloc::NullBdev::new(props).unwrap();
    assert!(!bdev::Bdev::has_write_cache(&n));
    assert!(!bdev::Bdev::props(&n).deallocated_reads_zeroes, "null does not unmap");
    assert!(!bdev::Bdev::has_write_cache(&*malloc("M", 512, 64)), "RAM has no cache to lose");
}

#[allow(clippy::too_many_arguments)]
fn submit_flags(ch: &Channel, t: IoType, off: u64, n: u64, buf: Option<DmaBuf>, flags: IoFlags, tag: u64, log: &Log) {
    let mut io = IoBox::data(t, off, n, buf).expect("IO descriptor");
    io.tag = tag;
    io.flags = flags;
    let l = log.clone();
    io.set_done(Rc::new(move |io: IoBox| l.borrow_mut().push((io.tag, io.status))));
    ch.submit(io);
}

fn error_inject(name: &str, io_type: &str, error_type: &str, extra: serde_json::Value) -> Result<(), BdevError> {
    let mut v = serde_json::json!({"name": name, "io_type": io_type, "error_type": error_type});
    if let (Some(obj), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
        obj.extend(extra.clone());
    }
    error::inject(serde_json::from_value(v).unwrap())
}

#[test]
fn error_bdev_fails_exactly_n_ios_across_threaded_reactors() {
    const PER_REACTOR: u64 = 300;
    const READ_FAILURES: u64 = 37;
    const WRITE_NOMEM: u64 = 11;
    let cfg = ReactorConfig {
        cores: vec![0, 1],
        idle: IdlePolicy::sleep(),
        pin: false,
        ..ReactorConfig::new(vec![], IdlePolicy::sleep())
    };
    let set = ReactorSet::start(cfg, || {}).unwrap();
    set.call(0, || {
        Registry::get().register(malloc("M", 512, 4096)).unwrap();
        let h = error::create(error::ErrorCreateParams { base_name: "M".into(), uuid: None }).unwrap();
        assert_eq!(h.name(), "EE_M");
        assert_eq!(Registry::get().lookup("M").unwrap().claimed_by().as_deref(), Some("bdev_error EE_M"));
        error_inject("EE_M", "read", "failure", serde_json::json!({"num": READ_FAILURES})).unwrap();
        error_inject("EE_M", "write", "nomem", serde_json::json!({"num": WRITE_NOMEM})).unwrap();
    });
    // [read ok, read media, write ok, write nomem, other]
    let counts: Arc<[AtomicU64; 5]> = Arc::new(Default::default());
    let (tx, rx) = std::sync::mpsc::channel();
    for r in 0..2 {
        let (counts, tx) = (counts.clone(), tx.clone());
        set.send(r, move || {
            let ch = Registry::get().lookup("EE_M").unwrap().channel().unwrap();
            let left = Rc::new(std::cell::Cell::new(2 * PER_REACTOR));
            for i in 0..2 * PER_REACTOR {
                let t = if i & 1 == 0 { IoType::Read } else { IoType::Write };
                let mut io = IoBox::data(t, (i % 512) * 8, 8, DmaBuf::alloc(4096)).unwrap();
                let (counts, left, tx) = (counts.clone(), left.clone(), tx.clone());
                io.set_done(Rc::new(move |io: IoBox| {
                    let k = match (io.io_type, io.status) {
                        (IoType::Read, IoStatus::Success) => 0,
                        (IoType::Read, IoStatus::Failed(IoError::Media)) => 1,
                        (IoType::Write, IoStatus::Success) => 2,
                        (IoType::Write, IoStatus::Failed(IoError::NoMemory)) => 3,
                        _ => 4,
                    };
                    counts[k].fetch_add(1, Ordering::Relaxed);
                    left.set(left.get() - 1);
                    if left.get() == 0 {
                        let _ = tx.send(());
                    }
                }));
                ch.submit(io);
            }
        });
    }
    for _ in 0..2 {
        rx.recv_timeout(Duration::from_secs(20)).expect("both reactors finish");
    }
    set.stop();
    set.join();
    let c: Vec<u64> = counts.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    assert_eq!(c[1], READ_FAILURES, "exactly num reads fail: {c:?}");
    assert_eq!(c[3], WRITE_NOMEM, "exactly num writes get NoMemory: {c:?}");
    assert_eq!(c[0], 2 * PER_REACTOR - READ_FAILURES, "{c:?}");
    assert_eq!(c[2], 2 * PER_REACTOR - WRITE_NOMEM, "{c:?}");
    assert_eq!(c[4], 0, "{c:?}");
}

/// A manual set with malloc `M` (512-byte blocks) under `EE_M`; returns the
/// error bdev's channel and the malloc store.
fn error_over_malloc(m: &ManualSet) -> (Rc<Channel>, Arc<MallocBdev>) {
    let store = malloc("M", 512, 256);
    let s2 = store.clone();
    let ch = m.on(0, || {
        Registry::get().register(s2).unwrap();
        error::create(error::ErrorCreateParams { base_name: "M".into(), uuid: None }).unwrap().channel().unwrap()
    });
    (ch, store)
}

#[test]
fn error_bdev_corrupt_data_is_detected_by_reading_back() {
    let m = ReactorSet::manual(1);
    let (ch, store) = error_over_malloc(&m);
    let log: Log = Rc::default();
    let data = pattern(5, 4096);
    let w = buf_with(&data);
    m.on(0, || {
        error_inject("EE_M", "write", "corrupt_data", serde_json::json!({"corrupt_offset": 10, "corrupt_value": 255}))
            .unwrap();
        submit(&ch, IoType::Write, 0, 8, Some(w.clone()), 1, &log);
    });
    m.run_until_idle(50);
    assert_eq!(w.to_vec(), data, "the caller's buffer is never modified");
    let mut raw = vec![0u8; 4096];
    assert!(store.read_raw(0, &mut raw));
    assert_eq!(raw[10], data[10] ^ 255, "the written data was corrupted on the way down");
    raw[10] ^= 255;
    assert_eq!(raw, data, "only that byte");
    // Read back through the error bdev: the corruption shows.
    let r = DmaBuf::zeroed(4096).unwrap();
    m.on(0, || submit(&ch, IoType::Read, 0, 8, Some(r.clone()), 2, &log));
    m.run_until_idle(50);
    assert_ne!(r.to_vec(), data);
    // The rule is spent: the next write lands intact.
    m.on(0, || submit(&ch, IoType::Write, 0, 8, Some(w.clone()), 3, &log));
    m.run_until_idle(50);
    assert!(store.read_raw(0, &mut raw));
    assert_eq!(raw, data);
    // corrupt_data on reads flips the returned data, not the medium.
    m.on(0, || {
        error_inject("EE_M", "read", "corrupt_data", serde_json::json!({"corrupt_offset": 100, "corrupt_value": 15}))
            .unwrap();
        submit(&ch, IoType::Read, 0, 8, Some(r.clone()), 4, &log);
    });
    m.run_until_idle(50);
    let got = r.to_vec();
    assert_eq!(got[100], data[100] ^ 15);
    assert_eq!(got[..100], data[..100]);
    assert!(store.read_raw(0, &mut raw));
    assert_eq!(raw, data);
    assert!(log.borrow().iter().all(|(_, s)| *s == IoStatus::Success), "{:?}", log.borrow());
    // Bad injections are refused with a message a person understands.
    m.on(0, || {
        let e = error_inject("EE_M", "write", "corrupt_data", serde_json::json!({})).unwrap_err();
        assert!(e.to_string().contains("corrupt_value"), "{e}");
        let e = error_inject("EE_M", "trim", "failure", serde_json::json!({})).unwrap_err();
        assert!(e.to_string().contains("io_type 'trim'"), "{e}");
        let e = error_inject("EE_M", "read", "explode", serde_json::json!({})).unwrap_err();
        assert!(e.to_string().contains("error_type 'explode'"), "{e}");
        assert!(matches!(
            error_inject("EE_nope", "read", "failure", serde_json::json!({})),
            Err(BdevError::NotFound(_))
        ));
        let e = error_inject("M", "read", "failure", serde_json::json!({})).unwrap_err();
        assert!(e.to_string().contains("not an error injection bdev"), "{e}");
    });
}

#[test]
fn error_bdev_held_ios_abort_on_clear_resume_and_delete() {
    let mut m = ReactorSet::manual(1);
    let (ch, _store) = error_over_malloc(&m);
    let log: Log = Rc::default();
    m.on(0, || {
        error_inject("EE_M", "read", "pending", serde_json::json!({"num": 3})).unwrap();
        for tag in 0..4 {
            submit(&ch, IoType::Read, tag, 1, DmaBuf::alloc(512), tag, &log);
        }
    });
    m.run_until_idle(50);
    assert_eq!(log.borrow().as_slice(), &[(3, IoStatus::Success)], "three are held, the fourth passes");
    m.on(0, || error_inject("EE_M", "clear", "failure", serde_json::json!({})).unwrap());
    m.run_until_idle(50);
    let aborted = log.borrow().iter().filter(|(_, s)| *s == IoStatus::Failed(IoError::Aborted)).count();
    assert_eq!(aborted, 3, "{:?}", log.borrow());
    // resume_pending resubmits held IOs, which then succeed.
    log.borrow_mut().clear();
    m.on(0, || {
        error_inject("EE_M", "write", "pending", serde_json::json!({"num": 2})).unwrap();
        submit(&ch, IoType::Write, 0, 1, DmaBuf::alloc(512), 10, &log);
        submit(&ch, IoType::Write, 1, 1, DmaBuf::alloc(512), 11, &log);
    });
    m.run_until_idle(50);
    assert!(log.borrow().is_empty());
    m.on(0, || error::resume_pending(error::ErrorResumeParams { name: "EE_M".into() }).unwrap());
    m.run_until_idle(50);
    assert_eq!(log.borrow().len(), 2);
    assert!(log.borrow().iter().all(|(_, s)| *s == IoStatus::Success));
    // Deleting with IO held: the held IOs complete (Aborted), the claim goes.
    log.borrow_mut().clear();
    let (tx, rx) = std::sync::mpsc::channel();
    m.on(0, || {
        error_inject("EE_M", "write", "pending", serde_json::json!({"num": 2})).unwrap();
        submit(&ch, IoType::Write, 0, 1, DmaBuf::alloc(512), 20, &log);
        submit(&ch, IoType::Write, 1, 1, DmaBuf::alloc(512), 21, &log);
        Registry::get().unregister("EE_M", move |r| tx.send(r).unwrap());
    });
    drive_clock(&mut m, || rx.try_recv().ok()).expect("unregister finishes").unwrap();
    assert_eq!(log.borrow().len(), 2);
    assert!(log.borrow().iter().all(|(_, s)| *s == IoStatus::Failed(IoError::Aborted)), "{:?}", log.borrow());
    m.on(0, || {
        let r = Registry::get();
        assert!(r.lookup("EE_M").is_none());
        assert_eq!(r.lookup("M").unwrap().claimed_by(), None, "destruct released the claim");
        r.claim("M", "someone else").unwrap();
    });
}

/// Runs the manual set with its clock moving 100 us per round until `f`
/// yields (unregistration re-polls on a 1 ms timer).
fn drive_clock<T>(m: &mut ManualSet, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    for _ in 0..10_000 {
        if let Some(x) = f() {
            return Some(x);
        }
        m.run_until_idle(64);
        m.advance_ns(100_000);
    }
    None
}

fn delay_params(base: &str, name: &str, read_us: (u64, u64), write_us: (u64, u64)) -> serde_json::Value {
    serde_json::json!({
        "base_bdev_name": base, "name": name,
        "avg_read_latency": read_us.0, "p99_read_latency": read_us.1,
        "avg_write_latency": write_us.0, "p99_write_latency": write_us.1,
    })
}

fn create_delay(v: serde_json::Value) -> BdevHandle {
    delay::create(serde_json::from_value(v).unwrap()).unwrap()
}

#[test]
fn delay_bdev_holds_ios_for_their_latency_on_the_manual_clock() {
    let m = ReactorSet::manual(1);
    let done_at: Rc<RefCell<Vec<(u64, u64)>>> = Rc::default();
    let submit_timed = |ch: &Channel, t: IoType, tag: u64| {
        let mut io = IoBox::data(t, tag % 64, 1, DmaBuf::alloc(512)).unwrap();
        io.tag = tag;
        let d = done_at.clone();
        io.set_done(Rc::new(move |io: IoBox| {
            assert!(io.status.is_ok());
            d.borrow_mut().push((io.tag, reactor::now_ns()));
        }));
        ch.submit(io);
    };
    let ch = m.on(0, || {
        Registry::get().register(malloc("M", 512, 64)).unwrap();
        let mut p = delay_params("M", "D", (100, 1000), (200, 200));
        p["random_seed"] = serde_json::json!(11);
        let h = create_delay(p);
        assert_eq!(Registry::get().lookup("M").unwrap().claimed_by().as_deref(), Some("bdev_delay D"));
        assert_eq!(h.bdev().config().unwrap()["params"]["avg_write_latency"], 200);
        h.channel().unwrap()
    });
    m.on(0, || {
        submit_timed(&ch, IoType::Read, 1);
        submit_timed(&ch, IoType::Write, 2);
    });
    let t0 = m.now_ns();
    m.run_until_idle(20);
    m.advance_ns(99_000);
    m.run_until_idle(20);
    assert!(done_at.borrow().is_empty(), "nothing completes before its latency");
    m.advance_ns(1_000);
    m.run_until_idle(20);
    m.advance_ns(100_000);
    m.run_until_idle(20);
    let d = done_at.borrow().clone();
    assert_eq!(d, vec![(1, t0 + 100_000), (2, t0 + 200_000)], "read at 100 us, write at 200 us");
    // About one read in a hundred takes the p99 latency (seeded: exact).
    done_at.borrow_mut().clear();
    let t1 = m.now_ns();
    m.on(0, || (0..1000).for_each(|i| submit_timed(&ch, IoType::Read, i)));
    for _ in 0..1000 {
        m.run_until_idle(20);
        m.advance_ns(10_000);
    }
    let d = done_at.borrow();
    assert_eq!(d.len(), 1000);
    let slow = d.iter().filter(|(_, t)| t - t1 >= 1_000_000).count();
    assert!(d.iter().all(|(_, t)| t - t1 >= 100_000));
    assert!((1..=30).contains(&slow), "{slow} of 1000 reads took the p99 latency");
    drop(d);
    // Latencies change at run time.
    done_at.borrow_mut().clear();
    m.on(0, || {
        let p = serde_json::json!({"delay_bdev_name": "D", "delay_type": "avg_write", "latency_us": 50});
        delay::update_latency(serde_json::from_value(p).unwrap()).unwrap();
        let bad = serde_json::json!({"delay_bdev_name": "D", "latency_type": "max_write", "latency_us": 5});
        let e = delay::update_latency(serde_json::from_value(bad).unwrap()).unwrap_err();
        assert!(e.to_string().contains("latency_type 'max_write'"), "{e}");
        submit_timed(&ch, IoType::Write, 7);
    });
    let t2 = m.now_ns();
    m.advance_ns(49_000);
    m.run_until_idle(20);
    assert!(done_at.borrow().is_empty());
    m.advance_ns(1_000);
    m.run_until_idle(20);
    assert_eq!(done_at.borrow().as_slice(), &[(7, t2 + 50_000)]);
}

/// Completion order of 2 x 32 writes through a random-mode delay bdev on a
/// two-reactor manual set, and the base's final content of block 0, which
/// both reactors' first writes overlap.
fn random_run(seed: u64) -> (Vec<(usize, u64)>, u8) {
    let m = ReactorSet::manual(2);
    let store = malloc("M", 512, 64);
    let s2 = store.clone();
    m.on(0, || {
        Registry::get().register(s2).unwrap();
        let mut p = delay_params("M", "R", (0, 0), (0, 0));
        p["random_seed"] = serde_json::json!(seed);
        p["max_random_latency_us"] = serde_json::json!(1000);
        create_delay(p);
    });
    let order: Rc<RefCell<Vec<(usize, u64)>>> = Rc::default();
    for r in 0..2 {
        m.on(r, || {
            let ch = Registry::get().lookup("R").unwrap().channel().unwrap();
            for i in 0..32u64 {
                let fill = (r as u8 + 1) * 0x10 + i as u8;
                let b = DmaBuf::alloc(512).unwrap();
                b.fill(fill);
                let mut io =
                    IoBox::data(IoType::Write, if i == 0 { 0 } else { i + 32 * r as u64 }, 1, Some(b)).unwrap();
                io.tag = i;
                let o = order.clone();
                io.set_done(Rc::new(move |io: IoBox| o.borrow_mut().push((r, io.tag))));
                ch.submit(io);
            }
        });
    }
    for _ in 0..2000 {
        m.run_until_idle(20);
        m.advance_ns(1_000);
    }
    let mut raw = [0u8; 1];
    assert!(store.read_raw(0, &mut raw));
    let out = order.borrow().clone();
    assert_eq!(out.len(), 64, "seed {seed}: every write completes");
    (out, raw[0])
}

#[test]
fn delay_bdev_random_mode_reorders_reproducibly() {
    let seed: u64 = std::env::var("NVRAID_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let (a, _) = random_run(seed);
    let (b, _) = random_run(seed);
    assert_eq!(a, b, "seed {seed}: the same seed replays the same completion order");
    let (c, _) = random_run(seed + 1);
    assert_ne!(a, c, "seed {seed}: another seed gives another order");
    let per_reactor: Vec<u64> = a.iter().filter(|(r, _)| *r == 0).map(|(_, t)| *t).collect();
    assert!(per_reactor.windows(2).any(|w| w[0] > w[1]), "seed {seed}: completions are reordered: {a:?}");
}

#[test]
fn delay_bdev_delays_before_submitting_to_the_base() {
    // Block 0 gets write 0 of reactor 0 (fill 0x10) and of reactor 1 (0x20),
    // reactor 0's first. Delaying before submission, the base keeps the data
    // of whichever completed last; had the delay been applied only on
    // completion, the base would keep 0x20 whatever the completion order.
    let mut reversed = 0;
    for seed in 0..16 {
        let (order, content) = random_run(seed);
        let last = order.iter().rev().find(|(_, t)| *t == 0).map(|(r, _)| *r).unwrap();
        assert_eq!(content, (last as u8 + 1) * 0x10, "seed {seed}: base holds the last completed write");
        reversed += usize::from(last == 0);
    }
    assert!(reversed > 0, "some seed lets the earlier write reach the base last");
}

#[test]
fn deleting_a_delay_bdev_with_io_in_flight_completes_it_and_releases_the_base() {
    let mut m = ReactorSet::manual(1);
    let log: Log = Rc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let ch = m.on(0, || {
        Registry::get().register(malloc("M", 512, 64)).unwrap();
        create_delay(delay_params("M", "D", (10_000, 10_000), (10_000, 10_000))).channel().unwrap()
    });
    m.on(0, || {
        for tag in 0..8 {
            submit(&ch, IoType::Write, tag, 1, DmaBuf::alloc(512), tag, &log);
        }
        // Still the base's owner: it cannot be deleted under the delay bdev.
        let (tx2, rx2) = std::sync::mpsc::channel();
        Registry::get().unregister("M", move |r| tx2.send(r).unwrap());
        assert!(matches!(rx2.try_recv(), Ok(Err(BdevError::Claimed(..)))));
        Registry::get().unregister("D", move |r| tx.send(r).unwrap());
        submit(&ch, IoType::Write, 9, 1, DmaBuf::alloc(512), 9, &log);
    });
    let res = drive_clock(&mut m, || rx.try_recv().ok()).expect("unregister finishes");
    assert_eq!(res, Ok(()));
    let l = log.borrow();
    assert_eq!(l.iter().filter(|(_, s)| *s == IoStatus::Success).count(), 8, "{l:?}");
    assert!(l.contains(&(9, IoStatus::Failed(IoError::NoDevice))));
    // Well before the 10 ms latency: removal released the delayed IOs.
    assert!(m.now_ns() < 10_000_000, "{} ns", m.now_ns());
    m.on(0, || {
        assert!(Registry::get().lookup("D").is_none());
        assert_eq!(Registry::get().lookup("M").unwrap().claimed_by(), None);
    });
}

#[test]
fn reset_aborts_what_error_and_delay_bdevs_hold_on_every_reactor() {
    let m = ReactorSet::manual(2);
    let log: Log = Rc::default();
    m.on(0, || {
        let r = Registry::get();
        r.register(malloc("M1", 512, 64)).unwrap();
        r.register(malloc("M2", 512, 64)).unwrap();
        error::create(error::ErrorCreateParams { base_name: "M1".into(), uuid: None }).unwrap();
        create_delay(delay_params("M2", "D", (1000, 1000), (1000, 1000)));
        error_inject("EE_M1", "write", "pending", serde_json::json!({"num": 4})).unwrap();
    });
    // Two held writes and two delayed writes on each reactor.
    for r in 0..2u64 {
        m.on(r as usize, || {
            let e = Registry::get().lookup("EE_M1").unwrap().channel().unwrap();
            let d = Registry::get().lookup("D").unwrap().channel().unwrap();
            for i in 0..2 {
                submit(&e, IoType::Write, i, 1, DmaBuf::alloc(512), 10 * r + i, &log);
                submit(&d, IoType::Write, i, 1, DmaBuf::alloc(512), 100 + 10 * r + i, &log);
            }
        });
    }
    m.run_until_idle(50);
    assert!(log.borrow().is_empty());
    m.on(0, || {
        let e = Registry::get().lookup("EE_M1").unwrap().channel().unwrap();
        let d = Registry::get().lookup("D").unwrap().channel().unwrap();
        submit(&e, IoType::Reset, 0, 0, None, 1000, &log);
        submit(&d, IoType::Reset, 0, 0, None, 1001, &log);
    });
    m.run_until_idle(50);
    let l = log.borrow();
    assert!(l.contains(&(1000, IoStatus::Success)) && l.contains(&(1001, IoStatus::Success)), "{l:?}");
    let aborted = l.iter().filter(|(_, s)| *s == IoStatus::Failed(IoError::Aborted)).count();
    assert_eq!(aborted, 8, "held and delayed IOs on both reactors: {l:?}");
}
