#!/usr/bin/env bash
# The benchmarks side by side with NATS and Redis: installs what is missing (the build
# dependencies, and the Debian packages nats-server and redis-server), builds release, and
# runs agora-bench with the given arguments (see `agora-bench --help`; `--quick` is CI's
# smoke run). The table goes to stdout; docs/PERFORMANCE.md explains it.
# Usage: scripts/bench.sh [agora-bench args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --bench
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --workspace --bins --locked
exec target/release/agora-bench "$@"
