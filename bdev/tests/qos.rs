//! Rate limits and latency histograms on a manual reactor set whose clock
//! the test moves: a limited bdev admits no more than its budget per
//! timeslice across all its channels (counted, not timed), byte limits hold
//! for the IO type they name, removing limits releases the waiting IOs and
//! restores full speed, and histograms count every IO once, as an
//! independent decoder of SPDK's serialised form reads them.

use bdev::histogram::{self, HistogramConfig, Shape};
use bdev::malloc::MallocBdev;
use bdev::qos::{self, TIMESLICE_NS};
use bdev::{BdevHandle, BdevProps, Channel, DmaBuf, IoBox, IoDone, IoError, IoStatus, IoType, Registry};
use reactor::{ManualSet, ReactorSet};
use std::cell::Cell;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const BLOCKS: u64 = 4096;
const BLOCK: u64 = 4096;
const QUEUE_DEPTH: usize = 32;

/// Keeps `QUEUE_DEPTH` IOs of one type in flight until stopped.
struct Job {
    me: Weak<Job>,
    ch: Rc<Channel>,
    io_type: IoType,
    blocks: u64,
    completed: Cell<u64>,
    failed: Cell<u64>,
    running: Cell<bool>,
    next: Cell<u64>,
}

impl Job {
    fn start(ch: Rc<Channel>, io_type: IoType, blocks: u64) -> Rc<Job> {
        let job = Rc::new_cyclic(|me| Job {
            me: me.clone(),
            ch,
            io_type,
            blocks,
            completed: Cell::new(0),
            failed: Cell::new(0),
            running: Cell::new(true),
            next: Cell::new(0),
        });
        for _ in 0..QUEUE_DEPTH {
            let io = IoBox::data(io_type, 0, blocks, DmaBuf::alloc((blocks * BLOCK) as usize)).expect("descriptor");
            job.issue(io);
        }
        job
    }

    fn issue(&self, mut io: IoBox) {
        let n = self.next.get();
        self.next.set(n + 1);
        io.io_type = self.io_type;
        io.offset_blocks = (n * self.blocks) % (BLOCKS - self.blocks);
        io.num_blocks = self.blocks;
        io.status = IoStatus::Pending;
        if let Some(me) = self.me.upgrade() {
            io.set_done(me);
        }
        self.ch.submit(io);
    }
}

impl IoDone for Job {
    fn io_done(&self, io: IoBox) {
        self.completed.set(self.completed.get() + 1);
        if io.status != IoStatus::Success {
            self.failed.set(self.failed.get() + 1);
        }
        if self.running.get() {
            self.issue(io);
        }
    }
}

fn malloc(m: &ManualSet, name: &str) -> BdevHandle {
    m.on(0, || {
        let b = MallocBdev::new(BdevProps::new(name, "Malloc disk", BLOCK as u32, BLOCKS, None)).unwrap();
        Registry::get().register(Arc::new(b)).unwrap()
    })
}

/// Runs `f` on reactor 0 with a completion callback and turns the set until
/// it has been called.
fn call<T: Send + 'static>(m: &ManualSet, f: impl FnOnce(Box<dyn FnOnce(T) + Send>)) -> T {
    let out = Arc::new(Mutex::new(None));
    let o2 = out.clone();
    m.on(0, || f(Box::new(move |v| *o2.lock().unwrap() = Some(v))));
    for _ in 0..1000 {
        if let Some(v) = out.lock().unwrap().take() {
            return v;
        }
        m.run_until_idle(10);
    }
    panic!("no answer");
}

fn set_limits(m: &ManualSet, h: &BdevHandle, req: qos::QosRequest) -> qos::RateLimits {
    let h = h.clone();
    call(m, move |done| qos::set_rate_limits(&h, req, done)).unwrap()
}

/// Moves the clock `slices` timeslices ahead in 100 us steps, turning every
/// reactor after each step.
fn run_slices(m: &ManualSet, slices: u64) {
    for _ in 0..slices * 10 {
        m.advance_ns(TIMESLICE_NS / 10);
        // A limited job's IOs pass in two loops (release, completion);
        // unlimited jobs never idle and get as many.
        m.run_until_idle(4);
    }
}

fn total(jobs: &[Rc<Job>]) -> u64 {
    jobs.iter().map(|j| j.completed.get()).sum()
}

fn stop(m: &ManualSet, jobs: &[Rc<Job>]) {
    for j in jobs {
        j.running.set(false);
    }
    // What still waits drains at the limit's pace.
    for _ in 0..100_000 {
        if jobs.iter().all(|j| j.completed.get() == j.next.get()) {
            return;
        }
        m.advance_ns(TIMESLICE_NS / 10);
        m.run_until_idle(50);
    }
    panic!("IOs still pending after stop");
}

#[test]
fn an_iops_limit_holds_across_reactors_and_removing_it_restores_speed() {
    let m = ReactorSet::manual(2);
    let h = malloc(&m, "Q0");
    // 5000 IO/s: 5 IOs a timeslice, shared by both reactors' channels.
    assert_eq!(set_limits(&m, &h, [Some(5000), None, None, None]), [5000, 0, 0, 0]);
    let jobs: Vec<Rc<Job>> = (0..2)
        .map(|r| {
            let h = h.clone();
            m.on(r, move || Job::start(h.channel().unwrap(), if r == 0 { IoType::Read } else { IoType::Write }, 1))
        })
        .collect();
    const SLICES: u64 = 200;
    run_slices(&m, SLICES);
    let done = total(&jobs);
    let budget = 5 * (SLICES + 1);
    println!("5000 IO/s limit: {done} IOs completed in {SLICES} timeslices (budget {budget})");
    assert!(done <= budget, "{done} IOs completed; the budget allows {budget}");
    // On the test's clock every timeslice's budget is used.
    assert!(done >= 5 * (SLICES - 2), "only {done} IOs in {SLICES} timeslices");
    // Both reactors got IO through (neither starves), and the queues hold the rest.
    let per_job: Vec<u64> = jobs.iter().map(|j| j.completed.get()).collect();
    assert!(per_job.iter().all(|&n| n > done / 4), "IOs per reactor: {per_job:?}");
    let waiting: usize = (0..2).map(|r| m.on(r, || h.channel().unwrap().qos_waiting())).sum();
    assert!(waiting > 0, "over-budget IOs wait in the channels");

    // Remove the limit: the waiting IOs go, and IO runs at full speed
    // without the clock moving at all.
    assert_eq!(set_limits(&m, &h, [Some(0), None, None, None]), [0; 4]);
    let before = total(&jobs);
    m.run_until_idle(2000);
    let unlimited = total(&jobs) - before;
    println!("unlimited: {unlimited} IOs with the clock stopped");
    assert!(unlimited > 10 * 5 * SLICES, "only {unlimited} IOs after the limit was removed");
    assert_eq!(jobs.iter().map(|j| j.failed.get()).sum::<u64>(), 0, "QoS never fails an IO");
    stop(&m, &jobs);
}

#[test]
fn byte_limits_count_the_io_types_they_name() {
    let m = ReactorSet::manual(1);
    let h = malloc(&m, "Q1");
    // Writes at 2 MiB/s: 2097 bytes a slice; reads are not limited.
    assert_eq!(set_limits(&m, &h, [None, None, None, Some(2)]), [0, 0, 0, 2]);
    let (w, r) = m.on(0, || {
        let ch = h.channel().unwrap();
        (Job::start(ch.clone(), IoType::Write, 2), Job::start(ch, IoType::Read, 2))
    });
    const SLICES: u64 = 200;
    run_slices(&m, SLICES);
    let written = w.completed.get() * 2 * BLOCK;
    // A write is admitted while the budget is positive, so one may overrun
    // it; the overrun is taken from the next slice.
    let budget = 2 * 1024 * 1024 / 1000 * (SLICES + 1) + 2 * BLOCK;
    println!("2 MiB/s write limit: {written} bytes in {SLICES} timeslices (budget {budget})");
    assert!(written <= budget, "{written} bytes written; the budget allows {budget}");
    assert!(written >= budget * 9 / 10, "only {written} bytes written");
    assert!(r.completed.get() > 20 * w.completed.get(), "reads are held back too: {} reads", r.completed.get());

    // A total MiB/s limit holds reads back as well.
    set_limits(&m, &h, [None, Some(4), None, Some(0)]);
    let (w0, r0) = (w.completed.get(), r.completed.get());
    run_slices(&m, SLICES);
    let moved = (w.completed.get() - w0 + r.completed.get() - r0) * 2 * BLOCK;
    let budget = 4 * 1024 * 1024 / 1000 * (SLICES + 1) + 2 * 2 * BLOCK;
    println!("4 MiB/s read+write limit: {moved} bytes in {SLICES} timeslices (budget {budget})");
    assert!(moved <= budget, "{moved} bytes; the budget allows {budget}");
    set_limits(&m, &h, [None, Some(0), None, None]);
    stop(&m, &[w, r]);
}

#[test]
fn a_channel_created_after_the_limit_is_limited_and_waiting_ios_can_be_aborted() {
    let m = ReactorSet::manual(1);
    let h = malloc(&m, "Q2");
    set_limits(&m, &h, [Some(1000), None, None, None]);
    let aborted = Rc::new(Cell::new(0u32));
    let a2 = aborted.clone();
    m.on(0, || {
        let ch = h.channel().unwrap();
        for tag in 0..3 {
            let mut io = IoBox::data(IoType::Read, 0, 1, DmaBuf::alloc(4096)).unwrap();
            io.tag = tag;
            let a = a2.clone();
            io.set_done(Rc::new(move |io: IoBox| {
                if io.status == IoStatus::Failed(IoError::Aborted) {
                    a.set(a.get() + 1);
                }
            }));
            ch.submit(io);
        }
        // One per slice: the first went, two wait.
        assert_eq!(ch.qos_waiting(), 2);
        assert!(ch.abort(&|io| io.tag == 2));
        assert_eq!(ch.qos_waiting(), 1);
    });
    m.run_until_idle(10);
    assert_eq!(aborted.get(), 1);
    run_slices(&m, 2);
    assert_eq!(m.on(0, || h.channel().unwrap().qos_waiting()), 0);
}

/// Reads SPDK's serialised histogram without the crate's encoder: base64
/// by hand, then little-endian u64 counts.
fn decode_counts(b64: &str) -> Vec<u64> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut bytes = Vec::new();
    for quad in b64.as_bytes().chunks(4) {
        let pad = quad.iter().filter(|&&c| c == b'=').count();
        let n = quad.iter().filter(|&&c| c != b'=').fold(0u32, |n, &c| n << 6 | u32::from(val(c))) << (6 * pad);
        bytes.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    bytes.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()
}

fn collect(m: &ManualSet, h: &BdevHandle) -> (Shape, Vec<u64>) {
    let h = h.clone();
    call(m, move |done| histogram::collect(&h, done)).unwrap()
}

#[test]
fn histograms_count_every_io_once_across_reactors() {
    let m = ReactorSet::manual(2);
    let h = malloc(&m, "H0");
    let hc = h.clone();
    let off = call(&m, move |done| histogram::collect(&hc, done));
    assert!(off.is_err(), "no histogram before it is enabled");
    let hc = h.clone();
    call(&m, move |done| histogram::enable(&hc, Some(HistogramConfig::default()), done)).unwrap();
    let jobs: Vec<Rc<Job>> = (0..2)
        .map(|r| {
            let h = h.clone();
            m.on(r, move || Job::start(h.channel().unwrap(), if r == 0 { IoType::Read } else { IoType::Write }, 1))
        })
        .collect();
    m.run_until_idle(300);
    stop(&m, &jobs);
    let ios = total(&jobs);
    let (shape, counts) = collect(&m, &h);
    assert_eq!(counts.len(), shape.buckets());
    let decoded = decode_counts(&histogram::encode(&counts));
    assert_eq!(decoded, counts);
    assert_eq!(decoded.iter().sum::<u64>(), ios, "the histogram holds every IO once");
    assert!(ios > 1000);

    // Only writes, with fresh counts.
    let hc = h.clone();
    let only_writes = HistogramConfig { io_type: Some(IoType::Write), ..HistogramConfig::default() };
    call(&m, move |done| histogram::enable(&hc, Some(only_writes), done)).unwrap();
    let before: Vec<u64> = jobs.iter().map(|j| j.completed.get()).collect();
    for j in &jobs {
        j.running.set(true);
    }
    for (r, j) in jobs.iter().enumerate() {
        let j = j.clone();
        m.on(r, move || {
            for _ in 0..QUEUE_DEPTH {
                j.issue(IoBox::data(j.io_type, 0, 1, DmaBuf::alloc(4096)).unwrap());
            }
        });
    }
    m.run_until_idle(100);
    stop(&m, &jobs);
    let writes = jobs[1].completed.get() - before[1];
    assert!(jobs[0].completed.get() > before[0], "reads ran too");
    let (_, counts) = collect(&m, &h);
    assert_eq!(decode_counts(&histogram::encode(&counts)).iter().sum::<u64>(), writes);

    // Off: a read is refused again.
    let hc = h.clone();
    call(&m, move |done| histogram::enable(&hc, None, done)).unwrap();
    let hc = h.clone();
    assert!(call(&m, move |done| histogram::collect(&hc, done)).is_err());
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    // Bad settings are refused.
    let hc = h.clone();
    let bad = HistogramConfig { min_nsec: 10, max_nsec: 10, ..HistogramConfig::default() };
    m.on(0, move || histogram::enable(&hc, Some(bad), move |r| d2.store(r.is_err(), Ordering::SeqCst)));
    assert!(done.load(Ordering::SeqCst));
}
