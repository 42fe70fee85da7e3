//! The listener side: accepting on one reactor and spreading connections
//! over all of them, and waiting for connections to drain at shutdown.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Accepts on the current reactor (a timed poller: accept latency does not
/// matter, syscalls every loop would) and hands each connection to the
/// next reactor round-robin: `next_ticket` counts the connections (a
/// counter a target's listeners share). `closed` is asked every poll and
/// ends the poller when it says so; `make_start` gets the stream, the peer
/// and the chosen reactor, and what it returns runs on that reactor.
pub fn accept_round_robin<S>(
    poller_name: &'static str,
    listener: TcpListener,
    next_ticket: impl Fn() -> usize + 'static,
    closed: impl Fn() -> bool + 'static,
    make_start: impl Fn(TcpStream, SocketAddr, usize) -> S + 'static,
) where
    S: FnOnce() + Send + 'static,
{
    reactor::register_timed_poller(poller_name, Duration::from_micros(500), move || {
        if closed() {
            return reactor::PollStatus::Done;
        }
        let mut busy = false;
        for _ in 0..16 {
            match listener.accept() {
                Ok((stream, peer)) => {
                    busy = true;
                    let n = reactor::count().max(1);
                    let to = next_ticket() % n;
                    reactor::send(to, make_start(stream, peer, to));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(listener = poller_name, "accept: {e}");
                    break;
                }
            }
        }
        if busy {
            reactor::PollStatus::Busy
        } else {
            reactor::PollStatus::Idle
        }
    });
}

/// Runs `done` once `connections()` is 0 or `timeout` has passed: at once
/// when it already is, else from a timed poller on the current reactor.
pub fn when_drained(
    poller_name: &'static str,
    timeout: Duration,
    connections: impl Fn() -> usize + 'static,
    done: impl FnOnce() + 'static,
) {
    let deadline_ns = reactor::now_ns() + timeout.as_nanos() as u64;
    let mut done = Some(done);
    let mut check = move || {
        if connections() > 0 && reactor::now_ns() < deadline_ns {
            return reactor::PollStatus::Idle;
        }
        if let Some(d) = done.take() {
            d();
        }
        reactor::PollStatus::Done
    };
    if check() == reactor::PollStatus::Idle {
        reactor::register_timed_poller(poller_name, Duration::from_millis(2), check);
    }
}
