"""Pure translation of a Pod's container spec into a local process: environment, files, command line.

What is supported (anything else is reported as a container config error or ignored, see
docs/devcluster.md):

- `env` with `value` (incl. `$(VAR)` expansion and `$$` escapes, as the kubelet does), `valueFrom`
  `fieldRef` (metadata.name/namespace/uid, labels['k'], annotations['k'], spec.nodeName,
  spec.serviceAccountName, status.podIP/podIPs/hostIP), `resourceFieldRef`, `secretKeyRef`,
  `configMapKeyRef` (with `optional`); `envFrom` configMapRef/secretRef with `prefix`.
- volumes: configMap, secret, projected (configMap, secret, downwardAPI, serviceAccountToken), downwardAPI,
  emptyDir are files under the pod's own folder; hostPath is the host path itself; anything else
  (PVCs, ...) becomes an empty folder.
- No mount namespaces: a process sees the pod folder's path, not the `mountPath`. So command, args, env
  values and workingDir are rewritten: a value equal to a mountPath, starting with `mountPath/`, or of the
  form `something=<such a path>` (e.g. `--config=/etc/job/spec.yaml`) gets the pod-folder path instead.
  Paths inside files and paths a program builds itself are NOT rewritten.
- the termination message: the kubelet bind-mounts a fresh empty file at each container's
  `terminationMessagePath` (default /dev/termination-log). A process cannot have /dev/termination-log
  of its own, so the node gives each container start its own file, treats it as a mount (rewriting
  applies) and passes its path in MMALIGN_TERMINATION_LOG. `termination_message` then computes
  `state.terminated.message` exactly as the kubelet does, FallbackToLogsOnError included.
"""

from __future__ import annotations

import base64
import math
import re
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from mmalign.api import keys
from mmalign.devcluster.scheduling import parse_quantity


class ContainerConfigError(Exception):
    """The kubelet's CreateContainerConfigError: a missing Secret/ConfigMap key, an unknown field."""


# ---------------------------------------------------------------- downward API


def field_value(pod: dict[str, Any], path: str) -> str:
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"), "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.podIPs": ",".join(ip["ip"] for ip in status.get("podIPs") or []),
    }
    if path in simple:
        return simple[path] or ""
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        value: str = (meta.get(match.group(1)) or {}).get(match.group(2), "")
        return value
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ContainerConfigError(f"unsupported fieldRef.fieldPath {path!r}")


def resource_value(container: dict[str, Any], ref: dict[str, Any], node_allocatable: dict[str, str]) -> str:
    """`resourceFieldRef`: limits fall back to the node's allocatable, as in Kubernetes; rounded up."""
    kind, name = ref["resource"].split(".", 1)
    res = container.get("resources") or {}
    raw = (res.get(kind) or {}).get(name)
    if raw is None:
        raw = node_allocatable.get(name, "0") if kind == "limits" else "0"
    divisor = parse_quantity(ref.get("divisor") or "1")
    return str(math.ceil(parse_quantity(raw) / divisor))


# ---------------------------------------------------------------- environment


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known names are replaced, unknown ones kept, `$$` escapes `$`."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)", sub, text)


def _lookup(store: dict[str, dict[str, bytes]], kind: str, ref: dict[str, Any], key: str | None) -> bytes | None:
    data = store.get(ref.get("name", ""))
    if data is None or (key is not None and key not in data):
        if ref.get("optional"):
            return None
        what = f"{kind} {ref.get('name')!r}" + (f" key {key!r}" if key is not None else "")
        raise ContainerConfigError(f"{what} not found")
    return data[key] if key is not None else b""


def container_env(pod: dict[str, Any], container: dict[str, Any], secrets: dict[str, dict[str, bytes]],
                  configmaps: dict[str, dict[str, bytes]], node_allocatable: dict[str, str] | None = None,
                  base: dict[str, str] | None = None) -> dict[str, str]:
    """The container's own variables, in order; `base` (PATH, HOSTNAME...) is visible to `$(VAR)`."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, store, ref in (("configmap", configmaps, source.get("configMapRef")),
                                 ("secret", secrets, source.get("secretRef"))):
            if ref is None:
                continue
            if _lookup(store, kind, ref, None) is None:
                continue
            for key, value in store[ref["name"]].items():
                if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", prefix + key):
                    env[prefix + key] = value.decode()
    for var in container.get("env") or []:
        name, source = var["name"], var.get("valueFrom")
        if source is None:
            env[name] = expand(var.get("value", ""), {**(base or {}), **env})
        elif "fieldRef" in source:
            env[name] = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            env[name] = resource_value(container, source["resourceFieldRef"], node_allocatable or {})
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            is_secret = "secretKeyRef" in source
            ref = source["secretKeyRef" if is_secret else "configMapKeyRef"]
            found = _lookup(secrets if is_secret else configmaps, "secret" if is_secret else "configmap",
                            ref, ref.get("key"))
            if found is not None:
                env[name] = found.decode()
        else:
            raise ContainerConfigError(f"env {name!r}: unsupported valueFrom {sorted(source)}")
    return env


# ---------------------------------------------------------------- volumes and mounts


@dataclass(frozen=True)
class VolumeFile:
    """One file of a volume, relative to the volume folder; `token` asks the caller for a SA token."""

    path: str
    content: bytes = b""
    mode: int = 0o644
    token_audience: str | None = None
    token_seconds: int = 3600


def _items(data: dict[str, bytes], items: list[dict[str, Any]] | None, default_mode: int) -> list[VolumeFile]:
    if not items:
        return [VolumeFile(key, value, default_mode) for key, value in sorted(data.items())]
    return [VolumeFile(item["path"], data.get(item["key"], b""), item.get("mode", default_mode))
            for item in items if item["key"] in data]


def _from_store(store: dict[str, dict[str, bytes]], kind: str, name: str, source: dict[str, Any],
                default_mode: int) -> list[VolumeFile]:
    if name not in store:
        if source.get("optional"):
            return []
        raise ContainerConfigError(f"{kind} {name!r} of a volume not found")
    return _items(store[name], source.get("items"), source.get("defaultMode", default_mode))


def volume_files(pod: dict[str, Any], volume: dict[str, Any], secrets: dict[str, dict[str, bytes]],
                 configmaps: dict[str, dict[str, bytes]]) -> list[VolumeFile]:
    """The files a volume holds; an empty list for emptyDir and unsupported kinds (an empty folder)."""
    if "configMap" in volume:
        src = volume["configMap"]
        return _from_store(configmaps, "configmap", src["name"], src, src.get("defaultMode", 0o644))
    if "secret" in volume:
        src = volume["secret"]
        return _from_store(secrets, "secret", src["secretName"], src, src.get("defaultMode", 0o644))
    if "downwardAPI" in volume:
        return [VolumeFile(item["path"], field_value(pod, item["fieldRef"]["fieldPath"]).encode())
                for item in volume["downwardAPI"].get("items", []) if "fieldRef" in item]
    if "projected" in volume:
        mode = volume["projected"].get("defaultMode", 0o644)
        files: list[VolumeFile] = []
        for source in volume["projected"].get("sources") or []:
            if "configMap" in source:
                files += _from_store(configmaps, "configmap", source["configMap"]["name"],
                                     source["configMap"], mode)
            elif "secret" in source:
                files += _from_store(secrets, "secret", source["secret"]["name"], source["secret"], mode)
            elif "downwardAPI" in source:
                files += volume_files(pod, {"downwardAPI": source["downwardAPI"]}, secrets, configmaps)
            elif "serviceAccountToken" in source:
                tok = source["serviceAccountToken"]
                files.append(VolumeFile(tok["path"], mode=mode, token_audience=tok.get("audience", ""),
                                        token_seconds=int(tok.get("expirationSeconds", 3600))))
        return files
    return []


def decode_data(obj: dict[str, Any]) -> dict[str, bytes]:
    """A Secret's or ConfigMap's data as bytes (Secrets are base64, ConfigMaps text plus binaryData)."""
    out: dict[str, bytes] = {}
    is_secret = obj.get("kind") == "Secret" or "type" in obj
    for key, value in (obj.get("data") or {}).items():
        out[key] = base64.b64decode(value) if is_secret else value.encode()
    for key, value in (obj.get("binaryData") or {}).items():
        out[key] = base64.b64decode(value)
    for key, value in (obj.get("stringData") or {}).items():
        out[key] = value.encode()
    return out


def container_mounts(pod: dict[str, Any], container: dict[str, Any], pod_root: Path) -> list[tuple[str, str]]:
    """(mountPath, local path) pairs, longest mountPath first so nested mounts win."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    mounts = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"], {})
        if "hostPath" in volume:
            local = Path(volume["hostPath"]["path"])
        else:
            local = pod_root / "volumes" / mount["name"]
        if mount.get("subPath"):
            local = local / mount["subPath"]
        mounts.append((mount["mountPath"].rstrip("/") or "/", str(local)))
    return sorted(mounts, key=lambda pair: len(pair[0]), reverse=True)


# The "image" a process node runs is this machine's project environment: the venv and the repository.
# Paths inside them are the image's own files and are never rewritten, even when a mount covers their
# prefix (e.g. an emptyDir at /tmp while the checkout lives under /tmp, as in a CI clone).
IMAGE_PREFIXES = tuple(sorted({str(Path(sys.prefix).resolve()), str(Path(__file__).resolve().parent.parent)}))


def _in_image(value: str) -> bool:
    return any(value == prefix or value.startswith(prefix + "/") for prefix in IMAGE_PREFIXES)


def rewrite_path(value: str, mounts: list[tuple[str, str]]) -> str:
    """Point a mounted path at the pod folder; also the part after the first `=` (`--flag=/path`)."""
    if _in_image(value):
        return value
    for mount_path, local in mounts:
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return local + value[len(mount_path):]
    if "=" in value:
        head, tail = value.split("=", 1)
        rewritten = rewrite_path(tail, mounts)
        if rewritten != tail:
            return f"{head}={rewritten}"
    return value


def command_line(container: dict[str, Any], env: dict[str, str], mounts: list[tuple[str, str]]) -> list[str]:
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if not container.get("command"):
        raise ContainerConfigError(
            f"container {container.get('name')!r} has no command: the process node runs command/args "
            f"locally and cannot run the image's entrypoint ({container.get('image')})")
    return [rewrite_path(expand(arg, env), mounts) for arg in argv]


def working_dir(container: dict[str, Any], mounts: list[tuple[str, str]], pod_root: Path) -> Path:
    """workingDir rewritten into mounts; a folder that does not exist here lives under the pod folder."""
    wanted: str | None = container.get("workingDir")
    if not wanted:
        return pod_root / "work"
    rewritten = Path(rewrite_path(wanted, mounts))
    if rewritten.is_dir() or str(rewritten) != wanted:
        return rewritten
    return pod_root / "rootfs" / wanted.lstrip("/")


def gpu_count(container_or_requests: dict[str, Decimal]) -> int:
    return int(container_or_requests.get("nvidia.com/gpu", Decimal(0)))


# ---------------------------------------------------------------- termination message

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"  # the API server's default
# Where a process finds the file that stands for its terminationMessagePath (see the module docstring);
# mmalign's trainer reads it, with /dev/termination-log as the default in a real container.
TERMINATION_LOG_ENV = keys.ENV_TERMINATION_LOG
# The kubelet's limits (pkg/kubelet/container/runtime.go): the file is read up to its last 4 KiB; the
# log fallback is the last 80 lines, of which the last 2 KiB are kept.
MAX_TERMINATION_MESSAGE_BYTES = 4 * 1024
MAX_TERMINATION_LOG_BYTES = 2 * 1024
MAX_TERMINATION_LOG_LINES = 80


def termination_message_path(container: dict[str, Any]) -> str:
    return container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH


def termination_message(container: dict[str, Any], exit_code: int, file_tail: bytes | None, log_tail: bytes) -> str:
    """`state.terminated.message`, as the kubelet computes it (kuberuntime_container.go,
    getTerminationMessage and readLastStringFromContainerLogs).

    `file_tail`: the end of the termination-message file (None: there is none); `log_tail`: the end of
    the container's log, at least its last MAX_TERMINATION_LOG_BYTES (reading more changes nothing).
    The file wins whenever it is not empty, whatever the exit code; with
    `terminationMessagePolicy: FallbackToLogsOnError`, an empty or missing file and a non-zero exit,
    the message is the log's last 80 lines, cut to their last 2 KiB.
    """
    if file_tail:
        return file_tail[-MAX_TERMINATION_MESSAGE_BYTES:].decode("utf-8", "replace")
    if container.get("terminationMessagePolicy") != "FallbackToLogsOnError" or exit_code == 0:
        return ""
    lines = re.findall(rb"[^\n]*\n|[^\n]+\Z", log_tail)  # the runtime's log lines end at \n only
    return b"".join(lines[-MAX_TERMINATION_LOG_LINES:])[-MAX_TERMINATION_LOG_BYTES:].decode("utf-8", "replace")
