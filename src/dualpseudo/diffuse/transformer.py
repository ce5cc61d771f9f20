"""A class-conditional diffusion transformer (DiT; Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"), the raw network F(x_in, c_noise, class_labels) of the EDM preconditioning (`edm.py`).

Dual Pseudo Training's ImageNet recipe (You et al. 2023; PAPER.md, Recipe B) trains a transformer denoiser in the
latent space of an autoencoder (U-ViT there, with long skips; this one is DiT-style with adaLN-zero, whose
conditioning path is the easier one to test). Pieces: patchify (p x p patches -> tokens) with fixed 2-D sin-cos
positions; a sinusoidal embedding of c_noise plus a learned class embedding with one extra row (index
`num_classes` is the null class of classifier-free guidance), summed into c; blocks of self-attention and MLP whose
LayerNorms are modulated by c (shift, scale) and whose residual branches are gated by c, the modulation layers
initialised to zero so every block starts as the identity and the output starts at 0 (adaLN-zero).

Sizes are named constructors in `TRANSFORMERS` (merged into `networks.NETWORKS`), each called as
`TRANSFORMERS[name](img_channels, image_size, num_classes)` like the UNets, so a transformer works in pixel space
too (`stage2.network: dit_tiny`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding: (grid*grid, width), rows in raster order."""
    if width % 4:
        raise ValueError(f"transformer width {width} must be a multiple of 4")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))  # (W/4,)
    pos = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(pos, pos, indexing="ij")
    out = [f(c.reshape(-1, 1) * omega) for c in (yy, xx) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1).float()                                          # (grid*grid, width)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a scalar per sample: (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                                       # (N, dim/2)
    return torch.cat([args.cos(), args.sin()], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (N, T, D) * (1 + scale) + shift, with shift/scale (N, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-zero transformer block: x (N, T, D), c (N, D) -> (N, T, D)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * width, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=1)   # (N, D) each
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1))
        q, k, v = qkv.reshape(N, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (N, heads, T, dh)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, T, D)
        x = x + gate1[:, None] * self.proj(a)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """F(x, c_noise, class_labels): (N, C, H, W) float, (N,) float, (N,) int64 in [0, num_classes] -> (N, C, H, W)."""

    def __init__(self, img_channels: int, image_size: int, num_classes: int, *, width: int = 256, depth: int = 8,
                 heads: int = 4, patch: int = 2, mlp_ratio: int = 4):
        super().__init__()
        if width % heads:
            raise ValueError(f"transformer width {width} is not a multiple of heads {heads}")
        self.img_channels, self.image_size, self.num_classes = img_channels, image_size, num_classes
        self.patch, self.width = patch, width
        self.grid = -(-image_size // patch)                                       # tokens per side (padded)
        self.embed = nn.Linear(img_channels * patch * patch, width)
        self.register_buffer("pos", sincos_2d(width, self.grid), persistent=False)  # (T, D)
        self.map_noise = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.map_label = nn.Embedding(num_classes + 1, width)                     # row num_classes: null class
        nn.init.normal_(self.map_label.weight, std=0.02)
        self.blocks = nn.ModuleList([DiTBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_ada = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, img_channels * patch * patch)
        for m in (self.out_ada, self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        p, g = self.patch, self.grid
        pad = g * p - H
        h = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)) if pad else x      # (N, C, g*p, g*p)
        # patchify: (N, C, g*p, g*p) -> (N, g*g, C*p*p)
        h = h.reshape(N, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(N, g * g, C * p * p)
        h = self.embed(h) + self.pos.to(h.dtype)                                  # (N, T, D)
        c = self.map_noise(timestep_embedding(c_noise * 1000, self.width)) + self.map_label(class_labels)  # (N, D)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.out_ada(F.silu(c)).chunk(2, dim=1)
        h = self.out(modulate(self.out_norm(h), shift, scale))                    # (N, T, C*p*p)
        # unpatchify: (N, g*g, C*p*p) -> (N, C, g*p, g*p), then crop the padding
        h = h.reshape(N, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(N, C, g * p, g * p)
        return h[:, :, pad // 2: pad // 2 + H, pad // 2: pad // 2 + W]


def dit_tiny(img_channels: int, image_size: int, num_classes: int) -> DiT:
    """About 0.17M parameters: for tests and smoke runs."""
    return DiT(img_channels, image_size, num_classes, width=64, depth=2, heads=2, patch=2)


def dit_small(img_channels: int, image_size: int, num_classes: int) -> DiT:
    """About 10M parameters (width 256, depth 8)."""
    return DiT(img_channels, image_size, num_classes, width=256, depth=8, heads=4, patch=2)


def dit_l(img_channels: int, image_size: int, num_classes: int) -> DiT:
    """The paper's U-ViT-L size (width 1024, depth 20, 16 heads, patch 2) in DiT form (383M parameters)."""
    return DiT(img_channels, image_size, num_classes, width=1024, depth=20, heads=16, patch=2)


def dit_h(img_channels: int, image_size: int, num_classes: int) -> DiT:
    """The paper's U-ViT-H size (width 1152, depth 28, 16 heads, patch 2) in DiT form."""
    return DiT(img_channels, image_size, num_classes, width=1152, depth=28, heads=16, patch=2)


TRANSFORMERS: dict[str, Callable[[int, int, int], DiT]] = {
    "dit_tiny": dit_tiny,
    "dit_small": dit_small,
    "dit_l": dit_l,
    "dit_h": dit_h,
}
