#!/bin/sh
# NVMe reservations from Linux (nvme-cli over the kernel NVMe/TCP initiator)
# against nvraid-tgt, inside the QEMU rig:
#   scripts/rig/run.sh --scenario scripts/rig/scenarios/nvmf-reservations.sh \
#       --bin PATH/nvraid-tgt
# Two kernel controllers of one subsystem, each with its own host NQN and
# Host Identifier (two hosts to the target). Host A registers (persisting
# through power loss) and takes Write Exclusive; host B's writes get
# Reservation Conflict, its reads run; Reservation Report shows both
# registrants; B preempts A into Exclusive Access and A finds the
# Registration Preempted page in its notification log; after a target
# restart the reservation is back from the namespace's ptpl_file.
set -eu
# shellcheck source=../guest-lib.sh
. /rig/guest-lib.sh
RIG_STEP_TIMEOUT=60

NQN=nqn.2016-06.io.nvraid:resv
SOCK=/tmp/nvraid.sock
ID_A=aaaaaaaa-0000-0000-0000-00000000000a
ID_B=bbbbbbbb-0000-0000-0000-00000000000b
HOST_A=nqn.2014-08.org.nvmexpress:uuid:$ID_A
HOST_B=nqn.2014-08.org.nvmexpress:uuid:$ID_B
PTPL=/var/tmp/resv-ns1.json
BDEV_UUID=5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a5a

mkdir -p /var/tmp
cat >/tmp/nvraid.json <<CFG
{"subsystems": [
 {"subsystem": "bdev", "config": [
  {"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 65536, "block_size": 512,
     "uuid": "$BDEV_UUID"}}]},
 {"subsystem": "nvmf", "config": [
  {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
  {"method": "nvmf_create_subsystem", "params": {"nqn": "$NQN", "allow_any_host": true,
     "serial_number": "NVRAIDRESV0001"}},
  {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "$NQN",
     "namespace": {"bdev_name": "M0", "ptpl_file": "$PTPL"}}},
  {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "$NQN",
     "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}}},
  {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "$NQN",
     "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4421"}}}]}
]}
CFG

# Daemons start and stop at the top level: a step runs in a subshell, which
# cannot wait for them.
start_tgt() {
  rm -f "$SOCK"
  bg_start tgt nvraid-tgt -c /tmp/nvraid.json -r "$SOCK" --idle sleep --no-huge --no-pin -m 0x1
  step "wait-rpc-$1" wait_for "$SOCK" 60 || {
    sed 's/^/  tgt| /' /tmp/rig/logs/tgt.log
    exit 1
  }
}
start_tgt 1

# jnum FILE KEY: the first integer value of "KEY" in nvme-cli's JSON
jnum() { sed -n "s/.*\"$2\" *: *\([0-9]*\).*/\1/p" "$1" | head -n 1; }

# The kernel controller (nvmeN) of host NQN $1.
ctrl_of() {
  for c in /sys/class/nvme/nvme*; do
    [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$NQN" ] || continue
    [ "$(cat "$c/hostnqn" 2>/dev/null)" = "$1" ] && { basename "$c"; return 0; }
  done
  return 1
}

# connect_host HOSTNQN HOSTID PORT (one port per host: nvme-cli takes a
# second host on the same path for a duplicate connection)
connect_host() {
  nvme connect -t tcp -a 127.0.0.1 -s "$3" -n "$NQN" --hostnqn="$1" --hostid="$2"
  wait_until 20 ctrl_of "$1" >/dev/null || fail "no controller for $1"
}

connect_two() {
  modprobe nvme-tcp
  connect_host "$HOST_A" "$ID_A" 4420
  connect_host "$HOST_B" "$ID_B" 4421
  A=$(ctrl_of "$HOST_A")
  nvme id-ctrl "/dev/$A" | grep -E '^oncs '
  nvme id-ns "/dev/$A" -n 1 | grep -E '^rescap '
  nvme id-ns "/dev/$A" -n 1 | grep -q '^rescap *: 0xff' || fail "RESCAP is not 0xff (types 1-6, IEKEY, PTPL)"
}
step connect connect_two

# IO through one controller: io_cmd CTRL read|write -> nvme-cli's status
io_cmd() {
  head -c 512 /dev/zero >/tmp/blk
  if [ "$2" = write ]; then
    nvme io-passthru "/dev/$1" -n 1 --opcode=0x01 --data-len=512 --cdw12=0 --write --input-file=/tmp/blk 2>&1
  else
    nvme io-passthru "/dev/$1" -n 1 --opcode=0x02 --data-len=512 --cdw12=0 --read 2>&1 >/dev/null
  fi
}

expect_conflict() {
  if out=$(io_cmd "$1" "$2"); then
    fail "$2 through $1 succeeded under the reservation"
  fi
  echo "$out"
  echo "$out" | grep -qi conflict || fail "$2 through $1 failed without Reservation Conflict"
}

expect_ok() {
  io_cmd "$1" "$2" >/dev/null || fail "$2 through $1 failed"
  echo "$2 through $1 ok"
}

write_exclusive() {
  A=$(ctrl_of "$HOST_A")
  B=$(ctrl_of "$HOST_B")
  nvme resv-register "/dev/$A" -n 1 --nrkey=0xa --rrega=0 --cptpl=3
  nvme resv-register "/dev/$B" -n 1 --nrkey=0xb --rrega=0
  nvme resv-acquire "/dev/$A" -n 1 --crkey=0xa --rtype=1 --racqa=0
  nvme resv-report "/dev/$B" -n 1 --eds -o json | tee /tmp/report.json
  [ "$(jnum /tmp/report.json rtype)" = 1 ] || fail "report: rtype is not 1"
  [ "$(jnum /tmp/report.json regctl)" = 2 ] || fail "report: regctl is not 2"
  [ "$(jnum /tmp/report.json ptpls)" = 1 ] || fail "report: ptpls is not 1"
  expect_conflict "$B" write
  expect_ok "$B" read
  expect_ok "$A" write
  cat "$PTPL"
}
step write-exclusive write_exclusive

preempt() {
  A=$(ctrl_of "$HOST_A")
  B=$(ctrl_of "$HOST_B")
  nvme resv-acquire "/dev/$B" -n 1 --crkey=0xb --prkey=0xa --rtype=2 --racqa=1
  nvme resv-notif-log "/dev/$A" -o json | tee /tmp/notif.json
  [ "$(jnum /tmp/notif.json rn_log_type)" = 1 ] || fail "A's log page is not Registration Preempted"
  expect_conflict "$A" write
  expect_conflict "$A" read
  expect_ok "$B" write
}
step preempt preempt

step disconnect-all nvme disconnect -n "$NQN"
# A power cycle of the target: the state comes back from the ptpl_file.
bg_stop tgt
start_tgt 2

after_restart() {
  connect_host "$HOST_A" "$ID_A" 4420
  connect_host "$HOST_B" "$ID_B" 4421
  A=$(ctrl_of "$HOST_A")
  B=$(ctrl_of "$HOST_B")
  nvme resv-report "/dev/$B" -n 1 --eds -o json | tee /tmp/report.json
  [ "$(jnum /tmp/report.json rtype)" = 2 ] || fail "after restart: rtype is not 2"
  [ "$(jnum /tmp/report.json regctl)" = 1 ] || fail "after restart: regctl is not 1"
  expect_conflict "$A" read
  expect_ok "$B" write
}
step after-restart after_restart

step disconnect nvme disconnect -n "$NQN"
bg_stop tgt
