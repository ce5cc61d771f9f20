"""bf16 autocast against fp32 on this CPU: the training steps of every stage, in one run.

On a CPU with native bf16 (oneDNN on AVX-512 or AMX) bf16 autocast is faster than fp32; on one without it
(AVX2 only: most laptops and many cloud CPUs) it is emulated and several times slower. `runtime.precision: auto`
(the default) picks bf16 only where `runtime.native_bf16` says the CPU has it; this bench measures the trade
that rule is built on. Rows, each a median of timed repetitions after warm-up, bf16 and fp32 interleaved so that
load from other processes hits both alike:

  - the encoder's SimCLR step: forward+backward of 2 x 256 views through `cnn_small` with its projection head;
  - stage 1's bare step: forward+backward of 960 images through `cnn_small` (bench_stage1.py's "bare" row);
  - stage 2's training step: `unet_small`, EDM loss, Adam, a batch of --unet-batch images;
  - a 1024^3 matmul.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 .venv/bin/python bench/bench_precision.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dualpseudo.classify.contrastive import ContrastiveModel, nt_xent
from dualpseudo.classify.networks import build_network
from dualpseudo.diffuse.train import build_model
from dualpseudo.runtime import autocast, native_bf16, resolve_precision

from bench_stage2 import train_step_fn   # the stage-2 training step bench_stage2.py times (bench/ is on the path)

PRECISIONS = ("fp32", "bf16")
CPU = torch.device("cpu")


def encoder_step(precision: str):
    model = ContrastiveModel("cnn_small", 1, 28, 128).to(memory_format=torch.channels_last).train()
    x = torch.randn(512, 1, 28, 28).contiguous(memory_format=torch.channels_last)

    def step():
        with autocast(CPU, precision):
            z = model(x)
        nt_xent(z, 0.2).backward()
    return step


def stage1_step(precision: str):
    model = build_network("cnn_small", 10, 1, 28).to(memory_format=torch.channels_last).train()
    x = torch.randn(960, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (960,))

    def step():
        with autocast(CPU, precision):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
    return step


def stage2_step(precision: str, batch: int):
    return train_step_fn(build_model("unet_small", 1, 28, 10, 0.5).train(), batch, precision)   # as bench_stage2.py


def matmul(precision: str):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    return lambda: a @ b


def timed(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds per call of each closure, calls interleaved round by round after two warm-up rounds."""
    times = {k: [] for k in fns}
    for r in range(reps + 2):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r >= 2:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--unet-batch", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16(CPU)}, "
          f"runtime.precision=auto -> {resolve_precision('auto', CPU)}, {torch.get_num_threads()} threads")
    rows = [("encoder SimCLR step (2 x 256 views)", encoder_step, 512),
            ("stage-1 bare fwd+bwd (960 images)", stage1_step, 960),
            (f"stage-2 unet_small train step (batch {args.unet_batch})", lambda p: stage2_step(p, args.unet_batch),
             args.unet_batch),
            ("matmul 1024^3", matmul, 0)]
    print(f"{'':44s} {'fp32 s':>8s} {'bf16 s':>8s} {'bf16/fp32':>9s} {'fp32 img/s':>10s}")
    for name, make, images in rows:
        t = timed({p: make(p) for p in PRECISIONS}, args.reps)
        ips = f"{images / t['fp32']:10.0f}" if images else f"{'':10s}"
        print(f"{name:44s} {t['fp32']:8.4f} {t['bf16']:8.4f} {t['bf16'] / t['fp32']:9.2f} {ips}", flush=True)


if __name__ == "__main__":
    main()
