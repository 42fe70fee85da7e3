#!/bin/sh
# Linux kernel NVMe/TCP initiator + nvme-cli against nvraid-tgt's default
# config, inside the QEMU rig:
#   scripts/rig/run.sh --scenario scripts/rig/scenarios/nvmf-linux-initiator.sh --bin PATH/nvraid-tgt
# discover, connect, identify, data written and read back through the
# kernel block device (O_DIRECT), disconnect, clean daemon exit.
set -eu
# shellcheck source=../guest-lib.sh
. /rig/guest-lib.sh
RIG_STEP_TIMEOUT=90
NQN=nqn.2016-06.io.nvraid:array0

mkdir -p /var/tmp
bg_start tgt nvraid-tgt --default-config --idle sleep --no-huge --no-pin -m 0x1
step wait-rpc wait_for /var/tmp/spdk.sock 60 || {
  sed 's/^/  tgt| /' /tmp/rig/logs/tgt.log
  exit 1
}

discover() {
  modprobe nvme-tcp
  out=$(nvme discover -t tcp -a 127.0.0.1 -s 4420)
  echo "$out"
  echo "$out" | grep -q "subnqn: *$NQN" || fail "discovery log lacks $NQN"
}
step discover discover

step connect nvme_tcp_connect "$NQN"

identify() {
  ctrl=$(nvme_ctrl_by_nqn "$NQN")
  nvme id-ctrl "/dev/$ctrl" | grep -E '^(sn|mn|fr|mdts|cntlid|ioccsz|sgls|kas) '
  nvme id-ctrl "/dev/$ctrl" | grep -q '^sn *: NVRAID00000000000001' || fail "wrong serial"
  dev=$(nvme_ns_of_ctrl "$ctrl")
  nvme id-ns "$dev" | grep -E '^(nsze|ncap|nguid|flbas|lbaf  0)'
  nvme ns-descs "$dev" || true
  echo "$dev: $(cat /sys/block/"${dev#/dev/}"/size) sectors"
}
step identify identify

data() {
  ctrl=$(nvme_ctrl_by_nqn "$NQN")
  dev=$(nvme_ns_of_ctrl "$ctrl")
  pattern_file /tmp/pattern $((4 * 1024 * 1024))
  # 4 KiB (in-capsule) and 1 MiB (R2T, split at MDTS) writes.
  dd if=/tmp/pattern of="$dev" bs=4096 count=16 oflag=direct conv=fsync
  dd if=/tmp/pattern of="$dev" bs=1M seek=8 count=4 oflag=direct conv=fsync
  dd if="$dev" of=/tmp/rb1 bs=4096 count=16 iflag=direct
  dd if="$dev" of=/tmp/rb2 bs=1M skip=8 count=4 iflag=direct
  head -c 65536 /tmp/pattern | cmp - /tmp/rb1
  cmp /tmp/pattern /tmp/rb2
  echo "read back equal"
  # Write zeroes and discard through the block layer.
  if command -v blkdiscard >/dev/null; then blkdiscard -o 0 -l 65536 "$dev" && echo discarded; fi
  nvme flush "$dev" && echo flushed
}
step data data

step disconnect nvme disconnect -n "$NQN"
bg_stop tgt
