//! Application methods: version, method list, reactors, subsystems, config,
//! init and shutdown.

use super::{sync_call, Ctx, Handler, NoParams, SUBSYSTEMS};
use crate::jsonrpc::{RpcError, INVALID_PARAMS};
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

/// SPDK's shape, exactly (spdk_top decodes it strictly): per reactor its
/// core, NUMA node, thread id, busy and idle time in ticks of `tick_rate`,
/// the core's usr/sys/irq time since start (jiffies, from /proc/stat), and
/// its one "lightweight thread" (nvraid runs no SPDK threads; a reactor is
/// one thread).
fn framework_get_reactors(ctx: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let set = ctx.reactors.clone();
    sync_call(params, reply, move |_: NoParams| {
        // SPDK's interrupt mode: idle reactors sleep on event file descriptors.
        // A reactor that sleeps on a timer (sleep-when-idle) is still polling.
        let in_interrupt = set.idle_policy().uses_interrupts();
        let now = reactor::tsc::ticks();
        let reactors: Vec<Value> = (0..set.count())
            .map(|id| {
                let stats = set.stats(id).unwrap_or_default();
                let core = set.core(id).unwrap_or(id);
                let cpu = cpu_times_since_start(core);
                json!({
                    "lcore": core,
                    "numa_id": numa_node(core),
                    "tid": stats.tid.unwrap_or(0),
                    "busy": stats.busy_ticks,
                    "idle": stats.idle_ticks,
                    "in_interrupt": in_interrupt,
                    "irq": cpu.irq,
                    "sys": cpu.sys,
                    "usr": cpu.usr,
                    "lw_threads": [{
                        "name": if id == 0 { "app_thread".to_string() } else { format!("reactor_{id}") },
                        "id": id + 1,
                        "cpumask": core_mask_hex(core),
                        "elapsed": if stats.started_ticks == 0 { 0 } else { now.saturating_sub(stats.started_ticks) },
                    }],
                })
            })
            .collect();
        Ok(json!({"tick_rate": reactor::tsc::tick_rate(), "pid": std::process::id(), "reactors": reactors}))
    });
}

/// The mask of one core as SPDK prints masks: hex digits, no "0x".
fn core_mask_hex(core: usize) -> String {
    format!("{:x}{}", 1u8 << (core % 4), "0".repeat(core / 4))
}

/// A core's time from /proc/stat, in jiffies (USER_HZ).
#[derive(Clone, Copy, Default)]
struct CpuTimes {
    usr: u64,
    sys: u64,
    /// Hard and soft interrupts, as SPDK sums them.
    irq: u64,
}

/// The core's times now, minus what they were when first asked (the
/// method table is built at start-up and asks then, as SPDK does at
/// start). Zeros where /proc/stat cannot be read, as SPDK reports.
fn cpu_times_since_start(core: usize) -> CpuTimes {
    let Some(now) = cpu_times(core) else { return CpuTimes::default() };
    let start = cpu_times_at_start(core).unwrap_or(now);
    CpuTimes {
        usr: now.usr.saturating_sub(start.usr),
        sys: now.sys.saturating_sub(start.sys),
        irq: now.irq.saturating_sub(start.irq),
    }
}

fn cpu_times_at_start(core: usize) -> Option<CpuTimes> {
    static START: std::sync::Mutex<Vec<(usize, CpuTimes)>> = std::sync::Mutex::new(Vec::new());
    let mut start = START.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, t)) = start.iter().find(|(c, _)| *c == core) {
        return Some(*t);
    }
    let t = cpu_times(core)?;
    start.push((core, t));
    Some(t)
}

/// Records the start-up baseline of every reactor's core.
pub(crate) fn record_cpu_baseline(set: &reactor::ReactorSet) {
    for id in 0..set.count() {
        cpu_times_at_start(set.core(id).unwrap_or(id));
    }
}

fn cpu_times(core: usize) -> Option<CpuTimes> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_proc_stat(&text, core)
}

/// The `cpuN user nice system idle iowait irq softirq ...` line of `core`.
fn parse_proc_stat(text: &str, core: usize) -> Option<CpuTimes> {
    let want = format!("cpu{core}");
    let line = text.lines().find(|l| l.split_whitespace().next() == Some(want.as_str()))?;
    let f: Vec<u64> = line.split_whitespace().skip(1).map_while(|x| x.parse().ok()).collect();
    Some(CpuTimes { usr: *f.first()?, sys: *f.get(2)?, irq: f.get(5)? + f.get(6)? })
}

/// The NUMA node of a core from sysfs, -1 when unknown (SPDK's "any").
fn numa_node(core: usize) -> i64 {
    let dir = format!("/sys/devices/system/cpu/cpu{core}");
    let Ok(entries) = std::fs::read_dir(dir) else { return -1 };
    entries.filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("node")?.parse::<i64>().ok()).next().unwrap_or(-1)
}

fn framework_get_subsystems(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |_: NoParams| {
        Ok(Value::Array(SUBSYSTEMS.iter().map(|s| json!({"subsystem": s.name, "depends_on": s.depends_on})).collect()))
    });
}

#[derive(Deserialize)]
struct GetConfig {
    name: String,
    /// Keep SPDK's batch arrays in the output (SPDK's client sends this);
    /// nvraid writes no batches, so both answers are the same list.
    #[serde(default, rename = "with_batches")]
    _with_batches: bool,
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

/// The signals SPDK's `spdk_kill_instance` knows.
const KILL_SIGNALS: &[&str] = &["SIGINT", "SIGTERM", "SIGQUIT", "SIGHUP", "SIGKILL", "SIGUSR1"];

/// Sends a signal to this process, as SPDK does: the daemon treats SIGINT
/// and SIGTERM as an orderly shutdown and lets the others take their
/// default action (SIGKILL: immediate death, so no reply). Names are
/// SPDK's, exactly; any other is refused.
fn spdk_kill_instance(ctx: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: KillInstance| {
        let Some(&signal) = KILL_SIGNALS.iter().find(|s| **s == p.sig_name) else {
            return Err(RpcError::new(
                INVALID_PARAMS,
                format!("spdk_kill_instance: unknown signal '{}' (known: {})", p.sig_name, KILL_SIGNALS.join(", ")),
            ));
        };
        (ctx.shutdown)(signal);
        Ok(Value::Bool(true))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_lines_parse() {
        let text = "cpu  10 0 20 900 1 2 3 0 0 0\ncpu0 5 1 7 400 0 1 2 0 0 0\ncpu1 5 0 13 500 1 1 1 0 0 0\nintr 1\n";
        let c = parse_proc_stat(text, 1).unwrap();
        assert_eq!((c.usr, c.sys, c.irq), (5, 13, 2));
        let c = parse_proc_stat(text, 0).unwrap();
        assert_eq!((c.usr, c.sys, c.irq), (5, 7, 3));
        assert!(parse_proc_stat(text, 2).is_none());
        assert!(parse_proc_stat("cpu3 1 2\n", 3).is_none(), "a short line is not read as zeros");
    }

    #[test]
    fn core_masks_print_like_spdk() {
        assert_eq!(core_mask_hex(0), "1");
        assert_eq!(core_mask_hex(3), "8");
        assert_eq!(core_mask_hex(4), "10");
        assert_eq!(core_mask_hex(9), "200");
        assert_eq!(core_mask_hex(130), "4".to_string() + &"0".repeat(32));
    }
}
