"""`bench/bench_quality.py dpt`: the stage-3 variants it runs beside a recipe are the ones that differ from it."""
import importlib.util

from conftest import ROOT


def _bench_quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dpt_leaves_out_the_variants_equal_to_the_recipe():
    bench = _bench_quality()
    demo = str(ROOT / "configs" / "fashion_mnist.yaml")
    # the demo's stage 3 (label propagation, weight 0.02, the judge) differs from every variant
    assert list(bench.stage3_variants(demo, [])) == ["real", "unweighted", "probe"]
    # the paper's ImageNet recipe: stage 3 is the probe at full weight without a judge, which is what both
    # `unweighted` and `probe` ask for; only the self-training baseline remains
    probe = ["stage1.learner=linear-probe", "stage3.mode=linear-probe", "stage3.pseudo_weight=1",
             "stage3.filter=none"]
    assert list(bench.stage3_variants(demo, probe)) == ["real"]
    # one setting apart from a variant keeps it
    assert list(bench.stage3_variants(demo, ["stage3.pseudo_weight=1", "stage3.filter=none"])) == ["real", "probe"]
    # asked for by name, in the order given; a recipe that already takes both sources leaves `both` out
    assert list(bench.stage3_variants(demo, probe, ["both", "real"])) == ["both", "real"]
    assert list(bench.stage3_variants(demo, ["stage3.pseudo_source=both"], ["real", "both"])) == ["real"]
