"""Improved precision/recall (and density/coverage) on hand-made point clouds."""
import numpy as np
import pytest

from dualpseudo.evaluate.prdc import knn_radii, precision_recall

REAL = np.array([0.0, 1.0, 2.0, 3.0, 4.0])[:, None]     # k=3 radii (self excluded): 3, 2, 2, 2, 3 -> manifold [-3, 7]


def test_knn_radii_by_hand():
    import torch
    np.testing.assert_allclose(knn_radii(torch.tensor(REAL), k=3).numpy(), [3, 2, 2, 2, 3])
    np.testing.assert_allclose(knn_radii(torch.tensor(REAL), k=1).numpy(), [1, 1, 1, 1, 1])


def test_precision_by_hand():
    gen = np.array([-3.0, 7.0, 7.5, 20.0, 21.0, 22.0])[:, None]
    # -3 and 7 lie exactly on the real manifold's boundary (<= counts), the rest outside
    assert precision_recall(REAL, gen, k=3)["precision"] == pytest.approx(2 / 6)


def test_recall_density_coverage_by_hand():
    gen = np.array([0.0, 0.1, 0.2, 0.3])[:, None]        # k=3 radii 0.3, 0.2, 0.2, 0.3 -> manifold [-0.3, 0.6]
    r = precision_recall(REAL, gen, k=3)
    assert r["precision"] == pytest.approx(1.0)          # all inside [-3, 7]
    assert r["recall"] == pytest.approx(1 / 5)           # only real 0 inside the generated manifold
    assert r["coverage"] == pytest.approx(3 / 5)         # nearest gen within the real radius for 0, 1, 2
    assert r["density"] == pytest.approx(12 / 12)        # each gen point in 3 real balls
    assert (r["num_real"], r["num_samples"], r["k"]) == (5, 4, 3)


def test_symmetry_and_blocking():
    rng = np.random.default_rng(0)
    real, gen = rng.normal(size=(120, 8)), rng.normal(0.5, 1.0, size=(90, 8))
    a = precision_recall(real, gen, k=3)
    b = precision_recall(gen, real, k=3)
    assert a["recall"] == pytest.approx(b["precision"]) and a["precision"] == pytest.approx(b["recall"])
    small_blocks = precision_recall(real, gen, k=3, block=7)
    assert small_blocks == a
    f32 = precision_recall(real.astype(np.float32), gen.astype(np.float32), k=3, dtype=__import__("torch").float32)
    assert abs(f32["precision"] - a["precision"]) <= 2 / 90 and abs(f32["recall"] - a["recall"]) <= 2 / 120


def test_identical_sets_are_perfect():
    x = np.random.default_rng(1).normal(size=(50, 4))
    r = precision_recall(x, x, k=3)
    assert r["precision"] == r["recall"] == r["coverage"] == 1.0
