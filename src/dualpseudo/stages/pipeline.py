"""The DPT pipeline: plan the stages, reuse the finished ones, run the rest, resume the interrupted one.

A step is done when its manifest matches its config hash (of what its declaration in declare.py reads) and the
hashes of its inputs (the upstream files it reads), so changing a stage-2 setting re-runs stages 2 and 3 and keeps
stage 1. Rounds after the first repeat
stages 2-3 with the newest classifier's pseudo-labels (`rounds: N`, beyond the paper).

Under a data-parallel launch (`accelerate launch` / `torchrun`) every process runs every step: `main` joins the
process group and gives its `World` to every step; rank 0 decides what runs, writes the manifests and the
report, and the others wait at barriers. A training state or artifact of a step's own folder that fails to load
is reported, deleted and rebuilt once (`_run_step`). The files the steps exchange are `files.py`'s; the commands
that work on a run directory afterwards (sample, eval, report) are `commands.py`'s.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from .. import __version__, distributed, runtime
from ..artifacts import (SCHEMA_CHANGES, SCHEMA_VERSION, ArtifactError, array_hash, manifest_schemas,
                         reset_if_stale, stage_status, write_json, write_manifest, write_text)
from ..config import ConfigError, ExperimentConfig, from_dict, load_config, to_dict, to_yaml
from ..data.datasets import Dataset, DataError, DataMissingError, load_dataset
from ..data.splits import labeled_split, read_indices
from ..distributed import LOCAL, World
from ..rundir import RunDir, RunDirError
from ..rundir import lock as lock_run_dir
from . import files
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

    @classmethod
    def declared(cls, decl: Declaration, cfg: ExperimentConfig, name: str, dir: Path, up: Upstream,
                 run: Callable[[], dict]) -> "Step":
        """The step of `decl` for `cfg`: the config and inputs it reads (upstream files where `up` says), the files
        it writes."""
        return cls(name, dir, decl.config_hash(cfg), lambda: decl.input_hashes(cfg, up), decl.writes, run,
                   decl.resumable)


# ---------------------------------------------------------------------------------------------- run directory
def check_run_dir(cfg: ExperimentConfig, run: RunDir, force: bool) -> None:
    """Refuse a run directory made by a different config unless `force`."""
    if not run.config.is_file():
        return
    try:
        old = yaml.safe_load(run.config.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as e:
        raise _damaged_config(run, f"not valid YAML ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(old, dict):
        raise _damaged_config(run, "empty" if old is None else f"a YAML {type(old).__name__}, not a config")
    try:                                   # keys added to the config since, at their defaults, are no change
        old = to_dict(from_dict(old))
    except ConfigError:
        pass
    new = to_dict(cfg)
    changed = sorted(_diff(old, new))
    if changed and not force:
        shown = ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")
        raise RunDirError(f"run directory {run.root} was made by a different config (changed: {shown}); "
                          f"use a new --run-dir, or --force to re-run the stages these keys affect")


def check_schema(run: RunDir, force: bool = False) -> None:
    """Refuse a run directory whose manifests another run-directory schema wrote (their hashes mean something
    else, so finished stages cannot be recognised) unless `force`, which re-runs its stages."""
    other = manifest_schemas(run.root)
    if not other or force:
        return
    version = max(other)
    why = (f"a newer dualpseudo (run-directory schema {version}; this version reads {SCHEMA_VERSION})"
           if version > SCHEMA_VERSION else
           f"an earlier dualpseudo (run-directory schema {version}; this version writes schema {SCHEMA_VERSION}, "
           f"whose {SCHEMA_CHANGES.get(SCHEMA_VERSION, 'hashes differ')})")
    raise RunDirError(f"run directory {run.root} was made by {why}, so its finished stages cannot be recognised; "
                      f"use a new --run-dir, or rerun `dualpseudo run CONFIG --run-dir {run.root} --force` to redo "
                      f"its stages there")


def _damaged_config(run: RunDir, what: str) -> RunDirError:
    return RunDirError(f"{run.config} is {what}; restore it, or delete it and rerun `dualpseudo run CONFIG "
                       f"--run-dir {run.root}` with the run's config (finished stages whose hashes match are reused)")


def _lock(run: RunDir, world: World) -> bool:
    """Rank 0 takes the run directory's lock for this command (RunDirError on every rank when another process
    holds it); True when held (False: a read-only directory without a lock file)."""
    held, err = False, None
    if world.is_main:
        try:
            held = lock_run_dir(run.root)
        except RunDirError as e:
            err = str(e)
    err = world.broadcast(err)
    if err:
        raise RunDirError(err)
    return held


def _diff(old: dict, new: dict, prefix: str = "") -> set[str]:
    out = set()
    for k in set(old) | set(new):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out |= _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.add(prefix + k)
    return out


def _write_env(run: RunDir, device: str) -> None:
    import torch

    write_json(run.env, {"dualpseudo": __version__, "python": platform.python_version(), "torch": torch.__version__,
                         "numpy": np.__version__, "platform": platform.platform(), "device": device,
                         "threads": torch.get_num_threads(), "command": sys.argv})


def load_run_config(run: RunDir) -> ExperimentConfig:
    if not run.config.is_file():
        raise RunDirError(f"{run.root} is not a run directory (no config.yaml); run `dualpseudo run CONFIG --run-dir {run.root}` first")
    try:
        return load_config(run.config)
    except ConfigError as e:
        raise _damaged_config(run, f"damaged ({e})") from None


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
    for r in range(1, rounds + 1):
        steps.append(_stage2_step(p, r))
        if last >= 2 and not unconditional:
            steps.append(_stage3_step(p, r))
            if cfg.stage3.baseline and cfg.stage3.pseudo_source == "generated":
                steps.append(_baseline_step(p, r))
        if last >= 3:
            steps.append(_evaluation_step(p, r))
    return steps


def _encoder_step(p: _Plan) -> Step:
    """The self-supervised encoder, shared across runs (stages/encoder.py): keyed by the dataset too."""
    d = p.run.encoder
    step = Step.declared(ENCODER_DECL, p.cfg, "encoder", d, p.upstream(),
                         lambda: ensure_encoder(p.cfg, p.ds, d, p.device, world=p.world))
    return replace(step, config_hash=encoder_key(p.cfg, p.ds))       # its shared cache key


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


# ---------------------------------------------------------------------------------------------- running
def main(config_path: str, overrides: list[str], run_root: Path, stages: tuple[str, ...] = ALL_STAGES,
         force: bool = False, dry_run: bool = False) -> int:
    """`dualpseudo run|stage1|stage2|stage3`: returns the process exit code."""
    cfg = load_config(config_path, overrides)
    run = RunDir(run_root)
    check_run_dir(cfg, run, force)
    check_schema(run, force)
    if dry_run:
        return _dry_run(cfg, run, stages)
    runtime.resolve_device(cfg.runtime.device)          # an absent device fails here, before the data is read
    from .checks import missing_files
    lacking = missing_files(cfg, stages)                # a file read only after hours of training fails now
    if lacking:
        raise ConfigError(lacking[0])
    ds = load_dataset(cfg.data, cfg.evaluation.cache_dir)
    device = runtime.setup(cfg.runtime)
    world, device = distributed.init(device)            # this process's place in a launch, given to every step
    locked = _lock(run, world)                          # one run per directory, held until the command ends
    steps = build_steps(cfg, run, ds, stages, device, world)
    say = (lambda msg: print(msg, flush=True)) if world.is_main else (lambda msg: None)
    if world.is_main:
        _prepare(run, cfg, locked)
    world.barrier()
    for s in steps:
        _execute(s, run, world, device, say)
    if stages == ALL_STAGES and world.is_main:
        from ..report import write_report
        print(f"report: {write_report(run)}")
    world.barrier()
    return 0


def _prepare(run: RunDir, cfg: ExperimentConfig, locked: bool) -> None:
    """Create the run directory, drop temp files a killed writer left (never read), write the config."""
    run.root.mkdir(parents=True, exist_ok=True)
    for tmp in run.root.rglob(".*.tmp") if locked else ():
        try:
            tmp.unlink(missing_ok=True)
        except OSError:                                  # a read-only directory: they stay unread there
            pass
    write_text(run.config, to_yaml(cfg))                 # not rewritten when unchanged (read-only reuse)


def _execute(s: Step, run: RunDir, world: World, device, say: Callable[[str], None]) -> None:
    """Reuse a step whose manifest matches, else run it (resuming a matching training state) and record it."""
    inputs = s.inputs()
    done, why = world.broadcast(stage_status(s.dir, s.config_hash, inputs) if world.is_main else None)
    if done:
        say(f"[{s.name}] reused: done, hashes match")
        return
    say(f"[{s.name}] running ({why})")
    if world.is_main:
        _write_env(run, f"{device} x {world.size} processes" if world.distributed else str(device))
        s.dir.mkdir(parents=True, exist_ok=True)
        if s.resumable and reset_if_stale(s.dir, {"config": s.config_hash, "inputs": inputs}, s.resumable):
            say(f"[{s.name}] dropped a training state made with other settings")
    world.barrier()
    t0 = time.time()
    summary = _run_step(s, world)
    if world.is_main:
        write_manifest(s.dir, s.config_hash, inputs, list(s.outputs),
                       files.step_record(summary, wall_time_s=round(time.time() - t0, 1)))
    world.barrier()
    say(f"[{s.name}] done in {time.time() - t0:.0f}s: {json.dumps(summary, default=str)}")


def _dry_run(cfg: ExperimentConfig, run: RunDir, stages: tuple[str, ...]) -> int:
    """Print the resolved config and the plan; what this machine still lacks (device, dataset, files the config
    names) is listed in the plan with where it goes, not raised. Prints on rank 0 of a launch only."""
    import os

    import torch

    from .checks import missing_device, missing_files

    lacking = [why] if (why := missing_device(cfg)) else []
    try:
        ds = load_dataset(cfg.data, cfg.evaluation.cache_dir)
    except DataMissingError as e:                      # not there yet: the plan says where it goes
        ds = None
        lacking.append(f"data: {e}")
    absent = missing_files(cfg, stages)                # (a missing labeled-index file among them)
    steps = None
    if ds is not None:
        try:
            steps = build_steps(cfg, run, ds, stages, torch.device("cpu"))
        except DataError:
            if not absent:                             # bad data (not absent data) fails the dry run too
                raise
    lacking += absent
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    print(to_yaml(cfg))
    print(f"plan for {run.root}:")
    if steps is not None:
        for name, what in plan(steps):
            print(f"  {name:<22} {what}")
    else:
        last = max(ALL_STAGES.index(s) for s in stages)
        for name in (["encoder"] if needs_encoder(cfg) else []) + list(ALL_STAGES[:last + 1]):
            print(f"  {name:<22} run (once the data is there)")
    if lacking:
        print("missing on this machine:")
        for line in lacking:
            print(f"  - {line}")
    return 0


def _run_step(s: Step, world: World) -> dict:
    """Run a step; when one of its own files fails to load (an ArtifactError whose `path` is a file inside the
    step's folder: training state, snapshot, chunk...), delete that file and run the step again.

    An error about anything else or about no file in particular, or a second failure, propagates.
    """
    try:
        return s.run()
    except ArtifactError as e:
        bad = e.path
        if bad is None or not bad.is_file() or not bad.resolve().is_relative_to(s.dir.resolve()):
            raise
        if world.is_main:
            print(f"[{s.name}] warning: {e}; deleted {bad.name}, rebuilding", file=sys.stderr, flush=True)
            bad.unlink(missing_ok=True)
        world.barrier()
    return s.run()
