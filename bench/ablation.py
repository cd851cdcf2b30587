"""The paper's two claims on the controlled task builtin://synthetic-shapes (trainer/synthetic.py).

    python bench/ablation.py                      # CPU default (see --help for the size and budget)
    python bench/ablation.py --size gpu           # a larger budget for a GPU machine

(a) critique reward model vs scalar reward model: the same base, data, seed and budget, for every seed
    in --seeds; held-out Acc / Acc+ (the reward stage's own evaluation: the critique model GENERATES its
    critique, then scores) -> mean ± spread (half the max − min range) over the seeds.
(b) MM-DPO with Dynamic Reward Scaling vs a fixed β vs β-DPO: the reward model of (a) (--delta-from)
    scores every pair in the score stage (δ = r_w − r_l); each DPO variant then trains on the same
    scored pairs with the same seed for `dpo_steps` steps; its held-out implicit-reward accuracy (h > 0)
    every `dpo_eval_every` steps (stages.dpo.evalEverySteps: metrics.json `eval_curve`) is the curve,
    and the reward model judges the final policy's answers against the reference's (stages.dpo.winRate:
    the win rate on the held-out prompts).

Every run is a real job, `mmalign run JOB --local` (torchrun, 1 process, `mmalign train` per stage), the
way tests/trainer/jobs.py runs them: the bench measures the product, not a re-implementation. Results:
`bench/results/ablation-<size>.json` (every run's metrics.json, the settings, machine, load) and
`bench/results/ablation-<size>.png` (the curves); `--table` prints the Markdown table of docs/paper.md
from a JSON file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from mmalign.trainer import builtin

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DPO_VARIANTS = ("fixed-beta", "drs", "beta-dpo")
DRS_W, DRS_K = 0.5, 0.5  # the spec's defaults (stages.dpo.dynamicRewardScaling)


@dataclasses.dataclass
class Size:
    model: str  # a builtin model URI
    queries: int  # synthetic-shapes queries (3 pairs each)
    reward_epochs: int
    dpo_steps: int  # steps of each DPO run
    dpo_eval_every: int  # the DPO curve's spacing (stages.dpo.evalEverySteps)
    micro_batch: int = 8
    max_new_tokens: int = 32  # critique length in the score stage
    gpus: int = 0  # nvidia.com/gpu of the job: 0 runs it on CPU


SIZES = {
    # 2-core CPU: the tiny Qwen2-VL (tiny.SIZES["tiny"]), 144 queries = 432 pairs, 36 queries held out
    "cpu": Size("builtin://tiny-qwen2-vl", 144, 8, 80, 10),
    # a GPU: 4x the data and twice the epochs on the same tiny base (0.5b random-init models learn
    # nothing in this budget either; a pretrained base belongs in spec.model.uri of a real job)
    "gpu": Size("builtin://tiny-qwen2-vl", 576, 16, 400, 25, gpus=1),
}


def job_document(
    *,
    name: str,
    model: str,
    data_uri: str,
    seed: int,
    stages: dict[str, Any],
    media_uri: str | None = None,
    gpus: int = 0,
) -> dict[str, Any]:
    data = {"uri": data_uri, "evalFraction": 0.25, "maxLength": 256}
    if media_uri:
        data["mediaUri"] = media_uri
    return {
        "apiVersion": "mmalign.io/v1alpha1",
        "kind": "AlignmentJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": model},
            "data": data,
            "storage": {"uri": "file:///unused/"},  # --storage on the command line says where
            "resources": {"nodes": 1, "procPerNode": 1, "requests": {"nvidia.com/gpu": gpus}},
            "deepspeed": {"zeroStage": 2},
            "stages": stages,
            "checkpoint": {"everySteps": 100000, "keepLast": 1},
            "seed": seed,
        },
    }


def reward_stage(critique: bool, size: Size) -> dict[str, Any]:
    # the learning test's recipe (tests/trainer/test_learning.py); the random-init vision tower trains
    return {
        "critique": critique,
        "learningRate": 3e-3,
        "epochs": size.reward_epochs,
        "microBatchSize": size.micro_batch,
        "warmupRatio": 0.1,
        "freezeVisionTower": False,
    }


def dpo_stage(variant: str, size: Size, scored: str, judge: str) -> dict[str, Any]:
    stage: dict[str, Any] = {
        "beta": 0.1,
        "learningRate": 1e-3,
        "microBatchSize": size.micro_batch,
        "freezeVisionTower": False,
        "maxSteps": size.dpo_steps,
        "evalEverySteps": size.dpo_eval_every,  # the curve: metrics.json eval_curve
        "scoredData": scored,
        "winRate": {"rewardModel": {"uri": judge}},  # the RM of (a) judges policy vs reference answers
    }
    if variant == "drs":
        stage["dynamicRewardScaling"] = {"w": DRS_W, "k": DRS_K}
    elif variant == "beta-dpo":
        stage["loss"] = "beta-dpo"
    return stage


_PARTIAL: list[tuple[Path, dict[str, Any]]] = []  # (path, report) to rewrite after every run


def run_job(work: Path, name: str, document: dict[str, Any], stages: str, storage: Path) -> dict[str, Any]:
    """`mmalign run JOB --local --stages S --storage STORE`; returns {stage: metrics.json} + seconds."""
    job = work / "jobs" / f"{name}.yaml"
    job.parent.mkdir(parents=True, exist_ok=True)
    job.write_text(yaml.safe_dump(document, sort_keys=False))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        MMALIGN_PROGRESS_INTERVAL="60",
        MMALIGN_LOCAL_DIR=str(work / "scratch" / name),
    )
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmalign.cli",
            "run",
            str(job),
            "--local",
            "--stages",
            stages,
            "--storage",
            storage.as_uri() + "/",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - started
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-4000:]
        raise RuntimeError(f"{name}: `mmalign run` exited {result.returncode}:\n{tail}")
    out: dict[str, Any] = {"seconds": round(seconds, 1)}
    for stage in stages.split(","):
        out[stage] = json.loads((storage / stage / "metrics.json").read_text())
    print(f"{name}: {seconds:.0f} s", flush=True)
    return out


def _save_partial() -> None:
    for path, report in _PARTIAL:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")


def scored_pairs(folder: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for file in sorted(folder.glob("shard-*.jsonl"))
        for line in file.read_text().splitlines()
    ]


def delta_by_difficulty(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean δ and the share with δ > 0 per number of wrong details, and for the flipped pairs: does δ
    carry the difficulty (and flag the noise)?"""
    groups: dict[str, list[float]] = {}
    for row in rows:
        key = "flipped" if row["label_flipped"] else f"wrong{row['wrong_details']}"
        groups.setdefault(key, []).append(float(row["delta"]))
    # DRS's β(δ) turns negative below δ = −ln(1 + 1/w)/k (losses.dynamic_reward_scaling): how often?
    negative_below = -math.log(1 + 1 / DRS_W) / DRS_K
    return {
        key: {
            "pairs": len(v),
            "mean_delta": statistics.fmean(v),
            "positive": sum(d > 0 for d in v) / len(v),
            "beta_negative": sum(d < negative_below for d in v) / len(v),
        }
        for key, v in sorted(groups.items())
    }


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "spread": (max(values) - min(values)) / 2,
        "min": min(values),
        "max": max(values),
    }


def run_ablation(
    size_name: str,
    seeds: list[int],
    delta_from: str,
    work: Path,
    parts: str,
    partial: Path | None = None,
    kinds: tuple[str, ...] = ("critique", "scalar"),
    variants: tuple[str, ...] = DPO_VARIANTS,
) -> dict[str, Any]:
    """Every run of the ablation; after each one the report so far goes to `partial` (a long run that
    is stopped keeps what it measured)."""
    size = SIZES[size_name]
    report: dict[str, Any] = {
        "size": size_name,
        "settings": dataclasses.asdict(size),
        "seeds": seeds,
        "delta_from": delta_from,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "load_average_start": os.getloadavg(),
        },
        "reward": {},
        "dpo": {},
    }
    if partial is not None:
        _PARTIAL.append((partial, report))
    for seed in seeds:
        data_uri = f"builtin://synthetic-shapes?seed={seed}&queries={size.queries}"
        for kind in ("critique", "scalar"):
            critique = kind == "critique"
            name = f"reward-{kind}-seed{seed}"
            store = work / "store" / f"{kind}-seed{seed}"
            if ("reward" in parts and kind in kinds) or (
                "dpo" in parts and seed == seeds[0] and kind == delta_from
            ):
                document = job_document(
                    name=name,
                    model=size.model,
                    gpus=size.gpus,
                    data_uri=data_uri,
                    seed=seed,
                    stages={"reward": reward_stage(critique, size)},
                )
                report["reward"][name] = run_job(work, name, document, "reward", store)
                _save_partial()
    if "dpo" in parts:
        seed = seeds[0]
        data_uri = f"builtin://synthetic-shapes?seed={seed}&queries={size.queries}"
        store = work / "store" / f"{delta_from}-seed{seed}"
        document = job_document(
            name="score",
            model=size.model,
            gpus=size.gpus,
            data_uri=data_uri,
            seed=seed,
            stages={
                "reward": reward_stage(delta_from == "critique", size),
                "score": {"maxNewTokens": size.max_new_tokens, "batchSize": 16},
            },
        )
        report["score"] = run_job(work, "score", document, "reward,score", store)  # reward: reused
        scored = store / "score" / "scored"
        # the scored shards keep the rows' relative image paths: they resolve against the data's folder
        media = str(Path(builtin.dataset_file(data_uri)).parent) + "/"
        report["score"]["delta_by_difficulty"] = delta_by_difficulty(scored_pairs(scored))
        _save_partial()
        judge = (store / "reward" / "model").as_uri() + "/"
        for variant in variants:
            name = f"dpo-{variant}"
            document = job_document(
                name=name,
                model=size.model,
                gpus=size.gpus,
                data_uri=data_uri,
                seed=seed,
                stages={"dpo": dpo_stage(variant, size, str(scored) + "/", judge)},
                media_uri=media,
            )
            report["dpo"][name] = {
                "variant": variant,
                "steps": size.dpo_steps,
                **run_job(work, name, document, "dpo", work / "store" / name),
            }
            _save_partial()
    report["summary"] = summarize(report)
    report["machine"]["load_average_end"] = os.getloadavg()
    report["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return report


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"reward": {}, "dpo": {}}
    for kind in ("critique", "scalar"):
        named = sorted(
            (n, r["reward"]) for n, r in report["reward"].items() if n.startswith(f"reward-{kind}-")
        )
        runs = [r for _, r in named]
        if runs and "eval_acc" in runs[0]:
            summary["reward"][kind] = {
                "acc": spread([r["eval_acc"] for r in runs]),
                "acc_plus": spread([r["eval_acc_plus"] for r in runs]),
                "runs": len(runs),
                "per_seed": {n.rsplit("-seed", 1)[1]: [r["eval_acc"], r["eval_acc_plus"]] for n, r in named},
            }
    for run in report["dpo"].values():
        if "eval_curve" in run["dpo"]:  # one run per variant, evaluated every evalEverySteps
            summary["dpo"][run["variant"]] = {
                "steps": [p["step"] for p in run["dpo"]["eval_curve"]],
                "eval_reward_accuracy": [p["eval_reward_accuracy"] for p in run["dpo"]["eval_curve"]],
                **({"win_rate": run["dpo"]["win_rate"]} if "win_rate" in run["dpo"] else {}),
            }
            continue
        # results of the earlier layout: one run per budget, its final accuracy a point of the curve
        curve = summary["dpo"].setdefault(run["variant"], {"steps": [0], "eval_reward_accuracy": []})
        if not curve["eval_reward_accuracy"]:
            curve["eval_reward_accuracy"].append(run["dpo"]["eval_reward_accuracy_initial"])
        curve["steps"].append(run["steps"])
        curve["eval_reward_accuracy"].append(run["dpo"]["eval_reward_accuracy"])
    return summary


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from runs of separate --parts (their runs, machines and times kept under `parts`)."""
    joined: dict[str, Any] = {key: reports[0][key] for key in ("size", "settings", "delta_from")}
    joined["seeds"] = sorted({seed for r in reports for seed in r["seeds"]})
    joined["parts"] = [
        {key: r[key] for key in ("seeds", "started", "finished", "machine") if key in r} for r in reports
    ]
    joined["reward"] = {name: run for r in reports for name, run in r["reward"].items()}
    joined["dpo"] = {name: run for r in reports for name, run in r["dpo"].items()}
    for r in reports:
        if "score" in r:
            joined["score"] = r["score"]
    joined["summary"] = summarize(joined)
    return joined


_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))


def plot(report: dict[str, Any], path: Path) -> None:
    """Two panels with PIL (no plotting dependency): (a) Acc/Acc+ bars ± spread per reward model,
    (b) held-out implicit-reward accuracy vs DPO steps per variant. Both y axes 0..1."""
    from PIL import Image, ImageDraw

    summary, width, height, pad = report["summary"], 480, 360, 48
    picture = Image.new("RGB", (2 * width, height), "white")
    draw = ImageDraw.Draw(picture)

    def axes(x0: int, title: str, xlabel: str) -> tuple[int, int, int, int]:
        left, top, right, bottom = x0 + pad, pad, x0 + width - 16, height - pad
        draw.rectangle((left, top, right, bottom), outline="black")
        for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = bottom - tick * (bottom - top)
            draw.line((left - 4, y, left, y), fill="black")
            draw.text((left - 34, y - 6), f"{tick:.2f}", fill="black")
        draw.line(
            (left, bottom - 0.5 * (bottom - top), right, bottom - 0.5 * (bottom - top)), fill=(200, 200, 200)
        )
        draw.text((left, 14), title, fill="black")
        draw.text((left + 4, bottom + 24), xlabel, fill="black")
        return left, top, right, bottom

    left, top, right, bottom = axes(
        0, f"(a) held-out RM Acc / Acc+, {len(report['seeds'])} seeds (bars: mean, whiskers: min-max)", ""
    )
    kinds = [k for k in ("scalar", "critique") if k in summary["reward"]]
    slot = (right - left) / max(len(kinds), 1)
    for i, kind in enumerate(kinds):
        draw.text((left + i * slot + slot * 0.35, bottom + 6), f"{kind} RM", fill="black")
        for j, metric in enumerate(("acc", "acc_plus")):
            row = summary["reward"][kind][metric]
            x = left + i * slot + slot * (0.2 + 0.3 * j)
            y = bottom - row["mean"] * (bottom - top)
            draw.rectangle((x, y, x + slot * 0.28, bottom), fill=_PALETTE[j])
            centre = x + slot * 0.14
            low, high = (bottom - row[k] * (bottom - top) for k in ("min", "max"))
            draw.line((centre, low, centre, high), fill="black", width=2)
            draw.text((x, y - 14), f"{'Acc' if metric == 'acc' else 'Acc+'} {row['mean']:.2f}", fill="black")

    left, top, right, bottom = axes(
        width,
        f"(b) DPO held-out implicit-reward accuracy, delta from the {report['delta_from']} RM",
        "DPO steps",
    )
    curves = summary["dpo"]
    most = max((max(c["steps"]) for c in curves.values()), default=1) or 1
    for index, (variant, curve) in enumerate(curves.items()):
        points = [
            (left + s / most * (right - left), bottom - a * (bottom - top))
            for s, a in zip(curve["steps"], curve["eval_reward_accuracy"], strict=True)
        ]
        colour = _PALETTE[index % len(_PALETTE)]
        draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        draw.text((right - 90, top + 8 + 14 * index), variant, fill=colour)
    for step in next(iter(curves.values()), {"steps": []})["steps"]:
        draw.text((left + step / most * (right - left) - 6, bottom + 6), str(step), fill="black")
    picture.save(path)


def table(report: dict[str, Any]) -> str:
    summary, lines = report["summary"], []
    lines += [
        "| reward model | held-out Acc | held-out Acc+ | runs | per seed: Acc / Acc+ |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, row in summary["reward"].items():
        seeds = ", ".join(f"{seed}: {a:.3f} / {b:.3f}" for seed, (a, b) in row.get("per_seed", {}).items())
        lines.append(
            f"| {kind} | {row['acc']['mean']:.3f} ± {row['acc']['spread']:.3f} | "
            f"{row['acc_plus']['mean']:.3f} ± {row['acc_plus']['spread']:.3f} | {row['runs']} | {seeds} |"
        )
    if summary["dpo"]:
        steps = next(iter(summary["dpo"].values()))["steps"]
        judged = any("win_rate" in curve for curve in summary["dpo"].values())
        lines += [
            "",
            "| DPO variant | "
            + " | ".join(f"step {s}" for s in steps)
            + (" | win rate |" if judged else " |"),
            "| --- |" + " --- |" * (len(steps) + judged),
        ]
        for variant, curve in summary["dpo"].items():
            win = f" {curve['win_rate']:.3f} |" if "win_rate" in curve else (" - |" if judged else "")
            lines.append(
                f"| {variant} | " + " | ".join(f"{a:.3f}" for a in curve["eval_reward_accuracy"]) + " |" + win
            )
    if "score" in report:
        lines += ["", "| pairs | count | mean δ | δ > 0 | DRS β < 0 |", "| --- | --- | --- | --- | --- |"]
        for key, row in report["score"]["delta_by_difficulty"].items():
            negative = f"{row['beta_negative']:.3f}" if "beta_negative" in row else "-"
            lines.append(
                f"| {key} | {row['pairs']} | {row['mean_delta']:.3f} | {row['positive']:.3f} | {negative} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated job (and data) seeds")
    parser.add_argument(
        "--delta-from",
        choices=("scalar", "critique"),
        default="scalar",
        help="which reward model of the first seed scores the pairs for DRS",
    )
    parser.add_argument("--parts", default="reward,dpo", help="reward, dpo or both")
    parser.add_argument("--kinds", default="critique,scalar", help="the reward models of part (a)")
    parser.add_argument("--variants", default=",".join(DPO_VARIANTS), help="the DPO variants of part (b)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/ablation-<size>.json)")
    parser.add_argument("--work", type=Path, help="keep the runs' storage here (default: a temporary folder)")
    parser.add_argument(
        "--table", type=Path, metavar="JSON", help="print the Markdown table of a result file"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="join result files of separate --parts runs (e.g. run side by side) into --out",
    )
    options = parser.parse_args(argv)
    if options.table:
        print(table(json.loads(options.table.read_text())))
        return 0
    if options.merge:
        report = merge([json.loads(path.read_text()) for path in options.merge])
        out = options.out or RESULTS / f"ablation-{report['size']}.json"
        out.write_text(json.dumps(report, indent=1) + "\n")
        plot(report, out.with_suffix(".png"))
        print(table(report))
        return 0
    out = options.out or RESULTS / f"ablation-{options.size}.json"
    work = options.work or Path(tempfile.mkdtemp(prefix="mmalign-ablation-"))
    try:
        report = run_ablation(
            options.size,
            [int(s) for s in options.seeds.split(",")],
            options.delta_from,
            work,
            options.parts,
            out.with_suffix(".partial.json"),
            tuple(options.kinds.split(",")),
            tuple(options.variants.split(",")),
        )
    finally:
        if options.work is None:
            shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"))
    print(table(report))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
