//! Test harness: an iSCSI target on a reactor set over a malloc bdev, and a
//! small blocking initiator that speaks raw PDUs (so tests can also send
//! what a well-behaved initiator never would).
#![allow(dead_code)]

use bdev::malloc::MallocBdev;
use bdev::{BdevProps, Registry};
use iscsi::pdu::{self, op, Bhs, BHS_LEN};
use iscsi::{ChapPolicy, ChapSecret, InitiatorGroup, IscsiOpts, IscsiState, NodeParams, Portal};
use reactor::{IdlePolicy, ReactorConfig, ReactorSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

pub const TARGET: &str = "iqn.2016-06.io.spdk:disk1";
pub const INITIATOR: &str = "iqn.2026-01.test:initiator";
pub const BLOCK: usize = 512;
pub const BLOCKS: u64 = 8192;

pub struct Target {
    pub set: ReactorSet,
    pub addr: SocketAddr,
}

/// A target with one node (`disk1`, LUN 0 over a 4 MiB malloc bdev)
/// reachable through portal group 1 by initiator group 1 (`initiators`,
/// `netmasks`), with `auth` for the node and `secrets` in auth group 1.
pub fn target_with(initiators: &[&str], netmasks: &[&str], auth: ChapPolicy, secrets: Vec<ChapSecret>) -> Target {
    target_full(initiators, netmasks, auth, secrets, 0, None)
}

/// A target with these global options.
pub fn target_with_options(opts: IscsiOpts) -> Target {
    target_full(&["ANY"], &["ANY"], ChapPolicy::default(), Vec::new(), 0, Some(opts))
}

/// The LUN's IO takes `delay_us` (a delay bdev over the malloc one).
pub fn target_delayed(delay_us: u64) -> Target {
    target_full(&["ANY"], &["ANY"], ChapPolicy::default(), Vec::new(), delay_us, None)
}

fn target_full(
    initiators: &[&str],
    netmasks: &[&str],
    auth: ChapPolicy,
    secrets: Vec<ChapSecret>,
    delay_us: u64,
    opts: Option<IscsiOpts>,
) -> Target {
    let cfg = ReactorConfig { pin: false, ..ReactorConfig::new(vec![0, 1], IdlePolicy::sleep()) };
    let set = ReactorSet::start(cfg, || {}).unwrap();
    let initiators: Vec<String> = initiators.iter().map(|s| s.to_string()).collect();
    let netmasks: Vec<String> = netmasks.iter().map(|s| s.to_string()).collect();
    let addr = set.call(0, move || {
        let m = MallocBdev::new(BdevProps::new("Malloc0", "Malloc disk", BLOCK as u32, BLOCKS, None)).unwrap();
        Registry::get().register(Arc::new(m)).unwrap();
        let lun_bdev = if delay_us > 0 {
            bdev::delay::create(bdev::delay::DelayCreateParams {
                base_bdev_name: "Malloc0".into(),
                name: "Delay0".into(),
                avg_read_latency: delay_us,
                p99_read_latency: delay_us,
                avg_write_latency: delay_us,
                p99_write_latency: delay_us,
                uuid: None,
                random_seed: None,
                max_random_latency_us: None,
            })
            .unwrap();
            "Delay0"
        } else {
            "Malloc0"
        };
        let st = IscsiState::get();
        if let Some(o) = opts {
            st.set_options(o).unwrap();
        }
        st.create_auth_group(1, secrets).unwrap();
        st.create_portal_group(1, vec![Portal { host: "127.0.0.1".into(), port: "0".into() }], false).unwrap();
        st.create_initiator_group(InitiatorGroup { tag: 1, initiators, netmasks }).unwrap();
        st.create_target_node(NodeParams {
            name: "disk1".into(),
            alias_name: Some("Disk One".into()),
            pg_ig_maps: vec![(1, 1)],
            luns: vec![(lun_bdev.into(), 0)],
            queue_depth: 32,
            auth,
            header_digest: false,
            data_digest: false,
        })
        .unwrap();
        st.portal_addrs(1)[0]
    });
    Target { set, addr }
}

pub fn target() -> Target {
    target_with(&["ANY"], &["ANY"], ChapPolicy::default(), Vec::new())
}

impl Drop for Target {
    fn drop(&mut self) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.set.send(0, move || {
            iscsi::shutdown(move || {
                let _ = tx.send(());
            })
        });
        let _ = rx.recv_timeout(Duration::from_secs(15));
        self.set.stop();
        self.set.join();
    }
}

/// A received PDU.
pub struct Pdu {
    pub bhs: Bhs,
    pub data: Vec<u8>,
}

/// A raw initiator connection.
pub struct Ini {
    pub s: TcpStream,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub itt: u32,
    pub header_digest: bool,
    pub data_digest: bool,
    pub isid: [u8; 6],
    pub tsih: u16,
}

impl Ini {
    pub fn connect(addr: SocketAddr) -> Ini {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_nodelay(true).unwrap();
        Ini {
            s,
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
            header_digest: false,
            data_digest: false,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
        }
    }

    pub fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    /// Sends a PDU (data padded, digests as negotiated).
    pub fn send(&mut self, mut bhs: Bhs, data: &[u8]) {
        bhs.set_data_len(data.len() as u32);
        let mut out = bhs.0.to_vec();
        if self.header_digest {
            out.extend_from_slice(&pdu::digest(&[&bhs.0]).to_le_bytes());
        }
        if !data.is_empty() {
            let start = out.len();
            out.extend_from_slice(data);
            out.resize(out.len() + pdu::pad_len(data.len()), 0);
            if self.data_digest {
                let d = pdu::digest(&[&out[start..]]);
                out.extend_from_slice(&d.to_le_bytes());
            }
        }
        self.s.write_all(&out).unwrap();
    }

    /// The next PDU, or None when the target closed the connection (or
    /// sent nothing within the timeout).
    pub fn recv(&mut self) -> Option<Pdu> {
        let mut h = [0u8; BHS_LEN];
        self.s.read_exact(&mut h).ok()?;
        let bhs = Bhs(h);
        let mut skip = vec![0u8; bhs.ahs_len() + if self.header_digest { 4 } else { 0 }];
        self.s.read_exact(&mut skip).ok()?;
        let len = bhs.data_len() as usize;
        let mut data = vec![0u8; len + pdu::pad_len(len)];
        self.s.read_exact(&mut data).ok()?;
        if self.data_digest && len > 0 {
            let mut d = [0u8; 4];
            self.s.read_exact(&mut d).ok()?;
            assert_eq!(u32::from_le_bytes(d), pdu::digest(&[&data]), "target's data digest");
        }
        data.truncate(len);
        // A target's ping (NOP-In without an ITT) carries the next StatSN
        // without taking it.
        let ping = bhs.opcode() == op::NOP_IN && bhs.itt() == 0xffff_ffff;
        if matches!(
            bhs.opcode(),
            op::SCSI_RESP | op::NOP_IN | op::TMF_RESP | op::TEXT_RESP | op::LOGOUT_RESP | op::LOGIN_RESP
        ) && !ping
            || (bhs.opcode() == op::DATA_IN && bhs.flags() & 1 != 0)
        {
            self.exp_stat_sn = bhs.u32_at(24).wrapping_add(1);
        }
        Some(Pdu { bhs, data })
    }

    /// Whether the target closes the connection (within the read timeout)
    /// without sending anything more.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }

    /// One login request of stage `csg`, moving to `nsg` if `transit`.
    pub fn login_pdu(&mut self, csg: u8, nsg: u8, transit: bool, keys: &[(&str, &str)]) -> Pdu {
        let mut b = Bhs::new(op::LOGIN_REQ | 0x40);
        b.set_flags(if transit { 0x80 } else { 0 } | (csg << 2) | if transit { nsg } else { 0 });
        b.0[8..14].copy_from_slice(&self.isid);
        b.set_u16(14, self.tsih);
        b.set_u32(16, 0x1000);
        b.set_u32(24, self.cmd_sn);
        b.set_u32(28, self.exp_stat_sn);
        let mut text = Vec::new();
        for (k, v) in keys {
            iscsi::text::push(&mut text, k, v);
        }
        self.send(b, &text);
        self.recv().expect("login response")
    }

    /// A normal-session login without authentication, straight to full feature.
    pub fn login(&mut self, target: &str, extra: &[(&str, &str)]) -> Pdu {
        let mut keys = vec![
            ("InitiatorName", INITIATOR),
            ("TargetName", target),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ];
        keys.extend_from_slice(extra);
        let r = self.login_pdu(0, 3, true, &keys);
        if r.bhs.byte(36) == 0 && r.bhs.flags() & 0x80 != 0 {
            self.tsih = r.bhs.u16_at(14);
        }
        r
    }

    /// Sends a SCSI command; `write`: Data-Out to offer (immediate up to `immediate`).
    pub fn scsi(&mut self, cdb: &[u8], read_len: u32, write: Option<&[u8]>, immediate: usize) -> u32 {
        let itt = self.next_itt();
        let mut b = Bhs::new(op::SCSI_CMD);
        let mut flags = 0x80 | 1;
        if read_len > 0 {
            flags |= 0x40;
        }
        if write.is_some() {
            flags |= 0x20;
        }
        b.set_flags(flags);
        b.set_u32(16, itt);
        b.set_u32(20, write.map_or(read_len, |w| w.len() as u32));
        b.set_u32(24, self.cmd_sn);
        self.cmd_sn += 1;
        b.set_u32(28, self.exp_stat_sn);
        b.0[32..32 + cdb.len()].copy_from_slice(cdb);
        let imm = write.map_or(&[][..], |w| &w[..immediate.min(w.len())]);
        self.send(b, imm);
        itt
    }

    /// Answers R2Ts from `data` until the command's response arrives;
    /// returns (status, Data-In bytes, response PDU).
    pub fn finish(&mut self, itt: u32, data: Option<&[u8]>) -> (u8, Vec<u8>, Pdu) {
        let mut din = Vec::new();
        loop {
            let p = self.recv().expect("response");
            match p.bhs.opcode() {
                op::R2T => {
                    let (ttt, off, len) = (p.bhs.u32_at(20), p.bhs.u32_at(40) as usize, p.bhs.u32_at(44) as usize);
                    let d = data.expect("R2T for a read");
                    let mut sent = 0;
                    let mut sn = 0;
                    while sent < len {
                        let n = (len - sent).min(8192);
                        let mut b = Bhs::new(op::DATA_OUT);
                        b.set_flags(if sent + n == len { 0x80 } else { 0 });
                        b.set_u32(16, itt);
                        b.set_u32(20, ttt);
                        b.set_u32(28, self.exp_stat_sn);
                        b.set_u32(36, sn);
                        b.set_u32(40, (off + sent) as u32);
                        self.send(b, &d[off + sent..off + sent + n]);
                        sent += n;
                        sn += 1;
                    }
                }
                op::DATA_IN => {
                    assert_eq!(p.bhs.u32_at(40) as usize, din.len(), "Data-In in order");
                    din.extend_from_slice(&p.data);
                    if p.bhs.flags() & 1 != 0 {
                        return (p.bhs.byte(3), din, p);
                    }
                }
                op::SCSI_RESP => {
                    assert_eq!(p.bhs.itt(), itt);
                    return (p.bhs.byte(3), din, p);
                }
                o => panic!("unexpected opcode {o:#x}"),
            }
        }
    }
}

pub fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

pub fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

/// Key=value pairs of a text data segment.
pub fn keys(data: &[u8]) -> Vec<(String, String)> {
    iscsi::text::parse(data).unwrap()
}

pub fn key<'a>(k: &'a [(String, String)], name: &str) -> Option<&'a str> {
    k.iter().find(|(x, _)| x == name).map(|(_, v)| v.as_str())
}
