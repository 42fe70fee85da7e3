//! Data pointers of a command: PRP entries and chained PRP lists (NVMe base
//! 2.0 §4.1.1), and SGLs (§4.1.2) when the controller supports them: one
//! data block descriptor in the command for a contiguous buffer, or a Last
//! Segment descriptor pointing at a list of data block descriptors for data
//! in several pieces. Pure arithmetic; the caller writes list entries into
//! device-visible memory through the sink it passes.

use nvme_spec::cmd::sgl_type;
use nvme_spec::{SglDescriptor, U32, U64};

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

/// SGL descriptors that fit in list memory of `list_pages` pages (one
/// contiguous segment: the driver's list pages are contiguous).
pub const fn sgl_list_capacity(list_pages: usize) -> usize {
    list_pages * PAGE_SIZE as usize / 16
}

/// The SGL for data in `pieces` (address, length): SGL1 itself is one data
/// block descriptor for a single piece; for several, the data block
/// descriptors go to list memory (`sink(byte_offset, u64)`, at `list_iova`,
/// 16-byte aligned) as one last segment, which SGL1 points at. With
/// `dword_granular` (Identify SGLS bits 1:0 = 10b) every address and length
/// must be a multiple of 4.
pub fn build_sgl(
    pieces: &[(u64, u32)],
    list_iova: u64,
    list_pages: usize,
    dword_granular: bool,
    mut sink: impl FnMut(usize, u64),
) -> Result<SglDescriptor, PrpError> {
    if pieces.is_empty() || pieces.iter().any(|&(_, len)| len == 0) {
        return Err(PrpError::Empty);
    }
    if dword_granular && pieces.iter().any(|&(a, len)| a % 4 != 0 || len % 4 != 0) {
        return Err(PrpError::Misaligned);
    }
    if let [(addr, len)] = *pieces {
        return Ok(SglDescriptor::data_block(addr, len));
    }
    if pieces.len() > sgl_list_capacity(list_pages) || !list_iova.is_multiple_of(16) {
        return Err(PrpError::TooLong);
    }
    for (i, &(addr, len)) in pieces.iter().enumerate() {
        let d = SglDescriptor::data_block(addr, len);
        // Bytes 8..16 of a descriptor: length, 3 reserved bytes, identifier.
        sink(i * 16, d.address.get());
        sink(i * 16 + 8, d.length.get() as u64 | (d.id as u64) << 56);
    }
    Ok(SglDescriptor {
        address: U64::new(list_iova),
        length: U32::new(pieces.len() as u32 * 16),
        reserved: [0; 3],
        id: sgl_type::LAST_SEGMENT << 4,
    })
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

    #[test]
    fn sgl_one_data_block_or_a_last_segment_list() {
        let one = build_sgl(&[(0x10200, 8192)], 0, 1, true, |_, _| panic!("no list for one piece")).unwrap();
        assert_eq!(one.kind(), nvme_spec::SglKind::DataBlockAddress { address: 0x10200, length: 8192 });
        let mut list = BTreeMap::new();
        let pieces = [(0x10000u64, 4096u32), (0x30000, 512), (0x50200, 1024)];
        let d = build_sgl(&pieces, 0x9000, 1, true, |off, v| {
            list.insert(off, v);
        })
        .unwrap();
        assert_eq!((d.sgl_type(), d.address.get(), d.length.get()), (sgl_type::LAST_SEGMENT, 0x9000, 48));
        for (i, &(a, l)) in pieces.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&list[&(i * 16)].to_le_bytes());
            raw[8..].copy_from_slice(&list[&(i * 16 + 8)].to_le_bytes());
            let back = <SglDescriptor as zerocopy::FromBytes>::read_from_bytes(&raw[..]).unwrap();
            assert_eq!(back.kind(), nvme_spec::SglKind::DataBlockAddress { address: a, length: l });
        }
        assert_eq!(build_sgl(&[(0x10002, 512), (0x20000, 512)], 0x9000, 1, true, |_, _| ()), Err(PrpError::Misaligned));
        assert!(build_sgl(&[(0x10002, 510)], 0, 1, false, |_, _| ()).is_ok(), "byte granular: any alignment");
        let many = vec![(0x10000u64, 512u32); sgl_list_capacity(1) + 1];
        assert_eq!(build_sgl(&many, 0x9000, 1, false, |_, _| ()), Err(PrpError::TooLong));
        assert_eq!(build_sgl(&[], 0, 1, false, |_, _| ()), Err(PrpError::Empty));
    }
}
