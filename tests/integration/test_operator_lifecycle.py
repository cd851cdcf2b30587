"""The operator against the real local control plane (the `dev_cluster` fixture), with a stub trainer.

Each test gets its own namespace and its own `mmalign operator` subprocess watching only that
namespace, started exactly as a user would (admin kubeconfig), with `--trainer-command` pointing at
tests/integration/operator_stub_trainer.py so a stage takes about a second.

On either node (the same assertions):

    .venv/bin/pytest tests/integration/test_operator_lifecycle.py -q                   # process node
    MMALIGN_NODE=real .venv/bin/pytest tests/integration/test_operator_lifecycle.py -q # real node (root)

On the real node the stub runs in containers of the project's slim operator image (built for the
current source and imported into containerd first), delivered by a ConfigMap mounted at /stub, under
the chart's trainer securityContext (`StubTrainer`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STUB = Path(__file__).parent / "operator_stub_trainer.py"
GROUP, VERSION, PLURAL = "mmalign.io", "v1alpha1", "alignmentjobs"
JOB_LABEL = "mmalign.io/job"
# The credentials Secret of every test namespace: values that must never appear in a status or event.
ACCESS_KEY, SECRET_KEY = "stub-key", "stub-secret-never-in-a-message"


# ------------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as error:  # noqa: BLE001 - keep polling; report the last error
            last = error
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


STUB_CONFIG_MAP = "stub-trainer"  # on the real node: the stub's file, mounted at /stub in every pod


@dataclass(frozen=True)
class StubTrainer:
    """How the operator's pods run the stub: the trainer command, and the operator's environment."""

    command: str
    env: dict[str, str] = field(default_factory=dict)


def stub_trainer(dev_cluster: Any) -> StubTrainer:
    """Process node: this venv's python runs the file in place. Real node: the slim operator image (it
    has mmalign, no torch) runs it from the ConfigMap each test namespace gets, given to every trainer
    pod through the operator's pod defaults (what the chart's trainer.podDefaults sets), under the
    chart's trainer securityContext, exactly as the chart's Deployment passes it (as JSON)."""
    from mmalign.devcluster.testing import is_real_node, node_image

    if not is_real_node(dev_cluster):
        return StubTrainer(f"{sys.executable} {STUB}")
    defaults = {"spec": {
        "volumes": [{"name": "stub", "configMap": {"name": STUB_CONFIG_MAP}}],
        "containers": [{"name": "trainer", "volumeMounts": [{"name": "stub", "mountPath": "/stub", "readOnly": True}]}],
    }}
    chart = yaml.safe_load((REPO / "charts/mmalign/values.yaml").read_text())["trainer"]
    return StubTrainer(f"python3 /stub/{STUB.name}", {
        # MMALIGN_TEST_OPERATOR_IMAGE: an operator image built before (no rebuild after a source edit)
        "MMALIGN_TRAINER_IMAGE": node_image(dev_cluster, "operator", os.environ.get("MMALIGN_TEST_OPERATOR_IMAGE")),
        "MMALIGN_POD_DEFAULTS": json.dumps(defaults),
        "MMALIGN_TRAINER_POD_SECURITY_CONTEXT": json.dumps(chart["podSecurityContext"]),
        "MMALIGN_TRAINER_SECURITY_CONTEXT": json.dumps(chart["securityContext"]),
    })


class Operator:
    """`mmalign operator` as a subprocess watching one namespace."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path, *extra: str, stub: StubTrainer) -> None:
        self.kubeconfig, self.namespace, self.log, self.extra, self.stub = kubeconfig, namespace, log, extra, stub
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-m", "mmalign", "operator", "--kubeconfig", str(self.kubeconfig),
            "--namespace", self.namespace, "--liveness-port", "0", "--metrics-port", "0",
            "--log-format", "plain", "--resync-seconds", "2",
            "--trainer-command", self.stub.command, *self.extra,
        ]
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                            env={**os.environ, **self.stub.env})

    def wait_started(self) -> None:
        """Its start (imports, login) takes seconds, more under load (20-45 s at load 30): not part of a
        test's timeouts."""
        wait_for("the operator to start", lambda: "Initial authentication has finished" in self.log.read_text(), 90)

    def kill(self) -> None:
        """A crash: no graceful shutdown, nothing cleaned up."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class Env:
    """One test's namespace, its operator, and shortcuts to read the cluster."""

    def __init__(self, cluster: Any, namespace: str, operator: Operator) -> None:
        from kubernetes import client, config

        self.cluster, self.namespace, self.operator = cluster, namespace, operator
        api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = self.cluster.kubectl("-n", self.namespace, *args, input=input)
        if check:
            assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result

    def apply(self, document: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump(document))

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec})

    def job(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        return self.job(name).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), {})

    def pods(self, name: str) -> list[Any]:
        found = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOB_LABEL}={name}").items
        return sorted(found, key=lambda p: p.metadata.name)

    def live_pods(self, name: str) -> list[Any]:
        return [p for p in self.pods(name) if p.metadata.deletion_timestamp is None]

    def running(self, name: str, attempt: int | None = None, count: int = 2) -> list[Any]:
        pods = [p for p in self.live_pods(name) if p.status.phase == "Running"
                and (attempt is None or p.metadata.labels["mmalign.io/attempt"] == str(attempt))]
        return pods if len(pods) == count else []

    def phase(self, name: str, *phases: str, timeout: float = 40.0) -> dict[str, Any]:
        return wait_for(f"{name} phase in {phases}",
                        lambda: (lambda s: s if s.get("phase") in phases else None)(self.status(name)), timeout)

    def no_secret_in_messages(self, name: str, status: dict[str, Any] | None = None) -> None:
        """Termination messages (the trainer's line, or a log tail) reach conditions and events:
        never a credential."""
        status = self.status(name) if status is None else status
        texts = [m for _, m in self.events(name)] + [c.get("message", "") for c in status.get("conditions", [])]
        texts += [status.get("message", "")] + [(s or {}).get("message", "") for s in status.get("stages", {}).values()]
        assert not [t for t in texts if ACCESS_KEY in t or SECRET_KEY in t], texts

    def events(self, name: str) -> list[tuple[str, str]]:
        items = self.core.list_namespaced_event(self.namespace, field_selector=f"involvedObject.name={name}").items
        return [(e.reason, e.message) for e in sorted(items, key=lambda e: e.metadata.creation_timestamp)]

    def log(self, pod: str) -> str:
        return self.core.read_namespaced_pod_log(pod, self.namespace)


def job_document(name: str, *, stages: tuple[str, ...] = ("reward", "score", "dpo"), env: dict[str, str] | None = None,
                 run_policy: dict[str, Any] | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """manifests/examples/tiny-cpu.yaml, renamed, with stub-trainer settings in podTemplate.env."""
    document = copy.deepcopy(yaml.safe_load((REPO / "manifests/examples/tiny-cpu.yaml").read_text()))
    document["metadata"] = {"name": name, **({"labels": labels} if labels else {})}
    spec = document["spec"]
    spec["stages"] = {stage: spec["stages"][stage] for stage in stages}
    spec["podTemplate"] = {"env": [{"name": k, "value": v} for k, v in {"STUB_STEPS": "3", **(env or {})}.items()]}
    spec["runPolicy"] = {**spec["runPolicy"], **(run_policy or {})}
    # A stub needs little; the real node has the machine's 2 CPUs, shared with the cluster's own pods.
    spec["resources"]["requests"] = {"cpu": "100m", "memory": "128Mi", "nvidia.com/gpu": 0}
    return document


@pytest.fixture(scope="module")
def crd(dev_cluster: Any) -> None:
    result = dev_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                                 str(REPO / "manifests/crds/alignmentjobs.yaml"))
    assert result.returncode == 0, result.stderr
    wait_for("the CRD to be established", lambda: dev_cluster.kubectl(
        "wait", "--for=condition=Established", "crd/alignmentjobs.mmalign.io", "--timeout=10s").returncode == 0)


@pytest.fixture(scope="module")
def stub(dev_cluster: Any) -> StubTrainer:
    return stub_trainer(dev_cluster)


@pytest.fixture
def env(dev_cluster: Any, crd: None, stub: StubTrainer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    from mmalign.devcluster.testing import create_namespace

    namespace = create_namespace(dev_cluster, "op-" + request.node.name[5:30])
    # The tiny example's storage.credentialsSecret; the stub only checks it arrives as env.
    dev_cluster.kubectl("-n", namespace, "create", "secret", "generic", "s3-credentials",
                        f"--from-literal=AWS_ACCESS_KEY_ID={ACCESS_KEY}", f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET_KEY}")
    if stub.env:
        dev_cluster.kubectl("-n", namespace, "create", "configmap", STUB_CONFIG_MAP,
                            f"--from-file={STUB.name}={STUB}", check=True)
    operator = Operator(Path(dev_cluster.kubeconfig), namespace, tmp_path / "operator.log", stub=stub)
    operator.start()
    operator.wait_started()
    environment = Env(dev_cluster, namespace, operator)
    try:
        yield environment
    finally:
        operator.stop()
        print((tmp_path / "operator.log").read_text()[-8000:])  # shown by pytest when the test failed
        dev_cluster.kubectl("delete", "namespace", namespace, "--wait=false")


# ------------------------------------------------------------------------------------------ tests


def test_pipeline_runs_every_stage_with_env_dns_progress_status_and_events(env: Env) -> None:
    started = time.monotonic()
    env.apply(job_document("tiny", env={"STUB_STEPS": "8", "STUB_STEP_SECONDS": "0.4"}))
    pods = wait_for("the reward gang", lambda: env.running("tiny"))
    assert [p.metadata.name for p in pods] == ["tiny-reward-0-0", "tiny-reward-0-1"]
    master = "tiny-reward-0-0.tiny." + env.namespace + ".svc"
    for rank, pod in enumerate(pods):
        assert pod.spec.hostname == pod.metadata.name and pod.spec.subdomain == "tiny"
        assert pod.spec.restart_policy == "Never"
        assert pod.metadata.owner_references[0].kind == "AlignmentJob"
        log = wait_for("the stub's DNS line", lambda p=pod: (lambda t: t if "stub-dns " in t else None)(env.log(p.metadata.name)))
        env_line = next(line for line in log.splitlines() if line.startswith("stub-env "))
        values = yaml.safe_load(env_line[len("stub-env "):])
        assert values["PET_NODE_RANK"] == str(rank) and values["PET_NNODES"] == "2"
        assert values["MASTER_ADDR"] == values["PET_MASTER_ADDR"] == master
        assert values["MASTER_PORT"] == "29500" and values["MMALIGN_ATTEMPT"] == "0"
        # envFrom the credentials Secret (the stub logs a digest: logs may become status messages)
        assert values["AWS_ACCESS_KEY_ID_sha256"] == hashlib.sha256(ACCESS_KEY.encode()).hexdigest()[:12]
        assert ACCESS_KEY not in log and SECRET_KEY not in log
        # node 0's DNS name resolves, from every pod, to node 0's own address
        assert f"stub-dns {master} {pods[0].status.pod_ip}" in log
    service = env.core.read_namespaced_service("tiny", env.namespace)
    assert service.spec.cluster_ip == "None" and service.spec.publish_not_ready_addresses is True
    # progress travels from rank 0's log to the status while the stage runs
    progress = wait_for("progress in the status while the stage runs", lambda: (lambda s: s if s.get(
        "progress", "").split("/")[0] in {str(k) for k in range(1, 8)} else None)(env.status("tiny")), 20)
    assert progress["stage"] == "reward" and progress["phase"] == "Running"
    assert env.condition("tiny", "Running")["status"] == "True"
    status = env.phase("tiny", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    for stage in ("reward", "score", "dpo"):
        entry = status["stages"][stage]
        assert entry["phase"] == "Succeeded" and entry["attempt"] == 0 and entry["restarts"] == 0
        assert entry["progress"]["step"] == entry["progress"]["total"] == 8
        assert entry["metrics"]["loss"] == pytest.approx(1 / 8) and entry["startTime"] and entry["completionTime"]
        assert entry["artifact"].startswith("s3://mmalign/tiny-cpu/")
    assert status["progress"] == "8/8 (100%)" and status["observedGeneration"] == 1
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions == {"Created": ("True", "JobAccepted"), "Running": ("False", "Succeeded"),
                          "Succeeded": ("True", "AllStagesSucceeded")}
    reasons = wait_for("the Succeeded event", lambda: (lambda r: r if "Succeeded" in r else None)([r for r, _ in env.events("tiny")]))
    assert reasons.count("StageStarted") == 3 and reasons.count("StageSucceeded") == 3
    # cleanPodsAfterFinished (default true): pods and Service go, the job stays
    wait_for("cleanup", lambda: not env.live_pods("tiny"), 15)
    wait_for("service cleanup", lambda: not env.core.list_namespaced_service(env.namespace).items, 15)
    columns = env.kubectl("get", "aj", "tiny").stdout
    assert "STAGE" in columns and "PROGRESS" in columns and "Succeeded" in columns and "8/8 (100%)" in columns
    print(f"pipeline of 3 stages done in {time.monotonic() - started:.1f}s")


def test_killed_pod_restarts_the_whole_gang_with_the_next_attempt(env: Env) -> None:
    # Attempt 0: rank 1 is SIGKILLed (exit 137) at step 2; attempt 1 runs through.
    env.apply(job_document("kill", stages=("reward",), env={
        "STUB_STEPS": "4", "STUB_FAIL_CODE": "137", "STUB_FAIL_RANK": "1", "STUB_FAIL_ATTEMPTS": "1"}))
    wait_for("the killed pod", lambda: [p for p in env.pods("kill") if p.status.phase == "Failed"], 30, 0.05)
    killed_at = time.monotonic()
    wait_for("attempt 1 created", lambda: [p for p in env.pods("kill") if p.metadata.labels[
        "mmalign.io/attempt"] == "1"], 30, 0.05)
    print(f"failure seen -> next attempt's pods created in {time.monotonic() - killed_at:.2f}s")
    attempt1 = wait_for("attempt 1 running", lambda: env.running("kill", attempt=1), 30)
    assert [p.metadata.name for p in attempt1] == ["kill-reward-1-0", "kill-reward-1-1"]
    assert not [p for p in env.pods("kill") if p.metadata.labels["mmalign.io/attempt"] == "0"
                and p.metadata.deletion_timestamp is None]  # the old gang is gone, not only the dead pod
    envs = {e.name: e.value for e in attempt1[0].spec.containers[0].env}
    assert envs["MMALIGN_ATTEMPT"] == "1" and envs["MASTER_ADDR"].startswith("kill-reward-1-0.")
    status = env.phase("kill", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    reward = status["stages"]["reward"]
    assert (reward["attempt"], reward["restarts"]) == (1, 1)
    assert reward["lastCheckpoint"] == "s3://mmalign/tiny-cpu/reward/checkpoints/latest"
    restarting = env.condition("kill", "Restarting")
    assert restarting["status"] == "False" and restarting["reason"] in ("GangRunning", "GangSucceeded")
    messages = [m for r, m in env.events("kill") if r == "GangRestarting"]
    assert len(messages) == 1 and "exited with code 137" in messages[0] and "attempt 1" in messages[0]
    # a SIGKILLed process writes no termination message: FallbackToLogsOnError gives its log's tail
    assert "stub-dns kill-reward-0-0.kill." in messages[0], messages[0]
    env.no_secret_in_messages("kill")


def test_deleted_pod_restarts_the_gang(env: Env) -> None:
    env.apply(job_document("del", stages=("reward",), env={"STUB_STEPS": "12", "STUB_STEP_SECONDS": "0.25"}))
    pods = wait_for("the gang", lambda: env.running("del", attempt=0))
    env.core.delete_namespaced_pod(pods[0].metadata.name, env.namespace)
    wait_for("attempt 1 running", lambda: env.running("del", attempt=1), 30)
    status = env.status("del")
    assert status["stages"]["reward"]["restarts"] == 1
    messages = [m for r, m in env.events("del") if r == "GangRestarting"]
    assert len(messages) == 1 and f"pod {pods[0].metadata.name} was deleted" in messages[0]


def test_backoff_limit_fails_the_job_with_the_reason(env: Env) -> None:
    env.apply(job_document("backoff", stages=("reward",), run_policy={"backoffLimit": 1},
                           env={"STUB_STEPS": "3", "STUB_FAIL_CODE": "143", "STUB_FAIL_RANK": "1"}))
    status = env.phase("backoff", "Failed", "Succeeded", timeout=45)
    assert status["phase"] == "Failed"
    failed = env.condition("backoff", "Failed")
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded"
    assert "runPolicy.backoffLimit=1" in failed["message"] and "exited with code 143" in failed["message"]
    assert (status["stages"]["reward"]["attempt"], status["stages"]["reward"]["restarts"]) == (1, 1)
    wait_for("no pods left", lambda: not env.live_pods("backoff"), 15)


def test_permanent_exit_fails_at_once_then_ttl_deletes_the_job(env: Env) -> None:
    env.apply(job_document("nan", stages=("reward", "score"), run_policy={"ttlSecondsAfterFinished": 2},
                           env={"STUB_FAIL_CODE": "4", "STUB_FAIL_RANK": "0"}))
    status = env.phase("nan", "Failed", "Succeeded")
    assert status["phase"] == "Failed" and status["stages"]["reward"]["restarts"] == 0
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")  # the TTL is 2 s: no more GETs
    assert failed["reason"] == "NanLoss" and "exited with code 4" in failed["message"]
    assert status["stages"]["score"]["phase"] == "Pending"
    # WHY, as the trainer said it: its one line, through the termination message, in the condition and
    # the event (the stub ends with the real trainer's report_failure)
    why = "mmalign: NAN_LOSS (exit 4): loss is nan at step 2"
    assert f"pod nan-reward-0-0 exited with code 4: {why} (permanent" in failed["message"], failed
    assert why in status["stages"]["reward"]["message"]
    assert ("Failed", f"NanLoss: {status['message']}") in env.events("nan")
    assert [m for r, m in env.events("nan") if r == "Failed" and why in m], env.events("nan")
    env.no_secret_in_messages("nan", status)
    from kubernetes.client.exceptions import ApiException

    def gone() -> bool:
        try:
            env.job("nan")
            return False
        except ApiException as error:
            return error.status == 404

    wait_for("ttlSecondsAfterFinished to delete the job", gone, 20)


def test_suspend_resume_unsafe_change_and_delete_leave_nothing(env: Env) -> None:
    env.apply(job_document("susp", stages=("reward",), env={"STUB_STEPS": "400", "STUB_STEP_SECONDS": "0.1"}))
    wait_for("the gang", lambda: env.running("susp", attempt=0))
    # an unsafe change while pods run is refused, not half-applied
    env.patch_spec("susp", {"resources": {"nodes": 3}})
    refused = wait_for("SpecChangeRefused", lambda: (lambda c: c if c.get("status") == "True" else None)(env.condition("susp", "SpecChangeRefused")))
    assert "resources.nodes" in refused["message"] and refused["reason"] == "UnsafeSpecChange"
    assert len(env.live_pods("susp")) == 2
    env.patch_spec("susp", {"resources": {"nodes": 2}, "runPolicy": {"suspend": True}})
    status = env.phase("susp", "Suspended")
    wait_for("pods deleted", lambda: not env.live_pods("susp"), 20)
    assert env.condition("susp", "Suspended")["status"] == "True"
    assert env.condition("susp", "Running")["status"] == "False"
    assert env.condition("susp", "SpecChangeRefused")["status"] == "False"
    assert status["stages"]["reward"]["phase"] == "Suspended"
    env.patch_spec("susp", {"runPolicy": {"suspend": False}})
    wait_for("the resumed gang", lambda: env.running("susp", attempt=1))
    status = env.phase("susp", "Running")
    assert status["stages"]["reward"]["restarts"] == 0  # a resume is not a failure restart
    assert env.condition("susp", "Suspended")["reason"] == "Resumed"
    # delete: the job, its pods, Service and ConfigMap all go
    env.kubectl("delete", "aj", "susp", "--wait=true", "--timeout=30s")
    def children() -> list[str]:
        selector = f"{JOB_LABEL}=susp"
        return ([f"pod/{p.metadata.name}" for p in env.pods("susp")]
                + [f"service/{s.metadata.name}" for s in env.core.list_namespaced_service(
                    env.namespace, label_selector=selector).items]
                + [f"configmap/{c.metadata.name}" for c in env.core.list_namespaced_config_map(
                    env.namespace, label_selector=selector).items])

    try:
        wait_for("children gone", lambda: not children(), 30)
    except AssertionError as error:
        raise AssertionError(f"{error}; left: {children()}") from None


def test_created_suspended_for_kueue_then_admitted(env: Env) -> None:
    env.apply(job_document("queued", stages=("reward",), run_policy={"suspend": True},
                           labels={"kueue.x-k8s.io/queue-name": "team-a"}))
    status = env.phase("queued", "Suspended")
    time.sleep(1.0)
    assert not env.pods("queued") and status["stages"]["reward"]["attempt"] == 0
    # Kueue admits the workload: it may set node selectors while suspended, then unsuspends.
    env.patch_spec("queued", {"podTemplate": {"nodeSelector": {"kubernetes.io/os": "linux"}},
                              "runPolicy": {"suspend": False}})
    pods = wait_for("the gang", lambda: env.live_pods("queued") if len(env.live_pods("queued")) == 2 else None)
    labels = pods[0].metadata.labels
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a" and labels["kueue.x-k8s.io/pod-group-name"] == "queued-reward-0"
    assert pods[0].metadata.annotations["kueue.x-k8s.io/pod-group-total-count"] == "2"
    assert pods[0].spec.node_selector == {"kubernetes.io/os": "linux"}
    assert env.phase("queued", "Succeeded", "Failed")["phase"] == "Succeeded"


def test_operator_crash_and_restart_adopts_running_pods_without_duplicates(env: Env) -> None:
    env.apply(job_document("adopt", stages=("reward",), run_policy={"cleanPodsAfterFinished": False},
                           env={"STUB_STEPS": "30", "STUB_STEP_SECONDS": "0.2"}))
    before = wait_for("the gang", lambda: env.running("adopt", attempt=0))
    uids = {p.metadata.name: p.metadata.uid for p in before}
    env.operator.kill()
    time.sleep(1.0)
    metrics_port, liveness_port = free_port(), free_port()
    env.operator.extra = ("--metrics-port", str(metrics_port), "--liveness-port", str(liveness_port))
    env.operator.start()
    status = env.phase("adopt", "Succeeded", "Failed", timeout=40)
    assert status["phase"] == "Succeeded", status
    health = urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=5)
    assert health.status == 200
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'mmalign_operator_jobs{phase="Succeeded"} 1.0' in metrics
    assert 'mmalign_operator_stage_transitions_total{phase="Succeeded",stage="reward"} 1.0' in metrics
    count = float(metrics.split("mmalign_operator_reconcile_duration_seconds_count ")[1].split()[0])
    total = float(metrics.split("mmalign_operator_reconcile_duration_seconds_sum ")[1].split()[0])
    print(f"{count:.0f} reconcile passes after the restart, {1000 * total / count:.0f} ms mean")
    after = {p.metadata.name: p.metadata.uid for p in env.pods("adopt")}
    assert after == uids  # the same two pods ran to the end: none re-created, none added
    assert (status["stages"]["reward"]["attempt"], status["stages"]["reward"]["restarts"]) == (0, 0)
    assert [r for r, _ in env.events("adopt")].count("StageStarted") == 1


def test_peering_lets_one_of_two_replicas_act_and_the_other_take_over(env: Env, tmp_path: Path) -> None:
    applied = env.cluster.kubectl("apply", "--server-side", "-f", str(REPO / "charts/mmalign/crds/kopf-peering.yaml"))
    assert applied.returncode == 0, applied.stderr
    env.cluster.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=30s")
    env.operator.stop()
    first = Operator(env.operator.kubeconfig, env.namespace, tmp_path / "first.log", "--peering", "mmalign",
                     stub=env.operator.stub)
    second = Operator(env.operator.kubeconfig, env.namespace, tmp_path / "second.log", "--peering", "mmalign",
                      stub=env.operator.stub)
    first.start()
    first.wait_started()
    # the earlier start has the higher default priority; let it register before the second starts
    wait_for("the first replica's heartbeat", lambda: (env.custom.get_namespaced_custom_object(
        "kopf.dev", "v1", env.namespace, "kopfpeerings", "mmalign").get("status") or None), 30)
    second.start()
    try:
        env.apply(job_document("peer", stages=("reward",), env={"STUB_STEPS": "4"}))
        assert env.phase("peer", "Succeeded", "Failed")["phase"] == "Succeeded"
        assert len(env.pods("peer")) <= 2 and env.status("peer")["stages"]["reward"]["attempt"] == 0
        acted = [op for op in (first, second) if "created 2 pods" in op.log.read_text()]
        assert acted == [first], "exactly the first (higher-priority) replica acts"
        first.stop()  # it leaves the peering on exit; the standby resumes
        env.apply(job_document("peer2", stages=("reward",), env={"STUB_STEPS": "2"}))
        assert env.phase("peer2", "Succeeded", "Failed", timeout=60)["phase"] == "Succeeded"
        assert "created 2 pods" in second.log.read_text()
    finally:
        first.stop()
        second.stop()
        print(first.log.read_text()[-3000:], second.log.read_text()[-3000:])


def test_a_gang_that_cannot_start_says_why(env: Env) -> None:
    document = job_document("nosecret", stages=("reward",))
    document["spec"]["storage"]["credentialsSecret"] = "missing-secret"
    env.apply(document)
    status = wait_for("the reason in the status", lambda: (lambda s: s if "missing-secret" in s.get(
        "message", "") else None)(env.status("nosecret")), 30)
    assert status["phase"] == "Pending" and "CreateContainerConfigError" in status["message"]


# ------------------------------------------------------------------ issue 14: real cluster failure modes


def test_an_evicted_pod_restarts_the_gang_without_using_the_backoff_limit(env: Env) -> None:
    from kubernetes import client

    # backoffLimit 0: any restart that counted would fail the job
    env.apply(job_document("evict", stages=("reward",), run_policy={"backoffLimit": 0, "maxDisruptions": 1},
                           env={"STUB_STEPS": "15", "STUB_STEP_SECONDS": "0.2"}))
    pods = wait_for("the gang", lambda: env.running("evict", attempt=0))
    # what `kubectl drain` does: the Eviction subresource (the API server marks the pod DisruptionTarget)
    eviction = client.V1Eviction(metadata=client.V1ObjectMeta(name=pods[1].metadata.name, namespace=env.namespace))
    env.core.create_namespaced_pod_eviction(pods[1].metadata.name, env.namespace, eviction)
    wait_for("attempt 1 running", lambda: env.running("evict", attempt=1), 30)
    reward = env.status("evict")["stages"]["reward"]
    assert (reward["restarts"], reward["disruptions"]) == (0, 1)
    messages = [m for r, m in env.events("evict") if r == "GangRestarting"]
    assert len(messages) == 1 and "EvictionByEvictionAPI" in messages[0] and "not counted" in messages[0]
    # the bound: a second disruption (maxDisruptions=1) fails the job, naming the limit
    second = env.running("evict", attempt=1)[0].metadata.name
    env.core.create_namespaced_pod_eviction(second, env.namespace, client.V1Eviction(
        metadata=client.V1ObjectMeta(name=second, namespace=env.namespace)))
    status = env.phase("evict", "Failed", "Succeeded")
    failed = env.condition("evict", "Failed")
    assert status["phase"] == "Failed" and failed["reason"] == "DisruptionLimitExceeded", failed
    assert "runPolicy.maxDisruptions=1" in failed["message"]


def test_a_pod_the_scheduler_cannot_place_is_named_with_the_schedulers_message(env: Env) -> None:
    document = job_document("nofit", stages=("reward",))
    document["spec"]["podTemplate"]["nodeSelector"] = {"mmalign.io/pool": "no-such-pool"}
    env.apply(document)
    pending = wait_for("PodsPending: Unschedulable", lambda: (lambda c: c if c.get("reason") == "Unschedulable"
                                                               else None)(env.condition("nofit", "PodsPending")), 30)
    assert pending["status"] == "True" and "nofit-reward-0-0" in pending["message"]
    assert "node(s) didn't match Pod's node affinity/selector" in pending["message"], pending
    status = env.status("nofit")
    names = [p["name"] for p in status["stages"]["reward"]["pendingPods"]]
    assert names == ["nofit-reward-0-0", "nofit-reward-0-1"]
    assert status["phase"] == "Pending"
    assert wait_for("the PodsPending event", lambda: [m for r, m in env.events("nofit") if r == "PodsPending"], 10)


def test_a_refused_pod_is_reported_within_seconds_then_created_once_the_quota_has_room(env: Env) -> None:
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "pods"}, "spec": {"hard": {"pods": "1"}}}
    env.apply(quota)
    wait_for("the quota counted", lambda: (env.core.read_namespaced_resource_quota("pods", env.namespace).status.hard
                                           or None), 30)
    env.apply(job_document("quota", stages=("reward",)))
    started = time.monotonic()
    condition = wait_for("CreateFailed", lambda: (lambda c: c if c.get("status") == "True" else None)(
        env.condition("quota", "CreateFailed")), 20)
    print(f"refused create in the status after {time.monotonic() - started:.1f}s")
    assert condition["reason"] == "ExceededQuota" and "exceeded quota: pods" in condition["message"], condition
    assert "HTTP 403" in condition["message"]
    assert wait_for("the FailedCreate event", lambda: [m for r, m in env.events("quota") if r == "FailedCreate"], 10)
    assert env.status("quota")["phase"] == "Pending"
    env.core.delete_namespaced_resource_quota("pods", env.namespace)
    status = env.phase("quota", "Succeeded", "Failed", timeout=60)
    assert status["phase"] == "Succeeded", status
    assert env.condition("quota", "CreateFailed")["status"] == "False"


def test_a_permanently_refused_pod_fails_the_job_with_the_servers_message(env: Env) -> None:
    # Pod annotations are limited to 256 KiB in all: a limit only pod creation checks.
    document = job_document("toobig", stages=("reward",))
    document["spec"]["podTemplate"]["annotations"] = {"example.com/blob": "x" * 300_000}
    # (not `kubectl apply`: its last-applied annotation on the job itself would be too long)
    env.custom.create_namespaced_custom_object(GROUP, VERSION, env.namespace, PLURAL, document)
    status = env.phase("toobig", "Failed", "Succeeded", timeout=20)
    failed = env.condition("toobig", "Failed")
    assert failed["reason"] == "CreateRejected" and "HTTP 422" in failed["message"], failed
    assert "Too long" in failed["message"] and "re-create the job" in failed["message"]
    assert status["stages"]["reward"]["phase"] == "Failed"
    assert [m for r, m in env.events("toobig") if r == "FailedCreate"]
