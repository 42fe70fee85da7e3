//! The hotplug monitor on a threaded reactor over a sysfs tree of the
//! test's own: a function newly bound to vfio-pci with the NVMe class is
//! handed to the attach path once, named `HotInNvme<N>` past names in use;
//! a failed attach is not retried while the function stays; disable stops
//! the scans; save_config's entry follows the state. The attach hook stands
//! in for VFIO (it attaches a simulated controller under the given name).

use nvme::hotplug::{self, AttachDone, HotplugConfig};
use nvme::{CtrlrOpts, SimConfig, SimController, Transport};
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);
const PERIOD_US: u64 = 20_000;

fn bind_vfio(root: &Path, bdf: &str) {
    let dir = root.join("bus/pci/drivers/vfio-pci").join(bdf);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("class"), "0x010802\n").unwrap();
}

fn on_reactor<T: Send + 'static>(set: &ReactorSet, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    set.send(0, move || tx.send(f()).unwrap());
    rx.recv_timeout(WAIT).expect("reactor did not answer")
}

fn attach_sim(name: &str, done: AttachDone) {
    // A seed of its own: the seed makes the namespace UUID, which must be unique.
    static SEED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(5);
    let seed = SEED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let sim = SimController::new(SimConfig { seed, ..Default::default() }).unwrap();
    nvme::attach_controller(name, Transport::Sim(sim), CtrlrOpts::default(), None, done);
}

#[test]
fn monitor_attaches_new_vfio_nvme_functions_once_and_stops_when_disabled() {
    let root: PathBuf = std::env::temp_dir().join(format!("nvraid-hotplug-it-{}", std::process::id()));
    drop(std::fs::remove_dir_all(&root));
    std::fs::create_dir_all(root.join("bus/pci/drivers/vfio-pci")).unwrap();
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0], IdlePolicy::sleep()) };
    let set = ReactorSet::start(cfg, || ()).unwrap();

    // "HotInNvme0" is taken (attached by RPC): the first one gets 1.
    let (tx, rx) = mpsc::channel();
    set.send(0, move || attach_sim("HotInNvme0", Box::new(move |r| tx.send(r.is_ok()).unwrap())));
    assert!(rx.recv_timeout(WAIT).unwrap());

    let (calls_tx, calls) = mpsc::channel::<(String, String)>();
    let calls_tx = std::sync::Mutex::new(calls_tx);
    let (results_tx, results) = mpsc::channel::<Result<Vec<String>, String>>();
    let results_tx = std::sync::Mutex::new(results_tx);
    let attach: hotplug::AttachFn = Arc::new(move |name: &str, bdf: &str, done: AttachDone| {
        calls_tx.lock().unwrap().send((name.to_string(), bdf.to_string())).unwrap();
        if bdf == "0000:02:00.0" {
            return done(Err(nvme::NvmeError::Invalid("this one does not come up".into())));
        }
        let results = results_tx.lock().unwrap().clone();
        attach_sim(
            name,
            Box::new(move |r| {
                results.send(r.clone().map_err(|e| e.to_string())).unwrap();
                done(r)
            }),
        );
    });
    let config = HotplugConfig { sysfs_root: root.clone(), period_us: PERIOD_US, attach };
    on_reactor(&set, move || hotplug::enable(config)).unwrap();
    assert_eq!(on_reactor(&set, hotplug::is_enabled), Some(PERIOD_US));

    bind_vfio(&root, "0000:01:00.0");
    let (name, bdf) = calls.recv_timeout(WAIT).expect("the new function was not attached");
    assert_eq!((name.as_str(), bdf.as_str()), ("HotInNvme1", "0000:01:00.0"));
    // The bring-up runs on after the hook returns.
    assert_eq!(results.recv_timeout(WAIT).expect("attach did not end"), Ok(vec!["HotInNvme1n1".to_string()]));
    assert!(on_reactor(&set, || nvme::Controllers::get().lookup("HotInNvme1").is_some()));

    bind_vfio(&root, "0000:02:00.0");
    let (name, bdf) = calls.recv_timeout(WAIT).expect("the second function was not tried");
    assert_eq!((name.as_str(), bdf.as_str()), ("HotInNvme2", "0000:02:00.0"));
    // Twenty periods: neither the attached nor the failed one again.
    let again = calls.recv_timeout(Duration::from_micros(20 * PERIOD_US));
    assert!(again.is_err(), "attached again: {again:?}");

    let saved = on_reactor(&set, hotplug::config_json);
    assert_eq!(saved["params"], serde_json::json!({"enable": true, "period_us": PERIOD_US}));
    on_reactor(&set, hotplug::disable);
    assert_eq!(on_reactor(&set, hotplug::config_json)["params"]["enable"], false);
    bind_vfio(&root, "0000:03:00.0");
    let after = calls.recv_timeout(Duration::from_micros(20 * PERIOD_US));
    assert!(after.is_err(), "scanned while disabled: {after:?}");

    for name in ["HotInNvme0", "HotInNvme1"] {
        let (tx, rx) = mpsc::channel();
        set.send(0, move || nvme::detach_controller(name, move |r| tx.send(r.is_ok()).unwrap()));
        assert!(rx.recv_timeout(WAIT).unwrap(), "detach {name}");
    }
    set.stop();
    set.join();
    drop(std::fs::remove_dir_all(&root));
}
