"""A stage's rank-0 log: found by the operator's labels, followed across gang restarts.

Rank 0 (node 0) is the pod whose log has the progress lines and the first failure; the operator names
it `<job>-<stage>-<attempt>-0` and labels it (mmalign.api.keys): job, stage, attempt, node-rank=0. A gang
restart deletes every pod of the attempt and creates the next attempt's pods, so following means: stream
the newest attempt's rank-0 pod until its container ends, then wait for a newer attempt, until the stage
(or, when no stage was named, the whole job) has ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mmalign.api import keys, podtemplate
from mmalign.api.status import JOB_OVER, STAGE_OVER, AlignmentJobStatus
from mmalign.operator.builders import object_name


@dataclass(frozen=True)
class LogLine:
    pod: str
    stage: str
    attempt: int
    text: str  # without its newline


def rank0_pods(core: Any, namespace: str, job: str, stage: str) -> list[Any]:
    """The stage's rank-0 pods (one per attempt still present), oldest attempt first."""
    selector = ",".join(
        [f"{keys.LABEL_JOB}={object_name(job)}", f"{keys.LABEL_STAGE}={stage}", f"{keys.LABEL_NODE_RANK}=0"]
    )
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    return sorted(pods, key=attempt_of)


def attempt_of(pod: Any) -> int:
    return int((pod.metadata.labels or {}).get(keys.LABEL_ATTEMPT, "0"))


def has_started(pod: Any) -> bool:
    """Its trainer container ran (a log exists): a Pending pod's log request is refused."""
    statuses = pod.status.container_statuses or []
    return pod.status.phase != "Pending" or any(
        s.state and (s.state.running or s.state.terminated) for s in statuses
    )


def lines_of(response: Any) -> Iterator[str]:
    """An unparsed (`_preload_content=False`) log response -> its lines, as the chunks arrive."""
    pending = b""
    try:
        for chunk in response.stream(4096, decode_content=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")
        if pending:
            yield pending.decode("utf-8", "replace")
    finally:
        response.release_conn()


def pod_lines(core: Any, namespace: str, pod: Any, follow: bool) -> Iterator[str]:
    from kubernetes.client.exceptions import ApiException

    name = pod.metadata.name
    try:
        response = core.read_namespaced_pod_log(
            name, namespace, container=podtemplate.TRAINER, follow=follow, _preload_content=False
        )
    except ApiException as error:
        if error.status in (400, 404):  # deleted meanwhile, or its container never started
            return
        raise
    yield from lines_of(response)


def read_logs(
    core: Any, status: AlignmentJobStatus, namespace: str, job: str, stage: str | None
) -> Iterator[LogLine]:
    """The newest attempt's rank-0 log of `stage` (default: the job's current stage), as it is now."""
    stage = stage or status.stage
    if not stage:
        raise LookupError(f"AlignmentJob {job} has not started a stage yet (phase {status.phase})")
    pods = [p for p in rank0_pods(core, namespace, job, stage) if has_started(p)]
    if not pods:
        raise LookupError(
            f"no started rank-0 pod of stage {stage} of AlignmentJob {job} in namespace {namespace}: the stage "
            "has not started yet, or its pods were deleted when the job finished (runPolicy.cleanPodsAfterFinished; "
            "the stage's outputs and metrics.json stay under spec.storage.uri)"
        )
    pod = pods[-1]
    for text in pod_lines(core, namespace, pod, follow=False):
        yield LogLine(pod.metadata.name, stage, attempt_of(pod), text)


def follow_logs(
    core: Any,
    get_status: Callable[[], AlignmentJobStatus],
    namespace: str,
    job: str,
    stage: str | None,
    poll_seconds: float = 0.5,
    waiting: Callable[[str], None] | None = None,
) -> Iterator[LogLine]:
    """Stream rank 0 of each attempt of `stage` in turn until the stage ends; with no stage, start at the
    job's current stage and go on with each next stage until the job ends. `waiting` hears, once each
    time, what it waits for between pods."""
    current, shown = stage, -1  # the stage followed; the newest attempt already streamed
    said = ""

    def wait_for(what: str) -> None:
        nonlocal said
        if waiting is not None and what != said:
            waiting(what)
        said = what
        time.sleep(poll_seconds)

    while True:
        status = get_status()
        current = current or status.stage or None
        if current is None:  # nothing started yet
            if status.phase in JOB_OVER:
                return
            wait_for(f"waiting for AlignmentJob {job} to start a stage")
            continue
        entry = getattr(status.stages, current, None)
        over = status.phase in JOB_OVER or (entry is not None and entry.phase in STAGE_OVER)
        newer = [p for p in rank0_pods(core, namespace, job, current) if attempt_of(p) > shown]
        if newer and has_started(newer[-1]):
            pod = newer[-1]
            shown = attempt_of(pod)
            for text in pod_lines(core, namespace, pod, follow=True):
                yield LogLine(pod.metadata.name, current, shown, text)
            continue  # its container ended: the stage ended, or the next attempt comes
        if over:  # (a pod of it that never started will not start now)
            if stage is not None or status.phase in JOB_OVER:
                return
            if status.stage and status.stage != current:
                current, shown = status.stage, -1
                continue
        after = f" after attempt {shown}" if shown >= 0 else ""
        wait_for(f"waiting for the rank-0 pod of stage {current}{after}")
