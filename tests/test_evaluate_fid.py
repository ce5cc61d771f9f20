"""FID math against closed forms, and the reference-statistics cache."""
import numpy as np
import pytest

from dualpseudo.config import config_hash

from dualpseudo.evaluate.fid import (feature_stats, fid_from_features, fid_report, frechet_distance,
                                     reference_key, reference_stats)

METHODS = ["eigh", "sqrtm"]


def _closed_form(mu1, a, mu2, b):
    """||mu1 - mu2||^2 + sum(a + b - 2 sqrt(a b)) for covariances with common eigenvectors, eigenvalues a, b."""
    return float(((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum())


@pytest.mark.parametrize("method", METHODS)
def test_fid_of_set_with_itself_is_zero(method):
    feats = np.random.default_rng(0).normal(size=(400, 32))
    assert fid_from_features(feats, feats, method=method) == pytest.approx(0.0, abs=1e-8)


def test_fid_self_zero_with_singular_covariance():
    feats = np.random.default_rng(1).normal(size=(20, 64))          # N < D: rank-deficient covariance
    assert fid_from_features(feats, feats, method="eigh") == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_fid_diagonal_gaussians_closed_form(method):
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(_closed_form(mu1, a, mu2, b), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_fid_commuting_covariances_closed_form(method):
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))                  # shared eigenvectors
    a, b = rng.uniform(0.05, 4.0, size=16), rng.uniform(0.05, 4.0, size=16)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    got = frechet_distance(mu1, s1, mu2, s2, method=method)
    assert got == pytest.approx(_closed_form(mu1, a, mu2, b), rel=1e-8)


def test_fid_one_dimensional_by_hand():
    # N(0, 4) vs N(3, 1): 9 + 4 + 1 - 2 * sqrt(4) = 10
    got = frechet_distance(np.array([0.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]]))
    assert got == pytest.approx(10.0)


def test_fid_independent_of_sample_order_and_methods_agree():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(600, 24)), rng.normal(0.3, 1.2, size=(500, 24))
    base = fid_from_features(x, y)
    assert fid_from_features(x[rng.permutation(600)], y[rng.permutation(500)]) == pytest.approx(base, rel=1e-10)
    assert fid_from_features(x, y, method="sqrtm") == pytest.approx(base, rel=1e-6)
    assert fid_from_features(y, x) == pytest.approx(base, rel=1e-8)                 # symmetric


def test_feature_stats_float64_and_shapes():
    feats = np.random.default_rng(5).normal(size=(50, 6)).astype(np.float32)
    mu, sigma = feature_stats(feats)
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (6,) and sigma.shape == (6, 6)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError):
        feature_stats(feats[:1])


def test_reference_cache_reused_and_rebuilt(tmp_path):
    calls = []
    feats = np.random.default_rng(6).normal(size=(40, 5))

    def compute():
        calls.append(1)
        return feats

    key = reference_key("fashion_mnist:abc", "inception:123", "tf_legacy", 40)
    mu, sigma = reference_stats(tmp_path, key, compute)
    mu2, sigma2 = reference_stats(tmp_path, key, compute)
    assert len(calls) == 1                                          # second call read the cache
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)

    reference_stats(tmp_path, {**key, "num_images": 39}, compute)   # key changed -> rebuilt
    reference_stats(tmp_path, {**key, "resize_mode": "bilinear_aa"}, compute)
    assert len(calls) == 3
    assert len(list(tmp_path.glob("*.npz"))) == 3

    path = tmp_path / f"{config_hash(key)}.npz"
    path.write_bytes(b"not a zip file")                             # corrupt -> rebuilt, then reused
    mu3, _ = reference_stats(tmp_path, key, compute)
    reference_stats(tmp_path, key, compute)
    assert len(calls) == 4
    np.testing.assert_array_equal(mu, mu3)
    assert not list(tmp_path.glob(".*.tmp"))                        # atomic writes leave no temp files


def test_fid_report_states_settings():
    rng = np.random.default_rng(7)
    ref = rng.normal(size=(100, 4))
    gen = rng.normal(size=(30, 4))
    rep = fid_report(gen, *feature_stats(ref), num_reference=100, feature_extractor="x",
                     guidance_scale=1.5, sampler="dpmpp_2m", steps=20)
    assert rep["num_samples"] == 30 and rep["num_reference"] == 100
    assert (rep["guidance_scale"], rep["sampler"], rep["steps"]) == (1.5, "dpmpp_2m", 20)
    assert rep["fid"] == pytest.approx(fid_from_features(gen, ref))
