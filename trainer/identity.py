"""What made a stage's output: the ONE place its identity is computed, recorded and compared.

    wanted = identity.reward(spec, pairs, media)        # {field: value}: spec parameters + input identities
    recorded = identity.recorded(uri_of_json)           # what the marker says made the output (None: no record)
    changed = identity.changed(recorded, wanted)        # field names that differ ([] = reuse)

An output (`_complete.json` of a model folder, the score stage's `manifest.json` and its shards, dpo's
reference log-probs, a stage's checkpoints) is reused only when every field matches. Fields are named as
the user writes them (`stages.dpo.beta`, `data.maxLength`) or after the input (`model`, `data`, `media`,
`rewardModel`, `scoredPairs`), so the log line that says why a stage is recomputed names what changed;
`not_reused` says it, and puts it on the stage's progress lines, where the operator makes it an Event.

Inputs are identified by content: the pairs by data.fingerprint (every row's fields), their media by
preflight.MediaCheck.digest (each local image's sha256, each S3 image's ETag and size), a model by
`model_identity` (builtin name + seed; a folder's config.json and weight files; an S3 prefix's ETags and
sizes), and an output of this job by the digest it recorded (so a retrained reward model changes the
score stage's identity, and with it dpo's).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from mmalign.api import layout
from mmalign.api.spec import AlignmentJobSpec
from mmalign.trainer import builtin, data, progress, storage, transfer
from mmalign.trainer.context import Context, say

Identity = dict[str, Any]

# Spec fields of a training stage that do not shape its output (when checkpoints are due, how often and
# on what to evaluate; where its pods run and their size, like spec.podTemplate/spec.resources): changing
# them reuses the output (a finished stage is not evaluated again).
NOT_SHAPING = frozenset({"checkpoint", "evalEverySteps", "evalData", "evalMaxPairs", "winRate",
                         "podTemplate", "resources"})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def digest(value: Any) -> str:
    """A short, stable hash of a JSON value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed(recorded: Identity | None, wanted: Identity) -> list[str]:
    """The field names whose values differ (["identity"] when nothing was recorded: an output written
    before identities existed is not trusted)."""
    if recorded is None:
        return ["identity"]
    return sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))


def recorded(uri: str) -> Identity | None:
    """The identity recorded in the JSON marker at `uri` (key "identity"); None when absent/unreadable."""
    try:
        value = storage.read_json(uri).get("identity")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return value if isinstance(value, dict) else None


# ------------------------------------------------------------------------------ inputs


def model_identity(uri: str, seed: int = 0) -> str:
    """A model source's content identity (a short digest).

    builtin:// : its name and the seed its weights are drawn with. An output of this job (a folder with
    `_complete.json` that recorded an identity): that identity's digest. A local folder: config.json's
    content and each weight file's name, size and sha256 — a streaming read of every weight (a 7B model in
    bf16 is ~15 GB: about 30-60 s at local-disk speed, once per stage on rank 0; size+mtime would be
    instant but changes on every copy and misses a rewrite in place). An s3:// prefix: every object's
    name, size and ETag from one listing (no download; the ETag of a multipart upload is a hash of its
    parts' hashes, still content-derived)."""
    if builtin.is_builtin(uri):
        return digest({"builtin": uri, "seed": seed})
    own = recorded(storage.join(uri, layout.COMPLETE))
    if own is not None:
        return "artifact:" + digest(own)
    if storage.is_remote(uri):
        objects = storage.list_prefix(uri if uri.endswith("/") else uri + "/")
        return digest([[o.relative, o.size, o.etag] for o in objects if o.relative != layout.COMPLETE])
    folder = storage.local_path(uri)
    parts: list[Any] = []
    config = folder / "config.json"
    if config.exists():
        parts.append(["config.json", hashlib.sha256(config.read_bytes()).hexdigest()])
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        parts.append([path.relative_to(folder).as_posix(), path.stat().st_size, transfer.file_sha256(path)])
    return digest(parts)


def output_identity(marker_uri: str) -> str | None:
    """The digest of what an upstream output of this job recorded (None: not an output with a record)."""
    own = recorded(marker_uri)
    return digest(own) if own is not None else None


# ------------------------------------------------------------------------------ the stages


def _fields(prefix: str, config: Any) -> Identity:
    """A spec model's fields as `prefix.camelName` -> JSON value, the non-shaping ones left out."""
    dumped = config.model_dump(mode="json", by_alias=True)
    return {f"{prefix}.{k}": v for k, v in dumped.items() if k not in NOT_SHAPING}


def _data_fields(spec: AlignmentJobSpec) -> Identity:
    d = spec.data
    shaping = {"data.maxLength": d.max_length, "data.evalFraction": d.eval_fraction,
               "data.missingMedia": d.missing_media, "data.videoFrames": d.video_frames, "seed": spec.seed}
    # The tokens a row becomes (collate.py) also depend on these; recorded only when set, so outputs
    # made before they existed keep their identity.
    optional = {"data.maxPixels": d.max_pixels, "data.minPixels": d.min_pixels,
                "model.chatTemplate": digest(spec.model.chat_template) if spec.model.chat_template else None}
    return {**shaping, **{k: v for k, v in optional.items() if v is not None}}


def reward(spec: AlignmentJobSpec, pairs: list[data.PreferencePair], media: str | None = None) -> Identity:
    """`media`: the pairs' media content (preflight.MediaCheck.digest), in every stage's identity."""
    assert spec.stages.reward is not None
    return {"model": model_identity(spec.model.uri, spec.seed), "data": data.fingerprint(pairs), "media": media,
            **_data_fields(spec), **_fields("stages.reward", spec.stages.reward)}


def score(spec: AlignmentJobSpec, pairs: list[data.PreferencePair], media: str | None = None) -> Identity:
    assert spec.stages.score is not None
    return {"rewardModel": model_identity(spec.reward_model_uri(), spec.seed), "data": data.fingerprint(pairs),
            "media": media, **_data_fields(spec), **_fields("stages.score", spec.stages.score)}


def dpo(spec: AlignmentJobSpec, pairs: list[data.PreferencePair], media: str | None = None) -> Identity:
    """dpo's pairs by content (for scored pairs: their rewards and δ too) and, when they are this job's
    score output, the identity that output recorded."""
    assert spec.stages.dpo is not None
    scored = None
    if spec.dpo_data_uri() == spec.artifact_uri("score"):
        scored = output_identity(storage.join(spec.artifact_uri("score"), layout.MANIFEST))
    return {"model": model_identity(spec.model.uri, spec.seed), "data": data.fingerprint(pairs), "media": media,
            "scoredPairs": scored, **_data_fields(spec), **_fields("stages.dpo", spec.stages.dpo)}


def reference_logps(dpo_identity: Identity) -> Identity:
    """What dpo's precomputed reference log-probs depend on, taken from the dpo stage's identity: the
    pairs and their media, the base model, the seed and the token budget (not β or the loss: the reference
    is reused)."""
    keys = ("data", "media", "model", "seed", "data.maxLength")
    tokens = ("data.maxPixels", "data.minPixels", "model.chatTemplate")  # only when set (_data_fields)
    return {**{k: dpo_identity.get(k) for k in keys}, **{k: dpo_identity[k] for k in tokens if k in dpo_identity}}


STAGES = {"reward": reward, "score": score, "dpo": dpo}


def for_stage(ctx: Context, pairs: list[data.PreferencePair], media: str | None = None) -> Identity:
    """This stage's identity, computed once on rank 0 (hashing a model folder reads its weights) and
    broadcast, so every rank decides the same. `media`: preflight.check's digest of the pairs' media."""
    value = STAGES[ctx.stage](ctx.spec, pairs, media) if ctx.dist.is_rank_0 else None
    result: Identity = ctx.dist.broadcast_object(value)
    return result


def claim(ctx: Context, prefix: str, wanted: Identity, what: str) -> None:
    """Make `prefix`'s files belong to `wanted`: when `<prefix>identity.json` records another identity (or
    none while files exist), rank 0 says what changed and deletes everything below `prefix`, then records
    `wanted`. Every rank returns after that, so what it finds below `prefix` was made for `wanted`.
    A collective: every rank calls it."""
    marker = storage.join(prefix, layout.IDENTITY)
    if ctx.dist.is_rank_0:
        diff = changed(recorded(marker), wanted)
        if diff:
            if storage.list_prefix(prefix):
                not_reused(ctx, f"{what} at {prefix} were written for other inputs or parameters "
                           f"(changed: {', '.join(diff)}); starting them over")
                storage.delete_prefix(prefix)
            storage.write_json(marker, {"identity": wanted})
    ctx.dist.barrier()


def not_reused(ctx: Context, why: str) -> None:
    """Say that an earlier output is not reused, and why (rank 0 calls it): a log line, and a notice on
    the stage's progress lines that the operator turns into an Event on the job (reason Recomputing)."""
    say(f"{ctx.stage}: {why}")
    progress.notice(ctx.stage, why)
