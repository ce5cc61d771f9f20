"""Divergence never becomes an artifact: the checks that stop a training whose model went non-finite or whose
outputs collapsed, and the truthful note on which training state is kept.

A training loop checks its weights (not only its loss) before every checkpoint, so a saved state always holds
finite weights and the state on disk is the last good one (`training.DivergenceGuard`, built on `finite` and
`kept_state`); the classifier's outputs are checked before they become pseudo-labels (`check_outputs`). A
failure raises `DivergenceError`, which the command line reports as one `error:` line; the stage is not marked
done.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class DivergenceError(FloatingPointError):
    """A training that diverged: a non-finite loss or weights, or outputs collapsed into one class."""


def finite(*modules: torch.nn.Module) -> torch.Tensor:
    """A bool scalar tensor: every floating parameter and buffer of `modules` is finite (one sync to read it)."""
    flags = [torch.isfinite(t).all() for m in modules for t in (*m.parameters(), *m.buffers())
             if t.is_floating_point() and t.numel()]
    if not flags:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([f.to(flags[0].device) for f in flags]).all()


def kept_state(state_path: Path, good_step: int | float | None, unit: str = "step") -> str:
    """What a stopped training leaves behind, for its error message."""
    if good_step is None:
        return f"no training state had been saved yet ({state_path} was not written)"
    return f"the last good state ({unit} {good_step}) is kept in {state_path}"


def check_outputs(probs: np.ndarray, is_labeled: np.ndarray, where: str, advice: str) -> None:
    """Refuse class probabilities (N, C) that are non-finite, or that put every unlabeled image in one class, (nearly)
    all at confidence 1.0 (a diverged network's saturated softmax), before they become pseudo-labels."""
    probs = np.asarray(probs)
    if not np.isfinite(probs).all():
        bad = int((~np.isfinite(probs)).any(axis=1).sum())
        raise DivergenceError(f"{where}: the classifier's outputs are non-finite for {bad} of {len(probs)} images "
                              f"(the training diverged); no pseudo-labels were written. {advice}")
    pool = probs[~np.asarray(is_labeled, dtype=bool)]
    if probs.ndim != 2 or probs.shape[1] < 2 or len(pool) < 2:
        return
    label, conf = pool.argmax(1), pool.max(1)
    top = int(np.bincount(label, minlength=probs.shape[1]).argmax())
    saturated = conf >= np.float32(1) - 1e-6
    if (label == top).all() and saturated.mean() >= 0.99:
        raise DivergenceError(f"{where}: the classifier's outputs collapsed: all {len(pool)} unlabeled images fall in "
                              f"class {top}, {int(saturated.sum())} of them at confidence 1.0 (the training "
                              f"diverged); no pseudo-labels were written. {advice}")
