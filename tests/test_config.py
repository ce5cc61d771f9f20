import dataclasses

import pytest

from dualpseudo.config import (SAMPLING, TRAINING, ConfigError, ExperimentConfig, config_hash, fields_in_roles,
                               load_config, to_yaml)

from conftest import ROOT


def test_defaults_and_yaml_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs" / "fashion_mnist.yaml")       # reads the YAML only, never the dataset
    assert cfg.data.name == "fashion_mnist" and cfg.stage1.learner == "label-propagation"
    assert cfg.linear_probe.encoder == "ssl" and cfg.linear_probe.mirror and cfg.stage3.mode == "label-propagation"
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg
    assert config_hash(cfg) == config_hash(load_config(path))


def test_override_sets_nested_value_with_yaml_types():
    cfg = load_config(None, ["stage1.iterations=17", "stage2.guidance_scale=2", "data.labeled_indices=null"])
    assert cfg.stage1.iterations == 17
    assert cfg.stage2.guidance_scale == 2.0 and isinstance(cfg.stage2.guidance_scale, float)
    assert cfg.data.labeled_indices is None
    assert load_config(None, ["stage2.lr=3e-4"]).stage2.lr == 3e-4
    assert load_config(None, ["stage2.label_source=true"]).stage2.label_source == "true"


@pytest.mark.parametrize("override, needle", [
    ("data.no_such_key=1", "no_such_key"),
    ("nosection.x=1", "nosection"),
    ("stage1.iterations=abc", "stage1.iterations"),
    ("stage1.iterations=1.5", "stage1.iterations"),
    ("stage1.learner=meanteacher", "stage1.learner"),
    ("data.labels_per_class=-1", "data.labels_per_class"),
    ("stage2.p_uncond=1.5", "stage2.p_uncond"),
    ("runtime.precision=int8", "runtime.precision"),
    ("encoder.objective=byol", "encoder.objective"),
    ("encoder.momentum=1", "encoder.momentum"),
    ("encoder.queue=-1", "encoder.queue"),
    ("stage1.iterations", "key.sub=value"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("data: 3\n")
    with pytest.raises(ConfigError, match="data"):
        load_config(bad)


def test_config_is_frozen():
    cfg = ExperimentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError, match="iterations"):
        cfg.stage1.iterations = 3
    with pytest.raises(dataclasses.FrozenInstanceError, match="stage1"):
        cfg.stage1 = cfg.stage3


def test_hash_of_fields_in_roles():
    a = load_config(None, ["stage2.steps=10"]).stage2
    b = load_config(None, ["stage2.steps=30"]).stage2
    assert config_hash(a) != config_hash(b)
    assert config_hash(fields_in_roles(a, TRAINING)) == config_hash(fields_in_roles(b, TRAINING))
    assert fields_in_roles(a, SAMPLING)["steps"] == 10 and "lr" not in fields_in_roles(a, SAMPLING)


def test_fields_added_later_keep_existing_hashes():
    """`added_later` fields at their default leave hashes as they were before the field existed."""
    cfg = load_config(ROOT / "configs" / "fashion_mnist_freematch.yaml")
    # recorded before stage1.dist_align, stage1.init, stage3.pseudo_source and stage3.filter existed: run
    # directories from then must stay valid
    assert config_hash({"data": cfg.data, "stage1": cfg.stage1}) == "fa0fbb6002e14e0f"
    assert config_hash(cfg.stage1) == "71d58c3a6975f601"
    on = load_config(ROOT / "configs" / "fashion_mnist_freematch.yaml", ["stage1.dist_align=true"])
    assert on.stage1.dist_align is True
    assert config_hash({"data": on.data, "stage1": on.stage1}) != "fa0fbb6002e14e0f"
    assert config_hash(on.stage1) != "71d58c3a6975f601"
    assert "dist_align: false" in to_yaml(cfg)                 # the written config still lists it
    assert config_hash(cfg.stage3) == config_hash({"mode": "ssl", "pseudo_fraction": 0.5, "iterations": 0})
