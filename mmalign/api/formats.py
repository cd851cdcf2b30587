"""Kubernetes value formats the spec checks at apply time, so a job is refused by the API server (CEL,
patterns) or by `mmalign validate` instead of failing later at pod creation or at run time.

Each format is written once here, as a regex (used both as a CRD `pattern`/CEL `matches()` and by
Python) or as a Python check next to the CEL rule that does the same (mmalign/api/spec.py uses both).
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal, InvalidOperation

from mmalign.api import keys

# DNS-1123 subdomain (Secret, ServiceAccount, PriorityClass, scheduler names): at most 253 characters.
DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
DNS_SUBDOMAIN_PATTERN = f"^{DNS_SUBDOMAIN}$"
OPTIONAL_DNS_SUBDOMAIN_PATTERN = f"^({DNS_SUBDOMAIN})?$"  # "" = not set
# Label values: at most 63 characters, alphanumeric at both ends, '-', '_', '.' inside; empty is allowed.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# Label and annotation keys: an optional DNS-subdomain prefix and '/', then a name of at most 63.
LABEL_KEY_PATTERN = rf"^({DNS_SUBDOMAIN}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
LABEL_KEY_MAX = 253 + 1 + 63
# Env names the trainer can read as shell/Python identifiers (Kubernetes' C_IDENTIFIER).
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# Names that carry a credential: a Secret holds those, never the AlignmentJob (readable by anyone who
# can `kubectl get aj`). Matched on whole `_`-separated words: TOKENIZERS_PARALLELISM is fine.
CREDENTIAL_ENV_PATTERN = (
    r"(?i)(^|_)(secret|password|passwd|token|credentials?|api_?key|access_?key(_id)?"
    r"|private_?key)(_|$)"
)
# The torchrun conventions (PET_*) and the operator's own variables (keys.RESERVED_ENV).
RESERVED_ENV_PREFIX = "PET_"
# An S3 endpoint: http(s)://host[:port][/path], the host a DNS name, an IPv4 or a bracketed IPv6 address.
ENDPOINT_PATTERN = (
    r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?)(:[0-9]{1,5})?(/\S*)?$"
)
# A Kubernetes resource quantity (k8s.io/apimachinery's format): 8, 500m, 16Gi, 1e3, 0.5.
QUANTITY_PATTERN = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"

_SUFFIX: dict[str, int | Decimal] = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


def parse_quantity(value: int | str) -> Decimal | None:
    """A quantity as a number (16Gi -> 17179869184, 500m -> 0.5), or None when it is not one."""
    text = str(value).strip()
    if not re.match(QUANTITY_PATTERN, text):
        return None
    match = re.match(r"^([+-]?[0-9.]+)(.*)$", text)
    assert match is not None
    number, suffix = match.groups()
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number + suffix)
        return Decimal(number) * Decimal(_SUFFIX[suffix])
    except (InvalidOperation, KeyError):
        return None


def format_quantity(value: Decimal) -> str:
    """parse_quantity's inverse, the way Kubernetes writes a quantity: 0.2 -> 200m, 268435456 -> 256Mi, 3 -> 3."""
    if value == value.to_integral_value():
        whole = int(value)
        for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
            unit = int(_SUFFIX[suffix])
            if whole and whole % unit == 0:
                return f"{whole // unit}{suffix}"
        return str(whole)
    for suffix, scale in (("m", 10**3), ("u", 10**6), ("n", 10**9)):
        scaled = value * scale
        if scaled == scaled.to_integral_value():
            return f"{int(scaled)}{suffix}"
    return f"{int((value * 10**9).to_integral_value(rounding=ROUND_CEILING))}n"  # Kubernetes rounds up too


def is_extended_resource(name: str) -> bool:
    """nvidia.com/gpu, amd.com/gpu, rdma/hca...: Kubernetes accepts only whole numbers for these."""
    return "/" in name and not name.startswith(("kubernetes.io/", "requests.", "limits."))


def quantity_problems(values: dict[str, int | str]) -> list[str]:
    """What is wrong with a requests/limits map, one line per key (empty when nothing)."""
    problems = []
    for name, value in values.items():
        number = parse_quantity(value)
        if number is None:
            problems.append(f"{name}: {value!r} is not a Kubernetes quantity (e.g. 8, 500m, 16Gi)")
        elif number < 0:
            problems.append(f"{name}: {value!r} is negative")
        elif is_extended_resource(name) and number != number.to_integral_value():
            problems.append(f"{name}: {value!r} must be a whole number (devices are not shared in fractions)")
    return problems


def label_key_problems(names: list[str]) -> list[str]:
    return [
        f"{name!r} is not a valid label/annotation key (optional DNS prefix and '/', then at most 63 "
        "letters, digits, '-', '_', '.', starting and ending alphanumeric)"
        for name in names
        if len(name) > LABEL_KEY_MAX or not re.match(LABEL_KEY_PATTERN, name)
    ]


def reserved_env(name: str) -> bool:
    return name.startswith(RESERVED_ENV_PREFIX) or name in keys.RESERVED_ENV


def credential_env(name: str) -> bool:
    return re.search(CREDENTIAL_ENV_PATTERN, name) is not None


# What each pattern means, for `mmalign validate`'s messages (a regex is no help to a user).
PATTERN_MEANINGS = {
    DNS_SUBDOMAIN_PATTERN: "a Kubernetes object name: lowercase letters, digits, '-' and '.', at most 253",
    OPTIONAL_DNS_SUBDOMAIN_PATTERN: "a Kubernetes object name: lowercase letters, digits, '-' and '.', at most 253",
    LABEL_VALUE_PATTERN: "a label value: at most 63 letters, digits, '-', '_', '.', alphanumeric at both ends",
    ENV_NAME_PATTERN: "an identifier: letters, digits and '_', not starting with a digit",
    ENDPOINT_PATTERN: "a URL: http(s)://host[:port][/path]",
}
