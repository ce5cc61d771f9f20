"""Samplers for the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma, and classifier-free guidance.

Every sampler has the signature `sampler(denoiser, x_T, sigmas) -> x_0` (as in k-diffusion), where
`denoiser(x, sigma) -> D(x)` with labels bound by closure, `x_T = sigmas[0] * noise` and `sigmas` is a
decreasing 1-D tensor ending in 0. So samplers are interchangeable and testable with closed-form denoisers.

- `edm_sigmas`: the time steps of Karras et al. 2022 (EDM), Eq. 5, with rho = 7.
- `sample_heun`: EDM Algorithm 1 (deterministic 2nd-order Heun, S_churn = 0): 2 * steps - 1 evaluations.
- `sample_dpmpp_2m`: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), in the log-sigma parameterisation of
  k-diffusion (t = -ln sigma): one evaluation per step, 2nd-order multistep in the data prediction.
- `cfg_denoiser`: D = D_c + s (D_c - D_u) (Ho & Salimans 2022, with w = s); s = 0 is the conditional model.
"""
from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def edm_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """EDM Eq. 5 noise levels: (steps + 1,) float64, from sigma_max down to sigma_min, then a final 0."""
    i = torch.arange(steps, dtype=torch.float64, device=device)
    denom = max(steps - 1, 1)
    sig = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sig, sig.new_zeros(1)])


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x_T: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """EDM Algorithm 1 (deterministic): Euler step plus a 2nd-order correction except on the last step."""
    x = x_T.double()
    for i in range(len(sigmas) - 1):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        d_cur = (x - denoiser(x, s_cur).double()) / s_cur
        x_next = x + (s_next - s_cur) * d_cur
        if s_next > 0:
            d_next = (x_next - denoiser(x_next, s_next).double()) / s_next
            x_next = x + (s_next - s_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.to(x_T.dtype)


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x_T: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) with t = -ln(sigma); the step to sigma = 0 returns the denoised estimate."""
    x = x_T.double()
    old_denoised = None
    for i in range(len(sigmas) - 1):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, s_cur).double()
        if s_next == 0:
            x = denoised
            break
        t, t_next = -s_cur.log(), -s_next.log()
        h = t_next - t
        if old_denoised is None:
            d = denoised                                               # first step: DPM-Solver++(1) = DDIM
        else:
            h_last = t - (-sigmas[i - 1].log())
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (s_next / s_cur) * x - (-h).expm1() * d
        old_denoised = denoised
    return x.to(x_T.dtype)


SAMPLERS: dict[str, Callable[[Denoiser, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}


def cfg_denoiser(denoise_cond_uncond: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 scale: float) -> Denoiser:
    """Guidance wrapper: `denoise_cond_uncond(x, sigma) -> (D_c, D_u)` -> `denoiser(x, sigma) -> D_c + s (D_c - D_u)`."""
    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        D_c, D_u = denoise_cond_uncond(x, sigma)
        return D_c + scale * (D_c - D_u)
    return denoiser
