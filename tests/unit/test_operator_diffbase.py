"""kopf's diff base in the operator (operator/handlers.py `JobsDiffBase`): an AlignmentJob's essence is
kopf's own (its spec changes still reach the update handler); a pod, which has no create/update handler,
gets none (kopf would deep-copy every pod event's whole object for nothing)."""

from __future__ import annotations

from typing import Any

import kopf

from mmalign.operator.handlers import JobsDiffBase


def _job(spec: dict[str, Any]) -> kopf.Body:
    return kopf.Body({
        "apiVersion": "mmalign.io/v1alpha1", "kind": "AlignmentJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "u", "labels": {"team": "a"},
                     "managedFields": [{"manager": "kubectl"}]},
        "spec": spec, "status": {"phase": "Running"},
    })


def test_a_job_keeps_kopfs_essence_so_spec_changes_are_seen() -> None:
    ours = JobsDiffBase(prefix="mmalign.io", key="last-handled-configuration")
    kopfs = kopf.AnnotationsDiffBaseStorage(prefix="mmalign.io", key="last-handled-configuration")
    body = _job({"seed": 1, "stages": {"dpo": {}}})
    essence = ours.build(body=body)
    assert essence == kopfs.build(body=body)
    assert essence["spec"] == {"seed": 1, "stages": {"dpo": {}}} and "status" not in essence
    assert ours.build(body=_job({"seed": 2, "stages": {"dpo": {}}})) != essence


def test_a_pod_gets_no_essence() -> None:
    pod = kopf.Body({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "labels": {"mmalign.io/job": "j"}},
        "spec": {"containers": [{"name": "trainer", "image": "x"}]}, "status": {"phase": "Running"},
    })
    assert JobsDiffBase(prefix="mmalign.io", key="last-handled-configuration").build(body=pod) == {}
