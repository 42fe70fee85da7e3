#!/bin/sh
# /init of the rig's initramfs (source: scripts/rig/init.sh), run by busybox ash
# as PID 1. Sets up the guest, runs /scenario.sh, then ends QEMU through
# isa-debug-exit with the pass or fail byte from /etc/rig.conf.
export PATH=/rig/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /dev/hugepages /run /tmp
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t hugetlbfs -o pagesize=2M hugetlbfs /dev/hugepages ||
  echo "RIG-NOTE init: mounting hugetlbfs failed"

# shellcheck source=/dev/null # written by run.sh
. /etc/rig.conf

rig_exit() { # rig_exit BYTE: QEMU exits with (BYTE << 1) | 1
  sync
  # shellcheck disable=SC2059 # the format is the octal escape of BYTE
  printf "\\$(printf %03o "$1")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
  # not reached with isa-debug-exit; otherwise power off (host sees exit 0)
  sleep 1
  poweroff -f
  sleep 5
  echo o >/proc/sysrq-trigger
  while :; do sleep 1; done
}

if grep -qw rig.probe=1 /proc/cmdline; then
  echo "RIG-NOTE probe boot ok"
  rig_exit "$RIG_EXIT_PASS_BYTE"
fi

echo "RIG-NOTE init: kernel $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime)s"
hostname rig
ip link set lo up
echo /sbin/modprobe >/proc/sys/kernel/modprobe
for m in $RIG_BOOT_MODULES; do
  modprobe "$m" || echo "RIG-NOTE init: modprobe $m failed"
done
# Host identity for the NVMe/TCP initiator (nvme gen-hostnqn would take
# QEMU's all-zero SMBIOS UUID).
mkdir -p /etc/nvme
cat /proc/sys/kernel/random/uuid >/etc/nvme/hostid
echo "nqn.2014-08.org.nvmexpress:uuid:$(cat /etc/nvme/hostid)" >/etc/nvme/hostnqn
mkdir -p /tmp/rig
: >/tmp/rig/steps

# Run the scenario with a guest-side watchdog a little shorter than the host's
# hard timeout, so that a hang still ends with diagnostics and a clean verdict.
cd /root || exit 1
echo "RIG-NOTE init: running $RIG_SCENARIO_NAME at $(cut -d' ' -f1 /proc/uptime)s"
sh /scenario.sh &
scen=$!
(
  sleep "$RIG_GUEST_TIMEOUT"
  echo "RIG-STEP scenario-timeout FAIL scenario still running after ${RIG_GUEST_TIMEOUT}s"
  echo "scenario-timeout FAIL" >>/tmp/rig/steps
  echo "---- processes ----"
  ps
  kill -TERM "$scen" 2>/dev/null
  sleep 2
  kill -KILL "$scen" 2>/dev/null
) &
wd=$!
wait "$scen"
rc=$?
kill "$wd" 2>/dev/null

npass=$(grep -c ' PASS' /tmp/rig/steps)
nfail=$(grep -c ' FAIL' /tmp/rig/steps)
if [ "$rc" -eq 0 ] && [ "$nfail" -eq 0 ] && [ "$npass" -gt 0 ]; then
  echo "RIG-RESULT PASS $npass steps at $(cut -d' ' -f1 /proc/uptime)s"
  rig_exit "$RIG_EXIT_PASS_BYTE"
fi
# (a failed step has printed its own dmesg tail)
if [ "$nfail" -eq 0 ] || grep -q '^scenario-timeout ' /tmp/rig/steps; then
  echo "---- dmesg tail ----"
  dmesg | tail -n 20
fi
echo "RIG-RESULT FAIL scenario exit $rc, $nfail failed steps, $npass passed"
rig_exit "$RIG_EXIT_FAIL_BYTE"
