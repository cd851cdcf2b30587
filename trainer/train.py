"""`mmalign train --job JOB.yaml --stage reward|score|dpo [--storage URI]`: one stage, one worker.

Runs under torchrun (every rank runs this); `mmalign launch` (pods) and `mmalign run --local` start it.

    torchrun --standalone --nproc-per-node 2 --no-python \
        mmalign train --job manifests/examples/tiny-cpu.yaml --stage reward --storage file://./runs/

Exit codes (mmalign.api.exit_codes.ExitCode; the operator's failure policy reads them): 0 done, 2 the job spec cannot
run as written, 3 bad data, 4 NaN/inf loss, 5 storage unreachable after retries (retryable), 7 S3 refused
for good (403 access denied / bad keys, 404 no such bucket: the message names the bucket and the Secret
to fix), 8 CUDA out of memory (the message names the micro-batch size and what to try), 9 NCCL/gloo
communication error (retryable), 1 any other crash. `mmalign launch` adds 6 (the master's DNS never
resolved) and 10 (the gang did not assemble within the rendezvous timeout), both retryable. A failure
prints ONE line `mmalign: <KIND> (exit N): <reason>` on stderr (the operator shows it) and, in a pod,
writes it to /dev/termination-log (Kubernetes' termination message; the dev cluster's process node names
a per-container file in MMALIGN_TERMINATION_LOG instead): trainer/failures.py.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from typing import Any

from mmalign.api.stages import STAGE_ORDER
from mmalign.trainer.failures import classify, failure_message, report_failure

STAGE_MODULES = {name: f"mmalign.trainer.stages.{name}" for name in STAGE_ORDER}
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmalign train", description="Run one stage of an AlignmentJob.")
    parser.add_argument("--job", required=True, help="AlignmentJob YAML file (the whole document)")
    parser.add_argument("--stage", required=True, choices=STAGE_ORDER)
    add_storage_argument(parser)
    return parser.parse_args(argv)


def add_storage_argument(parser: argparse.ArgumentParser) -> None:
    """`--storage URI`, the one flag of `mmalign train`, `mmalign launch` and `mmalign run --local`."""
    parser.add_argument("--storage", help="override spec.storage.uri (s3://..., file://... or a path)")


def storage_override(uri: str) -> str:
    """s3:// passes through; a plain path or a relative file://./x becomes an absolute file:/// URI
    (every rank and every printed location then agree, whatever the working directory)."""
    if uri.startswith(("s3://", "file:///")):
        return uri
    from pathlib import Path

    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return Path(path).resolve().as_uri() + "/"


def load_manifest(path: str, storage_uri: str | None) -> Any:
    from mmalign.api.jobfile import load_job

    manifest = load_job(path)
    if storage_uri:
        manifest.spec.storage.uri = storage_override(storage_uri)
    return manifest


def main(argv: list[str] | None = None) -> int:
    code = run_stage(argv)
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        from mmalign.trainer.engine import end_worker

        end_worker(code)  # a torchrun worker skips the interpreter's teardown (see end_worker)
    return code


def run_stage(argv: list[str] | None = None) -> int:
    """Run one stage in this process; every failure becomes an exit code and one line on stderr."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("MMALIGN_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    dist = None
    manifest = None
    try:
        manifest = load_manifest(args.job, args.storage)
        from mmalign.trainer import engine, storage
        from mmalign.trainer.context import Context

        engine.check_device(manifest.spec, args.stage)  # a GPU-shaped stage never trains on CPU unnoticed
        storage.configure_from_spec(manifest.spec.storage)
        dist = engine.init_distributed()
        stage = importlib.import_module(STAGE_MODULES[args.stage])
        ctx = Context(manifest=manifest, stage=args.stage, dist=dist)
        from mmalign.trainer import prom, tracking

        with prom.serving(ctx), tracking.for_stage(ctx):  # rank 0: /metrics and the experiment trackers
            stage.run(ctx)
        return 0
    except KeyboardInterrupt:
        return 130
    except BaseException as error:  # noqa: BLE001 - every failure becomes an exit code + one line
        code, kind = classify(error, manifest, args.stage)
        if code == 1 or os.environ.get("MMALIGN_TRACEBACK"):
            traceback.print_exc()
        report_failure(int(code), kind, failure_message(int(code), error, manifest, args.stage))
        return int(code)
    finally:
        if dist is not None:
            from mmalign.trainer.engine import shutdown_distributed

            try:
                shutdown_distributed()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass


if __name__ == "__main__":
    sys.exit(main())
