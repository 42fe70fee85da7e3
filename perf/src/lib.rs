//! `nvraid-perf`: a load generator like SPDK's bdevperf (local bdevs created
//! from the daemon's config format) and spdk_nvme_perf (an NVMe/TCP target),
//! with per-core HDR latency histograms merged at the end, stamped writes,
//! the verify workload, and the benchmark suite.
#![forbid(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod job;
pub mod local;
pub mod progress;
pub mod report;
pub mod svg;
pub mod workload;

/// The block stamp format and its checker (kept in `bdev` so that crates
/// below perf can use it too).
pub use mgmt::bdev::stamp;

pub use cli::{parse_from, Parsed, RunSpec, Target};
pub use local::Hooks;
pub use report::{LatencySummary, Report};
pub use workload::Workload;

use anyhow::Result;

/// Runs a checked spec. NVMe/TCP mode attaches the remote controller with
/// the project's initiator (`bdev_nvme_attach_controller`, served by
/// `nvmf::host`) and runs the same jobs on its namespace bdevs, with one IO
/// queue per reactor, as bdevperf does against an NVMe-oF bdev.
pub fn run(spec: &RunSpec, hooks: Hooks) -> Result<Report> {
    match &spec.target {
        Target::Local { .. } => local::run(spec, hooks),
        Target::Tcp(t) => {
            let mut local_spec = spec.clone();
            local_spec.target = Target::Local { config: cli::ConfigSource::Text(tcp_config(t)), bdevs: Vec::new() };
            local::run(&local_spec, hooks).map_err(|e| {
                let msg = format!("{e:#}");
                if msg.contains("bdev_nvme_attach_controller failed") {
                    anyhow::anyhow!("cannot reach NVMe/TCP target {}:{} ({}): {msg}", t.traddr, t.trsvcid, t.subnqn)
                } else if msg.contains("creates no bdev") {
                    anyhow::anyhow!(
                        "NVMe/TCP target {}:{} subsystem {} has no usable namespace",
                        t.traddr,
                        t.trsvcid,
                        t.subnqn
                    )
                } else {
                    e
                }
            })
        }
    }
}

/// Name of the controller NVMe/TCP mode attaches; its namespaces are
/// `PerfTcpn1`, `PerfTcpn2`, ...
pub const TCP_CONTROLLER: &str = "PerfTcp";

/// The config that attaches `t` as bdevs.
pub fn tcp_config(t: &cli::TransportId) -> String {
    serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_nvme_attach_controller", "params": {
            "name": TCP_CONTROLLER, "trtype": "TCP", "adrfam": t.adrfam, "traddr": t.traddr,
            "trsvcid": t.trsvcid, "subnqn": t.subnqn}}
    ]}]})
    .to_string()
}
