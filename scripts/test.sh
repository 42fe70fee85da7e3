#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need
# (SPDK's Python client; the QEMU rig installs its own packages), then runs
# unit and integration tests, the loom models, and the QEMU rig.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==== %s ====\n' "$*"; }
t0=$(date +%s)

step "SPDK's Python client (PyPI spdk) in target/spdk-venv"
if ! target/spdk-venv/bin/spdk-rpc --help >/dev/null 2>&1; then
    mkdir -p target
    python3 -m venv --clear target/spdk-venv
    target/spdk-venv/bin/pip install --quiet --disable-pip-version-check spdk
fi
target/spdk-venv/bin/spdk-rpc --help >/dev/null
export NVRAID_SPDK_RPC="$PWD/target/spdk-venv/bin/spdk-rpc"

step "libiscsi's iscsi-test-cu (Debian package libiscsi-bin), the iSCSI conformance peer"
if ! command -v iscsi-test-cu >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    $sudo_cmd apt-get install -y -qq libiscsi-bin
fi
# Not installable: the run fails here (daemon/tests/iscsi_test_cu.rs needs it).
command -v iscsi-test-cu >/dev/null

# Under CI no test skips: a missing input (SPDK's client, a port) fails it.
export CI=true

step "unit and integration tests (cargo test --workspace)"
cargo test --workspace --all-targets

step "loom models"
for t in $(ls */tests/loom_*.rs 2>/dev/null); do
    crate=$(dirname "$(dirname "$t")")
    pkg=$(sed -n 's/^name = "\(.*\)"/\1/p' "$crate/Cargo.toml" | head -1)
    RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
        cargo test --release -p "$pkg" --test "$(basename "$t" .rs)"
done

if [ -x scripts/rig/run.sh ] && [ -z "${NVRAID_SKIP_RIG:-}" ]; then
    step "static binaries for the QEMU guest"
    # The guest has no libc of ours: link glibc statically.
    RUSTFLAGS='-C target-feature=+crt-static' cargo build --release \
        --target x86_64-unknown-linux-gnu -p daemon --bins -p nvme --example nvme_probe
    # Host packages first: some scenarios hand host binaries (fio) to the guest.
    scripts/rig/run.sh --prepare
    for s in scripts/rig/scenarios/*.sh; do
        case "$s" in *.host.sh) continue ;; esac # host-side checks run by run.sh
        step "QEMU rig: $(basename "$s")"
        args=()
        # A scenario's extra run.sh arguments (binaries, files) sit beside it.
        if [ -f "${s%.sh}.args" ]; then
            read -r -a args < "${s%.sh}.args"
        fi
        scripts/rig/run.sh --scenario "$s" "${args[@]}"
    done
fi

step "all tests passed in $(( $(date +%s) - t0 )) s"
