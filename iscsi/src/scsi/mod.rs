//! The SCSI device server: one logical unit per bdev, serving SBC-4 / SPC-5
//! commands. It knows nothing of iSCSI: a transport hands it a command with
//! all its Data-Out gathered, and gets back status, sense and Data-In.
//!
//! Shape (the contract the iSCSI transport codes against):
//! - [`Lun`] (`Send + Sync`, shared by every session): the bdev, the
//!   identity (device identification VPD), reservations and pending unit
//!   attentions per I_T nexus.
//! - [`LunChannel`] (`!Send`, one per connection and LUN, on the
//!   connection's reactor): executes commands; results come back through
//!   the [`ScsiDone`] given at open, always later (never inside `execute`).
//! - [`execute_without_lun`]: REPORT LUNS, and the answers for a LUN that
//!   does not exist.

use bdev::DmaBuf;
use std::sync::Arc;

mod block;
pub mod cdb;
mod channel;
mod inquiry;
mod lun;
mod mode;
mod nolun;
mod reservations;
pub mod sense;

pub use channel::{LunChannel, QUEUE_DEPTH};
pub use lun::Lun;
pub use nolun::execute_without_lun;

/// SAM status codes.
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const ACA_ACTIVE: u8 = 0x30;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// An I_T nexus (SAM-5): who sends a command, through which target port.
/// Reservations and unit attentions are kept per nexus.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// iSCSI initiator port name: `<InitiatorName>,i,0x<ISID as 12 hex digits>`.
    pub initiator_port: Arc<str>,
    /// iSCSI target port name: `<TargetName>,t,0x<TPGT as 4 hex digits>`.
    pub target_port: Arc<str>,
    /// Relative target port identifier (the portal group tag).
    pub relative_target_port: u16,
}

/// SAM task attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskAttr {
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

/// One SCSI command, with all the Data-Out the transport collected.
pub struct ScsiCommand {
    /// The transport's task tag (iSCSI Initiator Task Tag), echoed back.
    pub tag: u32,
    pub cdb: [u8; 16],
    pub cdb_len: u8,
    pub nexus: Nexus,
    pub attr: TaskAttr,
    /// The initiator's Expected Data Transfer Length (bytes, either direction).
    pub expected_len: u32,
    /// Read (Data-In) and write (Data-Out) direction bits as the initiator set them.
    pub read: bool,
    pub write: bool,
    /// Data-Out received, `len()` = bytes received (at most `expected_len`
    /// and at most [`Lun::data_out_len`]); None for commands without Data-Out.
    pub data_out: Option<DmaBuf>,
    /// [`Lun::abort_generation`] when the transport received the command
    /// (before it gathered the Data-Out): a reset or CLEAR TASK SET by
    /// another nexus since then covers it, and it ends TASK ABORTED without
    /// running. None: only announcements after it reaches the LUN count.
    pub received_at: Option<u64>,
}

/// Residual count relative to `expected_len` (RFC 7143 11.4.5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Residual {
    #[default]
    None,
    /// Fewer bytes than expected were transferred.
    Under(u32),
    /// The command wanted more bytes than expected.
    Over(u32),
}

/// Sense data, inline so a completion allocates nothing.
#[derive(Clone, Copy)]
pub struct Sense {
    pub bytes: [u8; 96],
    pub len: u8,
}

impl Sense {
    pub const EMPTY: Sense = Sense { bytes: [0; 96], len: 0 };

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// The outcome of one command.
pub struct ScsiCompletion {
    pub tag: u32,
    pub status: u8,
    /// Empty unless CHECK CONDITION.
    pub sense: Sense,
    /// Data-In; the first `data_in_len` bytes are valid (already clipped to
    /// `expected_len` and the CDB's allocation length).
    pub data_in: Option<DmaBuf>,
    pub data_in_len: u32,
    pub residual: Residual,
    /// The command's Data-Out buffer, handed back for reuse.
    pub data_out: Option<DmaBuf>,
}

/// Receives completed commands on the channel's reactor.
pub trait ScsiDone {
    fn scsi_done(&self, completion: ScsiCompletion);
}
