"""Cluster DNS for the process node: a hosts file rendered from Pods and Services, and the C shim that
makes libc (so Python, torch c10d and gloo alike) read it. See dns_shim.c for why LD_PRELOAD.

Records follow the Kubernetes DNS spec for what the operator uses:
- `<hostname>.<subdomain>.<ns>.svc.cluster.local` for a pod whose `subdomain` names a headless Service
  in its namespace (hostname defaults to the pod name);
- `<service>.<ns>.svc.cluster.local` -> the addresses of the Service's pods (headless or not: there is
  no kube-proxy, so a ClusterIP Service resolves to its pods too and works when port == targetPort);
  only ready pods, unless the Service sets `publishNotReadyAddresses`;
- `<a-b-c-d>.<ns>.pod.cluster.local`, and `kubernetes.default.svc.cluster.local` -> the API server.
Short names (`svc`, `host.sub`, `svc.ns`) resolve through the pod's search domains, as with resolv.conf.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

CLUSTER_DOMAIN = "cluster.local"


def search_domains(namespace: str) -> str:
    return f"{namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}"


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _live(pod: dict[str, Any]) -> bool:
    status = pod.get("status", {})
    return bool(status.get("podIP")) and status.get("phase") not in ("Succeeded", "Failed") \
        and not pod["metadata"].get("deletionTimestamp")


def _selects(service: dict[str, Any], pod: dict[str, Any]) -> bool:
    selector = service.get("spec", {}).get("selector") or {}
    labels = pod["metadata"].get("labels") or {}
    return bool(selector) and pod["metadata"]["namespace"] == service["metadata"]["namespace"] \
        and all(labels.get(k) == v for k, v in selector.items())


def render_hosts(pods: list[dict[str, Any]], services: list[dict[str, Any]], apiserver_ip: str = "127.0.0.1") -> str:
    """The hosts file: one `IP name...` line per address; a name with several addresses repeats."""
    records: dict[str, list[str]] = {}

    def add(name: str, ip: str) -> None:
        records.setdefault(name, [])
        if ip not in records[name]:
            records[name].append(ip)

    add(f"kubernetes.default.svc.{CLUSTER_DOMAIN}", apiserver_ip)
    headless = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in services
                if s.get("spec", {}).get("clusterIP") == "None"}
    live = [p for p in pods if _live(p)]
    for pod in live:
        meta, spec, ip = pod["metadata"], pod["spec"], pod["status"]["podIP"]
        ns = meta["namespace"]
        add(f"{ip.replace('.', '-')}.{ns}.pod.{CLUSTER_DOMAIN}", ip)
        service = headless.get((ns, spec.get("subdomain", "")))
        if service and (_ready(pod) or service["spec"].get("publishNotReadyAddresses")):
            add(f"{spec.get('hostname') or meta['name']}.{spec['subdomain']}.{ns}.svc.{CLUSTER_DOMAIN}", ip)
    for service in services:
        meta = service["metadata"]
        for pod in live:
            if _selects(service, pod) and (_ready(pod) or service["spec"].get("publishNotReadyAddresses")):
                add(f"{meta['name']}.{meta['namespace']}.svc.{CLUSTER_DOMAIN}", pod["status"]["podIP"])
    lines = [f"{ip} {name}" for name, ips in sorted(records.items()) for ip in ips]
    return "# written by the mmalign process node; re-read at every lookup\n" + "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Readers (the shim, in every pod) must never see half a file."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pod_dns_env(hostname: str, pod_ip: str, namespace: str, hosts_file: Path, shim: Path) -> dict[str, str]:
    return {"LD_PRELOAD": str(shim), "MMALIGN_HOSTS_FILE": str(hosts_file),
            "MMALIGN_DNS_SEARCH": search_domains(namespace), "MMALIGN_HOSTNAME": hostname,
            "MMALIGN_POD_IP": pod_ip, "HOSTNAME": hostname}


def shim_source() -> str:
    return resources.files("mmalign.devcluster").joinpath("dns_shim.c").read_text()


def build_shim(lib_dir: Path) -> Path:
    """Compile dns_shim.c once per source version into the cache (a few hundred ms with gcc)."""
    source = shim_source()
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    lib = lib_dir / f"libmmalign_dns-{digest}.so"
    if lib.exists():
        return lib
    lib_dir.mkdir(parents=True, exist_ok=True)
    src = lib_dir / f"dns_shim-{digest}.c"
    src.write_text(source)
    tmp = lib.with_name(lib.name + f".{os.getpid()}.tmp")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(tmp), str(src), "-ldl"], check=True)
    os.replace(tmp, lib)
    return lib
