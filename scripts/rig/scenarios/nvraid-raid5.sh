#!/bin/sh
# raid5 over emulated NVMe through VFIO (issue 12): three controllers, each
# behind its own PCIe root port (--nvme-count 3 --nvme-hotplug), go to
# vfio-pci; nvraid-tgt builds a raid5 of them (64 KiB strips, so a full
# stripe is 128 KiB, with a superblock) and exports it over NVMe/TCP. The
# kernel initiator writes patterns of partial-stripe (4 KiB, 68 KiB) and
# full-stripe (128 KiB, 256 KiB) writes and reads them back; then fio writes
# and verifies (crc32c, 4-256 KiB) while the host unplugs one controller
# with QMP device_del. nvraid gets the VFIO device request, fails the member
# and lets the device go; IO goes on degraded, fio's verification passes, and
# every pattern reads back, the unplugged member's strips reconstructed from
# the other two. Then the controller returns (QMP blockdev-add + device_add
# of its old image) and is bound to vfio-pci: nvraid's hotplug monitor
# (bdev_nvme_set_hotplug in the config, 200 ms period) attaches it as
# HotInNvme0 with no RPC, the member is recognised by its superblock and
# rebuilt; the array is whole again, a parity check finds no mismatch, and
# the data verifies once more.
set -eu
# shellcheck source=../guest-lib.sh
. /rig/guest-lib.sh
RIG_STEP_TIMEOUT=150

NQN=nqn.2016-06.io.nvraid:raid5
SOCK=/tmp/nvraid.sock
RPC="nvraid-rpc -s $SOCK"
FIO_JOB="--name=raid5 --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-256k
 --iodepth=8 --size=64M --offset=32M --randrepeat=1 --randseed=1212 --verify=crc32c
 --verify_fatal=1 --verify_backlog=32"

BDF0=$(find_nvme_by_serial NVRAID0)
BDF1=$(find_nvme_by_serial NVRAID1)
BDF2=$(find_nvme_by_serial NVRAID2)
# name:block size:count:offset in KiB (a multiple of the block size). The
# 4 KiB and 68 KiB writes start off stripe boundaries and are partial-stripe
# (read-modify-write or reconstruct-write); 128 and 256 KiB, stripe-aligned,
# are full-stripe.
PATTERNS="p4k:4k:64:1028 p68k:68k:8:3060 f128k:128k:8:8192 f256k:256k:4:16384"

bind_all() {
  bind_vfio "$BDF0" && bind_vfio "$BDF1" && bind_vfio "$BDF2"
}

cat >/tmp/nvraid.json <<JSON
{"subsystems": [
 {"subsystem": "bdev", "config": [
  {"method": "bdev_nvme_attach_controller", "params": {"name": "N0", "trtype": "PCIe", "traddr": "$BDF0"}},
  {"method": "bdev_nvme_attach_controller", "params": {"name": "N1", "trtype": "PCIe", "traddr": "$BDF1"}},
  {"method": "bdev_nvme_attach_controller", "params": {"name": "N2", "trtype": "PCIe", "traddr": "$BDF2"}},
  {"method": "bdev_raid_create", "params": {"name": "R5", "raid_level": "raid5", "strip_size_kb": 64,
    "base_bdevs": ["N0n1", "N1n1", "N2n1"], "superblock": true}},
  {"method": "bdev_nvme_set_hotplug", "params": {"enable": true, "period_us": 200000}}]},
 {"subsystem": "nvmf", "config": [
  {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
  {"method": "nvmf_create_subsystem", "params": {"nqn": "$NQN", "allow_any_host": true, "serial_number": "NVRAIDRAID5TEST1"}},
  {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "$NQN", "namespace": {"bdev_name": "R5"}}},
  {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "$NQN",
    "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}}}]}]}
JSON

target_ready() {
  wait_for "$SOCK" 90 || { cat /tmp/rig/logs/tgt.log; return 1; }
  $RPC bdev_raid_get_bdevs '{"category": "all"}' | tee /tmp/raid.json
  grep -q '"state": "online"' /tmp/raid.json || fail "raid5 is not online"
  grep -q '"raid_level": "raid5"' /tmp/raid.json || fail "not a raid5"
}

connect() {
  modprobe nvme-tcp
  dev=$(nvme_tcp_connect "$NQN") || return 1
  echo "$dev" >/tmp/dev
  echo "connected: $dev"
}

write_patterns() {
  dev=$(cat /tmp/dev)
  for p in $PATTERNS; do
    IFS=: read -r name bs count off <<P
$p
P
    kb=${bs%k}
    pattern_file "/tmp/$name" $((kb * 1024 * count)) "$name-$RIG_NONCE"
    dd if="/tmp/$name" of="$dev" bs="$bs" seek=$((off / kb)) count="$count" oflag=direct conv=fsync 2>/dev/null ||
      fail "writing $name"
    echo "$name: $count writes of $bs at ${off} KiB"
  done
}

# read_patterns: every pattern reads back (O_DIRECT, reads of the writes'
# size; fio's verification covers every other size).
read_patterns() {
  dev=$(cat /tmp/dev)
  for p in $PATTERNS; do
    IFS=: read -r name bs count off <<P
$p
P
    kb=${bs%k}
    dd if="$dev" of=/tmp/back bs="$bs" skip=$((off / kb)) count="$count" iflag=direct 2>/dev/null ||
      fail "reading $name"
    cmp "/tmp/$name" /tmp/back || fail "$name differs"
    echo "$name: equal"
  done
}


degraded() {
  host_device_removed nvme2 60 || fail "QEMU did not remove nvme2"
  $RPC bdev_raid_get_bdevs '{"category": "all"}' | tee /tmp/raid2.json
  grep -q '"state": "online"' /tmp/raid2.json || fail "the array should stay online"
  grep -q '"num_base_bdevs_operational": 2' /tmp/raid2.json || fail "the array should run on two members"
}

verify_after() {
  dev=$(cat /tmp/dev)
  # shellcheck disable=SC2086
  fio $FIO_JOB --filename="$dev" --verify_only --output=/tmp/fio2.txt || { cat /tmp/fio2.txt; fail "verification failed"; }
  cat /tmp/fio2.txt
}

# The unplugged controller comes back on its old image, to vfio-pci, and
# the hotplug monitor attaches it (no RPC); the superblock makes it a
# returning member, rebuilt in place.
# QEMU can keep the unplugged controller object (and its drive's image
# lock) for over a minute after the unplug (DEVICE_DELETED comes only when
# its last reference goes; see host_device_removed): the returning drive
# opens the image without QEMU's file locking. The old object is off the
# bus, so nothing reaches the image through it.
controller_returns() {
  host_qmp '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "nvd2b",
    "file": {"driver": "file", "filename": "@IMAGE_DIR@/nvme2.img", "locking": "off"}}}' || fail "blockdev-add refused"
  host_qmp '{"execute": "device_add", "arguments": {"driver": "nvme", "id": "nvme2", "serial": "NVRAID2",
    "drive": "nvd2b", "bus": "rp2"}}' || fail "device_add refused"
  wait_until 30 nvme_ctrl_by_serial NVRAID2 >/dev/null || fail "the guest did not find NVRAID2 again"
  bdf=$(find_nvme_by_serial NVRAID2)
  echo "NVRAID2 back at $bdf"
  bind_vfio "$bdf" || return 1
  t0=$(uptime_s)
  wait_until 30 hot_inserted "$bdf" || { $RPC bdev_nvme_get_controllers; fail "the hotplug monitor did not attach $bdf"; }
  echo "HotInNvme0 attached $(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { print b - a }') s after the bind"
  $RPC bdev_nvme_get_controllers '{"name": "HotInNvme0"}'
}

# hot_inserted BDF: the monitor's first controller drives BDF
hot_inserted() {
  $RPC bdev_nvme_get_controllers '{"name": "HotInNvme0"}' 2>/dev/null | grep -q "\"traddr\": \"$1\""
}

rebuilt() {
  n=0
  while :; do
    $RPC bdev_raid_get_bdevs '{"category": "all"}' >/tmp/raid3.json
    # A member is "rebuilding" from when it is added until its rebuild ends;
    # the "process" object appears only once the rebuild has started.
    if grep -q '"num_base_bdevs_operational": 3' /tmp/raid3.json && ! grep -q '"process"' /tmp/raid3.json &&
      ! grep -q '"state": "rebuilding"' /tmp/raid3.json; then
      break
    fi
    n=$((n + 1))
    [ "$n" -lt 240 ] || { cat /tmp/raid3.json; fail "no rebuild to three members within 120 s"; }
    sleep 0.5
  done
  cat /tmp/raid3.json
  grep -q '"state": "online"' /tmp/raid3.json || fail "the array should be online"
  grep "N2\|HotInNvme\|hotplug\|rebuil\|resync\|return" /tmp/rig/logs/tgt.log | tail -n 10
}

parity_check() {
  $RPC bdev_raid_check '{"name": "R5"}' | tee /tmp/check.json
  grep -q '"mismatched_blocks": 0' /tmp/check.json || fail "parity mismatches after the rebuild"
}

step vfio-bind bind_all
bg_start tgt nvraid-tgt -m 0x1 --idle sleep -r "$SOCK" -c /tmp/nvraid.json
step target-ready target_ready
step nvme-connect connect
step write-patterns write_patterns
step read-patterns read_patterns
step unplug-under-fio unplug_under_fio nvme2 "$BDF2"
step degraded degraded
step patterns-degraded read_patterns
step fio-verify-degraded verify_after
step controller-returns controller_returns
step rebuilt rebuilt
step parity-check parity_check
step patterns-rebuilt read_patterns
step fio-verify-rebuilt verify_after
step nvme-disconnect nvme disconnect -n "$NQN"
stop_rc=0
bg_stop tgt 30 || stop_rc=$?
step target-stop test "$stop_rc" -eq 0
step controllers-shut-down controllers_shut_down N0 N1 HotInNvme0
