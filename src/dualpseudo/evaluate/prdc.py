"""Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019), plus density and coverage (Naeem et al., 2020).

Each feature set Phi is a manifold estimate: the union of balls B(phi, r_k(phi)) where r_k(phi) is the distance
from phi to its k-th nearest neighbour in Phi, itself excluded (paper eq. 1-2, k = 3):

    f(phi, Phi)  = 1 if ||phi - phi'||_2 <= r_k(phi') for at least one phi' in Phi
    precision    = mean_{g in generated} f(g, real)       (how many samples are realistic)
    recall       = mean_{x in real}      f(x, generated)   (how much of the real data is covered)
    density      = 1/(k M) sum_g sum_x 1[||g - x|| <= r_k(x)]
    coverage     = mean_{x in real} 1[min_g ||g - x|| <= r_k(x)]

Distances are computed in torch, one block of rows at a time against the whole other set, so memory is
O(block * N) (10k x 10k in float64 with the default 1024-row blocks: 80 MB per block).
"""
from __future__ import annotations

import numpy as np
import torch


def _blocks(n: int, block: int):
    for start in range(0, n, block):
        yield slice(start, min(start + block, n))


def knn_radii(feats: torch.Tensor, k: int = 3, block: int = 1024) -> torch.Tensor:
    """Distance from each row of (N, D) to its k-th nearest other row -> (N,)."""
    n = feats.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k={k} needs at least k + 1 = {k + 1} points, got {n}")
    radii = torch.empty(n, dtype=feats.dtype, device=feats.device)
    for sl in _blocks(n, block):
        d = torch.cdist(feats[sl], feats)                                  # (B, N)
        d[torch.arange(d.shape[0]), torch.arange(sl.start, sl.stop)] = 0.0  # exact zero for self
        # the (k+1)-th smallest including the zero self-distance is the k-th smallest excluding self
        radii[sl] = d.kthvalue(k + 1, dim=1).values
    return radii


def _inside(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, block: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query (M, D): in any ball B(points_i, radii_i)? in how many? distance to the nearest point -> 3 x (M,)."""
    hits, counts, nearest = [], [], []
    for sl in _blocks(queries.shape[0], block):
        d = torch.cdist(queries[sl], points)                               # (B, N)
        within = d <= radii[None, :]
        hits.append(within.any(dim=1))
        counts.append(within.sum(dim=1))
        nearest.append(d.min(dim=1).values)
    return torch.cat(hits), torch.cat(counts), torch.cat(nearest)


def precision_recall(real_feats: np.ndarray, gen_feats: np.ndarray, *, k: int = 3, block: int = 1024,
                     dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> dict:
    """Improved precision/recall (+ density/coverage) of generated features (M, D) against real ones (N, D)."""
    real = torch.as_tensor(np.asarray(real_feats), device=device).to(dtype)   # (N, D)
    gen = torch.as_tensor(np.asarray(gen_feats), device=device).to(dtype)     # (M, D)
    if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
        raise ValueError(f"need (N, D) and (M, D) features, got {tuple(real.shape)} and {tuple(gen.shape)}")
    r_real = knn_radii(real, k, block)
    r_gen = knn_radii(gen, k, block)
    gen_in_real, counts, _ = _inside(gen, real, r_real, block)
    real_in_gen, _, nearest_gen = _inside(real, gen, r_gen, block)
    real_covered = nearest_gen <= r_real                  # coverage uses the real point's own ball
    return {
        "precision": gen_in_real.double().mean().item(),
        "recall": real_in_gen.double().mean().item(),
        "density": counts.double().sum().item() / (k * gen.shape[0]),
        "coverage": real_covered.double().mean().item(),
        "k": k,
        "num_real": int(real.shape[0]),
        "num_samples": int(gen.shape[0]),
    }
