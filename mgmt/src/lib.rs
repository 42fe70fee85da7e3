//! JSON-RPC management: the protocol core and the Unix-socket server that SPDK's `spdk-rpc` client talks to.
#![forbid(unsafe_code)]

pub mod jsonrpc;
pub mod server;
