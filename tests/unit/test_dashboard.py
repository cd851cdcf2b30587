"""The chart's Grafana dashboard and trainer PodMonitor, rendered by the real `helm template`.

Every PromQL query of the dashboard (panels and template variables) must name only metrics that the
operator (operator/metrics.py) or the trainer (trainer/prom.py) really export: the names are collected
from their prometheus_client registries, with the suffixes a scrape shows (_total, _bucket, ...), not
from a hand-written list, so renaming a metric without the dashboard fails here.
"""

from __future__ import annotations

import json
import re
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from mmalign.api import keys
from tests.unit.test_chart_render import by_kind, one, render

# the sample names a scrape shows for each metric type (prometheus_client's family name has no _total)
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created", ""),
    "info": ("_info",),
}
METRIC = re.compile(r"\bmmalign_[a-zA-Z0-9_:]+")


def exported(registry: CollectorRegistry, prefix: str) -> set[str]:
    return {
        family.name + suffix
        for family in registry.collect()
        if family.name.startswith(prefix)
        for suffix in _SUFFIXES.get(family.type, ("",))
    }


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    found = [
        (f"panel {panel['title']!r}", target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append(
                (f"variable ${variable['name']}", query["query"] if isinstance(query, dict) else query)
            )
    return found


def test_every_dashboard_query_names_an_exported_metric() -> None:
    import mmalign.operator.metrics  # noqa: F401 - registers the operator's metrics in the default registry
    from mmalign.trainer import prom

    names = exported(REGISTRY, "mmalign_operator_") | exported(prom.REGISTRY, "mmalign_trainer_")
    assert "mmalign_operator_gang_restarts_total" in names and "mmalign_trainer_loss" in names

    config_map = one(
        render("--set", "metrics.dashboard.enabled=true", "--show-only", "templates/dashboard.yaml"),
        "ConfigMap",
    )
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["mmalign.json"])
    found = queries(dashboard)
    assert len(found) >= 12
    used: set[str] = set()
    for where, expr in found:
        metrics = set(METRIC.findall(expr))
        assert metrics, f"{where}: {expr!r} names no mmalign metric"
        unknown = metrics - names
        assert not unknown, f"{where}: {sorted(unknown)} are exported by neither the operator nor the trainer"
        used |= metrics
    # the trainer's step, loss, reward accuracy and throughput, and the operator's jobs and restarts, are shown
    assert {
        "mmalign_trainer_step",
        "mmalign_trainer_loss",
        "mmalign_trainer_reward_accuracy",
        "mmalign_trainer_steps_total",
        "mmalign_operator_jobs",
        "mmalign_operator_gang_restarts_total",
    } <= used


def test_pod_monitor_and_dashboard_are_off_by_default() -> None:
    docs = render()
    assert not by_kind(docs, "PodMonitor") and not [
        d for d in by_kind(docs, "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]
    ]


def test_pod_monitor_scrapes_rank_0_of_the_trainer_pods() -> None:
    show = ("--show-only", "templates/podmonitor.yaml")
    monitor = one(render("--set", "metrics.podMonitor.enabled=true", *show), "PodMonitor")
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    assert spec["selector"]["matchLabels"] == {keys.LABEL_NODE_RANK: "0"}
    assert spec["podMetricsEndpoints"][0]["port"] == keys.TRAINER_METRICS_PORT_NAME
    watched = one(
        render(
            "--set", "metrics.podMonitor.enabled=true", "--set", "operator.watchNamespaces={team-a}", *show
        ),
        "PodMonitor",
    )
    assert watched["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}


def test_trainer_pods_name_the_metrics_port() -> None:
    from mmalign.api.spec import AlignmentJobSpec
    from mmalign.operator import builders

    spec = AlignmentJobSpec.model_validate(
        {
            "model": {"uri": "builtin://tiny-text"},
            "data": {"uri": "builtin://synthetic-colors"},
            "storage": {"uri": "s3://b/p/"},
            "stages": {"reward": {}},
        }
    )
    pod = builders.build_pod(builders.JobRef(name="j", namespace="n", uid="u", spec=spec), "reward", 0, 0)
    container = pod["spec"]["containers"][0]
    assert {
        "name": keys.TRAINER_METRICS_PORT_NAME,
        "containerPort": keys.TRAINER_METRICS_PORT,
        "protocol": "TCP",
    } in container["ports"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[keys.ENV_METRICS_PORT] == str(keys.TRAINER_METRICS_PORT)
