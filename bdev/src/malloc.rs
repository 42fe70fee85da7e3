//! RAM bdev (`bdev_malloc_create`) and the null bdev (`bdev_null_create`):
//! the fastest possible backends, for tests and for measuring stack overhead.

use crate::channel::{Bdev, BdevChannel, BdevProps};
use crate::dma::SharedMem;
use crate::io::{IoBox, IoError, IoStatus, IoType};
use crate::BdevError;
use serde_json::{json, Value};
use std::rc::Rc;
use std::sync::Arc;

pub struct MallocBdev {
    props: BdevProps,
    mem: Arc<SharedMem>,
}

impl MallocBdev {
    pub fn new(mut props: BdevProps) -> Result<Self, BdevError> {
        validate_geometry(&props)?;
        // RAM has no cache to lose; unmapped blocks are filled with zeroes.
        props.write_cache = false;
        props.deallocated_reads_zeroes = true;
        // Its contents do not outlive the process: no power loss can leave
        // part of a write behind.
        props.atomic_write_blocks = u32::MAX;
        let bytes = usize::try_from(props.size_bytes())
            .map_err(|_| BdevError::Invalid(format!("{}: size does not fit in memory", props.name)))?;
        let mem = SharedMem::new(bytes)
            .ok_or_else(|| BdevError::NoMemory(format!("cannot allocate {bytes} bytes for {}", props.name)))?;
        Ok(MallocBdev { props, mem: Arc::new(mem) })
    }

    /// Raw view of the store, for tests that compare mirrors.
    pub fn read_raw(&self, offset_bytes: usize, dst: &mut [u8]) -> bool {
        self.mem.read_to_slice(offset_bytes, dst)
    }
}

/// Block size and count a bdev may have (SPDK accepts 512..=64 KiB, powers of 2).
pub fn validate_geometry(p: &BdevProps) -> Result<(), BdevError> {
    if !(512..=65536).contains(&p.block_size) || !p.block_size.is_power_of_two() {
        return Err(BdevError::Invalid(format!(
            "block_size {} is not a power of two between 512 and 65536",
            p.block_size
        )));
    }
    if p.num_blocks == 0 {
        return Err(BdevError::Invalid("num_blocks must be greater than 0".into()));
    }
    Ok(())
}

struct MallocChannel {
    mem: Arc<SharedMem>,
    block_size: u64,
}

impl Bdev for MallocBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn module(&self) -> &'static str {
        "malloc"
    }
    fn io_type_supported(&self, _t: IoType) -> bool {
        true
    }
    fn create_channel(&self) -> Result<Rc<dyn BdevChannel>, BdevError> {
        Ok(Rc::new(MallocChannel { mem: self.mem.clone(), block_size: self.props.block_size as u64 }))
    }
    fn config(&self) -> Option<Value> {
        Some(json!({"method": "bdev_malloc_create", "params": {
            "name": self.props.name, "num_blocks": self.props.num_blocks,
            "block_size": self.props.block_size, "uuid": self.props.uuid.to_string()}}))
    }
}

impl BdevChannel for MallocChannel {
    fn submit(&self, io: IoBox) {
        let off = (io.offset_blocks * self.block_size) as usize;
        let len = (io.num_blocks * self.block_size) as usize;
        let ok = match io.io_type {
            IoType::Read => io.buf.as_ref().is_some_and(|b| self.mem.read_into(off, &b.slice(0, len))),
            IoType::Write => io.buf.as_ref().is_some_and(|b| self.mem.write_from(off, &b.slice(0, len))),
            IoType::Unmap | IoType::WriteZeroes => self.mem.fill(off, len, 0),
            IoType::Flush | IoType::Reset => true,
        };
        io.complete(if ok { IoStatus::Success } else { IoStatus::Failed(IoError::OutOfRange) });
    }
}

/// Discards writes and returns reads untouched: pure stack overhead.
pub struct NullBdev {
    props: BdevProps,
}

impl NullBdev {
    pub fn new(mut props: BdevProps) -> Result<Self, BdevError> {
        validate_geometry(&props)?;
        // Nothing is stored, so nothing can be lost: no cache. It does not
        // unmap, so it promises nothing about deallocated blocks.
        props.write_cache = false;
        props.deallocated_reads_zeroes = false;
        props.atomic_write_blocks = u32::MAX;
        Ok(NullBdev { props })
    }
}

struct NullChannel;

impl Bdev for NullBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn module(&self) -> &'static str {
        "null"
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        !matches!(t, IoType::Unmap)
    }
    fn create_channel(&self) -> Result<Rc<dyn BdevChannel>, BdevError> {
        Ok(Rc::new(NullChannel))
    }
    fn config(&self) -> Option<Value> {
        Some(json!({"method": "bdev_null_create", "params": {
            "name": self.props.name, "num_blocks": self.props.num_blocks,
            "block_size": self.props.block_size, "uuid": self.props.uuid.to_string()}}))
    }
}

impl BdevChannel for NullChannel {
    fn submit(&self, io: IoBox) {
        io.complete(IoStatus::Success);
    }
}
