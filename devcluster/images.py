"""Images for the real node: the pause image, a Debian + python3 base, the project's own image from its
Dockerfile, each built once into ~/.cache/mmalign/images; the project's images reach containerd through
the node's registry (realnode.REGISTRY), so a rebuilt image moves only its changed layers.

- pause: `pause.c` from the kubernetes module (`gcc -static`), packed with umoci, exported with skopeo.
- base: `mmdebstrap` (Debian bookworm, python3 + venv + ca-certificates), committed with buildah
  (`localhost/mmalign-base:bookworm`): the local stand-in for the production CUDA base.
- the project's image: `buildah bud` of the Dockerfile with BASE_IMAGE set to that base; the CA files in
  /usr/local/share/ca-certificates reach every downloading step (this machine's egress re-signs TLS).
  The trainer target (`runtime`) installs the torch stack from ~/.cache/mmalign/wheels/<pins key>
  (`pip download`ed once, bind-mounted with `--volume`), never from the network again.

The pause image is a docker-archive (it carries the image name, which `ctr images import` keeps),
imported before the kubelet starts. The project's images go `buildah push` -> registry -> `ctr images
pull` (ensure_pulled): both ends skip the blobs the other side has, by digest.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from mmalign.devcluster import binaries, realnode

BASE_IMAGE = "localhost/mmalign-base:bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# buildah's own storage, in the cache. overlay: a layer costs its own files (a source-only rebuild of
# the operator image took 340 s with vfs, which copies the whole root file system per layer); vfs only
# where the cache itself is on overlayfs (overlay on overlay is refused).
BUILDAH_FLAGS: tuple[str, ...] = ()


def _log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def images_dir() -> Path:
    return binaries.cache_dir() / "images"


def _buildah_env() -> dict[str, str]:
    root = images_dir() / "buildah"
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(_storage_conf(root))}


def storage_driver(folder: Path) -> str:
    fs = subprocess.run(
        ["stat", "-f", "-c", "%T", str(folder)], capture_output=True, text=True
    ).stdout.strip()
    return "vfs" if fs == "overlayfs" else "overlay"


def _storage_conf(root: Path) -> Path:
    conf = root / "storage.conf"
    if not conf.exists():
        root.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            f'[storage]\ndriver = "{storage_driver(root)}"\ngraphroot = "{root / "graph"}"\nrunroot = "{root / "run"}"\n'
        )
    return conf


def _run(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    proc = subprocess.run(["nice", "-n", "10", *argv], capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def pause_archive() -> Path:
    """The sandbox image as a docker-archive, compiled from the kubernetes module's pause.c once."""
    out = images_dir() / "pause.tar"
    if out.exists():
        return out
    start = time.monotonic()
    source = (
        Path(_run("go", "env", "GOMODCACHE").strip())
        / f"k8s.io/kubernetes@{binaries.KUBERNETES_VERSION}"
        / "build/pause/linux/pause.c"
    )
    if not source.exists():
        raise FileNotFoundError(f"{source} missing: run `python -m mmalign.devcluster.binaries --real-node`")
    images_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=images_dir()) as tmp:
        work = Path(tmp)
        _run(
            "gcc",
            "-Os",
            "-static",
            "-Wall",
            "-Werror",
            f"-DVERSION={binaries.KUBERNETES_VERSION}",
            "-o",
            str(work / "pause"),
            str(source),
        )
        tag = realnode.PAUSE_IMAGE.rsplit(":", 1)[1]
        layout = f"{work / 'oci'}:{tag}"
        _run("umoci", "init", "--layout", str(work / "oci"))
        _run("umoci", "new", "--image", layout)
        _run("umoci", "unpack", "--image", layout, str(work / "bundle"))
        shutil.copy2(work / "pause", work / "bundle" / "rootfs" / "pause")
        _run("umoci", "repack", "--image", layout, str(work / "bundle"))
        _run(
            "umoci",
            "config",
            "--image",
            layout,
            "--config.entrypoint=/pause",
            "--config.user=65535:65535",
            "--architecture=amd64",
            "--os=linux",
        )
        _run("skopeo", "copy", f"oci:{layout}", f"docker-archive:{out}:{realnode.PAUSE_IMAGE}")
    _log(f"pause image built in {time.monotonic() - start:.1f}s -> {out}")
    return out


def import_archive(layout: realnode.NodeLayout, archive: Path) -> None:
    """Load an image archive into the node's containerd (namespace k8s.io, where the CRI looks)."""
    _run(layout.bin("ctr"), f"--address={layout.socket}", "-n", "k8s.io", "images", "import", str(archive))


def _host_cas() -> list[Path]:
    return sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))


def base_image() -> str:
    """The Debian + python3 base in buildah's storage (made once with mmdebstrap, ~2.5 min)."""
    env = _buildah_env()
    have = subprocess.run(
        ["buildah", *BUILDAH_FLAGS, "inspect", "--type", "image", BASE_IMAGE], capture_output=True, env=env
    )
    if have.returncode == 0:
        return BASE_IMAGE
    start = time.monotonic()
    images_dir().mkdir(parents=True, exist_ok=True)
    rootfs = images_dir() / "base-rootfs.tar"
    # The machine's extra CA files (a TLS-intercepting egress) go into the base's trust store, so apt and
    # pip (PIP_CERT, set by project_image) inside image builds can download.
    hooks = [f"--customize-hook=copy-in {ca} /usr/local/share/ca-certificates/" for ca in _host_cas()]
    hooks += ['--customize-hook=chroot "$1" update-ca-certificates'] if hooks else []
    _run(
        "mmdebstrap", "--variant=apt", "--include=" + ",".join(BASE_PACKAGES), *hooks, "bookworm", str(rootfs)
    )
    ctr = _run("buildah", *BUILDAH_FLAGS, "from", "scratch", env=env).strip()
    try:
        _run("buildah", *BUILDAH_FLAGS, "add", ctr, str(rootfs), "/", env=env)
        _run("buildah", *BUILDAH_FLAGS, "config", "--cmd", "python3", ctr, env=env)
        _run("buildah", *BUILDAH_FLAGS, "commit", ctr, BASE_IMAGE, env=env)
    finally:
        subprocess.run(["buildah", *BUILDAH_FLAGS, "rm", ctr], capture_output=True, env=env)
        rootfs.unlink(missing_ok=True)
    _log(f"base image {BASE_IMAGE} built in {time.monotonic() - start:.1f}s")
    return BASE_IMAGE


def requirements(repo: Path) -> list[str]:
    """Every pinned requirement of the trainer image: the build tools the Dockerfile installs first (its
    SETUPTOOLS_VERSION/WHEEL_VERSION ARGs, read from it), then pyproject.toml's lines as its `pins` stage
    extracts them. The wheel cache holds them all, so an install from it needs no index."""
    args = dict(
        re.findall(r"^ARG (SETUPTOOLS_VERSION|WHEEL_VERSION)=(\S+)", (repo / "Dockerfile").read_text(), re.M)
    )
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    tools = [f"setuptools=={args['SETUPTOOLS_VERSION']}", f"wheel=={args['WHEEL_VERSION']}"]
    return [*tools, *project["dependencies"], *extras["operator"], *extras["trainer"]]


def wheels_dir(repo: Path) -> Path:
    """The host's wheel cache for these pins (~/.cache/mmalign/wheels/<key>), downloaded once with
    `pip download` (PyPI's torch is the CUDA build: 2.9 GiB with its nvidia-* wheels) and bind-mounted into
    the image build, which installs from it with --no-index: a rebuild never downloads again."""
    reqs = requirements(repo)
    key = hashlib.sha256(("\n".join(reqs) + f"\ncp{sys.version_info[0]}{sys.version_info[1]}").encode())
    out = binaries.cache_dir() / "wheels" / key.hexdigest()[:16]
    if (out / "COMPLETE").exists():
        return out
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    listing = out / "requirements.txt"
    listing.write_text("\n".join(reqs) + "\n")
    # deepspeed is an sdist: its metadata comes from its setup.py, which imports torch (the venv's).
    _run(
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-build-isolation",
        "-d",
        str(out),
        "-r",
        str(listing),
        env={**os.environ, "DS_BUILD_OPS": "0"},
    )
    (out / "COMPLETE").write_text("")
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**30
    _log(
        f"wheels for the trainer image downloaded in {time.monotonic() - start:.1f}s ({size:.2f} GiB) -> {out}"
    )
    return out


def image_size(image: str) -> str:
    """An image's size in buildah's storage, as buildah prints it ("6.51 GB": its layers, uncompressed)."""
    return _run(
        "buildah", *BUILDAH_FLAGS, "images", "--format", "{{.Size}}", image, env=_buildah_env()
    ).strip()


def has_image(layout: realnode.NodeLayout, image: str) -> bool:
    """Whether the node's containerd holds `image` (its content survives `dev down`, see NodeLayout)."""
    names = _run(layout.bin("ctr"), f"--address={layout.socket}", "-n", "k8s.io", "images", "ls", "-q")
    return image in names.split()


def ensure_pulled(layout: realnode.NodeLayout, image: str) -> dict[str, float]:
    """`image` (`localhost/<name>:<tag>`, in buildah's storage) in the node's containerd, unless it is
    there already: pushed to the node's registry, then pulled by containerd as the kubelet would.

    Only what the other side lacks moves: `buildah push` gzips and sends only the layers the registry
    lacks (its blob-info cache remembers each layer's gzip digest, which it asks the registry for; a docker
    registry destination always gets compressed layers from buildah 1.28, `--disable-compression` or not),
    `ctr images pull` unpacks no layer it has a snapshot of (by chain ID) and fetches no blob it has.
    After a source change that is the few-MB source layer, not the GBs below it (the docker-archive
    import this replaced streamed the whole trainer image, 6.5 GB, for every new tag: 327-607 s).
    Returns seconds taken, for the tests' report."""
    if has_image(layout, image):
        return {}
    timings: dict[str, float] = {}
    start = time.monotonic()
    _run(
        "buildah",
        *BUILDAH_FLAGS,
        "push",
        "--quiet",
        # The registry speaks plain http, on the node's namespace address only.
        "--tls-verify=false",
        image,
        f"docker://{realnode.registry_reference(image)}",
        env={**_buildah_env(), **realnode.no_proxy_env(dict(os.environ))},
    )
    timings["push"] = round(time.monotonic() - start, 1)
    start = time.monotonic()
    _run(
        layout.bin("ctr"),
        f"--address={layout.socket}",
        "-n",
        "k8s.io",
        "images",
        "pull",
        f"--hosts-dir={layout.hosts_dir}",
        image,
    )
    timings["pull"] = round(time.monotonic() - start, 1)
    _log(f"{image} pushed to the node's registry and pulled by containerd: {timings}")
    return timings


def content_key(repo: Path) -> str:
    """What the project image depends on: the Dockerfile, the pins and every packaged source file."""
    digest = hashlib.sha256()
    files = [repo / "Dockerfile", repo / "pyproject.toml", repo / "README.md"]
    for package in ("mmalign", "operator", "trainer", "devcluster"):
        files += sorted(
            p for p in (repo / package).rglob("*") if p.is_file() and "__pycache__" not in p.parts
        )
    for path in files:
        digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def project_image(repo: Path, target: str = "runtime") -> str:
    """The project's image from its Dockerfile on the local base, tagged by its content key."""
    tag = f"localhost/mmalign:{target}-{content_key(repo)}"
    env = _buildah_env()
    if (
        subprocess.run(
            ["buildah", *BUILDAH_FLAGS, "inspect", "--type", "image", tag], capture_output=True, env=env
        ).returncode
        == 0
    ):
        return tag
    base = base_image()
    # The trainer stack from the host's wheel cache, never from the network again (see wheels_dir).
    wheels = (
        [f"--volume={wheels_dir(repo)}:/wheels:ro", "--build-arg=WHEELS=/wheels"]
        if target == "runtime"
        else []
    )
    start = time.monotonic()
    _run(
        "buildah",
        *BUILDAH_FLAGS,
        "bud",
        "--isolation=chroot",
        "--network=host",
        "--pull=never",
        "--layers",
        f"--build-arg=BASE_IMAGE={base}",
        f"--build-arg=OPERATOR_BASE_IMAGE={base}",
        # pip trusts its own certifi bundle, not the system store: point it at the base's store, which
        # holds this machine's CA files (see base_image).
        "--build-arg=PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
        *wheels,
        f"--target={target}",
        "-t",
        tag,
        str(repo),
        env=env,
    )
    _log(f"{tag} built in {time.monotonic() - start:.1f}s")
    return tag
