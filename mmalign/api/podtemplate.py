"""`podTemplate.metadata` / `podTemplate.spec`: a core/v1 pod template fragment merged into every trainer pod.

Three pure pieces, shared by the spec's validation (`mmalign validate`, the operator) and the builders:

- `pod_spec_schema()`: the real Kubernetes PodSpec schema of the pinned release, generated into
  podspec.schema.json by operator/podschema.py; the CRD embeds it, `schema_problems` checks a fragment
  against it offline (unknown fields, types, required fields, duplicate list-map keys).
- `strategic_merge(base, patch, schema)`: Kubernetes strategic-merge-patch semantics, driven by the
  schema's `x-kubernetes-patch-merge-key` / `-patch-strategy`: maps merge key by key; lists with a merge
  key merge item by item (containers, initContainers, env, volumes, imagePullSecrets, ports and
  topologySpreadConstraints by their key, volumeMounts by mountPath), a `retainKeys` item (a volume)
  is replaced whole; other lists are replaced, except `tolerations` and `envFrom`, which are appended
  (a deviation from SMP: the operator's own envFrom, the credentials Secret, must stay).
- `protected_problems(fragment)`: what the operator owns in the pod and an overlay may not change (the
  trainer container's image/command/args, the torchrun env, its volumes and mounts, the termination
  message, restartPolicy/hostname/subdomain, the mmalign.io/ labels), each named by its field path.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from mmalign.api import formats, keys

SCHEMA_FILE = Path(__file__).with_name("podspec.schema.json")
SCHEMA_MARKER = "x-mmalign-pod-spec"  # on a field of spec.py: the CRD puts the PodSpec schema there

# What the operator's pod is made of (operator/builders.py builds it from these names).
TRAINER = "trainer"  # the trainer container's name: `containers[name=trainer]` in an overlay patches it
MASTER_PORT = 29500
JOB_FILE_DIR = "/etc/mmalign"  # the job document (ConfigMap volume `job`)
SHM_DIR = "/dev/shm"  # in-memory emptyDir `dshm`
SCRATCH_DIR = "/var/lib/mmalign"  # emptyDir `scratch`: downloads and checkpoint shards of this pod
# The trainer's one-line failure reason (the failure policy reads it)
TERMINATION_LOG = "/dev/termination-log"
VOLUME_JOB, VOLUME_SHM, VOLUME_SCRATCH = "job", "dshm", "scratch"

# Lists that an overlay appends to instead of replacing (SMP would replace them: no merge key upstream).
APPENDED = ("tolerations", "envFrom")

METADATA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        name: {"type": "object", "additionalProperties": {"type": "string"}}
        for name in ("annotations", "labels")
    },
}


@functools.cache
def pod_spec_schema() -> dict[str, Any]:
    """The structural schema of a PodSpec fragment (generated; read once)."""
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    return schema


def pod_template_schema() -> dict[str, Any]:
    """{metadata, spec} of a pod template, as strategic_merge walks it."""
    return {"type": "object", "properties": {"metadata": METADATA_SCHEMA, "spec": pod_spec_schema()}}


# ------------------------------------------------------------------------------------------ merge


def strategic_merge(base: Any, patch: Any, schema: dict[str, Any], field: str = "") -> Any:
    """`patch` merged over `base` (neither is modified); `schema` is the node both sit at."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        properties = schema.get("properties")
        for key, value in patch.items():
            below = (
                properties.get(key, {}) if properties is not None else schema.get("additionalProperties", {})
            )
            out[key] = strategic_merge(base[key], value, below, key) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        merge_key = schema.get("x-kubernetes-patch-merge-key")
        strategy = str(schema.get("x-kubernetes-patch-strategy", "")).split(",")
        if merge_key and "merge" in strategy:
            items = list(base)
            where = {item.get(merge_key): i for i, item in enumerate(items) if isinstance(item, dict)}
            for item in patch:
                i = where.get(item.get(merge_key)) if isinstance(item, dict) else None
                if i is None:
                    where[item.get(merge_key) if isinstance(item, dict) else None] = len(items)
                    items.append(copy.deepcopy(item))
                elif "retainKeys" in strategy:  # a volume: its source is replaced, never mixed
                    items[i] = copy.deepcopy(item)
                else:
                    items[i] = strategic_merge(items[i], item, schema.get("items", {}))
            return items
        if field in APPENDED:
            return list(base) + [copy.deepcopy(item) for item in patch if item not in base]
    return copy.deepcopy(patch)


# ------------------------------------------------------------------------------------------ checks


def schema_problems(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """What the API server's structural validation would refuse in `value`, as `path: message` lines."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, int | str) and not isinstance(value, bool)
        return [] if ok else [f"{path}: must be an integer or a string"]
    kind = schema.get("type")
    checks = {
        "object": dict,
        "array": list,
        "string": str,
        "boolean": bool,
        "integer": int,
        "number": int | float,
    }
    if kind in checks and (
        not isinstance(value, checks[kind]) or kind in ("integer", "number") and isinstance(value, bool)
    ):
        return [f"{path}: must be {'an' if kind in ('object', 'array', 'integer') else 'a'} {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: must be one of {', '.join(map(str, schema['enum']))} (got {value!r})"]
    problems: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        for name in schema.get("required", ()):
            if name not in value:
                problems.append(f"{path}.{name}: required field is missing")
        for key, item in value.items():
            if properties is not None and key not in properties:
                problems.append(
                    f"{path}.{key}: unknown field (`kubectl explain pod.{_explain(path)}` lists the fields)"
                )
            elif properties is not None:
                problems += schema_problems(item, properties[key], f"{path}.{key}")
            elif "additionalProperties" in schema:
                problems += schema_problems(item, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list):
        seen: dict[tuple[Any, ...], int] = {}
        map_keys = (
            schema.get("x-kubernetes-list-map-keys")
            if schema.get("x-kubernetes-list-type") == "map"
            else None
        )
        for i, item in enumerate(value):
            problems += schema_problems(item, schema.get("items", {}), f"{path}[{i}]")
            if map_keys and isinstance(item, dict):
                key = tuple(item.get(k) for k in map_keys)
                if key in seen:
                    problems.append(
                        f"{path}[{i}]: duplicate entry {', '.join(map_keys)}={key[0]!r} "
                        f"(also {path}[{seen[key]}])"
                    )
                seen.setdefault(key, i)
    return problems


def _explain(path: str) -> str:
    """`spec.podTemplate.spec.containers[0].x` -> `spec.containers` (for `kubectl explain pod.<that>`)."""
    parts = [part.split("[")[0] for part in path.split(".")]
    if "podTemplate" in parts:
        parts = parts[parts.index("podTemplate") + 1 :]
    return ".".join(parts) or "spec"


_OWNED_POD = {
    "restartPolicy": "the operator restarts the whole gang itself (restartPolicy Never)",
    "hostname": "the rendezvous address is <pod>.<service>: the operator sets the hostname",
    "subdomain": "the rendezvous address is <pod>.<service>: the operator sets the subdomain",
    "setHostnameAsFQDN": "the rendezvous resolves the operator's hostname and subdomain",
    "terminationGracePeriodSeconds": "set podTemplate.terminationGracePeriodSeconds (the trainer's SIGTERM "
    "budget reads it)",
}
_OWNED_TRAINER = {
    "name": "",
    "image": "set spec.image",
    "command": "the operator runs the trainer (`mmalign launch --job ... --stage ...`)",
    "args": "the operator runs the trainer (`mmalign launch --job ... --stage ...`)",
    "terminationMessagePath": f"the trainer writes its failure reason to {TERMINATION_LOG}",
    "terminationMessagePolicy": "the failure policy reads the termination message (FallbackToLogsOnError)",
}
_OWNED_MOUNTS = {
    JOB_FILE_DIR: "the job document",
    SHM_DIR: "the in-memory /dev/shm (resources.shmSize)",
    SCRATCH_DIR: f"the scratch folder (give a volume named {VOLUME_SCRATCH!r} to put it on a hostPath "
    "or a PVC)",
}
_OWNED_VOLUMES = {
    VOLUME_JOB: "the job document's ConfigMap",
    VOLUME_SHM: "the in-memory /dev/shm (resources.shmSize)",
}
OWNED_LABEL_PREFIX = "mmalign.io/"


def protected_problems(spec: dict[str, Any], path: str = "") -> list[str]:
    """Fields of a PodSpec fragment that the operator owns, as `path: why` lines (`path` names `spec`)."""
    where = f"{path}." if path else ""
    problems = [f"{where}{key}: {why}: remove it" for key, why in _OWNED_POD.items() if key in spec]
    for i, volume in enumerate(spec.get("volumes") or ()):
        if isinstance(volume, dict) and volume.get("name") in _OWNED_VOLUMES:
            problems.append(
                f"{where}volumes[{i}]: the volume {volume['name']!r} is the operator's "
                f"({_OWNED_VOLUMES[volume['name']]}): choose another name"
            )
    for group in ("containers", "initContainers"):
        for i, container in enumerate(spec.get(group) or ()):
            if not isinstance(container, dict):
                continue
            at = f"{where}{group}[{i}]"
            if container.get("name") != TRAINER:
                if "image" not in container:
                    problems.append(
                        f"{at}.image: required for a container other than the trainer "
                        f"({container.get('name')!r})"
                    )
                continue
            if group == "initContainers":
                problems.append(f"{at}.name: {TRAINER!r} is the trainer container's name: choose another")
                continue
            problems += _trainer_problems(container, at)
    return problems


def owned_label_problems(labels: dict[str, str]) -> list[str]:
    return [
        f"{key}: the operator sets the {OWNED_LABEL_PREFIX} labels: choose another key"
        for key in labels
        if key.startswith(OWNED_LABEL_PREFIX)
    ]


def _trainer_problems(container: dict[str, Any], at: str) -> list[str]:
    problems = [
        f"{at}.{key}: {why}: remove it" for key, why in _OWNED_TRAINER.items() if why and key in container
    ]
    for j, variable in enumerate(container.get("env") or ()):
        name = variable.get("name", "") if isinstance(variable, dict) else ""
        if formats.reserved_env(name):
            problems.append(
                f"{at}.env[{j}]: {name}: the operator sets PET_* and "
                + ", ".join(n for n in keys.RESERVED_ENV if not n.startswith(formats.RESERVED_ENV_PREFIX))
                + " itself (the torchrun rendezvous, the job's identity): remove the entry"
            )
        elif formats.credential_env(name) and "value" in variable:
            problems.append(
                f"{at}.env[{j}]: {name} looks like a credential: anyone who can read the AlignmentJob "
                "reads a literal value; take it from a Secret (valueFrom.secretKeyRef)"
            )
    for j, mount in enumerate(container.get("volumeMounts") or ()):
        mount_path = str(mount.get("mountPath", "")).rstrip("/") if isinstance(mount, dict) else ""
        if mount_path in _OWNED_MOUNTS:
            problems.append(
                f"{at}.volumeMounts[{j}]: {mount_path} is the operator's mount "
                f"({_OWNED_MOUNTS[mount_path]}): mount elsewhere"
            )
        elif isinstance(mount, dict) and mount.get("name") in _OWNED_VOLUMES:
            problems.append(f"{at}.volumeMounts[{j}]: the volume {mount['name']!r} is the operator's")
    for j, port in enumerate(container.get("ports") or ()):
        if isinstance(port, dict) and (
            port.get("containerPort") == MASTER_PORT or port.get("name") == "rendezvous"
        ):
            problems.append(
                f"{at}.ports[{j}]: port {MASTER_PORT} (rendezvous) is the operator's: use another port"
            )
    return problems


def trainer_resources(spec: dict[str, Any]) -> tuple[int, dict[str, dict[str, Any]]]:
    """(index in spec.containers, resources) the PodSpec fragment gives the trainer container; (-1, {})."""
    for i, container in enumerate(spec.get("containers") or ()):
        if isinstance(container, dict) and container.get("name") == TRAINER:
            return i, container.get("resources") or {}
    return -1, {}
