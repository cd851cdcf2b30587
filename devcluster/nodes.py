"""Pure builders of the objects a kubelet keeps in the API: Node, its status, its Lease, Events."""

from __future__ import annotations

import ipaddress
import platform
import secrets
import time
from decimal import Decimal
from typing import Any

from mmalign.devcluster.scheduling import NodeView, parse_quantity

NODE_LABEL = "devcluster.mmalign.io/process-node"
LEASE_SECONDS = 40
RUNTIME_VERSION = "mmalign-process://0.1"


def node_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index}"


def capacity(cpu: str, memory: str, gpus: int, max_pods: int) -> dict[str, str]:
    out = {"cpu": cpu, "memory": memory, "pods": str(max_pods), "ephemeral-storage": "100Gi"}
    if gpus:
        out["nvidia.com/gpu"] = str(gpus)
    return out


def node_object(name: str, cap: dict[str, str], kubelet_port: int, kubernetes_version: str,
                host_ip: str = "127.0.0.1") -> dict[str, Any]:
    """A Node as a kubelet registers it: labels, capacity = allocatable, Ready, addresses, endpoint."""
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
              "kubernetes.io/arch": "amd64", "node.kubernetes.io/instance-type": "process", NODE_LABEL: "true"}
    if "nvidia.com/gpu" in cap:
        labels["nvidia.com/gpu.present"] = "true"
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            "spec": {}, "status": node_status(name, cap, kubelet_port, kubernetes_version, host_ip)}


def node_status(name: str, cap: dict[str, str], kubelet_port: int, kubernetes_version: str,
                host_ip: str = "127.0.0.1") -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def condition(kind: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
        return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message,
                "lastHeartbeatTime": now, "lastTransitionTime": now}

    return {
        "capacity": cap, "allocatable": cap,
        "conditions": [
            condition("MemoryPressure", False, "KubeletHasSufficientMemory", "process node"),
            condition("DiskPressure", False, "KubeletHasNoDiskPressure", "process node"),
            condition("PIDPressure", False, "KubeletHasSufficientPID", "process node"),
            condition("Ready", True, "KubeletReady", "mmalign process node is posting ready status"),
        ],
        "addresses": [{"type": "InternalIP", "address": host_ip}, {"type": "Hostname", "address": name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "nodeInfo": {"machineID": name, "systemUUID": name, "bootID": secrets.token_hex(8),
                     "kernelVersion": platform.release(), "osImage": "mmalign process node",
                     "containerRuntimeVersion": RUNTIME_VERSION,
                     "kubeletVersion": kubernetes_version, "kubeProxyVersion": "",
                     "operatingSystem": "linux", "architecture": "amd64"},
    }


def lease_object(name: str, node_uid: str) -> dict[str, Any]:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease",
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name,
                                              "uid": node_uid}]},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_time()}}


def micro_time() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def event(obj: dict[str, Any], kind: str, reason: str, message: str, component: str, host: str = "") -> dict[str, Any]:
    """A core/v1 Event about `obj`, as `kubectl describe` and `kubectl get events` show them."""
    meta = obj["metadata"]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta.get("namespace")},
            "involvedObject": {"apiVersion": obj.get("apiVersion", "v1"), "kind": obj.get("kind", "Pod"),
                               "name": meta["name"], "namespace": meta.get("namespace"), "uid": meta.get("uid")},
            "type": kind, "reason": reason, "message": message, "count": 1,
            "firstTimestamp": now, "lastTimestamp": now, "source": {"component": component, "host": host},
            "reportingComponent": component, "reportingInstance": host or component}


def node_view(node: dict[str, Any], used: dict[str, Decimal]) -> NodeView:
    return NodeView(name=node["metadata"]["name"], labels=node["metadata"].get("labels") or {},
                    allocatable={k: parse_quantity(v) for k, v in node["status"].get("allocatable", {}).items()},
                    taints=node.get("spec", {}).get("taints") or [],
                    unschedulable=bool(node.get("spec", {}).get("unschedulable")), used=used)


class AddressPool:
    """Pod addresses from a /16 of the loopback network (all of 127/8 reaches `lo` on Linux)."""

    def __init__(self, network: str):
        self.network = ipaddress.ip_network(network)
        self.used: set[str] = set()
        self._hosts = self.network.hosts()

    def allocate(self) -> str:
        for _ in range(2):
            for address in self._hosts:
                text = str(address)
                if text not in self.used and not text.endswith((".0", ".1", ".255")):
                    self.used.add(text)
                    return text
            self._hosts = self.network.hosts()  # wrapped around: reuse released addresses
        raise RuntimeError(f"no free pod address left in {self.network}")

    def release(self, address: str) -> None:
        self.used.discard(address)
