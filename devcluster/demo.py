"""`make demo`: the whole MM-RLHF loop on real parts, on this machine.

    make demo        # = python -m mmalign.devcluster.demo
    make demo-down   # = mmalign dev down

1. start (or reuse) the local control plane: kube-apiserver, controller-manager, etcd, SeaweedFS S3 and
   process nodes (`mmalign dev up`);
2. `helm upgrade --install` charts/mmalign: the operator runs as a pod under the chart's ServiceAccount;
3. create the bucket and the `s3-credentials` Secret, upload the synthetic image-dependent dataset and a
   tiny random-init Qwen2-VL to S3;
4. apply manifests/examples/tiny-cpu-s3.yaml (tiny-cpu.yaml with model and data read from S3) and
   stream its progress the way `kubectl get aj -w` would;
5. print the final status, each stage's metrics and the s3:// URIs of the reward model, the scored data
   and the final policy. Any failure exits non-zero naming the stage and the pod logs to read.

The functions here are also what tests/e2e uses, so the demo and the end-to-end test walk one path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from mmalign.devcluster import cluster as devcluster
from mmalign.trainer.s3client import StorageError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "manifests/examples/tiny-cpu-s3.yaml"
BUCKET = "mmalign"
DATA_PREFIX = f"s3://{BUCKET}/demo/data/synthetic-colors/"
MODEL_PREFIX = f"s3://{BUCKET}/demo/models/tiny-qwen2-vl/"
OPERATOR_NAMESPACE = "mmalign-system"
TERMINAL = ("Succeeded", "Failed")


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def run(cluster: devcluster.DevCluster, *argv: str, input: str | None = None) -> str:
    """A command with the cluster's environment (kubectl/helm on PATH, KUBECONFIG); raises on failure."""
    env = {**os.environ, **cluster.env}  # keep HOME: kubectl/helm put their caches under it
    result = subprocess.run(argv, env=env, input=input, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({result.returncode}):\n{result.stderr.strip()}")
    return result.stdout


def install_chart(cluster: devcluster.DevCluster) -> None:
    say("helm upgrade --install mmalign charts/mmalign (the operator runs as a pod, under its own SA)")
    # --take-ownership: the AlignmentJob CRD is a chart template, and on a reused dev cluster it may
    # exist already, kept by an earlier release (tests/integration's) or applied with kubectl.
    run(cluster, "helm", "upgrade", "--install", "mmalign", str(REPO / "charts/mmalign"),
        "--namespace", OPERATOR_NAMESPACE, "--create-namespace", "--take-ownership",
        "--wait", "--timeout", "180s")


def s3_env(cluster: devcluster.DevCluster) -> dict[str, str]:
    """The S3 settings the trainer pods get from the Secret (the dev cluster's SeaweedFS)."""
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
    return {key: cluster.env[key] for key in keys}


def prepare_storage(cluster: devcluster.DevCluster, namespace: str) -> None:
    """Bucket, credentials Secret, and the dataset + tiny model uploaded to S3."""
    import boto3

    env = s3_env(cluster)
    os.environ.update(env)  # storage.* reads the same variables the trainer pods get from the Secret
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if BUCKET not in existing:
        s3.create_bucket(Bucket=BUCKET)
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
              "metadata": {"name": "s3-credentials", "namespace": namespace}, "stringData": env}
    run(cluster, "kubectl", "apply", "-f", "-", input=json.dumps(secret))
    say(f"Secret {namespace}/s3-credentials created (keys only in the Secret, never in the job)")

    from mmalign.trainer import builtin, models, transfer

    with tempfile.TemporaryDirectory() as tmp:
        data = builtin.export_dataset("synthetic-colors", Path(tmp) / "data")
        transfer.upload_folder(str(data.parent), DATA_PREFIX)
        model, processor = models.load_model("builtin://tiny-qwen2-vl")
        models.save_model(model, processor, Path(tmp) / "model")
        transfer.upload_folder(str(Path(tmp) / "model"), MODEL_PREFIX)
    say(f"uploaded the dataset to {DATA_PREFIX} and a tiny random-init Qwen2-VL to {MODEL_PREFIX}")


def job_status(cluster: devcluster.DevCluster, name: str, namespace: str) -> dict[str, Any]:
    out = run(cluster, "kubectl", "get", "alignmentjob", name, "-n", namespace, "-o", "json")
    status: dict[str, Any] = json.loads(out).get("status", {})
    return status


def watch(cluster: devcluster.DevCluster, name: str, namespace: str, timeout: float = 1200) -> dict[str, Any]:
    """Print a row whenever STAGE/PHASE/PROGRESS change (like `kubectl get aj -w`); return the final status."""
    say(f"{'NAME':<12} {'STAGE':<8} {'PHASE':<11} PROGRESS")
    last: tuple[str, str, str] | None = None
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = job_status(cluster, name, namespace)
        row = (status.get("stage", ""), status.get("phase", ""), status.get("progress", ""))
        if row != last:
            say(f"{name:<12} {row[0]:<8} {row[1]:<11} {row[2]}")
            last = row
        if row[1] in TERMINAL:
            return status
        time.sleep(2)
    raise TimeoutError(f"AlignmentJob {name} did not finish in {timeout:.0f} s (last phase {last})")


def report(status: dict[str, Any], name: str, namespace: str) -> int:
    stages = status.get("stages", {})
    for stage in ("reward", "score", "dpo"):
        entry = stages.get(stage)
        if entry:
            metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(entry.get("metrics", {}).items()))
            say(f"{stage:<6} {entry.get('phase')}: attempt {entry.get('attempt', 0)}, {metrics}")
    if status.get("phase") != "Succeeded":
        failed = next((s for s in ("reward", "score", "dpo") if stages.get(s, {}).get("phase") == "Failed"),
                      status.get("stage", "?"))
        say(f"FAILED in stage {failed}: {status.get('message', '')}")
        say(f"read the pods' logs: kubectl logs -n {namespace} -l mmalign.io/job={name},mmalign.io/stage={failed}")
        return 1
    say("Succeeded. Artifacts:")
    for stage, what in (("reward", "reward model"), ("score", "scored pairs"), ("dpo", "final policy")):
        say(f"  {what:<13} {stages.get(stage, {}).get('artifact', '?')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    try:
        cluster = devcluster.load()
        say(f"reusing the dev cluster in {cluster.state_dir}")
    except Exception:  # noqa: BLE001 - none running: start one
        say("starting the dev cluster (mmalign dev up --nodes 3)")
        cluster = devcluster.up(nodes=3)
    namespace = "default"
    try:
        install_chart(cluster)
        prepare_storage(cluster, namespace)
        job = yaml.safe_load(EXAMPLE.read_text())
        name = job["metadata"]["name"]
        run(cluster, "kubectl", "delete", "alignmentjob", name, "-n", namespace, "--ignore-not-found", "--wait")
        run(cluster, "kubectl", "apply", "-n", namespace, "-f", str(EXAMPLE))
        say(f"applied {EXAMPLE.relative_to(REPO)}")
        status = watch(cluster, name, namespace)
        code = report(status, name, namespace)
    except (RuntimeError, TimeoutError, StorageError) as exc:
        say(f"FAILED: {exc}")
        dead = [name for name, alive in cluster.alive().items() if not alive]
        if dead:
            say(f"dev cluster components no longer running: {', '.join(dead)} (logs: {cluster.layout.logs})")
        say("cluster logs: mmalign dev logs POD; stop everything with `make demo-down`")
        return 1
    say(f"done in {time.monotonic() - started:.0f} s; `make demo-down` stops the cluster")
    return code


if __name__ == "__main__":
    sys.exit(main())
