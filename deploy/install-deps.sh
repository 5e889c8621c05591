#!/usr/bin/env bash
# Installs what building corral needs on Debian, plus any packages named as arguments, idempotently. Runs apt-get
# only when a package is missing. Needs root (or sudo).
set -euo pipefail

# protobuf-compiler: protoc for generating our gRPC code and etcd-client's.
PACKAGES=(protobuf-compiler ca-certificates "$@")

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
        SUDO=sudo
    fi
    echo "install-deps: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || { echo "install-deps: cargo not found; corral needs Rust 1.85 or newer (rustup)" >&2; exit 1; }
