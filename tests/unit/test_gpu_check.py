"""The GPU check script (tests/gpu/check.py) without a GPU: the jobs it runs are valid AlignmentJobs with
the configuration it claims (0.5B LLaVA-OV, bf16, ZeRO-3, LoRA off/on), its images have the real sizes,
s/step is read from progress-line arrival times, and it refuses clearly on a machine without CUDA.
(`--cpu-smoke` runs the whole script on CPU in ~2 min: too slow for the suite; see docs/trainer.md.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from mmalign.api import jobfile
from tests.gpu import check


@pytest.mark.parametrize("smoke", [False, True])
def test_the_jobs_are_valid_and_configured_as_the_check_says(tmp_path: Path, smoke: bool) -> None:
    for lora in (False, True):
        text = check.job_yaml(
            "v", tmp_path, tmp_path / "pairs.jsonl", lora=lora, smoke=smoke, steps=3, nproc=2
        )
        spec = jobfile.parse(yaml.safe_load(text)).spec
        assert spec.model.uri == (
            "builtin://tiny-llava-onevision" if smoke else "builtin://random-llava-onevision-0.5b"
        )
        assert (spec.deepspeed.zero_stage, spec.deepspeed.bf16) == (3, not smoke)
        assert spec.resources.proc_per_node == 2 and spec.data.uri == str(tmp_path / "pairs.jsonl")
        assert (
            spec.stages.reward is not None and spec.stages.dpo is not None and spec.stages.score is not None
        )
        assert (spec.stages.reward.lora is not None, spec.stages.dpo.lora is not None) == (lora, lora)
        assert spec.stages.reward.max_steps == spec.stages.dpo.max_steps == 3


def test_the_generated_images_have_real_sizes(tmp_path: Path) -> None:
    rows = check.make_images(tmp_path, check.SIZES, lines=6)
    assert len(rows.read_text().splitlines()) == 6
    edges = set()
    for path in tmp_path.rglob("*.png"):
        with Image.open(path) as image:
            edges.add(max(image.size))
            assert min(image.size) >= 384 * 3 // 4
    assert edges == set(check.SIZES)


def test_seconds_per_step_leaves_out_the_first_step() -> None:
    assert check.seconds_per_step([(1, 0.0), (2, 10.0), (3, 11.0), (5, 14.0)]) == 1.25
    assert check.seconds_per_step([(1, 0.0), (2, 1.0)]) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_a_gpu_it_refuses_unless_cpu_smoke(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device here" in capsys.readouterr().err and not any(tmp_path.iterdir())
