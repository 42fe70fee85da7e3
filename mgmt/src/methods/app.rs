//! Application methods: version, method list, reactors, subsystems, config,
//! init and shutdown.

use super::{sync_call, Ctx, Handler, NoParams, SUBSYSTEMS};
use crate::jsonrpc::RpcError;
use crate::server::Reply;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

pub const METHODS: &[(&str, Handler)] = &[
    ("spdk_get_version", spdk_get_version),
    ("rpc_get_methods", rpc_get_methods),
    ("framework_wait_init", framework_wait_init),
    ("framework_get_reactors", framework_get_reactors),
    ("framework_get_subsystems", framework_get_subsystems),
    ("framework_get_config", framework_get_config),
    ("spdk_kill_instance", spdk_kill_instance),
];

fn spdk_get_version(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |_: NoParams| {
        let v = env!("CARGO_PKG_VERSION");
        let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
        let (major, minor, patch) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        Ok(json!({
            "version": format!("nvraid v{v}"),
            "fields": {"major": major, "minor": minor, "patch": patch, "suffix": "", "commit": ""},
        }))
    });
}

#[derive(Deserialize, Default)]
struct GetMethods {
    #[serde(default)]
    current: bool,
    #[serde(default)]
    include_aliases: bool,
}

fn rpc_get_methods(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    // Every method is usable at runtime (no pre-init state), so `current`
    // does not narrow the list; nvraid has no deprecated aliases.
    sync_call(params, reply, |p: GetMethods| {
        let _ = (p.current, p.include_aliases);
        let names: Vec<&str> = super::all_methods().map(|(n, _)| *n).collect();
        Ok(json!(names))
    });
}

fn framework_wait_init(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    // The RPC server starts only after the start-up config has been applied.
    sync_call(params, reply, |_: NoParams| Ok(Value::Bool(true)));
}

fn framework_get_reactors(ctx: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let set = ctx.reactors.clone();
    sync_call(params, reply, move |_: NoParams| {
        let idle_sleep = matches!(set.idle_policy(), reactor::IdlePolicy::SleepWhenIdle { .. });
        let reactors: Vec<Value> = (0..set.count())
            .map(|id| {
                let (busy, idle, slept_ns) = set.stats(id).unwrap_or_default();
                json!({
                    "lcore": set.core(id).unwrap_or(id),
                    "busy_loops": busy,
                    "idle_loops": idle,
                    "sleep_ns": slept_ns,
                    "in_interrupt": idle_sleep,
                    "lw_threads": [{"name": if id == 0 { "app_thread".to_string() } else { format!("reactor_{id}") }, "id": id + 1}],
                })
            })
            .collect();
        Ok(json!({"tick_rate": ::bdev::tsc::tick_rate(), "pid": std::process::id(), "reactors": reactors}))
    });
}

fn framework_get_subsystems(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |_: NoParams| {
        Ok(Value::Array(SUBSYSTEMS.iter().map(|s| json!({"subsystem": s.name, "depends_on": s.depends_on})).collect()))
    });
}

#[derive(Deserialize)]
struct GetConfig {
    name: String,
}

fn framework_get_config(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: GetConfig| {
        let s = SUBSYSTEMS
            .iter()
            .find(|s| s.name == p.name)
            .ok_or_else(|| RpcError::invalid_params(format!("subsystem '{}' not found", p.name)))?;
        Ok(Value::Array((s.config)()))
    });
}

#[derive(Deserialize)]
struct KillInstance {
    sig_name: String,
}

fn spdk_kill_instance(ctx: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: KillInstance| {
        let sig = p.sig_name.trim_start_matches("SIG");
        if !matches!(sig, "INT" | "TERM" | "KILL" | "QUIT" | "HUP") {
            return Err(RpcError::invalid_params(format!("unsupported signal '{}'", p.sig_name)));
        }
        (ctx.shutdown)(&p.sig_name);
        Ok(Value::Bool(true))
    });
}
