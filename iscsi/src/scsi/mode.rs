//! Mode parameters (SPC-5 7.5, SBC-4 6.5): MODE SENSE (6)/(10) and MODE
//! SELECT (6)/(10) over the caching (08h), control (0Ah) and informational
//! exceptions control (1Ch) pages. Changeable: WCE (only when the bdev has
//! a volatile cache, whose state it then shows) and D_SENSE. No saved values.

use super::cdb::{be16, op};
use super::lun::{Lun, LunState};
use super::sense::Check;
use super::Nexus;
use std::sync::atomic::Ordering;

const CACHING: u8 = 0x08;
const CONTROL: u8 = 0x0A;
const INFO_EXCEPTIONS: u8 = 0x1C;
const ALL_PAGES: u8 = 0x3F;
const PAGES: [u8; 3] = [CACHING, CONTROL, INFO_EXCEPTIONS];

#[derive(Clone, Copy, PartialEq, Eq)]
enum PageControl {
    Current,
    Changeable,
    Default,
}

/// One page's bytes (header included) and length.
fn page(lun: &Lun, code: u8, pc: PageControl) -> ([u8; 20], usize) {
    let mut p = [0u8; 20];
    match code {
        CACHING => {
            p[0] = CACHING;
            p[1] = 0x12;
            let wce = match pc {
                PageControl::Current => lun.has_write_cache && lun.wce.load(Ordering::Acquire),
                PageControl::Default => lun.has_write_cache,
                PageControl::Changeable => lun.has_write_cache,
            };
            if wce {
                p[2] |= 0x04;
            }
            (p, 20)
        }
        CONTROL => {
            p[0] = CONTROL;
            p[1] = 0x0A;
            match pc {
                PageControl::Changeable => p[2] = 0x04,
                PageControl::Current => {
                    if lun.d_sense.load(Ordering::Acquire) {
                        p[2] |= 0x04;
                    }
                    // Unrestricted reordering; TAS (byte 5 bit 6): tasks
                    // another nexus aborts (PREEMPT AND ABORT, LUN RESET)
                    // end with TASK ABORTED.
                    p[3] = 0x10;
                    p[5] = 0x40;
                    p[8..10].copy_from_slice(&0xFFFFu16.to_be_bytes());
                }
                PageControl::Default => {
                    p[3] = 0x10;
                    p[5] = 0x40;
                    p[8..10].copy_from_slice(&0xFFFFu16.to_be_bytes());
                }
            }
            (p, 12)
        }
        _ => {
            p[0] = INFO_EXCEPTIONS;
            p[1] = 0x0A;
            if pc != PageControl::Changeable {
                p[2] = 0x08; // DEXCPT: no informational exceptions reported
            }
            (p, 12)
        }
    }
}

pub(crate) fn mode_sense(lun: &Lun, cdb: &[u8; 16], out: &mut [u8]) -> Result<usize, Check> {
    let ten = cdb[0] == op::MODE_SENSE_10;
    let dbd = cdb[1] & 0x08 != 0;
    let llbaa = ten && cdb[1] & 0x10 != 0;
    let pc = match cdb[2] >> 6 {
        0 => PageControl::Current,
        1 => PageControl::Changeable,
        2 => PageControl::Default,
        _ => return Err(Check::SAVING_NOT_SUPPORTED),
    };
    let code = cdb[2] & 0x3F;
    let subpage = cdb[3];
    let codes: &[u8] = match code {
        ALL_PAGES if subpage == 0 || subpage == 0xFF => &PAGES,
        CACHING | CONTROL | INFO_EXCEPTIONS if subpage == 0 => {
            &PAGES[PAGES.iter().position(|&c| c == code).unwrap_or(0)..][..1]
        }
        _ if subpage != 0 && PAGES.contains(&code) => return Err(Check::invalid_cdb(3, None)),
        _ => return Err(Check::invalid_cdb(2, Some(5))),
    };
    let header = if ten { 8 } else { 4 };
    let mut at = header;
    // Block descriptor: the capacity and block length.
    let bd_len = if dbd {
        0
    } else if llbaa {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&lun.num_blocks().to_be_bytes());
        d[12..16].copy_from_slice(&lun.block_size.to_be_bytes());
        put(out, at, &d);
        16
    } else {
        let mut d = [0u8; 8];
        let n = lun.num_blocks().min(0xFF_FFFF) as u32;
        d[0..4].copy_from_slice(&n.to_be_bytes());
        d[0] = 0; // density code
        d[4..8].copy_from_slice(&lun.block_size.to_be_bytes());
        d[4] = 0;
        put(out, at, &d);
        8
    };
    at += bd_len;
    for &c in codes {
        let (p, n) = page(lun, c, pc);
        put(out, at, &p[..n]);
        at += n;
    }
    // Device-specific parameter: DPOFUA (DPO and FUA honoured).
    let dev_specific = 0x10;
    if ten {
        let len = (at - 2) as u16;
        put(out, 0, &len.to_be_bytes());
        put(out, 3, &[dev_specific, if llbaa { 1 } else { 0 }, 0]);
        put(out, 6, &(bd_len as u16).to_be_bytes());
    } else {
        put(out, 0, &[(at - 1).min(255) as u8, 0, dev_specific, bd_len as u8]);
    }
    Ok(at)
}

/// Applies a MODE SELECT parameter list. Unit attention MODE PARAMETERS
/// CHANGED goes to the other nexuses when something changed.
pub(crate) fn mode_select(lun: &Lun, nexus: &Nexus, cdb: &[u8; 16], params: &[u8]) -> Result<(), Check> {
    let ten = cdb[0] == op::MODE_SELECT_10;
    if cdb[1] & 0x01 != 0 {
        return Err(Check::invalid_cdb(1, Some(0)));
    }
    let list_len = if ten { usize::from(be16(&cdb[7..9])) } else { usize::from(cdb[4]) };
    if list_len == 0 {
        return Ok(());
    }
    let header = if ten { 8 } else { 4 };
    if params.len() < list_len || list_len < header {
        return Err(Check::PARAM_LIST_LENGTH_ERROR);
    }
    let params = &params[..list_len];
    let bd_len = if ten { usize::from(be16(&params[6..8])) } else { usize::from(params[3]) };
    if header + bd_len > list_len {
        return Err(Check::PARAM_LIST_LENGTH_ERROR);
    }
    if bd_len != 0 {
        // A block descriptor may only restate the block length.
        let bd = &params[header..header + bd_len];
        let len = if bd_len >= 16 {
            u32::from_be_bytes([bd[12], bd[13], bd[14], bd[15]])
        } else if bd_len == 8 {
            u32::from_be_bytes([0, bd[5], bd[6], bd[7]])
        } else {
            return Err(Check::invalid_param(if ten { 6 } else { 3 } as u16, None));
        };
        if len != lun.block_size {
            return Err(Check::invalid_param((header + bd_len - 1) as u16, None));
        }
    }
    // Validate every page before applying any.
    let mut wce = None;
    let mut d_sense = None;
    let mut at = header + bd_len;
    while at < list_len {
        if at + 2 > list_len {
            return Err(Check::PARAM_LIST_LENGTH_ERROR);
        }
        let code = params[at] & 0x3F;
        if params[at] & 0x40 != 0 || !PAGES.contains(&code) {
            return Err(Check::invalid_param(at as u16, Some(5)));
        }
        let (cur, n) = page(lun, code, PageControl::Current);
        let (changeable, _) = page(lun, code, PageControl::Changeable);
        if usize::from(params[at + 1]) + 2 != n {
            return Err(Check::invalid_param((at + 1) as u16, None));
        }
        if at + n > list_len {
            return Err(Check::PARAM_LIST_LENGTH_ERROR);
        }
        let given = &params[at..at + n];
        for i in 2..n {
            let diff = (given[i] ^ cur[i]) & !changeable[i];
            if diff != 0 {
                let bit = 7 - diff.leading_zeros() as u8;
                return Err(Check::invalid_param((at + i) as u16, Some(bit)));
            }
        }
        match code {
            CACHING => wce = Some(given[2] & 0x04 != 0),
            CONTROL => d_sense = Some(given[2] & 0x04 != 0),
            _ => {}
        }
        at += n;
    }
    let mut changed = false;
    if let Some(w) = wce {
        changed |= lun.wce.swap(w, Ordering::AcqRel) != w;
    }
    if let Some(d) = d_sense {
        changed |= lun.d_sense.swap(d, Ordering::AcqRel) != d;
    }
    if changed {
        let mut st: std::sync::MutexGuard<'_, LunState> = lun.state();
        lun.ua_for_others(&mut st, Some(nexus), Check::MODE_PARAMETERS_CHANGED);
    }
    Ok(())
}

fn put(out: &mut [u8], at: usize, bytes: &[u8]) {
    if at < out.len() {
        let n = bytes.len().min(out.len() - at);
        out[at..at + n].copy_from_slice(&bytes[..n]);
    }
}
