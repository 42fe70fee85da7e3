//! `nvraid-tgt`: the nvraid daemon. Starts the reactors, applies the start-up
//! config, serves JSON-RPC, and shuts down in order on SIGINT/SIGTERM (also
//! when `spdk_kill_instance` sends them): RPC first, then every bdev once its
//! in-flight IO has completed, then the reactors.
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use mgmt::bdev::{self, Registry};
use mgmt::reactor::{self, IdlePolicy, PollStatus, ReactorConfig, ReactorSet};
use mgmt::server::RpcServer;
use mgmt::{config, Ctx, MethodTable};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

const DEFAULT_CONFIG: &str = include_str!("default_config.json");

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Idle {
    /// Poll without pause (lowest latency; one core per reactor fully used).
    Busy,
    /// Sleep when idle (tests, laptops, small machines).
    Sleep,
}

#[derive(Parser, Debug)]
#[command(name = "nvraid-tgt", version, about = "nvraid: polled NVMe RAID target")]
struct Args {
    /// Core mask of the reactors, hex (0x3) or list ([0,2-3]).
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    cpumask: String,
    /// JSON-RPC Unix socket.
    #[arg(short = 'r', long = "rpc-socket", default_value = "/var/tmp/spdk.sock")]
    rpc_socket: PathBuf,
    /// Start-up config (as written by `spdk-rpc save_config`).
    #[arg(short = 'c', long = "json", alias = "config")]
    json: Option<PathBuf>,
    /// Use the embedded default config (two malloc bdevs) when no -c is given.
    #[arg(long)]
    default_config: bool,
    /// What a reactor does when it has no work (default: busy).
    #[arg(long, value_enum)]
    idle: Option<Idle>,
    /// Interrupt mode (SPDK's flag): an idle reactor sleeps until a device
    /// interrupt (NVMe completions through MSI-X), a message or a timer
    /// wakes it. Implies sleeping when idle; refused with --idle busy.
    #[arg(long)]
    interrupt_mode: bool,
    /// Do not use hugepages for DMA memory.
    #[arg(long)]
    no_huge: bool,
    /// Do not pin reactor threads to their cores.
    #[arg(long)]
    no_pin: bool,
}

enum Event {
    Ready,
    InitFailed(String),
    Shutdown(String),
}

fn main() {
    // Colour codes only for a person at a terminal: a log file or a pipe
    // gets plain text that grep and log collectors read as written. The
    // filter (NVRAID_LOG) changes at run time through the log_* methods.
    mgmt::methods::log::init(std::io::stderr().is_terminal());
    if let Err(e) = run(Args::parse()) {
        eprintln!("nvraid-tgt: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let cores = reactor::parse_core_mask(&args.cpumask).map_err(|e| anyhow::anyhow!("{e}"))?;
    let config_text = match (&args.json, args.default_config) {
        (Some(p), _) => std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?,
        (None, true) => DEFAULT_CONFIG.to_string(),
        (None, false) => r#"{"subsystems":[]}"#.to_string(),
    };
    let calls = config::parse(&config_text).map_err(|e| anyhow::anyhow!("config: {e}"))?;
    if args.no_huge {
        bdev::dma::disable_hugepages();
    }

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }

    let idle = match (args.idle, args.interrupt_mode) {
        (Some(Idle::Busy), true) => {
            bail!(
                "--interrupt-mode sleeps on interrupts when a reactor is idle; it cannot be combined with --idle busy"
            )
        }
        (_, true) => IdlePolicy::interrupt(),
        (None | Some(Idle::Busy), false) => IdlePolicy::BusyPoll,
        (Some(Idle::Sleep), false) => IdlePolicy::sleep(),
    };
    let mut cfg = ReactorConfig::new(cores, idle);
    cfg.pin = !args.no_pin;
    let set = ReactorSet::start(cfg, || {}).context("starting reactors")?;
    let (events, rx) = mpsc::channel::<Event>();

    let ev = events.clone();
    let ctx = Ctx { reactors: set.clone(), shutdown: Box::new(move |sig| deliver_signal(sig, &ev)) };
    let table = Arc::new(MethodTable::new(ctx));
    if let Err(e) = config::check_methods(&calls, &table) {
        set.stop();
        set.join();
        bail!("config: {e}");
    }

    let rpc_path = args.rpc_socket.clone();
    let rpc_running = Arc::new(AtomicBool::new(true));
    let running = rpc_running.clone();
    let ev = events.clone();
    set.send(0, move || {
        mgmt::init_modules();
        let t2 = table.clone();
        config::replay(table, calls, move |r| {
            if let Err(e) = r {
                let _ = ev.send(Event::InitFailed(e));
                return;
            }
            let mut server = match RpcServer::bind(&rpc_path) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ev.send(Event::InitFailed(format!("RPC socket {}: {e}", rpc_path.display())));
                    return;
                }
            };
            // A timed poller: accept()/read() syscalls every loop would tax
            // the IO path; SPDK polls its RPC server every few ms too.
            reactor::register_timed_poller("rpc", Duration::from_millis(1), move || {
                if !running.load(Ordering::Acquire) {
                    return PollStatus::Done; // drops the server, removing the socket
                }
                if server.poll(&*t2) {
                    PollStatus::Busy
                } else {
                    PollStatus::Idle
                }
            });
            let _ = ev.send(Event::Ready);
        });
    });

    let reason = loop {
        if stop.load(Ordering::Acquire) {
            break "signal".to_string();
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Event::Ready) => {
                let sock = args.rpc_socket.display();
                println!("nvraid-tgt: ready; JSON-RPC on {sock} (try: spdk-rpc -s {sock} bdev_get_bdevs)");
                for line in mgmt::methods::nvmf::connect_lines(&set) {
                    println!("nvraid-tgt: NVMe/TCP target up; connect with: {line}");
                }
                for line in mgmt::methods::iscsi::discovery_lines(&set) {
                    println!("nvraid-tgt: iSCSI target up; discover with: {line}");
                }
            }
            Ok(Event::InitFailed(e)) => {
                shutdown(&set, &rpc_running);
                bail!("start-up config failed: {e}");
            }
            Ok(Event::Shutdown(sig)) => break sig,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break "internal".to_string(),
        }
    };
    tracing::info!(reason, "shutting down");
    shutdown(&set, &rpc_running);
    Ok(())
}

/// `spdk_kill_instance`: what SPDK does, which is to send the signal to
/// itself. SIGINT and SIGTERM are this daemon's orderly shutdown (asked of
/// the main thread directly, so the log names the signal); any other signal
/// is raised with its default action, which for SIGKILL is immediate death
/// and for SIGQUIT, SIGHUP and SIGUSR1 termination, as for SPDK's nvmf_tgt.
fn deliver_signal(sig: &str, events: &mpsc::Sender<Event>) {
    use signal_hook::consts::{SIGHUP, SIGKILL, SIGQUIT, SIGUSR1};
    let number = match sig {
        "SIGINT" | "SIGTERM" => {
            let _ = events.send(Event::Shutdown(sig.to_string()));
            return;
        }
        "SIGKILL" => SIGKILL,
        "SIGQUIT" => SIGQUIT,
        "SIGHUP" => SIGHUP,
        "SIGUSR1" => SIGUSR1,
        other => {
            // mgmt checks the name against SPDK's list first.
            tracing::error!(signal = other, "spdk_kill_instance: unknown signal ignored");
            return;
        }
    };
    tracing::warn!(signal = sig, "spdk_kill_instance: raising the signal; it takes its default action");
    // The default action even when the signal's disposition was inherited
    // as ignored (a daemon started under nohup ignores SIGHUP): the RPC
    // asked for the signal's effect, not for a no-op.
    if let Err(e) = signal_hook::low_level::emulate_default_handler(number) {
        tracing::error!(signal = sig, "spdk_kill_instance: raising the signal failed: {e}");
    }
}

/// Orderly shutdown: stop taking RPCs, stop the NVMe-oF and iSCSI targets
/// (listeners close, connections drain their in-flight IO), remove every bdev newest
/// first (an array before its members; each waits for its in-flight IO and
/// metadata), then stop the reactors.
fn shutdown(set: &ReactorSet, rpc_running: &AtomicBool) {
    rpc_running.store(false, Ordering::Release);
    let (tx, rx) = mpsc::channel();
    // Frontends first, then the bdevs (arrays write their clean state to
    // their members), then the controllers under them.
    set.send(0, move || {
        mgmt::methods::nvmf::shutdown(move || {
            mgmt::methods::iscsi::shutdown(move || {
                remove_all(move || {
                    mgmt::methods::nvme::shutdown(move || {
                        let _ = tx.send(());
                    })
                })
            })
        })
    });
    if rx.recv_timeout(Duration::from_secs(30)).is_err() {
        tracing::error!("bdevs did not finish within 30 s; stopping anyway");
    }
    set.stop();
    set.join();
}

fn remove_all(done: impl FnOnce() + Send + 'static) {
    let Some(h) = Registry::get().list().pop() else {
        return done();
    };
    let name = h.name().to_string();
    Registry::get().force_unregister(h, move |r| {
        if let Err(e) = r {
            tracing::warn!(name, "removing bdev at shutdown: {e}");
        }
        reactor::send(0, move || remove_all(done));
    });
}
