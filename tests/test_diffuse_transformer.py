"""The DiT denoiser (diffuse/transformer.py): shapes, adaLN-zero start, class conditioning and the null class,
and a training step through the EDM loss."""
import pytest
import torch

from dualpseudo.diffuse.edm import EDMLoss
from dualpseudo.diffuse.networks import NETWORKS
from dualpseudo.diffuse.train import build_model
from dualpseudo.diffuse.transformer import DiT, sincos_2d


def _randomise_zero_inits(net: DiT) -> None:
    g = torch.Generator().manual_seed(0)
    for name, p in net.named_parameters():
        if p.abs().sum() == 0:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("size, channels", [(16, 1), (28, 1), (8, 4)])
def test_shapes_and_adaln_zero_start(size, channels):
    net = NETWORKS["dit_tiny"](channels, size, 5)
    x = torch.randn(3, channels, size, size)
    out = net(x, torch.randn(3), torch.tensor([0, 4, 5]))
    assert out.shape == x.shape
    assert torch.all(out == 0), "adaLN-zero: the network starts at exactly 0"


def test_position_embedding_is_distinct_per_token():
    pos = sincos_2d(64, 4)
    assert pos.shape == (16, 64)
    assert torch.cdist(pos, pos).fill_diagonal_(1).min() > 0.1


def test_output_depends_on_the_class_and_the_null_class():
    torch.manual_seed(0)
    net = NETWORKS["dit_tiny"](1, 16, 3).eval()
    _randomise_zero_inits(net)
    x = torch.randn(1, 1, 16, 16).expand(4, -1, -1, -1)
    c_noise = torch.full((4,), 0.3)
    out = net(x, c_noise, torch.tensor([0, 1, 3, 0]))                          # 3 = null class
    assert torch.equal(out[0], out[3]), "same input and class: same output"
    assert (out[0] - out[1]).abs().max() > 1e-4 and (out[0] - out[2]).abs().max() > 1e-4
    out_noise = net(x, torch.full((4,), -0.5), torch.tensor([0, 1, 3, 0]))
    assert (out_noise[0] - out[0]).abs().max() > 1e-4, "the noise level conditions the output too"


def test_edm_loss_trains_the_transformer():
    torch.manual_seed(0)
    net = build_model("dit_tiny", 1, 8, 2, 0.5)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    images = torch.zeros(16, 1, 8, 8)
    images[:8, :, :4] = 0.8                                                  # class 0: top half bright
    images[8:, :, 4:] = 0.8                                                  # class 1: bottom half bright
    labels = torch.tensor([0] * 8 + [1] * 8)
    loss_fn = EDMLoss(p_uncond=0.1)
    g = torch.Generator().manual_seed(1)
    first = loss_fn(net, images, labels, generator=g).mean().item()
    for _ in range(60):
        loss = loss_fn(net, images, labels, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = torch.Generator().manual_seed(1)
    assert loss_fn(net, images, labels, generator=g).mean().item() < 0.7 * first
