#!/usr/bin/env bash
# Both VMs: each other's names, and apt's package lists.
set -euo pipefail
: "${TARGET_IP:?set by the Vagrantfile}" "${INITIATOR_IP:?set by the Vagrantfile}"
export DEBIAN_FRONTEND=noninteractive

for entry in "$TARGET_IP iscsi-target" "$INITIATOR_IP iscsi-initiator"; do
  grep -qxF "$entry" /etc/hosts || echo "$entry" >>/etc/hosts
done
apt-get update -qq
apt-get install -y -qq --no-install-recommends ca-certificates rsync >/dev/null
echo "common: $(hostname) on $(ip -4 -brief address | awk '$1 != "lo" {printf "%s ", $3}')"
echo "common: kernel $(uname -r)"
