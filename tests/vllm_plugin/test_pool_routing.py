"""Which pools get expert traffic: the pools that say they serve experts (no vLLM, no Ray)."""

from __future__ import annotations

import pytest

from serve_app.config import PoolConfig, load_app_config
from serve_app.replica.engine_vllm import vllm_options


def test_a_pool_says_which_customization_kinds_it_serves():
    assert PoolConfig(name="t").serves == {"adapter", "expert"}
    assert PoolConfig(name="v", engine="vllm").serves == {"adapter", "expert"}  # through the plugin
    assert PoolConfig(name="p", engine="vllm", vllm={"experts": False}).serves == {"adapter"}
    opts = vllm_options(PoolConfig(name="v", engine="vllm", vllm={"bank_layers": False}, max_experts_per_replica=3))
    assert (opts.bank_layers, opts.experts, opts.max_experts) == (False, True, 3)


def test_router_sends_experts_only_to_pools_that_serve_them(tmp_path, monkeypatch):
    from cluster.registry import Registry
    from serve_app.ingress import catalog as catalog_module
    from serve_app.ingress.catalog import Catalog

    monkeypatch.setattr(catalog_module, "build_recommender", lambda *a: None)  # `auto` is not under test here

    config = load_app_config({"pools": [
        {"name": "torchpool", "model": str(tmp_path / "m")},
        {"name": "vllmpool", "engine": "vllm", "model": str(tmp_path / "m")},
        {"name": "plainvllm", "engine": "vllm", "vllm": {"experts": False}, "model": str(tmp_path / "m")}]})
    catalog = Catalog(Registry(str(tmp_path / "store")), config)
    catalog._pool_hashes = {"torchpool": "h1", "vllmpool": "h1", "plainvllm": "h1"}
    assert catalog.expert_pools("h1") == ("torchpool", "vllmpool")
    assert catalog.expert_pools("other") == ()


@pytest.mark.parametrize("version", ["0.31.0", "0.33.1", "1.0.0"])
def test_other_vllm_versions_are_refused_with_the_way_out(version):
    from serve_app.vllm_plugin.compat import VLLMVersionError, check_vllm_version

    with pytest.raises(VLLMVersionError, match=r"0\.32\.0.*vllm\.bank_layers: false"):
        check_vllm_version(version)
    assert check_vllm_version("0.32.0+cpu") == "0.32.0+cpu"
