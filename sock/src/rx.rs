//! The receive side: the staging buffer and direct reads.

use std::io::{self, Read};

/// Receive staging buffer: socket bytes land here before the PDU reader
/// sees them (bulk data may bypass it, straight into a request's buffer).
pub struct RxBuf {
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

/// What [`RxBuf::fill`] found.
pub enum RxFill {
    Bytes,
    WouldBlock,
    Closed,
}

impl RxBuf {
    pub fn new(len: usize) -> Self {
        RxBuf { buf: vec![0u8; len].into_boxed_slice(), start: 0, end: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads from the socket into the free tail (compacting first).
    pub fn fill(&mut self, stream: &mut impl Read) -> io::Result<RxFill> {
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
pub fn read_into(stream: &mut impl Read, dest: &mut [u8]) -> io::Result<Option<usize>> {
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
