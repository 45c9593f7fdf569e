#!/usr/bin/env bash
# Runs every test: installs what is missing, builds the binaries the process-level tests
# start, then runs the whole workspace's tests. Usage: scripts/test.sh [cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --python
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
