"""The operator at scale: the real `mmalign operator` against the real API server, with kwok nodes.

    python bench/operator_scale.py                 # gangs of 1, 8, 64, 256 nodes; 200 jobs of 4 nodes
    python bench/operator_scale.py --sizes 1024 --jobs 0   # a 1,024-node gang (more than 2 cores cope with)
    python bench/operator_scale.py --quick         # gangs of 1 and 8, 4 jobs of 4: the smoke test (~30 s)
    python bench/operator_scale.py --sizes 1,8,64 --jobs 50 --out bench/results/operator-scale.json

It starts its own dev cluster (`mmalign dev up --kwok-nodes N`: etcd, kube-apiserver, the controller
manager, the real kube-scheduler and kwok; devcluster/kwok.py) and runs the operator as the lifecycle
tests do: a subprocess watching one namespace with the admin kubeconfig. No pod runs anything: kwok marks a
bound pod Running at once, and fails one on request (its exit-code annotation), so what is measured is
the operator, the API server and the scheduler.

Per gang size N (one AlignmentJob with resources.nodes = N, one stage):
  created_s    apply -> every pod of the stage exists (seen by this script's watch)
  running_s    apply -> every pod Running
  restart_s    one pod failed (exit 137) -> every pod of the next attempt Running
  status_lag_s every pod Running -> the job's status says Running (also after the restart)
  requests     kube-apiserver's `apiserver_request_total`, diffed around the step: every client (operator,
               kopf, scheduler, kwok, controller manager), by verb and resource; per pod too
  operator     RSS (MiB, current and peak) and CPU seconds of the operator process
Concurrent jobs: `--jobs J` AlignmentJobs of `--job-nodes` nodes applied at once; the same figures, per job.

Results: JSON (`--out`, default bench/results/operator-scale.json) and, when matplotlib is installed, a
PNG beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from mmalign.api.groupversion import API_GROUP, API_VERSION, PLURAL
from mmalign.api.keys import LABEL_ATTEMPT, LABEL_JOB
from mmalign.devcluster import binaries, kwok
from mmalign.devcluster import cluster as devcluster
from mmalign.devcluster.kubeapi import ApiError, KubeApi

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "operator-scale.json"
JOBS_PATH = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{{ns}}/{PLURAL}"
FAILED_EXIT = "137"  # SIGKILL: a retryable failure, the whole gang restarts with the next attempt


# ------------------------------------------------------------------------------------------ pure helpers


def parse_request_counts(metrics_text: str) -> Counter[str]:
    """`apiserver_request_total` of a /metrics page, summed over codes etc., keyed "VERB resource[/sub]"."""
    counts: Counter[str] = Counter()
    for line in metrics_text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_text, value = line[len("apiserver_request_total{") :].rsplit("} ", 1)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels_text))
        resource = labels.get("resource", "") + (
            f"/{labels['subresource']}" if labels.get("subresource") else ""
        )
        verb = labels.get("verb", "?")
        if verb == "DELETE" and labels.get("scope") in ("namespace", "cluster"):
            verb = "DELETECOLLECTION"  # the API server reports a collection delete as DELETE of a scope
        counts[f"{verb} {resource}"] += int(float(value))
    return counts


def diff_counts(after: Counter[str], before: Counter[str]) -> dict[str, int]:
    """Requests made between two scrapes, largest first (WATCH counts a watch started, not its events)."""
    diff = {key: after[key] - before.get(key, 0) for key in after}
    return dict(sorted(((k, v) for k, v in diff.items() if v > 0), key=lambda kv: (-kv[1], kv[0])))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def job_document(name: str, nodes: int, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """manifests/examples/tiny-cpu.yaml with one stage and `nodes` pods (requests: 1 cpu, 2Gi each)."""
    document: dict[str, Any] = yaml.safe_load((REPO / "manifests/examples/tiny-cpu.yaml").read_text())
    document["metadata"] = {"name": name}
    spec = document["spec"]
    spec["stages"] = {"reward": spec["stages"]["reward"]}
    spec["resources"]["nodes"] = nodes
    spec["runPolicy"] = {**spec["runPolicy"], "backoffLimit": 10}
    if annotations:
        spec["podTemplate"] = {"annotations": annotations}
    return document


# ------------------------------------------------------------------------------------------ observation


class Watcher:
    """Watches the namespace's pods and jobs; records when this process first saw each transition."""

    def __init__(self, api: KubeApi, namespace: str) -> None:
        self.api, self.namespace = api, namespace
        self.lock = threading.Lock()
        self.pod_added: dict[str, float] = {}
        self.pod_running: dict[str, float] = {}
        self.pod_deleted: dict[str, float] = {}
        self.pod_labels: dict[str, dict[str, str]] = {}
        self.pods_live: set[str] = set()
        self.job_phase: dict[str, str] = {}
        self.job_phase_since: dict[tuple[str, str, int], float] = {}  # (job, phase, restarts) -> first seen
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(path, handler), daemon=True)
            for path, handler in (
                (f"/api/v1/namespaces/{namespace}/pods", self._pod),
                (JOBS_PATH.format(ns=namespace), self._job),
            )
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _loop(self, path: str, handler: Callable[[str, dict[str, Any], float], None]) -> None:
        version = ""
        while not self.stop.is_set():
            try:
                if not version:
                    listing = self.api.get(path)
                    now = time.monotonic()
                    for item in listing["items"]:
                        handler("ADDED", item, now)
                    version = listing["metadata"]["resourceVersion"]
                for event in self.api.watch(path, version, timeout_seconds=60):
                    now = time.monotonic()
                    obj = event["object"]
                    version = obj["metadata"].get("resourceVersion", version)
                    if event["type"] != "BOOKMARK":
                        handler(event["type"], obj, now)
                    if self.stop.is_set():
                        return
            except ApiError as error:
                if error.status == 410:
                    version = ""
                time.sleep(0.2)
            except OSError:
                time.sleep(0.2)

    def _pod(self, kind: str, pod: dict[str, Any], now: float) -> None:
        name = pod["metadata"]["name"]
        with self.lock:
            if kind == "DELETED":
                self.pods_live.discard(name)
                self.pod_deleted.setdefault(name, now)
                return
            self.pods_live.add(name)
            self.pod_added.setdefault(name, now)
            self.pod_labels[name] = pod["metadata"].get("labels") or {}
            if (pod.get("status") or {}).get("phase") == "Running" and not pod["metadata"].get(
                "deletionTimestamp"
            ):
                self.pod_running.setdefault(name, now)

    def _job(self, kind: str, job: dict[str, Any], now: float) -> None:
        name = job["metadata"]["name"]
        status = job.get("status") or {}
        phase = status.get("phase", "")
        restarts = int(((status.get("stages") or {}).get("reward") or {}).get("restarts") or 0)
        with self.lock:
            self.job_phase[name] = phase
            self.job_phase_since.setdefault((name, phase, restarts), now)

    def pods_of(self, job: str, attempt: int) -> list[str]:
        with self.lock:
            return [
                n
                for n, labels in self.pod_labels.items()
                if labels.get(LABEL_JOB) == job and labels.get(LABEL_ATTEMPT) == str(attempt)
            ]

    def last(self, table: dict[str, float], names: list[str]) -> float | None:
        with self.lock:
            times = [table.get(n) for n in names]
        return None if not names or None in times else max(t for t in times if t is not None)

    def live_count(self) -> int:
        with self.lock:
            return len(self.pods_live)


def wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class ProcessStats:
    """RSS and CPU time of one process from /proc (Linux)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> dict[str, float]:
        fields = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines()
            if ":" in line
        )
        stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / self.tick  # utime + stime
        return {
            "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
            "peak_rss_mib": int(fields["VmHWM"].split()[0]) / 1024,
            "cpu_s": cpu,
        }


# ------------------------------------------------------------------------------------------ the bench


class Bench:
    def __init__(self, dev: devcluster.DevCluster, namespace: str, operator_pid: int, timeout: float) -> None:
        self.dev, self.api, self.namespace, self.timeout = dev, dev.api(), namespace, timeout
        self.watcher = Watcher(self.api, namespace)
        self.operator = ProcessStats(operator_pid)
        self.jobs_path = JOBS_PATH.format(ns=namespace)

    def requests(self) -> Counter[str]:
        return parse_request_counts(self.api.session.get(self.dev.apiserver + "/metrics", timeout=30).text)

    @contextmanager
    def measured(self, into: dict[str, Any], pods: Callable[[], int]) -> Iterator[None]:
        """Requests (all clients), operator CPU and RSS around a step."""
        before, stats = self.requests(), self.operator.sample()
        yield
        diff = diff_counts(self.requests(), before)
        after = self.operator.sample()
        total = sum(diff.values())
        into["requests"] = {"total": total, "per_pod": round(total / max(pods(), 1), 2), "by_verb": diff}
        into["operator"] = {
            "rss_mib": round(after["rss_mib"], 1),
            "peak_rss_mib": round(after["peak_rss_mib"], 1),
            "cpu_s": round(after["cpu_s"] - stats["cpu_s"], 2),
        }

    def warm_up(self) -> None:
        """One 1-pod job through to Running, not recorded: the operator's start (kopf's login, watches,
        imports) is not part of the first measurement."""
        self.api.create(self.jobs_path, job_document("warm-up", 1))
        wait(
            "the warm-up job Running",
            lambda: self.watcher.job_phase_since.get(("warm-up", "Running", 0)),
            self.timeout,
        )
        self.delete_all()

    def gang(self, nodes: int) -> dict[str, Any]:
        name = f"gang-{nodes}"
        row: dict[str, Any] = {"nodes": nodes}
        w = self.watcher

        def all_pods(attempt: int) -> Any:  # the gang's `nodes` pods of `attempt`, once all exist
            return wait(f"{nodes} pods of attempt {attempt}",
                        lambda: (p := w.pods_of(name, attempt)) and len(p) == nodes and p, self.timeout)

        start = {}
        with self.measured(start, lambda: nodes):
            t0 = time.monotonic()
            self.api.create(self.jobs_path, job_document(name, nodes))
            pods = all_pods(0)
            created = w.last(w.pod_added, pods)
            running = wait(f"{nodes} pods Running", lambda: w.last(w.pod_running, pods), self.timeout)
            status_at = wait(
                "the job Running", lambda: w.job_phase_since.get((name, "Running", 0)), self.timeout
            )
        row.update(
            created_s=round(created - t0, 3),
            running_s=round(running - t0, 3),
            status_lag_s=round(max(status_at - running, 0.0), 3),
            start=start,
        )
        restart: dict[str, Any] = {}
        with self.measured(restart, lambda: 2 * nodes):
            victim = f"{name}-reward-0-{nodes // 2}"
            t1 = time.monotonic()
            self.api.merge_patch(
                f"/api/v1/namespaces/{self.namespace}/pods/{victim}",
                {"metadata": {"annotations": {kwok.EXIT_CODE_ANNOTATION: FAILED_EXIT}}},
            )
            new = all_pods(1)
            new_created = w.last(w.pod_added, new)
            old_gone = w.last(w.pod_deleted, w.pods_of(name, 0))
            new_running = wait(f"{nodes} new pods Running", lambda: w.last(w.pod_running, new), self.timeout)
            back = wait(
                "the job Running again", lambda: w.job_phase_since.get((name, "Running", 1)), self.timeout
            )
        row.update(
            restart_s=round(new_running - t1, 3),
            restart_created_s=round(new_created - t1, 3),
            restart_old_gone_s=round(old_gone - t1, 3) if old_gone else None,
            restart_status_lag_s=round(max(back - new_running, 0.0), 3),
            restart=restart,
        )
        self.delete_all()
        return row

    def concurrent(self, jobs: int, nodes: int) -> dict[str, Any]:
        names = [f"many-{i}" for i in range(jobs)]
        w = self.watcher
        row: dict[str, Any] = {"jobs": jobs, "nodes_per_job": nodes}
        with self.measured(row, lambda: jobs * nodes):
            t0 = time.monotonic()
            with ThreadPoolExecutor(16) as pool:  # `kubectl apply` of many files: a few clients at once
                list(pool.map(lambda n: self.api.create(self.jobs_path, job_document(n, nodes)), names))
            applied = time.monotonic() - t0

            def all_running() -> dict[str, float] | None:
                done = {}
                for n in names:
                    pods = w.pods_of(n, 0)
                    last = w.last(w.pod_running, pods) if len(pods) == nodes else None
                    if last is None:
                        return None
                    done[n] = last
                return done

            running = wait(f"{jobs * nodes} pods Running", all_running, self.timeout, interval=0.2)
            status = wait(
                "every job Running",
                lambda: (
                    (s := [w.job_phase_since.get((n, "Running", 0)) for n in names]) and None not in s and s
                ),
                self.timeout,
                interval=0.2,
            )
        created = [w.last(w.pod_added, w.pods_of(n, 0)) or 0.0 for n in names]
        lags = [max(s - running[n], 0.0) for n, s in zip(names, status, strict=True)]
        to_running = [running[n] - t0 for n in names]
        row.update(
            apply_s=round(applied, 3),
            all_created_s=round(max(created) - t0, 3),
            all_running_s=round(max(to_running), 3),
            running_p50_s=round(statistics.median(to_running), 3),
            running_p95_s=round(percentile(to_running, 95), 3),
            status_lag_p50_s=round(statistics.median(lags), 3),
            status_lag_p95_s=round(percentile(lags, 95), 3),
            status_lag_max_s=round(max(lags), 3),
            all_status_s=round(max(status) - t0, 3),
        )
        row["requests"]["per_job"] = round(row["requests"]["total"] / jobs, 1)
        try:
            self.delete_all()
        except (OSError, TimeoutError) as error:  # measured already: keep the figures
            row["cleanup_error"] = f"{type(error).__name__}: {error}"
        return row

    def delete_all(self) -> None:
        # The API server answers a collection delete once every object is marked: 200 jobs take > 30 s.
        self.api.request("DELETE", self.jobs_path, {"propagationPolicy": "Background"}, timeout=self.timeout)
        wait("the jobs' pods to go", lambda: self.watcher.live_count() == 0, self.timeout, interval=0.2)
        wait("the jobs to go", lambda: not self.api.get(self.jobs_path)["items"], self.timeout, interval=0.2)


# ------------------------------------------------------------------------------------------ setup


def start_operator(dev: devcluster.DevCluster, namespace: str, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "mmalign",
        "operator",
        "--kubeconfig",
        str(dev.kubeconfig),
        "--namespace",
        namespace,
        "--liveness-port",
        "0",
        "--metrics-port",
        "0",
        "--log-format",
        "plain",
    ]
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def setup_namespace(dev: devcluster.DevCluster) -> str:
    from mmalign.devcluster.testing import create_namespace

    result = dev.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "manifests/crds/alignmentjobs.yaml")
    )
    if result.returncode:
        raise RuntimeError(f"applying the CRD: {result.stderr}")
    namespace = create_namespace(dev, "scale")
    api = dev.api()

    def served() -> bool:  # established, and its resource in the API server's discovery
        try:
            return api.get(JOBS_PATH.format(ns=namespace)) is not None
        except ApiError:
            return False

    wait("the AlignmentJob resource to be served", served, 60, interval=0.2)
    dev.kubectl(
        "-n",
        namespace,
        "create",
        "secret",
        "generic",
        "s3-credentials",
        "--from-literal=AWS_ACCESS_KEY_ID=k",
        "--from-literal=AWS_SECRET_ACCESS_KEY=s",
        check=True,
    )
    return namespace


def run(
    sizes: list[int],
    jobs: int,
    job_nodes: int,
    timeout: float,
    log: Callable[[str], None],
    dev: devcluster.DevCluster | None = None,
) -> dict[str, Any]:
    """The whole benchmark; on `dev` when given (a cluster with kwok nodes), else on a cluster of its own."""
    if dev is not None:
        return _run_on(dev, sizes, jobs, job_nodes, timeout, log)
    binaries.ensure_all()
    binaries.ensure_kwok()
    # Every pod requests 1 cpu of a node's 8: the concurrent jobs need jobs * job_nodes / 8 nodes.
    kwok_nodes = max([*sizes, -(-jobs * job_nodes // 8) + 1])
    with tempfile.TemporaryDirectory(prefix="opscale-") as tmp:
        started = time.monotonic()
        dev = devcluster.up(
            Path(tmp) / "dev", nodes=0, kwok_nodes=kwok_nodes, timeout=max(120.0, kwok_nodes / 2)
        )
        log(f"cluster with {kwok_nodes} kwok nodes up in {time.monotonic() - started:.1f}s")
        try:
            return _run_on(dev, sizes, jobs, job_nodes, timeout, log)
        finally:
            dev.down()


def _run_on(
    dev: devcluster.DevCluster,
    sizes: list[int],
    jobs: int,
    job_nodes: int,
    timeout: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    namespace = setup_namespace(dev)
    with tempfile.TemporaryDirectory(prefix="opscale-") as tmp:
        operator = start_operator(dev, namespace, Path(tmp) / "operator.log")
        try:
            bench = Bench(dev, namespace, operator.pid, timeout)
            bench.watcher.start()
            bench.warm_up()
            report: dict[str, Any] = {"gangs": [], "concurrent": None}
            for nodes in sizes:
                row = bench.gang(nodes)
                log(
                    f"gang {nodes}: created {row['created_s']}s running {row['running_s']}s "
                    f"restart {row['restart_s']}s requests/pod {row['start']['requests']['per_pod']}"
                )
                report["gangs"].append(row)
            if jobs:
                row = bench.concurrent(jobs, job_nodes)
                log(
                    f"{jobs} jobs x {job_nodes}: all running {row['all_running_s']}s, status lag p95 "
                    f"{row['status_lag_p95_s']}s, requests/job {row['requests']['per_job']}, "
                    f"operator peak RSS {row['operator']['peak_rss_mib']} MiB"
                )
                report["concurrent"] = row
            bench.watcher.stop.set()
            return report
        except BaseException:
            sys.stderr.write((Path(tmp) / "operator.log").read_text(errors="replace")[-4000:])
            raise
        finally:
            if operator.poll() is None:
                operator.send_signal(signal.SIGTERM)
                try:
                    operator.wait(15)
                except subprocess.TimeoutExpired:
                    operator.kill()
                    operator.wait()
            dev.api().delete(f"/api/v1/namespaces/{namespace}")


def environment() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kubernetes": binaries.KUBERNETES_VERSION,
        "kwok": binaries.KWOK_VERSION,
        "load_average_start": load,
    }


def plot(report: dict[str, Any], path: Path) -> bool:
    """gang size -> seconds (created, Running, restart), log-log; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    gangs = report["gangs"]
    if not gangs:
        return False
    sizes = [g["nodes"] for g in gangs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (
        ("created_s", "apply -> all pods created"),
        ("running_s", "apply -> all Running"),
        ("restart_s", "1 pod failed -> new gang Running"),
    ):
        left.plot(sizes, [g[key] for g in gangs], marker="o", label=label)
    left.set(xscale="log", xlabel="nodes (pods) in the gang", ylabel="seconds", title="operator + kwok nodes")
    left.legend()
    right.plot(sizes, [g["start"]["requests"]["per_pod"] for g in gangs], marker="o", label="start")
    right.plot(sizes, [g["restart"]["requests"]["per_pod"] for g in gangs], marker="o", label="restart")
    right.set(xscale="log", xlabel="nodes (pods) in the gang", ylabel="API requests per pod (all clients)")
    right.legend()
    fig.suptitle(f"{report['environment']['date']} {report['environment']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        default="1,8,64,256",
        help="gang sizes (nodes), comma-separated; up to 1024 (not coped with on 2 loaded cores)",
    )
    parser.add_argument("--jobs", type=int, default=200, help="concurrent AlignmentJobs (0: skip)")
    parser.add_argument("--job-nodes", type=int, default=4, help="nodes per concurrent job")
    parser.add_argument("--quick", action="store_true", help="--sizes 1,8 --jobs 4: the smoke test")
    parser.add_argument("--timeout", type=float, default=300, help="seconds any one wait may take")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON here, PNG beside it")
    args = parser.parse_args(argv)
    sizes = [1, 8] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    jobs = 4 if args.quick else args.jobs
    if any(not 1 <= s <= 1024 for s in sizes):
        parser.error("--sizes: each between 1 and 1024 (spec.resources.nodes' range)")
    env = environment()
    report = {
        "environment": env,
        "settings": {"sizes": sizes, "jobs": jobs, "job_nodes": args.job_nodes},
        **run(
            sizes, jobs, args.job_nodes, args.timeout, lambda m: print(f"[operator-scale] {m}", flush=True)
        ),
    }
    report["environment"]["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    print(
        f"[operator-scale] wrote {args.out}"
        + (f" and {png}" if plot(report, png) else " (no matplotlib: no PNG)")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
