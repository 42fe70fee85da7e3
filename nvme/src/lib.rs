//! The userspace NVMe driver: VFIO (`vfio`), device memory and registers
//! (`mmio`), controller bring-up, admin queue, reset and shutdown
//! (`ctrlr`), per-reactor IO queue pairs (`qpair`), PRP lists (`prp`), the
//! NVMe bdev (`bdev`), and a seeded simulated controller (`sim`) behind the
//! same `RegisterSpace` so the driver's logic runs in ordinary tests.
//!
//! `unsafe` lives only in `mmio` (volatile/atomic device memory, BAR) and
//! `vfio` (ioctls, mmap), each block with its SAFETY note.
//!
//! The driver is written against `Arc<dyn RegisterSpace>` rather than a
//! generic parameter: one indirect call per doorbell costs nothing next to
//! an MMIO write, and the bdev, qpair and controller types stay single,
//! whichever device is behind them.

pub mod bdev;
pub mod ctrlr;
pub mod hotplug;
pub mod mmio;
pub mod prp;
pub mod qpair;
pub mod sim;
pub mod vfio;

pub use crate::bdev::NvmeBdev;
pub use ctrlr::{AttachTarget, Controller, CtrlrOpts, CtrlrState, Namespace, NamespaceChange, TransportId};
pub use mmio::{reactor_blocking_waits, RegisterSpace};
pub use sim::{SimConfig, SimController, SimNamespace};

use ::bdev::{Bdev, Registry};
use serde_json::Value;
use std::sync::{Arc, Mutex};

/// Errors of attaching, resetting and detaching controllers. IO errors
/// travel in `bdev::IoStatus` instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NvmeError {
    #[error("{dev}: controller did not become ready within {waited_ms} ms (CAP.TO allows {cap_to_ms} ms)")]
    NotReady { dev: String, waited_ms: u64, cap_to_ms: u64 },
    #[error("{dev}: controller did not become disabled (CSTS.RDY stuck at 1) within {waited_ms} ms")]
    DisableTimeout { dev: String, waited_ms: u64 },
    #[error("{dev}: shutdown did not complete within {waited_ms} ms")]
    ShutdownTimeout { dev: String, waited_ms: u64 },
    #[error("{0}: controller fatal status (CSTS.CFS)")]
    Fatal(String),
    #[error("{0}: device does not answer (registers read all ones)")]
    Gone(String),
    #[error("{dev}: admin command {what} timed out after {waited_ms} ms")]
    AdminTimeout { dev: String, what: &'static str, waited_ms: u64 },
    #[error("{dev}: admin command {what} failed: {status:?}")]
    AdminFailed { dev: String, what: &'static str, status: nvme_spec::Status },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Vfio(String, i32),
    #[error("out of memory: {0}")]
    NoMemory(String),
    #[error("{0}")]
    Invalid(String),
    #[error("controller {0} is {1}")]
    State(String, &'static str),
    #[error("controller {0} already exists")]
    Exists(String),
    #[error("controller {0} not found")]
    NotFound(String),
}

impl NvmeError {
    /// The positive errno SPDK would report.
    pub fn errno(&self) -> i32 {
        match self {
            NvmeError::NotReady { .. } | NvmeError::DisableTimeout { .. } | NvmeError::ShutdownTimeout { .. } => {
                libc::ETIMEDOUT
            }
            NvmeError::AdminTimeout { .. } => libc::ETIMEDOUT,
            NvmeError::Fatal(_) | NvmeError::AdminFailed { .. } => libc::EIO,
            NvmeError::Gone(_) | NvmeError::NotFound(_) => libc::ENODEV,
            NvmeError::Unsupported(_) => libc::ENOTSUP,
            NvmeError::Vfio(_, e) => *e,
            NvmeError::NoMemory(_) => libc::ENOMEM,
            NvmeError::Invalid(_) => libc::EINVAL,
            NvmeError::State(..) => libc::EBUSY,
            NvmeError::Exists(_) => libc::EEXIST,
        }
    }
}

/// How to reach a controller.
pub enum Transport {
    /// A PCI function bound to vfio-pci.
    Pcie { traddr: String },
    /// The simulated controller (a test transport: `trtype: "SIM"`). Its
    /// poller runs on the attaching reactor.
    Sim(Arc<SimController>),
}

struct Entry {
    ctrlr: Arc<Controller>,
    bdevs: Vec<String>,
}

/// The attached controllers of one reactor set (`reactor::global`), and the
/// names (with the PCI address of a PCIe one) of those being attached.
#[derive(Default)]
pub struct Controllers {
    attached: Mutex<Vec<Entry>>,
    attaching: Mutex<Vec<(String, Option<String>)>>,
}

impl Controllers {
    pub fn get() -> Arc<Controllers> {
        reactor::global::<Controllers>()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.attached.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn lookup(&self, name: &str) -> Option<Arc<Controller>> {
        self.lock().iter().find(|e| e.ctrlr.name() == name).map(|e| e.ctrlr.clone())
    }

    pub fn list(&self) -> Vec<Arc<Controller>> {
        self.lock().iter().map(|e| e.ctrlr.clone()).collect()
    }

    /// A controller of this name is attached or being attached.
    pub fn name_in_use(&self, name: &str) -> bool {
        self.lookup(name).is_some()
            || self.attaching.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|(n, _)| n == name)
    }

    /// The PCI function `bdf` (canonical, as `vfio::parse_bdf` gives it) is
    /// driven by an attached controller or one being attached.
    pub fn pcie_address_in_use(&self, bdf: &str) -> bool {
        let attached = self.lock().iter().any(|e| e.ctrlr.trid().trtype == "PCIe" && e.ctrlr.trid().traddr == bdf);
        attached
            || self.attaching.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|(_, a)| a.as_deref() == Some(bdf))
    }
}

/// Attaches a controller and registers one bdev per active namespace
/// (`NAMEn<nsid>`); `done` gets their names. Runs on a reactor, which
/// becomes the controller's home, and never blocks it: the bring-up is a
/// chain of polled steps and `done` runs on this reactor when it ends.
/// `config` is the RPC that recreates it, for save_config.
pub fn attach_controller(
    name: &str,
    transport: Transport,
    opts: CtrlrOpts,
    config: Option<Value>,
    done: impl FnOnce(Result<Vec<String>, NvmeError>) + Send + 'static,
) {
    if reactor::current().is_none() {
        return done(Err(NvmeError::Invalid("attach_controller must run on a reactor".into())));
    }
    if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '/') {
        return done(Err(NvmeError::Invalid(format!("controller name '{name}' is not valid"))));
    }
    let table = Controllers::get();
    // The address is reserved with the name, so the hotplug monitor leaves
    // a function alone while an RPC brings it up.
    let pcie_address = match &transport {
        Transport::Pcie { traddr } => vfio::parse_bdf(traddr).ok(),
        Transport::Sim(_) => None,
    };
    {
        let mut attaching = table.attaching.lock().unwrap_or_else(|e| e.into_inner());
        if table.lookup(name).is_some() || attaching.iter().any(|(n, _)| n == name) {
            return done(Err(NvmeError::Exists(name.to_string())));
        }
        attaching.push((name.to_string(), pcie_address));
    }
    let unreserve = {
        let (table, name) = (table.clone(), name.to_string());
        move || table.attaching.lock().unwrap_or_else(|e| e.into_inner()).retain(|(n, _)| *n != name)
    };
    let (target, pollers) = match transport {
        Transport::Pcie { traddr } => match vfio::VfioDevice::open(&traddr) {
            Ok(dev) => {
                let trid = TransportId { trtype: "PCIe".into(), traddr: dev.bdf().to_string() };
                (AttachTarget { regs: dev, trid, keep: None }, Vec::new())
            }
            Err(e) => {
                unreserve();
                return done(Err(e));
            }
        },
        Transport::Sim(sim) => {
            let trid = TransportId { trtype: "SIM".into(), traddr: format!("sim:{}", sim.config().seed) };
            let poller = sim.start_poller();
            (AttachTarget { regs: sim, trid, keep: None }, vec![poller])
        }
    };
    let name = name.to_string();
    Controller::attach(
        &name.clone(),
        target,
        opts,
        pollers,
        Box::new(move |r| {
            unreserve();
            match r {
                Ok(ctrlr) => done(register_bdevs(&name, ctrlr, config)),
                Err(e) => done(Err(e)),
            }
        }),
    );
}

/// The attached controller's bdevs, one per namespace; on a failure the
/// controller is detached again.
fn register_bdevs(name: &str, ctrlr: Arc<Controller>, config: Option<Value>) -> Result<Vec<String>, NvmeError> {
    let registry = Registry::get();
    let mut names = Vec::new();
    let mut failure = None;
    for (i, ns) in ctrlr.namespaces().into_iter().enumerate() {
        let cfg = if i == 0 { config.clone() } else { None };
        let b = Arc::new(NvmeBdev::new(ctrlr.clone(), ns, cfg)) as Arc<dyn Bdev>;
        match registry.register(b) {
            Ok(h) => names.push(h.name().to_string()),
            Err(e) => {
                failure = Some(NvmeError::Invalid(format!("{name}: {e}")));
                break;
            }
        }
    }
    Controllers::get().lock().push(Entry { ctrlr: ctrlr.clone(), bdevs: names.clone() });
    ctrlr.start_events();
    if let Some(e) = failure {
        // Undo: the bdevs made so far have no IO yet; detach runs to completion
        // on later reactor loops.
        detach_controller(name, |_| ());
        return Err(e);
    }
    Ok(names)
}

/// Detaches a controller: its bdevs are removed (in-flight IO completes or
/// is aborted first), its IO queues deleted, then the controller is shut
/// down (CC.SHN) and its memory released. `done` runs on the controller's
/// home reactor.
pub fn detach_controller(name: &str, done: impl FnOnce(Result<(), NvmeError>) + Send + 'static) {
    if reactor::current().is_none() {
        return done(Err(NvmeError::Invalid("detach_controller must run on a reactor".into())));
    }
    let table = Controllers::get();
    let entry = {
        let mut t = table.lock();
        match t.iter().position(|e| e.ctrlr.name() == name) {
            Some(i) => t.remove(i),
            None => return done(Err(NvmeError::NotFound(name.to_string()))),
        }
    };
    entry.ctrlr.mark_detaching();
    let home = entry.ctrlr.home;
    let run = move || unregister_next(entry.ctrlr, entry.bdevs, Box::new(done));
    if reactor::current() == Some(home) {
        run();
    } else {
        reactor::send(home, run);
    }
}

type DetachDone = Box<dyn FnOnce(Result<(), NvmeError>) + Send>;

fn unregister_next(ctrlr: Arc<Controller>, mut bdevs: Vec<String>, done: DetachDone) {
    let Some(name) = bdevs.pop() else {
        let home = ctrlr.home;
        if reactor::current() == Some(home) {
            ctrlr.retire(done);
        } else {
            reactor::send(home, move || ctrlr.retire(done));
        }
        return;
    };
    let registry = Registry::get();
    let handle = registry.list().into_iter().find(|h| h.name() == name);
    match handle {
        Some(h) => registry.force_unregister(h, move |r| {
            if let Err(e) = r {
                tracing::warn!("detach: {e}");
            }
            unregister_next(ctrlr, bdevs, done);
        }),
        None => unregister_next(ctrlr, bdevs, done),
    }
}

/// A namespace of an attached controller changed (an asynchronous event):
/// a new one gets its bdev, a removed one's bdev is hot-removed (its open
/// descriptors are told, in-flight IO ends first), and a resized one's bdev
/// takes the new block count, which its holders are told (a shrink too: the
/// media is smaller whatever they hold, and IO past the new end would fail
/// at the device anyway). Home reactor.
pub(crate) fn namespace_changed(ctrlr: &Arc<Controller>, change: NamespaceChange) {
    let table = Controllers::get();
    let registry = Registry::get();
    let name = ctrlr.name().to_string();
    match change {
        NamespaceChange::Added(ns) => {
            let nsid = ns.nsid;
            let b = Arc::new(NvmeBdev::new(ctrlr.clone(), ns, None)) as Arc<dyn Bdev>;
            match registry.register(b) {
                Ok(h) => {
                    tracing::info!(ctrlr = %name, nsid, bdev = h.name(), "namespace added");
                    if let Some(e) = table.lock().iter_mut().find(|e| Arc::ptr_eq(&e.ctrlr, ctrlr)) {
                        e.bdevs.push(h.name().to_string());
                    }
                }
                Err(e) => tracing::error!(ctrlr = %name, nsid, "namespace added, no bdev: {e}"),
            }
        }
        NamespaceChange::Removed(nsid) => {
            let bdev = format!("{name}n{nsid}");
            if let Some(e) = table.lock().iter_mut().find(|e| Arc::ptr_eq(&e.ctrlr, ctrlr)) {
                e.bdevs.retain(|b| *b != bdev);
            }
            tracing::warn!(ctrlr = %name, nsid, bdev, "namespace removed; hot-removing its bdev");
            if let Some(h) = registry.list().into_iter().find(|h| h.name() == bdev) {
                registry.force_unregister(h, move |r| {
                    if let Err(e) = r {
                        tracing::warn!(bdev, "hot-remove: {e}");
                    }
                });
            }
        }
        NamespaceChange::Resized { nsid, old_blocks, new_blocks } => {
            let bdev = format!("{name}n{nsid}");
            tracing::info!(ctrlr = %name, nsid, old_blocks, new_blocks, bdev, "namespace resized");
            match registry.list().into_iter().find(|h| h.name() == bdev) {
                Some(h) => {
                    if let Err(e) = h.media_resized(new_blocks) {
                        tracing::error!(bdev, "namespace resized, bdev not: {e}");
                    }
                }
                None => tracing::warn!(ctrlr = %name, nsid, "namespace resized, but it has no bdev"),
            }
        }
    }
}

/// The controller's device is gone: it is detached (its bdevs hot-removed;
/// their IO has already failed with `NoDevice`). Home reactor.
pub(crate) fn controller_removed(ctrlr: &Arc<Controller>) {
    let name = ctrlr.name().to_string();
    detach_controller(&name.clone(), move |r| match r {
        Ok(()) => tracing::warn!(ctrlr = %name, "removed NVMe controller detached"),
        Err(e) => tracing::warn!(ctrlr = %name, "removed NVMe controller: {e}"),
    });
}

/// `bdev_nvme_get_controllers` entries (one controller, or all).
pub fn controllers_json(name: Option<&str>) -> Result<Vec<Value>, NvmeError> {
    if reactor::current().is_none() {
        return Err(NvmeError::Invalid("controllers_json must run on a reactor".into()));
    }
    let table = Controllers::get();
    match name {
        Some(n) => table.lookup(n).map(|c| vec![c.info_json()]).ok_or_else(|| NvmeError::NotFound(n.to_string())),
        None => Ok(table.list().iter().map(|c| c.info_json()).collect()),
    }
}
