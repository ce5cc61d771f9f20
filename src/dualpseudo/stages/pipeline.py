"""The DPT pipeline: plan the stages, reuse the finished ones, run the rest, resume the interrupted one.

A step (steps.py) is done when its manifest matches its config hash (of what its declaration in declare.py reads)
and the hashes of its inputs (the upstream files it reads), so changing a stage-2 setting re-runs stages 2 and 3
and keeps stage 1. Rounds after the first repeat stages 2-3 with the newest classifier's pseudo-labels
(`rounds: N`, beyond the paper).

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
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from .. import __version__, distributed, runtime
from ..artifacts import ArtifactError, read_json, write_json, write_text
from ..config import ConfigError, ExperimentConfig, from_dict, load_config, to_dict, to_yaml
from ..data.datasets import DataError, DataMissingError, load_dataset
from ..distributed import World
from ..manifest import (MANIFEST, SCHEMA_CHANGES, SCHEMA_VERSION, STATE_KEY, manifest_schemas, read_manifest,
                        reset_if_stale, stage_status, write_manifest)
from ..rundir import RunDir, RunDirError
from ..rundir import lock as lock_run_dir
from . import files
from .declare import needs_encoder
from .steps import ALL_STAGES, Step, build_steps, plan


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


def check_schema(run: RunDir, force: bool = False) -> bool:
    """Refuse a run directory whose manifests another run-directory schema wrote (their hashes mean something
    else) unless `force`, which re-runs its stages; True when they are schema 1's, which `carry_over` converts
    (with `force` too: the stages the changed keys do not affect are kept, not retrained)."""
    other = manifest_schemas(run.root)
    if other == {1}:
        return True
    if not other or force:
        return False
    version = max(other)
    why = (f"a newer dualpseudo (run-directory schema {version}; this version reads {SCHEMA_VERSION})"
           if version > SCHEMA_VERSION else
           f"an earlier dualpseudo (run-directory schema {version}; this version writes schema {SCHEMA_VERSION}, "
           f"whose {SCHEMA_CHANGES.get(SCHEMA_VERSION, 'hashes differ')})")
    raise RunDirError(f"run directory {run.root} was made by {why}, so its finished stages cannot be recognised; "
                      f"use a new --run-dir, or rerun `dualpseudo run CONFIG --run-dir {run.root} --force` to redo "
                      f"its stages there")


def carry_over(steps: list[Step], say: Callable[[str], None]) -> None:
    """Convert a schema-1 run directory to this schema without re-running anything: a schema-1 manifest whose
    config hash is the one schema 1 gives this config (`Step.legacy_hash`) takes this schema's hash, and so does
    a resumable training state's key. Any other schema-1 manifest is not recognised: its stage re-runs, saying
    why (as schema 1 would have re-run it: its config changed)."""
    kept = []
    for s in steps:
        m = read_manifest(s.dir)
        if not m or m.get("schema_version") != 1:
            continue
        recognised = m.get("config_hash") == s.legacy_hash
        write_json(s.dir / MANIFEST, {**m, "schema_version": SCHEMA_VERSION,
                                      "config_hash": s.config_hash if recognised else m.get("config_hash")})
        key_path = s.dir / STATE_KEY
        key = read_json(key_path) if key_path.is_file() else None
        if isinstance(key, dict) and key.get("config") == s.legacy_hash:
            write_json(key_path, {**key, "config": s.config_hash})
        kept += [s.name] if recognised else []
    say(f"run directory converted from run-directory schema 1 to {SCHEMA_VERSION} "
        f"({SCHEMA_CHANGES[SCHEMA_VERSION]}); finished stages recognised: {', '.join(kept) or 'none'}")


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


def _write_env(run: RunDir, device, world: World) -> None:
    """env.json: versions, platform, device, the CPU's vector capability and native bf16 (what `precision: auto`
    resolved by), threads and the command."""
    import torch

    write_json(run.env, {"dualpseudo": __version__, "python": platform.python_version(), "torch": torch.__version__,
                         "numpy": np.__version__, "platform": platform.platform(),
                         "device": f"{device} x {world.size} processes" if world.distributed else str(device),
                         "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                         "native_bf16": runtime.native_bf16(torch.device(device)),
                         "threads": torch.get_num_threads(), "command": sys.argv})


def load_run_config(run: RunDir) -> ExperimentConfig:
    if not run.config.is_file():
        raise RunDirError(f"{run.root} is not a run directory (no config.yaml); run `dualpseudo run CONFIG --run-dir {run.root}` first")
    try:
        return load_config(run.config)
    except ConfigError as e:
        raise _damaged_config(run, f"damaged ({e})") from None


# ---------------------------------------------------------------------------------------------- running
def main(config_path: str, overrides: list[str], run_root: Path, stages: tuple[str, ...] = ALL_STAGES,
         force: bool = False, dry_run: bool = False) -> int:
    """`dualpseudo run|stage1|stage2|stage3`: returns the process exit code."""
    asked = load_config(config_path, overrides)
    cfg = runtime.resolve_config(asked)                 # precision `auto` -> bf16 or fp32 on this machine
    run = RunDir(run_root)
    check_run_dir(cfg, run, force)
    old_schema = check_schema(run, force)
    if dry_run:
        return _dry_run(cfg, run, stages, old_schema)
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
    if asked.runtime.precision != cfg.runtime.precision:
        say(f"runtime.precision: {asked.runtime.precision} -> {cfg.runtime.precision} "
            f"({'native' if runtime.native_bf16(device) else 'no native'} bf16 on {device})")
    if world.is_main:
        _prepare(run, cfg, locked)
        if old_schema:
            carry_over(steps, say)
    world.barrier()
    for s in steps:
        _execute(s, run, world, device, say)
    if world.is_main and (stages == ALL_STAGES or run.report_md.is_file() or run.report_html.is_file()):
        from ..report import write_report                # a stage re-run alone never leaves a stale report behind
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
        _write_env(run, device, world)
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


def _dry_run(cfg: ExperimentConfig, run: RunDir, stages: tuple[str, ...], old_schema: bool = False) -> int:
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
    if old_schema:
        print(f"  (run-directory schema 1: converted to {SCHEMA_VERSION} when it runs; the stages schema 1 finished "
              f"under this config are kept then)")
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
