"""Stages 1 and 3 share one job: fit the classifier, label every training image, and measure it.

Stage 1 fits on the labeled split plus the unlabeled pool; stage 3 fits again with the pseudo-images joining the
labeled set (`mode: ssl`) or on labeled + pseudo-images alone (`mode: supervised`). The test split is used only
to report the final EMA model's top-1, never to pick a model or a setting.

With `learner: linear-probe` (the paper's ImageNet recipe) both stages instead fit a logistic regression on
frozen-encoder features (`classify/linear.py`): stage 1 on the labeled images, stage 3 on the labeled images plus
the pseudo-images; every training image is then labeled from its cached features.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..artifacts import save_npz, write_json
from ..classify.linear import build_encoder, cached_features, fit_objective, fit_probe, probe_predict, save_probe
from ..classify.train import predict, save_classifier, train_classifier
from ..config import ExperimentConfig
from ..distributed import current
from ..data.datasets import Dataset
from ..evaluate.classification import confusion_matrix, per_class_accuracy, pseudo_label_report, top1

PSEUDO_LABELS = "pseudo_labels.npz"
CLASSIFIER = "classifier.safetensors"
METRICS = "metrics.json"


def fit_and_label(cfg: ExperimentConfig, ds: Dataset, labeled_idx: np.ndarray, out: Path, device: torch.device, *,
                  x_pseudo: np.ndarray | None = None, y_pseudo: np.ndarray | None = None,
                  learner: str | None = None, iterations: int | None = None, pseudo_fraction: float = 0.0,
                  feature_cache: Path | None = None, progress: bool = True) -> dict:
    """Train the classifier into `out`, write classifier, pseudo-labels and metrics; return the metrics.

    `feature_cache` (linear probe): where the real images' features are cached, default `out/features`; stage 3
    passes stage 1's cache, whose shards are reused when their keys (extractor, image hash) match.

    With several processes all train (data parallel); rank 0 alone labels, measures and writes, the others
    return {}.
    """
    s1 = cfg.stage1 if learner is None else replace(cfg.stage1, learner=learner)
    if s1.learner == "linear-probe":
        return _fit_and_label_probe(cfg, ds, labeled_idx, out, device, x_pseudo, y_pseudo, progress,
                                    feature_cache or out / "features")
    x_lb, y_lb = ds.train_images[labeled_idx], ds.train_labels[labeled_idx]
    model = train_classifier(
        s1, x_lb=x_lb, y_lb=y_lb, x_ulb=ds.train_images, num_classes=ds.num_classes, hflip=cfg.data.hflip,
        out_dir=out, device=device, precision=cfg.runtime.precision, seed=cfg.runtime.seed,
        x_pseudo=x_pseudo, y_pseudo=y_pseudo, pseudo_fraction=pseudo_fraction, iterations=iterations,
        progress=progress)
    if not current().is_main:
        return {}
    save_classifier(out / CLASSIFIER, model, {
        "network": s1.network, "num_classes": ds.num_classes, "in_channels": ds.image_shape[2],
        "image_size": ds.image_shape[0], "class_names": list(ds.class_names)})

    # Every training image gets a label; labeled images keep their true one.
    probs = predict(model, ds.train_images, batch_size=s1.predict_batch_size, device=device,
                    precision=cfg.runtime.precision)
    test_probs = None
    if len(ds.test_images):
        test_probs = predict(model, ds.test_images, batch_size=s1.predict_batch_size, device=device,
                             precision=cfg.runtime.precision)
    metrics = _label_and_measure(ds, labeled_idx, out, probs, test_probs,
                                 "final EMA (no selection on the test split)")
    metrics["learner"] = s1.learner
    metrics["network"] = s1.network
    write_json(out / METRICS, metrics)
    return metrics


def _label_and_measure(ds: Dataset, labeled_idx: np.ndarray, out: Path, probs: np.ndarray,
                       test_probs: np.ndarray | None, model_note: str) -> dict:
    """Write pseudo_labels.npz from train probabilities (N, C) and return the metrics (test ones if given)."""
    label, confidence = probs.argmax(1).astype(np.int64), probs.max(1).astype(np.float32)
    is_labeled = np.zeros(len(label), dtype=bool)
    is_labeled[labeled_idx] = True
    label[is_labeled], confidence[is_labeled] = ds.train_labels[is_labeled], 1.0
    save_npz(out / PSEUDO_LABELS, label=label, confidence=confidence, is_labeled=is_labeled)

    metrics = label_metrics(label, confidence, is_labeled, ds)
    if test_probs is not None:
        test_pred = test_probs.argmax(1)
        metrics["test"] = {
            "top1": top1(test_pred, ds.test_labels),
            "per_class_accuracy": per_class_accuracy(test_pred, ds.test_labels, ds.num_classes),
            "confusion": confusion_matrix(test_pred, ds.test_labels, ds.num_classes),
            "num_images": int(len(ds.test_labels)),
            "model": model_note,
        }
    return metrics


def _fit_and_label_probe(cfg: ExperimentConfig, ds: Dataset, labeled_idx: np.ndarray, out: Path,
                         device: torch.device, x_pseudo: np.ndarray | None, y_pseudo: np.ndarray | None,
                         progress: bool, feature_cache: Path) -> dict:
    """The linear-probe learner: cached encoder features, logistic regression, labels for every image.

    Features are centred with the mean over all real training images (stage 1 and 3 alike) and fitted on the
    labeled images, plus the pseudo-images when given (stage 3). Rank 0 alone runs it; the others return {}.
    """
    if not current().is_main:
        return {}
    lp = cfg.linear_probe
    encoder = build_encoder(lp.encoder, lp.encoder_path, cfg.runtime.precision)

    def features(images: np.ndarray, name: str) -> np.ndarray:
        cache = (out / "features" if name == "pseudo" else feature_cache) / name
        return cached_features(encoder, images, cache, extractor_id=encoder.extractor_id,
                               shard_size=lp.shard_size, batch_size=lp.batch_size, device=device, progress=progress)

    f_train = features(ds.train_images, "train")                           # (N, D)
    f_fit, y_fit = f_train[labeled_idx], ds.train_labels[labeled_idx]
    if x_pseudo is not None and len(x_pseudo):
        f_fit = np.concatenate([f_fit, features(x_pseudo, "pseudo")])
        y_fit = np.concatenate([y_fit, np.asarray(y_pseudo, dtype=np.int64)])
    probe = fit_probe(f_fit, y_fit, f_train, ds.num_classes, lp.l2_strength, max_iter=lp.max_iter, device=device)
    save_probe(out / CLASSIFIER, probe, {
        "encoder": lp.encoder, "encoder_path": lp.encoder_path, "extractor_id": encoder.extractor_id,
        "feature_dim": int(f_train.shape[1]), "l2_strength": lp.l2_strength, "num_classes": ds.num_classes,
        "in_channels": ds.image_shape[2], "image_size": ds.image_shape[0], "class_names": list(ds.class_names)})

    test_probs = probe_predict(probe, features(ds.test_images, "test")) if len(ds.test_images) else None
    metrics = _label_and_measure(ds, labeled_idx, out, probe_predict(probe, f_train), test_probs,
                                 "logistic regression at its optimum (no selection on the test split)")
    metrics["learner"] = "linear-probe"
    metrics["network"] = f"{lp.encoder} features + logistic regression"
    metrics["linear_probe"] = {"encoder": lp.encoder, "extractor_id": encoder.extractor_id,
                               "feature_dim": int(f_train.shape[1]), "l2_strength": lp.l2_strength,
                               "num_fit_images": int(len(y_fit)),
                               "fit_objective": fit_objective(probe, f_fit, y_fit, lp.l2_strength)}
    write_json(out / METRICS, metrics)
    return metrics


def label_metrics(label: np.ndarray, confidence: np.ndarray, is_labeled: np.ndarray, ds: Dataset) -> dict:
    """Pseudo-label quality on the unlabeled pool (true labels used for diagnostics only)."""
    pool = ~is_labeled
    report = pseudo_label_report(label, ds.train_labels, pool, ds.num_classes)
    report["mean_confidence"] = float(confidence[pool].mean()) if pool.any() else None
    return {"pseudo_labels": report}
