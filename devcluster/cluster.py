"""Start, find and stop one dev cluster: the Python API behind `mmalign dev` and the pytest fixtures.

    cluster = up(state_dir, nodes=2)     # returns when every part is healthy
    cluster.kubectl("get", "nodes")
    cluster.down()                       # no process, port or folder left

Every component runs detached (its own session, output to STATE/logs/), so `mmalign dev up` returns to
the shell; STATE/state.json records the PIDs (with their start times, so a reused PID is never signalled)
and the ports.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from mmalign.devcluster import binaries, components, dns, kwok, pki, podrunner, realnode
from mmalign.devcluster.kubeapi import ApiError, KubeApi

# Components, node first: `down` stops it before the others (it stops the pods).
STOP_ORDER = ("node", "kwok", "kube-scheduler", "controller-manager", "apiserver", "seaweedfs", "etcd")
# The one switch between the process node (default) and the real node: `mmalign dev up --node real`
# sets it for the command; tests and `make` read it from the environment.
NODE_ENV = "MMALIGN_NODE"


def default_state_dir() -> Path:
    if os.environ.get("MMALIGN_STATE"):
        return Path(os.environ["MMALIGN_STATE"])
    return Path.home() / ".local" / "state" / "mmalign" / "dev"


# Listening ports come from below the kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768+ by
# default): a port picked from inside it can be taken as the SOURCE port of some client's outgoing
# connection between the moment we pick it and the moment the component binds it.
PORT_RANGE = (20000, 32000)


def free_ports(names: tuple[str, ...]) -> dict[str, int]:
    """Distinct free loopback ports: all sockets stay open until every port is picked."""
    socks: list[socket.socket] = []
    candidates = random.sample(range(*PORT_RANGE), k=min(2000, PORT_RANGE[1] - PORT_RANGE[0]))
    try:
        for port in candidates:
            if len(socks) == len(names):
                break
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            socks.append(sock)
        if len(socks) < len(names):
            raise RuntimeError(f"found only {len(socks)} free ports in {PORT_RANGE}, need {len(names)}")
        return {name: sock.getsockname()[1] for name, sock in zip(names, socks, strict=True)}
    finally:
        for sock in socks:
            sock.close()


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a live, non-zombie process; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


@dataclass
class DevCluster:
    state_dir: Path
    ports: dict[str, int]
    processes: dict[str, dict[str, Any]]  # name -> {"pid", "start"}
    nodes: int
    node: str = "process"  # "real": containerd + kubelet in the network namespace (devcluster/realnode.py)
    kwok_nodes: int = 0  # fake nodes managed by kwok (devcluster/kwok.py), instead of process nodes

    @property
    def host(self) -> str:
        """Where the API server and S3 answer: loopback, or the real node's namespace address."""
        return realnode.NS_IP if self.node == "real" else "127.0.0.1"

    @property
    def node_layout(self) -> realnode.NodeLayout:
        return realnode.NodeLayout(self.state_dir, binaries.bin_dir(), binaries.cache_dir() / "containerd")

    @property
    def layout(self) -> components.Layout:
        return components.Layout(self.state_dir, binaries.bin_dir())

    @property
    def kubeconfig(self) -> Path:
        return self.layout.kubeconfig

    @property
    def apiserver(self) -> str:
        return f"https://{self.host}:{self.ports['apiserver']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.ports['s3']}"

    @property
    def s3_credentials(self) -> dict[str, str]:
        return {"aws_access_key_id": components.S3_ACCESS_KEY,
                "aws_secret_access_key": components.S3_SECRET_KEY, "region_name": components.S3_REGION}

    @property
    def env(self) -> dict[str, str]:
        """KUBECONFIG, PATH (cached kubectl and helm first), AWS_* for the local S3."""
        dirs = [str(binaries.bin_dir()), sysconfig.get_path("scripts")]
        env = components.shell_env(self.kubeconfig, dirs, self.ports["s3"], os.environ.get("PATH", ""))
        return {**env, "AWS_ENDPOINT_URL": self.s3_endpoint}

    def api(self) -> KubeApi:
        folder = self.layout.pki
        return KubeApi(self.apiserver, folder / "ca.crt", (folder / "admin.crt", folder / "admin.key"))

    def kubectl(self, *args: str, check: bool = False, input: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(binaries.bin_dir() / "kubectl"), *args], env={**os.environ, **self.env},
                              capture_output=True, text=True, check=check, input=input, timeout=timeout)

    def alive(self) -> dict[str, bool]:
        return {name: _start_time(p["pid"]) == p["start"] for name, p in self.processes.items()}

    def down(self) -> None:
        down(self.state_dir)

    def save(self) -> None:
        state = {"ports": self.ports, "processes": self.processes, "nodes": self.nodes, "node": self.node,
                 "kwok_nodes": self.kwok_nodes}
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=2))


def load(state_dir: Path | None = None) -> DevCluster:
    state_dir = state_dir or default_state_dir()
    path = state_dir / "state.json"
    if not path.exists():
        raise FileNotFoundError(f"no dev cluster in {state_dir} (start one with `mmalign dev up`)")
    state = json.loads(path.read_text())
    return DevCluster(state_dir, state["ports"], state["processes"], state["nodes"], state.get("node", "process"),
                      state.get("kwok_nodes", 0))


def _spawn(cluster: DevCluster, name: str, argv: list[str], env: dict[str, Any] | None = None) -> None:
    if cluster.node == "real":
        argv = realnode.in_netns(argv)
    log = open(cluster.layout.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **(env or {})}, cwd=cluster.state_dir)
    log.close()
    cluster.processes[name] = {"pid": proc.pid, "start": _start_time(proc.pid)}
    cluster.save()


def up(state_dir: Path | None = None, nodes: int = 2, gpus_per_node: int = 0, cpu: str = "8",
       memory: str = "32Gi", kwok_nodes: int = 0, timeout: float = 120,
       progress: Callable[[str], None] | None = None, node: str | None = None) -> DevCluster:
    """Start a cluster in `state_dir` (emptied first) and wait until it is healthy.

    `node` (default: $MMALIGN_NODE, else "process") picks the node: "real" starts containerd, a kubelet,
    kube-scheduler, kube-proxy and CoreDNS in a network namespace (devcluster/realnode.py).
    `kwok_nodes` > 0 (with `nodes=0`): that many kwok nodes instead, the real kube-scheduler binding pods to
    them (devcluster/kwok.py); pods go Running without running anything."""
    say = progress or (lambda _msg: None)
    node = node or os.environ.get(NODE_ENV) or "process"
    if node not in ("process", "real"):
        raise RuntimeError(f"{NODE_ENV}/--node must be 'process' or 'real', not {node!r}")
    if kwok_nodes and (node == "real" or nodes):
        raise RuntimeError("kwok nodes replace the process nodes: pass --nodes 0 with --kwok-nodes N (or --fast); "
                           "kwok nodes beside the real node are not supported yet")
    if node == "real":
        return _up_real(state_dir, timeout, say)
    state_dir = (state_dir or default_state_dir()).absolute()
    if (state_dir / "state.json").exists():
        existing = load(state_dir)
        if any(existing.alive().values()):
            raise RuntimeError(f"a dev cluster is already running in {state_dir}: `mmalign dev down` first")
    shutil.rmtree(state_dir, ignore_errors=True)
    needed = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "weed",
              *(("kwok", "kube-scheduler") if kwok_nodes else ()))
    missing = [b for b in needed if not (binaries.bin_dir() / b).exists()]
    if missing:
        flag = " --kwok" if {"kwok", "kube-scheduler"} & set(missing) else ""
        raise FileNotFoundError(f"missing {missing} in {binaries.bin_dir()}: run "
                                f"`python -m mmalign.devcluster.binaries{flag}`")
    started = time.monotonic()
    cluster = DevCluster(state_dir, free_ports(components.PORT_NAMES), {}, nodes, kwok_nodes=kwok_nodes)
    layout = cluster.layout
    _write_state(cluster)
    (state_dir / "node.json").write_text(json.dumps({
        "apiserver": cluster.apiserver, "pki": str(layout.pki), "nodes": nodes, "gpus_per_node": gpus_per_node,
        "cpu": cpu, "memory": memory, "node_prefix": "process-node",
        "kubelet_port": cluster.ports["kubelet"],
        # A /16 of 127/8 per cluster, picked from the API port, so two clusters rarely share addresses.
        "pod_network": f"127.{10 + cluster.ports['apiserver'] % 240}.0.0/16",
        "venv_bin": sysconfig.get_path("scripts"), "cache_bin": str(binaries.bin_dir()),
        "dns_shim": str(dns.build_shim(binaries.cache_dir() / "lib")),
        "kubernetes_version": binaries.KUBERNETES_VERSION,
    }))
    try:
        ports = cluster.ports
        _spawn(cluster, "etcd", components.etcd(layout, ports))
        _spawn(cluster, "seaweedfs", components.seaweedfs(layout, ports))
        _spawn(cluster, "apiserver", components.apiserver(layout, ports))
        # As for the real node: the controller manager gives up when the API server is not healthy within
        # ~10 s, which a loaded two-core machine exceeds; it starts after /readyz.
        api = cluster.api()
        _wait("kube-apiserver /readyz", lambda: api.session.get(cluster.apiserver + "/readyz", timeout=2).ok,
              started + timeout, cluster)
        _spawn(cluster, "controller-manager", components.controller_manager(layout))
        if nodes:
            _spawn(cluster, "node", [sys.executable, "-m", "mmalign.devcluster.nodeagent", str(state_dir)])
        if kwok_nodes:
            _start_kwok(cluster, cpu, memory, gpus_per_node, started + timeout)
        say(f"started processes in {time.monotonic() - started:.1f}s; waiting for health")
        _wait_healthy(cluster, started + timeout, say)
    except BaseException:
        _print_logs(cluster)
        down(state_dir, keep=True)
        raise
    say(f"dev cluster up in {time.monotonic() - started:.1f}s")
    return cluster


def _start_kwok(cluster: DevCluster, cpu: str, memory: str, gpus: int, deadline: float) -> None:
    """kube-scheduler and the kwok controller, then the Node objects kwok manages (devcluster/kwok.py)."""
    layout = cluster.layout
    config = cluster.state_dir / "kwok.yaml"
    config.write_text(kwok.config_text(binaries.kwok_stages_dir()))
    scheduler_config = cluster.state_dir / "kube-scheduler.yaml"
    scheduler_config.write_text(kwok.scheduler_config_text(layout.kubeconfig))
    api = cluster.api()
    _spawn(cluster, "kube-scheduler", kwok.scheduler_command(
        binaries.bin_dir() / "kube-scheduler", layout.kubeconfig, scheduler_config))
    _spawn(cluster, "kwok", kwok.command(binaries.bin_dir() / "kwok", layout.kubeconfig, config))
    kwok.create_nodes(api, cluster.kwok_nodes, cpu, memory, gpus)


def _write_state(cluster: DevCluster) -> None:
    """The state folder both kinds of node start from: logs, PKI, state.json, S3 identities, kubeconfig."""
    layout = cluster.layout
    layout.logs.mkdir(parents=True)
    pki.create(layout.pki)
    cluster.save()
    (cluster.state_dir / "s3.json").write_text(json.dumps(components.s3_identities()))
    (cluster.state_dir / "kubeconfig").write_text(yaml.safe_dump(components.kubeconfig(
        cluster.apiserver, layout.pki / "ca.crt", layout.pki / "admin.crt", layout.pki / "admin.key")))


def _up_real(state_dir: Path | None, timeout: float, say: Callable[[str], None]) -> DevCluster:
    """The control plane and S3 as in `up`, plus the real node, all in the namespace realnode.NETNS."""
    from mmalign.devcluster import images

    state_dir = (state_dir or default_state_dir()).absolute()
    if (state_dir / "state.json").exists() and any(load(state_dir).alive().values()):
        raise RuntimeError(f"a dev cluster is already running in {state_dir}: `mmalign dev down` first")
    shutil.rmtree(state_dir, ignore_errors=True)
    realnode.preflight()
    needed = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "weed", "containerd",
              "containerd-shim-runc-v2", "ctr", "kubelet", "kube-scheduler", "kube-proxy", "coredns", "registry")
    missing = [b for b in needed if not (binaries.bin_dir() / b).exists()]
    if missing:
        raise FileNotFoundError(f"missing {missing} in {binaries.bin_dir()}: run "
                                "`python -m mmalign.devcluster.binaries --real-node`")
    pause = images.pause_archive()  # before any process starts: it may compile (seconds)
    started = time.monotonic()
    cluster = DevCluster(state_dir, free_ports(components.PORT_NAMES), {}, 1, "real")
    layout, node_layout = cluster.layout, cluster.node_layout
    _write_state(cluster)
    try:
        realnode.create_netns()
        realnode.write_configs(node_layout, cluster.apiserver)
        ports = cluster.ports
        _spawn(cluster, "etcd", components.etcd(layout, ports))
        _spawn(cluster, "seaweedfs", realnode.seaweedfs_overrides(components.seaweedfs(layout, ports)))
        _spawn(cluster, "apiserver", realnode.apiserver_overrides(components.apiserver(layout, ports)))
        # The controller manager gives up when the API server is not healthy within ~10 s, which a loaded
        # two-core machine starting a dozen components at once can exceed: it starts after /readyz.
        api = cluster.api()
        _wait("kube-apiserver /readyz", lambda: api.session.get(cluster.apiserver + "/readyz", timeout=2).ok,
              started + timeout, cluster)
        _spawn(cluster, "controller-manager", components.controller_manager(layout))
        # containerd finds its shim on PATH. The registry would export OpenTelemetry traces to
        # localhost:4318 (and log every failure) unless told there is no exporter.
        env = {"PATH": f"{binaries.bin_dir()}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
               "OTEL_TRACES_EXPORTER": "none", **realnode.no_proxy_env(dict(os.environ))}
        for name, argv in realnode.commands(node_layout, layout.kubeconfig).items():
            _spawn(cluster, name, argv, env)
            if name == "containerd":
                _wait("containerd's socket", node_layout.socket.exists, started + timeout, cluster)
                images.import_archive(node_layout, pause)
        _wait("the image registry", lambda: port_open(realnode.REGISTRY_PORT, realnode.NS_IP), started + timeout,
              cluster)
        say(f"started processes in {time.monotonic() - started:.1f}s; waiting for health")
        _wait_healthy(cluster, started + timeout, say)
    except BaseException:
        _print_logs(cluster)
        down(state_dir, keep=True)
        raise
    say(f"dev cluster with a real node up in {time.monotonic() - started:.1f}s")
    return cluster


def _wait(what: str, check: Callable[[], bool], deadline: float, cluster: DevCluster) -> None:
    while time.monotonic() < deadline:
        dead = [name for name, ok in cluster.alive().items() if not ok]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}; see {cluster.layout.logs}")
        try:
            if check():
                return
        except (requests.RequestException, ApiError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}; see {cluster.layout.logs}")


def _wait_healthy(cluster: DevCluster, deadline: float, say: Callable[[str], None]) -> None:
    api = cluster.api()
    _wait("kube-apiserver /readyz", lambda: api.session.get(cluster.apiserver + "/readyz", timeout=2).ok,
          deadline, cluster)
    say("kube-apiserver ready")
    _wait("S3 endpoint", lambda: port_open(cluster.ports["s3"], cluster.host), deadline, cluster)

    def nodes_ready() -> bool:
        items = api.get("/api/v1/nodes")["items"]
        ready = [n for n in items if not (n.get("spec", {}).get("taints"))
                 and any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))]
        return len(ready) >= cluster.nodes + cluster.kwok_nodes

    kinds = f"{cluster.kwok_nodes} kwok" if cluster.kwok_nodes else f"{cluster.nodes} {cluster.node}"
    _wait(f"{kinds} nodes Ready", nodes_ready, deadline, cluster)
    say(f"{kinds} nodes ready")
    _wait("the default ServiceAccount (controller manager)",
          lambda: bool(api.get("/api/v1/namespaces/default/serviceaccounts/default")), deadline, cluster)


def _print_logs(cluster: DevCluster) -> None:
    for log in sorted(cluster.layout.logs.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"--- {log.name} (last lines)\n" + "\n".join(tail), file=sys.stderr)


def _signal(pid: int, start: str | None, sig: int) -> None:
    if start is not None and _start_time(pid) == start:
        try:
            os.killpg(pid, sig)  # each component leads its own session and process group
        except ProcessLookupError:
            pass


def down(state_dir: Path | None = None, keep: bool = False, grace: float = 10) -> None:
    """Stop every process of the cluster (pods included) and remove its state folder."""
    state_dir = (state_dir or default_state_dir()).absolute()
    if not (state_dir / "state.json").exists():
        if not keep:
            shutil.rmtree(state_dir, ignore_errors=True)
        return
    cluster = load(state_dir)
    # The node first, alone: it stops the pods while the API server still answers. Then the rest at once.
    # A real node: the kubelet first (it would restart containers), then every container, then the rest.
    node_stopped_pods = cluster.node == "real"
    first = ["kubelet"] if cluster.node == "real" else ["node"]
    for group in (first, [n for n in dict.fromkeys((*STOP_ORDER, *realnode.NODE_COMPONENTS)) if n not in first]):
        procs = [cluster.processes[n] for n in group if n in cluster.processes]
        was_alive = [_start_time(p["pid"]) == p["start"] for p in procs]
        for proc in procs:
            _signal(proc["pid"], proc["start"], signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_start_time(p["pid"]) == p["start"] for p in procs):
            time.sleep(0.05)
        if group == ["node"] and procs:
            node_stopped_pods = was_alive[0] and _start_time(procs[0]["pid"]) != procs[0]["start"]
        for proc in procs:
            _signal(proc["pid"], proc["start"], signal.SIGKILL)
        # A SIGKILLed process with a large heap (the API server) takes a moment to be gone: `down`
        # returns only when nothing it stopped is still alive.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_start_time(p["pid"]) == p["start"] for p in procs):
            time.sleep(0.05)
        if group == ["kubelet"]:
            realnode.stop_pods(cluster.node_layout)
    if cluster.node == "real":
        realnode.cleanup(cluster.node_layout)
    if not node_stopped_pods:
        # The node died without stopping its pods: their process groups are recorded per pod.
        for pgid_file in state_dir.glob("pods/*/pgid"):
            try:
                os.killpg(int(pgid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError, PermissionError):
                pass
    for leftover in components.seaweedfs_leftovers(cluster.ports):
        leftover.unlink(missing_ok=True)
    for link in podrunner.tmp_links(state_dir / "pods"):
        link.unlink(missing_ok=True)
    if not keep:
        shutil.rmtree(state_dir, ignore_errors=True)
