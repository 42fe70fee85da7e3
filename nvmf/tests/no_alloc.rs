//! The target's IO path allocates nothing per command: a counting global
//! allocator (this test binary only, every thread counted) watches steady
//! state IO through the target — R2T writes that take data buffer units,
//! reads sent as C2HData, in-capsule writes with FUA, flushes — driven by
//! nvraid's initiator, which must not allocate per command either.

mod common;
use bdev::{DmaBuf, IoFlags};
use common::*;
use nvmf::host::{Completion, HostQpair};
use nvmf::TransportOpts;
use std::time::{Duration, Instant};

#[path = "../../bdev/tests/support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::allocations_all_threads;

const QD: u64 = 16;
/// Allocations allowed in the measured window, whatever the IO count
/// (runtime noise: a reactor's sleep, a lazily grown table).
const SLACK: u64 = 16;

/// Command `n` of the mix, on its own 128-block lane of the namespace.
fn issue(qp: &mut HostQpair, n: u64, buf: DmaBuf) {
    let lba = (n % QD) * 128;
    let r = match n % 5 {
        0 => qp.write_with(1, lba, 128, buf.slice(0, 65536), n, IoFlags::NONE),
        1 => qp.read(1, lba, 128, buf.slice(0, 65536), n),
        2 => qp.write_with(1, lba, 8, buf.slice(0, 4096), n, IoFlags::FUA),
        3 => qp.read(1, lba, 8, buf.slice(0, 4096), n),
        _ => qp.flush(1, n),
    };
    r.unwrap();
}

#[test]
fn steady_state_io_through_the_target_does_not_allocate() {
    let opts = TransportOpts { num_shared_buffers: 8, buf_cache_size: 2, ..Default::default() };
    let t = start_target(2, 512, 4096, opts, &[]);
    let s = session_no_kato(t.port, 1);
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    // One 64 KiB buffer per lane, reused: commands hand them back.
    let mut spare: Vec<DmaBuf> = (0..QD).map(|_| DmaBuf::alloc(65536).unwrap()).collect();
    let mut bufs: Vec<Option<DmaBuf>> = (0..QD).map(|_| None).collect();
    for n in 0..QD {
        let b = spare.pop().unwrap();
        bufs[n as usize] = Some(b.clone());
        issue(&mut qp, n, b);
    }
    let warmup = 2_000u64;
    let total = 12_000u64;
    let mut done = 0u64;
    let mut window_start = None;
    let t0 = Instant::now();
    let mut failed = 0u64;
    while done < total {
        assert!(t0.elapsed() < Duration::from_secs(120), "too slow");
        let mut reissue = [0u64; QD as usize];
        let mut k = 0;
        qp.poll(|c: Completion| {
            if !c.status.is_success() {
                failed += 1;
            }
            reissue[k] = c.tag;
            k += 1;
        })
        .unwrap();
        for &tag in &reissue[..k] {
            done += 1;
            if done == warmup {
                window_start = Some(allocations_all_threads());
            }
            // The lane that finished takes its next command.
            let lane = (tag % QD) as usize;
            let b = bufs[lane].clone().unwrap();
            issue(&mut qp, tag + QD, b);
        }
        if k == 0 {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
    let allocs = allocations_all_threads() - window_start.unwrap();
    assert_eq!(failed, 0);
    println!("{} commands, {allocs} allocations in steady state", total - warmup);
    assert!(allocs <= SLACK, "{allocs} allocations during {} commands: the IO path allocates", total - warmup);
}
