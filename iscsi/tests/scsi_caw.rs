//! COMPARE AND WRITE: compare, miscompare with the offset, and atomicity
//! against other writes to the range through the LUN: a write issued while
//! a CAW holds the range waits for it, and a CAW waits for writes to the
//! range already in flight before it reads.

mod scsi_support;

use bdev::malloc::MallocBdev;
use bdev::Registry;
use iscsi::scsi::{status, Nexus};
use scsi_support::*;
use std::sync::Arc;

const BS: usize = 512;

fn rig() -> (Rig, Arc<MallocBdev>, Nexus) {
    rig_over_error_bdev(1024)
}

fn caw_cdb(lba: u64, blocks: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x89;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = blocks;
    c
}

fn caw_data(compare: &[u8], write: &[u8]) -> Vec<u8> {
    [compare, write].concat()
}

#[test]
fn compare_and_write_compares_then_writes() {
    let (rig, m, n) = rig();
    let old = pattern(1, BS, 2);
    let new = pattern(2, BS, 2);
    rig.write10(&n, 10, &old, 0).assert_good();
    let d = caw_data(&old, &new);
    rig.run(&caw_cdb(10, 2), &n, d.len() as u32, Some(&d)).assert_good();
    assert_eq!(raw(&m, 10, 2), new);
    // Comparing against the old data now fails at the first differing byte.
    let first = old.iter().zip(&new).position(|(a, b)| a != b).unwrap();
    let r = rig.run(&caw_cdb(10, 2), &n, d.len() as u32, Some(&d));
    r.assert_check(0xE, 0x1D, 0x00);
    assert_eq!(u32::from_be_bytes(r.sense[3..7].try_into().unwrap()) as usize, first);
    assert_eq!(raw(&m, 10, 2), new, "nothing written after a miscompare");
    // Too long for the block limits, and Data-Out missing.
    let r = rig.run(&caw_cdb(0, 0), &n, 0, None);
    r.assert_good();
    rig.run(&caw_cdb(10, 2), &n, 512, Some(&d[..512])).assert_check(0x5, 0x24, 0x00);
    // More Data-Out than the blocks need is refused too, and writes nothing.
    let more = [d.clone(), pattern(9, BS, 2)].concat();
    let r = rig.run(&caw_cdb(10, 1), &n, more.len() as u32, Some(&more));
    r.assert_check(0x5, 0x24, 0x00);
    assert_eq!(&r.sense[15..18], &[0xC0, 0, 13], "pointer: NUMBER OF LOGICAL BLOCKS");
    // 256 blocks do not fit the byte: libiscsi's 0 blocks with 256 blocks of Data-Out.
    let big = vec![0u8; 2 * 256 * BS];
    rig.run(&caw_cdb(10, 0), &n, big.len() as u32, Some(&big[..0])).assert_check(0x5, 0x24, 0x00);
    assert_eq!(raw(&m, 10, 2), new);
}

#[test]
fn a_write_waits_for_a_compare_and_write_in_progress() {
    let (rig, m, n) = rig();
    let old = pattern(3, BS, 4);
    rig.write10(&n, 100, &old, 0).assert_good();
    // The CAW's read is held at the bdev: the CAW owns blocks 100..104.
    hold_next(&rig, "read");
    let new = pattern(4, BS, 4);
    let d = caw_data(&old, &new);
    let caw = rig.submit(0, rig.command(&caw_cdb(100, 4), &n, d.len() as u32, Some(&d)));
    rig.m.run_until_idle(20);
    // An overlapping write from another connection waits ...
    let other = nexus("iqn.1994-05.com.example:b", 1);
    rig.clear_ua(&other);
    let plain = pattern(5, BS, 1);
    let w = rig.submit(1, rig.command(&rw10(0x2A, 102, 1, 0), &other, BS as u32, Some(&plain)));
    // ... while a write elsewhere goes on.
    let elsewhere = pattern(6, BS, 1);
    let e = rig.submit(1, rig.command(&rw10(0x2A, 200, 1, 0), &other, BS as u32, Some(&elsewhere)));
    assert_eq!(rig.wait(1, e).status, status::GOOD);
    for _ in 0..200 {
        rig.m.run_once(0);
    }
    assert!(rig.channels[1].1.take(w).is_none(), "the overlapping write completed during the CAW");
    assert_eq!(raw(&m, 102, 1), old[2 * BS..3 * BS], "and reached the bdev");
    release(&rig);
    rig.wait(0, caw).assert_good();
    rig.wait(1, w).assert_good();
    // The write came after the CAW: its block is the write's, the rest the CAW's.
    let now = raw(&m, 100, 4);
    assert_eq!(now[..2 * BS], new[..2 * BS]);
    assert_eq!(now[2 * BS..3 * BS], plain[..]);
    assert_eq!(now[3 * BS..], new[3 * BS..]);
}

#[test]
fn a_compare_and_write_waits_for_writes_in_flight() {
    let (rig, m, n) = rig();
    let old = pattern(7, BS, 2);
    rig.write10(&n, 300, &old, 0).assert_good();
    // A plain write of new data is held at the bdev.
    hold_next(&rig, "write");
    let mid = pattern(8, BS, 2);
    let w = rig.submit(1, rig.command(&rw10(0x2A, 300, 2, 0), &n, mid.len() as u32, Some(&mid)));
    rig.m.run_until_idle(20);
    // A CAW expecting that write's data must not read before it lands.
    let fin = pattern(9, BS, 2);
    let d = caw_data(&mid, &fin);
    let caw = rig.submit(0, rig.command(&caw_cdb(300, 2), &n, d.len() as u32, Some(&d)));
    for _ in 0..200 {
        rig.m.run_once(0);
    }
    assert!(rig.channels[0].1.take(caw).is_none(), "the CAW ran past a write in flight");
    release(&rig);
    rig.wait(1, w).assert_good();
    rig.wait(0, caw).assert_good();
    assert_eq!(raw(&m, 300, 2), fin);
}

#[test]
fn every_length_up_to_the_limit_at_both_ends() {
    let (rig, m, n) = rig();
    let blocks = 1024u64;
    for i in [1usize, 2, 7, 128, 255] {
        for lba in [0, blocks - i as u64] {
            let a = vec![b'A'; i * BS];
            rig.run(&rw16(0x8A, lba, i as u32, 0), &n, a.len() as u32, Some(&a)).assert_good();
            let d = [a.clone(), vec![b'B'; i * BS]].concat();
            rig.run(&caw_cdb(lba, i as u8), &n, d.len() as u32, Some(&d)).assert_good();
            assert_eq!(raw(&m, lba, i), vec![b'B'; i * BS], "{i} blocks at {lba}");
            let r = rig.run(&caw_cdb(lba, i as u8), &n, d.len() as u32, Some(&d));
            r.assert_check(0xE, 0x1D, 0x00);
        }
    }
}

/// COMPARE AND WRITE as an atomic increment from two reactors at once: a
/// lost update (two CAWs both reading N and writing N+1) would leave the
/// counter below the number of successful CAWs.
mod storm {
    use super::*;
    use iscsi::scsi::{Lun, LunChannel, ScsiCommand, ScsiCompletion, ScsiDone, TaskAttr};
    use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    const PER_REACTOR: u64 = 300;

    struct Incrementer {
        ch: RefCell<Option<LunChannel>>,
        nexus: Nexus,
        tag: Cell<u32>,
        done: Cell<u64>,
        successes: Arc<AtomicU64>,
        finished: Arc<AtomicU64>,
    }

    fn block_of(v: u64) -> [u8; BS] {
        let mut b = [0u8; BS];
        b[..8].copy_from_slice(&v.to_le_bytes());
        b
    }

    impl Incrementer {
        fn send(&self, cdb: &[u8], data: Option<&[u8]>, expected_len: u32) {
            let mut full = [0u8; 16];
            full[..cdb.len()].copy_from_slice(cdb);
            let data_out = data.map(|d| {
                let b = bdev::DmaBuf::alloc(d.len()).unwrap();
                b.copy_from(0, d);
                b
            });
            let t = self.tag.get() + 1;
            self.tag.set(t);
            let cmd = ScsiCommand {
                tag: t,
                cdb: full,
                cdb_len: cdb.len() as u8,
                nexus: self.nexus.clone(),
                attr: TaskAttr::Simple,
                expected_len,
                read: data.is_none(),
                write: data.is_some(),
                data_out,
                received_at: None,
            };
            if let Some(ch) = self.ch.borrow().as_ref() {
                ch.execute(cmd);
            }
        }

        fn read(&self) {
            self.send(&rw10(0x28, 0, 1, 0), None, BS as u32);
        }
    }

    impl ScsiDone for Incrementer {
        fn scsi_done(&self, c: ScsiCompletion) {
            if let Some(buf) = &c.data_in {
                // A read: try to move the counter from what it read.
                let mut v = [0u8; 8];
                buf.copy_to(0, &mut v);
                let v = u64::from_le_bytes(v);
                let data = [block_of(v), block_of(v + 1)].concat();
                self.send(&caw_cdb(0, 1), Some(&data), data.len() as u32);
                return;
            }
            // A CAW (or the first command's unit attention): count, go on.
            if c.status == status::GOOD {
                self.successes.fetch_add(1, Ordering::AcqRel);
                self.done.set(self.done.get() + 1);
            }
            if self.done.get() < PER_REACTOR {
                self.read();
            } else {
                self.finished.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    #[test]
    fn concurrent_compare_and_writes_lose_no_update() {
        let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0, 1], IdlePolicy::sleep()) };
        let set = ReactorSet::start(cfg, || {}).unwrap();
        let call = |r: usize, f: Box<dyn FnOnce() + Send>| {
            let (tx, rx) = mpsc::sync_channel(1);
            set.send(r, move || {
                f();
                let _ = tx.send(());
            });
            rx.recv_timeout(Duration::from_secs(20)).unwrap();
        };
        let (tx, rx) = mpsc::sync_channel(1);
        set.send(0, move || {
            let m = Arc::new(MallocBdev::new(malloc_props("Malloc0", BS as u32, 64)).unwrap());
            let h = Registry::get().register(m.clone()).unwrap();
            let _ = tx.send((Lun::new(0, h, TARGET), m));
        });
        let (lun, m) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        let successes = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicU64::new(0));
        for r in 0..2 {
            let (lun, successes, finished) = (lun.clone(), successes.clone(), finished.clone());
            call(
                r,
                Box::new(move || {
                    let inc = Rc::new(Incrementer {
                        ch: RefCell::new(None),
                        nexus: nexus("iqn.1994-05.com.example:storm", r as u64),
                        tag: Cell::new(0),
                        done: Cell::new(0),
                        successes,
                        finished,
                    });
                    *inc.ch.borrow_mut() = Some(LunChannel::open(&lun, inc.clone()).unwrap());
                    // The first command meets the power-on unit attention.
                    inc.send(&[0; 6], None, 0);
                    // The channel and its driver keep each other alive until the end.
                    std::mem::forget(inc);
                }),
            );
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while finished.load(Ordering::Acquire) < 2 {
            assert!(Instant::now() < deadline, "the storm did not finish");
            std::thread::sleep(Duration::from_millis(5));
        }
        let counter = u64::from_le_bytes(raw(&m, 0, 1)[..8].try_into().unwrap());
        let n = successes.load(Ordering::Acquire);
        assert_eq!(n, 2 * PER_REACTOR);
        assert_eq!(counter, n, "every successful COMPARE AND WRITE moved the counter by one");
        set.stop();
        set.join();
    }
}
