//! Identification and capacity: INQUIRY (standard data and the VPD pages
//! 00h, 80h, 83h, B0h, B1h, B2h), READ CAPACITY (10)/(16), GET LBA STATUS,
//! READ DEFECT DATA (10)/(12),
//! REPORT SUPPORTED OPERATION CODES and REPORT SUPPORTED TASK MANAGEMENT
//! FUNCTIONS. Each writes its parameter data into `out` and returns the
//! full length (the caller clips to the allocation length).

use super::cdb::{be16, be32, be64, op};
use super::lun::Lun;
use super::sense::Check;
use super::Nexus;
use bdev::{DmaBuf, IoType};

/// Version descriptors claimed in standard INQUIRY data: SAM-5, iSCSI
/// (no version), SPC-4, SBC-3.
const VERSION_DESCRIPTORS: [u16; 4] = [0x00A0, 0x0960, 0x0460, 0x04C0];

const VENDOR: &[u8; 8] = b"NVRAID  ";
const PRODUCT_REVISION: &[u8; 4] = b"0001";

/// Largest transfer in blocks: one Data-In buffer of the DMA pool.
pub(crate) fn max_transfer_blocks(lun: &Lun) -> u64 {
    (DmaBuf::MAX_LEN as u64) / u64::from(lun.block_size)
}

/// Largest WRITE SAME in blocks (a count of zero means the rest of the
/// medium, bounded too): what one WRITE may cover, so that a host sizing a
/// WRITE SAME by this field can also write the range it covers.
pub(crate) fn max_write_same_blocks(lun: &Lun) -> u64 {
    max_transfer_blocks(lun)
}

/// Largest COMPARE AND WRITE in blocks (the CDB holds 8 bits; its Data-Out
/// is twice that and must fit one buffer).
pub(crate) fn max_caw_blocks(lun: &Lun) -> u64 {
    (max_transfer_blocks(lun) / 2).min(255)
}

/// Largest WRITE ATOMIC in blocks: what one bdev write carries unsplit
/// (the bdev's `max_io_blocks`, when it has one), one buffer holds, and a
/// power loss leaves whole or not at all (`atomic_write_blocks`). The
/// command is issued as that one write while it holds the range against
/// every other write of the LUN.
pub(crate) fn max_atomic_blocks(lun: &Lun) -> u64 {
    let one_io = if lun.max_io_blocks > 0 { u64::from(lun.max_io_blocks) } else { u64::MAX };
    let power_fail = u64::from(lun.bdev().props().atomic_write_blocks);
    // The CDB's TRANSFER LENGTH holds 16 bits.
    max_transfer_blocks(lun).min(one_io).min(power_fail).min(0xFFFF)
}

pub(crate) fn supports(lun: &Lun, t: IoType) -> bool {
    lun.bdev().bdev().io_type_supported(t)
}

fn put(out: &mut [u8], at: usize, bytes: &[u8]) {
    if at < out.len() {
        let n = bytes.len().min(out.len() - at);
        out[at..at + n].copy_from_slice(&bytes[..n]);
    }
}

pub(crate) fn inquiry(lun: &Lun, nexus: &Nexus, cdb: &[u8; 16], out: &mut [u8]) -> Result<usize, Check> {
    if cdb[1] & 0x02 != 0 {
        // CMDDT (obsolete): refused.
        return Err(Check::invalid_cdb(1, Some(1)));
    }
    let evpd = cdb[1] & 1 != 0;
    if !evpd {
        if cdb[2] != 0 {
            return Err(Check::invalid_cdb(2, None));
        }
        return Ok(standard(lun, out));
    }
    match cdb[2] {
        0x00 => Ok(vpd_page(out, 0x00, &[0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])),
        0x80 => {
            let serial = serial(lun);
            Ok(vpd_page(out, 0x80, &serial))
        }
        0x83 => Ok(device_identification(lun, nexus, out)),
        0xB0 => Ok(block_limits(lun, out)),
        0xB1 => {
            let mut p = [0u8; 0x3C];
            // Non-rotating medium.
            p[1] = 0x01;
            Ok(vpd_page(out, 0xB1, &p))
        }
        0xB2 => {
            let mut p = [0u8; 4];
            let unmap = supports(lun, IoType::Unmap);
            if unmap {
                // LBPU, LBPWS, LBPWS10.
                p[1] = 0x80 | 0x40 | 0x20;
                if lun.bdev().props().deallocated_reads_zeroes {
                    p[1] |= 0x01 << 2; // LBPRZ 001b
                }
                p[2] = 0x02; // thin provisioned
            }
            Ok(vpd_page(out, 0xB2, &p))
        }
        _ => Err(Check::invalid_cdb(2, None)),
    }
}

fn standard(lun: &Lun, out: &mut [u8]) -> usize {
    let mut d = [0u8; 66];
    d[0] = 0x00; // connected, direct access block device
    d[2] = 0x06; // SPC-4
    d[3] = 0x10 | 0x02; // HISUP, response data format 2
    d[4] = (d.len() - 5) as u8;
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(VENDOR);
    let mut product = [b' '; 16];
    let name = lun.bdev().props().product_name.as_bytes();
    let n = name.len().min(16);
    product[..n].copy_from_slice(&name[..n]);
    d[16..32].copy_from_slice(&product);
    d[32..36].copy_from_slice(PRODUCT_REVISION);
    for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    put(out, 0, &d);
    d.len()
}

fn vpd_page(out: &mut [u8], page: u8, body: &[u8]) -> usize {
    let head = [0x00, page, (body.len() >> 8) as u8, body.len() as u8];
    put(out, 0, &head);
    put(out, 4, body);
    4 + body.len()
}

/// The unit serial number: the bdev's UUID as 32 hex digits.
fn serial(lun: &Lun) -> [u8; 32] {
    let mut s = [0u8; 32];
    let hex = b"0123456789abcdef";
    for (i, b) in lun.bdev().props().uuid.as_bytes().iter().enumerate() {
        s[2 * i] = hex[(b >> 4) as usize];
        s[2 * i + 1] = hex[(b & 0xF) as usize];
    }
    s
}

/// Device identification (VPD 83h): the logical unit by NAA (locally
/// assigned, from the bdev UUID) and T10 vendor ID; the target port by
/// SCSI name string and relative target port; the target device by name.
fn device_identification(lun: &Lun, nexus: &Nexus, out: &mut [u8]) -> usize {
    let mut at = 4;
    let mut desc = |out: &mut [u8], head: [u8; 2], body: &[u8]| {
        // Protocol identifier 5 (iSCSI) with PIV set where the association is a port.
        let piv = (head[1] >> 4) & 3 == 1;
        let b0 = if piv { 0x50 | head[0] } else { head[0] };
        let b1 = if piv { 0x80 | head[1] } else { head[1] };
        put(out, at, &[b0, b1, 0, body.len() as u8]);
        put(out, at + 4, body);
        at += 4 + body.len();
    };
    let uuid = lun.bdev().props().uuid.as_bytes();
    // NAA 3 (locally assigned): 60 bits from the UUID.
    let mut naa = [0u8; 8];
    naa.copy_from_slice(&uuid[8..16]);
    naa[0] = 0x30 | (naa[0] & 0x0F);
    desc(out, [0x01, 0x03], &naa);
    // T10 vendor ID: vendor, then the serial.
    let mut t10 = [0u8; 40];
    t10[..8].copy_from_slice(VENDOR);
    t10[8..].copy_from_slice(&serial(lun));
    desc(out, [0x02, 0x01], &t10);
    // Relative target port (association: target port).
    let rel = nexus.relative_target_port.to_be_bytes();
    desc(out, [0x01, 0x14], &[0, 0, rel[0], rel[1]]);
    // Target port name and target device name as SCSI name strings
    // (UTF-8, NUL terminated, padded to a multiple of 4).
    let mut name = [0u8; 256];
    let n = scsi_name(&mut name, nexus.target_port.as_bytes());
    desc(out, [0x03, 0x18], &name[..n]);
    let n = scsi_name(&mut name, lun.target_name.as_bytes());
    desc(out, [0x03, 0x28], &name[..n]);
    let len = at - 4;
    put(out, 0, &[0x00, 0x83, (len >> 8) as u8, len as u8]);
    at
}

fn scsi_name(buf: &mut [u8; 256], s: &[u8]) -> usize {
    let n = s.len().min(251);
    buf[..n].copy_from_slice(&s[..n]);
    let padded = (n + 1).div_ceil(4) * 4;
    buf[n..padded].fill(0);
    padded
}

fn block_limits(lun: &Lun, out: &mut [u8]) -> usize {
    let mut p = [0u8; 0x3C];
    p[1] = max_caw_blocks(lun) as u8;
    let boundary = lun.bdev().props().optimal_io_boundary;
    p[2..4].copy_from_slice(&(boundary.min(0xFFFF) as u16).to_be_bytes());
    let max = max_transfer_blocks(lun).min(u64::from(u32::MAX)) as u32;
    p[4..8].copy_from_slice(&max.to_be_bytes());
    let optimal = if lun.max_io_blocks > 0 { lun.max_io_blocks.min(max) } else { 0 };
    p[8..12].copy_from_slice(&optimal.to_be_bytes());
    if supports(lun, IoType::Unmap) {
        p[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        p[20..24].copy_from_slice(&super::block::MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        p[24..28].copy_from_slice(&1u32.to_be_bytes());
    }
    // MAXIMUM ATOMIC TRANSFER LENGTH (page bytes 44-47); ATOMIC ALIGNMENT
    // and ATOMIC TRANSFER LENGTH GRANULARITY stay 0 (no constraint), and so
    // do the atomic boundary fields (WRITE ATOMIC with a boundary is refused).
    // MAXIMUM WRITE SAME LENGTH (page bytes 36-43).
    p[32..40].copy_from_slice(&max_write_same_blocks(lun).to_be_bytes());
    p[40..44].copy_from_slice(&(max_atomic_blocks(lun) as u32).to_be_bytes());
    put(out, 0, &[0x00, 0xB0, 0x00, 0x3C]);
    put(out, 4, &p);
    4 + p.len()
}

pub(crate) fn read_capacity_10(lun: &Lun, cdb: &[u8; 16], out: &mut [u8]) -> Result<usize, Check> {
    if cdb[8] & 1 == 0 && be32(&cdb[2..6]) != 0 {
        return Err(Check::invalid_cdb(2, None));
    }
    let last = (lun.num_blocks() - 1).min(u64::from(u32::MAX)) as u32;
    put(out, 0, &last.to_be_bytes());
    put(out, 4, &lun.block_size.to_be_bytes());
    Ok(8)
}

pub(crate) fn read_capacity_16(lun: &Lun, cdb: &[u8; 16], out: &mut [u8]) -> Result<usize, Check> {
    if cdb[14] & 1 == 0 && be64(&cdb[2..10]) != 0 {
        return Err(Check::invalid_cdb(2, None));
    }
    let mut d = [0u8; 32];
    d[0..8].copy_from_slice(&(lun.num_blocks() - 1).to_be_bytes());
    d[8..12].copy_from_slice(&lun.block_size.to_be_bytes());
    if supports(lun, IoType::Unmap) {
        d[14] = 0x80; // LBPME
        if lun.bdev().props().deallocated_reads_zeroes {
            d[14] |= 0x40; // LBPRZ
        }
    }
    put(out, 0, &d);
    Ok(32)
}

/// GET LBA STATUS: one descriptor from the start to the end of the LUN,
/// PROVISIONING STATUS 0h, which SBC-4 defines as "mapped or unknown": the
/// bdev interface (`Bdev`, `IoType`) has no query for deallocated blocks,
/// so nothing more is known to report.
pub(crate) fn get_lba_status(lun: &Lun, cdb: &[u8; 16], out: &mut [u8]) -> Result<usize, Check> {
    let start = be64(&cdb[2..10]);
    if start >= lun.num_blocks() {
        return Err(Check::LBA_OUT_OF_RANGE);
    }
    let count = (lun.num_blocks() - start).min(u64::from(u32::MAX)) as u32;
    let mut d = [0u8; 24];
    d[0..4].copy_from_slice(&20u32.to_be_bytes());
    d[8..16].copy_from_slice(&start.to_be_bytes());
    d[16..20].copy_from_slice(&count.to_be_bytes());
    d[20] = 0; // mapped or unknown
    put(out, 0, &d);
    Ok(24)
}

/// Commands reported by REPORT SUPPORTED OPERATION CODES: (opcode,
/// service action or None, CDB length).
const SUPPORTED: &[(u8, Option<u8>, u8)] = &[
    (op::TEST_UNIT_READY, None, 6),
    (op::REQUEST_SENSE, None, 6),
    (op::READ_6, None, 6),
    (op::WRITE_6, None, 6),
    (op::INQUIRY, None, 6),
    (op::MODE_SELECT_6, None, 6),
    (op::RESERVE_6, None, 6),
    (op::RELEASE_6, None, 6),
    (op::MODE_SENSE_6, None, 6),
    (op::START_STOP_UNIT, None, 6),
    (op::PREVENT_ALLOW_MEDIUM_REMOVAL, None, 6),
    (op::READ_CAPACITY_10, None, 10),
    (op::READ_10, None, 10),
    (op::WRITE_10, None, 10),
    (op::WRITE_AND_VERIFY_10, None, 10),
    (op::VERIFY_10, None, 10),
    (op::PRE_FETCH_10, None, 10),
    (op::READ_DEFECT_DATA_10, None, 10),
    (op::SYNCHRONIZE_CACHE_10, None, 10),
    (op::WRITE_SAME_10, None, 10),
    (op::UNMAP, None, 10),
    (op::MODE_SELECT_10, None, 10),
    (op::MODE_SENSE_10, None, 10),
    (op::PERSISTENT_RESERVE_IN, Some(0x00), 10),
    (op::PERSISTENT_RESERVE_IN, Some(0x01), 10),
    (op::PERSISTENT_RESERVE_IN, Some(0x02), 10),
    (op::PERSISTENT_RESERVE_IN, Some(0x03), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(0x00), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(0x01), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(0x02), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(0x03), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(0x04), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(0x05), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(0x06), 10),
    (op::READ_16, None, 16),
    (op::COMPARE_AND_WRITE, None, 16),
    (op::WRITE_16, None, 16),
    (op::ORWRITE_16, None, 16),
    (op::WRITE_AND_VERIFY_16, None, 16),
    (op::VERIFY_16, None, 16),
    (op::PRE_FETCH_16, None, 16),
    (op::SYNCHRONIZE_CACHE_16, None, 16),
    (op::WRITE_SAME_16, None, 16),
    (op::WRITE_ATOMIC_16, None, 16),
    (op::SERVICE_ACTION_IN_16, Some(op::SA_READ_CAPACITY_16), 16),
    (op::SERVICE_ACTION_IN_16, Some(op::SA_GET_LBA_STATUS), 16),
    (op::REPORT_LUNS, None, 12),
    (op::MAINTENANCE_IN, Some(op::SA_REPORT_SUPPORTED_OPCODES), 12),
    (op::MAINTENANCE_IN, Some(op::SA_REPORT_SUPPORTED_TMFS), 12),
    (op::READ_12, None, 12),
    (op::WRITE_12, None, 12),
    (op::WRITE_AND_VERIFY_12, None, 12),
    (op::VERIFY_12, None, 12),
    (op::READ_DEFECT_DATA_12, None, 12),
];

/// Whether the LUN serves this command (for commands the bdev cannot do,
/// like UNMAP on a bdev without unmap, the answer is no).
fn served(lun: &Lun, opcode: u8) -> bool {
    match opcode {
        op::UNMAP => supports(lun, IoType::Unmap),
        _ => true,
    }
}

/// CDB usage data: the bits a client may set (SPC-5 6.35.3).
fn usage(opcode: u8, sa: Option<u8>, len: u8, out: &mut [u8]) {
    let len = len as usize;
    out[..len].fill(0xFF);
    out[0] = opcode;
    if let Some(sa) = sa {
        out[1] = sa | 0xE0;
    }
    // Control byte: no NACA, no LINK.
    out[len - 1] = 0x00;
}

pub(crate) fn report_supported_opcodes(lun: &Lun, cdb: &[u8; 16], out: &mut [u8]) -> Result<usize, Check> {
    let rctd = cdb[2] & 0x80 != 0;
    let options = cdb[2] & 0x07;
    let want_op = cdb[3];
    let want_sa = be16(&cdb[4..6]);
    let timeouts = |d: &mut [u8]| {
        // Command timeouts descriptor: length 0Ah, no recommended values.
        d[..2].copy_from_slice(&10u16.to_be_bytes());
    };
    match options {
        0 => {
            let mut at = 4;
            for &(opcode, sa, len) in SUPPORTED.iter().filter(|c| served(lun, c.0)) {
                let mut d = [0u8; 20];
                d[0] = opcode;
                d[2..4].copy_from_slice(&u16::from(sa.unwrap_or(0)).to_be_bytes());
                d[5] = if sa.is_some() { 0x01 } else { 0 }; // SERVACTV
                d[6..8].copy_from_slice(&u16::from(len).to_be_bytes());
                let n = if rctd {
                    d[5] |= 0x02; // CTDP
                    timeouts(&mut d[8..20]);
                    20
                } else {
                    8
                };
                put(out, at, &d[..n]);
                at += n;
            }
            put(out, 0, &((at - 4) as u32).to_be_bytes());
            Ok(at)
        }
        1..=3 => {
            let with_sa = SUPPORTED.iter().any(|c| c.0 == want_op && c.1.is_some());
            if options == 1 && with_sa {
                return Err(Check::invalid_cdb(2, Some(0)));
            }
            if options == 2 && !with_sa && SUPPORTED.iter().any(|c| c.0 == want_op) {
                return Err(Check::invalid_cdb(2, Some(0)));
            }
            let found = SUPPORTED.iter().find(|c| {
                c.0 == want_op && served(lun, c.0) && (options == 1 || c.1.is_none_or(|s| u16::from(s) == want_sa))
            });
            let mut d = [0u8; 4 + 16 + 12];
            let mut n = 4;
            match found {
                Some(&(opcode, sa, len)) => {
                    d[1] = 0x03; // supported, as the standard says
                    d[2..4].copy_from_slice(&u16::from(len).to_be_bytes());
                    usage(opcode, sa, len, &mut d[4..4 + len as usize]);
                    n += len as usize;
                }
                None => d[1] = 0x01, // not supported
            }
            if rctd {
                d[1] |= 0x80; // CTDP
                timeouts(&mut d[n..n + 12]);
                n += 12;
            }
            put(out, 0, &d[..n]);
            Ok(n)
        }
        _ => Err(Check::invalid_cdb(2, Some(0))),
    }
}

/// READ DEFECT DATA (10)/(12) (SBC-4 5.17, 5.18): no medium of its own,
/// so no defects: the header alone, with the lists asked for marked valid
/// (and empty) in the format asked for. 111b is a reserved format.
pub(crate) fn read_defect_data(cdb: &[u8; 16], out: &mut [u8]) -> Result<usize, Check> {
    let (at, flags) = if cdb[0] == op::READ_DEFECT_DATA_10 { (2, cdb[2]) } else { (1, cdb[1]) };
    let format = flags & 0x07;
    if format == 0x07 {
        return Err(Check::invalid_cdb(at, Some(2)));
    }
    // PLISTV and GLISTV answer REQ_PLIST and REQ_GLIST (same bit positions).
    let head = flags & (0x10 | 0x08 | 0x07);
    if cdb[0] == op::READ_DEFECT_DATA_10 {
        // Byte 1, then DEFECT LIST LENGTH (bytes 2-3) = 0.
        put(out, 0, &[0, head, 0, 0]);
        Ok(4)
    } else {
        // Byte 1, GENERATION CODE 0 (not supported), DEFECT LIST LENGTH 0.
        put(out, 0, &[0, head, 0, 0, 0, 0, 0, 0]);
        Ok(8)
    }
}

/// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS: those the iSCSI transport
/// carries out — ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT
/// RESET, TARGET RESET (its warm reset). iSCSI has no I_T NEXUS RESET.
pub(crate) fn report_supported_tmfs(cdb: &[u8; 16], out: &mut [u8]) -> Result<usize, Check> {
    let extended = cdb[2] & 0x80 != 0;
    let mut d = [0u8; 16];
    d[0] = 0x80 | 0x40 | 0x10 | 0x08 | 0x02;
    if extended {
        d[3] = 0x0C; // additional data length
        put(out, 0, &d);
        Ok(16)
    } else {
        put(out, 0, &d[..4]);
        Ok(4)
    }
}
