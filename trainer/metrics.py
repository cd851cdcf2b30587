"""RewardBench metrics (MM-RLHF paper, §5): Acc and Acc+ per category and overall.

    table = metrics.reward_bench(rows)   # rows: (query_id, category, chosen_reward, rejected_reward)
    table["overall"]["acc"], table["mcq"]["acc_plus"]

Acc  = fraction of pairs with r(chosen) > r(rejected) (a tie counts as wrong: the model did not prefer
       the chosen response).
Acc+ = fraction of queries ALL of whose pairs are right. A query belongs to the category of its pairs
       (its first pair's, should a file mix them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

OVERALL = "overall"


def _summary(pair_right: list[bool], query_right: dict[str, bool]) -> dict[str, Any]:
    return {
        "acc": sum(pair_right) / len(pair_right) if pair_right else 0.0,
        "acc_plus": sum(query_right.values()) / len(query_right) if query_right else 0.0,
        "pairs": len(pair_right),
        "queries": len(query_right),
    }


def reward_bench(rows: Iterable[tuple[str, str, float, float]]) -> dict[str, dict[str, Any]]:
    """{"overall": {acc, acc_plus, pairs, queries}, "<category>": {...}, ...}; categories sorted."""
    pairs: dict[str, list[bool]] = {OVERALL: []}
    queries: dict[str, dict[str, bool]] = {OVERALL: {}}
    query_category: dict[str, str] = {}
    for query_id, category, chosen_reward, rejected_reward in rows:
        right = chosen_reward > rejected_reward
        category = query_category.setdefault(query_id, category)
        for key in (OVERALL, category):
            pairs.setdefault(key, []).append(right)
            group = queries.setdefault(key, {})
            group[query_id] = group.get(query_id, True) and right
    ordered = [OVERALL, *sorted(k for k in pairs if k != OVERALL)]
    return {key: _summary(pairs[key], queries[key]) for key in ordered}


def reward_bench_from_pairs(pairs: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """The same from data.PreferencePair objects carrying chosen_reward / rejected_reward."""
    rows = []
    for pair in pairs:
        if pair.chosen_reward is None or pair.rejected_reward is None:
            raise ValueError(f"pair {pair.uid} has no chosen_reward/rejected_reward: is this a scored file?")
        rows.append((pair.query_id, pair.category, pair.chosen_reward, pair.rejected_reward))
    return reward_bench(rows)
