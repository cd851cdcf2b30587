"""RewardBench Acc / Acc+ on hand-made reward tables, and `mmalign metrics`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.trainer import metrics, metrics_report

BENCH = Path(__file__).resolve().parents[1] / "data" / "mm_reward_bench.jsonl"


def test_acc_and_acc_plus_per_category_and_overall() -> None:
    table = metrics.reward_bench([
        ("q1", "mcq", 2.0, 1.0), ("q1", "mcq", 0.5, 0.1),     # q1: all right
        ("q2", "mcq", 1.0, 3.0), ("q2", "mcq", 4.0, 0.0),     # q2: one wrong
        ("q3", "long", 1.0, 1.0),                            # a tie is not a preference: wrong
        ("q4", "long", -1.0, -2.0), ("q4", "long", 0.0, -5.0),  # q4: all right
    ])
    assert list(table) == ["overall", "long", "mcq"]
    assert table["overall"] == {"acc": 5 / 7, "acc_plus": 2 / 4, "pairs": 7, "queries": 4}
    assert table["mcq"] == {"acc": 3 / 4, "acc_plus": 1 / 2, "pairs": 4, "queries": 2}
    assert table["long"] == {"acc": 2 / 3, "acc_plus": 1 / 2, "pairs": 3, "queries": 2}


def test_perfect_and_inverted_reward_models() -> None:
    rows = [(f"q{i // 3}", "short", 1.0, 0.0) for i in range(9)]
    assert metrics.reward_bench(rows)["overall"]["acc_plus"] == 1.0
    inverted = [(q, c, r, w) for q, c, w, r in rows]
    assert metrics.reward_bench(inverted)["overall"] == {"acc": 0.0, "acc_plus": 0.0, "pairs": 9, "queries": 3}


def _scored_bench(tmp_path: Path, wrong_lines: set[int]) -> Path:
    out = []
    for number, line in enumerate(BENCH.read_text().splitlines(), 1):
        row = json.loads(line)
        chosen, rejected = (0.0, 1.0) if number in wrong_lines else (1.0, 0.0)
        row.update(chosen_reward=chosen, rejected_reward=rejected, chosen_critique="", rejected_critique="",
                   delta=chosen - rejected)
        out.append(json.dumps(row))
    path = tmp_path / "scored.jsonl"
    path.write_text("\n".join(out) + "\n")
    return path


def test_metrics_command_on_a_scored_rewardbench_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # lines 1-3 are the three pairs of mcq query 073712; line 170 is a video pair
    assert metrics_report.main([str(_scored_bench(tmp_path, {1, 170}))]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["overall"] == {"acc": 168 / 170, "acc_plus": 44 / 46, "pairs": 170, "queries": 46}
    assert table["mcq"] == {"acc": 41 / 42, "acc_plus": 9 / 10, "pairs": 42, "queries": 10}
    assert table["video"]["acc_plus"] == 9 / 10 and table["safety"]["acc_plus"] == 1.0


def test_metrics_command_rejects_unscored_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert metrics_report.main([str(BENCH)]) == 3
    assert "no chosen_reward/rejected_reward" in capsys.readouterr().err
