//! Benchmark (not a test): resync time after a crash with 1 % of the bitmap's
//! chunks dirty, against the full resync of the same array without a bitmap.
//!
//! `cargo run --release -p bdev-raid --example resync_time [member_mib] [chunk_kb] [dirty_percent]`
//! (defaults 1024 MiB, 1024 KiB, 1 %). Members are two files in /dev/shm
//! (tmpfs) served by the uring bdev, so the figure is the RAID's resync
//! machinery plus memory copies, not a disk's speed.
//!
//! For each mode (bitmap, then `bitmap: false`), in process:
//! 1. a reactor set opens the two members and creates a raid1 with a
//!    superblock (rebuild bandwidth unlimited);
//! 2. a writer keeps random 4 KiB writes in flight on `dirty_percent` % of
//!    the chunks (chosen at random); it stops, and the moment its last
//!    write completes the set is stopped without deleting the array: a
//!    crash, as far as the members can tell (superblocks dirty, the bitmap's
//!    bits still set, which is checked); then one block of each written
//!    chunk is overwritten on the second member, as if a write had reached
//!    only the first;
//! 3. a new set registers the members; the array assembles from its
//!    superblocks and resyncs. Timed from the first member's registration
//!    until the array is online with no resync pending or running.
//!
//! Afterwards the array is deleted cleanly and the members' data regions
//! are compared: the resync must have made them identical again.

use bdev::rng::SimRng;
use bdev::uring::{create_uring, UringCreateParams};
use bdev::{BdevError, DmaBuf, IoBox, IoDone, IoType};
use bdev_raid::rpc::{
    bdev_raid_create_async, bdev_raid_delete, bdev_raid_set_options, RaidCreateParams, RaidDeleteParams,
    RaidSetOptionsParams,
};
use bdev_raid::superblock::{decode, SB_SIZE_BYTES};
use bdev_raid::{RaidArray, RaidState};
use reactor::{IdlePolicy, PollStatus, ReactorConfig, ReactorSet};
use serde_json::Value;
use std::cell::{Cell, RefCell};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BS: u64 = 4096;
const WRITER_DEPTH: usize = 32;
/// How long the writer runs before the crash.
const WRITE_MS: u64 = 300;

fn start_set() -> ReactorSet {
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0], IdlePolicy::BusyPoll) };
    ReactorSet::start(cfg, || {}).expect("reactor")
}

/// Runs `f(done)` on reactor 0 and waits for `done`.
fn call_async<R: Send + 'static>(
    set: &ReactorSet,
    secs: u64,
    f: impl FnOnce(Box<dyn FnOnce(R) + Send>) + Send + 'static,
) -> R {
    let (tx, rx) = mpsc::sync_channel(1);
    set.send(0, move || {
        f(Box::new(move |v| {
            let _ = tx.send(v);
        }))
    });
    rx.recv_timeout(Duration::from_secs(secs)).expect("reactor answered in time")
}

fn call<R: Send + 'static>(set: &ReactorSet, f: impl FnOnce() -> R + Send + 'static) -> R {
    call_async(set, 60, move |done| done(f()))
}

/// Files of `mib` MiB, written end to end with a pattern (so a full resync
/// reads real pages, not tmpfs holes).
fn make_files(dir: &Path, mib: u64) -> Vec<PathBuf> {
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    (0..2)
        .map(|i| {
            let p = dir.join(format!("m{i}.img"));
            let mut f = std::fs::File::create(&p).unwrap();
            for _ in 0..mib {
                f.write_all(&chunk).unwrap();
            }
            p
        })
        .collect()
}

/// Registers the members (the RAID examiner looks at each).
fn open_members(files: &[PathBuf]) {
    for (i, f) in files.iter().enumerate() {
        create_uring(UringCreateParams {
            filename: f.to_string_lossy().into(),
            name: format!("F{i}"),
            block_size: Some(BS as u32),
            uuid: None,
        })
        .expect("member opens");
    }
}

fn unlimited_rebuild() {
    bdev_raid_set_options(RaidSetOptionsParams { process_max_bandwidth_mb_sec: Some(0), ..Default::default() })
        .unwrap();
}

/// Keeps `WRITER_DEPTH` random one-block writes in flight, each in one of
/// `chunks` (ranges of array blocks), until told to crash.
struct Writer {
    ch: Rc<bdev::Channel>,
    rng: RefCell<SimRng>,
    chunks: Vec<std::ops::Range<u64>>,
    done_ios: Cell<u64>,
    in_flight: Cell<usize>,
    /// Set by `crash`: runs once no write is in flight.
    on_idle: RefCell<Option<Box<dyn FnOnce()>>>,
    me: RefCell<Option<Rc<dyn IoDone>>>,
}

thread_local! {
    static WRITER: RefCell<Option<Rc<Writer>>> = const { RefCell::new(None) };
}

impl Writer {
    fn submit(&self, buf: DmaBuf) {
        let off = {
            let mut rng = self.rng.borrow_mut();
            let c = &self.chunks[rng.below(self.chunks.len() as u64) as usize];
            c.start + rng.below(c.end - c.start)
        };
        buf.fill((off % 251) as u8);
        let mut io = IoBox::data(IoType::Write, off, 1, Some(buf)).expect("IO descriptor");
        io.set_done(self.me.borrow().clone().expect("writer running"));
        self.in_flight.set(self.in_flight.get() + 1);
        self.ch.submit(io);
    }
}

impl IoDone for Writer {
    fn io_done(&self, mut io: IoBox) {
        assert!(io.status.is_ok(), "write failed: {:?}", io.status);
        self.done_ios.set(self.done_ios.get() + 1);
        self.in_flight.set(self.in_flight.get() - 1);
        let buf = io.buf.take();
        drop(io);
        if self.on_idle.borrow().is_none() {
            if let Some(buf) = buf {
                self.submit(buf);
            }
        } else if self.in_flight.get() == 0 {
            if let Some(f) = self.on_idle.borrow_mut().take() {
                f();
            }
        }
    }
}

struct Crash {
    array_blocks: u64,
    data_offset: u64,
    num_chunks: u64,
    dirty_chunks: u64,
    writes: u64,
}

/// Creates the array, writes to `percent` % of its chunks and stops the
/// set right after the last write, without deleting the array.
fn create_and_crash(files: &[PathBuf], chunk_kb: u32, percent: f64, bitmap: bool) -> Crash {
    let set = start_set();
    let files2 = files.to_vec();
    call(&set, move || {
        bdev_raid::init();
        unlimited_rebuild();
        open_members(&files2);
    });
    let r: Result<Value, BdevError> = call_async(&set, 60, move |done| {
        bdev_raid_create_async(
            RaidCreateParams {
                name: "R".into(),
                raid_level: "raid1".into(),
                base_bdevs: vec!["F0".into(), "F1".into()],
                strip_size_kb: None,
                uuid: None,
                superblock: Some(true),
                bitmap: Some(bitmap),
                bitmap_chunk_size_kb: Some(chunk_kb),
            },
            done,
        )
    });
    r.expect("create");
    let chunk_blocks = chunk_kb as u64 * 1024 / BS;
    let (array_blocks, data_offset, num_chunks, chosen) = call(&set, move || {
        let raid = RaidArray::find("R").unwrap();
        assert_eq!(raid.bitmap().is_some(), bitmap);
        let info = raid.info_json();
        let data_offset = info["base_bdevs_list"][0]["data_offset"].as_u64().unwrap();
        let h = raid.bdev().expect("online");
        let array_blocks = h.props().num_blocks;
        // Chunks of the bitmap's size (the same ranges without a bitmap).
        let num_chunks = array_blocks.div_ceil(chunk_blocks);
        let want = ((num_chunks as f64 * percent / 100.0).round() as u64).max(1);
        let mut rng = SimRng::new(0xC0FFEE);
        let mut chosen: Vec<u64> = Vec::new();
        while (chosen.len() as u64) < want {
            let c = rng.below(num_chunks);
            if !chosen.contains(&c) {
                chosen.push(c);
            }
        }
        chosen.sort_unstable();
        let ranges = chosen.iter().map(|&c| c * chunk_blocks..((c + 1) * chunk_blocks).min(array_blocks)).collect();
        let w = Rc::new(Writer {
            ch: h.channel().unwrap(),
            rng: RefCell::new(SimRng::new(7)),
            chunks: ranges,
            done_ios: Cell::new(0),
            in_flight: Cell::new(0),
            on_idle: RefCell::new(None),
            me: RefCell::new(None),
        });
        *w.me.borrow_mut() = Some(w.clone());
        for _ in 0..WRITER_DEPTH {
            w.submit(DmaBuf::alloc(BS as usize).unwrap());
        }
        WRITER.with(|x| *x.borrow_mut() = Some(w));
        (array_blocks, data_offset, num_chunks, chosen)
    });
    std::thread::sleep(Duration::from_millis(WRITE_MS));
    // The crash: the writer stops and, as soon as its last write completes
    // (long before the bitmap may clear an idle chunk's bit: that takes 3
    // ticks of 1 ms), the reactor loop ends with the array not deleted. Not
    // with writes still in flight: stopping a set then aborts the process
    // (queued completions are dropped during thread-local destruction).
    let (tx, rx) = mpsc::sync_channel(1);
    let stopper = set.clone();
    set.send(0, move || {
        let w = WRITER.with(|x| x.borrow().clone()).expect("writer");
        *w.on_idle.borrow_mut() = Some(Box::new(move || {
            let w = WRITER.with(|x| x.borrow_mut().take()).expect("writer");
            let dirty = RaidArray::find("R").unwrap().bitmap().map(|b| b.dirty_chunks());
            let _ = tx.send((dirty, w.done_ios.get()));
            stopper.stop();
            // Dropped next loop iteration, not inside its own callback.
            reactor::register_poller("drop_writer", move || {
                *w.me.borrow_mut() = None;
                PollStatus::Done
            });
        }));
    });
    let (on_disk, writes) = rx.recv_timeout(Duration::from_secs(30)).expect("writer stopped");
    if let Some(d) = &on_disk {
        assert_eq!(d, &chosen, "exactly the written chunks are dirty on disk at the crash");
    }
    set.join();
    drop(set);
    for f in files {
        let mut b = vec![0u8; SB_SIZE_BYTES];
        std::fs::File::open(f).unwrap().read_exact(&mut b).unwrap();
        let sb = decode(&b).expect("superblock decodes");
        assert!(!sb.clean, "{}: superblock says clean after the crash", f.display());
        assert_eq!(sb.bitmap.is_some(), bitmap);
    }
    // Writes that reached the first member only: the resync must undo them.
    let mut f = std::fs::OpenOptions::new().write(true).open(&files[1]).unwrap();
    for &c in &chosen {
        f.seek(SeekFrom::Start((data_offset + c * chunk_blocks) * BS)).unwrap();
        f.write_all(&[0xEE; BS as usize]).unwrap();
    }
    drop(f);
    Crash { array_blocks, data_offset, num_chunks, dirty_chunks: chosen.len() as u64, writes }
}

struct Resync {
    /// Until online (assembled), and until no resync pending or running.
    online_secs: f64,
    secs: f64,
    copied_blocks: u64,
}

/// Restarts: registers the members in a new set and times the assembly and
/// resync. Then deletes the array cleanly.
fn restart_and_resync(files: &[PathBuf]) -> Resync {
    let set = start_set();
    let files2 = files.to_vec();
    let (online_secs, secs) = call_async(&set, 600, move |done| {
        bdev_raid::init();
        unlimited_rebuild();
        let t0 = Instant::now();
        open_members(&files2);
        let mut done = Some(done);
        let mut online_secs = None;
        reactor::register_timed_poller("resync_done", Duration::from_micros(200), move || {
            let Some(r) = RaidArray::find("R").filter(|r| r.state() == RaidState::Online) else {
                return PollStatus::Idle;
            };
            let online = *online_secs.get_or_insert_with(|| t0.elapsed().as_secs_f64());
            if r.process_running() {
                return PollStatus::Idle;
            }
            if let Some(d) = done.take() {
                d((online, t0.elapsed().as_secs_f64()));
            }
            PollStatus::Done
        });
    });
    let (copied_blocks, problems) =
        call(&set, || (RaidArray::find("R").unwrap().copied_blocks(), RaidArray::problems()));
    for p in problems {
        println!("    (assembly said: {p})");
    }
    let r: Result<Value, BdevError> = call_async(&set, 60, |done| {
        bdev_raid_delete(RaidDeleteParams { name: "R".into(), clear_sb: Some(false) }, done)
    });
    r.expect("delete");
    set.stop();
    set.join();
    for f in files {
        let mut b = vec![0u8; SB_SIZE_BYTES];
        std::fs::File::open(f).unwrap().read_exact(&mut b).unwrap();
        assert!(decode(&b).expect("superblock").clean, "clean after the delete");
    }
    Resync { online_secs, secs, copied_blocks }
}

/// Whether the members hold the same data (array blocks from `data_offset`).
fn same_data(files: &[PathBuf], data_offset: u64, array_blocks: u64) -> bool {
    let open = |f: &PathBuf| {
        let mut f = std::fs::File::open(f).unwrap();
        f.seek(SeekFrom::Start(data_offset * BS)).unwrap();
        f
    };
    let (mut a, mut b) = (open(&files[0]), open(&files[1]));
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut left = array_blocks * BS;
    while left > 0 {
        let n = left.min(1 << 20) as usize;
        a.read_exact(&mut x[..n]).unwrap();
        b.read_exact(&mut y[..n]).unwrap();
        if x[..n] != y[..n] {
            return false;
        }
        left -= n as u64;
    }
    true
}

fn main() {
    let mut args = std::env::args().skip(1);
    let member_mib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let chunk_kb: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let percent: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let dir = PathBuf::from("/dev/shm").join(format!("nvraid-resync-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    println!(
        "raid1 over two {member_mib} MiB uring files in /dev/shm, superblock, chunks of {chunk_kb} KiB, \
         {percent} % of chunks written at the crash, rebuild bandwidth unlimited"
    );
    let mut results = Vec::new();
    for bitmap in [true, false] {
        let what = if bitmap { "bitmap" } else { "no bitmap (full resync)" };
        let files = make_files(&dir, member_mib);
        let crash = create_and_crash(&files, chunk_kb, percent, bitmap);
        println!(
            "{what}: crashed with {} of {} chunks written ({} writes done), superblocks dirty",
            crash.dirty_chunks, crash.num_chunks, crash.writes
        );
        let r = restart_and_resync(&files);
        let same = same_data(&files, crash.data_offset, crash.array_blocks);
        let mib = (r.copied_blocks * BS) as f64 / (1 << 20) as f64;
        println!(
            "  {:.3} s from member registration to online with no resync ({:.3} s to online), copied {} \
             blocks ({mib:.0} MiB, {:.1} % of {} array blocks, {:.0} MiB/s); members identical after: {same}",
            r.secs,
            r.online_secs,
            r.copied_blocks,
            r.copied_blocks as f64 / crash.array_blocks as f64 * 100.0,
            crash.array_blocks,
            mib / r.secs
        );
        assert!(same, "the resync left the mirrors different");
        for f in &files {
            std::fs::remove_file(f).unwrap();
        }
        results.push(r);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (b, full) = (&results[0], &results[1]);
    println!();
    println!(
        "bitmap resync {:.3} s ({} blocks) vs full resync {:.3} s ({} blocks): {:.1}x faster, {:.2} % of the time, \
         {:.2} % of the blocks",
        b.secs,
        b.copied_blocks,
        full.secs,
        full.copied_blocks,
        full.secs / b.secs,
        b.secs / full.secs * 100.0,
        b.copied_blocks as f64 / full.copied_blocks as f64 * 100.0
    );
}
