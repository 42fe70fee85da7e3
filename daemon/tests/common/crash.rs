//! The kill -9 crash storm through the daemon, shared by raid_crash.rs
//! (raid1) and raid_parity_crash.rs (raid5, raid6): seeded randomness,
//! stamped block patterns and the model of what the device must hold, the
//! daemon's config for file-backed members exported over NVMe/TCP, the
//! write pump and read-back over NVMe/TCP, the signal thread, and the
//! members' superblock and bitmap as read from their files.

use super::*;
use mgmt::bdev::DmaBuf;
use mgmt::nvmf::host::{self, Completion, ConnectParams, HostQpair};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const BS: u64 = 4096;
/// Writes kept in flight per queue (two queues: 64 in all).
pub const QD_PER_QUEUE: usize = 32;
/// Least writing time between the mid-way bitmap sample (an RPC, which
/// pauses this single-threaded initiator) and the signal, so that the
/// signal comes during steady writes.
pub const RESUME: Duration = Duration::from_millis(30);
/// No write completing for this long before the signal fails the test.
pub const STALL: Duration = Duration::from_secs(5);
/// SIGTERM must end the daemon within this.
pub const TERM_LIMIT: Duration = Duration::from_secs(5);

// ---- seeded randomness ---------------------------------------------------------

pub fn seed() -> u64 {
    match std::env::var("NVRAID_SEED") {
        Ok(s) => s.parse().expect("NVRAID_SEED must be a number"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
    }
}

pub fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix(self.0)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ---- block patterns -----------------------------------------------------------

pub const MAGIC: &[u8; 8] = b"RCRASH01";

/// Which write put a block's content there: `seq` is unique over the whole
/// test (it is also the command tag), `round` is for the messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub round: u32,
    pub seq: u64,
}

/// A block fully determined by (stamp, lba): a torn or misplaced block
/// never matches any stamp.
pub fn pattern(s: Stamp, lba: u64) -> Vec<u8> {
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
pub fn decode(lba: u64, b: &[u8]) -> Result<Option<Stamp>, String> {
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
pub struct Expect {
    pub durable: Option<Stamp>,
    pub maybe: Vec<Stamp>,
}

#[derive(Default)]
pub struct Model {
    pub blocks: BTreeMap<u64, Expect>,
    /// Blocks with a write in flight: never two overlapping writes at once,
    /// so "last acknowledged" is well defined.
    pub busy: HashSet<u64>,
    /// seq → (lba, blocks).
    pub pending: HashMap<u64, (u64, u64)>,
    pub round: u32,
    pub next_seq: u64,
    pub acked: u64,
    pub acked_after_stop: u64,
    pub failed_after_stop: u64,
}

impl Model {
    pub fn free(&self, lba: u64, n: u64) -> bool {
        (lba..lba + n).all(|l| !self.busy.contains(&l))
    }

    /// Fails only once the queue is dead (the daemon went away).
    pub fn submit(&mut self, qp: &mut HostQpair, lba: u64, n: u64) -> Result<(), host::SubmitError> {
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
    pub fn complete(&mut self, c: Completion, stopping: bool, log: &dyn Fn() -> String) {
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
    pub fn abandon_pending(&mut self) {
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
    pub fn check(&mut self, lba: u64, data: &[u8]) -> Result<Option<bool>, String> {
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
pub struct Setup {
    pub dir: PathBuf,
    /// Member files; bdev "F{i}" is `files[i]`.
    pub files: Vec<PathBuf>,
    /// Members only: for the first start, which creates the array by RPC.
    pub bdevs_cfg: PathBuf,
    /// Members, then the NVMe/TCP export of "R" (assembled from superblocks).
    pub full_cfg: PathBuf,
    pub nqn: String,
    pub port: u16,
}

/// `members` files of `member_bytes` under a fresh directory, uring bdevs
/// F0.. over them, and the configs that export "R" as `nqn`; `transport`
/// adds to nvmf_create_transport's parameters.
pub fn setup(tag: &str, nqn: &str, members: usize, member_bytes: u64, transport: Value) -> Setup {
    let dir = temp_dir(tag);
    let files: Vec<PathBuf> = (0..members).map(|i| dir.join(format!("f{i}.img"))).collect();
    for f in &files {
        std::fs::File::create(f).unwrap().set_len(member_bytes).unwrap();
    }
    let port = free_port();
    let mut bdevs: Vec<Value> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            json!({"method": "bdev_uring_create",
                   "params": {"name": format!("F{i}"), "filename": f, "block_size": BS}})
        })
        .collect();
    bdevs.push(json!({"method": "bdev_wait_for_examine"}));
    let bdev = json!({"subsystem": "bdev", "config": bdevs});
    let mut tp = json!({"trtype": "TCP"});
    if let Some(extra) = transport.as_object() {
        for (k, v) in extra {
            tp[k] = v.clone();
        }
    }
    let nvmf = json!({"subsystem": "nvmf", "config": [
        {"method": "nvmf_create_transport", "params": tp},
        {"method": "nvmf_create_subsystem", "params": {"nqn": nqn, "allow_any_host": true}},
        {"method": "nvmf_subsystem_add_ns", "params": {"nqn": nqn, "namespace": {"bdev_name": "R"}}},
        {"method": "nvmf_subsystem_add_listener", "params": {"nqn": nqn, "listen_address":
            {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}}]});
    let bdevs_cfg = dir.join("bdevs.json");
    std::fs::write(&bdevs_cfg, json!({"subsystems": [bdev.clone()]}).to_string()).unwrap();
    let full_cfg = dir.join("full.json");
    std::fs::write(&full_cfg, json!({"subsystems": [bdev, nvmf]}).to_string()).unwrap();
    Setup { dir, files, bdevs_cfg, full_cfg, nqn: nqn.to_string(), port }
}

/// The daemon on two reactors with config `cfg`.
pub fn start(s: &Setup, cfg: &Path) -> Daemon {
    Daemon::start(&s.dir, &["-m", "0x3", "-c", cfg.to_str().unwrap()])
}

/// Creates "R" on fresh members (`params` of bdev_raid_create, with a
/// superblock and a bitmap chunk size), then stops the daemon orderly.
pub fn create_array(s: &Setup, params: Value) {
    let mut d = start(s, &s.bdevs_cfg);
    d.ok("bdev_raid_create", params.clone());
    let info = raid_info(&d);
    assert_eq!(info["state"], "online", "{info}");
    assert_eq!(info["bitmap"]["chunk_size_kb"], params["bitmap_chunk_size_kb"], "{info}");
    d.stop();
    for f in &s.files {
        assert!(sb_clean(f), "{}: superblock not clean after an orderly stop", f.display());
    }
}

/// The on-disk bitmaps of every member after a kill: the union of their
/// dirty chunks, sorted.
pub fn disk_dirty_union(s: &Setup) -> Vec<u64> {
    let mut u: Vec<u64> = s.files.iter().flat_map(|f| disk_bitmap(f)).collect();
    u.sort_unstable();
    u.dedup();
    u
}

/// The listing of "R" (null when there is none).
pub fn raid_info(d: &Daemon) -> Value {
    let all = d.ok("bdev_raid_get_bdevs", json!({"category": "all"}));
    all.as_array().and_then(|a| a.iter().find(|r| r["name"] == "R")).cloned().unwrap_or(Value::Null)
}

/// Waits until "R" is online with its `members` members active and no
/// resync or rebuild running; returns its listing.
pub fn wait_in_sync(d: &mut Daemon, members: usize) -> Value {
    let t0 = Instant::now();
    loop {
        if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("daemon exited ({st}) while the array came up: {}", d.log_text());
        }
        let info = raid_info(d);
        let members_active = info["base_bdevs_list"]
            .as_array()
            .is_some_and(|l| l.len() == members && l.iter().all(|m| m["state"] == "active"));
        if info["state"] == "online" && info.get("process").is_none() && members_active {
            return info;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "array not in sync after 30 s: {info}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- on-disk checks ---------------------------------------------------------------

pub fn crc32c(data: &[u8]) -> u32 {
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
/// clean; bit 1: redundancy verified; bit 2: partial parity log).
pub fn sb_clean(file: &Path) -> bool {
    use std::io::Read;
    let mut sb = vec![0u8; 4096];
    std::fs::File::open(file).unwrap().read_exact(&mut sb).unwrap();
    assert_eq!(&sb[0..8], b"NVRAIDSB", "{}: no superblock", file.display());
    assert_eq!(u32::from_le_bytes(sb[8..12].try_into().unwrap()), 1, "superblock version");
    let stored = u32::from_le_bytes(sb[12..16].try_into().unwrap());
    sb[12..16].fill(0);
    assert_eq!(crc32c(&sb), stored, "{}: superblock checksum", file.display());
    let flags = u32::from_le_bytes(sb[124..128].try_into().unwrap());
    assert_eq!(flags & !0b111, 0, "unknown superblock flags {flags:#x}");
    flags & 1 == 1
}

/// The chunks whose bit is set in a member's on-disk bitmap. Layout
/// (bitmap/src/page.rs): superblock bytes 160..168 hold bitmap_offset_blocks;
/// a page is a 64-byte header then the bits; one page covers this test's
/// chunks.
pub fn disk_bitmap(file: &Path) -> Vec<u64> {
    let bytes = std::fs::read(file).unwrap();
    let off = u64::from_le_bytes(bytes[160..168].try_into().unwrap()) as usize * BS as usize;
    let page = &bytes[off..off + 4096];
    assert_eq!(&page[0..8], b"NVRBITMP", "{}: bitmap page magic", file.display());
    let num_chunks = u64::from_le_bytes(page[48..56].try_into().unwrap());
    assert!(num_chunks <= 8 * (4096 - 64), "more than one bitmap page");
    (0..num_chunks).filter(|c| page[64 + (*c / 8) as usize] & (1 << (c % 8)) != 0).collect()
}

// ---- NVMe/TCP IO ----------------------------------------------------------------

/// The session (its admin queue keeps the controller) and two IO queues,
/// which the target places on its two reactors.
pub fn connect(port: u16, nqn: &str) -> (host::Session, Vec<HostQpair>) {
    let p = ConnectParams::new("127.0.0.1", &port.to_string(), nqn);
    let mut s = host::connect(&p, 2).unwrap_or_else(|e| panic!("connect: {e}"));
    let ns = &s.info.namespaces[0];
    assert_eq!(ns.block_size as u64, BS);
    let qps = s.io.drain(..).map(HostQpair::from_parts).collect();
    (s, qps)
}

/// Reads every written block and `extra` never-written ones and checks each
/// against the model. Returns (in-flight writes that landed, that did not).
pub fn verify(qps: &mut [HostQpair], model: &mut Model, extra: &[u64], log: &dyn Fn() -> String) -> (u64, u64) {
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
pub fn pump(
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
pub fn diag(d: &Daemon) -> String {
    format!("{}\n{}", raid_info(d), d.ok("bdev_get_iostat", Value::Null))
}

/// One kill round's writes: writes at `pick`'s places until half of
/// `kill_after` has passed, reads the array's bitmap listing (the workload
/// pauses for this RPC, so the kill comes well after it), writes on until
/// kill -9 lands at `t0 + kill_after` (at least `RESUME` from now), then
/// takes what the dead daemon's queues still report. Returns the listing.
#[allow(clippy::too_many_arguments)]
pub fn writes_until_killed(
    d: &mut Daemon,
    qps: &mut [HostQpair],
    model: &mut Model,
    rng: &mut Rng,
    mut pick: impl FnMut(&mut Rng) -> (u64, u64),
    t0: Instant,
    kill_after: Duration,
    log: &dyn Fn() -> String,
) -> Value {
    let never = || false;
    {
        let dg = || diag(d);
        pump(qps, model, rng, &mut pick, |_| t0.elapsed() >= kill_after / 2, &never, log, &dg);
    }
    let bm = raid_info(d)["bitmap"].clone();
    let flag = Arc::new(AtomicBool::new(false));
    let killer = signal_at(d, (t0 + kill_after).max(Instant::now() + RESUME), true, flag.clone());
    let signalled = || flag.load(Ordering::SeqCst);
    pump(qps, model, rng, &mut pick, |_| false, &signalled, log, &|| String::new());
    let (status, _) = killer.join().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "daemon ended with {status}: {}", log());
    drain(qps, model, log);
    bm
}

/// A thread that, at `at`, raises `flag` and then signals the daemon: SIGKILL
/// (returns once it is reaped), or SIGTERM (returns once it exited, or
/// kills it after `TERM_LIMIT`). Returns the exit status and how long the
/// daemon took to go after the signal.
pub fn signal_at(
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
pub fn drain(qps: &mut [HostQpair], model: &mut Model, log: &dyn Fn() -> String) {
    let t0 = Instant::now();
    while qps.iter().any(|q| q.outstanding() > 0) && t0.elapsed() < Duration::from_secs(5) {
        for qp in qps.iter_mut() {
            let _ = qp.poll(|c| model.complete(c, true, log));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    model.abandon_pending();
}
