#!/bin/sh
# Hot-unplug of a RAID1 member under IO (issue 17): two emulated NVMe
# controllers, each behind its own PCIe root port (--nvme-hotplug), go to
# vfio-pci; nvraid-tgt builds a RAID1 of them and exports it over NVMe/TCP;
# the kernel initiator runs fio with crc32c verification while the host
# removes one controller with QMP device_del. The guest kernel asks vfio-pci
# to give the device up; vfio-pci passes the request on to nvraid (the VFIO
# device request eventfd), which fails the member, lets go of the device and
# keeps serving from the other mirror: fio's verification passes throughout
# and afterwards, the unplug completes (QEMU reports DEVICE_DELETED) and the
# array runs degraded on one member.
set -eu
# shellcheck source=../guest-lib.sh
. /rig/guest-lib.sh
RIG_STEP_TIMEOUT=150

NQN=nqn.2016-06.io.nvraid:hotplug
SOCK=/tmp/nvraid.sock
RPC="nvraid-rpc -s $SOCK"
# fio's region of the array and its job, shared by the write and the
# verify-only pass (same offsets, sizes and seeds).
FIO_JOB="--name=hotplug --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-64k
 --iodepth=8 --size=48M --offset=1M --randrepeat=1 --randseed=1717 --verify=crc32c
 --verify_fatal=1 --verify_backlog=64"

BDF0=$(find_nvme_by_serial NVRAID0)
BDF1=$(find_nvme_by_serial NVRAID1)

bind_both() {
  bind_vfio "$BDF0" && bind_vfio "$BDF1"
}

cat >/tmp/nvraid.json <<JSON
{"subsystems": [
 {"subsystem": "bdev", "config": [
  {"method": "bdev_nvme_attach_controller", "params": {"name": "N0", "trtype": "PCIe", "traddr": "$BDF0"}},
  {"method": "bdev_nvme_attach_controller", "params": {"name": "N1", "trtype": "PCIe", "traddr": "$BDF1"}},
  {"method": "bdev_raid_create", "params": {"name": "R1", "raid_level": "raid1", "base_bdevs": ["N0n1", "N1n1"], "superblock": true}}]},
 {"subsystem": "nvmf", "config": [
  {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
  {"method": "nvmf_create_subsystem", "params": {"nqn": "$NQN", "allow_any_host": true, "serial_number": "NVRAIDHOTPLUG001"}},
  {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "$NQN", "namespace": {"bdev_name": "R1"}}},
  {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "$NQN",
    "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}}}]}]}
JSON

target_ready() {
  wait_for "$SOCK" 90 || { cat /tmp/rig/logs/tgt.log; return 1; }
  $RPC bdev_raid_get_bdevs '{"category": "all"}' | tee /tmp/raid.json
  grep -q '"state": "online"' /tmp/raid.json || fail "RAID1 is not online"
}

connect() {
  modprobe nvme-tcp
  dev=$(nvme_tcp_connect "$NQN") || return 1
  echo "$dev" >/tmp/dev
  echo "connected: $dev"
}

unplug_completed() {
  host_device_removed nvme1 60 || fail "QEMU did not remove nvme1"
}

degraded() {
  $RPC bdev_raid_get_bdevs '{"category": "all"}' | tee /tmp/raid2.json
  grep -q '"state": "online"' /tmp/raid2.json || fail "the array should stay online"
  grep -q '"num_base_bdevs_operational": 1' /tmp/raid2.json || fail "the array should run on one member"
  $RPC bdev_nvme_get_controllers | tee /tmp/ctrlrs.json
  grep -q '"name": "N1"' /tmp/ctrlrs.json && fail "controller N1 should be detached"
  grep -q "device being removed\|VFIO device released" /tmp/rig/logs/tgt.log ||
    fail "the target log does not show the removal request"
  grep "N1\|0000:02" /tmp/rig/logs/tgt.log | tail -n 8
}

# Everything fio wrote reads back from the surviving mirror.
verify_after() {
  dev=$(cat /tmp/dev)
  # shellcheck disable=SC2086
  fio $FIO_JOB --filename="$dev" --verify_only --output=/tmp/fio2.txt || { cat /tmp/fio2.txt; fail "verification failed"; }
  cat /tmp/fio2.txt
}

step vfio-bind bind_both
bg_start tgt nvraid-tgt -m 0x1 --idle sleep -r "$SOCK" -c /tmp/nvraid.json
step target-ready target_ready
step nvme-connect connect
step unplug-under-fio unplug_under_fio nvme1 "$BDF1"
step unplug-completed unplug_completed
step degraded degraded
step verify-after verify_after
step nvme-disconnect nvme disconnect -n "$NQN"
stop_rc=0
bg_stop tgt 30 || stop_rc=$?
step target-stop test "$stop_rc" -eq 0
step controllers-shut-down controllers_shut_down N0
