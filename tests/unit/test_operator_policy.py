"""Failure policy and spec-change policy: decision tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mmalign.api.exit_codes import ExitCode
from mmalign.api.runtime import RunPolicy
from mmalign.operator.policy import (
    SETTLE_SECONDS,
    PodView,
    changed_paths,
    classify,
    classify_create_error,
    deadline_exceeded,
    deadline_start,
    gang_state,
    observe_pod,
    spec_change,
    ttl_expires_at,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def pod(node: int = 0, phase: str = "Failed", code: int | None = 1, reason: str = "", *, at: float = 0.0,
        deleting: bool = False, disrupted: bool = False) -> PodView:
    return PodView(f"j-reward-0-{node}", "reward", 0, node, phase, deleting, code, reason, "",
                   T0 + timedelta(seconds=at) if phase in ("Failed", "Succeeded") else None, disrupted)


@pytest.mark.parametrize(("view", "retryable", "reason"), [
    (pod(code=137), True, "Signal9"),
    (pod(code=143), True, "Signal15"),
    (pod(code=137, reason="OOMKilled"), True, "OOMKilled"),
    (pod(code=1, reason="OOMKilled"), True, "OOMKilled"),  # a parent exited after its child's OOM kill
    (pod(code=None, reason="Evicted"), True, "Evicted"),
    (pod(code=1, disrupted=True, reason="Error"), True, "Error"),
    (pod(phase="Running", code=None, deleting=True), True, "PodDeleted"),
    (pod(phase="Missing", code=None), True, "PodDeleted"),
    (pod(code=5), True, "StorageError"),  # retryable by the default runPolicy.retryableExitCodes
    (pod(code=6), True, "RendezvousError"),  # the master never resolved: a new gang may fix it
    (pod(code=2), False, "ConfigError"),
    (pod(code=3), False, "DataError"),
    (pod(code=4), False, "NanLoss"),
    (pod(code=1), False, "ExitCode1"),
    (pod(code=127), False, "ExitCode127"),
    (pod(code=None, reason="ContainerCannotRun"), True, "PodFailed"),
])
def test_classify(view: PodView, retryable: bool, reason: str) -> None:
    failure = classify(view, RunPolicy().retryable_exit_codes)
    assert (failure.retryable, failure.reason) == (retryable, reason)
    assert view.name in failure.message


def test_retryable_exit_codes_are_configurable() -> None:
    assert classify(pod(code=1), [1]).retryable
    assert not classify(pod(code=5), []).retryable


POLICY = RunPolicy()


@pytest.mark.parametrize(("pods", "now", "state", "reason"), [
    ([pod(0, "Pending", None), pod(1, "Pending", None)], 0, "Pending", None),
    ([pod(0, "Running", None), pod(1, "Pending", None)], 0, "Running", None),
    ([pod(0, "Succeeded", 0), pod(1, "Running", None)], 0, "Running", None),
    ([pod(0, "Succeeded", 0), pod(1, "Succeeded", 0)], 0, "Succeeded", None),
    # node 1 killed, node 0 reacts with exit 1 one second later: the root cause (the signal) decides
    ([pod(0, "Failed", 1, at=1), pod(1, "Failed", 137, at=0)], 5, "Failed", "Signal9"),
    # same second: the signal still wins over the peer's exit code
    ([pod(0, "Failed", 1, at=0), pod(1, "Failed", 137, at=0)], 5, "Failed", "Signal9"),
    # a deleted pod is the root cause whatever its peers report
    ([pod(0, "Failed", 1, at=0), pod(1, "Missing", None)], 5, "Failed", "PodDeleted"),
    # a permanent-looking exit while a peer still runs: wait for the peer's own status a moment
    ([pod(0, "Failed", 1, at=0), pod(1, "Running", None)], 1, "Settling", "ExitCode1"),
    ([pod(0, "Failed", 1, at=0), pod(1, "Running", None)], SETTLE_SECONDS + 1, "Failed", "ExitCode1"),
    # a retryable failure acts at once
    ([pod(0, "Failed", 137, at=0), pod(1, "Running", None)], 0, "Failed", "Signal9"),
    ([pod(0, "Failed", 4, at=0), pod(1, "Failed", 4, at=0)], 0, "Failed", "NanLoss"),
])
def test_gang_state(pods: list[PodView], now: float, state: str, reason: str | None) -> None:
    result = gang_state(pods, 2, POLICY, T0 + timedelta(seconds=now))
    assert result.state == state
    assert (result.failure.reason if result.failure else None) == reason


def test_deadline_and_ttl() -> None:
    policy = RunPolicy(active_deadline_seconds=60, ttl_seconds_after_finished=30)
    assert not deadline_exceeded(T0, T0 + timedelta(seconds=59), policy)
    assert deadline_exceeded(T0, T0 + timedelta(seconds=60), policy)
    assert not deadline_exceeded(None, T0, policy)
    assert not deadline_exceeded(T0, T0 + timedelta(days=9), RunPolicy())
    assert ttl_expires_at(T0, policy) == T0 + timedelta(seconds=30)
    assert ttl_expires_at(T0, RunPolicy()) is None


BASE = {"image": "a", "resources": {"nodes": 2, "requests": {"cpu": "1"}}, "runPolicy": {"suspend": False},
        "podTemplate": {"nodeSelector": {}}, "stages": {"reward": {"learningRate": 0.1}}}


def _with(path: str, value: object) -> dict:
    import copy

    spec = copy.deepcopy(BASE)
    node = spec
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return spec


@pytest.mark.parametrize(("change", "started", "pods_active", "accepted"), [
    (("runPolicy.suspend", True), True, True, True),
    (("runPolicy.backoffLimit", 9), True, True, True),
    (("resources.nodes", 4), False, False, True),  # nothing ran yet: anything goes
    (("resources.nodes", 4), True, True, False),
    (("resources.nodes", 4), True, False, False),  # checkpoints assume the world size
    (("stages.reward.learningRate", 0.2), True, False, False),
    (("podTemplate.nodeSelector", {"pool": "b"}), True, False, True),  # suspended: Kueue may inject these
    (("podTemplate.nodeSelector", {"pool": "b"}), True, True, False),  # pods are immutable
    (("resources.requests.cpu", "2"), True, False, True),
    (("image", "b"), True, True, False),
])
def test_spec_change(change: tuple[str, object], started: bool, pods_active: bool, accepted: bool) -> None:
    verdict = spec_change(BASE, _with(*change), started=started, pods_active=pods_active)
    assert verdict.accepted == accepted
    if not accepted:
        assert verdict.refused_paths and verdict.refused_paths[0].startswith(change[0])


def test_spec_change_is_all_or_nothing() -> None:
    desired = _with("resources.nodes", 4)
    desired["runPolicy"]["suspend"] = True
    verdict = spec_change(BASE, desired, started=True, pods_active=True)
    assert not verdict.accepted and verdict.refused_paths == ("resources.nodes",)
    assert changed_paths({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c"]


def test_observe_pod_reads_labels_and_termination() -> None:
    view = observe_pod({
        "metadata": {"name": "j-dpo-3-1", "labels": {"mmalign.io/stage": "dpo", "mmalign.io/attempt": "3",
                                                    "mmalign.io/node-rank": "1"},
                     "ownerReferences": [{"uid": "u1", "controller": True}],
                     "deletionTimestamp": "2026-01-01T12:00:00Z"},
        "status": {"phase": "Failed", "conditions": [{"type": "DisruptionTarget", "status": "True"}],
                   "containerStatuses": [{"state": {"terminated": {
                       "exitCode": 137, "reason": "OOMKilled", "finishedAt": "2026-01-01T12:00:00Z"}}}]},
    })
    assert (view.stage, view.attempt, view.node_rank, view.owner_uid) == ("dpo", 3, 1, "u1")
    assert view.exit_code == 137 and view.reason == "OOMKilled" and view.finished_at == T0
    assert view.deleting and view.disrupted and view.finished


def test_oom_killed_names_the_memory_limit() -> None:
    def oom_pod(limits: dict[str, str]) -> dict:
        return {"metadata": {"name": "j-dpo-0-0", "labels": {}},
                "spec": {"containers": [{"name": "sidecar", "resources": {"limits": {"memory": "1Gi"}}},
                                        {"name": "trainer", "resources": {"limits": limits}}]},
                "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {
                    "exitCode": 137, "reason": "OOMKilled", "finishedAt": "2026-01-01T12:00:00Z"}}}]}}

    view = observe_pod(oom_pod({"memory": "64Gi", "cpu": "8"}))
    assert view.memory_limit == "64Gi"
    failure = classify(view, RunPolicy().retryable_exit_codes)
    assert (failure.retryable, failure.reason) == (True, "OOMKilled")
    assert "memory limit 64Gi: raise spec.resources.limits.memory" in failure.message
    unlimited = classify(observe_pod(oom_pod({})), RunPolicy().retryable_exit_codes)
    assert unlimited.reason == "OOMKilled" and "no memory limit" in unlimited.message


@pytest.mark.parametrize(("code", "retryable", "reason"), [
    (7, False, "StoragePermanent"), (8, False, "OutOfMemory"),
    (9, True, "CommunicationError"), (10, True, "RendezvousTimeout"),
])
def test_classify_new_exit_codes(code: int, retryable: bool, reason: str) -> None:
    failure = classify(pod(code=code), RunPolicy().retryable_exit_codes)
    assert (failure.retryable, failure.reason) == (retryable, reason)


def test_a_broken_collective_waits_for_the_cause() -> None:
    comm = int(ExitCode.COMMUNICATION_ERROR)
    # node 0 saw the collective break first; node 1 still runs: settle, then node 1's data error decides
    assert gang_state([pod(0, "Failed", comm, at=0), pod(1, "Running", None)], 2, POLICY,
                      T0 + timedelta(seconds=1)).state == "Settling"
    state = gang_state([pod(0, "Failed", comm, at=0), pod(1, "Failed", 3, at=2)], 2, POLICY,
                       T0 + timedelta(seconds=3))
    assert state.state == "Failed" and state.failure is not None and state.failure.reason == "DataError"
    # alone, after the settle time: retryable
    state = gang_state([pod(0, "Failed", comm, at=0), pod(1, "Running", None)], 2, POLICY,
                       T0 + timedelta(seconds=SETTLE_SECONDS + 1))
    assert state.state == "Failed" and state.failure is not None and state.failure.retryable


def test_observe_pod_says_why_it_waits() -> None:
    view = observe_pod({
        "metadata": {"name": "p", "labels": {}},
        "status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/2 nodes have enough nvidia.com/gpu"}]},
    })
    assert view.waiting == "Unschedulable: 0/2 nodes have enough nvidia.com/gpu"
    view = observe_pod({"metadata": {"name": "p"}, "status": {"phase": "Pending", "containerStatuses": [
        {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]}})
    assert view.waiting == "ImagePullBackOff: no such image"


def test_deadline_counts_from_start_else_resume_else_creation() -> None:
    started, resumed, created = T0 + timedelta(seconds=30), T0 + timedelta(seconds=20), T0
    assert deadline_start(started, resumed, created) == started
    assert deadline_start(None, resumed, created) == resumed  # a suspended job's clock restarts
    assert deadline_start(None, None, created) == created  # never got to create a pod: still counts


@pytest.mark.parametrize(("code", "reason", "message", "permanent", "condition_reason"), [
    (422, "Invalid", 'Pod "x" is invalid: spec.tolerations[0].operator: Invalid value', True, "Invalid"),
    (400, "BadRequest", "bad request", True, "BadRequest"),
    (413, "RequestEntityTooLarge", "too large", True, "RequestEntityTooLarge"),
    (403, "Forbidden", 'pods "x" is forbidden: violates PodSecurity "restricted:latest"', True, "Forbidden"),
    (403, "Forbidden", 'pods "x" is forbidden: maximum cpu usage per Container is 2, but limit is 8', True,
     "Forbidden"),
    (403, "Forbidden", 'pods "x" is forbidden: exceeded quota: q, requested: cpu=4', False, "ExceededQuota"),
    (403, "Forbidden", 'pods is forbidden: User "system:serviceaccount:op:op" cannot create resource "pods"', False,
     "Forbidden"),
    (403, "Forbidden", 'services "j" is forbidden: User "system:serviceaccount:op:op" cannot patch resource '
     '"services" in API group "" in the namespace "t"', False, "Forbidden"),  # server-side apply
    (403, "Forbidden", 'unable to create new content in namespace t because it is being terminated', False,
     "Forbidden"),
    (409, "Conflict", "conflict", False, "Conflict"),
    (429, "TooManyRequests", "slow down", False, "TooManyRequests"),
    (500, "InternalError", "etcd timeout", False, "InternalError"),
    (None, "", "ConnectionError: refused", False, "ApiError"),
])
def test_create_errors_permanent_or_retried(code: int | None, reason: str, message: str, permanent: bool,
                                            condition_reason: str) -> None:
    failure = classify_create_error(code, reason, message, "Pod", "j-reward-0-0", "reward")
    assert (failure.permanent, failure.reason) == (permanent, condition_reason)
    assert failure.message.startswith("creating Pod j-reward-0-0 failed: ") and message in failure.message
    assert ("re-create the job" in failure.message) == permanent


def test_a_disruption_target_condition_names_who_disrupted_the_pod() -> None:
    body = {"metadata": {"name": "j-reward-0-1", "labels": {"mmalign.io/stage": "reward"}},
            "status": {"phase": "Failed", "conditions": [
                {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                 "message": "Eviction API: evicting"}],
                "containerStatuses": [{"state": {"terminated": {"exitCode": 143, "reason": "Error"}}}]}}
    view = observe_pod(body)
    failure = classify(view, RunPolicy().retryable_exit_codes)
    assert view.disrupted and failure.disruption and failure.retryable
    assert failure.reason == "EvictionByEvictionAPI" and "Eviction API: evicting" in failure.message
    # a pod deleted by a person (no DisruptionTarget) is a failure like any other: it uses backoffLimit
    deleted = classify(pod(phase="Running", code=None, deleting=True), RunPolicy().retryable_exit_codes)
    assert deleted.retryable and not deleted.disruption
