//! `nvraid-rpc`: a minimal JSON-RPC client for places without Python (the
//! QEMU rig's initramfs). `nvraid-rpc [-s SOCKET] METHOD [PARAMS_JSON]`
//! prints the result as JSON; a JSON-RPC error goes to stderr, exit status 1.
#![forbid(unsafe_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut sock = "/var/tmp/spdk.sock".to_string();
    if args.first().map(String::as_str) == Some("-s") && args.len() >= 2 {
        sock = args.remove(1);
        args.remove(0);
    }
    let (Some(method), rest) = (args.first().cloned(), args.get(1)) else {
        eprintln!("usage: nvraid-rpc [-s SOCKET] METHOD [PARAMS_JSON]");
        return ExitCode::from(2);
    };
    let params: Option<Value> = match rest.map(|p| serde_json::from_str(p)) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => {
            eprintln!("nvraid-rpc: params are not valid JSON: {e}");
            return ExitCode::from(2);
        }
    };
    let mut req = json!({"jsonrpc": "2.0", "method": method, "id": 1});
    if let Some(p) = params {
        req["params"] = p;
    }
    let reply = UnixStream::connect(&sock).and_then(|mut s| {
        s.write_all(req.to_string().as_bytes())?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line)
    });
    let line = match reply {
        Ok(l) => l,
        Err(e) => {
            eprintln!("nvraid-rpc: {sock}: {e}");
            return ExitCode::from(1);
        }
    };
    match serde_json::from_str::<Value>(&line) {
        Ok(v) if v.get("error").is_some() => {
            eprintln!("{}", serde_json::to_string_pretty(&v["error"]).unwrap_or_default());
            ExitCode::from(1)
        }
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v["result"]).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nvraid-rpc: bad reply {line:?}: {e}");
            ExitCode::from(1)
        }
    }
}
