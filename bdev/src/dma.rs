//! DMA-able memory: page-aligned arenas (2 MiB hugepages when the machine has
//! them), carved into power-of-two buffers kept on per-reactor free lists.
//!
//! A device may write a buffer at any time while a command owns it, so no
//! long-lived Rust reference to buffer bytes ever exists: access goes through
//! short scoped borrows (`with`, `with_mut`, copies) checked like a `RefCell`,
//! and devices get raw addresses (`iova`). A buffer is pinned while any handle
//! to it lives (invariant 5, docs/architecture.md): commands hold a `DmaBuf` until they complete, and
//! only the last handle's drop returns the memory to a free list.
//!
//! IOVA equals the virtual address (VFIO type1 maps arenas 1:1); arenas are
//! announced to registered mappers so an IOMMU can map them before use.

use std::cell::{Cell, RefCell};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Hugepage size used for arenas.
pub const ARENA_SIZE: usize = 2 << 20;
/// Smallest buffer class.
pub const MIN_BUF_SIZE: usize = 4096;
const NUM_CLASSES: usize = 12; // 4 KiB .. 8 MiB

/// Something that must see every arena before devices use it (the VFIO
/// container maps it into the IOMMU).
pub trait DmaMapper: Send + Sync {
    fn map(&self, vaddr: u64, len: u64) -> Result<(), String>;
    fn unmap(&self, vaddr: u64, len: u64);
}

struct Arena {
    ptr: NonNull<u8>,
    len: usize,
    hugepage: bool,
}

// SAFETY: an arena is a plain mmap'd region; which thread touches which bytes
// is governed by buffer ownership, not by this handle.
unsafe impl Send for Arena {}

#[derive(Default)]
struct Global {
    arenas: Vec<Arena>,
    mappers: Vec<Arc<dyn DmaMapper>>,
}

fn global() -> &'static Mutex<Global> {
    static G: OnceLock<Mutex<Global>> = OnceLock::new();
    G.get_or_init(|| Mutex::new(Global::default()))
}

static HUGEPAGE_BYTES: AtomicU64 = AtomicU64::new(0);
static PLAIN_BYTES: AtomicU64 = AtomicU64::new(0);
static HUGEPAGES_DISABLED: AtomicUsize = AtomicUsize::new(0);

/// Bytes of DMA memory obtained so far: (hugepage-backed, ordinary pages).
pub fn memory_stats() -> (u64, u64) {
    (HUGEPAGE_BYTES.load(Ordering::Relaxed), PLAIN_BYTES.load(Ordering::Relaxed))
}

/// Stops using hugepages for new arenas (for tests and `--no-huge`).
pub fn disable_hugepages() {
    HUGEPAGES_DISABLED.store(1, Ordering::Relaxed);
}

/// Registers a mapper; existing arenas are mapped at once. Fails (and leaves
/// the mapper unregistered) if any existing arena cannot be mapped.
pub fn register_mapper(m: Arc<dyn DmaMapper>) -> Result<(), String> {
    let mut g = global().lock().unwrap_or_else(|e| e.into_inner());
    for (i, a) in g.arenas.iter().enumerate() {
        if let Err(e) = m.map(a.ptr.as_ptr() as u64, a.len as u64) {
            for b in &g.arenas[..i] {
                m.unmap(b.ptr.as_ptr() as u64, b.len as u64);
            }
            return Err(e);
        }
    }
    g.mappers.push(m);
    Ok(())
}

/// Removes a mapper (unmapping every arena from it).
pub fn unregister_mapper(m: &Arc<dyn DmaMapper>) {
    let mut g = global().lock().unwrap_or_else(|e| e.into_inner());
    g.mappers.retain(|x| !Arc::ptr_eq(x, m));
    for a in &g.arenas {
        m.unmap(a.ptr.as_ptr() as u64, a.len as u64);
    }
}

/// Maps a fresh region of `len` bytes (a multiple of ARENA_SIZE), hugepage
/// backed when possible. Arenas live for the whole process.
fn new_arena(len: usize) -> Option<NonNull<u8>> {
    let try_huge = HUGEPAGES_DISABLED.load(Ordering::Relaxed) == 0;
    let mut hugepage = false;
    let mut p = libc::MAP_FAILED;
    if try_huge {
        // SAFETY: anonymous private mapping; no existing memory is affected.
        p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        hugepage = p != libc::MAP_FAILED;
    }
    if p == libc::MAP_FAILED {
        p = map_transparent_huge(len);
    }
    if p == libc::MAP_FAILED {
        return None;
    }
    let ptr = NonNull::new(p.cast::<u8>())?;
    let mut g = global().lock().unwrap_or_else(|e| e.into_inner());
    for m in &g.mappers {
        if let Err(e) = m.map(ptr.as_ptr() as u64, len as u64) {
            tracing::error!("DMA mapper refused a new arena: {e}");
            // SAFETY: the mapping was created above and is not shared yet.
            unsafe { libc::munmap(p, len) };
            return None;
        }
    }
    g.arenas.push(Arena { ptr, len, hugepage });
    let counter = if hugepage { &HUGEPAGE_BYTES } else { &PLAIN_BYTES };
    counter.fetch_add(len as u64, Ordering::Relaxed);
    Some(ptr)
}

/// Without reserved hugepages: a 2 MiB-aligned anonymous mapping advised
/// for transparent hugepages before it is populated, so the kernel can back
/// it with huge pages (fewer TLB misses on large stores like malloc bdevs).
/// Returns MAP_FAILED on failure.
fn map_transparent_huge(len: usize) -> *mut libc::c_void {
    let over = len + ARENA_SIZE;
    // SAFETY: a fresh anonymous private mapping; nothing else is affected.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            over,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return raw;
    }
    let start = raw as usize;
    let aligned = (start + ARENA_SIZE - 1) & !(ARENA_SIZE - 1);
    let head = aligned - start;
    let tail = over - head - len;
    // SAFETY: head and tail are the unused ends of the mapping made above;
    // no reference to them exists. Failure only leaves them mapped.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    let p = aligned as *mut libc::c_void;
    // SAFETY: advice and population on the aligned range we own; both are
    // best effort (old kernels lack MADV_POPULATE_WRITE: touch pages then).
    unsafe {
        libc::madvise(p, len, libc::MADV_HUGEPAGE);
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        if libc::madvise(p, len, MADV_POPULATE_WRITE) != 0 {
            for off in (0..len).step_by(4096) {
                std::ptr::write_volatile((aligned + off) as *mut u8, 0);
            }
        }
    }
    p
}

/// True if the arena at `ptr` is hugepage backed.
pub fn is_hugepage_backed(ptr: u64) -> bool {
    let g = global().lock().unwrap_or_else(|e| e.into_inner());
    g.arenas.iter().any(|a| a.hugepage && (a.ptr.as_ptr() as u64..a.ptr.as_ptr() as u64 + a.len as u64).contains(&ptr))
}

/// One buffer of a size class. Its bytes are only reached through `DmaBuf`.
pub struct Region {
    ptr: NonNull<u8>,
    class: usize,
    /// >0: that many shared borrows; -1: one exclusive borrow.
    borrow: Cell<isize>,
}

fn class_of(len: usize) -> Option<usize> {
    let size = len.max(MIN_BUF_SIZE).next_power_of_two();
    let class = (size / MIN_BUF_SIZE).trailing_zeros() as usize;
    (class < NUM_CLASSES).then_some(class)
}

fn class_size(class: usize) -> usize {
    MIN_BUF_SIZE << class
}

/// Per-reactor free lists, one per class, plus the unused tail of the
/// reactor's current arena for each small class.
#[derive(Default)]
pub(crate) struct DmaLocal {
    free: RefCell<[Vec<Rc<Region>>; NUM_CLASSES]>,
}

thread_local! {
    // Keyed by reactor uid so that manual sets (many reactors on one thread)
    // keep separate pools.
    static LOCAL: RefCell<(u64, Option<Rc<DmaLocal>>)> = const { RefCell::new((u64::MAX, None)) };
}

fn with_local<R>(f: impl FnOnce(&DmaLocal) -> R) -> R {
    let uid = reactor::current_uid();
    LOCAL.with(|l| {
        // The fast path (every buffer taken or returned on the hot path):
        // the cached pool, borrowed while `f` runs, no reference count
        // taken. `f` never switches the thread to another reactor's pool.
        if let Ok(cached) = l.try_borrow() {
            if let (u, Some(local)) = &*cached {
                if *u == uid {
                    return f(local);
                }
            }
        }
        let local = {
            let mut l = l.borrow_mut();
            if l.0 != uid || l.1.is_none() {
                let fresh = if uid == 0 { Rc::new(DmaLocal::default()) } else { reactor::local::<DmaLocal>() };
                *l = (uid, Some(fresh));
            }
            l.1.clone().unwrap_or_default()
        };
        f(&local)
    })
}

/// Buffers of reactors that have stopped, by class (addresses of regions
/// inside arenas, which live for the process): a new reactor set reuses them
/// before mapping more memory.
fn recycled() -> &'static Mutex<Vec<Vec<usize>>> {
    static R: OnceLock<Mutex<Vec<Vec<usize>>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(vec![Vec::new(); NUM_CLASSES]))
}

impl Drop for DmaLocal {
    fn drop(&mut self) {
        let mut r = recycled().lock().unwrap_or_else(|e| e.into_inner());
        for (class, list) in self.free.get_mut().iter_mut().enumerate() {
            // Only regions no handle still points at; a buffer still held
            // elsewhere (in flight) stays pinned and is simply not recycled.
            r[class].extend(
                list.drain(..).filter_map(|region| Rc::try_unwrap(region).ok()).map(|reg| reg.ptr.as_ptr() as usize),
            );
        }
    }
}

impl DmaLocal {
    fn refill(&self, class: usize) -> bool {
        let size = class_size(class);
        let reused: Vec<usize> = {
            let mut r = recycled().lock().unwrap_or_else(|e| e.into_inner());
            let n = r[class].len().saturating_sub((ARENA_SIZE / size).max(1));
            r[class].split_off(n)
        };
        if !reused.is_empty() {
            let mut free = self.free.borrow_mut();
            for addr in reused {
                let Some(ptr) = NonNull::new(addr as *mut u8) else { continue };
                free[class].push(Rc::new(Region { ptr, class, borrow: Cell::new(0) }));
            }
            return true;
        }
        let arena_len = size.max(ARENA_SIZE);
        let Some(base) = new_arena(arena_len) else { return false };
        let mut free = self.free.borrow_mut();
        for i in 0..arena_len / size {
            // SAFETY: i * size < arena_len, inside the mapping just created.
            let p = unsafe { base.as_ptr().add(i * size) };
            let Some(ptr) = NonNull::new(p) else { continue };
            free[class].push(Rc::new(Region { ptr, class, borrow: Cell::new(0) }));
        }
        true
    }
}

/// A handle to (a slice of) a DMA buffer. Cloning and slicing share the
/// buffer; the memory returns to its pool when the last handle drops.
pub struct DmaBuf {
    region: Option<Rc<Region>>,
    off: usize,
    len: usize,
}

impl DmaBuf {
    /// A buffer of at least `len` bytes (page aligned, zero-length slices
    /// allowed) from the current reactor's pool; `None` when memory is out —
    /// a retryable condition, never a panic.
    pub fn alloc(len: usize) -> Option<DmaBuf> {
        let class = class_of(len)?;
        with_local(|l| {
            if l.free.borrow()[class].is_empty() && !l.refill(class) {
                return None;
            }
            let region = l.free.borrow_mut()[class].pop()?;
            Some(DmaBuf { region: Some(region), off: 0, len })
        })
    }

    /// Like `alloc`, then zero-filled.
    pub fn zeroed(len: usize) -> Option<DmaBuf> {
        let b = Self::alloc(len)?;
        b.fill(0);
        Some(b)
    }

    /// Pre-populates the current reactor's pool so the hot path never maps.
    pub fn reserve(len: usize, count: usize) {
        let bufs: Vec<_> = (0..count).filter_map(|_| Self::alloc(len)).collect();
        drop(bufs);
    }

    /// Largest buffer the pool hands out.
    pub const MAX_LEN: usize = MIN_BUF_SIZE << (NUM_CLASSES - 1);

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn region(&self) -> &Region {
        self.region.as_ref().unwrap_or_else(|| unreachable!("region present until drop"))
    }

    /// A handle to `len` bytes at `off` of this buffer (clamped to its end).
    pub fn slice(&self, off: usize, len: usize) -> DmaBuf {
        let off = off.min(self.len);
        let len = len.min(self.len - off);
        DmaBuf { region: self.region.clone(), off: self.off + off, len }
    }

    /// The device address of the first byte (IOVA == VA).
    pub fn iova(&self) -> u64 {
        self.region().ptr.as_ptr() as u64 + self.off as u64
    }

    /// Raw pointer for devices and syscalls. Writing through it while any
    /// scoped borrow is active is the caller's bug to avoid.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.iova() as *mut u8
    }

    /// True when `other` is backed by the same buffer (for zero-copy checks).
    pub fn same_buffer(&self, other: &DmaBuf) -> bool {
        match (&self.region, &other.region) {
            (Some(a), Some(b)) => Rc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Reads the bytes in a scoped shared borrow.
    ///
    /// # Panics
    /// If an exclusive borrow of the same buffer is active (a bug).
    pub fn with<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        let r = self.region();
        let b = r.borrow.get();
        assert!(b >= 0, "DmaBuf already mutably borrowed");
        r.borrow.set(b + 1);
        struct Release<'a>(&'a Cell<isize>);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.set(self.0.get() - 1);
            }
        }
        let _release = Release(&r.borrow);
        // SAFETY: off+len lies inside the region (slice clamps); the region
        // stays alive through `self`; the borrow flag excludes any Rust
        // mutable alias for the closure's duration; devices only write buffers
        // owned by an in-flight command, which the caller does not also read.
        let bytes = unsafe { std::slice::from_raw_parts(r.ptr.as_ptr().add(self.off), self.len) };
        f(bytes)
    }

    /// Mutates the bytes in a scoped exclusive borrow.
    ///
    /// # Panics
    /// If any other borrow of the same buffer is active (a bug).
    pub fn with_mut<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let r = self.region();
        assert!(r.borrow.get() == 0, "DmaBuf already borrowed");
        r.borrow.set(-1);
        struct Release<'a>(&'a Cell<isize>);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.set(0);
            }
        }
        let _release = Release(&r.borrow);
        // SAFETY: in bounds as in `with`; the flag guarantees no other Rust
        // borrow of this region exists while the closure runs.
        let bytes = unsafe { std::slice::from_raw_parts_mut(r.ptr.as_ptr().add(self.off), self.len) };
        f(bytes)
    }

    pub fn fill(&self, byte: u8) {
        self.with_mut(|b| b.fill(byte));
    }

    /// Copies `src` into this buffer at `off` (truncated to fit).
    pub fn copy_from(&self, off: usize, src: &[u8]) {
        self.with_mut(|b| {
            let off = off.min(b.len());
            let n = src.len().min(b.len() - off);
            b[off..off + n].copy_from_slice(&src[..n]);
        });
    }

    /// Copies from this buffer at `off` into `dst` (truncated to fit).
    pub fn copy_to(&self, off: usize, dst: &mut [u8]) {
        self.with(|b| {
            let off = off.min(b.len());
            let n = dst.len().min(b.len() - off);
            dst[..n].copy_from_slice(&b[off..off + n]);
        });
    }

    /// Copies `len` bytes between two (possibly overlapping) buffer slices.
    pub fn copy_between(dst: &DmaBuf, src: &DmaBuf, len: usize) {
        let len = len.min(dst.len).min(src.len);
        assert!(dst.region().borrow.get() == 0 && src.region().borrow.get() >= 0, "DmaBuf borrowed during copy");
        // SAFETY: both ranges are inside live regions; `copy` allows overlap;
        // the borrow flags of both regions are checked to be free, so no Rust
        // reference observes the bytes while they change.
        unsafe { std::ptr::copy(src.as_mut_ptr(), dst.as_mut_ptr(), len) };
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.with(|b| b.to_vec())
    }
}

impl Clone for DmaBuf {
    fn clone(&self) -> Self {
        DmaBuf { region: self.region.clone(), off: self.off, len: self.len }
    }
}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DmaBuf({:#x}+{})", self.iova(), self.len)
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        let Some(region) = self.region.take() else { return };
        if Rc::strong_count(&region) == 1 {
            let class = region.class;
            with_local(|l| l.free.borrow_mut()[class].push(region));
        }
    }
}

/// A large shared memory area (the malloc bdev's store) that several
/// reactors read and write concurrently, like a device would. Overlapping
/// concurrent IO yields unspecified bytes, as on real media, never a Rust
/// reference race: access is by raw copies only.
pub struct SharedMem {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the memory is only touched by raw copies (see type docs); handing
// the pointer to other threads creates no Rust references.
unsafe impl Send for SharedMem {}
// SAFETY: as for Send: all access is by raw copies of plain bytes.
unsafe impl Sync for SharedMem {}

impl SharedMem {
    /// Zeroed memory of `len` bytes (rounded up to whole arenas).
    pub fn new(len: usize) -> Option<SharedMem> {
        let rounded = len.div_ceil(ARENA_SIZE).max(1) * ARENA_SIZE;
        let ptr = new_arena(rounded)?;
        Some(SharedMem { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, off: usize, n: usize) -> bool {
        off.checked_add(n).is_some_and(|end| end <= self.len)
    }

    /// Copies `dst.len()` bytes at `off` into `dst`. False if out of range.
    pub fn read_into(&self, off: usize, dst: &DmaBuf) -> bool {
        if !self.check(off, dst.len()) {
            return false;
        }
        assert!(dst.region().borrow.get() == 0, "DmaBuf borrowed during device read");
        // SAFETY: both ranges are in bounds of live mappings; they are
        // distinct allocations (arenas never overlap), and no Rust reference
        // to either range exists during the copy.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) };
        true
    }

    /// Copies `src` to `off`. False if out of range.
    pub fn write_from(&self, off: usize, src: &DmaBuf) -> bool {
        if !self.check(off, src.len()) {
            return false;
        }
        assert!(src.region().borrow.get() >= 0, "DmaBuf mutably borrowed during device write");
        // SAFETY: as in `read_into`.
        unsafe { std::ptr::copy_nonoverlapping(src.as_mut_ptr(), self.ptr.as_ptr().add(off), src.len()) };
        true
    }

    /// Writes `n` copies of `byte` at `off`. False if out of range.
    pub fn fill(&self, off: usize, n: usize, byte: u8) -> bool {
        if !self.check(off, n) {
            return false;
        }
        // SAFETY: in bounds; raw write with no Rust reference to the range.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(off), byte, n) };
        true
    }

    /// Copies out to an ordinary slice (tests, verification).
    pub fn read_to_slice(&self, off: usize, dst: &mut [u8]) -> bool {
        if !self.check(off, dst.len()) {
            return false;
        }
        // SAFETY: in bounds; `dst` is an exclusive slice of other memory.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(class_of(1), Some(0));
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(4097), Some(1));
        assert_eq!(class_of(DmaBuf::MAX_LEN), Some(NUM_CLASSES - 1));
        assert_eq!(class_of(DmaBuf::MAX_LEN + 1), None);
    }

    #[test]
    fn buffers_are_aligned_shared_and_recycled() {
        let a = DmaBuf::alloc(8192).unwrap();
        assert_eq!(a.iova() % 4096, 0);
        a.fill(0xAB);
        let s = a.slice(4096, 100);
        assert_eq!(s.iova(), a.iova() + 4096);
        s.copy_from(0, &[1, 2, 3]);
        let mut out = [0u8; 4];
        a.copy_to(4096, &mut out);
        assert_eq!(out, [1, 2, 3, 0xAB]);
        let addr = a.iova();
        drop(a);
        // Still pinned by the slice: a fresh allocation must not reuse it.
        let b = DmaBuf::alloc(8192).unwrap();
        assert_ne!(b.iova(), addr);
        drop(s);
        drop(b);
        let c = DmaBuf::alloc(8192).unwrap();
        let d = DmaBuf::alloc(8192).unwrap();
        assert!(c.iova() == addr || d.iova() == addr, "released buffer returns to the pool");
    }

    #[test]
    #[should_panic(expected = "borrowed")]
    fn aliasing_borrows_are_refused() {
        let a = DmaBuf::alloc(4096).unwrap();
        let b = a.clone();
        a.with(|_| b.with_mut(|_| ()));
    }

    #[test]
    fn shared_mem_bounds() {
        let m = SharedMem::new(1 << 20).unwrap();
        let b = DmaBuf::alloc(4096).unwrap();
        b.fill(7);
        assert!(m.write_from(4096, &b));
        assert!(!m.write_from((1 << 20) - 100, &b));
        let c = DmaBuf::zeroed(4096).unwrap();
        assert!(m.read_into(4096, &c));
        assert_eq!(c.to_vec(), vec![7; 4096]);
        assert!(!m.read_into(usize::MAX - 1, &c));
    }
}
