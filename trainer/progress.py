"""Progress: the channel to the operator, and a bar for people.

Rank 0 prints one line to stdout per report, in the format `mmalign.api.progress` defines (and parses,
for the operator): "start", "step" (at least every `interval` seconds while training, default 10,
MMALIGN_PROGRESS_INTERVAL; 0 = every step), "checkpoint", "eval" and "end" (with the final metrics).
When stderr is a terminal, a one-line bar is redrawn there too (no dependency). Other ranks report
nothing. What a stage learned before its reporter existed (`note_metrics`, `notice`) rides along on
every line of that stage. Every update's scalars (loss, the step's metrics, eval and final metrics) also
go to the sinks `add_sink` registered: the experiment trackers (trainer/tracking.py) and the Prometheus
exporter (trainer/prom.py); a sink must return at once (they queue or set gauges).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from mmalign.api import conditions
from mmalign.api.progress import MAX_NOTICES, ProgressReport

INTERVAL_ENV = "MMALIGN_PROGRESS_INTERVAL"  # seconds between "step" lines; tests set 0 to see every step

# What a stage learned before its reporter started (the data check's counts; an earlier output not reused,
# and why), per stage of this process: every line of that stage's reporter carries it, so the operator's
# last line alone has it (the metrics into the job's status, each notice into one Event).
_metrics: dict[str, dict[str, float]] = {}
_notices: dict[str, list[str]] = {}


def note_metrics(stage: str, values: dict[str, float]) -> None:
    """Metrics every later progress line of `stage` reports (rank 0 calls it)."""
    _metrics.setdefault(stage, {}).update(values)


def notice(stage: str, message: str) -> None:
    """A decision the user should see as an Event (`mmalign.api.progress`: `notices`); the first
    MAX_NOTICES of a stage are sent, each shortened like a condition message."""
    kept = _notices.setdefault(stage, [])
    text = conditions.shorten(message)
    if text not in kept and len(kept) < MAX_NOTICES:
        kept.append(text)


Sink = Callable[["Progress", dict[str, float]], None]
"""(the reporter, this update's finite scalars) -> None; called on rank 0 for every update, so it must
not block (the trackers queue, the Prometheus gauges just set)."""
_sinks: list[Sink] = []


def add_sink(sink: Sink) -> None:
    _sinks.append(sink)


def remove_sink(sink: Sink) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


def scalars(loss: float | None, metrics: dict[str, Any] | None) -> dict[str, float]:
    """The numbers of a progress line a tracker can plot: the loss and every finite numeric metric."""
    values = {"loss": loss} if loss is not None else {}
    values.update(metrics or {})
    return {k: float(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def forget_notes() -> None:
    """Drop every stage's notes (a process running another job's stage, tests)."""
    _metrics.clear()
    _notices.clear()


class Progress:
    def __init__(self, stage: str, total: int, enabled: bool, start_step: int = 0, interval: float = 10.0,
                 out: TextIO | None = None, bar: TextIO | None = None) -> None:
        self.stage = stage
        self.total = total
        self.enabled = enabled
        self.interval = interval
        self.out = out or sys.stdout
        tty = bar or sys.stderr
        self.bar = tty if enabled and hasattr(tty, "isatty") and tty.isatty() else None
        self.start_step = start_step
        self.started = time.monotonic()
        self.last_report = 0.0
        self.step = start_step
        self.loss: float | None = None
        self.epoch: int | None = None
        self.metrics: dict[str, Any] = {}
        self.checkpoint_uri: str | None = None  # the last committed checkpoint, sent with every line
        self._report("start")

    @classmethod
    def for_stage(cls, stage: str, total: int, enabled: bool, start_step: int = 0) -> Progress:
        """A stage's reporter, its interval from MMALIGN_PROGRESS_INTERVAL (default 10 s)."""
        interval = float(os.environ.get(INTERVAL_ENV, "10"))
        return cls(stage, total, enabled, start_step=start_step, interval=interval)

    def eta_seconds(self) -> float | None:
        done = self.step - self.start_step  # steps of THIS run (a resumed run's ETA ignores old steps)
        if done <= 0 or self.total <= 0:
            return None
        rate = (time.monotonic() - self.started) / done
        return round(rate * max(0, self.total - self.step), 1)

    def update(self, step: int, loss: float | None = None, epoch: int | None = None,
               metrics: dict[str, Any] | None = None) -> None:
        self.step = step
        if loss is not None:
            self.loss = loss
        if epoch is not None:
            self.epoch = epoch
        if metrics:
            self.metrics.update(metrics)
        now = time.monotonic()
        if now - self.last_report >= self.interval:
            self._report("step")
        self._draw()
        self._emit(scalars(loss, metrics))

    def checkpoint(self, step: int, uri: str) -> None:
        self.step = step
        self.checkpoint_uri = uri
        self._report("checkpoint")

    def evaluated(self, step: int, metrics: dict[str, Any]) -> None:
        self.step = step
        self.metrics.update(metrics)
        self._report("eval")
        self._emit(scalars(None, metrics))

    def finish(self, metrics: dict[str, Any] | None = None) -> None:
        if metrics:
            self.metrics.update(metrics)
        self._report("end")
        self._emit(scalars(None, metrics))
        if self.bar is not None:
            self.bar.write("\n")
            self.bar.flush()

    # ------------------------------------------------------------------------------ output

    def _report(self, event: str) -> None:
        self.last_report = time.monotonic()
        if not self.enabled:
            return
        report = ProgressReport(
            stage=self.stage, step=self.step, total=self.total, event=event, loss=self.loss,
            eta_seconds=None if (eta := self.eta_seconds()) is None else int(eta), epoch=self.epoch,
            metrics={**_metrics.get(self.stage, {}), **self.metrics}, checkpoint=self.checkpoint_uri,
            notices=tuple(_notices.get(self.stage, ())),
        )
        self.out.write(report.to_line() + "\n")
        self.out.flush()

    def _emit(self, values: dict[str, float]) -> None:
        if self.enabled:
            for sink in list(_sinks):
                sink(self, values)

    def _draw(self) -> None:
        if self.bar is None:
            return
        width = 30
        fraction = self.step / self.total if self.total else 1.0
        filled = int(round(width * min(1.0, fraction)))
        eta = self.eta_seconds()
        loss = f" loss {self.loss:.4f}" if self.loss is not None and math.isfinite(self.loss) else ""
        eta_text = f" eta {int(eta) // 60}m{int(eta) % 60:02d}s" if eta is not None else ""
        line = f"\r{self.stage} |{'#' * filled}{'-' * (width - filled)}| {self.step}/{self.total}{loss}{eta_text}"
        self.bar.write(line)
        self.bar.flush()

