"""Batched, sharded feature extraction and the domain feature wrapper."""
import numpy as np
import pytest
import torch

from dualpseudo.evaluate.domain import domain_feature_fn
from dualpseudo.evaluate.features import extract_features, interleave_shards, shard_indices


def _mean_fn(x):                                              # (B, H, W, C) uint8 -> (B, 2)
    m = x.float().mean(dim=(1, 2, 3))
    return torch.stack([m, m * 2], dim=1)


def test_extract_features_batched_and_sharded():
    images = np.arange(11 * 3 * 3, dtype=np.uint8).reshape(11, 3, 3)          # grey (N, H, W)
    full = extract_features(_mean_fn, images, batch_size=4, device="cpu", progress=False)
    assert full.shape == (11, 2) and full.dtype == np.float32
    np.testing.assert_allclose(full[:, 0], images.reshape(11, -1).mean(1), rtol=1e-6)
    shards = [extract_features(_mean_fn, images, batch_size=2, device="cpu", progress=False, rank=r, world_size=3)
              for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 3]
    np.testing.assert_array_equal(interleave_shards(shards), full)
    np.testing.assert_array_equal(shard_indices(11, 1, 3), [1, 4, 7, 10])
    with pytest.raises(ValueError):
        interleave_shards([shards[0], shards[2], shards[1][:2]])


class _Tiny(torch.nn.Module):
    """A stand-in with the protocol's `features` and `head`; that every real classifier network (the oracle's
    choices) exposes `features` is checked in test_networks.py."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 5, 3, padding=1), torch.nn.BatchNorm2d(5))
        self.head = torch.nn.Linear(5, 3)


def test_domain_features_pool_and_eval_mode():
    model = _Tiny().train()
    fn = domain_feature_fn(model)
    images = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    feats = extract_features(fn, images, batch_size=4, device="cpu", progress=False)
    assert feats.shape == (6, 5)
    assert not model.training                                  # extract_features evaluates in eval mode
    with pytest.raises(TypeError, match="features"):
        domain_feature_fn(torch.nn.Linear(2, 2))


def test_extract_features_reads_selected_rows_in_order(tmp_path):
    images = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(9, 2, 2, 1))
    images[:] = np.arange(9, dtype=np.uint8)[:, None, None, None] * 10
    idx = np.array([7, 0, 3, 8, 3])                                            # any order, repeats allowed
    got = extract_features(_mean_fn, images, indices=idx, batch_size=2, device="cpu", progress=False)
    np.testing.assert_allclose(got[:, 0], idx * 10.0)
    shards = [extract_features(_mean_fn, images, indices=idx, batch_size=2, device="cpu", progress=False,
                               rank=r, world_size=2) for r in range(2)]
    np.testing.assert_array_equal(interleave_shards(shards), got)
    with pytest.raises(ValueError, match="indices"):
        extract_features(_mean_fn, images, indices=np.array([0, 9]), batch_size=2, device="cpu", progress=False)
