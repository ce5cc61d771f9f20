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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from .. import __version__, distributed, runtime
from ..artifacts import (ArtifactError, file_hash, read_json, reset_if_stale, stage_status, write_json,
                         write_manifest, write_text)
from ..config import ConfigError, ExperimentConfig, config_hash, from_dict, load_config, to_dict, to_yaml
from ..data.datasets import Dataset, load_dataset
from ..data.splits import labeled_split, read_indices, split_record
from ..rundir import RunDir
from ..classify.contrastive import ENCODER_FILE
from .encoder import check_feature_settings, encoder_key, ensure_encoder, needs_encoder

ALL_STAGES = ("stage1", "stage2", "stage3", "evaluation")  # (+ "encoder" before stage 1 when a learner needs it)


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (e.g. it was made by another config)."""


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
        old = yaml.safe_load(run.config.read_text()) or {}
    except yaml.YAMLError:
        old = {}
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
    return load_config(run.config)


# ---------------------------------------------------------------------------------------------- the steps
def labeled_indices(cfg: ExperimentConfig, ds: Dataset) -> tuple[np.ndarray, str]:
    if cfg.data.labeled_indices:
        return read_indices(cfg.data.labeled_indices, len(ds.train_labels)), f"file:{cfg.data.labeled_indices}"
    idx = labeled_split(ds.train_labels, ds.num_classes, cfg.data.labels_per_class, cfg.data.split_seed)
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
    idx, source = labeled_indices(cfg, ds)
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
                      lambda: {"dataset": ds.fingerprint, **encoder_input()}, stage1))
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
                return {"dataset": ds.fingerprint}
            return {"pseudo_labels": _hash_or_missing(labels_src)}

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

            steps.append(Step(f"{tag}stage3", d3, config_hash({"stage3": cfg.stage3, "stage1": cfg.stage1,
                                                               "hflip": cfg.data.hflip, **rt, **probe3}),
                              lambda d2=d2: {"pseudo_images": _hash_or_missing(d2 / PSEUDO_IMAGES),
                                             "split": _hash_or_missing(s1 / "split.json"), **encoder_input(),
                                             **_real_pseudo_input(cfg, s1 / PSEUDO_LABELS)}, stage3))
        if last >= 3:
            def evaluation(d2=d2, de=de):
                from .evaluation import run_evaluation
                if not distributed.current().is_main:       # evaluation runs on rank 0 alone
                    return ["metrics.json"], {}
                m = run_evaluation(cfg, ds, d2 / PSEUDO_IMAGES, de, device)
                return ["metrics.json"], {"fid": m.get("fid", {}).get("fid"),
                                          "class_consistency": (m["class_consistency"] or {}).get("accuracy"),
                                          "precision": m["precision_recall"]["precision"],
                                          "recall": m["precision_recall"]["recall"]}

            steps.append(Step(f"{tag}evaluation", de, config_hash({"evaluation": cfg.evaluation}),
                              lambda d2=d2: {"pseudo_images": _hash_or_missing(d2 / PSEUDO_IMAGES)}, evaluation,
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
    ds = load_dataset(cfg.data, cfg.evaluation.cache_dir)
    device = runtime.setup(cfg.runtime)
    world, device = distributed.init(device)
    steps = build_steps(cfg, run, ds, stages, device)
    if dry_run:
        if world.is_main:
            print(to_yaml(cfg))
            print(f"plan for {run.root}:")
            for name, what in plan(steps):
                print(f"  {name:<22} {what}")
        return 0
    say = (lambda msg: print(msg, flush=True)) if world.is_main else (lambda msg: None)
    if world.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        for tmp in run.root.rglob(".*.tmp"):           # left by a writer that was killed; never read
            tmp.unlink(missing_ok=True)
        write_text(run.config, to_yaml(cfg))
        _write_env(run, f"{device} x {world.size} processes" if world.distributed else str(device))
    world.barrier()
    for s in steps:
        inputs = s.inputs()
        done, why = world.broadcast(stage_status(s.dir, s.config_hash, inputs) if world.is_main else None)
        if done:
            say(f"[{s.name}] reused: done, hashes match")
            continue
        say(f"[{s.name}] running ({why})")
        if world.is_main:
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
    if overrides:
        cfg = load_config(run.config, overrides)
    ds = load_dataset(cfg.data, cfg.evaluation.cache_dir)
    device = runtime.setup(cfg.runtime)
    steps = [s for s in build_steps(cfg, run, ds, ALL_STAGES, device) if s.name.endswith("evaluation")]
    for s in steps:
        if not (s.dir.parent / "stage2" / "pseudo_images.npz").is_file():
            raise RunDirError(f"{s.dir.parent / 'stage2'} has no pseudo_images.npz; run stage 2 first")
        outputs, summary = s.run()
        write_manifest(s.dir, s.config_hash, s.inputs(), outputs, {"summary": summary})
        print(f"[{s.name}] {json.dumps(summary, default=str)}")
    return 0


def write_report(run_root: Path) -> int:
    """`dualpseudo report`."""
    from ..report import write_report as _write_report

    run = RunDir(run_root)
    load_run_config(run)
    print(_write_report(run))
    return 0
