#!/bin/sh
# Smoke scenario: proves the rig itself (kernel NVMe driver, O_DIRECT IO,
# VFIO binding with the emulated IOMMU, NVMe/TCP modules, nvme-cli).
# Host side: smoke.host.sh checks the pattern written here in the disk image.
set -eu
# shellcheck source=../guest-lib.sh
. /rig/guest-lib.sh

PAT_OFF_BLOCKS=256 # pattern at 1 MiB (4 KiB blocks) into NVRAID0's namespace 1
PAT_BLOCKS=256     # 1 MiB
pattern_file /tmp/pattern $((PAT_BLOCKS * 4096))

check_env() {
  grep -q ' /dev/hugepages hugetlbfs ' /proc/mounts || fail "hugetlbfs not mounted"
  total=$(awk '/^HugePages_Total/ { print $2 }' /proc/meminfo)
  echo "hugepages: $total x 2 MiB"
  [ "$total" -ge "$RIG_HUGEPAGES" ] || fail "only $total hugepages, wanted $RIG_HUGEPAGES"
  [ -e /sys/class/iommu/dmar0 ] || fail "no DMAR IOMMU in /sys/class/iommu"
  ip addr show lo | grep -q 'inet 127.0.0.1' || fail "lo has no 127.0.0.1"
  echo "iommu: dmar0 cap $(cat /sys/class/iommu/dmar0/intel-iommu/cap), lo up"
}

check_controllers() {
  for s in NVRAID0 NVRAID1; do
    wait_until 20 nvme_ctrl_by_serial "$s" >/dev/null
    bdf=$(find_nvme_by_serial "$s")
    dev=$(wait_nvme_serial "$s")
    echo "$s: $(nvme_ctrl_by_serial "$s") at $bdf, $dev ($(cat /sys/block/"${dev#/dev/}"/size) sectors)"
  done
  [ "$(find_nvme_by_serial NVRAID0)" = 0000:00:04.0 ] || fail "NVRAID0 not at 0000:00:04.0"
  [ "$(find_nvme_by_serial NVRAID1)" = 0000:00:05.0 ] || fail "NVRAID1 not at 0000:00:05.0"
}

write_pattern() {
  dev=$(wait_nvme_serial NVRAID0)
  dd if=/tmp/pattern of="$dev" bs=4096 seek=$PAT_OFF_BLOCKS count=$PAT_BLOCKS oflag=direct conv=fsync
}

verify_pattern() {
  dev=$(wait_nvme_serial NVRAID0)
  dd if="$dev" of=/tmp/readback bs=4096 skip=$PAT_OFF_BLOCKS count=$PAT_BLOCKS iflag=direct
  cmp /tmp/pattern /tmp/readback
  echo "read back $PAT_BLOCKS blocks from $dev: equal"
}

check_nvme_cli() {
  nvme version
  dev=$(wait_nvme_serial NVRAID1)
  ctrl=/dev/$(nvme_ctrl_by_serial NVRAID1)
  nvme id-ctrl "$ctrl" | grep -E '^(sn|mn|fr) '
  nvme id-ctrl "$ctrl" | grep -q '^sn *: NVRAID1' || fail "nvme id-ctrl: wrong serial"
  nvme list
}

check_groups() {
  g0=$(iommu_group "$BDF0")
  g1=$(iommu_group "$BDF1")
  echo "$BDF0 -> group $g0, $BDF1 -> group $g1"
  [ "$g0" != "$g1" ] || fail "both controllers share IOMMU group $g0"
  for g in "$g0" "$g1"; do
    set -- "/sys/kernel/iommu_groups/$g/devices"/*
    [ "$#" -eq 1 ] || fail "group $g has $# devices"
  done
}

bind_both() {
  for b in "$BDF0" "$BDF1"; do
    node=$(bind_vfio "$b")
    echo "$b -> vfio-pci, $node"
    [ -c "$node" ] || fail "$node is not a character device"
  done
  [ -c /dev/vfio/vfio ] || fail "no /dev/vfio/vfio"
  ls -l /dev/vfio
  for s in NVRAID0 NVRAID1; do
    if nvme_ctrl_by_serial "$s" >/dev/null; then fail "$s still has a kernel controller"; fi
  done
}

unbind_both() {
  for b in "$BDF0" "$BDF1"; do
    unbind_vfio "$b" nvme
    echo "$b -> $(pci_driver "$b")"
  done
  for s in NVRAID0 NVRAID1; do
    dev=$(wait_nvme_serial "$s")
    echo "$s back: $(nvme_ctrl_by_serial "$s") $dev at $(find_nvme_by_serial "$s")"
  done
}

check_fabrics() {
  modprobe nvme-tcp
  wait_for /dev/nvme-fabrics 5
  [ -c /dev/nvme-fabrics ] || fail "/dev/nvme-fabrics is not a character device"
  grep -E '^nvme_(tcp|fabrics) ' /proc/modules
  # NVMe/TCP digests make the kernel request "crypto-crc32c" by alias
  modprobe crypto-crc32c
  grep -A3 '^name *: crc32c' /proc/crypto | grep driver
}

# The kernel initiator against the kernel's own target (nvmet-tcp) on
# loopback: write the pattern at 2 MiB of NVRAID1 through NVMe/TCP, read it
# back locally. smoke.host.sh finds it in the NVRAID1 image.
NQN=nqn.2024-01.io.nvraid:rig-smoke
check_tcp_loopback() {
  local_dev=$(wait_nvme_serial NVRAID1)
  nvmet_export "$NQN" "$local_dev"
  echo "hostnqn $(cat /etc/nvme/hostnqn)"
  nvme discover -t tcp -a 127.0.0.1 -s 4420 | grep -E 'subnqn|trsvcid'
  tcp_dev=$(nvme_tcp_connect "$NQN")
  echo "connected: $tcp_dev ($(nvme_ctrl_by_nqn "$NQN"))"
  dd if=/tmp/pattern of="$tcp_dev" bs=4096 seek=512 count=$PAT_BLOCKS oflag=direct conv=fsync
  dd if="$tcp_dev" of=/tmp/readback-tcp bs=4096 skip=512 count=$PAT_BLOCKS iflag=direct
  cmp /tmp/pattern /tmp/readback-tcp
  nvme disconnect -n "$NQN"
  nvmet_unexport "$NQN"
  dd if="$local_dev" of=/tmp/readback-local bs=4096 skip=512 count=$PAT_BLOCKS iflag=direct
  cmp /tmp/pattern /tmp/readback-local
  echo "pattern written over NVMe/TCP found on $local_dev"
}

check_bins() {
  for b in $RIG_BINS; do
    p=$(command -v "$b") || fail "$b not on PATH"
    echo "$b -> $p"
    [ -x "$p" ] || fail "$p is not executable"
  done
}

step boot-env check_env
step nvme-controllers check_controllers
BDF0=$(find_nvme_by_serial NVRAID0)
BDF1=$(find_nvme_by_serial NVRAID1)
step odirect-write write_pattern
step odirect-readback verify_pattern
step nvme-cli check_nvme_cli
step iommu-groups check_groups
step vfio-bind bind_both
step vfio-unbind unbind_both
step readback-after-rebind verify_pattern
step nvme-tcp-module check_fabrics
step nvme-tcp-loopback check_tcp_loopback
if [ -n "$RIG_BINS" ]; then
  step extra-bins check_bins
fi
