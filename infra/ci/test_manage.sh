#!/usr/bin/env bash
# Tests of manage.sh's cluster commands at the kubectl boundary: fake kubectl, docker,
# minikube and kind on PATH record each call and answer as a cluster would, and each
# test asserts the calls made and the messages printed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK=$(mktemp -d)
FORWARDERS=()
cleanup() {
    local pid
    for pid in "${FORWARDERS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

FAKES="$WORK/bin"
mkdir -p "$FAKES"
export CALLS="$WORK/calls" SPILLWAY_STATE_DIR="$WORK/state"

# curl, for e2e-cluster: the producer and scaler behind the port-forwards, the batch
# settled with FAKE_PROCESSED rows.
cat >"$FAKES/curl" <<'FAKE'
#!/usr/bin/env bash
echo "curl $*" >>"$CALLS"
case "$*" in
    */upload*) echo '{"batch_id":"b-1","job_type":"default","queue":"tasks","rows":20}' ;;
    */api/batches*) echo "[{\"batch_id\":\"b-1\",\"processed\":${FAKE_PROCESSED:-20},\"dead_lettered\":0}]" ;;
    */api/stats*) echo '{"totals":{"ready":0,"unacked":0}}' ;;
    *) echo ok ;;
esac
FAKE

# kubectl: FAKE_CLUSTER=down makes the cluster unreachable, FAKE_CONTEXT names the
# context, FAKE_JOBS_TOML is the spillway-jobs ConfigMap's jobs.toml (absent: no
# ConfigMap), FAKE_SECRET=present makes the credentials Secret exist.
cat >"$FAKES/kubectl" <<'FAKE'
#!/usr/bin/env bash
echo "kubectl $*" >>"$CALLS"
case "$*" in
    cluster-info) [[ "${FAKE_CLUSTER:-up}" == up ]] ;;
    "config current-context") echo "${FAKE_CONTEXT:-minikube}" ;;
    *"get configmap spillway-jobs"*) [[ -f "${FAKE_JOBS_TOML:-/nonexistent}" ]] && cat "$FAKE_JOBS_TOML" ;;
    *"get secret spillway-rabbitmq"* | *"get secret spillway-postgres"* | *"get secret spillway-callbacks"* | *"get secret spillway-tokens"*) [[ "${FAKE_SECRET:-absent}" == present ]] ;;
    *"create configmap"*"--dry-run=client -o jsonpath={.data}"*)
        python3 -c 'import json, sys; print(json.dumps({"jobs.toml": sys.stdin.read()}), end="")' ;;
    *port-forward*) trap 'kill $! 2>/dev/null; exit 0' TERM; sleep 600 & wait ;;
    *"get deployment/producer deployment/scaler"*) [[ "${FAKE_DEPLOYED:-yes}" == yes ]] ;;
    *"get jobs"*"{.status.active}"*) ;;
    *"get jobs"*"conditions"*) printf '%b' "${FAKE_JOB_CONDITIONS:-}" ;;
    *) exit 0 ;;
esac
FAKE
# minikube: FAKE_DOCKER_ENV=fail makes docker-env fail as on a containerd cluster.
cat >"$FAKES/minikube" <<'FAKE'
#!/usr/bin/env bash
echo "minikube $*" >>"$CALLS"
if [[ "$*" == *docker-env* && "${FAKE_DOCKER_ENV:-ok}" == fail ]]; then
    echo "X Exiting due to MK_USAGE: The docker-env command is only compatible with the docker runtime" >&2
    exit 14
fi
FAKE
for tool in docker kind; do
    # shellcheck disable=SC2016 # $* and $CALLS belong to the fake, expanded when it runs
    printf '#!/usr/bin/env bash\necho "%s $*" >>"$CALLS"\n' "$tool" >"$FAKES/$tool"
done
chmod +x "$FAKES"/*

failures=0
fail() { printf 'FAIL %s: %s\n' "$CURRENT" "$*" >&2; failures=$((failures + 1)); }

# Runs manage.sh with the fakes first on PATH and a state directory of its own;
# OUT holds what it printed and STATUS its exit code.
manage() {
    : >"$CALLS"
    STATUS=0
    OUT=$(PATH="$FAKES:$PATH" "$ROOT/manage.sh" "$@" 2>&1) || STATUS=$?
}
called() { grep -qF -- "$1" "$CALLS" || fail "no call matching '$1' in: $(cat "$CALLS")"; }
not_called() { ! grep -qF -- "$1" "$CALLS" || fail "unexpected call matching '$1'"; }
printed() { [[ "$OUT" == *"$1"* ]] || fail "output lacks '$1': $OUT"; }
status() { [[ "$STATUS" == "$1" ]] || fail "exit code $STATUS, expected $1: $OUT"; }
# The jobs.toml the last `scale` patched into the ConfigMap.
patched_toml() {
    sed -n 's/^kubectl .* patch configmap spillway-jobs --type merge -p //p' "$CALLS" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["data"]["jobs.toml"], end="")'
}

export FAKE_JOBS_TOML="$WORK/jobs.toml"

CURRENT="scale sets only the default job type's max_jobs"
cat >"$FAKE_JOBS_TOML" <<'TOML'
tick_seconds = 5

[job_types.default]
queue = "tasks"
max_jobs = 10

[job_types.reports]
queue = "reports"
max_jobs = 3
TOML
manage scale 25
status 0
expected=$(sed 's/^max_jobs = 10$/max_jobs = 25/' "$FAKE_JOBS_TOML")
[[ "$(patched_toml)" == "$expected" ]] || fail "patched: $(patched_toml)"
called "rollout restart deployment/scaler"
printed "max_jobs is now 25"

CURRENT="scale adds max_jobs to a default table without one"
printf '[job_types.default]\nqueue = "tasks"\n\n[job_types.reports]\nmax_jobs = 3\n' >"$FAKE_JOBS_TOML"
manage scale 7
status 0
[[ "$(patched_toml)" == $'[job_types.default]\nqueue = "tasks"\n\nmax_jobs = 7\n[job_types.reports]\nmax_jobs = 3' ]] ||
    fail "patched: $(patched_toml)"

printf '[job_types.reports]\nmax_jobs = 3\n\n[job_types.default]\nqueue = "tasks"\n' >"$FAKE_JOBS_TOML"
manage scale 8
status 0
[[ "$(patched_toml)" == $'[job_types.reports]\nmax_jobs = 3\n\n[job_types.default]\nqueue = "tasks"\nmax_jobs = 8' ]] ||
    fail "patched: $(patched_toml)"

CURRENT="scale refuses a number that is not positive"
for bad in 0 -3 ten ""; do
    manage scale "$bad"
    status 1
    printed "scale needs a positive whole number"
    not_called "patch"
done

CURRENT="scale without a default job type changes nothing"
printf '[job_types.reports]\nmax_jobs = 3\n' >"$FAKE_JOBS_TOML"
manage scale 5
status 1
printed "has no [job_types.default] table"
not_called "patch"

CURRENT="scale before deploying says to deploy"
rm "$FAKE_JOBS_TOML"
manage scale 5
status 1
printed "deploy first with './manage.sh up'"

CURRENT="an unreachable cluster says how to get one"
for command in up down status clean "logs scaler" forward "scale 3" e2e-cluster; do
    # shellcheck disable=SC2086 # the command and its argument are two words
    FAKE_CLUSTER=down manage $command
    status 1
    printed "no reachable Kubernetes cluster"
    printed "minikube start, or kind create cluster"
done

CURRENT="up on minikube builds into minikube's Docker, makes credentials, applies and waits"
manage up
status 0
called "minikube -p minikube docker-env"
for target in producer worker scaler; do
    called "docker build --target $target -t spillway-$target:dev $ROOT"
done
not_called "kind load"
called "create secret generic spillway-rabbitmq --from-literal=username=spillway"
called "create secret generic spillway-postgres --from-literal=password="
called "create secret generic spillway-callbacks --from-literal=secret="
called "create secret generic spillway-tokens --from-literal=tokens.toml=[[token]]"
grep -q "spillway-tokens.*spw_" "$CALLS" && fail "a token, not its hash, went into the Secret"
grep -q "secret generic.*guest" "$CALLS" && fail "the credentials are guest's"
# Each Secret has a password of its own, 48 hex digits.
rabbit=$(grep -o "spillway-rabbitmq --from-literal=username=spillway --from-literal=password=[0-9a-f]*" "$CALLS" | sed 's/.*password=//')
postgres=$(grep -o "spillway-postgres --from-literal=password=[0-9a-f]*" "$CALLS" | sed 's/.*password=//')
((${#rabbit} == 48 && ${#postgres} == 48)) || fail "passwords are not 48 hex digits: '$rabbit' '$postgres'"
[[ $rabbit != "$postgres" ]] || fail "RabbitMQ and PostgreSQL share a password"
called "apply -k $ROOT/infra/k8s/overlays/minikube"
called "rollout restart deployment/producer deployment/scaler"
for workload in statefulset/rabbitmq statefulset/postgres deployment/producer deployment/scaler; do
    called "rollout status $workload"
done
printed "Spillway is up"
# The rollout status waits come after the restart, so they wait for the new pods.
restart_line=$(grep -n "rollout restart" "$CALLS" | cut -d: -f1)
status_line=$(grep -n "rollout status deployment/producer" "$CALLS" | cut -d: -f1)
((restart_line < status_line)) || fail "rollout status before the restart"

CURRENT="up on a minikube without docker-env (containerd) stops at once with what to do"
FAKE_DOCKER_ENV=fail manage up
status 1
printed "--container-runtime=docker"
printed "only compatible with the docker runtime"
not_called "docker build"
not_called "apply -k"

CURRENT="up keeps the credentials of an earlier deploy"
FAKE_SECRET=present manage up
status 0
not_called "create secret"

CURRENT="up on kind loads each image into the named cluster"
FAKE_CONTEXT=kind-batch manage up
status 0
for target in producer worker scaler; do
    called "kind load docker-image spillway-$target:dev --name batch"
done
not_called "minikube -p"

CURRENT="up on another kind of cluster says what to do by hand"
FAKE_CONTEXT=prod-eu manage up
status 1
printed "is neither minikube nor kind"
not_called "apply -k"

CURRENT="e2e-cluster uploads, waits for every row and finds every worker Job Complete"
FAKE_JOB_CONDITIONS='spillway-default-1=SuccessCriteriaMet Complete\nspillway-default-2=SuccessCriteriaMet Complete\n' \
    manage e2e-cluster 20
status 0
called "port-forward svc/producer 18000:8000"
called "port-forward svc/scaler 18080:8080"
called "http://127.0.0.1:18000/upload"
called "curl -H @/dev/fd/"
printed "e2e-cluster passed: 20 rows uploaded and processed, 2 worker Jobs all Complete"

CURRENT="e2e-cluster without a token says where to find one"
mv "$SPILLWAY_STATE_DIR/cluster-admin-token" "$WORK/kept-token"
manage e2e-cluster 20
status 1
printed "set SPILLWAY_TOKEN"
mv "$WORK/kept-token" "$SPILLWAY_STATE_DIR/cluster-admin-token"

CURRENT="e2e-cluster fails on a worker Job that did not end Complete"
FAKE_JOB_CONDITIONS='spillway-default-1=SuccessCriteriaMet Complete\nspillway-default-2=FailureTarget Failed\n' \
    manage e2e-cluster 20
status 1
printed "did not end Complete"
printed "spillway-default-2=FailureTarget Failed"

CURRENT="e2e-cluster needs a deployed Spillway"
FAKE_DEPLOYED=no manage e2e-cluster
status 1
printed "run './manage.sh up' first"

CURRENT="logs needs a component"
manage logs
status 1
printed "logs needs a component"

CURRENT="clean deletes only Spillway's worker Jobs"
manage clean
status 0
called "delete jobs -l app.kubernetes.io/managed-by=spillway-scaler"

CURRENT="forward stop stops only the port-forwards forward started"
PATH="$FAKES:$PATH" "$FAKES/kubectl" port-forward svc/other 9999:9999 &
FORWARDERS+=($!)
stranger=$!
STATE="$SPILLWAY_STATE_DIR/forward.pids"
PATH="$FAKES:$PATH" "$ROOT/manage.sh" forward >"$WORK/forward.out" 2>&1 &
FORWARDERS+=($!)
for _ in $(seq 100); do
    [[ -f "$STATE" && $(wc -l <"$STATE") -eq 3 ]] && break
    sleep 0.1
done
[[ -f "$STATE" && $(wc -l <"$STATE") -eq 3 ]] || fail "forward did not start three port-forwards within 10 s"
mapfile -t started <"$STATE"
manage forward stop
status 0
printed "stopped the port-forwards"
for pid in "${started[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && fail "port-forward $pid still runs"
done
kill -0 "$stranger" 2>/dev/null || fail "a port-forward forward did not start was stopped"
[[ -e "$STATE" ]] && fail "the pid file outlived forward stop"

if ((failures)); then
    printf '%d manage.sh check(s) failed\n' "$failures" >&2
    exit 1
fi
echo "manage.sh cluster commands: all checks passed"
