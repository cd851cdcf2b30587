"""Pure: AlignmentJob objects, their status and Events -> the text `mmalign jobs` prints.

No API calls here: every function takes the plain dicts the API server returns (camelCase) and a `now`,
so the output is tested without a cluster. Tables are kubectl's: upper-case headers, columns padded
and separated by three spaces.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from mmalign.api.stages import STAGE_ORDER
from mmalign.api.status import AlignmentJobStatus, StageStatus

NONE = "-"  # an empty cell, as in `kubectl get`


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], indent: str = "") -> str:
    """Columns left-aligned to their widest cell; the last column is not padded."""
    rows = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths[:-1], strict=True)] + [row[-1]]
        lines.append(indent + "   ".join(cells).rstrip())
    return "\n".join(lines)


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def age(since: str | datetime | None, now: datetime) -> str:
    """Short ages like kubectl's: 95s, 7m, 5h, 3d (seconds below 2 minutes, minutes below 2 hours, hours
    below 2 days)."""
    when = parse_time(since) if isinstance(since, str) or since is None else since
    if when is None:
        return NONE
    seconds = max(int((now - when).total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def number(value: float) -> str:
    return f"{value:.4g}"


def status_of(job: dict[str, Any]) -> AlignmentJobStatus:
    """The job's status as the operator's model (fields of a newer operator are ignored)."""
    return AlignmentJobStatus.model_validate(job.get("status") or {})


def stages_of(status: AlignmentJobStatus) -> list[tuple[str, StageStatus]]:
    """The job's stages in pipeline order (only the enabled ones have an entry)."""
    found = [(stage, getattr(status.stages, stage)) for stage in STAGE_ORDER]
    return [(stage, entry) for stage, entry in found if isinstance(entry, StageStatus)]


def step_total(entry: StageStatus | None) -> str:
    if entry is None or entry.progress is None or not entry.progress.total:
        return NONE
    return f"{entry.progress.step}/{entry.progress.total}"


def current_stage(status: AlignmentJobStatus) -> StageStatus | None:
    entry = getattr(status.stages, status.stage, None) if status.stage in STAGE_ORDER else None
    return entry if isinstance(entry, StageStatus) else None


# ------------------------------------------------------------------------------------------ list


def list_table(jobs: Iterable[dict[str, Any]], now: datetime, namespaces: bool = False) -> str:
    """`mmalign jobs list`: NAME PHASE STAGE STEP AGE, one row per job."""
    rows = []
    for job in jobs:
        metadata, status = job.get("metadata") or {}, status_of(job)
        row = [
            metadata.get("name", ""),
            status.phase,
            status.stage or NONE,
            step_total(current_stage(status)),
            age(metadata.get("creationTimestamp"), now),
        ]
        rows.append([metadata.get("namespace", ""), *row] if namespaces else row)
    headers = ["NAME", "PHASE", "STAGE", "STEP", "AGE"]
    return table(["NAMESPACE", *headers] if namespaces else headers, rows)


# ------------------------------------------------------------------------------------------ get


def metrics_cell(metrics: dict[str, float]) -> str:
    """`loss=0.125 reward_accuracy=0.75`: loss first, the rest by name."""
    names = sorted(metrics, key=lambda name: (name != "loss", name))
    return " ".join(f"{name}={number(metrics[name])}" for name in names) or NONE


def stages_table(status: AlignmentJobStatus, now: datetime, indent: str = "") -> str:
    """One row per stage: phase, attempt, restarts, step/total, ETA, duration and its latest metrics."""
    rows = []
    for stage, entry in stages_of(status):
        eta = entry.progress.eta_seconds if entry.progress else None
        running = entry.phase in ("Running", "Restarting")
        started = parse_time(entry.start_time)
        ended = parse_time(entry.completion_time) or (now if running else None)
        rows.append(
            [
                stage,
                entry.phase,
                str(entry.attempt),
                str(entry.restarts),
                step_total(entry),
                f"{eta}s" if eta is not None and running else NONE,
                age(started, ended) if started and ended else NONE,
                metrics_cell(entry.metrics),
            ]
        )
    return table(
        ["STAGE", "PHASE", "ATTEMPT", "RESTARTS", "STEP", "ETA", "DURATION", "METRICS"], rows, indent
    )


def get_text(job: dict[str, Any], now: datetime) -> str:
    """`mmalign jobs get NAME`: the job's row, then its stages."""
    return list_table([job], now) + "\n\n" + stages_table(status_of(job), now)


# ------------------------------------------------------------------------------------------ describe


def describe_text(job: dict[str, Any], events: Sequence[dict[str, Any]], now: datetime) -> str:
    """`mmalign jobs describe NAME`: what `kubectl describe` would show, read for this kind of job."""
    metadata, status = job.get("metadata") or {}, status_of(job)
    created = metadata.get("creationTimestamp")
    header = [
        ("Name", metadata.get("name", "")),
        ("Namespace", metadata.get("namespace", "")),
        ("Created", f"{created} ({age(created, now)} ago)" if created else NONE),
        ("Phase", status.phase),
        ("Stage", status.stage or NONE),
        ("Progress", status.progress or NONE),
        ("Message", status.message or NONE),
        (
            "Observed generation",
            f"{status.observed_generation} (spec generation {metadata.get('generation', '?')})",
        ),
    ]
    width = max(len(key) for key, _ in header) + 2
    parts = ["\n".join(f"{key + ':':<{width}}{value}" for key, value in header)]
    parts.append("Stages:\n" + stages_table(status, now, "  "))
    outputs = [
        [stage, entry.artifact or NONE, entry.last_checkpoint or NONE] for stage, entry in stages_of(status)
    ]
    parts.append("Outputs:\n" + table(["STAGE", "ARTIFACT", "LAST CHECKPOINT"], outputs, "  "))
    pending = [
        [stage, pod.name, pod.reason or "starting", pod.message or NONE]
        for stage, entry in stages_of(status)
        for pod in entry.pending_pods
    ]
    if pending:
        parts.append("Pending pods:\n" + table(["STAGE", "POD", "REASON", "MESSAGE"], pending, "  "))
    notes = [f"  {stage}: {entry.message}" for stage, entry in stages_of(status) if entry.message]
    notes += [f"  {stage}: {notice}" for stage, entry in stages_of(status) for notice in entry.notices]
    if notes:
        parts.append("Stage messages:\n" + "\n".join(notes))
    conditions = [
        [c.type, c.status, c.reason or NONE, age(c.last_transition_time, now), c.message or NONE]
        for c in status.conditions
    ]
    parts.append(
        "Conditions:\n"
        + (
            table(["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"], conditions, "  ")
            if conditions
            else "  <none>"
        )
    )
    parts.append("Events:\n" + (events_table(events, now, "  ") if events else "  <none>"))
    return "\n\n".join(parts)


def event_time(event: dict[str, Any]) -> str:
    return str(
        event.get("lastTimestamp")
        or event.get("eventTime")
        or (event.get("metadata") or {}).get("creationTimestamp")
        or ""
    )


def events_table(events: Sequence[dict[str, Any]], now: datetime, indent: str = "") -> str:
    """Oldest first, like `kubectl describe`; a repeated event shows its count."""
    rows = []
    for event in sorted(events, key=event_time):
        count = int(event.get("count") or 1)
        when = age(event_time(event) or None, now)
        rows.append(
            [
                when if count == 1 else f"{when} (x{count})",
                str(event.get("type", "")),
                str(event.get("reason", "")),
                str(event.get("message", "")).replace("\n", " "),
            ]
        )
    return table(["AGE", "TYPE", "REASON", "MESSAGE"], rows, indent)


def now_utc() -> datetime:
    return datetime.now(UTC)
