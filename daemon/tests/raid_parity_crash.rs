//! raid5 and raid6 with superblock and write-intent bitmap over file-backed
//! members, driven through the real daemon and NVMe/TCP: the kill -9 crash
//! storm of raid_crash.rs (raid1), for the parity levels.
//!
//! Each round starts the daemon from its config alone (the array assembles
//! from its superblocks), writes with two queues into two adjacent bitmap
//! chunks of four (every size from one block to three stripes, some of
//! them whole aligned stripes, so the full-stripe and the partial-stripe
//! paths both run), and kills the daemon with SIGKILL at a random point.
//! Right after the kill, every stripe whose parity disagrees with its data
//! (read from the member files) lies in a chunk whose bit the members'
//! on-disk bitmaps hold (invariant 2 as a crash sees it). After each
//! restart:
//!
//! - the resync rewrote the parity of exactly the stripes of the chunks
//!   whose bits were on disk after the kill (the union of the members'
//!   on-disk bitmaps, read from the files) and nothing else: a few of the
//!   array's stripes. To see it from the data too, after each kill the
//!   last parity block (P, raid6's Q) of one stripe of a dirty chunk and of
//!   one stripe far from every written chunk are garbled in the files: the
//!   first must come back right, the second must stay garbled (then it is
//!   put back);
//! - every stripe's parity is right, computed from the member files (P the
//!   XOR of the data chunks, raid6's Q the GF(2^8) syndrome of md's layout
//!   with polynomial 0x11d), and no stripe outside the written chunks holds
//!   anything;
//! - every acknowledged write reads back (for a block of a write unanswered
//!   at the kill: that write or the one before), never-written blocks are
//!   zeros, and the array counts no impossible IO state.
//!
//! The seed comes from NVRAID_SEED or the clock and is printed first; the
//! kill timing is not replayed by it.

mod common;
use common::crash::*;
use serde_json::{json, Value};
use std::ops::Range;
use std::time::{Duration, Instant};

const MEMBER_BYTES: u64 = 32 << 20;
/// Strip (md's chunk) of 64 KiB: 16 blocks.
const STRIP_KB: u64 = 64;
const STRIP: u64 = STRIP_KB * 1024 / BS;
/// Bitmap chunks of 1 MiB (256 blocks): with three data chunks a stripe is
/// 48 blocks, so stripes straddle bitmap chunk boundaries.
const CHUNK_KB: u64 = 1024;
const CHUNK_BLOCKS: u64 = CHUNK_KB * 1024 / BS;
const CRASH_ROUNDS: u32 = 3;
/// Adjacent chunks the storm writes to, `ROUND_CHUNKS` of them a round.
const HOT_CHUNKS: u64 = 4;
const ROUND_CHUNKS: u64 = 2;
/// Largest write, in stripes.
const MAX_WRITE_STRIPES: u64 = 3;

struct Level {
    name: &'static str,
    members: usize,
    /// Parity chunks per stripe: 1 (P) or 2 (P and Q).
    parities: usize,
}

impl Level {
    fn data(&self) -> u64 {
        (self.members - self.parities) as u64
    }

    fn stripe_blocks(&self) -> u64 {
        self.data() * STRIP
    }

    /// The stripes (sorted, each once) holding array blocks of `chunks`.
    fn stripes_of_chunks(&self, chunks: &[u64]) -> Vec<u64> {
        let sb = self.stripe_blocks();
        let mut v: Vec<u64> =
            chunks.iter().flat_map(|c| c * CHUNK_BLOCKS / sb..((c + 1) * CHUNK_BLOCKS).div_ceil(sb)).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

// ---- parity from the member files ---------------------------------------------

/// GF(2^8) multiplication by the generator 2, polynomial 0x11d.
fn gf_mul2(b: u8) -> u8 {
    (b << 1) ^ if b & 0x80 != 0 { 0x1d } else { 0 }
}

/// What the member files say about the array's stripes.
struct ParityScan {
    /// Stripes whose P (or Q) does not match their data: (stripe, "P"/"Q").
    wrong: Vec<(u64, &'static str)>,
    /// Stripes holding anything but zeros.
    written: Vec<u64>,
}

/// Reads each member's data area and checks every stripe (md left-symmetric:
/// stripe `s` has P on member `n - 1 - s % n`, raid6's Q on the member after
/// it, data chunk `k` on the `k`-th member after the parities, wrapping).
/// P = XOR of the data chunks, Q = Σ 2^k · D_k over GF(2^8). An all-zero
/// stripe is right (zero data, zero parity): a new array needs no sync.
fn scan_parity(s: &Setup, info: &Value, lv: &Level) -> ParityScan {
    let list = info["base_bdevs_list"].as_array().expect("base_bdevs_list");
    let n = lv.members;
    let mut stripes = u64::MAX;
    let areas: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let m = list.iter().find(|m| m["name"] == format!("F{i}")).unwrap_or_else(|| panic!("F{i} in {info}"));
            let (off, size) = (m["data_offset"].as_u64().unwrap(), m["data_size"].as_u64().unwrap());
            stripes = stripes.min(size / STRIP);
            let bytes = std::fs::read(&s.files[i]).unwrap();
            let (from, to) = ((off * BS) as usize, ((off + size) * BS) as usize);
            assert!(off > 0 && to <= bytes.len(), "data area {from}..{to} of {}", bytes.len());
            bytes[from..to].to_vec()
        })
        .collect();
    let cb = (STRIP * BS) as usize;
    let zero = vec![0u8; cb];
    let mut scan = ParityScan { wrong: Vec::new(), written: Vec::new() };
    for st in 0..stripes {
        let chunk = |m: usize| &areas[m][st as usize * cb..(st as usize + 1) * cb];
        if (0..n).all(|m| chunk(m) == &zero[..]) {
            continue;
        }
        scan.written.push(st);
        let p = n - 1 - (st % n as u64) as usize;
        let data: Vec<&[u8]> = (0..lv.data() as usize).map(|k| chunk((p + lv.parities + k) % n)).collect();
        let mut pp = vec![0u8; cb];
        for d in &data {
            for (x, y) in pp.iter_mut().zip(d.iter()) {
                *x ^= y;
            }
        }
        if pp != chunk(p) {
            scan.wrong.push((st, "P"));
        }
        if lv.parities == 2 {
            // Horner: Q = (((D_{d-1}) · 2 ^ D_{d-2}) · 2 ^ …) ^ D_0.
            let mut q = vec![0u8; cb];
            for d in data.iter().rev() {
                for (x, y) in q.iter_mut().zip(d.iter()) {
                    *x = gf_mul2(*x) ^ y;
                }
            }
            if q != chunk((p + 1) % n) {
                scan.wrong.push((st, "Q"));
            }
        }
    }
    scan
}

// ---- the storm ----------------------------------------------------------------------

/// The parity block garbled after a kill in a stripe of no dirty chunk.
struct Garbled {
    far: u64,
    far_member: usize,
    /// Byte offset in the member file.
    far_at: u64,
}

/// Member `i`'s data offset (blocks) from the array's listing.
fn data_offset(info: &Value, i: usize) -> u64 {
    let list = info["base_bdevs_list"].as_array().expect("base_bdevs_list");
    let m = list.iter().find(|m| m["name"] == format!("F{i}")).unwrap_or_else(|| panic!("F{i} in {info}"));
    m["data_offset"].as_u64().unwrap()
}

/// Writes `bytes` into a member file at byte offset `at`.
fn write_at(f: &std::path::Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
    file.write_all_at(bytes, at).unwrap();
    file.sync_all().unwrap();
}

fn storm(lv: Level) {
    let t_start = Instant::now();
    let seed = seed();
    eprintln!("{} crash storm: seed {seed} (replay with NVRAID_SEED={seed}; the kill timing is not replayed)", lv.name);
    let mut rng = Rng(seed);
    let nqn = format!("nqn.2016-06.io.nvraid:paritycrash-{}", lv.name);
    // Writes of up to three stripes (576 KiB) in one command.
    let s =
        setup(&format!("parity-crash-{}", lv.name), &nqn, lv.members, MEMBER_BYTES, json!({"max_io_size": 1 << 20}));
    let base_bdevs: Vec<String> = (0..lv.members).map(|i| format!("F{i}")).collect();
    create_array(
        &s,
        json!({"name": "R", "raid_level": lv.name, "base_bdevs": base_bdevs, "strip_size_kb": STRIP_KB,
               "superblock": true, "bitmap_chunk_size_kb": CHUNK_KB}),
    );
    let sb = lv.stripe_blocks();

    let mut model = Model::default();
    let mut hot: Range<u64> = 0..0;
    let mut array_blocks = 0;
    let mut disk_dirty: Option<Vec<u64>> = None;
    let mut total_resynced = 0;
    // Stripes whose parity the kills left wrong (before the resync).
    let mut total_torn = 0;
    let mut garbled: Option<Garbled> = None;
    for round in 0..=CRASH_ROUNDS {
        model.round = round;
        let mut d = start(&s, &s.full_cfg);
        let log_path = d.log.clone();
        let log = move || std::fs::read_to_string(&log_path).unwrap_or_default();
        let info = wait_in_sync(&mut d, lv.members);
        let ctx = || format!("seed {seed}, round {round}");
        assert_eq!(info["raid_level"], lv.name, "{info}");
        assert_eq!(info["impossible_events"], 0, "{}: {info}", ctx());
        let resynced = info["copied_blocks"].as_u64().expect("copied_blocks");
        match &disk_dirty {
            None => {
                let chunks = info["bitmap"]["num_chunks"].as_u64().expect("bitmap num_chunks");
                let per_member = info["base_bdevs_list"][0]["data_size"].as_u64().unwrap();
                array_blocks = per_member / STRIP * sb;
                assert!(chunks >= 32 && chunks * CHUNK_BLOCKS >= array_blocks, "{info}");
                // Not the last, possibly partial, chunk.
                let first = rng.below(chunks - HOT_CHUNKS);
                hot = first..first + HOT_CHUNKS;
                eprintln!(
                    "array: {array_blocks} blocks, stripes of {sb}, {chunks} bitmap chunks of {CHUNK_BLOCKS}; \
                     writes go to chunks {hot:?}"
                );
                assert_eq!(resynced, 0, "a clean start must not resync: {info}");
            }
            Some(dirty) => {
                // The resync rewrote the parity of exactly the stripes of
                // the chunks whose bit was on disk, and of no other.
                let want = lv.stripes_of_chunks(dirty).len() as u64 * sb;
                let hot_chunks: Vec<u64> = hot.clone().collect();
                let bound = lv.stripes_of_chunks(&hot_chunks).len() as u64 * sb;
                eprintln!(
                    "round {round}: resync covered {resynced} blocks; dirty chunks on disk {dirty:?} \
                     ({want} blocks of their stripes; bound {bound}, array {array_blocks})"
                );
                assert_eq!(resynced, want, "{}: resync vs on-disk bitmap: {info}\n{}", ctx(), log());
                assert!(resynced <= bound && resynced * 10 < array_blocks, "{}: resynced {resynced}", ctx());
                total_resynced += resynced;
            }
        }

        // Parity right everywhere but in the stripe of no dirty chunk
        // garbled after the kill (the resync left it alone; then it is put
        // back), and nothing outside the written chunks.
        let scan = scan_parity(&s, &info, &lv);
        let which = if lv.parities == 1 { "P" } else { "Q" };
        let want_wrong: Vec<(u64, &str)> = garbled.iter().map(|g| (g.far, which)).collect();
        assert_eq!(scan.wrong, want_wrong, "{}: stripes with wrong parity (stripe, which)", ctx());
        let restored = garbled.take().map(|g| {
            write_at(&s.files[g.far_member], g.far_at, &vec![0u8; BS as usize]);
            g.far
        });
        let hot_blocks = hot.start * CHUNK_BLOCKS..hot.end * CHUNK_BLOCKS;
        let stray: Vec<u64> = scan
            .written
            .iter()
            .copied()
            .filter(|&st| Some(st) != restored && (st * sb >= hot_blocks.end || (st + 1) * sb <= hot_blocks.start))
            .collect();
        assert!(stray.is_empty(), "{}: stripes outside the written chunks hold data: {stray:?}", ctx());

        let (session, mut qps) = connect(s.port, &nqn);
        let extra: Vec<u64> = (0..32)
            .map(|_| rng.below(array_blocks))
            .filter(|b| !hot_blocks.contains(b) && !model.blocks.contains_key(b))
            .collect();
        let (landed, not_landed) = verify(&mut qps, &mut model, &extra, &log);
        eprintln!(
            "round {round}: {} blocks verified, {} stripes written, parity right; of the blocks of unanswered \
             writes {landed} had them, {not_landed} did not",
            model.blocks.len(),
            scan.written.len()
        );
        if round == CRASH_ROUNDS {
            drop((qps, session));
            d.stop();
            break;
        }

        let kill_after = Duration::from_millis(150 + rng.below(450));
        let acked0 = model.acked;
        let t0 = Instant::now();
        let first = hot.start + rng.below(HOT_CHUNKS - ROUND_CHUNKS + 1);
        let region = first * CHUNK_BLOCKS..(first + ROUND_CHUNKS) * CHUNK_BLOCKS;
        let pick = |r: &mut Rng| pick_write(r, &region, sb);
        let bm = writes_until_killed(&mut d, &mut qps, &mut model, &mut rng, pick, t0, kill_after, &log);
        drop((qps, session));
        let dirty = disk_dirty_union(&s);
        // Invariant 2 on disk: a stripe the kill left with parity that
        // disagrees with its data lies in a chunk whose bit is on disk.
        let torn = scan_parity(&s, &info, &lv).wrong;
        let covered = lv.stripes_of_chunks(&dirty);
        let uncovered: Vec<_> = torn.iter().filter(|(st, _)| !covered.contains(st)).collect();
        assert!(
            uncovered.is_empty(),
            "{}: stripes with wrong parity outside the dirty chunks {dirty:?}: {uncovered:?}",
            ctx()
        );
        total_torn += torn.len();
        // One more stripe of a dirty chunk torn by hand (its last parity
        // block garbled), and one stripe far from every written chunk: the
        // resync must rewrite the first and must not touch the second.
        let last_parity = |st: u64| (lv.members - 1 - (st % lv.members as u64) as usize + lv.parities - 1) % lv.members;
        let block_at = |m: usize, st: u64| (data_offset(&info, m) + st * STRIP + 5) * BS;
        let junk = vec![0xa5u8; BS as usize];
        if let Some(&c) = dirty.first() {
            let st = (c * CHUNK_BLOCKS).div_ceil(sb);
            assert!((st + 1) * sb <= (c + 1) * CHUNK_BLOCKS, "a whole stripe in a bitmap chunk");
            write_at(&s.files[last_parity(st)], block_at(last_parity(st), st), &junk);
        }
        let hot_stripes = lv.stripes_of_chunks(&hot.clone().collect::<Vec<_>>());
        let far = loop {
            let st = rng.below(array_blocks / sb);
            if !hot_stripes.contains(&st) {
                break st;
            }
        };
        let (far_member, far_at) = (last_parity(far), block_at(last_parity(far), far));
        write_at(&s.files[far_member], far_at, &junk);
        garbled = Some(Garbled { far, far_member, far_at });
        eprintln!(
            "round {round}: killed after {:?}: {} writes acked this round ({} after the kill), {} unanswered; \
             mid-way bitmap {bm}; on disk after the kill: dirty chunks {dirty:?}, parity wrong in {} stripes",
            t0.elapsed(),
            model.acked - acked0,
            model.acked_after_stop,
            model.failed_after_stop,
            torn.len(),
        );
        assert!(model.failed_after_stop > 0, "{}: the kill must come with writes in flight", ctx());
        assert!(dirty.iter().all(|c| hot.contains(c)), "{}: bits {dirty:?} outside the written chunks {hot:?}", ctx());
        for f in &s.files {
            assert!(!sb_clean(f), "{}: superblock says clean after kill -9", f.display());
        }
        (model.acked_after_stop, model.failed_after_stop) = (0, 0);
        disk_dirty = Some(dirty);
    }
    // Some kill found chunks dirty and the resync rewrote their stripes (not
    // asserted per round: a kill may land while every write in flight waits
    // for its batch, after lazy clearing emptied the bitmap).
    assert!(total_resynced > 0, "seed {seed}: no kill left anything to resync");
    for f in &s.files {
        assert!(sb_clean(f), "{}: superblock not clean after the final orderly stop", f.display());
    }
    eprintln!(
        "{} crash storm: {} blocks written, {total_torn} stripes left with wrong parity by the kills, {:?} in all",
        lv.name,
        model.blocks.len(),
        t_start.elapsed()
    );
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// A write inside `region`: half of them 1–8 blocks, a quarter up to one
/// stripe, a quarter up to three stripes, and one in eight of all whole
/// aligned stripes (one to three).
fn pick_write(r: &mut Rng, region: &Range<u64>, sb: u64) -> (u64, u64) {
    let len = region.end - region.start;
    if r.below(8) == 0 {
        let (first, end) = (region.start.div_ceil(sb), region.end / sb);
        let k = (1 + r.below(MAX_WRITE_STRIPES)).min(end - first);
        let s = first + r.below(end - first - k + 1);
        return (s * sb, k * sb);
    }
    let max = match r.below(4) {
        0 | 1 => 8,
        2 => sb,
        _ => MAX_WRITE_STRIPES * sb,
    };
    let n = 1 + r.below(max);
    (region.start + r.below(len - n + 1), n)
}

#[test]
fn raid5_bitmap_survives_a_kill9_storm() {
    storm(Level { name: "raid5", members: 4, parities: 1 });
}

#[test]
fn raid6_bitmap_survives_a_kill9_storm() {
    storm(Level { name: "raid6", members: 5, parities: 2 });
}
