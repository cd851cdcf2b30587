"""The Kubernetes PodSpec schema for `podTemplate.spec`, converted from the pinned release's OpenAPI v3 spec.

`spec.podTemplate.spec` (and `stages.<s>.podTemplate.spec`) is a real core/v1 PodSpec fragment, so the
CRD validates it with the real schema rather than a home-written subset. This module turns the upstream
OpenAPI v3 document (`api/openapi-spec/v3/api__v1_openapi.json` of the `k8s.io/kubernetes` module, the
release the dev cluster runs) into a *structural* CRD schema and writes it to the committed, generated
file `mmalign/api/podspec.schema.json`, which `mmalign crds` embeds and mmalign.api.podtemplate reads
(merge keys, offline checks). What the conversion does:

- inlines every `$ref` (and the `allOf: [$ref]` wrappers around them): CRD schemas have no references;
- `format: int-or-string` and Quantity (`oneOf: string | number`) -> `x-kubernetes-int-or-string`;
- drops the PodSpec's own `required` (a fragment needs no `containers`), descriptions (the CRD would grow by ~1 MB: `kubectl explain pod.spec` has them), formats,
  defaults (the API server would write them into the user's fragment; the pod gets them when created)
  except the defaults of list-map keys the CRD requires (`ports[].protocol: TCP`), and
  `ephemeralContainers` (the API server refuses them on pod creation);
- keeps `required`, `x-kubernetes-list-type`/`-list-map-keys`/`-map-type` (the API server then refuses
  two env entries of one name, as it does for pods) and the strategic-merge keys
  `x-kubernetes-patch-merge-key`/`-patch-strategy` (the operator's merge reads them; `mmalign crds`
  strips them from the CRD);
- marks the few free-form upstream objects (`FieldsV1` in a volume claim template's metadata)
  `x-kubernetes-preserve-unknown-fields`.

Usage: mmalign crds --pod-schema   # rewrite the committed file from the Go module cache, then the CRD
Drift: tests/unit/test_pod_template.py regenerates it from the Go module cache and compares.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmalign.api import podtemplate

SOURCE = "io.k8s.api.core.v1.PodSpec"
DROPPED = {SOURCE: ("ephemeralContainers",)}
_KEPT = (
    "type",
    "required",
    "enum",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-patch-merge-key",
    "x-kubernetes-patch-strategy",
)


def find_openapi(version: str) -> Path | None:
    """The pinned release's core/v1 OpenAPI v3 document in the Go module cache (`make binaries` fills it)."""
    root = Path(os.environ.get("GOMODCACHE") or Path.home() / "go/pkg/mod")
    path = root / f"k8s.io/kubernetes@{version}/api/openapi-spec/v3/api__v1_openapi.json"
    return path if path.is_file() else None


def convert(openapi: dict[str, Any], version: str) -> dict[str, Any]:
    """The upstream document -> the structural schema of a PodSpec fragment (see the module docstring)."""
    schemas: dict[str, Any] = openapi["components"]["schemas"]

    def node(schema: dict[str, Any], name: str = "") -> dict[str, Any]:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            return node(schemas[name], name)
        if len(schema.get("allOf", ())) == 1:
            return node({**schema["allOf"][0], **{k: v for k, v in schema.items() if k != "allOf"}}, name)
        if schema.get("format") == "int-or-string" or "oneOf" in schema:
            return {"x-kubernetes-int-or-string": True}
        out = {key: schema[key] for key in _KEPT if key in schema}
        if "properties" in schema:
            dropped = DROPPED.get(name, ())
            out["properties"] = {
                key: node(value) for key, value in sorted(schema["properties"].items()) if key not in dropped
            }
        elif "additionalProperties" in schema:
            out["additionalProperties"] = node(schema["additionalProperties"])
        elif out.get("type", "object") == "object" and "items" not in schema:
            out = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        if "items" in schema:
            out["items"] = node(schema["items"])
            _default_map_keys(schema, out["items"])
        return out

    def _default_map_keys(array: dict[str, Any], items: dict[str, Any]) -> None:
        # A list-map key must be required or defaulted in a CRD: keep upstream's default for those only.
        upstream = schemas[array["items"]["$ref"].rsplit("/", 1)[-1]] if "$ref" in array["items"] else {}
        for key in array.get("x-kubernetes-list-map-keys", ()):
            if key not in items.get("required", ()) and "default" in upstream.get("properties", {}).get(
                key, {}
            ):
                items["properties"][key]["default"] = upstream["properties"][key]["default"]

    root = node(schemas[SOURCE], SOURCE)
    root.pop("required", None)  # a fragment: `containers` comes from the operator's pod
    return {"x-mmalign-source": f"k8s.io/kubernetes@{version} {SOURCE}", **root}


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=1, sort_keys=True) + "\n"


def write(openapi_path: Path, version: str) -> Path:
    schema = convert(json.loads(openapi_path.read_text()), version)
    podtemplate.SCHEMA_FILE.write_text(render(schema))
    return podtemplate.SCHEMA_FILE
