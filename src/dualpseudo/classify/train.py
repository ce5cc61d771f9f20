"""Stage-1/3 classifier training: FixMatch / FreeMatch / supervised with an EMA model, resumable.

The recipe of FixMatch (Sohn et al., NeurIPS 2020): SGD with Nesterov momentum, weight decay on weights (not on
biases/BatchNorm), learning rate lr * cos(7 pi k / (16 K)), an EMA of the weights for evaluation, and the
labeled, weak and strong views forwarded as one concatenated batch. FreeMatch (Wang et al., ICLR 2023) swaps the
fixed threshold for `FreeMatchThreshold` and adds the fairness loss; the loss of a step is `ssl.ssl_step`. Stage 3
of Dual Pseudo Training (You et al., NeurIPS 2023) mixes pseudo-images into every labeled batch (`pseudo_fraction`).

Batches are drawn from reshuffled epochs whose permutation is a function of (seed, epoch) (`training.EpochSampler`),
so the data order needs no saved state; the augmentation generator's state is saved in `state.pt`. Resuming
therefore gives the same weights as an uninterrupted run.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..artifacts import load_weights, save_weights
from ..config import TRAINING, Stage1Config, fields_in_roles
from ..distributed import World
from ..runtime import autocast, to_device
from ..training import (STATE, STATS, DivergenceGuard, EpochSampler, StatsLog, ema_update, generator_states,
                        load_training_state, restore_generator, save_training_state, to_float, uint8_nchw)
from . import augment
from .networks import build_network
from .ssl import DistAlign, FreeMatchThreshold, ssl_step


def cosine_lr(lr: float, step: int, total: int) -> float:
    """FixMatch's schedule lr * cos(7 pi k / (16 K))."""
    return lr * math.cos(7 * math.pi * step / (16 * total))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only (FixMatch/USB exclude biases and BatchNorm)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _resume_key(cfg: Stage1Config, total: int, num_classes: int, shape: tuple) -> dict:
    """What a saved state must match to be resumed: the TRAINING fields (config.py's roles), not the schedule."""
    return {"stage1": fields_in_roles(cfg, TRAINING), "iterations": total, "num_classes": num_classes,
            "image_shape": list(shape)}


class _Batches:
    """The training images as uint8 (N, C, H, W) on the device, and this process's share of the global batch k.

    A global batch is B labeled images, of which round(pseudo_fraction * B) pseudo-images when there are any, and
    uratio * B unlabeled images; with several processes each takes every size-th image of it."""

    def __init__(self, cfg: Stage1Config, x_lb: np.ndarray, y_lb: np.ndarray, x_ulb: np.ndarray | None,
                 x_pseudo: np.ndarray | None, y_pseudo: np.ndarray | None, pseudo_fraction: float, *, ssl: bool,
                 seed: int, device: torch.device, world: World):
        B = cfg.batch_size
        world.per_rank(B, "stage1.batch_size")
        self.device = device
        self.part = slice(world.rank, None, world.size)         # this process's share of each global batch
        self.mine = torch.arange(B)[self.part]                  # its positions in the labeled (+ pseudo) batch
        self.lb = uint8_nchw(x_lb, "x_lb", device)
        self.y_lb = torch.as_tensor(np.asarray(y_lb), dtype=torch.long, device=device)
        if len(self.lb) == 0 or len(self.lb) != len(self.y_lb):
            raise ValueError(f"x_lb has {len(self.lb)} images and y_lb {len(self.y_lb)} labels; need the same, > 0")
        self.shape = tuple(self.lb.shape[1:])                   # (C, H, W)
        self.n_pseudo = 0
        if x_pseudo is not None and len(x_pseudo) > 0:
            self.ps = uint8_nchw(x_pseudo, "x_pseudo", device)
            self.y_ps = torch.as_tensor(np.asarray(y_pseudo), dtype=torch.long, device=device)
            if self.ps.shape[1:] != self.lb.shape[1:] or len(self.ps) != len(self.y_ps):
                raise ValueError(f"x_pseudo {tuple(self.ps.shape)} / y_pseudo {len(self.y_ps)} do not match x_lb "
                                 f"{tuple(self.lb.shape)}")
            self.n_pseudo = int(round(pseudo_fraction * B))
            self.sampler_ps = EpochSampler(len(self.ps), self.n_pseudo, seed + 2)
        self.n_real = B - self.n_pseudo
        self.sampler_lb = EpochSampler(len(self.lb), self.n_real, seed)
        if ssl:
            if x_ulb is None or len(x_ulb) == 0:
                raise ValueError(f"learner {cfg.learner!r} needs unlabeled images (x_ulb); use learner=supervised")
            self.ulb = uint8_nchw(x_ulb, "x_ulb", device)
            if self.ulb.shape[1:] != self.lb.shape[1:]:
                raise ValueError(f"x_ulb images {tuple(self.ulb.shape[1:])} differ from x_lb images "
                                 f"{tuple(self.lb.shape[1:])}")
            self.sampler_ulb = EpochSampler(len(self.ulb), cfg.uratio * B, seed + 1)

    def labeled(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's labeled (+ pseudo) images float (b, C, H, W) in [-1, 1] and labels (b,) of batch k."""
        mine, n = self.mine, self.n_real
        i = to_device(self.sampler_lb.batch(k)[mine[mine < n]], self.device)
        x, y = to_float(self.lb[i]), self.y_lb[i]
        if self.n_pseudo > 0:
            i = to_device(self.sampler_ps.batch(k)[mine[mine >= n] - n], self.device)
            x, y = torch.cat([x, to_float(self.ps[i])]), torch.cat([y, self.y_ps[i]])
        return x, y

    def unlabeled(self, k: int) -> torch.Tensor:
        """This process's unlabeled images float (u, C, H, W) in [-1, 1] of batch k."""
        return to_float(self.ulb[to_device(self.sampler_ulb.batch(k)[self.part], self.device)])


def _network(cfg: Stage1Config, num_classes: int, shape: tuple, seed: int,
             init_weights: dict[str, torch.Tensor] | None, device: torch.device) -> nn.Module:
    """The seeded network in training mode (the global RNG untouched), its trunk from `init_weights` if given."""
    C, H, _ = shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_network(cfg.network, num_classes, C, H)
    if init_weights is not None:
        missing, unexpected = model.load_state_dict(init_weights, strict=False)
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise ValueError(f"the encoder's weights do not fit stage1.network={cfg.network!r} "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device, memory_format=torch.channels_last).train()


def _logits(forward: nn.Module, x: torch.Tensor, x_u: torch.Tensor | None, gen: torch.Generator,
            cfg: Stage1Config, hflip: bool, device: torch.device, precision: str):
    """Logits of the labeled weak view (b, K) and, given x_u, of the unlabeled weak and strong views (u, K) each
    (else None, None): the views are augmented with `gen` and forwarded as one concatenated batch."""
    views = [augment.weak(x, gen, hflip)]                                       # (b, C, H, W)
    if x_u is not None:
        views += [augment.weak(x_u, gen, hflip),                                # x_ulb_w (u, C, H, W)
                  augment.strong(x_u, gen, hflip, cfg.randaugment_ops, cfg.cutout)]  # x_ulb_s
    inputs = torch.cat(views).contiguous(memory_format=torch.channels_last)     # (b + 2u, C, H, W)
    with autocast(device, precision):
        logits = forward(inputs).float()                                        # (b + 2u, K)
    if x_u is None:
        return logits, None, None
    b, u = len(x), len(x_u)
    return logits[:b], logits[b:b + u], logits[b + u:]


def _save(path: Path, step: int, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer,
          threshold: FreeMatchThreshold | None, align: DistAlign | None, gen: torch.Generator, key: dict,
          world: World) -> None:
    """The resumable state: weights, optimizer, SSL states, every process's augmentation stream, step, key."""
    rng = {"augment": gen.get_state()}
    ranks = generator_states(gen, world)                # a collective call with several processes
    if world.distributed:
        rng["augment_ranks"] = ranks
    save_training_state(path, {
        "step": step, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
        "threshold": threshold.state_dict() if threshold is not None else {},
        **({"dist_align": align.state_dict()} if align is not None else {}),
        "rng": rng, "resume_key": key}, world=world)


def _restore(path: Path, key: dict, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer,
             threshold: FreeMatchThreshold | None, align: DistAlign | None, gen: torch.Generator, world: World,
             device: torch.device) -> int | None:
    """Load the state `_save` wrote at `path` under `key` into the training objects; its step (None: no state)."""
    def restore(state: dict) -> int:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        if threshold is not None:
            threshold.load_state_dict(state["threshold"])
        if align is not None:
            align.load_state_dict(state["dist_align"])
        restore_generator(gen, state["rng"].get("augment_ranks", [state["rng"]["augment"]]), world)
        return int(state["step"])

    return load_training_state(path, key, restore, what="stage-1", map_location=device,
                               differs="a different stage-1 config, data shape or iteration count")


def train_classifier(cfg: Stage1Config, *, x_lb: np.ndarray, y_lb: np.ndarray, x_ulb: np.ndarray | None,
                     num_classes: int, hflip: bool, out_dir: str | Path, device: str | torch.device,
                     precision: str, seed: int, x_pseudo: np.ndarray | None = None,
                     y_pseudo: np.ndarray | None = None, pseudo_fraction: float = 0.0,
                     iterations: int | None = None, stop_at: int | None = None,
                     world: World, progress: bool = True, desc: str | None = None,
                     init_weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Train (or resume from out_dir/state.pt) and return the EMA model in eval mode.

    Images are uint8 (N, H, W, C); labels int (N,). `init_weights`: a trunk state dict (the self-supervised
    encoder's, `fc` excluded) the network starts from; the final linear layer keeps its fresh initialisation.
    `stop_at` ends this call early at that step (state saved), the schedule still spanning all `iterations`
    (default cfg.iterations). `desc` labels the progress bar (default "<out_dir name> <learner>"). With several
    processes (`world`: `distributed.LOCAL` for one) each takes 1/size of every global batch, gradients
    are averaged by DDP, the SSL states follow the whole batch, and rank 0 alone writes files.
    """
    device, out_dir = torch.device(device), Path(out_dir)
    total = int(iterations or cfg.iterations)
    end = total if stop_at is None else min(total, stop_at)
    ssl = cfg.learner != "supervised" and cfg.uratio > 0
    data = _Batches(cfg, x_lb, y_lb, x_ulb, x_pseudo, y_pseudo, pseudo_fraction, ssl=ssl, seed=seed, device=device,
                    world=world)

    # ---- model, EMA, optimizer, SSL states, augmentation generator
    model = _network(cfg, num_classes, data.shape, seed, init_weights, device)
    ema = copy.deepcopy(model).requires_grad_(False)
    forward = world.wrap(model, device)                                         # DDP when several processes
    opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov)
    threshold = FreeMatchThreshold.init(num_classes, cfg.threshold_ema, device) if cfg.learner == "freematch" else None
    align = DistAlign.init(num_classes, cfg.threshold_ema, device, data.y_lb) if ssl and cfg.dist_align else None
    gen = torch.Generator(device=device).manual_seed(seed + 1_000_003 * world.rank)

    # ---- resume
    key, state_path = _resume_key(cfg, total, num_classes, data.shape), out_dir / STATE
    step = _restore(state_path, key, model, ema, opt, threshold, align, gen, world, device)
    resumed, step = step is not None, step or 0
    stats = StatsLog.resume(out_dir / STATS, step, world=world) if resumed else \
        StatsLog(out_dir / STATS, world=world)     # lines logged after the saved state are dropped
    guard = DivergenceGuard(out_dir.name, "Lower stage1.lr or use runtime.precision=fp32", state_path,
                            step if resumed else None, world=world, device=device)

    def checkpoint() -> None:
        guard.check_weights(model, ema, at=f"after step {step}")       # a saved state always holds finite weights
        _save(state_path, step, model, ema, opt, threshold, align, gen, key, world)
        guard.saved(step)

    # ---- training loop
    t_start = t_log = time.time()
    window, saved = [], False
    with tqdm(total=total, initial=step, disable=not progress or not world.is_main, dynamic_ncols=True,
              desc=desc or f"{out_dir.name} {cfg.learner}") as bar:
        while step < end:
            lr = cosine_lr(cfg.lr, step, total)
            for group in opt.param_groups:
                group["lr"] = lr
            x_lb_k, y_lb_k = data.labeled(step)
            x_ulb_k = data.unlabeled(step) if ssl else None
            logits_x_lb, logits_x_ulb_w, logits_x_ulb_s = _logits(forward, x_lb_k, x_ulb_k, gen, cfg, hflip, device,
                                                                  precision)
            out = ssl_step(logits_x_lb, y_lb_k, logits_x_ulb_w, logits_x_ulb_s, threshold, align,
                           p_cutoff=cfg.p_cutoff, lambda_u=cfg.lambda_u, lambda_f=cfg.lambda_f,
                           hard_label=cfg.hard_label, T=cfg.T, gather=world.all_gather)
            threshold, align = out.threshold, out.align
            guard.check_step(out.loss, lambda: f"training loss at step {step} (loss_x={out.loss_x.item():.4g}, "
                                               f"loss_u={out.loss_u.item():.4g}, loss_f={out.loss_f.item():.4g})")
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            # EMA warm-up (as TF's ExponentialMovingAverage with num_updates): short runs still average late weights
            ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1
            bar.update(1)
            window.append(torch.stack([out.loss_x, out.loss_u, out.loss_f, out.mask]))

            # check, log, checkpoint
            log_now = step % cfg.log_every == 0 or step == end
            save_now = step % cfg.checkpoint_every == 0 or step == end
            if log_now or save_now:
                guard.check_window(torch.stack(window), f"training loss between step {step - len(window)} and {step}")
            if log_now:
                lx, lu, lf, mk = torch.stack(window).mean(0).tolist()
                now = time.time()
                tau = None if not ssl else (cfg.p_cutoff if threshold is None else float(threshold.time_p))
                stats.append({"step": step, "loss_x": lx, "loss_u": lu, "loss_f": lf, "mask": mk if ssl else None,
                              "lr": lr, "threshold": tau, "time": round(now - t_start, 3),
                              "steps_per_s": round(len(window) / max(now - t_log, 1e-9), 3)})
                stats.write()
                bar.set_postfix(loss=f"{lx + cfg.lambda_u * lu:.3f}", mask=f"{mk:.2f}" if ssl else "-",
                                sps=f"{len(window) / max(now - t_log, 1e-9):.1f}")
                t_log, window = now, []
            if save_now:
                checkpoint()
                saved = True
    if not (saved or resumed):
        checkpoint()
    return ema.eval()


@torch.no_grad()
def predict(model: nn.Module, images_uint8: np.ndarray, *, batch_size: int, device: str | torch.device,
            precision: str) -> np.ndarray:
    """Class probabilities (N, C) float32 for uint8 images (N, H, W, C)."""
    device = torch.device(device)
    model = model.to(device).eval()
    images = np.asarray(images_uint8)
    if images.ndim == 3:
        images = images[..., None]
    out = []
    for i in range(0, len(images), batch_size):
        x = to_float(uint8_nchw(images[i:i + batch_size], "images", device))
        with autocast(device, precision):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        out.append(torch.softmax(logits.float(), dim=-1).cpu())
    if not out:
        return np.zeros((0, 0), np.float32)
    return torch.cat(out).numpy().astype(np.float32)


_META_KEYS = ("network", "num_classes", "in_channels", "image_size")


def save_classifier(path: str | Path, model: nn.Module, meta: dict) -> Path:
    """Write inference weights as safetensors with `meta` (network, num_classes, in_channels, image_size, ...)."""
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"save_classifier: meta lacks {missing} (needs {list(_META_KEYS)})")
    return save_weights(path, model.state_dict(), meta, "dualpseudo_classifier")


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, meta) from a file written by `save_classifier`; no pickle involved."""
    tensors, meta = load_weights(path, "dualpseudo_classifier", "dualpseudo classifier")
    model = build_network(meta["network"], int(meta["num_classes"]), int(meta["in_channels"]),
                          int(meta["image_size"]))
    model.load_state_dict(tensors)
    return model.to(device, memory_format=torch.channels_last).eval(), meta
