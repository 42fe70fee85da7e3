//! Interrupt mode (SPDK's `--interrupt-mode`) with the simulated controller
//! on threaded reactors: the IO queue pair's completion queue interrupts on
//! its own MSI-X vector, routed to an eventfd its reactor sleeps on. An idle
//! reactor holding a queue pair does not wake at all; a completion wakes it
//! through the interrupt (without it nothing would: the reactor has no
//! timer); IO in flight keeps the tick so a swallowed command still times
//! out and is aborted; a device without MSI-X vectors is refused.

use bdev::{Channel, DmaBuf, IoBox, IoStatus, IoType, Registry};
use nvme::{CtrlrOpts, SimConfig, SimController, Transport};
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

thread_local! {
    /// Reactor 1's channel to the namespace, kept open between IOs.
    static CHANNEL: RefCell<Option<Rc<Channel>>> = const { RefCell::new(None) };
}

fn attach(
    set: &ReactorSet,
    name: &'static str,
    sim: &Arc<SimController>,
    opts: CtrlrOpts,
) -> Result<Vec<String>, String> {
    let (tx, rx) = mpsc::channel();
    let sim = sim.clone();
    set.send(0, move || {
        nvme::attach_controller(name, Transport::Sim(sim), opts, None, move |r| {
            tx.send(r.map_err(|e| e.to_string())).unwrap()
        })
    });
    rx.recv_timeout(WAIT).expect("attach did not finish")
}

/// One IO from reactor 1; its data comes back with its status.
fn io(set: &ReactorSet, t: IoType, offset_blocks: u64, data: Option<Vec<u8>>) -> (IoStatus, Vec<u8>) {
    let (tx, rx) = mpsc::channel();
    set.send(1, move || {
        let ch = CHANNEL.with(|c| {
            c.borrow_mut().get_or_insert_with(|| Registry::get().lookup("Nvme0n1").unwrap().channel().unwrap()).clone()
        });
        let buf = DmaBuf::zeroed(4096).unwrap();
        if let Some(d) = &data {
            buf.copy_from(0, d);
        }
        let mut io = IoBox::data(t, offset_blocks, 8, Some(buf)).unwrap();
        io.set_done(Rc::new(move |io: IoBox| {
            let back = io.buf.as_ref().map(|b| b.to_vec()).unwrap_or_default();
            tx.send((io.status, back)).unwrap();
        }));
        ch.submit(io);
    });
    rx.recv_timeout(WAIT).expect("the IO did not complete: no interrupt woke its reactor")
}

#[test]
fn completions_wake_an_idle_reactor_through_its_queue_interrupt() {
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0, 1], IdlePolicy::interrupt()) };
    let set = ReactorSet::start(cfg, || {}).unwrap();
    let sim = SimController::new(SimConfig { seed: 17, ..SimConfig::default() }).unwrap();
    let opts = CtrlrOpts { io_timeout_us: 50_000, ..CtrlrOpts::default() };
    assert_eq!(attach(&set, "Nvme0", &sim, opts).unwrap(), vec!["Nvme0n1".to_string()]);

    // The first IO makes reactor 1's queue pair (its CQ on vector 1).
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(io(&set, IoType::Write, 8, Some(data.clone())).0, IoStatus::Success);
    let info = set.call(0, || nvme::controllers_json(Some("Nvme0")).unwrap());
    assert_eq!(info[0]["ctrlrs"][0]["interrupts"], true, "{info:?}");

    // Idle with a queue pair: no timer, no wake-up.
    std::thread::sleep(Duration::from_millis(30));
    let before = set.stats(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let idle_wakeups = set.stats(1).unwrap().wakeups - before.wakeups;
    assert_eq!(idle_wakeups, 0, "reactor 1 woke {idle_wakeups} times with nothing to do");

    // A read: its completion is an interrupt that wakes reactor 1.
    let (irqs_before, sim_irqs_before) = (set.stats(1).unwrap().interrupt_wakeups, sim.stats().interrupts);
    let (status, back) = io(&set, IoType::Read, 8, None);
    assert_eq!(status, IoStatus::Success);
    assert!(back == data, "read back what was written");
    assert!(sim.stats().interrupts > sim_irqs_before, "the controller sent no MSI-X message");
    assert!(set.stats(1).unwrap().interrupt_wakeups > irqs_before, "the completion did not wake reactor 1");

    // A command the controller swallows: the reactor keeps its tick while
    // it is in flight, so it times out, is aborted and retried.
    sim.swallow_next_io(1);
    assert_eq!(io(&set, IoType::Write, 16, Some(data.clone())).0, IoStatus::Success);
    assert!(sim.stats().aborts_performed >= 1, "the swallowed command was never aborted");

    // A controller with no MSI-X vectors cannot run in interrupt mode.
    let bare = SimController::new(SimConfig { seed: 18, msix_vectors: 0, ..SimConfig::default() }).unwrap();
    let e = attach(&set, "Nvme1", &bare, CtrlrOpts::default()).unwrap_err();
    assert!(e.contains("interrupt mode needs MSI-X vectors"), "{e}");

    set.send(1, || CHANNEL.with(|c| c.borrow_mut().take()).map_or((), drop));
    let (tx, rx) = mpsc::channel();
    set.send(0, move || nvme::detach_controller("Nvme0", move |r| tx.send(r.map_err(|e| e.to_string())).unwrap()));
    rx.recv_timeout(WAIT).unwrap().unwrap();
    set.stop();
    set.join();
}
