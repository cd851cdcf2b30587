"""bench/dpo_vs_trl.py's mmalign side on the tiniest config, without TRL: the benchmark cannot rot
silently in CI (TRL is only installed by `make bench`)."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest

from bench import dpo_vs_trl as bench
from mmalign.trainer import collate, tiny

TINY = bench.BenchConfig(model="tiny", data="image", pairs=2, tokens=48, steps=2, warmup=0, rounds=1)


@pytest.fixture(autouse=True)
def _no_trl(monkeypatch: pytest.MonkeyPatch) -> None:
    # `import trl` raises ImportError here: the mmalign side must not need it
    monkeypatch.setitem(sys.modules, "trl", None)


@pytest.mark.parametrize("reference", ["precomputed", "model"])
def test_mmalign_step_starts_at_log_2_and_trains(reference: str) -> None:
    times, losses = bench.mmalign_steps(TINY, reference, steps=2)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert all(math.isfinite(loss) for loss in losses)
    # step 0: π = π_ref, so h = 0 and the loss is −log σ(0) = log 2
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[1] < losses[0]  # one AdamW step on the same pairs lowers their loss


def test_driver_reports_mmalign_variant_without_trl() -> None:
    report = bench.run_bench(dataclasses.replace(TINY, steps=1), ["mmalign:precomputed"])
    row = report["variants"]["mmalign:precomputed"]
    assert row["s_per_step"] > 0 and row["pairs_per_s"] == pytest.approx(TINY.pairs / row["s_per_step"])
    assert report["batch"]["rows"] == 2 * TINY.pairs


def test_trl_rows_hold_the_tokens_mmalign_trains_on() -> None:
    cfg = bench.BenchConfig(model="tiny", data="text", pairs=2, tokens=48)
    tokenizer = tiny.build_processor("text")
    examples = bench.make_examples(cfg, tokenizer)
    batch = collate.Collator(tokenizer).pairs(examples)
    for index, row in enumerate(bench.trl_rows(examples, tokenizer)):
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        ids += tokenizer(row["chosen"], add_special_tokens=False)["input_ids"]
        assert batch.input_ids[index, :len(ids)].tolist() == ids
        assert int(batch.attention_mask[index].sum()) == len(ids)


def test_frozen_tower_trains_alike_with_and_without_the_reference_tower_handoff() -> None:
    """--freeze-vision: the reference over the policy's tower output (the default) or its own tower
    (`:tower-twice`) gives the same losses, and the driver reports what the handoff buys."""
    cfg = dataclasses.replace(TINY, freeze_vision=True)
    _, handed = bench.mmalign_steps(cfg, "model", steps=2)
    _, twice = bench.mmalign_steps(cfg, "model", steps=2, tower_handoff=False)
    assert handed[0] == pytest.approx(math.log(2), abs=1e-5)
    assert handed == pytest.approx(twice, abs=1e-6)
    report = bench.run_bench(dataclasses.replace(cfg, steps=1), ["mmalign:ref-model", "mmalign:ref-model:tower-twice"])
    assert report["variants"]["mmalign:ref-model"]["speedup_vs_tower_twice"] > 0


def _report(trl: list[float], mine: list[float]) -> dict[str, object]:
    """A dpo_vs_trl report of 2 rounds x 2 timed steps, as run_bench writes it."""
    def result(times: list[float], peak: float) -> dict[str, object]:
        ordered = sorted(times)
        return {"times": times, "peak_gib": peak, "s_per_step": (ordered[1] + ordered[2]) / 2}

    return {"config": {"steps": 2, "data": "image", "pairs": 1, "device": "cpu", "image_side": 448},
            "uri": "builtin://tiny-qwen2-vl", "environment": {"torch": "t", "trl": "1.16.0", "threads": 2},
            "variants": {"trl:ref-model": result(trl, 13.0), "mmalign:precomputed": result(mine, 10.4),
                         "trl:precomputed": {"error": "ValueError: not supported for vision datasets"}}}


def test_the_docs_table_reads_the_ratios_from_the_runs() -> None:
    from bench import dpo_plot

    first, second = _report([70, 72, 68, 71], [26, 27, 25, 28]), _report([64, 66, 70, 69], [30, 33, 32, 31])
    assert dpo_plot.rounds_of(first, "trl:ref-model") == [[70, 72], [68, 71]]
    speed, memory = dpo_plot.ratios(first, "mmalign:precomputed")
    assert speed == pytest.approx(70.5 / 26.5) and memory == pytest.approx(0.8)
    rows = dpo_plot.table([first, second]).splitlines()
    assert rows[0].count("| × TRL |") == 2 and len(rows) == 4  # header, rule, the 2 timed variants (not the refusal)
    mine = next(r for r in rows if "mmalign:precomputed" in r)
    assert "26.5 (26.0, 27.0, 25.0, 28.0)" in mine and "**2.66**" in mine  # run 1: 70.5 / 26.5
    assert "**2.14**" in mine and mine.endswith("0.80 / 0.80 |")  # run 2: 67.5 / 31.5


def test_the_plot_reads_a_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the bench extra (`make bench`) brings matplotlib")
    from bench import dpo_plot

    png = dpo_plot.plot(_report([70, 72, 68, 71], [26, 27, 25, 28]), tmp_path / "run.json")
    assert png == tmp_path / "run.png" and png.stat().st_size > 0


def test_the_step_flops_are_counted_once_and_credited_alike() -> None:
    from bench import flops

    counted = flops.plain_step_flops(TINY)
    # backward: the input gradients and the weight gradients of every trained matmul, about 2x the forward
    assert 1.2 * counted["forward"] < counted["backward"] < 2.5 * counted["forward"]
    assert flops.step_flops(counted, "model") == pytest.approx(2 * counted["forward"] + counted["backward"])
    assert flops.step_flops(counted, "precomputed") == counted["forward"] + counted["backward"]
    report = bench.run_bench(dataclasses.replace(TINY, steps=1), ["mmalign:precomputed"])
    row = report["variants"]["mmalign:precomputed"]
    assert row["mfu"] == pytest.approx(
        flops.step_flops(report["flops"]["plain_step"], "precomputed")
        / (row["s_per_step"] * report["flops"]["matmul_peak_tflops"] * 1e12)
    )
    assert 0 < row["mfu"] < 1 and row["tokens_per_s"] == report["batch"]["real_tokens"] / row["s_per_step"]
