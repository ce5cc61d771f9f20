"""Classification metrics: top-1, per-class accuracy, confusion matrices, pseudo-label quality and the class
consistency of generated images (DPT, You et al. 2023: how often an oracle classifier agrees with the label a
pseudo-image was generated for).

Undefined ratios (a class with no true or no predicted samples) are reported as None, never NaN, and the
reports list those classes, so JSON stays valid and "no data" is not confused with "0% correct".
This module takes predictions or a plain callable; it never imports the classifier code.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def to_predictions(probs_or_preds) -> np.ndarray:
    """(N, C) scores/probabilities -> argmax (N,); (N,) integer predictions pass through."""
    a = _as_numpy(probs_or_preds)
    if a.ndim == 2:
        return a.argmax(axis=1)
    if a.ndim == 1:
        return a.astype(np.int64)
    raise ValueError(f"expected (N, C) probabilities or (N,) predictions, got shape {a.shape}")


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [float(n) / float(d) if d > 0 else None for n, d in zip(num, den)]


def top1(probs_or_preds, labels) -> float:
    """Top-1 accuracy in [0, 1] of (N, C) probabilities or (N,) predictions against (N,) labels."""
    pred, true = to_predictions(probs_or_preds), _as_numpy(labels).astype(np.int64)
    if pred.shape != true.shape or len(true) == 0:
        raise ValueError(f"predictions {pred.shape} and labels {true.shape} must have the same non-zero length")
    return float((pred == true).mean())


def confusion_matrix(pred, true, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    pred, true = to_predictions(pred), _as_numpy(true).astype(np.int64)
    if pred.shape != true.shape:
        raise ValueError(f"predictions {pred.shape} and labels {true.shape} differ in shape")
    for name, a in (("predictions", pred), ("labels", true)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} fall outside [0, {num_classes}): min {a.min()}, max {a.max()}")
    return np.bincount(true * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def per_class_accuracy(pred, true, num_classes: int) -> list[float | None]:
    """Recall of each class (C,): correct / true count; None for a class with no samples."""
    cm = confusion_matrix(pred, true, num_classes)
    return _ratio(np.diag(cm), cm.sum(axis=1))


def pseudo_label_report(pred, true, mask, num_classes: int) -> dict:
    """Quality of pseudo-labels on the images selected by the boolean `mask` (N,) (e.g. the unlabeled pool):
    accuracy, per-class precision and recall (None where undefined), counts and the confusion matrix."""
    pred, true = to_predictions(pred), _as_numpy(true).astype(np.int64)
    mask = np.ones(len(true), bool) if mask is None else _as_numpy(mask).astype(bool)
    if mask.shape != true.shape:
        raise ValueError(f"mask {mask.shape} and labels {true.shape} differ in shape")
    cm = confusion_matrix(pred[mask], true[mask], num_classes)
    support, predicted, correct = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    recall = _ratio(correct, support)
    precision = _ratio(correct, predicted)
    defined_recall = [r for r in recall if r is not None]
    return {
        "num_images": int(mask.sum()),
        "accuracy": float(correct.sum() / mask.sum()) if mask.any() else None,
        "balanced_accuracy": float(np.mean(defined_recall)) if defined_recall else None,
        "per_class_precision": precision,
        "per_class_recall": recall,
        "support": support.tolist(),
        "predicted": predicted.tolist(),
        "undefined_precision_classes": [c for c, p in enumerate(precision) if p is None],  # never predicted
        "undefined_recall_classes": [c for c, r in enumerate(recall) if r is None],        # no true samples
        "confusion_matrix": cm.tolist(),
    }


@torch.inference_mode()
def class_consistency(classify_fn: Callable[[np.ndarray], np.ndarray | torch.Tensor], images_uint8: np.ndarray,
                      cond_labels, num_classes: int, batch_size: int = 256) -> dict:
    """Oracle accuracy on generated images (N, H, W[, C]) uint8 against the labels (N,) they were conditioned on;
    `classify_fn(images_batch_uint8) -> (B, C) probabilities (or (B,) predictions)`. Overall and per class."""
    labels = _as_numpy(cond_labels).astype(np.int64)
    if len(images_uint8) != len(labels) or len(labels) == 0:
        raise ValueError(f"{len(images_uint8)} images but {len(labels)} conditioning labels")
    preds, conf = [], []
    for start in range(0, len(labels), batch_size):
        out = _as_numpy(classify_fn(images_uint8[start:start + batch_size]))
        preds.append(to_predictions(out))
        if out.ndim == 2:                                            # probability of the conditioning label
            conf.append(out[np.arange(len(out)), labels[start:start + batch_size]])
    pred = np.concatenate(preds)
    cm = confusion_matrix(pred, labels, num_classes)
    per_class = _ratio(np.diag(cm), cm.sum(axis=1))
    return {
        "accuracy": top1(pred, labels),
        "per_class_accuracy": per_class,
        "classes_without_samples": [c for c, a in enumerate(per_class) if a is None],
        "mean_prob_of_label": float(np.concatenate(conf).mean()) if len(conf) == len(preds) else None,
        "num_samples": int(len(labels)),
        "confusion_matrix": cm.tolist(),
    }
