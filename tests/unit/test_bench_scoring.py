"""bench/scoring.py on the tiniest config: the benchmark cannot rot silently (its own assertion that both
variants write the same critiques runs here too)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from bench import scoring as bench


def test_bench_writes_json_and_png_with_equal_critiques(tmp_path: Path) -> None:
    out = tmp_path / "scoring.json"
    argv = [
        "--model",
        "tiny",
        "--data",
        "text",
        "--pairs",
        "3",
        "--batch-size",
        "2",
        "--tokens",
        "24",
        "--new-tokens",
        "4",
        "--rounds",
        "2",
        "--out",
        str(out),
    ]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["critiques_equal"] is True and report["max_score_difference"] < 1e-4
    naive, stage = report["variants"]["naive"], report["variants"]["stage"]
    assert len(naive["seconds"]) == len(stage["seconds"]) == 2  # interleaved rounds
    assert stage["samples_per_s"] > 0 and stage["tokens_per_s"] > 0 and report["samples"] == 6
    assert stage["speedup"] == naive["median_s"] / stage["median_s"]
    assert stage["speedup_min"] <= stage["speedup_max"]
    with Image.open(out.with_suffix(".png")) as image:
        assert image.size[0] > 0
