"""The slim CoreDNS build (devcluster/binaries.py): exactly the plugins the real node's Corefile uses."""

from __future__ import annotations

import re
from pathlib import Path

from mmalign.devcluster import binaries, realnode


def corefile_directives(text: str) -> set[str]:
    """The first word of each line directly inside a server block (depth 1): the plugins it uses."""
    found, depth = set(), 0
    for line in text.splitlines():
        words = line.split()
        if depth == 1 and words and words[0] != "}":
            found.add(words[0])
        depth += line.count("{") - line.count("}")
    return found


def test_the_build_has_exactly_the_corefiles_plugins() -> None:
    # A plugin missing from the build stops CoreDNS at start ("Unknown directive"); an extra one costs
    # build minutes for nothing.
    assert corefile_directives(realnode.corefile(Path("/k"))) == set(binaries.COREDNS_PLUGINS)


def test_main_imports_each_plugin_and_sets_their_order() -> None:
    main = binaries.coredns_main_go(("ready", "cache", "kubernetes"))
    imported = re.findall(r'_ "github.com/coredns/coredns/plugin/(\w+)"', main)
    assert sorted(imported) == ["cache", "kubernetes", "ready"]
    assert 'dnsserver.Directives = []string{"ready", "cache", "kubernetes"}' in main
    assert "coremain.Run()" in main and 'core/plugin"' not in main  # not the all-plugins package
