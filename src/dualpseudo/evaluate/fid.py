"""Fréchet distance between Gaussian fits of two feature sets (FID, Heusel et al., NeurIPS 2017, eq. 6).

    d^2 = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

All statistics are float64. The trace of the matrix square root is computed, by default, from a symmetric
eigenproblem instead of `scipy.linalg.sqrtm` of the non-symmetric product S_1 S_2:

    tr (S_1 S_2)^(1/2) = tr (A S_2 A)^(1/2) = sum_i sqrt(lambda_i(A S_2 A)),   A = S_1^(1/2) (symmetric, via eigh)

A S_2 A is similar to S_1 S_2 on its range (same non-zero eigenvalues), and symmetric PSD, so `eigvalsh` is
backward stable, needs no complex arithmetic and no eps * I fudge when the covariances are singular, which they
are whenever there are fewer images than feature dimensions (e.g. per-class FID on a few hundred images in
2048-d). Round-off eigenvalues below zero are clipped to 0. `method="sqrtm"` gives the pytorch-fid/TTUR
computation (sqrtm with an eps * I offset fallback when non-finite, tiny imaginary parts dropped, an error on
large ones) for cross-checking; the two agree to ~1e-6 relative on well-conditioned inputs (see tests).

Reference statistics of real images are cached as `<cache_dir>/<hash of key>.npz`; the key names the dataset
fingerprint, the feature extractor, the resize mode and the number of images, so any change rebuilds them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.linalg

from ..artifacts import load_cached, save_npz
from ..config import config_hash


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D) with N >= 2."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError("features contain NaN or inf; check the images and the feature extractor's precision")
    mu = feats.mean(axis=0)
    centred = feats - mu                                          # (N, D)
    sigma = centred.T @ centred / (feats.shape[0] - 1)           # (D, D)
    return mu, sigma


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr (S1 S2)^(1/2) for symmetric PSD S1, S2 via eigh (see module docstring)."""
    lam, v = np.linalg.eigh((s1 + s1.T) / 2)
    a = (v * np.sqrt(np.clip(lam, 0.0, None))) @ v.T             # S1^(1/2), (D, D)
    m = a @ s2 @ a
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    """tr (S1 S2)^(1/2) the pytorch-fid way: scipy sqrtm, eps * I offset when non-finite, drop tiny imag parts."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = np.max(np.abs(covmean.imag))
            raise ValueError(f"sqrtm of the covariance product has a large imaginary part ({worst:.3g}); "
                             "the covariances are not PSD or far too ill-conditioned; use method='eigh'")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     method: str = "eigh", eps: float = 1e-6) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D); >= 0."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(s1, s2, eps)
    else:
        raise ValueError(f"method {method!r} must be 'eigh' or 'sqrtm'")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)                                        # round-off can give -1e-12 for identical sets


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray, *, method: str = "eigh") -> float:
    """FID between two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_stats(feats1), *feature_stats(feats2), method=method)


def reference_key(dataset_fingerprint: str, extractor_id: str, resize_mode: str, num_images: int,
                  **extra: Any) -> dict:
    """The cache key of reference statistics; `extra` may add e.g. the split name or the image indices' hash."""
    return {"dataset_fingerprint": dataset_fingerprint, "extractor_id": extractor_id,
            "resize_mode": resize_mode, "num_images": int(num_images), **extra}


def reference_stats(cache_dir: str | Path, key: dict, compute_fn: Callable[[], np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference features: read from `cache_dir/<hash(key)>.npz`, else `compute_fn()` -> (N, D)
    features, stats written atomically. A corrupt or mismatching file is rebuilt. Only one process should call
    this with a given cache (rank 0), or all ranks after rank 0 has built it."""
    key_json = json.dumps(key, sort_keys=True, default=str)
    path = Path(cache_dir).expanduser() / f"{config_hash(key)}.npz"
    z = load_cached(path, key_json, ("mu", "sigma"), key_array="key_json")
    if z is not None:
        mu, sigma = z["mu"], z["sigma"]
        d = mu.shape[0] if mu.ndim == 1 else -1
        if sigma.shape == (d, d) and np.isfinite(sigma).all():
            return mu.astype(np.float64), sigma.astype(np.float64)
    feats = compute_fn()
    mu, sigma = feature_stats(feats)
    save_npz(path, mu=mu, sigma=sigma, key_json=np.array(key_json), num_images=np.array(len(feats)))
    return mu, sigma


def fid_report(gen_feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, *, num_reference: int,
               feature_extractor: str, guidance_scale: float | None = None, sampler: str | None = None,
               steps: int | None = None, method: str = "eigh", **extra: Any) -> dict:
    """FID of generated features (N, D) against reference stats, with the settings that make it comparable."""
    mu, sigma = feature_stats(gen_feats)
    return {
        "fid": frechet_distance(mu, sigma, ref_mu, ref_sigma, method=method),
        "num_samples": int(gen_feats.shape[0]),
        "num_reference": int(num_reference),
        "feature_extractor": feature_extractor,
        "feature_dim": int(gen_feats.shape[1]),
        "guidance_scale": guidance_scale,
        "sampler": sampler,
        "steps": steps,
        **extra,
    }
