//! Data written through a file bdev (io_uring) survives a daemon restart:
//! the daemon exports the file bdev over NVMe/TCP, the project's initiator
//! writes a pattern, the daemon stops (SIGTERM, orderly), a new daemon loads
//! the same config, and the pattern reads back. Also checks that SIGTERM
//! with writes in flight completes them before exit.

mod common;
use common::*;
use mgmt::bdev::DmaBuf;
use mgmt::nvmf::host::{self, ConnectParams, HostQpair};
use serde_json::json;
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2016-06.io.nvraid:persist";
const BS: u64 = 4096;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn config(dir: &std::path::Path, file: &std::path::Path, port: u16) -> std::path::PathBuf {
    let cfg = json!({"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_uring_create", "params": {"name": "File0", "filename": file, "block_size": BS}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem", "params": {"nqn": NQN, "allow_any_host": true}},
            {"method": "nvmf_subsystem_add_ns", "params": {"nqn": NQN, "namespace": {"bdev_name": "File0"}}},
            {"method": "nvmf_subsystem_add_listener", "params": {"nqn": NQN, "listen_address":
                {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}}]}]});
    let p = dir.join("persist.json");
    std::fs::write(&p, cfg.to_string()).unwrap();
    p
}

/// An IO queue, and the session whose admin queue keeps the controller alive.
fn queue(port: u16) -> (host::Session, HostQpair) {
    let p = ConnectParams::new("127.0.0.1", &port.to_string(), NQN);
    let mut s = host::connect(&p, 1).unwrap_or_else(|e| panic!("connect: {e}"));
    let qp = HostQpair::from_parts(s.io.pop().unwrap());
    (s, qp)
}

fn pattern(lba: u64, gen: u8) -> Vec<u8> {
    (0..BS).map(|i| (lba as u8).wrapping_mul(31).wrapping_add(i as u8).wrapping_add(gen)).collect()
}

fn wait(qp: &mut HostQpair, n: usize) -> Vec<host::Completion> {
    let mut out = Vec::new();
    let t0 = Instant::now();
    while out.len() < n {
        qp.poll(|c| out.push(c)).unwrap_or_else(|e| panic!("queue failed: {e}"));
        assert!(t0.elapsed() < Duration::from_secs(30), "timed out waiting for completions");
        std::thread::sleep(Duration::from_micros(50));
    }
    out
}

#[test]
fn file_bdev_data_survives_a_daemon_restart() {
    let dir = temp_dir("persist");
    let file = dir.join("disk.img");
    std::fs::write(&file, vec![0u8; 8 << 20]).unwrap();
    let port = free_port();
    let cfg = config(&dir, &file, port);

    let mut d = Daemon::start(&dir, &["-m", "0x3", "-c", cfg.to_str().unwrap()]);
    let (session, mut qp) = queue(port);
    // 256 single-block writes, and SIGTERM while they are in flight.
    // Every write the target acknowledges is one it must keep.
    let mut acked = Vec::new();
    let n = 256u64;
    for lba in 0..n {
        let buf = DmaBuf::alloc(BS as usize).unwrap().slice(0, BS as usize);
        buf.copy_from(0, &pattern(lba, 7));
        while let Err(host::SubmitError::Full) = qp.write(1, 100 + lba, 1, buf.clone(), lba) {
            qp.poll(|c| {
                if c.status.is_success() {
                    acked.push(c.tag)
                }
            })
            .unwrap();
        }
    }
    qp.poll(|c| {
        if c.status.is_success() {
            acked.push(c.tag)
        }
    })
    .unwrap();
    let pid = d.child.as_ref().unwrap().id();
    std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    let in_flight_at_signal = n as usize - acked.len();
    let t0 = Instant::now();
    while acked.len() < n as usize && t0.elapsed() < Duration::from_secs(20) {
        match qp.poll(|c| {
            if c.status.is_success() {
                acked.push(c.tag)
            }
        }) {
            Ok(_) => std::thread::sleep(Duration::from_micros(50)),
            Err(_) => break, // the target closed the connection at shutdown
        }
    }
    d.stop();
    drop((qp, session));
    eprintln!("{in_flight_at_signal} writes in flight at SIGTERM; {} of {n} acknowledged", acked.len());
    assert!(in_flight_at_signal > 0, "the test must signal with writes in flight");

    let d2 = Daemon::start(&dir, &["-c", cfg.to_str().unwrap()]);
    let (_session, mut qp) = queue(port);
    for batch in acked.chunks(64) {
        for &lba in batch {
            qp.read(1, 100 + lba, 1, DmaBuf::alloc(BS as usize).unwrap().slice(0, BS as usize), lba).unwrap();
        }
        for c in wait(&mut qp, batch.len()) {
            assert!(c.status.is_success());
            assert_eq!(c.buf.unwrap().to_vec(), pattern(c.tag, 7), "acknowledged block {} lost", 100 + c.tag);
        }
    }
    // And the file itself holds them (no cache in between).
    let raw = std::fs::read(&file).unwrap();
    for &lba in &acked {
        let at = ((100 + lba) * BS) as usize;
        assert_eq!(&raw[at..at + BS as usize], &pattern(lba, 7)[..], "file block {}", 100 + lba);
    }
    drop(d2);
}
