//! End-to-end tests of the JSON-RPC server over a real Unix socket, including replay of SPDK client captures.

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mgmt::jsonrpc::{
    decode_params, encode_response, parse_message, Decoded, Message, Response, RpcError, RpcResult, StreamDecoder,
    INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR,
};
use mgmt::server::{Dispatch, Reply, RpcServer, MAX_CONNECTIONS, MAX_REQUEST_BYTES};
use serde::Deserialize;
use serde_json::{json, Value};

/// Long enough never to fire on a loaded 2-core machine, short enough that
/// a lost reply fails the test instead of hanging it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A small method table covering synchronous, asynchronous, failing and
/// forgetful handlers.
#[derive(Default)]
struct TestMethods {
    notified: AtomicUsize,
}

#[derive(Deserialize)]
struct AddParams {
    a: i64,
    b: i64,
}

#[derive(Deserialize)]
struct LaterParams {
    delay_ms: u64,
    value: Value,
}

impl Dispatch for TestMethods {
    fn call(&self, method: &str, params: Option<Value>, reply: Reply) {
        match method {
            "echo" => reply.send(Ok(params.unwrap_or(Value::Null))),
            "add" => reply.send(decode_params::<AddParams>(method, params).map(|p| json!(p.a + p.b))),
            "later" => match decode_params::<LaterParams>(method, params) {
                Ok(p) => {
                    thread::spawn(move || {
                        thread::sleep(Duration::from_millis(p.delay_ms));
                        reply.send(Ok(p.value));
                    });
                }
                Err(e) => reply.send(Err(e)),
            },
            "forget" => drop(reply),
            "exists" => reply.send(Err(RpcError::errno(libc::EEXIST, "bdev Malloc0 already exists"))),
            "notify" => {
                self.notified.fetch_add(1, Ordering::SeqCst);
                reply.send(Ok(Value::Bool(true)));
            }
            other => reply.send(Err(RpcError::method_not_found(other))),
        }
    }
}

struct Shared<T>(Arc<T>);

impl<T: Dispatch> Dispatch for Shared<T> {
    fn call(&self, method: &str, params: Option<Value>, reply: Reply) {
        self.0.call(method, params, reply)
    }
}

/// A private directory for one test's socket, removed afterwards.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mgmt-rpc-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("rpc.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A server polled on its own thread, as a reactor poller would be.
struct Harness<D: Dispatch + Send + Sync + 'static> {
    path: PathBuf,
    methods: Arc<D>,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _dir: TempDir,
}

fn start() -> Harness<TestMethods> {
    start_with(TestMethods::default())
}

fn start_with<D: Dispatch + Send + Sync + 'static>(methods: D) -> Harness<D> {
    let dir = TempDir::new();
    let path = dir.socket();
    let mut server = RpcServer::bind(&path).expect("bind");
    let methods = Arc::new(methods);
    let stop = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(AtomicUsize::new(0));
    let thread = {
        let dispatch = Shared(Arc::clone(&methods));
        let stop = Arc::clone(&stop);
        let connections = Arc::clone(&connections);
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let busy = server.poll(&dispatch);
                connections.store(server.connection_count(), Ordering::SeqCst);
                if !busy {
                    // The idle policy of a reactor in sleep mode, scaled down.
                    thread::sleep(Duration::from_micros(100));
                }
            }
        })
    };
    Harness { path, methods, connections, stop, thread: Some(thread), _dir: dir }
}

impl<D: Dispatch + Send + Sync + 'static> Harness<D> {
    fn connect(&self) -> Client {
        Client::connect(&self.path)
    }

    fn wait_for_connections(&self, count: usize) {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        while self.connections.load(Ordering::SeqCst) != count {
            assert!(
                Instant::now() < deadline,
                "server still has {} connections",
                self.connections.load(Ordering::SeqCst)
            );
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl<D: Dispatch + Send + Sync + 'static> Drop for Harness<D> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).expect("connect");
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Self { stream, reader }
    }

    fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).expect("write");
    }

    /// One reply line, checked to be compact JSON terminated by one newline.
    fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("reply within the timeout");
        assert!(n > 0, "connection closed while waiting for a reply");
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'), "{line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line:?}"))
    }

    fn call(&mut self, method: &str, id: Value, params: Option<Value>) -> Value {
        let mut request = json!({"jsonrpc": "2.0", "method": method, "id": id});
        if let Some(params) = params {
            request["params"] = params;
        }
        self.send(serde_json::to_vec_pretty(&request).unwrap());
        let reply = self.recv();
        assert_eq!(reply["id"], request["id"], "{reply}");
        reply
    }

    /// The server closed the connection. A close with our bytes still unread
    /// on its side reads as ECONNRESET on Linux, after the queued replies.
    fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected the server to close the connection: {e}"),
        }
        assert!(rest.is_empty(), "unexpected bytes before EOF: {:?}", String::from_utf8_lossy(&rest));
    }
}

fn error_of(reply: &Value) -> (i64, String) {
    assert_eq!(reply["jsonrpc"], "2.0", "{reply}");
    assert!(reply.get("result").is_none(), "{reply}");
    let code = reply["error"]["code"].as_i64().unwrap_or_else(|| panic!("no error code: {reply}"));
    (code, reply["error"]["message"].as_str().unwrap().to_owned())
}

fn result_of(reply: &Value) -> &Value {
    assert_eq!(reply["jsonrpc"], "2.0", "{reply}");
    assert!(reply.get("error").is_none(), "{reply}");
    &reply["result"]
}

fn pretty(method: &str, id: u64, params: Value) -> Vec<u8> {
    serde_json::to_vec_pretty(&json!({"jsonrpc": "2.0", "method": method, "id": id, "params": params})).unwrap()
}

#[test]
fn pretty_printed_request_without_newline() {
    let h = start();
    let mut c = h.connect();
    let request = pretty("add", 1, json!({"a": 2, "b": 3}));
    assert!(request.contains(&b'\n') && !request.ends_with(b"\n"));
    c.send(&request);
    let reply = c.recv();
    assert_eq!(reply, json!({"jsonrpc": "2.0", "id": 1, "result": 5}));
}

#[test]
fn two_requests_in_one_write() {
    let h = start();
    let mut c = h.connect();
    let mut bytes = pretty("echo", 1, json!({"x": 1}));
    bytes.extend(pretty("echo", 2, json!({"x": 2})));
    c.send(&bytes);
    assert_eq!(result_of(&c.recv()), &json!({"x": 1}));
    let second = c.recv();
    assert_eq!(second["id"], 2);
    assert_eq!(result_of(&second), &json!({"x": 2}));
}

#[test]
fn request_split_byte_by_byte() {
    let h = start();
    let mut c = h.connect();
    let bytes = pretty("add", 9, json!({"a": 40, "b": 2}));
    for byte in &bytes {
        c.send([*byte]);
        // Give the server a chance to read the partial request on its own.
        thread::yield_now();
    }
    let reply = c.recv();
    assert_eq!(reply["id"], 9);
    assert_eq!(result_of(&reply), &json!(42));
}

#[test]
fn string_and_null_ids_are_echoed() {
    let h = start();
    let mut c = h.connect();
    let reply = c.call("echo", json!("req-7"), None);
    assert_eq!(reply["id"], "req-7");
    assert_eq!(result_of(&reply), &Value::Null);
    let reply = c.call("echo", Value::Null, Some(json!([1, 2])));
    assert_eq!(reply["id"], Value::Null);
    assert_eq!(result_of(&reply), &json!([1, 2]));
    let reply = c.call("echo", json!(18446744073709551615u64), None);
    assert_eq!(reply["id"], json!(18446744073709551615u64));
}

#[test]
fn batch_with_notifications_mixed_in() {
    let h = start();
    let mut c = h.connect();
    c.send(
        r#"[
        {"jsonrpc": "2.0", "method": "add", "params": {"a": 1, "b": 1}, "id": 1},
        {"jsonrpc": "2.0", "method": "notify"},
        {"jsonrpc": "2.0", "method": "nope", "id": "u"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "notify", "params": [7]},
        {"jsonrpc": "2.0", "method": "echo", "params": {"s": "x"}, "id": 5}
    ]"#,
    );
    let reply = c.recv();
    let replies = reply.as_array().unwrap_or_else(|| panic!("batch reply must be an array: {reply}"));
    assert_eq!(replies.len(), 4, "{reply}");
    assert_eq!(replies[0]["id"], 1);
    assert_eq!(result_of(&replies[0]), &json!(2));
    assert_eq!(replies[1]["id"], "u");
    assert_eq!(error_of(&replies[1]).0, i64::from(METHOD_NOT_FOUND));
    assert_eq!(replies[2]["id"], Value::Null);
    assert_eq!(error_of(&replies[2]).0, i64::from(INVALID_REQUEST));
    assert_eq!(replies[3]["id"], 5);
    assert_eq!(result_of(&replies[3]), &json!({"s": "x"}));
    // Notifications run even though they are not answered.
    assert_eq!(h.methods.notified.load(Ordering::SeqCst), 2);
}

#[test]
fn empty_batch_is_one_invalid_request_error() {
    let h = start();
    let mut c = h.connect();
    c.send("[]");
    let reply = c.recv();
    assert!(reply.is_object(), "{reply}");
    assert_eq!(reply["id"], Value::Null);
    let (code, message) = error_of(&reply);
    assert_eq!(code, i64::from(INVALID_REQUEST));
    assert!(message.contains("empty batch"), "{message}");
    // The stream is still in sync, so the connection keeps serving.
    assert_eq!(result_of(&c.call("echo", json!(2), None)), &Value::Null);
}

#[test]
fn notifications_get_no_reply() {
    let h = start();
    let mut c = h.connect();
    // Replies are in request order, so if either notification were answered
    // its reply would arrive before the echo's.
    c.send(r#"{"jsonrpc": "2.0", "method": "notify"}"#);
    c.send(r#"[{"jsonrpc": "2.0", "method": "notify"}, {"jsonrpc": "2.0", "method": "nope"}]"#);
    let reply = c.call("echo", json!(3), Some(json!({"after": true})));
    assert_eq!(result_of(&reply), &json!({"after": true}));
    assert_eq!(h.methods.notified.load(Ordering::SeqCst), 2);
}

#[test]
fn malformed_json_closes_only_that_connection() {
    let h = start();
    let mut idle = h.connect();
    // A client that stopped in the middle of a request must not hold up others.
    idle.send(r#"{"jsonrpc": "2.0", "method": "#);
    let mut bad = h.connect();
    let mut bytes = pretty("echo", 1, json!({"before": "error"}));
    bytes.extend(br#"{"jsonrpc": "2.0", "method" "echo"}"#);
    bad.send(&bytes);
    // What came before the garbage is still answered, in order.
    assert_eq!(result_of(&bad.recv()), &json!({"before": "error"}));
    let reply = bad.recv();
    assert_eq!(reply["id"], Value::Null);
    let (code, message) = error_of(&reply);
    assert_eq!(code, i64::from(PARSE_ERROR));
    assert!(message.starts_with("Parse error: "), "{message}");
    bad.expect_closed();

    let mut good = h.connect();
    assert_eq!(result_of(&good.call("add", json!(1), Some(json!({"a": 1, "b": 2})))), &json!(3));
    h.wait_for_connections(2);
    drop(idle);
    drop(good);
    h.wait_for_connections(0);
}

#[test]
fn unknown_method() {
    let h = start();
    let mut c = h.connect();
    let (code, message) = error_of(&c.call("bdev_nope", json!(1), None));
    assert_eq!(code, i64::from(METHOD_NOT_FOUND));
    assert_eq!(message, "Method not found: bdev_nope");
}

#[test]
fn invalid_request_variants_keep_the_connection() {
    let h = start();
    let mut c = h.connect();
    let cases = [
        (r#"42"#, Value::Null, "expected a request object"),
        (r#""echo""#, Value::Null, "expected a request object"),
        (r#"{"method": "echo", "id": 1}"#, json!(1), "jsonrpc"),
        (r#"{"jsonrpc": "1.0", "method": "echo", "id": 2}"#, json!(2), "jsonrpc"),
        (r#"{"jsonrpc": "2.0", "id": 3}"#, json!(3), "method"),
        (r#"{"jsonrpc": "2.0", "method": 1, "id": 4}"#, json!(4), "method"),
        (r#"{"jsonrpc": "2.0", "method": "echo", "id": {"a": 1}}"#, Value::Null, "id"),
        (r#"{"jsonrpc": "2.0", "method": "echo", "id": true}"#, Value::Null, "id"),
        (r#"{"jsonrpc": "2.0", "method": "echo", "id": 5, "params": "x"}"#, json!(5), "params"),
        (r#"{"jsonrpc": "2.0", "method": "echo", "id": 6, "params": 3}"#, json!(6), "params"),
        // Invalid without an id is still answered: it is not a notification.
        (r#"{"jsonrpc": "2.0", "method": 1}"#, Value::Null, "method"),
    ];
    for (request, id, mentions) in cases {
        c.send(request);
        let reply = c.recv();
        assert_eq!(reply["id"], id, "{request} -> {reply}");
        let (code, message) = error_of(&reply);
        assert_eq!(code, i64::from(INVALID_REQUEST), "{request} -> {reply}");
        assert!(message.starts_with("Invalid request: ") && message.contains(mentions), "{request} -> {message}");
    }
    c.send("[1, 2]");
    let reply = c.recv();
    let replies = reply.as_array().unwrap();
    assert_eq!(replies.len(), 2);
    assert!(replies.iter().all(|r| error_of(r).0 == i64::from(INVALID_REQUEST)));
    assert_eq!(result_of(&c.call("echo", json!(7), Some(json!({})))), &json!({}));
}

#[test]
fn wrong_or_missing_params_are_readable() {
    let h = start();
    let mut c = h.connect();
    let (code, message) = error_of(&c.call("add", json!(1), Some(json!({"a": 1}))));
    assert_eq!(code, i64::from(INVALID_PARAMS));
    assert_eq!(message, "Invalid parameters: missing field `b`");
    let (code, message) = error_of(&c.call("add", json!(2), Some(json!({"a": 1, "b": "two"}))));
    assert_eq!(code, i64::from(INVALID_PARAMS));
    assert!(message.contains("invalid type: string \"two\", expected i64"), "{message}");
    let (code, message) = error_of(&c.call("add", json!(3), None));
    assert_eq!(code, i64::from(INVALID_PARAMS));
    assert_eq!(message, "Invalid parameters: missing field `a`");
    // Unknown keys are refused by name, as SPDK's decoder does.
    let reply = c.call("add", json!(4), Some(json!({"a": 1, "b": 2, "c": 3})));
    let (code, message) = error_of(&reply);
    assert_eq!(code, i64::from(INVALID_PARAMS));
    assert_eq!(message, "add: unknown parameter 'c'");
}

#[test]
fn errno_errors_pass_through() {
    let h = start();
    let mut c = h.connect();
    let (code, message) = error_of(&c.call("exists", json!(1), None));
    assert_eq!(code, -17);
    assert_eq!(message, "bdev Malloc0 already exists");
}

#[test]
fn dropped_reply_answers_internal_error() {
    let h = start();
    let mut c = h.connect();
    let (code, message) = error_of(&c.call("forget", json!(1), None));
    assert_eq!(code, i64::from(INTERNAL_ERROR));
    assert!(message.contains("request dropped without a reply"), "{message}");
    assert_eq!(result_of(&c.call("echo", json!(2), None)), &Value::Null);
}

#[test]
fn cut_off_mid_request_gets_parse_error() {
    let h = start();
    let mut c = h.connect();
    let partial = br#"{"jsonrpc": "2.0", "method": "echo", "id": 1,"#;
    c.send(partial);
    c.stream.shutdown(Shutdown::Write).unwrap();
    let reply = c.recv();
    assert_eq!(reply["id"], Value::Null);
    let (code, message) = error_of(&reply);
    assert_eq!(code, i64::from(PARSE_ERROR));
    assert_eq!(message, format!("Parse error: request cut off after {} bytes", partial.len()));
    c.expect_closed();
}

#[test]
fn half_close_after_complete_requests_gets_all_replies() {
    let h = start();
    let mut c = h.connect();
    let mut bytes = pretty("later", 1, json!({"delay_ms": 20, "value": "slow"}));
    bytes.extend(pretty("echo", 2, json!(["fast"])));
    bytes.extend(b"\n  ");
    c.send(&bytes);
    c.stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(result_of(&c.recv()), &json!("slow"));
    assert_eq!(result_of(&c.recv()), &json!(["fast"]));
    c.expect_closed();
}

#[test]
fn async_reply_holds_later_replies_in_order() {
    let h = start();
    let mut c = h.connect();
    let mut bytes = pretty("later", 1, json!({"delay_ms": 30, "value": "first"}));
    bytes.extend(pretty("echo", 2, json!(["second"])));
    bytes.extend(
        br#"[{"jsonrpc":"2.0","method":"later","id":3,"params":{"delay_ms":20,"value":"a"}},
             {"jsonrpc":"2.0","method":"echo","id":4,"params":["b"]},
             {"jsonrpc":"2.0","method":"later","id":5,"params":{"delay_ms":1,"value":"c"}}]"#,
    );
    bytes.extend(pretty("echo", 6, json!(["last"])));
    c.send(&bytes);
    let first = c.recv();
    assert_eq!((first["id"].clone(), result_of(&first).clone()), (json!(1), json!("first")));
    let second = c.recv();
    assert_eq!((second["id"].clone(), result_of(&second).clone()), (json!(2), json!(["second"])));
    let batch = c.recv();
    let ids: Vec<_> = batch.as_array().unwrap().iter().map(|r| r["id"].clone()).collect();
    let results: Vec<_> = batch.as_array().unwrap().iter().map(|r| result_of(r).clone()).collect();
    assert_eq!(ids, vec![json!(3), json!(4), json!(5)]);
    assert_eq!(results, vec![json!("a"), json!(["b"]), json!("c")]);
    assert_eq!(c.recv()["id"], 6);
}

#[test]
fn slow_reply_on_one_connection_does_not_hold_another() {
    let h = start();
    let mut slow = h.connect();
    slow.send(pretty("later", 1, json!({"delay_ms": 1000, "value": "slow"})));
    let mut fast = h.connect();
    let started = Instant::now();
    assert_eq!(result_of(&fast.call("echo", json!(1), Some(json!(["fast"])))), &json!(["fast"]));
    assert!(started.elapsed() < Duration::from_millis(1000), "fast client waited for the slow one");
    assert_eq!(result_of(&slow.recv()), &json!("slow"));
}

#[test]
fn client_hanging_up_with_a_reply_pending_is_reaped() {
    let h = start();
    {
        let mut c = h.connect();
        c.send(pretty("later", 1, json!({"delay_ms": 20, "value": "nobody listens"})));
        h.wait_for_connections(1);
    }
    h.wait_for_connections(0);
    let mut c = h.connect();
    assert_eq!(result_of(&c.call("echo", json!(1), None)), &Value::Null);
    // Let the orphaned reply arrive and be discarded while we are connected.
    thread::sleep(Duration::from_millis(30));
    assert_eq!(result_of(&c.call("echo", json!(2), None)), &Value::Null);
}

#[test]
fn many_clients_at_once() {
    let h = start();
    let clients: Vec<_> = (0..8)
        .map(|client| {
            let path = h.path.clone();
            thread::spawn(move || {
                let mut c = Client::connect(&path);
                for i in 0..25i64 {
                    let reply = c.call("add", json!(i), Some(json!({"a": client, "b": i})));
                    assert_eq!(result_of(&reply), &json!(client + i));
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
}

#[test]
fn client_that_never_reads_does_not_stall_others() {
    let h = start();
    let flood = h.connect();
    let mut writer = flood.stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let big = "x".repeat(64 * 1024);
        for id in 0..200u64 {
            // Blocks once the server stops taking this client's requests;
            // fails once the test shuts the socket down.
            if writer.write_all(&pretty("echo", id, json!([big]))).is_err() {
                break;
            }
        }
    });
    let mut polite = h.connect();
    for id in 0..20 {
        assert_eq!(result_of(&polite.call("add", json!(id), Some(json!({"a": id, "b": 1})))), &json!(id + 1));
    }
    flood.stream.shutdown(Shutdown::Both).unwrap();
    sender.join().unwrap();
    drop(flood);
    drop(polite);
    h.wait_for_connections(0);
}

#[test]
fn connections_beyond_the_limit_are_refused() {
    let h = start();
    let mut clients: Vec<Client> = (0..MAX_CONNECTIONS).map(|_| h.connect()).collect();
    h.wait_for_connections(MAX_CONNECTIONS);
    let mut extra = h.connect();
    let (code, message) = error_of(&extra.recv());
    assert_eq!(code, i64::from(INTERNAL_ERROR));
    assert!(message.contains("too many connections"), "{message}");
    extra.expect_closed();
    // Everyone admitted is still served, and a freed place can be taken.
    assert_eq!(result_of(&clients[0].call("echo", json!(1), None)), &Value::Null);
    clients.pop();
    h.wait_for_connections(MAX_CONNECTIONS - 1);
    let mut late = h.connect();
    assert_eq!(result_of(&late.call("echo", json!(2), None)), &Value::Null);
}

#[test]
fn oversized_request_closes_the_connection() {
    let h = start();
    let mut c = h.connect();
    let mut writer = c.stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let _ = writer.write_all(br#"{"jsonrpc":"2.0","method":"echo","id":1,"params":{"s":""#);
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..(MAX_REQUEST_BYTES >> 20) + 2 {
            // Fails with EPIPE once the server has given up on us.
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let reply = c.recv();
    let (code, message) = error_of(&reply);
    assert_eq!(code, i64::from(PARSE_ERROR));
    assert!(message.contains(&format!("larger than {MAX_REQUEST_BYTES} bytes")), "{message}");
    c.expect_closed();
    sender.join().unwrap();
    let mut other = h.connect();
    assert_eq!(result_of(&other.call("echo", json!(1), None)), &Value::Null);
}

/// Drives `server` on this thread until `client` has one whole reply line.
fn poll_until_reply(server: &mut RpcServer, methods: &dyn Dispatch, client: &mut Client) -> (Vec<u8>, usize) {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    client.stream.set_nonblocking(true).unwrap();
    let mut reply = Vec::new();
    let mut busy_polls = 0;
    while !reply.ends_with(b"\n") {
        assert!(Instant::now() < deadline, "no reply");
        busy_polls += usize::from(server.poll(methods));
        let mut buf = [0u8; 256];
        match client.stream.read(&mut buf) {
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
    client.stream.set_nonblocking(false).unwrap();
    (reply, busy_polls)
}

#[test]
fn poll_reports_whether_it_did_anything() {
    let dir = TempDir::new();
    let mut server = RpcServer::bind(&dir.socket()).unwrap();
    assert_eq!(server.path(), dir.socket());
    let methods = TestMethods::default();
    assert!(!server.poll(&methods), "nothing to do yet");
    let mut c = Client::connect(&dir.socket());
    c.send(pretty("echo", 1, json!({})));
    let (reply, busy_polls) = poll_until_reply(&mut server, &methods, &mut c);
    assert!(busy_polls > 0);
    assert_eq!(reply, b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n");
    assert!(!server.poll(&methods), "idle again once the reply is out");
    drop(c);
    assert!(server.poll(&methods), "reaping a closed connection is work");
    assert_eq!(server.connection_count(), 0);
}

#[test]
fn socket_is_owner_only() {
    let h = start();
    let mode = fs::metadata(&h.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    // No staging directory is left next to it.
    let entries: Vec<_> = fs::read_dir(h.path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, vec![h.path.file_name().unwrap().to_owned()]);
}

#[test]
fn long_socket_path_is_owner_only_too() {
    let dir = TempDir::new();
    // The longest path sockaddr_un takes (107 bytes and a NUL): no room for
    // the private staging directory, so bind takes its fallback.
    let name_len = 107 - dir.0.as_os_str().len() - "/".len() - "/rpc.sock".len();
    let parent = dir.0.join("d".repeat(name_len));
    fs::create_dir(&parent).unwrap();
    let path = parent.join("rpc.sock");
    assert_eq!(path.as_os_str().len(), 107);
    let server = RpcServer::bind(&path).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    drop(server);
    assert!(!path.exists());
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = TempDir::new();
    let path = dir.socket();
    drop(UnixListener::bind(&path).unwrap());
    assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
    let mut server = RpcServer::bind(&path).expect("stale socket is replaced");
    let mut c = Client::connect(&path);
    c.send(pretty("echo", 1, json!([1])));
    let (reply, _) = poll_until_reply(&mut server, &TestMethods::default(), &mut c);
    assert_eq!(reply, b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":[1]}\n");
}

#[test]
fn something_else_at_the_path_is_left_alone() {
    let dir = TempDir::new();
    let path = dir.socket();
    fs::write(&path, b"precious").unwrap();
    let error = RpcServer::bind(&path).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::AlreadyExists, "{error}");
    assert_eq!(fs::read(&path).unwrap(), b"precious");
}

#[test]
fn second_bind_on_a_live_socket_fails() {
    let h = start();
    let error = RpcServer::bind(&h.path).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::AddrInUse, "{error}");
    // The failed attempt left the live server's socket in place and working.
    let mut c = h.connect();
    assert_eq!(result_of(&c.call("echo", json!(1), None)), &Value::Null);
}

#[test]
fn drop_removes_the_socket_file() {
    let dir = TempDir::new();
    let path = dir.socket();
    let server = RpcServer::bind(&path).unwrap();
    assert!(path.exists());
    drop(server);
    assert!(!path.exists());
    // A path reused by someone else after we went away is not ours to remove.
    let server = RpcServer::bind(&path).unwrap();
    fs::remove_file(&path).unwrap();
    fs::write(&path, b"other").unwrap();
    drop(server);
    assert_eq!(fs::read(&path).unwrap(), b"other");
}

#[test]
fn reply_channel_serves_callers_without_a_socket() {
    let methods = TestMethods::default();
    let (reply, results) = Reply::channel();
    methods.call("later", Some(json!({"delay_ms": 1, "value": 4})), reply);
    assert_eq!(results.recv_timeout(REPLY_TIMEOUT).unwrap(), Ok(json!(4)));
}

// --- SPDK client captures -------------------------------------------------

/// The recorded bytes live in the repository (`tests/fixtures/spdk-rpc-wire/`,
/// see its README), so every clone replays the same captures.
fn captures_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spdk-rpc-wire");
    assert!(dir.is_dir(), "{} is missing from the checkout", dir.display());
    dir
}

/// (name, request bytes, response bytes) for every captured call, in order.
fn captures(dir: &Path) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".request.raw").map(str::to_owned))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no captures in {}", dir.display());
    names
        .into_iter()
        .map(|name| {
            let request = fs::read(dir.join(format!("{name}.request.raw"))).unwrap();
            let response = fs::read(dir.join(format!("{name}.response.raw"))).unwrap();
            (name, request, response)
        })
        .collect()
}

/// The methods a capture's requests call: the file names the method, except
/// for commands the client assembles from several calls.
fn expected_methods(name: &str, count: usize) -> Vec<String> {
    let command = name.split_once('_').map_or(name, |(_, rest)| rest);
    match command {
        "save_config" => std::iter::once("framework_get_subsystems".to_owned())
            .chain(std::iter::repeat("framework_get_config".to_owned()))
            .take(count)
            .collect(),
        _ => vec![command.to_owned(); count],
    }
}

fn decode_all(bytes: &[u8]) -> Vec<Value> {
    let mut decoder = StreamDecoder::new(MAX_REQUEST_BYTES);
    decoder.push(bytes);
    let mut values = Vec::new();
    loop {
        match decoder.next_value(true) {
            Decoded::Value(value) => values.push(value),
            Decoded::NeedMore => return values,
            Decoded::Fatal(error) => panic!("{error}"),
        }
    }
}

fn captured_responses(bytes: &[u8]) -> Vec<(Vec<u8>, Response)> {
    assert!(bytes.ends_with(b"\n"));
    bytes
        .split_inclusive(|b| *b == b'\n')
        .map(|line| {
            let value: Value = serde_json::from_slice(line).unwrap();
            let outcome = match value.get("error") {
                Some(error) => Err(RpcError::new(
                    i32::try_from(error["code"].as_i64().unwrap()).unwrap(),
                    error["message"].as_str().unwrap(),
                )),
                None => Ok(value["result"].clone()),
            };
            (line.to_vec(), Response { id: value["id"].clone(), outcome })
        })
        .collect()
}

#[test]
fn spdk_client_requests_parse_as_valid_requests() {
    let dir = captures_dir();
    for (name, request_bytes, response_bytes) in captures(&dir) {
        // Exactly what the client writes: pretty-printed, no newline at the end.
        assert!(!request_bytes.ends_with(b"\n"), "{name}");
        let values = decode_all(&request_bytes);
        let methods = expected_methods(&name, values.len());
        assert_eq!(values.len(), captured_responses(&response_bytes).len(), "{name}");
        for (index, value) in values.into_iter().enumerate() {
            let request = match parse_message(value) {
                Message::Single(Ok(request)) => request,
                other => panic!("{name}: request {index} is not one valid request: {other:?}"),
            };
            assert_eq!(request.method, methods[index], "{name}");
            assert_eq!(request.id, Some(json!(index + 1)), "{name}: ids count from 1 per connection");
            assert!(matches!(request.params, None | Some(Value::Object(_))), "{name}");
        }
    }
}

#[test]
fn spdk_responses_encode_byte_for_byte() {
    let dir = captures_dir();
    for (name, _, response_bytes) in captures(&dir) {
        for (line, response) in captured_responses(&response_bytes) {
            let mut ours = Vec::new();
            encode_response(&response, &mut ours);
            // serde_json sorts object keys where SPDK keeps insertion order,
            // so only replies without objects in their result compare as bytes.
            let plain = !matches!(&response.outcome, Ok(Value::Object(_) | Value::Array(_)));
            if plain {
                assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&line), "{name}");
            } else {
                let ours_value: Value = serde_json::from_slice(&ours).unwrap();
                let theirs: Value = serde_json::from_slice(&line).unwrap();
                assert_eq!(ours_value, theirs, "{name}");
                assert!(ours.starts_with(b"{\"jsonrpc\":\"2.0\",\"id\":") && ours.ends_with(b"}\n"), "{name}");
            }
        }
    }
}

/// Answers each call with the next captured outcome, as nvmf_tgt did.
#[derive(Default)]
struct Replay {
    outcomes: Mutex<VecDeque<RpcResult>>,
}

impl Dispatch for Replay {
    fn call(&self, _method: &str, _params: Option<Value>, reply: Reply) {
        let outcome = self.outcomes.lock().unwrap().pop_front();
        reply.send(outcome.unwrap_or_else(|| Err(RpcError::internal("capture has no more replies"))));
    }
}

#[test]
fn spdk_client_conversations_replay_through_the_server() {
    let dir = captures_dir();
    let h = start_with(Replay::default());
    for (name, request_bytes, response_bytes) in captures(&dir) {
        let expected = captured_responses(&response_bytes);
        h.methods.outcomes.lock().unwrap().extend(expected.iter().map(|(_, r)| r.outcome.clone()));
        // One connection per spdk-rpc call, as the client does.
        let mut c = h.connect();
        c.send(&request_bytes);
        for (line, _) in &expected {
            let reply = c.recv();
            let theirs: Value = serde_json::from_slice(line).unwrap();
            assert_eq!(reply, theirs, "{name}");
        }
    }
    assert!(h.methods.outcomes.lock().unwrap().is_empty());
}
