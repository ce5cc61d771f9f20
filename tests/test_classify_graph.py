"""Poisson label propagation (classify/graph.py) against hand-computed answers, and its class balance."""
import numpy as np
import pytest
import torch

from dualpseudo.classify import graph


def _dense_to_sparse(w: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(w, dtype=torch.float64).to_sparse_coo().coalesce()


def test_poisson_on_a_path_matches_the_hand_solution():
    # Path 0-1-2-3 with unit weights and a self-loop on every node (the loops leave L = D - W unchanged but make
    # the Jacobi iteration aperiodic). Node 0 is labeled class 0, node 3 class 1, so ybar = (1/2, 1/2) and the
    # class-0 source is b = (1/2, 0, 0, -1/2). L u = b gives a linear u_i = a - i/2; the iteration keeps
    # d^T u = 0 (d = 2, 3, 3, 2), so a = 3/4: u = (3/4, 1/4, -1/4, -3/4), and the class-1 column is its negative.
    w = np.eye(4)
    for i in range(3):
        w[i, i + 1] = w[i + 1, i] = 1.0
    # tol=0: the mixing test never stops it, so the iteration runs to max_iter (the fixed point, to rounding)
    u, iters = graph.poisson(_dense_to_sparse(w), np.array([0, 3]), np.array([0, 1]), 2, max_iter=3000, tol=0.0)
    expected = np.array([[0.75, -0.75], [0.25, -0.25], [-0.25, 0.25], [-0.75, 0.75]])
    np.testing.assert_allclose(u.numpy(), expected, atol=1e-9)
    assert iters == 3000


def test_poisson_source_strength_on_the_path_by_hand():
    # The same path; node 0 (class 0) has strength 3, node 3 (class 1) strength 1. The weighted mean label is
    # ybar = (3/4, 1/4), so the class-0 source is b = (3 (1 - 3/4), 0, 0, 1 (0 - 3/4)) = (3/4, 0, 0, -3/4): 3/2
    # times the unit-strength one, and u scales with it. An unweighted ybar would leave b a net source (no
    # fixed point). Unit strengths give exactly the default answer.
    w = np.eye(4)
    for i in range(3):
        w[i, i + 1] = w[i + 1, i] = 1.0
    W, lab, y = _dense_to_sparse(w), np.array([0, 3]), np.array([0, 1])
    u, _ = graph.poisson(W, lab, y, 2, max_iter=3000, tol=0.0, strength=np.array([3.0, 1.0]))
    expected = 1.5 * np.array([[0.75, -0.75], [0.25, -0.25], [-0.25, 0.25], [-0.75, 0.75]])
    np.testing.assert_allclose(u.numpy(), expected, atol=1e-9)
    default, _ = graph.poisson(W, lab, y, 2, max_iter=50)
    ones, _ = graph.poisson(W, lab, y, 2, max_iter=50, strength=np.ones(2))
    assert torch.equal(default, ones)


def test_vanishing_strength_is_the_same_as_no_label():
    # Labeled nodes of near-zero strength leave the answer of the same graph without those labels.
    rng = np.random.default_rng(0)
    W = graph.knn_graph(torch.as_tensor(rng.normal(size=(80, 3)), dtype=torch.float32), 6)
    real, extra = np.array([0, 1, 2]), np.array([10, 11, 12, 13])
    both, y = np.concatenate([real, extra]), np.array([0, 1, 2, 2, 2, 1, 0])
    kw = dict(max_iter=300, tol=0.0)                      # the same number of steps for all three
    without, _ = graph.poisson(W, real, y[:3], 3, **kw)
    faint, _ = graph.poisson(W, both, y, 3, strength=np.r_[np.ones(3), np.full(4, 1e-9)], **kw)
    full, _ = graph.poisson(W, both, y, 3, **kw)
    np.testing.assert_allclose(faint.numpy(), without.numpy(), atol=1e-6)
    assert not np.allclose(full.numpy(), without.numpy(), atol=1e-3)


def test_poisson_stops_when_the_random_walk_has_mixed():
    w = np.ones((5, 5))                                      # complete graph with loops: mixes in one step
    u, iters = graph.poisson(_dense_to_sparse(w), np.array([0, 1]), np.array([0, 1]), 2, max_iter=100)
    assert iters == 1
    assert u[0, 0] > 0 > u[1, 0]


def test_knn_and_gaussian_weights_by_hand():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    idx, d2 = graph.knn(x, 2)
    assert idx.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    assert d2.tolist() == [[1, 9], [1, 4], [4, 9], [16, 36]]
    w = graph.gaussian_weights(d2)
    np.testing.assert_allclose(w[0].numpy(), [np.exp(-4 / 9), np.exp(-4)], rtol=1e-6)
    # k = 1: every edge weighs exp(-4 d^2 / d_1^2) = exp(-4); edges 0->1, 1->0, 2->1, 3->2, symmetrised by halves
    e = np.exp(-4)
    W = graph.knn_graph(x, 1).to_dense()
    np.testing.assert_allclose(W.numpy(), [[0, e, 0, 0], [e, 0, .5 * e, 0], [0, .5 * e, 0, .5 * e], [0, 0, .5 * e, 0]],
                               rtol=1e-6)


def test_balance_offsets_give_each_class_its_share():
    rng = np.random.default_rng(0)
    scores = torch.as_tensor(rng.normal(size=(1000, 3)) + np.array([1.0, 0.0, -1.0]))   # class 0 dominates
    assert torch.bincount(scores.argmax(1), minlength=3)[0] > 600
    s = graph.balance_offsets(scores, torch.full((3,), 1 / 3, dtype=torch.float64))
    share = torch.bincount((scores + s).argmax(1), minlength=3).double() / 1000
    np.testing.assert_allclose(share.numpy(), [1 / 3] * 3, atol=0.02)


def test_propagate_labels_two_clusters_and_new_points():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(30, 2)) * 0.2 + [4.0, 0.0]
    b = rng.normal(size=(30, 2)) * 0.2 + [0.0, 4.0]
    feats = np.concatenate([a, b]).astype(np.float32)
    r = graph.propagate(feats, np.array([0, 30]), np.array([0, 1]), 2, k=5, max_iter=500, balanced=True)
    assert r["scores"].argmax(1).tolist() == [0] * 30 + [1] * 30
    probs = graph.probabilities(r["scores"])
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    new = graph.predict_new(feats, r["scores"], np.array([[3.9, 0.1], [0.1, 3.8]], np.float32), k=5)
    assert new.argmax(1).tolist() == [0, 1]


def test_a_given_prior_keeps_a_class_that_few_extra_labeled_nodes_would_shrink():
    """Stage 3's `class_prior: real`: pseudo-images kept unevenly (10, 10, 1) by a filter skew the weighted class
    shares and the balance shrinks class 2 onto the others; the real labels' shares (1, 1, 1) keep it whole."""
    rng = np.random.default_rng(2)
    centres = np.array([[4.0, 0.0], [0.0, 4.0], [-3.0, -3.0]])
    real = np.concatenate([rng.normal(size=(40, 2)) * 0.3 + c for c in centres]).astype(np.float32)
    truth = np.repeat(np.arange(3), 40)
    extra_y = np.array([0] * 10 + [1] * 10 + [2])
    extra = (centres[extra_y] + rng.normal(size=(len(extra_y), 2)) * 0.3).astype(np.float32)
    feats = np.concatenate([real, extra])
    labeled = np.concatenate([[0, 40, 80], 120 + np.arange(len(extra_y))])
    labels = np.concatenate([[0, 1, 2], extra_y])
    pool = np.setdiff1d(np.arange(120), [0, 40, 80])
    kw = dict(k=8, max_iter=500, balanced=True, score_of=pool, strength=np.ones(len(labels)))
    skewed = graph.propagate(feats, labeled, labels, 3, **kw)["scores"][pool].argmax(1).numpy()
    kept = graph.propagate(feats, labeled, labels, 3, prior=np.ones(3), **kw)["scores"][pool].argmax(1).numpy()
    assert (skewed == 2).mean() < 0.15, "weighted shares: class 2 gets about 2/24 of the pool"
    assert (kept == truth[pool]).mean() > 0.97, "the real labels' shares: every cluster keeps its class"


def test_too_many_neighbours_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="graph.k=5"):
        graph.knn(torch.zeros(4, 2), 5)


def test_most_confident_real_picks_per_class_by_confidence_then_index():
    from dualpseudo.stages.retrain import most_confident_real
    pl = {"label": np.array([0, 0, 0, 1, 1, 0, 1]),
          "confidence": np.array([.9, .5, .9, .7, .8, 1.0, .6], dtype=np.float32),
          "is_labeled": np.array([False, False, False, False, False, True, False])}
    # class 0: image 5 is labeled (never picked); 0 and 2 tie at 0.9 -> lower index first; class 1: 4 (.8), 3 (.7)
    assert most_confident_real(pl, 2, 2).tolist() == [0, 2, 4, 3]
    assert most_confident_real(pl, 5, 2).tolist() == [0, 2, 1, 4, 3, 6]       # a class gives all it has


def test_whitening_gives_zero_mean_identity_covariance_in_the_top_directions():
    rng = np.random.default_rng(0)
    axes = np.linalg.qr(rng.normal(size=(5, 5)))[0]                    # orthonormal principal directions
    x = (rng.normal(size=(4000, 5)) * np.array([10, 5, 2, 1, 0.1])) @ axes.T + 3.0
    mean, proj = graph.whitening(x, 5)
    w = graph.whiten(x, mean, proj)
    np.testing.assert_allclose(w.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(w.T), np.eye(5), atol=1e-3)
    mean2, proj2 = graph.whitening(x, 2)                                # the two largest directions, unit scale
    w2 = graph.whiten(x, mean2, proj2)
    assert w2.shape == (4000, 2)
    np.testing.assert_allclose(np.abs(proj2.numpy().T @ axes[:, :2]) * np.array([10, 5]), np.eye(2), atol=0.05)
    np.testing.assert_allclose(np.cov(w2.T), np.eye(2), atol=1e-3)


def test_whitening_to_more_dimensions_than_the_features_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="graph.whiten=4"):
        graph.whitening(np.zeros((10, 3)), 4)
