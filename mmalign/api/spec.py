"""The AlignmentJob spec: ONE set of pydantic models for the CRD schema, the operator and the trainer.

The operator imports this module (pydantic only, no torch) to validate jobs and to generate the CRD
(`mmalign crds`); the trainer reads the job document the operator wrote (`mmalign.api.jobfile`). Field names are camelCase in YAML
(Kubernetes convention) and snake_case in Python. Every field has a description: it becomes the text of
`kubectl explain aj.spec...`.

Cross-field rules are written twice on purpose, next to each other: as a Python check (for
`mmalign validate` and the trainer) and as a CEL rule (`x-kubernetes-validations`, enforced by the API
server). tests/bad_specs.py holds bad specs that tests/unit/test_api.py (Python) and
tests/integration/test_operator_api.py (the real API server) both run.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from mmalign.api import formats, keys, layout, podtemplate
from mmalign.api.exit_codes import ExitCode
from mmalign.api.groupversion import API_VERSION_FULL, KIND
from mmalign.api.layout import StageName

STAGE_ORDER: tuple[StageName, ...] = ("reward", "score", "dpo")


def _rules(*rules: tuple[str, str]) -> dict[str, Any]:
    """CEL rules for the CRD: (rule, message) pairs -> the `x-kubernetes-validations` schema extra."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": msg} for rule, msg in rules]}


class Model(BaseModel):
    """Base: camelCase aliases, unknown fields are errors (nothing a user wrote is silently dropped)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_attribute_docstrings=False
    )


# ---------------------------------------------------------------------------------------- inputs


class ModelSource(Model):
    uri: str = Field(
        min_length=1,
        description="Where the model is: a local Hugging Face folder, an s3:// prefix holding one, or a "
        "built-in tiny random-init model (builtin://tiny-qwen2-vl, builtin://tiny-qwen2.5-vl, "
        "builtin://tiny-llava-onevision, builtin://tiny-text).",
    )
    chat_template: str | None = Field(
        default=None,
        description="Jinja chat template that formats prompts and responses, instead of the checkpoint's "
        "own (its chat_template.jinja / processor or tokenizer config). Only needed for a checkpoint "
        "without one: the stages refuse to guess a format. The exported models carry it.",
    )


PIXELS_ORDER = "data.minPixels must not exceed data.maxPixels"


class DataSource(Model):
    model_config = ConfigDict(
        json_schema_extra=_rules(
            ("!has(self.minPixels) || !has(self.maxPixels) || self.minPixels <= self.maxPixels", PIXELS_ORDER),
        )
    )

    uri: str = Field(
        min_length=1,
        description="Preference data: a JSONL file (local path or s3:// URI) in the MM-RLHF `dpo_pairs` "
        "layout or the ranked multi-response layout, or a built-in set (builtin://synthetic-colors).",
    )
    media_uri: str | None = Field(
        default=None,
        description="Folder or s3:// prefix that the rows' relative image/video paths are resolved "
        "against. Default: the folder holding the data file.",
    )
    format: Literal["auto", "dpo_pairs", "ranked"] = Field(
        default="auto", description="Row layout. `auto` detects it per file from the first row."
    )
    on_bad_line: Literal["error", "skip"] = Field(
        default="error",
        description="A malformed line stops the job with its file:line (`error`), or is skipped and "
        "counted in the stage's metrics (`skip`). Never silent.",
    )
    missing_media: Literal["error", "placeholder"] = Field(
        default="error",
        description="A row whose image/video is missing stops the job naming the row and path "
        "(`error`), or gets a grey placeholder image (`placeholder`, counted in metrics).",
    )
    video_frames: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Frames sampled uniformly from a video frame folder, given to the model as its own "
        "video input. Qwen2-VL/Qwen2.5-VL: 2 frames per temporal patch. LLaVA-OneVision: exactly this many "
        "(a folder with fewer repeats frames), each pooled 2x2: videoFrames x 196 + 1 tokens for a "
        "SigLIP-384/14 tower.",
    )
    loader_workers: int = Field(
        default=2,
        ge=0,
        le=64,
        description="DataLoader worker processes per rank that prepare the next micro-batches while the "
        "step computes: read the media (disk or S3), decode, scale and preprocess them, tokenize and pad. "
        "Forked from the rank once per pass (the processor and pairs are not copied). 0: in the rank's own "
        "process, inside the step. Give the pod cpu >= procPerNode x (1 + loaderWorkers).",
    )
    prefetch_batches: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Micro-batches each loader worker prepares ahead (DataLoader prefetch_factor): up to "
        "loaderWorkers x prefetchBatches wait in shared memory (/dev/shm, resources.shmSize).",
    )
    eval_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Fraction of queries (not pairs: a query's pairs stay together) held out for "
        "evaluation (reward-model Acc/Acc+, DPO reward accuracy).",
    )
    max_length: int = Field(
        default=2048,
        ge=16,
        description="Token budget per sequence (prompt + response [+ critique]). A longer row loses "
        "critique tokens, then prompt text from its start; the response and the image/video tokens are "
        "never cut. A row that still does not fit stops the job with its file:line.",
    )
    max_pixels: int | None = Field(
        default=None,
        ge=784,
        description="Largest image (and video frame) area in pixels: larger ones are scaled down, aspect "
        "kept, before the processor. Qwen2-VL/Qwen2.5-VL: also the image processor's max_pixels "
        "(tokens per image <= maxPixels / 784); LLaVA-OneVision: bounds the anyres tiles. Default: the "
        "checkpoint's processor setting (Qwen2-VL allows ~16k tokens per image).",
    )
    min_pixels: int | None = Field(
        default=None,
        ge=784,
        description="Qwen2-VL/Qwen2.5-VL: smallest image area in pixels (the image processor's "
        "min_pixels; smaller images are scaled up). Default: the checkpoint's processor setting.",
    )

    @model_validator(mode="after")
    def _pixels_order(self) -> DataSource:
        # The same rule as the CEL rule above, for offline validation and the trainer.
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(PIXELS_ORDER)
        return self


class StorageSpec(Model):
    uri: str = Field(
        pattern=r"^(s3|file)://.+",
        description="Prefix for everything the job writes: checkpoints, the reward model, scored data, "
        "the final policy. s3://bucket/prefix/ or file:///path/ (local runs, shared filesystems).",
    )
    endpoint: str | None = Field(
        default=None, pattern=formats.ENDPOINT_PATTERN, max_length=2048,
        description="S3-compatible endpoint URL, http(s)://host[:port] (e.g. https://s3.example.com). "
        "Default: AWS.",
    )
    region: str | None = Field(default=None, description="S3 region. Default: the SDK's default.")
    path_style: bool = Field(
        default=True,
        description="Address buckets as endpoint/bucket/key (most S3-compatible servers) instead of "
        "bucket.endpoint/key.",
    )
    credentials_secret: str | None = Field(
        default=None, pattern=formats.DNS_SUBDOMAIN_PATTERN, max_length=253,
        description="Name of a Secret in the job's namespace with keys AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY. Keys are never written in the AlignmentJob. Omit it to use the "
        "pod's cloud identity.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_keys(cls, data: Any) -> Any:
        # A clearer message than "extra field" for the mistake that leaks secrets.
        if isinstance(data, dict):
            for key in data:
                if "secret" in key.lower() and key != "credentialsSecret" or "accesskey" in key.lower():
                    raise ValueError(
                        f"inline credentials ({key}) are not allowed: put them in a Secret with keys "
                        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and name it in credentialsSecret"
                    )
        return data


# ---------------------------------------------------------------------------------------- runtime


GPU_RESOURCE = "nvidia.com/gpu"  # the GPU resource the operator requests when the user names none


# A requests/limits map: every value a quantity, devices (nvidia.com/gpu, ...) whole numbers. The same
# rules as formats.quantity_problems (Python), for the API server; `string()` reads int-or-string values.
_QUANTITY_RULES = _rules(
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
        json_schema_extra=_rules(
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
        json_schema_extra=_rules(
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
_KEY_RULES = _rules((f"self.all(k, size(k) <= {formats.LABEL_KEY_MAX} && k.matches(r'{formats.LABEL_KEY_PATTERN}'))",
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


class _PodOverlay(Model):
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


class PodTemplate(_PodOverlay):
    termination_grace_period_seconds: int = Field(
        default=300, ge=1, le=86400,
        description="Seconds between SIGTERM (suspend, preemption, node drain, pod deletion) and SIGKILL: "
        "every rank finishes its step, then saves and commits a checkpoint of the step reached. Needs one "
        "step plus one save (each node writes and uploads its ranks' shards, about 14 bytes per parameter "
        "over the nodes with AdamW); the trainer warns when it measured more. Default 300: a 7B model "
        "(~100 GB) from one node at ~1 GB/s. Too short: the previous checkpoint stays the one resumed.",
    )


class StagePodTemplate(_PodOverlay):
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


# ---------------------------------------------------------------------------------------- stages


class _Optimization(Model):
    learning_rate: float = Field(default=1.0e-6, gt=0, description="AdamW peak learning rate.")
    epochs: int = Field(default=1, ge=1, description="Passes over the training pairs.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    micro_batch_size: int = Field(default=1, ge=1, description="Pairs per process per forward pass.")
    gradient_accumulation: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Linear warm-up share of the steps.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")


LORA_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FREEZE_VISION_TOWER = (
    "Keep the vision encoder's weights fixed (no gradients, no optimizer state; under LoRA no adapters in "
    "it), as MM-RLHF trains (its scripts tune only the projector and the language model). The projector "
    "(LLaVA-OneVision's multi_modal_projector, Qwen2-VL's visual.merger) stays trainable unless LoRA is on. "
    "No effect on a text-only model."
)


class Lora(Model):
    r: int = Field(
        default=16, ge=1, le=4096, description="LoRA rank r of each adapter (A: r x in, B: out x r)."
    )
    alpha: float = Field(
        default=32.0, gt=0, description="LoRA alpha: an adapter's update is scaled by alpha / r."
    )
    dropout: float = Field(
        default=0.05, ge=0, lt=1, description="Dropout on an adapter's input while training."
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_DEFAULT_TARGETS),
        min_length=1,
        description="Linear layers that get adapters, by the last part of their module name (q_proj, ...), "
        "matched in the language model and the projector (and in the vision tower when freezeVisionTower "
        "is false). Everything else is frozen, so with adapters disabled the model is the base model. "
        "Default: the attention and MLP projections of Qwen2/LLaMA-style decoders.",
    )


class DpoLora(Lora):
    export: Literal["merged", "adapter"] = Field(
        default="merged",
        description="The stage's output: the base model with the adapters merged in (`merged`: a plain "
        "Hugging Face folder), or only the adapters (`adapter`: a PEFT folder, adapter_config.json + "
        "adapter_model.safetensors, to load over the base model).",
    )


class RewardStage(_Optimization, StagePlacement):
    critique: bool = Field(
        default=True,
        description="Critique-based reward model (MM-RLHF): learn to write a critique, then score "
        "(prompt, response, critique). false = plain scalar Bradley-Terry reward model.",
    )
    critique_weight: float = Field(default=1.0, ge=0, description="Weight of the critique LM loss.")
    score_weight: float = Field(default=1.0, ge=0, description="Weight of the Bradley-Terry score loss.")
    margin: float = Field(default=0.0, ge=0, description="BT margin m: -log σ(r_w - r_l - m).")
    centering_weight: float = Field(
        default=0.0, ge=0, description="Centring term c·(r_w + r_l)² that keeps rewards near zero."
    )
    eval_every_steps: int | None = Field(
        default=None, ge=1, description="Evaluate Acc/Acc+ on the held-out split every N steps."
    )
    eval_data: str | None = Field(
        default=None,
        min_length=1,
        description="A separate evaluation set, scored after training: a JSONL file (local path or s3:// "
        "URI) in a layout data.uri takes, e.g. MM-RLHF-RewardBench's (a pair's category: its `category` "
        "field, else the first folder of its media path: mcq, long, short, safety, video). Media resolve "
        "against the file's folder; data.missingMedia, onBadLine, videoFrames, maxLength and the pixel "
        "bounds apply. Acc and Acc+ overall and per category go to the stage's metrics.json "
        "(`eval_data`), the overall ones to its status metrics (eval_data_acc, eval_data_acc_plus). "
        "Skipped under deepspeed.zeroStage 3, like the held-out evaluation.",
    )
    eval_max_pairs: int = Field(
        default=1024, ge=1, le=1_000_000,
        description="At most this many pairs of evalData are scored: whole queries in file order (Acc+ "
        "needs every pair of a query), at least one query. Each pair costs two generated critiques.",
    )
    freeze_vision_tower: bool = Field(default=True, description=FREEZE_VISION_TOWER)
    lora: Lora | None = Field(
        default=None,
        description="Train LoRA adapters (and the score head, in full) instead of the whole model; the "
        "exported reward model is merged, so the score stage loads it like any other.",
    )


class ScoreStage(StagePlacement):
    reward_model: ModelSource | None = Field(
        default=None,
        description="Reward model to score with. Default: the one this job's reward stage trains.",
    )
    max_new_tokens: int = Field(default=1024, ge=1, description="Critique length limit.")
    batch_size: int = Field(
        default=16, ge=1,
        description="Pairs (2 responses each) per generation batch per process; a shard is sorted by length "
        "into such batches.",
    )
    temperature: float = Field(default=0.0, ge=0, description="0 = greedy decoding (the default).")
    shard_pairs: int = Field(
        default=256, ge=1,
        description="Pairs per output shard: the unit a restarted stage resumes from (finished shards are "
        "kept, whatever the world size). Smaller loses less work on a failure; larger makes fewer files.",
    )


# Cross-field rule messages: one text for the CEL rule (API server) and the Python check (validator).
SCORE_NEEDS_REWARD_MODEL = "stages.score needs a reward model: add stages.reward or set stages.score.rewardModel.uri"
DRS_NEEDS_MARGINS = (
    "stages.dpo.dynamicRewardScaling needs reward margins: add stages.score or set stages.dpo.scoredData"
)
BETA_DPO_WITHOUT_DRS = "dynamicRewardScaling applies to loss mm-dpo; beta-dpo scales β per batch instead"
TOKEN_BUDGET_RULES = (
    "stages.dpo.maxTokensPerBatch replaces microBatchSize (leave it out or 1) and needs prefixSharing and "
    "packing (both default true)"
)


class DynamicRewardScaling(Model):
    w: float = Field(default=0.5, ge=0, description="DRS weight w in β(δ) = β·(1 + w·(1 − e^(−kδ))).")
    k: float = Field(default=0.5, gt=0, description="DRS rate k in β(δ) = β·(1 + w·(1 − e^(−kδ))).")


class WinRate(Model):
    enabled: bool = Field(
        default=True,
        description="Run the evaluation when a reward model is available (false: never; its cost is "
        "then zero).",
    )
    max_prompts: int = Field(
        default=16, ge=1, le=100_000,
        description="Held-out prompts (one per held-out query, in the held-out order) both models answer.",
    )
    max_new_tokens: int = Field(
        default=32, ge=1, le=8192,
        description="Length limit of each generated response, and of each critique the reward model "
        "writes of it (greedy decoding).",
    )
    reward_model: ModelSource | None = Field(
        default=None,
        description="The judge: a reward-model folder the reward stage wrote. Default: the score stage's "
        "reward model (stages.score.rewardModel, else this job's reward stage); a job with neither skips "
        "the evaluation and says so.",
    )


class DpoStage(_Optimization, StagePlacement):
    model_config = ConfigDict(
        json_schema_extra=_rules(
            ("!has(self.loss) || self.loss != 'beta-dpo' || !has(self.dynamicRewardScaling)",
             BETA_DPO_WITHOUT_DRS),
            ("!has(self.maxTokensPerBatch) || ((!has(self.microBatchSize) || self.microBatchSize == 1) && "
             "(!has(self.prefixSharing) || self.prefixSharing) && (!has(self.packing) || self.packing))",
             TOKEN_BUDGET_RULES),
        )
    )

    beta: float = Field(default=0.1, gt=0, description="β_ori, the DPO temperature.")
    loss: Literal["mm-dpo", "beta-dpo"] = Field(
        default="mm-dpo",
        description="mm-dpo: the paper's per-pair Dynamic Reward Scaling. beta-dpo: the batch-level "
        "β-DPO scheme of the public MM-RLHF code (reads no δ).",
    )
    dynamic_reward_scaling: DynamicRewardScaling | None = Field(
        default=None,
        description="Per-pair β from the reward margin δ of the score stage. Omit for a fixed β.",
    )
    sft_weight: float = Field(default=0.0, ge=0, description="γ: weight of the NLL(chosen) term.")
    reference: Literal["model", "precomputed"] = Field(
        default="precomputed",
        description="Reference log-probs from a frozen model during training (`model`), or computed "
        "once in a first pass and stored beside the data (`precomputed`: no reference model in "
        "memory while training).",
    )
    prefix_sharing: bool = Field(
        default=True,
        description="One prompt pass per pair: the chosen and the rejected response follow one copy of "
        "their shared prompt (image tokens included) in one sequence, with a block attention mask, for "
        "the policy, a reference model and the reference pre-pass. Same log-probs as separate rows, "
        "less compute; `false` runs each row whole (needed for attention kernels without arbitrary "
        "masks, e.g. flash-attention-2).",
    )
    packing: bool = Field(
        default=True,
        description="With prefixSharing: several pairs' sequences follow each other in one row, no padding "
        "between them (block-diagonal attention, positions restarting per pair; rows no wider than the "
        "micro-batch's longest pair), so short pairs do not pay for the longest one. Same log-probs.",
    )
    max_tokens_per_batch: int | None = Field(
        default=None, ge=1,
        description="A token budget per micro-batch instead of a pair count: each micro-batch takes pairs "
        "in the data order while its packed rows (rows x row width, padding included) stay within this "
        "many tokens; the reference pre-pass is grouped the same way. A pair longer than the budget gets "
        "a micro-batch of its own. Needs prefixSharing and packing; microBatchSize stays 1 (held-out "
        "evaluation keeps it).",
    )
    scored_data: str | None = Field(
        default=None,
        description="Scored pairs (with `delta`) to train on when this job has no score stage.",
    )
    eval_every_steps: int | None = Field(
        default=None, ge=1,
        description="Every N steps, the implicit-reward accuracy (h > 0) and mean margin h on the held-out "
        "pairs (eval_reward_accuracy, eval_margin): into the progress/status metrics, and the whole curve "
        "into metrics.json (`eval_curve`, with step 0 and the last step). One forward pass per held-out "
        "pair each time.",
    )
    freeze_vision_tower: bool = Field(default=True, description=FREEZE_VISION_TOWER)
    lora: DpoLora | None = Field(
        default=None,
        description="Train LoRA adapters instead of the whole policy. The reference is then the policy "
        "with its adapters disabled (`reference: model` keeps no second copy in memory).",
    )
    win_rate: WinRate = Field(
        default_factory=WinRate,
        description="After training: the policy and the reference (base) model answer held-out prompts "
        "(greedy), the reward model judges both answers; the win rate of the policy (ties count half) "
        "goes to metrics.json and the stage's status metrics (win_rate). Bounded by maxPrompts and "
        "maxNewTokens; skipped under deepspeed.zeroStage 3.",
    )


class Stages(Model):
    model_config = ConfigDict(
        json_schema_extra=_rules(
            ("has(self.reward) || has(self.score) || has(self.dpo)", "at least one stage is required"),
        )
    )

    reward: RewardStage | None = Field(default=None, description="Train the critique-based reward model.")
    score: ScoreStage | None = Field(default=None, description="Critique and score every response.")
    dpo: DpoStage | None = Field(default=None, description="MM-DPO with Dynamic Reward Scaling.")

    def enabled(self) -> list[StageName]:
        """Stage names in pipeline order."""
        return [name for name in STAGE_ORDER if getattr(self, name) is not None]


# ---------------------------------------------------------------------------------------- tracking
# Experiment trackers (trainer/tracking.py; docs/observability.md): rank 0 sends the progress lines'
# scalars to each tracker named here, from a background thread, so a slow tracker never stalls a step.


class TensorBoardTracking(Model):
    uri: str | None = Field(
        default=None, pattern=r"^(s3|file)://.+", max_length=2048,
        description="Log folder: each stage writes its event files to <uri>/<stage>/ (run `tensorboard "
        "--logdir <uri>`). s3://bucket/prefix/ (the job's storage endpoint and credentials) or file:///path/. "
        "Default: <storage.uri>/tensorboard/. Written locally, uploaded every 30 s and at the stage's end.",
    )

    def stage_uri(self, storage_uri: str, stage: str) -> str:
        """Where `stage`'s event files go: `<uri or storage/tensorboard/>/<stage>/`."""
        return layout.join_uri(self.uri or layout.join_uri(storage_uri, "tensorboard/"), f"{stage}/")


class MlflowTracking(Model):
    tracking_uri: str = Field(
        min_length=1, max_length=2048, pattern=r"^(https?|file)://.+",
        description="The MLflow tracking server (http(s)://host:5000) or a file store (file:///path). "
        "Credentials: MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD in the trainer's env "
        "(podTemplate env valueFrom a Secret).",
    )
    experiment: str | None = Field(
        default=None, min_length=1, max_length=256,
        description="Experiment name (created when missing). Default: the job's name. Each stage is one "
        "run, <job>-<stage>; a restarted gang continues its stage's run.",
    )


class WandbTracking(Model):
    project: str = Field(min_length=1, max_length=128, description="Weights & Biases project.")
    entity: str | None = Field(default=None, max_length=128, description="W&B entity (team); default: yours.")
    mode: Literal["offline", "online"] = Field(
        default="offline",
        description="offline (default): the run is written locally and uploaded to <storage.uri>/<stage>/wandb/ "
        "at the stage's end, for `wandb sync`; online: streamed to W&B (WANDB_API_KEY from a Secret). "
        "Needs the `wandb` extra in the trainer image.",
    )


class TrackingSpec(Model):
    tensorboard: TensorBoardTracking | None = Field(
        default=None, description="TensorBoard event files (torch's SummaryWriter); {} = under storage.uri."
    )
    mlflow: MlflowTracking | None = Field(default=None, description="An MLflow run per stage (the mlflow client).")
    wandb: WandbTracking | None = Field(default=None, description="A Weights & Biases run per stage.")


# ---------------------------------------------------------------------------------------- the job

_JOB_RULES = _rules(
    (
        "!has(self.stages.score) || has(self.stages.reward) || has(self.stages.score.rewardModel)",
        SCORE_NEEDS_REWARD_MODEL,
    ),
    (
        "!has(self.stages.dpo) || !has(self.stages.dpo.dynamicRewardScaling) || has(self.stages.score)"
        " || has(self.stages.dpo.scoredData)",
        DRS_NEEDS_MARGINS,
    ),
)


class AlignmentJobSpec(Model):
    """What the user writes under `spec:`."""

    model_config = ConfigDict(json_schema_extra=_JOB_RULES)

    image: str = Field(
        default="ghcr.io/mmalign/mmalign:0.1.0",
        min_length=1,
        description="Trainer image. Default: the chart's trainer image.",
    )
    model: ModelSource = Field(description="The base (policy) model the stages start from.")
    data: DataSource = Field(description="Preference data for the reward and DPO stages.")
    storage: StorageSpec = Field(description="Where checkpoints and artifacts go.")
    resources: Resources = Field(default_factory=Resources, description="Pods per stage and their size.")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed engine.")
    stages: Stages = Field(description="The stages to run, in order reward → score → dpo.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Restarts, deadlines, TTL.")
    pod_template: PodTemplate = Field(default_factory=PodTemplate, description="Pod placement and extras.")
    seed: int = Field(default=0, ge=0, description="Seed for data order and initialisation.")
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec,
        description="Experiment tracking: TensorBoard, MLflow, Weights & Biases (rank 0, in the background).",
    )

    @model_validator(mode="after")
    def _stage_inputs(self) -> AlignmentJobSpec:
        # The same rules as _JOB_RULES (CEL), for offline validation and the trainer.
        stages = self.stages
        if not stages.enabled():
            raise ValueError("stages: at least one stage is required (reward, score or dpo)")
        if stages.score and not stages.reward and not stages.score.reward_model:
            raise ValueError(SCORE_NEEDS_REWARD_MODEL)
        if (
            stages.dpo
            and stages.dpo.dynamic_reward_scaling
            and not stages.score
            and not stages.dpo.scored_data
        ):
            raise ValueError(DRS_NEEDS_MARGINS)
        if stages.dpo and stages.dpo.loss == "beta-dpo" and stages.dpo.dynamic_reward_scaling:
            raise ValueError("stages.dpo: " + BETA_DPO_WITHOUT_DRS)
        dpo = stages.dpo
        if dpo and dpo.max_tokens_per_batch and (dpo.micro_batch_size != 1 or not dpo.prefix_sharing
                                                 or not dpo.packing):
            raise ValueError(TOKEN_BUDGET_RULES)
        return self

    @model_validator(mode="after")
    def _deepspeed_config_agrees(self) -> AlignmentJobSpec:
        # Python only (`mmalign validate`, and the operator fails such a job at once with InvalidSpec):
        # CEL cannot read the free-form deepspeed.config.
        problems = self.deepspeed_contradictions()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _stage_pods(self) -> AlignmentJobSpec:
        # Python only: the stage's effective resources need spec.resources, which CEL on the stage cannot see.
        problems = []
        for stage in self.stages.enabled():
            try:
                resources = self.stage_resources(stage)
            except ValueError as error:
                problems.append(f"stages.{stage}.resources: {error}")
                continue
            problems += self._owned_resources(stage, resources)
        if problems:
            raise ValueError("; ".join(dict.fromkeys(problems)))  # spec.podTemplate's: once, not per stage
        return self

    def _owned_resources(self, stage: StageName, resources: Resources) -> list[str]:
        """A trainer-container resource in an overlay that spec.resources (or the stage's) already sets."""
        gpu = resources.gpu_resource()[0]
        problems = []
        for path, layer in self.stage_pod_templates(stage):
            index, given = podtemplate.trainer_resources(layer.spec)
            for kind in ("requests", "limits"):
                owned = set(getattr(resources, kind)) | {gpu}
                for name in sorted(set(given.get(kind) or {}) & owned):
                    problems.append(f"{path}.spec.containers[{index}].resources.{kind}.{name}: the operator sets it "
                                    f"from resources.{kind} (spec.resources, stages.{stage}.resources): set it there")
        return problems

    def deepspeed_contradictions(self) -> list[str]:
        """Values of deepspeed.config that contradict the fields the engine generates them from (the raw
        config is merged over the generated one, so it would silently win over the spec's own)."""
        raw = self.deepspeed.config or {}
        problems = []
        for section, key, value, field in (("zero_optimization", "stage", self.deepspeed.zero_stage,
                                            "deepspeed.zeroStage"),
                                           ("bf16", "enabled", self.deepspeed.bf16, "deepspeed.bf16")):
            given = raw.get(section)
            if isinstance(given, dict) and key in given and given[key] != value:
                problems.append(f"deepspeed.config.{section}.{key}: {given[key]!r} contradicts {field} = {value!r}: "
                                f"set {field} and remove it from deepspeed.config")
        for name in ("reward", "dpo"):  # the stages that train; each runs the engine with its own sizes
            stage = getattr(self.stages, name)
            if stage is None:
                continue
            for key, value, field in (
                ("train_micro_batch_size_per_gpu", stage.micro_batch_size, "microBatchSize"),
                ("gradient_accumulation_steps", stage.gradient_accumulation, "gradientAccumulation"),
                ("train_batch_size", stage.micro_batch_size * stage.gradient_accumulation * self.world_size(name),
                 "microBatchSize x gradientAccumulation x nodes x procPerNode"),
            ):
                if key in raw and raw[key] != value:
                    problems.append(f"deepspeed.config.{key}: {raw[key]!r} contradicts stages.{name}.{field} = "
                                    f"{value}: remove it from deepspeed.config (the engine derives it from the stage)")
        return problems

    # -- where each stage's artifacts live: the operator reports these, the next stage reads them.

    def artifact_uri(self, stage: StageName) -> str:
        """The stage's final output: reward model folder, scored-pairs folder, or final policy folder."""
        return layout.artifact_uri(self.storage.uri, stage)

    def checkpoint_uri(self, stage: StageName) -> str:
        """Prefix of the stage's checkpoints; `<prefix>latest` is the marker of the last complete one."""
        return layout.checkpoint_uri(self.storage.uri, stage)

    def reward_model_uri(self) -> str:
        """The reward model the score stage reads."""
        if self.stages.score and self.stages.score.reward_model:
            return self.stages.score.reward_model.uri
        return self.artifact_uri("reward")

    def dpo_data_uri(self) -> str:
        """The pairs the DPO stage trains on: scored by this job, given scored data, or the raw data."""
        if self.stages.score:
            return self.artifact_uri("score")
        if self.stages.dpo and self.stages.dpo.scored_data:
            return self.stages.dpo.scored_data
        return self.data.uri

    def world_size(self, stage: str | None = None) -> int:
        """Processes of a stage (spec.resources when no stage is named or it overrides none)."""
        resources = self.stage_resources(stage) if stage else self.resources
        return resources.nodes * resources.proc_per_node

    # -- per-stage pods: stages.<s>.resources and stages.<s>.podTemplate over the job's.

    def stage_resources(self, stage: str) -> Resources:
        override = getattr(self.stages, stage).resources if getattr(self.stages, stage, None) else None
        return override.over(self.resources) if override else self.resources

    def stage_pod_templates(self, stage: str) -> list[tuple[str, _PodOverlay]]:
        """(field path, overlay) layers of a stage's pods, applied in order: the job's, then the stage's."""
        layers: list[tuple[str, _PodOverlay]] = [("podTemplate", self.pod_template)]
        own = getattr(self.stages, stage).pod_template if getattr(self.stages, stage, None) else None
        return layers + ([(f"stages.{stage}.podTemplate", own)] if own else [])

    def stage_pod_fragment(self, stage: str) -> dict[str, Any]:
        """The stage's pod template fragment {metadata, spec}: every layer merged in order."""
        merged: dict[str, Any] = {"metadata": {}, "spec": {}}
        for _, layer in self.stage_pod_templates(stage):
            merged = podtemplate.strategic_merge(merged, layer.fragment(), podtemplate.pod_template_schema())
        return merged


class AlignmentJobManifest(Model):
    """The whole YAML document as a user writes it (status is the operator's)."""

    model_config = ConfigDict(extra="ignore")  # `status` and server-side metadata fields

    api_version: Literal["mmalign.io/v1alpha1"] = Field(description=API_VERSION_FULL)
    kind: Literal["AlignmentJob"] = Field(description=KIND)
    metadata: dict[str, Any] = Field(description="Kubernetes object metadata; `name` is required.")
    spec: AlignmentJobSpec

    @model_validator(mode="after")
    def _named(self) -> AlignmentJobManifest:
        name = self.metadata.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("metadata.name is required")
        return self

