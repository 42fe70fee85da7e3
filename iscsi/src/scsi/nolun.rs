//! Commands that need no logical unit: REPORT LUNS (any LUN number may
//! receive it), and the answers for a LUN that does not exist.

use super::cdb::{be32, op};
use super::channel::{residual_of, Task};
use super::sense::Check;
use super::{status, ScsiCommand, ScsiCompletion, Sense};
use bdev::DmaBuf;

/// REPORT LUNS parameter data for `luns` (single level, peripheral device
/// addressing below 256, flat space addressing above).
pub(crate) fn report_luns(cdb: &[u8; 16], luns: &[u64], out: &mut [u8]) -> Result<usize, Check> {
    if !matches!(cdb[2], 0x00 | 0x01 | 0x02 | 0x10 | 0x11 | 0x12) {
        return Err(Check::invalid_cdb(2, None));
    }
    if be32(&cdb[6..10]) < 16 {
        return Err(Check::invalid_cdb(6, None));
    }
    let mut at = 8;
    for &lun in luns.iter().filter(|&&l| l < 0x4000) {
        let entry: [u8; 2] = if lun < 256 { [0, lun as u8] } else { [0x40 | (lun >> 8) as u8, lun as u8] };
        if at + 8 <= out.len() {
            out[at..at + 2].copy_from_slice(&entry);
            out[at + 2..at + 8].fill(0);
        }
        at += 8;
    }
    out[0..4].copy_from_slice(&((at - 8) as u32).to_be_bytes());
    out[4..8].fill(0);
    Ok(at.min(out.len()))
}

/// REPORT LUNS (any LUN number may receive it), and the answer for a
/// command to a LUN that does not exist (INQUIRY: peripheral qualifier
/// 011b; REQUEST SENSE; others: CHECK CONDITION ILLEGAL REQUEST 25h/00h).
pub fn execute_without_lun(cmd: &ScsiCommand, luns: &[u64]) -> ScsiCompletion {
    let cdb = &cmd.cdb;
    let answer: Result<Option<(DmaBuf, usize)>, Check> = match cdb[0] {
        op::REPORT_LUNS => fill(|out| report_luns(cdb, luns, out)),
        op::INQUIRY => fill(|out| {
            // Peripheral qualifier 011b, device type 1Fh: no LUN here.
            out[0] = 0x7F;
            if cdb[1] & 1 != 0 {
                out[1] = cdb[2];
                return Ok(4);
            }
            out[2] = 0x06;
            out[3] = 0x12;
            out[4] = 31;
            Ok(36)
        }),
        op::REQUEST_SENSE => fill(|out| {
            let s = Check::LUN_NOT_SUPPORTED.encode(cdb[1] & 1 != 0);
            out[..s.len as usize].copy_from_slice(s.as_slice());
            Ok(s.len as usize)
        }),
        _ => Err(Check::LUN_NOT_SUPPORTED),
    };
    let mut t = Task { cdb: cmd.cdb, expected_len: cmd.expected_len, ..Task::default() };
    let (st, sense) = match answer {
        Ok(Some((buf, n))) => {
            t.buf = Some(buf);
            t.data_in_len = n as u32;
            (status::GOOD, Sense::EMPTY)
        }
        Ok(None) => (status::TASK_SET_FULL, Sense::EMPTY),
        Err(c) => (status::CHECK_CONDITION, c.encode(false)),
    };
    let (data_in, data_in_len, residual) = residual_of(&mut t, st == status::GOOD, 512);
    ScsiCompletion { tag: cmd.tag, status: st, sense, data_in, data_in_len, residual, data_out: None }
}

fn fill(f: impl FnOnce(&mut [u8]) -> Result<usize, Check>) -> Result<Option<(DmaBuf, usize)>, Check> {
    let Some(buf) = DmaBuf::alloc(65536) else { return Ok(None) };
    let n = buf.with_mut(|b| {
        b.fill(0);
        f(b)
    })?;
    Ok(Some((buf, n)))
}
