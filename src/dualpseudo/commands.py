"""The commands that work on an existing run directory: `dualpseudo sample` (grid), `eval` and `report`.

Each returns the process exit code; `cli.py` parses the arguments and calls them. The pipeline's own command
(`run` / `stage1-3`) is `stages.pipeline.main`; `predict`, `sample --out-dir` and `export` are in the API.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import runtime
from .rundir import RunDir, RunDirError


def sample_grid(run_root: Path, *, per_class: int, out: str | None, guidance_scale: float | None,
                steps: int | None, sampler: str | None, seed: int, round: int = 1) -> int:
    """`dualpseudo sample`: a grid with one row per class from a run's diffusion model (`api.Generator`)."""
    from .api import load_generator
    from .figures import save_grid
    from .stages.pipeline import load_run_config

    run = RunDir(run_root)
    cfg = load_run_config(run)
    gen = load_generator(run.root, round, runtime.setup(cfg.runtime))
    rows = len(gen.class_names)
    images = gen.sample(np.repeat(np.arange(rows), per_class).tolist(), seed=seed, guidance_scale=guidance_scale,
                        steps=steps, sampler=sampler)
    target = Path(out) if out else run.sample_grid
    save_grid(target, images, rows=rows, row_names=gen.meta.get("class_names"))
    print(target)
    return 0


def evaluate_run(run_root: Path, overrides: list[str]) -> int:
    """`dualpseudo eval`: (re-)evaluate every round's pseudo-images of a run directory (one process)."""
    from .manifest import stage_status, write_manifest
    from .config import load_config
    from .data.datasets import load_dataset
    from .rundir import lock
    from .stages.files import PSEUDO_IMAGES, PseudoImages, step_record
    from .stages.pipeline import carry_over, check_schema, load_run_config
    from .stages.steps import ALL_STAGES, build_steps

    run = RunDir(run_root)
    cfg = load_run_config(run)
    old_schema = check_schema(run)
    lock(run.root)
    cfg = runtime.resolve_config(load_config(run.config, overrides) if overrides else cfg)   # a hand-set `auto`
    ds = load_dataset(cfg.data, cfg.evaluation.cache_dir)
    device = runtime.setup(cfg.runtime)
    steps = build_steps(cfg, run, ds, ALL_STAGES, device)
    if old_schema:
        carry_over(steps, print)
    steps = [s for s in steps if s.name.endswith("evaluation")]
    for s in steps:
        stage2 = s.dir.parent / "stage2"
        if not PseudoImages.path(stage2).is_file():
            raise RunDirError(f"{stage2} has no {PSEUDO_IMAGES}; run stage 2 first")
        summary = s.run()
        if not stage_status(s.dir, s.config_hash, s.inputs())[0]:   # unchanged results keep their manifest
            write_manifest(s.dir, s.config_hash, s.inputs(), list(s.outputs), step_record(summary))
        print(f"[{s.name}] {json.dumps(summary, default=str)}")
    from .report import write_report as _write_report
    print(_write_report(run))                         # the report shows the new evaluation
    return 0


def write_report(run_root: Path) -> int:
    """`dualpseudo report`."""
    from .report import write_report as _write_report
    from .stages.pipeline import load_run_config

    run = RunDir(run_root)
    load_run_config(run)
    print(_write_report(run))
    return 0
