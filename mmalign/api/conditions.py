"""Condition types and the reasons the operator sets on them, and the reasons of its Events.

Conditions follow Kubernetes' `{type, status, reason, message, lastTransitionTime}`; a reason is one
CamelCase word for machines (alerts, `kubectl wait --for=condition=...`), the message is for people.
Failure reasons come from the failure policy: an exit code's name (ExitCode.NAN_LOSS -> "NanLoss", see
`exit_reason`), a signal ("Signal9"), or a pod's own reason (OOMKilled, Evicted, ...).
"""

from __future__ import annotations

from typing import Literal, get_args

from mmalign.api.exit_codes import ExitCode

ConditionType = Literal["Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed",
                        "SpecChangeRefused", "PodsPending", "CreateFailed"]
CONDITION_TYPES: tuple[str, ...] = get_args(ConditionType)
ConditionStatus = Literal["True", "False", "Unknown"]  # Kubernetes' values

CREATED: ConditionType = "Created"
RUNNING: ConditionType = "Running"
RESTARTING: ConditionType = "Restarting"
SUSPENDED: ConditionType = "Suspended"
SUCCEEDED: ConditionType = "Succeeded"
FAILED: ConditionType = "Failed"
SPEC_CHANGE_REFUSED: ConditionType = "SpecChangeRefused"
PODS_PENDING: ConditionType = "PodsPending"  # True while a pod of the active gang waits for a reason (scheduler...)
CREATE_FAILED: ConditionType = "CreateFailed"  # True while the API server refuses a child object

# -- condition reasons the reconciler sets
JOB_ACCEPTED = "JobAccepted"  # Created=True
STAGE_RUNNING = "StageRunning"  # Running=True
GANG_RUNNING = "GangRunning"  # Restarting=False: the new gang runs
GANG_SUCCEEDED = "GangSucceeded"  # Restarting=False: the stage finished
JOB_SUSPENDED = "JobSuspended"  # Suspended=True
RESUMED = "Resumed"  # Suspended=False
UNSAFE_SPEC_CHANGE = "UnsafeSpecChange"  # SpecChangeRefused=True
SPEC_MATCHES = "SpecMatches"  # SpecChangeRefused=False
ALL_STAGES_SUCCEEDED = "AllStagesSucceeded"  # Succeeded=True
DEADLINE_EXCEEDED = "DeadlineExceeded"  # Failed=True: runPolicy.activeDeadlineSeconds
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"  # Failed=True: runPolicy.backoffLimit restarts used
POD_FAILED = "PodFailed"  # a pod failed without an exit code
POD_DELETED = "PodDeleted"  # a pod of a running gang vanished
DISRUPTED = "Disrupted"  # evicted/preempted without a reason of its own
OOM_KILLED = "OOMKilled"  # the container hit its memory limit (the kubelet's reason, kept)
INVALID_SPEC = "InvalidSpec"  # Failed=True: the spec does not validate (an older CRD, or a deepspeed.config contradiction)
DISRUPTION_LIMIT_EXCEEDED = "DisruptionLimitExceeded"  # Failed=True: runPolicy.maxDisruptions used
CREATE_REJECTED = "CreateRejected"  # Failed=True: the API server refused a child object for good (422, ...)
GANG_COMPLETE = "GangComplete"  # PodsPending=False: every pod of the gang runs (or the gang ended)
CHILDREN_CREATED = "Created"  # CreateFailed=False: the next create went through
# Running=False / Restarting=False when the job moves on: the reason names the state it moved to (a
# failure clears them with the failure's own reason).
NOW_RESTARTING = "Restarting"  # Running=False: the gang restarts
NOW_SUSPENDED = "Suspended"  # Running=False, Restarting=False: runPolicy.suspend
NOW_SUCCEEDED = "Succeeded"  # Running=False: every stage succeeded

# -- Event reasons (the job's `kubectl describe` timeline)
EVENT_CREATED = "Created"
EVENT_STAGE_STARTED = "StageStarted"
EVENT_RUNNING = "Running"
EVENT_STAGE_SUCCEEDED = "StageSucceeded"
EVENT_GANG_RESTARTING = "GangRestarting"
EVENT_SUSPENDED = "Suspended"
EVENT_RESUMED = "Resumed"
EVENT_SPEC_CHANGE_REFUSED = "SpecChangeRefused"
EVENT_SUCCEEDED = "Succeeded"
EVENT_FAILED = "Failed"
EVENT_INVALID_SPEC = "InvalidSpec"
EVENT_PODS_PENDING = "PodsPending"
EVENT_FAILED_CREATE = "FailedCreate"  # Kubernetes' own controllers' reason for the same thing
EVENT_RECOMPUTING = "Recomputing"  # a stage's earlier output was not reused: its inputs or parameters changed


def exit_reason(code: int) -> str:
    """The condition reason of a failed trainer's exit code: NAN_LOSS -> "NanLoss", unknown 77 ->
    "ExitCode77" (and 0, which is no failure reason, "ExitCode0")."""
    try:
        if code:
            return "".join(word.capitalize() for word in ExitCode(code).name.split("_"))
    except ValueError:
        pass
    return f"ExitCode{code}"


def signal_reason(signal: int) -> str:
    """The condition reason of a container killed by a signal (exit code 128 + signal): "Signal9"."""
    return f"Signal{signal}"


# A failure's text in a condition or an Event: Kubernetes caps an Event's message at 1 KiB, and the job's
# message, the condition and the Event say the same thing, so they share this budget.
MESSAGE_LIMIT = 600
CUT = " [...] "


def shorten(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text` on one line, at most `limit` characters: the head (the reason) and the tail (often what to
    do) are kept and the middle is cut, marked by CUT. Never the last characters alone: a reason that
    starts mid-sentence tells nothing."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    keep = limit - len(CUT)
    if keep < 2:
        return text[:limit]
    head = keep * 2 // 3  # the reason comes first; the tail holds the advice and the exception's end
    return text[:head] + CUT + text[len(text) - (keep - head):]
