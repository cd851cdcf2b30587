"""`mmalign metrics SCORED.jsonl`: RewardBench Acc/Acc+ of a scored-pairs file, as JSON on stdout.

Scored-pairs format (what the score stage writes): every input field of the row, plus `chosen_reward`,
`rejected_reward` (floats), `chosen_critique`, `rejected_critique` (strings, may be empty) and
`delta = chosen_reward - rejected_reward`. The argument may be a file, a folder/prefix of shards, or an
s3:// URI. Output: {"overall": {"acc", "acc_plus", "pairs", "queries"}, "<category>": {...}, ...}.
Exit codes: 0 ok, 2 usage, 3 (ExitCode.DATA_ERROR) unreadable data or rows without rewards.
"""

from __future__ import annotations

import argparse
import json
import sys

from mmalign.api.exit_codes import ExitCode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmalign metrics", description=__doc__.splitlines()[0])
    parser.add_argument("scored", help="scored-pairs JSONL (file, folder, s3:// URI)")
    parser.add_argument("--on-bad-line", choices=("error", "skip"), default="error")
    args = parser.parse_args(argv)

    from mmalign.trainer import data, metrics

    stats = data.ReadStats()
    try:
        pairs = list(data.iter_pairs(args.scored, on_bad_line=args.on_bad_line, stats=stats))
        if not pairs:
            raise data.DataError(f"{args.scored}: no scored pairs found")
        table = metrics.reward_bench_from_pairs(pairs)
    except (data.DataError, ValueError) as error:
        print(f"mmalign metrics: {error}", file=sys.stderr)
        return int(ExitCode.DATA_ERROR)
    if stats.skipped:
        print(f"mmalign metrics: skipped {stats.skipped} malformed lines: {stats.skipped_examples[:3]}",
              file=sys.stderr)
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
