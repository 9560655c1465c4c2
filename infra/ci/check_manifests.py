#!/usr/bin/env python3
"""Checks rendered Kubernetes manifests for what schema validation cannot see.

    kubectl kustomize infra/k8s/overlays/minikube | python3 infra/ci/check_manifests.py

- The scaler's Role grants exactly: batch/jobs create, get, list, watch, delete;
  pods and pods/log get, list, watch. No ClusterRole or ClusterRoleBinding exists.
- No container can run as root: every pod template sets runAsNonRoot and a non-zero
  runAsUser, and every container forbids privilege escalation.
- No default RabbitMQ credentials appear anywhere.
"""

import sys

import yaml

ALLOWED = {
    ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get", "list", "watch"},
}
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


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
    security = spec.get("securityContext", {})
    if security.get("runAsNonRoot") is not True or security.get("runAsUser", 0) == 0:
        problems.append(f"{owner}: pod may run as root (runAsNonRoot, runAsUser)")
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        context = container.get("securityContext", {})
        if context.get("runAsUser") == 0:
            problems.append(f"{owner}/{container['name']}: runs as root")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{owner}/{container['name']}: allows privilege escalation")


def main():
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
    if "Role" not in kinds or "NetworkPolicy" not in kinds:
        problems.append("expected the scaler's Role and RabbitMQ's NetworkPolicy")
    for problem in problems:
        print(f"manifest check: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"manifest check: {len(docs)} objects, Role least-privilege, no root containers")


if __name__ == "__main__":
    main()
