//! Start-up configuration: the JSON that `save_config` writes
//! (`{"subsystems":[{"subsystem":..,"config":[{"method":..,"params":..}]}]}`),
//! parsed with readable errors and replayed call by call through the method
//! table, each call starting after the previous one replied.

use crate::methods::MethodTable;
use crate::server::{Dispatch, Reply};
use serde_json::Value;
use std::sync::Arc;

/// SPDK option methods that SPDK's `save_config` writes but that configure
/// parts nvraid does not have: its scheduler (nvraid pins one reactor per
/// core), socket layer, iobuf and accel frameworks, VMD, and the NVMe-oF
/// target's subsystem limit and command retry delays. (`nvmf_set_config`
/// is a method: its DH-HMAC-CHAP lists apply, its other settings are
/// accepted at their defaults only.) A config file from SPDK loads; these calls are
/// skipped and one warning names them (the README lists them too). Option
/// methods for parts nvraid has (`bdev_set_options`, `bdev_nvme_set_options`,
/// `bdev_nvme_set_hotplug`, `bdev_raid_set_options`) are methods of the
/// table: applied, or refused when they ask for what nvraid cannot do.
pub const SKIPPED_OPTION_METHODS: &[&str] = &[
    "framework_set_scheduler",
    "sock_set_default_impl",
    "sock_impl_set_options",
    "iobuf_set_options",
    "accel_set_options",
    "vmd_enable",
    "nvmf_set_max_subsystems",
    "nvmf_set_crdt",
];

#[derive(Debug, Clone)]
pub struct Call {
    pub subsystem: String,
    pub method: String,
    pub params: Option<Value>,
}

/// Parses a config file's text into calls; the error says where and why.
pub fn parse(text: &str) -> Result<Vec<Call>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let subsystems = v
        .get("subsystems")
        .ok_or("missing top-level \"subsystems\" array")?
        .as_array()
        .ok_or("\"subsystems\" must be an array")?;
    let mut calls = Vec::new();
    for (i, s) in subsystems.iter().enumerate() {
        let name = s
            .get("subsystem")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("subsystems[{i}]: missing \"subsystem\" name"))?;
        let config = match s.get("config") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(c)) => c,
            Some(_) => return Err(format!("subsystem {name}: \"config\" must be an array")),
        };
        for (j, c) in config.iter().enumerate() {
            let method = c
                .get("method")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("subsystem {name}, entry {j}: missing \"method\""))?;
            let params = c.get("params").cloned();
            if params.as_ref().is_some_and(|p| !p.is_object()) {
                return Err(format!("subsystem {name}, {method}: \"params\" must be an object"));
            }
            calls.push(Call { subsystem: name.to_string(), method: method.to_string(), params });
        }
    }
    Ok(calls)
}

/// Checks every call names a known method (or a skipped option method)
/// before anything runs, so a bad file changes nothing.
pub fn check_methods(calls: &[Call], table: &MethodTable) -> Result<(), String> {
    for c in calls {
        if !table.has(&c.method) && !SKIPPED_OPTION_METHODS.contains(&c.method.as_str()) {
            return Err(format!("subsystem {}: unknown method {}", c.subsystem, c.method));
        }
    }
    Ok(())
}

/// Replays `calls` in order on the application reactor; `done` gets the
/// first failure (with the method and its error) or Ok.
pub fn replay(table: Arc<MethodTable>, calls: Vec<Call>, done: impl FnOnce(Result<(), String>) + Send + 'static) {
    let skipped = skipped_methods(&calls, &table);
    if !skipped.is_empty() {
        tracing::warn!("config: skipping SPDK option methods for parts nvraid does not have: {}", skipped.join(", "));
    }
    step(table, calls.into_iter(), Box::new(done));
}

/// The methods of `calls` that replay skips, each named once in file order.
pub fn skipped_methods(calls: &[Call], table: &MethodTable) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for c in calls.iter().filter(|c| !table.has(&c.method)) {
        if !names.contains(&c.method) {
            names.push(c.method.clone());
        }
    }
    names
}

type Done = Box<dyn FnOnce(Result<(), String>) + Send>;

fn step(table: Arc<MethodTable>, mut rest: std::vec::IntoIter<Call>, done: Done) {
    let Some(call) = rest.next() else { return done(Ok(())) };
    if !table.has(&call.method) {
        return step(table, rest, done);
    }
    let set = table.ctx().reactors.clone();
    let t2 = table.clone();
    let method = call.method.clone();
    let reply = Reply::callback(move |r| {
        // Continue on the application reactor whichever reactor replied.
        set.send(0, move || match r {
            Ok(_) => step(t2, rest, done),
            Err(e) => done(Err(format!("{method} failed: {} (code {})", e.message, e.code))),
        });
    });
    table.call(&call.method, call.params, reply);
}
