#!/usr/bin/env bash
# The benchmark suite: builds nvraid-perf (and nvraid-tgt) in release, checks
# that a run does not allocate per IO (fails loudly if it does), then runs the
# standard matrix on one core and prints one table with SPDK's figures beside
# ours and the machine's memcpy ceiling.
#
#   scripts/bench.sh [nvraid-perf bench options]     e.g. scripts/bench.sh -t 10 --core 1
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

target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
echo "== running the matrix"
exec "$target_dir/release/nvraid-perf" bench --tgt-bin "$target_dir/release/nvraid-tgt" "$@"
