"""The steps of a DPT run: which stages a command needs, in order, each with its config hash, its inputs and
its outputs (from its declaration in declare.py), and how it runs.

`build_steps` checks what can be checked before any training (networks, image geometry, files the config names,
the labeled split) and returns the steps of every round: the encoder when a learner reads it, stage 1 once, then
stages 2, 3 (and the self-training baseline) and the evaluation per round, round r > 1 training its generator on
round r-1's stage-3 pseudo-labels. `plan` says which of them will run. pipeline.py runs them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..artifacts import array_hash
from ..manifest import stage_status
from ..config import ConfigError, ExperimentConfig
from ..data.datasets import Dataset, DataError
from ..data.splits import labeled_split, read_indices
from ..distributed import LOCAL, World
from ..rundir import RunDir
from .checks import check_run
from .declare import (ENCODER_DECL, EVALUATION, STAGE1, STAGE2, STAGE3, STAGE3_BASELINE, Declaration, Upstream,
                      baseline_config, feature_sections, needs_encoder)
from .encoder import check_feature_settings, encoder_key, ensure_encoder
from .files import ENCODER, FEATURES, STATE, STATS, Metrics

ALL_STAGES = ("stage1", "stage2", "stage3", "evaluation")  # (+ "encoder" before stage 1 when a learner needs it)


@dataclass
class Step:
    """One stage of one round; its hash, outputs and resumable files come from its declaration (declare.py)."""
    name: str                              # e.g. "stage2" or "round2/stage2"
    dir: Path
    config_hash: str
    inputs: Callable[[], dict[str, str]]   # hashes of the upstream files it reads (valid once upstream is done)
    outputs: tuple[str, ...]               # the files of `dir` it writes, hashed into its manifest
    run: Callable[[], dict]                # runs it -> the summary for its manifest
    resumable: tuple[str, ...] = (STATE, STATS)  # training state, dropped when hashes change
    legacy_hash: str = ""                  # the hash run-directory schema 1 gave it (pipeline.carry_over)

    @classmethod
    def declared(cls, decl: Declaration, cfg: ExperimentConfig, name: str, dir: Path, up: Upstream,
                 run: Callable[[], dict]) -> "Step":
        """The step of `decl` for `cfg`: the config and inputs it reads (upstream files where `up` says), the files
        it writes."""
        return cls(name, dir, decl.config_hash(cfg), lambda: decl.input_hashes(cfg, up), decl.writes, run,
                   decl.resumable, decl.legacy_hash(cfg))


# ---------------------------------------------------------------------------------------------- the steps
def labeled_indices(cfg: ExperimentConfig, ds: Dataset) -> tuple[np.ndarray, str]:
    if cfg.data.labeled_indices:
        try:
            idx = read_indices(cfg.data.labeled_indices, len(ds.train_labels))
            if (ds.train_labels[idx] < 0).any():
                raise DataError(f"{cfg.data.labeled_indices}: index {int(idx[ds.train_labels[idx] < 0][0])} is an "
                                f"image without a label in data.labels_file")
            empty = [c for c in range(ds.num_classes) if not (ds.train_labels[idx] == c).any()]
            if empty:
                raise DataError(f"{cfg.data.labeled_indices} labels no image of class {empty[0]} "
                                f"({ds.class_names[empty[0]]}); every class needs at least one labeled image")
            return idx, f"file:{cfg.data.labeled_indices}"
        except DataError as e:                    # a file that is there but wrong: the config's key names it
            if Path(cfg.data.labeled_indices).expanduser().is_file():
                raise ConfigError(f"data.labeled_indices: {e}") from None
            raise
    if not ds.train_labels_known and cfg.stage2.label_source == "true":
        raise ConfigError("stage2.label_source: 'true' trains on every image's true class, which a pool of "
                          "unlabeled images does not have; use 'pseudo' (DPT) or 'none'")
    if cfg.data.labels_per_class == 0 and ds.train_labels_known:
        raise ConfigError("data.labels_per_class: 0 (every labeled image) applies to data.name=pool only; "
                          "give the number of labeled images per class")
    idx = labeled_split(ds.train_labels, ds.num_classes, cfg.data.labels_per_class, cfg.data.split_seed)
    if cfg.data.labels_per_class == 0:
        return idx, f"every labeled image of {cfg.data.labels_file}"
    return idx, f"{cfg.data.labels_per_class} per class, seed {cfg.data.split_seed}"


@dataclass(frozen=True)
class _Plan:
    """What the steps of one plan share."""
    cfg: ExperimentConfig
    run: RunDir
    ds: Dataset
    device: object
    world: World
    idx: np.ndarray                  # the labeled split
    source: str                      # how it was chosen (split.json's `source`)

    @property
    def encoder_file(self) -> Path | None:
        """The run's self-supervised encoder, when a learner reads its features."""
        return self.run.encoder / ENCODER if needs_encoder(self.cfg) else None

    @property
    def stage1_features(self) -> Path | None:
        """Stage 1's cache of the real images' features, shared with stage 3 (feature learners only)."""
        return self.run.stage1 / FEATURES if feature_sections(self.cfg, self.cfg.stage1.learner) else None

    def upstream(self, r: int = 1) -> Upstream:
        """Where round `r`'s steps find their upstream files (stage 2 trains on the newest classifier's labels)."""
        run = self.run
        return Upstream(dataset=self.ds.fingerprint, labels_known=self.ds.train_labels_known,
                        split=array_hash(self.idx), encoder=run.encoder / ENCODER, stage1=run.stage1,
                        labels=run.stage1 if r == 1 else run.stage("stage3", r - 1),
                        stage2=run.stage("stage2", r), stage3=run.stage("stage3", r))


def build_steps(cfg: ExperimentConfig, run: RunDir, ds: Dataset, stages: tuple[str, ...], device,
                world: World = LOCAL) -> list[Step]:
    """The steps needed for `stages`, upstream ones included, in order; they run on `world`'s processes."""
    last = max(ALL_STAGES.index(s) for s in stages)
    rounds = cfg.rounds if stages == ALL_STAGES else 1
    unconditional = cfg.stage2.label_source == "none"     # the unconditional reference generator has no stage 3
    if unconditional and stages == ("stage3",):
        raise ConfigError("stage 3 needs class-conditional pseudo-images, but stage2.label_source=none trains the "
                          "unconditional reference generator; evaluate it with `dualpseudo eval`")
    if unconditional:
        rounds = 1
    if "evaluation" in stages:                            # fail before hours of training, not after them
        from .evaluation import check_oracle_network
        check_oracle_network(cfg.evaluation.oracle_network)
    check_feature_settings(cfg, ds)
    check_run(cfg, ds, stages)                            # networks, image geometry, files the config names
    idx, source = labeled_indices(cfg, ds)
    p = _Plan(cfg, run, ds, device, world, idx, source)
    steps = ([_encoder_step(p)] if p.encoder_file else []) + [_stage1_step(p)]
    if last < 1:
        return steps
    # stage 3 with real pseudo-labeled images (the self-training baseline) reads no pseudo-images: stage 2 runs
    # only when asked for (or for the evaluation, which judges them)
    no_generator = last == 2 and "stage2" not in stages and cfg.stage3.pseudo_source == "real"
    for r in range(1, rounds + 1):
        if not no_generator:
            steps.append(_stage2_step(p, r))
        if last >= 2 and not unconditional:
            steps.append(_stage3_step(p, r))
            if cfg.stage3.baseline and cfg.stage3.pseudo_source != "real":
                steps.append(_baseline_step(p, r))
        if last >= 3:
            steps.append(_evaluation_step(p, r))
    return steps


def _encoder_step(p: _Plan) -> Step:
    """The self-supervised encoder, shared across runs (stages/encoder.py): keyed by the dataset too."""
    d = p.run.encoder
    step = Step.declared(ENCODER_DECL, p.cfg, "encoder", d, p.upstream(),
                         lambda: ensure_encoder(p.cfg, p.ds, d, p.device, world=p.world))
    return replace(step, config_hash=encoder_key(p.cfg, p.ds),       # its shared cache key
                   legacy_hash=encoder_key(p.cfg, p.ds, legacy=True))


def _stage1_step(p: _Plan) -> Step:
    from .pseudo_labels import run_stage1

    def run() -> dict:
        return Metrics(run_stage1(p.cfg, p.ds, p.idx, p.source, p.run.stage1, p.device, world=p.world,
                                  encoder_file=p.encoder_file)).classifier_summary()

    return Step.declared(STAGE1, p.cfg, "stage1", p.run.stage1, p.upstream(), run)


def _stage2_step(p: _Plan, r: int) -> Step:
    """Round `r`'s diffusion model, trained on the newest classifier's pseudo-labels."""
    from .pseudo_images import run_stage2

    cfg, up = p.cfg, p.upstream(r)
    labels_dir = up.labels if cfg.stage2.label_source == "pseudo" else None
    return Step.declared(STAGE2, cfg, f"{_tag(r)}stage2", up.stage2, up,
                         lambda: run_stage2(cfg, p.ds, labels_dir, up.stage2, p.device, world=p.world))


def _stage3_step(p: _Plan, r: int) -> Step:
    """Round `r`'s retraining on real data plus that round's pseudo-images."""
    return _retrain_step(p, STAGE3, p.cfg, f"{_tag(r)}stage3", p.run.stage("stage3", r), r)


def _baseline_step(p: _Plan, r: int) -> Step:
    """Stage 3 again with K real pseudo-labeled images per class instead of generated ones (self-training)."""
    return _retrain_step(p, STAGE3_BASELINE, baseline_config(p.cfg), f"{_tag(r)}stage3-baseline",
                         p.run.stage("stage3_baseline", r), r)


def _retrain_step(p: _Plan, decl: Declaration, run_cfg: ExperimentConfig, name: str, out: Path, r: int) -> Step:
    """A stage-3 step of round `r` writing `out`, run with the config `run_cfg`."""
    up = p.upstream(r)

    def run() -> dict:
        from .retrain import run_stage3
        return Metrics(run_stage3(run_cfg, p.ds, p.idx, up.stage2, out, p.device, _stage1_top1(p.run.stage1),
                                  world=p.world, feature_cache=p.stage1_features, encoder_file=p.encoder_file,
                                  stage1=p.run.stage1)).classifier_summary()

    return Step.declared(decl, p.cfg, name, out, up, run)


def _evaluation_step(p: _Plan, r: int) -> Step:
    """Round `r`'s evaluation of the pseudo-images (rank 0 alone)."""
    up, de = p.upstream(r), p.run.stage("evaluation", r)

    def run() -> dict:
        from .evaluation import run_evaluation
        if not p.world.is_main:                         # evaluation runs on rank 0 alone
            return {}
        return Metrics(run_evaluation(p.cfg, p.ds, up.stage2, de, p.device)).evaluation_summary()

    return Step.declared(EVALUATION, p.cfg, f"{_tag(r)}evaluation", de, up, run)


def _tag(r: int) -> str:
    return "" if r == 1 else f"round{r}/"


def _stage1_top1(s1: Path) -> float | None:
    return Metrics.read(s1).test_top1


def plan(steps: list[Step]) -> list[tuple[str, str]]:
    """(step, what will happen) for each step; a step after one that runs will run too."""
    out, upstream_runs = [], False
    for s in steps:
        done, why = stage_status(s.dir, s.config_hash, s.inputs())
        if done and not upstream_runs:
            out.append((s.name, "reuse (done, hashes match)"))
        else:
            out.append((s.name, f"run ({why})" if not done else "run (an upstream stage re-runs)"))
            upstream_runs = True
    return out
