"""The Helm chart without a cluster: `helm lint`, `helm template` goldens, RBAC modes, names, values docs.

helm is the dev cluster's cached, pinned binary (`make binaries` puts it in
`${MMALIGN_CACHE:-~/.cache/mmalign}/bin`); `HELM=/path/to/helm` overrides it.

Refresh the goldens after an intended chart change:

    MMALIGN_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_chart_render.py

The goldens show the AlignmentJob CRD's metadata but not its `spec:` block, which the chart copies as
text from the generated files/crds/alignmentjobs.yaml: an API change is `make crds`, not new goldens.
`test_crd_template_is_the_generated_crd` compares the rendered spec with the generator's model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts/mmalign"
GOLDEN = Path(__file__).resolve().parent / "golden"
CUSTOM_VALUES = GOLDEN / "chart-custom-values.yaml"
CRD_FILE = CHART / "files/crds/alignmentjobs.yaml"
CRD_NAME = "alignmentjobs.mmalign.io"
KEEP = "helm.sh/resource-policy"
RELEASE, NAMESPACE = "mmalign", "mmalign-system"


def helm_binary() -> str:
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    from mmalign.devcluster.binaries import bin_dir

    cached = bin_dir() / "helm"
    if cached.exists():
        return str(cached)
    found = shutil.which("helm")
    if not found:
        pytest.fail("helm is not built yet: run `make binaries` (it caches the pinned helm)")
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def template_text(*extra: str, release: str = RELEASE) -> str:
    return helm("template", release, str(CHART), "--namespace", NAMESPACE, *extra).stdout


def render(*extra: str, release: str = RELEASE) -> list[dict[str, Any]]:
    # libyaml's loader: the rendered CRD embeds the PodSpec schema (~770 KB), 10x slower in pure Python
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(template_text(*extra, release=release), Loader=loader) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


# ---------------------------------------------------------------- lint and goldens


@pytest.mark.parametrize("values", [[], ["-f", str(CUSTOM_VALUES)]], ids=["default", "custom"])
def test_helm_lint_strict(values: list[str]) -> None:
    out = helm("lint", "--strict", str(CHART), *values).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize(
    ("golden", "values"),
    [("chart-default.yaml", []), ("chart-custom.yaml", ["-f", str(CUSTOM_VALUES)])],
    ids=["default", "custom"],
)
def test_template_matches_golden(golden: str, values: list[str]) -> None:
    generated = CRD_FILE.read_text()
    crd_spec = generated[generated.index("\nspec:\n") + 1:]
    text = template_text(*values)
    assert text.count(crd_spec) == 1, "the CRD template must copy the generated spec: block verbatim"
    text = text.replace(crd_spec, f"spec:  # the spec: block of {CRD_FILE.relative_to(CHART)}, verbatim\n")
    path = GOLDEN / golden
    if os.environ.get("MMALIGN_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with MMALIGN_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} differs: review `helm template`, then MMALIGN_UPDATE_GOLDEN=1"


# ---------------------------------------------------------------- what the defaults promise


def test_chart_versions_follow_the_package() -> None:
    from mmalign import __version__

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == __version__ == project["version"]
    assert container(render())["image"] == f"ghcr.io/mmalign/mmalign:{__version__}"


def test_operator_runs_hardened_as_its_service_account() -> None:
    docs = render()
    account = one(docs, "ServiceAccount")["metadata"]["name"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    main = pod["containers"][0]
    assert main["command"] == ["mmalign", "operator"]
    security = main["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert main["resources"]["requests"] and main["resources"]["limits"]["memory"]
    # The read-only root needs somewhere to write: /tmp is an emptyDir.
    assert {"name": "tmp", "mountPath": "/tmp"} in main["volumeMounts"]


def test_probes_use_kopfs_health_endpoint() -> None:
    main = container(render("--set", "operator.healthPort=8181"))
    assert "--liveness-port=8181" in main["args"]
    ports = {port["name"]: port["containerPort"] for port in main["ports"]}
    assert ports["health"] == 8181
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_metrics_service_selects_the_operator_pod() -> None:
    docs = render()
    service = one(docs, "Service")
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert "--metrics-port=9090" in container(docs)["args"]
    assert not by_kind(docs, "ServiceMonitor")
    without = render("--set", "metrics.enabled=false")
    assert not by_kind(without, "Service")
    assert "--metrics-port=0" in container(without)["args"]  # 0: the operator serves no metrics


def test_service_monitor_is_optional() -> None:
    monitor = one(render("--set", "metrics.serviceMonitor.enabled=true"), "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


# ---------------------------------------------------------------- the CRD (crds.install, crds.keep)


def test_crd_template_is_the_generated_crd() -> None:
    """The rendered CRD is, as data, what `mmalign crds` builds from the models, plus the chart's metadata.

    Parsed and compared, not diffed as text: a fromYaml/toYaml round trip in the template would turn
    integers into floats (or `1e-08` into a string for YAML 1.1 parsers) and this would catch it.
    """
    from mmalign.operator import crds

    expected = crds.build_crd()
    assert yaml.load(CRD_FILE.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) == expected, \
        "files/crds/ is stale: run `make crds`"
    docs = render()
    crd = one(docs, "CustomResourceDefinition")
    assert (crd["apiVersion"], crd["kind"]) == (expected["apiVersion"], expected["kind"])
    assert crd["metadata"]["name"] == expected["metadata"]["name"] == CRD_NAME
    assert set(crd) == set(expected) and set(crd["metadata"]) == {"name", "labels", "annotations"}
    assert json.dumps(crd["spec"], sort_keys=True) == json.dumps(expected["spec"], sort_keys=True)
    # The chart's standard labels, the same as on the Deployment; the generator's own label included.
    assert crd["metadata"]["labels"] == one(docs, "Deployment")["metadata"]["labels"]
    assert expected["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()
    assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    # crds.keep (default true): `helm uninstall` leaves the CRD, and the users' AlignmentJobs.
    assert crd["metadata"]["annotations"] == {KEEP: "keep"}


def test_crd_toggles() -> None:
    assert not by_kind(render("--set", "crds.install=false"), "CustomResourceDefinition")
    assert not by_kind(render("--set", "crds.install=false", "--set", "crds.keep=false"),
                       "CustomResourceDefinition")
    removable = one(render("--set", "crds.keep=false"), "CustomResourceDefinition")
    assert removable["metadata"]["name"] == CRD_NAME
    assert KEEP not in removable["metadata"].get("annotations", {})
    # commonLabels reach the CRD like every other object.
    labelled = one(render("--set", "commonLabels.team=alignment"), "CustomResourceDefinition")
    assert labelled["metadata"]["labels"]["team"] == "alignment"


def test_crd_is_a_template_and_only_peering_crds_stay_in_crds_folder() -> None:
    """crds/ is never upgraded or deleted by Helm: only kopf's shared peering CRDs may live there."""
    names = sorted(path.name for path in (CHART / "crds").iterdir())
    assert names == ["kopf-peering.yaml"], names
    peering = yaml.safe_load_all((CHART / "crds/kopf-peering.yaml").read_text())
    kinds = {doc["spec"]["names"]["kind"] for doc in peering}
    assert kinds == {"ClusterKopfPeering", "KopfPeering"}


# ---------------------------------------------------------------- RBAC modes and peering


def test_cluster_wide_mode_uses_a_cluster_role_and_cluster_peering() -> None:
    docs = render()
    assert {d["kind"] for d in docs} >= {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding") and not by_kind(docs, "KopfPeering")
    binding = one(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": one(docs, "ServiceAccount")["metadata"]["name"], "namespace": NAMESPACE}
    ]
    args = container(docs)["args"]
    assert "--all-namespaces" in args
    assert f"--peering={one(docs, 'ClusterKopfPeering')['metadata']['name']}" in args


def test_watch_namespaces_mode_uses_a_role_per_namespace() -> None:
    docs = render("--set", "operator.watchNamespaces={team-a,team-b}")
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    for kind in ("Role", "RoleBinding", "KopfPeering"):
        assert sorted(d["metadata"]["namespace"] for d in by_kind(docs, kind)) == ["team-a", "team-b"]
    args = container(docs)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--all-namespaces" not in args
    role_resources = {r for role in by_kind(docs, "Role") for rule in role["rules"] for r in rule["resources"]}
    assert "kopfpeerings" in role_resources and "clusterkopfpeerings" not in role_resources


def test_standalone_without_peering_and_refused_with_replicas() -> None:
    docs = render("--set", "operator.peering.enabled=false")
    assert not any(arg.startswith("--peering") for arg in container(docs)["args"])  # standalone
    assert not by_kind(docs, "ClusterKopfPeering")
    rules = one(docs, "ClusterRole")["rules"]
    assert not any("kopf.dev" in rule["apiGroups"] for rule in rules)
    proc = helm("template", RELEASE, str(CHART), "--set", "operator.peering.enabled=false",
                "--set", "operator.replicas=2", check=False)
    assert proc.returncode != 0 and "needs operator.peering.enabled" in proc.stderr


def test_rbac_grants_nothing_cluster_scoped_but_peering() -> None:
    """Least privilege: no secrets, no wildcards, no cluster-scoped resources except kopf's peering."""
    rules = one(render(), "ClusterRole")["rules"]
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    resources = {resource for rule in rules for resource in rule["resources"]}
    assert "secrets" not in resources
    assert resources - {"clusterkopfpeerings"} <= {
        "alignmentjobs", "alignmentjobs/status", "alignmentjobs/finalizers", "pods", "pods/log", "services",
        "configmaps", "events", "podgroups",
    }


def _rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def test_rbac_matches_the_operators_own_manifest() -> None:
    """manifests/rbac/ is the operator's list of what it calls; the chart grants the same, no more."""
    manifests = sorted((REPO / "manifests/rbac").glob("*.yaml"))
    assert manifests, "manifests/rbac/ (the operator's ClusterRole) is missing"
    theirs: set[tuple[str, str, str]] = set()
    for path in manifests:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ClusterRole":
                theirs |= _rule_set(doc["rules"])
    ours = _rule_set(one(render(), "ClusterRole")["rules"])
    assert ours == theirs, f"chart only: {sorted(ours - theirs)}; manifests only: {sorted(theirs - ours)}"


# ---------------------------------------------------------------- names and values


def test_long_names_are_cut_to_63_characters() -> None:
    release = "a-release-name-of-fifty-three-characters-helm-s-limit"  # Helm refuses longer ones
    assert len(release) == 53
    docs = render("--set", "nameOverride=operator-for-alignment", release=release)
    for doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and not name.endswith("-"), name
        for key, value in doc["metadata"].get("labels", {}).items():
            assert len(value) <= 63, f"label {key}={value}"
    assert one(docs, "Service")["metadata"]["name"].endswith("-metrics")


def test_custom_values_reach_the_operator() -> None:
    docs = render("-f", str(CUSTOM_VALUES))
    main = container(docs)
    assert main["image"].startswith("registry.example.com/ml/mmalign@sha256:")
    args = main["args"]
    assert "--verbose" in args and "--log-format=plain" in args
    env = {item["name"]: item.get("value") for item in main["env"]}
    assert env["MMALIGN_TRAINER_IMAGE"] == "registry.example.com/ml/mmalign-trainer:0.1.0-cu130"
    defaults = json.loads(env["MMALIGN_POD_DEFAULTS"])
    assert defaults["schedulerName"] == "volcano" and defaults["env"] == [{"name": "NCCL_DEBUG", "value": "WARN"}]
    assert defaults["spec"] == {"imagePullSecrets": [{"name": "registry-credentials"}]}  # a PodSpec fragment
    assert one(docs, "Deployment")["spec"]["replicas"] == 2


def test_trainer_image_defaults_to_the_operator_image_and_pod_defaults_are_omitted_when_empty() -> None:
    env = {item["name"]: item.get("value") for item in container(render())["env"]}
    assert env["MMALIGN_TRAINER_IMAGE"] == "ghcr.io/mmalign/mmalign:0.1.0"
    assert "MMALIGN_POD_DEFAULTS" not in env


def test_the_operator_can_run_from_its_own_slim_image_while_trainers_keep_the_full_one() -> None:
    """operator.image points the Deployment at the Dockerfile's `operator` target; the trainer image
    (MMALIGN_TRAINER_IMAGE) stays `image`, so the operator's node never pulls the multi-GB trainer."""
    slim = ("--set", "operator.image.repository=localhost/mmalign", "--set", "operator.image.tag=operator-abc",
            "--set", "operator.image.pullPolicy=Never")
    main = container(render(*slim))
    env = {item["name"]: item.get("value") for item in main["env"]}
    assert (main["image"], main["imagePullPolicy"]) == ("localhost/mmalign:operator-abc", "Never")
    assert env["MMALIGN_TRAINER_IMAGE"] == "ghcr.io/mmalign/mmalign:0.1.0"
    # Only a tag: the `image` repository with the operator's tag; the pull policy stays image.pullPolicy.
    main = container(render("--set", "operator.image.tag=0.1.0-operator"))
    assert (main["image"], main["imagePullPolicy"]) == ("ghcr.io/mmalign/mmalign:0.1.0-operator", "IfNotPresent")
    # A repository of its own does not inherit image.digest (that digest names the other image).
    digest = "sha256:" + "a" * 64
    main = container(render("--set", f"image.digest={digest}", "--set", "operator.image.repository=r/op"))
    assert main["image"] == "r/op:0.1.0"
    bad = helm("template", "x", str(CHART), "--set", "operator.image.pullPolicy=Sometimes", check=False)
    assert bad.returncode != 0 and "pullPolicy" in bad.stderr


def test_trainer_pods_run_under_the_charts_security_context() -> None:
    """What the operator makes of the rendered Deployment's env: every trainer pod as non-root UID 1000
    with seccomp RuntimeDefault, no privilege escalation, no capabilities, a read-only root and an
    emptyDir at /tmp; `null` turns each off (Helm merges a `{}` with the defaults)."""
    from mmalign.api.spec import AlignmentJobSpec
    from mmalign.operator.builders import BuildOptions, JobRef, build_pod
    from mmalign.operator.main import trainer_security_contexts

    env = {item["name"]: item.get("value") for item in container(render())["env"]}
    pod_security, container_security = trainer_security_contexts(env)
    spec = AlignmentJobSpec.model_validate(yaml.safe_load((REPO / "manifests/examples/tiny-cpu.yaml").read_text())["spec"])
    pod = build_pod(JobRef("j", "ns", "u", spec), "reward", 0, 0,
                    BuildOptions(pod_security_context=pod_security, security_context=container_security))
    security, trainer = pod["spec"]["securityContext"], pod["spec"]["containers"][0]
    assert (security["runAsNonRoot"], security["runAsUser"], security["seccompProfile"]) == (
        True, 1000, {"type": "RuntimeDefault"})
    assert trainer["securityContext"]["allowPrivilegeEscalation"] is False
    assert trainer["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert trainer["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in trainer["volumeMounts"]
    off = container(render("--set", "trainer.podSecurityContext=null", "--set", "trainer.securityContext=null"))
    assert not {"MMALIGN_TRAINER_POD_SECURITY_CONTEXT", "MMALIGN_TRAINER_SECURITY_CONTEXT"} & {
        item["name"] for item in off["env"]}


def test_pod_defaults_have_the_fields_of_an_alignment_jobs_pod_template() -> None:
    """The operator reads MMALIGN_POD_DEFAULTS with the same model as spec.podTemplate."""
    from mmalign.api.runtime import PodTemplate

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    fields = set(PodTemplate.model_json_schema(by_alias=True)["properties"])
    assert set(values["trainer"]["podDefaults"]) == fields
    PodTemplate.model_validate(yaml.safe_load(CUSTOM_VALUES.read_text())["trainer"]["podDefaults"])
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]["trainer"]["properties"]["podDefaults"]["properties"]) == fields


def test_every_value_is_documented() -> None:
    """Each value has a `# --` comment; a documented block's children need none (helm-docs rules)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented: list[str] = []
    documented_block_indent: int | None = None
    comment: list[str] = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        if not stripped:
            comment = []
            continue
        indent = len(line) - len(line.lstrip())
        if documented_block_indent is not None and indent > documented_block_indent:
            continue
        documented_block_indent = None
        match = re.match(r"\s*([\w.-]+):\s*(.*)$", line)
        if not match:
            continue
        key, inline = match.groups()
        has_doc = any(c.startswith("# --") for c in comment)
        is_section = inline == "" and not has_doc
        if has_doc:
            documented_block_indent = indent
        elif not is_section:
            undocumented.append(f"values.yaml:{number}: {key}")
        comment = []
    assert not undocumented, "values without a `# --` comment:\n" + "\n".join(undocumented)


def test_schema_rejects_typos_and_bad_values() -> None:
    for bad, message in [
        (["--set", "operator.replicas=0"], "replicas"),
        (["--set", "operator.typo=1"], "typo"),
        (["--set", "operator.logFormat=xml"], "logFormat"),
        (["--set", "image.digest=latest"], "digest"),
        (["--set", "crds.keep=maybe"], "keep"),
        (["--set", "crds.typo=true"], "typo"),
    ]:
        proc = helm("template", RELEASE, str(CHART), *bad, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (bad, proc.stderr)
