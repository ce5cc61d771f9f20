"""Stage declarations (stages/declare.py) and field roles (config.py): which keys a config field enters.

A new field is one line in its section; its role decides whether it re-runs a stage, drops a training state,
or only regenerates stage 2's samples. These tests add fields to a section (a subclass of the section's
dataclass under the same name, as the line in config.py would) and check every key that derives from them.
"""
from __future__ import annotations

import dataclasses

import pytest

from dualpseudo.classify.contrastive import _resume_key as encoder_resume_key
from dualpseudo.classify.train import _resume_key as stage1_resume_key
from dualpseudo.config import (LENGTH, LOCATION, SAMPLING, SCHEDULE, TRAINING, ExperimentConfig, Stage1Config, Stage2Config,
                               added_later, load_config, role_of, setting)
from dualpseudo.diffuse.train import _training_hash
from dualpseudo.stages.declare import (ENCODER_DECL, EVALUATION, LATENTS, ORACLE, STAGE1, STAGE2, STAGE3,
                                       STAGE3_BASELINE, Upstream, stage2_model_key, stage2_sampling_key)

DECLS = (ENCODER_DECL, STAGE1, STAGE2, STAGE3, EVALUATION)


def with_field(section_cls: type, name: str, default, role: str) -> type:
    """`section_cls` with one more field, as `name: ... = added_later(default, role)` in config.py would add it."""
    return dataclasses.make_dataclass(section_cls.__name__, [(name, type(default), added_later(default, role))],
                                      bases=(section_cls,), frozen=True)


def extended(cfg: ExperimentConfig, section: str, cls: type, **values) -> ExperimentConfig:
    old = getattr(cfg, section)
    return dataclasses.replace(cfg, **{section: cls(**{f.name: getattr(old, f.name)
                                                        for f in dataclasses.fields(old)}, **values)})


def hashes(cfg: ExperimentConfig) -> dict:
    model = stage2_model_key(cfg)
    return {**{d.name: d.config_hash(cfg) for d in DECLS}, "stage2 model": model,
            "stage2 sampling": stage2_sampling_key(cfg, model),
            "stage2 resume": _training_hash(cfg.stage2, seed=0),
            "stage1 resume": stage1_resume_key(cfg.stage1, 10, 4, (1, 8, 8))}


def changed(a: ExperimentConfig, b: ExperimentConfig) -> set[str]:
    ha, hb = hashes(a), hashes(b)
    return {k for k in ha if ha[k] != hb[k]}


def test_every_field_has_a_known_role():
    cfg = ExperimentConfig()
    sections = [getattr(cfg, f.name) for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    for obj in sections:
        assert {role_of(obj, f.name) for f in dataclasses.fields(obj)} <= {TRAINING, LENGTH, SCHEDULE, SAMPLING,
                                                                            LOCATION}
    s2 = Stage2Config()
    assert role_of(s2, "steps") == SAMPLING and role_of(s2, "duration_kimg") == LENGTH
    assert role_of(s2, "log_every_kimg") == SCHEDULE and role_of(s2, "lr") == TRAINING


def test_the_cache_location_changes_no_key():
    """evaluation.cache_dir (LOCATION) enters the keys at its default: moving the cache re-runs nothing (the
    default's hashes, those of run directories made before, are pinned in test_behaviour_pin.py)."""
    cfg = load_config(None)
    moved = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, cache_dir="/elsewhere"))
    assert role_of(cfg.evaluation, "cache_dir") == LOCATION
    assert changed(cfg, moved) == set()


def test_a_new_field_at_its_default_changes_no_key():
    cfg = load_config(None)
    for role in (TRAINING, SAMPLING, SCHEDULE):
        assert changed(cfg, extended(cfg, "stage2", with_field(Stage2Config, "eta", 0.0, role))) == set()


def test_a_stage2_sampling_field_redoes_sampling_only():
    cfg = load_config(None)
    new = extended(cfg, "stage2", with_field(Stage2Config, "eta", 0.0, SAMPLING), eta=0.5)
    assert changed(cfg, new) == {"stage2", "stage2 sampling"}       # stage 3 and evaluation follow as downstream


def test_a_stage2_training_field_retrains_and_refuses_old_states():
    cfg = load_config(None)
    new = extended(cfg, "stage2", with_field(Stage2Config, "beta", 0.0, TRAINING), beta=0.5)
    assert changed(cfg, new) == {"stage2", "stage2 model", "stage2 sampling", "stage2 resume"}


def test_a_stage1_schedule_field_changes_no_key():
    cfg = load_config(None)
    new = extended(cfg, "stage1", with_field(Stage1Config, "eval_every", 0, SCHEDULE), eval_every=5)
    assert changed(cfg, new) == set()               # no manifest, reset or resume key: nothing re-runs
    new = extended(cfg, "stage1", with_field(Stage1Config, "mixup", 0.0, TRAINING), mixup=0.5)
    assert changed(cfg, new) == {"stage1", "stage1 resume", "stage3"}   # stage 3 reads stage1 (its recipe)


SCHEDULE_OVERRIDES = ["stage1.checkpoint_every=7", "stage1.log_every=3", "stage1.predict_batch_size=9",
                      "stage2.checkpoint_every_kimg=1", "stage2.log_every_kimg=1", "encoder.checkpoint_every=3",
                      "encoder.log_every=2"]


@pytest.mark.parametrize("override", SCHEDULE_OVERRIDES)
def test_schedule_fields_enter_no_key(override):
    base = load_config(None, ["stage1.learner=label-propagation", "linear_probe.encoder=ssl"])
    new = load_config(None, ["stage1.learner=label-propagation", "linear_probe.encoder=ssl", override])
    assert changed(base, new) == set()


@pytest.mark.parametrize("override", ["stage1.checkpoint_every=7", "stage1.log_every=3",
                                      "stage1.predict_batch_size=9"])
def test_stage1_resume_key_ignores_schedule_fields(override):
    a, b = load_config(None).stage1, load_config(None, [override]).stage1
    assert stage1_resume_key(a, 10, 4, (1, 8, 8)) == stage1_resume_key(b, 10, 4, (1, 8, 8))
    c = load_config(None, ["stage1.lr=0.01"]).stage1
    assert stage1_resume_key(a, 10, 4, (1, 8, 8)) != stage1_resume_key(c, 10, 4, (1, 8, 8))


@pytest.mark.parametrize("override", ["stage2.duration_kimg=3", "stage2.checkpoint_every_kimg=1",
                                      "stage2.log_every_kimg=1", "stage2.steps=3", "stage2.sampler=heun",
                                      "stage2.images_per_class=5", "stage2.sample_chunk=7"])
def test_stage2_resume_key_ignores_length_schedule_and_sampling(override):
    a, b = load_config(None).stage2, load_config(None, [override]).stage2
    assert _training_hash(a, seed=0) == _training_hash(b, seed=0)
    for training in ("stage2.lr=0.01", "stage2.p_uncond=0.2", "stage2.batch_size=7"):
        assert _training_hash(a, seed=0) != _training_hash(load_config(None, [training]).stage2, seed=0)


def test_stage2_model_key_ignores_sampling_but_not_duration():
    base = load_config(None)
    assert stage2_model_key(base) == stage2_model_key(load_config(None, ["stage2.guidance_scale=2"]))
    assert stage2_model_key(base) != stage2_model_key(load_config(None, ["stage2.duration_kimg=3"]))


def test_encoder_resume_key_ignores_schedule_fields():
    a = load_config(None).encoder
    b = load_config(None, ["encoder.checkpoint_every=3", "encoder.log_every=2"]).encoder
    c = load_config(None, ["encoder.temperature=0.5"]).encoder
    assert encoder_resume_key(a, (1, 8, 8), 10, 0) == encoder_resume_key(b, (1, 8, 8), 10, 0)
    assert encoder_resume_key(a, (1, 8, 8), 10, 0) != encoder_resume_key(c, (1, 8, 8), 10, 0)


def test_a_setting_keeps_its_default():
    assert Stage2Config().steps == 20 and Stage1Config().log_every == 50
    assert dataclasses.fields(Stage2Config)[0].metadata.get("role", TRAINING) == TRAINING
    assert setting(3, SAMPLING).metadata["role"] == SAMPLING


def test_each_stage_declares_its_inputs(tmp_path):
    """What a stage reads besides the config: upstream files by content ("missing" until written), the dataset."""
    from dualpseudo.artifacts import file_hash

    up = Upstream(dataset="fp", labels_known=True, split="idx", encoder=tmp_path / "encoder.safetensors",
                  stage1=tmp_path / "stage1", labels=tmp_path / "labels", stage2=tmp_path / "stage2",
                  stage3=tmp_path / "stage3")
    cfg = load_config(None)
    assert STAGE1.input_hashes(cfg, up) == {"dataset": "fp"}
    assert STAGE2.input_hashes(cfg, up) == {"pseudo_labels": "missing"}
    assert STAGE3.input_hashes(cfg, up) == {"pseudo_images": "missing", "split": "missing"}
    assert STAGE3_BASELINE.input_hashes(cfg, up) == {"split": "missing", "stage1_labels": "missing"}
    assert EVALUATION.input_hashes(cfg, up) == {"pseudo_images": "missing"}
    assert EVALUATION.input_hashes(cfg, dataclasses.replace(up, labels_known=False)) == {
        "pseudo_images": "missing", "stage3": "missing"}           # a pool is judged by stage 3's classifier
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "pseudo_labels.npz").write_bytes(b"labels")
    assert STAGE2.input_hashes(cfg, up) == {"pseudo_labels": file_hash(tmp_path / "labels" / "pseudo_labels.npz")}
    assert STAGE2.input_hashes(load_config(None, ["stage2.label_source=true"]), up) == {"dataset": "fp"}
    graph = load_config(None, ["stage1.learner=label-propagation", "linear_probe.encoder=ssl"])
    assert STAGE1.input_hashes(graph, up) == {"dataset": "fp", "encoder": "missing"}
    assert STAGE1.input_hashes(load_config(None, ["data.labeled_indices=x.json"]), up) == {
        "dataset": "fp", "labeled_indices": "idx"}
    assert ENCODER_DECL.input_hashes(graph, up) == {"dataset": "fp"}


def test_keyed_caches_derive_their_keys_from_declarations():
    """The latent cache and the evaluation oracle are keyed by what they read, and the dataset."""
    base = load_config(None)
    for decl, same, other in ((LATENTS, "stage2.lr=0.01", "latent.width=16"),
                              (ORACLE, "stage1.lr=0.01", "evaluation.oracle_iterations=7")):
        key = decl.config_hash(base, dataset="fp")
        assert decl.config_hash(load_config(None, [same]), dataset="fp") == key
        assert decl.config_hash(load_config(None, [other]), dataset="fp") != key
        assert decl.config_hash(base, dataset="other") != key
