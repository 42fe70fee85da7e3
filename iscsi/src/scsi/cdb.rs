//! CDB decoding: operation codes, the block range and flags of the
//! read/write family, and how much Data-Out each command carries.

/// Operation codes served (SPC-5 / SBC-4).
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const ORWRITE_16: u8 = 0x8B;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_ATOMIC_16: u8 = 0x9C;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_AND_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;
    pub const READ_DEFECT_DATA_12: u8 = 0xB7;

    /// SERVICE ACTION IN (16) service actions.
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
    pub const SA_GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN service actions.
    pub const SA_REPORT_SUPPORTED_OPCODES: u8 = 0x0C;
    pub const SA_REPORT_SUPPORTED_TMFS: u8 = 0x0D;
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be24(b: &[u8]) -> u32 {
    u32::from_be_bytes([0, b[0], b[1], b[2]])
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// The CDB length an operation code's group implies (SPC-5 4.2.5.1), or
/// None for reserved / vendor groups.
pub fn cdb_len_of(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// LBA, block count and byte 1 (flag bits) of a READ/WRITE/VERIFY/
/// WRITE AND VERIFY/WRITE SAME/COMPARE AND WRITE CDB. A count of 0 means 0
/// blocks except for READ(6)/WRITE(6), where it means 256.
pub fn block_range(cdb: &[u8; 16]) -> Option<(u64, u64, u8)> {
    use op::*;
    let c = cdb;
    Some(match c[0] {
        READ_6 | WRITE_6 => {
            let lba = u64::from(be24(&c[1..4]) & 0x1F_FFFF);
            let n = if c[4] == 0 { 256 } else { u64::from(c[4]) };
            (lba, n, 0)
        }
        READ_10 | WRITE_10 | WRITE_AND_VERIFY_10 | VERIFY_10 | WRITE_SAME_10 => {
            (u64::from(be32(&c[2..6])), u64::from(be16(&c[7..9])), c[1])
        }
        READ_12 | WRITE_12 | WRITE_AND_VERIFY_12 | VERIFY_12 => {
            (u64::from(be32(&c[2..6])), u64::from(be32(&c[6..10])), c[1])
        }
        READ_16 | WRITE_16 | ORWRITE_16 | WRITE_AND_VERIFY_16 | VERIFY_16 | WRITE_SAME_16 => {
            (be64(&c[2..10]), u64::from(be32(&c[10..14])), c[1])
        }
        COMPARE_AND_WRITE => (be64(&c[2..10]), u64::from(c[13]), c[1]),
        // Bytes 10-11 are the ATOMIC BOUNDARY, the length is 16 bits.
        WRITE_ATOMIC_16 => (be64(&c[2..10]), u64::from(be16(&c[12..14])), c[1]),
        _ => return None,
    })
}

/// Bytes of Data-Out the command carries per its CDB (0 if none).
pub fn data_out_len(cdb: &[u8; 16], block_size: u32) -> u32 {
    use op::*;
    let bs = u64::from(block_size);
    let bytes: u64 = match cdb[0] {
        WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 | WRITE_AND_VERIFY_10 | WRITE_AND_VERIFY_12 | WRITE_AND_VERIFY_16
        | ORWRITE_16 | WRITE_ATOMIC_16 => block_range(cdb).map_or(0, |(_, n, _)| n * bs),
        COMPARE_AND_WRITE => u64::from(cdb[13]) * 2 * bs,
        VERIFY_10 | VERIFY_12 | VERIFY_16 => match (cdb[1] >> 1) & 3 {
            1 => block_range(cdb).map_or(0, |(_, n, _)| n * bs),
            3 => bs,
            _ => 0,
        },
        WRITE_SAME_10 => bs,
        // NDOB: no data-out buffer, the blocks are zeroed.
        WRITE_SAME_16 => {
            if cdb[1] & 1 != 0 {
                0
            } else {
                bs
            }
        }
        UNMAP => u64::from(be16(&cdb[7..9])),
        MODE_SELECT_6 => u64::from(cdb[4]),
        MODE_SELECT_10 => u64::from(be16(&cdb[7..9])),
        PERSISTENT_RESERVE_OUT => u64::from(be32(&cdb[5..9])),
        _ => 0,
    };
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Bytes of Data-In the CDB asks for at most (its allocation length, or the
/// block count for reads), used for residuals; None for commands that
/// transfer no Data-In.
pub fn data_in_len(cdb: &[u8; 16], block_size: u32) -> Option<u64> {
    use op::*;
    let bs = u64::from(block_size);
    Some(match cdb[0] {
        READ_6 | READ_10 | READ_12 | READ_16 => block_range(cdb).map_or(0, |(_, n, _)| n * bs),
        INQUIRY => u64::from(be16(&cdb[3..5])),
        REQUEST_SENSE | MODE_SENSE_6 => u64::from(cdb[4]),
        MODE_SENSE_10 | PERSISTENT_RESERVE_IN => u64::from(be16(&cdb[7..9])),
        READ_CAPACITY_10 => 8,
        SERVICE_ACTION_IN_16 => u64::from(be32(&cdb[10..14])),
        REPORT_LUNS => u64::from(be32(&cdb[6..10])),
        MAINTENANCE_IN => u64::from(be32(&cdb[6..10])),
        READ_DEFECT_DATA_10 => u64::from(be16(&cdb[7..9])),
        READ_DEFECT_DATA_12 => u64::from(be32(&cdb[6..10])),
        _ => return None,
    })
}
