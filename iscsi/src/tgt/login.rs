//! The login phase of a connection (RFC 7143 6): security negotiation with
//! CHAP (one-way and mutual), operational parameter negotiation, the
//! checks that decide whether this initiator may reach this target through
//! this portal, session creation and reinstatement, and the Login Response
//! with its status class and detail.

use super::conn::{Conn, Session};
use super::{ChapPolicy, IscsiOpts, TargetNode, MAX_BURST_LENGTH, MAX_RECV_DATA_SEGMENT_LENGTH};
use crate::chap;
use crate::pdu::{off, op, Bhs};
use crate::scsi::Nexus;
use crate::text::{self, KeyOutcome, SessionParams, TargetOffer};
use std::sync::Arc;

/// Login status classes and details (RFC 7143 11.13.5).
pub(crate) mod detail {
    pub const INITIATOR_ERROR: u8 = 0x00;
    pub const AUTHENTICATION_FAILURE: u8 = 0x01;
    pub const AUTHORIZATION_FAILURE: u8 = 0x02;
    pub const NOT_FOUND: u8 = 0x03;
    pub const UNSUPPORTED_VERSION: u8 = 0x05;
    pub const TOO_MANY_CONNECTIONS: u8 = 0x06;
    pub const MISSING_PARAMETER: u8 = 0x07;
    pub const SESSION_TYPE_NOT_SUPPORTED: u8 = 0x09;
    pub const SESSION_DOES_NOT_EXIST: u8 = 0x0a;
    /// Target error class.
    pub const TARGET_ERROR: u8 = 0x00;
    pub const OUT_OF_RESOURCES: u8 = 0x02;
}

const CLASS_INITIATOR: u8 = 0x02;
const CLASS_TARGET: u8 = 0x03;

const STAGE_SECURITY: u8 = 0;
const STAGE_OPERATIONAL: u8 = 1;
const STAGE_FULL_FEATURE: u8 = 3;

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum Auth {
    /// No AuthMethod chosen yet.
    #[default]
    Unset,
    /// AuthMethod=None agreed: nothing to prove.
    NoneChosen,
    /// CHAP chosen: waiting for CHAP_A.
    ChapWaitA,
    /// Challenge sent: waiting for CHAP_N and CHAP_R.
    ChapWaitResponse { id: u8, challenge: [u8; chap::CHALLENGE_LEN] },
    /// The initiator proved itself (and the target, if asked).
    Done,
}

/// State of a connection still logging in.
#[derive(Default)]
pub(crate) struct LoginState {
    /// Set once the first Login Request was seen.
    started: bool,
    stage: u8,
    itt: u32,
    isid: [u8; 6],
    tsih: u16,
    cid: u16,
    cmd_sn: u32,
    initiator_name: Option<String>,
    discovery: bool,
    node: Option<Arc<TargetNode>>,
    auth: Auth,
    params: Option<SessionParams>,
    /// Text of a request spread over several PDUs (C bit).
    partial: Vec<u8>,
    /// The target's MaxRecvDataSegmentLength was declared.
    declared: bool,
    /// Keys answered so far (a key negotiated twice is an error).
    answered: Vec<String>,
}

/// A failed login: status class and detail.
struct Fail(u8, u8);

fn initiator(d: u8) -> Fail {
    Fail(CLASS_INITIATOR, d)
}

/// What the target offers in a login under options `o`, for a target node
/// that requires the digests named.
pub(crate) fn target_offer(o: &IscsiOpts, require_header_digest: bool, require_data_digest: bool) -> TargetOffer {
    TargetOffer {
        max_recv_data_segment_length: MAX_RECV_DATA_SEGMENT_LENGTH,
        max_burst_length: MAX_BURST_LENGTH,
        first_burst_length: o.first_burst_length,
        initial_r2t: false,
        immediate_data: o.immediate_data,
        max_outstanding_r2t: o.max_r2t_per_connection,
        default_time2wait: o.default_time2wait,
        default_time2retain: o.default_time2retain,
        max_connections: o.max_connections_per_session,
        require_header_digest,
        require_data_digest,
    }
}

impl Conn {
    pub(super) fn login_pdu(&mut self, bhs: &Bhs, data: &[u8]) {
        if bhs.opcode() != op::LOGIN_REQ {
            // Only Login Requests are valid before full feature phase.
            tracing::info!(peer = %self.peer, opcode = bhs.opcode(), "iSCSI: non-login PDU during login");
            self.begin_close("non-login PDU during login");
            return;
        }
        let mut ls = self.login.take().unwrap_or_default();
        match self.login_step(&mut ls, bhs, data) {
            Ok(Some(sess)) => {
                let window = sess.node.as_ref().map_or(self.tasks.len() as u32, |n| n.queue_depth);
                self.enter_full_feature(sess, window.min(self.state.options().max_queue_depth.max(1)));
            }
            Ok(None) => self.login = Some(ls),
            Err(Fail(class, d)) => {
                tracing::info!(peer = %self.peer, class, detail = d, "iSCSI login failed");
                self.send_login_response(&ls, bhs, false, class, d, &[], 0);
                self.login = Some(ls);
                self.close_after_flush = true;
            }
        }
    }

    /// One Login Request: Ok(Some) when the login completes.
    fn login_step(&mut self, ls: &mut LoginState, bhs: &Bhs, data: &[u8]) -> Result<Option<Session>, Fail> {
        let flags = bhs.flags();
        let transit = flags & 0x80 != 0;
        let cont = flags & 0x40 != 0;
        let csg = (flags >> 2) & 3;
        let nsg = flags & 3;
        if transit && cont {
            return Err(initiator(detail::INITIATOR_ERROR));
        }
        if bhs.byte(3) > 0 {
            // VersionMin above 0: only version 0 exists.
            return Err(initiator(detail::UNSUPPORTED_VERSION));
        }
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&bhs.0[8..14]);
        let tsih = bhs.u16_at(14);
        if !ls.started {
            ls.started = true;
            ls.stage = csg;
            self.info.phase.store(u32::from(csg.min(STAGE_OPERATIONAL)), std::sync::atomic::Ordering::Release);
            ls.itt = bhs.itt();
            ls.isid = isid;
            ls.tsih = tsih;
            ls.cid = bhs.u16_at(off::W20);
            ls.cmd_sn = bhs.u32_at(off::W24);
            self.stat_sn = bhs.u32_at(off::W28);
            self.exp_stat_sn = self.stat_sn;
            self.exp_cmd_sn = ls.cmd_sn;
        } else if isid != ls.isid || tsih != ls.tsih || bhs.itt() != ls.itt {
            return Err(initiator(detail::INITIATOR_ERROR));
        }
        if csg == 2 || csg != ls.stage || (transit && (nsg == 2 || nsg <= csg)) {
            return Err(initiator(detail::INITIATOR_ERROR));
        }
        ls.partial.extend_from_slice(data);
        if ls.partial.len() > 64 * 1024 {
            return Err(initiator(detail::INITIATOR_ERROR));
        }
        if cont {
            // More text follows: acknowledge with an empty response.
            self.send_login_response(ls, bhs, false, 0, 0, &[], 0);
            return Ok(None);
        }
        let text = std::mem::take(&mut ls.partial);
        let pairs = text::parse(&text).map_err(|e| {
            tracing::info!(peer = %self.peer, "iSCSI login text: {e}");
            initiator(detail::INITIATOR_ERROR)
        })?;
        let first = ls.params.is_none();
        let mut out = Vec::new();
        if first {
            self.leading_keys(ls, &pairs, &mut out)?;
        }
        let params = ls.params.get_or_insert_with(SessionParams::rfc_defaults);
        let mut params = params.clone();
        let offer = self.offer(ls);
        let mut auth_keys = Vec::new();
        for (k, v) in &pairs {
            match k.as_str() {
                // Declarative keys of the leading request (read there).
                "InitiatorName" | "SessionType" | "TargetName" | "InitiatorAlias" => continue,
                _ => {}
            }
            if k == "AuthMethod" || k.starts_with("CHAP_") {
                if ls.stage != STAGE_SECURITY {
                    return Err(initiator(detail::INITIATOR_ERROR));
                }
                auth_keys.push((k.clone(), v.clone()));
                continue;
            }
            // Operational keys may come early, in the security stage (an
            // initiator that goes straight to full feature sends them there).
            if ls.answered.iter().any(|a| a == k) && k != "MaxRecvDataSegmentLength" {
                return Err(initiator(detail::INITIATOR_ERROR));
            }
            ls.answered.push(k.clone());
            match text::negotiate(k, v, &offer, ls.discovery, &mut params) {
                KeyOutcome::Answer(a) => text::push(&mut out, k, &a),
                KeyOutcome::Silent => {}
                KeyOutcome::Irrelevant => text::push(&mut out, k, "Irrelevant"),
                KeyOutcome::NotUnderstood => text::push(&mut out, k, "NotUnderstood"),
                KeyOutcome::Reject => text::push(&mut out, k, "Reject"),
                KeyOutcome::Violation(why) => {
                    tracing::info!(peer = %self.peer, "iSCSI login: {why}");
                    return Err(initiator(detail::INITIATOR_ERROR));
                }
            }
        }
        ls.params = Some(params);
        if ls.stage == STAGE_SECURITY {
            self.security(ls, &auth_keys, &mut out)?;
        }
        if !ls.declared && (ls.stage == STAGE_OPERATIONAL || (transit && nsg == STAGE_FULL_FEATURE)) {
            ls.declared = true;
            text::push(&mut out, "MaxRecvDataSegmentLength", &offer.max_recv_data_segment_length.to_string());
        }
        // May the stage change? Security ends only once authentication has.
        let mut go = transit;
        if ls.stage == STAGE_SECURITY && transit {
            match ls.auth {
                Auth::NoneChosen | Auth::Done => {}
                Auth::Unset => {
                    // Skipping AuthMethod is fine only where CHAP is not required.
                    if self.policy(ls).require_chap {
                        return Err(initiator(detail::AUTHENTICATION_FAILURE));
                    }
                    ls.auth = Auth::NoneChosen;
                }
                _ => go = false,
            }
        }
        if ls.stage == STAGE_OPERATIONAL && self.policy(ls).require_chap && ls.auth != Auth::Done {
            return Err(initiator(detail::AUTHENTICATION_FAILURE));
        }
        let next = if go { nsg } else { ls.stage };
        if go && next == STAGE_FULL_FEATURE {
            let p = ls.params.clone().unwrap_or_else(SessionParams::rfc_defaults);
            if let Some(n) = &ls.node {
                if (n.header_digest && !p.header_digest) || (n.data_digest && !p.data_digest) {
                    return Err(initiator(detail::MISSING_PARAMETER));
                }
            }
            let sess = self.make_session(ls)?;
            self.params = p;
            self.send_login_response(ls, bhs, true, 0, 0, &out, sess.tsih);
            tracing::info!(peer = %self.peer, initiator = sess.initiator_name, discovery = sess.discovery,
                           tsih = sess.tsih, "iSCSI login complete");
            return Ok(Some(sess));
        }
        self.send_login_response(ls, bhs, go, 0, 0, &out, 0);
        if go {
            ls.stage = next;
            self.info.phase.store(u32::from(next.min(STAGE_OPERATIONAL)), std::sync::atomic::Ordering::Release);
        }
        Ok(None)
    }

    /// Keys of the first request: who the initiator is, what it wants.
    fn leading_keys(&mut self, ls: &mut LoginState, pairs: &text::Pairs, out: &mut Vec<u8>) -> Result<(), Fail> {
        let get = |k: &str| pairs.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
        let name = get("InitiatorName").ok_or(initiator(detail::MISSING_PARAMETER))?;
        if name.is_empty() || name.len() > 223 {
            return Err(initiator(detail::INITIATOR_ERROR));
        }
        ls.initiator_name = Some(name.to_string());
        ls.discovery = match get("SessionType").unwrap_or("Normal") {
            "Normal" => false,
            "Discovery" => true,
            _ => return Err(initiator(detail::SESSION_TYPE_NOT_SUPPORTED)),
        };
        if ls.tsih != 0 {
            // Adding a connection to a session: MaxConnections is 1.
            return Err(if self.state.session_exists(ls.tsih) {
                initiator(detail::TOO_MANY_CONNECTIONS)
            } else {
                initiator(detail::SESSION_DOES_NOT_EXIST)
            });
        }
        if !ls.discovery {
            let target = get("TargetName").ok_or(initiator(detail::MISSING_PARAMETER))?;
            let node = self.state.target_node(target).ok_or(initiator(detail::NOT_FOUND))?;
            self.state.access(&node, self.pg_tag, name, self.peer.ip()).map_err(initiator)?;
            text::push(out, "TargetPortalGroupTag", &self.pg_tag.to_string());
            if let Some(a) = &node.alias {
                text::push(out, "TargetAlias", a);
            }
            ls.node = Some(node);
        }
        *self.info.initiator_name.lock().unwrap_or_else(|e| e.into_inner()) = name.to_string();
        Ok(())
    }

    /// The CHAP policy that applies: the target node's, or the discovery one.
    fn policy(&self, ls: &LoginState) -> ChapPolicy {
        match &ls.node {
            Some(n) => n.auth(),
            None => self.state.options().discovery_auth,
        }
    }

    fn offer(&self, ls: &LoginState) -> TargetOffer {
        target_offer(
            &self.state.options(),
            ls.node.as_ref().is_some_and(|n| n.header_digest),
            ls.node.as_ref().is_some_and(|n| n.data_digest),
        )
    }

    /// The security stage: AuthMethod, then CHAP.
    fn security(&mut self, ls: &mut LoginState, keys: &[(String, String)], out: &mut Vec<u8>) -> Result<(), Fail> {
        let policy = self.policy(ls);
        let get = |k: &str| keys.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
        if let Some(methods) = get("AuthMethod") {
            if ls.auth != Auth::Unset {
                return Err(initiator(detail::INITIATOR_ERROR));
            }
            let acceptable = |m: &str| match m {
                "None" => !policy.require_chap,
                "CHAP" => !policy.disable_chap && policy.chap_group != 0,
                _ => false,
            };
            match methods.split(',').find(|m| acceptable(m)) {
                Some("CHAP") => {
                    ls.auth = Auth::ChapWaitA;
                    text::push(out, "AuthMethod", "CHAP");
                }
                Some(_) => {
                    ls.auth = Auth::NoneChosen;
                    text::push(out, "AuthMethod", "None");
                }
                None => {
                    tracing::info!(peer = %self.peer, methods, "iSCSI login: no acceptable AuthMethod");
                    return Err(initiator(detail::AUTHENTICATION_FAILURE));
                }
            }
        }
        match ls.auth {
            Auth::ChapWaitA => {
                let Some(algs) = get("CHAP_A") else {
                    return Ok(());
                };
                if !algs.split(',').any(|a| a == chap::ALGORITHM_MD5) {
                    return Err(initiator(detail::AUTHENTICATION_FAILURE));
                }
                let (id, challenge) = chap::new_challenge().map_err(|e| {
                    tracing::error!("CHAP challenge: {e}");
                    Fail(CLASS_TARGET, detail::TARGET_ERROR)
                })?;
                text::push(out, "CHAP_A", chap::ALGORITHM_MD5);
                text::push(out, "CHAP_I", &id.to_string());
                text::push(out, "CHAP_C", &chap::encode_hex(&challenge));
                ls.auth = Auth::ChapWaitResponse { id, challenge };
            }
            Auth::ChapWaitResponse { id, challenge } => {
                let (Some(user), Some(resp)) = (get("CHAP_N"), get("CHAP_R")) else {
                    return Err(initiator(detail::AUTHENTICATION_FAILURE));
                };
                let fail = || initiator(detail::AUTHENTICATION_FAILURE);
                let secret = self.state.find_secret(policy.chap_group, user).ok_or_else(fail)?;
                let got = chap::decode_binary(resp).ok_or_else(fail)?;
                if got[..] != chap::response(id, secret.secret.as_bytes(), &challenge)[..] {
                    tracing::info!(peer = %self.peer, user, "iSCSI login: CHAP response does not match");
                    return Err(fail());
                }
                match (get("CHAP_I"), get("CHAP_C")) {
                    (Some(i), Some(c)) => {
                        // Mutual CHAP: the target proves itself.
                        let i: u8 = i.parse().map_err(|_| fail())?;
                        let c = chap::decode_binary(c).ok_or_else(fail)?;
                        if c[..] == challenge[..] {
                            return Err(fail());
                        }
                        let (muser, msecret) = self.state.mutual_secret(policy.chap_group, user).ok_or_else(fail)?;
                        text::push(out, "CHAP_N", &muser);
                        text::push(out, "CHAP_R", &chap::encode_hex(&chap::response(i, msecret.as_bytes(), &c)));
                    }
                    (None, None) if !policy.mutual_chap => {}
                    _ => return Err(fail()),
                }
                ls.auth = Auth::Done;
            }
            _ => {
                if keys.iter().any(|(k, _)| k.starts_with("CHAP_")) {
                    return Err(initiator(detail::INITIATOR_ERROR));
                }
            }
        }
        Ok(())
    }

    fn make_session(&mut self, ls: &LoginState) -> Result<Session, Fail> {
        let name = ls.initiator_name.clone().unwrap_or_default();
        let target = ls.node.as_ref().map_or("", |n| n.name.as_str()).to_string();
        let tsih = self.state.add_session(&name, ls.isid, &target, &self.info).map_err(|d| Fail(CLASS_TARGET, d))?;
        let isid: String = ls.isid.iter().map(|b| format!("{b:02x}")).collect();
        let nexus = Nexus {
            initiator_port: format!("{name},i,0x{isid}").into(),
            target_port: format!("{target},t,0x{:04x}", self.pg_tag as u16).into(),
            relative_target_port: self.pg_tag as u16,
        };
        Ok(Session { tsih, discovery: ls.discovery, node: ls.node.clone(), initiator_name: name, nexus, cid: ls.cid })
    }

    #[allow(clippy::too_many_arguments)]
    fn send_login_response(
        &mut self,
        ls: &LoginState,
        req: &Bhs,
        transit: bool,
        class: u8,
        d: u8,
        text: &[u8],
        tsih: u16,
    ) {
        let mut r = Bhs::new(op::LOGIN_RESP);
        let csg = ls.stage & 3;
        let nsg = if transit { req.flags() & 3 } else { 0 };
        r.set_flags(if transit { 0x80 } else { 0 } | (csg << 2) | nsg);
        r.set_byte(2, 0); // VersionMax
        r.set_byte(3, 0); // VersionActive
        r.0[8..14].copy_from_slice(&req.0[8..14]);
        r.set_u16(14, tsih);
        r.set_u32(off::ITT, req.itt());
        r.set_u32(off::W24, self.stat_sn);
        self.stat_sn = self.stat_sn.wrapping_add(1);
        r.set_u32(off::W28, self.exp_cmd_sn);
        let window = ls.node.as_ref().map_or(1, |n| n.queue_depth.max(1));
        r.set_u32(off::W32, self.exp_cmd_sn.wrapping_add(window - 1));
        r.set_byte(36, class);
        r.set_byte(37, d);
        let text = if class == 0 { text } else { &[] };
        self.send_pdu(r, text);
    }
}
