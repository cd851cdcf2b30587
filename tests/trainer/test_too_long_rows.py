"""A row that cannot fit data.maxLength, through the real command (`mmalign run --local`, 1 rank, the
dpo stage): `onBadLine: error` stops the stage before step 0 with the row's file:line (exit 3);
`skip` trains on the rest and reports the row in metrics.json's `skipped_lines`."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mmalign.api.exit_codes import ExitCode
from tests.trainer import jobs


def test_a_too_long_row_stops_the_stage_at_once_or_is_skipped_and_counted(tmp_path: Path) -> None:
    data = jobs.small_colors(tmp_path / "data", queries=4)
    lines = data.read_text().splitlines()
    row = json.loads(lines[2])
    row["chosen"] = "red " * 400  # the response is never cut: cannot fit maxLength 256
    lines[2] = json.dumps(row)
    data.write_text("\n".join(lines) + "\n")
    for mode in ("error", "skip"):
        storage = tmp_path / mode
        job = jobs.write_job(
            tmp_path / f"{mode}.yaml",
            data_uri=str(data),
            storage_uri=storage.as_uri() + "/",
            procs=1,
            stages={"dpo": {"beta": 0.1, "maxSteps": 2, "microBatchSize": 2}},
        )
        document = yaml.safe_load(job.read_text())
        document["spec"]["data"]["onBadLine"] = mode
        job.write_text(yaml.safe_dump(document))
        result = jobs.mmalign(
            "run", str(job), "--local", env=jobs.run_env(scratch=tmp_path / f"scratch-{mode}")
        )
        if mode == "error":
            assert result.returncode == ExitCode.DATA_ERROR, result.stderr[-3000:]
            assert (
                f"1 of {len(lines)} pairs have a row longer than data.maxLength 256 tokens" in result.stderr
            )
            assert f"row '{row['id']}' (pairs.jsonl:3): " in result.stderr
            assert not jobs.progress(result.stdout, "dpo") or all(
                r.event != "step" for r in jobs.progress(result.stdout, "dpo")
            )  # stopped before step 0
            continue
        output = jobs.check(result)
        assert f"dpo: skipped 1 of {len(lines)} pairs longer than data.maxLength 256" in output
        metrics = json.loads((storage / "dpo" / "metrics.json").read_text())
        assert (
            metrics["skipped_lines"] == 1 and metrics["train_pairs"] + metrics["eval_pairs"] == len(lines) - 1
        )
