"""The progress channel: rank 0 of the trainer prints one line at least every 10 s,

    mmalign-progress {"stage": "dpo", "step": 120, "total": 400, "loss": 0.61, "eta_seconds": 310,
                      "epoch": 0, "metrics": {"reward_accuracy": 0.72}, "checkpoint": "s3://.../step-100/"}

and the operator reads the tail of the node-0 pod's log (`pods/log get`) and copies the LAST such line
into the status. Trainer pods need no RBAC, the operator no S3 credentials. Pure parsing here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

PREFIX = "mmalign-progress "
TAIL_LINES = 200  # a progress line every <= 10 s; 200 lines of other output in between is plenty
LIMIT_BYTES = 256 * 1024


@dataclass(frozen=True)
class ProgressReport:
    stage: str
    step: int
    total: int
    loss: float | None = None
    eta_seconds: int | None = None
    epoch: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None

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


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def parse_line(line: str) -> ProgressReport | None:
    """One log line -> a report, or None when it is not a (well-formed) progress line."""
    start = line.find(PREFIX)
    if start < 0:
        return None
    try:
        data = json.loads(line[start + len(PREFIX):])
        if not isinstance(data, dict):
            return None
        metrics_raw = data.get("metrics") or {}
        metrics = {
            str(k): v for k, v in ((k, _finite(v)) for k, v in metrics_raw.items()) if v is not None
        } if isinstance(metrics_raw, dict) else {}
        eta = _finite(data.get("eta_seconds"))
        checkpoint = data.get("checkpoint")
        return ProgressReport(
            stage=str(data.get("stage", "")),
            step=int(data.get("step", 0)),
            total=int(data.get("total", 0)),
            loss=_finite(data.get("loss")),
            eta_seconds=int(eta) if eta is not None else None,
            epoch=_finite(data.get("epoch")),
            metrics=metrics,
            checkpoint=checkpoint if isinstance(checkpoint, str) and checkpoint else None,
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
