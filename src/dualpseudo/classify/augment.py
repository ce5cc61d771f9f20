"""Batched image augmentation on the training device: FixMatch's weak and strong views (Sohn et al., 2020).

`weak` is a reflect-pad random crop (+ optional horizontal flip), one gather for the whole batch. `strong` is
`weak` followed by RandAugment (Cubuk et al., 2020) with FixMatch's op pool and magnitude ranges, ops and
magnitudes drawn per image, then Cutout (DeVries & Taylor, 2017). Colour ops run on the sub-batch that drew
them; all geometric ops of an image (rotate, shear x/y, translate x/y) are composed into one affine matrix and
applied by a single `affine_grid`/`grid_sample` after the colour ops (pointwise colour ops commute with warps;
autocontrast/equalize/sharpness nearly do). All randomness comes from the explicit `generator`, which must
live on the images' device, so a seeded generator gives identical views.

Images in and out: float (N, C, H, W) in [-1, 1]. Internally the ops work in [0, 1].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

COLOR_OPS = ("identity", "autocontrast", "equalize", "posterize", "solarize",
             "brightness", "color", "contrast", "sharpness")
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
OPS = COLOR_OPS + GEOMETRIC_OPS


def default_pad(size: int) -> int:
    """Crop padding: 12.5% of the side from 32 px up (FixMatch's 4 px on CIFAR), 2 px at 28 px."""
    return size // 8 if size >= 32 else max(1, size // 14)


def _rand(n: int, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, device=x.device, generator=generator)


def weak(x: torch.Tensor, generator: torch.Generator, hflip: bool, pad: int | None = None) -> torch.Tensor:
    """Random crop of the reflect-padded image (+ horizontal flip with p=0.5 when `hflip`); (N,C,H,W) in [-1,1]."""
    n, c, h, w = x.shape
    pad = default_pad(min(h, w)) if pad is None else pad
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")                       # (N, C, H+2p, W+2p)
    oy = (_rand(n, x, generator) * (2 * pad + 1)).long().clamp_(max=2 * pad)      # (N,) crop offsets
    ox = (_rand(n, x, generator) * (2 * pad + 1)).long().clamp_(max=2 * pad)
    cols = torch.arange(w, device=x.device).expand(n, w)                           # (N, W)
    if hflip:
        flip = _rand(n, x, generator) < 0.5
        cols = torch.where(flip[:, None], (w - 1) - cols, cols)
    rows = oy[:, None] + torch.arange(h, device=x.device)                          # (N, H)
    cols = ox[:, None] + cols                                                      # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]    # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def _gray(u: torch.Tensor) -> torch.Tensor:
    """Luma (N, 1, H, W) of (N, C, H, W) images in [0, 1]."""
    if u.shape[1] == 3:
        return (0.299 * u[:, 0:1] + 0.587 * u[:, 1:2] + 0.114 * u[:, 2:3])
    return u.mean(1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: b + factor * (a - b), factor (N,); factor 1 returns `a`."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp_(0, 1)


def _autocontrast(u: torch.Tensor) -> torch.Tensor:
    lo = u.amin(dim=(2, 3), keepdim=True)
    hi = u.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
    return torch.where(hi > lo, (u - lo) * scale, u)


def _equalize(u: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per image and channel over 256 levels (scatter-add histograms, CDF lookup)."""
    n, c, h, w = u.shape
    q = (u * 255).round_().long().flatten(2)                                 # (N, C, H*W) in 0..255
    hist = torch.zeros(n, c, 256, device=u.device).scatter_add_(2, q, torch.ones_like(q, dtype=u.dtype))
    cdf = hist.cumsum(2)                                                     # (N, C, 256)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float(h * w))).amin(2, keepdim=True)
    lut = ((cdf - cdf_min) / (h * w - cdf_min).clamp_min(1)).clamp_(0, 1)    # (N, C, 256)
    return lut.gather(2, q).view(n, c, h, w)


def _sharpen_base(u: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre weight 5) with the border pixels kept."""
    c = u.shape[1]
    k = torch.ones(3, 3, device=u.device, dtype=u.dtype)
    k[1, 1] = 5
    k = (k / 13).expand(c, 1, 3, 3)
    smooth = F.conv2d(u, k, padding=1, groups=c)
    out = u.clone()
    out[:, :, 1:-1, 1:-1] = smooth[:, :, 1:-1, 1:-1]
    return out


def _color_op(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Apply colour op `name` with per-image magnitude v in [0, 1] (N,) to (N, C, H, W) in [0, 1]."""
    f = 0.05 + 0.9 * v                                                       # enhance factor in [0.05, 0.95]
    if name == "identity":
        return u
    if name == "autocontrast":
        return _autocontrast(u)
    if name == "equalize":
        return _equalize(u)
    if name == "posterize":                                                  # keep 4..8 bits
        bits = (4 + (v * 5).floor().clamp_(max=4)).view(-1, 1, 1, 1)
        levels = torch.pow(2.0, bits)
        return torch.floor(u * 255 / (256 / levels)) * (256 / levels) / 255
    if name == "solarize":                                                   # invert above threshold in [0, 1]
        return torch.where(u >= v.view(-1, 1, 1, 1), 1 - u, u)
    if name == "brightness":
        return _blend(u, torch.zeros_like(u), f)
    if name == "color":
        return _blend(u, _gray(u).expand_as(u), f)
    if name == "contrast":
        return _blend(u, _gray(u).mean(dim=(2, 3), keepdim=True).expand_as(u), f)
    if name == "sharpness":
        return _blend(u, _sharpen_base(u), f)
    raise ValueError(f"unknown colour op {name!r}")


def _geometric_matrix(name: str, v: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) output->input affine maps in normalised coordinates for one geometric op."""
    n = v.shape[0]
    m = torch.eye(3, device=v.device).repeat(n, 1, 1)
    s = sign * v                                                             # symmetric magnitude in [-1, 1]
    if name == "rotate":                                                     # up to 30 degrees
        a = s * math.radians(30)
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    elif name == "shear_x":                                                  # up to 0.3
        m[:, 0, 1] = 0.3 * s
    elif name == "shear_y":
        m[:, 1, 0] = 0.3 * s
    elif name == "translate_x":                                              # up to 30% of the side
        m[:, 0, 2] = 2 * 0.3 * s
    elif name == "translate_y":
        m[:, 1, 2] = 2 * 0.3 * s
    return m


def _cutout(u: torch.Tensor, generator: torch.Generator, cutout: float, fill: float) -> torch.Tensor:
    """Fill a square of side U(0, cutout) * image side, centred uniformly in the image, with `fill`."""
    n, _, h, w = u.shape
    side = _rand(n, u, generator) * cutout * min(h, w)                       # (N,)
    cy = _rand(n, u, generator) * h
    cx = _rand(n, u, generator) * w
    ys = torch.arange(h, device=u.device) + 0.5
    xs = torch.arange(w, device=u.device) + 0.5
    in_y = (ys[None, :] - cy[:, None]).abs() < side[:, None] / 2             # (N, H)
    in_x = (xs[None, :] - cx[:, None]).abs() < side[:, None] / 2             # (N, W)
    hole = (in_y[:, :, None] & in_x[:, None, :])[:, None]                    # (N, 1, H, W)
    return torch.where(hole, torch.full_like(u, fill), u)


def strong(x: torch.Tensor, generator: torch.Generator, hflip: bool, num_ops: int = 2, cutout: float = 0.5,
           pad: int | None = None, fill: float = 0.5) -> torch.Tensor:
    """Weak crop/flip, then `num_ops` RandAugment ops per image, then Cutout; (N,C,H,W) in [-1,1].

    `fill` (in [0, 1] units, 0.5 = FixMatch's gray) fills pixels warped in from outside and the Cutout square.
    """
    n = x.shape[0]
    u = (weak(x, generator, hflip, pad) + 1) * 0.5                           # (N, C, H, W) in [0, 1]
    theta = torch.eye(3, device=x.device).repeat(n, 1, 1)                    # (N, 3, 3) composed warp
    warped = torch.zeros(n, dtype=torch.bool, device=x.device)
    for _ in range(num_ops):
        op = (_rand(n, x, generator) * len(OPS)).long().clamp_(max=len(OPS) - 1)   # (N,) op per image
        v = _rand(n, x, generator)                                                 # (N,) magnitude in [0, 1]
        sign = torch.where(_rand(n, x, generator) < 0.5, -1.0, 1.0)
        for k, name in enumerate(OPS):
            idx = (op == k).nonzero().squeeze(1)
            if idx.numel() == 0 or name == "identity":
                continue
            if name in GEOMETRIC_OPS:
                theta[idx] = theta[idx] @ _geometric_matrix(name, v[idx], sign[idx])
                warped[idx] = True
            else:
                u[idx] = _color_op(name, u[idx], v[idx]).clamp_(0, 1).to(u.dtype)
    idx = warped.nonzero().squeeze(1)
    if idx.numel() > 0:
        sub = u[idx]
        grid = F.affine_grid(theta[idx, :2].to(sub.dtype), list(sub.shape), align_corners=False)
        u[idx] = (F.grid_sample(sub - fill, grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False) + fill).clamp_(0, 1)
    if cutout > 0:
        u = _cutout(u, generator, cutout, fill)
    return (u * 2 - 1).contiguous(memory_format=torch.channels_last)
