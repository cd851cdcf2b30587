"""Where a job's files live under `spec.storage.uri` (S3 or file://), and the names of its markers.

    <storage>/reward/checkpoints/step-00000200/...     a checkpoint (checkpoint.py writes it)
    <storage>/reward/checkpoints/step-00000200/_done/rank-00001.json
    <storage>/reward/checkpoints/latest               the marker of the last complete one, written last
    <storage>/reward/checkpoints/identity.json        the stage identity its checkpoints were written for
    <storage>/reward/model/  ... _complete.json       the reward model, marked complete last
    <storage>/reward/metrics.json                     the stage's final metrics
    <storage>/score/scored/shard-00000-of-00003.jsonl the scored pairs, in shards
    <storage>/score/scored/identity.json              written first: the identity its shards are for
    <storage>/score/scored/manifest.json              written last: the stage is done (+ its identity)
    <storage>/dpo/reference-logps/shard-...jsonl      precomputed reference log-probs + manifest.json
    <storage>/dpo/model/ ... _complete.json           the final policy

The trainer writes and reads these; the operator only reports their URIs (status.stages.*.artifact,
lastCheckpoint). Pure string functions: no I/O here.
"""

from __future__ import annotations

from typing import Literal

StageName = Literal["reward", "score", "dpo"]

MARKER = "latest"  # <checkpoints>/latest: the last complete checkpoint (step, tag, files, world size)
COMPLETE = "_complete.json"  # written last into a model folder: its files, sizes and sha256
MANIFEST = "manifest.json"  # written last into a sharded output (scored pairs, reference log-probs)
METRICS = "metrics.json"
IDENTITY = "identity.json"  # <checkpoints>/identity.json, <score>/identity.json: what their files were made for
REFERENCE_LOGPS = "reference-logps/"
ARTIFACTS: dict[str, str] = {"reward": "reward/model/", "score": "score/scored/", "dpo": "dpo/model/"}


def join_uri(prefix: str, *parts: str) -> str:
    """Join URI segments with single slashes: join_uri("s3://b/run/", "ckpt", "x") == "s3://b/run/ckpt/x"
    (an empty last part leaves a trailing slash: a prefix)."""
    out = prefix
    for part in parts:
        out = out.rstrip("/") + "/" + part.lstrip("/")
    return out


def stage_uri(storage: str, stage: str, leaf: str = "") -> str:
    """`<storage>/<stage>/<leaf>`: metrics.json, reference log-probs, ..."""
    return join_uri(storage, stage, leaf)


def artifact_uri(storage: str, stage: str) -> str:
    """The stage's final output: reward model folder, scored-pairs folder, or final policy folder."""
    return join_uri(storage, ARTIFACTS[stage])


def checkpoint_uri(storage: str, stage: str) -> str:
    """Prefix of the stage's checkpoints; `<prefix>latest` is the marker of the last complete one."""
    return join_uri(storage, f"{stage}/checkpoints/")


def marker_uri(storage: str, stage: str) -> str:
    return checkpoint_uri(storage, stage) + MARKER


def resume_point(storage: str, stage: str) -> tuple[str | None, str]:
    """What a restarted attempt of `stage` continues from: (its checkpoint marker, words for the status).
    The score stage has no checkpoints (None): it keeps the shards an earlier attempt finished."""
    if stage == "score":
        return None, f"keeping the shards already scored in {artifact_uri(storage, stage)}"
    marker = marker_uri(storage, stage)
    return marker, f"resuming from {marker}"


def checkpoint_tag(step: int) -> str:
    """A checkpoint's folder name below the stage's checkpoint prefix."""
    return f"step-{step:08d}"


CHECKPOINT_TAG_PATTERN = r"^step-(\d{8})/"  # matches a path below the checkpoint prefix


def rank_done_name(rank: int) -> str:
    """`_done/rank-N.json` inside a checkpoint: rank N uploaded its files (names, sizes, sha256, nonce)."""
    return f"_done/rank-{rank:05d}.json"


def rank_rng_name(rank: int) -> str:
    return f"rng-rank-{rank:05d}.pt"


def shard_name(index: int, count: int) -> str:
    """Output shard `index` of `count` (scored pairs, reference log-probs); name order = input order."""
    return f"shard-{index:05d}-of-{count:05d}.jsonl"
