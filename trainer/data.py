"""MM-RLHF preference data: read, validate and split, streaming line by line.

    from mmalign.trainer import data
    stats = data.ReadStats()
    for pair in data.iter_pairs(job.spec.data, stats=stats): ...      # DataSource or a plain URI
    train, held_out = data.split_by_query(pairs, eval_fraction=0.1, seed=0)

Accepted row layouts (one JSON object per line; `format: auto` detects the layout per file from its
first well-formed row, and a later row in the other layout is a malformed line):

* `dpo_pairs` — the MM-RLHF release layout (tests/data/mm_reward_bench.jsonl): `id`, `image` or `video`
  (relative path; `image` may also be a list, or `images` a list), `prompt`, `chosen`, `rejected`,
  `chosen_reason`, `rejected_reason` (human critiques; `chosen_critique`/`rejected_critique` accepted when
  the `_reason` keys are absent). Optional: `query_id`, `category`, and the scored fields the score stage
  adds: `chosen_reward`, `rejected_reward`, `delta`.
* `ranked` — one query with 2..N responses: `id`, media as above, `prompt` (or `question`), and
  `responses`: a list of objects `{"text" | "response" | "answer": str, "score": float | "rank": int,
  "critique" | "reason": str}`. A higher `score` is better; a lower `rank` is better (1 = best); a row
  uses one or the other for all its responses. It expands into ALL pairs of differently ranked responses
  (ties give no pair), each in the `dpo_pairs` layout (`fields` are what a `dpo_pairs` row would hold).
  A row whose responses ALL tie gives no pair: it is skipped and counted in `ReadStats` with its reason
  (whatever `onBadLine` says: the row is well-formed, it just holds no preference).

Query id: an explicit `query_id` field, else for `dpo_pairs` the part of `id` before its LAST `_` (the
release writes `<query id>_<pair id>` and query ids themselves contain `_`, e.g.
`v_K_IqYFJKIgk-Scene-016_1_34663`; splitting at the first `_` would merge all "v_..." videos), and for
`ranked` the whole `id`. Category: an explicit `category` field, else the first folder of the media path
(`mcq/073712.png` -> `mcq`), else `uncategorized`.

A URI may be a local path, `file://`, `s3://` (streamed through storage.open_lines), a folder/prefix
ending in `/` (every `*.jsonl` below it in name order: the score stage's shards), or `builtin://NAME`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import posixpath
import random
from collections.abc import Iterable, Iterator
from typing import Any

from mmalign.api.exit_codes import ExitCode
from mmalign.api.inputs import DataSource
from mmalign.trainer import storage

UNCATEGORIZED = "uncategorized"
_TEXT_KEYS = ("text", "response", "answer")


class DataError(Exception):
    """Bad input data a user must fix: a malformed line, missing media, an empty dataset.

    The trainer exits with `exit_code` (ExitCode.DATA_ERROR, permanent: a restart would fail again).
    The message says where (file:line or row id + path) and what to do."""

    exit_code = ExitCode.DATA_ERROR


@dataclasses.dataclass
class PreferencePair:
    """One (chosen, rejected) comparison; `fields` holds the input row verbatim for write-back."""

    id: str  # the row's `id`, verbatim (not unique in the release layout: a query's pairs share it)
    uid: str  # unique within its source: "<file name>:<line>" (+ ":<i>-<j>" for expanded ranked rows)
    query_id: str
    category: str
    prompt: str
    chosen: str
    rejected: str
    chosen_critique: str = ""
    rejected_critique: str = ""
    media: list[str] = dataclasses.field(default_factory=list)  # paths as written in the row
    media_kind: str | None = None  # "image" | "video" | None
    media_base: str = ""  # folder/prefix the relative media paths resolve against
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    delta: float | None = None
    source: str = ""  # the file (path or URI) the pair was read from
    line: int = 0  # its 1-based line in `source` (expanded ranked pairs share their row's line)


@dataclasses.dataclass
class ReadStats:
    """What a read did besides yielding pairs. Skipped lines are counted, never silent."""

    lines: int = 0
    pairs: int = 0
    skipped: int = 0
    skipped_examples: list[str] = dataclasses.field(default_factory=list)  # first 20 "file:line: why"

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < 20:
            self.skipped_examples.append(f"{where}: {why}")


# --------------------------------------------------------------------------------- one row -> pairs


class _RowError(ValueError):
    """A row that cannot become pairs; turned into DataError with file:line by the reader."""


def _string(row: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _RowError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _media(row: dict[str, Any]) -> tuple[list[str], str | None]:
    if row.get("video") is not None:
        video = row["video"]
        if not isinstance(video, str) or not video:
            raise _RowError("field 'video' must be a frame-folder path (string)")
        return [video], "video"
    images = row.get("image", row.get("images"))
    if images is None or images == "" or images == []:
        return [], None
    if isinstance(images, str):
        return [images], "image"
    if isinstance(images, list) and all(isinstance(p, str) and p for p in images):
        return list(images), "image"
    raise _RowError("field 'image' must be a path or a list of paths")


def _category(row: dict[str, Any], media: list[str]) -> str:
    if isinstance(row.get("category"), str) and row["category"]:
        return row["category"]
    if media:
        parts = media[0].replace("\\", "/").lstrip("./").split("/")
        if len(parts) > 1 and parts[0]:
            return parts[0]
    return UNCATEGORIZED


def _float_or_none(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _RowError(f"field {key!r} must be a number, got {value!r}")
    return float(value)


def detect_format(row: dict[str, Any]) -> str:
    """`dpo_pairs` or `ranked` from a row's keys (what `format: auto` does)."""
    if "responses" in row:
        return "ranked"
    if "chosen" in row and "rejected" in row:
        return "dpo_pairs"
    raise _RowError(
        "cannot tell the layout: a dpo_pairs row needs 'chosen' and 'rejected', a ranked row "
        f"needs 'responses' (keys found: {', '.join(sorted(row)) or 'none'})"
    )


def _pair_from_dpo_row(row: dict[str, Any], uid: str) -> PreferencePair:
    row_id = _string(row, "id")
    media, kind = _media(row)
    query_id = row.get("query_id")
    if not isinstance(query_id, str) or not query_id:
        query_id = row_id.rsplit("_", 1)[0] if "_" in row_id else row_id
    critique = {side: row.get(f"{side}_reason", row.get(f"{side}_critique")) for side in ("chosen", "rejected")}
    for side, text in critique.items():
        if text is not None and not isinstance(text, str):
            raise _RowError(f"field {side}_reason must be a string")
    chosen_reward = _float_or_none(row, "chosen_reward")
    rejected_reward = _float_or_none(row, "rejected_reward")
    delta = _float_or_none(row, "delta")
    if delta is None and chosen_reward is not None and rejected_reward is not None:
        delta = chosen_reward - rejected_reward
    return PreferencePair(
        id=row_id, uid=uid, query_id=query_id, category=_category(row, media),
        prompt=_string(row, "prompt"), chosen=_string(row, "chosen"), rejected=_string(row, "rejected"),
        chosen_critique=critique["chosen"] or "", rejected_critique=critique["rejected"] or "",
        media=media, media_kind=kind, fields=row,
        chosen_reward=chosen_reward, rejected_reward=rejected_reward, delta=delta,
    )


def _ranked_responses(row: dict[str, Any]) -> list[tuple[str, float, str]]:
    """(text, goodness, critique) per response; goodness is higher-is-better."""
    responses = row.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise _RowError("field 'responses' must be a list of at least 2 response objects")
    by = "score" if all(isinstance(r, dict) and "score" in r for r in responses) else "rank"
    out = []
    for i, response in enumerate(responses):
        if not isinstance(response, dict):
            raise _RowError(f"responses[{i}] must be an object")
        text = next((response[k] for k in _TEXT_KEYS if isinstance(response.get(k), str)), None)
        if text is None:
            raise _RowError(f"responses[{i}] needs a text field ({' | '.join(_TEXT_KEYS)})")
        value = response.get(by)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _RowError(f"responses[{i}] needs a numeric 'score' (higher is better) or 'rank' "
                            "(1 is best), the same key for every response of the row")
        critique = response.get("critique", response.get("reason", ""))
        out.append((text, float(value) if by == "score" else -float(value), critique or ""))
    return out


def _pairs_from_ranked_row(row: dict[str, Any], uid: str) -> list[PreferencePair]:
    row_id = _string(row, "id")
    prompt = row.get("prompt", row.get("question"))
    if not isinstance(prompt, str):
        raise _RowError("a ranked row needs a string 'prompt' (or 'question')")
    responses = _ranked_responses(row)
    base = {k: v for k, v in row.items() if k not in ("responses", "question")}
    base["prompt"] = prompt
    base.setdefault("query_id", row_id)
    pairs = []
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            if responses[i][1] == responses[j][1]:
                continue  # a tie says nothing about preference
            better, worse = (i, j) if responses[i][1] > responses[j][1] else (j, i)
            fields = dict(base, chosen=responses[better][0], rejected=responses[worse][0],
                          chosen_reason=responses[better][2], rejected_reason=responses[worse][2])
            pairs.append(_pair_from_dpo_row(fields, f"{uid}:{better}-{worse}"))
    return pairs


def pairs_from_row(row: Any, uid: str, fmt: str = "auto") -> list[PreferencePair]:
    """The pairs one parsed row holds. Raises ValueError (a `_RowError`) on a malformed row."""
    if not isinstance(row, dict):
        raise _RowError(f"a row must be a JSON object, got {type(row).__name__}")
    layout = detect_format(row) if fmt == "auto" else fmt
    if fmt != "auto" and "responses" in row and layout == "dpo_pairs":
        raise _RowError("a ranked row (it has 'responses') in a dpo_pairs file; one layout per file")
    if layout == "ranked":
        return _pairs_from_ranked_row(row, uid)
    return [_pair_from_dpo_row(row, uid)]


# --------------------------------------------------------------------------------- files -> pairs


def _data_files(uri: str) -> list[str]:
    """One file, or every *.jsonl under a folder/prefix (name order)."""
    if storage.is_remote(uri):
        if not uri.endswith("/"):
            return [uri]
        return sorted(i.uri for i in storage.list_prefix(uri) if i.uri.endswith(".jsonl"))
    path = storage.local_path(uri)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*.jsonl"))
    return [str(path)]


def media_base_of(uri: str, media_uri: str | None = None) -> str:
    """Where relative media paths resolve: `media_uri`, else the folder holding the data file."""
    if media_uri:
        return media_uri
    if storage.is_remote(uri):
        return posixpath.dirname(uri.rstrip("/") if uri.endswith("/") else uri) + "/"
    path = storage.local_path(uri)
    return str(path if path.is_dir() else path.parent)


def iter_pairs(
    source: DataSource | str,
    *,
    on_bad_line: str | None = None,
    fmt: str | None = None,
    stats: ReadStats | None = None,
) -> Iterator[PreferencePair]:
    """Stream the pairs of `source` (a DataSource or a URI) in file order.

    A malformed line raises DataError("file:line: what is wrong ... what to do") unless
    `on_bad_line == "skip"` (then `stats.skipped` counts it). Keyword arguments override the spec's.
    """
    spec = source if isinstance(source, DataSource) else DataSource(uri=source)
    on_bad_line = on_bad_line or spec.on_bad_line
    fmt = fmt or spec.format
    stats = stats if stats is not None else ReadStats()
    if spec.uri.startswith("builtin://"):
        from mmalign.trainer import builtin

        uri = builtin.dataset_file(spec.uri)
    else:
        uri = spec.uri
    files = _data_files(uri)
    if not files:
        raise DataError(f"{spec.uri}: no *.jsonl files found; point data.uri at a JSONL file or folder")
    for file in files:
        base = media_base_of(file if not uri.endswith("/") else uri, spec.media_uri)
        yield from _iter_file(file, base, on_bad_line, fmt, stats)


@contextlib.contextmanager
def _open_lines(file: str) -> Iterator[Iterator[str | bytes]]:
    """Lines of a local file as bytes (decoded per line, so one bad byte costs one line), or of an
    S3 object as text (storage streams and decodes it)."""
    if storage.is_remote(file):
        with storage.open_lines(file) as lines:
            yield lines
        return
    with open(storage.local_path(file), "rb") as f:
        yield iter(f)


def _iter_file(file: str, base: str, on_bad_line: str, fmt: str, stats: ReadStats) -> Iterator[PreferencePair]:
    with contextlib.ExitStack() as stack:
        try:
            lines = stack.enter_context(_open_lines(file))
        except FileNotFoundError:
            raise DataError(f"{file}: no such file; check data.uri") from None
        number = 0
        while True:
            try:
                line = next(lines, None)
            except UnicodeDecodeError as error:  # S3 stream: the stream cannot go on past it
                raise DataError(f"{file}:{number + 1}: not UTF-8 text ({error}); re-encode the file as "
                                "UTF-8") from None
            if line is None:
                break
            number += 1
            stats.lines += 1
            try:
                text = line.decode("utf-8") if isinstance(line, bytes) else line
                if not text.strip():
                    continue
                row = json.loads(text)
                pairs = pairs_from_row(row, f"{posixpath.basename(file)}:{number}", fmt)
                fmt = detect_format(row) if fmt == "auto" else fmt  # the first good row fixes the file's layout
                if not pairs:  # a ranked row whose responses all tie holds no preference
                    stats.skip(f"{file}:{number}", "every response of the ranked row has the same score/rank: "
                               "no pair (give them different scores or drop the row)")
                    continue
            except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                why = f"not valid JSON ({error})" if isinstance(error, json.JSONDecodeError) else str(error)
                if isinstance(error, UnicodeDecodeError):
                    why = f"not UTF-8 text ({error})"
                if on_bad_line == "skip":
                    stats.skip(f"{file}:{number}", why)
                    continue
                raise DataError(
                    f"{file}:{number}: {why}. Fix or remove the line, or set data.onBadLine: skip "
                    "to skip malformed lines (they are counted)."
                ) from None
            for pair in pairs:
                pair.media_base, pair.source, pair.line = base, file, number
                stats.pairs += 1
                yield pair


def read_pairs(source: DataSource | str, **kwargs: Any) -> tuple[list[PreferencePair], ReadStats]:
    """All pairs in memory (fine for RewardBench-sized sets; stages should prefer `iter_pairs`)."""
    stats = ReadStats()
    pairs = list(iter_pairs(source, stats=stats, **kwargs))
    if not pairs:
        raise DataError(f"{source.uri if isinstance(source, DataSource) else source}: no preference "
                        f"pairs ({stats.lines} lines, {stats.skipped} skipped); check the file and format")
    return pairs, stats


# --------------------------------------------------------------------------------- train/eval split


def eval_queries(query_ids: Iterable[str], eval_fraction: float, seed: int) -> set[str]:
    """The held-out query ids: exactly round(n·fraction) of the distinct queries (at least 1 when the
    fraction is > 0 and there are >= 2 queries), chosen by a seeded shuffle of the sorted ids, so every
    rank and every restart computes the same split, whatever order the ids came in."""
    ids = sorted(set(query_ids))
    if eval_fraction <= 0 or len(ids) < 2:
        return set()
    count = min(len(ids) - 1, max(1, round(len(ids) * eval_fraction)))
    random.Random(f"mmalign-split-{seed}").shuffle(ids)
    return set(ids[:count])


def split_by_query(
    pairs: list[PreferencePair], eval_fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, eval): a query's pairs always land on the same side (Acc+ needs whole queries)."""
    held_out = eval_queries((p.query_id for p in pairs), eval_fraction, seed)
    train = [p for p in pairs if p.query_id not in held_out]
    evaluation = [p for p in pairs if p.query_id in held_out]
    return train, evaluation


def fingerprint(pairs: Iterable[PreferencePair]) -> str:
    """A short hash of the pairs in order, by content: each pair's uid, texts, media paths, rewards and
    its row's fields, so rewriting a row changes it (media files themselves are not read). Checkpoints
    and stage outputs record it to detect changed data."""
    digest = hashlib.sha256()
    for pair in pairs:
        content = [pair.uid, pair.query_id, pair.category, pair.prompt, pair.chosen, pair.rejected,
                   pair.chosen_critique, pair.rejected_critique, pair.media, pair.media_kind,
                   pair.chosen_reward, pair.rejected_reward, pair.delta, pair.fields]
        digest.update(json.dumps(content, sort_keys=True, default=str).encode() + b"\0")
    return digest.hexdigest()[:16]
