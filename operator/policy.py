"""Pure failure and run policy: which pod failures restart the gang, which fail the job, and which spec
changes are safe while the job runs. No API calls; table-tested in tests/unit/test_operator_policy.py.

Exit codes (runPolicy.retryableExitCodes makes 1-127 retryable one by one):

| what happened                                  | decision                                   |
| ---------------------------------------------- | ------------------------------------------ |
| exit 0 on every pod of the gang                | stage Succeeded                            |
| exit >= 128 (a signal: SIGKILL 137, OOM, ...)  | retryable: restart the gang, attempt + 1   |
| OOMKilled (the container's memory limit)       | retryable, reason OOMKilled, names the limit |
| evicted, preempted, node lost, pod deleted     | retryable                                  |
| exit in retryableExitCodes (default: 5, 6, 9, 10) | retryable                               |
| any other exit in 1-127 (2 config, 3 data, 4 NaN, 7 S3 refused, 8 CUDA OOM) | permanent: Fails at once |
| retryable, but restarts == backoffLimit         | the job Fails: BackoffLimitExceeded       |
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from mmalign.api import conditions
from mmalign.api.exit_codes import ExitCode
from mmalign.api.keys import KUEUE_POD_GROUP, LABEL_ATTEMPT, LABEL_NODE_RANK, LABEL_STAGE
from mmalign.api.runtime import RunPolicy
from mmalign.api.status import PendingPod
from mmalign.operator.builders import CONTAINER as TRAINER_CONTAINER

# A permanent-looking exit is often a consequence: when one node is killed, torchrun on the others sees
# the collective break and exits 1 a moment later (or its pod status arrives first). A permanent
# failure is believed only after the other pods had this long to report their own.
SETTLE_SECONDS = 10.0

# Kubernetes' words: pod phases (PodView adds MISSING: a pod of the gang the operator does not see), the
# pod reasons of a disruption (the kubelet's, the scheduler's, the node controller's), a container's
# ordinary termination reasons.
PENDING, RUNNING, SUCCEEDED, FAILED = "Pending", "Running", "Succeeded", "Failed"
MISSING = "Missing"
FINISHED_PHASES = (SUCCEEDED, FAILED)
_DISRUPTION_REASONS = {"Evicted", "Preempting", "Preempted", "DeletionByTaintManager", "NodeLost",
                       "Terminated", "Shutdown", "NodeShutdown", "UnexpectedAdmissionError"}
_PLAIN_EXIT_REASONS = ("Error", "Completed")
# The pod conditions that say something outside the trainer ended the pod: Kubernetes' DisruptionTarget
# (eviction, preemption, taint manager), and Kueue's TerminationTarget, which its pod integration sets on
# the pods of a workload it evicts (preempted by a higher priority, deactivated, ...) before deleting them,
# reason `WorkloadEvictedDueTo<reason>` (sigs.k8s.io/kueue pkg/controller/jobs/pod, Stop).
DISRUPTION_CONDITIONS = ("DisruptionTarget", "TerminationTarget")
KUEUE_ADMISSION_GATE = "kueue.x-k8s.io/admission"  # on a pod until Kueue admits its Workload


@dataclass(frozen=True)
class PodView:
    """What the operator needs to know about one of its pods (from the pod's labels and status)."""

    name: str
    stage: str
    attempt: int
    node_rank: int
    phase: str = PENDING  # Pending, Running, Succeeded, Failed, Unknown; or Missing
    deleting: bool = False  # has a deletionTimestamp
    exit_code: int | None = None
    reason: str = ""  # pod reason (Evicted) or container termination reason (OOMKilled, Error)
    message: str = ""
    finished_at: datetime | None = None
    disrupted: bool = False  # the DisruptionTarget condition: eviction, preemption, taint manager
    owner_uid: str = ""
    waiting: str = ""  # why a pod does not run yet: Unschedulable, ImagePullBackOff, a missing Secret...
    memory_limit: str = ""  # the trainer container's resources.limits.memory ("" when it has none)

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def observe_pod(pod: Mapping[str, Any]) -> PodView:
    """A pod dict (as the API server or kopf gives it) -> PodView. Labels name the stage and attempt."""
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    status = pod.get("status") or {}
    exit_code = None
    reason = status.get("reason") or ""
    message = status.get("message") or ""
    finished_at = None
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            exit_code = terminated.get("exitCode")
            reason = reason or terminated.get("reason") or ""
            message = message or terminated.get("message") or ""
            finished_at = _time(terminated.get("finishedAt"))
    pod_conditions = status.get("conditions") or []
    target = next((c for c in pod_conditions if c.get("type") in DISRUPTION_CONDITIONS and c.get("status") == "True"),
                  None)
    disrupted = target is not None
    if target is not None:  # who disrupted it says more than the exit of a SIGTERMed container
        reason, message = target.get("reason") or reason, target.get("message") or message
    waiting = ""
    for condition in pod_conditions:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            waiting = f"{condition.get('reason') or 'Unschedulable'}: {condition.get('message') or ''}".rstrip(": ")
    gates = [gate.get("name") for gate in (pod.get("spec") or {}).get("schedulingGates") or []]
    if KUEUE_ADMISSION_GATE in gates:  # the API server's message says only "non-empty scheduling gates"
        group = labels.get(KUEUE_POD_GROUP, "")
        waiting = (f"SchedulingGated: waiting for Kueue to admit the gang's Workload {group} (`kubectl describe "
                   f"workload {group}`: its QuotaReserved condition says why, e.g. insufficient unused quota)")
    for container in status.get("containerStatuses") or []:
        state = (container.get("state") or {}).get("waiting") or {}
        if state.get("reason") and state.get("reason") != "ContainerCreating":
            waiting = f"{state['reason']}: {state.get('message') or ''}".rstrip(": ")
    owners = [ref.get("uid", "") for ref in metadata.get("ownerReferences") or [] if ref.get("controller")]
    containers = (pod.get("spec") or {}).get("containers") or []
    trainer = next((c for c in containers if c.get("name") == TRAINER_CONTAINER), containers[0] if containers else {})
    memory_limit = str(((trainer.get("resources") or {}).get("limits") or {}).get("memory") or "")
    return PodView(
        name=metadata.get("name", ""),
        stage=labels.get(LABEL_STAGE, ""),
        attempt=int(labels.get(LABEL_ATTEMPT, "0")),
        node_rank=int(labels.get(LABEL_NODE_RANK, "0")),
        phase=status.get("phase") or PENDING,
        deleting=bool(metadata.get("deletionTimestamp")),
        exit_code=exit_code,
        reason=reason,
        message=message,
        finished_at=finished_at,
        disrupted=disrupted,
        owner_uid=owners[0] if owners else "",
        waiting=conditions.shorten(waiting),
        memory_limit=memory_limit,
    )


@dataclass(frozen=True)
class Failure:
    retryable: bool
    reason: str  # CamelCase, goes to the Failed/Restarting condition
    message: str
    pod: str
    exit_code: int | None = None
    # evicted, preempted, drained, its node lost: restarts the gang without using backoffLimit (bounded by
    # runPolicy.maxDisruptions instead), like a Job's podFailurePolicy on DisruptionTarget
    disruption: bool = False


def oom_advice(memory_limit: str) -> str:
    """What an OOMKilled container's message says: the limit it hit and what to change."""
    if memory_limit:
        return (f"the trainer container hit its memory limit {memory_limit}: raise spec.resources.limits.memory "
                "(host memory: data loading, ZeRO offload, checkpoint staging)")
    return ("the trainer container was killed for memory with no memory limit of its own (the node ran out): "
            "set spec.resources.requests.memory/limits.memory so the scheduler reserves enough")


def classify(pod: PodView, retryable_exit_codes: Iterable[int]) -> Failure:
    """One failed (or vanished) pod -> retryable or permanent, with a reason a user can act on."""
    if pod.disrupted or pod.reason in _DISRUPTION_REASONS:
        why = pod.reason or conditions.DISRUPTED
        return Failure(True, why, f"pod {pod.name} was disrupted ({why}): {pod.message}".rstrip(": "), pod.name,
                       disruption=True)
    if pod.deleting and not pod.finished or pod.phase == MISSING:
        return Failure(True, conditions.POD_DELETED, f"pod {pod.name} was deleted while the stage ran", pod.name)
    code = pod.exit_code
    if code is None:
        return Failure(True, conditions.POD_FAILED, f"pod {pod.name} failed without an exit code ({pod.reason})",
                       pod.name)
    detail = f"pod {pod.name} exited with code {code}"
    if pod.reason and pod.reason not in _PLAIN_EXIT_REASONS:
        detail += f" ({pod.reason})"
    if pod.message:
        detail += f": {conditions.shorten(pod.message)}"  # head and tail kept
    if pod.reason == conditions.OOM_KILLED:
        # Whatever the code: the kernel killed a process of the container for its memory limit, and which
        # one it picked (a worker, torchrun's agent) decides the code (137, or a parent's own exit).
        return Failure(True, conditions.OOM_KILLED, f"{detail}: {oom_advice(pod.memory_limit)}", pod.name, code)
    if code >= 128:
        return Failure(True, conditions.signal_reason(code - 128), detail, pod.name, code)
    reason = conditions.exit_reason(code)
    if code in set(retryable_exit_codes):
        return Failure(True, reason, detail + " (retryable by runPolicy.retryableExitCodes)", pod.name, code)
    return Failure(False, reason, detail + " (permanent: fix the cause, then re-create the job)", pod.name,
                   code)


@dataclass(frozen=True)
class GangState:
    """The gang's state as one word, plus the failure that decides it when there is one."""

    state: Literal["Pending", "Running", "Succeeded", "Failed", "Settling"]
    failure: Failure | None = None
    running: int = 0


def _is_consequence(pod: PodView) -> bool:
    # a broken collective (NCCL/gloo, exit 9) is how the other pods see one pod's failure
    return pod.exit_code == ExitCode.COMMUNICATION_ERROR and not (pod.deleting or pod.disrupted)


def _failure_order(pod: PodView) -> tuple[int, float, int]:
    # Root cause first: a vanished/deleted/disrupted pod, then the earliest exit; on a tie (same
    # second) a signal (something killed it) beats an exit code (a peer reacting to it). A broken
    # collective comes after any other failure, whenever it happened.
    vanished = pod.phase == MISSING or pod.deleting or pod.disrupted
    signal = (pod.exit_code or 0) >= 128
    when = pod.finished_at.timestamp() if pod.finished_at and not vanished else float("-inf")
    return (1 if _is_consequence(pod) else 0, when, 0 if vanished else 1 if signal else 2)


def gang_state(pods: list[PodView], nodes: int, run_policy: RunPolicy, now: datetime) -> GangState:
    """The pods of ONE attempt (missing ones given as phase MISSING) -> the gang's state."""
    failed = [p for p in pods if p.phase in (FAILED, MISSING) or (p.deleting and not p.finished)]
    running = sum(1 for p in pods if p.phase == RUNNING and not p.deleting)
    if failed:
        first = min(failed, key=_failure_order)
        failure = classify(first, run_policy.retryable_exit_codes)
        # a permanent failure, or a broken collective (the cause may be a peer's), waits for the others
        if (not failure.retryable or _is_consequence(first)) and running and first.finished_at is not None:
            if (now - first.finished_at).total_seconds() < SETTLE_SECONDS:
                return GangState("Settling", failure, running)
        return GangState("Failed", failure, running)
    succeeded = [p for p in pods if p.phase == SUCCEEDED]
    if len(succeeded) >= nodes:
        return GangState("Succeeded", None, 0)
    if running:
        return GangState("Running", None, running)
    return GangState("Pending", None, 0)


def pending_pods(pods: list[PodView]) -> list[PendingPod]:
    """The pods of one attempt that are created but not running yet, in node order, and why (the
    scheduler's or the kubelet's words: Unschedulable, ImagePullBackOff, ...; no reason = starting)."""
    waiting = [p for p in pods if p.phase == PENDING and not p.deleting]
    found = []
    for pod in sorted(waiting, key=lambda p: p.node_rank):
        reason, _, message = pod.waiting.partition(": ")
        found.append(PendingPod(name=pod.name, reason=reason, message=message))
    return found


def deadline_start(start_time: datetime | None, resumed_at: datetime | None,
                   created: datetime | None) -> datetime | None:
    """Where runPolicy.activeDeadlineSeconds counts from: the job's start (its first gang), else its last
    resume, else its creation: a job whose pods were never created (refused, operator down) still ends."""
    return start_time or resumed_at or created


def deadline_exceeded(start_time: datetime | None, now: datetime, run_policy: RunPolicy) -> bool:
    seconds = run_policy.active_deadline_seconds
    return bool(seconds and start_time and now - start_time >= timedelta(seconds=seconds))


def ttl_expires_at(completion_time: datetime | None, run_policy: RunPolicy) -> datetime | None:
    ttl = run_policy.ttl_seconds_after_finished
    if ttl is None or completion_time is None:
        return None
    return completion_time + timedelta(seconds=ttl)


# ------------------------------------------------------------------------------ API errors on create

# Which API errors creating a child object (pod, Service, ConfigMap) fail the job: the ones that say
# THIS object can never be created as built from this spec. Anything else (quota, RBAC of the operator,
# throttling, the server down, the namespace terminating) is retried with backoff while the job's
# CreateFailed condition and an Event say why.
PERMANENT_API_CODES = {400: "BadRequest", 413: "RequestEntityTooLarge", 422: "Invalid"}
# 403 is permanent when an admission plugin refuses the pod's content (PodSecurity, a LimitRange);
# it is transient when it is a ResourceQuota (frees up) or the operator's own RBAC (fixable).
# ("status unknown for quota": the quota controller has not counted the namespace yet; RBAC says
# `User "..." cannot <verb> resource "<resource>"`: create, or patch for a server-side apply)
_TRANSIENT_FORBIDDEN = re.compile(r"quota|cannot \w+ resource|is being terminated")


@dataclass(frozen=True)
class CreateFailure:
    """The API server refused a child object: what the job's condition and Event say."""

    permanent: bool
    reason: str  # CamelCase: Invalid, Forbidden, ExceededQuota, ...
    message: str
    stage: str = ""


def classify_create_error(code: int | None, api_reason: str, message: str, kind: str, name: str,
                          stage: str = "") -> CreateFailure:
    """An API error creating `kind/name` -> permanent (the job Fails) or transient (retried)."""
    what = f"creating {kind} {name} failed: HTTP {code} {api_reason}: {message}" if code else (
        f"creating {kind} {name} failed: {message}")
    if code in PERMANENT_API_CODES:
        reason = api_reason or PERMANENT_API_CODES[code]
        return CreateFailure(True, reason, f"{what} (permanent: fix the spec, then re-create the job)", stage)
    if code == 403:
        lowered = message.lower()
        if "exceeded quota" in lowered:
            return CreateFailure(False, "ExceededQuota", f"{what} (retrying until the quota has room)", stage)
        if not _TRANSIENT_FORBIDDEN.search(lowered):
            return CreateFailure(True, "Forbidden", f"{what} (permanent: an admission policy refuses the pod; "
                                 "fix the spec, then re-create the job)", stage)
    return CreateFailure(False, api_reason or "ApiError", f"{what} (retrying)", stage)


# ------------------------------------------------------------------------------ spec changes mid-run

# Always safe: they change what the operator does next, not what a running pod is.
ALWAYS_SAFE = ("runPolicy",)
# Safe while no gang runs (before the first pod, or suspended): the next gang is built from them.
# This is how Kueue injects node selectors/tolerations into a suspended job before admitting it.
SAFE_WITHOUT_PODS = ("podTemplate", "resources.requests", "resources.limits", "image",
                     *(f"stages.{stage}.{part}" for stage in ("reward", "score", "dpo")
                       for part in ("podTemplate", "resources.requests", "resources.limits")))


def changed_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves that differ between two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        paths: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            paths += changed_paths(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return paths
    return [] if old == new else [prefix or "."]


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class SpecVerdict:
    accepted: bool
    refused_paths: tuple[str, ...] = ()


def spec_change(
    applied: Mapping[str, Any] | None, desired: Mapping[str, Any], *, started: bool, pods_active: bool
) -> SpecVerdict:
    """Is the change from the applied spec (the one the running gang was built from) to the desired
    one safe now? All or nothing: a change is never half-applied.

    `started`: some stage already ran (its checkpoints assume this world size, model, data, ...).
    `pods_active`: a gang exists now (pod specs are immutable; the change would not reach it).
    """
    if applied is None or not started:
        return SpecVerdict(True)
    allowed = ALWAYS_SAFE if pods_active else ALWAYS_SAFE + SAFE_WITHOUT_PODS
    refused = tuple(p for p in changed_paths(dict(applied), dict(desired)) if not _under(p, allowed))
    return SpecVerdict(not refused, refused)
