//! RAID1 with superblock and write-intent bitmap over file-backed members,
//! driven through the real daemon and NVMe/TCP.
//!
//! Crash storm: the daemon is killed with SIGKILL during a two-queue write
//! workload confined to a few bitmap chunks, then restarted from its config
//! alone (no raid RPC: the array assembles from its superblocks). After the
//! resync every acknowledged write reads back (or, for a block, the write
//! that was unanswered at the kill), never-written blocks are zeros, both
//! members hold the same data, and the resync copied exactly the chunks
//! whose bits were on disk after the kill (read from the member files) —
//! a few of the array's chunks.
//!
//! Teardown under IO: SIGTERM while writes to ever new chunks keep coming
//! (so bitmap batches are in progress) exits 0 promptly, leaves clean
//! superblocks and an empty bitmap, the next start resyncs nothing, and
//! every acknowledged write reads back.

mod common;
use common::*;
use mgmt::bdev::DmaBuf;
use mgmt::nvmf::host::{self, Completion, ConnectParams, HostQpair};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2016-06.io.nvraid:raidcrash";
const BS: u64 = 4096;
const MEMBER_BYTES: u64 = 64 << 20;
const CHUNK_KB: u64 = 1024;
const CHUNK_BLOCKS: u64 = CHUNK_KB * 1024 / BS;
/// Writes kept in flight per queue (two queues: 64 in all).
const QD_PER_QUEUE: usize = 32;
const CRASH_ROUNDS: u32 = 4;
/// Chunks the crash storm writes to.
const HOT_CHUNKS: usize = 3;
/// Least writing time between the mid-way bitmap sample (an RPC, which
/// pauses this single-threaded initiator) and the signal, so that the
/// signal comes during steady writes.
const RESUME: Duration = Duration::from_millis(30);
/// No write completing for this long before the signal fails the test.
const STALL: Duration = Duration::from_secs(5);
/// SIGTERM must end the daemon within this.
const TERM_LIMIT: Duration = Duration::from_secs(5);

// ---- seeded randomness ---------------------------------------------------------

fn seed() -> u64 {
    match std::env::var("NVRAID_SEED") {
        Ok(s) => s.parse().expect("NVRAID_SEED must be a number"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ---- block patterns -----------------------------------------------------------

const MAGIC: &[u8; 8] = b"RCRASH01";

/// Which write put a block's content there: `seq` is unique over the whole
/// test (it is also the command tag), `round` is for the messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    round: u32,
    seq: u64,
}

/// A block fully determined by (stamp, lba): a torn or misplaced block
/// never matches any stamp.
fn pattern(s: Stamp, lba: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    b[0..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&s.round.to_le_bytes());
    b[12..20].copy_from_slice(&s.seq.to_le_bytes());
    b[20..28].copy_from_slice(&lba.to_le_bytes());
    let mut x = splitmix(s.seq ^ lba.rotate_left(40));
    for w in b[32..].chunks_mut(8) {
        x = splitmix(x);
        w.copy_from_slice(&x.to_le_bytes());
    }
    b
}

/// None for a never-written (zero) block.
fn decode(lba: u64, b: &[u8]) -> Result<Option<Stamp>, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    if &b[0..8] != MAGIC {
        return Err(format!("lba {lba}: not a test pattern (first bytes {:02x?})", &b[..16]));
    }
    let s = Stamp {
        round: u32::from_le_bytes(b[8..12].try_into().unwrap()),
        seq: u64::from_le_bytes(b[12..20].try_into().unwrap()),
    };
    let at = u64::from_le_bytes(b[20..28].try_into().unwrap());
    if at != lba {
        return Err(format!("lba {lba}: holds the block written to lba {at} ({s:?})"));
    }
    if b != pattern(s, lba) {
        return Err(format!("lba {lba}: torn block (header says {s:?}, body differs)"));
    }
    Ok(Some(s))
}

// ---- what the device must hold --------------------------------------------------

/// One block: its known content (None: zeros) and the writes that were in
/// flight when the daemon died — they may or may not have landed.
#[derive(Default)]
struct Expect {
    durable: Option<Stamp>,
    maybe: Vec<Stamp>,
}

#[derive(Default)]
struct Model {
    blocks: BTreeMap<u64, Expect>,
    /// Blocks with a write in flight: never two overlapping writes at once,
    /// so "last acknowledged" is well defined.
    busy: HashSet<u64>,
    /// seq → (lba, blocks).
    pending: HashMap<u64, (u64, u64)>,
    round: u32,
    next_seq: u64,
    acked: u64,
    acked_after_stop: u64,
    failed_after_stop: u64,
}

impl Model {
    fn free(&self, lba: u64, n: u64) -> bool {
        (lba..lba + n).all(|l| !self.busy.contains(&l))
    }

    /// Fails only once the queue is dead (the daemon went away).
    fn submit(&mut self, qp: &mut HostQpair, lba: u64, n: u64) -> Result<(), host::SubmitError> {
        self.next_seq += 1;
        let s = Stamp { round: self.round, seq: self.next_seq };
        let len = (n * BS) as usize;
        let buf = DmaBuf::alloc(len).expect("dma buffer").slice(0, len);
        for i in 0..n {
            buf.copy_from((i * BS) as usize, &pattern(s, lba + i));
        }
        qp.write(1, lba, n as u32, buf, s.seq)?;
        self.busy.extend(lba..lba + n);
        self.pending.insert(s.seq, (lba, n));
        Ok(())
    }

    /// `stopping`: the daemon was signalled, so a failed write is expected
    /// (it joins the "maybe" set); before that, any failure is a bug.
    fn complete(&mut self, c: Completion, stopping: bool, log: &dyn Fn() -> String) {
        let (lba, n) = self.pending.remove(&c.tag).expect("completion for a write we sent");
        let s = Stamp { round: self.round, seq: c.tag };
        if !c.status.is_success() {
            assert!(
                stopping,
                "write {s:?} at lba {lba}+{n} failed with {:?} while the daemon ran: {}",
                c.status,
                log()
            );
            self.failed_after_stop += 1;
        } else {
            self.acked += 1;
            if stopping {
                self.acked_after_stop += 1;
            }
        }
        for l in lba..lba + n {
            self.busy.remove(&l);
            let e = self.blocks.entry(l).or_default();
            if c.status.is_success() {
                e.durable = Some(s);
            } else {
                e.maybe.push(s);
            }
        }
    }

    /// Writes whose completion never came back: they may have landed.
    fn abandon_pending(&mut self) {
        for (seq, (lba, n)) in std::mem::take(&mut self.pending) {
            self.failed_after_stop += 1;
            for l in lba..lba + n {
                self.blocks.entry(l).or_default().maybe.push(Stamp { round: self.round, seq });
            }
        }
        self.busy.clear();
    }

    /// Checks one block read back; the block's content becomes its known
    /// content (both copies hold it after the resync). Returns whether an
    /// in-flight write had landed.
    fn check(&mut self, lba: u64, data: &[u8]) -> Result<Option<bool>, String> {
        let got = decode(lba, data)?;
        let Some(e) = self.blocks.get_mut(&lba) else {
            return match got {
                None => Ok(None),
                Some(s) => Err(format!("lba {lba} was never written but holds {s:?}")),
            };
        };
        let landed = if got == e.durable {
            false
        } else if got.is_some_and(|g| e.maybe.contains(&g)) {
            true
        } else {
            let what = match (got, e.durable) {
                (None, _) => "acknowledged write lost (block reads zeros)".to_string(),
                (Some(g), Some(d)) if g.seq < d.seq => format!("older pattern {g:?} replaced the acknowledged one"),
                (Some(g), _) => format!("unexpected pattern {g:?}"),
            };
            return Err(format!(
                "lba {lba}: {what}; acknowledged {:?}, in flight at the stop {:?}",
                e.durable, e.maybe
            ));
        };
        let had_maybe = !e.maybe.is_empty();
        e.durable = got;
        e.maybe.clear();
        Ok(had_maybe.then_some(landed))
    }
}

// ---- daemon, config, RPC -----------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Setup {
    dir: PathBuf,
    files: [PathBuf; 2],
    /// Members only: for the first start, which creates the array by RPC.
    bdevs_cfg: PathBuf,
    /// Members, then the NVMe/TCP export of "R" (assembled from superblocks).
    full_cfg: PathBuf,
    port: u16,
}

fn setup(tag: &str) -> Setup {
    let dir = temp_dir(tag);
    let files = [dir.join("f0.img"), dir.join("f1.img")];
    for f in &files {
        std::fs::File::create(f).unwrap().set_len(MEMBER_BYTES).unwrap();
    }
    let port = free_port();
    let bdev = json!({"subsystem": "bdev", "config": [
        {"method": "bdev_uring_create", "params": {"name": "F0", "filename": files[0], "block_size": BS}},
        {"method": "bdev_uring_create", "params": {"name": "F1", "filename": files[1], "block_size": BS}},
        {"method": "bdev_wait_for_examine"}]});
    let nvmf = json!({"subsystem": "nvmf", "config": [
        {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
        {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": true}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN, "namespace": {"bdev_name": "R"}}},
        {"method": "nvmf_subsystem_add_listener", "params": {"nqn": NQN, "listen_address":
            {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}}]});
    let bdevs_cfg = dir.join("bdevs.json");
    std::fs::write(&bdevs_cfg, json!({"subsystems": [bdev.clone()]}).to_string()).unwrap();
    let full_cfg = dir.join("full.json");
    std::fs::write(&full_cfg, json!({"subsystems": [bdev, nvmf]}).to_string()).unwrap();
    Setup { dir, files, bdevs_cfg, full_cfg, port }
}

fn start(s: &Setup, cfg: &Path) -> Daemon {
    Daemon::start(&s.dir, &["-m", "0x3", "-c", cfg.to_str().unwrap()])
}

/// Creates the array on fresh members, then stops the daemon orderly.
fn create_array(s: &Setup) {
    let mut d = start(s, &s.bdevs_cfg);
    d.ok(
        "bdev_raid_create",
        json!({"name": "R", "raid_level": "raid1", "base_bdevs": ["F0", "F1"], "superblock": true,
               "bitmap_chunk_size_kb": CHUNK_KB}),
    );
    let info = raid_info(&d);
    assert_eq!(info["state"], "online", "{info}");
    assert_eq!(info["bitmap"]["chunk_size_kb"], CHUNK_KB, "{info}");
    d.stop();
    for f in &s.files {
        assert!(sb_clean(f), "{}: superblock not clean after an orderly stop", f.display());
    }
}

fn raid_info(d: &Daemon) -> Value {
    let all = d.ok("bdev_raid_get_bdevs", json!({"category": "all"}));
    all.as_array().and_then(|a| a.iter().find(|r| r["name"] == "R")).cloned().unwrap_or(Value::Null)
}

/// Waits until "R" is online with every member active and no resync or
/// rebuild running; returns its listing.
fn wait_in_sync(d: &mut Daemon) -> Value {
    let t0 = Instant::now();
    loop {
        if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("daemon exited ({st}) while the array came up: {}", d.log_text());
        }
        let info = raid_info(d);
        let members_active = info["base_bdevs_list"]
            .as_array()
            .is_some_and(|l| l.len() == 2 && l.iter().all(|m| m["state"] == "active"));
        if info["state"] == "online" && info.get("process").is_none() && members_active {
            return info;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "array not in sync after 30 s: {info}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- on-disk checks ---------------------------------------------------------------

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// Byte offsets in bdev-raid/src/superblock.rs's `Superblock` (the target
/// crate's tests cannot reach bdev_raid): magic 0..8, version 8..12, crc32c
/// 12..16 (over all 4096 bytes with itself zeroed), flags 124..128 (bit 0:
/// clean).
fn sb_clean(file: &Path) -> bool {
    use std::io::Read;
    let mut sb = vec![0u8; 4096];
    std::fs::File::open(file).unwrap().read_exact(&mut sb).unwrap();
    assert_eq!(&sb[0..8], b"NVRAIDSB", "{}: no superblock", file.display());
    assert_eq!(u32::from_le_bytes(sb[8..12].try_into().unwrap()), 1, "superblock version");
    let stored = u32::from_le_bytes(sb[12..16].try_into().unwrap());
    sb[12..16].fill(0);
    assert_eq!(crc32c(&sb), stored, "{}: superblock checksum", file.display());
    let flags = u32::from_le_bytes(sb[124..128].try_into().unwrap());
    assert_eq!(flags & !1, 0, "unknown superblock flags {flags:#x}");
    flags & 1 == 1
}

/// The chunks whose bit is set in a member's on-disk bitmap. Layout
/// (bitmap/src/page.rs): superblock bytes 160..168 hold bitmap_offset_blocks;
/// a page is a 64-byte header then the bits; one page covers this test's
/// chunks.
fn disk_bitmap(file: &Path) -> Vec<u64> {
    let bytes = std::fs::read(file).unwrap();
    let off = u64::from_le_bytes(bytes[160..168].try_into().unwrap()) as usize * BS as usize;
    let page = &bytes[off..off + 4096];
    assert_eq!(&page[0..8], b"NVRBITMP", "{}: bitmap page magic", file.display());
    let num_chunks = u64::from_le_bytes(page[48..56].try_into().unwrap());
    assert!(num_chunks <= 8 * (4096 - 64), "more than one bitmap page");
    (0..num_chunks).filter(|c| page[64 + (*c / 8) as usize] & (1 << (c % 8)) != 0).collect()
}

/// The members' data areas (offsets from the listing) hold the same bytes.
fn assert_members_identical(s: &Setup, info: &Value) {
    let list = info["base_bdevs_list"].as_array().expect("base_bdevs_list");
    let area = |i: usize| -> Vec<u8> {
        let m = list.iter().find(|m| m["name"] == format!("F{i}")).unwrap_or_else(|| panic!("F{i} in {info}"));
        let (off, len) = (m["data_offset"].as_u64().unwrap() * BS, m["data_size"].as_u64().unwrap() * BS);
        let bytes = std::fs::read(&s.files[i]).unwrap();
        assert!(off > 0 && off + len <= bytes.len() as u64, "data area {off}+{len} of {}", bytes.len());
        bytes[off as usize..(off + len) as usize].to_vec()
    };
    let (a, b) = (area(0), area(1));
    assert_eq!(a.len(), b.len(), "member data sizes differ");
    if let Some(blk) = a.chunks(BS as usize).zip(b.chunks(BS as usize)).position(|(x, y)| x != y) {
        let diff = a.chunks(BS as usize).zip(b.chunks(BS as usize)).filter(|(x, y)| x != y).count();
        panic!(
            "members differ in {diff} blocks, first at array block {blk} (chunk {}): F0 {:?}, F1 {:?}",
            blk as u64 / CHUNK_BLOCKS,
            decode(blk as u64, &a[blk * BS as usize..(blk + 1) * BS as usize]),
            decode(blk as u64, &b[blk * BS as usize..(blk + 1) * BS as usize]),
        );
    }
}

// ---- NVMe/TCP IO ----------------------------------------------------------------

/// The session (its admin queue keeps the controller) and two IO queues,
/// which the target places on its two reactors.
fn connect(port: u16) -> (host::Session, Vec<HostQpair>) {
    let p = ConnectParams::new("127.0.0.1", &port.to_string(), NQN);
    let mut s = host::connect(&p, 2).unwrap_or_else(|e| panic!("connect: {e}"));
    let ns = &s.info.namespaces[0];
    assert_eq!(ns.block_size as u64, BS);
    let qps = s.io.drain(..).map(HostQpair::from_parts).collect();
    (s, qps)
}

/// Reads every written block and `extra` never-written ones and checks each
/// against the model. Returns (in-flight writes that landed, that did not).
fn verify(qps: &mut [HostQpair], model: &mut Model, extra: &[u64], log: &dyn Fn() -> String) -> (u64, u64) {
    let mut todo: Vec<u64> = model.blocks.keys().copied().chain(extra.iter().copied()).collect();
    todo.reverse();
    let (mut landed, mut not_landed) = (0, 0);
    let mut errors = Vec::new();
    let mut outstanding = 0usize;
    let t0 = Instant::now();
    while !todo.is_empty() || outstanding > 0 {
        for qp in qps.iter_mut() {
            while qp.outstanding() < QD_PER_QUEUE {
                let Some(lba) = todo.pop() else { break };
                let buf = DmaBuf::alloc(BS as usize).expect("dma buffer").slice(0, BS as usize);
                qp.read(1, lba, 1, buf, lba).unwrap_or_else(|e| panic!("submit read: {e:?}"));
                outstanding += 1;
            }
            qp.poll(|c| {
                outstanding -= 1;
                assert!(c.status.is_success(), "read of lba {} failed: {:?}: {}", c.tag, c.status, log());
                match model.check(c.tag, &c.buf.expect("read buffer").to_vec()) {
                    Ok(Some(true)) => landed += 1,
                    Ok(Some(false)) => not_landed += 1,
                    Ok(None) => {}
                    Err(e) => errors.push(e),
                }
            })
            .unwrap_or_else(|e| panic!("queue failed during read-back: {e}: {}", log()));
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "read-back timed out");
        std::thread::sleep(Duration::from_micros(50));
    }
    assert!(
        errors.is_empty(),
        "{} blocks wrong after restart:\n{}",
        errors.len(),
        errors[..errors.len().min(20)].join("\n")
    );
    (landed, not_landed)
}

/// Keeps QD_PER_QUEUE writes in flight on each queue (at places `pick`
/// chooses, never overlapping a write in flight) until `stop` says so, or,
/// once `signalled()` (the daemon was sent its signal), until every queue
/// is dead. Before the signal any failure is a bug; after it a write that
/// fails may or may not have landed, and one that succeeds was acknowledged.
#[allow(clippy::too_many_arguments)]
fn pump(
    qps: &mut [HostQpair],
    model: &mut Model,
    rng: &mut Rng,
    mut pick: impl FnMut(&mut Rng) -> (u64, u64),
    mut stop: impl FnMut(&Model) -> bool,
    signalled: &dyn Fn() -> bool,
    log: &dyn Fn() -> String,
    diag: &dyn Fn() -> String,
) {
    let t0 = Instant::now();
    let mut last_completion = Instant::now();
    loop {
        if stop(model) || (signalled() && qps.iter().all(|q| q.is_failed())) {
            return;
        }
        let mut got = 0;
        for qp in qps.iter_mut() {
            let mut tries = 0;
            while !qp.is_failed() && qp.outstanding() < QD_PER_QUEUE && tries < 8 {
                let (lba, n) = pick(rng);
                if !model.free(lba, n) {
                    tries += 1;
                } else if let Err(e) = model.submit(qp, lba, n) {
                    assert!(signalled(), "submit write: {e:?}: {}", log());
                    break;
                }
            }
            // `signalled()` is read when a completion or error is seen: the
            // flag is set before the signal is sent.
            match qp.poll(|c| model.complete(c, signalled(), log)) {
                Ok(n) => got += n,
                Err(e) => assert!(signalled(), "queue failed: {e}: {}", log()),
            }
        }
        if got > 0 {
            last_completion = Instant::now();
        } else {
            // Leave the CPU to the daemon's reactors (2 cores here).
            std::thread::sleep(Duration::from_micros(50));
        }
        if !signalled() {
            assert!(
                last_completion.elapsed() < STALL,
                "writes stalled: {} outstanding, none completed for {STALL:?}: {}\n{}",
                model.pending.len(),
                diag(),
                log()
            );
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "workload did not end: {}", log());
    }
}

/// Stall diagnostics: the array listing and the members' IO counters.
fn diag(d: &Daemon) -> String {
    format!("{}\n{}", raid_info(d), d.ok("bdev_get_iostat", Value::Null))
}

/// A thread that, at `at`, raises `flag` and then signals the daemon: SIGKILL
/// (returns once it is reaped), or SIGTERM (returns once it exited, or
/// kills it after `TERM_LIMIT`). Returns the exit status and how long the
/// daemon took to go after the signal.
fn signal_at(
    d: &mut Daemon,
    at: Instant,
    kill9: bool,
    flag: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(std::process::ExitStatus, Duration)> {
    let mut child = d.child.take().expect("daemon running");
    if let Some(st) = child.try_wait().unwrap() {
        panic!("daemon exited ({st}) before the signal: {}", d.log_text());
    }
    std::thread::spawn(move || {
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        flag.store(true, Ordering::SeqCst);
        let t = Instant::now();
        if kill9 {
            child.kill().unwrap();
            return (child.wait().unwrap(), t.elapsed());
        }
        let ok = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(ok.success(), "kill -TERM failed");
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return (st, t.elapsed());
            }
            if t.elapsed() > TERM_LIMIT {
                let _ = child.kill();
                return (child.wait().unwrap(), t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    })
}

/// After the daemon is gone: the completions still in the sockets (the
/// target sent them, so they count), then every write left unanswered
/// joins the "may have landed" set.
fn drain(qps: &mut [HostQpair], model: &mut Model, log: &dyn Fn() -> String) {
    let t0 = Instant::now();
    while qps.iter().any(|q| q.outstanding() > 0) && t0.elapsed() < Duration::from_secs(5) {
        for qp in qps.iter_mut() {
            let _ = qp.poll(|c| model.complete(c, true, log));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    model.abandon_pending();
}

// ---- the tests ----------------------------------------------------------------------

#[test]
fn raid1_bitmap_survives_a_kill9_storm() {
    let t_start = Instant::now();
    let seed = seed();
    eprintln!("raid_crash storm: seed {seed} (replay with NVRAID_SEED={seed}; the kill timing is not replayed)");
    let mut rng = Rng(seed);
    let s = setup("raid-crash");
    create_array(&s);

    let mut model = Model::default();
    let mut hot: Vec<u64> = Vec::new();
    let mut info = Value::Null;
    let mut array_blocks = 0;
    // Union of the members' on-disk bitmaps right after the last kill.
    let mut disk_dirty: Option<Vec<u64>> = None;
    let mut total_copied = 0;
    for round in 0..=CRASH_ROUNDS {
        model.round = round;
        let mut d = start(&s, &s.full_cfg);
        let log_path = d.log.clone();
        let log = move || std::fs::read_to_string(&log_path).unwrap_or_default();
        info = wait_in_sync(&mut d);
        let copied = info["copied_blocks"].as_u64().expect("copied_blocks");
        match &disk_dirty {
            None => {
                let chunks = info["bitmap"]["num_chunks"].as_u64().expect("bitmap num_chunks");
                array_blocks = info["base_bdevs_list"][0]["data_size"].as_u64().unwrap();
                assert!(chunks >= 32 && chunks * CHUNK_BLOCKS >= array_blocks, "{info}");
                while hot.len() < HOT_CHUNKS {
                    let c = rng.below(chunks - 1); // not the last, possibly partial, chunk
                    if !hot.contains(&c) {
                        hot.push(c);
                    }
                }
                eprintln!(
                    "array: {array_blocks} blocks, {chunks} chunks of {CHUNK_BLOCKS}; writes go to chunks {hot:?}"
                );
                assert_eq!(copied, 0, "a clean start must not resync: {info}");
            }
            Some(dirty) => {
                // The resync after the kill copied exactly the chunks whose
                // bit was on disk — all of them hot ones — and nothing else.
                let bound = hot.len() as u64 * CHUNK_BLOCKS;
                eprintln!(
                    "round {round}: resync copied {copied} blocks; dirty chunks on disk {dirty:?} (bound {bound}, \
                     array {array_blocks})"
                );
                assert_eq!(copied, dirty.len() as u64 * CHUNK_BLOCKS, "resync vs on-disk bitmap: {info}\n{}", log());
                assert!(copied <= bound, "resync copied {copied} blocks, more than the {bound} of the written chunks");
                assert!(copied * 10 < array_blocks, "resync copied {copied} of {array_blocks} blocks");
                total_copied += copied;
            }
        }

        let (session, mut qps) = connect(s.port);
        // Never-written blocks (outside the hot chunks) must still be zeros.
        let extra: Vec<u64> = (0..32)
            .map(|_| rng.below(array_blocks))
            .filter(|b| !hot.contains(&(b / CHUNK_BLOCKS)) && !model.blocks.contains_key(b))
            .collect();
        let (landed, not_landed) = verify(&mut qps, &mut model, &extra, &log);
        if round > 0 {
            eprintln!(
                "round {round}: {} blocks verified; of the blocks of unanswered writes {landed} had them, \
                 {not_landed} did not",
                model.blocks.len()
            );
        }
        assert_members_identical(&s, &info);
        if round == CRASH_ROUNDS {
            drop((qps, session));
            d.stop();
            break;
        }

        let kill_after = Duration::from_millis(150 + rng.below(450));
        let acked0 = model.acked;
        let t0 = Instant::now();
        let pick = |r: &mut Rng| {
            let c = hot[r.below(hot.len() as u64) as usize];
            let off = r.below(CHUNK_BLOCKS);
            let n = (1 + r.below(4)).min(CHUNK_BLOCKS - off);
            (c * CHUNK_BLOCKS + off, n)
        };
        let never = || false;
        let dg = || diag(&d);
        pump(&mut qps, &mut model, &mut rng, pick, |_| t0.elapsed() >= kill_after / 2, &never, &log, &dg);
        // The workload pauses for this RPC: the kill comes well after it.
        let bm = raid_info(&d)["bitmap"].clone();
        let flag = Arc::new(AtomicBool::new(false));
        let killer = signal_at(&mut d, (t0 + kill_after).max(Instant::now() + RESUME), true, flag.clone());
        let signalled = || flag.load(Ordering::SeqCst);
        pump(&mut qps, &mut model, &mut rng, pick, |_| false, &signalled, &log, &|| String::new());
        let (status, _) = killer.join().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "daemon ended with {status}: {}", log());
        drain(&mut qps, &mut model, &log);
        drop((qps, session));
        let dirty: Vec<u64> = {
            let (a, b) = (disk_bitmap(&s.files[0]), disk_bitmap(&s.files[1]));
            let mut u: Vec<u64> = a.into_iter().chain(b).collect();
            u.sort_unstable();
            u.dedup();
            u
        };
        eprintln!(
            "round {round}: killed after {:?}: {} writes acked this round ({} after the kill), {} unanswered; \
             mid-way bitmap {bm}; on disk after the kill: dirty chunks {dirty:?}",
            t0.elapsed(),
            model.acked - acked0,
            model.acked_after_stop,
            model.failed_after_stop,
        );
        assert!(model.failed_after_stop > 0, "the kill must come with writes in flight");
        assert!(dirty.iter().all(|c| hot.contains(c)), "bits {dirty:?} outside the written chunks {hot:?}");
        for f in &s.files {
            assert!(!sb_clean(f), "{}: superblock says clean after kill -9", f.display());
        }
        (model.acked_after_stop, model.failed_after_stop) = (0, 0);
        disk_dirty = Some(dirty);
    }
    // Some kill found chunks dirty (writes were on their way to the members)
    // and the resync copied them. Not asserted per round: a kill may land
    // while every write in flight waits for its bitmap batch, and lazy
    // clearing may have cleared every chunk just before (a starved initiator
    // on this 2-core machine).
    assert!(total_copied > 0, "no kill left anything to resync");
    // The last start stopped orderly: clean superblocks, identical members.
    for f in &s.files {
        assert!(sb_clean(f), "{}: superblock not clean after the final orderly stop", f.display());
    }
    assert_members_identical(&s, &info);
    eprintln!("raid_crash storm: {} blocks written, {:?} in all", model.blocks.len(), t_start.elapsed());
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[test]
fn raid1_bitmap_sigterm_under_io_is_clean() {
    let t_start = Instant::now();
    let seed = seed();
    eprintln!("raid_crash teardown: seed {seed} (replay with NVRAID_SEED={seed}; the signal timing is not replayed)");
    let mut rng = Rng(seed ^ 0x5EED);
    let s = setup("raid-teardown");
    create_array(&s);

    let mut model = Model::default();
    let mut d = start(&s, &s.full_cfg);
    let log_path = d.log.clone();
    let log = move || std::fs::read_to_string(&log_path).unwrap_or_default();
    let info = wait_in_sync(&mut d);
    assert_eq!(info["copied_blocks"], 0, "{info}");
    let chunks = info["bitmap"]["num_chunks"].as_u64().unwrap();
    let (session, mut qps) = connect(s.port);

    // Each write goes to the next chunk: the bitmap keeps setting new bits,
    // so writes wait for batches all along, also when the signal comes.
    let next_chunk = std::cell::Cell::new(0u64);
    let pick = |r: &mut Rng| {
        next_chunk.set((next_chunk.get() + 1) % (chunks - 1));
        (next_chunk.get() * CHUNK_BLOCKS + r.below(CHUNK_BLOCKS), 1)
    };
    let stop_after = Duration::from_millis(100 + rng.below(300));
    let t0 = Instant::now();
    let never = || false;
    let dg = || diag(&d);
    pump(&mut qps, &mut model, &mut rng, pick, |m| t0.elapsed() >= stop_after && m.acked > 0, &never, &log, &dg);
    let bm = raid_info(&d)["bitmap"].clone();
    // Every write to a chunk whose bit is not on disk waits for a batch.
    assert!(bm["writes_waited"].as_u64().unwrap_or(0) > 0, "no write waited for a bitmap batch: {bm}");

    // SIGTERM while this thread keeps writing: the daemon must drain and
    // exit 0 promptly. Writes it acknowledges count.
    let flag = Arc::new(AtomicBool::new(false));
    let killer = signal_at(&mut d, Instant::now() + RESUME, false, flag.clone());
    let signalled = || flag.load(Ordering::SeqCst);
    pump(&mut qps, &mut model, &mut rng, pick, |_| false, &signalled, &log, &|| String::new());
    let (status, exit_time) = killer.join().unwrap();
    assert!(exit_time < TERM_LIMIT, "daemon still running {TERM_LIMIT:?} after SIGTERM: {}", log());
    assert!(status.success(), "daemon exit status {status}: {}", log());
    drain(&mut qps, &mut model, &log);
    drop((qps, session));
    eprintln!(
        "SIGTERM: exited in {exit_time:?}; {} writes acked in all ({} after the signal), {} failed or unanswered; \
         bitmap before the signal {bm}",
        model.acked, model.acked_after_stop, model.failed_after_stop
    );
    assert!(model.failed_after_stop + model.acked_after_stop > 0, "the signal must come with writes in flight");
    for f in &s.files {
        assert!(sb_clean(f), "{}: superblock not clean after SIGTERM", f.display());
    }
    // All bits cleared by the final batch of an in-sync array.
    for f in &s.files {
        assert_eq!(disk_bitmap(f), Vec::<u64>::new(), "{}: bitmap bits left after a clean stop", f.display());
    }

    let mut d = start(&s, &s.full_cfg);
    let log_path = d.log.clone();
    let log = move || std::fs::read_to_string(&log_path).unwrap_or_default();
    let info = wait_in_sync(&mut d);
    assert_eq!(info["copied_blocks"], 0, "a clean shutdown must leave nothing to resync: {info}");
    let (session, mut qps) = connect(s.port);
    let (landed, not_landed) = verify(&mut qps, &mut model, &[], &log);
    eprintln!(
        "{} blocks verified; of the blocks of unanswered writes {landed} had them, {not_landed} did not",
        model.blocks.len()
    );
    assert_members_identical(&s, &info);
    drop((qps, session));
    d.stop();
    eprintln!("raid_crash teardown: {:?} in all", t_start.elapsed());
    let _ = std::fs::remove_dir_all(&s.dir);
}
