"""Pure parts of the dev cluster: pod phase, node objects, addresses, log tailing, command lines, builds."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from mmalign.devcluster import binaries, components, nodes
from mmalign.devcluster.kubeletserver import tail_bytes
from mmalign.devcluster.podrunner import ContainerRun, pod_phase


def run(state: dict, restarts: int = 0, init: bool = False) -> ContainerRun:
    return ContainerRun({"name": "c"}, init, Path("/x"), state=state, restarts=restarts)


RUNNING = {"running": {"startedAt": "t"}}
WAITING = {"waiting": {"reason": "ContainerCreating"}}
BACKOFF = {"waiting": {"reason": "CrashLoopBackOff"}}


def done(code: int) -> dict:
    return {"terminated": {"exitCode": code}}


@pytest.mark.parametrize(("policy", "init", "main", "phase"), [
    ("Never", [], [WAITING], "Pending"),
    ("Never", [], [RUNNING], "Running"),
    ("Never", [], [done(0)], "Succeeded"),
    ("Never", [], [done(1)], "Failed"),
    ("Never", [], [done(0), RUNNING], "Running"),
    ("Never", [], [done(0), done(2)], "Failed"),
    ("OnFailure", [], [done(0)], "Succeeded"),
    ("OnFailure", [], [(BACKOFF, 1)], "Running"),
    ("Always", [], [done(0)], "Running"),
    ("Never", [done(1)], [WAITING], "Failed"),
    ("OnFailure", [done(1)], [WAITING], "Pending"),
    ("Never", [RUNNING], [WAITING], "Pending"),
    ("Never", [done(0)], [RUNNING], "Running"),
])
def test_pod_phase(policy, init, main, phase):
    def make(item, is_init):
        state, restarts = item if isinstance(item, tuple) else (item, 0)
        return run(state, restarts, is_init)

    assert pod_phase(policy, [make(i, True) for i in init], [make(m, False) for m in main]) == phase


def test_container_status_and_log_files():
    c = ContainerRun({"name": "main", "image": "img:1"}, False, Path("/logs/main"), state=RUNNING, restarts=2,
                     last_state={"terminated": {"exitCode": 1}})
    status = c.status()
    assert status["ready"] and status["restartCount"] == 2 and status["lastState"]["terminated"]["exitCode"] == 1
    assert c.log_file() == Path("/logs/main/2.log") and c.log_file(previous=True) == Path("/logs/main/1.log")


def test_node_object_and_capacity():
    cap = nodes.capacity("8", "32Gi", 2, 500)
    node = nodes.node_object("process-node-0", cap, 10250, "v1.37.2")
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == 10250
    assert node["metadata"]["labels"][nodes.NODE_LABEL] == "true"
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready[0]["status"] == "True"
    assert "nvidia.com/gpu" not in nodes.capacity("8", "32Gi", 0, 500)


def test_address_pool_skips_network_and_reuses_released():
    pool = nodes.AddressPool("127.42.0.0/16")
    first, second = pool.allocate(), pool.allocate()
    assert (first, second) == ("127.42.0.2", "127.42.0.3")
    pool.release(first)
    assert pool.allocate() == "127.42.0.4"  # no immediate reuse: a late lookup must not hit a new pod
    small = nodes.AddressPool("127.42.0.0/29")
    got = [small.allocate() for _ in range(5)]
    assert got == ["127.42.0.2", "127.42.0.3", "127.42.0.4", "127.42.0.5", "127.42.0.6"]
    small.release("127.42.0.3")
    assert small.allocate() == "127.42.0.3"  # wrapped around
    with pytest.raises(RuntimeError, match="no free pod address"):
        small.allocate()


@pytest.mark.parametrize(("tail", "limit", "expected"), [
    (None, None, b"a\nb\nc\n"), (2, None, b"b\nc\n"), (0, None, b""), (None, 3, b"a\nb"), (1, 1, b"c"),
])
def test_tail_bytes(tail, limit, expected):
    assert tail_bytes(b"a\nb\nc\n", tail, limit) == expected


def test_event_names_the_object():
    event = nodes.event({"metadata": {"name": "p", "namespace": "ns", "uid": "u"}}, "Warning", "FailedScheduling",
                        "no", "default-scheduler")
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "name": "p", "namespace": "ns", "uid": "u"}
    assert event["metadata"]["name"].startswith("p.")


PORTS = {name: 20000 + i for i, name in enumerate(components.PORT_NAMES)}


def test_component_command_lines_stay_on_loopback_with_rbac(tmp_path: Path):
    layout = components.Layout(tmp_path, Path("/cache/bin"))
    api = components.apiserver(layout, PORTS)
    assert api[0] == "/cache/bin/kube-apiserver"
    assert "--authorization-mode=RBAC" in api and "--bind-address=127.0.0.1" in api
    assert "--anonymous-auth=false" in api
    assert any(a.startswith("--service-account-signing-key-file=") for a in api)
    weed = components.seaweedfs(layout, PORTS)
    assert "-ip.bind=127.0.0.1" in weed and f"-s3.port={PORTS['s3']}" in weed
    assert all("127.0.0.1" in a for a in components.etcd(layout, PORTS) if "urls" in a)
    assert "--leader-elect=false" in components.controller_manager(layout)


def test_shell_env_puts_the_cached_tools_first():
    env = components.shell_env(Path("/s/kubeconfig"), ["/cache/bin", "/venv/bin"], 9000,
                               "/usr/bin:/cache/bin:/bin")
    assert env["PATH"] == "/cache/bin:/venv/bin:/usr/bin:/bin"
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["KUBECONFIG"] == "/s/kubeconfig"
    assert set(env) == {"KUBECONFIG", "PATH", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                        "AWS_DEFAULT_REGION"}


KUBERNETES_GO_MOD = """module k8s.io/kubernetes

go 1.26.0

require (
\tk8s.io/api v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/apimachinery => ./staging/src/k8s.io/apimachinery
\tk8s.io/cri-client => ./staging/src/k8s.io/cri-client
\tgithub.com/other/thing => github.com/other/thing v1.0.0
)
"""


def test_staging_replacements_come_from_the_release_go_mod():
    assert binaries.staging_replacements(KUBERNETES_GO_MOD) == ["k8s.io/api", "k8s.io/apimachinery",
                                                                 "k8s.io/cri-client"]
    assert binaries.go_directive(KUBERNETES_GO_MOD) == "1.26.0"
    assert binaries.staging_version("v1.37.2") == "v0.37.2"


def test_wrapper_go_mod_and_version_stamps():
    text = binaries.wrapper_go_mod("m", "1.26.0", {"k8s.io/kubernetes": "v1.37.2"}, {"k8s.io/api": "v0.37.2"})
    assert "\tk8s.io/kubernetes v1.37.2\n" in text and "\tk8s.io/api => k8s.io/api v0.37.2\n" in text
    flags = binaries.kube_ldflags("v1.37.2", dt.datetime(2026, 1, 2, tzinfo=dt.UTC))
    assert "-X k8s.io/component-base/version.gitVersion=v1.37.2" in flags
    assert "-X k8s.io/component-base/version.gitMinor=37" in flags
    assert "buildDate=2026-01-02T00:00:00Z" in flags


def test_peak_memory_from_time_v():
    assert binaries.parse_peak_rss_kib("\tMaximum resident set size (kbytes): 2357248\n") == 2357248
    assert binaries.parse_peak_rss_kib("nothing") is None


def test_cache_dir_honours_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path / "c"))
    assert binaries.bin_dir() == tmp_path / "c" / "bin"
    monkeypatch.delenv("MMALIGN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert binaries.cache_dir() == tmp_path / "x" / "mmalign"
