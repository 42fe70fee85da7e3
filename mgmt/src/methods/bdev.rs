//! Bdev methods: listing, iostat, and the simple backends (malloc, null).
//! Each backend's create returns the new bdev's name; delete returns true
//! once the bdev is gone (after its in-flight IO drained).

use super::unsupported::{at, Accepted, Unsupported};
use super::{bdev_error, decode, sync_call, Ctx, Handler, NoParams, UnsupportedTable};
use crate::jsonrpc::{RpcError, INVALID_PARAMS};
use crate::server::Reply;
use ::bdev::malloc::{MallocBdev, NullBdev};
use ::bdev::{Bdev, BdevHandle, BdevProps, IoStatTotals, Registry};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use uuid::Uuid;

pub const METHODS: &[(&str, Handler)] = &[
    ("bdev_get_bdevs", bdev_get_bdevs),
    ("bdev_get_iostat", bdev_get_iostat),
    ("bdev_wait_for_examine", bdev_wait_for_examine),
    ("bdev_malloc_create", bdev_malloc_create),
    ("bdev_malloc_delete", |_, p, r| delete_of("malloc", p, r)),
    ("bdev_null_create", bdev_null_create),
    ("bdev_null_delete", |_, p, r| delete_of("null", p, r)),
    ("bdev_null_resize", bdev_null_resize),
    ("bdev_aio_create", |_, p, r| sync_call(p, r, |p| name_of(::bdev::uring::create_aio(p)))),
    ("bdev_aio_delete", |_, p, r| delete_of("aio", p, r)),
    ("bdev_aio_rescan", |_, p, r| rescan_of("aio", p, r)),
    ("bdev_uring_create", |_, p, r| sync_call(p, r, |p| name_of(::bdev::uring::create_uring(p)))),
    ("bdev_uring_delete", |_, p, r| delete_of("uring", p, r)),
    ("bdev_uring_rescan", |_, p, r| rescan_of("uring", p, r)),
    // SPDK answers `true` here rather than the new bdev's name.
    ("bdev_error_create", |_, p, r| sync_call(p, r, |p| name_of(::bdev::error::create(p)).map(|_| Value::Bool(true)))),
    ("bdev_error_delete", |_, p, r| delete_of("error", p, r)),
    ("bdev_error_inject_error", |_, p, r| sync_call(p, r, |p| done_of(::bdev::error::inject(p)))),
    ("bdev_error_resume_pending", |_, p, r| sync_call(p, r, |p| done_of(::bdev::error::resume_pending(p)))),
    ("bdev_delay_create", |_, p, r| sync_call(p, r, |p| name_of(::bdev::delay::create(p)))),
    ("bdev_delay_delete", |_, p, r| delete_of("delay", p, r)),
    ("bdev_delay_update_latency", |_, p, r| sync_call(p, r, |p| done_of(::bdev::delay::update_latency(p)))),
    ("bdev_set_options", bdev_set_options),
];

const NO_METADATA: &str = "per-block metadata";
const NO_DIF: &str = "protection information (DIF/DIX)";
const NO_HINTS: &str = "write or unmap alignment hints";
/// Per-block metadata and protection information, as the malloc and null
/// bdevs take them (SPDK's defaults: none).
const METADATA_AND_DIF: [Unsupported; 4] = [
    at("md_size", Accepted::Int(0), NO_METADATA),
    at("dif_type", Accepted::Int(0), NO_DIF),
    at("dif_is_head_of_md", Accepted::Bool(false), NO_DIF),
    at("dif_pi_format", Accepted::Int(0), NO_DIF),
];

/// Parameters SPDK defines for these methods whose feature nvraid lacks
/// (see `unsupported`).
pub(crate) const UNSUPPORTED: UnsupportedTable = &[
    (
        "bdev_malloc_create",
        &[
            METADATA_AND_DIF[0],
            METADATA_AND_DIF[1],
            METADATA_AND_DIF[2],
            METADATA_AND_DIF[3],
            at("md_interleave", Accepted::Bool(false), NO_METADATA),
            at("numa_id", Accepted::Int(-1), "NUMA placement of bdev memory"),
        ],
    ),
    (
        "bdev_null_create",
        &[
            METADATA_AND_DIF[0],
            METADATA_AND_DIF[1],
            METADATA_AND_DIF[2],
            METADATA_AND_DIF[3],
            at("preferred_write_alignment", Accepted::Int(0), NO_HINTS),
            at("preferred_write_granularity", Accepted::Int(0), NO_HINTS),
            at("optimal_write_size", Accepted::Int(0), NO_HINTS),
            at("preferred_unmap_alignment", Accepted::Int(0), NO_HINTS),
            at("preferred_unmap_granularity", Accepted::Int(0), NO_HINTS),
        ],
    ),
    ("bdev_aio_create", &[at("nowait", Accepted::Bool(false), "RWF_NOWAIT submission")]),
    (
        "bdev_get_iostat",
        &[
            at("per_channel", Accepted::Bool(false), "per-channel statistics (counters are summed per bdev)"),
            at("reset_mode", Accepted::Str("none"), "statistics reset (counters are cumulative)"),
        ],
    ),
    // The bdev layer's pools: each reactor owns a fixed pool of IO
    // descriptors and there is no iobuf layer, so SPDK's defaults (which
    // its save_config writes) are accepted and nothing else.
    (
        "bdev_set_options",
        &[
            at("bdev_io_cache_size", Accepted::Int(256), "per-thread bdev_io cache (each reactor owns its pool)"),
            at("bdev_auto_examine", Accepted::Bool(true), "way to skip examine (arrays assemble on examine)"),
            at("iobuf_small_cache_size", Accepted::Int(128), "iobuf buffer caches"),
            at("iobuf_large_cache_size", Accepted::Int(16), "iobuf buffer caches"),
        ],
    ),
];

/// SPDK's default `bdev_io_pool_size`, which its `save_config` writes: it
/// leaves nvraid's own default (`bdev::io::DEFAULT_IO_POOL_SIZE` a reactor).
const SPDK_DEFAULT_IO_POOL_SIZE: u64 = 65535;

#[derive(Deserialize)]
struct SetOptions {
    bdev_io_pool_size: Option<u64>,
}

/// `bdev_io_pool_size` is the number of IO descriptors in all; nvraid gives
/// each reactor an equal share, its own pool. The other options are in
/// UNSUPPORTED: what reaches here asked for SPDK's defaults.
fn bdev_set_options(ctx: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let reactors = ctx.reactors.count().max(1) as u64;
    sync_call(params, reply, move |p: SetOptions| {
        let Some(total) = p.bdev_io_pool_size.filter(|&n| n != SPDK_DEFAULT_IO_POOL_SIZE) else {
            return Ok(Value::Bool(true));
        };
        let per_reactor = total / reactors;
        if per_reactor < 256 {
            return Err(RpcError::invalid_params(format!(
                "bdev_io_pool_size {total} leaves {per_reactor} descriptors to each of {reactors} reactors; at least 256 each"
            )));
        }
        ::bdev::io::set_pool_size(per_reactor as usize).map_err(|e| RpcError::errno(libc::EPERM, e))?;
        Ok(Value::Bool(true))
    });
}

/// A created bdev's name, as most `*_create` methods reply.
fn name_of(r: Result<BdevHandle, ::bdev::BdevError>) -> Result<Value, RpcError> {
    r.map(|h| Value::String(h.name().to_string())).map_err(bdev_error)
}

fn done_of(r: Result<(), ::bdev::BdevError>) -> Result<Value, RpcError> {
    r.map(|()| Value::Bool(true)).map_err(bdev_error)
}

/// The calls that recreate every bdev, in registration order (members come
/// before the arrays built on them), then an examine barrier as SPDK writes.
pub fn subsystem_config() -> Vec<Value> {
    // Module options first, as SPDK writes them, so bdevs are created under them.
    let mut out = vec![super::raid::options_config()];
    out.extend(Registry::get().list().iter().filter_map(|h| h.config()));
    // After the controllers they belong to.
    out.extend(::nvmf::host::failover_paths_config());
    out.extend(::nvmf::host::multipath_policies_config());
    // After every controller, as SPDK writes it: the monitor then finds them attached.
    out.push(::nvme::hotplug::config_json());
    out.push(json!({"method": "bdev_wait_for_examine"}));
    // Rate limits and histograms, once every bdev (assembled arrays too) exists.
    out.extend(super::bdev_qos::subsystem_config());
    out
}

#[derive(Deserialize, Default)]
struct GetBdevs {
    name: Option<String>,
    #[serde(default)]
    timeout: u64,
}

fn bdev_get_bdevs(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let p: GetBdevs = match decode(params, &reply) {
        Ok(p) => p,
        Err(e) => return reply.send(Err(e)),
    };
    let Some(name) = p.name else {
        let all: Vec<Value> = Registry::get().list().iter().map(BdevHandle::info_json).collect();
        return reply.send(Ok(Value::Array(all)));
    };
    // With a timeout, wait (without blocking the reactor) for the bdev to appear.
    let deadline_ns = reactor::now_ns() + p.timeout.saturating_mul(1_000_000);
    let mut reply = Some(reply);
    let mut check = move || {
        let found = Registry::get().lookup(&name);
        if found.is_none() && reactor::now_ns() < deadline_ns {
            return reactor::PollStatus::Idle;
        }
        if let Some(reply) = reply.take() {
            reply.send(match found {
                Some(h) => Ok(json!([h.info_json()])),
                // SPDK's text for ENODEV leads: spdk-csi recognises a
                // missing volume by it.
                None => Err(RpcError::errno(libc::ENODEV, format!("No such device: bdev {name} not found"))),
            });
        }
        reactor::PollStatus::Done
    };
    if check() == reactor::PollStatus::Idle {
        reactor::register_timed_poller("bdev_get_bdevs_wait", std::time::Duration::from_millis(10), check);
    }
}

#[derive(Deserialize, Default)]
struct GetIostat {
    /// Older clients send one name; current ones send `names`.
    name: Option<String>,
    names: Option<Vec<String>>,
}

fn bdev_get_iostat(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let p: GetIostat = match decode(params, &reply) {
        Ok(p) => p,
        Err(e) => return reply.send(Err(e)),
    };
    let wanted: Vec<String> = p.names.unwrap_or_default().into_iter().chain(p.name).collect();
    let handles = if wanted.is_empty() {
        Registry::get().list()
    } else {
        let mut hs = Vec::new();
        for n in wanted {
            match Registry::get().lookup(&n) {
                Some(h) => hs.push(h),
                None => {
                    return reply
                        .send(Err(RpcError::errno(libc::ENODEV, format!("No such device: bdev {n} not found"))))
                }
            }
        }
        hs
    };
    collect_iostat(handles, Vec::new(), reply);
}

/// Sums each bdev's per-reactor counters, one bdev after another.
fn collect_iostat(mut rest: Vec<BdevHandle>, mut acc: Vec<Value>, reply: Reply) {
    let Some(h) = rest.pop() else {
        acc.reverse();
        let ticks = ::bdev::tsc::ticks();
        return reply.send(Ok(json!({"tick_rate": ::bdev::tsc::tick_rate(), "ticks": ticks, "bdevs": acc})));
    };
    let name = h.name().to_string();
    Registry::iostat(&h, move |t: IoStatTotals| {
        let mut v = serde_json::to_value(&t).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("name".into(), Value::String(name));
            // nvraid's bdevs offer no copy IO type, so none was ever done;
            // SPDK's clients read these keys (the Ceph gateway's per-namespace
            // stats fail without them).
            for k in [
                "bytes_copied",
                "num_copy_ops",
                "copy_latency_ticks",
                "max_copy_latency_ticks",
                "min_copy_latency_ticks",
            ] {
                o.insert(k.into(), json!(0));
            }
        }
        acc.push(v);
        collect_iostat(rest, acc, reply);
    });
}

fn bdev_wait_for_examine(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    // Examiners that read their bdev (a RAID looking for its superblock)
    // hold the registry's examine count until they have decided; answer
    // once none is left. Polled without blocking the reactor.
    if let Err(e) = decode::<NoParams>(params, &reply) {
        return reply.send(Err(e));
    }
    let mut reply = Some(reply);
    let mut check = move || {
        if Registry::get().examines_pending() > 0 {
            return reactor::PollStatus::Idle;
        }
        if let Some(reply) = reply.take() {
            reply.send(Ok(Value::Bool(true)));
        }
        reactor::PollStatus::Done
    };
    if check() == reactor::PollStatus::Idle {
        reactor::register_timed_poller("bdev_wait_for_examine", std::time::Duration::from_millis(1), check);
    }
}

pub(crate) fn parse_uuid(s: Option<&str>) -> Result<Option<Uuid>, RpcError> {
    s.map(|s| Uuid::parse_str(s).map_err(|e| RpcError::invalid_params(format!("uuid '{s}': {e}")))).transpose()
}

/// Registers `bdev` and replies with its name.
pub(crate) fn register_reply(bdev: Result<Arc<dyn Bdev>, ::bdev::BdevError>) -> Result<Value, RpcError> {
    let h = Registry::get().register(bdev.map_err(bdev_error)?).map_err(bdev_error)?;
    Ok(Value::String(h.name().to_string()))
}

#[derive(Deserialize)]
struct MallocCreate {
    name: Option<String>,
    num_blocks: u64,
    block_size: u32,
    physical_block_size: Option<u32>,
    uuid: Option<String>,
    #[serde(default)]
    optimal_io_boundary: u32,
}

/// nvraid's bdevs report their block size as the physical block size too;
/// SPDK's save_config writes it explicitly, so that value is accepted.
fn check_physical_block_size(method: &str, physical: Option<u32>, block_size: u32) -> Result<(), RpcError> {
    match physical {
        Some(p) if p != block_size => Err(RpcError::new(
            INVALID_PARAMS,
            format!(
                "{method}: physical_block_size={p} is not supported (nvraid has no physical block size apart \
                 from the block size); leave it out or give {block_size}"
            ),
        )),
        _ => Ok(()),
    }
}

fn bdev_malloc_create(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let method = reply.method();
    sync_call(params, reply, |p: MallocCreate| {
        check_physical_block_size(method, p.physical_block_size, p.block_size)?;
        let name = p.name.unwrap_or_else(|| free_name("Malloc"));
        let mut props =
            BdevProps::new(&name, "Malloc disk", p.block_size, p.num_blocks, parse_uuid(p.uuid.as_deref())?);
        props.optimal_io_boundary = p.optimal_io_boundary;
        if Registry::get().lookup(&name).is_some() {
            return Err(bdev_error(::bdev::BdevError::Exists(name)));
        }
        register_reply(MallocBdev::new(props).map(|b| Arc::new(b) as Arc<dyn Bdev>))
    });
}

#[derive(Deserialize)]
struct NullCreate {
    name: String,
    num_blocks: u64,
    block_size: u32,
    physical_block_size: Option<u32>,
    uuid: Option<String>,
}

fn bdev_null_create(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let method = reply.method();
    sync_call(params, reply, |p: NullCreate| {
        check_physical_block_size(method, p.physical_block_size, p.block_size)?;
        let props = BdevProps::new(&p.name, "Null disk", p.block_size, p.num_blocks, parse_uuid(p.uuid.as_deref())?);
        register_reply(NullBdev::new(props).map(|b| Arc::new(b) as Arc<dyn Bdev>))
    });
}

#[derive(Deserialize)]
struct NullResize {
    name: String,
    /// The new size in MiB (SPDK's unit for this call).
    new_size: u64,
}

/// Grows a null bdev to `new_size` MiB, as SPDK does: a smaller size than
/// the current one is refused; holders (a RAID, an NVMe-oF namespace) get
/// the resize event.
fn bdev_null_resize(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: NullResize| {
        let h = Registry::get()
            .lookup(&p.name)
            .ok_or_else(|| RpcError::errno(libc::ENODEV, format!("bdev {} not found", p.name)))?;
        if h.bdev().module() != "null" {
            return Err(RpcError::errno(
                libc::EINVAL,
                format!("bdev {} is a {} bdev, not null", p.name, h.bdev().module()),
            ));
        }
        const MIB: u64 = 1 << 20;
        let block_size = u64::from(h.props().block_size);
        let new_bytes = p
            .new_size
            .checked_mul(MIB)
            .ok_or_else(|| RpcError::errno(libc::EINVAL, format!("new_size {} MiB is too large", p.new_size)))?;
        let current_mib = h.size_bytes() / MIB;
        if p.new_size < current_mib {
            return Err(RpcError::errno(
                libc::EINVAL,
                format!(
                    "bdev {}: the new size ({} MiB) must not be smaller than the current size ({current_mib} MiB)",
                    p.name, p.new_size
                ),
            ));
        }
        h.notify_blockcnt_change(new_bytes / block_size).map_err(bdev_error)?;
        Ok(Value::Bool(true))
    });
}

/// Shared by `bdev_aio_rescan` and `bdev_uring_rescan`: the file (or block
/// device) is measured again and the bdev takes its size; holders hear of
/// it. A shrink is refused while the bdev is open (EBUSY), as SPDK does.
fn rescan_of(module: &'static str, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: Delete| {
        let h = Registry::get()
            .lookup(&p.name)
            .ok_or_else(|| RpcError::errno(libc::ENODEV, format!("bdev {} not found", p.name)))?;
        if h.bdev().module() != module {
            return Err(RpcError::errno(
                libc::ENODEV,
                format!("bdev {} is a {} bdev, not {module}", p.name, h.bdev().module()),
            ));
        }
        let blocks = h
            .bdev()
            .rescan_blocks()
            .ok_or_else(|| RpcError::errno(libc::EINVAL, format!("bdev {} cannot be measured again", p.name)))?
            .map_err(bdev_error)?;
        if blocks == 0 {
            return Err(RpcError::errno(
                libc::EINVAL,
                format!("bdev {}: the file is now smaller than a block", p.name),
            ));
        }
        h.notify_blockcnt_change(blocks).map_err(bdev_error)?;
        Ok(Value::Bool(true))
    });
}

/// First unused `PREFIX<n>` name, as SPDK names unnamed bdevs.
fn free_name(prefix: &str) -> String {
    let r = Registry::get();
    (0..).map(|i| format!("{prefix}{i}")).find(|n| r.lookup(n).is_none()).unwrap_or_default()
}

#[derive(Deserialize)]
struct Delete {
    name: String,
}

/// Shared by every `bdev_<module>_delete`: the bdev must be of that module;
/// unregister is refused while it is claimed, and the reply comes once its
/// in-flight IO has drained and it is destructed.
pub(crate) fn delete_of(module: &str, params: Option<Value>, reply: Reply) {
    let p: Delete = match decode(params, &reply) {
        Ok(p) => p,
        Err(e) => return reply.send(Err(e)),
    };
    match Registry::get().lookup(&p.name) {
        None => return reply.send(Err(RpcError::errno(libc::ENODEV, format!("bdev {} not found", p.name)))),
        Some(h) if h.bdev().module() != module => {
            return reply.send(Err(RpcError::errno(
                libc::EINVAL,
                format!("bdev {} is a {} bdev, not {module}", p.name, h.bdev().module()),
            )))
        }
        Some(_) => {}
    }
    Registry::get().unregister(&p.name, move |r| reply.send(r.map(|()| Value::Bool(true)).map_err(bdev_error)));
}
