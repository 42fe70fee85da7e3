//! Bad input never crashes the device server: random CDBs (known opcodes
//! with random fields, and random bytes), random expected lengths and
//! Data-Out, from two nexuses, all answered exactly once with a valid
//! status, sense no longer than its buffer, and Data-In within bounds.

mod scsi_support;

use iscsi::scsi::{status, Residual};
use proptest::prelude::*;
use scsi_support::*;

const OPCODES: &[u8] = &[
    0x00, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x16, 0x17, 0x1A, 0x1B, 0x1E, 0x25, 0x28, 0x2A, 0x2E, 0x2F, 0x35, 0x41, 0x42,
    0x55, 0x5A, 0x5E, 0x5F, 0x88, 0x89, 0x8A, 0x8E, 0x8F, 0x91, 0x93, 0x9E, 0xA0, 0xA3, 0xA8, 0xAA, 0xAE, 0xAF,
];

fn command() -> impl Strategy<Value = (Vec<u8>, u32, Option<Vec<u8>>, bool)> {
    (
        prop_oneof![3 => prop::sample::select(OPCODES), 1 => any::<u8>()],
        prop::collection::vec(any::<u8>(), 15),
        // Small counts and LBAs most of the time, so commands get past the range checks.
        prop::collection::vec(prop_oneof![3 => 0u8..4, 1 => any::<u8>()], 15),
        prop_oneof![2 => 0u32..4096, 1 => any::<u32>().prop_map(|v| v % (1 << 20))],
        prop::option::of(prop::collection::vec(any::<u8>(), 0..3000)),
        any::<bool>(),
    )
        .prop_map(|(op, random, small, expected_len, data, other)| {
            let mut cdb = vec![op];
            cdb.extend(random.iter().zip(&small).enumerate().map(|(i, (r, s))| if i % 2 == 0 { *r } else { *s }));
            (cdb, expected_len, data, other)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_commands_are_answered(cmds in prop::collection::vec(command(), 1..24)) {
        let rig = Rig::malloc(256);
        let a = nexus("iqn.1994-05.com.example:a", 1);
        let b = nexus("iqn.1994-05.com.example:b", 1);
        let mut tags = Vec::new();
        for (cdb, expected_len, data, other) in &cmds {
            let n = if *other { &b } else { &a };
            let cmd = rig.command(cdb, n, *expected_len, data.as_deref());
            tags.push((rig.submit(0, cmd), *expected_len));
        }
        for (tag, expected_len) in tags {
            let r = rig.wait(0, tag);
            prop_assert!(matches!(
                r.status,
                status::GOOD | status::CHECK_CONDITION | status::RESERVATION_CONFLICT | status::TASK_SET_FULL
            ), "status {:#x}", r.status);
            prop_assert_eq!(r.status == status::CHECK_CONDITION, !r.sense.is_empty());
            prop_assert!(r.data.len() <= expected_len as usize);
            if let Residual::Under(u) = r.residual {
                prop_assert!(u as usize <= expected_len as usize);
            }
        }
        prop_assert_eq!(rig.channels[0].0.in_flight(), 0);
    }
}
