//! Keyring methods (SPDK's `keyring_file_add_key`, `keyring_file_remove_key`,
//! `keyring_get_keys`) and the keyring's `save_config` section, which
//! comes before nvmf's so that hosts find their DH-HMAC-CHAP keys.

use super::{sync_call, Ctx, Handler, NoParams};
use crate::jsonrpc::RpcError;
use crate::server::Reply;
use ::nvmf::keyring::{KeyError, Keyring};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

pub const METHODS: &[(&str, Handler)] = &[
    ("keyring_file_add_key", keyring_file_add_key),
    ("keyring_file_remove_key", keyring_file_remove_key),
    ("keyring_get_keys", keyring_get_keys),
];

/// The calls that recreate the keyring, for `save_config`.
pub fn subsystem_config() -> Vec<Value> {
    Keyring::get().config()
}

fn key_error(e: KeyError) -> RpcError {
    RpcError::errno(e.errno(), e.to_string())
}

#[derive(Deserialize)]
struct AddKey {
    name: String,
    path: String,
}

fn keyring_file_add_key(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: AddKey| {
        Keyring::get().add_file_key(&p.name, &p.path).map_err(key_error)?;
        Ok(Value::Bool(true))
    });
}

#[derive(Deserialize)]
struct RemoveKey {
    name: String,
}

fn keyring_file_remove_key(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: RemoveKey| {
        Keyring::get().remove(&p.name).map_err(key_error)?;
        Ok(Value::Bool(true))
    });
}

fn keyring_get_keys(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |_: NoParams| Ok(Keyring::get().keys_json()));
}
