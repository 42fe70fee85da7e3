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
