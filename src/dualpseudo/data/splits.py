"""The labeled subset: N images per class drawn with a seed, or a fixed list of indices read from a file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .datasets import DataError


def labeled_split(labels: np.ndarray, num_classes: int, labels_per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `labels_per_class` images of each class, drawn without replacement with `seed`."""
    if labels_per_class <= 0:
        raise DataError(f"labels_per_class must be > 0, got {labels_per_class}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < labels_per_class:
            raise DataError(f"class {c} has {len(pool)} training images, fewer than labels_per_class={labels_per_class}")
        chosen.append(rng.choice(pool, labels_per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def read_indices(path: str | Path, num_images: int) -> np.ndarray:
    """Indices from a JSON list (or a split.json's `labeled_indices`) or a whitespace/comma separated text file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labeled index file {path} does not exist")
    text = path.read_text()
    try:
        obj = json.loads(text)
        values = obj["labeled_indices"] if isinstance(obj, dict) else obj
    except (json.JSONDecodeError, KeyError):
        values = text.replace(",", " ").split()
    try:
        idx = np.asarray([int(v) for v in values], dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path} must hold integer image indices") from None
    if len(idx) == 0:
        raise DataError(f"{path} holds no indices")
    if idx.min() < 0 or idx.max() >= num_images:
        raise DataError(f"{path}: index {int(idx[(idx < 0) | (idx >= num_images)][0])} is outside 0..{num_images - 1}")
    if len(np.unique(idx)) != len(idx):
        raise DataError(f"{path} lists an index more than once")
    return np.sort(idx)


def split_record(indices: np.ndarray, labels: np.ndarray, num_classes: int, fingerprint: str, seed: int,
                 source: str) -> dict:
    """The content of split.json."""
    return {
        "dataset_fingerprint": fingerprint,
        "seed": seed,
        "source": source,
        "num_labeled": int(len(indices)),
        "per_class": {str(c): [int(i) for i in indices[labels[indices] == c]] for c in range(num_classes)},
        "labeled_indices": [int(i) for i in indices],
    }
