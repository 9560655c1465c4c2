#!/usr/bin/env python3
"""Checks rendered Kubernetes manifests for what schema validation cannot see.

    kubectl kustomize infra/k8s/overlays/minikube | python3 infra/ci/check_manifests.py
    scaler worker-jobs | python3 infra/ci/check_manifests.py --workloads-only

- The scaler's Role grants no more than: batch/jobs create, list, watch, delete;
  pods list; pods/log get. No ClusterRole or ClusterRoleBinding exists.
- Every pod template meets Pod Security `restricted` (the namespace enforces it):
  non-root with a non-zero uid, no privilege escalation, all capabilities dropped
  (NET_BIND_SERVICE the only one added back), a RuntimeDefault or Localhost seccomp
  profile, only the volume types the profile allows, no host namespaces, ports or
  paths, nothing privileged.
- No default RabbitMQ credentials appear anywhere.

With --workloads-only the input holds workloads alone (the worker Jobs the scaler
builds), so the Role and NetworkPolicy are not expected in it; nor are they in a
rendering without the scaler and RabbitMQ (the monitoring add-on).
"""

import sys

import yaml

ALLOWED = {
    ("batch", "jobs"): {"create", "list", "watch", "delete"},
    ("", "pods"): {"list"},
    ("", "pods/log"): {"get"},
}
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
# Pod Security Standards, restricted profile (Kubernetes 1.33).
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}
RESTRICTED_SECCOMP = {"RuntimeDefault", "Localhost"}


def check_role(doc, problems):
    for rule in doc.get("rules", []):
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                allowed = ALLOWED.get((group, resource))
                extra = set(rule.get("verbs", [])) - (allowed or set())
                if allowed is None:
                    problems.append(f"Role {doc['metadata']['name']} grants {group or 'core'}/{resource}")
                elif extra:
                    problems.append(f"Role {doc['metadata']['name']} grants {sorted(extra)} on {resource}")


def check_pod(owner, spec, problems):
    pod = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(f"{owner}: {key} is not allowed under restricted")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"{owner}: volume {volume['name']} of type {sorted(kinds)} is not allowed under restricted")
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        where = f"{owner}/{container['name']}"
        context = container.get("securityContext", {})

        def effective(key):
            return context.get(key, pod.get(key))

        if effective("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not set")
        if effective("runAsUser") in (None, 0):
            problems.append(f"{where}: may run as root (runAsUser)")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allows privilege escalation")
        if context.get("privileged"):
            problems.append(f"{where}: privileged")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{where}: does not drop ALL capabilities")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: adds capabilities {capabilities['add']}")
        seccomp = (effective("seccompProfile") or {}).get("type")
        if seccomp not in RESTRICTED_SECCOMP:
            problems.append(f"{where}: seccompProfile {seccomp!r} is not RuntimeDefault or Localhost")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{where}: uses a hostPort")


def main():
    workloads_only = "--workloads-only" in sys.argv[1:]
    text = sys.stdin.read()
    problems = []
    if "guest" in text:
        problems.append("the manifests mention the default 'guest' credentials")
    docs = [d for d in yaml.safe_load_all(text) if d]
    kinds = [d["kind"] for d in docs]
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in ("ClusterRole", "ClusterRoleBinding"):
            problems.append(f"{kind} {name}: the scaler's rights must stay in its namespace")
        elif kind == "Role":
            check_role(doc, problems)
        elif kind in POD_OWNERS:
            check_pod(f"{kind} {name}", doc["spec"]["template"]["spec"], problems)
    if not docs:
        problems.append("no objects to check")
    # Where the scaler and RabbitMQ are, their Role and NetworkPolicy must be too; an
    # add-on kustomization (overlays/monitoring) holds neither.
    workloads = {(d["kind"], d["metadata"]["name"]) for d in docs}
    if not workloads_only and ("Deployment", "scaler") in workloads and "Role" not in kinds:
        problems.append("expected the scaler's Role beside the scaler")
    if not workloads_only and ("StatefulSet", "rabbitmq") in workloads and "NetworkPolicy" not in kinds:
        problems.append("expected RabbitMQ's NetworkPolicy beside RabbitMQ")
    for problem in problems:
        print(f"manifest check: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"manifest check: {len(docs)} objects, Role least-privilege, Pod Security restricted")


if __name__ == "__main__":
    main()
