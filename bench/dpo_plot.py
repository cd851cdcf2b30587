"""The PNG and the docs table of `bench/dpo_vs_trl.py`'s reports.

    python -m bench.dpo_plot bench/results/RUN1.json [RUN2.json ...]

writes RUN.png beside each report (s/step per variant: the median as a bar, every timed step as a dot
coloured by round; peak memory beside it) and prints the markdown table docs/benchmarks.md quotes: one
column pair per run (median s/step with its timed steps, × the baseline), and peak memory × the baseline.
The baseline is TRL's variant with a live reference (`trl:ref-model`) when the run has it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

BASELINE = "trl:ref-model"


def rounds_of(report: dict[str, Any], variant: str) -> list[list[float]]:
    """The timed steps of `variant`, one list per round (dpo_vs_trl stores them round after round)."""
    times = report["variants"][variant]["times"]
    per_round = report["config"]["steps"]
    return [times[i:i + per_round] for i in range(0, len(times), per_round)]


def ratios(report: dict[str, Any], variant: str) -> tuple[float, float] | None:
    """(speed-up, memory) of `variant` against the baseline: the baseline's median s/step over the
    variant's, the variant's peak over the baseline's. None without a baseline in the run."""
    results = report["variants"]
    if BASELINE not in results or "s_per_step" not in results.get(variant, {}):
        return None
    base, mine = results[BASELINE], results[variant]
    return base["s_per_step"] / mine["s_per_step"], mine["peak_gib"] / base["peak_gib"]


def table(reports: list[dict[str, Any]]) -> str:
    """Markdown: a row per variant (in the first report's order), for each run its median s/step with the
    timed steps and × the baseline; then peak memory × the baseline, run after run."""
    variants = [v for v in reports[0]["variants"] if "s_per_step" in reports[0]["variants"][v]]
    header = ["variant"]
    for n in range(1, len(reports) + 1):
        header += [f"run {n}: s/step (timed steps)", "× TRL"]
    header.append("peak memory × TRL" + (" (" + " / ".join(f"run {n}" for n in range(1, len(reports) + 1)) + ")"
                                        if len(reports) > 1 else ""))
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for variant in variants:
        cells, memory = [f"`{variant}`"], []
        for report in reports:
            result = report["variants"].get(variant)
            if result is None or "s_per_step" not in result:
                cells += ["—", "—"]
                memory.append("—")
                continue
            steps = ", ".join(f"{t:.1f}" for t in result["times"])
            got = ratios(report, variant)
            cells += [f"{result['s_per_step']:.1f} ({steps})", f"**{got[0]:.2f}**" if got else "—"]
            memory.append(f"{got[1]:.2f}" if got else f"{result['peak_gib']:.2f} GiB")
        cells.append(" / ".join(memory))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """`path` with the suffix .png; None when matplotlib is not installed (the bench extra brings it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    variants = [v for v, r in report["variants"].items() if "s_per_step" in r]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for x, variant in enumerate(variants):
        result = report["variants"][variant]
        speed.bar(x, result["s_per_step"], color="tab:orange" if variant.startswith("trl") else "tab:blue",
                  alpha=0.6)
        for r, steps in enumerate(rounds_of(report, variant)):
            speed.scatter([x + 0.08 * (r - 0.5)] * len(steps), steps, s=12, color=f"C{r + 2}",
                          label=f"round {r + 1}" if x == 0 else None, zorder=3)
        got = ratios(report, variant)
        if got:
            speed.text(x, result["s_per_step"] / 2, f"{got[0]:.2f}× TRL", ha="center", fontsize=9, weight="bold")
        memory.bar(x, result["peak_gib"], color="tab:gray")
    for ax in (speed, memory):
        ax.set_xticks(range(len(variants)), [v.replace(":", "\n", 1) for v in variants], fontsize=7)
    speed.set_ylabel("s per optimizer step (bar: median)")
    speed.legend(fontsize=7)
    memory.set_ylabel("peak memory, GiB")
    cfg, env = report["config"], report["environment"]
    speed.set_title(
        f"{report['uri']} · {cfg['data']} {cfg.get('image_side', '')} px · {cfg['pairs']} pair(s) · "
        f"{cfg['device']} ({env.get('threads')} threads) · torch {env['torch']} · trl {env.get('trl')}",
        fontsize=7,
    )
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="bench/dpo_vs_trl.py --out files")
    args = parser.parse_args(argv)
    reports = [json.loads(path.read_text()) for path in args.reports]
    for path, report in zip(args.reports, reports, strict=True):
        png = plot(report, path)
        if png:
            print(f"wrote {png}")
    print(table(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
