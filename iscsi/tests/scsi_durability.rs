//! What the LUN promises durable survives a power cut of a bdev with a
//! volatile write cache: FUA writes, writes before a SYNCHRONIZE CACHE, and
//! every write once MODE SELECT cleared WCE; plain writes need not.

mod scsi_support;

use bdev::volatile_cache::VolatileCacheBdev;
use bdev::Registry;
use scsi_support::*;
use std::sync::Arc;

const BS: usize = 512;

fn rig() -> (Rig, Arc<VolatileCacheBdev>, iscsi::scsi::Nexus) {
    let mut keep = None;
    let rig = Rig::with_bdev(|| {
        // The destager never runs: the cache keeps what it is not told to flush.
        let c = Arc::new(VolatileCacheBdev::new(malloc_props("Cache0", BS as u32, 1024), 1, 0).unwrap());
        keep = Some(c.clone());
        Registry::get().register(c).unwrap()
    });
    let n = nexus("iqn.1994-05.com.example:a", 1);
    rig.clear_ua(&n);
    (rig, keep.unwrap(), n)
}

fn media(c: &VolatileCacheBdev, lba: usize) -> Vec<u8> {
    let mut v = vec![0u8; BS];
    assert!(c.read_media(lba * BS, &mut v));
    v
}

#[test]
fn fua_writes_survive_a_power_cut_plain_ones_need_a_sync() {
    let (rig, cache, n) = rig();
    // The caching page shows the cache, enabled.
    let r = rig.run(&[0x1A, 0x08, 0x08, 0, 255, 0], &n, 255, None);
    assert_eq!(r.data[4 + 2] & 0x04, 0x04, "WCE set on a cached bdev");
    let r = rig.run(&[0x1A, 0x08, 0x48, 0, 255, 0], &n, 255, None);
    assert_eq!(r.data[4 + 2] & 0x04, 0x04, "WCE changeable");

    let (a, c, d) = (pattern(1, BS, 1), pattern(3, BS, 1), pattern(4, BS, 1));
    // A plain write, cached only until SYNCHRONIZE CACHE.
    rig.write10(&n, 3, &c, 0).assert_good();
    rig.run(&rw10(0x35, 3, 1, 0), &n, 0, None).assert_good();
    // After the sync (the bdev's flush covers the whole cache): one FUA
    // write and one plain write.
    rig.write10(&n, 1, &a, 0x08).assert_good();
    rig.write10(&n, 4, &d, 0).assert_good();
    assert_eq!(cache.power_cut(), 1, "only the plain write was still cached");
    assert_eq!(media(&cache, 1), a, "the FUA write is on the media");
    assert_eq!(media(&cache, 3), c, "the write before SYNCHRONIZE CACHE is on the media");
    assert_eq!(media(&cache, 4), vec![0; BS], "a plain write after the sync was lost: the cache is real");
}

#[test]
fn clearing_wce_makes_every_write_durable() {
    let (rig, cache, n) = rig();
    // MODE SELECT(10): caching page with WCE clear.
    let mut p = vec![0u8; 8 + 20];
    p[8] = 0x08;
    p[9] = 0x12;
    rig.run(&[0x55, 0x10, 0, 0, 0, 0, 0, 0, p.len() as u8, 0], &n, p.len() as u32, Some(&p)).assert_good();
    let r = rig.run(&[0x1A, 0x08, 0x08, 0, 255, 0], &n, 255, None);
    assert_eq!(r.data[4 + 2] & 0x04, 0, "WCE now clear");
    let a = pattern(5, BS, 2);
    rig.write10(&n, 10, &a, 0).assert_good();
    let same = pattern(6, BS, 1);
    rig.run(&rw10(0x41, 20, 3, 0), &n, BS as u32, Some(&same)).assert_good();
    assert_eq!(cache.power_cut(), 0, "nothing left in the cache");
    assert_eq!([media(&cache, 10), media(&cache, 11)].concat(), a);
    assert_eq!(media(&cache, 22), same);
}
