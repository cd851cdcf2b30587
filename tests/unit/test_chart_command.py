"""The command the chart's Deployment runs is one the real `mmalign operator` accepts.

The chart spells out `command: [mmalign, operator]` and its args (the dev cluster's process nodes run
exactly those), so a renamed or removed flag must fail here, not in a user's cluster.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_chart_render import CUSTOM_VALUES, container, render

VARIANTS = {
    "default": [],
    "custom": ["-f", str(CUSTOM_VALUES)],
    "standalone-no-metrics": ["--set", "operator.peering.enabled=false", "--set", "metrics.enabled=false"],
    "one-namespace-debug": ["--set", "operator.watchNamespaces={team-a}", "--set", "operator.logLevel=debug"],
}


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_chart_args_parse_with_the_real_cli(values: list[str]) -> None:
    from mmalign.operator.main import parse_args

    main = container(render(*values))
    assert main["command"] == ["mmalign", "operator"]
    args = parse_args(main["args"])  # argparse exits (SystemExit 2) on an unknown flag or bad value
    if "--all-namespaces" in main["args"]:
        assert args.all_namespaces and not args.namespace
    else:
        assert args.namespace == [a.split("=", 1)[1] for a in main["args"] if a.startswith("--namespace=")]
    ports = {port["name"]: port["containerPort"] for port in main["ports"]}
    assert args.liveness_port == ports["health"]
    assert args.metrics_port == ports.get("metrics", 0)


def test_operator_help_runs_from_the_console_script() -> None:
    """`mmalign operator --help` through the installed entry point, as the image's ENTRYPOINT runs it."""
    script = Path(sys.executable).parent / "mmalign"
    proc = subprocess.run([str(script), "operator", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--all-namespaces", "--namespace", "--peering", "--liveness-port", "--metrics-port",
                 "--log-format", "--verbose"):
        assert flag in proc.stdout
