//! NVMe/TCP's secure channel (NVMe TCP transport 1.1, section 3.6): TLS 1.3
//! with a pre-shared key, for both sides.
//!
//! A key is kept in the keyring in the PSK interchange format,
//! `NVMeTLSkey-1:<hh>:<base64 of key and its CRC-32>:`; `hh` names the
//! hash that turns the configured PSK into the retained PSK (00: none, the
//! configured PSK is the retained one; 01: SHA-256; 02: SHA-384). The key's
//! length (32 or 48 bytes) picks the cipher suite (TLS_AES_128_GCM_SHA256
//! or TLS_AES_256_GCM_SHA384) and with it the identity the host offers,
//! `NVMe0R01 <hostnqn> <subnqn>` or `NVMe0R02 ...` (the forms SPDK v25.09
//! generates and accepts). The TLS PSK is derived from the retained PSK and
//! the identity. Both derivations are HKDF (extract with an empty salt,
//! then expand) with a TLS 1.3 HkdfLabel as the info: the input's length,
//! the label (`tls13 HostNQN`, `tls13 nvme-tls-psk`) and the context (the
//! host NQN, the identity).
//!
//! Only 32-byte keys are accepted: the TLS layer ([`sock::TlsServer`])
//! binds a PSK to TLS_AES_128_GCM_SHA256 only; a 48-byte key is refused
//! when configured, with that reason.

use crate::keyring::Key;
use crate::tgt::{conn, ListenAddr, NvmfError, NvmfState, Subsystem, TransportOpts};
use base64::Engine;
use openssl::md::{Md, MdRef};
use openssl::pkey::Id;
use openssl::pkey_ctx::PkeyCtx;
use sock::{HandshakeStep, Stream, TlsServer};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The interchange format's fixed prefix.
const INTERCHANGE_PREFIX: &str = "NVMeTLSkey-1:";
/// The identity's prefix: TLS 1.3 ("0"), retained PSK ("R").
const IDENTITY_PREFIX: &str = "NVMe0R";
/// How long a host may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HKDF labels (with TLS 1.3's "tls13 " prefix).
const LABEL_RETAINED: &str = "tls13 HostNQN";
const LABEL_TLS_PSK: &str = "tls13 nvme-tls-psk";

/// The hash of the PSK interchange format's `hh` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainedHash {
    /// The configured PSK is the retained PSK.
    None,
    Sha256,
    Sha384,
}

/// A configured PSK, decoded from the interchange format.
#[derive(Clone, PartialEq, Eq)]
pub struct ConfiguredPsk {
    pub key: Vec<u8>,
    pub hash: RetainedHash,
}

impl std::fmt::Debug for ConfiguredPsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConfiguredPsk({} bytes, {:?})", self.key.len(), self.hash)
    }
}

impl ConfiguredPsk {
    /// Whether the key selects TLS_AES_256_GCM_SHA384 (a 48-byte key).
    pub fn sha384_suite(&self) -> bool {
        self.key.len() == 48
    }
}

/// Decodes `NVMeTLSkey-1:<hh>:<base64>:` and checks its CRC-32.
pub fn parse_interchange(text: &str) -> Result<ConfiguredPsk, String> {
    let bad = |why: &str| format!("PSK interchange: {why}");
    let rest = text.strip_prefix(INTERCHANGE_PREFIX).ok_or_else(|| bad("does not start with NVMeTLSkey-1:"))?;
    let rest = rest.strip_suffix(':').ok_or_else(|| bad("does not end with ':'"))?;
    let (hh, b64) = rest.split_once(':').ok_or_else(|| bad("no ':' after the hash"))?;
    let hash = match hh {
        "00" => RetainedHash::None,
        "01" => RetainedHash::Sha256,
        "02" => RetainedHash::Sha384,
        _ => return Err(bad(&format!("unknown hash '{hh}' (00, 01 or 02)"))),
    };
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| bad(&format!("base64: {e}")))?;
    let key_len = match (hash, raw.len()) {
        (RetainedHash::Sha256, 36) | (RetainedHash::None, 36) => 32,
        (RetainedHash::Sha384, 52) | (RetainedHash::None, 52) => 48,
        (_, n) => return Err(bad(&format!("{n} bytes decoded: not a 32 or 48 byte key with CRC-32 for hash {hh}"))),
    };
    let (key, crc) = raw.split_at(key_len);
    if crc32fast::hash(key).to_le_bytes() != crc {
        return Err(bad("CRC-32 mismatch"));
    }
    Ok(ConfiguredPsk { key: key.to_vec(), hash })
}

/// Reads a keyring key and decodes it; refuses what the TLS layer cannot
/// use (a 48-byte key).
pub fn read_psk(key: &Key) -> Result<ConfiguredPsk, String> {
    let text = key.read().map_err(|e| e.to_string())?;
    let psk = parse_interchange(&text).map_err(|e| format!("key {}: {e}", key.name))?;
    if psk.sha384_suite() {
        return Err(format!(
            "key {}: a 48-byte PSK selects TLS_AES_256_GCM_SHA384, which nvraid's TLS (OpenSSL's PSK callbacks) \
             cannot bind a PSK to; use a 32-byte key",
            key.name
        ));
    }
    Ok(psk)
}

/// The PSK identity a host offers for a subsystem.
pub fn identity(hostnqn: &str, subnqn: &str, sha384_suite: bool) -> String {
    format!("{IDENTITY_PREFIX}{} {hostnqn} {subnqn}", if sha384_suite { "02" } else { "01" })
}

/// An identity split into (suite is SHA-384, host NQN, subsystem NQN).
pub fn parse_identity(id: &str) -> Option<(bool, &str, &str)> {
    let rest = id.strip_prefix(IDENTITY_PREFIX)?;
    let (hh, rest) = rest.split_once(' ')?;
    let sha384 = match hh {
        "01" => false,
        "02" => true,
        _ => return None,
    };
    let (host, sub) = rest.split_once(' ')?;
    if host.is_empty() || sub.is_empty() || sub.contains(' ') {
        return None;
    }
    Some((sha384, host, sub))
}

fn md(sha384: bool) -> &'static MdRef {
    if sha384 {
        Md::sha384()
    } else {
        Md::sha256()
    }
}

/// HKDF (extract with an empty salt, then expand) of `ikm` to `out_len`
/// bytes, the info being a TLS 1.3 HkdfLabel.
fn hkdf_label(ikm: &[u8], sha384: bool, label: &str, context: &str, out_len: usize) -> Result<Vec<u8>, String> {
    if label.len() > 255 || context.len() > 255 {
        return Err(format!("HKDF context of {} bytes: at most 255", context.len()));
    }
    let mut info = Vec::with_capacity(4 + label.len() + context.len());
    info.extend_from_slice(&(ikm.len() as u16).to_be_bytes());
    info.push(label.len() as u8);
    info.extend_from_slice(label.as_bytes());
    info.push(context.len() as u8);
    info.extend_from_slice(context.as_bytes());
    let run = || -> Result<Vec<u8>, openssl::error::ErrorStack> {
        let mut ctx = PkeyCtx::new_id(Id::HKDF)?;
        ctx.derive_init()?;
        ctx.set_hkdf_md(md(sha384))?;
        ctx.set_hkdf_key(ikm)?;
        ctx.set_hkdf_salt(&[])?;
        ctx.add_hkdf_info(&info)?;
        let mut out = vec![0u8; out_len];
        let n = ctx.derive(Some(&mut out))?;
        out.truncate(n);
        Ok(out)
    };
    run().map_err(|e| format!("HKDF: {e}"))
}

/// The retained PSK of `hostnqn`.
pub fn retained_psk(psk: &ConfiguredPsk, hostnqn: &str) -> Result<Vec<u8>, String> {
    match psk.hash {
        RetainedHash::None => Ok(psk.key.clone()),
        RetainedHash::Sha256 => hkdf_label(&psk.key, false, LABEL_RETAINED, hostnqn, 32),
        RetainedHash::Sha384 => hkdf_label(&psk.key, true, LABEL_RETAINED, hostnqn, 48),
    }
}

/// The PSK TLS uses, from the retained PSK and the identity.
pub fn tls_psk(retained: &[u8], identity: &str, sha384_suite: bool) -> Result<Vec<u8>, String> {
    hkdf_label(retained, sha384_suite, LABEL_TLS_PSK, identity, if sha384_suite { 48 } else { 32 })
}

/// The identity and TLS PSK for a host and subsystem, from a configured PSK.
pub fn derive(psk: &ConfiguredPsk, hostnqn: &str, subnqn: &str) -> Result<(String, Vec<u8>), String> {
    let id = identity(hostnqn, subnqn, psk.sha384_suite());
    let retained = retained_psk(psk, hostnqn)?;
    let key = tls_psk(&retained, &id, psk.sha384_suite())?;
    Ok((id, key))
}

// ---- Target side ----

/// The TLS context of a secure listener: the PSK is found by the identity
/// the host offers, among the hosts of the subsystems on that listener.
pub(crate) fn listener_context(listen: &ListenAddr) -> Result<TlsServer, NvmfError> {
    let (state, listen) = (NvmfState::get(), listen.clone());
    TlsServer::new(Arc::new(move |id: &str| find_psk(&state, &listen, id)))
        .map_err(|e| NvmfError::Invalid(format!("TLS context: {e}")))
}

/// The TLS PSK for an identity a host offered on `listen`; every miss is
/// logged (the handshake then fails: there is no other way in).
fn find_psk(state: &NvmfState, listen: &ListenAddr, id: &str) -> Option<Vec<u8>> {
    let refuse = |why: String| {
        tracing::warn!(traddr = listen.traddr, trsvcid = listen.trsvcid, "TLS: PSK identity '{id}' refused: {why}");
        None
    };
    let Some((sha384, host, sub)) = parse_identity(id) else {
        return refuse("not an NVMe0R01/NVMe0R02 identity".into());
    };
    let Some(s) = state.subsystem(sub).filter(|s| s.listeners().contains(listen)) else {
        return refuse(format!("no subsystem {sub} on this listener"));
    };
    let Some(key) = s.lock().host_psks.iter().find(|(h, _)| h == host).map(|(_, k)| k.clone()) else {
        return refuse(format!("host {host} has no PSK in {sub}"));
    };
    let psk = match read_psk(&key) {
        Ok(p) => p,
        Err(e) => return refuse(e),
    };
    if psk.sha384_suite() != sha384 {
        return refuse(format!("key {} is not for the identity's hash", key.name));
    }
    match derive(&psk, host, sub) {
        Ok((want, tls)) if want == id => Some(tls),
        Ok(_) => refuse("identity mismatch".into()),
        Err(e) => refuse(e),
    }
}

/// Takes over a connection accepted on a secure listener: the handshake
/// runs from a poller on this reactor (non-blocking, OpenSSL's WANT_READ /
/// WANT_WRITE retried on the next poll), then the connection starts as
/// any other, over TLS.
pub(crate) fn accept(tls: &TlsServer, tcp: TcpStream, listen: ListenAddr, portid: u16, opts: Arc<TransportOpts>) {
    let peer = tcp.peer_addr().ok();
    if let Err(e) = tcp.set_nonblocking(true).and_then(|()| tcp.set_nodelay(true)) {
        tracing::warn!("NVMe/TCP TLS connection setup: {e}");
        return;
    }
    let mut hs = match tls.accept(tcp) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!("NVMe/TCP TLS setup: {e}");
            return;
        }
    };
    let deadline_ns = reactor::now_ns() + HANDSHAKE_TIMEOUT.as_nanos() as u64;
    let state = NvmfState::get();
    reactor::register_poller("nvmf_tcp_tls_handshake", move || {
        let Some(h) = hs.as_mut() else { return reactor::PollStatus::Done };
        if state.shutting_down.load(Ordering::Acquire) {
            hs = None;
            return reactor::PollStatus::Done;
        }
        match h.poll() {
            Ok(HandshakeStep::Pending) if reactor::now_ns() < deadline_ns => reactor::PollStatus::Idle,
            Ok(HandshakeStep::Pending) => {
                tracing::warn!(?peer, "NVMe/TCP TLS handshake timed out");
                hs = None;
                reactor::PollStatus::Done
            }
            Ok(HandshakeStep::Done) => {
                let stream = hs.take().map(sock::Handshake::into_stream);
                tracing::info!(
                    ?peer,
                    identity = stream.as_ref().and_then(Stream::psk_identity),
                    "NVMe/TCP TLS session"
                );
                if let Some(stream) = stream {
                    conn::start(stream, listen.clone(), portid, opts.clone());
                }
                reactor::PollStatus::Done
            }
            Err(e) => {
                tracing::warn!(?peer, traddr = listen.traddr, trsvcid = listen.trsvcid, "NVMe/TCP {e}");
                hs = None;
                reactor::PollStatus::Done
            }
        }
    });
}

/// The secure channel's rules for a Connect (after the host list's): over
/// TLS, the identity must be this host's for this subsystem and the host
/// must (still) have a PSK; a host with a PSK never connects in plain.
pub(crate) fn channel_allows(sub: &Subsystem, hostnqn: &str, stream: &Stream) -> Result<(), String> {
    let has_psk = sub.lock().host_psks.iter().any(|(h, _)| h == hostnqn);
    match stream.psk_identity() {
        None if stream.is_secure() => Err("TLS session without a PSK identity".into()),
        None if has_psk => Err("the host has a PSK: it must connect over a secure_channel listener".into()),
        None => Ok(()),
        Some(_) if !has_psk => Err("the host has no PSK for this subsystem".into()),
        Some(id) => match parse_identity(id) {
            Some((_, h, s)) if h == hostnqn && s == sub.nqn => Ok(()),
            _ => Err(format!("Connect's host or subsystem differs from the TLS identity '{id}'")),
        },
    }
}

impl NvmfState {
    /// `nvmf_subsystem_add_host` with `psk`: the key is checked (readable,
    /// interchange format, a usable length) and kept before `add` allows
    /// the host, so no moment lets it in without it.
    pub fn add_host_with_psk(
        &self,
        nqn: &str,
        host: &str,
        psk: Arc<Key>,
        add: impl FnOnce() -> Result<(), NvmfError>,
    ) -> Result<(), NvmfError> {
        let sub = self.subsystem(nqn).ok_or_else(|| NvmfError::NotFound(format!("subsystem {nqn}")))?;
        read_psk(&psk).map_err(NvmfError::Invalid)?;
        sub.lock().host_psks.push((host.to_string(), psk));
        add().inspect_err(|_| {
            let mut i = sub.lock();
            if let Some(pos) = i.host_psks.iter().rposition(|(h, _)| h == host) {
                i.host_psks.remove(pos);
            }
        })
    }
}

// ---- Host side ----

/// The host's side of a connection: TLS over `tcp` when the connect
/// parameters name a PSK (a blocking handshake, each wait bounded by the
/// connect timeout), else the socket as it is.
pub(crate) fn secure(tcp: TcpStream, p: &crate::host::ConnectParams) -> Result<Stream, crate::host::HostError> {
    use crate::host::HostError;
    let Some(key) = &p.psk else { return Ok(Stream::Plain(tcp)) };
    let psk = read_psk(key).map_err(HostError::Protocol)?;
    let (id, tls) = derive(&psk, &p.hostnqn, &p.subnqn).map_err(HostError::Protocol)?;
    let io = |e: std::io::Error| HostError::Io(e.to_string());
    tcp.set_read_timeout(Some(p.timeout)).map_err(io)?;
    tcp.set_write_timeout(Some(p.timeout)).map_err(io)?;
    let stream = sock::tls_connect(tcp, &id, &tls).map_err(HostError::Io)?;
    stream.tcp().set_write_timeout(None).map_err(io)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interchange(hh: &str, key: &[u8]) -> String {
        let mut raw = key.to_vec();
        raw.extend_from_slice(&crc32fast::hash(key).to_le_bytes());
        format!("NVMeTLSkey-1:{hh}:{}:", base64::engine::general_purpose::STANDARD.encode(raw))
    }

    #[test]
    fn interchange_decodes_and_checks() {
        let key: Vec<u8> = (0..32).collect();
        let p = parse_interchange(&interchange("01", &key)).unwrap();
        assert_eq!((p.key.as_slice(), p.hash), (key.as_slice(), RetainedHash::Sha256));
        let p = parse_interchange(&interchange("00", &[7u8; 48])).unwrap();
        assert!(p.sha384_suite() && p.hash == RetainedHash::None);
        // The length must fit the hash; the CRC must match; the frame must be whole.
        assert!(parse_interchange(&interchange("02", &key)).is_err());
        let mut raw = key.clone();
        raw.extend_from_slice(&(crc32fast::hash(&key) ^ 1).to_le_bytes());
        let bad = format!("NVMeTLSkey-1:01:{}:", base64::engine::general_purpose::STANDARD.encode(raw));
        assert!(parse_interchange(&bad).unwrap_err().contains("CRC-32 mismatch"));
        assert!(parse_interchange(interchange("01", &key).trim_end_matches(':')).is_err());
        assert!(parse_interchange(&interchange("03", &key)).is_err());
        assert!(parse_interchange("NVMeTLSkey-1:01:!!!:").is_err());
    }

    /// A key as other NVMe/TCP tools write it: it decodes, its CRC holds.
    #[test]
    fn known_interchange_key() {
        let p = parse_interchange("NVMeTLSkey-1:01:MDAxMTIyMzM0NDU1NjY3Nzg4OTlhYWJiY2NkZGVlZmZwJEiQ:").unwrap();
        assert_eq!(p.key, b"00112233445566778899aabbccddeeff");
    }

    #[test]
    fn identity_round_trip() {
        let id = identity("nqn.h", "nqn.s", false);
        assert_eq!(id, "NVMe0R01 nqn.h nqn.s");
        assert_eq!(parse_identity(&id), Some((false, "nqn.h", "nqn.s")));
        assert_eq!(parse_identity("NVMe0R02 a b"), Some((true, "a", "b")));
        assert_eq!(parse_identity("NVMe1R01 a b"), None);
        assert_eq!(parse_identity("NVMe0R01 a"), None);
        assert_eq!(parse_identity("NVMe0R01 a b c"), None);
    }

    /// HKDF-SHA256 with an empty salt, checked against RFC 5869's
    /// definition computed here with HMAC (sha2/hmac crates).
    #[test]
    fn derivation_is_hkdf_with_an_hkdf_label() {
        use hmac::{Hmac, KeyInit, Mac};
        type H = Hmac<sha2::Sha256>;
        let ikm = [0x42u8; 32];
        let mut ext = <H as KeyInit>::new_from_slice(&[]).unwrap();
        ext.update(&ikm);
        let prk = ext.finalize().into_bytes();
        let mut info = vec![0u8, 32, LABEL_RETAINED.len() as u8];
        info.extend_from_slice(LABEL_RETAINED.as_bytes());
        info.push(5);
        info.extend_from_slice(b"nqn.h");
        let mut exp = <H as KeyInit>::new_from_slice(&prk).unwrap();
        exp.update(&info);
        exp.update(&[1]);
        let want = exp.finalize().into_bytes();
        let psk = ConfiguredPsk { key: ikm.to_vec(), hash: RetainedHash::Sha256 };
        assert_eq!(retained_psk(&psk, "nqn.h").unwrap(), want.as_slice());
        let none = ConfiguredPsk { key: ikm.to_vec(), hash: RetainedHash::None };
        assert_eq!(retained_psk(&none, "nqn.h").unwrap(), ikm);
        let (id, k) = derive(&psk, "nqn.h", "nqn.s").unwrap();
        assert_eq!((id.as_str(), k.len()), ("NVMe0R01 nqn.h nqn.s", 32));
        assert_ne!(k, derive(&psk, "nqn.h", "nqn.t").unwrap().1, "the identity is in the derivation");
    }
}
