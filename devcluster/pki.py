"""A throwaway certificate authority for one dev cluster, made with the `openssl` command line.

Every cluster gets fresh keys in its state folder: the CA, the API server's serving certificate, client
certificates (admin in `system:masters`, the API server's kubelet client), the process node's kubelet
serving certificate, and the service-account signing key pair that makes TokenRequest work. EC P-256
keys: fast to generate and accepted by every component.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# Names the API server answers to from inside the cluster (clients verify the serving cert).
APISERVER_SANS = (
    "IP:127.0.0.1", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local", "IP:10.96.0.1",
)


@dataclass(frozen=True)
class Pki:
    folder: Path

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def ca_crt(self) -> Path:
        return self.path("ca.crt")

    def cert(self, name: str) -> tuple[Path, Path]:
        return self.path(f"{name}.crt"), self.path(f"{name}.key")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _new_key(key: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key.name,
             cwd=key.parent)


def subject(common_name: str, organizations: tuple[str, ...] = ()) -> str:
    """An openssl `-subj` string; O= entries become the Kubernetes groups of a client certificate."""
    return "".join(f"/O={org}" for org in organizations) + f"/CN={common_name}"


def extensions(sans: tuple[str, ...], server: bool, client: bool) -> str:
    usages = [u for u, on in (("serverAuth", server), ("clientAuth", client)) if on]
    lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
             f"extendedKeyUsage={','.join(usages)}"]
    if sans:
        lines.append("subjectAltName=" + ",".join(sans))
    return "\n".join(lines) + "\n"


def issue(pki: Pki, name: str, common_name: str, organizations: tuple[str, ...] = (),
          sans: tuple[str, ...] = (), server: bool = False, client: bool = True) -> tuple[Path, Path]:
    crt, key = pki.cert(name)
    _new_key(key)
    ext = pki.path(f"{name}.ext")
    ext.write_text(extensions(sans, server, client))
    _openssl("req", "-new", "-key", key.name, "-subj", subject(common_name, organizations),
             "-out", f"{name}.csr", cwd=pki.folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "3650", "-sha256", "-extfile", ext.name, "-out", crt.name, cwd=pki.folder)
    ext.unlink()
    pki.path(f"{name}.csr").unlink()
    return crt, key


def create(folder: Path) -> Pki:
    """All keys and certificates a dev cluster needs, in `folder` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    pki = Pki(folder)
    _new_key(pki.path("ca.key"))
    _openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=mmalign-dev-ca", "-days", "3650",
             "-sha256", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", "-out", "ca.crt", cwd=folder)
    issue(pki, "apiserver", "kube-apiserver", sans=APISERVER_SANS, server=True, client=False)
    issue(pki, "admin", "mmalign-admin", ("system:masters",))
    issue(pki, "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",))
    issue(pki, "kubelet", "mmalign-process-node", sans=("IP:127.0.0.1", "DNS:localhost"), server=True)
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa.key", cwd=folder)
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=folder)
    for key in folder.glob("*.key"):
        key.chmod(0o600)
    return pki
