"""Thin kopf handlers. The work lives in controller.py (I/O) over status.py/builders.py (pure).

- a daemon per AlignmentJob runs its control loop (the only writer of its status);
- create/resume/update handlers and every pod event only wake that loop;
- an index of the operator's pods (watched with a server-side label selector) is what the loop observes;
- the delete handler removes the children at once (garbage collection would too, more slowly).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from mmalign.api.groupversion import API_GROUP, API_VERSION, PLURAL
from mmalign.api.keys import LABEL_JOB
from mmalign.operator import metrics
from mmalign.operator.builders import config_map_name, object_name, service_name
from mmalign.operator.controller import JobController, LoopSettings
from mmalign.operator.kube import Kube
from mmalign.operator.policy import PodView, observe_pod
from mmalign.operator.status import Event

REGISTRY = kopf.OperatorRegistry()
OUR_PODS = {LABEL_JOB: kopf.PRESENT}


@dataclass
class Runtime:
    """Operator-wide state shared by all handlers (kopf's memo holds it)."""

    kube: Kube
    settings: LoopSettings
    wakeups: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)

    def wake(self, namespace: str | None, job_label: str) -> None:
        event = self.wakeups.get((namespace or "", job_label))
        if event is not None:
            event.set()


def _runtime(memo: Any) -> Runtime:
    return memo["runtime"]  # type: ignore[no-any-return]


class JobsDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base (the last handled spec, for the job's `on.update(field="spec")`), for AlignmentJobs
    only. kopf builds it on every event of every watched resource, a deep copy of the whole object
    (status and managedFields included) that only changing handlers read; pods have none (an index and
    an event handler), and copying every pod event was the largest cost on the operator's event loop in
    a 256-pod gang start (py-spy: ~40% of kopf's per-event work)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        if body.get("kind") == "Pod" and body.get("apiVersion") == "v1":
            return cast(kopf.BodyEssence, {})
        return super().build(body=body, extra_fields=extra_fields)


@kopf.on.login(registry=REGISTRY)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # In a pod: its ServiceAccount; elsewhere: the kubeconfig (`--kubeconfig` sets KUBECONFIG).
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


# The two pod handlers are `async`: kopf runs a sync handler in a thread pool, a hand-off per pod event
# (two per event here) for work of microseconds, which loaded the operator's event loop in a 256-pod gang
# start (py-spy); and wake() sets an asyncio.Event, which only the loop's own thread may do.
@kopf.index("", "v1", "pods", labels=OUR_PODS, registry=REGISTRY)
async def pods_by_job(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, PodView]:
    return {(namespace or "", labels[LABEL_JOB]): observe_pod(body)}


@kopf.on.event("", "v1", "pods", labels=OUR_PODS, registry=REGISTRY)
async def pod_changed(namespace: str | None, labels: kopf.Labels, memo: Any, **_: Any) -> None:
    _runtime(memo).wake(namespace, labels[LABEL_JOB])


@kopf.on.create(API_GROUP, API_VERSION, PLURAL, registry=REGISTRY)
@kopf.on.resume(API_GROUP, API_VERSION, PLURAL, registry=REGISTRY)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec", registry=REGISTRY)
def spec_seen(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    # The job's daemon reconciles; a new generation only needs to wake it up.
    _runtime(memo).wake(namespace, object_name(name))


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL, registry=REGISTRY)
async def job_deleted(namespace: str | None, name: str, uid: str, memo: Any, **kwargs: Any) -> None:
    namespace = namespace or ""
    pods_by_job: kopf.Index[Any, PodView] = kwargs["pods_by_job"]  # kopf passes indexes by name
    runtime = _runtime(memo)
    pods = [p.name for p in pods_by_job.get((namespace, object_name(name)), []) if p.owner_uid in ("", uid)]
    await runtime.kube.delete_pods(namespace, pods)
    await runtime.kube.delete_service(namespace, service_name(name))
    await runtime.kube.delete_config_map(namespace, config_map_name(name))
    metrics.track_phase(uid, None)


@kopf.daemon(API_GROUP, API_VERSION, PLURAL, registry=REGISTRY, cancellation_timeout=2.0)
async def job_loop(namespace: str | None, name: str, uid: str, body: kopf.Body, memo: Any,
                   stopped: kopf.DaemonStopped, logger: logging.Logger | logging.LoggerAdapter[Any],
                   **kwargs: Any) -> None:
    namespace = namespace or ""
    pods_by_job: kopf.Index[Any, PodView] = kwargs["pods_by_job"]
    runtime = _runtime(memo)
    key = (namespace, object_name(name))
    wake = runtime.wakeups.setdefault(key, asyncio.Event())
    controller = JobController(runtime.kube, runtime.settings, namespace, name, uid, logger)

    def emit(event: Event) -> None:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)

    try:
        await controller.run(body, lambda: list(pods_by_job.get(key, [])), emit, stopped, wake)
    finally:
        if runtime.wakeups.get(key) is wake:
            del runtime.wakeups[key]
