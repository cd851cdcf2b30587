"""Checkpoints at S3 speed: a real ZeRO checkpoint of a 0.5B model, saved and uploaded to the local S3
server by the project's code, against the raw ceiling of the same bytes; the training stall per save with
`asyncUpload` off and on.

    python -m bench.checkpoint                        # 0.5B text model, ZeRO-3 then ZeRO-2, 2 CPU ranks
    python -m bench.checkpoint --layers 6 --vocab 32768 --sweep-mib 0   # its first 6 layers, 32k vocabulary
    python -m bench.checkpoint --zero 3 --model builtin://random-qwen2-vl-0.5b --out bench/results/x.json

(`-m` from the repository root: the worker ranks import `bench` and `tests.s3_server`.) Per ZeRO stage
it runs `torchrun --nproc-per-node 2` of this module (gloo, real DeepSpeed, trainer/engine.py's Engine,
float32 on CPU: the whole 0.5B needs ~16 GB, 7-8 GB per rank); rank 0 starts the S3 server the tests use
(tests/s3_server.py: SeaweedFS `weed mini`) and restarts it with an empty data folder before every upload
(a deleted object's bytes stay in weed's volume files). Each rank trains one step (one short row: the Adam
states must exist), then:

  sweep          (first stage only, `--sweep-mib` of random bytes per rank, both ranks at once as a gang
                 saves) a plain boto3 `upload_file` (TransferConfig part size and concurrency swept, no
                 checksum at all: `request_checksum_calculation="when_required"`) = the ceiling; then the
                 project's `transfer.upload_folder` (SHA-256 per part, stored checksum and size verified)
                 at part sizes/concurrencies set through `s3client.configure`
  write_s        DeepSpeed `save_checkpoint` of this rank's shards into a local folder (Engine.save)
  ceiling        those bytes (both ranks' files), plain boto3 at the sweep's best (or the given) setting
  sync           `Checkpointer.save` with async_upload off: the call blocks for write + upload + commit;
                 its upload + commit is the project's upload of the same bytes (`project`), at the
                 defaults of trainer/s3client.py
  async          `Checkpointer.save` with async_upload on: the call blocks for the host copy of the
                 rank's states only (Engine.snapshot); the loop then keeps stepping while a background
                 thread writes the same files, uploads and commits (those steps timed against the steps
                 before: the background work competes with training for the same cores), and
                 `finish()` joins it

The stall per save = the time the step loop is blocked in `save()` (async: plus the extra time of the
steps that ran beside the upload). Results: JSON (`--out`, default bench/results/checkpoint-0.5b-cpu.json)
and a PNG beside it. Figures: docs/benchmarks.md, "Checkpoints".
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "checkpoint-0.5b-cpu.json"
MIB = 1024 * 1024
# The 1-D sweep: part sizes at CONCURRENCY_AT, then concurrencies at the best part size.
PART_MIB = (8, 16, 32, 64)
CONCURRENCY_AT = 8
CONCURRENCIES = (4, 16)


# ------------------------------------------------------------------------------------------ pure helpers


def best(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep point with the highest throughput."""
    return max(points, key=lambda p: p["mb_per_s"])


def stall_summary(sync_s: float, async_call_s: float, async_extra_s: float) -> dict[str, float]:
    """The async stall as a share of the synchronous save: the call alone, and with the slowed steps."""
    return {
        "async_call_over_sync": async_call_s / sync_s,
        "async_call_plus_slowdown_over_sync": (async_call_s + max(0.0, async_extra_s)) / sync_s,
    }


# ------------------------------------------------------------------------------------------ the worker


def _log(dist: Any, message: str) -> None:
    if dist.is_rank_0:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024 / 1024
    return float("inf")


def _wait_for_memory(gib: float, seconds: float = 600.0) -> bool:
    deadline = time.monotonic() + seconds
    while _available_gib() < gib:
        if time.monotonic() > deadline:
            return False
        print(f"waiting for {gib} GiB of free memory ({_available_gib():.1f} GiB now)", flush=True)
        time.sleep(10)
    return True


class _TimedWrites:
    """The engine as the Checkpointer sees it (checkpoint.SavesShards), timing DeepSpeed's local write
    (`seconds`), an async save's host copy (`snapshot_seconds`, `snapshot_bytes`) and its background
    write of the same files (`background_write_seconds`)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.seconds = 0.0
        self.snapshot_seconds = 0.0
        self.snapshot_bytes = 0
        self.background_write_seconds = 0.0

    def save(self, folder: str, tag: str, client_state: dict[str, Any] | None = None) -> None:
        started = time.monotonic()
        self.engine.save(folder, tag, client_state)
        self.seconds = time.monotonic() - started

    def snapshot(self, folder: str, tag: str, client_state: dict[str, Any] | None = None) -> Any:
        started = time.monotonic()
        snapshot = self.engine.snapshot(folder, tag, client_state)
        self.snapshot_seconds = time.monotonic() - started
        self.snapshot_bytes = snapshot.nbytes
        timed = self

        class Timed:
            def write(self) -> None:
                began = time.monotonic()
                snapshot.write()
                timed.background_write_seconds = time.monotonic() - began

        return Timed()

    def load(self, folder: str, tag: str) -> dict[str, Any]:
        return dict(self.engine.load(folder, tag))

    def load_resized(self, folder: str, tag: str) -> dict[str, Any]:
        return dict(self.engine.load_resized(folder, tag))


def _worker(args: argparse.Namespace) -> None:
    import torch

    from mmalign.api import runtime, stages
    from mmalign.trainer import checkpoint, engine, models, s3client, transfer
    from tests import s3_server

    torch.set_num_threads(1)  # 2 ranks on 2 cores
    dist = engine.init_distributed()
    work = Path(args.workdir)
    server = s3_server.S3Server(work / "s3") if dist.is_rank_0 else None
    if server is not None:
        server.start()
        atexit.register(server.stop)  # a failed rank must not leave weed running
    endpoint = dist.broadcast_object(server.endpoint if server else None)
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": s3_server.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": s3_server.SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    bucket = s3_server.BUCKET
    defaults = (s3client.DEFAULT_CHUNK_BYTES, s3client.DEFAULT_CONCURRENCY)

    def fresh_server() -> None:
        """An empty S3 server (same ports) before every upload, so the disk holds one copy at a time."""
        dist.barrier()
        if server is not None:
            server.stop()
            shutil.rmtree(work / "s3" / "weed-data", ignore_errors=True)
            server.start()
        dist.barrier()
        s3client.configure(endpoint=endpoint, chunk_bytes=defaults[0], concurrency=defaults[1])

    def gang_timed(fn: Callable[[], None]) -> float:
        """Seconds from all ranks starting `fn` to all ranks done (as a gang's save waits for its last rank)."""
        dist.barrier()
        started = time.monotonic()
        fn()
        dist.barrier()
        return time.monotonic() - started

    def total_bytes(files: list[Path]) -> int:
        return int(dist.all_reduce_sum([float(sum(f.stat().st_size for f in files))])[0])

    def plain(files: list[Path], prefix: str, part: int, concurrency: int) -> Callable[[], None]:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                max_pool_connections=max(16, 2 * concurrency),
                request_checksum_calculation="when_required",
            ),
        )
        config = TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=concurrency
        )

        def run() -> None:
            for f in files:
                client.upload_file(str(f), bucket, f"{prefix}/rank-{dist.rank}/{f.name}", Config=config)

        return run

    def project(folder: Path, prefix: str, part: int, concurrency: int) -> Callable[[], None]:  # the sweep
        def run() -> None:
            s3client.configure(endpoint=endpoint, chunk_bytes=part, concurrency=concurrency)
            transfer.upload_folder(folder, f"s3://{bucket}/{prefix}/rank-{dist.rank}/")

        return run

    result: dict[str, Any] = {"zero_stage": args.zero, "model": args.model, "ranks": dist.world_size}

    # -- the sweep, on random bytes (incompressible, like float32 weights; S3 does not compress anyway)
    if args.sweep_mib > 0:
        sweep_dir = work / f"sweep-rank-{dist.rank}"
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with open(sweep_dir / "blob.bin", "wb") as out:
            for _ in range(args.sweep_mib // 64):
                out.write(os.urandom(64 * MIB))
        sweep_files = [sweep_dir / "blob.bin"]
        nbytes = total_bytes(sweep_files)
        points: dict[str, list[dict[str, Any]]] = {"plain": [], "project": []}

        def measure(kind: str, part_mib: int, concurrency: int) -> dict[str, Any]:
            fresh_server()
            make = plain if kind == "plain" else project
            target: Any = sweep_files if kind == "plain" else sweep_dir
            seconds = gang_timed(
                make(target, f"sweep-{kind}-{part_mib}-{concurrency}", part_mib * MIB, concurrency)
            )
            point = {
                "part_mib": part_mib,
                "concurrency": concurrency,
                "seconds": seconds,
                "mb_per_s": nbytes / seconds / 1e6,
                "load": os.getloadavg()[0],
            }
            points[kind].append(point)
            if dist.is_rank_0:
                print(
                    f"sweep {kind} part {part_mib} MiB x {concurrency}: {point['mb_per_s']:.0f} MB/s",
                    flush=True,
                )
            return point

        for kind in ("plain", "project"):
            for part_mib in PART_MIB:
                measure(kind, part_mib, CONCURRENCY_AT)
            best_part = best(points[kind])["part_mib"]
            for concurrency in CONCURRENCIES:
                measure(kind, best_part, concurrency)
        shutil.rmtree(sweep_dir, ignore_errors=True)
        result["sweep"] = {
            "bytes": nbytes,
            **points,
            "best_plain": best(points["plain"]),
            "best_project": best(points["project"]),
        }
        ceiling_setting = (best(points["plain"])["part_mib"], best(points["plain"])["concurrency"])
    else:
        ceiling_setting = (args.ceiling_part_mib, args.ceiling_concurrency)

    # -- the model, one training step (the Adam states exist from the first step on)
    # A shared machine: wait (a while) for the memory the two ranks need rather than OOM-kill a neighbour.
    if not dist.broadcast_object(_wait_for_memory(args.min_free_gib) if dist.is_rank_0 else None):
        raise SystemExit(
            f"less than {args.min_free_gib} GiB of memory available for 10 minutes: not loading the model"
        )
    deepspeed_spec = runtime.DeepSpeedSpec.model_validate({"zeroStage": args.zero, "bf16": False})
    optim = stages.DpoStage.model_validate({"learningRate": 1e-5})
    placement = engine.training_placement(optim, deepspeed_spec, dist)
    model, _ = models.load_model(args.model, placement=placement)
    trained = engine.Engine(model, optim, deepspeed_spec, dist, total_steps=10_000)
    trained.train()
    generator = torch.Generator().manual_seed(dist.rank)
    model_config: Any = model.config
    vocab = min(1000, int(model_config.vocab_size))

    def step() -> float:
        started = time.monotonic()
        ids = torch.randint(0, vocab, (1, args.tokens), generator=generator)  # (1, T)
        loss = trained.model(input_ids=ids, labels=ids).loss
        trained.backward(loss)
        trained.step()
        return time.monotonic() - started

    step()  # allocates the optimizer states
    baseline = [step() for _ in range(args.baseline_steps)]
    _log(dist, f"model built, steps {baseline}")
    result["step_s"] = baseline
    parameters = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trained.module.parameters())
    result["parameters"] = parameters

    # -- the checkpoint's own bytes: written once, uploaded by the ceiling and by the project's code
    keep = work / "keep" / f"rank-{dist.rank:05d}"
    timed = _TimedWrites(trained)
    timed.save(str(keep), "bytes", {"step": 1})
    files = sorted(p for p in (keep / "bytes").rglob("*") if p.is_file())
    result["write_s"] = timed.seconds
    result["checkpoint_bytes"] = total_bytes(files)
    result["files"] = dist.all_gather_object({f.name: f.stat().st_size for f in files})
    fresh_server()
    result["ceiling"] = {
        "part_mib": ceiling_setting[0],
        "concurrency": ceiling_setting[1],
        "seconds": gang_timed(plain(files, "ceiling", ceiling_setting[0] * MIB, ceiling_setting[1])),
    }
    shutil.rmtree(keep, ignore_errors=True)
    _log(dist, f"ceiling: {result['ceiling']['seconds']:.1f} s")

    # -- the Checkpointer, synchronous: the step loop waits for write + upload + commit. Its upload is
    # the project's upload of the same bytes (transfer.upload_folder at the defaults, then _done + commit)
    fresh_server()
    local_root = work / "scratch"
    sync = checkpoint.Checkpointer(
        f"s3://{bucket}/sync/", dist, local_root, every_steps=1, keep_last=1, async_upload=False
    )
    dist.barrier()
    started = time.monotonic()
    sync.save(timed, 2, {}, last=True)
    sync_s = time.monotonic() - started
    sync.finish()
    result["sync"] = {
        "save_call_s": sync_s,
        "write_s": timed.seconds,
        "upload_and_commit_s": sync_s - timed.seconds,
    }
    result["project"] = {
        "part_mib": defaults[0] // MIB,
        "concurrency": defaults[1],
        "seconds": sync_s - timed.seconds,
    }
    for name in ("ceiling", "project"):
        result[name]["mb_per_s"] = result["checkpoint_bytes"] / result[name]["seconds"] / 1e6
    result["project_over_ceiling"] = result["ceiling"]["seconds"] / result["project"]["seconds"]
    _log(dist, f"sync save: {sync_s:.1f} s (write {timed.seconds:.1f} s)")

    # -- asynchronous: the call returns after the write; the loop steps while the upload runs
    fresh_server()
    background = checkpoint.Checkpointer(
        f"s3://{bucket}/async/", dist, local_root, every_steps=1, keep_last=1, async_upload=True
    )
    dist.barrier()
    started = time.monotonic()
    background.save(timed, 3, {}, last=True)
    call_s = time.monotonic() - started
    beside: list[float] = []
    # Ranks step together (collectives in every step): both stop once neither is still uploading. The
    # upload thread is the Checkpointer's own (no public "is it done" yet: a bench-only look).
    while dist.any(background._thread is not None and background._thread.is_alive()):
        if len(beside) >= args.max_async_steps:
            break
        beside.append(step())
    started = time.monotonic()
    background.finish()
    wait_s = time.monotonic() - started
    reference = statistics.median(baseline)
    extra_s = sum(s - reference for s in beside)
    result["async"] = {
        "save_call_s": call_s,
        "snapshot_s": timed.snapshot_seconds,
        "snapshot_bytes_per_rank": dist.all_gather_object(timed.snapshot_bytes),
        "background_write_s": dist.all_gather_object(timed.background_write_seconds),
        "steps_beside_upload": beside,
        "extra_step_s": extra_s,
        "finish_wait_s": wait_s,
        "write_to_commit_s": background.last_save_seconds,
    }
    result.update(stall_summary(sync_s, call_s, extra_s))
    _log(
        dist,
        f"async save: call {call_s:.1f} s (snapshot {timed.snapshot_seconds:.1f} s), {len(beside)} steps "
        f"beside the write + upload, finish {wait_s:.1f} s",
    )
    fresh_server()
    shutil.rmtree(local_root, ignore_errors=True)
    if server is not None:
        server.stop()
        Path(args.result).write_text(json.dumps(result, indent=2))
    dist.barrier()
    engine.end_worker(0)


# ------------------------------------------------------------------------------------------ the driver


def derived_model(uri: str, layers: int, vocab: int, folder: Path) -> str:
    """A random-init Hugging Face folder of `uri`'s shape (text models) with fewer layers and a smaller
    vocabulary: the same width and files, fewer bytes (for a machine without the 0.5B's ~16 GB)."""
    import transformers

    from mmalign.trainer import models

    source = Path(models.model_dir(uri))
    config = transformers.AutoConfig.from_pretrained(source)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    config.vocab_size = vocab
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return str(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_stage(
    args: argparse.Namespace, zero: int, sweep_mib: int, ceiling: tuple[int, int]
) -> dict[str, Any]:
    """torchrun 2 ranks of this module's worker for one ZeRO stage; its result."""
    with tempfile.TemporaryDirectory(prefix=f"bench-checkpoint-z{zero}-", dir=args.tmp) as tmp:
        result = Path(tmp) / "result.json"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            "-m",
            "bench.checkpoint",
            "--worker",
            "--zero",
            str(zero),
            "--model",
            args.model,
            "--workdir",
            tmp,
            "--result",
            str(result),
            "--sweep-mib",
            str(sweep_mib),
            "--ceiling-part-mib",
            str(ceiling[0]),
            "--ceiling-concurrency",
            str(ceiling[1]),
            "--tokens",
            str(args.tokens),
            "--baseline-steps",
            str(args.baseline_steps),
            "--max-async-steps",
            str(args.max_async_steps),
            "--min-free-gib",
            str(args.min_free_gib),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MMALIGN_LOCAL_DIR": str(Path(tmp) / "scratch")}
        subprocess.run(command, cwd=REPO, env=env, check=True)
        loaded: dict[str, Any] = json.loads(result.read_text())
        return loaded


def environment() -> dict[str, Any]:
    import boto3
    import deepspeed
    import torch

    weed = subprocess.run(
        [str(Path(sys.executable).parent / "weed"), "version"], capture_output=True, text=True
    )
    memory = next(
        (
            line.split()[1]
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        ),
        "0",
    )
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {int(memory) / 1024 / 1024:.0f} GiB",
        "load_average_start": os.getloadavg(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "boto3": boto3.__version__,
        "weed": weed.stdout.strip().splitlines()[0] if weed.stdout else "?",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin://random-text-0.5b")
    parser.add_argument("--zero", default="3,2", help="ZeRO stages to run, in order (comma-separated)")
    parser.add_argument(
        "--sweep-mib",
        type=int,
        default=512,
        help="random MiB per rank for the part-size/concurrency sweep (0: no sweep), run once",
    )
    parser.add_argument(
        "--ceiling-part-mib", type=int, default=16, help="the ceiling's part size without a sweep"
    )
    parser.add_argument(
        "--ceiling-concurrency", type=int, default=8, help="the ceiling's concurrency without a sweep"
    )
    parser.add_argument("--tokens", type=int, default=16, help="tokens of the one training row per step")
    parser.add_argument("--baseline-steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=0, help="cut the model to this many layers (0: all)")
    parser.add_argument("--vocab", type=int, default=0, help="and to this vocabulary size (0: its own)")
    parser.add_argument(
        "--min-free-gib",
        type=float,
        default=11.0,
        help="memory both ranks need (0.5B, float32, ZeRO-3: ~11; ZeRO-2: ~14); waits up to 10 min for it",
    )
    parser.add_argument("--max-async-steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tmp", default=None, help="scratch folder (needs ~2x the checkpoint's size free)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.zero = int(args.zero)
        _worker(args)
        return 0
    if args.layers or args.vocab:
        model_folder = Path(tempfile.mkdtemp(prefix="bench-checkpoint-model-", dir=args.tmp))
        base = args.model
        args.model = derived_model(base, args.layers or 24, args.vocab or 151936, model_folder)
        print(f"model: {base} with {args.layers} layers, vocabulary {args.vocab}: {args.model}", flush=True)
    report: dict[str, Any] = {"model": args.model, "environment": environment(), "stages": []}
    if args.layers or args.vocab:
        report["model"] = f"{base} cut to {args.layers} layers, vocabulary {args.vocab}"
    ceiling = (args.ceiling_part_mib, args.ceiling_concurrency)
    sweep_mib = args.sweep_mib
    for zero in (int(z) for z in args.zero.split(",")):
        stage = run_stage(args, zero, sweep_mib, ceiling)
        if "sweep" in stage:  # later stages reuse the sweep's best setting for their ceiling
            ceiling = (stage["sweep"]["best_plain"]["part_mib"], stage["sweep"]["best_plain"]["concurrency"])
            sweep_mib = 0
        report["stages"].append(stage)
        print(
            json.dumps(
                {
                    k: stage[k]
                    for k in (
                        "zero_stage",
                        "checkpoint_bytes",
                        "ceiling",
                        "project",
                        "sync",
                        "async_call_over_sync",
                    )
                },
                indent=1,
                default=str,
            ),
            flush=True,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report["environment"]["load_average_end"] = os.getloadavg()
        args.out.write_text(json.dumps(report, indent=2))
    if args.layers or args.vocab:
        shutil.rmtree(model_folder, ignore_errors=True)
    from bench.checkpoint_plot import plot

    png = plot(report, args.out)
    print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
