//! The objects of the target's table: global options and CHAP policies,
//! portal groups, initiator groups (with netmask matching), CHAP secrets,
//! target nodes and their LUNs, and what the control plane knows of a
//! connection.

use super::{invalid, IscsiError};
use crate::scsi::Lun;
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The target's MaxRecvDataSegmentLength (what it declares and accepts).
pub const MAX_RECV_DATA_SEGMENT_LENGTH: u32 = 65_536;
/// The target's MaxBurstLength offer.
pub const MAX_BURST_LENGTH: u32 = 1 << 20;

/// CHAP policy of the discovery session or of a target node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChapPolicy {
    pub disable_chap: bool,
    pub require_chap: bool,
    pub mutual_chap: bool,
    /// Auth group tag holding the secrets (0: none).
    pub chap_group: i32,
}

impl ChapPolicy {
    /// SPDK's rule: disable and require exclude each other, mutual needs require.
    pub fn validate(&self) -> Result<(), IscsiError> {
        if self.disable_chap && self.require_chap {
            return invalid("disable_chap and require_chap exclude each other");
        }
        if self.mutual_chap && !self.require_chap {
            return invalid("mutual_chap needs require_chap");
        }
        if self.chap_group < 0 {
            return invalid("chap_group must be 0 (none) or a positive auth group tag");
        }
        Ok(())
    }
}

/// `iscsi_set_options` / `iscsi_get_options` (SPDK's names and defaults,
/// except where nvraid implements less: see `validate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiOpts {
    pub node_base: String,
    pub nop_timeout: u32,
    pub nop_in_interval: u32,
    pub discovery_auth: ChapPolicy,
    pub max_sessions: u32,
    pub max_connections_per_session: u32,
    pub max_queue_depth: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub first_burst_length: u32,
    pub immediate_data: bool,
    pub allow_duplicated_isid: bool,
    pub error_recovery_level: u32,
    pub max_r2t_per_connection: u32,
}

impl Default for IscsiOpts {
    fn default() -> Self {
        IscsiOpts {
            node_base: "iqn.2016-06.io.spdk".into(),
            nop_timeout: 60,
            nop_in_interval: 30,
            discovery_auth: ChapPolicy::default(),
            max_sessions: 128,
            max_connections_per_session: 1,
            max_queue_depth: 64,
            default_time2wait: 2,
            default_time2retain: 20,
            first_burst_length: 8192,
            immediate_data: true,
            allow_duplicated_isid: false,
            error_recovery_level: 0,
            max_r2t_per_connection: 4,
        }
    }
}

impl IscsiOpts {
    pub fn validate(&self) -> Result<(), IscsiError> {
        if self.node_base.is_empty() || self.node_base.len() > 223 {
            return invalid("node_base must be 1..=223 characters");
        }
        if self.nop_timeout > 3600 {
            return invalid("nop_timeout must be at most 3600 s");
        }
        if self.nop_in_interval == 0 || self.nop_in_interval > 60 {
            return invalid("nop_in_interval must be 1..=60 s");
        }
        self.discovery_auth.validate()?;
        if self.max_sessions == 0 || self.max_sessions > 65_535 {
            return invalid("max_sessions must be 1..=65535");
        }
        if self.max_connections_per_session != 1 {
            return invalid("max_connections_per_session: nvraid serves one connection per session (MaxConnections=1)");
        }
        if self.max_queue_depth == 0 || self.max_queue_depth as usize > crate::scsi::QUEUE_DEPTH {
            return invalid(format!("max_queue_depth must be 1..={}", crate::scsi::QUEUE_DEPTH));
        }
        if self.default_time2wait > 3600 || self.default_time2retain > 3600 {
            return invalid("default_time2wait and default_time2retain must be at most 3600");
        }
        if !(512..=(1 << 24) - 1).contains(&self.first_burst_length) {
            return invalid("first_burst_length must be 512..=16777215");
        }
        if self.error_recovery_level != 0 {
            return invalid("error_recovery_level: nvraid implements ErrorRecoveryLevel 0 only");
        }
        if self.allow_duplicated_isid {
            return invalid("allow_duplicated_isid: nvraid reinstates a session whose ISID is reused");
        }
        if self.max_r2t_per_connection == 0 || self.max_r2t_per_connection > 256 {
            return invalid("max_r2t_per_connection must be 1..=256");
        }
        Ok(())
    }

    pub fn to_json(&self) -> Value {
        json!({
            "node_base": self.node_base,
            "max_sessions": self.max_sessions,
            "max_connections_per_session": self.max_connections_per_session,
            "max_queue_depth": self.max_queue_depth,
            "default_time2wait": self.default_time2wait,
            "default_time2retain": self.default_time2retain,
            "first_burst_length": self.first_burst_length,
            "immediate_data": self.immediate_data,
            "allow_duplicated_isid": self.allow_duplicated_isid,
            "error_recovery_level": self.error_recovery_level,
            "nop_timeout": self.nop_timeout,
            "nop_in_interval": self.nop_in_interval,
            "disable_chap": self.discovery_auth.disable_chap,
            "require_chap": self.discovery_auth.require_chap,
            "mutual_chap": self.discovery_auth.mutual_chap,
            "chap_group": self.discovery_auth.chap_group,
            "max_r2t_per_connection": self.max_r2t_per_connection,
        })
    }
}

/// One listening address of a portal group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Portal {
    pub host: String,
    pub port: String,
}

impl Portal {
    pub(super) fn socket_addr(&self) -> Result<SocketAddr, IscsiError> {
        let port: u16 =
            self.port.parse().map_err(|_| IscsiError::Invalid(format!("port '{}' is not a port number", self.port)))?;
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        (host, port)
            .to_socket_addrs()
            .map_err(|e| IscsiError::Invalid(format!("host '{}': {e}", self.host)))?
            .next()
            .ok_or_else(|| IscsiError::Invalid(format!("host '{}' resolves to nothing", self.host)))
    }
}

pub(super) struct PortalGroup {
    pub(super) tag: i32,
    pub(super) portals: Vec<Portal>,
    pub(super) private: bool,
    /// Bound addresses, one per portal, and the flag that stops their pollers.
    pub(super) bound: Vec<SocketAddr>,
    pub(super) stop: Arc<AtomicBool>,
}

impl PortalGroup {
    pub(super) fn to_json(&self) -> Value {
        json!({"tag": self.tag,
               "portals": self.portals.iter().map(|p| json!({"host": p.host, "port": p.port})).collect::<Vec<_>>(),
               "private": self.private})
    }
}

/// An initiator group: names (`ANY`, a name, or `!name` to deny) and
/// netmasks (`ANY`, an address, or an address/prefix).
#[derive(Debug, Clone)]
pub struct InitiatorGroup {
    pub tag: i32,
    pub initiators: Vec<String>,
    pub netmasks: Vec<String>,
}

impl InitiatorGroup {
    pub(super) fn to_json(&self) -> Value {
        json!({"tag": self.tag, "initiators": self.initiators, "netmasks": self.netmasks})
    }

    /// Whether the group lets `name` in from `addr`: a `!name` entry denies;
    /// otherwise a matching name and a matching netmask are both needed.
    pub fn allows(&self, name: &str, addr: IpAddr) -> bool {
        let mut name_ok = false;
        for i in &self.initiators {
            if let Some(denied) = i.strip_prefix('!') {
                if denied.eq_ignore_ascii_case("ANY") || denied.eq_ignore_ascii_case(name) {
                    return false;
                }
            } else if i.eq_ignore_ascii_case("ANY") || i.eq_ignore_ascii_case(name) {
                name_ok = true;
            }
        }
        name_ok && self.netmasks.iter().any(|m| netmask_matches(m, addr))
    }
}

pub(super) fn parse_netmask(m: &str) -> Option<(IpAddr, u8)> {
    let (a, len) = match m.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u8>().ok()?)),
        None => (m, None),
    };
    let a: IpAddr = a.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
    let max = if a.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    (len <= max).then_some((a, len))
}

/// Whether `addr` lies within netmask `m` (an IPv4-mapped IPv6 peer
/// matches IPv4 masks).
pub fn netmask_matches(m: &str, addr: IpAddr) -> bool {
    if m.eq_ignore_ascii_case("ANY") {
        return true;
    }
    let Some((net, len)) = parse_netmask(m) else {
        return false;
    };
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        a => a,
    };
    match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// One CHAP secret of an auth group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapSecret {
    pub user: String,
    pub secret: String,
    pub muser: Option<String>,
    pub msecret: Option<String>,
}

impl ChapSecret {
    pub(super) fn to_json(&self) -> Value {
        let mut v = json!({"user": self.user, "secret": self.secret});
        if let (Some(mu), Some(ms), Some(o)) = (&self.muser, &self.msecret, v.as_object_mut()) {
            o.insert("muser".into(), json!(mu));
            o.insert("msecret".into(), json!(ms));
        }
        v
    }
}

#[derive(Debug, Clone)]
pub(super) struct AuthGroup {
    pub(super) tag: i32,
    pub(super) secrets: Vec<ChapSecret>,
}

impl AuthGroup {
    pub(super) fn to_json(&self) -> Value {
        json!({"tag": self.tag, "secrets": self.secrets.iter().map(ChapSecret::to_json).collect::<Vec<_>>()})
    }
}

/// Parameters of `iscsi_create_target_node`.
#[derive(Debug, Clone, Default)]
pub struct NodeParams {
    pub name: String,
    pub alias_name: Option<String>,
    /// (portal group tag, initiator group tag)
    pub pg_ig_maps: Vec<(i32, i32)>,
    /// (bdev name, LUN id)
    pub luns: Vec<(String, i32)>,
    pub queue_depth: u32,
    pub auth: ChapPolicy,
    pub header_digest: bool,
    pub data_digest: bool,
}

/// A target node: what an initiator logs in to.
pub struct TargetNode {
    pub name: String,
    pub alias: Option<String>,
    pub queue_depth: u32,
    pub header_digest: bool,
    pub data_digest: bool,
    pub(crate) inner: Mutex<NodeInner>,
    /// Bumped when the LUN list changes; connections refresh their view.
    pub(crate) generation: AtomicU64,
    pub(crate) deleted: AtomicBool,
}

pub(crate) struct NodeInner {
    pub(crate) maps: Vec<(i32, i32)>,
    pub(crate) luns: Vec<Arc<Lun>>,
    pub(crate) auth: ChapPolicy,
}

impl TargetNode {
    pub(crate) fn lock(&self) -> MutexGuard<'_, NodeInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn luns(&self) -> Vec<Arc<Lun>> {
        self.lock().luns.clone()
    }

    pub(crate) fn auth(&self) -> ChapPolicy {
        self.lock().auth
    }

    pub(super) fn to_json(&self) -> Value {
        let i = self.lock();
        let mut v = json!({
            "name": self.name,
            "pg_ig_maps": i.maps.iter().map(|(p, g)| json!({"pg_tag": p, "ig_tag": g})).collect::<Vec<_>>(),
            "luns": i.luns.iter().map(|l| json!({"bdev_name": l.bdev().name(), "lun_id": l.id()})).collect::<Vec<_>>(),
            "queue_depth": self.queue_depth,
            "disable_chap": i.auth.disable_chap,
            "require_chap": i.auth.require_chap,
            "mutual_chap": i.auth.mutual_chap,
            "chap_group": i.auth.chap_group,
            "header_digest": self.header_digest,
            "data_digest": self.data_digest,
        });
        if let (Some(a), Some(o)) = (&self.alias, v.as_object_mut()) {
            o.insert("alias_name".into(), json!(a));
        }
        v
    }
}

/// What the control plane knows of one connection (`iscsi_get_connections`),
/// and the flag that ends it.
pub struct ConnInfo {
    pub id: u32,
    pub reactor: usize,
    pub pg_tag: i32,
    pub initiator_addr: String,
    pub target_addr: String,
    pub(crate) cid: AtomicU16,
    pub(crate) tsih: AtomicU16,
    /// Login phase: 0 security, 1 operational, 2 full feature.
    pub(crate) phase: AtomicU32,
    /// Logged out, or closing.
    pub(crate) exiting: AtomicBool,
    pub(crate) target_node: Mutex<Option<Arc<TargetNode>>>,
    pub(crate) initiator_name: Mutex<String>,
    pub(crate) kill: AtomicBool,
}

impl ConnInfo {
    pub(super) fn to_json(&self) -> Value {
        let node = self.target_node.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|n| n.name.clone());
        let phase = match self.phase.load(Ordering::Acquire) {
            0 => "security_negotiation_phase",
            1 => "operational_negotiation_phase",
            _ => "full_feature_phase",
        };
        // SPDK names the node by what follows the first ':' of its name.
        let short = node.as_deref().map(|n| n.split_once(':').map_or(n, |(_, s)| s).to_string());
        json!({
            "id": self.id,
            "cid": self.cid.load(Ordering::Relaxed),
            "tsih": self.tsih.load(Ordering::Relaxed),
            "state": if self.exiting.load(Ordering::Acquire) { "exiting" } else { "running" },
            "login_phase": phase,
            "initiator_addr": self.initiator_addr,
            "target_addr": self.target_addr,
            "target_node_name": short.unwrap_or_default(),
            "thread_name": format!("reactor_{}", self.reactor),
        })
    }

    pub(crate) fn end(&self) {
        self.kill.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks_match_addresses_and_prefixes() {
        let a: IpAddr = "192.168.1.77".parse().unwrap();
        assert!(netmask_matches("ANY", a));
        assert!(netmask_matches("192.168.1.0/24", a));
        assert!(netmask_matches("192.168.1.77", a));
        assert!(!netmask_matches("192.168.2.0/24", a));
        assert!(!netmask_matches("10.0.0.1", a));
        assert!(netmask_matches("0.0.0.0/0", a));
        let mapped: IpAddr = "::ffff:192.168.1.77".parse().unwrap();
        assert!(netmask_matches("192.168.1.0/24", mapped));
        let v6: IpAddr = "fe80::1".parse().unwrap();
        assert!(netmask_matches("[fe80::]/64", v6));
        assert!(!netmask_matches("[fe81::]/64", v6));
        assert!(!netmask_matches("garbage", a));
    }

    #[test]
    fn initiator_groups_deny_before_they_allow() {
        let g = InitiatorGroup {
            tag: 1,
            initiators: vec!["ANY".into(), "!iqn.bad".into()],
            netmasks: vec!["127.0.0.1/32".into()],
        };
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(g.allows("iqn.good", lo));
        assert!(!g.allows("iqn.bad", lo));
        assert!(!g.allows("iqn.good", "10.1.1.1".parse().unwrap()));
        let named = InitiatorGroup { tag: 2, initiators: vec!["iqn.one".into()], netmasks: vec!["ANY".into()] };
        assert!(named.allows("IQN.ONE", lo));
        assert!(!named.allows("iqn.two", lo));
    }

    #[test]
    fn chap_policies_follow_spdks_rules() {
        let p = |d, r, m| ChapPolicy { disable_chap: d, require_chap: r, mutual_chap: m, chap_group: 0 };
        assert!(p(true, true, false).validate().is_err());
        assert!(p(false, false, true).validate().is_err());
        assert!(p(false, true, true).validate().is_ok());
        assert!(p(true, false, false).validate().is_ok());
    }
}
