"""Stage 3: retrain the classifier on real data plus the pseudo-images (You et al. 2023, Sec. 3, third stage).

`mode: ssl` adds the pseudo-images to the labeled set and trains the stage-1 learner again with the real
unlabeled pool (the paper's CIFAR-10 recipe); `mode: supervised` trains on real labeled + pseudo-images only.
`stage3.pseudo_fraction` sets the share of pseudo-images in each labeled batch. `mode: linear-probe` refits the
logistic regression on frozen-encoder features of the real labeled images plus the pseudo-images (the paper's
ImageNet recipe; the unlabeled real images only give the centring mean and receive new labels).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..artifacts import load_npz, write_json
from ..config import ExperimentConfig
from ..distributed import current
from ..data.datasets import Dataset
from .pseudo_labels import METRICS, fit_and_label


def run_stage3(cfg: ExperimentConfig, ds: Dataset, labeled_idx: np.ndarray, pseudo_images: Path, out: Path,
               device: torch.device, baseline_top1: float | None, progress: bool = True,
               feature_cache: Path | None = None) -> dict:
    """Fit the classifier on real + pseudo-images; metrics include the change of test top-1 against stage 1."""
    gen = load_npz(pseudo_images, ("images", "labels"))
    s3 = cfg.stage3
    metrics = fit_and_label(
        cfg, ds, labeled_idx, out, device, x_pseudo=gen["images"], y_pseudo=gen["labels"],
        learner={"supervised": "supervised", "linear-probe": "linear-probe"}.get(s3.mode),
        iterations=s3.iterations or None, pseudo_fraction=s3.pseudo_fraction, feature_cache=feature_cache,
        progress=progress)
    if not current().is_main:
        return metrics
    metrics["mode"] = s3.mode
    metrics["num_pseudo_images"] = int(len(gen["labels"]))
    if baseline_top1 is not None and "test" in metrics:
        metrics["stage1_test_top1"] = baseline_top1
        metrics["delta_top1"] = metrics["test"]["top1"] - baseline_top1
    write_json(out / METRICS, metrics)
    return metrics
