//! DH-HMAC-CHAP, the in-band authentication of NVMe Base 2.0 §8.13, on the
//! target side of one queue pair; and the per-host keys it uses
//! (`nvmf_subsystem_add_host` `dhchap_key` / `dhchap_ctrlr_key`,
//! `nvmf_subsystem_set_keys`).
//!
//! A queue whose host has a key answers Connect with AUTHREQ.ATR and then
//! takes only Authentication Send/Receive until the host has proven it
//! holds the key: AUTH_Negotiate (send) → DH-HMAC-CHAP_Challenge (receive)
//! → DH-HMAC-CHAP_Reply (send) → DH-HMAC-CHAP_Success1 (receive), and, when
//! the host asked to authenticate the controller too, → Success2 or
//! Failure2 (send). A check that fails in a send is remembered and answered
//! by the next receive with AUTH_Failure1, after which the connection ends.
//!
//! Crypto comes from RustCrypto (`sha2`, `hmac`) and `num-bigint` (modular
//! exponentiation); random values from the OS (`getrandom`).

mod ffdhe;

use super::{NvmfError, NvmfState, Subsystem};
use crate::keyring::Key;
use hmac::{Hmac, KeyInit, Mac};
use num_bigint::BigUint;
use nvme_spec::Sqe;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256, Sha384, Sha512};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Arc};

/// Security protocol of NVMe authentication (SECP), and its SPSP0/SPSP1.
pub const SECP_NVME: u8 = 0xE9;
pub const SPSP: u8 = 0x01;
/// Connect response AUTHREQ (DW0 bits 31:16) bit 1: authentication
/// transaction required.
pub(crate) const AUTHREQ_ATR: u16 = 1 << 1;

/// Message types and identifiers (byte 0 and 1 of every message).
pub mod msg {
    pub const TYPE_COMMON: u8 = 0x00;
    pub const TYPE_DHCHAP: u8 = 0x01;
    pub const NEGOTIATE: u8 = 0x00;
    pub const CHALLENGE: u8 = 0x01;
    pub const REPLY: u8 = 0x02;
    pub const SUCCESS1: u8 = 0x03;
    pub const SUCCESS2: u8 = 0x04;
    pub const FAILURE2: u8 = 0xF0;
    pub const FAILURE1: u8 = 0xF1;
    /// AUTH_Negotiate protocol descriptor AUTHID of DH-HMAC-CHAP.
    pub const AUTHID_DHCHAP: u8 = 0x01;
    /// Size of a protocol descriptor in AUTH_Negotiate.
    pub const DESCRIPTOR_LEN: usize = 64;
    /// Header sizes: Negotiate 8 (+ descriptors), Challenge/Reply/Success
    /// 16, Failure 8.
    pub const NEGOTIATE_HEADER_LEN: usize = 8;
    pub const HEADER_LEN: usize = 16;
    pub const FAILURE_LEN: usize = 8;
}

/// AUTH_Failure reason code (authentication failure) and explanations.
pub mod reason {
    pub const CODE_FAILURE: u8 = 0x01;
    pub const FAILED: u8 = 0x01;
    pub const PROTOCOL_UNUSABLE: u8 = 0x02;
    pub const SCC_MISMATCH: u8 = 0x03;
    pub const HASH_UNUSABLE: u8 = 0x04;
    pub const DHGROUP_UNUSABLE: u8 = 0x05;
    pub const INCORRECT_PAYLOAD: u8 = 0x06;
    pub const INCORRECT_PROTOCOL_MESSAGE: u8 = 0x07;
}

/// Private exponent size for the FFDHE groups: twice the 200-bit strength
/// of the largest group (RFC 7919 §5.2 asks at least twice the strength),
/// so a reactor spends milliseconds, not a second, on ffdhe8192.
const DH_PRIVATE_BYTES: usize = 64;

/// The hash functions of DH-HMAC-CHAP (identifier = position + 1).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Digest {
    Sha256,
    Sha384,
    Sha512,
}

impl Digest {
    /// Strongest first: the order the controller picks in.
    pub const BY_STRENGTH: [Digest; 3] = [Digest::Sha512, Digest::Sha384, Digest::Sha256];

    pub fn id(self) -> u8 {
        match self {
            Digest::Sha256 => 1,
            Digest::Sha384 => 2,
            Digest::Sha512 => 3,
        }
    }

    pub fn from_id(id: u8) -> Option<Self> {
        Self::BY_STRENGTH.into_iter().find(|d| d.id() == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            Digest::Sha256 => "sha256",
            Digest::Sha384 => "sha384",
            Digest::Sha512 => "sha512",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::BY_STRENGTH.into_iter().find(|d| d.name() == name)
    }

    /// Output length in bytes (the messages' HL).
    pub fn output_len(self) -> usize {
        match self {
            Digest::Sha256 => 32,
            Digest::Sha384 => 48,
            Digest::Sha512 => 64,
        }
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            Digest::Sha256 => Sha256::digest(data).to_vec(),
            Digest::Sha384 => Sha384::digest(data).to_vec(),
            Digest::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        fn run<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
            // HMAC takes keys of any length.
            let Ok(mut m) = <M as KeyInit>::new_from_slice(key) else { unreachable!("HMAC accepts any key length") };
            for p in parts {
                m.update(p);
            }
            m.finalize().into_bytes().to_vec()
        }
        match self {
            Digest::Sha256 => run::<Hmac<Sha256>>(key, parts),
            Digest::Sha384 => run::<Hmac<Sha384>>(key, parts),
            Digest::Sha512 => run::<Hmac<Sha512>>(key, parts),
        }
    }
}

/// The Diffie-Hellman groups of DH-HMAC-CHAP (identifier = position).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DhGroup {
    Null,
    Ffdhe2048,
    Ffdhe3072,
    Ffdhe4096,
    Ffdhe6144,
    Ffdhe8192,
}

impl DhGroup {
    /// Strongest first: the order the controller picks in.
    pub const BY_STRENGTH: [DhGroup; 6] = [
        DhGroup::Ffdhe8192,
        DhGroup::Ffdhe6144,
        DhGroup::Ffdhe4096,
        DhGroup::Ffdhe3072,
        DhGroup::Ffdhe2048,
        DhGroup::Null,
    ];

    pub fn id(self) -> u8 {
        self as u8
    }

    pub fn from_id(id: u8) -> Option<Self> {
        Self::BY_STRENGTH.into_iter().find(|g| g.id() == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            DhGroup::Null => "null",
            DhGroup::Ffdhe2048 => "ffdhe2048",
            DhGroup::Ffdhe3072 => "ffdhe3072",
            DhGroup::Ffdhe4096 => "ffdhe4096",
            DhGroup::Ffdhe6144 => "ffdhe6144",
            DhGroup::Ffdhe8192 => "ffdhe8192",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::BY_STRENGTH.into_iter().find(|g| g.name() == name)
    }

    fn prime(self) -> Option<BigUint> {
        let hex = match self {
            DhGroup::Null => return None,
            DhGroup::Ffdhe2048 => ffdhe::FFDHE2048,
            DhGroup::Ffdhe3072 => ffdhe::FFDHE3072,
            DhGroup::Ffdhe4096 => ffdhe::FFDHE4096,
            DhGroup::Ffdhe6144 => ffdhe::FFDHE6144,
            DhGroup::Ffdhe8192 => ffdhe::FFDHE8192,
        };
        BigUint::parse_bytes(hex.as_bytes(), 16)
    }
}

/// A DH-HMAC-CHAP secret in its interchange form
/// `DHHC-1:<hh>:<base64 of key || CRC-32 of key, little-endian>:`, where
/// `hh` names the hash the key is transformed with (00: none).
pub struct Secret {
    transform: Option<Digest>,
    key: Vec<u8>,
}

impl Secret {
    pub fn parse(text: &str) -> Result<Secret, String> {
        use base64::Engine as _;
        let rest = text.trim().strip_prefix("DHHC-1:").ok_or("not a DHHC-1 secret")?;
        let (hh, rest) = rest.split_once(':').ok_or("no key after the hash identifier")?;
        let transform = match hh {
            "00" => None,
            _ => Some(
                u8::from_str_radix(hh, 16)
                    .ok()
                    .filter(|_| hh.len() == 2)
                    .and_then(Digest::from_id)
                    .ok_or_else(|| format!("unknown key transform hash {hh}"))?,
            ),
        };
        let b64 = rest.strip_suffix(':').ok_or("the secret does not end with ':'")?;
        let raw = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("base64: {e}"))?;
        if ![36, 52, 68].contains(&raw.len()) {
            return Err(format!("key of {} bytes (32, 48 or 64 and a CRC-32)", raw.len().saturating_sub(4)));
        }
        let (key, crc) = raw.split_at(raw.len() - 4);
        if crc32fast::hash(key).to_le_bytes() != crc {
            return Err("key CRC-32 mismatch".into());
        }
        Ok(Secret { transform, key: key.to_vec() })
    }

    /// The key the responses are computed with:
    /// HMAC(hash, key, NQN || "NVMe-over-Fabrics"), or the key itself.
    fn transformed(&self, nqn: &str) -> Vec<u8> {
        match self.transform {
            None => self.key.clone(),
            Some(d) => d.hmac(&self.key, &[nqn.as_bytes(), b"NVMe-over-Fabrics"]),
        }
    }
}

/// The response value of §8.13.5.4: HMAC over the (DH-augmented)
/// challenge, sequence number, transaction id, SC_C, a label and the NQNs.
#[allow(clippy::too_many_arguments)]
fn response(
    digest: Digest,
    secret: &Secret,
    challenge: &[u8],
    dh_secret: Option<&[u8]>,
    seqnum: u32,
    tid: u16,
    label: &[u8],
    nqn1: &str,
    nqn2: &str,
) -> Vec<u8> {
    let augmented;
    let challenge = match dh_secret {
        Some(s) => {
            augmented = digest.hmac(&digest.hash(s), &[challenge]);
            &augmented[..]
        }
        None => challenge,
    };
    let key = secret.transformed(nqn1);
    digest.hmac(
        &key,
        &[challenge, &seqnum.to_le_bytes(), &tid.to_le_bytes(), &[0], label, nqn1.as_bytes(), &[0], nqn2.as_bytes()],
    )
}

/// Equal contents, in time independent of where they differ.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_bytes(n: usize) -> Option<Vec<u8>> {
    let mut v = vec![0u8; n];
    getrandom::fill(&mut v).ok()?;
    Some(v)
}

/// The controller's ephemeral Diffie-Hellman key of one transaction.
struct DhKey {
    p: BigUint,
    private: BigUint,
    /// g^x mod p, big-endian, padded to the prime's length.
    public: Vec<u8>,
}

fn padded(v: &BigUint, len: usize) -> Vec<u8> {
    let b = v.to_bytes_be();
    let mut out = vec![0u8; len.saturating_sub(b.len())];
    out.extend_from_slice(&b);
    out
}

impl DhKey {
    fn generate(group: DhGroup) -> Option<DhKey> {
        debug_assert!(reactor::current().is_none(), "DH-HMAC-CHAP: DH key generation on a reactor");
        let p = group.prime()?;
        let private = BigUint::from_bytes_be(&random_bytes(DH_PRIVATE_BYTES)?);
        if private < BigUint::from(2u8) {
            return None;
        }
        let len = p.bits().div_ceil(8) as usize;
        let public = padded(&BigUint::from(2u8).modpow(&private, &p), len);
        Some(DhKey { p, private, public })
    }

    /// g^xy mod p from the host's public value, padded to the prime's
    /// length; None for a value outside 2..p-2 (which would give away or
    /// fix the shared secret).
    fn shared(&self, peer: &[u8]) -> Option<Vec<u8>> {
        debug_assert!(reactor::current().is_none(), "DH-HMAC-CHAP: DH shared secret on a reactor");
        if peer.len() != self.public.len() {
            return None;
        }
        let y = BigUint::from_bytes_be(peer);
        let one = BigUint::from(1u8);
        if y <= one || y >= &self.p - &one {
            return None;
        }
        Some(padded(&y.modpow(&self.private, &self.p), self.public.len()))
    }
}

/// The hash functions and DH groups the target accepts
/// (`nvmf_set_config` `dhchap_digests` / `dhchap_dhgroups`): all of them
/// unless set. `reactor::global::<DhchapPolicy>()`.
#[derive(Default)]
pub struct DhchapPolicy {
    /// Bit per identifier of what is refused, so the default allows all.
    refused_digests: AtomicU8,
    refused_dhgroups: AtomicU8,
}

impl DhchapPolicy {
    pub fn get() -> Arc<DhchapPolicy> {
        reactor::global::<DhchapPolicy>()
    }

    /// Allows exactly these (neither list may be empty).
    pub fn set(&self, digests: &[Digest], dhgroups: &[DhGroup]) -> Result<(), NvmfError> {
        if digests.is_empty() || dhgroups.is_empty() {
            return Err(NvmfError::Invalid("dhchap_digests and dhchap_dhgroups must not be empty".into()));
        }
        let refused = |ids: &mut dyn Iterator<Item = u8>| !ids.fold(0u8, |m, id| m | (1 << id));
        self.refused_digests.store(refused(&mut digests.iter().map(|d| d.id())), Ordering::Release);
        self.refused_dhgroups.store(refused(&mut dhgroups.iter().map(|g| g.id())), Ordering::Release);
        Ok(())
    }

    /// Allowed, weakest first (SPDK's listing order).
    pub fn digests(&self) -> Vec<Digest> {
        let r = self.refused_digests.load(Ordering::Acquire);
        Digest::BY_STRENGTH.into_iter().rev().filter(|d| r & (1 << d.id()) == 0).collect()
    }

    pub fn dhgroups(&self) -> Vec<DhGroup> {
        let r = self.refused_dhgroups.load(Ordering::Acquire);
        DhGroup::BY_STRENGTH.into_iter().rev().filter(|g| r & (1 << g.id()) == 0).collect()
    }

    /// Whether everything is allowed (nothing to save).
    pub fn is_default(&self) -> bool {
        self.refused_digests.load(Ordering::Acquire) & 0b1110 == 0
            && self.refused_dhgroups.load(Ordering::Acquire) & 0b11_1111 == 0
    }
}

/// A host's keys in a subsystem.
#[derive(Clone)]
pub(crate) struct HostKeys {
    pub(crate) host: String,
    pub(crate) key: Arc<Key>,
    pub(crate) ctrlr_key: Option<Arc<Key>>,
}

impl Subsystem {
    /// The DH-HMAC-CHAP keys of `hostnqn`, when it must authenticate.
    pub(crate) fn dhchap_keys(&self, hostnqn: &str) -> Option<HostKeys> {
        self.lock().host_keys.iter().find(|k| k.host == hostnqn).cloned()
    }
}

impl NvmfState {
    /// `nvmf_subsystem_add_host` with `dhchap_key` (and `dhchap_ctrlr_key`
    /// for bidirectional authentication).
    pub fn add_host_with_keys(
        &self,
        nqn: &str,
        host: &str,
        key: Option<Arc<Key>>,
        ctrlr_key: Option<Arc<Key>>,
    ) -> Result<(), NvmfError> {
        if key.is_none() && ctrlr_key.is_some() {
            return Err(NvmfError::Invalid("dhchap_ctrlr_key needs a dhchap_key".into()));
        }
        let Some(key) = key else { return self.add_host(nqn, host) };
        let sub = self.subsystem(nqn).ok_or_else(|| NvmfError::NotFound(format!("subsystem {nqn}")))?;
        // Keys first: no moment where the host is allowed without them.
        sub.lock().host_keys.push(HostKeys { host: host.to_string(), key, ctrlr_key });
        self.add_host(nqn, host).inspect_err(|_| {
            let mut i = sub.lock();
            if let Some(pos) = i.host_keys.iter().rposition(|k| k.host == host) {
                i.host_keys.remove(pos);
            }
        })
    }

    /// `nvmf_subsystem_set_keys`: new keys for a host (none: the host no
    /// longer authenticates). Queues authenticate with the keys of the
    /// moment their Reply arrives; admitted queues stay admitted.
    pub fn set_host_keys(
        &self,
        nqn: &str,
        host: &str,
        key: Option<Arc<Key>>,
        ctrlr_key: Option<Arc<Key>>,
    ) -> Result<(), NvmfError> {
        if key.is_none() && ctrlr_key.is_some() {
            return Err(NvmfError::Invalid("dhchap_ctrlr_key needs a dhchap_key".into()));
        }
        let sub = self.subsystem(nqn).ok_or_else(|| NvmfError::NotFound(format!("subsystem {nqn}")))?;
        let mut i = sub.lock();
        if !i.hosts.iter().any(|h| h == host) {
            return Err(NvmfError::NotFound(format!("host {host} in {nqn}")));
        }
        i.host_keys.retain(|k| k.host != host);
        if let Some(key) = key {
            i.host_keys.push(HostKeys { host: host.to_string(), key, ctrlr_key });
        }
        Ok(())
    }
}

/// The key parameters `save_config` writes for a host.
pub(crate) fn host_key_params(keys: Option<&HostKeys>) -> Value {
    match keys {
        None => json!({}),
        Some(k) => match &k.ctrlr_key {
            None => json!({"dhchap_key": k.key.name}),
            Some(c) => json!({"dhchap_key": k.key.name, "dhchap_ctrlr_key": c.name}),
        },
    }
}

/// SECP, SPSP0, SPSP1 and the transfer/allocation length of an
/// Authentication Send/Receive command (CDW10 bytes 1..3, CDW11).
pub(crate) fn command_fields(sqe: &Sqe) -> (u8, u8, u8, u32) {
    let b = sqe.cdw10.get().to_le_bytes();
    (b[3], b[1], b[2], sqe.cdw11.get())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Waiting for AUTH_Negotiate.
    Negotiate,
    /// Negotiated: the next receive gets the challenge.
    Challenge,
    /// Challenge sent: waiting for the host's reply.
    Reply,
    /// Reply received: the shared secret is being computed off the
    /// reactor; the next receive waits for it, then answers.
    Verifying,
    /// Reply checked: the next receive gets Success1.
    Success1,
    /// Success1 carried the controller's response: waiting for the host's
    /// Success2 (or Failure2).
    Success2,
    /// A check failed: the next receive gets AUTH_Failure1 with this
    /// explanation.
    Failure1(u8),
    /// Authenticated (a later Negotiate starts a re-authentication).
    Done,
    /// Over without success: the connection ends.
    Failed,
}

/// A queue's DH-HMAC-CHAP state, hash and group: SPDK's `auth` object of
/// a queue pair (`nvmf_subsystem_get_qpairs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AuthView {
    state: &'static str,
    digest: &'static str,
    dhgroup: &'static str,
}

impl AuthView {
    pub(crate) fn to_json(self) -> serde_json::Value {
        serde_json::json!({"state": self.state, "digest": self.digest, "dhgroup": self.dhgroup})
    }
}

/// What a send asks of the connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SendOutcome {
    /// Complete the command successfully.
    Ok,
    /// Complete it, then end the connection (the host's Failure2).
    Close,
}

/// What a receive produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RecvOutcome {
    /// A message of this many bytes is in the buffer.
    Message(usize),
    /// Not yet: DH work for this step runs off the reactor. Ask again
    /// (the connection parks the command and retries from its poll).
    Pending,
    /// AUTH_Failure1 of this many bytes is in the buffer; end the
    /// connection once it is sent.
    Failure(usize),
    /// The buffer cannot even hold AUTH_Failure1: fail the command and end
    /// the connection.
    TooSmall,
}

/// A DH-HMAC-CHAP reply whose shared secret is being computed.
struct PendingReply {
    rval: Vec<u8>,
    host_challenge: Vec<u8>,
    cvalid: u8,
    host_seqnum: u32,
}

/// Diffie-Hellman work running on a helper thread: a modular
/// exponentiation in ffdhe8192 takes tens of milliseconds (about 100 ms in
/// a debug build), which no reactor may spend.
enum DhJob {
    Keypair(mpsc::Receiver<Option<DhKey>>),
    Shared(mpsc::Receiver<Option<Vec<u8>>>, PendingReply),
}

/// Runs `f` on a new helper thread; its result arrives on the receiver. A
/// thread that cannot start drops the sender: the receiver then reports it
/// disconnected, which the caller takes as a failed step.
fn off_reactor<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    let started = std::thread::Builder::new().name("nvmf_dhchap".into()).spawn(move || {
        let _ = tx.send(f());
    });
    if let Err(e) = started {
        tracing::warn!("DH-HMAC-CHAP: no helper thread for the DH computation: {e}");
    }
    rx
}

/// DH-HMAC-CHAP on one queue pair.
pub(crate) struct QueueAuth {
    sub: Arc<Subsystem>,
    hostnqn: String,
    qid: u16,
    state: State,
    /// Authenticated at least once: commands other than authentication
    /// are served (also during a re-authentication).
    admitted: bool,
    tid: u16,
    digest: Digest,
    dhgroup: DhGroup,
    seqnum: u32,
    /// The challenge sent (C1).
    challenge: Vec<u8>,
    dh: Option<DhKey>,
    /// DH work of the current step, off the reactor.
    job: Option<DhJob>,
    /// The controller's response to the host's challenge (bidirectional).
    ctrl_response: Option<Vec<u8>>,
}

impl QueueAuth {
    pub(crate) fn new(sub: Arc<Subsystem>, hostnqn: &str, qid: u16) -> Self {
        QueueAuth {
            sub,
            hostnqn: hostnqn.to_string(),
            qid,
            state: State::Negotiate,
            admitted: false,
            tid: 0,
            digest: Digest::Sha256,
            dhgroup: DhGroup::Null,
            seqnum: 0,
            challenge: Vec::new(),
            dh: None,
            job: None,
            ctrl_response: None,
        }
    }

    pub(crate) fn admitted(&self) -> bool {
        self.admitted
    }

    /// Where this queue's authentication stands, for
    /// `nvmf_subsystem_get_qpairs`.
    pub(crate) fn view(&self) -> AuthView {
        let state = match self.state {
            State::Negotiate => "negotiate",
            State::Challenge | State::Reply | State::Verifying => "challenge",
            State::Success1 => "success1",
            State::Success2 => "success2",
            State::Failure1(_) => "failure1",
            State::Done => "completed",
            State::Failed => "error",
        };
        AuthView { state, digest: self.digest.name(), dhgroup: self.dhgroup.name() }
    }

    fn fail(&mut self, why: u8, what: &str) -> SendOutcome {
        tracing::warn!(
            subnqn = self.sub.nqn,
            hostnqn = self.hostnqn,
            qid = self.qid,
            reason = why,
            "DH-HMAC-CHAP authentication failed: {what}"
        );
        self.state = State::Failure1(why);
        self.dh = None;
        self.job = None;
        SendOutcome::Ok
    }

    /// An Authentication Send's message. Problems with the message are
    /// answered by the next receive (AUTH_Failure1), not by the command.
    pub(crate) fn send(&mut self, m: &[u8]) -> SendOutcome {
        if m.len() < 2 {
            return self.fail(reason::INCORRECT_PAYLOAD, "message shorter than its header");
        }
        match (m[0], m[1]) {
            (msg::TYPE_COMMON, msg::NEGOTIATE) => self.negotiate(m),
            (msg::TYPE_COMMON, msg::FAILURE2) => self.failure2(m),
            (msg::TYPE_DHCHAP, msg::REPLY) => self.reply(m),
            (msg::TYPE_DHCHAP, msg::SUCCESS2) => self.success2(m),
            (t, id) => self.fail(reason::INCORRECT_PROTOCOL_MESSAGE, &format!("unexpected message {t:#x}/{id:#x}")),
        }
    }

    fn tid_of(m: &[u8]) -> u16 {
        u16::from_le_bytes([m[4], m[5]])
    }

    fn negotiate(&mut self, m: &[u8]) -> SendOutcome {
        if !matches!(self.state, State::Negotiate | State::Done) {
            return self.fail(reason::INCORRECT_PROTOCOL_MESSAGE, "AUTH_Negotiate out of sequence");
        }
        if m.len() < msg::NEGOTIATE_HEADER_LEN {
            return self.fail(reason::INCORRECT_PAYLOAD, "short AUTH_Negotiate");
        }
        self.tid = Self::tid_of(m);
        let (sc_c, napd) = (m[6], usize::from(m[7]));
        if m.len() != msg::NEGOTIATE_HEADER_LEN + napd * msg::DESCRIPTOR_LEN {
            return self.fail(reason::INCORRECT_PAYLOAD, "AUTH_Negotiate length does not match NAPD");
        }
        if sc_c != 0 {
            // Secure channel concatenation (a TLS PSK generated by the
            // authentication) is not implemented: TLS takes configured PSKs.
            return self.fail(reason::SCC_MISMATCH, "secure channel concatenation requested (not supported)");
        }
        let descs = m[msg::NEGOTIATE_HEADER_LEN..].chunks_exact(msg::DESCRIPTOR_LEN);
        let Some(d) = descs.into_iter().find(|d| d[0] == msg::AUTHID_DHCHAP) else {
            return self.fail(reason::PROTOCOL_UNUSABLE, "no DH-HMAC-CHAP protocol descriptor");
        };
        // AUTHID, reserved, HALEN, DHLEN, then 30 hash and 30 group ids.
        let (halen, dhlen) = (usize::from(d[2]), usize::from(d[3]));
        if halen > 30 || dhlen > 30 {
            return self.fail(reason::INCORRECT_PAYLOAD, "HALEN or DHLEN beyond the descriptor");
        }
        let (hashes, groups) = (&d[4..4 + halen], &d[34..34 + dhlen]);
        let policy = DhchapPolicy::get();
        let (allowed_digests, allowed_groups) = (policy.digests(), policy.dhgroups());
        let Some(digest) =
            Digest::BY_STRENGTH.into_iter().find(|h| hashes.contains(&h.id()) && allowed_digests.contains(h))
        else {
            return self.fail(reason::HASH_UNUSABLE, "no usable hash function offered");
        };
        let Some(dhgroup) =
            DhGroup::BY_STRENGTH.into_iter().find(|g| groups.contains(&g.id()) && allowed_groups.contains(g))
        else {
            return self.fail(reason::DHGROUP_UNUSABLE, "no usable Diffie-Hellman group offered");
        };
        self.digest = digest;
        self.dhgroup = dhgroup;
        self.ctrl_response = None;
        self.dh = None;
        // The key pair is made while the host asks for the challenge.
        self.job = match dhgroup {
            DhGroup::Null => None,
            g => Some(DhJob::Keypair(off_reactor(move || DhKey::generate(g)))),
        };
        self.state = State::Challenge;
        SendOutcome::Ok
    }

    fn reply(&mut self, m: &[u8]) -> SendOutcome {
        if self.state != State::Reply {
            return self.fail(reason::INCORRECT_PROTOCOL_MESSAGE, "DH-HMAC-CHAP_Reply out of sequence");
        }
        let hl = self.digest.output_len();
        if m.len() < msg::HEADER_LEN || usize::from(m[6]) != hl {
            return self.fail(reason::INCORRECT_PAYLOAD, "DH-HMAC-CHAP_Reply header or hash length");
        }
        let (cvalid, dhvlen) = (m[8], usize::from(u16::from_le_bytes([m[10], m[11]])));
        let host_seqnum = u32::from_le_bytes([m[12], m[13], m[14], m[15]]);
        if m.len() != msg::HEADER_LEN + 2 * hl + dhvlen {
            return self.fail(reason::INCORRECT_PAYLOAD, "DH-HMAC-CHAP_Reply length");
        }
        if Self::tid_of(m) != self.tid {
            return self.fail(reason::INCORRECT_PAYLOAD, "transaction id mismatch");
        }
        if cvalid > 1 || (cvalid == 1 && host_seqnum == 0) {
            return self.fail(reason::INCORRECT_PAYLOAD, "CVALID or sequence number invalid");
        }
        let body = &m[msg::HEADER_LEN..];
        let (rval, host_challenge, dhv) = (&body[..hl], &body[hl..2 * hl], &body[2 * hl..]);
        let pending =
            PendingReply { rval: rval.to_vec(), host_challenge: host_challenge.to_vec(), cvalid, host_seqnum };
        match (self.dh.take(), self.dhgroup) {
            (None, DhGroup::Null) if dhv.is_empty() => self.check_reply(pending, None),
            (Some(k), _) => {
                let dhv = dhv.to_vec();
                self.job = Some(DhJob::Shared(off_reactor(move || k.shared(&dhv)), pending));
                self.state = State::Verifying;
                SendOutcome::Ok
            }
            _ => self.fail(reason::INCORRECT_PAYLOAD, "DH value with the null group"),
        }
    }

    /// The rest of a reply's check, with its DH shared secret (None: the
    /// null group).
    fn check_reply(&mut self, r: PendingReply, dh_secret: Option<Vec<u8>>) -> SendOutcome {
        let PendingReply { rval, host_challenge, cvalid, host_seqnum } = r;
        let (rval, host_challenge) = (&rval[..], &host_challenge[..]);
        let Some(keys) = self.sub.dhchap_keys(&self.hostnqn) else {
            return self.fail(reason::FAILED, "the host has no DH-HMAC-CHAP key");
        };
        let secret = match keys.key.read().map_err(|e| e.to_string()).and_then(|t| Secret::parse(&t)) {
            Ok(s) => s,
            Err(e) => return self.fail(reason::FAILED, &format!("key {}: {e}", keys.key.name)),
        };
        let expected = response(
            self.digest,
            &secret,
            &self.challenge,
            dh_secret.as_deref(),
            self.seqnum,
            self.tid,
            b"HostHost",
            &self.hostnqn,
            &self.sub.nqn,
        );
        if !same_bytes(&expected, rval) {
            return self.fail(reason::FAILED, "the host's response does not match its key");
        }
        if cvalid == 1 {
            let Some(ckey) = keys.ctrlr_key else {
                return self.fail(reason::FAILED, "the host asks the controller to authenticate; it has no key");
            };
            let secret = match ckey.read().map_err(|e| e.to_string()).and_then(|t| Secret::parse(&t)) {
                Ok(s) => s,
                Err(e) => return self.fail(reason::FAILED, &format!("key {}: {e}", ckey.name)),
            };
            self.ctrl_response = Some(response(
                self.digest,
                &secret,
                host_challenge,
                dh_secret.as_deref(),
                host_seqnum,
                self.tid,
                b"Controller",
                &self.sub.nqn,
                &self.hostnqn,
            ));
        }
        self.dh = None;
        self.state = State::Success1;
        SendOutcome::Ok
    }

    fn success2(&mut self, m: &[u8]) -> SendOutcome {
        if self.state != State::Success2 {
            return self.fail(reason::INCORRECT_PROTOCOL_MESSAGE, "DH-HMAC-CHAP_Success2 out of sequence");
        }
        if m.len() != msg::HEADER_LEN || Self::tid_of(m) != self.tid {
            return self.fail(reason::INCORRECT_PAYLOAD, "DH-HMAC-CHAP_Success2 length or transaction id");
        }
        self.finish();
        SendOutcome::Ok
    }

    fn failure2(&mut self, m: &[u8]) -> SendOutcome {
        if self.state != State::Success2 {
            return self.fail(reason::INCORRECT_PROTOCOL_MESSAGE, "AUTH_Failure2 out of sequence");
        }
        if m.len() != msg::FAILURE_LEN || Self::tid_of(m) != self.tid {
            return self.fail(reason::INCORRECT_PAYLOAD, "AUTH_Failure2 length or transaction id");
        }
        tracing::warn!(
            subnqn = self.sub.nqn,
            hostnqn = self.hostnqn,
            qid = self.qid,
            rc = m[6],
            rce = m[7],
            "DH-HMAC-CHAP: the host refused the controller's response"
        );
        self.state = State::Failed;
        SendOutcome::Close
    }

    fn finish(&mut self) {
        // Re-authentications too: they are rare (a host's key change or
        // its own schedule) and show that a rotated key took effect.
        tracing::info!(
            subnqn = self.sub.nqn,
            hostnqn = self.hostnqn,
            qid = self.qid,
            digest = self.digest.name(),
            dhgroup = self.dhgroup.name(),
            bidirectional = self.ctrl_response.is_some(),
            reauthentication = self.admitted,
            "DH-HMAC-CHAP authentication succeeded"
        );
        self.admitted = true;
        self.state = State::Done;
        self.ctrl_response = None;
    }

    /// Whether DH work of this step still runs; when it has ended, its
    /// result is taken (a failure answers the next receive).
    fn dh_pending(&mut self) -> bool {
        let Some(job) = self.job.take() else { return false };
        match job {
            DhJob::Keypair(rx) => match rx.try_recv() {
                Err(mpsc::TryRecvError::Empty) => {
                    self.job = Some(DhJob::Keypair(rx));
                    return true;
                }
                Ok(Some(k)) => self.dh = Some(k),
                Ok(None) | Err(mpsc::TryRecvError::Disconnected) => {
                    self.fail(reason::FAILED, "DH key generation failed");
                }
            },
            DhJob::Shared(rx, pending) => match rx.try_recv() {
                Err(mpsc::TryRecvError::Empty) => {
                    self.job = Some(DhJob::Shared(rx, pending));
                    return true;
                }
                Ok(Some(secret)) => {
                    self.check_reply(pending, Some(secret));
                }
                Ok(None) => {
                    self.fail(reason::INCORRECT_PAYLOAD, "host DH value invalid");
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.fail(reason::FAILED, "DH shared secret not computed");
                }
            },
        }
        false
    }

    /// An Authentication Receive: the next message into `out`, or
    /// `Pending` while this step's DH work runs off the reactor.
    pub(crate) fn receive(&mut self, out: &mut [u8]) -> RecvOutcome {
        if self.dh_pending() {
            return RecvOutcome::Pending;
        }
        out.fill(0);
        let why = match self.state {
            State::Challenge => match self.challenge_msg(out) {
                Ok(n) => return RecvOutcome::Message(n),
                Err(why) => why,
            },
            State::Success1 => {
                let hl = self.digest.output_len();
                let rval = self.ctrl_response.clone();
                let len = msg::HEADER_LEN + if rval.is_some() { hl } else { 0 };
                if out.len() < len {
                    reason::INCORRECT_PAYLOAD
                } else {
                    out[0] = msg::TYPE_DHCHAP;
                    out[1] = msg::SUCCESS1;
                    out[4..6].copy_from_slice(&self.tid.to_le_bytes());
                    // HL is set with or without RVALID (Linux hosts read it).
                    out[6] = hl as u8;
                    if let Some(r) = rval {
                        out[8] = 1;
                        out[msg::HEADER_LEN..len].copy_from_slice(&r);
                        self.state = State::Success2;
                    } else {
                        self.finish();
                    }
                    return RecvOutcome::Message(len);
                }
            }
            State::Failure1(why) => why,
            _ => reason::INCORRECT_PROTOCOL_MESSAGE,
        };
        if !matches!(self.state, State::Failure1(_)) {
            self.fail(why, "cannot answer the receive");
        }
        self.state = State::Failed;
        if out.len() < msg::FAILURE_LEN {
            return RecvOutcome::TooSmall;
        }
        out[0] = msg::TYPE_COMMON;
        out[1] = msg::FAILURE1;
        out[4..6].copy_from_slice(&self.tid.to_le_bytes());
        out[6] = reason::CODE_FAILURE;
        out[7] = why;
        RecvOutcome::Failure(msg::FAILURE_LEN)
    }

    fn challenge_msg(&mut self, out: &mut [u8]) -> Result<usize, u8> {
        let hl = self.digest.output_len();
        let dhv = match (self.dhgroup, &self.dh) {
            (DhGroup::Null, _) => &[][..],
            (_, Some(k)) => &k.public[..],
            (_, None) => return Err(reason::FAILED),
        };
        let len = msg::HEADER_LEN + hl + dhv.len();
        if out.len() < len {
            return Err(reason::INCORRECT_PAYLOAD);
        }
        self.challenge = random_bytes(hl).ok_or(reason::FAILED)?;
        let seq = random_bytes(4).ok_or(reason::FAILED)?;
        // Nonzero: zero means "no sequence number" in a Reply.
        self.seqnum = u32::from_le_bytes([seq[0], seq[1], seq[2], seq[3]]).max(1);
        out[0] = msg::TYPE_DHCHAP;
        out[1] = msg::CHALLENGE;
        out[4..6].copy_from_slice(&self.tid.to_le_bytes());
        out[6] = hl as u8;
        out[8] = self.digest.id();
        out[9] = self.dhgroup.id();
        out[10..12].copy_from_slice(&(dhv.len() as u16).to_le_bytes());
        out[12..16].copy_from_slice(&self.seqnum.to_le_bytes());
        out[16..16 + hl].copy_from_slice(&self.challenge);
        out[16 + hl..len].copy_from_slice(dhv);
        self.state = State::Reply;
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes_are_the_named_sizes() {
        for (g, bits) in [
            (DhGroup::Ffdhe2048, 2048),
            (DhGroup::Ffdhe3072, 3072),
            (DhGroup::Ffdhe4096, 4096),
            (DhGroup::Ffdhe6144, 6144),
            (DhGroup::Ffdhe8192, 8192),
        ] {
            assert_eq!(g.prime().unwrap().bits(), bits, "{g:?}");
        }
    }

    #[test]
    fn secret_checks_crc_and_length() {
        use base64::Engine as _;
        let key = [7u8; 32];
        let mut raw = key.to_vec();
        raw.extend_from_slice(&crc32fast::hash(&key).to_le_bytes());
        let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
        assert!(Secret::parse(&format!("DHHC-1:00:{b64}:")).is_ok());
        assert!(Secret::parse(&format!("DHHC-1:01:{b64}:\n")).is_ok());
        assert!(Secret::parse(&format!("DHHC-1:04:{b64}:")).is_err());
        assert!(Secret::parse(&format!("DHHC-1:00:{b64}")).is_err());
        raw[0] ^= 1;
        let bad = base64::engine::general_purpose::STANDARD.encode(&raw);
        assert!(Secret::parse(&format!("DHHC-1:00:{bad}:")).is_err());
        let short = base64::engine::general_purpose::STANDARD.encode(&raw[..20]);
        assert!(Secret::parse(&format!("DHHC-1:00:{short}:")).is_err());
    }

    #[test]
    fn dh_agreement_is_symmetric() {
        let a = DhKey::generate(DhGroup::Ffdhe2048).unwrap();
        let b = DhKey::generate(DhGroup::Ffdhe2048).unwrap();
        assert_eq!(a.shared(&b.public).unwrap(), b.shared(&a.public).unwrap());
        assert!(a.shared(&padded(&BigUint::from(1u8), 256)).is_none());
        assert!(a.shared(&[1u8; 10]).is_none());
    }
}
