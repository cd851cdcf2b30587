"""Cluster DNS of the process node: hosts-file rendering (pure) and the LD_PRELOAD shim (gcc + libc)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmalign.devcluster import dns


def pod(name, ip, ns="ml", ready=True, phase="Running", labels=None, **spec):
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {"metadata": {"name": name, "namespace": ns, "labels": labels or {"app": "w"}}, "spec": spec,
            "status": {"podIP": ip, "phase": phase, "conditions": conditions}}


def service(name, ns="ml", headless=True, publish=False, selector=None):
    spec = {"selector": selector or {"app": "w"}, "publishNotReadyAddresses": publish}
    spec["clusterIP"] = "None" if headless else "10.96.0.10"
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def records(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            ip, name = line.split()
            out.setdefault(name, []).append(ip)
    return out


def test_headless_service_pod_hostnames_and_service_names():
    pods = [pod("j-0", "127.9.0.2", hostname="w0", subdomain="grp"), pod("j-1", "127.9.0.3", subdomain="grp")]
    got = records(dns.render_hosts(pods, [service("grp")]))
    assert got["w0.grp.ml.svc.cluster.local"] == ["127.9.0.2"]
    assert got["j-1.grp.ml.svc.cluster.local"] == ["127.9.0.3"]  # hostname defaults to the pod name
    assert got["grp.ml.svc.cluster.local"] == ["127.9.0.2", "127.9.0.3"]
    assert got["127-9-0-2.ml.pod.cluster.local"] == ["127.9.0.2"]
    assert got["kubernetes.default.svc.cluster.local"] == ["127.0.0.1"]


def test_subdomain_without_its_headless_service_gets_no_name():
    got = records(dns.render_hosts([pod("a", "127.9.0.2", subdomain="grp")], [service("grp", headless=False)]))
    assert "a.grp.ml.svc.cluster.local" not in got
    assert got["grp.ml.svc.cluster.local"] == ["127.9.0.2"]  # no kube-proxy: a ClusterIP name -> its pods


def test_readiness_and_publish_not_ready_addresses():
    pods = [pod("a", "127.9.0.2", ready=False, subdomain="grp")]
    assert "grp.ml.svc.cluster.local" not in records(dns.render_hosts(pods, [service("grp")]))
    got = records(dns.render_hosts(pods, [service("grp", publish=True)]))
    assert got["a.grp.ml.svc.cluster.local"] == got["grp.ml.svc.cluster.local"] == ["127.9.0.2"]


def test_finished_deleted_other_namespace_and_unselected_pods_are_left_out():
    pods = [pod("done", "127.9.0.2", phase="Succeeded"), pod("other-ns", "127.9.0.3", ns="x"),
            pod("other-app", "127.9.0.4", labels={"app": "z"}), pod("no-ip", "")]
    deleting = pod("deleting", "127.9.0.5")
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    got = records(dns.render_hosts([*pods, deleting], [service("grp")]))
    assert "grp.ml.svc.cluster.local" not in got


def test_search_domains():
    assert dns.search_domains("ml") == "ml.svc.cluster.local svc.cluster.local cluster.local"


PROBE = """
import json, os, socket, sys
hosts = os.environ["MMALIGN_HOSTS_FILE"]
def lookup(name):
    try:
        return sorted({a[4][0] for a in socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)})
    except socket.gaierror:
        return []
out = {"hostname": socket.gethostname(), "uname": os.uname().nodename}
for name in ["w1.grp", "grp", "w0", "grp.ml", "w1.grp.ml.svc.cluster.local.", "localhost", "late"]:
    out[name] = lookup(name)
out["byname"] = socket.gethostbyname("w1.grp")
with open(hosts, "a") as f:  # a pod that appears later: the running process sees it at once
    f.write("127.9.0.9 late.ml.svc.cluster.local\\n")
out["late-after"] = lookup("late")
print(json.dumps(out))
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="the shim is compiled with gcc")
def test_shim_resolves_cluster_names_for_libc_callers(tmp_path: Path):
    shim = dns.build_shim(tmp_path / "lib")
    assert dns.build_shim(tmp_path / "lib") == shim  # cached by source hash
    hosts = tmp_path / "hosts"
    pods = [pod("w0", "127.9.0.2", hostname="w0", subdomain="grp"), pod("w1", "127.9.0.3", subdomain="grp")]
    dns.write_atomically(hosts, dns.render_hosts(pods, [service("grp")]))
    env = dns.pod_dns_env("w0", "127.9.0.2", "ml", hosts, shim)
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    got = json.loads(result.stdout)
    assert got["hostname"] == got["uname"] == "w0"
    assert got["w1.grp"] == ["127.9.0.3"] and got["w0"] == ["127.9.0.2"]
    assert got["grp"] == got["grp.ml"] == ["127.9.0.2", "127.9.0.3"]
    assert got["w1.grp.ml.svc.cluster.local."] == ["127.9.0.3"]
    assert got["localhost"] and got["late"] == []
    assert got["byname"] == "127.9.0.3"
    assert got["late-after"] == ["127.9.0.9"]


PORT_PROBE = """
import socket, sys
port = int(sys.argv[1])
server = socket.socket(socket.AF_INET6)
server.bind(("::", port))  # a wildcard bind, as torch's TCPStore does
server.listen()
print(server.getsockname()[0], flush=True)
client = socket.create_connection(("localhost", port), timeout=5)  # "localhost" reaches the pod itself
print(client.getpeername()[0], flush=True)
sys.stdin.read()  # hold the port until the test has started the other pod
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="the shim is compiled with gcc")
def test_shim_gives_each_pod_its_own_ports(tmp_path: Path):
    shim = dns.build_shim(tmp_path / "lib")
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    pods = []
    for ip in ("127.9.0.2", "127.9.0.3"):
        env = dns.pod_dns_env("p", ip, "ml", hosts, shim)
        pods.append(subprocess.Popen([sys.executable, "-c", PORT_PROBE, port], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True))
        assert pods[-1].stdout.readline().strip() == f"::ffff:{ip}"
        assert pods[-1].stdout.readline().strip() == ip
    for proc in pods:
        proc.communicate("", timeout=10)
        assert proc.returncode == 0
