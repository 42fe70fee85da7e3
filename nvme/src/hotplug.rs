//! The PCIe hotplug monitor (`bdev_nvme_set_hotplug enable=true`): every
//! period it lists the functions bound to vfio-pci, and an NVMe controller
//! (class 0x010802) that no controller drives is attached as
//! `HotInNvme<N>` through the caller's attach path (the RPC's). Removal
//! needs no monitor: the VFIO device request and all-ones registers detach
//! a controller whose device goes (see `ctrlr`).
//!
//! Each appearance of a function gets at most one attempt: once attempted,
//! found attached, or detached by the user, it is left alone until it
//! leaves vfio-pci (unplugged or unbound) and comes back. So a failed attach
//! is not retried against the same device every period, a controller
//! detached by RPC stays detached (as SPDK keeps it), and a device whose
//! controller was removed is not reopened while the kernel finishes
//! removing it.
//!
//! The scan runs on the reactor that enabled the monitor (the application
//! reactor). It is cheap and bounded, so it stays there: one readdir of the
//! driver's sysfs folder (at most `MAX_SCAN_FUNCTIONS` entries) and one
//! small read of `class` for a function not seen before; sysfs is kernel
//! memory and neither call waits on a device.

use crate::vfio::parse_bdf;
use crate::{Controllers, NvmeError};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// SPDK's default period (`NVME_HOTPLUG_POLL_PERIOD_DEFAULT`), used for 0.
pub const DEFAULT_PERIOD_US: u64 = 100_000;
/// SPDK's longest period (`NVME_HOTPLUG_POLL_PERIOD_MAX`).
pub const MAX_PERIOD_US: u64 = 10_000_000;
/// PCI class code of an NVMe controller: mass storage, non-volatile
/// memory, NVM Express programming interface.
pub const NVME_CLASS_CODE: u32 = 0x01_08_02;
/// The functions one scan looks at; a bound on the work of one period.
pub const MAX_SCAN_FUNCTIONS: usize = 256;

/// What the attach path reports: the bdev names, or why it failed.
pub type AttachDone = Box<dyn FnOnce(Result<Vec<String>, NvmeError>) + Send>;
/// Attaches the function `bdf` as controller `name` (runs on the monitor's
/// reactor; `done` may run later).
pub type AttachFn = Arc<dyn Fn(&str, &str, AttachDone) + Send + Sync>;

/// How the monitor runs.
#[derive(Clone)]
pub struct HotplugConfig {
    /// Where sysfs is mounted (`/sys`); a test points it at a tree of its own.
    pub sysfs_root: PathBuf,
    pub period_us: u64,
    pub attach: AttachFn,
}

/// Which functions one scan found, and which of them to attach now.
#[derive(Default)]
pub struct Scanner {
    /// Functions left alone until they leave vfio-pci.
    handled: Vec<String>,
    /// Unattached NVMe functions seen by the last scan: attached if the next
    /// scan sees them too. vfio-pci lists a function before its probe has
    /// made the VFIO group, and an attempt in that window would fail and,
    /// with one attempt per appearance, never be made again.
    settling: Vec<String>,
}

impl Scanner {
    /// One scan of `<sysfs_root>/bus/pci/drivers/vfio-pci`: the NVMe
    /// functions to attach now. `in_use` says whether a controller drives
    /// (or is being attached on) a function.
    pub fn scan(&mut self, sysfs_root: &Path, in_use: impl Fn(&str) -> bool) -> Vec<String> {
        let present = bound_functions(&sysfs_root.join("bus/pci/drivers/vfio-pci"));
        self.handled.retain(|b| present.contains(b));
        let mut settling = Vec::new();
        let mut attach = Vec::new();
        for bdf in present {
            if self.handled.contains(&bdf) {
                continue;
            }
            if in_use(&bdf) {
                self.handled.push(bdf);
                continue;
            }
            let driver_dir = sysfs_root.join("bus/pci/drivers/vfio-pci");
            if read_class(&driver_dir.join(&bdf)) != Some(NVME_CLASS_CODE) {
                // Not an NVMe controller; its class does not change while bound.
                self.handled.push(bdf);
                continue;
            }
            if self.settling.contains(&bdf) {
                self.handled.push(bdf.clone());
                attach.push(bdf);
            } else {
                settling.push(bdf);
            }
        }
        self.settling = settling;
        attach
    }

    /// The user detached the controller on `bdf`: not re-attached while the
    /// function stays.
    pub fn leave_alone(&mut self, bdf: &str) {
        if !self.handled.iter().any(|b| b == bdf) {
            self.handled.push(bdf.to_string());
        }
        self.settling.retain(|b| b != bdf);
    }
}

/// The PCI functions listed in a driver's sysfs folder (its other entries,
/// `bind`, `new_id`, `module`, ..., are not PCI addresses), at most
/// `MAX_SCAN_FUNCTIONS`, in a stable order.
fn bound_functions(driver_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(driver_dir) else { return Vec::new() };
    let mut found: Vec<String> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            parse_bdf(&name).ok().filter(|b| *b == name)
        })
        .take(MAX_SCAN_FUNCTIONS)
        .collect();
    found.sort();
    found
}

/// The function's class code (`0x010802` in sysfs), None if unreadable.
fn read_class(function_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(function_dir.join("class")).ok()?;
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// The monitor's state for one reactor set (`reactor::global`).
#[derive(Default)]
pub struct Hotplug(Mutex<State>);

#[derive(Default)]
struct State {
    scanner: Scanner,
    /// The running monitor's settings, None while off.
    running: Option<HotplugConfig>,
    /// Bumped by every enable and disable; a poller of an older one stops.
    generation: u64,
    /// SPDK numbers hot-inserted controllers from 0 for the process's life.
    next_index: u32,
    /// Period of the last enable, for save_config while off.
    period_us: Option<u64>,
}

fn state() -> Arc<Hotplug> {
    reactor::global::<Hotplug>()
}

fn lock(h: &Hotplug) -> std::sync::MutexGuard<'_, State> {
    h.0.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the monitor on this reactor, or restarts it with new settings.
/// A period of 0 is SPDK's default; one above `MAX_PERIOD_US` is refused.
pub fn enable(mut config: HotplugConfig) -> Result<(), NvmeError> {
    if reactor::current().is_none() {
        return Err(NvmeError::Invalid("the hotplug monitor must be enabled on a reactor".into()));
    }
    if config.period_us > MAX_PERIOD_US {
        return Err(NvmeError::Invalid(format!("period_us must be at most {MAX_PERIOD_US}")));
    }
    if config.period_us == 0 {
        config.period_us = DEFAULT_PERIOD_US;
    }
    let period = Duration::from_micros(config.period_us);
    let generation = {
        let h = state();
        let mut s = lock(&h);
        s.generation += 1;
        s.period_us = Some(config.period_us);
        s.running = Some(config);
        s.generation
    };
    reactor::register_timed_poller("nvme_hotplug", period, move || tick(generation));
    Ok(())
}

/// Stops the monitor (attaches already started run to their end).
pub fn disable() {
    let h = state();
    let mut s = lock(&h);
    s.generation += 1;
    s.running = None;
}

/// The user detached the PCIe controller on `bdf`: the monitor does not
/// attach it again while the function stays bound.
pub fn detached_by_user(bdf: &str) {
    if let Ok(bdf) = parse_bdf(bdf) {
        lock(&state()).scanner.leave_alone(&bdf);
    }
}

/// Whether the monitor runs, and its period.
pub fn is_enabled() -> Option<u64> {
    lock(&state()).running.as_ref().map(|c| c.period_us)
}

/// The `bdev_nvme_set_hotplug` call that restores the current state, as
/// SPDK's save_config writes it (also when off).
pub fn config_json() -> Value {
    let h = state();
    let s = lock(&h);
    let period_us = s.running.as_ref().map(|c| c.period_us).or(s.period_us).unwrap_or(DEFAULT_PERIOD_US);
    json!({"method": "bdev_nvme_set_hotplug", "params": {"period_us": period_us, "enable": s.running.is_some()}})
}

fn tick(generation: u64) -> reactor::PollStatus {
    let h = state();
    let table = Controllers::get();
    let (config, found, names) = {
        let mut s = lock(&h);
        if s.generation != generation {
            return reactor::PollStatus::Done;
        }
        let Some(config) = s.running.clone() else { return reactor::PollStatus::Done };
        let found = s.scanner.scan(&config.sysfs_root, |bdf| table.pcie_address_in_use(bdf));
        let mut names = Vec::with_capacity(found.len());
        for _ in &found {
            let mut name = format!("HotInNvme{}", s.next_index);
            while table.name_in_use(&name) {
                s.next_index += 1;
                name = format!("HotInNvme{}", s.next_index);
            }
            s.next_index += 1;
            names.push(name);
        }
        (config, found, names)
    };
    if found.is_empty() {
        return reactor::PollStatus::Idle;
    }
    for (bdf, name) in found.into_iter().zip(names) {
        tracing::info!(traddr = %bdf, ctrlr = %name, "hotplug: new NVMe controller on vfio-pci; attaching");
        let (b, n) = (bdf.clone(), name.clone());
        (config.attach)(
            &name,
            &bdf,
            Box::new(move |r| match r {
                Ok(bdevs) => tracing::info!(traddr = %b, ctrlr = %n, ?bdevs, "hotplug: attached"),
                Err(e) => tracing::error!(
                    traddr = %b, ctrlr = %n,
                    "hotplug: attach failed: {e}; not retried until the device leaves vfio-pci and returns"
                ),
            }),
        );
    }
    reactor::PollStatus::Busy
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A sysfs tree of its own: `bus/pci/drivers/<driver>/<bdf>/class`.
    struct FakeSysfs(PathBuf);

    impl FakeSysfs {
        fn new() -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let root = std::env::temp_dir().join(format!("nvraid-hotplug-{}-{n}", std::process::id()));
            drop(fs::remove_dir_all(&root));
            // The driver folder's own files, which are not functions.
            let driver = root.join("bus/pci/drivers/vfio-pci");
            fs::create_dir_all(&driver).unwrap();
            for f in ["bind", "unbind", "new_id", "uevent"] {
                fs::write(driver.join(f), "").unwrap();
            }
            FakeSysfs(root)
        }
        fn bind(&self, driver: &str, bdf: &str, class: &str) {
            let dir = self.0.join("bus/pci/drivers").join(driver).join(bdf);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("class"), format!("{class}\n")).unwrap();
        }
        fn unbind(&self, driver: &str, bdf: &str) {
            fs::remove_dir_all(self.0.join("bus/pci/drivers").join(driver).join(bdf)).unwrap();
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            drop(fs::remove_dir_all(&self.0));
        }
    }

    /// The scan attaches a new vfio-pci NVMe function once (after it has
    /// been listed for one period), ignores other classes, other drivers
    /// and functions a controller already drives, does not retry a failed
    /// one, and takes a function again once it has left and returned.
    #[test]
    fn scan_attaches_each_appearance_of_an_nvme_function_once() {
        let sys = FakeSysfs::new();
        let mut scanner = Scanner::default();
        let attached_by_rpc = "0000:00:05.0";
        let in_use = |bdf: &str| bdf == attached_by_rpc;
        sys.bind("vfio-pci", attached_by_rpc, "0x010802");
        sys.bind("vfio-pci", "0000:00:06.0", "0x020000"); // a NIC on vfio-pci
        sys.bind("nvme", "0000:00:07.0", "0x010802"); // the kernel's
        sys.bind("vfio-pci", "0000:01:00.0", "0x010802");
        assert_eq!(scanner.scan(&sys.0, in_use), Vec::<String>::new(), "settling for one period first");
        assert_eq!(scanner.scan(&sys.0, in_use), vec!["0000:01:00.0".to_string()]);
        for _ in 0..3 {
            // Its attach failed (nothing drives it): not tried again.
            assert_eq!(scanner.scan(&sys.0, in_use), Vec::<String>::new());
        }
        sys.unbind("vfio-pci", "0000:01:00.0");
        assert!(scanner.scan(&sys.0, in_use).is_empty());
        sys.bind("vfio-pci", "0000:01:00.0", "0x010802");
        scanner.scan(&sys.0, in_use);
        assert_eq!(scanner.scan(&sys.0, in_use), vec!["0000:01:00.0".to_string()], "it came back");

        // Detached by the user: left alone while it stays.
        sys.bind("vfio-pci", "0000:02:00.0", "0x010802");
        scanner.scan(&sys.0, in_use);
        scanner.leave_alone("0000:02:00.0");
        assert!(scanner.scan(&sys.0, in_use).is_empty());
        // A missing sysfs folder is an empty bus, not a failure.
        assert!(Scanner::default().scan(Path::new("/nonexistent-sysfs"), in_use).is_empty());
    }
}
