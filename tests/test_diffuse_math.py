"""Closed-form checks of the EDM preconditioning, loss, samplers and guidance wrapper."""
import math

import pytest
import torch

from dualpseudo.diffuse.edm import EDMLoss, EDMPrecond
from dualpseudo.diffuse.networks import NETWORKS, UNet
from dualpseudo.diffuse.samplers import SAMPLERS, cfg_denoiser, edm_sigmas


def tiny_net(num_classes=3, size=12, channels=1):
    torch.manual_seed(0)
    return UNet(channels, size, num_classes, model_channels=8, channel_mult=(1, 2), num_blocks=1, head_dim=8)


def test_precond_limits():
    P = EDMPrecond(tiny_net(), sigma_data=0.5)
    c_skip, c_out, c_in, c_noise = P.coefficients(torch.tensor([1e-6, 1e4], dtype=torch.float64))
    assert c_skip[0] == pytest.approx(1.0, abs=1e-9) and c_out[0] == pytest.approx(0.0, abs=1e-5)
    assert c_skip[1] == pytest.approx(0.0, abs=1e-8) and c_out[1] == pytest.approx(0.5, rel=1e-6)
    assert c_in[1] * 1e4 == pytest.approx(1.0, rel=1e-6) and c_noise[1] == pytest.approx(math.log(1e4) / 4)
    x = torch.randn(2, 1, 12, 12)
    assert torch.allclose(P(x, 1e-6, torch.tensor([0, 3])), x, atol=1e-5)   # D(x, 0) = x


@pytest.mark.parametrize("name,lo,hi", [("unet_tiny", 0.1, 0.3), ("unet_small", 1.5, 2.7), ("unet_base", 20, 35)])
def test_networks_sizes_and_shapes(name, lo, hi):
    net = NETWORKS[name](3, 28, 10)
    assert lo < sum(p.numel() for p in net.parameters()) / 1e6 < hi
    if name != "unet_base":                                           # same code path, too slow for a unit test
        out = net(torch.randn(2, 3, 28, 28), torch.zeros(2), torch.tensor([0, 10]))   # 10 = null class
        assert out.shape == (2, 3, 28, 28)


def test_loss_shape_finite_and_backward():
    P = EDMPrecond(tiny_net(), 0.5)
    loss = EDMLoss(p_uncond=0.5)(P, torch.rand(5, 1, 12, 12) * 2 - 1, torch.tensor([0, 1, 2, 0, 3]))
    assert loss.shape == (5,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(p.grad is not None for p in P.parameters() if p.requires_grad)


@pytest.mark.parametrize("sampler,steps", [("heun", 18), ("dpmpp_2m", 20)])
def test_sampler_point_mass(sampler, steps):
    mu = torch.linspace(-0.8, 0.8, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    sigmas = edm_sigmas(steps)
    x_T = torch.randn(64, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    x0 = SAMPLERS[sampler](lambda x, s: mu.expand_as(x), x_T, sigmas)
    assert torch.allclose(x0, mu.expand_as(x0), atol=1e-3)


@pytest.mark.parametrize("sampler,steps,tol", [("heun", 18, 0.08), ("dpmpp_2m", 20, 0.08),
                                               ("heun", 100, 0.015), ("dpmpp_2m", 100, 0.015)])
def test_sampler_gaussian(sampler, steps, tol):
    mu, s = 0.3, 0.5
    denoise = lambda x, sigma: mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)  # exact D for N(mu, s^2)
    sigmas = edm_sigmas(steps)
    x_T = torch.randn(4000, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    x0 = SAMPLERS[sampler](denoise, x_T, sigmas)
    assert x0.mean().item() == pytest.approx(mu, abs=0.02)
    assert x0.std().item() == pytest.approx(s, rel=tol)   # discretisation error shrinks with steps


def test_edm_sigmas():
    sig = edm_sigmas(18)
    assert sig.shape == (19,) and sig[0] == pytest.approx(80) and sig[-2] == pytest.approx(0.002) and sig[-1] == 0
    assert (sig[1:] < sig[:-1]).all()


def test_guidance_neutral_scale_is_conditional():
    P = EDMPrecond(tiny_net(), 0.5).eval()
    with torch.no_grad():
        for p in P.parameters():                                     # non-trivial outputs (zero-init layers)
            p.add_(torch.randn_like(p) * 0.05)
    labels, null = torch.tensor([0, 2]), torch.tensor([3, 3])
    both = lambda x, s: P(torch.cat([x, x]), s, torch.cat([labels, null])).chunk(2)
    x, sigma = torch.randn(2, 1, 12, 12), torch.tensor(1.5)
    with torch.no_grad():
        D_c = P(x, sigma, labels)
        assert torch.allclose(cfg_denoiser(both, 0.0)(x, sigma), D_c, atol=1e-5)
        D_u = P(x, sigma, null)
        assert not torch.allclose(D_c, D_u, atol=1e-4)
        assert torch.allclose(cfg_denoiser(both, 2.0)(x, sigma), 3 * D_c - 2 * D_u, atol=1e-4)
