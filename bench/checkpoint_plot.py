"""The PNG of `python -m bench.checkpoint`'s report: one checkpoint's upload and stall per ZeRO stage,
and the part-size/concurrency sweep when the report has one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.checkpoint import CONCURRENCY_AT, best


def plot(report: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    stages = report["stages"]
    sweep = next((s["sweep"] for s in stages if "sweep" in s), None)
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(12 if sweep else 6, 4.5), squeeze=False)
    bars = axes[0][0]
    labels, values, colours = [], [], []
    for s in stages:
        z = f"ZeRO-{s['zero_stage']}"
        for label, value, colour in (
            (f"{z}\nceiling upload", s["ceiling"]["seconds"], "tab:gray"),
            (f"{z}\nproject upload", s["project"]["seconds"], "tab:blue"),
            (f"{z}\nsync stall", s["sync"]["save_call_s"], "tab:red"),
            (f"{z}\nasync stall", s["async"]["save_call_s"], "tab:green"),
        ):
            labels.append(label)
            values.append(value)
            colours.append(colour)
    bars.bar(range(len(values)), values, color=colours)
    bars.set_xticks(range(len(values)), labels, fontsize=7)
    bars.set_ylabel("seconds")
    bars.set_title(f"{report['model']}, 2 CPU ranks: one checkpoint", fontsize=8)
    if sweep:
        ax = axes[0][1]
        for kind, marker in (("plain", "o"), ("project", "s")):
            parts = [p for p in sweep[kind] if p["concurrency"] == CONCURRENCY_AT]
            ax.plot(
                [p["part_mib"] for p in parts],
                [p["mb_per_s"] for p in parts],
                marker=marker,
                label=f"{kind}: part size (x{CONCURRENCY_AT})",
            )
            best_part = best(parts)["part_mib"]
            conc = sorted(
                (p for p in sweep[kind] if p["part_mib"] == best_part), key=lambda p: p["concurrency"]
            )
            ax.plot(
                [p["concurrency"] for p in conc],
                [p["mb_per_s"] for p in conc],
                marker=marker,
                linestyle="--",
                label=f"{kind}: concurrency ({best_part} MiB parts)",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("part size (MiB) / concurrency")
        ax.set_ylabel("MB/s (both ranks)")
        ax.set_title(f"sweep: {sweep['bytes'] / 1e9:.2f} GB, local SeaweedFS")
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['environment']['date']}, {report['environment']['machine']}", fontsize=8)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    return png
