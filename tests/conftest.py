"""Helpers shared by the tests: tiny IDX datasets written into a test's own folder, so no test needs the
Debian `dataset-fashion-mnist` package (only CI installs it)."""
import gzip
from pathlib import Path

import numpy as np


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def make_idx_dataset(root: Path, n=40, test=10, gz=True, classes=10):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, m in (("train", n), ("t10k", test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (m, 28, 28)), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(m) % classes, gz)
    return root
