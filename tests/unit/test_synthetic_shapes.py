"""builtin://synthetic-shapes (trainer/synthetic.py): deterministic per seed, the labels, difficulty and
noise the docstring states, both layouts readable by data.py; bench/ablation.py's summary and plot."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bench import ablation
from mmalign.trainer import builtin, data, synthetic


def test_the_generator_is_deterministic_per_seed(tmp_path: Path) -> None:
    assert synthetic.pair_rows(seed=3) == synthetic.pair_rows(seed=3)
    assert synthetic.pair_rows(seed=3) != synthetic.pair_rows(seed=4)
    first = builtin.export_dataset("builtin://synthetic-shapes?seed=3&queries=36", tmp_path / "a")
    again = builtin.export_dataset("synthetic-shapes", tmp_path / "b", seed=3, options={"queries": "36"})
    assert first.read_text() == again.read_text()
    image = json.loads(first.read_text().splitlines()[0])["image"]
    assert (first.parent / image).read_bytes() == (again.parent / image).read_bytes()


def test_labels_difficulty_and_noise_are_what_the_docstring_says() -> None:
    rows = synthetic.pair_rows(seed=0)  # 144 queries x 3 pairs, noise 0.1
    assert len(rows) == 432
    flipped = [r for r in rows if r["label_flipped"]]
    assert len(flipped) == round(0.1 * 432) == 43
    assert Counter(r["wrong_details"] for r in rows) == {1: 144, 2: 144, 3: 144}
    for row in rows:
        good, bad = ("rejected", "chosen") if row["label_flipped"] else ("chosen", "rejected")
        assert row[f"{good}_reason"].startswith("Correct: ")
        # the critique names each wrong detail: "Wrong: the colour is red, not blue; the side is ..."
        assert (
            row[f"{bad}_reason"].startswith("Wrong: ")
            and row[f"{bad}_reason"].count(", not ") == row["wrong_details"]
        )
        words_differing = set(row["chosen"].rstrip(".").split()) ^ set(row["rejected"].rstrip(".").split())
        assert len(words_differing - {"a", "an", "A", "An"}) == 2 * row["wrong_details"]
    # every detail value is correct for some images and wrong for others: the text alone cannot decide
    for value in (*synthetic.COLOURS, *synthetic.SHAPES, *synthetic.SIDES):
        assert any(value in r["chosen"].split() for r in rows) and any(
            value in r["rejected"].split() for r in rows
        )
    assert not [r for r in synthetic.pair_rows(seed=0, noise=0.0) if r["label_flipped"]]
    with pytest.raises(ValueError, match="noise"):
        synthetic.pair_rows(noise=0.5)


def test_both_layouts_read_as_pairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path))
    pairs = list(
        data.iter_pairs(
            builtin.dataset_file("builtin://synthetic-shapes?queries=36&noise=0"), stats=data.ReadStats()
        )
    )
    assert len(pairs) == 108 and {p.category for p in pairs} == {"short", "long"}
    assert len({p.query_id for p in pairs}) == 36 and all(
        p.rejected_critique.startswith("Wrong") for p in pairs
    )
    ranked = list(
        data.iter_pairs(
            builtin.dataset_file("builtin://synthetic-shapes-ranked?queries=36"), stats=data.ReadStats()
        )
    )
    assert len(ranked) == 36 * 6  # 4 responses, all ranked differently: every pair of them
    with pytest.raises(ValueError, match="unknown option 'size'"):
        builtin.dataset_file("builtin://synthetic-shapes?size=3")


def test_the_bench_summarizes_merges_and_plots(tmp_path: Path) -> None:
    def reward(acc: float) -> dict[str, object]:
        return {"reward": {"eval_acc": acc, "eval_acc_plus": acc / 2}}

    reward_part = {
        "size": "cpu",
        "settings": {},
        "delta_from": "scalar",
        "seeds": [0, 1],
        "dpo": {},
        "reward": {
            "reward-critique-seed0": reward(0.8),
            "reward-critique-seed1": reward(0.6),
            "reward-scalar-seed0": reward(0.7),
            "reward-scalar-seed1": reward(0.7),
        },
    }
    dpo_part = {
        **reward_part,
        "seeds": [0],
        "reward": {},
        "dpo": {
            f"dpo-{v}-{s}": {
                "variant": v,
                "steps": s,
                "dpo": {"eval_reward_accuracy_initial": 0.1, "eval_reward_accuracy": 0.1 + s / 100},
            }
            for v in ablation.DPO_VARIANTS
            for s in (10, 20)
        },
    }
    report = ablation.merge([reward_part, dpo_part])
    assert report["summary"]["reward"]["critique"]["acc"] == pytest.approx(
        {"mean": 0.7, "spread": 0.1, "min": 0.6, "max": 0.8}
    )
    assert report["summary"]["dpo"]["drs"] == {
        "steps": [0, 10, 20],
        "eval_reward_accuracy": pytest.approx([0.1, 0.2, 0.3]),
    }
    assert (
        "| critique | 0.700 ± 0.100 | 0.350 ± 0.050 | 2 | 0: 0.800 / 0.400, 1: 0.600 / 0.300 |"
        in ablation.table(report)
    )
    ablation.plot(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
    # one run per variant with stages.dpo.evalEverySteps: its metrics.json eval_curve is the curve
    curve = [{"step": s, "eval_reward_accuracy": 0.1 + s / 100, "eval_margin": 0.0} for s in (0, 10, 20)]
    dpo_part["dpo"] = {
        f"dpo-{v}": {"variant": v, "steps": 20, "dpo": {"eval_curve": curve, "win_rate": 0.75}}
        for v in ablation.DPO_VARIANTS
    }
    report = ablation.merge([reward_part, dpo_part])
    assert report["summary"]["dpo"]["drs"] == {
        "steps": [0, 10, 20],
        "eval_reward_accuracy": pytest.approx([0.1, 0.2, 0.3]),
        "win_rate": 0.75,
    }
    assert "| drs | 0.100 | 0.200 | 0.300 | 0.750 |" in ablation.table(report)
    ablation.plot(report, tmp_path / "plot-curve.png")
    rows = [
        {"delta": d, "wrong_details": k, "label_flipped": f}
        for d, k, f in ((1.0, 1, False), (3.0, 3, False), (-3.0, 1, True))
    ]
    assert ablation.delta_by_difficulty(rows)["flipped"] == {
        "pairs": 1,
        "mean_delta": -3.0,
        "positive": 0.0,
        "beta_negative": 1.0,  # below −ln(1 + 1/w)/k = −2.197 for w = k = 0.5
    }
