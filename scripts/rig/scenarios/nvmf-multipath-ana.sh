#!/bin/sh
# Linux native NVMe multipath with ANA against nvraid-tgt, inside the QEMU rig:
#   scripts/rig/run.sh --scenario scripts/rig/scenarios/nvmf-multipath-ana.sh \
#       --bin PATH/nvraid-tgt --bin PATH/nvraid-rpc
# One subsystem with ANA reporting and a malloc namespace, two listeners
# (ports 4420 and 4421). The kernel connects a controller through each and
# shows one multipath disk. Each path's ana_state in sysfs follows
# nvmf_subsystem_listener_set_ana_state (the kernel learns of a change
# from the ANA change notice and reads the ANA log page); IO through the
# multipath disk keeps working while one path is inaccessible, and the
# kernel's iopolicy sends it to the path that is left.
set -eu
# shellcheck source=../guest-lib.sh
. /rig/guest-lib.sh
RIG_STEP_TIMEOUT=90

NQN=nqn.2016-06.io.nvraid:ana
SOCK=/tmp/nvraid.sock
RPC="nvraid-rpc -s $SOCK"

cat >/tmp/nvraid.json <<EOF
{"subsystems": [
 {"subsystem": "bdev", "config": [
  {"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 65536, "block_size": 512}}]},
 {"subsystem": "nvmf", "config": [
  {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
  {"method": "nvmf_create_subsystem", "params": {"nqn": "$NQN", "allow_any_host": true,
     "ana_reporting": true, "max_namespaces": 4, "serial_number": "NVRAIDANA0001"}},
  {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "$NQN", "namespace": {"bdev_name": "M0"}}},
  {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "$NQN",
     "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}}},
  {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "$NQN",
     "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4421"}}}]}
]}
EOF

mkdir -p /var/tmp
bg_start tgt nvraid-tgt -c /tmp/nvraid.json -r "$SOCK" --idle sleep --no-huge --no-pin -m 0x1
step wait-rpc wait_for "$SOCK" 60 || {
  sed 's/^/  tgt| /' /tmp/rig/logs/tgt.log
  exit 1
}

# The kernel controller (nvmeN) connected through PORT.
ctrl_of_port() {
  for c in /sys/class/nvme/nvme*; do
    [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$NQN" ] || continue
    grep -q "trsvcid=$1" "$c/address" 2>/dev/null && { basename "$c"; return 0; }
  done
  return 1
}

# The ANA state the kernel holds for the namespace through PORT.
ana_of_port() {
  _c=$(ctrl_of_port "$1") || return 1
  for p in /sys/block/nvme*c"${_c#nvme}"n1; do
    [ -e "$p/ana_state" ] && { cat "$p/ana_state"; return 0; }
  done
  return 1
}

# The multipath head disk of the subsystem.
head_disk() {
  for s in /sys/class/nvme-subsystem/nvme-subsys*; do
    [ "$(cat "$s/subsysnqn")" = "$NQN" ] || continue
    for d in "$s"/nvme*n1; do
      [ -e "$d" ] && { echo "/dev/$(basename "$d")"; return 0; }
    done
  done
  return 1
}

connect_both() {
  modprobe nvme-tcp
  cat /sys/module/nvme_core/parameters/multipath
  nvme connect -t tcp -a 127.0.0.1 -s 4420 -n "$NQN"
  nvme connect -t tcp -a 127.0.0.1 -s 4421 -n "$NQN"
  wait_until 20 head_disk >/dev/null || fail "no multipath disk"
  wait_until 20 ana_of_port 4421 >/dev/null || fail "no path through 4421"
  c=$(ctrl_of_port 4420)
  nvme id-ctrl "/dev/$c" | grep -E '^(cmic|anatt|anacap|anagrpmax|nanagrpid) '
  nvme ana-log "/dev/$c" || true
  echo "head $(head_disk); 4420: $(ana_of_port 4420); 4421: $(ana_of_port 4421)"
  [ "$(ana_of_port 4420)" = optimized ] && [ "$(ana_of_port 4421)" = optimized ] || fail "paths not optimized"
}
step connect connect_both

# wait_state PORT STATE: waits (20 s) for the kernel to show STATE on PORT's path.
wait_state() {
  _t=0
  while [ "$(ana_of_port "$1")" != "$2" ]; do
    _t=$((_t + 1))
    if [ "$_t" -gt 100 ]; then
      fail "path $1: kernel shows $(ana_of_port "$1"), expected $2"
      return 1
    fi
    sleep 0.2
  done
  echo "path $1: $2"
}

set_state() {
  $RPC nvmf_subsystem_listener_set_ana_state "{\"nqn\": \"$NQN\", \"ana_state\": \"$2\",
    \"listen_address\": {\"trtype\": \"TCP\", \"traddr\": \"127.0.0.1\", \"trsvcid\": \"$1\"}}"
}

io_round() {
  dev=$(head_disk)
  pattern_file /tmp/pattern $((1024 * 1024))
  dd if=/tmp/pattern of="$dev" bs=64k seek="$1" count=16 oflag=direct conv=fsync 2>/dev/null
  dd if="$dev" of=/tmp/rb bs=64k skip="$1" count=16 iflag=direct 2>/dev/null
  cmp /tmp/pattern /tmp/rb
  echo "IO through $dev ok"
}

inaccessible_4420() {
  set_state 4420 inaccessible
  wait_state 4420 inaccessible
  wait_state 4421 optimized
  $RPC nvmf_subsystem_get_listeners "{\"nqn\": \"$NQN\"}"
  io_round 0
}
step inaccessible-4420 inaccessible_4420

non_optimized_4421() {
  set_state 4421 non_optimized
  wait_state 4421 non-optimized
  io_round 32
}
step non-optimized-4421 non_optimized_4421

back_to_optimized() {
  set_state 4420 optimized
  set_state 4421 optimized
  wait_state 4420 optimized
  wait_state 4421 optimized
  io_round 64
}
step back-to-optimized back_to_optimized

controllers() {
  $RPC nvmf_subsystem_get_controllers "{\"nqn\": \"$NQN\"}" | tee /tmp/ctrls.json
  [ "$(grep -o '"cntlid"' /tmp/ctrls.json | wc -l)" -eq 2 ] || fail "expected two controllers"
  $RPC nvmf_subsystem_get_qpairs "{\"nqn\": \"$NQN\"}" >/tmp/qpairs.json
  echo "qpairs: $(grep -o '"qid"' /tmp/qpairs.json | wc -l)"
}
step controllers controllers

step disconnect nvme disconnect -n "$NQN"
bg_stop tgt
