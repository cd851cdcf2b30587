"""Pure reconcile: (what the operator observed, the current status, now) -> a Plan.

A Plan is the new status, the actions that bring the cluster towards it, the Events to send once the
status is written, and when to look again. No API calls here: the controller (controller.py) observes,
calls `reconcile`, runs the actions, writes the status once if it changed, then sends the events.

The state machine (docs/operator.md draws it):

    Pending -> Running -> (next stage ...) -> Succeeded
       |          |  \\-> Restarting -> Running          (retryable failure, restarts < backoffLimit)
       |          \\----> Failed                         (permanent exit, backoffLimit, deadline)
       \\--------------> Suspended -> Pending/Running    (runPolicy.suspend true / false)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from mmalign.api import conditions, layout
from mmalign.api.conditions import ConditionStatus, ConditionType
from mmalign.api.layout import StageName
from mmalign.api.progress import MAX_NOTICES, ProgressReport
from mmalign.api.spec import AlignmentJobSpec
from mmalign.api.stages import STAGE_ORDER
from mmalign.api.status import AlignmentJobStatus, Condition, StageProgress, StageStatus
from mmalign.operator.builders import pod_name
from mmalign.operator.policy import (
    MISSING,
    CreateFailure,
    PodView,
    deadline_exceeded,
    deadline_start,
    gang_state,
    pending_pods,
    ttl_expires_at,
)

# How soon to look again while something is about to change (pods terminating, a gang starting).
SOON = 1.0


@dataclass(frozen=True)
class Observation:
    """Everything reconcile() reads besides the current status."""

    generation: int
    spec: AlignmentJobSpec  # the effective spec (a refused change is not in it)
    pods: tuple[PodView, ...]  # this job's pods, every stage and attempt
    now: datetime
    job_name: str = ""
    progress: ProgressReport | None = None  # last progress line of the active gang's node 0
    refused_paths: tuple[str, ...] = ()  # spec changes refused (see policy.spec_change)
    created: datetime | None = None  # the job's metadata.creationTimestamp


FAILED_GANG_GRACE_SECONDS = 30  # Kubernetes' default grace period: what a failed gang's pods had before

@dataclass(frozen=True)
class Action:
    kind: Literal["create_gang", "delete_pods", "delete_service", "delete_job"]
    stage: StageName | Literal[""] = ""  # create_gang's
    attempt: int = 0
    pods: tuple[str, ...] = ()
    reason: str = ""
    grace_seconds: int | None = None  # delete_pods': None keeps each pod's terminationGracePeriodSeconds


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Plan:
    status: AlignmentJobStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    def soon(self, seconds: float) -> None:
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)

    def delete(self, pods: list[PodView], reason: str, grace_seconds: int | None = None) -> None:
        names = tuple(p.name for p in pods if not p.deleting and p.phase != MISSING)
        if names:
            self.actions.append(Action("delete_pods", pods=names, reason=reason, grace_seconds=grace_seconds))


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def set_condition(
    status: AlignmentJobStatus, type_: ConditionType, value: ConditionStatus, reason: str, message: str,
    now: datetime,
) -> bool:
    """Set a condition; lastTransitionTime changes only when its status flips. True when it flipped."""
    for condition in status.conditions:
        if condition.type == type_:
            flipped = bool(condition.status != value)
            condition.status, condition.reason, condition.message = value, reason, message
            if flipped:
                condition.last_transition_time = rfc3339(now)
            return flipped
    status.conditions.append(
        Condition(type=type_, status=value, reason=reason, message=message, last_transition_time=rfc3339(now))
    )
    return True


def clear_condition(
    status: AlignmentJobStatus, type_: ConditionType, reason: str, message: str, now: datetime
) -> None:
    """Turn a condition False if it is there (conditions appear the first time they become True)."""
    if any(c.type == type_ and c.status == "True" for c in status.conditions):
        set_condition(status, type_, "False", reason, message, now)


def condition_true(status: AlignmentJobStatus, type_: ConditionType) -> bool:
    return any(c.type == type_ and c.status == "True" for c in status.conditions)


def _stage(status: AlignmentJobStatus, name: str) -> StageStatus:
    entry: StageStatus | None = getattr(status.stages, name)
    assert entry is not None, name
    return entry


class _Reconciler:
    def __init__(self, obs: Observation, current: AlignmentJobStatus) -> None:
        self.obs = obs
        self.spec = obs.spec
        self.now = obs.now
        self.stamp = rfc3339(obs.now)
        self.status = current.model_copy(deep=True)
        self.plan = Plan(self.status)

    # -------------------------------------------------------------------------------- helpers

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.plan.events.append(Event(type_, reason, message))

    def condition(self, type_: ConditionType, value: ConditionStatus, reason: str, message: str) -> bool:
        return set_condition(self.status, type_, value, reason, message, self.now)

    def clear(self, type_: ConditionType, reason: str, message: str) -> None:
        clear_condition(self.status, type_, reason, message, self.now)

    def pods_of(self, stage: str, attempt: int | None = None) -> list[PodView]:
        return [p for p in self.obs.pods if p.stage == stage and (attempt is None or p.attempt == attempt)]

    # -------------------------------------------------------------------------------- the pass

    def run(self) -> Plan:
        status, spec = self.status, self.spec
        status.observed_generation = self.obs.generation
        enabled = spec.stages.enabled()
        for name in STAGE_ORDER:
            entry = getattr(status.stages, name)
            if name in enabled:
                if entry is None or entry.phase == "Skipped":
                    entry = StageStatus()
                    setattr(status.stages, name, entry)
                entry.artifact = spec.artifact_uri(name)
            elif entry is None:
                setattr(status.stages, name, StageStatus(phase="Skipped", message="not in spec.stages"))
        if not any(c.type == conditions.CREATED for c in status.conditions):
            self.condition(conditions.CREATED, "True", conditions.JOB_ACCEPTED, f"stages: {', '.join(enabled)}")
            self.event("Normal", conditions.EVENT_CREATED, f"accepted: stages {', '.join(enabled)}")
        self.spec_refusal()

        if status.phase in ("Succeeded", "Failed"):
            self.finished()
            return self.plan
        active = next((s for s in enabled if _stage(status, s).phase != "Succeeded"), None)
        run_policy = spec.run_policy
        resumed = next((c.last_transition_time for c in status.conditions
                        if c.type == conditions.SUSPENDED and c.status == "False"), None)
        since = deadline_start(parse_time(status.start_time), parse_time(resumed), self.obs.created)
        if not run_policy.suspend and deadline_exceeded(since, self.now, run_policy):
            self.fail(active, conditions.DEADLINE_EXCEEDED,
                      f"the job was active longer than runPolicy.activeDeadlineSeconds="
                      f"{run_policy.active_deadline_seconds}s")
            return self.plan
        if run_policy.suspend:
            self.suspend(active)
            return self.plan
        if condition_true(status, conditions.SUSPENDED):
            self.condition(conditions.SUSPENDED, "False", conditions.RESUMED, "runPolicy.suspend is false")
            self.event("Normal", conditions.EVENT_RESUMED, f"resuming stage {active}" if active else "resumed")
            if active:
                _stage(status, active).phase = "Pending"
        while active is not None:
            if not self.stage(active):
                return self.plan
            active = next((s for s in enabled if _stage(status, s).phase != "Succeeded"), None)
        self.succeed(enabled)
        return self.plan

    def spec_refusal(self) -> None:
        paths = self.obs.refused_paths
        if paths:
            message = (f"spec change refused, unsafe while the job runs: {', '.join(paths)}. The job "
                       "continues with its previous spec; revert the change, or delete and re-create the job.")
            if self.condition(conditions.SPEC_CHANGE_REFUSED, "True", conditions.UNSAFE_SPEC_CHANGE, message):
                self.event("Warning", conditions.EVENT_SPEC_CHANGE_REFUSED, message)
        else:
            self.clear(conditions.SPEC_CHANGE_REFUSED, conditions.SPEC_MATCHES,
                       "the spec in use matches the job's spec")

    # -------------------------------------------------------------------------------- one stage

    def stage(self, name: StageName) -> bool:
        """Drive the active stage. True when it Succeeded and the next stage should start now."""
        status, spec, plan = self.status, self.spec, self.plan
        entry = _stage(status, name)
        status.stage = name
        current = self.pods_of(name, entry.attempt)
        stale = [p for p in self.pods_of(name) if p.attempt != entry.attempt]
        plan.delete(stale, f"stage {name}: pods of an earlier attempt")

        if not entry.pods_created:
            if stale:
                # Never two gangs of one stage at once: the old one must be gone first.
                entry.message = f"waiting for {len(stale)} pods of an earlier attempt to terminate"
                plan.soon(SOON)
                return False
            plan.actions.append(Action("create_gang", stage=name, attempt=entry.attempt))
            nodes = spec.stage_resources(name).nodes
            if entry.start_time is None:
                entry.start_time = self.stamp
                status.progress = ""
                self.event("Normal", conditions.EVENT_STAGE_STARTED,
                           f"stage {name}: {nodes} pods x {spec.stage_resources(name).proc_per_node} processes")
            if entry.phase != "Restarting":
                entry.phase = "Pending"
            entry.pods_created = True
            entry.message = f"attempt {entry.attempt}: {nodes} pods created, waiting for them to start"
            status.start_time = status.start_time or self.stamp
            if status.phase not in ("Running", "Restarting"):
                status.phase = "Pending"
            status.message = f"stage {name}: {entry.message}"
            plan.soon(SOON)
            return False

        seen = {p.node_rank for p in current}
        views = current + [
            PodView(pod_name(self.obs.job_name, name, entry.attempt, node), name, entry.attempt, node, MISSING)
            for node in range(spec.stage_resources(name).nodes) if node not in seen
        ]
        gang = gang_state(views, spec.stage_resources(name).nodes, spec.run_policy, self.now)
        self.progress(name, entry)
        self.clear(conditions.CREATE_FAILED, conditions.CHILDREN_CREATED, f"stage {name}: attempt {entry.attempt} created")
        self.pending(name, entry, current if gang.state in ("Pending", "Running", "Settling") else [])
        if gang.state == "Failed":
            assert gang.failure is not None
            failure = gang.failure
            if failure.disruption:
                if entry.disruptions >= spec.run_policy.max_disruptions:
                    self.fail(name, conditions.DISRUPTION_LIMIT_EXCEEDED,
                              f"{entry.disruptions} gang restarts after disruptions (runPolicy.maxDisruptions="
                              f"{spec.run_policy.max_disruptions}); last: {failure.message}")
                else:
                    self.restart(name, entry, current, failure.reason, failure.message, disruption=True)
            elif not failure.retryable:
                self.fail(name, failure.reason, failure.message)
            elif entry.restarts >= spec.run_policy.backoff_limit:
                self.fail(name, conditions.BACKOFF_LIMIT_EXCEEDED,
                          f"{entry.restarts} gang restarts used (runPolicy.backoffLimit="
                          f"{spec.run_policy.backoff_limit}); last failure: {failure.message}")
            else:
                self.restart(name, entry, current, failure.reason, failure.message)
            return False
        if gang.state == "Succeeded":
            entry.phase = "Succeeded"
            entry.completion_time = self.stamp
            entry.message = f"attempt {entry.attempt} succeeded"
            self.event("Normal", conditions.EVENT_STAGE_SUCCEEDED,
                       f"stage {name} succeeded; output: {entry.artifact}")
            self.clear(conditions.RESTARTING, conditions.GANG_SUCCEEDED, f"stage {name} succeeded")
            return True
        if gang.state in ("Running", "Settling"):
            entry.phase = "Running"
            entry.message = f"attempt {entry.attempt}: {gang.running}/{spec.stage_resources(name).nodes} pods running"
            if status.phase != "Running":
                self.event("Normal", conditions.EVENT_RUNNING, f"stage {name}: {entry.message}")
            status.phase = "Running"
            status.message = f"stage {name}: {entry.message}"
            self.condition(conditions.RUNNING, "True", conditions.STAGE_RUNNING, f"stage {name} is running")
            self.clear(conditions.RESTARTING, conditions.GANG_RUNNING,
                       f"stage {name}: attempt {entry.attempt} is running")
            if gang.state == "Settling":
                self.plan.soon(SOON)
            return False
        entry.message = f"attempt {entry.attempt}: waiting for pods to start"
        stuck = next((p for p in views if p.waiting), None)
        if stuck is not None:  # e.g. Unschedulable, ImagePullBackOff, a missing credentials Secret
            entry.message += f"; pod {stuck.name}: {stuck.waiting}"
        if status.phase == "Pending":
            status.message = f"stage {name}: {entry.message}"
        return False

    def pending(self, name: str, entry: StageStatus, pods: list[PodView]) -> None:
        """Which pods of the gang wait, and why: the stage's pendingPods (every pod not running yet), and
        while one waits for a reason (the scheduler's Unschedulable message, ImagePullBackOff, ...) the
        PodsPending condition and, when that reason is new, a Warning Event. Pods merely starting set no
        condition: a gang that starts normally shows none."""
        entry.pending_pods = pending_pods(pods)
        stuck = [p for p in entry.pending_pods if p.reason]
        if not stuck:
            self.clear(conditions.PODS_PENDING, conditions.GANG_COMPLETE, f"stage {name}: no pod of the gang waits")
            return
        shown = "; ".join(f"pod {p.name}: {p.reason}{': ' + p.message if p.message else ''}" for p in stuck[:3])
        more = len(stuck) - 3
        message = conditions.shorten(
            f"stage {name} attempt {entry.attempt}: {len(entry.pending_pods)}/{self.spec.stage_resources(name).nodes} pods "
            f"pending; {shown}" + (f"; and {more} more" if more > 0 else ""))
        before = next((c for c in self.status.conditions if c.type == conditions.PODS_PENDING), None)
        was = (before.status, before.reason) if before else None
        self.condition(conditions.PODS_PENDING, "True", stuck[0].reason, message)
        if was != ("True", stuck[0].reason):
            self.event("Warning", conditions.EVENT_PODS_PENDING, message)

    def progress(self, name: str, entry: StageStatus) -> None:
        report = self.obs.progress
        if report is None or report.stage not in ("", name):
            return
        previous = entry.progress
        same = previous is not None and (previous.step, previous.total) == (report.step, report.total)
        entry.progress = StageProgress(
            step=report.step, total=report.total, eta_seconds=report.eta_seconds,
            updated=previous.updated if same and previous is not None else self.stamp,
        )
        entry.metrics = report.all_metrics()
        if report.checkpoint:
            entry.last_checkpoint = report.checkpoint
        for notice in report.notices:  # the trainer did not reuse an earlier output: one Event each
            if notice not in entry.notices:
                entry.notices = [*entry.notices, notice][-MAX_NOTICES:]
                self.event("Normal", conditions.EVENT_RECOMPUTING, f"stage {name}: {notice}")
        self.status.progress = report.summary()

    def restart(self, name: StageName, entry: StageStatus, gang: list[PodView], reason: str, why: str,
                disruption: bool = False) -> None:
        spec, status = self.spec, self.status
        # A gang restarts because one of its pods failed: the others' ranks cannot agree on a last
        # checkpoint with a dead peer (they may sit in a collective, deaf to SIGTERM), so they get at most
        # FAILED_GANG_GRACE_SECONDS, not the full grace period a suspend or a drain gives them to save.
        grace = min(FAILED_GANG_GRACE_SECONDS, spec.pod_template.termination_grace_period_seconds)
        self.plan.delete(gang, f"gang restart of stage {name}", grace_seconds=grace)
        if disruption:
            entry.disruptions += 1
            counted = (f"disruption {entry.disruptions}/{spec.run_policy.max_disruptions}, not counted in "
                       f"runPolicy.backoffLimit")
        else:
            entry.restarts += 1
            counted = f"restart {entry.restarts}/{spec.run_policy.backoff_limit}"
        entry.pending_pods = []
        entry.attempt += 1
        entry.pods_created = False
        entry.phase = "Restarting"
        marker, resuming = layout.resume_point(spec.storage.uri, name)  # score: its finished shards
        if marker and not entry.last_checkpoint:
            entry.last_checkpoint = marker
        entry.message = (f"{why}; restarting all {spec.stage_resources(name).nodes} pods as attempt {entry.attempt} "
                         f"({counted}), {resuming}")
        status.phase = "Restarting"
        status.message = f"stage {name}: {entry.message}"
        self.condition(conditions.RESTARTING, "True", reason, status.message)
        self.clear(conditions.RUNNING, conditions.NOW_RESTARTING, f"stage {name} is restarting")
        self.event("Warning", conditions.EVENT_GANG_RESTARTING, status.message)
        self.plan.soon(SOON)

    # -------------------------------------------------------------------------------- job-level

    def suspend(self, active: StageName | None) -> None:
        status = self.status
        live = [p for p in self.obs.pods if not p.finished]
        self.plan.delete(live, "runPolicy.suspend")
        message = "runPolicy.suspend is true: pods deleted; resuming continues from the last checkpoint"
        if active is not None:
            entry = _stage(status, active)
            if entry.pods_created:
                entry.attempt += 1  # the resumed gang is a new attempt, not a restart (no backoff)
                entry.pods_created = False
            entry.phase = "Suspended"
            entry.message = message
            status.stage = active
        status.phase = "Suspended"
        status.message = message
        status.start_time = None  # like a batch Job: activeDeadlineSeconds counts from the resume
        if self.condition(conditions.SUSPENDED, "True", conditions.JOB_SUSPENDED, message):
            self.event("Normal", conditions.EVENT_SUSPENDED, message)
        self.clear(conditions.RUNNING, conditions.NOW_SUSPENDED, "the job is suspended")
        self.clear(conditions.RESTARTING, conditions.NOW_SUSPENDED, "the job is suspended")

    def fail(self, stage: str | None, reason: str, message: str) -> None:
        status = self.status
        if stage is not None:
            entry = _stage(status, stage)
            entry.phase = "Failed"
            entry.completion_time = self.stamp
            entry.message = message
        status.phase = "Failed"
        status.completion_time = self.stamp
        status.message = f"stage {stage}: {message}" if stage else message
        self.condition(conditions.FAILED, "True", reason, status.message)
        self.clear(conditions.RUNNING, reason, "the job failed")
        self.clear(conditions.RESTARTING, reason, "the job failed")
        self.clear(conditions.PODS_PENDING, reason, "the job failed")
        if stage is not None:
            _stage(status, stage).pending_pods = []
        self.event("Warning", conditions.EVENT_FAILED, f"{reason}: {status.message}")
        self.finished(just_now=True)

    def succeed(self, enabled: list[StageName]) -> None:
        status = self.status
        status.phase = "Succeeded"
        status.completion_time = self.stamp
        status.message = f"stages {', '.join(enabled)} succeeded"
        self.condition(conditions.SUCCEEDED, "True", conditions.ALL_STAGES_SUCCEEDED, status.message)
        self.clear(conditions.RUNNING, conditions.NOW_SUCCEEDED, "the job succeeded")
        self.event("Normal", conditions.EVENT_SUCCEEDED, status.message)
        self.finished(just_now=True)

    def finished(self, just_now: bool = False) -> None:
        """Cleanup and TTL of a Succeeded/Failed job."""
        run_policy = self.spec.run_policy
        pods = self.obs.pods
        # A finished job never keeps running pods; finished pods stay for their logs unless cleaned.
        doomed = [p for p in pods if not p.finished or run_policy.clean_pods_after_finished]
        self.plan.delete(doomed, f"job {self.status.phase}")
        if run_policy.clean_pods_after_finished and (just_now or any(not p.deleting for p in pods)):
            self.plan.actions.append(Action("delete_service", reason="cleanPodsAfterFinished"))
        expires = ttl_expires_at(parse_time(self.status.completion_time), run_policy)
        if expires is not None:
            if expires <= self.now:
                self.plan.actions.append(Action("delete_job", reason="ttlSecondsAfterFinished"))
            else:
                self.plan.soon((expires - self.now).total_seconds())

    def create_failed(self, failure: CreateFailure, planned: Plan) -> Plan:
        """The API server refused a child object of the gang `planned` creates: the job says so at once
        (CreateFailed condition, a FailedCreate Event when the message changes) and Fails when the refusal
        is permanent; otherwise the next pass creates the gang again."""
        status = self.status
        self.plan.events = list(planned.events)  # e.g. Created, StageStarted: they happened
        before = next((c for c in status.conditions if c.type == conditions.CREATE_FAILED), None)
        unchanged = before is not None and (before.status, before.message) == ("True", failure.message)
        self.condition(conditions.CREATE_FAILED, "True", failure.reason, failure.message)
        if not unchanged:
            self.event("Warning", conditions.EVENT_FAILED_CREATE, failure.message)
        stage = failure.stage if failure.stage in STAGE_ORDER else None
        if failure.permanent:
            self.fail(stage, conditions.CREATE_REJECTED, failure.message)
        elif stage is not None:
            entry = _stage(status, stage)
            entry.pods_created = False  # created again on the next pass (server-side apply: idempotent)
            entry.message = failure.message
            status.stage = stage
            status.message = f"stage {stage}: {failure.message}"
        return self.plan


def create_failed(obs: Observation, planned: Plan, failure: CreateFailure) -> Plan:
    """`planned` (a reconcile() Plan whose gang the API server refused) corrected: the status says why
    (pure; see _Reconciler.create_failed)."""
    return _Reconciler(obs, planned.status).create_failed(failure, planned)


def reconcile(obs: Observation, current: AlignmentJobStatus) -> Plan:
    """The whole decision of one reconcile pass (pure). See the module docstring."""
    return _Reconciler(obs, current).run()
