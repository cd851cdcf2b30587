"""kwok nodes for scale tests (`mmalign dev up --fast` / `--kwok-nodes N`): real kwok, nothing runs.

The kwok controller (sigs.k8s.io/kwok, built from the Go module proxy by binaries.build_kwok) manages
the Node objects that carry the annotation `kwok.x-k8s.io/node: fake`: it keeps them Ready (node
heartbeat and Lease) and moves the pods bound to them through kwok Stage resources. The real
kube-scheduler binds pods to those nodes; no container is ever started.

The stages, all in kwok's own Stage API, given to the controller in its config file:
- kwok's own `node-initialize`, `node-heartbeat-with-lease`, `pod-ready` and `pod-delete`, copied
  unchanged from the kwok module at build time (binaries.build_kwok): a bound pod goes Running with an
  address at once; a deleted pod goes at once.
- ours, `mmalign-pod-exit` (below): a Running pod that carries the annotation
  `kwok.mmalign.io/exit-code: "N"` terminates, after `kwok.mmalign.io/exit-after` (a Go duration,
  default 0s), with that exit code: Succeeded for 0, else Failed (reason Error), the termination
  message from `kwok.mmalign.io/message`. Set it in the pod (an AlignmentJob's podTemplate.annotations)
  or later with `kubectl annotate pod P kwok.mmalign.io/exit-code=137` to fail one pod.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from mmalign.devcluster.kubeapi import KubeApi

NODE_ANNOTATION = "kwok.x-k8s.io/node"  # kwok's own: the nodes it manages (annotation selector below)
NODE_PREFIX = "kwok-node"
NODE_LABEL = "type"  # kwok's convention: type=kwok, to select (or avoid) the fake nodes
EXIT_CODE_ANNOTATION = "kwok.mmalign.io/exit-code"
EXIT_AFTER_ANNOTATION = "kwok.mmalign.io/exit-after"
MESSAGE_ANNOTATION = "kwok.mmalign.io/message"
# kwok's stage files used as they are, relative to the kwok module's root (binaries.build_kwok copies them).
UPSTREAM_STAGES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)
# Pod addresses: kwok's default /24 has 254 of them; a 1,024-node benchmark needs more.
POD_CIDR = "10.128.0.0/16"
# The API server's calls for `kubectl logs` of a fake pod go to the node's address: loopback with no
# kubelet port fails at once, where kwok's default 10.0.0.1 would hang until the dial times out.
NODE_IP = "127.0.0.1"

_EXIT_TEMPLATE = """\
{{ $now := Now }}
{{ $notes := or .metadata.annotations dict }}
{{ $code := index $notes "@CODE@" }}
{{ $message := or ( index $notes "@MESSAGE@" ) "" }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "False"
  type: Ready
- lastTransitionTime: {{ $now | Quote }}
  status: "False"
  type: ContainersReady
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: false
  restartCount: 0
  started: false
  state:
    terminated:
      exitCode: {{ $code }}
      finishedAt: {{ $now | Quote }}
      reason: {{ if eq $code "0" }}Completed{{ else }}Error{{ end }}
      message: {{ $message | Quote }}
      startedAt: {{ $now | Quote }}
{{ end }}
phase: {{ if eq $code "0" }}Succeeded{{ else }}Failed{{ end }}
""".replace("@CODE@", EXIT_CODE_ANNOTATION).replace("@MESSAGE@", MESSAGE_ANNOTATION)


def exit_stage() -> dict[str, Any]:
    """Our Stage: a Running pod with the exit-code annotation terminates with that code."""
    return {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": "mmalign-pod-exit"},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
            "selector": {
                "matchExpressions": [
                    {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
                    {"key": ".status.phase", "operator": "In", "values": ["Running"]},
                    {"key": f'.metadata.annotations["{EXIT_CODE_ANNOTATION}"]', "operator": "Exists"},
                ]
            },
            "delay": {
                "durationMilliseconds": 0,
                "durationFrom": {"expressionFrom": f'.metadata.annotations["{EXIT_AFTER_ANNOTATION}"]'},
            },
            "next": {"statusTemplate": _EXIT_TEMPLATE},
        },
    }


def config_text(stages_dir: Path) -> str:
    """The kwok controller's --config: its options, kwok's own stages and ours (multi-document YAML)."""
    missing = [s for s in UPSTREAM_STAGES if not (stages_dir / Path(s).name).exists()]
    if missing:
        raise FileNotFoundError(
            f"kwok's stage files {missing} are not in {stages_dir}: run "
            "`python -m mmalign.devcluster.binaries --kwok`"
        )
    options = {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokConfiguration",
        "options": {
            "cidr": POD_CIDR,
            "nodeIP": NODE_IP,
            "manageNodesWithAnnotationSelector": f"{NODE_ANNOTATION}=fake",
            # A config file's options are not defaulted: kwok refuses zero parallelism.
            # Pods: 16 stage workers (default 4), so a 1,024-pod gang is not kwok-bound.
            "podPlayStageParallelism": 16,
            "nodePlayStageParallelism": 4,
            "nodeLeaseParallelism": 4,
            "podsOnNodeSyncParallelism": 1,
            "nodeLeaseDurationSeconds": 40,
        },
    }
    upstream = [(stages_dir / Path(s).name).read_text().strip() for s in UPSTREAM_STAGES]
    return (
        "\n---\n".join([yaml.safe_dump(options).strip(), *upstream, yaml.safe_dump(exit_stage()).strip()])
        + "\n"
    )


def command(kwok: Path, kubeconfig: Path, config: Path) -> list[str]:
    # No --server-address: kwok then serves no kubelet API (logs, exec), and binds no port.
    return [str(kwok), f"--kubeconfig={kubeconfig}", f"--config={config}", "-v=WARN"]


def scheduler_config_text(kubeconfig: Path) -> str:
    """The real kube-scheduler's config: its client's rate limit raised from 50/s, 100 burst.

    At the default a 1,024-pod gang waits ~20 s for its bindings alone: the scheduler, not the
    operator, would be what the benchmark measures."""
    return yaml.safe_dump(
        {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig), "qps": 2000, "burst": 4000},
            "leaderElection": {"leaderElect": False},
        }
    )


def scheduler_command(scheduler: Path, kubeconfig: Path, config: Path) -> list[str]:
    # --secure-port=0: no serving port, so two dev clusters never compete for 10259.
    return [
        str(scheduler),
        f"--config={config}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--secure-port=0",
        "--v=1",
    ]


def node_name(index: int) -> str:
    return f"{NODE_PREFIX}-{index}"


def node(name: str, cpu: str, memory: str, gpus: int, pods: int = 110) -> dict[str, Any]:
    """A Node object kwok manages; kwok's node-initialize stage keeps the capacity given here."""
    capacity = {
        "cpu": cpu,
        "memory": memory,
        "pods": str(pods),
        **({"nvidia.com/gpu": str(gpus)} if gpus else {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {NODE_ANNOTATION: "fake"},
            "labels": {
                NODE_LABEL: "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
        },
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def create_nodes(api: KubeApi, count: int, cpu: str, memory: str, gpus: int) -> None:
    """Create the Node objects, 16 at a time (1,024 nodes one by one take ~10 s on two cores)."""
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda i: api.create("/api/v1/nodes", node(node_name(i), cpu, memory, gpus)), range(count)
            )
        )
