"""Stage 2: train the class-conditional diffusion model on pseudo-labels, then sample K images per class.

Labels come from the newest classifier's `pseudo_labels.npz` (labeled images carry their true label). With
`stage2.min_confidence > 0`, images whose pseudo-label is less confident train as the null class (unconditional),
a variant beyond the paper. `label_source: true` / `none` give the full-label and unconditional references; an
unconditional model samples every image from the null class without guidance, and its pseudo_images.npz says so
with label `num_classes` (the pipeline runs no stage 3 for it).
With `latent.autoencoder: train|sd` the model is trained on an autoencoder's latents and its samples are decoded
(the paper's ImageNet recipe, diffuse/latent.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..artifacts import array_hash, concerning
from ..manifest import adopt_key, reset_if_stale
from ..config import ExperimentConfig
from ..data.datasets import Dataset
from ..distributed import World
from ..diffuse.generate import generate_chunks
from ..diffuse.train import load_diffusion, save_diffusion, train_diffusion
from ..figures import save_grid
from .declare import LATENTS, stage2_model_key, stage2_sampling_key
from .files import DIFFUSION, GRID, STATE, STATS, PseudoImages, PseudoLabels

TRAIN_FILES = (STATE, STATS, DIFFUSION)
SAMPLE_KEY = "sample_key.json"                      # the key the generated chunks were made under


def conditioning_labels(cfg: ExperimentConfig, ds: Dataset, pseudo: PseudoLabels | None) -> np.ndarray:
    """Training labels for the diffusion model; `ds.num_classes` is the null (unconditional) class."""
    null = ds.num_classes
    source = cfg.stage2.label_source
    if source == "true":
        return ds.train_labels.copy()
    if source == "none":
        return np.full(len(ds.train_labels), null, dtype=np.int64)
    labels = pseudo.label.astype(np.int64).copy()
    low = (pseudo.confidence < cfg.stage2.min_confidence) & ~pseudo.is_labeled
    labels[low] = null
    return labels


def sample_seeds(cfg: ExperimentConfig, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and per-image seeds: image k of class c has index c*K + k and seed sample_seed*2**20 + index."""
    K = cfg.stage2.images_per_class
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), K)
    seeds = cfg.stage2.sample_seed * 2**20 + np.arange(len(labels), dtype=np.int64)
    return labels, seeds


def run_stage2(cfg: ExperimentConfig, ds: Dataset, labels_dir: Path | None, out: Path, device: torch.device, *,
               world: World, progress: bool = True) -> dict:
    """Train (or resume, or reuse) the diffusion model in `out` on the pseudo-labels in `labels_dir` (None: the
    label source needs none) and write pseudo_images.npz and grid.png; a summary for the manifest.

    With several processes (`world`) all train (data parallel) and each samples the chunks k = rank,
    rank + size, ...; rank 0 then assembles them (per-image seeds: the same images as one process) and writes;
    the others return {}.
    """
    s2 = cfg.stage2
    pseudo = PseudoLabels.load(labels_dir) if labels_dir else None
    labels = conditioning_labels(cfg, ds, pseudo)
    data_keys = {"labels": array_hash(labels), "dataset": ds.fingerprint}
    train_key = {**stage2_model_key(cfg), **data_keys}
    if world.is_main:                                   # a model (and chunks) made under schema 1's keys: kept
        schema1 = {**stage2_model_key(cfg, schema1=True), **data_keys}
        adopt_key(out, schema1, train_key)
        adopt_key(out, stage2_sampling_key(cfg, schema1), stage2_sampling_key(cfg, train_key), SAMPLE_KEY)
    ema, decode, image_shape = _model(cfg, ds, labels, train_key, out, device, world, progress)
    unconditional = s2.label_source == "none"
    guidance = 0.0 if unconditional else s2.guidance_scale
    gen_labels, seeds = sample_seeds(cfg, ds.num_classes)
    if unconditional:       # the null class for every image, no guidance: the class embeddings were never trained
        gen_labels = np.full_like(gen_labels, ds.num_classes)
    images = _sample(cfg, ema, gen_labels, seeds, guidance, stage2_sampling_key(cfg, train_key), out, device, world,
                     progress, decode=decode, image_shape=image_shape)
    if images is None:                                  # (a rank other than 0 of a launch)
        return {}
    PseudoImages(images, gen_labels, seeds, s2.sampler, s2.steps, guidance).save(out)
    K = s2.images_per_class
    cols = min(K, 10)
    grid_idx = (np.arange(ds.num_classes)[:, None] * K + np.arange(cols)[None]).reshape(-1)
    save_grid(out / GRID, images[grid_idx], rows=ds.num_classes,
              row_names=None if unconditional else list(ds.class_names))
    return {"num_images": int(len(images)), "images_per_class": K, "sampler": s2.sampler, "steps": s2.steps,
            "guidance_scale": guidance, "unconditional": unconditional,
            "conditional_fraction": float((labels < ds.num_classes).mean())}


def _model(cfg: ExperimentConfig, ds: Dataset, labels: np.ndarray, train_key: dict, out: Path,
           device: torch.device, world: World, progress: bool) -> tuple[torch.nn.Module, object, tuple | None]:
    """(EMA model, latent decoder or None, image shape (H, W, C) for latents or None): the model in `out` when it
    was trained under `train_key`, else trained (or resumed) there on `labels`."""
    s2 = cfg.stage2
    data, decode, image_shape, latent_meta = ds.train_images, None, None, {}
    if cfg.latent.autoencoder != "none":                # latent diffusion: train/load the autoencoder, cache latents
        data, decode, latent_meta = _latents(cfg, ds, out, device, world, progress)
        image_shape = tuple(ds.image_shape)
    retrained = world.broadcast(reset_if_stale(out, train_key, TRAIN_FILES) if world.is_main else None)

    meta = {"network": s2.network, "img_channels": data.shape[3], "image_size": data.shape[1],
            "num_classes": ds.num_classes, "sigma_data": s2.sigma_data, "class_names": list(ds.class_names),
            **latent_meta}
    if (out / DIFFUSION).is_file() and not retrained:
        return load_diffusion(out / DIFFUSION)[0].to(device), decode, image_shape
    with concerning(out / STATE):                      # the loop names its refused state only in the message
        ema = train_diffusion(s2, images=data, labels=labels, num_classes=ds.num_classes, out_dir=out,
                              device=device, precision=cfg.runtime.precision, seed=cfg.runtime.seed,
                              hflip=cfg.data.hflip, progress=progress, world=world, compile=cfg.runtime.compile)
    if world.is_main:
        save_diffusion(out / DIFFUSION, ema, meta)
    return ema, decode, image_shape


def _sample(cfg: ExperimentConfig, ema: torch.nn.Module, labels: np.ndarray, seeds: np.ndarray, guidance: float,
            sample_key: dict, out: Path, device: torch.device, world: World, progress: bool,
            **decoding) -> np.ndarray | None:
    """The pseudo-images uint8 (N, H, W, C) of `labels` and per-image `seeds`, generated in resumable chunks in
    `out/chunks` (kept while `sample_key`, the SAMPLING fields' key, matches, so new sampler settings regenerate
    without retraining). Under a launch each rank generates its share of the chunks and rank 0 assembles them;
    the other ranks get None."""
    s2 = cfg.stage2
    if world.is_main:
        reset_if_stale(out, sample_key, ("chunks",), key_file=SAMPLE_KEY)
    world.barrier()
    sampling = dict(sampler=s2.sampler, steps=s2.steps, guidance_scale=guidance, batch_size=s2.sample_batch_size,
                    device=device, precision=cfg.runtime.precision, **decoding)
    if world.distributed:
        n_chunks = -(-len(seeds) // s2.sample_chunk)
        generate_chunks(ema, labels, seeds, out / "chunks", s2.sample_chunk,
                        chunk_indices=list(range(world.rank, n_chunks, world.size)),
                        progress=progress and world.is_main, **sampling)
        world.barrier()
        if not world.is_main:
            return None
    return generate_chunks(ema, labels, seeds, out / "chunks", s2.sample_chunk, progress=progress, **sampling)


def _latents(cfg: ExperimentConfig, ds: Dataset, out: Path, device: torch.device, world: World,
             progress: bool = True) -> tuple[np.ndarray, object, dict]:
    """(scaled latents (N, h, w, c), their decoder, snapshot meta); rank 0 makes the cache, the others read it."""
    from ..diffuse.latent import AE_STATE, latent_decoder, prepare_latents

    kw = dict(key=LATENTS.config_hash(cfg, dataset=ds.fingerprint), seed=cfg.runtime.seed,
              sigma_data=cfg.stage2.sigma_data, device=device, progress=progress and world.is_main)
    with concerning(out / AE_STATE):                  # the autoencoder's refused training state, if any
        if world.distributed:
            if world.is_main:
                prepare_latents(cfg.latent, ds.train_images, out, **kw)
            world.barrier()
        ae, latents, scale = prepare_latents(cfg.latent, ds.train_images, out, **kw)
    meta = {"latent": {"autoencoder": cfg.latent.autoencoder, "autoencoder_path": cfg.latent.autoencoder_path,
                       "scale": scale, "image_shape": list(ds.image_shape)}}
    return latents, latent_decoder(ae, scale, device), meta
