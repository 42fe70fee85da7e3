//! A reactor's IO queue to one remote controller, the engine behind its
//! namespace bdevs: bdev IOs larger than the controller takes in one command
//! (MDTS, the 16-bit NLB) are split into pieces that each carry the IO's
//! flags; no more commands are outstanding than the negotiated queue size
//! less one ([`HostQpair::queue_depth`]); IOs that find no free command wait
//! in FIFO order and are sent as commands complete. A bdev IO completes once
//! every piece did; the first failed piece gives its status.
//!
//! The table of IOs is sized when the queue is created: the IO path
//! allocates nothing. Beyond [`MAX_QUEUED_IOS`] an IO fails with `NoMemory`
//! (a retryable status), as the delay bdev does past its table.

use super::qpair::{HostQpair, SubmitError};
use super::status_io_error;
use bdev::{BdevIo, DmaBuf, IoBox, IoError, IoStatus, IoType};
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
    /// Blocks sent so far, relative to the IO start (commands, for flush).
    next_rel: u64,
    total: u64,
    /// Pieces sent and not completed.
    outstanding: u32,
    error: Option<IoError>,
    /// In `pending`: pieces are left to send and nothing failed yet.
    in_pending: bool,
}

/// What one [`Queue::poll`] did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Polled {
    /// Commands completed, and pieces sent or IOs finished.
    pub progressed: bool,
    /// Completions for which no IO waited (a queue pair bug).
    pub impossible: u64,
    /// The queue pair failed in this call.
    pub failed_now: bool,
}

pub(crate) struct Queue {
    qp: HostQpair,
    ios: Ios,
}

/// The IOs a queue holds: a fixed slab and the FIFO of those with pieces
/// left to send.
struct Ios {
    parents: Vec<Option<Parent>>,
    free: Vec<u32>,
    /// IOs with pieces left to send, oldest first (slot indices).
    pending: VecDeque<u32>,
    /// The queue pair failed: every IO fails with `NoDevice`.
    dead: bool,
}

impl Queue {
    pub(crate) fn new(qp: HostQpair) -> Self {
        Queue {
            qp,
            ios: Ios {
                parents: (0..MAX_QUEUED_IOS).map(|_| None).collect(),
                free: (0..MAX_QUEUED_IOS as u32).rev().collect(),
                pending: VecDeque::with_capacity(MAX_QUEUED_IOS),
                dead: false,
            },
        }
    }

    /// Reaps completed commands, completes the IOs they finish, then sends
    /// what waits.
    pub(crate) fn poll(&mut self) -> Polled {
        let mut out = Polled::default();
        let Queue { qp, ios } = self;
        let r = qp.poll(|c| {
            let err = (!c.status.is_success()).then(|| status_io_error(c.status));
            if !ios.piece_done(c.tag, err) {
                out.impossible += 1;
            }
        });
        out.progressed = matches!(r, Ok(n) if n > 0);
        if r.is_err() && !ios.dead {
            out.failed_now = true;
            ios.fail_waiting();
        }
        out.progressed |= self.issue();
        out
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
        self.ios.issue(&mut self.qp)
    }

    /// Bdev IOs held (sent or waiting).
    pub(crate) fn held(&self) -> usize {
        MAX_QUEUED_IOS - self.ios.free.len()
    }

    /// See [`Ios::abort`].
    pub(crate) fn abort(&mut self, nsid: u32, matches: &dyn Fn(&BdevIo) -> bool) -> bool {
        self.ios.abort(nsid, matches)
    }
}

impl Ios {
    fn submit(&mut self, io: IoBox, nsid: u32, block_size: u32, max_io_blocks: u32) {
        if self.dead {
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
        });
        self.pending.push_back(slot);
    }

    fn issue(&mut self, qp: &mut HostQpair) -> bool {
        let mut progressed = false;
        while let Some(&slot) = self.pending.front() {
            if self.dead || qp.outstanding() >= qp.queue_depth() {
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
        self.complete_if_done(slot as u32);
        true
    }

    fn complete_if_done(&mut self, slot: u32) {
        let done = self.parents[slot as usize].as_ref().is_some_and(|p| p.outstanding == 0 && !p.in_pending);
        if !done {
            return;
        }
        if let Some(p) = self.parents[slot as usize].take() {
            self.free.push(slot);
            p.io.complete(match p.error {
                None => IoStatus::Success,
                Some(e) => IoStatus::Failed(e),
            });
        }
    }

    /// The queue pair failed: IOs not sent yet fail now, sent ones as the
    /// queue pair reports their commands failed.
    fn fail_waiting(&mut self) {
        self.dead = true;
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
