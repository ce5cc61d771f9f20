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
                              mbo=[1.0], self_train_steps=2, ceiling=True)
    acc = bench.bench_run(run, args)
    stage1 = read_json(run / "stage1/metrics.json")["pseudo_labels"]
    pool = stage1["num_images"]
    # the same encoder, split and graph settings label the same pool: within one image of the run's own answer
    assert acc["demo"] == pytest.approx(100 * stage1["accuracy"], abs=100 / pool + 1e-9)
    assert set(acc) == {"demo", "k=3", "views=flip", "views=shift", "feats=2x2", "feats=l3+l4", "labeled views=2",
                        "within-class whitened, shrink=0.5", "mbo mu=1", "self-train",
                        "ceiling: logistic regression, every label (test top-1)",
                        "ceiling: 10-NN vote, every label (test top-1)"}
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


def test_bench_graph_reads_the_trunk_as_a_mirror_run_does(graph_run):
    """With `linear_probe.mirror: true` the bench's features are the pipeline's: its `demo` row reproduces that
    stage 1, and averaging those features over the mirror again changes nothing."""
    _, base = graph_run
    other = stage1_beside(base, "mirror", "linear_probe.mirror=true")
    bench = _bench_graph()
    args = argparse.Namespace(k=[], views=["flip"], feats=[], labeled_views=0, wccn=[], mbo=[], self_train_steps=0,
                              ceiling=False)
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
