"""Classifier training: resume equivalence, learning a separable problem, stats, save/load, non-finite loss."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from dualpseudo.artifacts import load_torch, save_state
from dualpseudo.classify import train as T
from dualpseudo.classify.networks import NETWORKS
from dualpseudo.config import Stage1Config
from dualpseudo.distributed import LOCAL


def _data(n_per_class=24, size=16, seed=0):
    """Two classes: bright top half vs bright bottom half, with noise; uint8 (N, H, W, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, size=(2 * n_per_class, size, size, 1))
    x[:n_per_class, : size // 2] += 180
    x[n_per_class:, size // 2:] += 180
    y = np.repeat([0, 1], n_per_class)
    return x.clip(0, 255).astype(np.uint8), y


def _cfg(**kw):
    base = dict(learner="freematch", network="cnn_small", iterations=8, batch_size=8, uratio=2, lr=0.03,
                checkpoint_every=4, log_every=2, ema_decay=0.9)
    return dataclasses.replace(Stage1Config(), **{**base, **kw})


def _run(cfg, out_dir, precision="fp32", **kw):
    x, y = _data()
    args = dict(x_lb=x[::6], y_lb=y[::6], x_ulb=x, num_classes=2, hflip=False, out_dir=out_dir, device="cpu",
                precision=precision, seed=1, progress=False, world=LOCAL)
    return T.train_classifier(cfg, **{**args, **kw})


@pytest.mark.parametrize("learner,dist_align", [("freematch", False), ("fixmatch", False), ("freematch", True)])
def test_resume_equals_straight_run(tmp_path, learner, dist_align):
    cfg = _cfg(learner=learner, p_cutoff=0.5, dist_align=dist_align)
    straight = _run(cfg, tmp_path / "a")
    _run(cfg, tmp_path / "b", stop_at=4)
    assert load_torch(tmp_path / "b" / "state.pt")["step"] == 4
    resumed = _run(cfg, tmp_path / "b")
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    sa, sb = load_torch(tmp_path / "a" / "state.pt"), load_torch(tmp_path / "b" / "state.pt")
    if learner == "freematch":
        torch.testing.assert_close(sa["threshold"]["p_model"], sb["threshold"]["p_model"])
    assert ("dist_align" in sa) == dist_align
    if dist_align:
        torch.testing.assert_close(sa["dist_align"]["p_model"], sb["dist_align"]["p_model"])
        assert not torch.allclose(sa["dist_align"]["p_model"], torch.full((2,), 0.5))   # it was updated
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "stats.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def test_state_is_weights_only_and_rejects_other_config(tmp_path):
    _run(_cfg(iterations=2), tmp_path)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert {"step", "model", "ema", "optimizer", "threshold", "rng"} <= set(state)
    with pytest.raises(Exception, match="different stage-1 config"):
        _run(_cfg(iterations=2, lr=0.1), tmp_path)


def test_learns_separable_problem_and_writes_stats(tmp_path):
    cfg = _cfg(iterations=40, log_every=10, checkpoint_every=100, ema_decay=0.8, lr=0.05)
    model = _run(cfg, tmp_path, precision="bf16")
    x_test, y_test = _data(n_per_class=50, seed=1)
    probs = T.predict(model, x_test, batch_size=32, device="cpu", precision="fp32")
    assert probs.shape == (100, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == y_test).mean() >= 0.95
    lines = [json.loads(l) for l in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [10, 20, 30, 40]
    assert {"loss_x", "loss_u", "mask", "lr", "threshold", "time"} <= set(lines[0])
    assert 0 <= lines[-1]["mask"] <= 1 and 0 < lines[-1]["threshold"] < 1


def test_supervised_needs_no_unlabeled_images(tmp_path):
    model = _run(_cfg(learner="supervised", iterations=3), tmp_path, x_ulb=None)
    assert not model.training
    lines = [json.loads(l) for l in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert lines and all(l["mask"] is None and l["loss_u"] == 0 for l in lines)


class _GreySpy(torch.nn.Module):
    """A stand-in classifier for uniformly grey images: records the grey level of every image of every training
    forward (uniform images stay uniform under the weak augmentation's crops and flips) and answers the class
    `label_of[grey]` with near certainty, so the supervised loss is ~0 exactly when each image carries its label."""

    def __init__(self, num_classes: int, label_of: torch.Tensor, seen: list):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))             # something for the optimizer
        self.register_buffer("label_of", label_of)
        self.num_classes, self.seen = num_classes, seen

    def forward(self, x):
        grey = ((x[:, 0, 0, 0].float() + 1) * 127.5).round().clamp(0, 255).long()   # [-1, 1] to 0..255
        if self.training:
            self.seen.append(grey.tolist())
        return 20 * torch.nn.functional.one_hot(self.label_of[grey], self.num_classes).float() + 0 * self.w


@pytest.mark.parametrize("fraction, n_pseudo", [(0.3, 2), (0.5, 4), (1.0, 8)])
def test_labeled_batches_mix_real_and_pseudo_images(tmp_path, monkeypatch, fraction, n_pseudo):
    """Each labeled batch of B holds B - round(fraction * B) real labeled images, then round(fraction * B)
    pseudo-images, each with its own label; the pseudo-images are drawn in reshuffled epochs (no repeats
    within one)."""
    from dualpseudo.classify import networks

    def grey(levels):                                               # uniform 16x16 images (N, 16, 16, 1)
        return np.broadcast_to(np.asarray(levels, np.uint8)[:, None, None, None], (len(levels), 16, 16, 1)).copy()

    real, pseudo = list(range(10, 18)), list(range(100, 112))       # grey levels: 8 real, 12 pseudo-images
    y_real, y_pseudo = np.arange(8) % 2, (np.arange(12) // 3) % 2
    label_of = torch.zeros(256, dtype=torch.long)
    label_of[real], label_of[pseudo] = torch.as_tensor(y_real), torch.as_tensor(y_pseudo)
    seen: list = []
    monkeypatch.setitem(networks.NETWORKS, "grey_spy", lambda c, ch, size: _GreySpy(c, label_of, seen))
    x_ulb = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 1), dtype=np.uint8)
    cfg = _cfg(network="grey_spy", iterations=3, uratio=1, log_every=1, checkpoint_every=3)
    _run(cfg, tmp_path, x_lb=grey(real), y_lb=y_real, x_ulb=x_ulb, x_pseudo=grey(pseudo), y_pseudo=y_pseudo,
         pseudo_fraction=fraction)
    assert len(seen) == 3                                           # one training forward per step
    B = cfg.batch_size
    drawn = []
    for batch in seen:                                              # labeled (+ pseudo) rows come first
        assert all(g in real for g in batch[:B - n_pseudo]), batch
        assert all(g in pseudo for g in batch[B - n_pseudo:B]), batch
        drawn += batch[B - n_pseudo:B]
    assert len(set(drawn[:12])) == min(12, len(drawn)), "one epoch of pseudo-images draws each at most once"
    lines = [json.loads(l) for l in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(l["loss_x"] < 1e-6 for l in lines), "every image trains with its own label"


def test_classifier_save_load_round_trip(tmp_path):
    model = NETWORKS["cnn_small"](3, 1, 16).to(memory_format=torch.channels_last).eval()
    meta = {"network": "cnn_small", "num_classes": 3, "in_channels": 1, "image_size": 16, "learner": "fixmatch"}
    T.save_classifier(tmp_path / "classifier.safetensors", model, meta)
    loaded, meta2 = T.load_classifier(tmp_path / "classifier.safetensors")
    assert meta2 == meta
    x = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    a = T.predict(model, x, batch_size=2, device="cpu", precision="fp32")
    np.testing.assert_array_equal(a, T.predict(loaded, x, batch_size=2, device="cpu", precision="fp32"))
    with pytest.raises(ValueError, match="meta lacks"):
        T.save_classifier(tmp_path / "bad.safetensors", model, {"network": "cnn_small"})


def test_non_finite_loss_keeps_last_good_state(tmp_path):
    cfg = _cfg(iterations=6, checkpoint_every=2)
    _run(cfg, tmp_path, stop_at=2)
    with pytest.raises(FloatingPointError, match="non-finite"):
        _run(dataclasses.replace(cfg, lr=1e30), tmp_path / "diverges")
    # a NaN-producing resume of the same run: poison the weights, then the state on disk must stay intact
    state = load_torch(tmp_path / "state.pt")
    state["model"] = {k: (v * float("nan") if v.is_floating_point() else v) for k, v in state["model"].items()}
    save_state(tmp_path / "state.pt", state)            # with its sha256 record, as training writes it
    poisoned = (tmp_path / "state.pt").read_bytes()
    with pytest.raises(FloatingPointError, match="last good state"):
        _run(cfg, tmp_path)
    assert load_torch(tmp_path / "state.pt")["step"] == 2
    assert (tmp_path / "state.pt").read_bytes() == poisoned
