"""`mmalign operator`: run the AlignmentJob operator against the current kubeconfig or in-cluster config.

    mmalign operator --all-namespaces                        # cluster-wide, standalone
    mmalign operator --namespace team-a --namespace team-b   # only these namespaces
    mmalign operator --all-namespaces --peering mmalign      # N replicas: only one acts at a time

The Helm chart's Deployment runs exactly this command. kopf runs in-process; its liveness endpoint
serves GET /healthz, prometheus-client serves /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PEERING_HOLD_SECONDS = 5.0  # with --peering, jobs are not touched in the first seconds (see LoopSettings)
TRAINER_COMMAND_ENV = "MMALIGN_TRAINER_COMMAND"  # tests only
TRAINER_IMAGE_ENV = "MMALIGN_TRAINER_IMAGE"  # image of jobs without spec.image (chart: trainer.image)
POD_DEFAULTS_ENV = "MMALIGN_POD_DEFAULTS"  # JSON spec.podTemplate defaults (chart: trainer.podDefaults)
# JSON securityContexts of every trainer pod (chart: trainer.podSecurityContext, trainer.securityContext)
POD_SECURITY_CONTEXT_ENV = "MMALIGN_TRAINER_POD_SECURITY_CONTEXT"
SECURITY_CONTEXT_ENV = "MMALIGN_TRAINER_SECURITY_CONTEXT"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmalign operator", description=__doc__.split("\n")[0])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable; exact names)")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="watch every namespace (the default when no --namespace is given)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config, else $KUBECONFIG)")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("--peering", metavar="NAME",
                        help="kopf peering object: replicas sharing it elect one active operator "
                        "(created if missing). Without it the operator runs standalone.")
    parser.add_argument("--peering-wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long for a missing peering object before creating it (the chart "
                        "sets 60: Helm creates its peering object after the Deployment)")
    parser.add_argument("--priority", type=int, default=None,
                        help="peering priority (higher wins). Default: by start time, the oldest replica "
                        "wins (kopf pauses ALL operators of equal priority, so replicas must differ)")
    parser.add_argument("--liveness-port", type=int, default=8080,
                        help="serve kopf's liveness probe on http://0.0.0.0:PORT/healthz (0: off)")
    parser.add_argument("--metrics-port", type=int, default=9090,
                        help="serve Prometheus metrics on http://0.0.0.0:PORT/metrics (0: off)")
    parser.add_argument("--resync-seconds", type=float, default=5.0,
                        help="reconcile (and read progress) this often while a stage is active (<= 10)")
    parser.add_argument("--log-format", choices=("json", "plain", "full"), default="json",
                        help="json: one structured object per line (default)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument("--trainer-command", default=os.environ.get(TRAINER_COMMAND_ENV),
                        help=argparse.SUPPRESS)  # tests only: replaces `mmalign launch` in the pods
    args = parser.parse_args(argv)
    if not 0 < args.resync_seconds <= 10:
        parser.error("--resync-seconds must be in (0, 10]: progress must reach the status within 30 s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = os.path.abspath(args.kubeconfig)
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    return 0


async def run(args: argparse.Namespace, stop_flag: asyncio.Event | None = None,
              ready_flag: asyncio.Event | None = None) -> None:
    import kopf

    from mmalign.api.keys import LABEL_JOB
    from mmalign.api.runtime import PodTemplate
    from mmalign.operator import handlers
    from mmalign.operator.builders import BuildOptions
    from mmalign.operator.controller import LoopSettings
    from mmalign.operator.kube import Kube, load_api_client

    kopf.configure(verbose=args.verbose, log_format={
        "json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL,
    }[args.log_format], log_refkey="object")
    logging.getLogger("kopf.objects").addFilter(_quiet_wakeups)
    logger = logging.getLogger("mmalign.operator")
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=40, thread_name_prefix="k8s"))

    api_client = load_api_client(args.kubeconfig, args.context)
    pod_defaults = json.loads(os.environ.get(POD_DEFAULTS_ENV) or "{}")
    PodTemplate.model_validate(pod_defaults)  # fail at start, not per job, on a bad chart value
    pod_security, container_security = trainer_security_contexts(os.environ)
    build = BuildOptions.from_command_line(
        args.trainer_command, trainer_image=os.environ.get(TRAINER_IMAGE_ENV) or None,
        pod_defaults=pod_defaults or None, pod_security_context=pod_security,
        security_context=container_security)
    settings = LoopSettings(build=build, active_period=args.resync_seconds,
                            not_before=time.monotonic() + PEERING_HOLD_SECONDS if args.peering else 0.0)
    if args.trainer_command:
        logger.warning("trainer command overridden (tests only): %s", args.trainer_command)
    runtime = handlers.Runtime(kube=Kube(api_client), settings=settings)

    operator_settings = kopf.OperatorSettings()
    operator_settings.persistence.finalizer = "mmalign.io/finalizer"
    operator_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="mmalign.io")
    operator_settings.persistence.diffbase_storage = handlers.JobsDiffBase(
        prefix="mmalign.io", key="last-handled-configuration")
    operator_settings.watching.label_selectors["", "v1", "pods"] = LABEL_JOB  # server-side filter
    # Resources are discovered once at start (the CRD is installed first): no watch on CRDs/namespaces,
    # so the operator needs no cluster-scoped read rights; --namespace takes exact names.
    operator_settings.scanning.disabled = True
    # Kubernetes Events: the transitions the controller sends, plus kopf's own warnings and errors, not
    # an event per handler run.
    operator_settings.posting.level = logging.WARNING
    operator_settings.posting.reporting_component = "mmalign-operator"  # `kubectl describe`'s "From"
    clusterwide = args.all_namespaces or not args.namespace
    if args.peering:
        args.priority = default_priority() if args.priority is None else args.priority
        operator_settings.peering.name = args.peering
        operator_settings.peering.priority = args.priority
        operator_settings.peering.mandatory = True
        await _ensure_peering(api_client, args.peering, [] if clusterwide else args.namespace, args.peering_wait)
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    logger.info("starting: %s, %s", "all namespaces" if clusterwide else f"namespaces {args.namespace}",
                f"peering {args.peering!r} with priority {args.priority}" if args.peering else "standalone")
    await kopf.operator(
        registry=handlers.REGISTRY,
        settings=operator_settings,
        clusterwide=clusterwide,
        namespaces=[] if clusterwide else args.namespace,
        standalone=not args.peering,
        peering_name=args.peering,
        priority=args.priority or 0,
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None,
        memo=kopf.Memo(runtime=runtime),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def trainer_security_contexts(environ: Mapping[str, str]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(pod, container) securityContext of every trainer pod, from the chart's JSON values, checked with
    Kubernetes' PodSpec schema: a bad chart value stops the operator at start, not each job's pods."""
    from mmalign.api import podtemplate

    pod_spec = podtemplate.pod_spec_schema()["properties"]
    schemas = {
        POD_SECURITY_CONTEXT_ENV: ("trainer.podSecurityContext", "spec.securityContext",
                                   pod_spec["securityContext"]),
        SECURITY_CONTEXT_ENV: ("trainer.securityContext", "spec.containers[0].securityContext",
                               pod_spec["containers"]["items"]["properties"]["securityContext"]),
    }
    found: list[dict[str, Any] | None] = []
    for name, (value_name, path, schema) in schemas.items():
        try:
            value = json.loads(environ.get(name) or "{}")
        except json.JSONDecodeError as error:
            raise SystemExit(f"mmalign operator: {name} (the chart's {value_name}) is not JSON: {error}") from None
        problems = podtemplate.schema_problems(value, schema, path)
        if problems:
            raise SystemExit(f"mmalign operator: {name} (the chart's {value_name}) is not a valid "
                             "securityContext:\n  " + "\n  ".join(problems))
        found.append(value or None)
    return found[0], found[1]


def default_priority() -> int:
    """Earlier start = higher priority, so a running leader keeps leading when a replica (re)starts;
    random low digits break a tie between replicas started in the same millisecond."""
    return -(int(time.time() * 1000) * 1000 + random.randrange(1000))


def _quiet_wakeups(record: logging.LogRecord) -> bool:
    """Drop kopf's "Handler 'pod_changed' succeeded." lines: one per pod event says nothing."""
    return not (record.levelno <= logging.INFO and "'pod_changed'" in record.getMessage())


async def _ensure_peering(api_client: object, name: str, namespaces: list[str], wait_seconds: float) -> None:
    """kopf only patches an existing peering object; a missing one would silently disable peering.

    The chart creates the object, but Helm applies custom kinds after the Deployment, so a fast-starting
    operator can get here first; creating it then makes `helm install` fail with "already exists".
    So the chart passes --peering-wait: wait that long for it to appear, and only then create it.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(api_client)
    targets: list[tuple[str | None, str, str]] = [
        (ns, "KopfPeering", "kopfpeerings") for ns in namespaces
    ] if namespaces else [(None, "ClusterKopfPeering", "clusterkopfpeerings")]

    def exists(namespace: str | None, plural: str) -> bool:
        # list, not get: kopf needs list/watch/patch on peerings anyway, so RBAC grants no `get`
        selector = f"metadata.name={name}"
        try:
            if namespace is None:
                listed = custom.list_cluster_custom_object("kopf.dev", "v1", plural, field_selector=selector)
            else:
                listed = custom.list_namespaced_custom_object("kopf.dev", "v1", namespace, plural,
                                                             field_selector=selector)
            return isinstance(listed, dict) and bool(listed.get("items"))
        except ApiException as error:
            if error.status == 404:  # no such CRD: the create below says so clearly
                return False
            raise

    deadline = time.monotonic() + wait_seconds
    for namespace, kind, plural in targets:
        while not (found := await asyncio.to_thread(exists, namespace, plural)) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        if found:
            continue  # there (the chart's): nothing to create
        body = {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": {"name": name}}
        try:
            if namespace is None:
                await asyncio.to_thread(custom.create_cluster_custom_object, "kopf.dev", "v1", plural, body)
            else:
                await asyncio.to_thread(custom.create_namespaced_custom_object, "kopf.dev", "v1", namespace,
                                        plural, body)
        except ApiException as error:
            if error.status == 404:
                raise SystemExit(f"mmalign operator: --peering needs kopf's peering CRDs ({plural}.kopf.dev); "
                                 "install charts/mmalign/crds/kopf-peering.yaml") from None
            if error.status != 409:  # already there: fine
                raise
