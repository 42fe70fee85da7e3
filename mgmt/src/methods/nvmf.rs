//! NVMe-oF target methods (SPDK's `nvmf_*` names and parameters): the TCP
//! transport, subsystems, namespaces (with their ANA groups and per-host
//! visibility), listeners (with their ANA states) and hosts, and the
//! subsystem's `save_config` section.

use super::unsupported::{at, Accepted, Unsupported};
use super::{sync_call, Ctx, Handler, UnsupportedTable};
use crate::jsonrpc::{RpcError, RpcResult};
use crate::server::Reply;
use ::nvmf::keyring::{Key, Keyring};
use ::nvmf::tgt::auth::{DhGroup, DhchapPolicy, Digest};
use ::nvmf::{AnaState, ListenAddr, NsOptions, NvmfError, NvmfState, SubsystemParams, TransportOpts};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use uuid::Uuid;

pub const METHODS: &[(&str, Handler)] = &[
    ("nvmf_create_transport", nvmf_create_transport),
    ("nvmf_get_transports", nvmf_get_transports),
    ("nvmf_create_subsystem", nvmf_create_subsystem),
    ("nvmf_delete_subsystem", nvmf_delete_subsystem),
    ("nvmf_subsystem_add_ns", nvmf_subsystem_add_ns),
    ("nvmf_subsystem_remove_ns", nvmf_subsystem_remove_ns),
    ("nvmf_subsystem_add_listener", |_, p, r| listener(true, p, r)),
    ("nvmf_subsystem_remove_listener", |_, p, r| listener(false, p, r)),
    ("nvmf_subsystem_listener_set_ana_state", nvmf_subsystem_listener_set_ana_state),
    ("nvmf_subsystem_set_ns_ana_group", nvmf_subsystem_set_ns_ana_group),
    ("nvmf_subsystem_get_listeners", nvmf_subsystem_get_listeners),
    ("nvmf_subsystem_get_controllers", nvmf_subsystem_get_controllers),
    ("nvmf_subsystem_get_qpairs", nvmf_subsystem_get_qpairs),
    ("nvmf_ns_add_host", |_, p, r| ns_host(true, p, r)),
    ("nvmf_ns_remove_host", |_, p, r| ns_host(false, p, r)),
    ("nvmf_subsystem_add_host", |_, p, r| host(true, p, r)),
    ("nvmf_subsystem_remove_host", |_, p, r| host(false, p, r)),
    ("nvmf_subsystem_allow_any_host", nvmf_subsystem_allow_any_host),
    ("nvmf_subsystem_set_keys", nvmf_subsystem_set_keys),
    ("nvmf_set_config", nvmf_set_config),
    ("nvmf_get_subsystems", nvmf_get_subsystems),
    ("nvmf_get_stats", nvmf_get_stats),
];

/// nvraid serves one target; SPDK names its default one "nvmf_tgt".
const ONE_TARGET: Unsupported =
    at("tgt_name", Accepted::Str("nvmf_tgt"), "named NVMe-oF targets (it serves one, nvmf_tgt)");

/// Parameters SPDK defines for these methods whose feature nvraid lacks
/// (see `unsupported`). `nvmf_create_transport` checks its own.
pub(crate) const UNSUPPORTED: UnsupportedTable = &[
    ("nvmf_get_transports", &[ONE_TARGET]),
    (
        "nvmf_create_subsystem",
        &[
            ONE_TARGET,
            at("admin_label", Accepted::Absent, "extended discovery admin labels"),
            at("dmrsl", Accepted::Absent, "configurable Dataset Management range limit"),
            at("wzsl", Accepted::Absent, "configurable Write Zeroes size limit"),
            at("passthrough", Accepted::Bool(false), "NVMe passthrough"),
            at("enable_nssr", Accepted::Bool(false), "NVM subsystem reset"),
            // The Ceph gateway's SPDK (ceph/spdk) sends these at 0, "no
            // limit", on every create.
            at("max_discard_size_kib", Accepted::Int(0), "configurable Dataset Management range limit"),
            at("max_write_zeroes_size_kib", Accepted::Int(0), "configurable Write Zeroes size limit"),
        ],
    ),
    ("nvmf_delete_subsystem", &[ONE_TARGET]),
    (
        "nvmf_subsystem_add_ns",
        &[
            ONE_TARGET,
            at("namespace.eui64", Accepted::Absent, "EUI-64 namespace identifiers"),
            at("namespace.hide_metadata", Accepted::Bool(false), "per-block metadata"),
        ],
    ),
    ("nvmf_subsystem_remove_ns", &[ONE_TARGET]),
    ("nvmf_subsystem_add_listener", &[ONE_TARGET, at("numa_id", Accepted::Int(-1), "NUMA placement of listeners")]),
    ("nvmf_subsystem_remove_listener", &[ONE_TARGET]),
    ("nvmf_subsystem_listener_set_ana_state", &[ONE_TARGET]),
    (
        "nvmf_subsystem_set_ns_ana_group",
        // ceph/spdk's transit group (a namespace passing through a third
        // group while it moves); the Ceph gateway sends 0, none.
        &[ONE_TARGET, at("transit_anagrpid", Accepted::Int(0), "transit ANA groups")],
    ),
    ("nvmf_subsystem_get_listeners", &[ONE_TARGET]),
    ("nvmf_subsystem_get_controllers", &[ONE_TARGET]),
    ("nvmf_subsystem_get_qpairs", &[ONE_TARGET]),
    ("nvmf_ns_add_host", &[ONE_TARGET]),
    ("nvmf_ns_remove_host", &[ONE_TARGET]),
    ("nvmf_subsystem_add_host", &[ONE_TARGET]),
    (
        "nvmf_subsystem_remove_host",
        &[
            ONE_TARGET,
            at(
                "timeout_ms",
                Accepted::Absent,
                "bound on the wait (the host's controllers end once their IO completes)",
            ),
        ],
    ),
    ("nvmf_subsystem_allow_any_host", &[ONE_TARGET]),
    ("nvmf_subsystem_set_keys", &[ONE_TARGET]),
    (
        "nvmf_set_config",
        &[
            at("discovery_filter", Accepted::Str("match_any"), "discovery log filtering by transport or address"),
            at("admin_cmd_passthru.identify_ctrlr", Accepted::Bool(false), "NVMe passthrough"),
            at("admin_cmd_passthru.vendor_specific", Accepted::Bool(false), "NVMe passthrough"),
            at("poll_groups_mask", Accepted::Absent, "poll group placement (one per reactor)"),
        ],
    ),
    ("nvmf_get_subsystems", &[ONE_TARGET]),
];

/// The calls that recreate the target, for `save_config`: the
/// DH-HMAC-CHAP policy first when it is not the default (everything).
pub fn subsystem_config() -> Vec<Value> {
    let policy = DhchapPolicy::get();
    let mut out = Vec::new();
    if !policy.is_default() {
        out.push(json!({"method": "nvmf_set_config", "params": {
            "dhchap_digests": policy.digests().iter().map(|d| d.name()).collect::<Vec<_>>(),
            "dhchap_dhgroups": policy.dhgroups().iter().map(|g| g.name()).collect::<Vec<_>>()}}));
    }
    out.extend(NvmfState::get().config());
    out
}

/// Stops the target before the bdevs go (the daemon's shutdown path).
pub fn shutdown(done: impl FnOnce() + Send + 'static) {
    ::nvmf::shutdown(done)
}

/// `nvme connect` lines for every TCP listener (printed when ready).
pub fn connect_lines(set: &reactor::ReactorSet) -> Vec<String> {
    set.global::<NvmfState>().connect_lines()
}

fn nvmf_error(e: NvmfError) -> RpcError {
    match e {
        NvmfError::Invalid(m) | NvmfError::NotFound(m) => RpcError::invalid_params(m),
        e => RpcError::errno(e.errno(), e.to_string()),
    }
}

fn u32_of(v: &Value, key: &str, into: &mut u32) -> Result<(), RpcError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(x) => {
            let n = x.as_u64().ok_or_else(|| RpcError::invalid_params(format!("{key} must be a number")))?;
            *into = u32::try_from(n).map_err(|_| RpcError::invalid_params(format!("{key} is too large")))?;
            Ok(())
        }
    }
}

fn bool_of(v: &Value, key: &str, into: &mut bool) -> Result<(), RpcError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(x) => {
            *into = x.as_bool().ok_or_else(|| RpcError::invalid_params(format!("{key} must be a boolean")))?;
            Ok(())
        }
    }
}

fn nvmf_create_transport(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    // Parameters SPDK's client may send that belong to other transports or
    // to features nvraid does not have: accepted at their defaults (the
    // client sends several of them unasked), refused otherwise.
    const OFF_BY_DEFAULT: &[&str] = &[
        "no_srq",
        "no_wr_batching",
        "disable_mappable_bar0",
        "disable_adaptive_irq",
        "disable_shadow_doorbells",
        "disable_command_passthru",
    ];
    const NOT_SUPPORTED: &[&str] =
        &["num_cqe", "max_srq_depth", "acceptor_backlog", "control_msg_num", "kas", "min_kato"];
    let r = (|| -> RpcResult {
        let v = params.unwrap_or(json!({}));
        let Some(obj) = v.as_object() else {
            return Err(RpcError::invalid_params("params must be an object"));
        };
        let trtype =
            v.get("trtype").and_then(Value::as_str).ok_or_else(|| RpcError::invalid_params("missing trtype"))?;
        if !trtype.eq_ignore_ascii_case("tcp") {
            return Err(RpcError::invalid_params(format!("transport type '{trtype}' is not supported (only TCP)")));
        }
        let mut o = TransportOpts::default();
        let mut numbers = [
            ("max_queue_depth", &mut o.max_queue_depth),
            ("max_io_qpairs_per_ctrlr", &mut o.max_io_qpairs_per_ctrlr),
            ("in_capsule_data_size", &mut o.in_capsule_data_size),
            ("max_io_size", &mut o.max_io_size),
            ("io_unit_size", &mut o.io_unit_size),
            ("max_aq_depth", &mut o.max_aq_depth),
            ("num_shared_buffers", &mut o.num_shared_buffers),
            ("buf_cache_size", &mut o.buf_cache_size),
            ("sock_priority", &mut o.sock_priority),
            ("abort_timeout_sec", &mut o.abort_timeout_sec),
            ("ack_timeout", &mut o.ack_timeout),
            ("data_wr_pool_size", &mut o.data_wr_pool_size),
        ];
        let mut flags = [
            ("c2h_success", &mut o.c2h_success),
            ("zcopy", &mut o.zcopy),
            ("dif_insert_or_strip", &mut o.dif_insert_or_strip),
        ];
        for (k, x) in obj {
            if k == "trtype" || k == "max_qpairs_per_ctrlr" {
                continue;
            }
            if k == "tgt_name" {
                // One target, SPDK's default name.
                if !x.is_null() && x.as_str() != Some("nvmf_tgt") {
                    return Err(RpcError::invalid_params(
                        "nvmf_create_transport: tgt_name: nvraid serves one NVMe-oF target, nvmf_tgt",
                    ));
                }
                continue;
            }
            if let Some((_, f)) = numbers.iter_mut().find(|(n, _)| n == k) {
                u32_of(&v, k, f)?;
            } else if let Some((_, f)) = flags.iter_mut().find(|(n, _)| n == k) {
                bool_of(&v, k, f)?;
            } else if OFF_BY_DEFAULT.contains(&k.as_str()) {
                let mut on = false;
                bool_of(&v, k, &mut on)?;
                if on {
                    return Err(RpcError::invalid_params(format!(
                        "nvmf_create_transport: {k} is not supported by nvraid's TCP transport"
                    )));
                }
            } else if NOT_SUPPORTED.contains(&k.as_str()) {
                if !x.is_null() {
                    return Err(RpcError::invalid_params(format!(
                        "nvmf_create_transport: {k} is not supported by nvraid's TCP transport"
                    )));
                }
            } else {
                return Err(RpcError::invalid_params(format!("nvmf_create_transport: unknown parameter '{k}'")));
            }
        }
        // SPDK's client sends max_qpairs_per_ctrlr (admin included) in older versions.
        if let Some(x) = v.get("max_qpairs_per_ctrlr").filter(|x| !x.is_null()) {
            let n = x.as_u64().ok_or_else(|| RpcError::invalid_params("max_qpairs_per_ctrlr must be a number"))?;
            o.max_io_qpairs_per_ctrlr = u32::try_from(n.saturating_sub(1).max(1))
                .map_err(|_| RpcError::invalid_params("max_qpairs_per_ctrlr is too large"))?;
        }
        // Values nvraid cannot honour (zcopy, DIF, socket priority, ...) are
        // refused by validation, with the option named.
        NvmfState::get().create_transport(o).map_err(nvmf_error)?;
        Ok(Value::Bool(true))
    })();
    reply.send(r);
}

#[derive(Deserialize, Default)]
struct GetTransports {
    trtype: Option<String>,
}

fn nvmf_get_transports(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: GetTransports| {
        if let Some(t) = &p.trtype {
            if !t.eq_ignore_ascii_case("tcp") {
                return Err(RpcError::invalid_params(format!("transport type '{t}' not found")));
            }
        }
        Ok(Value::Array(NvmfState::get().transport().map(|t| t.to_json()).into_iter().collect()))
    });
}

#[derive(Deserialize)]
struct CreateSubsystem {
    nqn: String,
    serial_number: Option<String>,
    model_number: Option<String>,
    #[serde(default)]
    allow_any_host: bool,
    max_namespaces: Option<u32>,
    min_cntlid: Option<u16>,
    max_cntlid: Option<u16>,
    #[serde(default)]
    ana_reporting: bool,
}

fn nvmf_create_subsystem(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: CreateSubsystem| {
        let mut s = SubsystemParams::new(&p.nqn);
        if let Some(v) = p.serial_number {
            s.serial_number = v;
        }
        if let Some(v) = p.model_number {
            s.model_number = v;
        }
        s.allow_any_host = p.allow_any_host;
        if let Some(v) = p.max_namespaces.filter(|v| *v > 0) {
            s.max_namespaces = v;
        }
        if let Some(v) = p.min_cntlid {
            s.min_cntlid = v;
        }
        if let Some(v) = p.max_cntlid {
            s.max_cntlid = v;
        }
        s.ana_reporting = p.ana_reporting;
        NvmfState::get().create_subsystem(s).map_err(nvmf_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct Nqn {
    nqn: String,
}

fn nvmf_delete_subsystem(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: Nqn| {
        NvmfState::get().delete_subsystem(&p.nqn).map_err(nvmf_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct NsParams {
    bdev_name: String,
    #[serde(default)]
    nsid: u32,
    uuid: Option<String>,
    nguid: Option<String>,
    anagrpid: Option<u32>,
    #[serde(default)]
    no_auto_visible: bool,
    /// Where reservations persist through power loss.
    ptpl_file: Option<String>,
}

#[derive(Deserialize)]
struct AddNs {
    nqn: String,
    namespace: NsParams,
}

fn parse_nguid(s: &str) -> Result<[u8; 16], RpcError> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return Err(RpcError::invalid_params(format!("nguid '{s}' must be 32 hex digits")));
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16)
            .map_err(|_| RpcError::invalid_params(format!("nguid '{s}' is not hexadecimal")))?;
    }
    Ok(out)
}

fn nvmf_subsystem_add_ns(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: AddNs| {
        let uuid = p
            .namespace
            .uuid
            .as_deref()
            .map(|u| Uuid::parse_str(u).map_err(|e| RpcError::invalid_params(format!("uuid '{u}': {e}"))))
            .transpose()?;
        let nguid = p.namespace.nguid.as_deref().map(parse_nguid).transpose()?;
        let o = NsOptions {
            nsid: p.namespace.nsid,
            uuid,
            nguid,
            anagrpid: p.namespace.anagrpid.unwrap_or(0),
            no_auto_visible: p.namespace.no_auto_visible,
            ptpl_file: p.namespace.ptpl_file.filter(|f| !f.is_empty()).map(std::path::PathBuf::from),
        };
        let nsid = NvmfState::get().add_ns_with(&p.nqn, &p.namespace.bdev_name, o).map_err(nvmf_error)?;
        Ok(json!(nsid))
    });
}

#[derive(Deserialize)]
struct RemoveNs {
    nqn: String,
    nsid: u32,
}

fn nvmf_subsystem_remove_ns(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: RemoveNs| {
        NvmfState::get().remove_ns(&p.nqn, p.nsid).map_err(nvmf_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct Address {
    trtype: String,
    #[serde(default)]
    adrfam: Option<String>,
    traddr: String,
    trsvcid: Option<String>,
}

#[derive(Deserialize)]
struct Listener {
    nqn: String,
    listen_address: Address,
    /// Only `nvmf_subsystem_add_listener` has it.
    ana_state: Option<String>,
    /// TLS 1.3 with a PSK only (`nvmf_subsystem_add_listener`).
    #[serde(default)]
    secure_channel: Option<bool>,
    /// Kernel sockets: SPDK's "posix", or "ssl" with `secure_channel`.
    #[serde(default)]
    sock_impl: Option<String>,
}

/// `sock_impl` as SPDK takes it with `secure_channel`: "ssl" (or none)
/// for a secure listener, "posix" (or none) for a plain one.
fn check_sock_impl(sock_impl: Option<&str>, secure: bool) -> Result<(), RpcError> {
    match sock_impl {
        None => Ok(()),
        Some(s) if s.eq_ignore_ascii_case(if secure { "ssl" } else { "posix" }) => Ok(()),
        Some(s) => Err(RpcError::invalid_params(format!(
            "sock_impl '{s}' is not supported with secure_channel={secure}; {} or leave it out",
            if secure { "ssl" } else { "posix" }
        ))),
    }
}

fn listen_addr(a: &Address) -> Result<ListenAddr, RpcError> {
    if !a.trtype.eq_ignore_ascii_case("tcp") {
        return Err(RpcError::invalid_params(format!("transport type '{}' is not supported", a.trtype)));
    }
    if let Some(f) = &a.adrfam {
        if !f.eq_ignore_ascii_case("ipv4") && !f.eq_ignore_ascii_case("ipv6") {
            return Err(RpcError::invalid_params(format!("address family '{f}' is not supported")));
        }
    }
    Ok(ListenAddr::new(&a.traddr, a.trsvcid.as_deref().unwrap_or("4420")))
}

/// An `ana_state` parameter: SPDK's three names.
fn ana_state_of(name: &str) -> Result<AnaState, RpcError> {
    AnaState::settable(name).ok_or_else(|| {
        RpcError::invalid_params(format!("ana_state '{name}' is not one of optimized, non_optimized, inaccessible"))
    })
}

fn listener(add: bool, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: Listener| {
        let addr = listen_addr(&p.listen_address)?;
        let st = NvmfState::get();
        // SPDK's client documents 'discovery' as a shortcut.
        let nqn = if p.nqn == "discovery" { nvme_spec_discovery_nqn() } else { p.nqn.as_str() };
        if add {
            let ana = p.ana_state.as_deref().map(ana_state_of).transpose()?.unwrap_or(AnaState::Optimized);
            let secure = p.secure_channel.unwrap_or(false);
            check_sock_impl(p.sock_impl.as_deref(), secure)?;
            st.add_listener_opts(nqn, addr, ana, secure).map_err(nvmf_error)?;
        } else if p.ana_state.is_some() || p.secure_channel.is_some() || p.sock_impl.is_some() {
            let given = [
                ("ana_state", p.ana_state.is_some()),
                ("secure_channel", p.secure_channel.is_some()),
                ("sock_impl", p.sock_impl.is_some()),
            ];
            let names: Vec<String> = given.iter().filter(|g| g.1).map(|g| g.0.to_string()).collect();
            return Err(RpcError::unknown_parameters("nvmf_subsystem_remove_listener", &names));
        } else {
            st.remove_listener(nqn, &addr).map_err(nvmf_error)?;
        }
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct SetAnaState {
    nqn: String,
    listen_address: Address,
    ana_state: String,
    anagrpid: Option<u32>,
}

/// `nvmf_subsystem_listener_set_ana_state`: one group's state (every
/// group's without `anagrpid`) through one listener.
fn nvmf_subsystem_listener_set_ana_state(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: SetAnaState| {
        let addr = listen_addr(&p.listen_address)?;
        let state = ana_state_of(&p.ana_state)?;
        NvmfState::get().set_ana_state(&p.nqn, &addr, state, p.anagrpid.unwrap_or(0)).map_err(nvmf_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct SetNsAnaGroup {
    nqn: String,
    nsid: u32,
    anagrpid: u32,
}

fn nvmf_subsystem_set_ns_ana_group(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: SetNsAnaGroup| {
        NvmfState::get().set_ns_ana_group(&p.nqn, p.nsid, p.anagrpid).map_err(nvmf_error)?;
        Ok(Value::Bool(true))
    });
}

/// `nvmf_subsystem_get_listeners`: addresses, and ANA states per group
/// where the subsystem reports ANA.
fn nvmf_subsystem_get_listeners(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: Nqn| Ok(any_subsystem(&p.nqn)?.listeners_json()));
}

/// A subsystem by NQN, the discovery subsystem included.
fn any_subsystem(nqn: &str) -> Result<Arc<::nvmf::Subsystem>, RpcError> {
    NvmfState::get().subsystem(nqn).ok_or_else(|| RpcError::invalid_params(format!("subsystem {nqn} not found")))
}

/// `nvmf_subsystem_get_controllers`: the live controllers of a subsystem.
fn nvmf_subsystem_get_controllers(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: Nqn| {
        Ok(Value::Array(any_subsystem(&p.nqn)?.controllers().iter().map(|c| c.to_json()).collect()))
    });
}

/// `nvmf_subsystem_get_qpairs`: every connected queue of the subsystem's
/// controllers, admin queues included.
fn nvmf_subsystem_get_qpairs(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: Nqn| {
        Ok(Value::Array(any_subsystem(&p.nqn)?.controllers().iter().flat_map(|c| c.qpairs_json()).collect()))
    });
}

#[derive(Deserialize)]
struct NsHost {
    nqn: String,
    nsid: u32,
    host: String,
}

fn ns_host(add: bool, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: NsHost| {
        NvmfState::get().ns_set_host_visible(&p.nqn, p.nsid, &p.host, add).map_err(nvmf_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct Host {
    nqn: String,
    host: String,
    /// DH-HMAC-CHAP key names in the keyring (`nvmf_subsystem_add_host`,
    /// `nvmf_subsystem_set_keys`).
    #[serde(default)]
    dhchap_key: Option<String>,
    #[serde(default)]
    dhchap_ctrlr_key: Option<String>,
    /// TLS PSK key name in the keyring (`nvmf_subsystem_add_host`): the
    /// host connects only over a `secure_channel` listener.
    #[serde(default)]
    psk: Option<String>,
}

/// A keyring key by name; a name the keyring lacks is an invalid parameter.
fn keyring_key(name: Option<&str>, what: &str) -> Result<Option<Arc<Key>>, RpcError> {
    name.map(|n| {
        Keyring::get().find(n).ok_or_else(|| RpcError::invalid_params(format!("{what}: key {n} not in the keyring")))
    })
    .transpose()
}

fn host(add: bool, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: Host| {
        let st = NvmfState::get();
        if add {
            let key = keyring_key(p.dhchap_key.as_deref(), "dhchap_key")?;
            let ckey = keyring_key(p.dhchap_ctrlr_key.as_deref(), "dhchap_ctrlr_key")?;
            match keyring_key(p.psk.as_deref(), "psk")? {
                Some(psk) => {
                    st.add_host_with_psk(&p.nqn, &p.host, psk, || st.add_host_with_keys(&p.nqn, &p.host, key, ckey))
                }
                None => st.add_host_with_keys(&p.nqn, &p.host, key, ckey),
            }
            .map_err(nvmf_error)?;
        } else {
            if p.dhchap_key.is_some() || p.dhchap_ctrlr_key.is_some() || p.psk.is_some() {
                return Err(RpcError::invalid_params("nvmf_subsystem_remove_host takes no keys"));
            }
            st.remove_host(&p.nqn, &p.host).map_err(nvmf_error)?;
        }
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct SetConfig {
    #[serde(default)]
    dhchap_digests: Option<Vec<String>>,
    #[serde(default)]
    dhchap_dhgroups: Option<Vec<String>>,
    /// Only its defaults (checked in UNSUPPORTED): emptied there.
    #[serde(default)]
    admin_cmd_passthru: Option<serde_json::Map<String, Value>>,
}

/// `nvmf_set_config`: the hash functions and DH groups DH-HMAC-CHAP may
/// use; its other settings only at their defaults.
fn nvmf_set_config(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: SetConfig| {
        if let Some(k) = p.admin_cmd_passthru.as_ref().and_then(|m| m.keys().next()) {
            return Err(RpcError::invalid_params(format!("admin_cmd_passthru.{k}: not a known passthrough setting")));
        }
        let policy = DhchapPolicy::get();
        let digests = match p.dhchap_digests {
            None => policy.digests(),
            Some(names) => names
                .iter()
                .map(|n| Digest::from_name(n).ok_or_else(|| RpcError::invalid_params(format!("unknown digest {n}"))))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let dhgroups = match p.dhchap_dhgroups {
            None => policy.dhgroups(),
            Some(names) => names
                .iter()
                .map(|n| DhGroup::from_name(n).ok_or_else(|| RpcError::invalid_params(format!("unknown dhgroup {n}"))))
                .collect::<Result<Vec<_>, _>>()?,
        };
        policy.set(&digests, &dhgroups).map_err(nvmf_error)?;
        Ok(Value::Bool(true))
    });
}

/// `nvmf_subsystem_set_keys`: the host's keys change (both absent: it no
/// longer authenticates); queues use them from their next authentication.
fn nvmf_subsystem_set_keys(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: Host| {
        if p.psk.is_some() {
            return Err(RpcError::unknown_parameters("nvmf_subsystem_set_keys", &["psk".into()]));
        }
        let key = keyring_key(p.dhchap_key.as_deref(), "dhchap_key")?;
        let ckey = keyring_key(p.dhchap_ctrlr_key.as_deref(), "dhchap_ctrlr_key")?;
        NvmfState::get().set_host_keys(&p.nqn, &p.host, key, ckey).map_err(nvmf_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct AllowAny {
    nqn: String,
    allow_any_host: bool,
}

fn nvmf_subsystem_allow_any_host(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: AllowAny| {
        NvmfState::get().allow_any_host(&p.nqn, p.allow_any_host).map_err(nvmf_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize, Default)]
struct GetSubsystems {
    nqn: Option<String>,
}

fn nvmf_get_subsystems(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: GetSubsystems| {
        let subs = NvmfState::get().subsystems();
        let list: Vec<Value> =
            subs.iter().filter(|s| p.nqn.as_deref().is_none_or(|n| n == s.nqn)).map(|s| s.to_json()).collect();
        if p.nqn.is_some() && list.is_empty() {
            return Err(RpcError::invalid_params(format!("subsystem {} not found", p.nqn.unwrap_or_default())));
        }
        Ok(Value::Array(list))
    });
}

fn nvme_spec_discovery_nqn() -> &'static str {
    "nqn.2014-08.org.nvmexpress.discovery"
}

#[derive(Deserialize, Default)]
struct GetStats {
    tgt_name: Option<String>,
}

/// `nvmf_get_stats`: SPDK's shape; the TCP transport's entry carries the
/// data buffer pool and nvraid's count of impossible IO path states.
fn nvmf_get_stats(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: GetStats| {
        if p.tgt_name.as_deref().is_some_and(|t| t != "nvmf_tgt") {
            return Err(RpcError::invalid_params(
                "nvmf_get_stats: tgt_name: nvraid serves one NVMe-oF target, nvmf_tgt",
            ));
        }
        Ok(NvmfState::get().stats_json())
    });
}
