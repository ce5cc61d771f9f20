"""The self-supervised encoder (classify/contrastive.py): the NT-Xent loss by hand, views, a falling loss, exact
resume, the weights round trip and the feature cache keyed by the encoder's weights."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from dualpseudo.classify.contrastive import (EncoderFeatures, moco_loss, momentum_update, nnclr_loss, nt_xent,
                                             resized_crop, save_encoder, train_encoder, trunk, view)
from dualpseudo.classify.linear import cached_features
from dualpseudo.config import EncoderConfig
from dualpseudo.data.datasets import make_synthetic
from dualpseudo.distributed import LOCAL

TINY = EncoderConfig(steps=24, batch_size=32, checkpoint_every=6, log_every=6, lr=3e-3)
# moco with a queue of 96 keys: 64 keys a step, so the queue wraps around within the first checkpoint interval
# nnclr with a support set of 48 projections: 32 first views a step, so it wraps around too
OBJECTIVES = {"simclr": TINY, "moco": dataclasses.replace(TINY, objective="moco", queue=96, momentum=0.9),
              "nnclr": dataclasses.replace(TINY, objective="nnclr", queue=48)}


def _images():
    return make_synthetic(num_classes=4, train_per_class=24, test_per_class=2, size=16, channels=1).train_images


def test_nt_xent_by_hand():
    # two images, two views each, projections e1, e2, e1, e2: each row's positive has similarity 1 and its two
    # negatives 0, so every row's loss is -log(e^{1/t} / (e^{1/t} + 2)) = log(1 + 2 e^{-1/t})
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    t = 0.5
    loss = nt_xent(torch.stack([e1, e2, e1, e2]), t)
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-6)
    with pytest.raises(ValueError):
        nt_xent(torch.zeros(3, 2), t)


def test_moco_loss_by_hand():
    # one image pair per view and one queued key: view 1's query meets its positive (similarity 1/t) and the other
    # image's key (0) and the queued key (0); view 2's query likewise: each row's loss is log(1 + 2 e^{-1/t})
    e1, e2, e3 = torch.eye(3)
    t = 0.5
    q = torch.stack([e1, e2, e1, e2])                     # views 1 of images 0, 1; views 2 of images 0, 1
    loss = moco_loss(q, 2 * q, e3[None], t)               # keys: the queries scaled (normalised away)
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-6)
    # a queued key equal to image 0's positive: image 0's rows lose log(2 + e^{-1/t}), image 1's log(1 + 2 e^{-1/t})
    assert moco_loss(q, q, e1[None], t).item() == pytest.approx(
        0.5 * (math.log(2 + math.exp(-1 / t)) + math.log(1 + 2 * math.exp(-1 / t))), rel=1e-6)
    with pytest.raises(ValueError):
        moco_loss(torch.zeros(2, 3), torch.zeros(2, 3), e3[None], t)


def test_nnclr_loss_by_hand():
    # two images and a support set of e3 and e4. Image 0's views project near e3, image 1's near e4 (at any
    # scale): their nearest neighbours are e3 (image 0) and e4 (image 1)
    e1, e2, e3, e4 = torch.eye(4)
    t = 0.5
    z = torch.stack([e3 + 0.1 * e1, e4 + 0.1 * e2, 2 * e3, 3 * e4])          # views 1 of images 0, 1; views 2
    support = torch.stack([e3, e4])
    # predictions equal to the other view's neighbour: each row meets its positive at 1/t and the other image at 0
    p = torch.stack([e3, e4, e3, e4])
    assert nnclr_loss(z, p, support, t).item() == pytest.approx(math.log(1 + math.exp(-1 / t)), rel=1e-6)
    # predictions swapped between the images: the positive is the one at 0, the negative at 1/t
    swapped = torch.stack([e4, e3, e4, e3])
    assert nnclr_loss(z, swapped, support, t).item() == pytest.approx(math.log(1 + math.exp(1 / t)), rel=1e-6)
    # an empty support set: each projection is its own neighbour (z normalised): the same loss as the first case
    # when the projections are the unit vectors themselves
    zz = torch.stack([e3, e4, e3, e4])
    assert nnclr_loss(zz, p, support[:0], t).item() == pytest.approx(math.log(1 + math.exp(-1 / t)), rel=1e-6)
    # gradients reach the predictions, never the neighbours' projections
    zg, pg = z.clone().requires_grad_(), p.clone().requires_grad_()
    nnclr_loss(zg, pg, support, t).backward()
    assert zg.grad is None or not zg.grad.any()
    assert pg.grad is not None and pg.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        nnclr_loss(torch.zeros(2, 3), torch.zeros(2, 3), support[:, :3], t)


def test_momentum_update_moves_parameters_and_copies_buffers():
    model, key = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.fill_(3.0), key.weight.fill_(1.0), model.running_mean.fill_(5.0)
    momentum_update(key, model, 0.75)
    assert torch.allclose(key.weight, torch.full((2,), 1.5)) and torch.equal(key.running_mean, model.running_mean)


def test_views_keep_shape_and_range_and_are_seeded():
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    a = view(x, torch.Generator().manual_seed(0), TINY, hflip=False)
    b = view(x, torch.Generator().manual_seed(0), TINY, hflip=False)
    assert a.shape == x.shape and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    full = resized_crop(x, torch.Generator().manual_seed(0), (1.0, 1.0))   # whole image at aspect ~1: ~identity
    assert (full - x).abs().mean() < 0.35


@pytest.mark.parametrize("network, dim", [("cnn_small", 256), ("cnn_medium", 384)])
def test_trunks_give_pooled_features_of_their_width(network, dim):
    net, d = trunk(network, 1, 16)
    assert d == dim and net(torch.rand(3, 1, 16, 16) * 2 - 1).shape == (3, dim)
    with pytest.raises(ValueError, match=f"{network} needs images of at least 16x16"):
        trunk(network, 1, 8)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_encoder_loss_falls(tmp_path, objective):
    images = _images()
    cfg = dataclasses.replace(OBJECTIVES[objective], steps=60, log_every=10)
    train_encoder(cfg, images, tmp_path, hflip=False, device="cpu", precision="fp32", seed=0, progress=False,
                  world=LOCAL)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.2, losses


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_encoder_resume_is_exact(tmp_path, objective):
    images, cfg = _images(), OBJECTIVES[objective]
    straight = train_encoder(cfg, images, tmp_path / "a", hflip=False, device="cpu", precision="fp32", seed=0,
                             progress=False, world=LOCAL)
    train_encoder(cfg, images, tmp_path / "b", hflip=False, device="cpu", precision="fp32", seed=0,
                  stop_at=12, progress=False, world=LOCAL)
    resumed = train_encoder(cfg, images, tmp_path / "b", hflip=False, device="cpu", precision="fp32", seed=0,
                            progress=False, world=LOCAL)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    lines = (tmp_path / "b" / "stats.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [6, 12, 18, 24]


def test_encoder_state_from_other_settings_is_refused(tmp_path):
    from dualpseudo.artifacts import ArtifactError
    images = _images()
    train_encoder(TINY, images, tmp_path, hflip=False, device="cpu", precision="fp32", seed=0, stop_at=6,
                  progress=False, world=LOCAL)
    with pytest.raises(ArtifactError, match="other encoder settings"):
        train_encoder(dataclasses.replace(TINY, temperature=0.5), images, tmp_path, hflip=False, device="cpu",
                      precision="fp32", seed=0, progress=False, world=LOCAL)


def test_features_round_trip_and_cache_follows_the_weights(tmp_path):
    images = _images()
    meta = {"network": "cnn_small", "in_channels": 1, "image_size": 16}
    model = train_encoder(dataclasses.replace(TINY, steps=6), images, tmp_path / "t", hflip=False, device="cpu",
                          precision="fp32", seed=0, progress=False, world=LOCAL)
    path = save_encoder(tmp_path / "encoder.safetensors", model, meta)
    enc = EncoderFeatures(path)
    with torch.no_grad():
        direct = model.trunk(torch.from_numpy(images[:5]).permute(0, 3, 1, 2).float() / 127.5 - 1).numpy()
    feats = cached_features(enc, images, tmp_path / "cache", extractor_id=enc.extractor_id, shard_size=40,
                            batch_size=16, device="cpu")
    assert feats.shape == (96, 256)
    np.testing.assert_allclose(feats[:5], direct, rtol=1e-4, atol=1e-5)
    # another encoder in the same file: a new extractor id, so every cached shard is recomputed
    other = train_encoder(dataclasses.replace(TINY, steps=6), images, tmp_path / "u", hflip=False, device="cpu",
                          precision="fp32", seed=1, progress=False, world=LOCAL)
    save_encoder(path, other, meta)
    enc2 = EncoderFeatures(path)
    assert enc2.extractor_id != enc.extractor_id
    feats2 = cached_features(enc2, images, tmp_path / "cache", extractor_id=enc2.extractor_id, shard_size=40,
                             batch_size=16, device="cpu")
    assert not np.allclose(feats, feats2)
