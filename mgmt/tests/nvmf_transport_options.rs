//! `nvmf_create_transport` honours or refuses every option: what nvraid's
//! TCP transport lacks (zcopy, DIF insert/strip, socket priority, RDMA-only
//! options) is refused with -32602 naming the option, SPDK's client's
//! unasked defaults are accepted, and the buffer pool options are checked.

mod common;
use common::Target;
use mgmt::jsonrpc::INVALID_PARAMS;
use serde_json::json;

#[test]
fn unsupported_transport_options_are_refused_by_name() {
    let t = Target::start();
    for (key, value) in [
        ("zcopy", json!(true)),
        ("dif_insert_or_strip", json!(true)),
        ("sock_priority", json!(2)),
        ("ack_timeout", json!(5)),
        ("data_wr_pool_size", json!(16)),
        ("no_srq", json!(true)),
        ("disable_command_passthru", json!(true)),
        ("num_cqe", json!(4096)),
        ("tgt_name", json!("other")),
        ("num_shared_buffers", json!(0)),
    ] {
        let mut p = json!({"trtype": "TCP"});
        p[key] = value;
        let e = t.call("nvmf_create_transport", p).expect_err(key);
        assert_eq!(e.code, INVALID_PARAMS, "{key}: {e:?}");
        assert!(e.message.contains(key), "{key}: {}", e.message);
    }
    // What SPDK's client sends unasked (captured on the wire) is accepted.
    let p = json!({"trtype": "TCP", "no_srq": false, "c2h_success": true, "zcopy": false,
        "dif_insert_or_strip": false, "no_wr_batching": false, "disable_mappable_bar0": false,
        "disable_adaptive_irq": false, "disable_shadow_doorbells": false, "disable_command_passthru": false,
        "io_unit_size": 16384, "num_shared_buffers": 64, "buf_cache_size": 4, "abort_timeout_sec": 2});
    assert_eq!(t.call("nvmf_create_transport", p).unwrap(), json!(true));
    let stats = t.call("nvmf_get_stats", json!({})).unwrap();
    let tcp = &stats["poll_groups"][0]["transports"][0];
    assert_eq!(tcp["trtype"], "TCP");
    assert_eq!(tcp["data_buffers_total"], 64);
    assert_eq!(tcp["data_buffer_cache_per_reactor"], 4);
    assert_eq!(tcp["impossible_completions"], 0);
}
