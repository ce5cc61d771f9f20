"""The paper-scale CIFAR-10 config, its generator size, the device check (`bench/device_check.py --tiny` on CPU)
and the one-line errors for a device that is not there."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualpseudo.cli import main
from dualpseudo.config import load_config
from dualpseudo.diffuse.networks import NETWORKS, unet_ddpmpp

from conftest import ROOT, SMOKE

CIFAR10 = ROOT / "configs" / "cifar10.yaml"
IMAGENET = ROOT / "configs" / "imagenet256_linear_probe.yaml"
UNET_DDPMPP_PARAMETERS = 58_027_523          # the number in unet_ddpmpp's docstring


def test_cifar10_config_is_the_papers_recipe():
    cfg = load_config(CIFAR10)
    assert (cfg.data.name, cfg.data.labels_per_class) == ("cifar10", 4)
    s1 = cfg.stage1
    assert (s1.learner, s1.network, s1.iterations, s1.batch_size, s1.uratio) == ("freematch", "wrn_28_2", 2 ** 20, 64, 7)
    assert (s1.lr, s1.momentum, s1.weight_decay, s1.ema_decay, s1.hard_label) == (0.03, 0.9, 5e-4, 0.999, True)
    s2 = cfg.stage2
    assert (s2.network, s2.batch_size, s2.images_per_class, s2.sampler, s2.steps) == ("unet_ddpmpp", 512, 1001, "heun", 18)
    assert (cfg.stage3.mode, cfg.stage3.iterations) == ("ssl", 0)
    assert cfg.evaluation.fid and cfg.evaluation.fid_reference_images == 50000
    assert cfg.runtime.device == "cuda" and cfg.runtime.precision == "bf16"


def test_unet_ddpmpp_has_the_documented_parameter_count():
    net = NETWORKS["unet_ddpmpp"](3, 32, 10)
    n = sum(p.numel() for p in net.parameters())
    assert n == UNET_DDPMPP_PARAMETERS
    assert f"{n:,}" in unet_ddpmpp.__doc__
    assert f"{n / 1e6:.1f}M parameters here" in CIFAR10.read_text()
    # EDM's DDPM++ width, depth and attention: 256 channels at every level, 4 blocks a level, one 256-wide head
    assert net.stem.out_channels == 256 and net.enc[0].dropout.p == 0.13
    attn = [m for m in net.modules() if type(m).__name__ == "AttnBlock"]
    assert {m.heads for m in attn} == {1} and len(attn) == 4 + 1 + 5


def _dry_run(config: Path, tmp_path: Path, capsys, *overrides: str) -> str:
    args = ["run", str(config), "--run-dir", str(tmp_path / "run"), "--dry-run",
            "--set", f"evaluation.cache_dir={tmp_path / 'cache'}"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    assert not (tmp_path / "run").exists()
    return capsys.readouterr().out


def test_cifar10_dry_run_without_the_data_says_what_is_missing(tmp_path, capsys):
    out = _dry_run(CIFAR10, tmp_path, capsys, f"data.root={tmp_path / 'cifar10'}")
    assert "name: cifar10" in out and f"plan for {tmp_path / 'run'}:" in out
    for stage in ("stage1", "stage2", "stage3", "evaluation"):
        assert f"  {stage} " in out
    missing = out.split("missing on this machine:")[1]
    assert f"{tmp_path / 'cifar10'}" in missing and "cifar-10-python.tar.gz" in missing
    assert ("runtime.device" in missing) == (not torch.cuda.is_available())


def test_imagenet_dry_run_without_the_data_says_what_is_missing(tmp_path, capsys):
    out = _dry_run(IMAGENET, tmp_path, capsys)
    missing = out.split("missing on this machine:")[1]
    for what in ("data: image folder /path/to/imagenet256 does not exist", "data.labeled_indices",
                 "linear_probe.encoder_path: models/msn_vitl7.pt", "latent.autoencoder_path: models/sd-vae"):
        assert what in missing


def _cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dualpseudo", "run", SMOKE, "--run-dir", str(tmp_path / "run")]
    for item in overrides:
        cmd += ["--set", item]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_error_line(tmp_path):
    done = _cli(tmp_path, "runtime.device=cuda")
    assert done.returncode == 2
    assert done.stderr.startswith("error: runtime.device='cuda' but ") and done.stderr.count("\n") == 1
    assert "runtime.device=cpu" in done.stderr
    assert not (tmp_path / "run").exists()


def test_malformed_device_is_one_error_line(tmp_path):
    done = _cli(tmp_path, "runtime.device=gpu0")
    assert done.returncode == 2
    assert done.stderr.startswith("error: runtime.device: 'gpu0'") and done.stderr.count("\n") == 1
    assert "cuda:N" in done.stderr


@pytest.fixture(scope="module")
def device_check(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("device_check") / "check.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "device_check.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text())


def test_device_check_runs_the_smoke_pipeline(device_check):
    smoke = device_check["smoke"]
    assert smoke["ok"] and smoke["returncode"] == 0 and smoke["missing"] == []
    assert smoke["env_device"] == "cpu" and smoke["artifacts_checked"] >= 20
    assert device_check["tiny"] and device_check["device"] == "cpu" and device_check["precision"] == "bf16"


def test_device_check_rates_are_the_medians_it_measured(device_check):
    st2, st1 = device_check["stage2_train"], device_check["stage1_ssl"]
    assert st2["img_per_s"] == statistics.median(st2["window_img_per_s"]) > 0
    assert len(st2["window_img_per_s"]) == st2["steps"] // st2["window_steps"] - 1
    assert st1["steps_per_s"] == statistics.median(st1["window_steps_per_s"]) > 0
    assert st2["flop_per_s"] == pytest.approx(st2["flop_per_step"] * st2["img_per_s"] / st2["batch_size"])
    assert st2["fraction_of_matmul"] == pytest.approx(st2["flop_per_s"] / device_check["matmul"]["flop_per_s"])
    assert st2["flop_per_step"] > 0 and st2["parameters"] > 0
    for name in ("heun_18_guided", "dpmpp_2m_20_guided", "recipe"):
        s = device_check["sampling"][name]
        assert s["img_per_s"] == pytest.approx(s["images"] / s["seconds"])
    assert device_check["sampling"]["recipe"]["sampler"] == "heun"
    inc = device_check["inception"]
    assert ("img_per_s" in inc) != ("skipped" in inc)
    assert device_check["stage2_train_compiled"]["skipped"]


def test_device_check_projection_follows_from_its_rates(device_check):
    work, rates, p = device_check["recipe"], device_check["rates"], device_check["projection"]
    # the recipe's work: configs/cifar10.yaml
    assert work["stage1_iterations"] == work["stage3_iterations"] == 2 ** 20
    assert work["stage2_images_seen"] == 200_000_000 and work["stage2_generated_images"] == 10_010
    assert work["fid_images"] == 50_000 + 10_010
    # the rates are the measured ones
    assert rates["stage1_steps_per_s"] == device_check["stage1_ssl"]["steps_per_s"]
    assert rates["stage2_train_img_per_s"] == device_check["stage2_train"]["img_per_s"]
    assert rates["recipe_sample_img_per_s"] == device_check["sampling"]["recipe"]["img_per_s"]
    assert rates["inception_img_per_s"] == device_check["inception"].get("img_per_s")
    # the projection is work / rate
    assert p["stage1_s"] == pytest.approx(2 ** 20 / rates["stage1_steps_per_s"])
    assert p["stage3_s"] == pytest.approx(2 ** 20 / rates["stage1_steps_per_s"])
    assert p["stage2_train_s"] == pytest.approx(200_000_000 / rates["stage2_train_img_per_s"])
    assert p["stage2_sample_s"] == pytest.approx(10_010 / rates["recipe_sample_img_per_s"])
    ssl_images_per_s = rates["stage1_steps_per_s"] * rates["ssl_images_per_step"]
    assert p["oracle_s"] == pytest.approx(work["oracle_iterations"] * 128 / ssl_images_per_s)
    if rates["inception_img_per_s"]:
        assert p["fid_features_s"] == pytest.approx(60_010 / rates["inception_img_per_s"])
    else:
        assert p["fid_features_s"] is None
    parts = [v for k, v in p.items() if k not in ("total_s", "total_h") and v is not None]
    assert p["total_s"] == pytest.approx(sum(parts)) and p["total_h"] == pytest.approx(p["total_s"] / 3600)
