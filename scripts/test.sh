#!/usr/bin/env bash
# Runs every test: installs what is missing, builds the binaries the process-level tests
# start, runs the whole workspace's tests, then the benchmark's smoke run (`agora-bench
# --quick --dm`, debug build: it checks counts and 0 loss against NATS and Redis, and that a
# retried broadcast stores nothing twice; never timings). Usage: scripts/test.sh [cargo test
# args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --python --bench --browser --postgres
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
RUST_LOG=error target/debug/agora-bench --quick --dm
