//! Rate limits and latency histograms driven through SPDK's client against
//! the real daemon: `bdev_set_qos_limit` with SPDK's rounding and errors,
//! `assigned_rate_limits` in `bdev_get_bdevs`, an IOPS limit that NVMe/TCP
//! IO from nvraid's initiator does not exceed and that removing lifts, `bdev_enable_histogram` and
//! `bdev_get_histogram` decoded by Python's base64 (not nvraid's code) to
//! the number of IOs done, and `save_config` / `-c` restoring both.

mod common;
use common::*;
use mgmt::bdev::DmaBuf;
use mgmt::nvmf::host::{self, ConnectParams, HostQpair};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn export(rpc: &Path, s: &Path, port: &str) {
    spdk_ok(rpc, s, &["nvmf_create_transport", "-t", "TCP"]);
    spdk_ok(rpc, s, &["nvmf_create_subsystem", NQN, "-a", "-s", "SPDK00000000000001"]);
    spdk_ok(rpc, s, &["nvmf_subsystem_add_ns", NQN, "Malloc0"]);
    spdk_ok(rpc, s, &["nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", port]);
}

/// Does `n` 4 KiB IOs (writes then reads, alternately) at queue depth 8
/// through the target; returns how long they took from the first
/// submission to the last completion.
fn run_ios(port: &str, n: u64) -> Duration {
    let p = ConnectParams::new("127.0.0.1", port, NQN);
    let s = host::connect(&p, 1).unwrap_or_else(|e| panic!("connect: {e}"));
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    let (mut issued, mut done) = (0u64, 0u64);
    let t0 = Instant::now();
    while done < n {
        while issued < n && issued - done < 8 {
            let lba = issued % 1024;
            let r = if issued % 2 == 0 {
                qp.write(1, lba, 1, DmaBuf::alloc(4096).unwrap(), issued)
            } else {
                qp.read(1, lba, 1, DmaBuf::alloc(4096).unwrap(), issued)
            };
            r.unwrap_or_else(|e| panic!("submit: {e:?}"));
            issued += 1;
        }
        qp.poll(|c| {
            assert!(c.status.is_success(), "IO {} failed", c.tag);
            done += 1;
        })
        .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(60), "{done} of {n} IOs in 60 s");
    }
    t0.elapsed()
}

/// Sums the counts of a `bdev_get_histogram` answer with Python's base64
/// and struct modules (the decoder SPDK's histogram script uses).
fn python_histogram_total(rpc: &Path, answer: &Value) -> u64 {
    let python = rpc.parent().unwrap().join("python3");
    let script = "import base64,json,struct,sys\n\
                  h=json.load(sys.stdin)\n\
                  b=base64.b64decode(h['histogram'])\n\
                  n=(h['max_range']-h['min_range']+1)<<h['granularity']\n\
                  assert len(b)==8*n, (len(b), n)\n\
                  print(sum(struct.unpack('<%dQ'%n, b)))";
    let mut child = Command::new(&python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(answer.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn limits(rpc: &Path, s: &Path) -> Value {
    spdk_ok(rpc, s, &["bdev_get_bdevs", "-b", "Malloc0"])[0]["assigned_rate_limits"].clone()
}

fn error_of(rpc: &Path, s: &Path, args: &[&str]) -> String {
    let o = spdk_rpc(rpc, s, args);
    assert!(!o.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

#[test]
fn spdk_client_sets_rate_limits_and_reads_latency_histograms() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("bdev-qos");
    let cfg = two_malloc_config(&dir);
    let mut d = Daemon::start(&dir, &["-m", "0x3", "-c", cfg.to_str().unwrap()]);
    let s = d.sock.clone();

    // SPDK's answers: rounding up to a multiple of 1000, errors.
    assert_eq!(
        limits(&rpc, &s),
        json!({"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0})
    );
    spdk_ok(&rpc, &s, &["bdev_set_qos_limit", "Malloc0", "--rw-ios-per-sec", "1500", "--w-mbytes-per-sec", "30"]);
    assert_eq!(
        limits(&rpc, &s),
        json!({"rw_ios_per_sec": 2000, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 30})
    );
    assert_eq!(d.rpc("bdev_set_qos_limit", json!({"name": "Malloc0"})), Err((-22, "No rate limits specified".into())));
    let e = d.rpc("bdev_set_qos_limit", json!({"name": "Nope", "rw_ios_per_sec": 1000})).unwrap_err();
    assert_eq!(e.0, -19);
    let e = d.rpc("bdev_set_qos_limit", json!({"name": "Malloc0", "rw_ios_per_sec": -1000})).unwrap_err();
    assert_eq!(e.0, -32602, "{e:?}");
    let e = d.rpc("bdev_set_qos_limit", json!({"name": "Malloc0", "rw_ios_per_sec": 1000, "ios": 5})).unwrap_err();
    assert_eq!(e.0, -32602, "{e:?}");
    assert!(e.1.contains("'ios'"), "{e:?}");
    let e = d.rpc("bdev_enable_histogram", json!({"name": "Malloc0", "enable": true, "opc": "bogus"})).unwrap_err();
    assert_eq!(e, (-32603, "Invalid Io type: bogus".into()));
    assert!(error_of(&rpc, &s, &["bdev_get_histogram", "Malloc0"]).contains("not enabled"));
    // The write limit goes; IOPS alone, 1000 a second (one IO a timeslice).
    let set_at = Instant::now();
    spdk_ok(&rpc, &s, &["bdev_set_qos_limit", "Malloc0", "--rw-ios-per-sec", "1000", "--w-mbytes-per-sec", "0"]);
    assert_eq!(limits(&rpc, &s)["rw_ios_per_sec"], json!(1000));
    assert_eq!(limits(&rpc, &s)["w_mbytes_per_sec"], json!(0));
    spdk_ok(&rpc, &s, &["bdev_enable_histogram", "Malloc0", "--histogram"]);

    let port = free_port().to_string();
    export(&rpc, &s, &port);
    const N: u64 = 600;
    let io_time = run_ios(&port, N);
    let elapsed = set_at.elapsed();
    // Every IO admitted had a timeslice's budget (one IO) since the limit
    // was set, plus the first slice's: the limit is not exceeded.
    let allowed = elapsed.as_millis() as u64 + 1;
    println!("1000 IO/s limit: {N} IOs in {io_time:?} ({:.0} IO/s)", N as f64 / io_time.as_secs_f64());
    assert!(N <= allowed, "{N} IOs in {elapsed:?}: more than the limit allows ({allowed})");

    let h = spdk_ok(&rpc, &s, &["bdev_get_histogram", "Malloc0"]);
    assert_eq!(h["granularity"], json!(7));
    assert!(h["tsc_rate"].as_u64().unwrap() > 1_000_000);
    assert_eq!(python_histogram_total(&rpc, &h), N, "the histogram counts every IO once");

    // save_config writes both; a restart with it restores both.
    let saved = spdk_ok(&rpc, &s, &["save_config"]);
    let bdev_cfg = saved["subsystems"].as_array().unwrap().iter().find(|x| x["subsystem"] == json!("bdev")).unwrap()
        ["config"]
        .clone();
    let call = |m: &str| bdev_cfg.as_array().unwrap().iter().find(|c| c["method"] == json!(m)).cloned();
    assert_eq!(call("bdev_set_qos_limit").unwrap()["params"], json!({"name": "Malloc0", "rw_ios_per_sec": 1000}));
    assert_eq!(call("bdev_enable_histogram").unwrap()["params"], json!({"name": "Malloc0", "enable": true}));

    // Limits off: the same IO at full speed, well over 1000 IO/s.
    spdk_ok(&rpc, &s, &["bdev_set_qos_limit", "Malloc0", "--rw-ios-per-sec", "0"]);
    assert_eq!(limits(&rpc, &s)["rw_ios_per_sec"], json!(0));
    let unlimited = run_ios(&port, N);
    // (Speed itself is not asserted here on a shared machine: the bdev
    // crate's test shows it on its own clock.)
    println!("unlimited: {N} IOs in {unlimited:?}");
    let h = spdk_ok(&rpc, &s, &["bdev_get_histogram", "Malloc0"]);
    assert_eq!(python_histogram_total(&rpc, &h), 2 * N);
    spdk_ok(&rpc, &s, &["bdev_enable_histogram", "Malloc0", "--no-histogram"]);
    d.stop();

    let saved_path = dir.join("saved.json");
    std::fs::write(&saved_path, saved.to_string()).unwrap();
    let d2 = Daemon::start(&dir, &["-m", "0x3", "-c", saved_path.to_str().unwrap()]);
    let s2 = d2.sock.clone();
    assert_eq!(limits(&rpc, &s2)["rw_ios_per_sec"], json!(1000));
    let h = spdk_ok(&rpc, &s2, &["bdev_get_histogram", "Malloc0"]);
    assert_eq!(python_histogram_total(&rpc, &h), 0, "enabled again, nothing counted yet");
}
