//! Every access to memory a device may read or write: BAR0 registers, the
//! SQ/CQ rings and PRP/DSM pages the controller fetches, and (for the
//! simulated controller) host memory reached by address through an IOMMU
//! model. All of it is volatile or atomic; no Rust reference to such memory
//! is ever formed (docs/architecture.md, "Device memory").
//!
//! The completion protocol, on both sides: the device writes the entry body,
//! then a Release fence, then the status word (phase tag) with one atomic
//! store; the host loads the status word, sees the phase flip, issues an
//! Acquire fence, and only then reads the body.

use bdev::dma::DmaMapper;
use nvme_spec::{Cqe, Sqe};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use zerocopy::{FromBytes, IntoBytes};

/// A controller's register file as the driver sees it: BAR0 of a real
/// controller under VFIO, or the simulated controller in-process. Offsets
/// are those of `nvme_spec::regs::offset` and the doorbell formula.
pub trait RegisterSpace: Send + Sync {
    fn read32(&self, offset: u32) -> u32;
    fn write32(&self, offset: u32, value: u32);
    /// 64-bit registers as two 32-bit accesses, low half first: every
    /// controller must accept that, not every one accepts 8-byte accesses.
    fn read64(&self, offset: u32) -> u64 {
        let lo = self.read32(offset) as u64;
        let hi = self.read32(offset + 4) as u64;
        lo | (hi << 32)
    }
    fn write64(&self, offset: u32, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
    /// Called by busy-wait loops off the reactors (the driver itself has
    /// none: it waits by polling). Real hardware: a short sleep. The
    /// simulator: one step of the model, so waits make progress
    /// deterministically. Implementations call `note_blocking_wait`.
    fn relax(&self) {
        std::hint::spin_loop();
    }
    /// Clock of those busy-wait loops, in ns. The simulator's clock advances
    /// per `relax`, which keeps a ten-second CAP.TO wait fast and exact.
    fn wait_clock_ns(&self) -> u64;
    /// Makes further DMA by the device impossible (PCI bus master off) for
    /// a controller that will not disable itself. True when that is now so.
    fn stop_dma(&self) -> bool;
    /// "PCIe 0000:00:04.0", for messages.
    fn describe(&self) -> String;
    /// Whether the platform asked for the device back while it still
    /// answers (VFIO's device request: a hot-unplug or an unbind waits for
    /// us to let go). Once true, stays true.
    fn removal_requested(&self) -> bool {
        false
    }
    /// Lets go of the device (its register mapping and file), so the
    /// platform can finish taking it away. Called once nothing touches the
    /// registers any more; accesses afterwards reach nothing.
    fn release(&self) {}
    /// MSI-X vectors the device offers (interrupt mode); 0: none.
    fn interrupt_vectors(&self) -> u16 {
        0
    }
    /// Enables MSI-X with vectors `0..count`, none of them signalling yet.
    fn enable_interrupts(&self, count: u16) -> Result<(), String> {
        Err(format!("{} cannot deliver {count} interrupt vectors", self.describe()))
    }
    /// Routes vector `vector` to `irq` (None: to nothing).
    fn set_interrupt(&self, vector: u16, irq: Option<&Arc<reactor::EventFd>>) -> Result<(), String> {
        let _ = irq;
        Err(format!("{} has no interrupt vector {vector}", self.describe()))
    }
    /// Turns MSI-X off again (detach).
    fn disable_interrupts(&self) {}
}

/// Blocking waits on the threads of one reactor set (`reactor::global`).
#[derive(Default)]
struct BlockingWaits(AtomicU64);

/// Counts a blocking wait — one step of a busy-wait loop
/// (`RegisterSpace::relax`) or a contended lock — when it happens on a
/// reactor thread. Nothing on a reactor may wait; tests assert the count
/// stays 0 (`reactor_blocking_waits`).
pub fn note_blocking_wait() {
    if reactor::current().is_some() {
        reactor::global::<BlockingWaits>().0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Blocking waits counted so far on the reactors of the current set (0 off
/// a reactor thread).
pub fn reactor_blocking_waits() -> u64 {
    if reactor::current().is_none() {
        return 0;
    }
    reactor::global::<BlockingWaits>().0.load(Ordering::Relaxed)
}

/// A controller's registers behind a switch: once the device is found gone
/// (`cut_off`), no access reaches it any more — reads answer all ones, as a
/// removed PCIe device's would, and writes go nowhere. Every path (doorbells
/// included) goes through here, so nothing touches a removed device.
pub struct Gated {
    inner: Arc<dyn RegisterSpace>,
    off: AtomicBool,
}

impl Gated {
    pub fn new(inner: Arc<dyn RegisterSpace>) -> Arc<Self> {
        Arc::new(Gated { inner, off: AtomicBool::new(false) })
    }

    pub fn cut_off(&self) {
        self.off.store(true, Ordering::Release);
    }

    pub fn is_cut_off(&self) -> bool {
        self.off.load(Ordering::Acquire)
    }
}

impl RegisterSpace for Gated {
    fn read32(&self, offset: u32) -> u32 {
        if self.is_cut_off() {
            return u32::MAX;
        }
        self.inner.read32(offset)
    }
    fn write32(&self, offset: u32, value: u32) {
        if !self.is_cut_off() {
            self.inner.write32(offset, value)
        }
    }
    fn relax(&self) {
        self.inner.relax()
    }
    fn wait_clock_ns(&self) -> u64 {
        self.inner.wait_clock_ns()
    }
    fn stop_dma(&self) -> bool {
        // A device that is gone does no DMA.
        self.is_cut_off() || self.inner.stop_dma()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn removal_requested(&self) -> bool {
        !self.is_cut_off() && self.inner.removal_requested()
    }
    fn release(&self) {
        self.inner.release()
    }
    fn interrupt_vectors(&self) -> u16 {
        self.inner.interrupt_vectors()
    }
    fn enable_interrupts(&self, count: u16) -> Result<(), String> {
        self.inner.enable_interrupts(count)
    }
    fn set_interrupt(&self, vector: u16, irq: Option<&Arc<reactor::EventFd>>) -> Result<(), String> {
        if self.is_cut_off() && irq.is_some() {
            return Err(format!("{} is gone", self.inner.describe()));
        }
        self.inner.set_interrupt(vector, irq)
    }
    fn disable_interrupts(&self) {
        self.inner.disable_interrupts()
    }
}

/// A mapped BAR: device registers reached only by volatile accesses.
pub struct Bar {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a BAR mapping is device memory shared with hardware; every access
// is a volatile read/write of a naturally aligned word, which is what the
// device expects from any thread. Who writes which register is governed by
// the driver's own locking (admin mutex, one qpair per reactor).
unsafe impl Send for Bar {}
// SAFETY: as for Send.
unsafe impl Sync for Bar {}

impl Bar {
    /// # Safety
    /// `base..base+len` must be a live mapping of device registers that
    /// outlives this value (the VFIO device unmaps it on drop).
    pub(crate) unsafe fn new(base: NonNull<u8>, len: usize) -> Self {
        Bar { base, len }
    }

    fn word(&self, offset: u32) -> Option<*mut u32> {
        let off = offset as usize;
        if !off.is_multiple_of(4) || off.checked_add(4).is_none_or(|end| end > self.len) {
            return None;
        }
        // SAFETY: off+4 <= len, so the pointer stays inside the mapping.
        Some(unsafe { self.base.as_ptr().add(off) }.cast::<u32>())
    }

    pub fn read32(&self, offset: u32) -> u32 {
        match self.word(offset) {
            // SAFETY: in bounds and 4-byte aligned (checked by `word`); a
            // volatile load of device memory with no Rust reference formed.
            Some(p) => unsafe { p.read_volatile() },
            None => u32::MAX,
        }
    }

    pub fn write32(&self, offset: u32, value: u32) {
        if let Some(p) = self.word(offset) {
            // SAFETY: as in read32; a volatile store of one register.
            unsafe { p.write_volatile(value) }
        }
    }

    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Host-side view of a ring or page the controller reads or writes: a raw
/// base address (IOVA == VA) and a length. Created from a `DmaBuf` that its
/// owner keeps alive for as long as this view and the device may use it.
#[derive(Clone, Copy, Debug)]
pub struct DeviceMem {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a plain address range; every access is volatile/atomic and the
// owner serializes host-side writers (admin mutex, or the owning reactor).
unsafe impl Send for DeviceMem {}
// SAFETY: as for Send.
unsafe impl Sync for DeviceMem {}

impl DeviceMem {
    /// A view of `buf`. The caller keeps `buf` (or a clone) alive while the
    /// view or the device uses the memory.
    pub fn of(buf: &bdev::DmaBuf) -> Self {
        let base = NonNull::new(buf.as_mut_ptr()).unwrap_or(NonNull::dangling());
        DeviceMem { base, len: buf.len() }
    }

    pub fn iova(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn at(&self, off: usize, n: usize, align: usize) -> Option<*mut u8> {
        if off.checked_add(n).is_none_or(|end| end > self.len) || !(self.iova() as usize + off).is_multiple_of(align) {
            return None;
        }
        // SAFETY: off+n <= len: inside the buffer this view was made from.
        Some(unsafe { self.base.as_ptr().add(off) })
    }

    /// Zeroes the whole range (a CQ before (re)creation: phase tags 0).
    pub fn zero(&self) {
        for i in 0..self.len / 8 {
            self.write_u64(i * 8, 0);
        }
    }

    /// Writes a little-endian u64 at `off` (8-byte aligned): PRP list
    /// entries, DSM ranges. Out-of-range writes are dropped (a driver bug,
    /// caught by the debug assertion).
    pub fn write_u64(&self, off: usize, v: u64) {
        debug_assert!(self.at(off, 8, 8).is_some(), "DeviceMem write out of range");
        if let Some(p) = self.at(off, 8, 8) {
            // SAFETY: in bounds and aligned (checked); volatile store into
            // memory the device may read, no reference formed.
            unsafe { p.cast::<u64>().write_volatile(v.to_le()) }
        }
    }

    /// Writes SQE `index` of a submission ring (64-byte entries).
    pub fn write_sqe(&self, index: usize, sqe: &Sqe) {
        let bytes = sqe.as_bytes();
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            self.write_u64(index * 64 + i * 8, u64::from_le_bytes(w));
        }
    }

    /// The phase tag of CQE `index`, then (if it equals `phase`) an Acquire
    /// fence and the entry. None while the slot still holds an old entry.
    pub fn read_cqe_if_phase(&self, index: usize, phase: bool) -> Option<Cqe> {
        let status = self.load_u16(index * 16 + 14)?;
        if (status & 1 != 0) != phase {
            return None;
        }
        fence(Ordering::Acquire);
        let p = self.at(index * 16, 16, 8)?;
        // SAFETY: in bounds and aligned (checked by `at`); volatile loads of
        // an entry the device finished writing (phase observed above, fence).
        let (a, b) = unsafe { (p.cast::<u64>().read_volatile(), p.cast::<u64>().add(1).read_volatile()) };
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&a.to_ne_bytes());
        bytes[8..].copy_from_slice(&b.to_ne_bytes());
        let mut cqe = Cqe::read_from_bytes(&bytes).ok()?;
        // The body was read after the status word; use the status observed
        // first so the phase tag is the one the fence paired with.
        cqe.status = nvme_spec::U16::new(status);
        Some(cqe)
    }

    fn load_u16(&self, off: usize) -> Option<u16> {
        let p = self.at(off, 2, 2)?;
        // SAFETY: in bounds and 2-byte aligned (checked); the status word is
        // only ever accessed atomically by host and (simulated) device, and
        // the memory lives as long as the owning DmaBuf.
        Some(u16::from_le(unsafe { AtomicU16::from_ptr(p.cast::<u16>()) }.load(Ordering::Relaxed)))
    }

    /// Copies out `dst.len()` bytes at `off` (identify data after its
    /// command completed). False when out of range.
    pub fn read_bytes(&self, off: usize, dst: &mut [u8]) -> bool {
        let Some(p) = self.at(off, dst.len(), 1) else {
            return false;
        };
        for (i, d) in dst.iter_mut().enumerate() {
            // SAFETY: off+i < off+len <= self.len (checked by `at`).
            *d = unsafe { p.add(i).read_volatile() };
        }
        true
    }
}

/// Why a simulated DMA access failed: the address is not mapped in the
/// IOMMU model (a real system would raise an IOMMU fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaFault {
    pub addr: u64,
    pub len: usize,
}

/// The simulated controller's IOMMU: the set of DMA arenas announced by
/// `bdev::dma` (it registers as a `DmaMapper`, as the VFIO container does),
/// and checked copies to and from them by address.
///
/// Soundness: an address range is only touched after it was found inside a
/// mapped arena, and `bdev::dma` never unmaps arenas (they live for the
/// process), so every access hits live memory. Bytes are copied raw; no
/// Rust reference to host buffer memory exists here.
#[derive(Default)]
pub struct DmaWindow {
    ranges: RwLock<Vec<(u64, u64)>>,
}

impl DmaWindow {
    fn check(&self, addr: u64, len: usize) -> Result<*mut u8, DmaFault> {
        let fault = DmaFault { addr, len };
        let end = addr.checked_add(len as u64).ok_or(fault)?;
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        if ranges.iter().any(|&(a, l)| addr >= a && end <= a + l) && addr != 0 {
            Ok(addr as *mut u8)
        } else {
            Err(fault)
        }
    }

    /// Device read of host memory (an SQE, a PRP list, write data).
    pub fn read(&self, addr: u64, dst: &mut [u8]) -> Result<(), DmaFault> {
        let p = self.check(addr, dst.len())?;
        // SAFETY: the range lies in a live, mapped arena (checked); `dst` is
        // the simulator's own memory, distinct from any arena.
        unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Device write of host memory (read data, identify data).
    pub fn write(&self, addr: u64, src: &[u8]) -> Result<(), DmaFault> {
        let p = self.check(addr, src.len())?;
        // SAFETY: as in `read`, in the other direction.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
        Ok(())
    }

    /// Posts a completion: body, Release fence, then the status word (with
    /// the phase tag) in one atomic store — the order a real controller's
    /// single posted write guarantees.
    pub fn post_cqe(&self, addr: u64, cqe: &Cqe) -> Result<(), DmaFault> {
        if !addr.is_multiple_of(16) {
            return Err(DmaFault { addr, len: 16 });
        }
        let p = self.check(addr, 16)?;
        let bytes = cqe.as_bytes();
        // SAFETY: in a mapped arena (checked); copying the first 14 bytes
        // raw, the host does not read them before it sees the new phase.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, 14) };
        fence(Ordering::Release);
        // SAFETY: addr is 16-byte aligned, so addr+14 is 2-byte aligned and
        // inside the checked range; the host accesses this word atomically.
        unsafe { AtomicU16::from_ptr(p.add(14).cast::<u16>()) }.store(cqe.status.get().to_le(), Ordering::Relaxed);
        Ok(())
    }
}

impl DmaMapper for DmaWindow {
    fn map(&self, vaddr: u64, len: u64) -> Result<(), String> {
        self.ranges.write().unwrap_or_else(|e| e.into_inner()).push((vaddr, len));
        Ok(())
    }
    fn unmap(&self, vaddr: u64, len: u64) {
        self.ranges.write().unwrap_or_else(|e| e.into_inner()).retain(|&r| r != (vaddr, len));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvme_spec::Status;

    #[test]
    fn cqe_round_trip_through_the_window() {
        let w = std::sync::Arc::new(DmaWindow::default());
        let m: std::sync::Arc<dyn DmaMapper> = w.clone();
        bdev::dma::register_mapper(m.clone()).unwrap();
        let buf = bdev::DmaBuf::alloc(4096).unwrap();
        let mem = DeviceMem::of(&buf);
        mem.zero();
        assert!(mem.read_cqe_if_phase(1, true).is_none());
        let mut cqe = Cqe::new(77, Status::SUCCESS);
        cqe.set_phase(true);
        w.post_cqe(buf.iova() + 16, &cqe).unwrap();
        let got = mem.read_cqe_if_phase(1, true).unwrap();
        assert_eq!(got.cid.get(), 77);
        assert!(w.read(1, &mut [0u8; 4]).is_err(), "unmapped address faults");
        bdev::dma::unregister_mapper(&m);
    }
}
