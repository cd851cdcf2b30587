"""devcluster/kwok.py's pure parts: the kwok controller's config, our exit Stage, the nodes it manages;
bench/operator_scale.py's pure helpers. The real kwok runs in tests/integration/test_kwok.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bench import operator_scale
from mmalign.api.spec import AlignmentJobSpec
from mmalign.devcluster import kwok


def test_config_has_kwoks_own_stages_then_ours(tmp_path: Path) -> None:
    for stage in kwok.UPSTREAM_STAGES:
        (tmp_path / Path(stage).name).write_text(f"kind: Stage\nmetadata: {{name: {Path(stage).stem}}}\n")
    docs = list(yaml.safe_load_all(kwok.config_text(tmp_path)))
    assert docs[0]["kind"] == "KwokConfiguration"
    assert docs[0]["options"]["manageNodesWithAnnotationSelector"] == f"{kwok.NODE_ANNOTATION}=fake"
    assert [d["metadata"]["name"] for d in docs[1:]] == [
        "node-initialize",
        "node-heartbeat-with-lease",
        "pod-ready",
        "pod-delete",
        "mmalign-pod-exit",
    ]
    exit_stage = docs[-1]["spec"]
    keys = [e["key"] for e in exit_stage["selector"]["matchExpressions"]]
    assert f'.metadata.annotations["{kwok.EXIT_CODE_ANNOTATION}"]' in keys
    assert kwok.EXIT_AFTER_ANNOTATION in exit_stage["delay"]["durationFrom"]["expressionFrom"]
    assert kwok.EXIT_CODE_ANNOTATION in exit_stage["next"]["statusTemplate"]


def test_missing_stage_files_name_the_command_that_makes_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="binaries --kwok"):
        kwok.config_text(tmp_path)


def test_node_is_annotated_for_kwok_with_the_capacity_asked() -> None:
    node = kwok.node("kwok-node-3", "8", "32Gi", 2)
    assert node["metadata"]["annotations"] == {kwok.NODE_ANNOTATION: "fake"}
    assert node["status"]["allocatable"] == {
        "cpu": "8",
        "memory": "32Gi",
        "pods": "110",
        "nvidia.com/gpu": "2",
    }


def test_request_counts_are_summed_over_codes_and_diffed() -> None:
    page = "\n".join(
        [
            "# HELP apiserver_request_total Counter",
            'apiserver_request_total{code="201",component="apiserver",resource="pods",subresource="",verb="APPLY"} 5',
            'apiserver_request_total{code="409",component="apiserver",resource="pods",subresource="",verb="APPLY"} 1',
            'apiserver_request_total{code="201",resource="pods",subresource="binding",verb="POST"} 3',
            'apiserver_request_total{code="200",resource="pods",scope="namespace",subresource="",verb="DELETE"} 1',
            'apiserver_request_total{code="200",resource="pods",scope="resource",subresource="",verb="DELETE"} 4',
            'apiserver_request_count{verb="GET"} 9',
        ]
    )
    before = operator_scale.parse_request_counts(page)
    assert before == {"APPLY pods": 6, "POST pods/binding": 3, "DELETECOLLECTION pods": 1, "DELETE pods": 4}
    after = operator_scale.parse_request_counts(page.replace("} 3", "} 10"))
    assert operator_scale.diff_counts(after, before) == {"POST pods/binding": 7}


def test_percentile_and_job_document() -> None:
    assert operator_scale.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert operator_scale.percentile([1.0, 2.0, 3.0, 4.0], 95) == 4.0
    document = operator_scale.job_document("gang-256", 256)
    spec = AlignmentJobSpec.model_validate(document["spec"])  # the benchmark's job is a valid job
    assert spec.resources.nodes == 256 and list(document["spec"]["stages"]) == ["reward"]
