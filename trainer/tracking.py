"""Experiment tracking (spec.tracking): the progress lines' scalars to TensorBoard, MLflow and W&B.

    with tracking.for_stage(ctx):      # rank 0: a Tracker per backend named in spec.tracking
        stage.run(ctx)                 # every Progress update -> Tracker.log (a queue append)

Rank 0 only, through the libraries themselves: torch's SummaryWriter (event files), the mlflow client
(`MlflowClient.log_batch`), wandb (offline by default). The names and values are the progress lines'
(`progress.scalars`: loss, rewards/accuracy, learning_rate, eval_acc, ...), at the optimizer step.

A tracker never stalls a step: `Tracker.log` only appends to a bounded deque; the tracker's own daemon
thread connects, then sends what piled up since its last call as ONE batch (so a slow server gets fewer,
bigger batches) and, when more than `max_pending` points wait, the oldest are dropped (counted, said at the
end). A tracker that fails (server down, bad URI) warns once and the stage goes on; a missing library is
the one hard error, before step 0 (StageConfigError: the image lacks the `tracking` or `wandb` extra).

Where things go (docs/observability.md):
- TensorBoard: event files written to the stage's scratch, copied to `<tensorboard.uri or
  storage.uri/tensorboard/>/<stage>/` every FLUSH_SECONDS and at the end, through trainer/storage (so s3://
  uses the job's endpoint and credentials; each process's event file has its own name, so restarted
  attempts add files and TensorBoard merges them).
- MLflow: experiment `mlflow.experiment` (default: the job's name), one run `<job>-<stage>` per stage,
  tagged mmalign.io/job and mmalign.io/stage; a restarted gang continues that run (found by its tags).
- W&B: run id `<job>-<stage>` (resume="allow"); offline mode writes below the scratch folder and the run
  folder is copied to `<storage.uri>/<stage>/wandb/` at the end (`wandb sync` it from there).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

from mmalign.api import keys, layout
from mmalign.api.exit_codes import ExitCode
from mmalign.trainer import progress
from mmalign.trainer.context import Context, StageConfigError, say

FLUSH_SECONDS = 30.0  # TensorBoard: how often the event files are copied to their URI
CLOSE_TIMEOUT = 60.0  # at the stage's end: how long the last batch and upload may take
FAIL_TIMEOUT = 5.0  # the same when the stage raised (see for_stage)
MAX_PENDING = 10_000  # points a tracker keeps while its backend is slow; beyond, the oldest are dropped
TAG_JOB, TAG_STAGE = keys.LABEL_JOB, keys.LABEL_STAGE  # MLflow run tags (the pods' label keys)


Outcome = Literal["FINISHED", "FAILED", "KILLED"]  # how the stage ended (MLflow's run status names)


@dataclasses.dataclass(frozen=True)
class Point:
    step: int
    values: dict[str, float]
    wall_time: float  # time.time() of the update


class Backend(Protocol):
    """One experiment tracker. Every method runs on the tracker's own thread, never the training loop's."""

    name: str

    def open(self) -> None: ...

    def log(self, points: list[Point]) -> None: ...

    def flush(self) -> None: ...

    def close(self, outcome: Outcome) -> None: ...


class Tracker:
    """A backend behind a bounded queue and a daemon thread (see the module docstring)."""

    def __init__(
        self, backend: Backend, max_pending: int = MAX_PENDING, flush_seconds: float = FLUSH_SECONDS
    ):
        self.backend = backend
        self.max_pending = max_pending
        self.flush_seconds = flush_seconds
        self.dropped = 0
        self.sent = 0
        self._pending: collections.deque[Point] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._outcome: Outcome = "FINISHED"
        self._failed: str | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"mmalign-tracking-{backend.name}", daemon=True
        )
        self._thread.start()

    def log(self, step: int, values: dict[str, float]) -> None:
        """Queue one update; returns at once whatever the backend is doing."""
        if not values:
            return
        with self._lock:
            self._pending.append(Point(step, dict(values), time.time()))
            while len(self._pending) > self.max_pending:
                self._pending.popleft()
                self.dropped += 1
            self._wake.notify()

    def close(self, outcome: Outcome = "FINISHED", timeout: float = CLOSE_TIMEOUT) -> None:
        """Send what is queued, close the backend (upload, end the run); give up after `timeout` seconds."""
        self.stop(outcome)
        self.wait(timeout)

    def stop(self, outcome: Outcome) -> None:
        """Tell the thread to send what is queued and close the backend; returns at once."""
        with self._lock:
            self._closing, self._outcome = True, outcome
            self._wake.notify()

    def wait(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for `stop`'s work, then say what was lost or dropped."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            say(
                f"tracking: {self.backend.name} did not finish within {timeout:.0f}s; its last points may be lost"
            )
        elif self.dropped:
            say(
                f"tracking: {self.backend.name} was too slow: {self.dropped} of {self.dropped + self.sent} "
                "updates dropped (the oldest first)"
            )

    # ------------------------------------------------------------------------------ the thread

    def _run(self) -> None:
        opened = self._call("open", self.backend.open)
        last_flush = time.monotonic()
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    if not self._wake.wait(
                        timeout=max(0.1, self.flush_seconds - (time.monotonic() - last_flush))
                    ):
                        break  # time for a flush
                batch = list(self._pending)
                self._pending.clear()
                closing, outcome = self._closing, self._outcome
            if batch and opened:
                self._call("log", lambda batch=batch: self.backend.log(batch))
                self.sent += len(batch)
            if opened and (closing or time.monotonic() - last_flush >= self.flush_seconds):
                self._call("flush", self.backend.flush)
                last_flush = time.monotonic()
            if closing:
                if opened:
                    self._call("close", lambda outcome=outcome: self.backend.close(outcome))
                return

    def _call(self, what: str, call: Any) -> bool:
        try:
            call()
            return True
        except Exception as error:  # noqa: BLE001 - a tracker's failure never fails the stage
            if self._failed is None:  # said once: a server that is down would say it every step
                self._failed = what
                say(
                    f"tracking: {self.backend.name} {what} failed ({type(error).__name__}: {error}); "
                    "training goes on"
                )
            return False


@contextlib.contextmanager
def for_stage(ctx: Context) -> Iterator[list[Tracker]]:
    """Rank 0: a Tracker for each backend spec.tracking names, fed by every Progress update of the stage;
    closed at the end with the stage's outcome. Other ranks: nothing.

    A stage that raised gives its trackers FAIL_TIMEOUT seconds, not CLOSE_TIMEOUT: after SIGTERM the
    pod's grace period is for the checkpoint, and the exit code must come before the kubelet's SIGKILL."""
    backends = build(ctx) if ctx.dist.is_rank_0 else []
    trackers = [Tracker(backend) for backend in backends]

    def sink(reporter: progress.Progress, values: dict[str, float]) -> None:
        for tracker in trackers:
            tracker.log(reporter.step, values)

    if trackers:
        progress.add_sink(sink)
    outcome: Outcome = "FAILED"
    try:
        yield trackers
        outcome = "FINISHED"
    except BaseException as error:
        if getattr(error, "exit_code", None) == ExitCode.STOPPED:
            outcome = "KILLED"  # SIGTERM: stopped at a committed checkpoint, the next attempt continues
        raise
    finally:
        progress.remove_sink(sink)
        for tracker in trackers:  # all close at once: one deadline, not one per tracker
            tracker.stop(outcome)
        deadline = time.monotonic() + (CLOSE_TIMEOUT if outcome == "FINISHED" else FAIL_TIMEOUT)
        for tracker in trackers:
            tracker.wait(max(0.0, deadline - time.monotonic()))


def build(ctx: Context) -> list[Backend]:
    """The backends spec.tracking names; a missing library is a StageConfigError naming the extra."""
    spec = ctx.spec.tracking
    backends: list[Backend] = []
    if spec.tensorboard is not None:
        _require("tensorboard", "spec.tracking.tensorboard", "tracking")
        backends.append(
            TensorBoard(
                ctx.scratch("tensorboard"), spec.tensorboard.stage_uri(ctx.spec.storage.uri, ctx.stage)
            )
        )
    if spec.mlflow is not None:
        _require("mlflow", "spec.tracking.mlflow", "tracking")
        backends.append(
            Mlflow(
                spec.mlflow.tracking_uri,
                spec.mlflow.experiment or ctx.job_name,
                ctx.job_name,
                ctx.stage,
                stage_params(ctx),
            )
        )
    if spec.wandb is not None:
        _require("wandb", "spec.tracking.wandb", "wandb")
        backends.append(
            Wandb(
                spec.wandb.project,
                spec.wandb.entity,
                spec.wandb.mode,
                ctx.job_name,
                ctx.stage,
                stage_params(ctx),
                ctx.scratch("wandb"),
                ctx.stage_uri("wandb/"),
            )
        )
    return backends


def _require(module: str, field: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise StageConfigError(
            f"{field}: the trainer image has no `{module}` package: build it with the "
            f"`{extra}` extra (pip install 'mmalign[{extra}]'), or remove {field}"
        )


def stage_params(ctx: Context) -> dict[str, str]:
    """The stage's spec fields (and the model, data and world size) as flat `a.b` -> text parameters."""
    stage = getattr(ctx.spec.stages, ctx.stage)
    document = {
        "model": ctx.spec.model.uri,
        "data": ctx.spec.data.uri,
        "worldSize": ctx.spec.world_size(ctx.stage),
        ctx.stage: stage.model_dump(by_alias=True, mode="json", exclude={"pod_template", "resources"}),
    }
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif value is not None:
            flat[prefix] = str(value)[:500]  # MLflow's parameter value limit is larger; keep them readable

    walk("", document)
    return flat


# ---------------------------------------------------------------------------------------- backends


class TensorBoard:
    """torch's SummaryWriter into a local folder, copied to `uri` (file or S3) on each flush."""

    name = "tensorboard"

    def __init__(self, local: Path, uri: str) -> None:
        self.local, self.uri = local, uri
        self.writer: Any = None
        self._uploaded: dict[str, tuple[int, int]] = {}  # file name -> (size, mtime_ns) last copied

    def open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.local))

    def log(self, points: list[Point]) -> None:
        for point in points:
            for name, value in point.values.items():
                self.writer.add_scalar(name, value, global_step=point.step, walltime=point.wall_time)

    def flush(self) -> None:
        self.writer.flush()
        self._upload()

    def close(self, outcome: Outcome) -> None:
        self.writer.close()
        self._upload()

    def _upload(self) -> None:
        from mmalign.trainer import storage

        for path in sorted(self.local.glob("events.out.tfevents.*")):
            stat = path.stat()
            if self._uploaded.get(path.name) != (stat.st_size, stat.st_mtime_ns):
                storage.write_bytes(layout.join_uri(self.uri, path.name), path.read_bytes())
                self._uploaded[path.name] = (stat.st_size, stat.st_mtime_ns)


class Mlflow:
    """One MLflow run per stage through MlflowClient (no global `mlflow.start_run` state)."""

    name = "mlflow"

    def __init__(
        self, tracking_uri: str, experiment: str, job: str, stage: str, params: dict[str, str]
    ) -> None:
        self.tracking_uri, self.experiment, self.job, self.stage = tracking_uri, experiment, job, stage
        self.params = params
        self.client: Any = None
        self.run_id = ""

    def open(self) -> None:
        if self.tracking_uri.startswith("file:"):
            # MLflow 3 refuses its file store unless told; the job asked for one by writing file://.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TAG_JOB}` = '{self.job}' and tags.`{TAG_STAGE}` = '{self.stage}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if runs:  # a restarted gang: continue the stage's run
            self.run_id = runs[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(
            experiment_id,
            run_name=f"{self.job}-{self.stage}",
            tags={TAG_JOB: self.job, TAG_STAGE: self.stage},
        )
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in sorted(self.params.items())]
        for start in range(0, len(params), 100):  # log_batch takes at most 100 parameters
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, points: list[Point]) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(name, value, int(point.wall_time * 1000), point.step)
            for point in points
            for name, value in point.values.items()
        ]
        for start in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def flush(self) -> None:
        pass  # every batch is sent as it comes

    def close(self, outcome: Outcome) -> None:
        self.client.set_terminated(self.run_id, status=outcome)


class Wandb:
    """A W&B run per stage (id `<job>-<stage>`, resumed by a restarted gang); offline by default."""

    name = "wandb"

    def __init__(
        self,
        project: str,
        entity: str | None,
        mode: str,
        job: str,
        stage: str,
        params: dict[str, str],
        local: Path,
        uri: str,
    ) -> None:
        self.project, self.entity, self.mode, self.job, self.stage = project, entity, mode, job, stage
        self.params, self.local, self.uri = params, local, uri
        self.run: Any = None

    def open(self) -> None:
        import wandb

        run_id = re.sub(r"[^A-Za-z0-9_-]", "-", f"{self.job}-{self.stage}")[:128]
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            id=run_id,
            name=f"{self.job}-{self.stage}",
            resume="allow",
            dir=str(self.local),
            config=self.params,
            tags=[self.stage],
        )

    def log(self, points: list[Point]) -> None:
        for point in points:
            self.run.log(point.values, step=point.step)

    def flush(self) -> None:
        pass

    def close(self, outcome: Outcome) -> None:
        self.run.finish(exit_code={"FINISHED": 0, "KILLED": int(ExitCode.STOPPED)}.get(outcome, 1))
        if self.mode == "offline":
            from mmalign.trainer import transfer

            transfer.upload_folder(self.local / "wandb", self.uri)  # wandb.init(dir=D) writes D/wandb/<run>/
