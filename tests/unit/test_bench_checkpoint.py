"""bench/checkpoint.py's pure parts and its report: the figures docs/benchmarks.md quotes come from these
(the full run needs torchrun, DeepSpeed and SeaweedFS for minutes: `python -m bench.checkpoint`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import checkpoint as bench
from bench import checkpoint_plot


def test_the_best_sweep_point_and_the_stall_ratios() -> None:
    points = [{"part_mib": 8, "mb_per_s": 18.0}, {"part_mib": 16, "mb_per_s": 22.0}]
    assert bench.best(points)["part_mib"] == 16
    summary = bench.stall_summary(sync_s=100.0, async_call_s=10.0, async_extra_s=-5.0)
    assert summary == {"async_call_over_sync": 0.1, "async_call_plus_slowdown_over_sync": 0.1}


def test_a_cut_model_keeps_the_width_and_loads(tmp_path: Path) -> None:
    import transformers

    folder = bench.derived_model("builtin://tiny-text", layers=1, vocab=640, folder=tmp_path / "m")
    config = transformers.AutoConfig.from_pretrained(folder)
    assert (config.num_hidden_layers, config.vocab_size) == (1, 640)
    assert (Path(folder) / "tokenizer.json").exists()


def test_the_plot_reads_a_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the bench extra (`make bench`) brings matplotlib")
    stage = {
        "zero_stage": 3,
        "ceiling": {"seconds": 150.0},
        "project": {"seconds": 110.0},
        "sync": {"save_call_s": 122.0},
        "async": {"save_call_s": 28.0},
        "sweep": {
            "bytes": 2**30,
            "plain": [{"part_mib": 16, "concurrency": 8, "mb_per_s": 22.0}],
            "project": [{"part_mib": 16, "concurrency": 8, "mb_per_s": 12.0}],
        },
    }
    report = {"model": "m", "environment": {"date": "d", "machine": "vm"}, "stages": [stage]}
    png = checkpoint_plot.plot(report, tmp_path / "c.json")
    assert png is not None and png.stat().st_size > 0
