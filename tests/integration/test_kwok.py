"""kwok nodes (`mmalign dev up --kwok-nodes N`, devcluster/kwok.py) and the operator scale benchmark's
smoke run, on one cluster of this module: real kwok, the real kube-scheduler, no pod runs anything.

    .venv/bin/pytest tests/integration/test_kwok.py -q
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mmalign.devcluster import binaries, kwok
from mmalign.devcluster import cluster as devcluster
from mmalign.devcluster.testing import create_namespace, wait_for

pytestmark = pytest.mark.integration
NODES = 4


@pytest.fixture(scope="module")
def kwok_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devcluster.DevCluster]:
    binaries.ensure_all()
    binaries.ensure_kwok()
    started = time.monotonic()
    dev = devcluster.up(tmp_path_factory.mktemp("kwok"), nodes=0, kwok_nodes=NODES)
    print(f"\n[kwok_cluster] up in {time.monotonic() - started:.1f}s")
    try:
        yield dev
    finally:
        dev.down()


def pod(name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "main", "image": "never-pulled:1", "resources": {"requests": {"cpu": "10m"}}}
            ],
        },
    }


def test_nodes_are_real_kwok_nodes_with_the_given_capacity(kwok_cluster: devcluster.DevCluster) -> None:
    nodes = kwok_cluster.api().get("/api/v1/nodes")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == [kwok.node_name(i) for i in range(NODES)]
    for node in nodes:
        assert node["metadata"]["annotations"][kwok.NODE_ANNOTATION] == "fake"
        assert node["status"]["nodeInfo"]["kubeletVersion"].startswith(
            "kwok-"
        )  # kwok's node-initialize stage
        assert node["status"]["allocatable"]["cpu"] == "8"
    assert kwok_cluster.alive() == {name: True for name in kwok_cluster.processes}
    assert "node" not in kwok_cluster.processes  # no process node: nothing runs pods


def test_pods_run_then_exit_with_the_annotated_code(kwok_cluster: devcluster.DevCluster) -> None:
    api, count = kwok_cluster.api(), 100
    namespace = create_namespace(kwok_cluster, "kwok")
    path = f"/api/v1/namespaces/{namespace}/pods"
    started = time.monotonic()
    for i in range(count):
        api.create(path, pod(f"ok-{i}", {kwok.EXIT_CODE_ANNOTATION: "0"}))
    api.create(path, pod("fails", {kwok.EXIT_CODE_ANNOTATION: "3", kwok.MESSAGE_ANNOTATION: "out of luck"}))
    api.create(path, pod("runs"))

    def phases() -> dict[str, str] | None:
        got = {p["metadata"]["name"]: p["status"].get("phase", "") for p in api.get(path)["items"]}
        want_done = (
            all(got.get(f"ok-{i}") == "Succeeded" for i in range(count)) and got.get("fails") == "Failed"
        )
        return got if want_done and got.get("runs") == "Running" else None

    wait_for(phases, 120, interval=0.5, what=f"{count} kwok pods Succeeded, one Failed, one Running")
    print(f"{count + 2} kwok pods through their stages in {time.monotonic() - started:.1f}s")
    failed = api.get(f"{path}/fails")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (failed["exitCode"], failed["reason"], failed["message"]) == (3, "Error", "out of luck")
    running = api.get(f"{path}/runs")
    assert running["spec"]["nodeName"].startswith(kwok.NODE_PREFIX) and running["status"]["podIP"]
    # Annotating a Running pod later fails it: how the benchmark kills one pod of a gang.
    api.merge_patch(f"{path}/runs", {"metadata": {"annotations": {kwok.EXIT_CODE_ANNOTATION: "137"}}})
    wait_for(
        lambda: api.get(f"{path}/runs")["status"].get("phase") == "Failed",
        30,
        what="the annotated pod Failed",
    )
    # A deleted pod goes at once (kwok's pod-delete stage), whatever its grace period.
    api.delete(f"{path}/runs")
    wait_for(
        lambda: "runs" not in {p["metadata"]["name"] for p in api.get(path)["items"]}, 30, what="deletion"
    )
    api.delete(f"/api/v1/namespaces/{namespace}")


def test_operator_scale_benchmark_quick(kwok_cluster: devcluster.DevCluster) -> None:
    from bench import operator_scale

    report = operator_scale.run([1, 8], jobs=4, job_nodes=4, timeout=90, log=print, dev=kwok_cluster)
    for row in report["gangs"]:
        assert 0 < row["created_s"] <= row["running_s"] and row["restart_s"] > 0
        assert row["start"]["requests"]["by_verb"]["POST pods"] >= row["nodes"]  # one create per pod (kube.py)
        assert row["restart"]["requests"]["total"] > 0 and row["start"]["operator"]["rss_mib"] > 0
    many = report["concurrent"]
    assert many["jobs"] == 4 and many["all_running_s"] > 0 and many["status_lag_max_s"] >= 0
    assert many["requests"]["per_job"] > 0


def test_kwok_nodes_do_not_mix_with_process_nodes(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="--nodes 0"):
        devcluster.up(tmp_path / "dev", nodes=2, kwok_nodes=2)


def test_down_leaves_no_kwok_or_scheduler_process(kwok_cluster: devcluster.DevCluster) -> None:
    # Last in this module: it stops the module's cluster (the fixture's own `down` then finds nothing).
    assert {"kwok", "kube-scheduler"} <= set(kwok_cluster.processes)
    kwok_cluster.down()
    assert not any(kwok_cluster.alive().values()) and not kwok_cluster.state_dir.exists()
