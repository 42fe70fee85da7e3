//! nvraid's initiator against nvraid's target over loopback TCP: every IO
//! command, with and without digests, sizes from one block to MDTS
//! (in-capsule and R2T writes), several IO queues served by several
//! reactors, and a verify workload that reads back distinct patterns.
//! Randomized: the seed is printed and `NVMF_TEST_SEED` replays it.

mod common;
use bdev::DmaBuf;
use common::*;
use nvmf::host::HostQpair;
use nvmf::TransportOpts;

const BS: u32 = 512;
const BLOCKS: u64 = 64 * 1024; // 32 MiB
const MDTS_BLOCKS: u32 = 131_072 / BS;

fn pattern(lba: u64, gen: u64, out: &mut [u8]) {
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let v = lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (gen << 40) ^ i as u64;
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
}

/// Model: generation per block (0 = zeroes).
struct Region {
    base: u64,
    gens: Vec<u64>,
}

fn expected(r: &Region, lba: u64, nlb: u32) -> Vec<u8> {
    let mut v = vec![0u8; (nlb * BS) as usize];
    for i in 0..nlb as u64 {
        let g = r.gens[(lba - r.base + i) as usize];
        if g != 0 {
            pattern(lba + i, g, &mut v[(i * BS as u64) as usize..((i + 1) * BS as u64) as usize]);
        }
    }
    v
}

/// Verify workload on one queue over its own LBA region, 8 commands in
/// flight on disjoint sub-regions.
fn verify_queue(qp: &mut HostQpair, base: u64, len: u64, seed: u64, rounds: usize) {
    let mut rng = Rng(seed | 1);
    let mut r = Region { base, gens: vec![0; len as usize] };
    let lanes = 8u64;
    let lane_len = len / lanes;
    let mut gen = 1u64;
    let rbuf = DmaBuf::alloc(MDTS_BLOCKS as usize * BS as usize).unwrap();
    for _ in 0..rounds {
        let mut reads = Vec::new();
        let mut n = 0;
        for lane in 0..lanes {
            let lane_base = base + lane * lane_len;
            let nlb = match rng.below(4) {
                0 => 1,
                1 => 1 + rng.below(8) as u32,
                2 => 1 + rng.below(64) as u32,
                _ => MDTS_BLOCKS - rng.below(2) as u32 * (MDTS_BLOCKS / 2),
            }
            .min(lane_len as u32);
            let lba = lane_base + rng.below(lane_len - nlb as u64 + 1);
            let tag = lane;
            match rng.below(10) {
                0..=3 => {
                    gen += 1;
                    let buf = DmaBuf::alloc((nlb * BS) as usize).unwrap().slice(0, (nlb * BS) as usize);
                    buf.with_mut(|b| {
                        for i in 0..nlb as usize {
                            pattern(lba + i as u64, gen, &mut b[i * BS as usize..(i + 1) * BS as usize]);
                        }
                    });
                    qp.write(1, lba, nlb, buf, tag).unwrap();
                    for i in 0..nlb as u64 {
                        r.gens[(lba - base + i) as usize] = gen;
                    }
                }
                4..=7 => {
                    let buf = if lane == 0 {
                        rbuf.slice(0, (nlb * BS) as usize)
                    } else {
                        DmaBuf::alloc((nlb * BS) as usize).unwrap().slice(0, (nlb * BS) as usize)
                    };
                    qp.read(1, lba, nlb, buf, tag).unwrap();
                    reads.push((tag, lba, nlb, expected(&r, lba, nlb)));
                }
                8 => {
                    qp.write_zeroes(1, lba, nlb, tag).unwrap();
                    for i in 0..nlb as u64 {
                        r.gens[(lba - base + i) as usize] = 0;
                    }
                }
                _ => {
                    if rng.below(2) == 0 {
                        qp.flush(1, tag).unwrap();
                    } else {
                        let b = DmaBuf::alloc(32).unwrap();
                        let half = nlb / 2;
                        let ranges = if half > 0 {
                            vec![(lba, half), (lba + half as u64, nlb - half)]
                        } else {
                            vec![(lba, nlb)]
                        };
                        qp.deallocate(1, &ranges, b, tag).unwrap();
                        for i in 0..nlb as u64 {
                            r.gens[(lba - base + i) as usize] = 0;
                        }
                    }
                }
            }
            n += 1;
        }
        for c in wait(qp, n) {
            assert!(c.status.is_success(), "command {} failed: {:?} (seed {seed})", c.tag, c.status);
            if let Some((_, lba, nlb, exp)) = reads.iter().find(|x| x.0 == c.tag) {
                let got = c.buf.as_ref().unwrap().to_vec();
                assert!(got == *exp, "read back at lba {lba} nlb {nlb} differs (seed {seed})");
            }
        }
    }
    // Final read-back of the whole region, in MDTS pieces.
    let mut lba = base;
    while lba < base + len {
        let nlb = MDTS_BLOCKS.min((base + len - lba) as u32);
        qp.read(1, lba, nlb, DmaBuf::alloc((nlb * BS) as usize).unwrap().slice(0, (nlb * BS) as usize), 99).unwrap();
        let c = wait(qp, 1).pop().unwrap();
        assert!(c.status.is_success());
        assert!(c.buf.unwrap().to_vec() == expected(&r, lba, nlb), "final verify at {lba} (seed {seed})");
        lba += nlb as u64;
    }
}

fn run(digests: bool, queues: u16) {
    let seed = seed();
    eprintln!("seed {seed} (replay with NVMF_TEST_SEED={seed})");
    let t = start_target(2, BS, BLOCKS, TransportOpts::default(), &[]);
    let s = session(t.port, queues, digests);
    assert_eq!(s.info.namespaces.len(), 1);
    assert_eq!(s.info.namespaces[0].num_blocks, BLOCKS);
    assert_eq!(s.info.namespaces[0].block_size, BS);
    assert_eq!(s.info.max_transfer_bytes, 131_072);
    assert_eq!(s.info.in_capsule_bytes, 4096);
    assert_eq!(s.info.serial_number, "NVRAID0001");
    let conns = t.set.call(0, || nvmf::NvmfState::get().connection_count());
    assert_eq!(conns, queues as usize + 1);
    let region = BLOCKS / queues as u64;
    let mut threads = Vec::new();
    for (i, parts) in s.io.into_iter().enumerate() {
        threads.push(std::thread::spawn(move || {
            let mut qp = HostQpair::from_parts(parts);
            verify_queue(&mut qp, i as u64 * region, region, seed.wrapping_add(i as u64 * 7919), 40);
        }));
    }
    for th in threads {
        th.join().unwrap();
    }
    // Closed IO queues are torn down; the admin queue stays.
    let t0 = std::time::Instant::now();
    while t.set.call(0, || nvmf::NvmfState::get().connection_count()) != 1 {
        assert!(t0.elapsed().as_secs() < 10, "closed queues were not torn down");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn verify_without_digests_on_several_queues() {
    run(false, 3);
}

#[test]
fn verify_with_header_and_data_digests() {
    run(true, 2);
}

#[test]
fn beyond_mdts_and_out_of_range_are_command_errors() {
    let t = start_target(1, BS, 1024, TransportOpts::default(), &[]);
    let s = session(t.port, 1, false);
    let mut qp = HostQpair::from_parts(s.io.into_iter().next().unwrap());
    // 256 KiB read: more than MDTS.
    qp.read(1, 0, 512, DmaBuf::alloc(262_144).unwrap(), 1).unwrap();
    let c = wait(&mut qp, 1).pop().unwrap();
    assert_eq!(c.status, nvme_spec::Status::DATA_SGL_LENGTH_INVALID.with_dnr());
    qp.read(1, 1020, 8, DmaBuf::alloc(4096).unwrap(), 2).unwrap();
    let c = wait(&mut qp, 1).pop().unwrap();
    assert_eq!(c.status, nvme_spec::Status::LBA_OUT_OF_RANGE.with_dnr());
    qp.read(7, 0, 1, DmaBuf::alloc(512).unwrap().slice(0, 512), 3).unwrap();
    let c = wait(&mut qp, 1).pop().unwrap();
    assert_eq!(c.status, nvme_spec::Status::INVALID_NAMESPACE_OR_FORMAT.with_dnr());
    // The queue still works.
    qp.read(1, 0, 1, DmaBuf::alloc(512).unwrap().slice(0, 512), 4).unwrap();
    assert!(wait(&mut qp, 1).pop().unwrap().status.is_success());
}

#[test]
fn discovery_lists_the_subsystem() {
    let t = start_target(1, BS, 1024, TransportOpts::default(), &[]);
    let mut p = params(t.port);
    p.subnqn = nvme_spec::text::DISCOVERY_NQN.into();
    let entries = nvmf::host::discover(&p).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].subnqn, NQN);
    assert_eq!(entries[0].traddr, "127.0.0.1");
    assert_eq!(entries[0].trsvcid, t.port.to_string());
}

#[test]
fn discovery_shows_a_host_only_what_it_may_connect_to() {
    let t = start_target(1, BS, 1024, TransportOpts::default(), &[]);
    let port = t.port;
    t.set.call(0, move || {
        let st = nvmf::NvmfState::get();
        let mut p = nvmf::SubsystemParams::new("nqn.2016-06.io.nvraid:private");
        p.allow_any_host = false;
        st.create_subsystem(p).unwrap();
        st.add_host("nqn.2016-06.io.nvraid:private", "nqn.2014-08.org.example:friend").unwrap();
        st.add_listener("nqn.2016-06.io.nvraid:private", nvmf::ListenAddr::new("127.0.0.1", &port.to_string()))
            .unwrap();
    });
    let mut p = params(t.port);
    p.subnqn = nvme_spec::text::DISCOVERY_NQN.into();
    let seen: Vec<String> = nvmf::host::discover(&p).unwrap().into_iter().map(|e| e.subnqn).collect();
    assert_eq!(seen, vec![NQN.to_string()]);
    p.hostnqn = "nqn.2014-08.org.example:friend".into();
    let mut seen: Vec<String> = nvmf::host::discover(&p).unwrap().into_iter().map(|e| e.subnqn).collect();
    seen.sort();
    assert_eq!(seen, vec!["nqn.2016-06.io.nvraid:private".to_string(), NQN.to_string()]);
}
