"""The fault suite: the real trainer under the operator, one fault per job, and what the job did.

Every fault runs a real AlignmentJob (the reward stage of the tiny Qwen2-VL, 2 pods x 1 rank, real
`mmalign launch` -> torchrun -> `mmalign train`, gloo on CPU, checkpoints in the real SeaweedFS S3) on the
session's dev cluster, in a namespace of its own, concurrently with the others. The suite injects the
fault, follows rank 0's progress lines (every step: MMALIGN_PROGRESS_INTERVAL=0) and the job's status,
and records a row (tests/integration/fault_table.py): final phase and reason, recovery seconds, steps lost,
data lost (the model's `_complete.json` files and the checkpoint chain's `latest` files, all present with
their sizes), restarts and disruptions. Each fault's test then asserts the outcome a user relies on.

    .venv/bin/pytest tests/integration/test_faults.py -q                       # in `make test`
    MMALIGN_FAULT_TABLE=1 .venv/bin/pytest tests/integration/test_faults.py -q # + bench/results/faults.json
                                                                              #   and docs/reliability.md
Knobs: MMALIGN_FAULTS (comma-separated names, default all), MMALIGN_FAULT_PARALLEL (jobs at once,
default 4: each job's 2 pods hold ~1.5 GB while they train).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mmalign.api.progress import ProgressReport, parse_line
from tests.integration import fault_table
from tests.integration.test_operator_lifecycle import (  # noqa: F401 - crd: a fixture
    Env,
    Operator,
    StubTrainer,
    crd,
    wait_for,
)

# The faults run in the module's fixture, whose setup counts against its first test's timeout.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(3600)]

STEPS = 14  # optimizer steps of every job's reward stage
EVERY = 4  # checkpoint.everySteps: a SIGKILL loses at most EVERY steps (when it interrupts a save)
FAULT_AT = 5  # inject once rank 0 reported this step (past the first checkpoint)
BUCKET = "faults"
GRACE = 60  # terminationGracePeriodSeconds: a step plus a save on this loaded machine


# ------------------------------------------------------------------------------------------ one job


@dataclass
class Seen:
    at: float  # time.monotonic() when the suite read the line
    attempt: int
    report: ProgressReport


@dataclass
class FaultJob:
    """One fault's namespace, job and the progress lines its node-0 pods printed (polled every 0.4 s)."""

    env: Env
    name: str
    seen: list[Seen] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    counts: dict[str, int] = field(default_factory=dict)  # pod -> progress lines already read

    def follow(self) -> None:
        while not self.stop.is_set():
            try:
                for pod in self.env.pods(self.name):
                    if (
                        pod.metadata.labels.get("mmalign.io/node-rank") != "0"
                        or pod.status.phase == "Pending"
                    ):
                        continue
                    # bounded: a log request to a pod that is going away must not stall the follower
                    text = self.env.core.read_namespaced_pod_log(
                        pod.metadata.name, self.env.namespace, _request_timeout=15
                    )
                    lines = [r for r in map(parse_line, text.splitlines()) if r]
                    known = self.counts.get(pod.metadata.name, 0)
                    attempt = int(pod.metadata.labels["mmalign.io/attempt"])
                    self.seen += [Seen(time.monotonic(), attempt, r) for r in lines[known:]]
                    self.counts[pod.metadata.name] = len(lines)
            except Exception:  # noqa: BLE001 - a pod went away between list and log; poll again
                pass
            self.stop.wait(0.4)

    def steps(self, attempt: int | None = None) -> list[Seen]:
        return [s for s in self.seen if s.report.event == "step" and attempt in (None, s.attempt)]

    def wait_step(self, step: int, timeout: float = 900) -> Seen:
        return wait_for(
            f"{self.name} at step {step}",
            lambda: next((s for s in self.steps() if s.report.step >= step), None),
            timeout,
            0.2,
        )

    def resumed(self, after: float, timeout: float = 900) -> tuple[int, float]:
        """(step resumed from, first optimizer step's time) of the first attempt started after `after`."""
        later = wait_for(
            f"{self.name} training again",
            lambda: next(
                (s for s in self.steps() if s.at > after and s.attempt > self.attempt_at(after)), None
            ),
            timeout,
            0.2,
        )
        start = next(s for s in self.seen if s.attempt == later.attempt and s.report.event == "start")
        return start.report.step, later.at

    def attempt_at(self, moment: float) -> int:
        return max([s.attempt for s in self.seen if s.at <= moment], default=0)

    def last_step_of(self, attempt: int) -> int:
        return max([s.report.step for s in self.steps(attempt)], default=0)

    def final(self, timeout: float = 900) -> dict[str, Any]:
        return self.env.phase(self.name, "Succeeded", "Failed", timeout=timeout)


# ------------------------------------------------------------------------------------------ the suite


class Suite:
    """What the faults share: the cluster, the model and data on local disk, the bucket, one operator."""

    def __init__(self, cluster: Any, work: Path) -> None:
        self.cluster, self.work = cluster, work
        self.jobs: list[FaultJob] = []
        self.operators: list[Operator] = []

    def prepare(self) -> None:
        import boto3

        from mmalign.trainer import builtin
        from tests.trainer import jobs

        # The pods read the model and the data from this machine's disk (the process node runs them
        # here); checkpoints and outputs go to S3.
        self.model = str(builtin.model_folder("builtin://tiny-qwen2-vl"))
        self.data = str(jobs.small_colors(self.work / "data", queries=16))
        s3 = boto3.client("s3", endpoint_url=self.cluster.s3_endpoint, **self.cluster.s3_credentials)
        if BUCKET not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=BUCKET)
        self.s3 = s3

    def namespace(self, fault: str, s3_env: dict[str, str] | None = None) -> str:
        from mmalign.devcluster import demo
        from mmalign.devcluster.testing import create_namespace

        name = create_namespace(self.cluster, "fault-" + fault)
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": "s3-credentials", "namespace": name},
            "stringData": s3_env or demo.s3_env(self.cluster),
        }
        result = self.cluster.kubectl("apply", "-f", "-", input=json.dumps(secret))
        assert result.returncode == 0, result.stderr
        return name

    def operator(self, namespaces: list[str], log: str) -> Operator:
        extra = [arg for ns in namespaces[1:] for arg in ("--namespace", ns)]
        # the real trainer: the operator's default command (not the lifecycle tests' stub)
        operator = Operator(
            Path(self.cluster.kubeconfig),
            namespaces[0],
            self.work / log,
            *extra,
            stub=StubTrainer("mmalign launch"),
        )
        operator.start()
        self.operators.append(operator)
        return operator

    def document(
        self,
        name: str,
        namespace: str,
        *,
        storage: str | None = None,
        env: dict[str, str] | None = None,
        run_policy: dict[str, Any] | None = None,
        pod_template: dict[str, Any] | None = None,
        requests: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        variables = {
            "MMALIGN_PROGRESS_INTERVAL": "0",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "MMALIGN_DIST_TIMEOUT_SECONDS": "120",
            **(env or {}),
        }
        return {
            "apiVersion": "mmalign.io/v1alpha1",
            "kind": "AlignmentJob",
            "metadata": {"name": name},
            "spec": {
                "model": {"uri": self.model},
                "data": {"uri": self.data, "evalFraction": 0.25, "maxLength": 256},
                "storage": {
                    "uri": storage or f"s3://{BUCKET}/{namespace}/",
                    "credentialsSecret": "s3-credentials",
                },
                "resources": {
                    "nodes": 2,
                    "procPerNode": 1,
                    "requests": {"cpu": "100m", "memory": "256Mi", "nvidia.com/gpu": 0, **(requests or {})},
                },
                "deepspeed": {"zeroStage": 2, "bf16": False},
                "stages": {
                    "reward": {
                        "critique": False,
                        "learningRate": 1e-3,
                        "maxSteps": STEPS,
                        "epochs": 3,
                        "microBatchSize": 2,
                        "warmupRatio": 0.0,
                    }
                },
                "checkpoint": {"everySteps": EVERY, "keepLast": 2},
                # the deadline is not under test: at load ~35 on 2 cores one gang start took ~450 s, and
                # 900 s failed 3 of 4 jobs (DeadlineExceeded) after their resume
                "runPolicy": {"backoffLimit": 2, "activeDeadlineSeconds": 3000, **(run_policy or {})},
                "podTemplate": {
                    "terminationGracePeriodSeconds": GRACE,
                    **(pod_template or {}),
                    "env": [{"name": k, "value": v} for k, v in variables.items()],
                },
            },
        }

    def start(self, env: Env, document: dict[str, Any]) -> FaultJob:
        job = FaultJob(env, document["metadata"]["name"])
        env.apply(document)
        threading.Thread(target=job.follow, daemon=True).start()
        self.jobs.append(job)
        return job

    def data_lost(self, storage: str, s3: Any = None, stage: str = "reward") -> str:
        """ "none" when the stage's model folder and its last checkpoint are whole in S3, else what is not."""
        from mmalign.api import layout

        bucket, _, prefix = storage.removeprefix("s3://").partition("/")
        problems: list[str] = []

        def size(key: str) -> int | None:
            try:
                return int((s3 or self.s3).head_object(Bucket=bucket, Key=key)["ContentLength"])
            except Exception:  # noqa: BLE001 - missing (404) or unreadable: both are losses
                return None

        def read(key: str) -> dict[str, Any] | None:
            try:
                return dict(json.loads((s3 or self.s3).get_object(Bucket=bucket, Key=key)["Body"].read()))
            except Exception:  # noqa: BLE001
                return None

        model = layout.artifact_uri(storage, stage).removeprefix(f"s3://{bucket}/")
        complete = read(model.rstrip("/") + "/" + layout.COMPLETE)
        if complete is None:
            problems.append(f"no {layout.COMPLETE}")
        else:
            missing = [
                f["name"] for f in complete["files"] if size(model.rstrip("/") + "/" + f["name"]) != f["size"]
            ]
            problems += [f"model file {name}" for name in missing]
        marker = read(layout.marker_uri(storage, stage).removeprefix(f"s3://{bucket}/"))
        if marker is None:
            problems.append("no checkpoint marker")
        else:
            base = marker["uri"].removeprefix(f"s3://{bucket}/").rstrip("/")
            problems += [
                f"checkpoint file {f['name']}"
                for f in marker["files"]
                if size(f"{base}/{f['name']}") != f["size"]
            ]
            if int(marker["step"]) != STEPS:
                problems.append(f"latest checkpoint is step {marker['step']}, not {STEPS}")
        return "none" if not problems else "; ".join(problems[:4])

    def close(self) -> None:
        for job in self.jobs:
            job.stop.set()
        for operator in self.operators:
            operator.stop()


def stage(status: dict[str, Any]) -> dict[str, Any]:
    return dict(status.get("stages", {}).get("reward", {}))


def outcome(env: Env, name: str, status: dict[str, Any]) -> str:
    phase = status.get("phase", "")
    condition = env.condition(name, phase) if phase in ("Succeeded", "Failed") else {}
    return f"{phase}" + (f" ({condition.get('reason')})" if condition.get("reason") else "")


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def worker_pids(pod: str) -> list[int]:
    """The `mmalign train` processes (torchrun's workers) of a pod: found by the pod's HOSTNAME, which the
    node sets in each container's environment."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in command and b"mmalign.cli" in command and f"HOSTNAME={pod}".encode() in environ:
            found.append(int(entry.name))
    return found


# ------------------------------------------------------------------------------------------ the faults


def restarted_row(
    suite: Suite,
    env: Env,
    job: FaultJob,
    fault: str,
    injected: str,
    fault_at: float,
    notes: str = "",
    s3: Any = None,
) -> fault_table.Row:
    """The row of a fault after which the gang resumes and the job should finish."""
    before = job.attempt_at(fault_at)
    resumed_from, training_again = job.resumed(fault_at)
    status = job.final()
    entry = stage(status)
    last = job.last_step_of(before)
    return fault_table.Row(
        fault=fault,
        injected=injected,
        outcome=outcome(env, job.name, status),
        recovery_seconds=round(training_again - fault_at, 1),
        steps_lost=max(0, last - resumed_from),
        data_lost=suite.data_lost(status["stages"]["reward"]["artifact"].rsplit("/reward/", 1)[0] + "/", s3)
        if status.get("phase") == "Succeeded"
        else "not checked (failed)",
        restarts=entry.get("restarts"),
        disruptions=entry.get("disruptions"),
        date=today(),
        notes=notes or f"step {last} reached, resumed from step {resumed_from}",
    )


def fault_rank_sigkill(suite: Suite, env: Env) -> fault_table.Row:
    job = suite.start(env, suite.document("kill", env.namespace))
    job.wait_step(FAULT_AT)
    pod = "kill-reward-0-1"
    pids = wait_for("rank 1's worker process", lambda: worker_pids(pod), 30)
    at = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return restarted_row(suite, env, job, "rank SIGKILL", "SIGKILL to rank 1's `mmalign train` process", at)


def fault_pod_deleted(suite: Suite, env: Env) -> fault_table.Row:
    job = suite.start(env, suite.document("delpod", env.namespace))
    job.wait_step(FAULT_AT)
    at = time.monotonic()
    env.kubectl("delete", "pod", "delpod-reward-0-1", "--wait=false")
    return restarted_row(suite, env, job, "pod deleted", "`kubectl delete pod` of node 1's pod", at)


def fault_evicted(suite: Suite, env: Env) -> fault_table.Row:
    from kubernetes import client

    job = suite.start(env, suite.document("evict", env.namespace, run_policy={"backoffLimit": 0}))
    job.wait_step(FAULT_AT)
    at = time.monotonic()
    pod = "evict-reward-0-1"
    env.core.create_namespaced_pod_eviction(
        pod, env.namespace, client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=env.namespace))
    )
    return restarted_row(
        suite, env, job, "pod evicted", "the Eviction subresource on node 1's pod (backoffLimit 0)", at
    )


def fault_drain(suite: Suite, env: Env) -> fault_table.Row:
    job = suite.start(
        env,
        suite.document(
            "drain", env.namespace, run_policy={"backoffLimit": 0, "cleanPodsAfterFinished": False}
        ),
    )
    job.wait_step(FAULT_AT)
    node = next(p.spec.node_name for p in env.pods("drain") if p.metadata.name == "drain-reward-0-1")
    at = time.monotonic()
    # Only this job's pods are evicted (the other faults' pods share the nodes); the node is cordoned for all.
    drained = env.cluster.kubectl(
        "drain",
        node,
        "--pod-selector",
        "mmalign.io/job=drain",
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--force",
        f"--timeout={GRACE + 30}s",
        timeout=GRACE + 60,
    )
    try:
        assert drained.returncode == 0, drained.stderr
        row = restarted_row(
            suite,
            env,
            job,
            "node drained",
            f"`kubectl drain {node}` (cordon, then evict this job's pods; backoffLimit 0)",
            at,
        )
        nodes = {p.metadata.name: p.spec.node_name for p in env.pods("drain")}
    finally:
        env.cluster.kubectl("uncordon", node)
    placed = sorted({n for pod, n in nodes.items() if "-reward-1-" in pod})
    row.notes += f"; the new gang ran on {', '.join(placed) or '?'} (not the cordoned {node})"
    assert node not in placed, nodes
    return row


def fault_suspend(suite: Suite, env: Env) -> fault_table.Row:
    job = suite.start(env, suite.document("susp", env.namespace))
    job.wait_step(FAULT_AT)
    at = time.monotonic()
    env.patch_spec("susp", {"runPolicy": {"suspend": True}})
    env.phase("susp", "Suspended", timeout=60)
    wait_for("the suspended pods gone", lambda: not env.live_pods("susp"), GRACE + 30)
    env.patch_spec("susp", {"runPolicy": {"suspend": False}})
    return restarted_row(
        suite,
        env,
        job,
        "suspend / resume",
        "runPolicy.suspend true, then false once the pods were gone (SIGTERM: save the step reached)",
        at,
    )


def fault_operator_killed(suite: Suite, env: Env) -> fault_table.Row:
    job = suite.start(
        env, suite.document("opkill", env.namespace, run_policy={"cleanPodsAfterFinished": False})
    )
    job.wait_step(FAULT_AT)
    uids = {p.metadata.name: p.metadata.uid for p in env.live_pods("opkill")}
    at = time.monotonic()
    env.operator.kill()
    time.sleep(5.0)
    env.operator.start()
    restarted = time.monotonic()
    step = job.last_step_of(0)
    # back in control: the status shows a step the trainer reached after the restart
    wait_for(
        "the status updated by the new operator",
        lambda: (stage(env.status("opkill")).get("progress") or {}).get("step", 0) > step,
        300,
        0.3,
    )
    back = time.monotonic()
    status = job.final()
    same = {p.metadata.name: p.metadata.uid for p in env.pods("opkill")} == uids
    entry = stage(status)
    return fault_table.Row(
        fault="operator killed",
        injected="SIGKILL to the operator, restarted 5 s later",
        outcome=outcome(env, "opkill", status),
        recovery_seconds=None,
        steps_lost=0,
        data_lost=suite.data_lost(f"s3://{BUCKET}/{env.namespace}/"),
        restarts=entry.get("restarts"),
        disruptions=entry.get("disruptions"),
        date=today(),
        notes=("the same pods trained on (adopted, none re-created)" if same else "pods were re-created")
        + f"; status current again {back - restarted:.0f} s after the restart ({restarted - at:.0f} s after the kill)",
    )


def fault_s3_outage(suite: Suite, env: Env) -> fault_table.Row:
    from tests.s3_server import S3Server

    # A server of its own: stopping the cluster's would hit every other fault's checkpoints.
    with S3Server(suite.work / "s3-outage") as server:
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": "s3-credentials", "namespace": env.namespace},
            "stringData": server.env(),
        }
        env.apply(secret)
        storage = f"s3://{server.bucket}/outage/"
        # the trainer retries S3 for 10 s (not 60) before it gives up: the outage outlasts it
        job = suite.start(
            env,
            suite.document(
                "outage", env.namespace, storage=storage, env={"MMALIGN_STORAGE_RETRY_SECONDS": "10"}
            ),
        )
        job.wait_step(FAULT_AT)
        at = time.monotonic()
        server.stop()
        # back once the gang has failed on it (or after 90 s): the new gang restores from it
        try:
            wait_for(
                "a failure from the outage",
                lambda: stage(env.status("outage")).get("restarts", 0) >= 1,
                90,
                0.5,
            )
        except AssertionError:
            pass
        outage = time.monotonic() - at
        server.start()
        row = restarted_row(
            suite,
            env,
            job,
            "S3 outage",
            f"the S3 server stopped for {outage:.0f} s, then restarted (MMALIGN_STORAGE_RETRY_SECONDS=10)",
            at,
            s3=server.client(),
        )
    return row


def fault_job_deleted(suite: Suite, env: Env) -> fault_table.Row:
    job = suite.start(env, suite.document("deljob", env.namespace))
    job.wait_step(FAULT_AT)
    pids = {pod: worker_pids(pod) for pod in ("deljob-reward-0-0", "deljob-reward-0-1")}
    at = time.monotonic()
    env.kubectl("delete", "aj", "deljob", "--wait=false")

    def children() -> list[str]:
        left = [f"pod/{p.metadata.name}" for p in env.pods("deljob")]
        for kind, items in (
            ("service", env.core.list_namespaced_service),
            ("configmap", env.core.list_namespaced_config_map),
        ):
            left += [
                f"{kind}/{o.metadata.name}"
                for o in items(env.namespace, label_selector="mmalign.io/job=deljob").items
            ]
        return left

    wait_for("the job's children gone", lambda: not children(), GRACE + 60, 0.5)
    gone = time.monotonic() - at
    time.sleep(5.0)  # nothing re-created afterwards
    left = children() + [f"process {pid}" for pid in sum(pids.values(), []) if Path(f"/proc/{pid}").exists()]
    return fault_table.Row(
        fault="job deleted",
        injected="`kubectl delete aj` mid-run",
        outcome="deleted: " + ("nothing left" if not left else "left: " + ", ".join(left)),
        recovery_seconds=None,
        steps_lost=None,
        data_lost="– (the user deleted it; S3 outputs are kept)",
        restarts=None,
        disruptions=None,
        date=today(),
        notes=f"pods, Service, ConfigMap and trainer processes gone {gone:.0f} s after the delete; none re-created",
    )


def fault_bad_bucket(suite: Suite, env: Env) -> fault_table.Row:
    started = time.monotonic()
    job = suite.start(env, suite.document("bucket", env.namespace, storage="s3://no-such-bucket-mmalign/x/"))
    status = job.final()
    failed = env.condition("bucket", "Failed")
    entry = stage(status)
    return fault_table.Row(
        fault="bad bucket",
        injected="storage.uri in a bucket that does not exist",
        outcome=outcome(env, "bucket", status),
        recovery_seconds=None,
        steps_lost=None,
        data_lost="– (nothing written)",
        restarts=entry.get("restarts"),
        disruptions=entry.get("disruptions"),
        date=today(),
        notes=f"failed {time.monotonic() - started:.0f} s after apply, not retried: "
        + failed.get("message", "")[:160],
    )


def fault_rendezvous_timeout(suite: Suite, env: Env) -> fault_table.Row:
    # A pod that holds 6 of node 1's 8 cpus (the process node's declared capacity): each job pod asks for 5,
    # so one runs on node 0 and its peer stays Pending, "Insufficient cpu", until the blocker goes.
    blocker = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "blocker"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": "process-node-1"},
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "sleep",
                    "image": "busybox",
                    "command": ["sleep", "3600"],
                    "resources": {"requests": {"cpu": "6"}},
                }
            ],
        },
    }
    env.apply(blocker)
    wait_for(
        "the blocker running",
        lambda: env.core.read_namespaced_pod("blocker", env.namespace).status.phase == "Running",
        60,
    )
    job = suite.start(
        env,
        suite.document(
            "gang",
            env.namespace,
            requests={"cpu": "5"},
            run_policy={"startupTimeoutSeconds": 30, "backoffLimit": 3},
        ),
    )
    pending = wait_for(
        "PodsPending",
        lambda: (lambda c: c if c.get("status") == "True" else None)(env.condition("gang", "PodsPending")),
        120,
    )
    at = wait_for(
        "the gang restarted",
        lambda: stage(env.status("gang")).get("restarts", 0) >= 1 and time.monotonic(),
        300,
        0.5,
    )
    restarting = wait_for(
        "the GangRestarting event", lambda: [m for r, m in env.events("gang") if r == "GangRestarting"], 30
    )
    env.core.delete_namespaced_pod("blocker", env.namespace, grace_period_seconds=0)
    row = restarted_row(
        suite,
        env,
        job,
        "rendezvous timeout",
        "one pod of 2 Pending (Insufficient cpu), "
        "runPolicy.startupTimeoutSeconds 30; room made after the first timeout",
        at,
    )
    row.notes = (
        f"PodsPending named {pending.get('message', '')[:200]!r}; the restart said {restarting[0][:160]!r}"
    )
    row.recovery_seconds = None  # the fault is the wait itself; it ended when the room was made
    return row


FAULTS: dict[str, Callable[[Suite, Env], fault_table.Row]] = {  # in the order they start
    "rank-sigkill": fault_rank_sigkill,
    "evicted": fault_evicted,
    "suspend": fault_suspend,
    "pod-deleted": fault_pod_deleted,
    "operator-killed": fault_operator_killed,
    "drain": fault_drain,
    "s3-outage": fault_s3_outage,
    "rendezvous-timeout": fault_rendezvous_timeout,
    "job-deleted": fault_job_deleted,
    "bad-bucket": fault_bad_bucket,
}


# What `make test` runs (~5 gang starts on 2 cores): a resume from the last checkpoint, a SIGTERM save
# that is not counted, a permanent failure. MMALIGN_FAULTS=all adds the other 7 (~13 more gang starts).
DEFAULT = ("rank-sigkill", "evicted", "bad-bucket")


def selected() -> list[str]:
    chosen = os.environ.get("MMALIGN_FAULTS", "").strip()
    if chosen == "all":
        return list(FAULTS)
    names = [n.strip() for n in chosen.split(",") if n.strip()] or list(DEFAULT)
    unknown = [n for n in names if n not in FAULTS]
    assert not unknown, f"MMALIGN_FAULTS: unknown {unknown}; known: {', '.join(FAULTS)}"
    return names


@pytest.fixture(scope="module")
def rows(
    dev_cluster: Any, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Every selected fault, run concurrently: name -> its Row, or the exception it raised."""
    request.getfixturevalue("crd")  # the lifecycle tests' fixture: the CRD applied and Established
    suite = Suite(dev_cluster, tmp_path_factory.mktemp("faults"))
    names = selected()
    started = time.monotonic()
    suite.prepare()
    namespaces = {name: suite.namespace(name) for name in names}
    # one operator for all faults but the one that kills its operator
    shared = [namespaces[n] for n in names if n != "operator-killed"]
    operators = {}
    if shared:
        common = suite.operator(shared, "operator.log")
        operators = {n: common for n in names if n != "operator-killed"}
    if "operator-killed" in names:
        operators["operator-killed"] = suite.operator([namespaces["operator-killed"]], "operator-killed.log")
    results: dict[str, Any] = {}
    parallel = int(os.environ.get("MMALIGN_FAULT_PARALLEL", "4"))
    target = fault_table.RESULTS if os.environ.get("MMALIGN_FAULT_TABLE") else suite.work / "faults.json"

    def record() -> None:
        """The rows measured so far (after every fault: a run stopped early keeps what it measured)."""
        measured = [r for n in names if isinstance(r := results.get(n), fault_table.Row)]
        context = {
            "wall": f"{time.monotonic() - started:.0f} s",
            "jobs at once": parallel,
            "load average": f"{os.getloadavg()[0]:.1f}",
            "cores": os.cpu_count(),
        }
        fault_table.write_rows(target, measured, context)
        if os.environ.get("MMALIGN_FAULT_TABLE"):
            fault_table.update_doc(fault_table.DOC, measured, context)

    try:
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            futures = {
                pool.submit(FAULTS[n], suite, Env(dev_cluster, namespaces[n], operators[n])): n for n in names
            }
            for future in concurrent.futures.as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except Exception as error:  # noqa: BLE001 - reported by that fault's test
                    results[futures[future]] = error
                record()
    finally:
        suite.close()
        for operator_log in suite.work.glob("operator*.log"):
            print(f"--- {operator_log.name}\n{operator_log.read_text()[-6000:]}")
        for namespace in namespaces.values():
            dev_cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    print(f"fault rows in {target}: " + target.read_text() if target.exists() else "no fault rows")
    yield results


def row_of(rows: dict[str, Any], name: str) -> fault_table.Row:
    if name not in rows:
        pytest.skip(f"{name} not in MMALIGN_FAULTS")
    result = rows[name]
    if isinstance(result, Exception):
        raise result
    assert isinstance(result, fault_table.Row)
    return result


# ------------------------------------------------------------------------------------------ assertions


def test_a_killed_rank_resumes_from_the_last_checkpoint(rows: dict[str, Any]) -> None:
    row = row_of(rows, "rank-sigkill")
    assert row.outcome.startswith("Succeeded") and row.data_lost == "none", row
    assert (row.restarts, row.disruptions) == (1, 0), row
    # the policy: the steps since the last committed checkpoint (a save the kill interrupted included)
    assert row.steps_lost is not None and row.steps_lost <= EVERY, row


def test_a_deleted_pod_restarts_the_gang(rows: dict[str, Any]) -> None:
    row = row_of(rows, "pod-deleted")
    assert row.outcome.startswith("Succeeded") and row.data_lost == "none", row
    assert row.restarts == 1, row


@pytest.mark.parametrize("name", ["evicted", "drain"])
def test_a_disruption_saves_resumes_and_is_not_counted(rows: dict[str, Any], name: str) -> None:
    row = row_of(rows, name)
    assert row.outcome.startswith("Succeeded") and row.data_lost == "none", row
    assert (row.restarts, row.disruptions) == (0, 1), row
    assert row.steps_lost == 0, row  # SIGTERM: the step reached was saved


def test_suspend_then_resume_loses_no_step(rows: dict[str, Any]) -> None:
    row = row_of(rows, "suspend")
    assert row.outcome.startswith("Succeeded") and row.data_lost == "none", row
    assert (row.restarts, row.steps_lost) == (0, 0), row


def test_an_operator_crash_leaves_training_alone(rows: dict[str, Any]) -> None:
    row = row_of(rows, "operator-killed")
    assert row.outcome.startswith("Succeeded") and row.data_lost == "none", row
    assert row.restarts == 0 and row.notes.startswith("the same pods"), row


def test_a_deleted_job_leaves_nothing(rows: dict[str, Any]) -> None:
    row = row_of(rows, "job-deleted")
    assert row.outcome == "deleted: nothing left", row


def test_a_missing_bucket_fails_at_once_naming_it(rows: dict[str, Any]) -> None:
    row = row_of(rows, "bad-bucket")
    assert row.outcome.startswith("Failed") and row.restarts == 0, row
    assert "no-such-bucket-mmalign" in row.notes, row


def test_a_gang_that_cannot_assemble_times_out_retryably_then_runs(rows: dict[str, Any]) -> None:
    row = row_of(rows, "rendezvous-timeout")
    assert row.outcome.startswith("Succeeded") and row.data_lost == "none", row
    assert row.restarts is not None and row.restarts >= 1, row
    assert "Insufficient cpu" in row.notes and "RENDEZVOUS_TIMEOUT" in row.notes, row


def test_an_s3_outage_costs_at_most_the_steps_since_the_last_committed_checkpoint(
    rows: dict[str, Any],
) -> None:
    row = row_of(rows, "s3-outage")
    assert row.outcome.startswith("Succeeded") and row.data_lost == "none", row
    # asyncUpload (the default): the failed upload of one checkpoint surfaces when the next save joins it,
    # so the steps since the last COMMITTED one are lost: up to two checkpoint intervals (measured: 8)
    assert row.steps_lost is not None and row.steps_lost <= 2 * EVERY, row
