"""Device, precision, threads and seeding: applied once at start-up from `RuntimeConfig`."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from .config import ConfigError, RuntimeConfig


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cpu`, `cuda` and `cuda:N` must exist on this machine.

    A malformed name or an absent device raises `ConfigError` (one `error:` line from the command line)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (name in ("cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"runtime.device: {name!r} is not a device; use cpu, cuda, cuda:N or auto")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "no CUDA device is visible" if torch.backends.cuda.is_built() else \
                f"this torch ({torch.__version__}) is built without CUDA"
            raise ConfigError(f"runtime.device={name!r} but {why}; use runtime.device=cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"runtime.device={name!r} but only {torch.cuda.device_count()} CUDA device(s) "
                              f"are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def setup(rt: RuntimeConfig) -> torch.device:
    """Apply thread count and seed; return the device."""
    if rt.threads > 0:
        torch.set_num_threads(rt.threads)
    seed_everything(rt.seed)
    return resolve_device(rt.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (on the CPU) on `device`; to CUDA through pinned memory without waiting for the copy (no host sync)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def autocast(device: torch.device, precision: str):
    """A context that runs matmuls/convs in bf16/fp16 when asked; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
