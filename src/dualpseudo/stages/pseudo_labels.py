"""Stage 1: pseudo-labels (You et al. 2023, Sec. 3, first stage).

Writes the labeled split, fits the learner (`learner.fit_and_label`, shared with stage 3) on it plus the
unlabeled pool, labels every training image and writes the metrics.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ExperimentConfig
from ..data.datasets import Dataset
from ..distributed import World
from .files import Metrics, Split
from .learner import fit_and_label


def run_stage1(cfg: ExperimentConfig, ds: Dataset, labeled_idx: np.ndarray, source: str, out: Path,
               device: torch.device, *, world: World, encoder_file: Path | None = None,
               progress: bool = True) -> dict:
    """Stage 1: write the labeled split (`source` says how it was chosen), fit the learner on it and label every
    training image; write and return the metrics (rank 0; the other ranks return {})."""
    if world.is_main:
        Split.of(labeled_idx, ds.train_labels, ds.num_classes, ds.fingerprint, cfg.data.split_seed, source).save(out)
    metrics = fit_and_label(cfg, ds, labeled_idx, out, device, encoder_file=encoder_file, world=world,
                            progress=progress)
    if world.is_main:
        Metrics(metrics).save(out)
    return metrics
