//! The transmit queue against a real loopback socket the peer drains
//! slowly: partial writes resume where they stopped, bytes leave in queue
//! order, and data segments give back their buffer units only once sent.

use bdev::DmaBuf;
use sock::TxQueue;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

const DATA_LEN: usize = 1 << 20;
/// Far more than loopback buffers hold, so the first flush stops part way.
const DATA_SEGS: usize = 32;

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

#[test]
fn partial_writes_resume_in_order_and_release_units_once_sent() {
    let (mut out, mut peer) = pair();
    out.set_nonblocking(true).unwrap();
    let data = DmaBuf::alloc(DATA_LEN).unwrap();
    data.with_mut(|b| b.iter_mut().enumerate().for_each(|(i, x)| *x = (i % 251) as u8));

    let mut q: TxQueue<16> = TxQueue::with_capacity(8);
    let mut expected = Vec::new();
    for s in 0..DATA_SEGS {
        // A header longer than one inline segment, then the data, shared.
        let header: Vec<u8> = (0..40).map(|i| (s * 40 + i) as u8).collect();
        q.push_bytes(&header);
        expected.extend_from_slice(&header);
        q.push_data_holding(data.clone(), 1);
        data.with(|b| expected.extend_from_slice(b));
    }
    q.push_data_holding(DmaBuf::alloc(0).unwrap().slice(0, 0), 2);
    assert_eq!(q.queued_bytes(), expected.len());
    assert_eq!(q.take_released_units(), 2, "an empty data segment releases at once");

    // Units come back only for data segments wholly on the wire.
    let per_seg = 40 + DATA_LEN;
    let check_released = |q: &TxQueue<16>, released: u32| {
        let sent = expected.len() - q.queued_bytes();
        assert!(released as usize <= sent / per_seg, "{released} units back after {sent} bytes sent");
    };

    assert!(!q.flush(&mut out).unwrap(), "the peer reads nothing yet: the write must stop part way");
    assert!(q.queued_bytes() < expected.len());
    let mut released = q.take_released_units();
    check_released(&q, released);
    assert!(released < DATA_SEGS as u32);

    let total = expected.len();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; total];
        peer.read_exact(&mut got).unwrap();
        got
    });
    let mut polls = 0;
    while !q.flush(&mut out).unwrap() {
        released += q.take_released_units();
        check_released(&q, released);
        polls += 1;
        assert!(polls < 100_000, "the queue never drained");
        std::thread::sleep(Duration::from_micros(100));
    }
    released += q.take_released_units();
    assert!(q.is_empty());
    assert_eq!(q.queued_bytes(), 0);
    assert_eq!(released, DATA_SEGS as u32);
    assert_eq!(reader.join().unwrap(), expected, "bytes on the wire in queue order");
}

/// splitmix64: a seeded source for the writers and queues below.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// How a [`ChoppyWriter`] answers each call.
enum Takes {
    /// The first call takes this many bytes, every later call all it is given.
    FirstThenAll(usize),
    /// Each call takes a random count (at times nothing: WouldBlock, or
    /// an interrupted call).
    Random(Rng),
}

/// A socket stand-in that accepts a chosen number of bytes per vectored
/// write and keeps what it accepted, in order.
struct ChoppyWriter {
    wire: Vec<u8>,
    takes: Takes,
    /// Slices handed to each call, in call order.
    slices_per_call: Vec<usize>,
}

impl ChoppyWriter {
    fn new(takes: Takes) -> Self {
        ChoppyWriter { wire: Vec::new(), takes, slices_per_call: Vec::new() }
    }
}

impl std::io::Write for ChoppyWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[std::io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        assert!(bufs.iter().all(|b| !b.is_empty()), "an empty slice was gathered");
        self.slices_per_call.push(bufs.len());
        let offered: usize = bufs.iter().map(|b| b.len()).sum();
        let take = match &mut self.takes {
            Takes::FirstThenAll(first) => std::mem::replace(first, usize::MAX).min(offered),
            Takes::Random(rng) => match rng.next() % 8 {
                0 => return Err(std::io::ErrorKind::WouldBlock.into()),
                1 => return Err(std::io::ErrorKind::Interrupted.into()),
                2 => offered,
                // Mostly short: anywhere from one byte to the whole offer.
                _ => rng.range(1, offered),
            },
        };
        let mut left = take;
        for b in bufs {
            let n = b.len().min(left);
            self.wire.extend_from_slice(&b[..n]);
            left -= n;
        }
        Ok(take)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const INLINE: usize = 16;

/// What a queue must put on the wire, and where each of its data segments
/// (one buffer unit each) ends in those bytes.
#[derive(Default)]
struct Expected {
    bytes: Vec<u8>,
    data_ends: Vec<usize>,
}

impl Expected {
    /// Data segments wholly sent once `sent` bytes are on the wire.
    fn wholly_sent(&self, sent: usize) -> u32 {
        self.data_ends.iter().filter(|&&end| end <= sent).count() as u32
    }
}

/// Pushes `pieces` segments, inline and data (slices of `pool`, at most
/// `max_data` bytes) at random, noting them in `exp`.
fn push_random(
    q: &mut TxQueue<INLINE>,
    exp: &mut Expected,
    rng: &mut Rng,
    pool: &DmaBuf,
    pieces: usize,
    max_data: usize,
) {
    for _ in 0..pieces {
        if rng.next().is_multiple_of(2) {
            let len = rng.range(1, INLINE);
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            q.push_bytes(&bytes);
            exp.bytes.extend_from_slice(&bytes);
        } else {
            let len = rng.range(1, max_data);
            let data = pool.slice(rng.range(0, pool.len() - len), len);
            data.with(|b| exp.bytes.extend_from_slice(b));
            q.push_data_holding(data, 1);
            exp.data_ends.push(exp.bytes.len());
        }
    }
}

fn random_queue(seed: u64, pool: &DmaBuf, pieces: usize, max_data: usize) -> (TxQueue<INLINE>, Expected) {
    let mut q = TxQueue::with_capacity(pieces);
    let mut exp = Expected::default();
    push_random(&mut q, &mut exp, &mut Rng(seed), pool, pieces, max_data);
    (q, exp)
}

/// 64 KiB of seeded bytes that data segments slice.
fn patterned_pool(seed: u64) -> DmaBuf {
    let mut rng = Rng(seed);
    let pool = DmaBuf::alloc(64 << 10).unwrap();
    pool.with_mut(|b| b.iter_mut().for_each(|x| *x = rng.next() as u8));
    pool
}

#[test]
fn one_write_gathers_up_to_gather_max_segments() {
    // The gather carries a poll's worth of responses.
    const { assert!(sock::GATHER_MAX >= 64) };
    let pool = patterned_pool(7);
    let pieces = 2 * sock::GATHER_MAX + 5;
    let (mut q, exp) = random_queue(8, &pool, pieces, 100);
    let mut w = ChoppyWriter::new(Takes::FirstThenAll(usize::MAX));
    assert!(q.flush(&mut w).unwrap());
    assert_eq!(w.slices_per_call, [sock::GATHER_MAX, sock::GATHER_MAX, 5], "segments per writev");
    assert_eq!(w.wire, exp.bytes);
    assert_eq!(q.take_released_units(), exp.data_ends.len() as u32);
}

#[test]
fn a_short_write_at_every_offset_resumes_exactly() {
    // 90 segments: the cut falls at every byte of the first write's gather
    // (past the 16th and the 64th segment too), boundaries included.
    let pool = patterned_pool(11);
    let pieces = 90;
    let total = random_queue(12, &pool, pieces, 24).1.bytes.len();
    for cut in 0..=total {
        let (mut q, exp) = random_queue(12, &pool, pieces, 24);
        let mut w = ChoppyWriter::new(Takes::FirstThenAll(cut));
        if cut == 0 {
            let err = q.flush(&mut w).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::WriteZero, "a write taking nothing is a closed peer");
            continue;
        }
        assert!(q.flush(&mut w).unwrap());
        assert_eq!(w.slices_per_call[0], pieces.min(sock::GATHER_MAX), "cut {cut}: the first write's gather");
        assert_eq!(w.wire, exp.bytes, "cut {cut}: bytes on the wire");
        assert_eq!(q.take_released_units(), exp.data_ends.len() as u32, "cut {cut}");
        assert_eq!(q.queued_bytes(), 0);
    }
}

#[test]
fn seeded_random_short_writes_send_every_byte_once() {
    let seeds: Vec<u64> = match std::env::var("SOCK_TX_SEED") {
        Ok(s) => vec![s.parse().expect("SOCK_TX_SEED is a number")],
        Err(_) => (1..=300).collect(),
    };
    for seed in seeds {
        let mut rng = Rng(seed);
        let pool = patterned_pool(seed);
        let mut q = TxQueue::with_capacity(64);
        let mut exp = Expected::default();
        let pieces = rng.range(1, 3 * sock::GATHER_MAX);
        push_random(&mut q, &mut exp, &mut rng, &pool, pieces, 3000);
        let mut w = ChoppyWriter::new(Takes::Random(Rng(seed ^ 0x5eed)));
        let mut released = 0;
        let mut polls = 0;
        let ctx = format!("seed {seed} (SOCK_TX_SEED={seed} replays it)");
        while !q.flush(&mut w).unwrap() {
            released += q.take_released_units();
            let sent = w.wire.len();
            assert_eq!(w.wire[..], exp.bytes[..sent], "{ctx}: bytes on the wire so far");
            assert_eq!(sent + q.queued_bytes(), exp.bytes.len(), "{ctx}: sent plus queued is all queued");
            assert_eq!(released, exp.wholly_sent(sent), "{ctx}: units back for data wholly sent");
            // Responses complete between polls: the owner queues more.
            if rng.next().is_multiple_of(4) {
                let more = rng.range(1, 40);
                push_random(&mut q, &mut exp, &mut rng, &pool, more, 3000);
            }
            polls += 1;
            assert!(polls < 1_000_000, "{ctx}: the queue never drained");
        }
        released += q.take_released_units();
        assert_eq!(w.wire, exp.bytes, "{ctx}: bytes on the wire");
        assert_eq!(released, exp.data_ends.len() as u32, "{ctx}: every unit back once");
        assert!(w.slices_per_call.iter().all(|&n| n <= sock::GATHER_MAX), "{ctx}");
    }
}
