"""A self-supervised encoder trained on the run's own images without labels: SimCLR (Chen et al., ICML 2020).

Dual Pseudo Training's ImageNet recipe (You et al., NeurIPS 2023) classifies with a linear probe on a frozen
self-supervised encoder (MSN), so that the unlabeled images reach the classifier through the encoder and the
generator, not through the labels. This module is the CPU-sized counterpart: a classifier trunk from
`classify.networks` (its `fc` replaced by the identity, so `cnn_small` gives 256-d pooled features), a two-layer
projection head, and the NT-Xent loss over two augmented views of every image in the batch:

    loss = mean_i -log( exp(s(z_i, z_i+) / t) / sum_{j != i} exp(s(z_i, z_j) / t) ),   s = cosine similarity

over the 2B projections of a batch of B images. SimCLR is chosen over the other joint-embedding objectives
because it needs no momentum encoder, predictor or prototype bank (BYOL/SimSiam collapse without their
asymmetry tricks; DINO/MSN need many prototypes and temperature schedules), and it learns usable features in a
few thousand small-batch steps. Views are a random resized crop followed by FixMatch's strong augmentation
(`augment.strong`: RandAugment and Cutout), so the batched on-device augmentation is shared with stage 1.

`encoder.objective: moco` (He et al., CVPR 2020; Chen et al., 2020) keeps the views and the trunk but takes the
keys from a momentum (EMA) copy of the model and adds a queue of past keys to the negatives:

    loss = mean over both views of CE( [q . k_batch, q . queue] / t, the image's own key in the other view ),

with the other images' keys of the same batch among the negatives (so the positive shares its batch statistics
with negatives, and BatchNorm cannot tell it apart; no shuffled BN needed on one device). Small batches get many
negatives without SimCLR's large-batch cost.

`encoder.objective: nnclr` (Dwibedi et al., ICCV 2021) takes each view's positive from the data instead of the
augmentation alone: the nearest neighbour NN(z) of its projection in a support set (a queue of `encoder.queue`
past first-view projections), contrasted with a prediction head's output p of the other view:

    loss = mean over both views of CE( NN(z_i) . p_k(other view) / t over the batch's images k, k = i ),

so images that already embed close together are pulled closer: the clustering a k-NN graph learner reads. Before
the first projections are queued, NN(z) is z itself.

Training resumes exactly from `state.pt` (weights, optimizer, augmentation generator, step; with moco the key
model and the queue too, with nnclr the support set): the batch order is a pure function of (seed, step). With
several processes each rank contrasts its own share of the batch (negatives are the rank's own images and keys)
and DDP averages the gradients.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..artifacts import ArtifactError, file_hash, load_weights, save_weights
from ..config import TRAINING, EncoderConfig, fields_in_roles
from ..distributed import World
from ..runtime import autocast
from ..training import (STATE, STATS, DivergenceGuard, EpochSampler, StatsLog, generator_states, load_training_state,
                        restore_generator, save_training_state, to_float, uint8_nchw)
from . import augment
from .networks import build_network
from .train import param_groups

META_KEY = "dualpseudo_encoder"


def trunk(network: str, in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """A classifier network with its final linear layer replaced by the identity: (module, feature dim)."""
    net = build_network(network, 1, in_channels, image_size)
    if not isinstance(getattr(net, "fc", None), nn.Linear):
        raise ValueError(f"encoder.network={network!r} has no final linear layer `fc` to remove")
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    """Linear, BatchNorm, ReLU, Linear: SimCLR's projection head and NNCLR's prediction head."""
    return nn.Sequential(nn.Linear(dim_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim_out))


class ContrastiveModel(nn.Module):
    """trunk (N, C, H, W) in [-1, 1] -> features h (N, D); head h -> projection z (N, proj_dim).

    With `predictor`, forward returns (z, p): p a prediction head's output on z (NNCLR)."""

    def __init__(self, network: str, in_channels: int, image_size: int, proj_dim: int, predictor: bool = False):
        super().__init__()
        self.trunk, dim = trunk(network, in_channels, image_size)
        self.head = mlp(dim, dim, proj_dim)
        self.predictor = mlp(proj_dim, dim, proj_dim) if predictor else None
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        z = self.head(self.trunk(x))
        return z if self.predictor is None else (z, self.predictor(z))


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of projections z (2B, P) whose rows i and i + B are the two views of image i; a scalar."""
    n = len(z)
    if n % 2 or n < 4:
        raise ValueError(f"nt_xent needs an even number >= 4 of projections, got {n}")
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T / temperature                                           # (2B, 2B)
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    b = n // 2
    positive = torch.cat([torch.arange(b, n), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, positive)


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Contrastive loss of queries q (2B, P) against momentum keys k (2B, P) and queued keys (Q, P), a scalar.

    Rows i and i + B are the two views of image i; each view's query has the other view's key of its image as the
    positive, the other images' keys of that view and the queue as negatives. `queue` holds unit vectors."""
    n = len(q)
    if n % 2 or n < 4:
        raise ValueError(f"moco_loss needs an even number >= 4 of projections, got {n}")
    b = n // 2
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    other = torch.cat([k[b:], k[:b]])                                       # each row's key in the other view
    keys = torch.cat([other[:b], queue]), torch.cat([other[b:], queue])     # (B + Q, P) for each view's queries
    target = torch.arange(b, device=q.device)
    return 0.5 * sum(F.cross_entropy(qv @ kv.T / temperature, target) for qv, kv in zip((q[:b], q[b:]), keys))


def nnclr_loss(z: torch.Tensor, p: torch.Tensor, support: torch.Tensor, temperature: float) -> torch.Tensor:
    """NNCLR's loss of projections z (2B, P) and predictions p (2B, P) against a support set (S, P), a scalar.

    Rows i and i + B are the two views of image i. Each view's projection is replaced by its nearest neighbour in
    `support` (unit vectors; cosine similarity; no gradient), which must pick out the other view's prediction of the
    same image among the batch's predictions of that view. An empty support set uses the projections themselves."""
    n = len(z)
    if n % 2 or n < 4:
        raise ValueError(f"nnclr_loss needs an even number >= 4 of projections, got {n}")
    b = n // 2
    with torch.no_grad():
        zn = F.normalize(z.detach().float(), dim=1)
        nn_ = support[(zn @ support.T).argmax(1)] if len(support) else zn           # (2B, P)
    p = F.normalize(p.float(), dim=1)
    target = torch.arange(b, device=z.device)
    return 0.5 * (F.cross_entropy(nn_[:b] @ p[b:].T / temperature, target)
                  + F.cross_entropy(nn_[b:] @ p[:b].T / temperature, target))


@torch.no_grad()
def momentum_update(key_model: nn.Module, model: nn.Module, momentum: float) -> None:
    """key <- momentum * key + (1 - momentum) * model for parameters; buffers (BN statistics) copied."""
    for pk, p in zip(key_model.parameters(), model.parameters()):
        pk.lerp_(p.detach(), 1 - momentum)
    for bk, b in zip(key_model.buffers(), model.buffers()):
        bk.copy_(b)


def resized_crop(x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float]) -> torch.Tensor:
    """Random resized crop: area fraction U(scale), aspect log-uniform in [3/4, 4/3], back to full size.

    (N, C, H, W) -> (N, C, H, W); one `affine_grid`/`grid_sample` for the batch."""
    n = len(x)
    r = lambda: torch.rand(n, device=x.device, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * r()
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r()
    ratio = log_ratio.exp()
    sw, sh = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)   # side fractions
    cx, cy = (1 - sw) * (2 * r() - 1), (1 - sh) * (2 * r() - 1)        # crop centres in normalised coordinates
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw, cx, sh, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def view(x: torch.Tensor, generator: torch.Generator, cfg: EncoderConfig, hflip: bool) -> torch.Tensor:
    """One contrastive view of float images (N, C, H, W) in [-1, 1]: resized crop, then strong augmentation."""
    x = resized_crop(x, generator, (cfg.crop_min, 1.0))
    return augment.strong(x, generator, hflip, cfg.randaugment_ops, cfg.cutout)


def _resume_key(cfg: EncoderConfig, shape: tuple, num_images: int, seed: int) -> dict:
    """What a saved state must match to be resumed: the TRAINING fields (config.py's roles), not the schedule."""
    return {"encoder": fields_in_roles(cfg, TRAINING), "image_shape": list(shape), "num_images": num_images,
            "seed": seed}


def train_encoder(cfg: EncoderConfig, images: np.ndarray, out_dir: str | Path, *, hflip: bool,
                  device: str | torch.device, precision: str, seed: int, stop_at: int | None = None,
                  world: World, progress: bool = True) -> ContrastiveModel:
    """Train (or resume from out_dir/state.pt) SimCLR, MoCo or NNCLR on uint8 images (N, H, W[, C]); the model in
    eval mode.

    `stop_at` ends this call early at that step (state saved), the schedule still spanning `cfg.steps`.
    Rank 0 alone writes files."""
    device = torch.device(device)
    out_dir = Path(out_dir)
    data = uint8_nchw(images, "encoder images", device)                          # (N, C, H, W) uint8
    _, C, H, W = data.shape
    world.per_rank(cfg.batch_size, "encoder.batch_size")
    if cfg.batch_size > len(data):
        raise ValueError(f"encoder.batch_size={cfg.batch_size} is larger than the {len(data)} training images")
    part = slice(world.rank, None, world.size)
    sampler = EpochSampler(len(data), cfg.batch_size, seed + 7)

    # model, optimizer, augmentation generator; resume
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ContrastiveModel(cfg.network, C, H, cfg.proj_dim, predictor=cfg.objective == "nnclr")
    model = model.to(device, memory_format=torch.channels_last).train()
    moco, queued_objective = cfg.objective == "moco", cfg.objective in ("moco", "nnclr")
    key_model = copy.deepcopy(model).requires_grad_(False) if moco else None   # train mode: batch statistics
    queue = torch.zeros(cfg.queue if queued_objective else 0, cfg.proj_dim, device=device)  # rows read once written
    queued = 0                                                    # keys (moco) or projections (nnclr) written so far
    forward = world.wrap(model, device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    gen = torch.Generator(device=device).manual_seed(seed + 31 + 1_000_003 * world.rank)
    key = _resume_key(cfg, (C, H, W), len(data), seed)
    state_path, stats_path = out_dir / STATE, out_dir / STATS

    def restore(state: dict) -> int:
        nonlocal queued
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        restore_generator(gen, state["rng"], world)
        if moco:
            key_model.load_state_dict(state["key_model"])
        if queued_objective:
            queue.copy_(state["queue"])
            queued = int(state["queued"])
        return int(state["step"])

    step = load_training_state(state_path, key, restore, what="encoder", differs="other encoder settings or images",
                               map_location=device) or 0
    stats = StatsLog.resume(stats_path, step, world=world) if step else StatsLog(stats_path, world=world)
    guard = DivergenceGuard("encoder", "Lower encoder.lr", state_path, step if step else None, world=world,
                            device=device)

    def checkpoint() -> None:
        guard.check_weights(model, at=f"after step {step}")      # a saved state always holds finite weights
        extra = {"queue": queue, "queued": queued} if queued_objective else {}
        if moco:
            extra["key_model"] = key_model.state_dict()
        save_training_state(state_path, {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                         "rng": generator_states(gen, world), "resume_key": key, **extra},
                            world=world)
        guard.saved(step)

    # training loop
    total = cfg.steps
    end = total if stop_at is None else min(total, stop_at)
    warmup = max(1, int(0.05 * total))
    t_log, window = time.time(), []
    with tqdm(total=total, initial=step, disable=not progress or not world.is_main, desc=f"encoder {cfg.objective}",
              dynamic_ncols=True) as bar:
        while step < end:
            lr = cfg.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g["lr"] = lr
            x = to_float(data[sampler.batch(step)[part].to(device)])                   # (B, C, H, W)
            inputs = torch.cat([view(x, gen, cfg, hflip), view(x, gen, cfg, hflip)])   # (2B, C, H, W)
            inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                z = forward(inputs)
            if moco:
                with torch.no_grad(), autocast(device, precision):
                    k = F.normalize(key_model(inputs).float(), dim=1)
                loss = moco_loss(z, k, queue[:min(queued, len(queue))], cfg.temperature)
                enqueue = k                                                    # every view's key
            elif cfg.objective == "nnclr":
                z, p = z
                loss = nnclr_loss(z, p, queue[:min(queued, len(queue))], cfg.temperature)
                enqueue = F.normalize(z.detach().float()[:len(z) // 2], dim=1)  # the first views' projections
            else:
                loss = nt_xent(z, cfg.temperature)
            guard.check(loss, f"loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if moco:
                momentum_update(key_model, model, cfg.momentum)
            if queued_objective:
                if len(queue):
                    new = enqueue[-len(queue):]                       # a batch larger than the queue: its last rows
                    queue[(queued + torch.arange(len(new), device=device)) % len(queue)] = new
                    queued += len(new)
            step += 1
            bar.update(1)
            window.append(loss.detach())
            if step % cfg.log_every == 0 or step == end:
                now = time.time()
                mean = float(torch.stack(window).mean())
                stats.append({"step": step, "loss": mean, "lr": lr,
                              "steps_per_s": round(len(window) / max(now - t_log, 1e-9), 3)})
                stats.write()
                bar.set_postfix(loss=f"{mean:.3f}")
                t_log, window = now, []
            if step % cfg.checkpoint_every == 0 or step == end:
                checkpoint()
    return model.eval()


def save_encoder(path: str | Path, model: ContrastiveModel, meta: dict) -> Path:
    """The trunk's weights (the head is training-only) as safetensors with `meta` (network, channels, size)."""
    return save_weights(path, model.trunk.state_dict(), {"feature_dim": model.dim, **meta}, META_KEY)


def load_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(trunk state dict, meta) of a file written by `save_encoder`; no pickle involved."""
    return load_weights(path, META_KEY, "dualpseudo encoder")


class EncoderFeatures(nn.Module):
    """uint8 (N, H, W, C) -> float32 (N, D) trunk features of a saved encoder (a `linear_probe` encoder)."""

    def __init__(self, path: str | Path, precision: str = "fp32"):
        super().__init__()
        tensors, meta = load_encoder(path)
        try:
            self.net, _ = trunk(meta["network"], int(meta["in_channels"]), int(meta["image_size"]))
            self.net.load_state_dict(tensors)
        except (KeyError, RuntimeError, ValueError) as e:
            raise ArtifactError(f"{path} is not a usable dualpseudo encoder ({type(e).__name__}: "
                                f"{str(e)[:200]}); delete it to rebuild") from None
        self.net.eval()
        self.precision = precision
        self.meta = meta
        self.extractor_id = f"ssl:{file_hash(path)}:{precision}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float(images.permute(0, 3, 1, 2)).contiguous(memory_format=torch.channels_last)
        with autocast(x.device, self.precision):
            h = self.net(x)
        return h.float()
