//! The daemon's log methods through SPDK's client: the levels and flags
//! it reports, and that they change what the running daemon writes (a
//! crate's debug messages appear with its flag at DEBUG and stop when the
//! flag is cleared); and `thread_get_stats`, whose busy and idle ticks are
//! the reactors' own measurements and move as they run.

mod common;
use common::*;
use serde_json::json;

/// Lines of the daemon's log that the RPC server's debug message for an
/// accepted connection wrote.
fn accepted_lines(d: &Daemon) -> usize {
    d.log_text().matches("rpc: connection accepted").count()
}

#[test]
fn log_methods_change_what_the_daemon_writes() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("log-methods");
    let d = Daemon::start(&dir, &["-m", "0x1"]);
    let sp = |args: &[&str]| spdk_ok(&rpc, &d.sock, args);
    if std::env::var_os("NVRAID_LOG").is_none() {
        // The defaults: info! and above, SPDK's NOTICE log and INFO print levels.
        assert_eq!(sp(&["log_get_level"]), json!("NOTICE"));
        assert_eq!(sp(&["log_get_print_level"]), json!("INFO"));
    }
    sp(&["log_clear_flag", "all"]);
    sp(&["log_set_level", "NOTICE"]);
    sp(&["log_set_print_level", "INFO"]);
    let flags = sp(&["log_get_flags"]);
    assert_eq!(flags["mgmt"], json!(false));
    assert!(flags.as_object().unwrap().values().all(|v| v == &json!(false)), "{flags}");

    let quiet = accepted_lines(&d);
    d.ok("log_get_flags", serde_json::Value::Null);
    assert_eq!(accepted_lines(&d), quiet, "no debug messages at INFO");

    // The flag alone is not enough (SPDK shows a flag's messages at DEBUG only).
    sp(&["log_set_flag", "mgmt"]);
    d.ok("log_get_flags", serde_json::Value::Null);
    assert_eq!(accepted_lines(&d), quiet);
    sp(&["log_set_print_level", "DEBUG"]);
    assert_eq!(sp(&["log_get_print_level"]), json!("DEBUG"));
    let before = accepted_lines(&d);
    d.ok("log_get_flags", serde_json::Value::Null);
    assert!(accepted_lines(&d) > before, "mgmt's debug messages appear: {}", d.log_text());
    let flags = sp(&["log_get_flags"]);
    assert_eq!((flags["mgmt"].clone(), flags["nvmf"].clone()), (json!(true), json!(false)));

    sp(&["log_clear_flag", "mgmt"]);
    let cleared = accepted_lines(&d);
    d.ok("log_get_flags", serde_json::Value::Null);
    assert_eq!(accepted_lines(&d), cleared, "cleared flag: no more debug messages");

    // Refusals: unknown flags and levels.
    assert_eq!(d.rpc("log_set_flag", json!({"flag": "no_such_component"})).unwrap_err().0, -32602);
    assert_eq!(d.rpc("log_set_level", json!({"level": "LOUD"})).unwrap_err().0, -32602);
    assert_eq!(d.rpc("log_get_level", json!({"x": 1})).unwrap_err().0, -32602);
}

#[test]
fn thread_get_stats_reports_measured_reactor_time() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("thread-stats");
    let d = Daemon::start(&dir, &["-m", "0x3"]);
    let a = spdk_ok(&rpc, &d.sock, &["thread_get_stats"]);
    assert!(a["tick_rate"].as_u64().unwrap() > 0);
    let threads = a["threads"].as_array().unwrap();
    assert_eq!(threads.len(), 2);
    assert_eq!((threads[0]["name"].clone(), threads[1]["name"].clone()), (json!("app_thread"), json!("reactor_1")));
    // The same reactors framework_get_reactors lists, with the same figures moving forward.
    let r = d.ok("framework_get_reactors", serde_json::Value::Null);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let b = d.ok("thread_get_stats", serde_json::Value::Null);
    for i in 0..2 {
        let (t0, t1) = (&a["threads"][i], &b["threads"][i]);
        assert_eq!(t1["cpumask"], r["reactors"][i]["lw_threads"][0]["cpumask"]);
        let total = |t: &serde_json::Value| t["busy"].as_u64().unwrap() + t["idle"].as_u64().unwrap();
        assert!(total(t1) > total(t0), "reactor {i} measured no time: {t0} -> {t1}");
        assert!(r["reactors"][i]["busy"].as_u64().unwrap() <= t1["busy"].as_u64().unwrap());
        assert_eq!(t1["paused_pollers_count"], json!(0), "{t1}");
        assert!(t1["active_pollers_count"].is_u64() && t1["timed_pollers_count"].is_u64(), "{t1}");
    }
    // The application reactor runs the RPC server's and the bdev layer's pollers.
    let app = &b["threads"][0];
    let pollers = app["active_pollers_count"].as_u64().unwrap() + app["timed_pollers_count"].as_u64().unwrap();
    assert!(pollers > 0, "{app}");
}
