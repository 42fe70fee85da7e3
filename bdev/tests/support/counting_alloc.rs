//! The counting global allocator of the no-allocation tests (bdev's,
//! bdev-raid's, nvmf's and perf's include this file with `#[path]`): it
//! counts the allocations made by the current thread, which is where a manual
//! reactor set runs, and those of every thread, for tests whose IO path runs
//! on threaded reactors.
#![allow(dead_code)] // each test binary uses one of the two counts

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts allocations made by the current thread (the test's reactors run
/// on it; other threads of the harness do not disturb the count).
struct CountingAlloc;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

static ALL_THREADS: AtomicU64 = AtomicU64::new(0);

fn count_one() {
    ALL_THREADS.fetch_add(1, Ordering::Relaxed);
    // try_with: allocations during thread teardown are simply not counted.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

/// Allocations made by this thread so far.
pub fn allocations() -> u64 {
    ALLOCATIONS.with(|c| c.get())
}

/// Allocations made by every thread of the process so far.
pub fn allocations_all_threads() -> u64 {
    ALL_THREADS.load(Ordering::Relaxed)
}

// SAFETY: every method forwards to the system allocator with the caller's
// arguments unchanged; counting touches only an atomic and a
// const-initialised thread-local Cell, which never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    // SAFETY: `GlobalAlloc`'s contract binds the caller; it is passed on to System unchanged.
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    // SAFETY: `GlobalAlloc`'s contract binds the caller; it is passed on to System unchanged.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    // SAFETY: `GlobalAlloc`'s contract binds the caller; it is passed on to System unchanged.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: `ptr` came from this allocator (i.e. from System) with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    // SAFETY: `GlobalAlloc`'s contract binds the caller; it is passed on to System unchanged.
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (i.e. from System) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;
