#!/usr/bin/env bash
# Host side of smoke.sh, run by run.sh after QEMU has exited. Checks that the
# pattern the guest wrote through the kernel NVMe driver landed at 1 MiB in
# NVRAID0's image (RIG_IMG0), and the one written over NVMe/TCP at 2 MiB in
# NVRAID1's (RIG_IMG1), with nothing else written there.
# Environment: RIG_IMG0 RIG_IMG1 RIG_IMAGE_DIR RIG_NONCE RIG_CONSOLE_LOG RIG_QEMU_RC
set -euo pipefail
off=$((1024 * 1024))
len=$((1024 * 1024))
cmp <(yes "nvraid-rig $RIG_NONCE " | head -c "$len") \
  <(tail -c +"$((off + 1))" "$RIG_IMG0" | head -c "$len")
echo "NVRAID0: pattern at ${off} equal"
off1=$((2 * 1024 * 1024))
cmp <(yes "nvraid-rig $RIG_NONCE " | head -c "$len") \
  <(tail -c +"$((off1 + 1))" "$RIG_IMG1" | head -c "$len")
echo "NVRAID1: pattern at ${off1} equal"
cmp -n "$off1" "$RIG_IMG1" /dev/zero
rest=$(($(stat -c %s "$RIG_IMG1") - off1 - len))
cmp -n "$rest" <(tail -c +"$((off1 + len + 1))" "$RIG_IMG1") /dev/zero
echo "NVRAID1: zeros elsewhere"
