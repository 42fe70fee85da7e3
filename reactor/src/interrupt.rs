//! Interrupt mode's wait: eventfds (a device's MSI-X vector through VFIO,
//! the simulated controller's completion signal, the reactor's own message
//! wake-up) and the one `ppoll` a sleeping reactor blocks in.
//!
//! An eventfd is a counter the kernel (or a peer thread) adds to; it is
//! readable while non-zero, so a signal that arrives before the reactor
//! blocks is not lost: the `ppoll` returns at once. The reactor reads a
//! ready counter back to zero only after it woke, before its pollers run,
//! so a completion posted after that read signals again.
//!
//! This module and the TSC reader hold the crate's only unsafe code: the
//! three system calls below, each with its argument.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A non-blocking, close-on-exec eventfd.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes two integers and returns a new descriptor
        // or -1; no memory is passed.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor the kernel just returned, owned by no one else.
        Ok(EventFd { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Adds one to the counter (what an MSI-X message does through VFIO).
    /// Never blocks: a counter at its maximum is already signalled.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one`, which outlives the call, to
        // our own descriptor.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Reads the counter back to zero; returns what it held (0: it was not
    /// signalled).
    pub fn drain(&self) -> u64 {
        drain_fd(self.fd.as_raw_fd())
    }

    /// True while the counter is non-zero (a test's view; does not drain).
    pub fn is_signalled(&self) -> bool {
        let mut p = [libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        poll_fds(&mut p, Some(0)).is_ok_and(|n| n > 0)
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Reads an eventfd's counter back to zero (0 when it was not signalled).
/// `fd` must be an open, non-blocking eventfd: the reactor passes those its
/// pollers hold open for the duration of the call.
pub(crate) fn drain_fd(fd: RawFd) -> u64 {
    let mut n: u64 = 0;
    // SAFETY: reads at most 8 bytes into `n`, which we own; on a
    // non-blocking eventfd an unsignalled counter gives EAGAIN, never a wait.
    let r = unsafe { libc::read(fd, (&mut n as *mut u64).cast(), 8) };
    if r == 8 {
        n
    } else {
        0
    }
}

/// Blocks until one of `fds` is readable or `timeout_ns` passed (None:
/// no timeout). Returns how many are ready; an interrupted call counts as
/// a wake-up with none ready.
pub(crate) fn poll_fds(fds: &mut [libc::pollfd], timeout_ns: Option<u64>) -> io::Result<usize> {
    let ts = timeout_ns.map(|ns| libc::timespec {
        tv_sec: (ns / 1_000_000_000).min(i64::MAX as u64) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `fds` is a live, exclusively borrowed array of `fds.len()`
    // pollfd entries the kernel fills in; `ts_ptr` is null or points at
    // `ts`, which outlives the call; no signal mask is passed.
    let n = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ts_ptr, std::ptr::null()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_before_the_wait_is_not_lost() {
        let e = EventFd::new().unwrap();
        assert!(!e.is_signalled());
        e.signal();
        e.signal();
        assert!(e.is_signalled());
        let mut p = [libc::pollfd { fd: e.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        assert_eq!(poll_fds(&mut p, None).unwrap(), 1, "level-triggered: ready without blocking");
        assert_eq!(e.drain(), 2);
        assert_eq!(e.drain(), 0);
        assert_eq!(poll_fds(&mut p, Some(1_000_000)).unwrap(), 0, "drained: the wait times out");
    }
}
