"""The fault suite's harness: one fault's job and what it did (tests/integration/test_faults.py has the faults).

`Suite` holds what the faults share (the dev cluster, the tiny model and data on local disk, the bucket,
the operators) and builds each fault's AlignmentJob; `FaultJob` follows rank 0's progress lines and the
job's status; `restarted_row` and `Suite.data_lost` turn that into a fault_table.Row (recovery seconds,
steps lost, data lost in S3).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmalign.api.progress import ProgressReport, parse_line
from tests.integration import fault_table
from tests.integration.test_operator_lifecycle import Env, Operator, StubTrainer, wait_for

STEPS = 14  # optimizer steps of every job's reward stage
EVERY = 4  # checkpoint.everySteps
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
        finished: set[str] = set()  # pods whose whole log was read after their container stopped
        while not self.stop.is_set():
            try:
                pods = self.env.pods(self.name)
            except Exception:  # noqa: BLE001 - the API server is slow under load; poll again
                pods = []
            # newest attempt first: a read that fails or stalls on an old attempt's pod (being deleted,
            # its log gone with it) must not keep the follower from the gang that trains now
            pods.sort(key=lambda p: -int(p.metadata.labels.get("mmalign.io/attempt", "0")))
            for pod in pods:
                name = pod.metadata.name
                if (
                    pod.metadata.labels.get("mmalign.io/node-rank") != "0"
                    or pod.status.phase == "Pending"
                    or name in finished
                ):
                    continue
                try:
                    # bounded: a log request to a pod that is going away must not stall the follower
                    text = self.env.core.read_namespaced_pod_log(
                        name, self.env.namespace, _request_timeout=15
                    )
                except Exception:  # noqa: BLE001 - it went away between list and log; next pod
                    continue
                lines = [r for r in map(parse_line, text.splitlines()) if r]
                known = self.counts.get(name, 0)
                attempt = int(pod.metadata.labels["mmalign.io/attempt"])
                self.seen += [Seen(time.monotonic(), attempt, r) for r in lines[known:]]
                self.counts[name] = max(known, len(lines))
                if pod.status.phase in ("Succeeded", "Failed"):
                    finished.add(name)
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
        # held by the faults that change where pods can go (a drain's cordon, the rendezvous row's
        # blocker pod): two of them at once would make each other's pods Pending for the wrong reason
        self.nodes = threading.Lock()

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
                # loaderWorkers 0: the batches are made inside the step, no worker processes forked per
                # rank (2 cpu-light pods per job); the data order and resume position do not depend on it
                "data": {"uri": self.data, "evalFraction": 0.25, "maxLength": 256, "loaderWorkers": 0},
                "storage": {
                    "uri": storage or self.storage(namespace),
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

    def storage(self, namespace: str) -> str:
        """A fault job's storage.uri (the default of `document`)."""
        return f"s3://{BUCKET}/{namespace}/"

    def committed_step(self, storage: str, stage: str = "reward") -> int:
        """The step of the stage's last COMMITTED checkpoint in S3 (its `latest` marker), 0 when none yet."""
        from mmalign.api import layout

        bucket = storage.removeprefix("s3://").partition("/")[0]
        marker = _read_json(self.s3, bucket, layout.marker_uri(storage, stage).removeprefix(f"s3://{bucket}/"))
        return int(marker["step"]) if marker else 0

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
            return _read_json(s3 or self.s3, bucket, key)

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


def _read_json(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))
    except Exception:  # noqa: BLE001 - missing (404) or unreadable
        return None


def stage(status: dict[str, Any]) -> dict[str, Any]:
    return dict(status.get("stages", {}).get("reward", {}))


def outcome(env: Env, name: str, status: dict[str, Any]) -> str:
    phase = status.get("phase", "")
    condition = env.condition(name, phase) if phase in ("Succeeded", "Failed") else {}
    return f"{phase}" + (f" ({condition.get('reason')})" if condition.get("reason") else "")


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


class Machine:
    """The conditions a run was measured under, sampled every 5 s by a thread: the highest 1-minute load
    average and the least available memory (the whole machine's, other work included)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.peak_load = 0.0
        self.least_available = float("inf")  # GiB
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            self.peak_load = max(self.peak_load, os.getloadavg()[0])
            meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
            available = next(
                (line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable")), None
            )
            if available is not None:
                self.least_available = min(self.least_available, int(available) / 2**20)
            if self._stop.wait(5.0):
                return

    def context(self, parallel: int) -> dict[str, Any]:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        return {
            "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall": f"{time.monotonic() - self.started:.0f} s",
            "jobs at once": parallel,
            "load average": f"{os.getloadavg()[0]:.1f} (peak {self.peak_load:.1f})",
            "memory available": f"{self.least_available:.1f} GiB at least, of {total:.0f}",
            "cores": os.cpu_count(),
        }

    def stop(self) -> None:
        self._stop.set()


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


def restarted_row(
    suite: Suite,
    env: Env,
    job: FaultJob,
    fault: str,
    injected: str,
    fault_at: float,
    notes: str = "",
    s3: Any = None,
    committed: int | None = None,
) -> fault_table.Row:
    """The row of a fault after which the gang resumes and the job should finish. `committed`: the step of
    the last committed checkpoint in S3 read just before the fault, when the fault reads it."""
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
        notes=notes
        or f"step {last} reached, resumed from step {resumed_from}"
        + (f"; the last committed checkpoint at the fault: step {committed}" if committed is not None else ""),
        steps_uncommitted=None if committed is None else max(0, last - committed),
    )
