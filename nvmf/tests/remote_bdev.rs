//! The NVMe/TCP initiator's namespace bdevs against nvraid's own target
//! (two reactor sets in one process, so each has its own bdev registry):
//! IOs above the remote MDTS are split into commands that each carry FUA;
//! no more commands are outstanding than the remote queue size less one,
//! with the rest waiting in order; an attach whose namespaces would clash
//! is refused and leaves nothing behind; `bdev_nvme_get_controllers`
//! shows each path in SPDK's shape and its real state.
//!
//! The target's namespaces are `HoldBdev`s: RAM bdevs that record every IO
//! they receive (type, range, FUA) and, when asked, hold IOs for a while
//! before serving them, so the peak number of IOs at the bdev is the
//! number of commands the initiator had outstanding.

mod common;
use bdev::{Bdev, BdevChannel, BdevError, BdevProps, DmaBuf, IoBox, IoFlags, IoStatus, IoType, Registry};
use common::*;
use nvmf::host::{attach_controller, controllers_json, detach_controller, AttachParams};
use nvmf::TransportOpts;
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use serde_json::json;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

const BS: u32 = 512;
const T: Duration = Duration::from_secs(20);

/// One IO as the target's bdev received it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    t: u8,
    off: u64,
    n: u64,
    fua: bool,
}

fn code(t: IoType) -> u8 {
    match t {
        IoType::Read => 0,
        IoType::Write => 1,
        IoType::WriteZeroes => 2,
        IoType::Unmap => 3,
        IoType::Flush => 4,
        IoType::Reset => 5,
    }
}

struct Store {
    data: Mutex<Vec<u8>>,
    seen: Mutex<Vec<Seen>>,
    held_now: AtomicUsize,
    peak: AtomicUsize,
    /// IOs wait this long at the bdev (None: served at once).
    hold: Option<Duration>,
}

impl Store {
    fn serve(&self, io: IoBox) {
        let off = io.offset_blocks as usize * BS as usize;
        let len = io.num_blocks as usize * BS as usize;
        let mut d = self.data.lock().unwrap();
        match io.io_type {
            IoType::Read => io.buf.as_ref().unwrap().copy_from(0, &d[off..off + len]),
            IoType::Write => io.buf.as_ref().unwrap().copy_to(0, &mut d[off..off + len]),
            IoType::WriteZeroes | IoType::Unmap => d[off..off + len].fill(0),
            IoType::Flush | IoType::Reset => {}
        }
        drop(d);
        io.complete(IoStatus::Success);
    }

    fn take_seen(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

struct HoldBdev {
    props: BdevProps,
    store: Arc<Store>,
}

struct HoldChannel {
    store: Arc<Store>,
    held: Rc<RefCell<Vec<IoBox>>>,
}

impl Bdev for HoldBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn module(&self) -> &'static str {
        "hold"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        t != IoType::Reset
    }
    fn create_channel(&self) -> Result<Rc<dyn BdevChannel>, BdevError> {
        let held: Rc<RefCell<Vec<IoBox>>> = Rc::new(RefCell::new(Vec::new()));
        if let Some(period) = self.store.hold {
            let (weak, store) = (Rc::downgrade(&held), self.store.clone());
            reactor::register_timed_poller("hold_release", period, move || {
                let Some(held) = weak.upgrade() else { return reactor::PollStatus::Done };
                let ios: Vec<IoBox> = held.borrow_mut().drain(..).collect();
                store.held_now.fetch_sub(ios.len(), Ordering::AcqRel);
                let busy = !ios.is_empty();
                for io in ios {
                    store.serve(io);
                }
                if busy {
                    reactor::PollStatus::Busy
                } else {
                    reactor::PollStatus::Idle
                }
            });
        }
        Ok(Rc::new(HoldChannel { store: self.store.clone(), held }))
    }
}

impl BdevChannel for HoldChannel {
    fn submit(&self, io: IoBox) {
        let s = &self.store;
        s.seen.lock().unwrap().push(Seen {
            t: code(io.io_type),
            off: io.offset_blocks,
            n: io.num_blocks,
            fua: io.flags.fua(),
        });
        if s.hold.is_none() {
            return s.serve(io);
        }
        let now = s.held_now.fetch_add(1, Ordering::AcqRel) + 1;
        s.peak.fetch_max(now, Ordering::AcqRel);
        self.held.borrow_mut().push(io);
    }
}

/// A target exporting one `HoldBdev` per `uuids` entry (NSIDs 1..).
fn hold_target(
    opts: TransportOpts,
    blocks: u64,
    hold: Option<Duration>,
    uuids: Vec<Uuid>,
) -> (Target, Vec<Arc<Store>>) {
    let stores: Vec<Arc<Store>> = uuids
        .iter()
        .map(|_| {
            Arc::new(Store {
                data: Mutex::new(vec![0; blocks as usize * BS as usize]),
                seen: Mutex::new(Vec::new()),
                held_now: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                hold,
            })
        })
        .collect();
    let s2 = stores.clone();
    let t = start_target_with(1, opts, move || {
        let mut names = Vec::new();
        for (i, (store, uuid)) in s2.into_iter().zip(uuids).enumerate() {
            let name = format!("Hold{i}");
            let b = HoldBdev { props: BdevProps::new(&name, "hold disk", BS, blocks, Some(uuid)), store };
            Registry::get().register(Arc::new(b)).unwrap();
            names.push(name);
        }
        names
    });
    (t, stores)
}

fn initiator(reactors: usize) -> ReactorSet {
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new((0..reactors).collect(), IdlePolicy::sleep()) };
    ReactorSet::start(cfg, || {}).unwrap()
}

fn attach_params(name: &str, port: u16) -> AttachParams {
    AttachParams {
        name: name.into(),
        trtype: "TCP".into(),
        traddr: "127.0.0.1".into(),
        adrfam: Some("ipv4".into()),
        trsvcid: port.to_string(),
        subnqn: NQN.into(),
        hostnqn: Some(HOSTNQN.into()),
        hdgst: false,
        ddgst: false,
        psk: None,
    }
}

fn attach(set: &ReactorSet, p: AttachParams) -> Result<Vec<String>, BdevError> {
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        attach_controller(p, move |r| {
            let _ = tx.send(r);
        })
    });
    rx.recv_timeout(T).expect("attach answered")
}

fn detach(set: &ReactorSet, name: &'static str) {
    let (tx, rx) = mpsc::channel();
    set.send(0, move || {
        detach_controller(name, move |r| {
            let _ = tx.send(r);
        })
    });
    rx.recv_timeout(T).unwrap().unwrap();
}

type Done = mpsc::Receiver<(IoStatus, Option<Vec<u8>>)>;

/// Submits one IO to `bdev` on the current reactor.
fn submit(bdev: &str, t: IoType, off: u64, n: u64, buf: Option<DmaBuf>, flags: IoFlags) -> Done {
    let (tx, rx) = mpsc::channel();
    let ch = Registry::get().lookup(bdev).unwrap().channel().unwrap();
    let mut io = IoBox::data(t, off, n, buf).unwrap();
    io.flags = flags;
    io.set_done(Rc::new(move |io: IoBox| {
        let _ = tx.send((io.status, io.buf.as_ref().map(|b| b.to_vec())));
    }));
    ch.submit(io);
    rx
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

/// Writes `data` at `off` (FUA when asked) and waits.
fn write(set: &ReactorSet, off: u64, data: Vec<u8>, flags: IoFlags) {
    let n = (data.len() / BS as usize) as u64;
    let rx = set.call(0, move || {
        let b = DmaBuf::alloc(data.len()).unwrap();
        b.copy_from(0, &data);
        submit("Remoten1", IoType::Write, off, n, Some(b), flags)
    });
    let (st, _) = rx.recv_timeout(T).unwrap();
    assert_eq!(st, IoStatus::Success, "write of {n} blocks at {off}");
}

fn read(set: &ReactorSet, off: u64, n: u64) -> Vec<u8> {
    let rx = set.call(0, move || {
        submit("Remoten1", IoType::Read, off, n, Some(DmaBuf::alloc(n as usize * BS as usize).unwrap()), IoFlags::NONE)
    });
    let (st, data) = rx.recv_timeout(T).unwrap();
    assert_eq!(st, IoStatus::Success, "read of {n} blocks at {off}");
    data.unwrap()[..n as usize * BS as usize].to_vec()
}

/// The pieces an IO of `n` blocks at `off` becomes at `mdts` blocks each.
fn pieces(t: IoType, off: u64, n: u64, mdts: u64, fua: bool) -> Vec<Seen> {
    (0..n.div_ceil(mdts)).map(|i| Seen { t: code(t), off: off + i * mdts, n: (n - i * mdts).min(mdts), fua }).collect()
}

fn sorted(mut v: Vec<Seen>) -> Vec<Seen> {
    v.sort();
    v
}

/// A target with an 8 KiB MDTS (16 blocks): writes and reads of several
/// MDTS-sized pieces, aligned and not, reach the bdev as pieces of at most
/// 16 blocks that tile the IO exactly, every piece of a FUA write carries
/// FUA, and the data reads back. Without the split the target refuses the
/// commands (beyond max_io_size); without the flag on every piece the FUA
/// check fails.
#[test]
fn ios_above_the_remote_mdts_are_split_and_every_piece_carries_fua() {
    let seed = seed();
    println!("NVMF_TEST_SEED={seed}");
    let opts = TransportOpts { max_io_size: 8192, ..Default::default() };
    let (t, stores) = hold_target(opts, 4096, None, vec![Uuid::new_v4()]);
    let store = &stores[0];
    let ini = initiator(1);
    assert_eq!(attach(&ini, attach_params("Remote", t.port)).unwrap(), vec!["Remoten1".to_string()]);
    let mdts = ini.call(0, || Registry::get().lookup("Remoten1").unwrap().props().max_io_blocks);
    assert_eq!(mdts, 16, "8 KiB MDTS at 512-byte blocks");
    let mdts = u64::from(mdts);
    store.take_seen(); // whatever examine read at registration

    let cases: [(u64, u64, bool); 5] =
        [(0, 128, true), (300, 100, false), (1000, 16, true), (2001, 257, true), (3000, 1, false)];
    let mut model = vec![0u8; 4096 * BS as usize];
    for (i, &(off, n, fua)) in cases.iter().enumerate() {
        let data = pattern(seed.wrapping_add(i as u64), n as usize * BS as usize);
        model[off as usize * 512..(off + n) as usize * 512].copy_from_slice(&data);
        write(&ini, off, data, if fua { IoFlags::FUA } else { IoFlags::NONE });
        let seen = store.take_seen();
        assert_eq!(
            sorted(seen),
            pieces(IoType::Write, off, n, mdts, fua),
            "write of {n} blocks at {off} (FUA {fua}), seed {seed}"
        );
    }
    for &(off, n, _) in &cases {
        let got = read(&ini, off, n);
        assert!(got == model[off as usize * 512..(off + n) as usize * 512], "read of {n} blocks at {off}, seed {seed}");
        assert_eq!(sorted(store.take_seen()), pieces(IoType::Read, off, n, mdts, false), "read pieces");
    }
    // One read across everything written, 4096 blocks = 256 pieces.
    let got = read(&ini, 0, 4096);
    assert!(got == model, "whole-bdev read differs, seed {seed}");
    assert_eq!(store.take_seen().len(), 256);
    detach(&ini, "Remote");
    ini.stop();
    ini.join();
}

/// A target whose IO queues hold 8 entries: 4 x 8 concurrent IOs (small
/// ones, then ones split at MDTS into 4 pieces each) all complete with the
/// right data; the bdev never holds more than 7 commands of the queue at
/// once, and holds 7 (the IOs beyond wait in the initiator, in order: reads
/// reach the bdev in submission order). Without the bound the peak is 8 or
/// more; without the waiting FIFO the extra IOs fail.
#[test]
fn queue_never_carries_more_than_its_size_less_one_and_the_rest_waits_in_order() {
    let seed = seed();
    println!("NVMF_TEST_SEED={seed}");
    let opts = TransportOpts { max_queue_depth: 8, max_io_size: 8192, ..Default::default() };
    let (t, stores) = hold_target(opts, 8192, Some(Duration::from_millis(2)), vec![Uuid::new_v4()]);
    let store = stores[0].clone();
    let ini = initiator(1);
    attach(&ini, attach_params("Remote", t.port)).unwrap();
    let c = ini.call(0, || controllers_json(Some("Remote")));
    assert_eq!(c[0]["ctrlrs"][0]["io_queue_size"], json!(8), "{c:?}");
    store.take_seen();
    store.peak.store(0, Ordering::Release);

    const N: u64 = 32; // 4 x the queue size
    for (round, blocks) in [(0u64, 8u64), (1, 64)] {
        let datas: Vec<Vec<u8>> =
            (0..N).map(|i| pattern(seed.wrapping_add(round * 1000 + i), (blocks * 512) as usize)).collect();
        let d2 = datas.clone();
        let rxs = ini.call(0, move || {
            d2.into_iter()
                .enumerate()
                .map(|(i, d)| {
                    let b = DmaBuf::alloc(d.len()).unwrap();
                    b.copy_from(0, &d);
                    submit("Remoten1", IoType::Write, i as u64 * blocks, blocks, Some(b), IoFlags::NONE)
                })
                .collect::<Vec<_>>()
        });
        for (i, rx) in rxs.into_iter().enumerate() {
            assert_eq!(rx.recv_timeout(T).unwrap().0, IoStatus::Success, "write {i} of round {round}");
        }
        store.take_seen();
        let rxs = ini.call(0, move || {
            (0..N)
                .map(|i| {
                    let b = DmaBuf::alloc((blocks * 512) as usize).unwrap();
                    submit("Remoten1", IoType::Read, i * blocks, blocks, Some(b), IoFlags::NONE)
                })
                .collect::<Vec<_>>()
        });
        for (i, rx) in rxs.into_iter().enumerate() {
            let (st, data) = rx.recv_timeout(T).unwrap();
            assert_eq!(st, IoStatus::Success, "read {i} of round {round}");
            assert!(data.unwrap()[..(blocks * 512) as usize] == datas[i][..], "read {i} of round {round}, seed {seed}");
        }
        // Reads leave the initiator oldest first, piece by piece, and the
        // target serves one connection in arrival order.
        let offs: Vec<u64> = store.take_seen().iter().map(|s| s.off).collect();
        let want: Vec<u64> = (0..N * blocks).step_by(16.min(blocks) as usize).collect();
        assert_eq!(offs, want, "reads reach the bdev in submission order (round {round})");
        let peak = store.peak.swap(0, Ordering::AcqRel);
        assert!(peak <= 7, "{peak} commands outstanding on a queue of 8 entries (round {round})");
        assert_eq!(peak, 7, "the queue is used to its bound (round {round})");
    }
    detach(&ini, "Remote");
    ini.stop();
    ini.join();
}

/// Waits until the target has no connections left.
fn wait_no_connections(t: &Target, what: &str) {
    let t0 = Instant::now();
    while t.set.call(0, || nvmf::NvmfState::get().connection_count()) > 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "{what}: the refused attach left connections open");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The target exports two namespaces. Attaching while the second one's
/// UUID is already a bdev here, or while the first one's bdev name is
/// taken, fails with EEXIST and a message that says which, registers
/// nothing (the first namespace is not left registered), lists no
/// controller and closes every connection; once the clash is gone the same
/// attach succeeds. A bad address family is refused with EINVAL.
#[test]
fn attach_that_would_clash_is_refused_and_leaves_nothing_behind() {
    let (u1, u2) = (Uuid::new_v4(), Uuid::new_v4());
    let (t, _stores) = hold_target(TransportOpts::default(), 1024, None, vec![u1, u2]);
    let ini = initiator(2);
    let registered = |ini: &ReactorSet| -> Vec<String> {
        ini.call(0, || Registry::get().list().iter().map(|h| h.name().to_string()).collect())
    };
    // A local bdev with namespace 2's UUID.
    ini.call(0, move || {
        let m = bdev::malloc::MallocBdev::new(BdevProps::new("Shadow", "Malloc disk", 512, 64, Some(u2))).unwrap();
        Registry::get().register(Arc::new(m)).unwrap();
    });
    let e = attach(&ini, attach_params("Remote", t.port)).expect_err("namespace 2's UUID is taken");
    assert_eq!(e.errno(), libc::EEXIST, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("namespace 2") && msg.contains(&u2.to_string()) && msg.contains("Shadow"), "{msg}");
    assert_eq!(registered(&ini), vec!["Shadow".to_string()], "nothing of the refused attach is registered");
    assert!(ini.call(0, || controllers_json(None)).is_empty());
    wait_no_connections(&t, "UUID clash");

    // A local bdev named as namespace 1's bdev would be.
    ini.call(0, || {
        let m = bdev::malloc::MallocBdev::new(BdevProps::new("Othern1", "Malloc disk", 512, 64, None)).unwrap();
        Registry::get().register(Arc::new(m)).unwrap();
    });
    let e = attach(&ini, attach_params("Other", t.port)).expect_err("bdev Othern1 exists");
    assert_eq!(e.errno(), libc::EEXIST, "{e}");
    assert!(e.to_string().contains("Othern1"), "{e}");
    assert!(ini.call(0, || controllers_json(None)).is_empty());
    wait_no_connections(&t, "name clash");

    let mut bad = attach_params("Remote", t.port);
    bad.adrfam = Some("IB".into());
    let e = attach(&ini, bad).expect_err("IB is no TCP address family");
    assert_eq!(e.errno(), libc::EINVAL, "{e}");

    // The clash gone, the same attach makes both namespaces bdevs.
    let (tx, rx) = mpsc::channel();
    ini.send(0, move || {
        Registry::get().unregister("Shadow", move |r| {
            let _ = tx.send(r);
        })
    });
    rx.recv_timeout(T).unwrap().unwrap();
    let names = attach(&ini, attach_params("Remote", t.port)).unwrap();
    assert_eq!(names, vec!["Remoten1".to_string(), "Remoten2".to_string()]);
    let e = attach(&ini, attach_params("Remote", t.port)).expect_err("the name is in use");
    assert_eq!(e.errno(), libc::EEXIST, "{e}");
    assert!(e.to_string().contains("a controller named Remote already exists"), "{e}");
    detach(&ini, "Remote");
    assert_eq!(registered(&ini), vec!["Othern1".to_string()]);
    wait_no_connections(&t, "detach");
    ini.stop();
    ini.join();
}

/// `bdev_nvme_get_controllers` for a TCP controller in SPDK's shape (name,
/// ctrlrs with state, trid, cntlid, host), with what was negotiated; the
/// state follows the path: `failed` once the target is gone, and IO then
/// fails instead of hanging; detach removes the entry.
#[test]
fn get_controllers_shows_each_path_in_spdks_shape_and_its_state() {
    let opts = TransportOpts { max_queue_depth: 16, max_io_size: 65536, ..Default::default() };
    let (t, _stores) = hold_target(opts, 1024, None, vec![Uuid::new_v4()]);
    let port = t.port;
    let ini = initiator(2);
    attach(&ini, attach_params("Remote", port)).unwrap();
    let c = ini.call(0, || controllers_json(None));
    assert_eq!(c.len(), 1, "{c:?}");
    let e = &c[0];
    assert_eq!(e["name"], json!("Remote"));
    let ctrlrs = e["ctrlrs"].as_array().unwrap();
    assert_eq!(ctrlrs.len(), 1, "one path");
    let p = &ctrlrs[0];
    assert_eq!(p["state"], json!("enabled"));
    assert_eq!(
        p["trid"],
        json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string(), "subnqn": NQN})
    );
    assert!(p["cntlid"].as_u64().is_some_and(|c| c > 0 && c < 0xFFF0), "{p}");
    assert_eq!(p["host"], json!({"nqn": HOSTNQN, "addr": "", "svcid": "", "no_shn_notification": true}));
    assert_eq!(p["io_queue_size"], json!(16));
    assert_eq!(p["num_io_queues"], json!(2));
    assert_eq!(p["max_transfer_bytes"], json!(65536));
    assert_eq!(p["impossible_completions"], json!(0));
    // The bdev says the same controller.
    let cntlid = p["cntlid"].clone();
    let ds = ini.call(0, || Registry::get().lookup("Remoten1").unwrap().bdev().driver_specific().unwrap().1);
    assert_eq!(ds[0]["ctrlr_data"]["cntlid"], cntlid);
    assert!(ini.call(0, || controllers_json(Some("Nope"))).is_empty());

    // The target goes away: the path fails.
    drop(t);
    let t0 = Instant::now();
    loop {
        let c = ini.call(0, || controllers_json(Some("Remote")));
        if c[0]["ctrlrs"][0]["state"] == json!("failed") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "state stays {} after the target left",
            c[0]["ctrlrs"][0]["state"]
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let rx = ini.call(1, || submit("Remoten1", IoType::Read, 0, 8, Some(DmaBuf::alloc(4096).unwrap()), IoFlags::NONE));
    assert!(matches!(rx.recv_timeout(T).unwrap().0, IoStatus::Failed(_)), "IO on a failed path fails");
    detach(&ini, "Remote");
    assert!(ini.call(0, || controllers_json(None)).is_empty());
    ini.stop();
    ini.join();
}
