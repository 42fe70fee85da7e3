//! What only the owner reactor of an array does: it keeps the write
//! serialization table, coordinates suspend/resume, and runs fenced
//! operations (membership changes, failures, rebuild steps, delete) one at a
//! time while the array is suspended.
//!
//! Why one owner reactor rather than shared atomics: the range table is a
//! rich structure (FIFO waiters, overlap queries) that would need a lock or
//! a lock-free interval structure if shared. Owning it on one reactor keeps
//! it a plain single-threaded table; other reactors reach it with
//! allocation-free `send_raw` messages (acquire → grant, release), and IO
//! submitted on the owner itself calls it directly. The same reactor owns the
//! control state, so every array-wide change has a single writer.

use crate::array::ArrayShared;
use crate::channel::{channel_for, find_channel, on_grant_msg, ArrayChannel};
use crate::quiesce::{Coordinator, Drained, SuspendStep};
use crate::range_table::{words, RangeTable};
use crate::rebuild::Rebuild;
use bdev::{BdevError, IoError};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Table geometry: 128 KiB regions, 512 buckets (2 KiB of heads: small
/// enough to stay in cache under load), 1024 entries preallocated.
const REGION_BYTES: u64 = 128 * 1024;
const BUCKETS: usize = 4096;
const TABLE_CAPACITY: usize = 1024;

type Waiter = Box<dyn FnOnce(Result<(), BdevError>)>;
/// A change that runs while the array is suspended. It gets the fence (or
/// the reason the array cannot be suspended: it is gone) and ends the fence
/// by dropping it or calling [`Fence::done`].
pub(crate) type FencedOp = Box<dyn FnOnce(&Rc<ArrayChannel>, Result<Fence, BdevError>)>;

/// The owner's part of its `ArrayChannel`.
pub(crate) struct OwnerPart {
    pub table: RefCell<RangeTable>,
    coord: RefCell<Coordinator>,
    waiters: RefCell<Vec<Waiter>>,
    ops: RefCell<VecDeque<FencedOp>>,
    op_running: Cell<bool>,
    pub rebuild: RefCell<Option<Rc<Rebuild>>>,
    /// The delete operation's fence, held until teardown has finished so no
    /// other change runs on a dying array.
    pub teardown_fence: RefCell<Option<Fence>>,
    /// Superblock and bitmap, for an array with a superblock.
    pub meta: RefCell<Option<Rc<crate::meta::Meta>>>,
}

impl OwnerPart {
    pub(crate) fn new(shared: &ArrayShared) -> Self {
        let block_size = shared.control().block_size.max(512) as u64;
        OwnerPart {
            table: RefCell::new(RangeTable::new((REGION_BYTES / block_size).max(1), BUCKETS, TABLE_CAPACITY)),
            coord: RefCell::new(Coordinator::new(reactor::count())),
            waiters: RefCell::new(Vec::new()),
            ops: RefCell::new(VecDeque::new()),
            op_running: Cell::new(false),
            rebuild: RefCell::new(None),
            teardown_fence: RefCell::new(None),
            meta: RefCell::new(None),
        }
    }

    /// Ends a granted range and hands the grants it unblocked to their
    /// waiters: direct calls for the owner's own IO and the rebuild, a
    /// `send_raw` for other reactors.
    pub(crate) fn release(&self, channel: &ArrayChannel, entry: u32) {
        if !self.table.borrow_mut().release(entry) {
            tracing::error!(raid = %channel.shared.name, entry, "release of a range that is not granted");
            return channel.impossible("release of a range that is not granted");
        }
        loop {
            let next = self.table.borrow_mut().pop_ready();
            let Some((idx, waiter)) = next else { break };
            if waiter == words::REBUILD_WAITER {
                let rebuild = self.rebuild.borrow().clone();
                match rebuild {
                    Some(r) => r.on_granted(idx),
                    // The rebuild went away while queued: give the range back.
                    None => self.release(channel, idx),
                }
                continue;
            }
            let (reactor, slot) = words::decode_waiter(waiter);
            if reactor == channel.me {
                channel.granted(slot, idx);
            } else {
                let (a, b) = words::encode_grant(channel.shared.key, slot, idx);
                reactor::send_raw(reactor, on_grant_msg, a, b);
            }
        }
    }
}

/// A held suspension for one fenced operation. Dropping it runs the next
/// queued operation (still suspended) or resumes the array.
pub(crate) struct Fence {
    channel: Option<Rc<ArrayChannel>>,
}

impl Fence {
    pub(crate) fn done(mut self) {
        if let Some(channel) = self.channel.take() {
            end_op(&channel);
        }
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        if let Some(channel) = self.channel.take() {
            end_op(&channel);
        }
    }
}

fn owner_of(channel: &Rc<ArrayChannel>) -> &OwnerPart {
    channel.owner.as_ref().unwrap_or_else(|| unreachable!("fenced operations run on the owner"))
}

/// Queues `op` to run fenced (owner reactor only).
pub(crate) fn fenced(channel: &Rc<ArrayChannel>, op: FencedOp) {
    owner_of(channel).ops.borrow_mut().push_back(op);
    pump(channel);
}

fn pump(channel: &Rc<ArrayChannel>) {
    let owner = owner_of(channel);
    if owner.op_running.get() || owner.ops.borrow().is_empty() {
        return;
    }
    owner.op_running.set(true);
    let r2 = channel.clone();
    suspend_local(
        channel,
        Box::new(move |res| {
            let op = owner_of(&r2).ops.borrow_mut().pop_front();
            let Some(op) = op else {
                // Nothing to run after all: give the suspension back.
                owner_of(&r2).op_running.set(false);
                if res.is_ok() {
                    resume_local(&r2);
                }
                return;
            };
            match res {
                Ok(()) => op(&r2, Ok(Fence { channel: Some(r2.clone()) })),
                Err(e) => {
                    op(&r2, Err(e));
                    owner_of(&r2).op_running.set(false);
                    pump(&r2);
                }
            }
        }),
    );
}

fn end_op(channel: &Rc<ArrayChannel>) {
    let owner = owner_of(channel);
    if channel.shared.torn_down.load(Ordering::Acquire) {
        owner.op_running.set(false);
        return fail_pending(channel);
    }
    let next = owner.ops.borrow_mut().pop_front();
    match next {
        // Still suspended: run the next change under the same suspension.
        Some(op) => op(channel, Ok(Fence { channel: Some(channel.clone()) })),
        None => {
            owner.op_running.set(false);
            resume_local(channel);
        }
    }
}

/// Suspends the array (owner reactor only); `done` runs once no array IO is
/// in flight on any reactor, or with an error if the array is gone.
pub(crate) fn suspend_local(channel: &Rc<ArrayChannel>, done: Waiter) {
    if channel.shared.torn_down.load(Ordering::Acquire) {
        return done(Err(BdevError::NotFound(channel.shared.name.clone())));
    }
    let owner = owner_of(channel);
    let step = owner.coord.borrow_mut().suspend();
    match step {
        SuspendStep::Broadcast(epoch) => {
            owner.waiters.borrow_mut().push(done);
            for r in 0..reactor::count() {
                let shared = channel.shared.clone();
                reactor::send(r, move || on_suspend_msg(&shared, epoch));
            }
        }
        SuspendStep::Wait => owner.waiters.borrow_mut().push(done),
        SuspendStep::Ready => done(Ok(())),
    }
}

/// Ends one suspender's hold (owner reactor only).
pub(crate) fn resume_local(channel: &Rc<ArrayChannel>) {
    if channel.shared.torn_down.load(Ordering::Acquire) {
        return;
    }
    let epoch = owner_of(channel).coord.borrow_mut().resume();
    if let Some(epoch) = epoch {
        broadcast_resume(&channel.shared, epoch);
    }
}

fn broadcast_resume(shared: &Arc<ArrayShared>, epoch: u64) {
    for r in 0..reactor::count() {
        let shared = shared.clone();
        reactor::send(r, move || on_resume_msg(&shared, epoch));
    }
}

/// Any reactor: close this reactor's gate for `epoch`.
fn on_suspend_msg(shared: &Arc<ArrayShared>, epoch: u64) {
    // Creates this reactor's state if it had none, so that a channel created
    // later on this reactor starts closed too.
    let Some(channel) = channel_for(shared) else {
        // Torn down: answer anyway so the owner never waits on us.
        return send_drained(shared, epoch);
    };
    let ack = channel.gate.borrow_mut().on_suspend(epoch);
    if let Some(epoch) = ack {
        send_drained(shared, epoch);
    }
}

/// Any reactor: tell the owner this reactor drained for `epoch`.
pub(crate) fn send_drained(shared: &Arc<ArrayShared>, epoch: u64) {
    let key = shared.key;
    let name = shared.name.clone();
    reactor::send(shared.owner, move || {
        let Some(channel) = find_channel(key) else {
            tracing::debug!(raid = %name, "drain ack for an array that is gone");
            return;
        };
        let owner = owner_of(&channel);
        let step = owner.coord.borrow_mut().on_drained(epoch);
        match step {
            Drained::Pending => {}
            Drained::Resume(epoch) => broadcast_resume(&channel.shared, epoch),
            Drained::Suspended => {
                let waiters = std::mem::take(&mut *owner.waiters.borrow_mut());
                for w in waiters {
                    w(Ok(()));
                }
            }
        }
    });
}

/// Any reactor: open this reactor's gate and resubmit what it held, in order.
fn on_resume_msg(shared: &Arc<ArrayShared>, epoch: u64) {
    let Some(channel) = find_channel(shared.key) else {
        return;
    };
    channel.refresh();
    channel.gate.borrow_mut().on_resume(epoch);
    loop {
        let next = {
            let mut gate = channel.gate.borrow_mut();
            if gate.is_closed() {
                // A newer suspend already closed it again (cannot happen
                // within one message, but never resubmit into a closed gate).
                None
            } else {
                gate.pop_held()
            }
        };
        let Some(io) = next else { break };
        channel.submit(io);
    }
}

/// Any reactor: fail the IO this reactor holds (the array is being deleted).
pub(crate) fn fail_held(shared: &Arc<ArrayShared>) {
    if let Some(channel) = find_channel(shared.key) {
        fail_held_on(&channel);
    }
}

pub(crate) fn fail_held_on(channel: &ArrayChannel) {
    loop {
        let next = channel.gate.borrow_mut().pop_held();
        let Some(io) = next else { break };
        io.fail(IoError::NoDevice);
    }
}

/// Any reactor: a child IO error latched member `m` failed; the owner makes
/// it official under a fence.
pub(crate) fn member_failed(shared: &Arc<ArrayShared>, m: usize) {
    let key = shared.key;
    reactor::send(shared.owner, move || {
        let Some(channel) = find_channel(key) else { return };
        // With a superblock the failure is recorded on the surviving members
        // at once, outside any fence: writes that succeeded only on the
        // others wait for it before they complete (a restart must not take
        // the failed copy for a good one), and a fence would wait for them.
        crate::meta::record_failures(&channel);
        fenced(
            &channel,
            Box::new(move |channel, fence| {
                let Ok(fence) = fence else { return };
                crate::array::apply_member_failure(channel, m);
                // A resync that stopped for the failure goes on with the
                // copies that remain.
                let r2 = channel.clone();
                crate::array::commit(channel, fence, move |_| crate::rebuild::start_next(&r2));
            }),
        );
    });
}

/// Public suspend: from any reactor.
pub(crate) fn suspend_any(shared: &Arc<ArrayShared>, done: Box<dyn FnOnce(Result<(), BdevError>) + Send>) {
    let key = shared.key;
    let name = shared.name.clone();
    reactor::send(shared.owner, move || match find_channel(key) {
        Some(channel) => suspend_local(&channel, Box::new(done)),
        None => done(Err(BdevError::NotFound(name))),
    });
}

/// Public resume: from any reactor.
pub(crate) fn resume_any(shared: &Arc<ArrayShared>) {
    let key = shared.key;
    reactor::send(shared.owner, move || {
        if let Some(channel) = find_channel(key) {
            resume_local(&channel);
        }
    });
}

/// Runs `f` on the owner reactor with its state (None: the array is gone).
pub(crate) fn on_owner(shared: &Arc<ArrayShared>, f: impl FnOnce(Option<Rc<ArrayChannel>>) + Send + 'static) {
    let key = shared.key;
    reactor::send(shared.owner, move || f(find_channel(key)));
}

/// Runs `change` on the array's owner reactor inside a fence (held IO,
/// drained reactors): the shape of every reconfiguration. `change` gets the
/// state and the fence to finish, or why no fence could be had (the array is
/// gone or being torn down).
pub(crate) fn on_owner_fenced(
    shared: &Arc<ArrayShared>,
    change: impl FnOnce(Result<(&Rc<ArrayChannel>, Fence), BdevError>) + Send + 'static,
) {
    let name = shared.name.clone();
    on_owner(shared, move |channel| match channel {
        None => change(Err(BdevError::NotFound(format!("raid bdev {name}")))),
        Some(channel) => fenced(
            &channel,
            Box::new(move |channel, fence| match fence {
                Ok(fence) => change(Ok((channel, fence))),
                Err(e) => change(Err(e)),
            }),
        ),
    });
}

/// Fails every queued operation and suspend waiter (teardown finished).
pub(crate) fn fail_pending(channel: &Rc<ArrayChannel>) {
    let owner = owner_of(channel);
    let waiters = std::mem::take(&mut *owner.waiters.borrow_mut());
    for w in waiters {
        w(Err(BdevError::NotFound(channel.shared.name.clone())));
    }
    loop {
        let op = owner.ops.borrow_mut().pop_front();
        let Some(op) = op else { break };
        op(channel, Err(BdevError::NotFound(channel.shared.name.clone())));
    }
}
