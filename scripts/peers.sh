#!/usr/bin/env bash
# Checks against SPDK's own binaries as peers (v25.09, built from the public
# tag; $NVRAID_SPDK_BIN, default ../shared/anchors/spdk-v25.09/bin beside
# this checkout). They are not installable on a fresh machine, so these
# tests are #[ignore]d in the suite and run here; a missing binary fails.
# SPDK's tools need libnuma1 libuuid1 libssl3 libkeyutils1 libaio1.
set -euo pipefail
cd "$(dirname "$0")/.."
export NVRAID_SPDK_BIN="${NVRAID_SPDK_BIN:-$(cd .. && pwd)/shared/anchors/spdk-v25.09/bin}"
[ -x "$NVRAID_SPDK_BIN/spdk_nvme_perf" ] || { echo "peers.sh: no spdk_nvme_perf in $NVRAID_SPDK_BIN" >&2; exit 1; }
if [ -z "${NVRAID_SPDK_RPC:-}" ] && [ -x target/spdk-venv/bin/spdk-rpc ]; then
    export NVRAID_SPDK_RPC="$PWD/target/spdk-venv/bin/spdk-rpc"
fi
export CI=true
# DH-HMAC-CHAP: SPDK's host authenticates to nvraid-tgt (every hash and group, both ways).
cargo test -p daemon --test nvmf_auth -- --ignored --nocapture
# TLS 1.3 with a PSK: SPDK's host (-S ssl --psk-path) does IO against nvraid-tgt; a wrong key is refused.
cargo test -p daemon --test nvmf_tls -- --ignored --nocapture
