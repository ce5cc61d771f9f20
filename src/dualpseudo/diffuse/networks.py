"""Class-conditional UNet for small images (28-32 px), lean ADM / DDPM++ style (Dhariwal & Nichol 2021;
Song et al. 2021; as configured in Karras et al. 2022, "EDM", Appendix F).

The raw network F(x_in, c_noise, class_labels) of the EDM preconditioning (`edm.py`, Table 1). Pieces:
GroupNorm + SiLU residual blocks whose second normalisation is modulated by the embedding (scale/shift),
one self-attention block at the lowest resolution, a Fourier embedding of c_noise and a learned class
embedding with one extra row: index `num_classes` is the null (unconditional) class used by
classifier-free guidance. Inputs are zero-padded to a multiple of the total downsampling (28 -> 32) and
cropped back. For CPU speed the stem may fold `patch x patch` pixels into channels (pixel-unshuffle), so the
convolutions run on fewer, wider positions; everything is channels_last and bf16-autocast friendly.

Model sizes are named constructors in `NETWORKS`, each called as `NETWORKS[name](img_channels, image_size,
num_classes)`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= max_groups that divides `channels` with >= 4 channels per group."""
    for g in range(min(max_groups, channels // 4), 0, -1):
        if channels % g == 0:
            return g
    return 1


class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 (CPU's bf16 channels_last kernel is slow), returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (EDM's NCSN++ noise embedding): (N,) -> (N, dim)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().outer(2 * math.pi * self.freqs)          # (N, dim/2)
        return torch.cat([x.cos(), x.sin()], dim=1)            # (N, dim)


class ResBlock(nn.Module):
    """GN-SiLU-conv, GN modulated by the embedding (1 + scale, shift), SiLU-dropout-conv; residual."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, skip_scale: float):
        super().__init__()
        self.norm0 = GroupNorm(_groups(in_ch), in_ch, eps=1e-6)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * out_ch)
        self.norm1 = GroupNorm(_groups(out_ch), out_ch, eps=1e-6, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.skip_scale = skip_scale

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)   # (N, C, 1, 1) each
        h = torch.addcmul(shift, self.norm1(h), scale + 1)
        h = self.conv1(self.dropout(F.silu(h)))
        skip = self.skip(x) if self.skip is not None else x
        return (h + skip) * self.skip_scale


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, pre-GroupNorm, residual."""

    def __init__(self, channels: int, head_dim: int, skip_scale: float):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = GroupNorm(_groups(channels), channels, eps=1e-6)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.skip_scale = skip_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(N, H * W, C)               # (N, L, C)
        q, k, v = self.qkv(h).reshape(N, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)                             # (N, heads, L, C/heads)
        h = self.proj(h.transpose(1, 2).reshape(N, H * W, C))                   # (N, L, C)
        h = h.reshape(N, H, W, C).permute(0, 3, 1, 2)                           # (N, C, H, W) channels_last
        return (x + h) * self.skip_scale


class UNet(nn.Module):
    """F(x, c_noise, class_labels): (N, C, H, W) float, (N,) float, (N,) int64 in [0, num_classes] -> (N, C, H, W)."""

    def __init__(self, img_channels: int, image_size: int, num_classes: int, *, model_channels: int = 64,
                 channel_mult: tuple[int, ...] = (1, 2, 2), num_blocks: int = 2, attn_levels: tuple[int, ...] = (),
                 patch: int = 1, head_dim: int = 64, dropout: float = 0.0, emb_mult: int = 4,
                 channels_last: bool = True):
        super().__init__()
        self.img_channels, self.image_size, self.num_classes = img_channels, image_size, num_classes
        self.patch = patch
        self.multiple = patch * 2 ** (len(channel_mult) - 1)
        emb_dim = model_channels * emb_mult
        skip_scale = math.sqrt(0.5)
        levels = len(channel_mult)
        attn_levels = {lv % levels for lv in attn_levels}

        # embeddings: noise level and class (row num_classes = null class)
        self.map_noise = FourierEmbedding(model_channels)
        self.map_label = nn.Embedding(num_classes + 1, emb_dim)
        self.map_layer0 = nn.Linear(model_channels, emb_dim)
        self.map_layer1 = nn.Linear(emb_dim, emb_dim)

        # encoder
        chans = [model_channels * m for m in channel_mult]
        self.stem = nn.Conv2d(img_channels * patch * patch, chans[0], 3, padding=1)
        self.enc = nn.ModuleList()
        skips = [chans[0]]
        c = chans[0]
        for lv, ch in enumerate(chans):
            if lv > 0:
                self.enc.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
            for _ in range(num_blocks):
                self.enc.append(ResBlock(c, ch, emb_dim, dropout, skip_scale))
                c = ch
                if lv in attn_levels:
                    self.enc.append(AttnBlock(c, head_dim, skip_scale))
                skips.append(c)

        # middle
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout, skip_scale), AttnBlock(c, head_dim, skip_scale),
                                  ResBlock(c, c, emb_dim, dropout, skip_scale)])

        # decoder: each ResBlock consumes one skip; an upsampling conv ends every level but the top one
        self.dec = nn.ModuleList()
        for lv in reversed(range(levels)):
            ch = chans[lv]
            for _ in range(num_blocks + 1):
                self.dec.append(ResBlock(c + skips.pop(), ch, emb_dim, dropout, skip_scale))
                c = ch
                if lv in attn_levels:
                    self.dec.append(AttnBlock(c, head_dim, skip_scale))
            if lv > 0:
                self.dec.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.dec.append(nn.Conv2d(c, c, 3, padding=1))
        self.out_norm = GroupNorm(_groups(c), c, eps=1e-6)
        self.out_conv = nn.Conv2d(c, img_channels * patch * patch, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        # embedding (N, emb_dim)
        emb = F.silu(self.map_layer0(self.map_noise(c_noise)))
        emb = F.silu(self.map_layer1(emb) + self.map_label(class_labels))

        # pad to a multiple of the downsampling, fold patches into channels
        ph, pw = (-H) % self.multiple, (-W) % self.multiple
        h = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)) if ph or pw else x
        if self.patch > 1:
            h = F.pixel_unshuffle(h, self.patch)                       # (N, C*p*p, H/p, W/p)
        h = self.stem(h.contiguous(memory_format=self.memory_format))

        skips = [h]
        for m in self.enc:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
            if not isinstance(m, AttnBlock):
                skips.append(h)
        for m in self.mid:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
        for m in self.dec:
            if isinstance(m, ResBlock):
                h = m(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = m(h)
        h = self.out_conv(F.silu(self.out_norm(h)))
        if self.patch > 1:
            h = F.pixel_shuffle(h, self.patch)                         # (N, C, H_pad, W_pad)
        return h[:, :, ph // 2: ph // 2 + H, pw // 2: pw // 2 + W]


def unet_tiny(img_channels: int, image_size: int, num_classes: int) -> UNet:
    """About 0.2M parameters: for tests and smoke runs."""
    return UNet(img_channels, image_size, num_classes, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                patch=2, head_dim=32)


def unet_small(img_channels: int, image_size: int, num_classes: int) -> UNet:
    """About 2.5M parameters: the CPU default for 28 px (32/16/8 px levels of 48/96/96 channels)."""
    return UNet(img_channels, image_size, num_classes, model_channels=48, channel_mult=(1, 2, 2), num_blocks=1)


def unet_base(img_channels: int, image_size: int, num_classes: int) -> UNet:
    """About 28M parameters: for GPUs and 32 px colour images."""
    return UNet(img_channels, image_size, num_classes, model_channels=128, channel_mult=(1, 2, 2), num_blocks=2,
                attn_levels=(-1,), dropout=0.1)


def unet_ddpmpp(img_channels: int, image_size: int, num_classes: int) -> UNet:
    """EDM's class-conditional CIFAR-10 network (DDPM++, Karras et al. 2022, Appendix F.2) as far as this UNet goes.

    The same width, depth and attention: model_channels 128, channel_mult (2, 2, 2) (256 channels at 32/16/8 px),
    4 residual blocks per level, self-attention at 16x16 (one head, as DDPM++) and in the middle, dropout 0.13,
    embedding width 512. It differs from EDM's SongUNet in the details of this UNet: strided-conv down- and
    nearest+conv upsampling instead of resampling residual blocks, scale-and-shift (not shift-only) embedding
    modulation, a stem to 256 (not 128) channels, attention after every block of the 16x16 level on the way up
    (EDM: the last one), a learned class embedding instead of a linear map of one-hot labels, no augmentation
    labels. 58,027,523 parameters for 3x32x32 images and 10 classes (counted by
    tests/test_device_check.py; EDM's network has about 56M).
    """
    return UNet(img_channels, image_size, num_classes, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                attn_levels=(1,), head_dim=256, dropout=0.13)


NETWORKS: dict[str, Callable[[int, int, int], UNet]] = {
    "unet_tiny": unet_tiny,
    "unet_small": unet_small,
    "unet_base": unet_base,
    "unet_ddpmpp": unet_ddpmpp,
}

from .transformer import TRANSFORMERS  # noqa: E402  (the DiT sizes, same constructor signature)

NETWORKS.update(TRANSFORMERS)
