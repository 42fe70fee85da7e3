//! NVMe bdev methods (`bdev_nvme_*`): attach a controller and get one bdev
//! per namespace (`NAMEn1`, ...), list and detach controllers. The TCP
//! transport is served by the NVMe/TCP initiator in `nvmf::host`; PCIe by
//! the userspace VFIO driver in `nvme`. `trtype: "SIM"` attaches the seeded
//! simulated controller of `nvme::sim` — a test transport for daemon-level
//! tests without hardware (`sim_seed`, `sim_num_blocks`, `sim_block_size`).

use super::{bdev_error, sync_call, Ctx, Handler};
use crate::jsonrpc::{decode_params, RpcError};
use crate::server::Reply;
use ::nvmf::host::{self, AttachParams};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

pub const METHODS: &[(&str, Handler)] = &[
    ("bdev_nvme_attach_controller", bdev_nvme_attach_controller),
    ("bdev_nvme_detach_controller", bdev_nvme_detach_controller),
    ("bdev_nvme_get_controllers", bdev_nvme_get_controllers),
];

#[derive(Deserialize)]
struct Attach {
    name: String,
    trtype: String,
    traddr: String,
    adrfam: Option<String>,
    trsvcid: Option<String>,
    subnqn: Option<String>,
    hostnqn: Option<String>,
    #[serde(default)]
    hdgst: bool,
    #[serde(default)]
    ddgst: bool,
    /// Test transport SIM: the simulated controller's seed and geometry.
    sim_seed: Option<u64>,
    sim_num_blocks: Option<u64>,
    sim_block_size: Option<u32>,
}

fn bdev_nvme_attach_controller(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let p: Attach = match decode_params(params) {
        Ok(p) => p,
        Err(e) => return reply.send(Err(e)),
    };
    if p.trtype.eq_ignore_ascii_case("pcie") || p.trtype.eq_ignore_ascii_case("sim") {
        return reply.send(attach_local(p));
    }
    if !p.trtype.eq_ignore_ascii_case("tcp") {
        return reply.send(Err(RpcError::invalid_params(format!(
            "trtype {} is not supported (PCIe, TCP, and the test transport SIM are)",
            p.trtype
        ))));
    }
    let Some(subnqn) = p.subnqn else {
        return reply.send(Err(RpcError::invalid_params("subnqn is required for TCP")));
    };
    let params = AttachParams {
        name: p.name,
        trtype: p.trtype,
        traddr: p.traddr,
        adrfam: p.adrfam,
        trsvcid: p.trsvcid.unwrap_or_else(|| "4420".into()),
        subnqn,
        hostnqn: p.hostnqn,
        hdgst: p.hdgst,
        ddgst: p.ddgst,
    };
    host::attach_controller(params, move |r| reply.send(r.map(|names| serde_json::json!(names)).map_err(bdev_error)));
}

fn nvme_error(e: ::nvme::NvmeError) -> RpcError {
    RpcError::errno(e.errno(), e.to_string())
}

/// PCIe through VFIO, or the simulated controller: attached synchronously
/// on this (the application) reactor, which becomes the controller's home.
fn attach_local(p: Attach) -> Result<Value, RpcError> {
    if !host::controllers_json(Some(&p.name)).is_empty() {
        return Err(RpcError::errno(libc::EEXIST, format!("controller {} already exists", p.name)));
    }
    let pcie = p.trtype.eq_ignore_ascii_case("pcie");
    let config = if pcie {
        serde_json::json!({"method": "bdev_nvme_attach_controller",
            "params": {"name": p.name, "trtype": "PCIe", "traddr": p.traddr}})
    } else {
        serde_json::json!({"method": "bdev_nvme_attach_controller",
            "params": {"name": p.name, "trtype": "SIM", "traddr": p.traddr, "sim_seed": p.sim_seed,
                       "sim_num_blocks": p.sim_num_blocks, "sim_block_size": p.sim_block_size}})
    };
    let transport = if pcie {
        ::nvme::Transport::Pcie { traddr: p.traddr.clone() }
    } else {
        let ns = ::nvme::SimNamespace {
            num_blocks: p.sim_num_blocks.unwrap_or(262_144),
            block_size: p.sim_block_size.unwrap_or(512),
        };
        let cfg = ::nvme::SimConfig { seed: p.sim_seed.unwrap_or(1), namespaces: vec![ns], ..Default::default() };
        ::nvme::Transport::Sim(::nvme::SimController::new(cfg).map_err(RpcError::invalid_params)?)
    };
    let names = ::nvme::attach_controller(&p.name, transport, ::nvme::CtrlrOpts::default(), Some(config))
        .map_err(nvme_error)?;
    Ok(serde_json::json!(names))
}

#[derive(Deserialize)]
struct Detach {
    name: String,
}

fn bdev_nvme_detach_controller(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    let p: Detach = match decode_params(params) {
        Ok(p) => p,
        Err(e) => return reply.send(Err(e)),
    };
    if ::nvme::Controllers::get().lookup(&p.name).is_some() {
        return ::nvme::detach_controller(&p.name, move |r| {
            reply.send(r.map(|()| Value::Bool(true)).map_err(nvme_error))
        });
    }
    host::detach_controller(&p.name, move |r| reply.send(r.map(|()| Value::Bool(true)).map_err(bdev_error)));
}

#[derive(Deserialize, Default)]
struct GetControllers {
    name: Option<String>,
}

fn bdev_nvme_get_controllers(_: &Arc<Ctx>, params: Option<Value>, reply: Reply) {
    sync_call(params, reply, |p: GetControllers| {
        let mut list = host::controllers_json(p.name.as_deref());
        list.extend(::nvme::controllers_json(p.name.as_deref()).unwrap_or_default());
        if let (Some(n), true) = (&p.name, list.is_empty()) {
            return Err(RpcError::errno(libc::ENODEV, format!("controller {n} not found")));
        }
        Ok(Value::Array(list))
    });
}

#[cfg(test)]
mod tests {
    use crate::jsonrpc::RpcResult;
    use crate::methods::{Ctx, MethodTable};
    use crate::server::{Dispatch, Reply};
    use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
    use serde_json::{json, Value};
    use std::sync::Arc;
    use std::time::Duration;

    fn call(set: &ReactorSet, table: &Arc<MethodTable>, method: &'static str, params: Value) -> RpcResult {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = table.clone();
        set.send(0, move || t.call(method, Some(params), Reply::callback(move |r| drop(tx.send(r)))));
        rx.recv_timeout(Duration::from_secs(20)).expect("reply")
    }

    /// The RPCs on a threaded reactor set with the simulated controller
    /// (trtype SIM): attach returns the bdev names, the bdev shows its NVMe
    /// details, save_config recreates it, bad input gets clear errors, and
    /// detach removes it.
    #[test]
    fn attach_get_detach_with_the_simulated_controller() {
        let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0, 1], IdlePolicy::sleep()) };
        let set = ReactorSet::start(cfg, || ()).unwrap();
        let table = Arc::new(MethodTable::new(Ctx { reactors: set.clone(), shutdown: Box::new(|_| ()) }));
        let attach = json!({"name": "Sim0", "trtype": "SIM", "traddr": "sim", "sim_seed": 7,
                            "sim_num_blocks": 4096, "sim_block_size": 4096});
        assert_eq!(call(&set, &table, "bdev_nvme_attach_controller", attach.clone()).unwrap(), json!(["Sim0n1"]));
        let e = call(&set, &table, "bdev_nvme_attach_controller", attach).unwrap_err();
        assert_eq!(e.code, -libc::EEXIST, "{e:?}");

        let b = call(&set, &table, "bdev_get_bdevs", json!({"name": "Sim0n1"})).unwrap();
        assert_eq!(b[0]["block_size"], 4096);
        assert_eq!(b[0]["num_blocks"], 4096);
        assert_eq!(b[0]["product_name"], "NVMe disk");
        assert_eq!(b[0]["driver_specific"]["nvme"][0]["trid"]["trtype"], "SIM");
        let c = call(&set, &table, "bdev_nvme_get_controllers", json!({"name": "Sim0"})).unwrap();
        assert_eq!(c[0]["name"], "Sim0");
        assert_eq!(c[0]["ctrlrs"][0]["state"], "enabled");
        let conf = call(&set, &table, "framework_get_config", json!({"name": "bdev"})).unwrap();
        let found = conf.as_array().unwrap().iter().any(|m| {
            m["method"] == "bdev_nvme_attach_controller"
                && m["params"]["name"] == "Sim0"
                && m["params"]["sim_seed"] == 7
        });
        assert!(found, "{conf}");

        let e =
            call(&set, &table, "bdev_nvme_attach_controller", json!({"name": "X", "trtype": "RDMA", "traddr": "1"}))
                .unwrap_err();
        assert!(e.message.contains("trtype RDMA is not supported"), "{e:?}");
        let e = call(
            &set,
            &table,
            "bdev_nvme_attach_controller",
            json!({"name": "X", "trtype": "PCIe", "traddr": "banana"}),
        )
        .unwrap_err();
        assert!(e.message.contains("not a PCI address"), "{e:?}");
        let e = call(
            &set,
            &table,
            "bdev_nvme_attach_controller",
            json!({"name": "X", "trtype": "PCIe", "traddr": "0000:ff:1f.7"}),
        )
        .unwrap_err();
        assert!(e.message.contains("no PCI device 0000:ff:1f.7"), "{e:?}");

        assert_eq!(call(&set, &table, "bdev_nvme_detach_controller", json!({"name": "Sim0"})).unwrap(), json!(true));
        assert!(call(&set, &table, "bdev_get_bdevs", json!({"name": "Sim0n1"})).is_err());
        let e = call(&set, &table, "bdev_nvme_get_controllers", json!({"name": "Sim0"})).unwrap_err();
        assert_eq!(e.code, -libc::ENODEV);
        set.stop();
        set.join();
    }
}
