//! The one table of RPC method names, and the subsystems `save_config` walks.
//! Handlers run on the application reactor (reactor 0) and must not block:
//! long work replies later through the `Reply`.

pub mod app;
pub mod bdev;
pub mod nvme;
pub mod nvmf;
pub mod raid;

use crate::jsonrpc::{decode_params, RpcError, RpcResult};
use crate::server::{Dispatch, Reply};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One RPC method: `(ctx, params, reply)`.
pub type Handler = fn(&Arc<Ctx>, Option<Value>, Reply);

/// What handlers may reach besides the per-set globals.
pub struct Ctx {
    pub reactors: reactor::ReactorSet,
    /// Starts an orderly shutdown (the daemon's signal path); the argument is
    /// the signal name for the log.
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
    Subsystem { name: "bdev", depends_on: &[], config: bdev::subsystem_config },
    Subsystem { name: "nvmf", depends_on: &["bdev"], config: nvmf::subsystem_config },
];

/// Every method the daemon serves.
fn all_methods() -> impl Iterator<Item = &'static (&'static str, Handler)> {
    [app::METHODS, bdev::METHODS, nvme::METHODS, nvmf::METHODS, raid::METHODS].into_iter().flatten()
}

pub struct MethodTable {
    ctx: Arc<Ctx>,
    methods: BTreeMap<&'static str, Handler>,
}

impl MethodTable {
    pub fn new(ctx: Ctx) -> Self {
        let methods = all_methods().map(|&(n, h)| (n, h)).collect();
        MethodTable { ctx: Arc::new(ctx), methods }
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
    fn call(&self, method: &str, params: Option<Value>, reply: Reply) {
        match self.methods.get(method) {
            Some(h) => h(&self.ctx, params, reply),
            None => reply.send(Err(RpcError::method_not_found(method))),
        }
    }
}

/// Decodes params and runs a synchronous method body.
pub(crate) fn sync_call<P: DeserializeOwned>(params: Option<Value>, reply: Reply, f: impl FnOnce(P) -> RpcResult) {
    reply.send(decode_params::<P>(params).and_then(f));
}

/// Params for methods that take none (`{}` or absent; extra keys ignored).
#[derive(serde::Deserialize, Default)]
pub(crate) struct NoParams {}

pub(crate) fn bdev_error(e: ::bdev::BdevError) -> RpcError {
    RpcError::errno(e.errno(), e.to_string())
}
