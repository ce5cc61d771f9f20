"""Every entry of the network tables builds and runs on a tiny input: the classifiers (logits and the `.features`
the evaluation's oracle reads), the self-supervised encoder's trunks, and every diffusion denoiser (UNets and
transformers: output shaped as the input, the null class accepted).

The large denoisers are built and run on the `meta` device: shapes are propagated through every layer, but no
weights are allocated and nothing is computed (dit_l and dit_h would take seconds and gigabytes to build, and
unet_ddpmpp / unet_base a second each to run on a CPU); the small ones run for real.
"""
import numpy as np
import pytest
import torch

from dualpseudo.classify.contrastive import ContrastiveModel, trunk
from dualpseudo.classify.networks import NETWORKS as CLASSIFIERS
from dualpseudo.classify.networks import build_network
from dualpseudo.diffuse.networks import NETWORKS as DENOISERS
from dualpseudo.evaluate.domain import domain_feature_fn
from dualpseudo.evaluate.features import extract_features

SIZE = 16                                   # the smallest side every classifier accepts


def _images(n: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, SIZE, SIZE, generator=g) * 2 - 1          # float in [-1, 1]


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifier_logits_and_features(name):
    """(N, C, H, W) -> logits (N, classes); `.features(x)` is the (N, D, h, w) map whose average `fc` turns into
    the logits, so the oracle's domain features (evaluate/domain.py) work for every network it may be."""
    torch.manual_seed(0)
    net = build_network(name, 3, 1, SIZE).eval()
    x = _images(2)
    with torch.no_grad():
        logits, feats = net(x), net.features(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert feats.ndim == 4 and feats.shape[:2] == (2, net.fc.in_features)
    with torch.no_grad():
        torch.testing.assert_close(net.fc(feats.mean(dim=(2, 3))), logits)
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 1), dtype=np.uint8)
    domain = extract_features(domain_feature_fn(net), images, batch_size=2, device="cpu", progress=False)
    assert domain.shape == (3, net.fc.in_features) and np.isfinite(domain).all()


def test_wide_resnet_features_on_colour_images():
    """WRN-28-2 on 3-channel 32 px images: 128 feature maps at 8x8, the logits their average's linear map."""
    torch.manual_seed(0)
    net = build_network("wrn_28_2", 10, 3, 32).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        feats = net.features(x)
        assert feats.shape == (2, 128, 8, 8)
        torch.testing.assert_close(net.fc(feats.mean(dim=(2, 3))), net(x))


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_encoder_trunk_and_projection(name):
    """The encoder's trunk is the classifier without `fc`: (N, C, H, W) -> pooled features (N, D)."""
    torch.manual_seed(0)
    net, dim = trunk(name, 1, SIZE)
    assert dim == build_network(name, 2, 1, SIZE).fc.in_features
    x = _images(2)
    with torch.no_grad():
        assert net.eval()(x).shape == (2, dim)
        model = ContrastiveModel(name, 1, SIZE, proj_dim=8).eval()
        assert model.dim == dim and model(x).shape == (2, 8)


REAL_DENOISERS = {"unet_tiny", "unet_small", "dit_tiny", "dit_small"}      # a real forward is cheap


@pytest.mark.parametrize("name", sorted(DENOISERS))
def test_denoiser_output_is_shaped_as_its_input(name):
    """F(x, c_noise, labels) -> x's shape, for a side (10) that is not a multiple of the downsampling or the
    patch (padded and cropped back), 3 channels, and labels up to the null class (= num_classes)."""
    classes = 4
    device = "cpu" if name in REAL_DENOISERS else "meta"
    torch.manual_seed(0)
    with torch.device(device):
        net = DENOISERS[name](3, 10, classes).eval()
        x = torch.randn(2, 3, 10, 10)
        labels = torch.tensor([0, classes])
        c_noise = torch.randn(2)
    with torch.no_grad():
        out = net(x, c_noise, labels)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device.type == device
    if device == "cpu":
        assert torch.isfinite(out).all()
