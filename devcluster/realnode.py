"""The real node (`mmalign dev up --node real`): containerd + runc + CNI, a real kubelet, kube-scheduler,
kube-proxy and CoreDNS, with the whole cluster inside a network namespace of its own.

    netns mmalign-dev   (every component; pods get their own netns on the CNI bridge mmdev-br0)
      mmdev1 10.213.0.2/30  <- veth ->  mmdev0 10.213.0.1/30  (host side: the user's shell reaches
                                                                 the API server and S3 at 10.213.0.2)
      mmdev-br0 10.214.0.1/24, pods 10.214.0.2-254
      registry 10.213.0.2:5000 (plain http): buildah pushes the project's images there from the host,
                                containerd pulls `localhost/...` references from it (hosts.toml)

The host's own interfaces, routes and firewall are never touched: the only host-side object is the
veth end `mmdev0` (and the connected route the kernel adds for its /30); kube-proxy's nftables rules
live in the namespace. Components run under `nsenter --net=` (not `ip netns exec`, which would give
them a private mount namespace: containerd's and the kubelet's mounts must be visible on the host).

One kubelet, not several: the kubelet's root (/var/lib/kubelet), containerd's socket (/run/containerd)
and the `kubepods` cgroups are fixed per machine, so one real node per machine, with the machine's real
capacity. Everything here is pure text/argv from paths, except `create_netns`, `stop_pods` and `cleanup`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

NETNS = "mmalign-dev"
HOST_VETH, NS_VETH = "mmdev0", "mmdev1"
HOST_IP, NS_IP = "10.213.0.1", "10.213.0.2"  # a /30 for the veth pair
POD_CIDR, BRIDGE, BRIDGE_IP = "10.214.0.0/24", "mmdev-br0", "10.214.0.1"
NODE_NAME = "mmalign-node"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.2"
# The node's image registry. Images keep their `localhost/<name>:<tag>` names (the tag is a content key):
# containerd's hosts.toml sends every pull of registry host `localhost` to this address, where buildah
# pushed them. One real node per machine, so a fixed port inside its namespace collides with nothing.
IMAGE_HOST = "localhost"
REGISTRY_PORT = 5000
REGISTRY = f"{NS_IP}:{REGISTRY_PORT}"
CLUSTER_DOMAIN = "cluster.local"

# The fixed paths a real node uses outside any state folder: `cleanup` empties and removes each.
KUBELET_ROOT = Path("/var/lib/kubelet")
CONTAINERD_STATE = Path("/run/containerd")
FIXED_PATHS = (
    Path("/var/log/containers"),
    Path("/var/log/pods"),
    KUBELET_ROOT,
    Path("/var/lib/cni"),
    CONTAINERD_STATE,
)
NETNS_PATH = Path("/run/netns") / NETNS
CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup folders the kubelet (cgroupfs driver) and containerd create in every hierarchy.
CGROUP_NAMES = ("kubepods", "k8s.io")
CNI_BIN = Path("/usr/lib/cni")

NODE_COMPONENTS = ("registry", "containerd", "kubelet", "kube-scheduler", "kube-proxy", "coredns")


@dataclass(frozen=True)
class NodeLayout:
    """The real node's files: config under the cluster's state folder, containerd's content in the cache
    (images survive `dev down`, so a second `dev up` imports nothing)."""

    state_dir: Path
    bin_dir: Path
    containerd_root: Path

    @property
    def folder(self) -> Path:
        return self.state_dir / "node"

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def socket(self) -> Path:
        return CONTAINERD_STATE / "containerd.sock"

    @property
    def registry_root(self) -> Path:
        """The registry's blobs, beside containerd's content in the cache: a pushed layer survives
        `dev down`, so the next push of an image sends only the layers that changed."""
        return self.containerd_root.parent / "registry"

    @property
    def hosts_dir(self) -> Path:
        """containerd's registry host folder (`<host>/hosts.toml`), for the CRI and `ctr images pull`."""
        return self.folder / "certs.d"

    def path(self, name: str) -> Path:
        return self.folder / name

    def bin(self, name: str) -> str:
        return str(self.bin_dir / name)


def in_netns(argv: list[str]) -> list[str]:
    """Run argv in the cluster's network namespace only (same mount namespace as the host)."""
    return ["nsenter", f"--net={NETNS_PATH}", "--", *argv]


# ---------------------------------------------------------------- config text (pure)


def containerd_config(layout: NodeLayout) -> str:
    cni_conf = layout.path("cni")
    return f"""version = 3
root = "{layout.containerd_root}"
state = "{CONTAINERD_STATE}"

[grpc]
  address = "{layout.socket}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"

[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{PAUSE_IMAGE}"

[plugins."io.containerd.cri.v1.images".registry]
  # hosts.toml per registry host: `localhost/...` images come from the node's registry (registry_hosts).
  config_path = "{layout.hosts_dir}"

[plugins."io.containerd.cri.v1.runtime"]
  # This VM lacks CAP_SYS_RESOURCE: without it every sandbox fails with "runc create failed: ...
  # can't get final child's PID from pipe: EOF" (runc cannot lower oom_score_adj).
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true

[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["{CNI_BIN}"]
  conf_dir = "{cni_conf}"

[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "runc"

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
  # Debian's runc 1.1 works on cgroup v1 hybrid; crun 1.8 refuses it.
  BinaryName = "{shutil.which("runc") or "/usr/sbin/runc"}"
  SystemdCgroup = false
"""


def cni_config() -> dict[str, object]:
    return {
        "cniVersion": "1.0.0",
        "name": "mmalign",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": BRIDGE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(layout: NodeLayout) -> dict[str, object]:
    pki = layout.pki
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # These machines are cgroup v1 (hybrid); kubelet 1.37 refuses v1 unless told.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{layout.socket}",
        "address": NS_IP,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "tlsCertFile": str(pki / "node-kubelet.crt"),
        "tlsPrivateKeyFile": str(pki / "node-kubelet.key"),
        # The API server (kubectl logs/exec) shows its client certificate; nothing else may call.
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDNS": [NS_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(layout.path("resolv.conf")),
        # The shared disk is often over the kubelet's default 85 %/10 % marks: do not evict or GC for it.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "nodeStatusUpdateFrequency": "4s",
        "syncFrequency": "10s",
        "maxPods": 110,
        "podPidsLimit": -1,
    }


def kube_proxy_config(kubeconfig: Path) -> dict[str, object]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "nftables",
        "clusterCIDR": POD_CIDR,
        "hostnameOverride": NODE_NAME,
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "bindAddress": NS_IP,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # nf_conntrack_max and the conntrack timeouts are machine-wide sysctls: leave them alone.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def corefile(kubeconfig: Path) -> str:
    # Cluster names only: nothing outside the project's namespaces is reachable, so no `forward`.
    return f""".:53 {{
    errors
    health 127.0.0.1:8080
    ready 127.0.0.1:8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} mmalign-dev
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""


def registry_config(layout: NodeLayout) -> dict[str, object]:
    """distribution's config: filesystem storage in the cache, plain http on the namespace's veth address
    (the host's buildah and the namespace's containerd both reach it there), no debug port."""
    return {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(layout.registry_root)},
            "delete": {"enabled": True},
            # Uploads cut off by a stopped cluster are left for the next push to restart, not purged.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": REGISTRY},
    }


def registry_hosts() -> str:
    """containerd's hosts.toml for registry host `localhost`: pull and resolve from the node's registry."""
    return f"""server = "http://{REGISTRY}"

[host."http://{REGISTRY}"]
  capabilities = ["pull", "resolve"]
"""


def no_proxy_env(environ: dict[str, str]) -> dict[str, str]:
    """NO_PROXY/no_proxy with the namespace's address added: buildah and containerd honour a shell's
    HTTP(S)_PROXY, which would send the registry's traffic to a proxy that cannot reach the namespace."""
    have = environ.get("NO_PROXY") or environ.get("no_proxy") or ""
    value = ",".join(part for part in (have, NS_IP) if part)
    return {"NO_PROXY": value, "no_proxy": value}


def registry_reference(image: str) -> str:
    """`localhost/mmalign:tag` -> `10.213.0.2:5000/mmalign:tag`, where buildah pushes what containerd
    pulls as the first name."""
    host, sep, path = image.partition("/")
    if host != IMAGE_HOST or not sep:
        raise ValueError(f"{image!r}: the node's registry serves images named {IMAGE_HOST}/<name>:<tag>")
    return f"{REGISTRY}/{path}"


def kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "mmalign-dev",
        "clusters": [
            {"name": "mmalign-dev", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "mmalign-dev", "context": {"cluster": "mmalign-dev", "user": user}}],
    }


def apiserver_overrides(argv: list[str]) -> list[str]:
    """The control plane's API server flags for the real node: it serves the namespace's veth address
    (the host's shell, the kubelet and pods through the `kubernetes` Service reach it there), publishes
    its endpoint so that Service works, and authorizes kubelets as nodes."""
    replace = {
        "--bind-address": "0.0.0.0",
        "--advertise-address": NS_IP,
        "--endpoint-reconciler-type": "lease",
        "--authorization-mode": "Node,RBAC",
    }
    out = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        out.append(f"{key}={replace[key]}" if key in replace else arg)
    return out


def seaweedfs_overrides(argv: list[str]) -> list[str]:
    replace = {"-ip": NS_IP, "-ip.bind": "0.0.0.0"}
    return [
        f"{arg.split('=', 1)[0]}={replace[arg.split('=', 1)[0]]}" if arg.split("=", 1)[0] in replace else arg
        for arg in argv
    ]


def commands(layout: NodeLayout, admin_kubeconfig: Path) -> dict[str, list[str]]:
    """argv of every node component, in start order (containerd before the kubelet that calls it)."""
    f = layout.path
    return {
        "registry": [layout.bin("registry"), "serve", str(f("registry.yaml"))],
        "containerd": [layout.bin("containerd"), f"--config={f('containerd.toml')}", "--log-level=warn"],
        "kubelet": [
            layout.bin("kubelet"),
            f"--config={f('kubelet.yaml')}",
            f"--kubeconfig={f('kubelet.kubeconfig')}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NS_IP}",
            f"--root-dir={KUBELET_ROOT}",
            "--v=1",
        ],
        "kube-scheduler": [
            layout.bin("kube-scheduler"),
            f"--kubeconfig={admin_kubeconfig}",
            f"--authentication-kubeconfig={admin_kubeconfig}",
            f"--authorization-kubeconfig={admin_kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=10259",
            "--v=1",
        ],
        "kube-proxy": [layout.bin("kube-proxy"), f"--config={f('kube-proxy.yaml')}", "--v=1"],
        "coredns": [layout.bin("coredns"), "-conf", str(f("Corefile"))],
    }


# ---------------------------------------------------------------- I/O


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


def preflight() -> None:
    """What the real node needs from the machine, with what to do when it is missing."""
    if os.geteuid() != 0:
        raise RuntimeError("--node real runs containerd and the kubelet: run as root")
    if NETNS_PATH.exists():
        raise RuntimeError(
            f"network namespace {NETNS} exists: a real node is running or was not cleaned; "
            "`mmalign dev down` (or `ip netns delete mmalign-dev`)"
        )
    if not (CNI_BIN / "bridge").exists():
        raise RuntimeError("CNI plugins missing in /usr/lib/cni: apt-get install containernetworking-plugins")


def create_netns() -> None:
    _sh("ip", "netns", "add", NETNS)
    _sh("ip", "link", "add", HOST_VETH, "type", "veth", "peer", "name", NS_VETH, "netns", NETNS)
    _sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_VETH)
    _sh("ip", "link", "set", HOST_VETH, "up")
    for cmd in (
        ["ip", "addr", "add", f"{NS_IP}/30", "dev", NS_VETH],
        ["ip", "link", "set", NS_VETH, "up"],
        ["ip", "link", "set", "lo", "up"],
        # The bridge forwards between pods and the namespace's own addresses only.
        ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
    ):
        _sh("ip", "netns", "exec", NETNS, *cmd)


def write_configs(layout: NodeLayout, apiserver: str) -> None:
    from mmalign.devcluster import pki as pkimod

    folder = layout.folder
    (folder / "cni").mkdir(parents=True, exist_ok=True)
    pki = pkimod.Pki(layout.pki)
    # The API server's certificate again, with the namespace's address among its names.
    pkimod.issue(
        pki,
        "apiserver",
        "kube-apiserver",
        sans=(*pkimod.APISERVER_SANS, f"IP:{NS_IP}"),
        server=True,
        client=False,
    )
    pkimod.issue(
        pki,
        "node-kubelet",
        f"system:node:{NODE_NAME}",
        ("system:nodes",),
        sans=(f"IP:{NS_IP}", f"DNS:{NODE_NAME}"),
        server=True,
    )
    for key in layout.pki.glob("*.key"):
        key.chmod(0o600)
    (folder / "containerd.toml").write_text(containerd_config(layout))
    (layout.hosts_dir / IMAGE_HOST).mkdir(parents=True, exist_ok=True)
    (layout.hosts_dir / IMAGE_HOST / "hosts.toml").write_text(registry_hosts())
    (folder / "registry.yaml").write_text(yaml.safe_dump(registry_config(layout)))
    layout.registry_root.mkdir(parents=True, exist_ok=True)
    (folder / "cni" / "10-mmalign.conflist").write_text(json.dumps(cni_config(), indent=2))
    (folder / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(layout)))
    (folder / "resolv.conf").write_text(f"nameserver {NS_IP}\n")
    crt, key = pki.cert("node-kubelet")
    (folder / "kubelet.kubeconfig").write_text(
        yaml.safe_dump(kubeconfig(apiserver, pki.ca_crt, crt, key, f"system:node:{NODE_NAME}"))
    )
    admin = layout.state_dir / "kubeconfig"
    (folder / "kube-proxy.yaml").write_text(yaml.safe_dump(kube_proxy_config(admin)))
    (folder / "Corefile").write_text(corefile(admin))
    layout.containerd_root.mkdir(parents=True, exist_ok=True)
    # The kubelet wants its root as a shared mount (mount propagation for volumes): an rshared bind of
    # itself, which `cleanup` unmounts.
    KUBELET_ROOT.mkdir(parents=True, exist_ok=True)
    if not _is_mountpoint(KUBELET_ROOT):
        _sh("mount", "--bind", str(KUBELET_ROOT), str(KUBELET_ROOT))
        _sh("mount", "--make-rshared", str(KUBELET_ROOT))


def _mounts() -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4].replace("\\040", " ") for line in lines]


def _is_mountpoint(path: Path) -> bool:
    return str(path) in _mounts()


def _cgroup_dirs() -> list[Path]:
    """Every kubepods/k8s.io cgroup folder in every hierarchy (v1 controllers and the v2 `unified`)."""
    found: list[Path] = []
    for hierarchy in CGROUP_ROOT.iterdir() if CGROUP_ROOT.exists() else []:
        for name in CGROUP_NAMES:
            if (hierarchy / name).is_dir():
                found.append(hierarchy / name)
    return found


def _pids_in(folder: Path) -> set[int]:
    pids: set[int] = set()
    for procs in folder.rglob("cgroup.procs"):
        try:
            pids |= {int(p) for p in procs.read_text().split()}
        except OSError:
            pass
    return pids


def _cmdlines() -> Iterator[tuple[int, list[bytes]]]:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                yield int(proc.name), (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue


def _shim_pids(socket: Path) -> set[int]:
    """containerd-shim-runc-v2 processes of our containerd (they leave its session on start)."""
    return {
        pid
        for pid, cmd in _cmdlines()
        if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and str(socket).encode() in cmd
    }


def _component_pids(layout: NodeLayout) -> set[int]:
    """Live node components started from the cache (the control plane's are left to cluster.py)."""
    paths = {layout.bin(name).encode() for name in NODE_COMPONENTS}
    return {pid for pid, cmd in _cmdlines() if cmd and cmd[0] in paths}


def stop_pods(layout: NodeLayout) -> None:
    """SIGKILL every container process and shim (the kubelet and containerd are already stopped)."""
    for _ in range(20):
        pids = set().union(*(_pids_in(d) for d in _cgroup_dirs())) | _shim_pids(layout.socket)
        pids.discard(os.getpid())
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def cleanup(layout: NodeLayout) -> None:
    """Unmount, remove cgroups, the network namespace (its veth pair goes with it) and the fixed paths."""
    stop_pods(layout)
    prefixes = [str(p) for p in (*FIXED_PATHS, layout.containerd_root, Path("/run/netns/cni-"))]
    for _ in range(3):
        # Deepest first, lazily: a container's rootfs may still be busy for a moment after its kill.
        targets = sorted(
            {m for m in _mounts() if any(m.startswith(p) for p in prefixes)}, key=len, reverse=True
        )
        if not targets:
            break
        for target in targets:
            _sh("umount", "-l", target, check=False)
    for cni_ns in Path("/run/netns").glob("cni-*"):
        cni_ns.unlink(missing_ok=True)
    for folder in _cgroup_dirs():
        for sub in sorted(
            (p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        ):
            try:
                sub.rmdir()
            except OSError:
                pass
        try:
            folder.rmdir()
        except OSError:
            pass
    if NETNS_PATH.exists():
        _sh("ip", "netns", "delete", NETNS, check=False)
    # `ip netns add` also made /run/netns a (shared) mount of its own; with no namespace left in it, it goes.
    if NETNS_PATH.parent.is_dir() and not any(NETNS_PATH.parent.iterdir()):
        _sh("umount", str(NETNS_PATH.parent), check=False)
        NETNS_PATH.parent.rmdir()
    _sh("ip", "link", "delete", HOST_VETH, check=False)  # gone with the namespace; this is for a half setup
    for path in FIXED_PATHS:
        shutil.rmtree(path, ignore_errors=True)


def leftovers(layout: NodeLayout) -> list[str]:
    """What a real node left on the machine (empty after `cleanup`): the test of `dev down`."""
    found = [
        f"mount {m}"
        for m in _mounts()
        if any(m.startswith(str(p)) for p in (*FIXED_PATHS, layout.containerd_root, NETNS_PATH))
    ]
    found += [f"path {p}" for p in (*FIXED_PATHS, NETNS_PATH) if p.exists()]
    netns_dir = NETNS_PATH.parent
    if _is_mountpoint(netns_dir) and not any(netns_dir.iterdir()):
        found.append(f"mount {netns_dir} (empty)")
    found += [f"cgroup {d}" for d in _cgroup_dirs()]
    found += [f"process {pid}" for pid in _shim_pids(layout.socket) | _component_pids(layout)]
    if Path(f"/sys/class/net/{HOST_VETH}").exists():
        found.append(f"interface {HOST_VETH}")
    return found
