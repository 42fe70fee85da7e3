//! JSON-RPC 2.0 protocol core: splitting a byte stream into JSON values, request validation, response encoding, error codes and typed parameters.
//!
//! Nothing here touches a socket, so the same code serves the Unix-socket
//! server, config loading and tests. Every function takes untrusted bytes or
//! values and answers with an [`RpcError`] rather than panicking.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

/// The only protocol version accepted or sent.
pub const JSONRPC_VERSION: &str = "2.0";

/// Invalid JSON; the stream cannot be resynchronised after it.
pub const PARSE_ERROR: i32 = -32700;
/// Valid JSON that is not a request object.
pub const INVALID_REQUEST: i32 = -32600;
pub const METHOD_NOT_FOUND: i32 = -32601;
pub const INVALID_PARAMS: i32 = -32602;
pub const INTERNAL_ERROR: i32 = -32603;

/// A batch larger than this is refused as a whole: its elements are dispatched
/// in one go and each holds a reply slot, so an unbounded batch would be
/// unbounded work in one reactor tick.
pub const MAX_BATCH_LEN: usize = 256;

/// The error member of a response: a JSON-RPC code or a negative errno, and a
/// message for the person at the other end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    pub code: i32,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    pub fn parse(detail: impl fmt::Display) -> Self {
        Self::new(PARSE_ERROR, format!("Parse error: {detail}"))
    }

    pub fn invalid_request(detail: impl fmt::Display) -> Self {
        Self::new(INVALID_REQUEST, format!("Invalid request: {detail}"))
    }

    pub fn method_not_found(name: &str) -> Self {
        Self::new(METHOD_NOT_FOUND, format!("Method not found: {name}"))
    }

    pub fn invalid_params(detail: impl fmt::Display) -> Self {
        Self::new(INVALID_PARAMS, format!("Invalid parameters: {detail}"))
    }

    /// -32602 for keys the method does not know; `keys` are paths such as
    /// `superblok` or `namespace.eui46`.
    pub fn unknown_parameters(method: &str, keys: &[String]) -> Self {
        let quoted: Vec<String> = keys.iter().map(|k| format!("'{k}'")).collect();
        let noun = if keys.len() == 1 { "parameter" } else { "parameters" };
        Self::new(INVALID_PARAMS, format!("{method}: unknown {noun} {}", quoted.join(", ")))
    }

    pub fn internal(detail: impl fmt::Display) -> Self {
        Self::new(INTERNAL_ERROR, format!("Internal error: {detail}"))
    }

    /// An errno-style failure as SPDK reports it: `code` is `-errno`.
    /// `errno` is meant to be positive (`libc::EEXIST`); a negative one is
    /// taken as already negated, so both spellings give the same wire code.
    pub fn errno(errno: i32, message: impl Into<String>) -> Self {
        let code = if errno > 0 { -errno } else { errno };
        Self::new(code, message)
    }
}

pub type RpcResult = Result<Value, RpcError>;

/// Decodes `params` of `method` into a typed struct, strictly.
///
/// A key that `T` does not know gets -32602 naming the key and the method
/// ("bdev_raid_create: unknown parameter 'superblok'"), as SPDK's decoder
/// rejects unknown keys: a misspelt option silently ignored is how a user
/// ends up without the feature while believing it is on. Keys SPDK defines
/// for features nvraid lacks are refused before this, by the method table
/// (see `methods::unsupported`). Missing or wrongly typed fields give -32602
/// with serde's own wording ("Invalid parameters: missing field `name`").
/// Absent params decode as an empty object, so a struct whose fields all
/// have defaults works with or without params.
pub fn decode_params<T: DeserializeOwned>(method: &str, params: Option<Value>) -> Result<T, RpcError> {
    let value = params.unwrap_or_else(|| Value::Object(Map::new()));
    let mut unknown = Vec::new();
    let decoded = serde_ignored::deserialize(value, |path| unknown.push(path.to_string()));
    if !unknown.is_empty() {
        return Err(RpcError::unknown_parameters(method, &unknown));
    }
    decoded.map_err(RpcError::invalid_params)
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `None` when the request had no `id` member at all: a notification,
    /// which is executed but never answered. A present `id` is a number, a
    /// string or null, kept exactly as sent so the reply can echo it.
    pub id: Option<Value>,
    pub method: String,
    /// An object or an array when present.
    pub params: Option<Value>,
}

impl Request {
    pub fn is_notification(&self) -> bool {
        self.id.is_none()
    }
}

/// One response object. Serialises as SPDK writes it: `jsonrpc`, `id`, then
/// `result` or `error`, compact.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub id: Value,
    pub outcome: RpcResult,
}

impl Serialize for Response {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("jsonrpc", JSONRPC_VERSION)?;
        map.serialize_entry("id", &self.id)?;
        match &self.outcome {
            Ok(result) => map.serialize_entry("result", result)?,
            Err(error) => map.serialize_entry("error", &ErrorObject(error))?,
        }
        map.end()
    }
}

struct ErrorObject<'a>(&'a RpcError);

impl Serialize for ErrorObject<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("code", &self.0.code)?;
        map.serialize_entry("message", &self.0.message)?;
        map.end()
    }
}

/// One element of what a top-level JSON value asks for: a request to
/// dispatch, or an error reply that is ready already (the element was not a
/// valid request; such elements are always answered, even without an id).
pub type Entry = Result<Request, Response>;

/// What a top-level JSON value from the stream turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Single(Entry),
    /// A non-empty batch, elements in request order. Its reply is one array
    /// holding the replies of the non-notification elements, in that order.
    Batch(Vec<Entry>),
}

/// Classifies one top-level value. Never fails: anything unusable becomes a
/// ready -32600 reply.
pub fn parse_message(value: Value) -> Message {
    match value {
        Value::Array(elements) => {
            if elements.is_empty() {
                Message::Single(Err(error_response(Value::Null, RpcError::invalid_request("empty batch"))))
            } else if elements.len() > MAX_BATCH_LEN {
                let error = RpcError::invalid_request(format_args!(
                    "batch of {} requests is larger than the limit of {MAX_BATCH_LEN}",
                    elements.len()
                ));
                Message::Single(Err(error_response(Value::Null, error)))
            } else {
                Message::Batch(elements.into_iter().map(validate_request).collect())
            }
        }
        other => Message::Single(validate_request(other)),
    }
}

fn error_response(id: Value, error: RpcError) -> Response {
    Response { id, outcome: Err(error) }
}

/// Checks one request object. The reply to an invalid request echoes its id
/// when the id itself is usable (JSON-RPC says null, but a client matching
/// replies by id is better served by its own id), else null.
pub fn validate_request(value: Value) -> Entry {
    let mut object = match value {
        Value::Object(object) => object,
        other => {
            let error = RpcError::invalid_request(format_args!("expected a request object, got {}", kind_of(&other)));
            return Err(error_response(Value::Null, error));
        }
    };
    let id = match object.remove("id") {
        None => None,
        Some(id @ (Value::Number(_) | Value::String(_) | Value::Null)) => Some(id),
        Some(other) => {
            let error = RpcError::invalid_request(format_args!(
                "\"id\" must be a number, a string or null, got {}",
                kind_of(&other)
            ));
            return Err(error_response(Value::Null, error));
        }
    };
    let reply_id = id.clone().unwrap_or(Value::Null);
    let fail = |detail: String| Err(error_response(reply_id.clone(), RpcError::invalid_request(detail)));
    match object.get("jsonrpc") {
        Some(Value::String(version)) if version == JSONRPC_VERSION => {}
        Some(other) => return fail(format!("\"jsonrpc\" must be \"{JSONRPC_VERSION}\", got {other}")),
        None => return fail(format!("missing member \"jsonrpc\" (must be \"{JSONRPC_VERSION}\")")),
    }
    let method = match object.remove("method") {
        Some(Value::String(method)) => method,
        Some(other) => return fail(format!("\"method\" must be a string, got {}", kind_of(&other))),
        None => return fail("missing member \"method\"".to_owned()),
    };
    let params = match object.remove("params") {
        None => None,
        Some(params @ (Value::Object(_) | Value::Array(_))) => Some(params),
        Some(other) => return fail(format!("\"params\" must be an object or an array, got {}", kind_of(&other))),
    };
    Ok(Request { id, method, params })
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Appends one response and its terminating newline.
pub fn encode_response(response: &Response, out: &mut Vec<u8>) {
    encode(response, out);
    out.push(b'\n');
}

/// Appends a batch reply (`[r1,r2,...]`) and its terminating newline.
pub fn encode_batch(responses: &[Response], out: &mut Vec<u8>) {
    encode(responses, out);
    out.push(b'\n');
}

fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    let start = out.len();
    if let Err(error) = serde_json::to_writer(&mut *out, value) {
        // Writing a `Value` into a Vec cannot fail today; if serde ever does,
        // the client still gets a well-formed answer instead of half a line.
        out.truncate(start);
        let fallback = error_response(Value::Null, RpcError::internal(format_args!("cannot encode reply: {error}")));
        let _ = serde_json::to_writer(&mut *out, &fallback);
    }
}

/// Result of asking a [`StreamDecoder`] for the next value.
#[derive(Debug)]
pub enum Decoded {
    Value(Value),
    /// No complete value is buffered yet (or nothing at all).
    NeedMore,
    /// The stream is unusable from here on: answer with this -32700 error and
    /// close, because there is no way to find where the next value starts.
    Fatal(RpcError),
}

/// Splits a byte stream of concatenated JSON values (no length prefix, no
/// newline framing: what SPDK's client sends) into values.
///
/// serde_json's streaming deserializer does the parsing. Re-running it over a
/// partial value after every read would be quadratic for a large request
/// arriving in many pieces, so a cheap incremental scan (`Framer`) tracks
/// nesting and strings and serde is run again only when the scan sees a value
/// close, or while the partial value is small enough that retrying is cheap
/// (which also reports garbage at once instead of when the peer gives up).
#[derive(Debug)]
pub struct StreamDecoder {
    buf: Vec<u8>,
    /// Bytes before this offset are consumed; compacted before each read.
    start: usize,
    framer: Framer,
    /// The unconsumed bytes have changed since serde last said "incomplete".
    fresh: bool,
    max_value_bytes: usize,
    /// Times serde was run, to test that framing keeps parsing linear.
    parse_attempts: u64,
}

/// Partial values up to this size are re-parsed on every read.
const EAGER_PARSE_BYTES: usize = 8 * 1024;

impl StreamDecoder {
    /// `max_value_bytes`: more than this buffered without a complete value is
    /// a fatal error, which bounds the memory one connection can pin.
    pub fn new(max_value_bytes: usize) -> Self {
        Self { buf: Vec::new(), start: 0, framer: Framer::default(), fresh: false, max_value_bytes, parse_attempts: 0 }
    }

    /// Bytes received and not yet returned as values.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether reading more is useful; false once a whole limit's worth is
    /// buffered, so a peer that outpaces the dispatcher waits in its socket.
    pub fn wants_input(&self) -> bool {
        self.buffered_bytes() <= self.max_value_bytes
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
        self.fresh |= !bytes.is_empty();
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    /// The next complete value, if any. `peer_eof`: no more bytes will come,
    /// so a partial value is now an error rather than a reason to wait.
    pub fn next_value(&mut self, peer_eof: bool) -> Decoded {
        let pending = &self.buf[self.start..];
        if pending.is_empty() {
            return Decoded::NeedMore;
        }
        let worth_parsing = peer_eof
            || match self.framer.scan(pending) {
                Frame::Complete => true,
                Frame::Unknown => self.fresh,
                Frame::Incomplete => self.fresh && pending.len() <= EAGER_PARSE_BYTES,
            };
        if !worth_parsing {
            return self.incomplete(peer_eof);
        }
        self.parse_attempts += 1;
        let mut values = serde_json::Deserializer::from_slice(pending).into_iter::<Value>();
        match values.next() {
            None => {
                // Only whitespace was left.
                self.start = self.buf.len();
                self.framer = Framer::default();
                self.fresh = false;
                Decoded::NeedMore
            }
            Some(Ok(value)) => {
                self.start += values.byte_offset();
                self.framer = Framer::default();
                // What follows has never been offered to serde.
                self.fresh = true;
                Decoded::Value(value)
            }
            Some(Err(error)) if error.is_eof() => {
                self.fresh = false;
                self.incomplete(peer_eof)
            }
            Some(Err(error)) => Decoded::Fatal(RpcError::parse(error)),
        }
    }

    fn incomplete(&self, peer_eof: bool) -> Decoded {
        let pending = self.buffered_bytes();
        if peer_eof {
            Decoded::Fatal(RpcError::parse(format_args!("request cut off after {pending} bytes")))
        } else if pending > self.max_value_bytes {
            Decoded::Fatal(RpcError::parse(format_args!("request larger than {} bytes", self.max_value_bytes)))
        } else {
            Decoded::NeedMore
        }
    }
}

/// Incremental scan for the end of the first top-level value. It only decides
/// when serde is worth running; serde alone decides what is valid.
#[derive(Debug, Default)]
struct Framer {
    /// Bytes of the pending value already looked at.
    scanned: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// A top-level object, array or string has closed.
    Complete,
    /// Still inside one.
    Incomplete,
    /// A top-level scalar or stray byte: its end cannot be seen without
    /// parsing, and it is short or garbage, so let serde look.
    Unknown,
}

impl Framer {
    fn scan(&mut self, pending: &[u8]) -> Frame {
        while let Some(&byte) = pending.get(self.scanned) {
            self.scanned += 1;
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if byte == b'\\' {
                    self.escaped = true;
                } else if byte == b'"' {
                    self.in_string = false;
                    if self.depth == 0 {
                        return Frame::Complete;
                    }
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => match self.depth {
                    0 => return Frame::Unknown,
                    1 => {
                        self.depth = 0;
                        return Frame::Complete;
                    }
                    _ => self.depth -= 1,
                },
                b' ' | b'\t' | b'\n' | b'\r' => {}
                _ if self.depth == 0 => return Frame::Unknown,
                _ => {}
            }
        }
        Frame::Incomplete
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    fn request(value: Value) -> Request {
        match parse_message(value) {
            Message::Single(Ok(request)) => request,
            other => panic!("expected a valid single request, got {other:?}"),
        }
    }

    fn invalid(value: Value) -> Response {
        match parse_message(value) {
            Message::Single(Err(response)) => response,
            other => panic!("expected an invalid request, got {other:?}"),
        }
    }

    #[test]
    fn valid_request_keeps_id_method_params() {
        let r = request(json!({"jsonrpc": "2.0", "method": "m", "id": 7, "params": {"a": 1}}));
        assert_eq!(r.id, Some(json!(7)));
        assert_eq!(r.method, "m");
        assert_eq!(r.params, Some(json!({"a": 1})));
        let r = request(json!({"jsonrpc": "2.0", "method": "m", "id": "abc", "params": [1, 2]}));
        assert_eq!(r.id, Some(json!("abc")));
        let r = request(json!({"jsonrpc": "2.0", "method": "m", "id": null}));
        assert_eq!(r.id, Some(Value::Null));
        assert!(!r.is_notification());
        let r = request(json!({"jsonrpc": "2.0", "method": "m"}));
        assert!(r.is_notification());
        assert_eq!(r.params, None);
    }

    #[test]
    fn invalid_requests_get_32600_with_a_reason() {
        let cases = [
            (json!(42), Value::Null, "expected a request object, got a number"),
            (json!("x"), Value::Null, "got a string"),
            (json!({"method": "m", "id": 1}), json!(1), "missing member \"jsonrpc\""),
            (json!({"jsonrpc": "1.0", "method": "m", "id": 1}), json!(1), "\"jsonrpc\" must be \"2.0\""),
            (json!({"jsonrpc": 2.0, "method": "m", "id": 1}), json!(1), "\"jsonrpc\" must be \"2.0\""),
            (json!({"jsonrpc": "2.0", "id": 1}), json!(1), "missing member \"method\""),
            (json!({"jsonrpc": "2.0", "method": 5, "id": 1}), json!(1), "\"method\" must be a string"),
            (json!({"jsonrpc": "2.0", "method": "m", "id": [1]}), Value::Null, "\"id\" must be"),
            (json!({"jsonrpc": "2.0", "method": "m", "id": {}}), Value::Null, "\"id\" must be"),
            (json!({"jsonrpc": "2.0", "method": "m", "id": 3, "params": 1}), json!(3), "\"params\" must be"),
            (json!({"jsonrpc": "2.0", "method": "m", "id": 3, "params": null}), json!(3), "\"params\" must be"),
            (json!({"jsonrpc": "2.0", "method": "m", "params": "s"}), Value::Null, "\"params\" must be"),
            (json!([]), Value::Null, "empty batch"),
        ];
        for (value, id, text) in cases {
            let response = invalid(value.clone());
            assert_eq!(response.id, id, "{value}");
            let error = response.outcome.unwrap_err();
            assert_eq!(error.code, INVALID_REQUEST, "{value}");
            assert!(error.message.starts_with("Invalid request: "), "{}", error.message);
            assert!(error.message.contains(text), "{value}: {}", error.message);
        }
    }

    #[test]
    fn batch_elements_are_validated_independently() {
        let message = parse_message(json!([
            {"jsonrpc": "2.0", "method": "a", "id": 1},
            7,
            {"jsonrpc": "2.0", "method": "b"},
        ]));
        let Message::Batch(entries) = message else { panic!("not a batch") };
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].as_ref().unwrap().method, "a");
        assert_eq!(entries[1].as_ref().unwrap_err().outcome.as_ref().unwrap_err().code, INVALID_REQUEST);
        assert!(entries[2].as_ref().unwrap().is_notification());
    }

    #[test]
    fn oversized_batch_is_refused_whole() {
        let element = json!({"jsonrpc": "2.0", "method": "a", "id": 1});
        let response = invalid(Value::Array(vec![element; MAX_BATCH_LEN + 1]));
        assert!(response.outcome.unwrap_err().message.contains("larger than the limit"));
    }

    #[test]
    fn responses_encode_like_spdk() {
        let mut out = Vec::new();
        encode_response(&Response { id: json!(1), outcome: Ok(json!(true)) }, &mut out);
        assert_eq!(out, b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":true}\n");
        out.clear();
        let error = RpcError::errno(libc::ENODEV, "No such device");
        encode_response(&Response { id: json!("x"), outcome: Err(error) }, &mut out);
        assert_eq!(
            out,
            b"{\"jsonrpc\":\"2.0\",\"id\":\"x\",\"error\":{\"code\":-19,\"message\":\"No such device\"}}\n"
        );
        out.clear();
        let responses =
            [Response { id: json!(1), outcome: Ok(json!(1)) }, Response { id: json!(2), outcome: Ok(Value::Null) }];
        encode_batch(&responses, &mut out);
        assert_eq!(
            out,
            b"[{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":1},{\"jsonrpc\":\"2.0\",\"id\":2,\"result\":null}]\n"
        );
    }

    #[test]
    fn error_constructors() {
        assert_eq!(RpcError::errno(libc::EEXIST, "x").code, -17);
        assert_eq!(RpcError::errno(-libc::EBUSY, "x").code, -16);
        assert_eq!(RpcError::method_not_found("foo").message, "Method not found: foo");
        assert_eq!(RpcError::parse("bad").code, PARSE_ERROR);
        assert_eq!(RpcError::internal("x").code, INTERNAL_ERROR);
        assert_eq!(RpcError::invalid_params("x").code, INVALID_PARAMS);
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Create {
        name: String,
        #[serde(default)]
        size_mib: u64,
    }

    #[test]
    fn decode_params_reports_readably_and_rejects_unknown_keys() {
        let ok: Create = decode_params("m", Some(json!({"name": "M0", "size_mib": 4}))).unwrap();
        assert_eq!(ok, Create { name: "M0".into(), size_mib: 4 });

        let unknown = decode_params::<Create>("bdev_x_create", Some(json!({"name": "M0", "extra": [1]}))).unwrap_err();
        assert_eq!(unknown.code, INVALID_PARAMS);
        assert_eq!(unknown.message, "bdev_x_create: unknown parameter 'extra'");
        // A misspelt required key: the unknown key explains the missing one.
        let typo = decode_params::<Create>("m", Some(json!({"nmae": "M0", "size_mb": 4}))).unwrap_err();
        assert_eq!(typo.message, "m: unknown parameters 'nmae', 'size_mb'");

        #[derive(Debug, Deserialize)]
        struct Outer {
            #[serde(rename = "namespace")]
            _namespace: Create,
        }
        let nested = decode_params::<Outer>("m", Some(json!({"namespace": {"name": "a", "eui46": "x"}}))).unwrap_err();
        assert_eq!(nested.message, "m: unknown parameter 'namespace.eui46'");

        let missing = decode_params::<Create>("m", Some(json!({"size_mib": 4}))).unwrap_err();
        assert_eq!(missing.code, INVALID_PARAMS);
        assert_eq!(missing.message, "Invalid parameters: missing field `name`");

        let wrong = decode_params::<Create>("m", Some(json!({"name": "a", "size_mib": "big"}))).unwrap_err();
        assert_eq!(wrong.code, INVALID_PARAMS);
        assert!(wrong.message.contains("invalid type: string \"big\""), "{}", wrong.message);

        let absent = decode_params::<Create>("m", None).unwrap_err();
        assert_eq!(absent.message, "Invalid parameters: missing field `name`");

        #[derive(Debug, Deserialize)]
        struct AllDefault {
            #[serde(default)]
            _verbose: bool,
        }
        decode_params::<AllDefault>("m", None).unwrap();
        let e = decode_params::<AllDefault>("m", Some(json!({"verbose": true}))).unwrap_err();
        assert_eq!(e.message, "m: unknown parameter 'verbose'");
    }

    fn drain(decoder: &mut StreamDecoder, eof: bool) -> (Vec<Value>, Option<RpcError>) {
        let mut values = Vec::new();
        loop {
            match decoder.next_value(eof) {
                Decoded::Value(value) => values.push(value),
                Decoded::NeedMore => return (values, None),
                Decoded::Fatal(error) => return (values, Some(error)),
            }
        }
    }

    const STREAM: &str = "{\n  \"jsonrpc\": \"2.0\",\n  \"method\": \"a\\\"}\",\n  \"id\": 1\n}\
                          [{\"jsonrpc\":\"2.0\",\"method\":\"b\",\"id\":\"s\"}] \"str\" 12 {\"x\":{\"y\":[]}}";

    #[test]
    fn decoder_splits_concatenated_values() {
        let mut decoder = StreamDecoder::new(1 << 20);
        decoder.push(STREAM.as_bytes());
        let (values, error) = drain(&mut decoder, false);
        assert!(error.is_none());
        assert_eq!(values.len(), 5, "{values:?}");
        assert_eq!(values[0]["method"], "a\"}");
        assert_eq!(values[3], json!(12));
        assert_eq!(decoder.buffered_bytes(), 0);
    }

    #[test]
    fn decoder_byte_by_byte_gives_the_same_values() {
        let mut whole = StreamDecoder::new(1 << 20);
        whole.push(STREAM.as_bytes());
        let (expected, _) = drain(&mut whole, false);

        // A top-level number is only known to end at a delimiter, so the
        // trickled stream may split "12"; objects and strings never split.
        let mut decoder = StreamDecoder::new(1 << 20);
        let mut values = Vec::new();
        for byte in STREAM.as_bytes() {
            decoder.push(std::slice::from_ref(byte));
            let (mut got, error) = drain(&mut decoder, false);
            assert!(error.is_none(), "{error:?}");
            values.append(&mut got);
        }
        let (mut rest, error) = drain(&mut decoder, true);
        assert!(error.is_none());
        values.append(&mut rest);
        let objects = |v: &[Value]| v.iter().filter(|v| !v.is_number()).cloned().collect::<Vec<_>>();
        assert_eq!(objects(&values), objects(&expected));
    }

    #[test]
    fn decoder_reports_syntax_errors_and_cut_offs() {
        let mut decoder = StreamDecoder::new(1 << 20);
        decoder.push(b"{\"jsonrpc\": \"2.0\", \"method\" x");
        let (values, error) = drain(&mut decoder, false);
        assert!(values.is_empty());
        let error = error.expect("syntax error");
        assert_eq!(error.code, PARSE_ERROR);
        assert!(error.message.starts_with("Parse error: "), "{}", error.message);

        let mut decoder = StreamDecoder::new(1 << 20);
        decoder.push(b"{\"a\":1} {\"b\":");
        let (values, error) = drain(&mut decoder, false);
        assert_eq!(values, vec![json!({"a": 1})]);
        assert!(error.is_none());
        let (_, error) = drain(&mut decoder, true);
        let error = error.expect("cut off");
        assert_eq!(error.message, "Parse error: request cut off after 6 bytes");

        let mut decoder = StreamDecoder::new(1 << 20);
        decoder.push(b"  \n ");
        let (values, error) = drain(&mut decoder, true);
        assert!(values.is_empty() && error.is_none());
    }

    #[test]
    fn decoder_enforces_the_size_limit_without_reparsing() {
        let mut decoder = StreamDecoder::new(256 * 1024);
        decoder.push(b"{\"params\":\"");
        let chunk = vec![b'a'; 1024];
        let mut fatal = None;
        for _ in 0..300 {
            decoder.push(&chunk);
            if let (_, Some(error)) = drain(&mut decoder, false) {
                fatal = Some(error);
                break;
            }
        }
        let error = fatal.expect("limit reached");
        assert_eq!(error.code, PARSE_ERROR);
        assert!(error.message.contains("larger than 262144 bytes"), "{}", error.message);
        // Only while the partial value was small was it re-parsed per chunk.
        assert!(decoder.parse_attempts <= (EAGER_PARSE_BYTES / 1024 + 1) as u64, "{}", decoder.parse_attempts);

        // A large value arriving in pieces is parsed once, when it closes.
        let mut decoder = StreamDecoder::new(1 << 20);
        decoder.push(b"{\"params\":\"");
        for _ in 0..200 {
            decoder.push(&chunk);
            assert!(matches!(decoder.next_value(false), Decoded::NeedMore));
        }
        decoder.push(b"\"}");
        let before = decoder.parse_attempts;
        assert!(matches!(decoder.next_value(false), Decoded::Value(_)));
        assert_eq!(decoder.parse_attempts, before + 1);
        assert!(before <= (EAGER_PARSE_BYTES / 1024 + 1) as u64, "{before}");
    }

    #[test]
    fn decoder_handles_deep_nesting_without_overflow() {
        let mut decoder = StreamDecoder::new(1 << 20);
        let mut deep = vec![b'['; 100_000];
        deep.extend(vec![b']'; 100_000]);
        decoder.push(&deep);
        let (_, error) = drain(&mut decoder, false);
        assert_eq!(error.expect("recursion limit").code, PARSE_ERROR);
    }

    #[test]
    fn framer_ignores_brackets_inside_strings() {
        let mut framer = Framer::default();
        assert_eq!(framer.scan(br#"{"a":"}]\"{"#), Frame::Incomplete);
        let mut framer = Framer::default();
        assert_eq!(framer.scan(br#"{"a":"}]\"{"}"#), Frame::Complete);
        let mut framer = Framer::default();
        assert_eq!(framer.scan(b"  tru"), Frame::Unknown);
    }
}
