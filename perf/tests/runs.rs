//! Whole runs in process on sleeping, unpinned reactors: the verify workload
//! passes on a good bdev and reports the LBA of a corrupted block (through
//! the error bdev's corrupt_data mode, on reads and on writes), every
//! workload runs, the report files are written, and bad setups fail with a
//! clear error.

use mgmt::bdev::error::{self, ErrorCreateParams, ErrorInjectParams};
use perf::cli::RunSpec;
use perf::local::SetupHook;
use perf::stamp::StampError;
use perf::{Hooks, Workload};

fn config(calls: &str) -> String {
    format!(r#"{{"subsystems":[{{"subsystem":"bdev","config":[{calls}]}}]}}"#)
}

fn malloc(name: &str, blocks: u64, block_size: u32) -> String {
    format!(
        r#"{{"method":"bdev_malloc_create","params":{{"name":"{name}","num_blocks":{blocks},"block_size":{block_size}}}}}"#
    )
}

fn quiet(setup: Option<SetupHook>) -> Hooks {
    Hooks { setup, on_sample: None, quiet: true }
}

/// Wraps M0 in EE_M0 with one corrupt_data rule for `io_type`.
fn corrupt_hook(io_type: &'static str, offset: u64) -> SetupHook {
    Box::new(move || {
        error::create(ErrorCreateParams { base_name: "M0".into(), uuid: None }).map_err(|e| e.to_string())?;
        error::inject(ErrorInjectParams {
            name: "EE_M0".into(),
            io_type: io_type.into(),
            error_type: "corrupt_data".into(),
            num: Some(1),
            queue_depth: None,
            corrupt_offset: Some(offset),
            corrupt_value: Some(0x5a),
            nvme_sct: None,
            nvme_sc: None,
        })
        .map_err(|e| e.to_string())
    })
}

#[test]
fn verify_passes_on_a_good_bdev() {
    let cfg = config(&malloc("M0", 4096, 512));
    let mut spec = RunSpec::local(&cfg, &["M0"], Workload::Verify, 16, 4096);
    spec.seed = 7;
    let r = perf::run(&spec, quiet(None)).unwrap();
    assert!(r.total.ios > 100, "verify ran only {} IOs", r.total.ios);
    assert_eq!(r.total.errors, 0);
    assert_eq!(r.total.mismatch_count, 0, "{:?}", r.mismatches);
}

#[test]
fn verify_reports_a_block_corrupted_on_read_with_its_lba() {
    // qd 1: the first IO writes LBAs 0..8, the first read reads them back;
    // byte 1000 of that read is block 1, byte 488.
    let cfg = config(&malloc("M0", 4096, 512));
    let mut spec = RunSpec::local(&cfg, &["EE_M0"], Workload::Verify, 1, 4096);
    spec.duration = std::time::Duration::from_millis(200);
    let r = perf::run(&spec, quiet(Some(corrupt_hook("read", 1000)))).unwrap();
    assert_eq!(r.total.mismatch_count, 1, "{:?}", r.mismatches);
    let (job, m) = &r.mismatches[0];
    assert_eq!(job, "EE_M0@core0");
    assert_eq!(m.lba, 1);
    assert_eq!(m.first_bad_byte, 488);
    // The stamp itself is intact: the damage is past it.
    assert_eq!(m.found.map(|s| s.lba), Ok(1));
}

#[test]
fn verify_reports_a_block_corrupted_on_write_and_a_damaged_stamp() {
    // Byte 3 of block 5 lies in the stamp's magic: the check says so.
    let cfg = config(&malloc("M0", 4096, 512));
    let mut spec = RunSpec::local(&cfg, &["EE_M0"], Workload::Verify, 1, 8192);
    spec.duration = std::time::Duration::from_millis(200);
    let r = perf::run(&spec, quiet(Some(corrupt_hook("write", 5 * 512 + 3)))).unwrap();
    assert_eq!(r.total.mismatch_count, 1, "{:?}", r.mismatches);
    let m = &r.mismatches[0].1;
    assert_eq!(m.lba, 5);
    assert_eq!(m.first_bad_byte, 3);
    assert_eq!(m.found, Err(StampError::NoStamp));
    assert_eq!(r.total.errors, 0);
}

#[test]
fn every_workload_runs_on_malloc_and_writes_are_stamped() {
    let cfg = config(&malloc("M0", 2048, 512));
    for w in Workload::ALL {
        let mut spec = RunSpec::local(&cfg, &[], w, 8, 4096);
        spec.duration = std::time::Duration::from_millis(150);
        let r = perf::run(&spec, quiet(None)).unwrap_or_else(|e| panic!("{w}: {e:#}"));
        assert!(r.total.ios > 0, "{w} did no IO");
        assert_eq!(r.total.errors, 0, "{w}: {:?}", r.io_errors);
        assert!(r.total.iops > 0.0 && r.total.latency.max_us >= r.total.latency.min_us);
    }
}

#[test]
fn two_cores_two_bdevs_make_four_jobs_and_reports_are_written() {
    let dir = std::env::temp_dir().join(format!("perf-runs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&format!(
        "{},{}",
        malloc("M0", 2048, 4096),
        r#"{"method":"bdev_null_create","params":{"name":"N0","num_blocks":100000,"block_size":512}}"#
    ));
    let mut spec = RunSpec::local(&cfg, &["M0", "N0"], Workload::RandRw, 4, 8192);
    spec.cores = vec![0, 1];
    spec.duration = std::time::Duration::from_millis(300);
    spec.report_json = Some(dir.join("r.json"));
    let r = perf::run(&spec, quiet(None)).unwrap();
    assert_eq!(r.jobs.len(), 4);
    let names: Vec<&str> = r.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["M0@core0", "N0@core0", "M0@core1", "N0@core1"]);
    assert_eq!(r.total.ios, r.jobs.iter().map(|j| j.ios).sum::<u64>());
    assert_eq!(r.latency_ticks.len(), r.total.ios, "merged histogram holds every job's IOs");
    r.write_json(&spec, &dir.join("r.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("r.json")).unwrap()).unwrap();
    for k in ["iops", "mib_per_sec", "p50_us", "p90_us", "p99_us", "p99_9_us", "p99_99_us", "avg_us"] {
        assert!(v["total"][k].is_number(), "total.{k} missing: {}", v["total"]);
    }
    assert_eq!(v["jobs"].as_array().unwrap().len(), 4);
    r.write_svg("test", &dir.join("l.svg")).unwrap();
    let svg = std::fs::read_to_string(dir.join("l.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("<polyline"), "{}", &svg[..svg.len().min(300)]);
    let table = r.table();
    assert!(table.contains("Total") && table.contains("p99.99"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_setups_fail_with_clear_errors() {
    let cfg = config(&malloc("M0", 64, 512));
    let err = |spec: &RunSpec| format!("{:#}", perf::run(spec, quiet(None)).unwrap_err());
    let spec = RunSpec::local(&cfg, &["Nope"], Workload::Read, 1, 512);
    let e = err(&spec);
    assert!(e.contains("-b Nope") && e.contains("M0"), "{e}");
    let spec = RunSpec::local(&cfg, &["M0"], Workload::Read, 1, 768);
    assert!(err(&spec).contains("block size"));
    let spec = RunSpec::local(&cfg, &["M0"], Workload::Read, 1, 1 << 20);
    assert!(err(&spec).contains("larger than bdev"));
    let spec = RunSpec::local(&cfg, &["M0"], Workload::Verify, 64, 4096);
    assert!(err(&spec).contains("verify needs"));
    let null = config(r#"{"method":"bdev_null_create","params":{"name":"N0","num_blocks":64,"block_size":512}}"#);
    let spec = RunSpec::local(&null, &["N0"], Workload::Unmap, 1, 512);
    assert!(err(&spec).contains("does not support unmap"));
    let spec = RunSpec::local("{not json", &[], Workload::Read, 1, 512);
    assert!(err(&spec).contains("config"));
    let spec = RunSpec::local(&config(r#"{"method":"bdev_frob_create"}"#), &[], Workload::Read, 1, 512);
    assert!(err(&spec).contains("unknown method bdev_frob_create"));
    let bad = config(r#"{"method":"bdev_malloc_create","params":{"name":"X","num_blocks":8,"block_size":100}}"#);
    assert!(err(&RunSpec::local(&bad, &[], Workload::Read, 1, 512)).contains("bdev_malloc_create failed"));
    assert!(err(&RunSpec::local(&config(""), &[], Workload::Read, 1, 512)).contains("no bdev"));
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn an_unreachable_target_is_a_clear_error() {
    let mut spec = RunSpec::local(&config(""), &[], Workload::Read, 1, 512);
    let trid = format!("trtype:TCP traddr:127.0.0.1 trsvcid:{} subnqn:nqn.2016-06.io.nvraid:none", free_port());
    spec.target = perf::Target::Tcp(perf::cli::TransportId::parse(&trid).unwrap());
    let e = format!("{:#}", perf::run(&spec, quiet(None)).unwrap_err());
    assert!(e.contains("cannot reach NVMe/TCP target 127.0.0.1"), "{e}");
}

#[test]
fn verify_through_the_nvme_tcp_initiator_against_an_in_process_target() {
    // The target (malloc exported over NVMe/TCP on loopback) and the
    // initiator's bdev live on the same reactors; the jobs run on the
    // remote namespace exactly as NVMe/TCP mode runs them.
    let port = free_port();
    let nqn = "nqn.2016-06.io.nvraid:perftest";
    let listen = format!(r#"{{"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{port}"}}"#);
    let trid =
        perf::cli::TransportId::parse(&format!("trtype:TCP traddr:127.0.0.1 trsvcid:{port} subnqn:{nqn}")).unwrap();
    let attach: serde_json::Value = serde_json::from_str(&perf::tcp_config(&trid)).unwrap();
    let attach = attach["subsystems"][0]["config"][0].to_string();
    let calls = [
        malloc("M0", 8192, 512),
        r#"{"method":"nvmf_create_transport","params":{"trtype":"TCP"}}"#.to_string(),
        format!(r#"{{"method":"nvmf_create_subsystem","params":{{"nqn":"{nqn}","allow_any_host":true}}}}"#),
        // A namespace UUID of its own: the initiator's bdev registers in the
        // same registry as M0 and may not reuse M0's UUID.
        format!(
            r#"{{"method":"nvmf_subsystem_add_ns","params":{{"nqn":"{nqn}","namespace":{{"bdev_name":"M0","uuid":"6e767261-6964-4000-8000-000000000001"}}}}}}"#
        ),
        format!(r#"{{"method":"nvmf_subsystem_add_listener","params":{{"nqn":"{nqn}","listen_address":{listen}}}}}"#),
        attach,
    ];
    let cfg = config(&calls.join(","));
    let bdev = format!("{}n1", perf::TCP_CONTROLLER);
    let mut spec = RunSpec::local(&cfg, &[&bdev], Workload::Verify, 8, 4096);
    spec.duration = std::time::Duration::from_millis(400);
    let r = perf::run(&spec, quiet(None)).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(r.total.ios > 10, "only {} IOs over NVMe/TCP", r.total.ios);
    assert_eq!(r.total.errors, 0, "{:?}", r.io_errors);
    assert_eq!(r.total.mismatch_count, 0, "{:?}", r.mismatches);
}
