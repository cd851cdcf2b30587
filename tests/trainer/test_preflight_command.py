"""A job whose images are missing fails before step 0, in seconds, with file:line (the real worker)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mmalign.api.exit_codes import ExitCode
from tests.trainer import jobs


def test_missing_images_fail_the_stage_before_any_model_loads(tmp_path: Path) -> None:
    pairs = jobs.small_colors(tmp_path / "data", queries=4)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    gone = sorted({row["image"] for row in rows})[1:]  # keep one image: the rows of the others fail
    for image in gone:
        (pairs.parent / image).unlink()
    job = jobs.write_job(tmp_path / "job.yaml", data_uri=str(pairs), storage_uri=(tmp_path / "s").as_uri() + "/",
                         procs=1, stages={"reward": {"critique": False}})
    started = time.monotonic()
    result = jobs.mmalign("train", "--job", str(job), "--stage", "reward",
                          env=jobs.run_env(scratch=tmp_path / "scratch"), timeout=120)
    assert result.returncode == ExitCode.DATA_ERROR, result.stderr[-3000:]
    missing = sum(1 for row in rows if row["image"] in gone)
    first = next(i for i, row in enumerate(rows, 1) if row["image"] in gone)
    assert (f"mmalign: DATA_ERROR (exit 3): media not found for {missing} of {len(rows)} pairs (the first 5 "
            f"here, {missing - 5} more): {pairs}:{first}: row ") in result.stderr
    assert "data.missingMedia: placeholder" in result.stderr  # the advice survives the cut
    assert time.monotonic() - started < 60  # before any step (a torch import and the data read)
