//! The bdev core on a manual reactor set: IO round trips through malloc and
//! null, deferred completion, range checks, the registry's names and claims,
//! and unregistration that waits for in-flight IO.

use bdev::malloc::{MallocBdev, NullBdev};
use bdev::{BdevError, BdevProps, DmaBuf, IoBox, IoError, IoStatus, IoType, Registry};
use reactor::ReactorSet;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

fn malloc(name: &str, blocks: u64) -> Arc<MallocBdev> {
    Arc::new(MallocBdev::new(BdevProps::new(name, "Malloc disk", 512, blocks, None)).unwrap())
}

type Log = Rc<RefCell<Vec<(IoType, IoStatus, u64)>>>;

fn submit(ch: &bdev::Channel, t: IoType, off: u64, n: u64, buf: Option<DmaBuf>, log: &Log) {
    let mut io = IoBox::data(t, off, n, buf).unwrap();
    io.tag = off;
    let l = log.clone();
    io.set_done(Rc::new(move |io: IoBox| l.borrow_mut().push((io.io_type, io.status, io.tag))));
    ch.submit(io);
}

#[test]
fn write_read_round_trip_and_deferred_completion() {
    let m = ReactorSet::manual(1);
    let log: Log = Rc::default();
    let (ch, out) = m.on(0, || {
        let h = Registry::get().register(malloc("M0", 1024)).unwrap();
        let ch = h.channel().unwrap();
        let w = DmaBuf::alloc(4096).unwrap();
        w.with_mut(|b| b.iter_mut().enumerate().for_each(|(i, x)| *x = (i % 251) as u8));
        submit(&ch, IoType::Write, 8, 8, Some(w), &log);
        // Completion is never delivered inside submit.
        assert!(log.borrow().is_empty());
        (ch, DmaBuf::zeroed(4096).unwrap())
    });
    m.run_until_idle(10);
    assert_eq!(log.borrow().as_slice(), &[(IoType::Write, IoStatus::Success, 8)]);
    let o2 = out.clone();
    m.on(0, || submit(&ch, IoType::Read, 8, 8, Some(o2), &log));
    m.run_until_idle(10);
    out.with(|b| assert!(b.iter().enumerate().all(|(i, x)| *x == (i % 251) as u8)));
    assert_eq!(ch.stats().num_write_ops.get(), 1);
    assert_eq!(ch.stats().bytes_read.get(), 4096);
    assert_eq!(ch.stats().in_flight.get(), 0);
}

#[test]
fn bad_ranges_and_buffers_fail_cleanly() {
    let m = ReactorSet::manual(1);
    let log: Log = Rc::default();
    m.on(0, || {
        let h = Registry::get().register(malloc("M1", 64)).unwrap();
        let ch = h.channel().unwrap();
        submit(&ch, IoType::Read, 60, 8, DmaBuf::alloc(4096), &log); // past the end
        submit(&ch, IoType::Read, 0, 8, DmaBuf::alloc(512), &log); // buffer too small
        submit(&ch, IoType::Write, 0, 1, None, &log); // no buffer
        submit(&ch, IoType::Read, u64::MAX, 2, DmaBuf::alloc(1024), &log); // overflow
        submit(&ch, IoType::Unmap, 0, 0, None, &log); // empty
    });
    m.run_until_idle(10);
    assert!(log.borrow().iter().all(|(_, s, _)| *s == IoStatus::Failed(IoError::OutOfRange)), "{:?}", log.borrow());
    assert_eq!(log.borrow().len(), 5);
}

#[test]
fn null_bdev_and_unsupported_types() {
    let m = ReactorSet::manual(1);
    let log: Log = Rc::default();
    m.on(0, || {
        let n = Arc::new(NullBdev::new(BdevProps::new("N0", "Null disk", 4096, 1 << 20, None)).unwrap());
        let h = Registry::get().register(n).unwrap();
        let ch = h.channel().unwrap();
        submit(&ch, IoType::Read, 0, 1, DmaBuf::alloc(4096), &log);
        submit(&ch, IoType::Unmap, 0, 1, None, &log);
    });
    m.run_until_idle(10);
    assert_eq!(log.borrow()[0].1, IoStatus::Success);
    assert_eq!(log.borrow()[1].1, IoStatus::Failed(IoError::NotSupported));
}

#[test]
fn registry_names_aliases_uuids_and_claims() {
    let m = ReactorSet::manual(1);
    m.on(0, || {
        let r = Registry::get();
        let a = r.register(malloc("A", 8)).unwrap();
        assert!(matches!(r.register(malloc("A", 8)), Err(BdevError::Exists(_))));
        let uuid = a.props().uuid.to_string();
        assert!(r.lookup(&uuid).unwrap().same(&a));
        r.add_alias("A", "alpha").unwrap();
        assert!(r.lookup("alpha").unwrap().same(&a));
        assert!(matches!(r.register(malloc("alpha", 8)), Err(BdevError::Exists(_))));
        r.claim("A", "raid R").unwrap();
        let e = r.claim("A", "raid S").err().unwrap();
        assert_eq!(e, BdevError::Claimed("A".into(), "raid R".into()));
        assert_eq!(e.errno(), libc::EBUSY);
        let res = Rc::new(RefCell::new(None));
        let r2 = res.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        r.unregister("A", move |x| tx.send(x).unwrap());
        *r2.borrow_mut() = rx.try_recv().ok();
        assert!(matches!(res.borrow().clone(), Some(Err(BdevError::Claimed(..)))));
        r.release(&a, "raid R");
        assert!(r.lookup("A").is_some());
    });
}

#[test]
fn unregister_waits_for_in_flight_io() {
    let m = ReactorSet::manual(2);
    let log: Log = Rc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    m.on(1, || {
        let h = Registry::get().register(malloc("B", 64)).unwrap();
        let ch = h.channel().unwrap();
        submit(&ch, IoType::Write, 0, 1, DmaBuf::alloc(512), &log);
        // The bdev goes while the write has not completed yet.
        Registry::get().unregister("B", move |r| tx.send(r).unwrap());
        // New IO fails at once.
        submit(&ch, IoType::Write, 1, 1, DmaBuf::alloc(512), &log);
    });
    assert!(rx.try_recv().is_err(), "unregister must not finish before the IO");
    for _ in 0..50 {
        m.run_once(0);
        m.run_once(1);
        m.advance_ns(1_000_000);
    }
    assert_eq!(rx.try_recv().unwrap(), Ok(()));
    let l = log.borrow();
    assert!(l.contains(&(IoType::Write, IoStatus::Success, 0)));
    assert!(l.contains(&(IoType::Write, IoStatus::Failed(IoError::NoDevice), 1)));
    m.on(0, || assert!(Registry::get().lookup("B").is_none()));
}

#[test]
fn io_pool_is_bounded_and_recycles() {
    let m = ReactorSet::manual(1);
    m.on(0, || {
        let cap = IoBox::capacity();
        let held: Vec<_> = (0..cap).map(|_| IoBox::alloc().unwrap()).collect();
        assert!(IoBox::alloc().is_none(), "an empty pool reports, never allocates");
        drop(held);
        assert_eq!(IoBox::available(), cap);
    });
}
