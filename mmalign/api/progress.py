"""The progress line: the one channel from the trainer to the operator, its format and its ONE parser.

Rank 0 of the trainer prints one line per report (trainer/progress.py writes them); the operator reads
the tail of the node-0 pod's log (`pods/log get`) and copies the LAST such line into the status, so
trainer pods need no RBAC and the operator no S3 credentials:

    mmalign-progress {"stage": "dpo", "step": 120, "total": 400, "loss": 0.61, "eta_seconds": 310,
                      "epoch": 0, "event": "step", "metrics": {"reward_accuracy": 0.72},
                      "checkpoint": "s3://.../step-00000100/"}

`event` is "start", "step", "checkpoint", "eval" or "end". `checkpoint` is the URI of the last
COMMITTED checkpoint (null before the first) on every line, so the last line alone says everything.
`notices` (omitted when empty) are decisions the user should hear of — an earlier output not reused
and why — also on every line; the operator turns each new one into an Event (reason Recomputing).
Non-finite numbers are sent as null, never as NaN (JSON has none).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

PREFIX = "mmalign-progress "
TAIL_LINES = 200  # the operator's log tail: a line every <= 10 s, 200 lines of other output between is plenty
LIMIT_BYTES = 256 * 1024
EVENTS = ("start", "step", "checkpoint", "eval", "end")
MAX_NOTICES = 8  # notices one stage sends, and the status keeps


@dataclass(frozen=True)
class ProgressReport:
    stage: str
    step: int
    total: int
    event: str = "step"
    loss: float | None = None
    eta_seconds: int | None = None  # whole seconds
    epoch: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    notices: tuple[str, ...] = ()

    def summary(self) -> str:
        """`step/total (pct%)`, the PROGRESS column of `kubectl get aj`."""
        if self.total <= 0:
            return f"{self.step}"
        return f"{self.step}/{self.total} ({100 * self.step // self.total}%)"

    def all_metrics(self) -> dict[str, float]:
        values = dict(self.metrics)
        if self.loss is not None:
            values["loss"] = self.loss
        if self.epoch is not None:
            values["epoch"] = self.epoch
        return values

    def to_line(self) -> str:
        """The log line (no newline): PREFIX + JSON with sorted keys, non-finite numbers as null."""
        record = asdict(self)
        record["loss"] = finite(self.loss)
        record["metrics"] = {k: finite(v) for k, v in self.metrics.items()}
        record["notices"] = list(self.notices)
        if not self.notices:
            del record["notices"]  # the usual line stays as short as before
        return PREFIX + json.dumps(record, sort_keys=True)


def finite(value: object) -> float | None:
    """A JSON-safe number: floats and ints as float, NaN/inf/bools/other types as None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def parse_line(line: str) -> ProgressReport | None:
    """One log line -> a report, or None when it is not a (well-formed) progress line."""
    start = line.find(PREFIX)
    if start < 0:
        return None
    try:
        data: Any = json.loads(line[start + len(PREFIX):])
        if not isinstance(data, dict):
            return None
        raw_metrics = data.get("metrics") or {}
        metrics = {
            str(k): v for k, v in ((k, finite(v)) for k, v in raw_metrics.items()) if v is not None
        } if isinstance(raw_metrics, dict) else {}
        checkpoint = data.get("checkpoint")
        event = data.get("event")
        raw_notices = data.get("notices")
        notices = tuple(n for n in raw_notices if isinstance(n, str) and n) if isinstance(raw_notices, list) else ()
        return ProgressReport(
            stage=str(data.get("stage", "")),
            step=int(data.get("step", 0)),
            total=int(data.get("total", 0)),
            event=event if event in EVENTS else "step",
            loss=finite(data.get("loss")),
            eta_seconds=int(eta) if (eta := finite(data.get("eta_seconds"))) is not None else None,
            epoch=finite(data.get("epoch")),
            metrics=metrics,
            checkpoint=checkpoint if isinstance(checkpoint, str) and checkpoint else None,
            notices=notices,
        )
    except (ValueError, TypeError, AttributeError):
        return None


def last_report(log: str, stage: str | None = None) -> ProgressReport | None:
    """The last well-formed progress line of a log tail (for `stage`, when given)."""
    for line in reversed(log.splitlines()):
        report = parse_line(line)
        if report is not None and (stage is None or report.stage in ("", stage)):
            return report
    return None
