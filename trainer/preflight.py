"""Before step 0: every pair's media is there, and what it holds is known — in seconds, not hours in.

    pairs, stats = data.read_pairs(spec.data)
    checked = preflight.check(ctx, pairs, stats)     # a collective: rank 0 checks, every rank gets the result
    made_by = identity.for_stage(ctx, pairs, media=checked.digest)

Every distinct image and video frame folder the pairs name is looked at once, in parallel
(`WORKERS` threads) within `MMALIGN_MEDIA_CHECK_SECONDS` (default 600; set it in `spec.env` for a huge
local dataset on slow disks):

* a local image: read and hashed (sha256 of its bytes: a copy or a touch keeps the identity, a changed
  image with the same path changes it);
* an S3 image: its size and ETag, from one listing of its folder when the folder holds `LIST_AT` or more
  of the pairs' images, else from a HEAD;
* a video frame folder (local or S3): listed; it must hold frame images, and the frames the loader
  samples (`data.videoFrames`, media.uniform_indices) are identified as above.

A missing image or an empty frame folder fails the stage at once with DataError naming the first
`SHOWN` problems (data file:line, row id, the resolved path) and how many more there are — unless
`data.missingMedia: placeholder`: then the pairs that will get a placeholder are counted, said in the
log, and reported with every progress line (`missing_media_pairs`, with `skipped_lines` from the read)
so the job's status shows them. `MediaCheck.digest` is the media's content identity: identity.py puts it
in every stage identity, so outputs made from other images are not reused.

`fitting(ctx, pairs, collator, stats)` then counts every pair's tokens (once the processor is loaded,
before the data order is planned): a row that cannot fit `data.maxLength` fails the stage in seconds
naming its file:line, or is left out and counted with `data.onBadLine: skip`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import posixpath
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from mmalign.trainer import collate, data, identity, media, prefetch, progress, storage, transfer
from mmalign.trainer.context import Context, say
from mmalign.trainer.order import rank_slice

CHECK_SECONDS_ENV = "MMALIGN_MEDIA_CHECK_SECONDS"
DEFAULT_CHECK_SECONDS = 600.0
WORKERS = 32  # concurrent stats/HEADs/hashes: S3 round trips and disk reads overlap
LIST_AT = 16  # an S3 folder holding this many of the pairs' images is listed once instead of HEADed per image
SHOWN = 5  # problems named in the error message; the rest are counted
MISSING = "missing"


@dataclasses.dataclass(frozen=True)
class MediaCheck:
    """What the check found. `problems`: the first SHOWN "file:line: row 'id': what" lines."""

    files: int = 0  # distinct images and frame folders checked
    pairs_missing: int = 0  # pairs with at least one missing image or an empty frame folder
    problems: tuple[str, ...] = ()
    digest: str | None = None  # content identity of all the pairs' media; None: the pairs have none
    seconds: float = 0.0

    def message(self, total_pairs: int) -> str:
        # the counts first and the advice last: a long message loses the middle of the list, not those
        rest = self.pairs_missing - len(self.problems)
        shown = f" (the first {len(self.problems)} here, {rest} more)" if rest > 0 else ""
        return (f"media not found for {self.pairs_missing} of {total_pairs} pairs{shown}: "
                f"{'; '.join(self.problems)}. Check data.mediaUri (relative paths resolve against it, "
                "default: the data file's folder), or set data.missingMedia: placeholder to train with a grey placeholder image "
                "(counted and reported).")


class MediaCheckTimeout(storage.StorageError):
    """The check did not finish in time (slow storage or a huge dataset): retryable, says what to raise."""


# ------------------------------------------------------------------------------ one target -> content id


def targets(pair: data.PreferencePair) -> list[tuple[str, str]]:
    """(kind, resolved URI) per media entry of a pair: ("image", file) or ("video", frame folder)."""
    kind = "video" if pair.media_kind == "video" else "image"
    return [(kind, media.resolve(path, pair.media_base)) for path in pair.media]


def _local(uri: str) -> str:
    return str(storage.local_path(uri)) if uri.startswith("file://") else uri


def image_id(uri: str) -> str:
    """A file's content id: `sha256:<hex>` of a local file, `<size>:<etag>` of an S3 object; MISSING."""
    if storage.is_remote(uri):
        info = storage.head(uri)
        return MISSING if info is None else f"{info.size}:{info.etag}"
    path = _local(uri)
    return "sha256:" + transfer.file_sha256(path) if os.path.isfile(path) else MISSING


def folder_id(uri: str, video_frames: int) -> str:
    """A frame folder's content id: how many frames it holds and the ids of those the loader samples;
    MISSING when it holds no frame image (or does not exist)."""
    frame_id: Callable[[int], str]
    if storage.is_remote(uri):
        listing = [i for i in storage.list_prefix(uri if uri.endswith("/") else uri + "/")
                   if i.relative.lower().endswith(media.FRAME_SUFFIXES)]
        names = [i.relative for i in listing]

        def frame_id(i: int) -> str:
            return f"{listing[i].size}:{listing[i].etag}"
    else:
        folder = _local(uri)
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(media.FRAME_SUFFIXES)) \
            if os.path.isdir(folder) else []

        def frame_id(i: int) -> str:
            return "sha256:" + transfer.file_sha256(os.path.join(folder, names[i]))
    if not names:
        return MISSING
    sampled = [f"{names[i]}={frame_id(i)}" for i in media.uniform_indices(len(names), video_frames)]
    return identity.digest([len(names), sampled])


def listed_ids(folder: str) -> dict[str, str]:
    """The content ids of every object below an S3 folder, by URI (one listing for many images)."""
    return {i.uri: f"{i.size}:{i.etag}" for i in storage.list_prefix(folder)}


# ------------------------------------------------------------------------------ all pairs


def survey(pairs: list[data.PreferencePair], video_frames: int, seconds: float | None = None,
           workers: int = WORKERS) -> MediaCheck:
    """Check every distinct media target of `pairs` in parallel, within `seconds` (default: the env
    setting); MediaCheckTimeout when that is not enough. No collective: any process may call it."""
    started = time.monotonic()
    limit = seconds if seconds is not None else float(os.environ.get(CHECK_SECONDS_ENV, DEFAULT_CHECK_SECONDS))
    wanted = {t for pair in pairs for t in targets(pair)}
    if not wanted:
        return MediaCheck()
    # S3 images grouped by folder: a folder with many of them costs one listing instead of many HEADs
    by_folder: dict[str, list[str]] = defaultdict(list)
    for kind, uri in wanted:
        if kind == "image" and storage.is_remote(uri):
            by_folder[posixpath.dirname(uri) + "/"].append(uri)
    listed = {folder for folder, uris in by_folder.items() if len(uris) >= LIST_AT}
    calls: dict[Any, Callable[[], Any]] = {}
    for folder in listed:
        calls[("list", folder)] = functools.partial(listed_ids, folder)
    for kind, uri in wanted:
        if kind == "video":
            calls[(kind, uri)] = functools.partial(folder_id, uri, video_frames)
        elif not (storage.is_remote(uri) and posixpath.dirname(uri) + "/" in listed):
            calls[(kind, uri)] = functools.partial(image_id, uri)
    results = _run(calls, workers, limit, started)
    ids: dict[tuple[str, str], str] = {}
    for kind, uri in wanted:
        folder = posixpath.dirname(uri) + "/"
        if kind == "image" and storage.is_remote(uri) and folder in listed:
            ids[(kind, uri)] = results[("list", folder)].get(uri, MISSING)
        else:
            ids[(kind, uri)] = results[(kind, uri)]

    problems: list[str] = []
    missing_pairs = 0
    for pair in pairs:
        lost = [uri for kind, uri in targets(pair) if ids[(kind, uri)] == MISSING]
        if lost:
            missing_pairs += 1
            if len(problems) < SHOWN:
                where = f"{pair.source}:{pair.line}: row {pair.id!r}"
                problems.append(f"{where}: {lost[0]} ({_why(pair, lost[0])})")
    # by the path as written (not the resolved URI), so the same images under another mediaUri match
    content = sorted({(path, ids[target]) for pair in pairs for path, target in zip(pair.media, targets(pair),
                                                                                      strict=True)})
    return MediaCheck(files=len(wanted), pairs_missing=missing_pairs, problems=tuple(problems),
                      digest=identity.digest(content), seconds=round(time.monotonic() - started, 2))


def _why(pair: data.PreferencePair, uri: str) -> str:
    if pair.media_kind != "video":
        return "no such file"
    if uri.lower().endswith(media.VIDEO_FILE_SUFFIXES):
        return "a video file: extract its frames into a folder, e.g. ffmpeg -i v.mp4 -vf fps=1 v/%05d.jpg"
    return "no frame images in the folder"


def _run(calls: dict[Any, Callable[[], Any]], workers: int, limit: float, started: float) -> dict[Any, Any]:
    """Every call on a thread pool, within `limit` seconds of `started`; the first error is raised."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(calls))))
    try:
        futures = {pool.submit(fn): key for key, fn in calls.items()}
        done, pending = concurrent.futures.wait(futures, timeout=max(0.0, limit - (time.monotonic() - started)),
                                                return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = next((f for f in done if f.exception() is not None), None)
        if failed is not None:
            raise failed.exception()  # type: ignore[misc]
        if pending:
            raise MediaCheckTimeout(
                f"the media check did not finish within {limit:g}s ({len(done)} of {len(futures)} images and "
                f"frame folders checked): storage too slow or the dataset too large for the time; set "
                f"{CHECK_SECONDS_ENV} higher in spec.env")
        return {futures[f]: f.result() for f in done}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------ the stage's call


def check(ctx: Context, pairs: list[data.PreferencePair], stats: data.ReadStats | None = None) -> MediaCheck:
    """Rank 0 surveys the pairs' media; every rank gets the result, and every rank raises the same
    DataError when media is missing and `data.missingMedia` is `error`. With `placeholder` the count is
    said and reported with the stage's progress lines. A collective: every rank calls it."""
    result: MediaCheck | None = None
    failure: tuple[str, str] | None = None
    if ctx.dist.is_rank_0:
        try:
            result = survey(pairs, ctx.spec.data.video_frames)
        except Exception as error:
            failure = (type(error).__name__, str(error))
            ctx.dist.broadcast_object((None, failure))  # the other ranks must not wait for a result
            raise
    result, failure = ctx.dist.broadcast_object((result, failure))
    if failure is not None:  # rank 0 raises the original; the others say the same
        name, text = failure
        kind = data.DataError if name == "DataError" else storage.StorageError
        raise kind(f"rank 0's media check: {text}")
    assert result is not None
    if result.pairs_missing and ctx.spec.data.missing_media == "error":
        raise data.DataError(result.message(len(pairs)))
    if ctx.dist.is_rank_0:
        if result.pairs_missing:
            say(f"{ctx.stage}: media missing for {result.pairs_missing} of {len(pairs)} pairs; they train "
                f"with a grey placeholder image (data.missingMedia: placeholder). First: {result.problems[0]}")
        elif result.files:
            say(f"{ctx.stage}: media of {len(pairs)} pairs checked ({result.files} images/frame folders, "
                f"{result.seconds:.1f}s)")
        progress.note_metrics(ctx.stage, {"missing_media_pairs": float(result.pairs_missing),
                                          "skipped_lines": float(stats.skipped if stats else 0)})
    return result


# ------------------------------------------------------------------------------ rows that fit maxLength


FITTING_BLOCK = 16  # pairs per DataLoader item of the token count


def _keep_fitting(collator: collate.Collator, block: list[data.PreferencePair], critique: bool,
                  source: Any) -> tuple[list[data.PreferencePair], list[str]]:
    """collator.keep_fitting over `block`, in blocks made in data.loaderWorkers DataLoader workers (each
    pair's media read and run through the processor: the slow part; prefetch.py). The kept pairs come
    back as copies: callers compare uids."""
    kept: list[data.PreferencePair] = []
    too_long: list[str] = []
    count = functools.partial(_fitting_block, collator.on_cpu(), critique)
    with prefetch.Prefetcher(prefetch.blocks(block, FITTING_BLOCK), count, workers=source.loader_workers,
                             prefetch=source.prefetch_batches) as made:
        for _, (fits, long) in made:
            kept += fits
            too_long += long
    return kept, too_long


def _fitting_block(collator: collate.Collator, critique: bool, pairs: list[data.PreferencePair],
                   ) -> tuple[list[data.PreferencePair], list[str]]:
    return collator.keep_fitting(pairs, critique=critique)


def fitting(ctx: Context, pairs: list[data.PreferencePair], collator: collate.Collator,
            stats: data.ReadStats, *, critique: bool = False) -> list[data.PreferencePair]:
    """The pairs whose rows fit `data.maxLength` (after the collator's cuts), checked before step 0
    instead of when their batch is built: every rank counts the tokens of its block of pairs (in its
    data.loaderWorkers DataLoader workers)
    (`critique`: the reward stage's rows, with the annotated critiques). With `data.onBadLine: error`
    any row that cannot fit fails the stage (RowTooLong, exit 3) naming the first SHOWN and counting
    the rest; with `skip` they are left out, counted in `stats` (`skipped_lines`) and said in the log.
    A collective: every rank calls it and gets the same list."""
    started = time.monotonic()
    dist = ctx.dist
    block = [pairs[i] for i in rank_slice(len(pairs), dist.rank, dist.world_size)]
    found: list[tuple[str, str]] = []  # (uid, "row 'id' (file:line): N tokens") of this rank's block
    failure: str | None = None
    own: Exception | None = None
    try:
        kept, too_long = _keep_fitting(collator, block, critique, ctx.spec.data)
        kept_uids = {pair.uid for pair in kept}
        found = list(zip([p.uid for p in block if p.uid not in kept_uids], too_long, strict=True))
    except Exception as error:  # raised on every rank below: the others must not wait for this one
        own, failure = error, f"{type(error).__name__}: {error}"
    gathered = dist.all_gather_object((found, failure))
    if own is not None:
        raise own
    failed = [(rank, f) for rank, (_, f) in enumerate(gathered) if f is not None]
    if failed:
        raise data.DataError(f"rank {failed[0][0]}'s token count check of the pairs: {failed[0][1]}")
    rows = [row for part, _ in gathered for row in part]
    if not rows:
        return pairs
    limit = collator.max_length
    if ctx.spec.data.on_bad_line == "error":
        rest = len(rows) - SHOWN
        shown = f" (the first {SHOWN} here, {rest} more)" if rest > 0 else ""
        raise collate.RowTooLong(
            f"{len(rows)} of {len(pairs)} pairs have a row longer than data.maxLength {limit} tokens even "
            f"after cutting the prompt text and critique{shown}: {'; '.join(text for _, text in rows[:SHOWN])}. "
            "The image/video tokens, the template and the response are never cut: raise data.maxLength, "
            "lower data.maxPixels or data.videoFrames, shorten or remove these rows, or set "
            "data.onBadLine: skip to leave them out (counted)")
    dropped = {uid for uid, _ in rows}
    for _, text in rows:
        where, tokens = text.rsplit(": ", 1)
        stats.skip(where, f"{tokens}, more than data.maxLength {limit}")
    left = [pair for pair in pairs if pair.uid not in dropped]
    if not left:
        raise data.DataError(f"every one of the {len(pairs)} pairs has a row longer than data.maxLength "
                             f"{limit} tokens (first: {rows[0][1]}); raise data.maxLength or lower "
                             "data.maxPixels")
    if dist.is_rank_0:
        say(f"{ctx.stage}: skipped {len(rows)} of {len(pairs)} pairs longer than data.maxLength {limit} "
            f"(data.onBadLine: skip; {time.monotonic() - started:.1f}s). First: {rows[0][1]}")
        progress.note_metrics(ctx.stage, {"skipped_lines": float(stats.skipped)})
    return left
