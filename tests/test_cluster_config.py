"""ray_cluster.yaml passes Ray's own cluster-config validation (the schema `ray up` applies)."""
import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / "ray_cluster.yaml").read_text())


def validate(cfg):
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_ray_cluster_yaml_passes_rays_validation():
    validate(CONFIG)
    workers = CONFIG["available_node_types"]["gpu_worker"]
    assert workers["max_workers"] > workers["min_workers"] == 0, "the GPU group autoscales from zero"
    assert any("constraints.txt" in cmd for cmd in CONFIG["setup_commands"])
    assert any("mlflow server" in cmd for cmd in CONFIG["head_setup_commands"])


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c["available_node_types"]["gpu_worker"].update(max_workers="eight"), jsonschema.ValidationError),
    (lambda c: c.update(setup_comands=[]), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="nonexistent"), ValueError),
])
def test_a_broken_copy_fails_validation(break_it, error):
    broken = copy.deepcopy(CONFIG)
    break_it(broken)
    with pytest.raises(error):
        validate(broken)
