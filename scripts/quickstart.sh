#!/usr/bin/env bash
# Builds Agora, starts a local federation (a registry and two groups, "Cool Group" and
# "news"), and opens the interactive chat. Leaving the chat (exit, or Ctrl-D) stops the
# federation; messages stay in ~/.local/share/agora/groups/.
#
# Usage: scripts/quickstart.sh [--web] [--debug | --bin-dir DIR] [--user NAME] [user-cli options]
#   --web      also serves the chat page (agora-web, personal mode) and prints its URL
#   --debug    builds and runs the debug profile (quicker to build)
#   --bin-dir  runs the binaries already built in DIR, building nothing (the tests use it)
#   --user     whose chat it is (default: $USER, else $LOGNAME, else the login name)
# Ports: AGORA_PORT (default 5555) for the registry, its key endpoint on the next port, the
# groups on +5 and +6, the page on +7; AGORA_PORT=0 picks free ports for all (the tests).
# The servers' logs, and the registry's public key (registry-key), are kept in
# ${XDG_STATE_HOME:-~/.local/state}/agora/quickstart/, replaced by each run.
# With stdin not a terminal, the chat reads its commands from stdin (a scripted session).
# Exit code: the chat's (see the README's exit codes); 1 when the federation did not start.
set -euo pipefail
cd "$(dirname "$0")/.."
web=0
profile=release
bin_dir=
args=()
user=${USER:-${LOGNAME:-$(id -un 2>/dev/null || echo me)}}
while [ $# -gt 0 ]; do
    case "$1" in
        --web) web=1 ;;
        --debug) profile=debug ;;
        --bin-dir)
            if [ $# -lt 2 ]; then
                echo "quickstart: --bin-dir needs a DIR" >&2
                exit 2
            fi
            bin_dir=$2
            shift
            ;;
        --user)
            if [ $# -lt 2 ]; then
                echo "quickstart: --user needs a NAME" >&2
                exit 2
            fi
            user=$2
            shift
            ;;
        *) args+=("$1") ;;
    esac
    shift
done
scripts/deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
if [ -n "$bin_dir" ]; then
    bin=$bin_dir
elif [ "$profile" = release ]; then
    cargo build --release --bins --locked
    bin=${CARGO_TARGET_DIR:-target}/release
else
    cargo build --bins --locked
    bin=${CARGO_TARGET_DIR:-target}/debug
fi
port=${AGORA_PORT:-5555}
registry="tcp://127.0.0.1:$port"
# The port of the server `offset` ports above the registry's (0: any free port).
port_at() { if [ "$port" = 0 ]; then echo 0; else echo $((port + $1)); fi; }
state=${XDG_STATE_HOME:-$HOME/.local/state}/agora/quickstart
mkdir -p "$state"
rm -f "$state"/*.out "$state"/*.log "$state/registry-key"
registry_pid=
node_pids=()
# Nodes first, so that each unregisters from a registry that still answers; then the
# registry. Each drains on SIGTERM.
cleanup() {
    for pid in ${node_pids[@]+"${node_pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
    for pid in ${node_pids[@]+"${node_pids[@]}"}; do wait "$pid" 2>/dev/null || true; done
    if [ -n "${web_pid:-}" ]; then
        kill "$web_pid" 2>/dev/null || true
        wait "$web_pid" 2>/dev/null || true
    fi
    if [ -n "$registry_pid" ]; then
        kill "$registry_pid" 2>/dev/null || true
        wait "$registry_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

failed() {
    echo "quickstart: $1; the last lines of the logs in $state:" >&2
    tail -n 5 "$state"/*.log >&2
    exit 1
}

# It announces itself on this machine only (the loopback broadcast address), so that
# `user-cli discover` and `--registry auto` find it.
"$bin/registry" --bind "$registry" --name quickstart --beacon --beacon-address 127.255.255.255 \
    >"$state/registry.out" 2>"$state/registry.log" &
registry_pid=$!
# The registry prints `listening ENDPOINT public-key KEY`; everyone else needs that key.
for _ in $(seq 1 100); do
    [ -s "$state/registry.out" ] && break
    kill -0 "$registry_pid" 2>/dev/null || break
    sleep 0.1
done
AGORA_REGISTRY_KEY=$(awk '$3 == "public-key" {print $4}' "$state/registry.out")
[ -n "$AGORA_REGISTRY_KEY" ] || failed "the registry did not start on $registry"
registry=$(awk '$1 == "listening" {print $2}' "$state/registry.out")
export AGORA_REGISTRY_KEY
printf '%s\n' "$AGORA_REGISTRY_KEY" >"$state/registry-key"
"$bin/group-node" "Cool Group" "127.0.0.1:$(port_at 5)" --registry "$registry" \
    >"$state/cool.out" 2>"$state/cool.log" &
node_pids+=($!)
"$bin/group-node" "news" "127.0.0.1:$(port_at 6)" --registry "$registry" \
    >"$state/news.out" 2>"$state/news.log" &
node_pids+=($!)

# Wait until both groups are listed (or a server died).
listed=0
for _ in $(seq 1 100); do
    groups=$("$bin/user-cli" --registry "$registry" --user "$user" --timeout 1s groups 2>/dev/null || true)
    if grep -q "Cool Group" <<<"$groups" && grep -q "news" <<<"$groups"; then
        listed=1
        break
    fi
    for pid in "$registry_pid" "${node_pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || failed "a server stopped"
    done
    sleep 0.1
done
[ "$listed" = 1 ] || failed "the groups were not listed within 10s"

echo "Local federation: registry $registry, groups \"Cool Group\" and \"news\"."
echo "Its key, for other terminals (also in $state/registry-key):"
echo "  export AGORA_REGISTRY_KEY='$AGORA_REGISTRY_KEY'"
echo "Another user, in another terminal: $bin/user-cli --registry auto --user bob"
echo "Logs: $state"
if [ "$web" = 1 ]; then
    "$bin/agora-web" --user "$user" --bind "127.0.0.1:$(port_at 7)" --registry "$registry" \
        >"$state/web.out" 2>"$state/web.log" &
    web_pid=$!
    for _ in $(seq 1 100); do
        [ -s "$state/web.out" ] && break
        kill -0 "$web_pid" 2>/dev/null || failed "agora-web did not start"
        sleep 0.1
    done
    echo "A new sign-in link, any time (each works once, for 5 minutes): $bin/agora-web link"
    echo "The chat page: $(awk '$1 == "listening" {print $2}' "$state/web.out")"
fi
echo "You are $user. Try: join_group \"Cool Group\", send_message \"Cool Group\", get_messages \"Cool Group\""
status=0
"$bin/user-cli" --registry "$registry" --user "$user" ${args[@]+"${args[@]}"} || status=$?
exit "$status"
