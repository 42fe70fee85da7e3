#!/bin/sh
# Namespace changes through Asynchronous Event Requests (issue 17). QEMU's
# emulated controller reports a namespace change only when a Namespace
# Attachment command changes what is attached. It cannot resize one: a
# namespace's size is read once, when the device is created, and QMP
# block_resize of its drive is refused ("Permission conflict ... permissions
# 'resize' are ... unshared by block device": QEMU 7.2's nvme takes its
# drive without the resize permission). Resize through AER is covered by
# the simulated controller (nvme/tests/sim.rs).
#
# So the .args file builds an NVMe subsystem with two controllers (one
# serial, NVRAIDSS, as QEMU requires in a subsystem): A at 00:08.0 goes to
# vfio-pci and nvraid; B at 00:09.0 stays with the kernel driver and is the
# admin path. Namespace 1 (64 MiB) is attached to both, namespace 2
# (32 MiB) to neither. The guest attaches namespace 2 to A through B
# (nvme attach-ns): QEMU raises "namespace attribute changed" on A, nvraid
# reads the Changed Namespace List and registers bdev NAn2 of 32 MiB.
# Detaching it hot-removes NAn2; attaching it again brings it back.
set -eu
# shellcheck source=../guest-lib.sh
. /rig/guest-lib.sh
RIG_STEP_TIMEOUT=90

SOCK=/tmp/nvraid.sock
RPC="nvraid-rpc -s $SOCK"

BDFA=0000:00:08.0
BDFB=0000:00:09.0

cat >/tmp/nvraid.json <<JSON
{"subsystems": [
 {"subsystem": "bdev", "config": [
  {"method": "bdev_nvme_attach_controller", "params": {"name": "NA", "trtype": "PCIe", "traddr": "$BDFA"}}]}]}
JSON

target_ready() {
  wait_for "$SOCK" 90 || { cat /tmp/rig/logs/tgt.log; return 1; }
  $RPC bdev_get_bdevs '{"name": "NAn1"}' >/dev/null || fail "no bdev NAn1"
  $RPC bdev_get_bdevs '{"name": "NAn2"}' >/dev/null 2>&1 && fail "namespace 2 should not be attached yet"
  $RPC bdev_nvme_get_controllers '{"name": "NA"}' | tee /tmp/ctrl.json
}

# attach-ns / detach-ns NSID for A, through the kernel's controller B.
ns_attachment() {
  b=
  for c in /sys/class/nvme/nvme*; do
    [ "$(cat "$c/address" 2>/dev/null)" = "$BDFB" ] && b=$(basename "$c")
  done
  [ -n "$b" ] || fail "no kernel controller at $BDFB"
  cntlid=$(json_num /tmp/ctrl.json cntlid)
  echo "nvme $1 /dev/$b -n $2 -c $cntlid"
  nvme "$1" "/dev/$b" --namespace-id="$2" --controllers="$cntlid"
}

has_bdev() { $RPC bdev_get_bdevs "{\"name\": \"$1\"}" >/dev/null 2>&1; }
no_bdev() { ! has_bdev "$1"; }

namespace_added() {
  ns_attachment attach-ns 2
  wait_until 30 has_bdev NAn2 || { tail -n 20 /tmp/rig/logs/tgt.log; fail "no bdev NAn2 after the attachment"; }
  $RPC bdev_get_bdevs '{"name": "NAn2"}' | tee /tmp/n2.json
  blocks=$(json_num /tmp/n2.json num_blocks)
  bs=$(json_num /tmp/n2.json block_size)
  [ $((blocks * bs)) -eq $((32 << 20)) ] || fail "NAn2 has $blocks blocks of $bs, not 32 MiB"
  $RPC bdev_nvme_get_controllers '{"name": "NA"}' | grep '"async_events"'
  grep "namespace added" /tmp/rig/logs/tgt.log
}

namespace_removed() {
  ns_attachment detach-ns 2
  wait_until 30 no_bdev NAn2 || { tail -n 20 /tmp/rig/logs/tgt.log; fail "NAn2 still there after the detachment"; }
  has_bdev NAn1 || fail "NAn1 went away too"
  grep "namespace removed" /tmp/rig/logs/tgt.log
}

step vfio-bind bind_vfio "$BDFA"
bg_start tgt nvraid-tgt -m 0x1 --idle sleep -r "$SOCK" -c /tmp/nvraid.json
step target-ready target_ready
step namespace-added namespace_added
step namespace-removed namespace_removed
step namespace-added-again namespace_added
stop_rc=0
bg_stop tgt 30 || stop_rc=$?
step target-stop test "$stop_rc" -eq 0
