"""The labeled subset: N images per class drawn with a seed, or a fixed list of indices read from a file."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .datasets import DataError


def labeled_split(labels: np.ndarray, num_classes: int, labels_per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `labels_per_class` images of each class, drawn without replacement with `seed`.

    Labels -1 (a pool's unlabeled images) are never drawn; `labels_per_class` 0 takes every known label."""
    if labels_per_class == 0:
        known = np.flatnonzero(labels >= 0)
        missing = [c for c in range(num_classes) if not (labels[known] == c).any()]
        if missing:
            raise DataError(f"class {missing[0]} has no labeled image")
        return known.astype(np.int64)
    if labels_per_class < 0:
        raise DataError(f"labels_per_class must be >= 0, got {labels_per_class}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < labels_per_class:
            what = "labeled" if (labels < 0).any() else "training"
            raise DataError(f"class {c} has {len(pool)} {what} images, fewer than "
                            f"labels_per_class={labels_per_class}")
        chosen.append(rng.choice(pool, labels_per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def read_indices(path: str | Path, num_images: int) -> np.ndarray:
    """Indices from a JSON list (or a split.json's `labeled_indices`) or a whitespace/comma separated text file.

    Every entry must be an integer as written: JSON numbers without a fraction (not `1.5`, `1.0`, `true` or
    `"123"`), or text tokens of decimal digits."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"labeled index file {path} does not exist" if not path.exists() else
                        f"labeled index file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"labeled index file {path} is not UTF-8 text; write the indices as a JSON list or "
                        f"as whitespace/comma separated integers") from None
    except OSError as e:
        raise DataError(f"cannot read labeled index file {path} ({e.strerror or e})") from None
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, ValueError, RecursionError):
        obj = None
    if isinstance(obj, (list, dict)):
        if isinstance(obj, dict):
            if "labeled_indices" not in obj:
                raise DataError(f"{path} is a JSON object without a 'labeled_indices' list")
            obj = obj["labeled_indices"]
            if not isinstance(obj, list):
                raise DataError(f"{path}: 'labeled_indices' must be a JSON list of integers, "
                                f"not a {type(obj).__name__}")
        bad = next((v for v in obj if type(v) is not int), None)          # bool is not int here
        if bad is not None:
            raise DataError(f"{path}: {json.dumps(bad)[:40]} is not an integer image index; "
                            f"list integers only (no fractions, strings or booleans)")
        values = obj
    else:
        tokens = text.replace(",", " ").split()
        bad = next((t for t in tokens if not _INT_TOKEN.fullmatch(t)), None)
        if bad is not None:
            raise DataError(f"{path}: {bad[:40]!r} is not an integer image index; write the indices as a JSON "
                            f"list or as whitespace/comma separated integers")
        values = [int(t) for t in tokens]
    if len(values) == 0:
        raise DataError(f"{path} holds no indices")
    out = [v for v in values if v < 0 or v >= num_images]
    if out:
        raise DataError(f"{path}: index {out[0]} is outside 0..{num_images - 1}")
    idx = np.asarray(values, dtype=np.int64)
    uniq, counts = np.unique(idx, return_counts=True)
    if len(uniq) != len(idx):
        raise DataError(f"{path} lists an index more than once ({int(uniq[counts > 1][0])})")
    return np.sort(idx)


_INT_TOKEN = re.compile(r"[+-]?[0-9]+")


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
