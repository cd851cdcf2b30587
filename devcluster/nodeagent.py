"""The process node: N simulated nodes in one process, acting as their kubelets and as the scheduler.

    python -m mmalign.devcluster.nodeagent STATE_DIR      (started by `mmalign dev up`)

One loop (every 0.3 s, or at once when a watch reports a change) does, in order: forget pods that are
gone; bind pods that have no node (scheduling.py decides); start, step and report the pods of its nodes
(podrunner.py); honour deletions; rewrite the cluster hosts file (dns.py). Threads only watch (pods,
services) and renew the node Leases; every decision lives in the loop, so there are no races between
them. Config: STATE_DIR/node.json, written by cluster.py.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from mmalign.devcluster import dns, kubeletserver, nodes, scheduling
from mmalign.devcluster.kubeapi import ApiError, KubeApi, pod_path
from mmalign.devcluster.podrunner import NodeContext, PodRun

log = logging.getLogger("process-node")
TERMINAL = ("Succeeded", "Failed")


class Informer:
    """List, then watch, one resource into a dict keyed by uid; re-lists when the watch expires."""

    def __init__(self, api: KubeApi, path: str, on_change: Callable[[], None]):
        self.api, self.path, self.on_change = api, path, on_change
        self.items: dict[str, dict[str, Any]] = {}
        self.synced = threading.Event()
        self.stopping = False

    def snapshot(self) -> list[dict[str, Any]]:
        return list(self.items.values())

    def run(self) -> None:
        while not self.stopping:
            try:
                listing = self.api.get(self.path)
                self.items = {o["metadata"]["uid"]: o for o in listing["items"]}
                version = listing["metadata"]["resourceVersion"]
                self.synced.set()
                self.on_change()
                while not self.stopping:
                    for event in self.api.watch(self.path, version):
                        obj = event["object"]
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] == "DELETED":
                            self.items.pop(obj["metadata"]["uid"], None)
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            self.items[obj["metadata"]["uid"]] = obj
                        self.on_change()
            except Exception as err:  # noqa: BLE001 - any failure: log, back off, list again
                if not self.stopping:
                    log.warning("watch %s: %s; listing again", self.path, err)
                    time.sleep(1)


class NodeAgent:
    def __init__(self, state_dir: Path, config: dict[str, Any]):
        self.state_dir, self.config = state_dir, config
        pki = Path(config["pki"])
        self.api = KubeApi(config["apiserver"], pki / "ca.crt", (pki / "admin.crt", pki / "admin.key"))
        self.wake = threading.Event()
        self.pods = Informer(self.api, "/api/v1/pods", self.wake.set)
        self.services = Informer(self.api, "/api/v1/services", self.wake.set)
        self.names = [nodes.node_name(config["node_prefix"], i) for i in range(config["nodes"])]
        gpus = int(config.get("gpus_per_node", 0))
        self.cap = nodes.capacity(config["cpu"], config["memory"], gpus, int(config.get("max_pods", 1000)))
        self.free_gpus = {n: list(range(i * gpus, (i + 1) * gpus)) for i, n in enumerate(self.names)}
        self.addresses = nodes.AddressPool(config["pod_network"])
        self.runs: dict[str, PodRun] = {}
        self.sent: dict[str, dict[str, Any]] = {}  # uid -> last status written
        self.unschedulable: dict[str, str] = {}  # uid -> last FailedScheduling message
        self.bound: dict[str, tuple[float, str]] = {}  # uid -> (when, node) we bound it: the watch may lag
        self.deleted: set[str] = set()
        self.hosts_text = ""
        self.stopping = False
        self.hosts_file = state_dir / "hosts"
        dns.write_atomically(self.hosts_file, dns.render_hosts([], []))
        self.contexts: dict[str, NodeContext] = {}

    # ------------------------------------------------------------ setup

    def start(self) -> None:
        deadline = time.monotonic() + 120  # started together with the API server: wait for it
        while True:
            try:
                if self.api.session.get(self.config["apiserver"] + "/readyz", timeout=2).ok:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("kube-apiserver did not become ready")
            time.sleep(0.2)
        pki = Path(self.config["pki"])
        server = kubeletserver.serve(self.lookup_log, pki / "kubelet.crt", pki / "kubelet.key", pki / "ca.crt",
                                     port=int(self.config.get("kubelet_port", 0)))
        port = server.server_address[1]
        venv_bin = self.config["venv_bin"]
        path_dirs = [venv_bin, self.config["cache_bin"], "/usr/local/sbin", "/usr/local/bin", "/usr/sbin",
                     "/usr/bin", "/sbin", "/bin"]
        shim = Path(self.config["dns_shim"])
        for name in self.names:
            self.contexts[name] = NodeContext(
                name, self.api, self.config["apiserver"], pki / "ca.crt", self.state_dir / "pods",
                self.hosts_file, shim, path_dirs, self.cap)
            self._register(name, port)
        for informer in (self.pods, self.services):
            threading.Thread(target=informer.run, name=informer.path, daemon=True).start()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        self.pods.synced.wait(30)
        self.services.synced.wait(30)

    def _register(self, name: str, port: int) -> None:
        node = nodes.node_object(name, self.cap, port, self.config["kubernetes_version"])
        try:
            created = self.api.create("/api/v1/nodes", node)
        except ApiError as err:
            if err.status != 409:
                raise
            created = self.api.merge_patch(f"/api/v1/nodes/{name}/status", {"status": node["status"]})
        lease = nodes.lease_object(name, created["metadata"]["uid"])
        try:
            self.api.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease)
        except ApiError as err:
            if err.status != 409:
                raise
        log.info("registered node %s (kubelet port %d)", name, port)

    def _heartbeat(self) -> None:
        """Renew each Lease every 10 s (the node lifecycle controller's health signal), status every 60 s."""
        last_status = time.monotonic()
        while not self.stopping:
            time.sleep(10)
            for name in self.names:
                try:
                    self.api.merge_patch(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}",
                                         {"spec": {"renewTime": nodes.micro_time()}})
                    if time.monotonic() - last_status > 60:
                        self._post_conditions(name)
                except Exception as err:  # noqa: BLE001 - keep beating
                    log.warning("heartbeat %s: %s", name, err)
            if time.monotonic() - last_status > 60:
                last_status = time.monotonic()

    def _post_conditions(self, name: str) -> None:
        """The kubelet's status heartbeat: every condition's whole value (Ready True ...), not only its time.
        After missed heartbeats (an API server too slow to answer for 40 s) the node lifecycle controller
        sets them Unknown and taints the node unreachable; only a Ready=True posted again lifts that.
        Conditions merge by type; lastTransitionTime moves only for a condition whose status flips."""
        current = {c["type"]: c.get("status") for c in
                   (self.api.get(f"/api/v1/nodes/{name}").get("status") or {}).get("conditions") or []}
        conditions = [
            {k: v for k, v in c.items() if k != "lastTransitionTime" or current.get(c["type"]) != c["status"]}
            for c in nodes.node_status(name, {}, 0, "")["conditions"]
        ]
        self.api.strategic_patch(f"/api/v1/nodes/{name}/status", {"status": {"conditions": conditions}})

    # ------------------------------------------------------------ the loop

    def loop(self) -> None:
        while not self.stopping:
            self.wake.wait(0.3)
            self.wake.clear()
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - one bad pass must not stop the node
                log.exception("reconcile failed")
                time.sleep(1)

    def reconcile(self) -> None:
        pods = self.pods.snapshot()
        present = {p["metadata"]["uid"] for p in pods}
        for uid in [u for u in self.runs if u not in present]:
            self._forget(uid)
        mine = [p for p in pods if p["spec"].get("nodeName") in self.contexts]
        self._schedule([p for p in pods if not p["spec"].get("nodeName")], mine)
        for pod in mine:
            self._run(pod)
        self._write_hosts(pods)

    def _schedule(self, pending: list[dict[str, Any]], mine: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        # Bound by us moments ago, but the watch has not shown the pod's nodeName yet (a loaded machine):
        # not pending any more, and still taking its place on the node it went to, or a ReplicaSet's
        # second pod would see an empty node and land beside the first.
        in_flight = [(p, self.bound[p["metadata"]["uid"]][1]) for p in pending
                     if now - self.bound.get(p["metadata"]["uid"], (0.0, ""))[0] <= 10]
        # A pod with scheduling gates (Kueue's until it admits the pod's workload) waits, as kube-scheduler
        # keeps it out of its queue: the API server refuses to bind it anyway.
        pending = [p for p in pending if not p["metadata"].get("deletionTimestamp")
                   and not p["spec"].get("schedulingGates")
                   and p["spec"].get("schedulerName", "default-scheduler") == "default-scheduler"
                   and p["status"].get("phase", "Pending") == "Pending"
                   and now - self.bound.get(p["metadata"]["uid"], (0.0, ""))[0] > 10]
        if not pending:
            return
        used: dict[str, dict[str, Decimal]] = {name: {} for name in self.contexts}
        placed = [(pod, pod["spec"]["nodeName"]) for pod in mine if pod["status"].get("phase") not in TERMINAL]
        for pod, node_name in placed + in_flight:
            if node_name in used:
                for res, amount in scheduling.usage(pod).items():
                    bucket = used[node_name]
                    bucket[res] = bucket.get(res, Decimal(0)) + amount
        node_objs = {uid: n for uid, n in self._nodes().items()}
        views = [nodes.node_view(n, used[n["metadata"]["name"]]) for n in node_objs.values()
                 if n["metadata"]["name"] in used]
        for pod in sorted(pending, key=lambda p: p["metadata"]["creationTimestamp"]):
            meta = pod["metadata"]
            target, message = scheduling.choose_node(pod, views)
            if target is None:
                if self.unschedulable.get(meta["uid"]) != message:
                    self.unschedulable[meta["uid"]] = message
                    self._unschedulable(pod, message)
                continue
            try:
                self.api.create(pod_path(meta["namespace"], meta["name"], "binding"), {
                    "apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"], "uid": meta["uid"]},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": target}})
            except ApiError as err:
                log.warning("bind %s/%s: %s", meta["namespace"], meta["name"], err)
                continue
            self.bound[meta["uid"]] = (time.monotonic(), target)
            self.unschedulable.pop(meta["uid"], None)
            for view in views:
                if view.name == target:
                    for res, amount in scheduling.usage(pod).items():
                        view.used[res] = view.used.get(res, Decimal(0)) + amount
            self._event(pod, "Normal", "Scheduled",
                        f"Successfully assigned {meta['namespace']}/{meta['name']} to {target}", "default-scheduler")

    def _nodes(self) -> dict[str, dict[str, Any]]:
        return {n["metadata"]["uid"]: n for n in self.api.get("/api/v1/nodes",
                                                                labelSelector=nodes.NODE_LABEL)["items"]}

    def _unschedulable(self, pod: dict[str, Any], message: str) -> None:
        meta = pod["metadata"]
        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                     "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            self.api.merge_patch(pod_path(meta["namespace"], meta["name"], "status"),
                                 {"status": {"conditions": [condition]}})
        except ApiError as err:
            log.warning("status of unschedulable %s: %s", meta["name"], err)
        self._event(pod, "Warning", "FailedScheduling", message, "default-scheduler")

    def _run(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        run = self.runs.get(uid)
        if meta.get("deletionTimestamp"):
            if run is not None:
                run.begin_termination(float(meta.get("deletionGracePeriodSeconds") or 0))
                run.step()
                if not run.stopped:
                    return
                self._report(run)
            if uid not in self.deleted:
                self.deleted.add(uid)
                self._event(pod, "Normal", "Killing", "Stopping the pod's processes", "kubelet")
                try:
                    self.api.delete(pod_path(meta["namespace"], meta["name"]),
                                    {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}})
                except ApiError as err:
                    if err.status not in (404, 409):
                        log.warning("delete %s: %s", meta["name"], err)
            return
        if run is None:
            if pod["status"].get("phase") in TERMINAL:
                return  # finished before this node process started
            run = self._admit(pod)
        run.pod = pod
        before = {c.name: dict(c.state) for c in run.init + run.main}
        run.step()
        for c in run.init + run.main:
            if "running" in c.state and "running" not in before.get(c.name, {}):
                self._event(pod, "Normal", "Started", f"Started container {c.name}", "kubelet",
                            pod["spec"]["nodeName"])
        self._report(run)

    def _admit(self, pod: dict[str, Any]) -> PodRun:
        node = pod["spec"]["nodeName"]
        wanted = int(scheduling.pod_requests(pod).get("nvidia.com/gpu", 0))
        gpus, self.free_gpus[node] = self.free_gpus[node][:wanted], self.free_gpus[node][wanted:]
        run = PodRun(pod, self.contexts[node], self.addresses.allocate(), gpus)
        self.runs[run.uid] = run
        return run

    def _report(self, run: PodRun) -> None:
        status = run.status()
        if self.sent.get(run.uid) == status:
            return
        try:
            self.api.merge_patch(pod_path(run.namespace, run.name, "status"), {"status": status})
            self.sent[run.uid] = status
        except ApiError as err:
            if err.status != 404:
                log.warning("status of %s: %s", run.name, err)

    def _forget(self, uid: str) -> None:
        run = self.runs.pop(uid)
        run.kill_now()
        run.remove_files()
        self.addresses.release(run.ip)
        node = run.ctx.node_name
        self.free_gpus[node] = sorted(self.free_gpus[node] + run.gpus)
        for table in (self.sent, self.unschedulable, self.bound):
            table.pop(uid, None)
        self.deleted.discard(uid)

    def _write_hosts(self, pods: list[dict[str, Any]]) -> None:
        """Pods of this node are rendered with what the node knows now, ahead of the watch."""
        effective = []
        for pod in pods:
            run = self.runs.get(pod["metadata"]["uid"])
            effective.append({**pod, "status": run.status()} if run else pod)
        text = dns.render_hosts(effective, self.services.snapshot())
        if text != self.hosts_text:
            dns.write_atomically(self.hosts_file, text)
            self.hosts_text = text

    def _event(self, pod: dict[str, Any], kind: str, reason: str, message: str, component: str, host: str = "") -> None:
        try:
            self.api.create(f"/api/v1/namespaces/{pod['metadata']['namespace']}/events",
                            nodes.event(pod, kind, reason, message, component, host))
        except ApiError as err:
            log.debug("event %s: %s", reason, err)

    # ------------------------------------------------------------ logs and shutdown

    def lookup_log(self, namespace: str, name: str, container: str,
                   previous: bool) -> tuple[Path, Callable[[], bool]] | None:
        for run in list(self.runs.values()):
            if run.namespace == namespace and run.name == name:
                for c in run.init + run.main:
                    if c.name == container:
                        return c.log_file(previous), lambda c=c: c.proc is not None
        return None

    def shutdown(self) -> None:
        self.stopping = self.pods.stopping = self.services.stopping = True
        for run in self.runs.values():
            run.begin_termination(3)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and not all(r.stopped for r in self.runs.values()):
            for run in self.runs.values():
                run.step()
            time.sleep(0.1)
        for run in self.runs.values():
            run.kill_now()
            run.remove_files()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    state_dir = Path(args[0])
    config = json.loads((state_dir / "node.json").read_text())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = NodeAgent(state_dir, config)
    signal.signal(signal.SIGTERM, lambda *_: setattr(agent, "stopping", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(agent, "stopping", True))
    agent.start()
    (state_dir / "node.ready").write_text("ok\n")
    agent.loop()
    agent.shutdown()
    log.info("process node stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
