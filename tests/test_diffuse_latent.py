"""Autoencoders of latent diffusion (diffuse/latent.py): round-trip shapes, training lowers the reconstruction
error, save/load equality, and the missing Stable Diffusion VAE error."""
import numpy as np
import pytest
import torch

from dualpseudo.artifacts import ArtifactError
from dualpseudo.diffuse.latent import (SD_FILES, KLAutoencoder, SDAutoencoder, decode_latents, encode_images,
                                       latent_scale, load_autoencoder, save_autoencoder, train_autoencoder)


def _images(n=64, size=16, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, size, size, channels), np.uint8)
    for i in range(n):                                                      # a bright square per image
        r, c = rng.integers(0, size - 6, 2)
        x[i, r:r + 6, c:c + 6] = 220
    return x


@pytest.mark.parametrize("size, channels, levels", [(16, 1, 2), (28, 1, 2), (32, 3, 3)])
def test_latent_round_trip_shapes(size, channels, levels):
    ae = KLAutoencoder(channels, latent_channels=4, width=8, levels=levels)
    images = _images(5, size, channels)
    z = encode_images(ae, images, batch_size=2)
    f = 2 ** levels
    assert z.shape == (5, 4, size // f, size // f) and z.dtype == np.float32
    back = decode_latents(ae, z, batch_size=2)
    assert back.shape == images.shape and back.dtype == np.uint8


def test_training_lowers_reconstruction_error_and_round_trips(tmp_path):
    torch.manual_seed(0)
    ae = KLAutoencoder(1, latent_channels=4, width=8, levels=2)
    images = _images()
    log = train_autoencoder(ae, images, steps=60, batch_size=16, lr=3e-3, seed=0)
    assert np.mean([r["recon_l1"] for r in log[-5:]]) < 0.6 * np.mean([r["recon_l1"] for r in log[:5]])
    z = encode_images(ae, images)
    assert latent_scale(z) * z.std() == pytest.approx(0.5, rel=1e-5)
    save_autoencoder(tmp_path / "ae.safetensors", ae, {"latent_scale": latent_scale(z)})
    loaded, meta = load_autoencoder(tmp_path / "ae.safetensors")
    assert meta["levels"] == 2 and meta["latent_scale"] == pytest.approx(latent_scale(z))
    np.testing.assert_array_equal(encode_images(loaded, images), z)


def test_autoencoder_training_resumes_to_the_same_weights(tmp_path):
    """8 steps straight == 4 steps, a new process's worth of objects, then resume to 8 (same key)."""
    images = _images()
    kw = dict(batch_size=8, lr=3e-3, seed=0, checkpoint_every=2)

    def fresh(init_seed=0):
        torch.manual_seed(init_seed)
        return KLAutoencoder(1, latent_channels=4, width=8, levels=2)

    straight = fresh()
    log_a = train_autoencoder(straight, images, steps=8, **kw)
    state = tmp_path / "ae_state.pt"
    train_autoencoder(fresh(), images, steps=4, state_path=state, key="k", **kw)
    resumed = fresh(init_seed=1)            # other initial weights: only a real resume can match `straight`
    log_b = train_autoencoder(resumed, images, steps=8, state_path=state, key="k", **kw)
    assert len(log_b) == 8 and [r["loss"] for r in log_b] == pytest.approx([r["loss"] for r in log_a], rel=1e-5)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # a state saved under another key is refused (the stage deletes it and rebuilds), never silently resumed
    other = fresh(init_seed=1)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ArtifactError, match="written with another key"):
        train_autoencoder(other, images, steps=8, state_path=state, key="other", **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))


def test_missing_stable_diffusion_vae_names_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=SD_FILES[1]):
        SDAutoencoder(tmp_path / "sd-vae")


def test_diffusers_autoencoder_from_a_local_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=4, layers_per_block=1, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    ae = SDAutoencoder(tmp_path / "vae")
    images = _images(3, 16, 3)
    z = encode_images(ae, images)
    assert z.shape == (3, 4, 8, 8)                                          # SD layout: 4 channels, 1/2^(levels-1)
    assert decode_latents(ae, z).shape == images.shape


def test_a_diverged_autoencoder_keeps_its_last_good_state_and_says_so(tmp_path):
    """Weights that turn non-finite after step 2 are refused at the next checkpoint; the saved state stays the
    step-2 one and the message names it."""
    from dualpseudo.artifacts import load_state
    from dualpseudo.guards import DivergenceError

    torch.manual_seed(0)
    ae = KLAutoencoder(1, latent_channels=4, width=8, levels=2)
    state = tmp_path / "ae_state.pt"
    kw = dict(batch_size=8, lr=3e-3, seed=0, checkpoint_every=2, state_path=state, key="k")
    train_autoencoder(ae, _images(), steps=2, **kw)
    calls = []

    def poison(module, args):                     # after the resume, the weights blow up at step 4
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                module.weight.fill_(float("nan"))
    ae.decoder[-1].register_forward_pre_hook(poison)
    with pytest.raises(DivergenceError, match=r"last good state \(step 2\)"):
        train_autoencoder(ae, _images(), steps=6, **kw)
    assert load_state(state)["step"] == 2
