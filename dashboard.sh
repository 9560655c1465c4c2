#!/usr/bin/env bash
# Spillway in a terminal: a summary of queues, workers, batches and scaling, from the
# scaler's API (batches as the ledger in PostgreSQL holds them). Needs bash and curl only.
set -euo pipefail

SCALER_URL="${SCALER_URL:-http://localhost:8080}"
SCALER_URL="${SCALER_URL%/}"

usage() {
    cat <<'USAGE'
Usage: ./dashboard.sh [options]
       ./dashboard.sh logs <worker> [--tail N] [-f]
       ./dashboard.sh pause|resume <job type>
       ./dashboard.sh retry|cancel <batch id>

  (no options)    a one-shot summary: queues, workers, batches, recent scaling
  -w [SECONDS]    watch: refresh the summary every SECONDS (default 2); Ctrl-C stops
  --json          the raw JSON behind the summary (stats, jobs, batches, events);
                  "batches" is {"error": ...} while PostgreSQL cannot be read
  logs <worker>   a worker's log (--tail N for its last N lines; -f follows it live
                  until the worker ends)
  pause <type>    spawn no workers for a job type and drain its workers (rows wait)
  resume <type>   let the job type's workers start again
  retry <batch>   publish a batch's dead rows again, attempts reset
  cancel <batch>  cancel a batch: rows not run yet will not run (those in hand finish)
  -h, --help      this text

SCALER_URL points at the scaler (default http://localhost:8080); retry and
cancel go through it to the producer. SPILLWAY_TOKEN is the token to send when the
scaler asks for one (./manage.sh local keeps its admin token in .spillway/admin-token).
USAGE
}

die() { printf 'error: %s\n' "$*" >&2; exit 1; }

unreachable() {
    die "cannot reach the scaler at $SCALER_URL.
Is Spillway running? Start it with './manage.sh local', or for a cluster run
'./manage.sh forward' in another terminal; set SCALER_URL if it listens elsewhere."
}

# The scaler's API and dashboard want a token unless they are open: SPILLWAY_TOKEN,
# sent as a header read from a file descriptor, so it never shows in a process list.
scaler_curl() {
    if [[ -n "${SPILLWAY_TOKEN:-}" ]]; then
        curl -H @<(printf 'Authorization: Bearer %s\n' "$SPILLWAY_TOKEN") "$@"
    else
        curl "$@"
    fi
}

# GET a path of the scaler's API: prints the body, then a line with the status.
get() {
    scaler_curl -sS --max-time 10 -w '\n%{http_code}' "$SCALER_URL$1" 2>/dev/null || unreachable
}

# GET a path of the scaler's API; fails with the API's own error message on 4xx/5xx.
fetch() {
    local body status
    body=$(get "$1")
    status=${body##*$'\n'}
    body=${body%$'\n'*}
    if [[ "$status" == 401 ]]; then
        die "the scaler asks for a token: set SPILLWAY_TOKEN (./manage.sh local keeps its admin token in .spillway/admin-token)"
    fi
    if [[ "$status" != 2* ]]; then
        die "the scaler answered $status for $1: $body"
    fi
    printf '%s' "$body"
}

# GET a JSON path of the scaler's API, its {"error": ...} answer included: batches
# come from PostgreSQL, which may be unreachable while the scaler is not.
fetch_json() {
    local body
    body=$(get "$1")
    printf '%s' "${body%$'\n'*}"
}

colour_flag() {
    if [[ -t 1 && -z "${NO_COLOR:-}" ]]; then echo true; else echo false; fi
}

summary() {
    fetch "/api/summary?color=$(colour_flag)"
}

cmd_summary() {
    summary
}

cmd_watch() {
    local seconds=${1:-2}
    [[ "$seconds" =~ ^[0-9]+$ && "$seconds" -gt 0 ]] || die "-w takes a whole number of seconds, not '$seconds'"
    while true; do
        local screen
        screen=$(summary)
        if [[ -t 1 ]]; then printf '\033[H\033[2J'; fi
        printf '%s\n\n(refreshing every %ss; Ctrl-C to stop)\n' "$screen" "$seconds"
        sleep "$seconds"
    done
}

cmd_json() {
    printf '{"stats":%s,"jobs":%s,"batches":%s,"events":%s}\n' \
        "$(fetch /api/stats)" "$(fetch /api/jobs)" "$(fetch_json /api/batches)" "$(fetch /api/events)"
}

cmd_logs() {
    local worker=${1:-} query="" follow=""
    [[ -n "$worker" ]] || die "logs needs a worker name: ./dashboard.sh logs <worker> (names are in the summary)"
    shift
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --tail)
                [[ "${2:-}" =~ ^[0-9]+$ ]] || die "--tail takes a number of lines"
                query="tail=$2"
                shift 2
                ;;
            -f | --follow) follow=1; shift ;;
            *) die "logs takes --tail N and -f, not '$1'" ;;
        esac
    done
    [[ "$worker" =~ ^[A-Za-z0-9._-]+$ ]] || die "'$worker' is not a worker name"
    if [[ -z "$follow" ]]; then
        fetch "/api/jobs/$worker/logs${query:+?$query}"
        return
    fi
    # Server-Sent Events: each data field is a line of the log; the stream ends with
    # the worker (an `end` event), or on Ctrl-C.
    local status
    status=$(scaler_curl -sS -o /dev/null -w '%{http_code}' --max-time 10 \
        "$SCALER_URL/api/jobs/$worker/logs?tail=0") || unreachable
    [[ "$status" == 200 ]] || die "no worker named '$worker' (HTTP $status): names are in the summary"
    scaler_curl -sSN "$SCALER_URL/api/jobs/$worker/logs?follow=1${query:+&$query}" |
        awk '/^event: / { event = substr($0, 8); next }
             /^data:/ { sub(/^data: ?/, ""); if (event == "") print; else if (event == "error") print "error: " $0 > "/dev/stderr"; fflush(); next }
             /^$/ { event = "" }' || unreachable
}

# POST to a path of the scaler's API; fails with the API's own error message on 4xx/5xx.
post() {
    local body status
    body=$(scaler_curl -sS --max-time 10 -X POST -w '\n%{http_code}' "$SCALER_URL$1" 2>/dev/null) || unreachable
    status=${body##*$'\n'}
    body=${body%$'\n'*}
    if [[ "$status" != 2* ]]; then
        die "the scaler answered $status for $1: $body"
    fi
    printf '%s\n' "$body"
}

cmd_pause() { # pause|resume, job type
    local action=$1 job_type=${2:-}
    [[ -n "$job_type" ]] || die "$action needs a job type: ./dashboard.sh $action <job type>"
    [[ "$job_type" =~ ^[A-Za-z0-9._-]+$ ]] || die "'$job_type' is not a job type name"
    post "/job-types/$job_type/$action"
}

cmd_batch() { # retry|cancel, batch id
    local action=$1 batch=${2:-}
    [[ -n "$batch" ]] || die "$action needs a batch id: ./dashboard.sh $action <batch id>"
    [[ "$batch" =~ ^[A-Za-z0-9._-]+$ ]] || die "'$batch' is not a batch id"
    post "/batches/$batch/$action"
}

main() {
    case "${1:-}" in
        "") cmd_summary ;;
        -w | --watch) cmd_watch "${2:-2}" ;;
        --json) cmd_json ;;
        logs) shift; cmd_logs "$@" ;;
        pause | resume) cmd_pause "$1" "${2:-}" ;;
        retry | cancel) cmd_batch "$1" "${2:-}" ;;
        -h | --help | help) usage ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
}

main "$@"
