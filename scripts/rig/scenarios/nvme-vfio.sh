#!/bin/sh
# The userspace NVMe driver (crate nvme) on QEMU's emulated controllers
# through VFIO with the emulated IOMMU: scripts/setup.sh binds both to
# vfio-pci (and refuses a controller with a mounted filesystem), nvme_probe
# attaches them, writes a pattern, reads it back, does a large split IO,
# measures polled 4 KiB QD1/QD32 read IOPS (TCG: functional figures only),
# detaches (CC.SHN); then both go back to the kernel nvme driver, which must
# find the pattern. Run:
#   scripts/rig/run.sh --scenario scripts/rig/scenarios/nvme-vfio.sh \
#     --bin target/x86_64-unknown-linux-gnu/release/examples/nvme_probe \
#     --file scripts/setup.sh:/rig/files/setup.sh --module ext4
set -eu
# shellcheck source=../guest-lib.sh
. /rig/guest-lib.sh
RIG_STEP_TIMEOUT=150
SETUP="sh /rig/files/setup.sh"
PAT_OFF=$((1024 * 1024))
PAT_LEN=$((1024 * 1024))

BDF0=$(find_nvme_by_serial NVRAID0)
BDF1=$(find_nvme_by_serial NVRAID1)

refuse_mounted() {
  dev=$(wait_nvme_serial NVRAID1)
  how=mounted
  modprobe ext4 2>/dev/null || true
  if mke2fs -q "$dev" >/dev/null 2>&1 && mkdir -p /mnt/t && mount -t ext2 "$dev" /mnt/t 2>/dev/null; then
    grep " /mnt/t " /proc/mounts
  else
    # No ext2 driver in this initramfs: active swap must be refused the same way.
    how=swap
    mkswap "$dev" >/dev/null && swapon "$dev" || fail "could neither mount nor swapon $dev"
  fi
  rc=0
  PCI_ALLOWED=$BDF1 HUGEMEM=128 $SETUP config || rc=$?
  if [ "$how" = mounted ]; then umount /mnt/t; else swapoff "$dev"; fi
  [ "$rc" -ne 0 ] || fail "setup.sh took a controller whose namespace is in use ($how)"
  [ "$(pci_driver "$BDF1")" = nvme ] || fail "$BDF1 left the nvme driver"
  dd if=/dev/zero of="$dev" bs=4096 count=256 oflag=direct conv=fsync 2>/dev/null
  echo "refused as expected ($how)"
}

bind_both() {
  PCI_ALLOWED="$BDF0 $BDF1" HUGEMEM=128 $SETUP config
  [ "$(pci_driver "$BDF0")" = vfio-pci ] || fail "$BDF0 not on vfio-pci"
  [ "$(pci_driver "$BDF1")" = vfio-pci ] || fail "$BDF1 not on vfio-pci"
  $SETUP status
}

probe() {
  nvme_probe --seconds 3 --pattern "nvraid-rig $RIG_NONCE " --pattern-offset $PAT_OFF "$BDF0" "$BDF1"
}

back_to_kernel() {
  PCI_ALLOWED="$BDF0 $BDF1" $SETUP reset
  [ "$(pci_driver "$BDF0")" = nvme ] || fail "$BDF0 not back on nvme"
  [ "$(pci_driver "$BDF1")" = nvme ] || fail "$BDF1 not back on nvme"
}

kernel_sees_pattern() {
  pattern_file /tmp/pattern $PAT_LEN
  for s in NVRAID0 NVRAID1; do
    dev=$(wait_nvme_serial "$s")
    dd if="$dev" of=/tmp/readback bs=4096 skip=$((PAT_OFF / 4096)) count=$((PAT_LEN / 4096)) iflag=direct 2>/dev/null
    cmp /tmp/pattern /tmp/readback || fail "$s: pattern written through VFIO not found by the kernel driver"
    echo "$s ($dev): pattern written by the userspace driver read back by the kernel: equal"
  done
}

step refuse-in-use refuse_mounted
step setup-config bind_both
step nvme-probe probe
step setup-reset back_to_kernel
step kernel-readback kernel_sees_pattern
