"""`mmalign dev`: a real local Kubernetes control plane, process nodes and S3, in one command.

    mmalign dev binaries                      # build/install the pinned binaries into the cache (once)
    mmalign dev up [--nodes 2] [--gpus-per-node 0] [--fast]
    mmalign dev up --kwok-nodes 256           # kwok nodes (scale tests): pods go Running, nothing runs
    mmalign dev up --node real                # containerd + a real kubelet instead (MMALIGN_NODE=real)
    eval "$(mmalign dev env)"                 # KUBECONFIG, PATH, AWS_* for this shell
    kubectl get nodes
    mmalign dev logs POD [-n NS] [-c CONTAINER]
    mmalign dev down                          # nothing left: no process, port or folder

The state folder is ${MMALIGN_STATE:-~/.local/state/mmalign/dev} unless --state-dir says otherwise.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmalign.devcluster.cluster import DevCluster


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmalign dev", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("--state-dir", type=Path, help="the cluster's state folder")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the cluster in the background and wait until it is healthy")
    up.add_argument("--nodes", type=int, default=2, help="process nodes (default 2)")
    up.add_argument("--gpus-per-node", type=int, default=0, help="nvidia.com/gpu capacity per node")
    up.add_argument("--cpu", default="8", help="cpu capacity per node (default 8)")
    up.add_argument("--memory", default="32Gi", help="memory capacity per node (default 32Gi)")
    up.add_argument("--fast", action="store_true",
                    help="kwok nodes instead of process nodes (as many as --nodes): pods go Running without "
                         "running anything (docs/devcluster.md, fast mode)")
    up.add_argument("--kwok-nodes", type=int, default=0, metavar="N",
                    help="N kwok nodes instead of process nodes (implies --fast)")
    up.add_argument("--node", choices=("process", "real"), default=None,
                    help="process (default) or real: containerd, kubelet, kube-scheduler, kube-proxy and "
                         "CoreDNS in a network namespace (as root; default: $MMALIGN_NODE, else process)")
    up.add_argument("--timeout", type=float, default=120, help="seconds to wait for health")
    sub.add_parser("down", help="stop everything and remove the state folder")
    sub.add_parser("env", help="print `export` lines for eval")
    sub.add_parser("status", help="print the processes and ports of the running cluster")
    logs = sub.add_parser("logs", help="a pod's container log (what `kubectl logs` shows)")
    logs.add_argument("pod")
    logs.add_argument("-n", "--namespace", default="default")
    logs.add_argument("-c", "--container", default=None)
    logs.add_argument("--previous", action="store_true")
    binaries_cmd = sub.add_parser("binaries", help="build/install the pinned binaries into the cache")
    binaries_cmd.add_argument("--real-node", action="store_true", help="also the real node's binaries")
    binaries_cmd.add_argument("--kwok", action="store_true", help="also kwok and kube-scheduler (--fast)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "binaries":
        from mmalign.devcluster import binaries

        return binaries.main((["--real-node"] if args.real_node else []) + (["--kwok"] if args.kwok else []))
    from mmalign.devcluster import cluster

    if args.command == "up":
        start = time.monotonic()
        kwok_nodes = args.kwok_nodes or (args.nodes if args.fast else 0)
        try:
            got = cluster.up(args.state_dir, nodes=0 if kwok_nodes else args.nodes, gpus_per_node=args.gpus_per_node,
                             cpu=args.cpu, memory=args.memory, kwok_nodes=kwok_nodes, timeout=args.timeout,
                             node=args.node,
                             progress=lambda msg: print(f"[dev up] {msg}", file=sys.stderr, flush=True))
        except (RuntimeError, FileNotFoundError, TimeoutError) as err:
            print(f"mmalign dev up: {err}", file=sys.stderr)
            return 1
        print(f"dev cluster ready in {time.monotonic() - start:.1f}s (state: {got.state_dir})\n"
              f'  eval "$(mmalign dev env)" && kubectl get nodes', file=sys.stderr)
        return 0
    if args.command == "down":
        cluster.down(args.state_dir)
        return 0
    try:
        got = cluster.load(args.state_dir)
    except FileNotFoundError as err:
        print(f"mmalign dev {args.command}: {err}", file=sys.stderr)
        return 1
    if args.command == "env":
        for key, value in got.env.items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    if args.command == "status":
        for name, alive in got.alive().items():
            print(f"{name:20} pid {got.processes[name]['pid']:<8} {'running' if alive else 'STOPPED'}")
        print(f"apiserver {got.apiserver}  s3 {got.s3_endpoint}  kubeconfig {got.kubeconfig}")
        return 0
    return _logs(got, args)


def _logs(got: DevCluster, args: argparse.Namespace) -> int:
    """Fallback to `kubectl logs`: reads the node's files directly (same content, no API server)."""
    if got.node == "real":  # the real kubelet serves the logs: kubectl's answer is the answer
        flags = (["-c", args.container] if args.container else []) + (["--previous"] if args.previous else [])
        proc = got.kubectl("logs", args.pod, "-n", args.namespace, *flags)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        return proc.returncode
    pods = sorted(got.state_dir.glob(f"pods/{args.namespace}_{args.pod}_*/logs"))
    if not pods:
        print(f"no pod {args.namespace}/{args.pod} on this cluster's process nodes", file=sys.stderr)
        return 1
    containers = sorted(p for p in pods[-1].iterdir() if p.is_dir())
    chosen = [c for c in containers if args.container in (None, c.name)]
    if not chosen:
        print(f"no container {args.container!r}; containers: {[c.name for c in containers]}", file=sys.stderr)
        return 1
    if args.container is None and len(chosen) > 1:
        print(f"pod has several containers, pick one with -c: {[c.name for c in chosen]}", file=sys.stderr)
        return 1
    files = sorted(chosen[0].glob("*.log"), key=lambda p: int(p.stem))
    wanted = files[-2] if args.previous and len(files) > 1 else files[-1] if files else None
    if wanted is None:
        return 1
    sys.stdout.write(wanted.read_text(errors="replace"))
    return 0
