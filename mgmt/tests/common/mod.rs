//! The method table on a one-reactor set, called as the RPC server calls it.

use mgmt::jsonrpc::RpcResult;
use mgmt::server::{Dispatch, Reply};
use mgmt::{Ctx, MethodTable};
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

pub struct Target {
    pub set: ReactorSet,
    pub table: Arc<MethodTable>,
}

impl Target {
    pub fn start() -> Target {
        let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0], IdlePolicy::sleep()) };
        let set = ReactorSet::start(cfg, mgmt::init_modules).unwrap();
        let table = Arc::new(MethodTable::new(Ctx { reactors: set.clone(), shutdown: Box::new(|_| ()) }));
        Target { set, table }
    }

    pub fn call(&self, method: &str, params: Value) -> RpcResult {
        let (tx, rx) = std::sync::mpsc::channel();
        let (t, m) = (self.table.clone(), method.to_string());
        self.set.send(0, move || t.call(&m, Some(params), Reply::callback(move |r| drop(tx.send(r)))));
        rx.recv_timeout(Duration::from_secs(20)).expect("reply")
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.set.stop();
        self.set.join();
    }
}
