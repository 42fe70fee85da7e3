//! Fuzz target for the NVMe/TCP PDU reader: arbitrary or mostly-valid byte
//! streams, fed in random chunk sizes, must never panic, must decode the
//! same however they are chunked, and a valid stream must decode to exactly
//! the PDUs that were encoded.
//!
//! Input layout: byte 0 picks the receiver configuration and the mode,
//! byte 1 seeds the chunk sizes (and the corruption in structured mode),
//! the rest is the stream (raw mode) or PDU recipes (structured mode).
//! Structured mode exists because random bytes almost never get past the
//! common header checks; recipes keep the stream valid so the data and
//! digest paths are actually reached.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvme_spec::{Cqe, SglDescriptor, Sqe, Status};
use nvmf::pdu::{
    data_digest, encode_header, C2HData, CapsuleCmd, CapsuleResp, DataDigest, Direction, Event,
    H2CData, PduError, PduHeader, PduReader, RxConfig, TxConfig, MAX_ENCODED_HEADER_LEN, R2T,
};

const MAX_DATA_PDU_LEN: u32 = 1 << 16;
const MAX_IN_CAPSULE_LEN: u32 = 8192;

/// What a reader reported, with data reduced to its length and CRC so
/// that chunking cannot show.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Header(PduHeader, u32),
    Data { len: u32, digest: DataDigest },
    End,
    DigestMismatch,
    Error(PduError),
}

/// Small deterministic generator for chunk sizes.
struct XorShift(u32);

impl XorShift {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }
}

fn decode(cfg: RxConfig, stream: &[u8], mut chunk_len: impl FnMut() -> usize) -> Vec<Seen> {
    let mut reader = PduReader::new(cfg);
    let mut seen = Vec::new();
    let mut at = 0usize;
    let mut next_offset = 0u32;
    loop {
        let end = at.saturating_add(chunk_len().max(1)).min(stream.len());
        let mut input = &stream[at..end];
        loop {
            match reader.feed(input) {
                Err(err) => {
                    assert_eq!(
                        reader.feed(input),
                        Err(err),
                        "a failed reader must stay failed"
                    );
                    seen.push(Seen::Error(err));
                    return seen;
                }
                Ok((used, event)) => {
                    assert!(used <= input.len(), "consumed more than it was given");
                    input = &input[used..];
                    match event {
                        None => {
                            assert!(input.is_empty(), "stalled with input left");
                            break;
                        }
                        Some(Event::Header { header, data_len }) => {
                            next_offset = 0;
                            seen.push(Seen::Header(header, data_len));
                        }
                        Some(Event::Data(chunk)) => {
                            assert_eq!(chunk.offset, next_offset, "data chunks out of order");
                            assert!(!chunk.bytes.is_empty(), "empty data chunk");
                            next_offset += chunk.bytes.len() as u32;
                            match seen.last_mut() {
                                Some(Seen::Data { len, digest }) => {
                                    *len += chunk.bytes.len() as u32;
                                    digest.update(chunk.bytes);
                                }
                                _ => {
                                    let mut digest = DataDigest::new();
                                    digest.update(chunk.bytes);
                                    seen.push(Seen::Data {
                                        len: chunk.bytes.len() as u32,
                                        digest,
                                    });
                                }
                            }
                        }
                        Some(Event::End) => {
                            assert!(reader.is_idle());
                            seen.push(Seen::End);
                        }
                        Some(Event::DataDigestMismatch { .. }) => {
                            assert!(reader.is_idle());
                            seen.push(Seen::DigestMismatch);
                        }
                    }
                }
            }
        }
        at = end;
        if at >= stream.len() {
            return seen;
        }
    }
}

/// Turns recipes into a valid stream of PDUs for `direction`, returning
/// the stream and what a reader must report for it.
fn build_stream(
    direction: Direction,
    tx: &TxConfig,
    recipes: &[u8],
) -> (Vec<u8>, Vec<(PduHeader, Vec<u8>)>) {
    let mut stream = Vec::new();
    let mut pdus = Vec::new();
    let mut rest = recipes;
    while let [kind, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (payload, next) = tail.split_at(len);
        rest = next;
        let tag = u16::from(*kind) | ((len as u16) << 8);
        let header = match direction {
            Direction::HostToController if kind % 2 == 1 && !payload.is_empty() => {
                PduHeader::H2CData(H2CData {
                    cccid: tag,
                    ttag: tag.rotate_left(3),
                    datao: u32::from(*kind) * 512,
                    datal: payload.len() as u32,
                    last: kind & 0x80 != 0,
                })
            }
            Direction::HostToController => {
                let mut sqe = Sqe::new(kind & 0x03, tag);
                sqe.set_sgl1(SglDescriptor::in_capsule(0, payload.len() as u32));
                PduHeader::CapsuleCmd(CapsuleCmd { sqe })
            }
            Direction::ControllerToHost => match kind % 3 {
                0 => PduHeader::CapsuleResp(CapsuleResp {
                    cqe: Cqe::new(tag, Status::new(kind >> 5, *kind)),
                }),
                1 => PduHeader::R2T(R2T {
                    cccid: tag,
                    ttag: tag ^ 0x5555,
                    r2to: u32::from(*kind) << 12,
                    r2tl: 4096,
                }),
                _ if !payload.is_empty() => {
                    let last = kind & 0x80 != 0;
                    PduHeader::C2HData(C2HData {
                        cccid: tag,
                        datao: 0,
                        datal: payload.len() as u32,
                        last,
                        success: last && kind & 0x40 != 0,
                    })
                }
                _ => continue,
            },
        };
        let data: &[u8] = match header {
            PduHeader::CapsuleResp(_) | PduHeader::R2T(_) => &[],
            _ => payload,
        };
        let mut buf = [0u8; MAX_ENCODED_HEADER_LEN];
        let encoded =
            encode_header(&header, data.len() as u32, tx, &mut buf).expect("recipe PDUs are valid");
        stream.extend_from_slice(&buf[..encoded.header_len]);
        stream.extend_from_slice(data);
        if encoded.data_digest {
            stream.extend_from_slice(&data_digest(data).to_le_bytes());
        }
        pdus.push((header, data.to_vec()));
    }
    (stream, pdus)
}

fuzz_target!(|input: &[u8]| {
    let [mode, seed, body @ ..] = input else {
        return;
    };
    let direction = if mode & 0x01 != 0 {
        Direction::HostToController
    } else {
        Direction::ControllerToHost
    };
    let structured = mode & 0x80 != 0;
    let cfg = RxConfig {
        direction,
        // Structured streams hold no IC PDU, so they run connected.
        ic_done: structured || mode & 0x02 != 0,
        header_digest: mode & 0x04 != 0,
        data_digest: mode & 0x08 != 0,
        pda: (mode >> 4) & 0x07,
        max_data_pdu_len: MAX_DATA_PDU_LEN,
        max_in_capsule_data_len: MAX_IN_CAPSULE_LEN,
    };

    let mut stream = body.to_vec();
    let mut model = None;
    if structured {
        let tx = TxConfig {
            header_digest: cfg.header_digest,
            data_digest: cfg.data_digest,
            pda: cfg.pda,
        };
        let (built, pdus) = build_stream(direction, &tx, body);
        stream = built;
        if seed & 0x01 != 0 && !stream.is_empty() {
            // One flipped bit: the reader must notice or decode the same
            // framing, never go astray silently in a way chunking reveals.
            let at = usize::from(*seed) * 7919 % stream.len();
            stream[at] ^= 1 << (seed >> 5);
        } else {
            model = Some(pdus);
        }
    }

    let one_shot = decode(cfg, &stream, || usize::MAX);
    let mut rng = XorShift(u32::from(*seed) | 0x100);
    let chunked = decode(cfg, &stream, || (rng.next() % 64) as usize + 1);
    assert_eq!(one_shot, chunked, "chunking changed the decoding");

    if let Some(pdus) = model {
        let mut want = Vec::new();
        for (header, data) in &pdus {
            want.push(Seen::Header(*header, data.len() as u32));
            if !data.is_empty() {
                let mut digest = DataDigest::new();
                digest.update(data);
                want.push(Seen::Data {
                    len: data.len() as u32,
                    digest,
                });
            }
            want.push(Seen::End);
        }
        assert_eq!(one_shot, want, "a valid stream decoded to something else");
    }
});
