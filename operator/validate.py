"""Offline validation of AlignmentJob files: `mmalign validate FILE...`.

Reports EVERY problem as `FILE:LINE: field.path: message`, using the same pydantic models the CRD is
generated from, and exits 1 if there is any. Line numbers come from PyYAML's node marks: each error's
location (a tuple of YAML keys and list indexes) is walked down the composed node tree; a missing field
points at the mapping that should hold it.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from mmalign.api import formats
from mmalign.api.spec import AlignmentJobManifest

# metadata.name becomes the prefix of pod and Service names: DNS-1123 label rules.
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # 1-based
    path: str  # dotted field path, e.g. spec.stages.dpo.beta
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


def _node_at(node: yaml.Node, loc: tuple[Any, ...]) -> yaml.Node:
    """The deepest YAML node along `loc` (stops where the path leaves the document)."""
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == key), None)
            if child is None:
                # An unknown/extra key is reported by pydantic under its own name: point at the key.
                key_node = next((k for k, _ in node.value if k.value == key), None)
                return key_node or node
            node = child
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
    return node


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "union[", "literal[")):  # pydantic internals
            out += ("." if out else "") + str(part)
    return out


def _message(error: Any) -> str:  # pydantic's ErrorDetails
    msg: str = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "unknown field (check the spelling; `kubectl explain aj.spec` lists the fields)"
    if error["type"] == "missing":
        return "required field is missing"
    meaning = formats.PATTERN_MEANINGS.get((error.get("ctx") or {}).get("pattern", ""))
    if error["type"] == "string_pattern_mismatch" and meaning:
        msg = f"must be {meaning}"
    if "input" in error and not isinstance(error["input"], dict | list):
        msg += f" (got {error['input']!r})"
    return msg


_RELATIVE = re.compile(r"^([A-Za-z][\w.\[\]/-]*): (.+)$")  # `containers[0].env[1]: why`


def _located(node: yaml.Node, loc: tuple[Any, ...], message: str) -> list[tuple[tuple[Any, ...], str]]:
    """A check over a whole subtree (a pod template fragment, the spec's cross-field checks) reports
    `sub.path[0].field: why; ...` relative to its location: one problem per part, at its own path and line."""
    out = []
    for part in message.split("; "):
        match = _RELATIVE.match(part)
        keys = tuple(int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", match[1])) if match else ()
        if match and _has_path(node, loc + keys[:1]):
            out.append((loc + keys, match[2]))
        else:
            out.append((loc, part))
    return out


def _has_path(node: yaml.Node, loc: tuple[Any, ...]) -> bool:
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            found = next((v for k, v in node.value if k.value == key), None)
            if found is None:
                return False
            node = found
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return False
    return True


def validate_document(file: str, node: yaml.Node, data: Any) -> list[Problem]:
    """All problems of one YAML document."""
    problems: list[Problem] = []
    try:
        AlignmentJobManifest.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            for loc, message in _located(node, tuple(error["loc"]), _message(error)):
                line = _node_at(node, loc).start_mark.line + 1
                problems.append(Problem(file, line, _path(loc), message))
    name = data.get("metadata", {}).get("name") if isinstance(data, dict) else None
    if isinstance(name, str) and name and not NAME_RE.match(name) or isinstance(name, str) and len(name) > 63:
        line = _node_at(node, ("metadata", "name")).start_mark.line + 1
        problems.append(Problem(file, line, "metadata.name",
                                f"{name!r} must be lowercase letters, digits and '-', at most 63 characters"))
    return problems


def validate_text(file: str, text: str) -> list[Problem]:
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        return [Problem(file, (mark.line + 1) if mark else 1, "", f"not valid YAML: {exc}")]
    problems: list[Problem] = []
    for node, data in zip(nodes, documents, strict=True):
        if node is None:
            continue
        if not isinstance(data, dict):
            problems.append(Problem(file, node.start_mark.line + 1, "", "expected an AlignmentJob mapping"))
            continue
        problems += validate_document(file, node, data)
    if not any(n is not None for n in nodes):
        problems.append(Problem(file, 1, "", "no YAML document in the file"))
    return problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmalign validate", description="Validate AlignmentJob YAML files.")
    parser.add_argument("files", nargs="+", help="YAML files (several documents per file are fine)")
    args = parser.parse_args(argv)
    problems: list[Problem] = []
    for file in args.files:
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            problems.append(Problem(file, 0, "", f"cannot read: {exc.strerror}"))
            continue
        found = validate_text(file, text)
        problems += found
        if not found:
            print(f"{file}: ok")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0
