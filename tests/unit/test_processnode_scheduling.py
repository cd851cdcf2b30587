"""The process node's scheduler decisions (devcluster/scheduling.py), without a cluster."""

from __future__ import annotations

from decimal import Decimal

import pytest

from mmalign.devcluster.scheduling import (
    NodeView,
    choose_node,
    parse_quantity,
    pod_requests,
    tolerates,
    why_not,
)


def pod(requests: dict | None = None, limits: dict | None = None, **spec) -> dict:
    resources = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
    return {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "resources": resources}], **spec}}


def node(name: str = "n0", cpu: str = "8", memory: str = "32Gi", gpus: int = 0, **kw) -> NodeView:
    alloc = {"cpu": parse_quantity(cpu), "memory": parse_quantity(memory), "pods": Decimal(110)}
    if gpus:
        alloc["nvidia.com/gpu"] = Decimal(gpus)
    return NodeView(name=name, labels=kw.pop("labels", {}), allocatable=alloc, **kw)


@pytest.mark.parametrize(("text", "value"), [
    ("500m", Decimal("0.5")), ("2", Decimal(2)), ("1Gi", Decimal(2**30)), ("1G", Decimal(10**9)),
    ("1e3", Decimal(1000)), ("128Mi", Decimal(128 * 2**20)), (4, Decimal(4)),
])
def test_parse_quantity(text, value):
    assert parse_quantity(text) == value


def test_parse_quantity_rejects_garbage():
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity("lots")


def test_requests_sum_containers_take_max_of_init_and_default_to_limits():
    spec = {"containers": [{"name": "a", "resources": {"requests": {"cpu": "1"}}},
                           {"name": "b", "resources": {"limits": {"cpu": "2", "nvidia.com/gpu": "1"}}}],
            "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "5"}}}]}
    got = pod_requests({"spec": spec})
    assert got["cpu"] == Decimal(5) and got["nvidia.com/gpu"] == Decimal(1) and got["pods"] == 1


def test_fits_and_reasons():
    assert why_not(pod({"cpu": "1"}), node()) is None
    assert why_not(pod({"cpu": "9"}), node()) == "Insufficient cpu"
    assert why_not(pod(limits={"nvidia.com/gpu": "1"}), node()) == "Insufficient nvidia.com/gpu"
    assert why_not(pod(limits={"nvidia.com/gpu": "2"}), node(gpus=2)) is None
    assert why_not(pod({"cpu": "1"}), node(used={"cpu": Decimal("7.5")})) == "Insufficient cpu"
    assert why_not(pod(), node(unschedulable=True)) == "node(s) were unschedulable"


def test_node_selector_and_required_affinity():
    assert why_not(pod(nodeSelector={"zone": "a"}), node(labels={"zone": "a"})) is None
    assert "affinity/selector" in why_not(pod(nodeSelector={"zone": "a"}), node(labels={"zone": "b"}))
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]},
        {"matchExpressions": [{"key": "cpu-only", "operator": "Exists"}]}]}}}
    assert why_not(pod(affinity=affinity), node(labels={"gpu": "h100"})) is None
    assert why_not(pod(affinity=affinity), node(labels={"cpu-only": ""})) is None
    assert why_not(pod(affinity=affinity), node(labels={"gpu": "a100"})) is not None


def test_taints_need_tolerations():
    taint = {"key": "dedicated", "value": "train", "effect": "NoSchedule"}
    assert "untolerated taint" in why_not(pod(), node(taints=[taint]))
    assert why_not(pod(tolerations=[{"key": "dedicated", "value": "train", "effect": "NoSchedule"}]),
                   node(taints=[taint])) is None
    assert tolerates([{"operator": "Exists"}], taint)
    assert not tolerates([{"key": "dedicated", "operator": "Equal", "value": "other"}], taint)
    prefer = {"key": "x", "effect": "PreferNoSchedule"}
    assert why_not(pod(), node(taints=[prefer])) is None  # a preference, not a filter


def test_choose_node_spreads_and_explains_failure():
    nodes = [node("n0", used={"pods": Decimal(1)}), node("n1")]
    assert choose_node(pod(), nodes) == ("n1", "")
    nodes = [node("n0", cpu="4", used={"cpu": Decimal(1)}), node("n1", cpu="4")]
    assert choose_node(pod({"cpu": "1"}), nodes)[0] == "n1"
    name, message = choose_node(pod(limits={"nvidia.com/gpu": "1"}, nodeSelector={"a": "b"}),
                                [node("n0", labels={"a": "b"}), node("n1")])
    assert name is None
    assert message == ("0/2 nodes are available: 1 Insufficient nvidia.com/gpu, "
                       "1 node(s) didn't match Pod's node affinity/selector.")


def test_replicas_of_one_owner_spread_even_onto_a_busier_node() -> None:
    """Like the default scheduler's topology spreading: the second replica avoids its sibling's node."""
    from decimal import Decimal

    from mmalign.devcluster.scheduling import NodeView, choose_node, usage

    def replica(name: str) -> dict:
        return {"metadata": {"name": name, "ownerReferences": [{"uid": "rs-1", "controller": True}]},
                "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "100m"}}}]}}

    allocatable = {"cpu": Decimal(8), "memory": Decimal(2**34), "pods": Decimal(110)}
    idle = NodeView("node-a", {}, dict(allocatable))
    busy = NodeView("node-b", {}, dict(allocatable), used={"cpu": Decimal(2), "pods": Decimal(1)})
    first, _ = choose_node(replica("web-1"), [idle, busy])
    assert first == "node-a"
    for resource, amount in usage(replica("web-1")).items():
        idle.used[resource] = idle.used.get(resource, Decimal(0)) + amount
    second, _ = choose_node(replica("web-2"), [idle, busy])
    assert second == "node-b"
