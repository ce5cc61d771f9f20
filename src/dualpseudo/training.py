"""Training machinery shared by every loop (classifier, self-supervised encoder, diffusion, autoencoder).

- Images: uint8 <-> float conversion, [-1, 1] for the networks (`to_float`, `to_uint8`) and [0, 1] for feature
  extractors (`to_unit`); `uint8_nchw` puts numpy images (N, H, W[, C]) on the device as (N, C, H, W).
- Batches: `EpochSampler`, reshuffled epochs whose order is a pure function of (seed, step), so the data order
  needs no saved state.
- EMA: `ema_update`, one lerp of the parameters towards the model's, buffers copied (the decay schedule is the
  loop's: a warm-up for the classifier, EDM's half-life in images for the diffusion model).
- Non-finite guard: `DivergenceGuard` stops a training whose loss or weights turn non-finite, naming the last good
  training state kept on disk (`guards.py` holds the error type and the checks on a classifier's outputs).
- Stats log: `StatsLog`, the JSON-lines `stats.jsonl` (`STATS`) of a run, rewritten whole and atomically by
  rank 0.
- Resumable state (`STATE`), one policy for every loop: `save_training_state` writes it with its key (atomically, with
  its sha256 recorded beside it: `artifacts.save_state`); `load_training_state` resumes it only under the same key. A
  state saved under another key (other settings or data), or one that fails its sha256 or cannot be restored, is an
  `ArtifactError` naming the file: never resumed, never silently trained over. The pipeline reports such a file of a
  stage's own folder, deletes it and runs the stage again; a stage whose settings changed drops its states first
  (`manifest.reset_if_stale`). Per-rank generator states go through `generator_states` / `restore_generator`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

import numpy as np
import torch
import torch.nn as nn

from .artifacts import ArtifactError, load_state, read_log, save_state, write_text
from .distributed import LOCAL, World
from .guards import DivergenceError, finite, kept_state

T = TypeVar("T")

# The files every training loop keeps in its folder (stages/files.py names the stages' other files).
STATE = "state.pt"           # its resumable training state (`save_training_state`)
STATS = "stats.jsonl"        # its logged statistics, one JSON object a line (`StatsLog`)


# ---------------------------------------------------------------------------------------------- images
def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape and layout) -> float32 in [-1, 1], same shape and layout."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {images.dtype}")
    return images.float().div_(127.5).sub_(1.0)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape and layout) -> float32 in [0, 1], same shape and layout."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_unit expects uint8 images, got {images.dtype}")
    return images.float().div_(255.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] (any shape) -> uint8, rounded to the nearest level and clipped to [0, 255]."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def uint8_nchw(images: np.ndarray, name: str, device: torch.device | str) -> torch.Tensor:
    """uint8 (N, H, W, C) or (N, H, W) numpy -> contiguous uint8 (N, C, H, W) tensor on `device`."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"{name} must be uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    if images.ndim == 3:
        images = images[..., None]
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)


# ---------------------------------------------------------------------------------------------- batches
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


# ---------------------------------------------------------------------------------------------- EMA
@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for the parameters; buffers (BatchNorm statistics) are copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# ---------------------------------------------------------------------------------------------- non-finite guard
class DivergenceGuard:
    """Stops a training whose loss or weights turn non-finite; the error names the last good state on disk.

    The weights are checked before every checkpoint (`check_weights`), so a saved state always holds finite weights.
    Losses: `check` reads them at once; `check_step` does so on CPU only and `check_window` (a log point's losses)
    elsewhere, where reading a value is a host-device sync. With several processes every rank takes the same branch.
    """

    def __init__(self, where: str, advice: str, state_path: Path | None, good: float | None = None, *,
                 unit: str = "step", world: World = LOCAL, device: torch.device | str = "cpu"):
        self.where, self.advice, self.state_path, self.unit = where, advice, state_path, unit
        self.good = good                        # progress of the state on disk (step or kimg), None before the first
        self.world, self.device = world, torch.device(device)
        self.each_step = self.device.type == "cpu"

    def saved(self, good: float) -> None:
        """The state on disk is now the one at `good`."""
        self.good = good

    def stop(self, what: str) -> NoReturn:
        kept = "no training state is kept" if self.state_path is None else \
            kept_state(self.state_path, self.good, self.unit)
        raise DivergenceError(f"{self.where}: non-finite {what}; {kept}. {self.advice}")

    def check(self, values: torch.Tensor, what: str | Callable[[], str]) -> None:
        """Stop unless every value is finite on every rank; `what` names them (a callable is called on failure)."""
        if not self.world.all_true(torch.isfinite(values).all(), self.device):
            self.stop(what() if callable(what) else what)

    def check_step(self, loss: torch.Tensor, what: str | Callable[[], str]) -> None:
        """`check` at every step on CPU (a no-op elsewhere: see `check_window`)."""
        if self.each_step:
            self.check(loss, what)

    def check_window(self, losses: torch.Tensor, what: str | Callable[[], str]) -> None:
        """`check` of the losses since the last check, off CPU (on CPU `check_step` has seen them)."""
        if not self.each_step:
            self.check(losses, what)

    def check_weights(self, *modules: nn.Module, at: str) -> None:
        """Stop unless every floating parameter and buffer of `modules` is finite on every rank."""
        if not self.world.all_true(finite(*modules), self.device):
            self.stop(f"weights {at} (the training diverged)")


# ---------------------------------------------------------------------------------------------- stats log
class StatsLog:
    """A run's `stats.jsonl`: one JSON object per log point; `write` rewrites the file whole (atomically) on rank 0."""

    def __init__(self, path: Path, lines: list[str] | None = None, world: World = LOCAL):
        self.path, self.lines, self.world = Path(path), list(lines or []), world

    @classmethod
    def resume(cls, path: Path, upto: float, key: str = "step", world: World = LOCAL) -> "StatsLog":
        """The log's lines up to `upto` (those logged after the resumed state are dropped and logged again)."""
        return cls(path, read_log(path, upto, key, rewrite=world.is_main), world)

    def append(self, row: dict) -> None:
        self.lines.append(json.dumps(row))

    def write(self) -> None:
        if self.world.is_main:
            write_text(self.path, "".join(line + "\n" for line in self.lines))


# ---------------------------------------------------------------------------------------------- resumable state
def save_training_state(path: Path, state: dict, *, key_field: str = "resume_key", world: World = LOCAL) -> None:
    """Rank 0 writes `state` (tensors and plain data, with its key under `key_field`) atomically, sha256 recorded."""
    if key_field not in state:
        raise ValueError(f"a training state needs its key under {key_field!r} to be resumable")
    if world.is_main:
        save_state(path, state)


def load_training_state(path: Path, key, restore: Callable[[dict], T], *, what: str, differs: str,
                        key_field: str = "resume_key", map_location: torch.device | str = "cpu") -> T | None:
    """`restore(state)` of the state saved at `path` under `key`; None when there is no state.

    A state saved under another key (`differs` says what that means, e.g. "other encoder settings or images"),
    one that fails its sha256 record, and one `restore` cannot use (a missing entry, a tensor of another shape) raise
    ArtifactError about `path` (its `path` attribute)."""
    path = Path(path)
    if not path.is_file():
        return None
    state = load_state(path, map_location=map_location)
    if not isinstance(state, dict) or state.get(key_field) != key:
        raise ArtifactError(f"{path} was written with {differs}; delete it to start over", path)
    try:
        return restore(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path} is not a usable {what} training state ({type(e).__name__}: {str(e)[:200]}); "
                            f"delete it to start over", path) from None


def generator_states(gen: torch.Generator, world: World = LOCAL) -> list[torch.Tensor]:
    """Every rank's state of `gen` in rank order (a collective call with several processes)."""
    if not world.distributed:
        return [gen.get_state()]
    return [s.cpu() for s in world.gather(gen.get_state().cpu())]


def restore_generator(gen: torch.Generator, states: list[torch.Tensor], world: World = LOCAL) -> None:
    """Set `gen` to this rank's saved state; a rank the saved states do not cover keeps its seeded state."""
    if world.rank < len(states):
        gen.set_state(states[world.rank].cpu())
