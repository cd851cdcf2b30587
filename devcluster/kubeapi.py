"""A small JSON client for the Kubernetes API, enough for the process node and the cluster checks.

Why not the `kubernetes` package: its watch deserialises every object into generated model classes,
which costs more than the process node's whole work in fast mode (1,000 pods). Plain dicts are enough.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import urllib3


class ApiError(Exception):
    def __init__(self, status: int, body: str, what: str):
        super().__init__(f"{what}: HTTP {status}: {body[:500]}")
        self.status = status


@dataclass
class KubeApi:
    server: str
    ca: Path
    cert: tuple[Path, Path] | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        self.session = requests.Session()
        # Not the environment: REQUESTS_CA_BUNDLE or a proxy variable would override this cluster's CA.
        self.session.trust_env = False
        self.session.verify = str(self.ca)
        if self.cert:
            self.session.cert = (str(self.cert[0]), str(self.cert[1]))
        if self.token:
            self.session.headers["Authorization"] = f"Bearer {self.token}"
        # Many threads of the node share one session: keep enough pooled connections for them.
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=32)
        self.session.mount("https://", adapter)

    def request(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None,
                content_type: str = "application/json", timeout: float = 30) -> Any:
        data = json.dumps(body) if body is not None else None
        resp = self.session.request(method, self.server + path, data=data, params=params, timeout=timeout,
                                    headers={"Content-Type": content_type})
        if resp.status_code >= 300:
            raise ApiError(resp.status_code, resp.text, f"{method} {path}")
        return resp.json() if resp.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def create(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def strategic_patch(self, path: str, body: dict[str, Any]) -> Any:
        """Built-in types only; lists merge by their key (e.g. node conditions by `type`)."""
        return self.request("PATCH", path, body, content_type="application/strategic-merge-patch+json")

    def delete(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("DELETE", path, body)

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 300) -> Iterator[dict[str, Any]]:
        """Yield watch events; raises ApiError(410) when the resource version is too old (re-list)."""
        params = {"watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_seconds)}
        with self.session.get(self.server + path, params=params, stream=True,
                              timeout=(10, timeout_seconds + 30)) as resp:
            if resp.status_code >= 300:
                raise ApiError(resp.status_code, resp.text, f"WATCH {path}")
            try:
                for line in resp.iter_lines():
                    if not line:
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object", {})
                        raise ApiError(int(status.get("code", 500)), json.dumps(status), f"WATCH {path}")
                    yield event
            except (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError):
                return  # the server ended the stream; the caller watches again from its last version


def pod_path(namespace: str, name: str = "", sub: str = "") -> str:
    path = f"/api/v1/namespaces/{namespace}/pods"
    path += f"/{name}" if name else ""
    return path + (f"/{sub}" if sub else "")
