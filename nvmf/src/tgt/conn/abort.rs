//! The Abort admin command (opcode 08h), as SPDK's TCP transport does it:
//!
//! - a command waiting in the target for a data buffer is completed with
//!   Command Abort Requested at once;
//! - a command whose data is still arriving (in-capsule or H2CData after an
//!   R2T) is completed so once the data is in, instead of running; the
//!   Abort waits for that up to `abort_timeout_sec`;
//! - a command at its bdev is aborted there if a layer still holds it
//!   (`Channel::abort`: a range lock, a bitmap batch, a delay queue);
//! - a parked Asynchronous Event Request is completed aborted.
//!
//! Otherwise the Abort answers "not aborted" (CQE DW0 bit 0 set). The
//! command may live on another reactor: the admin queue sends the request
//! there and parks the Abort until the answer comes back.

use super::{lookup, Conn, ReqState, MAX_ABORTS};
use nvme_spec::{Sqe, Status};

/// Where the answer to an Abort goes: the admin queue's parked command.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AbortReply {
    reactor: usize,
    conn_key: u64,
    slot: u16,
    gen: u32,
}

/// An Abort waiting for a command's data to arrive.
pub(crate) struct AbortWait {
    slot: u16,
    gen: u32,
    deadline_ns: u64,
    pub(super) reply: AbortReply,
}

/// CQE DW0 of an Abort: bit 0 clear when the command was aborted.
fn abort_dw0(aborted: bool) -> u32 {
    u32::from(!aborted)
}

/// Sends `aborted` to the admin queue that asked.
pub(super) fn send_answer(reply: AbortReply, aborted: bool) {
    reactor::send(reply.reactor, move || {
        // Gone when the admin queue closed meanwhile: nobody waits then.
        if let Some(c) = lookup(reply.conn_key) {
            c.borrow_mut().finish_abort(reply, aborted);
        }
    });
}

/// Runs on the reactor of the queue that holds the command.
fn deliver(conn_key: u64, cid: u16, reply: AbortReply) {
    let answer = match lookup(conn_key) {
        Some(c) => c.borrow_mut().abort_request(cid, Some(reply)),
        None => Some(false),
    };
    if let Some(aborted) = answer {
        send_answer(reply, aborted);
    }
}

impl Conn {
    /// The Abort command on this admin queue.
    pub(super) fn abort_cmd(&mut self, slot: usize, sqe: &Sqe) {
        let cdw10 = sqe.cdw10.get();
        let (sqid, cid) = ((cdw10 & 0xFFFF) as u16, (cdw10 >> 16) as u16);
        if self.aborts_parked >= MAX_ABORTS {
            return self.complete(slot, Status::ABORT_COMMAND_LIMIT_EXCEEDED, 0);
        }
        if sqid == 0 {
            // A command of this very queue (an AER): decided here and now.
            let aborted = self.abort_request_excluding(cid, None, slot).unwrap_or(false);
            return self.complete(slot, Status::SUCCESS, abort_dw0(aborted));
        }
        let Some(ctrl) = self.ctrl.clone() else {
            return self.complete(slot, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0);
        };
        let target = ctrl.queues().iter().find(|q| q.qid == sqid).map(|q| (q.reactor, q.conn_key));
        let Some((to, conn_key)) = target else {
            // No such queue: no such command to abort.
            return self.complete(slot, Status::SUCCESS, abort_dw0(false));
        };
        let Some(me) = reactor::current() else {
            return self.complete(slot, Status::SUCCESS, abort_dw0(false));
        };
        let reply = AbortReply { reactor: me, conn_key: self.key, slot: slot as u16, gen: self.reqs[slot].gen };
        self.reqs[slot].state = ReqState::Parked;
        self.aborts_parked += 1;
        reactor::send(to, move || deliver(conn_key, cid, reply));
    }

    /// The answer to an Abort this admin queue sent.
    fn finish_abort(&mut self, reply: AbortReply, aborted: bool) {
        let slot = usize::from(reply.slot);
        let Some(r) = self.reqs.get(slot) else {
            return self.state.impossible("Abort answer for a slot this queue does not have");
        };
        if r.gen != reply.gen || r.state != ReqState::Parked {
            // The queue was closed and the slot reused, or the Abort was
            // answered already: nothing waits for this answer.
            if !self.closing && r.gen == reply.gen {
                self.state.impossible("second answer to an Abort");
            }
            return;
        }
        self.aborts_parked = self.aborts_parked.saturating_sub(1);
        self.reqs[slot].state = ReqState::Exec;
        self.complete(slot, Status::SUCCESS, abort_dw0(aborted));
    }

    /// Tries to abort command `cid` of this queue. Some(answer) when decided
    /// now; None when an Abort waits for the command's data (`reply` then
    /// gets the answer later).
    fn abort_request(&mut self, cid: u16, reply: Option<AbortReply>) -> Option<bool> {
        self.abort_request_excluding(cid, reply, usize::MAX)
    }

    fn abort_request_excluding(&mut self, cid: u16, reply: Option<AbortReply>, skip: usize) -> Option<bool> {
        if self.closing {
            return Some(false);
        }
        let found = self
            .reqs
            .iter()
            .enumerate()
            .position(|(i, r)| i != skip && r.state != ReqState::Free && r.sqe.cid.get() == cid);
        // Not here (finished already, or never sent): not aborted.
        let Some(slot) = found else {
            return Some(false);
        };
        let gen = self.reqs[slot].gen;
        match self.reqs[slot].state {
            ReqState::AwaitBuf => {
                self.waiting_buf.retain(|&s| usize::from(s) != slot);
                self.reqs[slot].state = ReqState::Exec;
                self.complete(slot, Status::ABORT_REQUESTED, 0);
                Some(true)
            }
            ReqState::Parked if self.aers.contains(&slot) => {
                self.aers.retain(|&s| s != slot);
                self.reqs[slot].state = ReqState::Exec;
                self.complete(slot, Status::ABORT_REQUESTED, 0);
                Some(true)
            }
            ReqState::RecvCapsule | ReqState::AwaitH2C => {
                let reply = reply?;
                if self.reqs[slot].abort_requested || self.abort_waits.len() >= MAX_ABORTS {
                    return Some(false);
                }
                self.reqs[slot].abort_requested = true;
                let wait_ns = u64::from(self.opts.abort_timeout_sec) * 1_000_000_000;
                self.abort_waits.push(AbortWait {
                    slot: slot as u16,
                    gen,
                    deadline_ns: reactor::now_ns().saturating_add(wait_ns),
                    reply,
                });
                None
            }
            ReqState::Exec if self.qid.is_some_and(|q| q > 0) => {
                let nsid = self.reqs[slot].sqe.nsid.get();
                let Some(ns) = self.ns.iter().find(|n| n.nsid == nsid) else {
                    return Some(false);
                };
                let (tag, tag2) = (slot as u64, u64::from(gen));
                let matches = |io: &bdev::BdevIo| io.tag == tag && io.tag2 == tag2;
                let mut aborted = false;
                // A Dataset Management command has one IO per range.
                for _ in 0..self.reqs[slot].pending {
                    if !ns.ch.abort(&matches) {
                        break;
                    }
                    aborted = true;
                }
                if aborted {
                    self.reqs[slot].abort_requested = true;
                }
                Some(aborted)
            }
            _ => Some(false),
        }
    }

    /// A command an Abort waited for has been answered.
    pub(super) fn settle_abort_wait(&mut self, slot: usize, gen: u32, aborted: bool) {
        if let Some(i) = self.abort_waits.iter().position(|w| usize::from(w.slot) == slot && w.gen == gen) {
            let w = self.abort_waits.swap_remove(i);
            send_answer(w.reply, aborted);
        }
    }

    /// Aborts whose command's data did not arrive in time: "not aborted",
    /// and the command runs normally when its data is in.
    pub(super) fn expire_abort_waits(&mut self) {
        let now = reactor::now_ns();
        let mut i = 0;
        while i < self.abort_waits.len() {
            if self.abort_waits[i].deadline_ns > now {
                i += 1;
                continue;
            }
            let w = self.abort_waits.swap_remove(i);
            if let Some(r) = self.reqs.get_mut(usize::from(w.slot)).filter(|r| r.gen == w.gen) {
                r.abort_requested = false;
            }
            send_answer(w.reply, false);
        }
    }
}
