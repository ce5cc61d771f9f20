"""Graph-based label propagation on frozen features: Poisson learning (Calder, Cook, Thorpe & Slepcev, ICML 2020).

A transductive stage-1 learner for 1-10 labels per class. Every training image is a node of a k-nearest-neighbour
graph in encoder-feature space with self-tuned Gaussian weights

    w_ij = exp(-4 |x_i - x_j|^2 / d_k(x_i)^2)   for j among the k nearest neighbours of i,  W <- (W + W^T) / 2

(d_k(x_i): the distance from x_i to its k-th neighbour). Poisson learning solves L u = b with the graph
Laplacian L = D - W and a source b that puts (onehot(y_j) - ybar) on each labeled node j and 0 elsewhere (ybar:
the mean one-hot label), by the iteration

    u <- u + D^{-1} (b - L u),   u_0 = 0,

until a random walk started on the labeled nodes has mixed (its distribution is within 1/n of the stationary
one d / sum(d)), as in the authors' `graphlearning` package. Unlike Laplace learning (label propagation with
clamped labels) the solution does not degenerate to a constant at very low label rates.

`balanced` adds per-class offsets s_c, found by a short fixed-point iteration, so that argmax_c (u_ic + s_c) gives
each class the share of the unlabeled images that the labeled images have (the class-size prior of the paper, as a
volume constraint), or a given `prior`: no class can collapse into another. Scores are u + s divided by the
standard deviation of u; `probabilities` is their softmax, a ranking of confidence rather than a calibrated
probability.

New images (the test split) get the weighted mean score of their k nearest graph nodes (inductive).

`whitening` (optional, `graph.whiten`) maps features to their top principal directions scaled to unit variance,
fitted on the real training images without labels, before the graph is built: a few high-variance directions
(overall brightness, garment size) no longer dominate the Euclidean distances between normalised features.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F


def knn(base: torch.Tensor, k: int, queries: torch.Tensor | None = None, chunk: int = 4096
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest rows of `base` (N, D) for each query (Q, D) (default: base itself, self excluded).

    Returns (indices (Q, k) long, squared Euclidean distances (Q, k) float32), nearest first."""
    self_query = queries is None
    queries = base if self_query else queries
    n = len(base)
    if k > n - int(self_query):
        raise ValueError(f"graph.k={k} neighbours asked for, but the graph has only {n} images "
                         f"({n - int(self_query)} possible neighbours); lower graph.k")
    base = base.float()
    base_sq = (base * base).sum(1)                                                   # (N,)
    idx_out, d_out = [], []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk].float()                                      # (c, D)
        d2 = (q * q).sum(1, keepdim=True) + base_sq[None] - 2 * q @ base.T            # (c, N)
        if self_query:
            rows = torch.arange(len(q))
            d2[rows, start + rows] = float("inf")
        d, i = torch.topk(d2, k, dim=1, largest=False)                                # (c, k)
        idx_out.append(i)
        d_out.append(d.clamp_min(0))
    return torch.cat(idx_out), torch.cat(d_out)


def gaussian_weights(dist2: torch.Tensor) -> torch.Tensor:
    """Self-tuned weights exp(-4 d^2 / d_k^2) of (Q, k) squared distances (nearest first) -> (Q, k)."""
    scale = dist2[:, -1:].clamp_min(1e-12)
    return torch.exp(-4 * dist2 / scale)


def knn_graph(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetric sparse weight matrix (N, N) (CSR, float64) of the k-NN graph of `feats` (N, D)."""
    n = len(feats)
    idx, d2 = knn(feats, k)
    w = gaussian_weights(d2).double()
    rows = torch.arange(n).repeat_interleave(k)
    cols = idx.reshape(-1)
    ij = torch.cat([torch.stack([rows, cols]), torch.stack([cols, rows])], dim=1)
    vals = torch.cat([w.reshape(-1), w.reshape(-1)]) / 2
    with warnings.catch_warnings():                       # torch: "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_coo_tensor(ij, vals, (n, n), check_invariants=False).coalesce().to_sparse_csr()


def poisson(W: torch.Tensor, labeled: np.ndarray, labels: np.ndarray, num_classes: int, max_iter: int = 2000,
            tol: float | None = None, strength: np.ndarray | None = None) -> tuple[torch.Tensor, int]:
    """Poisson learning on the sparse symmetric weights W (N, N): (u (N, C) float64, iterations run).

    `labeled` (m,) node indices with `labels` (m,) in [0, C). `strength` (m,) > 0 scales each labeled node's
    source (default 1): the sources are s_i (y_i - y_bar) with y_bar the strength-weighted mean label, so every
    class's sources still sum to zero. The iteration stops when the random walk from the labeled nodes is within
    `tol` (default 1/N) of its stationary distribution, or after `max_iter` steps."""
    n = W.shape[0]
    labeled = torch.as_tensor(np.asarray(labeled), dtype=torch.long)
    onehot = F.one_hot(torch.as_tensor(np.asarray(labels), dtype=torch.long), num_classes).double()  # (m, C)
    if len(labeled) == 0:
        raise ValueError("label propagation needs at least one labeled image")
    deg = torch.sparse.mm(W, torch.ones(n, 1, dtype=torch.float64)).squeeze(1)       # (N,)
    if (deg <= 0).any():
        raise ValueError("label propagation: the k-NN graph has an isolated image (all weights zero)")
    s = torch.ones(len(labeled), 1, dtype=torch.float64) if strength is None else \
        torch.as_tensor(np.asarray(strength), dtype=torch.float64).reshape(-1, 1)     # (m, 1)
    y_bar = (s * onehot).sum(0, keepdim=True) / s.sum()
    source = torch.zeros(n, num_classes, dtype=torch.float64)
    source.index_add_(0, labeled, s * (onehot - y_bar))                               # b: (N, C)
    inv_deg = (1.0 / deg)[:, None]
    u = torch.zeros_like(source)
    walk = torch.zeros(n, dtype=torch.float64)                                       # random walk from labeled
    walk[labeled] = 1.0 / len(labeled)
    stationary = deg / deg.sum()
    t = 0
    while t < max_iter:
        u = u + inv_deg * (source - (deg[:, None] * u - torch.sparse.mm(W, u)))      # u += D^-1 (b - L u)
        walk = torch.sparse.mm(W, (walk / deg)[:, None]).squeeze(1)                  # W D^-1 walk
        t += 1
        if (walk - stationary).abs().max() <= (1.0 / n if tol is None else tol):
            break
    return u, t


def whitening(feats: np.ndarray | torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA whitening fitted on `feats` (N, D): (mean (D,), projection (D, dim)) float32, such that
    `whiten(feats, mean, projection)` has zero mean and identity covariance over `feats`."""
    x = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
    n, d = x.shape
    if not 1 <= dim <= d:
        raise ValueError(f"graph.whiten={dim} asks for more dimensions than the encoder's {d} features; "
                         f"use 1-{d}, or 0 for no whitening")
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / max(n - 1, 1)                                   # (D, D)
    eigval, eigvec = torch.linalg.eigh(cov)                                           # ascending
    top = torch.argsort(eigval, descending=True)[:dim]
    scale = eigval[top].clamp_min(1e-12 * float(eigval.max().clamp_min(1e-300))).rsqrt()
    return mean.float(), (eigvec[:, top] * scale).float()


def whiten(feats: np.ndarray | torch.Tensor, mean: torch.Tensor, projection: torch.Tensor) -> np.ndarray:
    """(N, D) features -> (N, dim) whitened features (float32 numpy)."""
    x = torch.as_tensor(np.asarray(feats), dtype=torch.float32)
    return ((x - mean) @ projection).numpy()


def balance_offsets(scores: torch.Tensor, target: torch.Tensor, iterations: int = 300) -> torch.Tensor:
    """Offsets s (C,) so that argmax_c (scores + s) gives each class about `target` (C,) of the rows.

    A fixed-point iteration s += eta * (target - share), eta shrinking; deterministic."""
    n, c = scores.shape
    s = torch.zeros(c, dtype=scores.dtype)
    spread = float(scores.std()) or 1.0
    for it in range(iterations):
        share = torch.bincount((scores + s).argmax(1), minlength=c).to(scores.dtype) / n
        s += spread * (0.5 / (1 + it / 30)) * (target - share)
    return s - s.mean()


def propagate(feats: np.ndarray | torch.Tensor, labeled: np.ndarray, labels: np.ndarray, num_classes: int, *,
              k: int, max_iter: int, balanced: bool, score_of: np.ndarray | None = None,
              strength: np.ndarray | None = None, prior: np.ndarray | None = None) -> dict:
    """Label every node of the k-NN graph of `feats` (N, D) from the labeled nodes.

    `strength` (m,) weighs each labeled node's source (`poisson`). `balanced` gives each class its share in
    `prior` (C,) (default: its share among `labels`, weighted by `strength`), over the nodes `score_of`
    (default: the unlabeled ones). Returns {"scores": (N, C) float64 tensor, "iterations": int, "offsets": (C,)}.
    """
    x = F.normalize(torch.as_tensor(np.asarray(feats), dtype=torch.float32), dim=1)
    W = knn_graph(x, k)
    u, iters = poisson(W, labeled, labels, num_classes, max_iter, strength=strength)
    u = u / (u.std() if float(u.std()) > 0 else 1.0)
    offsets = torch.zeros(num_classes, dtype=u.dtype)
    if balanced:
        if prior is None:
            w = np.ones(len(labels)) if strength is None else np.asarray(strength, dtype=np.float64)
            prior = np.bincount(np.asarray(labels), weights=w, minlength=num_classes)
        target = np.asarray(prior, dtype=np.float64) / np.sum(prior)
        rows = np.setdiff1d(np.arange(len(x)), labeled) if score_of is None else score_of
        if len(rows):
            offsets = balance_offsets(u[torch.as_tensor(rows)], torch.as_tensor(target, dtype=u.dtype))
    return {"scores": u + offsets, "iterations": iters, "offsets": offsets}


def probabilities(scores: torch.Tensor) -> np.ndarray:
    """Softmax of (N, C) scores as float32 numpy: a confidence ranking, not calibrated."""
    return torch.softmax(scores.double(), dim=1).float().numpy()


def predict_new(base_feats: np.ndarray, base_scores: torch.Tensor, queries: np.ndarray, k: int,
                chunk: int = 4096) -> torch.Tensor:
    """Scores (Q, C) of new images: the Gaussian-weighted mean score of their k nearest graph nodes."""
    base = F.normalize(torch.as_tensor(np.asarray(base_feats), dtype=torch.float32), dim=1)
    q = F.normalize(torch.as_tensor(np.asarray(queries), dtype=torch.float32), dim=1)
    if len(q) == 0:
        return torch.zeros(0, base_scores.shape[1], dtype=base_scores.dtype)
    idx, d2 = knn(base, min(k, len(base)), q, chunk)
    w = gaussian_weights(d2).double()                                                 # (Q, k)
    return (w[:, :, None] * base_scores[idx]).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-300)
