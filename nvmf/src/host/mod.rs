//! The NVMe/TCP initiator.
//!
//! Two ways to use it:
//!
//! **As bdevs** ([`attach_controller`] / [`detach_controller`]): connects an
//! admin queue and one IO queue per reactor, and registers one bdev per
//! namespace, named `NAMEn<nsid>` as SPDK names them. Each reactor's bdev
//! channel drives that reactor's IO queue; keep alive runs on the reactor
//! that attached. IOs above the controller's MDTS are split into several
//! commands (each with the IO's flags), no queue carries more commands than
//! its negotiated size less one, and IOs beyond that wait in a bounded FIFO
//! ([`MAX_QUEUED_IOS`]); an attach whose namespaces cannot all become bdevs
//! (a name or UUID in use) fails and leaves nothing behind. A lost
//! connection is ridden out as [`ReconnectOpts`] says (reconnect, failover
//! to another path, IO waiting or failing; see `bdev_nvme`).
//!
//! **Directly** (for load generators such as `nvraid-perf`):
//!
//! 1. Off the reactors (a plain thread: connecting blocks), call
//!    [`connect`] with [`ConnectParams`] and the number of IO queues. It
//!    returns a [`Session`]: the controller's [`CtrlInfo`] (namespaces with
//!    block size and count, MDTS, in-capsule size), the admin queue and the
//!    IO queues as [`QpairParts`] (plain, `Send` data: a connected socket
//!    and what was negotiated).
//! 2. Send each `QpairParts` to the reactor that will own it and turn it
//!    into a [`HostQpair`] there with [`HostQpair::from_parts`].
//! 3. Submit with [`HostQpair::read`], [`HostQpair::write`],
//!    [`HostQpair::flush`], [`HostQpair::write_zeroes`],
//!    [`HostQpair::deallocate`] (or any command with [`HostQpair::submit`]);
//!    each takes a `tag` that comes back in its [`Completion`], and data
//!    buffers are [`DmaBuf`]s (a read's buffer comes back filled in the
//!    completion; a write's comes back too, for reuse). Submission never
//!    blocks: a full queue answers [`SubmitError::Full`].
//! 4. Call [`HostQpair::poll`] from a poller; it sends queued PDUs, reads
//!    what arrived and calls the closure once per completed command. It
//!    allocates nothing per command.
//! 5. Keep the controller alive: own the admin queue with
//!    [`AdminQpair::new`] on some reactor and call [`AdminQpair::poll`]
//!    from a poller (it sends Keep Alive every KATO/4).
//!
//! Digests (`hdgst`/`ddgst`) are negotiated at connect; writes up to the
//! controller's in-capsule size go in the command capsule, larger ones
//! through R2T/H2CData; reads arrive as C2HData (with the SUCCESS flag the
//! connect asks for by disabling SQ flow control).

mod bdev_nvme;
mod ns_queue;
mod qpair;

pub use bdev_nvme::{
    add_failover_path, add_multipath_path, attach_controller, attach_controller_with, controllers_json,
    detach_controller, failover_paths_config, local_io_paths, multipath_policies_config, multipath_policy,
    reset_controller, set_multipath_policy, set_preferred_path, AttachParams, Policy, ReconnectOpts, Selector,
};
pub use ns_queue::MAX_QUEUED_IOS;
pub use qpair::{AdminQpair, Completion, Data, HostError, HostQpair, QpairParts, SubmitError};

pub use ::bdev::DmaBuf;
use nvme_spec::fabrics::{ConnectCommand, ConnectData, PropertyGetCommand, PropertySetCommand, PropertySize};
use nvme_spec::features::{FeatureId, FeatureParams, NumberOfQueues};
use nvme_spec::identify::{
    decode_ns_id_descriptors, Cns, IdentifyController, IdentifyNamespace, IdentifyParams, NamespaceList, NsIdDescriptor,
};
use nvme_spec::log::{DiscoveryLogEntry, DiscoveryLogHeader, GetLogPageParams, LogPageId};
use nvme_spec::regs::{offset, Cap, Cc, Csts};
use nvme_spec::text::{read_ascii_padded, read_nqn, write_nqn};
use nvme_spec::{AdminOpcode, Sqe, Status, U16};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};
use uuid::Uuid;
use zerocopy::{FromBytes, IntoBytes};

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    pub traddr: String,
    pub trsvcid: String,
    pub subnqn: String,
    pub hostnqn: String,
    /// Host identifier sent in Connect (a random one if None).
    pub hostid: Option<[u8; 16]>,
    pub hdgst: bool,
    pub ddgst: bool,
    /// Keep alive timeout asked for (0: none).
    pub kato_ms: u32,
    /// Entries per IO queue asked for, at most the controller's CAP.MQES
    /// plus one; a queue of N entries carries at most N - 1 commands.
    pub io_queue_entries: u16,
    /// How long any step of the connect may take.
    pub timeout: Duration,
    /// TLS 1.3 with this PSK (a keyring key in the interchange format).
    pub psk: Option<std::sync::Arc<crate::keyring::Key>>,
}

/// The host NQN used when none is given.
pub const DEFAULT_HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-6e7672616964";

impl ConnectParams {
    pub fn new(traddr: &str, trsvcid: &str, subnqn: &str) -> Self {
        ConnectParams {
            traddr: traddr.to_string(),
            trsvcid: trsvcid.to_string(),
            subnqn: subnqn.to_string(),
            hostnqn: DEFAULT_HOSTNQN.to_string(),
            hostid: None,
            hdgst: false,
            ddgst: false,
            kato_ms: 10_000,
            io_queue_entries: 128,
            timeout: Duration::from_secs(5),
            psk: None,
        }
    }
}

/// One namespace as Identify describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsInfo {
    pub nsid: u32,
    pub block_size: u32,
    pub num_blocks: u64,
    pub uuid: Option<Uuid>,
    pub nguid: Option<[u8; 16]>,
    /// DLFEAT says deallocated blocks read back as zeroes.
    pub deallocated_reads_zeroes: bool,
}

/// What the controller said about itself.
#[derive(Debug, Clone)]
pub struct CtrlInfo {
    pub cntlid: u16,
    pub subnqn: String,
    pub serial_number: String,
    pub model_number: String,
    pub firmware_revision: String,
    /// Largest transfer in bytes (MDTS), 0 if unlimited.
    pub max_transfer_bytes: u32,
    /// In-capsule data the IO queues accept.
    pub in_capsule_bytes: u32,
    pub cap: u64,
    pub vs: u32,
    pub namespaces: Vec<NsInfo>,
    pub kato_ms: u32,
    /// Identify VWC bit 0: a volatile write cache is present, so completed
    /// writes need FUA or a flush to be durable.
    pub volatile_write_cache: bool,
    /// CMIC bit 3: the controller reports ANA states (log page 0Ch).
    pub ana_reporting: bool,
    /// ANATT: seconds a namespace may stay in the ANA change state.
    pub anatt_sec: u8,
    /// The ANA state of each NSID through this controller when it
    /// connected (`nvme_spec::log::ana_state`); empty without ANA reporting.
    pub ana: Vec<(u32, u8)>,
}

/// A connected controller, ready to be spread over reactors.
pub struct Session {
    pub info: CtrlInfo,
    pub admin: QpairParts,
    pub io: Vec<QpairParts>,
}

/// Runs one command on a queue owned by this (non-reactor) thread.
pub(crate) fn sync_cmd(
    qp: &mut HostQpair,
    sqe: Sqe,
    data: qpair::Data,
    timeout: Duration,
) -> Result<Completion, HostError> {
    qp.submit(sqe, data, 0).map_err(|e| HostError::Protocol(format!("submit: {e:?}")))?;
    let t0 = Instant::now();
    let mut got = None;
    loop {
        qp.poll(|c| got = Some(c))?;
        if let Some(c) = got.take() {
            return Ok(c);
        }
        if t0.elapsed() > timeout {
            return Err(HostError::Timeout);
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn ok(c: Completion, what: &str) -> Result<Completion, HostError> {
    if c.status.is_success() {
        Ok(c)
    } else {
        Err(HostError::Status(what.to_string(), c.status))
    }
}

fn open(p: &ConnectParams) -> Result<TcpStream, HostError> {
    let port: u16 = p.trsvcid.parse().map_err(|_| HostError::Protocol(format!("bad port '{}'", p.trsvcid)))?;
    let addr = (p.traddr.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| HostError::Io(e.to_string()))?
        .next()
        .ok_or_else(|| HostError::Io(format!("{} resolves to nothing", p.traddr)))?;
    TcpStream::connect_timeout(&addr, p.timeout).map_err(|e| HostError::Io(format!("connect {addr}: {e}")))
}

/// Opens one queue: TCP connect, ICReq/ICResp, then the fabrics Connect.
/// Returns the queue and the controller id. Blocking: not for reactors.
pub fn connect_queue(
    p: &ConnectParams,
    qid: u16,
    entries: u16,
    cntlid: u16,
    hostid: [u8; 16],
) -> Result<(HostQpair, u16), HostError> {
    let stream = crate::tls::secure(open(p)?, p)?;
    let parts = QpairParts::handshake(stream, qid, entries, p.hdgst, p.ddgst, p.timeout)?;
    let mut qp = HostQpair::from_parts(parts);
    let mut cmd = ConnectCommand::new(0, qid, entries, if qid == 0 { p.kato_ms } else { 0 });
    // The host never needs SQ flow control here: it lets C2HData carry SUCCESS.
    cmd.cattr |= nvme_spec::fabrics::cattr::DISABLE_SQ_FLOW_CONTROL;
    let mut data = ConnectData::zeroed();
    data.hostid = hostid;
    data.cntlid = U16::new(cntlid);
    write_nqn(&mut data.subnqn, &p.subnqn).map_err(|e| HostError::Protocol(format!("subnqn: {e}")))?;
    write_nqn(&mut data.hostnqn, &p.hostnqn).map_err(|e| HostError::Protocol(format!("hostnqn: {e}")))?;
    let buf = DmaBuf::alloc(1024).ok_or(HostError::NoMemory)?;
    buf.copy_from(0, data.as_bytes());
    let c = sync_cmd(&mut qp, cmd.to_sqe(), qpair::Data::Out(buf.slice(0, 1024)), p.timeout)?;
    let c = ok(c, "Connect")?;
    Ok((qp, nvme_spec::fabrics::connect_cntlid(c.dw0)))
}

fn prop_get(qp: &mut HostQpair, off: u32, size: PropertySize, t: Duration) -> Result<u64, HostError> {
    let c = sync_cmd(qp, PropertyGetCommand::new(0, off, size).to_sqe(), qpair::Data::None, t)?;
    let c = ok(c, "Property Get")?;
    Ok(u64::from(c.dw0) | (u64::from(c.dw1) << 32))
}

fn identify(qp: &mut HostQpair, cns: Cns, nsid: u32, t: Duration) -> Result<Vec<u8>, HostError> {
    let mut sqe = Sqe::new(AdminOpcode::IDENTIFY.0, 0);
    IdentifyParams { cns, cntid: 0, csi: 0, nsid }.write_to(&mut sqe);
    let buf = DmaBuf::zeroed(4096).ok_or(HostError::NoMemory)?;
    let c = ok(sync_cmd(qp, sqe, qpair::Data::In(buf.slice(0, 4096)), t)?, "Identify")?;
    Ok(c.buf.map(|b| b.to_vec()).unwrap_or_default())
}

/// Brings up the admin queue: Connect, CC.EN, wait for CSTS.RDY, Identify.
fn bring_up(p: &ConnectParams, hostid: [u8; 16]) -> Result<(HostQpair, CtrlInfo), HostError> {
    let t = p.timeout;
    let (mut admin, cntlid) = connect_queue(p, 0, 32, nvme_spec::log::CNTLID_DYNAMIC, hostid)?;
    let cap = prop_get(&mut admin, offset::CAP, PropertySize::EightBytes, t)?;
    let vs = prop_get(&mut admin, offset::VS, PropertySize::FourBytes, t)? as u32;
    let cc = Cc(0).with_en(true).with_iosqes(6).with_iocqes(4);
    let set = PropertySetCommand::new(0, offset::CC, PropertySize::FourBytes, u64::from(cc.0));
    ok(sync_cmd(&mut admin, set.to_sqe(), qpair::Data::None, t)?, "Property Set CC")?;
    let t0 = Instant::now();
    while !Csts(prop_get(&mut admin, offset::CSTS, PropertySize::FourBytes, t)? as u32).rdy() {
        if t0.elapsed() > t {
            return Err(HostError::Timeout);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let idc = identify(&mut admin, Cns::CONTROLLER, 0, t)?;
    let id = IdentifyController::read_from_bytes(&idc[..4096.min(idc.len())])
        .map_err(|_| HostError::Protocol("short Identify Controller".into()))?;
    if id.cntlid.get() != cntlid {
        return Err(HostError::Protocol("Identify cntlid differs from Connect's".into()));
    }
    let mps_min = 4096u64 << Cap(cap).mpsmin();
    let max_transfer_bytes = if id.mdts == 0 { 0 } else { (mps_min << id.mdts).min(u64::from(u32::MAX)) as u32 };
    let ioccsz = id.ioccsz.get();
    let info = CtrlInfo {
        cntlid,
        subnqn: read_nqn(&id.subnqn).unwrap_or_default().to_string(),
        serial_number: read_ascii_padded(&id.sn).unwrap_or_default().to_string(),
        model_number: read_ascii_padded(&id.mn).unwrap_or_default().to_string(),
        firmware_revision: read_ascii_padded(&id.fr).unwrap_or_default().to_string(),
        max_transfer_bytes,
        in_capsule_bytes: (ioccsz * 16).saturating_sub(64),
        cap,
        vs,
        namespaces: Vec::new(),
        kato_ms: p.kato_ms,
        volatile_write_cache: id.vwc & nvme_spec::identify::vwc::PRESENT != 0,
        ana_reporting: id.cmic & nvme_spec::identify::cmic::ANA_REPORTING != 0,
        anatt_sec: id.anatt,
        ana: Vec::new(),
    };
    Ok((admin, info))
}

fn scan_namespaces(admin: &mut HostQpair, t: Duration) -> Result<Vec<NsInfo>, HostError> {
    let list = identify(admin, Cns::ACTIVE_NAMESPACE_LIST, 0, t)?;
    let list = NamespaceList::read_from_bytes(&list[..4096.min(list.len())])
        .map_err(|_| HostError::Protocol("short namespace list".into()))?;
    let mut out = Vec::new();
    for nsid in list.iter() {
        let d = identify(admin, Cns::NAMESPACE, nsid, t)?;
        let ns = IdentifyNamespace::read_from_bytes(&d[..4096.min(d.len())])
            .map_err(|_| HostError::Protocol("short Identify Namespace".into()))?;
        let block_size = ns.formatted_lba_format().and_then(|f| f.block_size()).unwrap_or(0);
        if block_size == 0 || ns.nsze.get() == 0 {
            continue;
        }
        let mut info = NsInfo {
            nsid,
            block_size,
            num_blocks: ns.nsze.get(),
            uuid: None,
            nguid: None,
            deallocated_reads_zeroes: ns.dlfeat & 0b111 == 0b001,
        };
        if ns.nguid != [0; 16] {
            info.nguid = Some(ns.nguid);
        }
        if let Ok(descs) = identify(admin, Cns::NAMESPACE_ID_DESCRIPTORS, nsid, t) {
            for d in decode_ns_id_descriptors(&descs).flatten() {
                match d {
                    NsIdDescriptor::Uuid(u) => info.uuid = Some(Uuid::from_bytes(u)),
                    NsIdDescriptor::Nguid(g) => info.nguid = Some(g),
                    _ => {}
                }
            }
        }
        out.push(info);
    }
    Ok(out)
}

/// Connects a controller: admin queue, enable, identify, namespaces, then
/// `num_io_queues` IO queues. Blocking: call it from a plain thread.
pub fn connect(p: &ConnectParams, num_io_queues: u16) -> Result<Session, HostError> {
    let hostid = p.hostid.unwrap_or_else(|| *Uuid::new_v4().as_bytes());
    let (mut admin, mut info) = bring_up(p, hostid)?;
    let t = p.timeout;
    let mut sqe = Sqe::new(AdminOpcode::SET_FEATURES.0, 0);
    let nq = NumberOfQueues { io_sqs: u32::from(num_io_queues.max(1)), io_cqs: u32::from(num_io_queues.max(1)) };
    FeatureParams { fid: FeatureId::NUMBER_OF_QUEUES, save: false, select: 0, value: nq.to_dword() }.write_to(&mut sqe);
    let c = ok(sync_cmd(&mut admin, sqe, qpair::Data::None, t)?, "Set Features (number of queues)")?;
    let granted = NumberOfQueues::from_dword(c.dw0).io_sqs;
    if u32::from(num_io_queues) > granted {
        return Err(HostError::Protocol(format!("controller grants {granted} IO queues, {num_io_queues} wanted")));
    }
    info.namespaces = scan_namespaces(&mut admin, t)?;
    if info.ana_reporting {
        info.ana = enable_ana(&mut admin, t)?;
    }
    let mut io = Vec::new();
    // CAP.MQES bounds every queue's size (0's based).
    let entries = p.io_queue_entries.min(Cap(info.cap).mqes().saturating_add(1)).max(2);
    for qid in 1..=num_io_queues {
        let (qp, _) = connect_queue(p, qid, entries, info.cntlid, hostid)?;
        let mut qp = qp;
        qp.set_in_capsule_limit(info.in_capsule_bytes);
        io.push(qp.into_parts()?);
    }
    Ok(Session { info, admin: admin.into_parts()?, io })
}

/// Asks for ANA change notices (Set Features, Asynchronous Event
/// Configuration) and reads the ANA log: the state of each NSID.
fn enable_ana(admin: &mut HostQpair, t: Duration) -> Result<Vec<(u32, u8)>, HostError> {
    let mut sqe = Sqe::new(AdminOpcode::SET_FEATURES.0, 0);
    let value = nvme_spec::features::async_event_config::ANA_CHANGE_NOTICES;
    FeatureParams { fid: FeatureId::ASYNC_EVENT_CONFIG, save: false, select: 0, value }.write_to(&mut sqe);
    ok(sync_cmd(admin, sqe, qpair::Data::None, t)?, "Set Features (asynchronous event configuration)")?;
    let buf = DmaBuf::zeroed(ANA_LOG_BYTES).ok_or(HostError::NoMemory)?;
    let c = ok(sync_cmd(admin, ana_log_sqe(), qpair::Data::In(buf.slice(0, ANA_LOG_BYTES)), t)?, "Get Log Page (ANA)")?;
    parse_ana_log(&c.buf.map(|b| b.to_vec()).unwrap_or_default())
}

/// Bytes of the ANA log the initiator reads: the header, and groups with
/// their NSIDs for up to about a thousand namespaces.
pub(crate) const ANA_LOG_BYTES: usize = 4096;

/// Get Log Page for the ANA log with its NSID lists, clearing the
/// asynchronous event (RAE 0) so the next change is reported.
pub(crate) fn ana_log_sqe() -> Sqe {
    let mut sqe = Sqe::new(AdminOpcode::GET_LOG_PAGE.0, 0);
    GetLogPageParams {
        lid: LogPageId::ASYMMETRIC_NAMESPACE_ACCESS,
        lsp: 0,
        rae: false,
        len_bytes: ANA_LOG_BYTES as u64,
        offset_bytes: 0,
        lsi: 0,
        nsid: 0,
    }
    .write_to(&mut sqe);
    sqe
}

/// The (NSID, ANA state) pairs an ANA log page lists. A page cut short
/// (more NSIDs than were read) yields the pairs it holds whole.
pub(crate) fn parse_ana_log(page: &[u8]) -> Result<Vec<(u32, u8)>, HostError> {
    use nvme_spec::log::{AnaGroupDescriptor, AnaLogHeader};
    let (h, mut rest) =
        AnaLogHeader::read_from_prefix(page).map_err(|_| HostError::Protocol("short ANA log".into()))?;
    let mut out = Vec::new();
    for _ in 0..h.ngrps.get() {
        let Ok((g, after)) = AnaGroupDescriptor::read_from_prefix(rest) else { break };
        let state = g.state & 0x0F;
        let n = (g.nnsids.get() as usize).min(after.len() / 4);
        out.extend(after[..n * 4].chunks_exact(4).map(|b| (u32::from_le_bytes([b[0], b[1], b[2], b[3]]), state)));
        if n < g.nnsids.get() as usize {
            break;
        }
        rest = &after[n * 4..];
    }
    Ok(out)
}

/// One discovery log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryEntry {
    pub subnqn: String,
    pub traddr: String,
    pub trsvcid: String,
    pub subtype: u8,
}

/// Reads the discovery log of the discovery controller at `p` (its
/// `subnqn` should be the discovery NQN). Blocking.
pub fn discover(p: &ConnectParams) -> Result<Vec<DiscoveryEntry>, HostError> {
    let hostid = p.hostid.unwrap_or_else(|| *Uuid::new_v4().as_bytes());
    let (mut admin, _) = bring_up(p, hostid)?;
    let read = |admin: &mut HostQpair, off: u64, len: u64| -> Result<Vec<u8>, HostError> {
        let mut sqe = Sqe::new(AdminOpcode::GET_LOG_PAGE.0, 0);
        GetLogPageParams {
            lid: LogPageId::DISCOVERY,
            lsp: 0,
            rae: false,
            len_bytes: len,
            offset_bytes: off,
            lsi: 0,
            nsid: 0,
        }
        .write_to(&mut sqe);
        let buf = DmaBuf::zeroed(len as usize).ok_or(HostError::NoMemory)?;
        let c = ok(sync_cmd(admin, sqe, qpair::Data::In(buf.slice(0, len as usize)), p.timeout)?, "Get Log Page")?;
        Ok(c.buf.map(|b| b.to_vec()).unwrap_or_default())
    };
    let head = read(&mut admin, 0, 1024)?;
    let h = DiscoveryLogHeader::read_from_bytes(&head[..1024.min(head.len())])
        .map_err(|_| HostError::Protocol("short discovery log".into()))?;
    let n = h.numrec.get().min(64);
    let mut out = Vec::new();
    for i in 0..n {
        let e = read(&mut admin, 1024 + i * 1024, 1024)?;
        let e = DiscoveryLogEntry::read_from_bytes(&e[..1024.min(e.len())])
            .map_err(|_| HostError::Protocol("short discovery entry".into()))?;
        out.push(DiscoveryEntry {
            subnqn: read_nqn(&e.subnqn).unwrap_or_default().to_string(),
            traddr: read_ascii_padded(&e.traddr).unwrap_or_default().to_string(),
            trsvcid: read_ascii_padded(&e.trsvcid).unwrap_or_default().to_string(),
            subtype: e.subtype,
        });
    }
    Ok(out)
}

/// Maps a failed NVMe status to the bdev layer's error.
pub(crate) fn status_io_error(s: Status) -> ::bdev::IoError {
    ::bdev::IoError::Nvme { sct: s.sct, sc: s.sc }
}
