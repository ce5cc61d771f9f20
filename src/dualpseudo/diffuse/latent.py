"""Autoencoders for latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"), the latent space of Dual Pseudo Training's ImageNet recipe (You et al. 2023; PAPER.md,
Recipe B: the Stable Diffusion autoencoder, 256x256x3 images -> 4x32x32 latents).

Two interchangeable autoencoders with one API, `encode(x) -> (mean, logvar)` and `decode(z) -> x`, on float
(N, C, H, W) images in [-1, 1]:

- `KLAutoencoder`: a small convolutional VAE trained in-project (`train_autoencoder`: L1 reconstruction plus a
  KL term of weight `kl_weight` towards N(0, I), as the KL-regularised autoencoders of LDM), for CPU-sized data;
- `SDAutoencoder`: diffusers' `AutoencoderKL` read from a local folder (e.g. the Stable Diffusion VAE's
  `config.json` + `diffusion_pytorch_model.safetensors`); nothing is downloaded.

`encode_images` / `decode_latents` work batch-wise between uint8 (N, H, W, C) images and float32 latents (the
posterior means); `latent_scale` gives the factor that brings the latents to the EDM data standard deviation.
Stage 2 uses them through `prepare_latents` (config section `latent`): the autoencoder is trained (or loaded)
once per stage directory and the scaled latents are cached in `latents.npz`, both keyed by their inputs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tqdm.auto import tqdm

from ..artifacts import ArtifactError, load_cached, load_weights, save_npz, save_weights
from ..config import LatentConfig
from ..training import DivergenceGuard, load_training_state, save_training_state, to_float, to_uint8

SD_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
AUTOENCODER = "autoencoder.safetensors"
AE_STATE = "autoencoder_state.pt"
LATENTS = "latents.npz"


class KLAutoencoder(nn.Module):
    """x (N, C, H, W) in [-1, 1] -> (mean, logvar) of z (N, c, H/2^L, W/2^L); z -> x. L = `levels`."""

    def __init__(self, img_channels: int, latent_channels: int = 4, width: int = 32, levels: int = 2):
        super().__init__()
        self.config = {"img_channels": img_channels, "latent_channels": latent_channels, "width": width,
                       "levels": levels}
        enc: list[nn.Module] = [nn.Conv2d(img_channels, width, 3, padding=1)]
        c = width
        for _ in range(levels):
            enc += [nn.SiLU(), nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
                    nn.SiLU(), nn.Conv2d(2 * c, 2 * c, 3, padding=1)]
            c *= 2
        enc += [nn.SiLU(), nn.Conv2d(c, 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, c, 3, padding=1)]
        for _ in range(levels):
            dec += [nn.SiLU(), nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c // 2, 3, padding=1),
                    nn.SiLU(), nn.Conv2d(c // 2, c // 2, 3, padding=1)]
            c //= 2
        dec += [nn.SiLU(), nn.Conv2d(c, img_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.factor = 2 ** levels

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) -> mean, logvar (N, c, H/f, W/f); H and W must be multiples of f = 2^levels."""
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of {self.factor}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, c, h, w) -> (N, C, h*f, w*f)."""
        return self.decoder(z)


class SDAutoencoder(nn.Module):
    """diffusers' AutoencoderKL (e.g. the Stable Diffusion VAE) behind the `encode` / `decode` API."""

    def __init__(self, folder: str | Path):
        super().__init__()
        folder = Path(folder).expanduser()
        missing = [f for f in SD_FILES if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"the autoencoder folder {str(folder)!r} lacks {missing}: put the Stable Diffusion VAE there "
                f"({' and '.join(SD_FILES)}, e.g. from the 'stabilityai/sd-vae-ft-ema' repository; nothing is "
                f"downloaded at run time)")
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(str(folder)).eval().requires_grad_(False)
        self.config = {"path": str(folder), "scaling_factor": float(self.vae.config.scaling_factor)}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


def autoencoder_loss(ae: KLAutoencoder, x: torch.Tensor, kl_weight: float,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """L1 reconstruction of a posterior sample + kl_weight * KL(q(z|x) || N(0, I)) per latent element; scalar."""
    mean, logvar = ae.encode(x)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=x.device)
    recon = (ae.decode(z) - x).abs().mean()
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
    return recon + kl_weight * kl, {"recon_l1": float(recon.detach()), "kl": float(kl.detach())}


def _images(images_uint8: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W[, C]) numpy -> float (N, C, H, W) in [-1, 1] on `device` (a permuted, channels-last layout)."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(device)
    x = x[..., None] if x.ndim == 3 else x
    return to_float(x.permute(0, 3, 1, 2))


def train_autoencoder(ae: KLAutoencoder, images_uint8: np.ndarray, *, steps: int, batch_size: int = 64,
                      lr: float = 1e-3, kl_weight: float = 1e-6, seed: int = 0,
                      device: str | torch.device = "cpu", state_path: str | Path | None = None, key: str = "",
                      checkpoint_every: int = 250, progress: bool = False) -> list[dict]:
    """Adam on random batches of uint8 (N, H, W, C) images; returns the per-step losses.

    With `state_path`, the model, optimizer, batch generator, step and losses are saved every `checkpoint_every`
    steps and at the end; a later call with the same `key` resumes from that state (on CPU, N steps straight and
    N/2 + resume + N/2 give the same weights). A state saved under another key, or one that fails its sha256 record
    or cannot be restored, is an ArtifactError naming it (the one policy of `training.load_training_state`).
    """
    device = torch.device(device)
    state_path = None if state_path is None else Path(state_path)
    ae.to(device).train()
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)

    def restore(state: dict) -> tuple[int, list[dict]]:
        ae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"].cpu())
        return int(state["step"]), list(state["log"])

    resumed = None if state_path is None else load_training_state(
        state_path, key, restore, what="stage-2 autoencoder", key_field="key", map_location=device,
        differs="another key (other latent settings, images or seed)")
    start, log = resumed or (0, [])
    guard = DivergenceGuard("the stage-2 autoencoder", "Lower latent.lr or use runtime.precision=fp32, then rerun",
                            state_path, start if start else None)

    def save(step: int) -> None:
        guard.check_weights(ae, at=f"by step {step}")
        guard.check(torch.tensor(log[-1]["loss"] if log else 0.0, dtype=torch.float64), f"loss by step {step}")
        if state_path is not None:
            save_training_state(state_path, {"key": key, "model": ae.state_dict(), "optimizer": opt.state_dict(),
                                             "generator": g.get_state(), "step": step, "log": log}, key_field="key")
            guard.saved(step)

    bar = tqdm(total=steps, initial=start, desc="stage2 autoencoder", unit="step", disable=not progress,
               dynamic_ncols=True)
    for step in range(start, steps):
        idx = torch.randint(len(images_uint8), (batch_size,), generator=g).numpy()
        noise_gen = g if device.type == "cpu" else None
        loss, parts = autoencoder_loss(ae, _images(images_uint8[idx], device), kl_weight, noise_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append({"loss": float(loss.detach()), **parts})
        bar.update(1)
        if (step + 1) % 25 == 0:
            bar.set_postfix(recon_l1=f"{np.mean([r['recon_l1'] for r in log[-25:]]):.4f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save(step + 1)
    bar.close()
    if start < steps:
        save(steps)
    ae.eval()
    return log


@torch.no_grad()
def encode_images(ae: nn.Module, images_uint8: np.ndarray, *, batch_size: int = 256,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Posterior means float32 (N, c, h, w) of uint8 images (N, H, W[, C])."""
    device = torch.device(device)
    ae.to(device).eval()
    out = [ae.encode(_images(images_uint8[i:i + batch_size], device))[0].float().cpu()
           for i in range(0, len(images_uint8), batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def decode_latents(ae: nn.Module, z: np.ndarray | torch.Tensor, *, batch_size: int = 256,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """Latents (N, c, h, w) -> uint8 images (N, H, W, C)."""
    device = torch.device(device)
    ae.to(device).eval()
    z = torch.as_tensor(z, dtype=torch.float32)
    out = []
    for i in range(0, len(z), batch_size):
        x = ae.decode(z[i:i + batch_size].to(device)).float()                     # (B, C, H, W) in ~[-1, 1]
        out.append(to_uint8(x).permute(0, 2, 3, 1).cpu())
    return torch.cat(out).numpy()


def latent_scale(latents: np.ndarray, sigma_data: float = 0.5) -> float:
    """The factor s with std(s * latents) = sigma_data (the EDM data standard deviation)."""
    return float(sigma_data / max(float(np.std(latents)), 1e-8))


def save_autoencoder(path: str | Path, ae: KLAutoencoder, meta: dict | None = None) -> Path:
    """Weights as safetensors with the constructor config (+ `meta`) as JSON."""
    return save_weights(path, ae.state_dict(), {**ae.config, **(meta or {})}, "dualpseudo_autoencoder")


def load_autoencoder(path: str | Path) -> tuple[KLAutoencoder, dict]:
    """(autoencoder in eval mode, meta) from a file written by `save_autoencoder`."""
    tensors, meta = load_weights(path, "dualpseudo_autoencoder", "dualpseudo autoencoder")
    ae = KLAutoencoder(meta["img_channels"], meta["latent_channels"], meta["width"], meta["levels"])
    ae.load_state_dict(tensors)
    return ae.eval(), meta


# ---------------------------------------------------------------------------------------------- stage-2 helpers
def _autoencoder(cfg: LatentConfig, images_uint8: np.ndarray, out_dir: Path, key: str, seed: int,
                 device: torch.device, progress: bool = False) -> nn.Module:
    """The stage's autoencoder: the SD VAE at `autoencoder_path`, or a KLAutoencoder trained once and kept."""
    if cfg.autoencoder == "sd":
        if not cfg.autoencoder_path:
            raise FileNotFoundError(f"latent.autoencoder=sd needs latent.autoencoder_path: a folder with {SD_FILES}")
        return SDAutoencoder(cfg.autoencoder_path)
    path = out_dir / AUTOENCODER
    if path.is_file():
        try:
            ae, meta = load_autoencoder(path)
            if meta.get("key") == key:
                return ae
        except ArtifactError:
            pass
    torch.manual_seed(seed)
    ae = KLAutoencoder(images_uint8.shape[-1] if images_uint8.ndim == 4 else 1, cfg.latent_channels, cfg.width,
                       cfg.levels)
    log = train_autoencoder(ae, images_uint8, steps=cfg.train_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                            kl_weight=cfg.kl_weight, seed=seed, device=device, state_path=out_dir / AE_STATE,
                            key=key, progress=progress)
    save_autoencoder(path, ae, {"key": key, "final_recon_l1": float(np.mean([r["recon_l1"] for r in log[-20:]]))})
    return ae


def prepare_latents(cfg: LatentConfig, images_uint8: np.ndarray, out_dir: str | Path, *, key: str,
                    seed: int = 0, sigma_data: float = 0.5, batch_size: int = 256,
                    device: str | torch.device = "cpu", progress: bool = False) -> tuple[nn.Module, np.ndarray, float]:
    """(autoencoder, latents float32 (N, h, w, c) scaled to std sigma_data, scale); cached in `out_dir` under
    `key` (everything they depend on: the caller's declaration of them).

    The in-project autoencoder's training is resumable (`autoencoder_state.pt`)."""
    out_dir, device = Path(out_dir), torch.device(device)
    ae = _autoencoder(cfg, images_uint8, out_dir, key, seed, device, progress)
    path = out_dir / LATENTS
    z = load_cached(path, key, ("latents", "scale"))
    if z is not None and len(z["latents"]) == len(images_uint8):
        return ae, z["latents"], float(z["scale"])
    z = encode_images(ae, images_uint8, batch_size=batch_size, device=device)     # (N, c, h, w)
    scale = latent_scale(z, sigma_data)
    latents = np.ascontiguousarray((z * scale).transpose(0, 2, 3, 1)).astype(np.float32)  # (N, h, w, c)
    save_npz(path, latents=latents, scale=np.array(scale), key=np.array(key))
    return ae, latents, scale


def latent_decoder(ae: nn.Module, scale: float, device: str | torch.device = "cpu"):
    """A `decode` for `generate`: scaled latents (B, c, h, w) -> uint8 images (B, H, W, C)."""
    def decode(x: torch.Tensor) -> np.ndarray:
        return decode_latents(ae, x.float().cpu() / scale, batch_size=len(x), device=device)
    return decode


def load_latent_decoder(meta: dict, stage_dir: str | Path, device: str | torch.device = "cpu"):
    """The decoder of a latent diffusion snapshot (`meta["latent"]`) from its stage directory."""
    lat = meta["latent"]
    ae = SDAutoencoder(lat["autoencoder_path"]) if lat["autoencoder"] == "sd" else \
        load_autoencoder(Path(stage_dir) / AUTOENCODER)[0]
    return latent_decoder(ae, float(lat["scale"]), device)
