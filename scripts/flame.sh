#!/usr/bin/env bash
# Flame graph of the group-node processes under one bench workload: runs
# `agora-bench --workload N --no-peers --repeat 1` (from BENCH_DIR, default target/release),
# attaches `perf record --call-graph dwarf` to every group-node it starts, and folds the
# samples of all of them into one SVG with inferno.
# Needs: perf (Debian linux-perf) and inferno (`cargo install inferno`); installs neither.
# Usage: scripts/flame.sh WORKLOAD OUT.svg [extra agora-bench args]
set -euo pipefail
workload=${1:?usage: scripts/flame.sh WORKLOAD OUT.svg [bench args]}
out=${2:?usage: scripts/flame.sh WORKLOAD OUT.svg [bench args]}
shift 2
bench_dir=${BENCH_DIR:-target/release}
for tool in perf inferno-collapse-perf inferno-flamegraph; do
    command -v "$tool" >/dev/null || { echo "flame: $tool not found" >&2; exit 2; }
done
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
"$bench_dir/agora-bench" --workload "$workload" --no-peers --repeat 1 "$@" >"$work/bench.md" 2>/dev/null &
bench=$!
seen=" "
while kill -0 "$bench" 2>/dev/null; do
    for pid in $(pgrep -x group-node -P "$bench" 2>/dev/null || true); do
        case "$seen" in *" $pid "*) continue ;; esac
        seen="$seen$pid "
        perf record -q -F 997 --call-graph dwarf,16384 -p "$pid" -o "$work/perf.$pid.data" >/dev/null 2>&1 &
    done
    sleep 0.05
done
wait "$bench" || { echo "flame: the bench failed" >&2; exit 1; }
wait 2>/dev/null || true
for data in "$work"/perf.*.data; do
    [ -s "$data" ] && perf script -i "$data" 2>/dev/null
done | inferno-collapse-perf >"$work/folded"
inferno-flamegraph --minwidth 0.2 --title "group-node, bench workload $workload" <"$work/folded" >"$out"
# FOLDED=path keeps the folded stacks (one line per stack: frames;…;frame count).
[ -z "${FOLDED:-}" ] || cp "$work/folded" "$FOLDED"
cat "$work/bench.md" | grep '^| [0-9]' || true
echo "flame: wrote $out" >&2
