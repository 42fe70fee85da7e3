//! RAID methods (`bdev_raid_*`): decode SPDK's parameters and hand them to
//! `bdev_raid::rpc`, which owns the semantics. Create, list and set-options
//! answer at once; delete, add and remove answer once the array has been
//! suspended, changed and resumed (delete: torn down).

use super::{bdev_error, decode, sync_call, Ctx, Handler};
use crate::server::Reply;
use bdev_raid::rpc;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::sync::Arc;

pub const METHODS: &[(&str, Handler)] = &[
    ("bdev_raid_create", bdev_raid_create),
    ("bdev_raid_delete", bdev_raid_delete),
    ("bdev_raid_get_bdevs", bdev_raid_get_bdevs),
    ("bdev_raid_add_base_bdev", bdev_raid_add_base_bdev),
    ("bdev_raid_remove_base_bdev", bdev_raid_remove_base_bdev),
    ("bdev_raid_set_options", bdev_raid_set_options),
    ("bdev_raid_check", bdev_raid_check),
];

/// The `bdev_raid_set_options` call `save_config` writes (SPDK puts it
/// right after `bdev_set_options`, before any bdev).
pub fn options_config() -> Value {
    rpc::options_config()
}

fn bdev_raid_create(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    async_call(params, reply, |p: rpc::RaidCreateParams, done| rpc::bdev_raid_create_async(p, done));
}

fn bdev_raid_get_bdevs(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: rpc::RaidGetBdevsParams| rpc::bdev_raid_get_bdevs(p).map_err(bdev_error));
}

fn bdev_raid_set_options(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: rpc::RaidSetOptionsParams| rpc::bdev_raid_set_options(p).map_err(bdev_error));
}

/// Decodes params and runs an asynchronous method body that answers later.
fn async_call<P: DeserializeOwned>(
    params: Option<Value>,
    reply: Reply,
    f: impl FnOnce(P, Box<dyn FnOnce(Result<Value, ::bdev::BdevError>) + Send>),
) {
    match decode::<P>(params, &reply) {
        Ok(p) => f(p, Box::new(move |r| reply.send(r.map_err(bdev_error)))),
        Err(e) => reply.send(Err(e)),
    }
}

fn bdev_raid_delete(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    async_call(params, reply, |p: rpc::RaidDeleteParams, done| rpc::bdev_raid_delete(p, done));
}

fn bdev_raid_add_base_bdev(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    async_call(params, reply, |p: rpc::RaidAddBaseBdevParams, done| rpc::bdev_raid_add_base_bdev(p, done));
}

fn bdev_raid_remove_base_bdev(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    async_call(params, reply, |p: rpc::RaidRemoveBaseBdevParams, done| rpc::bdev_raid_remove_base_bdev(p, done));
}

fn bdev_raid_check(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    async_call(params, reply, |p: rpc::RaidCheckParams, done| rpc::bdev_raid_check(p, done));
}
