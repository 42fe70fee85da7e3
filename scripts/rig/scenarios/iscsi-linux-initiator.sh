#!/bin/sh
# Linux open-iscsi initiator (iscsid + iscsiadm, kernel iscsi_tcp) against
# nvraid-tgt's default config, inside the QEMU rig:
#   scripts/rig/run.sh --scenario scripts/rig/scenarios/iscsi-linux-initiator.sh \
#       --bin PATH/nvraid-tgt --bin PATH/nvraid-rpc
# SendTargets discovery, login, a pattern written O_DIRECT to the new SCSI
# disk, logout, a second login that reads it back equal, logout; then a
# second target node that requires CHAP (set over RPC): a login without
# credentials is refused, one with node.session.auth.* succeeds; clean
# daemon exit.
set -eu
# shellcheck source=../guest-lib.sh
. /rig/guest-lib.sh
RIG_STEP_TIMEOUT=90
IQN=iqn.2016-06.io.spdk:array0
CHAP_IQN=iqn.2016-06.io.spdk:chap0
PORTAL=127.0.0.1:3260
SOCK=/var/tmp/spdk.sock
RPC="nvraid-rpc -s $SOCK"
CHAP_USER=rigchap
CHAP_SECRET=rigchapsecret12

mkdir -p /var/tmp /run/lock/iscsi /var/lock /var/lib/iscsi
bg_start tgt nvraid-tgt --default-config --idle sleep --no-huge --no-pin -m 0x1
step wait-rpc wait_for "$SOCK" 60 || {
  sed 's/^/  tgt| /' /tmp/rig/logs/tgt.log
  exit 1
}

load_modules() {
  for m in scsi_transport_iscsi libiscsi libiscsi_tcp iscsi_tcp sd_mod; do modprobe "$m"; done
  echo "InitiatorName=$(iscsi-iname -p iqn.2026-12.io.nvraid.rig)" >/etc/iscsi/initiatorname.iscsi
  cat /etc/iscsi/initiatorname.iscsi
}
step modules load_modules
# iscsid signals its whole process group when it stops: give it its own.
bg_start iscsid setsid iscsid -f
# iscsiadm answers "No active sessions" only once it reaches iscsid.
iscsid_up() { iscsiadm -m session 2>&1 | grep -q 'No active sessions'; }
step iscsid-up wait_until 20 iscsid_up

discover() {
  out=$(iscsiadm -m discovery -t st -p "$PORTAL")
  echo "$out"
  echo "$out" | grep -q "^$PORTAL,1 $IQN\$" || fail "SendTargets lacks $IQN"
}
step discover discover

# disk_of TARGET-IQN -> /dev/sdX of LUN 0 of the (one) session with TARGET
disk_of() {
  for s in /sys/class/iscsi_session/session*; do
    [ "$(cat "$s/targetname" 2>/dev/null)" = "$1" ] || continue
    for b in "$s"/device/target*/*:0/block/*; do
      [ -e "$b" ] && { echo "/dev/${b##*/}"; return 0; }
    done
  done
  return 1
}

# login TARGET-IQN -> /dev/sdX once the kernel has attached LUN 0
login() {
  iscsiadm -m node -T "$1" -p "$PORTAL" --login >&2
  wait_until 30 disk_of "$1" >/dev/null || fail "no disk for $1"
  dev=$(disk_of "$1")
  wait_for "$dev" 10
  echo "$dev"
}

login_write() {
  dev=$(login "$IQN")
  iscsiadm -m session -P 1 | grep -E 'Target:|Current Portal|iSCSI Session State' || true
  echo "$dev: $(cat /sys/block/"${dev#/dev/}"/size) sectors, $(cat /sys/block/"${dev#/dev/}"/queue/logical_block_size) B blocks"
  pattern_file /tmp/pattern $((4 * 1024 * 1024))
  dd if=/tmp/pattern of="$dev" bs=4096 count=16 oflag=direct conv=fsync
  dd if=/tmp/pattern of="$dev" bs=1M seek=8 count=4 oflag=direct conv=fsync
  echo "wrote 64 KiB at 0 and 4 MiB at 8 MiB to $dev"
}
step login-write login_write

step logout-1 iscsiadm -m node -T "$IQN" -p "$PORTAL" --logout

login_read() {
  dev=$(login "$IQN")
  dd if="$dev" of=/tmp/rb1 bs=4096 count=16 iflag=direct
  dd if="$dev" of=/tmp/rb2 bs=1M skip=8 count=4 iflag=direct
  head -c 65536 /tmp/pattern | cmp - /tmp/rb1
  cmp /tmp/pattern /tmp/rb2
  echo "read back equal after a new login ($dev)"
}
step login-read login_read

step logout-2 iscsiadm -m node -T "$IQN" -p "$PORTAL" --logout

no_sessions() { ! ls /sys/class/iscsi_session/session* >/dev/null 2>&1; }
step no-sessions wait_until 10 no_sessions

# CHAP: a second target node whose logins require one-way CHAP.
chap_target() {
  $RPC bdev_malloc_create '{"name": "Malloc2", "num_blocks": 16384, "block_size": 512}'
  $RPC iscsi_create_auth_group \
    "{\"tag\": 1, \"secrets\": [{\"user\": \"$CHAP_USER\", \"secret\": \"$CHAP_SECRET\"}]}"
  $RPC iscsi_create_target_node '{"name": "chap0", "alias_name": "rig chap",
    "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "luns": [{"bdev_name": "Malloc2", "lun_id": 0}],
    "queue_depth": 32, "require_chap": true, "chap_group": 1}'
  $RPC iscsi_get_target_nodes
}
step chap-target chap_target

chap_discover() {
  out=$(iscsiadm -m discovery -t st -p "$PORTAL")
  echo "$out"
  echo "$out" | grep -q "^$PORTAL,1 $CHAP_IQN\$" || fail "SendTargets lacks $CHAP_IQN"
}
step chap-discover chap_discover

chap_refused() {
  if iscsiadm -m node -T "$CHAP_IQN" -p "$PORTAL" --login; then
    fail "login without CHAP credentials succeeded"
  fi
  ! disk_of "$CHAP_IQN" >/dev/null || fail "a session exists without CHAP"
  echo "refused without credentials, as required"
}
step chap-refused chap_refused

chap_login() {
  set_node() { iscsiadm -m node -T "$CHAP_IQN" -p "$PORTAL" -o update -n "$1" -v "$2"; }
  set_node node.session.auth.authmethod CHAP
  set_node node.session.auth.username "$CHAP_USER"
  set_node node.session.auth.password "$CHAP_SECRET"
  dev=$(login "$CHAP_IQN")
  pattern_file /tmp/chap-pattern 65536 chap
  dd if=/tmp/chap-pattern of="$dev" bs=4096 count=16 oflag=direct conv=fsync
  dd if="$dev" of=/tmp/chap-rb bs=4096 count=16 iflag=direct
  cmp /tmp/chap-pattern /tmp/chap-rb
  echo "CHAP login: $dev read back equal"
}
step chap-login chap_login

step chap-logout iscsiadm -m node -T "$CHAP_IQN" -p "$PORTAL" --logout

chap_wrong_secret() {
  iscsiadm -m node -T "$CHAP_IQN" -p "$PORTAL" -o update -n node.session.auth.password -v wrongsecret123
  if iscsiadm -m node -T "$CHAP_IQN" -p "$PORTAL" --login; then
    fail "login with a wrong CHAP secret succeeded"
  fi
  echo "wrong secret refused"
}
step chap-wrong-secret chap_wrong_secret

# Daemons are reaped at the top level: a step's subshell cannot wait for them.
step stop-iscsid iscsiadm -k 0
bg_stop iscsid
bg_stop tgt
