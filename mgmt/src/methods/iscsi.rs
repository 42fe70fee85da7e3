//! iSCSI target methods (SPDK's `iscsi_*` names and parameters): options,
//! portal groups, initiator groups, target nodes and their LUNs, CHAP auth
//! groups, connections, and the subsystem's `save_config` section.

use super::unsupported::{at, Accepted};
use super::{sync_call, Ctx, Handler, NoParams, UnsupportedTable};
use crate::jsonrpc::RpcError;
use crate::server::Reply;
use ::iscsi::{ChapPolicy, ChapSecret, InitiatorGroup, IscsiError, IscsiOpts, IscsiState, NodeParams, Portal};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

pub const METHODS: &[(&str, Handler)] = &[
    ("iscsi_set_options", iscsi_set_options),
    ("iscsi_get_options", iscsi_get_options),
    ("iscsi_set_discovery_auth", iscsi_set_discovery_auth),
    ("iscsi_create_portal_group", iscsi_create_portal_group),
    ("iscsi_delete_portal_group", iscsi_delete_portal_group),
    ("iscsi_get_portal_groups", |_, p, r| get(p, r, |s| s.portal_groups_json())),
    ("iscsi_create_initiator_group", iscsi_create_initiator_group),
    ("iscsi_delete_initiator_group", iscsi_delete_initiator_group),
    ("iscsi_get_initiator_groups", |_, p, r| get(p, r, |s| s.initiator_groups_json())),
    ("iscsi_create_target_node", iscsi_create_target_node),
    ("iscsi_delete_target_node", iscsi_delete_target_node),
    ("iscsi_target_node_add_lun", iscsi_target_node_add_lun),
    ("iscsi_target_node_set_auth", iscsi_target_node_set_auth),
    ("iscsi_target_node_add_pg_ig_maps", |_, p, r| maps(true, p, r)),
    ("iscsi_target_node_remove_pg_ig_maps", |_, p, r| maps(false, p, r)),
    ("iscsi_initiator_group_add_initiators", |_, p, r| edit_group(true, p, r)),
    ("iscsi_initiator_group_remove_initiators", |_, p, r| edit_group(false, p, r)),
    ("iscsi_get_target_nodes", |_, p, r| get(p, r, |s| s.target_nodes_json())),
    ("iscsi_create_auth_group", iscsi_create_auth_group),
    ("iscsi_delete_auth_group", iscsi_delete_auth_group),
    ("iscsi_auth_group_add_secret", iscsi_auth_group_add_secret),
    ("iscsi_auth_group_remove_secret", iscsi_auth_group_remove_secret),
    ("iscsi_get_auth_groups", |_, p, r| get(p, r, |s| s.auth_groups_json())),
    ("iscsi_get_connections", |_, p, r| get(p, r, |s| s.connections_json())),
];

const NO_POOLS: &str = "SPDK's PDU and data buffer pools (nvraid sizes per-connection slots itself)";

/// Parameters SPDK defines for these methods whose feature nvraid lacks.
pub(crate) const UNSUPPORTED: UnsupportedTable = &[
    (
        "iscsi_set_options",
        &[
            at("auth_file", Accepted::Absent, "CHAP secret files (use iscsi_create_auth_group)"),
            at("max_large_datain_per_connection", Accepted::Absent, "a limit on split reads per connection"),
            at("pdu_pool_size", Accepted::Absent, NO_POOLS),
            at("immediate_data_pool_size", Accepted::Absent, NO_POOLS),
            at("data_out_pool_size", Accepted::Absent, NO_POOLS),
        ],
    ),
    (
        "iscsi_create_portal_group",
        &[at("wait", Accepted::Bool(false), "portal groups that wait for iscsi_start_portal_group")],
    ),
];

/// The calls that recreate the target, for `save_config`.
pub fn subsystem_config() -> Vec<Value> {
    IscsiState::get().config()
}

/// Stops the iSCSI target before the bdevs go (the daemon's shutdown path).
pub fn shutdown(done: impl FnOnce() + Send + 'static) {
    ::iscsi::shutdown(done)
}

/// `iscsiadm` discovery lines for every public portal (printed when ready).
pub fn discovery_lines(set: &reactor::ReactorSet) -> Vec<String> {
    set.global::<IscsiState>().discovery_lines()
}

/// SPDK answers its iSCSI methods' failures with -32602 and a message.
fn iscsi_error(e: IscsiError) -> RpcError {
    RpcError::invalid_params(e.to_string())
}

fn get(params: Option<Value>, reply: Reply, f: fn(&IscsiState) -> Value) {
    sync_call(params, reply, |_: NoParams| Ok(f(&IscsiState::get())));
}

#[derive(Deserialize)]
struct SetOptions {
    node_base: Option<String>,
    nop_timeout: Option<u32>,
    nop_in_interval: Option<u32>,
    disable_chap: Option<bool>,
    require_chap: Option<bool>,
    mutual_chap: Option<bool>,
    chap_group: Option<i32>,
    max_sessions: Option<u32>,
    max_connections_per_session: Option<u32>,
    max_queue_depth: Option<u32>,
    default_time2wait: Option<u32>,
    default_time2retain: Option<u32>,
    first_burst_length: Option<u32>,
    immediate_data: Option<bool>,
    allow_duplicated_isid: Option<bool>,
    error_recovery_level: Option<u32>,
    max_r2t_per_connection: Option<u32>,
}

fn iscsi_set_options(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: SetOptions| {
        let mut o = IscsiOpts::default();
        macro_rules! take {
            ($($f:ident => $to:expr),* $(,)?) => { $( if let Some(v) = p.$f { $to = v; } )* };
        }
        take!(node_base => o.node_base, nop_timeout => o.nop_timeout, nop_in_interval => o.nop_in_interval,
              disable_chap => o.discovery_auth.disable_chap, require_chap => o.discovery_auth.require_chap,
              mutual_chap => o.discovery_auth.mutual_chap, chap_group => o.discovery_auth.chap_group,
              max_sessions => o.max_sessions, max_connections_per_session => o.max_connections_per_session,
              max_queue_depth => o.max_queue_depth, default_time2wait => o.default_time2wait,
              default_time2retain => o.default_time2retain, first_burst_length => o.first_burst_length,
              immediate_data => o.immediate_data, allow_duplicated_isid => o.allow_duplicated_isid,
              error_recovery_level => o.error_recovery_level, max_r2t_per_connection => o.max_r2t_per_connection);
        IscsiState::get().set_options(o).map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}

fn iscsi_get_options(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |_: NoParams| Ok(IscsiState::get().options().to_json()));
}

#[derive(Deserialize)]
struct Auth {
    #[serde(default)]
    disable_chap: bool,
    #[serde(default)]
    require_chap: bool,
    #[serde(default)]
    mutual_chap: bool,
    #[serde(default)]
    chap_group: i32,
}

impl Auth {
    fn policy(&self) -> ChapPolicy {
        ChapPolicy {
            disable_chap: self.disable_chap,
            require_chap: self.require_chap,
            mutual_chap: self.mutual_chap,
            chap_group: self.chap_group,
        }
    }
}

fn iscsi_set_discovery_auth(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: Auth| {
        IscsiState::get().set_discovery_auth(p.policy()).map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct PortalParam {
    host: String,
    port: Option<String>,
}

#[derive(Deserialize)]
struct CreatePortalGroup {
    tag: i32,
    portals: Vec<PortalParam>,
    #[serde(default)]
    private: bool,
}

fn iscsi_create_portal_group(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: CreatePortalGroup| {
        let portals = p
            .portals
            .into_iter()
            .map(|x| Portal { host: x.host, port: x.port.unwrap_or_else(|| "3260".into()) })
            .collect();
        IscsiState::get().create_portal_group(p.tag, portals, p.private).map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct Tag {
    tag: i32,
}

fn iscsi_delete_portal_group(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: Tag| {
        IscsiState::get().delete_portal_group(p.tag).map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct CreateInitiatorGroup {
    tag: i32,
    initiators: Vec<String>,
    netmasks: Vec<String>,
}

fn iscsi_create_initiator_group(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: CreateInitiatorGroup| {
        let g = InitiatorGroup { tag: p.tag, initiators: p.initiators, netmasks: p.netmasks };
        IscsiState::get().create_initiator_group(g).map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}

fn iscsi_delete_initiator_group(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: Tag| {
        IscsiState::get().delete_initiator_group(p.tag).map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct PgIgMap {
    pg_tag: i32,
    ig_tag: i32,
}

#[derive(Deserialize)]
struct LunParam {
    bdev_name: String,
    lun_id: i32,
}

#[derive(Deserialize)]
struct CreateTargetNode {
    name: String,
    alias_name: Option<String>,
    pg_ig_maps: Vec<PgIgMap>,
    luns: Vec<LunParam>,
    queue_depth: u32,
    #[serde(default)]
    disable_chap: bool,
    #[serde(default)]
    require_chap: bool,
    #[serde(default)]
    mutual_chap: bool,
    #[serde(default)]
    chap_group: i32,
    #[serde(default)]
    header_digest: bool,
    #[serde(default)]
    data_digest: bool,
}

fn iscsi_create_target_node(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: CreateTargetNode| {
        let n = NodeParams {
            name: p.name,
            alias_name: p.alias_name,
            pg_ig_maps: p.pg_ig_maps.iter().map(|m| (m.pg_tag, m.ig_tag)).collect(),
            luns: p.luns.into_iter().map(|l| (l.bdev_name, l.lun_id)).collect(),
            queue_depth: p.queue_depth,
            auth: ChapPolicy {
                disable_chap: p.disable_chap,
                require_chap: p.require_chap,
                mutual_chap: p.mutual_chap,
                chap_group: p.chap_group,
            },
            header_digest: p.header_digest,
            data_digest: p.data_digest,
        };
        IscsiState::get().create_target_node(n).map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct Name {
    name: String,
}

fn iscsi_delete_target_node(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: Name| {
        IscsiState::get().delete_target_node(&p.name).map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct AddLun {
    name: String,
    bdev_name: String,
    lun_id: Option<i32>,
}

fn iscsi_target_node_add_lun(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: AddLun| {
        IscsiState::get().add_lun(&p.name, &p.bdev_name, p.lun_id.unwrap_or(-1)).map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct NodeAuth {
    name: String,
    #[serde(default)]
    disable_chap: bool,
    #[serde(default)]
    require_chap: bool,
    #[serde(default)]
    mutual_chap: bool,
    #[serde(default)]
    chap_group: i32,
}

fn iscsi_target_node_set_auth(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: NodeAuth| {
        let auth = ChapPolicy {
            disable_chap: p.disable_chap,
            require_chap: p.require_chap,
            mutual_chap: p.mutual_chap,
            chap_group: p.chap_group,
        };
        IscsiState::get().set_node_auth(&p.name, auth).map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct Secret {
    user: String,
    secret: String,
    muser: Option<String>,
    msecret: Option<String>,
}

impl Secret {
    fn into_chap(self) -> ChapSecret {
        ChapSecret { user: self.user, secret: self.secret, muser: self.muser, msecret: self.msecret }
    }
}

#[derive(Deserialize)]
struct CreateAuthGroup {
    tag: i32,
    #[serde(default)]
    secrets: Vec<Secret>,
}

fn iscsi_create_auth_group(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: CreateAuthGroup| {
        let secrets = p.secrets.into_iter().map(Secret::into_chap).collect();
        IscsiState::get().create_auth_group(p.tag, secrets).map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}

fn iscsi_delete_auth_group(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: Tag| {
        IscsiState::get().delete_auth_group(p.tag).map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct AddSecret {
    tag: i32,
    user: String,
    secret: String,
    muser: Option<String>,
    msecret: Option<String>,
}

fn iscsi_auth_group_add_secret(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: AddSecret| {
        let secret = ChapSecret { user: p.user, secret: p.secret, muser: p.muser, msecret: p.msecret };
        IscsiState::get().auth_group_add_secret(p.tag, secret).map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct RemoveSecret {
    tag: i32,
    user: String,
}

fn iscsi_auth_group_remove_secret(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: RemoveSecret| {
        IscsiState::get().auth_group_remove_secret(p.tag, &p.user).map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct Maps {
    name: String,
    pg_ig_maps: Vec<PgIgMap>,
}

fn maps(add: bool, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: Maps| {
        let list: Vec<(i32, i32)> = p.pg_ig_maps.iter().map(|m| (m.pg_tag, m.ig_tag)).collect();
        let st = IscsiState::get();
        if add { st.add_maps(&p.name, &list) } else { st.remove_maps(&p.name, &list) }.map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct EditGroup {
    tag: i32,
    #[serde(default)]
    initiators: Vec<String>,
    #[serde(default)]
    netmasks: Vec<String>,
}

fn edit_group(add: bool, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: EditGroup| {
        IscsiState::get().edit_initiator_group(p.tag, add, &p.initiators, &p.netmasks).map_err(iscsi_error)?;
        Ok(Value::Bool(true))
    });
}
