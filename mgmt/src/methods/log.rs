//! SPDK's log methods (`log_set_level`, `log_set_print_level`, their
//! getters, `log_set_flag` / `log_clear_flag` / `log_get_flags`) mapped
//! onto the daemon's `tracing` filter, which they change at run time
//! through a reload handle; and `thread_get_stats`, the reactors' measured
//! busy and idle time, for the same monitoring tools.
//!
//! nvraid has one log output, standard error. SPDK writes a message when
//! either its log level (syslog) or its print level (console) admits it;
//! nvraid writes it to its one output under the same rule, so the filter's
//! level is the more verbose of the two. SPDK's flags turn on one
//! component's debug messages; here a flag is a crate (`tracing` target)
//! whose `debug!` events show while the level is DEBUG, as SPDK's
//! `SPDK_DEBUGLOG` shows only then. tracing has no NOTICE: NOTICE and INFO
//! both show `info!` and above.

use super::{sync_call, Ctx, Handler, NoParams};
use crate::jsonrpc::RpcError;
use crate::server::Reply;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex, OnceLock};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

pub const METHODS: &[(&str, Handler)] = &[
    ("log_set_level", |_, p, r| set_level(false, p, r)),
    ("log_get_level", |_, p, r| get_level(false, p, r)),
    ("log_set_print_level", |_, p, r| set_level(true, p, r)),
    ("log_get_print_level", |_, p, r| get_level(true, p, r)),
    ("log_set_flag", |_, p, r| flag(true, p, r)),
    ("log_clear_flag", |_, p, r| flag(false, p, r)),
    ("log_get_flags", log_get_flags),
    ("thread_get_stats", thread_get_stats),
];

/// The crates that log, by the name of their `tracing` target: the flags.
pub const FLAGS: &[&str] =
    &["bdev", "bdev_raid", "bitmap", "iscsi", "mgmt", "nvme", "nvmf", "nvraid_tgt", "parity", "reactor"];

/// SPDK's log levels, least verbose first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warning,
    Notice,
    Info,
    Debug,
}

impl Level {
    const ALL: [Level; 5] = [Level::Error, Level::Warning, Level::Notice, Level::Info, Level::Debug];

    pub fn name(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warning => "WARNING",
            Level::Notice => "NOTICE",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }

    pub fn parse(name: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == name)
    }

    /// The level named by a `tracing` directive's level ("trace" is the
    /// most verbose there is: DEBUG).
    fn from_tracing(name: &str) -> Option<Level> {
        match name.to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" => Some(Level::Warning),
            "info" => Some(Level::Info),
            "debug" | "trace" => Some(Level::Debug),
            _ => None,
        }
    }
}

/// The levels and flags the filter is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub level: Level,
    pub print_level: Level,
    /// Enabled flags, in `FLAGS` order.
    pub flags: Vec<&'static str>,
}

impl Default for LogSettings {
    /// What the daemon logs without NVRAID_LOG: `info!` and above.
    fn default() -> Self {
        LogSettings { level: Level::Notice, print_level: Level::Info, flags: Vec::new() }
    }
}

impl LogSettings {
    /// Settings from an NVRAID_LOG value made of `level` and `crate=level`
    /// directives; None for anything else (the caller keeps the defaults).
    /// A debug directive for a crate enables its flag; a global one, every
    /// flag; either makes both levels DEBUG.
    pub fn from_directives(s: &str) -> Option<LogSettings> {
        let mut out = LogSettings::default();
        let mut base: Option<Level> = None;
        let mut debug_flags: Vec<&'static str> = Vec::new();
        for d in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            match d.split_once('=') {
                None => base = Some(Level::from_tracing(d)?),
                Some((target, level)) => {
                    let flag = FLAGS.iter().find(|f| **f == target)?;
                    if Level::from_tracing(level)? == Level::Debug {
                        debug_flags.push(flag);
                    }
                }
            }
        }
        let base = base.unwrap_or(Level::Info);
        if base == Level::Debug {
            debug_flags = FLAGS.to_vec();
        }
        let level = if debug_flags.is_empty() { base } else { Level::Debug };
        out.level = level;
        out.print_level = level;
        out.flags = FLAGS.iter().copied().filter(|f| debug_flags.contains(f)).collect();
        Some(out)
    }

    /// The `tracing` filter directives these settings give.
    pub fn directives(&self) -> String {
        let shown = self.level.max(self.print_level);
        let mut d = match shown {
            Level::Error => "error",
            Level::Warning => "warn",
            Level::Notice | Level::Info | Level::Debug => "info",
        }
        .to_string();
        if shown == Level::Debug {
            for f in &self.flags {
                d.push_str(&format!(",{f}=debug"));
            }
        }
        d
    }
}

struct Logging {
    settings: Mutex<LogSettings>,
    /// None where no subscriber of ours is installed (tests of the method
    /// table): the settings are kept and reported, and nothing is reloaded.
    reload: Option<reload::Handle<EnvFilter, Registry>>,
}

static LOGGING: OnceLock<Logging> = OnceLock::new();

fn logging() -> &'static Logging {
    LOGGING.get_or_init(|| Logging { settings: Mutex::new(LogSettings::default()), reload: None })
}

/// Installs the daemon's subscriber: plain text to standard error (colour
/// only when `ansi`), filtered by NVRAID_LOG's `level` / `crate=level`
/// directives (info without it), changeable by the log methods.
pub fn init(ansi: bool) {
    let env = std::env::var("NVRAID_LOG").ok();
    let settings = match env.as_deref().map(LogSettings::from_directives) {
        None => LogSettings::default(),
        Some(Some(s)) => s,
        Some(None) => {
            eprintln!(
                "nvraid-tgt: NVRAID_LOG: only 'level' and 'crate=level' directives are understood \
                 (crates: {}); logging at info",
                FLAGS.join(", ")
            );
            LogSettings::default()
        }
    };
    let (filter, handle) = reload::Layer::new(EnvFilter::new(settings.directives()));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    tracing_subscriber::registry().with(filter).with(fmt).init();
    let _ = LOGGING.set(Logging { settings: Mutex::new(settings), reload: Some(handle) });
}

/// Applies a change to the settings and reloads the filter.
fn update(change: impl FnOnce(&mut LogSettings)) -> Result<(), RpcError> {
    let l = logging();
    let mut s = l.settings.lock().unwrap_or_else(|e| e.into_inner());
    let mut next = s.clone();
    change(&mut next);
    if let Some(h) = &l.reload {
        h.reload(EnvFilter::new(next.directives())).map_err(|e| RpcError::internal(format!("log filter: {e}")))?;
    }
    *s = next;
    Ok(())
}

/// The current settings.
pub fn settings() -> LogSettings {
    logging().settings.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

#[derive(Deserialize)]
struct SetLevel {
    level: String,
}

fn set_level(print: bool, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, move |p: SetLevel| {
        let level = Level::parse(&p.level).ok_or_else(|| {
            RpcError::invalid_params(format!("level '{}' is not one of ERROR, WARNING, NOTICE, INFO, DEBUG", p.level))
        })?;
        update(|s| if print { s.print_level = level } else { s.level = level })?;
        Ok(Value::Bool(true))
    });
}

fn get_level(print: bool, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, move |_: NoParams| {
        let s = settings();
        Ok(json!(if print { s.print_level } else { s.level }.name()))
    });
}

#[derive(Deserialize)]
struct Flag {
    flag: String,
}

fn flag(enable: bool, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, move |p: Flag| {
        let chosen: Vec<&'static str> = if p.flag == "all" {
            FLAGS.to_vec()
        } else {
            let f = FLAGS.iter().find(|f| **f == p.flag).ok_or_else(|| {
                RpcError::invalid_params(format!("invalid log flag '{}' (flags: {})", p.flag, FLAGS.join(", ")))
            })?;
            vec![*f]
        };
        update(|s| {
            let on: Vec<&'static str> = FLAGS
                .iter()
                .copied()
                .filter(|f| if chosen.contains(f) { enable } else { s.flags.contains(f) })
                .collect();
            s.flags = on;
        })?;
        Ok(Value::Bool(true))
    });
}

fn log_get_flags(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |_: NoParams| {
        let s = settings();
        let map: serde_json::Map<String, Value> =
            FLAGS.iter().map(|f| (f.to_string(), Value::Bool(s.flags.contains(f)))).collect();
        Ok(Value::Object(map))
    });
}

/// `thread_get_stats`: one entry per reactor (nvraid's reactor is SPDK's
/// reactor and its one thread, named as `framework_get_reactors` lists
/// it), with the busy and idle ticks the reactor measured of its own loop
/// and the pollers registered on it (every-loop and timed; none is ever
/// paused).
fn thread_get_stats(ctx: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let set = ctx.reactors.clone();
    sync_call(params, reply, move |_: NoParams| {
        let threads: Vec<Value> = (0..set.count())
            .map(|id| {
                let stats = set.stats(id).unwrap_or_default();
                let core = set.core(id).unwrap_or(id);
                json!({
                    "name": if id == 0 { "app_thread".to_string() } else { format!("reactor_{id}") },
                    "id": id + 1,
                    "cpumask": format!("{:x}{}", 1u8 << (core % 4), "0".repeat(core / 4)),
                    "busy": stats.busy_ticks,
                    "idle": stats.idle_ticks,
                    "active_pollers_count": stats.every_loop_pollers,
                    "timed_pollers_count": stats.timed_pollers,
                    // nvraid cannot pause a poller.
                    "paused_pollers_count": 0,
                })
            })
            .collect();
        Ok(json!({"tick_rate": reactor::tsc::tick_rate(), "threads": threads}))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_more_verbose_level_sets_the_filter_and_flags_need_debug() {
        let mut s = LogSettings::default();
        assert_eq!(s.directives(), "info");
        s.level = Level::Error;
        s.print_level = Level::Warning;
        assert_eq!(s.directives(), "warn");
        s.flags = vec!["nvmf"];
        assert_eq!(s.directives(), "warn", "a flag shows debug messages only at DEBUG");
        s.print_level = Level::Debug;
        assert_eq!(s.directives(), "info,nvmf=debug");
    }

    #[test]
    fn nvraid_log_directives_become_settings() {
        assert_eq!(
            LogSettings::from_directives("info"),
            Some(LogSettings { level: Level::Info, ..Default::default() })
        );
        let d = LogSettings::from_directives("debug").unwrap();
        assert_eq!((d.level, d.print_level, d.flags.len()), (Level::Debug, Level::Debug, FLAGS.len()));
        let n = LogSettings::from_directives("warn,nvmf=debug").unwrap();
        assert_eq!((n.level, n.flags.clone()), (Level::Debug, vec!["nvmf"]));
        assert_eq!(n.directives(), "info,nvmf=debug");
        assert_eq!(LogSettings::from_directives("nvmf::tgt=debug"), None);
        assert_eq!(LogSettings::from_directives("loud"), None);
    }
}
