#!/bin/sh
# End to end, as a user would run nvraid: both emulated NVMe controllers go
# to vfio-pci; nvraid-tgt attaches them through VFIO, builds a RAID1 of them
# and exports it over NVMe/TCP on 127.0.0.1:4420; the Linux kernel initiator
# discovers and connects, writes a pattern O_DIRECT and reads it back; one
# controller is detached while IO runs and IO goes on from the other; then
# the target stops and the kernel nvme driver finds the pattern on both
# mirrors at the RAID's data offset. On the way it checks the durability
# contract: the kernel sees a volatile write cache on the array (its members,
# QEMU's NVMe controllers, have one) and none on a malloc namespace, and
# `dd oflag=direct,dsync` writes arrive at both members as FUA writes.
set -eu
# shellcheck source=../guest-lib.sh
. /rig/guest-lib.sh
RIG_STEP_TIMEOUT=150

NQN=nqn.2016-06.io.nvraid:rig
NQN_RAM=nqn.2016-06.io.nvraid:ram
SOCK=/tmp/nvraid.sock
RPC="nvraid-rpc -s $SOCK"
PAT_LEN=$((4 * 1024 * 1024))
PAT_OFF_MB=1    # the pattern's offset inside the array
LOAD_OFF_MB=16  # where IO runs during the member failure

BDF0=$(find_nvme_by_serial NVRAID0)
BDF1=$(find_nvme_by_serial NVRAID1)
pattern_file /tmp/pat "$PAT_LEN"
pattern_file /tmp/pat2 "$PAT_LEN" "load-$RIG_NONCE"

bind_both() {
  bind_vfio "$BDF0" && bind_vfio "$BDF1"
}

write_config() {
  cat >/tmp/nvraid.json <<EOF
{"subsystems": [
 {"subsystem": "bdev", "config": [
  {"method": "bdev_nvme_attach_controller", "params": {"name": "N0", "trtype": "PCIe", "traddr": "$BDF0"}},
  {"method": "bdev_nvme_attach_controller", "params": {"name": "N1", "trtype": "PCIe", "traddr": "$BDF1"}},
  {"method": "bdev_raid_create", "params": {"name": "R1", "raid_level": "raid1", "base_bdevs": ["N0n1", "N1n1"]}},
  {"method": "bdev_malloc_create", "params": {"name": "Ram0", "num_blocks": 8192, "block_size": 512}}]},
 {"subsystem": "nvmf", "config": [
  {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
  {"method": "nvmf_create_subsystem", "params": {"nqn": "$NQN", "allow_any_host": true, "serial_number": "NVRAID0000000001"}},
  {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "$NQN", "namespace": {"bdev_name": "R1"}}},
  {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "$NQN",
    "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}}},
  {"method": "nvmf_create_subsystem", "params": {"nqn": "$NQN_RAM", "allow_any_host": true, "serial_number": "NVRAID0000000002"}},
  {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "$NQN_RAM", "namespace": {"bdev_name": "Ram0"}}},
  {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "$NQN_RAM",
    "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}}}]}]}
EOF
}

target_ready() {
  wait_for "$SOCK" 90 || { cat /tmp/rig/logs/tgt.log; return 1; }
  $RPC bdev_raid_get_bdevs '{"category": "all"}' | tee /tmp/raid.json
  grep -q '"state": "online"' /tmp/raid.json || fail "RAID1 is not online"
  $RPC bdev_get_bdevs '{"name": "N0n1"}' >/tmp/n0.json
}

discover() {
  modprobe nvme-tcp
  nvme discover -t tcp -a 127.0.0.1 -s 4420 | tee /tmp/discover.txt
  grep -q "$NQN" /tmp/discover.txt || fail "discovery log does not list $NQN"
}

connect() {
  dev=$(nvme_tcp_connect "$NQN") || return 1
  echo "$dev" >/tmp/dev
  echo "connected: $dev"
}

write_readback() {
  dev=$(cat /tmp/dev)
  dd if=/tmp/pat of="$dev" bs=1M seek=$PAT_OFF_MB oflag=direct conv=fsync
  dd if="$dev" of=/tmp/back bs=1M skip=$PAT_OFF_MB count=$((PAT_LEN >> 20)) iflag=direct
  cmp /tmp/pat /tmp/back
}

fua_writes() { # bdev
  $RPC bdev_get_iostat "{\"name\": \"$1\"}" >/tmp/iostat.json
  json_num /tmp/iostat.json num_fua_write_ops
}

# The array reports the members' volatile cache, so the kernel sends FUA for
# O_DSYNC writes, and each one reaches both mirrors as a FUA write.
fua_reaches_members() {
  dev=$(cat /tmp/dev)
  wc=$(cat "/sys/block/$(basename "$dev")/queue/write_cache")
  echo "array write_cache: $wc"
  [ "$wc" = "write back" ] || fail "the kernel should see a volatile write cache on the RAID1 of NVMe members"
  before0=$(fua_writes N0n1) && before1=$(fua_writes N1n1)
  # GNU dd (from the .args file; busybox's has no dsync): O_DIRECT|O_DSYNC.
  /rig/bin/dd if=/tmp/pat of="$dev" bs=64k count=16 seek=$((PAT_OFF_MB * 16)) oflag=direct,dsync
  after0=$(fua_writes N0n1) && after1=$(fua_writes N1n1)
  echo "FUA writes at N0n1: $before0 -> $after0, at N1n1: $before1 -> $after1"
  [ "$after0" -ge $((before0 + 16)) ] && [ "$after1" -ge $((before1 + 16)) ] ||
    fail "16 O_DSYNC writes should arrive at both members with FUA"
}

# A malloc namespace has no cache: the kernel must see write through.
ram_namespace_has_no_cache() {
  ram=$(nvme_tcp_connect "$NQN_RAM") || return 1
  wc=$(cat "/sys/block/$(basename "$ram")/queue/write_cache")
  echo "malloc namespace write_cache: $wc"
  nvme disconnect -n "$NQN_RAM"
  [ "$wc" = "write through" ] || fail "a malloc namespace has no volatile write cache"
}

# IO keeps running (writes then reads of a second region) while controller
# N1 is detached from under the RAID.
member_failure() {
  dev=$(cat /tmp/dev)
  (
    for i in 1 2 3 4 5 6; do
      dd if=/tmp/pat2 of="$dev" bs=1M seek=$LOAD_OFF_MB oflag=direct conv=fsync 2>/dev/null || exit 1
      dd if="$dev" of=/tmp/load bs=1M skip=$LOAD_OFF_MB count=$((PAT_LEN >> 20)) iflag=direct 2>/dev/null || exit 1
      cmp -s /tmp/pat2 /tmp/load || exit 2
    done
  ) &
  load=$!
  sleep 1
  $RPC bdev_nvme_detach_controller '{"name": "N1"}'
  wait "$load" || fail "IO failed during the member failure (status $?)"
  $RPC bdev_raid_get_bdevs '{"category": "all"}' | tee /tmp/raid2.json
  grep -q '"num_base_bdevs_operational": 1' /tmp/raid2.json || fail "the array should run on one member"
  dd if="$dev" of=/tmp/back bs=1M skip=$PAT_OFF_MB count=$((PAT_LEN >> 20)) iflag=direct
  cmp /tmp/pat /tmp/back
}

disconnect() {
  nvme disconnect -n "$NQN"
}

back_to_kernel() {
  unbind_vfio "$BDF0" && unbind_vfio "$BDF1"
}

# Both mirrors hold the pattern written before the failure, at the RAID's
# data offset (in member blocks).
mirrors_hold_pattern() {
  bs=$(json_num /tmp/n0.json block_size)
  off=$(json_num /tmp/raid.json data_offset)
  echo "member block size $bs, data offset $off blocks"
  for serial in NVRAID0 NVRAID1; do
    disk=$(wait_nvme_serial "$serial") || return 1
    disk_holds /tmp/pat "$disk" "$bs" $((off + (PAT_OFF_MB << 20) / bs)) ||
      fail "mirror $serial ($disk) does not hold the pattern"
    echo "$serial: pattern present"
  done
}

step vfio-bind bind_both
write_config
bg_start tgt nvraid-tgt -m 0x1 --idle sleep -r "$SOCK" -c /tmp/nvraid.json
step target-ready target_ready
step nvme-discover discover
step nvme-connect connect
step write-readback write_readback
step fua-reaches-members fua_reaches_members
step ram-namespace-has-no-cache ram_namespace_has_no_cache
step member-failure member_failure
step nvme-disconnect disconnect
# bg_stop waits for the daemon, so it runs in this shell (its parent), not
# in a step's subshell; the step records how it went.
stop_rc=0
bg_stop tgt 30 || stop_rc=$?
step target-stop test "$stop_rc" -eq 0
step vfio-unbind back_to_kernel
step mirrors-hold-pattern mirrors_hold_pattern
