"""EDM preconditioning and training loss (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Table 1 and Eq. 2, 7, 8).

D(x; sigma, y) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), y) with
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)      c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)             c_noise = ln(sigma) / 4
Training draws ln(sigma) ~ N(P_mean, P_std^2) and weights the squared error by
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
Class labels are int64 indices; index `num_classes` is the null class of classifier-free guidance.
"""
from __future__ import annotations

import torch
from torch import nn


class EDMPrecond(nn.Module):
    """Wraps a raw network F into the denoiser D(x, sigma, labels) of EDM Table 1."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)
        self.num_classes = int(net.num_classes)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) for sigma of any shape (float64-safe)."""
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor) -> torch.Tensor:
        """D(x): x (N, C, H, W) float32, sigma scalar or (N,), labels (N,) int64 -> (N, C, H, W) float32."""
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma                # (N,)
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in self.coefficients(sigma))
        F_x = self.net(c_in * x, c_noise.flatten(), labels)
        return c_skip * x + c_out * F_x.float()


class EDMLoss:
    """Per-sample EDM loss: `loss(net, images, labels) -> (N,)`; labels dropped to the null class w.p. p_uncond."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, p_uncond: float = 0.1):
        self.P_mean, self.P_std, self.sigma_data, self.p_uncond = P_mean, P_std, sigma_data, p_uncond

    def __call__(self, net: EDMPrecond, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """images (N, C, H, W) in [-1, 1], labels (N,) int64 -> weighted squared error per image (N,)."""
        N, dev = images.shape[0], images.device
        rnd_normal = torch.randn(N, device=dev, generator=generator)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()                           # (N,)
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        drop = torch.rand(N, device=dev, generator=generator) < self.p_uncond
        labels = torch.where(drop, torch.full_like(labels, net.num_classes), labels)
        noise = torch.randn(images.shape, device=dev, generator=generator) * sigma.reshape(-1, 1, 1, 1)
        D_yn = net(images + noise, sigma, labels)
        return weight * ((D_yn - images) ** 2).flatten(1).mean(dim=1)
