"""Batched, shardable feature extraction for FID, precision/recall and domain distances.

A feature function is any callable `fn(images) -> feats` taking a uint8 tensor (B, H, W, C) on the target
device and returning (B, D) features (e.g. `InceptionFeatures`, `DomainFeatures`). When `fn` is a
`torch.nn.Module` it is moved to the device and put in eval mode. With `world_size > 1` rank r handles
indices r, r + W, r + 2W, ... (`shard_indices`); the caller gathers the per-rank arrays (e.g. with
`accelerate`'s gather) and `interleave_shards` puts the rows back in image order.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def as_nhwc_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8 -> (N, H, W, C) uint8 (a view, no copy)."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"expected uint8 images (N, H, W[, C]), got {images.dtype} {images.shape}")
    return images[..., None] if images.ndim == 3 else images


def shard_indices(n: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Indices of the `n` images that `rank` of `world_size` processes handles: rank::world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return np.arange(rank, n, world_size)


def interleave_shards(shards: Sequence[np.ndarray]) -> np.ndarray:
    """Undo `shard_indices`: shards[r] holds rows r::W of the result, (N_r, ...) each -> (sum N_r, ...)."""
    world_size = len(shards)
    n = sum(len(s) for s in shards)
    for r, s in enumerate(shards):
        if len(s) != len(range(r, n, world_size)):
            raise ValueError(f"shard {r} has {len(s)} rows, expected {len(range(r, n, world_size))} of {n}")
    out = np.empty((n, *shards[0].shape[1:]), dtype=shards[0].dtype)
    for r, s in enumerate(shards):
        out[r::world_size] = s
    return out


@torch.inference_mode()
def extract_features(fn: FeatureFn, images_uint8: np.ndarray, *, batch_size: int, device: str | torch.device,
                     progress: bool = True, rank: int = 0, world_size: int = 1, desc: str = "features",
                     indices: np.ndarray | None = None) -> np.ndarray:
    """Features of this rank's images (rank::world_size of N): uint8 (N, H, W[, C]) -> float32 (N_rank, D).

    `indices` selects rows of `images_uint8` (N becomes len(indices), in their order); they are read batch by
    batch, so a memory-mapped array is never loaded whole."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    device = torch.device(device)
    images = as_nhwc_uint8(images_uint8)
    rows = None
    if indices is not None:
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(images)):
            raise ValueError(f"indices must lie in [0, {len(images)}), got [{rows.min()}, {rows.max()}]")
    idx = shard_indices(len(images) if rows is None else len(rows), rank, world_size)
    if isinstance(fn, torch.nn.Module):
        fn = fn.to(device).eval()
    chunks = []
    bar = tqdm(total=len(idx), desc=desc, unit="img", disable=not progress or rank != 0, leave=False)
    for start in range(0, len(idx), batch_size):
        sel = idx[start:start + batch_size]
        if rows is not None:
            batch = images[rows[sel]]                                                 # (B, H, W, C)
        else:
            batch = images[sel] if world_size > 1 else images[sel[0]:sel[-1] + 1]
        feats = fn(torch.from_numpy(np.ascontiguousarray(batch)).to(device))          # (B, D)
        if feats.ndim != 2 or feats.shape[0] != len(sel):
            raise ValueError(f"feature function returned shape {tuple(feats.shape)} for {len(sel)} images")
        chunks.append(feats.float().cpu().numpy())
        bar.update(len(sel))
    bar.close()
    if not chunks:
        raise ValueError(f"rank {rank} of {world_size} has no images to extract features from ({len(images)})")
    return np.concatenate(chunks)
