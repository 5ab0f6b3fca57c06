#!/usr/bin/env bash
# The initiator VM: installs this checkout (./scripts/setup), then tries both data paths
# against the target VM's three targets (LIO open, LIO CHAP+mutual, tgt with 3 LUNs):
#   1. kernel path: `doctor` must choose it; login --daemon hands each session to
#      iscsi_tcp, /dev/sdX appear; mkfs.ext4, write a file, remount, verify; logout.
#   2. FUSE fallback: iscsi_tcp blacklisted (modprobe.d) and unloaded; `doctor` must
#      choose FUSE; login --fuse --loop gives /dev/loopN over the same LUNs; the file
#      written by the kernel path must read back identical, a second file is written and
#      verified; logout. The blacklist is removed at the end.
# Prints a summary of what each path produced; exits non-zero if any step failed.
# LAB_PATHS="kernel fuse" (the default) chooses the paths tried, in that order.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lab.env
source "${CHECKOUT:?set by the Vagrantfile}/vagrant/provision/lab.env"
export DEBIAN_FRONTEND=noninteractive
IH=("$CHECKOUT/.venv/bin/iscsi-handoff")
WORK=/mnt/iscsi-handoff-lab
BLACKLIST=/etc/modprobe.d/iscsi-handoff-lab.conf
PORTAL_WAIT=600  # seconds: `vagrant up` may provision both VMs at once
PAYLOAD_MIB=16
FUSE_READY_WAIT=300  # seconds for login + FUSE mount + loop attach
# Which paths to try, in order. `vagrant provision initiator` runs both; in the VM,
#   sudo env LAB_PATHS=fuse TARGET_IP=192.168.56.10 INITIATOR_IP=192.168.56.11 \
#     CHECKOUT=/srv/iscsi-handoff /srv/iscsi-handoff/vagrant/provision/initiator.sh
# re-runs only the fallback.
LAB_PATHS=${LAB_PATHS:-kernel fuse}

# name | port | IQN | auth (none or chap)
TARGETS=(
  "lio-open|$LIO_PORT|$LIO_OPEN_IQN|none"
  "lio-chap|$LIO_PORT|$LIO_CHAP_IQN|chap"
  "tgt-3luns|$TGT_PORT|$TGT_IQN|none"
)
RESULTS=()
FAILED=0
FUSE_PIDS=()
OUR_LOOPS=()

result() {  # one line of the summary
  RESULTS+=("$*")
  echo "result: $*"
}

set_auth_opts() {  # auth_opts: the CHAP options for an auth kind; secrets by file only
  auth_opts=()
  if [ "$1" = chap ]; then
    auth_opts=(--chap-user "$CHAP_USER" --chap-secret-file "$SECRETS/chap"
      --mutual-user "$MUTUAL_USER" --mutual-secret-file "$SECRETS/mutual")
  fi
}

chosen_path() {
  "${IH[@]}" doctor --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["chosen"])'
}

disks_of() {  # IQN -> "LUN DEV" lines of the kernel's session to it, from sysfs
  "${IH[@]}" session list --json | python3 -c '
import json, sys
for s in json.load(sys.stdin)["sessions"]:
    if s["target_name"] == sys.argv[1]:
        for d in sorted(s["disks"], key=lambda d: d["lun"]):
            print(d["lun"], d["dev"])' "$1"
}

wait_for_portal() {
  local host=$1 port=$2 waited=0
  until timeout 3 bash -c ": </dev/tcp/$host/$port" 2>/dev/null; do
    if ((waited >= PORTAL_WAIT)); then
      echo "initiator: nothing answers on $host:$port after ${PORTAL_WAIT}s:" \
        "is the target VM up and provisioned? (vagrant up target)" >&2
      return 1
    fi
    ((waited == 0)) && echo "initiator: waiting for $host:$port"
    sleep 5
    waited=$((waited + 5))
  done
}

drop_caches() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
}

# Kernel path: mkfs. FUSE path: reuse the kernel path's filesystem and check its file
# reads back identical (mkfs when there is none). Then write this path's own file,
# remount with cold caches and verify it.
exercise_disk() {
  local path=$1 label=$2 dev=$3 mnt=$4 made="" checked=""
  install -d "$mnt"
  if [ "$path" = fuse ] && [ "$(blkid -p -s TYPE -o value "$dev" || true)" = ext4 ]; then
    mount "$dev" "$mnt"
    if [ -e "$mnt/kernel.payload.sha256" ]; then
      (cd "$mnt" && sha256sum --quiet -c kernel.payload.sha256)
      made="ext4 made by the kernel path"
      checked=", the kernel path's file reads back identical"
    else
      umount "$mnt"
    fi
  fi
  if [ -z "$made" ]; then
    mkfs.ext4 -q -F -L "${label:0:16}" "$dev"
    made="mkfs.ext4"
    mount "$dev" "$mnt"
  fi
  head -c "${PAYLOAD_MIB}M" /dev/urandom >"$mnt/$path.payload"
  (cd "$mnt" && sha256sum "$path.payload" >"$path.payload.sha256")
  umount "$mnt"
  drop_caches
  mount "$dev" "$mnt"
  (cd "$mnt" && sha256sum --quiet -c "$path.payload.sha256")
  df -h --output=source,fstype,size,used "$mnt" | tail -n 1
  umount "$mnt"
  result "$path  $label  $dev  $made, ${PAYLOAD_MIB} MiB written, verified after remount$checked"
}

cleanup() {
  local status=$? pid dev
  set +e
  for mnt in "$WORK"/*/; do
    case $mnt in */fuse-tree-*/) continue ;; esac  # the FUSE daemon unmounts its tree
    mountpoint -q "$mnt" && umount "$mnt"
  done
  for dev in "${OUR_LOOPS[@]}"; do
    losetup -d "$dev" 2>/dev/null
  done
  for pid in "${FUSE_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null && wait "$pid"
  done
  if [ -x "${IH[0]}" ]; then
    "${IH[@]}" logout --all >/dev/null 2>&1
  fi
  rm -f "$BLACKLIST"
  banner "summary"
  ((${#RESULTS[@]})) && printf '  %s\n' "${RESULTS[@]}"
  if ((status != 0 || FAILED)); then
    echo "initiator: FAILED (see above)" >&2
    ((status != 0)) || status=1
  else
    echo "initiator: every path tried ($LAB_PATHS) worked on every target"
  fi
  exit "$status"
}
trap cleanup EXIT

prepare() {
  banner "install this checkout (./scripts/setup)"
  install_secrets
  (cd "$CHECKOUT" && ./scripts/setup)
  "${IH[@]}" --version
  # setup installs open-iscsi for the QEMU lab; its iscsid would also listen to the
  # kernel's iSCSI netlink events. The sessions here are ours: keep it out of the way.
  systemctl stop iscsid.socket iscsid.service open-iscsi.service >/dev/null 2>&1 || true
  rm -f "$BLACKLIST"  # a run that died half-way may have left it
  modprobe -a scsi_transport_iscsi iscsi_tcp
  install -d "$WORK"

  wait_for_portal "$TARGET_IP" "$LIO_PORT"
  wait_for_portal "$TARGET_IP" "$TGT_PORT"
  for port in "$LIO_PORT" "$TGT_PORT"; do
    banner "discover $TARGET_IP:$port"
    "${IH[@]}" discover "$TARGET_IP:$port" --initiator-name "$INITIATOR_IQN"
  done
}

# ---- 1. the kernel path
kernel_phase() {
  banner "kernel path: doctor"
  "${IH[@]}" doctor
  if [ "$(chosen_path)" != kernel ]; then
    echo "initiator: doctor does not choose the kernel path on this VM" >&2
    exit 1
  fi
  if ! "${IH[@]}" login --help | grep -q -- '--daemon'; then
    # The kernel handoff is built in stages; say so instead of pretending.
    result "kernel  -  -  NOT RUN: this checkout's login has no --daemon (kernel path not built)"
    FAILED=1
  else
    for entry in "${TARGETS[@]}"; do
      IFS='|' read -r name port iqn auth <<<"$entry"
      set_auth_opts "$auth"
      banner "kernel path: login $name ($iqn on $TARGET_IP:$port)"
      "${IH[@]}" login --portal "$TARGET_IP:$port" --target "$iqn" \
        --initiator-name "$INITIATOR_IQN" "${auth_opts[@]}" --daemon
      disks=""
      for _ in $(seq 30); do  # login waits for the disks; udev may still be naming them
        disks=$(disks_of "$iqn")
        [ -n "$disks" ] && break
        sleep 1
      done
      "${IH[@]}" session list
      if [ -z "$disks" ]; then
        echo "initiator: the kernel session to $iqn has no disks" >&2
        exit 1
      fi
      while read -r lun dev <&3; do
        lsblk -o NAME,SIZE,VENDOR,MODEL,TRAN "$dev"
        exercise_disk kernel "$name-lun$lun" "$dev" "$WORK/kernel-$name-lun$lun"
      done 3<<<"$disks"
      "${IH[@]}" logout --target "$iqn"
    done
  fi
}

# ---- 2. the FUSE fallback, with iscsi_tcp out of reach
fuse_phase() {
  banner "FUSE fallback: iscsi_tcp blacklisted and unloaded"
  # `blacklist` only stops loading by alias; `install ... /bin/false` also makes an
  # explicit `modprobe iscsi_tcp` (which doctor tries) fail, as on a kernel without it.
  printf '%s\n' "# vagrant/provision/initiator.sh: shows the FUSE fallback; removed when it ends" \
    "blacklist iscsi_tcp" "install iscsi_tcp /bin/false" >"$BLACKLIST"
  if [ -d /sys/module/iscsi_tcp ]; then
    rmmod iscsi_tcp
  fi
  "${IH[@]}" doctor
  if [ "$(chosen_path)" != fuse ]; then
    echo "initiator: with iscsi_tcp blacklisted, doctor does not choose FUSE" >&2
    exit 1
  fi

  for entry in "${TARGETS[@]}"; do
    IFS='|' read -r name port iqn auth <<<"$entry"
    set_auth_opts "$auth"
    tree=$WORK/fuse-tree-$name
    log=$WORK/fuse-$name.log
    install -d "$tree"
    : >"$log"  # exists before the background job opens it: the wait below greps it
    banner "FUSE path: login $name ($iqn on $TARGET_IP:$port) --fuse $tree --loop"
    "${IH[@]}" login --portal "$TARGET_IP:$port" --target "$iqn" \
      --initiator-name "$INITIATOR_IQN" "${auth_opts[@]}" --fuse "$tree" --loop >"$log" 2>&1 &
    pid=$!
    FUSE_PIDS=("$pid")
    waited=0
    until grep -q '^serving;' "$log"; do
      if ! kill -0 "$pid" 2>/dev/null || ((waited >= FUSE_READY_WAIT)); then
        cat "$log" >&2
        echo "initiator: the FUSE path did not come up for $iqn" >&2
        exit 1
      fi
      sleep 1
      waited=$((waited + 1))
    done
    cat "$log"
    # "IQN: MOUNT/<host>/<target>/storage (LUN n, size)" then "  /dev/loopN -> ..."
    storage=$(sed -n 's/^[^ ].*: \(\/.*\/storage\) (LUN [0-9]*,.*/\1/p' "$log" | head -n 1)
    first_lun=$(sed -n 's/^[^ ].*: \/.*\/storage (LUN \([0-9]*\),.*/\1/p' "$log" | head -n 1)
    loop=$(sed -n 's/^  \(\/dev\/loop[0-9]*\) -> .*/\1/p' "$log" | head -n 1)
    if [ -z "$storage" ] || [ -z "$first_lun" ] || [ -z "$loop" ]; then
      echo "initiator: cannot read the storage file and loop device from the output above" >&2
      exit 1
    fi
    ls -l "$(dirname "$storage")"
    exercise_disk fuse "$name-lun$first_lun" "$loop" "$WORK/fuse-$name-lun$first_lun"
    # the target's other LUNs are files in the tree too: attach them ourselves
    while read -r lun storage <&3; do
      [ -n "$lun" ] || continue  # a here-string of nothing is one empty line
      dev=$(losetup -f --show --direct-io=on "$storage")
      OUR_LOOPS+=("$dev")
      exercise_disk fuse "$name-lun$lun" "$dev" "$WORK/fuse-$name-lun$lun"
      losetup -d "$dev"
      OUR_LOOPS=()
    done 3<<<"$(sed -n 's/^  LUN \([0-9]*\): \(.*\)$/\1 \2/p' "$log")"
    kill -TERM "$pid"
    if ! wait "$pid"; then
      cat "$log" >&2
      echo "initiator: the FUSE path for $iqn did not finish cleanly" >&2
      exit 1
    fi
    FUSE_PIDS=()
    tail -n 3 "$log"
  done

  banner "restore iscsi_tcp"
  rm -f "$BLACKLIST"
  modprobe iscsi_tcp
}

prepare
for phase in $LAB_PATHS; do
  case $phase in
    kernel) kernel_phase ;;
    fuse) fuse_phase ;;
    *) echo "initiator: LAB_PATHS: unknown path $phase (kernel, fuse)" >&2; exit 2 ;;
  esac
done
