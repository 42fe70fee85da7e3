//! A RAID1 whose second member is on another machine survives losing the
//! path to it. Two real daemons: the remote one runs in its own network
//! namespace behind a veth pair this test creates (`ip netns`, root), and
//! exports a malloc bdev over NVMe/TCP; the local one attaches it with
//! SPDK's client (`spdk-rpc`: keep alive 1 s, ctrlr_loss_timeout_sec -1,
//! reconnect_delay_sec 1, fast_io_fail_timeout_sec 1) and mirrors a local
//! malloc bdev onto it (superblock, 1 MiB bitmap chunks), exported to this
//! test, which writes without pause. Three times the link goes down (a
//! silent path: no FIN, no RST) while writes run:
//!
//! - no write fails: after KATO and fast_io_fail the remote member fails
//!   and the array serves degraded (the stall is measured);
//! - the link comes back: the initiator reconnects by itself and tells the
//!   namespace's holders (`BdevEvent::Restored`); the array takes its failed
//!   member back by itself, recognised by its superblock, and resyncs it
//!   from the bitmap: copied blocks are the dirty chunks only;
//! - `bdev_nvme_reset_controller` while writes run reconnects without
//!   failing a write or the member;
//! - at the end both members hold the same data, and it is what was written.

mod common;
use common::*;
use mgmt::bdev::DmaBuf;
use mgmt::nvmf::host::{self, ConnectParams, HostQpair};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2016-06.io.nvraid:remote-mirror";
const ARRAY_NQN: &str = "nqn.2016-06.io.nvraid:mirror";
const BS: usize = 4096;
const BLOCKS: u64 = 8192; // 32 MiB members
const CHUNK_BLOCKS: u64 = 256; // 1 MiB bitmap chunks
const T: Duration = Duration::from_secs(30);

fn sh(args: &[&str]) -> Result<(), String> {
    let o = Command::new(args[0]).args(&args[1..]).output().map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("{args:?}: {}", String::from_utf8_lossy(&o.stderr)))
    }
}

/// A network namespace joined to this one by a veth pair; removed on drop.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    peer_ip: String,
}

impl Netns {
    /// `tag` (0 or 1) tells apart the namespaces of this file's tests,
    /// which run at the same time.
    fn create(tag: u32) -> Result<Netns, String> {
        let id = std::process::id() % 50_000;
        let subnet = 16 + (id + tag * 101) % 200;
        let n = Netns {
            name: format!("nvrm{id}{tag}"),
            host_if: format!("nvrh{id}{tag}"),
            host_ip: format!("10.213.{subnet}.1"),
            peer_ip: format!("10.213.{subnet}.2"),
        };
        let peer_if = format!("nvrp{id}{tag}");
        let _ = sh(&["ip", "netns", "del", &n.name]);
        sh(&["ip", "netns", "add", &n.name])?;
        sh(&["ip", "link", "add", &n.host_if, "type", "veth", "peer", "name", &peer_if])?;
        sh(&["ip", "link", "set", &peer_if, "netns", &n.name])?;
        sh(&["ip", "addr", "add", &format!("{}/24", n.host_ip), "dev", &n.host_if])?;
        sh(&["ip", "link", "set", &n.host_if, "up"])?;
        n.exec(&["ip", "addr", "add", &format!("{}/24", n.peer_ip), "dev", &peer_if])?;
        n.exec(&["ip", "link", "set", &peer_if, "up"])?;
        n.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(n)
    }

    fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut a = vec!["ip", "netns", "exec", &self.name];
        a.extend_from_slice(args);
        sh(&a)
    }

    /// The path goes silent (host side of the pair down) or comes back.
    fn link(&self, up: bool) {
        sh(&["ip", "link", "set", &self.host_if, if up { "up" } else { "down" }]).unwrap();
        if up {
            // Until the route is back a connect fails at once.
            let t0 = Instant::now();
            while !Command::new("ip")
                .args(["route", "get", &self.peer_ip])
                .output()
                .unwrap()
                .stdout
                .starts_with(self.peer_ip.as_bytes())
            {
                assert!(t0.elapsed() < Duration::from_secs(5), "no route to {} after link up", self.peer_ip);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the pair too.
        let _ = sh(&["ip", "netns", "del", &self.name]);
        let _ = sh(&["ip", "link", "del", &self.host_if]);
    }
}

/// The remote daemon, started inside the namespace.
struct Remote {
    child: Child,
    sock: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Remote {
    fn start(ns: &Netns, dir: &Path) -> Remote {
        let sock = dir.join("remote.sock");
        let log = dir.join("remote.log");
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_nvraid-tgt")])
            .args(["-r", sock.to_str().unwrap(), "--idle", "sleep", "--no-pin", "--no-huge", "-m", "0x1"])
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(t0.elapsed() < T, "remote daemon did not start: {}", std::fs::read_to_string(&log).unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
        Remote { child, sock, log }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn raid(d: &Daemon) -> Value {
    d.ok("bdev_raid_get_bdevs", json!({"category": "all"}))[0].clone()
}

fn member_state(r: &Value, name: &str) -> String {
    r["base_bdevs_list"]
        .as_array()
        .and_then(|l| l.iter().find(|m| m["name"] == json!(name)))
        .map_or("absent".into(), |m| m["state"].as_str().unwrap_or("").to_string())
}

fn ctrl_state(d: &Daemon) -> String {
    let c = d.ok("bdev_nvme_get_controllers", json!({"name": "Remote"}));
    c[0]["ctrlrs"][0]["state"].as_str().unwrap_or("").to_string()
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Instant {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    Instant::now()
}

/// One write the writer made: when it was sent and answered, and whether
/// it succeeded.
struct Sent {
    block: u64,
    at: Instant,
    done: Instant,
    ok: bool,
}

/// Writes one block at a time (queue depth 1, so a stall is one long
/// write) over the exported array, each block filled from (block, seq),
/// inside the window `[base, base + len)` that the test moves.
struct Writer {
    stop: Arc<AtomicBool>,
    window: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<Sent>>>,
    model: Arc<Mutex<HashMap<u64, u64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn fill(block: u64, seq: u64) -> Vec<u8> {
    let mut v = vec![0u8; BS];
    for (i, c) in v.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq ^ i as u64).to_le_bytes());
    }
    v
}

/// `window` packs base (high 32 bits) and length in blocks (low 32).
fn window(base: u64, len: u64) -> u64 {
    (base << 32) | len
}

impl Writer {
    fn start(port: u16) -> Writer {
        Self::start_in(port, window(0, BLOCKS - 1))
    }

    /// Starts writing inside `win` (see [`window`]).
    fn start_in(port: u16, win: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let win = Arc::new(AtomicU64::new(win));
        let log = Arc::new(Mutex::new(Vec::new()));
        let model = Arc::new(Mutex::new(HashMap::new()));
        let (st, w, l, m) = (stop.clone(), win.clone(), log.clone(), model.clone());
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            // The queue pair lives on this thread (it is not Send).
            let mut p = ConnectParams::new("127.0.0.1", &port.to_string(), ARRAY_NQN);
            p.kato_ms = 0;
            let s = host::connect(&p, 1).unwrap_or_else(|e| panic!("connect to the array: {e}"));
            let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
            let admin = s.admin;
            let _ = ready_tx.send(());
            let _admin = admin;
            let mut rng = 0x2545_F491_4F6C_DD1Du64;
            let mut seq = 0u64;
            let buf = DmaBuf::alloc(BS).unwrap();
            while !st.load(Ordering::Acquire) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let win = w.load(Ordering::Acquire);
                let block = (win >> 32) + rng % (win & 0xFFFF_FFFF).max(1);
                seq += 1;
                buf.copy_from(0, &fill(block, seq));
                let at = Instant::now();
                qp.write(1, block, 1, buf.clone(), seq).unwrap();
                let mut got = None;
                while got.is_none() {
                    qp.poll(|c| got = Some(c.status.is_success())).expect("array connection");
                    assert!(at.elapsed() < T, "a write to the array took more than {T:?}");
                    if got.is_none() {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
                let ok = got.unwrap();
                if ok {
                    m.lock().unwrap().insert(block, seq);
                }
                l.lock().unwrap().push(Sent { block, at, done: Instant::now(), ok });
            }
        });
        ready.recv_timeout(T).expect("writer connected");
        Writer { stop, window: win, log, model, thread: Some(thread) }
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Reads `blocks` blocks from `offset` of NSID 1 at traddr:port.
fn read_all(traddr: &str, port: &str, nqn: &str, offset: u64, blocks: u64) -> Vec<u8> {
    let mut p = ConnectParams::new(traddr, port, nqn);
    p.kato_ms = 0;
    let s = host::connect(&p, 1).unwrap_or_else(|e| panic!("connect {traddr}:{port}: {e}"));
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    let mut out = Vec::with_capacity(blocks as usize * BS);
    let per = 32u64;
    let mut at = offset;
    while at < offset + blocks {
        let n = per.min(offset + blocks - at);
        qp.read(1, at, n as u32, DmaBuf::alloc(n as usize * BS).unwrap(), 0).unwrap();
        let mut got = None;
        let t0 = Instant::now();
        while got.is_none() {
            qp.poll(|c| got = Some(c)).unwrap();
            assert!(t0.elapsed() < T);
        }
        let c = got.unwrap();
        assert!(c.status.is_success(), "read at {at}");
        out.extend_from_slice(&c.buf.unwrap().to_vec()[..n as usize * BS]);
        at += n;
    }
    drop(s.admin);
    out
}

/// spdk-rpc's attach of the far target's namespace as controller `Remote`:
/// reconnect every second (-o 1), never give the controller up (-l -1),
/// fail IO after a second without a path (-u 1).
fn remote_attach_args(peer_ip: &str) -> [&str; 19] {
    [
        "bdev_nvme_attach_controller",
        "-b",
        "Remote",
        "-t",
        "tcp",
        "-a",
        peer_ip,
        "-s",
        "4420",
        "-f",
        "ipv4",
        "-n",
        NQN,
        "-l",
        "-1",
        "-o",
        "1",
        "-u",
        "1",
    ]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn mirror_with_a_remote_member_survives_a_flapping_path_and_resyncs_only_what_it_missed() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let ns = match Netns::create(0) {
        Ok(ns) => ns,
        Err(e) => return cannot_run(&format!("no network namespace with a veth pair: {e}")),
    };
    let dir = temp_dir("remote-mirror");
    let remote = Remote::start(&ns, &dir);
    let r = |args: &[&str]| spdk_ok(&rpc, &remote.sock, args);
    r(&["bdev_malloc_create", "-b", "Far0", &(BLOCKS * BS as u64 / 1048576).to_string(), &BS.to_string()]);
    r(&["nvmf_create_transport", "-t", "TCP"]);
    r(&["nvmf_create_subsystem", NQN, "-a"]);
    r(&["nvmf_subsystem_add_ns", NQN, "Far0"]);
    r(&["nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", &ns.peer_ip, "-s", "4420"]);

    let local_dir = temp_dir("remote-mirror-local");
    let d = Daemon::start(&local_dir, &["-m", "0x3"]);
    let l = |args: &[&str]| spdk_ok(&rpc, &d.sock, args);
    l(&["bdev_nvme_set_options", "-k", "1000"]);
    let names = l(&remote_attach_args(&ns.peer_ip));
    assert_eq!(names, json!("Remoten1"));
    // The settings are kept: save_config recreates the controller with them.
    let saved = l(&["save_config"]);
    let attach = saved["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["config"].as_array().cloned().unwrap_or_default())
        .find(|m| m["method"] == json!("bdev_nvme_attach_controller"))
        .expect("attach in save_config");
    assert_eq!(attach["params"]["ctrlr_loss_timeout_sec"], json!(-1), "{attach}");
    assert_eq!(attach["params"]["reconnect_delay_sec"], json!(1));
    assert_eq!(attach["params"]["fast_io_fail_timeout_sec"], json!(1));
    // What SPDK refuses, the real client is refused too.
    let o = spdk_rpc(
        &rpc,
        &d.sock,
        &[
            "bdev_nvme_attach_controller",
            "-b",
            "Bad",
            "-t",
            "tcp",
            "-a",
            &ns.peer_ip,
            "-s",
            "4420",
            "-f",
            "ipv4",
            "-n",
            NQN,
            "-l",
            "5",
            "-o",
            "6",
        ],
    );
    assert!(!o.status.success());
    let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(said.contains("\"code\": -22") && said.contains("more than ctrlr_loss_timeout_sec"), "{said}");

    l(&["bdev_malloc_create", "-b", "Near0", &(BLOCKS * BS as u64 / 1048576).to_string(), &BS.to_string()]);
    d.ok(
        "bdev_raid_create",
        json!({"name": "Mirror", "raid_level": "raid1", "base_bdevs": ["Near0", "Remoten1"], "superblock": true,
               "bitmap_chunk_size_kb": CHUNK_BLOCKS * BS as u64 / 1024}),
    );
    let port = free_port().to_string();
    l(&["nvmf_create_transport", "-t", "TCP"]);
    l(&["nvmf_create_subsystem", ARRAY_NQN, "-a"]);
    l(&["nvmf_subsystem_add_ns", ARRAY_NQN, "Mirror"]);
    l(&["nvmf_subsystem_add_listener", ARRAY_NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", &port]);
    let array_blocks = raid(&d)["base_bdevs_list"][0]["data_size"].as_u64().unwrap();

    let mut w = Writer::start(port.parse().unwrap());
    w.window.store(window(0, array_blocks), Ordering::Release);
    std::thread::sleep(Duration::from_millis(500));

    for cycle in 0..3u64 {
        // While away, writes land in two bitmap chunks of their own.
        let base = (1 + cycle * 4) * CHUNK_BLOCKS;
        let copied_before = raid(&d)["copied_blocks"].as_u64().unwrap();
        let lost_at = Instant::now();
        ns.link(false);
        w.window.store(window(base, 2 * CHUNK_BLOCKS), Ordering::Release);
        let degraded_at = wait_for("remote member failed", T, || member_state(&raid(&d), "Remoten1") == "failed");
        assert_eq!(raid(&d)["state"], json!("online"), "degraded, still online");
        std::thread::sleep(Duration::from_millis(700));
        let up_at = Instant::now();
        ns.link(true);
        let back_at = wait_for("reconnected", T, || ctrl_state(&d) == "enabled");
        // No RPC: the array re-adds the member the reconnect restored
        // (recognised by its superblock, resynced from the bitmap).
        let synced_at = wait_for("in sync", T, || {
            let r = raid(&d);
            member_state(&r, "Remoten1") == "active" && r.get("process").is_none()
        });
        w.window.store(window(0, array_blocks), Ordering::Release);
        let copied = raid(&d)["copied_blocks"].as_u64().unwrap() - copied_before;

        let log = w.log.lock().unwrap();
        assert!(log.iter().all(|s| s.ok), "a write to the array failed");
        // The write that hung on the lost path is the stall; degraded IO
        // resumed when it completed.
        let stalled = log.iter().filter(|s| s.done > lost_at).max_by_key(|s| s.done - s.at).unwrap();
        let (resumed_at, stall) = (stalled.done, stalled.done - stalled.at);
        let away: std::collections::BTreeSet<u64> =
            log.iter().filter(|s| s.at >= lost_at && s.done <= up_at).map(|s| s.block).collect();
        drop(log);
        let chunks: std::collections::BTreeSet<u64> = away.iter().map(|b| b / CHUNK_BLOCKS).collect();
        println!(
            "cycle {cycle}: path lost -> member failed {:?}, -> degraded IO resumed {:?} (longest write {:?}); \
             path back -> reconnected {:?}, -> in sync {:?}; {} blocks written while away in {} chunks, \
             {copied} blocks copied",
            degraded_at - lost_at,
            resumed_at - lost_at,
            stall,
            back_at - up_at,
            synced_at - up_at,
            away.len(),
            chunks.len(),
        );
        assert!(!away.is_empty(), "the array served writes while degraded");
        // Only the dirty chunks are copied: the window's two, written while
        // away, and at most the chunks of writes in flight around the loss.
        assert!((base / CHUNK_BLOCKS..base / CHUNK_BLOCKS + 2).all(|c| chunks.contains(&c)), "{chunks:?}");
        assert!(copied >= 2 * CHUNK_BLOCKS, "copied {copied}: less than the chunks written while away");
        assert!(copied <= (chunks.len() as u64 + 2) * CHUNK_BLOCKS, "copied {copied}: more than the dirty chunks");
        assert!(copied < array_blocks / 4, "not a full rebuild");
    }
    // A reset by RPC while writes run: the connections are made again, IO
    // waits for them, and the member never fails.
    let cntlid = d.ok("bdev_nvme_get_controllers", json!({"name": "Remote"}))[0]["ctrlrs"][0]["cntlid"].clone();
    // (SPDK's client prints nothing for this method; its exit status says.)
    let o = spdk_rpc(&rpc, &d.sock, &["bdev_nvme_reset_controller", "Remote"]);
    assert!(o.status.success(), "{o:?}");
    let c = d.ok("bdev_nvme_get_controllers", json!({"name": "Remote"}));
    assert_ne!(c[0]["ctrlrs"][0]["cntlid"], cntlid, "a new controller after the reset: {c}");
    std::thread::sleep(Duration::from_millis(300));
    w.finish();
    assert!(w.log.lock().unwrap().iter().all(|s| s.ok), "a write to the array failed around the reset");
    assert_eq!(member_state(&raid(&d), "Remoten1"), "active", "the reset does not fail the member");

    // Both copies hold what was written: take the array apart (superblocks
    // stay) and read each member's data area directly.
    let r = raid(&d);
    assert_eq!(r["state"], json!("online"));
    let offset = r["base_bdevs_list"][0]["data_offset"].as_u64().unwrap();
    assert_eq!(r["base_bdevs_list"][1]["data_offset"].as_u64().unwrap(), offset);
    d.ok("bdev_raid_delete", json!({"name": "Mirror"}));
    l(&["nvmf_create_subsystem", "nqn.2016-06.io.nvraid:near", "-a"]);
    l(&["nvmf_subsystem_add_ns", "nqn.2016-06.io.nvraid:near", "Near0"]);
    l(&["nvmf_subsystem_add_listener", "nqn.2016-06.io.nvraid:near", "-t", "tcp", "-a", "127.0.0.1", "-s", &port]);
    let near = read_all("127.0.0.1", &port, "nqn.2016-06.io.nvraid:near", offset, array_blocks);
    let far = read_all(&ns.peer_ip, "4420", NQN, offset, array_blocks);
    let differ =
        (0..array_blocks as usize).filter(|&b| near[b * BS..(b + 1) * BS] != far[b * BS..(b + 1) * BS]).count();
    assert_eq!(differ, 0, "blocks that differ between the members");
    let model = w.model.lock().unwrap();
    for (&block, &seq) in model.iter() {
        assert!(near[block as usize * BS..(block as usize + 1) * BS] == fill(block, seq), "block {block}");
    }
    println!("members identical over {array_blocks} blocks; {} blocks checked against what was written", model.len());
    let _ = std::fs::read_to_string(&remote.log);
}

/// Serves the file `far` as Far0 over NVMe/TCP from the remote daemon.
/// A bdev named like the array is made first: the remote machine must not
/// assemble the array its file holds a member of (the name is taken, so
/// examine leaves Far0 unclaimed for the export).
fn serve_far(rpc: &Path, remote: &Remote, ns: &Netns, far: &Path) {
    let r = |args: &[&str]| spdk_ok(rpc, &remote.sock, args);
    r(&["bdev_malloc_create", "-b", "Mirror", "1", &BS.to_string()]);
    r(&["bdev_uring_create", far.to_str().unwrap(), "Far0", &BS.to_string()]);
    r(&["bdev_wait_for_examine"]);
    r(&["nvmf_create_transport", "-t", "TCP"]);
    r(&["nvmf_create_subsystem", NQN, "-a"]);
    r(&["nvmf_subsystem_add_ns", NQN, "Far0"]);
    r(&["nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", &ns.peer_ip, "-s", "4420"]);
}

/// Runs the writer on `window` for `d`, then stops it; returns its log's
/// distinct blocks written (all writes must succeed) and its model.
fn write_for(port: u16, win: u64, d: Duration) -> (std::collections::BTreeSet<u64>, HashMap<u64, u64>) {
    let mut w = Writer::start_in(port, win);
    std::thread::sleep(d);
    w.finish();
    let log = w.log.lock().unwrap();
    assert!(log.iter().all(|s| s.ok), "a write to the array failed");
    let blocks = log.iter().map(|s| s.block).collect();
    let model = w.model.lock().unwrap().clone();
    (blocks, model)
}

#[test]
fn remote_member_returning_after_the_local_daemon_restarted_is_resynced_only_where_it_missed_writes() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let ns = match Netns::create(1) {
        Ok(ns) => ns,
        Err(e) => return cannot_run(&format!("no network namespace with a veth pair: {e}")),
    };
    let dir = temp_dir("remote-mirror-restart");
    let (near, far) = (dir.join("near.img"), dir.join("far.img"));
    for f in [&near, &far] {
        std::fs::File::create(f).unwrap().set_len(BLOCKS * BS as u64).unwrap();
    }
    std::fs::create_dir_all(dir.join("remote1")).unwrap();
    std::fs::create_dir_all(dir.join("remote2")).unwrap();
    let remote = Remote::start(&ns, &dir.join("remote1"));
    serve_far(&rpc, &remote, &ns, &far);

    let local_dir = temp_dir("remote-mirror-restart-local");
    let mut d = Daemon::start(&local_dir, &["-m", "0x3"]);
    let l = |d: &Daemon, args: &[&str]| spdk_ok(&rpc, &d.sock, args);
    l(&d, &["bdev_nvme_set_options", "-k", "1000"]);
    d.ok("bdev_raid_set_options", json!({"assemble_timeout_sec": 1}));
    l(&d, &["bdev_uring_create", near.to_str().unwrap(), "Near0", &BS.to_string()]);
    let attach = remote_attach_args(&ns.peer_ip);
    assert_eq!(l(&d, &attach), json!("Remoten1"));
    d.ok(
        "bdev_raid_create",
        json!({"name": "Mirror", "raid_level": "raid1", "base_bdevs": ["Near0", "Remoten1"], "superblock": true,
               "bitmap_chunk_size_kb": CHUNK_BLOCKS * BS as u64 / 1024}),
    );
    let port = free_port();
    l(&d, &["nvmf_create_transport", "-t", "TCP"]);
    l(&d, &["nvmf_create_subsystem", ARRAY_NQN, "-a"]);
    l(&d, &["nvmf_subsystem_add_ns", ARRAY_NQN, "Mirror"]);
    l(&d, &["nvmf_subsystem_add_listener", ARRAY_NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", &port.to_string()]);
    let array_blocks = raid(&d)["base_bdevs_list"][0]["data_size"].as_u64().unwrap();
    let offset = raid(&d)["base_bdevs_list"][0]["data_offset"].as_u64().unwrap();
    // In sync: writes everywhere.
    let (_, mut model) = write_for(port, window(0, array_blocks), Duration::from_millis(400));

    // The remote daemon dies (its file keeps what it had); writes go on
    // degraded in chunks 2 and 3.
    let killed_at = Instant::now();
    drop(remote);
    let mut w = Writer::start_in(port, window(2 * CHUNK_BLOCKS, 2 * CHUNK_BLOCKS));
    wait_for("remote member failed", T, || member_state(&raid(&d), "Remoten1") == "failed");
    std::thread::sleep(Duration::from_millis(400));
    w.finish();
    let log = w.log.lock().unwrap();
    assert!(log.iter().all(|s| s.ok), "a write to the array failed while the remote daemon died");
    let mut away: std::collections::BTreeSet<u64> =
        log.iter().filter(|s| s.done >= killed_at).map(|s| s.block).collect();
    let stall = log.iter().filter(|s| s.done > killed_at).map(|s| s.done - s.at).max().unwrap();
    drop(log);
    model.extend(w.model.lock().unwrap().drain());

    // The local daemon stops and starts again from its saved config; the
    // controller's attach cannot succeed while the remote is down (as in
    // SPDK, a failed call fails the start), so it is made once the remote
    // is back. The array assembles from Near0's superblock, degraded.
    let saved = l(&d, &["save_config"]);
    d.stop();
    let mut attach_call = None;
    let mut cfg = saved.clone();
    for s in cfg["subsystems"].as_array_mut().unwrap() {
        if let Some(calls) = s["config"].as_array_mut() {
            calls.retain(|c| {
                let is_attach = c["method"] == json!("bdev_nvme_attach_controller");
                if is_attach {
                    attach_call = Some(c["params"].clone());
                }
                !is_attach
            });
        }
    }
    let attach_call = attach_call.expect("the attach in save_config");
    let cfg_path = dir.join("local.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let local_dir = temp_dir("remote-mirror-restart-local2");
    let d = Daemon::start(&local_dir, &["-m", "0x3", "-c", cfg_path.to_str().unwrap()]);
    wait_for("array assembled degraded", T, || {
        d.rpc("bdev_raid_get_bdevs", json!({"category": "online"})).is_ok_and(|v| v[0]["name"] == json!("Mirror"))
    });
    // More writes while away, after the restart: chunk 5.
    let (after, m) = write_for(port, window(5 * CHUNK_BLOCKS, CHUNK_BLOCKS), Duration::from_millis(400));
    away.extend(after.iter());
    model.extend(m);

    let remote = Remote::start(&ns, &dir.join("remote2"));
    serve_far(&rpc, &remote, &ns, &far);
    let back_at = Instant::now();
    d.ok("bdev_nvme_attach_controller", attach_call);
    // Recognised by its superblock as the array's member (not a new one):
    // it rejoins its slot by itself and is resynced from the bitmap.
    let synced_at = wait_for("in sync", T, || {
        let r = raid(&d);
        member_state(&r, "Remoten1") == "active" && r.get("process").is_none()
    });
    let r = raid(&d);
    let copied = r["copied_blocks"].as_u64().unwrap();
    let chunks: std::collections::BTreeSet<u64> = away.iter().map(|b| b / CHUNK_BLOCKS).collect();
    println!(
        "remote killed -> longest write {stall:?}; local daemon restarted; remote back -> in sync {:?}; \
         {} blocks written while away in {} chunks {chunks:?}, {copied} blocks copied (of {array_blocks})",
        synced_at - back_at,
        away.len(),
        chunks.len(),
    );
    assert!([2, 3, 5].iter().all(|c| chunks.contains(c)), "{chunks:?}");
    assert!(copied >= 3 * CHUNK_BLOCKS, "copied {copied}: less than the chunks written while away");
    // Writes in flight when the member failed may dirty one chunk more.
    assert!(copied <= (chunks.len() as u64 + 1) * CHUNK_BLOCKS, "copied {copied}: more than the dirty chunks");

    // The namespace bdev's multipath policy (the spdk-rpc installed here
    // has no bdev_nvme_set_multipath_policy command: SPDK's parameters as
    // JSON); what SPDK refuses is refused.
    let policy = json!({"name": "Remoten1", "policy": "active_active", "selector": "round_robin", "rr_min_io": 2});
    assert_eq!(d.ok("bdev_nvme_set_multipath_policy", policy), json!(true));
    let refused = json!({"name": "Remoten1", "policy": "active_passive", "selector": "queue_depth"});
    let e = d.rpc("bdev_nvme_set_multipath_policy", refused).unwrap_err();
    assert!(e.1.contains("active_active only"), "{e:?}");

    // Both copies identical, and what was written.
    assert_eq!(r["base_bdevs_list"][1]["data_offset"].as_u64().unwrap(), offset);
    d.ok("bdev_raid_delete", json!({"name": "Mirror"}));
    d.ok("bdev_nvme_detach_controller", json!({"name": "Remote"}));
    let near_nqn = "nqn.2016-06.io.nvraid:near";
    l(&d, &["nvmf_create_subsystem", near_nqn, "-a"]);
    l(&d, &["nvmf_subsystem_add_ns", near_nqn, "Near0"]);
    l(&d, &["nvmf_subsystem_add_listener", near_nqn, "-t", "tcp", "-a", "127.0.0.1", "-s", &port.to_string()]);
    let near = read_all("127.0.0.1", &port.to_string(), near_nqn, offset, array_blocks);
    let far = read_all(&ns.peer_ip, "4420", NQN, offset, array_blocks);
    let differ =
        (0..array_blocks as usize).filter(|&b| near[b * BS..(b + 1) * BS] != far[b * BS..(b + 1) * BS]).count();
    assert_eq!(differ, 0, "blocks that differ between the members");
    for (&block, &seq) in model.iter() {
        assert!(near[block as usize * BS..(block as usize + 1) * BS] == fill(block, seq), "block {block}");
    }
    drop(remote);
}
