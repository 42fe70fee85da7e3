//! The iSCSI target's control plane: global options, portal groups (and
//! their listening sockets), initiator groups, target nodes with their
//! LUNs, CHAP auth groups, and the table of sessions and connections.
//!
//! The whole table is per reactor set (`reactor::global::<IscsiState>()`),
//! behind a mutex only the control plane (RPCs, logins) takes. A connection
//! in full feature phase holds `Arc` snapshots (its target node, its LUNs)
//! and notices changes through atomics (the node's LUN generation, its
//! `deleted` flag, the connection's `kill` flag), so the IO path never locks.

pub(crate) mod conn;
mod login;
mod objects;
mod task;

pub(crate) use login::target_offer;
pub use objects::{
    netmask_matches, ChapPolicy, ChapSecret, ConnInfo, InitiatorGroup, IscsiOpts, NodeParams, Portal, TargetNode,
    MAX_BURST_LENGTH, MAX_RECV_DATA_SEGMENT_LENGTH,
};
use objects::{parse_netmask, AuthGroup, NodeInner, PortalGroup};

use crate::scsi::Lun;
use bdev::Registry;
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Errors of the control plane.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IscsiError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Io(String),
}

impl IscsiError {
    pub fn errno(&self) -> i32 {
        match self {
            IscsiError::Invalid(_) => libc::EINVAL,
            IscsiError::NotFound(_) => libc::ENODEV,
            IscsiError::Exists(_) => libc::EEXIST,
            IscsiError::Busy(_) => libc::EBUSY,
            IscsiError::Io(_) => libc::EIO,
        }
    }
}

pub(super) fn invalid<T>(m: impl Into<String>) -> Result<T, IscsiError> {
    Err(IscsiError::Invalid(m.into()))
}

/// A logged-in session: the key that reinstatement matches on.
struct SessionEntry {
    tsih: u16,
    initiator_name: String,
    isid: [u8; 6],
    target: String,
    conn: Arc<ConnInfo>,
}

#[derive(Default)]
struct Inner {
    opts: IscsiOpts,
    /// Options may be set once, before the first portal group.
    opts_frozen: bool,
    portal_groups: Vec<PortalGroup>,
    initiator_groups: Vec<InitiatorGroup>,
    nodes: Vec<Arc<TargetNode>>,
    auth_groups: Vec<AuthGroup>,
    sessions: Vec<SessionEntry>,
    conns: Vec<Arc<ConnInfo>>,
    next_tsih: u16,
}

/// The iSCSI target of one reactor set: `reactor::global::<IscsiState>()`.
#[derive(Default)]
pub struct IscsiState {
    inner: Mutex<Inner>,
    next_reactor: AtomicUsize,
    next_conn_id: AtomicU32,
    /// Live connections (for shutdown's drain).
    pub(crate) connections: AtomicUsize,
    pub(crate) shutting_down: AtomicBool,
    /// States the IO path believes impossible, each asserted in debug
    /// builds, logged, and answered with an error where a command waited.
    pub(crate) impossible_events: AtomicU64,
}

impl IscsiState {
    pub fn get() -> Arc<IscsiState> {
        reactor::global::<IscsiState>()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn impossible(&self, what: &str) {
        self.impossible_events.fetch_add(1, Ordering::Relaxed);
        tracing::error!("iSCSI target: impossible state: {what}");
        debug_assert!(false, "iSCSI target: impossible state: {what}");
    }

    pub fn impossible_event_count(&self) -> u64 {
        self.impossible_events.load(Ordering::Relaxed)
    }

    pub fn options(&self) -> IscsiOpts {
        self.lock().opts.clone()
    }

    /// `iscsi_set_options`: once, before the first portal group (SPDK
    /// allows it only at start-up).
    pub fn set_options(&self, o: IscsiOpts) -> Result<(), IscsiError> {
        o.validate()?;
        let mut s = self.lock();
        if s.opts_frozen {
            return Err(IscsiError::Busy(
                "iscsi_set_options must come once, before the first portal group is created".into(),
            ));
        }
        s.opts = o;
        s.opts_frozen = true;
        Ok(())
    }

    /// `iscsi_set_discovery_auth`.
    pub fn set_discovery_auth(&self, p: ChapPolicy) -> Result<(), IscsiError> {
        p.validate()?;
        let mut s = self.lock();
        if p.chap_group != 0 && !s.auth_groups.iter().any(|g| g.tag == p.chap_group) {
            return Err(IscsiError::NotFound(format!("auth group {}", p.chap_group)));
        }
        s.opts.discovery_auth = p;
        Ok(())
    }

    /// `iscsi_create_portal_group`: binds every portal and starts
    /// accepting on the calling reactor. Must run on a reactor.
    pub fn create_portal_group(&self, tag: i32, portals: Vec<Portal>, private: bool) -> Result<(), IscsiError> {
        if tag <= 0 {
            return invalid("portal group tag must be a positive integer");
        }
        if portals.is_empty() {
            return invalid("a portal group needs at least one portal");
        }
        let mut s = self.lock();
        if s.portal_groups.iter().any(|g| g.tag == tag) {
            return Err(IscsiError::Exists(format!("portal group {tag}")));
        }
        let mut listeners = Vec::new();
        for p in &portals {
            let sa = p.socket_addr()?;
            if s.portal_groups.iter().flat_map(|g| g.portals.iter()).any(|q| q == p) {
                return Err(IscsiError::Exists(format!("portal {}:{}", p.host, p.port)));
            }
            let l = TcpListener::bind(sa).map_err(|e| IscsiError::Io(format!("listen on {sa}: {e}")))?;
            l.set_nonblocking(true).map_err(|e| IscsiError::Io(e.to_string()))?;
            let local = l.local_addr().map_err(|e| IscsiError::Io(e.to_string()))?;
            listeners.push((l, local));
        }
        s.opts_frozen = true;
        let stop = Arc::new(AtomicBool::new(false));
        let bound = listeners.iter().map(|(_, a)| *a).collect();
        for (l, local) in listeners {
            start_accepting(l, local, tag, stop.clone());
            tracing::info!(%local, tag, "iSCSI portal listening");
        }
        s.portal_groups.push(PortalGroup { tag, portals, private, bound, stop });
        Ok(())
    }

    /// `iscsi_delete_portal_group`: its listeners close and the
    /// connections that came in through it end.
    pub fn delete_portal_group(&self, tag: i32) -> Result<(), IscsiError> {
        let mut s = self.lock();
        let pos = s
            .portal_groups
            .iter()
            .position(|g| g.tag == tag)
            .ok_or_else(|| IscsiError::NotFound(format!("portal group {tag}")))?;
        let g = s.portal_groups.remove(pos);
        g.stop.store(true, Ordering::Release);
        for c in s.conns.iter().filter(|c| c.pg_tag == tag) {
            c.end();
        }
        Ok(())
    }

    /// The bound addresses of a portal group (tests bind port 0 and ask).
    pub fn portal_addrs(&self, tag: i32) -> Vec<SocketAddr> {
        self.lock().portal_groups.iter().find(|g| g.tag == tag).map(|g| g.bound.clone()).unwrap_or_default()
    }

    /// `iscsiadm` discovery lines for every public portal (printed when ready).
    pub fn discovery_lines(&self) -> Vec<String> {
        let s = self.lock();
        s.portal_groups
            .iter()
            .filter(|g| !g.private)
            .flat_map(|g| g.bound.iter().map(|a| format!("iscsiadm -m discovery -t sendtargets -p {a}")))
            .collect()
    }

    pub fn portal_groups_json(&self) -> Value {
        Value::Array(self.lock().portal_groups.iter().map(PortalGroup::to_json).collect())
    }

    /// `iscsi_create_initiator_group`.
    pub fn create_initiator_group(&self, g: InitiatorGroup) -> Result<(), IscsiError> {
        if g.tag <= 0 {
            return invalid("initiator group tag must be a positive integer");
        }
        if g.initiators.is_empty() || g.netmasks.is_empty() {
            return invalid("an initiator group needs at least one initiator and one netmask");
        }
        for i in &g.initiators {
            if i.is_empty() || i.len() > 223 {
                return invalid(format!("initiator name '{i}' must be 1..=223 characters"));
            }
        }
        for m in &g.netmasks {
            if !m.eq_ignore_ascii_case("ANY") && parse_netmask(m).is_none() {
                return invalid(format!("netmask '{m}' is not ANY, an address or an address/prefix"));
            }
        }
        let mut s = self.lock();
        if s.initiator_groups.iter().any(|x| x.tag == g.tag) {
            return Err(IscsiError::Exists(format!("initiator group {}", g.tag)));
        }
        s.initiator_groups.push(g);
        Ok(())
    }

    /// `iscsi_delete_initiator_group`: refused while a target node maps it.
    pub fn delete_initiator_group(&self, tag: i32) -> Result<(), IscsiError> {
        let mut s = self.lock();
        let pos = s
            .initiator_groups
            .iter()
            .position(|g| g.tag == tag)
            .ok_or_else(|| IscsiError::NotFound(format!("initiator group {tag}")))?;
        if let Some(n) = s.nodes.iter().find(|n| n.lock().maps.iter().any(|(_, ig)| *ig == tag)) {
            return Err(IscsiError::Busy(format!("initiator group {tag} is mapped by target node {}", n.name)));
        }
        s.initiator_groups.remove(pos);
        Ok(())
    }

    pub fn initiator_groups_json(&self) -> Value {
        Value::Array(self.lock().initiator_groups.iter().map(InitiatorGroup::to_json).collect())
    }

    /// The full IQN of a node name (SPDK prefixes names without a type
    /// prefix with `node_base:`).
    fn full_name(&self, s: &Inner, name: &str) -> String {
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("iqn.") || lower.starts_with("eui.") || lower.starts_with("naa.") {
            name.to_string()
        } else {
            format!("{}:{}", s.opts.node_base, name)
        }
    }

    /// `iscsi_create_target_node`.
    pub fn create_target_node(&self, p: NodeParams) -> Result<(), IscsiError> {
        p.auth.validate()?;
        if p.name.is_empty() || p.name.len() > 223 || p.name.bytes().any(|b| b.is_ascii_whitespace() || b == 0) {
            return invalid(format!("target name '{}' must be 1..=223 characters without spaces", p.name));
        }
        if p.queue_depth == 0 || p.queue_depth as usize > crate::scsi::QUEUE_DEPTH {
            return invalid(format!("queue_depth must be 1..={}", crate::scsi::QUEUE_DEPTH));
        }
        if p.luns.is_empty() {
            return invalid("a target node needs at least one LUN");
        }
        let mut s = self.lock();
        let name = self.full_name(&s, &p.name);
        if s.nodes.iter().any(|n| n.name.eq_ignore_ascii_case(&name)) {
            return Err(IscsiError::Exists(format!("target node {name}")));
        }
        for (pg, ig) in &p.pg_ig_maps {
            Self::check_map(&s, *pg, *ig)?;
        }
        if p.auth.chap_group != 0 && !s.auth_groups.iter().any(|g| g.tag == p.auth.chap_group) {
            return Err(IscsiError::NotFound(format!("auth group {}", p.auth.chap_group)));
        }
        let mut luns: Vec<Arc<Lun>> = Vec::new();
        for (bdev_name, id) in &p.luns {
            let id = if *id < 0 { (0..).find(|i| !luns.iter().any(|l| l.id() == *i)).unwrap_or(0) } else { *id as u64 };
            if id > 16383 {
                return invalid(format!("LUN id {id} must be at most 16383"));
            }
            if luns.iter().any(|l| l.id() == id) {
                return Err(IscsiError::Exists(format!("LUN {id}")));
            }
            let b =
                Registry::get().lookup(bdev_name).ok_or_else(|| IscsiError::NotFound(format!("bdev {bdev_name}")))?;
            luns.push(Lun::new(id, b, &name));
        }
        let mut maps = Vec::new();
        for m in p.pg_ig_maps {
            if !maps.contains(&m) {
                maps.push(m);
            }
        }
        let node = Arc::new(TargetNode {
            name,
            alias: p.alias_name.filter(|a| !a.is_empty()),
            queue_depth: p.queue_depth,
            header_digest: p.header_digest,
            data_digest: p.data_digest,
            inner: Mutex::new(NodeInner { maps, luns, auth: p.auth }),
            generation: AtomicU64::new(1),
            deleted: AtomicBool::new(false),
        });
        for l in node.luns() {
            watch_removal(&node, &l);
        }
        s.nodes.push(node);
        Ok(())
    }

    fn check_map(s: &Inner, pg: i32, ig: i32) -> Result<(), IscsiError> {
        if !s.portal_groups.iter().any(|g| g.tag == pg) {
            return Err(IscsiError::NotFound(format!("portal group {pg}")));
        }
        if !s.initiator_groups.iter().any(|g| g.tag == ig) {
            return Err(IscsiError::NotFound(format!("initiator group {ig}")));
        }
        Ok(())
    }

    pub fn target_node(&self, name: &str) -> Option<Arc<TargetNode>> {
        let s = self.lock();
        let full = self.full_name(&s, name);
        s.nodes.iter().find(|n| n.name.eq_ignore_ascii_case(&full)).cloned()
    }

    fn node_or_err(&self, name: &str) -> Result<Arc<TargetNode>, IscsiError> {
        self.target_node(name).ok_or_else(|| IscsiError::NotFound(format!("target node {name}")))
    }

    /// `iscsi_delete_target_node`: its connections end (in-flight commands
    /// complete first).
    pub fn delete_target_node(&self, name: &str) -> Result<(), IscsiError> {
        let node = self.node_or_err(name)?;
        node.deleted.store(true, Ordering::Release);
        let mut s = self.lock();
        s.nodes.retain(|n| !Arc::ptr_eq(n, &node));
        for c in &s.conns {
            let mine =
                c.target_node.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|n| Arc::ptr_eq(n, &node));
            if mine {
                c.end();
            }
        }
        Ok(())
    }

    /// `iscsi_target_node_add_lun`: `lun_id` < 0 picks the lowest free.
    pub fn add_lun(&self, name: &str, bdev_name: &str, lun_id: i32) -> Result<u64, IscsiError> {
        let node = self.node_or_err(name)?;
        let b = Registry::get().lookup(bdev_name).ok_or_else(|| IscsiError::NotFound(format!("bdev {bdev_name}")))?;
        let mut i = node.lock();
        let id =
            if lun_id < 0 { (0..).find(|x| !i.luns.iter().any(|l| l.id() == *x)).unwrap_or(0) } else { lun_id as u64 };
        if id > 16383 {
            return invalid(format!("LUN id {id} must be at most 16383"));
        }
        if i.luns.iter().any(|l| l.id() == id) {
            return Err(IscsiError::Exists(format!("LUN {id} of {name}")));
        }
        let lun = Lun::new(id, b, &node.name);
        i.luns.push(lun.clone());
        drop(i);
        watch_removal(&node, &lun);
        node.generation.fetch_add(1, Ordering::AcqRel);
        Ok(id)
    }

    /// `iscsi_target_node_add_pg_ig_maps`: every map is checked first; a
    /// map the node has already is an error (SPDK's rule).
    pub fn add_maps(&self, name: &str, maps: &[(i32, i32)]) -> Result<(), IscsiError> {
        let node = self.node_or_err(name)?;
        let s = self.lock();
        let mut i = node.lock();
        for (n, m) in maps.iter().enumerate() {
            Self::check_map(&s, m.0, m.1)?;
            if i.maps.contains(m) || maps[..n].contains(m) {
                return Err(IscsiError::Exists(format!("map {}:{} of {name}", m.0, m.1)));
            }
        }
        i.maps.extend_from_slice(maps);
        Ok(())
    }

    /// `iscsi_target_node_remove_pg_ig_maps`: established sessions stay;
    /// new logins follow the new maps.
    pub fn remove_maps(&self, name: &str, maps: &[(i32, i32)]) -> Result<(), IscsiError> {
        let node = self.node_or_err(name)?;
        let mut i = node.lock();
        if let Some(m) = maps.iter().find(|m| !i.maps.contains(m)) {
            return Err(IscsiError::NotFound(format!("map {}:{} of {name}", m.0, m.1)));
        }
        i.maps.retain(|m| !maps.contains(m));
        Ok(())
    }

    /// `iscsi_initiator_group_add_initiators` (`add`) and
    /// `iscsi_initiator_group_remove_initiators`.
    pub fn edit_initiator_group(
        &self,
        tag: i32,
        add: bool,
        initiators: &[String],
        netmasks: &[String],
    ) -> Result<(), IscsiError> {
        let mut s = self.lock();
        let g = s
            .initiator_groups
            .iter_mut()
            .find(|g| g.tag == tag)
            .ok_or_else(|| IscsiError::NotFound(format!("initiator group {tag}")))?;
        let mut next = g.clone();
        for (list, items) in [(&mut next.initiators, initiators), (&mut next.netmasks, netmasks)] {
            for x in items {
                let pos = list.iter().position(|y| y.eq_ignore_ascii_case(x));
                match (add, pos) {
                    (true, None) => list.push(x.clone()),
                    (true, Some(_)) => return Err(IscsiError::Exists(format!("{x} in initiator group {tag}"))),
                    (false, Some(p)) => {
                        list.remove(p);
                    }
                    (false, None) => return Err(IscsiError::NotFound(format!("{x} in initiator group {tag}"))),
                }
            }
        }
        for m in &next.netmasks {
            if !m.eq_ignore_ascii_case("ANY") && parse_netmask(m).is_none() {
                return invalid(format!("netmask '{m}' is not ANY, an address or an address/prefix"));
            }
        }
        *g = next;
        Ok(())
    }

    /// `iscsi_target_node_set_auth`.
    pub fn set_node_auth(&self, name: &str, p: ChapPolicy) -> Result<(), IscsiError> {
        p.validate()?;
        let node = self.node_or_err(name)?;
        if p.chap_group != 0 && !self.lock().auth_groups.iter().any(|g| g.tag == p.chap_group) {
            return Err(IscsiError::NotFound(format!("auth group {}", p.chap_group)));
        }
        node.lock().auth = p;
        Ok(())
    }

    pub fn target_nodes_json(&self) -> Value {
        Value::Array(self.lock().nodes.iter().map(|n| n.to_json()).collect())
    }

    /// `iscsi_create_auth_group`.
    pub fn create_auth_group(&self, tag: i32, secrets: Vec<ChapSecret>) -> Result<(), IscsiError> {
        if tag <= 0 {
            return invalid("auth group tag must be a positive integer");
        }
        let mut g = AuthGroup { tag, secrets: Vec::new() };
        for sec in secrets {
            Self::add_secret_to(&mut g, sec)?;
        }
        let mut s = self.lock();
        if s.auth_groups.iter().any(|x| x.tag == tag) {
            return Err(IscsiError::Exists(format!("auth group {tag}")));
        }
        s.auth_groups.push(g);
        Ok(())
    }

    fn add_secret_to(g: &mut AuthGroup, sec: ChapSecret) -> Result<(), IscsiError> {
        if sec.user.is_empty() || sec.secret.is_empty() || sec.user.len() > 255 || sec.secret.len() > 255 {
            return invalid("user and secret must be 1..=255 characters");
        }
        if sec.muser.is_some() != sec.msecret.is_some() {
            return invalid("muser and msecret go together");
        }
        if g.secrets.iter().any(|s| s.user == sec.user) {
            return Err(IscsiError::Exists(format!("user {} in auth group {}", sec.user, g.tag)));
        }
        g.secrets.push(sec);
        Ok(())
    }

    /// `iscsi_auth_group_add_secret`.
    pub fn auth_group_add_secret(&self, tag: i32, sec: ChapSecret) -> Result<(), IscsiError> {
        let mut s = self.lock();
        let g = s
            .auth_groups
            .iter_mut()
            .find(|g| g.tag == tag)
            .ok_or_else(|| IscsiError::NotFound(format!("auth group {tag}")))?;
        Self::add_secret_to(g, sec)
    }

    /// `iscsi_auth_group_remove_secret`.
    pub fn auth_group_remove_secret(&self, tag: i32, user: &str) -> Result<(), IscsiError> {
        let mut s = self.lock();
        let g = s
            .auth_groups
            .iter_mut()
            .find(|g| g.tag == tag)
            .ok_or_else(|| IscsiError::NotFound(format!("auth group {tag}")))?;
        let before = g.secrets.len();
        g.secrets.retain(|x| x.user != user);
        if g.secrets.len() == before {
            return Err(IscsiError::NotFound(format!("user {user} in auth group {tag}")));
        }
        Ok(())
    }

    /// `iscsi_delete_auth_group`.
    pub fn delete_auth_group(&self, tag: i32) -> Result<(), IscsiError> {
        let mut s = self.lock();
        let before = s.auth_groups.len();
        s.auth_groups.retain(|g| g.tag != tag);
        if s.auth_groups.len() == before {
            return Err(IscsiError::NotFound(format!("auth group {tag}")));
        }
        Ok(())
    }

    pub fn auth_groups_json(&self) -> Value {
        Value::Array(self.lock().auth_groups.iter().map(AuthGroup::to_json).collect())
    }

    /// The secret for `user` in auth group `tag`.
    pub(crate) fn find_secret(&self, tag: i32, user: &str) -> Option<ChapSecret> {
        self.lock().auth_groups.iter().find(|g| g.tag == tag)?.secrets.iter().find(|s| s.user == user).cloned()
    }

    /// The first secret of auth group `tag` with a mutual user (the
    /// target's own name and secret for mutual CHAP).
    pub(crate) fn mutual_secret(&self, tag: i32, user: &str) -> Option<(String, String)> {
        let s = self.find_secret(tag, user)?;
        Some((s.muser?, s.msecret?))
    }

    pub fn connections_json(&self) -> Value {
        Value::Array(self.lock().conns.iter().map(|c| c.to_json()).collect())
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    pub(crate) fn register_conn(&self, c: Arc<ConnInfo>) {
        self.lock().conns.push(c);
    }

    pub(crate) fn unregister_conn(&self, c: &Arc<ConnInfo>) {
        let mut s = self.lock();
        s.conns.retain(|x| !Arc::ptr_eq(x, c));
        s.sessions.retain(|x| !Arc::ptr_eq(&x.conn, c));
    }

    pub(crate) fn new_conn_id(&self) -> u32 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether `initiator` from `addr`, arriving through portal group
    /// `pg_tag`, may log in to `node`: Ok, or the login status detail
    /// (not found through this portal / not authorized).
    pub(crate) fn access(&self, node: &TargetNode, pg_tag: i32, initiator: &str, addr: IpAddr) -> Result<(), u8> {
        let s = self.lock();
        let maps: Vec<(i32, i32)> = node.lock().maps.iter().copied().filter(|(pg, _)| *pg == pg_tag).collect();
        if maps.is_empty() {
            return Err(login::detail::NOT_FOUND);
        }
        let ok =
            maps.iter().any(|(_, ig)| s.initiator_groups.iter().any(|g| g.tag == *ig && g.allows(initiator, addr)));
        if ok {
            Ok(())
        } else {
            Err(login::detail::AUTHORIZATION_FAILURE)
        }
    }

    /// SendTargets: every node `initiator` may reach, with the public
    /// portals its portal groups have (`All`), or only the named one.
    pub(crate) fn send_targets(&self, initiator: &str, addr: IpAddr, only: Option<&str>, out: &mut Vec<u8>) {
        let s = self.lock();
        for n in &s.nodes {
            if only.is_some_and(|o| !o.eq_ignore_ascii_case(&n.name)) {
                continue;
            }
            let maps = n.lock().maps.clone();
            let allowed =
                maps.iter().any(|(_, ig)| s.initiator_groups.iter().any(|g| g.tag == *ig && g.allows(initiator, addr)));
            if !allowed {
                continue;
            }
            crate::text::push(out, "TargetName", &n.name);
            let mut seen: Vec<i32> = Vec::new();
            for (pg_tag, _) in &maps {
                if seen.contains(pg_tag) {
                    continue;
                }
                seen.push(*pg_tag);
                let Some(pg) = s.portal_groups.iter().find(|g| g.tag == *pg_tag) else {
                    continue;
                };
                if pg.private {
                    continue;
                }
                for (p, b) in pg.portals.iter().zip(&pg.bound) {
                    let host = if p.host.contains(':') && !p.host.starts_with('[') {
                        format!("[{}]", p.host)
                    } else {
                        p.host.clone()
                    };
                    crate::text::push(out, "TargetAddress", &format!("{host}:{},{}", b.port(), pg.tag));
                }
            }
        }
    }

    /// Registers a new session; returns its TSIH. An existing session of
    /// the same initiator port (name and ISID) to the same target is
    /// reinstated: its connection ends.
    pub(crate) fn add_session(
        &self,
        initiator: &str,
        isid: [u8; 6],
        target: &str,
        conn: &Arc<ConnInfo>,
    ) -> Result<u16, u8> {
        let mut s = self.lock();
        let mut reinstated = 0;
        for old in s.sessions.iter().filter(|x| x.initiator_name == initiator && x.isid == isid && x.target == target) {
            tracing::info!(initiator, tsih = old.tsih, "iSCSI session reinstated: the old one ends");
            old.conn.end();
            reinstated += 1;
        }
        s.sessions.retain(|x| !(x.initiator_name == initiator && x.isid == isid && x.target == target));
        if s.sessions.len() >= s.opts.max_sessions as usize && reinstated == 0 {
            return Err(login::detail::OUT_OF_RESOURCES);
        }
        let mut tsih = s.next_tsih;
        loop {
            tsih = tsih.wrapping_add(1);
            if tsih != 0 && !s.sessions.iter().any(|x| x.tsih == tsih) {
                break;
            }
        }
        s.next_tsih = tsih;
        s.sessions.push(SessionEntry {
            tsih,
            initiator_name: initiator.to_string(),
            isid,
            target: target.to_string(),
            conn: conn.clone(),
        });
        Ok(tsih)
    }

    /// TARGET COLD RESET: every connection of every session to `node` ends
    /// (each after flushing what it has queued).
    pub(crate) fn end_connections_to(&self, node: &Arc<TargetNode>) {
        let s = self.lock();
        for c in &s.conns {
            let to_node =
                c.target_node.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|n| Arc::ptr_eq(n, node));
            if to_node {
                c.end();
            }
        }
    }

    /// Whether a session with this TSIH exists.
    pub(crate) fn session_exists(&self, tsih: u16) -> bool {
        self.lock().sessions.iter().any(|x| x.tsih == tsih)
    }

    /// The calls that recreate the target (for `save_config`).
    pub fn config(&self) -> Vec<Value> {
        let s = self.lock();
        let mut out = vec![json!({"method": "iscsi_set_options", "params": s.opts.to_json()})];
        for g in &s.portal_groups {
            out.push(json!({"method": "iscsi_create_portal_group", "params": g.to_json()}));
        }
        for g in &s.initiator_groups {
            out.push(json!({"method": "iscsi_create_initiator_group", "params": g.to_json()}));
        }
        for g in &s.auth_groups {
            out.push(json!({"method": "iscsi_create_auth_group", "params": g.to_json()}));
        }
        for n in &s.nodes {
            out.push(json!({"method": "iscsi_create_target_node", "params": n.to_json()}));
        }
        out
    }
}

/// Hot remove: when a LUN's bdev goes away, the LUN leaves its node (new
/// commands to it find no LUN; `save_config` no longer names the bdev).
fn watch_removal(node: &Arc<TargetNode>, lun: &Arc<Lun>) {
    let weak = Arc::downgrade(node);
    let id = lun.id();
    let handle = lun.bdev().clone();
    lun.bdev().on_remove(move || {
        if let Some(node) = weak.upgrade() {
            node.lock().luns.retain(|l| !(l.id() == id && l.bdev().same(&handle)));
            node.generation.fetch_add(1, Ordering::AcqRel);
            tracing::info!(target = node.name, lun = id, "iSCSI LUN's bdev is going away: LUN removed");
        }
    });
}

/// Accepts on the current reactor (a timed poller) and hands each
/// connection to the next reactor round-robin.
fn start_accepting(l: TcpListener, local: SocketAddr, pg_tag: i32, stop: Arc<AtomicBool>) {
    let state = IscsiState::get();
    let tickets = state.clone();
    let closed = move || {
        let closed = stop.load(Ordering::Acquire) || state.shutting_down.load(Ordering::Acquire);
        if closed {
            tracing::info!(%local, "iSCSI portal closed");
        }
        closed
    };
    sock::accept_round_robin(
        "iscsi_accept",
        l,
        move || tickets.next_reactor.fetch_add(1, Ordering::Relaxed),
        closed,
        move |stream, peer, to| {
            tracing::debug!(%peer, reactor = to, "iSCSI connection accepted");
            move || conn::start(stream, peer, local, pg_tag)
        },
    );
}

/// Stops the target before the bdevs go: portals close, every connection
/// is asked to log out (Async Message) and ends, and `done` runs once every
/// connection has drained its in-flight commands and closed, or after 10 s.
pub fn shutdown(done: impl FnOnce() + Send + 'static) {
    let state = IscsiState::get();
    state.shutting_down.store(true, Ordering::Release);
    {
        let s = state.lock();
        for g in &s.portal_groups {
            g.stop.store(true, Ordering::Release);
        }
    }
    sock::when_drained("iscsi_shutdown_wait", Duration::from_secs(10), move || state.connection_count(), done);
}
