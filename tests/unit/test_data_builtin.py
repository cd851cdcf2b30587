"""builtin://synthetic-colors and `mmalign data inspect`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mmalign.trainer import builtin, data, data_inspect, media

BENCH = Path(__file__).resolve().parents[1] / "data" / "mm_reward_bench.jsonl"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMALIGN_CACHE", str(tmp_path_factory.getbasetemp() / "mmalign-cache"))


def _named_colour(text: str, prompt: str) -> str:
    if text.startswith("Answer: "):  # mcq: map the letter back through the prompt's choices
        letter = text.removeprefix("Answer: ")
        return next(line.split(": ")[1] for line in prompt.splitlines() if line.startswith(f"{letter}: "))
    return next(name for name in builtin.COLOURS if f" {name}" in text)


def _nearest_colour(image: object) -> str:
    from PIL import Image

    mean = image.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))  # type: ignore[attr-defined]
    return min(builtin.COLOURS, key=lambda n: sum((a - b) ** 2 for a, b in zip(builtin.COLOURS[n], mean, strict=False)))


def test_synthetic_colors_preferences_depend_on_the_image() -> None:
    pairs, _ = data.read_pairs("builtin://synthetic-colors")
    assert len(pairs) == 288 and len({p.query_id for p in pairs}) == 96
    assert Counter(p.category for p in pairs) == {"short": 96, "long": 96, "mcq": 96}
    loader = media.MediaLoader()
    chosen_names: Counter[str] = Counter()
    rejected_names: Counter[str] = Counter()
    for pair in pairs:
        (image,) = loader.load(pair)
        seen = _nearest_colour(image)
        assert _named_colour(pair.chosen, pair.prompt) == seen
        assert _named_colour(pair.rejected, pair.prompt) != seen
        assert seen in pair.chosen_critique and seen in pair.rejected_critique
        chosen_names[_named_colour(pair.chosen, pair.prompt)] += 1
        rejected_names[_named_colour(pair.rejected, pair.prompt)] += 1
    # every colour is sometimes right and sometimes wrong: the text alone cannot decide
    assert set(chosen_names) == set(rejected_names) == set(builtin.COLOURS)
    # the very same (prompt, response) text is chosen for one image and rejected for another
    short = [p for p in pairs if p.category == "short"]
    assert {(p.prompt, p.chosen) for p in short} == {(p.prompt, p.rejected) for p in short}


def test_synthetic_colors_is_deterministic_and_exports(tmp_path: Path) -> None:
    path = builtin.export_dataset("synthetic-colors", tmp_path / "export")
    exported, _ = data.read_pairs(str(path))
    cached, _ = data.read_pairs("builtin://synthetic-colors")
    assert [p.fields for p in exported] == [p.fields for p in cached]
    one, two = media.MediaLoader().load(exported[0]), media.MediaLoader().load(cached[0])
    assert one[0].tobytes() == two[0].tobytes()
    other_seed, _ = data.read_pairs("builtin://synthetic-colors?seed=1")
    assert [p.fields for p in other_seed] != [p.fields for p in cached]


def test_unknown_builtin_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="builtin://tiny-qwen2-vl"):
        builtin.parse("builtin://tiny-gpt5")


def test_inspect_summarises_rewardbench(capsys: pytest.CaptureFixture[str]) -> None:
    assert data_inspect.main(["inspect", str(BENCH)]) == 3  # media missing: not clean
    summary = json.loads(capsys.readouterr().out)
    assert (summary["pairs"], summary["queries"]) == (170, 46)
    assert summary["categories"]["safety"] == {"pairs": 32, "queries": 6}
    assert summary["media"]["missing_rows"] == 170
    assert summary["media"]["missing"][0]["line"] == 1
    assert summary["media"]["missing"][0]["path"].endswith("mcq/073712.png")
    assert data_inspect.main(["inspect", str(BENCH), "--no-media-check"]) == 0


def test_inspect_lists_malformed_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = json.loads(BENCH.read_text().splitlines()[0])
    (tmp_path / "mcq").mkdir()
    (tmp_path / "mcq" / "073712.png").write_bytes(b"")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n{oops\n" + json.dumps({"id": "x"}) + "\n")
    assert data_inspect.main(["inspect", str(path)]) == 3
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 1 and summary["media"]["missing_rows"] == 0
    assert [row["line"] for row in summary["malformed"]["rows"]] == [2, 3]
    assert "not valid JSON" in summary["malformed"]["rows"][0]["error"]
