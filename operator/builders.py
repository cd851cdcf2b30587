"""Pure builders: an AlignmentJob spec -> the complete Kubernetes objects one stage attempt needs.

No API calls here (JobSet's `constructJob` style): every function takes the job and returns plain dicts
ready for server-side apply, so tests compare them with golden YAML (tests/unit/golden/).

What one attempt of a stage is:
- a headless Service `<job>` (one per job, `publishNotReadyAddresses`) that gives every pod the DNS
  name `<pod>.<service>.<namespace>.svc` as soon as it exists, before it is ready: torchrun's
  rendezvous resolves node 0 while the gang is still starting (pytorch-operator#333);
- a ConfigMap `<job>-config` with the whole AlignmentJob document as `job.yaml` (the trainer's input);
- one Pod per node, `<job>-<stage>-<attempt>-<node>`, restartPolicy Never: a failure never restarts
  one pod alone (that leaves NCCL peers hanging); the operator restarts the whole gang instead.
"""

from __future__ import annotations

import copy
import hashlib
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from mmalign.api import jobfile, keys, podtemplate
from mmalign.api.groupversion import API_VERSION_FULL, KIND
from mmalign.api.layout import StageName
from mmalign.api.runtime import Resources
from mmalign.api.spec import AlignmentJobSpec
from mmalign.operator import gang

FIELD_MANAGER = "mmalign-operator"
MAX_NAME = 63  # DNS-1123 label: pod hostnames, Service names and label values are all limited to 63
# The names of the operator's own parts of the pod live in mmalign.api.podtemplate: the spec's validation
# refuses an overlay that changes them.
MASTER_PORT = podtemplate.MASTER_PORT
JOB_FILE_DIR = podtemplate.JOB_FILE_DIR
JOB_FILE_KEY = "job.yaml"
JOB_FILE = f"{JOB_FILE_DIR}/{JOB_FILE_KEY}"
SCRATCH_DIR = podtemplate.SCRATCH_DIR  # emptyDir: downloads and checkpoint shards of this pod
CONTAINER = podtemplate.TRAINER
# With a read-only root filesystem: /tmp is the images' HOME and work dir (torchrun's files, the Hugging
# Face, Triton and DeepSpeed caches), so it gets an emptyDir; an overlay's volume `tmp` replaces it.
TMP_DIR, VOLUME_TMP = "/tmp", "tmp"

_INVALID = re.compile(r"[^a-z0-9-]+")


def object_name(*parts: object, limit: int = MAX_NAME) -> str:
    """`job-a-b` as a valid DNS-1123 label of at most `limit` characters.

    When too long, the FIRST part (the job's name) is cut and an 8-hex-digit hash of the whole name is
    added, so the stage/attempt/node suffix stays readable, two long names sharing a prefix never
    collide, and the same input always gives the same name.
    """
    words = [_INVALID.sub("-", str(part).lower()).strip("-") for part in parts]
    full = "-".join(w for w in words if w)
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    tail = "-".join(w for w in words[1:] if w)
    keep = max(limit - len(digest) - len(tail) - 2, 1)
    head = words[0][:keep].rstrip("-") or "x"
    return "-".join(w for w in (head, digest, tail) if w)[:limit].rstrip("-")


def service_name(job: str) -> str:
    # Service names are DNS-1035 labels: they must start with a letter (job names may not).
    name = object_name(job)
    return name if name[:1].isalpha() else object_name("j", job)


def config_map_name(job: str) -> str:
    return object_name(job, "config")


def pod_name(job: str, stage: str, attempt: int, node: int) -> str:
    return object_name(job, stage, attempt, node)


def pod_group_name(job: str, stage: str, attempt: int) -> str:
    """The gang's name: its PodGroup's, and Kueue's pod-group-name."""
    return object_name(job, stage, attempt)


@dataclass(frozen=True)
class JobRef:
    """The AlignmentJob being built for: what the children's names, labels and owner reference need."""

    name: str
    namespace: str
    uid: str
    spec: AlignmentJobSpec
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The `mmalign.io/job` label value (label values are limited to 63 characters too)."""
        return object_name(self.name)


@dataclass(frozen=True)
class BuildOptions:
    """Operator-wide settings the builders read (from `mmalign operator` flags)."""

    # Replaces `mmalign launch` (tests use a stub trainer); `--job FILE --stage STAGE` follow it.
    trainer_command: tuple[str, ...] = ("mmalign", "launch")
    trainer_image: str | None = None  # for jobs without spec.image
    pod_defaults: dict[str, Any] | None = None  # spec.podTemplate defaults (the job's values win)
    # The chart's trainer.podSecurityContext / trainer.securityContext: part of the operator's own pod,
    # so podTemplate (the defaults', then the job's) overrides them key by key.
    pod_security_context: dict[str, Any] | None = None
    security_context: dict[str, Any] | None = None

    @classmethod
    def from_command_line(cls, command: str | None, **kwargs: Any) -> BuildOptions:
        return cls(tuple(shlex.split(command)), **kwargs) if command else cls(**kwargs)


def with_operator_defaults(
    spec: dict[str, Any], trainer_image: str | None, pod_defaults: dict[str, Any] | None
) -> dict[str, Any]:
    """A job's raw spec with the operator's defaults filled in (the chart's `trainer.image` and
    `trainer.podDefaults`, given as MMALIGN_TRAINER_IMAGE / MMALIGN_POD_DEFAULTS). The job's own
    values win: maps merge key by key, env merges by name, tolerations add up, scalars are kept;
    metadata and spec (the pod template fragment) merge strategically (podtemplate.strategic_merge).
    """
    merged = dict(spec)
    if trainer_image and not merged.get("image"):
        merged["image"] = trainer_image
    if not pod_defaults:
        return merged
    own = dict(merged.get("podTemplate") or {})
    template: dict[str, Any] = {}
    for key in set(pod_defaults) | set(own):
        default, value = pod_defaults.get(key), own.get(key)
        if key in ("metadata", "spec") and isinstance(default, dict) and isinstance(value, dict):
            template[key] = podtemplate.strategic_merge(
                default, value, podtemplate.pod_template_schema()["properties"][key])
        elif isinstance(default, dict) and isinstance(value, dict):
            template[key] = {**default, **value}
        elif key == "env" and default and value:
            names = {item.get("name") for item in value}
            template[key] = [item for item in default if item.get("name") not in names] + list(value)
        elif key == "tolerations" and default and value:
            template[key] = list(value) + [item for item in default if item not in value]
        else:
            template[key] = value if value not in (None, "", [], {}) else default
    merged["podTemplate"] = template
    return merged


def owner_reference(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION_FULL,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: JobRef, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER, keys.LABEL_JOB: job.label, **(labels or {})},
        "ownerReferences": [owner_reference(job)],
    }


def build_service(job: JobRef) -> dict[str, Any]:
    """Headless Service: stable per-pod DNS for the rendezvous, published before pods are ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, service_name(job.name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {keys.LABEL_JOB: job.label},
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"}],
        },
    }


def build_config_map(job: JobRef) -> dict[str, Any]:
    """The job document the trainer reads (mmalign.api.jobfile): the fully defaulted spec the operator
    validated, and the operator's version."""
    document = jobfile.job_document(job.name, job.namespace, job.spec)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job.name)),
        "data": {JOB_FILE_KEY: jobfile.dump(document)},
    }


def master_address(job: JobRef, stage: str, attempt: int) -> str:
    """Node 0's DNS name through the headless Service (hostname = pod name, subdomain = Service)."""
    return f"{pod_name(job.name, stage, attempt, 0)}.{service_name(job.name)}.{job.namespace}.svc"


def _env(job: JobRef, stage: StageName, attempt: int, node: int) -> list[dict[str, str]]:
    spec = job.spec
    master = master_address(job, stage, attempt)
    ours: dict[str, str] = {
        keys.ENV_NNODES: str(spec.stage_resources(stage).nodes),
        keys.ENV_NPROC_PER_NODE: str(spec.stage_resources(stage).proc_per_node),
        keys.ENV_NODE_RANK: str(node),
        keys.ENV_MASTER_ADDR: master,
        keys.ENV_MASTER_PORT: str(MASTER_PORT),
        keys.ENV_TORCH_MASTER_ADDR: master,
        keys.ENV_TORCH_MASTER_PORT: str(MASTER_PORT),
        keys.ENV_JOB: job.name,
        keys.ENV_STAGE: stage,
        keys.ENV_ATTEMPT: str(attempt),
        # how long torchrun's rendezvous waits for the rest of the gang (then exit 10, retryable)
        keys.ENV_RENDEZVOUS_TIMEOUT: str(spec.run_policy.startup_timeout_seconds),
        "PYTHONUNBUFFERED": "1",  # progress lines reach the log (and the operator) at once
        # Downloads (model, data) and checkpoint shards go to the pod's scratch emptyDir, not to the
        # image's writable layer; a user's own env entries may point them elsewhere.
        keys.ENV_CACHE: f"{SCRATCH_DIR}/cache",
        keys.ENV_LOCAL_DIR: f"{SCRATCH_DIR}/local",
        # rank 0 serves the trainer's Prometheus metrics there (trainer/prom.py; the chart's PodMonitor)
        keys.ENV_METRICS_PORT: str(keys.TRAINER_METRICS_PORT),
    }
    if spec.storage.endpoint:
        ours["AWS_ENDPOINT_URL"] = spec.storage.endpoint
    if spec.storage.region:
        ours["AWS_DEFAULT_REGION"] = spec.storage.region
    # podTemplate.env and the overlays' env come with the pod template fragment (build_pod)
    return [{"name": name, "value": value} for name, value in ours.items()]


def _quantities(values: dict[str, int | str]) -> dict[str, str]:
    return {key: str(value) for key, value in sorted(values.items())}


def stage_labels(job: JobRef, stage: str, attempt: int) -> dict[str, str]:
    return {keys.LABEL_JOB: job.label, keys.LABEL_STAGE: stage, keys.LABEL_ATTEMPT: str(attempt)}


def build_pod(
    job: JobRef, stage: StageName, attempt: int, node: int, options: BuildOptions = BuildOptions()
) -> dict[str, Any]:
    """One pod of the gang: the operator's own pod, then the stage's pod template fragment merged over it
    (spec.podTemplate's fields, metadata and spec, then stages.<stage>.podTemplate's; the spec's
    validation refused any overlay that changes what the operator owns: podtemplate.protected_problems)."""
    spec = job.spec
    resources = spec.stage_resources(stage)
    name = pod_name(job.name, stage, attempt, node)
    # what the gang scheduler reads (runPolicy.gangScheduling; operator/gang.py)
    marks = gang.pod_marks(spec.run_policy.gang_scheduling, pod_group_name(job.name, stage, attempt),
                           resources.nodes, job.labels.get(keys.KUEUE_QUEUE))
    labels = {**stage_labels(job, stage, attempt), keys.LABEL_NODE_RANK: str(node), **marks.labels}
    metadata = _metadata(job, name, labels)
    if marks.annotations:
        metadata["annotations"] = dict(marks.annotations)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "command": [*options.trainer_command, "--job", JOB_FILE, "--stage", stage],
        "env": _env(job, stage, attempt, node),
        "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"},
                  {"name": keys.TRAINER_METRICS_PORT_NAME, "containerPort": keys.TRAINER_METRICS_PORT, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": podtemplate.VOLUME_JOB, "mountPath": JOB_FILE_DIR, "readOnly": True},
            {"name": podtemplate.VOLUME_SHM, "mountPath": podtemplate.SHM_DIR},
            {"name": podtemplate.VOLUME_SCRATCH, "mountPath": SCRATCH_DIR},
        ],
        # A failing trainer writes one line `mmalign: <KIND> (exit N): <reason>` to /dev/termination-log;
        # when it could not (a crash, a signal, `mmalign launch` giving up on DNS), the kubelet uses the
        # log's tail instead. The failure policy puts that message in the job's conditions and events.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.storage.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.storage.credentials_secret}}]
    requirements = container_resources(resources)
    if requirements:
        container["resources"] = requirements
    fragment = spec.stage_pod_fragment(stage)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "hostname": name,  # pod names are cut to 63, so they are valid hostnames
        "subdomain": service_name(job.name),
        # SIGTERM -> SIGKILL: time for every rank to finish its step and commit a checkpoint of it
        "terminationGracePeriodSeconds": spec.pod_template.termination_grace_period_seconds,
        "containers": [container],
        "volumes": [
            {"name": podtemplate.VOLUME_JOB, "configMap": {"name": config_map_name(job.name)}},
            # Container runtimes give /dev/shm 64 MiB; NCCL's shared-memory transport and DataLoader
            # workers need more ("Bus error" / NCCL shm errors otherwise): an in-memory emptyDir.
            {"name": podtemplate.VOLUME_SHM, "emptyDir": {"medium": "Memory", **({"sizeLimit": resources.shm_size}
                                                                            if resources.shm_size else {})}},
            # An overlay's volume named `scratch` (a hostPath NVMe, a PVC) replaces this one.
            {"name": podtemplate.VOLUME_SCRATCH, "emptyDir": {}},
        ],
    }
    if options.pod_security_context:
        pod_spec["securityContext"] = copy.deepcopy(options.pod_security_context)
    if options.security_context:
        container["securityContext"] = copy.deepcopy(options.security_context)
        if options.security_context.get("readOnlyRootFilesystem"):
            container["volumeMounts"].append({"name": VOLUME_TMP, "mountPath": TMP_DIR})
            pod_spec["volumes"].append({"name": VOLUME_TMP, "emptyDir": {}})
    if marks.scheduler_name:  # (podTemplate.spec.schedulerName, merged below, wins)
        pod_spec["schedulerName"] = marks.scheduler_name
    if not fragment["spec"].get("serviceAccountName"):
        # The trainer talks to S3, never to the API server (progress goes through its log).
        pod_spec["automountServiceAccountToken"] = False
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
    merged: dict[str, Any] = podtemplate.strategic_merge(pod, fragment, podtemplate.pod_template_schema())
    return merged


def container_resources(resources: Resources) -> dict[str, dict[str, str]]:
    """The trainer container's requests and limits: the user's, with the GPU resource set to
    `Resources.gpu_resource()` in BOTH (Kubernetes wants an extended resource in limits, equal to its
    request): nvidia.com/gpu = procPerNode unless the user named a GPU resource; 0 = none (a CPU job)."""
    gpu, count = resources.gpu_resource()
    out: dict[str, dict[str, str]] = {}
    for kind, given in (("requests", resources.requests), ("limits", resources.limits)):
        quantities = {k: v for k, v in _quantities(given).items() if k != gpu}
        if count > 0:
            quantities[gpu] = str(count)
        if quantities:
            out[kind] = dict(sorted(quantities.items()))
    return out


def build_gang(
    job: JobRef, stage: StageName, attempt: int, options: BuildOptions = BuildOptions()
) -> list[dict[str, Any]]:
    """All pods of one stage attempt, node 0 first."""
    return [build_pod(job, stage, attempt, node, options) for node in range(job.spec.stage_resources(stage).nodes)]


def build_pod_group(
    job: JobRef, stage: StageName, attempt: int, options: BuildOptions = BuildOptions()
) -> dict[str, Any] | None:
    """The gang's PodGroup for runPolicy.gangScheduling's scheduler (volcano, coscheduling), else None;
    its minResources are what the gang's pods request (node 0's pod times the nodes: they differ only
    in rank and name)."""
    if gang.pod_group_kind(job.spec.run_policy.gang_scheduling) is None:
        return None
    metadata = _metadata(job, pod_group_name(job.name, stage, attempt), stage_labels(job, stage, attempt))
    nodes = job.spec.stage_resources(stage).nodes
    resources = gang.min_resources(build_pod(job, stage, attempt, 0, options)["spec"], nodes)
    return gang.pod_group(job.spec.run_policy.gang_scheduling, metadata, nodes, resources)


def build_attempt(
    job: JobRef, stage: StageName, attempt: int, options: BuildOptions = BuildOptions()
) -> list[dict[str, Any]]:
    """Everything one attempt needs, in apply order: Service, ConfigMap, the PodGroup (if any), the pods."""
    group = build_pod_group(job, stage, attempt, options)
    return [build_service(job), build_config_map(job), *([group] if group else []),
            *build_gang(job, stage, attempt, options)]
