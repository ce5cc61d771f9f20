"""Stage 3: retrain the classifier on real data plus the pseudo-images (You et al. 2023, Sec. 3, third stage).

`mode: ssl` adds the pseudo-images to the labeled set and trains the stage-1 learner again with the real
unlabeled pool (the paper's CIFAR-10 recipe); `mode: supervised` trains on real labeled + pseudo-images only.
`stage3.pseudo_fraction` sets the share of pseudo-images in each labeled batch. `mode: linear-probe` refits the
logistic regression on frozen-encoder features of the real labeled images plus the pseudo-images (the paper's
ImageNet recipe; the unlabeled real images only give the centring mean and receive new labels).
`mode: label-propagation` runs Poisson learning again with the pseudo-images as labeled nodes of the graph.

`pseudo_source: real` is the baseline that tells what the generator adds: instead of generated images, stage 3
takes, for every class, the K real unlabeled images that stage 1 labeled that class most confidently (plain
self-training with the same number of extra labeled images); `pseudo_source: both` takes the generated and the
real ones together. `filter: agree` keeps only the pseudo-images that an independent judge puts in the class
they were generated for (`learner.judge_agreement`).

Stage 3 is stage 1's counterpart over the same learner (`learner.fit_and_label`, which writes the
classifier and the pseudo-labels and returns the metrics): each stage writes its own metrics.json once.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ExperimentConfig
from ..data.datasets import Dataset
from ..distributed import World
from .files import FEATURES, Metrics, PseudoImages, PseudoLabels
from .learner import fit_and_label, judge_agreement


def stage3_learner(cfg: ExperimentConfig) -> str:
    """The learner stage 3 fits: stage 1's for `mode: ssl`, else the one the mode names."""
    return cfg.stage1.learner if cfg.stage3.mode == "ssl" else cfg.stage3.mode


def most_confident_real(pseudo_labels: PseudoLabels | dict, per_class: int, num_classes: int) -> np.ndarray:
    """Indices of the `per_class` unlabeled images with the highest confidence for each class (by label).

    Ties break by index; a class with fewer pseudo-labeled images gives all it has. Returns (<= C * K,) int."""
    pl = pseudo_labels if isinstance(pseudo_labels, PseudoLabels) else PseudoLabels(**pseudo_labels)
    label, conf, is_lb = pl.label, pl.confidence, pl.is_labeled
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero((label == c) & ~is_lb)
        order = np.lexsort((idx, -conf[idx]))                   # confidence descending, then index
        out.append(idx[order[:per_class]])
    return np.concatenate(out).astype(np.int64)


def filter_rule(setting: str, labeled_labels: np.ndarray, num_classes: int) -> str:
    """The pseudo-image filter stage 3 applies: `setting` itself, or for `auto` "agree" unless some class has at
    most one labeled image, then "none" (a judge fitted on one image per class drops most pseudo-images of some
    classes, which then shrink in the graph: held-out splits at 1 label per class, BENCHMARKS.md)."""
    if setting != "auto":
        return setting
    fewest = np.bincount(np.asarray(labeled_labels, dtype=np.int64), minlength=num_classes).min()
    return "agree" if fewest >= 2 else "none"


def run_stage3(cfg: ExperimentConfig, ds: Dataset, labeled_idx: np.ndarray, stage2: Path, out: Path,
               device: torch.device, baseline_top1: float | None, *, world: World, progress: bool = True,
               feature_cache: Path | None = None, encoder_file: Path | None = None,
               stage1: Path | None = None) -> dict:
    """Fit the classifier on real + pseudo-images (`stage2`'s, or with `pseudo_source: real` the most confident
    of `stage1`'s pseudo-labels, or with `both` the two together); write and return the metrics, which include
    the change of test top-1 against stage 1's `baseline_top1` (rank 0; the other ranks return {})."""
    s3 = cfg.stage3
    xs, ys = [], []
    if s3.pseudo_source in ("generated", "both"):
        gen = PseudoImages.load(stage2)
        xs.append(gen.images), ys.append(gen.labels)
    if s3.pseudo_source in ("real", "both"):
        pl = PseudoLabels.load(stage1)
        pick = most_confident_real(pl, cfg.stage2.images_per_class, ds.num_classes)
        xs.append(ds.train_images[pick]), ys.append(pl.label[pick])
    x_pseudo, y_pseudo = ((xs[0], ys[0]) if len(xs) == 1 else
                          (np.concatenate(xs), np.concatenate([np.asarray(y, dtype=np.int64) for y in ys])))
    kept = None
    rule = filter_rule(s3.filter, ds.train_labels[labeled_idx], ds.num_classes)
    if rule == "agree":                       # rank 0 judges, every rank trains on the same kept images
        keep = world.broadcast(judge_agreement(
            cfg, ds, labeled_idx, out, device, x_pseudo, y_pseudo, feature_cache=feature_cache or out / FEATURES,
            encoder_file=encoder_file, progress=progress) if world.is_main else None)
        kept = {"kept": int(keep.sum()), "of": int(len(keep)),
                "kept_per_class": np.bincount(np.asarray(y_pseudo)[keep], minlength=ds.num_classes).tolist()}
        x_pseudo, y_pseudo = x_pseudo[keep], np.asarray(y_pseudo)[keep]
    metrics = fit_and_label(
        cfg, ds, labeled_idx, out, device, x_pseudo=x_pseudo, y_pseudo=y_pseudo, learner=stage3_learner(cfg),
        iterations=s3.iterations or None, pseudo_fraction=s3.pseudo_fraction, feature_cache=feature_cache,
        encoder_file=encoder_file, world=world, progress=progress)
    if not world.is_main:
        return metrics
    metrics["mode"] = s3.mode
    metrics["pseudo_source"] = s3.pseudo_source
    metrics["num_pseudo_images"] = int(len(y_pseudo))
    if s3.filter != "none":
        metrics["filter"] = {"rule": rule, "setting": s3.filter, **(kept or {})}
    if baseline_top1 is not None and Metrics(metrics).has_test:
        metrics["stage1_test_top1"] = baseline_top1
        metrics["delta_top1"] = Metrics(metrics).test_top1 - baseline_top1
    Metrics(metrics).save(out)
    return metrics
