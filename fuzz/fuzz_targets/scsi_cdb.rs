//! Fuzz target for the SCSI device server's CDB decoding: commands of every
//! opcode (and of random ones), with random fields, expected lengths,
//! direction bits and Data-Out, run against a small LUN over a malloc bdev
//! on a manual reactor, as the iSCSI transport hands them over. Each must
//! be answered exactly once, never inside `execute`, with a valid status,
//! sense data exactly when CHECK CONDITION, Data-In within the expected
//! length and the CDB's allocation length, and a residual that adds up. The
//! CDB helpers (`cdb::block_range`, `data_out_len`, `data_in_len`) must
//! agree with each other on every CDB.
//!
//! Input: a sequence of commands, each 20 bytes (an opcode selector, 15
//! CDB bytes, the expected length as two bytes, a flags byte picking the
//! nexus, task attribute and direction bits, a Data-Out fill byte). A
//! selector below 0xC0 picks a served opcode, so most commands are real.
//! The LUN is created afresh for each input (reservations, unit attentions
//! and the stopped state do not leak between inputs); the bdev is shared.
#![no_main]

use bdev::malloc::MallocBdev;
use bdev::{BdevHandle, BdevProps, DmaBuf, Registry};
use iscsi::scsi::cdb::{block_range, data_in_len, data_out_len};
use iscsi::scsi::{status, Lun, LunChannel, Nexus, Residual, ScsiCommand, ScsiCompletion, ScsiDone, TaskAttr};
use libfuzzer_sys::fuzz_target;
use reactor::{ManualSet, ReactorSet};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

const OPCODES: &[u8] = &[
    0x00, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x16, 0x17, 0x1A, 0x1B, 0x1E, 0x25, 0x28, 0x2A, 0x2E, 0x2F, 0x34, 0x35, 0x37,
    0x41, 0x42, 0x55, 0x5A, 0x5E, 0x5F, 0x88, 0x89, 0x8A, 0x8B, 0x8E, 0x8F, 0x90, 0x91, 0x93, 0x9C, 0x9E, 0xA0, 0xA3,
    0xA8, 0xAA, 0xAE, 0xAF, 0xB7,
];
const BLOCK_SIZE: u32 = 512;
const BLOCKS: u64 = 64;
const TARGET: &str = "iqn.2016-06.io.nvraid:fuzz";
const CMD_LEN: usize = 20;
/// Commands per input: more than the channel's queue depth is not needed
/// to reach the decoding.
const MAX_CMDS: usize = 24;

#[derive(Default)]
struct Collector(RefCell<Vec<ScsiCompletion>>);

impl ScsiDone for Collector {
    fn scsi_done(&self, c: ScsiCompletion) {
        self.0.borrow_mut().push(c);
    }
}

struct Rig {
    m: ManualSet,
    bdev: BdevHandle,
}

thread_local! {
    static RIG: Rig = {
        let m = ReactorSet::manual(1);
        let bdev = m.on(0, || {
            let props = BdevProps::new("Malloc0", "Malloc disk", BLOCK_SIZE, BLOCKS, None);
            let b = Arc::new(MallocBdev::new(props).expect("malloc bdev"));
            Registry::get().register(b).expect("register")
        });
        Rig { m, bdev }
    };
}

fn nexus(i: u8) -> Nexus {
    Nexus {
        initiator_port: format!("iqn.1994-05.com.example:{i},i,0x00023d000001").into(),
        target_port: format!("{TARGET},t,0x0001").into(),
        relative_target_port: 1,
    }
}

/// The CDB helpers on their own: what a CDB transfers is consistent.
fn check_helpers(cdb: &[u8; 16]) {
    let out = data_out_len(cdb, BLOCK_SIZE);
    let din = data_in_len(cdb, BLOCK_SIZE);
    if let Some((_, n, _)) = block_range(cdb) {
        let bytes = n * u64::from(BLOCK_SIZE);
        let reads = matches!(cdb[0], 0x08 | 0x28 | 0xA8 | 0x88);
        if reads {
            assert_eq!(din, Some(bytes), "read Data-In length");
            assert_eq!(out, 0, "a read carries Data-Out");
        }
        if matches!(cdb[0], 0x0A | 0x2A | 0xAA | 0x8A | 0x2E | 0xAE | 0x8E | 0x8B | 0x9C) {
            assert_eq!(u64::from(out), bytes.min(u64::from(u32::MAX)), "write Data-Out length");
        }
    }
}

fuzz_target!(|input: &[u8]| {
    RIG.with(|rig| run(rig, input));
});

fn run(rig: &Rig, input: &[u8]) {
    let m = &rig.m;
    let lun = m.on(0, || Lun::new(0, rig.bdev.clone(), TARGET));
    let got = Rc::new(Collector::default());
    let ch = m.on(0, || LunChannel::open(&lun, got.clone()).expect("channel"));
    let mut asked = Vec::new();
    for (i, c) in input.chunks_exact(CMD_LEN).take(MAX_CMDS).enumerate() {
        let mut cdb = [0u8; 16];
        cdb[0] = if c[0] < 0xC0 { OPCODES[usize::from(c[0]) % OPCODES.len()] } else { c[1] };
        cdb[1..].copy_from_slice(&c[1..16]);
        check_helpers(&cdb);
        let expected_len = u32::from(u16::from_be_bytes([c[16], c[17]])) << (c[18] >> 6);
        let flags = c[18];
        let (read, write) = (flags & 0x01 != 0, flags & 0x02 != 0);
        let attr = match (flags >> 2) & 3 {
            0 => TaskAttr::Simple,
            1 => TaskAttr::Ordered,
            2 => TaskAttr::HeadOfQueue,
            _ => TaskAttr::Aca,
        };
        let cdb_len = iscsi::scsi::cdb::cdb_len_of(cdb[0]).unwrap_or(16) as u8;
        // What the transport gathers: up to what the CDB uses and the
        // initiator said it sends, only for a write (as in tgt/task.rs).
        let want = lun.data_out_len(&cdb).min(expected_len) as usize;
        let data_out = (write && expected_len > 0 && want <= DmaBuf::MAX_LEN).then(|| {
            m.on(0, || {
                let b = DmaBuf::alloc(want.max(1)).expect("DMA buffer").slice(0, want);
                b.with_mut(|d| d.fill(c[19]));
                b
            })
        });
        let tag = i as u32 + 1;
        let cmd = ScsiCommand {
            tag,
            cdb,
            cdb_len,
            nexus: nexus(flags >> 4 & 1),
            attr,
            expected_len,
            read,
            write,
            data_out,
            received_at: None,
        };
        m.on(0, || ch.execute(cmd));
        assert!(got.0.borrow().iter().all(|d| d.tag != tag), "an answer arrived inside execute");
        asked.push((tag, cdb, expected_len));
    }
    let mut answered = Vec::new();
    for _ in 0..10_000 {
        answered.append(&mut got.0.borrow_mut());
        if answered.len() >= asked.len() {
            break;
        }
        m.run_once(0);
        m.advance_ns(1_000);
    }
    m.run_until_idle(100);
    answered.append(&mut got.0.borrow_mut());
    assert_eq!(answered.len(), asked.len(), "commands answered {} times for {}", answered.len(), asked.len());
    for (tag, cdb, expected_len) in &asked {
        let c = answered.iter().find(|c| c.tag == *tag).unwrap_or_else(|| panic!("command {tag} never answered"));
        assert!(
            matches!(
                c.status,
                status::GOOD
                    | status::CHECK_CONDITION
                    | status::CONDITION_MET
                    | status::RESERVATION_CONFLICT
                    | status::TASK_SET_FULL
                    | status::BUSY
                    | status::ACA_ACTIVE
            ),
            "opcode {:#04x}: status {:#x}",
            cdb[0],
            c.status
        );
        assert_eq!(c.status == status::CHECK_CONDITION, c.sense.len > 0, "opcode {:#04x}: sense", cdb[0]);
        assert!(usize::from(c.sense.len) <= c.sense.bytes.len());
        assert!(c.data_in_len <= *expected_len, "opcode {:#04x}: Data-In past the expected length", cdb[0]);
        match &c.data_in {
            Some(b) => assert!(c.data_in_len as usize <= b.len(), "Data-In past its buffer"),
            None => assert_eq!(c.data_in_len, 0, "Data-In length without a buffer"),
        }
        if let Some(limit) = data_in_len(cdb, BLOCK_SIZE) {
            assert!(u64::from(c.data_in_len) <= limit, "opcode {:#04x}: Data-In past the allocation length", cdb[0]);
        }
        match c.residual {
            Residual::Under(u) => assert!(u <= *expected_len, "underflow past the expected length"),
            Residual::Over(o) => assert!(o > 0, "zero overflow residual"),
            Residual::None => {}
        }
    }
    assert_eq!(ch.in_flight(), 0, "commands left in flight");
    drop(answered);
    m.on(0, || drop(ch));
    m.run_until_idle(100);
    m.on(0, || drop(lun));
}
