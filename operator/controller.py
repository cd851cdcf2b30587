"""One AlignmentJob's control loop: observe -> reconcile (pure) -> act -> write status once -> events.

It runs inside the job's kopf daemon (handlers.py), so exactly one loop acts on a job, and peering
pauses it when another operator replica is active. The loop is the only writer of the job's status and
keeps the last status it wrote in memory: a watch event that lags behind our own write can never make
it count a restart twice. Pods are observed through a kopf index fed by a watch (no LIST per pass); a
pod the index misses is confirmed with a GET before it is declared lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from mmalign.api import conditions, jobfile, progress
from mmalign.api.layout import StageName
from mmalign.api.spec import AlignmentJobSpec
from mmalign.api.stages import STAGE_ORDER
from mmalign.api.status import AlignmentJobStatus, JobPhase, StageStatus
from mmalign.operator import gang, metrics
from mmalign.operator.builders import (
    JOB_FILE_KEY,
    BuildOptions,
    JobRef,
    build_config_map,
    build_gang,
    build_pod_group,
    build_service,
    config_map_name,
    pod_group_name,
    pod_name,
    service_name,
    stage_labels,
    with_operator_defaults,
)
from mmalign.operator.kube import Kube, error_details, error_summary
from mmalign.operator.policy import (
    FINISHED_PHASES,
    RUNNING,
    CreateFailure,
    PodView,
    classify_create_error,
    observe_pod,
    spec_change,
)
from mmalign.operator.status import (
    Event,
    Observation,
    Plan,
    create_failed,
    parse_time,
    reconcile,
    rfc3339,
    set_condition,
)

ACTIVE_PHASES: tuple[JobPhase, ...] = ("Pending", "Running", "Restarting")


def whole_gangs(job: JobRef, names: Iterable[str], pods: Iterable[PodView]) -> tuple[list[str], list[str]]:
    """Split pods to delete into label selectors of whole gangs (one DELETE of a collection each) and
    single pod names. A gang (stage, attempt) is deleted by selector when every unfinished pod of it the
    index shows is among `names`: a gang restart of 256 pods is one request instead of 256, and a pod the index has
    not seen yet goes with its gang."""
    wanted = set(names)
    gangs: dict[tuple[str, int], list[str]] = {}
    for pod in pods:
        if not pod.deleting and not pod.finished:
            gangs.setdefault((pod.stage, pod.attempt), []).append(pod.name)
    selectors, covered = [], set()
    for (stage, attempt), members in sorted(gangs.items()):
        # Its finished pods go too: the plan keeps none of a gang it tears down (the failed pod of a
        # restarted gang is an earlier attempt's pod at the next pass, deleted as such).
        if len(members) > 1 and wanted.issuperset(members):
            selectors.append(",".join(f"{k}={v}" for k, v in stage_labels(job, stage, attempt).items()))
            covered.update(members)
    return selectors, sorted(wanted - covered)


def next_poll_interval(interval: float, served: bool, settings: LoopSettings) -> float:
    """Seconds until node 0's log is read again: the base interval after a read succeeded, else twice
    the last wait (capped at `progress_max_interval`)."""
    if served:
        return settings.progress_min_interval
    return min(max(interval, settings.progress_min_interval) * 2, settings.progress_max_interval)


@dataclass(frozen=True)
class LoopSettings:
    build: BuildOptions = field(default_factory=BuildOptions)
    active_period: float = 5.0  # reconcile + progress poll period while a stage is active (<= 10 s)
    idle_period: float = 60.0  # while suspended or finished (pod events and TTL wake it sooner)
    progress_min_interval: float = 2.0  # at most one log read per this many seconds per job
    # A node-0 pod whose log read fails is read again after twice the last wait, up to this: a pod whose
    # kubelet serves no logs (kwok nodes: 1,514 of the 200-job bench's 11,241 requests) costs a few reads,
    # not one per pass. An empty log is served (a trainer that printed nothing yet): the base interval.
    progress_max_interval: float = 60.0
    debounce: float = 0.2  # after a wake-up, let a gang's burst of pod events arrive
    # With peering: act only after this time.monotonic() instant. Replicas started together may each
    # see an empty peering object for a moment and both resume; the lower-priority one pauses (its
    # daemons are stopped) as soon as it sees the other, so a short hold at start keeps it from acting.
    not_before: float = 0.0


class JobController:
    def __init__(self, kube: Kube, settings: LoopSettings, namespace: str, name: str, uid: str,
                 logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        self.kube, self.settings = kube, settings
        self.namespace, self.name, self.uid = namespace, name, uid
        self.logger = logger
        self.status: AlignmentJobStatus | None = None
        self.written: dict[str, Any] | None = None
        self.applied_spec: dict[str, Any] | None = None  # the spec in the ConfigMap (what pods run)
        self.last_poll = 0.0
        self.last_poll_key: tuple[str, str] | None = None
        self.poll_interval = settings.progress_min_interval  # grows while node 0 serves no log
        self.report: progress.ProgressReport | None = None
        self.create_failures = 0  # consecutive refused creates: the retry backs off (1, 2, 4 ... 30 s)

    # ------------------------------------------------------------------------------ the loop

    async def run(self, body: Mapping[str, Any], pods: Callable[[], Iterable[PodView]],
                  emit: Callable[[Event], None], stopped: Any, wake: asyncio.Event) -> None:
        hold = self.settings.not_before - time.monotonic()
        if hold > 0:
            await self._sleep(hold, asyncio.Event(), stopped)
        backoff = 1.0
        while not stopped.is_set():
            wake.clear()
            try:
                plan = await self.reconcile_once(body, list(pods()), emit)
                delay = plan.requeue_after if plan and plan.requeue_after is not None else self.period()
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure: log, count, retry with backoff
                metrics.RECONCILE_ERRORS.inc()
                self.logger.warning(f"reconcile failed, retrying in {backoff:.0f}s: {error_summary(error)}")
                delay, backoff = backoff, min(backoff * 2, 30.0)
            await self._sleep(delay, wake, stopped)

    async def _sleep(self, delay: float, wake: asyncio.Event, stopped: Any) -> None:
        """Until a wake-up (then a short debounce), `delay` seconds, or the daemon is asked to stop."""
        woken = asyncio.ensure_future(wake.wait())
        stopping = asyncio.ensure_future(stopped.wait())
        try:
            done, _ = await asyncio.wait({woken, stopping}, timeout=max(delay, 0.05),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            stopping.cancel()
        if woken in done and stopping not in done:
            await asyncio.sleep(self.settings.debounce)

    def period(self) -> float:
        phase = self.status.phase if self.status else "Pending"
        return self.settings.active_period if phase in ACTIVE_PHASES else self.settings.idle_period

    # ------------------------------------------------------------------------------ one pass

    async def reconcile_once(self, body: Mapping[str, Any], pods: list[PodView],
                             emit: Callable[[Event], None]) -> Plan | None:
        started = time.monotonic()
        try:
            return await self._reconcile(body, pods, emit)
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)

    async def _reconcile(self, body: Mapping[str, Any], pods: list[PodView],
                         emit: Callable[[Event], None]) -> Plan | None:
        metadata = body.get("metadata") or {}
        if self.status is None:
            self.status = AlignmentJobStatus.model_validate(body.get("status") or {})
            self.written = self.status.to_k8s()
            config_map = await self.kube.get_config_map(self.namespace, config_map_name(self.name))
            if config_map is not None:
                applied = jobfile.spec_of((config_map.get("data") or {}).get(JOB_FILE_KEY, ""))
                self.applied_spec = jobfile.spec_document(applied) if applied is not None else None
        generation = int(metadata.get("generation") or 0)
        build = self.settings.build
        try:
            raw = with_operator_defaults(dict(body.get("spec") or {}), build.trainer_image, build.pod_defaults)
            desired = AlignmentJobSpec.model_validate(raw)
        except ValidationError as error:
            await self._invalid_spec(generation, error, emit)
            return None

        mine = [p for p in pods if p.owner_uid in ("", self.uid)]
        spec = self._effective_spec(desired, mine)
        refused = self._refused
        job = JobRef(self.name, self.namespace, self.uid, spec, dict(metadata.get("labels") or {}))
        mine = await self._confirm_missing(mine, spec)
        report = await self._poll_progress(mine)
        observation = Observation(
            generation=generation, spec=spec, pods=tuple(mine), now=datetime.now(UTC), job_name=self.name,
            progress=report, refused_paths=refused, created=parse_time(metadata.get("creationTimestamp")),
        )
        previous = self.status
        plan = reconcile(observation, previous)
        refused_create = await self._act(plan, job, mine)
        if refused_create is not None:
            # The status says so now (not after minutes of silent retries); the gang is planned again.
            self.logger.warning(refused_create.message)
            plan = create_failed(observation, plan, refused_create)
            plan.soon(min(2.0 ** self.create_failures, 30.0))
            self.create_failures += 1
        else:
            self.create_failures = 0
        new = plan.status.to_k8s()
        if new != self.written:
            await self.kube.apply_status(self.namespace, self.name, new)
            self.written = new
        self.status = plan.status
        self._count(previous, plan.status)
        for event in plan.events:  # only after the status write succeeded
            self.logger.info(f"{event.reason}: {event.message}")
            emit(event)
        return plan

    # ------------------------------------------------------------------------------ spec changes

    _refused: tuple[str, ...] = ()

    def _effective_spec(self, desired: AlignmentJobSpec, pods: list[PodView]) -> AlignmentJobSpec:
        assert self.status is not None
        stages = [getattr(self.status.stages, s) for s in STAGE_ORDER]
        started = any(isinstance(s, StageStatus) and s.start_time for s in stages)
        pods_active = any(not p.finished for p in pods)
        wanted = jobfile.spec_document(desired)
        verdict = spec_change(self.applied_spec, wanted, started=started, pods_active=pods_active)
        self._refused = verdict.refused_paths
        if verdict.accepted or self.applied_spec is None:
            return desired
        # Refused: keep running what the pods run; only the run policy (always safe) follows the spec.
        return AlignmentJobSpec.model_validate({**self.applied_spec, "runPolicy": wanted["runPolicy"]})

    async def _invalid_spec(self, generation: int, error: ValidationError,
                            emit: Callable[[Event], None]) -> None:
        # The API server validated the spec against the CRD; this happens with an older CRD, or with what
        # CEL cannot check (a deepspeed.config contradicting the spec: AlignmentJobSpec.deepspeed_contradictions).
        assert self.status is not None
        status = self.status.model_copy(deep=True)
        status.observed_generation = generation
        message = "; ".join(
            f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )[:1000]
        if status.phase not in ("Succeeded", "Failed"):
            status.phase = "Failed"
            status.message = message
            status.completion_time = rfc3339(datetime.now(UTC))
            set_condition(status, conditions.FAILED, "True", conditions.INVALID_SPEC, message, datetime.now(UTC))
            emit(Event("Warning", conditions.EVENT_INVALID_SPEC, message))
        new = status.to_k8s()
        if new != self.written:
            await self.kube.apply_status(self.namespace, self.name, new)
            self.written = new
        self.status = status

    # ------------------------------------------------------------------------------ observe

    async def _confirm_missing(self, pods: list[PodView], spec: AlignmentJobSpec) -> list[PodView]:
        """The index is fed by a watch and may lag our own creates: GET a pod before calling it lost."""
        assert self.status is not None
        stage = self.status.stage
        entry = getattr(self.status.stages, stage, None) if stage in STAGE_ORDER else None
        if not isinstance(entry, StageStatus) or not entry.pods_created or self.status.phase not in ACTIVE_PHASES:
            return pods
        have = {p.name for p in pods}
        expected = [pod_name(self.name, stage, entry.attempt, n) for n in range(spec.stage_resources(stage).nodes)]
        missing = [n for n in expected if n not in have]
        found = await asyncio.gather(*(self.kube.get_pod(self.namespace, n) for n in missing))
        return pods + [observe_pod(p) for p in found if p is not None]

    async def _poll_progress(self, pods: list[PodView]) -> progress.ProgressReport | None:
        """The last `mmalign-progress` line of the active gang's node-0 pod (rate-limited)."""
        assert self.status is not None
        stage = self.status.stage
        entry = getattr(self.status.stages, stage, None) if stage in STAGE_ORDER else None
        if not isinstance(entry, StageStatus) or self.status.phase not in ACTIVE_PHASES:
            return None
        name = pod_name(self.name, stage, entry.attempt, 0)
        node0 = next((p for p in pods if p.name == name), None)
        if node0 is None or node0.phase not in (RUNNING, *FINISHED_PHASES):
            return None
        key = (name, node0.phase)
        now = time.monotonic()
        if key != self.last_poll_key:  # another pod or phase: read it at once, at the base interval
            self.poll_interval = self.settings.progress_min_interval
        elif now - self.last_poll < self.poll_interval:
            return self.report
        self.last_poll, self.last_poll_key = now, key
        try:
            log = await self.kube.pod_log_tail(self.namespace, name, progress.TAIL_LINES, progress.LIMIT_BYTES)
        except Exception as error:  # noqa: BLE001 - progress is best effort; never block the reconcile
            self.logger.debug(f"no log from {name}: {error_summary(error)}")
            self.poll_interval = next_poll_interval(self.poll_interval, served=False, settings=self.settings)
            return self.report if self.report and self.report.stage in ("", stage) else None
        self.poll_interval = next_poll_interval(self.poll_interval, served=True, settings=self.settings)
        report = progress.last_report(log, stage)
        if report is not None:
            self.report = report
        return self.report if self.report and self.report.stage in ("", stage) else None

    # ------------------------------------------------------------------------------ act

    async def _act(self, plan: Plan, job: JobRef, pods: list[PodView]) -> CreateFailure | None:
        """Run the plan's actions; an API error creating a child is returned (the status reports it)."""
        for delete in (a for a in plan.actions if a.kind == "delete_pods"):
            selectors, single = whole_gangs(job, delete.pods, pods)
            await self.kube.gather([
                *(self.kube.delete_pod_collection(self.namespace, s, delete.grace_seconds) for s in selectors),
                self.kube.delete_pods(self.namespace, single, grace_seconds=delete.grace_seconds),
                *self._delete_pod_groups(job, delete.pods, pods)])
        for action in plan.actions:
            if action.kind == "create_gang":
                assert action.stage, action  # reconcile always names the stage of a gang
                failure = await self._create_gang(job, action.stage, action.attempt)
                if failure is not None:
                    return failure
            elif action.kind == "delete_service":
                await self.kube.delete_service(self.namespace, service_name(self.name))
            elif action.kind == "delete_job":
                self.logger.info(f"deleting the job: {action.reason}")
                await self.kube.delete_job(self.namespace, self.name)
        return None

    def _delete_pod_groups(self, job: JobRef, names: Iterable[str], pods: list[PodView]) -> list[Awaitable[None]]:
        """The PodGroups of the gangs whose pods go (a gang's PodGroup lives as long as its pods)."""
        kind = gang.pod_group_kind(job.spec.run_policy.gang_scheduling)
        wanted = set(names)
        gangs = sorted({(p.stage, p.attempt) for p in pods if p.name in wanted}) if kind else []
        return [self.kube.delete_custom(kind.group, kind.version, kind.plural, self.namespace,
                                        pod_group_name(self.name, stage, attempt))
                for stage, attempt in gangs if kind]

    async def _create_gang(self, job: JobRef, stage: StageName, attempt: int) -> CreateFailure | None:
        # Service, ConfigMap and the gang scheduler's PodGroup first (the pods mount one, resolve through
        # another, and are placed as the third says), then every pod of the gang at once.
        group = build_pod_group(job, stage, attempt, self.settings.build)
        children = [build_service(job), build_config_map(job), *([group] if group else [])]
        pods = build_gang(job, stage, attempt, self.settings.build)
        for batch in (children, pods):
            results = await asyncio.gather(*(self.kube.apply(o) for o in batch), return_exceptions=True)
            refused = next(((o, r) for o, r in zip(batch, results, strict=True) if isinstance(r, ApiException)),
                           None)
            others = [r for r in results if isinstance(r, BaseException) and not isinstance(r, ApiException)]
            if others:
                raise others[0]  # not an answer of the API server (network, a bug): the loop retries
            if refused is not None:
                body, error = refused
                code, reason, message = error_details(error)
                if body["kind"] == "PodGroup" and code == 404:  # the gang scheduler is not installed (retried)
                    message += gang.missing_crd_hint(job.spec.run_policy.gang_scheduling)
                return classify_create_error(code, reason, message, body["kind"], body["metadata"]["name"], stage)
            if batch is children:
                self.applied_spec = jobfile.spec_document(job.spec)
        self.logger.info(f"stage {stage}: created {len(pods)} pods of attempt {attempt}")
        return None

    def _count(self, old: AlignmentJobStatus, new: AlignmentJobStatus) -> None:
        metrics.track_phase(self.uid, new.phase)
        for stage in STAGE_ORDER:
            before, after = getattr(old.stages, stage), getattr(new.stages, stage)
            if after is None:
                continue
            if before is None or before.phase != after.phase:
                metrics.STAGE_TRANSITIONS.labels(stage=stage, phase=after.phase).inc()
            if before is not None and (after.restarts, after.disruptions) > (before.restarts, before.disruptions):
                reason = next((c.reason for c in new.conditions if c.type == conditions.RESTARTING), "")
                metrics.RESTARTS.labels(stage=stage, reason=reason).inc()
