"""runPolicy.gangScheduling: the PodGroup and the pods' marks each gang scheduler reads (operator/gang.py).

tests/integration/test_gang_scheduling.py has the real API server accept them, with the schedulers' CRDs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mmalign.api.jobfile import load_job
from mmalign.api.spec import AlignmentJobSpec
from mmalign.operator import gang, policy
from mmalign.operator.builders import JobRef, build_attempt, build_pod_group

REPO = Path(__file__).resolve().parents[2]


def job(
    gang: dict[str, Any], labels: dict[str, str] | None = None, template: dict[str, Any] | None = None
) -> JobRef:
    manifest = load_job(REPO / "manifests/examples/tiny-cpu.yaml")
    raw = manifest.spec.model_dump(by_alias=True, exclude_none=True)
    raw["runPolicy"]["gangScheduling"] = gang
    if template is not None:
        raw["podTemplate"] = template
    return JobRef("gang", "ml", "uid-1", AlignmentJobSpec.model_validate(raw), labels or {})


def test_volcano_gets_a_podgroup_of_the_whole_gang_before_the_pods_and_the_pods_name_it() -> None:
    objects = build_attempt(job({"scheduler": "volcano", "queue": "research"}), "reward", 3)
    assert [o["kind"] for o in objects] == ["Service", "ConfigMap", "PodGroup", "Pod", "Pod"]
    group = objects[2]
    assert (
        group["apiVersion"] == "scheduling.volcano.sh/v1beta1"
        and group["metadata"]["name"] == "gang-reward-3"
    )
    # tiny-cpu's pods request 1 cpu and 2Gi each: the group waits for room for both
    assert group["spec"] == {
        "minMember": 2,
        "queue": "research",
        "minResources": {"cpu": "2", "memory": "4Gi"},
    }
    assert group["metadata"]["ownerReferences"][0]["kind"] == "AlignmentJob"
    assert group["metadata"]["labels"]["mmalign.io/attempt"] == "3"
    for pod in objects[3:]:
        assert pod["metadata"]["annotations"] == {"scheduling.k8s.io/group-name": "gang-reward-3"}
        assert pod["spec"]["schedulerName"] == "volcano"


def test_coscheduling_gets_a_scheduler_plugins_podgroup_and_the_pod_group_label() -> None:
    spec = job({"scheduler": "coscheduling", "scheduleTimeoutSeconds": 60})
    group = build_pod_group(spec, "dpo", 0)
    assert group is not None and group["apiVersion"] == "scheduling.x-k8s.io/v1alpha1"
    assert group["spec"] == {
        "minMember": 2,
        "scheduleTimeoutSeconds": 60,
        "minResources": {"cpu": "2", "memory": "4Gi"},
    }
    pods = build_attempt(spec, "dpo", 0)[3:]
    assert {p["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] for p in pods} == {"gang-dpo-0"}
    assert {p["spec"]["schedulerName"] for p in pods} == {"scheduler-plugins-scheduler"}


def test_the_pod_templates_scheduler_name_wins() -> None:
    # a coscheduler running as the default scheduler's profile (scheduler-plugins' own manifests)
    spec = job({"scheduler": "coscheduling"}, template={"schedulerName": "default-scheduler"})
    assert {p["spec"]["schedulerName"] for p in build_attempt(spec, "reward", 0)[3:]} == {"default-scheduler"}


@pytest.mark.parametrize(
    ("gang", "labels", "queue"),
    [
        ({"scheduler": "kueue", "queue": "team-b"}, {}, "team-b"),
        ({"scheduler": "kueue", "queue": "team-b"}, {"kueue.x-k8s.io/queue-name": "team-a"}, "team-a"),
        (
            {"scheduler": "none"},
            {"kueue.x-k8s.io/queue-name": "team-a"},
            "team-a",
        ),  # as before gangScheduling
    ],
)
def test_kueue_gets_its_pod_group_labels_and_no_podgroup(
    gang: dict[str, Any], labels: dict[str, str], queue: str
) -> None:
    spec = job(gang, labels)
    assert build_pod_group(spec, "reward", 1) is None
    for pod in build_attempt(spec, "reward", 1)[2:]:
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "gang-reward-1"
        # an attempt's group is never refilled (a restart is a new group): Kueue finishes the Workload
        # when its pods have ended instead of holding its quota for replacements
        assert pod["metadata"]["annotations"] == {
            "kueue.x-k8s.io/pod-group-total-count": "2",
            "kueue.x-k8s.io/retriable-in-group": "false",
        }
        assert "schedulerName" not in pod["spec"]


def test_no_gang_scheduler_leaves_the_pods_alone() -> None:
    objects = build_attempt(job({}), "reward", 0)
    assert [o["kind"] for o in objects] == ["Service", "ConfigMap", "Pod", "Pod"]
    assert not [p for p in objects[2:] if "annotations" in p["metadata"] or "schedulerName" in p["spec"]]


def test_kueues_eviction_of_a_gang_is_a_disruption_not_a_restart() -> None:
    # What Kueue's pod integration does to the pods of a Workload it preempts (pod_controller.go, Stop):
    # the TerminationTarget condition, then the deletion; the trainer exits 143 on the SIGTERM.
    pod = {
        "metadata": {
            "name": "low-reward-0-0",
            "labels": {"mmalign.io/stage": "reward", "mmalign.io/attempt": "0"},
            "deletionTimestamp": "2026-12-01T00:00:00Z",
        },
        "status": {
            "phase": "Failed",
            "conditions": [
                {
                    "type": "TerminationTarget",
                    "status": "True",
                    "reason": "WorkloadEvictedDueToPreempted",
                    "message": "Preempted to accommodate a workload (UID: 1) due to prioritization in the ClusterQueue",
                }
            ],
            "containerStatuses": [{"state": {"terminated": {"exitCode": 143, "reason": "Error"}}}],
        },
    }
    failure = policy.classify(policy.observe_pod(pod), [])
    assert failure.retryable and failure.disruption
    assert failure.reason == "WorkloadEvictedDueToPreempted"
    assert "Preempted to accommodate a workload" in failure.message


def test_min_resources_sum_the_whole_gangs_requests_gpus_and_sidecars_included() -> None:
    # 3 nodes x (trainer 1500m/3Gi/4 GPUs + a log-shipper sidecar 250m/256Mi); a 4-cpu init container
    # needs more cpu than the running pod while it runs (with the sidecar started before it)
    template = {
        "spec": {
            "initContainers": [
                {
                    "name": "shipper",
                    "image": "shipper:1",
                    "restartPolicy": "Always",
                    "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
                },
                {"name": "fetch", "image": "fetch:1", "resources": {"limits": {"cpu": "4", "memory": "1Gi"}}},
            ]
        }
    }
    manifest = load_job(REPO / "manifests/examples/tiny-cpu.yaml")
    raw = manifest.spec.model_dump(by_alias=True, exclude_none=True)
    raw["runPolicy"]["gangScheduling"] = {"scheduler": "volcano"}
    raw["resources"] = {"nodes": 3, "procPerNode": 4, "requests": {"cpu": "1500m", "memory": "3Gi"}}
    raw["podTemplate"] = template
    spec = JobRef("gpu", "ml", "uid-1", AlignmentJobSpec.model_validate(raw), {})
    group = build_pod_group(spec, "reward", 0)
    assert group is not None
    assert group["spec"]["minResources"] == {"cpu": "12750m", "memory": "9984Mi", "nvidia.com/gpu": "12"}


@pytest.mark.parametrize(
    ("pod_spec", "expected"),
    [
        ({"containers": [{"resources": {"requests": {"cpu": "100m"}}}]}, {"cpu": "200m"}),
        (
            {"containers": [{"resources": {"limits": {"memory": "1.5Gi"}}}]},
            {"memory": "3Gi"},
        ),  # limits stand in
        ({"containers": [{"resources": {"requests": {"cpu": "0"}}}]}, {}),  # nothing requested: no entry
        ({"containers": [{}]}, {}),
    ],
)
def test_min_resources_of_two_pods(pod_spec: dict[str, Any], expected: dict[str, str]) -> None:
    assert gang.min_resources(pod_spec, 2) == expected


def test_a_gang_gated_by_kueue_says_which_workload_waits_for_admission() -> None:
    pod = {
        "metadata": {"name": "b-reward-0-0", "labels": {"kueue.x-k8s.io/pod-group-name": "b-reward-0"}},
        "spec": {"schedulingGates": [{"name": "kueue.x-k8s.io/admission"}]},
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "SchedulingGated",
                    "message": "Scheduling is blocked due to non-empty scheduling gates",
                }
            ],
        },
    }
    (pending,) = policy.pending_pods([policy.observe_pod(pod)])
    assert pending.reason == "SchedulingGated"
    assert pending.message.startswith("waiting for Kueue to admit the gang's Workload b-reward-0 (")
    assert "`kubectl describe workload b-reward-0`" in pending.message
