//! Shared test setup: a threaded reactor set running the target with a
//! malloc namespace on a free loopback port.
#![allow(dead_code)]

use bdev::malloc::MallocBdev;
use bdev::{BdevProps, Registry};
use nvmf::host::{self, ConnectParams, HostQpair, Session};
use nvmf::{ListenAddr, NvmfState, SubsystemParams, TransportOpts};
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use std::sync::Arc;
use std::time::Duration;

pub const NQN: &str = "nqn.2016-06.io.nvraid:test";
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";

pub struct Target {
    pub set: ReactorSet,
    pub port: u16,
}

impl Drop for Target {
    fn drop(&mut self) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.set.send(0, move || {
            nvmf::shutdown(move || {
                let _ = tx.send(());
            })
        });
        let _ = rx.recv_timeout(Duration::from_secs(10));
        self.set.stop();
        self.set.join();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A target on `reactors` reactors exporting a malloc bdev (block size
/// `bs`, `blocks` blocks) as NSID 1 of NQN, any host allowed unless
/// `hosts` is non-empty.
pub fn start_target(reactors: usize, bs: u32, blocks: u64, opts: TransportOpts, hosts: &[&str]) -> Target {
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new((0..reactors).collect(), IdlePolicy::sleep()) };
    let set = ReactorSet::start(cfg, || {}).unwrap();
    let port = free_port();
    let hosts: Vec<String> = hosts.iter().map(|s| s.to_string()).collect();
    set.call(0, move || {
        let m = MallocBdev::new(BdevProps::new("Malloc0", "Malloc disk", bs, blocks, None)).unwrap();
        Registry::get().register(Arc::new(m)).unwrap();
        let st = NvmfState::get();
        st.create_transport(opts).unwrap();
        let mut p = SubsystemParams::new(NQN);
        p.allow_any_host = hosts.is_empty();
        p.serial_number = "NVRAID0001".into();
        st.create_subsystem(p).unwrap();
        for h in &hosts {
            st.add_host(NQN, h).unwrap();
        }
        assert_eq!(st.add_ns(NQN, "Malloc0", 0, None, None).unwrap(), 1);
        st.add_listener(NQN, ListenAddr::new("127.0.0.1", &port.to_string())).unwrap();
        st.add_listener(nvme_spec::text::DISCOVERY_NQN, ListenAddr::new("127.0.0.1", &port.to_string())).unwrap();
    });
    Target { set, port }
}

pub fn params(port: u16) -> ConnectParams {
    let mut p = ConnectParams::new("127.0.0.1", &port.to_string(), NQN);
    p.hostnqn = HOSTNQN.into();
    p
}

pub fn session(port: u16, queues: u16, digests: bool) -> Session {
    let mut p = params(port);
    p.hdgst = digests;
    p.ddgst = digests;
    host::connect(&p, queues).unwrap_or_else(|e| panic!("connect: {e}"))
}

/// Polls `qp` on this thread until `n` completions arrived.
pub fn wait(qp: &mut HostQpair, n: usize) -> Vec<host::Completion> {
    let mut out = Vec::new();
    let t0 = std::time::Instant::now();
    while out.len() < n {
        qp.poll(|c| out.push(c)).unwrap_or_else(|e| panic!("queue failed: {e}"));
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out waiting for {n} completions");
        if out.len() < n {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
    out
}

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn seed() -> u64 {
    std::env::var("NVMF_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    })
}

/// A target on `reactors` reactors exporting, as NSIDs 1.., the bdevs that
/// `make_bdevs` registers (run on reactor 0; it returns their names).
pub fn start_target_with(
    reactors: usize,
    opts: TransportOpts,
    make_bdevs: impl FnOnce() -> Vec<String> + Send + 'static,
) -> Target {
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new((0..reactors).collect(), IdlePolicy::sleep()) };
    let set = ReactorSet::start(cfg, || {}).unwrap();
    let port = free_port();
    set.call(0, move || {
        let names = make_bdevs();
        let st = NvmfState::get();
        st.create_transport(opts).unwrap();
        let mut p = SubsystemParams::new(NQN);
        p.allow_any_host = true;
        p.serial_number = "NVRAID0001".into();
        st.create_subsystem(p).unwrap();
        for n in &names {
            st.add_ns(NQN, n, 0, None, None).unwrap();
        }
        st.add_listener(NQN, ListenAddr::new("127.0.0.1", &port.to_string())).unwrap();
    });
    Target { set, port }
}

/// A session without keep alive (the test thread owns the admin queue).
pub fn session_no_kato(port: u16, queues: u16) -> Session {
    let mut p = params(port);
    p.kato_ms = 0;
    host::connect(&p, queues).unwrap_or_else(|e| panic!("connect: {e}"))
}

/// Runs one command on `qp` (owned by this thread) and waits for it.
pub fn command(qp: &mut HostQpair, sqe: nvme_spec::Sqe, data: host::Data) -> host::Completion {
    qp.submit(sqe, data, 0xC0DE).unwrap();
    wait(qp, 1).pop().unwrap()
}
