//! ORWRITE (16), WRITE ATOMIC (16) and READ DEFECT DATA (10)/(12): the
//! OR of Data-Out into the medium, both commands holding their range
//! against other writes (an overlapping write waits for them, and they
//! wait for writes in flight), the atomic limits in the block limits VPD
//! and their refusals, and the empty defect lists byte for byte.

mod scsi_support;

use bdev::malloc::MallocBdev;
use bdev::Registry;
use iscsi::scsi::{status, Nexus};
use scsi_support::*;
use std::sync::Arc;

const BS: usize = 512;
const BLOCKS: u64 = 1024;

fn rig() -> (Rig, Arc<MallocBdev>, Nexus) {
    rig_over_error_bdev(BLOCKS)
}

fn orwrite(lba: u64, blocks: u32, byte1: u8) -> [u8; 16] {
    rw16(0x8B, lba, blocks, byte1)
}

fn write_atomic(lba: u64, blocks: u16, boundary: u16, byte1: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x9C;
    c[1] = byte1;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..12].copy_from_slice(&boundary.to_be_bytes());
    c[12..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn or(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().zip(b).map(|(x, y)| x | y).collect()
}

fn sense_pointer(r: &Reply) -> [u8; 3] {
    r.sense[15..18].try_into().unwrap()
}

#[test]
fn orwrite_ors_the_data_into_the_blocks() {
    let (rig, m, n) = rig();
    let old = pattern(1, BS, 3);
    let mask = pattern(2, BS, 3);
    rig.write10(&n, 10, &old, 0).assert_good();
    rig.run(&orwrite(10, 3, 0), &n, mask.len() as u32, Some(&mask)).assert_good();
    assert_eq!(raw(&m, 10, 3), or(&old, &mask));
    // FUA and DPO are taken; 0 blocks writes nothing.
    let ones = vec![0xFFu8; BS];
    rig.run(&orwrite(12, 1, 0x18), &n, BS as u32, Some(&ones)).assert_good();
    assert_eq!(raw(&m, 12, 1), ones);
    rig.run(&orwrite(0, 0, 0), &n, 0, None).assert_good();
    // Both ends of the LUN, up to 256 blocks (libiscsi's lengths).
    for i in [1usize, 255, 256] {
        for lba in [0, BLOCKS - i as u64] {
            rig.run(&rw16(0x8A, lba, i as u32, 0), &n, (i * BS) as u32, Some(&vec![0u8; i * BS])).assert_good();
            for (byte, now) in [(0xA5u8, 0xA5u8), (0x5A, 0xFF)] {
                let d = vec![byte; i * BS];
                rig.run(&orwrite(lba, i as u32, 0), &n, d.len() as u32, Some(&d)).assert_good();
                assert_eq!(raw(&m, lba, i), vec![now; i * BS], "{i} blocks at {lba}");
            }
        }
    }
}

#[test]
fn orwrite_refusals() {
    let (rig, m, n) = rig();
    let before = raw(&m, 0, 4);
    let d = vec![0xFFu8; 2 * BS];
    // Past the end, and an LBA that overflows: LBA OUT OF RANGE.
    rig.run(&orwrite(BLOCKS - 1, 2, 0), &n, d.len() as u32, Some(&d)).assert_check(0x5, 0x21, 0x00);
    rig.run(&orwrite(BLOCKS + 1, 0, 0), &n, 0, None).assert_check(0x5, 0x21, 0x00);
    rig.run(&orwrite(u64::MAX, 0, 0), &n, 0, None).assert_check(0x5, 0x21, 0x00);
    // ORPROTECT without protection information: INVALID FIELD IN CDB, byte 1 bit 7.
    let r = rig.run(&orwrite(0, 2, 0x20), &n, d.len() as u32, Some(&d));
    r.assert_check(0x5, 0x24, 0x00);
    assert_eq!(sense_pointer(&r), [0xCF, 0, 1]);
    // Missing Data-Out is never half applied.
    rig.run(&orwrite(0, 2, 0), &n, BS as u32, Some(&d[..BS])).assert_check(0x5, 0x0E, 0x03);
    assert_eq!(raw(&m, 0, 4), before, "a refused ORWRITE wrote nothing");
}

/// An overlapping write issued while ORWRITE has read but not written
/// back waits for it: without the exclusion the write would land between
/// the read and the write-back and be lost under the OR's result.
#[test]
fn a_write_waits_for_an_orwrite_in_progress() {
    let (rig, m, n) = rig();
    let old = pattern(3, BS, 4);
    rig.write10(&n, 100, &old, 0).assert_good();
    hold_next(&rig, "read");
    let mask = pattern(4, BS, 4);
    let ow = rig.submit(0, rig.command(&orwrite(100, 4, 0), &n, mask.len() as u32, Some(&mask)));
    rig.m.run_until_idle(20);
    let other = nexus("iqn.1994-05.com.example:b", 1);
    rig.clear_ua(&other);
    let plain = pattern(5, BS, 1);
    let w = rig.submit(1, rig.command(&rw10(0x2A, 102, 1, 0), &other, BS as u32, Some(&plain)));
    for _ in 0..200 {
        rig.m.run_once(0);
    }
    assert!(rig.channels[1].1.take(w).is_none(), "the overlapping write completed during the ORWRITE");
    release(&rig);
    rig.wait(0, ow).assert_good();
    rig.wait(1, w).assert_good();
    let want = or(&old, &mask);
    let now = raw(&m, 100, 4);
    assert_eq!(now[..2 * BS], want[..2 * BS]);
    assert_eq!(now[2 * BS..3 * BS], plain[..], "the write came after the ORWRITE and is kept");
    assert_eq!(now[3 * BS..], want[3 * BS..]);
}

#[test]
fn an_orwrite_waits_for_writes_in_flight() {
    let (rig, m, n) = rig();
    rig.write10(&n, 300, &vec![0u8; 2 * BS], 0).assert_good();
    hold_next(&rig, "write");
    let mid = pattern(8, BS, 2);
    let w = rig.submit(1, rig.command(&rw10(0x2A, 300, 2, 0), &n, mid.len() as u32, Some(&mid)));
    rig.m.run_until_idle(20);
    let mask = pattern(9, BS, 2);
    let ow = rig.submit(0, rig.command(&orwrite(300, 2, 0), &n, mask.len() as u32, Some(&mask)));
    for _ in 0..200 {
        rig.m.run_once(0);
    }
    assert!(rig.channels[0].1.take(ow).is_none(), "the ORWRITE ran past a write in flight");
    release(&rig);
    rig.wait(1, w).assert_good();
    rig.wait(0, ow).assert_good();
    assert_eq!(raw(&m, 300, 2), or(&mid, &mask));
}

fn block_limits(rig: &Rig, n: &Nexus) -> Vec<u8> {
    let r = rig.run(&[0x12, 0x01, 0xB0, 0x00, 0xFF, 0x00], n, 255, None);
    r.assert_good();
    assert_eq!(&r.data[..4], &[0x00, 0xB0, 0x00, 0x3C]);
    r.data
}

#[test]
fn write_atomic_limits_and_writes() {
    let (rig, m, n) = rig();
    let vpd = block_limits(&rig, &n);
    let max_transfer = u32::from_be_bytes(vpd[8..12].try_into().unwrap());
    let max_atomic = u32::from_be_bytes(vpd[44..48].try_into().unwrap());
    // One DMA buffer (8 MiB) of 512-byte blocks; the malloc bdev has no IO
    // size limit, so one bdev write covers the same.
    assert_eq!(max_transfer, 16384);
    assert_eq!(max_atomic, 16384, "MAXIMUM ATOMIC TRANSFER LENGTH");
    assert_eq!(&vpd[48..64], &[0u8; 16], "no alignment, granularity or boundary constraint");
    // The data lands, at both ends, FUA/DPO taken.
    for (lba, i) in [(0u64, 1usize), (7, 256), (BLOCKS - 256, 256)] {
        let d = pattern(i as u8, BS, i);
        rig.run(&write_atomic(lba, i as u16, 0, 0x18), &n, d.len() as u32, Some(&d)).assert_good();
        assert_eq!(raw(&m, lba, i), d);
    }
    rig.run(&write_atomic(0, 0, 0, 0), &n, 0, None).assert_good();
    let before = raw(&m, 0, 8);
    let d = vec![0xEEu8; 8 * BS];
    // Refusals: past the end; WRPROTECT; an atomic boundary (none offered);
    // Data-Out short of the length (never written in part).
    rig.run(&write_atomic(BLOCKS - 4, 8, 0, 0), &n, d.len() as u32, Some(&d)).assert_check(0x5, 0x21, 0x00);
    rig.run(&write_atomic(u64::MAX, 1, 0, 0), &n, BS as u32, Some(&d[..BS])).assert_check(0x5, 0x21, 0x00);
    let r = rig.run(&write_atomic(0, 8, 0, 0x40), &n, d.len() as u32, Some(&d));
    r.assert_check(0x5, 0x24, 0x00);
    assert_eq!(sense_pointer(&r), [0xCF, 0, 1]);
    let r = rig.run(&write_atomic(0, 8, 4, 0), &n, d.len() as u32, Some(&d));
    r.assert_check(0x5, 0x24, 0x00);
    assert_eq!(sense_pointer(&r), [0xC0, 0, 10]);
    rig.run(&write_atomic(0, 8, 0, 0), &n, (4 * BS) as u32, Some(&d[..4 * BS])).assert_check(0x5, 0x0E, 0x03);
    assert_eq!(raw(&m, 0, 8), before, "a refused WRITE ATOMIC wrote nothing");
}

#[test]
fn write_atomic_longer_than_one_bdev_io_is_refused() {
    let mut keep = None;
    let mut rig = Rig::with_bdev(|| {
        let mut props = malloc_props("Small0", BS as u32, BLOCKS);
        props.max_io_blocks = 8;
        let m = Arc::new(MallocBdev::new(props).unwrap());
        keep = Some(m.clone());
        Registry::get().register(m).unwrap()
    });
    rig.open_channel();
    let n = nexus("iqn.1994-05.com.example:a", 1);
    rig.clear_ua(&n);
    let m = keep.unwrap();
    let vpd = block_limits(&rig, &n);
    assert_eq!(u32::from_be_bytes(vpd[44..48].try_into().unwrap()), 8);
    let d = vec![0x11u8; 9 * BS];
    rig.run(&write_atomic(0, 8, 0, 0), &n, (8 * BS) as u32, Some(&d[..8 * BS])).assert_good();
    assert_eq!(raw(&m, 0, 8), d[..8 * BS]);
    let r = rig.run(&write_atomic(16, 9, 0, 0), &n, d.len() as u32, Some(&d));
    r.assert_check(0x5, 0x24, 0x00);
    assert_eq!(sense_pointer(&r), [0xC0, 0, 12], "pointer: TRANSFER LENGTH");
    assert_eq!(raw(&m, 16, 9), vec![0u8; 9 * BS]);
    // Ordinary writes of that length are split and go through.
    rig.run(&rw10(0x2A, 16, 9, 0), &n, d.len() as u32, Some(&d)).assert_good();
}

/// WRITE ATOMIC holds its range: an overlapping write waits for it.
#[test]
fn a_write_waits_for_a_write_atomic_in_progress() {
    let (rig, m, n) = rig();
    hold_next(&rig, "write");
    let atomic = pattern(6, BS, 4);
    let a = rig.submit(0, rig.command(&write_atomic(200, 4, 0, 0), &n, atomic.len() as u32, Some(&atomic)));
    rig.m.run_until_idle(20);
    let plain = pattern(7, BS, 1);
    let w = rig.submit(1, rig.command(&rw10(0x2A, 201, 1, 0), &n, BS as u32, Some(&plain)));
    for _ in 0..200 {
        rig.m.run_once(0);
    }
    assert!(rig.channels[1].1.take(w).is_none(), "the overlapping write completed during the WRITE ATOMIC");
    release(&rig);
    rig.wait(0, a).assert_good();
    rig.wait(1, w).assert_good();
    let now = raw(&m, 200, 4);
    assert_eq!(now[BS..2 * BS], plain[..]);
    assert_eq!(now[..BS], atomic[..BS]);
}

#[test]
fn read_defect_data_is_an_empty_list() {
    let (rig, _m, n) = rig();
    // (10): REQ_PLIST + REQ_GLIST, long block format (3).
    let r = rig.run(&[0x37, 0, 0x18 | 0x03, 0, 0, 0, 0, 0, 32, 0], &n, 32, None);
    r.assert_good();
    assert_eq!(r.data, [0x00, 0x18 | 0x03, 0x00, 0x00]);
    // Neither list asked for, short block format.
    let r = rig.run(&[0x37, 0, 0, 0, 0, 0, 0, 0, 32, 0], &n, 32, None);
    r.assert_good();
    assert_eq!(r.data, [0, 0, 0, 0]);
    // (12): flags in byte 1, 8-byte header (generation code 0, length 0).
    let r = rig.run(&[0xB7, 0x08 | 0x05, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], &n, 32, None);
    r.assert_good();
    assert_eq!(r.data, [0x00, 0x08 | 0x05, 0, 0, 0, 0, 0, 0]);
    // A short allocation length clips.
    let r = rig.run(&[0xB7, 0x10, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0], &n, 2, None);
    r.assert_good();
    assert_eq!(r.data, [0x00, 0x10]);
    // Format 111b is reserved.
    let r = rig.run(&[0x37, 0, 0x07, 0, 0, 0, 0, 0, 32, 0], &n, 32, None);
    r.assert_check(0x5, 0x24, 0x00);
    assert_eq!(sense_pointer(&r), [0xCA, 0, 2]);
}

#[test]
fn report_supported_opcodes_lists_the_new_commands() {
    let (rig, _m, n) = rig();
    for (opcode, len) in [(0x8Bu8, 16u16), (0x9C, 16), (0x37, 10), (0xB7, 12)] {
        let r = rig.run(&[0xA3, 0x0C, 0x01, opcode, 0, 0, 0, 0, 1, 0, 0, 0], &n, 256, None);
        r.assert_good();
        assert_eq!(r.data[1] & 0x07, 0x03, "{opcode:#x} supported");
        assert_eq!(u16::from_be_bytes([r.data[2], r.data[3]]), len);
        assert_eq!(r.data[4], opcode);
    }
    let _ = status::GOOD;
}

/// WRITE ATOMIC promises no more than the bdev keeps whole across a power
/// loss: over a device model with a volatile cache (one block, the least
/// any device promises) the limit is one block and two are refused.
#[test]
fn write_atomic_is_limited_to_what_a_power_loss_keeps_whole() {
    let mut rig = Rig::with_bdev(|| {
        let props = malloc_props("Cache0", BS as u32, BLOCKS);
        let b = bdev::volatile_cache::VolatileCacheBdev::new(props, 1, 0).unwrap();
        assert_eq!(bdev::Bdev::props(&b).atomic_write_blocks, 1);
        Registry::get().register(Arc::new(b)).unwrap()
    });
    rig.open_channel();
    let n = nexus("iqn.1994-05.com.example:a", 1);
    rig.clear_ua(&n);
    let vpd = block_limits(&rig, &n);
    assert_eq!(u32::from_be_bytes(vpd[44..48].try_into().unwrap()), 1, "MAXIMUM ATOMIC TRANSFER LENGTH");
    let d = vec![0x22u8; 2 * BS];
    rig.run(&write_atomic(4, 1, 0, 0), &n, BS as u32, Some(&d[..BS])).assert_good();
    let r = rig.run(&write_atomic(8, 2, 0, 0), &n, d.len() as u32, Some(&d));
    r.assert_check(0x5, 0x24, 0x00);
    assert_eq!(sense_pointer(&r), [0xC0, 0, 12], "pointer: TRANSFER LENGTH");
}
