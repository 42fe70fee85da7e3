//! Every method decodes its parameters strictly, through the real method
//! table: an unknown key gets -32602 naming the key and the method, and a
//! key SPDK defines for a feature nvraid lacks is refused unless it holds
//! SPDK's default.

mod common;
use common::Target;
use mgmt::jsonrpc::INVALID_PARAMS;
use serde_json::json;

#[test]
fn every_method_refuses_an_unknown_key_by_name() {
    let t = Target::start();
    let names: Vec<&str> = t.table.names().collect();
    assert!(names.len() > 40, "{names:?}");
    for method in names {
        let mut params = json!({"nvraid_no_such_key": 1});
        if method == "nvmf_create_transport" {
            params["trtype"] = json!("TCP"); // checked before the other keys
        }
        let e = t.call(method, params).expect_err(method);
        assert_eq!(e.code, INVALID_PARAMS, "{method}: {e:?}");
        let expected = format!("{method}: unknown parameter 'nvraid_no_such_key'");
        assert!(e.message.ends_with(&expected), "{method}: {}", e.message);
    }
}

#[test]
fn a_misspelt_option_is_refused_not_ignored() {
    let t = Target::start();
    t.call("bdev_malloc_create", json!({"name": "M0", "num_blocks": 64, "block_size": 512})).unwrap();
    t.call("bdev_malloc_create", json!({"name": "M1", "num_blocks": 64, "block_size": 512})).unwrap();
    let e = t
        .call(
            "bdev_raid_create",
            json!({"name": "R", "raid_level": "raid1", "base_bdevs": ["M0", "M1"], "superblok": true}),
        )
        .unwrap_err();
    assert_eq!((e.code, e.message.as_str()), (INVALID_PARAMS, "bdev_raid_create: unknown parameter 'superblok'"));
    assert!(t.call("bdev_get_bdevs", json!({"name": "R"})).is_err(), "nothing was created");
    // Nested objects are strict too.
    t.call("nvmf_create_transport", json!({"trtype": "TCP"})).unwrap();
    t.call("nvmf_create_subsystem", json!({"nqn": "nqn.2016-06.io.nvraid:s"})).unwrap();
    let e = t
        .call("nvmf_subsystem_add_ns", json!({"nqn": "nqn.2016-06.io.nvraid:s", "namespace": {"bdev_nme": "M0"}}))
        .unwrap_err();
    assert_eq!(e.message, "nvmf_subsystem_add_ns: unknown parameter 'namespace.bdev_nme'");
}

#[test]
fn features_nvraid_lacks_are_refused_unless_at_spdk_defaults() {
    let t = Target::start();
    t.call("nvmf_create_transport", json!({"trtype": "TCP"})).unwrap();
    let nqn = "nqn.2016-06.io.nvraid:s";
    // What SPDK's client sends unasked is accepted.
    t.call(
        "nvmf_create_subsystem",
        json!({"nqn": nqn, "allow_any_host": false, "ana_reporting": false, "passthrough": false,
               "enable_nssr": false, "tgt_name": "nvmf_tgt"}),
    )
    .unwrap();
    let host = "nqn.2014-08.org.nvmexpress:uuid:0b6b9d2e-5b1f-4bb5-a3a0-3a9e3c2c7f00";
    t.call("nvmf_subsystem_add_host", json!({"nqn": nqn, "host": host})).unwrap();
    t.call("nvmf_subsystem_remove_host", json!({"nqn": nqn, "host": host})).unwrap();

    let refused = [
        ("nvmf_create_subsystem", json!({"nqn": "nqn.2016-06.io.nvraid:t", "enable_nssr": true}), "enable_nssr"),
        ("nvmf_get_subsystems", json!({"tgt_name": "other"}), "tgt_name"),
        ("bdev_malloc_create", json!({"num_blocks": 64, "block_size": 512, "md_size": 8}), "md_size=8"),
        ("bdev_malloc_create", json!({"num_blocks": 64, "block_size": 512, "dif_type": 1}), "dif_type=1"),
        (
            "bdev_null_create",
            json!({"name": "N", "num_blocks": 64, "block_size": 512, "physical_block_size": 4096}),
            "physical_block_size=4096",
        ),
        ("bdev_get_iostat", json!({"per_channel": true}), "per_channel=true"),
        ("bdev_set_options", json!({"bdev_io_cache_size": 64}), "bdev_io_cache_size=64"),
        ("bdev_nvme_set_options", json!({"bdev_retry_count": -1}), "bdev_retry_count=-1"),
        ("bdev_nvme_set_options", json!({"action_on_timeout": "reset", "timeout_us": 1000}), "action_on_timeout"),
    ];
    for (method, params, named) in refused {
        let e = t.call(method, params.clone()).expect_err(method);
        assert_eq!(e.code, INVALID_PARAMS, "{method} {params}: {e:?}");
        assert!(e.message.starts_with(method) && e.message.contains(named), "{method} {params}: {}", e.message);
        assert!(e.message.contains("not supported"), "{}", e.message);
    }
    // TLS is implemented: a PSK names a key of the keyring, and one that is
    // not there is refused by name (nothing is half-configured).
    let missing_key = [
        ("nvmf_subsystem_add_host", json!({"nqn": nqn, "host": host, "psk": "key0"})),
        (
            "bdev_nvme_attach_controller",
            json!({"name": "X", "trtype": "TCP", "traddr": "127.0.0.1", "subnqn": nqn, "psk": "key0"}),
        ),
    ];
    for (method, params) in missing_key {
        let e = t.call(method, params.clone()).expect_err(method);
        assert!(e.message.contains("key0"), "{method} {params}: {}", e.message);
    }
    assert!(t.call("nvmf_get_subsystems", json!({"nqn": nqn})).unwrap()[0]["hosts"].as_array().unwrap().is_empty());
}

/// SPDK's option methods for parts nvraid has are applied, not skipped:
/// SPDK's defaults (as its save_config writes them) load; the NVMe options
/// reach controllers attached afterwards and are refused once one is.
#[test]
fn option_methods_apply_or_refuse() {
    let t = Target::start();
    let spdk_defaults = json!({"bdev_io_pool_size": 65535, "bdev_io_cache_size": 256, "bdev_auto_examine": true,
                               "iobuf_small_cache_size": 128, "iobuf_large_cache_size": 16});
    assert_eq!(t.call("bdev_set_options", spdk_defaults).unwrap(), json!(true));
    // A pool is split among the reactors; one too small to serve is refused.
    let e = t.call("bdev_set_options", json!({"bdev_io_pool_size": 100})).unwrap_err();
    assert!(e.message.contains("at least 256"), "{}", e.message);
    let nvme_defaults = json!({"action_on_timeout": "none", "timeout_us": 0, "timeout_admin_us": 0,
        "keep_alive_timeout_ms": 10000, "arbitration_burst": 0, "low_priority_weight": 0,
        "medium_priority_weight": 0, "high_priority_weight": 0, "nvme_adminq_poll_period_us": 10000,
        "nvme_ioq_poll_period_us": 0, "io_queue_requests": 0, "delay_cmd_submit": true,
        "transport_retry_count": 4, "bdev_retry_count": 3, "transport_ack_timeout": 0,
        "ctrlr_loss_timeout_sec": 0, "reconnect_delay_sec": 0, "fast_io_fail_timeout_sec": 0,
        "disable_auto_failback": false, "generate_uuids": false, "transport_tos": 0, "nvme_error_stat": false,
        "rdma_srq_size": 0, "io_path_stat": false, "allow_accel_sequence": false, "rdma_max_cq_size": 0,
        "rdma_cm_event_timeout_ms": 0, "dhchap_digests": ["sha256", "sha384", "sha512"],
        "dhchap_dhgroups": ["null", "ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192"],
        "rdma_umr_per_io": false, "tcp_connect_timeout_ms": 0, "enable_flush": false,
        "multipath_opts": {"policy": "active_passive"}});
    assert_eq!(t.call("bdev_nvme_set_options", nvme_defaults).unwrap(), json!(true));
    let applied = json!({"action_on_timeout": "abort", "timeout_us": 2_000_000, "transport_retry_count": 2});
    assert_eq!(t.call("bdev_nvme_set_options", applied).unwrap(), json!(true));
    let e = t.call("bdev_nvme_set_options", json!({"transport_retry_count": 300})).unwrap_err();
    assert!(e.message.contains("transport_retry_count 300"), "{e:?}");
    assert_eq!(t.call("bdev_nvme_set_hotplug", json!({"enable": false, "period_us": 100000})).unwrap(), json!(true));
    // The hotplug monitor: on with SPDK's default period for 0, off again;
    // save_config writes its state; a period past SPDK's longest is refused.
    let hotplug_config = |t: &Target| {
        let bdev = t.call("framework_get_config", json!({"name": "bdev"})).unwrap();
        bdev.as_array().unwrap().iter().find(|m| m["method"] == "bdev_nvme_set_hotplug").cloned().unwrap()
    };
    assert_eq!(t.call("bdev_nvme_set_hotplug", json!({"enable": true, "period_us": 0})).unwrap(), json!(true));
    assert_eq!(hotplug_config(&t)["params"], json!({"enable": true, "period_us": 100000}));
    assert_eq!(t.call("bdev_nvme_set_hotplug", json!({"enable": false})).unwrap(), json!(true));
    assert_eq!(hotplug_config(&t)["params"], json!({"enable": false, "period_us": 100000}));
    let e = t.call("bdev_nvme_set_hotplug", json!({"enable": true, "period_us": 10_000_001})).unwrap_err();
    assert!(e.message.contains("period_us must be at most 10000000"), "{e:?}");

    let attach = json!({"name": "Sim0", "trtype": "SIM", "traddr": "sim", "sim_seed": 3, "num_io_queues": 1});
    assert_eq!(t.call("bdev_nvme_attach_controller", attach).unwrap(), json!(["Sim0n1"]));
    let c = t.call("bdev_nvme_get_controllers", json!({"name": "Sim0"})).unwrap();
    assert_eq!(c[0]["ctrlrs"][0]["num_io_queues"], json!(1), "{c}");
    let e = t.call("bdev_nvme_set_options", json!({"timeout_us": 0})).unwrap_err();
    assert_eq!(e.code, -libc::EPERM, "{e:?}");
    assert_eq!(t.call("bdev_nvme_detach_controller", json!({"name": "Sim0"})).unwrap(), json!(true));
}
