//! Test support for the SCSI device server: a manual reactor set with
//! malloc (or other) bdevs, LUN channels whose completions are collected,
//! and helpers that build CDBs and run one command to its answer.
#![allow(dead_code)]

use bdev::malloc::MallocBdev;
use bdev::{BdevHandle, BdevProps, DmaBuf, Registry};
use iscsi::scsi::{status, Lun, LunChannel, Nexus, Residual, ScsiCommand, ScsiCompletion, ScsiDone, TaskAttr};
use reactor::{ManualSet, ReactorSet};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

pub const TARGET: &str = "iqn.2016-06.io.nvraid:test";

/// Answers of one channel, by arrival.
#[derive(Default)]
pub struct Collector(pub RefCell<Vec<ScsiCompletion>>);

impl ScsiDone for Collector {
    fn scsi_done(&self, c: ScsiCompletion) {
        self.0.borrow_mut().push(c);
    }
}

impl Collector {
    pub fn take(&self, tag: u32) -> Option<ScsiCompletion> {
        let mut v = self.0.borrow_mut();
        let i = v.iter().position(|c| c.tag == tag)?;
        Some(v.remove(i))
    }
}

/// An answer copied out of its buffers.
#[derive(Debug)]
pub struct Reply {
    pub status: u8,
    pub sense: Vec<u8>,
    pub data: Vec<u8>,
    pub residual: Residual,
}

impl Reply {
    /// (key, asc, ascq) of fixed or descriptor sense.
    pub fn sense_code(&self) -> (u8, u8, u8) {
        let s = &self.sense;
        match s.first().map(|b| b & 0x7F) {
            Some(0x70) => (s[2] & 0xF, s[12], s[13]),
            Some(0x72) => (s[1] & 0xF, s[2], s[3]),
            _ => (0, 0, 0),
        }
    }

    pub fn good(&self) -> bool {
        self.status == status::GOOD
    }

    #[track_caller]
    pub fn assert_good(&self) -> &Self {
        assert_eq!(self.status, status::GOOD, "expected GOOD, got {self:?} sense {:x?}", self.sense_code());
        self
    }

    #[track_caller]
    pub fn assert_check(&self, key: u8, asc: u8, ascq: u8) {
        assert_eq!(self.status, status::CHECK_CONDITION, "{self:?}");
        assert_eq!(self.sense_code(), (key, asc, ascq), "sense {:x?}", self.sense);
    }
}

pub fn nexus(initiator: &str, isid: u64) -> Nexus {
    Nexus {
        initiator_port: format!("{initiator},i,0x{isid:012x}").into(),
        target_port: format!("{TARGET},t,0x0001").into(),
        relative_target_port: 1,
    }
}

pub struct Rig {
    pub m: ManualSet,
    pub lun: Arc<Lun>,
    pub channels: Vec<(LunChannel, Rc<Collector>)>,
    next_tag: std::cell::Cell<u32>,
}

pub fn malloc_props(name: &str, block_size: u32, blocks: u64) -> BdevProps {
    BdevProps::new(name, "Malloc disk", block_size, blocks, None)
}

impl Rig {
    /// A LUN over a malloc bdev of `blocks` 512-byte blocks, one channel.
    pub fn malloc(blocks: u64) -> Rig {
        Rig::with_bdev(|| {
            let m = Arc::new(MallocBdev::new(malloc_props("Malloc0", 512, blocks)).unwrap());
            Registry::get().register(m).unwrap()
        })
    }

    /// A LUN over the bdev `make` registers (run on reactor 0), one channel.
    pub fn with_bdev(make: impl FnOnce() -> BdevHandle) -> Rig {
        let m = ReactorSet::manual(1);
        let lun = m.on(0, || Lun::new(0, make(), TARGET));
        let mut rig = Rig { m, lun, channels: Vec::new(), next_tag: std::cell::Cell::new(1) };
        rig.open_channel();
        rig
    }

    /// Opens one more channel (index returned) on reactor 0.
    pub fn open_channel(&mut self) -> usize {
        let got = Rc::new(Collector::default());
        let ch = self.m.on(0, || LunChannel::open(&self.lun, got.clone()).unwrap());
        self.channels.push((ch, got));
        self.channels.len() - 1
    }

    pub fn tag(&self) -> u32 {
        let t = self.next_tag.get();
        self.next_tag.set(t + 1);
        t
    }

    /// Builds a command (Data-Out copied into a DMA buffer).
    pub fn command(&self, cdb: &[u8], n: &Nexus, expected_len: u32, data_out: Option<&[u8]>) -> ScsiCommand {
        let mut full = [0u8; 16];
        full[..cdb.len()].copy_from_slice(cdb);
        let data_out = data_out.map(|d| {
            self.m.on(0, || {
                let b = DmaBuf::alloc(d.len().max(1)).unwrap().slice(0, d.len());
                b.copy_from(0, d);
                b
            })
        });
        ScsiCommand {
            tag: self.tag(),
            cdb: full,
            cdb_len: cdb.len() as u8,
            nexus: n.clone(),
            attr: TaskAttr::Simple,
            expected_len,
            read: data_out.is_none() && expected_len > 0,
            write: data_out.is_some(),
            data_out,
            received_at: None,
        }
    }

    /// Submits on channel `ch` without waiting; returns the tag.
    pub fn submit(&self, ch: usize, cmd: ScsiCommand) -> u32 {
        let tag = cmd.tag;
        let (c, got) = &self.channels[ch];
        self.m.on(0, || c.execute(cmd));
        assert!(got.0.borrow().iter().all(|c| c.tag != tag), "an answer arrived inside execute");
        tag
    }

    /// Steps the reactors until channel `ch` answered `tag`.
    pub fn wait(&self, ch: usize, tag: u32) -> Reply {
        for _ in 0..100_000 {
            if let Some(c) = self.channels[ch].1.take(tag) {
                return reply(c);
            }
            self.m.run_once(0);
            self.m.advance_ns(1_000);
        }
        panic!("command {tag} never answered");
    }

    /// Runs one command on channel `ch` to its answer.
    pub fn run_on(&self, ch: usize, cdb: &[u8], n: &Nexus, expected_len: u32, data_out: Option<&[u8]>) -> Reply {
        let cmd = self.command(cdb, n, expected_len, data_out);
        let tag = self.submit(ch, cmd);
        self.wait(ch, tag)
    }

    pub fn run(&self, cdb: &[u8], n: &Nexus, expected_len: u32, data_out: Option<&[u8]>) -> Reply {
        self.run_on(0, cdb, n, expected_len, data_out)
    }

    /// TEST UNIT READY until the nexus's unit attentions are consumed.
    pub fn clear_ua(&self, n: &Nexus) {
        for _ in 0..8 {
            if self.run(&[0; 6], n, 0, None).good() {
                return;
            }
        }
        panic!("unit attentions never cleared");
    }

    pub fn read10(&self, n: &Nexus, lba: u32, blocks: u16) -> Reply {
        let bs = self.lun.bdev().props().block_size;
        self.run(&rw10(0x28, lba, blocks, 0), n, u32::from(blocks) * bs, None)
    }

    pub fn write10(&self, n: &Nexus, lba: u32, data: &[u8], byte1: u8) -> Reply {
        let bs = self.lun.bdev().props().block_size as usize;
        self.run(&rw10(0x2A, lba, (data.len() / bs) as u16, byte1), n, data.len() as u32, Some(data))
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Let queued completions run before the channels go.
        self.m.run_until_idle(100);
        let chans = std::mem::take(&mut self.channels);
        self.m.on(0, || drop(chans));
    }
}

pub fn reply(c: ScsiCompletion) -> Reply {
    let data = match &c.data_in {
        Some(b) => b.with(|x| x[..c.data_in_len as usize].to_vec()),
        None => {
            assert_eq!(c.data_in_len, 0, "data_in_len without a buffer");
            Vec::new()
        }
    };
    Reply { status: c.status, sense: c.sense.as_slice().to_vec(), data, residual: c.residual }
}

pub fn rw10(opcode: u8, lba: u32, blocks: u16, byte1: u8) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = opcode;
    c[1] = byte1;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

pub fn rw16(opcode: u8, lba: u64, blocks: u32, byte1: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = opcode;
    c[1] = byte1;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// `blocks` blocks of `bs` bytes, each stamped with `seed` and its index.
pub fn pattern(seed: u8, bs: usize, blocks: usize) -> Vec<u8> {
    (0..bs * blocks).map(|i| seed.wrapping_mul(31).wrapping_add((i / bs) as u8).wrapping_add((i % 251) as u8)).collect()
}

/// A 512-byte-block malloc "Base0" of `blocks` under an error bdev
/// "EE_Base0" that the LUN serves, so a test can hold an IO at the bdev
/// ([`hold_next`], [`release`]) and read the media behind it ([`raw`]).
pub fn rig_over_error_bdev(blocks: u64) -> (Rig, Arc<MallocBdev>, Nexus) {
    let mut keep = None;
    let mut rig = Rig::with_bdev(|| {
        let m = Arc::new(MallocBdev::new(malloc_props("Base0", 512, blocks)).unwrap());
        keep = Some(m.clone());
        Registry::get().register(m).unwrap();
        bdev::error::create(bdev::error::ErrorCreateParams { base_name: "Base0".into(), uuid: None }).unwrap()
    });
    rig.open_channel();
    let n = nexus("iqn.1994-05.com.example:a", 1);
    rig.clear_ua(&n);
    (rig, keep.unwrap(), n)
}

/// The next IO of `io_type` at "EE_Base0" stays pending until [`release`].
pub fn hold_next(rig: &Rig, io_type: &str) {
    rig.m.on(0, || {
        bdev::error::inject(bdev::error::ErrorInjectParams {
            name: "EE_Base0".into(),
            io_type: io_type.into(),
            error_type: "pending".into(),
            num: Some(1),
            queue_depth: None,
            corrupt_offset: None,
            corrupt_value: None,
            nvme_sct: None,
            nvme_sc: None,
        })
        .unwrap()
    });
}

pub fn release(rig: &Rig) {
    rig.m.on(0, || bdev::error::resume_pending(bdev::error::ErrorResumeParams { name: "EE_Base0".into() }).unwrap());
}

/// `blocks` 512-byte blocks of the malloc's memory from `lba`.
pub fn raw(m: &MallocBdev, lba: u64, blocks: usize) -> Vec<u8> {
    let mut v = vec![0u8; blocks * 512];
    assert!(m.read_raw(lba as usize * 512, &mut v));
    v
}
