"""The self-supervised-encoder recipe through the pipeline: encoder step, label propagation in stages 1 and 3,
the encoder shared across labeled splits, what an encoder change re-runs, the real-image baseline, bad settings."""
from pathlib import Path

import numpy as np
import pytest

from dualpseudo.artifacts import load_npz, read_json
from dualpseudo.cli import main

from conftest import SMOKE_GRAPH, stage1_beside


def _api_test_top1(run_dir) -> float:
    """Test top-1 of the run's stage-1 classifier loaded through the API, on the smoke recipe's test images."""
    import dualpseudo
    from dualpseudo.data.datasets import make_synthetic
    ds = make_synthetic(4, 48, 16, size=16, seed=0)
    return float((dualpseudo.load_classifier(run_dir, stage=1).predict(ds.test_images) == ds.test_labels).mean())


def test_label_propagation_runs_all_three_stages(graph_run):
    run, base = graph_run
    m1, m3 = read_json(run / "stage1/metrics.json"), read_json(run / "stage3/metrics.json")
    assert m1["learner"] == m3["learner"] == "label-propagation" and m3["mode"] == "label-propagation"
    assert m1["graph"]["encoder"] == "ssl" and m1["graph"]["num_nodes"] == 192
    assert m1["graph"]["num_labeled_nodes"] == 8
    assert m3["graph"]["num_nodes"] == 192 + 32 and m3["graph"]["num_labeled_nodes"] == 8 + 32
    assert m1["test"]["top1"] > 0.5, "encoder features + Poisson learning beat chance (0.25) on the synthetic bars"
    assert m3["delta_top1"] == pytest.approx(m3["test"]["top1"] - m1["test"]["top1"])
    pl = load_npz(run / "stage1/pseudo_labels.npz", ("label", "confidence", "is_labeled"))
    assert pl["label"].shape == (192,) and pl["is_labeled"].sum() == 8
    assert np.all((pl["confidence"] > 0) & (pl["confidence"] <= 1))
    # the encoder: trained once in the shared cache, copied into the run directory, an input of stages 1 and 3
    assert (run / "encoder/encoder.safetensors").is_file() and (run / "encoder/manifest.json").is_file()
    shared = list((base / "cache" / "encoders").glob("*/encoder.safetensors"))
    assert len(shared) == 1 and shared[0].read_bytes() == (run / "encoder/encoder.safetensors").read_bytes()
    assert "encoder" in read_json(run / "stage1/manifest.json")["inputs"]
    assert (run / "report.html").is_file()


def test_another_split_reuses_the_shared_encoder(graph_run, capsys):
    run, base = graph_run
    other = stage1_beside(base, "split3", "data.labels_per_class=3")   # the synthetic images depend on split_seed
    summary = read_json(other / "encoder/manifest.json")["summary"]
    assert summary["reused_shared"] is True
    assert (other / "encoder/encoder.safetensors").read_bytes() == (run / "encoder/encoder.safetensors").read_bytes()
    assert read_json(other / "stage1/split.json")["labeled_indices"] != read_json(run / "stage1/split.json")["labeled_indices"]
    assert not (other / "report.html").exists()          # a stage alone writes a report only where one exists


@pytest.mark.parametrize("objective", ["moco", "nnclr"])
def test_another_objective_is_its_own_shared_encoder_and_labels_stage1(graph_run, objective):
    run, base = graph_run
    other = stage1_beside(base, objective, f"encoder.objective={objective}", "encoder.queue=64")
    summary, demo = (read_json(d / "encoder/manifest.json")["summary"] for d in (other, run))
    assert summary["reused_shared"] is False and summary["key"] != demo["key"]
    from dualpseudo.classify.contrastive import load_encoder
    assert load_encoder(other / "encoder/encoder.safetensors")[1]["objective"] == objective
    m1 = read_json(other / "stage1/metrics.json")
    assert m1["learner"] == "label-propagation" and m1["test"]["top1"] > 0.5


def test_an_encoder_setting_reruns_the_encoder_and_both_classifiers(graph_run, capsys):
    run, base = graph_run
    capsys.readouterr()
    assert main(["run", SMOKE_GRAPH, "--run-dir", str(run), "--dry-run", "--force", "--set", "encoder.steps=20",
                 "--set", f"evaluation.cache_dir={base / 'cache'}"]) == 0
    plan = capsys.readouterr().out.split("plan for")[1]
    lines = {l.split()[0]: l for l in plan.splitlines()[1:] if l.strip()}
    assert lines["encoder"].split()[1] == "run" and lines["stage1"].split()[1] == "run"
    assert all(lines[s].split()[1] == "run" for s in ("stage2", "stage3"))
    # a graph setting keeps the encoder and re-runs stage 1 onwards
    assert main(["run", SMOKE_GRAPH, "--run-dir", str(run), "--dry-run", "--force", "--set", "graph.k=4",
                 "--set", f"evaluation.cache_dir={base / 'cache'}"]) == 0
    plan = capsys.readouterr().out.split("plan for")[1]
    lines = {l.split()[0]: l for l in plan.splitlines()[1:] if l.strip()}
    assert lines["encoder"].split()[1] == "reuse" and lines["stage1"].split()[1] == "run"


def _stage3_variant(graph_run, name: str, *settings: str) -> tuple[Path, dict]:
    """Stage 3 re-run with `settings` in a copy of the smoke run (stages 1-2 reused unless a setting changes
    them): (copy, its stage-3 metrics)."""
    import shutil
    run, base = graph_run
    copy = base / name
    shutil.copytree(run, copy)
    sets = [a for s in settings for a in ("--set", s)]
    assert main(["stage3", SMOKE_GRAPH, "--run-dir", str(copy), "--force", *sets,
                 "--set", f"evaluation.cache_dir={base / 'cache'}"]) == 0
    return copy, read_json(copy / "stage3/metrics.json")


def test_real_pseudo_image_baseline_takes_the_most_confident_real_images(graph_run):
    run, _ = graph_run
    copy, m3 = _stage3_variant(graph_run, "real", "stage3.pseudo_source=real")
    assert m3["pseudo_source"] == "real" and m3["num_pseudo_images"] == 32
    assert m3["graph"]["num_nodes"] == 192 + 32
    assert read_json(copy / "stage1/manifest.json") == read_json(run / "stage1/manifest.json")   # stage 1 kept


def test_stage3_alone_with_real_pseudo_images_trains_no_generator(graph_run, capsys):
    run, base = graph_run
    other = stage1_beside(base, "real-alone", "stage3.pseudo_source=real")
    capsys.readouterr()
    args = ["stage3", SMOKE_GRAPH, "--run-dir", str(other), "--set", "stage3.pseudo_source=real",
            "--set", f"evaluation.cache_dir={base / 'cache'}"]
    assert main([*args, "--dry-run"]) == 0
    plan = capsys.readouterr().out.split("plan for")[1]
    assert "stage3" in plan and "stage2" not in plan
    assert main(args) == 0
    assert not (other / "stage2").exists()
    m3 = read_json(other / "stage3/metrics.json")
    assert m3["pseudo_source"] == "real" and m3["num_pseudo_images"] == 32
    assert "pseudo_images" not in read_json(other / "stage3/manifest.json")["inputs"]
    # the same stage 3 as in a run that trained the generator: the baseline does not depend on it
    _, beside = _stage3_variant(graph_run, "real-after-generator", "stage3.pseudo_source=real")
    assert m3["test"]["top1"] == beside["test"]["top1"]


def test_both_pseudo_sources_add_the_generated_and_the_real_images(graph_run):
    _, both = _stage3_variant(graph_run, "both", "stage3.pseudo_source=both")
    assert both["pseudo_source"] == "both" and both["num_pseudo_images"] == 32 + 32
    assert both["graph"]["num_nodes"] == 192 + 64


@pytest.mark.parametrize("override, key", [
    ("data.synthetic_size=12", "encoder.network"),
    ("graph.k=500", "graph.k"),
    ("graph.whiten=257", "graph.whiten"),
    ("encoder.batch_size=1000", "encoder.batch_size"),
])
def test_bad_feature_settings_are_one_error_line(tmp_path, capsys, override, key):
    code = main(["run", SMOKE_GRAPH, "--run-dir", str(tmp_path / "r"), "--set", override,
                 "--set", f"evaluation.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and key in err[0]
    assert not (tmp_path / "r" / "stage1").exists()


def test_freematch_starts_from_the_encoder_trunk(graph_run):
    run, base = graph_run
    import torch
    from dualpseudo.artifacts import load_weights
    from dualpseudo.classify.train import load_classifier
    other = base / "init"
    assert main(["stage1", SMOKE_GRAPH, "--run-dir", str(other), "--set", "stage1.learner=freematch",
                 "--set", "stage1.init=encoder", "--set", "stage1.iterations=1", "--set", "stage1.lr=1e-9",
                 "--set", "stage1.batch_size=8", "--set", "stage1.uratio=2",
                 "--set", f"evaluation.cache_dir={base / 'cache'}"]) == 0
    trunk, _ = load_weights(other / "encoder/encoder.safetensors", "dualpseudo_encoder", "encoder")
    model, _ = load_classifier(other / "stage1/classifier.safetensors")
    state = model.state_dict()
    conv = "features.0.weight"
    torch.testing.assert_close(state[conv], trunk[conv], rtol=1e-5, atol=1e-6)   # one step at lr 1e-9: unmoved
    assert read_json(other / "stage1/metrics.json")["learner"] == "freematch"
    assert "encoder" in read_json(other / "stage1/manifest.json")["inputs"]


def test_init_from_an_encoder_of_another_network_is_an_error(tmp_path, capsys):
    code = main(["stage1", SMOKE_GRAPH, "--run-dir", str(tmp_path / "r"), "--set", "stage1.learner=freematch",
                 "--set", "stage1.init=encoder", "--set", "stage1.network=wrn_28_2",
                 "--set", f"evaluation.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "stage1.init" in err[0]


def test_agreement_filter_keeps_what_the_judge_agrees_with(tmp_path):
    from dualpseudo.config import load_config
    from dualpseudo.data.datasets import load_dataset
    from dualpseudo.stages.learner import judge_agreement
    cfg = load_config(SMOKE_GRAPH, ["linear_probe.encoder=pixels", "linear_probe.l2_strength=1e-4"])
    ds = load_dataset(cfg.data)
    labeled = np.array([np.flatnonzero(ds.train_labels == c)[0] for c in range(4)] +
                       [np.flatnonzero(ds.train_labels == c)[1] for c in range(4)])
    # the judge is fitted on the labeled images alone, so it puts each of them in its own class: the copies with
    # their true label are kept, the copies with a wrong label (shifted by one class) are dropped
    x = np.concatenate([ds.train_images[labeled], ds.train_images[labeled]])
    y = np.concatenate([ds.train_labels[labeled], (ds.train_labels[labeled] + 1) % 4])
    keep = judge_agreement(cfg, ds, labeled, tmp_path, "cpu", x, y, feature_cache=tmp_path / "f", encoder_file=None,
                           progress=False)
    assert keep.tolist() == [True] * 8 + [False] * 8


def test_stage3_filter_agree_records_what_it_kept(graph_run):
    _, m3 = _stage3_variant(graph_run, "agree", "stage3.filter=agree")
    f = m3["filter"]
    assert f["rule"] == "agree" and f["of"] == 32 and sum(f["kept_per_class"]) == f["kept"] == m3["num_pseudo_images"]
    assert m3["graph"]["num_labeled_nodes"] == 8 + f["kept"]


def test_filter_auto_judges_unless_a_class_has_one_labeled_image():
    from dualpseudo.stages.retrain import filter_rule
    assert filter_rule("auto", np.array([0, 0, 1, 1, 2, 2]), 3) == "agree"
    assert filter_rule("auto", np.array([0, 0, 1, 1, 2]), 3) == "none"          # class 2: one labeled image
    assert filter_rule("auto", np.array([0, 0, 1, 1]), 3) == "none"             # class 2: none at all
    assert filter_rule("agree", np.array([0, 1, 2]), 3) == "agree"              # explicit settings stand
    assert filter_rule("none", np.array([0, 0, 1, 1, 2, 2]), 3) == "none"


def test_stage3_filter_auto_judges_at_two_labels_and_keeps_all_at_one(graph_run):
    _, agree = _stage3_variant(graph_run, "agree-again", "stage3.filter=agree")
    copy, auto = _stage3_variant(graph_run, "auto", "stage3.filter=auto")      # the smoke split: 2 per class
    assert auto["filter"]["rule"] == "agree" and auto["filter"]["setting"] == "auto"
    assert auto["filter"]["kept_per_class"] == agree["filter"]["kept_per_class"]
    assert auto["test"]["top1"] == agree["test"]["top1"]
    assert main(["report", "--run-dir", str(copy)]) == 0
    assert f"| {auto['num_pseudo_images']} of 32 (kept by the judge) |" in (copy / "report.md").read_text()
    # one label per class: a new split, so stages 1-2 run again; the judge is left out and every image is used
    one, m3 = _stage3_variant(graph_run, "auto-one", "stage3.filter=auto", "data.labels_per_class=1")
    assert m3["filter"] == {"rule": "none", "setting": "auto"} and m3["num_pseudo_images"] == 32
    assert m3["graph"]["num_labeled_nodes"] == 4 + 32
    assert main(["report", "--run-dir", str(one)]) == 0
    assert "| 32 (no judge: `stage3.filter: auto` with one labeled image in a class) |" in (one / "report.md").read_text()


def test_stage3_pseudo_weight_changes_the_scores_and_is_recorded(graph_run):
    run, _ = graph_run
    copy, m3 = _stage3_variant(graph_run, "weight", "stage3.pseudo_weight=0.02")
    assert m3["graph"]["pseudo_weight"] == 0.02 and m3["graph"]["num_labeled_nodes"] == 8 + 32
    assert read_json(run / "stage3/metrics.json")["graph"]["pseudo_weight"] == 1.0
    from safetensors.torch import load_file
    a, b = load_file(run / "stage3/classifier.safetensors"), load_file(copy / "stage3/classifier.safetensors")
    assert a["features"].shape == (192 + 32, a["features"].shape[1])
    assert np.array_equal(a["features"].numpy(), b["features"].numpy())     # the same graph ...
    assert not np.allclose(a["scores"].numpy(), b["scores"].numpy())        # ... weighed differently


def test_stage3_baseline_runs_beside_dpt_and_keeps_stage3(graph_run):
    run, _ = graph_run
    copy, m3 = _stage3_variant(graph_run, "baseline", "stage3.baseline=true")
    assert read_json(copy / "stage3/manifest.json") == read_json(run / "stage3/manifest.json")   # DPT reused
    mb = read_json(copy / "stage3_baseline/metrics.json")
    assert mb["pseudo_source"] == "real" and mb["num_pseudo_images"] == 32 and "delta_top1" in mb
    assert "not run (stage3.baseline: false)" in (run / "report.md").read_text()
    # the copied report was rewritten by the stage-3 command alone: it shows the baseline, not the stale row
    row = f"| {100 * mb['test']['top1']:.2f}% ({100 * mb['delta_top1']:+.2f} pp) |"
    assert row in (copy / "report.md").read_text()
    assert "not run (stage3.baseline: false)" not in (copy / "report.md").read_text()


def test_pseudo_weight_outside_label_propagation_is_an_error(tmp_path, capsys):
    code = main(["run", SMOKE_GRAPH, "--run-dir", str(tmp_path / "r"), "--set", "stage3.mode=linear-probe",
                 "--set", "stage3.pseudo_weight=0.5", "--set", f"evaluation.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "stage3.pseudo_weight" in err[0]


def test_linear_probe_on_the_encoder_features(graph_run):
    run, base = graph_run
    other = stage1_beside(base, "probe", "stage1.learner=linear-probe")
    m1 = read_json(other / "stage1/metrics.json")
    assert m1["learner"] == "linear-probe" and m1["linear_probe"]["encoder"] == "ssl"
    assert m1["linear_probe"]["feature_dim"] == 256 and m1["linear_probe"]["extractor_id"].startswith("ssl:")


def test_whitened_graph_labels_through_stage1_and_the_api(graph_run):
    from dualpseudo.artifacts import load_weights
    run, base = graph_run
    other = stage1_beside(base, "whiten", "graph.whiten=8")
    m = read_json(other / "stage1/metrics.json")
    assert m["graph"]["whiten"] == 8 and "whiten" not in read_json(run / "stage1/metrics.json")["graph"]
    tensors, meta = load_weights(other / "stage1/classifier.safetensors", "dualpseudo_graph", "graph")
    assert tensors["features"].shape == (192, 8) and tensors["whiten_projection"].shape[1] == 8
    assert meta["whiten"] == 8
    # the same encoder (shared cache), other node features: the labels differ from the unwhitened graph's
    pl0 = load_npz(run / "stage1/pseudo_labels.npz", ("confidence",))["confidence"]
    pl1 = load_npz(other / "stage1/pseudo_labels.npz", ("confidence",))["confidence"]
    assert not np.allclose(pl0, pl1)
    assert _api_test_top1(other) == pytest.approx(m["test"]["top1"], abs=1.01 / 64)   # new images: same whitening


def test_mirror_averaged_graph_features_through_stage1_and_the_api(graph_run):
    import dualpseudo
    from dualpseudo.data.datasets import make_synthetic
    run, base = graph_run
    other = stage1_beside(base, "mirror", "linear_probe.mirror=true")
    m = read_json(other / "stage1/metrics.json")
    assert m["graph"]["mirror"] is True and m["graph"]["extractor_id"].endswith(":mirror")
    assert "mirror" not in read_json(run / "stage1/metrics.json")["graph"]
    # the same encoder (shared cache), other node features: the labels differ from the plain graph's
    pl0 = load_npz(run / "stage1/pseudo_labels.npz", ("confidence",))["confidence"]
    pl1 = load_npz(other / "stage1/pseudo_labels.npz", ("confidence",))["confidence"]
    assert not np.allclose(pl0, pl1)
    assert _api_test_top1(other) == pytest.approx(m["test"]["top1"], abs=1.01 / 64)
    ds = make_synthetic(4, 48, 16, size=16, seed=0)
    clf = dualpseudo.load_classifier(other, stage=1)
    # new images go through the same averaging: an image and its mirror image get the same answer
    np.testing.assert_allclose(clf.predict_proba(ds.test_images), clf.predict_proba(ds.test_images[:, :, ::-1]),
                               atol=1e-5)
    # and the model card says how its features were made
    from dualpseudo.config import load_config
    from dualpseudo.export import model_card
    card = model_card(load_config(other / "config.yaml"), clf, dualpseudo.metrics(other), 1, False)
    assert "averaged with its mirror image's" in card
    plain = dualpseudo.load_classifier(run, stage=1)
    assert "mirror" not in model_card(load_config(run / "config.yaml"), plain, dualpseudo.metrics(run), 1, False)


def test_an_encoder_cached_under_its_schema_1_key_is_reused(graph_run, tmp_path, capsys):
    import shutil
    from dualpseudo.config import load_config
    from dualpseudo.data.datasets import load_dataset
    from dualpseudo.stages.encoder import encoder_key
    run, base = graph_run
    cfg = load_config(SMOKE_GRAPH)
    ds = load_dataset(cfg.data)
    key, legacy = encoder_key(cfg, ds), encoder_key(cfg, ds, legacy=True)
    cache = tmp_path / "cache"
    shutil.copytree(base / "cache" / "encoders" / key, cache / "encoders" / legacy)   # as the previous version left it
    assert main(["stage1", SMOKE_GRAPH, "--run-dir", str(tmp_path / "r"), "--set", f"evaluation.cache_dir={cache}"]) == 0
    assert '"reused_shared": true' in capsys.readouterr().out
    assert (cache / "encoders" / key / "encoder.safetensors").read_bytes() == \
        (run / "encoder" / "encoder.safetensors").read_bytes()
