#!/bin/sh
# Helpers for rig scenarios (busybox ash inside the guest). A scenario starts
#   . /rig/guest-lib.sh
# and then calls `step NAME cmd...` for each check. Only the RIG-STEP markers
# decide the verdict; everything else on the console is for people.
#
# Guest layout: /rig/bin (the --bin binaries, first on PATH), /rig/files
# (--file), /etc/rig.conf (RIG_* settings), /tmp/rig/steps (step results),
# /tmp/rig/logs/NAME.log (each step's output), /dev/hugepages (hugetlbfs).
# Disk images: serial NVRAID0 at PCI 0000:00:04.0, NVRAID1 at 0000:00:05.0.

# shellcheck source=/dev/null # written by run.sh
. /etc/rig.conf
mkdir -p /tmp/rig/logs

RIG_STEP_TIMEOUT=${RIG_STEP_TIMEOUT:-120}

rig_note() { echo "RIG-NOTE $*"; }

# kill_tree PID [SIGNAL=KILL]: PID and all its descendants (busybox here has
# no pkill). Each process is stopped before its children are looked up, so
# none is reparented away or forks in between.
kill_tree() {
  kill -STOP "$1" 2>/dev/null || return 0
  for _k in $(awk -v p="$1" '$4 == p { print $1 }' /proc/[0-9]*/stat 2>/dev/null); do
    kill_tree "$_k" "${2:-KILL}"
  done
  kill -"${2:-KILL}" "$1" 2>/dev/null || true
  kill -CONT "$1" 2>/dev/null || true
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }

# step NAME CMD [ARGS...]
# Runs CMD (a command or shell function, in a subshell) with its output in
# /tmp/rig/logs/NAME.log, echoes that output to the console with a "NAME|"
# prefix and prints `RIG-STEP NAME PASS (Ns)` or `RIG-STEP NAME FAIL reason`.
# Returns CMD's status, so under `set -e` a failing step ends the scenario.
# A step is killed after RIG_STEP_TIMEOUT seconds (default 120). Long-running
# daemons belong in bg_start, not in a step (a step waits for its command).
step() {
  _name=$1
  shift
  _log=/tmp/rig/logs/$_name.log
  _t0=$(uptime_s)
  echo "== step $_name: $*"
  ("$@") >"$_log" 2>&1 &
  _pid=$!
  (
    sleep "$RIG_STEP_TIMEOUT"
    echo "step timed out after ${RIG_STEP_TIMEOUT}s" >>"$_log"
    kill_tree "$_pid"
  ) &
  _wd=$!
  _rc=0
  wait "$_pid" || _rc=$? # (no bare status check: scenarios run under set -e)
  kill_tree "$_wd"
  sed "s/^/  $_name| /" "$_log" | tail -n 40
  _dt=$(awk -v a="$_t0" -v b="$(uptime_s)" 'BEGIN { printf "%.2f", b - a }')
  if [ "$_rc" -eq 0 ]; then
    echo "RIG-STEP $_name PASS (${_dt}s)"
    echo "$_name PASS" >>/tmp/rig/steps
  else
    _why=$(grep -v '^[[:space:]]*$' "$_log" | tail -n 1 | cut -c1-160)
    echo "RIG-STEP $_name FAIL exit $_rc: ${_why:-no output}"
    echo "$_name FAIL" >>/tmp/rig/steps
    echo "  ---- dmesg tail ($_name) ----"
    dmesg | tail -n 10 | sed 's/^/  /'
  fi
  return "$_rc"
}

# fail MSG: for use inside step functions: print MSG and return 1
fail() {
  echo "$*" >&2
  return 1
}

# wait_for PATH [TIMEOUT-SECONDS=10]: until PATH exists
wait_for() {
  _n=$(((${2:-10}) * 10))
  while [ ! -e "$1" ]; do
    [ "$_n" -gt 0 ] || { echo "timed out waiting for $1" >&2; return 1; }
    _n=$((_n - 1))
    sleep 0.1
  done
}

# wait_until TIMEOUT-SECONDS CMD...: until CMD succeeds
wait_until() {
  _n=$(($1 * 10))
  shift
  until "$@"; do
    [ "$_n" -gt 0 ] || { echo "timed out waiting for: $*" >&2; return 1; }
    _n=$((_n - 1))
    sleep 0.1
  done
}

_trim() { tr -d ' \t\n'; }

# nvme_ctrl_by_serial SERIAL [TRANSPORT=pcie] -> controller name (nvme0) bound
# to the kernel driver. Names are reused after rebinding: never cache one.
nvme_ctrl_by_serial() {
  for _c in /sys/class/nvme/nvme*; do
    [ -e "$_c/serial" ] || continue
    [ "$(_trim <"$_c/transport")" = "${2:-pcie}" ] || continue
    if [ "$(_trim <"$_c/serial")" = "$1" ]; then
      basename "$_c"
      return 0
    fi
  done
  return 1
}

# nvme_ctrl_by_nqn SUBSYSTEM-NQN [TRANSPORT=tcp] -> controller name (fabrics)
nvme_ctrl_by_nqn() {
  for _c in /sys/class/nvme/nvme*; do
    [ -e "$_c/subsysnqn" ] || continue
    [ "$(_trim <"$_c/transport")" = "${2:-tcp}" ] || continue
    if [ "$(_trim <"$_c/subsysnqn")" = "$1" ]; then
      basename "$_c"
      return 0
    fi
  done
  return 1
}

# find_nvme_by_serial SERIAL -> PCI BDF (0000:00:04.0). Works only while the
# controller is bound to nvme: resolve BDFs before binding to vfio-pci.
find_nvme_by_serial() {
  _c=$(nvme_ctrl_by_serial "$1") || { echo "no nvme controller with serial $1" >&2; return 1; }
  _trim <"/sys/class/nvme/$_c/address"
  echo
}

# nvme_ns_of_ctrl CTRL [NSID=1] -> block device (/dev/nvme0n1). Handles both
# layouts: the disk belongs to the controller, or (native multipath, which
# fabrics controllers that report CMIC get) to the controller's subsystem.
nvme_ns_of_ctrl() {
  for _b in /sys/block/nvme*n*; do
    case ${_b##*/} in *c*) continue ;; esac # hidden per-path disks
    [ -e "$_b/nsid" ] && [ "$(_trim <"$_b/nsid")" = "${2:-1}" ] || continue
    _owner=$(readlink -f "$_b/device")
    if [ "${_owner##*/}" = "$1" ] || [ -e "$_owner/$1" ]; then
      echo "/dev/${_b##*/}"
      return 0
    fi
  done
  echo "no namespace ${2:-1} on $1" >&2
  return 1
}

# nvme_ns_by_serial SERIAL [NSID=1] -> block device of a PCIe controller
nvme_ns_by_serial() {
  _c=$(nvme_ctrl_by_serial "$1") || { echo "no nvme controller with serial $1" >&2; return 1; }
  nvme_ns_of_ctrl "$_c" "${2:-1}"
}

# wait_nvme_serial SERIAL [TIMEOUT=20] -> block device once namespace 1 exists
wait_nvme_serial() {
  _n=$(((${2:-20}) * 10))
  until _dev=$(nvme_ns_by_serial "$1" 2>/dev/null) && [ -b "$_dev" ]; do
    [ "$_n" -gt 0 ] || { echo "timed out waiting for a block device of $1" >&2; return 1; }
    _n=$((_n - 1))
    sleep 0.1
  done
  echo "$_dev"
}

# nvme_tcp_connect NQN [ADDR=127.0.0.1] [PORT=4420] [TIMEOUT=20] -> block
# device of namespace 1 once the kernel initiator has it
nvme_tcp_connect() {
  modprobe nvme-tcp || return 1
  nvme connect -t tcp -a "${2:-127.0.0.1}" -s "${3:-4420}" -n "$1" >&2 || return 1
  _n=$(((${4:-20}) * 10))
  until _c=$(nvme_ctrl_by_nqn "$1") && _dev=$(nvme_ns_of_ctrl "$_c" 2>/dev/null) && [ -b "$_dev" ]; do
    [ "$_n" -gt 0 ] || { echo "timed out waiting for a namespace of $1" >&2; return 1; }
    _n=$((_n - 1))
    sleep 0.1
  done
  echo "$_dev"
}

# nvmet_export NQN BLOCKDEV [PORT=4420] [ADDR=127.0.0.1]: export BLOCKDEV as
# namespace 1 of NQN through the kernel's own NVMe/TCP target (nvmet-tcp), to
# any host. A reference peer for the initiator side; port ids follow PORT.
nvmet_export() {
  modprobe nvmet-tcp || return 1
  grep -q ' /sys/kernel/config configfs ' /proc/mounts ||
    mount -t configfs configfs /sys/kernel/config || return 1
  _s=/sys/kernel/config/nvmet/subsystems/$1
  _p=/sys/kernel/config/nvmet/ports/${3:-4420}
  mkdir "$_s" && echo 1 >"$_s/attr_allow_any_host" &&
    mkdir "$_s/namespaces/1" && printf %s "$2" >"$_s/namespaces/1/device_path" &&
    echo 1 >"$_s/namespaces/1/enable" || return 1
  if [ ! -d "$_p" ]; then
    mkdir "$_p" && echo tcp >"$_p/addr_trtype" && echo ipv4 >"$_p/addr_adrfam" &&
      echo "${4:-127.0.0.1}" >"$_p/addr_traddr" && echo "${3:-4420}" >"$_p/addr_trsvcid" || return 1
  fi
  ln -s "$_s" "$_p/subsystems/$1"
}

# nvmet_unexport NQN [PORT=4420]: undo nvmet_export (disconnect hosts first)
nvmet_unexport() {
  _s=/sys/kernel/config/nvmet/subsystems/$1
  _p=/sys/kernel/config/nvmet/ports/${2:-4420}
  rm -f "$_p/subsystems/$1"
  [ -n "$(ls "$_p/subsystems" 2>/dev/null)" ] || rmdir "$_p" 2>/dev/null || true
  echo 0 >"$_s/namespaces/1/enable" 2>/dev/null || true
  rmdir "$_s/namespaces/1" "$_s"
}

# pci_nvme_bdfs: every NVMe-class PCI function, whatever its driver
pci_nvme_bdfs() {
  for _d in /sys/bus/pci/devices/*; do
    [ "$(cat "$_d/class")" = 0x010802 ] && basename "$_d"
  done
  return 0
}

# pci_driver BDF -> driver name bound to BDF, or "none"
pci_driver() {
  if [ -e "/sys/bus/pci/devices/$1/driver" ]; then
    basename "$(readlink "/sys/bus/pci/devices/$1/driver")"
  else
    echo none
  fi
}

# iommu_group BDF -> group number
iommu_group() {
  [ -e "/sys/bus/pci/devices/$1/iommu_group" ] || { echo "$1 has no IOMMU group" >&2; return 1; }
  basename "$(readlink "/sys/bus/pci/devices/$1/iommu_group")"
}

# bind_vfio BDF -> /dev/vfio/GROUP once the device is bound to vfio-pci
bind_vfio() {
  _dev=/sys/bus/pci/devices/$1
  [ -e "$_dev" ] || { echo "no PCI device $1" >&2; return 1; }
  modprobe vfio-pci || return 1
  modprobe vfio_iommu_type1 || return 1
  if [ -e "$_dev/driver" ]; then
    echo "$1" >"$_dev/driver/unbind" || return 1
  fi
  echo vfio-pci >"$_dev/driver_override" || return 1
  echo "$1" >/sys/bus/pci/drivers/vfio-pci/bind || return 1
  [ "$(pci_driver "$1")" = vfio-pci ] || { echo "$1 is bound to $(pci_driver "$1"), not vfio-pci" >&2; return 1; }
  _g=$(iommu_group "$1") || return 1
  wait_for "/dev/vfio/$_g" 5 || return 1
  echo "/dev/vfio/$_g"
}

# unbind_vfio BDF [DRIVER=nvme]: give BDF back to DRIVER (clears driver_override)
unbind_vfio() {
  _dev=/sys/bus/pci/devices/$1
  [ -e "$_dev" ] || { echo "no PCI device $1" >&2; return 1; }
  if [ -e "$_dev/driver" ]; then
    echo "$1" >"$_dev/driver/unbind" || return 1
  fi
  echo >"$_dev/driver_override" || return 1
  _drv=${2:-nvme}
  modprobe "$_drv" 2>/dev/null || true
  echo "$1" >"/sys/bus/pci/drivers/$_drv/bind" 2>/dev/null ||
    echo "$1" >/sys/bus/pci/drivers_probe
  [ "$(pci_driver "$1")" = "$_drv" ] || { echo "$1 is bound to $(pci_driver "$1"), not $_drv" >&2; return 1; }
}

# bg_start NAME CMD [ARGS...]: start a daemon, output in /tmp/rig/logs/NAME.log
bg_start() {
  _name=$1
  shift
  "$@" >"/tmp/rig/logs/$_name.log" 2>&1 &
  echo $! >"/tmp/rig/$_name.pid"
  rig_note "started $_name (pid $!): $*"
}

# bg_alive NAME: the daemon is still running
bg_alive() { kill -0 "$(cat "/tmp/rig/$1.pid")" 2>/dev/null; }

# bg_stop NAME [TIMEOUT=10]: SIGTERM, wait, SIGKILL; prints the log tail;
# returns 0 only if the daemon had exited by itself or on SIGTERM with status 0
bg_stop() {
  _pid=$(cat "/tmp/rig/$1.pid") || return 1
  kill -TERM "$_pid" 2>/dev/null || true
  _n=$(((${2:-10}) * 10))
  while kill -0 "$_pid" 2>/dev/null && [ "$_n" -gt 0 ]; do
    _n=$((_n - 1))
    sleep 0.1
  done
  if kill -0 "$_pid" 2>/dev/null; then
    kill -KILL "$_pid" 2>/dev/null || true
    echo "$1 ignored SIGTERM; killed" >&2
    _rc=1
  else
    _rc=0
    wait "$_pid" 2>/dev/null || _rc=$?
  fi
  sed "s/^/  $1| /" "/tmp/rig/logs/$1.log" | tail -n 40
  return "$_rc"
}

# json_num FILE KEY: the first integer value of "KEY" in FILE (nvraid-rpc
# prints pretty JSON, one key per line)
json_num() { sed -n "s/.*\"$2\": \([0-9]*\).*/\1/p" "$1" | head -n 1; }

# disk_holds FILE DISK BS BLOCK: DISK holds FILE's bytes from block BLOCK (of
# BS bytes) on, read O_DIRECT
disk_holds() {
  dd if="$2" of=/tmp/disk_holds bs="$3" skip="$4" count=$(($(wc -c <"$1") / $3)) iflag=direct 2>/dev/null &&
    cmp "$1" /tmp/disk_holds
}

# pattern_file PATH BYTES [SEED=$RIG_NONCE]: deterministic test data (also
# reproducible on the host: see scenarios/smoke.host.sh)
pattern_file() {
  yes "nvraid-rig ${3:-$RIG_NONCE} " | head -c "$2" >"$1"
}

# unplug_under_fio ID BDF: fio runs $FIO_JOB (writes with verification) on
# the device in /tmp/dev while QMP device_del removes controller ID (guest
# PCI function BDF) under it. Passes when the guest lets go of BDF (vfio-pci
# waits for nvraid to release it) while fio is still running and fio then
# ends without an IO or verification error.
unplug_under_fio() {
  _dev=$(cat /tmp/dev)
  # shellcheck disable=SC2086 # FIO_JOB is a word list
  fio $FIO_JOB --filename="$_dev" --output=/tmp/fio.txt &
  _fio=$!
  # Unplug early in the run: the scenarios' fio jobs take 6-7 s on an idle
  # host (7-9 MB/s under TCG), longer under load, so IO is still flowing
  # when the guest lets go of the device.
  sleep 1.5
  kill -0 "$_fio" || fail "fio ended before the unplug"
  _t0=$(uptime_s)
  host_qmp "{\"execute\": \"device_del\", \"arguments\": {\"id\": \"$1\"}}" || fail "device_del refused"
  pci_gone_within 60 "$2" ||
    { dmesg | tail -n 20; fail "the guest still has $2: nvraid did not let go"; }
  _gone_after=$(awk -v a="$_t0" -v b="$(uptime_s)" 'BEGIN { print b - a }')
  _running=no
  kill -0 "$_fio" 2>/dev/null && _running=yes
  _rc=0
  wait "$_fio" || _rc=$?
  cat /tmp/fio.txt
  echo "device_del to the guest letting go: $_gone_after s; fio still running then: $_running"
  [ "$_rc" -eq 0 ] || fail "fio failed (status $_rc): IO or verification broke during the unplug"
  [ "$_running" = yes ] || fail "fio ended before the unplug completed: rerun with more IO"
}

# controllers_shut_down NAME...: the stopped target's log shows each local
# NVMe controller NAME shut down (CC.SHN at the orderly shutdown) and no IO
# queue memory left to a controller that might still use it.
controllers_shut_down() {
  for _c in "$@"; do
    grep -Eq "NVMe controller shut down ctrlr=$_c( |\$)" /tmp/rig/logs/tgt.log ||
      fail "controller $_c was not shut down at the target's stop"
  done
  if grep -q "IO queue memory leaked" /tmp/rig/logs/tgt.log; then
    grep "IO queue memory leaked" /tmp/rig/logs/tgt.log
    fail "IO queue memory was left to a controller"
  fi
  grep "NVMe controller shut down" /tmp/rig/logs/tgt.log
}

# host_request LINE...: one request to the host over the host link
# ($RIG_HOSTLINK, the guest's /dev/ttyS1; run.sh's qmp-relay.py answers it):
#   qmp JSON          a QMP command, e.g. '{"execute": "device_del", "arguments": {"id": "nvme1"}}'
#   event NAME SECS   waits up to SECS for the QMP event NAME (kept from any time)
# Prints the answer's JSON; status 1 (with the error on stderr) on an error.
host_request() {
  [ -c "${RIG_HOSTLINK:-}" ] || { echo "no host link" >&2; return 1; }
  stty -F "$RIG_HOSTLINK" raw -echo 2>/dev/null
  _req=$(printf '%s' "$*" | tr '\n' ' ') # one line per request
  exec 7<>"$RIG_HOSTLINK"
  printf '%s\n' "$_req" >&7
  _ans=
  IFS= read -r -t 120 _ans <&7 || true
  exec 7<&-
  echo "RIG-NOTE host: $_req -> ${_ans:-no answer}" >/dev/console
  case $_ans in
    "ok "*) echo "${_ans#ok }" ;;
    *) echo "${_ans:-no answer from the host}" >&2; return 1 ;;
  esac
}
host_qmp() { host_request "qmp $*"; }
host_event() { host_request "event $1 ${2:-30}"; }

# host_device_removed ID [SECS=60]: QEMU has removed the device ID after a
# device_del. QEMU sends DEVICE_DELETED only when the last reference to the
# device object goes (device_finalize), which can trail the unplug itself;
# without the event in time, the device's absence from
# /machine/peripheral (QEMU unparents it at the unplug) is the answer.
host_device_removed() {
  _deadline=$(($(date +%s) + ${2:-60}))
  while :; do
    _left=$((_deadline - $(date +%s)))
    [ "$_left" -gt 0 ] || break
    _ev=$(host_event DEVICE_DELETED "$_left") || break
    case $_ev in *"\"device\": \"$1\""*) return 0 ;; esac
  done
  _peripherals=$(host_qmp '{"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}') || return 1
  case $_peripherals in
    *"\"name\": \"$1\""*)
      echo "QEMU still has $1 (no DEVICE_DELETED within ${2:-60} s)" >&2
      dmesg | tail -n 30 >&2
      return 1
      ;;
  esac
  echo "RIG-NOTE $1 is gone from QEMU's /machine/peripheral; DEVICE_DELETED not seen yet" >/dev/console
}

# pci_gone_within SECS BDF: the guest's PCI device BDF is gone within about
# SECS (a hot-unplug finished; counted in half-second sleeps, since
# wait_until's 0.1 s polls with a fork each run long under TCG).
pci_gone_within() {
  _n=$(($1 * 2))
  while [ -e "/sys/bus/pci/devices/$2" ]; do
    [ "$_n" -gt 0 ] || return 1
    _n=$((_n - 1))
    sleep 0.5
  done
}
