"""The real node (`mmalign dev up --node real`): a real kubelet on containerd + runc runs the project's
image, and `dev down` leaves nothing behind.

Opt-in while the process node is the default: runs when MMALIGN_NODE=real (as root), e.g.

    MMALIGN_NODE=real .venv/bin/pytest tests/integration/test_realnode.py -q

Missing binaries and images are built first (minutes, once per machine); a failure then fails loudly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from mmalign import __version__
from mmalign.api import keys
from mmalign.devcluster import binaries, cluster, demo, images, realnode
from mmalign.devcluster.testing import create_namespace, wait_for, wait_pod_phase

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.environ.get(cluster.NODE_ENV) != "real",
        reason="the real node is opt-in: MMALIGN_NODE=real (as root) runs these",
    ),
]

REPO = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((REPO / "charts/mmalign/values.yaml").read_text())["operator"]


class RealNode:
    def __init__(self, dev: cluster.DevCluster, image: str) -> None:
        self.dev, self.image = dev, image


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    binaries.ensure_all()
    binaries.ensure_real_node()
    image = images.project_image(REPO, target="operator")
    started = time.monotonic()
    dev = cluster.up(tmp_path_factory.mktemp("real"), node="real", timeout=180)
    print(f"\n[real node] up in {time.monotonic() - started:.1f}s")
    try:
        timings = images.ensure_pulled(dev.node_layout, image)
        print(f"[real node] operator image {image} through the node's registry: {timings}")
        yield RealNode(dev, image)
    finally:
        dev.down()


def _pod(name: str, image: str, command: list[str], pull: str = "Never", **spec: Any) -> dict[str, Any]:
    container = {
        "name": "main",
        "image": image,
        "imagePullPolicy": pull,
        "command": command,
        "securityContext": VALUES["securityContext"],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": VALUES["podSecurityContext"],
            "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
            **spec,
        },
    }


def _create(real: RealNode, namespace: str, body: dict[str, Any]) -> None:
    plural = {"Pod": "pods", "Service": "services"}[body["kind"]]
    real.dev.api().create(f"/api/v1/namespaces/{namespace}/{plural}", body)


def _logs(real: RealNode, namespace: str, pod: str) -> str:
    got = real.dev.kubectl("logs", "-n", namespace, pod)
    assert got.returncode == 0, got.stderr
    return got.stdout


def test_the_node_is_a_real_kubelet_on_containerd(real: RealNode) -> None:
    nodes = real.dev.api().get("/api/v1/nodes")["items"]
    assert [n["metadata"]["name"] for n in nodes] == [realnode.NODE_NAME]
    info = nodes[0]["status"]["nodeInfo"]
    assert info["kubeletVersion"] == binaries.KUBERNETES_VERSION
    assert info["containerRuntimeVersion"] == f"containerd://{binaries.CONTAINERD_VERSION.lstrip('v')}"
    ready = {c["type"]: c["status"] for c in nodes[0]["status"]["conditions"]}
    assert ready["Ready"] == "True"


def test_the_project_image_runs_as_non_root_under_the_charts_security_context(real: RealNode) -> None:
    namespace = create_namespace(real.dev, "nonroot")
    # Always: the kubelet asks the node's registry for the manifest (containerd's hosts.toml maps the
    # image's `localhost` host there); a wrong mapping is ErrImagePull, not a pod that runs.
    command = ["sh", "-c", "id -u; id -g; mmalign --version"]
    _create(real, namespace, _pod("version", real.image, command, pull="Always"))
    assert wait_pod_phase(real.dev, namespace, "version", ("Succeeded", "Failed"), 120) == "Succeeded"
    assert _logs(real, namespace, "version").split() == ["1000", "1000", __version__]


def test_the_termination_message_reaches_the_pod_status(real: RealNode) -> None:
    namespace = create_namespace(real.dev, "termmsg")
    script = "echo 'exit 3: the reason' > /dev/termination-log; exit 3"
    _create(real, namespace, _pod("fails", real.image, ["sh", "-c", script]))
    assert wait_pod_phase(real.dev, namespace, "fails", ("Succeeded", "Failed"), 120) == "Failed"
    pod = real.dev.api().get(f"/api/v1/namespaces/{namespace}/pods/fails")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["message"].strip() == "exit 3: the reason"


def test_a_headless_service_resolves_from_a_pod(real: RealNode) -> None:
    namespace = create_namespace(real.dev, "dns")
    _create(
        real,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "peers"},
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": {"app": "server"},
                "ports": [{"port": 29500}],
            },
        },
    )
    _create(
        real, namespace, _pod("server", real.image, ["sleep", "120"], hostname="server", subdomain="peers")
    )
    wait_pod_phase(real.dev, namespace, "server", ("Running",), 120)
    server_ip = real.dev.api().get(f"/api/v1/namespaces/{namespace}/pods/server")["status"]["podIP"]
    lookup = (
        "import socket, json; print(json.dumps([socket.gethostbyname('peers'), "
        f"socket.gethostbyname('server.peers.{namespace}.svc.cluster.local')]))"
    )
    _create(real, namespace, _pod("client", real.image, ["python3", "-c", lookup]))
    assert wait_pod_phase(real.dev, namespace, "client", ("Succeeded", "Failed"), 120) == "Succeeded", _logs(
        real, namespace, "client"
    )
    assert json.loads(_logs(real, namespace, "client")) == [server_ip, server_ip]


# ---------------------------------------------------------------- the operator as a real pod, by Helm

CHART = REPO / "charts/mmalign"
RELEASE, SYSTEM_NS = "mmalign-rn", "mmalign-rn-system"
INSTANCE = f"app.kubernetes.io/instance={RELEASE}"
JOB = "tiny-real"
# Namespaced kinds the chart makes; cluster-wide ones are checked by name after `helm uninstall`.
RELEASE_KINDS = "deploy,rs,pods,svc,sa,cm,secrets,roles,rolebindings"


def _helm(real: RealNode, *args: str) -> str:
    env = {**os.environ, **real.dev.env}
    helm = shutil.which("helm", path=env["PATH"])
    assert helm, f"no helm on the dev cluster's PATH ({env['PATH']}): run `make binaries`"
    proc = subprocess.run([helm, *args], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _kubectl_json(real: RealNode, *args: str) -> dict[str, Any]:
    got = real.dev.kubectl("get", *args, "-o", "json")
    assert got.returncode == 0, got.stderr
    return dict(json.loads(got.stdout))


def _describe(real: RealNode, namespace: str) -> str:
    parts = []
    for args in (
        ["get", "deploy,pods", "-n", SYSTEM_NS, "-o", "wide"],
        ["get", "aj,pods,svc", "-n", namespace],
        ["get", "events", "-n", SYSTEM_NS],
        ["logs", "-n", SYSTEM_NS, "-l", INSTANCE, "--tail=30"],
    ):
        got = real.dev.kubectl(*args)
        parts.append(f"$ kubectl {' '.join(args)}\n{got.stdout}{got.stderr}")
    return "\n".join(parts)


def _job_manifest(namespace: str) -> str:
    job = yaml.safe_load((REPO / "manifests/examples/tiny-cpu.yaml").read_text())
    job["metadata"] = {"name": JOB, "namespace": namespace}
    # Small requests: both pods fit the 2-CPU node beside the operator and CoreDNS, so the only reason
    # they wait is the image.
    job["spec"]["resources"]["requests"] = {"cpu": "100m", "memory": "256Mi", "nvidia.com/gpu": 0}
    return yaml.safe_dump(job)


def test_helm_installs_the_operator_as_a_real_pod_that_creates_a_jobs_pods(real: RealNode) -> None:
    """The chart's Deployment on a real kubelet: the slim operator image (imported, never pulled), its
    probes on kopf's /healthz, UID 1000, in-cluster config with the chart's ServiceAccount token; then an
    AlignmentJob gets its stage's pods and headless Service from that pod. Its trainer image does not
    exist, so the pods wait for it, and the job's status says which pods and why."""
    timings: dict[str, float] = {}
    last = time.monotonic()

    def step(what: str) -> None:
        nonlocal last
        now = time.monotonic()
        timings[what] = round(now - last, 1)
        last = now

    repository, tag = real.image.rsplit(":", 1)
    # A name no build makes (containerd keeps the real trainer image across `dev down`): never pulled.
    trainer_image = f"localhost/mmalign:absent-{images.content_key(REPO)}"
    _helm(
        real,
        "install",
        RELEASE,
        str(CHART),
        "-n",
        SYSTEM_NS,
        "--create-namespace",
        "--set",
        f"operator.image.repository={repository}",
        "--set",
        f"operator.image.tag={tag}",
        "--set",
        "operator.image.pullPolicy=Never",
        "--set",
        f"trainer.image={trainer_image}",
        "--set",
        "operator.logFormat=plain",
    )
    step("helm install")
    rollout = real.dev.kubectl(
        "-n", SYSTEM_NS, "rollout", "status", f"deployment/{RELEASE}", "--timeout=150s", timeout=170
    )
    assert rollout.returncode == 0, rollout.stderr + _describe(real, "default")
    step("operator pod Ready")

    (pod,) = _kubectl_json(real, "pods", "-n", SYSTEM_NS, "-l", INSTANCE)["items"]
    container = pod["spec"]["containers"][0]
    assert (container["image"], container["imagePullPolicy"]) == (real.image, "Never")
    assert pod["spec"]["serviceAccountName"] == RELEASE
    # Ready means the kubelet's httpGet probes of /healthz passed (the chart defines both).
    assert container["readinessProbe"]["httpGet"]["path"] == container["livenessProbe"]["httpGet"]["path"]
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and status["restartCount"] == 0, _describe(real, "default")
    uid = real.dev.kubectl("exec", "-n", SYSTEM_NS, pod["metadata"]["name"], "--", "id", "-u")
    assert uid.stdout.strip() == "1000", uid.stderr
    # What the probes ask, from inside the pod: kopf's endpoint on the chart's health port.
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
    probe = f"import urllib.request as u; r = u.urlopen('http://127.0.0.1:{port}/healthz'); print(r.status)"
    answer = real.dev.kubectl("exec", "-n", SYSTEM_NS, pod["metadata"]["name"], "--", "python3", "-c", probe)
    assert answer.stdout.strip() == "200", answer.stderr

    namespace = create_namespace(real.dev, "helmjob")
    real.dev.kubectl(
        "-n",
        namespace,
        "create",
        "secret",
        "generic",
        "s3-credentials",
        "--from-literal=AWS_ACCESS_KEY_ID=unused",
        "--from-literal=AWS_SECRET_ACCESS_KEY=unused",
        check=True,
    )
    applied = real.dev.kubectl("apply", "-f", "-", input=_job_manifest(namespace))
    assert applied.returncode == 0, applied.stderr

    def pending() -> dict[str, Any] | None:
        got = real.dev.kubectl("get", "aj", JOB, "-n", namespace, "-o", "json")
        job_status = json.loads(got.stdout).get("status", {}) if got.returncode == 0 else {}
        waiting = job_status.get("stages", {}).get("reward", {}).get("pendingPods", [])
        reasons = {p.get("reason") for p in waiting}
        return job_status if len(waiting) == 2 and reasons <= {"ErrImagePull", "ImagePullBackOff"} else None

    job_status = wait_for(
        pending, 150, interval=1, what="the job's status to name its 2 pods waiting for the image"
    )
    step("apply -> pendingPods with the image pull reason")
    pods = _kubectl_json(real, "pods", "-n", namespace, "-l", f"mmalign.io/job={JOB}")["items"]
    names = sorted(p["metadata"]["name"] for p in pods)
    assert sorted(p["name"] for p in job_status["stages"]["reward"]["pendingPods"]) == names
    assert {p["spec"]["containers"][0]["image"] for p in pods} == {trainer_image}
    service = _kubectl_json(real, "svc", "-n", namespace)["items"]
    assert [(s["spec"]["clusterIP"], s["spec"].get("publishNotReadyAddresses")) for s in service] == [
        ("None", True)
    ]
    condition = next(c for c in job_status["conditions"] if c["type"] == "PodsPending")
    assert condition["status"] == "True" and condition["reason"] in ("ErrImagePull", "ImagePullBackOff")
    assert names[0] in condition["message"], condition

    real.dev.kubectl("delete", "aj", JOB, "-n", namespace, "--wait=true", "--timeout=60s", check=True)
    _helm(real, "uninstall", RELEASE, "-n", SYSTEM_NS, "--wait", "--timeout=90s")
    step("helm uninstall")

    # The garbage collector deletes the ReplicaSet's pod after Helm returns; the operator exits on SIGTERM
    # within the chart's terminationGracePeriodSeconds.
    def left() -> list[str]:
        got = real.dev.kubectl("get", RELEASE_KINDS, "-n", SYSTEM_NS, "-l", INSTANCE, "-o", "name")
        cluster_wide = real.dev.kubectl(
            "get", "clusterroles,clusterrolebindings", "-l", INSTANCE, "-o", "name"
        )
        return (got.stdout + cluster_wide.stdout).split()

    try:
        wait_for(lambda: not left(), 60, interval=1, what="nothing of the release left")
    except TimeoutError as err:
        raise AssertionError(f"{err}: {left()}") from err
    step("operator pod gone")
    print(
        f"\n[real node] operator by helm: {timings}; PodsPending: {condition['reason']}: {condition['message']}"
    )


# ---------------------------------------------------------------- the trainer image: real stages


@pytest.fixture(scope="module")
def trainer(real: RealNode) -> str:
    """The Dockerfile's runtime target (PyPI's CUDA torch stack, installed from the host's wheel cache)
    in the node's containerd, through the node's registry (only the layers it lacks move)."""
    started = time.monotonic()
    # MMALIGN_TEST_TRAINER_IMAGE: an image already built (e.g. from an earlier content key), to run the
    # stage tests without rebuilding after every source edit.
    image = os.environ.get("MMALIGN_TEST_TRAINER_IMAGE") or images.project_image(REPO, target="runtime")
    built = time.monotonic() - started
    timings = images.ensure_pulled(real.dev.node_layout, image)
    size = images.image_size(image)
    print(f"\n[real node] trainer image {image}: {size}, build {built:.1f}s, {timings}")
    return image


@pytest.fixture
def job_namespace(real: RealNode, tmp_path: Path) -> Iterator[str]:
    """A namespace with the CRD, the S3 credentials Secret (pods reach SeaweedFS at the namespace's veth
    address) and `mmalign operator` on the host watching it."""
    crd = real.dev.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "manifests/crds/alignmentjobs.yaml")
    )
    assert crd.returncode == 0, crd.stderr
    # Polled, not `kubectl wait`: that fails at once while the new CRD has no status.conditions yet.
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/alignmentjobs.mmalign.io"

    def established() -> bool:
        conditions = real.dev.api().get(path).get("status", {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    wait_for(established, 120, interval=1, what="the AlignmentJob CRD to be Established")
    namespace = create_namespace(real.dev, "trainer")
    env = demo.s3_env(real.dev)
    s3 = boto3.client("s3", **real.dev.s3_credentials, endpoint_url=real.dev.s3_endpoint)
    if "mmalign" not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket="mmalign")
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3-credentials", "namespace": namespace},
        "stringData": env,
    }
    real.dev.kubectl("apply", "-f", "-", input=json.dumps(secret), check=True)
    log = tmp_path / "operator.log"
    with log.open("w") as out:
        operator = subprocess.Popen(
            [sys.executable, "-m", "mmalign", "operator", "--kubeconfig", str(real.dev.kubeconfig)]
            + ["--namespace", namespace, "--log-format", "plain"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **real.dev.env, **_chart_trainer_env(real)},
        )
    try:
        yield namespace
    finally:
        operator.terminate()
        operator.wait(30)
        print(log.read_text()[-6000:])  # shown by pytest when the test failed


def _chart_trainer_env(real: RealNode) -> dict[str, str]:
    """The trainer pods' securityContexts as the chart's Deployment hands them to the operator."""
    rendered = _helm(real, "template", RELEASE, str(CHART), "--show-only", "templates/deployment.yaml")
    container = yaml.safe_load(rendered)["spec"]["template"]["spec"]["containers"][0]
    wanted = ("MMALIGN_TRAINER_POD_SECURITY_CONTEXT", "MMALIGN_TRAINER_SECURITY_CONTEXT")
    found = {e["name"]: e["value"] for e in container["env"] if e["name"] in wanted}
    assert set(found) == set(wanted), container["env"]
    return found


def _tiny_job(name: str, image: str, namespace: str, **resources: Any) -> str:
    """manifests/examples/tiny-cpu.yaml's reward stage on 2 pods of `image`, checkpointing to the dev S3."""
    job = yaml.safe_load((REPO / "manifests/examples/tiny-cpu.yaml").read_text())
    job["metadata"] = {"name": name, "namespace": namespace}
    spec = job["spec"]
    spec["image"] = image
    spec["storage"]["uri"] = f"s3://mmalign/{namespace}/{name}/"
    spec["stages"] = {"reward": spec["stages"]["reward"]}
    spec["resources"].update(resources)
    spec["runPolicy"].update(backoffLimit=0, cleanPodsAfterFinished=False)
    return yaml.safe_dump(job)


def _job_status(real: RealNode, namespace: str, name: str) -> dict[str, Any]:
    return dict(_kubectl_json(real, "aj", name, "-n", namespace).get("status", {}))


def _finished(real: RealNode, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status = _job_status(real, namespace, name)
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    try:
        finished: dict[str, Any] = wait_for(done, timeout, interval=2, what=f"AlignmentJob {name} to finish")
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{_describe(real, namespace)}") from err
    return finished


def test_a_reward_stage_runs_from_the_trainer_image_and_checkpoints_to_s3(
    real: RealNode, trainer: str, job_namespace: str
) -> None:
    """2 pods of the trainer image started by the real kubelet: `mmalign launch` under the chart's
    trainer securityContext (UID 1000, seccomp RuntimeDefault, no new privileges, no capabilities, a
    read-only root with /tmp an emptyDir), /dev/shm an in-memory emptyDir, torchrun's rendezvous at the
    headless Service's name through CoreDNS, the reward model written to SeaweedFS, the job Succeeded."""
    name, namespace = "reward-real", job_namespace
    requests = {"cpu": "500m", "memory": "1Gi", "nvidia.com/gpu": 0}
    applied = time.monotonic()
    real.dev.kubectl(
        "apply", "-f", "-", input=_tiny_job(name, trainer, namespace, requests=requests), check=True
    )

    def running() -> list[dict[str, Any]] | None:
        pods = _kubectl_json(real, "pods", "-n", namespace, "-l", f"mmalign.io/job={name}")["items"]
        up = [p for p in pods if p["status"].get("phase") == "Running"]
        return up if len(up) == 2 else None

    pods = wait_for(running, 300, interval=1, what="both trainer pods Running")
    started = time.monotonic() - applied
    master, worker = sorted(pods, key=lambda p: p["metadata"]["name"])  # node ranks 0 and 1
    pod = master["metadata"]["name"]
    # The same image also starts the operator (its `operator` extra is installed): its CLI answers.
    script = (
        "id -u; grep ' /dev/shm ' /proc/mounts; mmalign operator --help | head -n 1; "
        "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; "
        "touch /written 2>/dev/null && echo root-writable || echo root-read-only; "
        "touch /tmp/written && echo tmp-writable"
    )
    inside = real.dev.kubectl("exec", "-n", namespace, pod, "--", "sh", "-c", script)
    assert inside.returncode == 0, inside.stderr
    uid, shm, usage, *security = inside.stdout.splitlines()
    assert uid == "1000" and shm.split()[2] == "tmpfs", inside.stdout
    assert usage.startswith("usage: mmalign operator"), inside.stdout
    # seccomp mode 2 = a filter (RuntimeDefault); no effective capability; no privilege escalation
    assert [line.split() for line in security] == [
        ["CapEff:", "0000000000000000"],
        ["NoNewPrivs:", "1"],
        ["Seccomp:", "2"],
        ["root-read-only"],
        ["tmp-writable"],
    ], inside.stdout
    chart = yaml.safe_load((REPO / "charts/mmalign/values.yaml").read_text())["trainer"]
    assert master["spec"]["securityContext"] == chart["podSecurityContext"], master["spec"]
    assert master["spec"]["containers"][0]["securityContext"] == chart["securityContext"]
    container = worker["spec"]["containers"][0]
    assert container["image"] == trainer and container["command"][:2] == ["mmalign", "launch"], container
    # torchrun's rendezvous address: node 0's name under the headless Service, answered by CoreDNS.
    address = next(e["value"] for e in container["env"] if e["name"] == keys.ENV_MASTER_ADDR)
    assert address.startswith(f"{pod}.") and address.endswith(f".{namespace}.svc"), address
    lookup = f"import socket; print(socket.gethostbyname({address!r}))"
    resolved = real.dev.kubectl(
        "exec", "-n", namespace, worker["metadata"]["name"], "--", "python3", "-c", lookup
    )
    assert resolved.stdout.strip() == master["status"]["podIP"], resolved.stderr

    status = _finished(real, namespace, name, 900)
    assert status["phase"] == "Succeeded", f"{status}\n{_describe(real, namespace)}"
    finished = time.monotonic() - applied
    reward = status["stages"]["reward"]
    assert reward["phase"] == "Succeeded" and reward["attempt"] == 0, reward
    s3 = boto3.client("s3", **real.dev.s3_credentials, endpoint_url=real.dev.s3_endpoint)
    objects = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket="mmalign", Prefix=f"{namespace}/{name}/").get("Contents", [])
    ]
    assert any(k.endswith(".safetensors") for k in objects), objects
    print(
        f"\n[real node] reward stage: pods Running {started:.1f}s, Succeeded {finished:.1f}s after apply; "
        f"{len(objects)} objects in S3; artifact {reward.get('artifact')}"
    )


def test_a_trainer_over_its_memory_limit_is_oomkilled_and_the_job_says_so(
    real: RealNode, trainer: str, job_namespace: str
) -> None:
    """The real kernel kills the trainer at its container's memory limit; the kubelet's OOMKilled reaches
    the job's status with the limit to raise."""
    name, namespace = "oom-real", job_namespace
    resources = {
        "requests": {"cpu": "100m", "memory": "160Mi", "nvidia.com/gpu": 0},
        "limits": {"memory": "160Mi"},
    }
    real.dev.kubectl("apply", "-f", "-", input=_tiny_job(name, trainer, namespace, **resources), check=True)
    status = _finished(real, namespace, name, 300)
    assert status["phase"] == "Failed", status
    pods = _kubectl_json(real, "pods", "-n", namespace, "-l", f"mmalign.io/job={name}")["items"]
    reasons = {
        s["state"].get("terminated", {}).get("reason")
        for p in pods
        for s in p["status"].get("containerStatuses", [])
    }
    assert "OOMKilled" in reasons, pods
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert "OOMKilled" in failed["message"] and "memory limit 160Mi" in failed["message"], failed
    assert "spec.resources.limits.memory" in failed["message"], failed
    print(f"\n[real node] OOM: {failed['reason']}: {failed['message']}")


def test_dev_down_leaves_no_process_mount_cgroup_netns_or_interface(real: RealNode) -> None:
    namespace = create_namespace(real.dev, "down")
    _create(real, namespace, _pod("running", real.image, ["sleep", "300"]))
    wait_pod_phase(real.dev, namespace, "running", ("Running",), 120)
    real.dev.down()
    assert realnode.leftovers(real.dev.node_layout) == []
    assert [name for name, alive in real.dev.alive().items() if alive] == []
    assert not real.dev.state_dir.exists()
