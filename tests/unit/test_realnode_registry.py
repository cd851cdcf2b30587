"""The real node's image registry, as configuration: buildah pushes `localhost/<name>:<tag>` to the
registry on the namespace's address, containerd's hosts.toml sends pulls of host `localhost` there."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mmalign.devcluster import realnode


def _layout(tmp_path: Path) -> realnode.NodeLayout:
    return realnode.NodeLayout(tmp_path / "state", tmp_path / "bin", tmp_path / "cache" / "containerd")


def test_containerd_reads_registry_hosts_from_the_nodes_hosts_folder(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    config = tomllib.loads(realnode.containerd_config(layout))
    images = config["plugins"]["io.containerd.cri.v1.images"]
    assert images["registry"]["config_path"] == str(layout.hosts_dir)


def test_pulls_of_localhost_images_go_to_the_registry_over_plain_http() -> None:
    hosts = tomllib.loads(realnode.registry_hosts())
    url = f"http://{realnode.NS_IP}:{realnode.REGISTRY_PORT}"
    assert hosts["server"] == url
    assert hosts["host"][url]["capabilities"] == ["pull", "resolve"]


def test_the_registry_keeps_its_blobs_in_the_cache_and_serves_the_namespace_address(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    config = realnode.registry_config(layout)
    assert config["storage"]["filesystem"] == {"rootdirectory": str(tmp_path / "cache" / "registry")}
    assert config["http"] == {"addr": realnode.REGISTRY}
    argv = realnode.commands(layout, tmp_path / "kubeconfig")["registry"]
    assert argv == [str(tmp_path / "bin" / "registry"), "serve", str(layout.path("registry.yaml"))]


def test_push_reference_names_the_registry_address() -> None:
    assert (
        realnode.registry_reference("localhost/mmalign:runtime-0123")
        == f"{realnode.REGISTRY}/mmalign:runtime-0123"
    )
    with pytest.raises(ValueError, match="localhost/<name>:<tag>"):
        realnode.registry_reference("ghcr.io/mmalign/mmalign:0.1.0")


def test_a_shells_proxy_is_bypassed_for_the_namespace_address() -> None:
    assert realnode.no_proxy_env({}) == {"NO_PROXY": realnode.NS_IP, "no_proxy": realnode.NS_IP}
    got = realnode.no_proxy_env({"no_proxy": "corp.example"})
    assert got["NO_PROXY"] == f"corp.example,{realnode.NS_IP}"
