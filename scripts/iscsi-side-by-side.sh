#!/usr/bin/env bash
# libiscsi's iscsi-perf (Debian package libiscsi-bin) against nvraid-tgt and
# against SPDK v25.09's iscsi_tgt, side by side: the same 128 MiB malloc LUN
# of 512-byte blocks, each target alone on core 0 (-m 0x1, busy polling),
# iscsi-perf on core 1 (taskset). Rounds interleave the two targets (each
# round starts one, runs every row, stops it, then the other); the table
# shows the median IOPS of each side over the rounds and nvraid/SPDK.
#
#   scripts/iscsi-side-by-side.sh            3 rounds of 5 s per row
#   ROUNDS=5 SECS=10 scripts/iscsi-side-by-side.sh
#
# Rows: 4 KiB random reads at queue depth 32 and 128, 128 KiB sequential
# reads at queue depth 8. SPDK's binary comes from $NVRAID_SPDK_BIN (default
# ../shared/anchors/spdk-v25.09/bin beside this checkout); without it the
# script fails. Both run without hugepages (nvraid-tgt --no-huge, iscsi_tgt
# --no-huge -s 1024). The machines are shared and noisy: compare the ratios
# of one run, not absolute figures across runs.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}
SPDK_BIN=${NVRAID_SPDK_BIN:-$(cd .. && pwd)/shared/anchors/spdk-v25.09/bin}
SPDK_TGT="$SPDK_BIN/iscsi_tgt"
IQN=iqn.2016-06.io.spdk:disk1

die() { echo "iscsi-side-by-side.sh: $*" >&2; exit 1; }
[ -x "$SPDK_TGT" ] || die "SPDK's iscsi_tgt not found at $SPDK_TGT (set NVRAID_SPDK_BIN)"
command -v iscsi-perf >/dev/null || die "iscsi-perf not installed (apt-get install libiscsi-bin)"
command -v taskset >/dev/null || die "taskset not installed (util-linux)"
[ "$(nproc --all)" -ge 2 ] || die "needs 2 cores (target on 0, iscsi-perf on 1)"

if [ -z "${NVRAID_TGT:-}" ]; then
    echo "== building nvraid-tgt (release)"
    cargo build --release -p daemon --bin nvraid-tgt
    NVRAID_TGT=target/release/nvraid-tgt
fi

work=$(mktemp -d /tmp/iscsi-side-by-side.XXXXXX)
tgt_pid=
cleanup() {
    if [ -n "$tgt_pid" ]; then kill -INT "$tgt_pid" 2>/dev/null || true; wait "$tgt_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# One config for both: SPDK's RPC names, which nvraid-tgt takes as they are.
write_config() { # port file
    cat >"$2" <<EOF
{"subsystems": [
 {"subsystem": "bdev", "config": [
  {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 262144, "block_size": 512}}]},
 {"subsystem": "iscsi", "config": [
  {"method": "iscsi_set_options", "params": {"max_queue_depth": 128}},
  {"method": "iscsi_create_portal_group", "params": {"tag": 1, "portals": [{"host": "127.0.0.1", "port": "$1"}]}},
  {"method": "iscsi_create_initiator_group", "params": {"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]}},
  {"method": "iscsi_create_target_node", "params": {"name": "disk1", "alias_name": "Disk1",
     "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "luns": [{"bdev_name": "Malloc0", "lun_id": 0}], "queue_depth": 128}}]}
]}
EOF
}

start_target() { # side port -> sets tgt_pid, waits for the portal
    local side=$1 port=$2 cfg="$work/$1.json" log="$work/$1.log"
    write_config "$port" "$cfg"
    if [ "$side" = nvraid ]; then
        "$NVRAID_TGT" -m 0x1 -r "$work/nvraid.sock" --no-huge -c "$cfg" >"$log" 2>&1 &
    else
        "$SPDK_TGT" -m 0x1 -r "$work/spdk.sock" --no-huge -s 1024 --json "$cfg" >"$log" 2>&1 &
    fi
    tgt_pid=$!
    local t=0
    until iscsi-inq "iscsi://127.0.0.1:$port/$IQN/0" >/dev/null 2>&1; do
        kill -0 "$tgt_pid" 2>/dev/null || { cat "$log" >&2; die "$side's target exited"; }
        t=$((t + 1))
        [ "$t" -lt 150 ] || { cat "$log" >&2; die "$side's target did not serve $IQN within 30 s"; }
        sleep 0.2
    done
}

stop_target() {
    kill -INT "$tgt_pid" 2>/dev/null || true
    wait "$tgt_pid" 2>/dev/null || true
    tgt_pid=
}

# name queue-depth blocks-per-command random(-r or empty)
ROWS=(
    "4k-randread-qd32 32 8 -r"
    "4k-randread-qd128 128 8 -r"
    "128k-seqread-qd8 8 256 -"
)

perf_iops() { # port qd blocks random
    local out rnd=()
    [ "$4" = "-r" ] && rnd=(-r)
    # On a loaded machine iscsi-perf can overrun its time (and be stopped
    # here); its last running average then stands for the round.
    out=$(taskset -c 1 timeout $((SECS + 30)) iscsi-perf -m "$2" -b "$3" "${rnd[@]}" -t "$SECS" \
        "iscsi://127.0.0.1:$1/$IQN/0" 2>&1 | tr '\r' '\n') || true
    # The summary line, or the last progress line: "... iops average N (M MB/s)".
    echo "$out" | sed -n 's/.*iops average \([0-9]*\) .*/\1/p' | tail -1 | grep . ||
        { echo "$out" | tail -5 >&2; die "iscsi-perf gave no figure"; }
}

declare -A results
for ((r = 1; r <= ROUNDS; r++)); do
    # Alternate which side goes first, so drift in the machine's load does not favour one.
    if ((r % 2)); then order=(nvraid spdk); else order=(spdk nvraid); fi
    for side in "${order[@]}"; do
        port=$(free_port)
        start_target "$side" "$port"
        for row in "${ROWS[@]}"; do
            read -r name qd blocks rnd <<<"$row"
            iops=$(perf_iops "$port" "$qd" "$blocks" "$rnd")
            echo "round $r $side $name: $iops IOPS"
            results[$side.$name]+="$iops "
        done
        stop_target
    done
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }

echo
echo "iscsi-perf, median of $ROUNDS rounds of ${SECS} s; targets on core 0, iscsi-perf on core 1"
echo "(a shared machine: other load moves the absolute figures; the ratio is the comparison)"
printf '%-20s %14s %14s %8s %10s\n' row "nvraid IOPS" "SPDK IOPS" ratio "nvraid MB/s"
for row in "${ROWS[@]}"; do
    read -r name qd blocks rnd <<<"$row"
    nv=$(echo "${results[nvraid.$name]}" | median)
    sp=$(echo "${results[spdk.$name]}" | median)
    printf '%-20s %14s %14s %7.2fx %10.0f\n' "$name" "$nv" "$sp" "$(echo "$nv / $sp" | bc -l)" \
        "$(echo "$nv * $blocks * 512 / 1000000" | bc -l)"
done
