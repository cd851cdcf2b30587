"""runPolicy.gangScheduling: the PodGroup and the pods' marks each gang scheduler reads (operator/gang.py).

tests/integration/test_gang_scheduling.py has the real API server accept them, with the schedulers' CRDs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mmalign.api.jobfile import load_job
from mmalign.api.spec import AlignmentJobSpec
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
    assert group["spec"] == {"minMember": 2, "queue": "research"}
    assert group["metadata"]["ownerReferences"][0]["kind"] == "AlignmentJob"
    assert group["metadata"]["labels"]["mmalign.io/attempt"] == "3"
    for pod in objects[3:]:
        assert pod["metadata"]["annotations"] == {"scheduling.k8s.io/group-name": "gang-reward-3"}
        assert pod["spec"]["schedulerName"] == "volcano"


def test_coscheduling_gets_a_scheduler_plugins_podgroup_and_the_pod_group_label() -> None:
    spec = job({"scheduler": "coscheduling", "scheduleTimeoutSeconds": 60})
    group = build_pod_group(spec, "dpo", 0)
    assert group is not None and group["apiVersion"] == "scheduling.x-k8s.io/v1alpha1"
    assert group["spec"] == {"minMember": 2, "scheduleTimeoutSeconds": 60}
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
        assert pod["metadata"]["annotations"] == {"kueue.x-k8s.io/pod-group-total-count": "2"}
        assert "schedulerName" not in pod["spec"]


def test_no_gang_scheduler_leaves_the_pods_alone() -> None:
    objects = build_attempt(job({}), "reward", 0)
    assert [o["kind"] for o in objects] == ["Service", "ConfigMap", "Pod", "Pod"]
    assert not [p for p in objects[2:] if "annotations" in p["metadata"] or "schedulerName" in p["spec"]]
