//! A RAM bdev with a modelled volatile write cache and a power switch: the
//! fault model behind the durability tests.
//!
//! A plain write lands in the cache and is acknowledged from there, as on a
//! drive with its write cache on. A FUA write, and every cached block when a
//! flush is submitted, reach the "media". [`VolatileCacheBdev::power_cut`]
//! drops whatever the cache still holds and fails all later IO, so a test can
//! check that everything the stack promised durable is on the media.
//! A seeded "destager" also writes random cached blocks back on its own, as a
//! real cache does, so tests cannot rely on the cache holding data either.
//!
//! Not a fast bdev: one mutex guards the model. It is test equipment.

use crate::channel::{Bdev, BdevChannel, BdevProps};
use crate::io::{IoBox, IoError, IoStatus, IoType};
use crate::malloc::validate_geometry;
use crate::rng::SimRng;
use crate::BdevError;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};

/// What the cache and the media hold.
struct Model {
    media: Vec<u8>,
    /// Block number -> the newest data written to it that the media lacks.
    cache: BTreeMap<u64, Box<[u8]>>,
    powered: bool,
    rng: SimRng,
    /// One in `destage_one_in` writes also destages a random cached block.
    destage_one_in: u64,
    counters: CacheCounters,
}

/// What reached the bdev, for tests that check a layer passed FUA and flush on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheCounters {
    pub writes: u64,
    pub fua_writes: u64,
    pub flushes: u64,
    /// Blocks written back by flushes and FUA writes.
    pub blocks_made_durable: u64,
    /// Blocks the last power cut dropped.
    pub blocks_lost: u64,
}

pub struct VolatileCacheBdev {
    props: BdevProps,
    model: Arc<Mutex<Model>>,
}

impl VolatileCacheBdev {
    /// A zeroed bdev; `seed` drives the destager (`destage_one_in` 0: never).
    pub fn new(mut props: BdevProps, seed: u64, destage_one_in: u64) -> Result<Self, BdevError> {
        validate_geometry(&props)?;
        props.write_cache = true;
        props.deallocated_reads_zeroes = true;
        let bytes = usize::try_from(props.size_bytes())
            .map_err(|_| BdevError::Invalid(format!("{}: size does not fit in memory", props.name)))?;
        let model = Model {
            media: vec![0; bytes],
            cache: BTreeMap::new(),
            powered: true,
            rng: SimRng::new(seed),
            destage_one_in,
            counters: CacheCounters::default(),
        };
        Ok(VolatileCacheBdev { props, model: Arc::new(Mutex::new(model)) })
    }

    fn model(&self) -> MutexGuard<'_, Model> {
        lock(&self.model)
    }

    /// Power loss: the cache's contents are gone, and every IO from now on
    /// fails with `NoDevice`. Returns how many blocks were lost.
    pub fn power_cut(&self) -> u64 {
        let mut m = self.model();
        let lost = m.cache.len() as u64;
        m.cache.clear();
        m.powered = false;
        m.counters.blocks_lost = lost;
        lost
    }

    /// Power back on, with the media as the cut left it.
    pub fn power_on(&self) {
        self.model().powered = true;
    }

    /// The media's bytes (what survives a power cut), from `offset_bytes`.
    pub fn read_media(&self, offset_bytes: usize, dst: &mut [u8]) -> bool {
        let m = self.model();
        match m.media.get(offset_bytes..offset_bytes + dst.len()) {
            Some(src) => {
                dst.copy_from_slice(src);
                true
            }
            None => false,
        }
    }

    pub fn counters(&self) -> CacheCounters {
        self.model().counters
    }

    /// Blocks currently held only in the cache.
    pub fn cached_blocks(&self) -> usize {
        self.model().cache.len()
    }
}

fn lock(m: &Mutex<Model>) -> MutexGuard<'_, Model> {
    // A panicking test thread must not hide the model from the checker.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Model {
    fn destage(&mut self, block: u64, block_size: usize) {
        if let Some(data) = self.cache.remove(&block) {
            let off = block as usize * block_size;
            self.media[off..off + block_size].copy_from_slice(&data);
            self.counters.blocks_made_durable += 1;
        }
    }

    fn destage_random(&mut self, block_size: usize) {
        if self.destage_one_in == 0 || self.cache.is_empty() || self.rng.below(self.destage_one_in) != 0 {
            return;
        }
        let nth = self.rng.below(self.cache.len() as u64) as usize;
        if let Some(&block) = self.cache.keys().nth(nth) {
            self.destage(block, block_size);
        }
    }

    fn flush_all(&mut self, block_size: usize) {
        let blocks: Vec<u64> = self.cache.keys().copied().collect();
        for b in blocks {
            self.destage(b, block_size);
        }
    }
}

impl Bdev for VolatileCacheBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn module(&self) -> &'static str {
        "volatile_cache"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        !matches!(t, IoType::Reset)
    }
    fn create_channel(&self) -> Result<Rc<dyn BdevChannel>, BdevError> {
        Ok(Rc::new(CacheChannel { model: self.model.clone(), block_size: self.props.block_size as usize }))
    }
}

struct CacheChannel {
    model: Arc<Mutex<Model>>,
    block_size: usize,
}

impl BdevChannel for CacheChannel {
    fn submit(&self, io: IoBox) {
        let bs = self.block_size;
        let mut m = lock(&self.model);
        if !m.powered {
            drop(m);
            return io.fail(IoError::NoDevice);
        }
        let first = io.offset_blocks;
        let blocks = first..first + io.num_blocks;
        match io.io_type {
            IoType::Read => {
                let Some(buf) = io.buf.as_ref() else { return io.fail(IoError::OutOfRange) };
                buf.with_mut(|dst| {
                    for (i, b) in blocks.enumerate() {
                        let out = &mut dst[i * bs..(i + 1) * bs];
                        match m.cache.get(&b) {
                            Some(data) => out.copy_from_slice(data),
                            None => out.copy_from_slice(&m.media[b as usize * bs..(b as usize + 1) * bs]),
                        }
                    }
                });
            }
            IoType::Write | IoType::WriteZeroes | IoType::Unmap => {
                let fua = io.flags.fua();
                m.counters.writes += 1;
                m.counters.fua_writes += u64::from(fua);
                for (i, b) in blocks.enumerate() {
                    let data: Box<[u8]> = match (&io.buf, io.io_type) {
                        (Some(buf), IoType::Write) => buf.with(|src| src[i * bs..(i + 1) * bs].into()),
                        _ => vec![0; bs].into(),
                    };
                    if fua {
                        // The media gets this write; an older cached copy of
                        // the block must not be destaged over it later.
                        m.cache.remove(&b);
                        let off = b as usize * bs;
                        m.media[off..off + bs].copy_from_slice(&data);
                        m.counters.blocks_made_durable += 1;
                    } else {
                        m.cache.insert(b, data);
                    }
                }
                m.destage_random(bs);
            }
            IoType::Flush => {
                m.counters.flushes += 1;
                m.flush_all(bs);
            }
            IoType::Reset => {
                drop(m);
                return io.fail(IoError::NotSupported);
            }
        }
        drop(m);
        io.complete(IoStatus::Success);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::DmaBuf;
    use crate::io::IoFlags;

    fn write(ch: &dyn BdevChannel, block: u64, byte: u8, flags: IoFlags) {
        let buf = DmaBuf::alloc(512).unwrap();
        buf.fill(byte);
        let mut io = IoBox::data(IoType::Write, block, 1, Some(buf)).unwrap();
        io.flags = flags;
        ch.submit(io);
    }

    fn media_byte(b: &VolatileCacheBdev, block: usize) -> u8 {
        let mut one = [0u8; 1];
        assert!(b.read_media(block * 512, &mut one));
        one[0]
    }

    #[test]
    fn only_fua_and_flushed_writes_survive_a_power_cut() {
        let bdev = VolatileCacheBdev::new(BdevProps::new("vc", "t", 512, 16, None), 1, 0).unwrap();
        let ch = bdev.create_channel().unwrap();
        write(&*ch, 0, 0xa0, IoFlags::NONE);
        write(&*ch, 1, 0xa1, IoFlags::FUA);
        ch.submit(IoBox::data(IoType::Flush, 0, 0, None).unwrap());
        write(&*ch, 2, 0xa2, IoFlags::NONE);
        write(&*ch, 3, 0xa3, IoFlags::NONE);
        // A FUA write over a cached block: the older cached data must not win.
        write(&*ch, 3, 0xb3, IoFlags::FUA);
        crate::io::drain_completions();
        assert_eq!(bdev.cached_blocks(), 1);
        assert_eq!(bdev.power_cut(), 1);
        assert_eq!([0, 1, 2, 3].map(|b| media_byte(&bdev, b)), [0xa0, 0xa1, 0, 0xb3]);
        let c = bdev.counters();
        assert_eq!((c.writes, c.fua_writes, c.flushes, c.blocks_lost), (5, 2, 1, 1));
        let mut io = IoBox::data(IoType::Read, 0, 1, DmaBuf::alloc(512)).unwrap();
        io.set_done(Rc::new(|io: IoBox| assert_eq!(io.status, IoStatus::Failed(IoError::NoDevice))));
        ch.submit(io);
        assert_eq!(crate::io::drain_completions(), 1);
    }
}
