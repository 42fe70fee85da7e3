//! raid5's partial parity log over members with volatile write caches
//! (`ppl`): a log slot whose entry's write may still sit in a member's
//! cache is overwritten only after the cached members flushed.
//!
//! The members are `VolatileCacheBdev`s with no destager (only FUA and
//! flush reach the media). A stripe is written whole and flushed (durable,
//! stamp 1); then two small writes change rows of its data chunks 0 and 1
//! without FUA or flush (stamps 2 and 3). The second one's entry replaces
//! the first one's in the stripe's slot. Power is cut; the media are copied
//! to files and the array assembles from them without the member holding
//! chunk 2, whose rows the small writes never touched and which was made
//! durable: it must read back exactly. Without the flush before the slot is
//! reused, the cut drops the first write's data and parity from the caches
//! while the second entry (FUA) survives; its partial parity was computed
//! over the first write's data, so the replay makes the parity agree with
//! data the media never got, and chunk 2 reconstructs wrong.
//!
//! The same over mixed members, two of them write-through (no cache to
//! report; every write they acknowledge is on their media): the round
//! flushes only the cached members, the write-through ones receive no
//! flush from it, and the stripe recovers all the same.

mod common;
use bdev::volatile_cache::VolatileCacheBdev;
use bdev::{Bdev, BdevChannel, BdevProps, DmaBuf, IoBox, IoFlags, IoType, Registry};
use bdev_raid::rpc::{bdev_raid_create_async, RaidCreateParams};
use bdev_raid::{RaidArray, RaidState};
use common::files::*;
use common::load::*;
use common::*;
use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

const STRIP_KB: u32 = 64;
/// Chunk rows: 16 blocks of 4 KiB.
const STRIP: u64 = STRIP_KB as u64 * 1024 / BS;
const N: usize = 4;
/// Array blocks of a stripe.
const SB: u64 = (N as u64 - 1) * STRIP;
/// Member size in blocks (16 MiB).
const MEMBER_BLOCKS: u64 = 4096;

fn parity_member(s: u64) -> usize {
    (N as u64 - 1 - s % N as u64) as usize
}

fn data_member(s: u64, k: u64) -> usize {
    ((parity_member(s) as u64 + 1 + k) % N as u64) as usize
}

/// A write-through member: it reports no volatile write cache, and every
/// write it acknowledges is on its media (it goes to a `VolatileCacheBdev`
/// with FUA). Flushes reach that bdev, which counts them.
struct WriteThrough {
    props: BdevProps,
    media: Arc<VolatileCacheBdev>,
}

impl Bdev for WriteThrough {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn module(&self) -> &'static str {
        "write_through"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        self.media.io_type_supported(t)
    }
    fn create_channel(&self) -> Result<Rc<dyn BdevChannel>, bdev::BdevError> {
        Ok(Rc::new(WriteThroughChannel(self.media.create_channel()?)))
    }
}

struct WriteThroughChannel(Rc<dyn BdevChannel>);

impl BdevChannel for WriteThroughChannel {
    fn submit(&self, mut io: IoBox) {
        if matches!(io.io_type, IoType::Write | IoType::WriteZeroes | IoType::Unmap) {
            io.flags.insert(IoFlags::FUA);
        }
        self.0.submit(io);
    }
}

/// Members C0.. and raid5 "R" over them with a superblock (so a partial
/// parity log), online. The members in `write_through` are write-through
/// (`WriteThrough`), the others cached (no destager). Returns each
/// member's media (a write-through member's too: its flush counter).
fn cached_raid5(set: &Set, write_through: &'static [usize]) -> Vec<Arc<VolatileCacheBdev>> {
    let members = set.call(0, move || {
        bdev_raid::init();
        (0..N)
            .map(|i| {
                let props = BdevProps::new(&format!("C{i}"), "Volatile cache", BS as u32, MEMBER_BLOCKS, None);
                let m = Arc::new(VolatileCacheBdev::new(props.clone(), i as u64, 0).unwrap());
                if write_through.contains(&i) {
                    let wt = WriteThrough { props, media: m.clone() };
                    assert!(!wt.has_write_cache());
                    Registry::get().register(Arc::new(wt)).unwrap();
                } else {
                    Registry::get().register(m.clone()).unwrap();
                }
                m
            })
            .collect::<Vec<_>>()
    });
    set.call_async(0, 30, move |done| {
        bdev_raid_create_async(
            RaidCreateParams {
                name: "R".into(),
                raid_level: "raid5".into(),
                base_bdevs: (0..N).map(|i| format!("C{i}")).collect(),
                strip_size_kb: Some(STRIP_KB),
                uuid: None,
                superblock: Some(true),
                // No bitmap: the replay after the cut takes every entry
                // (with one, only those in chunks still dirty; a clear of
                // the bitmap flushes the members first).
                bitmap: Some(false),
                bitmap_chunk_size_kb: None,
            },
            done,
        )
    })
    .expect("create raid5 R over cached members");
    set.wait_for(20, "R online", || RaidArray::find("R").is_some_and(|r| r.state() == RaidState::Online));
    assert!(set.call(0, || RaidArray::find("R").unwrap().has_partial_parity_log()));
    members
}

/// `writes` (array block, stamp, blocks) sent at once through "R" on
/// reactor 0, none with FUA; returns once all succeeded.
fn write_all(set: &Set, writes: Vec<(u64, u64, u64)>) {
    let n = writes.len();
    let ok = set.call_async(0, 30, move |done| {
        let ch = Registry::get().lookup("R").unwrap().channel().unwrap();
        let left = Rc::new(Cell::new(n));
        let good = Rc::new(Cell::new(0usize));
        let done = Rc::new(RefCell::new(Some(done)));
        for (lba, stamp, blocks) in writes {
            let buf = DmaBuf::alloc((blocks * BS) as usize).unwrap();
            buf.copy_from(0, &blocks_of(stamp, lba, blocks));
            let mut io = IoBox::data(IoType::Write, lba, blocks, Some(buf)).unwrap();
            let (left, good, done) = (left.clone(), good.clone(), done.clone());
            io.set_done(Rc::new(move |io: IoBox| {
                good.set(good.get() + usize::from(io.status.is_ok()));
                left.set(left.get() - 1);
                if left.get() == 0 {
                    if let Some(d) = done.borrow_mut().take() {
                        d(good.get());
                    }
                }
            }));
            ch.submit(io);
        }
    });
    assert_eq!(ok, n, "every write succeeded");
}

/// The media of each member (what a power cut left) as files m0.img...
fn media_files(members: &[Arc<VolatileCacheBdev>], tag: &str) -> (TempDir, Vec<PathBuf>) {
    let dir = temp_dir(tag);
    let files = members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut bytes = vec![0u8; (MEMBER_BLOCKS * BS) as usize];
            assert!(m.read_media(0, &mut bytes));
            let p = dir.join(format!("m{i}.img"));
            std::fs::write(&p, &bytes).unwrap();
            p
        })
        .collect();
    (dir, files)
}

/// Assembles "R" from `files` without member `lost` (degraded) and reads
/// `blocks` at array block `lba`.
fn degraded_read(files: &[PathBuf], lost: usize, lba: u64, blocks: u64) -> Vec<u8> {
    let set = start_assembling_degraded();
    for (i, f) in files.iter().enumerate().filter(|&(i, _)| i != lost) {
        open_member(&set, f, &format!("F{i}"));
    }
    set.wait_for(10, "degraded start", || {
        RaidArray::find("R").is_some_and(|r| r.state() == RaidState::Online && r.is_degraded())
    });
    let out = raid_io(&set, IoType::Read, lba, blocks, None);
    drop(set);
    out
}

/// Every member loses its cache, then the array assembles degraded without
/// the member of `stripe`'s chunk 2, which no write touched: that chunk
/// (stamp 1) must reconstruct exactly.
fn power_cut_then_chunk_2_reads_back(set: Set, members: &[Arc<VolatileCacheBdev>], stripe: u64, tag: &str) {
    for m in members {
        m.power_cut();
    }
    drop(set);
    let (_dir, files) = media_files(members, tag);
    let lost = data_member(stripe, 2);
    let base = stripe * SB;
    let got = degraded_read(&files, lost, base + 2 * STRIP, STRIP);
    let want = blocks_of(1, base + 2 * STRIP, STRIP);
    let row = |b: &[u8], i: u64| b[(i * BS) as usize..((i + 1) * BS) as usize].to_vec();
    let bad: Vec<u64> = (0..STRIP).filter(|&i| row(&got, i) != row(&want, i)).collect();
    assert!(bad.is_empty(), "chunk 2 (member {lost} lost) reconstructs wrong in rows {bad:?} after the power cut");
}

#[test]
fn a_log_slot_is_reused_only_after_the_cached_members_flushed_so_a_power_cut_leaves_the_stripe_recoverable() {
    let set = start(1);
    let members = cached_raid5(&set, &[]);
    let stripe = 2u64;
    let base = stripe * SB;
    // Durable: the whole stripe, then a flush.
    raid_io(&set, IoType::Write, base, SB, Some(blocks_of(1, base, SB)));
    raid_io(&set, IoType::Flush, 0, 0, None);
    let flushes_before: Vec<u64> = members.iter().map(|m| m.counters().flushes).collect();
    // Two small writes into the stripe, acknowledged from the caches.
    write_all(&set, vec![(base + 3, 2, 4)]);
    write_all(&set, vec![(base + STRIP + 3, 3, 4)]);
    let flushed: Vec<u64> = members.iter().zip(&flushes_before).map(|(m, b)| m.counters().flushes - b).collect();
    // The second write reused the stripe's slot: every cached member
    // flushed once before it (the first write's data and parity).
    assert!(flushed.iter().all(|&f| f >= 1), "members flushed before the slot was reused: {flushed:?}");
    let dm1 = data_member(stripe, 1);
    assert!(members[dm1].cached_blocks() > 0, "the second write's data waits in the cache");
    power_cut_then_chunk_2_reads_back(set, &members, stripe, "ppl-cache");
}

/// Writes that wait for a flush before reusing slots share one round: 16
/// small writes into 16 stripes whose slots (on one parity member) all hold
/// entries of writes not yet flushed cost one flush per cached member, not
/// one per write.
#[test]
fn writes_waiting_for_flushed_slots_share_one_flush_round() {
    let set = start(1);
    let members = cached_raid5(&set, &[]);
    // `ppl::PPL_SLOTS`: slots per member.
    let slots = 16u64;
    // Stripes whose parity is on member 0: 3, 7, 11, ...
    let stripes: Vec<u64> = (0..2 * slots).map(|i| 3 + 4 * i).collect();
    assert!(stripes.iter().all(|&s| parity_member(s) == 0));
    let small = |s: u64, stamp: u64| (s * SB + 5, stamp, 2u64);
    // Every slot of member 0 takes an entry (empty slots: no flush).
    let before: Vec<u64> = members.iter().map(|m| m.counters().flushes).collect();
    write_all(&set, stripes[..slots as usize].iter().map(|&s| small(s, 1)).collect());
    let after_fill: Vec<u64> = members.iter().map(|m| m.counters().flushes).collect();
    assert_eq!(before, after_fill, "empty slots need no flush");
    // 16 more stripes, all at once: each needs a slot holding an entry.
    write_all(&set, stripes[slots as usize..].iter().map(|&s| small(s, 2)).collect());
    let rounds: Vec<u64> = members.iter().zip(&after_fill).map(|(m, b)| m.counters().flushes - b).collect();
    assert!(
        rounds.iter().all(|&r| (1..=2).contains(&r)),
        "{slots} writes waited for flushed slots: flushes per member {rounds:?} (one round covers them)"
    );
}

/// Mixed members: the flush before a slot is reused goes to the cached
/// members only; the write-through ones get none from it, and the stripe
/// recovers after a power cut as over cached members alone.
#[test]
fn a_log_slot_reuse_flushes_only_the_cached_members_of_a_mixed_array_and_the_stripe_recovers() {
    let set = start(1);
    let stripe = 2u64;
    // Stripe 2: P on member 1, data chunks 0, 1, 2 on members 2, 3, 0.
    assert_eq!((parity_member(stripe), data_member(stripe, 0)), (1, 2));
    assert_eq!((data_member(stripe, 1), data_member(stripe, 2)), (3, 0));
    // Write-through: the parity member and chunk 1's. Cached: chunk 0's
    // (the first small write's data, which only the flush makes durable)
    // and chunk 2's (lost for the read back).
    const WRITE_THROUGH: [usize; 2] = [1, 3];
    let write_through = &WRITE_THROUGH;
    let members = cached_raid5(&set, write_through);
    let base = stripe * SB;
    raid_io(&set, IoType::Write, base, SB, Some(blocks_of(1, base, SB)));
    raid_io(&set, IoType::Flush, 0, 0, None);
    let flushes_before: Vec<u64> = members.iter().map(|m| m.counters().flushes).collect();
    write_all(&set, vec![(base + 3, 2, 4)]);
    assert!(members[2].cached_blocks() > 0, "the first small write's data waits in member 2's cache");
    write_all(&set, vec![(base + STRIP + 3, 3, 4)]);
    let flushed: Vec<u64> = members.iter().zip(&flushes_before).map(|(m, b)| m.counters().flushes - b).collect();
    for (m, &f) in flushed.iter().enumerate() {
        if write_through.contains(&m) {
            assert_eq!(f, 0, "write-through member {m} got a flush from the slot reuse: {flushed:?}");
            assert_eq!(members[m].cached_blocks(), 0, "write-through member {m} holds nothing in a cache");
        } else {
            assert!(f >= 1, "cached member {m} flushed before the slot was reused: {flushed:?}");
        }
    }
    assert_eq!(members[2].cached_blocks(), 0, "the flush made the first write's data durable");
    power_cut_then_chunk_2_reads_back(set, &members, stripe, "ppl-mixed-cache");
}
