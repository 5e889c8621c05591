#!/usr/bin/env bash
# The whole test suite: doc tests, a smoke run of every benchmark scenario, then unit, property and system tests
# (real master/agent/task processes). One debug build is shared by all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --bins
cargo test --workspace --doc --quiet
./target/debug/corral-bench all --smoke
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    cargo test --workspace --no-fail-fast
fi
