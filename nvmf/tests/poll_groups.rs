//! `nvmf_get_stats` reports one poll group per reactor, with the counters
//! its connections keep: queues connected (in total and now), connections
//! before their Connect, bdev IOs in flight, and IO commands answered.

mod common;
use bdev::DmaBuf;
use common::*;
use nvmf::host::HostQpair;
use nvmf::{NvmfState, TransportOpts};
use serde_json::Value;
use std::time::{Duration, Instant};

fn stats(t: &Target) -> Value {
    t.set.call(0, || NvmfState::get().stats_json())
}

/// A counter summed over the poll groups.
fn sum(st: &Value, key: &str) -> u64 {
    st["poll_groups"].as_array().unwrap().iter().map(|g| g[key].as_u64().unwrap()).sum()
}

#[test]
fn each_reactor_is_a_poll_group_with_its_connections_counters() {
    let t = start_target(2, 512, 4096, TransportOpts::default(), &[]);
    let st = stats(&t);
    let groups = st["poll_groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2);
    assert_eq!((groups[0]["name"].as_str(), groups[1]["name"].as_str()), (Some("app_thread"), Some("reactor_1")));
    assert_eq!(groups[1]["transports"][0]["trtype"], "TCP");

    // A connection that has not sent its Connect yet is unassociated.
    let raw = std::net::TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    let t0 = Instant::now();
    while sum(&stats(&t), "current_unassociated_qpairs") != 1 {
        assert!(t0.elapsed() < Duration::from_secs(5), "{}", stats(&t));
        std::thread::sleep(Duration::from_millis(5));
    }

    let s = session_no_kato(t.port, 2);
    let st = stats(&t);
    assert_eq!((sum(&st, "admin_qpairs"), sum(&st, "io_qpairs")), (1, 2), "{st}");
    assert_eq!((sum(&st, "current_admin_qpairs"), sum(&st, "current_io_qpairs")), (1, 2));
    assert_eq!(sum(&st, "current_unassociated_qpairs"), 1, "only the raw connection");
    // Queues go to the reactors round-robin: both groups hold some.
    for g in st["poll_groups"].as_array().unwrap() {
        let here = g["current_admin_qpairs"].as_u64().unwrap()
            + g["current_io_qpairs"].as_u64().unwrap()
            + g["current_unassociated_qpairs"].as_u64().unwrap();
        assert!(here > 0, "{st}");
    }
    let before = sum(&st, "completed_nvme_io");
    let mut done = 0;
    for parts in s.io {
        let mut qp = HostQpair::from_parts(parts);
        for i in 0..5 {
            qp.read(1, i * 8, 8, DmaBuf::alloc(4096).unwrap(), i).unwrap();
            assert!(wait(&mut qp, 1)[0].status.is_success());
            done += 1;
        }
        // An IO to a namespace that does not exist is answered (and counted) too.
        qp.read(7, 0, 8, DmaBuf::alloc(4096).unwrap(), 99).unwrap();
        assert!(!wait(&mut qp, 1)[0].status.is_success());
        done += 1;
    }
    let st = stats(&t);
    assert_eq!(sum(&st, "completed_nvme_io") - before, done, "{st}");
    assert_eq!(sum(&st, "pending_bdev_io"), 0, "every bdev IO came back");

    // Closed queues leave the current counts; the totals stay.
    drop(raw);
    drop(s.admin);
    let t0 = Instant::now();
    loop {
        let st = stats(&t);
        let current =
            sum(&st, "current_admin_qpairs") + sum(&st, "current_io_qpairs") + sum(&st, "current_unassociated_qpairs");
        if current == 0 {
            assert_eq!((sum(&st, "admin_qpairs"), sum(&st, "io_qpairs")), (1, 2));
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "queues still counted: {st}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
