//! Reservations between two nexuses: persistent reservations (register,
//! reserve, conflicts by type, preempt with its unit attention, release,
//! clear, the PERSISTENT RESERVE IN reports), RESERVE(6)/RELEASE(6) with
//! nexus loss, and the unit attention a LUN reset leaves other nexuses.

mod scsi_support;

use iscsi::scsi::{status, Nexus};
use scsi_support::*;

fn rig() -> (Rig, Nexus, Nexus) {
    let rig = Rig::malloc(1024);
    let a = nexus("iqn.1994-05.com.example:a", 1);
    let b = nexus("iqn.1994-05.com.example:b", 1);
    rig.clear_ua(&a);
    rig.clear_ua(&b);
    (rig, a, b)
}

fn prout(rig: &Rig, n: &Nexus, sa: u8, rtype: u8, key: u64, sa_key: u64) -> Reply {
    let (c, p) = prout_cdb(sa, rtype, key, sa_key);
    rig.run(&c, n, 24, Some(&p))
}

fn prout_cdb(sa: u8, rtype: u8, key: u64, sa_key: u64) -> ([u8; 10], [u8; 24]) {
    let mut p = [0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    let mut c = [0u8; 10];
    c[0] = 0x5F;
    c[1] = sa;
    c[2] = rtype;
    c[5..9].copy_from_slice(&24u32.to_be_bytes());
    (c, p)
}

fn prin(rig: &Rig, n: &Nexus, sa: u8) -> Vec<u8> {
    let mut c = [0u8; 10];
    c[0] = 0x5E;
    c[1] = sa;
    c[7..9].copy_from_slice(&4096u16.to_be_bytes());
    let r = rig.run(&c, n, 4096, None);
    r.assert_good();
    r.data
}

fn write_status(rig: &Rig, n: &Nexus) -> u8 {
    rig.write10(n, 0, &pattern(1, 512, 1), 0).status
}

fn read_status(rig: &Rig, n: &Nexus) -> u8 {
    rig.read10(n, 0, 1).status
}

const REGISTER: u8 = 0;
const RESERVE: u8 = 1;
const RELEASE: u8 = 2;
const CLEAR: u8 = 3;
const PREEMPT: u8 = 4;
const WRITE_EXCLUSIVE: u8 = 1;
const EXCLUSIVE_ACCESS: u8 = 3;
const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;

#[test]
fn persistent_reservation_conflicts_follow_the_type() {
    let (rig, a, b) = rig();
    prout(&rig, &a, REGISTER, 0, 0, 0xA).assert_good();
    prout(&rig, &b, REGISTER, 0, 0, 0xB).assert_good();
    // Registering again with a wrong key conflicts.
    assert_eq!(prout(&rig, &b, REGISTER, 0, 0x99, 0xC).status, status::RESERVATION_CONFLICT);
    let keys = prin(&rig, &a, 0);
    assert_eq!(&keys[4..8], &16u32.to_be_bytes());
    assert_eq!(&keys[8..16], &0xAu64.to_be_bytes());
    assert_eq!(&keys[16..24], &0xBu64.to_be_bytes());
    let generation = u32::from_be_bytes(keys[0..4].try_into().unwrap());
    assert_eq!(generation, 2);

    // Nothing is reserved yet: B writes.
    assert_eq!(write_status(&rig, &b), status::GOOD);
    prout(&rig, &a, RESERVE, WRITE_EXCLUSIVE, 0xA, 0).assert_good();
    let r = prin(&rig, &b, 1);
    assert_eq!(&r[4..8], &16u32.to_be_bytes());
    assert_eq!(&r[8..16], &0xAu64.to_be_bytes());
    assert_eq!(r[21], WRITE_EXCLUSIVE);
    // Write exclusive: B reads but may not write; A does both.
    assert_eq!(read_status(&rig, &b), status::GOOD);
    assert_eq!(write_status(&rig, &b), status::RESERVATION_CONFLICT);
    assert_eq!(write_status(&rig, &a), status::GOOD);
    assert_eq!(rig.run(&[0; 6], &b, 0, None).status, status::GOOD, "TEST UNIT READY is allowed");
    // B cannot take it, nor use RESERVE(6).
    assert_eq!(prout(&rig, &b, RESERVE, WRITE_EXCLUSIVE, 0xB, 0).status, status::RESERVATION_CONFLICT);
    assert_eq!(rig.run(&[0x16, 0, 0, 0, 0, 0], &b, 0, None).status, status::RESERVATION_CONFLICT);
    // Releasing with another type is an error; B releasing is a no-op.
    prout(&rig, &a, RELEASE, EXCLUSIVE_ACCESS, 0xA, 0).assert_check(0x5, 0x26, 0x04);
    prout(&rig, &b, RELEASE, WRITE_EXCLUSIVE, 0xB, 0).assert_good();
    assert_eq!(write_status(&rig, &b), status::RESERVATION_CONFLICT);

    // B preempts A's key and holds exclusive access: A is unregistered and told.
    prout(&rig, &b, PREEMPT, EXCLUSIVE_ACCESS, 0xB, 0xA).assert_good();
    rig.run(&[0; 6], &a, 0, None).assert_check(0x6, 0x2A, 0x05);
    assert_eq!(read_status(&rig, &a), status::RESERVATION_CONFLICT);
    assert_eq!(read_status(&rig, &b), status::GOOD);
    let keys = prin(&rig, &b, 0);
    assert_eq!(&keys[4..8], &8u32.to_be_bytes(), "only B is registered");
    // Full status: one registrant, the holder, with its iSCSI TransportID.
    let full = prin(&rig, &b, 3);
    assert_eq!(&full[8..16], &0xBu64.to_be_bytes());
    assert_eq!((full[20] & 1, full[21]), (1, EXCLUSIVE_ACCESS));
    assert_eq!(&full[26..28], &1u16.to_be_bytes(), "relative target port");
    assert_eq!(full[32] & 0x3F, 5, "iSCSI TransportID");
    let id_len = u16::from_be_bytes([full[34], full[35]]) as usize;
    let id = std::str::from_utf8(&full[36..36 + id_len]).unwrap().trim_end_matches('\0');
    assert_eq!(id, &*b.initiator_port);

    // Unregistering the holder releases the reservation; A writes again.
    prout(&rig, &b, REGISTER, 0, 0xB, 0).assert_good();
    assert_eq!(&prin(&rig, &a, 1)[4..8], &0u32.to_be_bytes());
    assert_eq!(write_status(&rig, &a), status::GOOD);
}

#[test]
fn registrants_only_and_clear() {
    let (rig, a, b) = rig();
    let c = nexus("iqn.1994-05.com.example:c", 1);
    rig.clear_ua(&c);
    prout(&rig, &a, REGISTER, 0, 0, 0xA).assert_good();
    prout(&rig, &b, REGISTER, 0, 0, 0xB).assert_good();
    prout(&rig, &a, RESERVE, EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, 0xA, 0).assert_good();
    // A registered nexus has access; an unregistered one none.
    assert_eq!(read_status(&rig, &b), status::GOOD);
    assert_eq!(write_status(&rig, &b), status::GOOD);
    assert_eq!(read_status(&rig, &c), status::RESERVATION_CONFLICT);
    // Report capabilities: type mask valid, no persistence through power loss.
    let caps = prin(&rig, &c, 2);
    assert_eq!(u16::from_be_bytes([caps[0], caps[1]]), 8);
    assert_eq!(caps[2] & 0x01, 0, "PTPL_C clear");
    assert_eq!(caps[3] & 0x80, 0x80, "TMV");
    // APTPL is refused rather than ignored.
    let mut p = [0u8; 24];
    p[8..16].copy_from_slice(&0xCu64.to_be_bytes());
    p[20] = 0x01;
    let r = rig.run(&[0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0], &c, 24, Some(&p));
    r.assert_check(0x5, 0x26, 0x00);
    // CLEAR drops everything and tells the other registrants.
    prout(&rig, &b, CLEAR, 0, 0xB, 0).assert_good();
    rig.run(&[0; 6], &a, 0, None).assert_check(0x6, 0x2A, 0x03);
    assert_eq!(read_status(&rig, &c), status::GOOD);
    assert_eq!(&prin(&rig, &a, 0)[4..8], &0u32.to_be_bytes());
}

#[test]
fn reserve6_holds_until_release_or_nexus_loss() {
    let (rig, a, b) = rig();
    rig.run(&[0x16, 0, 0, 0, 0, 0], &a, 0, None).assert_good();
    assert_eq!(read_status(&rig, &b), status::RESERVATION_CONFLICT);
    assert_eq!(rig.run(&[0; 6], &b, 0, None).status, status::RESERVATION_CONFLICT);
    rig.run(&[0x12, 0, 0, 0, 36, 0], &b, 36, None).assert_good();
    // B's RELEASE(6) is GOOD and releases nothing.
    rig.run(&[0x17, 0, 0, 0, 0, 0], &b, 0, None).assert_good();
    assert_eq!(read_status(&rig, &b), status::RESERVATION_CONFLICT);
    assert_eq!(rig.run(&[0x16, 0, 0, 0, 0, 0], &b, 0, None).status, status::RESERVATION_CONFLICT);
    assert_eq!(read_status(&rig, &a), status::GOOD);
    // A's session ends: the reservation goes with it.
    rig.lun.nexus_lost(&a);
    assert_eq!(read_status(&rig, &b), status::GOOD);
    // A new session of A starts with a power-on unit attention.
    rig.run(&[0; 6], &a, 0, None).assert_check(0x6, 0x29, 0x00);
    // And RELEASE(6) by the holder.
    rig.run(&[0x16, 0, 0, 0, 0, 0], &b, 0, None).assert_good();
    assert_eq!(read_status(&rig, &a), status::RESERVATION_CONFLICT);
    rig.run(&[0x17, 0, 0, 0, 0, 0], &b, 0, None).assert_good();
    assert_eq!(read_status(&rig, &a), status::GOOD);
}

#[test]
fn a_reset_leaves_a_unit_attention_for_other_nexuses() {
    let (rig, a, b) = rig();
    rig.run(&[0x16, 0, 0, 0, 0, 0], &b, 0, None).assert_good();
    rig.lun.reset(&a);
    rig.run(&[0; 6], &a, 0, None).assert_good();
    rig.run(&[0; 6], &b, 0, None).assert_check(0x6, 0x29, 0x03);
    rig.run(&[0; 6], &b, 0, None).assert_good();
    assert_eq!(read_status(&rig, &a), status::GOOD, "the reset released RESERVE(6)");
}

/// SAM-5 6.3.3: a LUN reset by A aborts B's tasks on B's own channel
/// (TASK ABORTED: TAS is one), and the reset is over (`aborts_settled`)
/// only once B's task has ended, here when the bdev gives its IO back.
#[test]
fn a_reset_aborts_the_tasks_of_every_other_nexus() {
    let (mut rig, _m, a) = rig_over_error_bdev(1024);
    let b_ch = rig.open_channel();
    let b = nexus("iqn.1994-05.com.example:b", 1);
    while !rig.run_on(b_ch, &[0; 6], &b, 0, None).good() {}
    let data = pattern(3, 512, 1);
    hold_next(&rig, "write");
    let held = rig.submit(b_ch, rig.command(&rw10(0x2A, 0, 1, 0), &b, 512, Some(&data)));
    // B also has a command queued behind an ORDERED one.
    let mut ordered = rig.command(&[0; 6], &b, 0, None);
    ordered.attr = iscsi::scsi::TaskAttr::Ordered;
    let ordered = rig.submit(b_ch, ordered);
    rig.m.run_until_idle(20);
    let gen = rig.m.on(0, || rig.lun.reset(&a));
    // B's channel acts within a poll, with no command of its own arriving.
    rig.m.run_until_idle(20);
    assert_eq!(rig.wait(b_ch, ordered).status, status::TASK_ABORTED, "a queued task ends at once");
    assert!(!rig.lun.aborts_settled(gen), "B's write is still at the bdev");
    release(&rig);
    assert_eq!(rig.wait(b_ch, held).status, status::TASK_ABORTED);
    rig.m.run_until_idle(20);
    assert!(rig.lun.aborts_settled(gen));
    // B then learns of the reset; A, which asked for it, does not.
    rig.run_on(b_ch, &[0; 6], &b, 0, None).assert_check(0x6, 0x29, 0x03);
    rig.run(&[0; 6], &a, 0, None).assert_good();
    // A's own tasks are its transport's to end: the reset leaves them running.
    hold_next(&rig, "read");
    let mine = rig.submit(0, rig.command(&rw10(0x28, 0, 1, 0), &a, 512, None));
    rig.m.run_until_idle(20);
    let gen = rig.m.on(0, || rig.lun.reset(&a));
    rig.m.run_until_idle(20);
    assert!(rig.lun.aborts_settled(gen), "nothing of another nexus to wait for");
    release(&rig);
    assert_eq!(rig.wait(0, mine).status, status::GOOD);
}

/// CLEAR TASK SET (one task set shared by every nexus): B's task is
/// aborted and B told why (2Fh/00h); unlike a reset, RESERVE(6) stays.
#[test]
fn clear_task_set_aborts_other_nexuses_tasks_and_keeps_reservations() {
    let (mut rig, _m, a) = rig_over_error_bdev(1024);
    let b_ch = rig.open_channel();
    let b = nexus("iqn.1994-05.com.example:b", 1);
    while !rig.run_on(b_ch, &[0; 6], &b, 0, None).good() {}
    hold_next(&rig, "read");
    let held = rig.submit(b_ch, rig.command(&rw10(0x28, 0, 1, 0), &b, 512, None));
    rig.m.run_until_idle(20);
    rig.run(&[0x16, 0, 0, 0, 0, 0], &a, 0, None).assert_good();
    let gen = rig.m.on(0, || rig.lun.clear_task_set(&a));
    rig.m.run_until_idle(20);
    assert!(!rig.lun.aborts_settled(gen));
    release(&rig);
    assert_eq!(rig.wait(b_ch, held).status, status::TASK_ABORTED);
    rig.m.run_until_idle(20);
    assert!(rig.lun.aborts_settled(gen));
    rig.run_on(b_ch, &[0; 6], &b, 0, None).assert_check(0x6, 0x2F, 0x00);
    assert_eq!(rig.run_on(b_ch, &[0; 6], &b, 0, None).status, status::RESERVATION_CONFLICT, "A's RESERVE(6) holds");
    rig.run(&[0; 6], &a, 0, None).assert_good();
}

#[test]
fn preempt_and_abort_aborts_the_preempted_nexus_tasks() {
    use bdev::error::{self, ErrorCreateParams, ErrorInjectParams, ErrorResumeParams};
    let mut rig = Rig::with_bdev(|| {
        let m = std::sync::Arc::new(bdev::malloc::MallocBdev::new(malloc_props("Base0", 512, 1024)).unwrap());
        bdev::Registry::get().register(m).unwrap();
        error::create(ErrorCreateParams { base_name: "Base0".into(), uuid: None }).unwrap()
    });
    let a_ch = rig.open_channel();
    let a = nexus("iqn.1994-05.com.example:a", 1);
    let b = nexus("iqn.1994-05.com.example:b", 1);
    rig.clear_ua(&b);
    rig.run_on(a_ch, &[0; 6], &a, 0, None);
    prout(&rig, &a, REGISTER, 0, 0, 0xA).assert_good();
    prout(&rig, &b, REGISTER, 0, 0, 0xB).assert_good();
    prout(&rig, &a, RESERVE, EXCLUSIVE_ACCESS, 0xA, 0).assert_good();
    // A's READ is held at the bdev, on A's own connection.
    rig.m.on(0, || {
        error::inject(ErrorInjectParams {
            name: "EE_Base0".into(),
            io_type: "read".into(),
            error_type: "pending".into(),
            num: Some(1),
            queue_depth: None,
            corrupt_offset: None,
            corrupt_value: None,
            nvme_sct: None,
            nvme_sc: None,
        })
        .unwrap()
    });
    let held = rig.submit(a_ch, rig.command(&rw10(0x28, 0, 1, 0), &a, 512, None));
    rig.m.run_until_idle(20);
    // B preempts A and aborts its tasks: B's answer waits until A's read,
    // still at the bdev, has ended (SPC-4 5.13.11.2).
    let (c, p) = prout_cdb(5, EXCLUSIVE_ACCESS, 0xB, 0xA);
    let preempt = rig.submit(0, rig.command(&c, &b, 24, Some(&p)));
    for _ in 0..50 {
        rig.m.run_once(0);
        rig.m.advance_ns(1_000_000);
    }
    assert!(rig.channels[0].1.take(preempt).is_none(), "PREEMPT AND ABORT answered before A's read ended");
    assert!(rig.channels[a_ch].1.take(held).is_none(), "A's read is still at the bdev");
    rig.m.on(0, || error::resume_pending(ErrorResumeParams { name: "EE_Base0".into() }).unwrap());
    assert_eq!(rig.wait(a_ch, held).status, status::TASK_ABORTED);
    rig.wait(0, preempt).assert_good();
    rig.run_on(a_ch, &[0; 6], &a, 0, None).assert_check(0x6, 0x2A, 0x05);
    assert_eq!(read_status(&rig, &b), status::GOOD);
}
