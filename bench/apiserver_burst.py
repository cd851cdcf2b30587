"""The API server's own pod-write rate on this machine, with no operator: the bound under
bench/operator_scale.py's gang figures (docs/benchmarks.md, "Operator at scale": issue 16's goals).

    python -m bench.apiserver_burst                          # 256 pods, 32 client threads
    python -m bench.apiserver_burst --pods 64,256 --threads 32 --out bench/results/apiserver-burst.json

It starts a dev cluster with kwok nodes as bench/operator_scale.py does (`mmalign dev up --kwok-nodes N`:
real etcd, kube-apiserver, controller manager, kube-scheduler, kwok; the process node is not started),
and per size N sends the N pods the operator builds for an N-node gang (operator/builders.py
`build_gang` of the same job document, owner reference dropped: no AlignmentJob owns them) from
`--threads` client threads (the operator's PARALLEL_CALLS is 32), three ways:

  create_gated      POST, each pod with a scheduling gate: the scheduler and kwok leave it alone, so this
                    is the API server (and etcd) alone
  apply_gated       the same by server-side apply (PATCH apply, force, the operator's field manager: what
                    the operator sends), gated
  create_scheduled  POST without the gate: the scheduler's bindings and kwok's status writes compete with
                    the creates, as in a gang start; also timed to all Running

Each figure: from the first request to the last answer (`s`, and pods per second), then the pods are
deleted (one collection DELETE) and gone before the next. JSON (`--out`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "apiserver-burst.json"
GATE = "mmalign.io/bench-hold"
APPLY = "application/apply-patch+yaml"


def gang_pods(namespace: str, nodes: int) -> list[dict[str, Any]]:
    """The pods the operator builds for an `nodes`-node gang of bench/operator_scale.py's job."""
    from bench.operator_scale import job_document
    from mmalign.api.spec import AlignmentJobSpec
    from mmalign.operator import builders

    document = job_document("burst", nodes)
    spec = AlignmentJobSpec.model_validate(
        builders.with_operator_defaults(document["spec"], "mmalign:bench", None)
    )
    pods = builders.build_gang(builders.JobRef("burst", namespace, "0", spec), "reward", 0)
    for pod in pods:
        pod["metadata"].pop(
            "ownerReferences", None
        )  # no owner exists: the garbage collector would delete them
    return pods


def gated(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = copy.deepcopy(pods)
    for pod in out:
        pod["spec"]["schedulingGates"] = [{"name": GATE}]
    return out


def rate(seconds: float, pods: int) -> dict[str, float]:
    return {"s": round(seconds, 3), "pods_per_s": round(pods / seconds, 1)}


def burst(api: Any, namespace: str, pods: list[dict[str, Any]], threads: int, how: str) -> float:
    """Seconds from the first request to the last answer, `threads` requests in flight."""
    from mmalign.operator.builders import FIELD_MANAGER

    path = f"/api/v1/namespaces/{namespace}/pods"

    def send(pod: dict[str, Any]) -> None:
        if how == "create":
            api.create(path, pod)
        else:
            api.request(
                "PATCH",
                f"{path}/{pod['metadata']['name']}",
                pod,
                content_type=APPLY,
                params={"fieldManager": FIELD_MANAGER, "force": "true"},
            )

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(send, pods))
    return time.monotonic() - started


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def delete_all(api: Any, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/pods"
    api.request("DELETE", path, {"gracePeriodSeconds": 0}, timeout=300)
    wait_for(lambda: not api.get(path)["items"], 300, "the pods to go")


def measure(api: Any, namespace: str, nodes: int, threads: int) -> dict[str, Any]:
    pods = gang_pods(namespace, nodes)
    path = f"/api/v1/namespaces/{namespace}/pods"
    row: dict[str, Any] = {"pods": nodes, "threads": threads, "load_average": os.getloadavg()[0]}
    row["create_gated"] = rate(burst(api, namespace, gated(pods), threads, "create"), nodes)
    delete_all(api, namespace)
    row["apply_gated"] = rate(burst(api, namespace, gated(pods), threads, "apply"), nodes)
    delete_all(api, namespace)
    started = time.monotonic()
    row["create_scheduled"] = rate(burst(api, namespace, pods, threads, "create"), nodes)

    def all_running() -> bool:
        items = api.get(path)["items"]
        return len(items) == nodes and all((p.get("status") or {}).get("phase") == "Running" for p in items)

    wait_for(all_running, 600, f"{nodes} pods Running")
    row["create_scheduled"]["running_s"] = round(time.monotonic() - started, 3)
    delete_all(api, namespace)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", default="256", help="burst sizes (comma-separated)")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    from bench.operator_scale import environment
    from mmalign.devcluster import binaries
    from mmalign.devcluster import cluster as devcluster
    from mmalign.devcluster.testing import create_namespace

    sizes = [int(n) for n in args.pods.split(",")]
    binaries.ensure_all()
    binaries.ensure_kwok()
    report: dict[str, Any] = {"environment": environment(), "rows": []}
    with tempfile.TemporaryDirectory(prefix="apiburst-") as tmp:
        # pods request 1 cpu of a kwok node's 8 (the job document's resources), as in operator_scale
        dev = devcluster.up(Path(tmp) / "dev", nodes=0, kwok_nodes=-(-max(sizes) // 8) + 1, timeout=300)
        try:
            namespace = create_namespace(dev, "burst")
            api = dev.api()
            for nodes in sizes:
                row = measure(api, namespace, nodes, args.threads)
                print(json.dumps(row), flush=True)
                report["rows"].append(row)
        finally:
            dev.down()
    report["environment"]["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
