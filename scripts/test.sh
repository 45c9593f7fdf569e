#!/usr/bin/env bash
# Runs every test: installs what is missing, builds the binaries the process-level tests
# start, runs the whole workspace's tests (the node's and registry's twice: SQLite, then
# PostgreSQL), then the benchmark's smoke run (`agora-bench
# --quick --dm`, debug build: it checks counts and 0 loss against NATS and Redis, and that a
# retried broadcast stores nothing twice; never timings). Usage: scripts/test.sh [cargo test
# args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --python --bench --browser --postgres
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
# The group node's and the registry's tests again, with their stores in PostgreSQL: each
# federation starts a throwaway cluster of its own (tests/src/pg.rs).
AGORA_TEST_STORE=postgres cargo test --locked -p agora-group-node -p agora-registry -p agora-tests "$@"
RUST_LOG=error target/debug/agora-bench --quick --dm
