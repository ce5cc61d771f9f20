"""The DPT pipeline: plan the stages, reuse the finished ones, run the rest, resume the interrupted one.

A step is done when its manifest matches its config hash and the hashes of its inputs (the upstream files it
reads), so changing a stage-2 setting re-runs stages 2 and 3 and keeps stage 1. Rounds after the first repeat
stages 2-3 with the newest classifier's pseudo-labels (`rounds: N`, beyond the paper).

Under a data-parallel launch (`accelerate launch` / `torchrun`) every process runs every step; rank 0 decides
what runs, writes the manifests and the report, and the others wait at barriers. A training state or artifact
that fails to load is reported, deleted and rebuilt once (`_run_step`).
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
from ..artifacts import (ArtifactError, array_hash, file_hash, read_json, reset_if_stale, stage_status, write_json,
                         write_manifest, write_text)
from ..config import ConfigError, ExperimentConfig, config_hash, from_dict, load_config, to_dict, to_yaml
from ..data.datasets import Dataset, DataError, DataMissingError, load_dataset
from ..data.splits import labeled_split, read_indices, split_record
from ..rundir import RunDir, RunDirError
from ..rundir import lock as lock_run_dir
from ..classify.contrastive import ENCODER_FILE
from .checks import check_run, named_file_inputs
from .encoder import check_feature_settings, encoder_key, ensure_encoder, needs_encoder

ALL_STAGES = ("stage1", "stage2", "stage3", "evaluation")  # (+ "encoder" before stage 1 when a learner needs it)


@dataclass
class Step:
    name: str                              # e.g. "stage2" or "round2/stage2"
    dir: Path
    config_hash: str
    inputs: Callable[[], dict[str, str]]   # hashes of the upstream files it reads (valid once upstream is done)
    run: Callable[[], tuple[list[str], dict]]  # -> (output file names, summary for the manifest)
    resumable: tuple[str, ...] = ("state.pt", "stats.jsonl")  # training state, dropped when hashes change


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


def _damaged_config(run: RunDir, what: str) -> RunDirError:
    return RunDirError(f"{run.config} is {what}; restore it, or delete it and rerun `dualpseudo run CONFIG "
                       f"--run-dir {run.root}` with the run's config (finished stages whose hashes match are reused)")


def _lock(run: RunDir, world: distributed.World) -> bool:
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


def build_steps(cfg: ExperimentConfig, run: RunDir, ds: Dataset, stages: tuple[str, ...], device) -> list[Step]:
    """The steps needed for `stages`, upstream ones included, in order."""
    from .pseudo_images import PSEUDO_IMAGES, run_stage2
    from .pseudo_labels import PSEUDO_LABELS, fit_and_label
    from .retrain import run_stage3

    rt = {"seed": cfg.runtime.seed, "precision": cfg.runtime.precision}
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
    # an index file enters stage 1's inputs by content: editing it in place re-runs stage 1 and what follows
    index_input = {"labeled_indices": array_hash(idx)} if cfg.data.labeled_indices else {}
    s1 = run.stage1
    steps: list[Step] = []
    encoder_file = None
    if needs_encoder(cfg):                                # the self-supervised encoder, shared across runs
        enc_dir = run.root / "encoder"
        encoder_file = enc_dir / ENCODER_FILE
        steps.append(Step("encoder", enc_dir, encoder_key(cfg, ds), lambda: {"dataset": ds.fingerprint},
                          lambda: ([ENCODER_FILE], ensure_encoder(cfg, ds, enc_dir, device)), resumable=()))
    encoder_input = (lambda: {"encoder": _hash_or_missing(encoder_file)}) if encoder_file else (lambda: {})

    def stage1() -> tuple[list[str], dict]:
        if distributed.current().is_main:
            write_json(s1 / "split.json", split_record(idx, ds.train_labels, ds.num_classes, ds.fingerprint,
                                                       cfg.data.split_seed, source))
        m = fit_and_label(cfg, ds, idx, s1, device, encoder_file=encoder_file)
        return ["split.json", "classifier.safetensors", PSEUDO_LABELS, "metrics.json"], _summary(m)

    # The feature-learner settings enter a stage's hash only where they are used, so other runs keep their hashes.
    probe1 = _feature_sections(cfg, cfg.stage1.learner)
    probe3 = {**probe1, **_feature_sections(cfg, cfg.stage3.mode),
              **({"linear_probe": cfg.linear_probe} if cfg.stage3.filter == "agree" else {})}
    steps.append(Step("stage1", s1, config_hash({"data": cfg.data, "stage1": cfg.stage1, **rt, **probe1}),
                      lambda: {"dataset": ds.fingerprint, **encoder_input(), **index_input,
                               **named_file_inputs(cfg, "stage1")}, stage1))
    if last < 1:
        return steps

    for r in range(1, rounds + 1):
        labels_src = s1 / PSEUDO_LABELS if r == 1 else run.stage("stage3", r - 1) / PSEUDO_LABELS
        d2, d3, de = run.stage("stage2", r), run.stage("stage3", r), run.stage("evaluation", r)
        tag = "" if r == 1 else f"round{r}/"

        def stage2(d2=d2, labels_src=labels_src):
            src = labels_src if cfg.stage2.label_source == "pseudo" else None
            m = run_stage2(cfg, ds, src, d2, device)
            return [PSEUDO_IMAGES, "diffusion.safetensors", "grid.png"], m

        def inputs2(labels_src=labels_src):
            if cfg.stage2.label_source != "pseudo":
                return {"dataset": ds.fingerprint, **named_file_inputs(cfg, "stage2")}
            return {"pseudo_labels": _hash_or_missing(labels_src), **named_file_inputs(cfg, "stage2")}

        latent = {"latent": cfg.latent} if cfg.latent.autoencoder != "none" else {}
        steps.append(Step(f"{tag}stage2", d2, config_hash({"stage2": cfg.stage2, "hflip": cfg.data.hflip, **rt,
                                                           **latent}),
                          inputs2, stage2, resumable=()))
        if last >= 2 and not unconditional:
            def stage3(d2=d2, d3=d3):
                base = _stage1_top1(s1)
                shared = s1 / "features" if probe1 else None      # stage 1's cached features of the real images
                m = run_stage3(cfg, ds, idx, d2 / PSEUDO_IMAGES, d3, device, base, feature_cache=shared,
                               encoder_file=encoder_file, stage1_labels=s1 / PSEUDO_LABELS)
                return ["classifier.safetensors", PSEUDO_LABELS, "metrics.json"], _summary(m)

            s3_cfg = replace(cfg.stage3, baseline=False)          # the baseline is a step of its own
            steps.append(Step(f"{tag}stage3", d3, config_hash({"stage3": s3_cfg, "stage1": cfg.stage1,
                                                               "hflip": cfg.data.hflip, **rt, **probe3}),
                              lambda d2=d2: {"pseudo_images": _hash_or_missing(d2 / PSEUDO_IMAGES),
                                             "split": _hash_or_missing(s1 / "split.json"), **encoder_input(),
                                             **_real_pseudo_input(cfg, s1 / PSEUDO_LABELS),
                                             **named_file_inputs(cfg, "stage3")}, stage3))
            if cfg.stage3.baseline and cfg.stage3.pseudo_source == "generated":
                real = replace(cfg, stage3=replace(s3_cfg, pseudo_source="real"))
                db = run.stage("stage3_baseline", r)

                def baseline(d2=d2, db=db, real=real):
                    shared = s1 / "features" if probe1 else None
                    m = run_stage3(real, ds, idx, d2 / PSEUDO_IMAGES, db, device, _stage1_top1(s1),
                                   feature_cache=shared, encoder_file=encoder_file, stage1_labels=s1 / PSEUDO_LABELS)
                    return ["classifier.safetensors", PSEUDO_LABELS, "metrics.json"], _summary(m)

                steps.append(Step(f"{tag}stage3-baseline", db, config_hash({
                    "stage3": real.stage3, "stage1": cfg.stage1, "hflip": cfg.data.hflip, **rt, **probe3}),
                    lambda: {"split": _hash_or_missing(s1 / "split.json"), **encoder_input(),
                             **_real_pseudo_input(real, s1 / PSEUDO_LABELS), **named_file_inputs(cfg, "stage3")},
                    baseline))
        if last >= 3:
            def evaluation(d2=d2, de=de):
                from .evaluation import run_evaluation
                if not distributed.current().is_main:       # evaluation runs on rank 0 alone
                    return ["metrics.json"], {}
                m = run_evaluation(cfg, ds, d2 / PSEUDO_IMAGES, de, device)
                return ["metrics.json"], {"fid": m.get("fid", {}).get("fid"),
                                          "class_consistency": (m["class_consistency"] or {}).get("accuracy"),
                                          "precision": (m["precision_recall"] or {}).get("precision"),
                                          "recall": (m["precision_recall"] or {}).get("recall")}

            steps.append(Step(f"{tag}evaluation", de, config_hash({"evaluation": cfg.evaluation}),
                              lambda d2=d2, d3=d3: {"pseudo_images": _hash_or_missing(d2 / PSEUDO_IMAGES),
                                                    **named_file_inputs(cfg, "evaluation"),
                                                    # a pool is judged by stage 3's classifier (no oracle)
                                                    **({} if ds.train_labels_known else {"stage3": _hash_or_missing(
                                                        d3 / "classifier.safetensors")})}, evaluation,
                              resumable=()))
    return steps


def _feature_sections(cfg: ExperimentConfig, learner: str) -> dict:
    """The config sections a feature learner depends on (none for the network learners)."""
    if learner == "linear-probe":
        return {"linear_probe": cfg.linear_probe}
    if learner == "label-propagation":
        return {"linear_probe": cfg.linear_probe, "graph": cfg.graph}
    return {}


def _real_pseudo_input(cfg: ExperimentConfig, stage1_labels: Path) -> dict:
    """Stage 3's extra input when it takes real images with stage 1's labels (`pseudo_source: real`)."""
    return {"stage1_labels": _hash_or_missing(stage1_labels)} if cfg.stage3.pseudo_source == "real" else {}


def _hash_or_missing(path: Path) -> str:
    return file_hash(path) if path.is_file() else "missing"


def _stage1_top1(s1: Path) -> float | None:
    try:
        return read_json(s1 / "metrics.json").get("test", {}).get("top1")
    except ArtifactError:
        return None


def _summary(m: dict) -> dict:
    return {"test_top1": m.get("test", {}).get("top1"), "pseudo_label_accuracy": m.get("pseudo_labels", {}).get("accuracy")}


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


# ---------------------------------------------------------------------------------------------- entry points
def main(config_path: str, overrides: list[str], run_root: Path, stages: tuple[str, ...] = ALL_STAGES,
         force: bool = False, dry_run: bool = False) -> int:
    """`dualpseudo run|stage1|stage2|stage3`: returns the process exit code."""
    cfg = load_config(config_path, overrides)
    run = RunDir(run_root)
    check_run_dir(cfg, run, force)
    if dry_run:
        return _dry_run(cfg, run, stages)
    runtime.resolve_device(cfg.runtime.device)          # an absent device fails here, before the data is read
    from .checks import missing_files
    lacking = missing_files(cfg, stages)                # a file read only after hours of training fails now
    if lacking:
        raise ConfigError(lacking[0])
    ds = load_dataset(cfg.data, cfg.evaluation.cache_dir)
    device = runtime.setup(cfg.runtime)
    world, device = distributed.init(device)
    locked = _lock(run, world)                          # one run per directory, held until the command ends
    steps = build_steps(cfg, run, ds, stages, device)
    say = (lambda msg: print(msg, flush=True)) if world.is_main else (lambda msg: None)
    if world.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        for tmp in run.root.rglob(".*.tmp") if locked else ():   # left by a writer that was killed; never read
            try:
                tmp.unlink(missing_ok=True)
            except OSError:                                  # a read-only directory: they stay unread there
                pass
        write_text(run.config, to_yaml(cfg))                 # not rewritten when unchanged (read-only reuse)
    world.barrier()
    for s in steps:
        inputs = s.inputs()
        done, why = world.broadcast(stage_status(s.dir, s.config_hash, inputs) if world.is_main else None)
        if done:
            say(f"[{s.name}] reused: done, hashes match")
            continue
        say(f"[{s.name}] running ({why})")
        if world.is_main:
            _write_env(run, f"{device} x {world.size} processes" if world.distributed else str(device))
            s.dir.mkdir(parents=True, exist_ok=True)
            if s.resumable and reset_if_stale(s.dir, {"config": s.config_hash, "inputs": inputs}, s.resumable):
                say(f"[{s.name}] dropped a training state made with other settings")
        world.barrier()
        t0 = time.time()
        outputs, summary = _run_step(s, world)
        if world.is_main:
            write_manifest(s.dir, s.config_hash, inputs, outputs,
                           {"wall_time_s": round(time.time() - t0, 1), "summary": summary})
        world.barrier()
        say(f"[{s.name}] done in {time.time() - t0:.0f}s: {json.dumps(summary, default=str)}")
    if stages == ALL_STAGES and world.is_main:
        from ..report import write_report as _write_report
        path = _write_report(run)
        print(f"report: {path}")
    world.barrier()
    return 0


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
    files = missing_files(cfg, stages)                 # (a missing labeled-index file among them)
    steps = None
    if ds is not None:
        try:
            steps = build_steps(cfg, run, ds, stages, torch.device("cpu"))
        except DataError:
            if not files:                              # bad data (not absent data) fails the dry run too
                raise
    lacking += files
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


def _run_step(s: Step, world: distributed.World) -> tuple[list[str], dict]:
    """Run a step; when one of its own files fails to load (ArtifactError), delete that file and run it again.

    Only a file inside the step's own folder is deleted (training state, snapshot, chunk...); an error about
    anything else, or a second failure, propagates.
    """
    try:
        return s.run()
    except ArtifactError as e:
        own = sorted((p for p in s.dir.rglob("*") if p.is_file()), key=lambda p: -len(str(p)))
        bad = next((p for p in own if str(p) in str(e)), None)
        if bad is None:
            raise
        if world.is_main:
            print(f"[{s.name}] warning: {e}; deleted {bad.name}, rebuilding", file=sys.stderr, flush=True)
            bad.unlink(missing_ok=True)
        world.barrier()
    return s.run()


def sample_grid(run_root: Path, *, per_class: int, out: str | None, guidance_scale: float | None,
                steps: int | None, sampler: str | None, seed: int, round: int = 1) -> int:
    """`dualpseudo sample`: a grid with one row per class from a run's diffusion model."""
    from ..diffuse.generate import generate
    from ..diffuse.train import load_diffusion
    from ..figures import save_grid

    run = RunDir(run_root)
    cfg = load_run_config(run)
    path = run.stage("stage2", round) / "diffusion.safetensors"
    if not path.is_file():
        raise RunDirError(f"{path} does not exist; run `dualpseudo stage2` for this run directory first")
    device = runtime.setup(cfg.runtime)
    ema, meta = load_diffusion(path)
    decode = None
    if "latent" in meta:
        from ..diffuse.latent import load_latent_decoder
        decode = load_latent_decoder(meta, path.parent, device)
    C = meta["num_classes"]
    labels = np.repeat(np.arange(C), per_class)
    seeds = seed + np.arange(len(labels))
    images = generate(ema.to(device), labels, seeds, sampler=sampler or cfg.stage2.sampler,
                      steps=steps or cfg.stage2.steps,
                      guidance_scale=cfg.stage2.guidance_scale if guidance_scale is None else guidance_scale,
                      batch_size=cfg.stage2.sample_batch_size, device=device, precision=cfg.runtime.precision,
                      decode=decode)
    target = Path(out) if out else run.root / "sample_grid.png"
    save_grid(target, images, rows=C, row_names=meta.get("class_names"))
    print(target)
    return 0


def evaluate_run(run_root: Path, overrides: list[str]) -> int:
    """`dualpseudo eval`: (re-)evaluate every round's pseudo-images of a run directory."""
    run = RunDir(run_root)
    cfg = load_run_config(run)
    lock_run_dir(run.root)
    if overrides:
        cfg = load_config(run.config, overrides)
    ds = load_dataset(cfg.data, cfg.evaluation.cache_dir)
    device = runtime.setup(cfg.runtime)
    steps = [s for s in build_steps(cfg, run, ds, ALL_STAGES, device) if s.name.endswith("evaluation")]
    for s in steps:
        if not (s.dir.parent / "stage2" / "pseudo_images.npz").is_file():
            raise RunDirError(f"{s.dir.parent / 'stage2'} has no pseudo_images.npz; run stage 2 first")
        outputs, summary = s.run()
        if not stage_status(s.dir, s.config_hash, s.inputs())[0]:   # unchanged results keep their manifest
            write_manifest(s.dir, s.config_hash, s.inputs(), outputs, {"summary": summary})
        print(f"[{s.name}] {json.dumps(summary, default=str)}")
    from ..report import write_report as _write_report
    print(_write_report(run))                         # the report shows the new evaluation
    return 0


def write_report(run_root: Path) -> int:
    """`dualpseudo report`."""
    from ..report import write_report as _write_report

    run = RunDir(run_root)
    load_run_config(run)
    print(_write_report(run))
    return 0
