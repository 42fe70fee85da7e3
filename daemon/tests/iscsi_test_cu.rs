//! libiscsi's conformance suite (`iscsi-test-cu`, Debian package
//! libiscsi-bin) against `nvraid-tgt` serving a 128 MiB malloc LUN of
//! 512-byte blocks, destructive tests included: the ALL family (every
//! distinct test, about a minute), or with NVRAID_ISCSI_ALL_FAMILIES=1 the
//! ALL, SCSI, iSCSI and LINUX families (615 runs, the count SPDK and LIO
//! are usually quoted with; SCSI, iSCSI and LINUX repeat ALL's tests). The pass/fail list is written next to the test's files
//! and compared with the recorded one in
//! iscsi/tests/fixtures/iscsi-test-cu-expected.txt: a test that passed there
//! and fails now is a regression and fails this test. Tests that newly pass
//! are listed (record them by copying the written list over the fixture).

mod common;
use common::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const ALL_FAMILIES: &[&str] = &["ALL", "SCSI", "iSCSI", "LINUX"];
const IQN: &str = "iqn.2016-06.io.spdk:disk1";

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../iscsi/tests/fixtures/iscsi-test-cu-expected.txt")
}

/// `name -> passed` from CUnit's automated XML report.
fn parse_results(xml: &str, family: &str, out: &mut BTreeMap<String, bool>) {
    let mut suite = String::new();
    let mut verdict: Option<bool> = None;
    for line in xml.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("<SUITE_NAME>") {
            suite = rest.trim_end_matches("</SUITE_NAME>").trim().to_string();
        } else if line.starts_with("<CUNIT_RUN_TEST_SUCCESS>") {
            verdict = Some(true);
        } else if line.starts_with("<CUNIT_RUN_TEST_FAILURE>") {
            verdict = Some(false);
        } else if let Some(rest) = line.strip_prefix("<TEST_NAME>") {
            let name = format!("{family}.{suite}.{}", rest.trim_end_matches("</TEST_NAME>").trim());
            let passed = verdict.take().unwrap_or(false);
            // A failing test has one failure record per failed assertion.
            let e = out.entry(name).or_insert(passed);
            *e = *e && passed;
        }
    }
}

#[test]
fn libiscsi_conformance_suite_has_no_regressions() {
    let Some(tool) = which("iscsi-test-cu") else {
        cannot_run("iscsi-test-cu is not installed (apt-get install libiscsi-bin; scripts/test.sh does)");
        return;
    };
    let dir = temp_dir("iscsi-test-cu");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = dir.join("iscsi.json");
    let config = json!({"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 262144, "block_size": 512}}]},
        {"subsystem": "iscsi", "config": [
            {"method": "iscsi_create_portal_group", "params": {"tag": 1, "portals": [{"host": "127.0.0.1", "port": port.to_string()}]}},
            {"method": "iscsi_create_initiator_group", "params": {"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}},
            {"method": "iscsi_create_target_node", "params": {"name": "disk1", "alias_name": "Disk1",
                "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "luns": [{"bdev_name": "Malloc0", "lun_id": 0}], "queue_depth": 64}}]},
    ]});
    std::fs::write(&cfg, config.to_string()).unwrap();
    let mut d = Daemon::start(&dir, &["-m", "0x3", "-c", cfg.to_str().unwrap()]);
    let t_ready = Instant::now();
    let want = format!("iSCSI target up; discover with: iscsiadm -m discovery -t sendtargets -p 127.0.0.1:{port}");
    while !d.log_text().contains(&want) {
        assert!(t_ready.elapsed() < Duration::from_secs(10), "no discovery line: {}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("iscsi://127.0.0.1:{port}/{IQN}/0");
    let families: &[&str] =
        if std::env::var("NVRAID_ISCSI_ALL_FAMILIES").is_ok_and(|v| v == "1") { ALL_FAMILIES } else { &["ALL"] };
    let mut results = BTreeMap::new();
    let t0 = Instant::now();
    for family in families {
        let run = dir.join(family);
        std::fs::create_dir_all(&run).unwrap();
        let out = Command::new(&tool)
            .args(["-d", "-x", "-t", family, &url])
            .current_dir(&run)
            .output()
            .expect("iscsi-test-cu runs");
        std::fs::write(run.join("output.txt"), &out.stdout).unwrap();
        let xml = std::fs::read_to_string(run.join("CUnitAutomated-Results.xml"))
            .unwrap_or_else(|e| panic!("{family}: no XML report ({e}): {}", String::from_utf8_lossy(&out.stderr)));
        parse_results(&xml, family, &mut results);
    }
    let elapsed = t0.elapsed();
    let listing: String = results.iter().map(|(n, p)| format!("{n} {}\n", if *p { "PASS" } else { "FAIL" })).collect();
    let written = dir.join("iscsi-test-cu-results.txt");
    std::fs::write(&written, &listing).unwrap();
    let passed = results.values().filter(|p| **p).count();
    eprintln!(
        "iscsi-test-cu: {passed}/{} passed in {:.0?}; list written to {}",
        results.len(),
        elapsed,
        written.display()
    );
    let least = if families.len() == 1 { 200 } else { 600 };
    assert!(results.len() >= least, "the suite ran only {} tests: {}", results.len(), d.log_text());

    let expected = std::fs::read_to_string(fixture()).expect("the recorded pass/fail list");
    let mut regressions = Vec::new();
    let mut missing = Vec::new();
    let mut new_passes = Vec::new();
    for line in expected.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let Some((name, verdict)) = line.rsplit_once(' ') else { continue };
        if !families.iter().any(|f| name.split('.').next() == Some(*f)) {
            continue;
        }
        match (verdict, results.get(name)) {
            ("PASS", Some(false)) => regressions.push(name.to_string()),
            ("PASS", None) => missing.push(name.to_string()),
            ("FAIL", Some(true)) => new_passes.push(name.to_string()),
            _ => {}
        }
    }
    if !new_passes.is_empty() {
        eprintln!("newly passing (record them in the fixture): {new_passes:#?}");
    }
    d.stop();
    assert!(
        regressions.is_empty() && missing.is_empty(),
        "regressions: {regressions:#?}\nnot run: {missing:#?}\n(outputs under {})",
        dir.display()
    );
    assert!(elapsed < Duration::from_secs(600), "the suite took {elapsed:?}");
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}
