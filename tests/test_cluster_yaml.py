"""cluster.yaml passes Ray's own cluster-launcher validation; broken variants do not."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = yaml.safe_load((Path(__file__).resolve().parent.parent / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_for_ray():
    validate_config(prepare_config(copy.deepcopy(CONFIG)))
    types = CONFIG["available_node_types"]
    assert types["gpu_worker"]["resources"]["GPU"] >= 1 and types["gpu_worker"]["max_workers"] > 0
    assert "GPU" not in types[CONFIG["head_node_type"]]["resources"]
    assert any("torch==2.13.0" in c for c in CONFIG["setup_commands"])


@pytest.mark.parametrize("mutate", [
    lambda c: c["available_node_types"]["gpu_worker"].__setitem__("min_workers", "two"),
    lambda c: c.__setitem__("head_node_type", "missing_type"),
    lambda c: c.__setitem__("unknown_key", 1),
])
def test_broken_configs_are_rejected(mutate):
    config = copy.deepcopy(CONFIG)
    mutate(config)
    with pytest.raises(Exception):  # noqa: B017 — Ray raises jsonschema or ValueError
        validate_config(prepare_config(config))
