//! The logical unit shared by every session: its bdev and identity, mode
//! parameters, pending unit attentions per I_T nexus, reservations, and the
//! COMPARE AND WRITE exclusion that ordinary writes respect.
//!
//! IO on the hot path reads only atomics here: `ua_generation` (a channel
//! that saw no unit attention for its nexus at this generation skips the
//! lock), `reserved` (no reservation of either kind: no check), and
//! `caw_active` (no COMPARE AND WRITE in progress: writes go straight on).

use super::reservations::Reservations;
use super::sense::Check;
use super::Nexus;
use bdev::{BdevEvent, BdevHandle, ListenerId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Unit attentions one nexus may have queued; older ones beyond this are
/// dropped (SPC-5 allows reporting only the most recent).
const MAX_PENDING_UA: usize = 4;

/// What the LUN knows about one I_T nexus.
#[derive(Default)]
pub(crate) struct NexusState {
    /// Unit attentions not yet reported, oldest first.
    pub(crate) pending_ua: Vec<Check>,
}

/// What one channel publishes to the rest of the LUN (each counter has one
/// writer, the channel): writes issued and finished (COMPARE AND WRITE
/// waits for writes that began before it), and the abort announcements it
/// has carried out (a LUN RESET answers once every channel has).
#[derive(Default)]
pub(crate) struct WriteCounters {
    pub(crate) started: AtomicU64,
    pub(crate) finished: AtomicU64,
    /// The LUN's `abort_generation` up to which every task this channel
    /// aborted on an announcement has ended.
    pub(crate) aborts_settled: AtomicU64,
    /// The LUN's `abort_generation` up to which the channel's transport has
    /// had the responses sent for those tasks acknowledged by the initiator
    /// (iSCSI: the ExpStatSN of the connection; RFC 7143 4.2.3.3), written
    /// by the transport through [`LunChannel::responses_acknowledged`].
    ///
    /// [`LunChannel::responses_acknowledged`]: super::LunChannel::responses_acknowledged
    pub(crate) responses_acked: AtomicU64,
}

/// Whose tasks an abort announcement ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AbortOf {
    /// One nexus's (PREEMPT AND ABORT).
    Nexus(Nexus),
    /// Every nexus's but the one that asked (LOGICAL UNIT RESET, TARGET
    /// RESET): the asker's own tasks are ended by its transport.
    AllBut(Nexus),
}

impl AbortOf {
    pub(crate) fn covers(&self, n: &Nexus) -> bool {
        match self {
            AbortOf::Nexus(v) => v == n,
            AbortOf::AllBut(asker) => asker != n,
        }
    }
}

/// Control-path state of the LUN, under its mutex.
#[derive(Default)]
pub(crate) struct LunState {
    pub(crate) nexuses: HashMap<Nexus, NexusState>,
    pub(crate) res: Reservations,
    /// Block ranges (first, count) of COMPARE AND WRITEs in progress.
    pub(crate) caw_ranges: Vec<(u64, u64)>,
    pub(crate) channels: Vec<Weak<WriteCounters>>,
    /// Abort announcements (PREEMPT AND ABORT, LUN RESET), with the value
    /// of `abort_generation` that announced each (the newest few).
    pub(crate) aborts: Vec<(u64, AbortOf)>,
}

/// A logical unit over a bdev. `Send + Sync`; shared by every session.
pub struct Lun {
    id: u64,
    bdev: BdevHandle,
    pub(crate) target_name: Arc<str>,
    pub(crate) block_size: u32,
    /// Tells the LUN when its bdev changes size (dropped with the LUN).
    resize_listener: ListenerId,
    /// Largest bdev IO in blocks (0: no limit): larger commands are split.
    pub(crate) max_io_blocks: u32,
    /// The bdev has a volatile write cache.
    pub(crate) has_write_cache: bool,
    /// Caching mode page WCE. Clear on a cached bdev: every write gets FUA.
    pub(crate) wce: AtomicBool,
    /// Control mode page D_SENSE: descriptor-format sense data.
    pub(crate) d_sense: AtomicBool,
    /// Stopped by START STOP UNIT: media access is NOT READY until started.
    pub(crate) stopped: AtomicBool,
    /// Bumped whenever a unit attention is queued for any nexus.
    pub(crate) ua_generation: AtomicU64,
    /// Any reservation (RESERVE(6) or persistent) is held.
    pub(crate) reserved: AtomicBool,
    /// COMPARE AND WRITEs that hold a range.
    pub(crate) caw_active: AtomicU32,
    /// Bumped by PREEMPT AND ABORT and by resets: every channel then aborts
    /// the tasks the announcement covers (checked at each command, each
    /// completion and each poll of the channel).
    pub(crate) abort_generation: AtomicU64,
    state: Mutex<LunState>,
}

impl Lun {
    /// `id`: the LUN number; `target_name`: the iSCSI target node name
    /// (for device identification VPD 83h); creates no channel.
    pub fn new(id: u64, bdev: BdevHandle, target_name: &str) -> Arc<Lun> {
        let (block_size, max_io_blocks) = (bdev.props().block_size, bdev.props().max_io_blocks);
        let has_write_cache = bdev.bdev().has_write_cache();
        Arc::new_cyclic(|me: &Weak<Lun>| {
            let me = me.clone();
            let resize_listener = bdev.on_event(move |ev| {
                if let (BdevEvent::Resize { old_blocks, new_blocks }, Some(lun)) = (ev, me.upgrade()) {
                    lun.capacity_changed(old_blocks, new_blocks);
                }
            });
            Lun {
                id,
                block_size,
                resize_listener,
                max_io_blocks,
                has_write_cache,
                wce: AtomicBool::new(has_write_cache),
                d_sense: AtomicBool::new(false),
                stopped: AtomicBool::new(false),
                ua_generation: AtomicU64::new(0),
                reserved: AtomicBool::new(false),
                caw_active: AtomicU32::new(0),
                abort_generation: AtomicU64::new(0),
                target_name: target_name.into(),
                bdev,
                state: Mutex::new(LunState::default()),
            }
        })
    }

    /// The capacity in blocks: the bdev's, which can change while the LUN
    /// is exported (a resized namespace or file, a grown RAID1).
    pub fn num_blocks(&self) -> u64 {
        self.bdev.num_blocks()
    }

    /// The bdev changed size: every nexus learns it at its next command
    /// (SBC-4: unit attention 2Ah/09h CAPACITY DATA HAS CHANGED), as READ
    /// CAPACITY already answers the new size.
    fn capacity_changed(&self, old_blocks: u64, new_blocks: u64) {
        tracing::info!(lun = self.id, bdev = self.bdev.name(), old_blocks, new_blocks, "LUN capacity changed");
        let mut st = self.state();
        self.ua_for_others(&mut st, None, Check::CAPACITY_DATA_HAS_CHANGED);
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn bdev(&self) -> &BdevHandle {
        &self.bdev
    }

    /// Bytes of Data-Out this CDB transfers (WRITE*, COMPARE AND WRITE,
    /// UNMAP/MODE SELECT/PERSISTENT RESERVE OUT parameter lists, ...), 0 if none.
    pub fn data_out_len(&self, cdb: &[u8]) -> u32 {
        let mut full = [0u8; 16];
        let n = cdb.len().min(16);
        full[..n].copy_from_slice(&cdb[..n]);
        super::cdb::data_out_len(&full, self.block_size)
    }

    /// The nexus is gone (session closed or lost): SPC's rules
    /// (RESERVE(6) reservation released; PR registrations persist).
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let mut st = self.state();
        if st.res.legacy.as_ref() == Some(nexus) {
            st.res.legacy = None;
        }
        // A later session with the same initiator port starts afresh: its
        // first command reports the loss of the earlier nexus.
        st.nexuses.remove(nexus);
        self.reserved.store(st.res.any_held(), Ordering::Release);
        self.ua_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A LUN RESET or TARGET WARM RESET by `by` (SAM-5 6.3.3): the tasks of
    /// every other nexus are aborted (each channel ends them with TASK
    /// ABORTED: the control mode page's TAS is one), a unit attention
    /// (29h/03h BUS DEVICE RESET FUNCTION OCCURRED) is queued for every
    /// other nexus, RESERVE(6) is released. `by`'s own tasks are its
    /// transport's to end. Returns the abort generation to pass to
    /// [`Lun::aborts_settled`].
    pub fn reset(&self, by: &Nexus) -> u64 {
        let mut st = self.state();
        let gen = self.announce_abort(&mut st, AbortOf::AllBut(by.clone()));
        st.res.legacy = None;
        for (n, s) in st.nexuses.iter_mut() {
            if n != by {
                push_ua(s, Check::BUS_DEVICE_RESET);
            }
        }
        // Mode parameters return to their defaults at a reset.
        self.wce.store(self.has_write_cache, Ordering::Release);
        self.d_sense.store(false, Ordering::Release);
        self.reserved.store(st.res.any_held(), Ordering::Release);
        self.ua_generation.fetch_add(1, Ordering::AcqRel);
        gen
    }

    /// A CLEAR TASK SET by `by` (SAM-5 7.4): the task set is shared by every
    /// nexus (the control mode page's TST is 000b), so the tasks of every
    /// other nexus are aborted as by a reset, and each of those nexuses gets
    /// a unit attention (2Fh/00h COMMANDS CLEARED BY ANOTHER INITIATOR); no
    /// other state changes. Returns the abort generation, as [`Lun::reset`].
    pub fn clear_task_set(&self, by: &Nexus) -> u64 {
        let mut st = self.state();
        let gen = self.announce_abort(&mut st, AbortOf::AllBut(by.clone()));
        self.ua_for_others(&mut st, Some(by), Check::COMMANDS_CLEARED_BY_ANOTHER_INITIATOR);
        gen
    }

    /// The count of abort announcements so far (see
    /// [`ScsiCommand::received_at`](super::ScsiCommand::received_at)).
    pub fn abort_generation(&self) -> u64 {
        self.abort_generation.load(Ordering::Acquire)
    }

    /// Whether an abort announcement after generation `since` covers `n`.
    pub(crate) fn aborted_since(&self, since: u64, n: &Nexus) -> bool {
        if self.abort_generation.load(Ordering::Acquire) == since {
            return false;
        }
        self.state().aborts.iter().any(|(g, a)| *g > since && a.covers(n))
    }

    /// Whether every channel of the LUN has ended the tasks that the abort
    /// announcement `gen` (and every earlier one) covered.
    pub fn aborts_settled(&self, gen: u64) -> bool {
        let st = self.state();
        st.channels.iter().filter_map(|w| w.upgrade()).all(|c| c.aborts_settled.load(Ordering::Acquire) >= gen)
    }

    /// Whether, beyond [`Lun::aborts_settled`], every channel's transport
    /// has had the responses to the tasks that announcement `gen` (and every
    /// earlier one) aborted acknowledged, or has closed.
    pub fn aborts_acknowledged(&self, gen: u64) -> bool {
        let st = self.state();
        st.channels.iter().filter_map(|w| w.upgrade()).all(|c| {
            c.aborts_settled.load(Ordering::Acquire) >= gen && c.responses_acked.load(Ordering::Acquire) >= gen
        })
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, LunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether writes must carry FUA: a cached bdev with WCE cleared.
    pub(crate) fn force_fua(&self) -> bool {
        self.has_write_cache && !self.wce.load(Ordering::Acquire)
    }

    pub(crate) fn descriptor_sense(&self) -> bool {
        self.d_sense.load(Ordering::Acquire)
    }

    /// Queues `ua` for every known nexus except `except` (if any).
    pub(crate) fn ua_for_others(&self, st: &mut LunState, except: Option<&Nexus>, ua: Check) {
        for (n, s) in st.nexuses.iter_mut() {
            if Some(n) != except {
                push_ua(s, ua);
            }
        }
        self.ua_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Queues `ua` for one nexus.
    pub(crate) fn ua_for(&self, st: &mut LunState, nexus: &Nexus, ua: Check) {
        if let Some(s) = st.nexuses.get_mut(nexus) {
            push_ua(s, ua);
        }
        self.ua_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes the oldest pending unit attention of `nexus`, registering the
    /// nexus (with a power-on unit attention) on its first command.
    /// Returns (attention, whether more are pending).
    pub(crate) fn take_ua(&self, nexus: &Nexus, consume: bool) -> (Option<Check>, bool) {
        let mut st = self.state();
        let s =
            st.nexuses.entry(nexus.clone()).or_insert_with(|| NexusState { pending_ua: vec![Check::POWER_ON_RESET] });
        if s.pending_ua.is_empty() {
            return (None, false);
        }
        let ua = if consume { s.pending_ua.remove(0) } else { s.pending_ua[0] };
        (Some(ua), !s.pending_ua.is_empty())
    }

    /// Registers a channel's write counters (COMPARE AND WRITE waits on them).
    pub(crate) fn add_channel(&self, c: &Arc<WriteCounters>) {
        let mut st = self.state();
        st.channels.retain(|w| w.strong_count() > 0);
        st.channels.push(Arc::downgrade(c));
    }
}

/// Abort announcements remembered for channels that have not looked yet.
const MAX_ABORTS: usize = 64;

impl Lun {
    /// Announces that `victims`' tasks are to be aborted (PREEMPT AND ABORT).
    pub(crate) fn abort_tasks_of(&self, st: &mut LunState, victims: &[Nexus]) {
        let gen = self.abort_generation.load(Ordering::Acquire) + 1;
        for v in victims {
            push_abort(st, gen, AbortOf::Nexus(v.clone()));
        }
        self.abort_generation.store(gen, Ordering::Release);
    }

    /// Announces one abort to every channel; returns its generation.
    fn announce_abort(&self, st: &mut LunState, what: AbortOf) -> u64 {
        let gen = self.abort_generation.load(Ordering::Acquire) + 1;
        push_abort(st, gen, what);
        self.abort_generation.store(gen, Ordering::Release);
        gen
    }
}

fn push_abort(st: &mut LunState, gen: u64, what: AbortOf) {
    if st.aborts.len() >= MAX_ABORTS {
        st.aborts.remove(0);
    }
    st.aborts.push((gen, what));
}

fn push_ua(s: &mut NexusState, ua: Check) {
    if s.pending_ua.contains(&ua) {
        return;
    }
    if s.pending_ua.len() >= MAX_PENDING_UA {
        s.pending_ua.remove(0);
    }
    s.pending_ua.push(ua);
}

impl Drop for Lun {
    fn drop(&mut self) {
        self.bdev.drop_listener(self.resize_listener);
    }
}
