//! Per-bdev IO controls: rate limits (`bdev_set_qos_limit`) and latency
//! histograms (`bdev_enable_histogram`, `bdev_get_histogram`), with SPDK's
//! parameters and answers; and the calls `save_config` writes to restore them.

use super::{decode, Ctx, Handler};
use crate::jsonrpc::{RpcError, INTERNAL_ERROR};
use crate::server::Reply;
use ::bdev::histogram::{self, HistogramConfig};
use ::bdev::{qos, BdevHandle, IoType, Registry};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

pub const METHODS: &[(&str, Handler)] = &[
    ("bdev_set_qos_limit", bdev_set_qos_limit),
    ("bdev_enable_histogram", bdev_enable_histogram),
    ("bdev_get_histogram", bdev_get_histogram),
];

fn lookup(name: &str) -> Result<BdevHandle, RpcError> {
    Registry::get().lookup(name).ok_or_else(|| RpcError::errno(libc::ENODEV, format!("bdev {name} not found")))
}

/// The calls that restore every bdev's rate limits and histograms; they
/// follow the bdevs' own calls in `save_config`.
pub fn subsystem_config() -> Vec<Value> {
    let bdevs = Registry::get().list();
    let limits = bdevs.iter().filter_map(qos::config_json);
    let histograms = bdevs.iter().filter_map(histogram::config_json);
    limits.chain(histograms).collect()
}

#[derive(Deserialize)]
struct SetQosLimit {
    name: String,
    rw_ios_per_sec: Option<u64>,
    rw_mbytes_per_sec: Option<u64>,
    r_mbytes_per_sec: Option<u64>,
    w_mbytes_per_sec: Option<u64>,
}

/// Sets the limits given (0 removes one; those not given stay). As SPDK,
/// an IOPS limit that is not a multiple of 1000 is rounded up to one, and
/// `bdev_get_bdevs` shows the limits in force.
fn bdev_set_qos_limit(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let p: SetQosLimit = match decode(params, &reply) {
        Ok(p) => p,
        Err(e) => return reply.send(Err(e)),
    };
    let h = match lookup(&p.name) {
        Ok(h) => h,
        Err(e) => return reply.send(Err(e)),
    };
    let req = [p.rw_ios_per_sec, p.rw_mbytes_per_sec, p.r_mbytes_per_sec, p.w_mbytes_per_sec];
    qos::set_rate_limits(&h, req, move |r| reply.send(r.map(|_| Value::Bool(true)).map_err(super::bdev_error)));
}

#[derive(Deserialize)]
struct EnableHistogram {
    name: String,
    enable: bool,
    opc: Option<String>,
    granularity: Option<u8>,
    min_nsec: Option<u64>,
    max_nsec: Option<u64>,
}

fn bdev_enable_histogram(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let p: EnableHistogram = match decode(params, &reply) {
        Ok(p) => p,
        Err(e) => return reply.send(Err(e)),
    };
    let h = match lookup(&p.name) {
        Ok(h) => h,
        Err(e) => return reply.send(Err(e)),
    };
    let config = if p.enable {
        let d = HistogramConfig::default();
        let io_type = match p.opc.as_deref().map(|o| (o, IoType::from_name(o))) {
            None => None,
            Some((_, Some(t))) => Some(t),
            // SPDK's code and words for a name it does not know.
            Some((o, None)) => return reply.send(Err(RpcError::new(INTERNAL_ERROR, format!("Invalid Io type: {o}")))),
        };
        Some(HistogramConfig {
            granularity: p.granularity.unwrap_or(d.granularity),
            min_nsec: p.min_nsec.unwrap_or(d.min_nsec),
            max_nsec: p.max_nsec.unwrap_or(d.max_nsec),
            io_type,
        })
    } else {
        None
    };
    histogram::enable(&h, config, move |r| reply.send(r.map(|()| Value::Bool(true)).map_err(super::bdev_error)));
}

#[derive(Deserialize)]
struct GetHistogram {
    name: String,
}

/// The bdev's histogram merged over its channels, serialised as SPDK's
/// `bdev_get_histogram` answers (SPDK's `scripts/histogram.py` reads it).
fn bdev_get_histogram(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let p: GetHistogram = match decode(params, &reply) {
        Ok(p) => p,
        Err(e) => return reply.send(Err(e)),
    };
    let h = match lookup(&p.name) {
        Ok(h) => h,
        Err(e) => return reply.send(Err(e)),
    };
    histogram::collect(&h, move |r| {
        reply.send(match r {
            Ok((shape, counts)) => Ok(json!({
                "histogram": histogram::encode(&counts),
                "granularity": shape.granularity,
                "min_range": shape.min_range,
                "max_range": shape.max_range,
                "tsc_rate": ::bdev::tsc::tick_rate(),
            })),
            // SPDK answers -32603 when a channel has no histogram.
            Err(e) => Err(RpcError::new(INTERNAL_ERROR, e.to_string())),
        })
    });
}
