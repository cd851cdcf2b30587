"""bench/dpo_vs_trl.py's mmalign side on the tiniest config, without TRL: the benchmark cannot rot
silently in CI (TRL is only installed by `make bench`)."""

from __future__ import annotations

import dataclasses
import math
import sys

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
