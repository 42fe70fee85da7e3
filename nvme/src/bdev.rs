//! The NVMe bdev: one per active namespace, named `<ctrlr>n<nsid>` as SPDK
//! names them. Its channel on a reactor is that reactor's queue pair of the
//! controller (shared by the controller's namespaces).

use crate::ctrlr::{Controller, Namespace};
use crate::qpair::{self, QPair};
use bdev::{Bdev, BdevChannel, BdevError, BdevProps, IoBox, IoType};
use nvme_spec::identify::oncs;
use serde_json::{json, Value};
use std::rc::Rc;
use std::sync::Arc;

pub struct NvmeBdev {
    props: BdevProps,
    ctrlr: Arc<Controller>,
    ns: Namespace,
    /// The call that recreates the controller, emitted by the first
    /// namespace's bdev only (save_config).
    attach_config: Option<Value>,
}

impl NvmeBdev {
    pub(crate) fn new(ctrlr: Arc<Controller>, ns: Namespace, attach_config: Option<Value>) -> Self {
        let name = format!("{}n{}", ctrlr.name(), ns.nsid);
        let uuid = if ns.nguid.iter().any(|&b| b != 0) { Some(uuid::Uuid::from_bytes(ns.nguid)) } else { None };
        let mut props = BdevProps::new(&name, "NVMe disk", ns.block_size, ns.num_blocks, uuid);
        let d = ctrlr.data();
        // A present but disabled cache holds nothing: every completed write
        // is on media, and FUA and flush cost nothing.
        props.write_cache = d.vwc && d.write_cache_enabled;
        // Only a bdev that unmaps can promise what unmapped blocks read as.
        props.deallocated_reads_zeroes = ns.deallocated_reads_zeroes && d.oncs & oncs::DATASET_MANAGEMENT != 0;
        // AWUPF is 0's based: 0 promises one block.
        props.atomic_write_blocks = u32::from(d.awupf) + 1;
        NvmeBdev { props, ctrlr, ns, attach_config }
    }

    pub fn controller(&self) -> &Arc<Controller> {
        &self.ctrlr
    }

    pub fn nsid(&self) -> u32 {
        self.ns.nsid
    }
}

struct NvmeChannel {
    qp: Rc<QPair>,
    nsid: u32,
    block_size: u32,
    max_io_blocks: u32,
}

impl BdevChannel for NvmeChannel {
    fn submit(&self, io: IoBox) {
        self.qp.submit(io, self.nsid, self.block_size, self.max_io_blocks);
    }
}

impl Bdev for NvmeBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }

    fn module(&self) -> &'static str {
        "nvme"
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        let o = self.ctrlr.data().oncs;
        match t {
            IoType::Read | IoType::Write | IoType::Flush => true,
            IoType::Unmap => o & oncs::DATASET_MANAGEMENT != 0,
            IoType::WriteZeroes => o & oncs::WRITE_ZEROES != 0,
            IoType::Reset => false,
        }
    }

    fn create_channel(&self) -> Result<Rc<dyn BdevChannel>, BdevError> {
        let qp = qpair::get_or_create(&self.ctrlr).map_err(|e| BdevError::Os(e.to_string(), e.errno()))?;
        Ok(Rc::new(NvmeChannel {
            qp,
            nsid: self.ns.nsid,
            block_size: self.ns.block_size,
            max_io_blocks: self.ns.max_io_blocks,
        }))
    }

    fn driver_specific(&self) -> Option<(&'static str, Value)> {
        let c = &self.ctrlr;
        let d = c.data();
        let vs = c.version();
        Some((
            "nvme",
            json!([{
                "pci_address": c.trid().traddr,
                "trid": {"trtype": c.trid().trtype, "traddr": c.trid().traddr},
                "ctrlr_data": {
                    "cntlid": d.cntlid,
                    "vendor_id": format!("{:#06x}", d.vid),
                    "model_number": d.model,
                    "serial_number": d.serial,
                    "firmware_revision": d.firmware,
                    "subnqn": d.subnqn,
                    "oacs": {"security": 0, "format": 0, "firmware": 0, "ns_manage": 0},
                    "multi_ctrlr": false,
                    "ana_reporting": false,
                },
                "vs": {"nvme_version": format!("{}.{}", vs.major(), vs.minor())},
                "ns_data": {"id": self.ns.nsid, "can_share": false},
                "mdts_blocks": self.ns.max_io_blocks,
                "health": {"critical_warning": c.critical_warning()},
                "qid_count": c.io_queue_count(),
            }]),
        ))
    }

    fn config(&self) -> Option<Value> {
        self.attach_config.clone()
    }
}
