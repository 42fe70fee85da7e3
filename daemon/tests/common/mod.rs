//! Test harness: starts the real `nvraid-tgt` binary on a private socket,
//! talks raw JSON-RPC to it, and runs SPDK's own Python client against it.
#![allow(dead_code)]

pub mod crash;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Daemon {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub log: PathBuf,
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A fresh private directory under the target dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Daemon {
    /// Starts the daemon with `args` (the socket and idle policy are added)
    /// and waits until its RPC socket answers.
    pub fn start(dir: &Path, args: &[&str]) -> Daemon {
        Self::try_start(dir, args).unwrap_or_else(|e| panic!("daemon did not start: {e}"))
    }

    pub fn try_start(dir: &Path, args: &[&str]) -> Result<Daemon, String> {
        let sock = dir.join("rpc.sock");
        let log = dir.join(format!("tgt-{}.log", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nvraid-tgt"))
            .args(["-r", sock.to_str().unwrap(), "--idle", "sleep", "--no-pin", "--no-huge"])
            .args(args)
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut d = Daemon { child: Some(child), dir: dir.to_path_buf(), sock, log };
        let t0 = Instant::now();
        loop {
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                d.child = None;
                return Err(format!("exited with {st}: {}", d.log_text()));
            }
            if UnixStream::connect(&d.sock).is_ok() {
                return Ok(d);
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(format!("no RPC socket after 30 s: {}", d.log_text()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request on a fresh connection; Ok(result) or Err((code, message)).
    pub fn rpc(&self, method: &str, params: Value) -> Result<Value, (i64, String)> {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        let mut req = json!({"jsonrpc": "2.0", "method": method, "id": 1});
        if !params.is_null() {
            req["params"] = params;
        }
        s.write_all(serde_json::to_string_pretty(&req).unwrap().as_bytes()).unwrap();
        let v = read_value(&mut s);
        match v.get("error") {
            Some(e) => Err((e["code"].as_i64().unwrap(), e["message"].as_str().unwrap_or("").to_string())),
            None => Ok(v["result"].clone()),
        }
    }

    pub fn ok(&self, method: &str, params: Value) -> Value {
        self.rpc(method, params).unwrap_or_else(|e| panic!("{method} failed: {e:?}"))
    }

    /// Sends raw bytes on a fresh connection and returns what comes back
    /// until the server closes or `timeout` passes.
    pub fn raw(&self, bytes: &[u8], shutdown_write: bool, timeout: Duration) -> String {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        s.write_all(bytes).unwrap();
        if shutdown_write {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        s.set_read_timeout(Some(timeout)).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if !shutdown_write && out.ends_with(b"\n") {
                        break;
                    }
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Asks the daemon to stop (SIGTERM) and waits for a clean exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(st.success(), "daemon exit status {st}: {}", self.log_text());
                return;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("daemon did not stop within 30 s: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_value(s: &mut UnixStream) -> Value {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
}

/// A config with two 128 MiB malloc bdevs (Malloc0, Malloc1) and nothing
/// listening on the network, so tests can run side by side.
pub fn two_malloc_config(dir: &Path) -> PathBuf {
    let p = dir.join("two-malloc.json");
    let cfg = json!({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 32768, "block_size": 4096}},
        {"method": "bdev_malloc_create", "params": {"name": "Malloc1", "num_blocks": 32768, "block_size": 4096}},
    ]}]});
    std::fs::write(&p, cfg.to_string()).unwrap();
    p
}

/// Whether the tests run under CI (`CI` set and not "false"/"0", as CI
/// runners and scripts/test.sh set it): there a test never skips.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// A test cannot run its check because `why`. Under CI that fails the test;
/// on a developer's machine it says so and the caller returns.
pub fn cannot_run(why: &str) {
    assert!(!under_ci(), "this test cannot run its check under CI: {why}");
    eprintln!("NOTE: not run: {why}");
}

/// Path of SPDK's `spdk-rpc` (installed by scripts/test.sh into a venv).
/// Without it the test fails under CI and is not run otherwise.
pub fn spdk_rpc_path() -> Option<PathBuf> {
    let p = std::env::var_os("NVRAID_SPDK_RPC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/spdk-venv/bin/spdk-rpc"));
    if p.exists() {
        return Some(p);
    }
    cannot_run(&format!("SPDK's client is not installed at {} (scripts/test.sh installs it)", p.display()));
    None
}

/// Runs `spdk-rpc -s SOCK args...`.
pub fn spdk_rpc(rpc: &Path, sock: &Path, args: &[&str]) -> Output {
    Command::new(rpc).arg("-s").arg(sock).args(args).stdin(Stdio::null()).output().unwrap()
}

/// Like `spdk_rpc` but the call must succeed; returns stdout parsed as JSON
/// when it is JSON, else as a string value.
pub fn spdk_ok(rpc: &Path, sock: &Path, args: &[&str]) -> Value {
    let o = spdk_rpc(rpc, sock, args);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "spdk-rpc {args:?} failed: {out} {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&out).unwrap_or(Value::String(out.trim().to_string()))
}

/// bdev_get_bdevs with the fields that legitimately change between runs removed.
pub fn stable_bdevs(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(a) = v.as_array_mut() {
        a.sort_by(|x, y| x["name"].as_str().cmp(&y["name"].as_str()));
    }
    v
}
