//! Non-blocking TCP plumbing for connections owned and polled by one
//! reactor, shared by the NVMe/TCP and iSCSI transports: the transmit queue
//! (headers and small segments inline, data as `DmaBuf` slices gathered
//! into one `writev`, partial writes resumed on the next poll), the receive
//! staging buffer, and the listener poller that hands accepted connections
//! to the reactors round-robin. PDU framing and digests stay with each
//! protocol. [`Stream`] is the socket or TLS 1.3 with a pre-shared key
//! over it (NVMe/TCP's secure channel).
//!
//! Nothing here allocates after construction: the queue and the staging
//! buffer are sized when the connection starts (the queue's ring grows only
//! past its initial capacity).
#![forbid(unsafe_code)]

mod accept;
mod rx;
mod tls;
mod tx;

pub use accept::{accept_round_robin, when_drained};
pub use rx::{read_into, RxBuf, RxFill};
pub use tls::{connect as tls_connect, FindPsk, Handshake, HandshakeStep, Socket, Stream, TlsServer, TlsStream};
pub use tx::{TxQueue, GATHER_MAX};
