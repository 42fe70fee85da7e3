#!/usr/bin/env bash
# The benchmark suite: builds nvraid-perf (and nvraid-tgt) in release, checks
# that a run does not allocate per IO (fails loudly if it does), then runs the
# standard matrix on one core and prints one table.
#
# SPDK's figures are measured in the same run, never stored: when SPDK's
# reference binaries (bdevperf, nvmf_tgt, spdk_nvme_perf) are found in
# $NVRAID_SPDK_BIN (default: ../shared/anchors/spdk-v25.09/bin beside this
# checkout), every local row also runs SPDK's bdevperf on the same config and
# core, the NVMe/TCP rows run nvraid-tgt and SPDK's nvmf_tgt with SPDK's
# spdk_nvme_perf driving both, rounds interleave the two sides, and the table
# shows both medians and the ratio. Without them it prints nvraid's figures
# alone and says why. SPDK's tools need libnuma1 libuuid1 libssl3
# libkeyutils1 libaio1 (Debian 12 names); without reserved hugepages they run
# with --no-huge.
#
#   scripts/bench.sh [nvraid-perf bench options]   e.g. scripts/bench.sh -t 10 --rounds 5 --core 1
#   scripts/bench.sh -t 2 --rounds 3 --only raid5,raid0x4   (issue 12's parity rows alone)
#
# The raid5 rows (4 malloc members, 64 KiB strips, SPDK's raid5f config,
# which nvraid takes as its raid5) and raid0x4 (raid0 of the same members)
# give the parity-cost line: raid5 192 KiB writes / (3/4 x raid0x4 256 KiB
# writes). SPDK's raid5f refuses the 4 KiB random writes; that row shows
# SPDK's own refusal, measured each run.
#
# The machines are shared and noisy: compare ratios within one run, not
# absolute numbers across runs.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building release (nvraid-perf, nvraid-tgt)"
cargo build --release -p perf -p daemon

echo "== checking that the IO path does not allocate per IO"
if ! cargo test --release -p perf --test no_alloc -- --nocapture; then
    echo "bench.sh: FAILED: a run allocates per IO (see the no_alloc test above)" >&2
    exit 1
fi

export NVRAID_SPDK_BIN="${NVRAID_SPDK_BIN:-$(cd .. && pwd)/shared/anchors/spdk-v25.09/bin}"
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
echo "== running the matrix"
exec "$target_dir/release/nvraid-perf" bench --tgt-bin "$target_dir/release/nvraid-tgt" "$@"
