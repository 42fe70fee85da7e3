//! raid5's contract at its edges: FUA reaches every data and parity member
//! write and the data survives a power cut of every member's cache; flush
//! reaches every member; unmap and write zeroes are not advertised; what
//! is not done yet (superblock) is refused with an error a person can
//! read, never accepted and ignored; removing members degrades, then
//! takes the array offline.

mod common;

use bdev::volatile_cache::{CacheCounters, VolatileCacheBdev};
use bdev::{BdevProps, DmaBuf, IoBox, IoFlags, IoStatus, IoType, Registry};
use bdev_raid::rpc::{self, RaidAddBaseBdevParams, RaidCheckParams, RaidRemoveBaseBdevParams};
use common::*;
use std::sync::Arc;

const MEMBER_BLOCKS: u64 = 512;
/// 4 KiB chunks of 512-byte blocks.
const CHUNK: u64 = 8;

fn cache_raid5(set: &Set) -> Vec<Arc<VolatileCacheBdev>> {
    set.call(0, || {
        let members: Vec<_> = (0..3)
            .map(|i| {
                let props = BdevProps::new(&format!("C{i}"), "Volatile cache", BLOCK as u32, MEMBER_BLOCKS, None);
                let m = Arc::new(VolatileCacheBdev::new(props, i, 0).unwrap());
                Registry::get().register(m.clone()).unwrap();
                m
            })
            .collect();
        create_raid("R", "raid5", Some(4), &["C0", "C1", "C2"]).unwrap();
        members
    })
}

/// Submits one IO to R on reactor 0 and waits for its status.
fn io(set: &Set, t: IoType, flags: IoFlags, off: u64, n: u64, byte: u8) -> IoStatus {
    set.call_async(0, 10, move |done: Box<dyn FnOnce(IoStatus) + Send>| {
        let ch = Registry::get().lookup("R").unwrap().channel().unwrap();
        let buf = (n > 0).then(|| {
            let b = DmaBuf::alloc((n * BLOCK) as usize).unwrap();
            b.fill(byte);
            b
        });
        let mut io = IoBox::data(t, off, n, buf).unwrap();
        io.flags = flags;
        let done = std::cell::RefCell::new(Some(done));
        io.set_done(std::rc::Rc::new(move |io: IoBox| {
            if let Some(d) = done.borrow_mut().take() {
                d(io.status);
            }
        }));
        ch.submit(io);
    })
}

fn sum(members: &[Arc<VolatileCacheBdev>]) -> CacheCounters {
    members.iter().map(|m| m.counters()).fold(CacheCounters::default(), |a, c| CacheCounters {
        writes: a.writes + c.writes,
        fua_writes: a.fua_writes + c.fua_writes,
        flushes: a.flushes + c.flushes,
        ..a
    })
}

fn media(m: &VolatileCacheBdev, off: u64, n: u64) -> Vec<u8> {
    let mut v = vec![0u8; (n * BLOCK) as usize];
    assert!(m.read_media((off * BLOCK) as usize, &mut v));
    v
}

#[test]
fn fua_reaches_data_and_parity_and_flush_every_member() {
    let set = start(2);
    let members = cache_raid5(&set);

    // A partial-stripe FUA write (one block of stripe 0's first data chunk):
    // reads the other data chunk, then writes data and parity, both FUA.
    let before = sum(&members);
    assert_eq!(io(&set, IoType::Write, IoFlags::FUA, 3, 1, 0xA5), IoStatus::Success);
    let d = sum(&members);
    assert_eq!((d.writes - before.writes, d.fua_writes - before.fua_writes), (2, 2), "data and parity, both FUA");

    // A full-stripe FUA write (stripe 1: 16 blocks): two data chunks and P.
    let before = sum(&members);
    assert_eq!(io(&set, IoType::Write, IoFlags::FUA, 2 * CHUNK, 2 * CHUNK, 0x3C), IoStatus::Success);
    let d = sum(&members);
    assert_eq!((d.writes - before.writes, d.fua_writes - before.fua_writes), (3, 3));

    // A plain write is plain everywhere; flush reaches every member.
    let before = sum(&members);
    assert_eq!(io(&set, IoType::Write, IoFlags::NONE, 4 * CHUNK + 1, 3, 0x11), IoStatus::Success);
    let d = sum(&members);
    assert_eq!((d.writes - before.writes, d.fua_writes - before.fua_writes), (2, 0));
    assert_eq!(io(&set, IoType::Flush, IoFlags::NONE, 0, 0, 0), IoStatus::Success);
    for m in &members {
        assert_eq!(m.counters().flushes, 1, "flush reaches every member");
    }

    // Power cut after FUA writes and flush: the media holds data and parity.
    for m in &members {
        m.power_cut();
    }
    // Stripe 0: P on member 2, data chunk 0 on member 0, chunk 1 on member 1.
    let (d0, d1, p) = (media(&members[0], 0, CHUNK), media(&members[1], 0, CHUNK), media(&members[2], 0, CHUNK));
    assert!(d0[3 * BLOCK as usize..4 * BLOCK as usize].iter().all(|&b| b == 0xA5));
    for i in 0..d0.len() {
        assert_eq!(p[i], d0[i] ^ d1[i], "stripe 0 parity on media at byte {i}");
    }
    // Stripe 1: P on member 1, data on members 2 and 0.
    let (d0, d1, p) =
        (media(&members[2], CHUNK, CHUNK), media(&members[0], CHUNK, CHUNK), media(&members[1], CHUNK, CHUNK));
    assert!(d0.iter().chain(&d1).all(|&b| b == 0x3C));
    assert!(p.iter().all(|&b| b == 0));
}

#[test]
fn unmap_and_write_zeroes_are_not_advertised() {
    let set = start(1);
    set.call(0, || {
        for i in 0..3 {
            malloc(&format!("M{i}"), MEMBER_BLOCKS);
        }
        create_raid("R", "raid5f", Some(4), &["M0", "M1", "M2"]).unwrap();
        let h = Registry::get().lookup("R").unwrap();
        // malloc offers both; a raid5 passing them on would leave parity wrong.
        assert!(Registry::get().lookup("M0").unwrap().bdev().io_type_supported(IoType::Unmap));
        assert!(!h.bdev().io_type_supported(IoType::Unmap));
        assert!(!h.bdev().io_type_supported(IoType::WriteZeroes));
        assert!(h.bdev().io_type_supported(IoType::Flush));
    });
    assert_eq!(io(&set, IoType::Unmap, IoFlags::NONE, 0, 8, 0), IoStatus::Failed(bdev::IoError::NotSupported));
}

#[test]
fn what_is_not_done_yet_is_refused_readably() {
    let set = start(1);
    set.call(0, || {
        for i in 0..5 {
            malloc(&format!("M{i}"), 8192);
        }
        assert!(create_raid("S", "raid5", Some(64), &["M0", "M1"]).unwrap_err().to_string().contains("at least 3"));
        create_raid("R", "raid5", Some(64), &["M0", "M1", "M2"]).unwrap();
    });
    // Nothing to rebuild onto a whole array: no free slot (said so).
    let r = rpc_async(&set, 10, |done| {
        rpc::bdev_raid_add_base_bdev(RaidAddBaseBdevParams { raid_bdev: "R".into(), base_bdev: "M3".into() }, done)
    });
    assert!(r.unwrap_err().to_string().contains("no free slot"));
    // A check of a whole array with nothing written: parity all zero, right.
    let r = rpc_async(&set, 10, |done| rpc::bdev_raid_check(RaidCheckParams { name: "R".into(), repair: false }, done));
    assert_eq!(r.unwrap()["mismatched_blocks"], 0);
    // The array is untouched and serves IO.
    assert_eq!(io(&set, IoType::Write, IoFlags::NONE, 5, 20, 0x42), IoStatus::Success);
    assert_eq!(io(&set, IoType::Read, IoFlags::NONE, 5, 20, 0), IoStatus::Success);
    // Removing a member leaves it degraded, still serving IO (the storms
    // check the data); a second removal takes it offline.
    let r = rpc_async(&set, 10, |done| {
        rpc::bdev_raid_remove_base_bdev(RaidRemoveBaseBdevParams { name: "M1".into() }, done)
    });
    assert_eq!(r.unwrap(), serde_json::json!(true));
    let raid = set.call(0, || bdev_raid::RaidArray::find("R").unwrap());
    assert!(raid.is_degraded());
    assert_eq!(raid.state(), bdev_raid::RaidState::Online);
    assert_eq!(io(&set, IoType::Write, IoFlags::NONE, 5, 200, 0x42), IoStatus::Success);
    assert_eq!(io(&set, IoType::Read, IoFlags::NONE, 5, 200, 0), IoStatus::Success);
    let r = rpc_async(&set, 10, |done| {
        rpc::bdev_raid_remove_base_bdev(RaidRemoveBaseBdevParams { name: "M2".into() }, done)
    });
    assert!(r.is_ok());
    assert_eq!(raid.state(), bdev_raid::RaidState::Offline);
    assert!(!io(&set, IoType::Read, IoFlags::NONE, 5, 200, 0).is_ok());
}

/// Writes `len` blocks of `byte`-seeded noise at `off` of bdev `name` (reactor 0).
fn scribble(set: &Set, name: &'static str, off: u64, n: u64, seed: u64) -> IoStatus {
    set.call_async(0, 10, move |done: Box<dyn FnOnce(IoStatus) + Send>| {
        let ch = Registry::get().lookup(name).unwrap().channel().unwrap();
        let buf = DmaBuf::alloc((n * BLOCK) as usize).unwrap();
        let mut rng = bdev::rng::SimRng::new(seed);
        buf.with_mut(|b| b.iter_mut().for_each(|x| *x = rng.below(256) as u8));
        let mut io = IoBox::data(IoType::Write, off, n, Some(buf)).unwrap();
        let done = std::cell::RefCell::new(Some(done));
        io.set_done(std::rc::Rc::new(move |io: IoBox| {
            if let Some(d) = done.borrow_mut().take() {
                d(io.status);
            }
        }));
        ch.submit(io);
    })
}

/// Members that start with anything on them: the first small writes of a
/// new array compute parity from the whole stripe (never from the old
/// parity, which is noise), so the rows they touch are consistent at once;
/// a check finds the rest, repair fixes it, and from then on small writes
/// on this five-member array update the parity in place and keep it right.
#[test]
fn a_new_array_needs_no_sync_and_read_modify_write_waits_for_a_check() {
    let set = start(1);
    let names = ["G0", "G1", "G2", "G3", "G4"];
    let mallocs = set.call(0, move || names.map(|n| malloc(n, MEMBER_BLOCKS)));
    for (i, n) in names.into_iter().enumerate() {
        assert_eq!(scribble(&set, n, 0, MEMBER_BLOCKS, 77 + i as u64), IoStatus::Success);
    }
    set.call(0, move || create_raid("R", "raid5", Some(4), &names).unwrap());
    // XOR of the five members over member blocks `rows`: zero where consistent.
    let consistent = |rows: std::ops::Range<u64>| {
        let data: Vec<Vec<u8>> = mallocs.iter().map(|m| raw(m, rows.start, rows.end - rows.start)).collect();
        (0..data[0].len()).all(|i| data.iter().fold(0u8, |x, d| x ^ d[i]) == 0)
    };
    let stripe_blocks = 4 * CHUNK;
    // One block in data chunk 0 of stripes 0..8: row 3 of each stripe.
    for s in 0..8 {
        assert_eq!(scribble(&set, "R", s * stripe_blocks + 3, 1, 500 + s), IoStatus::Success);
        assert!(consistent(s * CHUNK + 3..s * CHUNK + 4), "stripe {s}: the written row's parity is right");
    }
    assert!(!consistent(0..CHUNK), "the members' noise elsewhere is still there");
    let r = rpc_async(&set, 20, |done| rpc::bdev_raid_check(RaidCheckParams { name: "R".into(), repair: true }, done));
    let r = r.unwrap();
    assert!(r["mismatched_blocks"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["repaired_blocks"], r["mismatched_blocks"], "{r}");
    assert!(consistent(0..MEMBER_BLOCKS / CHUNK * CHUNK));
    // Parity trusted now: single-block writes (read-modify-write on five
    // members: two reads instead of three) keep every stripe consistent.
    for s in 0..16 {
        assert_eq!(scribble(&set, "R", s * stripe_blocks + 2 * CHUNK + 5, 2, 900 + s), IoStatus::Success);
    }
    assert!(consistent(0..MEMBER_BLOCKS / CHUNK * CHUNK));
}
