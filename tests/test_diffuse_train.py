"""Stage-2 training loop: resume equivalence, stats, non-finite guard, config mismatch."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from dualpseudo.artifacts import ArtifactError, load_torch, save_state
from dualpseudo.config import Stage2Config
from dualpseudo.diffuse.train import train_diffusion
from dualpseudo.distributed import LOCAL


def data(n=48, size=12, classes=3):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8)
    labels = rng.integers(0, classes + 1, n).astype(np.int64)          # index 3 = null class
    return images, labels


CFG = Stage2Config(network="unet_tiny", duration_kimg=0.128, batch_size=16, lr=2e-3, warmup_kimg=0.032,
                   ema_halflife_kimg=0.02, checkpoint_every_kimg=0.064, log_every_kimg=0.032)


def run(cfg, out_dir):
    images, labels = data()
    return train_diffusion(cfg, images=images, labels=labels, num_classes=3, out_dir=out_dir, device="cpu",
                           precision="fp32", seed=3, hflip=True, progress=False, world=LOCAL)


def test_resume_equals_straight(tmp_path):
    straight = run(CFG, tmp_path / "a")
    half = dataclasses.replace(CFG, duration_kimg=CFG.duration_kimg / 2)
    run(half, tmp_path / "b")
    assert load_torch(tmp_path / "b" / "state.pt")["nimg"] == 64
    resumed = run(CFG, tmp_path / "b")
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    state = load_torch(tmp_path / "a" / "state.pt")                   # weights_only loadable
    assert state["nimg"] == 128 and set(state) >= {"net", "ema", "optimizer", "gen_state", "torch_rng_state"}
    lines = [json.loads(s) for s in (tmp_path / "b" / "stats.jsonl").read_text().splitlines()]
    assert [s["kimg"] for s in lines] == [0.032, 0.064, 0.096, 0.128]
    assert not straight.training and all(np.isfinite(s["loss"]) for s in lines)
    # finished: a rerun loads the EMA weights and trains nothing (state and stats stay byte for byte)
    before = {f: (tmp_path / "b" / f).read_bytes() for f in ("state.pt", "stats.jsonl")}
    again = run(CFG, tmp_path / "b")
    assert not again.training and list(again.state_dict()) == list(resumed.state_dict())
    for (k, a), b in zip(resumed.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert {f: (tmp_path / "b" / f).read_bytes() for f in before} == before


def test_nonfinite_loss_raises_and_keeps_state(tmp_path):
    run(dataclasses.replace(CFG, duration_kimg=0.064), tmp_path)
    state = load_torch(tmp_path / "state.pt")                          # poison the weights: NaN loss next step
    state["net"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state["net"].items()}
    save_state(tmp_path / "state.pt", state)                          # with its sha256 record
    before = (tmp_path / "state.pt").read_bytes()
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        run(CFG, tmp_path)
    assert (tmp_path / "state.pt").read_bytes() == before              # the last good state is untouched


def test_config_mismatch_is_an_error(tmp_path):
    run(dataclasses.replace(CFG, duration_kimg=0.032), tmp_path)
    with pytest.raises(ArtifactError, match="different stage-2 config"):
        run(dataclasses.replace(CFG, lr=1e-4), tmp_path)
