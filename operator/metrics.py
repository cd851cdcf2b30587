"""Prometheus metrics of the operator (served by `mmalign operator --metrics-port`)."""

from __future__ import annotations

from typing import get_args

from prometheus_client import Counter, Gauge, Histogram

from mmalign.api.status import JobPhase

JOBS = Gauge("mmalign_operator_jobs", "AlignmentJobs this operator tracks, by phase.", ["phase"])
STAGE_TRANSITIONS = Counter(
    "mmalign_operator_stage_transitions_total", "Stages entering a phase.", ["stage", "phase"]
)
RESTARTS = Counter("mmalign_operator_gang_restarts_total", "Gang restarts, by stage and reason.", ["stage", "reason"])
RECONCILE_SECONDS = Histogram(
    "mmalign_operator_reconcile_duration_seconds",
    "Duration of one reconcile pass (observe, decide, act, write status).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_ERRORS = Counter("mmalign_operator_reconcile_errors_total", "Reconcile passes that raised.")
API_ERRORS = Counter(
    "mmalign_operator_api_errors_total", "Kubernetes API calls that failed.", ["verb", "resource", "code"]
)
PHASES: tuple[JobPhase, ...] = get_args(JobPhase)

# uid -> phase of each tracked job; JOBS is recomputed from it (a job counts in exactly one phase).
_phases: dict[str, str] = {}


def track_phase(uid: str, phase: str | None) -> None:
    if phase is None:
        _phases.pop(uid, None)
    else:
        _phases[uid] = phase
    for name in PHASES:
        JOBS.labels(phase=name).set(sum(1 for p in _phases.values() if p == name))
