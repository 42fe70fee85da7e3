//! TLS 1.3 with an external pre-shared key (OpenSSL 3 through the
//! `openssl` crate): the stream the transports read and write through,
//! secure or plain, and the handshakes of both sides. No certificates: the
//! PSK (with an ephemeral key exchange, psk_dhe_ke) is the only
//! authentication offered, and TLS 1.3 is the only version.
//!
//! The PSK is used through OpenSSL's PSK callbacks, which in TLS 1.3 tie
//! it to TLS_AES_128_GCM_SHA256 (a SHA-256 PSK); the callbacks that would
//! bind a PSK to TLS_AES_256_GCM_SHA384 are not in the crate's safe API.
//!
//! The plain path is the socket itself: [`Stream::Plain`] hands reads and
//! vectored writes straight to the `TcpStream`. The secure path gathers a
//! write's slices into one buffer (at most one TLS record) so that small
//! PDU headers do not each become a record.

use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslMode, SslOptions, SslStream, SslVerifyMode, SslVersion,
};
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, OnceLock};

/// The one cipher suite a PSK from OpenSSL's PSK callbacks can use.
pub const CIPHER_SUITE: &str = "TLS_AES_128_GCM_SHA256";
/// Largest TLS record payload: the gather buffer of a secure stream.
const RECORD_LEN: usize = 16384;

/// A socket the transports read and write: what [`crate::TxQueue`] and
/// [`crate::RxBuf`] work on, and what they shut down.
pub trait Socket: Read + Write {
    /// Both directions down (a secure stream says close_notify first,
    /// if the socket takes it).
    fn shutdown_both(&mut self);
}

impl Socket for TcpStream {
    fn shutdown_both(&mut self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

/// A connection's byte stream: the TCP socket, or TLS over it.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

/// An established TLS session over a (non-blocking) socket.
pub struct TlsStream {
    ssl: SslStream<TcpStream>,
    gather: Box<[u8]>,
}

impl Stream {
    /// The socket under the stream (options, addresses).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t.ssl.get_ref(),
        }
    }

    pub fn is_secure(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The PSK identity the TLS session was set up with.
    pub fn psk_identity(&self) -> Option<&str> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(t) => t.ssl.ssl().ex_data(identity_index()?).map(String::as_str),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.ssl.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.ssl.write(buf),
        }
    }

    /// Plain: one `writev`. Secure: the slices gathered into one record's
    /// worth. A write that found the socket full is retried by the caller
    /// with the same leading bytes (its queue front has not moved) and at
    /// least as many, which is what OpenSSL asks of a retried write.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write_vectored(bufs),
            Stream::Tls(t) => {
                let mut n = 0;
                for b in bufs {
                    let take = b.len().min(t.gather.len() - n);
                    t.gather[n..n + take].copy_from_slice(&b[..take]);
                    n += take;
                    if n == t.gather.len() {
                        break;
                    }
                }
                if n == 0 {
                    return Ok(0);
                }
                t.ssl.write(&t.gather[..n])
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.ssl.flush(),
        }
    }
}

impl Socket for Stream {
    fn shutdown_both(&mut self) {
        if let Stream::Tls(t) = self {
            // Best effort: a full socket just goes without close_notify.
            let _ = t.ssl.shutdown();
        }
        let _ = self.tcp().shutdown(Shutdown::Both);
    }
}

/// Where a handshake's callback leaves the PSK identity it was given.
fn identity_index() -> Option<Index<Ssl, String>> {
    static INDEX: OnceLock<Option<Index<Ssl, String>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().ok())
}

fn tls13_only(method: SslMethod) -> Result<SslContextBuilder, ErrorStack> {
    let mut b = SslContextBuilder::new(method)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_max_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_ciphersuites(CIPHER_SUITE)?;
    // Partial writes: a full socket returns what went out, like `write`.
    b.set_mode(SslMode::ENABLE_PARTIAL_WRITE | SslMode::ACCEPT_MOVING_WRITE_BUFFER);
    // No resumption: every connection proves the PSK again.
    b.set_options(SslOptions::NO_TICKET);
    b.set_num_tickets(0)?;
    b.set_verify(SslVerifyMode::NONE);
    Ok(b)
}

/// Finds the TLS PSK for an identity the client sent (None: unknown
/// identity, or no usable key; the finder logs why).
pub type FindPsk = dyn Fn(&str) -> Option<Vec<u8>> + Send + Sync;

/// The server side: one context per secure listener.
#[derive(Clone)]
pub struct TlsServer {
    ctx: SslContext,
}

impl TlsServer {
    pub fn new(find: Arc<FindPsk>) -> Result<Self, ErrorStack> {
        let mut b = tls13_only(SslMethod::tls_server())?;
        let index = identity_index();
        b.set_psk_server_callback(move |ssl, identity, out| {
            let Some(identity) = identity.and_then(|i| std::str::from_utf8(i).ok()) else {
                return Ok(0);
            };
            let Some(psk) = find(identity) else {
                return Ok(0);
            };
            if psk.len() > out.len() {
                return Ok(0);
            }
            out[..psk.len()].copy_from_slice(&psk);
            if let Some(index) = index {
                ssl.set_ex_data(index, identity.to_string());
            }
            Ok(psk.len())
        });
        Ok(TlsServer { ctx: b.build() })
    }

    /// Starts the server handshake on a non-blocking socket; drive it with
    /// [`Handshake::poll`].
    pub fn accept(&self, tcp: TcpStream) -> Result<Handshake, ErrorStack> {
        let mut ssl = Ssl::new(&self.ctx)?;
        ssl.set_accept_state();
        Ok(Handshake { ssl: SslStream::new(ssl, tcp)? })
    }
}

/// A handshake in progress on a non-blocking socket.
pub struct Handshake {
    ssl: SslStream<TcpStream>,
}

/// What one [`Handshake::poll`] got to.
pub enum HandshakeStep {
    /// Waiting on the peer (OpenSSL's WANT_READ / WANT_WRITE).
    Pending,
    Done,
}

impl Handshake {
    /// One step; never blocks. Err: the handshake failed (the reason, with
    /// OpenSSL's error stack).
    pub fn poll(&mut self) -> Result<HandshakeStep, String> {
        match self.ssl.do_handshake() {
            Ok(()) => Ok(HandshakeStep::Done),
            Err(e) if matches!(e.code(), ErrorCode::WANT_READ | ErrorCode::WANT_WRITE) => match e.io_error() {
                Some(io) if io.kind() != io::ErrorKind::WouldBlock && io.kind() != io::ErrorKind::Interrupted => {
                    Err(io.to_string())
                }
                _ => Ok(HandshakeStep::Pending),
            },
            Err(e) => Err(handshake_error(&e)),
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        self.ssl.get_ref()
    }

    /// The established stream (after [`HandshakeStep::Done`]).
    pub fn into_stream(self) -> Stream {
        Stream::Tls(Box::new(TlsStream { ssl: self.ssl, gather: vec![0u8; RECORD_LEN].into_boxed_slice() }))
    }
}

fn handshake_error(e: &openssl::ssl::Error) -> String {
    match (e.ssl_error(), e.io_error()) {
        (Some(stack), _) => format!("TLS handshake: {stack}"),
        (None, Some(io)) => format!("TLS handshake: {io}"),
        (None, None) if e.code() == ErrorCode::SYSCALL => "TLS handshake: peer closed the connection".to_string(),
        _ => format!("TLS handshake: {e}"),
    }
}

/// The client side: a blocking handshake on `tcp` (its read timeout
/// bounds each wait), offering `identity` with `psk`.
pub fn connect(tcp: TcpStream, identity: &str, psk: &[u8]) -> Result<Stream, String> {
    let err = |e: ErrorStack| format!("TLS setup: {e}");
    let mut b = tls13_only(SslMethod::tls_client()).map_err(err)?;
    let (identity, psk) = (identity.as_bytes().to_vec(), psk.to_vec());
    b.set_psk_client_callback(move |_ssl, _hint, id_out, psk_out| {
        // The identity goes out NUL-terminated.
        if identity.len() + 1 > id_out.len() || psk.len() > psk_out.len() {
            return Ok(0);
        }
        id_out[..identity.len()].copy_from_slice(&identity);
        id_out[identity.len()] = 0;
        psk_out[..psk.len()].copy_from_slice(&psk);
        Ok(psk.len())
    });
    let ctx = b.build();
    let mut ssl = Ssl::new(&ctx).map_err(err)?;
    ssl.set_connect_state();
    let mut hs = Handshake { ssl: SslStream::new(ssl, tcp).map_err(err)? };
    match hs.ssl.do_handshake() {
        Ok(()) => Ok(hs.into_stream()),
        // A blocking socket stops wanting only when its timeout ran out.
        Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => Err(match e.io_error() {
            Some(io) => format!("TLS handshake: {io}"),
            None => "TLS handshake: timed out".to_string(),
        }),
        Err(e) => Err(handshake_error(&e)),
    }
}
