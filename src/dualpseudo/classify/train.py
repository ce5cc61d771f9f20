"""Stage-1/3 classifier training: FixMatch / FreeMatch / supervised with an EMA model, resumable.

The recipe of FixMatch (Sohn et al., NeurIPS 2020): SGD with Nesterov momentum, weight decay on weights (not on
biases/BatchNorm), learning rate lr * cos(7 pi k / (16 K)), an EMA of the weights for evaluation, and the
labeled, weak and strong views forwarded as one concatenated batch. FreeMatch (Wang et al., ICLR 2023) swaps the
fixed threshold for `FreeMatchThreshold` and adds the fairness loss. Stage 3 of Dual Pseudo Training (You et al.,
NeurIPS 2023) mixes pseudo-images into every labeled batch (`pseudo_fraction`).

Batches are drawn from reshuffled epochs whose permutation is a function of (seed, epoch), so the data order
needs no saved state; the augmentation generator's state is saved in `state.pt`. Resuming therefore gives the
same weights as an uninterrupted run.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..artifacts import ArtifactError, load_state, load_weights, read_log, save_state, save_weights, write_text
from ..config import Stage1Config, hashable_dict
from ..distributed import World, current
from ..guards import DivergenceError, finite, kept_state
from ..runtime import autocast, to_device
from . import augment
from .networks import build_network
from .ssl import DistAlign, FreeMatchThreshold, consistency_loss, fairness_loss, fixmatch_mask, supervised_loss

STATE_FILE = "state.pt"
STATS_FILE = "stats.jsonl"
# Changing these between a run and its resume is harmless; any other Stage1Config field is not.
_RESUME_SAFE_FIELDS = ("checkpoint_every", "log_every", "predict_batch_size")


class EpochSampler:
    """Indices of reshuffled epochs over n items; batch k is a pure function of (seed, k)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def batch(self, k: int) -> torch.Tensor:
        """Indices (batch_size,) of batch k."""
        start = k * self.batch_size
        parts, pos = [torch.zeros(0, dtype=torch.long)], start
        while pos < start + self.batch_size:
            epoch, off = divmod(pos, self.n)
            take = min(self.n - off, start + self.batch_size - pos)
            parts.append(self._perm(epoch)[off:off + take])
            pos += take
        return torch.cat(parts)


def _to_device_uint8(images: np.ndarray, name: str, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, C) or (N, H, W) numpy -> uint8 (N, C, H, W) tensor on `device`."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"{name} must be uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    if images.ndim == 3:
        images = images[..., None]
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)


def _to_float(u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (N, C, H, W) in [-1, 1]."""
    return u8.float().div_(127.5).sub_(1.0)


def cosine_lr(lr: float, step: int, total: int) -> float:
    """FixMatch's schedule lr * cos(7 pi k / (16 K))."""
    return lr * math.cos(7 * math.pi * step / (16 * total))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only (FixMatch/USB exclude biases and BatchNorm)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; BatchNorm buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def _global_probs(logits: torch.Tensor, world: World) -> torch.Tensor:
    """Softmax of this rank's logits (u, C), gathered from every rank: (world.size * u, C)."""
    return world.all_gather(torch.softmax(logits.detach().float(), dim=-1))


def _resume_config(cfg: Stage1Config, total: int, num_classes: int, shape: tuple) -> dict:
    """What a saved state must match to be resumed."""
    d = {k: v for k, v in hashable_dict(cfg).items() if k not in _RESUME_SAFE_FIELDS}
    return {"stage1": d, "iterations": total, "num_classes": num_classes, "image_shape": list(shape)}


def train_classifier(cfg: Stage1Config, *, x_lb: np.ndarray, y_lb: np.ndarray, x_ulb: np.ndarray | None,
                     num_classes: int, hflip: bool, out_dir: str | Path, device: str | torch.device,
                     precision: str, seed: int, x_pseudo: np.ndarray | None = None,
                     y_pseudo: np.ndarray | None = None, pseudo_fraction: float = 0.0,
                     iterations: int | None = None, stop_at: int | None = None,
                     progress: bool = True, world: World | None = None, desc: str | None = None,
                     init_weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Train (or resume from out_dir/state.pt) and return the EMA model in eval mode.

    `init_weights`: a trunk state dict (the self-supervised encoder's, `fc` excluded) the network starts from;
    the final linear layer keeps its fresh initialisation.

    `desc` labels the progress bar (default: "<out_dir name> <learner>", e.g. "stage3 freematch").

    Images are uint8 (N, H, W, C); labels int (N,). `stop_at` ends this call early at that step (state saved),
    the schedule still spanning all `iterations` (default cfg.iterations). With several processes (`world`,
    default: the initialised process group) each takes 1/size of every global batch, gradients are averaged by
    DDP, FreeMatch's threshold sees the whole batch, and rank 0 alone writes files.
    """
    world = current() if world is None else world
    device = torch.device(device)
    out_dir = Path(out_dir)
    total = int(iterations or cfg.iterations)
    ssl = cfg.learner != "supervised" and cfg.uratio > 0
    B, U = cfg.batch_size, cfg.uratio * cfg.batch_size
    world.per_rank(B, "stage1.batch_size")
    part = slice(world.rank, None, world.size)        # this process's share of each global batch
    mine = torch.arange(B)[part]                      # its positions in the labeled (+ pseudo) batch of B

    # ---- data: uint8 tensors on the device, index samplers
    lb = _to_device_uint8(x_lb, "x_lb", device)
    y_lb_t = torch.as_tensor(np.asarray(y_lb), dtype=torch.long, device=device)
    if len(lb) == 0 or len(lb) != len(y_lb_t):
        raise ValueError(f"x_lb has {len(lb)} images and y_lb {len(y_lb_t)} labels; need the same, > 0")
    _, C, H, W = lb.shape
    n_pseudo = 0
    if x_pseudo is not None and len(x_pseudo) > 0:
        ps = _to_device_uint8(x_pseudo, "x_pseudo", device)
        y_ps = torch.as_tensor(np.asarray(y_pseudo), dtype=torch.long, device=device)
        if ps.shape[1:] != lb.shape[1:] or len(ps) != len(y_ps):
            raise ValueError(f"x_pseudo {tuple(ps.shape)} / y_pseudo {len(y_ps)} do not match x_lb {tuple(lb.shape)}")
        n_pseudo = int(round(pseudo_fraction * B))
        sampler_ps = EpochSampler(len(ps), n_pseudo, seed + 2)
    sampler_lb = EpochSampler(len(lb), B - n_pseudo, seed)
    if ssl:
        if x_ulb is None or len(x_ulb) == 0:
            raise ValueError(f"learner {cfg.learner!r} needs unlabeled images (x_ulb); use learner=supervised")
        ulb = _to_device_uint8(x_ulb, "x_ulb", device)
        if ulb.shape[1:] != lb.shape[1:]:
            raise ValueError(f"x_ulb images {tuple(ulb.shape[1:])} differ from x_lb images {tuple(lb.shape[1:])}")
        sampler_ulb = EpochSampler(len(ulb), U, seed + 1)

    # ---- model, EMA, optimizer, SSL state, augmentation generator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_network(cfg.network, num_classes, C, H)
    if init_weights is not None:
        missing, unexpected = model.load_state_dict(init_weights, strict=False)
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise ValueError(f"the encoder's weights do not fit stage1.network={cfg.network!r} "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model = model.to(device, memory_format=torch.channels_last).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    forward = world.wrap(model, device)                                         # DDP when several processes
    opt = torch.optim.SGD(_param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov)
    threshold = FreeMatchThreshold.init(num_classes, cfg.threshold_ema, device) if cfg.learner == "freematch" else None
    align = DistAlign.init(num_classes, cfg.threshold_ema, device, y_lb_t) if ssl and cfg.dist_align else None
    gen = torch.Generator(device=device).manual_seed(seed + 1_000_003 * world.rank)
    resume_key = _resume_config(cfg, total, num_classes, (C, H, W))

    # ---- resume
    step, stats_lines, resumed, saved = 0, [], False, False
    state_path, stats_path = out_dir / STATE_FILE, out_dir / STATS_FILE
    if state_path.is_file():
        state = load_state(state_path, map_location=device)
        if not isinstance(state, dict) or state.get("resume_key") != resume_key:
            raise ArtifactError(f"{state_path} was written with a different stage-1 config, data shape or "
                                f"iteration count; delete it (or the run directory) to start over")
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
            if threshold is not None:
                threshold.load_state_dict(state["threshold"])
            if align is not None:
                align.load_state_dict(state["dist_align"])
            per_rank = state["rng"].get("augment_ranks", [state["rng"]["augment"]])
            if world.rank < len(per_rank):
                gen.set_state(per_rank[world.rank].cpu())
            step, resumed = int(state["step"]), True
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"{state_path} is not a usable stage-1 training state ({type(e).__name__}: "
                                f"{str(e)[:200]}); delete it to start over") from None
        stats_lines = read_log(stats_path, step, rewrite=world.is_main)  # drop lines logged after the saved state (logged again)
    good = step if resumed else None                    # the step of the state on disk, None before the first

    def checkpoint() -> None:
        nonlocal good
        if not world.all_true(finite(model, ema), device):     # a saved state always holds finite weights
            bar.close()
            raise DivergenceError(f"{out_dir.name}: non-finite weights after step {step} (the training diverged); "
                                  f"{kept_state(state_path, good)}. Lower stage1.lr or use runtime.precision=fp32")
        rng = {"augment": gen.get_state()}
        if world.distributed:                           # every rank's augmentation stream (a collective call)
            rng["augment_ranks"] = [s.cpu() for s in world.gather(gen.get_state().cpu())]
        if world.is_main:
            save_state(state_path, {
                "step": step, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "threshold": threshold.state_dict() if threshold is not None else {},
                **({"dist_align": align.state_dict()} if align is not None else {}),
                "rng": rng, "resume_key": resume_key})
        good = step

    # ---- training loop
    end = total if stop_at is None else min(total, stop_at)
    bar = tqdm(total=total, initial=step, disable=not progress or not world.is_main, desc=desc or f"{Path(out_dir).name} {cfg.learner}", dynamic_ncols=True)
    t_start, t_log, window = time.time(), time.time(), []
    check_each_step = device.type == "cpu"         # elsewhere a check is a host-device sync: once per log point
    while step < end:
        lr = cosine_lr(cfg.lr, step, total)
        for group in opt.param_groups:
            group["lr"] = lr

        # batch: labeled (+ pseudo) weak view; unlabeled weak and strong views; one concatenated forward
        i_lb = to_device(sampler_lb.batch(step)[mine[mine < B - n_pseudo]], device)
        x, y = _to_float(lb[i_lb]), y_lb_t[i_lb]
        if n_pseudo > 0:
            i_ps = to_device(sampler_ps.batch(step)[mine[mine >= B - n_pseudo] - (B - n_pseudo)], device)
            x, y = torch.cat([x, _to_float(ps[i_ps])]), torch.cat([y, y_ps[i_ps]])
        views = [augment.weak(x, gen, hflip)]                                   # (B, C, H, W)
        if ssl:
            x_u = _to_float(ulb[to_device(sampler_ulb.batch(step)[part], device)])
            views += [augment.weak(x_u, gen, hflip),                            # x_ulb_w (U, C, H, W)
                      augment.strong(x_u, gen, hflip, cfg.randaugment_ops, cfg.cutout)]  # x_ulb_s
        inputs = torch.cat(views).contiguous(memory_format=torch.channels_last)  # (b + 2u, C, H, W) per rank
        with autocast(device, precision):
            logits = forward(inputs).float()                                    # (b + 2u, num_classes)

        # losses
        b, u = len(y), (len(inputs) - len(y)) // 2
        loss_x = supervised_loss(logits[:b], y)
        loss_u = loss_f = mask = torch.zeros((), device=device)
        if ssl:
            logits_w, logits_s = logits[b:b + u], logits[b + u:]
            # the EMA states (alignment, threshold) follow the global batch: with several processes they are
            # updated from every rank's probabilities first, then used on this rank's share without updating
            local = not world.distributed
            if align is not None:                       # pseudo-labels from the aligned distribution
                if not local:
                    align.update(_global_probs(logits_w, world))
                logits_w = align.aligned_logits(logits_w, update=local)
            if threshold is None:
                mask = fixmatch_mask(logits_w, cfg.p_cutoff)
            else:
                if not local:
                    threshold.update(_global_probs(logits_w, world))
                mask = threshold.mask(logits_w, update=local)
                if cfg.lambda_f > 0:
                    loss_f = fairness_loss(logits_s, mask, threshold)
            loss_u = consistency_loss(logits_s, logits_w, mask, cfg.hard_label, cfg.T)
            mask = mask.mean()
        loss = loss_x + cfg.lambda_u * loss_u + cfg.lambda_f * loss_f
        if check_each_step and not world.all_true(torch.isfinite(loss), device):
            bar.close()
            raise DivergenceError(
                f"{out_dir.name}: non-finite training loss at step {step} (loss_x={loss_x.item():.4g}, loss_u={loss_u.item():.4g},"
                f" loss_f={loss_f.item():.4g}); {kept_state(state_path, good)}. Lower stage1.lr "
                f"or use runtime.precision=fp32")

        # update
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # EMA warm-up (as TF's ExponentialMovingAverage with num_updates): short runs still average late weights
        _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        bar.update(1)
        window.append(torch.stack([loss_x.detach(), loss_u.detach(), loss_f.detach(), mask]))
        if not check_each_step and (step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or step == end):
            if not world.all_true(torch.isfinite(torch.stack(window)).all(), device):
                bar.close()
                raise DivergenceError(f"{out_dir.name}: non-finite training loss between step {step - len(window)} "
                                      f"and {step}; {kept_state(state_path, good)}. Lower stage1.lr or use "
                                      f"runtime.precision=fp32")

        # log, checkpoint
        if step % cfg.log_every == 0 or step == end:
            lx, lu, lf, mk = torch.stack(window).mean(0).tolist()
            now = time.time()
            tau = None if not ssl else (cfg.p_cutoff if threshold is None else float(threshold.time_p))
            stats_lines.append(json.dumps({
                "step": step, "loss_x": lx, "loss_u": lu, "loss_f": lf, "mask": mk if ssl else None, "lr": lr,
                "threshold": tau, "time": round(now - t_start, 3),
                "steps_per_s": round(len(window) / max(now - t_log, 1e-9), 3)}))
            if world.is_main:
                write_text(stats_path, "\n".join(stats_lines) + "\n")
            bar.set_postfix(loss=f"{lx + cfg.lambda_u * lu:.3f}", mask=f"{mk:.2f}" if ssl else "-",
                            sps=f"{len(window) / max(now - t_log, 1e-9):.1f}")
            t_log, window = now, []
        if step % cfg.checkpoint_every == 0 or step == end:
            checkpoint()
            saved = True
    bar.close()
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
        x = _to_float(_to_device_uint8(images[i:i + batch_size], "images", device))
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
