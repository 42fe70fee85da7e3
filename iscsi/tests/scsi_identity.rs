//! Identification, capacity and mode data of a LUN, byte by byte against
//! SPC-5 / SBC-4; unit attentions at a nexus's first command; REQUEST
//! SENSE; REPORT LUNS and the answers for a LUN that does not exist.

mod scsi_support;

use bdev::Registry;
use iscsi::scsi::{execute_without_lun, status, Residual};
use scsi_support::*;
use std::sync::Arc;

const BLOCKS: u64 = 2048;

fn rig() -> (Rig, iscsi::scsi::Nexus) {
    let rig = Rig::malloc(BLOCKS);
    let n = nexus("iqn.1994-05.com.example:a", 1);
    rig.clear_ua(&n);
    (rig, n)
}

#[test]
fn first_command_of_a_nexus_reports_power_on_then_runs() {
    let rig = Rig::malloc(BLOCKS);
    let a = nexus("iqn.1994-05.com.example:a", 1);
    // INQUIRY runs regardless of a pending unit attention, and keeps it.
    rig.run(&[0x12, 0, 0, 0, 36, 0], &a, 36, None).assert_good();
    rig.run(&[0; 6], &a, 0, None).assert_check(0x6, 0x29, 0x00);
    rig.run(&[0; 6], &a, 0, None).assert_good();
    // Another nexus has its own.
    let b = nexus("iqn.1994-05.com.example:a", 2);
    let r = rig.run(&[0x03, 0, 0, 0, 252, 0], &b, 252, None);
    r.assert_good();
    assert_eq!(r.data.len(), 18);
    assert_eq!((r.data[0], r.data[2], r.data[12], r.data[13]), (0x70, 0x6, 0x29, 0x00), "REQUEST SENSE reports the UA");
    assert_eq!(r.residual, Residual::Under(252 - 18));
    rig.run(&[0; 6], &b, 0, None).assert_good();
    // REQUEST SENSE with nothing pending: NO SENSE.
    let r = rig.run(&[0x03, 0, 0, 0, 18, 0], &b, 18, None);
    assert_eq!((r.data[2], r.data[12]), (0, 0));
}

#[test]
fn standard_inquiry() {
    let (rig, n) = rig();
    let r = rig.run(&[0x12, 0, 0, 0, 255, 0], &n, 255, None);
    r.assert_good();
    let d = &r.data;
    assert_eq!(d.len(), 66);
    assert_eq!(d[0], 0x00, "connected direct-access block device");
    assert_eq!(d[2], 0x06, "SPC-4");
    assert_eq!(d[3] & 0x0F, 2, "response data format");
    assert_eq!(d[4] as usize, d.len() - 5, "additional length");
    assert_eq!(d[7] & 0x02, 0x02, "CMDQUE");
    assert_eq!(&d[8..16], b"NVRAID  ");
    assert_eq!(&d[16..32], b"Malloc disk     ");
    assert!(d[32..36].iter().all(|c| c.is_ascii_graphic()));
    assert_eq!(&d[58..60], &[0x00, 0xA0], "SAM-5 version descriptor");
    assert_eq!(r.residual, Residual::Under(255 - 66));
    // Allocation length clips the data.
    let r = rig.run(&[0x12, 0, 0, 0, 36, 0], &n, 36, None);
    assert_eq!((r.data.len(), r.residual), (36, Residual::None));
    // Expected length below the allocation length: overflow.
    let r = rig.run(&[0x12, 0, 0, 0, 96, 0], &n, 36, None);
    assert_eq!((r.data.len(), r.residual), (36, Residual::Over(60)));
    // A page code without EVPD, and CMDDT: invalid field with a pointer.
    let r = rig.run(&[0x12, 0, 0x80, 0, 255, 0], &n, 255, None);
    r.assert_check(0x5, 0x24, 0x00);
    assert_eq!(&r.sense[15..18], &[0xC0, 0, 2], "field pointer: CDB byte 2");
    rig.run(&[0x12, 0x02, 0, 0, 255, 0], &n, 255, None).assert_check(0x5, 0x24, 0x00);
}

fn vpd(rig: &Rig, n: &iscsi::scsi::Nexus, page: u8) -> Vec<u8> {
    let r = rig.run(&[0x12, 1, page, 0x10, 0, 0], n, 4096, None);
    r.assert_good();
    assert_eq!((r.data[0], r.data[1]), (0, page));
    assert_eq!(u16::from_be_bytes([r.data[2], r.data[3]]) as usize, r.data.len() - 4, "page length");
    r.data
}

#[test]
fn vital_product_data_pages() {
    let (rig, n) = rig();
    assert_eq!(&vpd(&rig, &n, 0x00)[4..], &[0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    let uuid = rig.lun.bdev().props().uuid.simple().to_string();
    assert_eq!(&vpd(&rig, &n, 0x80)[4..], uuid.as_bytes());

    // Device identification: walk the designators.
    let d = vpd(&rig, &n, 0x83);
    let mut at = 4;
    let mut seen = Vec::new();
    while at < d.len() {
        let (code_set, piv_assoc_type, len) = (d[at] & 0xF, d[at + 1], d[at + 3] as usize);
        let body = &d[at + 4..at + 4 + len];
        let (assoc, dtype) = ((piv_assoc_type >> 4) & 3, piv_assoc_type & 0xF);
        if assoc == 1 {
            assert_eq!(d[at] >> 4, 5, "protocol identifier iSCSI on a port designator");
            assert_eq!(piv_assoc_type & 0x80, 0x80, "PIV");
        }
        match (assoc, dtype) {
            (0, 3) => {
                assert_eq!((code_set, len), (1, 8));
                assert_eq!(body[0] >> 4, 3, "NAA locally assigned");
            }
            (0, 1) => {
                assert_eq!(code_set, 2);
                assert_eq!(&body[..8], b"NVRAID  ");
            }
            (1, 4) => assert_eq!(body, &[0, 0, 0, 1], "relative target port 1"),
            (1, 8) => {
                assert_eq!(code_set, 3);
                assert_eq!(len % 4, 0);
                let s = std::str::from_utf8(body).unwrap().trim_end_matches('\0');
                assert_eq!(s, format!("{TARGET},t,0x0001"));
            }
            (2, 8) => {
                let s = std::str::from_utf8(body).unwrap().trim_end_matches('\0');
                assert_eq!(s, TARGET);
            }
            other => panic!("unexpected designator {other:?}"),
        }
        seen.push((assoc, dtype));
        at += 4 + len;
    }
    assert_eq!(at, d.len());
    assert_eq!(seen, vec![(0, 3), (0, 1), (1, 4), (1, 8), (2, 8)]);

    // Block limits: maximum transfer length fits one 8 MiB buffer; UNMAP limits.
    let b0 = vpd(&rig, &n, 0xB0);
    assert_eq!(b0.len(), 64);
    assert_eq!(u32::from_be_bytes(b0[8..12].try_into().unwrap()), (8 << 20) / 512);
    assert_eq!(b0[5], 255, "MAXIMUM COMPARE AND WRITE LENGTH");
    assert_eq!(u32::from_be_bytes(b0[24..28].try_into().unwrap()), 256, "unmap descriptors");
    assert_eq!(u64::from_be_bytes(b0[36..44].try_into().unwrap()), (8 << 20) / 512, "MAXIMUM WRITE SAME LENGTH");
    // Block device characteristics: non-rotating.
    let b1 = vpd(&rig, &n, 0xB1);
    assert_eq!(u16::from_be_bytes([b1[4], b1[5]]), 1);
    // Logical block provisioning: malloc unmaps and reads zeroes back.
    let b2 = vpd(&rig, &n, 0xB2);
    assert_eq!(b2[5], 0x80 | 0x40 | 0x20 | 0x04, "LBPU LBPWS LBPWS10 LBPRZ");
    assert_eq!(b2[6] & 0x7, 2, "thin provisioned");
    // An unknown page.
    rig.run(&[0x12, 1, 0x99, 0, 255, 0], &n, 255, None).assert_check(0x5, 0x24, 0x00);
}

/// A bdev that grows under its LUN (a null bdev resized, as
/// `bdev_null_resize` does): READ CAPACITY answers the new size, IO past
/// the old end works, and every nexus gets unit attention 2Ah/09h
/// CAPACITY DATA HAS CHANGED once. The LUN holds the bdev open, so a
/// shrink is refused.
#[test]
fn a_grown_bdev_changes_the_capacity_with_a_unit_attention() {
    let rig = Rig::with_bdev(|| {
        let b = bdev::malloc::NullBdev::new(malloc_props("Null0", 512, BLOCKS)).unwrap();
        Registry::get().register(Arc::new(b)).unwrap()
    });
    let (a, b) = (nexus("iqn.1994-05.com.example:a", 1), nexus("iqn.1994-05.com.example:b", 1));
    rig.clear_ua(&a);
    rig.clear_ua(&b);
    rig.read10(&a, BLOCKS as u32, 1).assert_check(0x5, 0x21, 0x00);
    rig.lun.bdev().notify_blockcnt_change(2 * BLOCKS).unwrap();
    for n in [&a, &b] {
        rig.run(&[0; 6], n, 0, None).assert_check(0x6, 0x2A, 0x09);
        rig.run(&[0; 6], n, 0, None).assert_good();
    }
    let r = rig.run(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &a, 8, None);
    assert_eq!(r.data, [(2 * BLOCKS as u32 - 1).to_be_bytes(), 512u32.to_be_bytes()].concat());
    rig.read10(&a, BLOCKS as u32, 1).assert_good();
    let e = rig.lun.bdev().notify_blockcnt_change(BLOCKS).unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
}

#[test]
fn read_capacity() {
    let (rig, n) = rig();
    let r = rig.run(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &n, 8, None);
    r.assert_good();
    assert_eq!(r.data, [(BLOCKS as u32 - 1).to_be_bytes(), 512u32.to_be_bytes()].concat());
    let mut c = [0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x10;
    c[13] = 32;
    let r = rig.run(&c, &n, 32, None);
    r.assert_good();
    assert_eq!(r.data.len(), 32);
    assert_eq!(u64::from_be_bytes(r.data[0..8].try_into().unwrap()), BLOCKS - 1);
    assert_eq!(u32::from_be_bytes(r.data[8..12].try_into().unwrap()), 512);
    assert_eq!(r.data[14] & 0xC0, 0xC0, "LBPME and LBPRZ");
    // An LBA without PMI is an invalid field.
    rig.run(&[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], &n, 8, None).assert_check(0x5, 0x24, 0);
}

#[test]
fn mode_sense_shows_pages_and_write_cache_truthfully() {
    let (rig, n) = rig();
    // MODE SENSE(6), all pages, with block descriptor.
    let r = rig.run(&[0x1A, 0, 0x3F, 0, 255, 0], &n, 255, None);
    r.assert_good();
    let d = &r.data;
    assert_eq!(d[0] as usize, d.len() - 1, "mode data length");
    assert_eq!(d[2] & 0x10, 0x10, "DPOFUA");
    assert_eq!(d[3], 8, "block descriptor length");
    assert_eq!(u32::from_be_bytes([0, d[5], d[6], d[7]]), BLOCKS as u32);
    assert_eq!(u32::from_be_bytes([0, d[9], d[10], d[11]]), 512);
    let pages = &d[12..];
    assert_eq!((pages[0], pages[1]), (0x08, 0x12));
    assert_eq!(pages[2] & 0x04, 0, "malloc has no volatile cache: WCE clear");
    assert_eq!((pages[20], pages[21]), (0x0A, 0x0A));
    assert_eq!((pages[32], pages[33]), (0x1C, 0x0A));
    assert_eq!(pages.len(), 20 + 12 + 12);
    // MODE SENSE(10), caching page only, no block descriptor, changeable values.
    let r = rig.run(&[0x5A, 0x08, 0x48, 0, 0, 0, 0, 0, 255, 0], &n, 255, None);
    r.assert_good();
    assert_eq!(u16::from_be_bytes([r.data[0], r.data[1]]) as usize, r.data.len() - 2);
    assert_eq!(u16::from_be_bytes([r.data[6], r.data[7]]), 0);
    assert_eq!(r.data[8], 0x08);
    assert_eq!(r.data[10], 0, "WCE is not changeable without a cache");
    // Saved values are not supported.
    rig.run(&[0x1A, 0, 0xC8, 0, 255, 0], &n, 255, None).assert_check(0x5, 0x39, 0x00);
    // An unknown page.
    rig.run(&[0x1A, 0, 0x19, 0, 255, 0], &n, 255, None).assert_check(0x5, 0x24, 0x00);
}

#[test]
fn mode_select_sets_descriptor_sense_and_tells_other_nexuses() {
    let (rig, a) = rig();
    let b = nexus("iqn.1994-05.com.example:b", 1);
    rig.clear_ua(&b);
    // Control page with D_SENSE.
    let mut p = vec![0u8; 4 + 12];
    p[4] = 0x0A;
    p[5] = 0x0A;
    p[6] = 0x04;
    p[7] = 0x10;
    p[9] = 0x40; // TAS, as MODE SENSE shows it
    p[12..14].copy_from_slice(&0xFFFFu16.to_be_bytes());
    rig.run(&[0x15, 0x10, 0, 0, p.len() as u8, 0], &a, p.len() as u32, Some(&p)).assert_good();
    // Errors now come in descriptor format.
    let r = rig.run(&rw10(0x28, BLOCKS as u32, 1, 0), &a, 512, None);
    assert_eq!(r.sense[0], 0x72);
    r.assert_check(0x5, 0x21, 0x00);
    // The other nexus learns of the change.
    rig.run(&[0; 6], &b, 0, None).assert_check(0x6, 0x2A, 0x01);
    // Changing what is not changeable: invalid field in the parameter list.
    p[7] = 0x00;
    let r = rig.run(&[0x15, 0x10, 0, 0, p.len() as u8, 0], &a, p.len() as u32, Some(&p));
    r.assert_check(0x5, 0x26, 0x00);
}

#[test]
fn report_luns_and_a_lun_that_does_not_exist() {
    let (rig, n) = rig();
    let cmd = rig.command(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &n, 256, None);
    let r = rig.m.on(0, || reply(execute_without_lun(&cmd, &[0, 1, 300])));
    r.assert_good();
    assert_eq!(&r.data[0..4], &24u32.to_be_bytes());
    assert_eq!(&r.data[8..10], &[0, 0]);
    assert_eq!(&r.data[16..18], &[0, 1]);
    assert_eq!(&r.data[24..26], &[0x41, 0x2C], "flat addressing above 255");
    assert_eq!(r.residual, Residual::Under(256 - 32));
    // Allocation length below 16.
    let cmd = rig.command(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], &n, 8, None);
    rig.m.on(0, || reply(execute_without_lun(&cmd, &[0]))).assert_check(0x5, 0x24, 0);
    // INQUIRY to a missing LUN: qualifier 011b, type 1Fh.
    let cmd = rig.command(&[0x12, 0, 0, 0, 96, 0], &n, 96, None);
    let r = rig.m.on(0, || reply(execute_without_lun(&cmd, &[0])));
    assert_eq!((r.status, r.data[0]), (status::GOOD, 0x7F));
    // Anything else: LOGICAL UNIT NOT SUPPORTED.
    let cmd = rig.command(&[0; 6], &n, 0, None);
    rig.m.on(0, || reply(execute_without_lun(&cmd, &[0]))).assert_check(0x5, 0x25, 0);
}

#[test]
fn report_supported_operation_codes() {
    let (rig, n) = rig();
    let mut c = [0u8; 12];
    c[0] = 0xA3;
    c[1] = 0x0C;
    c[6..10].copy_from_slice(&65536u32.to_be_bytes());
    let r = rig.run(&c, &n, 65536, None);
    r.assert_good();
    let len = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, r.data.len());
    let descs: Vec<(u8, u16, u16)> = r.data[4..]
        .chunks(8)
        .map(|d| (d[0], u16::from_be_bytes([d[2], d[3]]), u16::from_be_bytes([d[6], d[7]])))
        .collect();
    assert!(descs.contains(&(0x28, 0, 10)));
    assert!(descs.contains(&(0x9E, 0x10, 16)));
    assert!(descs.contains(&(0x89, 0, 16)));
    // Every reported command is served: none answers INVALID OPERATION CODE.
    for &(op, sa, cdb_len) in &descs {
        let mut cdb = vec![0u8; cdb_len as usize];
        cdb[0] = op;
        if sa != 0 || matches!(op, 0x5E | 0x5F | 0x9E | 0xA3) {
            cdb[1] = sa as u8;
        }
        let r = rig.run(&cdb, &n, 0, None);
        assert!(
            !(r.status == status::CHECK_CONDITION && r.sense_code() == (0x5, 0x20, 0)),
            "{op:#x}/{sa:#x} is reported but refused"
        );
    }
    // One command: READ(10) is supported with a 10-byte usage map.
    c[2] = 1;
    c[3] = 0x28;
    let r = rig.run(&c, &n, 65536, None);
    assert_eq!((r.data[1] & 7, u16::from_be_bytes([r.data[2], r.data[3]])), (3, 10));
    assert_eq!(r.data[4], 0x28);
    // An opcode not served.
    c[3] = 0xE7;
    let r = rig.run(&c, &n, 65536, None);
    assert_eq!(r.data[1] & 7, 1);
    // Task management functions.
    let r = rig.run(&[0xA3, 0x0D, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0], &n, 4, None);
    r.assert_good();
    assert_eq!((r.data[0], r.data[1]), (0xDA, 0), "ATS ATSS CTSS LURS TRS, as the transport carries out");
}

#[test]
fn unknown_opcode_is_refused() {
    let (rig, n) = rig();
    rig.run(&[0xE7, 0, 0, 0, 0, 0], &n, 0, None).assert_check(0x5, 0x20, 0x00);
}
