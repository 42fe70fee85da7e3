#!/usr/bin/env bash
# nvraid QEMU test rig: boots Debian's kernel with a small busybox initramfs
# under QEMU (q35 + emulated intel-iommu + two emulated NVMe controllers), runs
# a scenario script inside the guest and reports its steps.
#
#   scripts/rig/run.sh [--scenario FILE] [--timeout SECONDS] [--bin PATH ...]
#
# See scripts/rig/README.md. Exit status: 0 only when the guest reported a
# pass through isa-debug-exit and no step failed (guest or host side).
set -euo pipefail
shopt -s extglob

RIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${RIG_CACHE:-$RIG_DIR/cache}

# isa-debug-exit: the guest writes one byte V to port 0xf4, QEMU exits with
# (V << 1) | 1. These two values must match init.sh.
EXIT_PASS_BYTE=16   # 0x10 -> QEMU exit status 33
EXIT_FAIL_BYTE=17   # 0x11 -> QEMU exit status 35
QEMU_RC_PASS=$(((EXIT_PASS_BYTE << 1) | 1))
QEMU_RC_FAIL=$(((EXIT_FAIL_BYTE << 1) | 1))

# Bump when the layout of the cached base initramfs changes.
BASE_FORMAT=2
# Modules (with their dependency closure) placed in the initramfs. Names that
# the kernel has built in, or that do not exist, are skipped.
BASE_MODULES=(nvme nvme-core nvme-fabrics nvme-tcp vfio vfio-pci vfio_iommu_type1
  crc32c_generic crc32c-intel intel-iommu virtio_pci virtio_blk hugetlbfs
  configfs nvmet nvmet-tcp
  scsi_transport_iscsi libiscsi libiscsi_tcp iscsi_tcp sd_mod)
# Loaded by /init before the scenario starts.
BOOT_MODULES=(nvme vfio-pci vfio_iommu_type1)

SCENARIO=$RIG_DIR/scenarios/smoke.sh
TIMEOUT=300
BINS=()
FILES=()
EXTRA_MODULES=()
KEEP_IMAGES=
KERNEL=debian
HOST_CHECK=
DISK_SIZE=256M
NVME_COUNT=2
NVME_HOTPLUG=0
QEMU_ARGS=()
MEM_MB=1024
SMP=2
HUGEPAGES=128
APPEND=
ACCEL=auto
VERBOSE=0
PREPARE_ONLY=0

usage() {
  cat <<EOF
usage: $0 [options]
  --scenario FILE      guest scenario script (default: scenarios/smoke.sh)
  --timeout SECONDS    host-side hard limit for the QEMU run (default: $TIMEOUT)
  --bin PATH           extra binary for the guest, on PATH as its basename
                       (copied with its ldd closure if dynamic); repeatable
  --file SRC[:DEST]    extra file for the guest (default DEST: /rig/files/NAME)
  --module NAME        extra kernel module (with dependencies) in the initramfs
  --kernel debian|backports
                       debian: Debian 12's kernel (default); backports: the
                       newest bookworm-backports 6.12 kernel (has NVMe in-band
                       authentication, CONFIG_NVME_HOST_AUTH)
  --keep-images DIR    create the NVMe disk images in DIR and keep them
                       (DIR/nvme0.img = serial NVRAID0, DIR/nvme1.img = NVRAID1)
  --host-check FILE    host script run after QEMU exits (default: the
                       scenario's sibling NAME.host.sh, if it exists)
  --disk-size SIZE     size of each disk image (default: $DISK_SIZE)
  --nvme-count N       emulated NVMe controllers, serials NVRAID0..N-1 on
                       nvme0.img..nvme<N-1>.img, QEMU ids nvme0.. (default: 2)
  --nvme-hotplug       put each controller behind its own pcie-root-port
                       (rp0..), so that QMP device_del/device_add work
  --qemu-arg ARG       one more word for QEMU's command line (repeatable), e.g.
                       --qemu-arg -device --qemu-arg nvme-subsys,id=ss0
  --mem MB             guest RAM (default: $MEM_MB)
  --smp N              guest CPUs (default: $SMP)
  --hugepages N        2 MiB hugepages reserved at boot (default: $HUGEPAGES)
  --append ARGS        extra guest kernel command line
  --accel auto|tcg|kvm auto: kvm only if /proc/cpuinfo has vmx/svm and a
                       probe boot succeeds, else tcg (default: auto)
  --verbose            full kernel log level and echo the whole console
  --prepare            only install packages, fetch the kernel, build the
                       cached base initramfs; do not boot
EOF
}

die() { echo "rig: error: $*" >&2; exit 2; }
note() { echo "rig: $*" >&2; }

while (($#)); do
  case $1 in
    --scenario) SCENARIO=${2:?}; shift 2 ;;
    --timeout) TIMEOUT=${2:?}; shift 2 ;;
    --bin) BINS+=("${2:?}"); shift 2 ;;
    --file) FILES+=("${2:?}"); shift 2 ;;
    --module) EXTRA_MODULES+=("${2:?}"); shift 2 ;;
    --kernel) KERNEL=${2:?}; shift 2 ;;
    --keep-images) KEEP_IMAGES=${2:?}; shift 2 ;;
    --host-check) HOST_CHECK=${2:?}; shift 2 ;;
    --disk-size) DISK_SIZE=${2:?}; shift 2 ;;
    --nvme-count) NVME_COUNT=${2:?}; shift 2 ;;
    --nvme-hotplug) NVME_HOTPLUG=1; shift ;;
    --qemu-arg) QEMU_ARGS+=("${2:?}"); shift 2 ;;
    --mem) MEM_MB=${2:?}; shift 2 ;;
    --smp) SMP=${2:?}; shift 2 ;;
    --hugepages) HUGEPAGES=${2:?}; shift 2 ;;
    --append) APPEND=${2:?}; shift 2 ;;
    --accel) ACCEL=${2:?}; shift 2 ;;
    --verbose) VERBOSE=1; shift ;;
    --prepare) PREPARE_ONLY=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout wants seconds"
[[ $ACCEL =~ ^(auto|tcg|kvm)$ ]] || die "--accel wants auto, tcg or kvm"
[[ $NVME_COUNT =~ ^[1-8]$ ]] || die "--nvme-count wants 1 to 8"
[[ $KERNEL =~ ^(debian|backports)$ ]] || die "--kernel wants debian or backports"
if ((!PREPARE_ONLY)); then
  [[ -f $SCENARIO ]] || die "no such scenario: $SCENARIO"
  SCENARIO=$(readlink -f "$SCENARIO")
  if [[ -z $HOST_CHECK && -f ${SCENARIO%.sh}.host.sh ]]; then
    HOST_CHECK=${SCENARIO%.sh}.host.sh
  fi
  [[ -z $HOST_CHECK || -f $HOST_CHECK ]] || die "no such host check: $HOST_CHECK"
  for b in "${BINS[@]}"; do
    [[ -f $b && -x $b ]] || die "--bin $b: not an executable file"
  done
fi

T_START=$(date +%s.%N)
elapsed() { awk -v s="$T_START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

mkdir -p "$CACHE"
# One setup at a time (package install, kernel download, base image); runs
# themselves use their own directories and may overlap.
exec 9>"$CACHE/.lock"
flock 9

SUDO=()
if ((EUID != 0)); then
  command -v sudo >/dev/null || die "not root and no sudo: cannot install packages"
  SUDO=(sudo)
fi

APT_UPDATED=0
apt_update_once() {
  ((APT_UPDATED)) && return 0
  note "apt-get update"
  "${SUDO[@]}" apt-get update -qq -o DPkg::Lock::Timeout=300 >"$CACHE/apt-update.log" 2>&1 ||
    { cat "$CACHE/apt-update.log" >&2; die "apt-get update failed"; }
  APT_UPDATED=1
}

# shellcheck disable=SC2016 # ${Status} is dpkg-query's, not ours
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }

apt_install() {
  note "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q \
    -o DPkg::Lock::Timeout=300 --no-install-recommends "$@" >"$CACHE/apt-install.log" 2>&1 ||
    { tail -n 30 "$CACHE/apt-install.log" >&2; die "apt-get install $* failed"; }
}

install_packages() {
  local need=() p
  for p in qemu-system-x86 busybox-static cpio kmod nvme-cli xz-utils open-iscsi fio; do
    pkg_installed "$p" || need+=("$p")
  done
  ((${#need[@]})) || return 0
  # Installing Debian 12's qemu-system-x86 can replace a newer qemu-utils
  # (backports) with Debian 12's; keep a working qemu-img for whoever needs it.
  local had_qemu_img=0
  qemu-img --version >/dev/null 2>&1 && had_qemu_img=1
  apt_update_once
  apt_install "${need[@]}"
  if ((had_qemu_img)) && ! qemu-img --version >/dev/null 2>&1; then
    apt_install qemu-utils
  fi
}

# ---- kernel: Debian's linux-image, resolved through linux-image-amd64 -------
# apt-cache takes ~2 s per call here (no pkgcache.bin in Docker-built images),
# so the answer is remembered for as long as the package lists do not change.
resolve_kernel_pkg() { # -> "PACKAGE VERSION" of the current Debian kernel
  local key f pkg ver
  key=$(stat -c '%n %Y %s' /var/lib/apt/lists/*Packages* 2>/dev/null | sha256sum | cut -c1-16)
  f=$CACHE/kernel/resolved-$key
  if [[ -s $f ]]; then
    cat "$f"
    return 0
  fi
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\).*/\1/p' | head -n 1)
  [[ -n $pkg ]] || return 0
  ver=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)
  rm -f "$CACHE"/kernel/resolved-*
  echo "$pkg $ver" | tee "$f"
}

# Uncompressed ELF vmlinux out of the bzImage: QEMU boots it through PVH
# (CONFIG_PVH) and skips the in-guest decompression (~6 s under TCG).
extract_vmlinux() { # extract_vmlinux BZIMAGE CONFIG OUT
  grep -q '^CONFIG_PVH=y' "$2" || return 1
  local magic off
  local -a cmd
  # (bash strings stop at NUL: the xz magic is matched without its last byte)
  for magic in $'\xfd7zXZ:xz -dc' $'\x28\xb5\x2f\xfd:zstd -qdc' $'\x1f\x8b\x08:gzip -dc'; do
    read -ra cmd <<<"${magic#*:}"
    off=$(LC_ALL=C grep -aboF "${magic%%:*}" "$1" 2>/dev/null | head -n 1 | cut -d: -f1) || true
    [[ -n $off ]] || continue
    tail -c +"$((off + 1))" "$1" | "${cmd[@]}" >"$3" 2>/dev/null || true
    [[ $(head -c 4 "$3" 2>/dev/null) == $'\x7fELF' ]] && return 0
  done
  rm -f "$3"
  return 1
}

fetch_kernel() {
  local res pkg ver
  mkdir -p "$CACHE/kernel"
  res=$(resolve_kernel_pkg)
  if [[ -z $res ]]; then
    apt_update_once
    res=$(resolve_kernel_pkg)
  fi
  read -r pkg ver <<<"$res"
  [[ -n ${pkg:-} ]] || die "apt-cache depends linux-image-amd64 names no kernel package"
  KDIR=$CACHE/kernel/${pkg}_${ver}
  if [[ ! -f $KDIR/.done ]]; then
    note "fetching kernel package $pkg $ver"
    rm -rf "$KDIR" "$CACHE/kernel/.tmp"
    mkdir -p "$CACHE/kernel/.tmp"
    local dl=(apt-get download -q -o APT::Sandbox::User=root "$pkg")
    if ! (cd "$CACHE/kernel/.tmp" && "${dl[@]}" >../download.log 2>&1); then
      # Stale package lists name a version the mirror no longer has.
      apt_update_once
      read -r pkg ver <<<"$(resolve_kernel_pkg)"
      KDIR=$CACHE/kernel/${pkg}_${ver}
      dl=(apt-get download -q -o APT::Sandbox::User=root "$pkg")
      (cd "$CACHE/kernel/.tmp" && "${dl[@]}" >../download.log 2>&1) ||
        { cat "$CACHE/kernel/download.log" >&2; die "apt-get download $pkg failed"; }
    fi
    rm -rf "$KDIR.tmp"
    mkdir -p "$KDIR.tmp"
    dpkg-deb -x "$CACHE"/kernel/.tmp/*.deb "$KDIR.tmp/root"
    local kv
    kv=$(ls "$KDIR.tmp/root/lib/modules")
    [[ -n $kv && -f $KDIR.tmp/root/boot/vmlinuz-$kv ]] || die "unexpected layout in $pkg"
    depmod -b "$KDIR.tmp/root" "$kv"
    echo "$kv" >"$KDIR.tmp/version"
    rm -rf "$CACHE/kernel/.tmp"
    # Keep only the newest kernel in the cache.
    find "$CACHE/kernel" -mindepth 1 -maxdepth 1 -type d -name 'linux-image-*' \
      ! -name "$(basename "$KDIR").tmp" -exec rm -rf {} +
    mv "$KDIR.tmp" "$KDIR"
    touch "$KDIR/.done"
  fi
  KVER=$(cat "$KDIR/version")
  KROOT=$KDIR/root
  VMLINUZ=$KROOT/boot/vmlinuz-$KVER
  if [[ ! -f $KDIR/vmlinux && ! -f $KDIR/.no-pvh ]]; then
    extract_vmlinux "$VMLINUZ" "$KROOT/boot/config-$KVER" "$KDIR/vmlinux" || {
      note "no PVH-bootable vmlinux in $(basename "$KDIR"): booting the bzImage (slower)"
      touch "$KDIR/.no-pvh"
    }
  fi
  [[ -f $KDIR/vmlinux ]] && VMLINUZ=$KDIR/vmlinux
  return 0
}

# ---- kernel: bookworm-backports' 6.12 (--kernel backports) -------------------
# Debian 12's 6.1 has no NVMe in-band authentication (CONFIG_NVME_AUTH unset);
# the backports 6.12 kernels have it. The suite is read through a private
# sources list, lists and cache directory: the host's apt setup is untouched.
# Kernel and base initramfs live in their own cache directories, so the two
# kernels never evict each other.
BACKPORTS_SERIES=6.12
backports_apt() { # backports_apt apt-get|apt-cache ARGS...
  local d=$CACHE/apt-backports cmd=$1
  shift
  "$cmd" -o Dir::Etc::SourceList="$d/sources.list" -o Dir::Etc::SourceParts="$d/sources.list.d" \
    -o Dir::State::Lists="$d/lists" -o Dir::Cache="$d/cache" -o APT::Sandbox::User=root "$@"
}

backports_update() {
  local d=$CACHE/apt-backports
  mkdir -p "$d/sources.list.d" "$d/lists/partial" "$d/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" \
    >"$d/sources.list"
  note "apt-get update (bookworm-backports, private lists in $d)"
  backports_apt apt-get update -qq >"$d/update.log" 2>&1 && touch "$d/updated"
}

resolve_backports_kernel() { # -> "PACKAGE VERSION" of the newest 6.12 amd64 kernel
  local pkg ver
  pkg=$(backports_apt apt-cache pkgnames "linux-image-$BACKPORTS_SERIES." 2>/dev/null |
    grep -E "^linux-image-${BACKPORTS_SERIES//./\\.}\.[0-9]+\+deb12(\.[0-9]+)?-amd64\$" | sort -V | tail -n 1)
  [[ -n $pkg ]] || return 0
  ver=$(backports_apt apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)
  echo "$pkg $ver"
}

fetch_backports_kernel() {
  local kc=$CACHE/kernel-backports res pkg ver kv
  mkdir -p "$kc"
  # The private lists are refreshed once a day (~1 s); offline, the newest
  # cached kernel is used.
  if [[ -z $(find "$CACHE/apt-backports/updated" -mmin -1440 2>/dev/null) ]]; then
    backports_update || note "bookworm-backports update failed (see $CACHE/apt-backports/update.log)"
  fi
  res=$(resolve_backports_kernel)
  read -r pkg ver <<<"$res"
  if [[ -z ${pkg:-} ]]; then
    KDIR=$(find "$kc" -mindepth 1 -maxdepth 1 -type d -name 'linux-image-*' | sort -V | tail -n 1)
    [[ -n $KDIR && -f $KDIR/.done ]] || die "no bookworm-backports linux-image-$BACKPORTS_SERIES package found"
  else
    KDIR=$kc/${pkg}_${ver}
  fi
  if [[ ! -f $KDIR/.done ]]; then
    note "fetching kernel package $pkg $ver (bookworm-backports)"
    rm -rf "$kc/.tmp"
    mkdir -p "$kc/.tmp"
    if ! (cd "$kc/.tmp" && backports_apt apt-get download -q "$pkg" >../download.log 2>&1); then
      cat "$kc/download.log" >&2
      KDIR=$(find "$kc" -mindepth 1 -maxdepth 1 -type d -name 'linux-image-*' ! -name '*.tmp' | sort -V | tail -n 1)
      [[ -n $KDIR && -f $KDIR/.done ]] || die "apt-get download $pkg (bookworm-backports) failed"
      note "apt-get download $pkg failed: using the cached $(basename "$KDIR")"
    fi
  fi
  if [[ ! -f $KDIR/.done ]]; then
    rm -rf "$KDIR.tmp"
    mkdir -p "$KDIR.tmp"
    dpkg-deb -x "$kc"/.tmp/*.deb "$KDIR.tmp/root"
    kv=$(ls "$KDIR.tmp/root/lib/modules")
    [[ -n $kv && -f $KDIR.tmp/root/boot/vmlinuz-$kv ]] || die "unexpected layout in $pkg"
    grep -q '^CONFIG_NVME_HOST_AUTH=y' "$KDIR.tmp/root/boot/config-$kv" ||
      note "warning: $pkg has no CONFIG_NVME_HOST_AUTH"
    depmod -b "$KDIR.tmp/root" "$kv"
    echo "$kv" >"$KDIR.tmp/version"
    rm -rf "$kc/.tmp"
    # Keep only the newest backports kernel (the Debian 12 one is elsewhere).
    find "$kc" -mindepth 1 -maxdepth 1 -type d -name 'linux-image-*' \
      ! -name "$(basename "$KDIR").tmp" -exec rm -rf {} +
    mv "$KDIR.tmp" "$KDIR"
    touch "$KDIR/.done"
  fi
  KVER=$(cat "$KDIR/version")
  KROOT=$KDIR/root
  VMLINUZ=$KROOT/boot/vmlinuz-$KVER
  if [[ ! -f $KDIR/vmlinux && ! -f $KDIR/.no-pvh ]]; then
    extract_vmlinux "$VMLINUZ" "$KROOT/boot/config-$KVER" "$KDIR/vmlinux" || touch "$KDIR/.no-pvh"
  fi
  [[ -f $KDIR/vmlinux ]] && VMLINUZ=$KDIR/vmlinux
  # NVMe authentication is a module there (nvme-core pulls it in; named
  # here so the initramfs has it even if that changes).
  EXTRA_MODULES+=(nvme-auth nvme-keyring)
  INITRAMFS_CACHE=$CACHE/initramfs-backports
}

# ---- initramfs ----------------------------------------------------------------
# Copy an executable and, if it is dynamic, its ldd closure into $2.
copy_with_libs() {
  local src=$1 root=$2 dest=${3:-$1} lib
  mkdir -p "$root$(dirname "$dest")"
  cp -L "$src" "$root$dest"
  chmod 0755 "$root$dest"
  if ldd "$src" >/dev/null 2>&1; then
    for lib in $(ldd "$src" | grep -oE '/[^ ]+'); do
      [[ -e $lib ]] || continue
      mkdir -p "$root$(dirname "$lib")"
      [[ -e $root$lib ]] || cp -L "$lib" "$root$lib"
    done
  fi
}

# Uncompressed: under TCG, unpacking is faster than gunzip in the guest.
make_cpio() { # make_cpio DIR OUT
  (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$2"
}

module_closure() {
  local m
  for m in "$@"; do
    modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" 2>/dev/null || true
  done | awk '$1 == "insmod" { print $2 }' | sort -u
}

build_base() {
  local mods=("${BASE_MODULES[@]}" "${EXTRA_MODULES[@]}")
  local key
  # shellcheck disable=SC2016 # ${Version} is dpkg-query's
  key=$(printf '%s\n' "$BASE_FORMAT" "$KVER" "$(basename "$KDIR")" "${mods[@]}" \
    "$(dpkg-query -W -f='${Version}' busybox-static nvme-cli open-iscsi)" | sha256sum | cut -c1-16)
  BASE_CPIO=$INITRAMFS_CACHE/base-$key.cpio
  [[ -f $BASE_CPIO ]] && return 0
  note "building base initramfs ($KVER)"
  local st=$INITRAMFS_CACHE/.stage
  rm -rf "$st"
  mkdir -p "$st"/{bin,sbin,usr/bin,usr/sbin,etc/nvme,proc,sys,dev,tmp,run,root,mnt,var/log}
  # busybox and its applets
  cp /bin/busybox "$st/bin/busybox"
  local a
  for a in $("$st/bin/busybox" --list-full); do
    [[ $a == linuxrc || -e $st/$a ]] && continue
    mkdir -p "$st/$(dirname "$a")"
    ln -s /bin/busybox "$st/$a"
  done
  ln -sf /bin/busybox "$st/sbin/modprobe"
  # The kernel opens /dev/console for init before devtmpfs is mounted.
  mknod -m 600 "$st/dev/console" c 5 1 2>/dev/null || true
  mknod -m 666 "$st/dev/null" c 1 3 2>/dev/null || true
  # nvme-cli (dynamic) with its libraries
  copy_with_libs "$(command -v nvme)" "$st" /usr/sbin/nvme
  # open-iscsi: the initiator daemon, its admin tool and default config
  copy_with_libs /sbin/iscsid "$st" /sbin/iscsid
  copy_with_libs /sbin/iscsiadm "$st" /sbin/iscsiadm
  copy_with_libs /sbin/iscsi-iname "$st" /sbin/iscsi-iname
  mkdir -p "$st/etc/iscsi" "$st/var/lib/iscsi" # (/run is a tmpfs: scenarios make /run/lock/iscsi)
  cp /etc/iscsi/iscsid.conf "$st/etc/iscsi/iscsid.conf"
  # kernel modules: closure of the list, then a fresh depmod over just those
  local src rel n=0
  while read -r src; do
    rel=${src#"$KROOT"}
    mkdir -p "$st$(dirname "$rel")"
    case $src in
      *.ko.xz) xz -dc "$src" >"$st${rel%.xz}" ;;
      *.ko.zst) zstd -qdc "$src" >"$st${rel%.zst}" ;;
      *.ko.gz) gzip -dc "$src" >"$st${rel%.gz}" ;;
      *) cp "$src" "$st$rel" ;;
    esac
    n=$((n + 1))
  done < <(module_closure "${mods[@]}")
  local md=lib/modules/$KVER
  mkdir -p "$st/$md"
  cp "$KROOT/$md"/modules.{order,builtin,builtin.modinfo} "$st/$md/" 2>/dev/null || true
  depmod -b "$st" "$KVER"
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$st/etc/passwd"
  printf 'root:x:0:\n' >"$st/etc/group"
  printf '127.0.0.1 localhost\n::1 localhost\n' >"$st/etc/hosts"
  mkdir -p "$INITRAMFS_CACHE"
  rm -f "$INITRAMFS_CACHE"/base-*.cpio
  make_cpio "$st" "$BASE_CPIO.tmp"
  mv "$BASE_CPIO.tmp" "$BASE_CPIO"
  rm -rf "$st"
  note "base initramfs: $n modules, $(du -h "$BASE_CPIO" | cut -f1)"
}

build_overlay() { # per run: init, guest library, scenario, extra binaries/files
  local st=$RUN_DIR/overlay b
  mkdir -p "$st/rig/bin" "$st/rig/files" "$st/etc"
  install -m 0755 "$RIG_DIR/init.sh" "$st/init"
  install -m 0644 "$RIG_DIR/guest-lib.sh" "$st/rig/guest-lib.sh"
  install -m 0755 "$SCENARIO" "$st/scenario.sh"
  local names=()
  for b in "${BINS[@]}"; do
    copy_with_libs "$b" "$st" "/rig/bin/$(basename "$b")"
    names+=("$(basename "$b")")
  done
  local f src dest
  for f in "${FILES[@]}"; do
    src=${f%%:*}
    dest=${f#*:}
    [[ $f == *:* ]] || dest=/rig/files/$(basename "$src")
    [[ -e $src ]] || die "--file $src: no such file"
    mkdir -p "$st$(dirname "$dest")"
    cp -a "$src" "$st$dest"
  done
  {
    echo "RIG_EXIT_PASS_BYTE=$EXIT_PASS_BYTE"
    echo "RIG_EXIT_FAIL_BYTE=$EXIT_FAIL_BYTE"
    echo "RIG_BOOT_MODULES='${BOOT_MODULES[*]}'"
    echo "RIG_BINS='${names[*]}'"
    echo "RIG_SCENARIO_NAME='$(basename "$SCENARIO")'"
    echo "RIG_NONCE='$RIG_NONCE'"
    echo "RIG_HUGEPAGES=$HUGEPAGES"
    echo "RIG_VERBOSE=$VERBOSE"
    echo "RIG_GUEST_TIMEOUT=$(( TIMEOUT > 45 ? TIMEOUT - 25 : 20 ))"
    echo "RIG_NVME_COUNT=$NVME_COUNT"
    echo "RIG_HOSTLINK=/dev/ttyS1"
  } >"$st/etc/rig.conf"
  make_cpio "$st" "$RUN_DIR/overlay.cpio"
  cat "$BASE_CPIO" "$RUN_DIR/overlay.cpio" >"$RUN_DIR/initramfs.cpio"
}

# ---- QEMU ---------------------------------------------------------------------
qemu_cmd() { # qemu_cmd ACCEL [EXTRA-CMDLINE] -> QEMU array
  local accel=$1 extra=${2:-} loglevel=4
  ((VERBOSE)) && loglevel=7
  QEMU=(qemu-system-x86_64 -accel "$accel"
    -machine q35,kernel-irqchip=split -device intel-iommu,intremap=on,aw-bits=48
    -cpu max -smp "$SMP" -m "$MEM_MB"
    -nographic -nodefaults -serial stdio -monitor none -no-reboot -nic none
    -kernel "$VMLINUZ" -initrd "$RUN_DIR/initramfs.cpio"
    -append "console=ttyS0 panic=-1 intel_iommu=on init_on_alloc=0 hugepagesz=2M hugepages=$HUGEPAGES loglevel=$loglevel $APPEND $extra"
    -device isa-debug-exit,iobase=0xf4,iosize=0x04)
  # The NVMe controllers: on the root bus at 00:04.0, 00:05.0, ..., or with
  # --nvme-hotplug each behind a root port there (bus 1, 2, ...).
  local i
  for ((i = 0; i < NVME_COUNT; i++)); do
    QEMU+=(-drive "file=$IMG_DIR/nvme$i.img,if=none,id=nvd$i,format=raw,cache=unsafe")
    if ((NVME_HOTPLUG)); then
      QEMU+=(-device "pcie-root-port,id=rp$i,bus=pcie.0,chassis=$((i + 1)),slot=$((i + 1)),addr=$(printf %#x $((4 + i)))"
        -device "nvme,id=nvme$i,serial=NVRAID$i,drive=nvd$i,bus=rp$i")
    else
      QEMU+=(-device "nvme,id=nvme$i,serial=NVRAID$i,drive=nvd$i,addr=$(printf %#x $((4 + i)))")
    fi
  done
  # QMP for the host, and a second serial port (guest /dev/ttyS1) whose
  # requests qmp-relay.py turns into QMP commands (README: "QMP").
  QEMU+=(-qmp "unix:$RUN_DIR/qmp.sock,server=on,wait=off"
    -chardev "socket,id=hostlink,path=$RUN_DIR/hostlink.sock,server=on,wait=off"
    -device isa-serial,chardev=hostlink "${QEMU_ARGS[@]}")
}

pick_accel() {
  [[ $ACCEL == tcg ]] && { echo tcg; return; }
  if [[ $ACCEL == auto ]] && ! grep -qwE 'vmx|svm' /proc/cpuinfo; then
    echo tcg
    return
  fi
  # /dev/kvm alone proves nothing (a PVM module hangs Debian kernels): boot
  # once with init in probe mode and remember the verdict per host + QEMU.
  local key verdict f
  key=$(printf '%s\n' "$(uname -r)" "$(qemu-system-x86_64 --version | head -n 1)" | sha256sum | cut -c1-12)
  f=$CACHE/accel-$key
  if [[ ! -f $f ]]; then
    verdict=tcg
    if [[ -r /dev/kvm && -w /dev/kvm ]]; then
      qemu_cmd kvm rig.probe=1
      local rc=0
      timeout -k 5 20 "${QEMU[@]}" </dev/null >"$RUN_DIR/kvm-probe.log" 2>&1 || rc=$?
      ((rc == QEMU_RC_PASS)) && verdict=kvm
    fi
    echo "$verdict" >"$f"
    note "kvm probe: using $verdict (remembered in $f)"
  fi
  cat "$f"
}

# ---- main -----------------------------------------------------------------------
install_packages
INITRAMFS_CACHE=$CACHE/initramfs
if [[ $KERNEL == backports ]]; then fetch_backports_kernel; else fetch_kernel; fi
build_base
T_SETUP=$(elapsed)
if ((PREPARE_ONLY)); then
  note "prepared: kernel $KVER, $(basename "$BASE_CPIO") in ${T_SETUP}s"
  exit 0
fi

mkdir -p "$CACHE/runs"
RUN_DIR=$(mktemp -d "$CACHE/runs/$(date +%Y%m%d-%H%M%S)-XXXX")
# keep the last 10 run directories
find "$CACHE/runs" -mindepth 1 -maxdepth 1 -type d | LC_ALL=C sort | head -n -10 |
  while read -r d; do rm -rf "$d"; done
RIG_NONCE=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
build_overlay
flock -u 9

IMG_DIR=$RUN_DIR
if [[ -n $KEEP_IMAGES ]]; then
  mkdir -p "$KEEP_IMAGES"
  IMG_DIR=$(readlink -f "$KEEP_IMAGES")
fi
IMG0=$IMG_DIR/nvme0.img
IMG1=$IMG_DIR/nvme1.img
IMGS=()
for ((i = 0; i < NVME_COUNT; i++)); do IMGS+=("$IMG_DIR/nvme$i.img"); done
rm -f "${IMGS[@]}"
truncate -s "$DISK_SIZE" "${IMGS[@]}"

ACCEL_USED=$(pick_accel)
qemu_cmd "$ACCEL_USED"
LOG=$RUN_DIR/console.log
ln -sfn "$LOG" "$CACHE/latest-console.log"
printf '%q ' "${QEMU[@]}" >"$RUN_DIR/qemu-cmdline"
note "kernel $KVER, accel $ACCEL_USED, scenario $(basename "$SCENARIO"), timeout ${TIMEOUT}s, setup ${T_SETUP}s"
note "console log: $LOG"

# Stream the console: everything to the log, RIG- markers (or everything with
# --verbose) to our stdout.
# The guest's QMP requests (on its /dev/ttyS1): relayed until QEMU exits.
python3 "$RIG_DIR/qmp-relay.py" "$RUN_DIR/qmp.sock" "$RUN_DIR/hostlink.sock" "$RUN_DIR/qmp.log" \
  "$IMG_DIR" </dev/null >/dev/null 2>&1 &
RELAY_PID=$!

QEMU_RC=0
set +e
timeout -k 5 "$TIMEOUT" "${QEMU[@]}" </dev/null 2>&1 |
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line//$'\r'/}
    line=${line//$'\e'@(c|\[*([0-9;?])[a-zA-Z])/} # SeaBIOS' terminal resets
    printf '%s\n' "$line" >>"$LOG"
    if ((VERBOSE)); then
      printf '  | %s\n' "$line"
    elif [[ $line == *RIG-STEP* || $line == *RIG-RESULT* || $line == *RIG-NOTE* ]]; then
      printf '  %s\n' "${line#*RIG-}"
    fi
  done
QEMU_RC=${PIPESTATUS[0]}
kill "$RELAY_PID" 2>/dev/null
wait "$RELAY_PID" 2>/dev/null
set -e
T_QEMU=$(elapsed)
rm -f "$RUN_DIR/initramfs.cpio" # base + overlay.cpio, both kept

# ---- host-side check (after QEMU exits, images are closed) ------------------------
HOST_RC=
if [[ -n $HOST_CHECK ]]; then
  HOST_LOG=$RUN_DIR/host-check.log
  set +e
  RIG_IMG0=$IMG0 RIG_IMG1=$IMG1 RIG_NVME_COUNT=$NVME_COUNT RIG_IMAGE_DIR=$IMG_DIR RIG_NONCE=$RIG_NONCE \
    RIG_CONSOLE_LOG=$LOG RIG_QEMU_RC=$QEMU_RC bash "$HOST_CHECK" >"$HOST_LOG" 2>&1
  HOST_RC=$?
  set -e
  if ((HOST_RC == 0)); then
    echo "RIG-STEP host-check PASS" >>"$LOG"
    echo "  STEP host-check PASS"
  else
    echo "RIG-STEP host-check FAIL exit $HOST_RC: $(tail -n 1 "$HOST_LOG")" >>"$LOG"
    echo "  STEP host-check FAIL exit $HOST_RC (see $HOST_LOG)"
    sed 's/^/    host| /' "$HOST_LOG" | tail -n 20
  fi
fi

# ---- report ---------------------------------------------------------------------
tr -d '\r' <"$LOG" | grep -oE 'RIG-STEP [^ ]+ (PASS|FAIL).*' >"$RUN_DIR/steps" || true
N_PASS=$(grep -c ' PASS' "$RUN_DIR/steps" || true)
N_FAIL=$(grep -c ' FAIL' "$RUN_DIR/steps" || true)

case $QEMU_RC in
  "$QEMU_RC_PASS") QEMU_VERDICT="pass (exit $QEMU_RC)" ;;
  "$QEMU_RC_FAIL") QEMU_VERDICT="guest reported failure (exit $QEMU_RC)" ;;
  124 | 137) QEMU_VERDICT="host timeout after ${TIMEOUT}s (killed)" ;;
  0) QEMU_VERDICT="guest powered off without a verdict (exit 0)" ;;
  *) QEMU_VERDICT="unexpected QEMU exit $QEMU_RC" ;;
esac

OK=1
((QEMU_RC == QEMU_RC_PASS)) || OK=0
((N_FAIL == 0)) || OK=0
((N_PASS > 0)) || OK=0

if ((!OK && !VERBOSE)); then
  echo
  echo "---- last 60 console lines ($LOG) ----"
  tail -n 60 "$LOG" | tr -d '\r'
  echo "--------------------------------------"
  if [ -s "$RUN_DIR/qmp.log" ]; then
    echo "---- QMP relay log ($RUN_DIR/qmp.log) ----"
    tail -n 30 "$RUN_DIR/qmp.log" | cut -c1-400
    echo "--------------------------------------"
  fi
fi

echo
printf '%-28s %-6s %s\n' STEP RESULT DETAIL
printf '%-28s %-6s %s\n' ---- ------ ------
while read -r _ name res detail; do
  printf '%-28s %-6s %s\n' "$name" "$res" "$detail"
done <"$RUN_DIR/steps"
echo
echo "scenario: $(basename "$SCENARIO")  kernel: $KVER  accel: $ACCEL_USED"
echo "qemu: $QEMU_VERDICT"
echo "steps: $N_PASS passed, $N_FAIL failed"
echo "images: ${IMGS[*]}"
echo "wall: $(elapsed)s (setup ${T_SETUP}s, until QEMU exit ${T_QEMU}s)"
if ((OK)); then
  echo "RIG RESULT: PASS"
  exit 0
fi
echo "RIG RESULT: FAIL"
exit 1
