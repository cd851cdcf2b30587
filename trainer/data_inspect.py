"""`mmalign data inspect FILE_OR_URI`: a JSON summary of a preference dataset, without training.

    mmalign data inspect data.jsonl [--media-uri s3://bucket/media/] [--format auto|dpo_pairs|ranked]

Prints {"uri", "format", "lines", "pairs", "queries", "categories": {name: {"pairs", "queries"}},
"media": {"image_rows", "video_rows", "text_rows", "missing_rows", "missing": [{"line", "id", "path"}]},
"malformed": {"count", "rows": [{"line", "error"}]}}. Malformed lines are listed (not fatal) and
media existence is checked (no image is decoded). `--no-media-check` skips the checks (large S3 sets).
Exit codes: 0 the data is clean, 3 (ExitCode.DATA_ERROR) malformed lines or missing media, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from typing import Any

from mmalign.api.exit_codes import ExitCode

_LIST_LIMIT = 100  # rows listed per problem kind; the counts are always complete


def _media_exists(pair: Any) -> tuple[bool, str]:
    from mmalign.trainer import media, storage

    for path in pair.media:
        resolved = media.resolve(path, pair.media_base)
        if storage.is_remote(resolved):
            found = storage.exists(resolved) or bool(storage.list_prefix(resolved.rstrip("/") + "/"))
        else:
            found = os.path.isdir(resolved) if pair.media_kind == "video" else os.path.isfile(resolved)
        if not found:
            return False, resolved
    return True, ""


def summarize(uri: str, media_uri: str | None = None, fmt: str = "auto", check_media: bool = True) -> dict[str, Any]:
    from mmalign.api.inputs import DataSource
    from mmalign.trainer import data

    stats = data.ReadStats()
    stats_limit: list[dict[str, Any]] = []
    source = DataSource.model_validate({"uri": uri, "mediaUri": media_uri, "format": fmt, "onBadLine": "skip"})
    pairs_per_category: Counter[str] = Counter()
    queries_per_category: dict[str, set[str]] = defaultdict(set)
    kinds: Counter[str] = Counter()
    missing: list[dict[str, Any]] = []
    missing_count = 0
    rows_seen: set[tuple[str, int]] = set()
    for pair in data.iter_pairs(source, stats=stats):
        pairs_per_category[pair.category] += 1
        queries_per_category[pair.category].add(pair.query_id)
        row = (pair.source, pair.line)  # expanded ranked pairs share their row
        if row in rows_seen:
            continue
        rows_seen.add(row)
        kinds[pair.media_kind or "text"] += 1
        if check_media and pair.media:
            ok, path = _media_exists(pair)
            if not ok:
                missing_count += 1
                if len(missing) < _LIST_LIMIT:
                    missing.append({"line": pair.line, "id": pair.id, "path": path})
    for example in stats.skipped_examples:
        where, _, error = example.partition(": ")
        stats_limit.append({"line": int(where.rsplit(":", 1)[1]), "error": error})
    return {
        "uri": uri,
        "format": fmt,
        "lines": stats.lines,
        "pairs": stats.pairs,
        "queries": len(set().union(*queries_per_category.values())) if queries_per_category else 0,
        "categories": {
            name: {"pairs": pairs_per_category[name], "queries": len(queries_per_category[name])}
            for name in sorted(pairs_per_category)
        },
        "media": {
            "image_rows": kinds["image"], "video_rows": kinds["video"], "text_rows": kinds["text"],
            "checked": check_media, "missing_rows": missing_count, "missing": missing,
        },
        "malformed": {"count": stats.skipped, "rows": stats_limit},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmalign data", description="inspect a preference dataset")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect_parser = sub.add_parser("inspect", help="JSON summary: pairs, queries, categories, problems")
    inspect_parser.add_argument("uri", help="JSONL file, folder, s3:// URI or builtin://synthetic-colors")
    inspect_parser.add_argument("--media-uri", default=None, help="base for relative media paths")
    inspect_parser.add_argument("--format", default="auto", choices=("auto", "dpo_pairs", "ranked"))
    inspect_parser.add_argument("--no-media-check", action="store_true", help="do not look for media")
    args = parser.parse_args(argv)

    from mmalign.trainer import data

    try:
        summary = summarize(args.uri, args.media_uri, args.format, not args.no_media_check)
    except data.DataError as error:
        print(f"mmalign data inspect: {error}", file=sys.stderr)
        return int(ExitCode.DATA_ERROR)
    print(json.dumps(summary, indent=2))
    clean = not summary["malformed"]["count"] and not summary["media"]["missing_rows"]
    return 0 if clean else int(ExitCode.DATA_ERROR)


if __name__ == "__main__":
    sys.exit(main())
