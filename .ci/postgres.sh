#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the store tests, listening on 127.0.0.1 only.
#
#   export KVLAB_TEST_PG_URL="$(bash .ci/postgres.sh start)"   # prints only the URL on stdout
#   bash .ci/postgres.sh stop [DIR]        # stops the cluster and removes its folder
#
# The cluster's folder is remembered in a state file named after this checkout, so `stop` needs
# no argument (and two checkouts on one machine keep separate clusters).
# Installs Debian's `postgresql` package when no server binaries exist. initdb refuses to run as
# root, so as root the cluster belongs to the `postgres` user. Everything lives in one mktemp
# folder (data, socket, logs), so `stop` leaves nothing behind. Durability is switched off:
# the cluster is thrown away after the tests.
set -euo pipefail

log() { echo "postgres.sh: $*" >&2; }

checkout="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_FILE="/tmp/kvlab-pg.$(echo "$checkout" | md5sum | cut -c1-12).dir"

find_bindir() {
    if command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return
    fi
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

ensure_server() {
    local bindir
    bindir="$(find_bindir)"
    if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
        log "no PostgreSQL server found; installing Debian's postgresql package"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends postgresql >&2
        bindir="$(find_bindir)"
    fi
    [ -x "$bindir/initdb" ] || { log "initdb not found after install"; exit 1; }
    echo "$bindir"
}

free_port() {
    local py
    py="$(command -v python3 || command -v python)"
    "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
    local bindir dir port
    bindir="$(ensure_server)"
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
    dir="$(mktemp -d /tmp/kvlab-pg.XXXXXX)"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    as_owner "$bindir/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync \
        >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    port="$(free_port)"
    as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 -o \
        "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        start >&2 || { cat "$dir/server.log" >&2; exit 1; }
    as_owner "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres kvlab_test
    echo "$dir" >"$STATE_FILE"
    log "cluster in $dir on 127.0.0.1:$port (stop it with: bash .ci/postgres.sh stop)"
    echo "postgresql+psycopg://postgres@127.0.0.1:$port/kvlab_test"
}

stop() {
    local dir="${1:-}" bindir
    if [ -z "$dir" ] && [ -f "$STATE_FILE" ]; then dir="$(cat "$STATE_FILE")"; fi
    [ -n "$dir" ] && [ -d "$dir" ] || { log "no cluster to stop"; rm -f "$STATE_FILE"; exit 0; }
    case "$dir" in /tmp/kvlab-pg.*) ;; *) log "refusing to remove $dir"; exit 1 ;; esac
    bindir="$(find_bindir)"
    as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    rm -rf "$dir"
    rm -f "$STATE_FILE"
    log "stopped and removed $dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    *) echo "usage: $0 start | stop [DIR]" >&2; exit 2 ;;
esac
