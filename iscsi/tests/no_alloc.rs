//! The iSCSI IO path allocates nothing in the steady state: after a
//! warm-up, a thousand writes (immediate data plus R2T) and reads through
//! the target leave the reactors' allocation counts where they were (a
//! counting global allocator in this test binary; the initiator here runs
//! on the test thread, which is not counted).

mod initiator;
use initiator::*;

#[path = "../../bdev/tests/support/counting_alloc.rs"]
mod counting_alloc;

/// Allocations the two samplings themselves may cost (the message that
/// asks a reactor for its count, the channel that carries it back).
const SLACK: u64 = 8;

fn reactor_allocations(t: &Target) -> u64 {
    (0..2).map(|r| t.set.call(r, counting_alloc::allocations)).sum()
}

fn round(c: &mut Ini, i: usize, data: &[u8]) {
    let lba = (i % 64) as u32 * 32;
    let itt = c.scsi(&write10(lba, 32), 0, Some(data), 8192);
    let (st, _, _) = c.finish(itt, Some(data));
    assert_eq!(st, 0);
    let itt = c.scsi(&read10(lba, 32), 16384, None, 0);
    let (st, din, _) = c.finish(itt, None);
    assert_eq!((st, din.len()), (0, 16384));
}

#[test]
fn reads_and_writes_allocate_nothing_on_the_reactors() {
    let t = target();
    let mut c = Ini::connect(t.addr);
    let r = c.login(TARGET, &[("ImmediateData", "Yes"), ("InitialR2T", "Yes"), ("MaxBurstLength", "4096")]);
    assert_eq!(r.bhs.byte(36), 0);
    c.cmd_sn = r.bhs.u32_at(28);
    let itt = c.scsi(&[0u8; 6], 0, None, 0);
    let _ = c.finish(itt, None);
    let data = vec![0xa5u8; 16384];
    for i in 0..200 {
        round(&mut c, i, &data);
    }
    let before = reactor_allocations(&t);
    for i in 0..1000 {
        round(&mut c, i, &data);
    }
    let after = reactor_allocations(&t);
    assert!(after - before <= SLACK, "{} allocations on the reactors for 2000 commands", after - before);
}
