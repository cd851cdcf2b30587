"""`make demo`: the whole MM-RLHF loop on real parts, on this machine.

    make demo        # = python -m mmalign.devcluster.demo
    make demo-down   # = mmalign dev down

1. start (or reuse) the local control plane: kube-apiserver, controller-manager, etcd, SeaweedFS S3 and
   process nodes (`mmalign dev up`), or with MMALIGN_NODE=real the real node (kubelet + containerd);
2. `helm upgrade --install` charts/mmalign: the operator runs as a pod under the chart's ServiceAccount
   (on the real node: the project's images for this source, built, pushed to the node's registry);
3. create the bucket and the `s3-credentials` Secret, upload the synthetic image-dependent dataset and a
   tiny random-init Qwen2-VL to S3;
4. apply manifests/examples/tiny-cpu-s3.yaml (tiny-cpu.yaml with model and data read from S3) and
   stream its progress the way `kubectl get aj -w` would;
5. print the final status, each stage's metrics and the s3:// URIs of the reward model, the scored data
   and the final policy. Any failure exits non-zero naming the stage and the pod logs to read.

The functions here are also what tests/e2e uses, so the demo and the end-to-end test walk one path.
With MMALIGN_KUBECONFIG and MMALIGN_IMAGE set (devcluster/usercluster.py), both run on that cluster
instead: step 1 is skipped and nothing is started or stopped.
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
from mmalign.devcluster import usercluster
from mmalign.trainer.s3client import StorageError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "manifests/examples/tiny-cpu-s3.yaml"
# The example's bucket; MMALIGN_S3_BUCKET replaces it (on AWS, bucket names are global: `mmalign` is taken).
EXAMPLE_BUCKET = "mmalign"
ENV_BUCKET = "MMALIGN_S3_BUCKET"
DATASET = "synthetic-colors"  # the builtin:// set the demo uploads to S3 (tiny-cpu-s3.yaml reads it there)
OPERATOR_NAMESPACE = "mmalign-system"
TERMINAL = ("Succeeded", "Failed")
# The example's per-pod CPU request on the real node (example_job).
REAL_NODE_CPU_REQUEST = "500m"
# The dev cluster, or one the user brought (MMALIGN_KUBECONFIG): the same attributes, env and s3_* first.
Cluster = devcluster.DevCluster | usercluster.UserCluster


def bucket() -> str:
    return os.environ.get(ENV_BUCKET) or EXAMPLE_BUCKET


def data_prefix() -> str:
    return f"s3://{bucket()}/demo/data/{DATASET}/"


def model_prefix() -> str:
    return f"s3://{bucket()}/demo/models/tiny-qwen2-vl/"


def example_job(cluster: Cluster | None = None) -> dict[str, Any]:
    """tiny-cpu-s3.yaml with its s3:// URIs in bucket(), its CPU requests fitted to the dev cluster's
    real node when `cluster` is one."""
    text = EXAMPLE.read_text().replace(f"s3://{EXAMPLE_BUCKET}/", f"s3://{bucket()}/")
    job: dict[str, Any] = yaml.safe_load(text)
    if is_real_node(cluster):
        # The real node has this machine's CPUs (2 on the CI machines) and the operator's pod asks 100m
        # of them: the example's 1 CPU per pod would leave the gang's second pod Pending. A request, not
        # a limit: both pods still use every core.
        job["spec"]["resources"]["requests"]["cpu"] = REAL_NODE_CPU_REQUEST
    return job


def is_real_node(cluster: Cluster | None) -> bool:
    return isinstance(cluster, devcluster.DevCluster) and cluster.node == "real"


def real_node_values(cluster: devcluster.DevCluster) -> list[str]:
    """`helm install` arguments for the dev cluster's real node: the project's images for the current
    source (the trainer `runtime` target and the slim `operator` one), built with buildah, pushed to the
    node's registry and pulled by its containerd (devcluster/images.py), so the chart runs exactly them."""
    from mmalign.devcluster import images

    values: list[str] = []
    for target, key in (("runtime", "image"), ("operator", "operator.image")):
        started = time.monotonic()
        image = images.project_image(REPO, target=target)
        timings = images.ensure_pulled(cluster.node_layout, image)
        say(f"{image} on the node in {time.monotonic() - started:.0f} s {timings or '(already there)'}")
        repository, tag = image.rsplit(":", 1)
        values += ["--set-string", f"{key}.repository={repository}", "--set-string", f"{key}.tag={tag}"]
    return values


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def run(cluster: Cluster, *argv: str, input: str | None = None) -> str:
    """A command with the cluster's environment (kubectl/helm on PATH, KUBECONFIG); raises on failure."""
    env = {**os.environ, **cluster.env}  # keep HOME: kubectl/helm put their caches under it
    result = subprocess.run(argv, env=env, input=input, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({result.returncode}):\n{result.stderr.strip()}")
    return result.stdout


def install_chart(cluster: Cluster) -> None:
    say("helm upgrade --install mmalign charts/mmalign (the operator runs as a pod, under its own SA)")
    # On the user's cluster the image is theirs; on the real node, the one built for this source; the
    # process node runs processes, whatever the image's name.
    if isinstance(cluster, usercluster.UserCluster):
        images = cluster.helm_values()
    else:
        images = real_node_values(cluster) if is_real_node(cluster) else []
    # --take-ownership: the AlignmentJob CRD is a chart template, and on a reused dev cluster it may
    # exist already, kept by an earlier release (tests/integration's) or applied with kubectl.
    # --timeout 300s: a cluster of the user's may pull the image first.
    run(cluster, "helm", "upgrade", "--install", "mmalign", str(REPO / "charts/mmalign"),
        "--namespace", OPERATOR_NAMESPACE, "--create-namespace", "--take-ownership", *images,
        "--wait", "--timeout", "300s")


def s3_env(cluster: Cluster) -> dict[str, str]:
    """The S3 settings the trainer pods get from the Secret (the dev cluster's SeaweedFS, or the user's S3:
    no AWS_ENDPOINT_URL on AWS itself)."""
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
    return {key: cluster.env[key] for key in keys if key in cluster.env}


def prepare_storage(cluster: Cluster, namespace: str) -> None:
    """Bucket, credentials Secret, and the dataset + tiny model uploaded to S3."""
    import boto3

    env = s3_env(cluster)
    os.environ.update(env)  # storage.* reads the same variables the trainer pods get from the Secret
    s3 = boto3.client("s3", endpoint_url=env.get("AWS_ENDPOINT_URL"), region_name=env["AWS_DEFAULT_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket() not in existing:
        # Outside us-east-1, AWS wants the region named again.
        where = {} if env["AWS_DEFAULT_REGION"] == "us-east-1" else {
            "CreateBucketConfiguration": {"LocationConstraint": env["AWS_DEFAULT_REGION"]}}
        s3.create_bucket(Bucket=bucket(), **where)
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
              "metadata": {"name": "s3-credentials", "namespace": namespace}, "stringData": env}
    run(cluster, "kubectl", "apply", "-f", "-", input=json.dumps(secret))
    say(f"Secret {namespace}/s3-credentials created (keys only in the Secret, never in the job)")

    from mmalign.trainer import builtin, models, transfer

    with tempfile.TemporaryDirectory() as tmp:
        data = builtin.export_dataset(DATASET, Path(tmp) / "data")
        transfer.upload_folder(str(data.parent), data_prefix())
        model, processor = models.load_model("builtin://tiny-qwen2-vl")
        models.save_model(model, processor, Path(tmp) / "model")
        transfer.upload_folder(str(Path(tmp) / "model"), model_prefix())
    say(f"uploaded the dataset to {data_prefix()} and a tiny random-init Qwen2-VL to {model_prefix()}")


def job_status(cluster: Cluster, name: str, namespace: str) -> dict[str, Any]:
    out = run(cluster, "kubectl", "get", "alignmentjob", name, "-n", namespace, "-o", "json")
    status: dict[str, Any] = json.loads(out).get("status", {})
    return status


def watch(cluster: Cluster, name: str, namespace: str, timeout: float = 1200) -> dict[str, Any]:
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
    for line in learning_summary(stages):
        say(line)
    say("Succeeded. Artifacts:")
    for stage, what in (("reward", "reward model"), ("score", "scored pairs"), ("dpo", "final policy")):
        say(f"  {what:<13} {stages.get(stage, {}).get('artifact', '?')}")
    return 0


def learning_summary(stages: dict[str, Any]) -> list[str]:
    """The numbers that say whether the job learned, from the stages' status metrics, and one line on what they
    mean: the reward model's Acc/Acc+ on held-out pairs, the DPO policy's win rate over the reference."""
    reward = stages.get("reward", {}).get("metrics", {})
    dpo = stages.get("dpo", {}).get("metrics", {})
    lines = []
    if "eval_acc" in reward:
        lines.append(f"reward model: held-out Acc {reward['eval_acc']:.2f}, "
                     f"Acc+ {reward.get('eval_acc_plus', 0):.2f} (chance: 0.50, 0.12 with 3 pairs per query)")
    if "win_rate" in dpo:
        accuracy = ""
        if "eval_reward_accuracy" in dpo:
            accuracy = (f"; held-out implicit-reward accuracy {dpo.get('eval_reward_accuracy_initial', 0):.2f} -> "
                        f"{dpo['eval_reward_accuracy']:.2f}")
        lines.append(f"DPO policy: win rate {dpo['win_rate']:.2f} over the reference model{accuracy}")
    if lines:
        lines.append("meaning: Acc is how often the reward model prefers the right answer about an image it never "
                     "saw (above 0.5: it learned from the image); win rate is how often it prefers the aligned "
                     "policy's answer to the base model's (above 0.5: alignment helped)")
    return lines


def find_cluster() -> Cluster:
    """The user's cluster (MMALIGN_KUBECONFIG), else the running dev cluster, else a new one."""
    user = usercluster.from_env()
    if user is not None:
        user.check_tools()
        say(f"on {user.describe()}: no dev cluster started")
        return user
    try:
        cluster = devcluster.load()
        say(f"reusing the dev cluster in {cluster.state_dir}")
    except Exception:  # noqa: BLE001 - none running: start one
        if os.environ.get(devcluster.NODE_ENV) == "real":
            # As the dev_cluster fixture does: the real node's binaries first (minutes, once per machine).
            from mmalign.devcluster import binaries

            binaries.ensure_real_node()
            say("starting the dev cluster with the real node (mmalign dev up --node real)")
        else:
            say("starting the dev cluster (mmalign dev up --nodes 3)")
        cluster = devcluster.up(nodes=3)
    return cluster


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    try:
        cluster = find_cluster()
    except ValueError as exc:  # a bring-your-own-cluster variable is wrong
        say(f"FAILED: {exc}")
        return 2
    namespace = "default"
    try:
        install_chart(cluster)
        prepare_storage(cluster, namespace)
        job = example_job(cluster)
        name = job["metadata"]["name"]
        run(cluster, "kubectl", "delete", "alignmentjob", name, "-n", namespace, "--ignore-not-found", "--wait")
        run(cluster, "kubectl", "apply", "-n", namespace, "-f", "-", input=json.dumps(job))
        say(f"applied {EXAMPLE.relative_to(REPO)} (s3://{bucket()}/)")
        status = watch(cluster, name, namespace)
        code = report(status, name, namespace)
    except (RuntimeError, TimeoutError, StorageError) as exc:
        say(f"FAILED: {exc}")
        if isinstance(cluster, usercluster.UserCluster):
            say(f"the operator's logs: kubectl logs -n {OPERATOR_NAMESPACE} deploy/mmalign")
            return 1
        dead = [name for name, alive in cluster.alive().items() if not alive]
        if dead:
            say(f"dev cluster components no longer running: {', '.join(dead)} (logs: {cluster.layout.logs})")
        say("cluster logs: mmalign dev logs POD; stop everything with `make demo-down`")
        return 1
    done = "`helm uninstall mmalign -n mmalign-system` removes the operator" \
        if isinstance(cluster, usercluster.UserCluster) else "`make demo-down` stops the cluster"
    say(f"done in {time.monotonic() - started:.0f} s; {done}")
    return code


if __name__ == "__main__":
    sys.exit(main())
