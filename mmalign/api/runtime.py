"""The AlignmentJob's runtime fields: pods and their size (resources, pod templates, per-stage
placement), the DeepSpeed engine, checkpointing, gang scheduling and the run policy (restarts,
deadlines, suspend). Part of the one set of models in mmalign/api/spec.py (see its docstring)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from mmalign.api import formats, keys, podtemplate
from mmalign.api.base import Model, rules
from mmalign.api.exit_codes import ExitCode

GPU_RESOURCE = "nvidia.com/gpu"  # the GPU resource the operator requests when the user names none


# A requests/limits map: every value a quantity, devices (nvidia.com/gpu, ...) whole numbers. The same
# rules as formats.quantity_problems (Python), for the API server; `string()` reads int-or-string values.
_QUANTITY_RULES = rules(
    ("self.all(k, isQuantity(string(self[k])))", "every value must be a Kubernetes quantity (8, 500m, 16Gi)"),
    ("self.all(k, !isQuantity(string(self[k])) || !quantity(string(self[k])).isLessThan(quantity('0')))",
     "quantities must not be negative"),
    ("self.all(k, !k.contains('/') || k.startsWith('kubernetes.io/') || !isQuantity(string(self[k]))"
     " || quantity(string(self[k])).isInteger())",
     "devices (names with '/', e.g. nvidia.com/gpu) take whole numbers"),
)
LIMITS_BELOW_REQUESTS = "resources.limits must not be below resources.requests for the same resource"
_Quantity = int | Annotated[str, Field(max_length=64)]
_Quantities = Annotated[dict[str, _Quantity], Field(max_length=16, json_schema_extra=_QUANTITY_RULES)]


class Resources(Model):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("!has(self.requests) || !has(self.limits) || self.limits.all(k, !(k in self.requests)"
             " || !isQuantity(string(self.limits[k])) || !isQuantity(string(self.requests[k]))"
             " || quantity(string(self.limits[k])).compareTo(quantity(string(self.requests[k]))) >= 0)",
             LIMITS_BELOW_REQUESTS),
        )
    )

    nodes: int = Field(default=1, ge=1, le=1024, description="Pods (nodes) per stage; one torchrun each.")
    proc_per_node: int = Field(
        default=1, ge=1, le=64,
        description="Processes per pod (torchrun --nproc-per-node), one per GPU: the pod requests this many "
        "nvidia.com/gpu unless requests or limits name a GPU resource themselves.",
    )
    requests: _Quantities = Field(
        default_factory=dict,
        description="Container resource requests, e.g. {cpu: '8', memory: 900Gi}. GPUs: nvidia.com/gpu "
        "defaults to procPerNode (requests and limits); write `nvidia.com/gpu: 0` for a CPU job.",
    )
    limits: _Quantities = Field(
        default_factory=dict, description="Container resource limits. Default: none beyond requests."
    )
    shm_size: str | None = Field(
        default=None,
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$",
        description="Size limit of the in-memory /dev/shm (emptyDir, medium Memory), e.g. '16Gi'. NCCL and "
        "DataLoader workers need more than a container runtime's 64 MiB default. Default: no limit of its own "
        "(the pod's memory limit still counts it).",
    )

    @field_validator("requests", "limits")
    @classmethod
    def _quantities(cls, values: dict[str, int | str]) -> dict[str, int | str]:
        problems = formats.quantity_problems(values)
        if problems:
            raise ValueError("; ".join(problems))
        return values

    @model_validator(mode="after")
    def _limits_not_below_requests(self) -> Resources:
        for name, limit in self.limits.items():
            low, high = formats.parse_quantity(self.requests.get(name, 0)), formats.parse_quantity(limit)
            if low is not None and high is not None and high < low:
                raise ValueError(f"{LIMITS_BELOW_REQUESTS}: {name} limit {limit} < request {self.requests[name]}")
        return self

    def gpu_resource(self) -> tuple[str, int]:
        """(resource name, count per pod): the GPU resource the user named in requests or limits
        (`nvidia.com/gpu`, `amd.com/gpu`, ...; limits win, as Kubernetes requires them equal), else
        nvidia.com/gpu x procPerNode. A count of 0 is a CPU job."""
        for source in (self.limits, self.requests):
            for name, value in source.items():
                if name.endswith("/gpu"):  # a whole number: the quantity rules above checked it
                    return name, int(formats.parse_quantity(value) or 0)
        return GPU_RESOURCE, self.proc_per_node

    def gpus_per_node(self) -> int:
        return self.gpu_resource()[1]


class ResourcesOverride(Model):
    """A stage's `resources`: each field given replaces spec.resources' for that stage's pods."""

    nodes: int | None = Field(default=None, ge=1, le=1024, description="Pods (nodes) of this stage.")
    proc_per_node: int | None = Field(default=None, ge=1, le=64, description="Processes per pod of this stage.")
    requests: _Quantities | None = Field(
        default=None, description="Requests merged over spec.resources.requests by resource name."
    )
    limits: _Quantities | None = Field(
        default=None, description="Limits merged over spec.resources.limits by resource name."
    )
    shm_size: str | None = Field(
        default=None, pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$", description="This stage's /dev/shm size."
    )

    def over(self, base: Resources) -> Resources:
        """The stage's effective resources (validated: limits below requests are refused here too)."""
        given = self.model_dump(exclude_none=True)
        for key in ("requests", "limits"):
            if key in given:
                given[key] = {**getattr(base, key), **given[key]}
        return Resources.model_validate({**base.model_dump(), **given})


class DeepSpeedSpec(Model):
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="ZeRO stage (0 = plain data parallel).")
    bf16: bool = Field(default=False, description="bf16 mixed precision (GPU).")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward.")
    offload_optimizer: bool = Field(default=False, description="ZeRO-Offload the optimizer state to CPU.")
    config: dict[str, Any] | None = Field(
        default=None,
        description="Raw DeepSpeed config merged over the generated one (expert use; free-form).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class CheckpointSpec(Model):
    every_steps: int = Field(default=200, ge=1, description="Save a checkpoint every N optimizer steps.")
    keep_last: int = Field(default=3, ge=1, description="Complete checkpoints kept per stage.")
    async_upload: bool = Field(
        default=True, description="Upload in the background so training does not wait for S3."
    )


GangScheduler = Literal["none", "volcano", "coscheduling", "kueue"]


class GangScheduling(Model):
    """Who schedules a stage's gang all-or-nothing (operator/gang.py renders what each one reads)."""

    scheduler: GangScheduler = Field(
        default="none",
        description="none: the pods alone (a job labelled kueue.x-k8s.io/queue-name still gets Kueue's pod-group "
        "labels); volcano: a scheduling.volcano.sh/v1beta1 PodGroup per gang, schedulerName volcano; coscheduling: "
        "a scheduling.x-k8s.io/v1alpha1 PodGroup (scheduler-plugins), schedulerName scheduler-plugins-scheduler; "
        "kueue: Kueue's pod-group labels (queue-name, pod-group-name, pod-group-total-count). minMember is the "
        "gang's node count. podTemplate.spec.schedulerName overrides the scheduler name.",
    )
    queue: str | None = Field(
        default=None, min_length=1, max_length=253,
        description="volcano: the PodGroup's spec.queue (Volcano's default: `default`); kueue: the LocalQueue "
        "when the job has no kueue.x-k8s.io/queue-name label.",
    )
    schedule_timeout_seconds: int | None = Field(
        default=None, ge=1,
        description="coscheduling: the PodGroup's spec.scheduleTimeoutSeconds (how long the coscheduler holds "
        "a partly placed gang before it gives the nodes back).",
    )


class RunPolicy(Model):
    backoff_limit: int = Field(
        default=3, ge=0, description="Gang restarts allowed per stage before the job is Failed."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="The job fails when it has been active longer than this."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the AlignmentJob this long after it finished."
    )
    suspend: bool = Field(
        default=False, description="Suspended: pods are deleted; unsuspend resumes from the checkpoint."
    )
    retryable_exit_codes: list[Annotated[int, Field(ge=1, le=255)]] = Field(
        max_length=255,
        default_factory=lambda: [int(ExitCode.STORAGE_ERROR), int(ExitCode.RENDEZVOUS_ERROR),
                                 int(ExitCode.COMMUNICATION_ERROR), int(ExitCode.RENDEZVOUS_TIMEOUT)],
        description="Exit codes in 1-127 that restart the gang. Codes >= 128 (signals) and evictions "
        "always restart it; other codes fail the job at once. Default: [5, 6, 9, 10] (storage "
        "unreachable, rendezvous DNS, NCCL/gloo communication, rendezvous timeout).",
    )
    startup_timeout_seconds: int = Field(
        default=1800, ge=1, le=7 * 24 * 3600,
        description="How long a started pod waits for the rest of its gang (torchrun's rendezvous) before it "
        "exits RendezvousTimeout (10, retryable: the gang restarts). Generous by default: a pod of the gang "
        "may wait for an autoscaled node or for quota. Default 1800.",
    )
    max_disruptions: int = Field(
        default=10, ge=0,
        description="Gang restarts caused by disruptions (eviction, preemption, node drain or loss: pods "
        "with the DisruptionTarget condition) allowed per stage. They do not count against backoffLimit; "
        "this bound keeps a flapping node from restarting the gang forever. Default 10.",
    )
    clean_pods_after_finished: bool = Field(
        default=True,
        description="Delete finished pods and services when the job ends (logs then go with them); "
        "false keeps them until the TTL deletes the job.",
    )
    gang_scheduling: GangScheduling = Field(
        default_factory=GangScheduling,
        description="Gang scheduling of each stage's pods (a PodGroup created and deleted with the gang); "
        "a change applies from the next gang.",
    )


class Toleration(Model):
    key: str | None = Field(default=None, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect matched; empty matches all."
    )
    toleration_seconds: int | None = Field(default=None, description="For NoExecute: how long to stay.")


RESERVED_ENV_MESSAGE = ("the operator sets PET_* and " + ", ".join(n for n in keys.RESERVED_ENV if not n.startswith(
    formats.RESERVED_ENV_PREFIX)) + " itself (the torchrun rendezvous, the job's identity): remove the entry")
CREDENTIAL_ENV_MESSAGE = ("looks like a credential: anyone who can read the AlignmentJob reads its env. Put S3 "
                          "keys in the Secret named by storage.credentialsSecret")


class EnvVar(Model):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("!self.name.startsWith('" + formats.RESERVED_ENV_PREFIX + "') && !(self.name in ["
             + ", ".join(f"'{n}'" for n in keys.RESERVED_ENV) + "])", RESERVED_ENV_MESSAGE),
            (f"!self.name.matches(r'{formats.CREDENTIAL_ENV_PATTERN}')", CREDENTIAL_ENV_MESSAGE),
        )
    )

    name: str = Field(
        min_length=1, max_length=256, pattern=formats.ENV_NAME_PATTERN,
        description="Variable name: letters, digits and '_', not starting with a digit.",
    )
    value: str = Field(default="", description="Literal value (use a Secret for anything sensitive).")

    @model_validator(mode="after")
    def _not_ours_nor_a_secret(self) -> EnvVar:
        if formats.reserved_env(self.name):
            raise ValueError(f"{self.name}: {RESERVED_ENV_MESSAGE}")
        if formats.credential_env(self.name):
            raise ValueError(f"{self.name} {CREDENTIAL_ENV_MESSAGE}")
        return self


_LabelValue = Annotated[str, Field(max_length=63, pattern=formats.LABEL_VALUE_PATTERN)]
_KEY_RULES = rules((f"self.all(k, size(k) <= {formats.LABEL_KEY_MAX} && k.matches(r'{formats.LABEL_KEY_PATTERN}'))",
                     "keys must be label keys: an optional DNS prefix and '/', then at most 63 letters, digits, "
                     "'-', '_', '.', alphanumeric at both ends"))
_Labels = Annotated[dict[str, _LabelValue], Field(max_length=64, json_schema_extra=_KEY_RULES)]
_Annotations = Annotated[dict[str, str], Field(max_length=64, json_schema_extra=_KEY_RULES)]
# The name of an object the pods refer to (DNS-1123 subdomain; "" = not set)
_ObjectName = Annotated[str, Field(max_length=253, pattern=formats.OPTIONAL_DNS_SUBDOMAIN_PATTERN)]


def _pod_spec_fragment(value: dict[str, Any]) -> dict[str, Any]:
    # The API server checks the same schema (the CRD embeds it); this is for `mmalign validate`, the chart's
    # podDefaults and an older CRD. Paths are relative to the fragment: pydantic's location names it.
    problems = podtemplate.schema_problems(value, podtemplate.pod_spec_schema(), "")
    problems += podtemplate.protected_problems(value)
    if problems:
        raise ValueError("; ".join(problem.lstrip(".") for problem in problems))
    return value


# A core/v1 PodSpec fragment: crds.py puts the real Kubernetes schema (mmalign/api/podspec.schema.json) here.
_PodSpecFragment = Annotated[dict[str, Any], AfterValidator(_pod_spec_fragment),
                             Field(json_schema_extra={podtemplate.SCHEMA_MARKER: True})]


class PodMetadata(Model):
    labels: _Labels = Field(default_factory=dict, description="Pod labels (label keys and values).")
    annotations: _Annotations = Field(default_factory=dict, description="Pod annotations.")

    @field_validator("labels", "annotations")
    @classmethod
    def _label_keys(cls, values: dict[str, str]) -> dict[str, str]:
        problems = formats.label_key_problems(list(values)) + podtemplate.owned_label_problems(values)
        if problems:
            raise ValueError("; ".join(problems))
        return values


POD_SPEC_OVERLAY = (
    "A core/v1 PodSpec fragment (`kubectl explain pod.spec`), strategically merged into every trainer pod after "
    "the fields above: affinity, topologySpreadConstraints, imagePullSecrets, securityContext, volumes, "
    "initContainers, sidecar containers, and `containers: [{name: trainer, ...}]` for the trainer container "
    "itself (env with valueFrom, envFrom, volumeMounts, securityContext, extra resources). Containers, env, "
    "volumes and imagePullSecrets merge by name, volumeMounts by mountPath, a volume of the same name "
    "replaces the operator's (only `scratch` may be replaced), tolerations and envFrom are appended, other "
    "lists replaced. Refused: what the operator owns (the trainer's image, command, args, the PET_*/MASTER_* "
    "env, the job/dshm volumes and their mounts, restartPolicy, hostname, subdomain; docs/api.md)."
)


class PodOverlay(Model):
    node_selector: _Labels = Field(default_factory=dict, description="Pod nodeSelector (label keys and values).")
    tolerations: list[Toleration] = Field(default_factory=list, description="Pod tolerations.")
    priority_class_name: _ObjectName = Field(default="", description="Pod priorityClassName.")
    scheduler_name: _ObjectName = Field(default="", description="Pod schedulerName (e.g. a gang scheduler).")
    service_account_name: _ObjectName = Field(default="", description="Trainer pods' ServiceAccount.")
    labels: _Labels = Field(default_factory=dict, description="Extra pod labels (label keys and values).")
    annotations: _Annotations = Field(default_factory=dict, description="Extra pod annotations.")
    env: list[EnvVar] = Field(default_factory=list, max_length=256,
                              description="Extra literal environment for the trainer (from a Secret or "
                              "ConfigMap: spec.containers[name=trainer].env with valueFrom, or envFrom).")
    metadata: PodMetadata = Field(default_factory=PodMetadata,
                                  description="Pod labels and annotations, merged over the fields above.")
    spec: _PodSpecFragment = Field(default_factory=dict, description=POD_SPEC_OVERLAY)

    @field_validator("node_selector", "labels", "annotations")
    @classmethod
    def _label_keys(cls, values: dict[str, str]) -> dict[str, str]:
        problems = formats.label_key_problems(list(values))
        if problems:
            raise ValueError("; ".join(problems))
        return values

    def fragment(self) -> dict[str, Any]:
        """This overlay as one pod template fragment {metadata, spec}: the fields above first, then
        metadata and spec merged over them (podtemplate.strategic_merge)."""
        spec: dict[str, Any] = {}
        if self.node_selector:
            spec["nodeSelector"] = dict(self.node_selector)
        if self.tolerations:
            spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True, mode="json")
                                   for t in self.tolerations]
        for key in ("priority_class_name", "scheduler_name", "service_account_name"):
            if getattr(self, key):
                spec[to_camel(key)] = getattr(self, key)
        if self.env:
            spec["containers"] = [{"name": podtemplate.TRAINER,
                                   "env": [{"name": v.name, "value": v.value} for v in self.env]}]
        metadata = {key: dict(value) for key, value in (("labels", self.labels), ("annotations", self.annotations))
                    if value}
        shorthand = {"metadata": metadata, "spec": spec}
        given = {"metadata": self.metadata.model_dump(exclude_defaults=True), "spec": self.spec}
        merged: dict[str, Any] = podtemplate.strategic_merge(shorthand, given, podtemplate.pod_template_schema())
        return merged


class PodTemplate(PodOverlay):
    termination_grace_period_seconds: int = Field(
        default=300, ge=1, le=86400,
        description="Seconds between SIGTERM (suspend, preemption, node drain, pod deletion) and SIGKILL: "
        "every rank finishes its step, then saves and commits a checkpoint of the step reached. Needs one "
        "step plus one save (each node writes and uploads its ranks' shards, about 14 bytes per parameter "
        "over the nodes with AdamW); the trainer warns when it measured more. Default 300: a 7B model "
        "(~100 GB) from one node at ~1 GB/s. Too short: the previous checkpoint stays the one resumed.",
    )


class StagePodTemplate(PodOverlay):
    """A stage's podTemplate: the same fields as spec.podTemplate (but terminationGracePeriodSeconds, which
    is the job's), merged over it for this stage's pods."""


class StagePlacement(Model):
    """What every stage may set for its own pods (a reward stage and a DPO stage may want other nodes)."""

    pod_template: StagePodTemplate | None = Field(
        default=None,
        description="This stage's pod overlay, merged over spec.podTemplate: its fields (maps by key, env by "
        "name, tolerations appended, the others replaced when set), then its metadata and spec (strategic "
        "merge, as in spec.podTemplate.spec).",
    )
    resources: ResourcesOverride | None = Field(
        default=None,
        description="This stage's pods and their size, over spec.resources: the fields given replace "
        "spec.resources' (requests and limits merge by resource name).",
    )

