"""GPU check (not collected by pytest): the three stages on one GPU with a ~0.5B-parameter Qwen2-VL
(random init, the tiny tokenizer/processor), NCCL, bf16, ZeRO-3, gradient checkpointing.

    python3 tests/trainer/gpu_run.py OUT_DIR [STEPS]

Writes OUT_DIR/summary.json (per stage: wall seconds, steps, seconds/step, peak GPU memory, final
metrics) and OUT_DIR/log.txt. docs/trainer.md records the numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def build_model(folder: Path) -> int:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from mmalign.trainer import tiny

    tokenizer = tiny.build_tokenizer("qwen2-vl")
    processor = tiny.build_processor("qwen2-vl", tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=1536, intermediate_size=4096, num_hidden_layers=20,
                num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=4, embed_dim=256, hidden_size=1536, num_heads=4, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, mlp_ratio=4)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids(tiny.QWEN_IMAGE),
                           video_token_id=ids(tiny.QWEN_VIDEO), vision_start_token_id=ids(tiny.VISION_START),
                           vision_end_token_id=ids(tiny.VISION_END))
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    out = Path(sys.argv[1])
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/mmalign-gpu")
    work.mkdir(parents=True, exist_ok=True)
    parameters = build_model(work / "model")
    job = work / "job.yaml"
    job.write_text(f"""apiVersion: mmalign.io/v1alpha1
kind: AlignmentJob
metadata: {{name: gpu-0p5b}}
spec:
  model: {{uri: {work / 'model'}}}
  data: {{uri: builtin://synthetic-colors, evalFraction: 0.25, maxLength: 256}}
  storage: {{uri: file://{work}/runs/}}
  resources: {{nodes: 1, procPerNode: 1}}
  deepspeed: {{zeroStage: 3, bf16: true, gradientCheckpointing: true}}
  stages:
    reward: {{critique: true, learningRate: 1.0e-5, maxSteps: {steps}, microBatchSize: 8}}
    score: {{maxNewTokens: 32, batchSize: 32}}
    dpo: {{beta: 0.1, dynamicRewardScaling: {{w: 0.5, k: 0.5}}, sftWeight: 0.25, learningRate: 1.0e-6,
          maxSteps: {steps}, microBatchSize: 8}}
  checkpoint: {{everySteps: 10, keepLast: 1}}
""")
    env = dict(os.environ, MMALIGN_PROGRESS_INTERVAL="0", MMALIGN_CACHE=str(work / "cache"),
               MMALIGN_LOCAL_DIR=str(work / "scratch"), PYTHONUNBUFFERED="1")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mmalign.cli", "run", str(job), "--local"], env=env,
                            capture_output=True, text=True)
    wall = time.monotonic() - started
    (out / "log.txt").write_text(result.stdout + "\n----- stderr -----\n" + result.stderr)
    from mmalign.api.progress import parse_line

    reports = [r for r in map(parse_line, result.stdout.splitlines()) if r]
    summary: dict = {"parameters": parameters, "exit_code": result.returncode, "wall_seconds": round(wall, 1)}
    import torch

    summary["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    summary["versions"] = {"torch": torch.__version__}
    for name in ("transformers", "deepspeed"):
        summary["versions"][name] = __import__(name).__version__
    for stage in ("reward", "score", "dpo"):
        stage_reports = [r for r in reports if r.stage == stage]
        metrics_file = work / "runs" / stage / "metrics.json"
        stage_summary: dict = {"metrics": json.loads(metrics_file.read_text()) if metrics_file.exists() else None}
        steps_seen = [r for r in stage_reports if r.event == "step"]
        if steps_seen:
            stage_summary["peak_gpu_gib"] = max(r.metrics.get("gpu_peak_memory_gib", 0) for r in steps_seen)
            stage_summary["losses"] = [r.loss for r in steps_seen]
        summary[stage] = stage_summary
    for line in result.stderr.splitlines():
        if "[mmalign run] stage" in line and "done in" in line:
            summary.setdefault("stage_seconds", []).append(line.split("] ", 1)[1])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2)[:6000])
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
