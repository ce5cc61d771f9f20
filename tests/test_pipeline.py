"""End-to-end: the smoke config through all three stages, reuse, resume and the CLI's errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dualpseudo.artifacts import load_npz, load_torch, read_json
from dualpseudo.cli import main

from conftest import ROOT, SMOKE, make_idx_dataset


def run_cli(*args: str) -> int:
    return main(list(args))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("smoke")
    run = base / "run"
    assert run_cli("run", SMOKE, "--run-dir", str(run), "--set", f"evaluation.cache_dir={base / 'cache'}") == 0
    return run, base


def test_smoke_run_writes_every_artifact(smoke_run):
    run, _ = smoke_run
    for f in ["config.yaml", "env.json", "report.html", "report.md",
              "stage1/split.json", "stage1/classifier.safetensors", "stage1/pseudo_labels.npz", "stage1/metrics.json",
              "stage1/state.pt", "stage1/stats.jsonl", "stage1/manifest.json",
              "stage2/diffusion.safetensors", "stage2/state.pt", "stage2/pseudo_images.npz", "stage2/grid.png",
              "stage2/stats.jsonl", "stage2/manifest.json",
              "stage3/classifier.safetensors", "stage3/metrics.json", "stage3/manifest.json",
              "evaluation/metrics.json"]:
        assert (run / f).is_file(), f
    env = read_json(run / "env.json")
    assert env["device"] == "cpu" and isinstance(env["native_bf16"], bool) and env["cpu_capability"]
    split = read_json(run / "stage1/split.json")
    assert split["num_labeled"] == 8 and all(len(v) == 2 for v in split["per_class"].values())
    pl = load_npz(run / "stage1/pseudo_labels.npz", ("label", "confidence", "is_labeled"))
    assert pl["label"].shape == (192,) and pl["is_labeled"].sum() == 8
    assert np.all(pl["confidence"][pl["is_labeled"]] == 1.0)
    m1 = read_json(run / "stage1/metrics.json")
    assert m1["test"]["top1"] > 0.5, "the smoke classifier must beat chance (0.25) on the easy synthetic classes"
    assert 0 <= m1["pseudo_labels"]["accuracy"] <= 1
    gen = load_npz(run / "stage2/pseudo_images.npz", ("images", "labels", "seeds"))
    assert gen["images"].shape == (32, 16, 16, 1) and gen["images"].dtype == np.uint8
    assert np.bincount(gen["labels"]).tolist() == [8] * 4
    m3 = read_json(run / "stage3/metrics.json")
    assert m3["delta_top1"] == pytest.approx(m3["test"]["top1"] - m1["test"]["top1"])
    ev = read_json(run / "evaluation/metrics.json")
    assert 0 <= ev["class_consistency"]["accuracy"] <= 1 and "precision_recall" in ev
    html = (run / "report.html").read_text()
    assert "data:image/png;base64" in html
    from PIL import Image
    side = Image.open(run / "figures" / "real_beside_generated.png")      # 4 classes: labeled | gap | generated
    assert side.size[1] == 4 * (16 * 3 + 2) + 2 and "labeled real images" in html
    state = load_torch(run / "stage1/state.pt")          # weights_only load
    assert state["step"] == 40


def test_rerun_reuses_everything(smoke_run, capsys):
    run, base = smoke_run
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    assert run_cli("run", SMOKE, "--run-dir", str(run), "--set", f"evaluation.cache_dir={base / 'cache'}") == 0
    out = capsys.readouterr().out
    assert out.count("reused") == 4
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}


def test_stage2_change_keeps_stage1_and_reruns_2_and_3(smoke_run, tmp_path, capsys):
    run, base = smoke_run
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    s1 = (copy / "stage1/classifier.safetensors").stat().st_mtime_ns
    args = ["run", SMOKE, "--run-dir", str(copy), "--set", f"evaluation.cache_dir={base / 'cache'}",
            "--set", "stage2.p_uncond=0.2"]
    assert run_cli(*args) == 2                             # a different config needs --force
    assert "made by a different config (changed: stage2.p_uncond)" in capsys.readouterr().err
    assert run_cli(*args, "--dry-run", "--force") == 0
    plan = capsys.readouterr().out
    assert "stage1                 reuse" in plan and "stage2                 run (its config changed)" in plan
    assert "stage3                 run" in plan
    assert run_cli(*args, "--force") == 0
    out = capsys.readouterr().out
    assert "[stage1] reused" in out and "[stage2] running" in out and "[stage3] running" in out
    assert (copy / "stage1/classifier.safetensors").stat().st_mtime_ns == s1


def test_interrupted_stage2_resumes(tmp_path):
    """Kill the run while stage 2 trains, rerun the same command: it resumes from state.pt and finishes."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dualpseudo", "run", SMOKE, "--run-dir", str(run),
           "--set", f"evaluation.cache_dir={tmp_path / 'cache'}", "--set", "stage2.duration_kimg=3",
           "--set", "evaluation.oracle_iterations=10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import time
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "stage2" / "state.pt").is_file():
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert (run / "stage2" / "state.pt").is_file(), "stage 2 never checkpointed"
    assert not (run / "stage2" / "manifest.json").exists()
    nimg_at_kill = load_torch(run / "stage2" / "state.pt")["nimg"]
    assert 0 < nimg_at_kill < 3000
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[stage1] reused" in done.stdout
    assert (run / "stage3" / "manifest.json").is_file()
    lines = [json.loads(l) for l in (run / "stage2" / "stats.jsonl").read_text().splitlines()]
    kimgs = [l["kimg"] for l in lines]
    assert kimgs == sorted(kimgs) and len(set(kimgs)) == len(kimgs), "resumed curve has no repeats"


def test_dry_run_prints_config_and_plan(tmp_path, capsys):
    # the demo config on a tiny stand-in for Fashion-MNIST (300 random 28x28 images, 30 per class), so the test
    # needs no installed dataset; 300 >= encoder.batch_size keeps the demo's encoder settings valid
    root = make_idx_dataset(tmp_path / "fashion-mnist", n=300, test=20)
    assert run_cli("run", str(ROOT / "configs" / "fashion_mnist.yaml"), "--run-dir", str(tmp_path / "r"), "--dry-run",
                   "--set", f"data.root={root}", "--set", f"evaluation.cache_dir={tmp_path / 'cache'}") == 0
    out = capsys.readouterr().out
    assert "labels_per_class: 4" in out and "plan for" in out and "stage1" in out and "evaluation" in out
    assert not (tmp_path / "r").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert run_cli("run", SMOKE, "--run-dir", str(tmp_path / "r"), "--set", "data.no_such_key=1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'data.no_such_key'") and err.count("\n") == 1
    assert run_cli("run", SMOKE, "--run-dir", str(tmp_path / "r"), "--set", "data.labels_per_class=100") == 2
    assert "fewer than labels_per_class=100" in capsys.readouterr().err
    assert run_cli("run", SMOKE, "--run-dir", str(tmp_path / "r"), "--set", "data.name=mnist",
                   "--set", f"data.root={tmp_path}") == 2
    assert "missing" in capsys.readouterr().err
    assert run_cli("sample", "--run-dir", str(tmp_path / "nothing")) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["run", "stage1", "stage2", "stage3", "sample", "eval", "report"])
def test_help_has_examples(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_unconditional_reference_generator(smoke_run, tmp_path, capsys):
    """label_source=none: null-class sampling without guidance, no class consistency, and no stage 3."""
    run, base = smoke_run
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    args = ["--run-dir", str(copy), "--set", f"evaluation.cache_dir={base / 'cache'}",
            "--set", "stage2.label_source=none", "--force"]
    assert run_cli("run", SMOKE, *args) == 0
    out = capsys.readouterr().out
    assert "[stage1] reused" in out and "[stage3]" not in out
    gen = load_npz(copy / "stage2/pseudo_images.npz", ("images", "labels", "guidance_scale"))
    assert np.all(gen["labels"] == 4) and float(gen["guidance_scale"]) == 0.0
    ev = read_json(copy / "evaluation/metrics.json")
    assert ev["unconditional"] is True and ev["class_consistency"] is None and ev["guidance_scale"] == 0.0
    assert "precision_recall" in ev
    report = (copy / "report.md").read_text()
    assert "none (unconditional reference generator)" in report and "Unconditional samples" in report
    assert run_cli("stage3", SMOKE, *args) == 2
    assert "unconditional reference generator" in capsys.readouterr().err


def test_evaluation_without_oracle(smoke_run, tmp_path, capsys):
    """oracle_network=none (datasets too large for the in-memory oracle): FID, and precision/recall in the
    Inception features; no class consistency, no domain distance. A tiny TorchScript stands in for Inception."""
    import shutil
    import warnings

    import torch
    run, base = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with warnings.catch_warnings():                  # torch >= 2.10 deprecates TorchScript; Inception ships as one
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                                   torch.nn.Linear(48, 16)))
    net.save(str(tmp_path / "tiny_inception.pt"))
    sets = ["--set", f"evaluation.cache_dir={tmp_path / 'cache'}", "--set", "evaluation.oracle_network=none",
            "--set", "evaluation.fid=true", "--set", f"evaluation.inception_path={tmp_path / 'tiny_inception.pt'}"]
    assert run_cli("eval", "--run-dir", str(copy), *sets) == 0
    ev = read_json(copy / "evaluation/metrics.json")
    assert ev["oracle"] is None and ev["class_consistency"] is None and ev["domain_fd"] is None
    assert ev["fid"]["num_samples"] == 32 and np.isfinite(ev["fid"]["fid"])
    assert ev["precision_recall"]["features"].startswith("inception") and 0 <= ev["precision_recall"]["recall"] <= 1
    assert not list((tmp_path / "cache").glob("oracle-*")), "no oracle may be trained"
    assert f"{ev['fid']['fid']:.2f}" in (copy / "report.md").read_text(), "eval rewrites the report"
    assert run_cli("eval", "--run-dir", str(copy), "--set", "evaluation.oracle_network=resnet9000") == 2
    assert "evaluation.oracle_network" in capsys.readouterr().err


def _copy(smoke_run, tmp_path) -> Path:
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(smoke_run[0], copy)
    return copy


def _cache(smoke_run) -> list[str]:
    return ["--set", f"evaluation.cache_dir={smoke_run[1] / 'cache'}"]


def test_second_round_trains_on_stage3_labels(smoke_run, tmp_path, capsys):
    """rounds=2: round 1 is reused; round2/ repeats stages 2-3 and the evaluation with stage 3's pseudo-labels."""
    run = _copy(smoke_run, tmp_path)
    assert run_cli("run", SMOKE, "--run-dir", str(run), *_cache(smoke_run), "--set", "rounds=2", "--force") == 0
    out = capsys.readouterr().out
    assert all(f"[{step}] reused" in out for step in ("stage1", "stage2", "stage3", "evaluation")), out
    assert all(f"[round2/{step}] running" in out for step in ("stage2", "stage3", "evaluation")), out
    assert "[round2/stage1]" not in out, "stage 1 runs once"
    r2 = run / "round2"
    for f in ("stage2/pseudo_images.npz", "stage2/diffusion.safetensors", "stage3/classifier.safetensors",
              "stage3/pseudo_labels.npz", "stage3/metrics.json", "evaluation/metrics.json"):
        assert (r2 / f).is_file(), f
    labels_in = read_json(r2 / "stage2/manifest.json")["inputs"]["pseudo_labels"]
    stage3_labels = read_json(run / "stage3/manifest.json")["outputs"]["pseudo_labels.npz"]
    assert labels_in == stage3_labels != read_json(run / "stage1/manifest.json")["outputs"]["pseudo_labels.npz"]
    m1, m3 = read_json(run / "stage1/metrics.json"), read_json(r2 / "stage3/metrics.json")
    assert m3["stage1_test_top1"] == m1["test"]["top1"], "every round's delta is against stage 1"
    gen = load_npz(r2 / "stage2/pseudo_images.npz", ("images", "labels"))
    assert gen["images"].shape == (32, 16, 16, 1) and np.bincount(gen["labels"]).tolist() == [8] * 4


def test_stage3_supervised_mode(smoke_run, tmp_path, capsys):
    """stage3.mode=supervised: stage 3 alone re-runs, on labeled + pseudo-images with no unlabeled loss."""
    run = _copy(smoke_run, tmp_path)
    before = read_json(run / "stage3/manifest.json")["config_hash"]
    assert run_cli("stage3", SMOKE, "--run-dir", str(run), *_cache(smoke_run), "--set", "stage3.mode=supervised",
                   "--force") == 0
    out = capsys.readouterr().out
    assert "[stage1] reused" in out and "[stage2] reused" in out and "[stage3] running" in out
    m3 = read_json(run / "stage3/metrics.json")
    assert m3["mode"] == "supervised" and m3["learner"] == "supervised" and m3["num_pseudo_images"] == 32
    assert read_json(run / "stage3/manifest.json")["config_hash"] != before
    lines = [json.loads(l) for l in (run / "stage3/stats.jsonl").read_text().splitlines()]
    assert lines and all(l["mask"] is None and l["loss_u"] == 0 for l in lines), "no unlabeled images"
    assert load_torch(run / "stage3/state.pt")["step"] == 40


def test_min_confidence_trains_unsure_images_as_the_null_class(smoke_run, tmp_path, capsys):
    """stage2.min_confidence: unlabeled images whose pseudo-label is less confident train unconditionally."""
    run = _copy(smoke_run, tmp_path)
    pl = load_npz(run / "stage1/pseudo_labels.npz", ("label", "confidence", "is_labeled"))
    threshold = float(np.median(pl["confidence"][~pl["is_labeled"]]))
    conditional = (pl["confidence"] >= threshold) | pl["is_labeled"]
    assert 0.3 < conditional.mean() < 0.7                          # about half the images lose their label
    assert read_json(run / "stage2/manifest.json")["summary"]["conditional_fraction"] == 1.0
    assert run_cli("stage2", SMOKE, "--run-dir", str(run), *_cache(smoke_run),
                   "--set", f"stage2.min_confidence={threshold!r}", "--force") == 0
    assert "[stage1] reused" in capsys.readouterr().out
    summary = read_json(run / "stage2/manifest.json")["summary"]
    assert summary["conditional_fraction"] == pytest.approx(conditional.mean())
    gen = load_npz(run / "stage2/pseudo_images.npz", ("labels",))
    assert np.bincount(gen["labels"]).tolist() == [8] * 4, "sampling is still class-conditional"
    assert run_cli("report", "--run-dir", str(run)) == 0
    line = f"pseudo-labels of confidence >= {threshold:g} ({100 * conditional.mean():.2f}% of the training images"
    assert line in (run / "report.md").read_text(encoding="utf-8")


def test_sample_grid_command(smoke_run, tmp_path, capsys):
    """`dualpseudo sample` draws the grid stage 2 drew (same seeds, sampler and labels) and takes its options."""
    from PIL import Image
    run, _ = smoke_run
    out = tmp_path / "grid.png"
    assert run_cli("sample", "--run-dir", str(run), "--per-class", "8", "--out", str(out)) == 0
    assert capsys.readouterr().out.strip() == str(out)
    same = np.asarray(Image.open(out))
    np.testing.assert_array_equal(same, np.asarray(Image.open(run / "stage2/grid.png")))
    other = tmp_path / "other.png"
    assert run_cli("sample", "--run-dir", str(run), "--per-class", "3", "--seed", "5", "--steps", "2",
                   "--guidance-scale", "0", "--out", str(other)) == 0
    small = np.asarray(Image.open(other))
    assert small.shape[0] == same.shape[0] and small.shape[1] < same.shape[1], "4 rows, 3 columns instead of 8"
    assert not (run / "sample_grid.png").exists()



def test_new_stage2_sampling_field_resamples_without_retraining(smoke_run, tmp_path, capsys, monkeypatch):
    """A field added to stage2 with the SAMPLING role (config.py, one line) and set: stage 1 is reused, stage 2
    keeps its trained model and only samples again; stage 3 and the evaluation are planned to follow, and run
    unless the new images are the same bytes (this field changes nothing, so they are reused by content)."""
    import dataclasses
    import shutil

    from dualpseudo.config import SAMPLING, Stage2Config, added_later, load_config
    from dualpseudo.stages import pipeline

    run, base = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = load_config(SMOKE, [f"evaluation.cache_dir={base / 'cache'}"])
    Extended = dataclasses.make_dataclass("Stage2Config", [("eta", float, added_later(0.0, SAMPLING))],
                                          bases=(Stage2Config,), frozen=True)
    new = dataclasses.replace(cfg, stage2=Extended(**dataclasses.asdict(cfg.stage2), eta=0.5))
    monkeypatch.setattr(pipeline, "load_config", lambda *a, **k: new)
    kept = {f: (copy / f).stat().st_mtime_ns for f in ("stage1/classifier.safetensors", "stage2/diffusion.safetensors",
                                                       "stage2/state.pt", "stage2/stats.jsonl")}
    sampled = (copy / "stage2/pseudo_images.npz").stat().st_mtime_ns
    assert pipeline.main(SMOKE, [], copy, force=True, dry_run=True) == 0
    planned = capsys.readouterr().out
    assert "stage1                 reuse" in planned and "stage2                 run (its config changed)" in planned
    assert "stage3                 run (an upstream" in planned and "evaluation             run (an up" in planned
    assert pipeline.main(SMOKE, [], copy, force=True) == 0
    out = capsys.readouterr().out
    assert "[stage1] reused" in out and "[stage2] running (its config changed)" in out
    assert "[stage3] reused" in out and "[evaluation] reused" in out     # the same images, by content
    assert kept == {f: (copy / f).stat().st_mtime_ns for f in kept}          # no retraining of the model
    assert (copy / "stage2/pseudo_images.npz").stat().st_mtime_ns != sampled  # sampled again


def test_sampling_change_keeps_the_model_and_reruns_3_and_evaluation(smoke_run, tmp_path, capsys):
    run, base = smoke_run
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    model = (copy / "stage2/diffusion.safetensors").stat().st_mtime_ns
    assert run_cli("run", SMOKE, "--run-dir", str(copy), "--set", f"evaluation.cache_dir={base / 'cache'}",
                   "--set", "stage2.sample_seed=1", "--force") == 0
    out = capsys.readouterr().out
    assert "[stage1] reused" in out and "[stage2] running" in out
    assert "[stage3] running" in out and "[evaluation] running" in out
    assert (copy / "stage2/diffusion.safetensors").stat().st_mtime_ns == model
