"""Training loop of the class-conditional EDM diffusion model (stage 2), after NVlabs/edm `training_loop.py`.

Schedules count images seen (kimg): Adam with a linear learning-rate warm-up over `warmup_kimg`, an EMA
of the weights with a half-life of `ema_halflife_kimg` (beta = 0.5 ** (batch / (1000 * halflife))), bf16
autocast, global gradient-norm clipping and a guard that stops on a non-finite loss. Two kinds of checkpoint:
`state.pt` (everything needed to resume bit-exactly: net, EMA, optimizer, images seen, RNG states as
tensors; loadable with weights_only=True) and the inference snapshot written by `save_diffusion`
(safetensors weights of the EMA + JSON meta). Calling `train_diffusion` again with the same `out_dir` resumes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..artifacts import load_weights, save_weights
from ..config import TRAINING, Stage2Config, config_hash, fields_in_roles
from ..distributed import World
from ..runtime import autocast, to_device
from ..training import (STATE, STATS, DivergenceGuard, StatsLog, ema_update, generator_states, load_training_state,
                        restore_generator, save_training_state, to_float)
from .edm import EDMLoss, EDMPrecond
from .networks import NETWORKS



def build_model(network: str, img_channels: int, image_size: int, num_classes: int, sigma_data: float) -> EDMPrecond:
    """EDMPrecond around `NETWORKS[network]`."""
    if network not in NETWORKS:
        raise ValueError(f"stage2.network={network!r} is unknown; choose one of {sorted(NETWORKS)}")
    return EDMPrecond(NETWORKS[network](img_channels, image_size, num_classes), sigma_data)


def _training_hash(cfg: Stage2Config, **extra) -> str:
    """What a saved state must match to be resumed: the TRAINING fields (config.py's roles) and `extra`; the
    duration (a longer run continues a shorter one), checkpoint/log intervals and sampler settings may change."""
    return config_hash({**fields_in_roles(cfg, TRAINING), **extra})


def _batch(images: torch.Tensor, labels: torch.Tensor, batch_size: int, hflip: bool, gen: torch.Generator,
           device: torch.device, part: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch: uint8 (N, H, W, C) -> float (b, C, H, W) in [-1, 1] channels_last, labels (b,).

    float32 data (latents, N, H, W, C) are taken as they are.

    The global batch of `batch_size` is drawn (same `gen` on every process); `part` is this process's share.
    """
    idx = torch.randint(len(images), (batch_size,), generator=gen)
    flip = torch.rand(batch_size, generator=gen) < 0.5 if hflip else None
    idx = idx[part]
    x = to_device(images[idx], device).permute(0, 3, 1, 2)                             # (b, C, H, W)
    x = to_float(x) if x.dtype == torch.uint8 else x.float()
    if flip is not None:
        flip = to_device(flip[part], device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous(memory_format=torch.channels_last), to_device(labels[idx], device)


def _checked_labels(images: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """`labels` as int64 (N,) after checking them and the images; ValueError saying what is wrong."""
    if images.ndim != 4 or images.dtype not in (np.uint8, np.float32) or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be uint8 or float32 (N, H, W, C) with H == W, "
                         f"got {images.dtype} {images.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(images) or labels.min() < 0 or labels.max() > num_classes:
        raise ValueError(f"labels must be (N,) = ({len(images)},) in [0, {num_classes}] ({num_classes} = null class)")
    return labels


def _networks(cfg: Stage2Config, C: int, S: int, num_classes: int, device: torch.device,
              verbose: bool) -> tuple[EDMPrecond, EDMPrecond]:
    """The network in training mode and its EMA copy (built from the global RNG, in this order)."""
    net = build_model(cfg.network, C, S, num_classes, cfg.sigma_data).to(device).train()
    if verbose:
        print(f"stage2 network {cfg.network}: {sum(p.numel() for p in net.parameters()):,} parameters", flush=True)
    ema = build_model(cfg.network, C, S, num_classes, cfg.sigma_data).to(device).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    return net, ema


def _restore(path: Path, key: str, net: EDMPrecond, ema: EDMPrecond, opt: torch.optim.Optimizer,
             gen: torch.Generator, noise_gen: torch.Generator, world: World,
             device: torch.device) -> tuple[int, list[str]] | None:
    """Load the state saved at `path` under `key` into the training objects and the global RNG: (images seen,
    stats lines), or None when there is no state."""
    def restore(state: dict) -> tuple[int, list[str]]:
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["gen_state"].cpu())
        restore_generator(noise_gen, state.get("noise_gen_states", [state["noise_gen_state"]]), world)
        torch.set_rng_state(state["torch_rng_state"].cpu())
        return int(state["nimg"]), [json.dumps(json.loads(line)) for line in state["stats"]]

    return load_training_state(path, key, restore, what="stage-2", key_field="train_hash", map_location=device,
                               differs="a different stage-2 config or dataset")


def train_diffusion(cfg: Stage2Config, *, images: np.ndarray, labels: np.ndarray, num_classes: int,
                    out_dir: str | Path, device: torch.device | str = "cpu", precision: str = "fp32",
                    seed: int = 0, hflip: bool = False, progress: bool = True,
                    world: World, compile: bool = False) -> EDMPrecond:
    """Train (or resume, or just load when finished) and return the EMA EDMPrecond in eval mode.

    images: uint8 (N, H, W, C), or float32 latents (N, H, W, C) already scaled for the model; labels: int64 (N,)
    in [0, num_classes], num_classes = null (unconditional).
    With several processes (`world`: `distributed.LOCAL` for one) each trains on its share of every
    global batch with its own noise stream, DDP averages the gradients, and rank 0 alone writes files.
    `compile`: the training forward runs through `torch.compile` (runtime.compile).

    On CPU the loss is checked at every step; on an accelerator, where reading a value waits for the device, the
    losses are summed on the device and checked at each log point and checkpoint.
    """
    out_dir, device = Path(out_dir), torch.device(device)
    labels = _checked_labels(images, labels, num_classes)
    N, S, _, C = images.shape
    b = world.per_rank(cfg.batch_size, "stage2.batch_size")
    part = slice(world.rank * b, (world.rank + 1) * b)

    # model, EMA, optimizer, loss, data, RNG
    torch.manual_seed(seed)
    net, ema = _networks(cfg, C, S, num_classes, device, progress and world.is_main)
    forward = world.wrap(torch.compile(net) if compile else net, device)               # DDP when several processes
    forward.num_classes = net.num_classes
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    loss_fn = EDMLoss(cfg.P_mean, cfg.P_std, cfg.sigma_data, cfg.p_uncond)
    data_x, data_y = torch.from_numpy(images), torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(seed)                                           # batches (CPU)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1 + 1_000_003 * world.rank)  # sigma, noise, drop
    data_sum = int(images[:, ::4, ::4].sum()) if images.dtype == np.uint8 else float(images[:, ::4, ::4].sum())
    train_hash = _training_hash(cfg, seed=seed, hflip=hflip, N=N, S=S, C=C, num_classes=num_classes,
                                precision=precision, data=data_sum, labels=int(labels.sum()))

    # resume
    state_path = out_dir / STATE
    resumed = _restore(state_path, train_hash, net, ema, opt, gen, noise_gen, world, device)
    nimg, lines = resumed or (0, [])
    stats = StatsLog(out_dir / STATS, lines, world=world)     # kept in the state, written at checkpoints
    guard = DivergenceGuard("stage 2", "Lower stage2.lr or use runtime.precision=fp32", state_path,
                            nimg / 1000 if resumed else None, unit="kimg", world=world, device=device)

    def checkpoint() -> None:
        guard.check_weights(net, ema, at=f"at {nimg / 1000:.3f} kimg")   # a saved state always holds finite weights
        noise_states = generator_states(noise_gen, world)               # a collective call with several processes
        save_training_state(state_path, {
            "net": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "nimg": nimg,
            "gen_state": gen.get_state(), "noise_gen_state": noise_gen.get_state(),
            "torch_rng_state": torch.get_rng_state(), "train_hash": train_hash, "stats": stats.lines,
            **({"noise_gen_states": noise_states} if world.distributed else {})}, key_field="train_hash", world=world)
        stats.write()
        guard.saved(nimg / 1000)

    # training loop
    total = int(round(cfg.duration_kimg * 1000))
    log_every, ckpt_every = int(cfg.log_every_kimg * 1000), int(cfg.checkpoint_every_kimg * 1000)
    next_log, next_ckpt = (nimg // log_every + 1) * log_every, (nimg // ckpt_every + 1) * ckpt_every
    zero = torch.zeros((), dtype=torch.float64, device=device)
    t_log, n_log, loss_sum, loss_n, checked = time.perf_counter(), nimg, zero, 0, nimg
    with tqdm(total=total, initial=nimg, unit="img", unit_scale=True, desc="stage2 diffusion", smoothing=0.05,
              disable=not (progress and world.is_main) or nimg >= total) as bar:
        while nimg < total:
            # one optimisation step
            x, y = _batch(data_x, data_y, cfg.batch_size, hflip, gen, device, part)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(nimg / max(cfg.warmup_kimg * 1000, 1e-8), 1.0)
            with autocast(device, precision):
                loss = loss_fn(forward, x, y, generator=noise_gen).mean()
            guard.check_step(loss, lambda: f"loss {loss.item()} at {nimg / 1000:.3f} kimg")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            nimg += cfg.batch_size
            # EMA with a half-life counted in images, ramped up as in EDM (half-life <= 5% of images seen so far)
            ema_update(ema, net, 0.5 ** (cfg.batch_size / max(min(cfg.ema_halflife_kimg * 1000, nimg * 0.05), 1e-8)))
            loss_sum, loss_n = loss_sum + loss.detach().double(), loss_n + 1      # float64: as summing loss.item()
            bar.update(cfg.batch_size)

            # check, log, checkpoint
            if nimg >= next_log or nimg >= next_ckpt or nimg >= total:
                guard.check_window(loss_sum, f"loss between {checked / 1000:.3f} and {nimg / 1000:.3f} kimg")
                checked = nimg
            if nimg >= next_log or nimg >= total:
                dt = time.perf_counter() - t_log
                row = {"kimg": nimg / 1000, "loss": loss_sum.item() / loss_n, "lr": opt.param_groups[0]["lr"],
                       "img_per_s": (nimg - n_log) / max(dt, 1e-9), "time": time.time()}
                stats.append(row)
                t_log, n_log, loss_sum, loss_n = time.perf_counter(), nimg, zero, 0
                next_log += log_every
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
            if nimg >= next_ckpt or nimg >= total:
                checkpoint()
                next_ckpt += ckpt_every
    return ema.eval()


def save_diffusion(path: str | Path, ema: EDMPrecond, meta: dict) -> Path:
    """Write the inference snapshot: EMA weights as safetensors with JSON meta (network, sizes, sigma_data...)."""
    required = ("network", "img_channels", "image_size", "num_classes", "sigma_data")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"save_diffusion: meta lacks {missing}")
    return save_weights(path, ema.state_dict(), meta, "dualpseudo")


def load_diffusion(path: str | Path, device: torch.device | str = "cpu") -> tuple[EDMPrecond, dict]:
    """Read a snapshot written by `save_diffusion` -> (EDMPrecond in eval mode, meta)."""
    tensors, meta = load_weights(path, "dualpseudo", "diffusion snapshot")
    net = build_model(meta["network"], meta["img_channels"], meta["image_size"], meta["num_classes"], meta["sigma_data"])
    net.load_state_dict(tensors)
    return net.to(device).eval().requires_grad_(False), meta
