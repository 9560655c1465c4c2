#!/usr/bin/env bash
# Fuzzes the producer's and the scaler's HTTP APIs from their own OpenAPI documents
# with schemathesis, against the real processes: Spillway runs on this machine (the
# producer, and the scaler with local workers) in a RabbitMQ vhost and a PostgreSQL
# database of its own, with a tokens file, as a deployment would. schemathesis reads
# each /openapi.json, sends generated requests to every operation (valid ones and
# invalid ones) with an admin token, and fails the check on any 5xx answer, a status
# the document does not list for that operation, or a body or content type that does
# not match what it says.
#
#   infra/ci/test_openapi.sh          # run by ./manage.sh test after the cargo tests
#
# OPENAPI_EXAMPLES sets how many requests schemathesis generates per operation and
# phase (default 50). Needs schemathesis (./manage.sh test installs it into
# .spillway/ci-venv) and what local_spillway.sh says it needs (RabbitMQ, PostgreSQL,
# the binaries).
set -euo pipefail

RUN_NAME=openapi
# shellcheck source=infra/ci/local_spillway.sh
source "$(dirname "${BASH_SOURCE[0]}")/local_spillway.sh"
EXAMPLES="${OPENAPI_EXAMPLES:-50}"

SCHEMATHESIS="${SPILLWAY_STATE_DIR:-$ROOT/.spillway}/ci-venv/bin/schemathesis"
[[ -x "$SCHEMATHESIS" ]] || SCHEMATHESIS=$(command -v schemathesis) ||
    die "schemathesis is missing: ./manage.sh test installs it, or pip install schemathesis"

# Rows are quick to run, so that batches the fuzzer uploads finish and can be deleted.
cat >"$WORK/jobs.toml" <<'TOML'
tick_seconds = 1
idle_seconds = 5

[job_types.default]
queue = "tasks"
handler = "simulate"
simulate_ms = 5
max_jobs = 1
TOML
(umask 077 && TOKENS_FILE="$WORK/tokens.toml" "$BIN_DIR/producer" \
    token add openapi-check --tenant default --role admin >"$WORK/admin-token") ||
    die "cannot make a token in $WORK/tokens.toml"
start_spillway TOKENS_FILE="$WORK/tokens.toml"

# One upload that the fuzzer's requests for batches can find among random ids.
printf 'id,text\n1,a\n2,b\n' >"$WORK/rows.csv"
curl -fsS --max-time 30 -H @<(printf 'Authorization: Bearer %s\n' "$(cat "$WORK/admin-token")") \
    -F "file=@$WORK/rows.csv" "$PRODUCER/upload" >/dev/null ||
    die "a plain upload failed before fuzzing began"

# The token reaches schemathesis through its environment, not its command line; it
# masks Authorization in what it prints.
cat >"$WORK/schemathesis.toml" <<'TOML'
headers = { Authorization = "Bearer ${SPILLWAY_TOKEN}" }
TOML
failed=()
for service in producer scaler; do
    url=$PRODUCER
    [[ $service == scaler ]] && url=$SCALER
    say "fuzzing the $service's API from $url/openapi.json ($EXAMPLES examples an operation)"
    # From the check's directory, where schemathesis keeps its cache, not the repository.
    if ! (cd "$WORK" && SPILLWAY_TOKEN=$(cat "$WORK/admin-token") "$SCHEMATHESIS" --config-file "$WORK/schemathesis.toml" \
        run "$url/openapi.json" \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
        --max-examples "$EXAMPLES" --seed 1 --workers 2 --request-timeout 30 \
        --generation-database none --no-color); then
        failed+=("$service")
    fi
done
((${#failed[@]} == 0)) || die "schemathesis found answers that break the OpenAPI document of: ${failed[*]} (see above)"
say "OpenAPI check passed: both APIs answer as their documents say"
