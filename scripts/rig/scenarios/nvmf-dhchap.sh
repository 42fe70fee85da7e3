#!/bin/sh
# DH-HMAC-CHAP (NVMe in-band authentication) between the Linux kernel's
# NVMe/TCP initiator and nvraid-tgt, inside the QEMU rig. Needs the
# bookworm-backports kernel (Debian 12's 6.1 has no CONFIG_NVME_HOST_AUTH):
#   scripts/rig/run.sh --kernel backports --append cryptomgr.notests=1 \
#       --scenario scripts/rig/scenarios/nvmf-dhchap.sh --bin PATH/nvraid-tgt --bin PATH/nvraid-rpc
# (cryptomgr.notests: the kernel's ffdhe8192 self-test outlasts its own wait
# under TCG; see the rig README.)
# Keys from `nvme gen-dhchap-key` in nvraid's keyring (keyring_file_add_key),
# the host added with dhchap_key and dhchap_ctrlr_key. The kernel connects
# with the host key (unidirectional) and with both keys (bidirectional) and
# writes and reads back data; four hash/group pairs, the target's choice
# steered with nvmf_set_config and checked in nvraid's log. A wrong host key
# is refused by nvraid (and logged), a wrong controller key by the kernel;
# after nvmf_subsystem_set_keys the new key connects and the old one is
# refused; a live controller re-authenticates all its queues with a new key
# written to sysfs.
set -eu
# shellcheck source=../guest-lib.sh
. /rig/guest-lib.sh
RIG_STEP_TIMEOUT=90

NQN=nqn.2016-06.io.nvraid:auth
SOCK=/tmp/nvraid.sock
RPC="nvraid-rpc -s $SOCK"
HOSTID=dddddddd-0000-4000-8000-00000000000d
HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:$HOSTID
KEYS=/tmp/keys
TGT_LOG=/tmp/rig/logs/tgt.log

# Keys, each in a 0600 file (nvraid's keyring refuses looser modes):
# the host key transformed with SHA-256, the controller key with SHA-384, the
# rotation key untransformed and 64 bytes long; two wrong ones.
mkdir -p "$KEYS" /var/tmp
chmod 0700 "$KEYS"
genkey() { # genkey NAME LENGTH HMAC NQN
  nvme gen-dhchap-key -l "$2" -m "$3" -n "$4" >"$KEYS/$1"
  chmod 0600 "$KEYS/$1"
  grep -q '^DHHC-1:0[0-3]:.*:$' "$KEYS/$1" || fail "nvme gen-dhchap-key gave: $(cat "$KEYS/$1")"
}
gen_keys() {
  genkey key1 32 1 "$HOSTNQN"
  genkey ckey1 48 2 "$NQN"
  genkey key2 64 0 "$HOSTNQN"
  genkey wrong 32 1 "$HOSTNQN"
  genkey cwrong 48 2 "$NQN"
  cat "$KEYS"/*
}
step gen-keys gen_keys
HK1=$(cat "$KEYS/key1")
CK1=$(cat "$KEYS/ckey1")
HK2=$(cat "$KEYS/key2")
HKX=$(cat "$KEYS/wrong")
CKX=$(cat "$KEYS/cwrong")

cat >/tmp/nvraid.json <<CFG
{"subsystems": [
 {"subsystem": "keyring", "config": [
  {"method": "keyring_file_add_key", "params": {"name": "key1", "path": "$KEYS/key1"}},
  {"method": "keyring_file_add_key", "params": {"name": "ckey1", "path": "$KEYS/ckey1"}}]},
 {"subsystem": "bdev", "config": [
  {"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 65536, "block_size": 512}}]},
 {"subsystem": "nvmf", "config": [
  {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
  {"method": "nvmf_create_subsystem", "params": {"nqn": "$NQN", "serial_number": "NVRAIDAUTH0001"}},
  {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "$NQN", "namespace": {"bdev_name": "M0"}}},
  {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "$NQN",
     "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}}},
  {"method": "nvmf_subsystem_add_host", "params": {"nqn": "$NQN", "host": "$HOSTNQN",
     "dhchap_key": "key1", "dhchap_ctrlr_key": "ckey1"}}]}
]}
CFG

# On a failed step (set -e ends the script): what nvraid logged.
trap '[ $? -eq 0 ] || sed "s/^/  tgt| /" "$TGT_LOG" | tail -n 40' EXIT
bg_start tgt nvraid-tgt -c /tmp/nvraid.json -r "$SOCK" --idle sleep --no-huge --no-pin -m 0x1
step wait-rpc wait_for "$SOCK" 60 || {
  sed 's/^/  tgt| /' "$TGT_LOG"
  exit 1
}

kernel_has_auth() {
  uname -r
  modprobe nvme-tcp
  [ -d /sys/module/nvme_auth ] || fail "no nvme_auth module: this kernel cannot authenticate"
  nvme connect --help 2>&1 | grep -q -- --dhchap-ctrl-secret || fail "nvme-cli lacks --dhchap-ctrl-secret"
  nvme version
}
step kernel-has-auth kernel_has_auth

# The tgt log from line $1 on (a mark taken with log_mark).
log_mark() { wc -l <"$TGT_LOG"; }
log_since() { tail -n +"$(($1 + 1))" "$TGT_LOG"; }

# connect_auth HOST_SECRET [CTRL_SECRET]: connects as $HOSTNQN, prints the
# namespace's block device. KATO: the keep-alive timeout in seconds (the
# kernel's default 5; nvraid lets each authentication step take that long).
KATO=5
connect_auth() {
  if [ -n "${2:-}" ]; then
    nvme connect -t tcp -a 127.0.0.1 -s 4420 -n "$NQN" --hostnqn="$HOSTNQN" --hostid="$HOSTID" \
      --keep-alive-tmo="$KATO" --dhchap-secret="$1" --dhchap-ctrl-secret="$2" >&2 || return 1
  else
    nvme connect -t tcp -a 127.0.0.1 -s 4420 -n "$NQN" --hostnqn="$HOSTNQN" --hostid="$HOSTID" \
      --keep-alive-tmo="$KATO" --dhchap-secret="$1" >&2 || return 1
  fi
  wait_until 20 ns_of_nqn >/dev/null || return 1
  ns_of_nqn
}
ns_of_nqn() { _c=$(nvme_ctrl_by_nqn "$NQN") && _d=$(nvme_ns_of_ctrl "$_c") && [ -b "$_d" ] && echo "$_d"; }

# io_verify DEV SLOT: 4 KiB (in-capsule) and 1 MiB (R2T) O_DIRECT writes in
# the SLOT-th 4 MiB of the namespace, read back and compared.
pattern_file /tmp/pattern $((2 * 1024 * 1024))
io_verify() {
  _o=$(($2 * 4))
  dd if=/tmp/pattern of="$1" bs=4096 seek=$((_o * 256)) count=8 oflag=direct conv=fsync 2>/dev/null
  dd if=/tmp/pattern of="$1" bs=1M seek=$((_o + 1)) count=2 oflag=direct conv=fsync 2>/dev/null
  dd if="$1" of=/tmp/rb1 bs=4096 skip=$((_o * 256)) count=8 iflag=direct 2>/dev/null
  dd if="$1" of=/tmp/rb2 bs=1M skip=$((_o + 1)) count=2 iflag=direct 2>/dev/null
  head -c 32768 /tmp/pattern | cmp - /tmp/rb1 || fail "4 KiB blocks read back differ"
  cmp /tmp/pattern /tmp/rb2 || fail "1 MiB blocks read back differ"
  echo "slot $2: read back equal"
}

# auth_ok MARK DIGEST DHGROUP BIDIRECTIONAL: every queue of the connection
# authenticated with these (nvraid logs one line per queue).
auth_ok() {
  log_since "$1" | grep 'DH-HMAC-CHAP authentication succeeded' >/tmp/auth.lines || fail "nvraid logged no authentication"
  cat /tmp/auth.lines
  _n=$(wc -l </tmp/auth.lines)
  _want=$(grep -c "digest=\"*$2\"* dhgroup=\"*$3\"* bidirectional=$4" /tmp/auth.lines || true)
  [ "$_n" -ge 2 ] || fail "$_n queue(s) authenticated, expected the admin queue and IO queues"
  [ "$_want" = "$_n" ] || fail "expected $2/$3 bidirectional=$4 on all $_n queues"
  rig_note "dhchap: $_n queues authenticated with $2/$3, bidirectional=$4"
}

# session NAME SLOT DIGEST DHGROUP HOST_SECRET [CTRL_SECRET]
session() {
  _m=$(log_mark)
  _dev=$(connect_auth "$5" "${6:-}") || fail "connect failed"
  echo "connected: $_dev"
  io_verify "$_dev" "$2"
  _bi=false
  [ -z "${6:-}" ] || _bi=true
  auth_ok "$_m" "$3" "$4" "$_bi"
  nvme disconnect -n "$NQN"
}

set_policy() { # set_policy DIGESTS DHGROUPS (JSON lists)
  $RPC nvmf_set_config "{\"dhchap_digests\": $1, \"dhchap_dhgroups\": $2}"
}

# The kernel offers every hash and group; nvraid picks the strongest of
# those nvmf_set_config allows.
step policy-sha384-null set_policy '["sha384"]' '["null"]'
step uni-sha384-null session uni 0 sha384 null "$HK1"
step policy-sha256-ffdhe2048 set_policy '["sha256"]' '["ffdhe2048"]'
step bi-sha256-ffdhe2048 session bi 1 sha256 ffdhe2048 "$HK1" "$CK1"
step policy-all set_policy '["sha256", "sha384", "sha512"]' '["null", "ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192"]'
# The kernel's ffdhe8192 arithmetic takes seconds per step under TCG on a
# loaded 2-core box (more than 5 s measured): a longer keep-alive timeout.
KATO=30
step uni-sha512-ffdhe8192 session uni 2 sha512 ffdhe8192 "$HK1"
KATO=5
step policy-sha512-ffdhe3072 set_policy '["sha512"]' '["ffdhe3072"]'

# refused HOST_SECRET [CTRL_SECRET]: the connect fails and leaves no
# controller; prints what nvraid and the kernel logged
no_controller() { ! nvme_ctrl_by_nqn "$NQN" >/dev/null; }
refused() {
  _m=$(log_mark)
  if connect_auth "$1" "${2:-}"; then
    nvme disconnect -n "$NQN" || true
    fail "the connection was admitted"
  fi
  wait_until 10 no_controller || fail "a controller of $NQN remains"
  log_since "$_m" | grep 'DH-HMAC-CHAP' || true
  dmesg | grep -i 'auth\|dhchap' | tail -n 5 || true
}
wrong_host_key() {
  _m=$(log_mark)
  refused "$HKX"
  log_since "$_m" | grep -q "DH-HMAC-CHAP authentication failed: the host's response does not match its key" ||
    fail "nvraid did not log the wrong host key"
}
step wrong-host-key wrong_host_key
wrong_ctrl_key() {
  _m=$(log_mark)
  refused "$HK1" "$CKX"
  log_since "$_m" | grep -q "the host refused the controller's response" ||
    fail "nvraid did not log the host's AUTH_Failure2"
  dmesg | tail -n 10 | grep -q 'controller authentication failed' || fail "the kernel did not refuse the controller"
}
step wrong-ctrl-key wrong_ctrl_key

# Rotation: the new host key (64 bytes, untransformed) replaces the old one.
rotate() {
  $RPC keyring_file_add_key "{\"name\": \"key2\", \"path\": \"$KEYS/key2\"}"
  $RPC nvmf_subsystem_set_keys "{\"nqn\": \"$NQN\", \"host\": \"$HOSTNQN\", \"dhchap_key\": \"key2\", \"dhchap_ctrlr_key\": \"ckey1\"}"
  $RPC nvmf_get_subsystems "{\"nqn\": \"$NQN\"}" | grep -q '"dhchap_key": *"key2"' || fail "set_keys not shown"
}
step rotate-keys rotate
step new-key-bi session bi 3 sha512 ffdhe3072 "$HK2" "$CK1"
old_key_refused() {
  _m=$(log_mark)
  refused "$HK1"
  log_since "$_m" | grep -q "the host's response does not match its key" || fail "nvraid did not log the old key"
}
step old-key-refused old_key_refused

# reauthenticated MARK N: nvraid logged N re-authentications since MARK
reauthenticated() {
  [ "$(log_since "$1" | grep 'DH-HMAC-CHAP authentication succeeded' | grep -c 'reauthentication=true')" -ge "$2" ]
}

# Live re-authentication: the target goes back to key1, the connected host
# gets key1 through sysfs and re-authenticates every queue; IO goes on.
reauth_live() {
  _m0=$(log_mark)
  _dev=$(connect_auth "$HK2" "$CK1") || fail "connect failed"
  _c=$(nvme_ctrl_by_nqn "$NQN")
  _queues=$(log_since "$_m0" | grep -c 'DH-HMAC-CHAP authentication succeeded')
  [ -e "/sys/class/nvme/$_c/dhchap_secret" ] || fail "no dhchap_secret attribute"
  $RPC nvmf_subsystem_set_keys "{\"nqn\": \"$NQN\", \"host\": \"$HOSTNQN\", \"dhchap_key\": \"key1\", \"dhchap_ctrlr_key\": \"ckey1\"}"
  _m=$(log_mark)
  printf '%s' "$HK1" >"/sys/class/nvme/$_c/dhchap_secret"
  wait_until 60 reauthenticated "$_m" "$_queues" || { log_since "$_m"; fail "not all $_queues queues re-authenticated"; }
  log_since "$_m" | grep 'DH-HMAC-CHAP'
  io_verify "$_dev" 4
  [ "$(nvme_ctrl_by_nqn "$NQN")" = "$_c" ] || fail "the controller changed"
  nvme disconnect -n "$NQN"
}
step reauth-live reauth_live

step tgt-alive bg_alive tgt
bg_stop tgt
