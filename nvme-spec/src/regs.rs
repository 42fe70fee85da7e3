//! Controller registers (BAR0 on PCIe, properties over fabrics): offsets,
//! bitfields of CAP, VS, CC, CSTS and AQA, and the doorbell formula.
//!
//! The register values are plain `u64`/`u32` newtypes: how they are read
//! (volatile MMIO, or a fabrics Property Get) is the caller's business.

/// Register offsets; over fabrics the same numbers are property offsets.
pub mod offset {
    /// Controller Capabilities, 8 bytes.
    pub const CAP: u32 = 0x00;
    /// Version, 4 bytes.
    pub const VS: u32 = 0x08;
    /// Interrupt Mask Set (PCIe only).
    pub const INTMS: u32 = 0x0C;
    /// Interrupt Mask Clear (PCIe only).
    pub const INTMC: u32 = 0x10;
    /// Controller Configuration, 4 bytes.
    pub const CC: u32 = 0x14;
    /// Controller Status, 4 bytes.
    pub const CSTS: u32 = 0x1C;
    /// NVM Subsystem Reset, 4 bytes.
    pub const NSSR: u32 = 0x20;
    /// Admin Queue Attributes (PCIe only).
    pub const AQA: u32 = 0x24;
    /// Admin SQ Base Address (PCIe only), 8 bytes.
    pub const ASQ: u32 = 0x28;
    /// Admin CQ Base Address (PCIe only), 8 bytes.
    pub const ACQ: u32 = 0x30;
    pub const CMBLOC: u32 = 0x38;
    pub const CMBSZ: u32 = 0x3C;
    /// First doorbell (admin SQ tail); see [`super::doorbell_offset`].
    pub const DOORBELLS: u32 = 0x1000;
}

/// Value written to NSSR to start an NVM subsystem reset ("NVMe").
pub const NSSR_RESET_VALUE: u32 = 0x4E56_4D65;

/// Byte offset of a queue's doorbell: SQ tail doorbells and CQ head
/// doorbells interleave from 0x1000, each `4 << CAP.DSTRD` bytes apart.
pub const fn doorbell_offset(qid: u16, is_cq: bool, dstrd: u8) -> u64 {
    let index = 2 * qid as u64 + is_cq as u64;
    // DSTRD is 4 bits; mask so a bad CAP cannot overflow the shift.
    let stride = 4u64 << (dstrd & 0xF);
    offset::DOORBELLS as u64 + index * stride
}

const fn get64(v: u64, shift: u32, bits: u32) -> u64 {
    (v >> shift) & ((1u64 << bits) - 1)
}

const fn set64(v: u64, shift: u32, bits: u32, field: u64) -> u64 {
    let mask = ((1u64 << bits) - 1) << shift;
    (v & !mask) | ((field << shift) & mask)
}

const fn get32(v: u32, shift: u32, bits: u32) -> u32 {
    get64(v as u64, shift, bits) as u32
}

const fn set32(v: u32, shift: u32, bits: u32, field: u32) -> u32 {
    set64(v as u64, shift, bits, field as u64) as u32
}

/// Controller Capabilities (CAP, offset 0x00).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cap(pub u64);

/// CAP.CSS bits: which command sets the controller supports.
pub mod cap_css {
    /// NVM command set.
    pub const NVM: u8 = 1 << 0;
    /// One or more IO command sets (select with CC.CSS = 110b).
    pub const IO_COMMAND_SETS: u8 = 1 << 6;
    /// No IO command set: admin only (discovery controllers).
    pub const NO_IO: u8 = 1 << 7;
}

impl Cap {
    /// Maximum queue entries supported, 0's based (MQES, bits 15:0).
    pub const fn mqes(self) -> u16 {
        get64(self.0, 0, 16) as u16
    }
    /// Contiguous queues required (CQR, bit 16).
    pub const fn cqr(self) -> bool {
        get64(self.0, 16, 1) != 0
    }
    /// Arbitration mechanisms supported beyond round robin (AMS, bits 18:17).
    pub const fn ams(self) -> u8 {
        get64(self.0, 17, 2) as u8
    }
    /// Worst-case time to ready, in 500 ms units (TO, bits 31:24).
    pub const fn timeout_500ms(self) -> u8 {
        get64(self.0, 24, 8) as u8
    }
    /// Doorbell stride: doorbells are `4 << dstrd` bytes apart (bits 35:32).
    pub const fn dstrd(self) -> u8 {
        get64(self.0, 32, 4) as u8
    }
    /// NVM subsystem reset supported (NSSRS, bit 36).
    pub const fn nssrs(self) -> bool {
        get64(self.0, 36, 1) != 0
    }
    /// Command sets supported (CSS, bits 44:37); see [`cap_css`].
    pub const fn css(self) -> u8 {
        get64(self.0, 37, 8) as u8
    }
    /// Boot partition support (BPS, bit 45).
    pub const fn bps(self) -> bool {
        get64(self.0, 45, 1) != 0
    }
    /// Minimum memory page size: `4096 << mpsmin` bytes (bits 51:48).
    pub const fn mpsmin(self) -> u8 {
        get64(self.0, 48, 4) as u8
    }
    /// Maximum memory page size: `4096 << mpsmax` bytes (bits 55:52).
    pub const fn mpsmax(self) -> u8 {
        get64(self.0, 52, 4) as u8
    }
    /// Controller memory buffer supported (CMBS, bit 57).
    pub const fn cmbs(self) -> bool {
        get64(self.0, 57, 1) != 0
    }

    pub const fn with_mqes(self, v: u16) -> Self {
        Self(set64(self.0, 0, 16, v as u64))
    }
    pub const fn with_cqr(self, v: bool) -> Self {
        Self(set64(self.0, 16, 1, v as u64))
    }
    pub const fn with_ams(self, v: u8) -> Self {
        Self(set64(self.0, 17, 2, v as u64))
    }
    pub const fn with_timeout_500ms(self, v: u8) -> Self {
        Self(set64(self.0, 24, 8, v as u64))
    }
    pub const fn with_dstrd(self, v: u8) -> Self {
        Self(set64(self.0, 32, 4, v as u64))
    }
    pub const fn with_nssrs(self, v: bool) -> Self {
        Self(set64(self.0, 36, 1, v as u64))
    }
    pub const fn with_css(self, v: u8) -> Self {
        Self(set64(self.0, 37, 8, v as u64))
    }
    pub const fn with_mpsmin(self, v: u8) -> Self {
        Self(set64(self.0, 48, 4, v as u64))
    }
    pub const fn with_mpsmax(self, v: u8) -> Self {
        Self(set64(self.0, 52, 4, v as u64))
    }
}

/// Version (VS, offset 0x08): major bits 31:16, minor 15:8, tertiary 7:0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Vs(pub u32);

impl Vs {
    pub const V1_3: Self = Self::new(1, 3, 0);
    pub const V1_4: Self = Self::new(1, 4, 0);
    pub const V2_0: Self = Self::new(2, 0, 0);

    pub const fn new(major: u16, minor: u8, tertiary: u8) -> Self {
        Self(((major as u32) << 16) | ((minor as u32) << 8) | tertiary as u32)
    }
    pub const fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }
    pub const fn minor(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub const fn tertiary(self) -> u8 {
        self.0 as u8
    }
}

/// CC.SHN / CSTS.SHST encodings.
pub mod shutdown {
    /// CC.SHN: no notification.
    pub const SHN_NONE: u8 = 0b00;
    /// CC.SHN: normal shutdown.
    pub const SHN_NORMAL: u8 = 0b01;
    /// CC.SHN: abrupt shutdown.
    pub const SHN_ABRUPT: u8 = 0b10;
    /// CSTS.SHST: normal operation.
    pub const SHST_NORMAL: u8 = 0b00;
    /// CSTS.SHST: shutdown processing in progress.
    pub const SHST_OCCURRING: u8 = 0b01;
    /// CSTS.SHST: shutdown processing complete.
    pub const SHST_COMPLETE: u8 = 0b10;
}

/// CC.CSS encodings.
pub mod cc_css {
    pub const NVM: u8 = 0b000;
    pub const ALL_IO_COMMAND_SETS: u8 = 0b110;
    pub const ADMIN_ONLY: u8 = 0b111;
}

/// Controller Configuration (CC, offset 0x14).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cc(pub u32);

impl Cc {
    /// Enable (EN, bit 0).
    pub const fn en(self) -> bool {
        get32(self.0, 0, 1) != 0
    }
    /// IO command set selected (CSS, bits 6:4); see [`cc_css`].
    pub const fn css(self) -> u8 {
        get32(self.0, 4, 3) as u8
    }
    /// Memory page size: `4096 << mps` bytes (MPS, bits 10:7).
    pub const fn mps(self) -> u8 {
        get32(self.0, 7, 4) as u8
    }
    /// Arbitration mechanism selected (AMS, bits 13:11).
    pub const fn ams(self) -> u8 {
        get32(self.0, 11, 3) as u8
    }
    /// Shutdown notification (SHN, bits 15:14); see [`shutdown`].
    pub const fn shn(self) -> u8 {
        get32(self.0, 14, 2) as u8
    }
    /// IO SQ entry size as a power of two (IOSQES, bits 19:16; 6 = 64 B).
    pub const fn iosqes(self) -> u8 {
        get32(self.0, 16, 4) as u8
    }
    /// IO CQ entry size as a power of two (IOCQES, bits 23:20; 4 = 16 B).
    pub const fn iocqes(self) -> u8 {
        get32(self.0, 20, 4) as u8
    }

    pub const fn with_en(self, v: bool) -> Self {
        Self(set32(self.0, 0, 1, v as u32))
    }
    pub const fn with_css(self, v: u8) -> Self {
        Self(set32(self.0, 4, 3, v as u32))
    }
    pub const fn with_mps(self, v: u8) -> Self {
        Self(set32(self.0, 7, 4, v as u32))
    }
    pub const fn with_ams(self, v: u8) -> Self {
        Self(set32(self.0, 11, 3, v as u32))
    }
    pub const fn with_shn(self, v: u8) -> Self {
        Self(set32(self.0, 14, 2, v as u32))
    }
    pub const fn with_iosqes(self, v: u8) -> Self {
        Self(set32(self.0, 16, 4, v as u32))
    }
    pub const fn with_iocqes(self, v: u8) -> Self {
        Self(set32(self.0, 20, 4, v as u32))
    }
}

/// Controller Status (CSTS, offset 0x1C).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Csts(pub u32);

impl Csts {
    /// Ready (RDY, bit 0).
    pub const fn rdy(self) -> bool {
        get32(self.0, 0, 1) != 0
    }
    /// Controller fatal status (CFS, bit 1).
    pub const fn cfs(self) -> bool {
        get32(self.0, 1, 1) != 0
    }
    /// Shutdown status (SHST, bits 3:2); see [`shutdown`].
    pub const fn shst(self) -> u8 {
        get32(self.0, 2, 2) as u8
    }
    /// NVM subsystem reset occurred (NSSRO, bit 4).
    pub const fn nssro(self) -> bool {
        get32(self.0, 4, 1) != 0
    }
    /// Processing paused (PP, bit 5).
    pub const fn pp(self) -> bool {
        get32(self.0, 5, 1) != 0
    }

    pub const fn with_rdy(self, v: bool) -> Self {
        Self(set32(self.0, 0, 1, v as u32))
    }
    pub const fn with_cfs(self, v: bool) -> Self {
        Self(set32(self.0, 1, 1, v as u32))
    }
    pub const fn with_shst(self, v: u8) -> Self {
        Self(set32(self.0, 2, 2, v as u32))
    }
}

/// Admin Queue Attributes (AQA, offset 0x24): sizes are 0's based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Aqa(pub u32);

impl Aqa {
    /// From real entry counts (2..=4096 each).
    pub const fn new(sq_entries: u16, cq_entries: u16) -> Self {
        let asqs = (sq_entries.saturating_sub(1) & 0xFFF) as u32;
        let acqs = (cq_entries.saturating_sub(1) & 0xFFF) as u32;
        Self(asqs | (acqs << 16))
    }
    /// Admin SQ size, 0's based (ASQS, bits 11:0).
    pub const fn asqs(self) -> u16 {
        get32(self.0, 0, 12) as u16
    }
    /// Admin CQ size, 0's based (ACQS, bits 27:16).
    pub const fn acqs(self) -> u16 {
        get32(self.0, 16, 12) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbells_interleave_sq_and_cq() {
        assert_eq!(doorbell_offset(0, false, 0), 0x1000);
        assert_eq!(doorbell_offset(0, true, 0), 0x1004);
        assert_eq!(doorbell_offset(1, false, 0), 0x1008);
        assert_eq!(doorbell_offset(1, true, 0), 0x100C);
        // DSTRD 2: 16-byte stride.
        assert_eq!(doorbell_offset(3, true, 2), 0x1000 + 7 * 16);
        assert_eq!(doorbell_offset(u16::MAX, true, 15), 0x1000 + 131_071 * (4 << 15));
    }

    #[test]
    fn cap_fields_decode_from_a_qemu_like_value() {
        // MQES 2047, CQR, TO 15 (7.5 s), DSTRD 0, NSSRS, CSS NVM, MPSMIN 0, MPSMAX 4.
        let cap = Cap::default()
            .with_mqes(2047)
            .with_cqr(true)
            .with_timeout_500ms(15)
            .with_nssrs(true)
            .with_css(cap_css::NVM)
            .with_mpsmax(4);
        assert_eq!(cap.0, 0x0040_0030_0F01_07FF);
        assert_eq!(cap.mqes(), 2047);
        assert!(cap.cqr());
        assert_eq!(cap.timeout_500ms(), 15);
        assert_eq!(cap.dstrd(), 0);
        assert!(cap.nssrs());
        assert_eq!(cap.css(), cap_css::NVM);
        assert_eq!(cap.mpsmin(), 0);
        assert_eq!(cap.mpsmax(), 4);
    }

    #[test]
    fn cc_and_csts_bits() {
        let cc = Cc::default().with_en(true).with_iosqes(6).with_iocqes(4).with_shn(shutdown::SHN_NORMAL);
        assert_eq!(cc.0, 0x0046_4001);
        assert!(cc.en());
        assert_eq!(cc.iosqes(), 6);
        assert_eq!(cc.iocqes(), 4);
        assert_eq!(cc.shn(), shutdown::SHN_NORMAL);
        assert_eq!(cc.with_en(false).0, 0x0046_4000);

        let csts = Csts::default().with_rdy(true).with_shst(shutdown::SHST_COMPLETE);
        assert_eq!(csts.0, 0b1001);
        assert!(csts.rdy() && !csts.cfs());
        assert_eq!(csts.shst(), shutdown::SHST_COMPLETE);
    }

    #[test]
    fn aqa_and_vs() {
        let aqa = Aqa::new(32, 32);
        assert_eq!(aqa.0, 0x001F_001F);
        assert_eq!(aqa.asqs(), 31);
        assert_eq!(Vs::V1_3.0, 0x0001_0300);
        assert_eq!(Vs(0x0002_0000).major(), 2);
    }
}
