#!/usr/bin/env bash
# The target VM: two real targets for the initiator VM to log in to.
#   LIO (the kernel's own target) on $TARGET_IP:3260, configured through rtslib-fb
#     (targetcli-fb's library) by the project's scripts/lio-target:
#       lio-open  a 256 MiB fileio LUN, ACL for the initiator's IQN, no CHAP
#       lio-chap  the same with one-way and mutual CHAP
#     scripts/lio-target rather than targetcli commands: targetcli takes CHAP secrets as
#     arguments, visible in ps; rtslib-fb writes them to configfs from the process.
#     targetcli then shows the result and saves it (restored at boot by
#     rtslib-fb-targetctl.service).
#   tgt (userland) on $TARGET_IP:3261: tgt-3luns, three 128 MiB LUNs (LUN 0 is tgt's
#     controller), for the initiator's IQN.
# Idempotent: a second run rebuilds the same targets (sessions to them end).
set -euo pipefail
# shellcheck source=SCRIPTDIR/lab.env
source "${CHECKOUT:?set by the Vagrantfile}/vagrant/provision/lab.env"
export DEBIAN_FRONTEND=noninteractive
DATA=/var/lib/iscsi-handoff-lab

# tgt's unit starts tgtd on 0.0.0.0:3260 as soon as the package is installed, which
# would take LIO's port: give it its own portal before it first starts.
install -d /etc/systemd/system/tgt.service.d /etc/tgt/conf.d
cat >/etc/systemd/system/tgt.service.d/iscsi-handoff.conf <<EOF
[Service]
ExecStart=
ExecStart=/usr/sbin/tgtd -f --iscsi portal=${TARGET_IP}:${TGT_PORT}
EOF
systemctl daemon-reload

# dbus: targetcli asks the system bus for tcmu-runner's backstores and fails without it.
apt-get install -y -qq --no-install-recommends targetcli-fb python3-rtslib-fb tgt \
  kmod iproute2 dbus >/dev/null
install_secrets

banner "LUN files in $DATA (sparse)"
install -d -m 700 "$DATA"
for lun in lio-open lio-chap; do
  [ -e "$DATA/$lun.img" ] || truncate -s 256M "$DATA/$lun.img"
done
for n in 1 2 3; do
  [ -e "$DATA/tgt-lun$n.img" ] || truncate -s 128M "$DATA/tgt-lun$n.img"
done
ls -ls "$DATA"

banner "tgt on ${TARGET_IP}:${TGT_PORT}"
cat >/etc/tgt/conf.d/iscsi-handoff.conf <<EOF
<target ${TGT_IQN}>
    backing-store ${DATA}/tgt-lun1.img
    backing-store ${DATA}/tgt-lun2.img
    backing-store ${DATA}/tgt-lun3.img
    initiator-name ${INITIATOR_IQN}
</target>
EOF
systemctl enable --quiet tgt
systemctl restart tgt
tgtadm --lld iscsi --mode target --op show

banner "LIO on ${TARGET_IP}:${LIO_PORT}"
lio() { "$CHECKOUT/scripts/lio-target" "$@"; }
lio check
lio delete "$LIO_OPEN_IQN"
lio delete "$LIO_CHAP_IQN"
lio create "$LIO_OPEN_IQN" --portal "${TARGET_IP}:${LIO_PORT}" \
  --lun "$DATA/lio-open.img" --acl "$INITIATOR_IQN" >/dev/null
lio create "$LIO_CHAP_IQN" --portal "${TARGET_IP}:${LIO_PORT}" \
  --lun "$DATA/lio-chap.img" --acl "$INITIATOR_IQN" \
  --chap-user "$CHAP_USER" --chap-secret-file "$SECRETS/chap" \
  --mutual-user "$MUTUAL_USER" --mutual-secret-file "$SECRETS/mutual" >/dev/null
# saveconfig keeps the CHAP secrets in /etc/rtslib-fb-target/saveconfig.json (mode 600;
# rtslib-fb-targetctl.service restores it at boot, and makes the folder, but only then).
install -d -m 700 /etc/rtslib-fb-target
targetcli saveconfig >/dev/null
targetcli ls /iscsi

banner "listening"
ss -ltn "( sport = :${LIO_PORT} or sport = :${TGT_PORT} )"
for port in "$LIO_PORT" "$TGT_PORT"; do
  if ! ss -Hltn "( sport = :${port} )" | grep -q .; then
    echo "target: nothing listens on port ${port}" >&2
    exit 1
  fi
done
echo "target: ready: LIO ${LIO_OPEN_IQN} and ${LIO_CHAP_IQN} (CHAP user ${CHAP_USER}," \
  "mutual ${MUTUAL_USER}) on :${LIO_PORT}; tgt ${TGT_IQN} on :${TGT_PORT}"
