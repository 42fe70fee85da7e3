//! Proof that the command path allocates nothing in steady state: a
//! counting global allocator (in this test binary only) watches READ(10)
//! and WRITE(10) commands, resubmitted from their completions at queue
//! depth 32, through a LUN channel over a malloc bdev on a manual reactor.

mod scsi_support;

use bdev::malloc::MallocBdev;
use bdev::{DmaBuf, Registry};
use iscsi::scsi::{status, Lun, LunChannel, Nexus, ScsiCommand, ScsiCompletion, ScsiDone, TaskAttr};
use reactor::ReactorSet;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../../bdev/tests/support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::allocations;

const QUEUE_DEPTH: u32 = 32;
const BLOCKS: u64 = 1024;
const BS: usize = 4096;

struct Job {
    ch: RefCell<Option<LunChannel>>,
    nexus: Nexus,
    completed: Cell<u64>,
    failed: Cell<u64>,
    submitted: Cell<u64>,
    limit: Cell<u64>,
}

impl Job {
    fn issue(&self, data_out: Option<DmaBuf>) {
        let n = self.submitted.get();
        self.submitted.set(n + 1);
        let write = n & 1 == 0;
        let lba = (n.wrapping_mul(7919) % BLOCKS) as u32;
        let mut cdb = [0u8; 16];
        cdb[0] = if write { 0x2A } else { 0x28 };
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[8] = 1;
        let data_out = if write { data_out.or_else(|| DmaBuf::alloc(BS)) } else { None };
        let cmd = ScsiCommand {
            tag: n as u32,
            cdb,
            cdb_len: 10,
            nexus: self.nexus.clone(),
            attr: TaskAttr::Simple,
            expected_len: BS as u32,
            read: !write,
            write,
            data_out,
            received_at: None,
        };
        if let Some(ch) = self.ch.borrow().as_ref() {
            ch.execute(cmd);
        }
    }
}

impl ScsiDone for Job {
    fn scsi_done(&self, c: ScsiCompletion) {
        self.completed.set(self.completed.get() + 1);
        if c.status != status::GOOD {
            self.failed.set(self.failed.get() + 1);
        }
        let reuse = c.data_out;
        drop(c.data_in);
        if self.submitted.get() < self.limit.get() {
            self.issue(reuse);
        }
    }
}

fn run(m: &reactor::ManualSet, job: &Rc<Job>, ios: u64) {
    let target = job.completed.get() + ios;
    job.limit.set(job.limit.get() + ios);
    m.on(0, || {
        for _ in 0..QUEUE_DEPTH {
            job.issue(None);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while job.completed.get() < target {
        if !m.run_once(0) {
            m.advance_ns(1_000);
            assert!(Instant::now() < deadline, "stuck at {} of {target}", job.completed.get());
        }
    }
    // The extra commands the first burst issued beyond the limit finish too.
    while job.completed.get() < job.submitted.get() {
        m.run_once(0);
    }
}

#[test]
fn steady_state_commands_allocate_nothing() {
    const WARM_UP: u64 = 2_000;
    const MEASURED: u64 = 50_000;
    let before = allocations();
    std::hint::black_box(Box::new(0u64));
    assert!(allocations() > before, "the counting allocator is installed");
    let m = ReactorSet::manual(1);
    let job = Rc::new(Job {
        ch: RefCell::new(None),
        nexus: scsi_support::nexus("iqn.1994-05.com.example:a", 1),
        completed: Cell::new(0),
        failed: Cell::new(0),
        submitted: Cell::new(0),
        limit: Cell::new(0),
    });
    m.on(0, || {
        let bdev = Arc::new(MallocBdev::new(scsi_support::malloc_props("Malloc0", BS as u32, BLOCKS)).unwrap());
        let h = Registry::get().register(bdev).unwrap();
        let lun = Lun::new(0, h, scsi_support::TARGET);
        *job.ch.borrow_mut() = Some(LunChannel::open(&lun, job.clone()).unwrap());
    });
    // The warm-up includes the power-on unit attention of the nexus's first command.
    run(&m, &job, WARM_UP);
    assert_eq!(job.failed.get(), 1, "only the first command (unit attention) failed");
    let failed = job.failed.get();
    let before = allocations();
    let t0 = Instant::now();
    run(&m, &job, MEASURED);
    let elapsed = t0.elapsed();
    let n = allocations() - before;
    assert_eq!(n, 0, "{n} allocations during {MEASURED} commands");
    assert_eq!(job.failed.get(), failed);
    println!("{MEASURED} READ(10)/WRITE(10) at queue depth {QUEUE_DEPTH}: 0 allocations, {elapsed:?}");
    m.on(0, || drop(job.ch.borrow_mut().take()));
    drop(m);
}
