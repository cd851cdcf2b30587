"""Pure: what each gang scheduler reads (runPolicy.gangScheduling) -> the PodGroup and the pods' marks.

A stage attempt's pods are one gang: all of them run or none does (a partly placed gang holds GPUs while
torchrun's rendezvous waits for the rest). The operator tells the cluster's gang scheduler so:

| scheduler    | the gang object                                       | on each pod                                   |
| ------------ | ----------------------------------------------------- | --------------------------------------------- |
| volcano      | scheduling.volcano.sh/v1beta1 PodGroup, minMember = N | annotation scheduling.k8s.io/group-name; schedulerName volcano |
| coscheduling | scheduling.x-k8s.io/v1alpha1 PodGroup, minMember = N  | label scheduling.x-k8s.io/pod-group; schedulerName scheduler-plugins-scheduler |
| kueue        | none (Kueue builds its Workload from the pods)        | labels kueue.x-k8s.io/queue-name, pod-group-name; annotation pod-group-total-count = N |

The PodGroup is named like the gang (`<job>-<stage>-<attempt>`), applied before the pods (a scheduler
that sees a pod before its group would place it alone), owned by the AlignmentJob, and deleted with the
gang's pods (controller.py). The names come from the schedulers' own Go API packages:
volcano.sh/apis pkg/apis/scheduling/v1beta1 (KubeGroupNameAnnotationKey) and sigs.k8s.io/scheduler-plugins
apis/scheduling/v1alpha1 (PodGroupLabel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmalign.api import keys
from mmalign.api.spec import GangScheduling


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
    return PodMarks(labels=labels, annotations={keys.KUEUE_POD_GROUP_COUNT: str(nodes)})


def pod_group(gang: GangScheduling, metadata: dict[str, Any], nodes: int) -> dict[str, Any] | None:
    """The gang's PodGroup for its scheduler (None when that scheduler has no such object).
    metadata: the gang's name, namespace, labels and owner reference (builders.build_pod_group)."""
    kind = pod_group_kind(gang)
    if kind is None:
        return None
    spec: dict[str, Any] = {"minMember": nodes}
    if gang.scheduler == "volcano" and gang.queue:
        spec["queue"] = gang.queue
    if gang.scheduler == "coscheduling" and gang.schedule_timeout_seconds:
        spec["scheduleTimeoutSeconds"] = gang.schedule_timeout_seconds
    return {"apiVersion": kind.api_version, "kind": "PodGroup", "metadata": metadata, "spec": spec}
