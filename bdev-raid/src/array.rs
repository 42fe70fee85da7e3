//! The array: its shared state (`ArrayShared`), control-plane membership
//! (slots, roles, state) and every change to it — create, configuring →
//! online through the examiner, add/remove/fail a member, delete and
//! teardown — plus the `Bdev` the registry sees and the public handle.
//!
//! Threading: `ArrayShared` is reachable from every reactor. Its atomics
//! have documented writers (see the fields); the `control` mutex guards the
//! control state, which only the owner reactor writes (every change runs
//! there, most under a fence) and others only read (RPC listings, channel
//! refresh at resume). No IO path takes the mutex.

use crate::channel::{channel_for, drop_channel, find_channel, ArrayChannel};
use crate::level::{Level, LevelOp};
use crate::map::{Geometry, MAX_MEMBERS};
use crate::meta::{self, SbWrite};
use crate::owner::{self, Fence};
use crate::rebuild;
use bdev::{Bdev, BdevChannel, BdevError, BdevHandle, BdevProps, IoType, ListenerId, Registry};
use bitmap::Bitmap;
use reactor::ReactorId;
use serde_json::{json, Value};
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use uuid::Uuid;

/// SPDK's array states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaidState {
    /// Members missing; not registered as a bdev yet.
    Configuring,
    Online,
    /// Too few members left to serve every block.
    Offline,
}

impl RaidState {
    pub fn name(self) -> &'static str {
        match self {
            RaidState::Configuring => "configuring",
            RaidState::Online => "online",
            RaidState::Offline => "offline",
        }
    }
}

/// A member slot's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Named at create, not present yet (the array is configuring).
    Missing,
    Active,
    /// Receives writes, is being copied onto; not read, not counted as a copy.
    Rebuilding,
    /// An IO error took it out; still claimed until removed.
    Failed,
    /// Removed: free for `bdev_raid_add_base_bdev`.
    Empty,
}

#[derive(Clone)]
pub(crate) struct Slot {
    pub name: Option<String>,
    pub uuid: Option<Uuid>,
    pub handle: Option<BdevHandle>,
    pub role: Role,
    /// Where array data starts on the member (after the metadata area with
    /// a superblock, else 0).
    pub data_offset_blocks: u64,
    pub data_size_blocks: u64,
    /// The member UUID the superblock records for this slot (nil without a
    /// superblock). Kept when the slot empties, so that the same member
    /// coming back is recognised and resynced only where it missed writes.
    pub sb_uuid: Uuid,
    /// For a `Rebuilding` slot: the array ranges it must be copied (None: all).
    pub partial: Option<Arc<Vec<Range<u64>>>>,
    /// For a slot under a full rebuild of a level whose member blocks are
    /// array blocks (`RaidLevel::array_offset_is_member_offset`): member
    /// blocks below this are copied (recorded in the superblock, so a
    /// restart resumes there).
    pub recovered_blocks: u64,
}

impl Slot {
    pub(crate) fn empty() -> Slot {
        Slot {
            name: None,
            uuid: None,
            handle: None,
            role: Role::Empty,
            data_offset_blocks: 0,
            data_size_blocks: 0,
            sb_uuid: Uuid::nil(),
            partial: None,
            recovered_blocks: 0,
        }
    }

    /// A slot emptied of its member: the superblock's record and data area stay.
    fn vacated(&self) -> Slot {
        Slot {
            sb_uuid: self.sb_uuid,
            data_offset_blocks: self.data_offset_blocks,
            data_size_blocks: self.data_size_blocks,
            ..Slot::empty()
        }
    }
}

/// IO types other than read/write the array passes through (all members
/// must), and what its unmapped blocks read as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Caps {
    flush: bool,
    unmap: bool,
    write_zeroes: bool,
    reset: bool,
    /// Every level maps an unmap straight onto the members' blocks, so an
    /// unmapped array block reads as zeroes when every member's do.
    deallocated_reads_zeroes: bool,
}

impl Caps {
    fn of<'a>(members: impl Iterator<Item = &'a BdevHandle> + Clone) -> Caps {
        let all = |t| members.clone().all(|h| h.bdev().io_type_supported(t));
        let unmap = all(IoType::Unmap);
        Caps {
            flush: all(IoType::Flush),
            unmap,
            write_zeroes: all(IoType::WriteZeroes),
            reset: all(IoType::Reset),
            deallocated_reads_zeroes: unmap && members.clone().all(|h| h.props().deallocated_reads_zeroes),
        }
    }

    pub(crate) fn supports(&self, t: IoType) -> bool {
        match t {
            IoType::Read | IoType::Write => true,
            IoType::Flush => self.flush,
            IoType::Unmap => self.unmap,
            IoType::WriteZeroes => self.write_zeroes,
            IoType::Reset => self.reset,
        }
    }

    /// Whether a new member can serve what the array already advertises.
    fn satisfied_by(&self, h: &BdevHandle) -> bool {
        [IoType::Flush, IoType::Unmap, IoType::WriteZeroes, IoType::Reset]
            .into_iter()
            .all(|t| !self.supports(t) || h.bdev().io_type_supported(t))
            && (!self.deallocated_reads_zeroes || h.props().deallocated_reads_zeroes)
    }
}

/// Control state: written only on the owner reactor.
pub(crate) struct Control {
    pub slots: Vec<Slot>,
    pub state: RaidState,
    pub handle: Option<BdevHandle>,
    /// Slot being rebuilt, while a rebuild runs.
    pub process_target: Option<usize>,
    /// 0 until a member is known.
    pub block_size: u32,
    pub caps: Caps,
    /// What the registered bdev says of a volatile write cache (fixed at
    /// registration): any member had one then. A member with a cache that
    /// joins an array that said "none" gets every write with FUA instead.
    pub write_cache: bool,
    pub deleting: bool,
    /// The bitmap's shared half, for every reactor's write path.
    pub bitmap: Option<Arc<Bitmap>>,
    /// After an unclean shutdown: array ranges whose copies may differ,
    /// until the resync of them finished. Meanwhile reads go to the
    /// lowest-numbered active copy, so they do not flip between copies.
    pub dirty: Option<Arc<Vec<Range<u64>>>>,
    /// What the running process is ("rebuild", "resync", "check").
    pub process_kind: &'static str,
}

/// What every reactor can reach of an array.
pub(crate) struct ArrayShared {
    /// Unique within the reactor set, never reused: messages name arrays by it.
    pub key: u32,
    pub name: String,
    /// The reactor that created the array: it owns the control state, the
    /// serialization table and the rebuild.
    pub owner: ReactorId,
    pub level: Level,
    pub strip_size_kb: u32,
    pub uuid: Uuid,
    pub superblock: bool,
    /// Bit per slot: an IO error latched the member failed. Set (fetch_or)
    /// by whichever reactor sees the error first — a set-only latch, so
    /// racing setters agree — and cleared only by the owner inside a fence,
    /// when no IO is in flight, as the slot gets a new member.
    pub failed_mask: AtomicU32,
    /// Bit per slot: the member's failure is recorded in the superblock on
    /// the surviving members (set by the owner after that write; cleared
    /// with `failed_mask`). A write that succeeded only because a copy
    /// failed completes once its failed member's bit is here.
    pub recorded_mask: AtomicU32,
    /// Test-only switch for write serialization (see `RaidArray`).
    pub serialize: AtomicBool,
    /// Test-only switch: lock the level's widened range (raid5: whole
    /// stripes) rather than just the IO's blocks (see `RaidArray`).
    pub widen_lock: AtomicBool,
    /// Set by the owner when a delete starts: new IO fails at once.
    pub deleted: AtomicBool,
    /// Set by the owner when teardown has finished.
    pub torn_down: AtomicBool,
    /// Set when the array first goes online; replaced only by a grow,
    /// inside a fence (channels reload it at resume).
    pub geometry: GeometryCell,
    /// Resize listeners on the member bdevs (see `resize`), dropped as a
    /// member leaves.
    pub member_events: Mutex<Vec<(BdevHandle, ListenerId)>>,
    /// Rebuild progress in array blocks (owner writes, listings read).
    pub rebuild_blocks: AtomicU64,
    /// Every block's redundancy is known consistent: set by a check of the
    /// whole array that found nothing wrong or repaired all it found (and
    /// writes keep it so). A parity level then may update parity from its
    /// old value (read-modify-write) instead of recomputing it from the
    /// whole stripe. Never set on a new array: its members may hold anything.
    pub redundancy_verified: AtomicBool,
    /// Blocks the running process must cover.
    pub process_total: AtomicU64,
    /// Blocks written by rebuilds and resyncs since start (tests count them).
    pub copied_blocks: AtomicU64,
    /// Set by `bdev_raid_delete` with `clear_sb`.
    pub clear_sb: AtomicBool,
    /// Bitmap chunk size asked for at create (0: no bitmap).
    pub bitmap_chunk_kb: u32,
    /// Set once a scrub finished: its counts, for the listing.
    pub last_check: Mutex<Option<Value>>,
    /// Why the last start from superblocks failed (its members were
    /// released), for the listing; cleared when a start succeeds.
    pub start_error: Mutex<Option<String>>,
    /// States the IO path met that it believes impossible (a completion
    /// without its parent, a grant nobody waits for): must stay 0. Any
    /// reactor adds (Relaxed: a statistic); `impossible_events` in listings.
    pub impossible_events: AtomicU64,
    /// Superblocks found for an array assembling from them.
    pub found: Mutex<Vec<crate::assemble::FoundSuperblock>>,
    /// Assembled from superblocks found on bdevs (not created by RPC):
    /// only such an array takes in the superblocks examination finds.
    pub from_superblocks: bool,
    /// Set when an array assembling from superblocks starts (once).
    pub starting: AtomicBool,
    /// raid5's partial parity log (`crate::ppl`), set once when an array
    /// with one in its superblock starts.
    pub ppl: std::sync::OnceLock<Arc<crate::ppl::PplLog>>,
    /// Test- and benchmark-only switch: writes log nothing (`RaidArray`).
    pub ppl_off: AtomicBool,
    /// The degraded-start timer of an assembling array is armed.
    pub timer_armed: AtomicBool,
    control: Mutex<Control>,
}

/// The array's layout: none while configuring. Each grow appends a layout
/// and makes it current; earlier ones stay (a few hundred bytes each for
/// the levels that grow) so that a reference handed out stays valid
/// without a lock. Control path only: channels copy it at resume.
pub(crate) struct GeometryCell {
    layouts: [OnceLock<Arc<Geometry>>; MAX_LAYOUTS],
    current: AtomicUsize,
}

/// Layouts one array can have in one run: its first and `MAX_LAYOUTS - 1`
/// grows (a restart assembles from the superblock's, the first again).
pub(crate) const MAX_LAYOUTS: usize = 32;

impl Default for GeometryCell {
    fn default() -> Self {
        GeometryCell { layouts: std::array::from_fn(|_| OnceLock::new()), current: AtomicUsize::new(0) }
    }
}

impl GeometryCell {
    pub(crate) fn get(&self) -> Option<&Arc<Geometry>> {
        self.layouts[self.current.load(Ordering::Acquire)].get()
    }

    /// The first layout; refused if there is one.
    pub(crate) fn set(&self, g: Arc<Geometry>) -> Result<(), Arc<Geometry>> {
        if self.get().is_some() {
            return Err(g);
        }
        self.layouts[0].set(g)
    }

    /// A grown layout becomes current (owner reactor, inside a fence: the
    /// only writer). False when the array has grown as often as it can in
    /// this run.
    pub(crate) fn replace(&self, g: Arc<Geometry>) -> bool {
        let next = self.current.load(Ordering::Acquire) + 1;
        if next >= MAX_LAYOUTS || self.layouts[next].set(g).is_err() {
            return false;
        }
        self.current.store(next, Ordering::Release);
        true
    }
}

impl ArrayShared {
    pub(crate) fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn owner_tag(&self) -> String {
        format!("raid {}", self.name)
    }
}

/// `bdev_raid_set_options`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RaidOptions {
    pub process_window_size_kb: u32,
    /// 0: unlimited.
    pub process_max_bandwidth_mb_sec: u32,
    /// An array assembling from superblocks that could run without its
    /// missing members starts degraded after this long (md's last-resort
    /// start). Not SPDK's: written to save_config only when changed.
    #[serde(skip_serializing_if = "is_default_assemble_timeout")]
    pub assemble_timeout_sec: u32,
}

pub const DEFAULT_ASSEMBLE_TIMEOUT_SEC: u32 = 10;

fn is_default_assemble_timeout(v: &u32) -> bool {
    *v == DEFAULT_ASSEMBLE_TIMEOUT_SEC
}

impl Default for RaidOptions {
    fn default() -> Self {
        RaidOptions {
            process_window_size_kb: 1024,
            process_max_bandwidth_mb_sec: 0,
            assemble_timeout_sec: DEFAULT_ASSEMBLE_TIMEOUT_SEC,
        }
    }
}

/// The module's set-wide state: `reactor::global::<RaidModule>()`.
#[derive(Default)]
pub(crate) struct RaidModule {
    arrays: Mutex<Vec<Arc<ArrayShared>>>,
    next_key: AtomicU32,
    examiner_added: AtomicBool,
    options: Mutex<RaidOptions>,
    problems: Mutex<Vec<String>>,
}

impl RaidModule {
    pub(crate) fn get() -> Arc<RaidModule> {
        reactor::global::<RaidModule>()
    }

    fn arrays(&self) -> Vec<Arc<ArrayShared>> {
        self.arrays.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn find_uuid(&self, uuid: Uuid) -> Option<Arc<ArrayShared>> {
        self.arrays().into_iter().find(|a| a.uuid == uuid && !a.deleted.load(Ordering::Acquire))
    }

    /// Something an operator must hear about from examination or assembly:
    /// logged and kept for `problems()`.
    pub(crate) fn problem(&self, msg: String) {
        let mut p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        // Re-planning an assembly meets the same refusals again: say each once.
        if p.contains(&msg) {
            return;
        }
        tracing::error!("{msg}");
        if p.len() >= 256 {
            p.remove(0);
        }
        p.push(msg);
    }

    pub(crate) fn problems(&self) -> Vec<String> {
        self.problems.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn find(&self, name: &str) -> Option<Arc<ArrayShared>> {
        self.arrays().into_iter().find(|a| a.name == name || a.uuid.to_string() == name)
    }

    pub(crate) fn options(&self) -> RaidOptions {
        *self.options.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_options(&self, o: RaidOptions) {
        *self.options.lock().unwrap_or_else(|e| e.into_inner()) = o;
    }
}

// ---- the bdev --------------------------------------------------------------

/// The registered RAID bdev (product "Raid Volume").
pub(crate) struct RaidBdev {
    shared: Arc<ArrayShared>,
    props: BdevProps,
    caps: Caps,
}

impl Bdev for RaidBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn module(&self) -> &'static str {
        "raid"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        self.caps.supports(t)
    }
    fn create_channel(&self) -> Result<Rc<dyn BdevChannel>, BdevError> {
        crate::channel::create_channel(&self.shared)
    }
    fn driver_specific(&self) -> Option<(&'static str, Value)> {
        Some(("raid", info_json(&self.shared, false)))
    }
    fn config(&self) -> Option<Value> {
        // An array with a superblock assembles itself from its members'
        // superblocks: a create in the saved config would wipe them.
        (!self.shared.superblock).then(|| config_json(&self.shared))
    }
    fn destruct(&self, done: Box<dyn FnOnce() + Send>) {
        teardown(self.shared.clone(), done);
    }
}

/// The `bdev_raid_create` call that recreates the array.
fn config_json(shared: &ArrayShared) -> Value {
    let control = shared.control();
    let names: Vec<&str> = control.slots.iter().filter_map(|s| s.name.as_deref()).collect();
    let mut params = serde_json::Map::new();
    params.insert("name".into(), json!(shared.name));
    params.insert("uuid".into(), json!(shared.uuid.to_string()));
    if shared.strip_size_kb > 0 {
        params.insert("strip_size_kb".into(), json!(shared.strip_size_kb));
    }
    params.insert("raid_level".into(), json!(shared.level.name()));
    params.insert("base_bdevs".into(), json!(names));
    if shared.superblock {
        params.insert("superblock".into(), json!(true));
    }
    json!({"method": "bdev_raid_create", "params": params})
}

/// The array as `bdev_raid_get_bdevs` (with the name) and
/// `driver_specific.raid` (without) show it, in SPDK's field names.
pub(crate) fn info_json(shared: &ArrayShared, with_name: bool) -> Value {
    let control = shared.control();
    let mut o = serde_json::Map::new();
    if with_name {
        o.insert("name".into(), json!(shared.name));
    }
    o.insert("uuid".into(), json!(shared.uuid.to_string()));
    o.insert("strip_size_kb".into(), json!(shared.strip_size_kb));
    o.insert("state".into(), json!(control.state.name()));
    o.insert("raid_level".into(), json!(shared.level.name()));
    o.insert("superblock".into(), json!(shared.superblock));
    o.insert("num_base_bdevs".into(), json!(control.slots.len()));
    let discovered = control.slots.iter().filter(|s| matches!(s.role, Role::Active | Role::Rebuilding)).count();
    let operational =
        control.slots.iter().filter(|s| matches!(s.role, Role::Active | Role::Rebuilding | Role::Missing)).count();
    o.insert("num_base_bdevs_discovered".into(), json!(discovered));
    o.insert("num_base_bdevs_operational".into(), json!(operational));
    if let (Some(t), Some(geo)) = (control.process_target, shared.geometry.get()) {
        let total = match shared.process_total.load(Ordering::Relaxed) {
            0 => geo.array_blocks(),
            t => t,
        };
        let blocks = shared.rebuild_blocks.load(Ordering::Relaxed).min(total);
        let percent = (blocks as f64 * 100.0 / total.max(1) as f64) as u32;
        o.insert(
            "process".into(),
            json!({
                "type": control.process_kind,
                "target": control.slots.get(t).and_then(|s| s.name.clone()),
                "progress": {"blocks": blocks, "total_blocks": total, "percent": percent},
            }),
        );
    }
    // Beyond SPDK's shape (which its clients and tests compare exactly): only
    // for arrays with a superblock, which SPDK's listing shapes do not cover.
    if shared.superblock {
        o.insert("copied_blocks".into(), json!(shared.copied_blocks.load(Ordering::Relaxed)));
    }
    // Shown wherever nvraid's own fields are, and on any array once it is
    // not 0: it is an alarm.
    let impossible = shared.impossible_events.load(Ordering::Relaxed);
    if shared.superblock || impossible > 0 {
        o.insert("impossible_events".into(), json!(impossible));
    }
    if let Some(bm) = &control.bitmap {
        let g = bm.geometry();
        o.insert(
            "bitmap".into(),
            json!({
                "chunk_size_kb": g.chunk_size_blocks * g.block_size as u64 / 1024,
                "num_chunks": g.num_chunks(),
                "dirty_chunks": bm.dirty_chunks().len(),
                "batches_written": bm.batches_written(),
                "writes_waited": bm.writes_waited(),
            }),
        );
    }
    if let Some(c) = &*shared.last_check.lock().unwrap_or_else(|e| e.into_inner()) {
        o.insert("last_check".into(), c.clone());
    }
    if let Some(e) = &*shared.start_error.lock().unwrap_or_else(|e| e.into_inner()) {
        o.insert("start_error".into(), json!(e));
    }
    let list: Vec<Value> = control
        .slots
        .iter()
        .map(|s| {
            let mut v = json!({
                "name": s.name,
                "uuid": s.uuid.unwrap_or(Uuid::nil()).to_string(),
                "is_configured": matches!(s.role, Role::Active | Role::Rebuilding),
                "data_offset": s.data_offset_blocks,
                "data_size": s.data_size_blocks,
                "state": match s.role {
                    Role::Missing => "missing",
                    Role::Active => "active",
                    Role::Rebuilding => "rebuilding",
                    Role::Failed => "failed",
                    Role::Empty => "empty",
                },
            });
            if !shared.superblock {
                if let Some(o) = v.as_object_mut() {
                    o.remove("state");
                }
            }
            v
        })
        .collect();
    o.insert("base_bdevs_list".into(), Value::Array(list));
    Value::Object(o)
}

// ---- public handle ---------------------------------------------------------

/// A handle on an array, for tests, tools and the other layers. Cheap to
/// clone and `Send`; methods that talk to the owner must run on a reactor.
#[derive(Clone)]
pub struct RaidArray(pub(crate) Arc<ArrayShared>);

impl RaidArray {
    /// The array named (or with UUID) `name`, in the current reactor set.
    pub fn find(name: &str) -> Option<RaidArray> {
        RaidModule::get().find(name).map(RaidArray)
    }

    /// Every array of the current reactor set, in creation order.
    pub fn list() -> Vec<RaidArray> {
        RaidModule::get().arrays().into_iter().map(RaidArray).collect()
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn level(&self) -> Level {
        self.0.level
    }

    pub fn state(&self) -> RaidState {
        self.0.control().state
    }

    /// Online with fewer active members than slots.
    pub fn is_degraded(&self) -> bool {
        let control = self.0.control();
        control.state == RaidState::Online && control.slots.iter().any(|s| s.role != Role::Active)
    }

    pub fn rebuild_running(&self) -> bool {
        self.0.control().process_target.is_some()
    }

    /// Members by slot: `(name, is active)`.
    pub fn members(&self) -> Vec<(Option<String>, bool)> {
        self.0.control().slots.iter().map(|s| (s.name.clone(), s.role == Role::Active)).collect()
    }

    pub fn geometry(&self) -> Option<Arc<Geometry>> {
        self.0.geometry.get().cloned()
    }

    /// The registered bdev, once online.
    pub fn bdev(&self) -> Option<BdevHandle> {
        self.0.control().handle.clone()
    }

    /// TEST-ONLY: turns array-level write serialization off (or back on).
    /// Off, overlapping writes can reach mirrors in different orders and
    /// the copies diverge: the mirror-storm test shows it. Not reachable over
    /// RPC. IO already in flight keeps the mode it started with.
    pub fn set_serialization(&self, on: bool) {
        self.0.serialize.store(on, Ordering::Relaxed);
    }

    /// TEST-ONLY: off, a write locks only its own blocks, not the range the
    /// level asks for (`RaidLevel::lock_range`: raid5 whole stripes), so two
    /// writes into one stripe may compute parity from each other's
    /// half-written data: the raid5 storm shows it. Not reachable over RPC.
    pub fn set_lock_widening(&self, on: bool) {
        self.0.widen_lock.store(on, Ordering::Relaxed);
    }

    /// TEST- AND BENCHMARK-ONLY: off, raid5 writes put nothing in the
    /// partial parity log (`ppl`), which reopens the write hole: to measure
    /// what the log costs. Not reachable over RPC; IO already planned keeps
    /// the mode it started with.
    pub fn set_partial_parity_log(&self, on: bool) {
        self.0.ppl_off.store(!on, Ordering::Relaxed);
    }

    /// Whether the array keeps a partial parity log (raid5 with a superblock).
    pub fn has_partial_parity_log(&self) -> bool {
        self.0.ppl.get().is_some()
    }

    /// Writes that found no free log slot on their parity member and waited.
    pub fn partial_parity_log_waits(&self) -> u64 {
        self.0.ppl.get().map_or(0, |l| l.slots_exhausted.load(Ordering::Relaxed))
    }

    /// Suspends the array: `done` runs (on the owner reactor) once no array
    /// IO is in flight on any reactor and new IO is held; call
    /// [`RaidArray::resume`] once after it ran. Callable any time, also
    /// during a delete; fails with `NotFound` once the array is gone.
    pub fn suspend(&self, done: impl FnOnce(Result<(), BdevError>) + Send + 'static) {
        owner::suspend_any(&self.0, Box::new(done));
    }

    pub fn resume(&self) {
        owner::resume_any(&self.0);
    }

    /// `bdev_raid_get_bdevs` entry.
    pub fn info_json(&self) -> Value {
        info_json(&self.0, true)
    }

    /// Blocks written by rebuilds and resyncs of this array so far.
    pub fn copied_blocks(&self) -> u64 {
        self.0.copied_blocks.load(Ordering::Relaxed)
    }

    /// States the IO path met that it believes impossible (must be 0;
    /// `impossible_events` in `bdev_raid_get_bdevs`).
    pub fn impossible_events(&self) -> u64 {
        self.0.impossible_events.load(Ordering::Relaxed)
    }

    /// The write-intent bitmap's shared half, if the array has one.
    pub fn bitmap(&self) -> Option<Arc<Bitmap>> {
        self.0.control().bitmap.clone()
    }

    /// A resync or rebuild is pending or running.
    pub fn process_running(&self) -> bool {
        let control = self.0.control();
        control.process_target.is_some()
            || control.dirty.is_some()
            || control.slots.iter().any(|s| s.role == Role::Rebuilding)
    }

    /// What examination and assembly reported (bad superblocks, refused
    /// members, arrays that cannot start), oldest first.
    pub fn problems() -> Vec<String> {
        RaidModule::get().problems()
    }
}

// ---- create ----------------------------------------------------------------

/// A validated `bdev_raid_create`.
pub(crate) struct CreateSpec {
    pub name: String,
    pub level: Level,
    pub base_bdevs: Vec<String>,
    pub strip_size_kb: u32,
    pub uuid: Option<Uuid>,
    pub superblock: bool,
    /// Bitmap chunk size with a superblock on a redundant level (0: none).
    pub bitmap_chunk_kb: u32,
}

fn eperm(msg: String) -> BdevError {
    BdevError::Os(msg, 1) // EPERM, as SPDK answers for a claimed member
}

/// Creates an array (must run on a reactor, which becomes its owner). Members
/// that exist are claimed now; the others are waited for (`configuring`).
/// An array with a superblock needs every member now, and is online only
/// once `meta::init_new` wrote its metadata.
pub(crate) fn create(spec: CreateSpec) -> Result<Arc<ArrayShared>, BdevError> {
    let module = RaidModule::get();
    let reg = Registry::get();
    if module.find(&spec.name).is_some() || reg.lookup(&spec.name).is_some() {
        return Err(BdevError::Exists(spec.name));
    }
    let owner_tag = format!("raid {}", spec.name);
    // Check every present member before claiming any.
    let mut block_size = 0u32;
    for n in &spec.base_bdevs {
        let Some(h) = reg.lookup(n) else { continue };
        if let Some(by) = h.claimed_by() {
            return Err(eperm(format!("base bdev {n} is already claimed by {by}")));
        }
        let bs = h.props().block_size;
        if block_size != 0 && bs != block_size {
            return Err(BdevError::Invalid(format!("base bdev {n} has block size {bs}, others {block_size}")));
        }
        block_size = bs;
    }
    if spec.superblock && spec.base_bdevs.iter().any(|n| reg.lookup(n).is_none()) {
        return Err(BdevError::NotFound("an array with a superblock needs every base bdev present at create".into()));
    }
    let mut slots = Vec::with_capacity(spec.base_bdevs.len());
    let mut claimed: Vec<BdevHandle> = Vec::new();
    for n in &spec.base_bdevs {
        match reg.lookup(n) {
            Some(_) => match reg.claim(n, &owner_tag) {
                Ok(h) => {
                    slots.push(Slot {
                        name: Some(h.name().to_string()),
                        uuid: Some(h.props().uuid),
                        data_size_blocks: h.num_blocks(),
                        handle: Some(h.clone()),
                        role: Role::Active,
                        ..Slot::empty()
                    });
                    claimed.push(h);
                }
                Err(e) => {
                    for h in &claimed {
                        reg.release(h, &owner_tag);
                    }
                    return Err(match e {
                        BdevError::Claimed(..) => eperm(e.to_string()),
                        e => e,
                    });
                }
            },
            None => slots.push(Slot { name: Some(n.clone()), role: Role::Missing, ..Slot::empty() }),
        }
    }
    let all_present = slots.iter().all(|s| s.role == Role::Active);
    let shared = new_shared(&spec, slots, block_size, false)?;
    let rollback = |shared: &Arc<ArrayShared>| {
        for h in &claimed {
            reg.release(h, &owner_tag);
        }
        module.arrays.lock().unwrap_or_else(|e| e.into_inner()).retain(|a| !Arc::ptr_eq(a, shared));
        shared.torn_down.store(true, Ordering::Release);
        drop_channel(shared.key);
    };
    let Some(channel) = channel_for(&shared) else {
        return Err(BdevError::Invalid("no reactor".into()));
    };
    module.arrays.lock().unwrap_or_else(|e| e.into_inner()).push(shared.clone());
    if all_present && !spec.superblock {
        // A new array has no IO and no channel anywhere yet: no fence needed.
        if let Err(e) = go_online(&shared) {
            rollback(&shared);
            return Err(e);
        }
        channel.refresh();
    }
    for h in &claimed {
        watch_removal(&shared, h);
    }
    ensure_examiner(&module);
    tracing::info!(name = %shared.name, level = shared.level.name(), state = shared.control().state.name(), "raid created");
    Ok(shared)
}

/// The shared state of a new array (owner: the current reactor).
pub(crate) fn new_shared(
    spec: &CreateSpec,
    slots: Vec<Slot>,
    block_size: u32,
    from_superblocks: bool,
) -> Result<Arc<ArrayShared>, BdevError> {
    Ok(Arc::new(ArrayShared {
        key: RaidModule::get().next_key.fetch_add(1, Ordering::Relaxed) + 1,
        name: spec.name.clone(),
        owner: reactor::current().ok_or_else(|| BdevError::Invalid("raid create must run on a reactor".into()))?,
        level: spec.level,
        strip_size_kb: spec.strip_size_kb,
        uuid: spec.uuid.unwrap_or_else(Uuid::new_v4),
        superblock: spec.superblock,
        failed_mask: AtomicU32::new(0),
        recorded_mask: AtomicU32::new(0),
        serialize: AtomicBool::new(true),
        widen_lock: AtomicBool::new(true),
        deleted: AtomicBool::new(false),
        torn_down: AtomicBool::new(false),
        geometry: GeometryCell::default(),
        member_events: Mutex::new(Vec::new()),
        rebuild_blocks: AtomicU64::new(0),
        redundancy_verified: AtomicBool::new(false),
        process_total: AtomicU64::new(0),
        copied_blocks: AtomicU64::new(0),
        clear_sb: AtomicBool::new(false),
        bitmap_chunk_kb: spec.bitmap_chunk_kb,
        last_check: Mutex::new(None),
        start_error: Mutex::new(None),
        impossible_events: AtomicU64::new(0),
        found: Mutex::new(Vec::new()),
        from_superblocks,
        starting: AtomicBool::new(false),
        ppl: std::sync::OnceLock::new(),
        ppl_off: AtomicBool::new(false),
        timer_armed: AtomicBool::new(false),
        control: Mutex::new(Control::new(slots, block_size)),
    }))
}

/// Adds an array to the module's list (assembly; `create` does it itself).
pub(crate) fn publish(shared: &Arc<ArrayShared>) {
    RaidModule::get().arrays.lock().unwrap_or_else(|e| e.into_inner()).push(shared.clone());
}

impl Control {
    pub(crate) fn new(slots: Vec<Slot>, block_size: u32) -> Control {
        Control {
            slots,
            state: RaidState::Configuring,
            handle: None,
            process_target: None,
            block_size,
            caps: Caps::default(),
            write_cache: false,
            deleting: false,
            bitmap: None,
            dirty: None,
            process_kind: "rebuild",
        }
    }
}

/// Forgets an array that never went online: members released, no state left.
pub(crate) fn abandon(shared: &Arc<ArrayShared>) {
    let handles: Vec<BdevHandle> = shared.control().slots.iter_mut().filter_map(|s| s.handle.take()).collect();
    let reg = Registry::get();
    for h in &handles {
        reg.release(h, &shared.owner_tag());
    }
    RaidModule::get().arrays.lock().unwrap_or_else(|e| e.into_inner()).retain(|a| !Arc::ptr_eq(a, shared));
    shared.deleted.store(true, Ordering::Release);
    shared.torn_down.store(true, Ordering::Release);
    drop_channel(shared.key);
}

/// Computes the geometry from the members and registers the bdev. The array
/// must have no IO in flight (new, or under a fence).
fn go_online(shared: &Arc<ArrayShared>) -> Result<(), BdevError> {
    go_online_with(shared, None)
}

/// `go_online`; `assembled`: the geometry a superblock recorded (members may
/// be missing or stale then: the assembly plan checked the array can run).
pub(crate) fn go_online_with(shared: &Arc<ArrayShared>, assembled: Option<Geometry>) -> Result<(), BdevError> {
    let (props, caps) = {
        let mut control = shared.control();
        let handles: Vec<BdevHandle> = control.slots.iter().filter_map(|s| s.handle.clone()).collect();
        if assembled.is_none()
            && (handles.len() != control.slots.len() || control.slots.iter().any(|s| s.role != Role::Active))
        {
            return Err(BdevError::Invalid("not every member is present".into()));
        }
        let bs = control.block_size.max(1);
        let strip_blocks = if shared.level.uses_strips() { shared.strip_size_kb as u64 * 1024 / bs as u64 } else { 0 };
        if shared.level.uses_strips() && strip_blocks == 0 {
            return Err(BdevError::Invalid(format!(
                "strip size {} KiB is smaller than the block size {bs}",
                shared.strip_size_kb
            )));
        }
        let sizes: Vec<u64> = control
            .slots
            .iter()
            .map(|s| s.handle.as_ref().map_or(0, |h| h.num_blocks()).saturating_sub(s.data_offset_blocks))
            .collect();
        let geo = match assembled {
            Some(g) => g,
            None => Geometry::new(shared.level, strip_blocks, &sizes).map_err(|e| BdevError::Invalid(e.to_string()))?,
        };
        let mut caps = Caps::of(handles.iter());
        if !shared.level.maps_unmap_to_members() {
            // The level cannot keep redundancy right under an unmap or a
            // write of zeroes passed to members: it does not offer them.
            caps.unmap = false;
            caps.write_zeroes = false;
            caps.deallocated_reads_zeroes = false;
        }
        let mut props = BdevProps::new(&shared.name, "Raid Volume", bs, geo.array_blocks(), Some(shared.uuid));
        props.optimal_io_boundary = strip_blocks as u32;
        // Props are fixed once registered (SPDK too computes these from the
        // members at configure time). A cached member that joins later is
        // written with FUA (see `Control::write_cache`); a member lacking
        // DLFEAT cannot join an array that claims it (`Caps::satisfied_by`).
        props.write_cache = handles.iter().any(|h| h.bdev().has_write_cache());
        props.deallocated_reads_zeroes = caps.deallocated_reads_zeroes;
        // One block: every member writes a block whole, and a crash leaves
        // each copy (or a stripe's data block) old or new, which resync or
        // reconstruction keeps. Larger writes span members that a power loss
        // can catch apart.
        props.atomic_write_blocks = 1;
        let reg = Registry::get();
        if reg.lookup(&shared.name).is_some() || reg.lookup(&shared.uuid.to_string()).is_some() {
            return Err(BdevError::Exists(shared.name.clone()));
        }
        for (i, s) in control.slots.iter_mut().enumerate() {
            s.data_size_blocks = geo.member_data_blocks(i);
        }
        control.caps = caps;
        control.write_cache = props.write_cache;
        if shared.geometry.set(Arc::new(geo)).is_err() {
            return Err(BdevError::Invalid("array was online before".into()));
        }
        recompute_state(shared, &mut control);
        if control.state != RaidState::Online {
            return Err(BdevError::Invalid("too few members to serve every block".into()));
        }
        (props, caps)
    };
    // Registering runs examiners, which may read the array at once: this
    // reactor's state must know the geometry and members first (no lock held).
    if let Some(channel) = find_channel(shared.key) {
        channel.refresh();
    }
    let bdev = Arc::new(RaidBdev { shared: shared.clone(), props, caps });
    match Registry::get().register(bdev) {
        Ok(h) => {
            shared.control().handle = Some(h);
            tracing::info!(name = %shared.name, "raid online");
            Ok(())
        }
        Err(e) => {
            shared.control().state = RaidState::Offline;
            Err(e)
        }
    }
}

/// State from roles: online while every block has an active copy.
fn recompute_state(shared: &ArrayShared, control: &mut Control) {
    if control.deleting {
        return;
    }
    control.state = match shared.geometry.get() {
        None => RaidState::Configuring,
        Some(g) => {
            if g.survives(|m| control.slots.get(m).is_none_or(|s| s.role != Role::Active)) {
                RaidState::Online
            } else {
                RaidState::Offline
            }
        }
    };
}

/// Hot-remove: when a member bdev goes away, its slot empties (fenced).
/// Resizes of the member are watched from here too (`resize`).
pub(crate) fn watch_removal(shared: &Arc<ArrayShared>, h: &BdevHandle) {
    crate::resize::watch(shared, h);
    let weak: Weak<ArrayShared> = Arc::downgrade(shared);
    let id = h.id();
    h.on_remove(move || {
        let Some(shared) = weak.upgrade() else { return };
        if shared.torn_down.load(Ordering::Acquire) || reactor::current().is_none() {
            return;
        }
        owner::on_owner_fenced(&shared, move |fenced| {
            let Ok((channel, fence)) = fenced else { return };
            let slot =
                channel.shared.control().slots.iter().position(|s| s.handle.as_ref().is_some_and(|h| h.id() == id));
            if let Some(slot) = slot {
                tracing::warn!(raid = %channel.shared.name, slot, "member bdev removed");
                empty_slot(channel, slot);
            }
            commit(channel, fence, |_| {});
        });
    });
}

/// Registers the module's examiner, so arrays with superblocks assemble as
/// their members appear. Call once the reactor set runs, before bdevs are
/// created; calling it again does nothing. (Creating an array also does it.)
pub fn init() {
    ensure_examiner(&RaidModule::get());
}

fn ensure_examiner(module: &RaidModule) {
    if module.examiner_added.swap(true, Ordering::AcqRel) {
        return;
    }
    Registry::get().add_examiner(Arc::new(examine));
}

/// A new bdev: if a configuring array waits for it by name, claim it there;
/// otherwise look for a superblock on it.
fn examine(h: &BdevHandle) {
    if reactor::current().is_none() {
        return;
    }
    if !examine_by_name(h) && h.claimed_by().is_none() {
        crate::examine::examine_superblock(h);
    }
}

fn examine_by_name(h: &BdevHandle) -> bool {
    let mut matched = false;
    for shared in RaidModule::get().arrays() {
        if shared.deleted.load(Ordering::Acquire) {
            continue;
        }
        let slot =
            shared.control().slots.iter().position(|s| s.role == Role::Missing && s.name.as_deref() == Some(h.name()));
        let Some(slot) = slot else { continue };
        matched = true;
        let name = h.name().to_string();
        owner::on_owner_fenced(&shared, move |fenced| {
            let Ok((channel, fence)) = fenced else { return };
            if let Err(e) = claim_missing(channel, slot, &name) {
                tracing::warn!(raid = %channel.shared.name, member = %name, "cannot configure member: {e}");
            }
            fence.done();
        });
    }
    matched
}

fn claim_missing(channel: &Rc<ArrayChannel>, slot: usize, name: &str) -> Result<(), BdevError> {
    let shared = &channel.shared;
    {
        let control = shared.control();
        let s = control.slots.get(slot).ok_or_else(|| BdevError::Invalid("bad slot".into()))?;
        if control.deleting || s.role != Role::Missing || s.name.as_deref() != Some(name) {
            return Ok(());
        }
        let reg = Registry::get();
        let h = reg.lookup(name).ok_or_else(|| BdevError::NotFound(name.into()))?;
        let bs = h.props().block_size;
        if control.block_size != 0 && control.block_size != bs {
            return Err(BdevError::Invalid(format!("block size {bs} differs from the array's {}", control.block_size)));
        }
    }
    let h = Registry::get().claim(name, &shared.owner_tag())?;
    {
        let mut control = shared.control();
        control.block_size = h.props().block_size;
        control.slots[slot] = Slot {
            name: Some(h.name().to_string()),
            uuid: Some(h.props().uuid),
            data_size_blocks: h.num_blocks(),
            handle: Some(h.clone()),
            role: Role::Active,
            ..Slot::empty()
        };
    }
    watch_removal(shared, &h);
    let complete = shared.control().slots.iter().all(|s| s.role == Role::Active);
    if complete && shared.geometry.get().is_none() {
        go_online(shared)?;
    }
    Ok(())
}

// ---- membership changes (fenced, on the owner) -------------------------------

/// A latched member failure becomes official: its slot turns `Failed`.
pub(crate) fn apply_member_failure(channel: &Rc<ArrayChannel>, m: usize) {
    let shared = &channel.shared;
    if shared.failed_mask.load(Ordering::Acquire) & (1 << m) == 0 {
        return;
    }
    let mut control = shared.control();
    let Some(slot) = control.slots.get_mut(m) else {
        return;
    };
    if !matches!(slot.role, Role::Active | Role::Rebuilding) {
        return;
    }
    slot.role = Role::Failed;
    let was_target = control.process_target == Some(m);
    recompute_state(shared, &mut control);
    tracing::warn!(raid = %shared.name, member = m, state = control.state.name(), "member failed");
    drop(control);
    if was_target {
        rebuild::cancel(channel);
    }
}

/// Removes whatever is in `slot` (fenced): claim released, slot empty.
fn empty_slot(channel: &Rc<ArrayChannel>, slot: usize) {
    let shared = &channel.shared;
    let (handle, was_target) = {
        let mut control = shared.control();
        let Some(s) = control.slots.get_mut(slot) else {
            return;
        };
        let handle = s.handle.take();
        *s = s.vacated();
        let was_target = control.process_target == Some(slot);
        recompute_state(shared, &mut control);
        (handle, was_target)
    };
    if was_target {
        rebuild::cancel(channel);
    }
    if let Some(h) = handle {
        crate::resize::forget(shared, &h);
        Registry::get().release(&h, &shared.owner_tag());
    }
    // No IO in flight: the latch can be reset for the slot's next member.
    shared.failed_mask.fetch_and(!(1u32 << slot), Ordering::AcqRel);
    shared.recorded_mask.fetch_and(!(1u32 << slot), Ordering::AcqRel);
}

/// `bdev_raid_remove_base_bdev`: finds the array holding `member` and
/// empties its slot under a fence.
pub(crate) fn remove_base(member: &str, done: Box<dyn FnOnce(Result<(), BdevError>) + Send>) {
    let holder = RaidModule::get().arrays().into_iter().find(|a| {
        !a.deleted.load(Ordering::Acquire)
            && a.control().slots.iter().any(|s| s.role != Role::Empty && s.name.as_deref() == Some(member))
    });
    let Some(shared) = holder else {
        return done(Err(BdevError::NotFound(format!("{member} is not a member of any raid bdev"))));
    };
    if let Some(why) = shared.level.refuses(LevelOp::RemoveMember) {
        return done(Err(BdevError::Invalid(why.into())));
    }
    let member = member.to_string();
    owner::on_owner_fenced(&shared, move |fenced| {
        let (channel, fence) = match fenced {
            Ok(f) => f,
            Err(e) => return done(Err(e)),
        };
        let slot = channel
            .shared
            .control()
            .slots
            .iter()
            .position(|s| s.role != Role::Empty && s.name.as_deref() == Some(&member));
        let r = match slot {
            Some(slot) => {
                empty_slot(channel, slot);
                tracing::info!(raid = %channel.shared.name, %member, state = channel.shared.control().state.name(), "member removed");
                Ok(())
            }
            None => Err(BdevError::NotFound(format!("{member} is no longer a member of {}", channel.shared.name))),
        };
        match r {
            Ok(()) => commit(channel, fence, done),
            Err(e) => {
                fence.done();
                done(Err(e));
            }
        }
    });
}

/// `bdev_raid_add_base_bdev`: puts `base` into a free (or failed) slot under
/// a fence; on a degraded redundant array a rebuild onto it starts.
pub(crate) fn add_base(raid: &str, base: &str, done: Box<dyn FnOnce(Result<(), BdevError>) + Send>) {
    let Some(shared) = RaidModule::get().find(raid) else {
        return done(Err(BdevError::NotFound(format!("raid bdev {raid}"))));
    };
    if let Some(why) = shared.level.refuses(LevelOp::AddMember) {
        return done(Err(BdevError::Invalid(why.into())));
    }
    let base = base.to_string();
    owner::on_owner_fenced(&shared, move |fenced| match fenced {
        Ok((channel, fence)) => add_fenced(channel, fence, base, done),
        Err(e) => done(Err(e)),
    });
}

/// Adds `base` under the fence `add_base` or `member_restored` holds. With
/// a superblock, a member coming back is recognised by its own superblock
/// and resynced only where it missed writes.
fn add_fenced(
    channel: &Rc<ArrayChannel>,
    fence: Fence,
    base: String,
    done: Box<dyn FnOnce(Result<(), BdevError>) + Send>,
) {
    let has_sb = channel.owner.as_ref().is_some_and(|o| o.meta.borrow().is_some());
    if !has_sb {
        let r = add_member(channel, &base, None);
        if let Ok(true) = r {
            rebuild::start_next(channel);
        }
        fence.done();
        return done(r.map(|_| ()));
    }
    let Some(h) = Registry::get().lookup(&base) else {
        fence.done();
        return done(Err(BdevError::NotFound(base)));
    };
    let channel2 = channel.clone();
    crate::meta::read_superblock(&h.clone(), move |found| {
        let channel = channel2;
        let returning = crate::examine::returning_member(&channel, &found);
        // The log area lies at the same offset on every member: the slot
        // only places the member in the wipe's list (a new one's slot is
        // chosen later, by add_member).
        let slot = returning.as_ref().map_or(0, |r| r.slot);
        let shared = channel.shared.clone();
        let joined = move |wiped: Result<(), String>| {
            let r = wiped
                .map_err(|e| BdevError::Invalid(format!("{base}: its partial parity log not wiped: {e}")))
                .and_then(|()| add_member(&channel, &base, returning));
            match r {
                Ok(_) => commit(&channel, fence, {
                    let channel = channel.clone();
                    move |c| {
                        rebuild::start_next(&channel);
                        done(c);
                    }
                }),
                Err(e) => {
                    fence.done();
                    done(Err(e));
                }
            }
        };
        crate::examine::wipe_joining_log(&shared, h, slot, Box::new(joined));
    });
}

/// A failed member's device answers again (`BdevEvent::Restored`: its
/// NVMe/TCP path came back after IO to it had failed). The array takes it
/// back as `bdev_raid_remove_base_bdev` + `bdev_raid_add_base_bdev` would,
/// in one fence: with a superblock it is recognised as the member that
/// left and resynced only in the chunks written while it was away; without
/// one it is rebuilt whole. A member that is not failed (its IO waited out
/// the loss) has nothing to do. md re-adds a returning device only when
/// told (`mdadm --re-add`, or udev's incremental assembly); a path that
/// comes back by itself is the case here, so the array does it.
pub(crate) fn member_restored(shared: &Arc<ArrayShared>, bdev_id: u64) {
    if shared.level.refuses(LevelOp::AddMember).is_some() || !shared.level.is_redundant() {
        return;
    }
    owner::on_owner_fenced(shared, move |fenced| {
        let Ok((channel, fence)) = fenced else { return };
        let failed = channel.shared.control().slots.iter().enumerate().find_map(|(i, s)| {
            let ours = s.role == Role::Failed && s.handle.as_ref().is_some_and(|h| h.id() == bdev_id);
            ours.then(|| (i, s.name.clone().unwrap_or_default()))
        });
        let Some((slot, name)) = failed else { return fence.done() };
        tracing::info!(raid = %channel.shared.name, member = %name, slot, "failed member restored: re-adding it");
        empty_slot(channel, slot);
        let raid = channel.shared.name.clone();
        add_fenced(
            channel,
            fence,
            name.clone(),
            Box::new(move |r| match r {
                Ok(()) => tracing::info!(%raid, member = %name, "restored member re-added"),
                Err(e) => RaidModule::get().problem(format!("raid {raid}: restored member {name} not re-added: {e}")),
            }),
        );
    });
}

/// A member that carries this array's superblock from before it left: the
/// slot it held, and the array ranges written while it was away (None when
/// the bitmap cannot tell: a full rebuild).
pub(crate) struct Returning {
    pub slot: usize,
    pub member_uuid: Uuid,
    pub ranges: Option<Arc<Vec<Range<u64>>>>,
}

/// Returns whether the new member needs a rebuild.
pub(crate) fn add_member(
    channel: &Rc<ArrayChannel>,
    base: &str,
    returning: Option<Returning>,
) -> Result<bool, BdevError> {
    let shared = &channel.shared;
    let reg = Registry::get();
    let h = reg.lookup(base).ok_or_else(|| BdevError::NotFound(base.to_string()))?;
    let (slot, old) = {
        let control = shared.control();
        if control.deleting {
            return Err(BdevError::NotFound(shared.name.clone()));
        }
        if control.handle.as_ref().is_some_and(|me| me.same(&h)) {
            return Err(BdevError::Invalid("a raid bdev cannot be its own member".into()));
        }
        if control.slots.iter().any(|s| s.handle.as_ref().is_some_and(|x| x.same(&h))) {
            return Err(BdevError::Exists(format!("{base} is already a member of {}", shared.name)));
        }
        let free = |s: &Slot| matches!(s.role, Role::Empty | Role::Failed);
        let slot = match &returning {
            Some(r) if control.slots.get(r.slot).is_some_and(free) => Some(r.slot),
            _ => None,
        };
        // A new member prefers a slot no returning member could claim back.
        let slot = slot
            .or_else(|| control.slots.iter().position(|s| s.role == Role::Empty && s.sb_uuid.is_nil()))
            .or_else(|| control.slots.iter().position(|s| s.role == Role::Empty))
            .or_else(|| control.slots.iter().position(|s| s.role == Role::Failed))
            .ok_or_else(|| BdevError::Invalid(format!("raid bdev {} has no free slot", shared.name)))?;
        let bs = h.props().block_size;
        if control.block_size != 0 && bs != control.block_size {
            return Err(BdevError::Invalid(format!("{base} has block size {bs}, the array {}", control.block_size)));
        }
        if let Some(geo) = shared.geometry.get() {
            let need = geo.member_data_blocks(slot) + control.slots[slot].data_offset_blocks;
            if h.num_blocks() < need {
                return Err(BdevError::Invalid(format!(
                    "{base} has {} blocks, the array needs {need}",
                    h.num_blocks()
                )));
            }
            if !control.caps.satisfied_by(&h) {
                return Err(BdevError::Invalid(format!(
                    "{base} lacks an IO type the array advertises, or its unmapped blocks do not read as zeroes \
                     as the array's do"
                )));
            }
        }
        (slot, control.slots[slot].handle.clone())
    };
    let h = reg.claim(base, &shared.owner_tag()).map_err(|e| match e {
        BdevError::Claimed(..) => eperm(e.to_string()),
        e => e,
    })?;
    if let Some(old) = old {
        crate::resize::forget(shared, &old);
        reg.release(&old, &shared.owner_tag());
    }
    let online = shared.geometry.get().cloned();
    let rebuild = online.is_some() && shared.level.is_redundant();
    {
        let mut control = shared.control();
        control.block_size = h.props().block_size;
        let prev = control.slots[slot].clone();
        let (sb_uuid, partial) = match returning {
            Some(r) if r.slot == slot => (r.member_uuid, r.ranges),
            // A new member of an array with a superblock: a fresh identity.
            _ if shared.superblock => (Uuid::new_v4(), None),
            _ => (Uuid::nil(), None),
        };
        control.slots[slot] = Slot {
            name: Some(h.name().to_string()),
            uuid: Some(h.props().uuid),
            data_size_blocks: online.as_ref().map_or(h.num_blocks(), |g| g.member_data_blocks(slot)),
            handle: Some(h.clone()),
            role: if rebuild { Role::Rebuilding } else { Role::Active },
            data_offset_blocks: prev.data_offset_blocks,
            sb_uuid,
            partial,
            recovered_blocks: 0,
        };
        recompute_state(shared, &mut control);
    }
    // Fenced: no IO in flight, so the new member starts with a clear latch.
    shared.failed_mask.fetch_and(!(1u32 << slot), Ordering::AcqRel);
    shared.recorded_mask.fetch_and(!(1u32 << slot), Ordering::AcqRel);
    watch_removal(shared, &h);
    tracing::info!(raid = %shared.name, member = base, slot, rebuild, "member added");
    let complete = shared.control().slots.iter().all(|s| s.role == Role::Active);
    if online.is_none() && complete {
        go_online(shared)?;
    }
    Ok(rebuild)
}

/// A finished rebuild or resync: the rebuilt slots in `dests` become
/// active; a resync clears the dirty state (fenced).
pub(crate) fn rebuild_finished(channel: &Rc<ArrayChannel>, dests: u32, resync: bool) {
    let shared = &channel.shared;
    let mut control = shared.control();
    let failed = shared.failed_mask.load(Ordering::Acquire);
    for (i, s) in control.slots.iter_mut().enumerate() {
        if dests & (1 << i) != 0 && s.role == Role::Rebuilding && failed & (1 << i) == 0 {
            s.role = Role::Active;
            s.partial = None;
            s.recovered_blocks = 0;
        }
    }
    if resync {
        control.dirty = None;
    }
    control.process_target = None;
    recompute_state(shared, &mut control);
    tracing::info!(raid = %shared.name, dests, resync, state = control.state.name(), "rebuild finished");
}

/// Whether every member holds the same data outside the bitmap's chunks:
/// all slots active, no failure latched, no resync pending.
pub(crate) fn in_sync(shared: &ArrayShared, control: &Control) -> bool {
    control.slots.iter().all(|s| s.role == Role::Active)
        && shared.failed_mask.load(Ordering::Acquire) == 0
        && control.dirty.is_none()
}

/// Ends a fenced membership change. With a superblock, the bitmap's member
/// set (a new member gets every page first) and the superblock (events + 1,
/// the new slot table) are on disk before the fence ends and IO resumes.
pub(crate) fn commit(channel: &Rc<ArrayChannel>, fence: Fence, then: impl FnOnce(Result<(), BdevError>) + 'static) {
    let meta = channel.owner.as_ref().and_then(|o| o.meta.borrow().clone());
    let Some(meta) = meta else {
        fence.done();
        return then(Ok(()));
    };
    let sync = in_sync(&channel.shared, &channel.shared.control());
    let channel2 = channel.clone();
    let meta2 = meta.clone();
    let write_sb = move || {
        meta::update(
            &channel2,
            &meta2,
            SbWrite::Dirty,
            Box::new(move |r| {
                fence.done();
                then(r);
            }),
        );
    };
    match &meta.bitmap {
        Some(bm) => {
            bm.set_in_sync(sync);
            let cell = Rc::new(std::cell::RefCell::new(Some(write_sb)));
            let c2 = cell.clone();
            let r = bm.set_members(meta::writable_handles(channel), move || {
                if let Some(f) = c2.borrow_mut().take() {
                    f();
                }
            });
            if let Err(e) = r {
                tracing::error!(raid = %channel.shared.name, "bitmap members not updated: {e}");
                if let Some(f) = cell.borrow_mut().take() {
                    f();
                }
            }
        }
        None => write_sb(),
    }
}

// ---- delete and teardown -----------------------------------------------------

/// `bdev_raid_delete`: suspends (draining IO everywhere), fails held IO,
/// unregisters the bdev (waiting for its channels), releases the members.
/// `done` runs when all of that is over.
pub(crate) fn delete(name: &str, clear_sb: bool, done: Box<dyn FnOnce(Result<(), BdevError>) + Send>) {
    let Some(shared) = RaidModule::get().find(name) else {
        return done(Err(BdevError::NotFound(format!("raid bdev {name}"))));
    };
    if let Some(by) = shared.control().handle.as_ref().and_then(|h| h.claimed_by()) {
        return done(Err(BdevError::Claimed(name.to_string(), by)));
    }
    if clear_sb {
        shared.clear_sb.store(true, Ordering::Release);
    }
    owner::on_owner_fenced(&shared, move |fenced| match fenced {
        Ok((channel, fence)) => start_delete(channel, fence, done),
        Err(e) => done(Err(e)),
    });
}

fn start_delete(channel: &Rc<ArrayChannel>, fence: Fence, done: Box<dyn FnOnce(Result<(), BdevError>) + Send>) {
    let shared = channel.shared.clone();
    let handle = {
        let mut control = shared.control();
        if control.deleting {
            drop(control);
            fence.done();
            return done(Err(BdevError::NotFound(format!("raid bdev {} (already being deleted)", shared.name))));
        }
        control.deleting = true;
        control.handle.clone()
    };
    shared.deleted.store(true, Ordering::Release);
    rebuild::cancel(channel);
    // The fence stays up until teardown is over. IO that other reactors hold
    // would be resubmitted at resume, which may never come if someone else
    // holds the array suspended: fail it now.
    if let Some(owner) = &channel.owner {
        *owner.teardown_fence.borrow_mut() = Some(fence);
    }
    for r in 0..reactor::count() {
        let s = shared.clone();
        reactor::send(r, move || owner::fail_held(&s));
    }
    match handle {
        // The registry fails new IO, waits for every reactor's in-flight IO
        // on the raid bdev, then calls `destruct`, which tears down.
        Some(h) => Registry::get().force_unregister(h, move |r| {
            done(r);
        }),
        None => teardown(shared, Box::new(move || done(Ok(())))),
    }
}

/// Drops every reactor's state for the array, releases the members and
/// forgets the array; `done` runs after. Runs on the owner.
fn teardown(shared: Arc<ArrayShared>, done: Box<dyn FnOnce() + Send>) {
    if reactor::current() != Some(shared.owner) {
        let owner = shared.owner;
        return reactor::send(owner, move || teardown(shared, done));
    }
    shared.deleted.store(true, Ordering::Release);
    // A rebuild window still copying (a shutdown does not fence the array)
    // ends first: no member IO of the array may outlive the release.
    if let Some(channel) = find_channel(shared.key) {
        if channel.owner.as_ref().is_some_and(|o| o.rebuild.borrow().is_some()) {
            return rebuild::cancel_then(&channel, move || teardown(shared, done));
        }
    }
    // Metadata last of all IO: the bitmap's final batch, then the superblock
    // (clean, or wiped for `clear_sb`), before any member is released.
    let meta = find_channel(shared.key).and_then(|channel| {
        let meta = channel.owner.as_ref().and_then(|o| o.meta.borrow_mut().take());
        meta.map(|m| (channel, m))
    });
    if let Some((channel, meta)) = meta {
        return crate::examine::close_metadata(&channel, meta, move || teardown(shared, done));
    }
    let (key, owner) = (shared.key, shared.owner);
    reactor::for_each_reactor(
        Arc::new(move || {
            if reactor::current() != Some(owner) {
                if let Some(channel) = drop_channel(key) {
                    owner::fail_held_on(&channel);
                }
            }
        }),
        move || {
            let channel = drop_channel(key);
            let handles: Vec<BdevHandle> = {
                let mut control = shared.control();
                control.deleting = true;
                control.handle = None;
                control.process_target = None;
                control.state = RaidState::Offline;
                control.slots.iter().filter_map(|s| s.handle.clone()).collect()
            };
            let reg = Registry::get();
            for h in &handles {
                crate::resize::forget(&shared, h);
                reg.release(h, &shared.owner_tag());
            }
            RaidModule::get().arrays.lock().unwrap_or_else(|e| e.into_inner()).retain(|a| !Arc::ptr_eq(a, &shared));
            shared.torn_down.store(true, Ordering::Release);
            if let Some(channel) = channel {
                owner::fail_held_on(&channel);
                rebuild::cancel(&channel);
                let fence = channel.owner.as_ref().and_then(|o| o.teardown_fence.borrow_mut().take());
                match fence {
                    Some(f) => f.done(),
                    None => owner::fail_pending(&channel),
                }
            }
            tracing::info!(name = %shared.name, "raid deleted");
            done();
        },
    );
}

/// `bdev_raid_check`: a scrub of every copy on the owner reactor (see
/// `rebuild::start_check`); `done` gets its counts when it finished.
pub(crate) fn check(name: &str, repair: bool, done: Box<dyn FnOnce(Result<Value, BdevError>) + Send>) {
    let Some(shared) = RaidModule::get().find(name) else {
        return done(Err(BdevError::NotFound(format!("raid bdev {name}"))));
    };
    if let Some(why) = shared.level.refuses(LevelOp::Check) {
        return done(Err(BdevError::Invalid(why.into())));
    }
    let name = name.to_string();
    owner::on_owner(&shared, move |channel| match channel {
        Some(channel) => rebuild::start_check(&channel, repair, done),
        None => done(Err(BdevError::NotFound(format!("raid bdev {name}")))),
    });
}

/// Checks a member count against the level (for create).
pub(crate) fn check_member_count(level: Level, n: usize) -> Result<(), BdevError> {
    if n < level.min_members() {
        return Err(BdevError::Invalid(format!("{} needs at least {} base bdevs", level.name(), level.min_members())));
    }
    if n > MAX_MEMBERS {
        return Err(BdevError::Invalid(format!("at most {MAX_MEMBERS} base bdevs are supported")));
    }
    Ok(())
}

/// `bdev_raid_get_bdevs` for one category.
pub(crate) fn list_json(category: Option<RaidState>) -> Vec<Value> {
    RaidModule::get()
        .arrays()
        .iter()
        .filter(|a| !a.torn_down.load(Ordering::Acquire))
        .filter(|a| category.is_none_or(|c| a.control().state == c))
        .map(|a| info_json(a, true))
        .collect()
}
