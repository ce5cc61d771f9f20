"""What each stage reads from the config and what it writes, declared once; every key a stage is judged by
derives from its declaration.

A stage's `reads` names the config sections (or single values) it depends on. From it come:
- its manifest's config hash (`Declaration.config_hash`), so a stage is redone when one of them changes;
- the reset key of its resumable files (pipeline `_execute`: the config hash plus its inputs' hashes);
- its training loop's resume key, from the same sections restricted by the fields' roles (config.py: TRAINING,
  LENGTH, SCHEDULE, SAMPLING): a loop resumes a state whose TRAINING fields match, whatever its checkpoint/log
  intervals; stage 2 keeps its model while only SAMPLING fields change (`stage2_model_key`, `stage2_sampling_key`).
SCHEDULE fields (checkpoint and log intervals, inference batch sizes) enter none of these keys (`judged`), so
changing one re-runs nothing.

Adding a config field is therefore one line in config.py: its section is read by the stages that declare it, and
its role says which of their keys it enters. The upstream files a stage reads are its inputs (pipeline.py's
steps hash them by content); the files it writes are `writes`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Callable

from ..config import LENGTH, SAMPLING, TRAINING, ExperimentConfig, config_hash, fields_in_roles
from . import files
from .files import ENCODER, STATE, STATS


@dataclass(frozen=True)
class Declaration:
    """One stage: the config it reads and the files of its folder it writes."""
    name: str
    reads: Callable[[ExperimentConfig], dict]      # {name: config section or value} -> its config hash
    writes: tuple[str, ...]                         # hashed into its manifest
    resumable: tuple[str, ...] = (STATE, STATS)     # training state kept while its reset key matches

    def config_hash(self, cfg: ExperimentConfig, **extra) -> str:
        """The hash of everything the stage reads (plus `extra`, e.g. a content hash it is keyed by), SCHEDULE
        fields left out."""
        return config_hash({k: judged(v) for k, v in {**self.reads(cfg), **extra}.items()})


KEY_ROLES = (TRAINING, LENGTH, SAMPLING)        # the roles that enter a stage's keys (not SCHEDULE)


def judged(value):
    """What a stage's keys see of a value it reads: a config section without its SCHEDULE fields (a dict of the
    others), anything else as it is."""
    return fields_in_roles(value, *KEY_ROLES) if dataclasses.is_dataclass(value) else value


def runtime_part(cfg: ExperimentConfig) -> dict:
    """The runtime settings every training stage depends on."""
    return {"seed": cfg.runtime.seed, "precision": cfg.runtime.precision}


def feature_sections(cfg: ExperimentConfig, learner: str) -> dict:
    """The config sections a feature learner depends on (none for the network learners)."""
    if learner == "linear-probe":
        return {"linear_probe": cfg.linear_probe}
    if learner == "label-propagation":
        return {"linear_probe": cfg.linear_probe, "graph": cfg.graph}
    return {}


def stage3_feature_sections(cfg: ExperimentConfig) -> dict:
    """Stage 3's feature sections: stage 1's (it reuses stage 1's feature cache), its own mode's, and the judge's
    when pseudo-images are filtered by agreement."""
    return {**feature_sections(cfg, cfg.stage1.learner), **feature_sections(cfg, cfg.stage3.mode),
            **({"linear_probe": cfg.linear_probe} if cfg.stage3.filter == "agree" else {})}


def _stage2_reads(cfg: ExperimentConfig) -> dict:
    latent = {"latent": cfg.latent} if cfg.latent.autoencoder != "none" else {}
    return {"stage2": cfg.stage2, "hflip": cfg.data.hflip, **runtime_part(cfg), **latent}


# The feature-learner settings enter a stage's hash only where they are used, so other runs keep their hashes.
ENCODER_DECL = Declaration("encoder", lambda cfg: {"encoder": cfg.encoder, "hflip": cfg.data.hflip,
                                                   "precision": cfg.runtime.precision}, (ENCODER,), resumable=())
STAGE1 = Declaration("stage1", lambda cfg: {"data": cfg.data, "stage1": cfg.stage1, **runtime_part(cfg),
                                            **feature_sections(cfg, cfg.stage1.learner)}, files.STAGE1_OUTPUTS)
STAGE2 = Declaration("stage2", _stage2_reads, files.STAGE2_OUTPUTS, resumable=())   # (its own keys, below)
# `stage3.baseline` says which steps exist, not how one runs: a baseline step reads its config with
# pseudo_source=real, the same stage3 settings otherwise.
STAGE3 = Declaration("stage3", lambda cfg: {"stage3": replace(cfg.stage3, baseline=False), "stage1": cfg.stage1,
                                            "hflip": cfg.data.hflip, **runtime_part(cfg),
                                            **stage3_feature_sections(cfg)}, files.STAGE3_OUTPUTS)
EVALUATION = Declaration("evaluation", lambda cfg: {"evaluation": cfg.evaluation}, files.EVALUATION_OUTPUTS,
                         resumable=())

MODEL_ROLES = (TRAINING, LENGTH)     # what the diffusion model's files depend on (not SAMPLING nor SCHEDULE)


def stage2_model_key(cfg: ExperimentConfig) -> dict:
    """Stage 2's declaration without its SAMPLING fields: the key of the trained model's files (the caller adds
    the hashes of the labels and images it trains on)."""
    parts = _stage2_reads(cfg)
    s2 = parts.pop("stage2")
    return {"stage2_train": config_hash(fields_in_roles(s2, *MODEL_ROLES)),
            **{k: config_hash(judged(v)) if dataclasses.is_dataclass(v) else v for k, v in parts.items()}}


def stage2_sampling_key(cfg: ExperimentConfig, model_key: dict) -> dict:
    """The key of the generated chunks: the model's key and stage 2's SAMPLING fields."""
    return {"model": model_key, **fields_in_roles(cfg.stage2, SAMPLING)}
