"""Pure scheduling decisions of the process node: does a pod fit a node, and which node to pick.

A subset of kube-scheduler's filters, enough for the operator's pods and for tests of "unschedulable":
NodeResourcesFit (requests of cpu, memory, pods and extended resources such as `nvidia.com/gpu`),
NodeSelector, required node affinity (matchExpressions), TaintToleration (NoSchedule/NoExecute) and
`spec.unschedulable`. Scoring: first the node with the fewest pods of the same owner (a ReplicaSet's
replicas spread over the nodes, as the default scheduler's topology spreading does), then "least
allocated": the most free cpu, then memory, then the fewest pods.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

_SUFFIX = {
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}


def parse_quantity(text: str | int | float) -> Decimal:
    """A Kubernetes quantity ("500m", "2", "1Gi", "1e3") as a Decimal in base units."""
    match = re.fullmatch(r"\s*([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2) not in _SUFFIX:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    return Decimal(match.group(1)) * _SUFFIX[match.group(2)]


def pod_requests(pod: dict[str, Any]) -> dict[str, Decimal]:
    """Effective requests: sum over containers, at least the largest init container (like the scheduler).

    A container with limits but no requests requests its limits (API defaulting does that too)."""
    spec = pod.get("spec", {})

    def of(container: dict[str, Any]) -> dict[str, Decimal]:
        res = container.get("resources") or {}
        merged = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        return {name: parse_quantity(value) for name, value in merged.items()}

    total: dict[str, Decimal] = {}
    for container in spec.get("containers", []):
        for name, value in of(container).items():
            total[name] = total.get(name, Decimal(0)) + value
    for container in spec.get("initContainers", []) or []:
        for name, value in of(container).items():
            total[name] = max(total.get(name, Decimal(0)), value)
    total["pods"] = Decimal(1)
    return total


@dataclass
class NodeView:
    """What the scheduler needs to know of one node."""

    name: str
    labels: dict[str, str]
    allocatable: dict[str, Decimal]
    taints: list[dict[str, Any]] = field(default_factory=list)
    unschedulable: bool = False
    used: dict[str, Decimal] = field(default_factory=dict)

    def free(self, resource: str) -> Decimal:
        return self.allocatable.get(resource, Decimal(0)) - self.used.get(resource, Decimal(0))


def tolerates(tolerations: list[dict[str, Any]], taint: dict[str, Any]) -> bool:
    for tol in tolerations:
        if tol.get("effect") and tol["effect"] != taint.get("effect"):
            continue
        if not tol.get("key"):  # empty key with Exists tolerates everything
            if tol.get("operator") == "Exists":
                return True
            continue
        if tol["key"] != taint.get("key"):
            continue
        if tol.get("operator") == "Exists" or tol.get("value", "") == taint.get("value", ""):
            return True
    return False


def _expression_matches(expr: dict[str, Any], labels: dict[str, str]) -> bool:
    key: str = expr.get("key") or ""
    op, values = expr.get("operator"), expr.get("values") or []
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt") and key in labels and values:
        left, right = int(labels[key]), int(values[0])
        return left > right if op == "Gt" else left < right
    return False


def affinity_matches(pod: dict[str, Any], labels: dict[str, str]) -> bool:
    required = (((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if not required:
        return True
    terms = required.get("nodeSelectorTerms") or []
    return any(all(_expression_matches(e, labels) for e in term.get("matchExpressions") or [])
               for term in terms)


def why_not(pod: dict[str, Any], node: NodeView, requests: dict[str, Decimal] | None = None) -> str | None:
    """None when the pod fits the node, else the reason in the scheduler's words."""
    spec = pod.get("spec", {})
    if node.unschedulable:
        return "node(s) were unschedulable"
    selector = spec.get("nodeSelector") or {}
    if any(node.labels.get(k) != v for k, v in selector.items()) or not affinity_matches(pod, node.labels):
        return "node(s) didn't match Pod's node affinity/selector"
    tolerations = spec.get("tolerations") or []
    for taint in node.taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(tolerations, taint):
            return f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value', '')}}}"
    for resource, amount in (requests or pod_requests(pod)).items():
        if amount > 0 and amount > node.free(resource):
            return f"Insufficient {resource}"
    return None


def owner_key(pod: dict[str, Any]) -> str | None:
    """A pseudo-resource counting the pods of one controller per node (NodeView.used), for spreading."""
    owner = next((o for o in pod["metadata"].get("ownerReferences") or [] if o.get("controller")), None)
    return f"owner/{owner['uid']}" if owner else None


def usage(pod: dict[str, Any]) -> dict[str, Decimal]:
    """What a placed pod takes from its node's NodeView.used: its requests, plus one pod of its owner."""
    taken = dict(pod_requests(pod))
    owner = owner_key(pod)
    if owner:
        taken[owner] = Decimal(1)
    return taken


def choose_node(pod: dict[str, Any], nodes: list[NodeView]) -> tuple[str | None, str]:
    """(node name, "") for the best fitting node, or (None, FailedScheduling message)."""
    requests = pod_requests(pod)
    owner = owner_key(pod)
    fitting: list[NodeView] = []
    reasons: dict[str, int] = {}
    for node in nodes:
        reason = why_not(pod, node, requests)
        if reason is None:
            fitting.append(node)
        else:
            reasons[reason] = reasons.get(reason, 0) + 1
    if fitting:
        best = min(fitting, key=lambda n: (n.used.get(owner, 0) if owner else 0, -n.free("cpu"),
                                           -n.free("memory"), n.used.get("pods", 0), n.name))
        return best.name, ""
    detail = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
    return None, f"0/{len(nodes)} nodes are available: {detail}."
