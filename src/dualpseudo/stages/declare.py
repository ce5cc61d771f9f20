"""What each stage reads from the config and what it writes, declared once; every key a stage is judged by
derives from its declaration.

A stage's `reads` names the config sections (or single values) it depends on. From it come:
- its manifest's config hash (`Declaration.config_hash`), so a stage is redone when one of them changes;
- the reset key of its resumable files (pipeline `_execute`: the config hash plus its inputs' hashes);
- its training loop's resume key, from the same sections restricted by the fields' roles (config.py: TRAINING,
  LENGTH, SCHEDULE, SAMPLING): a loop resumes a state whose TRAINING fields match, whatever its checkpoint/log
  intervals; stage 2 keeps its model while only SAMPLING fields change (`stage2_model_key`, `stage2_sampling_key`).
SCHEDULE fields (checkpoint and log intervals, inference batch sizes) enter none of these keys (`judged`), so
changing one re-runs nothing. A LOCATION field (`evaluation.cache_dir`) enters them at its default value: moving
the cache re-runs nothing, and the keys of run directories made while it entered them as set stay as they were
for the default.

Adding a config field is therefore one line in config.py: its section is read by the stages that declare it, and
its role says which of their keys it enters.

A stage's `inputs` names what else it reads, hashed by content into its manifest: the upstream files of the run
directory (where they are for a given step and round: `Upstream`, which the pipeline fills), the dataset's
fingerprint, and the files the config names by path (`named_file_inputs`), so replacing one in place re-runs the
stages that read it. The files it writes are `writes`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..artifacts import file_hash
from ..config import (LENGTH, LOCATION, SAMPLING, SCHEDULE, TRAINING, ExperimentConfig, Stage1Config, config_hash,
                      fields_in_roles)
from ..diffuse.latent import AE_STATE, AUTOENCODER
from ..diffuse.latent import LATENTS as LATENTS_FILE
from . import files
from .files import CLASSIFIER, ENCODER, PSEUDO_IMAGES, PSEUDO_LABELS, SPLIT, STATE, STATS

FEATURE_LEARNERS = ("linear-probe", "label-propagation")


@dataclass(frozen=True)
class Upstream:
    """What one step's inputs are hashed from: the dataset and where its upstream files are (for its round)."""
    dataset: str                 # the dataset's fingerprint
    labels_known: bool           # every training image has its true class (False: a pool of unlabeled images)
    split: str                   # content hash of the labeled indices
    encoder: Path                # the run's self-supervised encoder file (read when `needs_encoder`)
    stage1: Path                 # stage 1's folder
    labels: Path                 # the pseudo-labels' folder stage 2 trains on (stage 1, or round r-1's stage 3)
    stage2: Path                 # this round's stage-2 folder
    stage3: Path                 # this round's stage-3 folder


def _no_inputs(cfg: ExperimentConfig, up: Upstream) -> dict:
    return {}


@dataclass(frozen=True)
class Declaration:
    """One stage (or keyed cache): the config it reads, the files it writes, and the inputs it reads."""
    name: str
    reads: Callable[[ExperimentConfig], dict]      # {name: config section or value} -> its config hash
    writes: tuple[str, ...]                         # hashed into its manifest
    inputs: Callable[[ExperimentConfig, Upstream], dict[str, Path | str]] = _no_inputs  # a Path: by content
    resumable: tuple[str, ...] = (STATE, STATS)     # training state kept while its reset key matches

    def config_hash(self, cfg: ExperimentConfig, **extra) -> str:
        """The hash of everything the stage reads (plus `extra`, e.g. a content hash it is keyed by), SCHEDULE
        fields left out."""
        return config_hash({k: judged(v) for k, v in {**self.reads(cfg), **extra}.items()})

    def legacy_hash(self, cfg: ExperimentConfig, **extra) -> str:
        """The hash run-directory schema 1 gave the same reads (SCHEDULE fields included), by which
        `pipeline.carry_over` recognises a stage an earlier version finished."""
        return config_hash({**self.reads(cfg), **extra})

    def input_hashes(self, cfg: ExperimentConfig, up: Upstream) -> dict[str, str]:
        """{input: content hash} of what the stage reads besides the config ("missing" for an absent file; valid
        once the upstream steps are done)."""
        return {k: hash_or_missing(v) if isinstance(v, Path) else v for k, v in self.inputs(cfg, up).items()}


KEY_ROLES = (TRAINING, LENGTH, SAMPLING, LOCATION)   # the roles that enter a stage's keys (not SCHEDULE)


def judged(value):
    """What a stage's keys see of a value it reads: a config section without its SCHEDULE fields and with its
    LOCATION fields at their defaults (a dict), anything else as it is."""
    if not dataclasses.is_dataclass(value):
        return value
    seen = fields_in_roles(value, *KEY_ROLES)
    defaults = {f.name: f.default for f in dataclasses.fields(value) if f.metadata.get("role") == LOCATION}
    return {k: defaults.get(k, v) for k, v in seen.items()}


def stage3_reads_features(cfg: ExperimentConfig) -> bool:
    """True when stage 3 reads `linear_probe` features: a feature learner, or the agreement judge."""
    return cfg.stage3.mode in FEATURE_LEARNERS or cfg.stage3.judges


def needs_encoder(cfg: ExperimentConfig) -> bool:
    """True when a stage's learner reads features of the run's self-supervised encoder."""
    uses_features = cfg.stage1.learner in FEATURE_LEARNERS or stage3_reads_features(cfg)
    return (uses_features and cfg.linear_probe.encoder == "ssl") or cfg.stage1.init == "encoder"


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
            **({"linear_probe": cfg.linear_probe} if cfg.stage3.judges else {})}


def _stage2_reads(cfg: ExperimentConfig) -> dict:
    latent = {"latent": cfg.latent} if cfg.latent.autoencoder != "none" else {}
    return {"stage2": cfg.stage2, "hflip": cfg.data.hflip, **runtime_part(cfg), **latent}


def baseline_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config of the self-training baseline step: stage 3 with K real pseudo-labeled images per class."""
    return replace(cfg, stage3=replace(cfg.stage3, baseline=False, pseudo_source="real"))


# ---------------------------------------------------------------------------------------------- inputs
def _encoder_input(cfg: ExperimentConfig, up: Upstream) -> dict:
    return {"encoder": up.encoder} if needs_encoder(cfg) else {}


def _stage1_inputs(cfg: ExperimentConfig, up: Upstream) -> dict:
    # an index file enters by content: editing it in place re-runs stage 1 and what follows
    return {"dataset": up.dataset, **_encoder_input(cfg, up),
            **({"labeled_indices": up.split} if cfg.data.labeled_indices else {}), **named_file_inputs(cfg, "stage1")}


def _stage2_inputs(cfg: ExperimentConfig, up: Upstream) -> dict:
    labels = ({"pseudo_labels": up.labels / PSEUDO_LABELS} if cfg.stage2.label_source == "pseudo"
              else {"dataset": up.dataset})
    return {**labels, **named_file_inputs(cfg, "stage2")}


def _stage3_inputs(cfg: ExperimentConfig, up: Upstream) -> dict:
    """Stage 3's inputs; with `pseudo_source: real` (the self-training baseline) it reads no pseudo-images."""
    generated = cfg.stage3.pseudo_source != "real"
    return {**({"pseudo_images": up.stage2 / PSEUDO_IMAGES} if generated else {}), "split": up.stage1 / SPLIT,
            **_encoder_input(cfg, up),
            **({"stage1_labels": up.stage1 / PSEUDO_LABELS} if cfg.stage3.pseudo_source != "generated" else {}),
            **named_file_inputs(cfg, "stage3")}


def _evaluation_inputs(cfg: ExperimentConfig, up: Upstream) -> dict:
    return {"pseudo_images": up.stage2 / PSEUDO_IMAGES, **named_file_inputs(cfg, "evaluation"),
            # a pool is judged by stage 3's classifier (no oracle)
            **({} if up.labels_known else {"stage3": up.stage3 / CLASSIFIER})}


# ---------------------------------------------------------------------------------------------- the stages
# The feature-learner settings enter a stage's hash only where they are used, so other runs keep their hashes.
ENCODER_DECL = Declaration("encoder", lambda cfg: {"encoder": cfg.encoder, "hflip": cfg.data.hflip,
                                                   "precision": cfg.runtime.precision},
                           writes=(ENCODER,), inputs=lambda cfg, up: {"dataset": up.dataset}, resumable=())
STAGE1 = Declaration("stage1", lambda cfg: {"data": cfg.data, "stage1": cfg.stage1, **runtime_part(cfg),
                                            **feature_sections(cfg, cfg.stage1.learner)},
                     writes=files.STAGE1_OUTPUTS, inputs=_stage1_inputs)
STAGE2 = Declaration("stage2", _stage2_reads, writes=files.STAGE2_OUTPUTS, inputs=_stage2_inputs,
                     resumable=())                 # (its own keys, below)
# `stage3.baseline` says which steps exist, not how one runs: a baseline step reads its config with
# pseudo_source=real, the same stage3 settings otherwise.
STAGE3 = Declaration("stage3", lambda cfg: {"stage3": replace(cfg.stage3, baseline=False), "stage1": cfg.stage1,
                                            "hflip": cfg.data.hflip, **runtime_part(cfg),
                                            **stage3_feature_sections(cfg)},
                     writes=files.STAGE3_OUTPUTS, inputs=_stage3_inputs)
STAGE3_BASELINE = Declaration("stage3-baseline", lambda cfg: STAGE3.reads(baseline_config(cfg)),
                              writes=files.STAGE3_OUTPUTS,
                              inputs=lambda cfg, up: _stage3_inputs(baseline_config(cfg), up))
EVALUATION = Declaration("evaluation", lambda cfg: {"evaluation": cfg.evaluation}, writes=files.EVALUATION_OUTPUTS,
                         inputs=_evaluation_inputs, resumable=())

# Keyed caches: no manifest; their key is `config_hash(cfg, dataset=<fingerprint>)` (a new key, a new file).
LATENTS = Declaration("latents", lambda cfg: {"latent": cfg.latent, "seed": cfg.runtime.seed},
                      writes=(AUTOENCODER, LATENTS_FILE), resumable=(AE_STATE,))   # in stage 2's folder
ORACLE = Declaration("oracle", lambda cfg: {"oracle": oracle_config(cfg), "hflip": cfg.data.hflip,
                                            "precision": cfg.runtime.precision},
                     writes=(CLASSIFIER,))                        # in evaluation.cache_dir/oracle-<key>/


def oracle_config(cfg: ExperimentConfig) -> Stage1Config:
    """The evaluation oracle's training: supervised, on every labeled training image."""
    return Stage1Config(learner="supervised", network=cfg.evaluation.oracle_network,
                        iterations=cfg.evaluation.oracle_iterations, batch_size=128, uratio=0, lr=0.03,
                        checkpoint_every=max(1, cfg.evaluation.oracle_iterations // 4), log_every=50)


MODEL_ROLES = (TRAINING, LENGTH)     # what the diffusion model's files depend on (not SAMPLING nor SCHEDULE)


def stage2_model_key(cfg: ExperimentConfig, schema1: bool = False) -> dict:
    """Stage 2's declaration without its SAMPLING fields: the key of the trained model's files (the caller adds
    the hashes of the labels and images it trains on). `schema1`: the key run-directory schema 1 gave the same
    model (SCHEDULE fields included), by which `pseudo_images` keeps a model an earlier version trained."""
    parts = _stage2_reads(cfg)
    s2 = parts.pop("stage2")
    roles, seen = ((*MODEL_ROLES, SCHEDULE), lambda v: v) if schema1 else (MODEL_ROLES, judged)
    return {"stage2_train": config_hash(fields_in_roles(s2, *roles)),
            **{k: config_hash(seen(v)) if dataclasses.is_dataclass(v) else v for k, v in parts.items()}}


def stage2_sampling_key(cfg: ExperimentConfig, model_key: dict) -> dict:
    """The key of the generated chunks: the model's key and stage 2's SAMPLING fields."""
    return {"model": model_key, **fields_in_roles(cfg.stage2, SAMPLING)}


# ---------------------------------------------------------------------------------------------- named files
_HASHES: dict[tuple, str] = {}


def content_hash(path: Path) -> str:
    """`file_hash` of a file, remembered for its (path, size, modification time) within this process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_hash(path)
    return _HASHES[key]


def hash_or_missing(path: Path) -> str:
    """A file's `content_hash`, or "missing"."""
    return content_hash(path) if path.is_file() else "missing"


def named_file_inputs(cfg: ExperimentConfig, step: str) -> dict[str, str]:
    """Content hashes of the files named by the config that `step` ("stage1", "stage2", "stage3",
    "evaluation") reads, for its manifest inputs; {} when it reads none (so other runs keep their hashes)."""
    out: dict[str, str] = {}
    lp = cfg.linear_probe
    probe_used = {"stage1": cfg.stage1.learner in FEATURE_LEARNERS,
                  "stage3": stage3_reads_features(cfg)
                  or cfg.stage1.learner in FEATURE_LEARNERS and cfg.stage3.mode == "ssl"}.get(step, False)
    if probe_used and lp.encoder in ("torchscript", "inception") and lp.encoder_path:
        out["encoder_file"] = hash_or_missing(Path(lp.encoder_path).expanduser())
    if step == "stage2" and cfg.latent.autoencoder == "sd" and cfg.latent.autoencoder_path:
        from ..diffuse.latent import SD_FILES
        root = Path(cfg.latent.autoencoder_path).expanduser()
        out["autoencoder"] = ",".join(hash_or_missing(root / f) for f in SD_FILES)
    if step == "evaluation" and cfg.evaluation.fid and cfg.evaluation.inception_path:
        out["inception"] = hash_or_missing(Path(cfg.evaluation.inception_path).expanduser())
    return out
