#!/bin/sh
# Prepares a machine for nvraid in the spirit of SPDK's scripts/setup.sh:
# reserves hugepages and binds NVMe controllers to vfio-pci (config), binds
# them back to the kernel nvme driver (reset), or shows where things stand
# (status). POSIX sh, so it also runs under busybox (the QEMU rig).
#
#   scripts/setup.sh [config|reset|status|help]
#
# Environment:
#   HUGEMEM       MiB of hugepages to reserve (default 1024)
#   PCI_ALLOWED   space-separated PCI addresses to act on (default: every NVMe)
#   PCI_BLOCKED   space-separated PCI addresses never to touch
#   DRIVER        userspace driver to bind (default vfio-pci)
#
# A controller with a mounted filesystem, active swap, or a holder (md, dm,
# LVM) on any of its namespaces or their partitions is never taken: the
# script says which block device is in use and where, and leaves it alone
# (exit status 1 if it was named in PCI_ALLOWED).
set -u

SYSFS=${SETUP_SYSFS:-/sys}
PROCFS=${SETUP_PROCFS:-/proc}
HUGEMEM=${HUGEMEM:-1024}
PCI_ALLOWED=${PCI_ALLOWED:-}
PCI_BLOCKED=${PCI_BLOCKED:-}
DRIVER=${DRIVER:-vfio-pci}
NVME_CLASS=0x010802

say() { echo "$*"; }
warn() { echo "setup.sh: $*" >&2; }
die() {
  warn "$*"
  exit 1
}

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
}

# nvme_bdfs: PCI addresses of every NVMe controller (class 01:08:02).
nvme_bdfs() {
  for d in "$SYSFS"/bus/pci/devices/*; do
    [ -e "$d/class" ] || continue
    [ "$(cat "$d/class")" = "$NVME_CLASS" ] && basename "$d"
  done
}

listed() { # listed WORD LIST
  for _w in $2; do [ "$_w" = "$1" ] && return 0; done
  return 1
}

wanted() { # wanted BDF: allowed and not blocked
  listed "$1" "$PCI_BLOCKED" && return 1
  [ -z "$PCI_ALLOWED" ] && return 0
  listed "$1" "$PCI_ALLOWED"
}

driver_of() {
  if [ -e "$SYSFS/bus/pci/devices/$1/driver" ]; then
    basename "$(readlink "$SYSFS/bus/pci/devices/$1/driver")"
  else
    echo "-"
  fi
}

# block_devs BDF: namespaces (nvme0n1) of the controller and their
# partitions (nvme0n1p1), as kernel block device names.
block_devs() {
  for c in "$SYSFS/bus/pci/devices/$1"/nvme/nvme*; do
    [ -d "$c" ] || continue
    for ns in "$c"/nvme*n*; do
      [ -d "$ns" ] || continue
      n=$(basename "$ns")
      echo "$n"
      for p in "$ns"/"$n"p*; do
        [ -d "$p" ] && basename "$p"
      done
    done
  done
  # Native multipath puts namespaces under the subsystem as nvmeXcYnZ
  # paths with a shared nvmeXnZ head; check heads named after our ctrl too.
}

# in_use BDF: prints why the controller must not be taken; status 0 if so.
in_use() {
  _found=1
  for b in $(block_devs "$1"); do
    m=$(awk -v d="/dev/$b" '$1 == d { print $2 }' "$PROCFS/mounts" | head -n 1)
    if [ -n "$m" ]; then
      echo "/dev/$b is mounted on $m"
      _found=0
    fi
    if awk -v d="/dev/$b" '$1 == d { f = 1 } END { exit !f }' "$PROCFS/swaps" 2>/dev/null; then
      echo "/dev/$b is active swap"
      _found=0
    fi
    h=$(ls "$SYSFS/class/block/$b/holders" 2>/dev/null | tr '\n' ' ')
    if [ -n "$h" ]; then
      echo "/dev/$b is held by ${h% } (md/dm/LVM)"
      _found=0
    fi
  done
  return $_found
}

hugepage_kb() {
  awk '/^Hugepagesize:/ { print $2 }' "$PROCFS/meminfo"
}

reserve_hugepages() {
  kb=$(hugepage_kb)
  [ -n "$kb" ] || die "the kernel has no hugepage support (no Hugepagesize in /proc/meminfo)"
  want=$((HUGEMEM * 1024 / kb))
  echo "$want" >"$PROCFS/sys/vm/nr_hugepages" 2>/dev/null || die "cannot write $PROCFS/sys/vm/nr_hugepages (run as root)"
  got=$(cat "$PROCFS/sys/vm/nr_hugepages")
  if [ "$got" -lt "$want" ]; then
    warn "asked for $want hugepages of $kb KiB, the kernel gave $got (memory is fragmented or short)"
  fi
  if ! awk '$3 == "hugetlbfs" { f = 1 } END { exit !f }' "$PROCFS/mounts"; then
    mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages ||
      warn "could not mount hugetlbfs on /dev/hugepages"
  fi
  say "hugepages: $got x $kb KiB reserved"
}

bind_to() { # bind_to BDF DRIVER
  dev=$SYSFS/bus/pci/devices/$1
  cur=$(driver_of "$1")
  [ "$cur" = "$2" ] && return 0
  if [ "$cur" != "-" ]; then
    echo "$1" >"$dev/driver/unbind" || return 1
  fi
  if [ "$2" = nvme ]; then
    echo >"$dev/driver_override" 2>/dev/null || true
  else
    echo "$2" >"$dev/driver_override" || return 1
  fi
  echo "$1" >"$SYSFS/bus/pci/drivers/$2/bind" 2>/dev/null || echo "$1" >"$SYSFS/bus/pci/drivers_probe"
  [ "$(driver_of "$1")" = "$2" ]
}

config() {
  [ "$(id -u)" = 0 ] || die "config needs root"
  if [ -z "$(ls "$SYSFS/kernel/iommu_groups" 2>/dev/null)" ]; then
    die "no IOMMU groups: enable the IOMMU (intel_iommu=on or amd_iommu=on); VFIO no-IOMMU mode is not supported"
  fi
  reserve_hugepages
  modprobe "$DRIVER" 2>/dev/null || true
  [ -d "$SYSFS/bus/pci/drivers/$DRIVER" ] || die "driver $DRIVER is not available (modprobe $DRIVER failed)"
  rc=0
  for bdf in $(nvme_bdfs); do
    wanted "$bdf" || continue
    if why=$(in_use "$bdf"); then
      echo "$why" | while read -r line; do warn "$bdf: $line"; done
      warn "$bdf: not binding a controller with active block devices (unmount them, or leave $bdf out of PCI_ALLOWED)"
      listed "$bdf" "$PCI_ALLOWED" && rc=1
      continue
    fi
    if bind_to "$bdf" "$DRIVER"; then
      g=$(basename "$(readlink "$SYSFS/bus/pci/devices/$bdf/iommu_group")")
      say "$bdf ($(cat "$SYSFS/bus/pci/devices/$bdf/vendor"):$(cat "$SYSFS/bus/pci/devices/$bdf/device")): nvme -> $DRIVER, /dev/vfio/$g"
    else
      warn "$bdf: binding to $DRIVER failed"
      rc=1
    fi
  done
  return $rc
}

reset() {
  [ "$(id -u)" = 0 ] || die "reset needs root"
  modprobe nvme 2>/dev/null || true
  rc=0
  for bdf in $(nvme_bdfs); do
    wanted "$bdf" || continue
    [ "$(driver_of "$bdf")" = nvme ] && continue
    if bind_to "$bdf" nvme; then
      say "$bdf: -> nvme"
    else
      warn "$bdf: binding back to nvme failed"
      rc=1
    fi
  done
  return $rc
}

status() {
  kb=$(hugepage_kb)
  if [ -n "$kb" ]; then
    for h in "$SYSFS"/kernel/mm/hugepages/hugepages-*; do
      [ -d "$h" ] || continue
      say "hugepages $(basename "$h" | sed 's/hugepages-//'): $(cat "$h/nr_hugepages") total, $(cat "$h/free_hugepages") free"
    done
  else
    say "hugepages: not supported by this kernel"
  fi
  printf '%-14s %-11s %-10s %-6s %-6s %s\n' BDF vendor:dev driver numa group "block devices"
  for bdf in $(nvme_bdfs); do
    d=$SYSFS/bus/pci/devices/$bdf
    g=-
    [ -e "$d/iommu_group" ] && g=$(basename "$(readlink "$d/iommu_group")")
    numa=$(cat "$d/numa_node" 2>/dev/null || echo -)
    blk=$(block_devs "$bdf" | tr '\n' ' ')
    printf '%-14s %-11s %-10s %-6s %-6s %s\n' "$bdf" "$(cat "$d/vendor" | sed 's/0x//'):$(cat "$d/device" | sed 's/0x//')" \
      "$(driver_of "$bdf")" "$numa" "$g" "${blk:--}"
    if why=$(in_use "$bdf"); then
      echo "$why" | sed 's/^/    in use: /'
    fi
  done
}

case "${1:-config}" in
config) config ;;
reset) reset ;;
status) status ;;
help | -h | --help) usage ;;
*)
  usage >&2
  exit 2
  ;;
esac
