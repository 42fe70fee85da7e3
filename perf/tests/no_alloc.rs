//! A run must not allocate per IO. A counting global allocator (this test
//! binary only) samples the allocation count at each progress tick; between
//! two ticks in the steady state, tens of thousands of IOs complete and the
//! count must not move (a few allocations of slack for the runtime).
//! Works the same in debug and release builds.

use perf::cli::RunSpec;
use perf::local::Sample;
use perf::{Hooks, Workload};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

#[path = "../../bdev/tests/support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::allocations_all_threads;

/// Allowed allocations between two steady-state ticks, whatever the IO count.
const SLACK: u64 = 8;
/// Fewer IOs than this in the window would make the check meaningless.
const MIN_IOS: u64 = 2_000;

fn check(name: &str, config: &str, bdev: &str, workload: Workload, qd: u32, io_size: u64) {
    let samples: Rc<RefCell<Vec<(Sample, u64)>>> = Rc::new(RefCell::new(Vec::with_capacity(64)));
    let s2 = samples.clone();
    let hooks = Hooks {
        setup: None,
        on_sample: Some(Box::new(move |s| {
            let allocs = allocations_all_threads();
            let mut v = s2.borrow_mut();
            if v.len() < v.capacity() {
                v.push((s, allocs));
            }
        })),
        quiet: true,
    };
    let mut spec = RunSpec::local(config, &[bdev], workload, qd, io_size);
    spec.duration = Duration::from_millis(1200);
    spec.progress_interval = Duration::from_millis(100);
    let report = perf::run(&spec, hooks).unwrap();
    assert_eq!(report.total.errors, 0);
    assert_eq!(report.total.mismatch_count, 0);
    let v = samples.borrow();
    assert!(v.len() >= 8, "{name}: only {} samples", v.len());
    // Skip the first ticks (warm-up: first-use caches) and the last (drain).
    let (a, b) = (&v[2], &v[v.len() - 2]);
    let ios = b.0.ios - a.0.ios;
    let allocs = b.1 - a.1;
    println!("{name}: {ios} IOs, {allocs} allocations between ticks");
    assert!(ios >= MIN_IOS, "{name}: only {ios} IOs in the window; the machine is too slow for this check");
    assert!(allocs <= SLACK, "{name}: {allocs} allocations during {ios} IOs in steady state: the IO path allocates");
}

fn config(calls: &str) -> String {
    format!(r#"{{"subsystems":[{{"subsystem":"bdev","config":[{calls}]}}]}}"#)
}

#[test]
fn steady_state_does_not_allocate() {
    let null = config(r#"{"method":"bdev_null_create","params":{"name":"N0","num_blocks":262144,"block_size":4096}}"#);
    let malloc =
        config(r#"{"method":"bdev_malloc_create","params":{"name":"M0","num_blocks":4096,"block_size":4096}}"#);
    check("null randread", &null, "N0", Workload::RandRead, 32, 4096);
    check("malloc randwrite (stamped)", &malloc, "M0", Workload::RandWrite, 32, 4096);
    check("malloc rw", &malloc, "M0", Workload::Rw, 16, 8192);
    check("malloc verify", &malloc, "M0", Workload::Verify, 16, 4096);
}
