"""Data reading: the real RewardBench file, both layouts, malformed lines, the split, media."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mmalign.api.exit_codes import ExitCode
from mmalign.api.inputs import DataSource
from mmalign.trainer import data, media

BENCH = Path(__file__).resolve().parents[1] / "data" / "mm_reward_bench.jsonl"
BENCH_SHA256 = "6d7b3589750b8837b54291b601220cdb000593a17b8bb1b81de298e5ebe772b9"


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _row(i: int, **extra: object) -> dict[str, object]:
    return {"id": f"q{i}_{i}", "image": f"mcq/img{i}.png", "prompt": "p", "chosen": "c", "rejected": "r",
            "chosen_reason": "good", "rejected_reason": "bad", **extra}


# ------------------------------------------------------------------------------- the real file


def test_rewardbench_file_is_the_released_one() -> None:
    assert hashlib.sha256(BENCH.read_bytes()).hexdigest() == BENCH_SHA256


def test_rewardbench_loads_all_pairs_queries_and_categories() -> None:
    pairs, stats = data.read_pairs(str(BENCH))
    assert len(pairs) == 170 and stats.skipped == 0
    assert len({p.query_id for p in pairs}) == 46
    assert Counter(p.category for p in pairs) == {"mcq": 42, "long": 37, "short": 34, "safety": 32, "video": 25}
    queries = {c: len({p.query_id for p in pairs if p.category == c}) for c in ("mcq", "long", "short", "safety", "video")}
    assert queries == {"mcq": 10, "long": 10, "short": 10, "safety": 6, "video": 10}


def test_rewardbench_pairs_keep_every_field_and_critiques() -> None:
    rows = [json.loads(line) for line in BENCH.read_text().splitlines()]
    pairs, _ = data.read_pairs(f"file://{BENCH}")
    assert [p.fields for p in pairs] == rows
    video = pairs[-1]
    assert video.media_kind == "video" and video.media == [rows[-1]["video"]]
    # query ids contain '_': the pair id is the part after the LAST one
    assert video.query_id == "v_K_IqYFJKIgk-Scene-016_1"
    assert video.chosen_critique == rows[-1]["chosen_reason"]
    assert len({p.uid for p in pairs}) == 170  # ids repeat within a query; uids do not


# ------------------------------------------------------------------------------- malformed lines


def test_malformed_line_is_an_error_with_file_and_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [_row(1), "{not json", _row(3)])
    with pytest.raises(data.DataError) as error:
        data.read_pairs(str(path))
    assert f"{path}:2" in str(error.value) and "onBadLine: skip" in str(error.value)
    assert error.value.exit_code == ExitCode.DATA_ERROR


def test_missing_field_names_the_field_and_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [_row(1), _row(2, chosen=5)])
    with pytest.raises(data.DataError, match=r"d\.jsonl:2: field 'chosen' must be a string"):
        data.read_pairs(str(path))
    path = _write_jsonl(tmp_path / "e.jsonl", [{"id": "x", "prompt": "p"}])
    with pytest.raises(data.DataError, match=r"e\.jsonl:1: cannot tell the layout"):
        data.read_pairs(str(path))


def test_skip_counts_bad_lines_and_keeps_reading(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [_row(1), "{not json", "[1, 2]", "", _row(5)])
    pairs, stats = data.read_pairs(DataSource(uri=str(path), on_bad_line="skip"))
    assert [p.line for p in pairs] == [1, 5]
    assert stats.skipped == 2 and stats.pairs == 2
    assert stats.skipped_examples[0].startswith(f"{path}:2: not valid JSON")
    assert stats.skipped_examples[1].startswith(f"{path}:3: a row must be a JSON object")


def test_bytes_that_are_not_utf8_cost_one_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(_row(1)).encode() + b"\n\xff\xfe broken\n" + json.dumps(_row(3)).encode() + b"\n")
    with pytest.raises(data.DataError, match=r"d\.jsonl:2: not UTF-8 text"):
        data.read_pairs(str(path))
    pairs, stats = data.read_pairs(DataSource(uri=str(path), on_bad_line="skip"))
    assert [p.line for p in pairs] == [1, 3] and stats.skipped == 1


def test_reading_streams_line_by_line(tmp_path: Path) -> None:
    # The first pair arrives before the reader reaches a broken line further down.
    path = _write_jsonl(tmp_path / "d.jsonl", [_row(1), "{broken"])
    pairs = data.iter_pairs(str(path))
    assert next(pairs).id == "q1_1"
    with pytest.raises(data.DataError):
        next(pairs)


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match="no such file"):
        data.read_pairs(str(tmp_path / "nope.jsonl"))
    with pytest.raises(data.DataError, match="no preference pairs"):
        data.read_pairs(str(_write_jsonl(tmp_path / "empty.jsonl", [])))


# ------------------------------------------------------------------------------- layouts


def test_ranked_rows_expand_into_all_differently_ranked_pairs(tmp_path: Path) -> None:
    scored = {"id": "q7", "image": "long/a.png", "prompt": "Describe.", "responses": [
        {"text": "A", "score": 3.0, "critique": "best"}, {"text": "B", "score": 1.0, "critique": "worst"},
        {"text": "C", "score": 3.0, "critique": "tie with A"}, {"response": "D", "score": 2.0, "reason": "mid"}]}
    ranked = {"id": "q8", "question": "Q?", "category": "safety",
              "responses": [{"answer": "x", "rank": 2}, {"answer": "y", "rank": 1}, {"answer": "z", "rank": 3}]}
    pairs, _ = data.read_pairs(str(_write_jsonl(tmp_path / "r.jsonl", [scored, ranked])))
    first = {(p.chosen, p.rejected) for p in pairs if p.query_id == "q7"}
    assert first == {("A", "B"), ("A", "D"), ("C", "B"), ("C", "D"), ("D", "B")}  # A-C tie: no pair
    second = {(p.chosen, p.rejected) for p in pairs if p.query_id == "q8"}
    assert second == {("y", "x"), ("y", "z"), ("x", "z")}  # rank 1 is best
    a_over_d = next(p for p in pairs if (p.chosen, p.rejected) == ("A", "D"))
    assert (a_over_d.chosen_critique, a_over_d.rejected_critique, a_over_d.category) == ("best", "mid", "long")
    assert a_over_d.fields["chosen"] == "A" and "responses" not in a_over_d.fields
    assert {p.category for p in pairs if p.query_id == "q8"} == {"safety"}
    assert len({p.uid for p in pairs}) == 8


def test_a_ranked_row_whose_responses_all_tie_is_counted_not_lost(tmp_path: Path) -> None:
    tied = {"id": "q", "prompt": "p", "responses": [{"text": "a", "score": 1}, {"text": "b", "score": 1}]}
    ranked = {"id": "r", "prompt": "p", "responses": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}]}
    path = _write_jsonl(tmp_path / "ties.jsonl", [tied, ranked])
    pairs, stats = data.read_pairs(str(path))  # onBadLine: error — a tie is no malformed line
    assert [p.line for p in pairs] == [2] and stats.skipped == 1
    assert stats.skipped_examples == [f"{path}:1: every response of the ranked row has the same score/rank: no "
                                      "pair (give them different scores or drop the row)"]


def test_auto_format_is_fixed_per_file_by_its_first_row(tmp_path: Path) -> None:
    ranked = {"id": "q", "prompt": "p", "responses": [{"text": "a", "score": 2}, {"text": "b", "score": 1}]}
    path = _write_jsonl(tmp_path / "mixed.jsonl", [_row(1), ranked])
    with pytest.raises(data.DataError, match=r"mixed\.jsonl:2: a ranked row .* in a dpo_pairs file"):
        data.read_pairs(str(path))
    path = _write_jsonl(tmp_path / "mixed2.jsonl", ["{bad", ranked, _row(3)])
    pairs, stats = data.read_pairs(DataSource(uri=str(path), on_bad_line="skip"))
    assert [p.line for p in pairs] == [2] and stats.skipped == 2  # line 3 is not a ranked row


def test_ranked_row_without_scores_or_ranks_is_rejected(tmp_path: Path) -> None:
    row = {"id": "q", "prompt": "p", "responses": [{"text": "a"}, {"text": "b", "score": 1}]}
    with pytest.raises(data.DataError, match=r"r\.jsonl:1: responses\[0\] needs a numeric 'score'"):
        data.read_pairs(str(_write_jsonl(tmp_path / "r.jsonl", [row])))


def test_scored_fields_and_explicit_ids(tmp_path: Path) -> None:
    row = _row(1, chosen_reward=1.5, rejected_reward=-0.5, query_id="Q", category="custom")
    pairs, _ = data.read_pairs(str(_write_jsonl(tmp_path / "s.jsonl", [row])))
    assert (pairs[0].chosen_reward, pairs[0].rejected_reward, pairs[0].delta) == (1.5, -0.5, 2.0)
    assert (pairs[0].query_id, pairs[0].category) == ("Q", "custom")


def test_folder_of_shards_reads_every_jsonl_in_name_order(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "shard-00001.jsonl", [_row(2)])
    _write_jsonl(tmp_path / "shard-00000.jsonl", [_row(1)])
    (tmp_path / "manifest.json").write_text("{}")
    pairs, _ = data.read_pairs(str(tmp_path) + "/")
    assert [p.id for p in pairs] == ["q1_1", "q2_2"]


# ------------------------------------------------------------------------------- split


def test_split_keeps_queries_whole_is_deterministic_and_exact() -> None:
    pairs, _ = data.read_pairs(str(BENCH))
    train, held_out = data.split_by_query(pairs, eval_fraction=0.2, seed=3)
    assert len(train) + len(held_out) == 170
    assert not {p.query_id for p in train} & {p.query_id for p in held_out}
    assert len({p.query_id for p in held_out}) == round(46 * 0.2)
    again = data.split_by_query(list(reversed(pairs)), eval_fraction=0.2, seed=3)[1]
    assert {p.uid for p in again} == {p.uid for p in held_out}  # input order does not matter
    other = data.split_by_query(pairs, eval_fraction=0.2, seed=4)[1]
    assert {p.query_id for p in other} != {p.query_id for p in held_out}
    assert data.split_by_query(pairs, eval_fraction=0.0, seed=3)[1] == []


# ------------------------------------------------------------------------------- media


def _pair(tmp_path: Path, **fields: object) -> data.PreferencePair:
    path = _write_jsonl(tmp_path / "m.jsonl", [{**_row(1), **fields}])
    return data.read_pairs(str(path))[0][0]


def test_missing_image_names_row_and_path(tmp_path: Path) -> None:
    pair = _pair(tmp_path)
    with pytest.raises(data.DataError) as error:
        media.MediaLoader().load(pair)
    message = str(error.value)
    assert "'q1_1'" in message and str(tmp_path / "mcq" / "img1.png") in message
    assert "missingMedia: placeholder" in message


def test_placeholder_is_used_and_counted(tmp_path: Path) -> None:
    loader = media.MediaLoader(missing="placeholder")
    images = loader.load(_pair(tmp_path))
    assert len(images) == 1 and images[0].getpixel((0, 0)) == (128, 128, 128)
    assert loader.placeholders == 1 and loader.placeholder_rows == ["m.jsonl:1"]


def test_images_resolve_against_media_uri(tmp_path: Path) -> None:
    (tmp_path / "media" / "mcq").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "media" / "mcq" / "img1.png")
    path = _write_jsonl(tmp_path / "d.jsonl", [_row(1)])
    pair = data.read_pairs(DataSource(uri=str(path), media_uri=str(tmp_path / "media")))[0][0]
    assert media.MediaLoader().load(pair)[0].getpixel((0, 0)) == (1, 2, 3)


def test_video_frame_folder_is_sampled_uniformly(tmp_path: Path) -> None:
    folder = tmp_path / "video" / "clip"
    folder.mkdir(parents=True)
    for i in range(20):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(folder / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not a frame")
    pair = _pair(tmp_path, image=None, video="video/clip")
    frames = media.MediaLoader(video_frames=4).load(pair)
    assert [f.getpixel((0, 0))[0] for f in frames] == [2, 7, 12, 17]
    assert len(media.MediaLoader(video_frames=64).load(pair)) == 20


def test_rewardbench_media_is_missing_and_reported(tmp_path: Path) -> None:
    pairs, _ = data.read_pairs(str(BENCH))
    with pytest.raises(data.DataError, match="media not found"):
        media.MediaLoader().load(pairs[-1])
    assert len(media.MediaLoader(missing="placeholder").load(pairs[-1])) == 1
