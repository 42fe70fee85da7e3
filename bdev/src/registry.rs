//! The bdev registry of one application (one reactor set): names, aliases and
//! UUIDs, claims (a bdev claimed by a RAID cannot be claimed again or deleted
//! under it), examine hooks, unregistration that waits for in-flight IO, and
//! the block count that may change while the bdev is registered (resize),
//! with events to the bdev's holders.
//!
//! Control plane only: a mutex guards the tables; the IO path reads only the
//! block count, an atomic.

use crate::channel::{Bdev, BdevProps, Channel, IoStatTotals};
use crate::BdevError;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Examiner = Arc<dyn Fn(&BdevHandle) + Send + Sync>;
type RemoveListener = Box<dyn FnOnce() + Send>;
type EventListener = Arc<dyn Fn(BdevEvent) + Send + Sync>;

/// Something that happened to a registered bdev, told to its holders (SPDK's
/// `spdk_bdev_event_type`; hot-remove has its own one-shot `on_remove`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BdevEvent {
    /// The block count changed (SPDK_BDEV_EVENT_RESIZE). IO beyond
    /// `new_blocks` already fails out of range when this is told.
    Resize { old_blocks: u64, new_blocks: u64 },
    /// The device answers again after a loss during which its IO failed
    /// (an NVMe/TCP controller reconnected). A holder that gave up on the
    /// bdev may take it back (a RAID re-adds a failed member).
    Restored,
}

/// Names one listener added with [`BdevHandle::on_event`], to remove it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerId(u64);

struct Entry {
    id: u64,
    bdev: Arc<dyn Bdev>,
    aliases: Mutex<Vec<String>>,
    claim: Mutex<Option<String>>,
    removing: AtomicBool,
    on_remove: Mutex<Vec<RemoveListener>>,
    /// The current block count: starts at `props().num_blocks`, changes on
    /// resize. Written under `listeners`' lock (one resize at a time); the
    /// IO path reads it without a lock.
    num_blocks: AtomicU64,
    listeners: Mutex<Vec<(ListenerId, EventListener)>>,
    next_listener: AtomicU64,
}

/// A registered bdev. Cheap to clone; compare with `same`.
#[derive(Clone)]
pub struct BdevHandle(Arc<Entry>);

impl BdevHandle {
    pub fn id(&self) -> u64 {
        self.0.id
    }
    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.0.bdev
    }
    pub fn props(&self) -> &BdevProps {
        self.0.bdev.props()
    }
    pub fn name(&self) -> &str {
        &self.props().name
    }
    /// The current block count (`props().num_blocks` is the size at
    /// creation; a resize changes this one).
    pub fn num_blocks(&self) -> u64 {
        self.0.num_blocks.load(Ordering::Acquire)
    }
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks() * u64::from(self.props().block_size)
    }
    pub fn aliases(&self) -> Vec<String> {
        self.0.aliases.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn claimed_by(&self) -> Option<String> {
        self.0.claim.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn is_removing(&self) -> bool {
        self.0.removing.load(Ordering::Acquire)
    }
    pub fn same(&self, other: &BdevHandle) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Runs `f` (once, on some reactor) when the bdev starts going away, so
    /// holders can drop their channels: the hot-remove notification.
    pub fn on_remove(&self, f: impl FnOnce() + Send + 'static) {
        self.0.on_remove.lock().unwrap_or_else(|e| e.into_inner()).push(Box::new(f));
    }

    /// Runs `f` for every later event on this bdev (a resize), on the thread
    /// that caused it, until [`BdevHandle::drop_listener`]: SPDK's event
    /// callback of an open descriptor. `f` must be quick (send a message).
    pub fn on_event(&self, f: impl Fn(BdevEvent) + Send + Sync + 'static) -> ListenerId {
        let id = ListenerId(self.0.next_listener.fetch_add(1, Ordering::Relaxed));
        self.0.listeners.lock().unwrap_or_else(|e| e.into_inner()).push((id, Arc::new(f)));
        id
    }

    pub fn drop_listener(&self, id: ListenerId) {
        self.0.listeners.lock().unwrap_or_else(|e| e.into_inner()).retain(|(l, _)| *l != id);
    }

    /// A module changes the bdev's block count (SPDK's
    /// `spdk_bdev_notify_blockcnt_change`): growing always succeeds;
    /// shrinking is refused (`EBUSY`) while the bdev is held open (claimed,
    /// or with an event listener), since a holder may use the blocks that
    /// would go. Holders get [`BdevEvent::Resize`].
    pub fn notify_blockcnt_change(&self, new_blocks: u64) -> Result<(), BdevError> {
        self.set_num_blocks(new_blocks, false)
    }

    /// The media itself changed size (an NVMe namespace was resized): the
    /// bdev follows even when it shrank under a holder, because IO beyond
    /// the new end fails at the device anyway; the holder learns it from
    /// the event (a RAID fails the member) and the shrink is logged.
    pub fn media_resized(&self, new_blocks: u64) -> Result<(), BdevError> {
        self.set_num_blocks(new_blocks, true)
    }

    fn set_num_blocks(&self, new_blocks: u64, forced: bool) -> Result<(), BdevError> {
        if new_blocks == 0 {
            return Err(BdevError::Invalid(format!("{}: a bdev cannot shrink to 0 blocks", self.name())));
        }
        // Held across the check and the store: one resize at a time.
        let l = self.0.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let old_blocks = self.num_blocks();
        if new_blocks == old_blocks {
            return Ok(());
        }
        let open = !l.is_empty() || self.claimed_by().is_some();
        if new_blocks < old_blocks && open {
            if !forced {
                return Err(BdevError::Os(
                    format!("{} is open: cannot shrink it from {old_blocks} to {new_blocks} blocks", self.name()),
                    libc::EBUSY,
                ));
            }
            tracing::warn!(name = self.name(), old_blocks, new_blocks, "bdev shrank under its holders");
        }
        self.0.num_blocks.store(new_blocks, Ordering::Release);
        tracing::info!(name = self.name(), old_blocks, new_blocks, "bdev resized");
        let listeners: Vec<EventListener> = l.iter().map(|(_, f)| f.clone()).collect();
        drop(l);
        let ev = BdevEvent::Resize { old_blocks, new_blocks };
        for f in listeners {
            f(ev);
        }
        Ok(())
    }

    /// The module tells the bdev's holders its device is back
    /// ([`BdevEvent::Restored`]).
    pub fn notify_restored(&self) {
        let listeners: Vec<EventListener> =
            self.0.listeners.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(_, f)| f.clone()).collect();
        tracing::info!(name = self.name(), "bdev restored");
        for f in listeners {
            f(BdevEvent::Restored);
        }
    }

    /// This reactor's channel for the bdev (created on first use, then cached).
    pub fn channel(&self) -> Result<Rc<Channel>, BdevError> {
        if self.is_removing() {
            return Err(BdevError::NotFound(self.name().to_string()));
        }
        let cache = reactor::local::<ChannelCache>();
        if let Some(ch) = cache.0.borrow().get(&self.id()) {
            return Ok(ch.clone());
        }
        let inner = self.0.bdev.create_channel()?;
        let ch = Rc::new(Channel::new(self.clone(), inner));
        cache.0.borrow_mut().insert(self.id(), ch.clone());
        Ok(ch)
    }

    /// The call that recreates this bdev (`Bdev::config`) at its current
    /// size: after a resize, a `num_blocks` parameter is the new count.
    pub fn config(&self) -> Option<Value> {
        let mut c = self.0.bdev.config()?;
        if let Some(n) = c.get_mut("params").and_then(|p| p.get_mut("num_blocks")) {
            *n = Value::from(self.num_blocks());
        }
        Some(c)
    }

    /// `bdev_get_bdevs` entry, in SPDK's shape.
    pub fn info_json(&self) -> Value {
        let p = self.props();
        let b = &self.0.bdev;
        let mut types = serde_json::Map::new();
        for t in crate::IoType::ALL {
            types.insert(t.name().into(), Value::Bool(b.io_type_supported(t)));
        }
        for extra in [
            "nvme_admin",
            "nvme_io",
            "nvme_io_md",
            "zcopy",
            "get_zone_info",
            "zone_management",
            "zone_append",
            "compare",
            "compare_and_write",
            "abort",
            "seek_hole",
            "seek_data",
            "copy",
            "nvme_iov_md",
        ] {
            types.insert(extra.into(), Value::Bool(false));
        }
        let mut driver_specific = serde_json::Map::new();
        if let Some((k, v)) = b.driver_specific() {
            driver_specific.insert(k.into(), v);
        }
        json!({
            "name": p.name,
            "aliases": self.aliases(),
            "product_name": p.product_name,
            "block_size": p.block_size,
            "num_blocks": self.num_blocks(),
            "uuid": p.uuid.to_string(),
            "optimal_io_boundary": p.optimal_io_boundary,
            "assigned_rate_limits": crate::qos::assigned_rate_limits_json(self),
            "claimed": self.claimed_by().is_some(),
            "zoned": false,
            "supported_io_types": types,
            "driver_specific": driver_specific,
        })
    }
}

/// Per-reactor cache of channels, keyed by bdev id.
#[derive(Default)]
struct ChannelCache(RefCell<HashMap<u64, Rc<Channel>>>);

#[derive(Default)]
struct Tables {
    bdevs: Vec<BdevHandle>,
    examiners: Vec<Examiner>,
}

/// The registry of one reactor set: `reactor::global::<Registry>()`.
#[derive(Default)]
pub struct Registry {
    tables: Mutex<Tables>,
    next_id: AtomicU64,
    /// Examinations still under way (an examiner that reads the bdev holds
    /// an [`ExamineHold`] until it has decided): `bdev_wait_for_examine`.
    examines: Arc<AtomicU64>,
}

/// Keeps `Registry::examines_pending` above zero while an examiner works
/// asynchronously on a bdev; dropping it ends the examination.
pub struct ExamineHold(Arc<AtomicU64>);

impl Drop for ExamineHold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Registry {
    /// The registry of the current reactor's set.
    pub fn get() -> Arc<Registry> {
        reactor::global::<Registry>()
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn find(t: &Tables, key: &str) -> Option<BdevHandle> {
        t.bdevs
            .iter()
            .find(|h| h.name() == key || h.props().uuid.to_string() == key || h.aliases().iter().any(|a| a == key))
            .cloned()
    }

    /// Adds a bdev; its name, UUID and aliases must be new. Examiners then
    /// look at it (a RAID waiting for a member claims it, say).
    pub fn register(&self, bdev: Arc<dyn Bdev>) -> Result<BdevHandle, BdevError> {
        let handle = {
            let mut t = self.tables();
            let p = bdev.props();
            if p.name.is_empty() {
                return Err(BdevError::Invalid("bdev name must not be empty".into()));
            }
            if Self::find(&t, &p.name).is_some() {
                return Err(BdevError::Exists(p.name.clone()));
            }
            let uuid = p.uuid.to_string();
            let initial_blocks = p.num_blocks;
            if Self::find(&t, &uuid).is_some() {
                return Err(BdevError::Exists(format!("{} (UUID {uuid} is in use)", p.name)));
            }
            let h = BdevHandle(Arc::new(Entry {
                id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
                bdev,
                aliases: Mutex::new(vec![uuid]),
                claim: Mutex::new(None),
                removing: AtomicBool::new(false),
                on_remove: Mutex::new(Vec::new()),
                num_blocks: AtomicU64::new(initial_blocks),
                listeners: Mutex::new(Vec::new()),
                next_listener: AtomicU64::new(0),
            }));
            t.bdevs.push(h.clone());
            h
        };
        tracing::info!(name = handle.name(), module = handle.bdev().module(), "bdev registered");
        let examiners = self.tables().examiners.clone();
        for e in examiners {
            e(&handle);
        }
        Ok(handle)
    }

    pub fn lookup(&self, key: &str) -> Option<BdevHandle> {
        Self::find(&self.tables(), key).filter(|h| !h.is_removing())
    }

    pub fn list(&self) -> Vec<BdevHandle> {
        self.tables().bdevs.iter().filter(|h| !h.is_removing()).cloned().collect()
    }

    pub fn add_alias(&self, key: &str, alias: &str) -> Result<(), BdevError> {
        let t = self.tables();
        if Self::find(&t, alias).is_some() {
            return Err(BdevError::Exists(alias.to_string()));
        }
        let h = Self::find(&t, key).ok_or_else(|| BdevError::NotFound(key.to_string()))?;
        h.0.aliases.lock().unwrap_or_else(|e| e.into_inner()).push(alias.to_string());
        Ok(())
    }

    /// Marks an asynchronous examination as started (see [`ExamineHold`]).
    pub fn examine_hold(&self) -> ExamineHold {
        self.examines.fetch_add(1, Ordering::AcqRel);
        ExamineHold(self.examines.clone())
    }

    /// Asynchronous examinations not finished yet.
    pub fn examines_pending(&self) -> u64 {
        self.examines.load(Ordering::Acquire)
    }

    /// Runs `f` for every bdev registered from now on, and for those present.
    pub fn add_examiner(&self, f: Examiner) {
        let present = {
            let mut t = self.tables();
            t.examiners.push(f.clone());
            t.bdevs.clone()
        };
        for h in present.iter().filter(|h| !h.is_removing()) {
            f(h);
        }
    }

    /// Claims a bdev for exclusive use by `owner` (a RAID, an error bdev).
    pub fn claim(&self, key: &str, owner: &str) -> Result<BdevHandle, BdevError> {
        let h = self.lookup(key).ok_or_else(|| BdevError::NotFound(key.to_string()))?;
        let mut c = h.0.claim.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(by) = &*c {
            return Err(BdevError::Claimed(h.name().to_string(), by.clone()));
        }
        *c = Some(owner.to_string());
        drop(c);
        Ok(h)
    }

    /// Releases `owner`'s claim (no-op if someone else holds it).
    pub fn release(&self, h: &BdevHandle, owner: &str) {
        let mut c = h.0.claim.lock().unwrap_or_else(|e| e.into_inner());
        if c.as_deref() == Some(owner) {
            *c = None;
        }
    }

    /// Removes a bdev: refuses a claimed one; otherwise new IO fails at once,
    /// holders are told (`on_remove`), and the bdev is destructed only after
    /// every reactor's in-flight IO on it has completed. Must run on a reactor.
    pub fn unregister(&self, key: &str, done: impl FnOnce(Result<(), BdevError>) + Send + 'static) {
        let h = match self.lookup(key) {
            Some(h) => h,
            None => return done(Err(BdevError::NotFound(key.to_string()))),
        };
        if let Some(by) = h.claimed_by() {
            return done(Err(BdevError::Claimed(h.name().to_string(), by)));
        }
        self.force_unregister(h, done);
    }

    /// Like `unregister` but ignores claims (the claimer is tearing down).
    pub fn force_unregister(&self, h: BdevHandle, done: impl FnOnce(Result<(), BdevError>) + Send + 'static) {
        if h.0.removing.swap(true, Ordering::AcqRel) {
            return done(Err(BdevError::NotFound(format!("{} (already being removed)", h.name()))));
        }
        let listeners = std::mem::take(&mut *h.0.on_remove.lock().unwrap_or_else(|e| e.into_inner()));
        for l in listeners {
            l();
        }
        let registry = Registry::get();
        drain_then(h, registry, Box::new(done));
    }

    /// Sums this bdev's IO statistics over all reactors, then calls `done`.
    pub fn iostat(h: &BdevHandle, done: impl FnOnce(IoStatTotals) + Send + 'static) {
        let acc = Arc::new(Mutex::new(IoStatTotals::default()));
        let (acc2, id) = (acc.clone(), h.id());
        reactor::for_each_reactor(
            Arc::new(move || {
                let cache = reactor::local::<ChannelCache>();
                let ch = cache.0.borrow().get(&id).cloned();
                if let Some(ch) = ch {
                    ch.stats().add_to(&mut acc2.lock().unwrap_or_else(|e| e.into_inner()));
                }
            }),
            move || done(std::mem::take(&mut *acc.lock().unwrap_or_else(|e| e.into_inner()))),
        );
    }
}

/// Waits until no reactor has IO in flight on `h`, dropping cached channels
/// as they empty, then destructs the bdev and forgets it.
fn drain_then(h: BdevHandle, registry: Arc<Registry>, done: Box<dyn FnOnce(Result<(), BdevError>) + Send>) {
    let in_flight = Arc::new(AtomicU64::new(0));
    let (inf2, id) = (in_flight.clone(), h.id());
    reactor::for_each_reactor(
        Arc::new(move || {
            let cache = reactor::local::<ChannelCache>();
            let mut c = cache.0.borrow_mut();
            if let Some(ch) = c.get(&id) {
                let n = ch.stats().in_flight.get();
                inf2.fetch_add(n, Ordering::Relaxed);
                if n == 0 {
                    c.remove(&id);
                }
            }
        }),
        move || {
            if in_flight.load(Ordering::Relaxed) > 0 {
                // Try again shortly: IO completes in bounded time (devices
                // time out), so this ends.
                let mut once = Some((h, registry, done));
                reactor::register_timed_poller("bdev_unregister_wait", Duration::from_millis(1), move || {
                    if let Some((h, registry, done)) = once.take() {
                        drain_then(h, registry, done);
                    }
                    reactor::PollStatus::Done
                });
                return;
            }
            let name = h.name().to_string();
            let (h2, registry2) = (h.clone(), registry.clone());
            h.bdev().destruct(Box::new(move || {
                registry2.tables().bdevs.retain(|x| !x.same(&h2));
                tracing::info!(name, "bdev unregistered");
                done(Ok(()));
            }));
        },
    );
}
