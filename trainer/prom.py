"""The trainer's Prometheus metrics: step, loss, reward accuracy and throughput of the running stage.

    with prom.serving(ctx):            # rank 0, when MMALIGN_METRICS_PORT is set (the operator sets it)
        stage.run(ctx)

Rank 0 serves `/metrics` on keys.TRAINER_METRICS_PORT (the pod's container port named `metrics`; the
chart's PodMonitor scrapes node 0's pod) from prometheus_client's own thread; every Progress update sets
the gauges (a sink, never blocking). Labels: `alignmentjob` and `stage` (the PodMonitor adds namespace and
pod). The metric names are this module's REGISTRY: the chart's Grafana dashboard may only query those
or the operator's (tests/unit/test_dashboard.py collects both registries).
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from mmalign.api import keys
from mmalign.trainer import progress
from mmalign.trainer.context import Context, say

REGISTRY = CollectorRegistry(auto_describe=True)  # the trainer's metrics only (no process collectors)
_LABELS = ("alignmentjob", "stage")

STEP = Gauge(
    "mmalign_trainer_step", "The stage's current step (score: pairs scored).", _LABELS, registry=REGISTRY
)
TOTAL = Gauge(
    "mmalign_trainer_total_steps",
    "The stage's last step (score: pairs to score).",
    _LABELS,
    registry=REGISTRY,
)
STEPS = Counter(
    "mmalign_trainer_steps", "Steps done by this process (rate() = throughput).", _LABELS, registry=REGISTRY
)
THROUGHPUT = Gauge(
    "mmalign_trainer_steps_per_second",
    "Steps per second over the last 10 updates.",
    _LABELS,
    registry=REGISTRY,
)
LOSS = Gauge(
    "mmalign_trainer_loss",
    "Training loss of the last optimizer step (mean over ranks).",
    _LABELS,
    registry=REGISTRY,
)
REWARD_ACCURACY = Gauge(
    "mmalign_trainer_reward_accuracy",
    "Train reward accuracy of the last step (reward: r_w > r_l; dpo: implicit reward h > 0).",
    _LABELS,
    registry=REGISTRY,
)
EVAL_ACCURACY = Gauge(
    "mmalign_trainer_eval_reward_accuracy",
    "Held-out reward accuracy of the last evaluation (reward: Acc; dpo: h > 0).",
    _LABELS,
    registry=REGISTRY,
)
LEARNING_RATE = Gauge(
    "mmalign_trainer_learning_rate", "Learning rate of the last step.", _LABELS, registry=REGISTRY
)
ETA = Gauge(
    "mmalign_trainer_eta_seconds", "Estimated seconds to the stage's end.", _LABELS, registry=REGISTRY
)

# progress-line scalar -> gauge (progress.scalars names)
_GAUGES: dict[str, Gauge] = {
    "loss": LOSS,
    "rewards/accuracy": REWARD_ACCURACY,
    "eval_acc": EVAL_ACCURACY,
    "eval_reward_accuracy": EVAL_ACCURACY,
    "learning_rate": LEARNING_RATE,
}


class Exporter:
    """A progress sink that sets the gauges of one (job, stage)."""

    def __init__(self, job: str, stage: str) -> None:
        self.labels = {"alignmentjob": job, "stage": stage}
        self._times: collections.deque[tuple[float, int]] = collections.deque(maxlen=11)
        self._last_step: int | None = None

    def __call__(self, reporter: progress.Progress, values: dict[str, float]) -> None:
        labels = self.labels
        last = reporter.start_step if self._last_step is None else self._last_step
        self._last_step = reporter.step
        STEP.labels(**labels).set(reporter.step)
        TOTAL.labels(**labels).set(reporter.total)
        if reporter.step > last:
            STEPS.labels(**labels).inc(reporter.step - last)
        self._times.append((time.monotonic(), reporter.step))
        (t0, s0), (t1, s1) = self._times[0], self._times[-1]
        if t1 > t0:
            THROUGHPUT.labels(**labels).set((s1 - s0) / (t1 - t0))
        eta = reporter.eta_seconds()
        if eta is not None:
            ETA.labels(**labels).set(eta)
        for name, gauge in _GAUGES.items():
            if name in values:
                gauge.labels(**labels).set(values[name])


@contextlib.contextmanager
def serving(ctx: Context, port: int | None = None) -> Iterator[Any]:
    """Rank 0 serves the gauges while the stage runs, on `port` or $MMALIGN_METRICS_PORT (unset or 0:
    no server, as in `mmalign run --local`; the gauges are still set). A port in use is said, not fatal."""
    if not ctx.dist.is_rank_0:
        yield None
        return
    if port is None:
        port = int(os.environ.get(keys.ENV_METRICS_PORT) or 0)
    server = None
    if port:
        try:
            server, _ = start_http_server(port, registry=REGISTRY)
        except OSError as error:
            say(f"metrics: cannot serve on port {port} ({error}); training goes on without /metrics")
    exporter = Exporter(ctx.job_name, ctx.stage)
    progress.add_sink(exporter)
    try:
        yield server
    finally:
        progress.remove_sink(exporter)
        if server is not None:
            server.shutdown()
