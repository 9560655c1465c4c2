#!/usr/bin/env bash
# Checks the monitoring add-on (infra/k8s/overlays/monitoring) against the real thing:
# runs the alert rules' unit tests (promtool test rules), then starts Spillway on this
# machine (the producer, and the scaler with local workers) in a RabbitMQ vhost and a
# PostgreSQL database of its own, uploads a small CSV whose rows partly die, runs a
# local Prometheus with the add-on's scrape jobs (static targets in place of DNS) and
# alert rules, and evaluates every PromQL expression of the Grafana dashboard and of
# the alert rules through Prometheus's HTTP API. An expression that errors or returns
# no series fails the check, naming it. The expressions are read from the files
# themselves, so the check cannot drift from them.
#
# Alert conditions (`x > 0`, `a unless b`) may rightly be empty; for them each side of
# every comparison and of every and/or/unless is evaluated on its own and must return
# series, and the whole condition must evaluate without error (and Prometheus, which
# runs the rules, must report every rule healthy).
#
#   infra/ci/test_monitoring.sh          # run by ./manage.sh test after the cargo tests
#
# Needs Prometheus (Debian's `prometheus` package: prometheus and promtool), and what
# local_spillway.sh says it needs (RabbitMQ, PostgreSQL, the binaries).
set -euo pipefail

RUN_NAME=monitoring
# shellcheck source=infra/ci/local_spillway.sh
source "$(dirname "${BASH_SOURCE[0]}")/local_spillway.sh"
MONITORING="$ROOT/infra/k8s/overlays/monitoring"
# How long each wait may take before the check fails, saying what did not happen.
BATCH_SECONDS=120
QUERY_SECONDS=90

for tool in prometheus promtool; do
    command -v "$tool" >/dev/null || die "$tool is missing: install it (sudo apt-get install prometheus), then run this again"
done
"$PYTHON" -c 'import yaml' 2>/dev/null || die "$PYTHON cannot import yaml: install PyYAML (sudo apt-get install python3-yaml), then run this again"

say "unit tests of the alert rules (promtool test rules)"
(cd "$MONITORING/prometheus" && promtool test rules alerts_test.yml) ||
    die "the alert rules fail their unit tests in $MONITORING/prometheus/alerts_test.yml (see above)"

PROMETHEUS_PORT=$(free_port)
PROMETHEUS="http://127.0.0.1:$PROMETHEUS_PORT"

# Rows die on their first failure, so a small batch ends with dead rows at once.
cat >"$WORK/jobs.toml" <<'TOML'
tick_seconds = 1
idle_seconds = 5

[job_types.default]
queue = "tasks"
handler = "simulate"
simulate_ms = 20
fail_rate = 0.3
delivery_limit = 1
max_jobs = 2
TOML
# shellcheck disable=SC2119 # open on loopback, no settings beyond the defaults
start_spillway

# The add-on's configuration with its alert rules, each scrape job's discovery
# replaced by this run's address of the same process. A job the table below does not
# know fails the check: a new job in the add-on needs its local target here.
say "starting Prometheus ($PROMETHEUS) with the add-on's scrape jobs and alert rules"
"$PYTHON" - "$MONITORING/prometheus/prometheus.yml" "$MONITORING/prometheus/alerts.yml" \
    "127.0.0.1:$PRODUCER_PORT" "127.0.0.1:$SCALER_PORT" >"$WORK/prometheus.yml" <<'PY' ||
import sys
import yaml

config_file, rules_file, producer, scaler = sys.argv[1:]
local_targets = {"spillway-producer": producer, "spillway-scaler": scaler}
with open(config_file) as f:
    config = yaml.safe_load(f)
# Every second, so that rates have samples within seconds.
config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
config["rule_files"] = [rules_file]
for job in config["scrape_configs"]:
    name = job["job_name"]
    if name not in local_targets:
        sys.exit(f"the add-on scrapes job {name!r}, which this check has no local target for")
    for key in [k for k in job if k.endswith("_sd_configs") or k == "relabel_configs"]:
        del job[key]
    job["static_configs"] = [{"targets": [local_targets[name]]}]
print(yaml.safe_dump(config, sort_keys=False))
PY
    die "cannot build the local Prometheus configuration from $MONITORING/prometheus/prometheus.yml"
promtool check config "$WORK/prometheus.yml" >/dev/null || die "the local Prometheus configuration does not check: see above"
start prometheus prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" --log.level=warn
wait_until "$START_SECONDS" "Prometheus becoming ready ($PROMETHEUS/-/ready)" answers prometheus "$PROMETHEUS/-/ready"

targets_up() {
    curl -fsS --max-time 3 "$PROMETHEUS/api/v1/targets?state=active" 2>/dev/null | "$PYTHON" -c 'import json, sys
targets = json.load(sys.stdin)["data"]["activeTargets"]
sys.exit(not targets or any(t["health"] != "up" for t in targets))'
}
wait_until "$START_SECONDS" "every scrape target up (see $PROMETHEUS/targets)" targets_up

say "uploading 40 rows (about a third die) and one malformed file"
"$PYTHON" "$ROOT/data/generate_data.py" --rows 40 --out "$WORK/rows.csv" >/dev/null 2>&1
answer=$(curl -sS --max-time 30 --fail-with-body -F "file=@$WORK/rows.csv" "$PRODUCER/upload") ||
    die "the upload failed: $answer"
batch_id=$("$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["batch_id"])' <<<"$answer")
printf 'a,b\n1\n' >"$WORK/ragged.csv"
status=$(curl -sS --max-time 30 -o /dev/null -w '%{http_code}' -F "file=@$WORK/ragged.csv" "$PRODUCER/upload")
[[ "$status" == 400 ]] || die "a ragged CSV was answered $status, not 400"

batch_finished() {
    local batch
    batch=$(curl -fsS --max-time 3 "$PRODUCER/batches/$batch_id" 2>/dev/null) || return 1
    "$PYTHON" -c 'import json, sys
b = json.load(sys.stdin)
if b["state"] == "done":
    sys.exit("no row died, so the dead-row panels and alert have nothing to show: raise fail_rate")
sys.exit(b["state"] != "done_with_failures")' <<<"$batch"
}
wait_until "$BATCH_SECONDS" "batch $batch_id finishing with dead rows (GET $PRODUCER/batches/$batch_id)" batch_finished
say "batch $batch_id finished with dead rows; evaluating the expressions"

"$PYTHON" - "$PROMETHEUS" "$MONITORING/grafana/spillway.json" "$MONITORING/prometheus/alerts.yml" "$QUERY_SECONDS" <<'PY' ||
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

prometheus, dashboard_file, rules_file, seconds = sys.argv[1:]
# What Grafana puts in place of its variables: the dashboard's "All" and a rate window
# holding several of this run's 1 s scrapes.
VARIABLES = {"$__rate_interval": "30s", "$job_type": ".*"}
COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
SET_OPERATORS = ("and", "or", "unless")
MODIFIER = re.compile(r"^\s*(bool\b|(on|ignoring|group_left|group_right)\s*(\([^)]*\))?)")
NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def query(expr):
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
    except urllib.error.HTTPError as error:
        body = json.load(error)
    if body.get("status") != "success":
        return f"error: {body.get('error')}", None
    data = body["data"]
    return None, data["result"] if data["resultType"] in ("vector", "matrix") else [data["result"]]


def substitute(expr, where):
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    unknown = re.findall(r"\$\{?\w+", expr)
    if unknown:
        sys.exit(f"{where}: the check does not know the variables {unknown}: add them to VARIABLES")
    return expr


def unwrap(expr):
    """The expression without parentheses around the whole of it."""
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for index, char in enumerate(expr):
            depth += char == "("
            depth -= char == ")"
            if depth == 0 and index < len(expr) - 1:
                return expr
        expr = expr[1:-1].strip()
    return expr


def operands(expr):
    """The sides of every top-level comparison and and/or/unless, recursively."""
    expr = unwrap(expr)
    parts, depth, quote, start, index = [], 0, None, 0, 0
    while index < len(expr):
        char = expr[index]
        if quote:
            quote = None if char == quote and expr[index - 1] != "\\" else quote
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            word = re.match(r"[A-Za-z_:][\w:]*", expr[index:])
            before = expr[index - 1] if index else " "
            operator = next((op for op in COMPARISONS if expr.startswith(op, index)), None)
            if word and word.group() in SET_OPERATORS and not re.match(r"[\w:]", before):
                operator = word.group()
            elif word:
                index += len(word.group())
                continue
            if operator:
                parts.append(expr[start:index])
                index += len(operator)
                while MODIFIER.match(expr[index:]):
                    index += MODIFIER.match(expr[index:]).end()
                start = index
                continue
        index += 1
    parts.append(expr[start:])
    if len(parts) == 1:
        return [expr]
    return [leaf for part in parts if not NUMBER.match(part) for leaf in operands(part)]


checks = []  # (where, expression, must return series)
with open(dashboard_file) as f:
    dashboard = json.load(f)


def panels(items):
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


for panel in panels(dashboard["panels"]):
    for target in panel.get("targets", []):
        where = f"dashboard panel {panel['title']!r} ({target['refId']})"
        checks.append((where, substitute(target["expr"], where), True))
for variable in dashboard.get("templating", {}).get("list", []):
    definition = variable.get("definition") or variable["query"]["query"]
    found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition.strip())
    if not found:
        sys.exit(f"dashboard variable {variable['name']}: the check reads label_values(...) queries only")
    checks.append((f"dashboard variable {variable['name']}", found.group(1), True))
with open(rules_file) as f:
    rules = [rule for group in yaml.safe_load(f)["groups"] for rule in group["rules"]]
for rule in rules:
    name = rule.get("alert") or rule.get("record")
    checks.append((f"rule {name} (whole condition, may be empty)", rule["expr"], False))
    for side in operands(rule["expr"]):
        checks.append((f"rule {name}, one side", side, True))

# Poll until every expression answers, or the time is up: rates need a few scrapes.
deadline = time.monotonic() + float(seconds)
while True:
    failures = []
    for where, expr, needs_series in checks:
        error, result = query(expr)
        if error or (needs_series and not result):
            failures.append((where, expr, error or "no series"))
    rule_groups = json.load(urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=10))["data"]["groups"]
    loaded = [rule for group in rule_groups for rule in group["rules"]]
    if len(loaded) != len(rules):
        failures.append(("Prometheus's rules", rules_file, f"{len(loaded)} rules loaded of {len(rules)}"))
    for rule in loaded:
        if rule.get("health") != "ok":
            failures.append((f"rule {rule['name']} as Prometheus runs it", rule["query"],
                             f"health {rule.get('health')}: {rule.get('lastError', '')}"))
    if not failures or time.monotonic() > deadline:
        break
    time.sleep(1)

for where, expr, _ in checks:
    print(f"  {where}: {' '.join(expr.split())}")
for where, expr, problem in failures:
    print(f"FAILED {where}: {problem}\n    {' '.join(expr.split())}", file=sys.stderr)
if failures:
    sys.exit(1)
print(f"{len(checks)} expressions answered ({len(rules)} rules healthy in Prometheus)")
PY
    die "some dashboard or alert expressions returned an error or no series (listed above)"
say "monitoring check passed: every dashboard and alert expression answers against a real Prometheus"
