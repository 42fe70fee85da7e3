//! Data pointers of a command: PRP entries and chained PRP lists (NVMe base
//! 2.0 §4.1.1), and the single-descriptor SGL used when the controller
//! supports SGLs. Pure arithmetic; the caller writes list entries into
//! device-visible memory through the sink it passes.

/// Memory page size the driver runs the controller with (CC.MPS = 0).
pub const PAGE_SIZE: u64 = 4096;
/// PRP entries in one list page.
pub const ENTRIES_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;

/// Why a buffer cannot be described.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrpError {
    /// PRP entries must be dword aligned.
    Misaligned,
    /// More pages than the list memory holds (the caller splits first).
    TooLong,
    Empty,
}

/// Entries a chained list of `list_pages` pages can hold: every page but the
/// last gives its final slot to the pointer to the next page.
pub const fn list_capacity(list_pages: usize) -> usize {
    if list_pages == 0 {
        0
    } else {
        list_pages * ENTRIES_PER_PAGE - (list_pages - 1)
    }
}

/// Largest transfer that fits any alignment: PRP1 plus a full list, minus
/// one page for a buffer that does not start on a page boundary.
pub const fn max_transfer_bytes(list_pages: usize) -> u64 {
    list_capacity(list_pages) as u64 * PAGE_SIZE
}

/// Number of memory pages `len` bytes at `addr` touch.
pub fn pages_spanned(addr: u64, len: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    let first = addr / PAGE_SIZE;
    let last = (addr + len - 1) / PAGE_SIZE;
    last - first + 1
}

/// PRP1/PRP2 for `len` bytes at `addr`. When a list is needed its entries
/// go to `sink(byte_offset_in_list_memory, value)`; `list_iova` is the
/// device address of that memory (`list_pages` contiguous, page-aligned
/// pages).
pub fn build(
    addr: u64,
    len: u64,
    list_iova: u64,
    list_pages: usize,
    mut sink: impl FnMut(usize, u64),
) -> Result<(u64, u64), PrpError> {
    if len == 0 {
        return Err(PrpError::Empty);
    }
    if !addr.is_multiple_of(4) {
        return Err(PrpError::Misaligned);
    }
    let pages = pages_spanned(addr, len);
    let prp1 = addr;
    if pages == 1 {
        return Ok((prp1, 0));
    }
    let first_page = addr & !(PAGE_SIZE - 1);
    if pages == 2 {
        return Ok((prp1, first_page + PAGE_SIZE));
    }
    let entries = (pages - 1) as usize;
    if entries > list_capacity(list_pages) {
        return Err(PrpError::TooLong);
    }
    // Slot `s` of the list memory; the last slot of each page but the final
    // one chains to the next page.
    let mut slot = 0usize;
    for i in 0..entries {
        let in_page = slot % ENTRIES_PER_PAGE;
        let remaining = entries - i;
        if in_page == ENTRIES_PER_PAGE - 1 && remaining > 1 {
            let next_page = list_iova + ((slot / ENTRIES_PER_PAGE + 1) as u64) * PAGE_SIZE;
            sink(slot * 8, next_page);
            slot += 1;
        }
        sink(slot * 8, first_page + (i as u64 + 1) * PAGE_SIZE);
        slot += 1;
    }
    Ok((prp1, list_iova))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Walks PRPs as a controller does; returns the page addresses.
    fn walk(prp1: u64, prp2: u64, len: u64, list: &BTreeMap<u64, u64>) -> Vec<u64> {
        let mut out = vec![prp1];
        let covered = PAGE_SIZE - prp1 % PAGE_SIZE;
        if covered >= len {
            return out;
        }
        let remaining_pages = (len - covered).div_ceil(PAGE_SIZE);
        if remaining_pages == 1 {
            out.push(prp2);
            return out;
        }
        let mut entry = prp2;
        let mut left = remaining_pages;
        while left > 0 {
            let v = list[&entry];
            if entry % PAGE_SIZE == PAGE_SIZE - 8 && left > 1 {
                entry = v;
                continue;
            }
            out.push(v);
            left -= 1;
            entry += 8;
        }
        out
    }

    #[test]
    fn single_two_and_list() {
        assert_eq!(build(0x10000, 4096, 0, 1, |_, _| panic!()).unwrap(), (0x10000, 0));
        assert_eq!(build(0x10200, 512, 0, 1, |_, _| panic!()).unwrap(), (0x10200, 0));
        assert_eq!(build(0x10200, 4096, 0, 1, |_, _| panic!()).unwrap(), (0x10200, 0x11000));
        assert_eq!(build(0x10003, 4, 0, 1, |_, _| ()), Err(PrpError::Misaligned));
    }

    #[test]
    fn chained_lists_cover_every_page() {
        let list_iova = 0x4000_0000;
        for (addr, len) in [(0x100000u64, 3 << 20), (0x100200, (2 << 20) + 4096), (0x100000, 512 * 4096 + 4096)] {
            let mut list = BTreeMap::new();
            let (p1, p2) = build(addr, len, list_iova, 2, |off, v| {
                list.insert(list_iova + off as u64, v);
            })
            .unwrap();
            let pages = walk(p1, p2, len, &list);
            assert_eq!(pages.len() as u64, pages_spanned(addr, len));
            for (i, p) in pages.iter().enumerate().skip(1) {
                assert_eq!(*p, (addr & !4095) + i as u64 * 4096);
            }
        }
        assert_eq!(build(0x100000, max_transfer_bytes(1) + 8192, 0, 1, |_, _| ()), Err(PrpError::TooLong));
    }
}
