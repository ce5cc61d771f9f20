"""Stage-1 SSL throughput: FixMatch-style steps/s of `cnn_small` and the overhead over a bare forward+backward.

One SSL step = 64 labeled + 448 unlabeled 28x28x1 images (weak + strong views, so 960 images through the
network), augmentation, losses, SGD and EMA, measured inside `train_classifier` from its stats.jsonl. The bare
step is forward+backward of 960 random images through the same network. Medians over repeats. The last line
is the self-supervised encoder's step (`train_encoder` with the demo's encoder settings: 256 images, two views
each, NT-Xent), which sets the demo's longest stage.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 .venv/bin/python bench/bench_stage1.py
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dualpseudo.classify import augment
from dualpseudo.classify.contrastive import train_encoder
from dualpseudo.classify.networks import build_network
from dualpseudo.classify.train import train_classifier
from dualpseudo.config import EncoderConfig, Stage1Config
from dualpseudo.distributed import LOCAL
from dualpseudo.runtime import autocast, resolve_precision


def bare_step_seconds(network: str, n_images: int, precision: str, repeats: int) -> float:
    """Median seconds of forward+backward of n_images random 28x28x1 images."""
    model = build_network(network, 10, 1, 28).to(memory_format=torch.channels_last).train()
    x = torch.randn(n_images, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (n_images,))
    times = []
    for i in range(repeats + 2):
        t = time.perf_counter()
        with autocast(torch.device("cpu"), precision):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def augment_seconds(n: int, repeats: int) -> float:
    """Median seconds of one weak + one strong view of n 28x28x1 images."""
    x = torch.rand(n, 1, 28, 28) * 2 - 1
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats + 2):
        t = time.perf_counter()
        augment.weak(x, g, False)
        augment.strong(x, g, False, 2, 0.5)
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def ssl_step_seconds(learner: str, network: str, precision: str, steps: int, window: int) -> list[float]:
    """Seconds per step of train_classifier, one value per logged window (first window dropped as warm-up)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4096, 28, 28, 1), dtype=np.uint8)
    y = rng.integers(0, 10, 4096)
    cfg = dataclasses.replace(Stage1Config(), learner=learner, network=network, batch_size=64, uratio=7,
                              iterations=steps, log_every=window, checkpoint_every=10**6)
    with tempfile.TemporaryDirectory() as tmp:
        train_classifier(cfg, x_lb=x[:640], y_lb=y[:640], x_ulb=x, num_classes=10, hflip=False, out_dir=tmp,
                         device="cpu", precision=precision, seed=0, progress=False, world=LOCAL)
        return logged_step_seconds(tmp)


def logged_step_seconds(out_dir: str) -> list[float]:
    """Seconds per step from a training loop's stats.jsonl, one value per logged window, the first dropped."""
    lines = [json.loads(l) for l in (Path(out_dir) / "stats.jsonl").read_text().splitlines()]
    return [1.0 / l["steps_per_s"] for l in lines[1:]]


def encoder_step_seconds(network: str, precision: str, steps: int, window: int) -> list[float]:
    """Seconds per step of train_encoder (the demo's views and batch), one value per logged window (first dropped)."""
    x = np.random.default_rng(0).integers(0, 256, (4096, 28, 28, 1), dtype=np.uint8)
    cfg = EncoderConfig(network=network, steps=steps, batch_size=256, crop_min=0.5, cutout=0, log_every=window,
                        checkpoint_every=10**6)
    with tempfile.TemporaryDirectory() as tmp:
        train_encoder(cfg, x, tmp, hflip=False, device="cpu", precision=precision, seed=0, progress=False,
                      world=LOCAL)
        return logged_step_seconds(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="cnn_small")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 where this CPU runs it natively, else fp32 (runtime.resolve_precision)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    args.precision = resolve_precision(args.precision, torch.device("cpu"))
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    bare = bare_step_seconds(args.network, 64 + 2 * 448, args.precision, repeats=10)
    aug = augment_seconds(448, repeats=10)
    print(f"{args.network}, {args.precision}, {torch.get_num_threads()} threads, 64 labeled + 448 unlabeled / step")
    print(f"{'':28s} {'s/step':>8s} {'steps/s':>8s} {'x bare':>7s}")
    print(f"{'bare fwd+bwd (960 images)':28s} {bare:8.4f} {1 / bare:8.2f} {1.0:7.2f}")
    print(f"{'augment weak+strong (448)':28s} {aug:8.4f} {1 / aug:8.2f} {aug / bare:7.2f}")
    for learner in ("fixmatch", "freematch"):
        s = statistics.median(ssl_step_seconds(learner, args.network, args.precision, args.steps, args.window))
        print(f"{learner + ' full step':28s} {s:8.4f} {1 / s:8.2f} {s / bare:7.2f}")
    s = statistics.median(encoder_step_seconds(args.network, args.precision, args.steps, args.window))
    print(f"{'encoder step (256 x 2)':28s} {s:8.4f} {1 / s:8.2f} {s / bare:7.2f}")


if __name__ == "__main__":
    main()
