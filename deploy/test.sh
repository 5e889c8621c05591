#!/usr/bin/env bash
# The whole test suite: doc tests, a smoke run of every benchmark scenario, then unit, property and system tests
# (real master/agent/task processes). One debug build is shared by all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
# python3: a task runs python3 -m http.server to be health-checked; util-linux: taskset pins tasks to one core;
# qemu-system-x86, busybox-static, cpio: a VM with a real cgroup v2 kernel for the agent's v2 backend;
# etcd-server, etcd-client: replicated masters elect their leader in a real etcd started by the tests;
# chromium, chromium-driver: the dashboard's end-to-end test drives a real headless Chromium.
bash deploy/install-deps.sh python3 util-linux qemu-system-x86 busybox-static cpio etcd-server etcd-client \
    chromium chromium-driver
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --bins
cargo test --workspace --doc --quiet
./target/debug/corral-bench all --smoke
bash tests/vm/cgroup-v2.sh target/debug/corral-agent
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    cargo test --workspace --no-fail-fast
fi
