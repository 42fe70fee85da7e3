//! JSON-RPC management.
