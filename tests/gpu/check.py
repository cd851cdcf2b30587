"""GPU check (not collected by pytest): the three stages (reward -> score -> dpo) of a 0.5B LLaVA-OneVision
(`builtin://random-llava-onevision-0.5b`, random init) on 384-768 px images, bf16, NCCL, ZeRO-3, with
LoRA off and on; records seconds/step, peak GPU memory and the loss curves.

    python tests/gpu/check.py --out DIR [--steps 20] [--nproc N]     # needs CUDA; N default: all GPUs
    python tests/gpu/check.py --out DIR --cpu-smoke                  # tiny model, gloo, 2 steps: the script itself

Writes DIR/check.json: per variant (`lora-off`, `lora-on`) the exit code, wall seconds and per stage
its metrics.json, the losses of every step, seconds/step (median time between consecutive step progress
lines, measured here as they arrive) and the peak GPU memory (`gpu_peak_memory_gib` of the progress
lines: torch.cuda.max_memory_allocated on rank 0's device, trainer/loop.py); DIR/<variant>.log holds
the run's output. Without CUDA it refuses (exit 2) unless --cpu-smoke.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STAGES = ("reward", "score", "dpo")
SIZES = (384, 512, 640, 768)  # image edges (px) the generated set cycles through: real-size inputs
SMOKE_SIZES = (48, 64)
SMOKE_LINES = 16  # rows of the smoke data set (48 pairs): the score stage generates for every pair


def make_images(folder: Path, sizes: tuple[int, ...], lines: int | None = None) -> Path:
    """The built-in synthetic-colors set (JSONL + 32 px images) exported into `folder`, each image
    redrawn at a size from `sizes` (width x height alternating aspect), same colour; `lines`: keep only
    the first rows (the smoke run); returns the JSONL."""
    from PIL import Image

    from mmalign.trainer import builtin

    rows = builtin.export_dataset("synthetic-colors", folder)
    if lines is not None:
        rows.write_text("".join(rows.read_text().splitlines(keepends=True)[:lines]))
    for index, path in enumerate(sorted(folder.rglob("*.png"))):
        with Image.open(path) as small:
            colour = small.convert("RGB").getpixel((small.width // 2, small.height // 2))
        edge = sizes[index % len(sizes)]
        shape = (edge, edge * 3 // 4) if index % 2 else (edge * 3 // 4, edge)
        Image.new("RGB", shape, colour).save(path)
    return rows


def job_yaml(name: str, work: Path, data: Path, *, lora: bool, smoke: bool, steps: int, nproc: int) -> str:
    """One AlignmentJob running all three stages: the GPU config, or the CPU smoke one (tiny model)."""
    model = "builtin://tiny-llava-onevision" if smoke else "builtin://random-llava-onevision-0.5b"
    adapters = "lora: {r: 16, alpha: 32, dropout: 0.0}, " if lora else ""
    batch = 2 if smoke else 4
    return f"""apiVersion: mmalign.io/v1alpha1
kind: AlignmentJob
metadata: {{name: gpu-check-{name}}}
spec:
  model: {{uri: "{model}"}}
  data: {{uri: "{data}", evalFraction: 0.25, maxLength: {512 if smoke else 4096}}}
  storage: {{uri: "file://{work / "runs" / name}/"}}
  resources: {{nodes: 1, procPerNode: {nproc}}}
  deepspeed: {{zeroStage: 3, bf16: {str(not smoke).lower()}, gradientCheckpointing: true}}
  stages:
    reward: {{critique: true, {adapters}learningRate: 1.0e-5, maxSteps: {steps}, microBatchSize: {batch}}}
    score: {{maxNewTokens: {8 if smoke else 32}, batchSize: {batch * 2}}}
    dpo: {{beta: 0.1, {adapters}learningRate: 1.0e-6, maxSteps: {steps}, microBatchSize: {batch}}}
  checkpoint: {{everySteps: {steps}, keepLast: 1}}
"""


def seconds_per_step(arrivals: list[tuple[int, float]]) -> float | None:
    """Median seconds per step from (step, arrival time) of consecutive step lines; the first line
    (start-up, first compile) is left out."""
    rates = [
        (t2 - t1) / (s2 - s1)
        for (s1, t1), (s2, t2) in zip(arrivals[1:], arrivals[2:], strict=False)
        if s2 > s1
    ]
    return round(statistics.median(rates), 3) if rates else None


def run_variant(name: str, job: Path, work: Path, out: Path, smoke: bool) -> dict[str, Any]:
    """`mmalign run JOB --local`, its stdout read line by line (each progress line timestamped)."""
    from mmalign.api.progress import parse_line

    env = dict(
        os.environ,
        MMALIGN_PROGRESS_INTERVAL="0",
        MMALIGN_CACHE=str(work / "cache"),
        MMALIGN_LOCAL_DIR=str(work / "scratch" / name),
        PYTHONUNBUFFERED="1",
    )
    if smoke:
        env["MMALIGN_ALLOW_CPU"] = "1"
    started = time.monotonic()
    stages: dict[str, dict[str, Any]] = {
        s: {"losses": [], "arrivals": [], "peak_gpu_gib": None} for s in STAGES
    }
    with open(out / f"{name}.log", "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mmalign.cli", "run", str(job), "--local"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            report = parse_line(line)
            if report is None or report.stage not in stages or report.event != "step":
                continue
            stage = stages[report.stage]
            stage["arrivals"].append((report.step, time.monotonic()))
            if report.loss is not None:
                stage["losses"].append(report.loss)
            peak = report.metrics.get("gpu_peak_memory_gib")
            if peak is not None:
                stage["peak_gpu_gib"] = max(stage["peak_gpu_gib"] or 0.0, round(peak, 2))
        code = process.wait()
    result: dict[str, Any] = {"exit_code": code, "wall_seconds": round(time.monotonic() - started, 1)}
    for stage_name, stage in stages.items():
        metrics_file = work / "runs" / name / stage_name / "metrics.json"
        result[stage_name] = {
            "seconds_per_step": seconds_per_step(stage.pop("arrivals")),
            **stage,
            "metrics": json.loads(metrics_file.read_text()) if metrics_file.exists() else None,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for check.json and the logs")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, gloo, 2 steps (no GPU)")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per training stage (default 20; smoke 2)"
    )
    parser.add_argument("--nproc", type=int, default=None, help="ranks (default: every GPU; smoke 2)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default OUT/work)")
    args = parser.parse_args(argv)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "tests/gpu/check.py: no CUDA device here; this check needs a GPU machine. "
            "Run it with --cpu-smoke to check the script itself on CPU.",
            file=sys.stderr,
        )
        return 2
    smoke = args.cpu_smoke
    steps = args.steps or (2 if smoke else 20)
    nproc = args.nproc or (2 if smoke else torch.cuda.device_count())
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or out / "work"
    data = make_images(work / "data", SMOKE_SIZES if smoke else SIZES, SMOKE_LINES if smoke else None)
    summary: dict[str, Any] = {
        "mode": "cpu-smoke" if smoke else "gpu",
        "steps": steps,
        "nproc": nproc,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not smoke else "cpu",
        "versions": {
            "torch": torch.__version__,
            **{m: __import__(m).__version__ for m in ("transformers", "deepspeed", "peft")},
        },
        "image_sizes": list(SMOKE_SIZES if smoke else SIZES),
    }
    code = 0
    for name, lora in (("lora-off", False), ("lora-on", True)):
        job = work / f"{name}.yaml"
        job.write_text(job_yaml(name, work, data, lora=lora, smoke=smoke, steps=steps, nproc=nproc))
        summary[name] = run_variant(name, job, work, out, smoke)
        code = code or summary[name]["exit_code"]
        (out / "check.json").write_text(json.dumps(summary, indent=2))  # written after each variant
    print(json.dumps(summary, indent=2)[:4000])
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
