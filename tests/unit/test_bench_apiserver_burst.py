"""bench/apiserver_burst.py's pure parts: the pods it sends are the operator's own for that gang, with no
owner (the garbage collector would delete them) and, when gated, a scheduling gate."""

from __future__ import annotations

from bench import apiserver_burst as burst


def test_the_burst_sends_the_operators_pods_unowned_and_gated() -> None:
    pods = burst.gang_pods("ns", 3)
    assert [p["metadata"]["name"] for p in pods] == [
        "burst-reward-0-0",
        "burst-reward-0-1",
        "burst-reward-0-2",
    ]
    assert all("ownerReferences" not in p["metadata"] and p["metadata"]["namespace"] == "ns" for p in pods)
    held = burst.gated(pods)
    assert all(p["spec"]["schedulingGates"] == [{"name": burst.GATE}] for p in held)
    assert all("schedulingGates" not in p["spec"] for p in pods)  # the scheduled burst sends them as built
    assert burst.rate(2.0, 100) == {"s": 2.0, "pods_per_s": 50.0}
