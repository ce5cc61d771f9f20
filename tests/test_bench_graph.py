"""`bench/bench_graph.py` on the label-propagation smoke run: its `demo` row is the run's own stage 1, and every
variant runs and labels the same pool."""
import argparse
import importlib.util

import numpy as np
import pytest

from dualpseudo.artifacts import read_json

from conftest import ROOT, stage1_beside


def _bench_graph():
    spec = importlib.util.spec_from_file_location("bench_graph", ROOT / "bench" / "bench_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_graph_reproduces_stage1_and_runs_every_variant(graph_run):
    run, _ = graph_run
    bench = _bench_graph()
    args = argparse.Namespace(k=[3], views=["flip", "shift"], feats=list(bench.POOLS), labeled_views=2, wccn=[0.5],
                              mbo=[1.0], self_train_steps=2, pseudo_train_steps=2, ceiling=True, power=0.5,
                              probe_ensemble=[0.0, 0.5], redraw=[1.0], redraw_per=2, em=[10.0],
                              ensemble=[str(run / "encoder/encoder.safetensors")])
    acc = bench.bench_run(run, args)
    stage1 = read_json(run / "stage1/metrics.json")["pseudo_labels"]
    pool = stage1["num_images"]
    # the same encoder, split and graph settings label the same pool: within one image of the run's own answer
    assert acc["demo"] == pytest.approx(100 * stage1["accuracy"], abs=100 / pool + 1e-9)
    assert set(acc) == {"demo", "k=3", "views=flip", "views=shift", "feats=2x2", "feats=l3+l4", "labeled views=2",
                        "within-class whitened, shrink=0.5", "mbo mu=1", "self-train",
                        "fine-tuned on generated pseudo-images", "fine-tuned on real pseudo-images",
                        "power=0.5", "+ probe, lambda=0", "+ probe, lambda=0.5", "weak copies of labeled images",
                        "redrawn labeled images, sigma=1", "balanced centres, lambda=10",
                        "balanced centres x graph, lambda=10", "ceiling: logistic regression, every label (test top-1)",
                        "ceiling: 10-NN vote, every label (test top-1)", "+ encoder encoder"}
    # a probe at weight 0 leaves the graph's labels as they are
    assert acc["+ probe, lambda=0"] == pytest.approx(acc["demo"], abs=1e-9)
    # the run's own encoder beside itself: two equal whitened blocks, the same normalised nodes, the same labels
    assert acc["+ encoder encoder"] == pytest.approx(acc["demo"], abs=100 / pool + 1e-9)
    # every pool accuracy is a whole number of the pool's images
    for name, value in acc.items():
        if not name.startswith("ceiling"):
            assert 0 <= value <= 100
            assert value * pool / 100 == pytest.approx(round(value * pool / 100), abs=1e-6), name
    # more labeled nodes change the graph: the augmented copies enter as labeled nodes, scored rows stay the pool
    problem = bench.Problem(run)
    feats = bench.embed(problem.trunk(), problem.ds.train_images)
    extra = feats[problem.labeled][:2] + 0.01
    scores = problem.scores(feats, extra=(extra, problem.y[problem.labeled][:2]))
    assert scores.shape == (len(problem.y), problem.C)
    assert np.isfinite(scores.numpy()).all()


def test_the_pseudo_training_sets_are_the_labeled_images_plus_as_many_per_class(graph_run):
    """The generated set adds the run's pseudo-images with the labels they were drawn for; its baseline adds as
    many real images per class, stage 1's most confident ones, with their pseudo-labels."""
    run, _ = graph_run
    bench = _bench_graph()
    problem = bench.Problem(run)
    sets = bench.pseudo_train_sets(problem, run)
    gen = np.load(run / "stage2/pseudo_images.npz")
    pl = np.load(run / "stage1/pseudo_labels.npz")
    n_lb = len(problem.labeled)
    for source, (x, y) in sets.items():
        assert len(x) == len(y) == n_lb + len(gen["labels"]), source
        assert (x[:n_lb] == problem.ds.train_images[problem.labeled]).all() and (y[:n_lb] == problem.y[problem.labeled]).all()
        assert (np.bincount(y[n_lb:], minlength=problem.C) == np.bincount(gen["labels"], minlength=problem.C)).all()
    assert (sets["generated"][0][n_lb:] == gen["images"]).all()
    # the real images: unlabeled ones, each carrying its stage-1 pseudo-label
    x_real, y_real = sets["real"]
    matches = [np.flatnonzero((problem.ds.train_images == img).all(axis=(1, 2, 3))) for img in x_real[n_lb:]]
    assert all(len(m) >= 1 and not pl["is_labeled"][m[0]] and pl["label"][m[0]] == y for m, y in
               zip(matches, y_real[n_lb:]))


def test_bench_graph_reads_the_trunk_as_a_mirror_run_does(graph_run):
    """With `linear_probe.mirror: true` the bench's features are the pipeline's: its `demo` row reproduces that
    stage 1, and averaging those features over the mirror again changes nothing."""
    _, base = graph_run
    other = stage1_beside(base, "mirror", "linear_probe.mirror=true")
    bench = _bench_graph()
    args = argparse.Namespace(k=[], views=["flip"], feats=[], labeled_views=0, wccn=[], mbo=[], self_train_steps=0,
                              pseudo_train_steps=0, ceiling=False, power=0.0, probe_ensemble=[], redraw=[],
                              redraw_per=0, ensemble=[], em=[])
    acc = bench.bench_run(other, args)
    stage1 = read_json(other / "stage1/metrics.json")["pseudo_labels"]
    assert acc["demo"] == pytest.approx(100 * stage1["accuracy"], abs=100 / stage1["num_images"] + 1e-9)
    assert acc["views=flip"] == acc["demo"]
    # the features are the mirror average, not the plain trunk's
    problem = bench.Problem(other)
    net = problem.trunk()
    plain = bench.embed(net, problem.ds.train_images[:8])
    flipped = bench.embed(net, problem.ds.train_images[:8, :, ::-1].copy())
    np.testing.assert_allclose(problem.features(net, problem.ds.train_images[:8]), 0.5 * (plain + flipped),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain, flipped, atol=1e-4)


def test_redrawn_labeled_images_stay_near_their_source_at_low_noise(graph_run):
    """SDEdit from a small noise level returns (nearly) the labeled image itself, from a large one another image;
    each copy keeps its source's true class."""
    run, _ = graph_run
    bench = _bench_graph()
    problem = bench.Problem(run)
    source = np.repeat(problem.ds.train_images[problem.labeled], 2, 0).astype(np.float64)
    from dualpseudo.api import load_generator
    generator = load_generator(run)
    near, labels = bench.redraw_labeled(problem, generator, 0.01, 2, steps=2)
    far, _ = bench.redraw_labeled(problem, generator, 40.0, 2, steps=4)
    assert near.shape == far.shape == source.shape and near.dtype == np.uint8
    assert (labels == np.repeat(problem.y[problem.labeled], 2)).all()
    assert np.abs(near - source).mean() < 3.0                     # uint8 levels: the noise at sigma 0.01 is ~1.3
    assert np.abs(far - source).mean() > 10 * np.abs(near - source).mean()


def test_a_fine_tune_depends_on_its_seed_alone(graph_run):
    """A fine-tuning variant gives the same features whatever ran before it (the global RNG's state), and other
    features for another seed."""
    import torch
    run, _ = graph_run
    bench = _bench_graph()
    problem = bench.Problem(run)
    images, labels = problem.ds.train_images[problem.labeled], problem.y[problem.labeled]
    torch.manual_seed(1)
    first = bench.fine_tune(problem, images, labels, 2, seed=0)
    torch.manual_seed(2)
    torch.rand(100)
    again = bench.fine_tune(problem, images, labels, 2, seed=0)
    other = bench.fine_tune(problem, images, labels, 2, seed=1)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_balanced_centres_keep_the_labels_and_the_class_shares(graph_run):
    """The labeled images keep their labels; every class takes about its prior share of the pool (the Sinkhorn
    step); with lambda 0 and the graph's probabilities as a factor the answer is the graph's, balanced."""
    run, _ = graph_run
    bench = _bench_graph()
    problem = bench.Problem(run)
    feats = problem.features(problem.trunk(), problem.ds.train_images)
    scores = problem.scores(feats)
    for lam, prior in ((10.0, False), (10.0, True)):
        label = bench.balanced_em(problem, feats, scores, lam, graph_prior=prior)
        assert label.shape == (len(problem.y),)
        np.testing.assert_array_equal(label[problem.labeled], problem.y[problem.labeled])
        share = np.bincount(label[problem.pool], minlength=problem.C) / len(problem.pool)
        target = np.bincount(problem.y[problem.labeled], minlength=problem.C) / len(problem.labeled)
        assert np.abs(share - target).max() < 0.1, (lam, prior, share)
    # no distance term: the posteriors are the graph's softmax rebalanced, so the graph's confident rows survive
    graph_only = bench.balanced_em(problem, feats, scores, 0.0, graph_prior=True)
    agree = (graph_only[problem.pool] == scores.argmax(1).numpy()[problem.pool]).mean()
    assert agree > 0.8
