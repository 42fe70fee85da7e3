//! VFIO: container, group and device of one PCI function, type1 IOMMU, DMA
//! mapping of every DMA arena (IOVA = VA), BAR0 mapping, PCI bus mastering,
//! and the device request notification: when the kernel wants the device
//! back (a hot-unplug, an unbind), it signals an eventfd and waits until we
//! close the device; `removal_requested` reads it and `release` lets go.
//!
//! Why our own ioctls on `libc` rather than `vfio-ioctls`/`vfio-bindings`:
//! we need ten ioctls and five small structs, all stable kernel ABI since
//! Linux 3.6; the crates pull in vmm-sys-util and KVM-oriented features we
//! would have to disable, and their wrappers still leave the unsafe mmap and
//! DMA-lifetime questions to us. Declaring the structs here keeps every
//! unsafe block in this file, next to the argument for it. The structs'
//! sizes and field offsets are asserted against the kernel ABI at compile
//! time (below the struct declarations).

use crate::mmio::{Bar, RegisterSpace};
use crate::NvmeError;
use bdev::dma::DmaMapper;
use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

const VFIO_TYPE: u64 = b';' as u64;
const fn vfio_io(nr: u64) -> u64 {
    (VFIO_TYPE << 8) | nr
}
const VFIO_GET_API_VERSION: u64 = vfio_io(100);
const VFIO_CHECK_EXTENSION: u64 = vfio_io(101);
const VFIO_SET_IOMMU: u64 = vfio_io(102);
const VFIO_GROUP_GET_STATUS: u64 = vfio_io(103);
const VFIO_GROUP_SET_CONTAINER: u64 = vfio_io(104);
const VFIO_GROUP_GET_DEVICE_FD: u64 = vfio_io(106);
const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio_io(108);
const VFIO_DEVICE_GET_IRQ_INFO: u64 = vfio_io(109);
const VFIO_DEVICE_SET_IRQS: u64 = vfio_io(110);
const VFIO_IOMMU_MAP_DMA: u64 = vfio_io(113);
const VFIO_IOMMU_UNMAP_DMA: u64 = vfio_io(114);

const VFIO_API_VERSION: i32 = 0;
const VFIO_TYPE1_IOMMU: u64 = 1;
const VFIO_TYPE1V2_IOMMU: u64 = 3;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
const VFIO_DMA_MAP_FLAG_READ: u32 = 1;
const VFIO_DMA_MAP_FLAG_WRITE: u32 = 2;
const BAR0_REGION: u32 = 0;
const CONFIG_REGION: u32 = 7;
/// vfio-pci's device request "interrupt": an eventfd the kernel signals
/// when it wants the device back (VFIO_PCI_REQ_IRQ_INDEX).
const REQ_IRQ_INDEX: u32 = 4;
const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// MSI-X: one eventfd per vector (interrupt mode; VFIO_PCI_MSIX_IRQ_INDEX).
const MSIX_IRQ_INDEX: u32 = 2;
const VFIO_IRQ_SET_DATA_NONE: u32 = 1;
/// PCI command register: memory space enable and bus master enable.
const PCI_COMMAND: u64 = 4;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

/// vfio_irq_set with one eventfd as its data.
#[repr(C)]
struct IrqSetOne {
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    fd: i32,
}

/// vfio_irq_info: how many vectors an interrupt index has.
#[repr(C)]
#[derive(Default)]
struct IrqInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    count: u32,
}

#[repr(C)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

// The kernel ABI (include/uapi/linux/vfio.h): sizes and offsets checked at
// compile time, so a field typed or ordered wrongly fails the build instead
// of handing the kernel a struct it reads differently.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<GroupStatus>() == 8);
    assert!(offset_of!(GroupStatus, flags) == 4);
    assert!(size_of::<RegionInfo>() == 32);
    assert!(offset_of!(RegionInfo, index) == 8);
    assert!(offset_of!(RegionInfo, cap_offset) == 12);
    assert!(offset_of!(RegionInfo, size) == 16);
    assert!(offset_of!(RegionInfo, offset) == 24);
    assert!(size_of::<DmaMap>() == 32);
    assert!(offset_of!(DmaMap, vaddr) == 8);
    assert!(offset_of!(DmaMap, iova) == 16);
    assert!(offset_of!(DmaMap, size) == 24);
    // vfio_iommu_type1_dma_unmap ends in a flexible array, used only with
    // flags we never set: the fixed part is what we pass.
    assert!(size_of::<DmaUnmap>() == 24);
    assert!(offset_of!(DmaUnmap, iova) == 8);
    assert!(offset_of!(DmaUnmap, size) == 16);
    // vfio_irq_set: 20 bytes, then its data (one s32 eventfd here).
    assert!(size_of::<IrqSetOne>() == 24);
    assert!(offset_of!(IrqSetOne, index) == 8);
    assert!(offset_of!(IrqSetOne, start) == 12);
    assert!(offset_of!(IrqSetOne, count) == 16);
    assert!(offset_of!(IrqSetOne, fd) == 20);
    assert!(size_of::<IrqInfo>() == 16);
    assert!(offset_of!(IrqInfo, flags) == 4);
    assert!(offset_of!(IrqInfo, index) == 8);
    assert!(offset_of!(IrqInfo, count) == 12);
};

fn os_err(what: String) -> NvmeError {
    let e = std::io::Error::last_os_error();
    NvmeError::Vfio(format!("{what}: {e}"), e.raw_os_error().unwrap_or(libc::EIO))
}

/// Maps DMA arenas into the container's IOMMU domain, IOVA = VA.
struct VfioMapper {
    container: OwnedFd,
}

impl DmaMapper for VfioMapper {
    fn map(&self, vaddr: u64, len: u64) -> Result<(), String> {
        let arg = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr,
            iova: vaddr,
            size: len,
        };
        // SAFETY: MAP_DMA reads a properly initialized `vfio_iommu_type1_dma_map`
        // that outlives the call; the range is a live mmap of ours that stays
        // mapped for the process (bdev::dma never unmaps arenas).
        let rc = unsafe { libc::ioctl(self.container.as_raw_fd(), VFIO_IOMMU_MAP_DMA as _, &arg) };
        if rc < 0 {
            return Err(format!("VFIO_IOMMU_MAP_DMA {vaddr:#x}+{len:#x}: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn unmap(&self, vaddr: u64, len: u64) {
        let arg = DmaUnmap { argsz: std::mem::size_of::<DmaUnmap>() as u32, flags: 0, iova: vaddr, size: len };
        // SAFETY: UNMAP_DMA reads (and may write back `size` into) the struct,
        // which is ours and lives across the call.
        let rc = unsafe { libc::ioctl(self.container.as_raw_fd(), VFIO_IOMMU_UNMAP_DMA as _, &arg) };
        if rc < 0 {
            tracing::warn!("VFIO_IOMMU_UNMAP_DMA {vaddr:#x}: {}", std::io::Error::last_os_error());
        }
    }
}

/// One PCI function opened through VFIO, with BAR0 mapped.
pub struct VfioDevice {
    bdf: String,
    _group: OwnedFd,
    /// None once released: the kernel can then finish taking the device.
    device: Mutex<Option<OwnedFd>>,
    bar: Bar,
    config_offset: u64,
    mapper: Arc<dyn DmaMapper>,
    t0: Instant,
    /// Signalled by the kernel when it wants the device back (None where
    /// the kernel does not offer the request notification).
    request: Option<reactor::EventFd>,
    requested: AtomicBool,
    released: AtomicBool,
}

/// An eventfd registered as the device's request notification.
fn request_notification(device: &OwnedFd, bdf: &str) -> Option<reactor::EventFd> {
    let efd = match reactor::EventFd::new() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(bdf, "eventfd: {e}");
            return None;
        }
    };
    let set = IrqSetOne {
        argsz: std::mem::size_of::<IrqSetOne>() as u32,
        flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        index: REQ_IRQ_INDEX,
        start: 0,
        count: 1,
        fd: efd.as_raw_fd(),
    };
    // SAFETY: SET_IRQS reads argsz bytes of the struct we own.
    if unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_SET_IRQS as _, &set) } < 0 {
        tracing::warn!(
            bdf,
            "no VFIO device request notification ({}): a hot-unplug is seen only once the device reads all ones",
            std::io::Error::last_os_error()
        );
        return None;
    }
    Some(efd)
}

fn region_info(device: &OwnedFd, index: u32) -> Result<RegionInfo, NvmeError> {
    let mut info = RegionInfo { argsz: std::mem::size_of::<RegionInfo>() as u32, index, ..Default::default() };
    // SAFETY: GET_REGION_INFO fills the struct we own; argsz bounds its writes.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_GET_REGION_INFO as _, &mut info) };
    if rc < 0 {
        return Err(os_err(format!("VFIO_DEVICE_GET_REGION_INFO {index}")));
    }
    Ok(info)
}

/// Validates a PCI address: `DDDD:BB:DD.F`, hex.
pub fn parse_bdf(s: &str) -> Result<String, NvmeError> {
    let bad = || NvmeError::Invalid(format!("traddr '{s}' is not a PCI address like 0000:00:04.0"));
    let s = s.trim();
    let full = if s.matches(':').count() == 1 { format!("0000:{s}") } else { s.to_string() };
    let (dom_bus_dev, func) = full.rsplit_once('.').ok_or_else(bad)?;
    let parts: Vec<&str> = dom_bus_dev.split(':').collect();
    let hex = |p: &str, n: usize| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit());
    if parts.len() != 3 || !hex(parts[0], 4) || !hex(parts[1], 2) || !hex(parts[2], 2) || !hex(func, 1) {
        return Err(bad());
    }
    Ok(full.to_ascii_lowercase())
}

impl VfioDevice {
    /// Opens `bdf` (bound to vfio-pci), sets up a type1 container, maps
    /// every DMA arena, maps BAR0 and enables bus mastering.
    pub fn open(bdf: &str) -> Result<Arc<VfioDevice>, NvmeError> {
        let bdf = parse_bdf(bdf)?;
        let sys = Path::new("/sys/bus/pci/devices").join(&bdf);
        if !sys.exists() {
            return Err(NvmeError::Invalid(format!("no PCI device {bdf}")));
        }
        let driver = std::fs::read_link(sys.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()));
        if driver.as_deref() != Some("vfio-pci") {
            return Err(NvmeError::Invalid(format!(
                "{bdf} is bound to {}, not vfio-pci: run scripts/setup.sh first",
                driver.as_deref().unwrap_or("no driver")
            )));
        }
        let group_link = std::fs::read_link(sys.join("iommu_group"))
            .map_err(|e| NvmeError::Vfio(format!("{bdf}: no IOMMU group ({e}); is the IOMMU on?"), libc::ENODEV))?;
        let group_no = group_link.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let rw = |p: &str| OpenOptions::new().read(true).write(true).open(p);
        let container: OwnedFd =
            rw("/dev/vfio/vfio").map_err(|e| NvmeError::Vfio(format!("/dev/vfio/vfio: {e}"), libc::ENODEV))?.into();
        // SAFETY: argument-less ioctls on a VFIO container fd.
        let api = unsafe { libc::ioctl(container.as_raw_fd(), VFIO_GET_API_VERSION as _) };
        if api != VFIO_API_VERSION {
            return Err(NvmeError::Vfio(format!("unknown VFIO API version {api}"), libc::EINVAL));
        }
        // SAFETY: CHECK_EXTENSION takes an integer argument by value.
        let v2 = unsafe { libc::ioctl(container.as_raw_fd(), VFIO_CHECK_EXTENSION as _, VFIO_TYPE1V2_IOMMU) } > 0;
        // SAFETY: as above.
        let v1 = unsafe { libc::ioctl(container.as_raw_fd(), VFIO_CHECK_EXTENSION as _, VFIO_TYPE1_IOMMU) } > 0;
        if !v1 && !v2 {
            return Err(NvmeError::Vfio("the kernel offers no VFIO type1 IOMMU".into(), libc::ENOTSUP));
        }
        let group_path = format!("/dev/vfio/{group_no}");
        let group: OwnedFd =
            rw(&group_path).map_err(|e| NvmeError::Vfio(format!("{group_path}: {e}"), libc::EBUSY))?.into();
        let mut status = GroupStatus { argsz: std::mem::size_of::<GroupStatus>() as u32, flags: 0 };
        // SAFETY: GET_STATUS fills the struct we own.
        if unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_STATUS as _, &mut status) } < 0 {
            return Err(os_err(format!("{group_path}: VFIO_GROUP_GET_STATUS")));
        }
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(NvmeError::Vfio(
                format!("IOMMU group {group_no} is not viable: bind every device of the group to vfio-pci"),
                libc::EBUSY,
            ));
        }
        let cfd: libc::c_int = container.as_raw_fd();
        // SAFETY: SET_CONTAINER reads an int (the container fd) through the pointer.
        if unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_SET_CONTAINER as _, &cfd) } < 0 {
            return Err(os_err(format!("{group_path}: VFIO_GROUP_SET_CONTAINER")));
        }
        let iommu = if v2 { VFIO_TYPE1V2_IOMMU } else { VFIO_TYPE1_IOMMU };
        // SAFETY: SET_IOMMU takes the IOMMU type by value.
        if unsafe { libc::ioctl(container.as_raw_fd(), VFIO_SET_IOMMU as _, iommu) } < 0 {
            return Err(os_err("VFIO_SET_IOMMU".into()));
        }
        let name = CString::new(bdf.clone()).map_err(|_| NvmeError::Invalid("bdf".into()))?;
        // SAFETY: GET_DEVICE_FD reads a NUL-terminated string that outlives the call.
        let dfd = unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_DEVICE_FD as _, name.as_ptr()) };
        if dfd < 0 {
            return Err(os_err(format!("{bdf}: VFIO_GROUP_GET_DEVICE_FD")));
        }
        // SAFETY: a fresh fd returned by the kernel, owned by nobody else.
        let device: OwnedFd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dfd) };

        let bar_info = region_info(&device, BAR0_REGION)?;
        if bar_info.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || bar_info.size < 0x2000 {
            return Err(NvmeError::Vfio(
                format!("{bdf}: BAR0 cannot be mapped (size {:#x})", bar_info.size),
                libc::EINVAL,
            ));
        }
        // Map the whole BAR; where the kernel refuses (an MSI-X table inside
        // BAR0 without interrupt remapping), the registers and the first
        // doorbells are enough: 8 KiB covers 512 queue doorbells at stride 0.
        let mut p = libc::MAP_FAILED;
        let mut bar_len = 0usize;
        for len in [bar_info.size as usize, 0x2000] {
            // SAFETY: a shared mapping of the device fd at the offset VFIO
            // gave for BAR0; it is unmapped in Drop and never aliased by a
            // Rust reference (volatile accesses only, in mmio::Bar).
            p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    device.as_raw_fd(),
                    bar_info.offset as libc::off_t,
                )
            };
            if p != libc::MAP_FAILED {
                bar_len = len;
                break;
            }
        }
        if p == libc::MAP_FAILED {
            return Err(os_err(format!("{bdf}: mmap BAR0")));
        }
        let base =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| NvmeError::Vfio("mmap returned NULL".into(), libc::EINVAL))?;
        // SAFETY: base..base+bar_len is the mapping just created; VfioDevice
        // owns it and unmaps it last.
        let bar = unsafe { Bar::new(base, bar_len) };
        let config_offset = region_info(&device, CONFIG_REGION)?.offset;

        let request = request_notification(&device, &bdf);
        let dup = container.try_clone().map_err(|e| NvmeError::Vfio(format!("dup container: {e}"), libc::EMFILE))?;
        let mapper: Arc<dyn DmaMapper> = Arc::new(VfioMapper { container: dup });
        let dev = VfioDevice {
            bdf: bdf.clone(),
            _group: group,
            device: Mutex::new(Some(device)),
            bar,
            config_offset,
            mapper: mapper.clone(),
            t0: Instant::now(),
            request,
            requested: AtomicBool::new(false),
            released: AtomicBool::new(false),
        };
        dev.set_command_bits(PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, true)?;
        bdev::dma::register_mapper(mapper).map_err(|e| NvmeError::Vfio(format!("{bdf}: {e}"), libc::ENOMEM))?;
        // The container fd itself may close: the group keeps it attached and
        // the mapper holds a duplicate for MAP/UNMAP.
        drop(container);
        tracing::info!(bdf, bar_len, "VFIO device opened");
        Ok(Arc::new(dev))
    }

    fn config_rw(&self, off: u64, buf: &mut [u8], write: bool) -> bool {
        let pos = (self.config_offset + off) as libc::off_t;
        let device = self.device.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fd) = device.as_ref().map(|d| d.as_raw_fd()) else { return false };
        // SAFETY: pread/pwrite on our device fd (kept open by the guard)
        // with a buffer we own.
        let n = unsafe {
            if write {
                libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), pos)
            } else {
                libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), pos)
            }
        };
        n == buf.len() as isize
    }

    fn set_command_bits(&self, bits: u16, on: bool) -> Result<(), NvmeError> {
        let mut raw = [0u8; 2];
        if !self.config_rw(PCI_COMMAND, &mut raw, false) {
            return Err(os_err(format!("{}: read PCI command register", self.bdf)));
        }
        let cmd = u16::from_le_bytes(raw);
        let new = if on { cmd | bits } else { cmd & !bits };
        let mut raw = new.to_le_bytes();
        if !self.config_rw(PCI_COMMAND, &mut raw, true) {
            return Err(os_err(format!("{}: write PCI command register", self.bdf)));
        }
        Ok(())
    }

    pub fn bdf(&self) -> &str {
        &self.bdf
    }
}

impl RegisterSpace for VfioDevice {
    fn read32(&self, offset: u32) -> u32 {
        self.bar.read32(offset)
    }
    fn write32(&self, offset: u32, value: u32) {
        self.bar.write32(offset, value)
    }
    fn relax(&self) {
        // Waits off the reactors only: yield the core.
        crate::mmio::note_blocking_wait();
        std::thread::sleep(std::time::Duration::from_micros(5));
    }
    fn wait_clock_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
    fn stop_dma(&self) -> bool {
        self.set_command_bits(PCI_COMMAND_MASTER, false).is_ok()
    }
    fn describe(&self) -> String {
        format!("PCIe {}", self.bdf)
    }
    fn removal_requested(&self) -> bool {
        if self.requested.load(Ordering::Acquire) {
            return true;
        }
        let Some(efd) = &self.request else { return false };
        let asked = efd.drain() > 0;
        if asked {
            self.requested.store(true, Ordering::Release);
        }
        asked
    }
    fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        // The BAR mapping holds the device file open: it is replaced in
        // place by anonymous memory, so a stray access can no longer reach
        // (or fault on) the device, and Drop's munmap still finds a mapping.
        // SAFETY: MAP_FIXED over exactly the range this device mapped and
        // owns (`self.bar`); no Rust reference points into it.
        let p = unsafe {
            libc::mmap(
                self.bar.base().cast(),
                self.bar.len(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            tracing::error!(bdf = %self.bdf, "cannot unmap BAR0: {}", std::io::Error::last_os_error());
            return;
        }
        self.device.lock().unwrap_or_else(|e| e.into_inner()).take();
        tracing::warn!(bdf = %self.bdf, "VFIO device released");
    }
    fn interrupt_vectors(&self) -> u16 {
        let mut info =
            IrqInfo { argsz: std::mem::size_of::<IrqInfo>() as u32, index: MSIX_IRQ_INDEX, ..Default::default() };
        let device = self.device.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fd) = device.as_ref().map(|d| d.as_raw_fd()) else { return 0 };
        // SAFETY: GET_IRQ_INFO fills the struct we own; argsz bounds its writes.
        if unsafe { libc::ioctl(fd, VFIO_DEVICE_GET_IRQ_INFO as _, &mut info) } < 0 {
            return 0;
        }
        info.count.min(u16::MAX as u32) as u16
    }
    fn enable_interrupts(&self, count: u16) -> Result<(), String> {
        // Every vector at once, none routed (-1): later routing of one vector
        // stays inside the enabled range, which every kernel accepts (only
        // newer ones can grow MSI-X while it is on).
        self.set_irqs(VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, 0, &vec![-1; count as usize])
            .map_err(|e| format!("{}: enabling {count} MSI-X vectors: {e}", self.bdf))
    }
    fn set_interrupt(&self, vector: u16, irq: Option<&Arc<reactor::EventFd>>) -> Result<(), String> {
        let fd = irq.map_or(-1, |e| e.as_raw_fd());
        self.set_irqs(VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, vector as u32, &[fd])
            .map_err(|e| format!("{}: routing MSI-X vector {vector}: {e}", self.bdf))
    }
    fn disable_interrupts(&self) {
        if let Err(e) = self.set_irqs(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[]) {
            tracing::warn!(bdf = %self.bdf, "disabling MSI-X: {e}");
        }
    }
}

impl VfioDevice {
    /// VFIO_DEVICE_SET_IRQS on the MSI-X index: vectors `start..` get
    /// `fds` (one s32 each; -1 routes a vector to nothing), or with
    /// DATA_NONE and no fds, MSI-X is turned off.
    fn set_irqs(&self, flags: u32, start: u32, fds: &[i32]) -> std::io::Result<()> {
        // vfio_irq_set (the five words of `IrqSetOne`'s header, in its
        // asserted layout) followed by its data.
        let header = std::mem::offset_of!(IrqSetOne, fd);
        let argsz = (header + 4 * fds.len()) as u32;
        let mut words: Vec<u32> = vec![argsz, flags, MSIX_IRQ_INDEX, start, fds.len() as u32];
        words.extend(fds.iter().map(|&fd| fd as u32));
        debug_assert_eq!(words.len() * 4, argsz as usize);
        let device = self.device.lock().unwrap_or_else(|e| e.into_inner());
        let Some(dfd) = device.as_ref().map(|d| d.as_raw_fd()) else {
            return Err(std::io::Error::from_raw_os_error(libc::ENODEV));
        };
        // SAFETY: SET_IRQS reads `argsz` bytes from `words`, which holds
        // exactly that many, 4-byte aligned, and outlives the call; the
        // eventfds it names stay open while the kernel holds its own
        // reference to them.
        if unsafe { libc::ioctl(dfd, VFIO_DEVICE_SET_IRQS as _, words.as_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for VfioDevice {
    fn drop(&mut self) {
        bdev::dma::unregister_mapper(&self.mapper);
        // SAFETY: the BAR mapping created in `open`, unmapped exactly once;
        // `self.bar` is not used after this.
        unsafe { libc::munmap(self.bar.base().cast(), self.bar.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bdf;

    #[test]
    fn pci_addresses() {
        assert_eq!(parse_bdf("0000:00:04.0").unwrap(), "0000:00:04.0");
        assert_eq!(parse_bdf("00:05.0").unwrap(), "0000:00:05.0");
        assert_eq!(parse_bdf("0000:AF:00.1").unwrap(), "0000:af:00.1");
        for bad in ["", "0000:00:04", "zz:00.0", "0000:00:04.0/../x", "0000:000:04.0"] {
            assert!(parse_bdf(bad).is_err(), "{bad}");
        }
    }
}
