"""Pure command lines of the dev cluster's real components, from ports and paths.

Every flag that matters is here, with the reason when it is not the default; cluster.py only starts
these and waits. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVICE_CIDR = "10.96.0.0/16"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
S3_ACCESS_KEY = "mmalign-dev"
S3_SECRET_KEY = "mmalign-dev-secret"  # fixed dev credentials: the S3 server only listens on loopback
S3_REGION = "us-east-1"
PORT_NAMES = (
    "etcd_client", "etcd_peer", "apiserver", "kubelet",
    "weed_master", "weed_master_grpc", "weed_volume", "weed_volume_grpc", "weed_filer", "weed_filer_grpc",
    "s3", "s3_grpc", "weed_admin", "weed_admin_grpc", "weed_debug",
)


@dataclass(frozen=True)
class Layout:
    """Where one cluster keeps its files, under its state folder."""

    state_dir: Path
    bin_dir: Path

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    def bin(self, name: str) -> str:
        return str(self.bin_dir / name)


def etcd(layout: Layout, ports: dict[str, int]) -> list[str]:
    client, peer = f"http://127.0.0.1:{ports['etcd_client']}", f"http://127.0.0.1:{ports['etcd_peer']}"
    return [layout.bin("etcd"), "--name=dev", f"--data-dir={layout.state_dir / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=dev={peer}",
            # A throwaway cluster: fsync buys nothing and costs seconds on shared disks.
            "--unsafe-no-fsync", "--log-level=warn"]


def apiserver(layout: Layout, ports: dict[str, int]) -> list[str]:
    pki = layout.pki
    return [
        layout.bin("kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{ports['etcd_client']}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={ports['apiserver']}",
        f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
        # Authentication: client certificates of the cluster CA (admin) and service-account tokens.
        f"--client-ca-file={pki / 'ca.crt'}", "--anonymous-auth=false",
        "--authorization-mode=RBAC",
        f"--service-account-issuer={SA_ISSUER}", f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # `kubectl logs` goes API server -> process node's kubelet endpoint, both sides with certificates.
        f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
        f"--kubelet-certificate-authority={pki / 'ca.crt'}",
        "--kubelet-preferred-address-types=InternalIP",
        # The default endpoint reconciler refuses a loopback advertise address; nothing needs the
        # `kubernetes` Service endpoints (pods get a kubeconfig), so do without it.
        "--endpoint-reconciler-type=none",
        "--allow-privileged=true", "--profiling=false", "--v=1",
        # Priority-and-fairness bookkeeping costs CPU that two cores cannot spare; tests are one client.
        "--enable-priority-and-fairness=false",
    ]


def controller_manager(layout: Layout) -> list[str]:
    pki = layout.pki
    return [
        layout.bin("kube-controller-manager"), f"--kubeconfig={layout.kubeconfig}",
        "--leader-elect=false", "--controllers=*", "--cluster-name=mmalign-dev",
        f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
        # No serving port: nothing scrapes it, and health is seen through what it does.
        "--secure-port=0",
        # Notice Ready process nodes sooner (it removes the not-ready taint new nodes get): 1 s, not 5 s.
        "--node-monitor-period=1s", "--v=1",
    ]


def seaweedfs(layout: Layout, ports: dict[str, int]) -> list[str]:
    p = ports
    return [
        layout.bin("weed"), f"-logdir={layout.logs}", "mini", f"-dir={layout.state_dir / 'weed'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={p['weed_master']}", f"-master.port.grpc={p['weed_master_grpc']}",
        f"-volume.port={p['weed_volume']}", f"-volume.port.grpc={p['weed_volume_grpc']}",
        f"-filer.port={p['weed_filer']}", f"-filer.port.grpc={p['weed_filer_grpc']}",
        f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-admin.port={p['weed_admin']}", f"-admin.port.grpc={p['weed_admin_grpc']}",
        f"-debug.port={p['weed_debug']}", "-webdav=false", "-master.telemetry=false",
        # Its unix sockets default to /tmp; keep them in the state folder that `dev down` removes.
        f"-s3.localSocket={layout.state_dir / 's3.sock'}", f"-filer.localSocket={layout.state_dir / 'filer.sock'}",
        f"-s3.config={layout.state_dir / 's3.json'}",
    ]


def seaweedfs_leftovers(ports: dict[str, int]) -> list[Path]:
    """Unix sockets weed puts in /tmp with no flag to move them; named by our ports, so ours to remove."""
    kinds = ("admin-grpc", "s3-grpc", "volume-grpc", "filer-grpc", "master-grpc", "s3", "filer")
    return [Path(f"/tmp/seaweedfs-{kind}-{port}.sock") for kind in kinds for port in ports.values()]


def s3_identities() -> dict[str, Any]:
    return {"identities": [{"name": "dev", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}


def kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str = "admin") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "mmalign-dev",
        "clusters": [{"name": "mmalign-dev", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "mmalign-dev", "context": {"cluster": "mmalign-dev", "user": user}}],
    }


def shell_env(kubeconfig_path: Path, path_dirs: list[str], s3_port: int, current_path: str) -> dict[str, str]:
    """What `mmalign dev env` exports: kubectl/helm/AWS SDKs then talk to this cluster."""
    kept = [d for d in current_path.split(":") if d and d not in path_dirs]
    return {
        "KUBECONFIG": str(kubeconfig_path), "PATH": ":".join([*path_dirs, *kept]),
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_DEFAULT_REGION": S3_REGION,
    }
