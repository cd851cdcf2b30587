"""Helpers for the trainer's end-to-end tests: small jobs, small data, running stages, reading progress.

Every run goes through the real commands (`mmalign run --local`, i.e. torchrun + `mmalign train`), with
MMALIGN_PROGRESS_INTERVAL=0 so that every optimizer step prints its progress line (the loss
trajectory the invariant tests compare).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from mmalign.api.progress import ProgressReport, parse_line

REPO = Path(__file__).resolve().parents[2]


def small_colors(folder: Path, queries: int = 16, seed: int = 0) -> Path:
    """The first `queries` queries (3 pairs each) of builtin://synthetic-colors as a JSONL file with
    its PNG images beside it: a small, image-dependent preference set read like a user's data."""
    from mmalign.trainer import builtin

    full = folder / "full"
    builtin.export_dataset("synthetic-colors", full, seed=seed)
    rows = [json.loads(line) for line in (full / "pairs.jsonl").read_text().splitlines()]
    keep_queries = []
    for row in rows:
        query = row["id"].rsplit("_", 1)[0]
        if query not in keep_queries:
            keep_queries.append(query)
    # Spread over colours: synthetic-colors cycles through the 8 colours query by query.
    chosen = set(keep_queries[:queries])
    subset = [row for row in rows if row["id"].rsplit("_", 1)[0] in chosen]
    target = folder / "pairs.jsonl"
    target.write_text("".join(json.dumps(row) + "\n" for row in subset))
    for row in subset:
        (folder / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        if not (folder / row["image"]).exists():
            os.link(full / row["image"], folder / row["image"])
    return target


def write_job(path: Path, *, data_uri: str, storage_uri: str, stages: dict[str, Any], procs: int = 2,
              nodes: int = 1, zero_stage: int = 2, gradient_checkpointing: bool = False,
              checkpoint: dict[str, Any] | None = None, eval_fraction: float = 0.25, seed: int = 0,
              name: str = "t", gpus: int | None = 0) -> Path:
    """A job of the tiny Qwen2-VL; `gpus`: nvidia.com/gpu per pod (0: a CPU job, as the tests run; None:
    not written, so the pods get procPerNode GPUs and the trainer refuses to run it on CPU)."""
    deepspeed: dict[str, Any] = {"zeroStage": zero_stage}
    if gradient_checkpointing:
        deepspeed["gradientCheckpointing"] = True
    document = {
        "apiVersion": "mmalign.io/v1alpha1",
        "kind": "AlignmentJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "builtin://tiny-qwen2-vl"},
            "data": {"uri": data_uri, "evalFraction": eval_fraction, "maxLength": 256},
            "storage": {"uri": storage_uri},
            "resources": {"nodes": nodes, "procPerNode": procs,
                          **({} if gpus is None else {"requests": {"nvidia.com/gpu": gpus}})},
            "deepspeed": deepspeed,
            "stages": stages,
            "checkpoint": checkpoint or {"everySteps": 1000, "keepLast": 2},
            "seed": seed,
        },
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def run_env(extra: dict[str, str] | None = None, scratch: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"MMALIGN_PROGRESS_INTERVAL": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "MMALIGN_DIST_TIMEOUT_SECONDS": "300"})
    if scratch is not None:
        env["MMALIGN_LOCAL_DIR"] = str(scratch)
    env.update(extra or {})
    return env


def mmalign(*args: str, env: dict[str, str], timeout: float = 300, cwd: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mmalign.cli", *args], env=env, cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)


def start(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mmalign.cli", *args], env=env, cwd=cwd or REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def progress(output: str, stage: str | None = None) -> list[ProgressReport]:
    reports = [r for r in (parse_line(line) for line in output.splitlines()) if r is not None]
    return [r for r in reports if stage is None or r.stage == stage]


def losses(output: str, stage: str) -> dict[int, float | None]:
    """step -> loss of every "step" report of `stage` (a resumed run overwrites nothing: same steps
    give the same numbers, which the tests check)."""
    return {r.step: r.loss for r in progress(output, stage) if r.event == "step"}


def safetensors_state(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def check(result: subprocess.CompletedProcess[str], code: int = 0) -> str:
    output = (result.stdout or "") + (result.stderr or "")
    assert result.returncode == code, f"exit {result.returncode} (expected {code}):\n{output[-6000:]}"
    return output


def run_until_sigterm(job: Path, env: dict[str, str], stage: str, after_step: int, rank: int | None = None
                      ) -> tuple[int, str]:
    """`mmalign run JOB --local`, then SIGTERM once `stage` reported step `after_step`: to that process
    (the launcher, as the kubelet signals a pod's PID 1; torchrun forwards it to every worker), or with
    `rank` to that worker only (the ranks of a pod that was not signalled must stop with it).
    (exit code, output). Nothing is signalled when the run ends before that step."""
    import signal
    import time

    import psutil

    process = start("run", str(job), "--local", env=env)
    lines: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        report = progress(line, stage)
        if report and report[0].event == "step" and report[0].step == after_step:
            if rank is None:
                process.send_signal(signal.SIGTERM)
                continue
            deadline = time.monotonic() + 10
            while (worker := _worker(psutil.Process(process.pid), rank)) is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert worker is not None, f"no worker of rank {rank}"
            worker.send_signal(signal.SIGTERM)
    return process.wait(timeout=120), "".join(lines)


def is_forked_worker(process: Any) -> bool:
    """A DataLoader worker of a rank (trainer/prefetch.py): forked from it, so the same command line
    and environment (RANK included) as the rank itself (a psutil.Process)."""
    parent = process.parent()
    return parent is not None and parent.cmdline() == process.cmdline()


def _worker(parent: Any, rank: int) -> Any:
    """The `mmalign train` worker of RANK `rank` among the children of a `mmalign run` (a psutil.Process)."""
    import psutil

    for child in parent.children(recursive=True):
        try:
            if "train" in child.cmdline() and child.environ().get("RANK") == str(rank) and not is_forked_worker(child):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None
