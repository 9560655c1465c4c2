# shellcheck shell=bash
# Sourced by the checks that need Spillway running on this machine
# (test_monitoring.sh, test_openapi.sh): a RabbitMQ vhost and a PostgreSQL database of
# the check's own, the producer and the scaler (with local workers) started from
# SPILLWAY_BIN_DIR, and everything stopped, deleted and dropped again when the check
# exits; on failure the last lines of each process's log are shown.
#
# Before sourcing, set RUN_NAME (names the vhost and the database). Then write the
# job types to "$WORK/jobs.toml" and call `start_spillway [NAME=VALUE...]`; the
# settings given go to both processes. PRODUCER and SCALER are their base URLs.
#
# Needs RabbitMQ with the management plugin, PostgreSQL (psql) and curl. AMQP_URL,
# RABBITMQ_API_URL and TEST_DATABASE_URL choose the broker and the server, as for the
# cargo tests; SPILLWAY_BIN_DIR where the binaries are (default target/release;
# ./manage.sh test passes target/debug, which `cargo test` has just built).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN_DIR="${SPILLWAY_BIN_DIR:-$ROOT/target/release}"
AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
RABBITMQ_API_URL="${RABBITMQ_API_URL:-http://guest:guest@127.0.0.1:15672}"
TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
# How long a process may take to become ready before the check fails.
START_SECONDS=60

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

PYTHON=python3
[[ -x "${SPILLWAY_STATE_DIR:-$ROOT/.spillway}/ci-venv/bin/python" ]] && PYTHON="${SPILLWAY_STATE_DIR:-$ROOT/.spillway}/ci-venv/bin/python"

for binary in producer scaler worker; do
    [[ -x "$BIN_DIR/$binary" ]] || die "$BIN_DIR/$binary is missing: run 'cargo build --release --bins' (or set SPILLWAY_BIN_DIR to where the binaries are), then run this again"
done
for tool in psql curl; do
    command -v "$tool" >/dev/null || die "$tool is missing: install it (sudo apt-get install postgresql-client curl), then run this again"
done

WORK=$(mktemp -d)
SUFFIX=$(od -An -tx1 -N4 /dev/urandom | tr -d ' \n')
VHOST="spillway-$RUN_NAME-$SUFFIX"
DATABASE="spillway_${RUN_NAME}_$SUFFIX"
AMQP_USER=${AMQP_URL#amqp://}
AMQP_USER=${AMQP_USER%%:*}
PIDS=()
SCALER_ENV=()
VHOST_CREATED=0
DATABASE_CREATED=0
export WORKER_DIR="$WORK/workers"

# Asks a process to stop, waits for it a bounded time, then kills it.
stop_process() { # pid, name
    kill -TERM "$1" 2>/dev/null || return 0
    local waited=0
    while kill -0 "$1" 2>/dev/null && ((waited < 150)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    if kill -0 "$1" 2>/dev/null; then
        say "$2 (pid $1) did not stop within 15 s of SIGTERM: killing it"
        kill -KILL "$1" 2>/dev/null || true
    fi
    wait "$1" 2>/dev/null || true
}

# The workers the scaler started, from its own registry: they outlive the scaler by
# design, so they are stopped one by one.
stop_workers() {
    [[ -d "$WORKER_DIR" ]] || return 0
    local listing name pid
    listing=$(env "${SCALER_ENV[@]}" "$BIN_DIR/scaler" workers 2>/dev/null) || { say "cannot list the workers in $WORKER_DIR"; return 0; }
    while read -r name pid; do
        [[ -n "$pid" ]] && stop_process "$pid" "worker $name"
    done < <("$PYTHON" -c 'import json, sys
for w in json.load(sys.stdin):
    if w["phase"] in ("running", "pending") and w["pid"]:
        print(w["name"], w["pid"])' <<<"$listing")
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local index pid name
    for ((index = ${#PIDS[@]} - 1; index >= 0; index--)); do
        IFS=: read -r pid name <<<"${PIDS[index]}"
        stop_process "$pid" "$name"
    done
    stop_workers
    if ((status != 0)); then
        local log
        for log in "$WORK"/*.log; do
            [[ -e "$log" ]] || continue
            printf '\n--- last lines of %s ---\n' "$(basename "$log")" >&2
            tail -n 20 "$log" >&2
        done
    fi
    if ((VHOST_CREATED)); then
        curl -fsS --max-time 10 -X DELETE "$RABBITMQ_API_URL/api/vhosts/$VHOST" >/dev/null ||
            say "could not delete the vhost $VHOST: delete it in the RabbitMQ UI"
    fi
    if ((DATABASE_CREATED)); then
        psql "$TEST_DATABASE_URL" -qAtc "DROP DATABASE IF EXISTS $DATABASE WITH (FORCE)" >/dev/null ||
            say "could not drop the database $DATABASE: drop it by hand"
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_until() { # seconds, description, command...
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        ((SECONDS < deadline)) || die "$what did not happen within ${seconds}s"
        sleep 0.5
    done
}

free_port() {
    "$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

PRODUCER_PORT=$(free_port)
SCALER_PORT=$(free_port)
PRODUCER="http://127.0.0.1:$PRODUCER_PORT"
SCALER="http://127.0.0.1:$SCALER_PORT"

start() { # name, command...
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=("$!:$name")
}

# Whether process `name` is running and `url` answers 2xx.
answers() { # name, url
    local entry
    for entry in "${PIDS[@]}"; do
        [[ "${entry#*:}" == "$1" ]] && { kill -0 "${entry%%:*}" 2>/dev/null || die "$1 exited: see its log below"; }
    done
    curl -fsS --max-time 3 -o /dev/null "$2" 2>/dev/null
}

# The vhost and the database, then the producer and the scaler with the job types in
# "$WORK/jobs.toml" and the settings given, both ready when it returns.
start_spillway() { # NAME=VALUE...
    say "creating vhost $VHOST and database $DATABASE"
    curl -fsS --max-time 10 -X PUT "$RABBITMQ_API_URL/api/vhosts/$VHOST" >/dev/null ||
        die "cannot create a vhost through the management API at ${RABBITMQ_API_URL#*@}: is RabbitMQ running with its management plugin (rabbitmq-plugins enable rabbitmq_management)?"
    VHOST_CREATED=1
    curl -fsS --max-time 10 -X PUT -H 'content-type: application/json' \
        -d '{"configure":".*","write":".*","read":".*"}' \
        "$RABBITMQ_API_URL/api/permissions/$VHOST/$AMQP_USER" >/dev/null ||
        die "cannot give $AMQP_USER permissions on vhost $VHOST"
    psql "$TEST_DATABASE_URL" -qAtc "CREATE DATABASE $DATABASE" >/dev/null ||
        die "cannot create a database on ${TEST_DATABASE_URL#*@}: is PostgreSQL running, and may this user create databases?"
    DATABASE_CREATED=1

    # The scaler's settings, also for `scaler workers`, which reads its registry.
    SCALER_ENV=(AMQP_URL="${AMQP_URL%/*}/$VHOST" RABBITMQ_API_URL="$RABBITMQ_API_URL"
        DATABASE_URL="${TEST_DATABASE_URL%/*}/$DATABASE" JOBS_CONFIG="$WORK/jobs.toml"
        LAUNCHER=local WORKER_BIN="$BIN_DIR/worker" WORKER_DIR="$WORKER_DIR"
        SCALER_LISTEN="127.0.0.1:$SCALER_PORT" PRODUCER_URL="$PRODUCER" "$@")

    say "starting the producer ($PRODUCER) and the scaler ($SCALER) from $BIN_DIR"
    start producer env AMQP_URL="${AMQP_URL%/*}/$VHOST" DATABASE_URL="${TEST_DATABASE_URL%/*}/$DATABASE" \
        JOBS_CONFIG="$WORK/jobs.toml" PRODUCER_LISTEN="127.0.0.1:$PRODUCER_PORT" SPOOL_DIR="$WORK" \
        "$@" "$BIN_DIR/producer"
    start scaler env "${SCALER_ENV[@]}" "$BIN_DIR/scaler"
    wait_until "$START_SECONDS" "the producer becoming ready ($PRODUCER/readyz)" answers producer "$PRODUCER/readyz"
    wait_until "$START_SECONDS" "the scaler becoming ready ($SCALER/readyz)" answers scaler "$SCALER/readyz"
}
