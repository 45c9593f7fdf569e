#!/usr/bin/env bash
# Runs every test: installs what is missing, builds once (the binaries the process-level
# tests start and every test, in one debug build), runs the whole workspace's tests, runs
# the node's and the registry's process-level tests again with their stores in PostgreSQL
# (the same test executables: nothing is compiled twice), then the benchmark's smoke run
# (`agora-bench --quick --dm --federation`, debug build: it checks counts and 0 loss against NATS and
# Redis, and that a retried broadcast stores nothing twice; never timings).
# Usage: scripts/test.sh [cargo test args] [-- test filter and libtest args]
# (the arguments after `--` also go to the PostgreSQL pass).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --python --bench --browser --postgres
export PATH="$HOME/.cargo/bin:$PATH"
# One build for everything: `--all-targets` resolves features once, with the tests'
# dev-dependencies, so the binaries and the tests share every compiled crate. (A plain
# `cargo build --bins` resolves without them and compiles many crates a second time.)
SECONDS=0
cargo build --workspace --all-targets --locked
echo "test.sh: built in ${SECONDS}s"
cargo test --workspace --locked "$@"
echo "test.sh: built and tested in ${SECONDS}s"

# The group node's and the registry's tests again, with their stores in PostgreSQL: each
# federation starts a throwaway cluster of its own (tests/src/pg.rs). The test executables
# are the ones just built, run directly: `cargo test -p …` would resolve features for those
# packages alone and compile them again.
libtest_args=()
seen_dashes=0
for arg in "$@"; do
    if [ "$seen_dashes" = 1 ]; then libtest_args+=("$arg"); fi
    [ "$arg" = "--" ] && seen_dashes=1
done
mapfile -t executables < <(
    cargo test --workspace --locked --no-run --message-format=json 2>/dev/null | python3 -c '
import json, os, sys
wanted = ("group-node", "registry", "tests")
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    package_dir = os.path.dirname(msg["manifest_path"])
    if msg["profile"]["test"] and os.path.basename(package_dir) in wanted:
        print(package_dir + "\t" + msg["executable"])
'
)
if [ "${#executables[@]}" -eq 0 ]; then
    echo "test.sh: found no test executables for the PostgreSQL pass" >&2
    exit 1
fi
for entry in "${executables[@]}"; do
    dir=${entry%%$'\t'*}
    exe=${entry#*$'\t'}
    echo "PostgreSQL pass: $(basename "$dir")/$(basename "$exe")"
    # As cargo runs a test: from its package's directory.
    (cd "$dir" && AGORA_TEST_STORE=postgres CARGO_MANIFEST_DIR="$dir" "$exe" ${libtest_args[@]+"${libtest_args[@]}"})
done
echo "test.sh: the PostgreSQL pass done at ${SECONDS}s"
RUST_LOG=error target/debug/agora-bench --quick --dm --federation
echo "test.sh: all done in ${SECONDS}s"
