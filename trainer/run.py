"""`mmalign run JOB.yaml --local [--storage URI]`: run a job's stages in order on this machine.

Each enabled stage (reward → score → dpo) runs as `torchrun --standalone --nproc-per-node
nodes×procPerNode -m mmalign.cli train --job JOB --stage NAME`, the same worker a pod runs, so
checkpoints, resume and exit codes behave as in a cluster. `--storage` overrides `spec.storage.uri`
(`file://./runs/`, a plain folder, or an s3:// prefix with AWS_* in the environment). A stage whose
output is already complete in storage is skipped by the stage itself, so re-running continues a job.

    mmalign run manifests/examples/tiny-cpu.yaml --local --storage file://./runs/tiny/
"""

from __future__ import annotations

import argparse
import sys
import time

from mmalign.api.exit_codes import ExitCode
from mmalign.trainer.train import add_storage_argument


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmalign run", description="Run an AlignmentJob's stages locally.")
    parser.add_argument("job", help="AlignmentJob YAML file")
    parser.add_argument("--local", action="store_true", required=True,
                        help="run on this machine (the only mode of this command; clusters use kubectl apply)")
    add_storage_argument(parser)
    parser.add_argument("--stages", help="comma-separated subset of the job's stages to run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from pydantic import ValidationError

    from mmalign.trainer.launch import run_torchrun, shutdown_timeout, train_command
    from mmalign.trainer.train import load_manifest, storage_override

    try:
        manifest = load_manifest(args.job, args.storage)
    except (ValidationError, OSError, ValueError) as error:
        print(f"mmalign: CONFIG_ERROR (exit 2): {args.job}: {' '.join(str(error).split())}", file=sys.stderr)
        return int(ExitCode.CONFIG_ERROR)
    spec = manifest.spec
    stages = spec.stages.enabled()
    if args.stages:
        wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in stages]
        if unknown:
            print(f"mmalign: CONFIG_ERROR (exit 2): --stages {','.join(unknown)} not in the job "
                  f"(its stages: {','.join(stages)})", file=sys.stderr)
            return int(ExitCode.CONFIG_ERROR)
        stages = [s for s in stages if s in wanted]
    storage_uri = storage_override(args.storage) if args.storage else None
    timings = {}
    for stage in stages:
        processes, resources = spec.world_size(stage), spec.stage_resources(stage)  # stages.<s>.resources
        print(f"[mmalign run] stage {stage}: {processes} process(es) "
              f"({resources.nodes} node(s) x {resources.proc_per_node})", file=sys.stderr, flush=True)
        started = time.monotonic()
        code = run_torchrun([
            "--standalone", f"--nproc-per-node={processes}", "--max-restarts=0",
            *shutdown_timeout(spec.pod_template.termination_grace_period_seconds),  # SIGTERM: loop.py
            *train_command(args.job, stage, storage_uri),
        ])
        timings[stage] = time.monotonic() - started
        if code != 0:
            print(f"[mmalign run] stage {stage} failed with exit code {code}", file=sys.stderr, flush=True)
            return code
        print(f"[mmalign run] stage {stage} done in {timings[stage]:.1f}s", file=sys.stderr, flush=True)
    print("outputs:")
    for stage in stages:
        label = {"reward": "reward model", "score": "scored pairs", "dpo": "aligned policy"}[stage]
        print(f"  {label:15s} {spec.artifact_uri(stage)}")
        print(f"  {'':15s} metrics: {spec.storage.uri.rstrip('/')}/{stage}/metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
