//! Block IO through a LUN channel: round trips for every READ/WRITE size,
//! out-of-range and protection fields, residuals, splitting at the bdev's
//! max_io_blocks, WRITE SAME, UNMAP, VERIFY, WRITE AND VERIFY, SYNCHRONIZE
//! CACHE, FUA, bdev errors mapped to sense, and abort.

mod scsi_support;

use bdev::error::{self, ErrorCreateParams, ErrorInjectParams};
use bdev::malloc::MallocBdev;
use bdev::{IoStatTotals, Registry};
use iscsi::scsi::{status, Nexus, Residual};
use scsi_support::*;
use std::sync::Arc;

const BLOCKS: u64 = 4096;
const BS: usize = 512;

fn rig_max_io(max_io_blocks: u32) -> (Rig, Arc<MallocBdev>, Nexus) {
    let mut keep = None;
    let rig = Rig::with_bdev(|| {
        let mut p = malloc_props("Malloc0", BS as u32, BLOCKS);
        p.max_io_blocks = max_io_blocks;
        let m = Arc::new(MallocBdev::new(p).unwrap());
        keep = Some(m.clone());
        Registry::get().register(m).unwrap()
    });
    let n = nexus("iqn.1994-05.com.example:a", 1);
    rig.clear_ua(&n);
    (rig, keep.unwrap(), n)
}

fn raw(m: &MallocBdev, lba: u64, blocks: usize) -> Vec<u8> {
    let mut v = vec![0u8; blocks * BS];
    assert!(m.read_raw(lba as usize * BS, &mut v));
    v
}

fn stats(rig: &Rig) -> IoStatTotals {
    rig.m.on(0, || {
        let mut t = IoStatTotals::default();
        rig.lun.bdev().channel().unwrap().stats().add_to(&mut t);
        t
    })
}

#[test]
fn every_read_and_write_size_round_trips() {
    let (rig, m, n) = rig_max_io(0);
    let data = pattern(1, BS, 4);
    // WRITE(6) at LBA 10 (4 blocks), READ(6) back.
    rig.run(&[0x0A, 0, 0, 10, 4, 0], &n, data.len() as u32, Some(&data)).assert_good();
    assert_eq!(raw(&m, 10, 4), data);
    assert_eq!(rig.run(&[0x08, 0, 0, 10, 4, 0], &n, data.len() as u32, None).data, data);
    // WRITE(10)/READ(10).
    let data = pattern(2, BS, 3);
    rig.write10(&n, 100, &data, 0).assert_good();
    assert_eq!(raw(&m, 100, 3), data);
    assert_eq!(rig.read10(&n, 100, 3).data, data);
    // WRITE(12)/READ(12).
    let mut c = [0u8; 12];
    c[0] = 0xAA;
    c[2..6].copy_from_slice(&200u32.to_be_bytes());
    c[6..10].copy_from_slice(&3u32.to_be_bytes());
    let data = pattern(3, BS, 3);
    rig.run(&c, &n, data.len() as u32, Some(&data)).assert_good();
    c[0] = 0xA8;
    assert_eq!(rig.run(&c, &n, data.len() as u32, None).data, data);
    assert_eq!(raw(&m, 200, 3), data);
    // WRITE(16)/READ(16) at the last blocks.
    let data = pattern(4, BS, 2);
    rig.run(&rw16(0x8A, BLOCKS - 2, 2, 0), &n, data.len() as u32, Some(&data)).assert_good();
    assert_eq!(rig.run(&rw16(0x88, BLOCKS - 2, 2, 0), &n, data.len() as u32, None).data, data);
    // A zero-length transfer is GOOD and moves nothing.
    let r = rig.read10(&n, 0, 0);
    assert_eq!((r.status, r.data.len()), (status::GOOD, 0));
}

#[test]
fn out_of_range_and_protection_fields_are_refused() {
    let (rig, m, n) = rig_max_io(0);
    rig.read10(&n, BLOCKS as u32 - 1, 2).assert_check(0x5, 0x21, 0x00);
    let data = pattern(5, BS, 2);
    rig.write10(&n, BLOCKS as u32 - 1, &data, 0).assert_check(0x5, 0x21, 0x00);
    assert_eq!(raw(&m, BLOCKS - 1, 1), vec![0; BS], "nothing written");
    rig.run(&rw16(0x88, u64::MAX, 1, 0), &n, 512, None).assert_check(0x5, 0x21, 0x00);
    // RDPROTECT without protection information.
    let r = rig.run(&rw10(0x28, 0, 1, 0x20), &n, 512, None);
    r.assert_check(0x5, 0x24, 0x00);
    assert_eq!(&r.sense[15..18], &[0xC8 | 7, 0, 1], "pointer: CDB byte 1, the field's top bit 7");
    // More than one Data-In buffer holds (the block limits' maximum).
    let big = Rig::malloc(20_000);
    big.clear_ua(&n);
    let max = (8 << 20) / BS as u32;
    let r = big.run(&rw16(0x88, 0, max + 1, 0), &n, (max + 1) * BS as u32, None);
    r.assert_check(0x5, 0x24, 0x00);
    assert_eq!(&r.sense[15..18], &[0xC0, 0, 10], "pointer: the transfer length");
    big.run(&rw16(0x88, 0, max, 0), &n, max * BS as u32, None).assert_good();
}

#[test]
fn residuals_follow_the_expected_length() {
    let (rig, m, n) = rig_max_io(0);
    let data = pattern(6, BS, 2);
    rig.write10(&n, 0, &data, 0).assert_good();
    // READ 2 blocks, expecting 1: overflow, Data-In clipped.
    let r = rig.run(&rw10(0x28, 0, 2, 0), &n, 512, None);
    assert_eq!((r.status, r.residual, r.data.as_slice()), (status::GOOD, Residual::Over(512), &data[..512]));
    // READ 1 block, expecting 3: underflow.
    let r = rig.run(&rw10(0x28, 0, 1, 0), &n, 1536, None);
    assert_eq!((r.residual, r.data.len()), (Residual::Under(1024), 512));
    // WRITE 2 blocks expecting (and sending) 1 block: that block is
    // written, the other is an overflow residual (libiscsi 1.19 wants GOOD).
    let b = pattern(7, BS, 1);
    let r = rig.run(&rw10(0x2A, 0, 2, 0), &n, 512, Some(&b));
    assert_eq!((r.status, r.residual), (status::GOOD, Residual::Over(512)));
    assert_eq!(raw(&m, 0, 2), [&b[..], &data[BS..]].concat());
    // Expecting nothing: nothing written, GOOD, overflow.
    let r = rig.run(&rw10(0x2A, 1, 1, 0), &n, 0, None);
    assert_eq!((r.status, r.residual), (status::GOOD, Residual::Over(512)));
    assert_eq!(raw(&m, 1, 1), data[BS..]);
    // Data-Out missing from what the initiator said it would send: refused.
    let r = rig.run(&rw10(0x2A, 1, 2, 0), &n, 1024, Some(&b));
    r.assert_check(0x5, 0x0E, 0x03);
    assert_eq!(raw(&m, 1, 1), data[BS..]);
    // A partial block: refused, nothing written.
    let r = rig.run(&rw10(0x2A, 1, 1, 0), &n, 200, Some(&b[..200]));
    r.assert_check(0x5, 0x0E, 0x03);
    assert_eq!(r.residual, Residual::Over(312));
    assert_eq!(raw(&m, 1, 1), data[BS..]);
    // WRITE 1 block, expecting 10000 bytes: underflow, the block written.
    let mut big = pattern(8, BS, 1);
    big.resize(10_000, 0xEE);
    let r = rig.run(&rw10(0x2A, 0, 1, 0), &n, 10_000, Some(&big));
    assert_eq!((r.status, r.residual), (status::GOOD, Residual::Under(10_000 - 512)));
    assert_eq!(raw(&m, 0, 1), big[..512]);
    // TEST UNIT READY with an expected length: all of it is residual.
    assert_eq!(rig.run(&[0; 6], &n, 100, None).residual, Residual::Under(100));
}

#[test]
fn large_commands_are_split_at_max_io_blocks() {
    let (rig, m, n) = rig_max_io(8);
    let data = pattern(9, BS, 64);
    let before = stats(&rig);
    rig.write10(&n, 5, &data, 0).assert_good();
    let mid = stats(&rig);
    assert_eq!(mid.num_write_ops - before.num_write_ops, 8, "64 blocks in pieces of 8");
    assert_eq!(raw(&m, 5, 64), data);
    assert_eq!(rig.read10(&n, 5, 64).data, data);
    assert_eq!(stats(&rig).num_read_ops - mid.num_read_ops, 8);
    // Block limits report the bdev's piece size as the optimal transfer.
    let r = rig.run(&[0x12, 1, 0xB0, 0, 64, 0], &n, 64, None);
    assert_eq!(u32::from_be_bytes(r.data[12..16].try_into().unwrap()), 8);
}

#[test]
fn fua_and_dpo_reach_the_bdev() {
    let (rig, _m, n) = rig_max_io(0);
    let before = stats(&rig);
    rig.write10(&n, 0, &pattern(1, BS, 1), 0x08).assert_good();
    rig.write10(&n, 0, &pattern(1, BS, 1), 0x10).assert_good();
    let after = stats(&rig);
    assert_eq!(after.num_write_ops - before.num_write_ops, 2);
    assert_eq!(after.num_fua_write_ops - before.num_fua_write_ops, 1, "only the FUA write carried FUA");
    // SYNCHRONIZE CACHE(10) and (16) become bdev flushes; a range past the end is refused.
    rig.run(&rw10(0x35, 0, 0, 0), &n, 0, None).assert_good();
    rig.run(&rw16(0x91, 0, 8, 0), &n, 0, None).assert_good();
    assert_eq!(stats(&rig).num_flush_ops - after.num_flush_ops, 2);
    rig.run(&rw10(0x35, BLOCKS as u32, 1, 0), &n, 0, None).assert_check(0x5, 0x21, 0);
}

#[test]
fn write_same_unmap_and_their_limits() {
    let (rig, m, n) = rig_max_io(16);
    let block = pattern(10, BS, 1);
    // WRITE SAME(10): 40 copies (pieces of at most 16).
    rig.run(&rw10(0x41, 7, 40, 0), &n, 512, Some(&block)).assert_good();
    for i in 0..40 {
        assert_eq!(raw(&m, 7 + i, 1), block, "block {i}");
    }
    assert_eq!(raw(&m, 47, 1), vec![0; BS]);
    // WRITE SAME(16) with UNMAP and zeroes: unmapped (reads back zero).
    let before = stats(&rig);
    rig.run(&rw16(0x93, 10, 20, 0x08), &n, 512, Some(&[0u8; BS])).assert_good();
    assert!(stats(&rig).num_unmap_ops > before.num_unmap_ops, "WRITE SAME with UNMAP unmapped");
    assert_eq!(raw(&m, 10, 20), vec![0; 20 * BS]);
    assert_eq!(raw(&m, 30, 1), block);
    // UNMAP deallocates whatever the data block holds (LBPRZ: reads zero).
    rig.run(&rw10(0x41, 7, 3, 0x08), &n, 512, Some(&block)).assert_good();
    assert_eq!(raw(&m, 7, 3), vec![0; 3 * BS]);
    // NDOB: zeroes without a Data-Out buffer.
    rig.run(&rw16(0x93, 30, 2, 0x01), &n, 0, None).assert_good();
    assert_eq!(raw(&m, 30, 2), vec![0; 2 * BS]);
    // UNMAP with two descriptors (one empty) and a third range.
    rig.write10(&n, 100, &pattern(11, BS, 10), 0).assert_good();
    let mut p = vec![0u8; 8 + 3 * 16];
    let data_len = (p.len() - 2) as u16;
    p[0..2].copy_from_slice(&data_len.to_be_bytes());
    p[2..4].copy_from_slice(&48u16.to_be_bytes());
    for (i, (lba, count)) in [(100u64, 2u32), (104, 0), (105, 3)].into_iter().enumerate() {
        p[8 + 16 * i..16 + 16 * i].copy_from_slice(&lba.to_be_bytes());
        p[16 + 16 * i..20 + 16 * i].copy_from_slice(&count.to_be_bytes());
    }
    let mut c = [0u8; 10];
    c[0] = 0x42;
    c[7..9].copy_from_slice(&(p.len() as u16).to_be_bytes());
    rig.run(&c, &n, p.len() as u32, Some(&p)).assert_good();
    let after = raw(&m, 100, 10);
    assert_eq!(&after[..2 * BS], &vec![0; 2 * BS][..]);
    assert_ne!(&after[2 * BS..3 * BS], &vec![0; BS][..]);
    assert_eq!(&after[5 * BS..8 * BS], &vec![0; 3 * BS][..]);
    assert_ne!(&after[8 * BS..], &vec![0; 2 * BS][..]);
    // A descriptor past the end.
    p[8..16].copy_from_slice(&(BLOCKS - 1).to_be_bytes());
    rig.run(&c, &n, p.len() as u32, Some(&p)).assert_check(0x5, 0x21, 0);
    // A parameter list shorter than the CDB says.
    rig.run(&c, &n, 8, Some(&p[..8])).assert_check(0x5, 0x0E, 0x03);
    // WRITE SAME takes exactly one block of Data-Out.
    rig.run(&rw10(0x41, 7, 2, 0), &n, 256, Some(&block[..256])).assert_check(0x5, 0x0E, 0x03);
    let two = pattern(1, BS, 2);
    rig.run(&rw10(0x41, 7, 2, 0), &n, 1024, Some(&two)).assert_check(0x5, 0x0E, 0x03);
    assert_eq!(raw(&m, 7, 1), vec![0; BS], "nothing written");
}

#[test]
fn naca_and_aca_are_refused() {
    let (rig, _m, n) = rig_max_io(0);
    let mut c = rw10(0x28, 0, 1, 0);
    c[9] = 0x04;
    let r = rig.run(&c, &n, 512, None);
    r.assert_check(0x5, 0x24, 0x00);
    assert_eq!(&r.sense[15..18], &[0xC8 | 2, 0, 9], "pointer: the control byte's NACA bit");
    let mut cmd = rig.command(&rw10(0x28, 0, 1, 0), &n, 512, None);
    cmd.attr = iscsi::scsi::TaskAttr::Aca;
    let tag = rig.submit(0, cmd);
    rig.wait(0, tag).assert_check(0x5, 0x49, 0x00);
}

#[test]
fn verify_and_write_and_verify_compare_bytes() {
    let (rig, m, n) = rig_max_io(0);
    let data = pattern(12, BS, 4);
    rig.write10(&n, 50, &data, 0).assert_good();
    // BYTCHK 0: a medium check.
    rig.run(&rw10(0x2F, 50, 4, 0), &n, 0, None).assert_good();
    // BYTCHK 1 with equal data.
    rig.run(&rw10(0x2F, 50, 4, 0x02), &n, data.len() as u32, Some(&data)).assert_good();
    // A difference at byte 700: MISCOMPARE with the offset.
    let mut other = data.clone();
    other[700] ^= 0xFF;
    let r = rig.run(&rw10(0x2F, 50, 4, 0x02), &n, data.len() as u32, Some(&other));
    r.assert_check(0xE, 0x1D, 0x00);
    assert_eq!(r.sense[0] & 0x80, 0x80, "INFORMATION valid");
    assert_eq!(u32::from_be_bytes(r.sense[3..7].try_into().unwrap()), 700);
    // BYTCHK 11b: every block against one block.
    let block = pattern(13, BS, 1);
    rig.run(&rw10(0x41, 60, 3, 0), &n, 512, Some(&block)).assert_good();
    rig.run(&rw10(0x2F, 60, 3, 0x06), &n, 512, Some(&block)).assert_good();
    rig.run(&rw10(0x2F, 59, 3, 0x06), &n, 512, Some(&block)).assert_check(0xE, 0x1D, 0);
    // WRITE AND VERIFY writes.
    let wv = pattern(14, BS, 2);
    rig.run(&rw10(0x2E, 70, 2, 0x02), &n, wv.len() as u32, Some(&wv)).assert_good();
    assert_eq!(raw(&m, 70, 2), wv);
}

fn error_rig() -> (Rig, Nexus) {
    let rig = Rig::with_bdev(|| {
        let m = Arc::new(MallocBdev::new(malloc_props("Base0", BS as u32, BLOCKS)).unwrap());
        Registry::get().register(m).unwrap();
        error::create(ErrorCreateParams { base_name: "Base0".into(), uuid: None }).unwrap()
    });
    let n = nexus("iqn.1994-05.com.example:a", 1);
    rig.clear_ua(&n);
    (rig, n)
}

fn inject(rig: &Rig, io_type: &str, error_type: &str, num: u64) {
    rig.m.on(0, || {
        error::inject(ErrorInjectParams {
            name: "EE_Base0".into(),
            io_type: io_type.into(),
            error_type: error_type.into(),
            num: Some(num),
            queue_depth: None,
            corrupt_offset: None,
            corrupt_value: None,
            nvme_sct: None,
            nvme_sc: None,
        })
        .unwrap()
    });
}

#[test]
fn bdev_errors_become_sense_data() {
    let (rig, n) = error_rig();
    inject(&rig, "read", "failure", 1);
    rig.read10(&n, 0, 1).assert_check(0x3, 0x11, 0x00);
    rig.read10(&n, 0, 1).assert_good();
    inject(&rig, "write", "failure", 1);
    rig.write10(&n, 0, &pattern(1, BS, 1), 0).assert_check(0x3, 0x0C, 0x00);
    inject(&rig, "read", "nomem", 1);
    assert_eq!(rig.read10(&n, 0, 1).status, status::TASK_SET_FULL);
    // One failed piece of a split command fails the command.
    inject(&rig, "write", "failure", 1);
    rig.write10(&n, 0, &pattern(2, BS, 8), 0).assert_check(0x3, 0x0C, 0x00);
}

#[test]
fn abort_answers_task_aborted_and_frees_the_slot() {
    let (rig, n) = error_rig();
    inject(&rig, "read", "pending", 1);
    let cmd = rig.command(&rw10(0x28, 0, 1, 0), &n, 512, None);
    let tag = rig.submit(0, cmd);
    rig.m.run_until_idle(20);
    assert!(rig.channels[0].1.take(tag).is_none(), "held by the error bdev");
    assert_eq!(rig.channels[0].0.in_flight(), 1);
    assert!(rig.m.on(0, || rig.channels[0].0.abort(tag)));
    assert!(!rig.m.on(0, || rig.channels[0].0.abort(tag + 100)));
    // The error bdev cannot call a held IO back: the answer comes when it
    // lets the IO go, as TASK ABORTED.
    rig.m.run_until_idle(20);
    assert!(rig.channels[0].1.take(tag).is_none());
    rig.m.on(0, || error::resume_pending(error::ErrorResumeParams { name: "EE_Base0".into() }).unwrap());
    let r = rig.wait(0, tag);
    assert_eq!(r.status, status::TASK_ABORTED);
    assert_eq!(rig.channels[0].0.in_flight(), 0);
    rig.read10(&n, 0, 1).assert_good();
}

#[test]
fn stopped_unit_is_not_ready_and_prefetch_checks_the_range() {
    let (rig, _m, n) = rig_max_io(0);
    rig.run(&[0x1B, 0, 0, 0, 0x00, 0], &n, 0, None).assert_good();
    rig.run(&[0; 6], &n, 0, None).assert_check(0x2, 0x04, 0x02);
    rig.read10(&n, 0, 1).assert_check(0x2, 0x04, 0x02);
    rig.run(&[0x12, 0, 0, 0, 36, 0], &n, 36, None).assert_good();
    rig.run(&[0x1B, 0, 0, 0, 0x01, 0], &n, 0, None).assert_good();
    rig.run(&[0; 6], &n, 0, None).assert_good();
    rig.read10(&n, 0, 1).assert_good();
    // Power conditions are refused, not ignored.
    rig.run(&[0x1B, 0, 0, 0, 0x21, 0], &n, 0, None).assert_check(0x5, 0x24, 0x00);
    rig.run(&rw10(0x34, BLOCKS as u32 - 4, 4, 0x02), &n, 0, None).assert_good();
    rig.run(&rw10(0x34, BLOCKS as u32 - 4, 5, 0), &n, 0, None).assert_check(0x5, 0x21, 0x00);
    rig.run(&rw16(0x90, 0, 8, 0), &n, 0, None).assert_good();
}

#[test]
fn task_attributes_order_commands() {
    use iscsi::scsi::TaskAttr;
    let (rig, n) = error_rig();
    // A SIMPLE read is held at the bdev.
    inject(&rig, "read", "pending", 1);
    let first = rig.submit(0, rig.command(&rw10(0x28, 0, 1, 0), &n, 512, None));
    rig.m.run_until_idle(20);
    // An ORDERED write waits for it; a SIMPLE read waits for the ORDERED write.
    let mut w = rig.command(&rw10(0x2A, 8, 1, 0), &n, 512, Some(&pattern(1, BS, 1)));
    w.attr = TaskAttr::Ordered;
    let ordered = rig.submit(0, w);
    let after = rig.submit(0, rig.command(&rw10(0x28, 8, 1, 0), &n, 512, None));
    // HEAD OF QUEUE goes first.
    let mut h = rig.command(&[0; 6], &n, 0, None);
    h.attr = TaskAttr::HeadOfQueue;
    let head = rig.submit(0, h);
    rig.wait(0, head).assert_good();
    for _ in 0..100 {
        rig.m.run_once(0);
    }
    assert_eq!(rig.channels[0].0.in_flight(), 3);
    assert!(rig.channels[0].1 .0.borrow().is_empty(), "nothing passed the held read");
    rig.m.on(0, || error::resume_pending(error::ErrorResumeParams { name: "EE_Base0".into() }).unwrap());
    rig.wait(0, first).assert_good();
    rig.wait(0, ordered).assert_good();
    // The later read saw the ORDERED write's data.
    assert_eq!(rig.wait(0, after).data, pattern(1, BS, 1));
    // A held command can be aborted.
    inject(&rig, "read", "pending", 1);
    let first = rig.submit(0, rig.command(&rw10(0x28, 0, 1, 0), &n, 512, None));
    let mut o = rig.command(&[0; 6], &n, 0, None);
    o.attr = TaskAttr::Ordered;
    let o = rig.submit(0, o);
    assert!(rig.m.on(0, || rig.channels[0].0.abort(o)));
    assert_eq!(rig.wait(0, o).status, status::TASK_ABORTED);
    rig.m.on(0, || error::resume_pending(error::ErrorResumeParams { name: "EE_Base0".into() }).unwrap());
    rig.wait(0, first).assert_good();
}

/// A command beyond the block limits gets SBC-4's answer, ILLEGAL REQUEST /
/// INVALID FIELD IN CDB with the field pointer on its length, and moves no
/// data: READ(16)/WRITE(16) one block over MAXIMUM TRANSFER LENGTH (one
/// 8 MiB buffer), WRITE SAME one block over MAXIMUM WRITE SAME LENGTH. At
/// the limits they run.
#[test]
fn commands_beyond_the_block_limits_are_refused() {
    let rig = Rig::malloc(20_000);
    let n = nexus("iqn.1994-05.com.example:big", 1);
    rig.clear_ua(&n);
    let max = (8u32 << 20) / BS as u32;
    let field = |r: &Reply| {
        // Fixed sense: SKSV, C/D (a CDB field) and the byte it points at.
        assert_eq!(r.sense[15] & 0xC0, 0xC0, "sense-key specific field pointer in the CDB");
        u16::from_be_bytes([r.sense[16], r.sense[17]])
    };
    let r = rig.run(&rw16(0x88, 0, max + 1, 0), &n, (max + 1) * BS as u32, None);
    r.assert_check(0x5, 0x24, 0x00);
    assert_eq!(field(&r), 10, "READ(16) TRANSFER LENGTH");
    assert!(r.data.is_empty(), "no Data-In");
    let r = rig.run(&rw16(0x8A, 0, max + 1, 0), &n, (max + 1) * BS as u32, Some(&pattern(1, BS, 1)));
    r.assert_check(0x5, 0x24, 0x00);
    assert_eq!(field(&r), 10, "WRITE(16) TRANSFER LENGTH");
    let r = rig.run(&rw10(0x28, 0, (max + 1) as u16, 0), &n, (max + 1) * BS as u32, None);
    r.assert_check(0x5, 0x24, 0x00);
    assert_eq!(field(&r), 7, "READ(10) TRANSFER LENGTH");
    let r = rig.run(&rw16(0x88, 0, max, 0), &n, max * BS as u32, None);
    r.assert_good();
    assert_eq!(r.data.len(), (max as usize) * BS);
    let block = pattern(2, BS, 1);
    let r = rig.run(&rw16(0x93, 0, max + 1, 0), &n, BS as u32, Some(&block));
    r.assert_check(0x5, 0x24, 0x00);
    assert_eq!(field(&r), 10, "WRITE SAME(16) NUMBER OF LOGICAL BLOCKS");
    let r = rig.run(&rw16(0x93, 0, max + 1, 0x08), &n, BS as u32, Some(&block));
    r.assert_check(0x5, 0x24, 0x00);
    rig.run(&rw16(0x93, 0, max, 0), &n, BS as u32, Some(&block)).assert_good();
    // Zero blocks means the rest of the medium, bounded the same way.
    let rest_at = 20_000 - u64::from(max);
    rig.run(&rw16(0x93, rest_at - 1, 0, 0x08), &n, BS as u32, Some(&[0u8; BS])).assert_check(0x5, 0x24, 0x00);
    rig.run(&rw16(0x93, rest_at, 0, 0x08), &n, BS as u32, Some(&[0u8; BS])).assert_good();
}
