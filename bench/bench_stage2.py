"""Stage-2 speed: our UNet against diffusers' UNet2DModel, FLOP efficiency, sampler throughput.

Measures in one run (medians of timed repetitions after warm-up):
  1. the FLOP rate of a large bf16 matmul (the CPU's practical peak);
  2. training img/s of `unet_small` (EDM loss, Adam step, autocast) and its FLOP rate, counted with
     torch.utils.flop_counter.FlopCounterMode, as a fraction of (1);
  3. the same training step for diffusers' `UNet2DModel` with about the same parameter count
     (32 px, class embedding), in both memory formats, the faster one reported;
  4. guided sampling img/s: DPM-Solver++(2M) with 20 steps (20 NFE) vs EDM Heun with 18 steps (35 NFE).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 .venv/bin/python bench/bench_stage2.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dualpseudo.diffuse.edm import EDMLoss, EDMPrecond
from dualpseudo.diffuse.generate import generate
from dualpseudo.diffuse.train import build_model
from dualpseudo.runtime import autocast, resolve_precision


def median_time(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_flops(n: int = 4096, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    return 2 * n ** 3 / median_time(lambda: a @ b, reps)


class DiffusersNet(nn.Module):
    """diffusers UNet2DModel behind our F(x, c_noise, labels) interface (pads 28 -> 32)."""

    def __init__(self, img_channels: int, num_classes: int, channels_last: bool):
        super().__init__()
        from diffusers import UNet2DModel
        self.img_channels, self.image_size, self.num_classes = img_channels, 28, num_classes
        # the same widths, depth and attention placement as unet_small (48/96/96 channels at 32/16/8 px,
        # one residual block per level down, two up, attention only in the middle block)
        self.unet = UNet2DModel(sample_size=32, in_channels=img_channels, out_channels=img_channels,
                                block_out_channels=(48, 96, 96), layers_per_block=1, norm_num_groups=12,
                                down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
                                attention_head_dim=64, num_class_embeds=num_classes + 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def forward(self, x, c_noise, labels):
        h = F.pad(x, (2, 2, 2, 2)).contiguous(memory_format=self.memory_format)
        return self.unet(h, c_noise, class_labels=labels).sample[:, :, 2:30, 2:30]


def train_step_fn(model: EDMPrecond, batch: int, precision: str):
    """A closure running one EDM training step (loss, backward, Adam) on random 28 px data."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = EDMLoss()
    x = (torch.rand(batch, 1, 28, 28) * 2 - 1).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model.num_classes + 1, (batch,))
    dev = torch.device("cpu")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(dev, precision):
            loss = loss_fn(model, x, y).mean()
        loss.backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: bf16 where this CPU runs it natively, else fp32 (runtime.resolve_precision)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sample-images", type=int, default=32)
    ap.add_argument("--sample-reps", type=int, default=3)
    args = ap.parse_args()
    args.precision = resolve_precision(args.precision, torch.device("cpu"))
    torch.manual_seed(0)
    rows = []

    peak = matmul_flops()
    rows.append(("bf16 matmul 4096^3", f"{peak / 1e9:.0f} GFLOP/s", ""))

    # training steps of both networks, interleaved so that load from other processes hits both alike
    ours = build_model("unet_small", 1, 28, 10, 0.5).train()
    fns = {"ours": train_step_fn(ours, args.batch, args.precision)}
    with FlopCounterMode(display=False) as fc:
        fns["ours"]()
    for cl in (False, True):
        theirs = EDMPrecond(DiffusersNet(1, 10, cl), 0.5).train()
        fns["channels_last" if cl else "contiguous"] = train_step_fn(theirs, args.batch, args.precision)
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(args.reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    t_ours = statistics.median(times.pop("ours"))
    best_fmt = min(times, key=lambda k: statistics.median(times[k]))
    t_theirs = statistics.median(times[best_fmt])
    flops = fc.get_total_flops() / t_ours
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    rows.append((f"train unet_small ({n_ours / 1e6:.2f}M)", f"{args.batch / t_ours:.0f} img/s",
                 f"{flops / 1e9:.0f} GFLOP/s = {100 * flops / peak:.0f}% of matmul"))
    rows.append((f"train diffusers UNet2DModel ({n_theirs / 1e6:.2f}M, {best_fmt})",
                 f"{args.batch / t_theirs:.0f} img/s", f"ours/theirs = {t_theirs / t_ours:.2f}x"))
    rows.append(("bf16 matmul 4096^3, after the training steps", f"{matmul_flops() / 1e9:.0f} GFLOP/s", ""))

    ema = ours.eval()
    labels = np.arange(args.sample_images) % 10
    seeds = np.arange(args.sample_images)
    for sampler, steps, nfe in (("dpmpp_2m", 20, 20), ("heun", 18, 35)):
        run = lambda: generate(ema, labels, seeds, sampler=sampler, steps=steps, guidance_scale=1.0,
                               batch_size=args.sample_images, precision=args.precision)
        t = median_time(run, args.sample_reps, warmup=1)
        rows.append((f"sample {sampler} {steps} steps ({nfe} NFE, CFG)", f"{args.sample_images / t:.1f} img/s", ""))

    print(f"\nbatch {args.batch}, {args.precision}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"medians of {args.reps} (train) / {args.sample_reps} (sampling) repetitions")
    w = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{w}}  {value:>14}  {note}")


if __name__ == "__main__":
    main()
