//! Quick NVMe/TCP loopback benchmark: the target on one reactor (core 0)
//! exporting a malloc bdev, nvraid's initiator on a reactor of its own
//! (core 1), over 127.0.0.1. Prints IOPS, MiB/s and p99 latency for 4 KiB
//! random read at QD32 and QD128, 4 KiB random write at QD32 and 128 KiB
//! sequential read at QD16.
//!
//! `cargo run --release -p nvmf --example tcp_bench [-- SECONDS]`

use bdev::malloc::MallocBdev;
use bdev::{BdevProps, DmaBuf, Registry};
use hdrhistogram::Histogram;
use nvmf::host::{self, ConnectParams, HostQpair, QpairParts};
use nvmf::{ListenAddr, NvmfState, SubsystemParams, TransportOpts};
use reactor::{IdlePolicy, PollStatus, ReactorConfig, ReactorSet};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

const NQN: &str = "nqn.2016-06.io.nvraid:bench";
const BS: u32 = 4096;
const BLOCKS: u64 = 65_536; // 256 MiB

struct Job {
    name: &'static str,
    write: bool,
    random: bool,
    io_blocks: u32,
    qd: usize,
}

struct Result_ {
    ios: u64,
    secs: f64,
    p99_us: f64,
    p50_us: f64,
}

fn run_job(ini: &ReactorSet, parts: QpairParts, job: &Job, secs: f64) -> (Result_, QpairParts) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (write, random, io_blocks, qd) = (job.write, job.random, job.io_blocks, job.qd);
    ini.send(0, move || {
        let qp = Rc::new(RefCell::new(Some(HostQpair::from_parts(parts))));
        let len = (io_blocks * BS) as usize;
        let bufs: Vec<DmaBuf> = (0..qd).map(|_| DmaBuf::zeroed(len).unwrap().slice(0, len)).collect();
        let mut started = vec![0u64; qd];
        let mut hist = Histogram::<u64>::new(3).unwrap();
        let mut rng = 0x1234_5678_9abc_def1u64;
        let mut next_lba = 0u64;
        let span = BLOCKS - io_blocks as u64;
        let mut lba = move || {
            if random {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng % (span / io_blocks as u64)) * io_blocks as u64
            } else {
                let l = next_lba;
                next_lba = (next_lba + io_blocks as u64) % span;
                l
            }
        };
        let submit = move |q: &mut HostQpair, tag: usize, lba: u64, started: &mut [u64]| {
            started[tag] = reactor::now_ns();
            let b = bufs[tag].clone();
            let r = if write {
                q.write(1, lba, io_blocks, b, tag as u64)
            } else {
                q.read(1, lba, io_blocks, b, tag as u64)
            };
            r.expect("submit");
        };
        {
            let mut g = qp.borrow_mut();
            let q = g.as_mut().unwrap();
            for tag in 0..qd {
                submit(q, tag, lba(), &mut started);
            }
        }
        let t0 = reactor::now_ns();
        let warmup_ns = 500_000_000u64;
        let end_ns = t0 + warmup_ns + (secs * 1e9) as u64;
        let mut ios = 0u64;
        let mut measuring_since = 0u64;
        let mut tx = Some(tx);
        let mut done_tags: Vec<usize> = Vec::with_capacity(qd);
        reactor::register_poller("bench", move || {
            let now = reactor::now_ns();
            let mut g = qp.borrow_mut();
            let Some(q) = g.as_mut() else {
                return PollStatus::Done;
            };
            done_tags.clear();
            q.poll(|c| {
                assert!(c.status.is_success(), "IO failed: {:?}", c.status);
                done_tags.push(c.tag as usize);
            })
            .expect("queue failed");
            let n = done_tags.len();
            let measuring = now >= t0 + warmup_ns;
            if measuring && measuring_since == 0 {
                measuring_since = now;
            }
            for &tag in &done_tags {
                if measuring {
                    ios += 1;
                    let _ = hist.record((now - started[tag]) / 1000);
                }
                if now < end_ns {
                    submit(q, tag, lba(), &mut started);
                }
            }
            if now >= end_ns && q.outstanding() == 0 {
                let q = g.take().unwrap();
                let r = Result_ {
                    ios,
                    secs: (now - measuring_since) as f64 / 1e9,
                    p99_us: hist.value_at_quantile(0.99) as f64,
                    p50_us: hist.value_at_quantile(0.50) as f64,
                };
                if let Some(tx) = tx.take() {
                    let _ = tx.send((r, q.into_parts().ok()));
                }
                return PollStatus::Done;
            }
            if n > 0 {
                PollStatus::Busy
            } else {
                PollStatus::Idle
            }
        });
    });
    let (r, parts) = rx.recv().expect("job result");
    (r, parts.expect("idle queue"))
}

fn main() {
    let secs: f64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let cores = core_count();
    let (tcore, icore) = if cores >= 2 { (0, 1) } else { (0, 0) };
    let tgt = ReactorSet::start(ReactorConfig::new(vec![tcore], IdlePolicy::BusyPoll), || {}).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    tgt.call(0, move || {
        let m = MallocBdev::new(BdevProps::new("Malloc0", "Malloc disk", BS, BLOCKS, None)).unwrap();
        Registry::get().register(Arc::new(m)).unwrap();
        let st = NvmfState::get();
        st.create_transport(TransportOpts::default()).unwrap();
        let mut p = SubsystemParams::new(NQN);
        p.allow_any_host = true;
        st.create_subsystem(p).unwrap();
        st.add_ns(NQN, "Malloc0", 1, None, None).unwrap();
        st.add_listener(NQN, ListenAddr::new("127.0.0.1", &port.to_string())).unwrap();
    });
    let mut cp = ConnectParams::new("127.0.0.1", &port.to_string(), NQN);
    cp.kato_ms = 0;
    let s = host::connect(&cp, 1).expect("connect");
    let ini = ReactorSet::start(ReactorConfig::new(vec![icore], IdlePolicy::BusyPoll), || {}).unwrap();
    let jobs = [
        Job { name: "4KiB randread  QD32 ", write: false, random: true, io_blocks: 1, qd: 32 },
        Job { name: "4KiB randread  QD128", write: false, random: true, io_blocks: 1, qd: 128 },
        Job { name: "4KiB randwrite QD32 ", write: true, random: true, io_blocks: 1, qd: 32 },
        Job { name: "128KiB seqread QD16 ", write: false, random: false, io_blocks: 32, qd: 16 },
    ];
    println!("nvraid NVMe/TCP loopback: target on core {tcore}, initiator on core {icore}, {secs} s per job");
    let mut parts = s.io.into_iter().next().unwrap();
    for j in &jobs {
        let cpu0 = (thread_cpu_ticks("reactor_0"), thread_cpu_ticks("reactor_1"));
        let (r, p) = run_job(&ini, parts, j, secs);
        parts = p;
        let cpu1 = (thread_cpu_ticks("reactor_0"), thread_cpu_ticks("reactor_1"));
        let iops = r.ios as f64 / r.secs;
        let mibs = iops * (j.io_blocks * BS) as f64 / (1024.0 * 1024.0);
        // Busy-polling threads use all the CPU they get: on a shared
        // machine, IOs per CPU-second of the target's reactor projects
        // what one dedicated core would do (warm-up included: a lower bound).
        let tgt_cpu_s = (cpu1.0 - cpu0.0) as f64 / 100.0;
        let ini_cpu_s = (cpu1.1 - cpu0.1) as f64 / 100.0;
        println!(
            "{}  {:>9.0} IOPS  {:>8.1} MiB/s  p50 {:>6.1} us  p99 {:>6.1} us  | CPU s: target {:.2} initiator {:.2}; IOs per target CPU-s {:>9.0}",
            j.name,
            iops,
            mibs,
            r.p50_us,
            r.p99_us,
            tgt_cpu_s,
            ini_cpu_s,
            r.ios as f64 / tgt_cpu_s.max(0.01)
        );
    }
    drop(parts);
    drop(s.admin);
    ini.stop();
    ini.join();
    tgt.stop();
    tgt.join();
}

/// utime + stime (clock ticks) of this process's thread named `name`.
fn thread_cpu_ticks(name: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    for e in dir.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // Fields after the ")" that ends the command name: state is 3rd.
        let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        return ticks(11) + ticks(12);
    }
    0
}

fn core_count() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
