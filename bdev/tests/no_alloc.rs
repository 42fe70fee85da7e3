//! Proof that the IO path allocates nothing: a counting global allocator (in
//! this test binary only) watches steady-state IO through malloc, null, a
//! delay bdev (random mode), an error bdev (with failures and corruption
//! injected), an io_uring file bdev, and a malloc bdev with rate limits that
//! hold IO back and a latency histogram on, on a manual reactor set.

use bdev::malloc::{MallocBdev, NullBdev};
use bdev::{delay, error, uring};
use bdev::{BdevProps, Channel, DmaBuf, IoBox, IoDone, IoStatus, IoType, Registry};
use reactor::{ManualSet, ReactorSet};
use std::cell::Cell;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::allocations;

const QUEUE_DEPTH: u64 = 32;
const BLOCKS: u64 = 1024;

/// Keeps `QUEUE_DEPTH` IOs in flight by resubmitting each completed
/// descriptor from its own completion callback.
struct Job {
    me: Weak<Job>,
    ch: Rc<Channel>,
    completed: Cell<u64>,
    failed: Cell<u64>,
    limit: Cell<u64>,
    submitted: Cell<u64>,
}

impl Job {
    fn new(ch: Rc<Channel>) -> Rc<Job> {
        Rc::new_cyclic(|me| Job {
            me: me.clone(),
            ch,
            completed: Cell::new(0),
            failed: Cell::new(0),
            limit: Cell::new(0),
            submitted: Cell::new(0),
        })
    }

    /// Aims the descriptor at the next block: alternately write and read.
    fn issue(&self, mut io: IoBox) {
        let n = self.submitted.get();
        self.submitted.set(n + 1);
        io.io_type = if n & 1 == 0 { IoType::Write } else { IoType::Read };
        io.offset_blocks = (n.wrapping_mul(7919)) % BLOCKS;
        io.num_blocks = 1;
        io.status = IoStatus::Pending;
        if let Some(me) = self.me.upgrade() {
            io.set_done(me);
        }
        self.ch.submit(io);
    }

    fn start(&self, extra: u64) {
        self.limit.set(self.limit.get() + extra);
        for _ in 0..QUEUE_DEPTH {
            let io = IoBox::data(IoType::Read, 0, 1, DmaBuf::alloc(4096)).expect("descriptor");
            self.issue(io);
        }
    }
}

impl IoDone for Job {
    fn io_done(&self, io: IoBox) {
        self.completed.set(self.completed.get() + 1);
        if io.status != IoStatus::Success {
            self.failed.set(self.failed.get() + 1);
        }
        // Keep the queue full until `limit`, then let descriptors go.
        if self.submitted.get() < self.limit.get() {
            self.issue(io);
        }
    }
}

/// Runs `ios` IOs through `job` (at least QUEUE_DEPTH).
fn run(m: &ManualSet, job: &Rc<Job>, ios: u64) {
    let target = job.completed.get() + ios;
    m.on(0, || job.start(ios));
    let deadline = Instant::now() + Duration::from_secs(60);
    while job.completed.get() < target {
        if !m.run_once(0) {
            m.advance_ns(1_000);
            if Instant::now() > deadline {
                panic!("stuck at {} of {target} completions", job.completed.get());
            }
        }
    }
}

fn malloc(name: &str) -> Arc<MallocBdev> {
    Arc::new(MallocBdev::new(BdevProps::new(name, "Malloc disk", 4096, BLOCKS, None)).unwrap())
}

#[test]
fn steady_state_io_allocates_nothing() {
    const WARM_UP: u64 = 4_000;
    const MEASURED: u64 = 100_000;
    let before = allocations();
    std::hint::black_box(Box::new(0u64));
    assert!(allocations() > before, "the counting allocator is installed and counts this thread");
    let m = ReactorSet::manual(1);
    struct RemoveOnDrop(std::path::PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let file = std::env::temp_dir().join(format!("nvraid-noalloc-{}", std::process::id()));
    std::fs::File::create(&file).unwrap().set_len(BLOCKS * 4096).unwrap();
    let _cleanup = RemoveOnDrop(file.clone());
    let jobs: Vec<(&str, Rc<Job>, u64)> = m.on(0, || {
        let r = Registry::get();
        r.register(malloc("Mal")).unwrap();
        r.register(Arc::new(NullBdev::new(BdevProps::new("Nul", "Null disk", 4096, BLOCKS, None)).unwrap())).unwrap();
        r.register(malloc("MD")).unwrap();
        r.register(malloc("ME")).unwrap();
        r.register(malloc("MQ")).unwrap();
        let p = serde_json::json!({
            "base_bdev_name": "MD", "name": "Del",
            "avg_read_latency": 0, "p99_read_latency": 0, "avg_write_latency": 0, "p99_write_latency": 0,
            "random_seed": 1, "max_random_latency_us": 20,
        });
        delay::create(serde_json::from_value(p).unwrap()).unwrap();
        error::create(error::ErrorCreateParams { base_name: "ME".into(), uuid: None }).unwrap();
        let u = uring::UringCreateParams {
            filename: file.to_string_lossy().into_owned(),
            name: "Uring".into(),
            block_size: None,
            uuid: None,
        };
        uring::create_uring(u).unwrap();
        let job = |name: &str| Job::new(r.lookup(name).unwrap().channel().unwrap());
        vec![
            ("malloc", job("Mal"), MEASURED),
            ("null", job("Nul"), MEASURED),
            ("delay", job("Del"), MEASURED),
            ("error", job("EE_ME"), MEASURED),
            ("uring", job("Uring"), MEASURED / 5),
            ("qos+histogram", job("MQ"), MEASURED),
        ]
    });
    // 1000 IOs and 2 MiB of writes a timeslice, so IO waits for its budget;
    // latencies counted in a histogram. Set once the channel exists.
    let limited = m.on(0, || Registry::get().lookup("MQ").unwrap());
    let (h1, h2) = (limited.clone(), limited.clone());
    let settings_done = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (d1, d2) = (settings_done.clone(), settings_done.clone());
    m.on(0, move || {
        bdev::qos::set_rate_limits(&h1, [Some(1_000_000), None, None, Some(2000)], move |r| {
            assert_eq!(r.unwrap(), [1_000_000, 0, 0, 2000]);
            d1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
    });
    m.on(0, move || {
        bdev::histogram::enable(&h2, Some(Default::default()), move |r| {
            r.unwrap();
            d2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
    });
    m.run_until_idle(10);
    assert_eq!(settings_done.load(std::sync::atomic::Ordering::SeqCst), 2);
    let inject = |io_type: &str, error_type: &str, num: u64| {
        let p = serde_json::json!({
            "name": "EE_ME", "io_type": io_type, "error_type": error_type, "num": num,
            "corrupt_offset": 17, "corrupt_value": 0x5a,
        });
        m.on(0, || error::inject(serde_json::from_value(p).unwrap()).unwrap());
    };
    for (name, job, _) in &jobs {
        if *name == "error" {
            // Warm the failure and corruption paths too (the copy buffer's class).
            inject("read", "failure", 100);
            inject("write", "corrupt_data", 100);
        }
        run(&m, job, WARM_UP);
        assert_eq!(job.failed.get(), if *name == "error" { 100 } else { 0 }, "{name} warm-up");
    }
    for (name, job, ios) in &jobs {
        if *name == "error" {
            // Failures and corruption happen inside the measured window.
            inject("read", "failure", 1000);
            inject("write", "corrupt_data", 1000);
        }
        let failed_before = job.failed.get();
        let clock_before = m.now_ns();
        let before = allocations();
        let t0 = Instant::now();
        run(&m, job, *ios);
        let elapsed = t0.elapsed();
        let after = allocations();
        if *name == "qos+histogram" {
            // The limit held IO back: the clock had to move a timeslice per
            // 1000 IOs.
            let slices = (m.now_ns() - clock_before) / bdev::qos::TIMESLICE_NS;
            assert!(slices + 2 >= ios / 1000, "{ios} IOs in {slices} timeslices at 1000 a timeslice");
        }
        assert_eq!(after - before, 0, "{name}: {} allocations during {ios} IOs", after - before);
        let failed = job.failed.get() - failed_before;
        assert_eq!(failed, if *name == "error" { 1000 } else { 0 }, "{name}");
        println!("{name}: {ios} IOs at queue depth {QUEUE_DEPTH}, 0 allocations, {elapsed:?}");
    }
    // Drain what is left so teardown finds every queue empty.
    for _ in 0..10_000 {
        m.run_once(0);
        m.advance_ns(1_000);
        if jobs.iter().all(|(_, j, _)| j.completed.get() == j.submitted.get()) {
            break;
        }
    }
    drop(jobs);
    drop(m);
}
