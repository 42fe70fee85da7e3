//! The one table of RPC method names, and the subsystems `save_config` walks.
//! Handlers run on the application reactor (reactor 0) and must not block:
//! long work replies later through the `Reply`.

pub mod app;
pub mod bdev;
pub mod bdev_qos;
pub mod iscsi;
pub mod keyring;
pub mod log;
pub mod nvme;
pub mod nvmf;
pub mod raid;
pub mod unsupported;

use crate::jsonrpc::{decode_params, RpcError, RpcResult};
use crate::server::{Dispatch, Reply};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use unsupported::Unsupported;

/// One RPC method: `(ctx, params, reply)`.
pub type Handler = fn(&Arc<Ctx>, Option<Value>, Reply);

/// What handlers may reach besides the per-set globals.
pub struct Ctx {
    pub reactors: reactor::ReactorSet,
    /// Acts on a signal `spdk_kill_instance` sends to this process, named
    /// as SPDK names it ("SIGTERM", "SIGKILL", ...): the daemon starts an
    /// orderly shutdown on SIGINT and SIGTERM and lets any other signal take
    /// its default action, as a signal from outside would.
    pub shutdown: Box<dyn Fn(&str) + Send + Sync>,
}

/// A configuration subsystem for `framework_get_subsystems` / `save_config`.
pub struct Subsystem {
    pub name: &'static str,
    pub depends_on: &'static [&'static str],
    /// The calls that recreate the subsystem's current state, in order.
    pub config: fn() -> Vec<Value>,
}

pub const SUBSYSTEMS: &[Subsystem] = &[
    // Before nvmf: hosts name their DH-HMAC-CHAP keys.
    Subsystem { name: "keyring", depends_on: &[], config: keyring::subsystem_config },
    Subsystem { name: "bdev", depends_on: &[], config: bdev::subsystem_config },
    Subsystem { name: "nvmf", depends_on: &["bdev", "keyring"], config: nvmf::subsystem_config },
    Subsystem { name: "iscsi", depends_on: &["bdev"], config: iscsi::subsystem_config },
];

/// Every method the daemon serves.
fn all_methods() -> impl Iterator<Item = &'static (&'static str, Handler)> {
    [
        app::METHODS,
        bdev::METHODS,
        bdev_qos::METHODS,
        nvme::METHODS,
        nvmf::METHODS,
        raid::METHODS,
        iscsi::METHODS,
        log::METHODS,
        keyring::METHODS,
    ]
    .into_iter()
    .flatten()
}

/// Per method, the parameters SPDK defines whose feature nvraid lacks.
pub(crate) type UnsupportedTable = &'static [(&'static str, &'static [Unsupported])];

fn all_unsupported() -> impl Iterator<Item = &'static (&'static str, &'static [Unsupported])> {
    [bdev::UNSUPPORTED, nvme::UNSUPPORTED, nvmf::UNSUPPORTED, iscsi::UNSUPPORTED].into_iter().flatten()
}

pub struct MethodTable {
    ctx: Arc<Ctx>,
    methods: BTreeMap<&'static str, Handler>,
    unsupported: BTreeMap<&'static str, &'static [Unsupported]>,
}

impl MethodTable {
    pub fn new(ctx: Ctx) -> Self {
        let methods = all_methods().map(|&(n, h)| (n, h)).collect();
        let unsupported = all_unsupported().map(|&(n, u)| (n, u)).collect();
        app::record_cpu_baseline(&ctx.reactors);
        MethodTable { ctx: Arc::new(ctx), methods, unsupported }
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.methods.keys().copied()
    }

    pub fn has(&self, name: &str) -> bool {
        self.methods.contains_key(name)
    }

    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }
}

impl Dispatch for MethodTable {
    fn call(&self, method: &str, mut params: Option<Value>, reply: Reply) {
        let Some((&name, handler)) = self.methods.get_key_value(method) else {
            return reply.send(Err(RpcError::method_not_found(method)));
        };
        let reply = reply.for_method(name);
        if let Some(list) = self.unsupported.get(name) {
            if let Err(e) = unsupported::strip(name, &mut params, list) {
                return reply.send(Err(e));
            }
        }
        handler(&self.ctx, params, reply)
    }
}

/// Decodes params (strictly, naming the method in errors) and runs a
/// synchronous method body.
pub(crate) fn sync_call<P: DeserializeOwned>(params: Option<Value>, reply: Reply, f: impl FnOnce(P) -> RpcResult) {
    let method = reply.method();
    reply.send(decode_params::<P>(method, params).and_then(f));
}

/// Decodes the params of the method `reply` answers.
pub(crate) fn decode<P: DeserializeOwned>(params: Option<Value>, reply: &Reply) -> Result<P, RpcError> {
    decode_params(reply.method(), params)
}

/// Params for methods that take none (`{}` or absent; any key is refused).
#[derive(serde::Deserialize, Default)]
pub(crate) struct NoParams {}

pub(crate) fn bdev_error(e: ::bdev::BdevError) -> RpcError {
    RpcError::errno(e.errno(), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_tables_name_real_methods_and_each_key_once() {
        let names: Vec<&str> = all_methods().map(|(n, _)| *n).collect();
        for (method, list) in all_unsupported() {
            assert!(names.contains(method), "UNSUPPORTED names {method}, which is not a method");
            for (i, u) in list.iter().enumerate() {
                assert!(!u.key.is_empty() && !u.feature.is_empty(), "{method}: entry {i}");
                assert!(list[..i].iter().all(|o| o.key != u.key), "{method}: {} listed twice", u.key);
            }
        }
    }
}
