"""One pod on the process node: its folder, files, processes, restarts, and the status it reports.

A pod is a folder `pods/<ns>_<name>_<uid>/` (volumes/, logs/, termination/, work/, home/, tmp/,
kubeconfig) and one process group: the first container starts a new group and the others join it, so
deleting the pod signals every process it started, torchrun's workers included. Containers run with the
command/args of their spec in the project's Python environment; the image is recorded in the status,
never pulled. A container's exit is reported with the kubelet's termination message
(podspec.termination_message).

`step()` is called by the node's loop; it never blocks. The loop owns all API calls except the ones
made while preparing a pod (Secrets, ConfigMaps, TokenRequest), which `prepare()` receives as a client.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from mmalign.devcluster import dns, podspec
from mmalign.devcluster.kubeapi import ApiError, KubeApi

# "true": wildcard binds stay wildcard (the host's port space) instead of the pod's own address.
HOST_PORTS_ANNOTATION = "devcluster.mmalign.io/host-ports"
MAX_BACKOFF_SECONDS = 20.0  # the kubelet caps at 300 s; tests want crash loops to move faster


TMP_LINKS = Path("/tmp")  # where each pod's short TMPDIR link lives (PodRunner.tmp_link)


def tmp_links(pods_dir: Path) -> list[Path]:
    """The TMPDIR links of the pods under `pods_dir` (`dev down` removes them with the state folder)."""
    inside = str(pods_dir.absolute()) + os.sep
    return [link for link in TMP_LINKS.glob("mmalign-pod-*")
            if link.is_symlink() and os.readlink(link).startswith(inside)]


def group_descendants(pgid: int) -> list[int]:
    """Processes outside group `pgid` that descend from a member of it (from /proc: pid, ppid, pgid)."""
    parent: dict[int, int] = {}
    members: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid, ppid, group = int(entry.name), int(fields[1]), int(fields[2])
        parent[pid] = ppid
        if group == pgid:
            members.add(pid)
    found: list[int] = []
    for pid, ppid in parent.items():
        ancestor, hops = ppid, 0
        while ancestor > 1 and ancestor not in members and hops < 64:
            ancestor, hops = parent.get(ancestor, 0), hops + 1
        if ancestor in members and pid not in members:
            found.append(pid)
    return found


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class NodeContext:
    """What every pod of a node needs from the node: API access, paths, the environment base."""

    node_name: str
    api: KubeApi
    apiserver_url: str
    ca_file: Path
    pods_dir: Path
    hosts_file: Path
    dns_shim: Path
    path_dirs: list[str]
    allocatable: dict[str, str]
    host_ip: str = "127.0.0.1"


@dataclass
class ContainerRun:
    spec: dict[str, Any]
    init: bool
    log_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    not_before: float = 0.0
    termination_file: Path | None = None  # this start's stand-in for terminationMessagePath

    @property
    def name(self) -> str:
        name: str = self.spec["name"]
        return name

    @property
    def terminated(self) -> dict[str, Any] | None:
        return self.state.get("terminated")

    def log_file(self, previous: bool = False) -> Path:
        return self.log_dir / f"{self.restarts - (1 if previous else 0)}.log"

    def termination_message(self, exit_code: int) -> str:
        """What the kubelet reports as `terminated.message` for the attempt that just ended."""
        file_tail = None
        if self.termination_file is not None:
            try:
                file_tail = read_tail(self.termination_file, podspec.MAX_TERMINATION_MESSAGE_BYTES)
            except FileNotFoundError:
                pass
            except OSError as err:  # the kubelet's wording
                return f"Error on reading termination log {self.termination_file}: {err}"
        try:
            log_tail = read_tail(self.log_file(), podspec.MAX_TERMINATION_LOG_BYTES)
        except OSError:
            log_tail = b""
        return podspec.termination_message(self.spec, exit_code, file_tail, log_tail)

    def status(self) -> dict[str, Any]:
        out = {"name": self.name, "image": self.spec.get("image", ""), "imageID": "",
               "restartCount": self.restarts, "ready": "running" in self.state,
               "started": "running" in self.state, "state": self.state}
        if self.last_state:
            out["lastState"] = self.last_state
        return out


def read_tail(path: Path, size: int) -> bytes:
    """The last `size` bytes of a file."""
    with open(path, "rb") as f:
        f.seek(max(f.seek(0, os.SEEK_END) - size, 0))
        return f.read()


def pod_phase(restart_policy: str, init: list[ContainerRun], main: list[ContainerRun]) -> str:
    """The pod phase from its containers' states, as the kubelet computes it."""
    for run in init:
        term = run.terminated
        if term and term["exitCode"] == 0:
            continue
        return "Failed" if term and restart_policy == "Never" else "Pending"
    if any("running" in run.state for run in main):
        return "Running"
    if all(run.terminated for run in main):
        if restart_policy == "Always":
            return "Running"  # about to restart
        if all(run.terminated is not None and run.terminated["exitCode"] == 0 for run in main):
            return "Succeeded"
        return "Failed" if restart_policy == "Never" else "Running"
    return "Running" if any(run.restarts or run.terminated for run in main) else "Pending"


class PodRun:
    def __init__(self, pod: dict[str, Any], ctx: NodeContext, ip: str, gpus: list[int]):
        meta = pod["metadata"]
        self.pod, self.ctx, self.ip, self.gpus = pod, ctx, ip, gpus
        self.uid, self.namespace, self.name = meta["uid"], meta["namespace"], meta["name"]
        self.root = ctx.pods_dir / f"{self.namespace}_{self.name}_{self.uid}"
        # TMPDIR: a short link to root/tmp. Unix sockets made under it (multiprocessing's fd sharing: a
        # DataLoader worker handing tensors back) must fit 108 bytes, which the pod folder's path does not.
        # named by the folder's path: unique per pod and per cluster (tests reuse uids in their own folders)
        self.tmp_link = TMP_LINKS / f"mmalign-pod-{hashlib.sha256(str(self.root.absolute()).encode()).hexdigest()[:16]}"
        self.policy = pod["spec"].get("restartPolicy", "Always")
        logs = self.root / "logs"
        self.init = [ContainerRun(c, True, logs / c["name"]) for c in pod["spec"].get("initContainers") or []]
        self.main = [ContainerRun(c, False, logs / c["name"]) for c in pod["spec"]["containers"]]
        self.start_time = now_iso()
        self.pgid: int | None = None
        self.prepared = False
        self.config_error = ""
        self.retry_prepare_at = 0.0
        self.kill_deadline: float | None = None

    # ------------------------------------------------------------ preparation (API reads, files)

    def prepare(self) -> None:
        """Write volumes and the service-account kubeconfig; remember a config error to report."""
        if time.monotonic() < self.retry_prepare_at:
            return
        try:
            for sub in ("volumes", "work", "home", "tmp", "logs"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            target = str((self.root / "tmp").absolute())
            if not (self.tmp_link.is_symlink() and os.readlink(self.tmp_link) == target):
                self.tmp_link.unlink(missing_ok=True)
                self.tmp_link.symlink_to(target, target_is_directory=True)
            secrets, configmaps = self._referenced_data()
            self._write_volumes(secrets, configmaps)
            self.secrets, self.configmaps = secrets, configmaps
            self._write_kubeconfig()
            self.prepared, self.config_error = True, ""
        except (podspec.ContainerConfigError, ApiError) as err:
            self.config_error = str(err)
            self.retry_prepare_at = time.monotonic() + 2.0
            for run in self.init + self.main:
                run.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}

    def _referenced_data(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Only the Secrets and ConfigMaps this pod names: the node never lists all of them."""
        secrets: dict[str, dict[str, bytes]] = {}
        configmaps: dict[str, dict[str, bytes]] = {}
        names: set[tuple[str, str]] = set()
        for vol in self.pod["spec"].get("volumes") or []:
            if "secret" in vol:
                names.add(("secrets", vol["secret"]["secretName"]))
            if "configMap" in vol:
                names.add(("configmaps", vol["configMap"]["name"]))
            for src in (vol.get("projected") or {}).get("sources") or []:
                if "secret" in src:
                    names.add(("secrets", src["secret"]["name"]))
                if "configMap" in src:
                    names.add(("configmaps", src["configMap"]["name"]))
        for container in self.pod["spec"]["containers"] + (self.pod["spec"].get("initContainers") or []):
            for source in container.get("envFrom") or []:
                if "secretRef" in source:
                    names.add(("secrets", source["secretRef"]["name"]))
                if "configMapRef" in source:
                    names.add(("configmaps", source["configMapRef"]["name"]))
            for var in container.get("env") or []:
                ref = var.get("valueFrom") or {}
                if "secretKeyRef" in ref:
                    names.add(("secrets", ref["secretKeyRef"]["name"]))
                if "configMapKeyRef" in ref:
                    names.add(("configmaps", ref["configMapKeyRef"]["name"]))
        for kind, name in names:
            try:
                obj = self.ctx.api.get(f"/api/v1/namespaces/{self.namespace}/{kind}/{name}")
            except ApiError as err:
                if err.status == 404:
                    continue  # podspec decides: optional refs are fine, required ones are config errors
                raise
            (secrets if kind == "secrets" else configmaps)[name] = podspec.decode_data(obj)
        return secrets, configmaps

    def _token(self, audience: str | None, seconds: int) -> str:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        spec: dict[str, Any] = {"expirationSeconds": max(seconds, 600),
                      "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.name, "uid": self.uid}}
        if audience:
            spec["audiences"] = [audience]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        got = self.ctx.api.create(f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{sa}/token", body)
        token: str = got["status"]["token"]
        return token

    def _write_volumes(self, secrets: dict[str, Any], configmaps: dict[str, Any]) -> None:
        for vol in self.pod["spec"].get("volumes") or []:
            if "hostPath" in vol:
                continue
            folder = self.root / "volumes" / vol["name"]
            folder.mkdir(parents=True, exist_ok=True)
            for item in podspec.volume_files(self.pod, vol, secrets, configmaps):
                target = folder / item.path
                target.parent.mkdir(parents=True, exist_ok=True)
                content = item.content
                if item.token_audience is not None:
                    content = self._token(item.token_audience, item.token_seconds).encode()
                target.write_bytes(content)
                target.chmod(item.mode & 0o777 | 0o600)  # the node's user must keep reading its files

    def _write_kubeconfig(self) -> None:
        """The pod's identity: a kubeconfig with a TokenRequest token of its ServiceAccount.

        Why not in-cluster config: clients read it from the fixed /var/run/secrets/... path, which a
        process cannot have per pod without mount namespaces. With KUBECONFIG set and no
        KUBERNETES_SERVICE_HOST, the Python client, kopf and kubectl all fall back to this file."""
        if self.pod["spec"].get("automountServiceAccountToken") is False:
            return
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "pod",
            "clusters": [{"name": "dev", "cluster": {"server": self.ctx.apiserver_url,
                                                     "certificate-authority": str(self.ctx.ca_file)}}],
            "users": [{"name": "sa", "user": {"token": self._token(None, 86400)}}],
            "contexts": [{"name": "pod", "context": {"cluster": "dev", "user": "sa",
                                                     "namespace": self.namespace}}],
        }
        path = self.root / "kubeconfig"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)

    # ------------------------------------------------------------ processes

    def base_env(self) -> dict[str, str]:
        hostname = self.pod["spec"].get("hostname") or self.name
        env = {"PATH": os.pathsep.join(self.ctx.path_dirs), "HOME": str(self.root / "home"),
               "TMPDIR": str(self.tmp_link), "LANG": "C.UTF-8"}
        env.update(dns.pod_dns_env(hostname, self.ip, self.namespace, self.ctx.hosts_file, self.ctx.dns_shim))
        if (self.pod["metadata"].get("annotations") or {}).get(HOST_PORTS_ANNOTATION) == "true":
            env["MMALIGN_KEEP_WILDCARD"] = "1"
        if (self.root / "kubeconfig").exists():
            env["KUBECONFIG"] = str(self.root / "kubeconfig")
        # A container without a GPU request sees no GPU, as with the NVIDIA device plugin.
        env["CUDA_VISIBLE_DEVICES"] = env["NVIDIA_VISIBLE_DEVICES"] = ",".join(map(str, self.gpus))
        return env

    def _start(self, run: ContainerRun) -> None:
        pod = {**self.pod, "status": {**self.pod.get("status", {}), "podIP": self.ip,
                                      "podIPs": [{"ip": self.ip}], "hostIP": self.ctx.host_ip}}
        try:
            base = self.base_env()
            own = podspec.container_env(pod, run.spec, self.secrets, self.configmaps, self.ctx.allocatable, base)
            mounts = podspec.container_mounts(pod, run.spec, self.root)
            # The kubelet bind-mounts a new empty file at terminationMessagePath for every container
            # start; here the file is named by MMALIGN_TERMINATION_LOG, and rewriting maps the path.
            termination = self.root / "termination" / run.name / str(run.restarts)
            mounts = sorted([*mounts, (podspec.termination_message_path(run.spec), str(termination))],
                            key=lambda pair: len(pair[0]), reverse=True)
            base[podspec.TERMINATION_LOG_ENV] = str(termination)
            env = {**base, **{k: podspec.rewrite_path(v, mounts) for k, v in own.items()}}
            if "LD_PRELOAD" in own:
                env["LD_PRELOAD"] = f"{base['LD_PRELOAD']}:{own['LD_PRELOAD']}"
            argv = podspec.command_line(run.spec, env, mounts)
            cwd = podspec.working_dir(run.spec, mounts, self.root)
            cwd.mkdir(parents=True, exist_ok=True)
        except podspec.ContainerConfigError as err:
            run.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
            run.not_before = time.monotonic() + 2.0
            return
        termination.parent.mkdir(parents=True, exist_ok=True)
        termination.write_bytes(b"")
        termination.chmod(0o666)  # as the kubelet makes it: any user of the container may write it
        run.termination_file = termination
        run.log_dir.mkdir(parents=True, exist_ok=True)
        with open(run.log_file(), "ab") as log:
            try:
                run.proc = self._spawn(argv, env, cwd, log)
            except OSError as err:  # e.g. the command is not on PATH: the runtime's StartError
                log.write(f"process node: cannot start {argv[0]!r}: {err}\n".encode())
                run.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": str(err),
                                            "startedAt": now_iso(), "finishedAt": now_iso()}}
                return
        run.state = {"running": {"startedAt": now_iso()}}
        (self.root / "pgid").write_text(str(self.pgid))

    def _spawn(self, argv: list[str], env: dict[str, Any], cwd: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
        if self.pgid is not None:
            try:
                return subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, process_group=self.pgid)
            except (subprocess.SubprocessError, PermissionError):
                pass  # the group is gone (all its processes exited): start a new one below
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, process_group=0)
        self.pgid = proc.pid
        return proc

    def _poll(self, run: ContainerRun) -> None:
        if run.proc is None or run.proc.poll() is None:
            return
        code = run.proc.returncode
        exit_code = 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as in a container
        run.proc = None
        terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                      "startedAt": run.state.get("running", {}).get("startedAt", now_iso()),
                      "finishedAt": now_iso(), "containerID": ""}
        message = run.termination_message(exit_code)
        if message:
            terminated["message"] = message
        run.state = {"terminated": terminated}

    def _maybe_restart(self, run: ContainerRun) -> None:
        term = run.terminated
        if not term or self.kill_deadline is not None:
            return
        if not (self.policy == "Always" or (self.policy == "OnFailure" and term["exitCode"] != 0)
                or (run.init and self.policy != "Never" and term["exitCode"] != 0)):
            return
        run.last_state = {"terminated": term}
        run.restarts += 1
        delay = min(MAX_BACKOFF_SECONDS, 1.0 * 2 ** (run.restarts - 1))
        run.not_before = time.monotonic() + delay
        run.state = {"waiting": {"reason": "CrashLoopBackOff",
                                 "message": f"back-off {delay:.0f}s restarting failed container"}}

    def step(self) -> None:
        if self.kill_deadline is not None:
            self._step_terminating()
            return
        if not self.prepared:
            self.prepare()
            if not self.prepared:
                return
        now = time.monotonic()
        for run in self.init:
            self._poll(run)
            self._maybe_restart(run)
            if run.terminated and run.terminated["exitCode"] == 0:
                continue
            if run.proc is None and not run.terminated and now >= run.not_before:
                self._start(run)
            return  # init containers run one at a time, in order
        for run in self.main:
            self._poll(run)
            self._maybe_restart(run)
            if run.proc is None and not run.terminated and now >= run.not_before:
                self._start(run)
        if self.phase() in ("Succeeded", "Failed") and self.pgid is not None:
            self._kill_group(signal.SIGKILL)  # leftovers of a finished container die with it
            self.pgid = None  # and the number is never signalled again: the kernel may reuse it
            (self.root / "pgid").unlink(missing_ok=True)

    # ------------------------------------------------------------ deletion

    def begin_termination(self, grace_seconds: float) -> None:
        if self.kill_deadline is None:
            self.kill_deadline = time.monotonic() + grace_seconds
            self._kill_group(signal.SIGTERM)

    def _step_terminating(self) -> None:
        for run in self.init + self.main:
            self._poll(run)
        assert self.kill_deadline is not None  # begin_termination set it
        if time.monotonic() >= self.kill_deadline:
            self._kill_group(signal.SIGKILL)
            for run in self.init + self.main:
                if run.proc is not None:
                    run.proc.wait(5)
                    self._poll(run)

    @property
    def stopped(self) -> bool:
        return all(run.proc is None for run in self.init + self.main)

    def _kill_group(self, sig: int) -> None:
        if self.pgid is None:
            return
        # torchrun starts its workers in process groups of their own: a SIGKILL to the pod's group alone
        # would leave them running, orphaned, once torchrun is gone (a container's cgroup takes them all).
        # A SIGTERM goes to the group only: torchrun forwards it to its workers itself.
        others = group_descendants(self.pgid) if sig == signal.SIGKILL else []
        for target in (-self.pgid, *others):
            try:
                os.kill(target, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def kill_now(self) -> None:
        self._kill_group(signal.SIGKILL)
        for run in self.init + self.main:
            if run.proc is not None:
                run.proc.wait(5)
                self._poll(run)

    def remove_files(self) -> None:
        self.tmp_link.unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ status

    def phase(self) -> str:
        return pod_phase(self.policy, self.init, self.main)

    def status(self) -> dict[str, Any]:
        phase = self.phase()
        ready = phase == "Running" and all("running" in run.state for run in self.main)
        initialized = all(run.terminated and run.terminated["exitCode"] == 0 for run in self.init)
        conditions = [
            ("PodScheduled", True), ("Initialized", initialized), ("PodReadyToStartContainers", True),
            ("ContainersReady", ready), ("Ready", ready),
        ]
        status: dict[str, Any] = {
            "phase": phase, "hostIP": self.ctx.host_ip, "hostIPs": [{"ip": self.ctx.host_ip}],
            "podIP": self.ip, "podIPs": [{"ip": self.ip}], "startTime": self.start_time,
            # JSON merge patch replaces the whole list: keep the conditions the node does not own (the API
            # server's DisruptionTarget on eviction), as the kubelet's status manager does.
            "conditions": [{"type": name, "status": "True" if ok else "False"} for name, ok in conditions] + [
                c for c in self.pod.get("status", {}).get("conditions", [])
                if c.get("type") not in {name for name, _ in conditions}],
            "containerStatuses": [run.status() for run in self.main],
        }
        if self.init:
            status["initContainerStatuses"] = [run.status() for run in self.init]
        return status
