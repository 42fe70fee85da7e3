//! The iSCSI target's RPCs through SPDK's own client: portal, initiator and
//! auth groups, target nodes and LUNs, CHAP settings, their `iscsi_get_*`
//! shapes, refusals of what nvraid does not honour, and `save_config` with
//! a restart from `-c` that restores the same target.

mod common;
use common::*;
use serde_json::json;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn spdk_client_builds_the_iscsi_target_and_save_config_restores_it() {
    let Some(rpc) = spdk_rpc_path() else { return };
    let dir = temp_dir("iscsi-rpc");
    let cfg = two_malloc_config(&dir);
    let mut d = Daemon::start(&dir, &["-m", "0x3", "-c", cfg.to_str().unwrap()]);
    let s = d.sock.clone();
    let port = free_port().to_string();
    let portal = format!("127.0.0.1:{port}");

    spdk_ok(&rpc, &s, &["iscsi_set_options", "-o", "30", "-n", "10", "-q", "32", "-i", "-c", "1"]);
    let o = spdk_ok(&rpc, &s, &["iscsi_get_options"]);
    assert_eq!((o["nop_timeout"].clone(), o["max_queue_depth"].clone()), (json!(30), json!(32)));
    assert_eq!(o["immediate_data"], json!(true));
    assert_eq!(o["node_base"], json!("iqn.2016-06.io.spdk"));

    spdk_ok(&rpc, &s, &["iscsi_create_portal_group", "1", &portal]);
    spdk_ok(&rpc, &s, &["iscsi_create_initiator_group", "2", "ANY", "127.0.0.1/32"]);
    spdk_ok(&rpc, &s, &["iscsi_create_auth_group", "1", "-c", "user:alice secret:alicesecret12"]);
    spdk_ok(
        &rpc,
        &s,
        &["iscsi_auth_group_add_secret", "1", "-u", "bob", "-s", "bobsecret1234", "-m", "tgt", "-r", "tgtsecret123"],
    );
    spdk_ok(&rpc, &s, &["iscsi_create_target_node", "disk1", "Disk One", "Malloc0:0", "1:2", "64", "-d"]);
    spdk_ok(&rpc, &s, &["iscsi_target_node_add_lun", "disk1", "Malloc1", "-i", "3"]);
    spdk_ok(&rpc, &s, &["iscsi_target_node_set_auth", "disk1", "-g", "1", "-r"]);
    spdk_ok(&rpc, &s, &["iscsi_set_discovery_auth", "-d"]);

    let nodes = spdk_ok(&rpc, &s, &["iscsi_get_target_nodes"]);
    assert_eq!(
        nodes,
        json!([{
            "name": "iqn.2016-06.io.spdk:disk1", "alias_name": "Disk One",
            "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 2}],
            "luns": [{"bdev_name": "Malloc0", "lun_id": 0}, {"bdev_name": "Malloc1", "lun_id": 3}],
            "queue_depth": 64, "disable_chap": false, "require_chap": true, "mutual_chap": false,
            "chap_group": 1, "header_digest": false, "data_digest": false,
        }])
    );
    assert_eq!(
        spdk_ok(&rpc, &s, &["iscsi_get_portal_groups"]),
        json!([{"tag": 1, "portals": [{"host": "127.0.0.1", "port": port}], "private": false}])
    );
    assert_eq!(
        spdk_ok(&rpc, &s, &["iscsi_get_initiator_groups"]),
        json!([{"tag": 2, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}])
    );
    assert_eq!(
        spdk_ok(&rpc, &s, &["iscsi_get_auth_groups"]),
        json!([{"tag": 1, "secrets": [{"user": "alice", "secret": "alicesecret12"},
                                       {"user": "bob", "secret": "bobsecret1234", "muser": "tgt", "msecret": "tgtsecret123"}]}])
    );
    assert_eq!(spdk_ok(&rpc, &s, &["iscsi_get_connections"]), json!([]));

    // Maps and initiator groups change in place.
    spdk_ok(&rpc, &s, &["iscsi_create_initiator_group", "3", "iqn.2026-01.x:a", "10.0.0.0/8"]);
    spdk_ok(&rpc, &s, &["iscsi_target_node_add_pg_ig_maps", "disk1", "1:3"]);
    let maps = spdk_ok(&rpc, &s, &["iscsi_get_target_nodes"])[0]["pg_ig_maps"].clone();
    assert_eq!(maps, json!([{"pg_tag": 1, "ig_tag": 2}, {"pg_tag": 1, "ig_tag": 3}]));
    let e =
        d.rpc("iscsi_target_node_add_pg_ig_maps", json!({"name": "disk1", "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 3}]}));
    assert!(e.is_err(), "a map twice: {e:?}");
    spdk_ok(&rpc, &s, &["iscsi_target_node_remove_pg_ig_maps", "disk1", "1:3"]);
    spdk_ok(&rpc, &s, &["iscsi_initiator_group_add_initiators", "3", "-n", "iqn.2026-01.x:b", "-m", "10.1.0.0/16"]);
    spdk_ok(&rpc, &s, &["iscsi_initiator_group_remove_initiators", "3", "-n", "iqn.2026-01.x:a"]);
    let groups = spdk_ok(&rpc, &s, &["iscsi_get_initiator_groups"]);
    assert_eq!(
        groups[1],
        json!({"tag": 3, "initiators": ["iqn.2026-01.x:b"], "netmasks": ["10.0.0.0/8", "10.1.0.0/16"]})
    );
    spdk_ok(&rpc, &s, &["iscsi_delete_initiator_group", "3"]);

    // What nvraid does not honour is refused, not ignored.
    let e = d.rpc(
        "iscsi_create_portal_group",
        json!({"tag": 5, "portals": [{"host": "127.0.0.1", "port": "0"}], "wait": true}),
    );
    assert!(matches!(&e, Err((-32602, m)) if m.contains("wait")), "{e:?}");
    let e = d.rpc("iscsi_set_options", json!({"pdu_pool_size": 100}));
    assert!(matches!(&e, Err((-32602, m)) if m.contains("pdu_pool_size")), "{e:?}");
    let e = d.rpc("iscsi_set_options", json!({"max_queue_depth": 16}));
    assert!(e.is_err(), "options after the first portal group: {e:?}");
    let e = d.rpc(
        "iscsi_create_target_node",
        json!({"name": "x", "luns": [{"bdev_name": "Malloc0", "lun_id": 0}],
        "pg_ig_maps": [{"pg_tag": 9, "ig_tag": 2}], "queue_depth": 8}),
    );
    assert!(matches!(&e, Err((-32602, m)) if m.contains("portal group 9")), "{e:?}");
    let e = d.rpc("iscsi_target_node_set_auth", json!({"name": "disk1", "disable_chap": true, "require_chap": true}));
    assert!(e.is_err(), "{e:?}");
    let e = d.rpc("iscsi_delete_initiator_group", json!({"tag": 2}));
    assert!(matches!(&e, Err((_, m)) if m.contains("mapped")), "a mapped initiator group stays: {e:?}");
    let e = d.rpc("iscsi_get_target_nodes", json!({"bogus": 1}));
    assert!(e.is_err(), "unknown keys are refused: {e:?}");

    // save_config and a restart give the same target.
    let saved = spdk_rpc(&rpc, &s, &["save_config"]);
    assert!(saved.status.success(), "{}", String::from_utf8_lossy(&saved.stderr));
    let text = String::from_utf8_lossy(&saved.stdout).to_string();
    assert!(text.contains("\"iscsi_create_target_node\""), "{text}");
    let cfg_path = dir.join("saved.json");
    std::fs::write(&cfg_path, &saved.stdout).unwrap();
    let before: Vec<_> = [
        "iscsi_get_target_nodes",
        "iscsi_get_portal_groups",
        "iscsi_get_initiator_groups",
        "iscsi_get_auth_groups",
        "iscsi_get_options",
    ]
    .iter()
    .map(|m| spdk_ok(&rpc, &s, &[m]))
    .collect();
    d.stop();
    let d2 = Daemon::start(&dir, &["-m", "0x3", "-c", cfg_path.to_str().unwrap()]);
    let after: Vec<_> = [
        "iscsi_get_target_nodes",
        "iscsi_get_portal_groups",
        "iscsi_get_initiator_groups",
        "iscsi_get_auth_groups",
        "iscsi_get_options",
    ]
    .iter()
    .map(|m| spdk_ok(&rpc, &d2.sock, &[m]))
    .collect();
    assert_eq!(before, after, "restart from save_config must give the same iSCSI target");

    // Deleting in dependency order empties the target.
    let s2 = d2.sock.clone();
    spdk_ok(&rpc, &s2, &["iscsi_delete_target_node", "iqn.2016-06.io.spdk:disk1"]);
    spdk_ok(&rpc, &s2, &["iscsi_delete_initiator_group", "2"]);
    spdk_ok(&rpc, &s2, &["iscsi_delete_portal_group", "1"]);
    spdk_ok(&rpc, &s2, &["iscsi_auth_group_remove_secret", "1", "-u", "bob"]);
    spdk_ok(&rpc, &s2, &["iscsi_delete_auth_group", "1"]);
    assert_eq!(spdk_ok(&rpc, &s2, &["iscsi_get_target_nodes"]), json!([]));
    assert_eq!(spdk_ok(&rpc, &s2, &["iscsi_get_portal_groups"]), json!([]));
    // The port is free again (the accept poller closes it on its next run).
    let t0 = std::time::Instant::now();
    while std::net::TcpListener::bind(("127.0.0.1", port.parse::<u16>().unwrap())).is_err() {
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "portal still bound");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
