//! The RAID methods of SPDK's JSON-RPC, as plain functions over typed
//! parameters with SPDK's names (unknown keys are ignored, as SPDK's client
//! sends extra default-valued ones). The management crate decodes the JSON
//! into these structs and sends what these return; asynchronous methods
//! answer through `done`. Errors are `BdevError`s (the RPC error code is
//! `-errno()`), with messages that say what was wrong.
//!
//! Every function must run on a reactor of the set (the management reactor).

use crate::array::{self, CreateSpec, RaidModule, RaidOptions, RaidState};
use bdev::BdevError;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use uuid::Uuid;

/// `base_bdevs`: SPDK's client sends a list; a space-separated string (the
/// older form, `-b "Malloc0 Malloc1"`) is accepted too.
fn names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Names {
        List(Vec<String>),
        Spaced(String),
    }
    Ok(match Names::deserialize(d)? {
        Names::List(v) => v,
        Names::Spaced(s) => s.split_whitespace().map(str::to_string).collect(),
    })
}

#[derive(Clone, Debug, Deserialize)]
pub struct RaidCreateParams {
    pub name: String,
    pub raid_level: String,
    #[serde(deserialize_with = "names")]
    pub base_bdevs: Vec<String>,
    #[serde(default)]
    pub strip_size_kb: Option<u32>,
    #[serde(default)]
    pub uuid: Option<String>,
    /// Every member carries the array's superblock (and, on raid1/raid10,
    /// its write-intent bitmap); the array then assembles itself when its
    /// members appear, with no RPC.
    #[serde(default)]
    pub superblock: Option<bool>,
    /// With a superblock on raid1/raid10: keep a write-intent bitmap
    /// (default true).
    #[serde(default)]
    pub bitmap: Option<bool>,
    /// Bitmap chunk size (default 65536 KiB = 64 MiB; a power of two).
    #[serde(default)]
    pub bitmap_chunk_size_kb: Option<u32>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct RaidDeleteParams {
    pub name: String,
    /// Wipe the members' superblocks, so the array does not assemble again.
    #[serde(default)]
    pub clear_sb: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct RaidGetBdevsParams {
    /// `all` (also when absent), `online`, `configuring` or `offline`.
    #[serde(default)]
    pub category: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct RaidAddBaseBdevParams {
    pub raid_bdev: String,
    pub base_bdev: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct RaidRemoveBaseBdevParams {
    /// The member bdev's name.
    pub name: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct RaidCheckParams {
    pub name: String,
    /// Rewrite mismatching blocks from the first active copy (md's "repair").
    #[serde(default)]
    pub repair: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct RaidSetOptionsParams {
    #[serde(default)]
    pub process_window_size_kb: Option<u32>,
    #[serde(default)]
    pub process_max_bandwidth_mb_sec: Option<u32>,
    /// Seconds an assembling array waits for missing members before it
    /// starts degraded (when it can); 0 waits forever.
    #[serde(default)]
    pub assemble_timeout_sec: Option<u32>,
}

fn failed_to(what: &str, name: &str, e: BdevError) -> BdevError {
    BdevError::Os(format!("Failed to {what} RAID bdev {name}: {e}"), e.errno())
}

/// `bdev_raid_create` → `true`. Members that do not exist yet leave the
/// array `configuring` until they are registered. Without a superblock only
/// (it answers at once); see [`bdev_raid_create_async`].
pub fn bdev_raid_create(p: RaidCreateParams) -> Result<Value, BdevError> {
    let name = p.name.clone();
    let spec = validate_create(p).map_err(|e| failed_to("create", &name, e))?;
    if spec.superblock {
        return Err(failed_to("create", &name, BdevError::Invalid("use the asynchronous create".into())));
    }
    array::create(spec).map_err(|e| failed_to("create", &name, e))?;
    Ok(Value::Bool(true))
}

/// `bdev_raid_create` → `true`; with `superblock: true` it answers once the
/// superblocks and the bitmap are on every member and the array is online.
pub fn bdev_raid_create_async(p: RaidCreateParams, done: impl FnOnce(Result<Value, BdevError>) + Send + 'static) {
    let name = p.name.clone();
    let spec = match validate_create(p) {
        Ok(s) => s,
        Err(e) => return done(Err(failed_to("create", &name, e))),
    };
    let superblock = spec.superblock;
    match array::create(spec) {
        Err(e) => done(Err(failed_to("create", &name, e))),
        Ok(_) if !superblock => done(Ok(Value::Bool(true))),
        Ok(shared) => crate::examine::init_new(
            &shared,
            Box::new(move |r| done(r.map(|()| Value::Bool(true)).map_err(|e| failed_to("create", &name, e)))),
        ),
    }
}

fn validate_create(p: RaidCreateParams) -> Result<CreateSpec, BdevError> {
    if p.name.trim().is_empty() {
        return Err(BdevError::Invalid("name must not be empty".into()));
    }
    let level = crate::level::parse(&p.raid_level).ok_or_else(|| {
        BdevError::Invalid(format!("raid_level '{}' is not one of {}", p.raid_level, crate::level::names()))
    })?;
    let strip_size_kb = p.strip_size_kb.unwrap_or(0);
    if !level.uses_strips() {
        if strip_size_kb != 0 {
            return Err(BdevError::Invalid(format!("strip size is not supported by {}", level.name())));
        }
    } else if !strip_size_kb.is_power_of_two() {
        return Err(BdevError::Invalid(format!(
            "strip_size_kb must be a power of two greater than 0 for {} (got {strip_size_kb})",
            level.name()
        )));
    }
    array::check_member_count(level, p.base_bdevs.len())?;
    for (i, n) in p.base_bdevs.iter().enumerate() {
        if n.is_empty() {
            return Err(BdevError::Invalid("base bdev names must not be empty".into()));
        }
        if p.base_bdevs[..i].contains(n) {
            return Err(BdevError::Invalid(format!("base bdev {n} is listed twice")));
        }
    }
    let uuid = match p.uuid.as_deref().filter(|u| !u.is_empty()) {
        Some(u) => Some(Uuid::parse_str(u).map_err(|e| BdevError::Invalid(format!("uuid '{u}': {e}")))?),
        None => None,
    };
    let superblock = p.superblock.unwrap_or(false);
    if superblock {
        if let Some(why) = level.refuses(crate::level::LevelOp::Superblock) {
            return Err(BdevError::Invalid(why.into()));
        }
    }
    let chunk_kb = p.bitmap_chunk_size_kb.unwrap_or(65536);
    if !chunk_kb.is_power_of_two() {
        return Err(BdevError::Invalid(format!("bitmap_chunk_size_kb must be a power of two (got {chunk_kb})")));
    }
    let bitmap = superblock && level.is_redundant() && p.bitmap.unwrap_or(true);
    if p.bitmap == Some(true) && !(superblock && level.is_redundant()) {
        let redundant: Vec<&str> = crate::level::LEVELS.iter().filter(|l| l.is_redundant()).map(|l| l.name()).collect();
        return Err(BdevError::Invalid(format!("a bitmap needs superblock: true and {}", redundant.join(" or "))));
    }
    if p.name.len() >= crate::superblock::SB_NAME_BYTES && superblock {
        return Err(BdevError::Invalid(format!(
            "a name stored in a superblock is at most {} bytes",
            crate::superblock::SB_NAME_BYTES - 1
        )));
    }
    Ok(CreateSpec {
        name: p.name,
        level,
        base_bdevs: p.base_bdevs,
        strip_size_kb,
        uuid,
        superblock,
        bitmap_chunk_kb: if bitmap { chunk_kb } else { 0 },
    })
}

/// `bdev_raid_delete` → `true`, once in-flight IO has drained, held IO has
/// failed, the bdev is unregistered and the members are released.
pub fn bdev_raid_delete(p: RaidDeleteParams, done: impl FnOnce(Result<Value, BdevError>) + Send + 'static) {
    let name = p.name.clone();
    array::delete(
        &p.name,
        p.clear_sb.unwrap_or(false),
        Box::new(move |r| done(r.map(|()| Value::Bool(true)).map_err(|e| failed_to("delete", &name, e)))),
    );
}

/// `bdev_raid_get_bdevs` → the arrays of a category, in SPDK's shape.
pub fn bdev_raid_get_bdevs(p: RaidGetBdevsParams) -> Result<Value, BdevError> {
    let category = match p.category.as_deref().unwrap_or("all") {
        "all" => None,
        "online" => Some(RaidState::Online),
        "configuring" => Some(RaidState::Configuring),
        "offline" => Some(RaidState::Offline),
        other => {
            return Err(BdevError::Invalid(format!(
                "category '{other}' is not one of all, online, configuring, offline"
            )))
        }
    };
    Ok(Value::Array(array::list_json(category)))
}

/// `bdev_raid_add_base_bdev` → `true` once the member is in (a rebuild onto
/// it may still be running: see `process` in `bdev_raid_get_bdevs`).
pub fn bdev_raid_add_base_bdev(p: RaidAddBaseBdevParams, done: impl FnOnce(Result<Value, BdevError>) + Send + 'static) {
    let raid = p.raid_bdev.clone();
    array::add_base(
        &p.raid_bdev,
        &p.base_bdev,
        Box::new(move |r| done(r.map(|()| Value::Bool(true)).map_err(|e| failed_to("add a member to", &raid, e)))),
    );
}

/// `bdev_raid_remove_base_bdev` → `true` once the member is out.
pub fn bdev_raid_remove_base_bdev(
    p: RaidRemoveBaseBdevParams,
    done: impl FnOnce(Result<Value, BdevError>) + Send + 'static,
) {
    array::remove_base(&p.name, Box::new(move |r| done(r.map(|()| Value::Bool(true)))));
}

/// `bdev_raid_check` → `{name, blocks_checked, mismatched_blocks,
/// repaired_blocks, repair, completed, duration_ms}` once every copy of
/// every block was read and compared (md's `check`/`repair` sync actions).
/// User IO continues meanwhile; the scrub shows as `process` type "check".
pub fn bdev_raid_check(p: RaidCheckParams, done: impl FnOnce(Result<Value, BdevError>) + Send + 'static) {
    let name = p.name.clone();
    array::check(&p.name, p.repair, Box::new(move |r| done(r.map_err(|e| failed_to("check", &name, e)))));
}

/// `bdev_raid_set_options` → `true`. Applies from the next rebuild window.
pub fn bdev_raid_set_options(p: RaidSetOptionsParams) -> Result<Value, BdevError> {
    let module = RaidModule::get();
    let mut o = module.options();
    if let Some(w) = p.process_window_size_kb {
        if w == 0 {
            return Err(BdevError::Invalid("process_window_size_kb must be greater than 0".into()));
        }
        o.process_window_size_kb = w;
    }
    if let Some(b) = p.process_max_bandwidth_mb_sec {
        o.process_max_bandwidth_mb_sec = b;
    }
    if let Some(t) = p.assemble_timeout_sec {
        o.assemble_timeout_sec = t;
    }
    module.set_options(o);
    Ok(Value::Bool(true))
}

/// The `bdev_raid_set_options` call for `save_config` (the bdev subsystem
/// writes it before the bdevs, as SPDK does).
pub fn options_config() -> Value {
    let o: RaidOptions = RaidModule::get().options();
    json!({"method": "bdev_raid_set_options", "params": o})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_accept_spdk_shapes() {
        let p: RaidCreateParams = serde_json::from_value(json!({
            "name": "Raid1", "raid_level": "raid1", "base_bdevs": ["Malloc0", "Malloc1"], "superblock": false,
            "unknown_key": 5
        }))
        .unwrap();
        assert_eq!(p.base_bdevs, vec!["Malloc0", "Malloc1"]);
        let p: RaidCreateParams = serde_json::from_value(json!({
            "name": "R", "raid_level": "0", "base_bdevs": "A  B C", "strip_size_kb": 64
        }))
        .unwrap();
        assert_eq!(p.base_bdevs, vec!["A", "B", "C"]);
        assert!(serde_json::from_value::<RaidCreateParams>(json!({"name": "R", "raid_level": "0"})).is_err());
        let d: RaidDeleteParams = serde_json::from_value(json!({"name": "R", "clear_sb": false})).unwrap();
        assert_eq!(d.name, "R");
    }

    #[test]
    fn create_validation_errors_are_einval() {
        let base = |level: &str, strip: Option<u32>, names: &[&str]| RaidCreateParams {
            name: "R".into(),
            raid_level: level.into(),
            base_bdevs: names.iter().map(|s| s.to_string()).collect(),
            strip_size_kb: strip,
            uuid: None,
            superblock: None,
            bitmap: None,
            bitmap_chunk_size_kb: None,
        };
        for (p, why) in [
            (base("raid0", None, &["A", "B"]), "missing strip"),
            (base("raid0", Some(48), &["A", "B"]), "strip not a power of two"),
            (base("raid1", Some(64), &["A", "B"]), "raid1 with strip"),
            (base("raid1", None, &["A"]), "too few"),
            (base("raid4", Some(64), &["A", "B", "C", "D"]), "unknown level"),
            (base("raid6", Some(64), &["A", "B", "C"]), "raid6 with three members"),
            (base("raid6", None, &["A", "B", "C", "D"]), "raid6 without strip"),
            (base("raid5f", Some(64), &["A", "B"]), "raid5 with two members"),
            (base("raid5f", None, &["A", "B", "C"]), "raid5 without strip"),
            (base("concat", Some(64), &["A", "A"]), "duplicate"),
        ] {
            let e = validate_create(p).err().unwrap_or_else(|| panic!("{why} accepted"));
            assert_eq!(e.errno(), 22, "{why}: {e}");
        }
        let mut p = base("raid5", Some(64), &["A", "B", "C"]);
        p.superblock = Some(true);
        assert!(validate_create(p).is_ok(), "raid5 with a superblock (and bitmap) is accepted");
        assert!(validate_create(base("raid5f", Some(64), &["A", "B", "C"])).is_ok());
        let mut p = base("raid6", Some(64), &["A", "B", "C", "D"]);
        p.superblock = Some(true);
        assert!(validate_create(p).is_ok(), "raid6 with a superblock (and bitmap) is accepted");
        let mut p = base("raid10", Some(64), &["A", "B", "C", "D"]);
        p.uuid = Some("not-a-uuid".into());
        assert!(validate_create(p).is_err());
        assert!(validate_create(base("10", Some(4), &["A", "B"])).is_ok());
    }
}
