//! The workloads `-w` names, and what each one submits.

use mgmt::bdev::IoType;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Read,
    Write,
    RandRead,
    RandWrite,
    /// Sequential, reads and writes mixed by `-M`.
    Rw,
    /// Random, reads and writes mixed by `-M`.
    RandRw,
    /// Stamped writes, each read back and compared.
    Verify,
    Unmap,
    WriteZeroes,
    Flush,
}

impl Workload {
    pub const ALL: [Workload; 10] = [
        Workload::Read,
        Workload::Write,
        Workload::RandRead,
        Workload::RandWrite,
        Workload::Rw,
        Workload::RandRw,
        Workload::Verify,
        Workload::Unmap,
        Workload::WriteZeroes,
        Workload::Flush,
    ];

    /// The name `-w` takes (bdevperf's spelling).
    pub fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::Rw => "rw",
            Workload::RandRw => "randrw",
            Workload::Verify => "verify",
            Workload::Unmap => "unmap",
            Workload::WriteZeroes => "write_zeroes",
            Workload::Flush => "flush",
        }
    }

    pub fn from_name(s: &str) -> Option<Workload> {
        Self::ALL.into_iter().find(|w| w.name() == s)
    }

    /// Offsets drawn at random (aligned to the IO size) rather than in order.
    pub fn is_random(self) -> bool {
        matches!(self, Workload::RandRead | Workload::RandWrite | Workload::RandRw)
    }

    /// Reads and writes mixed by `-M`.
    pub fn is_mixed(self) -> bool {
        matches!(self, Workload::Rw | Workload::RandRw)
    }

    /// IO types the bdev must support.
    pub fn io_types(self) -> &'static [IoType] {
        match self {
            Workload::Read | Workload::RandRead => &[IoType::Read],
            Workload::Write | Workload::RandWrite => &[IoType::Write],
            Workload::Rw | Workload::RandRw | Workload::Verify => &[IoType::Read, IoType::Write],
            Workload::Unmap => &[IoType::Unmap],
            Workload::WriteZeroes => &[IoType::WriteZeroes],
            Workload::Flush => &[IoType::Flush],
        }
    }

    /// Carries data buffers (needs `-o`-sized DMA buffers per slot).
    pub fn has_data(self) -> bool {
        self.io_types().iter().any(|t| t.has_data())
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// All workload names, for error messages.
pub fn names() -> String {
    Workload::ALL.iter().map(|w| w.name()).collect::<Vec<_>>().join(", ")
}
