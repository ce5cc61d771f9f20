"""Device, precision, threads and seeding: applied once at start-up from `RuntimeConfig`."""
from __future__ import annotations

import contextlib
import dataclasses
import random
import sys

import numpy as np
import torch

from .config import ConfigError, ExperimentConfig, RuntimeConfig


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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls and convolutions in hardware: a CUDA device with bf16, or a CPU that
    oneDNN runs bf16 on (AVX-512 or AMX). Elsewhere bf16 autocast is emulated: 8.5 times slower than fp32 on an
    AVX2 CPU (BENCHMARKS.md, "Precision on CPUs without native bf16")."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:                                  # a torch built without oneDNN
        return False


_warned: set[str] = set()


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 where `device` runs it natively, else fp32. An explicit bf16 on a CPU that emulates it is
    kept (a run may need to match one made elsewhere) with one warning on stderr, since it is several times
    slower there."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device) and "bf16" not in _warned:
        _warned.add("bf16")
        print("warning: runtime.precision=bf16 on a CPU without native bf16 (no AVX-512 or AMX): autocast is "
              "emulated and several times slower than fp32; runtime.precision=auto picks fp32 here",
              file=sys.stderr, flush=True)
    return precision


def resolve_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with `runtime.precision` resolved for this machine's device (`auto` -> bf16 or fp32), so the run
    directory's config, stage hashes and cache keys hold the precision the stages compute in. Unchanged when the
    device is absent (the run stops on it later; `--dry-run` lists it)."""
    try:
        device = resolve_device(cfg.runtime.device)
    except ConfigError:
        return cfg
    precision = resolve_precision(cfg.runtime.precision, device)
    if precision == cfg.runtime.precision:
        return cfg
    return dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, precision=precision))


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
    """A context that runs matmuls/convs in bf16/fp16 when asked; a no-op for fp32. `auto` is resolved first
    (`resolve_precision`), so it is not a value here."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"autocast: precision {precision!r} is not fp32, bf16 or fp16 (resolve `auto` first)")
    return torch.autocast(device_type=device.type, dtype=dtypes[precision])
