//! Non-blocking socket plumbing shared by the target and the initiator: the
//! per-queue-pair transmit queue (headers inline, data as `DmaBuf` slices,
//! partial writes resumed on the next poll) and the receive staging buffer.
//!
//! Nothing here allocates after construction: the queue and the staging
//! buffer are sized when the queue pair is created.

use bdev::DmaBuf;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;

use crate::pdu::MAX_ENCODED_HEADER_LEN;

/// Bytes of headers (or a digest, or a termination request) kept inline.
pub(crate) const INLINE_LEN: usize = MAX_ENCODED_HEADER_LEN;
/// Segments gathered into one `writev`.
const IOV_MAX: usize = 16;

/// One piece of output. Headers live inline so that queuing a PDU never
/// allocates; the queue is sized once, so the variants' size gap costs
/// memory only, not time.
#[allow(clippy::large_enum_variant)]
pub(crate) enum TxSeg {
    Inline {
        bytes: [u8; INLINE_LEN],
        len: u16,
        pos: u16,
    },
    /// `units`: buffer-pool units the data holds until it has been sent
    /// (the target's data buffer budget; 0 elsewhere).
    Data {
        buf: DmaBuf,
        pos: usize,
        units: u32,
    },
}

/// The output queue of one connection.
pub(crate) struct TxQueue {
    segs: VecDeque<TxSeg>,
    queued_bytes: usize,
    /// Units of data segments sent (or dropped) since the last
    /// [`TxQueue::take_released_units`].
    released_units: u32,
}

impl TxQueue {
    pub(crate) fn with_capacity(segs: usize) -> Self {
        TxQueue { segs: VecDeque::with_capacity(segs), queued_bytes: 0, released_units: 0 }
    }

    /// Buffer units whose data has left the queue, for the owner to give
    /// back to its pool.
    pub(crate) fn take_released_units(&mut self) -> u32 {
        std::mem::take(&mut self.released_units)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Queues bytes that `fill` writes into an inline buffer (at most
    /// [`INLINE_LEN`]); `fill` returns how many it wrote.
    pub(crate) fn push_inline<E>(&mut self, fill: impl FnOnce(&mut [u8]) -> Result<usize, E>) -> Result<(), E> {
        let mut bytes = [0u8; INLINE_LEN];
        let len = fill(&mut bytes)?.min(INLINE_LEN);
        if len > 0 {
            self.queued_bytes += len;
            self.segs.push_back(TxSeg::Inline { bytes, len: len as u16, pos: 0 });
        }
        Ok(())
    }

    pub(crate) fn push_bytes(&mut self, data: &[u8]) {
        for chunk in data.chunks(INLINE_LEN) {
            let _ = self.push_inline::<()>(|b| {
                b[..chunk.len()].copy_from_slice(chunk);
                Ok(chunk.len())
            });
        }
    }

    /// Queues a data buffer (shared, not copied: the queue holds a handle
    /// until the bytes are on the wire).
    pub(crate) fn push_data(&mut self, buf: DmaBuf) {
        self.push_data_holding(buf, 0);
    }

    /// Like `push_data`; the data holds `units` of a buffer pool until it
    /// has been sent.
    pub(crate) fn push_data_holding(&mut self, buf: DmaBuf, units: u32) {
        if buf.is_empty() {
            self.released_units += units;
            return;
        }
        self.queued_bytes += buf.len();
        self.segs.push_back(TxSeg::Data { buf, pos: 0, units });
    }

    /// Writes as much as the socket takes. Ok(true) when everything went.
    pub(crate) fn flush(&mut self, stream: &mut TcpStream) -> io::Result<bool> {
        while !self.segs.is_empty() {
            let empty = [IoSlice::new(&[]); IOV_MAX];
            let n = match gather_write(stream, &self.segs, 0, empty, 0) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "peer closed")),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.advance(n);
        }
        Ok(true)
    }

    fn advance(&mut self, mut n: usize) {
        self.queued_bytes -= n.min(self.queued_bytes);
        while n > 0 {
            let Some(front) = self.segs.front_mut() else {
                return;
            };
            let left = match front {
                TxSeg::Inline { len, pos, .. } => {
                    let left = (*len - *pos) as usize;
                    let take = left.min(n);
                    *pos += take as u16;
                    n -= take;
                    left - take
                }
                TxSeg::Data { buf, pos, .. } => {
                    let left = buf.len() - *pos;
                    let take = left.min(n);
                    *pos += take;
                    n -= take;
                    left - take
                }
            };
            if left == 0 {
                if let Some(TxSeg::Data { units, .. }) = self.segs.pop_front() {
                    self.released_units += units;
                }
            }
        }
        // Zero-length leftovers cannot exist: segments are never empty.
    }

    pub(crate) fn clear(&mut self) {
        for seg in self.segs.drain(..) {
            if let TxSeg::Data { units, .. } = seg {
                self.released_units += units;
            }
        }
        self.queued_bytes = 0;
    }
}

/// Gathers up to IOV_MAX segments into one vectored write. Each data
/// buffer is borrowed through its scoped accessor, so the gather recurses
/// one level per data segment, the slice array narrowing its lifetime.
fn gather_write<'a>(
    stream: &mut TcpStream,
    segs: &'a VecDeque<TxSeg>,
    i: usize,
    mut acc: [IoSlice<'a>; IOV_MAX],
    k: usize,
) -> io::Result<usize> {
    if k == IOV_MAX || i == segs.len() {
        return stream.write_vectored(&acc[..k]);
    }
    match &segs[i] {
        TxSeg::Inline { bytes, len, pos } => {
            acc[k] = IoSlice::new(&bytes[*pos as usize..*len as usize]);
            gather_write(stream, segs, i + 1, acc, k + 1)
        }
        TxSeg::Data { buf, pos, .. } => buf.with(|b| {
            let mut acc2: [IoSlice<'_>; IOV_MAX] = acc;
            acc2[k] = IoSlice::new(&b[*pos..]);
            gather_write(stream, segs, i + 1, acc2, k + 1)
        }),
    }
}

/// Receive staging buffer: socket bytes land here before the PDU reader
/// sees them (bulk data may bypass it, straight into a request's buffer).
pub(crate) struct RxBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

pub(crate) enum RxFill {
    Bytes,
    WouldBlock,
    Closed,
}

impl RxBuf {
    pub(crate) fn new(len: usize) -> Self {
        RxBuf { buf: vec![0u8; len].into_boxed_slice(), start: 0, end: 0 }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(crate) fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads from the socket into the free tail (compacting first).
    pub(crate) fn fill(&mut self, stream: &mut TcpStream) -> io::Result<RxFill> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Ok(RxFill::Bytes);
        }
        loop {
            match stream.read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(RxFill::Closed),
                Ok(n) => {
                    self.end += n;
                    return Ok(RxFill::Bytes);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(RxFill::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reads straight into `dest[..]`; Ok(None) when nothing is there yet.
pub(crate) fn read_into(stream: &mut TcpStream, dest: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match stream.read(dest) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed")),
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}
