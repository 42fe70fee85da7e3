#!/bin/sh
# An array with a superblock survives a crash of the target, on real
# (emulated) NVMe: both controllers go to vfio-pci, nvraid-tgt attaches them,
# creates a RAID1 with `superblock: true` and exports it; the Linux initiator
# writes a pattern; the target is killed with SIGKILL; a new target started
# with a config that only attaches the controllers and exports "R1" (no raid
# RPC at all) assembles the array from the superblocks it finds on the
# controllers, and the initiator reads the pattern back. Finally the kernel
# nvme driver finds a superblock at block 0 and the pattern at the data
# offset on both mirrors.
set -eu
# shellcheck source=../guest-lib.sh
. /rig/guest-lib.sh
RIG_STEP_TIMEOUT=150

NQN=nqn.2016-06.io.nvraid:sb
SOCK=/tmp/nvraid.sock
RPC="nvraid-rpc -s $SOCK"
PAT_LEN=$((4 * 1024 * 1024))
PAT_OFF_MB=2

BDF0=$(find_nvme_by_serial NVRAID0)
BDF1=$(find_nvme_by_serial NVRAID1)
pattern_file /tmp/pat "$PAT_LEN" "sb-$RIG_NONCE"

bind_both() {
  bind_vfio "$BDF0" && bind_vfio "$BDF1"
}

# $1: "export" adds the NVMe/TCP export of R1 (which only exists once the
# array has assembled: bdev_wait_for_examine waits for that).
write_config() {
  nvmf=""
  if [ "$1" = export ]; then
    nvmf=',
 {"subsystem": "nvmf", "config": [
  {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
  {"method": "nvmf_create_subsystem", "params": {"nqn": "'$NQN'", "allow_any_host": true}},
  {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "'$NQN'", "namespace": {"bdev_name": "R1"}}},
  {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "'$NQN'",
    "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}}}]}'
  fi
  cat >/tmp/nvraid-$1.json <<EOF
{"subsystems": [
 {"subsystem": "bdev", "config": [
  {"method": "bdev_nvme_attach_controller", "params": {"name": "N0", "trtype": "PCIe", "traddr": "$BDF0"}},
  {"method": "bdev_nvme_attach_controller", "params": {"name": "N1", "trtype": "PCIe", "traddr": "$BDF1"}},
  {"method": "bdev_wait_for_examine"}]}$nvmf]}
EOF
}

create_array() {
  wait_for "$SOCK" 90 || { cat /tmp/rig/logs/tgt.log; return 1; }
  $RPC bdev_raid_create '{"name": "R1", "raid_level": "raid1", "base_bdevs": ["N0n1", "N1n1"],
    "superblock": true, "bitmap_chunk_size_kb": 1024}'
  $RPC bdev_raid_get_bdevs '{"category": "online"}' | tee /tmp/raid.json
  grep -q '"superblock": true' /tmp/raid.json || fail "R1 has no superblock"
  $RPC bdev_get_bdevs '{"name": "N0n1"}' >/tmp/n0.json
  $RPC nvmf_create_transport '{"trtype": "TCP"}'
  $RPC nvmf_create_subsystem '{"nqn": "'$NQN'", "allow_any_host": true}'
  $RPC nvmf_subsystem_add_ns '{"nqn": "'$NQN'", "namespace": {"bdev_name": "R1"}}'
  $RPC nvmf_subsystem_add_listener '{"nqn": "'$NQN'", "listen_address":
    {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}}'
}

write_pattern() {
  dev=$(nvme_tcp_connect "$NQN") || return 1
  dd if=/tmp/pat of="$dev" bs=1M seek=$PAT_OFF_MB oflag=direct conv=fsync
  nvme disconnect -n "$NQN"
}

crash() {
  pid=$(cat /tmp/rig/tgt.pid)
  kill -KILL "$pid"
  n=100
  while kill -0 "$pid" 2>/dev/null && [ "$n" -gt 0 ]; do n=$((n - 1)); sleep 0.1; done
  ! kill -0 "$pid" 2>/dev/null
}

assembled() {
  wait_for "$SOCK" 90 || { cat /tmp/rig/logs/tgt2.log; return 1; }
  $RPC bdev_raid_get_bdevs '{"category": "online"}' | tee /tmp/raid2.json
  grep -q '"name": "R1"' /tmp/raid2.json || fail "R1 did not assemble from its superblocks"
  grep -q '"num_base_bdevs_discovered": 2' /tmp/raid2.json || fail "R1 assembled without both members"
}

read_back() {
  dev=$(nvme_tcp_connect "$NQN") || return 1
  dd if="$dev" of=/tmp/back bs=1M skip=$PAT_OFF_MB count=$((PAT_LEN >> 20)) iflag=direct
  nvme disconnect -n "$NQN"
  cmp /tmp/pat /tmp/back
}

back_to_kernel() {
  unbind_vfio "$BDF0" && unbind_vfio "$BDF1"
}

# Block 0 of each mirror starts with the superblock magic; the pattern lies
# at the array's data offset (member blocks).
mirrors_hold_superblock_and_pattern() {
  bs=$(json_num /tmp/n0.json block_size)
  off=$(json_num /tmp/raid.json data_offset)
  echo "member block size $bs, data offset $off blocks"
  [ "$off" -gt 0 ] || fail "no data offset"
  for serial in NVRAID0 NVRAID1; do
    disk=$(wait_nvme_serial "$serial") || return 1
    magic=$(dd if="$disk" bs="$bs" count=1 iflag=direct 2>/dev/null | head -c 8)
    [ "$magic" = NVRAIDSB ] || fail "$serial: no superblock at block 0 ($magic)"
    disk_holds /tmp/pat "$disk" "$bs" $((off + (PAT_OFF_MB << 20) / bs)) ||
      fail "mirror $serial ($disk) does not hold the pattern"
    echo "$serial: superblock and pattern present"
  done
}

step vfio-bind bind_both
write_config plain
write_config export
bg_start tgt nvraid-tgt -m 0x1 --idle sleep -r "$SOCK" -c /tmp/nvraid-plain.json
step create-superblock-array create_array
step write-pattern write_pattern
step target-kill-9 crash
rm -f "$SOCK"
bg_start tgt2 nvraid-tgt -m 0x1 --idle sleep -r "$SOCK" -c /tmp/nvraid-export.json
step assembled-without-rpc assembled
step read-back read_back
stop_rc=0
bg_stop tgt2 30 || stop_rc=$?
step target-stop test "$stop_rc" -eq 0
step vfio-unbind back_to_kernel
step mirrors-hold-superblock-and-pattern mirrors_hold_superblock_and_pattern
