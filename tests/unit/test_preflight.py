"""The media check before step 0 (trainer/preflight.py): missing media fails in seconds with file:line,
placeholders are counted and reported, and the media's content is part of every stage identity.
Local files and a real S3 server (SeaweedFS); one rank, no torch processes."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmalign.api.progress import parse_line
from mmalign.trainer import collate, data, identity, media, models, preflight, progress, storage, transfer
from tests.unit.test_identity import context


def png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)


def write_rows(path: Path, images: list[str | None]) -> Path:
    rows = [{"id": f"q{i}_0", "prompt": "Which?", "chosen": "a", "rejected": "b",
             **({"image": image} if image else {})} for i, image in enumerate(images)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pairs_of(uri: str, **source: Any) -> list[data.PreferencePair]:
    return data.read_pairs(data.DataSource(uri=uri, **source))[0]


@pytest.fixture(autouse=True)
def _no_notes() -> Iterator[None]:
    progress.forget_notes()
    yield
    progress.forget_notes()


def test_missing_images_fail_at_once_with_file_line_and_a_count(tmp_path: Path) -> None:
    for i in range(3):
        png(tmp_path / "img" / f"{i}.png", (i, 0, 0))
    names: list[str | None] = [f"img/{i}.png" for i in range(3)] + [f"img/gone-{i}.png" for i in range(7)] + [None]
    rows = write_rows(tmp_path / "pairs.jsonl", names)
    ctx = context(tmp_path, "reward", **{"data.uri": str(rows)})
    pairs = pairs_of(str(rows))
    started = time.monotonic()
    with pytest.raises(data.DataError) as caught:
        preflight.check(ctx, pairs)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert message.startswith(f"media not found for 7 of 11 pairs (the first 5 here, 2 more): {rows}:4: ")
    assert f"{rows}:4: row 'q3_0': {tmp_path / 'img' / 'gone-0.png'} (no such file)" in message
    assert f"{rows}:8:" in message and f"{rows}:9:" not in message  # the first 5 named, the rest counted
    assert "data.missingMedia: placeholder" in message


def test_placeholder_mode_counts_and_reports_the_missing_media(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               ) -> None:
    png(tmp_path / "img" / "a.png", (1, 2, 3))
    rows = write_rows(tmp_path / "pairs.jsonl", ["img/a.png", "img/gone.png", "img/gone.png"])
    ctx = context(tmp_path, "reward", **{"data.uri": str(rows), "data.missingMedia": "placeholder"})
    stats = data.ReadStats(skipped=4)
    checked = preflight.check(ctx, pairs_of(str(rows)), stats)
    assert (checked.files, checked.pairs_missing) == (2, 2)
    assert "media missing for 2 of 3 pairs" in capsys.readouterr().err
    # every progress line of the stage carries the counts: the operator copies them into the status
    out = io.StringIO()
    progress.Progress("reward", 10, True, out=out, bar=io.StringIO()).update(1, loss=0.5)
    lines = [parse_line(line) for line in out.getvalue().splitlines()]
    assert all(r is not None and r.metrics["missing_media_pairs"] == 2.0 and r.metrics["skipped_lines"] == 4.0
               for r in lines)
    assert lines[-1] is not None and lines[-1].all_metrics()["missing_media_pairs"] == 2.0


def test_the_media_content_is_the_identity_not_the_path_or_mtime(tmp_path: Path) -> None:
    png(tmp_path / "img" / "a.png", (1, 2, 3))
    rows = write_rows(tmp_path / "pairs.jsonl", ["img/a.png", "img/a.png"])
    pairs = pairs_of(str(rows))
    first = preflight.survey(pairs, video_frames=8)
    os.utime(tmp_path / "img" / "a.png", (1, 1))  # a touch or a copy keeps the identity
    assert preflight.survey(pairs, video_frames=8).digest == first.digest
    png(tmp_path / "img" / "a.png", (9, 9, 9))  # the same path, another image
    second = preflight.survey(pairs, video_frames=8)
    assert second.digest != first.digest
    ctx = context(tmp_path, "reward", **{"data.uri": str(rows)})
    assert identity.changed(identity.reward(ctx.spec, pairs, first.digest),
                            identity.reward(ctx.spec, pairs, second.digest)) == ["media"]
    dpo = context(tmp_path, "dpo", **{"data.uri": str(rows)}).spec
    assert identity.changed(identity.reference_logps(identity.dpo(dpo, pairs, first.digest)),
                            identity.reference_logps(identity.dpo(dpo, pairs, second.digest))) == ["media"]


def test_video_frame_folders(tmp_path: Path) -> None:
    for i in range(10):
        png(tmp_path / "v" / "clip" / f"{i:05d}.png", (i, 0, 0))
    (tmp_path / "v" / "empty").mkdir(parents=True)
    rows = tmp_path / "pairs.jsonl"
    rows.write_text("".join(json.dumps({"id": f"q{i}_0", "video": video, "prompt": "p", "chosen": "a",
                                        "rejected": "b"}) + "\n" for i, video in enumerate(["v/clip", "v/empty", "v/film.mp4"])))
    (tmp_path / "v" / "film.mp4").write_bytes(b"not decoded")
    pairs = pairs_of(str(rows))
    checked = preflight.survey(pairs, video_frames=4)
    assert checked.pairs_missing == 2
    assert checked.problems[0].endswith(f"{tmp_path / 'v' / 'empty'} (no frame images in the folder)")
    assert "film.mp4 (a video file: extract its frames into a folder" in checked.problems[1]
    png(tmp_path / "v" / "clip" / "00000.png", (99, 0, 0))  # a frame the loader does not sample
    assert preflight.survey(pairs, video_frames=4).digest == checked.digest
    png(tmp_path / "v" / "clip" / "00006.png", (99, 0, 0))  # one it samples (uniform_indices(10, 4): 1, 3, 6, 8)
    assert preflight.survey(pairs, video_frames=4).digest != checked.digest


def test_the_check_is_bounded_in_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    png(tmp_path / "img" / "a.png", (1, 2, 3))
    pairs = pairs_of(str(write_rows(tmp_path / "pairs.jsonl", ["img/a.png"])))
    assert preflight.survey(pairs, video_frames=8).pairs_missing == 0
    real = preflight.image_id

    def slow(uri: str) -> str:  # storage that answers too slowly
        time.sleep(2)
        return real(uri)

    monkeypatch.setattr(preflight, "image_id", slow)
    started = time.monotonic()
    with pytest.raises(preflight.MediaCheckTimeout, match=f"within 0.2s .*{preflight.CHECK_SECONDS_ENV}"):
        preflight.survey(pairs, video_frames=8, seconds=0.2)
    assert time.monotonic() - started < 1.5  # it does not wait for the slow call


def test_text_only_pairs_have_no_media_identity(tmp_path: Path) -> None:
    pairs = pairs_of(str(write_rows(tmp_path / "pairs.jsonl", [None, None])))
    assert preflight.survey(pairs, video_frames=8) == preflight.MediaCheck()


# ------------------------------------------------------------------------------ S3


def test_s3_media_by_listing_and_head_with_etags(bucket: str, tmp_path: Path) -> None:
    folder = tmp_path / "up"
    many = [f"many/{i}.png" for i in range(preflight.LIST_AT)]  # one listing
    for i, name in enumerate([*many, "few/x.png"]):
        png(folder / name, (i, 1, 1))
    for i in range(3):
        png(folder / "clip" / f"{i}.png", (0, i, 0))
    transfer.upload_folder(folder, f"{bucket}/ds/")
    rows = [*many, "few/x.png", "few/gone.png"]
    lines = [{"id": f"q{i}_0", "image": image, "prompt": "p", "chosen": "a", "rejected": "b"}
             for i, image in enumerate(rows)]
    lines.append({"id": "v_0", "video": "clip", "prompt": "p", "chosen": "a", "rejected": "b"})
    storage.write_text(f"{bucket}/ds/pairs.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    pairs = pairs_of(f"{bucket}/ds/pairs.jsonl")
    checked = preflight.survey(pairs, video_frames=8)
    assert (checked.files, checked.pairs_missing) == (len(rows) + 1, 1)
    assert checked.problems == (f"{bucket}/ds/pairs.jsonl:{len(rows)}: row 'q{len(rows) - 1}_0': "
                                f"{bucket}/ds/few/gone.png (no such file)",)
    png(folder / "x.png", (200, 0, 0))  # rewrite one listed and one HEADed image in place: other ETags
    for name in ("many/0.png", "few/x.png"):
        transfer.upload_file(folder / "x.png", f"{bucket}/ds/{name}")
        again = preflight.survey(pairs, video_frames=8)
        assert again.digest != checked.digest
        checked = again


def test_rows_longer_than_max_length_fail_before_step_0_or_are_skipped_and_counted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """data.maxLength is checked for every pair before planning (the stages call preflight.fitting with
    the model's processor): `error` names the first 5 rows' file:line and counts the rest, `skip` drops
    them and reports them with `skipped_lines` on every progress line."""
    long = "red " * 80  # the response is never cut: these rows cannot fit 48 tokens
    rows = [{"id": f"q{i}_0", "prompt": "Which colour?", "chosen": long if i % 2 else "red", "rejected": "blue"}
            for i in range(16)]  # 8 too long: lines 2, 4, ..., 16
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    processor = models.load_processor("builtin://tiny-text")
    for mode in ("error", "skip"):
        ctx = context(tmp_path, "dpo", **{"data.uri": str(path), "data.maxLength": 48, "data.onBadLine": mode})
        pairs, stats = data.read_pairs(ctx.spec.data)
        collator = collate.Collator.from_spec(ctx.spec, processor, media.MediaLoader.from_spec(ctx.spec.data), None)
        if mode == "error":
            started = time.monotonic()
            with pytest.raises(collate.RowTooLong) as caught:
                preflight.fitting(ctx, pairs, collator, stats)
            assert time.monotonic() - started < 10 and caught.value.exit_code == 3
            message = str(caught.value)
            assert message.startswith("8 of 16 pairs have a row longer than data.maxLength 48 tokens")
            assert "(the first 5 here, 3 more)" in message and "data.onBadLine: skip" in message
            assert f"row 'q1_0' ({path.name}:2): " in message and f"({path.name}:10)" in message
            assert f"({path.name}:12)" not in message  # the first 5 named, the rest counted
            continue
        kept = preflight.fitting(ctx, pairs, collator, stats)
        assert [p.id for p in kept] == [f"q{i}_0" for i in range(0, 16, 2)]
        assert stats.skipped == 8 and f"row 'q1_0' ({path.name}:2): " in stats.skipped_examples[0]
        assert "skipped 8 of 16 pairs longer than data.maxLength 48" in capsys.readouterr().err
        assert collator.pairs(kept).rows == 16  # what is left collates
        out = io.StringIO()
        progress.Progress("dpo", 10, True, out=out, bar=io.StringIO()).update(1, loss=0.5)
        line = parse_line(out.getvalue().splitlines()[-1])
        assert line is not None and line.metrics["skipped_lines"] == 8.0
