"""Device, precision, threads and seeding: applied once at start-up from `RuntimeConfig`."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from .config import RuntimeConfig


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device={name!r} but no CUDA device is available; use runtime.device=cpu")
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


def autocast(device: torch.device, precision: str):
    """A context that runs matmuls/convs in bf16/fp16 when asked; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
