//! Non-blocking socket plumbing of a connection: the transmit queue
//! (headers and small segments inline, data as `DmaBuf` slices, partial
//! writes resumed on the next poll) and the receive staging buffer.
//!
//! Both are sized when the connection starts; queuing a PDU allocates
//! nothing (the queue's ring grows only past its initial capacity).

use bdev::DmaBuf;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;

/// Bytes kept inline per segment: a BHS with its digest, or a digest and
/// padding, or a piece of a text response.
pub(crate) const INLINE_LEN: usize = 64;
/// Segments gathered into one `writev`.
const IOV_MAX: usize = 16;

#[allow(clippy::large_enum_variant)]
enum TxSeg {
    Inline { bytes: [u8; INLINE_LEN], len: u8, pos: u8 },
    Data { buf: DmaBuf, pos: usize },
}

/// The output queue of one connection.
pub(crate) struct TxQueue {
    segs: VecDeque<TxSeg>,
    queued_bytes: usize,
}

impl TxQueue {
    pub(crate) fn with_capacity(segs: usize) -> Self {
        TxQueue { segs: VecDeque::with_capacity(segs), queued_bytes: 0 }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Queues `data` (copied, in inline pieces).
    pub(crate) fn push_bytes(&mut self, data: &[u8]) {
        for chunk in data.chunks(INLINE_LEN) {
            let mut bytes = [0u8; INLINE_LEN];
            bytes[..chunk.len()].copy_from_slice(chunk);
            self.queued_bytes += chunk.len();
            self.segs.push_back(TxSeg::Inline { bytes, len: chunk.len() as u8, pos: 0 });
        }
    }

    /// Queues a data buffer (shared, not copied).
    pub(crate) fn push_data(&mut self, buf: DmaBuf) {
        if buf.is_empty() {
            return;
        }
        self.queued_bytes += buf.len();
        self.segs.push_back(TxSeg::Data { buf, pos: 0 });
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
                    *pos += take as u8;
                    n -= take;
                    left - take
                }
                TxSeg::Data { buf, pos } => {
                    let left = buf.len() - *pos;
                    let take = left.min(n);
                    *pos += take;
                    n -= take;
                    left - take
                }
            };
            if left == 0 {
                self.segs.pop_front();
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        self.segs.clear();
        self.queued_bytes = 0;
    }
}

/// Gathers up to IOV_MAX segments into one vectored write; each data
/// buffer is borrowed through its scoped accessor, one recursion level per
/// data segment.
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
        TxSeg::Data { buf, pos } => buf.with(|b| {
            let mut acc2: [IoSlice<'_>; IOV_MAX] = acc;
            acc2[k] = IoSlice::new(&b[*pos..]);
            gather_write(stream, segs, i + 1, acc2, k + 1)
        }),
    }
}

/// Receive staging buffer: large enough for one whole PDU of the largest
/// data segment the target accepts, so a PDU is handled once complete.
pub(crate) struct RxBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// An empty buffer (allocates nothing): what stands in while a PDU's data
/// is handed out of the real one.
impl Default for RxBuf {
    fn default() -> Self {
        RxBuf::new(0)
    }
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
