"""Kueue (sigs.k8s.io/kueue) in a dev cluster: its manager as a process against the cluster's API server.

    kueue = start(cluster, state_dir)   # CRDs, the manager, then its webhooks; returns when they answer
    kueue.stop()                        # webhooks first (they fail closed), then the manager

What runs is Kueue's own: the manager built from the Go module proxy (binaries.build_kueue), its CRDs
and webhook configurations rendered with `kubectl kustomize` from the module's config/components/{crd,
webhook} (copied next to the binary at build time). What the dev cluster changes, and why:

- Webhooks and the CRDs' conversion webhook point at the manager on loopback (`clientConfig.url`,
  https://127.0.0.1:PORT/...) with a serving certificate the cluster's CA signs (pki.issue), instead of
  a Service: the API server runs on the host, no Service routes to a process. Only the webhooks of what
  this manager serves are installed: Kueue's own kinds and the plain-Pod integration (`pod`), the one
  mmalign's gangs use (pod groups); a webhook of a kind nobody serves would fail closed.
- internalCertManagement off (it would issue for `<service>.<namespace>.svc`, which the API server
  cannot reach). With it off, Kueue reads its metrics certificate from the fixed path
  /etc/kueue/metrics/certs: the manager runs in a private mount namespace whose /etc is an overlay of
  the host's with that certificate added, so nothing is written to the host's /etc.
- No leader election, metrics and the visibility API server off (no port, nothing scrapes them), the
  health probe on a loopback port (its /readyz says the webhook server listens).
- The manager uses the cluster's admin kubeconfig, as the operator does in the tests: Kueue's RBAC
  (config/components/rbac) is not exercised here.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from mmalign.devcluster import binaries, pki
from mmalign.devcluster.kubeapi import ApiError, KubeApi

NAMESPACE = "kueue-system"  # the manager's own namespace (Configuration.namespace); its webhooks skip it
# Kueue's integrations the manager runs: mmalign's gangs are plain pods in pod groups.
FRAMEWORKS = ("pod",)
# The API groups whose webhooks the manager serves: its own kinds, and the core group for pods.
SERVED_GROUPS = {"kueue.x-k8s.io", ""}
WEBHOOK_CONFIGURATIONS = {  # kustomize's namePrefix `kueue-` (config/default), as a release names them
    "MutatingWebhookConfiguration": "kueue-mutating-webhook-configuration",
    "ValidatingWebhookConfiguration": "kueue-validating-webhook-configuration",
}
GATE = "kueue.x-k8s.io/admission"  # the scheduling gate Kueue's pod webhook adds until admission
METRICS_CERT_DIR = "kueue/metrics/certs"  # under /etc: cmd/kueue/main.go's metricsCertPath


# ---------------------------------------------------------------- pure (tests/unit/test_devcluster_kueue.py)


def config(webhook_port: int, health_port: int, cert_dir: Path) -> dict[str, Any]:
    """The manager's --config: config.kueue.x-k8s.io/v1beta2 Configuration."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        # Only what carries a kueue.x-k8s.io/queue-name label is Kueue's (its default, said out loud).
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": list(FRAMEWORKS)},
    }


def command(kueue: Path, kubeconfig: Path, config_file: Path, etc_upper: Path, etc_work: Path) -> list[str]:
    """The manager in a private mount namespace whose /etc is the host's plus its metrics certificate
    (`unshare --map-root-user` adds a user namespace when not root: overlayfs mounts there since Linux 5.11).
    The shell `exec`s the manager, so its PID is the one the caller signals."""
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    script = 'mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc && shift 2 && exec "$@"'
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        *user,
        "sh",
        "-c",
        script,
        "sh",
        str(etc_upper),
        str(etc_work),
        str(kueue),
        f"--config={config_file}",
        f"--kubeconfig={kubeconfig}",
        # Its aggregated visibility API needs a Service and an APIService; nothing here reads it.
        "--feature-gates=VisibilityOnDemand=false",
    ]


def _loopback(client_config: dict[str, Any], base_url: str, ca_bundle: str) -> dict[str, Any]:
    path = (client_config.get("service") or {}).get("path", "")
    return {"url": base_url + path, "caBundle": ca_bundle}


def served(webhook: dict[str, Any], groups: set[str] = SERVED_GROUPS) -> bool:
    """Whether every rule of a webhook is for an API group this manager serves."""
    return all(set(rule.get("apiGroups") or []) <= groups for rule in webhook.get("rules") or [])


def loopback_webhooks(
    documents: Iterable[dict[str, Any]], base_url: str, ca_bundle: str
) -> list[dict[str, Any]]:
    """Kueue's webhook configurations (kustomize's output of config/components/webhook) -> the ones to
    install: named as a release names them, only the served webhooks, each calling `base_url`."""
    out = []
    for document in documents:
        if document.get("kind") not in WEBHOOK_CONFIGURATIONS:
            continue
        hooks = [
            {**hook, "clientConfig": _loopback(hook["clientConfig"], base_url, ca_bundle)}
            for hook in document.get("webhooks") or []
            if served(hook)
        ]
        out.append(
            {**document, "metadata": {"name": WEBHOOK_CONFIGURATIONS[document["kind"]]}, "webhooks": hooks}
        )
    return out


def loopback_crds(documents: Iterable[dict[str, Any]], base_url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's CRDs (kustomize's output of config/components/crd): a conversion webhook (v1beta1 <->
    v1beta2, the storage version) calls `base_url` too."""
    out = []
    for document in documents:
        if document.get("kind") != "CustomResourceDefinition":
            continue
        conversion = (document.get("spec") or {}).get("conversion") or {}
        webhook = conversion.get("webhook")
        if webhook:
            webhook = {**webhook, "clientConfig": _loopback(webhook["clientConfig"], base_url, ca_bundle)}
            document = {
                **document,
                "spec": {**document["spec"], "conversion": {**conversion, "webhook": webhook}},
            }
        out.append(document)
    return out


# ---------------------------------------------------------------- I/O


def render(component: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of one of Kueue's config/components folders (it applies the folder's patches)."""
    rendered = subprocess.run(
        [str(binaries.bin_dir() / "kubectl"), "kustomize", str(component)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if rendered.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {component}: {rendered.stderr.strip()}")
    return [d for d in yaml.safe_load_all(rendered.stdout) if d]


@dataclass
class Kueue:
    """One running manager: its process, ports and files (under `folder`), and the cluster's API."""

    folder: Path
    ca: Path  # the cluster's CA: it signed the manager's serving certificate
    api: KubeApi
    kubectl: Any  # DevCluster.kubectl
    webhook_port: int
    health_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.folder / "kueue.log"

    def ready(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """Webhooks first: with the manager gone they would refuse every pod (failurePolicy Fail). The
        manager is stopped even when that fails (an API server too loaded to answer): no process is left."""
        try:
            for kind, name in WEBHOOK_CONFIGURATIONS.items():
                self.kubectl("delete", kind, name, "--ignore-not-found")
        finally:
            self._stop_process()

    def _stop_process(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def webhooks(self) -> list[dict[str, Any]]:
        return loopback_webhooks(
            render(binaries.kueue_config_dir() / "webhook"), self.base_url, self.ca_bundle
        )

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.webhook_port}"

    @property
    def ca_bundle(self) -> str:
        return base64.b64encode(self.ca.read_bytes()).decode()


def _apply(kubectl: Any, documents: list[dict[str, Any]]) -> None:
    # Server-side: the Workload CRD (1.4 MB) is over a client-side apply's annotation limit.
    applied = kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        "-",
        input="\n---\n".join(json.dumps(d) for d in documents),
        timeout=120,
    )
    if applied.returncode != 0:
        raise RuntimeError(f"applying Kueue's objects: {applied.stderr.strip()}")


def _wait(what: str, check: Any, timeout: float, kueue: Kueue) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if kueue.process is not None and kueue.process.poll() is not None:
            raise RuntimeError(
                f"kueue exited ({kueue.process.returncode}) while waiting for {what}: "
                + kueue.log.read_text(errors="replace")[-3000:]
            )
        try:
            if check():
                return
        except (ApiError, OSError, requests.RequestException):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}; see {kueue.log}")


def gates_pods(api: KubeApi, namespace: str = "default") -> bool:
    """Whether Kueue's pod webhook is live: a dry-run pod with a queue label comes back gated."""
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "kueue-probe-", "labels": {"kueue.x-k8s.io/queue-name": "probe"}},
        "spec": {"containers": [{"name": "probe", "image": "probe"}]},
    }
    created = api.request("POST", f"/api/v1/namespaces/{namespace}/pods", probe, params={"dryRun": "All"})
    return any(g.get("name") == GATE for g in created["spec"].get("schedulingGates") or [])


def start(cluster: Any, timeout: float = 120) -> Kueue:
    """Kueue in `cluster` (a DevCluster): CRDs, the manager, its webhooks; returns when pods get gated.
    Its files go to STATE/kueue (the cluster's state folder; `dev down` removes it)."""
    from mmalign.devcluster.cluster import free_ports

    binary = binaries.bin_dir() / "kueue"
    if not binary.exists() or not binaries.kueue_config_dir().exists():
        raise FileNotFoundError(
            f"no Kueue in {binaries.bin_dir()}: run `python -m mmalign.devcluster.binaries --kueue`"
        )
    folder = cluster.state_dir / "kueue"
    folder.mkdir(exist_ok=True)
    ports = free_ports(("kueue_webhook", "kueue_health"))
    kueue = Kueue(
        folder,
        cluster.layout.pki / "ca.crt",
        cluster.api(),
        cluster.kubectl,
        ports["kueue_webhook"],
        ports["kueue_health"],
    )
    # The webhook server's certificate (controller-runtime wants tls.crt/tls.key in certDir), and the
    # same one as the metrics server's (its path is fixed: METRICS_CERT_DIR in the /etc overlay).
    crt, key = pki.issue(
        pki.Pki(cluster.layout.pki),
        "kueue",
        "kueue-webhook",
        sans=("IP:127.0.0.1",),
        server=True,
        client=False,
    )
    certs, metrics = folder / "certs", folder / "etc-upper" / METRICS_CERT_DIR
    for target in (certs, metrics):
        target.mkdir(parents=True, exist_ok=True)
        (target / "tls.crt").write_bytes(crt.read_bytes())
        (target / "tls.key").write_bytes(key.read_bytes())
        (target / "tls.key").chmod(0o600)
    (folder / "etc-work").mkdir(exist_ok=True)
    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump(config(kueue.webhook_port, kueue.health_port, certs)))

    if not _exists(kueue.api, f"/api/v1/namespaces/{NAMESPACE}"):
        kueue.api.create(
            "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        )
    crds = loopback_crds(render(binaries.kueue_config_dir() / "crd"), kueue.base_url, kueue.ca_bundle)
    _apply(cluster.kubectl, crds)
    names = [f"crd/{crd['metadata']['name']}" for crd in crds]
    waited = cluster.kubectl("wait", "--for=condition=Established", *names, "--timeout=60s", timeout=90)
    if waited.returncode != 0:
        raise RuntimeError(f"Kueue's CRDs not established: {waited.stderr.strip()}")
    argv = command(binary, cluster.kubeconfig, config_file, folder / "etc-upper", folder / "etc-work")
    with open(kueue.log, "ab") as log:
        kueue.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=folder,
        )
    try:
        _wait("kueue /readyz", kueue.ready, timeout, kueue)
        _apply(cluster.kubectl, kueue.webhooks())
        _wait("Kueue's pod webhook", lambda: gates_pods(kueue.api), 30, kueue)
    except BaseException:
        kueue.stop()
        raise
    return kueue


def _exists(api: KubeApi, path: str) -> bool:
    try:
        api.get(path)
    except ApiError as err:
        if err.status == 404:
            return False
        raise
    return True
