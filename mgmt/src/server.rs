//! Non-blocking JSON-RPC server on a Unix socket, driven by a reactor poller calling [`RpcServer::poll`].
//!
//! The server never blocks: sockets are non-blocking, unwritten output waits
//! in a per-connection buffer, and each `poll` does a bounded amount of work.
//! Replies go out per connection in request order, which SPDK's client relies
//! on when it pipelines calls on one connection (`save_config`); a slow
//! asynchronous reply therefore holds back the replies queued behind it, on
//! that connection only.
//!
//! A handler that panics unwinds out of `poll`; its `Reply` is dropped on the
//! way and answers -32603, so the client is told, but whether the reactor
//! survives the panic is the reactor's policy, not this module's.
//!
//! Writes rely on SIGPIPE being ignored, which the Rust runtime arranges
//! before `main`: std offers no `MSG_NOSIGNAL` write and this crate has no
//! unsafe code to call `send` itself.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};

use serde_json::Value;

use crate::jsonrpc::{
    encode_batch, encode_response, parse_message, Decoded, Entry, Message, Response, RpcError, RpcResult, StreamDecoder,
};

/// More than this buffered without a complete request closes the connection.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Connections beyond this are told so and closed, so idle clients cannot pin
/// unbounded memory; SPDK's server has the same limit.
pub const MAX_CONNECTIONS: usize = 64;

const ACCEPTS_PER_POLL: usize = 8;
const READ_CHUNK_BYTES: usize = 64 * 1024;
const READS_PER_POLL: usize = 4;
/// Requests dispatched per connection per poll; a batch counts its elements
/// but is never split.
const REQUESTS_PER_POLL: usize = 8;
/// Requests (or batches) of one connection awaiting their reply. A client
/// that pipelines more waits until earlier replies go out.
const MAX_PENDING_REPLIES: usize = 64;
/// Stop taking requests from a client that does not read its replies.
const OUTPUT_HIGH_WATER_BYTES: usize = 4 << 20;
const WRITE_BYTES_PER_POLL: usize = 1 << 20;
const COMPLETIONS_PER_POLL: usize = 1024;

/// The way back for one request's result. It may be completed later and
/// from any thread; dropping it unsent answers -32603, so a handler that
/// forgets to reply (or panics) never leaves a client waiting forever.
#[derive(Debug)]
#[must_use = "dropping a Reply answers the client with an internal error"]
pub struct Reply {
    target: Option<Target>,
    /// The method being answered, for error messages ("" until the method
    /// table names it).
    method: &'static str,
}

#[derive(Debug)]
enum Target {
    Server { completions: Sender<Completion>, connection_id: u64, unit_seq: u64, slot_index: usize },
    Channel(Sender<RpcResult>),
    Callback(ReplyFn),
}

/// A result consumer for callers inside the process (config replay).
struct ReplyFn(Box<dyn FnOnce(RpcResult) + Send>);

impl std::fmt::Debug for ReplyFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplyFn")
    }
}

/// A finished result travelling back to the server thread.
#[derive(Debug)]
struct Completion {
    connection_id: u64,
    unit_seq: u64,
    slot_index: usize,
    result: RpcResult,
}

// Handlers complete replies on other threads, and a reactor may build the
// server on one thread and poll it on another.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Reply>();
    assert_send::<RpcServer>();
};

impl Reply {
    /// A reply that goes nowhere: the request was a notification, which is
    /// executed but never answered.
    pub fn notification() -> Self {
        Self { target: None, method: "" }
    }

    /// A reply delivered to a channel instead of a socket, for calling
    /// methods without a client (loading a config file, unit tests).
    pub fn channel() -> (Self, Receiver<RpcResult>) {
        let (sender, receiver) = mpsc::channel();
        (Self { target: Some(Target::Channel(sender)), method: "" }, receiver)
    }

    /// A reply handed to `f`, on whatever thread completes it: lets the
    /// daemon chain method calls (replaying a config) without blocking.
    pub fn callback(f: impl FnOnce(RpcResult) + Send + 'static) -> Self {
        Self { target: Some(Target::Callback(ReplyFn(Box::new(f)))), method: "" }
    }

    /// The same reply, answering `method` (the method table sets this, so a
    /// handler can name its method in errors without knowing its own name).
    pub fn for_method(mut self, method: &'static str) -> Self {
        self.method = method;
        self
    }

    /// The method this reply answers, or "" when nobody said.
    pub fn method(&self) -> &'static str {
        self.method
    }

    /// Whether anybody will see the result; a handler may skip building a
    /// large result for a notification.
    pub fn is_notification(&self) -> bool {
        self.target.is_none()
    }

    pub fn send(mut self, result: RpcResult) {
        self.deliver(result);
    }

    fn deliver(&mut self, result: RpcResult) {
        // A failed send means the receiver is gone (server dropped, or the
        // caller of `channel` stopped waiting): nobody is left to tell.
        match self.target.take() {
            None => {}
            Some(Target::Channel(sender)) => {
                let _ = sender.send(result);
            }
            Some(Target::Callback(f)) => (f.0)(result),
            Some(Target::Server { completions, connection_id, unit_seq, slot_index }) => {
                let _ = completions.send(Completion { connection_id, unit_seq, slot_index, result });
            }
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.target.is_some() {
            tracing::warn!("rpc: request dropped without a reply");
            self.deliver(Err(RpcError::internal("request dropped without a reply")));
        }
    }
}

/// The method table. `call` runs on the server's thread and must not block:
/// long work replies later through `reply`, from any thread. Unknown methods
/// are the implementation's to answer, with [`RpcError::method_not_found`].
/// Notifications are dispatched like any request, with a `reply` whose
/// result goes nowhere.
pub trait Dispatch {
    fn call(&self, method: &str, params: Option<Value>, reply: Reply);
}

/// Answers for one top-level value: a single request or a batch. Only
/// elements that get a reply have a slot.
#[derive(Debug)]
struct Unit {
    seq: u64,
    batch: bool,
    slots: Vec<Slot>,
    unfilled: usize,
}

#[derive(Debug)]
struct Slot {
    id: Value,
    result: Option<RpcResult>,
}

#[derive(Debug)]
struct Connection {
    id: u64,
    stream: UnixStream,
    decoder: StreamDecoder,
    /// The peer sent EOF (or reading failed).
    peer_eof: bool,
    /// No more requests will be taken: after EOF, or a fatal protocol error.
    input_done: bool,
    /// Oldest first; `units[i].seq == units[0].seq + i`.
    units: VecDeque<Unit>,
    next_unit_seq: u64,
    output: Vec<u8>,
    output_written: usize,
    /// Writing failed; drop the connection and whatever it still waits for.
    broken: bool,
}

/// A JSON-RPC server bound to a Unix socket, run by calling [`poll`](Self::poll).
#[derive(Debug)]
pub struct RpcServer {
    path: PathBuf,
    listener: UnixListener,
    /// (dev, ino) of the socket file we created, so that Drop never removes
    /// a file that somebody else has since put at `path`.
    socket_file: Option<(u64, u64)>,
    connections: Vec<Connection>,
    next_connection_id: u64,
    completions_tx: Sender<Completion>,
    completions_rx: Receiver<Completion>,
    /// One read buffer for all connections: an idle connection then costs
    /// no buffer, and nothing is zeroed per read.
    read_scratch: Vec<u8>,
}

impl RpcServer {
    /// Binds a Unix socket at `path`, mode 0600, non-blocking.
    ///
    /// A socket file nobody listens on (left by a crashed server) is
    /// replaced; a live one is an `AddrInUse` error, and anything at `path`
    /// that is not a socket is an `AlreadyExists` error and left alone.
    pub fn bind(path: &Path) -> io::Result<Self> {
        check_existing(path)?;
        let listener = bind_owner_only(path)?;
        listener.set_nonblocking(true)?;
        let socket_file = fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let (completions_tx, completions_rx) = mpsc::channel();
        tracing::info!(path = %path.display(), "rpc: listening");
        Ok(Self {
            path: path.to_owned(),
            listener,
            socket_file,
            connections: Vec::new(),
            next_connection_id: 0,
            completions_tx,
            completions_rx,
            read_scratch: vec![0; READ_CHUNK_BYTES],
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connections currently open.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Does a bounded amount of work without blocking: accept, read,
    /// dispatch, collect finished replies, write, reap. Returns whether it
    /// did anything, for the reactor's idle policy.
    pub fn poll(&mut self, dispatch: &dyn Dispatch) -> bool {
        let mut busy = self.accept();
        for connection in &mut self.connections {
            busy |= connection.take_input(dispatch, &self.completions_tx, &mut self.read_scratch);
        }
        busy |= self.collect_completions();
        for connection in &mut self.connections {
            busy |= connection.flush();
        }
        let before = self.connections.len();
        self.connections.retain(|c| {
            let keep = !c.finished();
            if !keep {
                tracing::debug!(connection = c.id, broken = c.broken, "rpc: connection closed");
            }
            keep
        });
        busy | (self.connections.len() != before)
    }

    fn accept(&mut self) -> bool {
        let mut busy = false;
        for _ in 0..ACCEPTS_PER_POLL {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the backlog keeps the client until
                    // a later poll finds a free descriptor.
                    tracing::warn!(error = %e, "rpc: accept failed");
                    break;
                }
            };
            busy = true;
            if self.connections.len() >= MAX_CONNECTIONS {
                refuse(stream);
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!(error = %e, "rpc: cannot make connection non-blocking");
                continue;
            }
            let id = self.next_connection_id;
            self.next_connection_id += 1;
            tracing::debug!(connection = id, "rpc: connection accepted");
            self.connections.push(Connection::new(id, stream));
        }
        busy
    }

    fn collect_completions(&mut self) -> bool {
        let mut busy = false;
        for _ in 0..COMPLETIONS_PER_POLL {
            let completion = match self.completions_rx.try_recv() {
                Ok(completion) => completion,
                // Disconnected cannot happen while we hold a sender.
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            };
            busy = true;
            // The connection may be gone (peer hung up); its results are moot.
            if let Some(connection) = self.connections.iter_mut().find(|c| c.id == completion.connection_id) {
                connection.complete(completion.unit_seq, completion.slot_index, completion.result);
            }
        }
        busy
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.socket_file {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "rpc: cannot remove socket file");
            }
        }
    }
}

/// Refuses a client over the connection limit with a reply it can show,
/// rather than leaving it in the backlog not knowing why nothing answers.
fn refuse(mut stream: UnixStream) {
    tracing::warn!("rpc: too many connections, refusing one");
    let mut out = Vec::new();
    let error = RpcError::internal(format_args!("too many connections (limit {MAX_CONNECTIONS})"));
    encode_response(&Response { id: Value::Null, outcome: Err(error) }, &mut out);
    // Best effort on a fresh socket, whose buffer has room for one line.
    let _ = stream.set_nonblocking(true);
    let _ = stream.write(&out);
}

fn check_existing(path: &Path) -> io::Result<()> {
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !metadata.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => {
            Err(io::Error::new(io::ErrorKind::AddrInUse, format!("another server is listening on {}", path.display())))
        }
        // Stale: the rename in `bind_owner_only` replaces it atomically.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates the listening socket with mode 0600 without a moment in which
/// another user could connect: `bind` creates the file with the umask's mode
/// and std cannot set a umask for one thread, so the socket is bound inside a
/// fresh 0700 directory, narrowed to 0600, then renamed into place (which
/// also replaces a stale socket file atomically).
fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    static STAGING_SEQ: AtomicU64 = AtomicU64::new(0);
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut attempts = 0;
    let (staging, staged) = loop {
        let staging =
            parent.join(format!(".rpc{}.{}", std::process::id(), STAGING_SEQ.fetch_add(1, Ordering::Relaxed)));
        let staged = staging.join("s");
        if staged.as_os_str().len() >= SUN_PATH_MAX {
            // The staged name does not fit in sockaddr_un although `path`
            // may: fall back to bind-then-chmod, leaving the short window.
            return bind_then_chmod(path);
        }
        match fs::DirBuilder::new().mode(0o700).create(&staging) {
            Ok(()) => break (staging, staged),
            // Left behind by a crashed process that had our pid.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => attempts += 1,
            Err(e) => return Err(e),
        }
    };
    let result = (|| {
        let listener = UnixListener::bind(&staged)?;
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o600))?;
        fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = fs::remove_file(&staged);
    let _ = fs::remove_dir(&staging);
    result
}

/// `sun_path` is 108 bytes on Linux, including the terminating NUL.
const SUN_PATH_MAX: usize = 108;

fn bind_then_chmod(path: &Path) -> io::Result<UnixListener> {
    if fs::symlink_metadata(path).is_ok() {
        fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    if let Err(e) = fs::set_permissions(path, fs::Permissions::from_mode(0o600)) {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(listener)
}

impl Connection {
    fn new(id: u64, stream: UnixStream) -> Self {
        Self {
            id,
            stream,
            decoder: StreamDecoder::new(MAX_REQUEST_BYTES),
            peer_eof: false,
            input_done: false,
            units: VecDeque::new(),
            next_unit_seq: 0,
            output: Vec::new(),
            output_written: 0,
            broken: false,
        }
    }

    fn pending_output(&self) -> usize {
        self.output.len() - self.output_written
    }

    fn finished(&self) -> bool {
        self.broken || (self.input_done && self.units.is_empty() && self.pending_output() == 0)
    }

    /// Whether taking another request now keeps this client within bounds.
    fn has_room(&self) -> bool {
        self.units.len() < MAX_PENDING_REPLIES && self.pending_output() < OUTPUT_HIGH_WATER_BYTES
    }

    fn take_input(
        &mut self,
        dispatch: &dyn Dispatch,
        completions: &Sender<Completion>,
        read_scratch: &mut [u8],
    ) -> bool {
        if self.input_done || self.broken {
            return false;
        }
        let mut busy = self.read(read_scratch);
        let mut dispatched = 0;
        while dispatched < REQUESTS_PER_POLL && self.has_room() {
            match self.decoder.next_value(self.peer_eof) {
                Decoded::Value(value) => {
                    busy = true;
                    dispatched += self.start_unit(value, dispatch, completions);
                }
                Decoded::NeedMore => {
                    if self.peer_eof {
                        self.input_done = true;
                    }
                    break;
                }
                Decoded::Fatal(error) => {
                    busy = true;
                    tracing::warn!(connection = self.id, error = %error.message, "rpc: closing connection");
                    self.fail(error);
                    break;
                }
            }
        }
        busy
    }

    fn read(&mut self, scratch: &mut [u8]) -> bool {
        let mut busy = false;
        for _ in 0..READS_PER_POLL {
            if self.peer_eof || !self.decoder.wants_input() {
                break;
            }
            match self.stream.read(scratch) {
                Ok(0) => {
                    self.peer_eof = true;
                    busy = true;
                }
                Ok(n) => {
                    self.decoder.push(&scratch[..n]);
                    busy = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // A reset peer cannot read replies either.
                    tracing::debug!(connection = self.id, error = %e, "rpc: read failed");
                    self.broken = true;
                    return true;
                }
            }
        }
        busy
    }

    /// Queues a protocol error after the replies already owed and stops
    /// reading: the stream cannot be resynchronised.
    fn fail(&mut self, error: RpcError) {
        self.input_done = true;
        let seq = self.next_unit_seq;
        self.next_unit_seq += 1;
        let slot = Slot { id: Value::Null, result: Some(Err(error)) };
        self.units.push_back(Unit { seq, batch: false, slots: vec![slot], unfilled: 0 });
    }

    /// Registers the reply slots for one top-level value, then dispatches its
    /// requests in order. Returns the number of elements it held.
    fn start_unit(&mut self, value: Value, dispatch: &dyn Dispatch, completions: &Sender<Completion>) -> usize {
        let (batch, entries): (bool, Vec<Entry>) = match parse_message(value) {
            Message::Single(entry) => (false, vec![entry]),
            Message::Batch(entries) => (true, entries),
        };
        let seq = self.next_unit_seq;
        let element_count = entries.len();
        let mut slots = Vec::new();
        let mut calls = Vec::new();
        for entry in entries {
            match entry {
                Err(Response { id, outcome }) => slots.push(Slot { id, result: Some(outcome) }),
                Ok(request) => {
                    let reply = match request.id {
                        None => Reply::notification(),
                        Some(id) => {
                            let slot_index = slots.len();
                            slots.push(Slot { id, result: None });
                            Reply {
                                target: Some(Target::Server {
                                    completions: completions.clone(),
                                    connection_id: self.id,
                                    unit_seq: seq,
                                    slot_index,
                                }),
                                method: "",
                            }
                        }
                    };
                    calls.push((request.method, request.params, reply));
                }
            }
        }
        if !slots.is_empty() {
            let unfilled = slots.iter().filter(|s| s.result.is_none()).count();
            self.units.push_back(Unit { seq, batch, slots, unfilled });
            self.next_unit_seq += 1;
        }
        for (method, params, reply) in calls {
            dispatch.call(&method, params, reply);
        }
        element_count
    }

    fn complete(&mut self, unit_seq: u64, slot_index: usize, result: RpcResult) {
        let Some(front_seq) = self.units.front().map(|u| u.seq) else {
            return;
        };
        let Some(offset) = unit_seq.checked_sub(front_seq) else {
            return;
        };
        let Some(unit) = usize::try_from(offset).ok().and_then(|i| self.units.get_mut(i)) else {
            return;
        };
        debug_assert_eq!(unit.seq, unit_seq);
        if let Some(slot) = unit.slots.get_mut(slot_index) {
            if slot.result.is_none() {
                slot.result = Some(result);
                unit.unfilled -= 1;
            }
        }
    }

    /// Encodes finished replies in order and writes what the socket takes.
    fn flush(&mut self) -> bool {
        if self.broken {
            return false;
        }
        while self.pending_output() < OUTPUT_HIGH_WATER_BYTES {
            match self.units.front() {
                Some(unit) if unit.unfilled == 0 => {}
                _ => break,
            }
            let Some(unit) = self.units.pop_front() else {
                break;
            };
            self.encode_unit(unit);
        }
        let mut busy = false;
        let mut written = 0;
        while self.pending_output() > 0 && written < WRITE_BYTES_PER_POLL {
            let end = self.output.len().min(self.output_written + WRITE_BYTES_PER_POLL - written);
            match self.stream.write(&self.output[self.output_written..end]) {
                Ok(0) => {
                    self.broken = true;
                    return true;
                }
                Ok(n) => {
                    self.output_written += n;
                    written += n;
                    busy = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(connection = self.id, error = %e, "rpc: write failed");
                    self.broken = true;
                    return true;
                }
            }
        }
        if self.output_written == self.output.len() {
            self.output.clear();
            self.output_written = 0;
        } else if self.output_written > self.output.len() / 2 {
            self.output.drain(..self.output_written);
            self.output_written = 0;
        }
        busy
    }

    fn encode_unit(&mut self, unit: Unit) {
        let responses = unit.slots.into_iter().map(|slot| Response {
            id: slot.id,
            outcome: slot.result.unwrap_or_else(|| Err(RpcError::internal("reply missing"))),
        });
        if unit.batch {
            let responses: Vec<Response> = responses.collect();
            encode_batch(&responses, &mut self.output);
        } else {
            for response in responses {
                encode_response(&response, &mut self.output);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn channel_reply_delivers_and_drop_answers_internal_error() {
        let (reply, results) = Reply::channel();
        reply.send(Ok(json!(5)));
        assert_eq!(results.recv().unwrap(), Ok(json!(5)));

        let (reply, results) = Reply::channel();
        drop(reply);
        let error = results.recv().unwrap().unwrap_err();
        assert_eq!(error.code, crate::jsonrpc::INTERNAL_ERROR);
        assert!(error.message.contains("request dropped without a reply"));

        let (reply, results) = Reply::channel();
        std::thread::spawn(move || reply.send(Ok(Value::Null))).join().unwrap();
        assert_eq!(results.recv().unwrap(), Ok(Value::Null));

        let reply = Reply::notification();
        assert!(reply.is_notification());
        reply.send(Ok(Value::Null));
    }
}
