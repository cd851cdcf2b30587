"""Kubernetes I/O for the controller: server-side apply under one field manager, deletes, log tails.

The official (synchronous) client runs in worker threads so that a gang's pods are applied in
parallel. Every call counts its failures in `mmalign_operator_api_errors_total`. Nothing here logs
object bodies (a pod's env could hold values a user considers secret; Secrets are never read).
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from mmalign.api.groupversion import API_GROUP, API_VERSION, PLURAL
from mmalign.operator import metrics
from mmalign.operator.builders import FIELD_MANAGER

APPLY = "application/apply-patch+yaml"
PARALLEL_CALLS = 32  # concurrent API calls per batch (a 256-node gang is 8 rounds, not 256)

T = TypeVar("T")


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """In-cluster config when running in a pod (and no kubeconfig given), else the kubeconfig."""
    configuration = client.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                context=context, client_configuration=configuration)
    else:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, context=context, client_configuration=configuration)
    configuration.connection_pool_maxsize = PARALLEL_CALLS
    return client.ApiClient(configuration)


def is_status(error: BaseException, *codes: int) -> bool:
    return isinstance(error, ApiException) and error.status in codes


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._limit = asyncio.Semaphore(PARALLEL_CALLS)
        # Our own threads: asyncio.to_thread's default pool has min(32, CPUs + 4) workers, 6 on a two-core
        # node, which made a 256-pod gang 43 rounds of 6 calls, not 8 rounds of 32.
        self._pool = ThreadPoolExecutor(PARALLEL_CALLS, thread_name_prefix="kube")

    async def _call(self, verb: str, resource: str, function: Callable[..., T], *args: Any,
                    missing_ok: bool = False, exists_ok: bool = False, **kwargs: Any) -> T | None:
        async with self._limit:
            try:
                call: Callable[[], Any] = functools.partial(function, *args, **kwargs)
                if kwargs.get("_preload_content") is False:
                    call = functools.partial(_drained, call)
                result: T | None = await asyncio.get_running_loop().run_in_executor(self._pool, call)
                return result
            except ApiException as error:
                if (missing_ok and error.status == 404) or (exists_ok and error.status == 409):
                    return None
                metrics.API_ERRORS.labels(verb=verb, resource=resource, code=str(error.status)).inc()
                raise
            except Exception:
                metrics.API_ERRORS.labels(verb=verb, resource=resource, code="network").inc()
                raise

    async def gather(self, calls: Iterable[Awaitable[Any]]) -> None:
        """Run calls concurrently; raise the first error after all have finished (none is lost)."""
        results = await asyncio.gather(*calls, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------------------ apply

    async def apply(self, body: dict[str, Any]) -> None:
        """Server-side apply (force: this operator owns these fields): a retry never 409s or duplicates.
        Pods are created instead (see below)."""
        kind, name, namespace = body["kind"], body["metadata"]["name"], body["metadata"]["namespace"]
        if "/" in body["apiVersion"]:  # a custom resource: a gang scheduler's PodGroup (operator/gang.py)
            group, version = body["apiVersion"].split("/")
            plural = kind.lower() + "s"
            await self._call("apply", plural, self.custom.patch_namespaced_custom_object, group, version, namespace,
                             plural, name, body, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY,
                             _preload_content=False)
            return
        if kind == "Pod":
            # Created, never re-applied: a retry after a partly created gang leaves the pods already there
            # as they are. Re-applying one would strip what admission added to it under this field
            # manager (Kueue's scheduling gate, its finalizer), and a pod's spec of one attempt never
            # changes anyway. AlreadyExists (409) is the retry's success.
            await self._call("create", "pods", self.core.create_namespaced_pod, namespace, body,
                             exists_ok=True, field_manager=FIELD_MANAGER, _preload_content=False)
            return
        function = {
            "Service": self.core.patch_namespaced_service,
            "ConfigMap": self.core.patch_namespaced_config_map,
        }[kind]
        # _preload_content=False: the answer (the whole pod) is not parsed into client models, which cost
        # the operator more CPU than the request itself; nothing reads it.
        await self._call("apply", kind.lower() + "s", function, name, namespace, body,
                         field_manager=FIELD_MANAGER, force=True, _content_type=APPLY, _preload_content=False)

    async def apply_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "AlignmentJob",
                "metadata": {"name": name, "namespace": namespace}, "status": status}
        await self._call("apply", f"{PLURAL}/status", self.custom.patch_namespaced_custom_object_status,
                         API_GROUP, API_VERSION, namespace, PLURAL, name, body,
                         field_manager=FIELD_MANAGER, force=True, _content_type=APPLY, _preload_content=False)

    # ------------------------------------------------------------------------------ read

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        # unparsed: the pod's JSON as the API sends it (what kopf hands the handlers), not client models
        # turned back into a dict (a GET per pod the watch has not shown yet, ~100 in a 256-pod start)
        raw: Any = await self._call("get", "pods", self.core.read_namespaced_pod, name, namespace,
                                    missing_ok=True, _preload_content=False)
        return None if raw is None else dict(json.loads(raw))

    async def get_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        found = await self._call("get", "configmaps", self.core.read_namespaced_config_map, name, namespace,
                                 missing_ok=True)
        return None if found is None else self._plain(found)

    def _plain(self, model: Any) -> dict[str, Any]:
        """A client model -> the API's camelCase dict (what kopf hands the handlers)."""
        plain: dict[str, Any] = self.api_client.sanitize_for_serialization(model)  # type: ignore[no-untyped-call]
        return plain

    async def pod_log_tail(self, namespace: str, name: str, lines: int, limit_bytes: int) -> str:
        text = await self._call("get", "pods/log", self.core.read_namespaced_pod_log, name, namespace,
                                tail_lines=lines, limit_bytes=limit_bytes, missing_ok=True)
        return text or ""

    # ------------------------------------------------------------------------------ delete

    async def delete_pods(self, namespace: str, names: Iterable[str], grace_seconds: int | None = None) -> None:
        options: dict[str, Any] = {} if grace_seconds is None else {"grace_period_seconds": grace_seconds}
        await self.gather(
            self._call("delete", "pods", self.core.delete_namespaced_pod, name, namespace, missing_ok=True,
                       propagation_policy="Background", _preload_content=False, **options)
            for name in names
        )

    async def delete_pod_collection(self, namespace: str, label_selector: str,
                                    grace_seconds: int | None = None) -> None:
        """Every pod matching the selector in ONE request (a 256-pod gang: 1 call, not 256)."""
        options: dict[str, Any] = {} if grace_seconds is None else {"grace_period_seconds": grace_seconds}
        await self._call("deletecollection", "pods", self.core.delete_collection_namespaced_pod, namespace,
                         label_selector=label_selector, propagation_policy="Background", _preload_content=False,
                         **options)

    async def delete_service(self, namespace: str, name: str) -> None:
        await self._call("delete", "services", self.core.delete_namespaced_service, name, namespace,
                         missing_ok=True)

    async def delete_config_map(self, namespace: str, name: str) -> None:
        await self._call("delete", "configmaps", self.core.delete_namespaced_config_map, name, namespace,
                         missing_ok=True)

    async def delete_custom(self, group: str, version: str, plural: str, namespace: str, name: str) -> None:
        await self._call("delete", plural, self.custom.delete_namespaced_custom_object, group, version, namespace,
                         plural, name, missing_ok=True, propagation_policy="Background")

    async def delete_job(self, namespace: str, name: str) -> None:
        await self._call("delete", PLURAL, self.custom.delete_namespaced_custom_object, API_GROUP, API_VERSION,
                         namespace, PLURAL, name, missing_ok=True, propagation_policy="Background")


def _drained(call: Callable[[], Any]) -> bytes:
    """Run a `_preload_content=False` call: read its answer's bytes (unparsed) so that the connection
    goes back to the pool; return them."""
    response = call()
    data: bytes = response.read()
    response.release_conn()
    return data


def error_details(error: BaseException) -> tuple[int | None, str, str]:
    """(HTTP code, the API's reason word, the server's message) of an API error; (None, "", text) else."""
    if isinstance(error, ApiException):
        try:
            body = json.loads(error.body or "{}")
        except (ValueError, AttributeError):
            body = {}
        body = body if isinstance(body, dict) else {}
        return error.status, str(body.get("reason") or error.reason or ""), str(body.get("message") or "")
    return None, "", f"{type(error).__name__}: {error}"


def error_summary(error: BaseException) -> str:
    """A one-line description of an API error for logs and conditions (reason + message, no bodies)."""
    if isinstance(error, ApiException):
        try:
            message = json.loads(error.body or "{}").get("message", "")
        except (ValueError, AttributeError):
            message = ""
        return f"HTTP {error.status} {error.reason}: {message}".strip()
    return f"{type(error).__name__}: {error}"
