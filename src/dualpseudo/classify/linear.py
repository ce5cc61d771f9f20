"""The ImageNet recipe's stage-1/3 learner: a frozen encoder and an L2-regularised logistic regression.

Dual Pseudo Training (You et al., NeurIPS 2023, Recipe B in PAPER.md) labels ImageNet with MSN's linear
evaluation: features of a frozen self-supervised encoder, centred and L2-normalised, and a multinomial logistic
regression without intercept fitted on the labeled images (stage 1) or on the labeled images plus the
pseudo-images (stage 3). Here the encoder is any torch module that maps images to (N, D) features:

- `pixels`       flattened raw pixels in [0, 1] (a trivial encoder for tests and smoke runs);
- `inception`    the evaluation Inception-v3 pool3 network (`evaluate.inception`), 2048-d;
- `torchscript`  a TorchScript file at `linear_probe.encoder_path`, called on float32 (N, C, H, W) in [0, 1];
                 resizing, cropping and mean/std normalisation belong inside the scripted module
                 (e.g. an MSN ViT-L/7 exported with its resize-256 / centre-crop-224 preprocessing).

Objective (the convention of `linear_probe.l2_strength`, written lambda below):

    L(W) = (1/N) * [ sum_i CE(softmax(x_i W), y_i) + (lambda / 2) * ||W||_F^2 ],   W: (D, C), no intercept

i.e. mean cross-entropy plus an L2 penalty of strength lambda/N, the paper's "0.0025/N" with lambda = 0.0025.
It is fitted full-batch with L-BFGS (strong Wolfe line search) in float64; being strictly convex it has one
minimum. Features are extracted in batches and cached on disk in shards (`cached_features`): each shard is an
atomic .npz keyed by the encoder's identity and the hash of its images, so a rerun skips the valid shards.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifacts import ArtifactError, array_hash, file_hash, load_cached, load_weights, save_npz, save_weights
from ..evaluate.features import as_nhwc_uint8, extract_features
from ..runtime import autocast
from ..training import to_unit

ENCODERS = ("pixels", "inception", "torchscript")
META_KEY = "dualpseudo_classifier"


# ---------------------------------------------------------------------------------------------- encoders
class PixelFeatures(nn.Module):
    """uint8 (N, H, W, C) -> float32 (N, H*W*C) in [0, 1]."""

    extractor_id = "pixels"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return to_unit(images.reshape(len(images), -1))


class TorchScriptFeatures(nn.Module):
    """uint8 (N, H, W, C) -> the scripted module's (N, D) features of float32 (N, C, H, W) in [0, 1]."""

    def __init__(self, path: Path, precision: str = "fp32"):
        super().__init__()
        self.precision = precision
        with warnings.catch_warnings():          # torch >= 2.10 deprecates jit.load
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                self.net = torch.jit.load(str(path), map_location="cpu").eval()
            except (RuntimeError, ValueError) as e:
                from ..config import ConfigError
                raise ConfigError(f"linear_probe.encoder_path: {path} cannot be loaded as TorchScript "
                                  f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                                  f"export the encoder again with torch.jit.save") from None
        self.extractor_id = f"torchscript:{file_hash(path)}:{precision}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit(images.permute(0, 3, 1, 2))                           # (N, C, H, W) in [0, 1]
        with autocast(x.device, self.precision):
            feats = self.net(x)
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        return feats.reshape(len(images), -1).float()                     # (N, D)


def build_encoder(encoder: str, encoder_path: str | None = None, precision: str = "fp32") -> nn.Module:
    """The frozen feature module named by `linear_probe.encoder`; it has an `extractor_id` string attribute."""
    if encoder == "pixels":
        return PixelFeatures()
    if encoder == "inception":
        from ..evaluate.inception import inception_feature_fn
        return inception_feature_fn(encoder_path)
    if encoder == "torchscript":
        if not encoder_path:
            raise FileNotFoundError("linear_probe.encoder=torchscript needs linear_probe.encoder_path: the path of a "
                                    "TorchScript file (torch.jit.save of your encoder, e.g. MSN ViT-L/7 with its "
                                    "preprocessing) that maps float (N, C, H, W) in [0, 1] to (N, D) features")
        path = Path(encoder_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"linear_probe.encoder_path={str(path)!r} does not exist: put the encoder's TorchScript file there "
                f"(torch.jit.save(torch.jit.script(encoder), {str(path)!r}); the paper used MSN ViT-L/7, whose "
                f"weights must be downloaded and exported by you, as nothing is downloaded at run time)")
        return TorchScriptFeatures(path, precision)
    raise ValueError(f"linear_probe.encoder={encoder!r} is not one of {list(ENCODERS)}")


class MirrorAveraged(nn.Module):
    """A feature module's features averaged over each image and its mirror image (left-right flip):
    uint8 (N, H, W, C) -> (N, D). Its `extractor_id` says so, so cached features of the two never mix.

    Test-time augmentation of a frozen encoder that was not trained to be mirror-invariant (`linear_probe.mirror`):
    the features keep what the encoder learned about orientation, and a mirrored image gets the same node."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.extractor_id = f"{encoder.extractor_id}:mirror"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.encoder(images) + self.encoder(images.flip(2)))


# ---------------------------------------------------------------------------------------------- feature cache
def _load_shard(path: Path, key: str, rows: int) -> np.ndarray | None:
    """The shard's features when the file is readable, made by `key`, and has `rows` rows; else None."""
    z = load_cached(path, key, ("features",))
    if z is None or z["features"].ndim != 2 or len(z["features"]) != rows:
        return None
    return z["features"]


def cached_features(fn: Callable[[torch.Tensor], torch.Tensor], images_uint8: np.ndarray, cache_dir: Path, *,
                    extractor_id: str, shard_size: int, batch_size: int, device: str | torch.device,
                    progress: bool = False) -> np.ndarray:
    """Features float32 (N, D) of uint8 images (N, H, W[, C]), computed shard by shard and cached in `cache_dir`.

    Shard s holds images [s * shard_size, (s + 1) * shard_size) in `shard_{s:05d}.npz`; a shard is reused when
    its key (extractor id + hash of its images) matches, recomputed otherwise.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    images = as_nhwc_uint8(images_uint8)
    cache_dir = Path(cache_dir)
    out = []
    for s, start in enumerate(range(0, len(images), shard_size)):
        block = images[start:start + shard_size]                         # (B, H, W, C)
        key = f"{extractor_id}|{array_hash(block)}"
        path = cache_dir / f"shard_{s:05d}.npz"
        feats = _load_shard(path, key, len(block))
        if feats is None:
            feats = extract_features(fn, block, batch_size=batch_size, device=device, progress=progress,
                                     desc=f"features {cache_dir.name} {s}")
            save_npz(path, features=feats.astype(np.float32), key=np.array(key))
        out.append(feats)
    if not out:
        raise ValueError(f"no images to extract features from (cache {cache_dir})")
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------- the probe
def normalise(feats: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Centre then L2-normalise rows: (N, D) -> (N, D) of unit norm (a zero row stays zero)."""
    return F.normalize(feats - mean, dim=1, eps=1e-12)


def logistic_objective(W: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2_strength: float) -> torch.Tensor:
    """(1/N) [sum_i CE(x_i W, y_i) + lambda/2 ||W||^2] for x (N, D), W (D, C), y (N,) int; a scalar."""
    n = len(x)
    return F.cross_entropy(x @ W, y, reduction="sum") / n + 0.5 * l2_strength / n * (W * W).sum()


def fit_logistic(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, num_classes: int, l2_strength: float,
                 *, max_iter: int = 1000, device: str | torch.device = "cpu") -> torch.Tensor:
    """Minimise `logistic_objective` with full-batch L-BFGS in float64; returns W (D, num_classes) float64 on CPU."""
    x = torch.as_tensor(x, dtype=torch.float64, device=device)
    y = torch.as_tensor(y, dtype=torch.long, device=device)
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"fit_logistic: {len(x)} feature rows for {len(y)} labels")
    if l2_strength <= 0:
        raise ValueError(f"l2_strength must be > 0 (got {l2_strength}); it keeps the problem strictly convex")
    W = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, history_size=20,
                            tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = logistic_objective(W, x, y, l2_strength)
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().cpu()


class LinearProbe(nn.Module):
    """Probabilities from features: softmax(normalise(f, mean) @ W); f (N, D) -> (N, C)."""

    def __init__(self, W: torch.Tensor, mean: torch.Tensor):
        super().__init__()
        self.register_buffer("W", W.double())                             # (D, C)
        self.register_buffer("mean", mean.double())                       # (D,)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = normalise(feats.double().to(self.W.device), self.mean)
        return torch.softmax(x @ self.W, dim=1)


def fit_probe(feats_fit: np.ndarray, y_fit: np.ndarray, feats_centre: np.ndarray, num_classes: int,
              l2_strength: float, *, max_iter: int = 1000, device: str | torch.device = "cpu") -> LinearProbe:
    """Centre with the mean of `feats_centre` (N_c, D), normalise, fit W on (feats_fit, y_fit); the probe."""
    mean = torch.as_tensor(feats_centre, dtype=torch.float64).mean(0)     # (D,)
    x = normalise(torch.as_tensor(feats_fit, dtype=torch.float64), mean)
    W = fit_logistic(x, y_fit, num_classes, l2_strength, max_iter=max_iter, device=device)
    return LinearProbe(W, mean)


def fit_objective(probe: LinearProbe, feats_fit: np.ndarray, y_fit: np.ndarray, l2_strength: float) -> dict:
    """The objective and its gradient norm at the probe's W, for (feats_fit, y_fit); a convergence check."""
    x = normalise(torch.as_tensor(feats_fit, dtype=torch.float64), probe.mean.cpu())
    W = probe.W.detach().cpu().clone().requires_grad_(True)
    loss = logistic_objective(W, x, torch.as_tensor(y_fit, dtype=torch.long), l2_strength)
    (grad,) = torch.autograd.grad(loss, W)
    return {"value": float(loss.detach()), "grad_norm": float(grad.norm())}


@torch.no_grad()
def probe_predict(probe: LinearProbe, feats: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """Class probabilities float32 (N, C) of features (N, D)."""
    out = [probe(torch.from_numpy(feats[i:i + batch_size])).float().cpu() for i in range(0, len(feats), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, probe.W.shape[1]), np.float32)


def save_probe(path: str | Path, probe: LinearProbe, meta: dict) -> Path:
    """Write W (D, C) and mean (D,) as float64 safetensors with `meta` (encoder spec, num_classes, ...)."""
    return save_weights(path, {"W": probe.W, "mean": probe.mean}, {"network": "linear-probe", **meta}, META_KEY)


def load_probe(path: str | Path) -> tuple[LinearProbe, dict]:
    """(probe, meta) from a file written by `save_probe`; no pickle involved."""
    tensors, meta = load_weights(path, META_KEY, "dualpseudo linear probe")
    try:
        return LinearProbe(tensors["W"], tensors["mean"]), meta
    except KeyError as e:
        raise ArtifactError(f"{path} is not a dualpseudo linear probe (missing {e}); delete it to rebuild") from None
