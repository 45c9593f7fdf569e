#!/usr/bin/env bash
# Builds Agora, starts a local federation (a registry and two groups, "Cool Group" and
# "news"), and opens the interactive chat. Leaving the chat (exit, or Ctrl-D) stops the
# federation; messages stay in ~/.local/share/agora/groups/.
#
# Usage: scripts/quickstart.sh [--web] [--user NAME]
# --web also serves the chat page (agora-web, personal mode) and prints its URL.
# Ports: AGORA_PORT (default 5555) for the registry, and the next ones for the groups.
set -euo pipefail
cd "$(dirname "$0")/.."
web=0
args=()
user=${USER:-me}
while [ $# -gt 0 ]; do
    case "$1" in
        --web) web=1 ;;
        --user) args+=("$1" "$2"); user=$2; shift ;;
        *) args+=("$1") ;;
    esac
    shift
done
scripts/deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --bins --locked

bin=target/release
port=${AGORA_PORT:-5555}
registry="tcp://127.0.0.1:$port"
logs=$(mktemp -d "${TMPDIR:-/tmp}/agora-quickstart.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# It announces itself on this machine only (the loopback broadcast address), so that
# `user-cli discover` and `--registry auto` find it.
"$bin/registry" --bind "$registry" --name quickstart --beacon --beacon-address 127.255.255.255 \
    >"$logs/registry.out" 2>"$logs/registry.log" &
pids+=($!)
# The registry prints `listening ENDPOINT public-key KEY`; everyone else needs that key.
for _ in $(seq 1 100); do
    [ -s "$logs/registry.out" ] && break
    sleep 0.1
done
AGORA_REGISTRY_KEY=$(awk '$3 == "public-key" {print $4}' "$logs/registry.out")
if [ -z "$AGORA_REGISTRY_KEY" ]; then
    echo "quickstart: the registry did not start; its log ($logs/registry.log):" >&2
    tail -n 5 "$logs/registry.log" >&2
    exit 1
fi
export AGORA_REGISTRY_KEY
"$bin/group-node" "Cool Group" "127.0.0.1:$((port + 5))" --registry "$registry" \
    >"$logs/cool.out" 2>"$logs/cool.log" &
pids+=($!)
"$bin/group-node" "news" "127.0.0.1:$((port + 6))" --registry "$registry" \
    >"$logs/news.out" 2>"$logs/news.log" &
pids+=($!)

# Wait until both groups are listed (or a server died).
for _ in $(seq 1 100); do
    groups=$("$bin/user-cli" --registry "$registry" --timeout 1s groups 2>/dev/null || true)
    if grep -q "Cool Group" <<<"$groups" && grep -q "news" <<<"$groups"; then
        break
    fi
    for pid in "${pids[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "quickstart: a server failed to start; logs in $logs:" >&2
            tail -n 5 "$logs"/*.log >&2
            exit 1
        fi
    done
    sleep 0.1
done

echo "Local federation: registry $registry (key $AGORA_REGISTRY_KEY);"
echo "groups \"Cool Group\" and \"news\"; logs in $logs"
echo "Other terminals find it with: $bin/user-cli --registry auto (or: $bin/user-cli discover)"
if [ "$web" = 1 ]; then
    "$bin/agora-web" --user "$user" --bind "127.0.0.1:$((port + 7))" --registry "$registry" \
        >"$logs/web.out" 2>"$logs/web.log" &
    pids+=($!)
    for _ in $(seq 1 100); do
        [ -s "$logs/web.out" ] && break
        sleep 0.1
    done
    echo "The chat page: $(awk '$1 == "listening" {print $2}' "$logs/web.out")"
fi
echo "Try: join_group \"Cool Group\", send_message \"Cool Group\", get_messages \"Cool Group\""
"$bin/user-cli" --registry "$registry" ${args[@]+"${args[@]}"}
