//! The transmit queue of one connection.

use crate::Socket;
use bdev::DmaBuf;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

/// Most segments gathered into one `writev`. A 4 KiB read's response is
/// two or three segments (header, data, digest), so this lets one call
/// carry a poll's worth of responses at queue depth 128 and beyond (Linux
/// takes up to 1024); the slice array it sizes lives on the stack for the
/// call only.
pub const GATHER_MAX: usize = 128;

/// One piece of output. Headers live inline so that queuing a PDU never
/// allocates; the queue is sized once, so the variants' size gap costs
/// memory only, not time.
#[allow(clippy::large_enum_variant)]
enum TxSeg<const INLINE_LEN: usize> {
    Inline {
        bytes: [u8; INLINE_LEN],
        len: u16,
        pos: u16,
    },
    /// `units`: buffer-pool units the data holds until it has been sent
    /// (a target's data buffer budget; 0 elsewhere).
    Data {
        buf: DmaBuf,
        pos: usize,
        units: u32,
    },
}

/// The output queue of one connection; `INLINE_LEN` is the most bytes one
/// inline segment holds (the protocol's largest header with its digest).
pub struct TxQueue<const INLINE_LEN: usize> {
    segs: VecDeque<TxSeg<INLINE_LEN>>,
    queued_bytes: usize,
    /// Units of data segments sent (or dropped) since the last
    /// [`TxQueue::take_released_units`].
    released_units: u32,
}

impl<const INLINE_LEN: usize> TxQueue<INLINE_LEN> {
    /// Inline lengths and positions are kept in `u16`.
    const INLINE_FITS: () = assert!(INLINE_LEN <= u16::MAX as usize);

    pub fn with_capacity(segs: usize) -> Self {
        #[allow(clippy::let_unit_value)]
        let () = Self::INLINE_FITS;
        TxQueue { segs: VecDeque::with_capacity(segs), queued_bytes: 0, released_units: 0 }
    }

    /// Buffer units whose data has left the queue, for the owner to give
    /// back to its pool.
    pub fn take_released_units(&mut self) -> u32 {
        std::mem::take(&mut self.released_units)
    }

    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Queues bytes that `fill` writes into an inline buffer (at most
    /// `INLINE_LEN`); `fill` returns how many it wrote.
    pub fn push_inline<E>(&mut self, fill: impl FnOnce(&mut [u8]) -> Result<usize, E>) -> Result<(), E> {
        let mut bytes = [0u8; INLINE_LEN];
        let len = fill(&mut bytes)?.min(INLINE_LEN);
        if len > 0 {
            self.queued_bytes += len;
            self.segs.push_back(TxSeg::Inline { bytes, len: len as u16, pos: 0 });
        }
        Ok(())
    }

    /// Queues `data` (copied, in inline pieces).
    pub fn push_bytes(&mut self, data: &[u8]) {
        for chunk in data.chunks(INLINE_LEN) {
            let _ = self.push_inline::<()>(|b| {
                b[..chunk.len()].copy_from_slice(chunk);
                Ok(chunk.len())
            });
        }
    }

    /// Queues a data buffer (shared, not copied: the queue holds a handle
    /// until the bytes are on the wire).
    pub fn push_data(&mut self, buf: DmaBuf) {
        self.push_data_holding(buf, 0);
    }

    /// Like `push_data`; the data holds `units` of a buffer pool until it
    /// has been sent.
    pub fn push_data_holding(&mut self, buf: DmaBuf, units: u32) {
        if buf.is_empty() {
            self.released_units += units;
            return;
        }
        self.queued_bytes += buf.len();
        self.segs.push_back(TxSeg::Data { buf, pos: 0, units });
    }

    /// Writes as much as the socket takes. Ok(true) when everything went.
    pub fn flush(&mut self, stream: &mut impl Write) -> io::Result<bool> {
        while !self.segs.is_empty() {
            let n = match gather_write(stream, &self.segs, 0, None, 0) {
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

    /// A poll's send on an open connection: writes what the socket takes
    /// and says whether any bytes went. On an error the queue is dropped
    /// (the connection is over) and the error returned for the owner to
    /// close with.
    pub fn send(&mut self, stream: &mut impl Write) -> io::Result<bool> {
        if self.segs.is_empty() {
            return Ok(false);
        }
        let before = self.queued_bytes;
        match self.flush(stream) {
            Ok(_) => Ok(before != self.queued_bytes),
            Err(e) => {
                self.clear();
                Err(e)
            }
        }
    }

    /// A closing connection's last words: flushes what it can and shuts the
    /// socket once everything went, sending failed, or `deadline_ns`
    /// (reactor time) has passed, dropping what is left. True once shut.
    pub fn flush_then_shutdown(&mut self, stream: &mut impl Socket, deadline_ns: u64) -> bool {
        let flushed = self.segs.is_empty() || matches!(self.flush(stream), Ok(true) | Err(_));
        if flushed || reactor::now_ns() >= deadline_ns {
            stream.shutdown_both();
            self.clear();
            return true;
        }
        false
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

    /// Drops everything queued (the data's buffer units count as released).
    pub fn clear(&mut self) {
        for seg in self.segs.drain(..) {
            if let TxSeg::Data { units, .. } = seg {
                self.released_units += units;
            }
        }
        self.queued_bytes = 0;
    }
}

/// One gathered slice, linked to the ones before it. Each lives in the
/// frame of the gather level that borrowed it, so that a data buffer's
/// scoped borrow covers the write; shared links let every level narrow the
/// lifetime without copying what was gathered so far.
struct Gathered<'a> {
    bytes: &'a [u8],
    prev: Option<&'a Gathered<'a>>,
}

/// Gathers up to GATHER_MAX segments from `segs[i..]` after the `k` already
/// linked into `prev`, then writes them all in one vectored write. Each
/// data buffer is borrowed through its scoped accessor, so the gather
/// recurses one level per segment.
fn gather_write<'a, const INLINE_LEN: usize>(
    stream: &mut impl Write,
    segs: &'a VecDeque<TxSeg<INLINE_LEN>>,
    i: usize,
    prev: Option<&'a Gathered<'a>>,
    k: usize,
) -> io::Result<usize> {
    if k == GATHER_MAX || i == segs.len() {
        let mut iov = [IoSlice::new(&[]); GATHER_MAX];
        let mut link = prev;
        let mut j = k;
        while let Some(g) = link {
            j -= 1;
            iov[j] = IoSlice::new(g.bytes);
            link = g.prev;
        }
        return stream.write_vectored(&iov[..k]);
    }
    match &segs[i] {
        TxSeg::Inline { bytes, len, pos } => {
            let g = Gathered { bytes: &bytes[*pos as usize..*len as usize], prev };
            gather_write(stream, segs, i + 1, Some(&g), k + 1)
        }
        TxSeg::Data { buf, pos, .. } => buf.with(|b| {
            let g = Gathered { bytes: &b[*pos..], prev };
            gather_write(stream, segs, i + 1, Some(&g), k + 1)
        }),
    }
}
