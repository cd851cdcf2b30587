"""Checkpoints in object storage, and exact resume.

Protocol (one stage's prefix `P = spec.checkpoint_uri(stage)`, e.g. s3://bucket/job/dpo/checkpoints/;
the names are mmalign.api.layout's):

    P/step-00000010/<DeepSpeed shard files>     every rank uploads the files IT wrote
    P/step-00000010/rng-rank-00001.pt           every rank's RNG state (torch, python, cuda)
    P/step-00000010/_done/rank-00001.json       "rank 1 finished": its files, sizes, sha256, run nonce
    P/latest                                    the marker, written LAST by rank 0

1. `save(step, last=...)` (all ranks, after every optimizer step): the checkpointer owns the schedule
   and does nothing unless a save is due (every `everySteps` steps, and at the last step). When it is,
   DeepSpeed writes this rank's shards to a node-local folder; then the rank uploads them (parallel
   multipart, checksums verified, transfer.upload_file) and writes its `_done/rank-N.json`.
   With `async_upload` the step waits only for a copy of the rank's states in host memory
   (engine.snapshot: the states DeepSpeed would write, copied as it hands them over); a background
   thread then writes the same files into the local folder, uploads them and (rank 0) commits, while
   training goes on. One save is in flight at most: the next save, `finish()` (the stage's end) and
   the SIGTERM save join it first, and its failure is raised there (StorageError naming the step).
   The cost: one host copy of the rank's checkpoint (its optimizer partition and, under ZeRO-0/1/2,
   the model on rank 0) while the write runs. DeepSpeed's own decoupled checkpoint engine (0.19) was
   not used: it commits before the next optimizer step, so the loop still waits for the write
   whenever the write outlasts one forward and backward (runtime/engine.py, `_commit_decoupled_checkpoint`
   in `step`), and it needs its FastCheckpointEngine writers and a spawned process per rank.
2. Rank 0 waits until every rank's `_done` object of THIS run (nonce) exists, then writes `latest`
   (step, tag, files with sizes and sha256, world size) and deletes all but the newest `keep_last`
   checkpoints. A failed or partial upload never writes `latest`; the previous checkpoint stays the
   one a restart resumes from, and the error surfaces as StorageError at the next join.
3. `restore()` (all ranks): read `latest`; one rank per node downloads the files ITS ranks load (their
   ZeRO partitions and RNG states, and the shared model-states file: each node of a 2-node ZeRO-3 job
   fetches half of the checkpoint, not all of it) into a node-local folder, verifying each file's
   sha256 from the marker; every rank loads model, optimizer, scheduler and its RNG state; the returned
   client state holds the step (and whatever the stage saved, e.g. the data position), so training
   continues at the same step with the same data order.
4. Another world size (the job re-created with other `resources`): every node downloads the whole
   checkpoint, converts it to DeepSpeed's universal format (engine.load_resized: `ds_to_universal`, then
   a `load_universal` load that re-partitions the optimizer state over the new ranks), and the stage
   keeps the checkpoint's global batch (`global_batch` in the marker; loop.resumed_batch), so the run
   continues the same optimisation.

The nonce: a restarted gang may rewrite a step that an earlier, failed attempt partly wrote; rank 0
only accepts `_done` objects that carry the nonce of the current run.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mmalign.api import layout

from . import s3client, storage, transfer
from .context import scratch_root
from .engine import Distributed

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(layout.CHECKPOINT_TAG_PATTERN)


class WritesLater(Protocol):
    """A rank's checkpoint files held in memory (engine.Snapshot): `write()` puts them on disk."""

    def write(self) -> None: ...


class SavesShards(Protocol):
    """What the checkpointer needs from an engine (engine.Engine has it)."""

    def save(self, folder: str, tag: str, client_state: dict[str, Any] | None = None) -> None: ...

    def snapshot(self, folder: str, tag: str, client_state: dict[str, Any] | None = None) -> WritesLater: ...

    def load(self, folder: str, tag: str) -> dict[str, Any]: ...

    def load_resized(self, folder: str, tag: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    tag: str
    uri: str  # the step's prefix


class Checkpointer:
    """Saves and restores one stage's checkpoints under `uri` (see the module docstring)."""

    def __init__(
        self,
        uri: str,
        dist: Distributed,
        local_root: Path,
        every_steps: int,
        keep_last: int,
        async_upload: bool,
        commit_timeout_seconds: float | None = None,
    ) -> None:
        self.uri = uri if uri.endswith("/") else uri + "/"
        self.dist = dist
        self.local_root = Path(local_root)
        self.every_steps = every_steps
        self.keep_last = keep_last
        self.async_upload = async_upload
        self.commit_timeout = commit_timeout_seconds or float(
            os.environ.get("MMALIGN_CHECKPOINT_COMMIT_TIMEOUT_SECONDS", "1800")
        )
        # One nonce per run of the gang, agreed by broadcast (see the module docstring).
        self.nonce = dist.broadcast_object(uuid.uuid4().hex)
        self._thread: threading.Thread | None = None
        self._error: tuple[CheckpointInfo, BaseException] | None = None
        self.last_committed: CheckpointInfo | None = None
        # pairs per optimizer step, recorded in the marker (the loop sets it): a resize keeps it
        self.global_batch: int | None = None
        # seconds the last save took from the engine's write to this rank's upload (rank 0: to the commit)
        self.last_save_seconds: float | None = None

    @classmethod
    def for_stage(cls, spec: Any, job_name: str, stage: str, dist: Distributed) -> Checkpointer:
        c = spec.checkpoint
        return cls(
            spec.checkpoint_uri(stage),
            dist,
            scratch_root(job_name, stage),
            c.every_steps,
            c.keep_last,
            c.async_upload,
        )

    # ------------------------------------------------------------------------------ save

    def save(
        self,
        engine: SavesShards,
        step: int,
        client_state: dict[str, Any],
        last: bool = False,
    ) -> CheckpointInfo | None:
        """Called after every optimizer step; saves when one is due (every `every_steps` steps, and at
        the `last` step, so a finished stage always ends on a checkpoint), else returns None. Writes
        this rank's shards for `step` and uploads them; async: copies the states and returns, the
        write and upload run in the background (see the module docstring)."""
        if not (last or (step > 0 and step % self.every_steps == 0)):
            return None
        self.wait()  # the previous save must finish (and its errors surface) first
        started = time.monotonic()
        tag = layout.checkpoint_tag(step)
        rank_folder = self.local_root / "save" / f"rank-{self.dist.rank:05d}"
        shutil.rmtree(rank_folder / tag, ignore_errors=True)
        info = CheckpointInfo(step, tag, storage.join(self.uri, tag) + "/")
        if self.async_upload:
            snapshot = engine.snapshot(str(rank_folder), tag, {**client_state, "step": step})
            rng = _rng_state()  # now: the steps that follow draw from it
            self._thread = threading.Thread(
                target=self._in_background,
                args=(snapshot, rng, rank_folder / tag, info, started),
                name=f"ckpt-save-{tag}",
                daemon=True,
            )
            self._thread.start()
        else:
            engine.save(str(rank_folder), tag, {**client_state, "step": step})
            torch.save(_rng_state(), rank_folder / tag / layout.rank_rng_name(self.dist.rank))
            self._upload(rank_folder / tag, info)
            self.dist.barrier()  # every rank's _done object exists: rank 0's commit finds them at once
            if self.dist.is_rank_0:
                self._commit(info)
            self.last_save_seconds = time.monotonic() - started
        return info

    def wait(self) -> None:
        """Join a background save; raise its error (StorageError) if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            (info, error), self._error = self._error, None
            marker = (
                "`latest` names it (pruning the older ones failed)"
                if self.last_committed == info
                else "`latest` still names the previous checkpoint"
            )
            # the type the synchronous save would have raised (failures.classify reads it): StorageError
            # (its cause says whether it is permanent), anything else (a full disk, host OOM) a plain error
            kind = storage.StorageError if isinstance(error, storage.StorageError) else RuntimeError
            raise kind(
                f"checkpoint {info.tag} (saved in the background: checkpoint.asyncUpload) failed: "
                f"{type(error).__name__}: {error}; {marker}"
            ) from error

    def finish(self) -> None:
        """At the end of the stage (and on SIGTERM): wait for the last save's write, upload and commit
        on every rank; raise its error."""
        self.wait()
        self.dist.barrier()

    def _in_background(
        self, snapshot: WritesLater, rng: dict[str, Any], folder: Path, info: CheckpointInfo, started: float
    ) -> None:
        """The async save's thread: write the snapshot's files (freeing its memory), upload, commit."""
        try:
            snapshot.write()  # frees each file's host copy once it is on disk
            torch.save(rng, folder / layout.rank_rng_name(self.dist.rank))
            self._upload(folder, info)
            if self.dist.is_rank_0:
                self._commit(info)
            self.last_save_seconds = time.monotonic() - started
        except BaseException as error:  # noqa: BLE001 - re-raised in the training thread by wait()
            log.error("checkpoint %s: background save failed: %s", info.tag, error)
            self._error = (info, error)

    def _upload(self, folder: Path, info: CheckpointInfo) -> None:
        files = transfer.upload_folder(folder, info.uri)
        done = {
            "rank": self.dist.rank,
            "nonce": self.nonce,
            "files": [{"name": f.relative, "size": f.size, "sha256": f.sha256} for f in files],
        }
        storage.write_json(storage.join(info.uri, layout.rank_done_name(self.dist.rank)), done)
        shutil.rmtree(folder, ignore_errors=True)

    def _commit(self, info: CheckpointInfo) -> None:
        """Rank 0: once every rank of this run has uploaded `info`, write the marker, then prune."""
        deadline = time.monotonic() + self.commit_timeout
        files: dict[str, dict[str, Any]] = {}
        pending = set(range(self.dist.world_size))
        while pending:
            for rank in sorted(pending):
                try:
                    done = storage.read_json(storage.join(info.uri, layout.rank_done_name(rank)))
                except FileNotFoundError:
                    continue
                if done.get("nonce") == self.nonce:
                    pending.discard(rank)
                    files.update({f["name"]: f for f in done["files"]})
            if pending:
                if time.monotonic() > deadline:
                    raise storage.StorageError(
                        f"checkpoint {info.tag}: ranks {sorted(pending)} did not finish uploading within "
                        f"{self.commit_timeout:.0f}s; `latest` not moved"
                    )
                time.sleep(0.5)
        marker = {
            "step": info.step,
            "tag": info.tag,
            "uri": info.uri,
            "world_size": self.dist.world_size,
            "global_batch": self.global_batch,
            "files": [files[name] for name in sorted(files)],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        storage.write_json(storage.join(self.uri, layout.MARKER), marker)  # the commit point
        self.last_committed = info
        log.info("checkpoint %s committed (%d files)", info.uri, len(files))
        self._prune(info.step)

    def _prune(self, latest_step: int) -> None:
        steps = sorted(
            {int(m.group(1)) for o in storage.list_prefix(self.uri) if (m := _STEP_DIR.match(o.relative))}
        )
        older = [s for s in steps if s <= latest_step]
        for step in older[: -self.keep_last]:
            storage.delete_prefix(storage.join(self.uri, layout.checkpoint_tag(step)) + "/")

    # ------------------------------------------------------------------------------ restore

    def read_marker(self) -> dict[str, Any] | None:
        try:
            return storage.read_json(storage.join(self.uri, layout.MARKER))
        except FileNotFoundError:
            return None

    def restore(self, engine: SavesShards) -> dict[str, Any] | None:
        """Load the latest complete checkpoint into `engine` and this rank's RNG; None if there is none.

        Each node downloads only the files its own ranks load (`files_for`); a checkpoint written by
        another world size is downloaded whole and converted (engine.load_resized). Returns the client
        state saved with it ("step" and what the stage added)."""
        marker = self.dist.broadcast_object(self.read_marker() if self.dist.is_rank_0 else None)
        if marker is None:
            return None
        resized = int(marker["world_size"]) != self.dist.world_size
        node_of_rank = self.dist.all_gather_object(self.dist.node_rank)
        own_ranks = {rank for rank, node in enumerate(node_of_rank) if node == self.dist.node_rank}
        folder = self.local_root / "restore" / f"node-{self.dist.node_rank}"
        tag = marker["tag"]
        if self.dist.is_local_rank_0:
            shutil.rmtree(folder, ignore_errors=True)
            files = marker["files"] if resized else files_for(marker["files"], own_ranks)
            self._download(marker["uri"], files, folder / tag)
        self.dist.barrier()
        if resized:
            log.warning(
                "checkpoint %s was written by %s ranks, this gang has %d: converting it",
                marker["uri"],
                marker["world_size"],
                self.dist.world_size,
            )
            client_state = engine.load_resized(str(folder), tag)
        else:
            client_state = engine.load(str(folder), tag)
        rng_file = folder / tag / layout.rank_rng_name(self.dist.rank)
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        self.dist.barrier()
        if self.dist.is_local_rank_0:
            shutil.rmtree(folder, ignore_errors=True)
        self.last_committed = CheckpointInfo(int(marker["step"]), tag, marker["uri"])
        log.info("resumed from %s (step %s)", marker["uri"], marker["step"])
        return {**client_state, "step": int(marker["step"])}

    def _download(self, uri: str, files: list[dict[str, Any]], folder: Path) -> None:
        """The marker's `files` (name, sha256) below `uri` into `folder`, in parallel, each verified."""
        workers = max(1, min(len(files), s3client.settings().concurrency))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [
                pool.submit(
                    transfer.download_file, storage.join(uri, f["name"]), folder / f["name"], f["sha256"]
                )
                for f in files
            ]
            for future in futures:
                future.result()


# A file of one rank: DeepSpeed's ZeRO partitions (`[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`;
# under ZeRO-3 also `zero_pp_rank_R_mp_rank_00_model_states.pt`) and the RNG state (`rng-rank-0000R.pt`).
# DeepSpeed opens only its own rank's partition files (engine._get_all_zero_checkpoint_state_dicts without
# elastic_checkpoint); anything else (ZeRO-0/1/2's `mp_rank_00_model_states.pt`) every rank reads.
_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_|^rng-rank-(\d+)\.pt$")


def files_for(files: list[dict[str, Any]], ranks: set[int]) -> list[dict[str, Any]]:
    """The marker's files that ranks `ranks` load: their own partitions and every shared file."""
    kept = []
    for f in files:
        match = _RANK_FILE.search(Path(f["name"]).name)
        if match is None or int(match.group(1) or match.group(2)) in ranks:
            kept.append(f)
    return kept


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def describe_marker(marker: dict[str, Any]) -> str:
    return json.dumps({k: marker[k] for k in ("step", "uri", "world_size")})
