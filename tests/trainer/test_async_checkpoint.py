"""asyncUpload under real DeepSpeed (2 torchrun ranks, gloo, ZeRO-2 and ZeRO-3): the step waits only for
the host copy of the states (engine.snapshot), and the checkpoint holds the states of the step it was
taken at even though the training that followed changed every tensor before the files were written.

tests/trainer/snapshot_probe.py holds the background write until steps 3-4 have run; resuming from the
step-2 checkpoint must then reproduce steps 3-4 and the final weights EXACTLY. (The end-to-end resume
tests, test_invariants.py's SIGKILL and test_zero3.py's roll-back, save asynchronously too, but their
writes usually finish before the next optimizer step: this forces the race.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer import jobs


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_async_save_holds_the_step_it_was_taken_at(tmp_path: Path, zero_stage: int) -> None:
    env = jobs.run_env()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(Path(__file__).with_name("snapshot_probe.py")),
            str(tmp_path),
            str(zero_stage),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert report["on_disk_after_save"] == []  # save() returned before any shard was written
        assert report["snapshot_bytes"] > 0
        assert report["state"]["step"] == 2 and report["state"]["position"] == 6
        assert report["losses"][2] != report["losses"][0]  # the weights moved after the snapshot
        assert report["resumed"] == report["losses"][2:], report  # steps 3-4 again, bit for bit
    assert json.loads((tmp_path / "rank-0.json").read_text())["same_final_weights"] is True
