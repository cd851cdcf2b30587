"""spec.tracking and the trainer's /metrics: what a user reads back in TensorBoard, MLflow and Prometheus.

The stage test runs the real reward stage (`mmalign run --local`, torchrun, 2 ranks) with its storage on
a real S3 server (SeaweedFS), TensorBoard under it and an MLflow file store, then reads the event files
back with TensorBoard's own EventAccumulator and the run with MlflowClient: the loss curve is the progress lines' one, step for step, written by rank 0 alone. The
other tests need no torchrun: a slow or failing tracker never stalls the step; a missing library is a
clear error; the Prometheus gauges as scraped over HTTP.
"""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mmalign.api.spec import AlignmentJobManifest
from mmalign.trainer import progress, prom, s3client, storage, tracking
from mmalign.trainer.context import Context, StageConfigError
from mmalign.trainer.engine import Distributed
from tests.s3_server import S3Server, require_weed
from tests.trainer import jobs

STEPS = 3


def test_tensorboard_and_mlflow_show_the_loss_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's storage is a real S3 server (SeaweedFS): the event files reach it through trainer/storage."""
    require_weed()
    monkeypatch.setenv(
        "MLFLOW_ALLOW_FILE_STORE", "true"
    )  # MLflow 3's own reader refuses a file store otherwise
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data_file = jobs.small_colors(tmp_path / "data", queries=4)
    mlruns = (tmp_path / "mlruns").as_uri()
    with S3Server(tmp_path / "s3") as s3:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        s3client.configure()
        job = jobs.write_job(
            tmp_path / "job.yaml",
            data_uri=str(data_file),
            storage_uri=s3.uri("run/"),
            procs=2,
            name="tracked",
            stages={"reward": {"critique": False, "learningRate": 1e-3, "maxSteps": STEPS}},
        )
        document = jobs.yaml.safe_load(job.read_text())
        document["spec"]["tracking"] = {
            "tensorboard": {},
            "mlflow": {"trackingUri": mlruns, "experiment": "colors"},
        }
        job.write_text(jobs.yaml.safe_dump(document))
        with (
            socket.socket() as probe
        ):  # rank 0 serves /metrics as in a pod (test_prometheus_gauges_... scrapes it)
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = jobs.run_env({**s3.env(), "MMALIGN_METRICS_PORT": str(port)}, scratch=tmp_path / "scratch")
        output = jobs.check(jobs.mmalign("run", str(job), "--local", env=env, timeout=400))
        curve = jobs.losses(output, "reward")
        assert sorted(curve) == list(range(1, STEPS + 1))

        # TensorBoard: <storage>/tensorboard/reward/ holds ONE event file (rank 0's)
        files = storage.list_prefix(s3.uri("run/tensorboard/reward/"))
        assert [f.relative.startswith("events.out.tfevents.") for f in files] == [True], files
        logdir = tmp_path / "tensorboard"
        logdir.mkdir()
        (logdir / files[0].relative).write_bytes(storage.read_bytes(files[0].uri))
    events = EventAccumulator(str(logdir))
    events.Reload()
    assert {"loss", "rewards/accuracy", "learning_rate"} <= set(events.Tags()["scalars"])
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(curve)

    # MLflow: experiment "colors", run tracked-reward (tags job/stage), FINISHED, the same curve, the params
    client = MlflowClient(mlruns)
    experiment = client.get_experiment_by_name("colors")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked-reward" and run.info.status == "FINISHED"
    assert run.data.tags["mmalign.io/job"] == "tracked" and run.data.tags["mmalign.io/stage"] == "reward"
    assert run.data.params["reward.learningRate"] == "0.001" and run.data.params["worldSize"] == "2"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert {m.step: m.value for m in history} == pytest.approx(curve)


class SlowBackend:
    """A tracker whose every call takes `delay` seconds (a far or overloaded server), or raises."""

    name = "slow"

    def __init__(self, delay: float, fail: bool = False) -> None:
        self.delay, self.fail = delay, fail
        self.batches: list[list[tracking.Point]] = []
        self.closed: str | None = None

    def open(self) -> None:
        time.sleep(self.delay)

    def log(self, points: list[tracking.Point]) -> None:
        time.sleep(self.delay)
        if self.fail:
            raise ConnectionError("server unreachable")
        self.batches.append(points)

    def flush(self) -> None:
        pass

    def close(self, outcome: tracking.Outcome) -> None:
        self.closed = outcome


def test_a_slow_tracker_never_stalls_the_step(capsys: pytest.CaptureFixture[str]) -> None:
    backend = SlowBackend(delay=0.3)
    tracker = tracking.Tracker(backend, max_pending=50)
    started = time.monotonic()
    for step in range(1, 2001):  # 2000 updates while the backend takes 0.3 s per call
        tracker.log(step, {"loss": 1.0 / step})
    assert time.monotonic() - started < 0.5  # appends only: the training loop never waits on the tracker
    tracker.close("FINISHED", timeout=30)
    delivered = [p.step for batch in backend.batches for p in batch]
    # batched (a few calls, not one per step); the oldest dropped beyond max_pending; the last step kept
    assert len(backend.batches) <= 3 and delivered[-1] == 2000 and delivered == sorted(delivered)
    assert tracker.dropped == 2000 - len(delivered) > 0 and backend.closed == "FINISHED"
    assert "slow was too slow" in capsys.readouterr().err


def test_a_failing_tracker_says_so_once_and_training_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    tracker = tracking.Tracker(SlowBackend(delay=0.0, fail=True))
    for step in range(1, 20):
        tracker.log(step, {"loss": 1.0})
        time.sleep(0.01)
    tracker.close("FAILED")
    err = capsys.readouterr().err
    assert err.count("tracking: slow log failed (ConnectionError: server unreachable)") == 1


ONE_RANK = Distributed(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
SPEC: dict[str, Any] = {
    "model": {"uri": "builtin://tiny-text"},
    "data": {"uri": "builtin://synthetic-colors"},
    "storage": {"uri": "file:///tmp/unused/"},
    "stages": {"reward": {}},
}


def context(tmp_path: Path, tracking_spec: dict[str, Any]) -> Context:
    spec = copy.deepcopy(SPEC)
    spec["storage"]["uri"] = (tmp_path / "store").as_uri() + "/"
    spec["tracking"] = tracking_spec
    manifest = AlignmentJobManifest.model_validate(
        {"apiVersion": "mmalign.io/v1alpha1", "kind": "AlignmentJob", "metadata": {"name": "j"}, "spec": spec}
    )
    return Context(manifest=manifest, stage="reward", dist=ONE_RANK)


def test_a_missing_library_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    ctx = context(tmp_path, {"wandb": {"project": "p"}})
    assert ctx.spec.tracking.wandb is not None and ctx.spec.tracking.wandb.mode == "offline"  # the default
    with pytest.raises(
        StageConfigError, match=r"spec.tracking.wandb: .*no `wandb` package.*mmalign\[wandb\]"
    ):
        tracking.build(ctx)


def test_prometheus_gauges_follow_the_progress(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = context(tmp_path, {})
    with prom.serving(ctx, port=port) as server:
        assert server is not None
        reporter = progress.Progress(
            "reward", total=10, enabled=True, interval=1e9, out=open("/dev/null", "w")
        )
        for step in (1, 2, 3):
            reporter.update(
                step, loss=0.5 / step, metrics={"rewards/accuracy": 0.25 * step, "learning_rate": 1e-3}
            )
            time.sleep(0.05)
        reporter.evaluated(3, {"eval_acc": 0.75})
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    labels = '{alignmentjob="j",stage="reward"}'
    for sample, value in (
        ("mmalign_trainer_step", 3.0),
        ("mmalign_trainer_total_steps", 10.0),
        ("mmalign_trainer_steps_total", 3.0),
        ("mmalign_trainer_loss", 0.5 / 3),
        ("mmalign_trainer_reward_accuracy", 0.75),
        ("mmalign_trainer_eval_reward_accuracy", 0.75),
    ):
        line = next(line for line in text.splitlines() if line.startswith(sample + labels))
        assert float(line.split()[-1]) == pytest.approx(value), line
    throughput = next(
        line for line in text.splitlines() if line.startswith("mmalign_trainer_steps_per_second")
    )
    assert 0 < float(throughput.split()[-1]) < 100
    assert not progress._sinks  # the stage's sinks are gone with it
    assert threading.active_count() < 50


def test_tracking_of_another_rank_is_nothing(tmp_path: Path) -> None:
    ctx = context(tmp_path, {"tensorboard": {}})
    ctx.dist = SimpleNamespace(is_rank_0=False)  # type: ignore[assignment]
    with tracking.for_stage(ctx) as trackers:
        assert trackers == [] and not progress._sinks


def test_wandb_offline_run_is_copied_to_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only where the `wandb` extra is installed (`make test` does not install it)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("MMALIGN_LOCAL_DIR", str(tmp_path / "scratch"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    ctx = context(tmp_path, {"wandb": {"project": "p"}})
    (backend,) = tracking.build(ctx)
    tracker = tracking.Tracker(backend)
    for step in range(1, 6):
        tracker.log(step, {"loss": 1.0 / step})
    tracker.close("FINISHED", timeout=120)
    runs = list((tmp_path / "store" / "reward" / "wandb").glob("offline-run-*-j-reward"))
    assert len(runs) == 1 and (runs[0] / "run-j-reward.wandb").stat().st_size > 0


def test_the_run_ends_with_the_stages_outcome(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmalign.trainer.loop import Stopped

    ctx = context(tmp_path, {})
    for error, outcome in ((None, "FINISHED"), (Stopped("SIGTERM"), "KILLED"), (ValueError("bad"), "FAILED")):
        backend = SlowBackend(delay=0.0)
        monkeypatch.setattr(tracking, "build", lambda ctx, backend=backend: [backend])
        with pytest.raises(type(error)) if error else contextlib.nullcontext():
            with tracking.for_stage(ctx):
                progress.Progress("reward", total=2, enabled=True, out=open("/dev/null", "w")).update(
                    1, loss=0.5
                )
                if error:
                    raise error
        assert backend.closed == outcome
        assert [p.values for batch in backend.batches for p in batch] == [{"loss": 0.5}]
