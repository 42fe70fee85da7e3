//! A reactor's IO queue to one remote controller, the engine behind its
//! namespace bdevs: bdev IOs larger than the controller takes in one command
//! (MDTS, the 16-bit NLB) are split into pieces that each carry the IO's
//! flags; no more commands are outstanding than the negotiated queue size
//! less one ([`HostQpair::queue_depth`]); IOs that find no free command wait
//! in FIFO order and are sent as commands complete. A bdev IO completes once
//! every piece did; the first failed piece gives its status.
//!
//! The connection under the queue can go and come back (reconnect): while
//! the controller reconnects, the queue holds no connection, IOs wait, and
//! IOs whose commands the lost connection never answered are sent again,
//! whole, on the next one. Whether waiting IOs fail instead is the
//! controller's decision ([`Queue::fail_waiting`]).
//!
//! The table of IOs is sized when the queue is created: the IO path
//! allocates nothing. Beyond [`MAX_QUEUED_IOS`] an IO fails with `NoMemory`
//! (a retryable status), as the delay bdev does past its table.

use super::qpair::{HostQpair, SubmitError};
use super::status_io_error;
use bdev::{BdevIo, DmaBuf, IoBox, IoError, IoStatus, IoType};
use nvme_spec::Status;
use std::collections::VecDeque;

/// Bdev IOs one queue holds at once, sent or waiting for a command slot.
pub const MAX_QUEUED_IOS: usize = 4096;

/// Blocks one Read, Write or Write Zeroes carries at most (NLB is 16 bits,
/// 0's based).
const MAX_NLB: u64 = 65_536;

/// A bdev IO held while its pieces run.
struct Parent {
    io: IoBox,
    nsid: u32,
    block_size: u32,
    /// Blocks per piece at most.
    max_blocks: u64,
    /// The bdev's MDTS in blocks as submitted (0: none), for a resubmit.
    max_io_blocks: u32,
    /// A piece ended with an ANA status: once none is outstanding the IO
    /// leaves this queue for another path (`Queue::take_rerouted`).
    ana: Option<Status>,
    /// Blocks sent so far, relative to the IO start (commands, for flush).
    next_rel: u64,
    total: u64,
    /// Pieces sent and not completed.
    outstanding: u32,
    error: Option<IoError>,
    /// In `pending`: pieces are left to send and nothing failed yet.
    in_pending: bool,
    /// A piece went down with a lost connection: once none is outstanding
    /// the IO is sent again from its start.
    resend: bool,
}

/// What one [`Queue::poll`] did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Polled {
    /// Commands completed, and pieces sent or IOs finished.
    pub progressed: bool,
    /// Completions for which no IO waited (a queue pair bug).
    pub impossible: u64,
    /// The connection failed in this call (it is dropped).
    pub failed_now: bool,
}

/// An IO taken out of a queue to be sent on another path: its command
/// ended with an ANA status (`status`), or it waited on a path without a
/// connection (`status` None).
pub(crate) struct Rerouted {
    pub io: IoBox,
    pub nsid: u32,
    pub block_size: u32,
    pub max_io_blocks: u32,
    pub status: Option<Status>,
    /// The path's ANA state was set from `status` already.
    pub marked: bool,
    /// Since when (reactor ns) no path could take it.
    pub waiting_since: Option<u64>,
}

/// Whether `s` says the namespace is not reachable through this path now
/// (Asymmetric Access Persistent Loss, Inaccessible or Transition): the
/// IO may succeed through another one.
pub(crate) fn is_ana_status(s: Status) -> bool {
    s == Status::ANA_PERSISTENT_LOSS || s == Status::ANA_INACCESSIBLE || s == Status::ANA_TRANSITION
}

/// What becomes of an IO whose command a lost connection never answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnLoss {
    /// It waits for the next connection (the controller reconnects).
    Resend,
    /// It fails with `NoDevice` (the controller does not reconnect).
    Fail,
}

pub(crate) struct Queue {
    /// None while the controller is without a connection for this reactor.
    qp: Option<HostQpair>,
    ios: Ios,
    /// The controller's connection epoch this queue follows.
    pub(crate) epoch: u64,
    /// The controller's `failing` as this queue last applied it.
    pub(crate) failing_seen: bool,
    /// Rerouted IOs that no path could take are tried again from this
    /// reactor time (ns) on.
    pub(crate) reroute_at_ns: u64,
}

/// The IOs a queue holds: a fixed slab and the FIFO of those with pieces
/// left to send.
struct Ios {
    parents: Vec<Option<Parent>>,
    free: Vec<u32>,
    /// IOs with pieces left to send, oldest first (slot indices).
    pending: VecDeque<u32>,
    /// New and waiting IOs fail with `NoDevice` (set by the controller).
    failing: bool,
    /// IOs that go to another path (bounded by the slab: each left a slot).
    rerouted: VecDeque<Rerouted>,
}

impl Queue {
    pub(crate) fn new(qp: Option<HostQpair>, epoch: u64) -> Self {
        Queue {
            qp,
            epoch,
            failing_seen: false,
            reroute_at_ns: 0,
            ios: Ios {
                parents: (0..MAX_QUEUED_IOS).map(|_| None).collect(),
                free: (0..MAX_QUEUED_IOS as u32).rev().collect(),
                pending: VecDeque::with_capacity(MAX_QUEUED_IOS),
                failing: false,
                rerouted: VecDeque::with_capacity(MAX_QUEUED_IOS),
            },
        }
    }

    /// Reaps completed commands, completes the IOs they finish, then sends
    /// what waits. A connection that failed is dropped here; what its lost
    /// commands' IOs become is `on_loss`.
    pub(crate) fn poll(&mut self, on_loss: OnLoss) -> Polled {
        let mut out = Polled::default();
        let Queue { qp, ios, .. } = self;
        let Some(q) = qp.as_mut() else { return out };
        let r = q.poll(|c| {
            let known = if c.connection_lost && on_loss == OnLoss::Resend {
                ios.piece_lost(c.tag)
            } else if is_ana_status(c.status) {
                ios.piece_ana(c.tag, c.status)
            } else {
                let err = (!c.status.is_success()).then(|| status_io_error(c.status));
                ios.piece_done(c.tag, err)
            };
            if !known {
                out.impossible += 1;
            }
        });
        out.progressed = matches!(r, Ok(n) if n > 0);
        if q.is_failed() && q.outstanding() == 0 {
            // Every command of the connection is answered (lost ones
            // included): nothing refers to it any more.
            *qp = None;
            out.failed_now = true;
            if on_loss == OnLoss::Fail {
                ios.fail_waiting();
            }
        }
        out.progressed |= self.issue();
        out
    }

    /// Gives up this reactor's connection (the controller reconnects): the
    /// IOs of its unanswered commands are sent again on the next one.
    pub(crate) fn drop_connection(&mut self) {
        if let Some(q) = self.qp.as_mut() {
            q.disconnect();
        }
        self.poll(OnLoss::Resend);
    }

    /// A new connection (of controller epoch `epoch`) for this reactor:
    /// waiting IOs go out on it.
    pub(crate) fn set_connection(&mut self, qp: HostQpair, epoch: u64) {
        self.drop_connection();
        self.qp = Some(qp);
        self.epoch = epoch;
        self.issue();
    }

    pub(crate) fn has_connection(&self) -> bool {
        self.qp.is_some()
    }

    /// New IOs, and those waiting for a connection, fail with `NoDevice`
    /// (`failing`), or wait again.
    pub(crate) fn set_failing(&mut self, failing: bool) {
        self.ios.failing = failing;
        if failing {
            self.ios.fail_waiting_unsent();
        }
    }

    /// Takes `io` for namespace `nsid` (completes it exactly once, later).
    /// `max_io_blocks` is the controller's MDTS in blocks (0: no limit).
    pub(crate) fn submit(&mut self, io: IoBox, nsid: u32, block_size: u32, max_io_blocks: u32) {
        self.ios.submit(io, nsid, block_size, max_io_blocks);
        self.issue();
    }

    /// Sends pieces of waiting IOs, oldest first, while command slots are
    /// free. Returns whether it sent (or finished) anything.
    fn issue(&mut self) -> bool {
        match self.qp.as_mut() {
            Some(qp) if !qp.is_failed() => self.ios.issue(qp),
            _ => false,
        }
    }

    /// Bdev IOs held (sent, waiting, or waiting to go to another path).
    pub(crate) fn held(&self) -> usize {
        MAX_QUEUED_IOS - self.ios.free.len() + self.ios.rerouted.len()
    }

    /// Bdev IOs on this path's wire or waiting for its command slots.
    pub(crate) fn in_flight(&self) -> usize {
        MAX_QUEUED_IOS - self.ios.free.len()
    }

    /// An IO that is to go to another path, oldest first.
    pub(crate) fn take_rerouted(&mut self) -> Option<Rerouted> {
        self.ios.rerouted.pop_front()
    }

    /// Puts back an IO no path can take yet (it is tried again first).
    pub(crate) fn keep_rerouted(&mut self, r: Rerouted) {
        self.ios.rerouted.push_front(r);
    }

    /// Moves the IOs of which nothing was sent (they wait for this path's
    /// connection) to the rerouted list, for another path to take.
    pub(crate) fn reroute_unsent(&mut self) {
        let Ios { parents, pending, free, rerouted, .. } = &mut self.ios;
        pending.retain(|&slot| {
            let movable = parents[slot as usize].as_ref().is_some_and(|p| p.outstanding == 0 && p.next_rel == 0);
            if !movable {
                return true;
            }
            if let Some(p) = parents[slot as usize].take() {
                free.push(slot);
                rerouted.push_back(Rerouted {
                    io: p.io,
                    nsid: p.nsid,
                    block_size: p.block_size,
                    max_io_blocks: p.max_io_blocks,
                    status: None,
                    marked: false,
                    waiting_since: None,
                });
            }
            false
        });
    }

    /// IOs waiting to be sent on this path (none sent yet or some).
    pub(crate) fn waiting(&self) -> usize {
        self.ios.pending.len()
    }

    /// See [`Ios::abort`].
    pub(crate) fn abort(&mut self, nsid: u32, matches: &dyn Fn(&BdevIo) -> bool) -> bool {
        self.ios.abort(nsid, matches)
    }
}

impl Ios {
    fn submit(&mut self, io: IoBox, nsid: u32, block_size: u32, max_io_blocks: u32) {
        if self.failing {
            return io.fail(IoError::NoDevice);
        }
        let (total, max_blocks) = match io.io_type {
            IoType::Flush => (1, 1),
            IoType::Reset => return io.fail(IoError::NotSupported),
            IoType::Read | IoType::Write => {
                let mdts = if max_io_blocks == 0 { MAX_NLB } else { u64::from(max_io_blocks) };
                (io.num_blocks, mdts.clamp(1, MAX_NLB))
            }
            IoType::WriteZeroes => (io.num_blocks, MAX_NLB),
            // One DSM range holds a 32-bit block count.
            IoType::Unmap => (io.num_blocks, u64::from(u32::MAX)),
        };
        if total == 0 {
            return io.complete(IoStatus::Success);
        }
        if io.io_type.has_data() {
            let need = io.num_blocks.saturating_mul(u64::from(block_size));
            if io.buf.as_ref().is_none_or(|b| (b.len() as u64) < need) {
                return io.fail(IoError::OutOfRange);
            }
        }
        let Some(slot) = self.free.pop() else {
            return io.fail(IoError::NoMemory);
        };
        self.parents[slot as usize] = Some(Parent {
            io,
            nsid,
            block_size,
            max_blocks,
            next_rel: 0,
            total,
            outstanding: 0,
            error: None,
            in_pending: true,
            resend: false,
            max_io_blocks,
            ana: None,
        });
        self.pending.push_back(slot);
    }

    fn issue(&mut self, qp: &mut HostQpair) -> bool {
        let mut progressed = false;
        while let Some(&slot) = self.pending.front() {
            if qp.outstanding() >= qp.queue_depth() {
                break;
            }
            let Some(p) = self.parents[slot as usize].as_mut() else {
                // A pending slot always holds its IO until it leaves pending.
                debug_assert!(false, "pending IO slot {slot} is empty");
                self.pending.pop_front();
                continue;
            };
            let blocks = (p.total - p.next_rel).min(p.max_blocks);
            match send_piece(qp, p, slot, blocks) {
                Ok(()) => {
                    p.next_rel += blocks;
                    p.outstanding += 1;
                    if p.next_rel >= p.total {
                        p.in_pending = false;
                        self.pending.pop_front();
                    }
                }
                // Only when the queue is full, which was checked above.
                Err(None) => break,
                Err(Some(e)) => {
                    p.error.get_or_insert(e);
                    p.in_pending = false;
                    self.pending.pop_front();
                    self.complete_if_done(slot);
                }
            }
            progressed = true;
        }
        progressed
    }

    /// A piece of the IO in `tag`'s slot finished (`error` None on
    /// success). False when no IO waits for it.
    fn piece_done(&mut self, tag: u64, error: Option<IoError>) -> bool {
        let Ok(slot) = usize::try_from(tag) else { return false };
        let Some(p) = self.parents.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        if p.outstanding == 0 {
            return false;
        }
        p.outstanding -= 1;
        if let Some(e) = error {
            // The first error wins; pieces not sent yet are not sent.
            p.error.get_or_insert(e);
            if p.in_pending {
                p.in_pending = false;
                self.pending.retain(|&s| s as usize != slot);
            }
        }
        self.settle(slot as u32);
        true
    }

    /// A piece of the IO in `tag`'s slot ended with ANA status `status`: no
    /// more of it is sent here, and once none is outstanding it goes to
    /// another path. False when no IO waits for it.
    fn piece_ana(&mut self, tag: u64, status: Status) -> bool {
        let Ok(slot) = usize::try_from(tag) else { return false };
        let Some(p) = self.parents.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        if p.outstanding == 0 {
            return false;
        }
        p.outstanding -= 1;
        p.ana.get_or_insert(status);
        if p.in_pending {
            p.in_pending = false;
            self.pending.retain(|&s| s as usize != slot);
        }
        self.settle(slot as u32);
        true
    }

    /// A piece of the IO in `tag`'s slot went down with its connection: the
    /// IO waits to be sent again whole (ahead of IOs not sent yet). False
    /// when no IO waits for it.
    fn piece_lost(&mut self, tag: u64) -> bool {
        let Ok(slot) = usize::try_from(tag) else { return false };
        let Some(p) = self.parents.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        if p.outstanding == 0 {
            return false;
        }
        p.outstanding -= 1;
        p.resend = true;
        self.settle(slot as u32);
        true
    }

    /// After a piece's answer: an IO with a lost piece and none outstanding
    /// goes back to the front of the queue, whole (pieces that completed
    /// before the loss are sent again too: the same data to the same
    /// blocks); one whose pieces are all answered completes.
    fn settle(&mut self, slot: u32) {
        if let Some(p) = self.parents[slot as usize].as_mut() {
            if p.outstanding == 0 && p.resend {
                p.resend = false;
                if p.error.is_none() {
                    p.next_rel = 0;
                    if !p.in_pending {
                        p.in_pending = true;
                        self.pending.push_front(slot);
                    }
                    return;
                }
            }
        }
        self.complete_if_done(slot);
    }

    fn complete_if_done(&mut self, slot: u32) {
        let done = self.parents[slot as usize].as_ref().is_some_and(|p| p.outstanding == 0 && !p.in_pending);
        if !done {
            return;
        }
        if let Some(p) = self.parents[slot as usize].take() {
            self.free.push(slot);
            if let (Some(status), None) = (p.ana, &p.error) {
                // Sent again whole on another path (pieces that succeeded
                // here write the same data to the same blocks again).
                let Parent { io, nsid, block_size, max_io_blocks, .. } = p;
                let status = Some(status);
                return self.rerouted.push_back(Rerouted {
                    io,
                    nsid,
                    block_size,
                    max_io_blocks,
                    status,
                    marked: false,
                    waiting_since: None,
                });
            }
            p.io.complete(match p.error {
                None => IoStatus::Success,
                Some(e) => IoStatus::Failed(e),
            });
        }
    }

    /// The connection failed for good: IOs not sent yet fail now, and so do
    /// IOs that arrive later.
    fn fail_waiting(&mut self) {
        self.failing = true;
        self.fail_waiting_unsent();
    }

    /// IOs waiting to be sent fail with `NoDevice` (those with pieces on
    /// the wire fail as their commands complete).
    fn fail_waiting_unsent(&mut self) {
        while let Some(slot) = self.pending.pop_front() {
            if let Some(p) = self.parents[slot as usize].as_mut() {
                p.error.get_or_insert(IoError::NoDevice);
                p.in_pending = false;
            }
            self.complete_if_done(slot);
        }
    }

    /// Completes with `Aborted` the oldest IO of `nsid` that `matches` and
    /// of which nothing was sent yet.
    fn abort(&mut self, nsid: u32, matches: &dyn Fn(&BdevIo) -> bool) -> bool {
        let found = self.pending.iter().position(|&s| {
            self.parents[s as usize].as_ref().is_some_and(|p| p.nsid == nsid && p.next_rel == 0 && matches(&p.io))
        });
        let Some(i) = found else { return false };
        let Some(slot) = self.pending.remove(i) else { return false };
        if let Some(p) = self.parents[slot as usize].as_mut() {
            p.error = Some(IoError::Aborted);
            p.in_pending = false;
        }
        self.complete_if_done(slot);
        true
    }
}

/// Sends the piece of `p` that starts at `p.next_rel` and spans `blocks`.
/// Err(None): no command slot free; Err(Some(e)): the IO fails with `e`.
fn send_piece(qp: &mut HostQpair, p: &Parent, slot: u32, blocks: u64) -> Result<(), Option<IoError>> {
    let tag = u64::from(slot);
    let io = &p.io;
    let slba = io.offset_blocks + p.next_rel;
    // At most u32::MAX by construction (`max_blocks`).
    let nlb = u32::try_from(blocks).map_err(|_| Some(IoError::OutOfRange))?;
    let bs = p.block_size as usize;
    let data = || -> Result<DmaBuf, Option<IoError>> {
        let buf = io.buf.as_ref().ok_or(Some(IoError::OutOfRange))?;
        Ok(buf.slice(p.next_rel as usize * bs, blocks as usize * bs))
    };
    // Every piece carries the IO's flags: FUA travels in each command's
    // CDW12, so each piece is durable before the IO completes.
    let r = match io.io_type {
        IoType::Read => qp.read_with(p.nsid, slba, nlb, data()?, tag, io.flags),
        IoType::Write => qp.write_with(p.nsid, slba, nlb, data()?, tag, io.flags),
        IoType::WriteZeroes => qp.write_zeroes_with(p.nsid, slba, nlb, tag, io.flags),
        IoType::Flush => qp.flush(p.nsid, tag),
        // The range list comes from the reactor's DMA pool (no heap
        // allocation once the pool holds buffers of its size class).
        IoType::Unmap => match DmaBuf::alloc(16) {
            Some(b) => qp.deallocate(p.nsid, &[(slba, nlb)], b, tag),
            None => return Err(Some(IoError::NoMemory)),
        },
        IoType::Reset => return Err(Some(IoError::NotSupported)),
    };
    r.map_err(|e| match e {
        SubmitError::Full => None,
        SubmitError::Failed => Some(IoError::NoDevice),
        SubmitError::BadBuffer => Some(IoError::OutOfRange),
    })
}
