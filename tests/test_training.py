"""The shared training machinery (training.py): EMA by hand, image conversion ranges and round trip, the
non-finite guard, the stats log, resumable state (round trip, the one mismatch policy), per-rank generators, the
epoch sampler; and `ssl.ssl_step`, which returns new SSL states instead of changing them."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from dualpseudo.artifacts import ArtifactError
from dualpseudo.classify.ssl import DistAlign, FreeMatchThreshold, consistency_loss, fixmatch_mask, ssl_step
from dualpseudo.guards import DivergenceError
from dualpseudo.training import (DivergenceGuard, EpochSampler, StatsLog, ema_update, generator_states,
                                 load_training_state, restore_generator, save_training_state, to_float, to_uint8,
                                 to_unit, uint8_nchw)


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_update_by_hand():
    torch.manual_seed(0)
    model, ema = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model[1].running_mean.fill_(0.7)
    model[1].num_batches_tracked.fill_(5)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, e0, m in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * e0 + 0.1 * m)
    assert torch.equal(ema[1].running_mean, torch.full((2,), 0.7))       # buffers are copied, not averaged
    assert int(ema[1].num_batches_tracked) == 5
    ema_update(ema, model, 0.0)                                           # decay 0: the model itself
    for e, m in zip(ema.parameters(), model.parameters()):
        assert torch.equal(e, m)


# ---------------------------------------------------------------------------------------------- images
def test_conversion_ranges_and_round_trip():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8)
    x = to_float(u8)
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    assert to_unit(u8).min() == 0.0 and to_unit(u8).max() == 1.0
    torch.testing.assert_close(to_unit(u8), (x + 1) / 2)
    assert torch.equal(to_uint8(x), u8)                                   # every level survives the round trip
    assert to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])).tolist() == [0, 0, 128, 255, 255]   # rounded, clipped
    cl = u8.contiguous(memory_format=torch.channels_last)
    assert to_float(cl).stride() == cl.stride()                           # the layout is kept
    with pytest.raises(TypeError, match="uint8"):
        to_float(x)                                                       # never rescales floats twice


def test_uint8_nchw_layout_and_errors():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)       # (N, H, W): one channel added
    t = uint8_nchw(images, "x_lb", "cpu")
    assert t.shape == (2, 1, 3, 4) and t.is_contiguous() and torch.equal(t[:, 0], torch.from_numpy(images))
    rgb = np.zeros((2, 3, 4, 3), np.uint8)
    rgb[..., 2] = 9
    assert uint8_nchw(rgb, "x", "cpu")[:, 2].eq(9).all()
    with pytest.raises(ValueError, match="x_ulb must be uint8"):
        uint8_nchw(images.astype(np.float32), "x_ulb", "cpu")


def test_epoch_sampler_is_a_function_of_seed_and_step():
    a, b = EpochSampler(10, 4, seed=3), EpochSampler(10, 4, seed=3)
    batches = [a.batch(k) for k in range(5)]                              # 20 indices: two whole epochs
    assert torch.equal(b.batch(3), batches[3])                            # no history needed
    flat = torch.cat(batches)
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:].tolist()) == list(range(10))
    assert not torch.equal(flat[:10], flat[10:])                          # reshuffled per epoch


# ---------------------------------------------------------------------------------------------- guard
def test_guard_stops_on_nan_and_inf_and_names_the_kept_state(tmp_path):
    guard = DivergenceGuard("stage1", "Lower stage1.lr", tmp_path / "state.pt")
    guard.check(torch.tensor([1.0, 2.0]), "loss")
    with pytest.raises(DivergenceError, match=r"stage1: non-finite loss at step 3; no training state had been saved"):
        guard.check(torch.tensor(float("nan")), "loss at step 3")
    guard.saved(2)
    with pytest.raises(DivergenceError, match=r"last good state \(step 2\) is kept in .*state.pt\. Lower stage1.lr"):
        guard.check(torch.tensor([0.0, float("inf")]), lambda: "loss between step 2 and 4")
    model = nn.Linear(2, 2)
    guard.check_weights(model, at="after step 4")
    with torch.no_grad():
        model.bias[0] = float("nan")
    with pytest.raises(DivergenceError, match="non-finite weights after step 4 \\(the training diverged\\)"):
        guard.check_weights(model, at="after step 4")
    nothing = DivergenceGuard("ae", "Lower latent.lr", None, unit="kimg")
    with pytest.raises(DivergenceError, match="no training state is kept"):
        nothing.check(torch.tensor(float("-inf")), "loss")


def test_guard_checks_each_step_on_cpu_and_windows_elsewhere(tmp_path):
    guard = DivergenceGuard("stage 2", "Lower stage2.lr", tmp_path / "state.pt", device="cpu")
    nan = torch.tensor(float("nan"))
    guard.check_window(nan, "loss")                                       # on CPU the steps were checked already
    with pytest.raises(DivergenceError, match="non-finite loss nan"):
        guard.check_step(nan, lambda: f"loss {nan.item()}")
    guard.each_step = False                                               # as on an accelerator
    guard.check_step(nan, "loss")
    with pytest.raises(DivergenceError):
        guard.check_window(torch.stack([torch.tensor(1.0), nan]), "loss")


# ---------------------------------------------------------------------------------------------- stats log
def test_stats_log_writes_whole_lines_and_resumes(tmp_path):
    path = tmp_path / "stats.jsonl"
    log = StatsLog(path)
    log.write()
    assert path.read_text() == ""                                         # nothing logged yet: an empty file
    for step in (2, 4, 6):
        log.append({"step": step, "loss": step / 10})
        log.write()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4, 6]
    resumed = StatsLog.resume(path, 4)                                    # the state on disk is at step 4
    assert [json.loads(line)["step"] for line in resumed.lines] == [2, 4]
    assert StatsLog.resume(tmp_path / "none.jsonl", 4).lines == []


# ---------------------------------------------------------------------------------------------- resumable state
def _state(key="k1"):
    return {"step": 3, "w": torch.arange(4.0), "rng": [torch.Generator().manual_seed(1).get_state()],
            "resume_key": key}


def test_training_state_round_trip_and_missing(tmp_path):
    path = tmp_path / "state.pt"
    assert load_training_state(path, "k1", lambda s: 1 / 0, what="test", differs="x") is None
    save_training_state(path, _state())
    assert (tmp_path / "state.pt.sha256").is_file()                       # written by artifacts.save_state
    got = load_training_state(path, "k1", lambda s: (s["step"], s["w"]), what="test", differs="x")
    assert got[0] == 3 and torch.equal(got[1], torch.arange(4.0))
    assert torch.load(path, weights_only=True)["resume_key"] == "k1"
    with pytest.raises(ValueError, match="needs its key"):
        save_training_state(path, {"step": 1})
    other = tmp_path / "other.pt"
    save_training_state(other, {"key": "abc", "step": 1}, key_field="key")
    assert load_training_state(other, "abc", lambda s: s["step"], what="t", differs="x", key_field="key") == 1


def test_training_state_mismatch_policy(tmp_path):
    """Another key, an altered file or a state restore cannot use: one ArtifactError naming the file."""
    path = tmp_path / "state.pt"
    save_training_state(path, _state())
    with pytest.raises(ArtifactError, match=r"state.pt was written with other test settings; delete it") as e:
        load_training_state(path, "k2", lambda s: s, what="test", differs="other test settings")
    assert e.value.path == path                                           # the pipeline deletes and rebuilds it
    with pytest.raises(ArtifactError, match=r"state.pt is not a usable test training state \(KeyError") as e:
        load_training_state(path, "k1", lambda s: s["missing"], what="test", differs="x")
    assert e.value.path == path
    with pytest.raises(ArtifactError, match="not a usable"):
        load_training_state(path, "k1", lambda s: nn.Linear(2, 2).load_state_dict({"weight": s["w"]}),
                            what="test", differs="x")
    torch.save({**_state(), "w": torch.zeros(4)}, path)                  # bytes that fail the sha256 record
    with pytest.raises(ArtifactError, match="sha256"):
        load_training_state(path, "k1", lambda s: s, what="test", differs="x")
    assert path.is_file()                                                 # refused, not deleted nor replaced


def test_generator_states_round_trip():
    gen = torch.Generator().manual_seed(5)
    torch.rand(3, generator=gen)
    states = generator_states(gen)
    expected = torch.rand(4, generator=gen)
    fresh = torch.Generator().manual_seed(0)
    restore_generator(fresh, states)
    assert torch.equal(torch.rand(4, generator=fresh), expected)
    untouched = torch.Generator().manual_seed(0)
    restore_generator(untouched, [])                                      # a rank the state does not cover
    assert torch.equal(torch.rand(4, generator=untouched), torch.rand(4, generator=torch.Generator().manual_seed(0)))


def test_autoencoder_state_of_another_key_is_refused(tmp_path):
    """The autoencoder's loop follows the one policy (it used to train over such a state silently)."""
    from dualpseudo.diffuse.latent import KLAutoencoder, train_autoencoder

    images = np.zeros((16, 8, 8, 1), np.uint8)
    kw = dict(steps=2, batch_size=4, checkpoint_every=2, state_path=tmp_path / "ae_state.pt")
    train_autoencoder(KLAutoencoder(1, 4, 8, 1), images, key="k", **kw)
    with pytest.raises(ArtifactError, match="ae_state.pt was written with another key"):
        train_autoencoder(KLAutoencoder(1, 4, 8, 1), images, key="other", **kw)


# ---------------------------------------------------------------------------------------------- ssl_step
def _logits(probs):
    return torch.tensor(probs).log()


LOGITS_W = _logits([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.9, 0.05, 0.05]])
LOGITS_S = _logits([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.3, 0.4, 0.3], [0.6, 0.2, 0.2]])
LOGITS_LB, Y_LB = _logits([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]), torch.tensor([0, 2])


def test_ssl_step_returns_new_states_and_leaves_the_inputs_alone():
    threshold = FreeMatchThreshold.init(3, momentum=0.9)
    align = DistAlign.init(3, momentum=0.9, y_lb=torch.tensor([0, 1, 2, 2]))
    t0, a0 = threshold.state_dict(), align.state_dict()
    out = ssl_step(LOGITS_LB, Y_LB, LOGITS_W, LOGITS_S, threshold, align, p_cutoff=0.95, lambda_u=1.0,
                   lambda_f=0.5)
    assert all(torch.equal(threshold.state_dict()[k], t0[k]) for k in ("time_p", "p_model", "label_hist"))
    assert torch.equal(align.p_model, a0["p_model"])
    # the same as updating in place in USB's order: alignment, then the threshold on the aligned logits
    align.update(torch.softmax(LOGITS_W, -1))
    aligned = align.aligned_logits(LOGITS_W)
    threshold.update(torch.softmax(aligned, -1))
    mask = threshold.mask(aligned)
    assert torch.equal(out.align.p_model, align.p_model) and torch.equal(out.threshold.time_p, threshold.time_p)
    assert torch.equal(out.mask, mask.mean())
    torch.testing.assert_close(out.loss_u, consistency_loss(LOGITS_S, aligned, mask))
    torch.testing.assert_close(out.loss, out.loss_x + out.loss_u + 0.5 * out.loss_f)


def test_ssl_step_fixmatch_supervised_and_gather():
    out = ssl_step(LOGITS_LB, Y_LB, LOGITS_W, LOGITS_S, None, None, p_cutoff=0.75, lambda_u=2.0)
    assert out.threshold is None and out.align is None and out.loss_f == 0
    assert out.mask.item() == fixmatch_mask(LOGITS_W, 0.75).mean().item() == 0.5
    sup = ssl_step(LOGITS_LB, Y_LB, None, None, None, None, p_cutoff=0.95, lambda_u=1.0)
    assert sup.loss_u == 0 and sup.mask == 0 and torch.equal(sup.loss, sup.loss_x)
    # the states follow the gathered (global) batch; here another process's rows are the same batch again
    twice = ssl_step(LOGITS_LB, Y_LB, LOGITS_W, LOGITS_S, FreeMatchThreshold.init(3, 0.9), None, p_cutoff=0.95,
                     lambda_u=1.0, gather=lambda p: torch.cat([p, p]))
    once = ssl_step(LOGITS_LB, Y_LB, LOGITS_W, LOGITS_S, FreeMatchThreshold.init(3, 0.9), None, p_cutoff=0.95,
                    lambda_u=1.0)
    torch.testing.assert_close(twice.threshold.p_model, once.threshold.p_model)   # means of a doubled batch
    gathered = ssl_step(LOGITS_LB, Y_LB, LOGITS_W, LOGITS_S, FreeMatchThreshold.init(3, 0.9), None, p_cutoff=0.95,
                        lambda_u=1.0, gather=lambda p: torch.cat([p, torch.tensor([[0.0, 0.0, 1.0]] * 4)]))
    assert not torch.allclose(gathered.threshold.p_model, once.threshold.p_model)
