//! NVMe bdev methods (`bdev_nvme_*`): attach a controller and get one bdev
//! per namespace (`NAMEn1`, ...), list and detach controllers. The TCP
//! transport is served by the NVMe/TCP initiator in `nvmf::host`; PCIe by
//! the userspace VFIO driver in `nvme`. `trtype: "SIM"` attaches the seeded
//! simulated controller of `nvme::sim` — a test transport for daemon-level
//! tests without hardware (`sim_seed`, `sim_num_blocks`, `sim_block_size`).

use super::unsupported::{at, Accepted};
use super::{bdev_error, decode, sync_call, Ctx, Handler, UnsupportedTable};
use crate::jsonrpc::{RpcError, INVALID_PARAMS};
use crate::server::Reply;
use ::nvmf::host::{self, AttachParams};
use serde::Deserialize;
use serde_json::Value;
use std::sync::{Arc, Mutex};

pub const METHODS: &[(&str, Handler)] = &[
    ("bdev_nvme_attach_controller", bdev_nvme_attach_controller),
    ("bdev_nvme_detach_controller", bdev_nvme_detach_controller),
    ("bdev_nvme_get_controllers", bdev_nvme_get_controllers),
    ("bdev_nvme_set_options", bdev_nvme_set_options),
    ("bdev_nvme_set_hotplug", bdev_nvme_set_hotplug),
    ("bdev_nvme_reset_controller", bdev_nvme_reset_controller),
    ("bdev_nvme_set_multipath_policy", bdev_nvme_set_multipath_policy),
    ("bdev_nvme_get_io_paths", bdev_nvme_get_io_paths),
    ("bdev_nvme_set_preferred_path", bdev_nvme_set_preferred_path),
];

const NO_DHCHAP: &str = "DH-HMAC-CHAP authentication";
const NO_PRIORITIES: &str = "weighted round robin arbitration";
const NO_MULTIPATH: &str = "multipath options here (bdev_nvme_set_multipath_policy sets a bdev's policy; an \
                            optimized path is always failed back to)";
const NO_PATH_DETACH: &str = "detaching one path of a controller; give the controller name alone";

/// Parameters SPDK defines for these methods whose feature nvraid lacks
/// (see `unsupported`). For `bdev_nvme_set_options` the accepted values are
/// SPDK's defaults, which its save_config writes.
pub(crate) const UNSUPPORTED: UnsupportedTable = &[
    (
        "bdev_nvme_attach_controller",
        &[
            at("priority", Accepted::Absent, "socket priorities"),
            at("hostaddr", Accepted::Absent, "binding the initiator to a local address"),
            at("hostsvcid", Accepted::Absent, "binding the initiator to a local port"),
            at("prchk_reftag", Accepted::Bool(false), "protection information checking"),
            at("prchk_guard", Accepted::Bool(false), "protection information checking"),
            at("fabrics_connect_timeout_us", Accepted::Absent, "a configurable fabrics connect timeout"),
            at("max_bdevs", Accepted::Int(128), "cap on the bdevs one controller creates"),
            at("dhchap_key", Accepted::Absent, NO_DHCHAP),
            at("dhchap_ctrlr_key", Accepted::Absent, NO_DHCHAP),
            at("allow_unrecognized_csi", Accepted::Bool(false), "namespaces of other command sets"),
            at("multipath_opts.policy", Accepted::Str("active_passive"), NO_MULTIPATH),
            at("multipath_opts.selector", Accepted::Absent, NO_MULTIPATH),
            at("multipath_opts.min_io", Accepted::Absent, NO_MULTIPATH),
            at("disable_sq_flow_control", Accepted::Bool(false), "way to turn off SQ flow control"),
        ],
    ),
    (
        "bdev_nvme_detach_controller",
        &[
            at("trtype", Accepted::Absent, NO_PATH_DETACH),
            at("traddr", Accepted::Absent, NO_PATH_DETACH),
            at("adrfam", Accepted::Absent, NO_PATH_DETACH),
            at("trsvcid", Accepted::Absent, NO_PATH_DETACH),
            at("subnqn", Accepted::Absent, NO_PATH_DETACH),
            at("hostaddr", Accepted::Absent, NO_PATH_DETACH),
            at("hostsvcid", Accepted::Absent, NO_PATH_DETACH),
        ],
    ),
    (
        "bdev_nvme_set_options",
        &[
            at("arbitration_burst", Accepted::Int(0), NO_PRIORITIES),
            at("low_priority_weight", Accepted::Int(0), NO_PRIORITIES),
            at("medium_priority_weight", Accepted::Int(0), NO_PRIORITIES),
            at("high_priority_weight", Accepted::Int(0), NO_PRIORITIES),
            at("nvme_adminq_poll_period_us", Accepted::Int(10_000), "configurable admin queue poll period"),
            at("nvme_ioq_poll_period_us", Accepted::Int(0), "IO queue poll period (it polls every loop)"),
            at("io_queue_requests", Accepted::Int(0), "request count apart from the IO queue depth"),
            at("delay_cmd_submit", Accepted::Bool(true), "way to turn off batched submission"),
            at("bdev_retry_count", Accepted::Int(3), "bdev-layer retry apart from transport_retry_count"),
            at("transport_ack_timeout", Accepted::Int(0), "configurable transport ACK timeout"),
            at("disable_auto_failback", Accepted::Bool(false), NO_MULTIPATH),
            at("generate_uuids", Accepted::Bool(false), "generated namespace UUIDs"),
            at("transport_tos", Accepted::Int(0), "RDMA"),
            at("nvme_error_stat", Accepted::Bool(false), "NVMe error statistics"),
            at("rdma_srq_size", Accepted::Int(0), "RDMA"),
            at("io_path_stat", Accepted::Bool(false), "per-path IO statistics"),
            at("allow_accel_sequence", Accepted::Bool(false), "accel framework"),
            at("rdma_max_cq_size", Accepted::Int(0), "RDMA"),
            at("rdma_cm_event_timeout_ms", Accepted::Int(0), "RDMA"),
            at("dhchap_digests", Accepted::Strs(&["sha256", "sha384", "sha512"]), NO_DHCHAP),
            at(
                "dhchap_dhgroups",
                Accepted::Strs(&["null", "ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192"]),
                NO_DHCHAP,
            ),
            at("rdma_umr_per_io", Accepted::Bool(false), "RDMA"),
            at("tcp_connect_timeout_ms", Accepted::Int(0), "configurable TCP connect timeout"),
            at("multipath_opts.policy", Accepted::Str("active_passive"), NO_MULTIPATH),
            at("multipath_opts.selector", Accepted::Absent, NO_MULTIPATH),
            at("multipath_opts.min_io", Accepted::Absent, NO_MULTIPATH),
        ],
    ),
];

/// The controller options `bdev_nvme_set_options` set, used by every later
/// PCIe (and SIM) attach; set-wide, as SPDK's are process-wide.
#[derive(Default)]
struct NvmeOptions(Mutex<Option<::nvme::CtrlrOpts>>);

/// What `bdev_nvme_set_options` set, if it was called.
fn set_options() -> Option<::nvme::CtrlrOpts> {
    let opts = reactor::global::<NvmeOptions>();
    let g = opts.0.lock().unwrap_or_else(|e| e.into_inner());
    g.clone()
}

fn ctrlr_opts() -> ::nvme::CtrlrOpts {
    set_options().unwrap_or_default()
}

/// The reconnect settings `bdev_nvme_set_options` set for TCP controllers
/// attached afterwards without their own (SPDK's defaults: no reconnect).
#[derive(Default)]
struct ReconnectDefaults(Mutex<host::ReconnectOpts>);

fn reconnect_defaults() -> host::ReconnectOpts {
    *reactor::global::<ReconnectDefaults>().0.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Deserialize)]
struct Attach {
    name: String,
    trtype: String,
    traddr: String,
    adrfam: Option<String>,
    trsvcid: Option<String>,
    subnqn: Option<String>,
    hostnqn: Option<String>,
    #[serde(default)]
    hdgst: bool,
    #[serde(default)]
    ddgst: bool,
    /// TLS PSK: a keyring key name (NVMe/TCP only).
    psk: Option<String>,
    /// IO queues to create (PCIe and SIM; NVMe/TCP creates one per reactor).
    num_io_queues: Option<u32>,
    /// `disable` (default), or `failover`: a controller of this name that
    /// exists gains this address as an alternate path (TCP).
    multipath: Option<String>,
    /// What a TCP controller does when its connection is lost (SPDK's;
    /// absent: as `bdev_nvme_set_options` set them, by default no reconnect).
    ctrlr_loss_timeout_sec: Option<i32>,
    reconnect_delay_sec: Option<u32>,
    fast_io_fail_timeout_sec: Option<u32>,
    /// Test transport SIM: the simulated controller's seed and geometry.
    sim_seed: Option<u64>,
    sim_num_blocks: Option<u64>,
    sim_block_size: Option<u32>,
}

fn bdev_nvme_attach_controller(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let p: Attach = match decode(params, &reply) {
        Ok(p) => p,
        Err(e) => return reply.send(Err(e)),
    };
    let tcp = p.trtype.eq_ignore_ascii_case("tcp");
    let (failover, multipath) = match p.multipath.as_deref() {
        None => (false, false),
        Some(m) if m.eq_ignore_ascii_case("disable") => (false, false),
        Some(m) if m.eq_ignore_ascii_case("failover") && tcp => (true, false),
        Some(m) if m.eq_ignore_ascii_case("multipath") && tcp => (false, true),
        Some(m) if m.eq_ignore_ascii_case("multipath") || m.eq_ignore_ascii_case("failover") => {
            return reply.send(Err(RpcError::new(
                INVALID_PARAMS,
                format!(
                    "bdev_nvme_attach_controller: multipath \"{m}\" is not supported for trtype {} (nvraid has \
                     several paths for NVMe/TCP controllers only); use \"disable\"",
                    p.trtype
                ),
            )))
        }
        Some(m) => {
            return reply.send(Err(RpcError::invalid_params(format!(
                "multipath \"{m}\" is not one of disable, failover, multipath"
            ))))
        }
    };
    if p.trtype.eq_ignore_ascii_case("pcie") || p.trtype.eq_ignore_ascii_case("sim") {
        let reconnect = [p.ctrlr_loss_timeout_sec.map(i64::from), p.reconnect_delay_sec.map(i64::from)]
            .into_iter()
            .chain([p.fast_io_fail_timeout_sec.map(i64::from)])
            .any(|v| v.is_some_and(|v| v != 0));
        if reconnect {
            // A local controller is reset by its driver, not reconnected.
            return reply.send(Err(RpcError::new(
                INVALID_PARAMS,
                format!(
                    "bdev_nvme_attach_controller: ctrlr_loss_timeout_sec, reconnect_delay_sec and \
                     fast_io_fail_timeout_sec apply to NVMe/TCP controllers; trtype {} takes only 0",
                    p.trtype
                ),
            )));
        }
        if p.psk.is_some() {
            return reply.send(Err(RpcError::invalid_params(format!(
                "psk (TLS) applies to NVMe/TCP controllers, not to trtype {}",
                p.trtype
            ))));
        }
        return attach_local(p, reply);
    }
    if !p.trtype.eq_ignore_ascii_case("tcp") {
        return reply.send(Err(RpcError::invalid_params(format!(
            "trtype {} is not supported (PCIe, TCP, and the test transport SIM are)",
            p.trtype
        ))));
    }
    let Some(subnqn) = p.subnqn else {
        return reply.send(Err(RpcError::invalid_params("subnqn is required for TCP")));
    };
    let psk = match p.psk.as_deref().map(|n| ::nvmf::keyring::Keyring::get().find(n).ok_or(n)).transpose() {
        Ok(k) => k,
        Err(n) => return reply.send(Err(RpcError::invalid_params(format!("psk: key {n} not in the keyring")))),
    };
    if p.num_io_queues.is_some() {
        return reply.send(Err(RpcError::new(
            INVALID_PARAMS,
            "bdev_nvme_attach_controller: num_io_queues is not supported for NVMe/TCP (nvraid connects one IO \
             queue per reactor); leave it out",
        )));
    }
    if set_options().is_some() {
        // Said, not hidden: bdev_nvme_set_options' timeouts and retries
        // reach the controllers nvraid drives itself; its NVMe/TCP
        // initiator has no IO timeout (only its reconnect settings apply).
        tracing::warn!(
            name = p.name,
            "bdev_nvme_set_options (timeouts, retries) applies to PCIe controllers, not to this NVMe/TCP one; \
             its reconnect settings do"
        );
    }
    let exists = !host::controllers_json(Some(&p.name)).is_empty();
    let adding_path = failover && exists;
    let adding_mp_path = multipath && exists;
    let asked =
        p.ctrlr_loss_timeout_sec.is_some() || p.reconnect_delay_sec.is_some() || p.fast_io_fail_timeout_sec.is_some();
    if adding_path && asked {
        // A path shares its controller's settings; taking others here would
        // leave them unapplied.
        return reply.send(Err(RpcError::new(
            INVALID_PARAMS,
            format!(
                "bdev_nvme_attach_controller: {} exists, so this adds a failover path, which uses the \
                 controller's ctrlr_loss_timeout_sec, reconnect_delay_sec and fast_io_fail_timeout_sec; \
                 leave them out",
                p.name
            ),
        )));
    }
    let defaults = reconnect_defaults();
    let reconnect = host::ReconnectOpts {
        keep_alive_timeout_ms: defaults.keep_alive_timeout_ms,
        ctrlr_loss_timeout_sec: p.ctrlr_loss_timeout_sec.unwrap_or(defaults.ctrlr_loss_timeout_sec),
        reconnect_delay_sec: p.reconnect_delay_sec.unwrap_or(defaults.reconnect_delay_sec),
        fast_io_fail_timeout_sec: p.fast_io_fail_timeout_sec.unwrap_or(defaults.fast_io_fail_timeout_sec),
    };
    let params = AttachParams {
        name: p.name,
        trtype: p.trtype,
        traddr: p.traddr,
        adrfam: p.adrfam,
        trsvcid: p.trsvcid.unwrap_or_else(|| "4420".into()),
        subnqn,
        hostnqn: p.hostnqn,
        hdgst: p.hdgst,
        ddgst: p.ddgst,
        psk,
    };
    let reply_names = move |r: Result<Vec<String>, ::bdev::BdevError>| {
        reply.send(r.map(|names| serde_json::json!(names)).map_err(bdev_error))
    };
    if adding_path {
        return host::add_failover_path(params, reply_names);
    }
    if adding_mp_path {
        // A controller of its own (its own reconnect settings, as in SPDK)
        // behind the existing namespace bdevs.
        return host::add_multipath_path(params, reconnect, reply_names);
    }
    host::attach_controller_with(params, reconnect, reply_names);
}

#[derive(Deserialize)]
struct SetMultipathPolicy {
    /// The namespace bdev.
    name: String,
    policy: String,
    selector: Option<String>,
    rr_min_io: Option<u32>,
}

/// SPDK's `bdev_nvme_set_multipath_policy`: how an NVMe/TCP namespace bdev
/// spreads IO over its controller's paths (`active_passive`, or
/// `active_active` with selector `round_robin` (`rr_min_io` IOs a turn) or
/// `queue_depth`).
fn bdev_nvme_set_multipath_policy(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let p: SetMultipathPolicy = match decode(params, &reply) {
        Ok(p) => p,
        Err(e) => return reply.send(Err(e)),
    };
    let policy = match host::Policy::parse(&p.policy, p.selector.as_deref(), p.rr_min_io) {
        Ok(x) => x,
        Err(e) => return reply.send(Err(RpcError::invalid_params(format!("bdev_nvme_set_multipath_policy: {e}")))),
    };
    reply.send(host::set_multipath_policy(&p.name, policy).map(|()| Value::Bool(true)).map_err(bdev_error));
}

#[derive(Deserialize, Default)]
struct GetIoPaths {
    /// Only this namespace bdev's paths.
    name: Option<String>,
}

/// SPDK's `bdev_nvme_get_io_paths`: for each reactor with NVMe/TCP IO
/// queues (SPDK's NVMe poll groups; the reactor named as
/// `thread_get_stats` names it), the paths of each namespace bdev channel
/// there as that channel sees them now (`current`: the path it sends IO on).
fn bdev_nvme_get_io_paths(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let p: GetIoPaths = match decode(params, &reply) {
        Ok(p) => p,
        Err(e) => return reply.send(Err(e)),
    };
    let groups = Arc::new(Mutex::new(Vec::new()));
    let collect = groups.clone();
    reactor::for_each_reactor(
        Arc::new(move || {
            let Some(io_paths) = host::local_io_paths(p.name.as_deref()) else { return };
            let id = reactor::current().unwrap_or(0);
            let thread = if id == 0 { "app_thread".to_string() } else { format!("reactor_{id}") };
            collect
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(serde_json::json!({"thread": thread, "io_paths": io_paths}));
        }),
        move || {
            let poll_groups = std::mem::take(&mut *groups.lock().unwrap_or_else(|e| e.into_inner()));
            reply.send(Ok(serde_json::json!({"poll_groups": poll_groups})))
        },
    );
}

#[derive(Deserialize)]
struct SetPreferredPath {
    /// The namespace bdev.
    name: String,
    cntlid: u16,
}

/// SPDK's `bdev_nvme_set_preferred_path`: the path to controller `cntlid`
/// goes first in the namespace bdev's paths (active/passive uses it
/// whenever it is as good as the best). Not in save_config, as in SPDK.
fn bdev_nvme_set_preferred_path(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: SetPreferredPath| {
        host::set_preferred_path(&p.name, p.cntlid).map(|()| Value::Bool(true)).map_err(bdev_error)
    });
}

/// The target's shutdown, after every bdev is gone: the hotplug monitor
/// stops and each local controller is detached, so its IO queues are
/// deleted and it gets the shutdown notification (CC.SHN), which tells it to
/// make its volatile write cache durable, and its queue memory is released.
/// Runs on a reactor; `done` runs on the reactor of the last detach.
pub fn shutdown(done: impl FnOnce() + Send + 'static) {
    ::nvme::hotplug::disable();
    let names: Vec<String> = ::nvme::Controllers::get().list().iter().map(|c| c.name().to_string()).collect();
    detach_each(names, Box::new(done));
}

fn detach_each(mut names: Vec<String>, done: Box<dyn FnOnce() + Send>) {
    let Some(name) = names.pop() else { return done() };
    let me = reactor::current().unwrap_or(0);
    let detaching = name.clone();
    ::nvme::detach_controller(&detaching, move |r| {
        if let Err(e) = r {
            tracing::warn!(name, "detaching the controller at shutdown: {e}");
        }
        // Back to the reactor the chain started on, for the next one.
        reactor::send(me, move || detach_each(names, done));
    });
}

fn nvme_error(e: ::nvme::NvmeError) -> RpcError {
    RpcError::errno(e.errno(), e.to_string())
}

/// PCIe through VFIO, or the simulated controller: attached on this (the
/// application) reactor, which becomes the controller's home; the bring-up
/// never blocks it, and the reply goes when it ends.
fn attach_local(p: Attach, reply: Reply) {
    match local_transport(&p) {
        Ok((transport, opts, config)) => ::nvme::attach_controller(&p.name, transport, opts, Some(config), move |r| {
            reply.send(r.map(|names| serde_json::json!(names)).map_err(nvme_error))
        }),
        Err(e) => reply.send(Err(e)),
    }
}

/// The transport, options and save_config entry of a PCIe or SIM attach.
fn local_transport(p: &Attach) -> Result<(::nvme::Transport, ::nvme::CtrlrOpts, Value), RpcError> {
    if !host::controllers_json(Some(&p.name)).is_empty() {
        return Err(RpcError::errno(libc::EEXIST, format!("controller {} already exists", p.name)));
    }
    let pcie = p.trtype.eq_ignore_ascii_case("pcie");
    let config = if pcie {
        serde_json::json!({"method": "bdev_nvme_attach_controller",
            "params": {"name": p.name, "trtype": "PCIe", "traddr": p.traddr}})
    } else {
        serde_json::json!({"method": "bdev_nvme_attach_controller",
            "params": {"name": p.name, "trtype": "SIM", "traddr": p.traddr, "sim_seed": p.sim_seed,
                       "sim_num_blocks": p.sim_num_blocks, "sim_block_size": p.sim_block_size}})
    };
    let transport = if pcie {
        ::nvme::Transport::Pcie { traddr: p.traddr.clone() }
    } else {
        let ns = ::nvme::SimNamespace {
            num_blocks: p.sim_num_blocks.unwrap_or(262_144),
            block_size: p.sim_block_size.unwrap_or(512),
        };
        let cfg = ::nvme::SimConfig { seed: p.sim_seed.unwrap_or(1), namespaces: vec![ns], ..Default::default() };
        ::nvme::Transport::Sim(::nvme::SimController::new(cfg).map_err(RpcError::invalid_params)?)
    };
    let mut opts = ctrlr_opts();
    if let Some(n) = p.num_io_queues {
        opts.io_queues = u16::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| RpcError::invalid_params(format!("num_io_queues {n} must be 1..=65535")))?;
    }
    Ok((transport, opts, config))
}

#[derive(Deserialize)]
struct Detach {
    name: String,
}

fn bdev_nvme_detach_controller(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let p: Detach = match decode(params, &reply) {
        Ok(p) => p,
        Err(e) => return reply.send(Err(e)),
    };
    if let Some(c) = ::nvme::Controllers::get().lookup(&p.name) {
        if c.trid().trtype == "PCIe" {
            // As SPDK: the hotplug monitor does not attach it straight back.
            ::nvme::hotplug::detached_by_user(&c.trid().traddr);
        }
        return ::nvme::detach_controller(&p.name, move |r| {
            reply.send(r.map(|()| Value::Bool(true)).map_err(nvme_error))
        });
    }
    host::detach_controller(&p.name, move |r| reply.send(r.map(|()| Value::Bool(true)).map_err(bdev_error)));
}

#[derive(Deserialize, Default)]
struct GetControllers {
    name: Option<String>,
}

fn bdev_nvme_get_controllers(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: GetControllers| {
        let mut list = host::controllers_json(p.name.as_deref());
        list.extend(::nvme::controllers_json(p.name.as_deref()).unwrap_or_default());
        if let (Some(n), true) = (&p.name, list.is_empty()) {
            // SPDK answers this one with a positive EINVAL, and control
            // planes match on its text: both as SPDK has them.
            return Err(RpcError::new(libc::EINVAL, format!("Controller {n} does not exist")));
        }
        Ok(Value::Array(list))
    });
}

#[derive(Deserialize)]
struct SetOptions {
    action_on_timeout: Option<String>,
    timeout_us: Option<u64>,
    timeout_admin_us: Option<u64>,
    transport_retry_count: Option<u32>,
    enable_flush: Option<bool>,
    /// KATO of NVMe/TCP controllers attached afterwards (nvraid's PCIe
    /// driver sends no Keep Alive: a local controller needs none).
    keep_alive_timeout_ms: Option<u32>,
    ctrlr_loss_timeout_sec: Option<i32>,
    reconnect_delay_sec: Option<u32>,
    fast_io_fail_timeout_sec: Option<u32>,
    /// nvraid's own key (SPDK v25.09 has none: its PCIe driver uses SGLs
    /// whenever the controller has them): true (the default) describes IO
    /// data with SGLs whenever a controller nvraid drives reports them in
    /// Identify Controller SGLS, false always with PRPs. An SPDK
    /// configuration never sends it and gets SPDK's behaviour.
    prefer_sgl: Option<bool>,
}

/// `bdev_nvme_set_options`: the command timeout and retry count of the
/// controllers nvraid drives itself, for controllers attached afterwards
/// (SPDK refuses the call once one is attached, and so does nvraid).
fn bdev_nvme_set_options(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: SetOptions| {
        let attached =
            !host::controllers_json(None).is_empty() || !::nvme::controllers_json(None).unwrap_or_default().is_empty();
        if attached {
            return Err(RpcError::errno(libc::EPERM, "RPC not permitted with nvme controllers already attached"));
        }
        let opts = apply_set_options(ctrlr_opts(), &p)?;
        let old = reconnect_defaults();
        let reconnect = host::ReconnectOpts {
            keep_alive_timeout_ms: p.keep_alive_timeout_ms.unwrap_or(old.keep_alive_timeout_ms),
            ctrlr_loss_timeout_sec: p.ctrlr_loss_timeout_sec.unwrap_or(old.ctrlr_loss_timeout_sec),
            reconnect_delay_sec: p.reconnect_delay_sec.unwrap_or(old.reconnect_delay_sec),
            fast_io_fail_timeout_sec: p.fast_io_fail_timeout_sec.unwrap_or(old.fast_io_fail_timeout_sec),
        };
        reconnect.validate().map_err(|e| RpcError::errno(libc::EINVAL, format!("bdev_nvme_set_options: {e}")))?;
        *reactor::global::<NvmeOptions>().0.lock().unwrap_or_else(|e| e.into_inner()) = Some(opts);
        *reactor::global::<ReconnectDefaults>().0.lock().unwrap_or_else(|e| e.into_inner()) = reconnect;
        Ok(Value::Bool(true))
    });
}

fn apply_set_options(mut opts: ::nvme::CtrlrOpts, p: &SetOptions) -> Result<::nvme::CtrlrOpts, RpcError> {
    let refuse = |what: String| RpcError::new(INVALID_PARAMS, format!("bdev_nvme_set_options: {what}"));
    if let Some(us) = p.timeout_us {
        // SPDK: 0 tracks no timeouts; nvraid's driver treats 0 the same.
        opts.io_timeout_us = us;
    }
    // nvraid's own behaviour is "abort"; SPDK's default ("none") comes with
    // timeout_us 0 in the configs it writes.
    let action = p.action_on_timeout.as_deref().unwrap_or("abort");
    if !matches!(action, "none" | "reset" | "abort") {
        return Err(refuse(format!("action_on_timeout '{action}' is not one of none, reset, abort")));
    }
    if opts.io_timeout_us > 0 && action != "abort" {
        // The driver aborts a command past its timeout and resets the
        // controller when the abort does not help: SPDK's "abort".
        return Err(refuse(format!(
            "action_on_timeout '{action}' is not supported with a timeout (nvraid aborts a timed-out command and \
             resets the controller if that does not help); use \"abort\", or timeout_us 0"
        )));
    }
    // SPDK: an admin timeout of 0 means "as the IO timeout". nvraid's admin
    // commands keep a deadline even when SPDK's configuration tracks no
    // timeouts at all (both 0): a command that never completes would pin
    // its buffer and stall the controller's control path for good.
    let admin_us = match (p.timeout_admin_us.unwrap_or(0), opts.io_timeout_us) {
        (0, 0) => None,
        (0, io_us) => Some(io_us),
        (admin_us, _) => Some(admin_us),
    };
    if let Some(us) = admin_us {
        opts.admin_timeout_ms = us.div_ceil(1000).max(1);
    }
    if let Some(sgl) = p.prefer_sgl {
        opts.prefer_sgl = sgl;
    }
    if let Some(n) = p.transport_retry_count {
        opts.retry_count =
            u8::try_from(n).map_err(|_| refuse(format!("transport_retry_count {n} is above the limit of 255")))?;
    }
    if p.enable_flush == Some(false) {
        // SPDK's default acknowledges a flush without sending it to the
        // device; nvraid never does that (it would lose writes a host was
        // told are durable), so the setting is not honoured, and said so.
        tracing::warn!(
            "bdev_nvme_set_options: enable_flush=false is not honoured: nvraid always sends Flush to a \
             controller with a volatile write cache"
        );
    }
    Ok(opts)
}

#[derive(Deserialize)]
struct ResetController {
    name: String,
    /// Which controller of the name (SPDK: one per path under multipath);
    /// nvraid has one, so it must be that one's.
    cntlid: Option<u16>,
}

/// `bdev_nvme_reset_controller` for NVMe/TCP controllers: every connection
/// is made again (see `nvmf::host::reset_controller`). nvraid's PCIe driver
/// resets a controller itself when a command times out; asking for it by
/// RPC is refused for those.
fn bdev_nvme_reset_controller(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let p: ResetController = match decode(params, &reply) {
        Ok(p) => p,
        Err(e) => return reply.send(Err(e)),
    };
    let Some(c) = host::controllers_json(Some(&p.name)).into_iter().next() else {
        if ::nvme::Controllers::get().lookup(&p.name).is_some() {
            return reply.send(Err(RpcError::new(
                INVALID_PARAMS,
                format!(
                    "bdev_nvme_reset_controller: {} is a PCIe controller, which nvraid's driver resets by itself \
                     (after a command timeout); reset by RPC is for NVMe/TCP controllers",
                    p.name
                ),
            )));
        }
        return reply.send(Err(RpcError::errno(libc::ENODEV, format!("Controller {} does not exist", p.name))));
    };
    if let Some(id) = p.cntlid {
        if c["ctrlrs"][0]["cntlid"] != serde_json::json!(id) {
            return reply.send(Err(RpcError::errno(libc::ENODEV, format!("{} has no controller {id}", p.name))));
        }
    }
    host::reset_controller(&p.name, move |r| reply.send(r.map(|()| Value::Bool(true)).map_err(bdev_error)));
}

#[derive(Deserialize)]
struct SetHotplug {
    enable: bool,
    period_us: Option<u64>,
}

/// `bdev_nvme_set_hotplug`: starts (or restarts with a new period) or stops
/// the PCIe hotplug monitor, which attaches each NVMe controller newly bound
/// to vfio-pci as `HotInNvme<N>` (see `nvme::hotplug`). Period 0 or absent
/// is SPDK's default, 100 ms.
fn bdev_nvme_set_hotplug(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: SetHotplug| {
        let period_us = p.period_us.unwrap_or(0);
        if period_us > ::nvme::hotplug::MAX_PERIOD_US {
            return Err(RpcError::invalid_params("period_us must be at most 10000000"));
        }
        if !p.enable {
            ::nvme::hotplug::disable();
            return Ok(Value::Bool(true));
        }
        let config =
            ::nvme::hotplug::HotplugConfig { sysfs_root: "/sys".into(), period_us, attach: Arc::new(hotplug_attach) };
        ::nvme::hotplug::enable(config).map_err(nvme_error)?;
        Ok(Value::Bool(true))
    });
}

/// The monitor's attach: the RPC's PCIe attach with its defaults.
fn hotplug_attach(name: &str, bdf: &str, done: ::nvme::hotplug::AttachDone) {
    let p: Attach = match serde_json::from_value(serde_json::json!({"name": name, "trtype": "PCIe", "traddr": bdf})) {
        Ok(p) => p,
        Err(e) => return done(Err(::nvme::NvmeError::Invalid(e.to_string()))),
    };
    match local_transport(&p) {
        Ok((transport, opts, config)) => ::nvme::attach_controller(name, transport, opts, Some(config), done),
        Err(e) => done(Err(::nvme::NvmeError::Invalid(e.message))),
    }
}

#[cfg(test)]
mod tests {
    use crate::jsonrpc::RpcResult;
    use crate::methods::{Ctx, MethodTable};
    use crate::server::{Dispatch, Reply};
    use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
    use serde_json::{json, Value};
    use std::sync::Arc;
    use std::time::Duration;

    /// `prefer_sgl`: SGLs by default (whenever the controller has them),
    /// PRPs when set false; a configuration without the key keeps SGLs.
    #[test]
    fn prefer_sgl_selects_the_data_pointer() {
        let opts = |params: Value| {
            let p: super::SetOptions = serde_json::from_value(params).unwrap();
            super::apply_set_options(::nvme::CtrlrOpts::default(), &p).unwrap()
        };
        assert!(::nvme::CtrlrOpts::default().prefer_sgl);
        assert!(opts(json!({"timeout_us": 0})).prefer_sgl);
        assert!(!opts(json!({"prefer_sgl": false})).prefer_sgl);
        assert!(opts(json!({"prefer_sgl": true})).prefer_sgl);
    }

    fn call(set: &ReactorSet, table: &Arc<MethodTable>, method: &'static str, params: Value) -> RpcResult {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = table.clone();
        set.send(0, move || t.call(method, Some(params), Reply::callback(move |r| drop(tx.send(r)))));
        rx.recv_timeout(Duration::from_secs(20)).expect("reply")
    }

    /// The reconnect parameters: SPDK's combinations refused with EINVAL on
    /// `bdev_nvme_set_options` (naming the values) and on attach; accepted
    /// ones kept; on a local controller (SIM, PCIe) only 0 is taken; the
    /// multipath modes are TCP's only, unknown modes and policies refused.
    #[test]
    fn reconnect_and_multipath_parameters_are_honoured_or_refused() {
        let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0], IdlePolicy::sleep()) };
        let set = ReactorSet::start(cfg, || ()).unwrap();
        let table = Arc::new(MethodTable::new(Ctx { reactors: set.clone(), shutdown: Box::new(|_| ()) }));
        let e = call(&set, &table, "bdev_nvme_set_options", json!({"ctrlr_loss_timeout_sec": 5})).unwrap_err();
        assert_eq!(e.code, -libc::EINVAL, "{e:?}");
        assert!(
            e.message.contains("reconnect_delay_sec must not be 0") && e.message.contains("ctrlr_loss_timeout_sec=5")
        );
        let e = call(&set, &table, "bdev_nvme_set_options", json!({"ctrlr_loss_timeout_sec": -2})).unwrap_err();
        assert!(e.message.contains("below -1"), "{e:?}");
        let ok = json!({"ctrlr_loss_timeout_sec": -1, "reconnect_delay_sec": 2, "fast_io_fail_timeout_sec": 4,
                        "keep_alive_timeout_ms": 3000});
        assert_eq!(call(&set, &table, "bdev_nvme_set_options", ok).unwrap(), json!(true));
        let tcp = |extra: Value| {
            let mut p = json!({"name": "R", "trtype": "TCP", "traddr": "127.0.0.1", "trsvcid": "1",
                               "subnqn": "nqn.2016-06.io.nvraid:none"});
            for (k, v) in extra.as_object().unwrap() {
                p[k] = v.clone();
            }
            call(&set, &table, "bdev_nvme_attach_controller", p)
        };
        let e = tcp(json!({"ctrlr_loss_timeout_sec": 5, "reconnect_delay_sec": 6})).unwrap_err();
        assert_eq!(e.code, -libc::EINVAL, "{e:?}");
        assert!(e.message.contains("more than ctrlr_loss_timeout_sec"), "{e:?}");
        // multipath mode: taken for TCP (nothing listens here, so the
        // attach itself fails), refused for a local controller.
        let e = tcp(json!({"multipath": "multipath"})).unwrap_err();
        assert!(e.message.contains("attaching 127.0.0.1"), "{e:?}");
        let sim = json!({"name": "Sim2", "trtype": "SIM", "traddr": "sim", "multipath": "multipath"});
        let e = call(&set, &table, "bdev_nvme_attach_controller", sim).unwrap_err();
        assert!(e.message.contains("multipath \"multipath\" is not supported"), "{e:?}");
        let mp = |p: Value| call(&set, &table, "bdev_nvme_set_multipath_policy", p);
        let e = mp(json!({"name": "Nope", "policy": "active_passive"})).unwrap_err();
        assert_eq!(e.code, -libc::ENODEV, "{e:?}");
        let e = mp(json!({"name": "Nope", "policy": "active_active", "selector": "least_latency"})).unwrap_err();
        assert!(e.message.contains("is not round_robin or queue_depth"), "{e:?}");
        let e = mp(json!({"name": "Nope", "policy": "active_active", "rr_min_io": 0})).unwrap_err();
        assert!(e.message.contains("at least 1"), "{e:?}");
        let e = tcp(json!({"multipath": "banana"})).unwrap_err();
        assert!(e.message.contains("not one of disable, failover, multipath"), "{e:?}");
        let sim = json!({"name": "Sim1", "trtype": "SIM", "traddr": "sim", "ctrlr_loss_timeout_sec": 5});
        let e = call(&set, &table, "bdev_nvme_attach_controller", sim).unwrap_err();
        assert!(e.message.contains("apply to NVMe/TCP controllers"), "{e:?}");

        // bdev_nvme_reset_controller: TCP controllers only, strict params.
        let e = call(&set, &table, "bdev_nvme_reset_controller", json!({"name": "Nope"})).unwrap_err();
        assert_eq!(e.code, -libc::ENODEV, "{e:?}");
        let e = call(&set, &table, "bdev_nvme_reset_controller", json!({"name": "Nope", "x": 1})).unwrap_err();
        assert!(e.message.ends_with("unknown parameter 'x'"), "{e:?}");
        let sim = json!({"name": "Sim1", "trtype": "SIM", "traddr": "sim", "sim_num_blocks": 64});
        call(&set, &table, "bdev_nvme_attach_controller", sim).unwrap();
        let e = call(&set, &table, "bdev_nvme_reset_controller", json!({"name": "Sim1"})).unwrap_err();
        assert!(e.message.contains("reset by RPC is for NVMe/TCP controllers"), "{e:?}");
        call(&set, &table, "bdev_nvme_detach_controller", json!({"name": "Sim1"})).unwrap();
        set.stop();
        set.join();
    }

    /// The RPCs on a threaded reactor set with the simulated controller
    /// (trtype SIM): attach returns the bdev names, the bdev shows its NVMe
    /// details, save_config recreates it, bad input gets clear errors, and
    /// detach removes it.
    #[test]
    fn attach_get_detach_with_the_simulated_controller() {
        let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0, 1], IdlePolicy::sleep()) };
        let set = ReactorSet::start(cfg, || ()).unwrap();
        let table = Arc::new(MethodTable::new(Ctx { reactors: set.clone(), shutdown: Box::new(|_| ()) }));
        let attach = json!({"name": "Sim0", "trtype": "SIM", "traddr": "sim", "sim_seed": 7,
                            "sim_num_blocks": 4096, "sim_block_size": 4096});
        assert_eq!(call(&set, &table, "bdev_nvme_attach_controller", attach.clone()).unwrap(), json!(["Sim0n1"]));
        let e = call(&set, &table, "bdev_nvme_attach_controller", attach).unwrap_err();
        assert_eq!(e.code, -libc::EEXIST, "{e:?}");

        let b = call(&set, &table, "bdev_get_bdevs", json!({"name": "Sim0n1"})).unwrap();
        assert_eq!(b[0]["block_size"], 4096);
        assert_eq!(b[0]["num_blocks"], 4096);
        assert_eq!(b[0]["product_name"], "NVMe disk");
        assert_eq!(b[0]["driver_specific"]["nvme"][0]["trid"]["trtype"], "SIM");
        let c = call(&set, &table, "bdev_nvme_get_controllers", json!({"name": "Sim0"})).unwrap();
        assert_eq!(c[0]["name"], "Sim0");
        assert_eq!(c[0]["ctrlrs"][0]["state"], "enabled");
        let conf = call(&set, &table, "framework_get_config", json!({"name": "bdev"})).unwrap();
        let found = conf.as_array().unwrap().iter().any(|m| {
            m["method"] == "bdev_nvme_attach_controller"
                && m["params"]["name"] == "Sim0"
                && m["params"]["sim_seed"] == 7
        });
        assert!(found, "{conf}");

        let e =
            call(&set, &table, "bdev_nvme_attach_controller", json!({"name": "X", "trtype": "RDMA", "traddr": "1"}))
                .unwrap_err();
        assert!(e.message.contains("trtype RDMA is not supported"), "{e:?}");
        let e = call(
            &set,
            &table,
            "bdev_nvme_attach_controller",
            json!({"name": "X", "trtype": "PCIe", "traddr": "banana"}),
        )
        .unwrap_err();
        assert!(e.message.contains("not a PCI address"), "{e:?}");
        let e = call(
            &set,
            &table,
            "bdev_nvme_attach_controller",
            json!({"name": "X", "trtype": "PCIe", "traddr": "0000:ff:1f.7"}),
        )
        .unwrap_err();
        assert!(e.message.contains("no PCI device 0000:ff:1f.7"), "{e:?}");

        assert_eq!(call(&set, &table, "bdev_nvme_detach_controller", json!({"name": "Sim0"})).unwrap(), json!(true));
        assert!(call(&set, &table, "bdev_get_bdevs", json!({"name": "Sim0n1"})).is_err());
        let e = call(&set, &table, "bdev_nvme_get_controllers", json!({"name": "Sim0"})).unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (libc::EINVAL, "Controller Sim0 does not exist"));
        set.stop();
        set.join();
    }
}
