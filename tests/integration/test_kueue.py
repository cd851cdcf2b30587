"""runPolicy.gangScheduling.scheduler: kueue against a real Kueue (devcluster/kueue.py) and the real API server.

Kueue's manager (built from the Go module proxy, binaries.build_kueue) runs beside the dev cluster with its
plain-Pod integration: its webhook gates each pod of a gang (the pod group the operator's labels name)
until the group's Workload is admitted against a ClusterQueue's quota. Each test gets its own namespace
and operator (the lifecycle tests' `env`) and its own ClusterQueue, whose CPU quota fits ONE gang
(2 pods x 100m of 300m).

    .venv/bin/pytest tests/integration/test_kueue.py -q        # process node (MMALIGN_NODE=process)
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _pytest.fixtures import FixtureFunctionDefinition

from tests.integration import test_operator_lifecycle as lifecycle
from tests.integration.test_operator_lifecycle import Env, job_document, wait_for

pytestmark = pytest.mark.integration
# The lifecycle tests' fixtures (`env`: a namespace with its own operator, and what it needs).
globals().update(
    {name: value for name, value in vars(lifecycle).items() if isinstance(value, FixtureFunctionDefinition)}
)

KUEUE = ("kueue.x-k8s.io", "v1beta2")
FLAVOR = "default-flavor"
PRIORITIES = {"low": 10, "high": 1000}  # WorkloadPriorityClasses, named by the pods' priority-class label
GATE = "kueue.x-k8s.io/admission"


@pytest.fixture(scope="module")
def kueue(dev_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Kueue's manager, CRDs and webhooks in the dev cluster; a ResourceFlavor and the priority classes."""
    from mmalign.devcluster import binaries
    from mmalign.devcluster import kueue as kueue_module

    if getattr(dev_cluster, "node", "process") == "real":
        pytest.skip(
            "Kueue's webhooks are served on the host's loopback; the real node's API server is in a netns"
        )
    binaries.build_kueue()  # cached after the first build
    started = time.monotonic()
    running = kueue_module.start(dev_cluster)
    print(f"\n[kueue] up in {time.monotonic() - started:.1f}s")
    objects = [{"apiVersion": "/".join(KUEUE), "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}}]
    objects += [
        {
            "apiVersion": "/".join(KUEUE),
            "kind": "WorkloadPriorityClass",
            "metadata": {"name": name},
            "value": value,
        }
        for name, value in PRIORITIES.items()
    ]
    try:
        for document in objects:
            apply(dev_cluster, document)
        yield running
    finally:
        try:
            running.stop()
        finally:  # the state folder goes with the cluster: keep the manager's log for a failed run
            shutil.copyfile(running.log, tmp_path_factory.getbasetemp() / "kueue.log")


def apply(cluster: Any, document: dict[str, Any]) -> None:
    done = cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(document))
    assert done.returncode == 0, done.stderr


def queue(env: Env, cpu: str = "300m") -> str:
    """A ClusterQueue for this test's namespace only (quota `cpu`, lower priorities preemptible) and a
    LocalQueue `team` pointing at it; the name of the LocalQueue."""
    name = f"cq-{env.namespace}"
    apply(
        env.cluster,
        {
            "apiVersion": "/".join(KUEUE),
            "kind": "ClusterQueue",
            "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": env.namespace}},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory"],
                        "flavors": [
                            {
                                "name": FLAVOR,
                                "resources": [
                                    {"name": "cpu", "nominalQuota": cpu},
                                    {"name": "memory", "nominalQuota": "4Gi"},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
    )
    apply(
        env.cluster,
        {
            "apiVersion": "/".join(KUEUE),
            "kind": "LocalQueue",
            "metadata": {"name": "team", "namespace": env.namespace},
            "spec": {"clusterQueue": name},
        },
    )
    wait_for(
        "the ClusterQueue active",
        lambda: (
            condition(env.custom.get_cluster_custom_object(*KUEUE, "clusterqueues", name), "Active").get(
                "status"
            )
            == "True"
        ),
    )
    return "team"


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def workload(env: Env, name: str) -> dict[str, Any]:
    """Kueue's Workload of a pod group: named like the group (`<job>-<stage>-<attempt>`)."""
    return env.custom.get_namespaced_custom_object(*KUEUE, env.namespace, "workloads", name)


def kueue_job(name: str, team: str, steps: int, priority: str = "low", **stub: str) -> dict[str, Any]:
    document = job_document(
        name,
        stages=("reward",),
        env={"STUB_STEPS": str(steps), "STUB_STEP_SECONDS": "0.3", **stub},
        run_policy={"gangScheduling": {"scheduler": "kueue", "queue": team}},
    )
    template = document["spec"]["podTemplate"]
    template["labels"] = {"kueue.x-k8s.io/priority-class": priority}
    template["terminationGracePeriodSeconds"] = 10
    return document


def gated(pods: list[Any]) -> bool:
    return bool(pods) and all(GATE in [g.name for g in pod.spec.scheduling_gates or []] for pod in pods)


def test_a_second_job_waits_for_quota_and_is_admitted_when_the_first_finishes(env: Env, kueue: Any) -> None:
    team = queue(env)
    env.apply(kueue_job("first", team, steps=12))
    first = wait_for("the first gang admitted and running", lambda: env.running("first"), 60)
    for pod in first:  # Kueue's marks: its own label and finalizer, the gate gone at admission
        assert pod.metadata.labels["kueue.x-k8s.io/managed"] == "true"
        assert "kueue.x-k8s.io/managed" in pod.metadata.finalizers and not pod.spec.scheduling_gates
    admitted = workload(env, "first-reward-0")
    assert condition(admitted, "Admitted")["status"] == "True"
    assert [p["count"] for p in admitted["spec"]["podSets"]] == [2]  # the gang is one pod set of 2

    env.apply(kueue_job("second", team, steps=3))
    waiting = wait_for(
        "the second gang created, gated",
        lambda: (lambda p: p if len(p) == 2 and gated(p) else None)(env.live_pods("second")),
        30,
    )
    reserved = wait_for(
        "Kueue's reason",
        lambda: (lambda c: c if c.get("status") == "False" else None)(
            condition(workload(env, "second-reward-0"), "QuotaReserved")
        ),
        30,
    )
    assert "insufficient unused quota for cpu" in reserved["message"], reserved
    pending = wait_for(
        "the job's PodsPending condition",
        lambda: (lambda c: c if c.get("status") == "True" else None)(env.condition("second", "PodsPending")),
        30,
    )
    assert pending["reason"] == "SchedulingGated", pending
    assert "waiting for Kueue to admit the gang's Workload second-reward-0" in pending["message"], pending
    assert [p.metadata.name for p in waiting] == ["second-reward-0-0", "second-reward-0-1"]
    # all of this while the first still ran: its quota is the only room, and the same priority preempts nothing
    assert env.status("first")["phase"] == "Running" and len(env.running("first")) == 2

    assert env.phase("first", "Succeeded", "Failed", timeout=60)["phase"] == "Succeeded"
    wait_for(
        "the second gang admitted",
        lambda: env.running("second") or env.status("second").get("phase") == "Succeeded",
        60,
    )
    status = env.phase("second", "Succeeded", "Failed", timeout=60)
    assert status["phase"] == "Succeeded", status
    assert status["stages"]["reward"]["restarts"] == 0 and status["stages"]["reward"]["attempt"] == 0


def test_a_higher_priority_job_preempts_a_gang_which_resumes_from_its_checkpoint(
    env: Env, kueue: Any, tmp_path: Path
) -> None:
    team = queue(env)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    env.apply(kueue_job("low", team, steps=40, STUB_CHECKPOINT_DIR=str(checkpoints)))
    wait_for("the low-priority gang running", lambda: env.running("low"), 60)
    saved = checkpoints / "low-reward"
    wait_for("a checkpoint of step 4", lambda: saved.exists() and int(saved.read_text()) >= 4, 30)

    env.apply(kueue_job("high", team, steps=3, priority="high"))
    # Kueue evicts the low gang's Workload to admit the high one: its pods get TerminationTarget, are deleted
    reward = wait_for(
        "the low job's gang restart",
        lambda: (lambda r: r if r.get("disruptions") else None)(env.status("low")["stages"]["reward"]),
        60,
    )
    assert (reward["restarts"], reward["disruptions"], reward["attempt"]) == (0, 1, 1), reward
    restarted = [m for r, m in env.events("low") if r == "GangRestarting"]
    # Kueue's reason and message, as its pod integration put them on the pods
    assert (
        restarted and "(WorkloadEvictedDueToPreempted): Preempted to accommodate a workload" in restarted[0]
    )
    preempted_at = int(saved.read_text())

    assert env.phase("high", "Succeeded", "Failed", timeout=60)["phase"] == "Succeeded"
    # the preempted job's next gang is a new pod group, admitted once the high one gave the quota back
    status = env.phase("low", "Succeeded", "Failed", timeout=120)
    assert status["phase"] == "Succeeded", status
    # attempt 1 started after the step attempt 0 had saved when it was preempted, not from scratch
    (resume,) = (checkpoints / "low-reward.resumes").read_text().splitlines()
    attempt, resumed_from = map(int, resume.split())
    assert attempt == 1 and resumed_from >= preempted_at >= 4, (resume, preempted_at)
    reward = status["stages"]["reward"]
    # a preemption is a disruption, not a failure: backoffLimit untouched
    assert (reward["restarts"], reward["disruptions"], reward["attempt"]) == (0, 1, 1), reward
    assert reward["lastCheckpoint"] == f"file://{saved}/step-40"
