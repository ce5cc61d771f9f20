"""Contracts of seeded, batched, chunked generation and of the inference snapshot."""
import numpy as np
import pytest
import torch

from dualpseudo.diffuse.edm import EDMPrecond
from dualpseudo.diffuse.generate import chunk_path, generate, generate_chunks
from dualpseudo.diffuse.networks import UNet
from dualpseudo.diffuse.train import load_diffusion, save_diffusion

KW = dict(sampler="dpmpp_2m", steps=4, guidance_scale=1.5, batch_size=4, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = UNet(1, 12, 3, model_channels=8, channel_mult=(1, 2), num_blocks=1, head_dim=8)
    with torch.no_grad():
        for p in net.parameters():                                   # non-trivial outputs (zero-init layers)
            p.add_(torch.randn_like(p) * 0.05)
    return EDMPrecond(net, 0.5).eval()


LABELS = np.array([0, 1, 2, 0, 1, 2, 3, 0, 1, 2], dtype=np.int64)
SEEDS = np.arange(100, 110)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun"])
def test_image_alone_equals_in_batch(model, sampler):
    kw = {**KW, "sampler": sampler}
    batch = generate(model, LABELS, SEEDS, **kw)
    assert batch.shape == (10, 12, 12, 1) and batch.dtype == np.uint8
    alone = generate(model, LABELS[6:7], SEEDS[6:7], **kw)
    np.testing.assert_array_equal(alone[0], batch[6])
    assert len(np.unique(batch.reshape(10, -1), axis=0)) == 10     # different seeds, different images


def test_chunked_equals_one_shot_and_resumes(model, tmp_path):
    one_shot = generate(model, LABELS, SEEDS, **KW)
    chunked = generate_chunks(model, LABELS, SEEDS, tmp_path, chunk=3, **KW)
    np.testing.assert_array_equal(chunked, one_shot)
    assert sorted(p.name for p in tmp_path.glob("chunk_*.npz")) == [f"chunk_{k:04d}.npz" for k in range(4)]
    # a missing and a truncated chunk are regenerated; intact chunks are reused, not recomputed
    chunk_path(tmp_path, 1).unlink()
    chunk_path(tmp_path, 3).write_bytes(b"truncated")
    before = chunk_path(tmp_path, 0).stat().st_mtime_ns
    resumed = generate_chunks(model, LABELS, SEEDS, tmp_path, chunk=3, **KW)
    np.testing.assert_array_equal(resumed, one_shot)
    assert chunk_path(tmp_path, 0).stat().st_mtime_ns == before
    # shards: only the named chunks are made
    shard = tmp_path / "shard"
    assert generate_chunks(model, LABELS, SEEDS, shard, chunk=3, chunk_indices=[2], **KW) is None
    assert [p.name for p in shard.glob("chunk_*.npz")] == ["chunk_0002.npz"]


def test_snapshot_round_trip(model, tmp_path):
    meta = {"network": "unet_tiny", "img_channels": 1, "image_size": 12, "num_classes": 3, "sigma_data": 0.5}
    torch.manual_seed(0)
    from dualpseudo.diffuse.train import build_model
    ema = build_model("unet_tiny", 1, 12, 3, 0.5).eval()
    save_diffusion(tmp_path / "diffusion.safetensors", ema, meta)
    loaded, meta2 = load_diffusion(tmp_path / "diffusion.safetensors")
    assert meta2 == meta
    x, s, y = torch.randn(2, 1, 12, 12), torch.tensor([0.5, 3.0]), torch.tensor([1, 3])
    with torch.no_grad():
        assert torch.equal(loaded(x, s, y), ema(x, s, y))
