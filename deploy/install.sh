#!/usr/bin/env bash
# Installs the release binaries, systemd units and example config on this node.
# Usage: deploy/install.sh master|agent   (after `cargo build --release`)
# For three replicated masters, start from deploy/config/ha/ (master.env, agent.env, etcd.default) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
role="${1:?usage: deploy/install.sh master|agent}"
case "$role" in master|agent) ;; *) echo "role must be master or agent" >&2; exit 2;; esac
install -m 0755 target/release/corral-"$role" target/release/corral /usr/local/bin/
install -d /etc/corral
[ -e /etc/corral/"$role".env ] || install -m 0644 deploy/config/"$role".env /etc/corral/"$role".env
install -m 0644 deploy/systemd/corral-"$role".service /etc/systemd/system/
systemctl daemon-reload
echo "edit /etc/corral/$role.env, then: systemctl enable --now corral-$role"
