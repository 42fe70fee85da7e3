//! Error-injection bdev (`bdev_error_create`, `bdev_error_inject_error`,
//! `bdev_error_resume_pending`): `EE_<base>` claims its base and passes IO
//! through, failing, holding or corrupting the next `num` IOs of a type.
//!
//! Rules are shared by all reactors: one atomic word per IO type packs the
//! error kind with the remaining count, decremented by compare-and-swap, so
//! exactly `num` IOs are hit however the reactors race.

use crate::channel::{Bdev, BdevChannel, BdevProps, Channel};
use crate::dma::DmaBuf;
use crate::io::{IoBox, IoDone, IoError, IoSlab, IoStatus, IoType};
use crate::registry::{BdevHandle, Registry};
use crate::BdevError;
use reactor::{PollStatus, PollerHandle};
use serde::Deserialize;
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// Parent IOs a channel parks while their child runs on the base; the
/// table is pre-sized to this and grows only past it.
const PARKED_IOS_RESERVED: usize = 1024;
/// Held ("pending") IOs a channel reserves room for.
const HELD_IOS_RESERVED: usize = 256;

/// `bdev_error_create` parameters.
#[derive(Clone, Debug, Deserialize)]
pub struct ErrorCreateParams {
    pub base_name: String,
    #[serde(default)]
    pub uuid: Option<Uuid>,
}

/// `bdev_error_inject_error` parameters.
#[derive(Clone, Debug, Deserialize)]
pub struct ErrorInjectParams {
    pub name: String,
    /// read, write, unmap, flush, write_zeroes, reset, all, clear.
    pub io_type: String,
    /// failure, pending, corrupt_data, nomem, nvme.
    pub error_type: String,
    /// IOs to hit (default 1; 0 disables the rule).
    #[serde(default)]
    pub num: Option<u64>,
    /// Hit only while this channel has at least this many IOs at the base.
    #[serde(default)]
    pub queue_depth: Option<u64>,
    /// Byte (within the IO's data) that corrupt_data XORs with corrupt_value.
    #[serde(default)]
    pub corrupt_offset: Option<u64>,
    #[serde(default)]
    pub corrupt_value: Option<u8>,
    /// Status for error_type "nvme".
    #[serde(default)]
    pub nvme_sct: Option<u32>,
    #[serde(default)]
    pub nvme_sc: Option<u32>,
}

/// `bdev_error_resume_pending` parameters.
#[derive(Clone, Debug, Deserialize)]
pub struct ErrorResumeParams {
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Failure = 1,
    Pending = 2,
    CorruptData = 3,
    NoMemory = 4,
    Nvme = 5,
}

impl Kind {
    fn from_name(s: &str) -> Option<Kind> {
        Some(match s {
            "failure" => Kind::Failure,
            "pending" => Kind::Pending,
            "corrupt_data" => Kind::CorruptData,
            "nomem" => Kind::NoMemory,
            // SPDK's client spells it nvme_failure.
            "nvme" | "nvme_failure" => Kind::Nvme,
            _ => return None,
        })
    }

    fn from_u8(v: u8) -> Option<Kind> {
        [Kind::Failure, Kind::Pending, Kind::CorruptData, Kind::NoMemory, Kind::Nvme]
            .into_iter()
            .find(|k| *k as u8 == v)
    }
}

const KIND_SHIFT: u32 = 56;
const COUNT_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// One IO type's rule. `word` = kind << 56 | remaining count; the other
/// fields are written before `word` (Release) and read after it (Acquire).
#[derive(Default)]
struct Rule {
    word: AtomicU64,
    queue_depth: AtomicU64,
    corrupt_offset: AtomicU64,
    corrupt_value: AtomicU8,
    /// sct << 8 | sc.
    nvme_status: AtomicU16,
}

fn type_index(t: IoType) -> usize {
    match t {
        IoType::Read => 0,
        IoType::Write => 1,
        IoType::Flush => 2,
        IoType::Unmap => 3,
        IoType::WriteZeroes => 4,
        IoType::Reset => 5,
    }
}

/// What an IO drew from its rule.
#[derive(Clone, Copy)]
struct Hit {
    kind: Kind,
    corrupt_offset: u64,
    corrupt_value: u8,
    nvme_status: u16,
}

/// State every reactor's channel shares.
#[derive(Default)]
struct Shared {
    rules: [Rule; 6],
    /// Bumped to make every channel complete its held IOs as Aborted
    /// (clear, reset, removal).
    abort_gen: AtomicU64,
    /// Bumped to make every channel resubmit its held IOs.
    resume_gen: AtomicU64,
}

impl Shared {
    /// Takes one hit from `t`'s rule if it has any left (exactly `num` IOs
    /// over all reactors succeed at the compare-and-swap).
    fn take_hit(&self, t: IoType, channel_queue_depth: u64) -> Option<Hit> {
        let rule = &self.rules[type_index(t)];
        let mut w = rule.word.load(Ordering::Acquire);
        loop {
            if w & COUNT_MASK == 0 {
                return None;
            }
            if channel_queue_depth < rule.queue_depth.load(Ordering::Relaxed) {
                return None;
            }
            match rule.word.compare_exchange_weak(w, w - 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => w = now,
            }
        }
        Some(Hit {
            kind: Kind::from_u8((w >> KIND_SHIFT) as u8)?,
            corrupt_offset: rule.corrupt_offset.load(Ordering::Relaxed),
            corrupt_value: rule.corrupt_value.load(Ordering::Relaxed),
            nvme_status: rule.nvme_status.load(Ordering::Relaxed),
        })
    }
}

/// The error-injection bdev.
pub struct ErrorBdev {
    props: BdevProps,
    base: BdevHandle,
    owner: String,
    shared: Arc<Shared>,
}

/// Creates `EE_<base_name>` over `base_name`, claiming it, and registers it.
pub fn create(p: ErrorCreateParams) -> Result<BdevHandle, BdevError> {
    let registry = Registry::get();
    let name = format!("EE_{}", p.base_name);
    let owner = format!("bdev_error {name}");
    let base = registry.claim(&p.base_name, &owner)?;
    let bp = base.props();
    let mut props = BdevProps::new(&name, "Error Injection Disk", bp.block_size, bp.num_blocks, p.uuid);
    props.optimal_io_boundary = bp.optimal_io_boundary;
    props.max_io_blocks = bp.max_io_blocks;
    props.write_cache = bp.write_cache;
    props.deallocated_reads_zeroes = bp.deallocated_reads_zeroes;
    props.atomic_write_blocks = bp.atomic_write_blocks;
    let shared = Arc::new(Shared::default());
    let bdev = Arc::new(ErrorBdev { props, base: base.clone(), owner: owner.clone(), shared: shared.clone() });
    let h = match registry.register(bdev) {
        Ok(h) => h,
        Err(e) => {
            registry.release(&base, &owner);
            return Err(e);
        }
    };
    reactor::global::<ErrorBdevs>().table().insert(h.props().uuid, shared.clone());
    // Held IOs would keep unregistration waiting forever: abort them.
    h.on_remove(move || {
        shared.abort_gen.fetch_add(1, Ordering::AcqRel);
    });
    // The base going away takes this bdev with it (SPDK's hot-remove).
    let uuid = h.props().uuid.to_string();
    base.on_remove(move || {
        let registry = Registry::get();
        if let Some(me) = registry.lookup(&uuid) {
            registry.force_unregister(me, |_| {});
        }
    });
    Ok(h)
}

/// The error bdevs of one reactor set, by UUID: the registry hands out
/// `dyn Bdev`, so the RPCs that reach an error bdev's rules look here.
#[derive(Default)]
struct ErrorBdevs(Mutex<HashMap<Uuid, Arc<Shared>>>);

impl ErrorBdevs {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Shared>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn error_bdev(name: &str) -> Result<Arc<Shared>, BdevError> {
    let h = Registry::get().lookup(name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    let found = reactor::global::<ErrorBdevs>().table().get(&h.props().uuid).cloned();
    found.ok_or_else(|| BdevError::Invalid(format!("{name} is not an error injection bdev")))
}

/// Sets (or clears) an injection rule.
pub fn inject(p: ErrorInjectParams) -> Result<(), BdevError> {
    let types: &[IoType] = match p.io_type.as_str() {
        "all" => &IoType::ALL,
        "clear" => &[],
        other => match IoType::ALL.iter().position(|t| t.name() == other) {
            Some(i) => &IoType::ALL[i..=i],
            None => {
                return Err(BdevError::Invalid(format!(
                    "io_type '{other}' is not one of read, write, unmap, flush, write_zeroes, reset, all, clear"
                )))
            }
        },
    };
    let shared = error_bdev(&p.name)?;
    if p.io_type == "clear" {
        for rule in &shared.rules {
            rule.word.store(0, Ordering::Release);
        }
        shared.abort_gen.fetch_add(1, Ordering::AcqRel);
        return Ok(());
    }
    let kind = Kind::from_name(&p.error_type).ok_or_else(|| {
        BdevError::Invalid(format!(
            "error_type '{}' is not one of failure, pending, corrupt_data, nomem, nvme",
            p.error_type
        ))
    })?;
    let corrupt_value = p.corrupt_value.unwrap_or(0);
    if kind == Kind::CorruptData && corrupt_value == 0 {
        return Err(BdevError::Invalid("corrupt_value must be non-zero (it is XORed into the data)".into()));
    }
    let (sct, sc) = (p.nvme_sct.unwrap_or(0), p.nvme_sc.unwrap_or(0));
    if kind == Kind::Nvme && sct == 0 && sc == 0 {
        return Err(BdevError::Invalid("error_type nvme needs nvme_sct or nvme_sc".into()));
    }
    if kind != Kind::Nvme && (sct != 0 || sc != 0) {
        return Err(BdevError::Invalid("nvme_sct and nvme_sc apply only to error_type nvme".into()));
    }
    if sct > 7 || sc > 255 {
        return Err(BdevError::Invalid(format!(
            "NVMe status sct {sct} / sc {sc} out of range (sct 0..=7, sc 0..=255)"
        )));
    }
    let num = p.num.unwrap_or(1).min(COUNT_MASK);
    let word = if num == 0 { 0 } else { (kind as u64) << KIND_SHIFT | num };
    for &t in types {
        let rule = &shared.rules[type_index(t)];
        rule.queue_depth.store(p.queue_depth.unwrap_or(0), Ordering::Relaxed);
        rule.corrupt_offset.store(p.corrupt_offset.unwrap_or(0), Ordering::Relaxed);
        rule.corrupt_value.store(corrupt_value, Ordering::Relaxed);
        rule.nvme_status.store(((sct as u16) << 8) | sc as u16, Ordering::Relaxed);
        rule.word.store(word, Ordering::Release);
    }
    Ok(())
}

/// Releases held IOs: pending rules are disarmed and every channel
/// resubmits what it holds (`bdev_error_resume_pending`).
pub fn resume_pending(p: ErrorResumeParams) -> Result<(), BdevError> {
    let shared = error_bdev(&p.name)?;
    for rule in &shared.rules {
        let w = rule.word.load(Ordering::Acquire);
        if (w >> KIND_SHIFT) as u8 == Kind::Pending as u8 {
            let _ = rule.word.compare_exchange(w, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
    shared.resume_gen.fetch_add(1, Ordering::AcqRel);
    Ok(())
}

impl Bdev for ErrorBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }

    fn module(&self) -> &'static str {
        "error"
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        t == IoType::Reset || self.base.bdev().io_type_supported(t)
    }

    fn create_channel(&self) -> Result<Rc<dyn BdevChannel>, BdevError> {
        let base = self.base.channel()?;
        let shared = self.shared.clone();
        let ch = Rc::new_cyclic(|me: &Weak<ErrorChannel>| ErrorChannel {
            me: me.clone(),
            seen_abort_gen: Cell::new(shared.abort_gen.load(Ordering::Acquire)),
            seen_resume_gen: Cell::new(shared.resume_gen.load(Ordering::Acquire)),
            shared,
            base,
            parked: RefCell::new(IoSlab::with_capacity(PARKED_IOS_RESERVED)),
            held: RefCell::new(VecDeque::with_capacity(HELD_IOS_RESERVED)),
            at_base: Cell::new(0),
            poller: RefCell::new(None),
        });
        let weak = Rc::downgrade(&ch);
        let poller = reactor::register_poller("bdev_error", move || match weak.upgrade() {
            Some(ch) => ch.poll(),
            None => PollStatus::Done,
        });
        *ch.poller.borrow_mut() = Some(poller);
        Ok(ch)
    }

    fn driver_specific(&self) -> Option<(&'static str, Value)> {
        Some(("error_disk", json!({"base_bdev": self.base.name()})))
    }

    fn config(&self) -> Option<Value> {
        Some(json!({"method": "bdev_error_create", "params": {
            "base_name": self.base.name(), "uuid": self.props.uuid.to_string()}}))
    }

    fn destruct(&self, done: Box<dyn FnOnce() + Send>) {
        reactor::global::<ErrorBdevs>().table().remove(&self.props.uuid);
        Registry::get().release(&self.base, &self.owner);
        done();
    }
}

/// Marks a child read whose data is to be corrupted on completion (tag2).
const CORRUPT_READ: u64 = 1 << 63;

struct ErrorChannel {
    me: Weak<ErrorChannel>,
    shared: Arc<Shared>,
    base: Rc<Channel>,
    /// Parents whose child runs on the base; the child's tag is the slot.
    parked: RefCell<IoSlab>,
    /// IOs held by a "pending" rule until clear, resume or removal.
    held: RefCell<VecDeque<IoBox>>,
    /// IOs this channel has at the base (the rule's queue depth).
    at_base: Cell<u64>,
    seen_abort_gen: Cell<u64>,
    seen_resume_gen: Cell<u64>,
    poller: RefCell<Option<PollerHandle>>,
}

impl ErrorChannel {
    fn poll(&self) -> PollStatus {
        let mut busy = false;
        let abort_gen = self.shared.abort_gen.load(Ordering::Acquire);
        if abort_gen != self.seen_abort_gen.get() {
            self.seen_abort_gen.set(abort_gen);
            busy |= self.abort_held();
        }
        let resume_gen = self.shared.resume_gen.load(Ordering::Acquire);
        if resume_gen != self.seen_resume_gen.get() {
            self.seen_resume_gen.set(resume_gen);
            let n = self.held.borrow().len();
            for _ in 0..n {
                let Some(io) = self.held.borrow_mut().pop_front() else { break };
                self.submit(io);
                busy = true;
            }
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    fn abort_held(&self) -> bool {
        let mut any = false;
        loop {
            let Some(io) = self.held.borrow_mut().pop_front() else { break };
            io.fail(IoError::Aborted);
            any = true;
        }
        any
    }

    /// Sends `io` to the base through a child IO, corrupting written data
    /// on the way down (in a copy) or marking the read for corruption.
    fn forward(&self, io: IoBox, hit: Option<Hit>) {
        let mut buf = io.buf.clone();
        let mut tag2 = 0;
        if let Some(h) = hit.filter(|h| h.kind == Kind::CorruptData) {
            let len = buf.as_ref().map_or(0, |b| b.len() as u64);
            if h.corrupt_offset < len {
                match io.io_type {
                    IoType::Write => {
                        let Some(src) = buf.as_ref() else { return io.fail(IoError::OutOfRange) };
                        let Some(copy) = DmaBuf::alloc(src.len()) else { return io.fail(IoError::NoMemory) };
                        DmaBuf::copy_between(&copy, src, src.len());
                        copy.with_mut(|b| b[h.corrupt_offset as usize] ^= h.corrupt_value);
                        buf = Some(copy);
                    }
                    IoType::Read => tag2 = CORRUPT_READ | (h.corrupt_value as u64) << 48 | h.corrupt_offset,
                    _ => {}
                }
            }
        }
        let Some(mut child) = IoBox::data(io.io_type, io.offset_blocks, io.num_blocks, buf) else {
            return io.fail(IoError::NoMemory);
        };
        child.flags = io.flags;
        let Some(me) = self.me.upgrade() else { return io.fail(IoError::NoDevice) };
        child.tag = self.parked.borrow_mut().insert(io) as u64;
        child.tag2 = tag2;
        child.set_done(me);
        self.at_base.set(self.at_base.get() + 1);
        self.base.submit(child);
    }
}

impl BdevChannel for ErrorChannel {
    fn submit(&self, io: IoBox) {
        let hit = self.shared.take_hit(io.io_type, self.at_base.get());
        match hit.map(|h| h.kind) {
            Some(Kind::Failure) => io.fail(IoError::Media),
            Some(Kind::NoMemory) => io.fail(IoError::NoMemory),
            Some(Kind::Nvme) => {
                let s = hit.map_or(0, |h| h.nvme_status);
                io.fail(IoError::Nvme { sct: (s >> 8) as u8, sc: s as u8 })
            }
            Some(Kind::Pending) => self.held.borrow_mut().push_back(io),
            None | Some(Kind::CorruptData) if io.io_type == IoType::Reset => {
                // As SPDK: a reset aborts what the error bdev holds, on every
                // reactor (the others at their next poll), then resets the base.
                self.shared.abort_gen.fetch_add(1, Ordering::AcqRel);
                self.seen_abort_gen.set(self.shared.abort_gen.load(Ordering::Acquire));
                self.abort_held();
                if self.base.handle().bdev().io_type_supported(IoType::Reset) {
                    self.forward(io, None);
                } else {
                    io.complete(IoStatus::Success);
                }
            }
            None | Some(Kind::CorruptData) => self.forward(io, hit),
        }
    }
}

impl IoDone for ErrorChannel {
    fn io_done(&self, child: IoBox) {
        let (slot, tag2, status) = (child.tag as u32, child.tag2, child.status);
        drop(child);
        self.at_base.set(self.at_base.get().saturating_sub(1));
        let Some(parent) = self.parked.borrow_mut().take(slot) else {
            tracing::error!(slot, "error bdev: completion for an empty slot");
            return;
        };
        if tag2 & CORRUPT_READ != 0 && status == IoStatus::Success {
            let offset = (tag2 & ((1 << 48) - 1)) as usize;
            let value = (tag2 >> 48) as u8;
            if let Some(b) = parent.buf.as_ref() {
                b.with_mut(|bytes| {
                    if let Some(x) = bytes.get_mut(offset) {
                        *x ^= value;
                    }
                });
            }
        }
        parent.complete(status);
    }
}

impl Drop for ErrorChannel {
    fn drop(&mut self) {
        if let Some(p) = self.poller.get_mut().take() {
            p.unregister();
        }
    }
}
