"""The AlignmentJob API: examples validate, bad specs are rejected with their field path and line, and the
committed CRD YAML is exactly what the models generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmalign.api.jobfile import load_job
from mmalign.api.spec import AlignmentJobManifest
from mmalign.operator import crds
from mmalign.operator.validate import validate_text
from tests.bad_specs import BAD_SPECS, VALIDATE_ONLY_SPECS

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "manifests/examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    assert validate_text(str(path), path.read_text()) == []
    job = load_job(path)
    assert job.spec.stages.enabled() == ["reward", "score", "dpo"]


def test_cli_validate_examples_exit_zero() -> None:
    result = subprocess.run([sys.executable, "-m", "mmalign", "validate", *map(str, EXAMPLES)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_table_has_at_least_twenty_cases() -> None:
    assert len(BAD_SPECS) >= 20


@pytest.mark.parametrize("name,text,expected", BAD_SPECS + VALIDATE_ONLY_SPECS,
                         ids=[c[0] for c in BAD_SPECS + VALIDATE_ONLY_SPECS])
def test_bad_spec_rejected_with_field_path(name: str, text: str, expected: str) -> None:
    problems = validate_text("job.yaml", text)
    assert problems, f"{name}: accepted"
    assert any(expected in str(p) for p in problems), [str(p) for p in problems]
    assert all(str(p).startswith("job.yaml:") for p in problems)


def test_problem_points_at_the_line(tmp_path: Path) -> None:
    text = (REPO / "manifests/examples/tiny-cpu.yaml").read_text().replace("beta: 0.1", "beta: -3")
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "beta: -3" in row)
    file = tmp_path / "job.yaml"
    file.write_text(text)
    result = subprocess.run([sys.executable, "-m", "mmalign", "validate", str(file)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert f"{file}:{line}: spec.stages.dpo.beta: Input should be greater than 0 (got -3)" in result.stderr


def test_every_problem_reported_not_just_the_first() -> None:
    text = BAD_SPECS[0][1].replace("procPerNode: 1", "procPerNode: 0").replace("beta: 0.1", "beta: 0")
    paths = {p.path for p in validate_text("job.yaml", text)}
    assert {"spec.resources.nodes", "spec.resources.procPerNode", "spec.stages.dpo.beta"} <= paths


def test_crd_matches_committed_yaml() -> None:
    """Drift test: run `make crds` after changing the spec models (mmalign/api/spec.py and its parts) or status.py."""
    expected = crds.render()
    for path in crds.OUTPUTS:
        assert path.read_text() == expected, f"{path} is stale: run `make crds`"


def test_crd_is_structural() -> None:
    """No $ref/anyOf/allOf/nullable shapes the API server rejects; every property has a type."""
    schema = crds.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def walk(node: dict, path: str, kubernetes: bool = False) -> None:
        # Under podTemplate.spec: Kubernetes' own PodSpec schema (operator/podschema.py). Its descriptions are
        # `kubectl explain pod.spec`'s; its only defaults are the list-map keys a CRD requires (protocol: TCP).
        for banned in ("$ref", "anyOf", "allOf", "oneOf", "$defs", "title", *(() if kubernetes else ("default",))):
            assert banned not in node, f"{path} has {banned}"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        for key, child in node.get("properties", {}).items():
            if (key != "metadata" or path != "") and not kubernetes:
                assert child.get("description") or path.startswith(".status") or key in ("apiVersion", "kind"), \
                    f"{path}.{key} has no description"
            walk(child, f"{path}.{key}", kubernetes or path.endswith("podTemplate") and key == "spec")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.*", kubernetes)
        if "items" in node:
            walk(node["items"], f"{path}[]", kubernetes)

    walk(schema, "")


def test_crd_names_and_columns() -> None:
    crd = yaml.load(crds.render(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # ~770 KB: libyaml
    assert crd["metadata"]["name"] == "alignmentjobs.mmalign.io"
    assert crd["spec"]["names"]["shortNames"] == ["aj"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Stage", "Phase", "Progress", "Age"]


def test_manifest_round_trip_keeps_camel_case() -> None:
    job = load_job(EXAMPLES[-1])
    dumped = job.model_dump(by_alias=True, exclude_none=True)
    again = AlignmentJobManifest.model_validate(dumped)
    assert again == job
    assert "procPerNode" in dumped["spec"]["resources"]
