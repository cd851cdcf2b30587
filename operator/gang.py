"""Pure: what each gang scheduler reads (runPolicy.gangScheduling) -> the PodGroup and the pods' marks.

A stage attempt's pods are one gang: all of them run or none does (a partly placed gang holds GPUs while
torchrun's rendezvous waits for the rest). The operator tells the cluster's gang scheduler so:

| scheduler    | the gang object                                       | on each pod                                   |
| ------------ | ----------------------------------------------------- | --------------------------------------------- |
| volcano      | scheduling.volcano.sh/v1beta1 PodGroup, minMember = N | annotation scheduling.k8s.io/group-name; schedulerName volcano |
| coscheduling | scheduling.x-k8s.io/v1alpha1 PodGroup, minMember = N  | label scheduling.x-k8s.io/pod-group; schedulerName scheduler-plugins-scheduler |
| kueue        | none (Kueue builds its Workload from the pods)        | labels kueue.x-k8s.io/queue-name, pod-group-name; annotations pod-group-total-count = N, retriable-in-group "false" |

Both PodGroups carry minResources too: the sum of the gang's requests (min_resources), so the scheduler
starts none of the pods until the whole gang fits. The PodGroup is named like the gang
(`<job>-<stage>-<attempt>`), applied before the pods (a scheduler that sees a pod before its group would
place it alone), owned by the AlignmentJob, and deleted with the gang's pods (controller.py). The names come from the schedulers' own Go API packages:
volcano.sh/apis pkg/apis/scheduling/v1beta1 (KubeGroupNameAnnotationKey) and sigs.k8s.io/scheduler-plugins
apis/scheduling/v1alpha1 (PodGroupLabel).

Kueue (tests/integration/test_kueue.py runs the real one): its pod webhook gates every pod of the group
(scheduling gate kueue.x-k8s.io/admission) and its Workload, named like the group, is admitted whole when
the ClusterQueue has quota for the sum of the pods' requests; then the gates go and the pods are placed.
`retriable-in-group: "false"` because an attempt's group is never refilled: a gang restart is a new attempt,
a new group and a new Workload. Without it Kueue would keep the old Workload admitted (its quota held)
waiting for replacement pods that never come, while the new attempt's Workload waits for that quota.
An evicted (preempted) Workload's pods get Kueue's TerminationTarget condition and are deleted: a
disruption for the failure policy (operator/policy.py), not a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from mmalign.api import formats, keys
from mmalign.api.runtime import GangScheduling


@dataclass(frozen=True)
class PodGroupKind:
    group: str
    version: str
    plural: str = "podgroups"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


POD_GROUP_KINDS = {
    "volcano": PodGroupKind("scheduling.volcano.sh", "v1beta1"),
    "coscheduling": PodGroupKind("scheduling.x-k8s.io", "v1alpha1"),
}
SCHEDULER_NAMES = {"volcano": "volcano", "coscheduling": "scheduler-plugins-scheduler"}
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
# sigs.k8s.io/kueue pkg/controller/jobs/pod/constants: RetriableInGroupAnnotationKey and its one value
KUEUE_RETRIABLE_IN_GROUP = "kueue.x-k8s.io/retriable-in-group"
COSCHEDULING_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"


@dataclass(frozen=True)
class PodMarks:
    """What one pod of the gang carries for its scheduler."""

    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    scheduler_name: str | None = None  # None: the cluster's default scheduler


def pod_group_kind(gang: GangScheduling) -> PodGroupKind | None:
    return POD_GROUP_KINDS.get(gang.scheduler)


def missing_crd_hint(gang: GangScheduling) -> str:
    """What to do when the API server does not know the PodGroup kind (its answer is a bare 404)."""
    kind = pod_group_kind(gang)
    api = f"{kind.plural}.{kind.group}" if kind else "PodGroup"
    return (
        f" (no {api} CRD in the cluster: install {gang.scheduler} or change runPolicy.gangScheduling.scheduler "
        f"from {gang.scheduler})"
    )


def pod_marks(gang: GangScheduling, group: str, nodes: int, job_queue: str | None) -> PodMarks:
    """The labels, annotations and schedulerName of every pod of the gang `group` of `nodes` pods.
    job_queue: the job's own kueue.x-k8s.io/queue-name label (Kueue's pod-group labels follow it even
    with scheduler none, as before gangScheduling existed)."""
    if gang.scheduler == "volcano":
        return PodMarks(
            annotations={VOLCANO_GROUP_ANNOTATION: group}, scheduler_name=SCHEDULER_NAMES["volcano"]
        )
    if gang.scheduler == "coscheduling":
        return PodMarks(
            labels={COSCHEDULING_GROUP_LABEL: group}, scheduler_name=SCHEDULER_NAMES["coscheduling"]
        )
    queue = job_queue or (gang.queue if gang.scheduler == "kueue" else None)
    if gang.scheduler != "kueue" and not queue:
        return PodMarks()
    # Kueue's pod-group integration admits the gang as one workload (all pods or none).
    labels = {keys.KUEUE_POD_GROUP: group, **({keys.KUEUE_QUEUE: queue} if queue else {})}
    annotations = {keys.KUEUE_POD_GROUP_COUNT: str(nodes), KUEUE_RETRIABLE_IN_GROUP: "false"}
    return PodMarks(labels=labels, annotations=annotations)


def pod_requests(pod_spec: dict[str, Any]) -> dict[str, Decimal]:
    """What the scheduler reserves for one pod: its containers' requests plus its sidecars' (init
    containers with restartPolicy Always), or more when an init container needs more while it runs (its
    own requests plus the sidecars started before it). A resource with limits but no requests requests
    its limits (API defaulting does the same)."""

    def of(container: dict[str, Any]) -> dict[str, Decimal]:
        resources = container.get("resources") or {}
        given = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        parsed = {name: formats.parse_quantity(value) for name, value in given.items()}
        return {name: value for name, value in parsed.items() if value is not None}

    def add(total: dict[str, Decimal], more: dict[str, Decimal]) -> dict[str, Decimal]:
        return {name: total.get(name, Decimal(0)) + more.get(name, Decimal(0)) for name in {*total, *more}}

    sidecars: dict[str, Decimal] = {}
    peak: dict[str, Decimal] = {}  # the most an init container needs at once, the sidecars before it included
    for container in pod_spec.get("initContainers") or []:
        if container.get("restartPolicy") == "Always":
            sidecars = add(sidecars, of(container))
        else:
            running = add(sidecars, of(container))
            peak = {
                name: max(peak.get(name, Decimal(0)), running.get(name, Decimal(0)))
                for name in {*peak, *running}
            }
    total: dict[str, Decimal] = dict(sidecars)
    for container in pod_spec.get("containers") or []:
        total = add(total, of(container))
    return {name: max(total.get(name, Decimal(0)), peak.get(name, Decimal(0))) for name in {*total, *peak}}


def min_resources(pod_spec: dict[str, Any], nodes: int) -> dict[str, str]:
    """A PodGroup's spec.minResources: what `nodes` pods like this one request together (zero ones left out)."""
    return {
        name: formats.format_quantity(value * nodes)
        for name, value in sorted(pod_requests(pod_spec).items())
        if value > 0
    }


def pod_group(
    gang: GangScheduling, metadata: dict[str, Any], nodes: int, resources: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """The gang's PodGroup for its scheduler (None when that scheduler has no such object).
    metadata: the gang's name, namespace, labels and owner reference (builders.build_pod_group).
    resources: the whole gang's requests (min_resources), spec.minResources: Volcano and the coscheduler
    start no pod of the group until the cluster has room for all of that."""
    kind = pod_group_kind(gang)
    if kind is None:
        return None
    spec: dict[str, Any] = {"minMember": nodes}
    if resources:
        spec["minResources"] = dict(resources)
    if gang.scheduler == "volcano" and gang.queue:
        spec["queue"] = gang.queue
    if gang.scheduler == "coscheduling" and gang.schedule_timeout_seconds:
        spec["scheduleTimeoutSeconds"] = gang.schedule_timeout_seconds
    return {"apiVersion": kind.api_version, "kind": "PodGroup", "metadata": metadata, "spec": spec}
